"""Forget / retain / test metrics of an adapter, KL to a reference adapter, and membership inference.

Exact match is computed by teacher forcing: a row counts when the argmax at every loss position is the
labelled token, which is exactly when greedy decoding from the prompt reproduces the response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import evaluate
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .metrics import METRICS
from .objective import CausalLMTask


def _logits(model, batch) -> torch.Tensor:
    """Next-token logits at every position but the last, at least in float32. (B, L-1, V)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _reference_logits(model, reference, batch) -> torch.Tensor:
    if not isinstance(reference, str):
        return _logits(reference, batch)
    active = model.active_adapter
    model.set_adapter(reference)
    try:
        return _logits(model, batch)
    finally:
        model.set_adapter(active)


@torch.no_grad()
def per_example(
    model, task: CausalLMTask, rows: Sequence[Mapping], batch_size: int = 8, reference=None
) -> dict:
    """Per-row token-mean loss, exact-match inputs and (with `reference`) token KL(reference ‖ model).

    `reference` is a model, or the name of another adapter loaded on the PEFT `model` (`model.load_adapter(
    path, adapter_name=...)`), which is switched to for its logits: one copy of the base model in memory."""
    was_training = model.training
    model.eval()
    try:
        out = {"loss": [], "tokens": [], "predicted": [], "target": [], "kl": []}
        device = next(model.parameters()).device
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in task.collate(rows[i : i + batch_size]).items()}
            logits = _logits(model, batch)  # (B, L-1, V)
            targets = batch["labels"][:, 1:]  # (B, L-1)
            mask = targets != IGNORE_INDEX
            nll = F.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            counts = mask.sum(1)
            out["loss"] += (nll.sum(1) / counts).tolist()
            out["tokens"] += counts.tolist()
            argmax = logits.argmax(-1)
            for b in range(len(targets)):
                out["predicted"].append(argmax[b][mask[b]].tolist())
                out["target"].append(targets[b][mask[b]].tolist())
            if reference is not None:
                ref = _reference_logits(model, reference, batch).log_softmax(-1)
                kl = F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none")  # (B, L-1, V)
                out["kl"] += (
                    (kl.sum(-1) * mask).sum(1) / counts
                ).tolist()  # KL(reference ‖ model), token mean
    finally:
        model.train(was_training)
    return out


def split_metrics(model, task, rows, batch_size: int = 8, reference=None) -> dict:
    """Token-weighted loss, exact match, and (with `reference`) KL for one split."""
    stats = per_example(model, task, rows, batch_size, reference)
    tokens = sum(stats["tokens"])
    result = {
        "num_rows": len(rows),
        "loss": sum(loss * n for loss, n in zip(stats["loss"], stats["tokens"])) / tokens,
        "exact_match": evaluate.load(METRICS["sequence_exact_match"]).compute(
            predictions=stats["predicted"], references=stats["target"]
        )["exact_match"],
    }
    if reference is not None:
        result["kl_to_reference"] = sum(k * n for k, n in zip(stats["kl"], stats["tokens"])) / tokens
    return result


def membership_auc(
    model, task, members: Sequence[Mapping], non_members: Sequence[Mapping], batch_size: int = 8
) -> float:
    """AUC of the loss-based attack (score = −loss) telling `members` from `non_members`; 0.5 = indistinguishable."""
    scores = [-x for x in per_example(model, task, members, batch_size)["loss"]]
    scores += [-x for x in per_example(model, task, non_members, batch_size)["loss"]]
    labels = [1] * len(members) + [0] * len(non_members)
    return evaluate.load(METRICS["membership_auc"]).compute(predictions=scores, references=labels)["auc"]


def evaluate_adapter(
    model,
    task: CausalLMTask,
    splits: Mapping[str, Sequence[Mapping]],
    reference=None,
    batch_size: int = 8,
) -> dict:
    """Metrics of `model` on each named split (e.g. forget/retain/test), plus the membership-inference AUC
    of the `forget` split against the `test` split when both are given."""
    report = {
        name: split_metrics(model, task, rows, batch_size, reference) for name, rows in splits.items() if rows
    }
    if splits.get("forget") and splits.get("test"):
        report["membership_auc"] = membership_auc(model, task, splits["forget"], splits["test"], batch_size)
    return report
