"""Shared pieces of the mini-batch solvers (`lissa`, `qp`): sampling, the step-size rule, the final check.

The step-size rule. Both solvers are stochastic gradient steps `x ← x − γ (A_B x − rhs)` on the quadratic
`½xᵀAx − rhsᵀx`, A = C + λI, where `A_B = C_B + λI` and `C_B` is an unbiased mini-batch product
(`MiniBatchCurvature`: b rows drawn without replacement, rescaled to the full normaliser). The
step that decides convergence is not set by λ_max(C) but by the *expected smoothness*

    𝓛 = the smallest constant with  E[A_B²] ≼ 𝓛·A.

Along an eigenvector the mean-square error contracts by `E[(1 − γa_B)²] = 1 − 2γa + γ²E[a_B²]`, so SGD
(and LiSSA, which is SGD with γ = 1/s) diverges in mean square for γ > 2/𝓛 and contracts at rate γa for
γ = 1/𝓛, the usual choice (the mini-batch least-squares step of Jain, Kakade, Kidambi, Netrapalli and
Sidford, JMLR 2018, has the same form). A single mini-batch can have a far larger top eigenvalue than the
full C — one row with a large curvature, rescaled by n/b, dominates every batch that draws it — which is
why a rule built on λ_max(C) alone (the previous default) diverged on a small Llama.

Bound used. Write the process's rows as `C = Σ_z C_z` with `K_z = n·C_z` (one row rescaled to the whole
shard of n rows) and `R² = max_z λ_max(K_z)`. Sampling b of n rows without replacement gives
`E[C_B²] = C² + (f/b)(mean_z K_z² − C²)` with `f = (n − b)/(n − 1)`; for positive semi-definite rows
(`ggn`, `fisher`) `K_z² ≼ R²K_z`, `C² ≼ λ_max(C)·C`, and with λ added

    𝓛 ≤ λ_max(C) + (f/b)·R² + λ.

Stratified batches (variance reduction). R² is a maximum, so one stiff row can make the variance term many
times λ_max(C) (on the quick benchmark's toy Llama, one row has λ_max(K_z) ≈ 48·λ_max(C)). The rule
therefore includes the h stiffest rows in *every* mini-batch with weight 1 and draws the other b − h
uniformly from the rest: the product stays unbiased, costs the same b rows, and the bound becomes
`λ_max(C) + (f_L/b_L)·R_L² + λ` over the drawn-from rows only (b_L = b − h of L = n − h rows); h (0 to b − 1)
is the one that minimises it, so rows of similar stiffness give h = 0, plain uniform batches.

Over several processes the per-process variances add and the bound takes the largest term. For the
Hessian, whose per-row blocks can be indefinite, R² uses the per-row spectral radius and the bound is a
heuristic rather than a guarantee. λ_max(C) comes from Lanczos on full products (which also refuses an
indefinite `C + λI`), each row's extreme eigenvalues from `ROW_STEPS` Lanczos steps on that row alone:
about `ROW_STEPS` passes over the curvature rows one row at a time, on top of `SPECTRUM_STEPS` full products.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..curvature.spectrum import lanczos_extremes
from ..errors import NonPositiveCurvatureError
from .base import suggest_damping

SPECTRUM_STEPS = 20
ROW_STEPS = 10


@dataclass(frozen=True)
class MiniBatchOptions:
    """How a stochastic solver draws its mini-batches: `stochastic_batch_size` curvature rows per product,
    drawn with a generator seeded by `seed` (`generator_for`)."""

    seed: int = 0
    stochastic_batch_size: int = 8


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


def rows_drawn(num_rows: int, batch_size: int, num_processes: int) -> int:
    """How many of its `num_rows` rows one process uses per mini-batch (as `Batches.sample` draws)."""
    return min(num_rows, max(1, -(-batch_size // num_processes)))


def row_spectral_radii(curvature, rhs: torch.Tensor, progress: bool = False) -> tuple[list[float], int]:
    """The spectral radius of `C_z` (its 1/M included) for each of this process's curvature rows z, by
    `ROW_STEPS` Lanczos steps on that row alone; and the number of one-row products this took."""
    batches, task, space = curvature.batches, curvature.task, curvature.space
    radii, products = [], 0
    for row in tqdm(batches.rows, desc="row curvature", disable=not progress, leave=False):
        batch = {k: v.to(batches.device) for k, v in task.collate([row]).items()}

        def product(v, batch=batch):
            return curvature.batch_product(batch, space.unflatten(v))

        low, high, steps = lanczos_extremes(
            product, curvature.size, ROW_STEPS, dtype=rhs.dtype, device=rhs.device
        )
        radii.append(max(abs(low), abs(high)))
        products += steps
    return radii, products


def stratify(radii: list[float], rows_per_batch: int) -> tuple[list[int], float]:
    """Which rows to include in every mini-batch, and the variance term `(f_L/b_L)·R_L²` that results.

    With the h stiffest rows always included and the other `b_L = b − h` drawn from the remaining `L = n − h`
    (rescaled by L/b_L), `R_L² = L·max ρ(C_z)` over the drawn-from rows and `f_L = (L − b_L)/(L − 1)`. h runs
    over 0..b−1 (at least one row is drawn, so the product stays unbiased) and the smallest term wins.
    """
    order = sorted(range(len(radii)), key=lambda i: -radii[i])
    best_h, best = 0, math.inf
    for h in range(max(1, rows_per_batch)):
        pool, drawn = len(radii) - h, rows_per_batch - h
        if pool <= 0:
            break
        term = 0.0 if drawn >= pool else (pool - drawn) / (pool - 1) / drawn * pool * radii[order[h]]
        if term < best:
            best_h, best = h, term
    return sorted(order[:best_h]), (0.0 if best == math.inf else best)


def expected_smoothness(
    curvature, damping: float, rhs: torch.Tensor, batch_size: int, progress: bool = False
) -> tuple[float, list[int], dict]:
    """`(𝓛̂, always, estimates)`: the bound `λ_max(C) + max_p (f_L/b_L)·R_L² + λ` on the expected smoothness
    of the mini-batch products (module docstring), this process's rows to include in every batch, and the
    estimates behind them for the solver's stats."""
    start = time.perf_counter()
    low, high = curvature_scale(curvature, damping, rhs)
    processes = curvature.processes
    n = len(curvature.batches.rows)
    radii, products = row_spectral_radii(curvature, rhs, progress)
    always, term = stratify(radii, rows_drawn(n, batch_size, processes.count)) if n else ([], 0.0)
    # max over processes of the variance term and of R² = n·max ρ(C_z); sum of the always-included rows
    local = torch.zeros(3, processes.count, dtype=torch.float64)
    local[:, processes.index] = torch.tensor(
        [term, n * max(radii, default=0.0), len(always)], dtype=torch.float64
    )
    totals = processes.sum(local.to(rhs.device)).cpu()
    variance_term, row_max = totals[:2].max(dim=1).values.tolist()
    value = high + variance_term + damping
    return (
        value,
        always,
        {
            "eig_min_estimate": low,
            "eig_max_estimate": high,
            "row_eig_max_estimate": row_max,
            "always_included_rows": int(totals[2].sum().item()),
            "smoothness_estimate": value,
            "scale_row_products": products,
            "scale_seconds": time.perf_counter() - start,
        },
    )


class MiniBatchCurvature:
    """Unbiased mini-batch products `C_B v` for the stochastic solvers.

    With no `always` rows this is `curvature.sample_matvec` (uniform draws without replacement, rescaled).
    Otherwise each process's `always` rows (indices into its shard) enter every product with weight 1 and
    the remaining rows of the batch are drawn uniformly from the rest, rescaled by (rest / drawn): stratified
    sampling, still unbiased and still about `batch_size` rows per product.
    """

    def __init__(self, curvature, batch_size: int, generator: torch.Generator, always: list[int] = ()):
        self.curvature, self.batch_size, self.generator = curvature, batch_size, generator
        self.always = list(always)
        batches = curvature.batches
        if self.always:
            keep = set(self.always)
            self.fixed = self._collate([batches.rows[i] for i in self.always])
            self.pool = [row for i, row in enumerate(batches.rows) if i not in keep]
            per_process = rows_drawn(len(batches.rows), batch_size, curvature.processes.count)
            self.drawn = min(len(self.pool), per_process - len(self.always))
        self.products = 0

    def _collate(self, rows):
        batches = self.curvature.batches
        return {k: v.to(batches.device) for k, v in self.curvature.task.collate(rows).items()}

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        curvature = self.curvature
        if not self.always:
            return curvature.sample_matvec(v, self.batch_size, self.generator)
        vs = curvature.space.unflatten(v)
        out = curvature.batch_product(self.fixed, vs)
        if self.drawn > 0:
            chosen = torch.randperm(len(self.pool), generator=self.generator)[: self.drawn].tolist()
            batch = self._collate([self.pool[j] for j in chosen])
            out = out + (len(self.pool) / self.drawn) * curvature.batch_product(batch, vs)
        curvature.num_sample_products += 1
        return curvature.processes.sum(out)


def relative_residual(curvature, damping: float, x: torch.Tensor, rhs: torch.Tensor) -> float:
    """‖(C+λI)x − rhs‖/‖rhs‖ with one full curvature product."""
    r = curvature.matvec(x) + damping * x - rhs
    return (r.norm() / rhs.norm().clamp_min(torch.finfo(rhs.dtype).tiny)).item()
