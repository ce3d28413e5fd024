"""What one `unlearn` call did, as typed records (`UnlearningResult.stats`).

`UnlearningStats` is also a read-only mapping whose keys and values are those the manifest's `solver` entry
serialises (`to_dict`), so `result.stats["damping"]` and `dict(result.stats)` read it as before; the phases'
own records (`curvature`, `damping_choice`, `solution`) are the fragments each phase wrote, by manifest key.
The fields are documented in docs/formats.md (the manifest).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .solvers.base import SolverStats

FORGET_LOSS_DEFINITION = (
    "cross-entropy per loss token over the old versions (token-weighted mean, as hf-unlearn evaluate)"
)


@dataclass(frozen=True)
class ForgetCheck:
    """The request's old versions' loss per token before and after Δθ, and its first-order prediction
    (∇·Δθ; None without token normalisation)."""

    before: float
    after: float
    predicted_change: float | None

    def to_dict(self) -> dict:
        return {
            "forget_loss_before": self.before,
            "forget_loss_after": self.after,
            "forget_loss_change_predicted": self.predicted_change,
            "forget_loss_change_measured": self.after - self.before,
            "forget_loss_definition": FORGET_LOSS_DEFINITION,
        }


@dataclass(frozen=True)
class RetainCheck:
    """The kept rows' loss per token before and after Δθ on a sample of `rows`, and the warning given when it
    rose by more than `eraser.RETAIN_RISE_WARNING`."""

    rows: int
    loss_before: float
    loss_after: float
    warning: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sizes:
    """The problem's sizes: parameters, the normaliser M, training rows, the rows the curvature runs over,
    processes."""

    num_params: int
    normaliser: float
    num_train: int
    num_curvature_rows: int
    num_processes: int


@dataclass(frozen=True)
class UnlearningStats(Mapping[str, Any]):
    """The records of one `unlearn` call: the kept solve's statistics, the forget-set and kept-rows checks,
    the problem's sizes, the damping and μ used, the rows through the model by kind of pass (`work_rows`),
    ‖b‖ and ‖Δθ‖, and each phase's own record (`curvature`: where factors, sketch and objective estimate came
    from; `damping_choice`: the `auto` rule's record; `solution`: refinement, kept-rows guard, retries)."""

    solver: SolverStats
    inexact: bool
    forget: ForgetCheck
    retain: RetainCheck
    sizes: Sizes
    b_norm: float
    damping: float
    l2_regularization: float
    work_rows: dict[str, float]
    delta_norm: float
    curvature: dict = field(default_factory=dict)
    damping_choice: dict = field(default_factory=dict)
    solution: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The flat record the manifest's `solver` entry is made from (`io.published_stats`)."""
        s = self.sizes
        return (
            self.solver.to_dict()
            | {"inexact": self.inexact}
            | self.forget.to_dict()
            | {
                "retain_check": self.retain.to_dict(),
                "num_params": s.num_params,
                "normaliser": s.normaliser,
                "num_train": s.num_train,
                "num_curvature_rows": s.num_curvature_rows,
                "b_norm": self.b_norm,
                "num_processes": s.num_processes,
                "damping": self.damping,
                "l2_regularization": self.l2_regularization,
                # rows through the model, by kind of pass (this process's count of every process's rows)
                "work_rows": self.work_rows,
            }
            | self.curvature
            | self.damping_choice
            | self.solution
            | {"delta_norm": self.delta_norm}
        )

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
