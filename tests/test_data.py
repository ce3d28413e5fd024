import json

import pytest
from reference import train_tokenizer

from hf_unlearn import DataError, ExampleEncoder, TextEncoding, TrainingSet, UnlearningRequest
from hf_unlearn.objective import CausalLMTask


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ids_from_field_else_line_number(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"input_ids": [1, 2], "labels": [-100, 2]}, {"id": "x", "prompt": "a", "response": "b"}],
    )
    train = TrainingSet.from_jsonl(path)
    assert train.ids == [0, "x"]
    assert train.index_of("x") == 1 and train.index_of(0) == 0 and train.index_of("0") == 0
    assert train.index_of(7) is None


def test_malformed_line_is_named(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        TrainingSet.from_jsonl(tmp_path / "t.jsonl")


def test_duplicate_ids_rejected(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"id": 1, "prompt": "a", "response": "b"}, {"id": 1, "prompt": "c", "response": "d"}],
    )
    with pytest.raises(DataError, match="Duplicate"):
        TrainingSet.from_jsonl(path)


def test_text_rows_have_loss_on_response_only(tokenizer):
    encode = ExampleEncoder(tokenizer)
    example = encode({"prompt": "def function", "response": "return value"})
    prompt_ids = tokenizer("def function")["input_ids"]
    response_ids = tokenizer("return value", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + response_ids
    assert example["labels"] == [-100] * len(prompt_ids) + response_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_chat_template_wraps_prompt(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    plain = ExampleEncoder(tokenizer)({"prompt": "class", "response": "object"})
    chat = ExampleEncoder(tokenizer, TextEncoding(chat_template=True))(
        {"prompt": "class", "response": "object"}
    )
    n_plain = plain["labels"].count(-100)
    n_chat = chat["labels"].count(-100)
    assert n_chat > n_plain
    assert chat["input_ids"][n_chat:] == plain["input_ids"][n_plain:]
    # the prompt part is exactly the rendered template with its generation prompt, and carries no loss
    rendered = "<s>class</s><s>"
    assert chat["input_ids"][:n_chat] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_text_row_without_tokenizer_says_what_to_do():
    with pytest.raises(DataError, match="tokenizer"):
        ExampleEncoder()({"prompt": "a", "response": "b"})


def test_row_without_loss_tokens_rejected(tokenizer):
    with pytest.raises(DataError, match="no loss tokens"):
        ExampleEncoder(tokenizer, TextEncoding(max_length=2))(
            {"prompt": "def function import", "response": "x"}
        )


def test_text_replacement_kinds_and_merge(tokenizer):
    train = TrainingSet([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)])
    request = UnlearningRequest(
        remove=[0],
        replace={1: {"prompt": "new"}, 2: {"response": "new"}, 3: {"prompt": "a", "response": "b"}},
    )
    resolved = request.resolve(train, CausalLMTask(ExampleEncoder(tokenizer)))
    assert [e.kind for e in resolved.edits] == ["IR", "QM", "RC", "QM+RC"]
    assert resolved.new == [
        {"prompt": "new", "response": "r1"},
        {"prompt": "p2", "response": "new"},
        {"prompt": "a", "response": "b"},
    ]
    assert resolved.kind_counts() == {"IR": 1, "QM": 1, "RC": 1, "QM+RC": 1}
