"""`RefinementArguments`: the damped Newton steps after the first one, and the kept-rows check on every step."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..refinement import KEEP_STEP
from .checks import Concern, at_least, choice

REFINE_DAMPINGS = tuple(KEEP_STEP)  # one registry: how refinement.py takes a step, by refine_damping


@dataclass
class RefinementArguments(Concern):
    """Refinement steps on the tilted edited objective (docs/method.md §2 'Beyond one step') and their guard."""

    HELP_GROUP = "refinement — Newton steps after the first, and the kept rows' loss"

    refine_steps: int = field(
        default=5,
        metadata={
            "help": "Extra damped Newton steps on the tilted edited objective after the first step "
            "(docs/method.md §2 'Beyond one step'); each costs a gradient pass and a solve — over the request's rows only "
            "with objective_estimate quadratic or sample, over the edited training set with full. "
            "--refine-steps 0 --refine-damping fixed is the single LLMEraser update."
        },
    )
    refine_damping: str = field(
        default="line_search",
        metadata={
            "help": "Damping of the refinement steps: 'fixed' (every step uses --damping, docs/method.md §2) or "
            "'adaptive' (Levenberg–Marquardt on the tilted edited objective R̃: the one-step update is the first "
            "trial, and a step is kept only if it lowers R̃; λ is then divided by 3, but never below --damping, "
            "and multiplied by 3 after a rejected step; --refine-steps + 1 trials, each also costing a loss pass "
            "over the edited training set) or 'line_search' (damped Newton: every step, the one-step update "
            "included, uses --damping and is shortened by halves until R̃ drops by the Armijo condition; "
            "--refine-steps + 1 steps, each trial length costing a loss pass over the edited training set).",
            "choices": list(REFINE_DAMPINGS),
        },
    )
    refine_tol: float = field(
        default=0.1,
        metadata={
            "help": "Inexact Newton: when refining, each step's solve (the first included) stops at the relative "
            "residual min(--refine-tol, ‖∇R̃(θ)‖/‖b‖), never below --tol — loose far from the minimiser, tighter "
            "as the gradient shrinks. CG's first iterations already give a descent direction the line search "
            "shortens if needed. 0 solves every step to --tol."
        },
    )
    kept_loss_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "Largest rise of the kept rows' loss (cross-entropy per token, on a seeded sample of 32 of the "
            "rows the request keeps) a step may cause: retraining leaves it close to where training left it. With "
            "--refine-damping line_search every step is shortened until it holds (a trust region); otherwise a "
            "result above it is solved again with λ ten times larger, up to 5 times (the manifest lists the "
            "attempts). Another 32 kept rows measure the result (the manifest's retain_check). inf turns it off."
        },
    )

    def validate(self) -> None:
        at_least("refine_steps", self.refine_steps, 0)
        choice("refine_damping", self.refine_damping, REFINE_DAMPINGS)
        if not (0 <= self.refine_tol < 1):
            raise ConfigurationError(f"refine_tol must be in [0, 1), got {self.refine_tol!r}.")
        if not self.kept_loss_tolerance >= 0:
            raise ConfigurationError(
                f"kept_loss_tolerance must be ≥ 0 (inf: no retries), got {self.kept_loss_tolerance!r}."
            )
