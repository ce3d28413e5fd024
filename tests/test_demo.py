import json

import pytest
import scipy.stats
import torch
from reference import tiny_llama_base, train_tokenizer

from hf_unlearn import demo_data
from hf_unlearn.cli import main
from hf_unlearn.demo import DemoArguments, Lab, verdicts
from hf_unlearn.evaluation import split_metrics
from hf_unlearn.io import TRAINING_RECORD, adapter_digest


def test_shipped_demo_files_are_what_the_generator_writes(tmp_path):
    written = demo_data.write(tmp_path)
    for name, path in written.items():
        assert path.read_text() == (demo_data.DIR / f"{name}.jsonl").read_text(), name
    data = demo_data.generate()
    ids = {row["id"] for row in data["train"]}
    assert all(line["id"] in ids for kind in ("IR", "QM", "RC") for line in data[f"request_{kind}"])
    # QM: prompts that name a person by phone number, redacted to the name (tests/test_tofu.py checks more)
    assert all("555-" in row["prompt"] for row in data["train"] if row["id"].startswith("redacted"))
    assert not any("555-" in line["prompt"] for line in data["request_QM"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer saved as a local model directory: the demo's --model."""
    path = tmp_path_factory.mktemp("demo") / "model"
    tokenizer = train_tokenizer(vocab_size=160)
    model = tiny_llama_base(seed=0, dtype=torch.float32, exact=False, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_tiny_demo(model, out, *flags) -> dict:
    argv = ["demo", "--model", str(model), "--output-dir", str(out), "--epochs", "2", "--lora-layers", "2",
            "--max-iter", "5", "--damping", "1.0", "--progress", "false", *flags]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "demo_results.json").read_text())


def test_demo_runs_end_to_end_on_a_local_model_directory(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_tiny_demo(tiny_model, out)
    printed = capsys.readouterr().out
    assert results["n_train"] == len(demo_data.generate()["train"])
    assert set(results["kinds"]) == {"IR", "QM", "RC"}
    assert results["spread"] is False
    prov = results["provenance"]  # what produced the figures: revision (in a checkout), versions, threads
    assert prov["versions"]["torch"] == torch.__version__ and prov["torch_threads"] == torch.get_num_threads()
    assert prov["command"] and (prov["git_revision"] is None or len(prov["git_revision"]) == 40)
    for r in results["kinds"].values():
        assert {"metric", "original", "unlearned", "retrained", "unlearn_seconds", "retrain_seconds"} <= set(
            r
        )
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in ("original", "unlearned", "retrained"))
        assert r["unlearned"] != r["original"]  # the update did something
        assert isinstance(r["step_applied"], bool)
        assert "next_seed" not in r and "g_next" not in r  # only with --spread
    assert (out / "demo_results.png").stat().st_size > 10_000
    # Each request was served on the original adapter and compared with its own retraining.
    original_digest = adapter_digest(out / "adapters" / "original")
    for kind in ("IR", "QM", "RC"):
        manifest = json.loads(
            (out / "adapters" / f"unlearned_{kind}" / "unlearning_manifest.json").read_text()
        )
        assert set(manifest["request"]["kinds"]) == {kind}
        assert manifest["input_adapter"]["digest"] == original_digest
        assert manifest["solver"]["l2_regularization"] == 0.01  # the objective the demo trains
        # unlearn's default path, on the K-FAC factors captured while training the original adapter
        assert manifest["solver"]["objective_estimate_choice"]["kind"] == "quadratic"
        assert manifest["solver"]["curvature_factors"]["origin"] == "training"
        assert results["kinds"][kind]["step_applied"] == (manifest["delta_norm"] > 0)
        assert (out / "adapters" / f"retrained_{kind}" / "adapter_model.safetensors").exists()
    probe = results["kinds"]["QM"]["trigger_probe"]
    assert all(isinstance(probe[k], float) for k in ("original", "unlearned", "retrained"))
    assert "task_metric" not in results["kinds"]["QM"]["evaluation"]["adapters"]["unlearned"]

    for label in ("retain loss", "held-out loss", "forget KS p", "PrivLeak %", "IR verdicts: utility"):
        assert label in printed

    data = demo_data.generate()
    lab = Lab(DemoArguments(model=str(tiny_model), progress=False))

    def direct(adapter, rows):
        model = lab.load(out / "adapters" / adapter)
        metrics = split_metrics(model, lab.task, rows)
        lab.drop(model)
        return metrics

    # the retain split is training rows that no request edits, as trained
    edited = {line["id"] for kind in ("IR", "QM", "RC") for line in data[f"request_{kind}"]}
    trained = {r["id"]: (r["prompt"], r["response"]) for r in data["train"] if r["id"] not in edited}
    assert all(trained[r["id"]] == (r["prompt"], r["response"]) for r in data["eval_retain"])
    expected = direct("original", data["eval_retain"])
    # each kind's metric rows: the removed rows (IR), the new versions (QM: redacted prompts; RC: corrected answers)
    by_id = {r["id"]: r for r in data["train"]}
    metric_rows = {
        kind: [
            {**by_id[line["id"]], **{k: line[k] for k in ("prompt", "response") if k in line}}
            for line in data[f"request_{kind}"]
        ]
        for kind in ("IR", "QM", "RC")
    }
    for kind, r in results["kinds"].items():
        for name in ("original", "unlearned"):
            adapter = "original" if name == "original" else f"{name}_{kind}"
            assert r[name] == pytest.approx(direct(adapter, metric_rows[kind])["loss"], rel=1e-6)
        evaluation = r["evaluation"]
        assert evaluation["reference"] == "retrained"
        assert evaluation["forget_set_size"] == len(data[f"request_{kind}"]) == 6
        reports = evaluation["adapters"]
        assert list(reports) == ["original", "unlearned", "retrained"]
        for report in reports.values():
            for split in ("retain", "test", "forget", "nonmember"):
                assert {"loss", "exact_match", "truth_ratio", "truth_ratios"} <= set(report[split])
            assert 0 <= report["min_k_plus_plus_auc"] <= 1 and 0 <= report["membership_auc"] <= 1
        # utility on the kept rows (the original's, shared by every kind) and on held-out questions, and the
        # forget rows' truth ratios, each as split_metrics computes it here
        for key in ("loss", "exact_match", "truth_ratio"):
            assert reports["original"]["retain"][key] == pytest.approx(expected[key], rel=1e-6)
        held_out = direct(f"unlearned_{kind}", data["eval_holdout"])
        for key in ("loss", "exact_match", "truth_ratio"):
            assert reports["unlearned"]["test"][key] == pytest.approx(held_out[key], rel=1e-6)
        forget = direct(f"retrained_{kind}", data[f"eval_forget_{kind}"])
        assert reports["retrained"]["forget"]["truth_ratios"] == pytest.approx(
            forget["truth_ratios"], rel=1e-6
        )
        # forget quality (scipy's KS test) and PrivLeak (MUSE's formula) against the retrained adapter
        for name in ("original", "unlearned"):
            ks = scipy.stats.ks_2samp(
                reports[name]["forget"]["truth_ratios"], reports["retrained"]["forget"]["truth_ratios"]
            )
            assert reports[name]["forget_quality"]["forget_quality"] == pytest.approx(ks.pvalue, rel=1e-9)
            assert reports[name]["forget_quality"]["forget_set_size"] == 6
            a, b = 1 - reports[name]["min_k_plus_plus_auc"], 1 - reports["retrained"]["min_k_plus_plus_auc"]
            assert reports[name]["privleak"] == pytest.approx((a - b) / b * 100)
        assert "forget_quality" not in reports["retrained"] and "privleak" not in reports["retrained"]
        u, t = reports["unlearned"], reports["retrained"]
        assert r["verdicts"] == {
            "retain_loss": u["retain"]["loss"] <= t["retain"]["loss"] + 0.05,
            "retain_exact_match": u["retain"]["exact_match"] >= t["retain"]["exact_match"] - 0.05,
            "held_out_loss": u["test"]["loss"] <= t["test"]["loss"] + 0.05,
            "held_out_exact_match": u["test"]["exact_match"] >= t["test"]["exact_match"] - 0.05,
            "utility": r["verdicts"]["utility"],
            "forget_quality": None,  # judged against the next-seed retraining: --spread
            "within_spread": None,
        }
        assert r["verdicts"]["utility"] == all(
            v for k, v in r["verdicts"].items() if k.endswith(("loss", "match"))
        )

    assert probe["retrained"] == pytest.approx(
        direct("retrained_QM", data["triggered_test"])["loss"], rel=1e-6
    )

    # Lab.scores (the benchmark's metrics) agrees with the evaluation module's loss and exact match
    rows = [{k: r[k] for k in ("prompt", "response")} for r in data["train"][:12]]
    scores = lab.scores(out / "adapters" / "original", rows)
    expected = direct("original", rows)
    assert abs(scores["nll"] - expected["loss"]) < 1e-5
    assert scores["exact_match"] == expected["exact_match"]


def test_demo_spread_retrains_with_the_next_seed_and_judges_against_it(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_tiny_demo(tiny_model, out, "--spread")
    printed = capsys.readouterr().out
    assert results["spread"] is True and results["arguments"]["spread"] is True
    for kind, r in results["kinds"].items():
        reports = r["evaluation"]["adapters"]
        assert list(reports) == ["original", "unlearned", "retrained", "next_seed"]
        assert isinstance(r["next_seed"], float) and r["next_seed_seconds"] > 0
        assert r["g_next"] == pytest.approx(
            (r["next_seed"] - r["original"]) / (r["retrained"] - r["original"])
        )
        assert r["next_seed"] != r["retrained"]  # another seed, another adapter
        next_quality = reports["next_seed"]["forget_quality"]["forget_quality"]
        ks = scipy.stats.ks_2samp(
            reports["next_seed"]["forget"]["truth_ratios"], reports["retrained"]["forget"]["truth_ratios"]
        )
        assert next_quality == pytest.approx(ks.pvalue, rel=1e-9)
        assert "privleak" in reports["next_seed"]
        v, quality = r["verdicts"], reports["unlearned"]["forget_quality"]["forget_quality"]
        assert v["forget_quality"] == (quality >= 0.05 if next_quality >= 0.05 else None)
        assert v["within_spread"] == (abs(r["gap_closed"] - 1) <= max(0.15, 1.5 * abs(r["g_next"] - 1)))
        assert verdicts(r) == v
        assert "next_seed" in r["trigger_probe"] if kind == "QM" else "trigger_probe" not in r
    assert (out / "demo_results.png").stat().st_size > 10_000
    assert "next seed" in printed and "gap within retraining's spread" in printed
    # the next-seed adapter is the retraining recipe with seed + 1
    lab = Lab(DemoArguments(model=str(tiny_model), epochs=2, lora_layers=2, seed=1, progress=False))
    train = demo_data.generate()["train"]
    removed = {line["id"] for line in demo_data.generate()["request_IR"]}
    lab.train(
        [{k: r[k] for k in ("prompt", "response")} for r in train if r["id"] not in removed],
        tmp_path / "again",
    )
    from safetensors.torch import load_file

    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    saved = load_file(out / "adapters" / "next_seed_IR" / "adapter_model.safetensors")
    retrained = load_file(out / "adapters" / "retrained_IR" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert not all(torch.equal(retrained[k], saved[k]) for k in saved)


def test_demo_adapters_carry_the_training_record_that_unlearn_reads(tiny_model, tmp_path):
    """Lab.train is `training.train_adapter`: the adapter gets a training record with the demo's μ, which
    `hf-unlearn unlearn` then unlearns against without being told; the base model is given back without LoRA."""
    lab = Lab(DemoArguments(model=str(tiny_model), epochs=1, lora_layers=2, progress=False))
    data = demo_data.generate()
    out = tmp_path / "original"
    (out / "trainer").mkdir(parents=True)  # an earlier version's output, replaced
    lab.train([{k: r[k] for k in ("prompt", "response")} for r in data["train"]], out, capture_curvature=True)
    assert not any("lora_" in name for name, _ in lab.base.named_parameters())
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["config"]["l2_regularization"] == 0.01 and record["loss_normalization"] == "token"
    assert record["config"]["lora_alpha"] == 16 and record["config"]["lora_layers"] == 2
    assert record["training_data"] == {"path": None, "num_rows": len(data["train"])}
    assert record["curvature_factors"]["num_rows"] == len(data["train"])
    top = lab.base.config.num_hidden_layers - 2
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [top, top + 1]

    for name in ("train", "request_IR"):  # copies: unlearn keeps its digest key beside the training file
        (tmp_path / f"{name}.jsonl").write_text((demo_data.DIR / f"{name}.jsonl").read_text())
    unlearned = tmp_path / "unlearned"
    assert main(["unlearn", "--model", str(tiny_model), "--adapter", str(out), "--train-file",
                 str(tmp_path / "train.jsonl"), "--request", str(tmp_path / "request_IR.jsonl"), "--output-dir",
                 str(unlearned), "--max-iter", "5", "--damping", "1.0", "--no-progress"]) == 0  # fmt: skip
    manifest = json.loads((unlearned / "unlearning_manifest.json").read_text())
    assert manifest["solver"]["l2_regularization"] == 0.01  # from the training record, no flag
    # the default (objective_estimate auto) takes the quadratic estimate on the demo's captured factors,
    # read from the adapter: no pass over the training rows
    assert manifest["solver"]["objective_estimate_choice"]["kind"] == "quadratic"
    factors = manifest["solver"]["curvature_factors"]
    assert factors["origin"] == "file" and factors["source"] == "training"
    assert manifest["base_model_weights"]["matches_record"] is True


def test_demo_refuses_bad_unlearning_flags_before_training(tmp_path, capsys):
    for flags, message in ((["--damping", "-1"], "damping"), (["--refine-damping", "foo"], "refine_damping")):
        assert main(["demo", "--output-dir", str(tmp_path / "demo"), *flags]) == 4
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing was trained or written
