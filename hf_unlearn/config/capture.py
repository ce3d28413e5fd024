"""`TrainingCaptureArguments`: what `UnlearnTrainer` / `UnlearningCallback` do *during training* for the unlearning
to come. Training-time only: `hf-unlearn unlearn` does not offer these flags (`cli_args.hidden_flags`), and a
manifest's record of them is skipped when it is replayed with `--config`. (`hf-unlearn train` has its own
`--capture-curvature`, in `training.TrainConfig`.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import Concern


@dataclass
class TrainingCaptureArguments(Concern):
    """Collecting, during training, what the unlearning will reuse."""

    HELP_GROUP = "training-time capture (UnlearnTrainer, UnlearningCallback)"

    capture_curvature: bool = field(
        default=True,
        metadata={
            "help": "UnlearnTrainer / UnlearningCallback: collect K-FAC factors during the last training epoch "
            "from the training's own forward/backward passes and keep them for unlearning (saved beside the "
            "adapter by trainer.save_model / the callback's output_dir). On by default: it costs about a tenth of "
            "the last epoch's time; a model or run the capture cannot describe is logged and trained without it."
        },
    )


# The arguments no unlearning command (hf-unlearn unlearn, prepare) offers: they act while training.
TRAINING_TIME_ARGUMENTS = frozenset(f.name for f in TrainingCaptureArguments.__dataclass_fields__.values())
