from __future__ import annotations

import torch

from ..errors import ConfigurationError
from ..objective import UnlearningTask
from .base import CurvatureOperator


class GaussNewtonOperator(CurvatureOperator):
    """Generalised Gauss–Newton `G v = (1/M) Σ_z J_zᵀ H_out(z) J_z v`, positive semi-definite.

    `J_z` is the Jacobian of the network output (the logits, from `task.outputs`) with respect to the
    trainable parameters and `H_out` the Hessian of the loss with respect to that output
    (`task.output_hessian_product`; for causal-LM cross entropy `diag(p) − ppᵀ` per loss token). No
    second derivative of the network is taken: `J v` comes from the "double-backward trick" — the vector-
    Jacobian product `u ↦ Jᵀu` is linear in `u`, so differentiating it with respect to `u` along `v` gives
    `J v` — and `Jᵀ(H_out J v)` is one more ordinary backward pass.
    """

    name = "ggn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.task).outputs is UnlearningTask.outputs:
            raise ConfigurationError(
                f"curvature 'ggn' needs the task to expose its network output: {type(self.task).__name__} does "
                "not implement UnlearningTask.outputs / output_losses. Implement them, or use --curvature "
                "hessian or fisher."
            )

    def batch_product(self, batch, vs):
        params = self.space.params
        z = self.task.outputs(self.model, batch)  # (B, ...)
        u = torch.zeros_like(z, requires_grad=True)
        vjp = torch.autograd.grad(z, params, grad_outputs=u, create_graph=True, allow_unused=True)  # Jᵀu
        pairs = [(g, w) for g, w in zip(vjp, vs) if g is not None and g.requires_grad]
        if pairs:
            (jv,) = torch.autograd.grad(
                [g for g, _ in pairs], u, grad_outputs=[w for _, w in pairs], retain_graph=True
            )  # J v, shaped like z
        else:
            jv = torch.zeros_like(z)
        hjv = self.task.output_hessian_product(z, jv.detach(), batch, self.normalization)  # H_out J v
        out = torch.autograd.grad(
            z, params, grad_outputs=hjv.detach(), materialize_grads=True
        )  # Jᵀ H_out J v
        return self.space.flatten(out) / self.normaliser
