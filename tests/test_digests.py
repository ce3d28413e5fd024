"""Nothing written next to an adapter lets anyone test guesses of a training row's content (keyed digests)."""

import hashlib
import itertools
import json
import random
import re
import stat

import pytest
import torch
from reference import tiny_llama_base

from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME
from hf_unlearn.request import DIGEST_KEY_NAME, DigestKey, row_digest, using_digest_key

PROMPT = [1, 2, 3]
DIGITS = list(range(20, 30))  # token ids of the digits 0..9


def code_row(i: int, code: tuple) -> dict:
    """Row `r{i}`: a known prompt (which names the row) and a secret 4-digit code as the response."""
    ids = [*PROMPT, 4 + i, *(DIGITS[d] for d in code)]
    return {"id": f"r{i}", "input_ids": ids, "labels": [-100] * 4 + ids[4:]}


def line(row: dict) -> str:
    return json.dumps(row) + "\n"


def unkeyed_candidates(rows: list[dict], i: int) -> set[str]:
    """Every plain SHA-256 an attacker who knows everything but row i's code can compute, for all 10⁴ codes:
    of the row's content (canonical JSON, as the old manifests), of its line, and of the whole file."""
    before, after = "".join(map(line, rows[:i])).encode(), "".join(map(line, rows[i + 1 :])).encode()
    found = set()
    for code in itertools.product(range(10), repeat=4):
        row = code_row(i, code)
        content = {k: row[k] for k in ("input_ids", "labels")}
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        found.add(hashlib.sha256(canonical).hexdigest())
        found.add(hashlib.sha256(line(row).encode()).hexdigest())
        found.add(hashlib.sha256(before + line(row).encode() + after).hexdigest())
    return found


def written_text(directory) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(directory.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("digests")
    tiny_llama_base(seed=3, dtype=torch.float32, exact=False).save_pretrained(root / "base")
    rng = random.Random(0)
    rows = [code_row(i, tuple(rng.randrange(10) for _ in range(4))) for i in range(10)]
    (root / "data").mkdir()
    train = root / "data" / "train.jsonl"
    train.write_text("".join(map(line, rows)))
    assert main(["train", "--model", str(root / "base"), "--train-file", str(train), "--output-dir",
                 str(root / "adapter"), "--epochs", "2", "--learning-rate", "0.01", "--batch-size", "5",
                 "--lora-r", "2"]) == 0  # fmt: skip
    (root / "request.jsonl").write_text(
        line({"op": "remove", "id": "r2"}) + line({"op": "remove", "id": "r6"})
    )
    out = root / "unlearned"
    # a sampled Nyström sketch: its kept rows' digests are saved beside the output
    assert main(["unlearn", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--train-file",
                 str(train), "--request", str(root / "request.jsonl"), "--output-dir", str(out), "--curvature",
                 "ggn", "--damping", "0.1", "--preconditioner", "nystrom", "--nystrom-rank", "4",
                 "--curvature-samples", "8", "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "rows": rows, "train": train, "adapter": root / "adapter", "out": out}


def test_a_dictionary_attack_on_the_codes_finds_nothing_next_to_the_adapters(trained):
    rows = trained["rows"]
    written = written_text(trained["adapter"]) + written_text(trained["out"])
    hexes = set(re.findall(r"[0-9a-f]{64}", written))
    for i in range(len(rows)):  # the removed rows 2 and 6, and the kept ones of the sketch
        assert not hexes & unkeyed_candidates(rows, i), f"row {i}'s code can be recovered"
    assert "hmac-sha256:" in written and "row_digests" in (trained["out"] / "nystrom_sketch.json").read_text()
    # keyed digests do not match any guess without the key
    guessed = DigestKey.generate()
    keyed = set(re.findall(r"hmac-sha256:[0-9a-f]{64}", written))
    for code in itertools.product(range(10), repeat=4):
        assert row_digest(code_row(2, code), guessed) not in keyed
    # the key stays beside the training data, readable by its owner only
    key_file = trained["train"].parent / DIGEST_KEY_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not any(p.name == DIGEST_KEY_NAME for d in ("adapter", "out") for p in trained[d].rglob("*"))
    key = DigestKey.load(key_file)
    assert key.secret.hex() not in written


def test_the_owner_verifies_the_removed_rows_with_the_key(trained):
    rows, key = trained["rows"], DigestKey.load(trained["train"].parent / DIGEST_KEY_NAME)
    manifest = json.loads((trained["out"] / MANIFEST_NAME).read_text())
    assert manifest["request"]["digest_key_id"] == key.id
    assert [e["old_digest"] for e in manifest["request"]["edits"]] == [
        row_digest(rows[i], key) for i in (2, 6)
    ]
    sketch = json.loads((trained["out"] / "nystrom_sketch.json").read_text())
    assert set(sketch["row_digests"]) <= {row_digest(r, key) for i, r in enumerate(rows) if i not in (2, 6)}
    record = json.loads((trained["adapter"] / "training_record.json").read_text())["training_data"]
    assert record["digest_key_id"] == key.id and record["num_rows"] == len(rows)
    with using_digest_key(key):
        assert row_digest(rows[2]) == manifest["request"]["edits"][0]["old_digest"]
    assert row_digest(rows[2], DigestKey.generate()) != manifest["request"]["edits"][0]["old_digest"]


def test_an_earlier_runs_key_is_required(trained, tmp_path):
    """Without the key of the earlier records the next run is refused, not given a fresh key."""
    edited = tmp_path / "train.jsonl"  # another directory: no key beside it
    edited.write_text("".join(line(r) for i, r in enumerate(trained["rows"]) if i not in (2, 6)))
    request = tmp_path / "request.jsonl"
    request.write_text(line({"op": "remove", "id": "r3"}))
    args = ["unlearn", "--model", str(trained["root"] / "base"), "--adapter", str(trained["out"]), "--train-file",
            str(edited), "--request", str(request), "--output-dir", str(tmp_path / "out"), "--damping", "0.1",
            "--no-progress", "--curvature", "ggn"]  # fmt: skip
    assert main(args) == 4 and not (tmp_path / DIGEST_KEY_NAME).exists()
    other = tmp_path / "other.key"
    other.write_text(DigestKey.generate().secret.hex())
    assert main([*args, "--digest-key", str(other)]) == 4
    assert main([*args, "--digest-key", str(trained["train"].parent / DIGEST_KEY_NAME)]) == 0


def test_no_figure_written_next_to_the_adapter_singles_out_a_removed_code(trained, tmp_path):
    """The removed row's forget-set loss under the published adapter (or the input adapter, or the base model)
    is a function of its content: written with any precision, hashing is not needed to test guesses. One
    removed row (its loss is then the forget-set loss), with held-out rows and without."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_unlearn.evaluation import per_example
    from hf_unlearn.objective import CausalLMTask

    rows, root = trained["rows"], trained["root"]
    request = tmp_path / "request.jsonl"
    request.write_text(line({"op": "remove", "id": "r4"}))
    held_out = tmp_path / "held_out.jsonl"
    rng = random.Random(1)
    held_out.write_text(
        "".join(line(code_row(20 + i, tuple(rng.randrange(10) for _ in range(4)))) for i in range(6))
    )
    outs = [tmp_path / "with_held_out", tmp_path / "without"]
    for out, extra in zip(outs, (["--held-out-file", str(held_out)], [])):
        assert main(["unlearn", "--model", str(root / "base"), "--adapter", str(trained["adapter"]), "--train-file",
                     str(trained["train"]), "--request", str(request), "--output-dir", str(out), "--curvature", "ggn",
                     "--damping", "0.1", "--no-progress", *extra]) == 0  # fmt: skip
    codes = list(itertools.product(range(10), repeat=4))
    guesses = [code_row(4, code) for code in codes]
    truth = codes.index(tuple(DIGITS.index(t) for t in rows[4]["input_ids"][4:]))
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    task = CausalLMTask()

    def losses(model):
        return per_example(model, task, guesses, batch_size=2000)["loss"]

    figures = {"base": losses(base)}
    for name, adapter in (("input", trained["adapter"]), *(zip(("with_held_out", "without"), outs))):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(adapter))
        figures[name] = losses(model)
    for out in outs:
        numbers = {float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", written_text(out))}
        for name, values in figures.items():
            for x in numbers:
                if abs(values[truth] - x) <= 1e-3 * abs(x):  # the true code fits a written figure
                    fitting = sum(abs(v - x) <= 1e-3 * abs(x) for v in values)
                    assert fitting > len(codes) // 10, (
                        f"{out.name}: {x} (a loss under {name}) singles the removed code out of {fitting} guesses"
                    )


def test_push_keeps_the_curvature_working_files_local(trained, tmp_path, capsys, monkeypatch):
    """Saved K-FAC factors and Nyström sketches are sums over the training rows: two published versions would
    differ by a removed row's terms, which the base model computes for a guess. They stay with the owner, as
    does the Trainer's `training_args.bin` (a pickle holding local paths; `UnlearnTrainer.save_model` writes
    it)."""
    import shutil

    import huggingface_hub

    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    assert (out / "nystrom_sketch.safetensors").is_file()
    for name in ("curvature_factors.json", "curvature_factors.safetensors", "training_args.bin"):
        (out / name).write_text("stand-in")
    capsys.readouterr()
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[1:-1]]
    assert not [name for name in listed if name.startswith(("nystrom_sketch", "curvature_factors"))]
    assert "adapter_model.safetensors" in listed and "training_args.bin" not in listed
    assert lines[-1].startswith("Kept local") and "training_args.bin" in lines[-1]
    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    assert main(["push", str(out), "--repo-id", "me/x"]) == 0
    assert sorted(calls[0]["allow_patterns"]) == listed
