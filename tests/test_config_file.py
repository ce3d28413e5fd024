"""`hf-unlearn --version` and `hf-unlearn unlearn --config FILE` (a YAML file or an earlier manifest's arguments)."""

import json
from importlib import metadata

import pytest
from reference import SINGLE_STEP_FLAGS, single_step

import hf_unlearn
from hf_unlearn import ConfigurationError, UnlearningArguments
from hf_unlearn.cli import main, unlearn_arguments
from hf_unlearn.io import MANIFEST_FORMAT, MANIFEST_NAME

PATHS = ["--model", "m", "--adapter", "a", "--train-file", "t", "--request", "r", "--output-dir", "o"]


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_version_prints_the_distributions_version(capsys):
    try:
        expected = metadata.version("hf-unlearn")  # setup.cfg's name
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        expected = hf_unlearn.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_a_yaml_config_gives_the_arguments_of_the_same_flags(tmp_path):
    config = write(
        tmp_path / "run.yaml",
        "model: m\nadapter: a\ntrain_file: t\nrequest: r\noutput-dir: o\n"  # paths too; a dashed key
        "solver: direct\ncurvature: hessian\ndamping: 0.25\ntol: 1.0e-7\nmax_iter: 40\n"
        "kept_loss_tolerance: .inf\nrefine_damping: fixed\nrefine_steps: 0\n"
        "progress: false\nallow_inexact: true\nchat_template: true\nmax_length: 64\n"
        "hessian_samples: null\nqp_lr: auto\n",
    )
    flags = [
        *PATHS, "--solver", "direct", "--curvature", "hessian", "--damping", "0.25", "--tol", "1e-7",
        "--max-iter", "40", "--kept-loss-tolerance", "inf", "--refine-damping", "fixed", "--refine-steps", "0",
        "--no-progress", "--allow-inexact", "--chat-template", "--max-length", "64",
    ]  # fmt: skip
    paths, encoding, args = unlearn_arguments(["--config", config])
    assert (paths, encoding, args) == unlearn_arguments(flags)
    assert args.damping == 0.25 and args.max_iter == 40 and args.progress is False and encoding.chat_template
    assert args != UnlearningArguments()  # the file was read


def test_a_command_line_flag_overrides_the_file(tmp_path):
    config = write(tmp_path / "run.yaml", "damping: 0.5\nmax_iter: 50\nprogress: false\nsolver: direct\n")
    for argv in (
        ["--config", config, *PATHS, "--damping", "2", "--progress"],
        [*PATHS, "--damping=2", "--progress", f"--config={config}"],  # wherever --config stands
    ):
        _, _, args = unlearn_arguments(argv)
        assert (args.damping, args.progress) == (2.0, True)  # the command line's
        assert (args.max_iter, args.solver) == (50, "direct")  # the file's


def manifest(path, arguments: UnlearningArguments, **context) -> str:
    """An unlearning manifest as far as a replay reads it (json.dumps writes inf as Infinity, as io does)."""
    record = {"format": MANIFEST_FORMAT, "arguments": arguments.to_dict(), **context}
    return write(path, json.dumps(record))


def test_a_manifest_replays_its_recorded_arguments(tmp_path):
    # as UnlearnTrainer records them: capture_curvature is a training-time argument the command does not take
    trainer_run = single_step(damping=0.3, l2_regularization=0.01, dtype="float64", capture_curvature=True)
    replayed = unlearn_arguments(["--config", manifest(tmp_path / MANIFEST_NAME, trainer_run), *PATHS])
    flags = unlearn_arguments([*SINGLE_STEP_FLAGS, "--damping", "0.3", "--l2-regularization", "0.01",
                               "--dtype", "float64", *PATHS])  # fmt: skip
    assert replayed == flags
    # as hf-unlearn unlearn records them: the text encoding, and 'auto' factors resolved to the input adapter's
    cli_run = UnlearningArguments(curvature="kfac", curvature_factors="runs/adapter", damping=0.02)
    path = manifest(
        tmp_path / "cli.json",
        cli_run,
        input_adapter={"path": "runs/adapter", "digest": "sha256:0"},
        text_encoding={"max_length": 32, "chat_template": False},
    )
    paths, encoding, args = unlearn_arguments(["--config", path, *PATHS])
    assert (encoding.max_length, args.curvature_factors) == (32, "auto")  # this run's adapter's factors
    assert args == UnlearningArguments(curvature="kfac", damping=0.02)


def test_an_unknown_key_is_refused_as_a_bad_flag_is(tmp_path, capsys):
    bad_flag = main(["unlearn", *PATHS, "--dampin", "1"])
    capsys.readouterr()
    assert bad_flag == ConfigurationError.exit_code == 4
    config = write(tmp_path / "run.yaml", "damping: 1.0\ndampin: 2\n")
    assert main(["unlearn", "--config", config, *PATHS]) == bad_flag
    err = capsys.readouterr().err
    assert (
        "unknown key 'dampin' (did you mean 'damping'?)" in err and "not a flag of hf-unlearn unlearn" in err
    )
    training_only = write(tmp_path / "train.yaml", "capture_curvature: true\n")
    assert main(["unlearn", "--config", training_only, *PATHS]) == bad_flag
    assert "'capture_curvature' (a training-time argument" in capsys.readouterr().err
    record = {
        "format": MANIFEST_FORMAT,
        "arguments": {**UnlearningArguments().to_dict(), "retired_option": 1},
    }
    old = write(tmp_path / "old.json", json.dumps(record))
    with pytest.raises(ConfigurationError, match="unknown key 'retired_option'"):
        unlearn_arguments(["--config", old, *PATHS])
    for text, message in (("- damping\n", "not a mapping"), ("damping: [1, 2]\n", "takes one value")):
        with pytest.raises(ConfigurationError, match=message):
            unlearn_arguments(["--config", write(tmp_path / "other.yaml", text), *PATHS])
    with pytest.raises(ConfigurationError, match="no such file"):
        unlearn_arguments(["--config", str(tmp_path / "missing.yaml"), *PATHS])


def test_unlearn_replays_an_earlier_runs_manifest(workspace, capsys):
    """End to end: the manifest `hf-unlearn unlearn` wrote, given back as --config with the same inputs, runs
    the same arguments again."""
    root = workspace["root"]
    inputs = ["--model", workspace["base"], "--adapter", workspace["adapter"], "--train-file", workspace["train"],
              "--request", workspace["IR"]]  # fmt: skip
    first = root / "replay-first"
    flags = [*SINGLE_STEP_FLAGS, "--damping", "1.0", "--max-iter", "50", "--no-progress"]
    assert main(["unlearn", *inputs, "--output-dir", str(first), *flags]) == 0
    again = root / "replay-again"
    assert main(["unlearn", "--config", str(first / MANIFEST_NAME), *inputs, "--output-dir", str(again)]) == 0
    recorded = [json.loads((out / MANIFEST_NAME).read_text())["arguments"] for out in (first, again)]
    assert recorded[0] == recorded[1] and recorded[0]["damping"] == 1.0 and recorded[0]["max_iter"] == 50
