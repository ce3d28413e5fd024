"""Loss-based membership inference: AUC of telling members (label 1) from non-members (label 0) by a score.

The score is higher for what the attacker believes are members (e.g. the negative loss). 0.5 means the
attacker cannot tell them apart, which is what perfect unlearning of the members looks like.
"""

import datasets
import evaluate


class MembershipAUC(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Area under the ROC curve of a membership score (Mann–Whitney U, ties count one half).",
            citation="",
            inputs_description="predictions: membership scores; references: 1 for members, 0 for non-members.",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        members = [s for s, y in zip(predictions, references) if y == 1]
        others = [s for s, y in zip(predictions, references) if y == 0]
        if not members or not others:
            return {"auc": float("nan")}
        wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
        return {"auc": wins / (len(members) * len(others))}
