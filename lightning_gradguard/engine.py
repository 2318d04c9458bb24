"""GuardEngine: GradGuard's per-step gradient pipeline as a plain PyTorch object, usable without Lightning.

One call per optimizer step, after ``backward`` and before ``optimizer.step()``: regularize, measure, detect, act
(non-finite skip/zero/raise, clip) and record. Everything a step records lives in a few flat device buffers, each
declared once (:data:`_BUFFERS`) with its reset value; set-up, the start of each logging window, saving and restoring
loop over that table. Nothing is copied to the host on a step (with the one documented exception of
``on_nonfinite="skip"``/``"raise"``: one boolean, as a GradScaler reads): the host learns what happened from a small
copy that lands without a wait (:meth:`GuardEngine.drain`; under several processes, a step waits for the previous
step's copy, so that every rank takes the same decisions on the same step), and reads the logged figures with one
batched copy on logging steps (:meth:`GuardEngine.snapshot`).
"""

from __future__ import annotations

import bisect
import copy
import functools
import logging
import math
import numbers
import operator
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, NoReturn, SupportsIndex

import numpy as np
import torch
from torch import Tensor, nn

from lightning_gradguard._compat import (
    loaded_type,
    nan_to_num_,
    optimizer_scaler,
    step_deferred,
    unscale_once,
    unwrap_optimizer,
    user_stacklevel,
)
from lightning_gradguard._host import HostFlags, host_rate
from lightning_gradguard._kinds import EVENT_KINDS
from lightning_gradguard._validation import (
    FLOAT32_MAX,
    check_bool,
    check_compile,
    check_int,
    check_number,
    optional_number,
)
from lightning_gradguard.clip import Clipper, NormClip, default_clipper
from lightning_gradguard.detect import (
    DivergenceDetector,
    ExplodingDetector,
    ExplodingResult,
    VanishingDetector,
    VanishingResult,
)
from lightning_gradguard.layers import (
    LayerIndex,
    build_layer_index,
    is_empty,
    layer_source,
    mapped_columns,
    unwrapped,
)
from lightning_gradguard.lr import LRGuard, LRGuardHandle
from lightning_gradguard.regularize import Regularizer, bind_all, check_regularizers
from lightning_gradguard.rollback import Rollback, rescue_cause_of, rollback_from
from lightning_gradguard.running_stats import RunningStats
from lightning_gradguard.stats import FlatStats, GradStats, StepStats, _upload, split_flat

__all__ = [
    "EVENT_KINDS",
    "EngineSnapshot",
    "GradientExplosionError",
    "GuardEngine",
    "LossDivergenceError",
    "NonFiniteGradientError",
    "StepEvent",
    "VanishingGradientError",
]

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)
# Compiling must never be a surprise: the one line that says so is shown even where logging is not configured
# (Lightning does the same for its own logger); with a configured root logger the messages go there.
if not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False

NONFINITE_MODES = ("skip", "zero", "raise", "warn")
# What ``torch.compile`` uses for the fused per-step tail (tests swap in a cheaper backend).
_COMPILE_BACKEND: str | Callable[..., Any] = "inductor"
_compile_announced = False  # whether the line that says the tail compiles was shown
_MAX_EVENTS = 1000  # undrained events kept (a plain loop that never calls drain() must not grow without bound)
#: A short batch (an epoch's short last batch) is flagged exploding only beyond this many times what a batch of its
#: size shows on average: the loosest bound the exploding detector knows (its ``warmup_ratio``), since a short batch's
#: norm is noisier by design, and judging it with the band gave healthy runs 12-16 events and 4-7 cuts.
SHORT_GROSS = 100.0

# Steps whose statistics are kept for a plain retry: its stretch began at most this many steps before the rollback
# (two troubled steps in a row, their flags a step late, the cut acted on at the next step).
_KEEP_BEFORE = 5
#: Non-finite optimizer steps in a row after which the run has stopped training: bad batches come in bursts of a few
#: (a NaN chunk of truncated BPTT carried into its next four), this does not end. The stall warning's length, and the
#: length at which such a run after a calm start calls for the rollback (``GuardEngine._calls_for_rollback``).
STALL_STEPS = 20
#: A held cut's run among the first steps with no calm start (the rollback's early trouble) calls for the rollback at
#: this many times ``LRGuard.nonfinite_patience`` in a row: twice the run that cut (bad batches and a rate too high
#: look alike there, and a restart costs little).
_EARLY_RUN = 4


class GradientExplosionError(RuntimeError):
    """Raised by ``GradGuard(on_exploding="raise")`` at the step whose gradients exploded, naming the layers.

    Example:
        >>> from lightning_gradguard import GradGuard
        >>> guard = GradGuard(on_exploding="raise")  # a fit then stops with GradientExplosionError at an explosion
        >>> issubclass(GradientExplosionError, RuntimeError)
        True
    """


class LossDivergenceError(RuntimeError):
    """Raised by ``GradGuard(on_diverging="raise")`` when the training loss has diverged.

    Example:
        >>> from lightning_gradguard import GradGuard
        >>> guard = GradGuard(on_diverging="raise")  # a fit then stops with LossDivergenceError
        >>> issubclass(LossDivergenceError, RuntimeError)
        True
    """


class VanishingGradientError(RuntimeError):
    """Raised by ``GradGuard(on_vanishing="raise")`` when layers' gradients have vanished, naming them.

    Example:
        >>> from lightning_gradguard import GradGuard
        >>> guard = GradGuard(on_vanishing="raise")  # a fit then stops with VanishingGradientError
        >>> issubclass(VanishingGradientError, RuntimeError)
        True
    """


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"`` (:class:`GuardEngine`, ``GradGuard``), naming the layers with inf/NaN.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> engine = GuardEngine(model, on_nonfinite="raise")
        >>> (model(torch.ones(1, 2)) * float("nan")).sum().backward()
        >>> try:
        ...     engine.step()
        ... except NonFiniteGradientError as err:
        ...     print(type(err).__name__)
        NonFiniteGradientError
    """


# ---------------------------------------------------------------------------------------------------- flat state
class _Buffer(NamedTuple):
    """One device buffer of the per-step record."""

    name: str
    rows: int  # first dimension
    per_layer: bool  # second dimension: the number of layers
    dtype: torch.dtype
    reset: tuple[float, ...]  # value of each row at set-up
    window: slice | None  # rows set back to ``reset`` at the start of each logging window (None: kept)
    saved: bool  # part of state_dict()


#: Entries of :meth:`DivergenceDetector.progress` in :meth:`GuardEngine.gather`.
_PROGRESS = 4
# Device counters (cumulative, saved): one slot per kind, in this order.
_COUNTS = ("exploding", "vanishing", "nonfinite", "overflow", "clipped", "diverging")
# Per-layer rows. "last" (the latest norm) survives a log; the others describe the window since the last log: the
# last step with a gradient ("seen"), and the first step of each event with the layer's norm at that step.
_ROWS = ("last", "seen", "exploding_step", "exploding_value", "vanishing_step", "vanishing_value", "nonfinite_step")
_STEP_ROWS = (False, True, True, False, True, False, True)  # rows that record a step number rather than a norm
_FIRST_ONLY = (False, False, True, True, True, True, True)  # rows that keep their first value of the window
_UNSET = -1.0  # steps and norms are >= 0 (NaN aside): a negative entry was never written
# Window extremes, all as maxima: [max total norm, -(min total norm), -(min clip coefficient)].
_EXTREMES_RESET = (-math.inf, -math.inf, -1.0)

_BUFFERS = (
    _Buffer("counts", len(_COUNTS), False, torch.int64, (0,) * len(_COUNTS), None, True),
    # Steps since the window started: the step rows record this local index (a device value, so that a compiled
    # tail never sees a Python number that changes every step); the host maps it back to the caller's step numbers.
    _Buffer("clock", 1, False, torch.int64, (0,), slice(None), False),
    _Buffer("extremes", 3, False, torch.float32, _EXTREMES_RESET, slice(None), False),
    _Buffer("layers", len(_ROWS), True, torch.float32, (0.0,) + (_UNSET,) * (len(_ROWS) - 1), slice(1, None), False),
)


def _reset_value(buffer: _Buffer, num_layers: int, device: torch.device) -> Tensor:
    value = torch.tensor(buffer.reset, dtype=buffer.dtype, device=device)
    return value.reshape(-1, 1).expand(buffer.rows, num_layers).clone() if buffer.per_layer else value


class _Record:
    """The flat device buffers of one :class:`GuardEngine` and the few fused ops that fold a step into them."""

    def __init__(self, num_layers: int, device: torch.device, share: float = 0.05) -> None:
        self.num_layers = num_layers
        self.device = device
        # The fraction of the largest layer's norm that files a total-norm explosion under a layer too (the
        # detector's min_share; a little above 0 where that is 0, so that the layers without a gradient are not named).
        self.share = max(share, 1e-6)
        # Each buffer's reset value, made once on the device: starting a window is then a device-side copy.
        self.resets = {b.name: _reset_value(b, num_layers, device) for b in _BUFFERS}
        self.buffers: dict[str, Tensor] = {name: value.clone() for name, value in self.resets.items()}
        # Constants made once: a per-step torch.tensor would be one more op and, on a GPU, a host-to-device copy.
        rows = len(_ROWS)
        self.step_rows = torch.tensor(_STEP_ROWS, device=device).reshape(rows, 1)
        self.every_step = ~torch.tensor(_FIRST_ONLY, device=device).reshape(rows, 1)
        self.signs = torch.tensor([1.0, -1.0, -1.0], device=device)
        self.gated = torch.tensor([True, True, False], device=device)  # extremes that only move on valid steps
        self.one = torch.ones((), device=device)
        self.zero = torch.zeros((), dtype=torch.int64, device=device)
        self.false = torch.zeros((), dtype=torch.bool, device=device)
        self.no_layers = torch.zeros(num_layers, dtype=torch.bool, device=device)
        self.unclipped = torch.zeros((), dtype=torch.bool, device=device)  # an input of update(): not aliased inside
        self.nan = torch.full((), math.nan, device=device)  # "no loss this step"

    def start_window(self) -> None:
        for b in _BUFFERS:
            if b.window is not None:
                self.buffers[b.name][b.window] = self.resets[b.name][b.window]

    def update(
        self,
        total: Tensor,
        layer_norm: Tensor,
        layer_finite: Tensor,
        valid: Tensor,
        present: Tensor,
        exploding: ExplodingResult | None,
        vanishing: VanishingResult | None,
        diverging: Tensor | None,
        coef: Tensor,
        clipped: Tensor,
        grad_scaler: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fold one step into the buffers.

        Returns:
            The ``[7]`` int64 increment of the counters and whether the step was capped (the host's flags), the
            step's non-finite flag and, without
            a GradScaler, the per-layer non-finite flags.
        """
        nonfinite = ~valid
        extremes = self.buffers["extremes"]
        candidates = torch.stack([total, total, coef]) * self.signs
        self.buffers["extremes"] = torch.where(self.gated & nonfinite, extremes, torch.maximum(extremes, candidates))

        if exploding is not None:
            # A total-norm explosion that no layer's own test flagged (their statistics still warming up, or each
            # jump inside its band) is filed under every layer with at least `min_share` x the largest layer's
            # norm: a bad batch at step 2 multiplied every layer's norm 4000-10000x, and the largest alone was named,
            # as if the trouble were its own. (Of the largest, not of the total: spread evenly over 400 layers, none
            # carries 5% of the total.)
            exploding_layers = torch.where(
                exploding.layers.any(),
                exploding.layers,
                exploding.total & (layer_norm >= layer_norm.max() * self.share),
            )
        else:
            exploding_layers = self.no_layers
        vanishing_layers = vanishing.new if vanishing is not None else self.no_layers
        # A GradScaler overflow is routine (scale calibration): counted, not recorded per layer.
        layer_nonfinite = None if grad_scaler else ~layer_finite
        nonfinite_layers = self.no_layers if layer_nonfinite is None else layer_nonfinite
        flags = torch.stack(
            [present, present, exploding_layers, exploding_layers, vanishing_layers, vanishing_layers, nonfinite_layers]
        )
        layers, clock = self.buffers["layers"], self.buffers["clock"]
        clock.add_(1)
        take = flags & ((layers < 0) | self.every_step)
        self.buffers["layers"] = torch.where(take, torch.where(self.step_rows, clock, layer_norm), layers)

        increment = torch.stack(
            [
                exploding.any if exploding is not None else self.false,
                vanishing.new.sum() if vanishing is not None else self.zero,
                self.false if grad_scaler else nonfinite,
                nonfinite if grad_scaler else self.false,
                clipped,
                diverging if diverging is not None else self.false,
                # Not a counter: whether the exploding detector capped the step (flagged it), for the LR guard's
                # lone-spike test, where a step clipped only by a fixed max_norm is calm.
                exploding.cap < math.inf if exploding is not None else self.false,
            ]
        )
        self.buffers["counts"].add_(increment[: len(_COUNTS)])
        return increment, nonfinite, layer_nonfinite


class _Tail:
    """The fused parts of the per-step tail, run eagerly or compiled: ``pre`` (from the measurement through the
    detectors) and ``post`` (the record) around the clipper, ``whole`` (both) when nothing runs between them, or
    ``whole_clip`` (both and a :attr:`~Clipper.fusable` clipper's coefficient, compiled only: eagerly the split
    order lets a skipped step leave the clipper out).

    The first step always runs eagerly (the detectors and the clipper create their state); compiled parts take
    only tensors of fixed shapes, so they compile once. A compiler that fails falls back to eager, said once.
    """

    def __init__(self, parts: dict[str, Callable[..., Any]], compile: bool | str, device: torch.device) -> None:
        self.parts = parts
        self.wanted = compile is True or (compile == "auto" and device.type == "cuda")
        self.device = device
        self.state = "pending"  # "pending" (the first step), "on" or "off"
        self.compiled: dict[str, Callable[..., Any]] | None = None

    def __call__(self, part: str, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled[part](*args)
            except Exception as err:  # a compiler that cannot handle this setup: eager from now on
                log.warning("GradGuard: torch.compile of the per-step tail failed (%s); running it eagerly.", err)
                self.state, self.compiled = "off", None
        return self.parts[part](*args)

    def step_done(self) -> None:
        if self.state == "pending":
            self.state = "on" if self.wanted else "off"
            if self.wanted:  # torch.compile is lazy: a part compiles on its first call
                global _compile_announced
                if not _compile_announced:  # once per process, not once per optimizer
                    _compile_announced = True
                    log.info(
                        "GradGuard: compiling its per-step tail with torch.compile on %s (once, on the next step; on a"
                        " CPU this takes tens of seconds). compile=False runs it eagerly.",
                        self.device,
                    )
                options: dict[str, Any] = {"backend": _COMPILE_BACKEND, "fullgraph": True, "dynamic": False}
                self.compiled = {name: torch.compile(fn, **options) for name, fn in self.parts.items()}


# ------------------------------------------------------------------------------------------------- host results
class StepEvent(NamedTuple):
    """A step on which something happened, as the host learned it (at most a step late, from a copy that landed
    without a wait). Returned by :meth:`GuardEngine.drain`.

    Attributes:
        step: the step number given to :meth:`GuardEngine.step`.
        exploding: the exploding detector flagged the step.
        vanishing: some layer reached the vanishing detector's patience on this step.
        nonfinite: the gradients held inf/NaN (and no GradScaler handled it).
        overflow: the gradients held inf/NaN under a GradScaler (routine loss-scale calibration).
        lr_reduced: the LR guard lowered its multiplier on this step.
        diverging: the divergence detector found the training loss blown up (see :class:`DivergenceDetector`).
        lr_scale: with ``lr_reduced`` or ``lr_restored``, the LR guard's multiplier right after the change (a later
            rollback may rewind it); otherwise ``None``.
        lr_restored: the LR guard withdrew the cut it held for a run of non-finite steps in a row, since a calm step
            followed the run (:meth:`LRGuard.withdrew`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> engine = GuardEngine(model, on_nonfinite="skip")
        >>> model.weight.grad, model.bias.grad = torch.full((1, 3), float("inf")), torch.zeros(1)
        >>> _ = engine.step()
        >>> [(e.step, e.nonfinite, e.exploding, e.diverging) for e in engine.drain()]
        [(1, True, False, False)]
    """

    step: int
    exploding: bool
    vanishing: bool
    nonfinite: bool
    overflow: bool
    lr_reduced: bool
    diverging: bool = False
    lr_scale: float | None = None
    lr_restored: bool = False


@dataclass
class EngineSnapshot:
    """What one logging window recorded, on the host (from one batched device-to-host copy).

    Attributes:
        layer_names: the layers, in the order of the per-layer arrays.
        total_norm: the last step's total gradient norm.
        total_norm_max: the largest finite total norm of the window (``-inf``: no valid step).
        total_norm_min: the smallest finite total norm of the window.
        clip_threshold: the clipper's last threshold (``None``: no clipper).
        clip_coef: the smallest clipping coefficient of the window (``None``: no clipper).
        ema: the exploding detector's EMA total norm and band edges (``None``: no detector, or not started).
        lr_scale: the LR guard's multiplier (``None``: no LR guard).
        counts: cumulative count of each kind of :data:`EVENT_KINDS`.
        layer_norms: ``[L]`` the latest norm of each layer.
        present: ``[L]`` which layers had a gradient during the window.
        exploding: ``[L]`` which layers had an exploding event during the window.
        vanishing: ``[L]`` which layers had a vanishing event during the window.
        events: one row per layer and kind, the first event of the window: ``step``, ``count`` (the engine's count of
            steps then, where the step numbers around it do not follow it one for one; else ``None``), ``kind``,
            ``layer``, ``value`` (the layer's norm then; NaN for non-finite), sorted by step.
        nonfinite: ``[L]`` which layers had a non-finite gradient during the window (``None``: not known).
        seen_steps: ``[L]`` the step of each layer's latest norm in the window (-1: none; ``None``: not known).
        loss_progress: the divergence detector's :meth:`~lightning_gradguard.DivergenceDetector.progress`: the share
            of its progress the run has given back, the running mean of the loss, its starting level and its lowest
            settled running mean (NaN for each not known yet; ``None``: no loss observed).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        >>> engine = GuardEngine(model, clip=None)
        >>> for _ in range(3):
        ...     model.zero_grad()
        ...     model(torch.ones(4, 3)).sum().backward()
        ...     _ = engine.step()
        >>> snap = engine.snapshot()
        >>> snap.layer_names, snap.present.tolist(), snap.counts["exploding"]
        (['0', '1'], [True, True], 0)
        >>> round(snap.metrics()["gradguard/total_norm"], 4) == round(snap.total_norm, 4)
        True
    """

    layer_names: list[str]
    total_norm: float
    total_norm_max: float
    total_norm_min: float
    clip_threshold: float | None
    clip_coef: float | None
    ema: tuple[float, float, float] | None
    lr_scale: float | None
    counts: dict[str, int]
    layer_norms: np.ndarray
    present: np.ndarray
    exploding: np.ndarray
    vanishing: np.ndarray
    events: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: np.ndarray | None = None
    seen_steps: np.ndarray | None = None
    loss_progress: tuple[float, float, float, float] | None = None

    def metrics(self, prefix: str = "gradguard/", lr: float | None = None) -> dict[str, float]:
        """The run-level scalars under their TensorBoard tags (``prefix`` + ``total_norm``, ``events/exploding``, ...).

        Args:
            prefix: prepended to every tag.
            lr: the scheduled learning rate, to log the effective one (``lr * lr_scale``) as ``lr``.
        """
        metrics = {prefix + "total_norm": self.total_norm}
        if self.total_norm_max > -math.inf:
            metrics[prefix + "total_norm_max"] = self.total_norm_max
            metrics[prefix + "total_norm_min"] = self.total_norm_min
        if self.clip_threshold is not None and self.clip_coef is not None:
            # No threshold yet (ZClip's and AutoClip's warm-up) is no point: an inf wrecks the chart's axis.
            if math.isfinite(self.clip_threshold):
                metrics[prefix + "clip_threshold"] = self.clip_threshold
            metrics[prefix + "clip_coef"] = self.clip_coef
        if self.ema is not None:
            metrics[prefix + "ema_mean"], metrics[prefix + "ema_lower"], metrics[prefix + "ema_upper"] = self.ema
        if self.lr_scale is not None:
            metrics[prefix + "lr_scale"] = self.lr_scale
            if lr is not None:
                metrics[prefix + "lr"] = lr * self.lr_scale
        for kind, value in self.counts.items():
            metrics[f"{prefix}events/{kind}"] = float(value)
        if self.loss_progress is not None and math.isfinite(self.loss_progress[0]):
            metrics[prefix + "loss_relapse"] = self.loss_progress[0]
        return metrics

    @classmethod
    def from_gathered(
        cls,
        values: np.ndarray,
        layer_names: list[str],
        step_number: Callable[[int], int],
        step_count: Callable[[int], int | None],
        host_counts: dict[str, int],
        clipped: bool,
        lr_scale: float | None,
    ) -> EngineSnapshot:
        """Parse a host copy of :meth:`GuardEngine.gather` (``step_number`` maps window indices to step numbers,
        ``step_count`` to the engine's count of steps then)."""
        rows_at = 8 + len(_COUNTS) + _PROGRESS
        scalars, counts, progress = values[:8], values[8 : 8 + len(_COUNTS)], values[8 + len(_COUNTS) : rows_at]
        row = dict(zip(_ROWS, values[rows_at:].reshape(len(_ROWS), len(layer_names))))
        events = []
        for kind in ("exploding", "vanishing", "nonfinite"):
            steps, norms = row[f"{kind}_step"], row.get(f"{kind}_value")
            for i in np.flatnonzero(steps >= 0):
                value = float(norms[i]) if norms is not None else math.nan
                local = int(steps[i])
                events.append(
                    {
                        "step": step_number(local),
                        "count": step_count(local),
                        "kind": kind,
                        "layer": layer_names[i],
                        "value": value,
                    }
                )
        events.sort(key=lambda r: (r["step"], r["kind"]))
        return cls(
            layer_names=layer_names,
            total_norm=float(scalars[0]),
            total_norm_max=float(scalars[1]),
            total_norm_min=float(scalars[2]),
            clip_threshold=float(scalars[3]) if clipped else None,
            clip_coef=float(scalars[4]) if clipped else None,
            ema=None if math.isnan(scalars[5]) else (float(scalars[5]), float(scalars[6]), float(scalars[7])),
            lr_scale=lr_scale,
            counts=_event_counts(counts, host_counts),
            layer_norms=row["last"],
            present=row["seen"] >= 0,
            exploding=row["exploding_step"] >= 0,
            vanishing=row["vanishing_step"] >= 0,
            events=events,
            nonfinite=row["nonfinite_step"] >= 0,
            seen_steps=np.array([step_number(int(s)) if s >= 0 else -1 for s in row["seen"]], dtype=np.int64),
            loss_progress=None
            if math.isnan(progress[1])
            else (float(progress[0]), float(progress[1]), float(progress[2]), float(progress[3])),
        )


def _event_counts(device: Iterable[Any], host: dict[str, int]) -> dict[str, int]:
    """Each kind of :data:`EVENT_KINDS` from the device counters (in :attr:`GuardEngine.counts` order) and the
    host-side ones (``rolled_back``, ``skipped``, ...)."""
    device_counts = dict(zip(_COUNTS, (int(c) for c in device)))
    return {kind: int(device_counts.get(kind, host.get(kind, 0))) for kind in EVENT_KINDS}


def _saved_event_counts(state: dict[str, Any]) -> dict[str, int]:
    """:meth:`GuardEngine.summary` of a saved :meth:`GuardEngine.state_dict` (no engine needed)."""
    counts = state.get("counts")
    device = counts.tolist() if isinstance(counts, Tensor) else []
    return _event_counts(device, dict(state.get("host_counts") or {}))


def _default(value: Any, factory: Callable[[], Any]) -> Any:
    return factory() if isinstance(value, str) and value == "default" else value


def _distributed() -> bool:
    """Whether this process is one of several (a default process group of more than one rank)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_mean(loss: Tensor, samples: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The mean of this step's loss over the processes that have one (NaN where none has), in one ``all_reduce``
    that every process takes part in, whether it passed a loss or not; and, in the same collective, whether this
    process's ``samples`` differs from the others' (a number where another passed ``None`` included): they must all
    pass the same."""
    missing = torch.isnan(loss)
    # `new_full` fills on the device: no host-to-device copy (which waits for the device on CUDA).
    size, told = loss.new_full((), float(samples or 0)), loss.new_full((), float(samples is not None))
    summed = torch.stack([torch.where(missing, torch.zeros_like(loss), loss), (~missing).to(loss.dtype), size, told])
    torch.distributed.all_reduce(summed)
    # Exact in float32 for sums of integers below 2**24 (16.7 million examples per step over all processes). Some
    # processes passing a size and others None differ too: only the first judge a short batch as one.
    told = summed[3]
    if samples is None:
        differs = told > 0
    else:
        differs = (told != torch.distributed.get_world_size()) | (summed[2] != told * samples)
    return summed[0] / summed[1], differs


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state


def _step_number(step: Any) -> int:
    """``step`` as an int: an integer (a NumPy one, a one-element integer tensor too), not a bool or a float."""
    if isinstance(step, (bool, float)) or (isinstance(step, Tensor) and step.is_floating_point()):
        raise ValueError(f"`step` must be an integer step number or None, got {step!r}")
    try:
        number = operator.index(step)
    except TypeError:
        raise ValueError(f"`step` must be an integer step number or None, got {step!r}") from None
    if number < 0:  # the event records keep -1 for "no event"
        raise ValueError(f"`step` must be a step number >= 0 or None, got {number}")
    return number


#: Where a param group's learning-rate warm-up stands, for the clipper's fresh start (`GuardEngine._watch_rate_warmup`).
_RATE_UNKNOWN, _WARMING_UP, _WARMED_UP = 0, 1, 2


def _is_real(value: Any) -> bool:
    """A real number that is no bool (``True`` is no loss, nor a scale)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _witnesses(
    params: Sequence[Tensor], grads: Sequence[Tensor]
) -> list[tuple[weakref.ref[Tensor], weakref.ref[Tensor], int]]:
    """The first and the last gradient of a trainable parameter, with their autograd versions: a backward writes both
    (accumulating or after ``zero_grad``), a frozen parameter's stale gradient never changes, and in a network the
    first and last trainable layers take part in every backward. Plain tensors only: a sharded (DTensor) gradient
    can be written around its version counter. Empty: nothing to tell a repeated call by."""
    ends = [i for i in (0, len(params) - 1) if params[i].requires_grad and type(grads[i]) is Tensor]
    if len(ends) < 2:  # frozen ends (a frozen backbone keeps its last gradient): the first and last trainable ones
        trainable = [i for i, p in enumerate(params) if p.requires_grad and type(grads[i]) is Tensor]
        ends = trainable[:1] + trainable[-1:]
    return [(weakref.ref(params[i]), weakref.ref(grads[i]), grads[i]._version) for i in dict.fromkeys(ends)]


def _refuse_fsdp1(model: nn.Module) -> None:
    fsdp1 = loaded_type("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    if fsdp1 is not None and any(isinstance(module, fsdp1) for module in model.modules()):
        raise ValueError(
            "GuardEngine does not support FSDP1 (`FullyShardedDataParallel`): its flattened, sharded parameters do"
            " not map to layers, and each process would judge, clip and skip its own shard alone. Shard with FSDP2"
            " (`fully_shard`), whose DTensor gradients GuardEngine measures whole, or use DDP."
        )


# ------------------------------------------------------------------------------------------------------ engine
_COPY_REFUSED = (
    "This is a copy of a GuardEngine (`copy.deepcopy` or `pickle`, perhaps of a module that holds one), which cannot"
    " be used: an engine is bound to its model's parameters and its optimizer. To carry one over to a copied model,"
    " build a GuardEngine for the copy (and `attach` the copy's optimizer), then"
    " `load_state_dict(engine.state_dict())` (and the LR guard's likewise)."
)


class _CopyRefused(AttributeError, TypeError):
    """A use of a copied :class:`GuardEngine`: a ``TypeError`` to the user, an ``AttributeError`` to ``hasattr`` and
    ``getattr(obj, name, default)``, so that code probing a copied module's attributes goes on."""


class _EngineCopy:
    """What copying or pickling a :class:`GuardEngine` gives: a placeholder whose every use raises ``TypeError``."""

    def __init__(self, layers: int) -> None:
        object.__setattr__(self, "_layers", layers)

    def __getattr__(self, name: str) -> NoReturn:
        raise _CopyRefused(_COPY_REFUSED)

    def __deepcopy__(self, memo: dict[int, Any]) -> _EngineCopy:
        return self  # nothing in it to copy

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise TypeError(_COPY_REFUSED)

    def __reduce__(self) -> tuple[type[_EngineCopy], tuple[int]]:
        return _EngineCopy, (object.__getattribute__(self, "_layers"),)

    def __repr__(self) -> str:
        return f"<copy of a GuardEngine of {object.__getattribute__(self, '_layers')} layers: unusable>"


def _refuse_taken(regularizers: Sequence[Regularizer], model: nn.Module) -> None:
    """Refuse a regularizer bound to another module than ``model`` (compiled or DDP-wrapped, the same module): binding
    it here would take it from that module's engine, which would then add no term at all, or the term twice."""
    for r in regularizers:
        bound = r.bound_module()
        if bound is not None and unwrapped(bound) is not unwrapped(model):
            raise ValueError(
                f"GuardEngine: regularizer {r.name!r} is bound to another model ({type(bound).__name__}), whose"
                " engine would lose it; give each engine regularizers of its own."
            )


class GuardEngine:
    r"""GradGuard's per-step pipeline for one optimizer's parameters, in plain PyTorch (no Lightning).

    Call :meth:`step` once per optimizer step, after ``backward`` (under AMP, with ``grad_scaler=scaler``, or after
    ``scaler.unscale_`` with ``grad_scaler=True``) and before ``optimizer.step()``. It adds the regularizers' gradient
    terms, measures the per-layer gradient norms in one pass, runs the detectors, handles non-finite gradients
    (``"skip"`` sets every ``.grad`` to ``None``, so ``optimizer.step()`` leaves parameters and optimizer state
    untouched), clips, and folds the step into a few flat device buffers. :meth:`drain` returns the steps on which
    something happened (and feeds the LR guard and the adaptive regularizers from them); :meth:`snapshot` reads
    everything recorded since the last snapshot with one device-to-host copy. :class:`~lightning_gradguard.GradGuard` is
    a thin Lightning adapter around one engine per optimizer.

    With ``compile=True`` (``"auto"``: on CUDA only) the per-step tail, from the measured norms through the detectors,
    the clipper's coefficient (:class:`ZClip`, :class:`NormClip`: their :meth:`~Clipper.coefficient_`) and the record,
    runs as one function compiled once with ``torch.compile`` (two, before and after the clipper, for :class:`AutoClip`
    and :class:`AGC`); its shapes do not depend on which layers have gradients, so nothing recompiles when that set
    changes or a clipper leaves its warm-up. One info line says that it compiles; a compilation failure falls back to
    the eager path with one message. Compiling takes seconds on a GPU and tens of seconds on a CPU (about 30 s for the
    defaults on 2 CPU cores, paid back after some 20 000 steps), which is why ``"auto"`` leaves the CPU eager.

    The host acts on each step's flags (LR guard, rollback, adaptive regularizers) once their small copy has landed,
    without waiting for it on a single device. Under several processes (a default process group of more than one
    rank: DDP, FSDP2) and with something that acts on them, :meth:`step` first waits for the previous steps' copies
    (issued a forward and backward pass earlier), so that the LR guard's cut and a rollback fall on the same step on
    every rank; this caps how far the host runs ahead of the device at about one step.

    Args:
        model: the model (its parameters are grouped into layers as by :func:`~lightning_gradguard.build_layer_index`,
            frozen ones included so that unfreezing later needs no rebuild), or a ready :class:`LayerIndex`.
        clip: the clipper; ``"default"`` is ``ZClip(z_thresh=4.0)`` (:func:`~lightning_gradguard.clip.default_clipper`),
            ``None`` disables clipping.
        exploding: the exploding-gradient detector; ``"default"`` is ``ExplodingDetector()``, ``None`` disables it.
        vanishing: the vanishing-gradient detector; ``"default"`` is ``VanishingDetector()``, ``None`` disables it.
        lr_guard: an :class:`LRGuard` fed from the exploding and non-finite steps (connect it to the optimizer with
            :meth:`attach`); ``"default"``: ``LRGuard()``; ``None``: no LR guard.
        regularizers: gradient-term regularizers, bound to ``model`` when it is a module.
        on_nonfinite: ``"skip"``, ``"zero"`` (the non-finite entries), ``"raise"`` (:class:`NonFiniteGradientError`)
            or ``"warn"`` (let it through; reported by :meth:`drain`).
        clip_exploding: also clip a step that the exploding detector flags down to ``cap_ratio`` times its average
            norm (see :class:`~lightning_gradguard.ExplodingResult`).
        skip_exploding: skip a step the exploding detector caps (the steps ``clip_exploding`` clips) instead (every
            gradient dropped: parameters and optimizer state untouched, as for a non-finite step; counted as
            ``skipped``); needs
            ``exploding``. One host read per step (shared with ``on_nonfinite="skip"``), under a GradScaler too.
            ``"first"``: only the first capped step of a stretch is skipped, the next ones in a row go on (clipped,
            where ``clip_exploding`` clips): for an optimizer whose own steps overshoot (LBFGS without a line
            search), a bad batch is alone, while weights its step wrecked make the next batch capped too, and
            skipping on would leave them there.
            With a fused optimizer under a GradScaler (``grad_scale`` given), set :attr:`before_drop`.
        max_norm: an upper bound on the total norm after clipping, on top of the clipper (``None``: none): the
            gradients are clipped to ``min(clipper's threshold, max_norm)``, which is what chaining
            ``torch.nn.utils.clip_grad_norm_(max_norm)`` after the clipper does (``GradGuard`` folds
            ``Trainer(gradient_clip_val=...)`` in here). Without a clipper, the clipper is ``NormClip(max_norm)``,
            and ``clip_exploding`` does not apply (it clips exactly as ``clip_grad_norm_(max_norm)`` would).
        compile: compile the per-step tail with ``torch.compile``: ``True``, ``False`` or ``"auto"`` (on CUDA).
        key: this engine's key in a shared :class:`LRGuard` (one per optimizer).
        group_depth: layer grouping, when ``model`` is a module (see ``build_layer_index``).
        group_fn: layer grouping by parameter name, when ``model`` is a module.
        rollback: a :class:`~lightning_gradguard.Rollback` (``True``: :func:`~lightning_gradguard.full_rollback`;
            ``"default"``: the early restart :func:`~lightning_gradguard.rollback.default_rollback` that ``GradGuard()``
            uses): when the LR guard lowers the rate, skip the step and put back the last parameters and optimizer state
            known to have trained calmly (pass the optimizer to :meth:`step`: its state is restored too, and its type
            decides whether a rescue clipper may work); needs ``lr_guard``. ``None`` (default) or ``False``: no rollback
            (the engine takes no copy of anything unless asked).
        divergence: the :class:`~lightning_gradguard.DivergenceDetector`, fed the ``loss`` given to :meth:`step`
            (a step without one is no observation); ``"default"`` is ``DivergenceDetector()``, ``None`` disables it.
            A divergence event is an explosion to the LR guard and a full stretch of trouble to the rollback.
        running_stats: the normalization layers' running statistics to keep from harm
            (:class:`~lightning_gradguard.RunningStats`): each step puts back the entries a bad batch made non-finite,
            and a rollback restores them with the weights. ``"default"``: those of ``model`` when it is a module and
            ``on_nonfinite`` is ``"skip"`` or ``"zero"``; ``None``: none.

    Attributes:
        before_drop: called before the engine drops a step's gradients (a skip, a rollback), ``None`` by default.
            With a fused optimizer under a GradScaler the gradients are still scaled when the engine runs, and a
            step without gradients leaves the scaler no inf check (its ``update()`` raises "No inf checks were
            recorded"): set it to ``lambda: scaler.unscale_(optimizer)``. GradGuard sets it on such steps.

    Raises:
        ValueError: for an argument outside its allowed values, and for a model wrapped in FSDP1
            (``FullyShardedDataParallel``; FSDP2's ``fully_shard`` is supported).

    Example:
        >>> import torch
        >>> from lightning_gradguard import GuardEngine, LRGuard
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = GuardEngine(model, lr_guard=LRGuard())
        >>> handle = engine.attach(opt)  # the LR guard's multiplier applies inside opt.step()
        >>> for step in range(1, 21):
        ...     opt.zero_grad()
        ...     loss = model(torch.randn(16, 4)).square().mean()
        ...     if step == 12:
        ...         loss = loss * float("nan")  # a bad batch
        ...     loss.backward()
        ...     _ = engine.step(loss=loss)  # regularize, measure, detect (the loss too), skip/clip, record
        ...     opt.step()
        >>> [(e.step, e.nonfinite) for e in engine.drain()]
        [(12, True)]
        >>> snap = engine.snapshot()  # one device-to-host copy
        >>> snap.counts["nonfinite"], snap.counts["skipped"], snap.layer_names
        (1, 1, ['0', '2'])
        >>> sorted(snap.metrics())[:3]  # no clip_threshold before ZClip's 25 warm-up steps are over
        ['gradguard/clip_coef', 'gradguard/ema_lower', 'gradguard/ema_mean']
    """

    def __init__(
        self,
        model: nn.Module | LayerIndex,
        clip: Clipper | None | Literal["default"] = "default",
        exploding: ExplodingDetector | None | Literal["default"] = "default",
        vanishing: VanishingDetector | None | Literal["default"] = "default",
        lr_guard: LRGuard | Literal["default"] | None = None,
        regularizers: Sequence[Regularizer] | None = (),
        on_nonfinite: Literal["skip", "zero", "raise", "warn"] = "skip",
        clip_exploding: bool = True,
        skip_exploding: bool | Literal["first"] = False,
        compile: bool | Literal["auto"] = "auto",
        key: int = 0,
        max_norm: float | None = None,
        group_depth: int | None = None,
        group_fn: Callable[[str], str] | None = None,
        rollback: Rollback | bool | Literal["default"] | None = None,
        divergence: DivergenceDetector | None | Literal["default"] = "default",
        running_stats: RunningStats | None | Literal["default"] = "default",
    ) -> None:
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"`on_nonfinite` must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        rollback = rollback_from(rollback)
        if rollback is not None and lr_guard is None:
            raise ValueError("`rollback` acts when the LR guard lowers the rate: it needs an `lr_guard`.")
        check_compile(compile)
        check_bool("clip_exploding", clip_exploding)
        if skip_exploding not in (True, False, "first") or not isinstance(skip_exploding, (bool, str)):
            raise ValueError(f"`skip_exploding` must be True, False or 'first', got {skip_exploding!r}.")
        for name, value, cls in (
            ("clip", clip, Clipper),
            ("exploding", exploding, ExplodingDetector),
            ("vanishing", vanishing, VanishingDetector),
            ("lr_guard", lr_guard, LRGuard),
            ("divergence", divergence, DivergenceDetector),
        ):
            if value is not None and value != "default" and not isinstance(value, cls):
                raise ValueError(f"`{name}` must be an instance of {cls.__name__}, None or 'default', got {value!r}")
        regularizers = check_regularizers(regularizers)
        self._lazy_module: nn.Module | None = None
        # The last optimizer that passed _check_optimizer with the layout of its param groups, its parameters outside
        # the index (a skip drops their gradients too), and the optimizer the LR guard's hooks sit on.
        # The optimizer last checked (by weak reference: a finished fit's optimizer and its state must not outlive
        # it through the engine a guard keeps) and its param groups' layout then.
        self._checked_optimizer: tuple[Callable[[], Any], tuple[tuple[int, int], ...]] | None = None
        self._unwatched: list[Tensor] = []
        self._warned_unwatched = False
        self._attached: weakref.ref[torch.optim.Optimizer] | None = None
        if not (running_stats is None or running_stats == "default" or isinstance(running_stats, RunningStats)):
            raise ValueError(
                f"`running_stats` must be an instance of RunningStats, None or 'default', got {running_stats!r}"
            )
        # A skipped step keeps the weights, but its forward pass has already moved the normalization layers' running
        # statistics: put back the entries it made non-finite (with "warn" and "raise" nothing is kept from harm).
        self._running_stats = running_stats if isinstance(running_stats, RunningStats) else None
        if isinstance(model, LayerIndex):
            index = model
        elif isinstance(model, nn.Module):
            _refuse_fsdp1(model)
            if running_stats == "default" and on_nonfinite in ("skip", "zero") and len(stats := RunningStats(model)):
                self._running_stats = stats
            index = build_layer_index(model, group_depth, group_fn, include_frozen=True)
            _refuse_taken(regularizers, model)
            if bind_all(regularizers, model, wait_for_lazy=True):
                # A lazy module's parameters come with its first forward pass: bound at the first step, after it.
                self._lazy_module = model
        else:
            raise ValueError(f"`model` must be an nn.Module or a LayerIndex, got {type(model).__name__}")
        if not index.params:
            raise ValueError("GuardEngine: the model has no parameters, so there are no gradients to watch.")
        on_meta = [name for name, p in zip(index.param_names, index.params) if p.device.type == "meta"]
        if on_meta:
            # `to_empty()` materializes a meta model into new Parameter objects: an engine built before it would
            # watch the old ones, which never get a gradient.
            raise ValueError(
                f"GuardEngine: the model's parameters are on the meta device ({on_meta[0]!r}"
                f"{f' and {len(on_meta) - 1} more' if len(on_meta) > 1 else ''}); build the engine after materializing"
                " them (`model.to_empty(device=...)` and their initialization)."
            )
        self.index = index
        self.clipper: Clipper | None = _default(clip, default_clipper)
        self.exploding: ExplodingDetector | None = _default(exploding, ExplodingDetector)
        self.vanishing: VanishingDetector | None = _default(vanishing, VanishingDetector)
        self.divergence: DivergenceDetector | None = _default(divergence, DivergenceDetector)
        self.lr_guard: LRGuard | None = _default(lr_guard, LRGuard)
        self.regularizers = regularizers
        # A regularizer selects from the whole model; each optimizer's step adds the terms of its own parameters.
        self._own = frozenset(id(p) for p in index.params)
        self.on_nonfinite = on_nonfinite
        self.clip_exploding = clip_exploding
        if skip_exploding and self.exploding is None:
            raise ValueError("`skip_exploding` skips the steps the exploding detector flags: it needs `exploding`.")
        self.skip_exploding = skip_exploding
        self.max_norm = optional_number("max_norm", max_norm, low=0.0, high=FLOAT32_MAX, high_inclusive=True)
        # The bound as a device constant, folded into the clipper's coefficient as a cap (None: none, or the clipper
        # is the bound itself).
        self._max_norm_cap: Tensor | None = None
        # The detector's cap is for a clipper the caller chose: the NormClip that stands in for ``max_norm`` alone
        # clips like clip_grad_norm_ and nothing more (as Trainer(gradient_clip_val=...) would under clip=None).
        self._exploding_cap = clip_exploding
        if self.max_norm is not None:
            if self.clipper is None:
                self.clipper = NormClip(self.max_norm)
                self._exploding_cap = False
            elif not self.clipper.takes_cap or getattr(self.clipper, "norm_type", 2.0) != 2.0:
                raise ValueError(
                    f"`max_norm` bounds the total L2 norm, which {self.clipper!r} cannot bound: use a clipper that"
                    " takes a bound on the L2 norm (ZClip, AutoClip, NormClip, AdaGC)."
                )
            if not (isinstance(self.clipper, NormClip) and self.clipper.max_norm <= self.max_norm):
                self._max_norm_cap = torch.full((), self.max_norm, dtype=torch.float32, device=index.params[0].device)
        self.compile = compile
        self.key = check_int("key", key, low=None)
        if self.lr_guard is not None:
            self.lr_guard._feeders[self.key] = weakref.ref(self)
        self.steps = 0  # steps recorded (cumulative, saved)
        # The batch size the detectors are calibrated on, and how many steps in a row came with less than half of it
        # (see `_judged`); host ints, from `step(samples=...)`.
        self._batch_size = 0
        self._short_run = 0
        # The last full step's size, and how many full steps in a row came on another size than the one before; from
        # 2 on, the batch size varies by design and the rule is off (`_judged`).
        self._last_size = 0
        self._size_changes = 0
        self._warned_no_gradient = False
        self._warned_unattached = False
        self._present_seen: Tensor | None = None  # the last mask of the layers with a gradient seen
        self._seen_params: set[int] = set()  # positions of the parameters that have had a gradient
        self._present_last: list[int] | None = None  # those with a gradient at the last change of that set
        self._joins: list[tuple[int, Tensor]] = []  # (engine step, log factor) of each move of the total's level
        # Whether step() was called since the attached optimizer last stepped, and whether that was warned about.
        self._called = False
        self._warned_order = False
        # step() calls inside one step of the attached optimizer (None: outside one), and whether more than one was
        # warned about (a closure that calls step() on every evaluation).
        self._calls_in_step: int | None = None
        self._warned_reevaluated = False
        self._saved_lr_scale: float | None = None  # the LR guard's multiplier a loaded state was saved with
        self._warned_samples = False  # the processes passed different `samples` (said once)
        self._warned_events = False  # undrained events past _MAX_EVENTS are dropped (said once)
        # Where each param group's warm-up stands (`_watch_rate_warmup`): not known yet, under half its peak, past it.
        self._rate_warmup: list[int] = []
        # Witnesses of the gradients the last step left behind (see ``_witnesses``): the same tensors, unwritten
        # since, on the next call mean no backward (nor zero_grad) came between: step() was called twice for one step.
        self._processed: list[tuple[weakref.ref[Tensor], weakref.ref[Tensor], int]] = []
        self._warned_twice = False
        self.steps_since_log = 0
        self.host_counts = {"skipped": 0, "lr_reduced": 0, "rolled_back": 0}
        self.rollback = rollback
        self._rollback_due = False
        self._before_steps: dict[int, dict[str, Any]] = {}  # engine step -> statistics before it (for a retry)
        # See "Attributes": a fused optimizer's scaler must record its inf check before a step's gradients go.
        self.before_drop: Callable[[], None] | None = None
        # Host decisions from the flags that change training: under several processes they must fall on the same
        # step on every rank (see ``step``).
        self._acts_on_flags = self.lr_guard is not None or any(getattr(r, "adaptive", False) for r in self.regularizers)
        self.skipped = False  # whether the last step was skipped
        # Whether no step has changed the weights yet (every one so far skipped): the non-finite gradients of such a
        # step came from the initial weights, which no learning rate made, so neither the LR guard nor the rollback
        # takes them as trouble (a CTC loss +inf on its first 40 batches was cut 5 times and restarted 4: +23.5%
        # held-out against skipping them alone). Only ever turns False.
        self._untouched = True
        self._spike_skipped = False  # whether it was skipped for its norm (skip_exploding)
        self._last_capped = False  # whether the detector capped the last step (skip_exploding="first")
        # Whether the last step put the weights back: an average of the weights kept elsewhere (an EMA) holds the
        # abandoned ones and should start again from the restored weights.
        self.rolled_back = False
        # The last step's loss as the tail took it (a device tensor, never read on the hot path): a run stalled on
        # non-finite steps is told whether its loss itself is infinite (`last_loss`).
        self._last_loss: Tensor | None = None
        self._stats = GradStats(index.params, index.layer_of_param, index.num_layers)
        share = self.exploding.min_share if self.exploding is not None else 0.05
        self._record = _Record(index.num_layers, index.params[0].device, share)
        self._last_total = torch.zeros((), device=self._record.device)
        # flags, GradScaler step, engine step, skipped for its norm (skip_exploding), on untouched weights
        self._pending: deque[tuple[HostFlags, bool, int, bool, bool]] = deque()
        self._free: list[HostFlags] = []
        self._events: deque[StepEvent] = deque(maxlen=_MAX_EVENTS)
        # Runs of evenly spaced step numbers in the window: (index of the first, its number, stride, length, and the
        # engine's count of steps at the first, -1 where not known).
        self._stamps: list[tuple[int, int, int, int, int]] = []
        # The state of each part before any step, for new_phase().
        self._fresh = {name: copy.deepcopy(part.state_dict()) for name, part in self._stateful() if part is not None}
        self._tail = _Tail(
            {"pre": self._pre, "post": self._post, "whole": self._whole, "whole_clip": self._whole_clip},
            compile,
            self._record.device,
        )

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[type[_EngineCopy], tuple[int]]:
        # A true copy would watch the original's parameters (by identity: its regularizers added nothing to the copied
        # model's gradients) and keep no hook on a copied optimizer (torch drops them), yet look healthy. A copy of a
        # module that holds an engine must still work (StochasticWeightAveraging and EMA copy the module): the copy
        # is a placeholder that refuses to be used.
        return _EngineCopy, (self.index.num_layers,)

    def __repr__(self) -> str:
        return (
            f"GuardEngine(layers={self.index.num_layers}, clip={self.clipper!r}, exploding={self.exploding!r},"
            f" vanishing={self.vanishing!r}, divergence={self.divergence!r}, lr_guard={self.lr_guard!r},"
            f" on_nonfinite={self.on_nonfinite!r},"
            f" compile={self.compile!r})"
        )

    # -------------------------------------------------------------------------------------------- the step
    def attach(self, optimizer: torch.optim.Optimizer) -> LRGuardHandle:
        """Apply the LR guard's multiplier inside ``optimizer.step()`` (see :meth:`LRGuard.attach`)."""
        if self.lr_guard is None:
            raise ValueError("GuardEngine.attach: the engine has no lr_guard.")
        self._check_optimizer(optimizer, caller="attach()")
        handle = self.lr_guard.attach(optimizer, self.key)
        inner = unwrap_optimizer(optimizer)
        held = {id(p) for group in inner.param_groups for p in group.get("params", ())}
        trainable = [p for p in self.index.params if p.requires_grad]
        missing = sum(id(p) not in held for p in trainable)
        if 0 < missing < len(trainable):  # none at all: _check_optimizer warned
            # Another optimizer steps the rest at its full rate whatever the guard decides, and a rollback restores
            # only this one's state: the cuts and restarts would reach half a model.
            warnings.warn(
                f"GuardEngine.attach: the optimizer holds {len(trainable) - missing} of the {len(trainable)} trainable"
                f" parameters this engine watches; if another optimizer steps the other {missing}, they step at its"
                " full rate whatever the LR guard decides, and a rollback restores only this optimizer's state. With"
                " several optimizers, build one engine per optimizer on the module it trains"
                " (`GuardEngine(model.generator, key=0)`, `GuardEngine(model.discriminator, key=1)`) and attach each"
                " to its own.",
                stacklevel=user_stacklevel(),
            )
        self._attached = weakref.ref(inner)
        engine = weakref.ref(self)  # the optimizer must not keep the engine alive

        def stepping(*_: Any) -> None:
            live = engine()
            if live is not None:
                live._calls_in_step = 0

        def stepped(*_: Any) -> None:
            live = engine()
            # None: no step under way, or this is a second post hook of one step (an optimizer subclass whose step()
            # calls super().step() has both hooked by torch, and the second found the first's judgement undone).
            if live is None or live._calls_in_step is None:
                return
            # Judged once the step is done: a step that raised has no post hook, and its count is dropped at the next
            # step's start (a loop that catches it calls step() as it likes in between).
            calls, live._calls_in_step = live._calls_in_step, None
            if calls > 1:
                live._warn_reevaluated()
            live._optimizer_stepped()

        handle.hold(inner.register_step_pre_hook(stepping))
        handle.hold(inner.register_step_post_hook(stepped))
        return handle

    def _gradients_changed(self, present: list[int], optimizer: torch.optim.Optimizer | None, flat: Tensor) -> None:
        """The parameters with a gradient (positions ``present``) are another set than on the last step; ``flat``:
        this step's per-layer squared norms. One that never had a gradient before (an unfrozen backbone, a param
        group added) joins the rollback's copies before its first update. Layers that join the last step's add their
        norm to the total, which a backbone can multiply: the total's statistics (the exploding detector's and the
        clipper's) move to where the total now is, by the joining layers' share of this step's norm. The share is
        the same on a bad batch (it scales every layer alike), so a spike on the join step is still one. Each
        layer's own statistics go on, and a joining layer starts its own, as always."""
        if self.rollback is not None:
            self.rollback.join(self.index.params, present, unwrap_optimizer(optimizer))
        previous, self._present_last = self._present_last, list(present)
        seen = self._seen_params
        if len(seen) == len(self.index.params):
            return
        new = [i for i in present if i not in seen] if seen else []
        layer_of = self._stats.layer_of_param
        old_layers = {layer_of[i] for i in seen}
        seen.update(present)
        joining = sorted({layer_of[i] for i in new} - old_layers)
        # Only layers added to the last step's: where they take turns (one task head per batch, routed experts) the
        # total's make-up changes every step and its statistics cover that; moved at each first use, they drifted
        # up until no bad batch was clipped.
        if not joining or previous is None or len(present) <= len(previous) or not set(previous) <= set(present):
            return
        # Layers silent until now, over the rest: the total is sqrt(1 + r) times what it would have been.
        rows = _upload(torch.tensor(joining, dtype=torch.long), flat.device)
        joined = flat.index_select(0, rows).sum()
        rest = flat.sum() - joined
        r = joined / rest
        factor = torch.where(torch.isfinite(r) & (rest > 0), r, 0.0).log1p().mul(0.5)
        self._joins.append((self.steps + 1, factor))
        self._shift_total(factor)

    def _shift_total(self, factor: Tensor) -> None:
        """Move the total norm's statistics (the exploding detector's, the clipper's) by ``factor``, in log-norm."""
        if self.exploding is not None:
            self.exploding._shift_total(factor)
        if self.clipper is not None:
            self.clipper.rescale_(factor.exp())

    def _optimizer_stepped(self) -> None:
        """After each step of the attached optimizer: one warning if no :meth:`step` came before it (called after
        ``optimizer.step()``, the engine's skips and clips reach no step: a NaN batch stepped, while the counts
        reported the skips)."""
        called, self._called = self._called, False
        if called or self._warned_order:
            return
        self._warned_order = True
        warnings.warn(
            "GuardEngine: the attached optimizer stepped without a GuardEngine.step() since its previous step. Call"
            " engine.step() after backward() and before optimizer.step(): called after it (or not at all), its"
            " skips and clips reach no step, and its counts describe steps it did not change.",
            stacklevel=user_stacklevel(),
        )

    def _check_lr_guard_loaded(self) -> None:
        """The first step after :meth:`load_state_dict`: warn when the state was saved under a cut that the LR guard
        no longer holds (its own state was not loaded: the resumed run would train at the full rate)."""
        saved, self._saved_lr_scale = self._saved_lr_scale, None
        if self.lr_guard is None or saved is None or saved >= 1.0 or self.lr_guard.tracks(self.key):
            return  # (a loaded state that recovers to 1x at once is still a loaded one)
        warnings.warn(
            f"GuardEngine: the state loaded was saved while the LR guard held the rate at {saved:.3g}x, but the LR"
            " guard is at 1x: its own state was not loaded, and the run goes on at the full rate that exploded."
            " Save and load `engine.lr_guard.state_dict()` beside `engine.state_dict()`.",
            stacklevel=user_stacklevel(),
        )

    def _warn_samples(self, step: int) -> None:
        """Once: the processes passed different ``samples`` (a step is judged against its own process's batch size,
        so their decisions could differ and the replicas drift apart)."""
        self._warned_samples = True
        warnings.warn(
            f"GuardEngine: at step {step} this process passed another `samples` than the others. Each judges a short"
            " batch against its own usual batch size, so their detectors, clipping and LR guard can decide"
            " differently and the replicas drift apart (a user trial under DDP: one rank cut its rate, the other did"
            " not). Pass the same number on every process: the global batch size, or None.",
            stacklevel=user_stacklevel(),
        )

    def _warn_reevaluated(self) -> None:
        """Once: step() ran more than once inside one step of the attached optimizer."""
        if self._warned_reevaluated:
            return
        self._warned_reevaluated = True
        # Each evaluation was counted, judged and clipped as a step of its own (a user trial: 150 steps counted for
        # 30, held-out loss 0.205 against 0.170 called once per step).
        warnings.warn(
            "GuardEngine.step() was called several times inside one step of the attached optimizer: its closure"
            " calls it on every evaluation (LBFGS evaluates it up to `max_iter` times). Each call counts, judges"
            " and clips as a step of its own. Call engine.step() on the closure's first evaluation only"
            " (engine.add_regularizer_grads_() on the later ones), and build the engine with clip=None and"
            " skip_exploding='first', as in the README's LBFGS loop.",
            stacklevel=user_stacklevel(),
        )

    def _check_optimizer(self, optimizer: Any, caller: str = "step()") -> None:
        """Refuse what is no optimizer (no ``param_groups``); warn about one that holds none of this engine's
        parameters, once per optimizer: another model's would have the LR guard cut one model's rate for the other's
        explosions, but DeepSpeed's ZeRO optimizer, which holds flat copies, looks the same (and leaves the
        gradients empty, which :meth:`step` says)."""
        inner = unwrap_optimizer(optimizer)
        groups = getattr(inner, "param_groups", None)
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer (or a wrapper of one), got {optimizer!r}")
        attached = self._attached() if self._attached is not None else None
        if attached is not None and self.lr_guard is not None and not self.lr_guard.is_attached(attached, self.key):
            attached = self._attached = None  # its handle was removed
        if attached is not None and inner is not attached:
            # The multiplier lives in the step hooks of the optimizer given to attach(): this one would step at the
            # full rate, whatever the guard decided.
            raise ValueError(
                f"GuardEngine: the LR guard is attached to another optimizer ({type(attached).__name__} at"
                f" {id(attached):#x}) than the one passed to {caller}. For a new optimizer, remove the old handle and"
                " call `engine.attach(new_optimizer)`."
            )
        # A param group added since the last check (add_param_group), or parameters added to one, change it.
        layout = tuple((len(g.get("params", ())), id(g["params"][0]) if g.get("params") else 0) for g in groups)
        checked = self._checked_optimizer
        if checked is not None and checked[0]() is optimizer and checked[1] == layout:
            return
        try:
            reference: Callable[[], Any] = weakref.ref(optimizer)
        except TypeError:  # a wrapper without weak references: held, as before
            reference = functools.partial(lambda held: held, optimizer)
        self._checked_optimizer = (reference, layout)
        held = [p for group in groups for p in group.get("params", ())]
        mine = any(id(p) in self._own for p in held)
        # None of them: another model's optimizer, or DeepSpeed's flat copies (said below, and left alone).
        # A parameter without elements (a soft prompt of 0 tokens) is no layer, and nothing to leave unguarded.
        self._unwatched = [p for p in held if id(p) not in self._own and not is_empty(p)] if mine else []
        if self._unwatched and not self._warned_unwatched:
            self._warned_unwatched = True
            warnings.warn(
                f"GuardEngine: the optimizer holds {len(self._unwatched)} parameter(s) outside the model this engine"
                " watches (added after the engine was built?): they are neither measured nor clipped, and a skipped"
                " step drops their gradients too. Build the engine on the model that owns them to have them guarded.",
                stacklevel=user_stacklevel(),
            )
        if not mine:
            warnings.warn(
                f"GuardEngine: the optimizer ({type(inner).__name__}) holds none of the parameters this engine watches."
                " If it is another model's, its LR guard acts on this model's explosions: pass the optimizer of the"
                " model the engine was built for.",
                stacklevel=user_stacklevel(),
            )

    @torch.no_grad()
    def add_regularizer_grads_(self, scale: Tensor | float = 1.0) -> None:
        """Add the regularizers' gradient terms to the ``.grad`` of this engine's parameters (what :meth:`step` does
        first; also for the extra closure evaluations of an optimizer like LBFGS).

        Args:
            scale: the factor on the terms: the loss scale while the gradients are still scaled (fused optimizer
                under a GradScaler), else 1.
        """
        if self._lazy_module is not None:
            _refuse_taken(self.regularizers, self._lazy_module)
            bind_all(self.regularizers, self._lazy_module)
            self._lazy_module = None
        for r in self.regularizers:
            r.add_grad_(scale, only=self._own)

    @torch.no_grad()
    def step(
        self,
        step: int | None = None,
        *,
        grad_scale: Tensor | float | None = None,
        grad_scaler: bool | torch.amp.GradScaler = False,
        optimizer: torch.optim.Optimizer | None = None,
        loss: Tensor | float | None = None,
        samples: int | None = None,
        share: float = 1.0,
    ) -> StepStats | None:
        """Run the pipeline on the gradients in ``.grad``; call it before ``optimizer.step()``.

        Args:
            step: the number events are stamped with (default: the count of steps so far, plus one).
            grad_scale: the factor the gradients are still multiplied by (a GradScaler's scale, when a fused
                optimizer unscales inside ``step``): norms and clipping work on the true gradients.
            grad_scaler: a GradScaler skips non-finite steps itself (16-bit AMP): they are counted as overflow and
                neither handled, nor fed to the LR guard. ``True``: the gradients were unscaled already
                (``scaler.unscale_(optimizer)``); the ``GradScaler`` itself: it unscales ``optimizer``'s gradients
                first, unless that was done since its last ``update()``. An optimizer wrapper that steps through
                its own enabled scaler (accelerate's, Lightning Fabric's, under fp16) is unscaled so untold.
            optimizer: the optimizer about to step (or a framework's wrapper of it), whose state a
                :class:`~lightning_gradguard.Rollback` copies and restores (without it, the one given to
                :meth:`attach`; with neither, only the parameters are).
                Required with a ``GradScaler`` as ``grad_scaler``.
            loss: this step's training loss (unscaled; over an accumulation window, the sum of the losses
                backpropagated for this step: the window's mean when each micro-batch's loss was divided by the
                number of micro-batches, as usual), for the divergence detector; ``None``: no observation this step.
                Under several processes the detector judges the mean over the processes (one ``all_reduce`` per
                step, which every process joins, with or without a loss of its own).
            samples: the number of examples behind this step's gradient (the batch size, summed over an
                accumulation window); ``None``: unknown, every step is judged. A step on less than half the usual
                batch (the short last batch of an epoch) is noisier by design, so the exploding and divergence
                detectors neither judge it nor learn from it (non-finite gradients are still handled, the clipper
                still clips), but for a total norm over :data:`SHORT_GROSS` times what a batch of its size shows on
                average, which is flagged and capped to that; two such steps in a row are a new batch size, and
                start a :meth:`new_phase` on it.
                Sizes that change from step to step (two full steps in a row on another size than the step before:
                lengths read along a time-major layout, dynamic batches) turn this rule off for the run.
                Under several processes pass the same number on every process (the global batch, or the per-process
                one where they are equal): the processes' detectors must agree.
            share: the share of a full step's loss behind this step's gradients and ``loss``, in ``(0, 1]``: ``k / N``
                for an accumulation window of ``k`` micro-batches whose losses were each divided by ``N`` (Lightning
                divides by ``accumulate_grad_batches`` in an epoch's last, partial window too). Its gradients are then
                about ``share`` (signal) to ``sqrt(share)`` (noise) of a full window's: a short step's gross limit is
                taken that much lower, and ``loss`` is divided by ``share`` (the window's mean loss). Pass it with
                ``samples`` (the window's examples); 1: a full step.

        Returns:
            The step's measurements (device tensors), or ``None`` when no parameter had a gradient, the step rolled
            back, or ``optimizer`` will not step: accelerate's optimizer on a micro-batch inside
            ``accelerator.accumulate()`` that does not end the window (nothing is done then, and no step counted).
            After a skipped (or rolled-back) step :attr:`skipped` is ``True`` and every ``.grad`` is ``None``;
            after a rolled-back one :attr:`rolled_back` is ``True`` too: restart any average of the weights kept
            beside the model (``torch.optim.swa_utils.AveragedModel``: ``ema.n_averaged.zero_()``), which holds the
            weights the rollback abandoned.

        Raises:
            NonFiniteGradientError: with ``on_nonfinite="raise"``, on a step whose gradients hold inf/NaN.
            ValueError: a ``GradScaler`` without ``optimizer``, or with ``grad_scale`` (it unscales the gradients).
        """
        self._called = True
        if self._calls_in_step is not None:
            self._calls_in_step += 1  # inside a step of the attached optimizer (a closure's call)
        if self._saved_lr_scale is not None:
            self._check_lr_guard_loaded()
        if optimizer is not None:
            self._check_optimizer(optimizer)
        if step is not None:
            step = _step_number(step)
        if samples is not None:
            if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
                raise ValueError(
                    f"`samples` must be an int >= 1 (the examples behind this step) or None, got {samples!r}"
                )
            samples = int(samples)
        share = check_number("share", share, low=0.0, high=1.0, high_inclusive=True)
        if grad_scale is not None and not isinstance(grad_scale, Tensor):
            if not _is_real(grad_scale) or not 0.0 < float(grad_scale) < math.inf:
                # 0 or NaN would make every step non-finite, a negative scale flips every clipped gradient.
                raise ValueError(
                    f"`grad_scale` must be a tensor, a real number > 0 and finite, or None, got {grad_scale!r}"
                )
            # Made on the device: a host tensor would be copied to it on every use (a blocking copy on CUDA).
            grad_scale = torch.full((), float(grad_scale), device=self._record.device)
        elif grad_scale is not None and (
            grad_scale.numel() != 1 or grad_scale.dtype == torch.bool or grad_scale.is_complex()
        ):
            # Its value is not read here (a host sync on every step): a scaler's scale is positive by construction.
            raise ValueError(
                "`grad_scale` must be a one-element real tensor (a GradScaler's scale), got a"
                f" {grad_scale.dtype} tensor of shape {tuple(grad_scale.shape)}"
            )
        if optimizer is not None and step_deferred(optimizer):
            # Partial sums of the window's gradients: neither a step to judge nor gradients to clip or drop.
            self.skipped = self.rolled_back = False
            return None
        loss_in = self._loss_input(loss)
        if loss_in is not None and share != 1.0:
            loss_in = loss_in / share  # only on a partial window: one op there, none on the others
        distributed = _distributed()
        samples_differ = None
        if loss_in is not None and distributed:
            # Every rank must judge the same loss, or the LR guard would cut (and restart) on some ranks only. Taken
            # before anything that may end the step early, so that every process joins this all_reduce every step.
            # The same collective tells whether the processes passed the same `samples` (told a step later).
            loss_in, samples_differ = _rank_mean(loss_in, samples)
        self._last_loss = loss_in
        if self._called_twice():
            # Going on would add the regularizer terms and clip a second time and count one step twice.
            return None
        grad_scaler = self._unscaled(grad_scaler, optimizer, grad_scale)
        if self._running_stats is not None:
            self._running_stats.repair_()
        self._process_landed()
        if self._pending and self._acts_on_flags and distributed:
            # Several processes: a decision that changes training (the LR guard's cut, a rollback, an adaptive
            # strength) must fall on the same step on every rank. Land the previous steps' flags now (copies issued
            # a forward and backward pass ago) rather than whenever each rank sees them arrive. A single process
            # never waits here.
            self._settle()
        if self.rollback is not None and optimizer is None and self._attached is not None:
            # The attached optimizer is the one about to step: a restart must clear its state (momentum, Adam's
            # moments) with the weights, as when it is passed (a user trial: 5 restarts instead of 2, 15x the loss).
            # Not once its handle is removed.
            attached = self._attached()
            if attached is not None and self.lr_guard is not None and self.lr_guard.is_attached(attached, self.key):
                optimizer = attached
        self.rolled_back = self.rollback is not None and self._rollback_step(
            unwrap_optimizer(optimizer), scaled=grad_scale is not None
        )
        if self.rolled_back:
            self._last_capped = False  # other weights: their first capped step is a first again
            return None
        self.add_regularizer_grads_(grad_scale if grad_scale is not None else 1.0)
        measured = self._stats.measure(grad_scale=grad_scale)
        self.skipped = False
        if measured is None:
            if self.steps == 0 and not self._warned_no_gradient:
                self._warned_no_gradient = True
                if not any(p.requires_grad for p in self.index.params):
                    # Frozen parameters are watched (unfrozen later, they need no new engine), but with none trainable
                    # the advice below about call order points the wrong way (user trial).
                    why = (
                        f"none of its {len(self.index.params)} parameters requires a gradient (all frozen): unfreeze"
                        " the ones to train (`requires_grad_(True)`) before backward()."
                    )
                else:
                    why = (
                        "Call it after backward() and before optimizer.step(). A framework that keeps the gradients to"
                        " itself (DeepSpeed) leaves every .grad empty, and so does an optimizer stepped inside the"
                        " backward pass (`register_post_accumulate_grad_hook`, which frees each gradient as it is"
                        " applied): such steps cannot be guarded."
                    )
                warnings.warn(
                    f"GuardEngine.step() found no gradient on any of its parameters, so nothing was measured. {why}",
                    stacklevel=user_stacklevel(),
                )
            return None
        if measured.present is not self._present_seen:
            # The parameters with a gradient changed (the measurement's cached mask is another one): rare.
            self._present_seen = measured.present
            self._gradients_changed(measured.param_indices, optimizer, measured.flat)
        number = self.steps + 1 if step is None else int(step)
        self._watch_rate_warmup(optimizer)
        # A short batch is not judged; it carries how much noisier its mean gradient is (see `_pre`).
        blind = None if self._judged(samples, share) else self._short_scale(samples, share, measured.flat.device)
        if self.clipper is None and self.on_nonfinite != "raise":
            # Nothing between the detectors and the record: one fused part, then the non-finite handling (which
            # the record does not depend on; "raise" keeps its order: the step that raises is not recorded).
            (total, layer_norm, layer_finite, valid, exploding, *_), (increment, nonfinite, layer_nonfinite) = (
                self._tail("whole", measured.flat, measured.present, loss_in, grad_scaler, blind)
            )
            self.skipped = self._skip(measured, valid, layer_finite, exploding, number, grad_scaler)
        elif (
            (clipper := self.clipper) is not None
            and clipper.fusable
            and self._tail.compiled is not None
            and (self.on_nonfinite != "raise")
        ):
            # Compiled: the clipper's coefficient joins the one fused part; its host bookkeeping comes before, the
            # scaling of the gradients after the non-finite handling (as in the eager order).
            clipper.prepare_(measured.flat.device)
            (total, layer_norm, layer_finite, valid, exploding, *_), coef, (increment, nonfinite, layer_nonfinite) = (
                self._tail("whole_clip", measured.flat, measured.present, loss_in, grad_scaler, blind)
            )
            self.skipped = self._skip(measured, valid, layer_finite, exploding, number, grad_scaler)
            if not self.skipped:
                clipper.scale_(measured.grads, coef)
        else:
            total, layer_norm, layer_finite, valid, exploding, vanishing, diverging = self._tail(
                "pre", measured.flat, measured.present, loss_in, blind
            )
            self.skipped = self._skip(measured, valid, layer_finite, exploding, number, grad_scaler)
            coef, clipped = self._clip(measured, total, valid, exploding)
            increment, nonfinite, layer_nonfinite = self._tail(
                "post", total, layer_norm, layer_finite, valid, measured.present, exploding, vanishing, diverging, coef,
                clipped, grad_scaler,
            )  # fmt: skip
        if self.rollback is not None and self.rollback.rescuing and not self.skipped and grad_scale is None:
            self._rescue_clip(measured, total, valid)
        self._last_total = total
        self._stamp(number)
        # Three more entries than the counts: whether the detector capped the step; the total norm, sent to the
        # host only while the rollback's rescue needs it (the first ``rescue_until`` steps); and, under several
        # processes with a divergence detector (whose all_reduce tells), whether this one's `samples` differed.
        flags = self._free.pop() if self._free else HostFlags.create(len(_COUNTS) + 3, total.device)
        extra = [total.reshape(1)] if self.rollback is not None and self.rollback.wants_norm(self.steps + 1) else []
        if samples_differ is not None and not self._warned_samples:
            extra = [extra[0] if extra else self._record.nan.reshape(1), samples_differ.to(total.dtype).reshape(1)]
        if extra:
            increment = torch.cat([increment, *extra])
        flags.fill(increment, number)
        self._pending.append((flags, grad_scaler, self.steps + 1, self._spike_skipped, self._untouched))
        self._untouched = self._untouched and self.skipped
        self.steps += 1
        self.steps_since_log += 1
        self._tail.step_done()
        # After the clipping and the rescue, which write the gradients in place.
        self._processed = [] if self.skipped else _witnesses(measured.params, measured.grads)
        return StepStats(
            layer_norm=layer_norm, total_norm=total, nonfinite=nonfinite,
            layer_nonfinite=~layer_finite if layer_nonfinite is None else layer_nonfinite,
            layer_present=measured.present, grads=measured.grads, params=measured.params,
            param_indices=measured.param_indices,
        )  # fmt: skip

    def _watch_rate_warmup(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Start the clipper afresh when a param group's warm-up first reaches half its peak, once per group.

        At a rate near 0 the weights hardly move, and the gradient norms vary by the batch alone: statistics taken
        there are far narrower than the same run's at its rate, and the default ZClip clipped healthy steps as the
        rate rose (a warm-up from 0 over 40 steps: 10 steps clipped over 8 seeds, held-out +8.6% on one; none with
        a constant rate, or with the clipper started afresh at half the peak). Per group: a backbone held at a rate
        of 0 while the head trained, then given its rate, was clipped as it began to learn (+9.7% on a CNN). Once
        per group: at every warm restart of a cyclic schedule, a cycle shorter than the clipper's own warm-up would
        keep it from ever clipping. Host values only: each group's scheduled rate against its schedule's peak
        (OneCycleLR's ``max_lr``, else the scheduler's ``initial_lr``); a group without either, or with a rate on a
        device, is no evidence.
        """
        if self.clipper is None:
            return
        if optimizer is None and self._attached is not None:
            optimizer = self._attached()
        if optimizer is None:
            return
        inner = unwrap_optimizer(optimizer)
        if len(self._rate_warmup) == len(inner.param_groups) and min(self._rate_warmup, default=0) == _WARMED_UP:
            return
        rates = (
            self.lr_guard.scheduled_rates(inner, self.key)
            if self.lr_guard is not None
            else [group.get("lr") for group in inner.param_groups]
        )
        places = self._rate_warmup + [_RATE_UNKNOWN] * (len(rates) - len(self._rate_warmup))
        crossed = False
        for i, (group, rate) in enumerate(zip(inner.param_groups, rates)):
            peak, rate = host_rate(group.get("max_lr", group.get("initial_lr"))), host_rate(rate)
            if peak is None or rate is None or peak <= 0 or places[i] == _WARMED_UP:
                continue
            if rate < 0.5 * peak:
                places[i] = _WARMING_UP
            else:
                crossed |= places[i] == _WARMING_UP
                places[i] = _WARMED_UP
        self._rate_warmup = places
        if crossed and self.steps > 0:
            self._load_statistics({"clip": self._fresh["clip"]})

    def _judged(self, samples: int | None, share: float = 1.0) -> bool:
        """Whether the detectors judge a step on ``samples`` examples: not a step on less than half the usual batch.
        The noise in a mean gradient grows as the batch shrinks (a last batch of 1 after batches of 64: about 8x),
        so the short last batch of every epoch looked like an explosion against the full batches' history. A
        partial accumulation window (``share < 1``) is neither a new batch size nor a change of it: the next window is
        whole again (a window of 2 of 4 batches at each epoch's end, then a whole one, counted as two changes in a row
        and turned this rule off for the run)."""
        if share < 1.0 and samples is not None and self._size_changes < 2:
            return 2 * samples >= self._batch_size
        if samples is None or self._size_changes >= 2:
            # Sizes that change from step to step (batches bucketed by length, read along a time-major layout; dynamic
            # batching) have no usual batch to fall short of: every step is judged, and no size is a new phase.
            return True
        if 2 * samples >= self._batch_size:
            changed = self._last_size > 0 and samples != self._last_size
            self._size_changes = self._size_changes + 1 if changed else 0
            self._last_size = samples
            self._batch_size = max(self._batch_size, samples)
            self._short_run = 0
            return True
        self._short_run += 1
        if self._short_run < 2:
            return False
        # Two short steps in a row: not an epoch's last batch but a smaller batch size from now on (a schedule, a
        # new data set). Its norms are the new level: the statistics start again on it.
        self._batch_size, self._short_run = samples, 0
        self.new_phase()
        return True

    def _called_twice(self) -> bool:
        """The gradients of the last step are still there, unwritten (no backward in between): warn once."""
        if not self._processed:
            return False
        for param_ref, grad_ref, version in self._processed:
            param, grad = param_ref(), grad_ref()
            if grad is None or param is None or param.grad is not grad or grad._version != version:
                self._processed = []
                return False
        if not self._warned_twice:
            self._warned_twice = True
            warnings.warn(
                "GuardEngine.step() was called again on the gradients of the step before (no backward in between);"
                " the call was ignored. Call it once per optimizer step, after backward() and before"
                " optimizer.step(). If backward() did run, the model's parameters were replaced since the engine was"
                " built (`load_state_dict(..., assign=True)`, `to_empty()`): its backward writes other tensors'"
                " gradients, and every later call is ignored too; build a new engine on the model as it is now.",
                stacklevel=user_stacklevel(),
            )
        return True

    @staticmethod
    def _unscaled(
        grad_scaler: bool | torch.amp.GradScaler, optimizer: torch.optim.Optimizer | None, grad_scale: Tensor | None
    ) -> bool:
        """Unscale the gradients with the scaler given, or the one ``optimizer``'s wrapper steps through, and say
        whether a GradScaler owns this step. Measured on scaled gradients, every norm and threshold would be off by
        the scale, and an inf step that the guard skipped would leave the scaler nothing to back off from."""
        if not isinstance(grad_scaler, (bool, torch.amp.GradScaler)):
            kind = type(grad_scaler).__name__
            raise ValueError(f"`grad_scaler` must be a bool or a torch.amp.GradScaler, got {kind}")
        scaler = grad_scaler if isinstance(grad_scaler, torch.amp.GradScaler) else optimizer_scaler(optimizer)
        if scaler is None or not scaler.is_enabled():
            return grad_scaler is True
        inner = unwrap_optimizer(optimizer)
        if inner is None:
            raise ValueError(
                "`grad_scaler`: a GradScaler unscales the gradients of one optimizer; pass it as `optimizer=...`"
            )
        if grad_scale is not None:
            raise ValueError(
                "`grad_scale` and a GradScaler: the scaler unscales the gradients here, so leave `grad_scale` out"
            )
        unscale_once(scaler, inner)
        return True

    def _loss_input(self, loss: Tensor | float | None) -> Tensor | None:
        """The loss as the 0-d fp32 device tensor the tail takes (NaN: none this step), or ``None`` without a
        divergence detector."""
        if loss is not None and not isinstance(loss, Tensor) and not _is_real(loss):
            raise ValueError(f"GuardEngine.step: `loss` must be a tensor, a real number or None, got {loss!r}")
        if self.divergence is None:
            return None
        record = self._record
        if loss is None:
            return record.nan
        if not isinstance(loss, Tensor):
            return torch.full((), float(loss), device=record.device)
        if loss.numel() != 1:
            raise ValueError(f"GuardEngine.step: `loss` must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        # Each call below is an op even when it changes nothing: only the ones that do are made.
        if loss.requires_grad:
            loss = loss.detach()
        if loss.dim() != 0:
            loss = loss.reshape(())
        if loss.device != record.device or loss.dtype != torch.float32:
            loss = loss.to(record.device, torch.float32)
        return loss

    def _rollback_step(self, optimizer: torch.optim.Optimizer | None, scaled: bool = False) -> bool:
        """Take the rollback's copies, or roll back when the LR guard lowered the rate; ``True``: rolled back (the
        step is skipped). ``scaled``: the gradients still carry a GradScaler's scale (no rescue clipper then)."""
        rollback = self.rollback
        assert rollback is not None
        due, self._rollback_due = self._rollback_due, False
        if not (due and self.lr_guard is not None and rollback.can_restore(self.steps + 1)):
            rollback.before_step(self.steps + 1, self.index.params, optimizer, self._statistics)
            if rollback.may_retry(self.steps + 1):
                # The statistics before this step, for a retry of trouble that begins here (one clone per step, in
                # the first steps only; the flags that tell arrive a step or two later).
                self._before_steps[self.steps + 1] = self._statistics()
                self._before_steps.pop(self.steps + 1 - _KEEP_BEFORE, None)
            elif self._before_steps:
                self._before_steps.clear()
            return False
        before = rollback.stretch_start
        # Host checks, on rollback steps only. A plain retry (the first early restart) changes nothing but the weights.
        retry = rollback.retries()
        rescue = not retry and rollback.rescues(optimizer, scaled)
        # The cuts taken during the stretch answered weights that the restart throws away: the restarted run gets one
        # cut from the rate in force when the trouble began, not all of them (none when the rescue clipper is the
        # remedy tried first, unless the norm blew up by orders of magnitude in one step).
        cut = not retry and (not rescue or rollback.blew_up())
        began = rollback.stretch_began
        copied_at = rollback.copy_step
        reduction = rollback.cut_factor()  # read before the restore forgets the stretch
        saved = rollback.restore(optimizer, rescue=rescue, retry=retry)
        before_trouble = self._before_steps.get(began) if retry and began is not None else None
        self._before_steps.clear()
        if before_trouble is not None:
            # A plain retry restarts the same run from the same weights at the same rate: what the clipper and the
            # detectors had learned when the trouble began is what the restarted run should expect. The copy's
            # statistics (the initial weights': nothing learned) would let a bad batch right after the restart
            # through unclipped (four bad batches in a row from step 2 of an SGD run: +7036%), and the statistics of
            # now, which took in the troubled steps, would widen the band the next trouble is judged against.
            before_trouble["running_stats"] = saved.get("running_stats") if saved is not None else None  # weights' own
            saved = before_trouble
        self._load_statistics(saved)
        # Statistics of before a join (taken before that step was measured) know nothing of the layers that joined,
        # which the restarted run trains: moved again, as at the join. Left at the old level, a backbone whose rate
        # was still too high after the restart's cut climbed inside the new level it made, clipped but never cut
        # again (a loss of 3177 at the end).
        since = began if before_trouble is not None and began is not None else copied_at
        for at, factor in self._joins:
            if at >= since:
                self._shift_total(factor)
        if before is not None:
            self.lr_guard.rewind(before, self.key, cut=cut, state_restored=optimizer is not None, factor=reduction)
        self._drop_pending()  # the flags of the abandoned trajectory
        self._drop_grads()  # computed on the abandoned weights: the optimizer step leaves everything as restored
        self.host_counts["rolled_back"] += 1
        if rollback.pin_lr:
            self.lr_guard.pin(self.key)
        self.skipped = True
        self.steps += 1
        return True

    def _drop_pending(self) -> None:
        """Forget the flags of the steps not acted on yet (their buffers go back for reuse)."""
        self._free.extend(flags for flags, *_ in self._pending)
        self._pending.clear()

    def _drop_grads(self) -> None:
        """Drop every gradient the optimizer would step with, those of parameters outside the index included: torch
        optimizers then leave the parameters and their state (moments, step count) untouched."""
        if self.before_drop is not None:
            self.before_drop()
        for p in (*self.index.params, *self._unwatched):
            p.grad = None

    def _rescue_clip(self, measured: FlatStats, total: Tensor, valid: Tensor) -> None:
        """The rollback's rescue clipper, after the guard's own (only in a run that has rolled back)."""
        rescue = self.rollback.rescue if self.rollback is not None else None
        assert rescue is not None
        names, owners = self._owners(measured.param_indices)
        rescue.clip_grads_(measured.grads, total, valid, params=measured.params, names=names, owner_types=owners)

    def _owners(self, param_indices: list[int]) -> tuple[list[str], list[type]]:
        """The qualified names and owner module types of the given parameters (for AGC's ``exclude``)."""
        return [self.index.param_names[i] for i in param_indices], [self.index.owner_types[i] for i in param_indices]

    def _statistics(self) -> dict[str, Any]:
        """The clipper's and the detectors' state, cloned on the device (no wait): kept with a rollback copy."""
        return {
            "clip": self.clipper.device_state() if self.clipper is not None else None,
            "exploding": self.exploding.state_dict() if self.exploding is not None else None,
            "vanishing": self.vanishing.state_dict() if self.vanishing is not None else None,
            "divergence": self.divergence.state_dict() if self.divergence is not None else None,
            "running_stats": self._running_stats.snapshot() if self._running_stats is not None else None,
            # A rollback to before the warm-up's crossing brings back the clipper of then: it starts afresh again.
            "rate_warmup": list(self._rate_warmup),
        }

    def _stateful(self) -> tuple[tuple[str, Any], ...]:
        """The parts with statistics of their own, under their ``state_dict`` names."""
        return (
            ("clip", self.clipper),
            ("exploding", self.exploding),
            ("vanishing", self.vanishing),
            ("divergence", self.divergence),
        )

    def _load_statistics(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            return
        if saved.get("rate_warmup") is not None:
            self._rate_warmup = [int(place) for place in saved["rate_warmup"]]
        saved = _to_device(saved, self._record.device)  # kept with a copy that a checkpoint may have moved
        if self._running_stats is not None and saved.get("running_stats") is not None:
            self._running_stats.restore_(saved["running_stats"])
        for name, part in self._stateful():
            if part is None or saved.get(name) is None:
                continue
            state = {}
            for key, value in saved[name].items():
                current = getattr(part, f"_{key}", None)
                if value is None and isinstance(current, Tensor):
                    # Copied before the part's first step: its fresh state is zeros. Zeros of the current shape
                    # (rather than None) keep a compiled tail from recompiling to create them.
                    value = torch.zeros_like(current)
                state[key] = value.clone() if isinstance(value, Tensor) else value
            part.load_state_dict(state)

    def _pre(
        self, flat: Tensor, present: Tensor, loss: Tensor | None, blind: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, ExplodingResult | None, VanishingResult | None, Tensor | None]:
        """From the flat measurement (and the loss) to the detectors' verdicts (the first compiled part).

        ``blind``: for a short batch, ``sqrt(usual batch / its size)``, how much larger the noise makes its norm: the
        exploding detector takes a constant ``False`` as its ``valid`` (it then neither flags nor learns), and the
        loss is kept from the divergence detector. Only a gross outlier is flagged (:data:`SHORT_GROSS`)."""
        total, layer_norm, layer_finite = split_flat(flat)
        valid = total < math.inf  # False also for finite layers whose norms overflow together
        judged = valid if blind is None else self._record.false
        exploding = self.exploding.update(total, layer_norm, judged, present) if self.exploding is not None else None
        if blind is not None and exploding is not None:
            exploding = self._gross(exploding, total, valid, blind)
        vanishing = self.vanishing.update(layer_norm, valid, present) if self.vanishing is not None else None
        diverging = None
        if self.divergence is not None and loss is not None and blind is None:
            diverging = self.divergence.update(loss)
        return total, layer_norm, layer_finite, valid, exploding, vanishing, diverging

    def _gross(self, result: ExplodingResult, total: Tensor, valid: Tensor, noise: Tensor) -> ExplodingResult:
        """A short batch's verdict: flagged only when its total norm is more than :data:`SHORT_GROSS` times what a
        batch of its size shows on average (the detector's average norm times ``noise``), and then capped to that.
        Unjudged, a 1e4x bad batch that fell on an epoch's short last batch within ZClip's warm-up went through whole
        and wrecked an SGD run that the same spike on a full batch left at 1.8x its clean loss (user trial)."""
        assert self.exploding is not None
        typical = self.exploding.band()[0] * noise  # NaN before the total's first observation: never flagged then
        gross = valid & (total > typical * SHORT_GROSS)
        cap = torch.where(gross, typical * self.exploding.cap_ratio, result.cap)
        return ExplodingResult(total=gross, layers=result.layers, any=gross | result.any, cap=cap)

    def _short_scale(self, samples: int | None, share: float, device: torch.device) -> Tensor:
        """``sqrt(usual batch / samples) * share`` on ``device``: the noise in a mean gradient grows as the batch
        shrinks, and a partial accumulation window's gradient is ``share`` of a mean (its losses were divided by the
        full window's size): a 300x bad batch alone in an epoch's last window of 1 of 4 micro-batches went unflagged
        (user trial). Filled on the device, not copied there: no transfer on the step."""
        ratio = self._batch_size / samples if samples else 1.0
        return torch.full((), math.sqrt(max(ratio, 1.0)) * share, dtype=torch.float32, device=device)

    def _post(self, *args: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """The record (the second compiled part); see :meth:`_Record.update`."""
        return self._record.update(*args)

    def _whole(
        self, flat: Tensor, present: Tensor, loss: Tensor | None, grad_scaler: bool, blind: Tensor | None = None
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """``_pre`` and ``_post`` as one part, for an engine without a clipper."""
        found = self._pre(flat, present, loss, blind)
        total, layer_norm, layer_finite, valid, exploding, vanishing, diverging = found
        record = self._record
        args = (
            total,
            layer_norm,
            layer_finite,
            valid,
            present,
            exploding,
            vanishing,
            diverging,
            record.one,
            record.false,
        )
        return found, record.update(*args, grad_scaler)

    def _whole_clip(
        self, flat: Tensor, present: Tensor, loss: Tensor | None, grad_scaler: bool, blind: Tensor | None = None
    ) -> tuple[tuple[Any, ...], Tensor, tuple[Any, ...]]:
        """``_pre``, the clipper's coefficient and ``_post`` as one part, for a :attr:`~Clipper.fusable` clipper.

        Returns the ``_pre`` figures, the coefficient to scale the gradients by (unless the step is skipped) and the
        record's results; the same values as the eager order (pre, skip, clip, post).
        """
        found = self._pre(flat, present, loss, blind)
        total, layer_norm, layer_finite, valid, exploding, vanishing, diverging = found
        clipper = self.clipper
        assert clipper is not None
        cap = self._cap(exploding)
        old_coef, old_threshold = clipper.last_coef, clipper.last_threshold
        flagged = self._flagged(exploding)
        unflagged = None if flagged is None else ~flagged
        # The clipper learns from the steps that are neither invalid nor skipped for a flag, as eagerly.
        coef = clipper.coefficient_(
            total, valid if unflagged is None else valid & unflagged, cap, self._flag_cap(exploding)
        )
        clipped = coef < 1.0
        kept = valid if self.on_nonfinite == "skip" and not grad_scaler else None  # the steps not skipped
        if unflagged is not None:
            kept = unflagged if kept is None else kept & unflagged
        if kept is not None:
            # Eagerly, a skipped step never reaches the clipper: its state is untouched (an invalid step changes none
            # of it here either), it keeps its last figures, and the record takes its last coefficient. Here the skip
            # is decided after this part, so the same choice is a ``where``.
            coef = torch.where(kept, coef, old_coef)
            clipper.last_coef = coef
            clipper.last_threshold = torch.where(kept, clipper.last_threshold, old_threshold)
            clipped = clipped & kept
        record = self._record
        args = (total, layer_norm, layer_finite, valid, present, exploding, vanishing, diverging, coef, clipped)
        return found, coef, record.update(*args, grad_scaler)

    def _cap(self, exploding: ExplodingResult | None) -> Tensor | None:
        """The bound on this step's clipped norm beyond the clipper's own (``None``: none)."""
        cap = self._flag_cap(exploding)
        if self._max_norm_cap is not None:
            cap = self._max_norm_cap if cap is None else torch.minimum(cap, self._max_norm_cap)
        return cap

    def _flag_cap(self, exploding: ExplodingResult | None) -> Tensor | None:
        """The exploding detector's part of :meth:`_cap` (``None``: none), what a flagged step stands for in the
        clipper's warm-up."""
        return exploding.cap if (exploding is not None and self._exploding_cap) else None

    def _flagged(self, exploding: ExplodingResult | None) -> Tensor | None:
        """With ``skip_exploding``: whether the exploding detector capped this step (its total norm flagged, a stretch
        too, or a flagged layer under a total above its cap: its ``cap`` is finite exactly then); ``None``
        otherwise."""
        if not self.skip_exploding or exploding is None:
            return None
        return exploding.cap < math.inf

    def _skip(
        self,
        measured: FlatStats,
        valid: Tensor,
        layer_finite: Tensor,
        exploding: ExplodingResult | None,
        step: int,
        grad_scaler: bool,
    ) -> bool:
        """Handle a non-finite step (``on_nonfinite``; a GradScaler handles its own) and, with ``skip_exploding``, a
        flagged one; ``True``: the step is skipped (every gradient dropped)."""
        mode = None if grad_scaler else self.on_nonfinite
        self._spike_skipped = False
        if mode == "zero":
            # One kernel per gradient, sync-free; only inf/NaN entries change.
            for g in measured.grads:
                nan_to_num_(g)
        flagged = self._flagged(exploding)
        reads_valid = mode in ("skip", "raise")
        if not reads_valid and flagged is None:
            return False  # "warn": reported by drain(), at most a step late
        # "skip", "raise" and skip_exploding must decide before optimizer.step: the one documented host read per step.
        if flagged is None:
            finite, spiked = bool(valid), False
        else:
            finite, spiked = torch.stack((valid, flagged)).tolist()
            if not finite and not reads_valid:
                return False  # "zero", "warn" or a GradScaler's own skip: not skipped here, and no observation
        if finite:
            capped = spiked
            # "first": the next batch on the same weights capped too says the weights are the trouble, not a batch.
            spiked = capped and not (self.skip_exploding == "first" and self._last_capped)
            self._last_capped = capped
            if spiked:
                self._drop_grads()
                self.host_counts["skipped"] += 1
                self._spike_skipped = True
            return spiked
        if mode == "raise":
            bad = [n for n, ok in zip(self.index.names, layer_finite.tolist()) if not ok]
            where = f"in layer(s) {bad[:5]}{' and more' if len(bad) > 5 else ''}" if bad else "(their total norm)"
            raise NonFiniteGradientError(
                f"GradGuard: non-finite gradients, or a norm beyond the float32 range, at step {step} {where}."
            )
        self._drop_grads()
        self.host_counts["skipped"] += 1
        return True

    def _clip(
        self, measured: FlatStats, total: Tensor, valid: Tensor, exploding: ExplodingResult | None
    ) -> tuple[Tensor, Tensor]:
        """Clip (unless skipped): the coefficient for the record (the clipper's last one on a skipped step, as the
        extremes always did) and whether it clipped."""
        clipper, record = self.clipper, self._record
        if clipper is None:
            return record.one, record.unclipped
        if self.skipped:
            return clipper.last_coef.to(total.device, torch.float32), record.unclipped
        names = owners = None
        if clipper.needs_params or clipper.needs_names:
            names, owners = self._owners(measured.param_indices)
        coef = clipper.clip_grads_(
            measured.grads, total, valid, params=measured.params, names=names, owner_types=owners,
            cap=self._cap(exploding), flag_cap=self._flag_cap(exploding),
        )  # fmt: skip
        if coef.device != total.device or coef.dtype != torch.float32:
            coef = coef.to(total.device, torch.float32)
        return coef, coef < 1.0

    # ------------------------------------------------------------------------------------------ host side
    def _settle(self) -> None:
        """Wait for the flags of every step not acted on yet, and act on them."""
        for flags, *_ in self._pending:
            if flags.event is not None:
                flags.event.synchronize()
        self._process_landed()

    def _process_landed(self) -> None:
        """Act on the flags of past steps that have landed on the host: LR guard, adaptive regularizers."""
        while self._pending and self._pending[0][0].ready():
            flags, grad_scaler, local, dropped, untouched = self._pending.popleft()
            exploding, vanishing, nonfinite, overflow, clipped, diverging, capped = (
                bool(v) for v in flags.values[: len(_COUNTS) + 1]
            )
            norm = float(flags.values[len(_COUNTS) + 1])  # NaN when not sent
            if flags.values[len(_COUNTS) + 2] > 0 and not self._warned_samples:  # NaN when not sent
                self._warn_samples(flags.step)
            self._free.append(flags)
            guard = self.lr_guard
            lr_reduced = lr_restored = False
            # An AMP overflow is routine scale calibration: no observation at all, neither an explosion nor a calm
            # step. Without a GradScaler, a non-finite step is a bad batch (skipped, counted); the LR guard lowers
            # the rate only for a run of them in a row (``LRGuard.nonfinite_patience``).
            calibration = grad_scaler and overflow
            if nonfinite and untouched:
                # On weights no step has changed: the data's or the loss's, not the rate's (see __init__). The run has
                # not started yet, and the rollback's early windows count from after the step.
                calibration = True
                if self.rollback is not None:
                    self.rollback.not_started(local)
            # A diverging loss is judged from the loss, not the gradients: it counts on an overflow step too (a loss
            # that blows up is when fp16 gradients overflow), where the gradients' flags say nothing.
            if not calibration or diverging:
                gradient_exploding, gradient_nonfinite = (False, False) if calibration else (exploding, nonfinite)
                if self.rollback is not None:
                    # Before the LR guard acts: a stretch of trouble remembers the guard as it was when it began.
                    troubled = gradient_exploding or gradient_nonfinite or diverging
                    before = functools.partial(guard.snapshot, self.key) if troubled and guard is not None else None
                    self.rollback.observe(
                        local, gradient_exploding, gradient_nonfinite, before=before, diverging=diverging, norm=norm
                    )
                # A blown-up loss is an explosion to the LR guard, whatever the gradient norms say, and already a
                # persistent one: it cuts at once (one gradient spike waits for a second, `LRGuard.patience`).
                # A spike the clipper bounded (or the step skipped for it) alone among calm steps counts for nothing
                # (`LRGuard.spare_lone`).
                reduced = guard is not None and guard.update(
                    gradient_exploding,
                    self.key,
                    nonfinite=gradient_nonfinite,
                    diverging=diverging,
                    clipped=clipped or dropped,
                    flagged=capped,
                )
                if reduced:
                    self.host_counts["lr_reduced"] += 1
                    lr_reduced = True
                    self._warn_unattached(flags.step)
                if guard is not None and self._calls_for_rollback(guard, reduced):
                    self._rollback_due = True
                lr_restored = guard is not None and guard.withdrew(self.key)
                if not (gradient_nonfinite or calibration):  # neither an explosion nor a calm step
                    for r in self.regularizers:
                        r.on_exploding(gradient_exploding)
            if exploding or vanishing or nonfinite or overflow or lr_reduced or diverging or lr_restored:
                scale = guard.scale(self.key) if (lr_reduced or lr_restored) and guard is not None else None
                if len(self._events) == _MAX_EVENTS and not self._warned_events:
                    self._warned_events = True
                    warnings.warn(
                        f"GuardEngine: {_MAX_EVENTS} events are waiting for drain(); from now on the oldest are"
                        " dropped as new ones come (summary() still counts every one). Call engine.drain() every"
                        " step, or whenever events matter, to read them all.",
                        stacklevel=user_stacklevel(),
                    )
                self._events.append(
                    StepEvent(
                        flags.step,
                        exploding,
                        vanishing,
                        nonfinite,
                        overflow,
                        lr_reduced,
                        diverging,
                        scale,
                        lr_restored,
                    )
                )

    def _calls_for_rollback(self, guard: LRGuard, reduced: bool) -> bool:
        """Whether the LR guard's decision on this step calls for the rollback: any cut but one held for a run of
        non-finite steps, which waits for trouble right after the run (that makes it real) or for the run to go on.
        Among the first steps with no calm start (the rollback's early trouble) at ``_EARLY_RUN`` times the patience;
        after a calm start only at ``STALL_STEPS``: the skipped steps left the weights that calm steps made, and
        restarting for a stretch of bad batches threw those away (user trial, `Rollback()`: 4 NaN batches in a row
        at step 80 ended at 28x the loss of the run that only skipped them, 8-10 at +22% (SGD) and +124% (AdamW)),
        while a run that never ends (weights that make every batch non-finite) still needs the restart."""
        if reduced and not guard.holds_cut(self.key):
            return True
        if guard.confirmed(self.key):
            return True
        early = self.rollback is not None and self.rollback.early_trouble()
        return guard.nonfinite_run(self.key) == (_EARLY_RUN * guard.nonfinite_patience if early else STALL_STEPS)

    def _warn_unattached(self, step: int) -> None:
        """Say once that a cut reached no optimizer: the LR guard's multiplier acts through :meth:`attach` only."""
        if self._warned_unattached or self.lr_guard is None or self.lr_guard.attached(self.key):
            return
        if self._attached is not None and self._attached() is None:
            return  # the optimizer it was attached to is gone (a drain() after training): no rate left to lower
        self._warned_unattached = True
        warnings.warn(
            f"GuardEngine: the LR guard lowered the learning rate at step {step}, but it is attached to no optimizer,"
            " so every optimizer still steps at its full rate (the guard's scale and `lr_reduced` count the cut"
            " anyway). Call `engine.attach(optimizer)` once, before training.",
            stacklevel=user_stacklevel(),  # step() or drain(), through _process_landed: the user's line
        )

    def drain(self) -> list[StepEvent]:
        """The steps on which something happened, as far as the host has learned (never waits for the device).

        Also advances the LR guard and the adaptive regularizers by every step whose flags have landed. Call it
        once per step (``GradGuard`` does, in its hooks) or whenever events matter; :meth:`step` advances the LR
        guard by itself. At most the last 1000 events wait for it: past that the oldest are dropped, with one warning
        (:meth:`summary` counts every event all the same).
        """
        self._process_landed()
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def scalars(self) -> Tensor:
        """``[8]`` device vector: last, max and min total norm, clip threshold, min clip coefficient, EMA band."""
        device = self._record.device
        extremes = self._record.buffers["extremes"] * self._record.signs
        threshold = self.clipper.last_threshold if self.clipper is not None else torch.tensor(math.inf)
        if self._max_norm_cap is not None:  # the clipped norm's bound, whichever of the two is lower
            threshold = torch.minimum(threshold.to(device, torch.float32), self._max_norm_cap.to(device))
        band = self.exploding.band() if self.exploding is not None else torch.full((3,), math.nan)
        return torch.cat(
            [
                self._last_total.reshape(1).float(),
                extremes[:2],
                threshold.to(device, torch.float32).reshape(1),
                extremes[2:],
                band.to(device, torch.float32),
            ]
        )

    @property
    def counts(self) -> Tensor:
        """``[6]`` int64 device counters: exploding, vanishing, non-finite, overflow, clipped and diverging steps;
        vanishing counts layers instead, one per layer each time it begins to vanish (after the detector's patience)."""
        return self._record.buffers["counts"]

    @property
    def layer_last(self) -> Tensor:
        """``[L]`` device vector: each layer's latest gradient norm (0 until it has had a gradient)."""
        return self._record.buffers["layers"][0]

    @property
    def layer_present(self) -> Tensor:
        """``[L]`` bool device vector: the layers that had a gradient since the last snapshot."""
        return self._record.buffers["layers"][1] >= 0

    def gather(self) -> Tensor:
        """Everything :meth:`snapshot` reads, as one flat fp32 device vector (to batch several engines' copies)."""
        device = self._record.device
        if self.divergence is not None:
            progress = self.divergence.progress().to(device, torch.float32)
        else:
            progress = torch.full((_PROGRESS,), math.nan, device=device)
        return torch.cat([self.scalars, self.counts.float(), progress, self._record.buffers["layers"].reshape(-1)])

    def last_loss(self) -> float | None:
        """The loss passed to the last :meth:`step` as the divergence detector took it (divided by its ``share``,
        averaged over the processes): NaN for a step without one, ``None`` before the first step or without a
        divergence detector. Reads the device: for a log or a warning, not for every step."""
        loss = self._last_loss
        return None if loss is None else float(loss)

    def snapshot(self, values: np.ndarray | None = None, reset: bool = True) -> EngineSnapshot:
        """What was recorded since the last snapshot, on the host.

        Args:
            values: this engine's part of a batched copy of :meth:`gather` (default: the engine copies it itself, the
                one device-to-host transfer).
            reset: start a new logging window (extremes, first events and "seen" restart; counters go on).
        """
        if values is None:
            values = self.gather().cpu().numpy()
        snap = EngineSnapshot.from_gathered(
            values,
            list(self.index.names),
            self._number_at,
            self._count_at,
            self.host_counts,
            clipped=self.clipper is not None,
            lr_scale=self.lr_guard.scale(self.key) if self.lr_guard is not None else None,
        )
        if reset:
            self.start_window()
        return snap

    def start_window(self) -> None:
        """Start a new logging window (what :meth:`snapshot` does after reading)."""
        self._record.start_window()
        self.steps_since_log = 0
        self._stamps = []

    def _stamp(self, number: int) -> None:
        """Record the step number of the window's next step. Runs of evenly spaced numbers (consecutive ones, or a
        second optimizer's every fifth step) are one entry each: O(1) memory however long a window lasts."""
        counted = self.steps + 1  # this step's count: a rollback counts a step it does not stamp, and ends a run
        if self._stamps:
            first, start, stride, length, at = self._stamps[-1]
            if (length == 1 or start + stride * length == number) and (at < 0 or at + length == counted):
                self._stamps[-1] = (first, start, number - start if length == 1 else stride, length + 1, at)
                return
        self._stamps.append((self.steps_since_log, number, 1, 1, counted))

    def _run_at(self, local: int) -> tuple[int, int, int, int, int]:
        return self._stamps[bisect.bisect_right(self._stamps, (local - 1, math.inf)) - 1]

    def _number_at(self, local: int) -> int:
        """The caller's step number of the window's ``local``-th step (1-based)."""
        first, start, stride, _, _ = self._run_at(local)
        return start + stride * (local - 1 - first)

    def _count_at(self, local: int) -> int | None:
        """The engine's count of steps (:attr:`steps`) at the window's ``local``-th step (1-based), where the step
        numbers around it do not follow the count one for one (several steps under one number, manual optimization;
        or an optimizer stepping every few numbers); ``None`` elsewhere: a count that runs beside the numbers at an
        offset (a second fit, a batch without a step) says nothing the number does not."""
        first, _, stride, length, at = self._run_at(local)
        return at + local - 1 - first if length > 1 and stride != 1 and at >= 0 else None

    def layer_report(self, kind: str) -> str:
        """The layers with a ``kind`` event in the current window and their norms (a host read: for error messages)."""
        rows = self._record.buffers["layers"]
        steps, values = rows[_ROWS.index(f"{kind}_step")].tolist(), rows[_ROWS.index(f"{kind}_value")].tolist()
        found = [(n, v) for n, s, v in zip(self.index.names, steps, values) if s >= 0]
        return ", ".join(f"{n!r} (norm {v:.3g})" for n, v in found[:5]) or "the total norm"

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Detector, clipper and counter state (plain values and tensors: loads with ``weights_only=True``).

        The decisions of steps whose flags have not been acted on yet (not landed, or no :meth:`drain` or step since)
        are taken first, waiting for the copies: a run resumed from the state would never take them (the LR guard's
        cut called for by a second spike). The LR guard's own ``state_dict`` does the same, so the two may be taken in
        either order.
        """
        self._settle()
        state: dict[str, Any] = {
            name: part.state_dict() if part is not None else None for name, part in self._stateful()
        }
        for b in _BUFFERS:
            if b.saved:
                state[b.name] = self._record.buffers[b.name].clone()
        state.update(
            host_counts=dict(self.host_counts),
            steps=self.steps,
            layers=list(self.index.names),
            params=list(self.index.param_names),
            batch_size=self._batch_size,
            short_run=self._short_run,
            last_size=self._last_size,
            size_changes=self._size_changes,
            seen_params=sorted(self._seen_params),
            present_last=self._present_last,
            joins=[[at, factor.clone()] for at, factor in self._joins],
            rate_warmup=list(self._rate_warmup),
            last_capped=self._last_capped,
            untouched=self._untouched,
            # The adaptive strengths: a plain loop resumed from this state alone goes on as the original would.
            regularizers={r.name: r.state_dict() for r in self.regularizers},
            # The LR guard's multiplier for this engine's key, to tell a resume that left its state behind.
            lr_scale=None if self.lr_guard is None else self.lr_guard.scale(self.key),
        )
        # The logging window so far: a run resumed from this state logs the steps since the last log as the
        # uninterrupted one would (its spikes, maxima and first events), not a window that starts at the resume.
        state["window"] = self._window_state()
        if self.rollback is not None:
            state["rollback"] = self.rollback.state_dict()
            if "copies" in state["rollback"]:
                # With the copies, a resumed run takes the rollback the next step was due to take, and a plain retry
                # starts from the statistics of before its trouble, as the uninterrupted run would.
                state["rollback_due"] = self._rollback_due
                state["before_steps"] = [[step, stats] for step, stats in self._before_steps.items()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        A part that does not fit (a clipper of another kind or size, e.g. ZClip with another ``warmup_steps``) starts
        afresh, with a warning that names it and why; everything else is restored.

        Saved for the same parameters grouped into other layers (another ``group_depth`` or ``group_fn``), the
        per-layer statistics (the exploding and vanishing detectors) start afresh, with a warning; the counts, the
        clipper, the divergence detector and the rollback's state are restored.

        Raises:
            ValueError: when the state was saved for other parameters, or its rollback's ``rescue_cause`` is none of
                ``"loss"``, ``"gradients"`` or ``None`` (nothing is restored then).
        """
        for problem in self._load_state(state):
            warnings.warn(f"GuardEngine: {problem}", stacklevel=user_stacklevel())
        # The LR guard's state is saved on its own (it may serve several engines); checked at the next step, since
        # the two states may be loaded in either order.
        self._saved_lr_scale = state.get("lr_scale")

    def _load_state(self, state: dict[str, Any]) -> list[str]:
        """:meth:`load_state_dict`, returning what was not restored (and why) instead of warning."""
        if not isinstance(state, dict):
            raise ValueError(f"`state` must be a dict from GuardEngine.state_dict(), got {type(state).__name__}")
        if "layers" not in state:
            raise ValueError(
                f"`state` must be a dict from GuardEngine.state_dict() (it has 'layers'), got keys {sorted(state)[:8]}"
            )
        per_layer: tuple[str, ...] = ()
        if state["layers"] != list(self.index.names):
            # A state saved before the parameter names were kept cannot tell a regrouping from another model.
            if state.get("params") != list(self.index.param_names):
                raise ValueError(
                    "GuardEngine.load_state_dict: the state was saved for other parameters (its layers and parameter"
                    " names differ from this model's); nothing was restored. Load it into an engine of the model it"
                    " was saved from."
                )
            per_layer = ("exploding", "vanishing")
        if isinstance(state.get("rollback"), dict):
            rescue_cause_of(state["rollback"])  # a malformed one is refused before anything is restored
        device = self._record.device
        problems = []
        # The flags and events of steps this engine took before the load belong to the run the state replaces (an
        # engine reloaded in place after a blow-up would otherwise count the blow-up's steps in the restored run).
        self._drop_pending()
        self._events.clear()
        self.start_window()  # and the logging window they were recorded in
        if per_layer:
            problems.append(
                "the parameters are grouped into other layers than when the state was saved; the exploding and"
                " vanishing detectors start afresh, everything else is restored."
            )
        for name, part in self._stateful():
            if part is not None and state.get(name) is not None and name not in per_layer:
                try:
                    part.load_state_dict(_to_device(state[name], device))
                except (ValueError, KeyError, TypeError) as err:  # saved by a part configured otherwise
                    problems.append(f"the saved {name} state does not fit {part!r} ({err}); it starts afresh.")
        for r in self.regularizers:
            if r.name in state.get("regularizers", {}):  # an older state has none: the strengths go on as they are
                try:
                    r.load_state_dict(state["regularizers"][r.name])
                except ValueError as err:
                    problems.append(f"the saved state of regularizer {r.name!r} does not fit ({err}); not restored.")
        for b in _BUFFERS:
            if b.saved and b.name in state:
                saved = state[b.name].to(device)
                # A state saved before a kind was added has fewer counters: those it has keep their slots.
                self._record.buffers[b.name][: saved.shape[0]].copy_(saved)
        window = state.get("window")
        if window is not None and not per_layer:  # else (an older state, other layers): the window starts here
            self._take_window(window)
        self.host_counts.update(state.get("host_counts", {}))
        self.steps = int(state.get("steps", 0))
        # A state saved before this was kept: untouched only if it has taken no step.
        self._untouched = bool(state.get("untouched", self.steps == 0))
        self._batch_size = int(state.get("batch_size", 0))  # an older state has none: the next batch sets it
        self._short_run = int(state.get("short_run", 0))
        self._last_size = int(state.get("last_size", 0))
        self._size_changes = int(state.get("size_changes", 0))
        self._rate_warmup = [int(place) for place in state.get("rate_warmup", [])]  # older states: the next step tells
        self._last_capped = bool(state.get("last_capped", False))
        # Absent from older states: the first step's parameters are taken as seen, as on a fresh start.
        seen, last = (self._positions(state.get(key)) for key in ("seen_params", "present_last"))
        self._seen_params = set(seen or ())
        self._present_last = last
        self._joins = [(int(at), factor.to(self._record.device)) for at, factor in state.get("joins", [])]
        self._present_seen = None
        # Protection the saved run relied on and that this engine has no part to take (a guard resumed with
        # `rollback=None` or `lr_guard=None`): a user trial's resumed run blew up from 1.4 to 1700 without a word.
        saved_rollback = state.get("rollback") or {}
        if self.rollback is None and saved_rollback.get("rescuing"):
            problems.append(
                "the state was saved with the rescue clipping at work (turned on by a rollback's restart), and there"
                " is no rollback here to take it: it is dropped, and only the clipper clips from now on."
            )
        saved_scale = state.get("lr_scale")
        if self.lr_guard is None and saved_scale is not None and saved_scale < 1.0:
            problems.append(
                f"the state was saved while the LR guard held the rate at {saved_scale:.3g}x, and there is no LR guard"
                " here: the run goes on at the full rate."
            )
        if self.rollback is not None and state.get("rollback") is not None:
            self.rollback.load_state_dict(state["rollback"], params=self.index.params)
            held = self.rollback.holds_copy
            self._rollback_due = bool(state.get("rollback_due", False)) and held
            self._before_steps = {int(step): stats for step, stats in state.get("before_steps", [])} if held else {}
        return problems

    def new_phase(self) -> None:
        """Start the clipper's and the detectors' statistics afresh, for a new phase of training whose gradient and
        loss levels are meant to differ (a harder curriculum stage, a loss term switched on, a new task).

        Call it when the phase begins (before that step's :meth:`step`). The detectors judge a lasting jump of the
        loss or of the gradient norms against the old level, and a jump of 10x or more looks like a divergence to
        them (the LR guard would cut, the early restart would go back): after this call the clipper and the
        detectors warm up again on the new level, and the divergence detector takes the next loss as its starting
        point. Counts, the LR guard's multiplier and the rollback's state are kept.
        """
        # As a rollback restores: a fresh None becomes zeros of the current shape, so a compiled tail does not
        # recompile.
        self._load_statistics({name: _to_device(state, self._record.device) for name, state in self._fresh.items()})
        self._last_capped = False  # a capped step of the new phase is a first

    def carry_over(self, old: GuardEngine) -> None:
        """Continue ``old``, the engine of the same optimizer before its parameters changed (a param group added).

        The steps ``old`` has not acted on yet are settled first (their flags waited for: a parameter change is
        rare), so a cut or a rollback they call for is not lost. Then its counters, its undrained events, a rollback
        due and the rollback itself go on here: a run rescued by the rescue clipper stays rescued, a used retry stays
        used, a stretch of trouble goes on, and the copies restore the parameters they were taken of (see
        :meth:`Rollback.rebind`). So do the statistics (see :meth:`_take_statistics`): each layer's detectors stay
        out of their warm-up, and the total's keep their level, on the very step a fine-tuning schedule is riskiest.
        """
        old._settle()
        self._take_statistics(old)
        self._last_capped = old._last_capped
        self._untouched = old._untouched  # the weights the old engine let move are the same weights
        self._record.buffers["counts"].copy_(old.counts)
        self.host_counts = old.host_counts
        self.steps = old.steps
        # The batch size the short-batch rule knows (else an epoch's short last batch right after the change was
        # judged against the carried statistics), and the parameters that have had a gradient, at their new places:
        # the new ones join the total at their first gradient.
        self._batch_size, self._short_run = old._batch_size, old._short_run
        self._last_size, self._size_changes = old._last_size, old._size_changes
        self._rate_warmup = list(old._rate_warmup)  # a group added on the warm-up's crossing step must not miss it
        where = {id(p): i for i, p in enumerate(self.index.params)}

        def moved(positions: Iterable[int]) -> list[int]:
            return [where[id(old.index.params[i])] for i in positions if id(old.index.params[i]) in where]

        self._seen_params = set(moved(old._seen_params))
        self._present_last = None if old._present_last is None else moved(old._present_last)
        self._joins = list(old._joins)
        # The logging window goes on (a spike between two logs is not lost to the change), each layer's record by
        # name: layers new since start blank.
        self._take_window(old._window_state(), layers=old.index.names)
        if self.rollback is not None and old.rollback is not None:
            self.rollback = old.rollback
            self.rollback.rebind(self.index.params, statistics=lambda saved: self._statistics_from(old, saved))
            self._rollback_due = old._rollback_due

    def _statistics_from(self, old: GuardEngine, saved: dict[str, Any]) -> dict[str, Any]:
        """``old``'s statistics ``saved`` (a rollback copy's, see :meth:`_statistics`) for this engine's layers, each
        layer's by name (a new one's as it is now). Dropped instead, a rollback after a param group was added kept the
        statistics that took in the blow-up: a backbone whose rate was still too high after the restart ended at a
        loss of 73, against 0.82 where it was unfrozen within its group."""
        source = layer_source(old.index.names, self.index.names)
        out = dict(saved)
        parts: tuple[tuple[str, Any, Any], ...] = (
            ("exploding", self.exploding, old.exploding),
            ("vanishing", self.vanishing, old.vanishing),
        )
        for name, part, old_part in parts:
            state = saved.get(name)
            if part is None or old_part is None or state is None or all(v is None for v in state.values()):
                continue  # nothing learned at the copy: restored as zeros of the current shape
            before, after = copy.deepcopy(old_part), copy.deepcopy(part)
            before.load_state_dict(state)
            after._take_layers(before, source)
            out[name] = after.state_dict()
        return out

    def _positions(self, saved: Any) -> list[int] | None:
        """Saved positions among this engine's parameters; ``None`` when absent, empty or not all among them."""
        positions = [int(i) for i in saved or []]
        return positions if positions and all(0 <= i < len(self.index.params) for i in positions) else None

    def _take_statistics(self, old: GuardEngine) -> None:
        """Go on from ``old``'s statistics: each layer's by name (a layer new since starts its own, silently, as
        one that receives gradients late), the total's, the clipper's and the loss's. When the new parameters first
        get a gradient, the total's move by their share (:meth:`_gradients_changed`), as where layers are unfrozen
        within a group. Started afresh instead, a spike on the step a group joined went through whole (a 10x loss
        then blew a regression up to 3e14 despite a rollback and two cuts)."""
        source = layer_source(old.index.names, self.index.names)
        if self.exploding is not None and old.exploding is not None:
            self.exploding._take_layers(old.exploding, source)
        if self.vanishing is not None and old.vanishing is not None:
            self.vanishing._take_layers(old.vanishing, source)
        if self.divergence is not None and old.divergence is not None:
            self.divergence.load_state_dict(old.divergence.state_dict())
        if self.clipper is not None and type(old.clipper) is type(self.clipper):
            self.clipper.load_state_dict(old.clipper.device_state())

    def _window_state(self) -> dict[str, Any]:
        """The logging window since the last snapshot, and the events not drained yet (settled, or landed since the
        last drain): plain values and tensors."""
        return {
            "clock": self._record.buffers["clock"].clone(),
            "extremes": self._record.buffers["extremes"].clone(),
            "layers": self._record.buffers["layers"].clone(),
            "last_total": self._last_total.detach().clone(),
            "steps_since_log": self.steps_since_log,
            "stamps": [list(run) for run in self._stamps],
            "events": [list(event) for event in self._events],
        }

    def _take_window(self, window: dict[str, Any], layers: Sequence[str] | None = None) -> None:
        """Go on with a :meth:`_window_state`: of these layers, or of ``layers`` (names), matched to these by name."""
        device = self._record.device
        for name in ("clock", "extremes"):
            self._record.buffers[name].copy_(window[name].to(device))
        saved = window["layers"].to(device)
        if layers is None:
            self._record.buffers["layers"].copy_(saved)
        else:
            columns = mapped_columns(layer_source(layers, self.index.names), device)
            if columns is not None:
                self._record.buffers["layers"][:, columns[0]] = saved[:, columns[1]]
        self._last_total = window["last_total"].to(device)
        self.steps_since_log = int(window["steps_since_log"])
        # A window saved before the counts were kept has four entries per run: its counts are not known (-1).
        self._stamps = [
            (int(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e, *_ in (r + [-1] for r in window["stamps"])
        ]
        self._events.extend(StepEvent(*event) for event in window.get("events", []))

    def summary(self) -> dict[str, int]:
        """Cumulative count of each event kind (reads the device counters: a host sync): steps, except
        ``vanishing``, which counts layers as they begin to vanish (see :attr:`counts`). The flags of past steps that
        have landed are acted on first, as :meth:`drain` does: a cut on the last step is counted without a drain."""
        self._process_landed()
        return _event_counts(self.counts.tolist(), self.host_counts)
