from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import NonPositiveCurvatureError
from .base import SolverStats, suggest_damping


def conjugate_gradient(
    curvature,
    damping: float,
    rhs: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    progress: bool = False,
    preconditioner=None,
    callback=None,
):
    """Solve (C + λI) x = rhs by (preconditioned) conjugate gradient from x = 0.

    `preconditioner`, when given, is an object with `solve_damped(r, λ)` applying `P⁻¹ r` for a symmetric
    positive definite `P ≈ C + λI` (the K-FAC/EK-FAC block inverse) and a `name`; each iteration then costs
    one product with C and one application of P⁻¹:

        r₀ = rhs, z₀ = P⁻¹r₀, p₀ = z₀;   α = rᵀz / pᵀ(C+λI)p,  x += αp,  r −= α(C+λI)p,
        z = P⁻¹r,  β = r_newᵀz_new / rᵀz,  p = z + βp.

    Stops when the recursively updated residual ‖r‖/‖rhs‖ ≤ tol (the same test with or without P) or after
    `max_iter` products; raises `NonPositiveCurvatureError` when a search direction has pᵀ(C+λI)p ≤ 0.
    In float32 that recursion drifts from the true residual near the precision's floor, so one more product
    measures the true `‖rhs − (C+λI)x‖/‖rhs‖` at the end: `extra["true_relative_residual"]`.
    `callback(iteration, x)`, when given, sees every iterate (benchmarks).
    """
    start = time.perf_counter()
    name = "cg"
    extra = {} if preconditioner is None else {"preconditioner": preconditioner.name}
    x = torch.zeros_like(rhs)
    rhs_norm = rhs.norm().item()
    if rhs_norm == 0.0:
        return x, SolverStats(name, 0, 0.0, True, time.perf_counter() - start, 0, extra)

    def precondition(r):
        return r if preconditioner is None else preconditioner.solve_damped(r, damping)

    r = rhs.clone()  # r = rhs − A x
    z = precondition(r)
    p = z.clone()
    rz = r.dot(z)
    relative_residual, iterations = 1.0, 0
    bar = tqdm(total=max_iter, desc=name, disable=not progress, leave=False)
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
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        relative_residual = r.norm().item() / rhs_norm
        if callback is not None:
            callback(iterations, x)
        bar.update(1)
        bar.set_postfix(residual=f"{relative_residual:.2e}")
        if relative_residual <= tol:
            break
        z = precondition(r)
        rz_new = r.dot(z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    bar.close()
    extra["true_relative_residual"] = (rhs - (curvature.matvec(x) + damping * x)).norm().item() / rhs_norm
    if preconditioner is not None:
        extra["preconditioner_applications"] = iterations
    return x, SolverStats(
        name,
        iterations,
        relative_residual,
        relative_residual <= tol,
        time.perf_counter() - start,
        iterations + 1,  # the true-residual product
        extra,
    )
