"""Writing the unlearned adapter: PEFT safetensors + `unlearning_manifest.json` + model card, atomically."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigurationError, OutputExistsError

if TYPE_CHECKING:
    from .curvature.kfac import KFACFactors
    from .curvature.nystrom import NystromSketch

MANIFEST_NAME = "unlearning_manifest.json"
TRAINING_RECORD = "training_record.json"  # written beside an adapter by hf-unlearn train
MANIFEST_FORMAT = "hf_unlearn.manifest/1"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def adapter_digest(adapter_dir: str | Path) -> str:
    """SHA-256 over the adapter's config and weights (file names and contents, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(Path(adapter_dir).glob("adapter_*")):
        h.update(path.name.encode() + b"\0" + file_digest(path).encode() + b"\0")
    return "sha256:" + h.hexdigest()


WEIGHTS_FINGERPRINT = "bf16-strided-sample/1"


def model_weights_fingerprint(model, samples: int = 1024) -> dict:
    """A fingerprint of a base model's weights that does not depend on the dtype it was loaded in:
    `fingerprint` hashes, for each parameter (by name), its shape and up to `samples` evenly spaced values
    rounded to bfloat16 (float32, bfloat16 and float64 loads of one checkpoint round to the same values;
    other weights almost surely do not); `layout` hashes the names and shapes only."""
    import torch

    h, layout = hashlib.sha256(WEIGHTS_FINGERPRINT.encode()), hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        # float64: in float32 the last of 1024 points of a 49152×576 embedding rounds past its end
        n = flat.numel()
        index = torch.linspace(0, n - 1, min(samples, n), dtype=torch.float64, device=flat.device).long()
        values = flat[index].to(torch.bfloat16).to(torch.float32).cpu().contiguous()
        layout.update(f"{name}:{tuple(p.shape)}\0".encode())
        h.update(f"{name}:{tuple(p.shape)}\0".encode() + values.view(torch.uint8).numpy().tobytes())
    return {
        "fingerprint": "sha256:" + h.hexdigest(),
        "layout": "sha256:" + layout.hexdigest(),
        "method": WEIGHTS_FINGERPRINT,
    }


def library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    from . import __version__

    return {
        "hf_unlearn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def build_manifest(result, args, digest_key=None, **context) -> dict:
    """The audit record of one unlearning run: counts, kinds and keyed digests, never example content.

    Row digests are HMACs under `digest_key` (default: `request.current_digest_key()`), so that nobody without
    the key can test guesses of a removed row against them. Unkeyed digests of row content in `context` (an
    older manifest's history, a plain SHA-256 of the training file) are dropped."""
    from .request import current_digest_key

    key = digest_key or current_digest_key()
    context = _without_unkeyed_digests(context)
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **context,
        "request": result.request.summary(key),
        "arguments": args.to_dict(),
        "solver": published_stats(result.stats),
        **{k: result.stats[k] for k in ("curvature_factors", "nystrom_sketch") if k in result.stats},
        "delta_norm": result.delta_norm,
        "timings": result.timings,
        "num_processes": result.stats["num_processes"],
        "versions": library_versions(),
    }


# Figures of the request's old rows that anyone holding the published adapter (or the input adapter, or the
# base model) can compute for a guess of their content: written with any precision, they test guesses as an
# unkeyed digest would (one removed 4-digit code is singled out of 10⁴ by its loss). Kept in the Python
# API's result and the CLI's success line, never written beside an adapter.
REMOVED_ROWS_FIGURES = frozenset(
    {
        "forget_loss_before",
        "forget_loss_after",
        "forget_loss_change_predicted",
        "forget_loss_change_measured",
        "b_norm",
    }
)


def published_stats(stats: dict) -> dict:
    """The solver statistics written beside an adapter: without `REMOVED_ROWS_FIGURES`, and the kept-rows
    check as its rise rounded to 0.01 nats (the rows' losses themselves, written with any precision, are
    figures that coincide with a guess's loss as often as any other number)."""
    out = {k: v for k, v in stats.items() if k not in REMOVED_ROWS_FIGURES}
    if check := stats.get("retain_check"):
        out["retain_check"] = {
            "rows": check["rows"],
            "loss_rise": round(check["loss_after"] - check["loss_before"], 2),
            "warned": check["warning"] is not None,
        }
    if attempts := stats.get("kept_loss_attempts"):
        before = stats["retain_check"]["loss_before"]
        out["kept_loss_attempts"] = [
            {"damping": a["damping"], "loss_rise": round(a["kept_loss_after"] - before, 2)} for a in attempts
        ]
    return out


def _unkeyed(value) -> bool:
    return isinstance(value, str) and value.startswith("sha256:")


def _without_unkeyed_digests(context: dict) -> dict:
    """`context` without plain SHA-256 digests of row content: a training file's `digest`, and the row digests
    of history entries written before digests were keyed (marked `unkeyed_digests_dropped`)."""
    context = dict(context)
    data = context.get("training_data")
    if isinstance(data, dict) and _unkeyed(data.get("digest")):
        context["training_data"] = {k: v for k, v in data.items() if k != "digest"}
    if context.get("history"):
        history = []
        for run in context["history"]:
            edits = run["request"]["edits"]
            if any(_unkeyed(e.get("old_digest")) or _unkeyed(e.get("new_digest")) for e in edits):
                edits = [
                    {**e, **{k: None for k in ("old_digest", "new_digest") if _unkeyed(e.get(k))}}
                    for e in edits
                ]
                run = {**run, "request": {**run["request"], "edits": edits, "unkeyed_digests_dropped": True}}
            history.append(run)
        context["history"] = history
    return context


def training_data_record(path: str | Path, train, key=None) -> dict:
    """What a manifest or training record says about a training file: its path and keyed digests of its rows
    (`request.rows_digests`), which a later run checks the file it is given against."""
    from .request import rows_digests

    return {"path": str(path), **rows_digests(train.ids, train.rows, key)}


def model_card_section(manifest: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in manifest["request"]["kinds"].items())
    s, a = manifest["solver"], manifest["arguments"]
    return (
        "\n## Unlearning\n\n"
        f"This adapter was unlearned with hf_unlearn (LLMEraser influence "
        f"update) from an adapter with digest `{manifest.get('input_adapter', {}).get('digest', 'unknown')}`.\n\n"
        f"- Request: {manifest['request']['num_edits']} training rows ({kinds}); IR = removed, QM = prompt "
        "modified, RC = response corrected.\n"
        f"- Method: solver `{a['solver']}`, curvature `{a['curvature']}`, damping {s['damping']:g}"
        f"{' (auto)' if a['damping'] == 'auto' else ''}, "
        f"loss normalisation `{a['loss_normalization']}`, dtype `{a['dtype']}`.\n"
        f"- Solver: {s['iterations']} iterations, relative residual {s['relative_residual']:.2e}, "
        f"converged: {s['converged']}; ‖Δθ‖ = {manifest['delta_norm']:.4g}.\n"
        + (
            "- **Inexact result**: the solver stopped before reaching its tolerance and the user chose to keep "
            "the result (`--allow-inexact`).\n"
            if s.get("inexact")
            else ""
        )
        + (
            "- **Input check overridden**: the training file was not the one the input adapter records "
            f"({manifest['training_data_check']['differs']}); the user chose to use it "
            "(`--allow-training-file-mismatch`).\n"
            if (manifest.get("training_data_check") or {}).get("overridden_by")
            else ""
        )
        + (
            "- **Input check overridden**: the base model's weights are not those the input adapter records; the "
            "user chose to use it (`--allow-base-model-mismatch`).\n"
            if (manifest.get("base_model_weights") or {}).get("overridden_by")
            else ""
        )
        + (
            f"- Forget-set loss (cross-entropy per loss token over the removed or replaced rows' old versions, as "
            f"`hf-unlearn evaluate` reports it) against what retraining would give: "
            f"{manifest['forget_check']['summary']}.\n"
            if manifest.get("forget_check")
            else ""
        )
        + (
            f"- Earlier unlearning runs of this adapter: {len(manifest['history'])} (see `history` in the manifest).\n"
            if manifest.get("history")
            else ""
        )
        + f"\nThe full audit record (digests of the affected rows, never their content) is `{MANIFEST_NAME}`. "
        "This card and the manifest hold no loss of the affected rows, which would let anyone test guesses of "
        "their content; "
        "`hf-unlearn evaluate --forget-file` measures it for whoever has them.\n"
    )


def recorded_objective(adapter_dir: str | Path) -> dict | None:
    """The objective `adapter_dir` was trained on, from its training record (hf-unlearn train) or, for an
    unlearned adapter, its manifest: {"l2_regularization": μ or None, "text_encoding": {...} or None,
    "loss_normalization": str or None}; None when neither file is there."""

    record, manifest = Path(adapter_dir) / TRAINING_RECORD, Path(adapter_dir) / MANIFEST_NAME
    if record.is_file():
        r = json.loads(record.read_text(encoding="utf-8"))
        mu, normalization = r["config"].get("l2_regularization"), r.get("loss_normalization")
    elif manifest.is_file():
        r = json.loads(manifest.read_text(encoding="utf-8"))
        mu, normalization = r["solver"].get("l2_regularization"), r["arguments"].get("loss_normalization")
    else:
        return None
    return {
        "l2_regularization": mu,
        "text_encoding": r.get("text_encoding"),
        "loss_normalization": normalization,
    }


def recorded_training_data(adapter_dir: str | Path) -> dict | None:
    """What `adapter_dir`'s records say its training file must be (`training_data_record`): for a trained
    adapter the file it was trained on (training record), for an unlearned one that file as edited by the
    request (manifest `edited_training_data`, which `hf-unlearn apply-request` writes); None when unknown."""

    record, manifest = Path(adapter_dir) / TRAINING_RECORD, Path(adapter_dir) / MANIFEST_NAME
    if manifest.is_file():
        m = json.loads(manifest.read_text(encoding="utf-8"))
        data = m.get("edited_training_data")
        if data is None and m.get("request", {}).get("digest_key_id"):
            data = {"digest_key_id": m["request"]["digest_key_id"]}
        return data
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("training_data")
    return None


def recorded_base_model_weights(adapter_dir: str | Path) -> tuple[dict | None, str | None]:
    """`(weights, file)`: the base model weights' fingerprint (`model_weights_fingerprint`) that `adapter_dir`'s
    manifest or training record holds, and which file holds it; `(None, None)` when neither does."""

    for name in (MANIFEST_NAME, TRAINING_RECORD):
        path = Path(adapter_dir) / name
        if path.is_file():
            weights = json.loads(path.read_text(encoding="utf-8")).get("base_model_weights") or {}
            return (weights, name) if weights.get("fingerprint") else (None, None)
    return None, None


def read_history(adapter_dir: str | Path) -> list[dict]:
    """Earlier unlearning runs that produced `adapter_dir`, oldest first (empty for a freshly trained adapter)."""
    path = Path(adapter_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    previous = json.loads(path.read_text(encoding="utf-8"))
    return previous.get("history", []) + [
        {
            "manifest_digest": file_digest(path),
            "created": previous.get("created"),
            "input_adapter": previous.get("input_adapter"),
            "request": previous["request"],
        }
    ]


def check_output_dir(
    output_dir: str | Path, overwrite: bool, inputs: dict[str, str | Path | None] | None = None
) -> None:
    """Refuse an output path that is a file, a non-empty directory without `overwrite`, or one that overlaps
    an input (`inputs`: flag name → path): the output directory is replaced as a whole."""
    out = Path(output_dir)
    target = out.resolve()
    for flag, path in (inputs or {}).items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents or source in target.parents:
            raise ConfigurationError(
                f"--output-dir {str(output_dir)!r} overlaps {flag} {str(path)!r}: the output directory is "
                f"written (and, with --overwrite, replaced) as a whole, and the inputs are never modified. "
                "Choose an output directory outside the inputs."
            )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output path {str(out)!r} exists and is not a directory.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if others := foreign_files(out):
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputExistsError(
            f"The output directory {str(out)!r} holds files hf_unlearn does not write ({listed}); overwriting "
            "(--overwrite, or overwrite=True in Python) only replaces an earlier output of hf_unlearn. Move them "
            "away or choose another output directory."
        )
    if not overwrite:
        raise OutputExistsError(
            f"The output directory {str(out)!r} holds an earlier output; pass --overwrite (overwrite=True in "
            "Python) to replace it."
        )


# What hf_unlearn writes into an output directory (an adapter with its tokenizer, records, curvature files):
# --overwrite replaces a directory that holds nothing else.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",  # a processor's (saved by the Trainer paths with their processing class)
    "processor_config.json",
)
TOOL_FILES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        MANIFEST_NAME,
        "training_record.json",
        "nystrom_sketch.safetensors",
        "nystrom_sketch.json",
        "curvature_factors.safetensors",
        "curvature_factors.json",
        *TOKENIZER_FILES,
    }
)


# The owner's working files for the next request, derived from the training rows: K-FAC factors are raw sums
# over the rows' positions, a Nyström sketch a product of their curvature, each of the edited set. Two versions
# (the input adapter's and the output's, or two outputs of a sequence of requests) differ by the removed rows'
# terms, which the base model computes for a guess (layer 0's input factor from the tokens alone: a removed
# 4-digit code comes out to its digits' order). `hf-unlearn push` keeps them local, and the Trainer's
# `training_args.bin` (written by `save_model`, so by `UnlearnTrainer` too): a pickle of the TrainingArguments,
# which holds the owner's local paths and runs code when loaded.
LOCAL_FILES = frozenset(
    {
        "curvature_factors.safetensors",
        "curvature_factors.json",
        "nystrom_sketch.safetensors",
        "nystrom_sketch.json",
        "training_args.bin",
    }
)


def files_to_publish(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files of an adapter directory that `hf-unlearn push` uploads, and the `LOCAL_FILES` it keeps back
    (hidden files, with a leading '.' in their path below `folder`, stay local too, unlisted)."""
    files = sorted(
        p
        for p in Path(folder).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    local = [p for p in files if str(p.relative_to(folder)) in LOCAL_FILES]
    return [p for p in files if p not in local], local


def foreign_files(directory: Path, also: set[str] = frozenset()) -> list[str]:
    """Names in `directory` that hf_unlearn does not write (nor `also`), sorted; subdirectories end in '/'."""
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in Path(directory).iterdir()
        if p.is_dir() or p.name not in TOOL_FILES | set(also)
    )


CARD_TAGS = ["unlearning", "hf-unlearn", "llmeraser", "peft", "lora"]
CARD_MARKER = "<!-- hf_unlearn: unlearning section -->"


def write_model_card(directory: Path, manifest: dict, base_model_id: str | None = None) -> None:
    """Hub-ready card: `library_name: peft`, `base_model`, tags, and an "Unlearning" section (no content).

    An existing card keeps its text; an "Unlearning" section of an earlier run is replaced (the manifest
    keeps the history). The file is replaced atomically.
    """
    from huggingface_hub import ModelCard

    card = ModelCard.load(directory / "README.md") if (directory / "README.md").exists() else ModelCard("")
    text = card.text
    if CARD_MARKER in text:  # an earlier run's section: replaced, its record stays in the manifest history
        text = text[: text.index(CARD_MARKER)]
    card.text = text.rstrip() + "\n\n" + CARD_MARKER + model_card_section(manifest)
    card.data.library_name = "peft"
    if base_model_id:
        card.data.base_model = base_model_id
        tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:")]
        card.data.tags = tags + [f"base_model:adapter:{base_model_id}"]
    card.data.tags = list(dict.fromkeys((card.data.tags or []) + CARD_TAGS))
    write_text_atomically(directory / "README.md", str(card))


WRITTEN: list[Path] = []  # outputs completed by this process, for the message of an interrupted command


def note_written(path: str | Path) -> None:
    WRITTEN.append(Path(path))


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` by a rename: readers see the old file or the new one, never part of it."""
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_manifest_and_card(directory: str | Path, manifest: dict, base_model_id: str | None = None) -> None:
    """Add `unlearning_manifest.json` and the model card's "Unlearning" section to an adapter directory
    (each file replaced atomically)."""
    directory = Path(directory)
    write_text_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, default=str) + "\n")
    write_model_card(directory, manifest, base_model_id)


def save_unlearned_adapter(
    model,
    output_dir: str | Path,
    manifest: dict,
    overwrite: bool = False,
    card_source: str | Path | None = None,
    base_model_id: str | None = None,
    *,
    processing_class=None,
    handed_on: Sequence[KFACFactors | NystromSketch] = (),
) -> Path:
    """Write the adapter, manifest and model card to `output_dir` so that it appears complete or not at all.

    `card_source` is the input adapter's directory: its README.md is kept and extended, its tokenizer files
    (`TOKENIZER_FILES`) are copied; `processing_class` (the Trainer paths' tokenizer or processor) is saved
    beside the adapter, as `Trainer.save_model` saves it; `handed_on` (the edited training set's Nyström sketch
    or K-FAC factors) are written beside the adapter for the next request.
    """

    def fill(staging: Path) -> None:
        if card_source is not None:  # the input adapter's card (extended below) and tokenizer stay with it
            for name in ("README.md", *TOKENIZER_FILES):
                if (Path(card_source) / name).is_file():
                    shutil.copyfile(Path(card_source) / name, staging / name)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        model.save_pretrained(staging, safe_serialization=True)
        write_manifest_and_card(staging, manifest, base_model_id)
        for curvature in handed_on:
            curvature.save(staging)

    return write_directory(output_dir, overwrite, fill)


def write_directory(output_dir: str | Path, overwrite: bool, fill) -> Path:
    """Create `output_dir` with `fill(staging_dir)` so that it appears complete or not at all: `fill` writes
    into a sibling staging directory, which then replaces `output_dir` (with `overwrite`) by renames."""
    out = Path(output_dir).resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        fill(staging)
        if out.is_dir() and (others := foreign_files(out, {p.name for p in staging.iterdir()})):
            raise OutputExistsError(  # appeared while this run computed
                f"The output directory {str(out)!r} now holds files hf_unlearn does not write ({', '.join(others)}); "
                "nothing was replaced."
            )
        _replace_dir(staging, out)
        note_written(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return out


def _replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted afterwards."""
    if not target.exists():
        os.rename(source, target)
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, aside)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)
