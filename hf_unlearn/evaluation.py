"""How an adapter does after unlearning, in the field's terms: utility kept, forget quality, privacy leakage.

Per split (forget / retain / test / nonmember): token-mean loss, exact match (teacher forcing: a row counts
when the argmax at every loss position is the labelled token, which is exactly when greedy decoding from the
prompt reproduces the response), KL to a reference adapter, and, for rows that carry a
`paraphrased_response` and `perturbed_responses` (`hf_unlearn.tofu`), TOFU's truth ratio and the fraction of
questions whose true answer is likelier than every perturbed one.

Across splits: membership inference of the forget rows against non-members (the `nonmember` split, else
`test`), by loss and by Min-K%++; across adapters (`compare`): TOFU's forget quality (KS test of the forget
rows' truth ratios against the retrained adapter's) and MUSE's PrivLeak. The definitions and references
are in `hf_unlearn.metrics.functional`; each metric is also a local `evaluate` module
(`hf_unlearn.metrics.METRICS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import evaluate
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .metrics import METRICS
from .metrics import functional as fn
from .objective import CausalLMTask

MIN_K = 0.4  # Min-K%++'s k (open-unlearning's and MUSE's setting)


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
    model,
    task: CausalLMTask,
    rows: Sequence[Mapping],
    batch_size: int = 8,
    reference=None,
    vocabulary_statistics: bool = False,
) -> dict:
    """Per-row token-mean loss, exact-match inputs and (with `reference`) token KL(reference ‖ model).

    `reference` is a model, or the name of another adapter loaded on the PEFT `model` (`model.load_adapter(
    path, adapter_name=...)`), which is switched to for its logits: one copy of the base model in memory.
    With `vocabulary_statistics`, also per loss token (in float64) log p(x_t) and the mean and variance of
    log p(z) under the next-token distribution: Min-K%++'s inputs (`"token_log_probs"`, `"means"`,
    `"variances"`)."""
    was_training = model.training
    model.eval()
    try:
        out = {"loss": [], "tokens": [], "predicted": [], "target": [], "kl": []}
        out |= {"token_log_probs": [], "means": [], "variances": []}
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
            if vocabulary_statistics:
                for b in range(len(targets)):
                    log_p = logits[b][mask[b]].double().log_softmax(-1)  # (T, V)
                    p = log_p.exp()
                    mean = (p * log_p).sum(-1)
                    out["means"].append(mean.tolist())
                    out["variances"].append((p * (log_p - mean[:, None]) ** 2).sum(-1).tolist())
                    out["token_log_probs"].append(
                        log_p.gather(1, targets[b][mask[b]][:, None])[:, 0].tolist()
                    )
            if reference is not None:
                ref = _reference_logits(model, reference, batch).log_softmax(-1)
                kl = F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none")  # (B, L-1, V)
                out["kl"] += (
                    (kl.sum(-1) * mask).sum(1) / counts
                ).tolist()  # KL(reference ‖ model), token mean
    finally:
        model.train(was_training)
    return out


def has_candidates(rows: Sequence[Mapping]) -> bool:
    """Whether every row carries a paraphrased and perturbed answers (TOFU's truth ratio can be computed)."""
    return bool(rows) and all("paraphrased_response" in r and r.get("perturbed_responses") for r in rows)


def candidate_losses(model, task, rows: Sequence[Mapping], batch_size: int = 8) -> tuple[list, list]:
    """Token-mean losses of each row's paraphrased answer and of each of its perturbed answers, after the
    row's prompt: `(paraphrased, perturbed)`, `perturbed[i]` a list per row."""
    flat = []
    for r in rows:
        flat.append({"prompt": r["prompt"], "response": r["paraphrased_response"]})
        flat += [{"prompt": r["prompt"], "response": p} for p in r["perturbed_responses"]]
    losses = iter(per_example(model, task, flat, batch_size)["loss"])
    paraphrased, perturbed = [], []
    for r in rows:
        paraphrased.append(next(losses))
        perturbed.append([next(losses) for _ in r["perturbed_responses"]])
    return paraphrased, perturbed


def truth_ratios(model, task, rows: Sequence[Mapping], batch_size: int = 8) -> dict:
    """TOFU's truth ratio of each row (`functional.truth_ratio`), its two aggregates, and
    `candidate_accuracy`: the fraction of rows whose paraphrased answer has a lower loss than every
    perturbed one (for QM's forget rows: whether the private detail in the prompt still picks the answer)."""
    paraphrased, perturbed = candidate_losses(model, task, rows, batch_size)
    result = evaluate.load(METRICS["truth_ratio"]).compute(
        paraphrased_losses=paraphrased, perturbed_losses=perturbed
    )
    result["candidate_accuracy"] = sum(p < min(q) for p, q in zip(paraphrased, perturbed)) / len(rows)
    return result


def _split_report(stats: dict, rows: Sequence[Mapping], with_kl: bool) -> dict:
    tokens = sum(stats["tokens"])
    result = {
        "num_rows": len(rows),
        "loss": sum(loss * n for loss, n in zip(stats["loss"], stats["tokens"])) / tokens,
        "exact_match": evaluate.load(METRICS["sequence_exact_match"]).compute(
            predictions=stats["predicted"], references=stats["target"]
        )["exact_match"],
    }
    if with_kl:
        result["kl_to_reference"] = sum(k * n for k, n in zip(stats["kl"], stats["tokens"])) / tokens
    return result


def split_metrics(model, task, rows, batch_size: int = 8, reference=None) -> dict:
    """Token-weighted loss, exact match, (with `reference`) KL, and (rows with candidates) truth ratios
    for one split."""
    result = _split_report(per_example(model, task, rows, batch_size, reference), rows, reference is not None)
    if has_candidates(rows):
        result |= truth_ratios(model, task, rows, batch_size)
    return result


def membership_scores(model, task, rows: Sequence[Mapping], batch_size: int = 8, k: float = MIN_K) -> dict:
    """Per-row membership scores, higher = more likely a training member: `loss` (the negative token-mean
    loss) and `min_k_plus_plus` (Min-K%++ with `k`)."""
    stats = per_example(model, task, rows, batch_size, vocabulary_statistics=True)
    return _membership_from(stats, k)


def _membership_from(stats: dict, k: float) -> dict:
    scores = evaluate.load(METRICS["min_k_plus_plus"]).compute(
        token_log_probs=stats["token_log_probs"], means=stats["means"], variances=stats["variances"], k=k
    )["scores"]
    return {"loss": [-x for x in stats["loss"]], "min_k_plus_plus": scores}


def _auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    return evaluate.load(METRICS["membership_auc"]).compute(
        predictions=list(members) + list(non_members), references=[1] * len(members) + [0] * len(non_members)
    )["auc"]


def membership_auc(
    model, task, members: Sequence[Mapping], non_members: Sequence[Mapping], batch_size: int = 8
) -> float:
    """AUC of the loss-based attack (score = −loss) telling `members` from `non_members`; 0.5 = indistinguishable."""
    scores = [-x for x in per_example(model, task, members, batch_size)["loss"]]
    others = [-x for x in per_example(model, task, non_members, batch_size)["loss"]]
    return _auc(scores, others)


def evaluate_adapter(
    model,
    task: CausalLMTask,
    splits: Mapping[str, Sequence[Mapping]],
    reference=None,
    batch_size: int = 8,
    k: float = MIN_K,
) -> dict:
    """Metrics of `model` on each named split (`split_metrics`), plus, when `forget` and non-members (the
    `nonmember` split, else `test`) are given, membership inference of the forget rows: `membership_auc`
    (loss attack), `min_k_plus_plus_auc`, and the per-row scores (`membership_scores`) that `compare`
    turns into PrivLeak."""
    report = {}
    non_member_split = "nonmember" if splits.get("nonmember") else "test"
    attacked = bool(splits.get("forget")) and bool(splits.get(non_member_split))
    scores = {}
    for name, rows in splits.items():
        if not rows:
            continue
        member_side = attacked and name in ("forget", non_member_split)
        stats = per_example(model, task, rows, batch_size, reference, vocabulary_statistics=member_side)
        report[name] = _split_report(stats, rows, reference is not None)
        if has_candidates(rows):
            report[name] |= truth_ratios(model, task, rows, batch_size)
        if member_side:
            scores[name] = _membership_from(stats, k)
    if attacked:
        forget, others = scores["forget"], scores[non_member_split]
        report["membership_auc"] = _auc(forget["loss"], others["loss"])
        report["min_k_plus_plus_auc"] = _auc(forget["min_k_plus_plus"], others["min_k_plus_plus"])
        report["membership"] = {
            "non_members": non_member_split,
            "k": k,
            "forget": forget,
            "non_member": others,
        }
    return report


def compare(reports: Mapping[str, dict], reference: str | None = "retrained") -> dict:
    """Side by side reports of several adapters (`evaluate_adapter`, e.g. original / unlearned /
    retrained) with, when `reference` names one of them, each other adapter's:

    - `forget_quality`: TOFU's KS test of its forget rows' truth ratios against the reference's
      (`forget_quality` = the p-value, `ks_statistic`, `forget_set_size`: the p-value depends on it);
    - `privleak`: MUSE's PrivLeak of the Min-K%++ attack against the reference's AUC, in percent
      (`privleak_loss`: the same for the loss attack)."""
    reports = {name: dict(r) for name, r in reports.items()}
    ref = reports.get(reference) if reference else None
    if ref is not None:
        ref_ratios = ref.get("forget", {}).get("truth_ratios")
        for name, r in reports.items():
            if name == reference:
                continue
            ratios = r.get("forget", {}).get("truth_ratios")
            if ratios and ref_ratios:
                r["forget_quality"] = evaluate.load(METRICS["forget_quality"]).compute(
                    predictions=ratios, references=ref_ratios
                )
            if "min_k_plus_plus_auc" in r and "min_k_plus_plus_auc" in ref:
                r["privleak"] = fn.privleak(r["min_k_plus_plus_auc"], ref["min_k_plus_plus_auc"])
                r["privleak_loss"] = fn.privleak(r["membership_auc"], ref["membership_auc"])
    sizes = {
        len(r["forget"]["truth_ratios"]) for r in reports.values() if "truth_ratios" in r.get("forget", {})
    }
    return {
        "reference": reference if ref is not None else None,
        "forget_set_size": sizes.pop() if len(sizes) == 1 else None,
        "adapters": reports,
    }


# (label, path into an adapter's report, format); `None` rows are section headings
TABLE_ROWS = [
    ("utility, retained rows", None, None),
    ("  loss", ("retain", "loss"), ".4f"),
    ("  exact match", ("retain", "exact_match"), ".3f"),
    ("  truth ratio, mean (1-R)+", ("retain", "truth_ratio"), ".3f"),
    ("  KL to reference", ("retain", "kl_to_reference"), ".4f"),
    ("utility, held-out rows", None, None),
    ("  loss", ("test", "loss"), ".4f"),
    ("  exact match", ("test", "exact_match"), ".3f"),
    ("  truth ratio, mean (1-R)+", ("test", "truth_ratio"), ".3f"),
    ("  KL to reference", ("test", "kl_to_reference"), ".4f"),
    ("forget rows", None, None),
    ("  loss", ("forget", "loss"), ".4f"),
    ("  exact match", ("forget", "exact_match"), ".3f"),
    ("  truth ratio, mean min(R,1/R)", ("forget", "truth_ratio_forget"), ".3f"),
    ("  true answer likeliest", ("forget", "candidate_accuracy"), ".3f"),
    ("  KL to reference", ("forget", "kl_to_reference"), ".4f"),
    ("  forget quality (KS p-value)", ("forget_quality", "forget_quality"), ".3g"),
    ("  KS statistic", ("forget_quality", "ks_statistic"), ".3f"),
    ("non-member rows", None, None),
    ("  loss", ("nonmember", "loss"), ".4f"),
    ("privacy", None, None),
    ("  membership AUC, loss", ("membership_auc",), ".3f"),
    ("  membership AUC, Min-K%++", ("min_k_plus_plus_auc",), ".3f"),
    ("  PrivLeak, Min-K%++ (%)", ("privleak",), ".1f"),
    ("  PrivLeak, loss (%)", ("privleak_loss",), ".1f"),
]


def _lookup(report: Mapping, path: tuple):
    value = report
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def format_table(comparison: Mapping) -> str:
    """One table of a `compare` result: rows are metrics, columns the adapters; rows no adapter has are
    left out."""
    names = list(comparison["adapters"])
    reports = comparison["adapters"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<34}" + "".join(f"{n:>{width}}" for n in names)]
    pending = None
    for label, path, spec in TABLE_ROWS:
        if path is None:
            pending = label
            continue
        values = [_lookup(reports[n], path) for n in names]
        if all(v is None for v in values):
            continue
        if pending:
            lines.append(pending)
            pending = None
        cells = "".join(
            f"{'-':>{width}}"
            if v is None or (isinstance(v, float) and math.isnan(v))
            else f"{v:>{width}{spec}}"
            for v in values
        )
        lines.append(f"{label:<34}" + cells)
    notes = []
    if comparison.get("reference"):
        notes.append(f"reference: {comparison['reference']} (KL, forget quality and PrivLeak are against it)")
    if comparison.get("forget_set_size"):
        notes.append(f"forget set: {comparison['forget_set_size']} rows (the KS p-value depends on it)")
    membership = next((r["membership"] for r in reports.values() if "membership" in r), None)
    if membership:
        notes.append(
            f"membership: forget rows against the {membership['non_members']} rows; AUC 0.5 = indistinguishable,"
            f" Min-K%++ k = {membership['k']}"
        )
    return "\n".join(lines + notes)
