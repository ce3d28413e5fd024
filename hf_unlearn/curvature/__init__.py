"""Curvature operators: matrix-free `v ↦ C v` over the curvature data (λ is added by the solvers)."""

from .base import CurvatureOperator
from .hessian import HessianOperator

CURVATURE_OPERATORS = {"hessian": HessianOperator}

__all__ = ["CURVATURE_OPERATORS", "CurvatureOperator", "HessianOperator"]
