"""What an unlearning run of an adapter directory settles before loading a model: its inputs
(`UnlearnPaths`), the digest key, μ and saved curvature from the adapter's records, and the checks of the
output directory, the request and the training file against those records (`prepare_unlearn`): the first
phase of `pipeline.unlearn_adapter_directory`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class UnlearnPaths:
    """Inputs and output of `hf-unlearn unlearn`."""

    model: str = field(metadata={"help": "Base model: a local directory or .gguf file."})
    adapter: str = field(metadata={"help": "The trained PEFT adapter directory (never modified)."})
    train_file: str = field(metadata={"help": "JSON-lines training data the adapter was trained on."})
    request: str = field(metadata={"help": "JSON-lines unlearning request (remove/replace rows)."})
    output_dir: str = field(metadata={"help": "Where to write the unlearned adapter."})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer for text rows (default: the adapter directory's, else the base model's)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model, recorded in the model card (default: --model)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model dir."}
    )
    digest_key: str | None = field(
        default=None,
        metadata={
            "help": "Secret key of the row digests in the manifest (HMAC-SHA256; never written beside the "
            "adapter). Default: .hf_unlearn_key in the training file's directory, created on first use."
        },
    )
    held_out_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON-lines rows the adapter was not trained on (like the training rows): the removed rows' "
            "loss after the update is compared with theirs, which is what retraining would plausibly give them "
            "(default: compared with the base model's loss on the removed rows)."
        },
    )
    allow_training_file_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Use a training file whose rows differ from those the adapter's training record (or, after "
            "an earlier request, its manifest) records; refused otherwise."
        },
    )
    allow_base_model_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Use a base model whose weights differ from those the adapter was trained on (its training "
            "record or manifest holds their fingerprint); refused otherwise."
        },
    )


def unlearn_digest_key(train_file: str, digest_key: str | None, adapter: str):
    """The digest key of an unlearning run: `digest_key`, else `.hf_unlearn_key` beside `train_file`, created
    on first use unless `adapter`'s records name a key (then it must be that one)."""
    from .errors import ConfigurationError
    from .io import recorded_training_data
    from .request import DigestKey, digest_key_path

    path = Path(digest_key) if digest_key else digest_key_path(train_file)
    expected = (recorded_training_data(adapter) or {}).get("digest_key_id")
    if expected and not path.is_file():
        raise ConfigurationError(
            f"The records of {adapter} were made with the digest key of id {expected}, but there is no key file "
            f"{str(path)!r}: give that key with --digest-key FILE (hf-unlearn keeps it as .hf_unlearn_key beside "
            "the training file it was first used with)."
        )
    key = DigestKey.load(path, create=True)
    if expected and key.id != expected:
        raise ConfigurationError(
            f"The records of {adapter} were made with the digest key of id {expected}, but {str(path)!r} has id "
            f"{key.id}: give the key of those records with --digest-key FILE."
        )
    return key


def compare_training_file(paths: UnlearnPaths, given: dict) -> dict:
    """Whether the training file with keyed digests `given` (`request.rows_digests` of its rows) holds the rows
    `paths.adapter` records (trained on, or as edited by the earlier requests): `{"matches_record": True}`,
    `{"matches_record": False, "differs": what differs, "recorded_in": which record}`, or
    `{"matches_record": None}` when nothing is recorded."""
    from .io import MANIFEST_NAME, file_digest, recorded_training_data

    recorded = recorded_training_data(paths.adapter) or {}
    unlearned = (Path(paths.adapter) / MANIFEST_NAME).is_file()
    where = "its manifest, as edited by the earlier request" if unlearned else "its training record"
    if "rows_digest" in recorded:
        if given["rows_digest"] == recorded["rows_digest"]:
            return {"matches_record": True}
        if given["num_rows"] != recorded["num_rows"]:
            what = f"it has {given['num_rows']} rows, {where} {recorded['num_rows']}"
        elif given["content_digest"] != recorded["content_digest"]:
            what = "the content of at least one row differs (as many rows)"
        else:
            what = "it holds the same rows under other ids (rows named by line number were moved), so the request's ids would name other rows"
    elif str(recorded.get("digest", "")).startswith("sha256:"):  # a record written before keyed digests
        if file_digest(paths.train_file) == recorded["digest"]:
            return {"matches_record": True}
        what = "its SHA-256 differs from the one recorded"
    else:
        return {"matches_record": None}  # nothing recorded (an adapter not written by hf-unlearn)
    return {"matches_record": False, "differs": what, "recorded_in": where}


def check_training_file(paths: UnlearnPaths, train, key) -> dict:
    """Refuse a training file whose rows are not those `paths.adapter` records (trained on, or as edited by
    the earlier requests), saying what differs, unless `paths.allow_training_file_mismatch`; returns
    `compare_training_file`'s finding (with the override named when it was used)."""
    from .errors import DataError
    from .io import MANIFEST_NAME
    from .request import rows_digests

    found = compare_training_file(paths, rows_digests(train.ids, train.rows, key))
    if found["matches_record"] is not False:
        return found
    if paths.allow_training_file_mismatch:
        return {**found, "overridden_by": "--allow-training-file-mismatch"}
    unlearned = (Path(paths.adapter) / MANIFEST_NAME).is_file()
    raise DataError(
        f"{paths.train_file} is not the training file {paths.adapter} was trained on ({found['recorded_in']}): "
        f"{found['differs']}. Give "
        + (
            "the training file as edited by the earlier requests (`hf-unlearn apply-request` writes it)"
            if unlearned
            else "the file the adapter was trained on"
        )
        + ", or pass --allow-training-file-mismatch if you know why it differs."
    )


def check_recorded_settings(
    adapter: str, recorded: dict, encoding: dict, loss_normalization: str | None
) -> None:
    """Refuse a text encoding (or loss normalisation) other than the one `adapter` was trained or unlearned
    with (`recorded`: `io.recorded_objective`): the rows would be another loss than the one it fits."""
    from .errors import ConfigurationError

    given = {**encoding, "loss_normalization": loss_normalization}
    expected = dict(recorded.get("text_encoding") or {})
    if recorded.get("loss_normalization") and loss_normalization is not None:
        expected["loss_normalization"] = recorded["loss_normalization"]
    if conflicts := {k: v for k, v in expected.items() if k in given and given[k] != v}:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in conflicts.items() if v is not None)
        raise ConfigurationError(
            f"{adapter} was trained with {conflicts} (its training record or manifest), but this run has "
            f"{ {k: given[k] for k in conflicts} }: the rows would be another loss than the one it fits. Pass "
            f"the recorded settings{' (' + flags + ')' if flags else ''}."
        )


def prepare_unlearn(paths: UnlearnPaths, encoding, args):
    """What `unlearn_adapter_directory` (`hf-unlearn unlearn`) settles before loading a model; returns
    `(args, train, request, history)`.

    Takes K-FAC factors or a Nyström sketch saved beside the adapter (`curvature_factors="auto"`) and μ from
    its training record or manifest (`l2_regularization=None`); refuses a text encoding or loss normalisation
    other than the recorded ones, an output directory that overlaps an input, and a request or training file
    that disagrees with earlier unlearning runs of the adapter.
    """
    from .curvature.kfac import KFACFactors
    from .curvature.nystrom import NystromSketch
    from .curvature.setup import needs_factors, needs_sketch
    from .data import TrainingSet
    from .distributed import check_curvature_supported
    from .io import check_output_dir, read_history, recorded_objective
    from .models import check_adapter_dir
    from .request import UnlearningRequest, check_against_history

    # objective_estimate 'auto' is resolved against the model later; it takes the quadratic estimate (on
    # factors) wherever that applies — never with a preconditioner —, so saved factors are handed on for it too
    may_use_factors = needs_factors(args) or (
        args.objective_estimate == "auto" and args.preconditioner == "none"
    )
    saved_beside = (may_use_factors and KFACFactors.exists(paths.adapter)) or (
        needs_sketch(args) and NystromSketch.exists(paths.adapter)  # left by an earlier request
    )
    if args.curvature_factors == "auto" and saved_beside:
        args = dataclasses.replace(args, curvature_factors=paths.adapter)
    recorded = recorded_objective(paths.adapter) or {}
    if args.l2_regularization is None:  # the objective the adapter was trained on
        args = dataclasses.replace(args, l2_regularization=recorded.get("l2_regularization") or 0.0)
    check_recorded_settings(paths.adapter, recorded, vars(encoding), args.loss_normalization)
    check_curvature_supported(args.curvature)  # FSDP / ZeRO-3 launches fail here, before loading anything
    inputs = {"--adapter": paths.adapter, "--train-file": paths.train_file, "--request": paths.request}
    check_output_dir(paths.output_dir, paths.overwrite, inputs)
    check_adapter_dir(paths.adapter)
    train = TrainingSet.from_jsonl(paths.train_file)
    request = UnlearningRequest.from_jsonl(paths.request)
    history = read_history(paths.adapter)
    key = unlearn_digest_key(paths.train_file, paths.digest_key, paths.adapter)
    check_against_history(request, train, history, key)  # the specific messages first
    check_training_file(paths, train, key)
    return args, train, request, history
