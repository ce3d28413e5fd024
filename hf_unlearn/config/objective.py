"""`ObjectiveArguments`: the objective the adapter was trained on (loss normalisation, L2 term) and how its kept
rows are estimated while unlearning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from .checks import Concern, at_least, choice

LOSS_NORMALIZATIONS = ("token", "example")
OBJECTIVE_ESTIMATES = ("auto", "full", "sample", "quadratic")


@dataclass
class ObjectiveArguments(Concern):
    """The training objective (its loss normalisation and (μ/2)‖θ‖² term) and the estimate of its kept rows."""

    HELP_GROUP = "objective — the training loss and the estimate of its kept rows"

    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "How the training loss was normalised: 'token' (sum over all loss tokens / their number, "
            "the HF Trainer default) or 'example' (mean over examples of each example's token mean).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    l2_regularization: float | None = field(
        default=None,
        metadata={
            "help": "μ of the (μ/2)‖θ‖² term the adapter was trained with (hf-unlearn train "
            "--l2-regularization, L2RegularizationCallback). It is part of the objective: μI joins the "
            "curvature and μθ the refinement gradients. Default: hf-unlearn unlearn reads it from the "
            "adapter's training record; otherwise 0."
        },
    )
    objective_estimate: str = field(
        default="auto",
        metadata={
            "help": "How the edited objective's kept rows enter the curvature and the refinement steps: 'auto' "
            "(quadratic whenever it applies — curvature hessian/ggn/fisher on the edited rows, solver cg or direct, "
            "no preconditioner, every trainable parameter in a per-token nn.Linear, more than the single fixed "
            "step asked for — else full; the manifest records the choice and why), 'full' "
            "(every kept training row, exact; each refinement step passes over the whole training set) or "
            "'sample' (the kept rows of the --hessian-samples sample, rescaled to all of them, as a control "
            "variate around θ* — exact at θ* — while the request's new versions enter exactly: nothing passes "
            "over the training set, so a request costs the same at any training-set size) or 'quadratic' (the "
            "kept rows as the fixed quadratic of the training run's K-FAC curvature — captured during training "
            "or --curvature-factors — with the request's old rows taken out, while the request's new versions "
            "enter exactly: each step passes over the request's rows only).",
            "choices": list(OBJECTIVE_ESTIMATES),
        },
    )
    interacting_rows: int = field(
        default=0,
        metadata={
            "help": "objective_estimate 'sample': also take, with certainty, the this many training rows the "
            "request interacts with most — the largest |⟨∇ℓ_i(θ*), b⟩| by a count sketch of every row's gradient "
            "(computed once per adapter, one pass) — so that the memorised rows sharing the request's directions "
            "hold the update back as they would in retraining."
        },
    )

    def validate(self) -> None:
        choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        if self.l2_regularization is not None and not (
            math.isfinite(self.l2_regularization) and self.l2_regularization >= 0
        ):
            raise ConfigurationError(
                f"l2_regularization must be a finite number ≥ 0, got {self.l2_regularization!r}."
            )
        choice("objective_estimate", self.objective_estimate, OBJECTIVE_ESTIMATES)
        at_least("interacting_rows", self.interacting_rows, 0)
        if self.interacting_rows and self.objective_estimate != "sample":
            raise ConfigurationError(
                "interacting_rows adds rows to the sample of objective_estimate 'sample'."
            )

    @property
    def l2(self) -> float:
        """μ of the objective's (μ/2)‖θ‖² term (0 when unset)."""
        return float(self.l2_regularization or 0.0)
