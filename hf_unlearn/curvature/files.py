"""Precomputed curvature on disk: a safetensors file of tensors beside a JSON file of metadata.

The JSON carries a `format` tag, the library version and the digest of the tensors; readers check the tag
here and the digest themselves. No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigurationError


def save_tensors(directory: str | Path, names: tuple[str, str], tensors: dict[str, torch.Tensor], meta: dict):
    """Write `tensors` to `directory/names[0]` and `{format, hf_unlearn_version, **meta}` to `names[1]`."""
    from safetensors.torch import save_file

    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(directory / names[0]))
    meta = {"format": meta["format"], "hf_unlearn_version": __version__, **meta}
    (directory / names[1]).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def files_exist(directory: str | Path, names: tuple[str, str]) -> bool:
    return all((Path(directory) / name).is_file() for name in names)


def load_tensors(directory: str | Path, names: tuple[str, str], fmt: str, what: str, advice: str):
    """`(tensors, meta)` written by `save_tensors` with format `fmt`; `what` and `advice` make the error
    message when the files are not there."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not files_exist(d, names):
        raise ConfigurationError(f"{str(d)!r} has no {what} ({names[0]} + {names[1]}). {advice}")
    meta = json.loads((d / names[1]).read_text(encoding="utf-8"))
    if meta.get("format") != fmt:
        raise ConfigurationError(
            f"{d / names[1]} has format {meta.get('format')!r}; this version reads {fmt!r}."
        )
    return load_file(str(d / names[0])), meta
