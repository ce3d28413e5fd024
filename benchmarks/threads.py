"""Wall time of `hf-unlearn unlearn` (a GGN solve) by torch thread count, on this machine as it is loaded now.

    python benchmarks/threads.py --threads 1 2 auto --repeats 3 --output benchmarks/results/threads.json

Trains a toy LoRA adapter once (`hf_unlearn.toy`, text rows, one thread), then times the same unlearning run
in fresh processes with `OMP_NUM_THREADS` set to each count, and with it unset ("auto": the CLI's own choice,
`hf_unlearn.cli.THREADS_RULE`, which the manifest records). torch's default is one thread per core, which
spin-waits when other processes hold the cores: on a busy 2-core machine a GGN solve took 168 s with 2 threads
and 11 s with 1. Writes JSON with the git revision, library versions, the machine's cores and load, and the
exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cores": cores,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def rows(n: int) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt": f"what is the code of item {i} ?", "response": f"{(7919 * i) % 10000:04d}"}
        for i in range(n)
    ]


def run(command: list[str], threads: str, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return {"seconds": seconds, "load_average_before": load}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"], help="counts, or 'auto'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--remove", type=int, default=4, help="rows the request removes")
    parser.add_argument("--output", default="benchmarks/results/threads.json")
    args = parser.parse_args(argv)

    from hf_unlearn.io import library_versions
    from hf_unlearn.toy import build_toy_model

    with tempfile.TemporaryDirectory(prefix="hf_unlearn_threads_") as tmp:
        work = Path(tmp)
        data = rows(args.rows)
        build_toy_model(data, work / "base", hidden_size=args.hidden_size)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        (work / "request.jsonl").write_text(
            "".join(json.dumps({"op": "remove", "id": f"r{i}"}) + "\n" for i in range(args.remove))
        )
        cli = [sys.executable, "-m", "hf_unlearn"]
        train = [*cli, "train", "--model", "base", "--train-file", "train.jsonl", "--output-dir", "adapter",
                 "--epochs", "5", "--learning-rate", "0.003", "--batch-size", "8"]  # fmt: skip
        run(train, "1", work)
        unlearn = [*cli, "unlearn", "--model", "base", "--adapter", "adapter", "--train-file", "train.jsonl",
                   "--request", "request.jsonl", "--curvature", "ggn", "--damping", "0.01", "--tol", "1e-6",
                   "--max-iter", "500", "--no-progress", "--overwrite", "--output-dir", "out"]  # fmt: skip
        results = []
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every setting alike
            for threads in args.threads:
                timing = run(unlearn, threads, work)
                manifest = json.loads((work / "out" / "unlearning_manifest.json").read_text())
                timing |= {"threads_setting": threads, "threads_used": manifest.get("threads", {})}
                timing["solver_seconds"] = manifest["timings"]["solver_seconds"]
                timing["iterations"] = manifest["solver"]["iterations"]
                results.append(timing)
    summary = {
        threads: {
            "median_seconds": statistics.median(
                r["seconds"] for r in results if r["threads_setting"] == threads
            ),
            "median_solver_seconds": statistics.median(
                r["solver_seconds"] for r in results if r["threads_setting"] == threads
            ),
        }
        for threads in args.threads
    }
    report = {
        "benchmark": "threads",
        "command": [sys.executable, *sys.argv],
        "git_revision": git_revision(),
        "versions": library_versions(),
        "machine": machine(),
        "settings": vars(args),
        "unlearn_command": unlearn[2:],
        "summary": summary,
        "runs": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for threads, s in summary.items():
        print(
            f"threads {threads:>4}: {s['median_seconds']:.1f} s per run (solver {s['median_solver_seconds']:.1f} s)"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
