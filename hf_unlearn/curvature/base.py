from __future__ import annotations

import torch

from ..distributed import Processes
from ..gradients import WORK, Batches
from ..objective import UnlearningTask
from ..params import ParameterSpace


class CurvatureOperator:
    """`C = ∇²-like matrix of R(θ) = (1/M) Σ ℓ` at the current θ, applied matrix-free.

    `batches` is this process's shard of the curvature rows; `normaliser` is their `M`. Subclasses implement
    `batch_product`, the contribution `(1/M) Σ_{z ∈ batch} C_z v` of one batch; `matvec` sums it over every
    batch and process, `sample_matvec` over a random mini-batch rescaled to the full sum.
    """

    name = "curvature"

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
        self.num_products = 0  # full-data products
        self.num_sample_products = 0  # mini-batch products

    @property
    def size(self) -> int:
        return self.space.numel

    def batch_product(self, batch, vs: list[torch.Tensor]) -> torch.Tensor:
        """`(1/M) Σ_{z ∈ batch} C_z v` as a flat (P,) vector; `vs` is v split like the parameters."""
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C v for a flat (P,) vector; summed over every process."""
        vs = self.space.unflatten(v)
        out = torch.zeros_like(v)
        for batch in self.batches:
            out += self.batch_product(batch, vs)
        self.num_products += 1
        WORK.add(f"product:{self.name}", self.batches.total_rows)
        return self.processes.sum(out)

    def sample_matvec(self, v: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        """An unbiased mini-batch estimate of C v from about `size` random curvature rows (all processes).

        The rows are drawn without replacement with `generator` (seed it identically on every process run
        to reproduce a solve); the sum over them is rescaled by (rows held / rows drawn) per process, so that
        its expectation is exactly `C v` with the full normaliser `M`.
        """
        batch, scale = self.batches.sample(size, generator)
        out = (
            torch.zeros_like(v)
            if batch is None
            else scale * self.batch_product(batch, self.space.unflatten(v))
        )
        self.num_sample_products += 1
        return self.processes.sum(out)
