"""Logging-step-only diagnostics: update-to-weight ratios, zero fractions, activation-gradient norms, the gradient noise
scale and per-epoch summaries.

None of these feeds a decision, so each runs on logging steps only: constructing one registers nothing, and a step on
which it is not asked for runs no op and has no hook. The device measures return device tensors and never copy to
the host, so the caller can fold them into the one batched device-to-host copy of its logging step; the host-side
helpers (:class:`UpdateRatioHints`, :class:`NoiseScale`, :class:`EpochSummary`) take host floats from that copy.

Where each measure is taken in an optimizer step (Lightning's hook names; a plain loop has the same points):

================================  ===========================================================================
``on_train_batch_start``          :meth:`ActivationGradients.arm` (and :meth:`LocalGradNorm.arm` for the noise
                                  scale under DDP without accumulation), for the steps that end in a log
``on_after_backward``             first micro-batch only: :func:`squared_grad_norm` (or
                                  :meth:`LocalGradNorm.disarm`), the small-batch gradient of the noise scale
``on_before_optimizer_step``      :meth:`ZeroFraction.compute`, :func:`squared_grad_norm` (the big batch),
                                  :meth:`ActivationGradients.disarm`; after the guard's own step:
                                  :meth:`UpdateRatio.before_step`
``on_train_batch_end``            :meth:`UpdateRatio.after_step`
================================  ===========================================================================
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gradguard._compat import (
    foreach_add_,
    foreach_mul,
    foreach_norm,
    group_by_device_and_dtype,
    in_function_transform,
    unwrap_optimizer,
)
from lightning_gradguard._validation import check_int, check_number
from lightning_gradguard.layers import LayerIndex, ModuleSite, build_layer_index, module_sites
from lightning_gradguard.stats import _dense, _local, total_norm

__all__ = [
    "NOISE_SCALE_MANUAL_NOTE",
    "NOISE_SCALE_NOTE",
    "ActivationGradients",
    "EpochSummary",
    "FlowPoint",
    "LocalGradNorm",
    "NoiseScale",
    "StepSize",
    "UpdateRatio",
    "UpdateRatioHints",
    "ZeroFraction",
    "adaptive_step_ratio",
    "noise_scale_source",
    "squared_grad_norm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_VERSION = 1

# The one-time note for a run where the noise scale has no second batch size to compare with.
NOISE_SCALE_NOTE = (
    "GradGuard: the gradient noise scale (gradguard/noise_scale) is not logged: it compares the gradient of two batch"
    " sizes without an extra backward pass, and this run has only one (no gradient accumulation and a single"
    " process). Set `Trainer(accumulate_grad_batches=2)` or more, or train on several devices, to get it."
)
#: The info message of a run whose optimization is manual, or has several optimizers: no setting gives it.
NOISE_SCALE_MANUAL_NOTE = (
    "GradGuard: the gradient noise scale (gradguard/noise_scale) is not logged: it is measured from Lightning's own"
    " gradient accumulation or DDP averaging of one optimizer's gradients, which a run with manual optimization or"
    " several optimizers does not go through."
)


# ---------------------------------------------------------------------- shared helpers


def _norms(tensors: list[Tensor], ord: float, device: torch.device) -> tuple[Tensor, list[int]]:
    """``[P]`` fp32 ``ord``-norms of ``tensors`` (any devices and dtypes) on ``device``, and their order as indices
    into ``tensors``: one ``_foreach_norm`` per device and dtype (half precision is reduced in fp32)."""
    groups = group_by_device_and_dtype([tensors], with_indices=True)
    parts: list[Tensor] = []
    order: list[int] = []
    for (group_device, dtype), ([group], indices) in groups.items():
        low = dtype in _LOW_PRECISION
        norms = torch.stack(foreach_norm(group, ord, dtype=torch.float32 if low else None))
        if group_device != device or norms.dtype != torch.float32:
            # A copy towards the host must land before the host reads it; between accelerators it need not block.
            norms = norms.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu")
        parts.append(norms)
        order.extend(indices)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), order


def _upload(values: list[int] | list[float] | list[bool], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on ``device`` without making the host wait (pinned + async on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _all_reduce_if(sharded: bool, t: Tensor) -> None:
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)


def _check_index(index: Any) -> LayerIndex:
    if not isinstance(index, LayerIndex) or index.num_layers < 1:
        raise ValueError(f"`index` must be a LayerIndex with at least one layer (build_layer_index), got {index!r}")
    return index


def _check_scale(name: str, scale: Any) -> float | Tensor | None:
    """``None``, a positive finite number, or a tensor (used as is: it lives on the device)."""
    if scale is None or isinstance(scale, Tensor):
        return scale
    return check_number(name, scale, low=0.0)


def _check_distributed_sum(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"`distributed_sum` must be True, False or None, got {value!r}.")
    return value


class _LayerIds:
    """The layer of each measured tensor, as a device index, cached for the usual unchanging pattern."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        self.position = {id(p): i for i, p in enumerate(index.params)}
        self._key: tuple[Any, ...] | None = None
        self._value: tuple[Tensor, Tensor] | None = None

    def get(
        self, positions: list[int], order: list[int], device: torch.device, numels: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[P]`` long layer ids in ``order``, and ``[P]`` fp32 element counts in ``order`` (when ``numels``)."""
        key = (tuple(positions), tuple(order), device, numels is not None)
        if key != self._key or self._value is None:
            layer_of = self.index.layer_of_param
            ids = _upload([layer_of[positions[i]] for i in order], torch.long, device)
            counts = _upload([float(numels[i]) for i in order] if numels is not None else [0.0], torch.float32, device)
            self._key, self._value = key, (ids, counts)
        return self._value


# ---------------------------------------------------------------------- update-to-weight ratio


class UpdateRatio:
    """Per-layer update-to-weight ratio ``‖Δθ‖ / ‖θ‖`` of the update an optimizer step actually applied.

    ``θ`` is the layer's parameters (all of them, as one vector) before the step and ``Δθ`` the change the step made,
    whatever made it: the optimizer's rule, momentum, weight decay, a learning-rate multiplier, clipping. A healthy
    layer typically moves by about ``1e-3`` of its norm per step; far above, the learning rate is too high for it; far
    below, it barely trains (see :class:`UpdateRatioHints`).

    :meth:`before_step` keeps a copy of the parameters that are about to be updated (one ``_foreach_mul`` per device
    and dtype: the memory of those parameters, held until :meth:`after_step`); :meth:`after_step` subtracts in place
    and folds the norms into layers (two ``_foreach_norm``, one ``index_add``). Nothing is copied to the host. Call it
    on logging steps only.

    Args:
        index: the layers (e.g. ``build_layer_index(model)``, or the part of it one optimizer holds).
        distributed_sum: sum the per-layer squares over all ranks (parameters sharded by FSDP2); ``None`` decides from
            the parameters (``DTensor`` -> sum).

    Raises:
        ValueError: ``index`` is not a :class:`~lightning_gradguard.layers.LayerIndex` with a layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard import build_layer_index
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        >>> ratio = UpdateRatio(build_layer_index(model))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> ratio.before_step()  # the parameters that have a gradient
        >>> opt.step()
        >>> ratio.after_step().shape  # [L] fp32 on the parameters' device
        torch.Size([2])
    """

    def __init__(self, index: LayerIndex, distributed_sum: bool | None = None) -> None:
        self.index = _check_index(index)
        self.distributed_sum = _check_distributed_sum(distributed_sum)
        self._ids = _LayerIds(self.index)
        self._positions: list[int] = []
        self._params: list[Tensor] = []
        self._before: list[Tensor] | None = None

    @property
    def pending(self) -> bool:
        """Whether a copy taken by :meth:`before_step` waits for :meth:`after_step`."""
        return self._before is not None

    def before_step(self, params: Iterable[Tensor] | None = None) -> None:
        """Copy the parameters the coming optimizer step may change.

        Args:
            params: the parameters to watch; ``None``: those of the index that have a gradient now (torch optimizers
                leave the others alone). Parameters that are not in the index are ignored.
        """
        if params is None:
            positions = [i for i, p in enumerate(self.index.params) if p.grad is not None]
        else:
            found = (self._ids.position.get(id(p)) for p in params)
            positions = sorted({i for i in found if i is not None})
        self._positions = positions
        self._params = [self.index.params[i] for i in positions]
        if not self._params:
            self._before = []
            return
        with torch.no_grad():
            self._before = foreach_mul([_local(p.detach()) for p in self._params], 1.0)

    def discard(self) -> None:
        """Drop the copy taken by :meth:`before_step` (e.g. the step did not happen)."""
        self._before, self._params, self._positions = None, [], []

    def after_step(self) -> Tensor | None:
        """The ratios of the step since :meth:`before_step`, and drop the copy.

        Returns:
            ``[L]`` fp32 on the device of the first watched parameter: ``‖Δθ‖ / ‖θ‖`` per layer, NaN for a layer whose
            parameters were not watched (no gradient) or have norm 0 before the step (nothing to compare with). 0 for
            a layer the step did not change (e.g. a step that GradScaler skipped). ``None`` when :meth:`before_step`
            was not called.
        """
        before, params, positions = self._before, self._params, self._positions
        if before is None:
            return None
        self.discard()
        num_layers = self.index.num_layers
        if not before:
            device = self.index.params[0].device if self.index.params else torch.device("cpu")
            return torch.full((num_layers,), math.nan, device=device)
        device = before[0].device
        with torch.no_grad():
            old, order = _norms(before, 2.0, device)
            foreach_add_(before, [_local(p.detach()) for p in params], alpha=-1.0)  # -Δθ, in place of the copy
            delta, _ = _norms(before, 2.0, device)  # same tensors, same grouping: same order
            ids, _ = self._ids.get(positions, order, device)
            squares = torch.zeros(2 * num_layers, dtype=torch.float32, device=device)
            squares.index_add_(0, torch.cat([ids, ids + num_layers]), torch.cat([old, delta]).square())
            if self.distributed_sum is None:
                self.distributed_sum = _is_sharded(params[0])
            _all_reduce_if(self.distributed_sum, squares)
            old_sq, delta_sq = squares.split(num_layers)
            ratio = (delta_sq / old_sq).sqrt()
            return torch.where(old_sq > 0, ratio, torch.full_like(ratio, math.nan))


#: A log whose learning rate is below this fraction of the highest one seen gives no "too low" update ratio.
_LOW_RATE = 0.1


class UpdateRatioHints:
    """Hints for layers whose update-to-weight ratio stays too high or too low, from the ratios of successive logs.

    A layer whose ratio is above ``high`` (or below ``low``) on ``patience`` consecutive logging steps is hinted about,
    quoting the geometric mean of those ratios, once per direction: a hint is advice, and a layer that hovers at the
    edge of the band in a long run came back out of it again and again (a long-run trial of a healthy 60-layer
    MLP: the same "barely trains" hint 9 times in 8000 steps, when each recovery, ``patience`` logs back in the band,
    allowed another). The TensorBoard heatmap shows the ratios throughout. A NaN,
    infinite or exactly-zero ratio (no gradient, zero weights, a skipped step) is no observation: it neither extends
    nor breaks a streak. All the layers of one log go into one message, the furthest out of the band first (at most
    ``max_named`` named, the rest counted), so a log yields at most one hint however many layers are out of band.

    A ratio around ``1e-3`` is the usual rule of thumb, not a law: small layers, fresh heads and adapters trained
    with Adam sit above ``1e-2`` for long stretches of healthy runs. The default ``high=1e-1`` (a tenth of the
    weights' norm in one step) therefore waits for a ratio that is too high on any reading, and the message says what
    was measured and what it *may* mean; the TensorBoard heatmap still marks the usual ``1e-5..1e-2`` band. A layer
    whose weights start at exactly zero (LoRA's ``B``, a ReZero gate; see :meth:`start_from_zero`) gets no "too high"
    hint until its ratio first comes into the band: growing from zero, its ratio starts infinite and
    falls as the weights grow (about ``1 / steps`` with Adam), whatever the learning rate. A log whose learning rate
    (``lr``, when given) is below a tenth of the highest one known (seen, or the schedule's ``base_lr``) is no
    observation for the "too low" hint: a schedule's warm-up, its decay to zero and the troughs of warm restarts
    shrink every update on purpose, and so does an LR guard that has cut the rate below a tenth. So is a layer whose
    param group's rate is below a tenth of the highest group's (``rate_scales``): a layer-wise decay of the rate
    (``0.8 ** depth`` over 12 blocks) shrinks the deep layers' updates on purpose too.

    Args:
        high: a ratio above this counts as too high (the learning rate may be too high for the layer), ``> low``.
        low: a ratio below this counts as too low (the layer barely trains), ``> 0``.
        patience: consecutive logs before a hint, ``>= 1``.
        max_named: the most layers named in one message (the others are counted), ``>= 1``.

    Raises:
        ValueError: an argument is out of range, naming it.

    Example:
        >>> hints = UpdateRatioHints(patience=2)
        >>> hints.update(["enc.3", "head"], [3.0e-1, 1e-3])
        []
        >>> hints.update(["enc.3", "head"], [3.2e-1, 1e-3])
        ["update/weight ratio above 1e-1 over the last 2 logs for 1 layer: 'enc.3' 3.1e-1; the learning rate may be \
too high for it (about 1e-3 is usual)"]
    """

    def __init__(self, high: float = 1e-1, low: float = 1e-5, patience: int = 3, max_named: int = 3) -> None:
        self.low = check_number("low", low, low=0.0)
        self.high = check_number("high", high, low=self.low, low_name="low")
        self.patience = check_int("patience", patience, low=1)
        self.max_named = check_int("max_named", max_named, low=1)
        # name -> [direction (+1 high, -1 low), length of the streak, sum of log10 ratios over it]
        self._streaks: dict[str, list[float]] = {}
        self._hinted: set[tuple[str, int]] = set()  # (name, direction) pairs already hinted about
        self._from_zero: set[str] = set()  # layers still growing from all-zero weights
        self._peak_lr = 0.0  # the highest learning rate given to update()

    def start_from_zero(self, names: Iterable[str]) -> None:
        """Hold back the "too high" hint for layers whose weights are exactly zero now, until their ratio first
        comes into the band (at or below ``high``); from then on they are judged as any other layer.

        Example:
            >>> hints = UpdateRatioHints(patience=1)
            >>> hints.start_from_zero(["lora_B"])
            >>> hints.update(["lora_B"], [0.5]), hints.update(["lora_B"], [5e-3]), len(hints.update(["lora_B"], [0.5]))
            ([], [], 1)
        """
        self._from_zero.update(str(name) for name in names)

    def update(
        self,
        names: Sequence[str],
        ratios: Sequence[float] | np.ndarray,
        lr: float | None = None,
        base_lr: float | None = None,
        rate_scales: Sequence[float] | None = None,
    ) -> list[str]:
        """Fold in one log's ratios (host floats, e.g. from :meth:`UpdateRatio.after_step` after the copy to host).

        Args:
            names: the layer names, in the order of ``ratios``.
            ratios: one ratio per name.
            lr: the learning rate of the step the ratios measure (``None``: unknown); below a tenth of the highest
                one known, no ratio counts as too low.
            base_lr: the rate a schedule scales (a torch scheduler's ``initial_lr``), known before any log reaches
                it: logs that all fall in a schedule's troughs see no higher one.
            rate_scales: per name, the rate of its param group over the highest group's (``None``: one rate for
                all); below a tenth, its ratio does not count as too low.

        Returns:
            The hint this log completes, as a list of at most one message (empty when no streak reached
            ``patience`` at this log).
        """
        if len(names) != len(ratios):
            raise ValueError(f"`ratios` must have one entry per name ({len(names)}), got {len(ratios)}")
        if rate_scales is not None and len(rate_scales) != len(names):
            raise ValueError(f"`rate_scales` must have one entry per name ({len(names)}), got {len(rate_scales)}")
        # (decades out of the band, name, geometric mean) of the streaks this log completes, per direction
        due: dict[int, list[tuple[float, str, float]]] = {1: [], -1: []}
        for rate in (lr, base_lr):
            if rate is not None and math.isfinite(rate) and rate > 0.0:
                self._peak_lr = max(self._peak_lr, float(rate))
        scheduled_low = lr is not None and lr < _LOW_RATE * self._peak_lr
        scales = rate_scales if rate_scales is not None else [1.0] * len(names)
        for name, value, scale in zip(names, ratios, scales):
            ratio = float(value)
            low_rate = scheduled_low or scale < _LOW_RATE
            if not math.isfinite(ratio) or ratio <= 0.0 or (low_rate and ratio < self.low):
                continue
            if name in self._from_zero:
                if ratio > self.high:
                    continue  # still growing from zero: the ratio says nothing of the learning rate yet
                self._from_zero.discard(name)
            direction = 1 if ratio > self.high else -1 if ratio < self.low else 0
            if direction == 0:
                self._streaks.pop(name, None)  # back in the band: a later streak starts afresh
                continue
            streak = self._streaks.get(name)
            if streak is None or streak[0] != direction:
                streak = self._streaks[name] = [direction, 0, 0.0]
            streak[1] += 1
            streak[2] += math.log10(ratio)
            if streak[1] >= self.patience and (name, direction) not in self._hinted:
                self._hinted.add((name, direction))
                mean = 10 ** (streak[2] / streak[1])
                bound = self.high if direction > 0 else self.low
                due[direction].append((abs(math.log10(mean / bound)), name, mean))
        parts: list[str] = []
        for direction, bound, advice in (
            (1, self.high, "the learning rate may be too high for {them} (about 1e-3 is usual)"),
            # A tiny ratio is a tiny lr or a tiny gradient: a converged task reads the same as a starved layer.
            (
                -1,
                self.low,
                "{they} barely train{s}: the learning rate may be too low for {them}, or the gradient has become"
                " small (a task already fitted, vanishing gradients, or a model that a too-high rate has collapsed)",
            ),
        ):
            found = sorted(due[direction], key=lambda item: -item[0])
            if not found:
                continue
            one = len(found) == 1
            named = ", ".join(f"'{name}' {_scientific(mean)}" for _, name, mean in found[: self.max_named])
            rest = len(found) - self.max_named
            more = f" and {rest} more" if rest > 0 else ""
            words = {"them": "it" if one else "them", "they": "it" if one else "they", "s": "s" if one else ""}
            side = "above" if direction > 0 else "below"
            parts.append(
                f"{side} {_scientific(bound, digits=0)} over the last {self.patience} logs for {len(found)}"
                f" layer{'' if one else 's'}: {named}{more}; {advice.format(**words)}"
            )
        return ["update/weight ratio " + "; and ".join(parts)] if parts else []

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {
            "version": _STATE_VERSION,
            "streaks": {name: list(s) for name, s in self._streaks.items()},
            "from_zero": sorted(self._from_zero),
            "peak_lr": self._peak_lr,
            "hinted": sorted([name, direction] for name, direction in self._hinted),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"UpdateRatioHints: unknown state version {state.get('version')!r}")
        # An older state's streaks carry two more entries: whether the streak was hinted about, and a recovery count.
        streaks = {str(name): [float(v) for v in s] for name, s in state["streaks"].items()}
        self._streaks = {name: s[:3] for name, s in streaks.items()}
        self._from_zero = {str(name) for name in state.get("from_zero", ())}  # absent from older checkpoints
        self._peak_lr = float(state.get("peak_lr", 0.0))  # likewise
        hinted = {(str(name), int(direction)) for name, direction in state.get("hinted", ())}  # likewise
        self._hinted = hinted | {(name, int(s[0])) for name, s in streaks.items() if len(s) > 3 and s[3]}


#: Optimizers whose step moves each weight by about the learning rate, whatever the gradient's size (Adam's first step
#: is exactly ``lr * sign(g)``). Not LAMB-style optimizers (their rate is relative to the weights) nor Adafactor.
_PER_WEIGHT_STEP = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.SparseAdam,
)

#: The rate, as a multiple of the typical weight's size, above which an Adam-type optimizer gets a hint at the start
#: of training. A user trial's Adam runs (two small transformers, an LSTM, a CNN; seed 0) trained best at 0.09-0.2x;
#: at 0.4-0.6x one of three ended 35% worse (two within 1%), at 1.4-6x all three 9-30% worse or at chance, and with
#: GradGuard the two that were not at chance ran as unguarded, with no exploding gradient to act on.
STEP_SIZE_HIGH = 0.3


class StepSize(NamedTuple):
    """What :func:`adaptive_step_ratio` measured: the median of each weight tensor's rate over its root-mean-square,
    the median root-mean-square, how many tensors were measured, and the tensor with the highest ratio."""

    ratio: float
    rms: float
    tensors: int
    worst: str
    worst_ratio: float


def adaptive_step_ratio(
    optimizer: torch.optim.Optimizer, rates: Sequence[float | None], names: Mapping[int, str] | None = None
) -> StepSize | None:
    """How large an Adam-type optimizer's steps are against the weights it trains, before the first step.

    Adam and its kin move each weight by about the learning rate per step, so a rate near the weights' own typical
    size (their root-mean-square) rewrites the initialization in the first few steps, and a run can train far worse
    than at a lower rate without an exploding gradient. For each trainable weight tensor of two or more dimensions
    that is not all zero (biases, norms' scales and zero-initialised layers such as LoRA's ``B`` grow from their own
    start), the ratio of its param group's rate to its root-mean-square; their median says how the rate sits against
    the model.
    Reads the weights once (one device-to-host copy): meant for the start of training, not for every step.

    Args:
        optimizer: the optimizer (a wrapper is looked through to the optimizer it steps).
        rates: each param group's rate to judge (the schedule's peak or base rate), ``None`` to leave a group out.
        names: parameter names by ``id(param)``, for :attr:`StepSize.worst` (default: the tensor's shape).

    Returns:
        The measure, or ``None`` for an optimizer that is not Adam-type, or with no such tensor.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
        >>> size = adaptive_step_ratio(torch.optim.Adam(net.parameters(), lr=0.1), [0.1])
        >>> size.tensors, size.ratio > STEP_SIZE_HIGH
        (2, True)
        >>> adaptive_step_ratio(torch.optim.SGD(net.parameters(), lr=0.1), [0.1]) is None
        True
    """
    if not isinstance(unwrap_optimizer(optimizer), _PER_WEIGHT_STEP):
        return None
    params: list[Tensor] = []
    tensor_rates: list[float] = []
    for group, rate in zip(optimizer.param_groups, rates):
        if rate is None or not math.isfinite(rate) or rate <= 0:
            continue
        for p in group["params"]:
            # Frozen weights are not stepped; sharded ones would need a collective; uninitialized ones (lazy modules)
            # have no size yet, and empty ones (a soft prompt of 0 tokens) none at all.
            # (The lazy check first: an uninitialized parameter raises on `dim()`.)
            if (
                p.requires_grad
                and not isinstance(p, nn.parameter.UninitializedParameter)
                and p.dim() >= 2
                and not _is_sharded(p)
                and p.numel() > 0
            ):
                params.append(p)
                tensor_rates.append(float(rate))
    if not params:
        return None
    norms, order = _norms([p.detach() for p in params], 2.0, params[0].device)
    rows = []
    for norm, i in zip(norms.tolist(), order):
        rms = norm / math.sqrt(params[i].numel())
        if rms > 0 and math.isfinite(rms):
            rows.append((tensor_rates[i] / rms, rms, i))
    if not rows:
        return None
    ratio = float(np.median([r[0] for r in rows]))
    rms = float(np.median([r[1] for r in rows]))
    top, _, worst = max(rows)
    label = names.get(id(params[worst])) if names is not None else None
    return StepSize(ratio, rms, len(rows), label or f"a {tuple(params[worst].shape)} tensor", top)


def _scientific(value: float, digits: int = 1) -> str:
    """``3.1e-2`` rather than Python's ``3.1e-02`` (``1e-2`` with ``digits=0``)."""
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# ---------------------------------------------------------------------- zero fraction


class ZeroFraction:
    """Per-layer fraction of exactly-zero gradient entries: dead ReLUs, masked tokens, unused embedding rows.

    The non-zero entries are counted with ``_foreach_norm(grads, 0)`` (one call per device and dtype; on CUDA that
    norm order runs tensor by tensor inside the call) and folded into layers with one ``index_add``. A sparse gradient
    counts its unstored entries as zeros. Nothing is copied to the host. Call it on logging steps only, on the loss
    gradient: before regularizers add their terms (an L2 term makes every entry non-zero).

    Args:
        index: the layers (e.g. ``build_layer_index(model)``, or the part of it one optimizer holds).
        distributed_sum: sum the counts over all ranks (gradients sharded by FSDP2); ``None`` decides from the
            gradients (``DTensor`` -> sum).

    Raises:
        ValueError: ``index`` is not a :class:`~lightning_gradguard.layers.LayerIndex` with a layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard import build_layer_index
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> model(torch.randn(4, 2)).sum().backward()
        >>> model[0].weight.grad[0].zero_()  # 2 of the layer's 6 gradient entries
        tensor([0., 0.])
        >>> ZeroFraction(build_layer_index(model)).compute()
        tensor([0.3333, 0.0000])
    """

    def __init__(self, index: LayerIndex, distributed_sum: bool | None = None) -> None:
        self.index = _check_index(index)
        self.distributed_sum = _check_distributed_sum(distributed_sum)
        self._ids = _LayerIds(self.index)

    def compute(self) -> Tensor:
        """The zero fraction of the gradients now in ``.grad``.

        Returns:
            ``[L]`` fp32 on the device of the first gradient: exactly-zero entries over all entries, per layer; NaN
            for a layer without gradients or with a non-finite entry.
        """
        positions: list[int] = []
        values: list[Tensor] = []
        numels: list[int] = []
        first: Tensor | None = None
        for i, p in enumerate(self.index.params):
            g = p.grad
            if g is None:
                continue
            first = g if first is None else first
            local = _local(g)
            positions.append(i)
            numels.append(local.numel())  # a sparse tensor's numel is its dense size
            dense = _dense(local)
            # A complex entry is zero when its modulus is; torch's 0-"norm" of a complex tensor warns that it casts.
            values.append(dense.abs() if dense.is_complex() else dense)
        num_layers = self.index.num_layers
        if first is None:
            device = self.index.params[0].device if self.index.params else torch.device("cpu")
            return torch.full((num_layers,), math.nan, device=device)
        device = values[0].device
        with torch.no_grad():
            nonzero, order = _norms(values, 0.0, device)
            # A NaN entry is not zero, so a non-finite gradient would read as dense: such a layer gets NaN instead.
            largest, _ = _norms(values, math.inf, device)
            ids, counts = self._ids.get(positions, order, device, numels)
            totals = torch.zeros(3 * num_layers, dtype=torch.float32, device=device)
            bad = (~torch.isfinite(largest)).float()
            totals.index_add_(
                0, torch.cat([ids, ids + num_layers, ids + 2 * num_layers]), torch.cat([nonzero, counts, bad])
            )
            if self.distributed_sum is None:
                self.distributed_sum = _is_sharded(first)
            _all_reduce_if(self.distributed_sum, totals)
            nonzero_sum, count_sum, bad_sum = totals.split(num_layers)
            fraction = 1.0 - nonzero_sum / count_sum
            return torch.where((count_sum > 0) & (bad_sum == 0), fraction, torch.full_like(fraction, math.nan))


# ---------------------------------------------------------------------- activation-gradient norms


class FlowPoint(NamedTuple):
    """One layer of a gradient-flow-through-depth picture (see :meth:`ActivationGradients.flow`).

    Attributes:
        depth: the layer's position in the order its outputs were computed in the forward pass (0: the first).
        name: the layer's name.
        log10_norm: ``log10 ‖∂L/∂y‖`` of its output ``y``.

    Example:
        >>> FlowPoint(depth=0, name="encoder.0", log10_norm=-2.5).log10_norm
        -2.5
    """

    depth: int
    name: str
    log10_norm: float


class ActivationGradients:
    """Per-layer norm of the gradient of the loss with respect to the layer's output, ``‖∂L/∂y‖``.

    Where parameter-gradient norms say how much each layer learns, these say how much signal reaches each depth of
    the network in the backward pass; a norm that shrinks by orders of magnitude from the output towards the input is
    vanishing gradient flow, one that grows is exploding.

    While armed, a forward hook on each watched module puts a gradient hook on each tensor of the module's output
    (an LSTM's output sequence and its ``(h_n, c_n)``, the values of a dict), except an input passed through, a 0-d
    auxiliary loss, and an output computed from another one (``y[:, -1]`` beside ``y``, looked for a few autograd
    nodes back); each backward through one adds the squared norm of its gradient, so outputs the loss reads in any
    combination, several forward calls (weight sharing, recurrent cells) and the micro-batches of gradient
    accumulation add up to the norm over everything the step saw. Under
    16-bit AMP the gradients flowing backward are multiplied by the loss scale: pass it to :meth:`disarm`, or, where
    the scale may change between the backward passes of one measurement (several optimizers, each stepping and
    updating the GradScaler before the next backward), a function that reads it to :meth:`arm`. Constructing the
    object registers nothing, and :meth:`disarm` removes every hook: arm it for logging steps only.

    A ``torch.autograd.grad`` call of the training step's own (a WGAN-GP gradient penalty, an input saliency) runs the
    hooks too, with the gradient of another output than the loss (the penalty's ``D(x).sum()`` read 8.0 where the
    loss's gradient was 0.125). Mark the loss's backward passes with :meth:`backward_began` and
    :meth:`backward_ended`: once a pass is marked, the measurement keeps only marked passes (GradGuard marks
    Lightning's). Several marked passes for one measurement (a manual-optimization SAM's two, micro-batches) add up
    as root-sum-squares.

    Modules that run under ``torch.compile`` are skipped (hooks added after compilation are not seen by the compiled
    code), as are names that are not modules (a parameter set on the root module); :attr:`skipped` says which and why.
    The norms are those of this process's activations, of this process's loss.

    Args:
        module: the model.
        names: the modules to watch, by their plain-model name (``LayerIndex.names``); ``None``: every module that
            directly owns trainable parameters (the layers of ``build_layer_index(module)``).

    Raises:
        ValueError: ``module`` is not an ``nn.Module`` or ``names`` is not a sequence of str.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> grads = ActivationGradients(net)
        >>> grads.names
        ['0', '2']
        >>> grads.arm()
        >>> net(torch.randn(16, 4)).pow(2).mean().backward()
        >>> norms = grads.disarm()  # [2] fp32 on the outputs' device
        >>> bool((norms > 0).all())
        True
        >>> [point.name for point in grads.flow(norms.tolist())]
        ['0', '2']
    """

    #: The reason :attr:`skipped` gives for a module that runs under ``torch.compile``.
    COMPILED = "runs under torch.compile"

    def __init__(self, module: nn.Module, names: Sequence[str] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be an nn.Module, got {module!r}")
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"`names` must be a sequence of module names (str) or None, got {names!r}")
        wanted = list(names) if names is not None else build_layer_index(module).names
        sites: dict[str, ModuleSite] = {}
        for site in module_sites(module):
            sites.setdefault(site.name, site)
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        self._modules: list[nn.Module] = []
        for name in wanted:
            found = sites.get(name)
            if found is None:
                self.skipped[name] = "not a module of the model"
            elif found.compiled:
                self.skipped[name] = self.COMPILED
            elif name not in self.names:
                self.names.append(name)
                self._modules.append(found.module)
        self._armed = False
        self._generation = 0
        self._handles: list[RemovableHandle] = []
        self._lock = threading.Lock()  # backward hooks may run on the autograd engine's device threads
        self._scale_of: Callable[[], Tensor | float | None] | None = None
        self._found: list[tuple[int, Tensor, bool]] = []  # (module, norm of one output gradient, in a marked pass)
        self._in_marked = False  # between backward_began() and backward_ended()
        self._marked = False  # a pass was marked since arm()
        self._order: list[int] = []  # modules in the order their outputs were computed
        self._seen: set[int] = set()
        self.last_order: list[int] = []

    @property
    def armed(self) -> bool:
        """Whether the hooks are registered."""
        return self._armed

    def backward_began(self) -> None:
        """Mark the start of a backward pass of the loss (``loss.backward()``): once a pass is marked, the
        measurement since :meth:`arm` keeps only marked passes (a ``torch.autograd.grad`` call of the model's own,
        before or after, is left out)."""
        self._in_marked = True
        self._marked = True

    def backward_ended(self) -> None:
        """Mark the end of the backward pass :meth:`backward_began` marked."""
        self._in_marked = False

    def arm(self, grad_scale: Callable[[], Tensor | float | None] | None = None) -> None:
        """Register the forward hooks and start a fresh measurement (a no-op when already armed).

        Args:
            grad_scale: a function returning the factor the backward pass's gradients are multiplied by now (e.g.
                ``lambda: scaler._scale``), read at each output gradient: each backward's norms are divided by the
                scale it ran with. ``None``: pass the scale to :meth:`disarm`, if any.
        """
        if grad_scale is not None and not callable(grad_scale):
            raise ValueError(
                f"`grad_scale` must be a function returning the current scale, or None, got {grad_scale!r}"
            )
        if self._armed:
            return
        self._scale_of = grad_scale
        self._armed = True
        self._generation += 1
        self._found, self._order, self._seen = [], [], set()
        self._marked = self._in_marked
        for position, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._forward_hook(position, self._generation)))

    def _forward_hook(self, position: int, generation: int) -> Any:
        # Plain closures, not bound methods: deep-copying an armed model must not deep-copy this object.
        def on_grad(grad: Tensor) -> None:
            if generation != self._generation or not self._armed:
                return  # a backward through a graph built while armed, after disarm: not this measurement
            with torch.no_grad():
                dense = _dense(grad)
                norm = torch.linalg.vector_norm(dense, dtype=torch.float32 if dense.dtype in _LOW_PRECISION else None)
                scale = self._scale_of() if self._scale_of is not None else None
                if scale is not None:  # divided now: a GradScaler updates its scale in place after its step
                    norm = norm.float() / (scale.to(norm.device) if isinstance(scale, Tensor) else float(scale))
            with self._lock:
                self._found.append((position, norm, self._in_marked))

        def on_output(module: nn.Module, args: object, output: object) -> None:
            if in_function_transform():
                return  # per-sample gradients (`vmap(grad(...))`): its outputs are not the step's and cannot leave
            # The order of the first forward, gradient or not: reentrant activation checkpointing runs it under
            # no_grad and recomputes each block during the backward, last block first (the flow came out reversed).
            if position not in self._seen:
                self._seen.add(position)
                self._order.append(position)
            outputs = _measured_outputs(output, args)
            for y in outputs:
                y.register_hook(on_grad)

        return on_output

    def disarm(self, grad_scale: float | Tensor | None = None) -> Tensor | None:
        """Remove the hooks and return the activation-gradient norms since :meth:`arm`.

        Call it after the last backward pass of the step (``on_before_optimizer_step``), before GradScaler updates
        its scale.

        Args:
            grad_scale: the factor the backward pass's gradients were multiplied by (a GradScaler's scale in effect
                during the backward; under 16-bit AMP every backward is scaled, fused optimizer or not).

        Returns:
            ``[len(names)]`` fp32 on the device of the first output gradient: ``‖∂L/∂y‖`` per watched module (the
            square root of the sum of squares over every output and micro-batch), NaN for a module whose output got
            no gradient. ``None`` when not armed.
        """
        scale = _check_scale("grad_scale", grad_scale)
        if scale is not None and self._scale_of is not None and self._armed:
            raise ValueError("`grad_scale`: the scale was given to arm() already, as a function; leave it out here")
        if not self._armed:
            return None
        self._armed = False
        self._generation += 1  # gradient hooks still attached to live graphs go quiet
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with self._lock:
            found = [(m, norm) for m, norm, marked in self._found if marked or not self._marked]
            self._found = []
        self.last_order = list(self._order)
        count = len(self.names)
        if not found:
            device = next((p.device for m in self._modules for p in m.parameters()), torch.device("cpu"))
            return torch.full((count,), math.nan, device=device)
        device = found[0][1].device
        with torch.no_grad():
            norms = torch.stack([norm if norm.device == device else norm.to(device) for _, norm in found])
            squares = torch.zeros(count, dtype=torch.float32, device=device)
            squares.index_add_(0, _upload([m for m, _ in found], torch.long, device), norms.float().square())
            present = {m for m, _ in found}
            mask = _upload([i in present for i in range(count)], torch.bool, device)
            result = torch.where(mask, squares.sqrt(), torch.full_like(squares, math.nan))
            if scale is not None:
                result = result / scale
        return result

    def flow(self, norms: Sequence[float] | np.ndarray) -> list[FlowPoint]:
        """The gradient flow through depth of the last measured step, for a picture: one point per layer whose
        output got a finite, non-zero gradient norm, in forward order.

        Args:
            norms: the values :meth:`disarm` returned, as host floats.
        """
        if len(norms) != len(self.names):
            raise ValueError(f"`norms` must have one entry per watched module ({len(self.names)}), got {len(norms)}")
        points: list[FlowPoint] = []
        for position in self.last_order:
            value = float(norms[position])
            if math.isfinite(value) and value > 0.0:
                points.append(FlowPoint(len(points), self.names[position], math.log10(value)))
        return points


def _output_tensors(output: object) -> list[Tensor]:
    """The tensors of a module's output, each once: the tensor itself, those inside tuples, lists and dict values
    (an LSTM's ``(output, (h_n, c_n))``), the data of a PackedSequence. Only the first occurrence of a tensor
    returned twice counts: its gradient is one."""
    found: dict[int, Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, Tensor):
            found.setdefault(id(value), value)
            return
        data = getattr(value, "data", None)  # PackedSequence
        if isinstance(data, Tensor) and hasattr(value, "batch_sizes"):
            found.setdefault(id(data), data)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)

    visit(output)
    return list(found.values())


#: How many autograd nodes back an output is looked through for another output it was computed from.
_DERIVED_DEPTH = 4


def _measured_outputs(output: object, args: object) -> list[Tensor]:
    """The outputs whose gradients make up a module's ``‖∂L/∂y‖``: each tensor that requires a gradient, except an
    input passed through (its gradient is the layer before's), a 0-d one (an auxiliary loss returned beside ``y``: its
    gradient is the loss weight), and one computed from another output within a few autograd nodes (``y[:, -1]`` or
    ``y.mean(1)`` beside ``y``: ``y``'s hook already receives the gradient that flows through it)."""
    inputs = {id(t) for t in _output_tensors(args)}
    outputs = [y for y in _output_tensors(output) if y.requires_grad and y.dim() > 0 and id(y) not in inputs]
    if len(outputs) < 2:
        return outputs
    nodes = {y.grad_fn for y in outputs if y.grad_fn is not None}
    return [y for y in outputs if not _reaches(y.grad_fn, nodes - {y.grad_fn})]


def _reaches(node: Any, targets: set[Any]) -> bool:
    """Whether ``targets`` holds an autograd node within :data:`_DERIVED_DEPTH` steps back from ``node``."""
    frontier = [node] if node is not None and targets else []
    for _ in range(_DERIVED_DEPTH):
        frontier = [n for f in frontier for n, _ in f.next_functions if n is not None]
        if any(n in targets for n in frontier):
            return True
    return False


# ---------------------------------------------------------------------- gradient noise scale


def squared_grad_norm(params: Iterable[Tensor], scale: float | Tensor | None = None) -> Tensor:
    """``‖g / scale‖²`` over the gradients now in the ``.grad`` of ``params`` (``None`` gradients left out), as a 0-d
    fp32 tensor: one ``_foreach_norm`` per device and dtype, no host-device sync.

    The two inputs of :class:`NoiseScale` on an accumulation step: after the first micro-batch's backward, with
    ``scale = loss_scale / accumulate_grad_batches`` (Lightning divides each micro-batch's loss by the number of
    micro-batches, and 16-bit AMP multiplies it by the loss scale), and in ``on_before_optimizer_step`` with the
    scale the gradients still carry (a fused optimizer's loss scale under 16-bit AMP, else ``None``).

    Args:
        params: the parameters.
        scale: divide the gradients by this (a number > 0 or a tensor).

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> squared_grad_norm([p], scale=0.5)
        tensor(100.)
    """
    checked = _check_scale("scale", scale)
    grads = [p.grad for p in params if p.grad is not None]
    with torch.no_grad():
        norm = total_norm(grads)
        if checked is not None:
            norm = norm / checked
        return norm.square()


class LocalGradNorm:
    """The squared norm of the gradient one backward pass computes on this process, before DDP averages it.

    Under DDP without gradient accumulation the averaged gradient replaces the local one during the backward pass;
    a gradient hook on each parameter sees the local gradient first. Armed for one backward (from
    ``on_train_batch_start`` to ``on_after_backward`` of a logging step), it gives the small-batch input of
    :class:`NoiseScale`: one norm per parameter inside the backward, logging steps only. Constructing the object
    registers nothing; :meth:`disarm` removes every hook. Not for FSDP2 (sharded parameters).

    Args:
        params: the parameters (those that do not require a gradient are left out).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> local = LocalGradNorm([w])
        >>> local.arm()
        >>> (3 * w).sum().backward()
        >>> round(float(local.disarm()), 3)  # ‖(3, 3)‖², from a 0-d fp32 tensor on the gradients' device
        18.0
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        if isinstance(params, (Tensor, nn.Module)) or not isinstance(params, Iterable):
            raise ValueError(f"`params` must be an iterable of parameters (`model.parameters()`), got {params!r}")
        given = list(params)
        if not all(isinstance(p, Tensor) for p in given):
            raise ValueError("`params` must hold tensors (`model.parameters()`)")
        self.params = [p for p in given if p.requires_grad]
        self._handles: list[RemovableHandle] = []
        self._norms: list[Tensor] = []
        self._lock = threading.Lock()
        self._armed = False

    @property
    def armed(self) -> bool:
        """Whether the hooks are registered."""
        return self._armed

    def arm(self) -> None:
        """Register a gradient hook on every parameter (a no-op when already armed)."""
        if self._armed:
            return
        self._armed = True
        self._norms = []
        for p in self.params:
            self._handles.append(p.register_hook(self._on_grad))

    def _on_grad(self, grad: Tensor) -> None:
        with torch.no_grad():
            dense = _dense(grad)
            norm = torch.linalg.vector_norm(dense, dtype=torch.float32 if dense.dtype in _LOW_PRECISION else None)
        with self._lock:
            self._norms.append(norm)

    def disarm(self, scale: float | Tensor | None = None) -> Tensor | None:
        """Remove the hooks; ``‖g / scale‖²`` of the gradients seen since :meth:`arm` (0-d fp32), ``None`` when not
        armed or no gradient came.

        Args:
            scale: divide the gradients by this (see :func:`squared_grad_norm`).
        """
        checked = _check_scale("scale", scale)
        if not self._armed:
            return None
        self._armed = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with self._lock:
            norms, self._norms = self._norms, []
        if not norms:
            return None
        device = norms[0].device
        with torch.no_grad():
            total = torch.stack([n.to(device).float() for n in norms]).square().sum()
            return total if checked is None else total / (checked * checked)


def noise_scale_source(accumulate_grad_batches: int, world_size: int) -> str | None:
    """Which pair of batch sizes the noise scale can compare without an extra backward pass.

    Args:
        accumulate_grad_batches: micro-batches per optimizer step, ``>= 1``.
        world_size: processes that average their gradients (DDP), ``>= 1``.

    Returns:
        ``"accumulation"``: the first micro-batch of a step against the whole (accumulated, and under DDP averaged)
        step, read with :func:`squared_grad_norm` after the first backward; ``"distributed"``: this process's
        gradient against the average over processes, read with :class:`LocalGradNorm`; ``None``: neither (log
        :data:`NOISE_SCALE_NOTE` once, and nothing else).

    Example:
        >>> noise_scale_source(4, 1), noise_scale_source(1, 8), noise_scale_source(1, 1)
        ('accumulation', 'distributed', None)
    """
    check_int("accumulate_grad_batches", accumulate_grad_batches, low=1)
    check_int("world_size", world_size, low=1)
    if accumulate_grad_batches > 1:
        return "accumulation"
    return "distributed" if world_size > 1 else None


class NoiseScale:
    """The simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` of McCandlish et al. 2018 (arXiv 1812.06162),
    from the squared gradient norms at two batch sizes, without an extra backward pass.

    ``Σ`` is the per-example gradient covariance and ``G`` the true gradient. With ``|G_small|²`` measured on a batch
    of ``B_small`` examples and ``|G_big|²`` on ``B_big > B_small`` (appendix A.1), the unbiased estimates

    * ``|G|² ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)``,
    * ``tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)``

    are each smoothed by an exponential moving average, as in the paper, and ``B_simple = EMA(tr Σ) / EMA(|G|²)``: the
    batch size around which a larger batch stops paying off. One observation per logging step; host side (feed it the
    floats of the logging step's copy to the host). A non-finite input is no observation.

    Args:
        beta: the EMA's decay per observation (per logging step), in ``[0, 1)``. Single observations are noisy when
            ``B_big`` is not well above ``B_simple``: at 0.95 (a window of about 20 logs) a linear regression with
            ``B_simple ≈ 40`` and ``B_big = 64`` came within 1.5x of the truth on 16 of 16 seeds after 200 steps, at
            0.9 within 2x.

    Raises:
        ValueError: ``beta`` is out of range.

    Example:
        >>> noise = NoiseScale(beta=0.0)
        >>> noise.update(small_sq_norm=3.0, big_sq_norm=1.5, small_batch=8, big_batch=32)  # |G|² = 1, tr Σ = 16
        16.0
    """

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=True)
        self._trace = 0.0  # EMAs, not bias-corrected (the corrections cancel in the ratio)
        self._grad_sq = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Observations so far."""
        return self._count

    @property
    def trace_sigma(self) -> float:
        """The smoothed ``tr(Σ)`` estimate (bias-corrected), NaN before the first observation."""
        return self._trace / self._correction() if self._count else math.nan

    @property
    def grad_sq_norm(self) -> float:
        """The smoothed ``|G|²`` estimate (bias-corrected), NaN before the first observation."""
        return self._grad_sq / self._correction() if self._count else math.nan

    @property
    def value(self) -> float:
        """``B_simple``; NaN before the first observation or while either estimate is not positive (early, the
        unbiased estimates can be negative)."""
        if not self._count or self._trace <= 0.0 or self._grad_sq <= 0.0:
            return math.nan
        return self._trace / self._grad_sq

    def _correction(self) -> float:
        return 1.0 - self.beta**self._count

    def update(
        self,
        small_sq_norm: float | Tensor,
        big_sq_norm: float | Tensor,
        small_batch: float,
        big_batch: float,
    ) -> float:
        """Fold in one pair of measurements and return :attr:`value`.

        Args:
            small_sq_norm: ``|G_small|²``, the squared norm of a gradient averaged over ``small_batch`` examples (a
                tensor is read with ``float``: a host-device sync).
            big_sq_norm: ``|G_big|²``, averaged over ``big_batch`` examples.
            small_batch: ``B_small > 0``.
            big_batch: ``B_big > B_small``.
        """
        b_small = check_number("small_batch", small_batch, low=0.0)
        b_big = check_number("big_batch", big_batch, low=b_small, low_name="small_batch")
        small, big = float(small_sq_norm), float(big_sq_norm)
        if not (math.isfinite(small) and math.isfinite(big)):
            return self.value
        grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
        self._grad_sq = self.beta * self._grad_sq + (1.0 - self.beta) * grad_sq
        self._trace = self.beta * self._trace + (1.0 - self.beta) * trace
        self._count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {"version": _STATE_VERSION, "trace": self._trace, "grad_sq": self._grad_sq, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"NoiseScale: unknown state version {state.get('version')!r}")
        self._trace, self._grad_sq, self._count = float(state["trace"]), float(state["grad_sq"]), int(state["count"])


# ---------------------------------------------------------------------- per-epoch summaries


class EpochSummary:
    """Per-epoch summaries from the figures of each logging step: total-norm percentiles, the largest total norm and
    the events of the epoch (host side, a few floats per log).

    The percentiles are over the total norms of the epoch's logging steps; the maximum is over the per-window maxima
    when given (a spike between two logs is not lost), and the events are the growth of cumulative counters over the
    epoch (counters that grew after the epoch's last log count in the next epoch). Past ``2 * max_samples`` logs in one
    epoch (a run of one endless epoch), every other kept norm is dropped and only every second log is kept from then
    on, and so on: the percentiles come from logs spread evenly over the epoch, and the state stays bounded.

    Args:
        percentiles: the percentiles to report, each in ``(0, 100]``.
        max_samples: half the most total norms kept per epoch for the percentiles, ``>= 1``.

    Raises:
        ValueError: a percentile is out of range.

    Example:
        >>> summary = EpochSummary()
        >>> for step in range(1, 101):
        ...     summary.update(float(step), events={"exploding": step // 50})
        >>> epoch = summary.end_epoch()
        >>> epoch["gradguard/epoch/total_norm_p50"], epoch["gradguard/epoch/total_norm_max"]
        (50.5, 100.0)
        >>> epoch["gradguard/epoch/events/exploding"]
        2.0
    """

    def __init__(self, percentiles: Sequence[float] = (50, 90, 99), max_samples: int = 4096) -> None:
        if isinstance(percentiles, str) or not isinstance(percentiles, Sequence) or not percentiles:
            raise ValueError(f"`percentiles` must be a non-empty sequence of numbers in (0, 100], got {percentiles!r}")
        self.percentiles = [
            check_number("percentiles", q, low=0.0, high=100.0, high_inclusive=True) for q in percentiles
        ]
        self.max_samples = check_int("max_samples", max_samples, low=1)
        self._norms: list[float] = []
        self._logs = 0  # the epoch's logs with a finite total norm
        self._stride = 1  # a norm is kept from every ``_stride``-th of them
        self._max = -math.inf
        self._events: dict[str, float] = {}
        self._baseline: dict[str, float] = {}

    def update(
        self,
        total_norm: float,
        total_norm_max: float | None = None,
        events: Mapping[str, float] | None = None,
    ) -> None:
        """Fold in one logging step.

        Args:
            total_norm: the step's total gradient norm (a non-finite one counts for no percentile).
            total_norm_max: the largest total norm since the previous log, when known.
            events: cumulative event counts by kind (as in ``gradguard/events/<kind>``).
        """
        value = float(total_norm)
        if math.isfinite(value):
            if self._logs % self._stride == 0:
                self._norms.append(value)
                while len(self._norms) >= 2 * self.max_samples:  # once, but for a larger loaded state
                    self._norms = self._norms[::2]
                    self._stride *= 2
            self._logs += 1
            self._max = max(self._max, value)
        if total_norm_max is not None and math.isfinite(float(total_norm_max)):
            self._max = max(self._max, float(total_norm_max))
        if events:
            self._events.update({str(kind): float(count) for kind, count in events.items()})

    def end_epoch(self, prefix: str = "gradguard/epoch/") -> dict[str, float]:
        """The epoch's summary as ``{tag: value}``, and start the next epoch. Empty when no step was logged.

        Tags: ``total_norm_p<q>`` per percentile, ``total_norm_max``, ``events/<kind>`` and ``logs`` (the number of
        logging steps with a finite total norm: the percentiles' sample), after ``prefix``.
        """
        metrics: dict[str, float] = {}
        if self._norms:
            values = np.percentile(np.asarray(self._norms, dtype=np.float64), self.percentiles)
            for q, value in zip(self.percentiles, values):
                metrics[f"{prefix}total_norm_p{q:g}"] = float(value)
        if math.isfinite(self._max):
            metrics[f"{prefix}total_norm_max"] = self._max
        for kind, count in self._events.items():
            metrics[f"{prefix}events/{kind}"] = count - self._baseline.get(kind, 0.0)
        if metrics:
            metrics[f"{prefix}logs"] = float(self._logs)
        self._baseline.update(self._events)
        self._norms, self._max, self._events = [], -math.inf, {}
        self._logs, self._stride = 0, 1
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {
            "version": _STATE_VERSION,
            "norms": list(self._norms),
            "logs": self._logs,
            "stride": self._stride,
            "max": self._max,
            "events": dict(self._events),
            "baseline": dict(self._baseline),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"EpochSummary: unknown state version {state.get('version')!r}")
        self._norms = [float(v) for v in state["norms"]]
        # Saved before the norms were thinned: every log's norm was kept.
        self._logs = int(state.get("logs", len(self._norms)))
        self._stride = int(state.get("stride", 1))
        self._max = float(state["max"])
        self._events = {str(k): float(v) for k, v in state["events"].items()}
        self._baseline = {str(k): float(v) for k, v in state["baseline"].items()}
