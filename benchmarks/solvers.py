"""Solver × curvature comparison on a tiny Llama + LoRA (float64): relative error against the dense solution
versus wall time.

    PYTHONPATH=. python benchmarks/solvers.py [--output-dir benchmarks/results] [--quick]

For a removal request (IR of 2 rows out of 24) on a briefly trained 2-layer Llama with LoRA r=2 (P = 256
trainable parameters) it computes `b`, materialises every curvature densely (hessian, ggn, fisher) and
solves `(C + λI) x = −b` exactly; then runs every solver on every curvature and records

- `error_same_curvature`: ‖x − x_dense(C)‖ / ‖x_dense(C)‖, the solver's own accuracy;
- `error_vs_hessian`: ‖x − x_dense(H)‖ / ‖x_dense(H)‖, what the curvature approximation costs on top;
- wall seconds, full and mini-batch curvature products.

λ is chosen once by `damping="auto"`'s rule on the Hessian and used for every curvature. Writes
`solvers.json` and, when matplotlib is installed, `solvers.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference import fit, tiny_llama, token_rows  # noqa: E402

from hf_unlearn import CausalLMTask  # noqa: E402
from hf_unlearn.curvature import CURVATURE_OPERATORS  # noqa: E402
from hf_unlearn.distributed import Processes  # noqa: E402
from hf_unlearn.eraser import choose_damping  # noqa: E402
from hf_unlearn.gradients import Batches, gradient_sum  # noqa: E402
from hf_unlearn.objective import normaliser  # noqa: E402
from hf_unlearn.params import ParameterSpace, computation_mode  # noqa: E402
from hf_unlearn.solvers import SOLVERS, dense_matrix  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer iteration budgets (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curvatures", default="hessian,ggn,fisher", help="comma-separated subset")
    parser.add_argument("--plot-only", action="store_true", help="re-plot an existing solvers.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    budgets = [100, 1000] if opts.quick else [100, 300, 1000, 2000]
    curvatures = opts.curvatures.split(",")
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if opts.plot_only:
        return plot(json.loads((out / "solvers.json").read_text()), out)

    rows = token_rows(24, seed=opts.seed)
    task = CausalLMTask()
    model = fit(tiny_llama(seed=opts.seed), task, rows)
    space = ParameterSpace(model)
    processes = Processes()
    results = {"setup": {"num_params": space.numel, "num_rows": len(rows), "removed": [1, 3]}, "runs": []}

    with computation_mode(model, torch.float64):
        M = normaliser(task, rows, "token")
        batches = Batches(task, rows, 8, "cpu", processes)
        old = Batches(task, [rows[1], rows[3]], 8, "cpu", processes)
        b = -gradient_sum(model, task, space, old, "token", processes) / M
        ops = {
            name: cls(model, task, space, batches, "token", M, processes)
            for name, cls in CURVATURE_OPERATORS.items()
            if name == "hessian" or name in curvatures
        }
        damping, auto = choose_damping(ops["hessian"], b, opts.seed)
        results["setup"] |= {"damping": damping, "damping_auto": auto}
        eye = torch.eye(space.numel, dtype=torch.float64)
        dense, exact = {}, {}
        for name, op in ops.items():
            t = time.perf_counter()
            dense[name] = dense_matrix(op)
            exact[name] = torch.linalg.solve(dense[name] + damping * eye, -b)
            results["setup"][f"dense_{name}_seconds"] = time.perf_counter() - t
            ev = torch.linalg.eigvalsh(dense[name])
            results["setup"][f"{name}_eigenvalue_range"] = [ev[0].item(), ev[-1].item()]

        def record(solver, curvature, label, budget, fn):
            op = ops[curvature]
            op.num_products = op.num_sample_products = 0
            t = time.perf_counter()
            x, stats = fn()
            seconds = time.perf_counter() - t
            run = {
                "solver": label,
                "curvature": curvature,
                "max_iter": budget,
                "seconds": seconds,
                "error_same_curvature": ((x - exact[curvature]).norm() / exact[curvature].norm()).item(),
                "error_vs_hessian": ((x - exact["hessian"]).norm() / exact["hessian"].norm()).item(),
                "relative_residual": stats.relative_residual,
                "full_products": op.num_products,
                "sample_products": op.num_sample_products,
            }
            results["runs"].append(run)
            (out / "solvers.json").write_text(json.dumps(results, indent=2))  # partial results survive
            print(
                f"{label:>9} {curvature:>7} iters={budget!s:>5} err={run['error_same_curvature']:.2e} "
                f"vs-H={run['error_vs_hessian']:.2e} {seconds:7.2f}s",
                flush=True,
            )

        for curvature in curvatures:
            op = ops[curvature]
            for tol in (1e-4, 1e-8):
                record(
                    "cg",
                    curvature,
                    f"cg@{tol:g}",
                    500,
                    lambda op=op, tol=tol: SOLVERS["cg"](op, damping, -b, tol=tol, max_iter=500),
                )
            # `direct` is the dense solve above: its cost is results["setup"]["dense_<curvature>_seconds"].
            if curvature == "fisher":
                record(
                    "woodbury",
                    curvature,
                    "woodbury",
                    None,
                    lambda op=op: SOLVERS["woodbury"](op, damping, -b),
                )
            for budget in budgets:
                for label, options in (("lissa", {}), ("qp-sgd", {}), ("qp-adam", {"qp_optimizer": "adam"})):
                    if label == "qp-adam" and budget != budgets[-1]:
                        continue
                    if label == "qp-adam":
                        # Adam needs a step in parameter units: 1% of the exact solution's mean |x| (an oracle
                        # choice that favours Adam; documented as such).
                        options = {**options, "qp_lr": 0.01 * exact[curvature].abs().mean().item()}
                    solver = "lissa" if label == "lissa" else "qp"
                    record(
                        solver,
                        curvature,
                        label,
                        budget,
                        lambda op=op, solver=solver, budget=budget, options=options: SOLVERS[solver](
                            op, damping, -b, tol=1e-6, max_iter=budget, seed=opts.seed, **options
                        ),
                    )

    (out / "solvers.json").write_text(json.dumps(results, indent=2))
    return plot(results, out)


def plot(results: dict, out: Path) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: wrote only solvers.json")
        return 0
    curvatures = list(dict.fromkeys(r["curvature"] for r in results["runs"]))
    labels = list(dict.fromkeys(r["solver"] for r in results["runs"]))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(
        1, len(curvatures), figsize=(5 * len(curvatures), 4.5), sharey=True, squeeze=False
    )
    for ax, curvature in zip(axes[0], curvatures):
        runs = [r for r in results["runs"] if r["curvature"] == curvature]
        for label in dict.fromkeys(r["solver"] for r in runs):
            pts = sorted((r["seconds"], r["error_same_curvature"]) for r in runs if r["solver"] == label)
            ax.plot(*zip(*pts), marker="o", label=label, color=colours[label])
        ax.set(xscale="log", yscale="log", title=f"curvature={curvature}", xlabel="wall seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative error vs dense solve")
    handles = [plt.Line2D([], [], color=colours[label], marker="o", label=label) for label in labels]
    axes[0][-1].legend(handles=handles, fontsize=8)
    setup = results["setup"]
    fig.suptitle(f"tiny Llama + LoRA, P={setup['num_params']}, λ={setup['damping']:.3g} (float64)")
    fig.tight_layout()
    fig.savefig(out / "solvers.png", dpi=120)
    print(f"wrote {out / 'solvers.json'} and {out / 'solvers.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
