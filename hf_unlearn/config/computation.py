"""`ComputationArguments`: how the unlearning computation runs — batch size, precision, seed, progress bars."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import Concern, at_least, choice

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ComputationArguments(Concern):
    """Batching, precision, seed and progress output of the computation (none of them changes what is solved,
    beyond round-off and the seeded samples)."""

    HELP_GROUP = "computation — batches, precision, seed"

    batch_size: int = field(default=8, metadata={"help": "Rows per forward/backward pass."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the unlearning computation.", "choices": list(DTYPES)},
    )
    seed: int = field(default=0, metadata={"help": "Seed for curvature subsampling."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars on the main process."})

    def validate(self) -> None:
        at_least("batch_size", self.batch_size, 1)
        choice("dtype", self.dtype, DTYPES)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
