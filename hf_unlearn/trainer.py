"""`UnlearnTrainer`: a `transformers.Trainer` that can take training rows back out of its adapter.

    trainer = UnlearnTrainer(model=peft_model, args=training_args, train_dataset=ds,
                             unlearning_args=UnlearningArguments(damping=0.1))
    trainer.train()
    trainer.unlearn(UnlearningRequest(remove=[17]))   # ids are row indices of `train_dataset`
    trainer.save_model(out_dir)                       # adapter + unlearning_manifest.json + model card

The unlearning reads the rows in the order of the raw `train_dataset` (the Trainer's loader shuffles them,
which does not matter: request ids are row indices), with the same columns and the same data collator the
Trainer trains with, so the loss it differentiates is the loss that was trained. It runs on the unwrapped
model, sharded across the Trainer's processes with explicit sums (DESIGN §4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import DataCollatorWithPadding, Trainer, default_data_collator

from .config import UnlearningArguments
from .data import TEXT_FIELDS, ExampleEncoder
from .distributed import Processes, check_curvature_supported
from .eraser import UnlearningResult, pad_token_id, unlearn
from .errors import ConfigurationError, DataError
from .io import build_manifest, write_manifest_and_card
from .objective import CausalLMTask, UnlearningTask
from .request import UnlearningRequest

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


class CollatorTask(CausalLMTask):
    """The causal-LM loss contract on batches made by a Trainer's own data collator.

    Rows may be in any form the collator understands: `input_ids`+`labels`, text the collator tokenises,
    or `input_ids` alone with a collator that makes the labels (language modelling, TRL's completion mask).
    The collator must return `input_ids` and `labels` (`-100` where there is no loss).
    """

    def __init__(self, collator: Callable, encoder: ExampleEncoder | None = None, pad_token_id: int = 0):
        super().__init__(encoder, pad_token_id)
        self.collator = collator

    def collate(self, rows):
        batch = self.collator([{k: v for k, v in row.items() if k != "id"} for row in rows])
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
        if "labels" in row or all(k in row for k in TEXT_FIELDS):
            return super().split(row)
        if "input_ids" not in row:
            raise DataError(f"Row {row.get('id', '?')!r} has no input_ids and no prompt/response.")
        ids = list(row["input_ids"])
        mask = row.get("completion_mask")
        if mask is None:  # language modelling: every token is "response"
            return (), ids
        first = next((i for i, m in enumerate(mask) if m), len(ids))
        return ids[:first], ids[first:]

    def merge(self, old, new_fields):
        if "labels" in old or all(k in old for k in TEXT_FIELDS):
            return super().merge(old, new_fields)
        return UnlearningTask.merge(self, old, new_fields)


def _unwrap_collator(collator):
    return getattr(collator, "data_collator", collator)  # RemoveColumnsCollator keeps the original here


def task_for_trainer(
    collator: Callable | None, processing_class=None, model: torch.nn.Module | None = None
) -> UnlearningTask:
    """The loss contract matching what a Trainer with this collator trains on.

    A collator that is an `UnlearningTask.collate` gives that task; Trainer's defaults (which cannot pad
    labels) give a `CausalLMTask` with the processing class as tokenizer; any other collator is used as is.
    """
    pad = pad_token_id(processing_class, model)
    encoder = ExampleEncoder(processing_class if hasattr(processing_class, "eos_token_id") else None)
    inner = _unwrap_collator(collator)
    owner = getattr(inner, "__self__", None)
    if isinstance(owner, UnlearningTask) and getattr(inner, "__name__", "") == "collate":
        return owner
    if inner is None or inner is default_data_collator or type(inner) is DataCollatorWithPadding:
        return CausalLMTask(encoder, pad_token_id=pad)
    return CollatorTask(collator, encoder, pad_token_id=pad)


def training_rows(trainer: Trainer, dataset=None):
    """The rows the Trainer trains on, in dataset order, with the columns its collator sees."""
    dataset = trainer.train_dataset if dataset is None else dataset
    if dataset is None:
        raise ConfigurationError("The Trainer has no train_dataset to unlearn from.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigurationError(
            "Unlearning needs a train_dataset with rows addressable by index (a list or datasets.Dataset), "
            f"not {type(dataset).__name__}."
        )
    collator = trainer.data_collator
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        is_hf_dataset = False
    if trainer.args.remove_unused_columns:
        if is_hf_dataset:
            dataset = trainer._remove_unused_columns(dataset, description="unlearning")
        elif callable(collator):
            collator = trainer._get_collator_with_removed_columns(collator, description="unlearning")
    return dataset, collator


def log_stats(result: UnlearningResult) -> dict[str, float]:
    """The numeric statistics of a run, named `unlearning/...`, for `Trainer.log` / `report_to`."""
    logs = {}
    for key, value in {**result.stats, **result.timings}.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float):
            logs[f"unlearning/{key}"] = float(value)
    logs["unlearning/num_edits"] = float(len(result.request.edits))
    return logs


class UnlearnTrainer(Trainer):
    """A `transformers.Trainer` with `unlearn(request)`; `unlearning_args` configures the update.

    `unlearning_task` overrides how rows become per-example losses (default: the Trainer's own collator
    under the causal-LM loss contract, see `task_for_trainer`). With `unlearning_args.l2_regularization = μ`,
    training adds (μ/2)‖θ‖² to the objective (`L2RegularizationCallback`) and unlearning steps on the same one.
    """

    def __init__(
        self,
        *args,
        unlearning_args: UnlearningArguments | None = None,
        unlearning_task: UnlearningTask | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.unlearning_args = unlearning_args or UnlearningArguments()
        self.unlearning_task = unlearning_task
        self.unlearning_results: list[UnlearningResult] = []
        self.unlearning_manifests: list[dict] = []
        if self.unlearning_args.l2:  # train the objective the update models: R(θ) + (μ/2)‖θ‖²
            from .regularization import L2RegularizationCallback

            self.add_callback(L2RegularizationCallback(self.unlearning_args.l2))
        self.curvature_capture = None
        if self.unlearning_args.capture_curvature:
            from .capture import CurvatureCaptureCallback

            self.curvature_capture = CurvatureCaptureCallback(
                loss_normalization=self.unlearning_args.loss_normalization
            )
            self.add_callback(self.curvature_capture)

    @property
    def curvature_factors(self):
        """K-FAC factors captured during the last epoch of `train()` (`capture_curvature=True`), else None."""
        return None if self.curvature_capture is None else self.curvature_capture.factors

    def unlearn(
        self, request: UnlearningRequest, train_dataset: Sequence[Mapping] | None = None
    ) -> UnlearningResult:
        """Apply `request` (ids = row indices of the train dataset) to the live adapter, in place.

        With `preconditioner="nystrom"`, the sketch the last call left (downdated to its edited training set)
        is used for this one; the first call sketches the curvature. A request that follows another needs the
        edited rows as `train_dataset` (refused without)."""
        check_curvature_supported(self.unlearning_args.curvature, self.model, self.accelerator)
        if self.unlearning_results and train_dataset is None:
            raise ConfigurationError(
                "This trainer already served an unlearning request, so its train_dataset is no longer the data "
                "the adapter fits: pass train_dataset= the rows as edited by the earlier request(s) (removed "
                "rows dropped, replaced rows in their new version); the new request's ids index those rows."
            )
        dataset, collator = training_rows(self, train_dataset)
        model = self.accelerator.unwrap_model(self.model)
        task = self.unlearning_task or task_for_trainer(collator, self.processing_class, model)
        args = dataclasses.replace(
            self.unlearning_args,
            progress=self.unlearning_args.progress
            and not self.args.disable_tqdm
            and self.is_world_process_zero(),
        )
        previous = self.unlearning_results[-1].nystrom_sketch if self.unlearning_results else None
        result = unlearn(
            model, dataset, request, args, task=task,
            curvature_factors=self.curvature_factors, nystrom_sketch=previous,
        )  # fmt: skip
        self.unlearning_results.append(result)
        self.unlearning_manifests.append(
            build_manifest(result, self.unlearning_args, **self._manifest_context(len(dataset)))
        )
        self.log(log_stats(result))
        return result

    def _manifest_context(self, num_rows: int) -> dict:
        base = getattr(
            getattr(self.accelerator.unwrap_model(self.model), "config", None), "_name_or_path", None
        )
        return {
            "base_model": base,
            "training_data": {"num_rows": num_rows, "source": "Trainer.train_dataset"},
            "trainer": {"global_step": self.state.global_step, "epoch": self.state.epoch},
        }

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
