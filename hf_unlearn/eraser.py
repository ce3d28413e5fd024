"""The LLMEraser update: request -> b -> solve -> apply (DESIGN §2).

Δθ = −(C + λI)⁻¹ b,   b = (1/M) [ Σ_{a∈A} ∇ℓ(a; θ*) − Σ_{o∈O} ∇ℓ(o; θ*) ],   θ ← θ* + Δθ
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .config import KFAC_CURVATURES, UnlearningArguments
from .curvature.kfac import KFACFactors
from .curvature.nystrom import NystromSketch
from .curvature.setup import (
    build_operators,
    compute_sketch,
    curvature_sample,
    needs_factors,
    needs_sketch,
    obtain_factors,
    obtain_sketch,
)
from .curvature.spectrum import lanczos_extremes
from .data import ExampleEncoder, TrainingSet
from .distributed import Processes, check_curvature_supported
from .errors import ConfigurationError, DataError, NonPositiveCurvatureError, SolverError
from .gradients import Batches, gradient_sum, loss_sum
from .objective import CausalLMTask, UnlearningTask, normaliser
from .params import ParameterSpace, computation_mode
from .request import ResolvedRequest, UnlearningRequest
from .solvers import SOLVERS
from .solvers.base import SolverStats

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
    start = time.perf_counter()
    resolved = request.resolve(train, task)
    space = ParameterSpace(model)
    device = space.params[0].device

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
        curvature_data = edited if args.curvature_on_edited else all_rows
        extra_stats = {"curvature_data": "edited" if args.curvature_on_edited else "original"}
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
        curvature_rows, curvature_M = curvature_sample(
            task, all_rows, resolved, args.curvature_on_edited, args, M, picked
        )
        curvature, preconditioner = build_operators(
            args, model, task, space, curvature_rows, batches, processes, factors, curvature_M, sketch
        )
        mu = args.l2

        damping = args.damping
        if damping == "auto":
            t = time.perf_counter()
            damping, extra_stats["damping_auto"] = choose_damping(curvature, b, args.seed)
            timings["damping_seconds"] = time.perf_counter() - t

        solve = SOLVERS[args.solver]
        solver_options = {
            "tol": args.tol,
            "max_iter": args.max_iter,
            "progress": show and processes.is_main,
            "seed": args.seed,
            "stochastic_batch_size": args.stochastic_batch_size,
            "qp_optimizer": args.qp_optimizer,
            "qp_lr": args.qp_lr,
            "lissa_scale": args.lissa_scale,
            "preconditioner": preconditioner,
        }
        t = time.perf_counter()
        # Δθ = −(C + μI + λI)⁻¹ b: the objective's L2 term adds μI (it does not change b)
        try:
            delta, stats = solve(curvature, damping + mu, -b, **solver_options)
            problems = _check(delta, stats, args)
        except NonPositiveCurvatureError as e:
            if args.refine_damping != "adaptive":
                raise
            # Levenberg–Marquardt: the first trial is rejected, and `refine` retries with a larger λ
            delta, problems = e, []
            stats = SolverStats(  # no solve: x = 0, relative residual 1
                args.solver, 0, 1.0, False, extra={"first_trial_rejected_because": str(e)}
            )
        timings["solver_seconds"] = time.perf_counter() - t

        if args.refine_steps or args.refine_damping != "fixed":
            t = time.perf_counter()
            delta, extra_stats["refine"] = refine(
                model,
                task,
                space,
                all_rows,
                resolved,
                (delta, curvature, b),
                damping,
                M,
                args,
                batches,
                processes,
                solver_options,
                factors,
                picked,
            )
            timings["refine_seconds"] = time.perf_counter() - t
            if not delta.any():
                problems.append(
                    f"no step lowered the tilted edited objective (refine_damping {args.refine_damping!r})"
                )
                if not args.allow_inexact:
                    raise SolverError(
                        f"refine_damping {args.refine_damping!r} kept no step (none lowered the tilted edited "
                        "objective): nothing was changed. Raise --damping or --refine-steps, or use --refine-damping "
                        "fixed."
                    )

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
        "num_params": space.numel,
        "normaliser": M,
        "num_train": len(train),
        "num_curvature_rows": len(curvature_rows),
        "b_norm": b_norm,
        "num_processes": processes.count,
        "damping": damping,
        "l2_regularization": mu,
        **extra_stats,
    }
    # the sketch is handed on (saved beside the output, reused by the next request) only once it is the
    # edited training set's: downdated, which happens when C is over the edited rows
    handed_on = sketch if args.curvature_on_edited else None
    result = UnlearningResult(delta_dict, stats_dict, resolved, timings, handed_on)
    result.stats["delta_norm"] = result.delta_norm
    return result


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


def request_rhs(model, task, space, resolved, batches, norm, processes, M, show=False):
    """`(b, Σ∇ℓ(old))` of a resolved request: b = (1/M)(Σ∇ℓ(new) − Σ∇ℓ(old)) at the current θ (DESIGN §2).

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


def _check(delta: torch.Tensor, stats, args: UnlearningArguments) -> list[str]:
    """Why the solve is not exact (empty when it is); raises `SolverError` unless `allow_inexact` keeps a finite
    result. Exact means converged (cg, direct) or, for budgeted mini-batch solvers (lissa, qp), better than no
    update."""
    finite = bool(torch.isfinite(delta).all())
    problems = [] if finite else ["the solver produced non-finite values"]
    if stats.extra.get("stochastic"):
        if finite and not stats.relative_residual < 1.0:
            problems.append(
                f"{args.solver} diverged: after {stats.iterations} mini-batch steps the relative residual is "
                f"{stats.relative_residual:.3g} (≥ 1, worse than no update); lower --qp-lr, raise --lissa-scale "
                "or --stochastic-batch-size"
            )
    elif not stats.converged:
        problems.append(
            f"{args.solver} did not converge in {stats.iterations} iterations (relative residual "
            f"{stats.relative_residual:.3g} > tol {args.tol:g})"
        )
    worse = finite and not stats.relative_residual < 1.0  # no better than no update: never kept
    if problems and not (finite and args.allow_inexact and not worse):
        if worse and args.allow_inexact:
            problems.append(
                "--allow-inexact keeps only a result better than no update (relative residual < 1)"
            )
        raise SolverError(
            "; ".join(problems).capitalize()
            + "; nothing was changed. Raise --max-iter or --damping, loosen --tol, "
            "or pass --allow-inexact to keep an inexact (finite) result."
        )
    return problems


AUTO_DAMPING_STEPS = 30


def choose_damping(curvature, b: torch.Tensor, seed: int) -> tuple[float, dict]:
    """`damping="auto"`: λ = max(0, −2·λ_min) + 0.01·λ_max from Lanczos estimates of C's extreme eigenvalues.

    Ritz values lie inside the spectrum, so the estimated λ_min is an upper bound on the true one; the factor
    2 covers that under-estimate of the negative part, and `0.01·λ_max` bounds the condition number of
    `C + λI` by about 100 where C is (near) positive semi-definite.
    """
    low, high, steps = lanczos_extremes(
        curvature.matvec, curvature.size, AUTO_DAMPING_STEPS, dtype=b.dtype, device=b.device, seed=seed
    )
    if not high > 0:
        raise SolverError(
            f"damping 'auto': the curvature has no positive eigenvalue (Lanczos estimate λ_max = {high:.3g}); "
            "check the model and data, or give --damping explicitly."
        )
    damping = max(0.0, -2.0 * low) + 0.01 * high
    return damping, {
        "lanczos_steps": steps,
        "eig_min_estimate": low,
        "eig_max_estimate": high,
        "damping": damping,
    }


def raised(lam: float, curvature, grad: torch.Tensor, suggestion: float | None = None) -> float:
    """Levenberg–Marquardt's λ after a rejected trial: 3λ; from λ = 0, where tripling would retry the same
    step, the damping CG suggested after meeting non-positive curvature, else the `damping="auto"` value."""
    if lam > 0:
        return 3 * lam
    return suggestion if suggestion is not None else choose_damping(curvature, grad, seed=0)[0]


ARMIJO = 1e-4  # sufficient decrease: R̃(θ + t·d) ≤ R̃(θ) + ARMIJO·t·∇R̃ᵀd
MAX_HALVINGS = 8  # shortest trial step 2⁻⁸ of the Newton step


def backtrack(tilted, space, start, step, value, slope):
    """Backtracking line search along `step` from θ = `start`: the first t in 1, ½, ¼, … with
    R̃(θ + t·step) ≤ R̃(θ) + ARMIJO·t·slope (`slope` = ∇R̃(θ)ᵀstep, negative for a descent direction).

    Returns `(t, R̃ at the new θ)` and leaves the parameters there; `(0.0, value)` at `start` when no length
    is accepted (or `step` is not a descent direction)."""
    length = 1.0
    for _ in range(MAX_HALVINGS + 1 if slope < 0 else 0):
        space.set_(start + length * step)
        new_value = tilted()
        if new_value <= value + ARMIJO * length * slope:
            return length, new_value
        length /= 2
    space.set_(start)
    return 0.0, value


def refine(
    model, task, space, all_rows, resolved, first_step, damping, M, args, batches, processes, solver_options,
    factors=None, picked=None,
):  # fmt: skip
    """`refine_steps` damped Newton steps on the tilted edited objective (DESIGN §2 "Beyond one step").

    From θ₁ = θ* + Δθ: `θ ← θ − (C'(θ) + (μ + λ)I)⁻¹ (∇R'(θ) − ∇R(θ*))`, where R' and its curvature C' (the
    chosen `curvature`) are over the edited training set — the kept rows plus the new versions — with the
    normaliser M of the original set kept fixed, R and R' include the objective's (μ/2)‖θ‖² term, and the
    solver is the first step's; with `hessian_samples`, C' is taken on the first step's edited sample
    (`curvature_sample` of the same training rows: the seeded sample, or `picked`). With
    `curvature="kfac"|"ekfac"` the factors are recomputed at every θ by one pass over the edited rows
    (`curvature_samples` of them); a K-FAC *preconditioner* keeps the θ* factors (it only changes the speed
    of the solve). `first_step` is `(Δθ, C, b)` of the one-step update. With `refine_damping="fixed"` every step uses
    λ = `damping`; with `"adaptive"` (Levenberg–Marquardt) the one-step update itself is the first trial, and
    a step is kept only if it lowers `R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩`, after which λ ← max(λ/3, damping),
    and a rejected step (or a solve that meets non-positive curvature, the first one included) leaves θ and sets
    λ ← 3λ — from λ = 0, the damping CG suggested, else the 'auto' damping of the current curvature; it makes
    `refine_steps + 1` trials. With `"line_search"` (damped Newton) every step, the one-step update first, keeps
    λ = `damping` and is shortened by halves until R̃ drops by the Armijo condition (`backtrack`); the
    iteration stops early when no length does. Returns the total θ − θ* and per-step stats; the parameters
    are left at θ* (the caller applies the total), also when a step fails.
    """
    norm, show = args.loss_normalization, args.progress
    adaptive = args.refine_damping == "adaptive"
    line_search = args.refine_damping == "line_search"
    edited = resolved.edited_rows(all_rows)
    theta_star = space.vector().clone()
    mu = args.l2  # R carries (μ/2)‖θ‖²: μθ in every gradient, μI in every curvature
    solve = SOLVERS[args.solver]
    steps = []
    try:
        grad_star = (
            gradient_sum(
                model, task, space, batches(all_rows), norm, processes, "gradient ∇R(θ*)" if show else None
            )
            / M
            + mu * theta_star
        )
        edited_batches = batches(edited)
        # C'(θ) on the first step's rows: the edited set with M fixed, or the same edited sample
        curvature_rows, curvature_M = curvature_sample(task, all_rows, resolved, True, args, M, picked)

        def tilted() -> float:  # R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩
            theta = space.vector()
            value = (
                loss_sum(model, task, edited_batches, norm, processes) / M + mu / 2 * theta.dot(theta).item()
            )
            return value - grad_star.dot(theta - theta_star).item()

        first_delta, first_curvature, b = first_step
        lam, grad = damping, None
        if adaptive or line_search:  # the LLMEraser step is the first trial, kept only if it lowers R̃
            value, trials, first_pending = tilted(), args.refine_steps + 1, True
        else:
            space.add_(first_delta)
            trials, first_pending = args.refine_steps, False
        for k in range(trials):
            if first_pending:  # at θ*, ∇R̃(θ*) = ∇R'(θ*) − ∇R(θ*) = b, and C(θ*) is the first step's
                grad, curvature = b, first_curvature
            elif grad is None:  # a rejected step keeps θ, so its gradient is reused
                grad = (
                    gradient_sum(
                        model,
                        task,
                        space,
                        edited_batches,
                        norm,
                        processes,
                        f"refine {k + 1}: gradient" if show else None,
                    )
                    / M
                    + mu * space.vector()
                    - grad_star
                )  # ∇R̃(θ) = ∇R'(θ) − ∇R(θ*)
            if not first_pending:
                step_factors = factors
                if args.curvature in ("kfac", "ekfac"):
                    step_factors, _ = obtain_factors(
                        dataclasses.replace(args, curvature_factors="pass"),
                        model, task, space, edited, batches, processes,
                    )  # fmt: skip
                    # The factors are normalised by their rows' own M; R' keeps the original M (DESIGN §2).
                    step_factors.info["normaliser"] *= M / normaliser(task, edited, norm, args.batch_size)
                curvature, _ = build_operators(
                    args, model, task, space, curvature_rows, batches, processes, step_factors, M=curvature_M
                )
            try:
                if first_pending and lam == damping:
                    if isinstance(first_delta, NonPositiveCurvatureError):
                        raise first_delta  # the caller's solve of this trial failed
                    step, stats = first_delta, None  # already solved by the caller
                else:
                    step, stats = solve(curvature, lam + mu, -grad, **solver_options)
            except NonPositiveCurvatureError as e:
                if not adaptive:
                    raise
                # The damped model is not convex here: reject the step and raise λ, as for a failed step.
                steps.append({"damping": lam, "accepted": False, "rejected_because": str(e)})
                lam = raised(lam, curvature, grad, suggestion=e.suggested_damping - mu)
                continue
            if stats is not None:
                _check(step, stats, args)
            record = (stats.to_dict() if stats is not None else {}) | {
                "first_step": first_pending,
                "damping": lam,
                "tilted_gradient_norm": grad.norm().item(),
                "step_norm": step.norm().item(),
            }
            before = space.vector().clone()
            if line_search:
                record["tilted_objective_before"] = value
                length, value = backtrack(tilted, space, before, step, value, grad.dot(step).item())
                record |= {"step_length": length, "tilted_objective_after": value, "accepted": length > 0}
                steps.append(record)
                if not length:  # no length lowers R̃ enough along this direction: stop here
                    break
                grad, first_pending = None, False
                continue
            space.add_(step)
            if adaptive:
                new_value = tilted()
                record |= {"tilted_objective_before": value, "tilted_objective_after": new_value}
                record["accepted"] = new_value < value
                if record["accepted"]:
                    value, lam, grad, first_pending = new_value, max(lam / 3, damping), None, False
                else:
                    space.set_(before)
                    lam = raised(lam, curvature, grad)
            else:
                grad = None
            steps.append(record)
        total = space.vector() - theta_star
    finally:
        space.set_(theta_star)
    return total, steps
