"""`UnlearningCallback` in a plain `transformers.Trainer` and in TRL's `SFTTrainer`, against the dense
float64 reference at the trained θ*."""

import json

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel
from reference import (
    LORA,
    DenseReference,
    Snapshot,
    common_args,
    relative_error,
    single_step,
    tiny_llama,
    tiny_llama_base,
    token_rows,
    train_tokenizer,
)
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_unlearn import (
    CausalLMTask,
    ConfigurationError,
    UnlearningCallback,
    UnlearningRequest,
)
from hf_unlearn.io import MANIFEST_NAME
from hf_unlearn.params import ParameterSpace

ROWS = token_rows(12, seed=0)
_p = ROWS[6]["labels"].count(-100)
RC_ROW = {"input_ids": ROWS[6]["input_ids"][:_p] + [3, 4, 5], "labels": [-100] * _p + [3, 4, 5]}


def saved_delta(out, snapshot_model):
    """The written adapter minus θ*, in the order of `ParameterSpace`."""
    tensors = load_file(f"{out}/adapter_model.safetensors")
    space = ParameterSpace(snapshot_model)
    saved = [tensors[n.replace(".default", "")].double().reshape(-1) for n in space.names]
    return torch.cat(saved) - space.vector()


def test_callback_in_plain_trainer_matches_dense_reference(tmp_path):
    request = UnlearningRequest(remove=[1, 10], replace={6: RC_ROW})
    # The damping has to be known before training; a value that makes H + λI positive definite here.
    damping = 10.0
    out = tmp_path / "unlearned"
    snapshot = Snapshot(tmp_path / "theta_star")
    callback = UnlearningCallback(
        request, single_step(damping=damping, tol=1e-7, progress=False), output_dir=str(out)
    )
    trainer = Trainer(
        model=tiny_llama(seed=0, dtype=torch.float32),
        args=TrainingArguments(num_train_epochs=6, **common_args(tmp_path)),
        train_dataset=datasets.Dataset.from_list([{**r, "note": str(i)} for i, r in enumerate(ROWS)]),
        data_collator=CausalLMTask().collate,
        callbacks=[snapshot, callback],
    )
    trainer.train()
    theta_star = snapshot.model(tiny_llama_base(seed=0))
    ref = DenseReference(theta_star, "token")
    old = [ROWS[i] for i in (1, 10, 6)]
    assert torch.linalg.eigvalsh(ref.edited_hessian(ROWS, old, [RC_ROW]))[0].item() + damping > 0
    expected = ref.update(ROWS, old, [RC_ROW], damping)
    error = relative_error(saved_delta(out, theta_star), expected)
    print(f"Trainer + callback (float32): relative error vs dense {error:.2e}")
    assert error < 1e-3
    # The live adapter was edited in place; the manifest, card and the stats in the log history are there.
    live = ParameterSpace(trainer.model).vector().double()
    assert relative_error(live - ParameterSpace(theta_star).vector(), expected) < 1e-3
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["request"]["kinds"] == {"IR": 2, "RC": 1} and manifest["num_processes"] == 1
    assert "## Unlearning" in (out / "README.md").read_text()
    assert trainer.state.log_history[-1]["unlearning/num_edits"] == 3
    assert callback.result.stats["converged"]
    reloaded = PeftModel.from_pretrained(tiny_llama_base(seed=0, dtype=torch.float32), str(out))
    assert reloaded(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_callback_in_trl_sft_trainer_matches_dense_reference(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = train_tokenizer()
    base = tiny_llama_base(seed=1, dtype=torch.float32, vocab_size=len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    data = datasets.Dataset.from_list(
        [{"prompt": f"What is {i}?", "completion": f" It is {i * 7}."} for i in range(8)]
    )
    out = tmp_path / "unlearned"
    snapshot = Snapshot(tmp_path / "theta_star")
    callback = UnlearningCallback(
        UnlearningRequest(remove=[2, 5]),
        single_step(damping=5.0, tol=1e-10, dtype="float64", progress=False),
        output_dir=str(out),
    )
    trainer = trl.SFTTrainer(
        model=base,
        args=trl.SFTConfig(num_train_epochs=4, max_length=64, **common_args(tmp_path)),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.0}),
        callbacks=[snapshot, callback],
    )
    trainer.train()
    # The rows SFTTrainer trained on: its tokenised dataset, loss on the completion only.
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    assert len(rows) == 8 and rows[0]["labels"][0] == -100
    theta_star = snapshot.model(tiny_llama_base(seed=1, vocab_size=len(tokenizer)))
    ref = DenseReference(theta_star, "token")
    old = [rows[2], rows[5]]
    assert torch.linalg.eigvalsh(ref.edited_hessian(rows, old, []))[0].item() + 5.0 > 0
    expected = ref.update(rows, old, [], 5.0)
    space = ParameterSpace(theta_star)
    delta = space.flatten([callback.result.delta[n].double() for n in space.names])
    error = relative_error(delta, expected)
    print(f"SFTTrainer + callback (float64 computation): relative error vs dense {error:.2e}")
    assert error < 1e-8
    # The written adapter is float32: θ* + Δ rounded, so Δ is recovered to float32 round-off of θ only.
    assert relative_error(saved_delta(out, theta_star), expected) < 1e-3
    assert json.loads((out / MANIFEST_NAME).read_text())["request"]["kinds"] == {"IR": 2}


def test_callback_refuses_packing_and_existing_output_before_training(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    callback = UnlearningCallback(UnlearningRequest(remove=[0]), output_dir=str(tmp_path / "taken"))
    trainer = Trainer(
        model=tiny_llama(seed=0, dtype=torch.float32),
        args=TrainingArguments(max_steps=1, **common_args(tmp_path)),
        train_dataset=ROWS,
        data_collator=CausalLMTask().collate,
        callbacks=[callback],
    )
    before = ParameterSpace(trainer.model).vector().clone()
    with pytest.raises(Exception, match=r"does not write \(file\).*overwrite=True"):
        trainer.train()
    assert torch.equal(ParameterSpace(trainer.model).vector(), before)  # no training step was taken

    class Packed:
        packing = True

    with pytest.raises(ConfigurationError, match="packing"):
        UnlearningCallback(UnlearningRequest(remove=[0])).on_train_begin(Packed(), None, None, model=None)


def test_callback_trains_the_objectives_l2_term():
    callback = UnlearningCallback(UnlearningRequest(remove=[0]), single_step(l2_regularization=0.3))
    model = torch.nn.Linear(3, 2).double()
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    data_grad = model.weight.grad.clone()
    callback.on_pre_optimizer_step(None, None, None, model=model)
    assert torch.allclose(model.weight.grad, data_grad + 0.3 * model.weight.detach())


def test_callback_clips_the_regularised_gradient_itself_during_training(tmp_path):
    """As `L2RegularizationCallback`: the Trainer's clipping is off while training runs (the callback clips
    ∇R + μθ to max_grad_norm instead) and is given back before the unlearning step."""
    from transformers import TrainerCallback

    seen, norms = [], []

    class Probe(TrainerCallback):  # runs after UnlearningCallback: sees the gradient the optimiser steps with
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        def on_step_end(self, args, state, control, **kwargs):
            seen.append(args.max_grad_norm)

    callback = UnlearningCallback(
        UnlearningRequest(remove=[0]), single_step(l2_regularization=0.3, damping=1.0, progress=False)
    )
    args = TrainingArguments(max_steps=2, max_grad_norm=1e-3, **common_args(tmp_path))  # binds at every step
    Trainer(
        model=tiny_llama(seed=0, dtype=torch.float32),
        args=args,
        train_dataset=ROWS,
        data_collator=CausalLMTask().collate,
        callbacks=[callback, Probe()],
    ).train()
    assert seen == [0.0, 0.0] and args.max_grad_norm == 1e-3
    assert norms == pytest.approx([1e-3, 1e-3], rel=1e-5)  # ∇R + μθ clipped to max_grad_norm by the callback
    assert callback.result is not None and callback.result.stats["l2_regularization"] == 0.3


@pytest.mark.parametrize("where", ["processing_class", "collator"])
def test_callback_writes_the_tokenizer_beside_the_unlearned_adapter(tmp_path, where):
    """As `hf-unlearn unlearn` keeps the input adapter's tokenizer files and `UnlearnTrainer.save_model` writes the
    Trainer's: the callback's output directory holds the tokenizer the Trainer trained with (its processing
    class, else its collator's), loadable as is."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from hf_unlearn.io import foreign_files

    tok = train_tokenizer()
    out = tmp_path / "unlearned"
    callback = UnlearningCallback(
        UnlearningRequest(remove=[1]), single_step(damping=5.0, progress=False), output_dir=str(out)
    )
    base = tiny_llama_base(seed=0, dtype=torch.float32, vocab_size=len(tok))
    from peft import get_peft_model

    Trainer(
        model=get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False)),
        args=TrainingArguments(max_steps=1, **common_args(tmp_path)),
        train_dataset=ROWS,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[callback],
        **({"processing_class": tok} if where == "processing_class" else {}),
    ).train()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded("What is 3?")["input_ids"] == tok("What is 3?")["input_ids"]
    assert reloaded.eos_token == tok.eos_token and reloaded.pad_token == tok.pad_token
    assert foreign_files(out) == []  # --overwrite (overwrite=True) may replace this output again
