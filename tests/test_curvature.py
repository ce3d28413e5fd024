import pytest
import torch
from reference import (
    DenseReference,
    MaskedRegressionTask,
    dense_fisher,
    dense_ggn,
    fit,
    regression_rows,
    relative_error,
    tiny_llama,
    token_rows,
)

from hf_unlearn import CausalLMTask, ConfigurationError, UnlearningTask
from hf_unlearn.curvature import FisherOperator, GaussNewtonOperator, HessianOperator
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


def operator(cls, model, rows, normalization, task=None, batch_size=4):
    task = task or CausalLMTask()
    return cls(
        model,
        task,
        ParameterSpace(model),
        Batches(task, rows, batch_size, "cpu", Processes()),
        normalization,
        normaliser(task, rows, normalization),
        Processes(),
    )


def as_matrix(op):
    eye = torch.eye(op.size, dtype=torch.float64)
    return torch.stack([op.matvec(eye[i]) for i in range(op.size)], dim=1)


@pytest.fixture(scope="module")
def dense_ggns(model):
    return {n: dense_ggn(model, ROWS, n) for n in ("token", "example")}


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_ggn_matches_dense_jacobian_reference_and_is_psd(model, dense_ggns, normalization):
    G = dense_ggns[normalization]
    assert relative_error(G, G.T) < 1e-12
    assert torch.linalg.eigvalsh(G)[0] > -1e-10 * torch.linalg.eigvalsh(G)[-1]
    H = DenseReference(model, normalization).hessian(ROWS)
    assert relative_error(G, H) > 1e-3  # a real approximation on a non-linear model, not the Hessian
    op = operator(GaussNewtonOperator, model, ROWS, normalization)
    for _ in range(3):
        v = torch.randn(op.size, dtype=torch.float64)
        assert relative_error(op.matvec(v), G @ v) < 1e-11


def test_ggn_autograd_output_hessian_equals_softmax_closed_form(model):
    """The generic `output_hessian_product` (double backward through the loss only) = diag(p) − ppᵀ."""
    task = CausalLMTask()
    batch = task.collate(ROWS[:4])
    logits = task.outputs(model, batch).detach()
    u = torch.randn_like(logits)
    for normalization in ("token", "example"):
        closed = task.output_hessian_product(logits, u, batch, normalization)
        generic = UnlearningTask.output_hessian_product(task, logits, u, batch, normalization)
        assert relative_error(closed, generic) < 1e-12


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_fisher_matches_per_example_loop_and_is_psd(model, normalization):
    F = dense_fisher(model, ROWS, normalization)
    assert torch.linalg.eigvalsh(F)[0] > -1e-10 * torch.linalg.eigvalsh(F)[-1]
    op = operator(FisherOperator, model, ROWS, normalization, batch_size=3)
    streamed = operator(FisherOperator, model, ROWS, normalization, batch_size=3)
    streamed._local_gradients = lambda: None  # force the recompute-per-product path
    for _ in range(3):
        v = torch.randn(op.size, dtype=torch.float64)
        assert relative_error(op.matvec(v), F @ v) < 1e-12
        assert relative_error(streamed.matvec(v), F @ v) < 1e-12
    assert relative_error(op.gradient_matrix().T @ op.gradient_matrix() / op.normaliser, F) < 1e-12


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_ggn_equals_hessian_for_squared_loss_on_a_linear_model(normalization):
    rows = regression_rows(30, seed=3)
    model = torch.nn.Linear(3, 2).double()
    task = MaskedRegressionTask()
    ggn = as_matrix(operator(GaussNewtonOperator, model, rows, normalization, task=task, batch_size=7))
    hessian = as_matrix(operator(HessianOperator, model, rows, normalization, task=task, batch_size=7))
    assert relative_error(ggn, hessian) < 1e-12


def test_ggn_refuses_a_task_without_outputs(model):
    class LossOnly(UnlearningTask):
        def collate(self, rows):
            return CausalLMTask().collate(rows)

        def loss_counts(self, batch):
            return CausalLMTask().loss_counts(batch)

    with pytest.raises(ConfigurationError, match="outputs"):
        operator(GaussNewtonOperator, model, ROWS, "token", task=LossOnly())


@pytest.mark.parametrize("cls", [HessianOperator, GaussNewtonOperator, FisherOperator])
def test_sample_matvec_is_unbiased_and_seeded(model, cls):
    """The mean of mini-batch products over every size-k subset is the full product (exact check)."""
    import itertools

    rows = ROWS[:4]
    op = operator(cls, model, rows, "token", batch_size=2)
    v = torch.randn(op.size, dtype=torch.float64)
    full = op.matvec(v)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(op.sample_matvec(v, 2, g1), op.sample_matvec(v, 2, g2), rtol=0, atol=0)
    products = []
    for subset in itertools.combinations(range(4), 2):
        sub = operator(cls, model, [rows[i] for i in subset], "token", batch_size=2)
        sub.normaliser = op.normaliser
        products.append(sub.matvec(v) * 4 / 2)
    assert relative_error(torch.stack(products).mean(0), full) < 1e-12
