import pytest
import torch
from reference import DenseReference, fit, relative_error, tiny_llama, token_rows

from hf_unlearn import CausalLMTask
from hf_unlearn.curvature import HessianOperator
from hf_unlearn.distributed import Processes
from hf_unlearn.gradients import Batches, gradient_sum
from hf_unlearn.objective import normaliser
from hf_unlearn.params import ParameterSpace

ROWS = token_rows(10, seed=1)


@pytest.fixture(scope="module")
def model():
    return fit(tiny_llama(seed=1), CausalLMTask(), ROWS).eval()


def batches(rows, batch_size=4):
    return Batches(CausalLMTask(), rows, batch_size, "cpu", Processes())


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_gradient_sum_matches_per_example_loop(model, normalization):
    space = ParameterSpace(model)
    g = gradient_sum(model, CausalLMTask(), space, batches(ROWS, 3), normalization, Processes())
    assert relative_error(g, DenseReference(model, normalization).grad_sum(ROWS)) < 1e-12


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_hvp_matches_dense_hessian(model, normalization):
    space = ParameterSpace(model)
    ref = DenseReference(model, normalization)
    H = ref.hessian(ROWS)
    op = HessianOperator(
        model,
        CausalLMTask(),
        space,
        batches(ROWS),
        normalization,
        normaliser(CausalLMTask(), ROWS, normalization),
        Processes(),
    )
    for _ in range(3):
        v = torch.randn(space.numel, dtype=torch.float64)
        assert relative_error(op.matvec(v), H @ v) < 1e-12


def test_only_trainable_parameters_are_differentiated(model):
    space = ParameterSpace(model)
    assert all("lora_" in name for name in space.names)
    assert space.numel == 2 * 2 * (16 * 2 + 2 * 16)  # layers × (q, v) × (A + B)
