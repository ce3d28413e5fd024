"""The whole update against exact references: a dense float64 LLM computation and exact refitting."""

import dataclasses
import random

import pytest
import torch
from reference import (
    DenseReference,
    MaskedRegressionTask,
    dense_ggn,
    fit,
    regression_rows,
    relative_error,
    single_step,
    tiny_llama,
    tiny_llama_base,
    token_rows,
)

from hf_unlearn import CausalLMTask, ConfigurationError, SolverError, UnlearningRequest, unlearn
from hf_unlearn.params import ParameterSpace

ROWS = token_rows(12, seed=0)
NEW = token_rows(3, seed=9)
# QM: new prompt tokens, same response; RC: same prompt, new response.
QM_ROW = {
    "input_ids": [7, 7] + ROWS[4]["input_ids"][ROWS[4]["labels"].count(-100) :],
    "labels": [-100, -100] + ROWS[4]["input_ids"][ROWS[4]["labels"].count(-100) :],
}
_p = ROWS[6]["labels"].count(-100)
RC_ROW = {"input_ids": ROWS[6]["input_ids"][:_p] + [3, 4, 5], "labels": [-100] * _p + [3, 4, 5]}

REQUESTS = {
    "IR": (UnlearningRequest(remove=[1, 3]), [1, 3], []),
    "QM": (UnlearningRequest(replace={4: QM_ROW}), [4], [QM_ROW]),
    "RC": (UnlearningRequest(replace={6: RC_ROW}), [6], [RC_ROW]),
    "mixed": (
        UnlearningRequest(remove=[0], replace={4: QM_ROW, 6: RC_ROW, 9: NEW[0]}),
        [0, 4, 6, 9],
        [QM_ROW, RC_ROW, NEW[0]],
    ),
}


@pytest.fixture(scope="module")
def trained():
    return fit(tiny_llama(seed=0), CausalLMTask(), ROWS)


def flat(result, model):
    return ParameterSpace(model).flatten([result.delta[n] for n in ParameterSpace(model).names])


def run(model, request, **kwargs):
    before = ParameterSpace(model).vector().clone()
    result = unlearn(model, ROWS, request, single_step(dtype="float64", progress=False, **kwargs))
    delta = flat(result, model)
    assert relative_error(ParameterSpace(model).vector() - before, delta) < 1e-12  # applied in place
    ParameterSpace(model).add_(-delta)  # restore θ* for the next test
    return result, delta


def edited_rows(old, new):
    """The rows R' sums: the kept training rows, then the new versions."""
    return [r for i, r in enumerate(ROWS) if i not in old] + list(new)


def damping_for(model, normalization, old=(), new=()):
    """A damping that makes ∇²R' + λI positive definite (R' of the edit `old` → `new`), from the dense spectrum."""
    ref = DenseReference(model, normalization)
    eigenvalues = torch.linalg.eigvalsh(ref.hessian(edited_rows(old, new), ref.normaliser(ROWS)))
    return max(0.0, -eigenvalues[0].item()) + 0.05


@pytest.mark.parametrize("normalization", ["token", "example"])
@pytest.mark.parametrize("kind", list(REQUESTS))
def test_update_matches_dense_reference(trained, kind, normalization):
    request, old, new = REQUESTS[kind]
    damping = damping_for(trained, normalization, old, new)
    expected = DenseReference(trained, normalization).update(ROWS, [ROWS[i] for i in old], new, damping)
    result, delta = run(trained, request, damping=damping, tol=1e-12, loss_normalization=normalization)
    assert result.stats["converged"]
    assert relative_error(delta, expected) < 1e-9
    assert result.request.kind_counts() == (
        {"IR": 1, "QM": 1, "RC": 1, "QM+RC": 1} if kind == "mixed" else {kind: len(old)}
    )


def test_direct_solver_matches_dense_reference(trained):
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new)
    expected = DenseReference(trained, "token").update(ROWS, [ROWS[i] for i in old], new, damping)
    _, delta = run(trained, request, solver="direct", damping=damping)
    assert relative_error(delta, expected) < 1e-12


def test_hessian_samples_take_a_seeded_sample_of_the_training_rows_then_apply_the_edit(trained):
    request, old, new = REQUESTS["mixed"]  # row 0 removed, rows 4, 6, 9 replaced
    sample = sorted(random.Random(0).sample(range(len(ROWS)), 6))
    assert sample == [0, 3, 4, 6, 7, 11]  # holds the removed row and two replaced ones, not row 9
    # the sample's kept rows, then the new versions of its replaced rows, normalised like the sample before
    # the edit (as the whole edited set keeps M)
    edited_sample = [ROWS[i] for i in (3, 7, 11)] + [QM_ROW, RC_ROW]
    ref = DenseReference(trained, "token")
    M_sample = ref.normaliser([ROWS[i] for i in sample])
    H = ref.hessian(edited_sample, M_sample)
    damping = max(0.0, -torch.linalg.eigvalsh(H)[0].item()) + 0.05
    expected = ref.update(
        ROWS, [ROWS[i] for i in old], new, damping, curvature_rows=edited_sample, curvature_M=M_sample
    )
    result, delta = run(trained, request, damping=damping, tol=1e-12, hessian_samples=6, seed=0)
    assert result.stats["num_curvature_rows"] == 5
    assert relative_error(delta, expected) < 1e-9


def test_float32_computation_restores_model_dtype_and_mode(trained):
    model = fit(tiny_llama(seed=0, dtype=torch.float32), CausalLMTask(), ROWS)
    model.train()
    request, old, new = REQUESTS["mixed"]
    result = unlearn(model, ROWS, request, single_step(damping=0.2, progress=False))
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert result.stats["converged"] and result.delta_norm > 0


def test_unconverged_solve_changes_nothing(trained):
    before = ParameterSpace(trained).vector().clone()
    with pytest.raises(SolverError, match="did not converge"):
        unlearn(
            trained,
            ROWS,
            REQUESTS["IR"][0],
            single_step(dtype="float64", damping=0.5, max_iter=2, tol=1e-12, progress=False),
        )
    assert torch.equal(ParameterSpace(trained).vector(), before)


def test_non_finite_gradients_are_refused_before_any_solve():
    from hf_unlearn import DataError

    model = fit(tiny_llama(seed=0, dtype=torch.float32), CausalLMTask(), ROWS)
    space = ParameterSpace(model)
    space.params[0].data.fill_(float("nan"))  # e.g. an adapter saved from a run that diverged
    before = space.vector().clone()
    with pytest.raises(DataError, match="not finite"):
        unlearn(model, ROWS, REQUESTS["IR"][0], single_step(damping=0.2, progress=False))
    torch.testing.assert_close(space.vector(), before, rtol=0, atol=0, equal_nan=True)  # nothing was changed


# --- exact refitting on a problem whose loss is quadratic in the trainable parameters -----------------


def refit(model, task, rows, normalization):
    """The exact minimiser of (1/M) Σ ℓ over `rows` (one Newton step from anywhere on a quadratic)."""
    from hf_unlearn.objective import example_losses

    def ell(m, row):
        return example_losses(task, m, task.collate([row]), normalization)[0]

    ref = DenseReference(model, normalization, ell=ell, normaliser=lambda rs: 1.0)
    objective = ref.objective(rows, M=1.0)
    gradient = torch.func.grad(objective)(ref.theta)
    return ref.theta - torch.linalg.solve(torch.func.hessian(objective)(ref.theta), gradient)


@pytest.fixture()
def regression():
    rows = regression_rows(200, seed=2)
    return torch.nn.Linear(3, 2).double(), MaskedRegressionTask(), rows


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_response_correction_equals_exact_refit(regression, normalization):
    """RC changes only y, so the Hessian is unchanged and one Newton step is exactly the refit."""
    model, task, rows = regression
    space = ParameterSpace(model)
    space.add_(refit(model, task, rows, normalization) - space.vector())  # θ* = argmin R
    new = {**rows[5], "y": [3.0, -2.0]}
    edited = rows[:5] + [new] + rows[6:]
    expected = refit(model, task, edited, normalization)
    unlearn(
        model,
        rows,
        UnlearningRequest(replace={5: {"y": [3.0, -2.0]}}),
        single_step(
            solver="direct", damping=0.0, dtype="float64", loss_normalization=normalization, progress=False
        ),
        task=task,
    )
    assert relative_error(space.vector(), expected) < 1e-10


def regularized_refit(model, task, rows, normalization, mu, M):
    """The exact minimiser of (1/M) Σ_rows ℓ + (μ/2)‖θ‖², with M given (docs/method.md §2 keeps it fixed)."""
    from hf_unlearn.objective import example_losses

    def ell(m, row):
        return example_losses(task, m, task.collate([row]), normalization)[0]

    ref = DenseReference(model, normalization, ell=ell)
    data = ref.objective(rows, M=M)
    objective = lambda theta: data(theta) + mu / 2 * theta.dot(theta)  # noqa: E731
    gradient = torch.func.grad(objective)(ref.theta)
    return ref.theta - torch.linalg.solve(torch.func.hessian(objective)(ref.theta), gradient)


EDITS = {
    "IR": (
        UnlearningRequest(remove=[11, 40]),
        lambda rows: [r for i, r in enumerate(rows) if i not in (11, 40)],
    ),
    "RC": (
        UnlearningRequest(replace={5: {"y": [3.0, -2.0]}}),
        lambda rows: rows[:5] + [{**rows[5], "y": [3.0, -2.0]}] + rows[6:],
    ),
}


@pytest.mark.parametrize("normalization", ["token", "example"])
@pytest.mark.parametrize("kind", list(EDITS))
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_one_step_on_the_edited_curvature_equals_the_exact_refit(regression, normalization, kind, mu):
    """On a quadratic (with the objective's L2 term μ), one Newton step with C = ∇²R' is the exact refit."""
    from hf_unlearn.objective import normaliser

    model, task, rows = regression
    M = normaliser(task, rows, normalization, 8)
    space = ParameterSpace(model)
    space.add_(regularized_refit(model, task, rows, normalization, mu, M) - space.vector())  # θ*
    request, edit = EDITS[kind]
    expected = regularized_refit(model, task, edit(rows), normalization, mu, M)
    args = {"damping": 0.0, "dtype": "float64", "loss_normalization": normalization, "progress": False}
    result = unlearn(
        model, rows, request, single_step(solver="direct", l2_regularization=mu, **args), task=task
    )
    assert result.stats["curvature_data"] == "edited" and result.stats["l2_regularization"] == mu
    assert relative_error(space.vector(), expected) < 1e-10
    space.add_(-flat(result, model))
    unlearn(model, rows, request, single_step(curvature_data="original", l2_regularization=mu, **args | {"progress": False}), task=task)  # fmt: skip
    if kind == "IR":  # the removed rows' curvature is still in ∇²R: only first order
        assert 1e-6 < relative_error(space.vector(), expected) < 0.05
    else:  # RC leaves the Hessian unchanged
        assert relative_error(space.vector(), expected) < 1e-8


def test_refine_with_l2_regularization_reaches_the_regularized_refit(regression):
    """From a first step on ∇²R (first order), one refinement step on R̃ with the L2 term reaches the refit;
    without μ in the objective it would stop elsewhere."""
    from hf_unlearn.objective import normaliser

    model, task, rows = regression
    mu, M = 0.5, normaliser(task, rows, "token", 8)
    space = ParameterSpace(model)
    space.add_(regularized_refit(model, task, rows, "token", mu, M) - space.vector())
    theta_star = space.vector().clone()
    request, edit = EDITS["IR"]
    expected = regularized_refit(model, task, edit(rows), "token", mu, M)
    common = {
        "damping": 0.0,
        "dtype": "float64",
        "tol": 1e-13,
        "curvature_data": "original",
        "progress": False,
    }
    for l2, close in ((mu, True), (0.0, False)):
        space.set_(theta_star)
        unlearn(
            model,
            rows,
            request,
            single_step(refine_steps=1, l2_regularization=l2, **common),
            task=task,
        )
        assert (relative_error(space.vector(), expected) < 1e-9) is close


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_removal_approximates_exact_refit_with_the_right_sign_and_scale(regression, normalization):
    model, task, rows = regression
    space = ParameterSpace(model)
    space.add_(refit(model, task, rows, normalization) - space.vector())  # θ* = argmin R
    theta_star = space.vector().clone()
    expected = refit(model, task, [r for i, r in enumerate(rows) if i != 11], normalization) - theta_star
    result = unlearn(
        model,
        rows,
        UnlearningRequest(remove=[11]),
        single_step(
            solver="cg",
            damping=0.0,
            tol=1e-12,
            dtype="float64",
            loss_normalization=normalization,
            curvature_data="original",
            progress=False,
        ),
        task=task,
    )
    delta = space.vector() - theta_star
    assert result.request.kind_counts() == {"IR": 1}
    assert relative_error(delta, expected) < 0.05  # first-order in 1/n
    assert (
        relative_error(-delta, expected) > 1.5 and relative_error(2 * delta, expected) > 0.8
    )  # sign and scale


# --- Gauss–Newton and empirical Fisher curvature through the whole update ----------------------------


def dense_update(model, curvature_matrix, old, new, damping, normalization="token"):
    ref = DenseReference(model, normalization)
    b = (ref.grad_sum(new) - ref.grad_sum(old)) / ref.normaliser(ROWS)
    return -torch.linalg.solve(curvature_matrix + damping * torch.eye(len(b), dtype=b.dtype), b)


def test_ggn_update_matches_dense_gauss_newton_solve(trained):

    request, old, new = REQUESTS["mixed"]
    M = DenseReference(trained, "token").normaliser(ROWS)
    expected = dense_update(
        trained, dense_ggn(trained, edited_rows(old, new), "token", M), [ROWS[i] for i in old], new, 0.01
    )
    result, delta = run(trained, request, curvature="ggn", damping=0.01, tol=1e-12, max_iter=500)
    assert result.stats["converged"] and relative_error(delta, expected) < 1e-9


@pytest.mark.parametrize("solver", ["woodbury", "cg"])
def test_fisher_update_matches_dense_fisher_solve(trained, solver):
    from reference import dense_fisher

    request, old, new = REQUESTS["mixed"]
    M = DenseReference(trained, "token").normaliser(ROWS)
    expected = dense_update(
        trained, dense_fisher(trained, edited_rows(old, new), "token", M), [ROWS[i] for i in old], new, 0.01
    )
    result, delta = run(
        trained, request, curvature="fisher", solver=solver, damping=0.01, tol=1e-12, max_iter=500
    )
    assert result.stats["converged"] and relative_error(delta, expected) < 1e-9


def test_woodbury_refuses_other_curvatures_and_zero_damping(trained):
    from hf_unlearn import ConfigurationError

    with pytest.raises(ConfigurationError, match="fisher"):
        single_step(solver="woodbury", curvature="hessian")
    with pytest.raises(ConfigurationError, match="damping > 0"):
        run(trained, REQUESTS["IR"][0], curvature="fisher", solver="woodbury", damping=0.0)


# --- mini-batch solvers through `unlearn` --------------------------------------------------------------


def test_lissa_and_qp_through_unlearn_and_divergence_changes_nothing(regression):
    model, task, rows = regression
    space = ParameterSpace(model)
    space.add_(refit(model, task, rows, "token") - space.vector())
    theta_star = space.vector().clone()
    request = UnlearningRequest(replace={5: {"y": [3.0, -2.0]}})
    common = {"dtype": "float64", "damping": 0.0, "progress": False}
    exact = unlearn(model, rows, request, single_step(solver="direct", **common), task=task)
    exact_delta = space.vector() - theta_star
    space.set_(theta_star)
    for solver, limit in (("lissa", 0.10), ("qp", 0.30)):
        result = unlearn(
            model,
            rows,
            request,
            single_step(solver=solver, max_iter=1000, seed=3, allow_inexact=True, **common),
            task=task,
        )
        assert relative_error(space.vector() - theta_star, exact_delta) < limit
        assert result.stats["stochastic"] and result.stats["relative_residual"] < 1
        assert result.stats["inexact"] is not result.stats["converged"]  # short of tol: kept only as allowed
        space.set_(theta_star)
    with pytest.raises(SolverError, match="diverged"):
        unlearn(
            model,
            rows,
            request,
            single_step(solver="lissa", lissa_scale=1e-3, max_iter=50, **common),
            task=task,
        )
    assert torch.equal(space.vector(), theta_star)
    assert exact.stats["damping"] == 0.0


# --- damping "auto" --------------------------------------------------------------------------------------


def test_auto_damping_is_safe_recorded_and_used(trained):
    request, old, new = REQUESTS["IR"]
    ref = DenseReference(trained, "token")
    H = ref.hessian([r for i, r in enumerate(ROWS) if i not in old], ref.normaliser(ROWS))  # ∇²R'
    eigenvalues = torch.linalg.eigvalsh(H)
    result, delta = run(trained, request, damping="auto", tol=1e-12)
    auto = result.stats["damping_auto"]
    chosen = result.stats["damping"]
    assert chosen == auto["damping"] and auto["lanczos_steps"] == 30
    slack = 1e-9 * eigenvalues[-1].item()  # Ritz values lie inside the spectrum (up to round-off)
    assert eigenvalues[0].item() - slack <= auto["eig_min_estimate"]
    assert auto["eig_max_estimate"] <= eigenvalues[-1].item() + slack
    assert abs(auto["eig_max_estimate"] - eigenvalues[-1].item()) < 1e-6 * eigenvalues[-1].item()
    assert torch.linalg.eigvalsh(H + chosen * torch.eye(len(H), dtype=H.dtype))[0] > 0.005 * eigenvalues[-1]
    expected = DenseReference(trained, "token").update(ROWS, [ROWS[i] for i in old], new, chosen)
    assert relative_error(delta, expected) < 1e-9


# --- refine_steps: Newton steps on the tilted edited objective ---------------------------------------------


def dense_refine(model, old, new, damping, steps, normalization="token", sample=None):
    """θ* + Δθ, then `steps` dense Newton steps θ ← θ − (∇²R'(θ)+λI)⁻¹(∇R'(θ) − ∇R(θ*)); returns θ − θ*.

    Each Hessian is of R' (the edited rows, M fixed), or with `sample = (rows, M_sample)` of those rows
    normalised by M_sample."""
    ref = DenseReference(model, normalization)
    M = ref.normaliser(ROWS)
    edited = [r for i, r in enumerate(ROWS) if i not in old] + new
    grad_star = torch.func.grad(ref.objective(ROWS, M))(ref.theta)
    rows, M_rows = sample or (edited, M)
    theta = ref.theta + ref.update(
        ROWS, [ROWS[i] for i in old], new, damping, curvature_rows=rows, curvature_M=M_rows
    )
    eye = torch.eye(len(theta), dtype=theta.dtype)
    for _ in range(steps):
        g = torch.func.grad(ref.objective(edited, M))(theta) - grad_star
        H = torch.func.hessian(ref.objective(rows, M_rows))(theta)
        theta = theta - torch.linalg.solve(H + damping * eye, g)
    return theta - ref.theta


def test_refine_steps_match_dense_newton_steps(trained):
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new) + 0.1
    expected = dense_refine(trained, old, new, damping, steps=2)
    one_step = DenseReference(trained, "token").update(ROWS, [ROWS[i] for i in old], new, damping)
    result, delta = run(trained, request, damping=damping, tol=1e-12, max_iter=500, refine_steps=2)
    assert relative_error(delta, expected) < 1e-8
    assert relative_error(one_step, expected) > 1e-4  # the refinement is doing something measurable
    assert len(result.stats["refine"]) == 2 and all(s["converged"] for s in result.stats["refine"])


def test_refine_steps_with_hessian_samples_match_dense_newton_steps():
    trained = fit(tiny_llama(seed=0), CausalLMTask(), ROWS)  # θ* itself: earlier tests moved the shared one
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new) + 0.1
    # hessian_samples=6, seed 0: the training rows 0, 3, 4, 6, 7, 11 after the edit (see the test above)
    M_sample = DenseReference(trained, "token").normaliser([ROWS[i] for i in (0, 3, 4, 6, 7, 11)])
    sample = ([ROWS[i] for i in (3, 7, 11)] + [QM_ROW, RC_ROW], M_sample)
    expected = dense_refine(trained, old, new, damping, steps=2, sample=sample)
    assert relative_error(dense_refine(trained, old, new, damping, steps=2), expected) > 1e-3
    _, delta = run(
        trained, request, damping=damping, tol=1e-12, max_iter=500, refine_steps=2, hessian_samples=6
    )
    assert relative_error(delta, expected) < 1e-8


def dense_tilted(model, old, new):
    """`(ref, M, edited rows, R̃)` with R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩ (token normalisation, M fixed)."""
    ref = DenseReference(model, "token")
    M = ref.normaliser(ROWS)
    edited = edited_rows(old, new)
    grad_star = torch.func.grad(ref.objective(ROWS, M))(ref.theta)

    def tilted(theta):
        return ref.objective(edited, M)(theta) - grad_star.dot(theta - ref.theta)

    return ref, M, edited, tilted


def dense_refine_adaptive(model, old, new, damping, steps):
    """Levenberg–Marquardt on R̃(θ) = R'(θ) − ⟨∇R(θ*), θ − θ*⟩ from θ*, `steps + 1` trials, each a Newton
    step on R' (the first is the one-step update). A trial is kept if C + λI is positive definite
    and it lowers R̃, then λ ← max(λ/3, damping); else λ ← 3λ. Returns θ − θ* and which trials were kept."""
    ref, M, edited, tilted = dense_tilted(model, old, new)
    theta, eye, lam, accepted = ref.theta, torch.eye(len(ref.theta), dtype=ref.theta.dtype), damping, []
    for _ in range(steps + 1):
        C = torch.func.hessian(ref.objective(edited, M))(theta)
        g = torch.func.grad(tilted)(theta)
        trial = theta - torch.linalg.solve(C + lam * eye, g)
        accepted.append(bool(torch.linalg.eigvalsh(C + lam * eye)[0] > 0 and tilted(trial) < tilted(theta)))
        theta, lam = (trial, max(lam / 3, damping)) if accepted[-1] else (theta, 3 * lam)
    return theta - ref.theta, accepted


def test_adaptive_refine_matches_dense_levenberg_marquardt(trained):
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token")  # positive definite on R, small enough for a step to fail on R'
    expected, accepted = dense_refine_adaptive(trained, old, new, damping, steps=4)
    assert False in accepted, "the setting must make a step fail for this test to check the rejection"
    result, delta = run(
        trained, request, damping=damping, tol=1e-12, max_iter=500, refine_steps=4, refine_damping="adaptive"
    )
    assert [s["accepted"] for s in result.stats["refine"]] == accepted
    assert relative_error(delta, expected) < 1e-8
    assert relative_error(dense_refine(trained, old, new, damping, steps=4), expected) > 1e-4
    lams, first_rejected = [s["damping"] for s in result.stats["refine"]], accepted.index(False)
    assert lams[first_rejected + 1] == 3 * lams[first_rejected]


def dense_refine_line_search(model, old, new, damping, steps):
    """Damped Newton on R̃ from θ*, `steps + 1` steps: d = −(G'(θ) + λI)⁻¹∇R̃(θ) with G' the dense GGN of R',
    then the first t in 1, ½, …, 2⁻⁸ with R̃(θ + t·d) ≤ R̃(θ) + 10⁻⁴·t·∇R̃ᵀd (stop when none). Returns θ − θ*
    and the lengths."""
    ref, M, edited, tilted = dense_tilted(model, old, new)
    space = ParameterSpace(model)
    theta, eye, lengths = ref.theta, torch.eye(len(ref.theta), dtype=ref.theta.dtype), []
    try:
        for _ in range(steps + 1):
            g = torch.func.grad(tilted)(theta)
            space.set_(theta)  # dense_ggn is taken at the model's parameters
            d = -torch.linalg.solve(dense_ggn(model, edited, "token", M) + damping * eye, g)
            t = next(
                (2.0**-k for k in range(9) if tilted(theta + 2.0**-k * d) <= tilted(theta) + 1e-4 * 2.0**-k * g.dot(d)),
                0.0,
            )  # fmt: skip
            lengths.append(t)
            if not t:
                break
            theta = theta + t * d
    finally:
        space.set_(ref.theta)
    return theta - ref.theta, lengths


def test_line_search_refine_matches_dense_damped_newton(trained):
    request, old, new = REQUESTS["mixed"]
    damping = 1e-3  # the GGN step overshoots on R' unless shortened
    expected, lengths = dense_refine_line_search(trained, old, new, damping, steps=4)
    assert min(lengths) < 1, "the setting must shorten a step for this test to check the line search"
    result, delta = run(
        trained, request, curvature="ggn", damping=damping, tol=1e-12, max_iter=500, refine_steps=4,
        refine_damping="line_search",
    )  # fmt: skip
    assert [s["step_length"] for s in result.stats["refine"]] == lengths
    assert relative_error(delta, expected) < 1e-8
    values = [s["tilted_objective_before"] for s in result.stats["refine"]]
    assert (
        values == sorted(values, reverse=True)
        and values[-1] > result.stats["refine"][-1]["tilted_objective_after"]
    )


def dense_refine_sampled(model, old, new, damping, steps, picked, include=()):
    """The one-step update and `steps` Newton steps on the *sampled* tilted objective, densely:

        R̃_K(θ) = R_K(θ) + (1/M) Σ_new ℓ(θ) − ⟨∇R_K(θ*) + (1/M) Σ_old ∇ℓ(θ*), θ − θ*⟩,

    R_K = (1/M_K) Σ_K ℓ over the sampled rows K the request does not touch, M_K = M·M(K)/M(kept rows).
    Returns θ − θ*."""
    ref = DenseReference(model, "token")
    M = ref.normaliser(ROWS)
    certain = [ROWS[i] for i in include if i not in old]
    kept = [ROWS[i] for i in picked if i not in old and i not in include]
    old_rows = [ROWS[i] for i in old]
    rest = M - ref.normaliser(old_rows) - (ref.normaliser(certain) if certain else 0.0)
    M_K = M * ref.normaliser(kept) / rest

    def kept_objective(theta):
        return ref.objective(kept, M_K)(theta) + (ref.objective(certain, M)(theta) if certain else 0.0)

    linear = torch.func.grad(kept_objective)(ref.theta) + ref.grad_sum(old_rows) / M

    def estimate(theta):
        return kept_objective(theta) + ref.objective(new, M)(theta) - linear.dot(theta - ref.theta)

    theta, eye = ref.theta, torch.eye(len(ref.theta), dtype=ref.theta.dtype)
    for _ in range(steps + 1):  # the first is the one-step update: ∇R̃_K(θ*) = b
        H = torch.func.hessian(estimate)(theta)
        theta = theta - torch.linalg.solve(H + damping * eye, torch.func.grad(estimate)(theta))
    return theta - ref.theta


def test_sampled_objective_refine_matches_dense_newton_steps_on_the_estimate():
    trained = fit(tiny_llama(seed=0), CausalLMTask(), ROWS)
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new) + 0.1
    # hessian_samples=6, seed 0: the training rows 0, 3, 4, 6, 7, 11; the request touches 0, 4, 6 of them
    expected = dense_refine_sampled(trained, old, new, damping, steps=2, picked=(0, 3, 4, 6, 7, 11))
    full = dense_refine(trained, old, new, damping + 1.0, steps=2)
    assert relative_error(full, expected) > 1e-3  # the sample changes the result: the check can fail
    result, delta = run(
        trained, request, damping=damping, tol=1e-12, max_iter=500, refine_steps=2, hessian_samples=6,
        objective_estimate="sample",
    )  # fmt: skip
    assert relative_error(delta, expected) < 1e-8
    assert result.stats["objective_estimate"]["kept_sample_rows"] == 3
    assert [s["gradient_rows"] for s in result.stats["refine"]] == [3 + len(new)] * 2  # never the whole set


def test_sampled_objective_with_interacting_rows_matches_dense_newton_steps():
    """Rows taken with certainty enter with weight 1, the random sample stands for the other kept rows."""
    trained = fit(tiny_llama(seed=0), CausalLMTask(), ROWS)
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new) + 0.1
    result, delta = run(
        trained, request, damping=damping, tol=1e-12, max_iter=500, refine_steps=2, hessian_samples=6,
        objective_estimate="sample", interacting_rows=2,
    )  # fmt: skip
    include = result.stats["objective_estimate"]["interacting_row_indices"]
    assert len(include) == 2 and not set(include) & set(old)
    expected = dense_refine_sampled(
        trained, old, new, damping, steps=2, picked=(0, 3, 4, 6, 7, 11), include=include
    )
    without = dense_refine_sampled(trained, old, new, damping, steps=2, picked=(0, 3, 4, 6, 7, 11))
    assert relative_error(without, expected) > 1e-3
    assert relative_error(delta, expected) < 1e-8


def test_row_gradient_sketch_is_a_count_sketch_of_every_row_gradient(trained):
    """Each row's sketch is Σ_j sign_j g_ij in bucket(j), from the float64 per-row gradient, and the interacting
    rows are those with the largest |⟨S g_i, S b⟩|."""
    from hf_unlearn.curvature.rows import RowGradientSketch

    model = trained  # float64
    assert ParameterSpace(model).params[0].dtype == torch.float64
    space, ref = ParameterSpace(model), DenseReference(model, "token")
    sketch = RowGradientSketch.compute(model, CausalLMTask(), space, ROWS, "token", buckets=16, seed=3)
    assert sketch.vectors.shape == (len(ROWS), 16)
    for i in (0, 5, 11):
        g = ref.grad_sum([ROWS[i]]).float()
        expected = torch.zeros(16).index_add_(0, sketch.buckets, sketch.signs.float() * g)
        assert torch.allclose(sketch.vectors[i], expected, rtol=1e-5, atol=1e-7)
    b = ref.grad_sum([ROWS[1]])
    scores = (sketch.vectors @ sketch.project(b)).abs()
    scores[[1, 3]] = -1
    assert sketch.interacting(b, 3, {1, 3}) == sorted(torch.topk(scores, 3).indices.tolist())


def kfac_of(model, rows, M):
    from hf_unlearn.curvature.kfac_fit import fit_kfac_factors
    from hf_unlearn.distributed import Processes
    from hf_unlearn.gradients import Batches, LossContext

    procs = Processes()
    batches = Batches(CausalLMTask(), rows, 4, "cpu", procs)
    return fit_kfac_factors(
        LossContext(model, CausalLMTask(), ParameterSpace(model), procs), batches, "token", M
    )


def test_factors_without_rows_are_the_factors_of_the_other_rows(trained):
    M = DenseReference(trained, "token").normaliser(ROWS)
    kept = kfac_of(trained, ROWS, M).without(kfac_of(trained, [ROWS[1], ROWS[3]], M))
    direct = kfac_of(trained, [r for i, r in enumerate(ROWS) if i not in (1, 3)], M)
    assert kept.positions == direct.positions and kept.info["num_rows"] == len(ROWS) - 2
    for n in direct.A:
        assert torch.allclose(kept.A[n], direct.A[n], rtol=0, atol=1e-12)
        assert torch.allclose(kept.G[n], direct.G[n], rtol=0, atol=1e-12)


def test_factors_of_an_edited_set_are_taken_out_and_added_row_by_row(trained):
    """`without(old).with_rows(new)` are the factors of the edited rows (all taken at the same θ)."""
    M = DenseReference(trained, "token").normaliser(ROWS)
    _, old, new = REQUESTS["mixed"]
    updated = kfac_of(trained, ROWS, M).without(kfac_of(trained, [ROWS[i] for i in old], M))
    updated = updated.with_rows(kfac_of(trained, new, M))
    direct = kfac_of(trained, edited_rows(old, new), M)
    assert updated.positions == direct.positions and updated.info["num_rows"] == direct.info["num_rows"]
    for n in direct.A:
        assert torch.allclose(updated.A[n], direct.A[n], rtol=0, atol=1e-12)
        assert torch.allclose(updated.G[n], direct.G[n], rtol=0, atol=1e-12)


def test_quadratic_objective_refine_matches_dense_newton_steps(trained, tmp_path):
    """Kept rows as the K-FAC quadratic of the training run with the old rows taken out, new rows exact:

    R̃_q(θ) = ½ dᵀK d + (1/M) Σ_new ℓ(θ) − ⟨Σ_old ∇ℓ(θ*), d⟩/M,   Newton steps with K + G_new(θ) (the GGN)."""
    from hf_unlearn.curvature import KFAC_OPERATORS
    from hf_unlearn.distributed import Processes
    from hf_unlearn.gradients import Batches
    from hf_unlearn.solvers import dense_matrix

    request, old, new = REQUESTS["mixed"]
    ref = DenseReference(trained, "token")
    M = ref.normaliser(ROWS)
    factors = kfac_of(trained, ROWS, M)
    factors.save(tmp_path)
    kept_factors = factors.without(kfac_of(trained, [ROWS[i] for i in old], M))
    procs = Processes()
    K = dense_matrix(
        KFAC_OPERATORS["kfac"](trained, CausalLMTask(), ParameterSpace(trained), Batches(CausalLMTask(), [], 4, "cpu", procs),
                               "token", M, procs, factors=kept_factors)
    )  # fmt: skip
    damping = 0.05
    g_old = ref.grad_sum([ROWS[i] for i in old])

    def estimate(theta):
        d = theta - ref.theta
        return 0.5 * d @ K @ d + ref.objective(new, M)(theta) - g_old.dot(d) / M

    space = ParameterSpace(trained)
    theta, eye = ref.theta, torch.eye(len(ref.theta), dtype=ref.theta.dtype)
    try:
        for _ in range(3):  # the one-step update, then two refinement steps, on K + the new rows' GGN
            space.set_(theta)  # dense_ggn is taken at the model's parameters
            H = K + dense_ggn(trained, new, "token", M)
            theta = theta - torch.linalg.solve(H + damping * eye, torch.func.grad(estimate)(theta))
    finally:
        space.set_(ref.theta)
    expected = theta - ref.theta
    result, delta = run(
        trained, request, curvature="ggn", damping=damping, tol=1e-12, max_iter=500, refine_steps=2,
        objective_estimate="quadratic", curvature_factors=str(tmp_path),
    )  # fmt: skip
    assert relative_error(delta, expected) < 1e-8
    full = dense_refine(trained, old, new, damping + 1.0, steps=2)
    assert relative_error(full, expected) > 1e-3  # K-FAC is not the exact kept curvature: the check can fail
    assert [s["gradient_rows"] for s in result.stats["refine"]] == [len(new)] * 2  # the request's rows only
    handed_on = result.curvature_factors  # the edited set's factors, for the next request
    assert handed_on.positions == kfac_of(trained, edited_rows(old, new), M).positions


@pytest.mark.parametrize("refine_damping", ["fixed", "line_search"])
def test_sampled_objective_on_every_row_is_the_full_refinement(trained, refine_damping):
    """With the sample being the whole training set, the control variate is exact: the same steps as 'full'."""
    request, old, new = REQUESTS["mixed"]
    damping = damping_for(trained, "token", old, new) + 0.1
    common = {
        "damping": damping,
        "tol": 1e-12,
        "max_iter": 500,
        "refine_steps": 3,
        "refine_damping": refine_damping,
    }
    _, full = run(trained, request, **common)
    _, sampled = run(trained, request, objective_estimate="sample", **common)
    one_step = DenseReference(trained, "token").update(ROWS, [ROWS[i] for i in old], new, damping)
    assert relative_error(one_step, full) > 1e-4
    assert relative_error(sampled, full) < 1e-9


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_one_refine_step_reaches_the_exact_refit_after_removal(regression, normalization):
    """On a quadratic the tilted edited objective is minimised by the exact refit; one Newton step gets there."""
    model, task, rows = regression
    space = ParameterSpace(model)
    space.add_(refit(model, task, rows, normalization) - space.vector())  # θ* = argmin R, ∇R(θ*) = 0
    kept = [r for i, r in enumerate(rows) if i not in (11, 40)]
    expected = refit(model, task, kept, normalization)
    args = {
        "solver": "cg",
        "damping": 0.0,
        "tol": 1e-13,
        "dtype": "float64",
        "loss_normalization": normalization,
        "curvature_data": "original",  # the paper's step: exact only to first order here
    }
    first = unlearn(
        model,
        rows,
        UnlearningRequest(remove=[11, 40]),
        single_step(progress=False, **args),
        task=task,
    )
    one_step = space.vector().clone()
    space.add_(-flat(first, model))
    unlearn(
        model,
        rows,
        UnlearningRequest(remove=[11, 40]),
        single_step(progress=False, refine_steps=1, **args),
        task=task,
    )
    assert relative_error(one_step, expected) > 1e-6  # one step alone is only first order
    assert relative_error(space.vector(), expected) < 1e-10


def test_adaptive_refine_from_zero_damping_raises_lambda_instead_of_retrying_the_same_step(trained):
    """From λ = 0, tripling would retry the rejected step unchanged: the next trial takes a positive damping
    (the one CG suggests after meeting non-positive curvature)."""
    request, old, new = REQUESTS["mixed"]
    result, delta = run(
        trained, request, damping=0.0, tol=1e-10, max_iter=500, refine_steps=6, refine_damping="adaptive"
    )
    steps = result.stats["refine"]
    assert steps[0]["damping"] == 0.0 and not steps[0]["accepted"]  # the Hessian of R' is indefinite here
    assert "non-positive curvature" in result.stats["first_trial_rejected_because"]
    assert steps[1]["damping"] > 0 and steps[2]["damping"] in (steps[1]["damping"], 3 * steps[1]["damping"])
    assert any(s["accepted"] for s in steps) and delta.norm() > 0


def test_defaults_refine_on_the_quadratic_estimate_at_a_cost_independent_of_the_training_set(trained):
    """`UnlearningArguments()`: 'auto' chooses the quadratic estimate, and with the training set's K-FAC factors
    given, the rows through the model are the same for 72 training rows as for 112: the request's rows, and the
    kept-rows guard's and check's fixed samples (32 rows each)."""
    from hf_unlearn import UnlearningArguments

    request, old, new = REQUESTS["mixed"]
    work = []
    for rows in (ROWS + token_rows(60, seed=5), ROWS + token_rows(100, seed=5)):
        before = ParameterSpace(trained).vector().clone()
        factors = kfac_of(trained, rows, DenseReference(trained, "token").normaliser(rows))
        args = UnlearningArguments(dtype="float64", progress=False)
        result = unlearn(trained, rows, request, args, curvature_factors=factors)
        ParameterSpace(trained).set_(before)
        choice = result.stats["objective_estimate_choice"]
        assert (choice["asked"], choice["kind"]) == ("auto", "quadratic"), choice
        assert len(result.stats["refine"]) == args.refine_steps + 1 and result.stats["converged"]
        assert result.stats["retain_check"]["rows"] == 32
        guard = result.stats["kept_loss_guard"]
        assert guard["rows"] == 32
        edited = result.request.edited_rows(rows)
        assert result.curvature_factors.info["num_rows"] == len(edited)  # the edited set's, handed on
        products = result.stats["curvature_products"] + sum(
            step.get("curvature_products") or 0 for step in result.stats["refine"]
        )
        rows_of = result.stats["work_rows"]
        # the loss passes besides the checks' (the kept sample and the old rows, before and after) and the
        # guard's (its sample at θ* and at each evaluation) are line-search trials, each over the new versions
        checks = 2 * 32 + 2 * len(old) + 32 * (1 + guard["evaluations"])
        trials = (rows_of["loss"] - checks) / len(new)
        work.append(rows_of | {"product:ggn": rows_of["product:ggn"] / products, "loss": trials % 1})
    # the same gradient rows; every curvature product and every trial over the request's new rows only
    assert work[0] == work[1] == work[0] | {"product:ggn": len(new), "loss": 0}, work


@pytest.mark.parametrize(
    "settings, because",
    [
        ({"refine_steps": 0, "refine_damping": "fixed"}, "single fixed step"),
        ({"curvature": "kfac", "solver": "direct"}, "curvature 'kfac'"),
        ({"curvature_data": "original"}, "original rows"),
        ({"preconditioner": "nystrom"}, "preconditioner 'nystrom'"),
        ({"solver": "lissa"}, "solver 'lissa'"),
    ],
)
def test_auto_falls_back_to_the_full_objective_and_says_why(trained, settings, because):
    from hf_unlearn import UnlearningArguments
    from hf_unlearn.eraser import choose_objective_estimate

    choice = choose_objective_estimate(UnlearningArguments(**settings), trained, ParameterSpace(trained))
    assert choice["kind"] == "full" and because in choice["because"], choice
    explicit = choose_objective_estimate(
        UnlearningArguments(objective_estimate="full"), trained, ParameterSpace(trained)
    )
    assert explicit == {"kind": "full", "asked": "full", "because": "asked for"}


def test_auto_takes_the_full_objective_when_the_output_layer_is_adapted():
    from peft import LoraConfig, get_peft_model

    from hf_unlearn import UnlearningArguments
    from hf_unlearn.eraser import choose_objective_estimate

    model = get_peft_model(tiny_llama_base(seed=0), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    choice = choose_objective_estimate(UnlearningArguments(), model, ParameterSpace(model))
    assert choice["kind"] == "full" and "output layer is adapted" in choice["because"], choice


def test_the_kept_rows_check_names_a_rise_of_their_loss(caplog):
    from hf_unlearn.eraser import RETAIN_RISE_WARNING, retain_check

    assert retain_check(0.9, 0.9 + RETAIN_RISE_WARNING * 0.9, 32).warning is None
    with caplog.at_level("WARNING", logger="hf_unlearn.eraser"):
        check = retain_check(0.06, 4.4, 32)
    assert "rose from 0.06 to 4.4" in check.warning and "rose from 0.06" in caplog.text


def test_a_kept_loss_rise_solves_again_with_tenfold_damping(trained):
    """With a tolerance of 0, every attempt whose kept loss rose is followed by one with λ ×10, and the result is
    the last attempt's — the same Δθ as asking for that λ without retries. (Fixed Newton steps: a line search
    keeps its steps inside the tolerance on a sample of its own, the next test.)"""
    from hf_unlearn import UnlearningArguments

    request = REQUESTS["IR"][0]
    before = ParameterSpace(trained).vector().clone()
    args = UnlearningArguments(
        dtype="float64",
        progress=False,
        kept_loss_tolerance=0.0,
        curvature_factors="pass",
        refine_damping="fixed",
    )
    result = unlearn(trained, ROWS, request, args)
    delta = ParameterSpace(trained).vector() - before
    ParameterSpace(trained).set_(before)
    attempts = result.stats["kept_loss_attempts"]
    assert [a["damping"] for a in attempts] == pytest.approx([1e-3 * 10**k for k in range(len(attempts))])
    rises = [a["kept_loss_after"] - result.stats["retain_check"]["loss_before"] for a in attempts]
    assert len(attempts) > 1 and all(r > 0 for r in rises[:-1]) and (rises[-1] <= 0 or len(attempts) == 6)
    assert result.stats["damping"] == attempts[-1]["damping"]
    assert result.stats["retain_check"]["loss_after"] == pytest.approx(attempts[-1]["kept_loss_after"])
    again = dataclasses.replace(args, damping=attempts[-1]["damping"], kept_loss_tolerance=float("inf"))
    unlearn(trained, ROWS, request, again)
    assert relative_error(ParameterSpace(trained).vector() - before, delta) < 1e-10
    ParameterSpace(trained).set_(before)


def test_backtracking_with_a_guard_takes_the_first_length_both_accept():
    from hf_unlearn.refinement import backtrack

    class Line:  # θ on a line: R̃(t) = (t − 1)², a guard that holds for t ≤ ¼
        def __init__(self):
            self.t = torch.zeros(1, dtype=torch.float64)

        def set_(self, v):
            self.t = v.clone()

    line = Line()
    start, step = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)

    def value():
        return (line.t.item() - 1) ** 2

    assert backtrack(value, line, start, step, 1.0, -2.0) == (1.0, 0.0)
    length, new_value = backtrack(value, line, start, step, 1.0, -2.0, guard=lambda: line.t.item() <= 0.25)
    assert (length, new_value) == (0.25, 0.5625) and line.t.item() == 0.25
    assert backtrack(value, line, start, step, 1.0, -2.0, guard=lambda: False) == (0.0, 1.0)
    assert line.t.item() == 0.0  # left at the start


def test_the_line_search_keeps_the_kept_rows_guard_sample_within_the_tolerance(trained):
    """The default line search with a tolerance below the rise its steps would cause: steps are shortened until
    the guard sample's loss (per token, float64 loop) has risen by at most the tolerance."""
    import math

    from hf_unlearn import UnlearningArguments
    from hf_unlearn.curvature.setup import sample_rows
    from hf_unlearn.eraser import RETAIN_CHECK_ROWS

    request, old, _ = REQUESTS["IR"]
    kept = [row for i, row in enumerate(ROWS) if i not in old]
    guard_rows = sample_rows(kept, 2 * RETAIN_CHECK_ROWS, 0)[::2]
    ref = DenseReference(trained, "token")
    loss = ref.objective(guard_rows)

    def rise(tolerance):
        args = UnlearningArguments(
            dtype="float64", progress=False, curvature_factors="pass", kept_loss_tolerance=tolerance
        )
        before = ParameterSpace(trained).vector().clone()
        result = unlearn(trained, ROWS, request, args)
        delta = ParameterSpace(trained).vector() - before
        ParameterSpace(trained).set_(before)
        return (loss(ref.theta + delta) - loss(ref.theta)).item(), result

    free, result = rise(math.inf)
    assert "kept_loss_guard" not in result.stats and free > 0.01, free
    tolerance = free / 4
    guarded, result = rise(tolerance)
    assert result.stats["kept_loss_guard"]["rejections"] > 0, result.stats["kept_loss_guard"]
    assert 0 < guarded <= tolerance + 1e-12, (guarded, tolerance)


def test_refinement_solves_each_step_to_the_inexact_newton_forcing_term(trained):
    """Refining, every step's solve stops at min(refine_tol, ‖∇R̃‖/‖b‖), never below tol — the first step's
    gradient is b, so it stops at refine_tol — and reaches it."""
    from hf_unlearn import UnlearningArguments

    request = REQUESTS["mixed"][0]
    before = ParameterSpace(trained).vector().clone()
    args = UnlearningArguments(
        dtype="float64", progress=False, curvature_factors="pass", refine_tol=0.05, tol=1e-4
    )
    result = unlearn(trained, ROWS, request, args)
    ParameterSpace(trained).set_(before)
    b_norm = result.stats["b_norm"]
    assert result.stats["relative_residual"] <= 0.05  # the first step's solve
    solved = [s for s in result.stats["refine"] if not s["first_step"]]
    assert solved, result.stats["refine"]
    for s in solved:
        expected = max(1e-4, min(0.05, s["tilted_gradient_norm"] / b_norm))
        assert s["tol"] == pytest.approx(expected) and s["relative_residual"] <= expected, s
    assert UnlearningArguments(refine_tol=0.0, tol=1e-6).newton_tol(0.5, 1.0) == 1e-6
    with pytest.raises(ConfigurationError, match="refine_tol"):
        UnlearningArguments(refine_tol=1.0)


def test_stats_are_typed_records_read_as_the_manifest_mapping(trained):
    """`result.stats` holds typed records (the solve's `SolverStats`, the forget and kept-rows checks, the sizes)
    and reads as the flat mapping the manifest serialises: the same values by key, ‖Δθ‖ from Δθ itself."""
    import json
    import math

    from hf_unlearn import UnlearningStats
    from hf_unlearn.solvers.base import SolverStats

    result, delta = run(trained, REQUESTS["IR"][0])
    stats = result.stats
    assert isinstance(stats, UnlearningStats) and isinstance(stats.solver, SolverStats)
    flat_stats = dict(stats)
    assert list(flat_stats)[:4] == ["solver", "iterations", "relative_residual", "converged"]
    assert flat_stats["iterations"] == stats.solver.iterations and flat_stats["damping"] == stats.damping
    assert flat_stats["forget_loss_after"] == stats.forget.after
    assert flat_stats["forget_loss_change_measured"] == stats.forget.after - stats.forget.before
    assert flat_stats["retain_check"]["loss_after"] == stats.retain.loss_after
    assert flat_stats["num_params"] == stats.sizes.num_params == delta.numel()
    assert stats["delta_norm"] == result.delta_norm == pytest.approx(delta.norm().item(), rel=1e-12)
    assert math.isfinite(stats.b_norm) and len(stats) == len(flat_stats)
    json.dumps(flat_stats)  # serialisable as it stands
    with pytest.raises(KeyError):
        stats["no such figure"]
