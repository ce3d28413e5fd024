"""`StochasticSolverArguments`: the mini-batches and step sizes of the stochastic solvers, lissa and qp."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..solvers.qp import QP_OPTIMIZERS
from .checks import Concern, FloatOrAuto, at_least, choice, number_or_auto


@dataclass
class StochasticSolverArguments(Concern):
    """Options of `--solver lissa` and `--solver qp` (the other solvers do not read them)."""

    HELP_GROUP = "stochastic solvers — lissa and qp"

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
    # qp_lr and lissa_scale: a float or 'auto' (`FloatOrAuto`), stored as a float or 'auto'.
    qp_lr: FloatOrAuto = field(
        default="auto",
        metadata={
            "help": "qp: step size, a number > 0 or 'auto' (svrg: 1/𝓛, sgd: 0.1/𝓛; 𝓛 = λ_max(C) + (f/b)·R² + λ a "
            "bound on the mini-batch products' expected smoothness from Lanczos estimates of C and of each "
            "row, with the stiffest rows put in every batch; adam needs a number, in parameter units)."
        },
    )
    lissa_scale: FloatOrAuto = field(
        default="auto",
        metadata={
            "help": "lissa: the Neumann-series scale s, a number > 0 (diverges unless s exceeds half the "
            "expected smoothness of the mini-batch products, which can be far above λ_max(C)) or 'auto' "
            "(s = 𝓛 = λ_max(C) + (f/b)·R² + λ from Lanczos estimates of C and of each row, R² the stiffest "
            "row rescaled to the whole set, with the stiffest rows put in every batch; see the solver docs)."
        },
    )

    def validate(self) -> None:
        at_least("stochastic_batch_size", self.stochastic_batch_size, 1)
        choice("qp_optimizer", self.qp_optimizer, QP_OPTIMIZERS)
        self.qp_lr = number_or_auto("qp_lr", self.qp_lr)
        self.lissa_scale = number_or_auto("lissa_scale", self.lissa_scale)
