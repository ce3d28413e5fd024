"""The arguments of an unlearning run, by concern.

`UnlearningArguments` (arguments.py) is one flat dataclass — one field per `hf-unlearn unlearn` flag — composed by
inheritance of the concerns below, each a dataclass that validates its own fields (and can be built alone):

- `SolverArguments` (solver.py): solver, damping, tol, max_iter, allow_inexact;
- `CurvatureArguments` (curvature.py): curvature, curvature_data, hessian_samples, preconditioner,
  curvature_factors, curvature_samples, nystrom_rank, kfac_targets;
- `ObjectiveArguments` (objective.py): loss_normalization, l2_regularization, objective_estimate,
  interacting_rows;
- `StochasticSolverArguments` (stochastic.py): stochastic_batch_size, qp_optimizer, qp_lr, lissa_scale;
- `RefinementArguments` (refinement.py): refine_steps, refine_damping, refine_tol, kept_loss_tolerance;
- `ComputationArguments` (computation.py): batch_size, dtype, seed, progress;
- `TrainingCaptureArguments` (capture.py): capture_curvature, read by `UnlearnTrainer`/`UnlearningCallback`
  during training and offered by no unlearning command.

Each concern module holds the registries of its choices; where a choice list names implementations (solvers,
curvature operators, K-FAC targets, refinement damping, qp optimizers) it is taken from them.
"""

from .arguments import CONCERNS, SINGLE_UPDATE, UnlearningArguments
from .capture import TRAINING_TIME_ARGUMENTS, TrainingCaptureArguments
from .checks import Concern, FloatOrAuto
from .computation import DTYPES, ComputationArguments
from .curvature import (
    CURVATURE_DATA,
    CURVATURES,
    KFAC_CURVATURES,
    KFAC_TARGETS,
    PRECONDITIONERS,
    CurvatureArguments,
)
from .objective import LOSS_NORMALIZATIONS, OBJECTIVE_ESTIMATES, ObjectiveArguments
from .refinement import REFINE_DAMPINGS, RefinementArguments
from .solver import SOLVERS, SolverArguments
from .stochastic import QP_OPTIMIZERS, StochasticSolverArguments

__all__ = [
    "CONCERNS",
    "CURVATURES",
    "CURVATURE_DATA",
    "ComputationArguments",
    "Concern",
    "CurvatureArguments",
    "DTYPES",
    "FloatOrAuto",
    "KFAC_CURVATURES",
    "KFAC_TARGETS",
    "LOSS_NORMALIZATIONS",
    "OBJECTIVE_ESTIMATES",
    "ObjectiveArguments",
    "PRECONDITIONERS",
    "QP_OPTIMIZERS",
    "REFINE_DAMPINGS",
    "RefinementArguments",
    "SINGLE_UPDATE",
    "SOLVERS",
    "SolverArguments",
    "StochasticSolverArguments",
    "TRAINING_TIME_ARGUMENTS",
    "TrainingCaptureArguments",
    "UnlearningArguments",
]
