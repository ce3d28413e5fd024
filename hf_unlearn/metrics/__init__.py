"""Local `evaluate` metric modules (`evaluate.load` of a Hub name does not work offline).

import evaluate
from hf_unlearn.metrics import METRICS
evaluate.load(METRICS["sequence_exact_match"])
"""

from pathlib import Path

METRICS = {
    name: str(Path(__file__).with_name(f"{name}.py")) for name in ("sequence_exact_match", "membership_auc")
}
