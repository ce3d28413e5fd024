"""The LLMEraser update: request -> b -> solve -> apply (docs/method.md §2).

Δθ = −(C + λI)⁻¹ b,   b = (1/M) [ Σ_{a∈A} ∇ℓ(a; θ*) − Σ_{o∈O} ∇ℓ(o; θ*) ],   θ ← θ* + Δθ
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

import torch

from .config import KFAC_CURVATURES, UnlearningArguments
from .curvature import KFAC_OPERATORS
from .curvature.kfac import KFACFactors, kfac_coverage_problem
from .curvature.kfac_fit import fit_kfac_factors
from .curvature.nystrom import NystromSketch
from .curvature.rows import RowGradientSketch
from .curvature.setup import (
    build_operators,
    compute_sketch,
    curvature_sample,
    needs_factors,
    needs_sketch,
    obtain_factors,
    obtain_sketch,
    sample_indices,
    sample_rows,
)
from .data import TrainingSet
from .distributed import Processes, check_curvature_supported
from .errors import ConfigurationError, DataError, NonPositiveCurvatureError, SolverError
from .gradients import WORK, Batches, LossContext, gradient_sum, loss_sum
from .objective import UnlearningTask, causal_lm_task, normaliser
from .params import ParameterSpace, computation_mode
from .refinement import (
    FullTilted,
    KeptLossGuard,
    KeptSample,
    NewtonSolve,
    QuadraticTilted,
    SampledTilted,
    choose_damping,
    refine,
)
from .request import ResolvedRequest, UnlearningRequest
from .solvers import make_solve
from .solvers.base import SolverStats
from .stats import ForgetCheck, RetainCheck, Sizes, UnlearningStats

logger = logging.getLogger(__name__)


@dataclass
class UnlearningResult:
    """What `unlearn` did. `delta` maps each trainable parameter's name to its Δθ (already applied)."""

    delta: dict[str, torch.Tensor]
    stats: UnlearningStats
    request: ResolvedRequest
    timings: dict = field(default_factory=dict)
    # preconditioner "nystrom": the sketch downdated by this request, i.e. of the edited training set (the
    # next request's starting point; hf-unlearn unlearn saves it beside the output adapter)
    nystrom_sketch: NystromSketch | None = None
    # objective_estimate "quadratic": the K-FAC factors of the edited training set, likewise
    curvature_factors: KFACFactors | None = None

    @property
    def delta_norm(self) -> float:
        """‖Δθ‖ (as `stats.delta_norm`)."""
        return self.stats.delta_norm


class PrecomputedCurvature(TypedDict, total=False):
    """The curvature `unlearn` can be handed instead of computing it (its keyword arguments of these names,
    each optional, default None): K-FAC factors, a Nyström sketch, a row-gradient sketch."""

    curvature_factors: KFACFactors | None
    nystrom_sketch: NystromSketch | None
    row_gradient_sketch: RowGradientSketch | None


def unlearn(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping] | TrainingSet,
    request: UnlearningRequest,
    args: UnlearningArguments | None = None,
    *,
    task: UnlearningTask | None = None,
    tokenizer=None,
    **precomputed: Unpack[PrecomputedCurvature],
) -> UnlearningResult:
    """Apply the LLMEraser update `Δθ = −(C + (μ + λ)I)⁻¹ b` for `request` to the trainable parameters of
    `model`, in place (C over the edited rows unless `args.curvature_data` says otherwise; μ =
    `args.l2_regularization`).

    `train_dataset` is what the adapter was trained on (rows of `input_ids`/`labels`, or `prompt`/`response`
    with a `tokenizer`); request ids are its row indices, or the ids of a `TrainingSet`. `task` replaces the
    causal-LM loss for other models. `curvature_factors` are K-FAC factors for `curvature="kfac"|"ekfac"` or
    a K-FAC preconditioner (e.g. captured during training; see `args.curvature_factors` for the other
    sources); `nystrom_sketch` the training set's sketch for `preconditioner="nystrom"` (e.g. the
    `nystrom_sketch` of an earlier result); `row_gradient_sketch` the rows' gradient sketch for
    `objective_estimate="sample"` (these three are `PrecomputedCurvature`, each optional). Returns the applied
    Δθ and the solver statistics.
    """
    unknown = sorted(set(precomputed) - set(PrecomputedCurvature.__annotations__))
    if unknown:
        raise TypeError(f"unlearn() got an unexpected keyword argument {unknown[0]!r}")
    args = args or UnlearningArguments()
    check_curvature_supported(args.curvature, model)
    task = task or causal_lm_task(tokenizer, model)
    train = train_dataset if isinstance(train_dataset, TrainingSet) else TrainingSet(train_dataset)
    processes = Processes()
    start, work_before = time.perf_counter(), WORK.snapshot()
    resolved = request.resolve(train, task)
    space = ParameterSpace(model)
    estimate_choice = choose_objective_estimate(args, model, space)
    args = dataclasses.replace(args, objective_estimate=estimate_choice["kind"])

    # The phases (each below, over one `_Context`): right-hand side → curvature → damping → solve → refine, with
    # the kept-loss retries → apply and measure → stats.
    with computation_mode(model, args.torch_dtype):
        ctx = _Context.of(model, task, space, processes, args, train, resolved)
        ctx.rhs = _right_hand_side(ctx)
        curvature = _curvature(
            ctx, estimate_choice, precomputed.get("curvature_factors"), precomputed.get("nystrom_sketch"),
            precomputed.get("row_gradient_sketch"),
        )  # fmt: skip
        damping = _damping(ctx, curvature)
        solver = _solver(ctx, curvature)
        kept = _kept_rows(ctx)
        solution = _solve_and_refine(ctx, solver, kept, damping.value)
        measured = _apply_and_measure(ctx, solution.trial.delta)
    ctx.timings["total_seconds"] = time.perf_counter() - start
    stats = _stats(ctx, curvature, damping, kept, solution, measured, WORK.since(work_before))
    # the sketch is handed on (saved beside the output, reused by the next request) only once it is the
    # edited training set's: downdated, which happens when C is over the edited rows
    handed_on = curvature.sketch if args.curvature_on_edited else None
    return UnlearningResult(
        measured.delta, stats, resolved, ctx.timings, handed_on, curvature.estimate.next_factors
    )


# The kept-rows check: rows sampled, and the rise of their loss (nats per token) that is named as a warning —
# retraining fits the kept rows as training did, so their loss stays close to where training left it.
RETAIN_CHECK_ROWS = 32
RETAIN_RISE_WARNING = 0.5
KEPT_LOSS_RETRIES = 5


def retain_check(before: float, after: float, rows: int) -> RetainCheck:
    """The kept rows' loss per token before and after the update, with a warning when it rose by more than
    `RETAIN_RISE_WARNING` (the update then left the region its quadratic model describes)."""
    warning = None
    if after - before > RETAIN_RISE_WARNING:
        warning = (
            f"the loss of the rows the request keeps rose from {before:.3g} to {after:.3g} per token (a sample of "
            f"{rows}), where retraining keeps it close to where training left it: the update went beyond what its "
            "quadratic model describes (often: training far from converged, or few training rows). Compare with "
            "a retrained adapter (hf-unlearn evaluate) before using this one."
        )
        logger.warning("Unlearning: %s", warning)
    return RetainCheck(rows, before, after, warning)


def sketch_curvature(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping] | TrainingSet,
    args: UnlearningArguments | None = None,
    *,
    task: UnlearningTask | None = None,
    tokenizer=None,
) -> NystromSketch:
    """The Nyström sketch of `model`'s training-set curvature for `preconditioner="nystrom"`: once per adapter,
    `args.nystrom_rank` products with `args.curvature` over `args.curvature_samples` rows. Save it beside the
    adapter (`sketch.save(adapter_dir)`; `hf-unlearn unlearn` then finds it) or pass it to `unlearn`."""
    args = args or UnlearningArguments(preconditioner="nystrom")
    task = task or causal_lm_task(tokenizer, model)
    train = train_dataset if isinstance(train_dataset, TrainingSet) else TrainingSet(train_dataset)
    space, processes = ParameterSpace(model), Processes()
    device = space.params[0].device
    with computation_mode(model, args.torch_dtype):
        rows = [train[i] for i in range(len(train))]
        M = normaliser(task, rows, args.loss_normalization, args.batch_size)
        return compute_sketch(
            args, model, task, space, rows,
            lambda rs: Batches(task, rs, args.batch_size, device, processes), processes, M,
        )  # fmt: skip


def prepare_curvature(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping] | TrainingSet,
    args: UnlearningArguments | None = None,
    *,
    task: UnlearningTask | None = None,
    tokenizer=None,
) -> KFACFactors:
    """K-FAC factors of `model`'s training set at its current weights, for `objective_estimate="quadratic"`:
    once per adapter, one forward and backward pass over `args.curvature_samples` rows (default: all), with
    `args.kfac_targets` (default: empirical, as captured in training). Save them beside the adapter
    (`factors.save(adapter_dir)`; `hf-unlearn unlearn` then finds them) or pass them to `unlearn`. Adapters
    trained with `capture_curvature` already have them."""
    args = args or UnlearningArguments()
    task = task or causal_lm_task(tokenizer, model)
    train = train_dataset if isinstance(train_dataset, TrainingSet) else TrainingSet(train_dataset)
    space, processes = ParameterSpace(model), Processes()
    device = space.params[0].device
    norm = args.loss_normalization
    with computation_mode(model, args.torch_dtype):
        rows = [train[i] for i in range(len(train))]
        sample = sample_rows(rows, args.curvature_samples, args.seed)
        return fit_kfac_factors(
            LossContext(model, task, space, processes), Batches(task, sample, args.batch_size, device, processes),
            norm, normaliser(task, sample, norm, args.batch_size), targets=args.kfac_targets or "empirical",
            seed=args.seed, source="prepare",
        )  # fmt: skip


def request_rhs(loss: LossContext, resolved, batches, norm, M, show=False):
    """`(b, Σ∇ℓ(old))` of a resolved request: b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at the current θ (docs/method.md §2).

    `loss` is the model, task, trainable parameters and processes; `batches(rows)` makes this process's
    `Batches`; `show` adds progress bars."""
    model, task, space, processes = loss.model, loss.task, loss.space, loss.processes
    g_old = gradient_sum(
        model, task, space, batches(resolved.old), norm, processes, "gradients (old)" if show else None
    )
    b = -g_old
    if resolved.new:
        b += gradient_sum(
            model, task, space, batches(resolved.new), norm, processes, "gradients (new)" if show else None
        )
    return b / M, g_old


def choose_objective_estimate(args: UnlearningArguments, model, space) -> dict:
    """`{"kind", "asked", "because"}`: `args.objective_estimate`, with 'auto' resolved — 'quadratic' (a request
    passes over its own rows only) wherever it applies, else 'full' (docs/method.md §2)."""
    asked = args.objective_estimate
    if asked != "auto":
        return {"kind": asked, "asked": asked, "because": "asked for"}
    reason = None
    if args.refine_steps == 0 and args.refine_damping == "fixed":
        reason = "a single fixed step was asked for (refine_steps 0, refine_damping fixed): the update itself"
    elif args.curvature in KFAC_CURVATURES or not args.curvature_on_edited:
        reason = (
            f"curvature {args.curvature!r} on the {'edited' if args.curvature_on_edited else 'original'} rows"
        )
    elif args.solver not in ("cg", "direct") or args.preconditioner != "none":
        reason = f"solver {args.solver!r} with preconditioner {args.preconditioner!r}"
    else:
        reason = kfac_coverage_problem(model, space)
    if reason is None:
        return {
            "kind": "quadratic",
            "asked": "auto",
            "because": "the kept rows as the training run's K-FAC quadratic; each step passes over the request's "
            "rows only",
        }
    if args.refine_steps or args.refine_damping != "fixed":
        reason += "; each refinement step passes over every training row"
    return {"kind": "full", "asked": "auto", "because": reason}


def _check(delta: torch.Tensor, stats, args: UnlearningArguments, tol: float | None = None) -> list[str]:
    """Why the solve is not exact (empty when it is); raises `SolverError` unless `allow_inexact` keeps a finite
    result. Exact means converged to `tol` (default `args.tol`; cg, direct) or, for budgeted mini-batch solvers
    (lissa, qp), better than no update."""
    tol = args.tol if tol is None else tol
    finite = bool(torch.isfinite(delta).all())
    problems = [] if finite else ["the solver produced non-finite values"]
    if stats.extra.get("stochastic"):
        if (
            finite and stats.relative_residual < 1.0 and not stats.converged
        ):  # better than nothing, short of tol
            problems.append(
                f"{args.solver} stopped at relative residual {stats.relative_residual:.3g} > tol {tol:g} after "
                f"{stats.iterations} mini-batch steps"
            )
        if finite and not stats.relative_residual < 1.0:
            problems.append(
                f"{args.solver} diverged: after {stats.iterations} mini-batch steps the relative residual is "
                f"{stats.relative_residual:.3g} (≥ 1, worse than no update); "
                + {"lissa": "raise --lissa-scale", "qp": "lower --qp-lr"}.get(
                    args.solver, "lower the step size"
                )
                + " or raise --stochastic-batch-size"
            )
    elif not stats.converged:
        problems.append(
            f"{args.solver} did not converge in {stats.iterations} iterations (relative residual "
            f"{stats.relative_residual:.3g} > tol {tol:g})"
        )
    worse = finite and not stats.relative_residual < 1.0  # no better than no update: never kept
    if problems and not (finite and args.allow_inexact and not worse):
        if worse and args.allow_inexact:
            problems.append(
                "--allow-inexact keeps only a result better than no update (relative residual < 1)"
            )
        message = "; ".join(problems)
        raise SolverError(
            message[0].upper()
            + message[1:]
            + "; nothing was changed. Raise --max-iter or --damping, loosen --tol"
            + ("." if args.allow_inexact else ", or pass --allow-inexact to keep an inexact (finite) result.")
        )
    return problems


# The phases of `unlearn`, in their order. Each takes the one `_Context` (and the records of the phases before
# it) and returns a small record; `_stats` collects the records into the result's stats.


@dataclass
class _Context:
    """What every phase of `unlearn` works on."""

    model: torch.nn.Module
    task: UnlearningTask
    space: ParameterSpace
    processes: Processes
    args: UnlearningArguments
    rows: list  # the training rows
    resolved: ResolvedRequest
    M: float  # the training set's normaliser
    rhs: _RightHandSide | None = None  # set by the right-hand-side phase
    timings: dict = field(default_factory=dict)  # seconds by phase, as `UnlearningResult.timings`

    @classmethod
    def of(cls, model, task, space, processes, args, train: TrainingSet, resolved) -> _Context:
        rows = [train[i] for i in range(len(train))]
        M = normaliser(task, rows, args.loss_normalization, args.batch_size)
        return cls(model, task, space, processes, args, rows, resolved, M)

    @property
    def loss(self) -> LossContext:
        """The model, task, trainable parameters and processes, as the gradient and curvature passes take them."""
        return LossContext(self.model, self.task, self.space, self.processes)

    def batches(self, rows) -> Batches:
        """This process's `Batches` of `rows`."""
        return Batches(self.task, rows, self.args.batch_size, self.space.params[0].device, self.processes)

    def token_loss(self, batches: Batches) -> float:
        """Σ cross-entropy over the loss tokens of `batches` (every process's rows)."""
        return loss_sum(self.model, self.task, batches, "token", self.processes)

    @property
    def b(self) -> torch.Tensor:  # (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at θ*
        return self.rhs.b

    @property
    def g_old(self) -> torch.Tensor:  # Σ∇ℓ(old) at θ*
        return self.rhs.g_old

    @contextlib.contextmanager
    def timed(self, key: str):
        """Records the seconds the block took as `timings[key]` (not when it raises)."""
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t


@dataclass
class _RightHandSide:
    b: torch.Tensor  # (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at θ*
    g_old: torch.Tensor  # Σ∇ℓ(old) at θ*


def _right_hand_side(ctx: _Context) -> _RightHandSide:
    # b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old))
    a = ctx.args
    with ctx.timed("gradients_seconds"):
        b, g_old = request_rhs(ctx.loss, ctx.resolved, ctx.batches, a.loss_normalization, ctx.M, a.progress)
    if not torch.isfinite(b).all():  # a solver would spend its whole budget on it
        raise DataError(
            "The loss gradients of the request's rows are not finite; check that the adapter's weights are "
            "finite and that the edited rows keep loss tokens after truncation (--max-length)."
        )
    return _RightHandSide(b, g_old)


@dataclass
class _Curvature:
    """The curvature phase: the K-FAC factors and Nyström sketch (None: not asked for), the indices of the
    training rows a sampled sketch holds (which the solve's sample then is; None: the seeded sample or all
    rows), the estimate of the edited objective, and what the manifest records of them."""

    factors: KFACFactors | None
    sketch: NystromSketch | None
    picked: list[int] | None
    estimate: _Estimate
    stats: dict


def _curvature(ctx: _Context, choice: dict, given_factors, given_sketch, row_sketch) -> _Curvature:
    a = ctx.args
    # C on the edited rows (∇²R' at θ*: a Newton step on the objective retraining minimises) or on the
    # original ones (∇²R, the paper's choice); a sample is of the training rows, then edited, and keeps
    # its normaliser from before the edit, as the whole edited set keeps M.
    # (the quadratic estimate takes the request's old rows out of the training run's factors itself)
    on_edited = a.curvature_on_edited and a.objective_estimate != "quadratic"
    curvature_data = ctx.resolved.edited_rows(ctx.rows) if on_edited else ctx.rows
    stats = {
        "curvature_data": "edited" if a.curvature_on_edited else "original",
        "objective_estimate_choice": choice,
    }
    factors = _factors(ctx, curvature_data, given_factors, stats)
    sketch, picked = _sketch(ctx, given_sketch, stats)
    with ctx.timed("estimate_seconds"):
        if a.objective_estimate == "sample":  # kept rows on a sample of them, the request's rows exact
            estimate = _sampled_estimate(ctx, factors, sketch, picked, row_sketch)
        elif a.objective_estimate == "quadratic":  # kept rows as K-FAC's quadratic, the request's exact
            estimate = _quadratic_estimate(ctx, factors)
        else:
            estimate = _full_estimate(ctx, factors, sketch, picked)
    if estimate.stats:
        stats["objective_estimate"] = estimate.stats
    return _Curvature(factors, sketch, picked, estimate, stats)


def _factors(ctx: _Context, rows: list, given: KFACFactors | None, stats: dict) -> KFACFactors | None:
    """The K-FAC factors on `rows` when asked for (None otherwise); records where they came from in `stats`."""
    a = ctx.args
    if not needs_factors(a):
        if given is not None:
            stats["curvature_factors_unused"] = "no kfac/ekfac curvature or preconditioner was asked for"
        return None
    with ctx.timed("curvature_factors_seconds"):
        factors, stats["curvature_factors"] = obtain_factors(
            a, ctx.model, ctx.task, ctx.space, rows, ctx.batches, ctx.processes, given
        )
        origin = stats["curvature_factors"]["origin"]
        if a.curvature in KFAC_CURVATURES and a.curvature_on_edited and origin != "pass":
            raise ConfigurationError(
                "curvature_data 'edited' with kfac/ekfac needs factors of the edited rows, but the factors "
                f"come from {origin!r} (the training run). Use "
                "--curvature-factors pass, or --curvature-data original (or auto) to use them."
            )
    return factors


def _sketch(
    ctx: _Context, given: NystromSketch | None, stats: dict
) -> tuple[NystromSketch | None, list | None]:
    """`(sketch, picked)` when a Nyström preconditioner is asked for, else `(None, None)`; records where the
    sketch came from in `stats`."""
    if not needs_sketch(ctx.args):
        if given is not None:
            stats["nystrom_sketch_unused"] = "no nystrom preconditioner was asked for"
        return None, None
    with ctx.timed("nystrom_sketch_seconds"):
        sketch, stats["nystrom_sketch"], picked = obtain_sketch(
            ctx.args, ctx.loss, ctx.rows, ctx.resolved, ctx.batches, ctx.M, given
        )
    return sketch, picked


@dataclass
class _Damping:
    value: float  # λ of the first attempt
    stats: dict  # `damping_auto`'s record, when it was chosen


def _damping(ctx: _Context, curvature: _Curvature) -> _Damping:
    if ctx.args.damping != "auto":
        return _Damping(ctx.args.damping, {})
    with ctx.timed("damping_seconds"):
        damping, record = choose_damping(curvature.estimate.curvature, ctx.b, ctx.args.seed)
    return _Damping(damping, {"damping_auto": record})


@dataclass
class _Solver:
    """The solve phase's set-up: the solver, C at θ*, and with refinement the tilted objective R̃ and
    `build_curvature()` (C at the current θ)."""

    solve: object
    curvature: object
    refining: bool
    tilted: object = None
    build_curvature: object = None


def _solver(ctx: _Context, curvature: _Curvature) -> _Solver:
    a = ctx.args
    estimate = curvature.estimate
    solve = make_solve(a, estimate.preconditioner, a.progress and ctx.processes.is_main)
    refining = bool(a.refine_steps) or a.refine_damping != "fixed"
    if not refining:
        return _Solver(solve, estimate.curvature, False, estimate.tilted)
    if estimate.tilted is not None:
        return _Solver(solve, estimate.curvature, True, estimate.tilted, estimate.tilted.curvature)
    tilted = FullTilted(ctx, ctx.resolved.edited_rows(ctx.rows))
    return _Solver(solve, estimate.curvature, True, tilted, _full_curvature(ctx, curvature))


@dataclass
class _KeptRows:
    """Two disjoint seeded samples of the rows the request keeps: the guard's (`guard`: None without a line
    search) and the check's, with the check's batches, loss tokens and loss per token at θ*."""

    guard_rows: list
    guard: KeptLossGuard | None
    check_rows: list
    check_batches: Batches
    check_tokens: float
    loss_before: float


def _kept_rows(ctx: _Context) -> _KeptRows:
    # Kept rows: cross-entropy per loss token on two disjoint seeded samples of the rows the request keeps
    # (a fixed cost). Retraining leaves their loss close to where training left it. The line search keeps
    # the first sample's rise within `kept_loss_tolerance` (a trust region, `KeptLossGuard`); the second
    # measures the result (`retain_check`). Without a line search, a result whose rise there exceeds the
    # tolerance went beyond what its estimate describes: the request is solved again with λ ten times
    # larger (at most KEPT_LOSS_RETRIES times).
    a = ctx.args
    edited_indices = {e.index for e in ctx.resolved.edits}
    kept = [row for i, row in enumerate(ctx.rows) if i not in edited_indices]
    kept_samples = sample_rows(kept, 2 * RETAIN_CHECK_ROWS, a.seed)
    guard_rows, check_rows = kept_samples[::2], kept_samples[1::2] or kept_samples
    guard = None
    if a.refine_damping == "line_search" and math.isfinite(a.kept_loss_tolerance) and guard_rows:
        guard = KeptLossGuard(
            ctx.model, ctx.task, ctx.batches(guard_rows), normaliser(ctx.task, guard_rows, "token", a.batch_size),
            a.kept_loss_tolerance, ctx.processes,
        )  # fmt: skip
    check_batches = ctx.batches(check_rows)
    tokens = normaliser(ctx.task, check_rows, "token", a.batch_size)
    before = ctx.token_loss(check_batches) / tokens
    return _KeptRows(guard_rows, guard, check_rows, check_batches, tokens, before)


@dataclass
class _Trial:
    """One solve at damping λ: Δθ (not applied; with `refine_damping="adaptive"` it may be the
    `NonPositiveCurvatureError` the solve raised), its solver stats, why it is inexact, and the refinement's
    per-step records (None: no refinement)."""

    damping: float
    delta: torch.Tensor | NonPositiveCurvatureError
    stats: SolverStats
    problems: list[str]
    refine_record: list | None = None


def _first_step(ctx: _Context, solver: _Solver, damping: float) -> _Trial:
    """The one-step update for `damping`; the parameters stay at θ*."""
    a = ctx.args
    # Δθ = −(C + μI + λI)⁻¹ b: the objective's L2 term adds μI (it does not change b)
    # refining, the first step is a Newton step too: solved to refine_tol's forcing term (∇R̃(θ*) = b)
    tol = a.newton_tol(1.0, 1.0) if solver.refining else a.tol
    with ctx.timed("solver_seconds"):
        try:
            delta, stats = solver.solve(solver.curvature, damping + a.l2, -ctx.b, tol)
            problems = _check(delta, stats, a, tol)
        except NonPositiveCurvatureError as e:
            if a.refine_damping != "adaptive":
                raise
            # Levenberg–Marquardt: the first trial is rejected, and `refine` retries with a larger λ
            delta, problems = e, []
            stats = SolverStats(  # no solve: x = 0, relative residual 1
                a.solver, 0, 1.0, False, extra={"first_trial_rejected_because": str(e)}
            )
    return _Trial(damping, delta, stats, problems)


def _refine(ctx: _Context, solver: _Solver, guard: KeptLossGuard | None, trial: _Trial) -> _Trial:
    """The refinement steps after `trial`'s one-step update; the parameters stay at θ*."""
    a = ctx.args
    with ctx.timed("refine_seconds"):
        delta, record = refine(
            solver.tilted, ctx.space, (trial.delta, solver.curvature, ctx.b), trial.damping, a,
            NewtonSolve(solver.solve, _check, solver.build_curvature), guard,
        )  # fmt: skip
    problems = trial.problems
    if not delta.any():
        why = "none lowered the tilted edited objective"
        if guard is not None and guard.rejections:
            why += f" while keeping the kept rows' loss within {a.kept_loss_tolerance:g} of θ*'s"
        problems.append(f"no step kept (refine_damping {a.refine_damping!r}): {why}")
        if not a.allow_inexact:
            raise SolverError(
                f"refine_damping {a.refine_damping!r} kept no step ({why}): nothing was changed. "
                "Raise --damping, --refine-steps or --kept-loss-tolerance, or use --refine-damping fixed."
            )
    return dataclasses.replace(trial, delta=delta, problems=problems, refine_record=record)


@dataclass
class _Solution:
    """The trial kept (the last), the check rows' loss per token after it, why it is inexact (its solve's
    problems and its refinement steps'), and what the manifest records of the refinement and the retries."""

    trial: _Trial
    kept_loss_after: float
    problems: list[str]
    stats: dict


def _solve_and_refine(ctx: _Context, solver: _Solver, kept: _KeptRows, damping: float) -> _Solution:
    """Δθ for `damping` (the one-step update, then the refinement steps), solved again with λ ten times larger
    while the kept rows' loss rose by more than `kept_loss_tolerance` (see `_kept_rows`)."""
    a = ctx.args
    theta_star = ctx.space.vector().clone()
    attempts = []
    while True:
        trial = _first_step(ctx, solver, damping)
        if solver.refining:
            trial = _refine(ctx, solver, kept.guard, trial)
        ctx.space.add_(trial.delta)
        after = ctx.token_loss(kept.check_batches) / kept.check_tokens
        ctx.space.set_(theta_star)
        attempts.append({"damping": damping, "kept_loss_after": after})
        # with a guard, its sample bounded every step, and the check's sample measures the result out of it
        rose = after - kept.loss_before > a.kept_loss_tolerance
        if kept.guard is not None or not rose or len(attempts) > KEPT_LOSS_RETRIES:
            break
        damping = 10 * max(damping, 1e-3)
    problems, stats = trial.problems, {}
    if trial.refine_record is not None:
        stats["refine"] = trial.refine_record
        problems += [p for step in trial.refine_record for p in step.get("problems", [])]
    if kept.guard is not None:
        stats["kept_loss_guard"] = {
            "rows": len(kept.guard_rows), "evaluations": kept.guard.calls, "rejections": kept.guard.rejections,
        }  # fmt: skip
    if len(attempts) > 1:
        stats["kept_loss_attempts"] = attempts
    return _Solution(trial, after, problems, stats)


@dataclass
class _Measured:
    """The forget-set check, Δθ by parameter name (applied) and ‖b‖."""

    forget: ForgetCheck
    delta: dict[str, torch.Tensor]
    b_norm: float


def _apply_and_measure(ctx: _Context, delta: torch.Tensor) -> _Measured:
    # Forget-set check: cross-entropy per loss token over the old versions (as `hf-unlearn evaluate`),
    # measured, and predicted to first order (∇·Δθ, with the token normalisation whose ∇ b holds).
    old = ctx.resolved.old
    old_batches = ctx.batches(old)
    tokens_old = normaliser(ctx.task, old, "token", ctx.args.batch_size)
    before = ctx.token_loss(old_batches) / tokens_old
    token_norm = ctx.args.loss_normalization == "token"
    predicted_change = (ctx.g_old.dot(delta) / tokens_old).item() if token_norm else None
    ctx.space.add_(delta)
    after = ctx.token_loss(old_batches) / tokens_old
    forget = ForgetCheck(before, after, predicted_change)
    return _Measured(forget, ctx.space.as_dict(delta), ctx.b.norm().item())


def _stats(ctx, curvature, damping, kept, solution, measured, work_rows) -> UnlearningStats:
    """The result's stats: the kept solve's, the checks, the sizes, and each phase's record."""
    delta_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in measured.delta.values()))
    sizes = Sizes(ctx.space.numel, ctx.M, len(ctx.rows), curvature.estimate.rows, ctx.processes.count)
    return UnlearningStats(
        solver=solution.trial.stats,
        inexact=bool(solution.problems),
        forget=measured.forget,
        retain=retain_check(kept.loss_before, solution.kept_loss_after, len(kept.check_rows)),
        sizes=sizes,
        b_norm=measured.b_norm,
        damping=solution.trial.damping,
        l2_regularization=ctx.args.l2,
        work_rows=work_rows,
        delta_norm=delta_norm,
        curvature=curvature.stats,
        damping_choice=damping.stats,
        solution=solution.stats,
    )


def _full_curvature(ctx: _Context, curvature: _Curvature):
    """`build_curvature()` for `FullTilted`: C'(θ) on the first step's rows (the edited set with M fixed, or
    the same edited sample). With `curvature="kfac"|"ekfac"` the factors are recomputed at every θ by one pass
    over the edited rows (`curvature_samples` of them); a K-FAC or Nyström *preconditioner* keeps the θ* factors
    or sketch (it only changes the speed of the solve)."""
    args, task, M = ctx.args, ctx.task, ctx.M
    edited = ctx.resolved.edited_rows(ctx.rows)
    curvature_rows, curvature_M = curvature_sample(
        task, ctx.rows, ctx.resolved, True, args, M, curvature.picked
    )
    norm = args.loss_normalization

    def build():
        step_factors = curvature.factors
        if args.curvature in KFAC_CURVATURES:
            step_factors, _ = obtain_factors(
                dataclasses.replace(args, curvature_factors="pass"),
                ctx.model,
                task,
                ctx.space,
                edited,
                ctx.batches,
                ctx.processes,
            )
            # The factors are normalised by their rows' own M; R' keeps the original M.
            step_factors.info["normaliser"] *= M / normaliser(task, edited, norm, args.batch_size)
        return build_operators(
            args, dataclasses.replace(ctx.loss, task=task), curvature_rows, ctx.batches, step_factors,
            curvature_M, curvature.sketch,
        )[0]  # fmt: skip

    return build


@dataclass
class _Estimate:
    """How the edited objective is estimated: its curvature at θ*, the CG preconditioner, the tilted objective
    for refinement (None: `FullTilted`, made on demand), the curvature's rows and what the manifest records."""

    curvature: object
    preconditioner: object
    tilted: object
    rows: int
    stats: dict
    next_factors: KFACFactors | None = None  # the edited training set's K-FAC factors, for the next request


def _full_estimate(ctx: _Context, factors, sketch, picked) -> _Estimate:
    """C over the edited rows (or a seeded sample of them, `hessian_samples`), or the original ones."""
    a = ctx.args
    rows, M = curvature_sample(ctx.task, ctx.rows, ctx.resolved, a.curvature_on_edited, a, ctx.M, picked)
    curvature, preconditioner = build_operators(a, ctx.loss, rows, ctx.batches, factors, M, sketch)
    return _Estimate(curvature, preconditioner, None, len(rows), {})


def _sampled_estimate(ctx: _Context, factors, sketch, picked, row_sketch) -> _Estimate:
    """`SampledTilted`: the kept rows on the seeded sample (plus, with `interacting_rows`, the rows the request
    interacts with most, by a row-gradient sketch), the request's rows exact."""
    a = ctx.args
    picked = picked if picked is not None else sample_indices(len(ctx.rows), a.hessian_samples, a.seed)
    include, stats = [], {}
    if a.interacting_rows:
        origin = "given" if row_sketch is not None else "pass"
        row_sketch = row_sketch or RowGradientSketch.compute(
            ctx.model, ctx.task, ctx.space, ctx.rows, a.loss_normalization, seed=a.seed,
            progress=a.progress and ctx.processes.is_main,
        )  # fmt: skip
        include = row_sketch.interacting(ctx.b, a.interacting_rows, set(ctx.resolved.indices))
        stats["row_gradient_sketch"] = {"origin": origin, "rows": len(row_sketch.vectors)}
    sample = KeptSample(ctx.task, ctx.rows, ctx.resolved, picked, ctx.M, a, include)
    tilted = SampledTilted(ctx, sample)
    preconditioner = build_operators(a, ctx.loss, [], ctx.batches, factors, ctx.M, sketch)[1]
    stats |= {
        "kind": "sample",
        "sampled_rows": sample.num_sampled,
        "kept_sample_rows": len(sample.kept),
        "interacting_rows": sample.num_included,
        "interacting_row_indices": sorted(set(include) - set(ctx.resolved.indices)),
        "new_rows": len(sample.new),
    }
    return _Estimate(tilted.curvature(), preconditioner, tilted, sample.num_rows, stats)


def _quadratic_estimate(ctx: _Context, factors: KFACFactors) -> _Estimate:
    """`QuadraticTilted`: the kept rows as the K-FAC quadratic of the training run with the request's old rows
    taken out (one pass over those rows), the request's new rows exact; K-FAC's block inverse preconditions."""
    a = ctx.args
    norm = a.loss_normalization
    old = fit_kfac_factors(
        ctx.loss,
        ctx.batches(ctx.resolved.old),
        norm,
        ctx.M,
        targets=factors.targets,
        seed=a.seed,
        source="request",
    )
    kept_factors = factors.without(old)
    kept = KFAC_OPERATORS["kfac"](
        ctx.model, ctx.task, ctx.space, ctx.batches([]), norm, kept_factors.normaliser, ctx.processes,
        factors=kept_factors,
    )  # fmt: skip
    new_rows = ctx.resolved.new
    tilted = QuadraticTilted(ctx, kept, new_rows)
    # the edited training set's factors for the next request: the new versions' added (taken at θ*, as the rest)
    next_factors = kept_factors
    if new_rows:
        next_factors = kept_factors.with_rows(
            fit_kfac_factors(
                ctx.loss,
                ctx.batches(new_rows),
                norm,
                ctx.M,
                targets=factors.targets,
                seed=a.seed,
                source="request",
            )  # fmt: skip
        )
    next_factors.info["source"] = "updated by a request"
    stats = {"kind": "quadratic", "kept_factor_positions": sum(kept_factors.positions.values())}
    return _Estimate(tilted.curvature(), kept, tilted, len(new_rows), stats, next_factors)
