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
from ..gradients import WORK, LossContext
from ..objective import example_losses
from .kfac import TARGETS, KFACFactors, LinearBlock, kfac_eigenbasis, linear_blocks, parameters_digest


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Positions:
    """The positions of one batch: its attention mask (B, L) or None (every row of the input counts), the
    flat indices of the selected rows of a (B·L, ·) input, and the output-gradient weight of each row."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self.index = None if mask is None or bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
        self.example_weights: torch.Tensor | None = (
            None  # (B,) w_b, set before the backward reaches the layers
        )
        self._row_weights = {}
        self.grams = {}  # Σ a aᵀ of inputs shared by several layers (q/v lora_A read the same x): id -> (a, A)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, features): the selected positions of an input/gradient shaped (B, [L,] features)."""
        x = x.reshape(-1, x.shape[-1])
        return x if self.index is None else x.index_select(0, self.index)

    def row_weights(self, rows: int, dtype) -> torch.Tensor | None:
        """w_b repeated for each selected position of example b (an input of `rows` = B·L rows)."""
        w = self.example_weights
        if w is None:
            return None
        if rows not in self._row_weights:
            per_row = w.to(dtype).repeat_interleave(rows // len(w))
            self._row_weights[rows] = (per_row if self.index is None else per_row[self.index]).unsqueeze(1)
        return self._row_weights[rows]


class FactorCollector:
    """Context manager: hooks on the blocks' modules; sums in `A`, `G`, `positions` (or `eigenvalues`).

    Set `positions` (a `Positions`) before each batch's forward; the forward hooks pair it with the inputs
    they keep, so the backward hooks select the same positions and use the weights set on it meanwhile.
    """

    def __init__(self, blocks: list[LinearBlock], mode: str = "factors", eigenbases: dict | None = None):
        if mode not in ("factors", "eigenvalues"):
            raise ValueError(mode)
        self.blocks, self.mode, self.eigenbases = blocks, mode, eigenbases or {}
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {b.name: 0 for b in blocks}
        self.eigenvalues: dict[str, torch.Tensor] = {}
        self.batch = Positions(None)
        self.problem: str | None = None  # why the factors cannot be trusted (checked by the callers)
        self.require_weights = False  # the training capture: every batch must have its w_b set
        self.active = True
        self.seconds = 0.0  # time spent accumulating
        self._handles = []

    def set_mask(self, mask: torch.Tensor | None) -> Positions:
        self.batch = Positions(mask)
        return self.batch

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
            a, batch = inputs[0].detach(), self.batch
            if batch.mask is not None and tuple(batch.mask.shape) != tuple(a.shape[:2]):
                self.problem = (
                    f"the input of {block.name} has shape {tuple(a.shape)}, which does not line up with the "
                    f"batch's attention mask {tuple(batch.mask.shape)}: packed or reshaped sequences, or a layer "
                    "that sees only some positions, such as an adapted lm_head (the loss computes logits at the "
                    "loss positions only); K-FAC covers per-token layers, so leave lm_head out of the LoRA "
                    "targets or use curvature ggn/hessian"
                )
                return
            output.register_hook(lambda g: self._accumulate(block, a, g.detach(), batch))

        return hook

    @staticmethod
    def _augment(block: LinearBlock, a: torch.Tensor) -> torch.Tensor:
        """a' = a, [a, 1] (trainable bias: the homogeneous coordinate) or [1] (only the bias trainable)."""
        if block.weight is None:
            return a.new_ones(*a.shape[:-1], 1)
        if block.bias is not None:
            return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def _accumulate(self, block: LinearBlock, a, g, batch: Positions) -> None:
        if self.require_weights and batch.example_weights is None:
            self.problem = (
                f"the output gradient of {block.name} arrived before the loss scale was measured at the "
                "logits (the loss is not computed from the output embeddings' logits?)"
            )
            return
        start = time.perf_counter()
        if self.mode == "factors":
            self._accumulate_factors(block, a, g, batch)
        else:
            self._accumulate_eigenvalues(block, a, g, batch)
        self.seconds += time.perf_counter() - start

    def _accumulate_factors(self, block: LinearBlock, a, g, batch: Positions) -> None:
        n, dtype = block.name, accumulation_dtype(a.dtype)
        rows = a.numel() // a.shape[-1]
        g2 = batch.select(g).to(dtype)  # (K, out)
        w = batch.row_weights(rows, dtype)
        if w is not None:
            g2 = g2 * w  # ∂ℓ_b/∂s for the example b of each position
        kind = (id(a), block.weight is None, block.bias is not None)  # same input, same augmentation
        if kind in batch.grams and batch.grams[kind][0] is a:
            A = batch.grams[kind][1]
        else:
            a2 = self._augment(block, batch.select(a).to(dtype))  # (K, in')
            A = a2.T @ a2  # Σ a aᵀ  (in', in')
            batch.grams[kind] = (a, A)
        if n in self.A:
            self.A[n] += A
            self.G[n].addmm_(g2.T, g2)  # Σ g gᵀ  (out, out)
        else:
            self.A[n], self.G[n] = A.clone(), g2.T @ g2
        self.positions[n] += g2.shape[0]

    def _accumulate_eigenvalues(self, block: LinearBlock, a, g, batch: Positions) -> None:
        n, dtype = block.name, accumulation_dtype(a.dtype)
        a, g = self._augment(block, a.to(dtype)), g.to(dtype)
        if a.dim() == 2:  # (B, in): one position per example
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        elif a.dim() > 3:
            a, g = a.flatten(1, -2), g.flatten(1, -2)
        if batch.mask is not None:
            m = batch.mask.to(dtype).unsqueeze(-1)  # (B, L, 1)
            a, g = a * m, g * m
        if batch.example_weights is not None:
            g = g * batch.example_weights.to(dtype).view(-1, 1, 1)
        U_A, U_G = self.eigenbases[n]
        per_example = torch.einsum("blo,bli->boi", g, a)  # ∇_W ℓ_b = Σ_t g_{b,t} a_{b,t}ᵀ  (B, out, in')
        projected = U_G.T.to(dtype) @ per_example @ U_A.to(dtype)  # U_Gᵀ ∇_W ℓ_b U_A
        lam = projected.pow(2).sum(0)  # Σ_b (·)²  (out, in')
        self.eigenvalues[n] = lam if n not in self.eigenvalues else self.eigenvalues[n] + lam

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
    WORK.add("gradient", batches.total_rows)
    with collector:
        for batch in batches:
            collector.set_mask(batch.get("attention_mask"))
            losses = _losses(task, model, batch, normalization, targets, generator)
            torch.autograd.grad(losses.sum(), space.params, allow_unused=True)  # fires the output hooks
    if collector.problem:
        raise ConfigurationError(f"K-FAC: {collector.problem}.")


def fit_kfac_factors(
    loss: LossContext, batches, normalization: str, normaliser: float, *,
    targets: str = "empirical", seed: int = 0, source: str = "pass",
) -> KFACFactors:  # fmt: skip
    """One pass over `batches` (this process's shard; summed over processes) at the current θ: K-FAC factors
    of `loss` (its model, task, trainable parameters and processes).

    Run it inside `computation_mode` (eval mode: no dropout). `normaliser` is the M of all the rows.
    """
    model, task, space, processes = loss.model, loss.task, loss.space, loss.processes
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
    factors: KFACFactors, loss: LossContext, batches, normalization: str, normaliser: float, *, seed: int = 0
) -> KFACFactors:
    """EK-FAC: a pass over `batches` at the current θ re-fitting the eigenvalues in the factors' eigenbasis.

    Uses the factors' own `targets` (empirical or sampled labels, fresh draws). Returns new factors with the
    same A, G and the eigen data; `normaliser` is the M of these rows (it replaces the factors' M, so the
    K-FAC part must come from the same M: it is rescaled by M_new/M_old when the rows differ).
    """
    model, task, space, processes = loss.model, loss.task, loss.space, loss.processes
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
    return KFACFactors(factors.A, factors.G, factors.positions, **info).with_eigenvalues(eigen)
