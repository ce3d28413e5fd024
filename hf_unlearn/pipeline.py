"""Unlearn an adapter directory: what `hf-unlearn unlearn` and `recipes/unlearn_adapter.py` do, as named phases.

    from hf_unlearn.pipeline import UnlearnPaths, unlearn_adapter_directory

    done = unlearn_adapter_directory(UnlearnPaths(model=..., adapter=..., train_file=..., request=...,
                                                  output_dir=...))
    print(done.summary())

Phases: pre-flight (`preflight.prepare_unlearn`: saved curvature and μ, input and output checks, before
loading a model) → load (tokenizer, base model checked against the adapter's record, adapter, task) → solve
(`eraser.unlearn`, rows sharded over the processes of a torchrun / accelerate launch) → check the forgetting
(the removed rows' loss against what retraining would plausibly give) → write (the main process: adapter in
its stored dtype, manifest, card, curvature for the next request; atomically).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import UnlearningArguments
from .data import TextEncoding
from .errors import ConfigurationError
from .preflight import UnlearnPaths, compare_training_file, prepare_unlearn, unlearn_digest_key

if TYPE_CHECKING:
    from .eraser import UnlearningResult

# Over-forgetting: retraining would leave the removed rows about as likely as rows never trained on.
OVER_FORGETTING_AUC = 0.1  # removed rows vs held-out rows (0.5: indistinguishable, as after retraining)
OVER_FORGETTING_BASE_RATIO = 1.1  # removed rows' loss vs the base model's (never trained on them) on them


@dataclass
class UnlearnedAdapter:
    """What `unlearn_adapter_directory` did. On processes other than the main one of a multi-process launch
    only `result` is set (the main process writes)."""

    result: UnlearningResult
    args: UnlearningArguments  # as run: with the saved curvature and μ pre-flight filled in
    output_dir: Path | None = None
    manifest: dict | None = None
    forget_check: dict | None = None  # `judge_forgetting`'s record (also in the manifest)
    overrides: list[str] = field(default_factory=list)  # the input checks the user overrode, in words

    def summary(self) -> str:
        """The one-line report `hf-unlearn unlearn` prints."""
        s, result = self.result.stats, self.result
        inexact = " — INEXACT: kept with --allow-inexact before reaching --tol" if s.get("inexact") else ""
        return (
            f"Unlearned {result.request.kind_counts()} with {self.args.solver}: {s['iterations']} iterations, "
            f"relative residual {s['relative_residual']:.2e}{inexact}, |Δθ| = {result.delta_norm:.4g}, "
            f"{result.timings['total_seconds']:.1f} s; {describe_steps(s)}; forget-set loss "
            f"{s['forget_loss_before']:.4g} → {s['forget_loss_after']:.4g} per token ({self.forget_check['summary']})"
            + "".join(f"; {note}" for note in self.overrides)
            + f". Wrote {self.output_dir}"
        )


def unlearn_adapter_directory(
    paths: UnlearnPaths,
    encoding: TextEncoding | None = None,
    args: UnlearningArguments | None = None,
    *,
    threads: dict | None = None,
) -> UnlearnedAdapter:
    """Apply `paths.request` to the adapter in `paths.adapter` and write the unlearned adapter, its manifest
    and card to `paths.output_dir`, as `hf-unlearn unlearn` does (which calls this). Under torchrun /
    accelerate launch every process calls it; the rows are sharded and the main process writes.

    `threads` is recorded in the manifest (default: torch's thread count, as the caller set it). Raises the
    domain errors of `hf_unlearn.errors`; on any error nothing is written."""
    from .distributed import barrier, join_process_group
    from .request import using_digest_key

    encoding = encoding if encoding is not None else TextEncoding()
    args = args if args is not None else UnlearningArguments()
    args, train, request, history = prepare_unlearn(paths, encoding, args)
    key = unlearn_digest_key(paths.train_file, paths.digest_key, paths.adapter)
    held_out = _held_out(paths)  # read before the solve: a missing file fails fast
    processes = join_process_group()  # under torchrun / accelerate launch; a no-op for one process
    loaded = _load(paths, encoding, args)
    with using_digest_key(key):  # a sampled Nyström sketch's row digests, saved beside the output
        result = _solve(loaded, train, request, args)
    done = UnlearnedAdapter(result=result, args=args)
    if processes.is_main:
        done.forget_check = forget_check(loaded.model, loaded.task, result, held_out)
        _write(done, loaded, paths, encoding, train, history, key, threads)
    barrier(processes)
    return done


@dataclass
class _Loaded:
    """The load phase's result: the adapter on its base model, the task, and what the inputs record."""

    model: object
    task: object
    input_digest: str
    stored_dtype: object
    weights: dict  # the base model's weights fingerprint and whether it matches the adapter's record


def _load(paths: UnlearnPaths, encoding: TextEncoding, args: UnlearningArguments) -> _Loaded:
    from .io import adapter_digest, model_weights_fingerprint
    from .models import adapter_dtype, load_adapter, load_base_model, load_tokenizer, tokenizer_source
    from .objective import causal_lm_task

    tokenizer = load_tokenizer(
        tokenizer_source(paths.tokenizer, paths.adapter, paths.model), paths.trust_remote_code
    )
    base = load_base_model(paths.model, args.torch_dtype, paths.trust_remote_code)
    weights = model_weights_fingerprint(base)
    weights["matches_record"] = check_base_model(paths, weights)
    if weights["matches_record"] is False:  # check_base_model refused it unless overridden
        weights["overridden_by"] = "--allow-base-model-mismatch"
    model = load_adapter(base, paths.adapter)
    return _Loaded(
        model=model,
        task=causal_lm_task(tokenizer, model, encoding),
        input_digest=adapter_digest(paths.adapter),
        stored_dtype=adapter_dtype(paths.adapter),
        weights=weights,
    )


def _solve(loaded: _Loaded, train, request, args: UnlearningArguments):
    from .eraser import unlearn

    return unlearn(loaded.model, train, request, args, task=loaded.task)


def _held_out(paths: UnlearnPaths) -> list[dict] | None:
    from .data import read_jsonl

    return read_jsonl(paths.held_out_file, what="--held-out-file") if paths.held_out_file else None


def _write(done, loaded, paths, encoding, train, history, key, threads) -> None:
    """The main process writes the adapter in the dtype it came in, the manifest and the card, atomically."""
    import torch

    from .io import build_manifest, save_unlearned_adapter, training_data_record
    from .request import rows_digests

    for p in loaded.model.parameters():
        if p.requires_grad:
            p.data = p.data.to(loaded.stored_dtype)
    result = done.result
    training_data = training_data_record(paths.train_file, train, key)
    # prepare_unlearn refused a file other than the recorded one unless overridden: record the override
    training_check = compare_training_file(paths, training_data)
    if training_check["matches_record"] is False:
        training_check["overridden_by"] = "--allow-training-file-mismatch"
    done.overrides = overrides(training_check, loaded.weights)
    done.manifest = build_manifest(
        result,
        done.args,
        base_model=paths.model,
        base_model_weights=loaded.weights,
        input_adapter={"path": paths.adapter, "digest": loaded.input_digest},
        digest_key=key,
        training_data=training_data,
        training_data_check=training_check,
        # what the next request's training file must be (hf-unlearn apply-request writes it)
        edited_training_data=rows_digests(*result.request.edited_training_set(train), key),
        text_encoding=vars(encoding),
        history=history,
        forget_check=done.forget_check,
        threads=threads or {"threads": torch.get_num_threads(), "rule": "as the caller set it"},
    )
    done.output_dir = save_unlearned_adapter(
        loaded.model,
        paths.output_dir,
        done.manifest,
        overwrite=paths.overwrite,
        card_source=paths.adapter,
        base_model_id=paths.base_model_id,
        handed_on=[c for c in (result.nystrom_sketch, result.curvature_factors) if c is not None],
    )


def check_base_model(paths: UnlearnPaths, weights: dict) -> bool | None:
    """Refuse a base model whose weights fingerprint (`io.model_weights_fingerprint`) is not the one
    `paths.adapter` records, saying what differs, unless `paths.allow_base_model_mismatch`. Returns whether
    it matches (None: nothing recorded)."""
    from .io import recorded_base_model_weights

    recorded, where = recorded_base_model_weights(paths.adapter)
    if recorded is None:
        return None
    if recorded["fingerprint"] == weights["fingerprint"]:
        return True
    if paths.allow_base_model_mismatch:
        return False
    what = (
        "the same parameter names and shapes, but other values"
        if recorded.get("layout") == weights["layout"]
        else "other parameter names or shapes"
    )
    raise ConfigurationError(
        f"The base model {paths.model!r} is not the one {paths.adapter} was trained on: it has {what} (weights "
        f"fingerprint {weights['fingerprint'][:19]}…, {where} records {recorded['fingerprint'][:19]}…). Give the "
        "base model the adapter was trained on, or pass --allow-base-model-mismatch if you know why it differs."
    )


def overrides(training_check: dict, weights: dict) -> list[str]:
    """The success line's notes of the input checks the user overrode (recorded in the manifest too)."""
    notes = []
    if training_check.get("overridden_by"):
        notes.append(
            f"OVERRIDDEN: the training file is not the one the adapter records ({training_check['differs']}); "
            f"used with {training_check['overridden_by']}"
        )
    if weights.get("overridden_by"):
        notes.append(
            "OVERRIDDEN: the base model's weights are not those the adapter records; used with "
            "--allow-base-model-mismatch"
        )
    return notes


def describe_steps(stats: dict) -> str:
    """Which objective estimate ran, how many Newton steps it kept and what they passed over, in a few words."""
    choice = stats["objective_estimate_choice"]
    steps = stats.get("refine", [])
    kept = sum(1 for step in steps if step.get("accepted", True)) if steps else 1
    over = "the request's rows only" if choice["kind"] != "full" else "every training row"
    text = f"objective estimate {choice['kind']}, {kept} Newton step{'s' * (kept != 1)} over {over}"
    if choice["asked"] == "auto" and choice["kind"] == "full":
        text += f" (auto chose full: {choice['because']})"
    if attempts := stats.get("kept_loss_attempts"):
        text += (
            f"; λ raised to {stats['damping']:g} after the kept rows' loss rose ({len(attempts)} attempts, "
            f"kept-rows loss {stats['retain_check']['loss_before']:.3g} → {stats['retain_check']['loss_after']:.3g})"
        )
    return text


def judge_forgetting(before: float, after: float, reference: str, reference_loss: float, auc=None) -> dict:
    """The forget-set loss change against what retraining would plausibly give: the held-out rows' loss (and
    the membership AUC of the removed rows against them; retraining gives about 0.5), else the base model's
    loss on the removed rows themselves. `warning` names an over-forgetting that makes the rows stand out.

    The record is written beside the adapter, so it holds no loss of the removed rows (`before`, `after`, the
    base model's on them): with the published adapter or base model, such a figure tests guesses of their
    content. The success line prints `before` and `after` to the user who ran the request."""
    if reference == "held-out rows":
        summary = f"held-out rows {reference_loss:.4g}; membership AUC {auc:.2f}, retraining ≈ 0.5"
        over = auc < OVER_FORGETTING_AUC
        why = (
            f"the removed rows now have a higher loss than held-out rows (membership AUC {auc:.2f}; retraining "
            "would give about 0.5)"
        )
    else:
        over = after > OVER_FORGETTING_BASE_RATIO * reference_loss
        summary = f"{'above' if over else 'not above'} the base model's without the adapter"
        why = (
            f"the removed rows' loss is more than {OVER_FORGETTING_BASE_RATIO:g}× the base model's, which never "
            "saw them: retraining would plausibly leave it at or below that"
        )
    warning = (
        f"{why}; over-forgetting makes them stand out to a membership-inference attack. A larger --damping "
        "shrinks the update."
        if over
        else None
    )
    return {
        "definition": "cross-entropy per loss token (token-weighted mean, as hf-unlearn evaluate)",
        "reference": reference,
        **({"reference_loss": reference_loss, "membership_auc": auc} if auc is not None else {}),
        "over_forgetting": over,
        "warning": warning,
        "summary": summary,
    }


def forget_check(model, task, result, held_out=None) -> dict:
    """`judge_forgetting` for an unlearned PEFT `model`: the old versions of the request's rows against
    `held_out` rows (membership AUC as `hf-unlearn evaluate`), else against the base model (adapter off)."""
    from .evaluation import membership_auc, split_metrics

    old = result.request.old
    before, after = result.stats["forget_loss_before"], result.stats["forget_loss_after"]
    if held_out:
        reference = split_metrics(model, task, held_out)["loss"]
        return judge_forgetting(
            before, after, "held-out rows", reference, membership_auc(model, task, old, held_out)
        )
    with model.disable_adapter():
        reference = split_metrics(model, task, old)["loss"]
    return judge_forgetting(before, after, "base model without the adapter", reference)


__all__ = ["UnlearnPaths", "UnlearnedAdapter", "judge_forgetting", "unlearn_adapter_directory"]
