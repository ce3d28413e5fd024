from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import ConfigurationError, NonPositiveCurvatureError
from .base import SolverStats, suggest_damping

MAX_DIRECT_PARAMS = 4096


def dense_matrix(curvature, progress: bool = False) -> torch.Tensor:
    """Materialise C column by column with P matrix-vector products, symmetrised. (P, P)"""
    size = curvature.size
    if size > MAX_DIRECT_PARAMS:
        raise ConfigurationError(
            f"The direct solver materialises a {size}×{size} matrix; it is limited to {MAX_DIRECT_PARAMS} "
            "trainable parameters. Use --solver cg."
        )
    device, dtype = curvature.space.params[0].device, curvature.space.params[0].dtype
    eye = torch.eye(size, dtype=dtype, device=device)
    columns = [
        curvature.matvec(eye[i])
        for i in tqdm(range(size), desc="dense curvature", disable=not progress, leave=False)
    ]
    C = torch.stack(columns, dim=1)
    return (C + C.T) / 2


def direct_solve(curvature, damping: float, rhs: torch.Tensor, *, progress: bool = False):
    """Solve (C + λI) x = rhs exactly: by Cholesky of the dense matrix (raises when C + λI is not positive
    definite), or, for an operator with a structured exact inverse (`solve_damped`: the K-FAC/EK-FAC block
    inverse), with that inverse at any size and without materialising C."""
    start = time.perf_counter()
    if hasattr(curvature, "solve_damped"):
        x = curvature.solve_damped(rhs, damping)
        residual = (
            (curvature.matvec(x) + damping * x - rhs).norm()
            / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)
        ).item()
        exact = residual <= torch.finfo(rhs.dtype).eps ** 0.5  # round-off of the eigendecompositions only
        return x, SolverStats(
            "direct", 1, residual, exact, time.perf_counter() - start, 0, {"block_inverse": curvature.name}
        )
    A = dense_matrix(curvature, progress) + damping * torch.eye(
        curvature.size, dtype=rhs.dtype, device=rhs.device
    )
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        smallest = torch.linalg.eigvalsh(A)[0].item() - damping
        raise NonPositiveCurvatureError(
            f"C + λI is not positive definite (smallest eigenvalue of C: {smallest:.3g}, damping λ = {damping:g}). "
            f"Raise the damping, e.g. --damping {suggest_damping(damping, smallest):g}.",
            suggested_damping=suggest_damping(damping, smallest),
        )
    x = torch.cholesky_solve(rhs.unsqueeze(1), L).squeeze(1)
    residual = ((A @ x - rhs).norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)).item()
    return x, SolverStats("direct", 1, residual, True, time.perf_counter() - start, curvature.size)
