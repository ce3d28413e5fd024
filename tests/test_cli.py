"""`hf-unlearn unlearn` end to end on a tiny Llama saved to disk, against a dense float64 computation."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from reference import (
    REPLACEMENTS_FOR_CLI,
    REQUESTS_FOR_CLI,
    ROWS_FOR_CLI,
    SINGLE_STEP_FLAGS,
    DenseReference,
    relative_error,
    single_step,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_unlearn.cli import main
from hf_unlearn.io import MANIFEST_NAME, adapter_digest

ROWS = ROWS_FOR_CLI
REPLACEMENTS, REQUESTS = REPLACEMENTS_FOR_CLI, REQUESTS_FOR_CLI


def dense_update(workspace, kind, normalization, damping):
    base = AutoModelForCausalLM.from_pretrained(
        workspace["base"], dtype=torch.float64, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, workspace["adapter"], is_trainable=True).double()
    ref = DenseReference(model, normalization)
    old = [ROWS[line["id"]] for line in REQUESTS[kind]]
    new = [
        {"input_ids": line["input_ids"], "labels": line["labels"]}
        for line in REQUESTS[kind]
        if line["op"] == "replace"
    ]
    return ref, ref.update(ROWS, old, new, damping)


def adapter_vector(path, names):
    tensors = load_file(f"{path}/adapter_model.safetensors")
    return torch.cat([tensors[n].double().reshape(-1) for n in names])


@pytest.mark.parametrize("normalization", ["token", "example"])
@pytest.mark.parametrize("kind", ["IR", "QM", "RC"])
def test_cli_reproduces_dense_update(workspace, kind, normalization):
    digest_before = adapter_digest(workspace["adapter"])
    ref, _ = dense_update(workspace, kind, normalization, 0.0)
    damping = max(0.0, -torch.linalg.eigvalsh(ref.hessian(ROWS))[0].item()) + 0.05
    _, expected = dense_update(workspace, kind, normalization, damping)
    names = list(load_file(f"{workspace['adapter']}/adapter_model.safetensors"))
    before = adapter_vector(workspace["adapter"], names)
    for dtype, tolerance in (("float32", 1e-3), ("float64", 1e-4)):
        out = workspace["root"] / f"out-{kind}-{normalization}-{dtype}"
        code = main(
            ["unlearn", *SINGLE_STEP_FLAGS, "--model", workspace["base"], "--adapter", workspace["adapter"], "--train-file", workspace["train"],
             "--request", workspace[kind], "--output-dir", str(out), "--solver", "cg", "--curvature", "hessian",
             "--damping", str(damping), "--tol", "1e-8", "--max-iter", "500", "--loss-normalization", normalization,
             "--dtype", dtype, "--no_progress"]
        )  # fmt: skip
        assert code == 0
        delta = adapter_vector(out, names) - before
        error = relative_error(delta, expected)
        print(f"{kind} {normalization} {dtype}: relative error {error:.2e}")
        assert error <= tolerance, (dtype, error)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["request"]["kinds"] == {kind: len(REQUESTS[kind])}
        assert manifest["arguments"]["dtype"] == dtype and manifest["arguments"]["damping"] == damping
        assert manifest["input_adapter"]["digest"] == digest_before
        assert manifest["num_processes"] == 1 and manifest["solver"]["converged"]
    assert adapter_digest(workspace["adapter"]) == digest_before  # the input adapter is untouched


def test_output_is_a_loadable_peft_adapter_with_manifest_and_card(workspace):
    out = workspace["root"] / "loadable"
    args = ["unlearn", *SINGLE_STEP_FLAGS, "--model", workspace["base"], "--adapter", workspace["adapter"], "--train-file", workspace["train"],
            "--request", workspace["IR"], "--output-dir", str(out), "--damping", "1.0"]  # fmt: skip
    assert main(args) == 0
    assert {"adapter_model.safetensors", "adapter_config.json", MANIFEST_NAME, "README.md"} <= {
        p.name for p in out.iterdir()
    }
    base = AutoModelForCausalLM.from_pretrained(workspace["base"])
    model = PeftModel.from_pretrained(base, str(out))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    manifest_text = (out / MANIFEST_NAME).read_text()
    assert '"input_ids"' not in manifest_text  # digests only
    assert "## Unlearning" in (out / "README.md").read_text()
    # A second run into the same directory is refused without --overwrite, and leaves it as it was.
    before = adapter_digest(out)
    assert main(args) == 6
    assert adapter_digest(out) == before
    assert main([*args, "--overwrite"]) == 0


def test_damping_auto_is_saved_with_the_value_it_chose(workspace):
    out = workspace["root"] / "auto"
    args = ["unlearn", *SINGLE_STEP_FLAGS, "--model", workspace["base"], "--adapter", workspace["adapter"], "--train-file", workspace["train"],
            "--request", workspace["IR"], "--output-dir", str(out), "--damping", "auto", "--curvature", "ggn"]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["arguments"]["damping"] == "auto" and manifest["solver"]["damping"] > 0
    assert f"damping {manifest['solver']['damping']:g} (auto)" in (out / "README.md").read_text()


def test_an_output_dir_overlapping_an_input_is_refused_and_the_inputs_stay(workspace, tmp_path):
    import shutil

    adapter = tmp_path / "runs" / "adapter"
    shutil.copytree(workspace["adapter"], adapter)
    digest = adapter_digest(adapter)
    common = ["unlearn", *SINGLE_STEP_FLAGS, "--model", workspace["base"], "--adapter", str(adapter), "--train-file", workspace["train"],
              "--request", workspace["IR"], "--damping", "1.0", "--overwrite"]  # fmt: skip
    for out in (
        adapter,
        adapter.parent,
        adapter / "unlearned",
        workspace["root"],
    ):  # root holds the train file
        assert main([*common, "--output-dir", str(out)]) == 4, out
    assert adapter_digest(adapter) == digest and not (adapter / "unlearned").exists()


def test_console_script_and_module_entry_points(workspace):
    out = workspace["root"] / "entry"
    command = ["unlearn", *SINGLE_STEP_FLAGS, "--model", workspace["base"], "--adapter", workspace["adapter"], "--train-file",
               workspace["train"], "--request", workspace["RC"], "--output-dir", str(out), "--damping", "1.0"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "hf_unlearn", *command], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Wrote" in run.stdout and (out / "adapter_model.safetensors").is_file()
    run = subprocess.run(
        ["hf-unlearn", *command[:-4], "--output-dir", str(workspace["root"] / "x"), "--damping", "-1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 4 and "damping" in run.stderr and "Traceback" not in run.stderr


def test_new_flags_parse_numbers_and_auto():
    from transformers import HfArgumentParser

    from hf_unlearn import ConfigurationError, UnlearningArguments

    parser = HfArgumentParser(UnlearningArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--solver",
            "qp",
            "--curvature",
            "ggn",
            "--damping",
            "auto",
            "--qp-optimizer",
            "adam",
            "--qp-lr",
            "0.01",
        ]
        + ["--stochastic-batch-size", "4", "--refine-steps", "2", "--lissa-scale", "auto"]
    )
    assert (args.damping, args.qp_lr, args.lissa_scale, args.refine_steps) == ("auto", 0.01, "auto", 2)
    (args,) = parser.parse_args_into_dataclasses(
        ["--damping", "0.5", "--solver", "lissa", "--lissa-scale", "20"]
    )
    assert (args.damping, args.lissa_scale) == (0.5, 20.0)
    assert parser.parse_args_into_dataclasses([])[0].damping == 1e-3
    for bad in (["--damping", "-1"], ["--damping", "much"], ["--qp-lr", "0"], ["--refine-steps", "-1"]):
        with pytest.raises(ConfigurationError):
            parser.parse_args_into_dataclasses(bad)
    with pytest.raises(ConfigurationError, match="qp-lr"):
        single_step(solver="qp", qp_optimizer="adam")


def test_nystrom_sketch_is_written_beside_the_output_and_reused_by_the_next_request(workspace):
    from hf_unlearn import NystromSketch

    root, common = workspace["root"], ["--model", workspace["base"], "--no_progress"]
    solve = ["--curvature", "ggn", "--damping", "0.05", "--max-iter", "500"]
    first = root / "nystrom-1"
    with_ids = [{"id": i, **r} for i, r in enumerate(ROWS)]  # ids that survive the removal
    train = write_jsonl(root / "train-ids.jsonl", with_ids)
    assert main(["unlearn", *SINGLE_STEP_FLAGS, *common, *solve, "--adapter", workspace["adapter"], "--train-file", train,
                 "--request", workspace["IR"], "--output-dir", str(first), "--preconditioner", "nystrom",
                 "--nystrom-rank", "32", "--tol", "1e-5"]) == 0  # fmt: skip
    record = json.loads((first / MANIFEST_NAME).read_text())["nystrom_sketch"]
    assert record["origin"] == "pass" and record["products_in_unlearning"] == 32 and record["downdates"] == 1
    assert NystromSketch.load(first).digest() == record["digest"]
    # the next request, on the training file as edited by the first (rows 2 and 8 removed), in float64 with
    # the float32 sketch the first run saved
    edited = write_jsonl(root / "train-edited.jsonl", [r for r in with_ids if r["id"] not in (2, 8)])
    deltas = {}
    for name, extra in (("nystrom", ["--preconditioner", "nystrom"]), ("plain", [])):
        out = root / f"nystrom-2-{name}"
        assert main(["unlearn", *SINGLE_STEP_FLAGS, *common, *solve, "--adapter", str(first), "--train-file", edited, "--request", workspace["RC"],
                     "--output-dir", str(out), "--tol", "1e-9", "--dtype", "float64", *extra]) == 0  # fmt: skip
        names = list(load_file(f"{out}/adapter_model.safetensors"))
        deltas[name] = adapter_vector(out, names) - adapter_vector(first, names)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    second = json.loads((root / "nystrom-2-nystrom" / MANIFEST_NAME).read_text())
    record = second["nystrom_sketch"]
    assert record["origin"] == "file" and record["products_in_unlearning"] == 0 and record["downdates"] == 2
    assert not record["parameters_match"]  # sketched at the first adapter's weights: a preconditioner still
    assert second["arguments"]["curvature_factors"] == str(first)
    assert (
        "nystrom_sketch" not in manifest and not (root / "nystrom-2-plain" / "nystrom_sketch.json").exists()
    )
    assert relative_error(deltas["nystrom"], deltas["plain"]) < 1e-6


def test_the_commands_hide_known_uninformative_third_party_warnings_only(monkeypatch):
    import warnings

    from hf_unlearn import cli

    noise = [
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
         "instead.", FutureWarning),
        ("`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` "
         "instead.", FutureWarning),
        ("Could not find a config file in /models/gguf - will assume that the vocabulary was not modified.",
         UserWarning),
        ("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be "
         "used.", UserWarning),
    ]  # fmt: skip
    unrelated = [
        (
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            DeprecationWarning,
        ),  # other kind
        ("Could not find a tokenizer in /models/gguf", UserWarning),
        ("the removed rows stand out", UserWarning),
    ]

    def command(argv):
        for message, category in noise + unrelated:
            warnings.warn(message, category, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "push_command", command)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        command([])  # a program using the library sees them all
        assert len(shown) == len(noise + unrelated)
        del shown[:]
        assert cli.main(["push", "out", "--dry-run"]) == 0
    assert [(str(w.message), w.category) for w in shown] == unrelated


def test_push_dry_run_into_a_closed_pipe_exits_quietly(tmp_path):
    """`hf-unlearn push DIR --dry-run | head -1`: the reader goes away after one line; no BrokenPipe traceback."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME):
        (folder / name).write_text("{}")
    (folder / "README.md").write_text("card")
    for i in range(3000):  # a listing far longer than a pipe holds: the writer meets the closed pipe
        (folder / f"file_with_a_rather_long_name_{i:05d}.txt").write_text("x")
    command = [sys.executable, "-m", "hf_unlearn", "push", str(folder), "--repo-id", "me/x", "--dry-run"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline().startswith("Would upload to me/x")
    run.stdout.close()  # as `head -1` exits
    stderr = run.stderr.read()
    run.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert run.returncode in (0, 141)


def test_the_library_function_writes_what_the_command_writes(workspace):
    """`unlearn_adapter_directory` is the pipeline `hf-unlearn unlearn` is a thin shell over: the same inputs
    give the same adapter and manifest, and a report of what was written."""
    from hf_unlearn import TextEncoding, UnlearningArguments, UnlearnPaths, unlearn_adapter_directory

    inputs = {"model": workspace["base"], "adapter": workspace["adapter"], "train_file": workspace["train"],
              "request": workspace["RC"]}  # fmt: skip
    cli_out, lib_out = workspace["root"] / "pipeline-cli", workspace["root"] / "pipeline-lib"
    flags = ["--damping", "1.0", "--dtype", "float64", "--no_progress"]
    assert main(["unlearn", "--model", inputs["model"], "--adapter", inputs["adapter"], "--train-file",
                 inputs["train_file"], "--request", inputs["request"], "--output-dir", str(cli_out), *flags]) == 0  # fmt: skip
    done = unlearn_adapter_directory(
        UnlearnPaths(**inputs, output_dir=str(lib_out)),
        TextEncoding(),
        UnlearningArguments(damping="1.0", dtype="float64", progress=False),
    )
    assert done.output_dir == lib_out and (lib_out / MANIFEST_NAME).is_file()
    names = list(load_file(f"{cli_out}/adapter_model.safetensors"))
    assert torch.equal(adapter_vector(lib_out, names), adapter_vector(cli_out, names))
    cli_manifest, lib_manifest = (json.loads((d / MANIFEST_NAME).read_text()) for d in (cli_out, lib_out))
    assert lib_manifest["request"] == cli_manifest["request"]
    assert lib_manifest["arguments"] == cli_manifest["arguments"]
    assert done.manifest == lib_manifest
    assert done.summary().startswith("Unlearned {'RC': ") and done.summary().endswith(f"Wrote {lib_out}")
