"""Solvers for (C + λI) x = rhs, by name. Each returns `(x, SolverStats)`."""

from .base import SolverStats
from .cg import conjugate_gradient
from .direct import dense_matrix, direct_solve
from .lissa import lissa_solve
from .qp import qp_solve
from .woodbury import woodbury_solve

SOLVERS = {
    "cg": conjugate_gradient,
    "direct": direct_solve,
    "woodbury": woodbury_solve,
    "lissa": lissa_solve,
    "qp": qp_solve,
}

__all__ = [
    "SOLVERS",
    "SolverStats",
    "conjugate_gradient",
    "dense_matrix",
    "direct_solve",
    "lissa_solve",
    "qp_solve",
    "woodbury_solve",
]
