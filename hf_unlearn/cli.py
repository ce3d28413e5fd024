"""`hf-unlearn` command line (also `python -m hf_unlearn`, `torchrun`, `accelerate launch`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = {
    "unlearn": "Apply an unlearning request to a LoRA adapter and write the corrected adapter.",
    "train": "LoRA fine-tune a causal LM on a JSON-lines file with the HF Trainer.",
}


@dataclass
class UnlearnPaths:
    """Inputs and output of `hf-unlearn unlearn`."""

    model: str = field(metadata={"help": "Base model: a local directory or .gguf file."})
    adapter: str = field(metadata={"help": "The trained PEFT adapter directory (never modified)."})
    train_file: str = field(metadata={"help": "JSON-lines training data the adapter was trained on."})
    request: str = field(metadata={"help": "JSON-lines unlearning request (remove/replace rows)."})
    output_dir: str = field(metadata={"help": "Where to write the unlearned adapter."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer for text rows (default: the base model's, if it has one)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model dir."}
    )


def unlearn_command(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from .config import UnlearningArguments
    from .data import ExampleEncoder, TextEncoding, TrainingSet
    from .distributed import barrier, check_curvature_supported, join_process_group
    from .eraser import default_task, unlearn
    from .errors import ConfigurationError
    from .io import adapter_digest, build_manifest, check_output_dir, file_digest, save_unlearned_adapter
    from .models import adapter_dtype, has_tokenizer, load_adapter, load_base_model, load_tokenizer
    from .request import UnlearningRequest

    parser = HfArgumentParser((UnlearnPaths, TextEncoding, UnlearningArguments), prog="hf-unlearn unlearn")
    paths, encoding, args = parser.parse_args_into_dataclasses(argv)
    check_curvature_supported(args.curvature)  # FSDP / ZeRO-3 launches fail here, before loading anything
    processes = join_process_group()  # under torchrun / accelerate launch

    if Path(paths.output_dir).resolve() == Path(paths.adapter).resolve():
        raise ConfigurationError(
            "--output-dir must differ from --adapter: the input adapter is never modified."
        )
    check_output_dir(paths.output_dir, paths.overwrite)
    train = TrainingSet.from_jsonl(paths.train_file)
    request = UnlearningRequest.from_jsonl(paths.request)
    input_digest = adapter_digest(paths.adapter)
    stored_dtype = adapter_dtype(paths.adapter)

    tokenizer_path = paths.tokenizer or (paths.model if has_tokenizer(paths.model) else None)
    tokenizer = load_tokenizer(tokenizer_path, paths.trust_remote_code)
    model = load_adapter(
        load_base_model(paths.model, args.torch_dtype, paths.trust_remote_code), paths.adapter
    )
    task = default_task(model, tokenizer)
    task.encoder = ExampleEncoder(tokenizer, encoding)

    result = unlearn(model, train, request, args, task=task)

    if processes.is_main:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(stored_dtype)  # write the adapter in the dtype it came in
        manifest = build_manifest(
            result,
            args,
            base_model=paths.model,
            input_adapter={"path": paths.adapter, "digest": input_digest},
            training_data={
                "path": paths.train_file,
                "digest": file_digest(paths.train_file),
                "num_rows": len(train),
            },
            text_encoding=vars(encoding),
        )
        out = save_unlearned_adapter(model, paths.output_dir, manifest, overwrite=paths.overwrite)
        s = result.stats
        print(
            f"Unlearned {result.request.summary()['kinds']} with {args.solver}: {s['iterations']} iterations, "
            f"relative residual {s['relative_residual']:.2e}, |Δθ| = {result.delta_norm:.4g}, "
            f"{result.timings['total_seconds']:.1f} s. Wrote {out}"
        )
    barrier(processes)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import UnlearningError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (
            "usage: hf-unlearn {"
            + ",".join(COMMANDS)
            + "} ...\n\ncommands:\n"
            + "".join(f"  {name:<10} {text}\n" for name, text in COMMANDS.items())
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-unlearn: error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    try:
        from .training import train_command

        return {"unlearn": unlearn_command, "train": train_command}[argv[0]](argv[1:])
    except UnlearningError as e:
        print(f"hf-unlearn {argv[0]}: error: {e}", file=sys.stderr)
        return e.exit_code
