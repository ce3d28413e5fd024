"""Unlearn rows from a trained LoRA adapter with the Python API, on one or many processes.

The same as `hf-unlearn unlearn`, written out so that it can be adapted (another task, another loader):
load the base model and the adapter, read the training rows and the request, `unlearn()` (rows sharded over
the processes, sums all-reduced), and the main process writes the adapter, manifest and model card.

    python recipes/unlearn_adapter.py --model BASE --adapter ADAPTER --train-file train.jsonl \\
        --request request.jsonl --output-dir unlearned --damping 0.1
    torchrun --standalone --nproc_per_node 2 recipes/unlearn_adapter.py ...
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/unlearn_adapter.py ...
"""

from __future__ import annotations

from transformers import HfArgumentParser

from hf_unlearn import TextEncoding, UnlearningArguments, unlearn
from hf_unlearn.distributed import barrier, join_process_group
from hf_unlearn.io import adapter_digest, build_manifest, save_unlearned_adapter, training_data_record
from hf_unlearn.models import adapter_dtype, load_adapter, load_base_model, load_tokenizer, tokenizer_source
from hf_unlearn.objective import causal_lm_task
from hf_unlearn.preflight import UnlearnPaths, prepare_unlearn, unlearn_digest_key
from hf_unlearn.request import using_digest_key


def main(argv=None):
    parser = HfArgumentParser((UnlearnPaths, TextEncoding, UnlearningArguments))
    paths, encoding, args = parser.parse_args_into_dataclasses(argv)
    # μ and factors saved with the adapter, output and input checks, the request against the training rows
    # (ids: the "id" field, else the line number) and against earlier runs: as `hf-unlearn unlearn` does
    args, train, request, history = prepare_unlearn(paths, encoding, args)
    processes = join_process_group()  # torchrun / accelerate launch; a no-op for one process

    tokenizer_path = tokenizer_source(paths.tokenizer, paths.adapter, paths.model)
    tokenizer = load_tokenizer(tokenizer_path, paths.trust_remote_code)
    input_digest, stored_dtype = adapter_digest(paths.adapter), adapter_dtype(paths.adapter)
    base = load_base_model(paths.model, args.torch_dtype, paths.trust_remote_code)
    model = load_adapter(base, paths.adapter, is_trainable=True)
    task = causal_lm_task(tokenizer, model, encoding)

    key = unlearn_digest_key(paths.train_file, paths.digest_key, paths.adapter)  # of the manifest's digests
    with using_digest_key(key):
        result = unlearn(model, train, request, args, task=task)

    if processes.is_main:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(stored_dtype)
        manifest = build_manifest(
            result,
            args,
            base_model=paths.model,
            input_adapter={"path": paths.adapter, "digest": input_digest},
            digest_key=key,
            training_data=training_data_record(paths.train_file, train, key),
            text_encoding=vars(encoding),
            history=history,
        )
        save_unlearned_adapter(
            model, paths.output_dir, manifest, overwrite=paths.overwrite, card_source=paths.adapter,
            base_model_id=paths.base_model_id, nystrom_sketch=result.nystrom_sketch,
        )  # fmt: skip
        s = result.stats
        print(
            f"{result.request.kind_counts()} on {processes.count} process(es): {s['iterations']} {args.solver} "
            f"iterations, residual {s['relative_residual']:.1e}, |Δθ| = {result.delta_norm:.4g}. "
            f"Wrote {paths.output_dir}"
        )
    barrier(processes)


if __name__ == "__main__":
    main()
