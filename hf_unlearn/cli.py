"""`hf-unlearn` command line (also `python -m hf_unlearn`, `torchrun`, `accelerate launch`)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cli_args import parse_arguments
from .preflight import UnlearnPaths, check_recorded_settings

COMMANDS = {
    "unlearn": "Apply an unlearning request to a LoRA adapter and write the corrected adapter.",
    "train": "LoRA fine-tune a causal LM on a JSON-lines file with the HF Trainer.",
    "demo": "Offline end-to-end demo on a real small LM: unlearn IR, QM and RC requests and compare with retraining.",
    "evaluate": "Utility, forget quality (TOFU) and privacy leakage (MUSE) of an adapter beside the original and retrained ones.",
    "push": "Publish an unlearned adapter directory to the Hugging Face Hub (--dry-run lists the files).",
    "apply-request": "Write the training file with a request applied: the one the next request's checks expect.",
    "prepare": "Once per adapter trained elsewhere: compute the K-FAC curvature factors requests reuse, beside it.",
}


@dataclass
class PreparePaths:
    """Inputs of `hf-unlearn prepare` (it writes into the adapter directory)."""

    model: str = field(metadata={"help": "Base model: a local directory or .gguf file."})
    adapter: str = field(
        metadata={"help": "The trained PEFT adapter directory; the factors are written into it."}
    )
    train_file: str = field(metadata={"help": "JSON-lines training data the adapter was trained on."})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer for text rows (default: the adapter directory's, else the base model's)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model dir."}
    )


def prepare_command(argv: list[str]) -> int:
    import time

    from .config import UnlearningArguments
    from .data import TextEncoding, TrainingSet
    from .eraser import prepare_curvature
    from .io import recorded_objective
    from .models import check_adapter_dir, load_adapter, load_base_model, load_tokenizer, tokenizer_source
    from .objective import causal_lm_task

    paths, encoding, args = parse_arguments(
        (PreparePaths, TextEncoding, UnlearningArguments), argv, "hf-unlearn prepare"
    )
    check_adapter_dir(paths.adapter)
    check_recorded_settings(
        paths.adapter, recorded_objective(paths.adapter) or {}, vars(encoding), args.loss_normalization
    )
    train = TrainingSet.from_jsonl(paths.train_file)
    tokenizer = load_tokenizer(
        tokenizer_source(paths.tokenizer, paths.adapter, paths.model), paths.trust_remote_code
    )
    model = load_adapter(
        load_base_model(paths.model, args.torch_dtype, paths.trust_remote_code), paths.adapter
    )
    task = causal_lm_task(tokenizer, model, encoding)
    start = time.perf_counter()
    factors = prepare_curvature(model, train, args, task=task)
    factors.save(paths.adapter)
    print(
        f"Wrote K-FAC curvature factors of {factors.info['num_rows']} training rows into {paths.adapter} "
        f"({time.perf_counter() - start:.1f} s): hf-unlearn unlearn reuses them for every request."
    )
    return 0


def unlearn_arguments(argv: list[str]) -> tuple:
    """`(paths, encoding, args)` of `hf-unlearn unlearn argv`: `UnlearnPaths`, `TextEncoding` and
    `UnlearningArguments`, with `--config FILE` (a YAML file or an earlier unlearning manifest) under the flags."""
    from .config import UnlearningArguments
    from .data import TextEncoding

    return parse_arguments(
        (UnlearnPaths, TextEncoding, UnlearningArguments), argv, "hf-unlearn unlearn", config=True
    )


def unlearn_command(argv: list[str]) -> int:
    from .pipeline import unlearn_adapter_directory

    paths, encoding, args = unlearn_arguments(argv)
    done = unlearn_adapter_directory(paths, encoding, args, threads=THREADS)
    if done.output_dir is not None:  # the main process wrote it
        print(done.summary())
        if warning := done.forget_check["warning"]:
            print(f"hf-unlearn unlearn: warning: {warning}", file=sys.stderr)
    return 0


@dataclass
class EvaluateArguments:
    """Arguments of `hf-unlearn evaluate`."""

    model: str = field(metadata={"help": "Base model: a local directory or .gguf file."})
    adapter: str = field(metadata={"help": "The PEFT adapter to evaluate (the 'unlearned' column)."})
    original_adapter: str | None = field(
        default=None, metadata={"help": "The adapter before unlearning (the 'original' column)."}
    )
    retrained_adapter: str | None = field(
        default=None,
        metadata={
            "help": "An adapter retrained without the forgotten rows (the 'retrained' column): the reference "
            "of KL, forget quality (KS test) and PrivLeak."
        },
    )
    reference_adapter: str | None = field(
        default=None, metadata={"help": "Same as --retrained-adapter (earlier name)."}
    )
    forget_file: str | None = field(default=None, metadata={"help": "JSONL rows that should be forgotten."})
    retain_file: str | None = field(default=None, metadata={"help": "JSONL training rows that are kept."})
    test_file: str | None = field(
        default=None, metadata={"help": "JSONL held-out rows (utility on unseen rows)."}
    )
    nonmember_file: str | None = field(
        default=None,
        metadata={
            "help": "JSONL rows like the forget rows but never trained on: the non-members of membership "
            "inference and PrivLeak (default: --test-file)."
        },
    )
    min_k: float = field(
        default=0.4, metadata={"help": "Min-K%%++'s k: the fraction of lowest tokens scored."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer for text rows (default: the adapter directory's, else the base model's)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    output_file: str | None = field(
        default=None, metadata={"help": "Also write the report to this JSON file."}
    )

    def __post_init__(self):
        from .errors import ConfigurationError

        if self.batch_size < 1:
            raise ConfigurationError(f"--batch-size must be ≥ 1, got {self.batch_size}.")
        if not 0 < self.min_k <= 1:
            raise ConfigurationError(f"--min-k must be in (0, 1], got {self.min_k}.")
        if (
            self.reference_adapter
            and self.retrained_adapter
            and self.reference_adapter != self.retrained_adapter
        ):
            raise ConfigurationError("--reference-adapter is another name of --retrained-adapter: give one.")
        self.retrained_adapter = self.retrained_adapter or self.reference_adapter
        if self.output_file and not Path(self.output_file).resolve().parent.is_dir():
            raise ConfigurationError(f"--output-file {self.output_file!r}: its directory does not exist.")


def evaluate_command(argv: list[str]) -> int:
    """Evaluate the adapter (and the original / retrained ones if given) on one base model in memory, print
    one table (rows: metrics; columns: original, unlearned, retrained) and optionally write the JSON."""
    import json

    import torch

    from .data import TextEncoding, read_jsonl
    from .errors import ConfigurationError
    from .evaluation import compare, evaluate_adapter, format_table
    from .io import recorded_objective, write_text_atomically
    from .models import check_adapter_dir, load_adapter, load_base_model, load_tokenizer, tokenizer_source
    from .objective import causal_lm_task

    args, encoding = parse_arguments((EvaluateArguments, TextEncoding), argv, "hf-unlearn evaluate")
    files = {"forget": args.forget_file, "retain": args.retain_file, "test": args.test_file}
    if not any(files.values()):
        raise ConfigurationError("Give at least one of --forget-file, --retain-file, --test-file.")
    files["nonmember"] = args.nonmember_file
    check_recorded_settings(args.adapter, recorded_objective(args.adapter) or {}, vars(encoding), None)
    splits = {name: read_jsonl(path, what=f"--{name}-file") for name, path in files.items() if path}
    columns = {
        "original": args.original_adapter,
        "unlearned": args.adapter,
        "retrained": args.retrained_adapter,
    }
    columns = {name: path for name, path in columns.items() if path}
    for path in columns.values():
        check_adapter_dir(path)
    tokenizer = load_tokenizer(tokenizer_source(args.tokenizer, args.adapter, args.model))
    model = load_adapter(load_base_model(args.model, torch.float32), args.adapter, is_trainable=False)
    names = {"unlearned": model.active_adapter}
    for name, path in columns.items():  # on the same base model, switched between
        if name != "unlearned":
            model.load_adapter(path, adapter_name=name, is_trainable=False)
            names[name] = name
    task = causal_lm_task(tokenizer, model, encoding)
    reference = "retrained" if "retrained" in columns else None
    reports = {}
    for name in columns:
        model.set_adapter(names[name])
        reports[name] = evaluate_adapter(
            model,
            task,
            splits,
            reference=None if name == reference else reference,
            batch_size=args.batch_size,
            k=args.min_k,
        )
    comparison = compare(reports, reference)
    print(format_table(comparison))
    print("loss: cross-entropy per loss token (token-weighted mean over the split's rows)")
    if args.output_file:
        write_text_atomically(Path(args.output_file), json.dumps(comparison, indent=2) + "\n")
    return 0


@dataclass
class PushArguments:
    """Arguments of `hf-unlearn push`."""

    adapter_dir: str = field(
        metadata={"help": "An unlearned adapter directory written by `hf-unlearn unlearn`."}
    )
    repo_id: str = field(metadata={"help": "Target Hub repository, e.g. my-org/my-adapter-unlearned."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    dry_run: bool = field(
        default=False, metadata={"help": "List exactly what would be uploaded; upload nothing."}
    )


def unkeyed_digest_files(folder: Path) -> list[str]:
    """Files in an adapter directory that hold unkeyed (plain SHA-256) digests of training rows."""
    import json

    from .io import MANIFEST_NAME

    found = []
    for name in (MANIFEST_NAME, "training_record.json", "nystrom_sketch.json"):
        path = folder / name
        if not path.is_file():
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        runs = [record.get("request") or {}] + [
            run.get("request") or {} for run in record.get("history") or []
        ]
        digests = [
            e.get(k) for run in runs for e in run.get("edits", []) for k in ("old_digest", "new_digest")
        ]
        digests += [(record.get("training_data") or {}).get("digest"), *record.get("row_digests", [])]
        if any(isinstance(d, str) and d.startswith("sha256:") for d in digests):
            found.append(name)
    return found


def push_command(argv: list[str]) -> int:
    from .errors import ConfigurationError
    from .io import MANIFEST_NAME, files_to_publish

    # The directory is positional, as in `hf-unlearn push OUT --repo-id ...`.
    if argv and not argv[0].startswith("-"):
        argv = ["--adapter_dir", argv[0], *argv[1:]]
    (args,) = parse_arguments((PushArguments,), argv, "hf-unlearn push")
    folder = Path(args.adapter_dir)
    required = ["adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME, "README.md"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ConfigurationError(
            f"{folder} is not an unlearned adapter directory (missing {', '.join(missing)})."
        )
    if leaking := unkeyed_digest_files(folder):
        raise ConfigurationError(
            f"{', '.join(leaking)} in {folder} hold plain SHA-256 digests of training rows (written by an older "
            "hf_unlearn): anyone could test guesses of a removed row against them. Unlearn again with this version "
            "(keyed digests), or delete those digests, before publishing."
        )
    files, local = files_to_publish(folder)  # hidden files and the curvature working files stay local
    if args.dry_run:
        print(f"Would upload to {args.repo_id} ({'private' if args.private else 'public'}):")
        for p in files:
            print(f"  {p.relative_to(folder)}\t{p.stat().st_size} bytes")
        if local:
            print(
                "Kept local (curvature derived from the training rows; the Trainer's pickled arguments): "
                + ", ".join(p.name for p in local)
            )
        return 0
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(
        repo_id=args.repo_id,
        folder_path=str(folder),
        allow_patterns=[str(p.relative_to(folder)) for p in files],  # exactly what --dry-run lists
        commit_message="Upload unlearned adapter (hf_unlearn)",
    )
    print(f"Uploaded {len(files)} files to {info}")
    return 0


@dataclass
class ApplyRequestArguments:
    """Arguments of `hf-unlearn apply-request`."""

    train_file: str = field(
        metadata={"help": "The training file the request was applied to (never modified)."}
    )
    request: str = field(metadata={"help": "The JSON-lines unlearning request (remove/replace rows)."})
    output: str = field(
        metadata={"help": "Where to write the edited training file (the next request's --train-file)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})
    digest_key: str | None = field(
        default=None,
        metadata={
            "help": "The digest key of the training file (default: .hf_unlearn_key beside it); copied beside "
            "the output when that is in another directory."
        },
    )


def apply_request_command(argv: list[str]) -> int:
    from .data import TrainingSet
    from .errors import ConfigurationError, OutputExistsError
    from .io import note_written, write_text_atomically
    from .objective import CausalLMTask
    from .request import DIGEST_KEY_NAME, DigestKey, UnlearningRequest, digest_key_path, edited_training_file

    (args,) = parse_arguments((ApplyRequestArguments,), argv, "hf-unlearn apply-request")
    output = Path(args.output)
    if output.resolve() == Path(args.train_file).resolve():
        raise ConfigurationError("--output is the training file itself; write the edited file elsewhere.")
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"{str(output)!r} exists; pass --overwrite to replace it.")
    if not output.resolve().parent.is_dir():
        raise ConfigurationError(f"--output {args.output!r}: its directory does not exist.")
    train = TrainingSet.from_jsonl(args.train_file)
    resolved = UnlearningRequest.from_jsonl(args.request).resolve(train, CausalLMTask())
    text = edited_training_file(args.train_file, resolved)
    key_path = Path(args.digest_key) if args.digest_key else digest_key_path(args.train_file)
    target_key = digest_key_path(output)
    if key_path.is_file() and target_key != key_path.resolve():  # the next run finds it beside the output
        DigestKey.load(key_path).copy_to(target_key)
    write_text_atomically(output, text)
    note_written(output)
    kept = len(train) - sum(e.new is None for e in resolved.edits)
    print(
        f"Applied {resolved.kind_counts()} to {args.train_file}: {kept} rows. Wrote {output}"
        + (f" (digest key {DIGEST_KEY_NAME} beside it)" if target_key.is_file() else "")
    )
    return 0


def demo_command(argv: list[str]) -> int:
    from .demo import DemoArguments, run_demo

    (args,) = parse_arguments((DemoArguments,), argv, "hf-unlearn demo")
    run_demo(args)
    return 0


# Threads: torch's default (one per core) spin-waits when other processes hold the cores: a GGN solve on a
# busy 2-core machine took 168 s with 2 threads and 11 s with 1 (benchmarks/threads.py measures it).
THREADS_RULE = (
    "OMP_NUM_THREADS if set; else the cores this process may use minus the 1-minute load average (rounded), "
    "at least 1 and at most torch's default"
)
THREADS: dict = {}  # what `choose_threads` chose, recorded in the manifest
TORCH_COMMANDS = ("unlearn", "train", "demo", "evaluate", "prepare")


def choose_threads() -> dict:
    """Set torch's thread count by `THREADS_RULE` and return what was chosen and why."""
    import torch

    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return {"threads": default, "rule": "OMP_NUM_THREADS"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(default, round(cores - load)))
    torch.set_num_threads(threads)
    return {"threads": threads, "rule": THREADS_RULE, "cores": cores, "load_average": round(load, 2)}


def package_version() -> str:
    """The installed distribution's version (`hf-unlearn`), else the package's `__version__` (a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("hf-unlearn")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    from .errors import UnlearningError
    from .io import WRITTEN
    from .quiet import hide_uninformative_warnings

    hide_uninformative_warnings()

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(package_version())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (
            "usage: hf-unlearn {"
            + ",".join(COMMANDS)
            + "} ...\n\ncommands:\n"
            + "".join(f"  {name:<13} {text}\n" for name, text in COMMANDS.items())
            + f"\nthreads (unlearn, train, evaluate, demo): {THREADS_RULE}.\n"
            + "hf-unlearn --version prints the version; hf-unlearn unlearn --config FILE takes its flags from a "
            "YAML file or an earlier unlearning_manifest.json.\n"
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-unlearn: error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    written = len(WRITTEN)
    try:
        if argv[0] in TORCH_COMMANDS:
            THREADS.clear()
            THREADS.update(choose_threads())
        from .training import train_command

        code = {
            "unlearn": unlearn_command,
            "train": train_command,
            "demo": demo_command,
            "evaluate": evaluate_command,
            "push": push_command,
            "apply-request": apply_request_command,
            "prepare": prepare_command,
        }[argv[0]](argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        # The reader of stdout went away (`hf-unlearn push DIR --dry-run | head -1`): stop quietly, as a tool
        # ended by SIGPIPE does; what is still buffered goes nowhere instead of failing again at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except UnlearningError as e:
        print(f"hf-unlearn {argv[0]}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        done = [str(p) for p in WRITTEN[written:]]
        print(
            f"hf-unlearn {argv[0]}: interrupted; "
            + (
                f"{', '.join(done)} had been written completely before."
                if done
                else "nothing was written (an output appears complete or not at all; no partial files are left)."
            ),
            file=sys.stderr,
        )
        return 130
