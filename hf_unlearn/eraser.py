"""The LLMEraser update: request -> b -> solve -> apply (DESIGN §2).

Δθ = −(C + λI)⁻¹ b,   b = (1/M) [ Σ_{a∈A} ∇ℓ(a; θ*) − Σ_{o∈O} ∇ℓ(o; θ*) ],   θ ← θ* + Δθ
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .config import UnlearningArguments
from .curvature import CURVATURE_OPERATORS
from .data import ExampleEncoder, TrainingSet
from .distributed import Processes, check_curvature_supported
from .errors import SolverError
from .gradients import Batches, gradient_sum, loss_sum
from .objective import CausalLMTask, UnlearningTask, normaliser
from .params import ParameterSpace, computation_mode
from .request import ResolvedRequest, UnlearningRequest
from .solvers import SOLVERS


@dataclass
class UnlearningResult:
    """What `unlearn` did. `delta` maps each trainable parameter's name to its Δθ (already applied)."""

    delta: dict[str, torch.Tensor]
    stats: dict
    request: ResolvedRequest
    timings: dict = field(default_factory=dict)

    @property
    def delta_norm(self) -> float:
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.delta.values()))


def default_task(model, tokenizer=None) -> CausalLMTask:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return CausalLMTask(ExampleEncoder(tokenizer), pad_token_id=pad or 0)


def unlearn(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping] | TrainingSet,
    request: UnlearningRequest,
    args: UnlearningArguments | None = None,
    *,
    task: UnlearningTask | None = None,
    tokenizer=None,
) -> UnlearningResult:
    """Apply the LLMEraser update for `request` to the trainable parameters of `model`, in place.

    `train_dataset` is what the adapter was trained on (rows of `input_ids`/`labels`, or `prompt`/`response`
    with a `tokenizer`); request ids are its row indices, or the ids of a `TrainingSet`. `task` replaces the
    causal-LM loss for other models. Returns the applied Δθ and the solver statistics.
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
        g_old = gradient_sum(
            model, task, space, old_batches, norm, processes, "gradients (old)" if show else None
        )
        b = -g_old
        if resolved.new:
            b += gradient_sum(
                model,
                task,
                space,
                batches(resolved.new),
                norm,
                processes,
                "gradients (new)" if show else None,
            )
        b /= M
        timings["gradients_seconds"] = time.perf_counter() - t

        curvature_rows = all_rows
        if args.hessian_samples is not None and args.hessian_samples < len(all_rows):
            chosen = sorted(random.Random(args.seed).sample(range(len(all_rows)), args.hessian_samples))
            curvature_rows = [all_rows[i] for i in chosen]
        curvature = CURVATURE_OPERATORS[args.curvature](
            model,
            task,
            space,
            batches(curvature_rows),
            norm,
            normaliser(task, curvature_rows, norm, args.batch_size),
            processes,
        )

        t = time.perf_counter()
        solve = SOLVERS[args.solver]
        delta, stats = solve(
            curvature,
            args.damping,
            -b,
            tol=args.tol,
            max_iter=args.max_iter,
            progress=show and processes.is_main,
        )
        timings["solver_seconds"] = time.perf_counter() - t
        problems = []
        if not torch.isfinite(delta).all():
            problems.append("the solver produced non-finite values")
        if not stats.converged:
            problems.append(
                f"{args.solver} did not converge in {stats.iterations} iterations (relative residual "
                f"{stats.relative_residual:.3g} > tol {args.tol:g})"
            )
        if problems and not (args.allow_inexact and torch.isfinite(delta).all()):
            raise SolverError(
                "; ".join(problems).capitalize() + "; nothing was changed. Raise --max-iter or --damping, "
                "loosen --tol, or pass --allow-inexact to keep an inexact (finite) result."
            )
        # Forget-set check: mean ℓ over the old versions, predicted to first order (∇ℓ·Δθ) and measured.
        num_old = len(resolved.old)
        forget_before = loss_sum(model, task, old_batches, norm, processes) / num_old
        predicted_change = (g_old.dot(delta) / num_old).item()
        space.add_(delta)
        forget_after = loss_sum(model, task, old_batches, norm, processes) / num_old
        delta_dict = space.as_dict(delta)
        b_norm = b.norm().item()
    timings["total_seconds"] = time.perf_counter() - start
    stats_dict = stats.to_dict() | {
        "inexact": bool(problems),
        "forget_loss_before": forget_before,
        "forget_loss_after": forget_after,
        "forget_loss_change_predicted": predicted_change,
        "forget_loss_change_measured": forget_after - forget_before,
        "num_params": space.numel,
        "normaliser": M,
        "num_train": len(train),
        "num_curvature_rows": len(curvature_rows),
        "b_norm": b_norm,
        "num_processes": processes.count,
    }
    result = UnlearningResult(delta=delta_dict, stats=stats_dict, request=resolved, timings=timings)
    result.stats["delta_norm"] = result.delta_norm
    return result
