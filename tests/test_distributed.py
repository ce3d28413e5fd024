"""Exact data-parallel unlearning (docs/method.md §4): two gloo CPU processes give the one-process result.

The CLI runs under `torchrun --standalone --nproc_per_node 2` and under
`accelerate launch --multi_gpu --num_processes 2` with `ACCELERATE_USE_CPU=true`, in float64, on a tiny
Llama + LoRA adapter saved to disk.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import LORA, fit, relative_error, tiny_llama_base, token_rows, write_jsonl
from safetensors.torch import load_file

from hf_unlearn import CausalLMTask
from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
ROWS = token_rows(15, seed=7)
REQUEST = [
    {"op": "remove", "id": 2},
    {"op": "remove", "id": 8},
    {
        "op": "replace",
        "id": 5,
        "input_ids": ROWS[5]["input_ids"][:2] + [4, 5, 6],
        "labels": [-100, -100, 4, 5, 6],
    },
]


def subprocess_env(**extra):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base = tiny_llama_base(seed=3, dtype=torch.float32, exact=False)
    base.save_pretrained(root / "base")
    model = fit(get_peft_model(base, LoraConfig(**LORA)), CausalLMTask(), ROWS, steps=40)
    model.double().save_pretrained(
        root / "adapter"
    )  # float64 adapter: the comparison is not capped by float32
    return {
        "root": root,
        "args": ["unlearn", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--train-file", write_jsonl(root / "train.jsonl", ROWS),
                 "--request", write_jsonl(root / "request.jsonl", REQUEST),
                 "--dtype", "float64", "--damping", "1.0", "--tol", "1e-10", "--max-iter", "500",
                 "--batch-size", "4", "--no_progress"],
    }  # fmt: skip


def adapter_delta(out, adapter):
    after, before = (
        load_file(f"{out}/adapter_model.safetensors"),
        load_file(f"{adapter}/adapter_model.safetensors"),
    )
    return torch.cat([(after[n] - before[n]).reshape(-1) for n in sorted(before)])


def run_cli(launcher, workspace, out, **env):
    return subprocess.run(
        [*launcher, "hf_unlearn", *workspace["args"], "--output-dir", str(out)],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def one_process(workspace):
    out = workspace["root"] / "one"
    assert main([*workspace["args"], "--output-dir", str(out)]) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["num_processes"] == 1
    return adapter_delta(out, workspace["root"] / "adapter")


LAUNCHERS = {
    "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"], {}),
    "accelerate": (
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531", "-m"],
        {"ACCELERATE_USE_CPU": "true"},
    ),
}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_equal_one_process(workspace, one_process, launcher):
    command, env = LAUNCHERS[launcher]
    out = workspace["root"] / f"two-{launcher}"
    run = run_cli(command, workspace, out, **env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Wrote") == 1  # only the main process writes
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["num_processes"] == 2 and manifest["solver"]["converged"]
    assert manifest["request"]["kinds"] == {"IR": 2, "QM+RC": 1}
    error = relative_error(adapter_delta(out, workspace["root"] / "adapter"), one_process)
    print(f"{launcher}, 2 processes vs 1: relative difference {error:.2e}")
    assert error <= 1e-5
    assert not [p for p in workspace["root"].iterdir() if ".partial-" in p.name]  # no leftovers


def test_hessian_under_fsdp_or_zero3_launch_fails_early(workspace, monkeypatch, capsys):
    out = workspace["root"] / "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main([*workspace["args"], "--curvature", "hessian", "--output-dir", str(out)]) == 4
    assert "FSDP" in capsys.readouterr().err and not out.exists()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert main([*workspace["args"], "--curvature", "hessian", "--output-dir", str(out)]) == 4
    assert "ZeRO-3" in capsys.readouterr().err and not out.exists()
