"""`UnlearnTrainer`: a `transformers.Trainer` that can take training rows back out of its adapter.

    trainer = UnlearnTrainer(model=peft_model, args=training_args, train_dataset=ds,
                             unlearning_args=UnlearningArguments(damping=0.1))
    trainer.train()
    trainer.unlearn(UnlearningRequest(remove=[17]))   # ids: the rows' "id" column, else their index
    trainer.save_model(out_dir)                       # adapter + unlearning_manifest.json + model card

The unlearning reads the rows in the order of the raw `train_dataset` (the Trainer's loader shuffles them,
which does not matter: request ids name rows by their "id" column, else their index), with the fields and the
data collator the Trainer trains with, so the loss it differentiates is the loss that was trained. It runs on the unwrapped
model, sharded across the Trainer's processes with explicit sums (docs/method.md §4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import DataCollatorWithPadding, Trainer, default_data_collator

from .config import UnlearningArguments
from .data import IGNORE_INDEX, TEXT_FIELDS, TOKEN_FIELDS, ExampleEncoder, TextEncoding, TrainingSet
from .distributed import Processes
from .eraser import UnlearningResult
from .errors import ConfigurationError, DataError, InvalidRequestError
from .io import write_manifest_and_card
from .objective import CausalLMTask, UnlearningTask, pad_token_id
from .request import UnlearningRequest
from .trainer_wiring import UnlearningWiring, log_stats

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
TEXT_ALIASES = {"completion": "response"}  # TRL's prompt–completion rows
# token-aligned columns a text replacement fills: 0 on the prompt and 1 on the response, or all ones
PROMPT_MASKS = ("completion_mask", "assistant_masks")


class SFTTextEncoder:
    """How TRL's `SFTTrainer` encodes a prompt–completion row (non-conversational or conversational):

    the completion gets the tokenizer's EOS appended (text only, unless it ends with it); the prompt alone and
    prompt + completion are tokenised (`tokenizer(text=...)`, or the chat template with the generation prompt
    for the prompt of a conversation), and the completion starts where the two diverge; then the sequence is
    truncated to `max_length` (`truncation_mode` "keep_start" or "keep_end").
    """

    separable = False  # prompt and completion are tokenised together

    def __init__(self, tokenizer, max_length: int | None = None, truncation_mode: str = "keep_start"):
        self.tokenizer, self.max_length, self.truncation_mode = tokenizer, max_length, truncation_mode

    @classmethod
    def from_args(cls, tokenizer, args):
        return cls(
            tokenizer, getattr(args, "max_length", None), getattr(args, "truncation_mode", "keep_start")
        )

    def __repr__(self) -> str:
        return f"SFTTextEncoder(max_length={self.max_length}, truncation_mode={self.truncation_mode!r})"

    def _ids(self, content, **kwargs) -> list[int]:
        tok = self.tokenizer
        if isinstance(content, list):  # a conversation
            return list(
                tok.apply_chat_template(content, tokenize=True, return_dict=True, **kwargs)["input_ids"]
            )
        return list(tok(text=content)["input_ids"])

    def encode_text(self, prompt, response) -> tuple[list[int], list[int]]:
        if isinstance(prompt, list) != isinstance(response, list):
            raise InvalidRequestError("Give prompt and response both as text or both as lists of messages.")
        if isinstance(prompt, list):
            prompt_ids = self._ids(prompt, add_generation_prompt=True)
            full = self._ids(prompt + response)
        else:
            eos = self.tokenizer.eos_token
            if eos is not None and not response.endswith(eos):
                response = response + eos
            prompt_ids, full = self._ids(prompt), self._ids(prompt + response)
        cut = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(len(prompt_ids), len(full))
        )
        if self.max_length is not None:
            keep = (
                slice(None, self.max_length)
                if self.truncation_mode == "keep_start"
                else slice(-self.max_length, None)
            )
            mask = ([0] * cut + [1] * (len(full) - cut))[keep]
            full = full[keep]
            cut = mask.index(1) if 1 in mask else len(mask)
        return full[:cut], full[cut:]


class _CallableTextEncoder:
    separable = False

    def __init__(self, function):
        self.function = function

    def __repr__(self) -> str:
        return f"text_encoder={getattr(self.function, '__name__', repr(self.function))}"

    def encode_text(self, prompt, response):
        prompt_ids, response_ids = self.function(prompt, response)
        return list(prompt_ids), list(response_ids)


def text_encoder_for(text_encoder, processing_class, args=None):
    """The text encoder of a Trainer's rows: `text_encoder` as given (an object with `encode_text(prompt,
    response) -> (prompt_ids, response_ids)`, a function of that signature, or a `TextEncoding` for
    hf_unlearn's own encoding), else TRL's prompt–completion encoding under an `SFTConfig`, else hf_unlearn's
    (prompt with the tokenizer's special tokens, response + EOS)."""
    tokenizer = processing_class if hasattr(processing_class, "eos_token_id") else None
    if text_encoder is None:
        if any(c.__name__ == "SFTConfig" for c in type(args).__mro__) and tokenizer is not None:
            return SFTTextEncoder.from_args(tokenizer, args)
        return ExampleEncoder(tokenizer)
    if isinstance(text_encoder, TextEncoding):
        return ExampleEncoder(tokenizer, text_encoder)
    if hasattr(text_encoder, "encode_text"):
        return text_encoder
    if callable(text_encoder):
        return _CallableTextEncoder(text_encoder)
    raise ConfigurationError(
        f"text_encoder must be a TextEncoding, a function (prompt, response) -> (prompt_ids, response_ids) or an "
        f"object with encode_text; got {type(text_encoder).__name__}."
    )


def _prompt_length(row: Mapping) -> int | None:
    """Where a tokenised row's response starts (from its labels or completion mask), None when every token
    carries loss (no boundary)."""
    if "labels" in row:
        labels, ids = list(row["labels"]), list(row["input_ids"])
        if labels == ids:
            return None
        return next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    for key in PROMPT_MASKS:
        if key in row:
            mask = list(row[key])
            return next((i for i, m in enumerate(mask) if m), len(mask))
    return None


def _row_text(row: Mapping):
    """(prompt, response) of a row that carries its text beside its tokens, else None."""
    response = row.get("response", row.get("completion"))
    if row.get("prompt") is None or response is None:
        return None
    return row["prompt"], response


def text_replacement(row_id, old: Mapping, new_fields: Mapping, encoder, tokenizer=None) -> dict:
    """The new version of the tokenised training row `old` for a text replacement (`prompt` and/or `response`),
    encoded by `encoder` and laid out as `old` is: the same token columns (`labels` masked on the prompt or
    not, `completion_mask`, `attention_mask`), other columns kept.

    A part not given keeps the row's: its text when the row carries it (then `encoder` must reproduce the
    row's tokens from it, which checks that it is the trainer's encoding), else its tokens, found by the labels'
    (or completion mask's) prompt/response boundary; for an encoder that tokenises prompt and response together
    (`separable` False, e.g. `SFTTextEncoder`) the kept part is decoded and re-encoded and must give back the
    same tokens.
    """
    fields = {TEXT_ALIASES.get(k, k): v for k, v in new_fields.items()}
    ids = list(old["input_ids"])
    cut = _prompt_length(old)
    old_text = _row_text(old)
    if old_text is not None:
        kept_ids = list(old["input_ids"])
        p_old, r_old = encoder.encode_text(*old_text)
        if p_old + r_old != kept_ids or (cut is not None and len(p_old) != cut):
            raise InvalidRequestError(
                f"Row {row_id!r}: its tokens are not what {encoder!r} makes of its text, so a text replacement "
                "would not be encoded the way the trainer encoded the row. Pass the trainer's encoding as "
                "text_encoder=... (a function (prompt, response) -> (prompt_ids, response_ids)), or give the "
                "replacement as tokens (input_ids + labels)."
            )
        prompt, response = fields.get("prompt", old_text[0]), fields.get("response", old_text[1])
        prompt_ids, response_ids = encoder.encode_text(prompt, response)
    elif all(k in fields for k in TEXT_FIELDS):
        prompt_ids, response_ids = encoder.encode_text(fields["prompt"], fields["response"])
    elif cut is None:
        raise InvalidRequestError(
            f"Row {row_id!r} is tokenised with a loss on every token (no prompt/response boundary) and its text is "
            "not in the dataset, so the part not given cannot be kept: give both prompt and response."
        )
    elif getattr(encoder, "separable", False):
        prompt_ids = encoder.prompt_ids(fields["prompt"]) if "prompt" in fields else ids[:cut]
        response_ids = encoder.response_ids(fields["response"]) if "response" in fields else ids[cut:]
    else:
        keep = "response" if "prompt" in fields else "prompt"
        kept = ids[cut:] if keep == "response" else ids[:cut]
        decoded = tokenizer.decode(kept, skip_special_tokens=True) if tokenizer is not None else None
        if decoded is not None:
            text = {"prompt": fields.get("prompt", decoded), "response": fields.get("response", decoded)}
            prompt_ids, response_ids = encoder.encode_text(text["prompt"], text["response"])
        if decoded is None or (prompt_ids if keep == "prompt" else response_ids) != kept:
            raise InvalidRequestError(
                f"Row {row_id!r}: its {keep} tokens do not survive decoding and re-encoding with {encoder!r}, so "
                f"the replacement cannot keep them exactly: give both prompt and response."
            )
    return _token_row_like(row_id, old, prompt_ids, response_ids)


def _token_row_like(row_id, old: Mapping, prompt_ids: list[int], response_ids: list[int]) -> dict:
    input_ids = prompt_ids + response_ids
    if not response_ids:
        raise InvalidRequestError(
            f"Row {row_id!r}: the replacement has no response tokens (after truncation)."
        )
    length = len(old["input_ids"])
    new = {}
    for key, value in old.items():
        if key in ("id", *TEXT_FIELDS, "completion"):
            continue
        if key == "input_ids":
            new[key] = input_ids
        elif key == "labels":
            full = list(value) == list(old["input_ids"])
            new[key] = list(input_ids) if full else [IGNORE_INDEX] * len(prompt_ids) + response_ids
        elif key == "attention_mask":
            new[key] = [1] * len(input_ids)
        elif key in PROMPT_MASKS:
            new[key] = [0] * len(prompt_ids) + [1] * len(response_ids)
        elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == length:
            raise InvalidRequestError(
                f"Row {row_id!r} has a per-token column {key!r} that a text replacement cannot fill; give the "
                "replacement as tokens (input_ids, labels and that column)."
            )
        else:
            new[key] = value  # a column the collator does not see (or not per token): kept
    return new


class CollatorTask(CausalLMTask):
    """The causal-LM loss contract on batches made by a Trainer's own data collator.

    Rows may be in any form the collator understands: `input_ids`+`labels`, text the collator tokenises,
    or `input_ids` alone with a collator that makes the labels (language modelling, TRL's completion mask).
    The collator must return `input_ids` and `labels` (`-100` where there is no loss). `columns`, when given,
    are the only row fields the collator sees (the Trainer's `remove_unused_columns`); the rows may carry more
    (their `id`, their text). A text replacement of a tokenised row is encoded by `text_encoder` (see
    `text_encoder_for`) into the row's own layout (`text_replacement`).
    """

    def __init__(
        self,
        collator: Callable,
        encoder: ExampleEncoder | None = None,
        pad_token_id: int = 0,
        *,
        columns: Sequence[str] | None = None,
        text_encoder=None,
    ):
        super().__init__(encoder, pad_token_id)
        self.collator = collator
        self.columns = None if columns is None else set(columns)
        self.text_encoder = text_encoder if text_encoder is not None else self.encoder

    def collate(self, rows):
        keep = (lambda k: k in self.columns) if self.columns is not None else (lambda k: k != "id")
        batch = self.collator([{k: v for k, v in row.items() if keep(k)} for row in rows])
        if "input_ids" not in batch or "labels" not in batch:
            raise ConfigurationError(
                f"The data collator returned {sorted(batch)}, without 'input_ids' and 'labels'; the "
                "unlearning needs the labels the Trainer trains on. Pass unlearning_task=CausalLMTask(...) "
                "(or your own UnlearningTask)."
            )
        batch = {k: torch.as_tensor(batch[k]) for k in BATCH_KEYS if k in batch}
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        return batch

    def split(self, row):
        if "input_ids" not in row:
            if all(k in row for k in TEXT_FIELDS):
                return super().split(row)
            raise DataError(f"Row {row.get('id', '?')!r} has no input_ids and no prompt/response.")
        if "labels" in row:
            return super().split({k: row[k] for k in (*TOKEN_FIELDS, "attention_mask") if k in row})
        ids = list(row["input_ids"])
        cut = _prompt_length(row)
        if cut is None:  # language modelling: every token is "response"
            return (), ids
        return ids[:cut], ids[cut:]

    def merge(self, old, new_fields):
        text = {TEXT_ALIASES.get(k, k) for k in new_fields} & set(TEXT_FIELDS)
        if "input_ids" in old and text:
            if unknown := sorted({TEXT_ALIASES.get(k, k) for k in new_fields} - set(TEXT_FIELDS)):
                raise InvalidRequestError(
                    f"A text replacement gives other field(s) {unknown}; give prompt and/or response only (or the "
                    "whole row as tokens)."
                )
            return text_replacement(
                old.get("id", "?"), old, new_fields, self.text_encoder, self.encoder.tokenizer
            )
        if "labels" in old or all(k in old for k in TEXT_FIELDS):
            return super().merge(old, new_fields)
        return UnlearningTask.merge(self, old, new_fields)


def _unwrap_collator(collator):
    return getattr(collator, "data_collator", collator)  # RemoveColumnsCollator keeps the original here


def task_for_trainer(
    collator: Callable | None,
    processing_class=None,
    model: torch.nn.Module | None = None,
    *,
    columns: Sequence[str] | None = None,
    text_encoder=None,
    args=None,
) -> UnlearningTask:
    """The loss contract matching what a Trainer with this collator trains on.

    A collator that is the `collate` of a custom `UnlearningTask` gives that task; otherwise a `CollatorTask`
    over the collator (Trainer's defaults, which cannot pad labels, are replaced by `CausalLMTask.collate`
    with the processing class as tokenizer). `columns` are the fields the collator sees; `text_encoder` and
    `args` (the Trainer's) choose how text replacements of tokenised rows are encoded (`text_encoder_for`).
    """
    pad = pad_token_id(processing_class, model)
    encoder = ExampleEncoder(processing_class if hasattr(processing_class, "eos_token_id") else None)
    inner = _unwrap_collator(collator)
    owner = getattr(inner, "__self__", None)
    if isinstance(owner, UnlearningTask) and getattr(inner, "__name__", "") == "collate":
        if type(owner) is not CausalLMTask:
            return owner
        collator = owner.collate
        if owner.encoder.tokenizer is not None:
            encoder = owner.encoder
    elif inner is None or inner is default_data_collator or type(inner) is DataCollatorWithPadding:
        collator = CausalLMTask(encoder, pad_token_id=pad).collate
    return CollatorTask(
        collator,
        encoder,
        pad,
        columns=columns,
        text_encoder=text_encoder_for(text_encoder, processing_class, args),
    )


def training_rows(trainer: Trainer, dataset=None):
    """`(rows, collator, columns)`: the rows the Trainer trains on, in dataset order and with all their fields
    (a `TrainingSet` whose ids follow `row_ids`), its collator, and the fields the collator sees (None when
    the collator removes the others itself)."""
    dataset = trainer.train_dataset if dataset is None else dataset
    if dataset is None:
        raise ConfigurationError("The Trainer has no train_dataset to unlearn from.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigurationError(
            "Unlearning needs a train_dataset with rows addressable by index (a list or datasets.Dataset), "
            f"not {type(dataset).__name__}."
        )
    collator, columns = trainer.data_collator, None
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        is_hf_dataset = False
    if trainer.args.remove_unused_columns:
        if is_hf_dataset:
            columns = trainer._remove_unused_columns(dataset, description="unlearning").column_names
        elif callable(collator):
            collator = trainer._get_collator_with_removed_columns(collator, description="unlearning")
    return TrainingSet(dataset), collator, columns


class UnlearnTrainer(Trainer):
    """A `transformers.Trainer` with `unlearn(request)`; `unlearning_args` configures the update.

    `unlearning_task` overrides how rows become per-example losses (default: the Trainer's own collator
    under the causal-LM loss contract, see `task_for_trainer`). Request ids follow `data.row_ids` (the rows'
    `"id"` column, else their index). A text replacement (`prompt` and/or `response`) of a tokenised row is
    encoded by `text_encoder` (default: the row's prompt with the tokenizer's special tokens, response + EOS;
    a `TextEncoding(chat_template=True)` for the chat template, or your own function
    `(prompt, response) -> (prompt_ids, response_ids)`) into the row's own layout. With `unlearning_args.l2_regularization = μ`,
    training adds (μ/2)‖θ‖² to the objective (`L2RegularizationCallback`) and unlearning steps on the same one.
    """

    def __init__(
        self,
        *args,
        unlearning_args: UnlearningArguments | None = None,
        unlearning_task: UnlearningTask | None = None,
        text_encoder=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.unlearning_wiring = UnlearningWiring(unlearning_args)
        self.unlearning_task = unlearning_task
        self.text_encoder = text_encoder
        self.unlearning_results: list[UnlearningResult] = []
        self.unlearning_manifests: list[dict] = []
        # train the objective the update models, R(θ) + (μ/2)‖θ‖², and capture its curvature
        for callback in self.unlearning_wiring.callbacks:
            self.add_callback(callback)

    @property
    def unlearning_args(self) -> UnlearningArguments:
        return self.unlearning_wiring.unlearning_args

    @unlearning_args.setter
    def unlearning_args(self, value: UnlearningArguments) -> None:
        self.unlearning_wiring.unlearning_args = value

    @property
    def curvature_capture(self):
        """The `CurvatureCaptureCallback` of `capture_curvature=True`, else None."""
        return self.unlearning_wiring.capture

    @property
    def curvature_factors(self):
        """K-FAC factors captured during the last epoch of `train()` (`capture_curvature=True`), else None."""
        return self.unlearning_wiring.curvature_factors

    def unlearn(
        self, request: UnlearningRequest, train_dataset: Sequence[Mapping] | None = None
    ) -> UnlearningResult:
        """Apply `request` (ids: the train dataset's "id" column, else row indices) to the live adapter, in place.

        With `preconditioner="nystrom"`, the sketch the last call left (downdated to its edited training set)
        is used for this one; the first call sketches the curvature. A request that follows another needs the
        edited rows as `train_dataset` (refused without)."""
        self.unlearning_wiring.check(self.model, self.accelerator)
        if self.unlearning_results and train_dataset is None:
            raise ConfigurationError(
                "This trainer already served an unlearning request, so its train_dataset is no longer the data "
                "the adapter fits: pass train_dataset= the rows as edited by the earlier request(s) (removed "
                "rows dropped, replaced rows in their new version); the new request's ids index those rows."
            )
        dataset, collator, columns = training_rows(self, train_dataset)
        model = self.accelerator.unwrap_model(self.model)
        task = self.unlearning_task or task_for_trainer(
            collator,
            self.processing_class,
            model,
            columns=columns,
            text_encoder=self.text_encoder,
            args=self.args,
        )
        if columns is not None and not isinstance(
            task, CollatorTask
        ):  # a custom task sees the collator's fields
            dataset = TrainingSet(dataset.rows.select_columns(columns), dataset.ids)
        result, manifest = self.unlearning_wiring.unlearn(
            model,
            dataset,
            request,
            task,
            state=self.state,
            source="Trainer.train_dataset",
            show_progress=not self.args.disable_tqdm and self.is_world_process_zero(),
            # what the last request left (the edited set's factors and sketch), else what training captured
            previous=self.unlearning_results[-1] if self.unlearning_results else None,
        )
        self.unlearning_results.append(result)
        self.unlearning_manifests.append(manifest)
        self.log(log_stats(result))
        return result

    @property
    def unlearning_manifest(self) -> dict | None:
        """The audit record of the last `unlearn` call (all calls are in `unlearning_manifests`)."""
        return self.unlearning_manifests[-1] if self.unlearning_manifests else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does; after `unlearn`, also the manifest and the model card section.

        K-FAC factors captured during training are written beside the adapter they describe (the trained
        one: not after `unlearn` changed it)."""
        super().save_model(output_dir, _internal_call)
        factors = self.curvature_factors
        if (
            factors is not None
            and not self.unlearning_results
            and self.args.should_save
            and Processes().is_main
        ):
            factors.save(output_dir or self.args.output_dir)
        if self.unlearning_manifests and self.args.should_save and Processes().is_main:
            manifest = dict(self.unlearning_manifest)
            if len(self.unlearning_manifests) > 1:
                # earlier runs of this trainer, oldest first, in the shape of the CLI manifests' `history`
                manifest["history"] = [
                    {"created": m.get("created"), "request": m["request"]}
                    for m in self.unlearning_manifests[:-1]
                ]
            write_manifest_and_card(output_dir or self.args.output_dir, manifest)


__all__ = ["CollatorTask", "UnlearnTrainer", "task_for_trainer"]
