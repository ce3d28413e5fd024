"""`L2RegularizationCallback`: train the objective the unlearning update models, `R(θ) + (μ/2)‖θ‖²`.

AdamW's `weight_decay` is decoupled from the loss, so an adapter trained with it minimises no objective an
influence update can step on. This callback adds `μθ` to the gradient of every trainable parameter just
before each optimiser step (after the Trainer's gradient clipping and accumulation), which is exactly the
gradient of `(μ/2)‖θ‖²` added to the loss; its minimiser is what `UnlearningArguments(l2_regularization=μ)`
unlearns against. The logged training loss does not include the term.

    trainer = Trainer(..., callbacks=[L2RegularizationCallback(0.01)])
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .errors import ConfigurationError


class L2RegularizationCallback(TrainerCallback):
    """Add `mu · θ` to the gradient of each trainable parameter before every optimiser step."""

    def __init__(self, mu: float):
        if not (math.isfinite(mu) and mu >= 0):
            raise ConfigurationError(f"l2_regularization must be a finite number ≥ 0, got {mu!r}.")
        self.mu = float(mu)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.mu:
            return
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.add_(p, alpha=self.mu)
