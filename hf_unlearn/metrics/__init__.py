"""Local `evaluate` metric modules (`evaluate.load` of a Hub name does not work offline).

import evaluate
from hf_unlearn.metrics import METRICS
evaluate.load(METRICS["sequence_exact_match"])

The unlearning metrics (truth ratio, forget quality, Min-K%++, PrivLeak) are also plain functions in
`hf_unlearn.metrics.functional`.
"""

from pathlib import Path

METRICS = {
    name: str(Path(__file__).with_name(f"{name}.py"))
    for name in (
        "sequence_exact_match",
        "membership_auc",
        "truth_ratio",
        "forget_quality",
        "min_k_plus_plus",
        "privleak",
    )
}
