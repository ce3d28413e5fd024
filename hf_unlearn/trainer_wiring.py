"""The Trainer glue `UnlearnTrainer` (trainer.py) and `UnlearningCallback` (callback.py) share.

`UnlearningWiring` holds what both build from their `UnlearningArguments`: the training-time callbacks (the
objective's L2 term, K-FAC capture during the last epoch), the check that the curvature can run on the model,
and one unlearning run on the live adapter with its manifest and logged statistics. `CallbackGroup` is a
`TrainerCallback` that passes every Trainer event on to member callbacks, in order: how `UnlearningCallback`
runs those training-time callbacks inside itself (before its own unlearning at the end of training, which needs
the captured factors and the Trainer's clipping norm back).
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from .capture import CurvatureCaptureCallback
from .config import UnlearningArguments
from .data import TrainingSet
from .distributed import check_curvature_supported
from .eraser import UnlearningResult, unlearn
from .io import build_manifest
from .objective import UnlearningTask
from .regularization import L2RegularizationCallback
from .request import UnlearningRequest

# The events a Trainer sends its callbacks (`TrainerCallback`'s `on_*` methods).
TRAINER_EVENTS = tuple(name for name in vars(TrainerCallback) if name.startswith("on_"))


class CallbackGroup(TrainerCallback):
    """A `TrainerCallback` that passes every Trainer event on to `self.members`, in order, with the arguments it
    got; it returns the last control a member returned (None when none did). A subclass that overrides an event
    calls `super()` at the point where the members should see it."""

    members: tuple[TrainerCallback, ...] = ()


def _passing_on(event: str):
    def method(self, args, state, control, **kwargs):
        returned = None
        for member in self.members:
            result = getattr(member, event)(args, state, control, **kwargs)
            returned = result if result is not None else returned
        return returned

    method.__name__, method.__qualname__ = event, f"CallbackGroup.{event}"
    method.__doc__ = f"Pass `{event}` on to the members, in order."
    return method


for _event in TRAINER_EVENTS:
    setattr(CallbackGroup, _event, _passing_on(_event))


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


class UnlearningWiring:
    """What `UnlearnTrainer` and `UnlearningCallback` build from `unlearning_args`.

    - `l2`: the objective's (μ/2)‖θ‖² term trained as `L2RegularizationCallback` trains it (μ =
      `unlearning_args.l2_regularization`; with μ = 0 it does nothing and is not among `callbacks`);
    - `capture`: with `unlearning_args.capture_curvature` (the training-time concern of the arguments,
      `config.TrainingCaptureArguments`), a `CurvatureCaptureCallback` (`required=False`: a model or run it
      cannot describe is logged and trained without it) whose factors are `curvature_factors`;
    - `callbacks`: those of the two that act during training, in that order (the L2 term first);
    - `check(model)`: fail early where the curvature cannot run;
    - `unlearn(...)`: one request on the live adapter, with its manifest.

    `unlearning_args` may be replaced after construction; the training-time callbacks keep the arguments they
    were built with.
    """

    def __init__(self, unlearning_args: UnlearningArguments | None = None):
        self.unlearning_args = unlearning_args or UnlearningArguments()
        self.l2 = L2RegularizationCallback(self.unlearning_args.l2)
        self.capture = (
            CurvatureCaptureCallback(
                loss_normalization=self.unlearning_args.loss_normalization, required=False
            )
            if self.unlearning_args.capture_curvature
            else None
        )

    @property
    def callbacks(self) -> tuple[TrainerCallback, ...]:
        return tuple(c for c in (self.l2 if self.l2.mu else None, self.capture) if c is not None)

    @property
    def curvature_factors(self):
        """K-FAC factors captured during the last epoch of training (`capture_curvature`), else None."""
        return None if self.capture is None else self.capture.factors

    def check(self, model, accelerator=None) -> None:
        """Refuse a curvature that cannot run on `model` as trained (`distributed.check_curvature_supported`)."""
        check_curvature_supported(self.unlearning_args.curvature, model, accelerator)

    def unlearn(
        self,
        model,
        train: TrainingSet,
        request: UnlearningRequest,
        task: UnlearningTask,
        *,
        state,
        source: str,
        show_progress: bool,
        previous: UnlearningResult | None = None,
    ) -> tuple[UnlearningResult, dict]:
        """Apply `request` to the unwrapped `model` in place: `(result, manifest)`.

        The curvature is the one `previous` (the last request of this trainer) left — the edited set's factors
        and sketch — else what training captured. Progress bars show when `unlearning_args.progress` and
        `show_progress` (the Trainer's tqdm on, main process). The manifest records the base model, the number
        of rows and their `source`, and the Trainer's `state` (step and epoch)."""
        args = self.unlearning_args
        result = unlearn(
            model, train, request, dataclasses.replace(args, progress=args.progress and show_progress),
            task=task,
            curvature_factors=self.curvature_factors if previous is None else previous.curvature_factors,
            nystrom_sketch=previous and previous.nystrom_sketch,
        )  # fmt: skip
        manifest = build_manifest(
            result,
            args,
            base_model=getattr(getattr(model, "config", None), "_name_or_path", None),
            training_data={"num_rows": len(train), "source": source},
            trainer={"global_step": state.global_step, "epoch": state.epoch},
        )
        return result, manifest


__all__ = ["CallbackGroup", "UnlearningWiring", "log_stats"]
