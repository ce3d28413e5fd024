import json

import torch
from reference import tiny_llama_base, train_tokenizer

from hf_unlearn import demo_data
from hf_unlearn.cli import main
from hf_unlearn.io import adapter_digest


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


def test_demo_runs_end_to_end_on_a_local_model_directory(tmp_path):
    tokenizer = train_tokenizer(vocab_size=160)
    model = tiny_llama_base(seed=0, dtype=torch.float32, exact=False, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tmp_path / "model"), "--output-dir", str(out), "--epochs", "2", "--lora-layers", "2",
            "--max-iter", "5", "--damping", "1.0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["n_train"] == len(demo_data.generate()["train"])
    assert set(results["kinds"]) == {"IR", "QM", "RC"}
    for r in results["kinds"].values():
        assert {"metric", "original", "unlearned", "retrained", "unlearn_seconds", "retrain_seconds"} <= set(
            r
        )
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in ("original", "unlearned", "retrained"))
        assert r["unlearned"] != r["original"]  # the update did something
        assert isinstance(r["step_applied"], bool)
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

    # Lab.scores (the benchmark's metrics) agrees with the evaluation module's loss and exact match
    from hf_unlearn.demo import DemoArguments, Lab
    from hf_unlearn.evaluation import split_metrics

    lab = Lab(DemoArguments(model=str(tmp_path / "model"), progress=False))
    rows = [{k: r[k] for k in ("prompt", "response")} for r in demo_data.generate()["train"][:12]]
    scores = lab.scores(out / "adapters" / "original", rows)
    model = lab.load(out / "adapters" / "original")
    expected = split_metrics(model, lab.task, rows)
    lab.drop(model)
    assert abs(scores["nll"] - expected["loss"]) < 1e-5
    assert scores["exact_match"] == expected["exact_match"]


def test_demo_refuses_bad_unlearning_flags_before_training(tmp_path, capsys):
    for flags, message in ((["--damping", "-1"], "damping"), (["--refine-damping", "foo"], "refine_damping")):
        assert main(["demo", "--output-dir", str(tmp_path / "demo"), *flags]) == 4
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing was trained or written
