"""Extreme eigenvalues of a curvature operator by Lanczos (used by `damping="auto"` and step-size rules)."""

from __future__ import annotations

import torch


def lanczos_extremes(
    matvec, size: int, steps: int, *, dtype, device, seed: int = 0
) -> tuple[float, float, int]:
    """Ritz estimates `(smallest, largest, steps_done)` of the eigenvalues of a symmetric operator.

    Lanczos with full reorthogonalisation from a seeded random start; `steps` products (fewer if an invariant
    subspace is found). Ritz values lie inside the spectrum, so `largest` is a lower bound on λ_max and
    `smallest` an upper bound on λ_min; both converge fastest for the extremes.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(size, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm()
    Q, alphas, betas = [q], [], []
    for _ in range(min(steps, size)):
        w = matvec(Q[-1])
        alpha = Q[-1].dot(w)
        alphas.append(alpha.item())
        basis = torch.stack(Q)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = w.norm().item()
        if beta <= 1e-10 * max(abs(a) for a in alphas) or len(alphas) == min(steps, size):
            break
        betas.append(beta)
        Q.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    return ritz[0].item(), ritz[-1].item(), k
