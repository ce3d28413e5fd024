import json

import evaluate
import pytest
import torch
from reference import ROWS_FOR_CLI as ROWS
from reference import fit, loop_loss_sum, tiny_llama, token_rows
from test_cli import workspace  # noqa: F401  (fixture)

from hf_unlearn import CausalLMTask
from hf_unlearn.cli import main
from hf_unlearn.evaluation import evaluate_adapter, membership_auc, per_example
from hf_unlearn.metrics import METRICS


def test_metric_modules_load_offline_and_compute():
    em = evaluate.load(METRICS["sequence_exact_match"])
    assert em.compute(predictions=[[1, 2], [3], [4, 5]], references=[[1, 2], [4], [4, 5]])[
        "exact_match"
    ] == pytest.approx(2 / 3)
    auc = evaluate.load(METRICS["membership_auc"])
    assert auc.compute(predictions=[3.0, 2.0, 1.0, 0.0], references=[1, 1, 0, 0])["auc"] == 1.0
    assert auc.compute(predictions=[0.0, 1.0, 2.0, 3.0], references=[1, 1, 0, 0])["auc"] == 0.0
    assert auc.compute(predictions=[1.0, 1.0], references=[1, 0])["auc"] == 0.5


@pytest.fixture(scope="module")
def trained():
    rows = token_rows(8, seed=11)
    return fit(tiny_llama(seed=4), CausalLMTask(), rows, steps=150, lr=0.05).eval(), rows


def test_losses_and_exact_match_match_loops_and_greedy_decoding(trained):
    model, rows = trained
    stats = per_example(model, CausalLMTask(), rows, batch_size=3)
    for i, row in enumerate(rows):
        S, T = loop_loss_sum(model, row)
        assert stats["loss"][i] == pytest.approx((S / T).item(), rel=1e-10)
        # Greedy decoding from the prompt reproduces the response iff every teacher-forced argmax is right.
        prompt = row["labels"].count(-100)
        generated = model.generate(
            torch.tensor([row["input_ids"][:prompt]]),
            max_new_tokens=len(row["input_ids"]) - prompt,
            do_sample=False,
        )[0, prompt:].tolist()
        assert (generated == row["input_ids"][prompt:]) == (stats["predicted"][i] == stats["target"][i])
    assert any(p == t for p, t in zip(stats["predicted"], stats["target"]))  # the fit memorised some rows


def test_kl_to_reference(trained):
    model, rows = trained
    task = CausalLMTask()
    assert evaluate_adapter(model, task, {"test": rows}, reference=model)["test"][
        "kl_to_reference"
    ] == pytest.approx(0, abs=1e-12)
    other = tiny_llama(seed=4).eval()
    kl = evaluate_adapter(model, task, {"test": rows[:1]}, reference=other)["test"]["kl_to_reference"]
    batch = task.collate(rows[:1])
    p = other(input_ids=batch["input_ids"]).logits[0, :-1].log_softmax(-1)
    q = model(input_ids=batch["input_ids"]).logits[0, :-1].log_softmax(-1)
    mask = batch["labels"][0, 1:] != -100
    expected = (p.exp() * (p - q)).sum(-1)[mask].mean().item()
    assert kl == pytest.approx(expected, rel=1e-9)


def test_membership_auc_sees_memorised_rows(trained):
    model, rows = trained
    assert membership_auc(model, CausalLMTask(), rows, token_rows(8, seed=99)) > 0.8


def scaled_adapter(files, out):
    """The workspace adapter with lora_B × 1.5: a reference that differs from it."""
    other = load_adapter_model(files, files["adapter"])
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.mul_(1.5)
    other.save_pretrained(out)
    return out


def load_adapter_model(files, adapter, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(files["base"], dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def test_evaluate_command(workspace, tmp_path, capsys):  # noqa: F811
    from test_cli import write_jsonl

    forget_rows, test_rows = ROWS[:3], token_rows(4, seed=123)  # responses of different lengths
    forget = write_jsonl(tmp_path / "forget.jsonl", forget_rows)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    reference = scaled_adapter(workspace, tmp_path / "reference")
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", workspace["base"], "--adapter", workspace["adapter"], "--forget-file", forget,
            "--test-file", test, "--reference-adapter", str(reference), "--output-file", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"forget", "test", "membership_auc"}
    assert "membership-inference AUC" in capsys.readouterr().out
    # against loops in float64: token-weighted loss and KL over each split, and the attack's AUC as the
    # Mann–Whitney count over (forget, test) pairs
    model = load_adapter_model(workspace, workspace["adapter"], torch.float64)
    ref = load_adapter_model(workspace, reference, torch.float64)
    with torch.no_grad():
        for split, rows in (("forget", forget_rows), ("test", test_rows)):
            sums = [loop_loss_sum(model, r) for r in rows]
            tokens = sum(T for _, T in sums)
            assert report[split]["loss"] == pytest.approx(sum(S.item() for S, _ in sums) / tokens, rel=1e-5)
            kl = 0.0
            for r in rows:
                ids = torch.tensor([r["input_ids"]])
                p, q = (m(input_ids=ids).logits[0, :-1].log_softmax(-1) for m in (ref, model))
                mask = torch.tensor(r["labels"][1:]) != -100
                kl += (p.exp() * (p - q)).sum(-1)[mask].sum().item()
            # The report runs in float32: each log-probability carries a rounding error of a few eps·|log p|
            # (|log p| ≲ 10 here), and a KL is a mean of differences of them, so it is exact to an absolute
            # ~10·eps, not to a relative 1e-4 of a KL of 4e-4 (measured: 7e-8 off).
            float32_kl_error = 16 * torch.finfo(torch.float32).eps
            assert report[split]["kl_to_reference"] == pytest.approx(kl / tokens, rel=1e-5, abs=float32_kl_error)
            assert report[split]["kl_to_reference"] > 1e-4
        losses = {
            split: [(lambda S, T: S.item() / T)(*loop_loss_sum(model, r)) for r in rows]
            for split, rows in (("forget", forget_rows), ("test", test_rows))
        }
    pairs = [(f < t) + 0.5 * (f == t) for f in losses["forget"] for t in losses["test"]]  # member: lower loss
    assert report["membership_auc"] == pytest.approx(sum(pairs) / len(pairs))
    # bad inputs fail before any model is loaded, naming what is wrong, and write nothing
    common = ["evaluate", "--model", workspace["base"], "--adapter", workspace["adapter"]]
    for flags, message in (
        (["--forget-file", str(tmp_path / "missing.jsonl")], "--forget-file"),
        (["--forget-file", forget, "--batch-size", "0"], "--batch-size"),
        (["--forget-file", forget, "--output-file", str(tmp_path / "no" / "r.json")], "--output-file"),
    ):
        assert main([*common, *flags]) in (3, 4)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_kl_to_a_reference_adapter_on_the_same_base_equals_two_models(workspace, tmp_path):  # noqa: F811
    def load(adapter):
        return load_adapter_model(workspace, adapter)

    other = scaled_adapter(workspace, tmp_path / "other")
    task = CausalLMTask()
    two_models = evaluate_adapter(load(workspace["adapter"]), task, {"test": ROWS[:4]}, reference=load(other))
    model = load(workspace["adapter"])
    model.load_adapter(str(other), adapter_name="reference")
    one_model = evaluate_adapter(model, task, {"test": ROWS[:4]}, reference="reference")
    assert two_models["test"]["kl_to_reference"] > 1e-4
    assert one_model["test"]["kl_to_reference"] == pytest.approx(
        two_models["test"]["kl_to_reference"], rel=1e-6
    )
    assert one_model["test"]["loss"] == pytest.approx(two_models["test"]["loss"], rel=1e-9)
    assert model.active_adapter == "default"
