"""`CurvatureArguments`: the curvature operator C — which matrix, on which rows, and the K-FAC factors or
Nyström sketch it (or CG's preconditioner) is built from."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..curvature import CURVATURE_OPERATORS, KFAC_OPERATORS
from ..curvature.kfac import TARGETS as KFAC_TARGETS
from ..errors import ConfigurationError
from .checks import Concern, at_least, choice

# One registry each: the operators of hf_unlearn.curvature, the K-FAC pass's targets of curvature/kfac.py
CURVATURES = (*CURVATURE_OPERATORS, *KFAC_OPERATORS)
KFAC_CURVATURES = tuple(KFAC_OPERATORS)
PRECONDITIONERS = ("none", *KFAC_CURVATURES, "nystrom")
CURVATURE_DATA = ("auto", "edited", "original")


@dataclass
class CurvatureArguments(Concern):
    """The curvature operator C, the rows it is taken on, and where K-FAC factors or a Nyström sketch come from."""

    HELP_GROUP = "curvature — the operator C and its preconditioner"

    curvature: str = field(
        default="ggn",
        metadata={
            "help": "Curvature operator C: hessian (exact, double backward), ggn (generalised Gauss–Newton, "
            "PSD, first-order passes only), fisher (empirical Fisher from per-example gradients, PSD), kfac "
            "(Kronecker-factored blocks of the trainable Linear layers, from saved/captured factors or one "
            "pass; products and the damped block inverse need no data pass; --solver direct inverts it "
            "exactly at any size), ekfac (K-FAC eigenbasis with eigenvalues refitted by one pass over "
            "per-example gradients).",
            "choices": list(CURVATURES),
        },
    )
    curvature_data: str = field(
        default="auto",
        metadata={
            "help": "Rows the curvature C is taken on: 'edited' (the kept rows plus the new versions: the "
            "Hessian of the objective retraining minimises, so the update is a Newton step on it, exact when "
            "the loss is quadratic), 'original' (the training set as the adapter saw it, as in the LLMEraser "
            "paper: exact only to first order in the request size) or 'auto' (edited, except original for "
            "kfac/ekfac, whose factors describe the training run).",
            "choices": list(CURVATURE_DATA),
        },
    )
    hessian_samples: int | None = field(
        default=None,
        metadata={
            "help": "Estimate the curvature on a seeded random subset of this many training rows (default: all), "
            "with the request applied to it when the curvature is of the edited rows: the same rows for every "
            "request, and those of a Nyström sketch with as many --curvature-samples."
        },
    )
    preconditioner: str = field(
        default="none",
        metadata={
            "help": "cg only: precondition with the damped K-FAC (kfac) or EK-FAC (ekfac) block inverse, "
            "(C_kfac + λI)⁻¹, or with a randomized Nyström approximation of rank --nystrom-rank of the "
            "training set's --curvature (nystrom; downdated by the request rows so that it fits the edited "
            "curvature), while the products stay those of --curvature (e.g. exact hessian/ggn on "
            "--hessian-samples rows). The factors or the sketch come from --curvature-factors.",
            "choices": list(PRECONDITIONERS),
        },
    )
    curvature_factors: str = field(
        default="auto",
        metadata={
            "help": "Where K-FAC factors (curvature kfac/ekfac or a preconditioner) or the Nyström sketch come "
            "from: a directory with curvature_factors.safetensors/.json (saved beside an adapter by capture "
            "during training) or nystrom_sketch.safetensors/.json (saved beside every adapter unlearned with "
            "--preconditioner nystrom), 'pass' (one pass over --curvature-samples training rows at the "
            "adapter's weights; a sketch costs --nystrom-rank curvature products), or 'auto' (factors or "
            "sketch passed in or captured by the trainer; hf-unlearn unlearn: the adapter directory's if it "
            "has them; otherwise 'pass'). The manifest records which was used and its digest."
        },
    )
    curvature_samples: int | None = field(
        default=None,
        metadata={
            "help": "Rows (seeded random subset) of the pass that computes K-FAC factors, refits EK-FAC "
            "eigenvalues or sketches the curvature for the Nyström preconditioner (default: all)."
        },
    )
    nystrom_rank: int = field(
        default=100,
        metadata={
            "help": "Columns of the Nyström sketch (--preconditioner nystrom): curvature products spent once "
            "per adapter; CG then converges as if the top nystrom_rank eigenvalues were flattened."
        },
    )
    kfac_targets: str | None = field(
        default=None,
        metadata={
            "help": "Output gradients of the K-FAC pass: 'empirical' (the data's labels: a factor of the "
            "empirical Fisher; what capture during training records) or 'sampled' (labels drawn from the "
            "model, one per position: a factor of the Gauss–Newton matrix / true Fisher). Default: those of "
            "saved or captured factors, else 'empirical'; factors with other targets are refused.",
            "choices": list(KFAC_TARGETS),
        },
    )

    def validate(self) -> None:
        choice("curvature", self.curvature, CURVATURES)
        choice("curvature_data", self.curvature_data, CURVATURE_DATA)
        at_least("hessian_samples", self.hessian_samples, 1, unset="the whole training set")
        choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.preconditioner == "nystrom" and self.curvature in KFAC_CURVATURES:
            raise ConfigurationError(
                f"preconditioner 'nystrom' sketches an exact curvature (hessian, ggn, fisher); curvature "
                f"{self.curvature!r} is solved directly: use solver 'direct'."
            )
        at_least("curvature_samples", self.curvature_samples, 1, unset="all rows")
        at_least("nystrom_rank", self.nystrom_rank, 1)
        if self.kfac_targets is not None:
            choice("kfac_targets", self.kfac_targets, KFAC_TARGETS)

    @property
    def curvature_on_edited(self) -> bool:
        """Whether C is taken on the edited rows (see `curvature_data`)."""
        if self.curvature_data == "auto":
            return self.curvature not in KFAC_CURVATURES
        return self.curvature_data == "edited"
