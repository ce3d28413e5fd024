import pytest
import torch

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
