"""`--config FILE`: a command's flags from a file (`hf-unlearn unlearn --config run.yaml`).

The file is either a YAML (or JSON) mapping of flag names to values — names with underscores as in
`UnlearningArguments` (`max_iter: 500`; the dashed spelling is accepted too), values as the flag takes them
(`true`/`false` for a switch; null leaves the flag's default) — or an earlier run's `unlearning_manifest.json`,
whose recorded `arguments` (and, from the command line's manifests, `text_encoding`) are replayed.

The values become flags placed before the command line's, so they are parsed and checked exactly as flags are and
a flag given on the command line overrides the file's. A key that is not a flag of the command is refused.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

from .errors import ConfigurationError

CONFIG_FLAG = "--config"


def split_config_flag(argv: list[str]) -> tuple[list[str], list[str]]:
    """`(files, rest)`: the files of every `--config FILE` / `--config=FILE` in `argv`, in order, and the other
    arguments."""
    files, rest = [], []
    tokens = iter(argv)
    for token in tokens:
        if token == CONFIG_FLAG:
            file = next(tokens, None)
            if file is None or file.startswith("--"):
                raise ConfigurationError(
                    f"{CONFIG_FLAG} needs a FILE (a YAML file or an unlearning_manifest.json)."
                )
            files.append(file)
        elif token.startswith(CONFIG_FLAG + "="):
            files.append(token.partition("=")[2])
        else:
            rest.append(token)
    return files, rest


def _manifest_values(manifest: dict) -> dict:
    """The flags of the run that wrote `manifest`: its `arguments` and `text_encoding`, with `curvature_factors`
    set back to 'auto' where the run resolved 'auto' to its input adapter's directory (so that a replay on another
    adapter takes that adapter's saved factors, as the original run did)."""
    values = {**(manifest.get("text_encoding") or {}), **(manifest.get("arguments") or {})}
    input_adapter = (manifest.get("input_adapter") or {}).get("path")
    if input_adapter is not None and values.get("curvature_factors") == input_adapter:
        values["curvature_factors"] = "auto"
    return values


def read_config(path: str) -> tuple[dict, bool]:
    """`(values, is_manifest)`: the flag values in `path` (a YAML/JSON mapping, or an unlearning manifest's)."""
    from .io import MANIFEST_FORMAT

    file = Path(path)
    if not file.is_file():
        raise ConfigurationError(f"{CONFIG_FLAG} {path!r}: no such file.")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":  # a manifest (json writes inf as Infinity, which YAML reads as text)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigurationError(f"{CONFIG_FLAG} {path!r} is not valid JSON: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigurationError(f"{CONFIG_FLAG} {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}, False
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{CONFIG_FLAG} {path!r} holds a {type(data).__name__}, not a mapping of flag names to values."
        )
    if data.get("format") == MANIFEST_FORMAT:
        return _manifest_values(data), True
    return data, False


def _value_flags(option: str, action: argparse.Action, value, where: str) -> list[str]:
    if isinstance(value, bool):
        return [f"{option}={'true' if value else 'false'}"]
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [option, *(str(v) for v in value)]
    if isinstance(value, list | dict):
        raise ConfigurationError(f"{where}: {option} takes one value, got {value!r}.")
    return [f"{option}={value}"]


def _hint(key: str, known, unused, prog: str) -> str:
    if key in unused:
        return f"{key!r} (a training-time argument {prog} does not take)"
    close = difflib.get_close_matches(key, known, 1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def config_flags(
    path: str, parser: argparse.ArgumentParser, prog: str, unused: set[str] = frozenset()
) -> list[str]:
    """The flags `path` gives `parser` (of `prog`), as command-line arguments.

    A key that is not a flag of `prog` is refused, except, in a manifest, the arguments in `unused` (flags `prog`
    does not offer, like `capture_curvature` for `hf-unlearn unlearn`, which a Trainer's manifest records)."""
    values, is_manifest = read_config(path)
    actions = {}  # destination → the flag that sets it (for a switch, the positive one, not --no-x)
    for action in parser._actions:
        if (
            action.option_strings
            and action.dest not in (argparse.SUPPRESS, "help", "config")
            and not isinstance(action, argparse._StoreFalseAction)
        ):
            actions.setdefault(action.dest, action)
    keys = {str(key).replace("-", "_"): value for key, value in values.items()}
    if is_manifest:
        keys = {key: value for key, value in keys.items() if key not in unused}
    if unknown := [key for key in keys if key not in actions]:
        hints = [_hint(key, actions, unused, prog) for key in unknown]
        raise ConfigurationError(
            f"{CONFIG_FLAG} {path!r}: unknown key{'s' * (len(unknown) > 1)} {', '.join(hints)}: not a flag of "
            f"{prog}. Keys are flag names with underscores (e.g. max_iter for --max-iter; see `{prog} --help`)."
        )
    flags = []
    for key, value in keys.items():
        action = actions[key]
        if value is None:
            if action.default is None:
                continue  # the flag's default
            raise ConfigurationError(
                f"{CONFIG_FLAG} {path!r}: {key} cannot be null (default {action.default!r})."
            )
        flags += _value_flags(action.option_strings[0], action, value, f"{CONFIG_FLAG} {path!r}")
    return flags


class ConfigAction(argparse.Action):
    """`--config FILE` in a command's help. `split_config_flag` takes the flag out before parsing, so this
    action only sees an abbreviation of it (`--conf FILE`), which it refuses."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, metavar="FILE", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigurationError(f"Give {CONFIG_FLAG} FILE spelled out in full, not abbreviated.")


CONFIG_HELP = (
    "Take flags from FILE: a YAML mapping of flag names with underscores to values (e.g. max_iter: 500), or an "
    "earlier run's unlearning_manifest.json, whose recorded arguments are replayed. Flags given on the command "
    "line override the file's; an unknown key is refused."
)
