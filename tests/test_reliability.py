"""Bad input, faults, audit trail, sequential requests, determinism, safety and publishing (CLI level)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard
from reference import ROWS_FOR_CLI as ROWS
from reference import token_rows, write_jsonl

from hf_unlearn import TrainingSet
from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME, adapter_digest, file_digest, training_data_record
from hf_unlearn.request import DigestKey, digest_key_path


def base_args(ws, request, out, *extra):
    return ["unlearn", "--model", ws["base"], "--adapter", ws["adapter"], "--train-file", ws["train"],
            "--request", request, "--output-dir", str(out), "--damping", "1.0", "--no_progress", *extra]  # fmt: skip


def no_output(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


BAD_REQUESTS = {
    "unknown id": ([{"op": "remove", "id": 99}], 2, "Unknown training row id 99"),
    "duplicate id": ([{"op": "remove", "id": 1}, {"op": "remove", "id": 1}], 2, "more than once"),
    "unknown op": ([{"op": "forget", "id": 1}], 2, "op 'forget'"),
    "no content": ([{"op": "replace", "id": 1}], 2, "no new content"),
    "empty": ([], 2, "empty"),
    "removes all": ([{"op": "remove", "id": i} for i in range(len(ROWS))], 2, "every training row"),
    "text without tokenizer": ([{"op": "replace", "id": 1, "prompt": "a", "response": "b"}], 3, "tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_exits_with_message_and_writes_nothing(workspace, tmp_path, case, capsys):
    lines, code, message = BAD_REQUESTS[case]
    request = write_jsonl(tmp_path / "request.jsonl", lines)
    out = tmp_path / "out"
    assert main(base_args(workspace, request, out)) == code
    assert message in capsys.readouterr().err
    assert no_output(out)


def test_bad_arguments_and_inputs(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    request = workspace["IR"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2], "labels": [-100, 2]}\n{not json\n')
    cases = [
        (base_args(workspace, request, out, "--damping", "-1"), 4, "damping"),
        (base_args(workspace, request, out, "--damping", "nan"), 4, "damping"),
        (base_args(workspace, request, out, "--dampening", "1"), 4, "unrecognized arguments: --dampening 1"),
        (base_args(workspace, request, out, "--tol", "abc"), 4, "invalid float value: 'abc'"),
        ([*base_args(workspace, request, out)[:2], "/nonexistent/base", *base_args(workspace, request, out)[3:]], 4, "not found"),
        ([a if a != workspace["adapter"] else str(tmp_path / "empty") for a in base_args(workspace, request, out)], 4, "not a PEFT adapter"),
        ([a if a != workspace["train"] else str(tmp_path / "bad.jsonl") for a in base_args(workspace, request, out)], 3, "line 2"),
    ]  # fmt: skip
    for argv, code, message in cases:
        assert main(argv) == code, message
        assert message in capsys.readouterr().err
        assert no_output(out)


def test_adapter_that_does_not_fit_the_base(workspace, tmp_path, capsys):
    bad = tmp_path / "bad_adapter"
    shutil.copytree(workspace["adapter"], bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in tensors.items()},
        bad / "adapter_model.safetensors",
    )
    out = tmp_path / "out"
    argv = [a if a != workspace["adapter"] else str(bad) for a in base_args(workspace, workspace["IR"], out)]
    assert main(argv) == 4
    assert "does not fit the base model" in capsys.readouterr().err
    assert no_output(out)


def test_existing_output_needs_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(base_args(workspace, workspace["IR"], out)) == 6
    err = capsys.readouterr().err
    # a directory with the user's own files is never replaced: the message says so instead of advising --overwrite
    assert "keep.txt" in err and "does not write" in err and "pass --overwrite" not in err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(base_args(workspace, workspace["IR"], out)) == 0
    assert main(base_args(workspace, workspace["IR"], out)) == 6  # an earlier output: --overwrite replaces it
    assert "pass --overwrite" in capsys.readouterr().err


def test_unconverged_solve_writes_nothing_unless_allowed(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    single = (
        "--refine-steps",
        "0",
        "--refine-damping",
        "fixed",
        "--max-iter",
        "1",
        "--tol",
        "1e-12",
    )  # one solve, held to --tol
    assert main(base_args(workspace, workspace["IR"], out, *single)) == 5
    assert "did not converge" in capsys.readouterr().err and no_output(out)
    assert main(base_args(workspace, workspace["IR"], out, *single, "--allow-inexact")) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["solver"]["inexact"] is True and manifest["solver"]["converged"] is False
    assert "Inexact result" in (out / "README.md").read_text()


def test_run_killed_part_way_leaves_nothing_at_the_output_path(workspace, tmp_path):
    out = tmp_path / "out"
    argv = base_args(
        workspace, workspace["IR"], out, "--tol", "1e-300", "--max-iter", "100000000", "--allow-inexact"
    )
    argv.remove("--no_progress")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_unlearn", *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    seen, deadline = b"", time.time() + 120
    while b"cg:" not in seen and time.time() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 256)
    assert b"cg:" in seen, seen[-500:]  # killed while solving
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


def test_interrupted_write_leaves_nothing(workspace, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    original = PeftModel.save_pretrained

    def save_then_die(self, directory, **kwargs):
        original(self, directory, **kwargs)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights, before the manifest

    monkeypatch.setattr(PeftModel, "save_pretrained", save_then_die)
    out = tmp_path / "out"
    assert main(base_args(workspace, workspace["IR"], out)) == 130  # a line saying so, not a traceback
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert no_output(out)


def test_manifest_is_an_audit_trail_without_content(workspace, tmp_path, monkeypatch):
    import hf_unlearn.io

    stats, build_manifest = {}, hf_unlearn.io.build_manifest

    def spy(result, *args, **kwargs):  # the run's figures, which the manifest leaves out
        stats.update(result.stats)
        return build_manifest(result, *args, **kwargs)

    monkeypatch.setattr(hf_unlearn.io, "build_manifest", spy)
    out = tmp_path / "out"
    assert main(base_args(workspace, workspace["IR"], out)) == 0
    text = (out / MANIFEST_NAME).read_text()
    manifest = json.loads(text)
    for row_id in (2, 8):  # the removed rows: their token ids never appear
        assert json.dumps(ROWS[row_id]["input_ids"]) not in text
        assert json.dumps(ROWS[row_id]["input_ids"]).replace(" ", "") not in text.replace(" ", "").replace(
            "\n", ""
        )
    assert manifest["request"]["kinds"] == {"IR": 2} and len(manifest["request"]["edits"]) == 2
    assert manifest["input_adapter"]["digest"] == adapter_digest(workspace["adapter"])
    key = DigestKey.load(digest_key_path(workspace["train"]))  # created beside the training file
    assert manifest["training_data"] == training_data_record(
        workspace["train"], TrainingSet.from_jsonl(workspace["train"]), key
    )
    assert manifest["training_data"]["digest_key_id"] == manifest["request"]["digest_key_id"] == key.id
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "accelerate", "hf_unlearn"}
    assert not set(manifest["solver"]) & {"forget_loss_before", "forget_loss_after", "b_norm"}
    # The run's forget-set figures (the success line's), against a float64 token loop: the cross-entropy
    # per loss token of the removed rows (ΣS/ΣT, as hf-unlearn evaluate) before and after, and its first-order
    # change ∇(ΣS/ΣT)·Δθ
    from peft import PeftModel
    from reference import loop_loss_sum
    from transformers import AutoModelForCausalLM

    def forget_loss(adapter):
        base = AutoModelForCausalLM.from_pretrained(workspace["base"], dtype=torch.float64)
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True).eval()
        sums = [loop_loss_sum(model, ROWS[i]) for i in (2, 8)]
        loss = sum(S for S, _ in sums) / sum(T for _, T in sums)
        params = [p for p in model.parameters() if p.requires_grad]
        return loss, params, torch.autograd.grad(loss, params)

    before, theta, grad = forget_loss(workspace["adapter"])
    after, theta_new, _ = forget_loss(out)
    delta_dot_grad = sum((new - old).detach().mul(g).sum() for old, new, g in zip(theta, theta_new, grad))
    s = stats
    assert s["forget_loss_before"] == pytest.approx(before.item(), rel=1e-5)
    assert s["forget_loss_after"] == pytest.approx(after.item(), rel=1e-4)
    assert s["forget_loss_change_predicted"] == pytest.approx(delta_dot_grad.item(), rel=1e-3)
    assert s["forget_loss_change_measured"] > 0 and s["forget_loss_change_predicted"] > 0  # removal raises it


def test_sequential_requests_are_checked_and_chained(workspace, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"r{i}", **row} for i, row in enumerate(ROWS)])
    first = write_jsonl(tmp_path / "first.jsonl", [{"op": "remove", "id": "r2"}])
    out1, out2 = tmp_path / "out1", tmp_path / "out2"

    def run(adapter, train_file, request, out):
        argv = base_args(workspace, request, out)
        argv[argv.index(workspace["adapter"])] = str(adapter)
        argv[argv.index(workspace["train"])] = train_file
        return main(argv)

    assert run(workspace["adapter"], train, first, out1) == 0
    # The training file must reflect the earlier removal ...
    again = write_jsonl(tmp_path / "again.jsonl", [{"op": "remove", "id": "r5"}])
    assert run(out1, train, again, out2) == 3
    assert "removed by an earlier unlearning run" in capsys.readouterr().err
    # ... and a removed row cannot be removed again.
    edited = write_jsonl(
        tmp_path / "edited.jsonl", [{"id": f"r{i}", **row} for i, row in enumerate(ROWS) if i != 2]
    )
    assert run(out1, edited, first, out2) == 2
    assert "already removed" in capsys.readouterr().err
    assert run(out1, edited, again, out2) == 0
    history = json.loads((out2 / MANIFEST_NAME).read_text())["history"]
    assert len(history) == 1 and history[0]["manifest_digest"] == file_digest(out1 / MANIFEST_NAME)
    assert history[0]["request"]["kinds"] == {"IR": 1}


def test_same_inputs_give_byte_identical_adapters(workspace, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(base_args(workspace, workspace["RC"], out, "--hessian-samples", "8", "--seed", "3")) == 0
    assert file_digest(outs[0] / "adapter_model.safetensors") == file_digest(
        outs[1] / "adapter_model.safetensors"
    )


def test_only_safetensors_are_loaded(workspace, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(workspace["adapter"], "adapter_config.json"), pickled)
    torch.save({}, pickled / "adapter_model.bin")
    argv = [
        a if a != workspace["adapter"] else str(pickled)
        for a in base_args(workspace, workspace["IR"], tmp_path / "o")
    ]
    assert main(argv) == 4
    assert "only safetensors" in capsys.readouterr().err


def test_hub_ready_card_and_push_dry_run(workspace, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main([*base_args(workspace, workspace["IR"], out), "--base-model-id", "my-org/tiny-llama"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "my-org/tiny-llama"
    assert {"unlearning", "hf-unlearn", "lora"} <= set(card.data.tags)
    assert "## Unlearning" in card.text and "2 IR" in card.text
    capsys.readouterr()
    assert main(["push", str(out), "--repo-id", "me/tiny-unlearned", "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME])
    assert main(["push", workspace["adapter"], "--repo-id", "me/x", "--dry-run"]) == 4

    # The upload itself (the Hub client replaced by a recorder): the same files, hidden ones left out
    import huggingface_hub

    (out / ".scratch").write_text("not for the Hub")
    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "https://hub/me/tiny-unlearned"

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    assert main(["push", str(out), "--repo-id", "me/tiny-unlearned", "--private"]) == 0
    assert calls[0] == ("create_repo", "me/tiny-unlearned", {"private": True, "exist_ok": True})
    upload = calls[1][1]
    assert upload["folder_path"] == str(out) and sorted(upload["allow_patterns"]) == listed


def test_top_level_usage_and_unknown_command(capsys):
    assert main([]) == 0 and main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"\n  {command} " in usage for command in ("unlearn", "train", "evaluate", "demo", "push"))
    assert main(["forget"]) == 2
    assert "unknown command 'forget'" in capsys.readouterr().err


def test_remote_code_is_not_run_unless_asked(workspace, tmp_path, capsys):
    """A base model directory that ships its own modelling code is refused without --trust-remote-code."""
    custom = tmp_path / "custom"
    shutil.copytree(workspace["base"], custom)
    marker = tmp_path / "code-ran"
    (custom / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "custom-llama"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (custom / "config.json").write_text(json.dumps(config))
    argv = [
        a if a != workspace["base"] else str(custom)
        for a in base_args(workspace, workspace["IR"], tmp_path / "out")
    ]
    assert main(argv) == 4
    assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists() and no_output(tmp_path / "out")


def test_push_dry_run_lists_the_files_of_a_relative_parent_path(workspace, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(base_args(workspace, workspace["IR"], out)) == 0
    (out / ".scratch").write_text("local only")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["push", "../out", "--repo-id", "me/x", "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME])


def test_card_and_evaluate_report_one_forget_loss_and_the_check_against_held_out_rows(
    workspace,
    tmp_path,
    capsys,
):
    out = tmp_path / "out"
    forget = write_jsonl(tmp_path / "forget.jsonl", [ROWS[2], ROWS[8]])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", token_rows(8, seed=99))
    assert main(base_args(workspace, workspace["IR"], out, "--held-out-file", held_out)) == 0
    line = capsys.readouterr().out
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    reports = {}
    for name, adapter in (("before", workspace["adapter"]), ("after", str(out))):
        report = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", workspace["base"], "--adapter", adapter, "--forget-file", forget,
                     "--test-file", held_out, "--output-file", str(report)]) == 0  # fmt: skip
        reports[name] = json.loads(report.read_text())["adapters"]["unlearned"]
    check, before, after = manifest["forget_check"], reports["before"]["forget"], reports["after"]["forget"]
    assert f"forget-set loss {before['loss']:.4g} → {after['loss']:.4g} per token" in line
    card = (out / "README.md").read_text()
    assert "per loss token" in card and check["summary"] in card
    assert f"{after['loss']:.4g}" not in card + json.dumps(manifest)  # it would test guesses of the rows
    # against what retraining would plausibly give: the held-out rows, as evaluate measures them
    assert check["reference"] == "held-out rows"
    assert check["reference_loss"] == pytest.approx(reports["after"]["test"]["loss"], rel=1e-5)
    assert check["membership_auc"] == pytest.approx(reports["after"]["membership_auc"])
    assert check["summary"] in line and "membership AUC" in line and "held-out rows" in card


def test_over_forgetting_is_named():
    from hf_unlearn.pipeline import judge_forgetting

    over = judge_forgetting(0.40, 3.92, "held-out rows", 1.1, auc=0.018)  # the trial's figures
    assert over["over_forgetting"] and "over-forgetting" in over["warning"] and "AUC 0.02" in over["warning"]
    assert judge_forgetting(0.40, 1.2, "held-out rows", 1.1, auc=0.45)["warning"] is None
    base = judge_forgetting(0.40, 3.92, "base model without the adapter", 2.5)
    assert base["over_forgetting"] and "base model" in base["warning"]
    assert not any(f in json.dumps(base) for f in ("0.4", "3.92", "2.5"))  # written beside the adapter
    assert not judge_forgetting(0.40, 2.4, "base model without the adapter", 2.5)["over_forgetting"]


def test_help_shows_dashed_flags_once_with_their_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert "--train-file" in text and "--train_file" not in text and "--no_progress" not in text
    assert "--capture-curvature" not in text and "capture_curvature" not in text  # training only
    flat = " ".join(text.split())
    assert "--no-progress Turn off --progress (show progress bars" in flat
    assert "(default: None)" not in flat
    for entry in flat.split(" --")[1:]:
        assert entry.count("default") - entry.count("defaults") <= 1 or "(default:" not in entry, entry
    # the underscore spellings still parse; a training-only flag is refused under unlearn
    paths = ["--model", "m", "--adapter", "a", "--train_file", "t", "--request", "r", "--output-dir", "o"]
    assert main(["unlearn", *paths, "--capture-curvature"]) == 4
    assert "unrecognized arguments: --capture-curvature" in capsys.readouterr().err


def test_every_command_prints_its_help(capsys):
    from hf_unlearn.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0 and "usage: hf-unlearn" in capsys.readouterr().out, command


def test_thread_count_is_chosen_by_the_load(monkeypatch):
    from hf_unlearn import cli

    chosen = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))  # a busy 2-core machine
    assert cli.choose_threads()["threads"] == 1 and chosen == [1]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # an idle one
    assert cli.choose_threads()["threads"] == 2 and chosen == [1, 2]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.choose_threads() == {"threads": 4, "rule": "OMP_NUM_THREADS"} and chosen == [1, 2]


def test_push_refuses_a_manifest_with_unkeyed_row_digests(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(base_args(workspace, workspace["IR"], out)) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["history"] = [
        {"request": {"edits": [{"id": 1, "kind": "IR", "old_digest": "sha256:" + "0" * 64}]}}
    ]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))  # as an older hf_unlearn wrote them
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 4
    assert "plain SHA-256" in capsys.readouterr().err


def test_prepare_help_lists_only_what_prepare_uses(capsys):
    """`hf-unlearn prepare` is one K-FAC pass over the training rows: no solver, damping or request flags."""
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--train-file", "--tokenizer", "--max-length", "--chat-template",
                 "--loss-normalization", "--curvature-samples", "--kfac-targets", "--batch-size", "--dtype",
                 "--seed"):  # fmt: skip
        assert flag in text, flag
    for flag in ("--solver", "--curvature ", "--damping", "--tol", "--max-iter", "--allow-inexact", "--refine-steps",
                 "--objective-estimate", "--preconditioner", "--lissa-scale", "--qp-lr", "--kept-loss-tolerance",
                 "--capture-curvature", "--curvature-factors", "--l2-regularization", "--nystrom-rank"):  # fmt: skip
        assert flag not in text, flag
    paths = ["--model", "m", "--adapter", "a", "--train-file", "t"]
    assert main(["prepare", *paths, "--solver", "lissa"]) == 4  # refused, not silently ignored
    assert "unrecognized arguments: --solver" in capsys.readouterr().err
