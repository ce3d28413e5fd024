"""Solver × curvature comparison: relative error against an exact solve versus time, on two small problems.

    PYTHONPATH=. python benchmarks/solvers.py [--output-dir benchmarks/results] [--quick] [--settings tiny,toy]

`tiny`: a removal request (IR of 2 rows out of 24) on a briefly trained 2-layer Llama with LoRA r=2 on
q_proj/v_proj (P = 256 trainable parameters, float64). Every curvature (hessian, ggn, fisher) is materialised
densely and `(C + λI) x = −b` solved exactly; λ is chosen once by `damping="auto"`'s rule on the Hessian.

`toy`: the quick benchmark's setting (`benchmarks/run.py --suite quick`): the config-built toy Llama of
`hf_unlearn.toy`, a LoRA adapter (r=8 on q_proj/v_proj of the top 2 layers, P = 4096) trained with the HF
Trainer on the demo data (48 rows) with the objective's L2 term μ, and for the IR, QM and RC requests of
the largest quick-suite size the system the suite's `cg` solves: the GGN of the edited rows (normaliser M of
the training set) plus μI plus the suite's damping λ (`"auto"`: its rule on that GGN). The exact solution is
float64 CG to a relative residual of 1e-9 (P = 4096 is too large to materialise the GGN in reasonable time).

Every solver runs on every curvature/request with the library defaults (`lissa_scale`/`qp_lr` "auto",
`stochastic_batch_size` 8, seed `--seed`) and records

- `error_same_curvature`: ‖x − x_exact(C)‖ / ‖x_exact(C)‖, the solver's own accuracy;
- `error_vs_hessian` (tiny only): ‖x − x_dense(H)‖ / ‖x_dense(H)‖, what the curvature approximation costs;
- wall and process CPU seconds (the step-size estimates of the mini-batch solvers included), full and
  mini-batch curvature products, and the solver's step-size statistics.

`qp-adam` needs a step in parameter units; it gets 1 % of the exact solution's mean |x|, an oracle choice
that favours it (no default exists). Writes `solvers.json` and, when matplotlib is installed, `solvers.png`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import fit, tiny_llama, token_rows  # noqa: E402
from run import provenance  # noqa: E402

from hf_unlearn import CausalLMTask, TrainingSet, UnlearningRequest  # noqa: E402
from hf_unlearn.curvature import CURVATURE_OPERATORS  # noqa: E402
from hf_unlearn.distributed import Processes  # noqa: E402
from hf_unlearn.eraser import request_rhs  # noqa: E402
from hf_unlearn.gradients import Batches, LossContext, gradient_sum  # noqa: E402
from hf_unlearn.objective import normaliser  # noqa: E402
from hf_unlearn.params import ParameterSpace, computation_mode  # noqa: E402
from hf_unlearn.refinement import choose_damping  # noqa: E402
from hf_unlearn.solvers import SOLVERS, LissaOptions, QPOptions, dense_matrix  # noqa: E402

SOLVER_OPTIONS = {"lissa": LissaOptions, "qp": QPOptions}
STAT_KEYS = (
    "lissa_scale",
    "qp_lr",
    "smoothness_estimate",
    "eig_max_estimate",
    "row_eig_max_estimate",
    "always_included_rows",
    "scale_seconds",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="budgets 100 and 2000 steps only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="tiny,toy", help="comma-separated subset of tiny,toy")
    parser.add_argument(
        "--curvatures", default="hessian,ggn,fisher", help="tiny setting: comma-separated subset"
    )
    parser.add_argument("--plot-only", action="store_true", help="re-plot an existing solvers.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if opts.plot_only:
        return plot(json.loads((out / "solvers.json").read_text()), out)
    budgets = [100, 2000] if opts.quick else [100, 300, 1000, 2000]
    results = {"budgets": budgets, "seed": opts.seed, "runs": [], "provenance": provenance(None)}

    def save():
        (out / "solvers.json").write_text(json.dumps(results, indent=2))  # partial results survive

    settings = opts.settings.split(",")
    if "tiny" in settings:
        tiny(opts, budgets, results, save)
    if "toy" in settings:
        toy(opts, budgets, results, save)
    save()
    return plot(results, out)


def record(results, save, problem: dict, solver: str, label: str, budget, fn):
    """Run one solve and append its row; `problem` has the operator, the exact solutions and labels."""
    op = problem["op"]
    op.num_products = op.num_sample_products = 0
    wall, cpu = time.perf_counter(), time.process_time()
    x, stats = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    exact = problem["exact"]
    run = {
        "setting": problem["setting"],
        "problem": problem["name"],
        "curvature": problem["curvature"],
        "solver": label,
        "max_iter": budget,
        "seconds": wall,
        "cpu_seconds": cpu,
        "error_same_curvature": ((x - exact).norm() / exact.norm()).item(),
        "relative_residual": stats.relative_residual,
        "full_products": op.num_products,
        "sample_products": op.num_sample_products,
        **{k: stats.extra[k] for k in STAT_KEYS if k in stats.extra},
    }
    if "exact_hessian" in problem:
        ref = problem["exact_hessian"]
        run["error_vs_hessian"] = ((x - ref).norm() / ref.norm()).item()
    results["runs"].append(run)
    save()
    print(
        f"{problem['setting']:>4} {problem['name']:>7} {label:>9} iters={budget!s:>5} "
        f"err={run['error_same_curvature']:.2e} {wall:7.2f}s (cpu {cpu:.2f}s)",
        flush=True,
    )


def run_solvers(results, save, problem: dict, damping: float, b: torch.Tensor, budgets, seed: int):
    op = problem["op"]
    for tol in (1e-4, 1e-8):
        record(
            results,
            save,
            problem,
            "cg",
            f"cg@{tol:g}",
            500,
            lambda tol=tol: SOLVERS["cg"](op, damping, -b, tol=tol, max_iter=500),
        )
    if problem["curvature"] == "fisher":
        record(
            results, save, problem, "woodbury", "woodbury", None, lambda: SOLVERS["woodbury"](op, damping, -b)
        )
    for budget in budgets:
        for label, options in (("lissa", {}), ("qp-svrg", {}), ("qp-adam", {"qp_optimizer": "adam"})):
            if label == "qp-adam":
                if budget != budgets[-1]:
                    continue
                options = {**options, "qp_lr": 0.01 * problem["exact"].abs().mean().item()}
            solver = "lissa" if label == "lissa" else "qp"
            record(
                results,
                save,
                problem,
                solver,
                label,
                budget,
                lambda solver=solver, budget=budget, options=options: SOLVERS[solver](
                    op,
                    damping,
                    -b,
                    tol=1e-6,
                    max_iter=budget,
                    options=SOLVER_OPTIONS[solver](seed=seed, **options),
                ),
            )


def tiny(opts, budgets, results, save):
    curvatures = opts.curvatures.split(",")
    rows = token_rows(24, seed=opts.seed)
    task = CausalLMTask()
    model = fit(tiny_llama(seed=opts.seed), task, rows)
    space = ParameterSpace(model)
    processes = Processes()
    setup = {"num_params": space.numel, "num_rows": len(rows), "removed": [1, 3]}
    results["tiny"] = setup
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
        setup |= {"damping": damping, "damping_auto": auto}
        eye = torch.eye(space.numel, dtype=torch.float64)
        exact = {}
        for name, op in ops.items():
            t = time.perf_counter()
            dense = dense_matrix(op)
            exact[name] = torch.linalg.solve(dense + damping * eye, -b)
            setup[f"dense_{name}_seconds"] = time.perf_counter() - t
            ev = torch.linalg.eigvalsh(dense)
            setup[f"{name}_eigenvalue_range"] = [ev[0].item(), ev[-1].item()]
        save()
        for curvature in curvatures:
            problem = {
                "setting": "tiny",
                "name": "IR",
                "curvature": curvature,
                "op": ops[curvature],
                "exact": exact[curvature],
                "exact_hessian": exact["hessian"],
            }
            run_solvers(results, save, problem, damping, b, budgets, opts.seed)


def load_quick_suite():
    """`SUITES` and `make_lab` of benchmarks/run.py, so that the toy setting is the quick suite's."""
    spec = importlib.util.spec_from_file_location("benchmark_run", Path(__file__).with_name("run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUITES["quick"], module.make_lab


def toy(opts, budgets, results, save):
    from hf_unlearn.demo_data import generate

    suite, make_lab = load_quick_suite()
    settings = suite["unlearning"]
    size = max(suite["request_sizes"])
    data = generate(suite["sizes"])
    train = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lab = make_lab(suite, data, workdir, None)
        rows = [{k: r[k] for k in ("prompt", "response")} for r in data["train"]]
        train_seconds = lab.train(rows, workdir / "original")
        model = lab.load(workdir / "original", trainable=True)
    task, space, processes = lab.task, ParameterSpace(model), Processes()
    setup = {
        "num_params": space.numel,
        "num_rows": len(train),
        "request_size": size,
        "curvature": settings["curvature"],
        "damping_rule": settings["damping"],
        "l2_regularization": suite["lab"]["l2_regularization"],
        "train_seconds": train_seconds,
        "requests": {},
    }
    results["toy"] = setup
    with computation_mode(model, torch.float64):
        all_rows = [train[i] for i in range(len(train))]
        M = normaliser(task, all_rows, "token")

        def batches(rows):
            return Batches(task, rows, 8, "cpu", processes)  # unlearn's default batch_size

        for kind in ("IR", "QM", "RC"):
            lines = data[f"request_{kind}"][:size]
            request = UnlearningRequest.from_lines(lines)
            resolved = request.resolve(train, task)
            op = CURVATURE_OPERATORS[settings["curvature"]](  # C over the edited rows, M fixed (unlearn's)
                model, task, space, batches(resolved.edited_rows(all_rows)), "token", M, processes
            )
            b, _ = request_rhs(LossContext(model, task, space, processes), resolved, batches, "token", M)
            damping, auto = (
                choose_damping(op, b, opts.seed)
                if settings["damping"] == "auto"
                else (float(settings["damping"]), None)
            )
            damping += setup["l2_regularization"]  # (C + μI + λI) x = −b
            t = time.perf_counter()
            exact, stats = SOLVERS["cg"](op, damping, -b, tol=1e-9, max_iter=5000)
            setup["requests"][kind] = {
                "damping": damping,
                "damping_auto": auto,
                "exact_cg_iterations": stats.iterations,
                "exact_cg_relative_residual": stats.relative_residual,
                "exact_seconds": time.perf_counter() - t,
            }
            save()
            problem = {
                "setting": "toy",
                "name": kind,
                "curvature": settings["curvature"],
                "op": op,
                "exact": exact,
            }
            run_solvers(results, save, problem, damping, b, budgets, opts.seed)


def plot(results: dict, out: Path) -> int:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: wrote only solvers.json")
        return 0
    panels = list(dict.fromkeys((r["setting"], r["problem"], r["curvature"]) for r in results["runs"]))
    labels = list(dict.fromkeys(r["solver"] for r in results["runs"]))
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (setting, name, curvature) in zip(axes.flat, panels):
        runs = [
            r
            for r in results["runs"]
            if (r["setting"], r["problem"], r["curvature"]) == (setting, name, curvature)
        ]
        for label in dict.fromkeys(r["solver"] for r in runs):
            pts = sorted((r["cpu_seconds"], r["error_same_curvature"]) for r in runs if r["solver"] == label)
            ax.plot(*zip(*pts), marker="o", label=label, color=colours[label])
        info = results[setting]
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{setting} (P={info['num_params']}): {name}, {curvature}",
            xlabel="process CPU seconds",
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(0.1, color="black", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("relative error vs exact solve")
    handles = [plt.Line2D([], [], color=colours[label], marker="o", label=label) for label in labels]
    axes.flat[0].legend(handles=handles, fontsize=8)
    fig.suptitle(
        f"mini-batch steps {', '.join(map(str, results['budgets']))}; float64; dotted line: 10 % "
        "(tiny: 2-layer Llama + LoRA r=2; toy: quick-suite Llama + LoRA r=8, GGN of the edited rows + μI)"
    )
    fig.tight_layout()
    fig.savefig(out / "solvers.png", dpi=110)
    print(f"wrote {out / 'solvers.json'} and {out / 'solvers.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
