"""`UnlearningArguments`: every knob of an unlearning run, named like its command-line flag."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .errors import ConfigurationError
from .solvers import SOLVERS as SOLVER_FUNCTIONS
from .solvers.qp import QP_OPTIMIZERS

SOLVERS = tuple(SOLVER_FUNCTIONS)  # one registry: hf_unlearn.solvers
CURVATURES = ("hessian", "ggn", "fisher", "kfac", "ekfac")
KFAC_CURVATURES = ("kfac", "ekfac")
PRECONDITIONERS = ("none", *KFAC_CURVATURES, "nystrom")
KFAC_TARGETS = ("empirical", "sampled")
LOSS_NORMALIZATIONS = ("token", "example")
CURVATURE_DATA = ("auto", "edited", "original")
REFINE_DAMPINGS = ("fixed", "adaptive", "line_search")
OBJECTIVE_ESTIMATES = ("auto", "full", "sample", "quadratic")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The single LLMEraser update on the exact Hessian, as `UnlearningArguments()` computed it before the quadratic
# estimate with refinement and the kept-rows check became the defaults (docs/method.md §2): what the tests' dense
# references compute and what the benchmarks' methods start from. `UnlearningArguments(**SINGLE_UPDATE)`.
SINGLE_UPDATE = {
    "curvature": "hessian",
    "damping": 0.1,
    "tol": 1e-6,
    "max_iter": 200,
    "refine_steps": 0,
    "refine_damping": "fixed",
    "objective_estimate": "full",
    "refine_tol": 0.0,
    "kept_loss_tolerance": float("inf"),
}


@dataclass
class UnlearningArguments:
    """How to compute the LLMEraser update `Δθ = −(C + λI)⁻¹ b` (see docs/method.md §2–3).

    Field names mirror the `hf-unlearn unlearn` flags: `max_iter` is `--max-iter`, and so on.
    """

    solver: str = field(
        default="cg",
        metadata={
            "help": "Linear solver for (C + λI) x = −b: cg (conjugate gradient), direct (dense Cholesky, small "
            "models only), woodbury (exact, curvature fisher only), lissa (stochastic Neumann series), qp "
            "(LLMEraser's stochastic quadratic program, correct gradient). lissa and qp run --max-iter "
            "mini-batch steps and report their final relative residual.",
            "choices": list(SOLVERS),
        },
    )
    curvature: str = field(
        default="ggn",
        metadata={
            "help": "Curvature operator C: hessian (exact, double backward), ggn (generalised Gauss–Newton, "
            "PSD, first-order passes only), fisher (empirical Fisher from per-example gradients, PSD), kfac "
            "(Kronecker-factored blocks of the trainable Linear layers, from saved/captured factors or one "
            "pass; products and the damped block inverse need no data pass; --solver direct inverts it "
            "exactly at any size), ekfac (K-FAC eigenbasis with eigenvalues refitted by one pass over "
            "per-example gradients).",
            "choices": list(CURVATURES),
        },
    )
    # `str` so that the command line accepts "auto"; __post_init__ turns a number into a float.
    damping: str = field(
        default=1e-3,
        metadata={
            "help": "λ ≥ 0 added to the curvature of every step (makes a non-convex LoRA Hessian positive "
            "definite; keeps K-FAC's block inverse defined when μ = 0); the first λ the kept-rows check tries "
            "(--kept-loss-tolerance). Or 'auto': "
            "estimate the extreme eigenvalues of C by Lanczos and choose λ = max(0, −2·λ_min) + 0.01·λ_max "
            "(recorded in the stats/manifest)."
        },
    )
    tol: float = field(
        default=1e-5, metadata={"help": "Relative residual at which the iterative solver stops."}
    )
    max_iter: int = field(
        default=300,
        metadata={
            "help": "Maximum number of solver iterations (cg), the number of mini-batch steps (lissa, qp sgd/adam), "
            "or qp svrg's budget in mini-batch products (a full product counts as n/b)."
        },
    )
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "How the training loss was normalised: 'token' (sum over all loss tokens / their number, "
            "the HF Trainer default) or 'example' (mean over examples of each example's token mean).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    curvature_data: str = field(
        default="auto",
        metadata={
            "help": "Rows the curvature C is taken on: 'edited' (the kept rows plus the new versions: the "
            "Hessian of the objective retraining minimises, so the update is a Newton step on it, exact when "
            "the loss is quadratic), 'original' (the training set as the adapter saw it, as in the LLMEraser "
            "paper: exact only to first order in the request size) or 'auto' (edited, except original for "
            "kfac/ekfac, whose factors describe the training run).",
            "choices": list(CURVATURE_DATA),
        },
    )
    l2_regularization: float | None = field(
        default=None,
        metadata={
            "help": "μ of the (μ/2)‖θ‖² term the adapter was trained with (hf-unlearn train "
            "--l2-regularization, L2RegularizationCallback). It is part of the objective: μI joins the "
            "curvature and μθ the refinement gradients. Default: hf-unlearn unlearn reads it from the "
            "adapter's training record; otherwise 0."
        },
    )
    hessian_samples: int | None = field(
        default=None,
        metadata={
            "help": "Estimate the curvature on a seeded random subset of this many training rows (default: all), "
            "with the request applied to it when the curvature is of the edited rows: the same rows for every "
            "request, and those of a Nyström sketch with as many --curvature-samples."
        },
    )
    objective_estimate: str = field(
        default="auto",
        metadata={
            "help": "How the edited objective's kept rows enter the curvature and the refinement steps: 'auto' "
            "(quadratic whenever it applies — curvature hessian/ggn/fisher on the edited rows, solver cg or direct, "
            "no preconditioner, every trainable parameter in a per-token nn.Linear, more than the single fixed "
            "step asked for — else full; the manifest records the choice and why), 'full' "
            "(every kept training row, exact; each refinement step passes over the whole training set) or "
            "'sample' (the kept rows of the --hessian-samples sample, rescaled to all of them, as a control "
            "variate around θ* — exact at θ* — while the request's new versions enter exactly: nothing passes "
            "over the training set, so a request costs the same at any training-set size) or 'quadratic' (the "
            "kept rows as the fixed quadratic of the training run's K-FAC curvature — captured during training "
            "or --curvature-factors — with the request's old rows taken out, while the request's new versions "
            "enter exactly: each step passes over the request's rows only).",
            "choices": list(OBJECTIVE_ESTIMATES),
        },
    )
    interacting_rows: int = field(
        default=0,
        metadata={
            "help": "objective_estimate 'sample': also take, with certainty, the this many training rows the "
            "request interacts with most — the largest |⟨∇ℓ_i(θ*), b⟩| by a count sketch of every row's gradient "
            "(computed once per adapter, one pass) — so that the memorised rows sharing the request's directions "
            "hold the update back as they would in retraining."
        },
    )
    preconditioner: str = field(
        default="none",
        metadata={
            "help": "cg only: precondition with the damped K-FAC (kfac) or EK-FAC (ekfac) block inverse, "
            "(C_kfac + λI)⁻¹, or with a randomized Nyström approximation of rank --nystrom-rank of the "
            "training set's --curvature (nystrom; downdated by the request rows so that it fits the edited "
            "curvature), while the products stay those of --curvature (e.g. exact hessian/ggn on "
            "--hessian-samples rows). The factors or the sketch come from --curvature-factors.",
            "choices": list(PRECONDITIONERS),
        },
    )
    curvature_factors: str = field(
        default="auto",
        metadata={
            "help": "Where K-FAC factors (curvature kfac/ekfac or a preconditioner) or the Nyström sketch come "
            "from: a directory with curvature_factors.safetensors/.json (saved beside an adapter by capture "
            "during training) or nystrom_sketch.safetensors/.json (saved beside every adapter unlearned with "
            "--preconditioner nystrom), 'pass' (one pass over --curvature-samples training rows at the "
            "adapter's weights; a sketch costs --nystrom-rank curvature products), or 'auto' (factors or "
            "sketch passed in or captured by the trainer; hf-unlearn unlearn: the adapter directory's if it "
            "has them; otherwise 'pass'). The manifest records which was used and its digest."
        },
    )
    curvature_samples: int | None = field(
        default=None,
        metadata={
            "help": "Rows (seeded random subset) of the pass that computes K-FAC factors, refits EK-FAC "
            "eigenvalues or sketches the curvature for the Nyström preconditioner (default: all)."
        },
    )
    nystrom_rank: int = field(
        default=100,
        metadata={
            "help": "Columns of the Nyström sketch (--preconditioner nystrom): curvature products spent once "
            "per adapter; CG then converges as if the top nystrom_rank eigenvalues were flattened."
        },
    )
    kfac_targets: str | None = field(
        default=None,
        metadata={
            "help": "Output gradients of the K-FAC pass: 'empirical' (the data's labels: a factor of the "
            "empirical Fisher; what capture during training records) or 'sampled' (labels drawn from the "
            "model, one per position: a factor of the Gauss–Newton matrix / true Fisher). Default: those of "
            "saved or captured factors, else 'empirical'; factors with other targets are refused.",
            "choices": list(KFAC_TARGETS),
        },
    )
    capture_curvature: bool = field(
        default=True,
        metadata={
            "help": "UnlearnTrainer / UnlearningCallback: collect K-FAC factors during the last training epoch "
            "from the training's own forward/backward passes and keep them for unlearning (saved beside the "
            "adapter by trainer.save_model / the callback's output_dir). On by default: it costs about a tenth of "
            "the last epoch's time; a model or run the capture cannot describe is logged and trained without it."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward/backward pass."})
    stochastic_batch_size: int = field(
        default=8,
        metadata={
            "help": "lissa/qp: curvature rows per mini-batch product (drawn at random with --seed, rescaled "
            "to the full sum; with --lissa-scale/--qp-lr auto the stiffest rows may be in every batch and only "
            "the rest drawn, which keeps the product unbiased and lowers its variance)."
        },
    )
    qp_optimizer: str = field(
        default="svrg",
        metadata={
            "help": "qp: 'svrg' (variance-reduced steps with a full product every 2·n/b steps; converges "
            "linearly and stops at --tol), or 'sgd' (heavy-ball momentum 0.9) / 'adam', which average the second "
            "half of their iterates and keep a noise floor.",
            "choices": list(QP_OPTIMIZERS),
        },
    )
    qp_lr: str = field(
        default="auto",
        metadata={
            "help": "qp: step size, a number > 0 or 'auto' (svrg: 1/𝓛, sgd: 0.1/𝓛; 𝓛 = λ_max(C) + (f/b)·R² + λ a "
            "bound on the mini-batch products' expected smoothness from Lanczos estimates of C and of each "
            "row, with the stiffest rows put in every batch; adam needs a number, in parameter units)."
        },
    )
    lissa_scale: str = field(
        default="auto",
        metadata={
            "help": "lissa: the Neumann-series scale s, a number > 0 (diverges unless s exceeds half the "
            "expected smoothness of the mini-batch products, which can be far above λ_max(C)) or 'auto' "
            "(s = 𝓛 = λ_max(C) + (f/b)·R² + λ from Lanczos estimates of C and of each row, R² the stiffest "
            "row rescaled to the whole set, with the stiffest rows put in every batch; see the solver docs)."
        },
    )
    refine_steps: int = field(
        default=5,
        metadata={
            "help": "Extra damped Newton steps on the tilted edited objective after the first step "
            "(docs/method.md §2 'Beyond one step'); each costs a gradient pass and a solve — over the request's rows only "
            "with objective_estimate quadratic or sample, over the edited training set with full. "
            "--refine-steps 0 --refine-damping fixed is the single LLMEraser update."
        },
    )
    refine_damping: str = field(
        default="line_search",
        metadata={
            "help": "Damping of the refinement steps: 'fixed' (every step uses --damping, docs/method.md §2) or "
            "'adaptive' (Levenberg–Marquardt on the tilted edited objective R̃: the one-step update is the first "
            "trial, and a step is kept only if it lowers R̃; λ is then divided by 3, but never below --damping, "
            "and multiplied by 3 after a rejected step; --refine-steps + 1 trials, each also costing a loss pass "
            "over the edited training set) or 'line_search' (damped Newton: every step, the one-step update "
            "included, uses --damping and is shortened by halves until R̃ drops by the Armijo condition; "
            "--refine-steps + 1 steps, each trial length costing a loss pass over the edited training set).",
            "choices": list(REFINE_DAMPINGS),
        },
    )
    refine_tol: float = field(
        default=0.1,
        metadata={
            "help": "Inexact Newton: when refining, each step's solve (the first included) stops at the relative "
            "residual min(--refine-tol, ‖∇R̃(θ)‖/‖b‖), never below --tol — loose far from the minimiser, tighter "
            "as the gradient shrinks. CG's first iterations already give a descent direction the line search "
            "shortens if needed. 0 solves every step to --tol."
        },
    )
    kept_loss_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "Largest rise of the kept rows' loss (cross-entropy per token, on a seeded sample of 32 of the "
            "rows the request keeps) a step may cause: retraining leaves it close to where training left it. With "
            "--refine-damping line_search every step is shortened until it holds (a trust region); otherwise a "
            "result above it is solved again with λ ten times larger, up to 5 times (the manifest lists the "
            "attempts). Another 32 kept rows measure the result (the manifest's retain_check). inf turns it off."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the unlearning computation.", "choices": list(DTYPES)},
    )
    seed: int = field(default=0, metadata={"help": "Seed for curvature subsampling."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars on the main process."})
    allow_inexact: bool = field(
        default=False,
        metadata={
            "help": "Keep a finite result although the solver did not reach --tol (recorded as inexact in the "
            "manifest and model card). Without it, an unconverged solve writes nothing."
        },
    )

    def __post_init__(self):
        _choice("solver", self.solver, SOLVERS)
        _choice("curvature", self.curvature, CURVATURES)
        if self.solver == "woodbury" and self.curvature != "fisher":
            raise ConfigurationError(
                "solver 'woodbury' is the exact solve of the empirical Fisher: use it with curvature 'fisher'."
            )
        _choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.kfac_targets is not None:
            _choice("kfac_targets", self.kfac_targets, KFAC_TARGETS)
        if self.preconditioner != "none" and self.solver != "cg":
            raise ConfigurationError(
                f"preconditioner {self.preconditioner!r} preconditions conjugate gradient: use it with solver "
                f"'cg' (solver {self.solver!r} would ignore it)."
            )
        if self.preconditioner == "nystrom" and self.curvature in KFAC_CURVATURES:
            raise ConfigurationError(
                f"preconditioner 'nystrom' sketches an exact curvature (hessian, ggn, fisher); curvature "
                f"{self.curvature!r} is solved directly: use solver 'direct'."
            )
        if int(self.nystrom_rank) < 1:
            raise ConfigurationError(f"nystrom_rank must be ≥ 1, got {self.nystrom_rank!r}.")
        if self.curvature_samples is not None and self.curvature_samples < 1:
            raise ConfigurationError(
                f"curvature_samples must be ≥ 1 (or unset for all rows), got {self.curvature_samples!r}."
            )
        _choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        _choice("curvature_data", self.curvature_data, CURVATURE_DATA)
        if self.l2_regularization is not None and not (
            math.isfinite(self.l2_regularization) and self.l2_regularization >= 0
        ):
            raise ConfigurationError(
                f"l2_regularization must be a finite number ≥ 0, got {self.l2_regularization!r}."
            )
        _choice("objective_estimate", self.objective_estimate, OBJECTIVE_ESTIMATES)
        if not (0 <= self.refine_tol < 1):
            raise ConfigurationError(f"refine_tol must be in [0, 1), got {self.refine_tol!r}.")
        if int(self.interacting_rows) < 0:
            raise ConfigurationError(f"interacting_rows must be ≥ 0, got {self.interacting_rows!r}.")
        if self.interacting_rows and self.objective_estimate != "sample":
            raise ConfigurationError(
                "interacting_rows adds rows to the sample of objective_estimate 'sample'."
            )
        if self.objective_estimate in ("sample", "quadratic"):
            if self.curvature in KFAC_CURVATURES or not self.curvature_on_edited:
                raise ConfigurationError(
                    f"objective_estimate {self.objective_estimate!r} takes the request's rows' exact curvature: use "
                    "curvature hessian, ggn or fisher with curvature_data 'edited' or 'auto'."
                )
            if self.solver not in ("cg", "direct"):
                raise ConfigurationError(
                    f"objective_estimate {self.objective_estimate!r} solves with cg or direct; solver "
                    f"{self.solver!r} draws its own mini-batches of the curvature rows."
                )
            if self.objective_estimate == "quadratic" and self.preconditioner != "none":
                raise ConfigurationError(
                    "objective_estimate 'quadratic' preconditions with the kept rows' K-FAC block inverse "
                    f"itself: drop preconditioner {self.preconditioner!r}."
                )
        _choice("dtype", self.dtype, DTYPES)
        _choice("qp_optimizer", self.qp_optimizer, QP_OPTIMIZERS)
        self.damping = _number_or_auto("damping", self.damping, minimum_inclusive=True)
        self.qp_lr = _number_or_auto("qp_lr", self.qp_lr)
        self.lissa_scale = _number_or_auto("lissa_scale", self.lissa_scale)
        if self.solver == "qp" and self.qp_optimizer == "adam" and self.qp_lr == "auto":
            raise ConfigurationError(
                "qp with Adam takes steps in parameter units, so it needs an explicit qp_lr (--qp-lr), "
                "e.g. a few percent of the expected |Δθ| per coordinate; or use qp_optimizer 'svrg'."
            )
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise ConfigurationError(f"tol must be a positive number, got {self.tol!r}.")
        _choice("refine_damping", self.refine_damping, REFINE_DAMPINGS)
        if not self.kept_loss_tolerance >= 0:
            raise ConfigurationError(
                f"kept_loss_tolerance must be ≥ 0 (inf: no retries), got {self.kept_loss_tolerance!r}."
            )
        if int(self.refine_steps) < 0:
            raise ConfigurationError(f"refine_steps must be ≥ 0, got {self.refine_steps!r}.")
        for name in ("max_iter", "batch_size", "stochastic_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigurationError(f"{name} must be ≥ 1, got {getattr(self, name)!r}.")
        if self.hessian_samples is not None and self.hessian_samples < 1:
            raise ConfigurationError(
                f"hessian_samples must be ≥ 1 (or unset for the whole training set), got {self.hessian_samples!r}."
            )

    def newton_tol(self, gradient_norm: float, b_norm: float) -> float:
        """The relative residual a refinement step's solve stops at (`refine_tol`'s forcing term)."""
        return max(self.tol, min(self.refine_tol, gradient_norm / b_norm if b_norm > 0 else 0.0))

    @property
    def l2(self) -> float:
        """μ of the objective's (μ/2)‖θ‖² term (0 when unset)."""
        return float(self.l2_regularization or 0.0)

    @property
    def curvature_on_edited(self) -> bool:
        """Whether C is taken on the edited rows (see `curvature_data`)."""
        if self.curvature_data == "auto":
            return self.curvature not in KFAC_CURVATURES
        return self.curvature_data == "edited"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def _number_or_auto(name: str, value, minimum_inclusive: bool = False) -> float | str:
    """'auto', or a finite number > 0 (≥ 0 with `minimum_inclusive`), from a float or its string."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    bound = "≥ 0" if minimum_inclusive else "> 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number {bound} or 'auto', got {value!r}.") from None
    if (
        isinstance(value, bool)
        or not math.isfinite(number)
        or number < 0
        or (number == 0 and not minimum_inclusive)
    ):
        raise ConfigurationError(f"{name} must be a finite number {bound} or 'auto', got {value!r}.")
    return number


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
