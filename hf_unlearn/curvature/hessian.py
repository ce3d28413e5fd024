from __future__ import annotations

import torch

from ..objective import example_losses
from .base import CurvatureOperator


class HessianOperator(CurvatureOperator):
    """Exact Hessian-vector products `H v = ∇(∇R · v)` by double backward (Pearlmutter)."""

    name = "hessian"

    def batch_product(self, batch, vs):
        loss = example_losses(self.task, self.model, batch, self.normalization).sum() / self.normaliser
        grads = torch.autograd.grad(loss, self.space.params, create_graph=True, materialize_grads=True)
        dot = sum((g * u).sum() for g, u in zip(grads, vs))  # ∇R_batch · v
        return self.space.flatten(torch.autograd.grad(dot, self.space.params, materialize_grads=True))
