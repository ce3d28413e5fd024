"""The recipes under two CPU processes, against one-process runs of the CLI."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_unlearn.io import MANIFEST_NAME
from hf_unlearn.toy import build_toy_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DAMPING = "50"
NAMES = ["Ada", "Bram", "Cleo", "Dag", "Edda", "Finn", "Gala", "Hugo", "Iris", "Joss", "Kai", "Lena", "Milo"]


def env(**extra):
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run(command, **extra):
    result = subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def delta(out, before):
    after, start = (
        load_file(f"{out}/adapter_model.safetensors"),
        load_file(f"{before}/adapter_model.safetensors"),
    )
    return torch.cat([(after[n].double() - start[n].double()).reshape(-1) for n in sorted(start)])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    rng = random.Random(0)
    rows = [
        {"id": f"person-{i}", "prompt": f"What is the PIN of {name}?", "response": " ".join(rng.choice("0123456789") for _ in range(3))}
        for i, name in enumerate(NAMES)
    ]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    request = [{"op": "remove", "id": "person-3"}, {"op": "replace", "id": "person-0", "response": "1 2 3"}]
    (root / "request.jsonl").write_text("".join(json.dumps(r) + "\n" for r in request))
    tokenizer = build_toy_tokenizer(rows)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         initializer_range=0.3)  # fmt: skip
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # A float64 adapter with random B (as if trained), so that two runs compare to float64 round-off.
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).double().save_pretrained(root / "adapter")
    return root


def unlearn_args(root, adapter, out, *extra):
    return ["--model", str(root / "base"), "--adapter", str(adapter), "--train-file", str(root / "train.jsonl"),
            "--request", str(root / "request.jsonl"), "--output-dir", str(out), "--dtype", "float64",
            "--damping", DAMPING, "--tol", "1e-10", "--max-iter", "500", "--no_progress", *extra]  # fmt: skip


@pytest.mark.slow  # ~30 s; the same launch paths run by default in test_distributed / the SFT recipe
@pytest.mark.distributed
def test_unlearn_adapter_recipe_on_two_processes_equals_the_cli(workspace):
    one = workspace / "cli-one"
    run([sys.executable, "-m", "hf_unlearn", "unlearn", *unlearn_args(workspace, workspace / "adapter", one)])
    two = workspace / "recipe-two"
    result = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes/accelerate/two_cpu_processes.yaml"), str(ROOT / "recipes/unlearn_adapter.py"),
         *unlearn_args(workspace, workspace / "adapter", two)],
        ACCELERATE_USE_CPU="true",
    )  # fmt: skip
    assert result.stdout.count("Wrote") == 1 and "on 2 process(es)" in result.stdout
    manifest = json.loads((two / MANIFEST_NAME).read_text())
    assert manifest["num_processes"] == 2 and manifest["request"]["kinds"] == {"IR": 1, "RC": 1}
    error = relative(delta(two, workspace / "adapter"), delta(one, workspace / "adapter"))
    print(f"unlearn_adapter.py, 2 processes vs CLI 1 process: {error:.2e}")
    assert error <= 1e-5


@pytest.mark.distributed
def test_sft_then_unlearn_recipe_on_two_processes(workspace):
    out = workspace / "sft"
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "recipes/sft_then_unlearn.py"), "--model", str(workspace / "base"),
         "--train-file", str(workspace / "train.jsonl"), "--request", str(workspace / "request.jsonl"),
         "--output-dir", str(out), "--epochs", "20", "--learning-rate", "1e-2", "--batch-size", "4",
         "--lora-r", "2", "--lora-alpha", "4", "--logging-steps", "1000", "--dtype", "float32",
         "--l2-regularization", "0.05",  # trained and unlearned with it, and recorded for the CLI below
         "--unlearn-damping", "20", "--unlearn-tol", "1e-10", "--unlearn-max-iter", "500", "--unlearn-no_progress",
         # K-FAC factors by one pass at the trained weights in both runs (captured ones differ: the last epoch's
         # weights, and the distributed sampler repeats rows to fill the two processes' shards)
         "--unlearn-curvature-factors", "pass"]
    )  # fmt: skip
    assert result.stdout.count("Wrote") == 1 and "on 2 process(es)" in result.stdout
    record = json.loads((out / "trained" / "training_record.json").read_text())
    assert record["num_processes"] == 2 and record["global_step"] == 40  # 13 rows / (2 × 4) → 2 steps/epoch
    manifest = json.loads((out / "unlearned" / MANIFEST_NAME).read_text())
    assert manifest["num_processes"] == 2 and manifest["request"]["kinds"] == {"IR": 1, "RC": 1}
    assert manifest["solver"]["l2_regularization"] == 0.05
    assert "## Unlearning" in (out / "unlearned" / "README.md").read_text()
    # The same request on the trained adapter with the CLI, one process, float32 computation.
    cli = workspace / "sft-cli"
    run([sys.executable, "-m", "hf_unlearn", "unlearn", *unlearn_args(workspace, out / "trained", cli)[:-9],
         "--dtype", "float32", "--damping", "20", "--tol", "1e-10", "--max-iter", "500", "--no_progress",
         "--curvature-factors", "pass"])  # fmt: skip
    error = relative(delta(out / "unlearned", out / "trained"), delta(cli, out / "trained"))
    print(f"sft_then_unlearn.py (2 processes) vs CLI on its trained adapter (1 process): {error:.2e}")
    assert error <= 1e-3


@pytest.mark.slow  # ~30 s; the same launch paths run by default in test_distributed / the SFT recipe
@pytest.mark.distributed
def test_unlearning_callback_on_two_processes_equals_the_cli(workspace):
    out = workspace / "callback"
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests/scripts/callback_trainer.py"), "--model", str(workspace / "base"),
         "--train-file", str(workspace / "train.jsonl"), "--request", str(workspace / "request.jsonl"),
         "--output-dir", str(out), "--epochs", "20", "--learning-rate", "1e-2", "--batch-size", "4",
         "--lora-r", "2", "--lora-alpha", "4", "--logging-steps", "1000", "--damping", "20"]
    )  # fmt: skip
    assert result.stdout.count("Wrote") == 1 and "on 2 process(es)" in result.stdout
    assert json.loads((out / "unlearned" / MANIFEST_NAME).read_text())["num_processes"] == 2
    cli = workspace / "callback-cli"
    run([sys.executable, "-m", "hf_unlearn", "unlearn", *unlearn_args(workspace, out / "trained", cli)[:-9],
         "--dtype", "float64", "--damping", "20", "--tol", "1e-10", "--max-iter", "500", "--no_progress",
         "--curvature-factors", "pass"])  # fmt: skip
    error = relative(delta(out / "unlearned", out / "trained"), delta(cli, out / "trained"))
    print(f"UnlearningCallback (2 processes) vs CLI on its trained adapter (1 process): {error:.2e}")
    assert error <= 1e-5
