"""MUSE's PrivLeak (Shi et al. 2024, arXiv:2407.06460): how much more (or less) a membership attack tells
the forget set from unseen holdout data on the evaluated model than on the retrained one,
(AUC_model − AUC_retrained) / AUC_retrained · 100, with AUC in MUSE's orientation (one minus the usual
P(member scores higher)). 0 = as private as retraining; towards −100: the forget set is still recognised;
positive: it now looks less familiar than unseen data (over-unlearning).
"""

import datasets
import evaluate

from hf_unlearn.metrics.functional import auc, privleak


class PrivLeak(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="MUSE PrivLeak of a membership score against a retrained model's, in percent.",
            citation="Shi et al., MUSE: Machine Unlearning Six-Way Evaluation for Language Models, 2024 "
            "(arXiv:2407.06460).",
            inputs_description="predictions: membership scores (higher = member) of each row under the "
            "evaluated model; reference_predictions: the same rows' scores under the retrained model; "
            "references: 1 for forget rows, 0 for holdout rows.",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "reference_predictions": datasets.Value("float64"),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, reference_predictions, references):
        def split(scores):
            return (
                [s for s, y in zip(scores, references) if y == 1],
                [s for s, y in zip(scores, references) if y == 0],
            )

        model_auc, retrained_auc = auc(*split(predictions)), auc(*split(reference_predictions))
        return {
            "privleak": privleak(model_auc, retrained_auc),
            "auc": model_auc,
            "reference_auc": retrained_auc,
        }
