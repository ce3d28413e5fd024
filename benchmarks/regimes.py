"""How close unlearning lands to retraining, as a function of how hard the adapter fits its rows.

    python benchmarks/regimes.py --output benchmarks/results/regimes.json

Runs the quick suite's fidelity section (by default the methods `cg`, `retrain-next-seed`, `retrain`; no
converged reference) for each L2 strength μ of the training objective `R + (μ/2)‖θ‖²` (the unlearning
objective carries the same term) and each LoRA target set, and writes every row with its `l2_regularization`
and `lora_targets`, plus a PNG: each method's gap closed against μ per task, one point per request size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from run import GAP_AXIS, SUITES, fidelity, ordered_methods, suite_with, write_report

METHODS = ["cg", "retrain-next-seed", "retrain"]
L2_STRENGTHS = [0.05, 0.1, 0.2, 0.3, 0.5]
TARGETS = ["lm_head", "q_proj,v_proj"]


def sweep(l2_strengths: list[float], targets: list[str], seed: int, methods: list[str]) -> list[dict]:
    rows = []
    for lora_targets in targets:
        for mu in l2_strengths:
            suite = {**suite_with("quick", seed, lora_targets, l2_regularization=mu), "reference": False}
            print(f"--- LoRA on {lora_targets}, μ = {mu:g}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                for row in fidelity(suite, None, Path(tmp), methods):
                    rows.append({"lora_targets": lora_targets, "l2_regularization": mu, **row})
    return rows


def markdown_table(report: dict) -> str:
    """One line per target set, μ and unlearning method: the forgotten PINs' NLL at θ* (how hard the rows
    are fitted), the gap closed per task at each request size, and the range the next seed's retraining
    closes."""
    rows = report["fidelity"]
    lines = [
        "| LoRA on | μ | PIN NLL at θ* | method | IR (k = 2 / 4 / 8) | QM | RC | next-seed retraining |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lora_targets, mu in dict.fromkeys((r["lora_targets"], r["l2_regularization"]) for r in rows):
        cell = [r for r in rows if (r["lora_targets"], r["l2_regularization"]) == (lora_targets, mu)]
        pins = [r["original"] for r in cell if r["task"] == "IR" and r["method"] == "retrain"]
        spread = [r["gap_closed"] for r in cell if r["method"] == "retrain-next-seed"]
        spread = f"{min(spread):.0%}–{max(spread):.0%}" if spread else "—"
        for method in dict.fromkeys(r["method"] for r in cell):
            if method in ("retrain", "retrain-next-seed"):
                continue
            gaps = [
                " / ".join(
                    f"{r['gap_closed']:.0%}" for r in cell if r["task"] == task and r["method"] == method
                )
                for task in ("IR", "QM", "RC")
            ]
            lines.append(
                f"| {lora_targets} | {mu:g} | {sum(pins) / len(pins):.2f} | {method} | "
                + " | ".join(gaps)
                + f" | {spread} |"
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = report["fidelity"]
    targets = list(dict.fromkeys(r["lora_targets"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "retrain"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False, sharey=True)
    low, high = GAP_AXIS
    for ax, lora_targets in zip(axes[0], targets):
        ax.set_ylim(low, high)
        ax.axhspan(0.8, 1.2, color="green", alpha=0.08, label="80–120 %")
        ax.axhline(1.0, color="black", linewidth=0.6)
        for i, task in enumerate(["IR", "QM", "RC"]):
            for method, marker, style in zip(methods, "oxs^v", ["-", ":", "--", "-.", (0, (1, 3))]):
                picked = [
                    r
                    for r in rows
                    if r["lora_targets"] == lora_targets and r["task"] == task and r["method"] == method
                ]
                mus = sorted({r["l2_regularization"] for r in picked})
                color = f"C{i}"
                # one point per request size (cut at the axis limits, with its value), the line through their
                # median at each μ
                for r in picked:
                    g = r["gap_closed"]
                    ax.scatter(
                        r["l2_regularization"], min(max(g, low), high), marker=marker, color=color, s=18
                    )
                    if not low <= g <= high:
                        ax.annotate(
                            f"{g:.0%}", (r["l2_regularization"], high if g > high else low), fontsize=6
                        )
                medians = [
                    statistics.median(r["gap_closed"] for r in picked if r["l2_regularization"] == mu)
                    for mu in mus
                ]
                ax.plot(mus, medians, style, color=color, label=f"{task} {method}")
        ax.set_xscale("log")
        ticks = sorted({r["l2_regularization"] for r in rows if r["lora_targets"] == lora_targets})
        ax.set_xticks(ticks, [f"{mu:g}" for mu in ticks])
        ax.minorticks_off()
        ax.set_xlabel("L2 strength μ of the training objective")
        ax.set_title(f"LoRA on {lora_targets}")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0][0].set_ylabel("gap to retraining closed")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(
        "unlearning vs retraining on the quick toy, by L2 strength\n(points: request sizes; lines: their median)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="benchmarks/results/regimes.json")
    parser.add_argument(
        "--l2", default=",".join(map(str, L2_STRENGTHS)), help="Comma-separated L2 strengths μ."
    )
    parser.add_argument(
        "--targets",
        default=";".join(TARGETS),
        help="Semicolon-separated LoRA target sets (each comma-separated modules).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training recipe.")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="Comma-separated benchmarks/run.py methods."
    )
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if "retrain" not in methods:
        methods.append("retrain")  # the gap is measured against it
    try:
        methods = ordered_methods(SUITES["quick"], methods)
    except ValueError as e:
        parser.error(str(e))
    started = time.time()
    report = {
        "suite": "quick",
        "seed": args.seed,
        "fidelity": sweep(
            [float(m) for m in args.l2.split(",")], args.targets.split(";"), args.seed, methods
        ),
    }
    report["wall_seconds"] = time.time() - started
    write_report(report, args.output, plot, markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
