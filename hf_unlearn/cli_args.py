"""Command-line argument parsing of the `hf-unlearn` commands: `HfArgumentParser` over the commands' argument
dataclasses, with dashed flags, a bad argument raised as `ConfigurationError`, and the flags that do not belong
to a command removed. Used by cli.py and by `hf-unlearn train` (training.py)."""

from __future__ import annotations

import argparse
import dataclasses

# Flags of a shared argument dataclass that make no sense for a command: not offered (nor accepted) there. For
# hf-unlearn unlearn, the training-time arguments (`config.TRAINING_TIME_ARGUMENTS`: UnlearnTrainer / the callback).
HIDDEN_TRAINING_TIME = ("hf-unlearn unlearn",)


# The unlearning arguments `hf-unlearn prepare` uses (`eraser.prepare_curvature`: one K-FAC pass over the
# training rows); the others (solver, damping, request, refinement) it would ignore, so it does not offer them.
PREPARE_ARGUMENTS = frozenset(
    {"loss_normalization", "curvature_samples", "kfac_targets", "batch_size", "dtype", "seed"}
)


def hidden_flags(prog: str) -> set[str]:
    """The destinations of the flags `prog` does not offer (for unlearn the training-time arguments, for prepare
    every unlearning argument outside `PREPARE_ARGUMENTS`)."""
    if prog == "hf-unlearn prepare":
        from .config import UnlearningArguments

        return {f.name for f in dataclasses.fields(UnlearningArguments)} - PREPARE_ARGUMENTS
    if prog in HIDDEN_TRAINING_TIME:
        from .config import TRAINING_TIME_ARGUMENTS

        return set(TRAINING_TIME_ARGUMENTS)
    return set()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" only where the help does not already say what the default is, and not for None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _tidy(parser, prog: str) -> None:
    """Flags shown with dashes only (the underscore spellings stay accepted), a `--no-x` flag described as what it
    does, and flags that do not belong to `prog` removed."""
    hidden = hidden_flags(prog)
    for action in list(parser._actions):
        if action.dest in hidden:
            parser._remove_action(action)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            for option in action.option_strings:
                parser._option_string_actions.pop(option, None)
            parser.set_defaults(**{action.dest: action.default})
            continue
        if not action.option_strings or "--help" in action.option_strings:
            continue
        dashed = list(dict.fromkeys(o.replace("_", "-") for o in action.option_strings))
        for option in dashed:
            parser._option_string_actions.setdefault(option, action)
        action.option_strings = dashed
        if isinstance(action, argparse._StoreFalseAction) and dashed[0].startswith("--no-"):
            positive = "--" + dashed[0][len("--no-") :]
            what = action.help.rstrip(".") if action.help else ""
            action.help = f"Turn off {positive}" + (f" ({what[:1].lower() + what[1:]})." if what else ".")
            action.default = argparse.SUPPRESS  # the positive flag's default is the one that applies


def _group_by_concern(parser, types: tuple) -> None:
    """List the flags of an argument dataclass composed of concerns (`UnlearningArguments.CONCERNS`'s classes,
    each with a `HELP_GROUP` heading) under one heading per concern in the help; parsing is unchanged."""
    from .config import CONCERNS, Concern

    if not any(isinstance(t, type) and issubclass(t, Concern) for t in types):
        return
    for concern in CONCERNS:
        names = {f.name for f in dataclasses.fields(concern)}
        actions = [a for a in parser._actions if a.dest in names and a.option_strings]
        if not actions:  # every flag of the concern hidden for this command
            continue
        group = parser.add_argument_group(concern.HELP_GROUP)
        for action in actions:
            for other in parser._action_groups:
                if action in other._group_actions:
                    other._group_actions.remove(action)
            group._group_actions.append(action)


def build_parser(types: tuple, prog: str, config: bool = False):
    """The `HfArgumentParser` of `prog` over `types` (tidied by `_tidy`), raising `ConfigurationError` for a bad
    argument; with `config`, `--config FILE` is in its help (`config_file`)."""
    from transformers import HfArgumentParser

    from .errors import ConfigurationError

    parser = HfArgumentParser(types, prog=prog, formatter_class=_HelpFormatter)
    _tidy(parser, prog)
    _group_by_concern(parser, types)
    if config:
        from .config_file import CONFIG_FLAG, CONFIG_HELP, ConfigAction

        parser.add_argument(CONFIG_FLAG, action=ConfigAction, help=CONFIG_HELP)

    def error(message):
        raise ConfigurationError(f"{message} (see `{prog} --help`).")

    parser.error = error
    return parser


def parse_arguments(types: tuple, argv: list[str], prog: str, *, config: bool = False) -> tuple:
    """`HfArgumentParser(types).parse_args_into_dataclasses(argv)`, with an unknown flag or a malformed value
    raised as `ConfigurationError` (exit code 4, a bad argument) instead of a traceback or argparse's exit 2.

    With `config`, `--config FILE` takes flags from a YAML file or an unlearning manifest (`config_file`): they
    are parsed before `argv`'s, which override them."""
    files, argv = ([], argv)
    if config:
        from .config_file import split_config_flag

        files, argv = split_config_flag(argv)
    parser = build_parser(types, prog, config)
    if files:
        from .config_file import config_flags

        argv = [
            flag for file in files for flag in config_flags(file, parser, prog, hidden_flags(prog))
        ] + argv
    *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(parsed)
