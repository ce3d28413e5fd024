"""`hf-unlearn apply-request` writes exactly the training file the next request's checks expect."""

import json

import pytest
import torch
from reference import tiny_llama_base, token_rows, write_jsonl

from hf_unlearn.cli import main
from hf_unlearn.data import read_jsonl
from hf_unlearn.io import MANIFEST_NAME

ROWS = token_rows(12, seed=13)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    tiny_llama_base(seed=3, dtype=torch.float32, exact=False).save_pretrained(root / "base")
    return str(root / "base")


@pytest.mark.parametrize("ids", ["explicit", "line numbers"])
def test_two_sequential_requests_through_apply_request(base, tmp_path, ids, capsys):
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(ROWS)] if ids == "explicit" else ROWS
    name = (lambda i: f"r{i}") if ids == "explicit" else (lambda i: i)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["train", "--model", base, "--train-file", train, "--output-dir", str(tmp_path / "adapter"),
                 "--epochs", "2", "--learning-rate", "0.01", "--batch-size", "6", "--lora-r", "2"]) == 0  # fmt: skip
    new5 = ROWS[5]["input_ids"][:-1] + [7]
    first = write_jsonl(
        tmp_path / "first.jsonl",
        [{"op": "remove", "id": name(2)},
         {"op": "replace", "id": name(5), "input_ids": new5, "labels": ROWS[5]["labels"][:-1] + [7]}],
    )  # fmt: skip
    second = write_jsonl(tmp_path / "second.jsonl", [{"op": "remove", "id": name(9)}])
    common = ["--model", base, "--curvature", "ggn", "--damping", "0.1", "--no-progress"]

    def unlearn(adapter, train_file, request, out):
        return main(["unlearn", *common, "--adapter", str(adapter), "--train-file", train_file, "--request", request,
                     "--output-dir", str(tmp_path / out)])  # fmt: skip

    assert unlearn(tmp_path / "adapter", train, first, "out1") == 0
    edited = tmp_path / "edited" / "train.jsonl"  # another directory: the digest key is copied beside it
    edited.parent.mkdir()
    assert main(["apply-request", "--train-file", train, "--request", first, "--output", str(edited)]) == 0
    assert "Wrote" in capsys.readouterr().out
    # the edited file: row 2 gone (its line left empty when ids are line numbers), row 5 replaced in place
    lines = edited.read_text().splitlines()
    source = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == (len(rows) - 1 if ids == "explicit" else len(rows))
    got = read_jsonl(edited)
    assert [r["id"] for r in got] == [name(i) for i in range(len(ROWS)) if i != 2]
    assert next(r for r in got if r["id"] == name(5))["input_ids"] == new5
    position5 = 5 if ids == "line numbers" else 4
    assert [line for i, line in enumerate(lines) if line and i != position5] == [
        line for i, line in enumerate(source) if i not in (2, 5)
    ]  # the other lines byte for byte
    # the next request accepts it (the manifest's digest of the edited rows), and the chain goes on
    assert unlearn(tmp_path / "out1", str(edited), second, "out2") == 0
    manifest = json.loads((tmp_path / "out2" / MANIFEST_NAME).read_text())
    assert [run["request"]["kinds"] for run in manifest["history"]] == [{"IR": 1, "RC": 1}]
    again = tmp_path / "edited" / "again.jsonl"
    assert (
        main(["apply-request", "--train-file", str(edited), "--request", second, "--output", str(again)]) == 0
    )
    assert unlearn(tmp_path / "out2", str(again), write_jsonl(tmp_path / "third.jsonl", [{"op": "remove", "id": name(0)}]), "out3") == 0  # fmt: skip
    # the original file, or one edited otherwise, is refused with the way out
    assert unlearn(tmp_path / "out1", train, second, "bad") == 3
    assert "apply-request" in capsys.readouterr().err
    # the output never replaces the input, nor an existing file without --overwrite
    assert main(["apply-request", "--train-file", train, "--request", first, "--output", train]) == 4
    assert main(["apply-request", "--train-file", train, "--request", first, "--output", str(edited)]) == 6
