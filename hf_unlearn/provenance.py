"""What produced a results file (the demo's, the benchmarks'): git revision of the source tree when it is a
checkout, library versions, threads, command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(command: list[str] | None = None) -> dict:
    """`git_revision` (None outside a checkout) and `git_dirty` of the tree hf_unlearn is imported from,
    `versions`, `torch_threads`, `cpu_count` and `command` (default: this process's, as run)."""
    import peft
    import torch
    import transformers

    root = Path(__file__).resolve().parent.parent
    revision = _git(root, "rev-parse", "HEAD")
    return {
        "git_revision": revision.strip() if revision else None,
        "git_dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")) if revision else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
    }
