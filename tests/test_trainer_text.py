"""Text replacements of tokenised training rows in the Trainer paths (`UnlearnTrainer`, `UnlearningCallback` in a
plain `Trainer` and in TRL's `SFTTrainer`), request checks before the first training step, and row ids."""

import copy

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import (
    LORA,
    DenseReference,
    Snapshot,
    common_args,
    relative_error,
    single_step,
    tiny_llama_base,
    train_tokenizer,
)
from tokenizers import decoders
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from hf_unlearn import (
    InvalidRequestError,
    UnlearningCallback,
    UnlearningRequest,
    UnlearnTrainer,
)
from hf_unlearn.data import TextEncoding
from hf_unlearn.params import ParameterSpace
from hf_unlearn.trainer import CollatorTask, SFTTextEncoder, text_replacement


def tokenizer():
    tok = train_tokenizer()
    tok.backend_tokenizer.decoder = decoders.ByteLevel()  # decode gives the text back
    return tok


def qa(i):
    return {"id": f"r{i}", "prompt": f"What is {i}?", "response": f" It is {i * 7}."}


def encode(tok, prompt, response):
    """The user's own tokenising function (a `dataset.map`): prompt, response, EOS; loss on every token."""
    ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def lora_model(tok, seed=0, dtype=torch.float64):
    base = tiny_llama_base(seed=seed, dtype=dtype, vocab_size=len(tok))
    base.config.pad_token_id = tok.pad_token_id
    return get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False)).to(dtype)


def lm_row(tok, prompt, response):
    """A row as the language-modelling collator trains it: loss on every token."""
    ids = encode(tok, prompt, response)["input_ids"]
    return {"input_ids": ids, "labels": list(ids)}


def flat(result, model):
    space = ParameterSpace(model)
    return space.flatten([result.delta[n].double() for n in space.names])


def test_unlearn_trainer_with_lm_collator_takes_text_replacements_by_id(tmp_path):
    """A tokenised dataset that keeps its text and an "id" column, trained with DataCollatorForLanguageModeling:
    a response-only and a full text replacement are encoded like the rows, ids are the "id" column, and the
    update is the dense reference's for exactly those token rows."""
    tok = tokenizer()
    texts = [qa(i) for i in range(10)]
    dataset = datasets.Dataset.from_list([{**t, **encode(tok, t["prompt"], t["response"])} for t in texts])
    trainer = UnlearnTrainer(
        model=lora_model(tok),
        args=TrainingArguments(num_train_epochs=3, **common_args(tmp_path)),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        unlearning_args=single_step(dtype="float64", damping=5.0, tol=1e-12, progress=False),
    )
    trainer.train()
    request = UnlearningRequest(
        remove=["r1"],
        replace={"r3": {"response": " It is 99."}, "r5": {"prompt": "What is five?", "response": " Five."}},
    )
    theta_star = copy.deepcopy(trainer.model)
    result = trainer.unlearn(request)
    assert [e.index for e in result.request.edits] == [1, 3, 5]
    new = {e.index: e.new for e in result.request.edits if e.new is not None}
    assert new[3]["input_ids"] == encode(tok, "What is 3?", " It is 99.")["input_ids"]
    assert new[5]["input_ids"] == encode(tok, "What is five?", " Five.")["input_ids"]
    assert set(new[3]) == {"input_ids", "attention_mask"}  # the layout the collator trains on
    rows = [lm_row(tok, t["prompt"], t["response"]) for t in texts]
    old = [rows[1], rows[3], rows[5]]
    edited = [lm_row(tok, "What is 3?", " It is 99."), lm_row(tok, "What is five?", " Five.")]
    expected = DenseReference(theta_star.double(), "token").update(rows, old, edited, 5.0)
    assert relative_error(flat(result, trainer.model), expected) < 1e-8


def test_callback_in_plain_trainer_replaces_the_response_of_a_prompt_masked_row(tmp_path):
    """Tokens only in the loader (labels -100 on the prompt, DataCollatorForSeq2Seq): a response-only text
    replacement keeps the prompt's tokens and encodes the response as the rows were."""
    tok = tokenizer()
    texts = [qa(i) for i in range(8)]

    def masked(t):
        prompt = tok(t["prompt"])["input_ids"]
        response = tok(t["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}

    rows = [masked(t) for t in texts]
    callback = UnlearningCallback(
        UnlearningRequest(replace={2: {"response": " It is 0."}, 6: {"prompt": "Six?", "response": " Six."}}),
        single_step(dtype="float64", damping=5.0, tol=1e-12, progress=False),
    )
    trainer = Trainer(
        model=lora_model(tok),
        args=TrainingArguments(num_train_epochs=2, **common_args(tmp_path)),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        processing_class=tok,
        callbacks=[callback],
    )
    theta = ParameterSpace(trainer.model).vector().clone()
    trainer.train()
    assert not torch.equal(ParameterSpace(trainer.model).vector(), theta)
    new = [e.new for e in callback.result.request.edits]
    assert new[0] == masked({"prompt": "What is 2?", "response": " It is 0."})
    assert new[1] == masked({"prompt": "Six?", "response": " Six."})
    assert callback.result.request.kind_counts() == {"RC": 1, "QM+RC": 1}


def test_callback_in_sft_trainer_encodes_text_replacements_as_sft_trainer_does(tmp_path):
    trl = pytest.importorskip("trl")
    tok = tokenizer()
    data = [{"prompt": f"What is {i}?", "completion": f" It is {i * 7}."} for i in range(8)]
    callback = UnlearningCallback(
        UnlearningRequest(
            remove=[1],
            replace={3: {"response": " It is 99."}, 5: {"prompt": "What is five?", "completion": " Five."}},
        ),
        single_step(damping=5.0, tol=1e-10, dtype="float64", progress=False),
    )
    sft_args = trl.SFTConfig(num_train_epochs=2, max_length=64, **common_args(tmp_path))
    trainer = trl.SFTTrainer(
        model=tiny_llama_base(seed=1, dtype=torch.float32, vocab_size=len(tok)),
        args=sft_args,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tok,
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.0}),
        callbacks=[callback],
    )
    snapshot = Snapshot(tmp_path / "theta_star")  # θ*, saved before the unlearning callback edits it
    trainer.callback_handler.callbacks.insert(0, snapshot)
    trainer.train()
    theta_star = snapshot.model(tiny_llama_base(seed=1, vocab_size=len(tok)))
    # what SFTTrainer itself makes of the edited rows
    reference = trl.SFTTrainer(
        model=tiny_llama_base(seed=1, dtype=torch.float32, vocab_size=len(tok)),
        args=sft_args,
        train_dataset=datasets.Dataset.from_list(
            [
                {"prompt": "What is 3?", "completion": " It is 99."},
                {"prompt": "What is five?", "completion": " Five."},
            ]
        ),
        processing_class=tok,
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.0}),
    )
    expected_new = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in reference.train_dataset]
    got = [e.new for e in callback.result.request.edits if e.new is not None]
    assert [{"input_ids": g["input_ids"], "labels": g["labels"]} for g in got] == expected_new
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
    ref = DenseReference(theta_star, "token")
    expected = ref.update(rows, [rows[1], rows[3], rows[5]], expected_new, 5.0)
    space = ParameterSpace(theta_star)
    delta = space.flatten([callback.result.delta[n].double() for n in space.names])
    assert relative_error(delta, expected) < 1e-8
    assert callback.result.request.kind_counts() == {"IR": 1, "RC": 1, "QM+RC": 1}


def test_sft_encoder_truncates_as_sft_trainer_does():
    tok = tokenizer()
    prompt = tok("What is 3?")["input_ids"]
    full = tok("What is 3? It is 21." + tok.eos_token)["input_ids"]
    keep_start = SFTTextEncoder(tok, max_length=len(prompt) + 3).encode_text("What is 3?", " It is 21.")
    assert keep_start == (prompt, full[len(prompt) : len(prompt) + 3])
    keep_end = SFTTextEncoder(tok, max_length=5, truncation_mode="keep_end").encode_text(
        "What is 3?", " It is 21."
    )
    assert keep_end[0] + keep_end[1] == full[-5:] and keep_end[1] == full[len(prompt) :][-5:]
    assert SFTTextEncoder(tok).encode_text("What is 3?", " It is 21." + tok.eos_token) == (
        prompt,
        full[len(prompt) :],
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (UnlearningRequest(remove=[99]), "Unknown training row id 99"),
        (UnlearningRequest(replace={2: {"response": "x", "answer": "y"}}), "other field"),
        (UnlearningRequest(replace={2: {"response": "x"}}), "give both prompt and response"),
    ],
)
def test_callback_refuses_a_bad_request_before_the_first_step(tmp_path, request_, message):
    tok = tokenizer()
    rows = [encode(tok, t["prompt"], t["response"]) for t in map(qa, range(6))]
    callback = UnlearningCallback(request_, single_step(damping=5.0, progress=False))
    trainer = Trainer(
        model=lora_model(tok, dtype=torch.float32),
        args=TrainingArguments(max_steps=3, **common_args(tmp_path)),
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[callback],
    )
    before = ParameterSpace(trainer.model).vector().clone()
    with pytest.raises(InvalidRequestError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert torch.equal(ParameterSpace(trainer.model).vector(), before)


def test_callback_refuses_a_replacement_without_loss_tokens_before_the_first_step(tmp_path):
    tok = tokenizer()
    texts = [qa(i) for i in range(6)]
    rows = [lm_row(tok, t["prompt"], t["response"]) for t in texts]
    # a replacement of prompt tokens only: every label -100
    bad = {"input_ids": rows[2]["input_ids"], "labels": [-100] * len(rows[2]["input_ids"])}
    callback = UnlearningCallback(UnlearningRequest(replace={2: bad}), single_step(progress=False))
    trainer = Trainer(
        model=lora_model(tok, dtype=torch.float32),
        args=TrainingArguments(max_steps=3, **common_args(tmp_path)),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        processing_class=tok,
        callbacks=[callback],
    )
    with pytest.raises(Exception, match="loss tokens"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_text_replacement_checks_the_encoding_against_the_rows_text():
    """A row that carries its text: the encoder must reproduce its tokens (here, the chat template)."""
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    chat = TextEncoding(chat_template=True)
    from hf_unlearn.data import ExampleEncoder

    encoder = ExampleEncoder(tok, chat)
    prompt_ids, response_ids = encoder.encode_text("What is 3?", " It is 21.")
    old = {"prompt": "What is 3?", "response": " It is 21.", "input_ids": prompt_ids + response_ids}
    old["labels"] = [-100] * len(prompt_ids) + response_ids
    new = text_replacement("r3", old, {"response": " It is 0."}, encoder, tok)
    p2, r2 = encoder.encode_text("What is 3?", " It is 0.")
    assert new == {"input_ids": p2 + r2, "labels": [-100] * len(p2) + r2}
    with pytest.raises(InvalidRequestError, match="text_encoder"):  # the plain encoding is not the rows'
        text_replacement("r3", old, {"response": " It is 0."}, ExampleEncoder(tok), tok)
    task = CollatorTask(DataCollatorForSeq2Seq(tok, padding=True), ExampleEncoder(tok), text_encoder=encoder)
    assert task.merge(old, {"response": " It is 0."}) == new


def test_callback_in_sft_trainer_names_rows_by_the_datasets_id_column(tmp_path):
    """`train_dataset=` the prompt–completion dataset as given to SFTTrainer: request ids are its "id" column,
    replacements are encoded as SFTTrainer encodes rows, and a dataset that does not line up with SFTTrainer's
    rows is refused before the first step."""
    trl = pytest.importorskip("trl")
    tok = tokenizer()
    data = datasets.Dataset.from_list(
        [{"id": f"r{i}", "prompt": f"What is {i}?", "completion": f" It is {i * 7}."} for i in range(8)]
    )
    request = UnlearningRequest(
        remove=["r1"],
        replace={"r3": {"completion": " It is 99."}, "r5": {"prompt": "Five?", "completion": " 5."}},
    )
    sft_args = trl.SFTConfig(max_steps=1, max_length=64, **common_args(tmp_path))

    def sft_trainer(callback, train=data):
        return trl.SFTTrainer(
            model=tiny_llama_base(seed=1, dtype=torch.float32, vocab_size=len(tok)), args=sft_args,
            train_dataset=train, processing_class=tok, peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.0}),
            callbacks=[callback],
        )  # fmt: skip

    callback = UnlearningCallback(request, single_step(damping=5.0, progress=False), train_dataset=data)
    trainer = sft_trainer(callback)
    trainer.train()
    edits = callback.result.request.edits
    assert [(e.row_id, e.index, e.kind) for e in edits] == [
        ("r1", 1, "IR"),
        ("r3", 3, "RC"),
        ("r5", 5, "QM+RC"),
    ]
    prepared = trainer.train_dataset
    assert [e.old["input_ids"] for e in edits] == [prepared[i]["input_ids"] for i in (1, 3, 5)]
    reference = sft_trainer(
        callback=Snapshot(tmp_path / "unused"),
        train=datasets.Dataset.from_list(
            [{"prompt": "What is 3?", "completion": " It is 99."}, {"prompt": "Five?", "completion": " 5."}]
        ),
    ).train_dataset
    assert [{k: e.new[k] for k in ("input_ids", "labels")} for e in edits[1:]] == [
        {"input_ids": r["input_ids"], "labels": r["labels"]} for r in reference
    ]
    # the Trainer's own dataset (it keeps the "id" column) names the rows as well
    own = UnlearningCallback(request, single_step(damping=5.0, progress=False))
    trainer = sft_trainer(own)
    own.train_dataset = trainer.train_dataset
    trainer.train()
    assert [(e.row_id, e.index) for e in own.result.request.edits] == [("r1", 1), ("r3", 3), ("r5", 5)]
    # rows given in another order than the Trainer's: refused before training, not paired with other rows
    moved = data.select([1, 0, *range(2, 8)])
    callback = UnlearningCallback(request, single_step(damping=5.0, progress=False), train_dataset=moved)
    trainer = sft_trainer(callback)
    with pytest.raises(Exception, match="does not line up"):
        trainer.train()
    assert trainer.state.global_step == 0
