from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..errors import ConfigurationError
from .base import SolverStats
from .stochastic import MiniBatchCurvature, expected_smoothness, generator_for, relative_residual

QP_OPTIMIZERS = ("sgd", "adam")
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-12


def qp_solve(
    curvature,
    damping: float,
    rhs: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    progress: bool = False,
    seed: int = 0,
    stochastic_batch_size: int = 8,
    qp_optimizer: str = "sgd",
    qp_lr: float | str = "auto",
    **_,
):
    """LLMEraser's stochastic quadratic program, with the correct gradient.

    Minimises `q(x) = ½ xᵀ(C+λI)x − rhsᵀx` (rhs = −b, so this is `½xᵀ(C+λI)x + bᵀx`, minimiser
    `(C+λI)⁻¹ rhs`) from x = 0 by `max_iter` stochastic steps on the unbiased mini-batch gradient
    `(C_B + λI)x − rhs` — not the released code's `½H_B x − b`, whose fixed point is twice the answer.

    - `sgd` (default): heavy-ball momentum 0.9; `qp_lr="auto"` is `(1 − 0.9)/𝓛̂`, where
      `𝓛̂ = λ_max(C) + (f_L/b_L)·R_L² + λ` bounds the expected smoothness `E[A_B²] ≼ 𝓛·A` of the
      mini-batch products (`stochastic.expected_smoothness`, the same rule and stratified batches as
      `lissa`'s default scale: Lanczos on full products for λ_max(C) and on each row alone for R²). The
      effective step once the momentum builds up is lr/(1 − 0.9) = 1/𝓛̂, a factor 2 inside the mean-square
      divergence threshold 2/𝓛 of plain SGD (a step from λ_max(C) alone diverges when a few rows carry most
      of the curvature, because one mini-batch can then be far stiffer than the full C). The error along an
      eigenvector with eigenvalue a decays like `(1 − a/𝓛̂)^j`, so the steps needed grow like
      `𝓛̂/(λ_min(C) + λ)`: a larger batch or damping converges in fewer steps. With an explicit `qp_lr` no
      estimate is made and batches are uniform draws.
    - `adam`: Adam (β = 0.9, 0.999) with a step size in parameter units, so `qp_lr` must be given.

    The estimate returned is the average of the iterates over the second half of the run (Polyak–Ruppert
    tail averaging), which removes most of the mini-batch noise of the last iterate. One full product then
    measures the relative residual; the solver is budgeted, `converged` only says whether it is ≤ `tol`.
    """
    start = time.perf_counter()
    if qp_optimizer not in QP_OPTIMIZERS:
        raise ConfigurationError(
            f"qp_optimizer must be one of {', '.join(QP_OPTIMIZERS)}; got {qp_optimizer!r}."
        )
    extra = {"stochastic": True, "stochastic_batch_size": stochastic_batch_size, "qp_optimizer": qp_optimizer}
    if rhs.norm().item() == 0.0:
        return torch.zeros_like(rhs), SolverStats("qp", 0, 0.0, True, time.perf_counter() - start, 0, extra)
    always = []
    if qp_lr == "auto":
        if qp_optimizer == "adam":
            raise ConfigurationError(
                "qp with Adam takes steps in parameter units, so there is no scale-free default: give --qp-lr "
                "(e.g. a few percent of the expected |Δθ| per coordinate), or use --qp-optimizer sgd."
            )
        smooth, always, estimates = expected_smoothness(
            curvature, damping, rhs, stochastic_batch_size, progress
        )
        lr = (1 - MOMENTUM) / smooth
        extra |= estimates
    else:
        lr = float(qp_lr)
    extra["qp_lr"] = lr
    products = MiniBatchCurvature(curvature, stochastic_batch_size, generator_for(curvature, seed), always)
    x = torch.zeros_like(rhs)
    m, s = torch.zeros_like(rhs), torch.zeros_like(rhs)
    average, averaged = torch.zeros_like(rhs), 0
    tail_start = max_iter - max(max_iter // 2, 1)
    for j in tqdm(range(1, max_iter + 1), desc="qp", disable=not progress, leave=False):
        grad = products.matvec(x) + damping * x - rhs
        if qp_optimizer == "sgd":
            m = MOMENTUM * m + grad
            x = x - lr * m
        else:
            m = ADAM_BETAS[0] * m + (1 - ADAM_BETAS[0]) * grad
            s = ADAM_BETAS[1] * s + (1 - ADAM_BETAS[1]) * grad * grad
            step = (m / (1 - ADAM_BETAS[0] ** j)) / ((s / (1 - ADAM_BETAS[1] ** j)).sqrt() + ADAM_EPS)
            x = x - lr * step
        if not torch.isfinite(x).all():
            break
        if j > tail_start:
            average += x
            averaged += 1
    finite = torch.isfinite(x).all()
    x = average / averaged if averaged and finite else x
    residual = relative_residual(curvature, damping, x, rhs) if finite else math.inf
    extra["sample_products"] = products.products
    stats = SolverStats(
        "qp", max_iter, residual, residual <= tol, time.perf_counter() - start, curvature.num_products, extra
    )
    return x, stats
