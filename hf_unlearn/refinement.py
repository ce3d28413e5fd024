"""Beyond one step: damped Newton steps on the tilted edited objective (docs/method.md, "Refinement").

The edited objective is the one retraining minimises, `R'(θ) = (1/M)[Σ_kept ℓ + Σ_new ℓ] + (μ/2)‖θ‖²` with the
normaliser M of the original training set kept fixed. Refinement minimises its tilted form

    R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩,      ∇R̃(θ*) = b,

whose minimiser is where retraining lands when θ* was an exact minimiser of R (the tilt removes what the
training run left of the gradient). Two estimates of R̃ are available, as strategies:

- `FullTilted` passes over every kept training row for each gradient and value (exact; cost ∝ n);
- `SampledTilted` estimates the kept rows' *change* since θ* on a sample K of them, rescaled — a control
  variate, exact at θ* and equal to `FullTilted` when K is every kept row — and keeps the request's own rows
  exact. Nothing it does passes over the training set, so a request costs the same at any n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .curvature import CURVATURE_OPERATORS
from .curvature.spectrum import lanczos_extremes
from .errors import ConfigurationError, NonPositiveCurvatureError, SolverError
from .gradients import gradient_sum, loss_sum
from .objective import normaliser

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


def backtrack(tilted, space, start, step, value, slope, guard=None):
    """Backtracking line search along `step` from θ = `start`: the first t in 1, ½, ¼, … with
    R̃(θ + t·step) ≤ R̃(θ) + ARMIJO·t·slope (`slope` = ∇R̃(θ)ᵀstep, negative for a descent direction) and, with
    a `guard`, `guard()` true there (a trust region: see `KeptLossGuard`).

    `tilted()` is R̃ at the model's current θ. Returns `(t, R̃ at the new θ)` and leaves the parameters there;
    `(0.0, value)` at `start` when no length is accepted (or `step` is not a descent direction)."""
    length = 1.0
    for _ in range(MAX_HALVINGS + 1 if slope < 0 else 0):
        space.set_(start + length * step)
        new_value = tilted()
        if new_value <= value + ARMIJO * length * slope and (guard is None or guard()):
            return length, new_value
        length /= 2
    space.set_(start)
    return 0.0, value


class KeptLossGuard:
    """A trust region for the line search: true while the loss of a fixed sample of kept rows (cross-entropy
    per loss token) has risen by at most `tolerance` since θ*. Retraining leaves the kept rows' loss close to
    where training left it; a step beyond that has left the region the estimate of R̃ describes, whatever
    the estimate says. Each call is one forward pass over the sample (`rows` passes counted in `calls`)."""

    def __init__(self, model, task, batches, tokens: float, tolerance: float, processes):
        self.model, self.task, self.batches, self.tokens = model, task, batches, tokens
        self.tolerance, self.processes = tolerance, processes
        self.before = self.loss()
        self.calls, self.rejections = 0, 0

    def loss(self) -> float:
        return loss_sum(self.model, self.task, self.batches, "token", self.processes) / self.tokens

    def __call__(self) -> bool:
        self.calls += 1
        inside = self.loss() - self.before <= self.tolerance
        self.rejections += not inside
        return inside


class SumOperator:
    """`C v = Σ_k C_k v` of curvature operators over disjoint row sets (each with its own normaliser)."""

    def __init__(self, parts):
        self.parts = [p for p in parts if p is not None]
        first = self.parts[0]
        self.name, self.space, self.processes = first.name, first.space, first.processes
        self.num_products = 0

    @property
    def size(self) -> int:
        return self.space.numel

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_products += 1
        return sum(part.matvec(v) for part in self.parts)


class Run(Protocol):
    """What a tilted objective works on (`eraser`'s context of a request): the model, its task and parameter
    space, the processes, the unlearning arguments (`loss_normalization`, `l2` = μ, `progress`), the training
    rows, their normaliser M, Σ∇ℓ(old) at θ* (`g_old`) and `batches(rows)`, this process's `Batches` of rows."""

    model: torch.nn.Module
    task: object
    space: object
    processes: object
    args: object
    rows: list
    M: float

    @property
    def g_old(self) -> torch.Tensor: ...

    def batches(self, rows: list): ...


class FullTilted:
    """R̃ and ∇R̃ over every edited training row (kept rows plus new versions): exact, cost ∝ n per call."""

    def __init__(self, run: Run, edited_rows: list):
        self.model, self.task, self.space, self.M, self.mu = (
            run.model,
            run.task,
            run.space,
            run.M,
            run.args.l2,
        )
        self.norm, self.processes, self.show = run.args.loss_normalization, run.processes, run.args.progress
        self.theta_star = self.space.vector().clone()
        # ∇R(θ*) = (1/M) Σ_all ∇ℓ(θ*) + μθ*
        label = "gradient ∇R(θ*)" if self.show else None
        self.grad_star = (
            gradient_sum(
                self.model, self.task, self.space, run.batches(run.rows), self.norm, self.processes, label
            )
            / self.M
            + self.mu * self.theta_star
        )
        self.edited = run.batches(edited_rows)
        self.rows_per_gradient = len(edited_rows)

    def value(self) -> float:  # R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩
        theta = self.space.vector()
        value = loss_sum(self.model, self.task, self.edited, self.norm, self.processes) / self.M
        value += self.mu / 2 * theta.dot(theta).item()
        return value - self.grad_star.dot(theta - self.theta_star).item()

    def gradient(self, label: str) -> torch.Tensor:  # ∇R̃(θ) = ∇R'(θ) − ∇R(θ*)
        desc = label if self.show else None
        g = gradient_sum(self.model, self.task, self.space, self.edited, self.norm, self.processes, desc)
        return g / self.M + self.mu * self.space.vector() - self.grad_star


class SampledTilted:
    """R̃ and ∇R̃ with the kept rows estimated on samples of them, around θ* (a control variate):

        ∇R̃(θ) ≈ Σ_s (1/M_s) Σ_{K_s} (∇ℓ(θ) − ∇ℓ(θ*)) + (1/M) [Σ_new ∇ℓ(θ) − Σ_old ∇ℓ(θ*)] + μ(θ − θ*)
        R̃(θ) ≈ Σ_s (1/M_s) Σ_{K_s} (ℓ(θ) − ⟨∇ℓ(θ*), θ − θ*⟩) + (1/M) [Σ_new ℓ(θ) − ⟨Σ_old ∇ℓ(θ*), θ − θ*⟩]
                + (μ/2)‖θ − θ*‖² + const,

    over the strata K_s of `KeptSample` (rows taken with certainty, `M_s = M`; a random sample of the rest,
    rescaled to all of them). At θ* the estimate of ∇R̃ is exactly b; with every kept row in the sample it is
    `FullTilted`'s (up to a constant in R̃). Its curvature, `Σ_s C_{K_s} + C_new` (`curvature`), is what the
    one-step update and every refinement step use.
    """

    def __init__(self, run: Run, sample: KeptSample):
        self.model, self.task, self.space, self.M, self.mu = (
            run.model,
            run.task,
            run.space,
            run.M,
            run.args.l2,
        )
        self.norm, self.processes, self.show = run.args.loss_normalization, run.processes, run.args.progress
        self.args = run.args
        self.theta_star = self.space.vector().clone()
        self.strata = [(run.batches(rows), M_s) for rows, M_s in sample.strata]
        self.new = run.batches(sample.new) if sample.new else None
        self.rows_per_gradient = sample.num_rows
        self.g_old, self._linear = run.g_old, None

    @property
    def linear(self) -> torch.Tensor:
        """Σ_s (1/M_s) Σ_{K_s} ∇ℓ(θ*) + (1/M) Σ_old ∇ℓ(θ*): the tilt's linear term (one pass over K, at θ*)."""
        if self._linear is None:
            current = self.space.vector().clone()
            self.space.set_(self.theta_star)
            self._linear = self._kept_gradient("gradient of the sample at θ*") + self.g_old / self.M
            self.space.set_(current)
        return self._linear

    def _kept_gradient(self, label: str) -> torch.Tensor:
        desc = label if self.show else None
        total = torch.zeros_like(self.theta_star)
        for batches, M_s in self.strata:
            total += (
                gradient_sum(self.model, self.task, self.space, batches, self.norm, self.processes, desc)
                / M_s
            )
        return total

    def value(self) -> float:
        delta = self.space.vector() - self.theta_star
        value = sum(
            loss_sum(self.model, self.task, batches, self.norm, self.processes) / M_s
            for batches, M_s in self.strata
        )
        if self.new is not None:
            value += loss_sum(self.model, self.task, self.new, self.norm, self.processes) / self.M
        return value - self.linear.dot(delta).item() + self.mu / 2 * delta.dot(delta).item()

    def gradient(self, label: str) -> torch.Tensor:
        g = self._kept_gradient(label)
        if self.new is not None:
            g += gradient_sum(self.model, self.task, self.space, self.new, self.norm, self.processes) / self.M
        return g - self.linear + self.mu * (self.space.vector() - self.theta_star)

    def curvature(self):
        """`Σ_s C_{K_s} + C_new` at the current θ: the samples' curvature rescaled to every kept row, plus the
        request's new versions exactly (their curvature is what teaches a corrected answer)."""
        make = CURVATURE_OPERATORS[self.args.curvature]
        parts = [
            make(self.model, self.task, self.space, batches, self.norm, M_s, self.processes)
            for batches, M_s in self.strata
        ]
        if self.new is not None:
            parts.append(make(self.model, self.task, self.space, self.new, self.norm, self.M, self.processes))
        return SumOperator(parts)


class QuadraticTilted:
    """R̃ with the kept rows as a fixed quadratic around θ* and the request's rows exact:

        R̃_q(θ) = ½ dᵀ C_kept d + (1/M) [Σ_new ℓ(θ) − ⟨Σ_old ∇ℓ(θ*), d⟩] + (μ/2)‖d‖² + const,   d = θ − θ*,
        ∇R̃_q(θ) = C_kept d + (1/M) [Σ_new ∇ℓ(θ) − Σ_old ∇ℓ(θ*)] + μ d,

    the second-order Taylor model of the kept rows' part of R̃ (its linear terms cancel the tilt exactly), with
    `C_kept` the K-FAC curvature of the training run with the request's old rows taken out
    (`KFACFactors.without`). A gradient, value or curvature product passes over the request's new rows only;
    `C_kept` costs no pass at all. At θ* the gradient is exactly b.
    """

    def __init__(self, run: Run, kept, new_rows: list):
        self.model, self.task, self.space, self.M, self.mu = (
            run.model,
            run.task,
            run.space,
            run.M,
            run.args.l2,
        )
        self.norm, self.processes, self.args = run.args.loss_normalization, run.processes, run.args
        self.kept, self.g_old = kept, run.g_old
        self.theta_star = self.space.vector().clone()
        self.new = run.batches(new_rows) if new_rows else None
        self.rows_per_gradient = len(new_rows)

    def value(self) -> float:
        d = self.space.vector() - self.theta_star
        value = 0.5 * d.dot(self.kept.matvec(d)).item() - self.g_old.dot(d).item() / self.M
        if self.new is not None:
            value += loss_sum(self.model, self.task, self.new, self.norm, self.processes) / self.M
        return value + self.mu / 2 * d.dot(d).item()

    def gradient(self, label: str) -> torch.Tensor:
        d = self.space.vector() - self.theta_star
        g = self.kept.matvec(d) - self.g_old / self.M + self.mu * d
        if self.new is not None:
            g += gradient_sum(self.model, self.task, self.space, self.new, self.norm, self.processes) / self.M
        return g

    def curvature(self):
        """`C_kept + C_new` at the current θ (C_new exact, of the chosen `curvature`)."""
        if self.new is None:
            return self.kept
        make = CURVATURE_OPERATORS[self.args.curvature]
        new = make(self.model, self.task, self.space, self.new, self.norm, self.M, self.processes)
        return SumOperator([self.kept, new])


class KeptSample:
    """The rows `SampledTilted` estimates the kept rows on, as strata `[(rows, M_s)]`: the training rows
    `include` (e.g. those the request interacts with) with certainty (`M_s = M`), and the sampled training rows
    `picked` among the rest, rescaled to all of them (`M_s = M · M(sample) / M(rest)`); the request's rows are
    in neither. `new` are the request's new versions (all of them, exact)."""

    def __init__(self, task, rows, resolved, picked, M, args, include=()):
        touched = set(resolved.indices)
        included = sorted(set(include) - touched)
        certain = [rows[i] for i in included]
        drawn = [rows[i] for i in picked if i not in touched and i not in set(included)]
        if not drawn:
            raise ConfigurationError(
                "objective_estimate 'sample': every sampled row is in the request or taken with certainty, so the "
                "other kept rows have no estimate; raise --hessian-samples."
            )
        norm = args.loss_normalization

        def units(rows_):
            return normaliser(task, rows_, norm, args.batch_size) if rows_ else 0.0

        rest = M - units(resolved.old) - units(certain)  # the kept rows the random sample stands for
        self.strata = ([(certain, M)] if certain else []) + [(drawn, M * units(drawn) / rest)]
        self.new = list(resolved.new)
        self.num_sampled, self.num_included = len(picked), len(certain)
        self.num_rows = len(certain) + len(drawn) + len(self.new)

    @property
    def kept(self) -> list:
        return [row for rows, _ in self.strata for row in rows]


@dataclass
class NewtonSolve:
    """How `refine` solves a step: `solve(C, shift, rhs, tol) -> (d, stats)` solves `(C + shift·I) d = rhs`,
    `check(d, stats, args, tol)` says why its result is inexact (and raises unless it is kept), and
    `build_curvature()` makes C at the current θ."""

    solve: Callable
    check: Callable
    build_curvature: Callable


def refine(tilted, space, first_step, damping, args, newton: NewtonSolve, guard=None):
    """`refine_steps` damped Newton steps on the tilted edited objective R̃ (see the module docstring).

        `tilted` is a `FullTilted` or `SampledTilted` (R̃'s value and gradient at the model's θ, which starts at
        θ*); `first_step = (Δθ, C, b)` is the one-step update (Δθ may be the `NonPositiveCurvatureError` its solve
        raised); `newton` the first step's solver, its result check and `build_curvature()` (C at the current
        θ). Each step solves `(C(θ) + (μ + λ)I) d = −∇R̃(θ)`, to the relative residual
    `args.newton_tol(‖∇R̃(θ)‖, ‖b‖)` (inexact Newton); the damping modes are strategies (`KEEP_STEP`):

        - `refine_damping="fixed"`: from θ₁ = θ* + Δθ, `refine_steps` full steps with λ = `damping`;
        - `"adaptive"` (Levenberg–Marquardt): the one-step update is the first trial; a step is kept only if it
          lowers R̃, after which λ ← max(λ/3, damping); a rejected step (or a solve that meets non-positive
          curvature) leaves θ and sets λ ← 3λ (from λ = 0: CG's suggested damping, else the 'auto' one);
          `refine_steps + 1` trials;
        - `"line_search"` (damped Newton): every step, the one-step update first, keeps λ = `damping` and is
          shortened by halves until R̃ drops by the Armijo condition and `guard` (a `KeptLossGuard`, or None)
          holds (`backtrack`); stops early when no length does.

        Returns the total θ − θ* and per-step stats; the parameters are left at θ* (the caller applies the total),
        also when a step fails.
    """
    theta_star = space.vector().clone()
    run = _Refinement(tilted, space, first_step, damping, args, newton, guard)
    keep = KEEP_STEP[args.refine_damping]
    try:
        for k in range(run.start()):
            trial = run.trial(k)
            if trial is not None and not keep(run, *trial):
                break
        total = space.vector() - theta_star
    finally:
        space.set_(theta_star)
    return total, run.steps


class _Refinement:
    """The state of `refine`'s steps: θ (in `space`), λ (`lam`), ∇R̃ at θ (`grad`; None: not yet computed), C
    there (`curvature`), R̃ at θ (`value`; adaptive and line search), whether the one-step update is still the
    next trial (`first_pending`), and the per-step records (`steps`)."""

    def __init__(self, tilted, space, first_step, damping, args, newton, guard):
        self.tilted, self.space, self.args, self.newton, self.guard = tilted, space, args, newton, guard
        self.first_delta, self.first_curvature, self.b = first_step
        self.b_norm = self.b.norm().item()
        self.damping, self.lam, self.grad, self.curvature = damping, damping, None, None
        self.value, self.first_pending, self.steps = None, True, []

    def start(self) -> int:
        """The number of trials."""
        if self.args.refine_damping in ("adaptive", "line_search"):
            # the LLMEraser step is the first trial, kept only if it lowers R̃
            self.value = self.tilted.value()
            return self.args.refine_steps + 1
        self.space.add_(self.first_delta)
        self.first_pending = False
        return self.args.refine_steps

    def trial(self, k: int) -> tuple[dict, torch.Tensor] | None:
        """The `k`-th trial's `(record, step)`, not taken; None when its solve met non-positive curvature with
        `refine_damping="adaptive"` (the trial is rejected and λ raised)."""
        self._direction(k)
        try:
            step, stats, tol = self._solve()
        except NonPositiveCurvatureError as e:
            if self.args.refine_damping != "adaptive":
                raise
            # The damped model is not convex here: reject the step and raise λ, as for a failed step.
            self.steps.append({"damping": self.lam, "accepted": False, "rejected_because": str(e)})
            self.lam = raised(
                self.lam, self.curvature, self.grad, suggestion=e.suggested_damping - self.args.l2
            )
            return None
        problems = self.newton.check(step, stats, self.args, tol) if stats is not None else []
        record = (stats.to_dict() | {"tol": tol} if stats is not None else {}) | {
            "first_step": self.first_pending,
            "damping": self.lam,
            "tilted_gradient_norm": self.grad.norm().item(),
            "step_norm": step.norm().item(),
            "gradient_rows": 0 if self.first_pending else self.tilted.rows_per_gradient,
        }
        if problems:  # kept by allow_inexact: the result is inexact
            record["problems"] = problems
        return record, step

    def _direction(self, k: int) -> None:
        """∇R̃ and C at the current θ."""
        if self.first_pending:  # at θ*, ∇R̃(θ*) = b, and C(θ*) is the first step's
            self.grad, self.curvature = self.b, self.first_curvature
            return
        if self.grad is None:  # a rejected step keeps θ, so its gradient is reused
            self.grad = self.tilted.gradient(f"refine {k + 1}: gradient")
        self.curvature = self.newton.build_curvature()

    def _solve(self) -> tuple:
        """`(step, solver stats, tol)`; the one-step update's stats and tol are None (solved by the caller)."""
        if self.first_pending and self.lam == self.damping:
            if isinstance(self.first_delta, NonPositiveCurvatureError):
                raise self.first_delta  # the caller's solve of this trial failed
            return self.first_delta, None, None  # already solved by the caller
        # inexact Newton: the solve's tolerance follows ‖∇R̃(θ)‖/‖b‖ (refine_tol)
        tol = self.args.newton_tol(self.grad.norm().item(), self.b_norm)
        step, stats = self.newton.solve(self.curvature, self.lam + self.args.l2, -self.grad, tol)
        return step, stats, tol


def _keep_fixed(run: _Refinement, record: dict, step: torch.Tensor) -> bool:
    """`refine_damping="fixed"`: every step is taken in full."""
    run.space.add_(step)
    run.grad = None
    run.steps.append(record)
    return True


def _keep_adaptive(run: _Refinement, record: dict, step: torch.Tensor) -> bool:
    """`"adaptive"` (Levenberg–Marquardt): the step is kept only if it lowers R̃ (then λ ← max(λ/3, damping)),
    else θ stays and λ is raised (`raised`)."""
    before = run.space.vector().clone()
    run.space.add_(step)
    new_value = run.tilted.value()
    record |= {"tilted_objective_before": run.value, "tilted_objective_after": new_value}
    record["accepted"] = new_value < run.value
    if record["accepted"]:
        run.value, run.lam, run.grad, run.first_pending = (
            new_value,
            max(run.lam / 3, run.damping),
            None,
            False,
        )
    else:
        run.space.set_(before)
        run.lam = raised(run.lam, run.curvature, run.grad)
    run.steps.append(record)
    return True


def _keep_line_search(run: _Refinement, record: dict, step: torch.Tensor) -> bool:
    """`"line_search"` (damped Newton): the step shortened by halves (`backtrack`); False (stop) when no length
    lowers R̃ enough along it."""
    before = run.space.vector().clone()
    guard = run.guard
    record["tilted_objective_before"] = run.value
    rejected = guard.rejections if guard is not None else 0
    length, run.value = backtrack(
        run.tilted.value, run.space, before, step, run.value, run.grad.dot(step).item(), guard
    )  # fmt: skip
    record |= {"step_length": length, "tilted_objective_after": run.value, "accepted": length > 0}
    if guard is not None:
        record["kept_loss_rejections"] = guard.rejections - rejected
    run.steps.append(record)
    if not length:  # no length lowers R̃ enough along this direction: stop here
        return False
    run.grad, run.first_pending = None, False
    return True


# How a solved step is taken, by `refine_damping`: `keep(run, record, step)` updates θ and the state and appends
# the record; False stops the refinement.
KEEP_STEP = {"fixed": _keep_fixed, "adaptive": _keep_adaptive, "line_search": _keep_line_search}
