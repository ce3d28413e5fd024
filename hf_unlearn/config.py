"""`UnlearningArguments`: every knob of an unlearning run, named like its command-line flag."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .errors import ConfigurationError

SOLVERS = ("cg", "direct", "woodbury")
CURVATURES = ("hessian", "ggn", "fisher")
LOSS_NORMALIZATIONS = ("token", "example")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class UnlearningArguments:
    """How to compute the LLMEraser update `Δθ = −(C + λI)⁻¹ b` (see DESIGN.md §2–3).

    Field names mirror the `hf-unlearn unlearn` flags: `max_iter` is `--max-iter`, and so on.
    """

    solver: str = field(
        default="cg",
        metadata={
            "help": "Linear solver for (C + λI) x = −b: cg (conjugate gradient), direct (dense Cholesky, small "
            "models only), woodbury (exact, curvature fisher only).",
            "choices": list(SOLVERS),
        },
    )
    curvature: str = field(
        default="hessian",
        metadata={
            "help": "Curvature operator C: hessian (exact, double backward), ggn (generalised Gauss–Newton, "
            "PSD, first-order passes only), fisher (empirical Fisher from per-example gradients, PSD).",
            "choices": list(CURVATURES),
        },
    )
    damping: float = field(
        default=0.1,
        metadata={"help": "λ ≥ 0 added to the curvature; makes a non-convex LoRA Hessian positive definite."},
    )
    tol: float = field(
        default=1e-6, metadata={"help": "Relative residual at which the iterative solver stops."}
    )
    max_iter: int = field(default=200, metadata={"help": "Maximum number of solver iterations."})
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "How the training loss was normalised: 'token' (sum over all loss tokens / their number, "
            "the HF Trainer default) or 'example' (mean over examples of each example's token mean).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    hessian_samples: int | None = field(
        default=None,
        metadata={
            "help": "Estimate the curvature on a seeded random subset of this many training rows (default: all)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward/backward pass."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the unlearning computation.", "choices": list(DTYPES)},
    )
    seed: int = field(default=0, metadata={"help": "Seed for curvature subsampling."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars on the main process."})

    def __post_init__(self):
        _choice("solver", self.solver, SOLVERS)
        _choice("curvature", self.curvature, CURVATURES)
        if self.solver == "woodbury" and self.curvature != "fisher":
            raise ConfigurationError(
                "solver 'woodbury' is the exact solve of the empirical Fisher: use it with curvature 'fisher'."
            )
        _choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        _choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.damping, (int, float)) or not math.isfinite(self.damping) or self.damping < 0:
            raise ConfigurationError(f"damping must be a finite number ≥ 0, got {self.damping!r}.")
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise ConfigurationError(f"tol must be a positive number, got {self.tol!r}.")
        for name in ("max_iter", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigurationError(f"{name} must be ≥ 1, got {getattr(self, name)!r}.")
        if self.hessian_samples is not None and self.hessian_samples < 1:
            raise ConfigurationError(
                f"hessian_samples must be ≥ 1 (or unset for the whole training set), got {self.hessian_samples!r}."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
