"""Every public constructor rejects a wrongly typed argument with a ValueError that names it.

A config typo (a quoted number, ``true`` for a count, NaN) must fail when the object is built, with a message
pointing at the argument, not as a ``TypeError`` from a comparison or a silently truthy flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
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
    GradGuardBoard,
    GuardEngine,
    LRGuard,
    NormClip,
    Orthogonal,
    Rollback,
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


def test_numpy_integers_from_a_config_work_through_a_fit(tmp_path: Any) -> None:
    # np.int64 passes GradGuard's integer check; kept as it was, the board refused it at the first log, mid-fit.
    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.helpers import load_events
    from tests.models import Regressor, regression_data, trainer

    guard = GradGuard(
        log_every_n_steps=np.int64(2), image_every_n_steps=np.int64(4), histogram_every_n_steps=np.int64(4)
    )
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer(max_steps=8, max_epochs=-1, callbacks=[guard], logger=logger).fit(Regressor(), regression_data())
    assert type(guard.histogram_every_n_steps) is int and type(guard.log_every_n_steps) is int
    acc = load_events(tmp_path / "version_0")
    hist = next(t for t in acc.Tags()["histograms"] if t.startswith("gradguard/grad_hist/"))
    assert [e.step for e in acc.Histograms(hist)] == [3, 7]  # the 4th and 8th optimizer steps


def test_the_board_refuses_a_bool_for_a_step_interval() -> None:
    with pytest.raises(ValueError, match="`image_every_n_steps` must be an integer >= 1 or None, got True"):
        GradGuardBoard(SimpleNamespace(add_scalar=print), {0: ["a"]}, ["SGD"], image_every_n_steps=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("state", [None, [1, 2], {"version": 1, "optimizers": 5}])
def test_gradguard_refuses_a_malformed_state_with_a_clear_error(state: Any) -> None:
    with pytest.raises(ValueError, match=r"GradGuard\.state_dict\(\)"):
        GradGuard().load_state_dict(state)


def test_rollback_repr_shows_what_early_only_and_retry_read() -> None:
    text = repr(Rollback(early_only=True, retry=True, calm_factor=2.5, rescue_until=5))
    assert "rescue_until=5" in text and "calm_factor=2.5" in text  # it printed as the defaults did


def test_lightning_cli_refuses_an_unknown_diagnostic_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # Typed as a list of str, a wrong name passed the parser and failed in the constructor with a 74-line traceback.
    from lightning.pytorch.cli import LightningCLI

    from lightning_gradguard import GradGuard
    from tests.models import Regressor

    def cli(names: str) -> LightningCLI:
        args = ["--trainer.callbacks+=lightning_gradguard.GradGuard", f"--trainer.callbacks.diagnostics={names}"]
        return LightningCLI(Regressor, run=False, args=args, save_config_callback=None)

    (guard,) = [c for c in cli("[noise_scale, epoch]").trainer.callbacks if isinstance(c, GradGuard)]
    assert guard.diagnostics == ["noise_scale", "epoch"]
    with pytest.raises(SystemExit) as exit_info:
        cli("[noise_scale, bogus]")
    assert exit_info.value.code == 2 and "bogus" in capsys.readouterr().err
