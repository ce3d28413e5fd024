"""`hf-unlearn train`: a LoRA adapter trained with the HF Trainer on the rows `hf-unlearn unlearn` reads."""

import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_unlearn import CausalLMTask, ExampleEncoder
from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME
from hf_unlearn.toy import build_toy_tokenizer
from hf_unlearn.training import TRAINING_RECORD

NAMES = ["Ada", "Bram", "Cleo", "Dag", "Edda", "Finn", "Gala", "Hugo", "Iris", "Joss", "Kai", "Lena"]


def text_rows():
    rng = random.Random(0)
    return [
        {"id": f"p{i}", "prompt": f"What is the PIN of {name}?", "response": " ".join(rng.choice("0123456789") for _ in range(3))}
        for i, name in enumerate(NAMES)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rows = text_rows()
    tokenizer = build_toy_tokenizer(rows)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         initializer_range=0.3)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def mean_loss(model, task, rows):
    with torch.no_grad():
        S, T = task.loss_sums(model.eval(), task.collate(rows))
    return (S.sum() / T.sum()).item()


def test_train_writes_an_adapter_that_unlearn_reads(workspace):
    out = workspace / "adapter"
    args = ["train", "--model", str(workspace / "base"), "--train-file", str(workspace / "train.jsonl"),
            "--output-dir", str(out), "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj",
            "--epochs", "60", "--learning-rate", "1e-2", "--batch-size", "6", "--seed", "0", "--logging-steps", "1000"]  # fmt: skip
    assert main(args) == 0
    assert {"adapter_model.safetensors", "adapter_config.json", TRAINING_RECORD, "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    # no staging leftovers; the digest key of the training record stays beside the training file
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".")] == [".hf_unlearn_key"]
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["global_step"] == 120 and record["num_processes"] == 1
    assert record["config"]["lora_r"] == 4 and record["loss_normalization"] == "token"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    rows = [{k: r[k] for k in ("prompt", "response")} for r in text_rows()]
    tokenizer = AutoTokenizer.from_pretrained(out)
    task = CausalLMTask(ExampleEncoder(tokenizer), pad_token_id=tokenizer.pad_token_id)
    base = LlamaForCausalLM.from_pretrained(workspace / "base")
    before = mean_loss(base, task, rows)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(workspace / "base"), out)
    after = mean_loss(model, task, rows)
    print(f"training loss per token: base {before:.3f}, adapter {after:.3f}")
    assert after < 0.25 * before  # it learned the rows
    # The Trainer's loss (HF shift + num_items_in_batch) on the task's batches is the "token" objective.
    batch = task.collate(rows)
    with torch.no_grad():
        hf_loss = model(**batch).loss.item()
    assert hf_loss == pytest.approx(after, rel=1e-5)

    request = workspace / "request.jsonl"
    request.write_text(json.dumps({"op": "remove", "id": "p3"}) + "\n")
    unlearned = workspace / "unlearned"
    assert main(["unlearn", "--model", str(workspace / "base"), "--adapter", str(out), "--train-file",
                 str(workspace / "train.jsonl"), "--request", str(request), "--output-dir", str(unlearned),
                 "--damping", "10", "--max-iter", "500", "--no_progress"]) == 0  # fmt: skip
    assert json.loads((unlearned / MANIFEST_NAME).read_text())["request"]["kinds"] == {"IR": 1}


def test_train_argument_and_data_errors(workspace, tmp_path, capsys):
    common = ["--model", str(workspace / "base"), "--output-dir", str(tmp_path / "o")]
    assert main(["train", *common, "--train-file", str(tmp_path / "missing.jsonl")]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *common, "--train-file", str(workspace / "train.jsonl"), "--lora-r", "0"]) == 4
    assert "lora_r" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What", "text": "no response"}) + "\n")
    assert main(["train", *common, "--train-file", str(bad)]) == 3
    assert "prompt'+'response" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    assert main(["train", *common, "--train-file", str(workspace / "train.jsonl")]) == 6
    (tmp_path / "o" / "train.jsonl").write_text((workspace / "train.jsonl").read_text())
    args = ["train", *common, "--train-file", str(tmp_path / "o" / "train.jsonl"), "--overwrite"]
    assert main(args) == 4  # --overwrite would delete the training file with the directory
    assert "overlaps --train-file" in capsys.readouterr().err
    assert (tmp_path / "o" / "train.jsonl").exists()


def test_l2_regularization_callback_adds_mu_theta_to_the_gradient():
    from hf_unlearn import ConfigurationError, L2RegularizationCallback

    model = torch.nn.Linear(3, 2).double()
    model.bias.requires_grad_(False)
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    data_grad = model.weight.grad.clone()
    L2RegularizationCallback(0.3).on_pre_optimizer_step(None, None, None, model=model)
    assert torch.allclose(model.weight.grad, data_grad + 0.3 * model.weight.detach())  # ∇[(μ/2)‖θ‖²] = μθ
    assert model.bias.grad is None  # frozen parameters are not regularised
    with pytest.raises(ConfigurationError, match="l2_regularization"):
        L2RegularizationCallback(-1.0)
    # under DeepSpeed the engine steps inside backward(), before μθ could be added: refused, clipping or not
    from types import SimpleNamespace

    for clip in (0.0, 1.0):
        args = SimpleNamespace(deepspeed="ds.json", fsdp="", max_grad_norm=clip)
        with pytest.raises(ConfigurationError, match="DeepSpeed"):
            L2RegularizationCallback(0.1).on_train_begin(args, None, None)
    L2RegularizationCallback(0.0).on_train_begin(args, None, None)  # no term: nothing to refuse


class _LeastSquares(torch.nn.Module):
    """R(θ) = mean of (xᵀθ − y)²: a model the Trainer can fit, returning its loss."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, y):
        return {"loss": ((x @ self.theta - y) ** 2).mean()}


def test_l2_regularization_callback_trains_to_the_regularised_minimum_when_clipping_binds(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_unlearn import L2RegularizationCallback

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen), 3 * torch.randn(16, generator=gen)
    rows = [{"x": x[i], "y": y[i]} for i in range(16)]
    mu, clip = 1.0, 0.1  # at the minimum ‖∇R‖ = μ‖θ‖ ≫ 0.1: clipping ∇R alone would stop training early
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=400, learning_rate=0.2,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=clip, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_strategy="no", remove_unused_columns=False, use_cpu=True,
    )  # fmt: skip
    model = _LeastSquares()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[L2RegularizationCallback(mu)]).train()
    assert args.max_grad_norm == clip  # restored after training

    theta = model.theta.detach().double()
    x, y = x.double(), y.double()
    exact = torch.linalg.solve(2 * x.T @ x / 16 + mu * torch.eye(4, dtype=torch.float64), 2 * x.T @ y / 16)
    assert mu * exact.norm() > 5 * clip
    assert torch.allclose(theta, exact, rtol=1e-4, atol=1e-5)  # argmin R + (μ/2)‖θ‖²


def test_train_with_l2_regularization_records_it_and_unlearn_uses_it(workspace, capsys):
    out = workspace / "adapter_l2"
    args = ["train", "--model", str(workspace / "base"), "--train-file", str(workspace / "train.jsonl"),
            "--lora-r", "4", "--lora-alpha", "8", "--epochs", "60", "--learning-rate", "1e-2", "--batch-size", "6",
            "--logging-steps", "1000"]  # fmt: skip
    assert main([*args, "--output-dir", str(out), "--l2-regularization", "0.05"]) == 0
    assert main([*args, "--output-dir", str(workspace / "adapter_no_l2")]) == 0  # the same recipe without it
    assert json.loads((out / TRAINING_RECORD).read_text())["config"]["l2_regularization"] == 0.05
    from safetensors.torch import load_file

    def norm(path):
        return (
            sum(t.double().norm() ** 2 for t in load_file(path / "adapter_model.safetensors").values()) ** 0.5
        )

    assert norm(out) < 0.9 * norm(workspace / "adapter_no_l2")
    request = workspace / "request_l2.jsonl"
    request.write_text(json.dumps({"op": "remove", "id": "p3"}) + "\n")
    unlearned = workspace / "unlearned_l2"
    assert main(["unlearn", "--model", str(workspace / "base"), "--adapter", str(out), "--train-file",
                 str(workspace / "train.jsonl"), "--request", str(request), "--output-dir", str(unlearned),
                 "--curvature", "ggn", "--damping", "0.1", "--max-iter", "500", "--no_progress"]) == 0  # fmt: skip
    manifest = json.loads((unlearned / MANIFEST_NAME).read_text())
    assert (
        manifest["arguments"]["l2_regularization"] == 0.05 and manifest["solver"]["l2_regularization"] == 0.05
    )
    from hf_unlearn.io import recorded_objective

    assert recorded_objective(unlearned)["l2_regularization"] == 0.05  # a later request keeps μ
    # another loss than the recorded one (encoding, normalisation) is refused before anything is loaded
    again = ["unlearn", "--model", str(workspace / "base"), "--train-file", str(workspace / "train.jsonl"),
             "--request", str(request), "--output-dir", str(workspace / "refused")]  # fmt: skip
    for adapter, flags, recorded in (
        (out, ["--max-length", "64"], "'max_length': None"),
        (unlearned, ["--loss-normalization", "example"], "'loss_normalization': 'token'"),
    ):
        assert main([*again, "--adapter", str(adapter), *flags]) == 4
        assert recorded in capsys.readouterr().err
    assert not (workspace / "refused").exists()
