"""Computing K-FAC factors and EK-FAC eigenvalues with forward/backward hooks (see `kfac.py` for the maths).

`FactorCollector` hooks the covered Linear layers: the forward hook keeps the layer input `a` (B, L, in)
and registers a hook on the output tensor that receives `∂(backward root)/∂s` (B, L, out) during the
backward pass; there it accumulates, over the selected positions,

    A += Σ a aᵀ,   G += Σ (w_b g)(w_b g)ᵀ,   K += #positions          ("factors" mode)
    Λ += Σ_b (U_Gᵀ [Σ_t w_b g_{b,t} a_{b,t}ᵀ] U_A)²                       ("eigenvalues" mode, EK-FAC)

where `w_b` rescales example b's output gradients to `∂ℓ(z_b)/∂s` (1 when the backward root is Σ_b ℓ_b, as
in the passes here; the Trainer capture sets it from the logits gradient). Positions are the entries with
attention mask 1 when the batch has one, else every row of the input.
"""

from __future__ import annotations

import time

import torch

from ..errors import ConfigurationError
from ..objective import example_losses
from .kfac import TARGETS, KFACFactors, LinearBlock, kfac_eigenbasis, linear_blocks, parameters_digest


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class FactorCollector:
    """Context manager: hooks on the blocks' modules; sums in `A`, `G`, `positions` (or `eigenvalues`)."""

    def __init__(self, blocks: list[LinearBlock], mode: str = "factors", eigenbases: dict | None = None):
        if mode not in ("factors", "eigenvalues"):
            raise ValueError(mode)
        self.blocks, self.mode, self.eigenbases = blocks, mode, eigenbases or {}
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {b.name: 0 for b in blocks}
        self.eigenvalues: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # (B, L) positions of the current batch, or None: all
        self.example_weights: torch.Tensor | None = None  # (B,) w_b, or None: 1
        self.input_scale: dict[str, float] = {}  # per module: multiply A's diagonal (dropout correction)
        self.active = True
        self.seconds = 0.0  # time spent accumulating
        self._handles = []

    def __enter__(self):
        for block in self.blocks:
            self._handles.append(block.module.register_forward_hook(self._forward_hook(block)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_hook(self, block: LinearBlock):
        def hook(module, inputs, output):
            if not (self.active and torch.is_grad_enabled() and output.requires_grad):
                return
            a, mask = inputs[0].detach(), self.mask
            output.register_hook(lambda g: self._accumulate(block, a, g.detach(), mask))

        return hook

    def _rows(self, block: LinearBlock, a: torch.Tensor, g: torch.Tensor, mask):
        """(B, L, in') augmented inputs and (B, L, out) weighted gradients, zero outside the positions."""
        dtype = accumulation_dtype(a.dtype)
        a, g = a.to(dtype), g.to(dtype)
        if a.dim() == 2:  # (B, in): one position per example
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        elif a.dim() > 3:
            a, g = a.flatten(1, -2), g.flatten(1, -2)
        if block.weight is None:
            a = a.new_ones(*a.shape[:-1], 1)
        elif block.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)  # homogeneous coordinate for the bias
        if mask is not None:
            if tuple(mask.shape) != tuple(a.shape[:2]):
                raise ConfigurationError(
                    f"K-FAC: the input of {block.name} has shape {tuple(a.shape)}, which does not line up "
                    f"with the batch's attention mask {tuple(mask.shape)} (packed or reshaped sequences?)."
                )
            m = mask.to(dtype).unsqueeze(-1)  # (B, L, 1)
            a, g = a * m, g * m
            count = int(mask.sum())
        else:
            count = a.shape[0] * a.shape[1]
        if self.example_weights is not None:
            g = g * self.example_weights.to(dtype).view(-1, 1, 1)
        return a, g, count

    def _accumulate(self, block: LinearBlock, a, g, mask) -> None:
        start = time.perf_counter()
        a, g, count = self._rows(block, a, g, mask)  # (B, L, in'), (B, L, out)
        n = block.name
        if self.mode == "factors":
            a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            A, G = a2.T @ a2, g2.T @ g2  # Σ a aᵀ (in', in'), Σ g gᵀ (out, out)
            self.A[n] = A if n not in self.A else self.A[n] + A
            self.G[n] = G if n not in self.G else self.G[n] + G
            self.positions[n] += count
        else:
            U_A, U_G = self.eigenbases[n]
            per_example = torch.einsum("blo,bli->boi", g, a)  # ∇_W ℓ_b = Σ_t g_{b,t} a_{b,t}ᵀ  (B, out, in')
            projected = U_G.T.to(g.dtype) @ per_example @ U_A.to(a.dtype)  # U_Gᵀ ∇_W ℓ_b U_A
            lam = projected.pow(2).sum(0)  # Σ_b (·)²  (out, in')
            self.eigenvalues[n] = lam if n not in self.eigenvalues else self.eigenvalues[n] + lam
        self.seconds += time.perf_counter() - start

    def summed(self, processes) -> None:
        """Sum the accumulators over processes (every process must hold every module's tensors)."""
        for store in (self.A, self.G, self.eigenvalues):
            for n in store:
                store[n] = processes.sum(store[n])
        if processes.count > 1:
            counts = torch.tensor([self.positions[b.name] for b in self.blocks], dtype=torch.float64)
            counts = processes.sum(counts)
            self.positions = {b.name: int(c) for b, c in zip(self.blocks, counts.tolist())}


def _zeros_for(blocks, collector, dtype, device):
    """Every module gets accumulators (zero for a process without rows, or a module never reached), in
    the blocks' (parameter) order."""
    for b in blocks:
        if collector.mode == "factors":
            collector.A.setdefault(b.name, torch.zeros(b.in_dim, b.in_dim, dtype=dtype, device=device))
            collector.G.setdefault(b.name, torch.zeros(b.out_dim, b.out_dim, dtype=dtype, device=device))
        else:
            collector.eigenvalues.setdefault(
                b.name, torch.zeros(b.out_dim, b.in_dim, dtype=dtype, device=device)
            )
    for store in (collector.A, collector.G, collector.eigenvalues):
        ordered = {b.name: store[b.name] for b in blocks if b.name in store}
        store.clear()
        store.update(ordered)


def _losses(task, model, batch, normalization: str, targets: str, generator):
    """ℓ per example (B,), with the data's labels or with labels drawn from the model (`targets`)."""
    if targets == "empirical":
        return example_losses(task, model, batch, normalization)
    try:
        S, T = task.sampled_output_losses(task.outputs(model, batch), batch, generator)
    except NotImplementedError:
        raise ConfigurationError(
            f"K-FAC with sampled targets needs {type(task).__name__}.outputs and sampled_output_losses "
            "(labels drawn from the model's predictive distribution); use kfac_targets='empirical'."
        ) from None
    return S if normalization == "token" else S / T


def _run(collector, model, task, space, batches, normalization, targets, generator) -> None:
    with collector:
        for batch in batches:
            collector.mask = batch.get("attention_mask")
            losses = _losses(task, model, batch, normalization, targets, generator)
            torch.autograd.grad(losses.sum(), space.params, allow_unused=True)  # fires the output hooks


def fit_kfac_factors(
    model, task, space, batches, normalization: str, normaliser: float, processes, *,
    targets: str = "empirical", seed: int = 0, source: str = "pass",
) -> KFACFactors:  # fmt: skip
    """One pass over `batches` (this process's shard; summed over processes) at the current θ: K-FAC factors.

    Run it inside `computation_mode` (eval mode: no dropout). `normaliser` is the M of all the rows.
    """
    if targets not in TARGETS:
        raise ConfigurationError(f"kfac_targets must be one of {', '.join(TARGETS)}; got {targets!r}.")
    blocks, _ = linear_blocks(model, space)
    p = space.params[0]
    collector = FactorCollector(blocks)
    generator = torch.Generator(device=p.device).manual_seed(seed * 1000 + processes.index)
    _run(collector, model, task, space, batches, normalization, targets, generator)
    _zeros_for(blocks, collector, accumulation_dtype(p.dtype), p.device)
    collector.summed(processes)
    return KFACFactors(
        collector.A, collector.G, collector.positions, normalization=normalization, normaliser=normaliser,
        num_rows=batches.total_rows, targets=targets, source=source, seed=seed,
        parameters_digest=parameters_digest(space),
    )  # fmt: skip


def fit_ekfac_eigenvalues(
    factors: KFACFactors, model, task, space, batches, normalization: str, normaliser: float, processes, *,
    seed: int = 0,
) -> KFACFactors:  # fmt: skip
    """EK-FAC: a pass over `batches` at the current θ re-fitting the eigenvalues in the factors' eigenbasis.

    Uses the factors' own `targets` (empirical or sampled labels, fresh draws). Returns new factors with the
    same A, G and the eigen data; `normaliser` is the M of these rows (it replaces the factors' M, so the
    K-FAC part must come from the same M: it is rescaled by M_new/M_old when the rows differ).
    """
    blocks, _ = linear_blocks(model, space)
    factors.check_fits(blocks, normalization)
    p = space.params[0]
    bases = {}
    for b in blocks:
        _, U_A, _, U_G = kfac_eigenbasis(factors.A[b.name].to(p.device), factors.G[b.name].to(p.device))
        bases[b.name] = (U_A, U_G)
    collector = FactorCollector(blocks, mode="eigenvalues", eigenbases=bases)
    generator = torch.Generator(device=p.device).manual_seed(seed * 1000 + 500 + processes.index)
    _run(collector, model, task, space, batches, normalization, factors.targets, generator)
    _zeros_for(blocks, collector, accumulation_dtype(p.dtype), p.device)
    collector.summed(processes)
    # Both parts are stored as raw sums over their own rows; keep one M by rescaling the eigenvalue sums.
    scale = factors.normaliser / normaliser
    eigen = {n: (bases[n][0], bases[n][1], lam * scale) for n, lam in collector.eigenvalues.items()}
    info = {k: v for k, v in factors.info.items()}
    info["ekfac_rows"] = batches.total_rows
    info["ekfac_seed"] = seed
    return KFACFactors(factors.A, factors.G, factors.positions, eigen=eigen, **info)
