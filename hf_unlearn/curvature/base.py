from __future__ import annotations

import torch

from ..distributed import Processes
from ..gradients import Batches
from ..objective import UnlearningTask
from ..params import ParameterSpace


class CurvatureOperator:
    """`C = ∇²-like matrix of R(θ) = (1/M) Σ ℓ` at the current θ, applied matrix-free.

    `batches` is this process's shard of the curvature rows; `normaliser` is their `M`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: UnlearningTask,
        space: ParameterSpace,
        batches: Batches,
        normalization: str,
        normaliser: float,
        processes: Processes,
    ):
        self.model, self.task, self.space, self.batches = model, task, space, batches
        self.normalization, self.normaliser, self.processes = normalization, normaliser, processes
        self.num_products = 0

    @property
    def size(self) -> int:
        return self.space.numel

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C v for a flat (P,) vector; summed over every process."""
        raise NotImplementedError
