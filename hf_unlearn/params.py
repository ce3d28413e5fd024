"""The trainable parameters θ (LoRA A/B and any module the user made trainable) as one flat vector."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigurationError


class ParameterSpace:
    """The parameters that require grad, in `named_parameters()` order, flattened to a vector of size P."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigurationError(
                "The model has no trainable parameters. Load the adapter with "
                "PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)."
            )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.numel = sum(p.numel() for p in self.params)

    def flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])  # (P,)

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        return [
            chunk.view_as(p) for chunk, p in zip(vector.split([p.numel() for p in self.params]), self.params)
        ]

    def vector(self) -> torch.Tensor:
        return self.flatten([p.detach() for p in self.params])

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> None:
        """θ ← θ + Δθ, in each parameter's own dtype."""
        for p, d in zip(self.params, self.unflatten(delta)):
            p.add_(d.to(p.dtype))

    @torch.no_grad()
    def set_(self, vector: torch.Tensor) -> None:
        """θ ← vector, in each parameter's own dtype."""
        for p, d in zip(self.params, self.unflatten(vector)):
            p.copy_(d.to(p.dtype))

    def as_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, (t.detach().clone() for t in self.unflatten(vector))))


@contextlib.contextmanager
def computation_mode(model: torch.nn.Module, dtype: torch.dtype):
    """Eval mode (no dropout), every floating tensor in `dtype`, and attention with a double backward.

    Restores the training flag and each tensor's original dtype on exit.
    """
    was_training = model.training
    originals = {}
    try:  # a conversion that fails part-way (out of memory) is undone too
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                originals[name] = (t, t.dtype)
                t.data = t.data.to(dtype)
        model.eval()
        # CPU SDPA has no double backward: force the math kernel (docs/curvature-and-solvers.md).
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            yield
    finally:
        for t, orig in originals.values():
            t.data = t.data.to(orig)
        model.train(was_training)
