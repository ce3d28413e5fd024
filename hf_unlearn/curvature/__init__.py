"""Curvature operators: matrix-free `v ↦ C v` over the curvature data (λ is added by the solvers)."""

from .base import CurvatureOperator
from .fisher import FisherOperator
from .ggn import GaussNewtonOperator
from .hessian import HessianOperator
from .kfac import EKFACOperator, EKFACPreconditioner, KFACFactors, KFACOperator, KFACPreconditioner

# Operators over the curvature data, built as cls(model, task, space, batches, normalization, M, processes).
CURVATURE_OPERATORS = {"hessian": HessianOperator, "ggn": GaussNewtonOperator, "fisher": FisherOperator}
# Operators from Kronecker factors (same arguments plus factors=KFACFactors); see curvature/setup.py.
KFAC_OPERATORS = {"kfac": KFACOperator, "ekfac": EKFACOperator}
# The same as preconditioners of a solve against another curvature: uncovered parameters get 1/λ.
KFAC_PRECONDITIONERS = {"kfac": KFACPreconditioner, "ekfac": EKFACPreconditioner}

__all__ = [
    "CURVATURE_OPERATORS",
    "KFAC_OPERATORS",
    "KFAC_PRECONDITIONERS",
    "CurvatureOperator",
    "EKFACOperator",
    "EKFACPreconditioner",
    "FisherOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "KFACFactors",
    "KFACOperator",
    "KFACPreconditioner",
]
