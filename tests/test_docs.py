"""Every bash and Python block on the `docs/` pages runs as written, in one directory, after the setup block
of `docs/README.md` (the order the pages are read in). The multi-process launches of `distributed.md` run
under the `slow` marker."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("README.md", "method.md", "curvature-and-solvers.md", "formats.md")


def blocks(page: str) -> list[tuple[str, str]]:
    """`(language, code)` of each bash or python block on `page`, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", (DOCS / page).read_text(), re.S)


def run_block(language: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """The directory the docs' setup block (`docs/README.md`) ran in."""
    root = tmp_path_factory.mktemp("docs")
    ((language, code),) = blocks("README.md")
    done = run_block(language, code, root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_every_docs_block_runs_as_written(docs_dir):
    ran = 0
    for page in PAGES[1:]:
        for language, code in blocks(page):
            done = run_block(language, code, docs_dir)
            assert done.returncode == 0, (page, code, done.stderr[-3000:])
            ran += 1
    assert ran >= 10  # the pages' blocks were found
    assert (docs_dir / "unlearned" / "unlearning_manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_distributed_launches_run_as_written(docs_dir):
    ((language, code),) = blocks("distributed.md")
    done = run_block(language, code, docs_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    for out in ("unlearned-torchrun", "unlearned-accelerate"):
        assert (docs_dir / out / "unlearning_manifest.json").is_file()
