"""What every concern of `UnlearningArguments` validates with: a choice from its registry, a bound, a number or
'auto'; and `Concern`, the base that validates a concern's own fields on construction."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigurationError

if TYPE_CHECKING:
    # What the Python API takes and validation stores: a float, or the string 'auto' (a number's text too).
    FloatOrAuto = float | str
else:
    # HfArgumentParser gives a flag one type, and parses a union with str as its other member (float), which would
    # refuse `--damping auto`; so the flag is parsed as text and `number_or_auto` turns it into a float or 'auto'.
    FloatOrAuto = str


class Concern:
    """Base of the argument concerns: `validate()` checks (and normalises) this concern's own fields, and runs on
    construction (`__post_init__`), so that `SolverArguments(tol=0)` alone is refused. `UnlearningArguments`
    overrides `validate` to run every concern's, then the checks that span concerns."""

    HELP_GROUP: ClassVar[str] = ""  # the heading of the concern's flags in `hf-unlearn unlearn --help`

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict:
        return asdict(self)


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")


def at_least(name: str, value, minimum: int, unset: str | None = None) -> None:
    """Refuse an integer `value` below `minimum`; with `unset`, None is allowed (and means `unset`)."""
    if unset is not None and value is None:
        return
    if int(value) < minimum:
        also = f" (or unset for {unset})" if unset else ""
        raise ConfigurationError(f"{name} must be ≥ {minimum}{also}, got {value!r}.")


def number_or_auto(name: str, value, minimum_inclusive: bool = False) -> float | str:
    """'auto', or a finite number > 0 (≥ 0 with `minimum_inclusive`) as a float, from a number or its text."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    bound = "≥ 0" if minimum_inclusive else "> 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number {bound} or 'auto', got {value!r}.") from None
    if (
        isinstance(value, bool)
        or not math.isfinite(number)
        or number < 0
        or (number == 0 and not minimum_inclusive)
    ):
        raise ConfigurationError(f"{name} must be a finite number {bound} or 'auto', got {value!r}.")
    return number
