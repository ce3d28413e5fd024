import json

import pytest

from hf_unlearn import InvalidRequestError, TrainingSet, UnlearningRequest
from hf_unlearn.objective import CausalLMTask

ROWS = [
    {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
]


def resolve(request, rows=ROWS):
    return request.resolve(TrainingSet(rows), CausalLMTask())


def test_token_kinds_are_derived_from_which_part_changed():
    resolved = resolve(
        UnlearningRequest(
            replace={
                0: {"input_ids": [2, 2, 3, 4], "labels": [-100, -100, 3, 4]},  # prompt tokens changed
                1: {"input_ids": [5, 6, 7, 9], "labels": [-100, -100, 7, 9]},  # response changed
                2: {"input_ids": [1, 10, 12], "labels": [-100, 10, 12]},  # both
            }
        )
    )
    assert [e.kind for e in resolved.edits] == ["QM", "RC", "QM+RC"]


def test_from_jsonl(tmp_path):
    lines = [
        {"op": "remove", "id": 0},
        {"op": "replace", "id": 1, "input_ids": [5, 6, 7, 9], "labels": [-100, -100, 7, 9]},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    request = UnlearningRequest.from_jsonl(tmp_path / "r.jsonl")
    assert request.remove == [0]
    assert request.replace == {1: {"input_ids": [5, 6, 7, 9], "labels": [-100, -100, 7, 9]}}
    assert resolve(request).kind_counts() == {"IR": 1, "RC": 1}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"op": "delete", "id": 0}], "op 'delete'"),
        ([{"op": "remove"}], "no 'id'"),
        ([{"op": "replace", "id": 0}, {"op": "replace", "id": 0, "prompt": "x"}], "replaced twice"),
        ([{"op": "remove", "id": 0, "response": "x"}], r"also gives \['response'\]"),
    ],
)
def test_bad_request_files(tmp_path, lines, message):
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InvalidRequestError, match=message):
        UnlearningRequest.from_jsonl(tmp_path / "r.jsonl")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (UnlearningRequest(), "empty"),
        (UnlearningRequest(remove=[7]), "Unknown training row id 7"),
        (UnlearningRequest(remove=[0], replace={0: {"prompt": "x", "response": "y"}}), "more than once"),
        (UnlearningRequest(remove=[0, 1, 2]), "every training row"),
        (UnlearningRequest(replace={0: {}}), "no new content"),
        (UnlearningRequest(replace={0: {"prompt": "x"}}), "pre-tokenised"),
        (UnlearningRequest(replace={0: {"input_ids": [1]}}), "both input_ids and labels"),
        (UnlearningRequest(replace={0: dict(ROWS[0])}), "identical"),
        (UnlearningRequest(replace={0: {"response": "y", "promt": "x"}}), r"unknown field\(s\) \['promt'\]"),
    ],
)
def test_bad_requests(request_, message):
    with pytest.raises(InvalidRequestError, match=message):
        resolve(request_)


def test_summary_has_digests_not_content():
    summary = resolve(
        UnlearningRequest(remove=[0], replace={1: {"input_ids": [5, 6, 7, 9], "labels": [-100, -100, 7, 9]}})
    ).summary()
    assert summary["kinds"] == {"IR": 1, "RC": 1}
    text = json.dumps(summary)
    assert "input_ids" not in text and "[5, 6, 7" not in text
    assert all(e["old_digest"].startswith("hmac-sha256:") for e in summary["edits"])  # keyed


def test_line_number_ids_survive_a_removal_when_the_removed_line_is_left_empty(tmp_path):
    from hf_unlearn import DataError, TrainingSet
    from hf_unlearn.request import check_against_history

    history = [{"request": {"edits": [{"id": 1, "kind": "IR"}]}}]
    rows = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(3)]
    (tmp_path / "blank.jsonl").write_text(f"{rows[0]}\n\n{rows[2]}\n")
    (tmp_path / "deleted.jsonl").write_text(f"{rows[0]}\n{rows[2]}\n")
    check_against_history(
        UnlearningRequest(remove=[2]), TrainingSet.from_jsonl(tmp_path / "blank.jsonl"), history
    )
    with pytest.raises(DataError, match="give every row an 'id'"):  # row 2 became row 1
        check_against_history(
            UnlearningRequest(remove=[2]), TrainingSet.from_jsonl(tmp_path / "deleted.jsonl"), history
        )


def test_ids_resolve_by_the_id_field_in_python_as_in_the_cli(tmp_path):
    """One rule: a row's "id" field, else its position — for a list, a datasets.Dataset and a training file."""
    import datasets

    from hf_unlearn.data import read_jsonl

    rows = [{"id": f"r{i}", **row} for i, row in enumerate(ROWS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for train in (
        TrainingSet(rows),
        TrainingSet(datasets.Dataset.from_list(rows)),
        TrainingSet.from_jsonl(path),
    ):
        resolved = UnlearningRequest(remove=["r1"]).resolve(train, CausalLMTask())
        assert resolved.indices == [1] and resolved.edits[0].row_id == "r1"
        with pytest.raises(InvalidRequestError, match="'id' field"):  # the index is not the row's id
            UnlearningRequest(remove=[1]).resolve(train, CausalLMTask())
    assert TrainingSet(read_jsonl(path)).ids == TrainingSet.from_jsonl(path).ids == [r["id"] for r in rows]
    # rows without the field (or with None) are named by their index, as the CLI names them by line number
    mixed = [dict(ROWS[0]), {"id": None, **ROWS[1]}, {"id": "x", **ROWS[2]}]
    assert TrainingSet(mixed).ids == [0, 1, "x"]


def test_an_error_about_a_replacement_names_its_row_once():
    """A replacement refused by the Trainer path's text encoding, or one whose rows do not collate, names the row
    once ("Row 'r0': ..."), not "Row 'r0': Row 'r0' ..." (found by the #25 hand trial)."""
    from transformers import DataCollatorForLanguageModeling

    from hf_unlearn.callback import check_request
    from hf_unlearn.data import ExampleEncoder
    from hf_unlearn.trainer import CollatorTask

    rows = [{"id": f"r{i}", "input_ids": [1, 2, 3 + i], "attention_mask": [1, 1, 1]} for i in range(3)]
    lm = CollatorTask(lambda batch: DataCollatorForLanguageModeling(None, mlm=False)(batch))
    with pytest.raises(InvalidRequestError) as error:  # loss on every token, no text: a part cannot be kept
        UnlearningRequest(replace={"r0": {"response": "x"}}).resolve(TrainingSet(rows), lm)
    assert str(error.value).count("'r0'") == 1 and "'?'" not in str(error.value), error.value
    assert str(error.value).startswith("Row 'r0'")
    # a replacement without loss tokens, refused as the callback checks the request before training
    task = CausalLMTask(ExampleEncoder())
    bad = {"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}
    with pytest.raises(Exception, match="no loss tokens") as error:
        check_request(
            UnlearningRequest(replace={"r1": bad}),
            TrainingSet([dict(r, labels=r["input_ids"]) for r in rows]),
            task,
        )
    assert str(error.value).count("'r1'") == 1 and "'?'" not in str(error.value), error.value
