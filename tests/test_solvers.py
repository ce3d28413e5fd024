import pytest
import torch
from reference import relative_error as relerr

from hf_unlearn import ConfigurationError, NonPositiveCurvatureError
from hf_unlearn.solvers import conjugate_gradient, direct_solve
from hf_unlearn.solvers.direct import MAX_DIRECT_PARAMS


class Dense:
    """A curvature operator backed by an explicit matrix."""

    def __init__(self, C):
        self.C, self.size = C, C.shape[0]
        self.space = type("S", (), {"params": [C]})()

    def matvec(self, v):
        return self.C @ v


def spd(n, condition=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (
        Q
        @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64))
        @ Q.T
    )


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_cg_and_direct_match_linalg_solve(damping):
    C, rhs = spd(40), torch.randn(40, dtype=torch.float64)
    exact = torch.linalg.solve(C + damping * torch.eye(40, dtype=torch.float64), rhs)
    x, stats = conjugate_gradient(Dense(C), damping, rhs, tol=1e-12, max_iter=200)
    assert stats.converged and stats.relative_residual <= 1e-12
    torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-12)
    x, stats = direct_solve(Dense(C), damping, rhs)
    torch.testing.assert_close(x, exact, rtol=1e-12, atol=1e-12)


def test_cg_reports_non_convergence():
    x, stats = conjugate_gradient(
        Dense(spd(40, condition=1e4)), 0.0, torch.ones(40, dtype=torch.float64), tol=1e-12, max_iter=3
    )
    assert not stats.converged and stats.iterations == 3 and stats.relative_residual > 1e-12


def test_cg_measures_the_true_residual_that_float32_drifts_from():
    """In float32 the recursively updated residual drifts below the true one near the precision's floor:
    the stats carry the true ‖rhs − (C+λI)x‖/‖rhs‖, measured with one more product."""
    rhs = torch.randn(200, generator=torch.Generator().manual_seed(2)).float()
    C = spd(200, condition=1e5, seed=1).float()
    x, stats = conjugate_gradient(Dense(C), 0.0, rhs, tol=1e-5, max_iter=2000)
    true_residual = ((rhs - C @ x).norm() / rhs.norm()).item()
    assert stats.extra["true_relative_residual"] == pytest.approx(true_residual, rel=1e-2)
    assert true_residual > 10 * stats.relative_residual  # the drift the recursive value hides
    assert stats.curvature_products == stats.iterations + 1


def test_cg_stops_on_negative_curvature_and_names_a_damping():
    C = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64))
    with pytest.raises(NonPositiveCurvatureError, match="--damping") as info:
        conjugate_gradient(
            Dense(C), 0.0, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), tol=1e-10, max_iter=10
        )
    assert torch.linalg.eigvalsh(C + info.value.suggested_damping * torch.eye(3, dtype=torch.float64))[0] > 0


def test_direct_refuses_indefinite_and_large():
    C = torch.diag(torch.tensor([1.0, -0.2], dtype=torch.float64))
    with pytest.raises(NonPositiveCurvatureError, match="--damping"):
        direct_solve(Dense(C), 0.1, torch.ones(2, dtype=torch.float64))
    big = Dense(torch.zeros(1, 1))
    big.size = MAX_DIRECT_PARAMS + 1
    with pytest.raises(ConfigurationError, match="--solver cg"):
        direct_solve(big, 0.1, torch.ones(1))


# --- mini-batch solvers on a real finite-sum curvature (a linear model, so the test is fast) ------------


@pytest.fixture(scope="module")
def finite_sum():
    """The Hessian operator of an ill-conditioned masked regression (P = 27, condition ≈ 300) + its dense form."""
    from reference import MaskedRegressionTask, regression_rows

    from hf_unlearn.curvature import HessianOperator
    from hf_unlearn.distributed import Processes
    from hf_unlearn.gradients import Batches
    from hf_unlearn.objective import normaliser
    from hf_unlearn.params import ParameterSpace
    from hf_unlearn.solvers import dense_matrix

    rows = regression_rows(200, d=8, k=3, seed=4)
    for r in rows:
        r["x"] = [v * s for v, s in zip(r["x"], [1, 2, 3, 0.5, 0.3, 1, 1.5, 0.2])]
    task, model = MaskedRegressionTask(), torch.nn.Linear(8, 3).double()
    op = HessianOperator(
        model,
        task,
        ParameterSpace(model),
        Batches(task, rows, 50, "cpu", Processes()),
        "token",
        normaliser(task, rows, "token"),
        Processes(),
    )
    return op, dense_matrix(op)


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_lissa_default_rule_is_within_10_percent_at_2000_steps(finite_sum, damping):
    from hf_unlearn.solvers import LissaOptions, lissa_solve

    op, C = finite_sum
    rhs = torch.randn(op.size, dtype=torch.float64)
    exact = torch.linalg.solve(C + damping * torch.eye(op.size, dtype=torch.float64), rhs)
    x, stats = lissa_solve(op, damping, rhs, tol=1e-6, max_iter=2000, options=LissaOptions(seed=1))
    assert relerr(x, exact) < 0.10
    assert stats.extra["sample_products"] >= 2000 and stats.extra["stochastic"]
    assert stats.extra["lissa_scale"] > torch.linalg.eigvalsh(C)[-1].item()  # the scale rule: s > λ_max


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", "auto"), ("adam", 0.05)])
def test_qp_is_within_30_percent_at_2000_steps(finite_sum, optimizer, lr):
    from hf_unlearn.solvers import QPOptions, qp_solve

    op, C = finite_sum
    rhs = torch.randn(op.size, dtype=torch.float64)
    exact = torch.linalg.solve(C + 0.01 * torch.eye(op.size, dtype=torch.float64), rhs)
    x, stats = qp_solve(
        op, 0.01, rhs, tol=1e-6, max_iter=2000, options=QPOptions(seed=2, qp_optimizer=optimizer, qp_lr=lr)
    )
    assert relerr(x, exact) < 0.30
    assert relerr(x, 2 * exact) > 0.35  # not the released code's fixed point 2(C+λI)⁻¹b
    assert stats.relative_residual < 1.0


def test_qp_adam_needs_a_step_size_and_stochastic_solvers_refuse_indefinite(finite_sum):
    from hf_unlearn.solvers import QPOptions, lissa_solve, qp_solve

    op, _ = finite_sum
    rhs = torch.ones(op.size, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match="qp-lr"):
        qp_solve(op, 0.1, rhs, tol=1e-6, max_iter=10, options=QPOptions(qp_optimizer="adam"))
    negative = type(op)(
        op.model, op.task, op.space, op.batches, op.normalization, -op.normaliser, op.processes
    )
    for solve in (lissa_solve, qp_solve):
        with pytest.raises(NonPositiveCurvatureError, match="--damping"):
            solve(negative, 0.1, rhs, tol=1e-6, max_iter=10)


def test_lanczos_extremes_match_eigvalsh():
    from hf_unlearn.curvature.spectrum import lanczos_extremes

    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    C = Q @ torch.diag(torch.linspace(-2.0, 97.0, 60, dtype=torch.float64)) @ Q.T  # indefinite
    ev = torch.linalg.eigvalsh(C)
    low, high, steps = lanczos_extremes(lambda v: C @ v, 60, 30, dtype=torch.float64, device="cpu")
    assert steps == 30 and low >= ev[0].item() - 1e-9 and high <= ev[-1].item() + 1e-9  # Ritz values inside
    assert (
        abs(low - ev[0].item()) < 0.05 * abs(ev[0].item())
        and abs(high - ev[-1].item()) < 0.01 * ev[-1].item()
    )
    low, high, _ = lanczos_extremes(lambda v: C @ v, 60, 60, dtype=torch.float64, device="cpu")
    assert abs(low - ev[0].item()) < 1e-8 and abs(high - ev[-1].item()) < 1e-8


class _GradientRows:
    """A Fisher operator given by its per-example gradients G (n × P): F = GᵀG/M."""

    def __init__(self, G, M):
        self.G, self.normaliser, self.size = G, M, G.shape[1]
        self.space = type("S", (), {"params": [G]})()

    def gradient_matrix(self):
        return self.G

    def matvec(self, v):
        return self.G.T @ (self.G @ v) / self.normaliser


def test_woodbury_in_float32_is_accurate_and_reports_its_residual():
    from hf_unlearn.solvers import woodbury_solve

    g = torch.Generator().manual_seed(0)
    G = (torch.randn(64, 4, generator=g) @ torch.randn(4, 4000, generator=g)).float()  # near rank 4
    rhs = torch.randn(4000, generator=g).float()
    for damping in (1e-2, 1e-5):
        x, stats = woodbury_solve(_GradientRows(G, 1000.0), damping, rhs, tol=1e-4)
        exact = (rhs.double() - G.double().T @ torch.linalg.solve(
            G.double() @ G.double().T + 1000.0 * damping * torch.eye(64, dtype=torch.float64), G.double() @ rhs.double()
        )) / damping  # fmt: skip
        assert ((x.double() - exact).norm() / exact.norm()).item() < 1e-4
        assert stats.converged == (stats.relative_residual <= 1e-4)


@pytest.mark.parametrize("solver", ["cg", "direct", "lissa", "qp"])
def test_make_solve_passes_each_solver_its_own_options_and_an_unknown_one_fails(finite_sum, solver):
    """Every solver gets exactly its options from the arguments (no `**_` swallowing a misspelt one): through
    `make_solve` each runs on the finite-sum problem and lands near the exact solve; an option a solver does not
    take is a TypeError."""
    from hf_unlearn import UnlearningArguments
    from hf_unlearn.solvers import SOLVERS, make_solve

    op, C = finite_sum
    rhs = torch.randn(op.size, dtype=torch.float64)
    exact = torch.linalg.solve(C + 0.1 * torch.eye(op.size, dtype=torch.float64), rhs)
    args = UnlearningArguments(solver=solver, max_iter=2000, seed=1)
    x, stats = make_solve(args)(op, 0.1, rhs, 1e-8)
    assert stats.solver == solver and relerr(x, exact) < (1e-6 if solver in ("cg", "direct") else 0.3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SOLVERS[solver](op, 0.1, rhs, tol=1e-6, max_iter=10, lisa_scale=2.0)
