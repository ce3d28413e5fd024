"""Min-K%++ membership scores (Zhang et al. 2024, arXiv:2404.02936): per sequence, the mean of the k % lowest
token scores (log p(x_t) − μ_t) / σ_t, with μ_t and σ_t² the mean and variance of log p(z) for z drawn
from the model's next-token distribution. Higher = more likely a training member.
"""

import datasets
import evaluate

from hf_unlearn.metrics.functional import min_k_plus_plus


class MinKPlusPlus(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Min-K%++ membership score of each sequence (higher = more likely a member).",
            citation="Zhang et al., Min-K%++: Improved Baseline for Detecting Pre-Training Data from Large "
            "Language Models, 2024 (arXiv:2404.02936).",
            inputs_description="token_log_probs, means, variances: per scored token of each sequence, "
            "log p(x_t), and the mean and variance of log p(z) under the next-token distribution; k: the "
            "fraction of lowest tokens averaged (default 0.4).",
            features=datasets.Features(
                {
                    "token_log_probs": datasets.Sequence(datasets.Value("float64")),
                    "means": datasets.Sequence(datasets.Value("float64")),
                    "variances": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, token_log_probs, means, variances, k=0.4):
        return {"scores": [min_k_plus_plus(a, b, c, k) for a, b, c in zip(token_log_probs, means, variances)]}
