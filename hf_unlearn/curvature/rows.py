"""A count sketch of every training row's loss gradient at θ*: which rows a request interacts with.

`objective_estimate="sample"` estimates the kept rows on a sample of them. A random sample misses the few rows
that share the request's directions in parameter space — the other memorised records, the rows with the same
answer tokens — and those are the rows whose curvature holds the update back. The sketch finds them without a
pass over the training set per request: once per adapter, each row's gradient `g_i = ∇ℓ_i(θ*)` is hashed into
`k` buckets with random signs (a count sketch: `⟨S g_i, S v⟩` is an unbiased estimate of `⟨g_i, v⟩`), and a
request ranks the rows by `|⟨S g_i, S b⟩|`, the first-order change of row i's loss along the request's
gradient `b`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..gradients import WORK
from ..objective import example_losses

DEFAULT_BUCKETS = 1024


class RowGradientSketch:
    """`vectors[i] = S ∇ℓ_i(θ*)` for every training row i (rows × k), with S a seeded count sketch of ℝᴾ."""

    def __init__(self, vectors: torch.Tensor, num_params: int, seed: int):
        self.vectors, self.num_params, self.seed = vectors, num_params, seed
        generator = torch.Generator().manual_seed(seed)
        k = vectors.shape[1]
        self.buckets = torch.randint(k, (num_params,), generator=generator)  # (P,) bucket of each coordinate
        self.signs = torch.randint(2, (num_params,), generator=generator).to(vectors.dtype) * 2 - 1  # (P,) ±1

    @classmethod
    def compute(
        cls, model, task, space, rows, normalization, buckets=DEFAULT_BUCKETS, seed=0, progress=False
    ):
        """One forward and backward pass per row, at the model's current θ (θ*)."""
        empty = torch.zeros(0, buckets)
        sketch = cls(empty, space.numel, seed)
        out = []
        for row in tqdm(rows, desc="row gradient sketch", disable=not progress, leave=False):
            batch = {k: v.to(space.params[0].device) for k, v in task.collate([row]).items()}
            loss = example_losses(task, model, batch, normalization).sum()
            g = space.flatten(torch.autograd.grad(loss, space.params, materialize_grads=True))
            out.append(sketch.project(g))
            WORK.add("gradient", 1)
        sketch.vectors = torch.stack(out) if out else empty
        return sketch

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """S v: (P,) → (k,)."""
        v = v.detach().to("cpu", torch.float32)
        return torch.zeros(self.vectors.shape[1]).index_add_(0, self.buckets, self.signs.float() * v)

    def interacting(self, b: torch.Tensor, count: int, exclude: set[int]) -> list[int]:
        """The `count` rows (not in `exclude`) with the largest |⟨S g_i, S b⟩|, sorted by index."""
        scores = (self.vectors @ self.project(b)).abs()  # (rows,)
        if exclude:
            scores[list(exclude)] = -1.0
        count = min(count, len(scores) - len(exclude))
        return sorted(torch.topk(scores, count).indices.tolist()) if count > 0 else []
