"""Curvature operators: matrix-free `v ↦ C v` over the curvature data (λ is added by the solvers)."""

from .base import CurvatureOperator
from .fisher import FisherOperator
from .ggn import GaussNewtonOperator
from .hessian import HessianOperator

CURVATURE_OPERATORS = {"hessian": HessianOperator, "ggn": GaussNewtonOperator, "fisher": FisherOperator}

__all__ = [
    "CURVATURE_OPERATORS",
    "CurvatureOperator",
    "FisherOperator",
    "GaussNewtonOperator",
    "HessianOperator",
]
