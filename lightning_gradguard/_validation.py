"""Argument checks shared by the public constructors.

Each raises :class:`ValueError` naming the argument and the values it allows, so that a typo in a config
(a string, a bool, NaN) fails at construction with a message instead of deep inside a training step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

#: The largest float32: bounds are compared with norms in float32 tensors on the device.
FLOAT32_MAX = 3.4028234663852886e38


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    allow_inf: bool = False,
    low_name: str | None = None,
    optional: bool = False,
) -> float:
    """``value`` as a float, if it is a real number (not a bool, not NaN) within the given bounds.

    ``low_name``: the argument the lower bound comes from, named in the message; ``optional``: the argument also takes
    ``None``, which the message says (use :func:`optional_number`).
    """
    alternative = " (or None)" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"`{name}` must be a real number{alternative}, got {value!r}.")
    value = float(value)
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"`{name}` must be finite{alternative}, got {value!r}.")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        bound = f"{low}" if low_name is None else f"{low_name} ({low})"
        left = "" if low is None else f"{bound} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"`{name}` must satisfy {left}{name}{right}{alternative}, got {value!r}.")
    return value


def optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """``None``, or ``value`` checked as by :func:`check_number` (whose message then offers ``None`` too)."""
    return None if value is None else check_number(name, value, optional=True, **bounds)


def check_int(name: str, value: Any, *, low: int | None, high: int | None = None, optional: bool = False) -> int:
    """``value`` as an int, if it is an integer (not a bool) ``>= low`` and ``<= high`` (``None``: unbounded);
    ``optional``: the message offers ``None``."""
    number = None if isinstance(value, bool) or not isinstance(value, numbers.Integral) else int(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        bounds = [f">= {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        bound = f" {' and '.join(bounds)}" if bounds else ""
        alternative = " or None" if optional else ""
        raise ValueError(f"`{name}` must be an integer{bound}{alternative}, got {value!r}.")
    return number


def optional_int(name: str, value: Any, *, low: int, high: int | None = None) -> int | None:
    """``None``, or ``value`` checked as by :func:`check_int` (whose message then offers ``None`` too)."""
    return None if value is None else check_int(name, value, low=low, high=high, optional=True)


def check_bool(name: str, value: Any) -> bool:
    """``value``, if it is ``True`` or ``False`` (a truthy string must not pass for ``True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_compile(value: Any) -> bool | str:
    """``compile``: ``True``, ``False`` or ``"auto"``."""
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(f"`compile` must be True, False or 'auto', got {value!r}.")


def check_state_values(owner: str, key: str, values: Tensor, *, allow_inf: bool = False) -> None:
    """Refuse a loaded statistic that holds NaN, a negative value or (unless ``allow_inf``) inf: one such entry would
    silence the loaded object for good (a NaN mean gives a NaN threshold, which never clips)."""
    bad = values.isnan() | (values < 0)
    if not allow_inf:
        bad |= values.isinf()
    if bool(bad.any()):
        allowed = "non-negative numbers (inf allowed)" if allow_inf else "finite non-negative numbers"
        first = values.reshape(-1)[bad.reshape(-1)][0].item()
        raise ValueError(f"`state[{key!r}]` of {owner} must hold {allowed}, got {first!r} among them.")


def check_state(owner: str, state: Any, required: tuple[str, ...] = ()) -> None:
    """Refuse a ``load_state_dict`` argument that is no mapping from ``owner.state_dict()``, or lacks one of the
    ``required`` keys, with a message that names both (instead of a ``TypeError``/``KeyError`` from inside)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"`state` must be a dict from {owner}.state_dict(), got {type(state).__name__}.")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"`state` must be a dict from {owner}.state_dict(): it lacks {missing}.")
