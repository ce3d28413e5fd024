"""Randomized Nyström preconditioner for CG (Frangella, Tropp & Udell 2023), amortised over requests.

A sketch `Y = C Q` of the curvature of the *training set* (Q: P × s with orthonormal columns, s products)
is computed once per adapter and kept beside it. It gives the rank-s approximation

    Ĉ = Y (Qᵀ Y)⁺ Yᵀ = U diag(Λ) Uᵀ,

and the preconditioner

    P⁻¹ = U diag((Λ_s + λ) / (Λ + λ)) Uᵀ + (I − U Uᵀ)         (λ: the solve's damping)

which maps the top s eigenvalues of `C + λI` to about `Λ_s + λ`, so CG needs iterations for the
condition number `(Λ_s + λ)/λ` instead of `(Λ_1 + λ)/λ`.

Each request solves on the *edited* curvature `C' = C − (1/M)(Σ C_old − Σ C_new)`; where a removed row is
stiff, a preconditioner of C alone shrinks directions C' no longer has and CG gets slower than without it.
`downdate` makes the sketch exact for C' by the same linearity: `C'Q = Y − D Q` with `D` the request rows'
curvature, s products over the 2k request rows only (cheap when k ≪ n). The downdated sketch belongs to the
edited training set, i.e. to the next request. A sketch of a sample of the training rows records the rows'
keyed digests (`request.row_digest`: saved beside the adapter, they must not let anyone test guesses of a
row's content) and its normaliser, and is downdated by the request rows in the sample only: it is then the sketch of
the edited sample, which is what a solve with as many `hessian_samples` (same seed) multiplies by.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigurationError
from ..request import DIGEST_PREFIX
from .files import files_exist, load_tensors, save_tensors

SKETCH_FILE = "nystrom_sketch.safetensors"
SKETCH_META = "nystrom_sketch.json"
SKETCH_FORMAT = "hf_unlearn.nystrom_sketch/1"
FILES = (SKETCH_FILE, SKETCH_META)


@dataclass
class NystromSketch:
    """`Y = C Q` for a test matrix `Q` (P, s) with orthonormal columns, and how it was made (`info`)."""

    test_matrix: torch.Tensor  # Q (P, s)
    products: torch.Tensor  # Y = C Q (P, s)
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.test_matrix.shape[1]

    @property
    def size(self) -> int:
        return self.test_matrix.shape[0]

    @classmethod
    def compute(cls, operator, rank: int, seed: int = 0, progress: bool = False, **info) -> NystromSketch:
        """Sketch `operator` (a curvature operator: `matvec` and `size`) with `rank` products; `info` (e.g.
        `curvature="ggn"`, which a solve checks against its own) is recorded."""
        if not 1 <= rank <= operator.size:
            raise ConfigurationError(
                f"nystrom_rank must be between 1 and the number of trainable parameters ({operator.size}), "
                f"got {rank}."
            )
        generator = torch.Generator().manual_seed(seed)
        omega = torch.randn(operator.size, rank, generator=generator, dtype=torch.float64)
        Q = torch.linalg.qr(omega).Q.to(**_placement(operator))  # (P, s)
        Y = torch.empty_like(Q)
        start = time.perf_counter()
        for i in tqdm(range(rank), desc="nystrom sketch", disable=not progress, leave=False):
            Y[:, i] = operator.matvec(Q[:, i])
        info = {"rank": rank, "seed": seed, "seconds": time.perf_counter() - start, **info}
        return cls(Q, Y, info)

    def downdate(self, removed, added=None, progress: bool = False) -> NystromSketch:
        """The sketch of `C − removed + added` with the same Q (`removed`/`added`: operators over the old and
        new versions of the request rows, normalised like C)."""
        Y = self.products.clone()
        start = time.perf_counter()
        for i in tqdm(range(self.rank), desc="nystrom downdate", disable=not progress, leave=False):
            q = self.test_matrix[:, i]
            Y[:, i] -= removed.matvec(q)
            if added is not None:
                Y[:, i] += added.matvec(q)
        downdates = self.info.get("downdates", 0) + 1
        info = {**self.info, "downdates": downdates, "downdate_seconds": time.perf_counter() - start}
        return NystromSketch(self.test_matrix, Y, info)

    def to(self, dtype: torch.dtype, device=None) -> NystromSketch:
        """The same sketch in `dtype` on `device` (e.g. saved by a float32 run, used in a float64 one)."""
        return NystromSketch(
            self.test_matrix.to(dtype=dtype, device=device),
            self.products.to(dtype=dtype, device=device),
            self.info,
        )

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.test_matrix, self.products):
            h.update(t.detach().to(torch.float64).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        """What the manifest records (no tensors, and not the sampled rows' digests)."""
        info = {k: v for k, v in self.info.items() if k != "row_digests"}
        return {**info, "num_params": self.size, "digest": self.digest()}

    # --- files ---

    def save(self, directory: str | Path) -> Path:
        """Write `nystrom_sketch.safetensors` and `nystrom_sketch.json` into `directory`."""
        tensors = {"test_matrix": self.test_matrix, "products": self.products}
        meta = {"format": SKETCH_FORMAT, **self.describe()}
        if "row_digests" in self.info:  # a sampled sketch: which rows, for the next request's downdate
            if not all(d.startswith(DIGEST_PREFIX) for d in self.info["row_digests"]):
                raise ConfigurationError(
                    "the Nyström sketch's row digests are not keyed (request.row_digest): they would let anyone "
                    "test guesses of the rows' content; sketch again (--curvature-factors pass)."
                )
            meta["row_digests"] = self.info["row_digests"]
        return save_tensors(directory, FILES, tensors, meta)

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return files_exist(directory, FILES)

    @classmethod
    def load(cls, directory: str | Path) -> NystromSketch:
        """Read a sketch written by `save` (safetensors only; the JSON digest must match the tensors)."""
        d = Path(directory)
        tensors, meta = load_tensors(
            d, FILES, SKETCH_FORMAT, "Nyström sketch",
            "An unlearning run with --preconditioner nystrom writes one beside its output adapter; "
            "or use --curvature-factors pass to sketch the curvature in this run.",
        )  # fmt: skip
        info = {
            k: v for k, v in meta.items() if k not in ("format", "hf_unlearn_version", "num_params", "digest")
        }
        sketch = cls(tensors["test_matrix"], tensors["products"], info)
        if meta.get("digest") != sketch.digest():
            raise ConfigurationError(f"{d / SKETCH_FILE} does not match the digest in {SKETCH_META}.")
        return sketch


class NystromPreconditioner:
    """`P⁻¹ r` from a sketch (module docstring): applied with `solve_damped(r, λ)` inside CG.

    The factorisation is computed in float64 from `Y` shifted by a tiny `ν Q` for stability; eigenvalues of
    `Qᵀ Y` that are not positive (a downdated sketch of a sampled C need not be PSD) are dropped, so P is
    always symmetric positive definite.
    """

    name = "nystrom"

    def __init__(self, sketch: NystromSketch):
        Q, Y = sketch.test_matrix.double(), sketch.products.double()
        nu = torch.finfo(torch.float64).eps * max(Y.norm().item(), 1.0) * Q.shape[0] ** 0.5
        Y = Y + nu * Q
        B = Q.T @ Y
        w, V = torch.linalg.eigh((B + B.T) / 2)  # (s,), (s, s)
        keep = w > w.max().clamp_min(0) * 1e-12
        if not keep.any():
            raise ConfigurationError("the Nyström sketch has no positive curvature: it cannot precondition.")
        F = Y @ (V[:, keep] / w[keep].sqrt())  # Ĉ + νQQᵀ-part = F Fᵀ,  (P, s')
        U, S, _ = torch.linalg.svd(F, full_matrices=False)
        self.U = U  # (P, s')
        self.eigenvalues = (S**2 - nu).clamp_min(0)  # Λ, descending
        self.rank = int(keep.sum())

    def solve_damped(self, r: torch.Tensor, damping: float) -> torch.Tensor:
        # P⁻¹ r = U diag((Λ_s + λ)/(Λ + λ)) Uᵀ r + (r − U Uᵀ r)
        r64 = r.double()
        Ur = self.U.T @ r64
        if self.eigenvalues[-1] + damping <= 0:
            raise ConfigurationError(
                "the Nyström preconditioner needs damping > 0 when the sketch's smallest kept eigenvalue is 0."
            )
        scale = (self.eigenvalues[-1] + damping) / (self.eigenvalues + damping)
        return (self.U @ (Ur * (scale - 1)) + r64).to(r.dtype)


def _placement(operator) -> dict:
    """The dtype and device of the operator's parameters (float64 on the CPU for a plain matrix)."""
    space = getattr(operator, "space", None)
    p = space.params[0] if space is not None else torch.empty(0, dtype=torch.float64)
    return {"dtype": p.dtype, "device": p.device}
