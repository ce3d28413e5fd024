"""Building the curvature operator (and the K-FAC or Nyström preconditioner) an unlearning run asks for.

K-FAC factors are needed for `curvature="kfac"|"ekfac"` and for `preconditioner="kfac"|"ekfac"`. They come,
in this order, from: factors handed in (captured during training by `UnlearnTrainer`/the callback, or
loaded by the caller), the directory named by `curvature_factors`, or one pass over `curvature_samples`
training rows at the current θ (`curvature_factors="pass"`, or `"auto"` when nothing was handed in).
EK-FAC eigenvalues are refitted with one more pass over those rows unless the factors already carry them.
The Nyström sketch of the training set's curvature comes, in the same order, from a sketch handed in, the
directory named by `curvature_factors`, or `nystrom_rank` products over `curvature_samples` rows; it is then
downdated by the request rows when C is taken on the edited rows. Nothing falls back silently: where the
factors or the sketch came from is returned for the manifest.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

from ..config import KFAC_CURVATURES, UnlearningArguments
from ..errors import ConfigurationError
from ..gradients import LossContext
from ..objective import normaliser
from ..request import current_digest_key, row_digest
from . import CURVATURE_OPERATORS, KFAC_OPERATORS, KFAC_PRECONDITIONERS
from .kfac import KFACFactors, parameters_digest
from .kfac_fit import fit_ekfac_eigenvalues, fit_kfac_factors
from .nystrom import NystromPreconditioner, NystromSketch


def needs_factors(args: UnlearningArguments) -> bool:
    return (
        args.curvature in KFAC_CURVATURES
        or args.preconditioner in KFAC_CURVATURES
        or args.objective_estimate == "quadratic"
    )


def needs_sketch(args: UnlearningArguments) -> bool:
    return args.preconditioner == "nystrom"


def sample_indices(n: int, size: int | None, seed: int) -> list[int]:
    """A seeded random subset of `size` of `range(n)`, sorted (all of it when `size` is None or ≥ n)."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), size))


def sample_rows(rows: list, size: int | None, seed: int) -> list:
    """A seeded random subset of `size` rows in their original order (all rows when `size` is None)."""
    return [rows[i] for i in sample_indices(len(rows), size, seed)]


def curvature_sample(task, rows, resolved, edited: bool, args, M, picked=None) -> tuple[list, float]:
    """`(rows, normaliser)` the exact curvature is taken on: with `args.hessian_samples`, a seeded sample of the
    *training* rows (the same rows for every request, and those a sketch with as many `curvature_samples`
    holds) — or the training rows at indices `picked` (`sketch_sample`) —, edited by the request when `edited`
    (its kept rows, then the new versions of its replaced ones), normalised by the sample's normaliser before
    the edit — as the whole edited set keeps the training set's `M`. Without sampling: all `rows` (or the
    edited set) and `M`."""
    if picked is None:
        size = args.hessian_samples
        if size is None or size >= len(rows):
            return (resolved.edited_rows(rows) if edited else list(rows)), M
        picked = sample_indices(len(rows), size, args.seed)
    sample = [rows[i] for i in picked]
    M_sample = normaliser(task, sample, args.loss_normalization, args.batch_size)
    if not edited:
        return sample, M_sample
    edits = {e.index: e for e in resolved.edits}
    kept = [rows[i] for i in picked if i not in edits]
    return kept + [edits[i].new for i in picked if i in edits and edits[i].new is not None], M_sample


def _source(args, given: str | None) -> tuple[str, str | None]:
    """`("given" | "file" | "pass", ignored)`: where precomputed curvature comes from. `given` names what was
    handed in (None: nothing); an explicit `args.curvature_factors` (a path or "pass") wins over it, and
    then it is returned as ignored."""
    if given and args.curvature_factors == "auto":
        return "given", None
    return ("pass" if args.curvature_factors in ("auto", "pass") else "file"), given


def obtain_factors(args, model, task, space, rows, batches, processes, given: KFACFactors | None = None):
    """The K-FAC factors for this run and a record of where they came from (see the module docstring).

    `rows` are the training rows, `batches(rows)` makes this process's `Batches`. Returns
    `(factors, record)`; `record` has `origin`, the factors' `describe()` and the passes run here. An
    explicit `args.curvature_factors` (a path or "pass") wins over `given` (recorded as ignored).
    """
    norm = args.loss_normalization
    start = time.perf_counter()
    passes = 0
    source, ignored = _source(args, None if given is None else given.info.get("source", "given"))
    if source == "given":
        factors, origin = given, given.info.get("source", "given")
    elif source == "file":
        factors, origin = KFACFactors.load(Path(args.curvature_factors)), "file"
    else:
        sample = sample_rows(rows, args.curvature_samples, args.seed)
        factors = fit_kfac_factors(
            LossContext(model, task, space, processes), batches(sample), norm,
            normaliser(task, sample, norm, args.batch_size), targets=args.kfac_targets or "empirical",
            seed=args.seed, source="pass",
        )  # fmt: skip
        origin, passes = "pass", 1
    if args.kfac_targets not in (None, factors.targets):
        raise ConfigurationError(
            f"the K-FAC factors ({origin}) were computed with {factors.targets!r} targets, but this run asks for "
            f"--kfac-targets {args.kfac_targets}: use --curvature-factors pass to compute them, or drop the flag."
        )
    wants_eigen = "ekfac" in (args.curvature, args.preconditioner)
    if wants_eigen and not factors.has_eigenvalues:
        sample = sample_rows(rows, args.curvature_samples, args.seed)
        factors = fit_ekfac_eigenvalues(
            factors, LossContext(model, task, space, processes), batches(sample), norm,
            normaliser(task, sample, norm, args.batch_size), seed=args.seed,
        )  # fmt: skip
        passes += 1
    record = {
        "origin": origin,
        **factors.describe(),
        # False: the factors were computed at other weights (e.g. along the last training epoch, or for the
        # adapter before an earlier unlearning) — still usable, but an approximation of C at these weights.
        "parameters_match": factors.info.get("parameters_digest") == parameters_digest(space),
        "passes_in_unlearning": passes,
        **({"ignored_factors_from": ignored} if ignored else {}),
        "seconds": time.perf_counter() - start,
    }
    return factors, record


def compute_sketch(args, model, task, space, rows, batches, processes, M) -> NystromSketch:
    """`args.nystrom_rank` products with `args.curvature` over `args.curvature_samples` of `rows` (normaliser
    `M` when all of them, else the sample's own). A sampled sketch records its normaliser and its rows'
    digests, so that a request downdates it by the request rows in it only."""
    norm = args.loss_normalization
    sample = sample_rows(rows, args.curvature_samples, args.seed)
    sampled = len(sample) < len(rows)
    M_sketch = normaliser(task, sample, norm, args.batch_size) if sampled else M
    C = CURVATURE_OPERATORS[args.curvature](model, task, space, batches(sample), norm, M_sketch, processes)
    key = current_digest_key()  # keyed: the digests are saved beside the adapter
    sample_info = (
        {
            "normaliser": float(M_sketch),
            "row_digests": [row_digest(r, key) for r in sample],
            "digest_key_id": key.id,
        }
        if sampled
        else {}
    )
    return NystromSketch.compute(
        C, args.nystrom_rank, args.seed, args.progress and processes.is_main,
        curvature=args.curvature, rows=len(sample), parameters_digest=parameters_digest(space), **sample_info,
    )  # fmt: skip


def _take(digests: Counter, row, key) -> bool:
    """Whether `row` is among the (multiset of) row `digests`; if so, one copy of its digest is used up."""
    d = row_digest(row, key)
    if digests[d] > 0:
        digests[d] -= 1
        return True
    return False


def _request_rows_in_sketch(sketch: NystromSketch, resolved) -> tuple[list, list, list[str]]:
    """`(old, new, row_digests)`: the request's old and new versions of the rows in a sampled sketch, and the
    sketch's row digests after the edit (the removed rows' digests gone)."""
    digests, key = Counter(sketch.info["row_digests"]), current_digest_key()
    old, new = [], []
    for e in resolved.edits:
        if _take(digests, e.old, key):
            old.append(e.old)
            if e.new is not None:
                new.append(e.new)
                digests[row_digest(e.new, key)] += 1
    return old, new, sorted(digests.elements())


def sketch_sample(sketch: NystromSketch, rows: list, args) -> list[int] | None:
    """Indices of the training `rows` a sampled sketch holds (matched by digest), when it is the sample
    `args.hessian_samples` asks for (as many rows when it was made, the same seed): then the solve curves on
    the sketch's rows. After a removal the seeded sample of the shorter training file is other rows, while the
    sketch, downdated, holds the first request's rows minus the removed ones. None otherwise."""
    info = sketch.info
    digests = info.get("row_digests")
    if digests is None or (info.get("rows"), info.get("seed")) != (args.hessian_samples, args.seed):
        return None
    key = current_digest_key()
    if info.get("digest_key_id") != key.id:
        raise ConfigurationError(
            f"the Nyström sketch's row digests were made with the digest key of id {info.get('digest_key_id')}, "
            f"but this run's key has id {key.id}: give that key (--digest-key FILE), or use --curvature-factors "
            "pass to sketch these rows."
        )
    wanted = Counter(digests)
    picked = [i for i, row in enumerate(rows) if _take(wanted, row, key)]
    missing = sum(wanted.values())
    if missing:
        raise ConfigurationError(
            f"the Nyström sketch holds {missing} rows that are not in this training set: give the training rows "
            "as edited by the earlier requests (the edited training file, or `train_dataset=` in "
            "UnlearnTrainer.unlearn), or use --curvature-factors pass to sketch these rows."
        )
    return picked


def obtain_sketch(args, loss: LossContext, rows, resolved, batches, M, given=None):
    """The Nyström sketch for this request, a record of where it came from (module docstring), and the indices
    of the training rows the solve's sample must be (`sketch_sample`; None: the seeded sample or all rows).

    `loss` is the model, task, trainable parameters and processes; `rows` are the training rows and `M` their
    normaliser. Returns `(sketch, record, picked)`: the training
    set's sketch, downdated by the request rows (old versions out, new ones in) when C is on the edited rows —
    which is also the sketch of the edited training set, for the next request.
    """
    model, task, space, processes = loss.model, loss.task, loss.space, loss.processes
    norm = args.loss_normalization
    start = time.perf_counter()
    origin, ignored = _source(args, None if given is None else "given")
    if origin == "given":
        sketch = given
    elif origin == "file":
        sketch = NystromSketch.load(Path(args.curvature_factors))
    else:
        sketch = compute_sketch(args, model, task, space, rows, batches, processes, M)
    if sketch.size != space.numel or sketch.info.get("curvature") != args.curvature:
        raise ConfigurationError(
            f"the Nyström sketch ({origin}) is of {sketch.info.get('curvature')!r} curvature over "
            f"{sketch.size} parameters, but this run solves with {args.curvature!r} over {space.numel}: "
            "use --curvature-factors pass to sketch this adapter's curvature."
        )
    sketch = sketch.to(space.params[0].dtype, space.params[0].device)
    picked = sketch_sample(sketch, rows, args)
    record = {
        "origin": origin,
        "parameters_match": sketch.info.get("parameters_digest") == parameters_digest(space),
        "products_in_unlearning": sketch.rank if origin == "pass" else 0,
        **({"ignored_sketch_from": ignored} if ignored else {}),
        "solve_sample_is_sketch_sample": picked is not None,
    }
    if args.curvature_on_edited:
        # out with the request's old rows, in with their new versions, normalised like the sketch: all of them
        # for a sketch of the training set, those in its sample for a sampled one
        if "row_digests" in sketch.info:
            old, new, digests = _request_rows_in_sketch(sketch, resolved)
            M_sketch = sketch.info["normaliser"]
        else:
            old, new, digests, M_sketch = resolved.old, resolved.new, None, M
        if old:
            operator = CURVATURE_OPERATORS[args.curvature]
            removed = operator(model, task, space, batches(old), norm, M_sketch, processes)
            added = operator(model, task, space, batches(new), norm, M_sketch, processes) if new else None
            sketch = sketch.downdate(removed, added, args.progress and processes.is_main)
            if digests is not None:
                sketch.info["row_digests"] = digests
        record["downdate_rows"] = len(old) + len(new)
    record.update(sketch.describe(), seconds=time.perf_counter() - start)
    return sketch, record, picked


def build_operators(args, loss: LossContext, curvature_rows, batches, factors=None, M=None, sketch=None):
    """`(curvature, preconditioner)` for `args` and `loss` (the model, task, trainable parameters and
    processes); `factors` are required when `needs_factors(args)`, `sketch` when `needs_sketch(args)`.

    Exact operators (hessian, ggn, fisher) run over `curvature_rows` normalised by `normaliser` (default:
    `M`, default: their own); the K-FAC operators take everything from the factors.
    """
    model, task, space, processes = loss.model, loss.task, loss.space, loss.processes
    norm = args.loss_normalization
    M = M if M is not None else normaliser(task, curvature_rows, norm, args.batch_size)
    if args.curvature in KFAC_CURVATURES:
        curvature = KFAC_OPERATORS[args.curvature](
            model, task, space, batches([]), norm, M, processes, factors=factors
        )
    else:
        curvature = CURVATURE_OPERATORS[args.curvature](
            model, task, space, batches(curvature_rows), norm, M, processes
        )
    preconditioner = None
    if args.preconditioner == "nystrom":
        preconditioner = NystromPreconditioner(sketch)
    elif args.preconditioner != "none":
        preconditioner = KFAC_PRECONDITIONERS[args.preconditioner](
            model, task, space, batches([]), norm, M, processes, factors=factors
        )
    return curvature, preconditioner
