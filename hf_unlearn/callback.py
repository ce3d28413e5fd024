"""`UnlearningCallback`: unlearn at the end of training in any existing Trainer (TRL's `SFTTrainer` too).

    trainer = Trainer(..., callbacks=[UnlearningCallback(request, UnlearningArguments(), output_dir="unlearned")])
    trainer.train()   # trains, then applies `request` to the live adapter and writes it to output_dir

Request ids name the rows of the Trainer's train loader by their "id" field, else their index (`data.row_ids`;
the loader's shuffling does not change row indices). The rows and the collator are the ones the loader uses
(after it dropped unused columns, an "id" column included: pass `train_dataset=` the dataset as given to the
Trainer to name rows by it; under TRL's `SFTTrainer`, which prepares its own tokenised rows from it, each given
row is paired with the prepared one, and the named rows are checked to line up). The request is checked against
them when training begins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config import UnlearningArguments
from .data import TrainingSet, row_ids
from .distributed import Processes
from .eraser import UnlearningResult
from .errors import ConfigurationError, InvalidRequestError, UnlearningError
from .io import check_output_dir, save_unlearned_adapter
from .objective import UnlearningTask
from .request import UnlearningRequest, about_row
from .trainer import CollatorTask, task_for_trainer
from .trainer_wiring import CallbackGroup, UnlearningWiring, log_stats


def extract_model(model):
    from accelerate.utils import extract_model_from_parallel

    return model if model is None else extract_model_from_parallel(model)


def trainer_tokenizer(processing_class, train_dataloader):
    """What `Trainer.save_model` saves beside a model: the processing class, else the data collator's tokenizer."""
    if processing_class is not None:
        return processing_class
    collator = getattr(getattr(train_dataloader, "collate_fn", None), "data_collator", None) or getattr(
        train_dataloader, "collate_fn", None
    )  # a RemoveColumnsCollator keeps the Trainer's collator as data_collator
    return getattr(collator, "tokenizer", None)


def _columns(rows) -> list[str] | None:
    """The fields of a dataset's rows (a `datasets.Dataset`'s columns, else the first row's keys)."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    if rows is not None and len(rows) and isinstance(rows[0], Mapping):
        return list(rows[0])
    return None


class PairedRows(Sequence):
    """The rows a Trainer prepared from a dataset (`loader`: what its collator sees) with the dataset's own fields
    (`given`: its "id", its text) beside them, paired by position: row i is `{**given[i], **loader[i]}`."""

    def __init__(self, given, loader):
        self.given, self.loader = given, loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {**self.given[index], **self.loader[index]}


TEXT_COLUMNS = ("prompt", "completion", "response", "messages", "text", "conversations")


def _plain(value):
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def check_pairing(request: UnlearningRequest, train: TrainingSet, task: UnlearningTask) -> None:
    """The rows `request` names, when `train` pairs the given dataset's rows with the Trainer's prepared ones
    (`PairedRows`): the fields both have must agree, and a given row's text (prompt + response/completion) must be
    what the task's text encoder makes of it (TRL's encoding under an SFTConfig) — else the ids would name other
    rows than the ones trained on."""
    encoder = getattr(task, "text_encoder", None)
    for row_id in [*request.remove, *request.replace]:
        index = train.index_of(row_id)
        if index is None:
            continue  # refused by the request's resolution, with its own message
        given, loader = train.rows.given[index], train.rows.loader[index]
        differs = [  # text fields may differ (TRL appends EOS to a completion): ids and tokens may not
            k
            for k in given
            if k in loader and k not in TEXT_COLUMNS and _plain(given[k]) != _plain(loader[k])
        ]
        text = (given.get("prompt"), given.get("completion", given.get("response")))
        if not differs and "input_ids" in loader and None not in text and hasattr(encoder, "encode_text"):
            try:
                prompt_ids, response_ids = encoder.encode_text(*text)
            except Exception:  # noqa: BLE001 — a text the encoder cannot take does not line up either
                prompt_ids, response_ids = None, None
            if prompt_ids is None or list(prompt_ids) + list(response_ids) != list(loader["input_ids"]):
                differs = [f"its text encoded ({encoder!r}) is not the prepared row's input_ids"]
        if differs:
            raise ConfigurationError(
                f"Row {row_id!r}: row {index} of train_dataset= does not line up with row {index} the Trainer "
                f"prepared from it ({', '.join(differs)}), so its id would name another row. Give the Trainer's own "
                "dataset, which keeps the 'id' column: callback.train_dataset = trainer.train_dataset (before "
                "trainer.train())."
            )


def check_request(request: UnlearningRequest, train: TrainingSet, task: UnlearningTask) -> None:
    """Resolve `request` against the training rows (ids, fields, kinds) and check that its old and new rows
    go through the task's collation with loss tokens, as the unlearning will need them to."""
    resolved = request.resolve(train, task)
    for edit in resolved.edits:
        for what, row in (("training row", edit.old), ("replacement", edit.new)):
            if row is None:
                continue
            try:
                batch = task.collate([row])
            except UnlearningError as e:
                raise type(e)(about_row(edit.row_id, e, what)) from None
            except Exception as e:  # the Trainer's collator: any error means the row cannot be batched
                raise InvalidRequestError(
                    f"Row {edit.row_id!r}: the {what} cannot be collated like the training rows "
                    f"({type(e).__name__}: {e}). Give it in the training rows' form."
                ) from None
            if not int(task.loss_counts(batch).sum()):
                raise InvalidRequestError(
                    f"Row {edit.row_id!r}: the {what} has no loss tokens once collated (e.g. truncated away)."
                )


class UnlearningCallback(CallbackGroup):
    """At `on_train_end`, apply `request` to the trained adapter in place and (main process) write the
    unlearned adapter, its manifest and model card to `output_dir` (atomically; `overwrite` to replace).

    `train_dataset` and `task` default to the train loader's dataset and a task built from its collator. The
    request (ids, fields, and that its rows encode and collate with loss tokens) is checked in
    `on_train_begin`, before the first step. A text replacement (`prompt` and/or `response`) of a tokenised row
    is encoded as the trainer encoded the row: TRL's prompt–completion encoding under an `SFTConfig`, else
    `text_encoder` (see `trainer.text_encoder_for`: hf_unlearn's encoding by default, a `TextEncoding` for the
    chat template, or your function `(prompt, response) -> (prompt_ids, response_ids)`).
    After training, `callback.result` is the `UnlearningResult` and `callback.manifest` the audit record;
    the statistics are also appended to `trainer.state.log_history`.

    With `unlearning_args.l2_regularization = μ`, training adds (μ/2)‖θ‖² to the objective (as
    `L2RegularizationCallback` does) and the update steps on the same objective.

    With `unlearning_args.capture_curvature`, K-FAC factors are collected during the last epoch (as
    `CurvatureCaptureCallback` does) and used by the unlearning (`curvature="kfac"|"ekfac"` or a K-FAC
    preconditioner); they are in `callback.curvature_factors` and are not written beside the *unlearned*
    adapter, which they do not describe.

    Those two run inside this callback (`CallbackGroup`: every Trainer event is passed on to them), so that they
    are done — factors summed, the Trainer's clipping norm given back — before the unlearning at `on_train_end`.
    """

    def __init__(
        self,
        request: UnlearningRequest,
        unlearning_args: UnlearningArguments | None = None,
        output_dir: str | None = None,
        *,
        train_dataset: Sequence[Mapping] | None = None,
        task: UnlearningTask | None = None,
        overwrite: bool = False,
        text_encoder=None,
    ):
        self.request = request
        self.wiring = UnlearningWiring(unlearning_args)
        # the objective's L2 term, trained as UnlearnTrainer trains it (μθ joins every gradient), and the capture
        self.members = self.wiring.callbacks
        self.output_dir = output_dir
        self.train_dataset = train_dataset
        self.task = task
        self.overwrite = overwrite
        self.text_encoder = text_encoder
        self.result: UnlearningResult | None = None
        self.manifest: dict | None = None

    @property
    def unlearning_args(self) -> UnlearningArguments:
        return self.wiring.unlearning_args

    @unlearning_args.setter
    def unlearning_args(self, value: UnlearningArguments) -> None:
        self.wiring.unlearning_args = value

    @property
    def l2(self):
        """The objective's L2 term (`L2RegularizationCallback`; μ = 0: does nothing)."""
        return self.wiring.l2

    @property
    def capture(self):
        """The `CurvatureCaptureCallback` of `capture_curvature`, else None."""
        return self.wiring.capture

    @property
    def curvature_factors(self):
        return self.wiring.curvature_factors

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Fail before hours of training, not after.
        self.wiring.check(model)
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
        if getattr(args, "packing", False):
            raise ConfigurationError(
                "UnlearningCallback cannot be used with packing=True: packed sequences mix training rows, so "
                "rows cannot be taken out one by one. Train with packing=False."
            )
        train, task = self._rows_and_task(
            args, extract_model(model), kwargs.get("processing_class"), kwargs.get("train_dataloader")
        )
        check_request(self.request, train, task)
        # the L2 term clips ∇R + μθ itself (takes over max_grad_norm); the capture sets up its hooks
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def _rows_and_task(
        self, args, model, processing_class, train_dataloader
    ) -> tuple[TrainingSet, UnlearningTask]:
        """The training rows (ids by `row_ids`) and the loss contract of the Trainer's loader.

        `train_dataset` given as the Trainer got it, which then prepared its own rows from it (TRL's `SFTTrainer`
        tokenises prompt–completion rows into `input_ids`/`labels`): each row is the loader's row (what the
        collator sees) with the given row's other fields (its `"id"`, its text), paired by position, and the rows
        the request names are checked to line up (`check_pairing`)."""
        loader_rows = getattr(train_dataloader, "dataset", None)
        collator = getattr(train_dataloader, "collate_fn", None)
        rows = self.train_dataset if self.train_dataset is not None else loader_rows
        if rows is None or not hasattr(rows, "__getitem__") or not hasattr(rows, "__len__"):
            raise ConfigurationError(
                "UnlearningCallback needs the training rows addressable by index (a list or "
                "datasets.Dataset); pass train_dataset=... to the callback."
            )
        # rows given with more columns than the loader's: the collator sees the loader's only
        columns = _columns(loader_rows) if self.train_dataset is not None else None
        paired = columns is not None and not set(columns) <= set(_columns(rows) or ())
        if paired:
            if getattr(args, "shuffle_dataset", False) or len(rows) != len(loader_rows):
                raise ConfigurationError(
                    f"The Trainer prepared its own training rows from train_dataset= ({len(loader_rows)} rows with "
                    f"{sorted(columns)}; the dataset given has {len(rows)}"
                    + (
                        ", and SFTConfig(shuffle_dataset=True) reordered them"
                        if len(rows) == len(loader_rows)
                        else ""
                    )
                    + "), so its rows cannot be paired with them by position. Give the Trainer's own dataset, which "
                    "keeps the 'id' column: callback.train_dataset = trainer.train_dataset (before trainer.train())."
                )
            rows = PairedRows(rows, loader_rows)
        task = self.task or task_for_trainer(
            collator, processing_class, model, columns=columns, text_encoder=self.text_encoder, args=args
        )
        train = TrainingSet(rows, row_ids(rows.given) if paired else None)
        if paired and not isinstance(task, CollatorTask):  # a custom task sees the collator's fields
            return TrainingSet(loader_rows, train.ids), task
        if columns is not None and not isinstance(task, CollatorTask) and hasattr(rows, "select_columns"):
            train = TrainingSet(rows.select_columns(columns), train.ids)
        if paired:
            check_pairing(self.request, train, task)
        return train, task

    def on_train_end(
        self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs
    ):
        if model is None:
            raise ConfigurationError("UnlearningCallback got no model from the Trainer.")
        # the L2 term gives max_grad_norm back; the capture sums its factors over processes
        super().on_train_end(
            args, state, control, model=model, processing_class=processing_class,
            train_dataloader=train_dataloader, **kwargs,
        )  # fmt: skip
        model = extract_model(model)
        self.wiring.check(model)
        dataset, task = self._rows_and_task(args, model, processing_class, train_dataloader)
        processes = Processes()
        self.result, self.manifest = self.wiring.unlearn(
            model,
            dataset,
            self.request,
            task,
            state=state,
            source="Trainer train dataloader",
            show_progress=not args.disable_tqdm and processes.is_main,
        )
        state.log_history.append({**log_stats(self.result), "step": state.global_step})
        if self.output_dir is not None:
            if (
                processes.is_main
            ):  # with the tokenizer the Trainer trained with, as Trainer.save_model saves it
                save_unlearned_adapter(
                    model,
                    self.output_dir,
                    self.manifest,
                    overwrite=self.overwrite,
                    processing_class=trainer_tokenizer(processing_class, train_dataloader),
                )
            if processes.count > 1:
                import torch.distributed as dist

                dist.barrier()
        return control
