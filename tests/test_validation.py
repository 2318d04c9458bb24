"""Every public constructor rejects a wrongly typed argument with a ValueError that names it.

A config typo (a quoted number, ``true`` for a count, NaN) must fail when the object is built, with a message
pointing at the argument, not as a ``TypeError`` from a comparison or a silently truthy flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import (
    AGC,
    L2,
    AdaGC,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    GuardEngine,
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


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda bound: NormClip(max_norm=bound), "max_norm"),
        (lambda bound: ExplodingDetector(max_norm=bound), "max_norm"),
        (lambda bound: ExplodingDetector(max_layer_norm=bound), "max_layer_norm"),
        (lambda bound: VanishingDetector(min_norm=bound), "min_norm"),
        (lambda bound: AdaGC(lambda_abs=bound), "lambda_abs"),
        (lambda bound: AGC(eps=bound), "eps"),
        (lambda bound: GuardEngine(nn.Linear(2, 1), max_norm=bound), "max_norm"),
    ],
    ids=["NormClip", "ExplodingDetector", "max_layer_norm", "VanishingDetector", "AdaGC", "AGC", "GuardEngine"],
)
def test_a_norm_bound_beyond_float32_is_refused_at_construction(make: Callable[[float], Any], name: str) -> None:
    # The bound is compared with float32 norms on the device: 1e300 would fail there, at the first step.
    with pytest.raises(ValueError, match=f"`{name}` must satisfy"):
        make(1e300)
    make(3e38)  # just within float32


def test_an_engine_on_meta_parameters_is_refused() -> None:
    # `to_empty()` gives the model new Parameter objects: an engine built before it would watch the old ones.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"meta device \('0.weight' and 3 more\).*to_empty"):
        GuardEngine(model)
    model.to_empty(device="cpu")
    GuardEngine(model)
