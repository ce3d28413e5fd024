"""The mini-batch solvers' step-size rule (`hf_unlearn.solvers.stochastic`) on problems where one row is far
stiffer than the rest, so that a mini-batch that draws it is far stiffer than the full curvature — the case
in which the previous rule (scale 1.5·(λ_max(C) + λ)) diverged on the quick benchmark's toy Llama."""

import pytest
import torch
from reference import MaskedRegressionTask, regression_rows
from reference import relative_error as relerr

from hf_unlearn.curvature import HessianOperator
from hf_unlearn.distributed import Processes
from hf_unlearn.gradients import Batches
from hf_unlearn.objective import normaliser
from hf_unlearn.params import ParameterSpace
from hf_unlearn.solvers import LissaOptions, QPOptions, dense_matrix, lissa_solve, qp_solve
from hf_unlearn.solvers.stochastic import MiniBatchCurvature, expected_smoothness, stratify

BATCH = 8


def regression_operator(heavy: int, factor: float, n: int = 60, seed: int = 3):
    """Hessian operator (= GGN: the loss is quadratic) of a masked regression, P = 10, whose first `heavy`
    rows have their inputs scaled by `factor` (curvature × factor²); plus the per-row dense C_z."""
    rows = regression_rows(n, d=4, k=2, seed=seed)
    for r in rows[:heavy]:
        r["x"] = [factor * v for v in r["x"]]
    task, model = MaskedRegressionTask(), torch.nn.Linear(4, 2).double()
    space, processes = ParameterSpace(model), Processes()
    M = normaliser(task, rows, "token")

    def op(subset):
        return HessianOperator(
            model, task, space, Batches(task, subset, 50, "cpu", processes), "token", M, processes
        )

    return op(rows), [dense_matrix(op([r])) for r in rows]


@pytest.fixture(scope="module")
def stiff_row():
    """One row with 64× the curvature of a typical row: λ_max(C_B) of a batch holding it ≈ 7·λ_max(C)."""
    op, per_row = regression_operator(heavy=1, factor=8.0)
    C = sum(per_row)
    damping = 0.01 * torch.linalg.eigvalsh(C)[-1].item()
    rhs = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.solve(C + damping * torch.eye(op.size, dtype=torch.float64), rhs)
    return op, per_row, C, damping, rhs, exact


def test_stiff_row_defeats_the_old_scale_but_not_the_default_lissa(stiff_row):
    op, per_row, C, damping, rhs, exact = stiff_row
    lambda_max = torch.linalg.eigvalsh(C)[-1].item()
    # the miniature of the toy-Llama failure: a batch holding row 0, rescaled by n/b, is much stiffer than C
    assert (len(per_row) / BATCH) * torch.linalg.eigvalsh(per_row[0])[-1].item() > 3 * lambda_max
    old, _ = lissa_solve(
        op,
        damping,
        rhs,
        tol=1e-6,
        max_iter=2000,
        options=LissaOptions(seed=1, lissa_scale=1.5 * (lambda_max + damping)),
    )
    assert not torch.isfinite(old).all() or relerr(old, exact) > 1.0  # the previous default diverges
    x, stats = lissa_solve(op, damping, rhs, tol=1e-6, max_iter=2000, options=LissaOptions(seed=1))
    assert relerr(x, exact) < 0.10
    extra = stats.extra
    assert extra["lissa_scale"] == extra["smoothness_estimate"] > lambda_max + damping
    assert extra["always_included_rows"] >= 1 and extra["sample_products"] == 2000
    assert extra["scale_row_products"] > 0 and stats.relative_residual < 0.1


def test_stiff_row_qp_sgd_rule_is_stable(stiff_row):
    op, _, C, damping, rhs, exact = stiff_row
    lambda_max = torch.linalg.eigvalsh(C)[-1].item()
    x, stats = qp_solve(
        op, damping, rhs, tol=1e-6, max_iter=2000, options=QPOptions(seed=1, qp_optimizer="sgd")
    )
    assert relerr(x, exact) < 0.30
    assert stats.extra["qp_lr"] == pytest.approx(0.1 / stats.extra["smoothness_estimate"])
    assert stats.extra["qp_lr"] < 0.1 / (lambda_max + damping)  # smaller than the previous default
    old, _ = qp_solve(
        op,
        damping,
        rhs,
        tol=1e-6,
        max_iter=2000,
        options=QPOptions(seed=1, qp_optimizer="sgd", qp_lr=0.1 / (lambda_max + damping)),
    )
    assert not torch.isfinite(old).all() or relerr(old, exact) > 1.0


def test_stiff_row_default_qp_converges_to_tol(stiff_row):
    """The default (svrg) has no noise floor: it reaches tol, where sgd stalls at a few percent."""
    op, _, C, damping, rhs, exact = stiff_row
    x, stats = qp_solve(op, damping, rhs, tol=1e-6, max_iter=2000, options=QPOptions(seed=1))
    assert stats.extra["qp_optimizer"] == "svrg" and stats.converged
    assert relerr(x, exact) < 1e-5
    assert stats.extra["qp_lr"] == pytest.approx(1 / stats.extra["smoothness_estimate"])
    A = C + damping * torch.eye(op.size, dtype=torch.float64)
    assert stats.relative_residual == pytest.approx(((A @ x - rhs).norm() / rhs.norm()).item(), rel=1e-6)
    sgd, _ = qp_solve(
        op, damping, rhs, tol=1e-6, max_iter=2000, options=QPOptions(seed=1, qp_optimizer="sgd")
    )
    assert relerr(sgd, exact) > 100 * relerr(x, exact)


def test_svrg_halves_a_step_that_diverges_and_never_returns_worse_than_zero(stiff_row):
    op, _, C, damping, rhs, exact = stiff_row
    lambda_max = torch.linalg.eigvalsh(C)[-1].item()
    x, stats = qp_solve(
        op,
        damping,
        rhs,
        tol=1e-6,
        max_iter=2000,
        options=QPOptions(seed=1, qp_lr=40 / (lambda_max + damping)),
    )
    assert stats.extra["step_halvings"] >= 3 and torch.isfinite(x).all()
    assert stats.relative_residual < 1e-3 and relerr(x, exact) < 1e-2


@pytest.fixture(scope="module")
def tiny_llama_ggn():
    """The Gauss–Newton curvature of the tiny Llama (LoRA, P = 256) on 24 rows, damped to condition number 21,
    with its dense form: the well-conditioned case on which the released-style solvers stopped 40 % short."""
    from reference import tiny_llama, token_rows

    from hf_unlearn.curvature.ggn import GaussNewtonOperator
    from hf_unlearn.objective import CausalLMTask

    model, rows, task = tiny_llama(seed=0).eval(), token_rows(24, seed=0), CausalLMTask()
    processes = Processes()
    op = GaussNewtonOperator(
        model, task, ParameterSpace(model), Batches(task, rows, BATCH, "cpu", processes), "token",
        normaliser(task, rows, "token"), processes,
    )  # fmt: skip
    C = dense_matrix(op)
    eigenvalues = torch.linalg.eigvalsh(C)
    damping = 0.05 * eigenvalues[-1].item()
    A = C + damping * torch.eye(op.size, dtype=torch.float64)
    assert torch.linalg.cond(A).item() < 25
    rhs = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return op, A, damping, rhs, torch.linalg.solve(A, rhs)


def test_default_qp_converges_on_the_tiny_llama_at_the_default_budget_and_counts_its_products(tiny_llama_ggn):
    op, A, damping, rhs, exact = tiny_llama_ggn
    from hf_unlearn import UnlearningArguments

    defaults = UnlearningArguments()
    full_before = op.num_products
    x, stats = qp_solve(
        op, damping, rhs, tol=defaults.tol, max_iter=defaults.max_iter, options=QPOptions(seed=0)
    )
    error = relerr(x, exact)
    print(f"qp (svrg) on the tiny Llama: relative error {error:.2e}, {stats.extra}")
    assert error < 1e-4 and stats.converged
    extra = stats.extra
    # 24 rows in mini-batches of 8: a full product is 3 mini-batch products
    assert extra["full_product_cost"] == 3.0
    assert extra["full_products"] == op.num_products - full_before == stats.curvature_products
    assert extra["minibatch_equivalent_products"] == pytest.approx(
        extra["sample_products"] + 3.0 * extra["full_products"] + extra["scale_row_products"] / BATCH
    )
    # the solve itself kept within the budget: inner steps plus the epochs' full products
    assert extra["sample_products"] + 3.0 * extra["epochs"] <= defaults.max_iter
    assert 0 < extra["momentum"] < 1
    assert extra["sample_products"] == stats.iterations == extra["epochs"] * extra["steps_per_epoch"]


def exact_second_moment(per_row, always, drawn):
    """E[C_B²] for `always` rows in every batch plus `drawn` of the others without replacement, rescaled."""
    C = sum(per_row)
    rest = [Cz for i, Cz in enumerate(per_row) if i not in set(always)]
    L = len(rest)
    K = [L * Cz for Cz in rest]
    C_rest = sum(rest)
    spread = sum(Kz @ Kz for Kz in K) / L - C_rest @ C_rest
    f = (L - drawn) / (L - 1)
    return C @ C + (f / drawn) * spread


@pytest.mark.parametrize(("heavy", "factor", "stratified"), [(1, 8.0, True), (0, 1.0, False)])
def test_smoothness_estimate_bounds_the_exact_expected_smoothness(heavy, factor, stratified):
    """𝓛̂ ≥ 𝓛 = λ_max(A^{-1/2} E[A_B²] A^{-1/2}) computed densely, and within a small factor of it; with
    a stiff row the rule includes it in every batch, with similar rows it keeps plain uniform batches."""
    op, per_row = regression_operator(heavy, factor)
    C = sum(per_row)
    damping = 0.01 * torch.linalg.eigvalsh(C)[-1].item()
    rhs = torch.ones(op.size, dtype=torch.float64)
    estimate, always, _ = expected_smoothness(op, damping, rhs, BATCH)
    assert bool(always) == stratified and len(always) < BATCH
    eye = torch.eye(op.size, dtype=torch.float64)
    second = exact_second_moment(per_row, always, BATCH - len(always)) + 2 * damping * C + damping**2 * eye
    evals, evecs = torch.linalg.eigh(C + damping * eye)
    root_inv = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    exact = torch.linalg.eigvalsh(root_inv @ second @ root_inv)[-1].item()
    assert exact * (1 - 1e-9) <= estimate < 3 * exact


def test_stratified_products_are_unbiased_with_the_predicted_second_moment(stiff_row):
    op, per_row, C, damping, rhs, _ = stiff_row
    _, always, _ = expected_smoothness(op, damping, rhs, BATCH)
    products = MiniBatchCurvature(op, BATCH, torch.Generator().manual_seed(5), always)
    v = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    samples = torch.stack([products.matvec(v) for _ in range(1500)])
    assert products.products == 1500
    assert relerr(samples.mean(0), C @ v) < 0.03
    predicted = v @ exact_second_moment(per_row, always, BATCH - len(always)) @ v
    assert samples.pow(2).sum(1).mean().item() == pytest.approx(predicted.item(), rel=0.05)
    # the point of stratifying: far less spread than uniform batches of the same size
    uniform = v @ exact_second_moment(per_row, [], BATCH) @ v
    exact = (C @ v).pow(2).sum()
    assert predicted - exact < 0.1 * (uniform - exact)


def test_stratify_picks_the_stiff_rows_only_when_it_pays():
    assert stratify([1.0] * 50, 8) == ([], pytest.approx(42 / 49 / 8 * 50))
    always, term = stratify([1.0] * 48 + [500.0, 300.0], 8)
    assert always == [48, 49] and term == pytest.approx(42 / 47 / 6 * 48)
    always, _ = stratify([1000.0 * (i + 1) for i in range(20)], 4)  # every row stiff: at least one drawn
    assert len(always) <= 3
    assert stratify([3.0, 1.0, 2.0], 8) == ([], 0.0)  # the batch is the whole shard: no variance
