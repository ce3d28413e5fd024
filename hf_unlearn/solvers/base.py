from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class SolverStats:
    """What a solve did; `relative_residual` is ‖(C+λI)x − rhs‖ / ‖rhs‖ as the solver last measured it."""

    solver: str
    iterations: int
    relative_residual: float
    converged: bool
    seconds: float = 0.0
    curvature_products: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def suggest_damping(damping: float, smallest_curvature: float) -> float:
    """A damping that should make `C + λI` positive definite, rounded up to one significant figure.

    `smallest_curvature` is an upper bound on the smallest eigenvalue of `C` that was observed.
    """
    need = max(10 * damping, -2 * smallest_curvature, 1e-6)
    scale = 10.0 ** math.floor(math.log10(need))
    return float(f"{math.ceil(need / scale - 1e-9) * scale:.6g}")
