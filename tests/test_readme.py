"""The README's quick starts run as written: its Python block, then its command-line block in the same directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def block(section: str, language: str, index: int = 0) -> str:
    """The `index`-th `language` code block under the README heading `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    found = re.findall(rf"```{language}\n(.*?)```", text[start:end], re.S)
    assert len(found) > index, f"no {language} block {index} under '## {section}'"
    return found[index]


def test_the_quick_starts_run_as_written(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = tmp_path / "quick_start.py"
    script.write_text(block("Quick start: in a Trainer", "python"))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("quadratic ")  # the default estimate ran
    assert (tmp_path / "unlearned" / "unlearning_manifest.json").is_file()

    # the callback block continues the quick start (its rows, encode, lora and tokenizer)
    script.write_text(
        block("Quick start: in a Trainer", "python") + block("Quick start: in a Trainer", "python", 1)
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = (tmp_path / "unlearned-callback" / "unlearning_manifest.json").read_text()
    assert '"IR": 1' in manifest

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block("Quick start: command line", "bash")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "objective estimate quadratic" in done.stdout
        and "Would upload to my-org/pins-unlearned" in done.stdout
    )
    assert (tmp_path / "unlearned" / "adapter_model.safetensors").is_file()


def test_the_package_description_has_no_links_that_break_off_the_repository():
    """PyPI shows setup.cfg's long description without the repository's files: a relative link or image there
    (the README's demo plot) breaks, so the description is its own file, with absolute links only."""
    import configparser

    root = README.parent
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    source = config["metadata"]["long_description"].removeprefix("file:").strip()
    text = (root / source).read_text()
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r'src="([^"]+)"', text)
    assert [t for t in targets if not re.match(r"https?://", t)] == []
    assert source in (root / "MANIFEST.in").read_text()  # in the source distribution
    # the README itself has relative links (its plot): it cannot be the description
    assert re.findall(r"\]\((?!https?://)", README.read_text())
