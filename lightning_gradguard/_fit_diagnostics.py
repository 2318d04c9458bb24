"""The logging-step diagnostics of :mod:`lightning_gradguard.diagnostics`, wired into GradGuard's hooks.

:class:`FitDiagnostics` owns, for one fit, which measures run, when they are armed and disarmed, how their values come
back from the batched host copy of a logging step, and their warnings and checkpointed state. The measures themselves
are Lightning-free (:mod:`lightning_gradguard.diagnostics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_gradguard._compat import foreach_norm
from lightning_gradguard._lightning import batch_size, grad_scaler, lightning_types, loss_scale, rank_zero_warn
from lightning_gradguard.diagnostics import (
    NOISE_SCALE_MANUAL_NOTE,
    NOISE_SCALE_NOTE,
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
from lightning_gradguard.engine import EngineSnapshot, GuardEngine
from lightning_gradguard.layers import LayerIndex

if TYPE_CHECKING:
    from lightning_gradguard.callback import GradGuard

__all__ = ["FitDiagnostics"]

_T = TypeVar("_T")


def _zero_layers(index: LayerIndex) -> frozenset[str]:
    """The layers with trainable parameters, all of them exactly zero (LoRA's ``B``, a ReZero gate): one fused norm
    and one copy to the host, once per fit."""
    sites = [
        (layer, param.detach())
        for layer, param in zip(index.layer_of_param, index.params)
        # Trainable floating-point values only: not a lazy module's before its first batch, nor a frozen integer
        # (a step counter kept as a parameter)
        if param.requires_grad
        and (param.is_floating_point() or param.is_complex())
        and not isinstance(param, torch.nn.parameter.UninitializedParameter)
    ]
    if not sites or any(hasattr(param, "placements") for _, param in sites):  # FSDP2 shards: no ratio is measured
        return frozenset()
    device = sites[0][1].device
    norms = foreach_norm([param for _, param in sites])
    if any(norm.device != device for norm in norms):  # a model spread over devices
        norms = [norm.to(device) for norm in norms]
    nonzero = (torch.stack(norms) > 0).tolist()
    trained = {layer for layer, _ in sites}
    moving = {layer for (layer, _), flag in zip(sites, nonzero) if flag}
    return frozenset(index.names[layer] for layer in trained - moving)


def _accumulation(trainer: pl.Trainer) -> int:
    """The micro-batches per optimizer step now (a ``GradientAccumulationScheduler`` changes it per epoch)."""
    return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)


def _closed_epoch(state: dict[str, Any]) -> dict[str, Any]:
    """An :class:`EpochSummary` state with its epoch ended (its logs dropped, its event counts the next baseline)."""
    summary = EpochSummary()
    summary.load_state_dict(state)
    summary.end_epoch()
    return summary.state_dict()


#: The share of an optimizer's trainable entries a rate must step to be the reference of `_rate_scales`.
_PEAK_SHARE = 0.01


def _rate_scales(index: LayerIndex, groups: list[dict[str, Any]]) -> list[float] | None:
    """Per layer of ``index``, the highest rate of the param groups its parameters are in, over the highest rate that
    steps at least ``_PEAK_SHARE`` of the trainable entries (``None`` for one rate, or rates that are not numbers): a
    layer-wise decay of the rate slows the deep layers on purpose. Host floats, read on logging steps only."""
    rates: dict[int, float] = {}
    trained: dict[float, int] = {}  # per rate, the trainable entries it steps
    for group in groups:
        if not isinstance(group.get("lr"), (float, int, Tensor)):
            continue
        rate = float(group["lr"])
        for p in group["params"]:
            rates[id(p)] = rate
            if p.requires_grad and not isinstance(p, torch.nn.parameter.UninitializedParameter):
                trained[rate] = trained.get(rate, 0) + p.numel()
    # The highest rate that trains a share of the weights: a one-entry temperature at 100x the others' rate made
    # every other layer's rate "below a tenth" (a review), and so did a group of frozen weights.
    total = sum(trained.values())
    peak = max((rate for rate, size in trained.items() if size >= _PEAK_SHARE * total), default=0.0)
    if peak <= 0.0 or len(set(rates.values())) < 2:
        return None
    scales = [0.0] * index.num_layers
    for param, layer in zip(index.params, index.layer_of_param):
        scales[layer] = max(scales[layer], rates.get(id(param), peak) / peak)
    return scales


class FitDiagnostics:
    """The logging-step-only diagnostics of :mod:`lightning_gradguard.diagnostics`, wired into GradGuard's hooks.

    Everything here runs on logging steps only: every entry point is reached behind a test of the logging step (or a
    flag set on one), so a quiet step runs no op and has no hook.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.on: frozenset[str] = frozenset()
        self.act: ActivationGradients | None = None
        self.local: LocalGradNorm | None = None
        self.noise: NoiseScale | None = None
        self.source: str | None = None
        self.params: list[Tensor] = []
        self.accumulate = 1
        self.world_size = 1
        self.ratios: dict[int, UpdateRatio] = {}
        self.zeros: dict[int, ZeroFraction] = {}
        self.hints: dict[int, UpdateRatioHints] = {}
        self.from_zero: frozenset[str] = frozenset()  # layers whose weights were all zero when the fit started
        self.epochs: dict[int, EpochSummary] = {}
        self.loaded: dict[str, Any] = {}
        self.noted = False
        self.noted_noise = False  # said once: the noise scale's estimate of |G|^2 is not positive yet
        self.first_backward_pending = False
        self.pending_size: int | None = None
        self.sizes: list[int] = []
        self.small: Tensor | None = None
        self.big: Tensor | None = None
        self.act_norms: Tensor | None = None
        # Several optimizers (manual optimization, a GAN): each step's backward reaches other layers, so the
        # activation gradients are read at the end of the batch, not at its first optimizer step.
        self.act_until_batch_end = False
        self.scaler: Any = None
        self.zero: dict[int, Tensor] = {}
        self.pending_ratio: set[int] = set()
        self.step_armed: int | None = None
        self.epoch_logged = False

    # -------------------------------------------------------------- setup and state
    def start_fit(
        self, guard: GradGuard, trainer: pl.Trainer, pl_module: pl.LightningModule, index: LayerIndex
    ) -> None:
        self.disarm()
        self.on = guard._diag_on
        self.enabled = bool(self.on)
        self.ratios, self.zeros = {}, {}
        self.act = ActivationGradients(pl_module, index.names) if "act_grad" in self.on else None
        if self.act is not None:
            compiled = [name for name, why in self.act.skipped.items() if why == ActivationGradients.COMPILED]
            if compiled and trainer.loggers:
                named = ", ".join(f"'{name}'" for name in compiled[:3]) + (", ..." if len(compiled) > 3 else "")
                rank_zero_info(
                    f"GradGuard: activation gradients (gradguard/act_grad) are not measured for {len(compiled)}"
                    f" layer{'s' if len(compiled) != 1 else ''} that run under torch.compile ({named}): compiled code"
                    " does not call the hooks that measure them."
                )
            if not self.act.names:  # nothing to measure: no chart for it either
                if guard.group_fn is not None and trainer.loggers:
                    # A user trial's `group_fn=lambda n: n` lost the chart without a word.
                    rank_zero_info(
                        "GradGuard: activation gradients (gradguard/act_grad) are measured at the outputs of the"
                        " modules that layers are named after, and no layer name from `group_fn` names a module of"
                        " the model: none is measured. Return module names (e.g. 'encoder.layer1') to keep them."
                    )
                self.act = None
                self.on = self.on - {"act_grad"}
                self.enabled = bool(self.on)
        if any(hasattr(p, "placements") for p in index.params):
            # FSDP2: the per-layer sums and the gradient norms would each add a collective to the logging step.
            self.on = self.on - {"update_ratio", "zero_fraction", "noise_scale"}
            self.enabled = bool(self.on)
        self.from_zero = _zero_layers(index) if "update_ratio" in self.on else frozenset()
        self.accumulate = _accumulation(trainer)
        self.world_size = int(getattr(trainer, "world_size", 1) or 1)
        self.source, self.local, self.noise, self.params = None, None, None, []
        if "noise_scale" in self.on:
            automatic = getattr(pl_module, "automatic_optimization", True)
            # A GradientAccumulationScheduler changes the accumulation at epoch starts: the source is chosen anew at
            # each logging step, and the noise scale is measured on the steps that have a second batch size.
            kind = lightning_types("callbacks.GradientAccumulationScheduler")
            schedulers: list[Any] = [c for c in trainer.callbacks if isinstance(c, kind)]  # type: ignore[attr-defined]
            scheduled = max([self.accumulate] + [max(s.scheduling.values(), default=1) for s in schedulers])
            single = automatic and len(trainer.optimizers) == 1
            if not single or noise_scale_source(scheduled, self.world_size) is None:
                if not self.noted and trainer.loggers:  # without a logger no diagnostic is logged anywhere
                    self.noted = True
                    # Accumulation is refused under manual optimization: advise it only where it would help.
                    rank_zero_info(NOISE_SCALE_NOTE if single else NOISE_SCALE_MANUAL_NOTE)
            else:
                self.params = [p for p in index.params if p.requires_grad]
                self.noise = NoiseScale()
                if self.world_size > 1:
                    self.local = LocalGradNorm(self.params)
                if "noise" in self.loaded:
                    self.noise.load_state_dict(self.loaded.pop("noise"))

    def follow_modules(self, pl_module: pl.LightningModule, index: LayerIndex) -> None:
        """Measure the activation gradients of the layers of ``index`` (modules created since the fit began included);
        call it between measurements."""
        if self.act is not None and not self.act.armed:
            self.act = ActivationGradients(pl_module, index.names)

    def forget(self, key: int) -> None:
        """A new engine for optimizer ``key``: its per-layer measures follow its new layers."""
        self.ratios.pop(key, None)
        self.zeros.pop(key, None)

    def _hints(self, key: int) -> UpdateRatioHints:
        new = key not in self.hints
        hints = self._per_optimizer(self.hints, "hints", key, UpdateRatioHints)
        if new:
            hints.start_from_zero(self.from_zero)
        return hints

    def _epoch(self, key: int) -> EpochSummary:
        return self._per_optimizer(self.epochs, "epoch", key, EpochSummary)

    def _per_optimizer(self, store: dict[int, _T], section: str, key: int, factory: Callable[[], _T]) -> _T:
        """``store[key]``, created on first use and given the state a checkpoint saved for it (``section``)."""
        item = store.get(key)
        if item is None:
            item = store[key] = factory()
            saved = self.loaded.get(section, {}).pop(str(key), None)
            if saved is not None:
                item.load_state_dict(saved)  # type: ignore[attr-defined]
        return item

    def state_dict(self, last_batch: bool = False) -> dict[str, Any]:
        """The host-side state; ``last_batch``: saved on the last batch of an epoch."""
        hints = {str(k): h.state_dict() for k, h in self.hints.items()}
        epochs = {str(k): e.state_dict() for k, e in self.epochs.items()}
        for name, target in (("hints", hints), ("epoch", epochs)):
            for k, v in self.loaded.get(name, {}).items():  # not yet claimed: survives a save
                target.setdefault(k, v)
        state: dict[str, Any] = {"version": 1, "hints": hints, "epoch": epochs}
        if last_batch:
            state["last_batch"] = True
        noise = self.noise.state_dict() if self.noise is not None else self.loaded.get("noise")
        if noise is not None:
            state["noise"] = noise
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if state.get("version") != 1:
            raise ValueError(f"Unsupported GradGuard diagnostics state version {state.get('version')!r}")
        self.loaded = {"hints": dict(state.get("hints", {})), "epoch": dict(state.get("epoch", {}))}
        if state.get("last_batch", False):  # absent: saved before it was kept
            # Saved on its epoch's last batch, before that epoch's end: Lightning resumes from there without running
            # the end (or, with a plain loader, replays the data as the same epoch). The epoch's logs are closed now,
            # unwritten, rather than counted again in the next summary, and a state saved again before they are
            # claimed (no log since the resume) holds them closed.
            self.loaded["epoch"] = {key: _closed_epoch(saved) for key, saved in self.loaded["epoch"].items()}
        if state.get("noise") is not None:
            self.loaded["noise"] = state["noise"]
        self.hints, self.epochs = {}, {}
        if self.noise is not None and "noise" in self.loaded:
            self.noise.load_state_dict(self.loaded.pop("noise"))

    # -------------------------------------------------------------- the step (logging steps only)
    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        if self.act is not None:
            self.scaler = grad_scaler(trainer)
            self.act_until_batch_end = len(trainer.optimizers) > 1
            # With several optimizers each steps (and updates the GradScaler) before the next backward of the batch:
            # each backward's norms are divided by its own scale.
            self.act.arm(grad_scale=self._scale if self.act_until_batch_end else None)
        if self.noise is None:
            return
        if self.step_armed != trainer.global_step:  # the first micro-batch of the logging step
            self.step_armed = trainer.global_step
            self.sizes = []
            self.small = self.big = None
            self.accumulate = _accumulation(trainer)
            self.source = noise_scale_source(self.accumulate, self.world_size)
            self.first_backward_pending = self.source is not None
            if self.source == "distributed" and self.local is not None:
                self.local.arm()
        # The reader the short-batch rule uses; a batch without a batch dimension: no noise scale this step.
        self.pending_size = batch_size(batch) or 0

    def _scale(self) -> Tensor | None:
        return loss_scale(self.scaler)

    def backward_began(self) -> None:
        """Lightning's backward pass of the loss begins: activation gradients count from it, and not from a
        ``torch.autograd.grad`` of the model's own (a gradient penalty)."""
        if self.act is not None and self.act.armed:
            self.act.backward_began()

    def backward_ended(self) -> None:
        if self.act is not None:
            self.act.backward_ended()

    def after_backward(self, trainer: pl.Trainer) -> None:
        """A micro-batch of the logging step reached its backward: count its examples (a ``training_step`` that
        returned ``None`` has none and adds nothing to the step's gradient), and measure the first one."""
        if self.pending_size is not None:
            self.sizes.append(self.pending_size)
            self.pending_size = None
        if not self.first_backward_pending:
            return
        self.first_backward_pending = False
        scaler = grad_scaler(trainer)
        scaled_by = loss_scale(scaler)
        if self.source == "accumulation":
            scale: Any = (scaled_by if scaled_by is not None else 1.0) / self.accumulate
            self.small = squared_grad_norm(self.params, scale=scale)
        elif self.source == "distributed" and self.local is not None:
            self.small = self.local.disarm(scale=scaled_by)

    def before_engine_step(
        self, guard: GradGuard, key: int, engine: GuardEngine, scaler: Any, grad_scale: Tensor | None
    ) -> None:
        if "zero_fraction" in self.on:
            zeros = self.zeros.get(key)
            if zeros is None:
                zeros = self.zeros[key] = ZeroFraction(engine.index)
            self.zero[key] = zeros.compute()
        if self.noise is not None and self.small is not None and self.big is None:
            self.big = squared_grad_norm(self.params, scale=grad_scale)
        if self.act is not None and self.act.armed and not self.act_until_batch_end:
            self.act_norms = self.act.disarm(grad_scale=loss_scale(scaler))

    def after_engine_step(self, key: int, engine: GuardEngine) -> None:
        if "update_ratio" in self.on:
            ratio = self.ratios.get(key)
            if ratio is None:
                ratio = self.ratios[key] = UpdateRatio(engine.index)
            ratio.before_step()
            self.pending_ratio.add(key)

    # -------------------------------------------------------------- logging
    def collect(self, guard: GradGuard) -> list[tuple[str, Tensor]]:
        """The device tensors of this logging step, for the one batched copy (and drop every measurement)."""
        parts: list[tuple[str, Tensor]] = []
        if not self.enabled:
            return parts
        for key in sorted(self.pending_ratio):
            ratio = self.ratios[key].after_step()
            if ratio is not None:
                parts.append((f"ratio/{key}", ratio.float()))
        self.pending_ratio.clear()
        for key, zero in sorted(self.zero.items()):
            parts.append((f"zero/{key}", zero.float()))
        self.zero = {}
        if self.act is not None and self.act.armed:
            if self.act_until_batch_end:  # every optimizer's backward of the batch has run
                self.act_norms = self.act.disarm()
            else:  # no optimizer step came (e.g. an accumulation tail)
                self.act.disarm()
        if self.act_norms is not None:
            parts.append(("act", self.act_norms.float()))
            self.act_norms = None
        if self.small is not None and self.big is not None:
            parts.append(("noise", torch.stack([self.small.float().reshape(()), self.big.float().reshape(())])))
        self.small = self.big = None
        return parts

    def report(
        self,
        guard: GradGuard,
        trainer: pl.Trainer,
        values: dict[str, Any],
        snapshots: list[tuple[int, EngineSnapshot]],
        metrics: dict[str, float],
        step: int,
    ) -> dict[str, float]:
        """Fold the host values into ``metrics`` (all loggers) and return the per-layer scalars (TensorBoard)."""
        layer_scalars: dict[str, float] = {}
        if not self.enabled:
            return layer_scalars
        for key, engine in sorted(guard._states.items()):
            prefix = guard._prefix(key)
            names = engine.index.names
            ratio = values.get(f"ratio/{key}")
            if ratio is not None and len(ratio) == len(names):
                for name, value in zip(names, ratio):
                    if math.isfinite(value):
                        layer_scalars[f"{prefix}update_ratio/{name}"] = float(value)
                # At most one message per log (UpdateRatioHints groups the layers and directions itself).
                where = f", optimizer {key}" if len(guard._states) > 1 else ""
                lr, _ = guard._step_rates.get(key, (None, None))  # the rate of the step the ratios measure
                # A torch scheduler keeps the rate it scales as `initial_lr`: the logs alone may all fall in troughs.
                groups = trainer.optimizers[key].param_groups if key < len(trainer.optimizers) else [{}]
                base = groups[0].get("initial_lr")
                hints = self._hints(key)
                for message in hints.update(
                    names,
                    ratio,
                    lr=None if lr is None else float(lr),
                    base_lr=float(base) if isinstance(base, (float, int, Tensor)) else None,
                    rate_scales=_rate_scales(engine.index, groups),
                ):
                    rank_zero_warn(f"GradGuard: {message} (step {step}{where}).", category=UserWarning)
            zero = values.get(f"zero/{key}")
            if zero is not None and len(zero) == len(names):
                for name, value in zip(names, zero):
                    if math.isfinite(value):
                        layer_scalars[f"{prefix}zero_fraction/{name}"] = float(value)
        act = values.get("act")
        if act is not None and self.act is not None:
            # In forward order (the order the outputs were computed), which `gradguard report` reads as input to
            # output: a module owning a parameter of its own (a temperature, a LayerScale gain) is defined before its
            # children but computes its output after them.
            seen = self.act.last_order
            unseen = set(range(len(self.act.names))) - set(seen)
            for i in [*seen, *sorted(unseen)]:
                if math.isfinite(act[i]):
                    layer_scalars[f"gradguard/act_grad/{self.act.names[i]}"] = float(act[i])
        noise = values.get("noise")
        if noise is not None and self.noise is not None:
            small, big = float(noise[0]), float(noise[1])
            sizes = self.sizes
            if sizes:
                # Lightning divides every micro-batch's loss by the accumulation, also when a training_step returned
                # None: the step's gradient is then the mean over the micro-batches that ran, times this.
                big *= (self.accumulate / len(sizes)) ** 2
            # The mean of the micro-batches' mean gradients, equally weighted, is as noisy as one batch of the count
            # squared over the sum of reciprocal sizes: the plain sum when all are equal, but a short last batch (32
            # and 4 examples: 14, not 36) counts for less. A window no less noisy than its first batch measures nothing.
            b_small = sizes[0] if sizes else 0
            b_big = len(sizes) ** 2 / sum(1.0 / b for b in sizes) * self.world_size if sizes and min(sizes) > 0 else 0.0
            if math.isfinite(small) and math.isfinite(big) and 0 < b_small < b_big:
                value = self.noise.update(small, big, b_small, b_big)
                if math.isfinite(value):
                    metrics["gradguard/noise_scale"] = value
                elif not self.noted_noise and trainer.loggers:
                    # Not left to an empty chart: at this batch size the gradient is still mostly noise.
                    self.noted_noise = True
                    rank_zero_info(
                        "GradGuard: the gradient noise scale (gradguard/noise_scale) is not logged yet: its estimate"
                        " of the true gradient's squared norm is not positive, so the gradient measured on"
                        f" {b_big:.4g} examples is still mostly noise. It is logged from the first logging step whose"
                        " smoothed estimates are both positive."
                    )
        if "epoch" in self.on:
            for key, snap in snapshots:
                if not snap.present.any():
                    continue  # no step in the window: its last norm is an earlier window's (or the record's initial 0)
                self._epoch(key).update(
                    snap.total_norm,
                    snap.total_norm_max if snap.total_norm_max > -math.inf else None,
                    events={kind: float(count) for kind, count in snap.counts.items()},
                )
        return layer_scalars

    def end_epoch(self, guard: GradGuard) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if "epoch" not in self.on:
            return metrics
        for key, epoch in sorted(self.epochs.items()):
            metrics.update(epoch.end_epoch(prefix=f"{guard._prefix(key)}epoch/"))
        return metrics

    def disarm(self) -> None:
        """Remove every hook and drop every pending measurement (end of fit, or an exception)."""
        if self.act is not None and self.act.armed:
            self.act.disarm()
        if self.local is not None and self.local.armed:
            self.local.disarm()
        for ratio in self.ratios.values():
            ratio.discard()
        self.pending_ratio.clear()
        self.zero = {}
        self.small = self.big = self.act_norms = None
        self.first_backward_pending = False
        self.pending_size = None
        self.step_armed = None
