"""A plain `transformers.Trainer` with `UnlearningCallback`, for launching on several processes in tests.

    torchrun --standalone --nproc_per_node 2 tests/scripts/callback_trainer.py --model BASE \
        --train-file train.jsonl --request request.jsonl --output-dir OUT [hf-unlearn train flags]

Writes OUT/trained (θ*, saved by a callback that runs before the unlearning) and OUT/unlearned.
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, Trainer, TrainerCallback

from hf_unlearn import TextEncoding, UnlearningArguments, UnlearningCallback, UnlearningRequest
from hf_unlearn.distributed import Processes
from hf_unlearn.training import TrainConfig, prepare_training


@dataclass
class ScriptArgs:
    request: str = field(metadata={"help": "JSON-lines request."})
    unlearn_dtype: str = field(default="float64")
    damping: float = field(default=20.0)


class SaveTrained(TrainerCallback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if Processes().is_main:
            model.save_pretrained(self.out)


def main():
    script, config, encoding = HfArgumentParser(
        (ScriptArgs, TrainConfig, TextEncoding)
    ).parse_args_into_dataclasses()
    out = Path(config.output_dir)
    setup = prepare_training(config, encoding)
    callback = UnlearningCallback(
        UnlearningRequest.from_jsonl(script.request),
        UnlearningArguments(
            dtype=script.unlearn_dtype,
            damping=script.damping,
            tol=1e-10,
            max_iter=500,
            progress=False,
            # factors by a pass over the training rows, as the one-process CLI run on the trained adapter
            # computes them (those captured while training see the distributed sampler's repeated rows)
            curvature_factors="pass",
        ),
        output_dir=str(out / "unlearned"),
        train_dataset=setup.train_set,  # the JSONL ids
    )
    trainer = Trainer(
        model=setup.model,
        args=setup.args,
        train_dataset=setup.rows,
        data_collator=setup.task.collate,
        callbacks=[SaveTrained(out / "trained"), callback],
    )
    trainer.train()
    if Processes().is_main:
        print(f"callback on {callback.result.stats['num_processes']} process(es). Wrote {out}")


if __name__ == "__main__":
    main()
