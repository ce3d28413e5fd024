"""`hf-unlearn train`: LoRA fine-tuning of a causal LM on a JSON-lines file with the HF Trainer.

The rows are encoded and collated by the same `CausalLMTask` that `hf-unlearn unlearn` reads them with, and
the Trainer's loss (token sum / number of loss tokens, `num_items_in_batch`) is the `"token"` normalisation
of docs/method.md §2, so the adapter written here is exactly what the unlearning assumes was trained.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import TextEncoding, TrainingSet
from .errors import ConfigurationError
from .io import TRAINING_RECORD


@dataclass
class TrainConfig:
    """Inputs, LoRA shape and optimisation of `hf-unlearn train`."""

    model: str = field(metadata={"help": "Base model: a local directory or .gguf file."})
    train_file: str = field(
        metadata={"help": "JSON-lines training data (prompt/response or input_ids/labels)."}
    )
    output_dir: str = field(metadata={"help": "Where to write the trained PEFT adapter."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer for text rows (default: the base model's, if it has one)."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."}
    )
    lora_targets: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names to put LoRA on."}
    )
    lora_layers: int | None = field(
        default=None,
        metadata={"help": "Put LoRA on the top N transformer layers only (default: on every layer)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input during training."})
    epochs: float = field(default=3.0, metadata={"help": "Number of passes over the training rows."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (a transformers name)."}
    )
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "AdamW (decoupled) weight decay; prefer --l2-regularization, which unlearning models."
        },
    )
    l2_regularization: float = field(
        default=0.0,
        metadata={
            "help": "μ of a (μ/2)‖θ‖² term in the training objective (L2RegularizationCallback); recorded with "
            "the adapter, and `hf-unlearn unlearn` then unlearns against the same objective."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per device per optimiser step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA initialisation and the row shuffling."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the base model.", "choices": ["float32", "bfloat16"]},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    capture_curvature: bool = field(
        default=True,
        metadata={
            "help": "Collect K-FAC factors during the last epoch and save them beside the adapter "
            "(curvature_factors.safetensors/.json): `hf-unlearn unlearn`'s default quadratic estimate then passes "
            "over no training row. About a tenth of the last epoch's time; a model the capture cannot describe "
            "is logged and trained without it. --no-capture-curvature to turn it off."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the model dir."}
    )
    digest_key: str | None = field(
        default=None,
        metadata={
            "help": "Secret key of the training data's digests in the training record (HMAC-SHA256; never "
            "written beside the adapter). Default: .hf_unlearn_key in the training file's directory, created on "
            "first use."
        },
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise ConfigurationError(f"lora_r must be ≥ 1, got {self.lora_r}.")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigurationError(f"lora_layers must be ≥ 1, got {self.lora_layers}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigurationError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        for name in ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not self.target_modules:
            raise ConfigurationError("lora_targets names no module.")
        if not self.l2_regularization >= 0:
            raise ConfigurationError(f"l2_regularization must be ≥ 0, got {self.l2_regularization}.")

    @property
    def target_modules(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


@dataclass
class TrainingSetup:
    """What a LoRA fine-tune on a JSONL file needs: the PEFT model, its rows and the Trainer arguments."""

    model: torch.nn.Module
    tokenizer: object
    task: object
    train_set: TrainingSet
    rows: list
    args: object
    processes: object
    base_model_weights: dict | None = None  # io.model_weights_fingerprint of the base model, before LoRA
    rows_in_memory: bool = False  # given to prepare_training rather than read from config.train_file


def prepare_training(
    config: TrainConfig,
    encoding: TextEncoding | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    rows: Sequence[Mapping] | TrainingSet | None = None,
    progress: bool = True,
) -> TrainingSetup:
    """Load the base model and tokenizer, check every row encodes, put LoRA on, and make TrainingArguments
    (CPU when there is no GPU, so that two CPU processes train data-parallel with gloo).

    In memory (the demo and the benchmarks, which keep one base model loaded): `model` is the base model to
    put LoRA on instead of loading `config.model` (which then only names it), `tokenizer` the tokenizer
    instead of loading one, `rows` the training rows (a `TrainingSet`, or rows whose ids are their `"id"`
    field, else their index) instead of reading `config.train_file`. `progress=False` hides the progress
    bar."""
    from transformers import TrainingArguments, set_seed

    from .distributed import join_process_group
    from .io import model_weights_fingerprint
    from .models import has_tokenizer, load_base_model, load_tokenizer
    from .objective import causal_lm_task

    encoding = encoding or TextEncoding()
    processes = join_process_group()
    if rows is None:
        train = TrainingSet.from_jsonl(config.train_file)
    else:
        train = rows if isinstance(rows, TrainingSet) else TrainingSet(rows)
    if tokenizer is None:
        tokenizer_path = config.tokenizer or (config.model if has_tokenizer(config.model) else None)
        tokenizer = load_tokenizer(tokenizer_path, config.trust_remote_code)
    if model is None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
        model = load_base_model(config.model, dtype, config.trust_remote_code)
    task = causal_lm_task(tokenizer, model, encoding)
    for row in train.rows:  # every row must encode (and carry loss tokens) before any training starts
        task.encoder(row)
    train_rows = [{k: v for k, v in row.items() if k != "id"} for row in train.rows]
    base_weights = model_weights_fingerprint(model)  # checked by hf-unlearn unlearn against the base it gets

    args = TrainingArguments(
        output_dir=str(_trainer_dir(Path(config.output_dir))),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the collator tokenises text rows itself
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not (progress and processes.is_main),
    )
    set_seed(config.seed)  # the LoRA initialisation
    peft_model = lora_model(model, config)
    return TrainingSetup(
        peft_model, tokenizer, task, train, train_rows, args, processes, base_weights, rows is not None
    )


def lora_model(base: torch.nn.Module, config: TrainConfig):
    """`base` with `config`'s LoRA adapter put on (in place; `unload()` takes it off again)."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if config.lora_layers is not None:  # the top lora_layers layers
        total = base.config.num_hidden_layers
        layers = list(range(max(0, total - config.lora_layers), total))
    try:
        return get_peft_model(
            base,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                target_modules=config.target_modules,
                lora_dropout=config.lora_dropout,
                layers_to_transform=layers,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as e:
        raise ConfigurationError(f"Cannot put LoRA on {config.target_modules}: {e}") from None


def _trainer_dir(out: Path) -> Path:
    return out.resolve().parent / f".{out.name}.trainer"


def training_record(
    config: TrainConfig, encoding: TextEncoding, setup: TrainingSetup, output, seconds
) -> dict:
    from .distributed import Processes
    from .io import library_versions, training_data_record
    from .request import DigestKey, digest_key_path

    if setup.rows_in_memory and not config.digest_key:  # no file to keep a key beside: no digests
        data = {"path": None, "num_rows": len(setup.train_set)}
    else:
        key = DigestKey.load(config.digest_key or digest_key_path(config.train_file), create=True)
        data = training_data_record(config.train_file, setup.train_set, key)
        if setup.rows_in_memory:
            data["path"] = None
    return {
        "format": "hf_unlearn.training/1",
        "base_model": config.model,
        "base_model_weights": setup.base_model_weights,
        "training_data": data,
        "config": asdict(config),
        "text_encoding": asdict(encoding),
        "loss_normalization": "token",
        "train_loss": output.training_loss,
        "global_step": output.global_step,
        "num_processes": Processes().count,
        "seconds": seconds,
        "versions": library_versions(),
    }


def train_adapter(
    config: TrainConfig,
    encoding: TextEncoding | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    rows: Sequence[Mapping] | TrainingSet | None = None,
    callbacks: Sequence = (),
    progress: bool = True,
) -> dict:
    """Fine-tune a LoRA adapter on `config.train_file` and write it to `config.output_dir` (main process).

    Returns the training record that is also written next to the adapter. `model`, `tokenizer` and `rows`
    replace what would be loaded (`prepare_training`); a `model` given is given back as it was, without
    LoRA, also when training fails. `callbacks` are added to the Trainer's.
    """
    from .distributed import barrier
    from .io import check_output_dir

    encoding = encoding or TextEncoding()
    inputs = {"--train-file": config.train_file} if rows is None else {}
    check_output_dir(config.output_dir, config.overwrite, inputs)
    setup = prepare_training(config, encoding, model=model, tokenizer=tokenizer, rows=rows, progress=progress)
    try:
        record, factors = _run_training(config, encoding, setup, callbacks)
        if setup.processes.is_main:
            save_trained_adapter(
                setup.model, setup.tokenizer, record, Path(config.output_dir), config.overwrite, factors
            )
    finally:
        if model is not None:
            setup.model.unload()  # the caller's base model, as it was
    barrier(setup.processes)
    return record


def _run_training(config: TrainConfig, encoding: TextEncoding, setup: TrainingSetup, callbacks: Sequence):
    """Train `setup` with the L2 term, the curvature capture (`config.capture_curvature`) and `callbacks`;
    returns the training record and the captured K-FAC factors (or None)."""
    from transformers import Trainer

    from .regularization import L2RegularizationCallback

    capture = None
    if config.capture_curvature:
        from .capture import CurvatureCaptureCallback

        capture = CurvatureCaptureCallback(required=False)
    own = [c for c in (capture, L2RegularizationCallback(config.l2_regularization)) if c is not None]
    trainer = Trainer(
        model=setup.model,
        args=setup.args,
        train_dataset=setup.rows,
        data_collator=setup.task.collate,
        callbacks=own + list(callbacks),
    )
    start = time.perf_counter()
    output = trainer.train()
    record = training_record(config, encoding, setup, output, time.perf_counter() - start)
    if capture is None:
        return record, None
    if capture.factors is None:
        record["curvature_factors"] = {"skipped": capture.skipped}
    else:
        record["curvature_factors"] = {
            **capture.factors.describe(),
            "capture_hook_seconds": capture.overhead,
            "captured_steps_seconds": capture.capture_seconds,
        }
    return record, capture.factors


def save_trained_adapter(model, tokenizer, record: dict, out: Path, overwrite: bool, factors=None) -> None:
    """Write the adapter, its tokenizer, the training record (and captured K-FAC factors) to `out`, atomically."""
    from .io import write_directory

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if factors is not None:
            factors.save(staging)
        (staging / TRAINING_RECORD).write_text(
            json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8"
        )

    try:
        write_directory(out, overwrite, fill)
    finally:
        shutil.rmtree(_trainer_dir(out), ignore_errors=True)


@dataclass
class TrainDisplay:
    """What `hf-unlearn train` shows (not part of the training record)."""

    progress: bool = field(default=True, metadata={"help": "Show progress bars on the main process."})


def train_command(argv: list[str]) -> int:
    from .cli_args import parse_arguments

    config, encoding, display = parse_arguments(
        (TrainConfig, TextEncoding, TrainDisplay), argv, "hf-unlearn train"
    )
    record = train_adapter(config, encoding, progress=display.progress)
    from .distributed import Processes

    if Processes().is_main:
        print(
            f"Trained a LoRA adapter (r={config.lora_r}, {','.join(config.target_modules)}) on "
            f"{record['training_data']['num_rows']} rows for {record['global_step']} steps: training loss "
            f"{record['train_loss']:.4g}, {record['seconds']:.1f} s. Wrote {config.output_dir}"
        )
    return 0
