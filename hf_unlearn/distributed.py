"""Data-parallel sums across processes (DESIGN §4): each process owns a shard, results are summed."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Processes:
    """Rank, world size and an explicit sum over processes; a no-op in a single process."""

    def __init__(self):
        if dist.is_available() and dist.is_initialized():
            self.index, self.count = dist.get_rank(), dist.get_world_size()
        else:
            self.index, self.count = 0, 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This process's share of `indices` (strided, so shards differ in size by at most one)."""
        return indices[self.index :: self.count]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.count > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
