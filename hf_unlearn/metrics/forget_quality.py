"""TOFU's forget quality (Maini et al. 2024, arXiv:2401.06121): the p-value of the two-sided two-sample
Kolmogorov–Smirnov test between the forget rows' truth ratios under the evaluated model and under the
retrained (reference) model. High p (≥ 0.05): the two distributions cannot be told apart. The p-value
depends on the sample sizes, which are returned with it.
"""

import datasets
import evaluate

from hf_unlearn.metrics.functional import ks_2samp


class ForgetQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="KS test of forget-set truth ratios against a retrained model's (TOFU forget quality).",
            citation="Maini et al., TOFU: A Task of Fictitious Unlearning for LLMs, 2024 (arXiv:2401.06121).",
            inputs_description="predictions: truth ratios of the forget rows under the evaluated model; "
            "references: the same rows' truth ratios under the retrained model.",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        statistic, p_value = ks_2samp(predictions, references)
        return {
            "forget_quality": p_value,
            "ks_statistic": statistic,
            "forget_set_size": len(predictions),
            "reference_set_size": len(references),
        }
