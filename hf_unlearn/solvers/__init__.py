"""Solvers for (C + λI) x = rhs, by name. Each returns `(x, SolverStats)`."""

from .base import SolverStats
from .cg import conjugate_gradient
from .direct import dense_matrix, direct_solve
from .lissa import LissaOptions, lissa_solve
from .qp import QPOptions, qp_solve
from .woodbury import woodbury_solve

SOLVERS = {
    "cg": conjugate_gradient,
    "direct": direct_solve,
    "woodbury": woodbury_solve,
    "lissa": lissa_solve,
    "qp": qp_solve,
}


def make_solve(args, preconditioner=None, progress: bool = False):
    """`solve(curvature, damping, rhs, tol) -> (x, SolverStats)` for `args.solver` (an `UnlearningArguments`),
    passing that solver exactly its own options: a solver that does not take an option fails loudly instead of
    ignoring it. `direct` is exact and takes no tolerance; `preconditioner` is conjugate gradient's."""
    name = args.solver
    if name == "direct":
        return lambda curvature, damping, rhs, tol: direct_solve(curvature, damping, rhs, progress=progress)
    if name == "woodbury":
        return lambda curvature, damping, rhs, tol: woodbury_solve(curvature, damping, rhs, tol=tol)
    options = {"max_iter": args.max_iter, "progress": progress}
    batches = {"seed": args.seed, "stochastic_batch_size": args.stochastic_batch_size}
    if name == "cg":
        options["preconditioner"] = preconditioner
    elif name == "lissa":
        options["options"] = LissaOptions(**batches, lissa_scale=args.lissa_scale)
    elif name == "qp":
        options["options"] = QPOptions(**batches, qp_optimizer=args.qp_optimizer, qp_lr=args.qp_lr)
    solver = SOLVERS[name]
    return lambda curvature, damping, rhs, tol: solver(curvature, damping, rhs, tol=tol, **options)


__all__ = [
    "SOLVERS",
    "LissaOptions",
    "QPOptions",
    "SolverStats",
    "conjugate_gradient",
    "dense_matrix",
    "direct_solve",
    "lissa_solve",
    "make_solve",
    "qp_solve",
    "woodbury_solve",
]
