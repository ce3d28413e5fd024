"""Which unlearning path closes the demo's gaps, at what cost (#21): the demo's data and recipe (SmolLM2-135M,
LoRA on q/v, 42 rows, 12 epochs, K-FAC captured while training the original), one retraining per request kind,
then each variant of `UnlearningArguments` (JSON overrides of the library defaults) on the same original.

Per variant and kind: the gap closed on the request's metric rows (as the demo), seconds against the
retraining's, and the kept rows' loss (cross-entropy per token over every row the request keeps) of the
original, the unlearned and the retrained adapter — retraining's own rise is the yardstick of how much a path
may disturb the rows it keeps.

    python benchmarks/demo_paths.py --kinds IR \
        --variants '{"default": {}, "demo_old": {"objective_estimate": "full", "damping": "0.1", "refine_steps": 0, "max_iter": 10, "hessian_samples": 16}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from run import provenance

from hf_unlearn.config import UnlearningArguments
from hf_unlearn.curvature.kfac import KFACFactors
from hf_unlearn.data import TrainingSet
from hf_unlearn.demo import DEMO_FILES, DemoArguments, Lab, edited_rows, metric_rows
from hf_unlearn.eraser import unlearn
from hf_unlearn.request import UnlearningRequest

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default='{"default": {}}', help="JSON: name -> UnlearningArguments overrides"
    )
    parser.add_argument("--kinds", default="IR,QM,RC")
    parser.add_argument(
        "--work-dir", default="/tmp/hf_unlearn_demo_paths", help="Adapters (reused when present)."
    )
    parser.add_argument("--output", default=str(RESULTS / "demo_paths.json"))
    opts = parser.parse_args(argv)
    started = provenance(None)  # the code that runs, not what the tree holds when it ends
    work = Path(opts.work_dir)
    lab = Lab(DemoArguments(output_dir=str(work), progress=False))
    train = TrainingSet.from_jsonl(DEMO_FILES / "train.jsonl")
    rows = [{k: r[k] for k in ("prompt", "response")} for r in train.rows]
    original = work / "original"
    seconds = {}
    if not (original / "adapter_config.json").exists():
        seconds["original"] = lab.train(rows, original, capture_curvature=True)
    factors = KFACFactors.load(original)
    results = []
    for kind in opts.kinds.split(","):
        request = UnlearningRequest.from_jsonl(DEMO_FILES / f"request_{kind}.jsonl")
        resolved = request.resolve(train, lab.task)
        retrained = work / f"retrained_{kind}"
        if not (retrained / "adapter_config.json").exists():
            seconds[f"retrain_{kind}"] = lab.train(edited_rows(train, resolved), retrained)
        touched = {e.index for e in resolved.edits}
        kept = [train[i] for i in range(len(train)) if i not in touched]
        metric = metric_rows(kind, resolved)
        o, r = lab.nll(original, metric), lab.nll(retrained, metric)
        kept_o, kept_r = lab.nll(original, kept), lab.nll(retrained, kept)
        for name, overrides in json.loads(opts.variants).items():
            args = UnlearningArguments(
                l2_regularization=0.01, batch_size=8, seed=0, progress=False, **overrides
            )
            model = lab.load(original, trainable=True)
            start = time.perf_counter()
            result = unlearn(model, train, request, args, task=lab.task, curvature_factors=factors)
            sec = time.perf_counter() - start
            path = work / f"unlearned_{kind}_{name}"
            model.save_pretrained(path)
            lab.drop(model)
            u = lab.nll(path, metric)
            row = {
                "kind": kind, "variant": name, "overrides": overrides,
                "gap_closed": (u - o) / (r - o), "metric_nll": {"original": o, "unlearned": u, "retrained": r},
                "kept_loss": {"original": kept_o, "unlearned": lab.nll(path, kept), "retrained": kept_r},
                "unlearn_seconds": sec, "retrain_seconds": seconds.get(f"retrain_{kind}"),
                "work_rows": result.stats.get("work_rows"), "kept_loss_guard": result.stats.get("kept_loss_guard"),
                "objective_estimate": result.stats["objective_estimate_choice"]["kind"],
                "steps": [
                    {k: s.get(k) for k in ("step_length", "step_norm", "accepted", "iterations")}
                    for s in result.stats.get("refine", [])
                ],
            }  # fmt: skip
            print(
                json.dumps(
                    {k: row[k] for k in ("kind", "variant", "gap_closed", "kept_loss", "unlearn_seconds")}
                )
            )
            results.append(row)
    out = {"provenance": started, "training_seconds": seconds, "results": results}
    Path(opts.output).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
