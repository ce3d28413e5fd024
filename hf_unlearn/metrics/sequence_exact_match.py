"""Exact match of whole token sequences: a prediction counts when every token equals the reference."""

import datasets
import evaluate


class SequenceExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of examples whose predicted token sequence equals the reference exactly.",
            citation="",
            inputs_description="predictions, references: lists of token-id sequences of equal length per example.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        hits = [list(p) == list(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else float("nan")}
