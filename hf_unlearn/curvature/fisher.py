from __future__ import annotations

import torch

from ..objective import example_losses
from .base import CurvatureOperator

CACHE_BYTES = 2**30  # keep this process's per-example gradients in memory up to 1 GiB


class FisherOperator(CurvatureOperator):
    """Empirical Fisher `F = (1/M) Σ_i g_i g_iᵀ`, `g_i = ∇ℓ(z_i)`, positive semi-definite.

    Per-example gradients come from one forward pass per batch and one backward pass per row. When this
    process's gradients `G` (rows × P) fit in `CACHE_BYTES` they are computed once and reused
    (`F v = Gᵀ(G v)/M`); otherwise every product recomputes them batch by batch. `gradient_matrix()` gathers
    all rows' gradients for the exact Woodbury solve (`solver="woodbury"`).
    """

    name = "fisher"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = None

    def per_example_gradients(self, batch) -> torch.Tensor:
        """(B, P): ∇ℓ(z) for each row of the batch, by a loop over rows sharing one forward pass."""
        losses = example_losses(self.task, self.model, batch, self.normalization)  # (B,)
        rows = []
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(
                losses[i], self.space.params, retain_graph=i + 1 < losses.shape[0], materialize_grads=True
            )
            rows.append(self.space.flatten(grads))
        return torch.stack(rows)

    def batch_product(self, batch, vs):
        G = self.per_example_gradients(batch)  # (B, P)
        return G.T @ (G @ self.space.flatten(vs)) / self.normaliser

    def _local_gradients(self) -> torch.Tensor | None:
        if self._local is None:
            p = self.space.params[0]
            if len(self.batches.rows) * self.size * p.element_size() > CACHE_BYTES:
                return None
            parts = [self.per_example_gradients(batch) for batch in self.batches]
            self._local = torch.cat(parts) if parts else p.new_zeros(0, self.size)
        return self._local

    def matvec(self, v):
        G = self._local_gradients()
        if G is None:
            return super().matvec(v)
        self.num_products += 1
        return self.processes.sum(G.T @ (G @ v) / self.normaliser)

    def gradient_matrix(self) -> torch.Tensor:
        """(n, P): every curvature row's ∇ℓ, in row order, gathered from all processes."""
        p = self.space.params[0]
        local = self._local
        if local is None:
            parts = [self.per_example_gradients(batch) for batch in self.batches]
            local = torch.cat(parts) if parts else p.new_zeros(0, self.size)
        full = p.new_zeros(self.batches.total_rows, self.size)
        full[self.batches.indices] = local
        return self.processes.sum(full)
