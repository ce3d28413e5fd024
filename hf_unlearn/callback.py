"""`UnlearningCallback`: unlearn at the end of training in any existing Trainer (TRL's `SFTTrainer` too).

    trainer = Trainer(..., callbacks=[UnlearningCallback(request, UnlearningArguments(), output_dir="unlearned")])
    trainer.train()   # trains, then applies `request` to the live adapter and writes it to output_dir

Request ids are row indices of the Trainer's train dataset. The rows and the collator are the ones the
Trainer's train loader uses (after it dropped unused columns; its shuffling does not change row indices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from transformers import TrainerCallback

from .capture import CurvatureCaptureCallback
from .config import UnlearningArguments
from .distributed import Processes, check_curvature_supported
from .eraser import UnlearningResult, unlearn
from .errors import ConfigurationError
from .io import build_manifest, check_output_dir, save_unlearned_adapter
from .objective import UnlearningTask
from .regularization import L2RegularizationCallback
from .request import UnlearningRequest
from .trainer import log_stats, task_for_trainer


class UnlearningCallback(TrainerCallback):
    """At `on_train_end`, apply `request` to the trained adapter in place and (main process) write the
    unlearned adapter, its manifest and model card to `output_dir` (atomically; `overwrite` to replace).

    `train_dataset` and `task` default to the train loader's dataset and a task built from its collator.
    After training, `callback.result` is the `UnlearningResult` and `callback.manifest` the audit record;
    the statistics are also appended to `trainer.state.log_history`.

    With `unlearning_args.l2_regularization = μ`, training adds (μ/2)‖θ‖² to the objective (as
    `L2RegularizationCallback` does) and the update steps on the same objective.

    With `unlearning_args.capture_curvature`, K-FAC factors are collected during the last epoch (as
    `CurvatureCaptureCallback` does) and used by the unlearning (`curvature="kfac"|"ekfac"` or a K-FAC
    preconditioner); they are in `callback.curvature_factors` and are not written beside the *unlearned*
    adapter, which they do not describe.
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
    ):
        self.request = request
        self.unlearning_args = unlearning_args or UnlearningArguments()
        self.output_dir = output_dir
        self.train_dataset = train_dataset
        self.task = task
        self.overwrite = overwrite
        self.result: UnlearningResult | None = None
        self.manifest: dict | None = None
        self.capture = (
            CurvatureCaptureCallback(loss_normalization=self.unlearning_args.loss_normalization)
            if self.unlearning_args.capture_curvature
            else None
        )

        # the objective's L2 term, trained as UnlearnTrainer trains it: μθ joins every gradient
        self.l2 = L2RegularizationCallback(self.unlearning_args.l2)

    @property
    def curvature_factors(self):
        return None if self.capture is None else self.capture.factors

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.l2.on_pre_optimizer_step(args, state, control, **kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.capture is not None:
            self.capture.on_step_begin(args, state, control, **kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Fail before hours of training, not after.
        check_curvature_supported(self.unlearning_args.curvature, model)
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
        if getattr(args, "packing", False):
            raise ConfigurationError(
                "UnlearningCallback cannot be used with packing=True: packed sequences mix training rows, so "
                "rows cannot be taken out one by one. Train with packing=False."
            )
        self.l2.on_train_begin(args, state, control)  # clips ∇R + μθ itself: takes over max_grad_norm
        if self.capture is not None:
            self.capture.on_train_begin(args, state, control, model=model, **kwargs)

    def on_train_end(
        self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs
    ):
        from accelerate.utils import extract_model_from_parallel

        if model is None:
            raise ConfigurationError("UnlearningCallback got no model from the Trainer.")
        self.l2.on_train_end(args, state, control)  # gives max_grad_norm back
        if self.capture is not None:
            self.capture.on_train_end(args, state, control)
        model = extract_model_from_parallel(model)
        check_curvature_supported(self.unlearning_args.curvature, model)
        dataset, collator = self.train_dataset, None
        if train_dataloader is not None:
            collator = getattr(train_dataloader, "collate_fn", None)
            if dataset is None:
                dataset = train_dataloader.dataset
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigurationError(
                "UnlearningCallback needs the training rows addressable by index (a list or "
                "datasets.Dataset); pass train_dataset=... to the callback."
            )
        task = self.task or task_for_trainer(collator, processing_class, model)
        processes = Processes()
        unlearning_args = dataclasses.replace(
            self.unlearning_args,
            progress=self.unlearning_args.progress and not args.disable_tqdm and processes.is_main,
        )
        self.result = unlearn(
            model, dataset, self.request, unlearning_args, task=task, curvature_factors=self.curvature_factors
        )
        base = getattr(getattr(model, "config", None), "_name_or_path", None)
        self.manifest = build_manifest(
            self.result,
            self.unlearning_args,
            base_model=base,
            training_data={"num_rows": len(dataset), "source": "Trainer train dataloader"},
            trainer={"global_step": state.global_step, "epoch": state.epoch},
        )
        state.log_history.append({**log_stats(self.result), "step": state.global_step})
        if self.output_dir is not None:
            if processes.is_main:
                save_unlearned_adapter(model, self.output_dir, self.manifest, overwrite=self.overwrite)
            if processes.count > 1:
                import torch.distributed as dist

                dist.barrier()
        return control
