"""Argument checks shared by the public constructors.

Each raises :class:`ValueError` naming the argument and the values it allows, so that a typo in a config
(a string, a bool, NaN) fails at construction with a message instead of deep inside a training step.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float, if it is a real number (not a bool, not NaN) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        left = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"`{name}` must satisfy {left}{name}{right}, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int, if it is an integer (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value``, if it is ``True`` or ``False`` (a truthy string must not pass for ``True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value
