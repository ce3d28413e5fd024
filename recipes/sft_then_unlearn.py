"""LoRA fine-tune with `UnlearnTrainer`, then take rows back out of the live adapter, in one script.

    python recipes/sft_then_unlearn.py --model BASE --train-file train.jsonl --request request.jsonl \\
        --output-dir out --epochs 3 --learning-rate 2e-4 --unlearn-damping 0.1
    torchrun --standalone --nproc_per_node 2 recipes/sft_then_unlearn.py ...
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sft_then_unlearn.py ...

Writes `out/trained` (the adapter after training, as `hf-unlearn train` would) and `out/unlearned` (after
the request, with `unlearning_manifest.json` and the model card section). Training is data-parallel over
the launched processes; the unlearning shards the rows over the same processes and equals a one-process run.
Request ids are the training rows' `"id"` fields (else their line numbers). The training flags are those
of `hf-unlearn train` (`--l2-regularization` and `--capture-curvature` apply to the unlearning too); the
unlearning flags are those of `hf-unlearn unlearn` with an `--unlearn-` prefix (`--unlearn-damping`,
`--unlearn-dtype`, `--unlearn-batch-size`, ...).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_unlearn import TextEncoding, UnlearningArguments, UnlearningRequest, UnlearnTrainer
from hf_unlearn.distributed import barrier, check_curvature_supported
from hf_unlearn.errors import ConfigurationError
from hf_unlearn.io import check_output_dir
from hf_unlearn.training import TrainConfig, prepare_training, save_trained_adapter, training_record


@dataclass
class RecipeArgs:
    request: str = field(metadata={"help": "JSON-lines unlearning request (remove/replace rows)."})


def main(argv=None):
    parser = HfArgumentParser((RecipeArgs, TrainConfig, TextEncoding))
    recipe, config, encoding, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    unlearning_flags = [a.replace("--unlearn-", "--", 1) if a.startswith("--unlearn-") else a for a in rest]
    (unlearning_args,) = HfArgumentParser(
        UnlearningArguments, prog="--unlearn-*"
    ).parse_args_into_dataclasses(unlearning_flags)
    # One objective for training and unlearning: μ and the curvature capture of the training flags (an
    # --unlearn- flag that contradicts them is refused)
    if unlearning_args.l2_regularization not in (None, config.l2_regularization):
        raise ConfigurationError(
            f"--unlearn-l2-regularization {unlearning_args.l2_regularization} differs from the "
            f"--l2-regularization {config.l2_regularization} the adapter is trained with; give only the latter."
        )
    unlearning_args = dataclasses.replace(
        unlearning_args,
        l2_regularization=config.l2_regularization,
        capture_curvature=config.capture_curvature or unlearning_args.capture_curvature,
    )
    check_curvature_supported(unlearning_args.curvature)  # fail before training, not after
    out = Path(config.output_dir)
    check_output_dir(out, config.overwrite)
    request = UnlearningRequest.from_jsonl(recipe.request)

    setup = prepare_training(config, encoding)
    trainer = UnlearnTrainer(
        model=setup.model,
        args=setup.args,
        train_dataset=setup.rows,
        data_collator=setup.task.collate,  # the collator the unlearning reads the rows with, too
        processing_class=setup.tokenizer,
        unlearning_args=unlearning_args,
    )
    start = time.perf_counter()
    output = trainer.train()
    record = training_record(config, encoding, setup, output, time.perf_counter() - start)
    if setup.processes.is_main:
        save_trained_adapter(
            setup.model, setup.tokenizer, record, out / "trained", config.overwrite, trainer.curvature_factors
        )

    # The JSONL ids ("person-3", ...) address `setup.train_set`, the rows the Trainer trained on, in order.
    result = trainer.unlearn(request, train_dataset=setup.train_set)
    trainer.save_model(str(out / "unlearned"))
    if setup.processes.is_main:
        s = result.stats
        print(
            f"Trained {output.global_step} steps (loss {output.training_loss:.4g}), then unlearned "
            f"{result.request.kind_counts()} on {s['num_processes']} process(es): {s['iterations']} iterations, "
            f"residual {s['relative_residual']:.1e}, |Δθ| = {result.delta_norm:.4g}. Wrote {out}/trained and "
            f"{out}/unlearned"
        )
    barrier(setup.processes)


if __name__ == "__main__":
    main()
