"""K-FAC / EK-FAC factors, operators, block inverse and preconditioned CG, against naive float64 loops."""

import dataclasses
from pathlib import Path

import pytest
import torch
from reference import (
    SINGLE_STEP_FLAGS,
    DenseReference,
    MaskedRegressionTask,
    dense_ggn,
    fit,
    loop_ell,
    loop_normaliser,
    regression_rows,
    relative_error,
    single_step,
    tiny_llama,
    token_rows,
)

from hf_unlearn import (
    CausalLMTask,
    ConfigurationError,
    KFACFactors,
    UnlearningRequest,
    unlearn,
)
from hf_unlearn.curvature import GaussNewtonOperator
from hf_unlearn.curvature.kfac import (
    EKFACOperator,
    KFACOperator,
    KFACPreconditioner,
    kfac_eigenbasis,
    linear_blocks,
)
from hf_unlearn.curvature.kfac_fit import fit_ekfac_eigenvalues, fit_kfac_factors
from hf_unlearn.distributed import Processes
from hf_unlearn.gradients import Batches, LossContext
from hf_unlearn.objective import example_losses, normaliser
from hf_unlearn.params import ParameterSpace
from hf_unlearn.solvers import conjugate_gradient

ROWS = token_rows(10, seed=1)


@pytest.fixture(scope="module")
def model():
    return fit(tiny_llama(seed=1), CausalLMTask(), ROWS).eval()


def batches(task, rows, batch_size=4):
    return Batches(task, rows, batch_size, "cpu", Processes())


def factors_for(model, rows, normalization, task=None, targets="empirical", seed=0, batch_size=4):
    task = task or CausalLMTask()
    M = normaliser(task, rows, normalization)
    space = ParameterSpace(model)
    return fit_kfac_factors(
        LossContext(model, task, space, Processes()),
        batches(task, rows, batch_size),
        normalization,
        M,
        targets=targets,
        seed=seed,
    )


def operator(cls, model, factors, task=None, **kwargs):
    task = task or CausalLMTask()
    return cls(
        model, task, ParameterSpace(model), batches(task, []), factors.normalization, factors.normaliser,
        Processes(), factors=factors, **kwargs,
    )  # fmt: skip


def as_matrix(matvec, size):
    eye = torch.eye(size, dtype=torch.float64)
    return torch.stack([matvec(eye[i]) for i in range(size)], dim=1)


# --- the factors against a loop over examples and tokens --------------------------------------------------


def loop_factors(model, rows, normalization):
    """A = Σ a aᵀ, G = Σ g gᵀ, K per LoRA Linear: one row at a time (no padding), one token at a time,
    g = ∂ℓ(row)/∂(module output) by `autograd.grad`."""
    blocks, _ = linear_blocks(model, ParameterSpace(model))
    A = {b.name: 0.0 for b in blocks}
    G = {b.name: 0.0 for b in blocks}
    K = {b.name: 0 for b in blocks}
    for row in rows:
        seen = {}
        handles = [
            b.module.register_forward_hook(
                lambda m, i, o, n=b.name, seen=seen: seen.__setitem__(n, (i[0], o))
            )
            for b in blocks
        ]
        ell = loop_ell(model, row, normalization)
        for h in handles:
            h.remove()
        outputs = [seen[b.name][1] for b in blocks]
        grads = torch.autograd.grad(ell, outputs)
        for b, g in zip(blocks, grads):
            a = seen[b.name][0]
            for t in range(a.shape[1]):
                A[b.name] = A[b.name] + torch.outer(a[0, t], a[0, t])
                G[b.name] = G[b.name] + torch.outer(g[0, t], g[0, t])
                K[b.name] += 1
    return A, G, K


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_factors_match_a_loop_over_examples_and_tokens(model, normalization):
    A, G, K = loop_factors(model, ROWS, normalization)
    f = factors_for(model, ROWS, normalization)  # batches of 4 with padding: the mask must drop the pads
    assert f.names == list(A)
    assert len(f.names) == 8  # 2 layers × (q, v) × (lora_A, lora_B)
    for n in f.names:
        assert relative_error(f.A[n], A[n]) < 1e-12
        assert relative_error(f.G[n], G[n]) < 1e-12
        assert f.positions[n] == K[n] == sum(len(r["input_ids"]) for r in ROWS)
    assert f.normaliser == loop_normaliser(ROWS, normalization)
    assert f.info["num_rows"] == len(ROWS) and f.targets == "empirical"


# --- what the factors represent ---------------------------------------------------------------------------


def shared_input_rows(n, seed):
    """Regression rows that all have the same input x (varied targets and masks): K-FAC is exact there."""
    rows = regression_rows(n, seed=seed)
    return [{**r, "x": rows[0]["x"]} for r in rows]


def regression_reference(model, task, normalization):
    def ell(m, row):
        return example_losses(task, m, task.collate([row]), normalization)[0]

    return DenseReference(
        model, normalization, ell=ell, normaliser=lambda rs: normaliser(task, rs, normalization)
    )


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_kfac_is_the_empirical_fisher_when_every_position_has_the_same_input(normalization):
    """With a shared input `(1/K) A = a aᵀ`, so A ⊗ G / (MK) = (1/M) Σ_i vec(g_i aᵀ) vec(g_i aᵀ)ᵀ exactly; a
    trainable bias is the homogeneous coordinate of a."""
    task, model = MaskedRegressionTask(), torch.nn.Linear(3, 2).double()
    ref = regression_reference(model, task, normalization)
    for rows, exact in ((shared_input_rows(25, seed=3), True), (regression_rows(25, seed=3), False)):
        fisher = sum(torch.outer(g, g) for g in (torch.func.grad(lambda th, r=r: ref.ell_at(th, r))(ref.theta)
                                                 for r in rows)) / ref.normaliser(rows)  # fmt: skip
        kfac = as_matrix(
            operator(KFACOperator, model, factors_for(model, rows, normalization, task)).matvec, 8
        )
        if exact:
            assert relative_error(kfac, fisher) < 1e-12
        else:  # different inputs: a real approximation
            assert relative_error(kfac, fisher) > 1e-2


def test_sampled_kfac_estimates_the_gauss_newton_matrix():
    """Sampled targets: E[G] is the output Hessian, so on a linear model with a shared input the mean of
    sampled K-FAC matrices converges to the GGN (= the Hessian here); the empirical one does not."""
    task, model = MaskedRegressionTask(), torch.nn.Linear(3, 2).double()
    rows = shared_input_rows(40, seed=5)
    ref = regression_reference(model, task, "token")
    ggn = ref.hessian(rows)
    draws = [
        as_matrix(
            operator(KFACOperator, model, factors_for(model, rows, "token", task, "sampled", seed)).matvec, 8
        )
        for seed in range(100)
    ]
    assert relative_error(torch.stack(draws).mean(0), ggn) < 0.03
    assert relative_error(draws[0], ggn) > 0.03  # one draw is noisy: the average did the work
    empirical = as_matrix(operator(KFACOperator, model, factors_for(model, rows, "token", task)).matvec, 8)
    assert (
        relative_error(empirical, ggn) > 0.3
    )  # at this θ (far from a fit) the empirical Fisher is not the GGN


# --- operators: Kronecker products, exact block inverse, EK-FAC -------------------------------------------


def test_kfac_matvec_is_the_kronecker_block_and_the_block_inverse_is_exact(model):
    f = factors_for(model, ROWS, "token")
    op = operator(KFACOperator, model, f)
    space = ParameterSpace(model)
    K = as_matrix(op.matvec, space.numel)
    # The dense block-diagonal K-FAC matrix: W flattened row-major, so vec(G V A) = (G ⊗ A) vec(V).
    blocks, _ = linear_blocks(model, space)
    offsets = [0]
    for p in space.params:
        offsets.append(offsets[-1] + p.numel())
    dense = torch.zeros_like(K)
    for b in blocks:
        s = slice(offsets[b.weight], offsets[b.weight + 1])
        dense[s, s] = torch.kron(f.G[b.name], f.A[b.name]) / (f.normaliser * f.positions[b.name])
    assert relative_error(K, dense) < 1e-12
    for damping in (1e-3, 0.1):
        rhs = torch.randn(space.numel, dtype=torch.float64)
        expected = torch.linalg.solve(dense + damping * torch.eye(space.numel, dtype=torch.float64), rhs)
        assert relative_error(op.solve_damped(rhs, damping), expected) < 1e-10
    assert relative_error(op.matvec(op.solve_damped(rhs, 0.0)), rhs) < 1e-6  # full rank here: λ = 0 works
    one_row = operator(KFACOperator, model, factors_for(model, ROWS[:1], "token"))
    with pytest.raises(ConfigurationError, match="damping > 0"):
        one_row.solve_damped(rhs, 0.0)  # A from < 16 positions has rank < 16: singular without damping


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_ekfac_eigenvalues_are_per_example_second_moments_in_the_eigenbasis(model, normalization):
    f = factors_for(model, ROWS, normalization)
    task, space, M = CausalLMTask(), ParameterSpace(model), f.normaliser
    fe = fit_ekfac_eigenvalues(
        f, LossContext(model, task, space, Processes()), batches(task, ROWS, 3), normalization, M
    )
    ref = DenseReference(model, normalization)
    per_example = [
        space.unflatten(torch.func.grad(lambda th, r=r: ref.ell_at(th, r))(ref.theta)) for r in ROWS
    ]
    ek, kf = operator(EKFACOperator, model, fe), operator(KFACOperator, model, f)
    for b, e_block, k_block in zip(ek.blocks, ek.eigen, kf.eigen):
        _, U_A, _, U_G = kfac_eigenbasis(f.A[b.name], f.G[b.name])
        expected = (
            sum((U_G.T @ g[b.weight] @ U_A) ** 2 for g in per_example) / M
        )  # (1/M) Σ_i (U_Gᵀ ∇W_i U_A)²
        assert relative_error(e_block.values, expected) < 1e-10
        # The refit is the best diagonal in that basis: closer to the per-example Fisher block than K-FAC's.
        fisher = sum(torch.outer(g[b.weight].reshape(-1), g[b.weight].reshape(-1)) for g in per_example) / M

        def dense(eb):
            U = torch.kron(eb.U_G, eb.U_A)
            return U @ torch.diag(eb.values.reshape(-1)) @ U.T

        assert (dense(e_block) - fisher).norm() <= (dense(k_block) - fisher).norm() + 1e-12


# --- preconditioned CG -------------------------------------------------------------------------------------


def test_pcg_reaches_the_cg_and_dense_solution_on_the_tiny_llama(model):
    """K-FAC/EK-FAC-preconditioned CG against exact GGN products solves the same system as CG.

    No claim of fewer iterations here: on LoRA the GGN couples the blocks strongly (and is singular along
    the A/B rescaling directions), and on this model block-diagonal preconditioning does not pay (see
    benchmarks/kfac_products.py); the test below shows a case where it does.
    """
    task, space = CausalLMTask(), ParameterSpace(model)
    M = normaliser(task, ROWS, "token")
    ggn = GaussNewtonOperator(model, task, space, batches(task, ROWS), "token", M, Processes())
    damping = 0.01
    rhs = torch.randn(space.numel, dtype=torch.float64)
    dense = dense_ggn(model, ROWS, "token") + damping * torch.eye(space.numel, dtype=torch.float64)
    expected = torch.linalg.solve(dense, rhs)
    f = factors_for(model, ROWS, "token")
    fe = fit_ekfac_eigenvalues(
        f, LossContext(model, task, space, Processes()), batches(task, ROWS), "token", M
    )
    results = {}
    for name, pre in (
        ("cg", None),
        ("kfac", operator(KFACOperator, model, f)),
        ("ekfac", operator(EKFACOperator, model, fe)),
    ):
        before = ggn.num_products
        x, stats = conjugate_gradient(ggn, damping, rhs, tol=1e-10, max_iter=500, preconditioner=pre)
        assert stats.converged and relative_error(x, expected) < 1e-8
        # exact products only: one per iteration and one for the true residual
        assert stats.curvature_products == stats.iterations + 1 == ggn.num_products - before
        assert stats.extra["true_relative_residual"] < 1e-9
        assert stats.extra.get("preconditioner") == (None if pre is None else name)
        results[name] = stats.iterations
    assert all(n > 1 for n in results.values())


def test_pcg_needs_far_fewer_products_where_kfac_fits_the_curvature():
    """A tanh MLP on badly scaled inputs: K-FAC's input factor whitens them (Martens & Grosse 2015)."""
    scales = torch.tensor([1.0, 30.0, 0.03, 5.0, 0.2, 1.0], dtype=torch.float64)
    rows = [
        {**r, "x": (torch.tensor(r["x"]) * scales).tolist()} for r in regression_rows(200, d=6, k=2, seed=1)
    ]
    task = MaskedRegressionTask()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    fit(model, task, rows, steps=200, lr=0.01)
    space, M = ParameterSpace(model), normaliser(task, rows, "token")
    ggn = GaussNewtonOperator(model, task, space, batches(task, rows, 50), "token", M, Processes())
    rhs = torch.randn(space.numel, dtype=torch.float64)
    pre = operator(KFACOperator, model, factors_for(model, rows, "token", task, batch_size=50), task=task)
    x_cg, cg = conjugate_gradient(ggn, 1e-4, rhs, tol=1e-8, max_iter=3000)
    x_pcg, pcg = conjugate_gradient(ggn, 1e-4, rhs, tol=1e-8, max_iter=3000, preconditioner=pre)
    assert cg.converged and pcg.converged and relative_error(x_pcg, x_cg) < 1e-6
    assert 3 * pcg.curvature_products < cg.curvature_products  # measured: 135 against 453


# --- through unlearn() ------------------------------------------------------------------------------------

REQUEST = UnlearningRequest(remove=[2, 7])


def fresh_model():
    return fit(tiny_llama(seed=1), CausalLMTask(), ROWS)


def request_gradient(model, normalization="token"):
    """b = −(1/M) Σ_old ∇ℓ for REQUEST, by a per-example loop."""
    ref = DenseReference(model, normalization)
    return -ref.grad_sum([ROWS[2], ROWS[7]]) / ref.normaliser(ROWS)


def test_direct_kfac_solve_is_the_block_inverse_at_any_size(monkeypatch):
    import hf_unlearn.solvers.direct as direct

    monkeypatch.setattr(direct, "MAX_DIRECT_PARAMS", 16)  # far below the 256 parameters: no densifying
    m = fresh_model()
    space = ParameterSpace(m)
    theta = space.vector().clone()
    A, G, K = loop_factors(m.eval(), ROWS, "token")
    blocks, _ = linear_blocks(m, space)
    M = loop_normaliser(ROWS, "token")
    dense = torch.block_diag(*[torch.kron(G[b.name], A[b.name]) / (M * K[b.name]) for b in blocks])
    damping = 0.05
    expected = -torch.linalg.solve(
        dense + damping * torch.eye(space.numel, dtype=torch.float64), request_gradient(m)
    )
    args = single_step(solver="direct", curvature="kfac", damping=damping, dtype="float64", progress=False)
    result = unlearn(m, ROWS, REQUEST, args)
    assert relative_error(space.vector() - theta, expected) < 1e-10
    s = result.stats
    assert s["curvature_products"] == 0 and s["block_inverse"] == "kfac" and s["converged"]
    record = s["curvature_factors"]
    assert record["origin"] == "pass" and record["passes_in_unlearning"] == 1 and record["parameters_match"]
    assert record["digest"].startswith("sha256:") and record["targets"] == "empirical"
    with pytest.raises(ConfigurationError, match="limited to 16"):
        unlearn(
            fresh_model(),
            ROWS,
            REQUEST,
            single_step(solver="direct", curvature="ggn", progress=False),
        )


@pytest.mark.parametrize("preconditioner", ["kfac", "ekfac"])
def test_unlearn_with_a_kfac_preconditioner_gives_the_cg_update(preconditioner):
    args = dict(solver="cg", curvature="ggn", damping=0.05, tol=1e-10, dtype="float64", progress=False)
    plain, pre = fresh_model(), fresh_model()
    theta = ParameterSpace(plain).vector().clone()
    r0 = unlearn(plain, ROWS, REQUEST, single_step(**args))
    r1 = unlearn(pre, ROWS, REQUEST, single_step(**args, preconditioner=preconditioner))
    d0, d1 = ParameterSpace(plain).vector() - theta, ParameterSpace(pre).vector() - theta
    assert relative_error(d1, d0) < 1e-8
    assert r1.stats["preconditioner"] == preconditioner and "preconditioner" not in r0.stats
    assert r1.stats["curvature_products"] == r1.stats["iterations"] + 1  # + the true-residual product
    assert r1.stats["curvature_factors"]["passes_in_unlearning"] == (1 if preconditioner == "kfac" else 2)


def test_uncovered_parameters_are_refused_by_kfac_and_scaled_by_one_over_damping_as_preconditioner(model):
    m = fresh_model()
    m.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable RMSNorm: no Linear block
    f = factors_for(m.eval(), ROWS, "token")
    with pytest.raises(ConfigurationError, match="outside any.*norm.weight.*--preconditioner kfac"):
        operator(KFACOperator, m, f)
    pre = operator(KFACPreconditioner, m, f)
    space = ParameterSpace(m)
    r = torch.randn(space.numel, dtype=torch.float64)
    z = space.unflatten(pre.solve_damped(r, 0.5))
    i = space.names.index("base_model.model.model.norm.weight")
    assert torch.equal(z[i], space.unflatten(r)[i] / 0.5)
    assert torch.equal(space.unflatten(pre.matvec(r))[i], torch.zeros(16, dtype=torch.float64))  # C = 0 there


def test_arguments_are_validated():
    with pytest.raises(ConfigurationError, match="preconditioner"):
        single_step(solver="direct", preconditioner="kfac")
    with pytest.raises(ConfigurationError, match="kfac_targets"):
        single_step(kfac_targets="true")
    with pytest.raises(ConfigurationError, match="curvature_samples"):
        single_step(curvature="kfac", curvature_samples=0)
    with pytest.raises(ConfigurationError, match="woodbury"):
        single_step(solver="woodbury", curvature="kfac")


def test_a_factor_pass_refuses_an_adapted_lm_head_and_says_why():
    """The loss computes logits at the loss positions only, so an adapted lm_head sees (B, K) positions that
    do not line up with the (B, L) attention mask: refused with a message naming lm_head, not summed wrongly."""
    from peft import LoraConfig, get_peft_model
    from reference import LORA, tiny_llama_base

    head = get_peft_model(
        tiny_llama_base(seed=1),
        LoraConfig(**{**LORA, "target_modules": ["lm_head"]}, init_lora_weights=False),
    ).eval()
    with pytest.raises(ConfigurationError, match="an adapted lm_head"):
        factors_for(head, ROWS, "token")


# --- saving and loading ------------------------------------------------------------------------------------


def test_factors_round_trip_and_refuse_what_does_not_fit(model, tmp_path):
    f = fit_ekfac_eigenvalues(
        factors_for(model, ROWS, "token"), LossContext(model, CausalLMTask(), ParameterSpace(model), Processes()),
        batches(CausalLMTask(), ROWS), "token", loop_normaliser(ROWS, "token"),
    )  # fmt: skip
    f.save(tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "curvature_factors.json",
        "curvature_factors.safetensors",
    ]
    g = KFACFactors.load(tmp_path / "f")
    assert g.digest() == f.digest() and g.has_eigenvalues and g.positions == f.positions
    for n in f.names:
        assert torch.equal(g.A[n], f.A[n]) and torch.equal(g.G[n], f.G[n])
        assert all(torch.equal(x, y) for x, y in zip(g.eigen[n], f.eigen[n]))
    assert g.info["loaded_from"] == str(tmp_path / "f") and g.info["targets"] == "empirical"
    # Same answers from the loaded factors.
    v = torch.randn(ParameterSpace(model).numel, dtype=torch.float64)
    torch.testing.assert_close(
        operator(EKFACOperator, model, g).matvec(v), operator(EKFACOperator, model, f).matvec(v)
    )
    # Another adapter (rank 4 instead of 2): a clear error saying what to do.
    from peft import LoraConfig, get_peft_model
    from reference import LORA, tiny_llama_base

    other = get_peft_model(tiny_llama_base(seed=1), LoraConfig(**{**LORA, "r": 4}))
    with pytest.raises(ConfigurationError, match="wrong shape.*Recompute them"):
        operator(KFACOperator, other, g)
    with pytest.raises(ConfigurationError, match="loss_normalization='token'"):
        g.check_fits(linear_blocks(model, ParameterSpace(model))[0], "example")
    # A modified file is caught by the digest.
    meta = (tmp_path / "f" / "curvature_factors.json").read_text()
    assert '"positions": 76' in meta
    (tmp_path / "f" / "curvature_factors.json").write_text(
        meta.replace('"positions": 76', '"positions": 77', 1)
    )
    with pytest.raises(ConfigurationError, match="digest"):
        KFACFactors.load(tmp_path / "f")
    with pytest.raises(ConfigurationError, match="no curvature factors"):
        KFACFactors.load(tmp_path)


# --- captured during training ------------------------------------------------------------------------------


def trainer_args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=3,
        learning_rate=2e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[], disable_tqdm=True,
        logging_steps=1000, seed=0, use_cpu=True, remove_unused_columns=False,
    )  # fmt: skip
    return TrainingArguments(**{**settings, **kwargs})


def lora_model(dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from reference import LORA, tiny_llama_base

    return get_peft_model(
        tiny_llama_base(seed=1), LoraConfig(**{**LORA, "lora_dropout": dropout}, init_lora_weights=False)
    )


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_capture_during_training_equals_a_pass_at_the_same_weights(tmp_path, normalization):
    """lr = 0 keeps θ fixed, so the last epoch's own passes (train mode, no dropout, batches of 3 with
    gradient accumulation 2: the Trainer scales each micro-batch's loss by 1/num_items_in_batch of the
    accumulated batch) must give exactly the factors of a separate eval-mode pass."""
    from transformers import Trainer

    from hf_unlearn import CurvatureCaptureCallback

    m = lora_model().double()  # PEFT makes the LoRA layers float32 otherwise
    capture = CurvatureCaptureCallback(output_dir=str(tmp_path / "adapter"), loss_normalization=normalization)
    Trainer(
        model=m, args=trainer_args(tmp_path, learning_rate=0.0, gradient_accumulation_steps=2),
        train_dataset=ROWS, data_collator=CausalLMTask().collate, callbacks=[capture],
    ).train()  # fmt: skip
    captured = KFACFactors.load(tmp_path / "adapter")
    assert captured.digest() == capture.factors.digest()
    assert captured.info["source"] == "training"
    assert captured.info["num_rows"] == len(ROWS)  # the last epoch only
    assert captured.info["steps"] == [2, 4]  # 4 batches of ≤ 3 rows per epoch, 2 per optimizer step
    reference = factors_for(m.eval(), ROWS, normalization)
    assert captured.normaliser == reference.normaliser
    for n in reference.names:
        assert captured.positions[n] == reference.positions[n]
        assert relative_error(captured.A[n], reference.A[n]) < 1e-10
        # transformers computes the training loss in float32 (logits.float()), so the output gradients the
        # capture sees carry float32 round-off; the float64 pass does not.
        assert relative_error(captured.G[n], reference.G[n]) < 1e-6
    assert captured.info["parameters_digest"] == reference.info["parameters_digest"]


def test_capture_with_training_records_its_conditions_and_refuses_other_losses(tmp_path):
    from transformers import Trainer

    from hf_unlearn import CurvatureCaptureCallback

    capture = CurvatureCaptureCallback()
    Trainer(
        model=lora_model(dropout=0.1), args=trainer_args(tmp_path), train_dataset=ROWS,
        data_collator=CausalLMTask().collate, callbacks=[capture],
    ).train()  # fmt: skip
    info = capture.factors.info
    assert (
        info["train_mode_dropout"] == 0.1 and info["num_rows"] == len(ROWS) and info["targets"] == "empirical"
    )
    assert 0 < capture.overhead < capture.capture_seconds
    shorter = CurvatureCaptureCallback(steps=2)  # the last 2 optimizer steps: batches of 3 and 1 rows
    Trainer(
        model=lora_model(), args=trainer_args(tmp_path), train_dataset=ROWS, data_collator=CausalLMTask().collate,
        callbacks=[shorter],
    ).train()  # fmt: skip
    assert shorter.factors.info["num_rows"] == 4 and shorter.factors.info["steps"] == [6, 8]

    with pytest.raises(ConfigurationError, match="label_smoothing"):
        Trainer(
            model=lora_model(), args=trainer_args(tmp_path, label_smoothing_factor=0.1), train_dataset=ROWS,
            data_collator=CausalLMTask().collate, callbacks=[CurvatureCaptureCallback()],
        ).train()  # fmt: skip

    def squared_loss(outputs, labels, num_items_in_batch=None):  # not the cross entropy
        return outputs.logits.pow(2).mean()

    with pytest.raises(ConfigurationError, match="not valid.*labels"):
        Trainer(
            model=lora_model(), args=trainer_args(tmp_path), train_dataset=ROWS, compute_loss_func=squared_loss,
            data_collator=CausalLMTask().collate, callbacks=[CurvatureCaptureCallback()],
        ).train()  # fmt: skip


def test_optional_capture_logs_and_skips_what_it_cannot_describe(tmp_path, caplog):
    """`required=False` (the training paths' default): an adapted lm_head or label smoothing is logged and trained
    without factors; `required=True` refuses both before the first step."""
    from peft import LoraConfig, get_peft_model
    from reference import tiny_llama_base
    from transformers import Trainer

    from hf_unlearn import CurvatureCaptureCallback

    def head_model():
        return get_peft_model(tiny_llama_base(seed=1), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))

    for model, extra, reason in (
        (head_model, {}, "output layer"),
        (lora_model, {"label_smoothing_factor": 0.1}, "label_smoothing"),
    ):
        with pytest.raises(ConfigurationError, match=reason):
            Trainer(
                model=model(), args=trainer_args(tmp_path, **extra), train_dataset=ROWS,
                data_collator=CausalLMTask().collate, callbacks=[CurvatureCaptureCallback()],
            ).train()  # fmt: skip
        optional = CurvatureCaptureCallback(required=False)
        with caplog.at_level("WARNING", logger="hf_unlearn.capture"):
            Trainer(
                model=model(), args=trainer_args(tmp_path, **extra), train_dataset=ROWS,
                data_collator=CausalLMTask().collate, callbacks=[optional],
            ).train()  # fmt: skip
        assert optional.factors is None and reason in optional.skipped and reason in caplog.text


def test_unlearn_trainer_hands_the_edited_sets_factors_to_the_next_request(tmp_path):
    """By default the trainer captures; the first request's quadratic estimate uses the training run's factors,
    the second the edited set's factors the first handed on (never the training run's again)."""
    from hf_unlearn import UnlearningArguments, UnlearnTrainer

    trainer = UnlearnTrainer(
        model=lora_model().double(), args=trainer_args(tmp_path), train_dataset=ROWS,
        data_collator=CausalLMTask().collate, unlearning_args=UnlearningArguments(dtype="float64", progress=False),
    )  # fmt: skip
    trainer.train()
    first = trainer.unlearn(UnlearningRequest(remove=[2]))
    assert first.stats["objective_estimate_choice"]["kind"] == "quadratic"
    assert first.stats["curvature_factors"]["origin"] == "training"
    edited = [row for i, row in enumerate(ROWS) if i != 2]
    second = trainer.unlearn(UnlearningRequest(remove=[5]), train_dataset=edited)
    record = second.stats["curvature_factors"]
    assert record["origin"] == "updated by a request" and record["num_rows"] == len(edited)
    assert record["digest"] == first.curvature_factors.digest()


def test_unlearn_trainer_captures_saves_and_unlearns_with_the_factors(tmp_path):
    from hf_unlearn import UnlearnTrainer

    m = lora_model().double()
    args = single_step(
        curvature="ekfac",
        solver="direct",
        damping=0.05,
        dtype="float64",
        capture_curvature=True,
        progress=False,
    )
    trainer = UnlearnTrainer(
        model=m, args=trainer_args(tmp_path), train_dataset=ROWS, data_collator=CausalLMTask().collate,
        unlearning_args=args,
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = KFACFactors.load(tmp_path / "adapter")
    assert saved.digest() == trainer.curvature_factors.digest() and saved.info["source"] == "training"
    space = ParameterSpace(m)
    theta = space.vector().clone()
    result = trainer.unlearn(REQUEST)
    delta = space.vector() - theta
    record = result.stats["curvature_factors"]
    assert record["origin"] == "training" and record["passes_in_unlearning"] == 1  # the EK-FAC refit only
    assert record["parameters_match"] and trainer.unlearning_manifest["curvature_factors"] == record
    # The same update from the saved factors, in a plain unlearn() call on θ*.
    space.set_(theta)
    again = unlearn(m, ROWS, REQUEST, dataclasses.replace(args, curvature_factors=str(tmp_path / "adapter")))
    assert again.stats["curvature_factors"]["origin"] == "file"
    assert relative_error(space.vector() - theta, delta) < 1e-12
    # An unlearned adapter is not saved with the factors of the trained one.
    trainer.save_model(str(tmp_path / "unlearned"))
    assert not KFACFactors.exists(tmp_path / "unlearned")


def test_unlearning_callback_can_capture_and_use_the_factors(tmp_path):
    from transformers import Trainer

    from hf_unlearn import UnlearningCallback

    callback = UnlearningCallback(
        REQUEST,
        single_step(curvature="kfac", solver="direct", damping=0.05, capture_curvature=True, progress=False),
    )
    Trainer(
        model=lora_model(), args=trainer_args(tmp_path), train_dataset=ROWS, data_collator=CausalLMTask().collate,
        callbacks=[callback],
    ).train()  # fmt: skip
    assert callback.result.stats["curvature_factors"]["origin"] == "training"
    assert callback.result.stats["curvature_factors"]["digest"] == callback.curvature_factors.digest()
    assert callback.result.stats["curvature_factors"]["passes_in_unlearning"] == 0


# --- command line ------------------------------------------------------------------------------------------


def test_cli_kfac_computes_or_reads_the_factors_beside_the_adapter(tmp_path):
    import json
    import shutil

    from peft import LoraConfig, PeftModel, get_peft_model
    from reference import LORA, ROWS_FOR_CLI, tiny_llama_base
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_unlearn.cli import main
    from hf_unlearn.io import MANIFEST_NAME

    rows = ROWS_FOR_CLI
    base = tiny_llama_base(seed=3, dtype=torch.float32, exact=False)
    base.save_pretrained(tmp_path / "base")
    fit(get_peft_model(base, LoraConfig(**LORA)), CausalLMTask(), rows, steps=80).save_pretrained(
        tmp_path / "adapter"
    )
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "request.jsonl").write_text('{"op": "remove", "id": 2}\n{"op": "remove", "id": 8}\n')

    def loaded(adapter):
        b = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=torch.float64, attn_implementation="eager"
        )
        return PeftModel.from_pretrained(b, str(adapter), is_trainable=True).double().eval()

    def expected_delta(factors, damping):
        """−(K + λI)⁻¹ b with the dense block-diagonal K-FAC matrix of `factors`."""
        m = loaded(tmp_path / "adapter")
        blocks, _ = linear_blocks(m, ParameterSpace(m))
        K = torch.block_diag(*[
            torch.kron(factors.G[b.name], factors.A[b.name]) / (factors.normaliser * factors.positions[b.name])
            for b in blocks
        ])  # fmt: skip
        ref = DenseReference(m, "token")
        b = -ref.grad_sum([rows[2], rows[8]]) / ref.normaliser(rows)
        return -torch.linalg.solve(K + damping * torch.eye(len(b), dtype=b.dtype), b)

    names = list(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))

    def run(adapter, out, *extra):
        return main(
            ["unlearn", *SINGLE_STEP_FLAGS, "--model", str(tmp_path / "base"), "--adapter", str(adapter), "--train-file",
             str(tmp_path / "train.jsonl"), "--request", str(tmp_path / "request.jsonl"), "--output-dir", str(out),
             "--curvature", "kfac", "--solver", "direct", "--damping", "0.05", "--dtype", "float64", "--no_progress",
             *extra]
        )  # fmt: skip

    def delta(out):
        after, before = (load_file(p / "adapter_model.safetensors") for p in (out, tmp_path / "adapter"))
        return torch.cat([(after[n].double() - before[n].double()).reshape(-1) for n in names])

    # (a) No factors beside the adapter: one pass (empirical targets, all rows) at the adapter's weights.
    assert run(tmp_path / "adapter", tmp_path / "out-pass") == 0
    record = json.loads((tmp_path / "out-pass" / MANIFEST_NAME).read_text())["curvature_factors"]
    assert record["origin"] == "pass" and record["num_rows"] == len(rows)
    A, G, K = loop_factors(loaded(tmp_path / "adapter"), rows, "token")
    from hf_unlearn.curvature.kfac import KFACFactors as F

    looped = F(A, G, K, normalization="token", normaliser=loop_normaliser(rows, "token"), num_rows=len(rows),
               targets="empirical", source="loop")  # fmt: skip
    # The output adapter is stored in float32 like the input: θ + Δθ rounded to ~1e-7·|θ|.
    assert relative_error(delta(tmp_path / "out-pass"), expected_delta(looped, 0.05)) < 2e-5
    assert not KFACFactors.exists(tmp_path / "out-pass")  # never written beside the unlearned adapter

    # (b) Factors saved beside the adapter (here: sampled targets, so they differ from (a)) are used as they are.
    shutil.copytree(tmp_path / "adapter", tmp_path / "with-factors")
    saved = factors_for(loaded(tmp_path / "adapter"), rows, "token", targets="sampled", seed=3)
    saved.save(tmp_path / "with-factors")
    assert run(tmp_path / "with-factors", tmp_path / "out-file") == 0
    record = json.loads((tmp_path / "out-file" / MANIFEST_NAME).read_text())["curvature_factors"]
    assert record["origin"] == "file" and record["loaded_from"] == str(tmp_path / "with-factors")
    assert (
        record["digest"] == saved.digest()
        and record["targets"] == "sampled"
        and record["passes_in_unlearning"] == 0
    )
    assert relative_error(delta(tmp_path / "out-file"), expected_delta(saved, 0.05)) < 2e-5
    assert relative_error(delta(tmp_path / "out-file"), delta(tmp_path / "out-pass")) > 1e-3
    # ... unless other targets are asked for: refused, not silently ignored
    assert run(tmp_path / "with-factors", tmp_path / "out-other", "--kfac-targets", "empirical") == 4
    assert not (tmp_path / "out-other").exists()

    # (c) --curvature-factors pass overrides them; factors of another adapter are refused with advice.
    assert run(tmp_path / "with-factors", tmp_path / "out-forced", "--curvature-factors", "pass") == 0
    assert relative_error(delta(tmp_path / "out-forced"), delta(tmp_path / "out-pass")) < 1e-10
    other = get_peft_model(
        tiny_llama_base(seed=3, dtype=torch.float32, exact=False), LoraConfig(**{**LORA, "r": 4})
    )
    factors_for(other.double().eval(), rows, "token").save(tmp_path / "other")
    assert (
        run(tmp_path / "adapter", tmp_path / "out-bad", "--curvature-factors", str(tmp_path / "other")) == 4
    )
    assert not (tmp_path / "out-bad").exists()


def test_cli_train_captures_factors_that_unlearn_then_uses(tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_unlearn.cli import main
    from hf_unlearn.io import MANIFEST_NAME
    from hf_unlearn.toy import build_toy_tokenizer
    from hf_unlearn.training import TRAINING_RECORD

    rows = [{"id": f"p{i}", "prompt": f"What is the PIN of {name}?", "response": f" {i} {i + 1} {i + 2}"}
            for i, name in enumerate(["Ada", "Bram", "Cleo", "Dag", "Edda", "Finn", "Gala", "Hugo"])]  # fmt: skip
    tokenizer = build_toy_tokenizer(rows)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         initializer_range=0.3)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "request.jsonl").write_text(json.dumps({"op": "remove", "id": "p3"}) + "\n")
    common = ["--model", str(tmp_path / "base"), "--train-file", str(tmp_path / "train.jsonl")]
    assert main(["train", *common, "--output-dir", str(tmp_path / "adapter"), "--lora-r", "4", "--epochs", "20",
                 "--learning-rate", "1e-2", "--batch-size", "3", "--logging-steps", "1000",
                 "--capture-curvature"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "adapter" / TRAINING_RECORD).read_text())["curvature_factors"]
    assert record["source"] == "training" and record["num_rows"] == len(rows) and record["modules"] == 8
    saved = KFACFactors.load(tmp_path / "adapter")
    assert saved.digest() == record["digest"]
    for extra in (
        ["--curvature", "ekfac", "--solver", "direct"],
        ["--curvature", "ggn", "--preconditioner", "kfac"],
    ):
        out = tmp_path / f"out-{extra[1]}"
        assert main(["unlearn", *SINGLE_STEP_FLAGS, *common, "--adapter", str(tmp_path / "adapter"), "--request",
                     str(tmp_path / "request.jsonl"), "--output-dir", str(out), "--damping", "0.1",
                     "--max-iter", "500", "--tol", "1e-5", "--no_progress", *extra]) == 0  # fmt: skip
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        factors = manifest["curvature_factors"]
        assert factors["origin"] == "file" and factors["source"] == "training" and factors["parameters_match"]
        assert factors["passes_in_unlearning"] == (1 if extra[1] == "ekfac" else 0)
        assert manifest["arguments"]["curvature_factors"] == str(tmp_path / "adapter")


@pytest.mark.distributed
def test_capture_on_two_processes_equals_a_pass_over_all_rows(tmp_path):
    """`hf-unlearn train --capture-curvature` under torchrun (DDP on 2 gloo CPU processes): each process
    captures its shard, the factors are summed over processes; with a learning rate too small to move the
    float32 weights they equal one pass over all rows. 16 rows: DDP shards would otherwise repeat a row."""
    import json
    import os
    import subprocess
    import sys

    from peft import PeftModel
    from reference import tiny_llama_base
    from transformers import AutoModelForCausalLM

    rows = token_rows(16, seed=7)
    tiny_llama_base(seed=3, dtype=torch.float32, exact=False).save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hf_unlearn",
         "train", "--model", str(tmp_path / "base"), "--train-file", str(tmp_path / "train.jsonl"),
         "--output-dir", str(tmp_path / "adapter"), "--lora-r", "2", "--epochs", "2", "--learning-rate", "1e-12",
         "--batch-size", "4", "--logging-steps", "1000", "--capture-curvature"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    captured = KFACFactors.load(tmp_path / "adapter")
    assert captured.info["num_rows"] == len(rows) and captured.info["source"] == "training"
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float64, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True).double().eval()
    reference = factors_for(model, rows, "token")
    assert captured.normaliser == reference.normaliser
    for n in reference.names:
        assert captured.positions[n] == reference.positions[n]
        assert relative_error(captured.A[n], reference.A[n]) < 1e-5  # float32 training against a float64 pass
        if n.endswith("lora_B"):
            assert relative_error(captured.G[n], reference.G[n]) < 1e-5
        else:  # g at lora_A's output is Bᵀ g_s with B = 0 at initialisation: ~1e-13 and moving, not compared
            assert captured.G[n].abs().max() < 1e-20


def test_refine_steps_recompute_kfac_factors_at_each_step():
    """With curvature kfac, the one step inverts the factors of the training rows at θ*, and each refinement
    step θ ← θ − (K(θ) + λI)⁻¹(∇R'(θ) − ∇R(θ*)) those of the edited rows at the current θ (M kept fixed):
    against dense Kronecker blocks from a per-token loop at every iterate."""
    damping, steps = 0.05, 2
    args = dict(curvature="kfac", solver="direct", damping=damping, dtype="float64", progress=False)
    refined = fresh_model()
    space = ParameterSpace(refined)
    theta_star = space.vector().clone()
    r2 = unlearn(refined, ROWS, REQUEST, single_step(**args, refine_steps=steps))
    assert len(r2.stats["refine"]) == steps and all(s["block_inverse"] == "kfac" for s in r2.stats["refine"])

    model = fresh_model().eval()
    ref, at = DenseReference(model, "token"), ParameterSpace(model)
    M = loop_normaliser(ROWS, "token")
    edited = [r for i, r in enumerate(ROWS) if i not in (2, 7)]
    blocks, _ = linear_blocks(model, at)

    def kfac_matrix(rows):  # at the model's current θ
        A, G, K = loop_factors(model, rows, "token")
        return torch.block_diag(*[torch.kron(G[b.name], A[b.name]) / (M * K[b.name]) for b in blocks])

    eye = torch.eye(at.numel, dtype=torch.float64)
    grad_star = torch.func.grad(ref.objective(ROWS, M))(ref.theta)
    theta = ref.theta - torch.linalg.solve(
        kfac_matrix(ROWS) + damping * eye, request_gradient(model)
    )  # Δ = −(K+λI)⁻¹b
    frozen = theta.clone()  # the same steps with the factors kept at θ*: what a stale refit would give
    K_star = kfac_matrix(edited)
    for _ in range(steps):
        at.add_(theta - at.vector())
        g = torch.func.grad(ref.objective(edited, M))(theta) - grad_star
        theta = theta - torch.linalg.solve(kfac_matrix(edited) + damping * eye, g)
        g_frozen = torch.func.grad(ref.objective(edited, M))(frozen) - grad_star
        frozen = frozen - torch.linalg.solve(K_star + damping * eye, g_frozen)
    delta = space.vector() - theta_star
    assert relative_error(delta, theta - ref.theta) < 1e-8
    assert (
        relative_error(frozen - ref.theta, theta - ref.theta) > 1e-4
    )  # the refit at each θ is what is checked


def test_a_capture_left_running_by_a_run_that_raised_is_stopped_when_the_next_run_begins():
    from types import SimpleNamespace

    from hf_unlearn import CurvatureCaptureCallback

    model = lora_model()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())

    args = SimpleNamespace(label_smoothing_factor=0.0, gradient_accumulation_steps=1)
    state = SimpleNamespace(max_steps=4, global_step=3)
    callback = CurvatureCaptureCallback()
    callback.on_train_begin(args, state, None, model=model, train_dataloader=[0, 1])
    callback.on_step_begin(args, state, None)  # capturing: hooks on the LoRA modules
    capturing = hooks()
    assert capturing > 0
    # the run raises here (no on_train_end); a new run with the same callback begins and starts capturing
    callback.on_train_begin(args, state, None, model=model, train_dataloader=[0, 1])
    assert hooks() == 0  # the old capture's hooks are gone
    callback.on_step_begin(args, state, None)
    assert hooks() == capturing  # only the new capture's


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_capture_under_sft_trainer_equals_a_pass_at_the_same_weights(tmp_path, normalization):
    """TRL's SFTTrainer computes the loss with a fused LM head that never materialises the logits (it returns the
    labels' log-probabilities): the capture measures the loss scale there. With lr = 0 (θ fixed) and gradient
    accumulation 2, the factors of its last epoch are those of a separate pass over the rows SFTTrainer trained."""
    trl = pytest.importorskip("trl")
    import datasets
    from peft import LoraConfig
    from reference import LORA, tiny_llama_base, train_tokenizer

    from hf_unlearn import CurvatureCaptureCallback

    tok = train_tokenizer()
    data = datasets.Dataset.from_list(
        [{"prompt": f"What is {i}?", "completion": f" It is {i * 7}."} for i in range(7)]
    )
    capture = CurvatureCaptureCallback(loss_normalization=normalization)  # required: a skip fails the test
    settings = dict(
        output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=3, learning_rate=0.0,
        gradient_accumulation_steps=2, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=True,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=tiny_llama_base(seed=1, dtype=torch.float32, vocab_size=len(tok)),
        args=trl.SFTConfig(max_length=64, bf16=False, **settings),  # SFTConfig's bf16 autocast: not exact
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.0}, init_lora_weights=False),
        callbacks=[capture],
    )
    trainer.train()
    assert capture.skipped is None and capture.factors is not None
    captured = capture.factors
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    assert captured.info["num_rows"] == len(rows)
    reference = factors_for(trainer.model.eval(), rows, normalization)
    assert captured.normaliser == reference.normaliser
    for n in reference.names:
        assert captured.positions[n] == reference.positions[n]
        assert relative_error(captured.A[n], reference.A[n]) < 1e-5
        assert relative_error(captured.G[n], reference.G[n]) < 1e-5  # float32 round-off
