import json
import math
import random

import evaluate
import pytest
import scipy.stats
import torch
from peft import LoraConfig, get_peft_model
from reference import (
    LORA,
    fit,
    loop_loss_sum,
    tiny_llama,
    tiny_llama_base,
    token_rows,
    train_tokenizer,
    write_jsonl,
)
from reference import ROWS_FOR_CLI as ROWS

from hf_unlearn import CausalLMTask, demo_data
from hf_unlearn.cli import main
from hf_unlearn.data import ExampleEncoder
from hf_unlearn.evaluation import (
    compare,
    evaluate_adapter,
    format_table,
    membership_auc,
    per_example,
    truth_ratios,
)
from hf_unlearn.metrics import METRICS
from hf_unlearn.metrics import functional as fn


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


def test_evaluate_command(workspace, tmp_path, capsys):
    forget_rows, test_rows = ROWS[:3], token_rows(4, seed=123)  # responses of different lengths
    forget = write_jsonl(tmp_path / "forget.jsonl", forget_rows)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    reference = scaled_adapter(workspace, tmp_path / "reference")
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", workspace["base"], "--adapter", workspace["adapter"], "--forget-file", forget,
            "--test-file", test, "--reference-adapter", str(reference), "--output-file", str(out)]  # fmt: skip
    assert main(argv) == 0
    comparison = json.loads(out.read_text())
    assert set(comparison["adapters"]) == {
        "unlearned",
        "retrained",
    }  # --reference-adapter = --retrained-adapter
    report = comparison["adapters"]["unlearned"]
    assert {"forget", "test", "membership_auc", "min_k_plus_plus_auc"} <= set(report)
    assert "membership AUC, loss" in capsys.readouterr().out
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
            assert report[split]["kl_to_reference"] == pytest.approx(
                kl / tokens, rel=1e-5, abs=float32_kl_error
            )
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
        (["--forget-file", forget, "--min-k", "0"], "--min-k"),
        (["--forget-file", forget, "--retrained-adapter", str(tmp_path / "none")], "not a PEFT adapter"),
        (["--forget-file", forget, "--output-file", str(tmp_path / "no" / "r.json")], "--output-file"),
    ):
        assert main([*common, *flags]) in (3, 4)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_kl_to_a_reference_adapter_on_the_same_base_equals_two_models(workspace, tmp_path):
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


# --- TOFU / MUSE / Min-K%++ metrics -----------------------------------------------------------------------


def test_truth_ratio_hand_computed():
    # P̃ = P^(1/|a|) = exp(-token-mean loss); R = geometric mean of the perturbed P̃ over the paraphrased P̃
    para, pert = 1.0, [2.0, 3.0]
    expected = math.sqrt(math.exp(-2.0) * math.exp(-3.0)) / math.exp(-1.0)
    assert fn.truth_ratio(para, pert) == pytest.approx(expected, rel=1e-15)
    ratios = [0.25, 2.0, 1.0]
    assert fn.truth_ratio_scores(ratios) == pytest.approx(
        {"truth_ratio": (0.75 + 0 + 0) / 3, "truth_ratio_forget": (0.25 + 0.5 + 1.0) / 3}, rel=1e-15
    )
    module = evaluate.load(METRICS["truth_ratio"]).compute(
        paraphrased_losses=[1.0, 0.5], perturbed_losses=[[2.0, 3.0], [0.25]]
    )
    assert module["truth_ratios"] == pytest.approx([expected, math.exp(0.25)], rel=1e-15)
    assert module["truth_ratio"] == pytest.approx((1 - expected) / 2, rel=1e-15)
    assert module["truth_ratio_forget"] == pytest.approx((expected + math.exp(-0.25)) / 2, rel=1e-15)


@pytest.mark.parametrize("m,n", [(1, 1), (4, 4), (6, 6), (5, 9), (40, 40), (40, 23), (300, 300)])
def test_ks_test_matches_scipy(m, n):
    rng = random.Random(m * 1000 + n)
    for shift in (0.0, 0.5, 3.0):
        for ties in (False, True):
            x = [rng.gauss(0, 1) for _ in range(m)]
            y = [rng.gauss(shift, 1) for _ in range(n)]
            if ties:
                x, y = [round(v, 0) for v in x], [round(v, 0) for v in y]
            statistic, p = fn.ks_2samp(x, y)
            expected = scipy.stats.ks_2samp(x, y)  # the default: exact for these sizes
            assert statistic == pytest.approx(expected.statistic, abs=1e-15)
            assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    module = evaluate.load(METRICS["forget_quality"]).compute(predictions=x, references=x[::-1])
    assert module == {
        "forget_quality": 1.0,
        "ks_statistic": 0.0,
        "forget_set_size": m,
        "reference_set_size": m,
    }


def test_ks_p_value_hand_worked():
    # 2 against 2, fully separated: D = 1, and 2 of the C(4, 2) = 6 orderings reach it
    assert fn.ks_2samp([0.0, 1.0], [2.0, 3.0]) == pytest.approx((1.0, 2 / 6), rel=1e-15)
    # interleaved x < y < x < y: D = 1/2, reached by every ordering
    assert fn.ks_2samp([0.0, 2.0], [1.0, 3.0]) == pytest.approx((0.5, 1.0), rel=1e-15)


def test_min_k_plus_plus_hand_computed():
    log_probs, means, variances = [-1.0, -3.0, -0.5, -2.0], [-1.5, -1.0, -1.0, -2.5], [1.0, 4.0, 0.25, 1e-9]
    z = [0.5, -1.0, 1.0, 0.5 / math.sqrt(1e-6)]  # the last variance is floored at 1e-6
    assert fn.min_k_plus_plus(log_probs, means, variances, k=0.5) == pytest.approx(
        (-1.0 + 0.5) / 2, rel=1e-15
    )
    assert fn.min_k_plus_plus(log_probs, means, variances, k=0.1) == pytest.approx(
        -1.0, rel=1e-15
    )  # ≥ 1 token
    assert fn.min_k_plus_plus(log_probs, means, variances, k=1.0) == pytest.approx(sum(z) / 4, rel=1e-15)
    # ⌊0.4 · 4⌋ = 1 token (open-unlearning's int(), not rounding)
    assert fn.min_k_plus_plus(log_probs, means, variances, k=0.4) == pytest.approx(-1.0, rel=1e-15)
    module = evaluate.load(METRICS["min_k_plus_plus"]).compute(
        token_log_probs=[log_probs], means=[means], variances=[variances], k=0.5
    )
    assert module["scores"] == pytest.approx([-0.25], rel=1e-15)


def test_privleak_hand_computed():
    # MUSE orientation: AUC_muse = 1 - P(member scores higher)
    assert fn.privleak(1.0, 0.5) == pytest.approx(-100.0)  # still recognises every forget row
    assert fn.privleak(0.5, 0.5) == 0.0
    assert fn.privleak(0.25, 0.5) == pytest.approx(50.0)  # forget rows look less familiar than unseen ones
    assert fn.privleak(0.6, 0.4) == pytest.approx((0.4 - 0.6) / 0.6 * 100)
    module = evaluate.load(METRICS["privleak"]).compute(
        predictions=[3.0, 2.0, 1.0, 2.0], reference_predictions=[1.0, 2.0, 1.5, 0.0], references=[1, 1, 0, 0]
    )
    # (member, non-member) pairs won: model (3,1) (3,2) (2,1) and a tie (2,2): 3.5 / 4; retrained (1,0) (2,1.5)
    # (2,0): 3 / 4. MUSE AUCs 0.125 and 0.25
    assert module == pytest.approx(
        {"privleak": (0.125 - 0.25) / 0.25 * 100, "auc": 0.875, "reference_auc": 0.75}
    )


def test_vocabulary_statistics_match_a_token_loop(trained):
    model, rows = trained
    stats = per_example(model, CausalLMTask(), rows, batch_size=3, vocabulary_statistics=True)
    for i, row in enumerate(rows):
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
        lp, mu, var = [], [], []
        for t in range(len(row["labels"]) - 1):
            if row["labels"][t + 1] == -100:
                continue
            log_p = torch.log_softmax(logits[t], -1)
            lp.append(log_p[row["labels"][t + 1]].item())
            m = sum(math.exp(v) * v for v in log_p.tolist())
            mu.append(m)
            var.append(sum(math.exp(v) * (v - m) ** 2 for v in log_p.tolist()))
        assert stats["token_log_probs"][i] == pytest.approx(lp, rel=1e-10)
        assert stats["means"][i] == pytest.approx(mu, rel=1e-10)
        assert stats["variances"][i] == pytest.approx(var, rel=1e-9)


@pytest.fixture(scope="module")
def text_models():
    """Two float64 tiny Llamas with a BPE tokenizer, one fitted to the demo's training rows: text rows with
    paraphrased and perturbed answers can be scored."""
    tokenizer = train_tokenizer()
    task = CausalLMTask(ExampleEncoder(tokenizer), pad_token_id=tokenizer.pad_token_id)
    data = demo_data.generate()
    base = tiny_llama_base(seed=1, vocab_size=len(tokenizer))
    model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False)).double()
    model = fit(
        model, task, [{k: r[k] for k in ("prompt", "response")} for r in data["train"]], steps=40
    ).eval()
    other = (
        get_peft_model(tiny_llama_base(seed=1, vocab_size=len(tokenizer)), LoraConfig(**LORA)).double().eval()
    )
    return model, other, task, data


def loop_mean_loss(model, task, prompt, response):
    S, T = loop_loss_sum(model, task.encoder({"prompt": prompt, "response": response}))
    return S.item() / T


def test_truth_ratios_match_loops(text_models):
    model, _, task, data = text_models
    rows = data["eval_forget_QM"] + data["eval_retain"][:4]
    result = truth_ratios(model, task, rows, batch_size=5)
    expected, first = [], []
    with torch.no_grad():
        for r in rows:
            para = loop_mean_loss(model, task, r["prompt"], r["paraphrased_response"])
            pert = [loop_mean_loss(model, task, r["prompt"], p) for p in r["perturbed_responses"]]
            expected.append(math.exp(para - sum(pert) / len(pert)))
            first.append(para < min(pert))
    assert result["truth_ratios"] == pytest.approx(expected, rel=1e-9)
    assert result["truth_ratio"] == pytest.approx(sum(max(0, 1 - r) for r in expected) / len(rows), rel=1e-9)
    assert result["truth_ratio_forget"] == pytest.approx(
        sum(min(r, 1 / r) for r in expected) / len(rows), rel=1e-9
    )
    assert result["candidate_accuracy"] == sum(first) / len(rows)
    assert len(set(expected)) == len(expected) and any(first)  # not a degenerate case


def loop_min_k(model, task, row, k=0.4):
    example = task.encoder(row)
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0].double()
    z = []
    for t in range(len(example["labels"]) - 1):
        target = example["labels"][t + 1]
        if target != -100:
            log_p = torch.log_softmax(logits[t], -1)
            mu = (log_p.exp() * log_p).sum()
            sigma = ((log_p.exp() * (log_p - mu) ** 2).sum()).sqrt()
            z.append(((log_p[target] - mu) / sigma).item())
    lowest = sorted(z)[: max(1, int(k * len(z)))]
    return sum(lowest) / len(lowest)


def test_evaluate_adapter_and_compare_match_loops(text_models):
    model, other, task, data = text_models
    splits = {
        "forget": data["eval_forget_IR"],
        "test": data["eval_holdout"][:6],
        "nonmember": data["eval_nonmember_IR"],
    }
    reports = {
        name: evaluate_adapter(m, task, splits, batch_size=4)
        for name, m in (("unlearned", model), ("retrained", other))
    }
    comparison = compare(reports, "retrained")
    with torch.no_grad():
        for name, m in (("unlearned", model), ("retrained", other)):
            r = comparison["adapters"][name]
            forget = [loop_min_k(m, task, row) for row in splits["forget"]]
            others = [loop_min_k(m, task, row) for row in splits["nonmember"]]  # not the test split
            assert r["membership"]["forget"]["min_k_plus_plus"] == pytest.approx(forget, rel=1e-8)
            wins = [(f > o) + 0.5 * (f == o) for f in forget for o in others]
            assert r["min_k_plus_plus_auc"] == sum(wins) / len(wins)
            losses = [(loop_mean_loss(m, task, x["prompt"], x["response"])) for x in splits["forget"]]
            non = [(loop_mean_loss(m, task, x["prompt"], x["response"])) for x in splits["nonmember"]]
            wins = [(f < o) + 0.5 * (f == o) for f in losses for o in non]
            assert r["membership_auc"] == sum(wins) / len(wins)
    unlearned, retrained = comparison["adapters"]["unlearned"], comparison["adapters"]["retrained"]
    # not a degenerate case: the adapters differ on the forget rows, and so do the two AUCs
    assert unlearned["forget_quality"]["ks_statistic"] > 0
    assert unlearned["min_k_plus_plus_auc"] != retrained["min_k_plus_plus_auc"]
    expected = scipy.stats.ks_2samp(unlearned["forget"]["truth_ratios"], retrained["forget"]["truth_ratios"])
    assert unlearned["forget_quality"]["forget_quality"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert unlearned["forget_quality"]["ks_statistic"] == pytest.approx(expected.statistic)
    assert unlearned["forget_quality"]["forget_set_size"] == comparison["forget_set_size"] == 6
    a, b = 1 - unlearned["min_k_plus_plus_auc"], 1 - retrained["min_k_plus_plus_auc"]
    assert unlearned["privleak"] == pytest.approx((a - b) / b * 100)
    assert "forget_quality" not in retrained and "privleak" not in retrained
    table = format_table(comparison)
    assert "forget quality (KS p-value)" in table and "PrivLeak, Min-K%++ (%)" in table
    assert f"{unlearned['forget_quality']['forget_quality']:.3g}" in table
    assert "forget set: 6 rows" in table


def test_evaluate_command_compares_original_unlearned_and_retrained(tmp_path, capsys):
    """Three adapters on one base, text rows from the TOFU-style generator: one table, and a JSON whose
    numbers match float64 loops, scipy's KS test and MUSE's PrivLeak formula."""
    tokenizer = train_tokenizer()
    base = tiny_llama_base(seed=2, dtype=torch.float32, exact=False, vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    task = CausalLMTask(ExampleEncoder(tokenizer), pad_token_id=tokenizer.pad_token_id)
    data = demo_data.generate()
    train = [{k: r[k] for k in ("prompt", "response")} for r in data["train"]]
    adapters = {}
    for name, rows, steps in (
        ("original", train, 30),
        ("retrained", train[6:], 30),
        ("unlearned", train, 15),
    ):
        model = fit(get_peft_model(tiny_llama_base(seed=2, dtype=torch.float32, exact=False,
                                                   vocab_size=len(tokenizer)), LoraConfig(**LORA)),
                    task, rows, steps=steps)  # fmt: skip
        adapters[name] = str(tmp_path / name)
        model.save_pretrained(adapters[name])
    files = {
        split: write_jsonl(tmp_path / f"{split}.jsonl", data[key])
        for split, key in (("forget", "eval_forget_QM"), ("retain", "eval_retain"), ("test", "eval_holdout"),
                           ("nonmember", "eval_nonmember_QM"))
    }  # fmt: skip
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", str(tmp_path / "base"), "--adapter", adapters["unlearned"],
            "--original-adapter", adapters["original"], "--retrained-adapter", adapters["retrained"],
            *[a for split, path in files.items() for a in (f"--{split}-file", path)], "--output-file", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header == ["metric", "original", "unlearned", "retrained"]
    for label in ("truth ratio, mean (1-R)+", "forget quality (KS p-value)", "PrivLeak, Min-K%++ (%)",
                  "membership AUC, Min-K%++", "true answer likeliest", "forget set: 6 rows"):  # fmt: skip
        assert label in printed
    comparison = json.loads(out.read_text())
    assert list(comparison["adapters"]) == ["original", "unlearned", "retrained"]
    assert comparison["reference"] == "retrained" and comparison["forget_set_size"] == 6
    reports = comparison["adapters"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in adapters:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64), adapters[name]
        ).eval()
        r = reports[name]
        with torch.no_grad():
            for split, key in (("retain", "eval_retain"), ("test", "eval_holdout")):
                sums = [loop_loss_sum(model, task.encoder(x)) for x in data[key]]
                expected = sum(S.item() for S, _ in sums) / sum(T for _, T in sums)
                assert r[split]["loss"] == pytest.approx(expected, rel=1e-5)
            ratios = []
            for x in data["eval_forget_QM"]:
                para = loop_mean_loss(model, task, x["prompt"], x["paraphrased_response"])
                pert = [loop_mean_loss(model, task, x["prompt"], p) for p in x["perturbed_responses"]]
                ratios.append(math.exp(para - sum(pert) / len(pert)))
            assert r["forget"]["truth_ratios"] == pytest.approx(ratios, rel=1e-4)
        assert ("kl_to_reference" in r["retain"]) == (name != "retrained")
    for name in ("original", "unlearned"):
        expected = scipy.stats.ks_2samp(
            reports[name]["forget"]["truth_ratios"], reports["retrained"]["forget"]["truth_ratios"]
        )
        assert reports[name]["forget_quality"]["forget_quality"] == pytest.approx(expected.pvalue, rel=1e-9)
        a, b = 1 - reports[name]["min_k_plus_plus_auc"], 1 - reports["retrained"]["min_k_plus_plus_auc"]
        assert reports[name]["privleak"] == pytest.approx((a - b) / b * 100)
    assert "forget_quality" not in reports["retrained"]
    assert (
        reports["original"]["retain"]["kl_to_reference"] != reports["unlearned"]["retain"]["kl_to_reference"]
    )


def test_benchmark_evaluation_section_reports_utility_forget_quality_and_privleak(tmp_path):
    """benchmarks/run.py's evaluation section (quick suite, a few epochs): per kind the default path, the
    next-seed retraining and retraining, each row with the original's, its own and the retrained adapter's
    figures, as `hf_unlearn.evaluation` computes them here."""
    import importlib.util
    from pathlib import Path

    from hf_unlearn import tofu
    from hf_unlearn.demo import DemoArguments, Lab
    from hf_unlearn.evaluation import split_metrics

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("benchmarks_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    suite = run.suite_with("quick", 0, epochs=4)
    rows = run.field_evaluation(suite, None, tmp_path)
    assert {(r["task"], r["method"]) for r in rows} == {
        (task, method)
        for task in ("IR", "QM", "RC")
        for method in ("default", "retrain-next-seed", "retrain")
    }
    data = tofu.generate(tofu.TofuSizes(**suite["evaluation"]["tofu"]))
    for r in rows:
        field = r["field"]
        assert r["request_size"] == field["forget_set_size"] == 8
        for side in ("original", "unlearned", "retrained"):
            for split in ("retain", "held_out"):
                assert {"loss", "exact_match", "truth_ratio"} <= set(field[side][split])
            assert len(field[side]["forget_truth_ratios"]) == 8
        if r["method"] != "retrain":  # against the retrained adapter
            ks = scipy.stats.ks_2samp(
                field["unlearned"]["forget_truth_ratios"], field["retrained"]["forget_truth_ratios"]
            )
            assert field["unlearned"]["forget_quality"] == pytest.approx(ks.pvalue, rel=1e-9)
            a, b = (
                1 - field["unlearned"]["min_k_plus_plus_auc"],
                1 - field["retrained"]["min_k_plus_plus_auc"],
            )
            assert field["unlearned"]["privleak"] == pytest.approx((a - b) / b * 100)
        assert field["retrained"]["forget_quality"] is None
    default = {r["task"]: r for r in rows if r["method"] == "default"}
    assert all(isinstance(r["within_spread"], bool) for r in default.values())
    # the original adapter's utility on the kept rows and the last kind's (RC) retrained adapter's forget rows
    lab = Lab(DemoArguments(model=str(tmp_path / "toy_model"), progress=False, **suite["lab"]))
    for adapter, rows_, figures in (
        ("original", data["eval_retain"], default["RC"]["field"]["original"]["retain"]),
        ("original", data["eval_holdout"], default["IR"]["field"]["original"]["held_out"]),
        ("retrain", data["eval_forget_RC"], default["RC"]["field"]["retrained"]),
    ):
        model = lab.load(tmp_path / adapter)
        expected = split_metrics(model, lab.task, rows_)
        lab.drop(model)
        if "loss" in figures:
            assert figures["loss"] == pytest.approx(expected["loss"], rel=1e-6)
            assert figures["exact_match"] == expected["exact_match"]
            assert figures["truth_ratio"] == pytest.approx(expected["truth_ratio"], rel=1e-6)
        else:
            assert figures["forget_truth_ratios"] == pytest.approx(expected["truth_ratios"], rel=1e-6)
    table = run.evaluation_table({"evaluation": rows})
    assert table.count("| IR |") == 4 and "forget quality (KS p, 8 forget rows)" in table
