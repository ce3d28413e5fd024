"""`UnlearnTrainer` after a real `trainer.train()`, against the dense float64 reference."""

import copy
import json

import datasets
import pytest
import torch
from peft import PeftModel
from reference import (
    DenseReference,
    relative_error,
    single_step,
    tiny_llama,
    tiny_llama_base,
    token_rows,
    train_tokenizer,
)
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments

from hf_unlearn import (
    CausalLMTask,
    ConfigurationError,
    UnlearningRequest,
    UnlearnTrainer,
    unlearn,
)
from hf_unlearn.io import MANIFEST_NAME
from hf_unlearn.params import ParameterSpace

ROWS = token_rows(12, seed=0)
NEW = token_rows(2, seed=9)
_p = ROWS[6]["labels"].count(-100)
RC_ROW = {"input_ids": ROWS[6]["input_ids"][:_p] + [3, 4, 5], "labels": [-100] * _p + [3, 4, 5]}
REQUEST = UnlearningRequest(remove=[1, 10], replace={6: RC_ROW, 9: NEW[0]})
OLD, NEW_ROWS = [ROWS[i] for i in (1, 10, 6, 9)], [RC_ROW, NEW[0]]


class LogCapture(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def training_args(tmp_path, **kwargs):
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"), num_train_epochs=6, per_device_train_batch_size=4,
        learning_rate=2e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        disable_tqdm=True, logging_steps=1000, seed=0, use_cpu=True, **kwargs,
    )  # fmt: skip


def make_trainer(tmp_path, collator: str = "task", dtype=torch.float64, **unlearning):
    # An extra text column that the Trainer drops (remove_unused_columns) and the unlearning must drop too.
    dataset = datasets.Dataset.from_list([{**r, "note": f"row {i}"} for i, r in enumerate(ROWS)])
    if collator == "task":
        data_collator = CausalLMTask().collate
    else:
        tokenizer = train_tokenizer()
        data_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    capture = LogCapture()
    trainer = UnlearnTrainer(
        model=tiny_llama(seed=0, dtype=dtype),
        args=training_args(tmp_path),
        train_dataset=dataset,
        data_collator=data_collator,
        callbacks=[capture],
        unlearning_args=single_step(dtype="float64", progress=False, **unlearning),
    )
    trainer.capture = capture
    return trainer


def flat_delta(result, model):
    space = ParameterSpace(model)
    return space.flatten([result.delta[n].double() for n in space.names])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An UnlearnTrainer after `train()` (shuffled batches), and the exact update at its θ*."""
    trainer = make_trainer(tmp_path_factory.mktemp("trained"), "task")
    trainer.train()
    assert trainer.state.global_step == 18  # 6 epochs × 3 shuffled batches
    ref = DenseReference(copy.deepcopy(trainer.model).double(), "token")
    H = ref.edited_hessian(ROWS, OLD, NEW_ROWS)
    damping = max(0.0, -torch.linalg.eigvalsh(H)[0].item()) + 0.05
    return trainer, damping, ref.update(ROWS, OLD, NEW_ROWS, damping)


def unlearn_and_restore(trainer, **unlearning):
    trainer.unlearning_args = single_step(progress=False, **unlearning)
    space = ParameterSpace(trainer.model)
    before = space.vector().clone()
    result = trainer.unlearn(REQUEST)
    delta = flat_delta(result, trainer.model)
    applied = space.vector().double() - before.double()
    space.add_(before - space.vector())  # back to θ* for the next test
    return result, delta, applied


def test_unlearn_after_train_matches_dense_reference_and_unlearn(trained):
    trainer, damping, expected = trained
    theta_star = ParameterSpace(trainer.model).vector().clone()
    reference_copy = copy.deepcopy(trainer.model)
    direct = unlearn(
        reference_copy,
        ROWS,
        REQUEST,
        single_step(dtype="float64", damping=damping, tol=1e-12, progress=False),
    )
    result, delta, applied = unlearn_and_restore(trainer, dtype="float64", damping=damping, tol=1e-12)
    print(f"after train(): relative error vs dense {relative_error(delta, expected):.2e}")
    assert result.stats["converged"] and result.stats["num_train"] == len(ROWS)
    assert relative_error(delta, expected) < 1e-8  # row ids = dataset indices despite the shuffling
    assert relative_error(delta, flat_delta(direct, reference_copy)) < 1e-10
    assert relative_error(applied, expected) < 1e-8  # applied in place
    assert result.request.kind_counts() == {"IR": 2, "RC": 1, "QM+RC": 1}
    assert torch.equal(ParameterSpace(trainer.model).vector(), theta_star)


def test_trainer_data_collator_is_used(trained, tmp_path):
    """A collator the engine does not know (DataCollatorForSeq2Seq) gives the same update."""
    trainer, damping, expected = trained
    other = UnlearnTrainer(
        model=trainer.model,
        args=training_args(tmp_path),
        train_dataset=trainer.train_dataset,
        data_collator=DataCollatorForSeq2Seq(train_tokenizer(), padding=True, label_pad_token_id=-100),
    )
    _, delta, _ = unlearn_and_restore(other, dtype="float64", damping=damping, tol=1e-12)
    assert relative_error(delta, expected) < 1e-8


def test_float32_unlearn_matches_dense_reference(trained, tmp_path):
    trainer, damping, expected = trained
    model32 = copy.deepcopy(trainer.model).float()
    other = UnlearnTrainer(
        model=model32,
        args=training_args(tmp_path),
        train_dataset=trainer.train_dataset,
        data_collator=trainer.data_collator,
    )
    _, delta, _ = unlearn_and_restore(other, dtype="float32", damping=damping, tol=1e-6)
    error = relative_error(delta, expected)
    print(f"float32: relative error vs dense {error:.2e}")
    assert error < 1e-3
    assert all(p.dtype == torch.float32 for p in model32.parameters())


def test_save_model_writes_adapter_manifest_card_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, "task", damping=10.0)
    trainer.train()
    result = trainer.unlearn(REQUEST)
    logged = [log for log in trainer.capture.logs if "unlearning/delta_norm" in log]
    assert len(logged) == 1 and logged[0]["unlearning/delta_norm"] == pytest.approx(result.delta_norm)
    assert logged[0]["unlearning/converged"] == 1.0 and logged[0]["unlearning/num_edits"] == 4

    out = tmp_path / "unlearned"
    trainer.save_model(str(out))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["request"]["kinds"] == {"IR": 2, "RC": 1, "QM+RC": 1}
    assert manifest["num_processes"] == 1 and manifest["arguments"]["damping"] == 10.0
    assert manifest["trainer"]["global_step"] == 18
    assert '"input_ids"' not in (out / MANIFEST_NAME).read_text()
    assert (out / "README.md").read_text().count("## Unlearning") == 1
    saved = load_file(out / "adapter_model.safetensors")
    live = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(saved) == len(live)
    for name, tensor in saved.items():
        match = [
            p for n, p in live.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])
        ]
        assert len(match) == 1 and torch.equal(match[0].detach(), tensor)
    reloaded = PeftModel.from_pretrained(tiny_llama_base(seed=0), str(out))
    assert reloaded(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    with pytest.raises(ConfigurationError, match="already served"):  # the original rows are not R' any more
        trainer.unlearn(UnlearningRequest(remove=[0]))
    new_versions = {6: RC_ROW, 9: NEW[0]}
    edited = [{**new_versions.get(i, r), "note": ""} for i, r in enumerate(ROWS) if i not in (1, 10)]
    trainer.unlearn(UnlearningRequest(remove=[0]), train_dataset=datasets.Dataset.from_list(edited))
    # a second request: the card keeps one section
    trainer.save_model(str(out))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["request"]["num_edits"] == 1 and len(manifest["history"]) == 1
    assert manifest["history"][0]["request"]["kinds"] == {"IR": 2, "QM+RC": 1, "RC": 1}  # the first request
    assert (out / "README.md").read_text().count("## Unlearning") == 1


def test_save_model_without_unlearning_writes_no_manifest(tmp_path):
    trainer = make_trainer(tmp_path, "task")
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "plain" / MANIFEST_NAME).exists()


def test_hessian_curvature_under_fsdp_or_zero3_fails_early(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "task")
    before = ParameterSpace(trainer.model).vector().clone()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigurationError, match="FSDP"):
        trainer.unlearn(REQUEST)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigurationError, match="ZeRO-3"):
        unlearn(trainer.model, ROWS, REQUEST, single_step(progress=False))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # ZeRO-2 keeps whole parameters: allowed
    trainer.unlearning_args.damping = 10.0
    trainer.unlearn(UnlearningRequest(remove=[0]))
    assert not torch.equal(ParameterSpace(trainer.model).vector(), before)


def test_unlearn_without_train_dataset_is_a_clear_error(tmp_path):
    trainer = UnlearnTrainer(model=tiny_llama(seed=0), args=training_args(tmp_path))
    with pytest.raises(ConfigurationError, match="train_dataset"):
        trainer.unlearn(REQUEST)


def test_l2_regularization_trains_and_unlearns_the_same_objective(trained, tmp_path):
    from hf_unlearn import L2RegularizationCallback

    plain, _, _ = trained
    trainer = make_trainer(tmp_path, "task", l2_regularization=0.5, damping=0.1)
    assert any(isinstance(c, L2RegularizationCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()  # same seed, data and recipe as `trained`, plus (μ/2)‖θ‖² in the objective
    norm = ParameterSpace(trainer.model).vector().norm()
    assert norm < 0.9 * ParameterSpace(plain.model).vector().norm()
    # the step solves with the Hessian of R' plus μI (the objective trained) on top of λ: the dense reference
    ref = DenseReference(copy.deepcopy(trainer.model).double(), "token")
    expected = ref.update(ROWS, OLD, NEW_ROWS, 0.1, mu=0.5)
    without_mu = ref.update(ROWS, OLD, NEW_ROWS, 0.1)
    trainer.unlearning_args = single_step(
        dtype="float64", l2_regularization=0.5, damping=0.1, tol=1e-10, max_iter=500, progress=False
    )
    result = trainer.unlearn(REQUEST)
    assert result.stats["l2_regularization"] == 0.5 and result.stats["converged"]
    assert relative_error(flat_delta(result, trainer.model), expected) < 1e-8
    assert relative_error(without_mu, expected) > 1e-2  # μ matters here: the check above can fail


def test_unlearn_hands_the_nystrom_sketch_on_to_the_next_request(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    trainer.unlearning_args = single_step(
        dtype="float64",
        curvature="ggn",
        damping=0.1,
        preconditioner="nystrom",
        nystrom_rank=8,
        progress=False,
    )
    first = trainer.unlearn(UnlearningRequest(remove=[1]))
    edited = trainer.train_dataset.select([i for i in range(len(ROWS)) if i != 1])
    second = trainer.unlearn(UnlearningRequest(remove=[2]), train_dataset=edited)
    made, reused = first.stats["nystrom_sketch"], second.stats["nystrom_sketch"]
    assert made["origin"] == "pass" and made["products_in_unlearning"] == 8
    assert reused["origin"] == "given" and reused["products_in_unlearning"] == 0
    assert reused["downdates"] == 2 and second.stats["converged"]
