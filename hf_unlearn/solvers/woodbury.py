from __future__ import annotations

import time

import torch

from ..errors import ConfigurationError
from .base import SolverStats

MAX_WOODBURY_ROWS = 8192


def woodbury_solve(curvature, damping: float, rhs: torch.Tensor, **_):
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
    K = G @ G.T + M * damping * torch.eye(n, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(K)
    x = (rhs - G.T @ torch.cholesky_solve((G @ rhs).unsqueeze(1), L).squeeze(1)) / damping
    Ax = G.T @ (G @ x) / M + damping * x
    residual = ((Ax - rhs).norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)).item()
    return x, SolverStats("woodbury", 1, residual, True, time.perf_counter() - start, 0, {"fisher_rows": n})
