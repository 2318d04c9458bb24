"""lightning-gradguard: watch per-layer gradients, clip adaptively and rescue unstable training in PyTorch Lightning."""

from lightning_gradguard.callback import (
    GradGuard,
    GradientExplosionError,
    NonFiniteGradientError,
    VanishingGradientError,
)
from lightning_gradguard.clip import AGC, AutoClip, Clipper, NormClip, ZClip
from lightning_gradguard.detect import ExplodingDetector, VanishingDetector
from lightning_gradguard.layers import LayerIndex, build_layer_index
from lightning_gradguard.lr import LRGuard
from lightning_gradguard.regularize import L1, L2, Orthogonal, Regularizer
from lightning_gradguard.saturation import SaturationMonitor
from lightning_gradguard.stats import GradStats, StepStats, total_norm

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "Clipper",
    "ExplodingDetector",
    "GradGuard",
    "GradStats",
    "GradientExplosionError",
    "L1",
    "L2",
    "LRGuard",
    "LayerIndex",
    "NonFiniteGradientError",
    "NormClip",
    "Orthogonal",
    "Regularizer",
    "SaturationMonitor",
    "StepStats",
    "VanishingDetector",
    "VanishingGradientError",
    "ZClip",
    "build_layer_index",
    "total_norm",
]
