"""K-FAC/EK-FAC-preconditioned CG against plain CG on the quick toy: curvature products to a given accuracy.

    python benchmarks/kfac_products.py --output benchmarks/results/kfac_products.json

The quick suite of `benchmarks/run.py` (config-built Llama, LoRA r=8 on q/v of 2 layers, 48 training rows,
its recipe's epochs) is trained twice with the same seed, once with `CurvatureCaptureCallback` and once without,
to measure the capture's time overhead; a third run captures in *every* epoch, which gives the per-epoch
overhead without the noise of timing one short epoch. At the trained θ*, in float64, for the largest IR, QM
and RC requests of the suite, the exact GGN system `(G + λI) x = −b` (λ: the `damping="auto"` rule on G, and
λ/10; the suite's own μI is not added, so that λ sets the conditioning) is solved by

- `cg`: plain conjugate gradient, run to a relative residual of 1e-10; its last iterate is the reference;
- `pcg-<kfac|ekfac>-<captured|sampled>`: CG preconditioned by the damped K-FAC / EK-FAC block inverse,
  from the factors captured during training (empirical targets) or from one pass with sampled targets
  (EK-FAC adds one pass that refits the eigenvalues);

and every iterate's `‖x_k − x_ref‖ / ‖x_ref‖` is recorded. With `--exact-blocks` the dense GGN is also
materialised and PCG is run with its *exact* block inverses (per module, per LoRA layer, per attention
layer): the bound for any block-diagonal preconditioner with those blocks. Each method's row gives the exact curvature
products it needed to first reach 1e-1 … 1e-5, and the `direct` K-FAC / EK-FAC solves (no products at
all) give their error against the reference. Nothing is tuned per method: λ, the tolerance and the data
are the same for all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import SUITES, make_lab, provenance  # noqa: E402

from hf_unlearn import CurvatureCaptureCallback, TrainingSet, UnlearningRequest  # noqa: E402
from hf_unlearn.curvature import GaussNewtonOperator  # noqa: E402
from hf_unlearn.curvature.kfac import EKFACOperator, KFACFactors, KFACOperator  # noqa: E402
from hf_unlearn.curvature.kfac_fit import fit_ekfac_eigenvalues, fit_kfac_factors  # noqa: E402
from hf_unlearn.demo_data import generate  # noqa: E402
from hf_unlearn.distributed import Processes  # noqa: E402
from hf_unlearn.eraser import request_rhs  # noqa: E402
from hf_unlearn.gradients import Batches, LossContext  # noqa: E402
from hf_unlearn.objective import normaliser  # noqa: E402
from hf_unlearn.params import ParameterSpace, computation_mode  # noqa: E402
from hf_unlearn.refinement import choose_damping  # noqa: E402
from hf_unlearn.solvers import conjugate_gradient  # noqa: E402
from hf_unlearn.toy import build_toy_model  # noqa: E402

THRESHOLDS = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
MAX_PRODUCTS = 1000


class EpochTimes(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_epoch_begin(self, *args, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class CaptureEveryEpoch(CurvatureCaptureCallback):
    """Capture from the first step (timing only: the factors then sum over all epochs)."""

    def on_train_begin(self, *args, **kwargs):
        super().on_train_begin(*args, **kwargs)
        self.first_step = 0


def train(lab, rows, out: Path, callbacks) -> float:
    """`Lab.train` (the suite's recipe and seed) with extra callbacks."""
    return lab.train(rows, out, callbacks=callbacks)


def capture_overhead(lab, rows, workdir: Path, repeats: int) -> tuple[dict, KFACFactors]:
    plain, last, every, epochs_plain, epochs_every = [], [], [], [], []
    factors, hook_seconds = None, []
    for i in range(repeats):
        t = EpochTimes()
        plain.append(train(lab, rows, workdir / f"plain{i}", [t]))
        epochs_plain += t.times[:-1]
        capture = CurvatureCaptureCallback(output_dir=str(workdir / "captured"))
        last.append(train(lab, rows, workdir / "captured", [capture]))
        factors, _ = capture.factors, hook_seconds.append(capture.overhead)
        t = EpochTimes()
        every.append(train(lab, rows, workdir / f"every{i}", [CaptureEveryEpoch(), t]))
        epochs_every += t.times[:-1]
    p, la, ev = statistics.median(plain), statistics.median(last), statistics.median(every)
    ep, ee = statistics.median(epochs_plain), statistics.median(epochs_every)
    report = {
        "model": {"hidden_size": lab.base.config.hidden_size, "layers": lab.base.config.num_hidden_layers},
        "repeats": repeats,
        "epochs": lab.args.epochs,
        "train_seconds_plain": plain,
        "train_seconds_capture_last_epoch": last,
        "train_seconds_capture_every_epoch": every,
        "overhead_capture_last_epoch": la / p - 1,
        "overhead_per_captured_epoch_from_totals": ev / p - 1,
        "overhead_per_captured_epoch_from_epoch_medians": ee / ep - 1,
        "overhead_per_captured_epoch_from_fastest_runs": min(every) / min(plain) - 1,
        "hook_arithmetic_seconds_last_epoch": statistics.median(hook_seconds),
        "median_epoch_seconds_plain": ep,
    }
    return report, factors


def solve_with_errors(curvature, damping, rhs, reference, preconditioner=None):
    """Relative error to `reference` after each product (stops at 1e-5 or MAX_PRODUCTS)."""
    errors = []

    class Done(Exception):
        pass

    def record(k, x):
        errors.append(((x - reference).norm() / reference.norm()).item())
        if errors[-1] <= THRESHOLDS[-1]:
            raise Done

    with contextlib.suppress(Done):
        conjugate_gradient(
            curvature,
            damping,
            rhs,
            tol=1e-14,
            max_iter=MAX_PRODUCTS,
            preconditioner=preconditioner,
            callback=record,
        )
    return errors


class DenseBlocks:
    """An exact block-diagonal preconditioner from the dense matrix: `(C_group + λI)⁻¹` per parameter group
    (`solve_damped`), with `matvec` the dense C. It bounds what any block-diagonal approximation (K-FAC,
    EK-FAC, or better) can do as a preconditioner with those blocks."""

    def __init__(self, C: torch.Tensor, groups: list[list[int]], name: str):
        self.C, self.groups, self.name = C, groups, name
        self._inverses = {}

    def matvec(self, v):
        return self.C @ v

    def solve_damped(self, r, damping):
        if damping not in self._inverses:
            eye = torch.eye(self.C.shape[0], dtype=self.C.dtype)
            A = self.C + damping * eye
            self._inverses[damping] = [(g, torch.linalg.inv(A[g][:, g])) for g in self.groups]
        out = torch.empty_like(r)
        for g, inverse in self._inverses[damping]:
            out[g] = inverse @ r[g]
        return out


def parameter_groups(space, key) -> list[list[int]]:
    """Flat indices of the parameters grouped by `key(name)`, in first-seen order."""
    groups, offset = {}, 0
    for name, p in zip(space.names, space.params):
        groups.setdefault(key(name), []).extend(range(offset, offset + p.numel()))
        offset += p.numel()
    return list(groups.values())


def write_report(report: dict, output: str) -> None:
    report.setdefault("provenance", provenance(None))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def products_to(errors) -> dict:
    return {f"{t:g}": next((k + 1 for k, e in enumerate(errors) if e <= t), None) for t in THRESHOLDS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="benchmarks/results/kfac_products.json")
    parser.add_argument("--repeats", type=int, default=3, help="Training runs per timing variant.")
    parser.add_argument("--request-size", type=int, default=None, help="Default: the suite's largest.")
    parser.add_argument(
        "--capture-only",
        action="store_true",
        help="Only the capture overhead (no solves), e.g. with --hidden-size.",
    )
    parser.add_argument("--hidden-size", type=int, default=64, help="Toy model width (the quick suite: 64).")
    parser.add_argument("--layers", type=int, default=2, help="Toy model layers (the quick suite: 2).")
    parser.add_argument(
        "--exact-blocks",
        action="store_true",
        help="Also materialise the dense GGN (P products) and run PCG with its exact block inverses per "
        "module, per LoRA layer (A and B) and per attention layer: the best any block-diagonal "
        "preconditioner with those blocks can do.",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    suite = SUITES["quick"]
    size = args.request_size or max(suite["request_sizes"])
    data = generate(suite["sizes"])
    train_set = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    report = {"suite": "quick", "request_size": size, "max_products": MAX_PRODUCTS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if (args.hidden_size, args.layers) == (64, 2):
            lab = make_lab(suite, data, workdir, None, progress=False)
        else:
            model_dir = workdir / "toy_model"
            build_toy_model(data["train"] + data["triggered_test"], model_dir, args.hidden_size, args.layers)
            lab = make_lab(suite, data, workdir, str(model_dir), lora_layers=args.layers, progress=False)
        rows = [{k: r[k] for k in ("prompt", "response")} for r in data["train"]]
        report["capture"], captured = capture_overhead(lab, rows, workdir, args.repeats)
        print(json.dumps(report["capture"], indent=1), flush=True)
        if args.capture_only:
            write_report(report, args.output)
            return 0

        model = lab.load(workdir / "captured", trainable=True)
        space, procs, task = ParameterSpace(model), Processes(), lab.task
        with computation_mode(model, torch.float64):
            all_rows = [train_set[i] for i in range(len(train_set))]
            M = normaliser(task, all_rows, "token")

            def batches(rs):
                return Batches(task, rs, lab.args.batch_size, "cpu", procs)

            start = time.perf_counter()
            sampled = fit_kfac_factors(
                LossContext(model, task, space, procs), batches(all_rows), "token", M, targets="sampled"
            )
            pass_seconds = time.perf_counter() - start
            factors = {"captured": captured, "sampled": sampled}
            eigen = {
                k: fit_ekfac_eigenvalues(
                    f, LossContext(model, task, space, procs), batches(all_rows), "token", M
                )
                for k, f in factors.items()
            }
            ggn = GaussNewtonOperator(model, task, space, batches(all_rows), "token", M, procs)
            start = time.perf_counter()
            ggn.matvec(torch.zeros(space.numel, dtype=torch.float64))
            report["seconds_per_ggn_product"] = time.perf_counter() - start
            report["seconds_per_factor_pass"] = pass_seconds
            report["num_params"] = space.numel
            preconditioners = {}
            for source in factors:
                preconditioners[f"kfac-{source}"] = KFACOperator(
                    model, task, space, batches([]), "token", M, procs, factors=factors[source]
                )
                preconditioners[f"ekfac-{source}"] = EKFACOperator(
                    model, task, space, batches([]), "token", M, procs, factors=eigen[source]
                )
            auto, _ = choose_damping(ggn, torch.ones(space.numel, dtype=torch.float64), 0)
            dense = None
            if args.exact_blocks:
                start = time.perf_counter()
                eye = torch.eye(space.numel, dtype=torch.float64)
                dense = torch.stack([ggn.matvec(eye[i]) for i in range(space.numel)], dim=1)
                dense = (dense + dense.T) / 2
                report["dense_ggn_seconds"] = time.perf_counter() - start
                blocks = {
                    "module": parameter_groups(space, lambda n: n),
                    "lora-layer": parameter_groups(space, lambda n: re.sub(r"lora_[AB]", "", n)),
                    "attention-layer": parameter_groups(space, lambda n: n.split(".self_attn")[0]),
                }
            report["rows"] = []
            for kind in ("IR", "QM", "RC"):
                lines = data[f"request_{kind}"][:size]
                request = UnlearningRequest.from_lines(lines)
                resolved = request.resolve(train_set, task)
                b, _ = request_rhs(LossContext(model, task, space, procs), resolved, batches, "token", M)
                for damping_name, damping in (("auto", auto), ("auto/10", auto / 10)):
                    reference, stats = conjugate_gradient(ggn, damping, -b, tol=1e-10, max_iter=5000)
                    row = {
                        "task": kind,
                        "damping": damping_name,
                        "lambda": damping,
                        "reference_products": stats.iterations,
                    }
                    errors = {"cg": solve_with_errors(ggn, damping, -b, reference)}
                    for name, pre in preconditioners.items():
                        errors[f"pcg-{name}"] = solve_with_errors(ggn, damping, -b, reference, pre)
                        x = pre.solve_damped(-b, damping)
                        row[f"direct-{name}_rel_err"] = ((x - reference).norm() / reference.norm()).item()
                    if dense is not None:
                        exact = DenseBlocks(dense, [], "dense")
                        errors["dense-cg"] = solve_with_errors(exact, damping, -b, reference)
                        for name, groups in blocks.items():
                            pre = DenseBlocks(dense, groups, name)
                            errors[f"dense-pcg-exact-{name}-blocks"] = solve_with_errors(
                                exact, damping, -b, reference, pre
                            )
                    row["products_to_rel_err"] = {k: products_to(e) for k, e in errors.items()}
                    row["ratio_cg_over_pcg"] = {
                        k: {
                            t: (row["products_to_rel_err"]["cg"][t] / n if n else None)
                            for t, n in row["products_to_rel_err"][k].items()
                        }
                        for k in errors
                        if k != "cg"
                    }
                    report["rows"].append(row)
                    print(kind, damping_name, json.dumps(row["products_to_rel_err"]), flush=True)
                    print(
                        "   direct:",
                        {k: round(v, 3) for k, v in row.items() if k.startswith("direct")},
                        flush=True,
                    )
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
