"""`UnlearningArguments` is composed of per-concern dataclasses (hf_unlearn/config/): each validates its own
fields alone, the composite adds only the checks between concerns, and the flags stay one flat set."""

import argparse
import dataclasses

import pytest

from hf_unlearn import ConfigurationError, UnlearningArguments
from hf_unlearn.cli_args import build_parser, parse_arguments
from hf_unlearn.config import (
    CONCERNS,
    CURVATURES,
    KFAC_CURVATURES,
    KFAC_TARGETS,
    REFINE_DAMPINGS,
    SINGLE_UPDATE,
    SOLVERS,
    TRAINING_TIME_ARGUMENTS,
    ComputationArguments,
    CurvatureArguments,
    ObjectiveArguments,
    RefinementArguments,
    SolverArguments,
    StochasticSolverArguments,
    TrainingCaptureArguments,
)

# The flags of `hf-unlearn unlearn` that UnlearningArguments gives, as they were before the split into concerns
# (capture_curvature is a training-time argument: hidden there).
UNLEARN_FLAGS = {
    "--solver", "--curvature", "--damping", "--tol", "--max-iter", "--loss-normalization", "--curvature-data",
    "--l2-regularization", "--hessian-samples", "--objective-estimate", "--interacting-rows", "--preconditioner",
    "--curvature-factors", "--curvature-samples", "--nystrom-rank", "--kfac-targets", "--batch-size",
    "--stochastic-batch-size", "--qp-optimizer", "--qp-lr", "--lissa-scale", "--refine-steps", "--refine-damping",
    "--refine-tol", "--kept-loss-tolerance", "--dtype", "--seed", "--progress", "--no-progress", "--allow-inexact",
}  # fmt: skip


def flags(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_the_flags_stay_one_flat_set():
    assert flags(build_parser((UnlearningArguments,), "hf-unlearn unlearn")) == UNLEARN_FLAGS
    # every concern's fields, none twice, are UnlearningArguments' fields, and nothing else is
    names = [f.name for concern in CONCERNS for f in dataclasses.fields(concern)]
    assert len(names) == len(set(names)) == 30
    assert [f.name for f in dataclasses.fields(UnlearningArguments)] == names
    assert {f"--{n.replace('_', '-')}" for n in names} - {"--capture-curvature"} == UNLEARN_FLAGS - {
        "--no-progress"
    }
    assert {"capture_curvature"} == TRAINING_TIME_ARGUMENTS
    assert "--capture-curvature" in flags(build_parser((UnlearningArguments,), "a Trainer recipe"))


@pytest.mark.parametrize(
    "concern, values, message",
    [
        (SolverArguments, {"solver": "gmres"}, "solver must be one of cg, direct, woodbury, lissa, qp"),
        (SolverArguments, {"damping": -1}, "damping must be a finite number ≥ 0 or 'auto'"),
        (SolverArguments, {"damping": "much"}, "damping must be a number ≥ 0 or 'auto', got 'much'"),
        (SolverArguments, {"tol": 0}, "tol must be a positive number"),
        (SolverArguments, {"max_iter": 0}, "max_iter must be ≥ 1"),
        (
            CurvatureArguments,
            {"curvature": "gauss"},
            "curvature must be one of hessian, ggn, fisher, kfac, ekfac",
        ),
        (CurvatureArguments, {"nystrom_rank": 0}, "nystrom_rank must be ≥ 1"),
        (
            CurvatureArguments,
            {"curvature_samples": 0},
            r"curvature_samples must be ≥ 1 \(or unset for all rows\)",
        ),
        (CurvatureArguments, {"hessian_samples": 0}, "hessian_samples must be ≥ 1"),
        (CurvatureArguments, {"kfac_targets": "true"}, "kfac_targets must be one of empirical, sampled"),
        (CurvatureArguments, {"preconditioner": "nystrom", "curvature": "kfac"}, "use solver 'direct'"),
        (
            ObjectiveArguments,
            {"loss_normalization": "row"},
            "loss_normalization must be one of token, example",
        ),
        (ObjectiveArguments, {"l2_regularization": -0.1}, "l2_regularization must be a finite number ≥ 0"),
        (ObjectiveArguments, {"interacting_rows": 4}, "interacting_rows adds rows to the sample"),
        (StochasticSolverArguments, {"qp_lr": 0}, "qp_lr must be a finite number > 0 or 'auto'"),
        (StochasticSolverArguments, {"lissa_scale": float("inf")}, "lissa_scale must be a finite number > 0"),
        (StochasticSolverArguments, {"stochastic_batch_size": 0}, "stochastic_batch_size must be ≥ 1"),
        (StochasticSolverArguments, {"qp_optimizer": "lbfgs"}, "qp_optimizer must be one of svrg, sgd, adam"),
        (RefinementArguments, {"refine_steps": -1}, "refine_steps must be ≥ 0, got -1"),
        (RefinementArguments, {"refine_damping": "trust"}, "refine_damping must be one of fixed, adaptive"),
        (RefinementArguments, {"refine_tol": 1.0}, r"refine_tol must be in \[0, 1\)"),
        (RefinementArguments, {"kept_loss_tolerance": -1.0}, "kept_loss_tolerance must be ≥ 0"),
        (ComputationArguments, {"dtype": "float16"}, "dtype must be one of float32, float64"),
        (ComputationArguments, {"batch_size": 0}, "batch_size must be ≥ 1"),
    ],
)
def test_each_concern_validates_its_own_fields_alone_and_in_the_composite(concern, values, message):
    concern()  # the defaults are valid
    with pytest.raises(ConfigurationError, match=message):
        concern(**values)
    with pytest.raises(ConfigurationError, match=message):
        UnlearningArguments(**values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"solver": "woodbury"}, "use it with curvature 'fisher'"),
        ({"solver": "direct", "preconditioner": "kfac"}, "use it with solver 'cg'"),
        ({"objective_estimate": "sample", "curvature": "kfac"}, "exact curvature"),
        ({"objective_estimate": "quadratic", "solver": "lissa"}, "solves with cg or direct"),
        ({"objective_estimate": "quadratic", "preconditioner": "nystrom"}, "drop preconditioner 'nystrom'"),
        ({"solver": "qp", "qp_optimizer": "adam"}, r"explicit qp_lr \(--qp-lr\)"),
    ],
)
def test_the_composite_checks_what_spans_concerns(values, message):
    for concern in CONCERNS:  # no concern alone refuses its part of the combination
        concern(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(concern)}})
    with pytest.raises(ConfigurationError, match=message):
        UnlearningArguments(**values)


def test_number_or_auto_fields_take_floats_and_auto_and_store_a_float_or_auto():
    args = UnlearningArguments(damping=0.1, solver="qp", qp_lr=2, lissa_scale="AUTO")
    assert (args.damping, args.qp_lr, args.lissa_scale) == (0.1, 2.0, "auto")
    assert type(args.damping) is float and type(args.qp_lr) is float
    assert UnlearningArguments(damping="0.5").damping == 0.5 == UnlearningArguments(damping=0.5).damping
    assert UnlearningArguments(damping="0.5") == UnlearningArguments(damping=0.5)
    assert dataclasses.replace(args, damping="auto").damping == "auto"
    assert UnlearningArguments(**dataclasses.asdict(args)) == args
    assert SolverArguments(damping=0).damping == 0.0 and UnlearningArguments(damping=0).damping == 0.0
    with pytest.raises(ConfigurationError, match="damping must be a finite number ≥ 0 or 'auto', got True"):
        UnlearningArguments(damping=True)
    # the flag is parsed as text and validated the same way
    (parsed,) = build_parser((UnlearningArguments,), "hf-unlearn unlearn").parse_args_into_dataclasses(
        ["--damping", "0.1", "--lissa-scale", "auto"]
    )
    assert (parsed.damping, parsed.lissa_scale) == (0.1, "auto") and parsed == UnlearningArguments(
        damping=0.1
    )


def test_validation_reruns_on_replace_and_single_update_is_valid():
    args = UnlearningArguments(**SINGLE_UPDATE)
    assert args.refine_steps == 0 and args.curvature == "hessian"
    with pytest.raises(ConfigurationError, match="refine_steps must be ≥ 0"):
        dataclasses.replace(args, refine_steps=-1)
    with pytest.raises(ConfigurationError, match="curvature 'fisher'"):
        dataclasses.replace(args, solver="woodbury")


def test_choice_lists_are_the_implementations_registries():
    from hf_unlearn.curvature import CURVATURE_OPERATORS, KFAC_OPERATORS
    from hf_unlearn.curvature.kfac import TARGETS
    from hf_unlearn.refinement import KEEP_STEP
    from hf_unlearn.solvers import SOLVERS as SOLVER_FUNCTIONS

    assert tuple(SOLVER_FUNCTIONS) == SOLVERS
    assert (*CURVATURE_OPERATORS, *KFAC_OPERATORS) == CURVATURES and tuple(KFAC_OPERATORS) == KFAC_CURVATURES
    assert KFAC_TARGETS is TARGETS
    assert tuple(KEEP_STEP) == REFINE_DAMPINGS


def test_capture_curvature_is_a_training_time_concern_the_python_api_keeps():
    assert {f.name for f in dataclasses.fields(TrainingCaptureArguments)} == {"capture_curvature"}
    assert isinstance(UnlearningArguments(), TrainingCaptureArguments)
    assert UnlearningArguments().capture_curvature is True
    assert UnlearningArguments(capture_curvature=False).capture_curvature is False
    parser = build_parser((UnlearningArguments,), "hf-unlearn unlearn")
    assert "capture_curvature" not in {a.dest for a in parser._actions}
    with pytest.raises(ConfigurationError, match="unrecognized arguments: --capture-curvature"):
        parse_arguments((UnlearningArguments,), ["--capture-curvature"], "hf-unlearn unlearn")


def test_the_help_lists_the_flags_under_their_concern():
    parser = build_parser((UnlearningArguments,), "hf-unlearn unlearn")
    groups = {
        g.title: {o for a in g._group_actions for o in a.option_strings}
        for g in parser._action_groups
        if g._group_actions
    }
    for concern in CONCERNS[:-1]:
        expected = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(concern)}
        assert expected <= groups[concern.HELP_GROUP], concern
    assert TrainingCaptureArguments.HELP_GROUP not in groups  # hidden under unlearn
    assert "--no-progress" in groups[ComputationArguments.HELP_GROUP]
    assert not any(
        isinstance(a, argparse._StoreAction) and a.dest == "solver" for a in groups.get("options", ())
    )
