"""The unlearning metrics as plain Python functions on floats (no model, no tensors): TOFU's truth ratio and
forget quality, Min-K%++ and MUSE's PrivLeak. The `evaluate` modules beside this file wrap them, and
`hf_unlearn.evaluation` computes their inputs from a model.

References:
- TOFU: P. Maini, Z. Feng, A. Schwarzschild, Z. C. Lipton, J. Z. Kolter, "TOFU: A Task of Fictitious
  Unlearning for LLMs", 2024 (arXiv:2401.06121), and its code (locuslab/tofu, aggregate_eval_stat.py).
- MUSE: W. Shi, J. Lee, Y. Huang et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
  2024 (arXiv:2407.06460).
- Min-K%++: J. Zhang, J. Sun, E. Yeats, Y. Ouyang, M. Kuo, J. Zhang, H. F. Yang, H. Li, "Min-K%++: Improved
  Baseline for Detecting Pre-Training Data from Large Language Models", 2024 (arXiv:2404.02936).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float]) -> float:
    """TOFU's truth ratio of one question, R = P̃(perturbed) / P̃(paraphrased), from token-mean losses.

    P̃(a|q) = P(a|q)^(1/|a|) = exp(−token-mean loss of a). As in TOFU's code (and open-unlearning), the
    perturbed answers enter through the mean of their losses, i.e. the geometric mean of their P̃ (the paper
    writes an arithmetic mean): R = exp(paraphrased_loss − mean(perturbed_losses)). R < 1: the model prefers
    the (paraphrased) answer to wrong ones in the same wording; R ≈ 1: it cannot tell them apart."""
    if not perturbed_losses:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return math.exp(paraphrased_loss - math.fsum(perturbed_losses) / len(perturbed_losses))


def truth_ratio_scores(ratios: Sequence[float]) -> dict:
    """TOFU's two aggregates of per-question truth ratios R:

    - `truth_ratio`: mean of max(0, 1 − R), reported on retained and held-out data (higher = the model
      prefers true answers: utility);
    - `truth_ratio_forget`: mean of min(R, 1/R), reported on the forget set (1 = true and wrong answers
      equally likely)."""
    n = len(ratios)
    if not n:
        return {"truth_ratio": float("nan"), "truth_ratio_forget": float("nan")}
    return {
        "truth_ratio": math.fsum(max(0.0, 1.0 - r) for r in ratios) / n,
        "truth_ratio_forget": math.fsum(min(r, 1.0 / r) if r > 0 else 0.0 for r in ratios) / n,
    }


def ks_2samp(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov–Smirnov test: (statistic D, exact p-value P(D' ≥ D)).

    D = sup_t |F_x(t) − F_y(t)| over the empirical CDFs. The p-value is exact, as `scipy.stats.ks_2samp`'s
    default method for samples of up to 10,000: the fraction of the C(m+n, m) monotone lattice paths from
    (0, 0) to (m, n) that reach |i/m − j/n| ≥ D, counted in integers for D and as path probabilities (each
    cell's fraction of paths that have left the band) for the count, which keeps tiny p-values accurate.
    TOFU's forget quality is this p-value for the forget rows' truth ratios under the unlearned model
    against the retrained model's."""
    m, n = len(x), len(y)
    if not m or not n:
        raise ValueError("ks_2samp needs two non-empty samples")
    xs, ys = sorted(x), sorted(y)
    # D·m·n as an integer: |i·n − j·m| at every point where either ECDF steps
    i = j = 0
    d_num = 0
    while i < m or j < n:
        t = min(xs[i] if i < m else math.inf, ys[j] if j < n else math.inf)
        while i < m and xs[i] == t:
            i += 1
        while j < n and ys[j] == t:
            j += 1
        d_num = max(d_num, abs(i * n - j * m))
    # out[j]: fraction of paths to (i, j) that have reached |i·n − j·m| ≥ d_num
    out = [0.0] * (n + 1)
    for jj in range(n + 1):
        out[jj] = 1.0 if abs(jj * m) >= d_num or (jj and out[jj - 1] == 1.0) else 0.0
    for ii in range(1, m + 1):
        out[0] = 1.0 if abs(ii * n) >= d_num or out[0] == 1.0 else 0.0
        for jj in range(1, n + 1):
            if abs(ii * n - jj * m) >= d_num:
                out[jj] = 1.0
            else:
                out[jj] = (out[jj] * ii + out[jj - 1] * jj) / (ii + jj)
    return d_num / (m * n), min(1.0, out[n])


def min_k_plus_plus(
    token_log_probs: Sequence[float], means: Sequence[float], variances: Sequence[float], k: float = 0.4
) -> float:
    """Min-K%++ membership score of one sequence (Zhang et al. 2024): higher = more likely a member.

    Each token t gets (log p(x_t | x_<t) − μ_t) / σ_t, where μ_t = E_{z∼p(·|x_<t)} log p(z | x_<t) and
    σ_t² = E_z (log p(z | x_<t) − μ_t)² over the vocabulary; the score is the mean of the ⌊k·T⌋ lowest
    (at least one; T = the scored tokens). Variances are floored at 1e-6 as in open-unlearning's
    implementation. k = 0.4 is open-unlearning's and MUSE's setting."""
    z = [(lp - mu) / math.sqrt(max(var, 1e-6)) for lp, mu, var in zip(token_log_probs, means, variances)]
    if not z:
        return float("nan")
    lowest = sorted(z)[: max(1, int(len(z) * k))]
    return math.fsum(lowest) / len(lowest)


def auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """P(member score > non-member score), ties counted one half (Mann–Whitney): 0.5 = indistinguishable."""
    if not member_scores or not non_member_scores:
        return float("nan")
    wins = math.fsum((m > o) + 0.5 * (m == o) for m in member_scores for o in non_member_scores)
    return wins / (len(member_scores) * len(non_member_scores))


def privleak(auc_model: float, auc_retrained: float) -> float:
    """MUSE's PrivLeak in percent: the membership attack's AUC on (forget, holdout) relative to the
    retrained model's, (AUC_M − AUC_R) / AUC_R · 100, with AUC in MUSE's orientation, which is one minus
    the usual P(member scores higher) that `auc` returns (open-unlearning's `privleak` converts the same
    way). So 0 = as private as retraining; a model that still knows the forget set (usual AUC → 1) goes
    towards −100; one that forgot "too much" (forget rows now look less familiar than unseen ones) is positive."""
    muse_model, muse_retrained = 1.0 - auc_model, 1.0 - auc_retrained
    if muse_retrained == 0:
        return float("nan")
    return (muse_model - muse_retrained) / muse_retrained * 100.0
