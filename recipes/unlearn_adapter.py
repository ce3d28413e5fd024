"""Unlearn rows from a trained LoRA adapter with the Python API, on one or many processes.

The same pipeline as `hf-unlearn unlearn` (`hf_unlearn.unlearn_adapter_directory`: pre-flight, load, solve
with the rows sharded over the processes and the sums all-reduced, forget check, the main process writes the
adapter, manifest and model card), called from a script that a launcher starts on every process. To adapt a
phase (another task, another loader), see the named phases in `hf_unlearn/pipeline.py`.

    python recipes/unlearn_adapter.py --model BASE --adapter ADAPTER --train-file train.jsonl \\
        --request request.jsonl --output-dir unlearned --damping 0.1
    torchrun --standalone --nproc_per_node 2 recipes/unlearn_adapter.py ...
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/unlearn_adapter.py ...
"""

from __future__ import annotations

from transformers import HfArgumentParser

from hf_unlearn import TextEncoding, UnlearningArguments, UnlearnPaths, unlearn_adapter_directory


def main(argv=None):
    parser = HfArgumentParser((UnlearnPaths, TextEncoding, UnlearningArguments))
    paths, encoding, args = parser.parse_args_into_dataclasses(argv)
    done = unlearn_adapter_directory(paths, encoding, args)
    if done.output_dir is not None:  # the main process wrote it
        print(f"on {done.manifest['num_processes']} process(es): {done.summary()}")


if __name__ == "__main__":
    main()
