"""Wrong inputs are refused with a message saying what differs; --overwrite replaces only what hf-unlearn wrote;
the tokenizer stays with the adapter; --allow-inexact never keeps a result worse than no update."""

import json
import random

import pytest
import torch
from reference import tiny_llama_base, token_rows, train_tokenizer, write_jsonl

from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME, TOKENIZER_FILES, file_digest, model_weights_fingerprint

ROWS = [{"id": f"r{i}", **row} for i, row in enumerate(token_rows(12, seed=11))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny_llama_base(seed=3, dtype=torch.float32, exact=False).save_pretrained(root / "base")
    train_tokenizer().save_pretrained(root / "tokenizer")
    (root / "data").mkdir()
    train = write_jsonl(root / "data" / "train.jsonl", ROWS)
    assert main(["train", "--model", str(root / "base"), "--tokenizer", str(root / "tokenizer"), "--train-file",
                 train, "--output-dir", str(root / "adapter"), "--epochs", "3", "--learning-rate", "0.01",
                 "--batch-size", "6", "--lora-r", "2", "--no-progress"]) == 0  # fmt: skip
    request = write_jsonl(root / "request.jsonl", [{"op": "remove", "id": "r4"}])
    return {"root": root, "base": str(root / "base"), "adapter": str(root / "adapter"), "train": train,
            "request": request}  # fmt: skip


def unlearn_args(ws, out, *extra, train=None, base=None):
    return ["unlearn", "--model", base or ws["base"], "--adapter", ws["adapter"], "--train-file", train or ws["train"],
            "--request", ws["request"], "--output-dir", str(out), "--curvature", "ggn", "--damping", "0.1",
            "--no-progress", *extra]  # fmt: skip


def test_a_training_file_other_than_the_recorded_one_is_refused(trained, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    key = trained["root"] / "data" / ".hf_unlearn_key"
    if key.exists():  # the same key: only the rows differ
        (data / ".hf_unlearn_key").write_bytes(key.read_bytes())
    changed = [dict(r) for r in ROWS]
    changed[7]["input_ids"] = changed[7]["input_ids"][:-1] + [(changed[7]["input_ids"][-1] % 30) + 1]
    changed[7]["labels"] = changed[7]["labels"][:-1] + changed[7]["input_ids"][-1:]
    shuffled = ROWS[:]
    random.Random(0).shuffle(shuffled)
    no_ids = [{k: v for k, v in r.items() if k != "id"} for r in shuffled]
    cases = {
        "one answer changed": (changed, "content of at least one row differs"),
        "a row dropped": (ROWS[:-1], "it has 11 rows, its training record 12"),
        "rows moved, ids by line number": (no_ids, "same rows under other ids"),
    }
    for name, (rows, message) in cases.items():
        train = write_jsonl(data / f"{name}.jsonl", rows)
        assert main(unlearn_args(trained, tmp_path / "out", train=train)) == 3, name
        err = capsys.readouterr().err
        assert message in err and "--allow-training-file-mismatch" in err, (name, err)
        assert not (tmp_path / "out").exists()
    # rows in another order under their own ids are the same training set
    assert (
        main(unlearn_args(trained, tmp_path / "shuffled", train=write_jsonl(data / "s.jsonl", shuffled))) == 0
    )
    # the override, recorded
    train = write_jsonl(data / "changed.jsonl", changed)
    assert main(unlearn_args(trained, tmp_path / "out", "--allow-training-file-mismatch", train=train)) == 0


def test_a_base_model_with_the_same_shapes_but_other_weights_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other-base"
    tiny_llama_base(seed=4, dtype=torch.float32, exact=False).save_pretrained(other)
    assert main(unlearn_args(trained, tmp_path / "out", base=str(other))) == 4
    err = capsys.readouterr().err
    assert "same parameter names and shapes, but other values" in err and "--allow-base-model-mismatch" in err
    assert not (tmp_path / "out").exists()
    assert main(unlearn_args(trained, tmp_path / "out", "--allow-base-model-mismatch", base=str(other))) == 0
    weights = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["base_model_weights"]
    assert weights["matches_record"] is False
    # the override is named in the manifest, the success line and the model card
    assert weights["overridden_by"] == "--allow-base-model-mismatch"
    assert "OVERRIDDEN: the base model's weights" in capsys.readouterr().out
    assert "--allow-base-model-mismatch" in (tmp_path / "out" / "README.md").read_text()
    # the recorded base loaded in float64 (it was trained in float32) is the same base
    assert main(unlearn_args(trained, tmp_path / "f64", "--dtype", "float64")) == 0
    assert json.loads((tmp_path / "f64" / MANIFEST_NAME).read_text())["base_model_weights"]["matches_record"]


def test_overwrite_replaces_only_what_hf_unlearn_wrote(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(unlearn_args(trained, out, "--overwrite")) == 6
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main(unlearn_args(trained, out, "--overwrite")) == 0
    assert main(unlearn_args(trained, out, "--overwrite")) == 0  # an earlier output is replaced


def test_the_unlearned_adapter_keeps_the_input_adapters_tokenizer_files(trained, tmp_path):
    out = tmp_path / "out"
    assert main(unlearn_args(trained, out)) == 0
    source = trained["root"] / "adapter"
    kept = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    assert "tokenizer.json" in kept
    for name in kept:
        assert file_digest(out / name) == file_digest(source / name), name


def test_allow_inexact_never_keeps_a_result_worse_than_no_update(trained, tmp_path, capsys):
    # a LiSSA scale far too small: the Neumann series grows, the residual ends well above 1 (but finite)
    diverging = ["--solver", "lissa", "--lissa-scale", "0.05", "--max-iter", "4", "--allow-inexact"]
    assert main(unlearn_args(trained, tmp_path / "worse", *diverging)) == 5
    err = capsys.readouterr().err
    assert "better than no update" in err and not (tmp_path / "worse").exists()
    # advice that fits: LiSSA's own step, and not the flag the user already gave
    assert "raise --lissa-scale" in err and "--qp-lr" not in err and "pass --allow-inexact" not in err
    # an unconverged CG result (residual < 1) is kept with the flag and named in the success line
    assert (
        main(
            unlearn_args(
                trained,
                tmp_path / "inexact",
                "--max-iter",
                "1",
                "--tol",
                "1e-12",
                "--allow-inexact",
                "--refine-steps",
                "0",
                "--refine-damping",
                "fixed",
            )  # fmt: skip
        )
        == 0
    )
    assert "INEXACT" in capsys.readouterr().out
    assert "Inexact result" in (tmp_path / "inexact" / "README.md").read_text()


def test_an_overridden_training_file_check_is_recorded_and_said(trained, tmp_path, capsys):
    """--allow-training-file-mismatch: the manifest records that the check was overridden and what differed, the
    success line and the card say it; a matching file is recorded as matching."""
    changed = [dict(r) for r in ROWS]
    changed[7]["input_ids"] = changed[7]["input_ids"][:-1] + [(changed[7]["input_ids"][-1] % 30) + 1]
    changed[7]["labels"] = changed[7]["labels"][:-1] + changed[7]["input_ids"][-1:]
    train = write_jsonl(trained["root"] / "data" / "changed-for-override.jsonl", changed)  # beside the key
    out = tmp_path / "overridden"
    assert main(unlearn_args(trained, out, "--allow-training-file-mismatch", train=train)) == 0
    line = capsys.readouterr().out
    check = json.loads((out / MANIFEST_NAME).read_text())["training_data_check"]
    assert check["matches_record"] is False and check["overridden_by"] == "--allow-training-file-mismatch"
    assert "content of at least one row differs" in check["differs"]
    assert "OVERRIDDEN: the training file is not the one the adapter records" in line
    assert "--allow-training-file-mismatch" in line
    assert "Input check overridden" in (out / "README.md").read_text()
    assert main(unlearn_args(trained, tmp_path / "matching")) == 0
    assert "OVERRIDDEN" not in capsys.readouterr().out
    check = json.loads((tmp_path / "matching" / MANIFEST_NAME).read_text())["training_data_check"]
    assert check == {"matches_record": True}
    assert "Input check overridden" not in (tmp_path / "matching" / "README.md").read_text()


@pytest.mark.parametrize("solver", ["lissa", "qp"])
def test_a_stochastic_solve_short_of_tol_is_inexact(trained, tmp_path, capsys, solver):
    """lissa/qp run a budget of mini-batch steps: a result better than no update but above --tol is inexact, as an
    unconverged CG one is — refused without --allow-inexact (nothing written), named in the success line, the
    manifest and the card with it."""
    budget = [
        "--solver",
        solver,
        "--max-iter",
        "3",
        "--tol",
        "1e-12",
        "--refine-steps",
        "0",
        "--refine-damping",
        "fixed",
    ]
    assert main(unlearn_args(trained, tmp_path / "refused", *budget)) == 5
    err = capsys.readouterr().err
    assert "--tol" in err and "pass --allow-inexact" in err and not (tmp_path / "refused").exists(), err
    out = tmp_path / "kept"
    assert main(unlearn_args(trained, out, *budget, "--allow-inexact")) == 0
    assert "INEXACT" in capsys.readouterr().out
    solver_stats = json.loads((out / MANIFEST_NAME).read_text())["solver"]
    assert solver_stats["inexact"] is True and solver_stats["relative_residual"] < 1
    assert "Inexact result" in (out / "README.md").read_text()


def test_the_weights_fingerprint_takes_every_parameter_size():
    # SmolLM2-135M's embedding: in float32 the last sampled index rounded past the end (an IndexError in training)
    big = torch.nn.Embedding(49152, 576)
    fingerprint = model_weights_fingerprint(big)
    assert fingerprint == model_weights_fingerprint(big.to(torch.float64))  # dtype-independent, as documented
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # the last value is among the samples
    assert model_weights_fingerprint(big)["fingerprint"] != fingerprint["fingerprint"]
