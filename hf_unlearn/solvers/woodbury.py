from __future__ import annotations

import time

import torch

from ..errors import ConfigurationError
from .base import SolverStats

MAX_WOODBURY_ROWS = 8192


def woodbury_solve(curvature, damping: float, rhs: torch.Tensor, tol: float = 1e-6):
    """Exact solve of `(F + λI) x = rhs` for the empirical Fisher `F = GᵀG/M` (G: n × P per-example gradients).

    Woodbury: `(λI + GᵀG/M)⁻¹ = (1/λ)[I − Gᵀ(MλI_n + GGᵀ)⁻¹G]`, one n × n Cholesky instead of a P × P one, so it
    works for any parameter count as long as the n × P gradients fit in memory. Needs `curvature="fisher"`
    and λ > 0 (F has rank ≤ n < P).
    """
    start = time.perf_counter()
    if not hasattr(curvature, "gradient_matrix"):
        raise ConfigurationError(
            "solver 'woodbury' is the exact solve of the empirical Fisher: use it with --curvature fisher "
            "(or use --solver cg / direct for other curvatures)."
        )
    if not damping > 0:
        raise ConfigurationError(
            "solver 'woodbury' needs --damping > 0: the empirical Fisher has rank at most the number of "
            "curvature rows, so F alone is singular."
        )
    G = curvature.gradient_matrix()  # (n, P)
    n = G.shape[0]
    if n > MAX_WOODBURY_ROWS:
        raise ConfigurationError(
            f"solver 'woodbury' factorises an n × n matrix; n = {n} curvature rows exceeds {MAX_WOODBURY_ROWS}. "
            "Use --hessian-samples to subsample or --solver cg."
        )
    M = curvature.normaliser
    G64 = G.double()  # the n × n system in float64: in float32 GGᵀ + MλI loses λ against GGᵀ
    K = G64 @ G64.T + M * damping * torch.eye(n, dtype=torch.float64, device=G.device)
    L, info = torch.linalg.cholesky_ex(K)
    if info.item() != 0:
        raise ConfigurationError(
            f"solver 'woodbury': GGᵀ + MλI is not numerically positive definite at damping {damping:g}; "
            "raise --damping or use --solver cg."
        )
    r64 = rhs.double()
    x = ((r64 - G64.T @ torch.cholesky_solve((G64 @ r64).unsqueeze(1), L).squeeze(1)) / damping).to(rhs.dtype)
    Ax = G.T @ (G @ x) / M + damping * x
    residual = ((Ax - rhs).norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)).item()
    stats = SolverStats("woodbury", 1, residual, residual <= tol, time.perf_counter() - start, 0)
    stats.extra["fisher_rows"] = n
    return x, stats
