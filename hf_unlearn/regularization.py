"""`L2RegularizationCallback`: train the objective the unlearning update models, `R(θ) + (μ/2)‖θ‖²`.

AdamW's `weight_decay` is decoupled from the loss, so an adapter trained with it minimises no objective an
influence update can step on. This callback adds `μθ` to the gradient of every trainable parameter just
before each optimiser step (after gradient accumulation), which is the gradient of `(μ/2)‖θ‖²` added to the
loss; its minimiser is what `UnlearningArguments(l2_regularization=μ)` unlearns against.

Gradient clipping must see that sum: clipping the data gradient alone and adding `μθ` afterwards stops
training where `clip(∇R) = −μθ`, which is not a stationary point of the objective once `‖∇R‖` exceeds the
clipping norm there. So the callback clips itself: for the run it sets the Trainer's `max_grad_norm` to 0
and clips `∇R + μθ` to the original norm, then restores `max_grad_norm` when training ends (a run that
raises leaves it at 0 in `args` until this callback's next run ends: set it back if you reuse `args`
elsewhere). The logged training loss and gradient norm do not include the term.

    trainer = Trainer(..., callbacks=[L2RegularizationCallback(0.01)])
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .errors import ConfigurationError


class L2RegularizationCallback(TrainerCallback):
    """Add `mu · θ` to the gradient of each trainable parameter before every optimiser step, and clip the
    sum to the Trainer's `max_grad_norm` (single process or DDP)."""

    def __init__(self, mu: float):
        if not (math.isfinite(mu) and mu >= 0):
            raise ConfigurationError(f"l2_regularization must be a finite number ≥ 0, got {mu!r}.")
        self.mu = float(mu)
        self.max_grad_norm = None  # the clipping norm taken over from the Trainer for this run

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.mu:
            return
        if args.deepspeed:  # the engine steps inside backward(), before on_pre_optimizer_step could add μθ
            raise ConfigurationError(
                "L2RegularizationCallback cannot add μθ under DeepSpeed, whose engine takes the optimiser step "
                "inside backward(); train without DeepSpeed (DDP works), or without the L2 term."
            )
        if not (args.max_grad_norm and args.max_grad_norm > 0):
            return
        if args.fsdp:
            raise ConfigurationError(
                "L2RegularizationCallback clips the regularised gradient itself, which it cannot do under "
                "FSDP; set max_grad_norm=0 (no clipping) to use it there."
            )
        self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def on_train_end(self, args, state, control, **kwargs):
        if self.max_grad_norm is not None:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, None

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.mu:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        for p in params:
            p.grad.add_(p, alpha=self.mu)  # ∇[R + (μ/2)‖θ‖²] = ∇R + μθ
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
