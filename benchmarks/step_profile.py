"""Where along the one-step update the quick suite's task metric lands: θ* + t·Δθ for t in [0, 3].

    python benchmarks/step_profile.py --kind RC --size 8 --seed 1 --output benchmarks/results/step_profile.json

Trains the quick suite's original adapter and retraining for one cell, solves the `cg` update as the quick
suite does, and measures, at each length t, the gap closed on the task metric and the NLL per token of the
kept training rows (what the step must not break). Writes JSON and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from run import SUITES, arguments, make_lab, objective, write_report

from hf_unlearn import TrainingSet, UnlearningRequest, unlearn
from hf_unlearn.demo import edited_rows, metric_rows
from hf_unlearn.demo_data import generate
from hf_unlearn.params import ParameterSpace

LENGTHS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]


def profile(kind: str, size: int, seed: int, workdir: Path) -> dict:
    suite = SUITES["quick"]
    data = generate(suite["sizes"])
    train = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    lab = make_lab(suite, data, workdir, None, seed=seed)
    original, retrain, point = workdir / "original", workdir / "retrain", workdir / "point"
    lab.train([{k: r[k] for k in ("prompt", "response")} for r in data["train"]], original)
    request = UnlearningRequest.from_lines(data[f"request_{kind}"][:size])
    resolved = request.resolve(train, lab.task)
    lab.train(edited_rows(train, resolved), retrain)
    metric_at = metric_rows(kind, resolved)
    edited = {e.index for e in resolved.edits}
    kept = [train[i] for i in range(len(train)) if i not in edited]
    before, after = lab.nll(original, metric_at), lab.nll(retrain, metric_at)

    model = lab.load(original, trainable=True)
    space = ParameterSpace(model)
    theta_star = space.vector().clone()
    args = arguments(solver="cg", progress=False, **objective(lab), **suite["unlearning"])
    stats = unlearn(model, train, request, args, task=lab.task).stats
    delta = space.vector() - theta_star  # (P,)
    lab.drop(model)
    points = []
    for t in LENGTHS:
        model = lab.load(original, trainable=True)  # one adapter on the base at a time
        ParameterSpace(model).set_(theta_star + t * delta)
        model.save_pretrained(point)
        lab.drop(model)
        value = lab.nll(point, metric_at)
        points.append(
            {"t": t, "gap_closed": (value - before) / (after - before), "kept_rows_nll": lab.nll(point, kept)}
        )
    return {
        "task": kind,
        "request_size": size,
        "seed": seed,
        "original": before,
        "retrained": after,
        "retrained_kept_rows_nll": lab.nll(retrain, kept),
        "cg_iterations": stats["iterations"],
        "points": points,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in report["points"]]
    fig, (gap, kept) = plt.subplots(1, 2, figsize=(10, 4))
    gap.plot(t, [p["gap_closed"] for p in report["points"]], marker="o")
    gap.axhline(1.0, color="gray", linestyle="--", label="retrained")
    gap.axvline(1.0, color="gray", linestyle=":", label="the one-step update")
    gap.set(xlabel="step length t", ylabel="gap closed on the task metric", title="task metric")
    gap.legend()
    kept.plot(t, [p["kept_rows_nll"] for p in report["points"]], marker="o")
    kept.axhline(report["retrained_kept_rows_nll"], color="gray", linestyle="--", label="retrained")
    kept.axvline(1.0, color="gray", linestyle=":")
    kept.set(xlabel="step length t", ylabel="NLL per token", title="kept training rows")
    kept.legend()
    fig.suptitle(f"θ* + t·Δθ, {report['task']} k = {report['request_size']}, seed {report['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["IR", "QM", "RC"], default="RC")
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/step_profile.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = profile(args.kind, args.size, args.seed, Path(tmp))
    summary = "\n".join(
        f"t = {p['t']:4.2f}  gap closed {p['gap_closed']:6.0%}  kept rows NLL {p['kept_rows_nll']:.3f}"
        for p in report["points"]
    )
    write_report(report, args.output, plot, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
