"""`CurvatureCaptureCallback`: K-FAC factors from the last training epoch, for fast unlearning later."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from .curvature.kfac import KFACFactors, adapted_output_layer
from .curvature.kfac_capture import TrainingCapture
from .distributed import Processes, barrier
from .errors import ConfigurationError

logger = logging.getLogger(__name__)


class CurvatureCaptureCallback(TrainerCallback):
    """Collect K-FAC factors of the trainable Linear layers during the last epoch of `trainer.train()`.

        trainer = Trainer(..., callbacks=[CurvatureCaptureCallback(output_dir="adapter")])
        trainer.train(); trainer.save_model("adapter")   # adapter + curvature_factors.safetensors/.json

    Hooks see the forward/backward passes training already does during its final `steps` optimizer steps
    (default: one epoch's worth, i.e. the last epoch, every row once when training runs whole epochs; fewer
    steps cost less when training is short, and see fewer rows) and accumulate
    `A = Σ a aᵀ`, `G = Σ g gᵀ` with the Trainer's loss scaling measured and divided out (see
    `hf_unlearn.curvature.kfac_capture`), so that the factors mean the same as those of a separate pass
    (`curvature_factors="pass"`, targets "empirical") — up to θ moving during the epoch and train-mode
    dropout. Under DDP each process captures its shard (a sampler that pads shards to equal size repeats a
    few rows; they are counted, in `num_rows` and the normaliser, as often as they were trained on). At
    `on_train_end` the factors are summed over processes into `callback.factors` and, when
    `output_dir` is given, written there by the main process. `callback.overhead` is the time spent in the
    hooks' own arithmetic, `callback.capture_seconds` the wall time of the captured steps.

    With `required=False` (how `hf-unlearn train`, `UnlearnTrainer` and `UnlearningCallback` capture by
    default) a model or a run the capture cannot describe is logged and skipped — `callback.skipped` says why
    and `factors` stays None — instead of failing the training.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        loss_normalization: str = "token",
        steps: int | None = None,
        required: bool = True,
    ):
        if steps is not None and steps < 1:
            raise ConfigurationError(f"steps must be ≥ 1 (or None for the last epoch), got {steps!r}.")
        self.output_dir = output_dir
        self.loss_normalization = loss_normalization
        self.steps = steps
        self.required = required
        self.skipped: str | None = None
        self.capture: TrainingCapture | None = None
        self.factors: KFACFactors | None = None
        self.first_step: int | None = None
        self.capture_seconds = 0.0
        self._started_at = None

    def _skip(self, error: ConfigurationError) -> None:
        if self.required:
            raise error
        if self.capture is not None and self.capture.running:
            self.capture.stop()
        self.capture, self.factors, self.skipped = None, None, str(error)
        logger.warning("K-FAC curvature is not captured during this training: %s", error)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.skipped = None
        try:
            self._begin(args, state, model, train_dataloader)
        except ConfigurationError as e:
            self._skip(e)

    def _begin(self, args, state, model, train_dataloader):
        from accelerate.utils import extract_model_from_parallel

        if getattr(args, "label_smoothing_factor", 0.0):
            raise ConfigurationError(
                "Curvature capture needs the plain cross-entropy loss; label_smoothing_factor="
                f"{args.label_smoothing_factor} changes it. Train without label smoothing, or compute the "
                "factors with one pass after training (curvature_factors='pass')."
            )
        try:
            batches_per_epoch = len(train_dataloader)
        except TypeError:
            raise ConfigurationError(
                "Curvature capture during the last epoch needs a train dataloader with a length (not an "
                "IterableDataset); compute the factors with one pass instead (curvature_factors='pass')."
            ) from None
        steps_per_epoch = -(-batches_per_epoch // args.gradient_accumulation_steps)
        self.first_step = max(0, state.max_steps - (self.steps or steps_per_epoch))
        if self.capture is not None and self.capture.running:  # a run that raised left its hooks on
            self.capture.stop()
        unwrapped = extract_model_from_parallel(model)
        self.capture = TrainingCapture(unwrapped, self.loss_normalization)
        if head := adapted_output_layer(unwrapped, self.capture.blocks):
            self.capture = None
            raise ConfigurationError(
                f"the output layer is adapted ({head}): the loss computes its logits at the loss positions only, "
                "while K-FAC models per-token layers. Leave lm_head out of the LoRA targets to capture."
            )
        self.factors, self._started_at = None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.capture is not None and not self.capture.running and state.global_step >= self.first_step:
            self.capture.start()
            self._started_at = (time.perf_counter(), state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.capture is None:
            return control
        if self._started_at is not None:
            self.capture_seconds = time.perf_counter() - self._started_at[0]
        processes = Processes()
        try:
            self.factors = self.capture.factors(
                processes,
                steps=[self._started_at[1] if self._started_at else None, state.global_step],
                epoch=state.epoch,
            )
        except ConfigurationError as e:
            self._skip(e)
            return control
        if self.output_dir is not None and processes.is_main:
            self.factors.save(self.output_dir)
        barrier(processes)
        return control

    @property
    def overhead(self) -> float:
        """Seconds spent in the capture's own hook arithmetic (the rest of the captured steps is training)."""
        return 0.0 if self.capture is None else self.capture.seconds + self.capture.collector.seconds
