"""`SolverArguments`: the linear solve `(C + λI) x = −b` — which solver, λ, and when it has converged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..solvers import SOLVERS as SOLVER_FUNCTIONS
from .checks import Concern, FloatOrAuto, at_least, choice, number_or_auto

SOLVERS = tuple(SOLVER_FUNCTIONS)  # one registry: hf_unlearn.solvers


@dataclass
class SolverArguments(Concern):
    """Which solver, the damping λ and the solver's stopping rule."""

    HELP_GROUP = "solver — the linear solve (C + λI) x = −b"

    solver: str = field(
        default="cg",
        metadata={
            "help": "Linear solver for (C + λI) x = −b: cg (conjugate gradient), direct (dense Cholesky, small "
            "models only), woodbury (exact, curvature fisher only), lissa (stochastic Neumann series), qp "
            "(LLMEraser's stochastic quadratic program, correct gradient). lissa and qp run --max-iter "
            "mini-batch steps and report their final relative residual.",
            "choices": list(SOLVERS),
        },
    )
    # A float or 'auto' (`FloatOrAuto`): the flag's text, or a number from Python, is stored as a float or 'auto'.
    damping: FloatOrAuto = field(
        default=1e-3,
        metadata={
            "help": "λ ≥ 0 added to the curvature of every step (makes a non-convex LoRA Hessian positive "
            "definite; keeps K-FAC's block inverse defined when μ = 0); the first λ the kept-rows check tries "
            "(--kept-loss-tolerance). Or 'auto': "
            "estimate the extreme eigenvalues of C by Lanczos and choose λ = max(0, −2·λ_min) + 0.01·λ_max "
            "(recorded in the stats/manifest)."
        },
    )
    tol: float = field(
        default=1e-5, metadata={"help": "Relative residual at which the iterative solver stops."}
    )
    max_iter: int = field(
        default=300,
        metadata={
            "help": "Maximum number of solver iterations (cg), the number of mini-batch steps (lissa, qp sgd/adam), "
            "or qp svrg's budget in mini-batch products (a full product counts as n/b)."
        },
    )
    allow_inexact: bool = field(
        default=False,
        metadata={
            "help": "Keep a finite result although the solver did not reach --tol (recorded as inexact in the "
            "manifest and model card). Without it, an unconverged solve writes nothing."
        },
    )

    def validate(self) -> None:
        choice("solver", self.solver, SOLVERS)
        self.damping = number_or_auto("damping", self.damping, minimum_inclusive=True)
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise ConfigurationError(f"tol must be a positive number, got {self.tol!r}.")
        at_least("max_iter", self.max_iter, 1)
