"""The LLMEraser update: request -> b -> solve -> apply (docs/method.md §2).

Δθ = −(C + λI)⁻¹ b,   b = (1/M) [ Σ_{a∈A} ∇ℓ(a; θ*) − Σ_{o∈O} ∇ℓ(o; θ*) ],   θ ← θ* + Δθ
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
from .data import ExampleEncoder, TrainingSet
from .distributed import Processes, check_curvature_supported
from .errors import ConfigurationError, DataError, NonPositiveCurvatureError, SolverError
from .gradients import WORK, Batches, gradient_sum, loss_sum
from .objective import CausalLMTask, UnlearningTask, normaliser
from .params import ParameterSpace, computation_mode
from .refinement import (
    FullTilted,
    KeptLossGuard,
    KeptSample,
    QuadraticTilted,
    SampledTilted,
    choose_damping,
    refine,
)
from .request import ResolvedRequest, UnlearningRequest
from .solvers import make_solve
from .solvers.base import SolverStats

logger = logging.getLogger(__name__)

FORGET_LOSS_DEFINITION = (
    "cross-entropy per loss token over the old versions (token-weighted mean, as hf-unlearn evaluate)"
)


@dataclass
class UnlearningResult:
    """What `unlearn` did. `delta` maps each trainable parameter's name to its Δθ (already applied)."""

    delta: dict[str, torch.Tensor]
    stats: dict
    request: ResolvedRequest
    timings: dict = field(default_factory=dict)
    # preconditioner "nystrom": the sketch downdated by this request, i.e. of the edited training set (the
    # next request's starting point; hf-unlearn unlearn saves it beside the output adapter)
    nystrom_sketch: NystromSketch | None = None
    # objective_estimate "quadratic": the K-FAC factors of the edited training set, likewise
    curvature_factors: KFACFactors | None = None

    @property
    def delta_norm(self) -> float:
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.delta.values()))


def pad_token_id(tokenizer, model) -> int:
    """The tokenizer's pad id, else the model config's, else 0 (padding carries no loss and is masked)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad or 0


def default_task(model, tokenizer=None) -> CausalLMTask:
    return CausalLMTask(ExampleEncoder(tokenizer), pad_token_id=pad_token_id(tokenizer, model))


def unlearn(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping] | TrainingSet,
    request: UnlearningRequest,
    args: UnlearningArguments | None = None,
    *,
    task: UnlearningTask | None = None,
    tokenizer=None,
    curvature_factors: KFACFactors | None = None,
    nystrom_sketch: NystromSketch | None = None,
    row_gradient_sketch: RowGradientSketch | None = None,
) -> UnlearningResult:
    """Apply the LLMEraser update `Δθ = −(C + (μ + λ)I)⁻¹ b` for `request` to the trainable parameters of
    `model`, in place (C over the edited rows unless `args.curvature_data` says otherwise; μ =
    `args.l2_regularization`).

    `train_dataset` is what the adapter was trained on (rows of `input_ids`/`labels`, or `prompt`/`response`
    with a `tokenizer`); request ids are its row indices, or the ids of a `TrainingSet`. `task` replaces the
    causal-LM loss for other models. `curvature_factors` are K-FAC factors for `curvature="kfac"|"ekfac"` or
    a K-FAC preconditioner (e.g. captured during training; see `args.curvature_factors` for the other
    sources); `nystrom_sketch` the training set's sketch for `preconditioner="nystrom"` (e.g. the
    `nystrom_sketch` of an earlier result). Returns the applied Δθ and the solver statistics.
    """
    args = args or UnlearningArguments()
    check_curvature_supported(args.curvature, model)
    task = task or default_task(model, tokenizer)
    train = train_dataset if isinstance(train_dataset, TrainingSet) else TrainingSet(train_dataset)
    processes = Processes()
    timings = {}
    start, work_before = time.perf_counter(), WORK.snapshot()
    resolved = request.resolve(train, task)
    space = ParameterSpace(model)
    device = space.params[0].device
    estimate_choice = choose_objective_estimate(args, model, space)
    args = dataclasses.replace(args, objective_estimate=estimate_choice["kind"])

    with computation_mode(model, args.torch_dtype):
        norm = args.loss_normalization
        all_rows = [train[i] for i in range(len(train))]
        M = normaliser(task, all_rows, norm, args.batch_size)

        def batches(rows):
            return Batches(task, rows, args.batch_size, device, processes)

        # b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old))
        t = time.perf_counter()
        show = args.progress
        old_batches = batches(resolved.old)
        b, g_old = request_rhs(model, task, space, resolved, batches, norm, processes, M, show)
        timings["gradients_seconds"] = time.perf_counter() - t
        if not torch.isfinite(b).all():  # a solver would spend its whole budget on it
            raise DataError(
                "The loss gradients of the request's rows are not finite; check that the adapter's weights are "
                "finite and that the edited rows keep loss tokens after truncation (--max-length)."
            )

        # C on the edited rows (∇²R' at θ*: a Newton step on the objective retraining minimises) or on the
        # original ones (∇²R, the paper's choice); a sample is of the training rows, then edited, and keeps
        # its normaliser from before the edit, as the whole edited set keeps M.
        edited = resolved.edited_rows(all_rows)
        # (the quadratic estimate takes the request's old rows out of the training run's factors itself)
        on_edited = args.curvature_on_edited and args.objective_estimate != "quadratic"
        curvature_data = edited if on_edited else all_rows
        extra_stats = {
            "curvature_data": "edited" if args.curvature_on_edited else "original",
            "objective_estimate_choice": estimate_choice,
        }
        factors = None
        if needs_factors(args):
            t = time.perf_counter()
            factors, extra_stats["curvature_factors"] = obtain_factors(
                args, model, task, space, curvature_data, batches, processes, curvature_factors
            )
            if (
                args.curvature in KFAC_CURVATURES
                and args.curvature_on_edited
                and extra_stats["curvature_factors"]["origin"] != "pass"
            ):
                raise ConfigurationError(
                    "curvature_data 'edited' with kfac/ekfac needs factors of the edited rows, but the factors "
                    f"come from {extra_stats['curvature_factors']['origin']!r} (the training run). Use "
                    "--curvature-factors pass, or --curvature-data original (or auto) to use them."
                )
            timings["curvature_factors_seconds"] = time.perf_counter() - t
        elif curvature_factors is not None:
            extra_stats["curvature_factors_unused"] = (
                "no kfac/ekfac curvature or preconditioner was asked for"
            )
        # picked: the indices of the training rows a sampled sketch holds, which the solve's sample then is
        sketch, picked = None, None
        if needs_sketch(args):
            t = time.perf_counter()
            sketch, extra_stats["nystrom_sketch"], picked = obtain_sketch(
                args, model, task, space, all_rows, resolved, batches, processes, M, nystrom_sketch
            )
            timings["nystrom_sketch_seconds"] = time.perf_counter() - t
        elif nystrom_sketch is not None:
            extra_stats["nystrom_sketch_unused"] = "no nystrom preconditioner was asked for"
        mu = args.l2
        ctx = _Context(model, task, space, processes, args, all_rows, resolved, M, batches, b, g_old)
        t = time.perf_counter()
        if args.objective_estimate == "sample":  # kept rows on a sample of them, the request's rows exact
            estimate = _sampled_estimate(ctx, factors, sketch, picked, row_gradient_sketch)
        elif args.objective_estimate == "quadratic":  # kept rows as K-FAC's quadratic, the request's exact
            estimate = _quadratic_estimate(ctx, factors)
        else:
            estimate = _full_estimate(ctx, factors, sketch, picked)
        timings["estimate_seconds"] = time.perf_counter() - t
        curvature, preconditioner, tilted = estimate.curvature, estimate.preconditioner, estimate.tilted
        num_curvature_rows = estimate.rows
        if estimate.stats:
            extra_stats["objective_estimate"] = estimate.stats

        damping = args.damping
        if damping == "auto":
            t = time.perf_counter()
            damping, extra_stats["damping_auto"] = choose_damping(curvature, b, args.seed)
            timings["damping_seconds"] = time.perf_counter() - t

        solve = make_solve(args, preconditioner, show and processes.is_main)
        refining = bool(args.refine_steps) or args.refine_damping != "fixed"
        if refining:
            if tilted is None:
                edited = resolved.edited_rows(all_rows)
                tilted = FullTilted(
                    model, task, space, all_rows, edited, M, mu, norm, batches, processes, show
                )  # fmt: skip
                build_curvature = _full_curvature(
                    args, model, task, space, all_rows, resolved, M, batches, processes, factors, picked, sketch
                )  # fmt: skip
            else:
                build_curvature = tilted.curvature

        # Kept rows: cross-entropy per loss token on two disjoint seeded samples of the rows the request keeps
        # (a fixed cost). Retraining leaves their loss close to where training left it. The line search keeps
        # the first sample's rise within `kept_loss_tolerance` (a trust region, `KeptLossGuard`); the second
        # measures the result (`retain_check`). Without a line search, a result whose rise there exceeds the
        # tolerance went beyond what its estimate describes: the request is solved again with λ ten times
        # larger (at most KEPT_LOSS_RETRIES times).
        edited_indices = {e.index for e in resolved.edits}
        kept = [row for i, row in enumerate(all_rows) if i not in edited_indices]
        kept_samples = sample_rows(kept, 2 * RETAIN_CHECK_ROWS, args.seed)
        guard_rows, kept_sample = kept_samples[::2], kept_samples[1::2] or kept_samples
        guard = None
        if args.refine_damping == "line_search" and math.isfinite(args.kept_loss_tolerance) and guard_rows:
            guard = KeptLossGuard(
                model, task, batches(guard_rows), normaliser(task, guard_rows, "token", args.batch_size),
                args.kept_loss_tolerance, processes,
            )  # fmt: skip

        def solve_and_refine(damping):
            """Δθ for `damping`: the one-step update, then the refinement steps; the parameters stay at θ*."""
            refine_record = None
            t = time.perf_counter()
            # Δθ = −(C + μI + λI)⁻¹ b: the objective's L2 term adds μI (it does not change b)
            # refining, the first step is a Newton step too: solved to refine_tol's forcing term (∇R̃(θ*) = b)
            tol = args.newton_tol(1.0, 1.0) if refining else args.tol
            try:
                delta, stats = solve(curvature, damping + mu, -b, tol)
                problems = _check(delta, stats, args, tol)
            except NonPositiveCurvatureError as e:
                if args.refine_damping != "adaptive":
                    raise
                # Levenberg–Marquardt: the first trial is rejected, and `refine` retries with a larger λ
                delta, problems = e, []
                stats = SolverStats(  # no solve: x = 0, relative residual 1
                    args.solver, 0, 1.0, False, extra={"first_trial_rejected_because": str(e)}
                )
            timings["solver_seconds"] = time.perf_counter() - t

            if refining:
                t = time.perf_counter()
                delta, refine_record = refine(
                    tilted,
                    space,
                    (delta, curvature, b),
                    damping,
                    args,
                    solve,
                    _check,
                    build_curvature,
                    guard,
                )
                timings["refine_seconds"] = time.perf_counter() - t
                if not delta.any():
                    why = "none lowered the tilted edited objective"
                    if guard is not None and guard.rejections:
                        why += (
                            f" while keeping the kept rows' loss within {args.kept_loss_tolerance:g} of θ*'s"
                        )
                    problems.append(f"no step kept (refine_damping {args.refine_damping!r}): {why}")
                    if not args.allow_inexact:
                        raise SolverError(
                            f"refine_damping {args.refine_damping!r} kept no step ({why}): nothing was changed. "
                            "Raise --damping, --refine-steps or --kept-loss-tolerance, or use --refine-damping fixed."
                        )

            return delta, stats, problems, refine_record

        kept_batches = batches(kept_sample)
        tokens_kept = normaliser(task, kept_sample, "token", args.batch_size)
        retain_before = loss_sum(model, task, kept_batches, "token", processes) / tokens_kept
        theta_star = space.vector().clone()
        attempts = []
        while True:
            delta, stats, problems, refine_record = solve_and_refine(damping)
            space.add_(delta)
            retain_after = loss_sum(model, task, kept_batches, "token", processes) / tokens_kept
            space.set_(theta_star)
            attempts.append({"damping": damping, "kept_loss_after": retain_after})
            # with a guard, its sample bounded every step, and the check's sample measures the result out of it
            rose = retain_after - retain_before > args.kept_loss_tolerance
            if guard is not None or not rose or len(attempts) > KEPT_LOSS_RETRIES:
                break
            damping = 10 * max(damping, 1e-3)
        if refine_record is not None:
            extra_stats["refine"] = refine_record
            problems += [p for step in refine_record for p in step.get("problems", [])]
        if guard is not None:
            extra_stats["kept_loss_guard"] = {
                "rows": len(guard_rows), "evaluations": guard.calls, "rejections": guard.rejections,
            }  # fmt: skip
        if len(attempts) > 1:
            extra_stats["kept_loss_attempts"] = attempts

        # Forget-set check: cross-entropy per loss token over the old versions (as `hf-unlearn evaluate`),
        # measured, and predicted to first order (∇·Δθ, with the token normalisation whose ∇ b holds).
        tokens_old = normaliser(task, resolved.old, "token", args.batch_size)
        forget_before = loss_sum(model, task, old_batches, "token", processes) / tokens_old
        predicted_change = (g_old.dot(delta) / tokens_old).item() if norm == "token" else None
        space.add_(delta)
        forget_after = loss_sum(model, task, old_batches, "token", processes) / tokens_old
        delta_dict = space.as_dict(delta)
        b_norm = b.norm().item()
    timings["total_seconds"] = time.perf_counter() - start
    stats_dict = stats.to_dict() | {
        "inexact": bool(problems),
        "forget_loss_before": forget_before,
        "forget_loss_after": forget_after,
        "forget_loss_change_predicted": predicted_change,
        "forget_loss_change_measured": forget_after - forget_before,
        "forget_loss_definition": FORGET_LOSS_DEFINITION,
        "retain_check": retain_check(retain_before, retain_after, len(kept_sample)),
        "num_params": space.numel,
        "normaliser": M,
        "num_train": len(train),
        "num_curvature_rows": num_curvature_rows,
        "b_norm": b_norm,
        "num_processes": processes.count,
        "damping": damping,
        "l2_regularization": mu,
        # rows through the model, by kind of pass (this process's count of every process's rows)
        "work_rows": WORK.since(work_before),
        **extra_stats,
    }
    # the sketch is handed on (saved beside the output, reused by the next request) only once it is the
    # edited training set's: downdated, which happens when C is over the edited rows
    handed_on = sketch if args.curvature_on_edited else None
    result = UnlearningResult(delta_dict, stats_dict, resolved, timings, handed_on, estimate.next_factors)
    result.stats["delta_norm"] = result.delta_norm
    return result


# The kept-rows check: rows sampled, and the rise of their loss (nats per token) that is named as a warning —
# retraining fits the kept rows as training did, so their loss stays close to where training left it.
RETAIN_CHECK_ROWS = 32
RETAIN_RISE_WARNING = 0.5
KEPT_LOSS_RETRIES = 5


def retain_check(before: float, after: float, rows: int) -> dict:
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
    return {"rows": rows, "loss_before": before, "loss_after": after, "warning": warning}


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
    task = task or default_task(model, tokenizer)
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
    task = task or default_task(model, tokenizer)
    train = train_dataset if isinstance(train_dataset, TrainingSet) else TrainingSet(train_dataset)
    space, processes = ParameterSpace(model), Processes()
    device = space.params[0].device
    norm = args.loss_normalization
    with computation_mode(model, args.torch_dtype):
        rows = [train[i] for i in range(len(train))]
        sample = sample_rows(rows, args.curvature_samples, args.seed)
        return fit_kfac_factors(
            model, task, space, Batches(task, sample, args.batch_size, device, processes), norm,
            normaliser(task, sample, norm, args.batch_size), processes, targets=args.kfac_targets or "empirical",
            seed=args.seed, source="prepare",
        )  # fmt: skip


def request_rhs(model, task, space, resolved, batches, norm, processes, M, show=False):
    """`(b, Σ∇ℓ(old))` of a resolved request: b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at the current θ (docs/method.md §2).

    `batches(rows)` makes this process's `Batches`; `show` adds progress bars."""
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


def _full_curvature(
    args, model, task, space, all_rows, resolved, M, batches, processes, factors, picked, sketch
):
    """`build_curvature()` for `FullTilted`: C'(θ) on the first step's rows (the edited set with M fixed, or
    the same edited sample). With `curvature="kfac"|"ekfac"` the factors are recomputed at every θ by one pass
    over the edited rows (`curvature_samples` of them); a K-FAC or Nyström *preconditioner* keeps the θ* factors
    or sketch (it only changes the speed of the solve)."""
    edited = resolved.edited_rows(all_rows)
    curvature_rows, curvature_M = curvature_sample(task, all_rows, resolved, True, args, M, picked)
    norm = args.loss_normalization

    def build():
        step_factors = factors
        if args.curvature in KFAC_CURVATURES:
            step_factors, _ = obtain_factors(
                dataclasses.replace(args, curvature_factors="pass"),
                model,
                task,
                space,
                edited,
                batches,
                processes,
            )
            # The factors are normalised by their rows' own M; R' keeps the original M.
            step_factors.info["normaliser"] *= M / normaliser(task, edited, norm, args.batch_size)
        return build_operators(
            args, model, task, space, curvature_rows, batches, processes, step_factors, curvature_M, sketch
        )[0]

    return build


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
    batches: object  # rows -> this process's Batches
    b: torch.Tensor  # (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at θ*
    g_old: torch.Tensor  # Σ∇ℓ(old) at θ*


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
    curvature, preconditioner = build_operators(
        a, ctx.model, ctx.task, ctx.space, rows, ctx.batches, ctx.processes, factors, M, sketch
    )
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
    tilted = SampledTilted(
        ctx.model, ctx.task, ctx.space, sample, ctx.M, a.l2, ctx.g_old, a, ctx.batches, ctx.processes
    )
    preconditioner = build_operators(
        a, ctx.model, ctx.task, ctx.space, [], ctx.batches, ctx.processes, factors, ctx.M, sketch
    )[1]
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
        ctx.model, ctx.task, ctx.space, ctx.batches(ctx.resolved.old), norm, ctx.M, ctx.processes,
        targets=factors.targets, seed=a.seed, source="request",
    )  # fmt: skip
    kept_factors = factors.without(old)
    kept = KFAC_OPERATORS["kfac"](
        ctx.model, ctx.task, ctx.space, ctx.batches([]), norm, kept_factors.normaliser, ctx.processes,
        factors=kept_factors,
    )  # fmt: skip
    new_rows = ctx.resolved.new
    tilted = QuadraticTilted(
        ctx.model, ctx.task, ctx.space, kept, ctx.M, a.l2, ctx.g_old, a, ctx.batches, ctx.processes, new_rows
    )
    # the edited training set's factors for the next request: the new versions' added (taken at θ*, as the rest)
    next_factors = kept_factors
    if new_rows:
        next_factors = kept_factors.with_rows(
            fit_kfac_factors(
                ctx.model,
                ctx.task,
                ctx.space,
                ctx.batches(new_rows),
                norm,
                ctx.M,
                ctx.processes,
                targets=factors.targets,
                seed=a.seed,
                source="request",
            )  # fmt: skip
        )
    next_factors.info["source"] = "updated by a request"
    stats = {"kind": "quadratic", "kept_factor_positions": sum(kept_factors.positions.values())}
    return _Estimate(tilted.curvature(), kept, tilted, len(new_rows), stats, next_factors)
