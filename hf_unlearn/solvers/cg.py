from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import NonPositiveCurvatureError
from .base import SolverStats, suggest_damping


def conjugate_gradient(
    curvature, damping: float, rhs: torch.Tensor, *, tol: float, max_iter: int, progress: bool = False, **_
):
    """Solve (C + λI) x = rhs by conjugate gradient from x = 0.

    Stops when ‖r‖/‖rhs‖ ≤ tol or after `max_iter` products; raises `NonPositiveCurvatureError` when a search
    direction has pᵀ(C+λI)p ≤ 0.
    """
    start = time.perf_counter()
    x = torch.zeros_like(rhs)
    rhs_norm = rhs.norm().item()
    if rhs_norm == 0.0:
        return x, SolverStats("cg", 0, 0.0, True, time.perf_counter() - start)
    r = rhs.clone()  # r = rhs − A x
    p = r.clone()
    rs = r.dot(r)
    relative_residual, iterations = 1.0, 0
    bar = tqdm(total=max_iter, desc="cg", disable=not progress, leave=False)
    for iterations in range(1, max_iter + 1):
        Ap = curvature.matvec(p) + damping * p
        pAp = p.dot(Ap)
        if pAp.item() <= 0:
            rayleigh = (pAp / p.dot(p)).item() - damping  # pᵀCp / pᵀp ≥ λ_min(C)
            bar.close()
            raise NonPositiveCurvatureError(
                f"Conjugate gradient met non-positive curvature at iteration {iterations} "
                f"(pᵀ(C+λI)p = {pAp.item():.3g} with damping λ = {damping:g}); the curvature has an eigenvalue "
                f"≤ {rayleigh:.3g}. Raise the damping, e.g. --damping {suggest_damping(damping, rayleigh):g}.",
                suggested_damping=suggest_damping(damping, rayleigh),
            )
        alpha = rs / pAp
        x += alpha * p
        r -= alpha * Ap
        rs_new = r.dot(r)
        relative_residual = rs_new.sqrt().item() / rhs_norm
        bar.update(1)
        bar.set_postfix(residual=f"{relative_residual:.2e}")
        if relative_residual <= tol:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    bar.close()
    return x, SolverStats(
        "cg", iterations, relative_residual, relative_residual <= tol, time.perf_counter() - start, iterations
    )
