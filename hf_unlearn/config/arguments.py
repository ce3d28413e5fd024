"""`UnlearningArguments`: every knob of an unlearning run, named like its command-line flag, composed of the
concerns of this package; it checks each concern, then what spans concerns."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError
from .capture import TrainingCaptureArguments
from .computation import ComputationArguments
from .curvature import KFAC_CURVATURES, CurvatureArguments
from .objective import ObjectiveArguments
from .refinement import RefinementArguments
from .solver import SolverArguments
from .stochastic import StochasticSolverArguments

# The concerns in the order of their fields (and flags): solver, curvature, objective, …
CONCERNS = (
    SolverArguments,
    CurvatureArguments,
    ObjectiveArguments,
    StochasticSolverArguments,
    RefinementArguments,
    ComputationArguments,
    TrainingCaptureArguments,
)

# The single LLMEraser update on the exact Hessian, as `UnlearningArguments()` computed it before the quadratic
# estimate with refinement and the kept-rows check became the defaults (docs/method.md §2): what the tests' dense
# references compute and what the benchmarks' methods start from. `UnlearningArguments(**SINGLE_UPDATE)`.
SINGLE_UPDATE = {
    "curvature": "hessian",
    "damping": 0.1,
    "tol": 1e-6,
    "max_iter": 200,
    "refine_steps": 0,
    "refine_damping": "fixed",
    "objective_estimate": "full",
    "refine_tol": 0.0,
    "kept_loss_tolerance": float("inf"),
}


# A dataclass takes its bases' fields last base first, so the concerns are listed in reverse of `CONCERNS`.
@dataclass
class UnlearningArguments(
    TrainingCaptureArguments,
    ComputationArguments,
    RefinementArguments,
    StochasticSolverArguments,
    ObjectiveArguments,
    CurvatureArguments,
    SolverArguments,
):
    """How to compute the LLMEraser update `Δθ = −(C + λI)⁻¹ b` (see docs/method.md §2–3).

    Field names mirror the `hf-unlearn unlearn` flags: `max_iter` is `--max-iter`, and so on. The fields come
    from the concerns in `CONCERNS` (`SolverArguments`, `CurvatureArguments`, …), each of which validates its own
    fields; `validate` runs them all, then the checks between concerns. `damping`, `qp_lr` and `lissa_scale`
    take a float or 'auto' (or a number's text) and hold a float or 'auto'.
    """

    HELP_GROUP = ""  # its flags are listed under their concerns' headings

    def validate(self) -> None:
        for concern in CONCERNS:
            concern.validate(self)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """What one concern's values require of another's."""
        if self.solver == "woodbury" and self.curvature != "fisher":
            raise ConfigurationError(
                "solver 'woodbury' is the exact solve of the empirical Fisher: use it with curvature 'fisher'."
            )
        if self.preconditioner != "none" and self.solver != "cg":
            raise ConfigurationError(
                f"preconditioner {self.preconditioner!r} preconditions conjugate gradient: use it with solver "
                f"'cg' (solver {self.solver!r} would ignore it)."
            )
        if self.objective_estimate in ("sample", "quadratic"):
            if self.curvature in KFAC_CURVATURES or not self.curvature_on_edited:
                raise ConfigurationError(
                    f"objective_estimate {self.objective_estimate!r} takes the request's rows' exact curvature: use "
                    "curvature hessian, ggn or fisher with curvature_data 'edited' or 'auto'."
                )
            if self.solver not in ("cg", "direct"):
                raise ConfigurationError(
                    f"objective_estimate {self.objective_estimate!r} solves with cg or direct; solver "
                    f"{self.solver!r} draws its own mini-batches of the curvature rows."
                )
            if self.objective_estimate == "quadratic" and self.preconditioner != "none":
                raise ConfigurationError(
                    "objective_estimate 'quadratic' preconditions with the kept rows' K-FAC block inverse "
                    f"itself: drop preconditioner {self.preconditioner!r}."
                )
        if self.solver == "qp" and self.qp_optimizer == "adam" and self.qp_lr == "auto":
            raise ConfigurationError(
                "qp with Adam takes steps in parameter units, so it needs an explicit qp_lr (--qp-lr), "
                "e.g. a few percent of the expected |Δθ| per coordinate; or use qp_optimizer 'svrg'."
            )

    def newton_tol(self, gradient_norm: float, b_norm: float) -> float:
        """The relative residual a refinement step's solve stops at (`refine_tol`'s forcing term)."""
        return max(self.tol, min(self.refine_tol, gradient_norm / b_norm if b_norm > 0 else 0.0))
