"""K-FAC and EK-FAC curvature of the trainable `nn.Linear` layers: factors, block inverse, operators.

What the factors approximate (docs/method.md §2, `R(θ) = (1/M) Σ_i ℓ(z_i; θ)` over the rows the factors were
computed on). Take one trainable Linear layer `s = W a (+ b)` with `W` (out, in). At every position
`k = (example i, token t)` where the layer runs (positions with attention mask 1; every row of its input
when there is no mask), write `a_k` (in,) for its input, with a trailing 1 appended when the bias is
trainable, (`a_k = [1]` when only the bias is), and `g_k = ∂ℓ(z_i)/∂s_k` (out,) for the gradient of the
example's own loss `ℓ` (with the normaliser M handled outside: `ℓ = S` under "token", `S/T` under
"example") with respect to the layer's output there. Then `∇_W ℓ(z_i) = Σ_t g_{i,t} a_{i,t}ᵀ`, and

    A = Σ_k a_k a_kᵀ   (in, in),      G = Σ_k g_k g_kᵀ   (out, out),      K = number of positions

    C_W  ≈  (1 / (M K)) · A ⊗ G,      i.e.   C_W[V] = G V A / (M K)   for a tangent V shaped like W.

This is the Kronecker-factored ("K-FAC-expand": positions treated as independent examples) form of the
per-position second moment `(1/M) Σ_k (a_k a_kᵀ) ⊗ (g_k g_kᵀ)`, which drops the cross-position terms of the
per-example Fisher `(1/M) Σ_i vec(∇_W ℓ_i) vec(∇_W ℓ_i)ᵀ` and then replaces the mean of Kronecker products
by the Kronecker product of means (`(1/K) Σ_k x_k ⊗ y_k ≈ ((1/K) Σ x_k) ⊗ ((1/K) Σ y_k)`). Which matrix
it approximates depends on where `g` comes from (`targets`):

- `"empirical"`: the data's own labels. `G` is then a factor of the **empirical Fisher** `(1/M) Σ_i ∇ℓ_i ∇ℓ_iᵀ`.
  It is what the training's own backward passes give for free (capture during training).
- `"sampled"`: the labels are drawn from the model's predictive distribution, one draw per position
  (`UnlearningTask.sampled_output_losses`). For cross entropy `E_y[(p − e_y)(p − e_y)ᵀ] = diag(p) − ppᵀ` is the
  output Hessian, so `G` estimates the factor of the **generalised Gauss–Newton** (= the true Fisher) of R,
  the matrix `curvature="ggn"` multiplies by. Costs one extra backward pass per batch.

Blocks are independent: C_kfac is block diagonal over the covered layers (a Linear's weight and bias form
one block). The K-FAC approximation is exact when all positions share the same input `a` (then
`(1/K) A = a aᵀ`) or the same `g g ᵀ`, e.g. one position and one example; the tests check that.

EK-FAC (George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis"): with `A = U_A diag(s_A) U_Aᵀ`, `G = U_G diag(s_G) U_Gᵀ`, K-FAC is `(U_A ⊗ U_G) diag(s_G s_Aᵀ/(MK))
(U_A ⊗ U_G)ᵀ`; EK-FAC keeps the eigenbasis and re-fits the eigenvalues to the per-example second moments

    Λ = (1/M) Σ_i (U_Gᵀ ∇_W ℓ_i U_A)²     (elementwise square, (out, in)),     C_W ≈ U_G (Λ ⊙ (U_Gᵀ V U_A)) U_Aᵀ,

the best diagonal in that basis (in Frobenius norm) for the per-example (empirical or sampled) Fisher.

Damped block inverse: `(C + λI)⁻¹` is applied block by block in the eigenbasis,
`V ↦ U_G [(U_Gᵀ V U_A) / (Λ + λ)] U_Aᵀ` with `Λ = s_G s_Aᵀ/(MK)` (K-FAC) or the refitted Λ (EK-FAC). The damping
of every block is the solve's λ, so this is the exact inverse of `C_kfac + λI` (no factored-Tikhonov
approximation). Trainable parameters outside any covered Linear (embeddings in `modules_to_save`,
LayerNorm weights, DoRA magnitudes, or a Linear with a side above `MAX_FACTOR_DIM`) have no K-FAC block:
the `kfac`/`ekfac` curvature refuses them, and as a preconditioner they get `1/λ` (identity block, scaled
by the damping).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigurationError
from .base import CurvatureOperator
from .files import files_exist, load_tensors, save_tensors

FACTORS_FILE = "curvature_factors.safetensors"
FACTORS_META = "curvature_factors.json"
FACTORS_FORMAT = "hf_unlearn.curvature_factors/1"
MAX_FACTOR_DIM = 16384  # a factor is side × side: a Linear with a wider input or output gets no block
TARGETS = ("empirical", "sampled")


# --- which parameters form which block ----------------------------------------------------------------


@dataclass
class LinearBlock:
    """A trainable `nn.Linear` and where its weight/bias sit in the `ParameterSpace` (None: frozen)."""

    name: str  # canonical module name (see `canonical_name`)
    module: torch.nn.Linear
    weight: int | None
    bias: int | None

    @property
    def in_dim(self) -> int:
        """Side of A: the input width, +1 for a trainable bias; 1 when only the bias is trainable."""
        if self.weight is None:
            return 1
        return self.module.in_features + (self.bias is not None)

    @property
    def out_dim(self) -> int:
        return self.module.out_features


def canonical_name(name: str, adapter_names=()) -> str:
    """A module name without PEFT's adapter segment (`...lora_A.default` -> `...lora_A`), so that factors
    fit an adapter loaded under another adapter name."""
    parts = [p for p in name.split(".") if p not in adapter_names]
    return ".".join(parts)


def linear_blocks(model: torch.nn.Module, space) -> tuple[list[LinearBlock], list[str]]:
    """The covered Linear layers, in parameter order, and the names of the trainable parameters outside them."""
    index = {id(p): i for i, p in enumerate(space.params)}
    adapters = tuple(getattr(model, "peft_config", {}) or ())
    blocks, covered = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = index.get(id(module.weight))
        b = index.get(id(module.bias)) if module.bias is not None else None
        if w is None and b is None:
            continue
        block = LinearBlock(canonical_name(name, adapters), module, w, b)
        if max(block.in_dim, block.out_dim) > MAX_FACTOR_DIM:
            continue
        blocks.append(block)
        covered.update(i for i in (w, b) if i is not None)
    blocks.sort(key=lambda blk: min(i for i in (blk.weight, blk.bias) if i is not None))
    uncovered = [n for i, n in enumerate(space.names) if i not in covered]
    return blocks, uncovered


def adapted_output_layer(model: torch.nn.Module, blocks: list[LinearBlock]) -> str | None:
    """The name of a block inside the model's output layer (lm_head), which K-FAC cannot model: the loss
    computes the logits at the loss positions only, while K-FAC models per-token layers. None if there is none."""
    owners = (model, getattr(model, "base_model", None))
    heads = [getattr(m, "get_output_embeddings", lambda: None)() for m in owners]
    inside = {id(sub) for head in heads if isinstance(head, torch.nn.Module) for sub in head.modules()}
    return next((b.name for b in blocks if id(b.module) in inside), None)


def kfac_coverage_problem(model: torch.nn.Module, space) -> str | None:
    """Why K-FAC cannot model every trainable parameter of `model` as a per-token Linear block; None if it can."""
    blocks, uncovered = linear_blocks(model, space)
    if uncovered:
        return (
            f"{len(uncovered)} trainable parameters are outside any covered nn.Linear (e.g. {uncovered[:2]})"
        )
    if not blocks:
        return "the model has no trainable nn.Linear layer"
    if head := adapted_output_layer(model, blocks):
        return f"the output layer is adapted ({head}), and K-FAC models per-token layers only"
    return None


def block_matrix(block: LinearBlock, vs: list[torch.Tensor]) -> torch.Tensor:
    """A tangent's block as one (out, in') matrix: `[V_W  v_b]` (the bias as the last column)."""
    parts = []
    if block.weight is not None:
        parts.append(vs[block.weight])  # (out, in)
    if block.bias is not None:
        parts.append(vs[block.bias].unsqueeze(1))  # (out, 1)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def scatter_block(block: LinearBlock, matrix: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """Inverse of `block_matrix`: write an (out, in') matrix into the block's slots of `outs`."""
    if block.weight is not None:
        outs[block.weight].copy_(matrix[:, : block.module.in_features])
    if block.bias is not None:
        outs[block.bias].copy_(matrix[:, -1])


def parameters_digest(space) -> str:
    """SHA-256 of the trainable parameters (names and float32 values): which θ the factors belong to."""
    h = hashlib.sha256()
    for name, p in zip(space.names, space.params):
        h.update(name.encode() + b"\0")
        h.update(p.detach().to(torch.float32).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# --- the factors ---------------------------------------------------------------------------------------


class KFACFactors:
    """Kronecker factors `A`, `G` and position counts `K` per covered Linear, optionally EK-FAC eigenvalues.

    `A[name]` (in', in') and `G[name]` (out, out) are raw sums over positions, `positions[name]` is K, and
    `normaliser` the M of the rows they came from, so that a block is `A ⊗ G / (M K)` (module docstring).
    `eigen[name] = (U_A, U_G, Λ_sum)` holds an EK-FAC refit, `Λ_sum = Σ_i (U_Gᵀ ∇_W ℓ_i U_A)²` (raw, /M
    when used). `info` records how they were made (source, targets, rows, normalisation).
    """

    def __init__(self, A, G, positions, *, normalization, normaliser, num_rows, targets, source, **info):
        self.A, self.G, self.positions = dict(A), dict(G), dict(positions)
        self.eigen = {}  # EK-FAC eigenvalues: `with_eigenvalues`
        self.info = {
            "normalization": normalization,
            "normaliser": float(normaliser),
            "num_rows": int(num_rows),
            "targets": targets,
            "source": source,
            **info,
        }

    normalization = property(lambda self: self.info["normalization"])
    normaliser = property(lambda self: self.info["normaliser"])
    targets = property(lambda self: self.info["targets"])

    @property
    def names(self) -> list[str]:
        return list(self.A)

    @property
    def has_eigenvalues(self) -> bool:
        return bool(self.eigen) and set(self.eigen) == set(self.A)

    def with_eigenvalues(self, eigen: dict | None) -> KFACFactors:
        """These factors (the same A, G, positions and info) with the EK-FAC eigenvalues `eigen`
        (`{name: (U_A, U_G, Λ_sum)}`; None or empty: none)."""
        out = KFACFactors(self.A, self.G, self.positions, **self.info)
        out.eigen = dict(eigen or {})
        return out

    def to(self, dtype=None, device=None) -> KFACFactors:
        def cast(t):
            return t.to(dtype=dtype if t.is_floating_point() else None, device=device)

        out = KFACFactors(
            {n: cast(t) for n, t in self.A.items()},
            {n: cast(t) for n, t in self.G.items()},
            self.positions,
            **self.info,
        ).with_eigenvalues({n: tuple(cast(t) for t in e) for n, e in self.eigen.items()})
        return out

    def with_rows(self, rows: KFACFactors) -> KFACFactors:
        """The factors of these rows' set plus `rows` (raw sums and position counts added; M kept): after a
        request, `factors.without(old).with_rows(new)` are the edited training set's, for the next request."""
        self._check_compatible(rows)
        return KFACFactors(
            {n: self.A[n] + rows.A[n].to(self.A[n]) for n in self.A},
            {n: self.G[n] + rows.G[n].to(self.G[n]) for n in self.G},
            {n: self.positions[n] + rows.positions[n] for n in self.A},
            **{**self.info, "num_rows": self.info["num_rows"] + rows.info["num_rows"]},
        )

    def _check_compatible(self, rows: KFACFactors) -> None:
        if rows.targets != self.targets or set(rows.A) != set(self.A):
            raise ConfigurationError(
                f"cannot combine factors with {rows.targets!r} targets over {len(rows.A)} modules with factors "
                f"with {self.targets!r} targets over {len(self.A)}."
            )

    def without(self, rows: KFACFactors) -> KFACFactors:
        """The factors of these rows' set minus `rows` (factors of some of them, with the same targets): the raw
        sums and position counts subtracted, `A − A_rows`, `G − G_rows`, `K − K_rows` — the K-FAC of the
        remaining rows when both were taken at the same θ. The normaliser M is kept (the objective's), and
        EK-FAC eigenvalues, which belong to the whole set, are dropped."""
        self._check_compatible(rows)
        positions = {n: self.positions[n] - rows.positions[n] for n in self.A}
        if any(k < 0 for k in positions.values()):
            raise ConfigurationError("the rows taken out have more positions than the factors hold.")
        return KFACFactors(
            {n: self.A[n] - rows.A[n].to(self.A[n]) for n in self.A},
            {n: self.G[n] - rows.G[n].to(self.G[n]) for n in self.G},
            positions,
            **{**self.info, "num_rows": self.info["num_rows"] - rows.info["num_rows"]},
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat name -> tensor map that is saved (`<module>::A`, `::G`, `::eigen_U_A`, ...)."""
        out = {}
        for n in self.A:
            out[f"{n}::A"], out[f"{n}::G"] = self.A[n], self.G[n]
            if n in self.eigen:
                U_A, U_G, lam = self.eigen[n]
                out[f"{n}::eigen_U_A"], out[f"{n}::eigen_U_G"], out[f"{n}::eigen_values"] = U_A, U_G, lam
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def digest(self) -> str:
        """SHA-256 over the tensors (names, dtypes, shapes and bytes, in name order) and the counts."""
        h = hashlib.sha256()
        for key, t in sorted(self.tensors().items()):
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(self.positions, sort_keys=True).encode())
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        """What the manifest records: how the factors were made, their size and digest (no tensors)."""
        return {
            **self.info,
            "modules": len(self.A),
            "ekfac_eigenvalues": self.has_eigenvalues,
            "digest": self.digest(),
        }

    # --- files ---

    def save(self, directory: str | Path) -> Path:
        """Write `curvature_factors.safetensors` and `curvature_factors.json` into `directory`."""
        meta = {
            "format": FACTORS_FORMAT,
            **self.info,
            "modules": {
                n: {"in": self.A[n].shape[0], "out": self.G[n].shape[0], "positions": self.positions[n]}
                for n in self.A
            },
            "ekfac_eigenvalues": self.has_eigenvalues,
            "digest": self.digest(),
        }
        return save_tensors(directory, (FACTORS_FILE, FACTORS_META), self.tensors(), meta)

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return files_exist(directory, (FACTORS_FILE, FACTORS_META))

    @classmethod
    def load(cls, directory: str | Path) -> KFACFactors:
        """Read factors written by `save` (safetensors only; the JSON must match the tensors)."""
        d = Path(directory)
        tensors, meta = load_tensors(
            d, (FACTORS_FILE, FACTORS_META), FACTORS_FORMAT, "curvature factors",
            "Capture them during training (UnlearningArguments(capture_curvature=True) / "
            "CurvatureCaptureCallback) or let unlearning compute them with one pass over the data "
            "(--curvature-factors pass).",
        )  # fmt: skip
        modules = meta["modules"]
        A, G, eigen = {}, {}, {}
        for n, shape in modules.items():
            try:
                A[n], G[n] = tensors[f"{n}::A"], tensors[f"{n}::G"]
            except KeyError:
                raise ConfigurationError(
                    f"{d / FACTORS_FILE} lacks the factors of module {n!r} listed in {FACTORS_META}."
                ) from None
            if tuple(A[n].shape) != (shape["in"],) * 2 or tuple(G[n].shape) != (shape["out"],) * 2:
                raise ConfigurationError(
                    f"{d}: the factors of {n!r} do not have the shapes {FACTORS_META} lists."
                )
            if f"{n}::eigen_values" in tensors:
                eigen[n] = tuple(tensors[f"{n}::eigen_{k}"] for k in ("U_A", "U_G", "values"))
        info = {k: v for k, v in meta.items() if k not in ("format", "hf_unlearn_version", "modules", "digest",
                                                          "ekfac_eigenvalues")}  # fmt: skip
        factors = cls(A, G, {n: s["positions"] for n, s in modules.items()}, **info).with_eigenvalues(eigen)
        if meta.get("digest") != factors.digest():
            raise ConfigurationError(
                f"The curvature factors in {str(d)!r} do not match the digest recorded in {FACTORS_META} "
                "(the files were modified or come from different runs). Recompute them."
            )
        factors.info["loaded_from"] = str(d)
        factors.info["saved_by_version"] = meta.get("hf_unlearn_version")
        return factors

    def check_fits(self, blocks: list[LinearBlock], normalization: str) -> None:
        """Raise a `ConfigurationError` saying what to do unless these factors belong to these blocks."""
        where = self.info.get("loaded_from", "the given curvature factors")
        fix = (
            "Recompute them for this adapter (--curvature-factors pass: one pass over --curvature-samples "
            "training rows), or point --curvature-factors at the directory saved with this adapter."
        )
        expected = {b.name: (b.in_dim, b.out_dim) for b in blocks}
        have = {n: (self.A[n].shape[0], self.G[n].shape[0]) for n in self.A}
        if set(expected) != set(have):
            missing, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
            raise ConfigurationError(
                f"The curvature factors in {where} do not fit the model's trainable Linear modules: "
                f"{len(missing)} modules have no factors (e.g. {missing[:3]}), {len(extra)} factors belong to "
                f"no trainable module (e.g. {extra[:3]}). They were computed for another adapter. " + fix
            )
        wrong = [n for n in expected if expected[n] != have[n]]
        if wrong:
            n = wrong[0]
            raise ConfigurationError(
                f"The curvature factors in {where} have the wrong shape for {len(wrong)} modules, e.g. {n!r}: "
                f"(in', out) = {have[n]} but the model has {expected[n]} (a different LoRA rank, or a bias "
                "that is trainable in one and not the other). " + fix
            )
        if normalization != self.normalization:
            raise ConfigurationError(
                f"The curvature factors in {where} were computed under loss_normalization="
                f"{self.normalization!r}, this run uses {normalization!r}. Use the same normalisation or "
                "recompute the factors."
            )


# --- eigendecompositions and the operators --------------------------------------------------------------


@dataclass
class EigenBlock:
    """One block in its Kronecker eigenbasis: `C_block = U_G diag(Λ) U_Aᵀ`-style with Λ (out, in')."""

    block: LinearBlock
    U_A: torch.Tensor  # (in', in')
    U_G: torch.Tensor  # (out, out)
    values: torch.Tensor  # (out, in'), already divided by M (and K for K-FAC), clamped ≥ 0


def kfac_eigenbasis(
    A: torch.Tensor, G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(s_A, U_A, s_G, U_G)` from `torch.linalg.eigh` of the symmetrised factors."""
    s_A, U_A = torch.linalg.eigh((A + A.T) / 2)
    s_G, U_G = torch.linalg.eigh((G + G.T) / 2)
    return s_A, U_A, s_G, U_G


def _singular(values: torch.Tensor) -> bool:
    """Numerically singular: an eigenvalue ≤ (side · machine ε) × the largest."""
    return bool(values.min() <= max(values.shape) * torch.finfo(values.dtype).eps * values.max())


class KFACOperator(CurvatureOperator):
    """`curvature="kfac"`: the block-diagonal K-FAC matrix of the module docstring, applied from its factors.

    No data pass per product: `C v` is `G V A / (M K)` per block. `solve_damped(rhs, λ)` applies the exact
    `(C + λI)⁻¹` in each block's eigenbasis (what `solver="direct"` and the K-FAC preconditioner use).
    """

    name = "kfac"
    uses_eigenvalue_refit = False
    # trainable parameters outside every Kronecker block: refused by the curvature, preconditioned by 1/λ by
    # the preconditioner (`KFACPreconditioner`, `EKFACPreconditioner`)
    allows_uncovered = False

    def __init__(self, model, task, space, batches, normalization, normaliser, processes, *, factors):
        super().__init__(model, task, space, batches, normalization, normaliser, processes)
        self.blocks, self.uncovered = linear_blocks(model, space)
        if self.uncovered and not self.allows_uncovered:
            raise ConfigurationError(
                f"curvature={self.name!r} has Kronecker blocks for trainable nn.Linear layers only; "
                f"{len(self.uncovered)} trainable parameters are outside any (e.g. {self.uncovered[:3]}: "
                "embeddings or other modules_to_save, norms, DoRA magnitudes, or a Linear wider than "
                f"{MAX_FACTOR_DIM}). Freeze them, or solve against exact products with --curvature ggn|hessian "
                f"--solver cg --preconditioner {self.name}, where they are preconditioned by 1/λ."
            )
        if not self.blocks:
            raise ConfigurationError(f"curvature={self.name!r}: the model has no trainable nn.Linear layer.")
        factors.check_fits(self.blocks, normalization)
        if self.uses_eigenvalue_refit and not factors.has_eigenvalues:
            raise ConfigurationError("curvature='ekfac' needs factors with refitted eigenvalues (fit_ekfac).")
        p = space.params[0]
        self.factors = factors.to(dtype=p.dtype, device=p.device)
        self.eigen = [self._eigen_block(b) for b in self.blocks]
        self.num_inverse_products = 0

    def _eigen_block(self, block: LinearBlock) -> EigenBlock:
        f, n = self.factors, block.name
        MK = f.normaliser * f.positions[n]
        s_A, U_A, s_G, U_G = kfac_eigenbasis(f.A[n], f.G[n])
        # A and G are PSD: negative eigenvalues are round-off; clamp so that C stays PSD.
        values = (
            torch.outer(s_G.clamp_min(0), s_A.clamp_min(0)) / MK
            if MK > 0
            else torch.zeros(len(s_G), len(s_A), dtype=s_A.dtype, device=s_A.device)
        )
        return EigenBlock(block, U_A, U_G, values)

    def batch_product(self, batch, vs):  # pragma: no cover - products never touch data
        raise NotImplementedError("K-FAC products come from the factors; use matvec.")

    def _apply(self, v: torch.Tensor, per_block, uncovered_scale: float) -> torch.Tensor:
        vs = self.space.unflatten(v)
        outs = [torch.zeros_like(t) for t in vs]
        for eb in self.eigen:
            scatter_block(eb.block, per_block(eb, block_matrix(eb.block, vs)), outs)
        if uncovered_scale and self.uncovered:
            covered = {i for eb in self.eigen for i in (eb.block.weight, eb.block.bias) if i is not None}
            for i, (o, t) in enumerate(zip(outs, vs)):
                if i not in covered:
                    o.copy_(t * uncovered_scale)
        return self.space.flatten(outs)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C_kfac v (0 on uncovered parameters). Identical on every process (the factors are global)."""
        self.num_products += 1
        return self._apply(v, lambda eb, V: eb.U_G @ ((eb.U_G.T @ V @ eb.U_A) * eb.values) @ eb.U_A.T, 0.0)

    def solve_damped(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """(C_kfac + λI)⁻¹ rhs, block by block in the Kronecker eigenbasis; uncovered parameters get 1/λ."""
        if not damping > 0 and (self.uncovered or any(_singular(eb.values) for eb in self.eigen)):
            raise ConfigurationError(
                f"The {self.name} block inverse needs damping > 0: the factors are singular "
                "(LoRA factors have rank ≤ the number of positions) or parameters are uncovered."
            )
        self.num_inverse_products += 1
        return self._apply(
            rhs,
            lambda eb, V: eb.U_G @ ((eb.U_G.T @ V @ eb.U_A) / (eb.values + damping)) @ eb.U_A.T,
            1.0 / damping if damping > 0 else 0.0,
        )

    def sample_matvec(self, v, size, generator):
        """K-FAC has no mini-batch products: the full product is already cheap."""
        self.num_sample_products += 1
        return self.matvec(v)


class EKFACOperator(KFACOperator):
    """`curvature="ekfac"`: K-FAC's eigenbasis with eigenvalues refitted to per-example gradients."""

    name = "ekfac"
    uses_eigenvalue_refit = True

    def _eigen_block(self, block: LinearBlock) -> EigenBlock:
        U_A, U_G, lam = self.factors.eigen[block.name]
        return EigenBlock(block, U_A, U_G, lam.clamp_min(0) / self.factors.normaliser)


class KFACPreconditioner(KFACOperator):
    """`preconditioner="kfac"`: the K-FAC block inverse for a solve against another curvature; trainable
    parameters outside every Kronecker block are allowed and preconditioned by 1/λ."""

    allows_uncovered = True


class EKFACPreconditioner(EKFACOperator):
    """`preconditioner="ekfac"`: as `KFACPreconditioner`, with EK-FAC's refitted eigenvalues."""

    allows_uncovered = True
