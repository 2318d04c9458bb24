"""Every public constructor rejects a wrongly typed argument with a ValueError that names it.

A config typo (a quoted number, ``true`` for a count, NaN) must fail when the object is built, with a message
pointing at the argument, not as a ``TypeError`` from a comparison or a silently truthy flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from lightning_gradguard import (
    AGC,
    L2,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    LRGuard,
    NormClip,
    Orthogonal,
    SaturationMonitor,
    VanishingDetector,
    ZClip,
)


def _saturation(**kwargs: Any) -> SaturationMonitor:
    return SaturationMonitor(nn.Tanh(), **kwargs)


# (constructor, required arguments, numeric arguments, boolean arguments)
CASES: list[tuple[Callable[..., Any], dict[str, Any], list[str], list[str]]] = [
    (
        ExplodingDetector,
        {},
        [
            "z_thresh",
            "alpha",
            "warmup_steps",
            "min_ratio",
            "max_ratio",
            "max_layer_ratio",
            "max_norm",
            "max_layer_norm",
            "min_share",
        ],
        ["per_layer"],
    ),
    (VanishingDetector, {}, ["min_norm", "ratio", "patience"], []),
    (LRGuard, {}, ["factor", "patience", "cooldown", "min_scale", "recovery_steps"], []),
    (
        ZClip,
        {},
        ["alpha", "z_thresh", "warmup_steps", "clip_factor", "max_grad_norm", "eps"],
        ["skip_update_on_spike"],
    ),
    (AutoClip, {}, ["percentile", "history"], []),
    (NormClip, {"max_norm": 1.0}, ["max_norm", "norm_type"], []),
    (AGC, {}, ["clip_factor", "eps"], []),
    (L2, {"weight": 1e-4}, ["weight", "adaptive_factor", "max_strength", "decay"], ["include_bias", "adaptive"]),
    (Orthogonal, {"weight": 1e-4}, ["weight"], ["adaptive"]),
    (_saturation, {}, ["tanh_threshold", "sigmoid_low", "sigmoid_high"], []),
    (
        GradGuard,
        {},
        ["log_every_n_steps", "image_every_n_steps", "histogram_every_n_steps", "group_depth", "max_warnings"],
        ["log_layers", "saturation", "clip_exploding"],
    ),
]
NUMERIC_BAD = ["1", math.nan, True, [1]]
BOOL_BAD = ["yes", 1, None]

PARAMS = [
    pytest.param(make, required, name, bad, id=f"{getattr(make, '__name__', 'make')}-{name}-{bad!r}")
    for make, required, numeric, flags in CASES
    for name, values in [*((n, NUMERIC_BAD) for n in numeric), *((n, BOOL_BAD) for n in flags)]
    for bad in values
]


@pytest.mark.parametrize(("make", "required", "name", "bad"), PARAMS)
def test_bad_argument_raises_a_value_error_naming_it(
    make: Callable[..., Any], required: dict[str, Any], name: str, bad: Any
) -> None:
    make(**required)  # the valid defaults build
    with pytest.raises(ValueError, match=f"`{name}`"):
        make(**{**required, name: bad})


def test_other_wrong_types_are_value_errors_too() -> None:
    with pytest.raises(ValueError, match="`module`"):
        SaturationMonitor("net")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`k`"):
        _saturation().most_saturated({}, None, k=0)
    with pytest.raises(ValueError, match="`module_types`"):
        L2(1e-4, module_types=3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`regularizers`"):
        GradGuard(regularizers=L2(1e-4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`group_fn`"):
        GradGuard(group_fn="net")  # type: ignore[arg-type]
    # A single module type is accepted as shorthand for a one-element tuple.
    assert L2(1e-4, module_types=nn.Linear).module_types == (nn.Linear,)
