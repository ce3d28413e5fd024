"""Shared pieces of the mini-batch solvers (`lissa`, `qp`)."""

from __future__ import annotations

import torch

from ..curvature.spectrum import lanczos_extremes
from ..errors import NonPositiveCurvatureError
from .base import suggest_damping

SPECTRUM_STEPS = 20


def generator_for(curvature, seed: int) -> torch.Generator:
    """A CPU generator seeded by `seed` and the process index (each process samples its own shard)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + curvature.processes.index)


def curvature_scale(curvature, damping: float, rhs: torch.Tensor) -> tuple[float, float]:
    """(λ_min, λ_max) Ritz estimates of C by Lanczos on full products; raises if C + λI looks indefinite."""
    low, high, _ = lanczos_extremes(
        curvature.matvec, curvature.size, SPECTRUM_STEPS, dtype=rhs.dtype, device=rhs.device
    )
    if low + damping <= 0:
        raise NonPositiveCurvatureError(
            f"C + λI is not positive definite (Lanczos estimate of the smallest eigenvalue of C: {low:.3g}, "
            f"damping λ = {damping:g}); the stochastic solvers would diverge. Raise the damping, e.g. "
            f"--damping {suggest_damping(damping, low):g}, or use --damping auto.",
            suggested_damping=suggest_damping(damping, low),
        )
    return low, high


def relative_residual(curvature, damping: float, x: torch.Tensor, rhs: torch.Tensor) -> float:
    """‖(C+λI)x − rhs‖/‖rhs‖ with one full curvature product."""
    r = curvature.matvec(x) + damping * x - rhs
    return (r.norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)).item()
