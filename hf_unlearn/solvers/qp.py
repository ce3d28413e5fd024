from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import ConfigurationError
from .base import SolverStats
from .stochastic import (
    MiniBatchCurvature,
    MiniBatchOptions,
    expected_smoothness,
    generator_for,
    relative_residual,
)

QP_OPTIMIZERS = ("svrg", "sgd", "adam")
MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-12
# svrg: inner steps per snapshot, as a multiple of the cost of the snapshot's full product (in mini-batch
# products), so that full products take about a third of the budget
EPOCH_FACTOR = 2


def full_product_cost(curvature, batch_size: int) -> float:
    """One full curvature product in units of mini-batch products: curvature rows / rows per mini-batch."""
    rows = curvature.batches.total_rows
    return max(1.0, rows / max(1, min(rows, batch_size)))


@dataclass(frozen=True)
class QPOptions(MiniBatchOptions):
    """`qp_solve`'s own options (the flags of the same names): the mini-batches, the optimizer and its step."""

    qp_optimizer: str = "svrg"
    qp_lr: float | str = "auto"


@dataclass
class _Quadratic:
    """The problem `q(x) = ½ xᵀAx − rhsᵀx`, A = C + λI: full products with `curvature`, mini-batch ones with
    `products`."""

    curvature: object
    products: MiniBatchCurvature
    damping: float
    rhs: torch.Tensor


def qp_solve(
    curvature,
    damping: float,
    rhs: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    progress: bool = False,
    options: QPOptions | None = None,
):
    """LLMEraser's stochastic quadratic program, with the correct gradient (`options`: a `QPOptions`, the
    seed, batch size, optimizer and step size, default as the flags).

    Minimises `q(x) = ½ xᵀAx − rhsᵀx`, A = C + λI (rhs = −b, so this is `½xᵀ(C+λI)x + bᵀx`, minimiser
    `A⁻¹ rhs`) from x = 0 with mini-batch products `A_B = C_B + λI` — the unbiased gradient `A_B x − rhs`, not
    the released code's `½H_B x − b`, whose fixed point is twice the answer. `max_iter` is the budget in
    mini-batch products; `qp_lr="auto"` builds on `𝓛̂ = λ_max(C) + (f_L/b_L)·R_L² + λ`, a bound on the expected
    smoothness `E[A_B²] ≼ 𝓛·A` of the mini-batch products (`stochastic.expected_smoothness`: Lanczos on full
    products for λ_max(C) and on each row alone for R², the stiffest rows put in every batch).

    - `svrg` (default): stochastic variance-reduced gradient (Johnson & Zhang 2013) with Nesterov momentum.
      Every epoch starts from a snapshot x̃ with its exact gradient `g̃ = Ax̃ − rhs` (one full product) and
      takes `m = 2·(n/b)` steps `y = x + β(x − x_prev)`, `x ← y − γ(A_B(y − x̃) + g̃)`, one mini-batch
      product each; the noise of `A_B(y − x̃)` vanishes as the iterates and x̃ approach the solution, so on
      this finite-sum quadratic the error contracts linearly — no noise floor, no averaging. Auto: `γ = 1/𝓛̂`
      and `β = (√κ̂ − 1)/(√κ̂ + 1)` with `κ̂ = 𝓛̂/(λ̂_min + λ)` from the Lanczos Ritz value λ̂_min ≥ λ_min(C)
      (so β errs on the small, safe side); with an explicit `qp_lr`, β = 0 (plain SVRG). The snapshot's
      exact gradient is the exact residual: the solver keeps the best snapshot, halves γ (and drops the
      momentum) when an epoch ends worse than it started (𝓛̂ is a heuristic for the Hessian), and stops once
      the relative residual is ≤ `tol` (`converged` is then True) or the budget is spent. Each full product
      counts as `n/b` mini-batch products of the budget. The steps needed grow like `√κ̂` (`κ̂` without
      momentum).
    - `sgd`: plain stochastic steps with heavy-ball momentum 0.9 and `qp_lr="auto"` = `(1 − 0.9)/𝓛̂`,
      returning the average of the second half of the iterates (Polyak–Ruppert). Its error has a noise
      floor and a bias from averaging iterates that have not converged: it does not reach a small residual
      at a few thousand steps (kept for comparison with the paper's solver).
    - `adam`: Adam (β = 0.9, 0.999) with a step size in parameter units, so `qp_lr` must be given; same
      averaging and same caveat as `sgd`.

    One full product measures the relative residual of the result (for `svrg` it is the last snapshot's).
    The stats' `extra` records the estimates and the cost: `sample_products` (mini-batch),
    `full_products`, `full_product_cost` (n/b) and `minibatch_equivalent_products` = sample products +
    full products × n/b + the one-row products of the estimate / b.
    """
    options = options or QPOptions()
    seed, stochastic_batch_size = options.seed, options.stochastic_batch_size
    qp_optimizer, qp_lr = options.qp_optimizer, options.qp_lr
    start = time.perf_counter()
    if qp_optimizer not in QP_OPTIMIZERS:
        raise ConfigurationError(
            f"qp_optimizer must be one of {', '.join(QP_OPTIMIZERS)}; got {qp_optimizer!r}."
        )
    extra = {"stochastic": True, "stochastic_batch_size": stochastic_batch_size, "qp_optimizer": qp_optimizer}
    if rhs.norm().item() == 0.0:
        return torch.zeros_like(rhs), SolverStats("qp", 0, 0.0, True, time.perf_counter() - start, 0, extra)
    full_before = curvature.num_products
    always = []
    if qp_lr == "auto":
        if qp_optimizer == "adam":
            raise ConfigurationError(
                "qp with Adam takes steps in parameter units, so there is no scale-free default: give --qp-lr "
                "(e.g. a few percent of the expected |Δθ| per coordinate), or use --qp-optimizer svrg."
            )
        smooth, always, estimates = expected_smoothness(
            curvature, damping, rhs, stochastic_batch_size, progress
        )
        lr = (1 - MOMENTUM) / smooth if qp_optimizer == "sgd" else 1.0 / smooth
        extra |= estimates
    else:
        lr = float(qp_lr)
    extra["qp_lr"] = lr
    products = MiniBatchCurvature(curvature, stochastic_batch_size, generator_for(curvature, seed), always)
    cost = full_product_cost(curvature, stochastic_batch_size)
    if qp_optimizer == "svrg":
        momentum = 0.0
        if qp_lr == "auto":  # κ̂ = 𝓛̂/(λ_min + λ) from the Ritz value, which lies above λ_min: β errs low
            kappa = smooth / (max(extra["eig_min_estimate"], 0.0) + damping)
            momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
        extra["momentum"] = momentum
        quadratic = _Quadratic(curvature, products, damping, rhs)
        x, residual, iterations, svrg_extra = _svrg(quadratic, lr, momentum, tol, max_iter, cost, progress)
        extra |= svrg_extra
    else:
        x, iterations = _plain(products, damping, rhs, lr, max_iter, qp_optimizer, progress), max_iter
        finite = bool(torch.isfinite(x).all())
        residual = relative_residual(curvature, damping, x, rhs) if finite else math.inf
    full = curvature.num_products - full_before
    extra |= {
        "sample_products": products.products,
        "full_products": full,
        "full_product_cost": cost,
        "minibatch_equivalent_products": products.products
        + full * cost
        + extra.get("scale_row_products", 0) / max(1, stochastic_batch_size),
    }
    stats = SolverStats("qp", iterations, residual, residual <= tol, time.perf_counter() - start, full, extra)
    return x, stats


def _svrg(quadratic: _Quadratic, lr, momentum, tol, budget, cost, progress):
    """SVRG epochs (with Nesterov `momentum`) within `budget` mini-batch products (a full product costs `cost`); returns
    (best snapshot, its relative residual, mini-batch steps taken, stats)."""
    curvature, products, damping, rhs = (
        quadratic.curvature,
        quadratic.products,
        quadratic.damping,
        quadratic.rhs,
    )
    rhs_norm = rhs.norm()
    steps_per_epoch = max(1, math.ceil(EPOCH_FACTOR * cost))
    best, gradient = torch.zeros_like(rhs), -rhs  # snapshot x̃ = 0 and its exact gradient A·0 − rhs
    best_residual, used, steps, epochs, halvings = 1.0, 0.0, 0, 0, 0
    velocity = None  # carried from epoch to epoch, dropped with a rejected epoch
    bar = tqdm(total=budget, desc="qp (svrg)", disable=not progress, leave=False)
    while best_residual > tol:
        inner = min(steps_per_epoch, math.floor(budget - used - cost))
        if inner < 1:
            break
        x = best.clone()
        previous = x if velocity is None else x - velocity
        for _ in range(inner):
            y = x + momentum * (x - previous)  # Nesterov: the gradient at the extrapolated point
            d = y - best
            previous, x = x, y - lr * (products.matvec(d) + damping * d + gradient)
        velocity = x - previous
        steps += inner
        used += inner + cost
        epochs += 1
        bar.update(inner + cost)
        new_gradient = curvature.matvec(x) + damping * x - rhs
        residual = (new_gradient.norm() / rhs_norm).item()
        if residual < best_residual:  # NaN compares False: a diverged epoch is rejected too
            best, gradient, best_residual = x, new_gradient, residual
            bar.set_postfix(residual=f"{residual:.2e}")
        else:
            lr /= 2
            halvings += 1
            velocity = None
    bar.close()
    return (
        best,
        best_residual,
        steps,
        {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "step_halvings": halvings, "final_lr": lr},
    )


def _plain(products, damping, rhs, lr, max_iter, optimizer, progress):
    """`max_iter` plain stochastic steps (sgd with momentum, or adam); the average of the second half."""
    x = torch.zeros_like(rhs)
    m, s = torch.zeros_like(rhs), torch.zeros_like(rhs)
    average, averaged = torch.zeros_like(rhs), 0
    tail_start = max_iter - max(max_iter // 2, 1)
    for j in tqdm(range(1, max_iter + 1), desc="qp", disable=not progress, leave=False):
        grad = products.matvec(x) + damping * x - rhs
        if optimizer == "sgd":
            m = MOMENTUM * m + grad
            x = x - lr * m
        else:
            m = ADAM_BETAS[0] * m + (1 - ADAM_BETAS[0]) * grad
            s = ADAM_BETAS[1] * s + (1 - ADAM_BETAS[1]) * grad * grad
            step = (m / (1 - ADAM_BETAS[0] ** j)) / ((s / (1 - ADAM_BETAS[1] ** j)).sqrt() + ADAM_EPS)
            x = x - lr * step
        if not torch.isfinite(x).all():
            return x
        if j > tail_start:
            average += x
            averaged += 1
    return average / averaged if averaged else x
