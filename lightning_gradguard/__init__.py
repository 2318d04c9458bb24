"""lightning-gradguard: watch per-layer gradients, clip adaptively and rescue unstable training in PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Public name -> defining module. Names load on first use, so `gradguard report` and plain-PyTorch users of the
# clippers do not pay for importing Lightning.
_EXPORTS = {
    "GradGuard": "callback",
    "GradientExplosionError": "callback",
    "LossDivergenceError": "callback",
    "NonFiniteGradientError": "callback",
    "VanishingGradientError": "callback",
    "AGC": "clip",
    "AdaGC": "clip",
    "AutoClip": "clip",
    "Clipper": "clip",
    "NormClip": "clip",
    "ZClip": "clip",
    "EngineSnapshot": "engine",
    "GuardEngine": "engine",
    "StepEvent": "engine",
    "ActivationGradients": "diagnostics",
    "EpochSummary": "diagnostics",
    "LocalGradNorm": "diagnostics",
    "NoiseScale": "diagnostics",
    "UpdateRatio": "diagnostics",
    "UpdateRatioHints": "diagnostics",
    "ZeroFraction": "diagnostics",
    "noise_scale_source": "diagnostics",
    "squared_grad_norm": "diagnostics",
    "DivergenceDetector": "detect",
    "ExplodingDetector": "detect",
    "VanishingDetector": "detect",
    "LayerIndex": "layers",
    "build_layer_index": "layers",
    "LRGuard": "lr",
    "L1": "regularize",
    "L2": "regularize",
    "Orthogonal": "regularize",
    "Regularizer": "regularize",
    "Rollback": "rollback",
    "default_rollback": "rollback",
    "full_rollback": "rollback",
    "RunningStats": "running_stats",
    "SaturationMonitor": "saturation",
    "FlatStats": "stats",
    "GradStats": "stats",
    "StepStats": "stats",
    "total_norm": "stats",
    "GradGuardBoard": "tensorboard",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names the lazy loader below serves, for type checkers and IDEs
    from lightning_gradguard.callback import (
        GradGuard,
        GradientExplosionError,
        LossDivergenceError,
        NonFiniteGradientError,
        VanishingGradientError,
    )
    from lightning_gradguard.clip import AGC, AdaGC, AutoClip, Clipper, NormClip, ZClip
    from lightning_gradguard.detect import DivergenceDetector, ExplodingDetector, VanishingDetector
    from lightning_gradguard.diagnostics import (
        ActivationGradients,
        EpochSummary,
        LocalGradNorm,
        NoiseScale,
        UpdateRatio,
        UpdateRatioHints,
        ZeroFraction,
        noise_scale_source,
        squared_grad_norm,
    )
    from lightning_gradguard.engine import EngineSnapshot, GuardEngine, StepEvent
    from lightning_gradguard.layers import LayerIndex, build_layer_index
    from lightning_gradguard.lr import LRGuard
    from lightning_gradguard.regularize import L1, L2, Orthogonal, Regularizer
    from lightning_gradguard.rollback import Rollback, default_rollback, full_rollback
    from lightning_gradguard.running_stats import RunningStats
    from lightning_gradguard.saturation import SaturationMonitor
    from lightning_gradguard.stats import FlatStats, GradStats, StepStats, total_norm
    from lightning_gradguard.tensorboard import GradGuardBoard


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_gradguard.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
