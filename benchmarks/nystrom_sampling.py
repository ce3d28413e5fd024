"""Nyström-preconditioned CG on the scale suite's toy when the solve's curvature sample is drawn from the
sketch's sample (the change `--hessian-samples` needs; see README "Benchmarks").

    OMP_NUM_THREADS=2 python benchmarks/nystrom_sampling.py --output benchmarks/results/nystrom_sampling.json

Trains the scale suite's original adapter, sketches the GGN of 256 sampled training rows (rank 100), and for
the 40-row IR, QM and RC requests solves `(C'_S + μI) x = −b` in float64, where `C'_S` is the *same* 256
rows after the edit (sampled request rows dropped or replaced by their new versions, normalised like the
sketch), by plain CG, by CG preconditioned with the sketch as it is, and with the sketch downdated by the
request rows that are in the sample. Records the products each needs to reach a relative error of
1e-1 … 1e-5 against a converged solve.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kfac_products import products_to, solve_with_errors, write_report  # noqa: E402
from run import SUITES, make_lab  # noqa: E402

from hf_unlearn import NystromSketch, TrainingSet, UnlearningRequest  # noqa: E402
from hf_unlearn.curvature import GaussNewtonOperator  # noqa: E402
from hf_unlearn.curvature.nystrom import NystromPreconditioner  # noqa: E402
from hf_unlearn.demo_data import generate  # noqa: E402
from hf_unlearn.distributed import Processes  # noqa: E402
from hf_unlearn.eraser import request_rhs  # noqa: E402
from hf_unlearn.gradients import Batches  # noqa: E402
from hf_unlearn.objective import normaliser  # noqa: E402
from hf_unlearn.params import ParameterSpace, computation_mode  # noqa: E402
from hf_unlearn.solvers import conjugate_gradient  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="benchmarks/results/nystrom_sampling.json")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rank", type=int, default=100)
    args = parser.parse_args(argv)
    suite = SUITES["scale"]
    data = generate(suite["sizes"])
    train = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    report = {"suite": "scale", "samples": args.samples, "rank": args.rank, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        lab = make_lab(suite, data, Path(tmp), None)
        lab.args = replace(lab.args, progress=False)
        lab.train([{k: r[k] for k in ("prompt", "response")} for r in data["train"]], Path(tmp) / "original")
        model = lab.load(Path(tmp) / "original", trainable=True)
    space, procs, task = ParameterSpace(model), Processes(), lab.task
    mu = suite["lab"]["l2_regularization"]
    with computation_mode(model, torch.float64):
        rows = [train[i] for i in range(len(train))]
        M = normaliser(task, rows, "token")

        def ggn(rs, normaliser_):
            return GaussNewtonOperator(
                model, task, space, Batches(task, rs, 32, "cpu", procs), "token", normaliser_, procs
            )

        sampled = sorted(random.Random(0).sample(range(len(rows)), args.samples))
        S = [rows[i] for i in sampled]
        M_S = normaliser(task, S, "token")
        start = time.perf_counter()
        sketch = NystromSketch.compute(ggn(S, M_S), args.rank)
        report["sketch_seconds"] = time.perf_counter() - start
        for kind in ("IR", "QM", "RC"):
            resolved = UnlearningRequest.from_lines(data[f"request_{kind}"][:40]).resolve(train, task)
            b, _ = request_rhs(model, task, space, resolved, lambda rs: Batches(task, rs, 32, "cpu", procs),
                               "token", procs, M)  # fmt: skip
            position = {i: n for n, i in enumerate(resolved.indices)}
            hit = [j for j, i in enumerate(sampled) if i in position]  # request rows in the sample
            old = [S[j] for j in hit]
            new = [resolved.new[position[sampled[j]]] for j in hit] if resolved.new else []
            edited = [r for j, r in enumerate(S) if j not in set(hit)] + new
            C = ggn(edited, M_S)
            reference, stats = conjugate_gradient(C, mu, -b, tol=1e-10, max_iter=3000)
            downdated = sketch.downdate(ggn(old, M_S), ggn(new, M_S) if new else None)
            errors = {
                "cg": solve_with_errors(C, mu, -b, reference),
                "pcg-nystrom": solve_with_errors(C, mu, -b, reference, NystromPreconditioner(sketch)),
                "pcg-nystrom-downdated": solve_with_errors(
                    C, mu, -b, reference, NystromPreconditioner(downdated)
                ),
            }
            row = {
                "task": kind,
                "request_rows_in_sample": len(hit),
                "downdate_products": args.rank,
                "downdate_rows": len(old) + len(new),
                "reference_products": stats.iterations,
                "products_to_rel_err": {k: products_to(e) for k, e in errors.items()},
            }
            report["rows"].append(row)
            print(kind, json.dumps(row), flush=True)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
