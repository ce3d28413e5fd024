"""Nyström sketch, downdate and preconditioner, against dense float64 matrices and plain CG."""

import dataclasses
import json

import pytest
import torch
from reference import (
    DenseReference,
    dense_ggn,
    fit,
    loop_normaliser,
    relative_error,
    single_step,
    tiny_llama,
    token_rows,
)

from hf_unlearn import (
    CausalLMTask,
    ConfigurationError,
    NystromSketch,
    TrainingSet,
    UnlearningRequest,
    sketch_curvature,
    unlearn,
)
from hf_unlearn.curvature.nystrom import NystromPreconditioner
from hf_unlearn.params import ParameterSpace
from hf_unlearn.request import DigestKey, row_digest, using_digest_key
from hf_unlearn.solvers import conjugate_gradient

ROWS = token_rows(10, seed=1)
REQUEST = UnlearningRequest(
    remove=[2], replace={7: {"input_ids": [3, 4, 5, 6, 7], "labels": [-100, -100, 5, 6, 7]}}
)


class Dense:
    """A dense symmetric matrix as a curvature operator."""

    def __init__(self, C):
        self.C, self.size = C, C.shape[0]

    def matvec(self, v):
        return self.C @ v


def spd(P: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(eigenvalues) @ U.T


def test_a_full_rank_sketch_is_the_matrix_and_makes_pcg_converge_in_one_step():
    C = spd(30, torch.logspace(3, -2, 30, dtype=torch.float64))
    pre = NystromPreconditioner(NystromSketch.compute(Dense(C), rank=30))
    assert relative_error(pre.eigenvalues, torch.linalg.eigvalsh(C).flip(0)) < 1e-10
    damping = 0.1
    # P⁻¹ (C + λI) = (Λ_min + λ) I
    A = C + damping * torch.eye(30, dtype=torch.float64)
    applied = torch.stack([pre.solve_damped(A[:, i], damping) for i in range(30)], 1)
    assert (
        relative_error(applied, (pre.eigenvalues[-1] + damping) * torch.eye(30, dtype=torch.float64)) < 1e-8
    )
    rhs = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, stats = conjugate_gradient(Dense(C), damping, rhs, tol=1e-10, max_iter=100, preconditioner=pre)
    assert stats.iterations == 1 and stats.extra["preconditioner"] == "nystrom"
    assert relative_error(x, torch.linalg.solve(A, rhs)) < 1e-9


def test_a_low_rank_sketch_flattens_the_top_of_the_spectrum():
    # 20 stiff directions over a tail of small ones: rank 25 captures them, and CG then needs the iterations
    # of the tail's condition number (0.05 + λ)/(0.001 + λ) ≈ 5.5 instead of (1000 + λ)/(0.001 + λ)
    eigenvalues = torch.cat(
        [torch.logspace(3, 1, 20, dtype=torch.float64), torch.linspace(0.05, 0.001, 60, dtype=torch.float64)]
    )
    C = spd(80, eigenvalues, seed=2)
    rhs = torch.randn(80, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0, plain = conjugate_gradient(Dense(C), 0.01, rhs, tol=1e-10, max_iter=500)
    pre = NystromPreconditioner(NystromSketch.compute(Dense(C), rank=25, seed=4))
    x1, pcg = conjugate_gradient(Dense(C), 0.01, rhs, tol=1e-10, max_iter=500, preconditioner=pre)
    assert relative_error(x1, x0) < 1e-8
    assert pcg.iterations * 2 < plain.iterations, (pcg.iterations, plain.iterations)


def test_downdate_is_the_sketch_of_the_edited_ggn():
    model = fit(tiny_llama(seed=1), CausalLMTask(), ROWS)
    M = loop_normaliser(ROWS, "token")
    resolved = REQUEST.resolve(TrainingSet(ROWS), CausalLMTask())
    old, new = resolved.old, resolved.new
    edited = resolved.edited_rows(ROWS)
    sketch = NystromSketch.compute(Dense(dense_ggn(model, ROWS, "token", M)), rank=40, seed=5)
    down = sketch.downdate(Dense(dense_ggn(model, old, "token", M)), Dense(dense_ggn(model, new, "token", M)))
    expected = dense_ggn(model, edited, "token", M) @ sketch.test_matrix
    assert relative_error(down.products, expected) < 1e-10
    assert down.info["downdates"] == 1 and sketch.info.get("downdates") is None


def fresh_model():
    return fit(tiny_llama(seed=1), CausalLMTask(), ROWS)


def test_unlearn_with_the_nystrom_preconditioner_gives_the_cg_update_and_hands_on_the_sketch():
    args = dict(solver="cg", curvature="ggn", damping=0.05, tol=1e-10, dtype="float64", progress=False)
    plain, pre, again = fresh_model(), fresh_model(), fresh_model()
    theta = ParameterSpace(plain).vector().clone()
    P = theta.numel()
    r0 = unlearn(plain, ROWS, REQUEST, single_step(**args))
    r1 = unlearn(pre, ROWS, REQUEST, single_step(**args, preconditioner="nystrom", nystrom_rank=P))
    d0, d1 = ParameterSpace(plain).vector() - theta, ParameterSpace(pre).vector() - theta
    assert relative_error(d1, d0) < 1e-8
    # a full-rank sketch downdated to the edited curvature is an exact preconditioner (up to the null space)
    assert r1.stats["preconditioner"] == "nystrom" and r1.stats["iterations"] <= 3 < r0.stats["iterations"]
    record = r1.stats["nystrom_sketch"]
    assert record["origin"] == "pass" and record["products_in_unlearning"] == P and record["parameters_match"]
    assert record["downdate_rows"] == 3 and record["downdates"] == 1 and record["curvature"] == "ggn"
    assert r1.nystrom_sketch.info["downdates"] == 1 and r0.nystrom_sketch is None
    # a sketch handed in is used as given (no products) and downdated again
    sketch = sketch_curvature(again, ROWS, single_step(**args, preconditioner="nystrom", nystrom_rank=P))
    assert relative_error(sketch.products, dense_ggn(again, ROWS, "token") @ sketch.test_matrix) < 1e-10
    assert sketch.info["rows"] == len(ROWS) and sketch.info["curvature"] == "ggn"
    r2 = unlearn(again, ROWS, REQUEST, single_step(**args, preconditioner="nystrom"), nystrom_sketch=sketch)
    assert (
        r2.stats["nystrom_sketch"]["origin"] == "given"
        and r2.stats["nystrom_sketch"]["products_in_unlearning"] == 0
    )
    assert relative_error(ParameterSpace(again).vector() - theta, d0) < 1e-8


def test_sketch_files_round_trip_and_are_checked(tmp_path):
    C = spd(12, torch.logspace(1, -1, 12, dtype=torch.float64))
    sketch = NystromSketch.compute(Dense(C), rank=5, curvature="ggn")
    sketch.save(tmp_path)
    loaded = NystromSketch.load(tmp_path)
    assert torch.equal(loaded.products, sketch.products) and loaded.info["curvature"] == "ggn"
    assert loaded.digest() == json.loads((tmp_path / "nystrom_sketch.json").read_text())["digest"]
    meta = json.loads((tmp_path / "nystrom_sketch.json").read_text())
    (tmp_path / "nystrom_sketch.json").write_text(json.dumps({**meta, "digest": "sha256:0"}))
    with pytest.raises(ConfigurationError, match="does not match the digest"):
        NystromSketch.load(tmp_path)
    with pytest.raises(ConfigurationError, match="has no Nyström sketch.*--curvature-factors pass"):
        NystromSketch.load(tmp_path / "missing")


def test_bad_nystrom_settings_are_refused():
    with pytest.raises(ConfigurationError, match="nystrom_rank must be"):
        single_step(preconditioner="nystrom", nystrom_rank=0)
    with pytest.raises(ConfigurationError, match="solver 'direct'"):
        single_step(preconditioner="nystrom", curvature="kfac")
    with pytest.raises(ConfigurationError, match="between 1 and the number"):
        NystromSketch.compute(Dense(torch.eye(4, dtype=torch.float64)), rank=5)
    model = fresh_model()
    wrong = NystromSketch.compute(Dense(torch.eye(4, dtype=torch.float64)), rank=2, curvature="ggn")
    args = single_step(curvature="ggn", preconditioner="nystrom", damping=0.1, progress=False)
    with pytest.raises(ConfigurationError, match="over 4 parameters.*--curvature-factors pass"):
        unlearn(model, ROWS, REQUEST, args, nystrom_sketch=wrong)


def test_an_explicit_curvature_factors_choice_wins_over_a_sketch_handed_in():
    args = single_step(
        curvature="ggn",
        preconditioner="nystrom",
        nystrom_rank=8,
        damping=0.1,
        dtype="float64",
        progress=False,
    )
    model = fresh_model()
    given = sketch_curvature(model, ROWS, args)
    explicit = dataclasses.replace(args, curvature_factors="pass")
    record = unlearn(model, ROWS, REQUEST, explicit, nystrom_sketch=given).stats["nystrom_sketch"]
    assert record["origin"] == "pass" and record["ignored_sketch_from"] == "given"
    assert record["products_in_unlearning"] == 8


def test_a_sampled_sketch_is_downdated_by_its_own_request_rows_and_fits_the_sampled_solve(tmp_path):
    # seed 5: the 6-row sample of the 10 training rows is 4..9, with replaced row 7 and without removed row 2
    picked = [4, 5, 6, 7, 8, 9]
    args = dict(
        solver="cg", curvature="ggn", damping=0.05, tol=1e-10, dtype="float64", progress=False, seed=5,
        hessian_samples=6,
    )  # fmt: skip
    plain, pre = fresh_model(), fresh_model()
    theta = ParameterSpace(plain).vector().clone()
    P = theta.numel()
    r0 = unlearn(plain, ROWS, REQUEST, single_step(**args))
    r1 = unlearn(
        pre, ROWS, REQUEST,
        single_step(**args, preconditioner="nystrom", nystrom_rank=P, curvature_samples=6),
    )  # fmt: skip
    d0, d1 = ParameterSpace(plain).vector() - theta, ParameterSpace(pre).vector() - theta
    assert relative_error(d1, d0) < 1e-8
    # only row 7's two versions are downdated, and the sketch is then exactly the solve's edited sample
    record = r1.stats["nystrom_sketch"]
    assert record["downdate_rows"] == 2 and record["rows"] == 6 and "row_digests" not in record
    assert r1.stats["num_curvature_rows"] == 6 and r1.stats["iterations"] <= 3 < r0.stats["iterations"]
    new7 = REQUEST.resolve(TrainingSet(ROWS), CausalLMTask()).new[0]
    edited_sample = [ROWS[i] for i in picked if i != 7] + [new7]
    M_sample = loop_normaliser([ROWS[i] for i in picked], "token")
    sketch = r1.nystrom_sketch
    expected = dense_ggn(fresh_model(), edited_sample, "token", M_sample) @ sketch.test_matrix
    assert relative_error(sketch.products, expected) < 1e-10
    # the rows it now holds (for the next request's downdate) survive a save/load, but not in the manifest
    assert sorted(sketch.info["row_digests"]) == sorted(row_digest(r) for r in edited_sample)
    sketch.save(tmp_path)
    assert NystromSketch.load(tmp_path).info["row_digests"] == sketch.info["row_digests"]
    # a request with no row in the sample leaves the sketch as it is (no products)
    sketched = single_step(**args, preconditioner="nystrom", nystrom_rank=8, curvature_samples=6)
    given = sketch_curvature(fresh_model(), ROWS, sketched)
    r2 = unlearn(fresh_model(), ROWS, UnlearningRequest(remove=[2]), sketched, nystrom_sketch=given)
    assert r2.stats["nystrom_sketch"]["downdate_rows"] == 0
    assert torch.equal(r2.nystrom_sketch.products, given.products)


def test_a_request_after_a_removal_curves_on_the_rows_of_the_sampled_sketch():
    # seed 5: the first request's 6-row sample is rows 4..9 (row 2 removed, row 7 replaced). In the edited
    # file those rows sit at 3..8, while a seeded sample of its 9 rows would be 0, 4..8: a sketch handed on
    # must keep the solve on its own rows.
    args = dict(
        solver="cg", curvature="ggn", damping=0.05, tol=1e-10, dtype="float64", progress=False, seed=5,
        hessian_samples=6, preconditioner="nystrom", nystrom_rank=8, curvature_samples=6,
    )  # fmt: skip
    model = fresh_model()
    first = unlearn(model, ROWS, REQUEST, single_step(**args))
    new7 = REQUEST.resolve(TrainingSet(ROWS), CausalLMTask()).new[0]
    rows = [new7 if i == 7 else r for i, r in enumerate(ROWS) if i != 2]  # the training file as edited
    second = unlearn(
        model,
        rows,
        UnlearningRequest(remove=[4]),
        single_step(**args),
        nystrom_sketch=first.nystrom_sketch,
    )
    assert second.stats["nystrom_sketch"]["solve_sample_is_sketch_sample"]
    assert second.stats["nystrom_sketch"]["downdate_rows"] == 1
    # the exact update with the GGN of the sketch's rows minus the removed one, normalised by those rows
    ref_model = fresh_model()
    unlearn(ref_model, ROWS, REQUEST, single_step(**args))  # θ₁ again, deterministically
    ref = DenseReference(ref_model, "token")
    b = -ref.grad_sum([rows[4]]) / loop_normaliser(rows, "token")
    G = dense_ggn(ref_model, [rows[i] for i in (3, 5, 6, 7, 8)], "token", loop_normaliser(rows[3:9], "token"))
    expected = -torch.linalg.solve(G + 0.05 * torch.eye(len(b), dtype=G.dtype), b)
    assert relative_error(torch.cat([d.reshape(-1) for d in second.delta.values()]), expected) < 1e-8
    # a sketch whose row digests were made with another digest key is refused (it cannot find its rows)
    with using_digest_key(DigestKey.generate()), pytest.raises(ConfigurationError, match="digest key"):
        unlearn(fresh_model(), rows, UnlearningRequest(remove=[5]), single_step(**args),
                nystrom_sketch=second.nystrom_sketch)  # fmt: skip
    # a sketch that holds rows of another training set is refused, not silently used for the sample
    with pytest.raises(ConfigurationError, match="not in this training set"):
        unlearn(
            fresh_model(), ROWS, UnlearningRequest(remove=[0]), single_step(**args),
            nystrom_sketch=second.nystrom_sketch,
        )  # fmt: skip


def test_a_sketch_of_the_original_rows_is_not_handed_on_as_the_edited_sets():
    """With `curvature_data="original"` the sketch is not downdated, so it does not describe the edited
    training set the next request sees: it is not handed on (nor saved beside the output)."""
    args = single_step(
        preconditioner="nystrom", curvature="ggn", curvature_data="original", damping=0.05, dtype="float64",
        progress=False,
    )  # fmt: skip
    result = unlearn(fresh_model(), ROWS, REQUEST, args)
    assert result.stats["nystrom_sketch"]["origin"] == "pass" and result.nystrom_sketch is None
