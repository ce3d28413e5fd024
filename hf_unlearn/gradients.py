"""Batched gradient sums of ℓ over a set of rows, sharded across processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .distributed import Processes
from .objective import UnlearningTask, example_losses
from .params import ParameterSpace


class WorkCounter:
    """Rows passed through the model, by kind of pass, across every process: `gradient` (forward and
    backward), `loss` (forward only), `product:<curvature>` (one curvature-vector product's share of a row).
    The machine-independent cost of a run: `unlearn` records the difference over its run in its stats."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def add(self, kind: str, rows: int) -> None:
        self.rows[kind] = self.rows.get(kind, 0) + int(rows)

    def snapshot(self) -> dict[str, int]:
        return dict(self.rows)

    def since(self, snapshot: dict[str, int]) -> dict[str, int]:
        return {k: v - snapshot.get(k, 0) for k, v in self.rows.items() if v - snapshot.get(k, 0)}


WORK = WorkCounter()


@dataclass(frozen=True)
class LossContext:
    """What a pass over rows differentiates: the loss of `model` under `task` in its trainable parameters
    (`space`), summed over `processes` — the arguments that travel together into the gradient, K-FAC and
    curvature passes."""

    model: torch.nn.Module
    task: UnlearningTask
    space: ParameterSpace
    processes: Processes


class Batches:
    """This process's shard of `rows`, collated once into device tensors and reused on every pass."""

    def __init__(
        self, task: UnlearningTask, rows: Sequence[Mapping], batch_size: int, device, processes: Processes
    ):
        shard = processes.shard(list(range(len(rows))))
        self.task, self.device, self.processes = task, device, processes
        self.indices = shard  # global row indices of this process's shard
        self.rows = [rows[j] for j in shard]
        self.total_rows = len(rows)
        self.batches = [
            {k: v.to(device) for k, v in task.collate([rows[j] for j in shard[i : i + batch_size]]).items()}
            for i in range(0, len(shard), batch_size)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)

    def sample(self, size: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor] | None, float]:
        """A random mini-batch of this shard's rows (without replacement) and its rescaling factor.

        Every process draws `size / count` rows (rounded up, at most its shard); the factor
        `len(shard) / drawn` makes the sum over processes of `factor × Σ_drawn` unbiased for `Σ_all`.
        Returns `(None, 0.0)` when this process holds no rows.
        """
        if not self.rows:
            return None, 0.0
        drawn = min(len(self.rows), max(1, -(-size // self.processes.count)))
        chosen = torch.randperm(len(self.rows), generator=generator)[:drawn].tolist()
        batch = {k: v.to(self.device) for k, v in self.task.collate([self.rows[j] for j in chosen]).items()}
        return batch, len(self.rows) / drawn


def gradient_sum(
    model: torch.nn.Module,
    task: UnlearningTask,
    space: ParameterSpace,
    batches: Batches,
    normalization: str,
    processes: Processes,
    desc: str | None = None,
) -> torch.Tensor:
    """Σ_z ∇θ ℓ(z; θ) over every row of `batches` on every process, as a flat (P,) vector."""
    total = torch.zeros(space.numel, dtype=space.params[0].dtype, device=space.params[0].device)
    WORK.add("gradient", batches.total_rows)
    for batch in tqdm(batches, desc=desc, disable=desc is None or not processes.is_main, leave=False):
        loss = example_losses(task, model, batch, normalization).sum()  # Σ_batch ℓ
        total += space.flatten(torch.autograd.grad(loss, space.params, materialize_grads=True))
    return processes.sum(total)


@torch.no_grad()
def loss_sum(
    model, task: UnlearningTask, batches: Batches, normalization: str, processes: Processes
) -> float:
    """Σ_z ℓ(z; θ) over every row of `batches` on every process."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    WORK.add("loss", batches.total_rows)
    for batch in batches:
        total += example_losses(task, model, batch, normalization).sum()
    return processes.sum(total).item()
