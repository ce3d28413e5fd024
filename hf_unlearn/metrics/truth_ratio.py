"""TOFU's truth ratio (Maini et al. 2024, arXiv:2401.06121): for each question, how much more likely the
model finds perturbed (wrong) answers than a paraphrased true one, from token-mean losses.

R = exp(paraphrased_loss − mean(perturbed_losses)) (TOFU's code: geometric mean over the perturbed answers).
Aggregates: `truth_ratio` = mean max(0, 1 − R) (retained / held-out data: higher is better utility) and
`truth_ratio_forget` = mean min(R, 1/R) (the forget set). Per-question ratios in `truth_ratios`.
"""

import datasets
import evaluate

from hf_unlearn.metrics.functional import truth_ratio, truth_ratio_scores


class TruthRatio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="TOFU truth ratio: perturbed vs paraphrased answer likelihood, per question and aggregated.",
            citation="Maini et al., TOFU: A Task of Fictitious Unlearning for LLMs, 2024 (arXiv:2401.06121).",
            inputs_description="paraphrased_losses: token-mean loss of each question's paraphrased answer; "
            "perturbed_losses: token-mean losses of its perturbed answers.",
            features=datasets.Features(
                {
                    "paraphrased_losses": datasets.Value("float64"),
                    "perturbed_losses": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, paraphrased_losses, perturbed_losses):
        ratios = [truth_ratio(p, q) for p, q in zip(paraphrased_losses, perturbed_losses)]
        return {**truth_ratio_scores(ratios), "truth_ratios": ratios}
