"""GradGuard: the Lightning callback that runs the gradient pipeline in the right hooks."""

from __future__ import annotations

import copy
import functools
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_gradguard._host import HostFlags
from lightning_gradguard._validation import check_bool, check_int
from lightning_gradguard.clip import Clipper, ZClip
from lightning_gradguard.detect import ExplodingDetector, VanishingDetector
from lightning_gradguard.layers import LayerIndex, build_layer_index
from lightning_gradguard.lr import LRGuard
from lightning_gradguard.regularize import Orthogonal, Regularizer
from lightning_gradguard.saturation import SaturationMonitor
from lightning_gradguard.stats import GradStats, StepStats

__all__ = ["GradGuard", "GradientExplosionError", "NonFiniteGradientError", "VanishingGradientError"]

log = logging.getLogger(__name__)

EVENT_KINDS = ("exploding", "vanishing", "nonfinite", "skipped", "overflow", "lr_reduced", "clipped")
_NONFINITE_MODES = ("skip", "zero", "raise", "warn")
_EVENT_MODES = ("warn", "raise", "ignore")
# Per-optimizer scalar accumulator slots (device vector), filled every step and read on logging steps.
_S_LAST, _S_MAX, _S_MIN, _S_THRESH, _S_COEF, _S_EMA, _S_LOW, _S_HIGH = range(8)
_NUM_SCALARS = 8
# Device-side cumulative counters: exploding, vanishing, nonfinite, overflow, clipped steps.
_C_EXPL, _C_VAN, _C_NF, _C_OVF, _C_CLIP = range(5)
_NUM_COUNTS = 5


class GradientExplosionError(RuntimeError):
    """Raised by ``GradGuard(on_exploding="raise")``."""


class VanishingGradientError(RuntimeError):
    """Raised by ``GradGuard(on_vanishing="raise")``."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``GradGuard(on_nonfinite="raise")``."""


@dataclass
class _OptimizerState:
    """Everything GradGuard keeps for one optimizer."""

    index: LayerIndex
    engine: GradStats
    signature: tuple[tuple[int, int], ...]  # per param group: size and id of its first parameter
    clipper: Clipper | None
    exploding: ExplodingDetector | None
    vanishing: VanishingDetector | None
    last_total: Tensor  # 0-d, the last total norm
    extremes: Tensor  # [3] since the last log: max and min valid total norm, min clip coefficient
    consts: dict[str, Tensor]  # small device constants, made once (no host-to-device copy per step)
    layer_last: Tensor  # [L]
    layer_present: Tensor  # [L] bool, seen a gradient since the last log
    counts: Tensor  # [4] cumulative device counters
    # Per layer, since the last log: first step of an event (-1 none) and the norm at that step.
    expl_step: Tensor
    expl_value: Tensor
    van_step: Tensor
    van_value: Tensor
    nf_step: Tensor
    pending: list[HostFlags] = field(default_factory=list)
    free: list[HostFlags] = field(default_factory=list)
    host_counts: dict[str, int] = field(default_factory=lambda: {"skipped": 0, "lr_reduced": 0})
    steps: int = 0
    steps_since_log: int = 0
    warned: set[tuple[str, str]] = field(default_factory=set)

    def event_counts(self, counts: Any) -> dict[str, int]:
        """Cumulative count of each event kind, from the device counters (as host values) and the host counters."""
        return {
            "exploding": int(counts[_C_EXPL]),
            "vanishing": int(counts[_C_VAN]),
            "nonfinite": int(counts[_C_NF]),
            "skipped": self.host_counts["skipped"],
            "overflow": int(counts[_C_OVF]),
            "lr_reduced": self.host_counts["lr_reduced"],
            "clipped": int(counts[_C_CLIP]),
        }

    @property
    def scalars(self) -> Tensor:
        """``[_NUM_SCALARS]``: last, max and min total norm, clip threshold, min clip coefficient, EMA band.

        Assembled on demand (logging steps): the step itself only keeps the running extremes.
        """
        device = self.last_total.device
        threshold = (
            self.clipper.last_threshold.to(device, torch.float32).reshape(1)
            if self.clipper is not None
            else self.consts["inf"]
        )
        band = self.exploding.band().to(device) if self.exploding is not None else self.consts["nan3"]
        return torch.cat(
            [
                self.last_total.reshape(1).float(),
                self.extremes[:2],
                threshold,
                self.extremes[2:],
                band,
            ]
        )


def _default(value: Any, factory: Callable[[], Any]) -> Any:
    return factory() if isinstance(value, str) and value == "default" else value


class GradGuard(Callback):
    r"""Watch every optimizer step's per-layer gradients; clip, skip and back off the learning rate when they go wrong.

    GradGuard runs in ``on_before_optimizer_step``, where gradients are complete (after accumulation) and unscaled
    (after AMP's ``unscale_``). Per optimizer step, in order: add the regularizers' gradient terms, measure the
    per-layer norms in one pass, run the detectors, handle non-finite gradients, clip, apply the LR guard, and fold
    the figures into device-side accumulators. Nothing is copied to the host on steps that do not log (with the one
    documented exception of ``on_nonfinite="skip"`` outside 16-bit AMP: one boolean per step, as a GradScaler does).
    On logging steps one batched copy feeds every scalar, warning and picture.

    Args:
        clip: the clipper (:class:`ZClip`, :class:`AutoClip`, :class:`AGC`, :class:`NormClip`); ``"default"`` is
            ``ZClip()``, ``None`` disables clipping.
        lr_guard: the learning-rate guard; ``"default"`` is ``LRGuard()``, ``None`` disables it.
        regularizers: gradient-term regularizers (:class:`L1`, :class:`L2`, :class:`Orthogonal`).
        on_nonfinite: what to do with a step whose gradients hold inf/NaN: ``"skip"`` the optimizer step (parameters
            and optimizer state untouched), ``"zero"`` the non-finite entries, ``"raise"`` an error naming the layers,
            or ``"warn"`` and let it through. Under 16-bit AMP with a GradScaler the scaler already skips such steps;
            they are counted as ``overflow`` and not handled twice.
        on_exploding: ``"warn"``, ``"raise"`` (:class:`GradientExplosionError`) or ``"ignore"``.
        on_vanishing: ``"warn"``, ``"raise"`` (:class:`VanishingGradientError`) or ``"ignore"``.
        exploding: the exploding-gradient detector; ``"default"`` is ``ExplodingDetector()``, ``None`` disables it.
        vanishing: the vanishing-gradient detector; ``"default"`` is ``VanishingDetector()``, ``None`` disables it.
        log_every_n_steps: optimizer steps between logs; ``None`` takes the Trainer's ``log_every_n_steps``.
        group_depth: group parameters into layers by the first ``group_depth`` components of the module name.
        group_fn: a callable mapping a parameter name to a layer name (not settable from YAML).
        log_layers: write one scalar per layer (TensorBoard only).
        saturation: on logging steps, measure how saturated each activation module is (named in vanishing warnings).
        image_every_n_steps: steps between gradient-flow pictures (TensorBoard only); ``None`` disables them.
        histogram_every_n_steps: steps between gradient histograms (TensorBoard only); ``None`` disables them.
        max_warnings: warnings per kind per logging step; the rest are counted in one summary line.
        clip_exploding: when a clipper is set, also clip a step that the exploding detector flags down to the lowest
            of the detector's boundaries (the top of its band, ``max_ratio`` times its average, its ceiling). A safety
            net for the first steps of a run, while an adaptive clipper is still warming up (ZClip does not clip
            during its warm-up); folded into the clipper's coefficient, no extra pass.

    Raises:
        ValueError: for an argument outside its allowed values.

    Example:
        >>> import lightning as L
        >>> from lightning_gradguard import GradGuard, ZClip, LRGuard
        >>> guard = GradGuard(clip=ZClip(z_thresh=2.5), lr_guard=LRGuard(factor=0.5))
        >>> trainer = L.Trainer(callbacks=[guard], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        clip: Clipper | None | Literal["default"] = "default",
        lr_guard: LRGuard | None | Literal["default"] = "default",
        regularizers: list[Regularizer] | None = None,
        on_nonfinite: Literal["skip", "zero", "raise", "warn"] = "skip",
        on_exploding: Literal["warn", "raise", "ignore"] = "warn",
        on_vanishing: Literal["warn", "raise", "ignore"] = "warn",
        exploding: ExplodingDetector | None | Literal["default"] = "default",
        vanishing: VanishingDetector | None | Literal["default"] = "default",
        log_every_n_steps: int | None = None,
        group_depth: int | None = None,
        group_fn: Callable[[str], str] | None = None,
        log_layers: bool = True,
        saturation: bool = True,
        image_every_n_steps: int | None = 5000,
        histogram_every_n_steps: int | None = None,
        max_warnings: int = 5,
        clip_exploding: bool = True,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("on_nonfinite", on_nonfinite, _NONFINITE_MODES),
            ("on_exploding", on_exploding, _EVENT_MODES),
            ("on_vanishing", on_vanishing, _EVENT_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        for name, value in (
            ("log_every_n_steps", log_every_n_steps),
            ("image_every_n_steps", image_every_n_steps),
            ("histogram_every_n_steps", histogram_every_n_steps),
            ("group_depth", group_depth),
        ):
            if value is not None:
                check_int(name, value, low=1)
        max_warnings = check_int("max_warnings", max_warnings, low=0)
        for name, flag in (("log_layers", log_layers), ("saturation", saturation), ("clip_exploding", clip_exploding)):
            check_bool(name, flag)
        if group_fn is not None and not callable(group_fn):
            raise ValueError(f"`group_fn` must be a callable or None, got {group_fn!r}")
        for name, value, cls in (
            ("clip", clip, Clipper),
            ("lr_guard", lr_guard, LRGuard),
            ("exploding", exploding, ExplodingDetector),
            ("vanishing", vanishing, VanishingDetector),
        ):
            if value is not None and value != "default" and not isinstance(value, cls):
                raise ValueError(f"`{name}` must be a {cls.__name__}, None or 'default', got {value!r}")
        if regularizers is not None and not isinstance(regularizers, (list, tuple)):
            raise ValueError(f"`regularizers` must be a list of Regularizer instances or None, got {regularizers!r}")
        regularizers = list(regularizers or [])
        for r in regularizers:
            if not isinstance(r, Regularizer):
                raise ValueError(f"`regularizers` must hold Regularizer instances, got {r!r}")
        names = [r.name for r in regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"`regularizers` need distinct names (pass name=...), got {names}")

        self.clip: Clipper | None = _default(clip, ZClip)
        self.lr_guard: LRGuard | None = _default(lr_guard, LRGuard)
        self.regularizers = regularizers
        self.on_nonfinite = on_nonfinite
        self.on_exploding = on_exploding
        self.on_vanishing = on_vanishing
        self.exploding: ExplodingDetector | None = _default(exploding, ExplodingDetector)
        self.vanishing: VanishingDetector | None = _default(vanishing, VanishingDetector)
        self.log_every_n_steps = log_every_n_steps
        self.group_depth = group_depth
        self.group_fn = group_fn
        self.log_layers = log_layers
        self.saturation = saturation
        self.image_every_n_steps = image_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.max_warnings = max_warnings
        self.clip_exploding = clip_exploding

        self._states: dict[int, _OptimizerState] = {}
        self._opt_keys: dict[int, int] = {}  # id(optimizer) -> optimizer index
        self._loaded: dict[str, Any] | None = None
        self._next_log_step = 0
        self._model_index: LayerIndex | None = None
        self._board: Any = None
        self._board_checked = False
        self._board_trainer: weakref.ref[pl.Trainer] | None = None  # the Trainer whose logger the board writes to
        self._saturation: SaturationMonitor | None = None
        self._sat_armed = False
        self._lr_hooks: dict[int, Any] = {}
        self._event_rows: list[dict[str, Any]] = []
        self._hist_samples: dict[str, Tensor] = {}
        self._last_hist_step = 0
        self._last_saturation: dict[str, float] = {}

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clip=type(self.clip).__name__ if self.clip is not None else None,
            lr_guard=self.lr_guard is not None,
            regularizers=[r.name for r in self.regularizers],
            group_depth=self.group_depth,
        )

    def state_dict(self) -> dict[str, Any]:
        optimizers = {}
        for key, st in self._states.items():
            optimizers[str(key)] = {
                "clip": st.clipper.state_dict() if st.clipper is not None else None,
                "exploding": st.exploding.state_dict() if st.exploding is not None else None,
                "vanishing": st.vanishing.state_dict() if st.vanishing is not None else None,
                "counts": st.counts.clone(),
                "host_counts": dict(st.host_counts),
                "steps": st.steps,
                "layers": list(st.index.names),
            }
        if self._loaded is not None:  # state not yet claimed by an optimizer survives a save
            for key, value in self._loaded.get("optimizers", {}).items():
                optimizers.setdefault(key, value)
        return {
            "version": 1,
            "optimizers": optimizers,
            "lr_guard": self.lr_guard.state_dict() if self.lr_guard is not None else None,
            "regularizers": {r.name: r.state_dict() for r in self.regularizers},
            "next_log_step": self._next_log_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"Unsupported GradGuard state version {state_dict.get('version')!r}")
        self._loaded = {"optimizers": dict(state_dict.get("optimizers", {}))}
        if self.lr_guard is not None and state_dict.get("lr_guard") is not None:
            self.lr_guard.load_state_dict(state_dict["lr_guard"])
        for r in self.regularizers:
            if r.name in state_dict.get("regularizers", {}):
                r.load_state_dict(state_dict["regularizers"][r.name])
        self._next_log_step = int(state_dict.get("next_log_step", 0))
        # Already-built optimizer states take their part right away (load after on_fit_start: FSDP/DeepSpeed order).
        for key, st in self._states.items():
            self._restore_optimizer_state(key, st)

    def _restore_optimizer_state(self, key: int, st: _OptimizerState) -> None:
        if self._loaded is None:
            return
        saved = self._loaded["optimizers"].pop(str(key), None)
        if saved is None:
            return
        if saved.get("layers") != list(st.index.names):
            rank_zero_warn(
                f"GradGuard: the checkpoint's layers for optimizer {key} differ from the model's; detector and"
                " clipper state is not restored."
            )
            return
        device = st.counts.device
        if st.clipper is not None and saved.get("clip") is not None:
            st.clipper.load_state_dict(_to_device(saved["clip"], device))
        if st.exploding is not None and saved.get("exploding") is not None:
            st.exploding.load_state_dict(_to_device(saved["exploding"], device))
        if st.vanishing is not None and saved.get("vanishing") is not None:
            st.vanishing.load_state_dict(_to_device(saved["vanishing"], device))
        st.counts.copy_(saved["counts"].to(device))
        st.host_counts.update(saved.get("host_counts", {}))
        st.steps = int(saved.get("steps", 0))

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        # By class, so that subclasses are caught too; the name test covers integrations outside Lightning.
        strategy = type(trainer.strategy).__name__
        if isinstance(trainer.strategy, DeepSpeedStrategy) or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"GradGuard does not support DeepSpeed (`{strategy}`): DeepSpeed keeps gradients inside its engine"
                " (`param.grad` is None) and calls `on_before_optimizer_step` on every micro-batch, so per-layer norms"
                " cannot be read there. Use DDP or FSDP2 (`ModelParallelStrategy`)."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise MisconfigurationException(
                f"GradGuard does not support `FSDPStrategy` (FSDP1, got `{strategy}`): its flattened, sharded"
                " parameters do not map to layers. Use `ModelParallelStrategy` (FSDP2, `fully_shard`), which GradGuard"
                " supports."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._opt_keys.clear()  # a new fit brings new optimizer objects
        index = build_layer_index(pl_module, self.group_depth, self.group_fn, include_frozen=True)
        if not index.params:
            raise MisconfigurationException(
                "GradGuard found no parameters in the LightningModule: there are no gradients to watch."
            )
        if not any(p.requires_grad for p in index.params):
            raise MisconfigurationException(
                "GradGuard found no trainable parameters in the LightningModule (all have `requires_grad=False`):"
                " there are no gradients to watch. Unfreeze some parameters or remove GradGuard."
            )
        scaler = _grad_scaler(trainer)
        if (
            scaler is not None
            and self.clip is not None
            and self.clip.needs_params
            and any(getattr(opt, "_step_supports_amp_scaling", False) for opt in trainer.optimizers)
        ):
            # AGC compares each unit's gradient with its weights; a fused optimizer unscales inside `step`, so here
            # the gradients still carry the loss scale and the ratio would be off by that factor.
            raise MisconfigurationException(
                f"GradGuard(clip={type(self.clip).__name__}(...)) cannot run under 16-bit AMP with a GradScaler and an"
                " optimizer that unscales inside `step` (a fused optimizer): the gradients are still scaled when they"
                " are compared with the weights. Use a non-fused optimizer, or ZClip, AutoClip or NormClip."
            )
        self._model_index = index
        if self.regularizers:
            for r in self.regularizers:
                r.bind(pl_module)
            sharded = any(hasattr(p, "placements") for p in index.params)
            if sharded and any(isinstance(r, Orthogonal) for r in self.regularizers):
                raise MisconfigurationException(
                    "GradGuard: the Orthogonal regularizer needs whole weight matrices (W^T W), but the parameters are"
                    " sharded DTensors (FSDP2). Use L1/L2 with FSDP2, or Orthogonal with DDP."
                )
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"GradGuard clips gradients and `Trainer(gradient_clip_val={trainer.gradient_clip_val})` clips them"
                " again after it: clipping happens twice. Set one of them."
            )
        if self.saturation:
            self._saturation = SaturationMonitor(pl_module)
        if self._next_log_step == 0:
            self._next_log_step = trainer.global_step + self._log_every(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every optimizer gets its state now, so tags and the dashboard know all of them from the first log.
        for optimizer in trainer.optimizers:
            key = self._optimizer_key(trainer, optimizer)
            self._state_for(trainer, optimizer, key)
            if self.lr_guard is not None and key not in self._lr_hooks:
                self._lr_hooks[key] = self.lr_guard.attach(optimizer, key)
        every = self._log_every(trainer)
        # Out of (global_step, global_step + every]: a stale value, or one left by an earlier fit of a Trainer that
        # ran further (the guard reused with a new Trainer, which starts at step 0).
        if not trainer.global_step < self._next_log_step <= trainer.global_step + every:
            self._next_log_step = (trainer.global_step // every + 1) * every

    def _log_every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps or 50), 1)

    def _optimizer_key(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        key = self._opt_keys.get(id(optimizer))
        if key is None:
            for i, opt in enumerate(trainer.optimizers):
                if opt is optimizer or getattr(opt, "_optimizer", None) is optimizer:
                    key = i
                    break
            else:
                key = len(trainer.optimizers) + len(self._opt_keys)
            self._opt_keys[id(optimizer)] = key
        return key

    def _state_for(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, key: int) -> _OptimizerState:
        # The first parameter's identity tells a new model (the guard reused for another fit) from the same one; the
        # state holds its parameters, so their ids cannot be reused while it lives.
        signature = tuple((len(g["params"]), id(g["params"][0]) if g["params"] else 0) for g in optimizer.param_groups)
        st = self._states.get(key)
        if st is not None and st.signature == signature:
            return st
        assert self._model_index is not None, "GradGuard.on_fit_start did not run"
        index = self._model_index.subset(p for g in optimizer.param_groups for p in g["params"])
        if not index.params:
            raise MisconfigurationException(
                f"GradGuard: optimizer {key} holds none of the LightningModule's parameters."
            )
        device = index.params[0].device
        layers = index.num_layers
        st = _OptimizerState(
            index=index,
            engine=GradStats(index.params, index.layer_of_param, layers),
            signature=signature,
            clipper=copy.deepcopy(self.clip),
            exploding=copy.deepcopy(self.exploding),
            vanishing=copy.deepcopy(self.vanishing),
            last_total=torch.zeros((), device=device),
            extremes=torch.tensor([-math.inf, math.inf, 1.0], device=device),
            consts={
                "extremes": torch.tensor([-math.inf, math.inf, 1.0], device=device),
                "is_max": torch.tensor([True, False, False], device=device),
                "gated": torch.tensor([True, True, False], device=device),  # move on valid steps only
                "one": torch.ones((), device=device),
                "zero": torch.zeros((), dtype=torch.int64, device=device),
                "false": torch.zeros((), dtype=torch.bool, device=device),
                "inf": torch.full((1,), math.inf, device=device),
                "nan3": torch.full((3,), math.nan, device=device),
                "counts_amp": torch.tensor([_C_EXPL, _C_VAN, _C_OVF, _C_CLIP], device=device),
                "counts": torch.tensor([_C_EXPL, _C_VAN, _C_NF, _C_CLIP], device=device),
            },
            layer_last=torch.zeros(layers, device=device),
            layer_present=torch.zeros(layers, dtype=torch.bool, device=device),
            counts=torch.zeros(_NUM_COUNTS, dtype=torch.int64, device=device),
            expl_step=torch.full((layers,), -1.0, device=device),
            expl_value=torch.zeros(layers, device=device),
            van_step=torch.full((layers,), -1.0, device=device),
            van_value=torch.zeros(layers, device=device),
            nf_step=torch.full((layers,), -1.0, device=device),
        )
        old = self._states.get(key)
        if old is not None:
            # A param group was added (fine-tuning schedule) or a new model came: keep the counters, restart
            # per-layer statistics.
            st.counts.copy_(old.counts)
            st.host_counts = old.host_counts
            st.steps = old.steps
        self._reset_since_log(st)
        self._restore_optimizer_state(key, st)
        self._states[key] = st
        return st

    @staticmethod
    def _reset_since_log(st: _OptimizerState) -> None:
        # "Last" values survive a log; extremes and counts restart.
        st.extremes = st.consts["extremes"].clone()
        st.layer_present.fill_(False)
        st.expl_step.fill_(-1.0)
        st.van_step.fill_(-1.0)
        st.nf_step.fill_(-1.0)
        st.steps_since_log = 0

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Activation hooks exist only for the forward passes that lead to a logging step.
        if self._saturation is not None and not self._sat_armed and trainer.global_step + 1 >= self._next_log_step:
            self._saturation.arm()
            self._sat_armed = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        key = self._optimizer_key(trainer, optimizer)
        st = self._state_for(trainer, optimizer, key)
        self._drain(trainer, st, key)

        scaler = _grad_scaler(trainer)
        grad_scale: Tensor | None = None
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) and scaler._scale is not None:
            # Fused optimizers unscale inside step(): the gradients here are still multiplied by the loss scale.
            grad_scale = scaler._scale
        for r in self.regularizers:
            r.add_grad_(grad_scale if grad_scale is not None else 1.0)

        stats = st.engine.compute(grad_scale=grad_scale)
        if not stats.grads:
            return
        valid = ~stats.nonfinite
        # Events are stamped with the step count *after* this optimizer step, the x-axis value of the logged scalars.
        step = float(trainer.global_step + 1)

        expl = None
        if st.exploding is not None:
            expl = st.exploding.update(stats.total_norm, stats.layer_norm, valid, stats.layer_present)
        van = st.vanishing.update(stats.layer_norm, valid, stats.layer_present) if st.vanishing else None

        skipped = False
        if scaler is None:
            skipped = self._handle_nonfinite(trainer, st, stats)

        coef = None
        if st.clipper is not None and not skipped:
            names = [st.index.param_names[i] for i in stats.param_indices] if st.clipper.needs_params else None
            owners = [st.index.owner_types[i] for i in stats.param_indices] if st.clipper.needs_params else None
            if st.clipper.needs_params and any(g.is_sparse for g in stats.grads):
                raise MisconfigurationException(
                    f"GradGuard(clip={type(st.clipper).__name__}(...)) cannot clip sparse gradients (e.g."
                    " `nn.Embedding(sparse=True)`): its units are rows of dense tensors. Use NormClip, ZClip or"
                    " AutoClip, which clip sparse gradients."
                )
            cap = expl.cap if (expl is not None and self.clip_exploding) else None
            coef = st.clipper.clip_grads_(
                stats.grads, stats.total_norm, valid, params=stats.params, names=names, owner_types=owners, cap=cap
            )

        # The LR multiplier is applied by the guard's own optimizer step pre/post hooks (see `LRGuard.attach`), so a
        # step that GradScaler skips never shows the lowered LR to a scheduler.
        self._record(st, stats, valid, expl, van, coef, step, scaler is not None)
        if self._histogram_due(trainer.global_step + 1):
            self._sample_histograms(st, stats)

    def _handle_nonfinite(self, trainer: pl.Trainer, st: _OptimizerState, stats: StepStats) -> bool:
        mode = self.on_nonfinite
        if mode == "zero":
            # One kernel per gradient, sync-free; only inf/NaN entries change.
            for g in stats.grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            return False
        if mode == "warn":
            return False  # reported from the host flags, at most a step late
        # "skip" and "raise" must decide before optimizer.step: the one documented host read per step.
        if not bool(stats.nonfinite):
            return False
        if mode == "raise":
            bad = [n for n, f in zip(st.index.names, stats.layer_nonfinite.tolist()) if f]
            raise NonFiniteGradientError(
                f"GradGuard: non-finite gradients at step {trainer.global_step + 1} in layer(s) {bad[:5]}"
                f"{' and more' if len(bad) > 5 else ''}."
            )
        for p in st.index.params:
            p.grad = None  # torch optimizers then leave the parameter and its state (moments, step) untouched
        st.host_counts["skipped"] += 1
        return True

    def _record(
        self,
        st: _OptimizerState,
        stats: StepStats,
        valid: Tensor,
        expl: Any,
        van: Any,
        coef: Tensor | None,
        step: float,
        under_scaler: bool,
    ) -> None:
        # Few, small ops: this runs every step. Values that are only "the latest" (threshold, EMA band) are read
        # from their owners on logging steps instead of being copied here.
        c = st.consts
        total = stats.total_norm
        st.last_total = total
        coef_now = st.clipper.last_coef if st.clipper is not None else c["one"]
        candidates = torch.stack([total, total, coef_now.to(total.device, torch.float32)])
        running = torch.where(
            c["is_max"], torch.maximum(st.extremes, candidates), torch.minimum(st.extremes, candidates)
        )
        st.extremes = torch.where(c["gated"] & ~valid, st.extremes, running)

        present = stats.layer_present
        ln = stats.layer_norm
        st.layer_last = torch.where(present, ln, st.layer_last)
        st.layer_present = st.layer_present | present

        expl_any = expl.any if expl is not None else c["false"]
        van_new = van.new if van is not None else None
        nonfinite = stats.nonfinite
        clipped = coef < 1.0 if coef is not None else c["zero"]
        van_count = van_new.sum() if van_new is not None else c["zero"]
        # ``stack`` promotes the bools to the int64 of the sum: no separate casts.
        st.counts.index_add_(
            0,
            c["counts_amp"] if under_scaler else c["counts"],
            torch.stack([expl_any, van_count, nonfinite, clipped]),
        )
        if expl is not None:
            # A total-norm explosion with no single layer to blame is filed under the largest layer.
            blame = expl.total & ~expl.layers.any() & (ln == ln.max())
            first = (expl.layers | blame) & (st.expl_step < 0)
            st.expl_step = torch.where(first, step, st.expl_step)
            st.expl_value = torch.where(first, ln, st.expl_value)
        if van_new is not None:
            first = van_new & (st.van_step < 0)
            st.van_step = torch.where(first, step, st.van_step)
            st.van_value = torch.where(first, ln, st.van_value)
        if not under_scaler:  # a GradScaler overflow is routine (scale calibration): counted, not warned about
            first_nf = stats.layer_nonfinite & (st.nf_step < 0)
            st.nf_step = torch.where(first_nf, step, st.nf_step)

        flags = torch.stack([expl_any, nonfinite, van_new.any() if van_new is not None else c["false"]]).float()
        buf = st.free.pop() if st.free else HostFlags.create(3, total.device)
        buf.fill(flags, int(step))
        st.pending.append(buf)
        st.steps += 1
        st.steps_since_log += 1

    def _drain(self, trainer: pl.Trainer, st: _OptimizerState, key: int) -> None:
        """Act on host flags that have landed: LR guard, adaptive regularizers, raise/warn decisions."""
        while st.pending and st.pending[0].ready():
            buf = st.pending.pop(0)
            exploding, nonfinite, vanishing = (bool(v) for v in buf.values)
            step = buf.step
            st.free.append(buf)
            # An AMP overflow is routine scale calibration: no observation at all, neither an explosion nor a calm
            # step. Without a GradScaler, one non-finite step is a bad batch (skipped, counted); the LR guard lowers
            # the rate only when they repeat (``LRGuard.nonfinite_patience``).
            if not (nonfinite and _grad_scaler(trainer) is not None):
                if self.lr_guard is not None and self.lr_guard.update(exploding, key, nonfinite=nonfinite):
                    st.host_counts["lr_reduced"] += 1
                for r in self.regularizers:
                    r.on_exploding(exploding)
            if exploding and self.on_exploding == "raise":
                raise GradientExplosionError(
                    f"GradGuard: exploding gradients at step {step} (optimizer {key}); see"
                    f" {self._layer_report(st, st.expl_step, st.expl_value)}."
                )
            if vanishing and self.on_vanishing == "raise":
                raise VanishingGradientError(
                    f"GradGuard: vanishing gradients at step {step} (optimizer {key}) in"
                    f" {self._layer_report(st, st.van_step, st.van_value)}."
                )
            if nonfinite and self.on_nonfinite == "warn" and _grad_scaler(trainer) is None:
                rank_zero_warn(
                    f"GradGuard: non-finite gradients at step {step} (optimizer {key}); the step was applied."
                )

    @staticmethod
    def _layer_report(st: _OptimizerState, steps: Tensor, values: Tensor) -> str:
        # Only reached when stopping training: a host read is fine here.
        rows = [(n, v) for n, s, v in zip(st.index.names, steps.tolist(), values.tolist()) if s >= 0]
        return ", ".join(f"{n!r} (norm {v:.3g})" for n, v in rows[:5]) or "the total norm"

    def _histogram_due(self, step: int) -> bool:
        every = self.histogram_every_n_steps
        return bool(every) and step >= self._next_log_step and step // every > self._last_hist_step // every  # type: ignore[operator]

    def _sample_histograms(self, st: _OptimizerState, stats: StepStats) -> None:
        from lightning_gradguard.stats import _dense, _local
        from lightning_gradguard.tensorboard import block_name, sample_gradients

        # Histograms take plain tensors: a DTensor's local shard, a sparse gradient's stored values.
        named = [
            (st.index.names[st.index.layer_of_param[i]], _dense(_local(g)))
            for i, g in zip(stats.param_indices, stats.grads)
        ]
        # Blocks are the first two name components ("encoder.3.linear" -> "encoder.3").
        self._hist_samples.update(sample_gradients(named, functools.partial(block_name, depth=2)))

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for key, st in self._states.items():
            self._drain(trainer, st, key)
        if trainer.global_step >= self._next_log_step and any(st.steps_since_log for st in self._states.values()):
            self._flush(trainer, pl_module)
            every = self._log_every(trainer)
            self._next_log_step = (trainer.global_step // every + 1) * every

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(st.steps_since_log for st in self._states.values()):
            self._flush(trainer, pl_module, prog_bar=False)
        if self._board is not None and trainer.is_global_zero:
            self._board.close_run(trainer.global_step)
        self._release_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A fit stopped by an error (e.g. on_exploding="raise") never reaches on_train_end: without this the LR hooks
        # would stay on the dead optimizer and keep the next fit's optimizer from getting its own.
        self._release_hooks()

    def _release_hooks(self) -> None:
        self._disarm_saturation()
        for handle in self._lr_hooks.values():
            handle.remove()
        self._lr_hooks.clear()

    def _disarm_saturation(self) -> dict[str, Tensor]:
        if self._saturation is not None and self._sat_armed:
            self._sat_armed = False
            return self._saturation.disarm()
        return {}

    def _prefix(self, key: int) -> str:
        return "gradguard/" if len(self._states) <= 1 else f"gradguard/opt{key}/"

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prog_bar: bool = True) -> None:
        saturation = self._disarm_saturation()
        penalties: list[Tensor] = []
        if self.regularizers:
            # On every rank: under FSDP2 a penalty is a DTensor whose reduction is a collective.
            with torch.no_grad():
                penalties = [_gathered(r.penalty(pl_module)).detach().float().reshape(1) for r in self.regularizers]
        if not trainer.is_global_zero:
            for st in self._states.values():
                self._reset_since_log(st)
            return
        states = sorted(self._states.items())
        device = states[0][1].last_total.device
        parts: list[Tensor] = [p.to(device) for p in penalties]
        parts += [v.detach().float().reshape(1).to(device) for v in saturation.values()]
        for _, st in states:
            parts += [st.scalars, st.counts.float(), st.layer_last, st.layer_present.float(),
                      st.expl_step, st.expl_value, st.van_step, st.van_value, st.nf_step]
        host = torch.cat([p.reshape(-1).float().to(device) for p in parts]).cpu().numpy()  # the one transfer

        step = trainer.global_step
        metrics: dict[str, float] = {}
        for r, value in zip(self.regularizers, host[: len(penalties)]):
            metrics[f"gradguard/reg/{r.name}"] = float(value)
            metrics[f"gradguard/reg_strength/{r.name}"] = float(r.strength)
        offset = len(penalties)
        self._last_saturation = dict(zip(saturation, (float(v) for v in host[offset : offset + len(saturation)])))
        for name, value in self._last_saturation.items():
            metrics[f"gradguard/saturation/{name}"] = value
        offset += len(saturation)
        layer_rows: list[tuple[int, Any, Any, Any, Any]] = []
        for key, st in states:
            L = st.index.num_layers
            sc = host[offset : offset + _NUM_SCALARS]
            offset += _NUM_SCALARS
            counts = host[offset : offset + _NUM_COUNTS]
            offset += _NUM_COUNTS
            blocks = [host[offset + i * L : offset + (i + 1) * L] for i in range(7)]
            offset += 7 * L
            last, present, expl_step, expl_value, van_step, van_value, nf_step = blocks
            prefix = self._prefix(key)
            metrics[prefix + "total_norm"] = float(sc[_S_LAST])
            if sc[_S_MAX] > -math.inf:
                metrics[prefix + "total_norm_max"] = float(sc[_S_MAX])
                metrics[prefix + "total_norm_min"] = float(sc[_S_MIN])
            if st.clipper is not None:
                metrics[prefix + "clip_threshold"] = float(sc[_S_THRESH])
                metrics[prefix + "clip_coef"] = float(sc[_S_COEF])
            if st.exploding is not None and not math.isnan(sc[_S_EMA]):
                metrics[prefix + "ema_mean"] = float(sc[_S_EMA])
                metrics[prefix + "ema_lower"] = float(sc[_S_LOW])
                metrics[prefix + "ema_upper"] = float(sc[_S_HIGH])
            if self.lr_guard is not None:
                scale = self.lr_guard.scale(key)
                metrics[prefix + "lr_scale"] = scale
                opt = trainer.optimizers[key] if key < len(trainer.optimizers) else None
                if opt is not None:
                    metrics[prefix + "lr"] = float(opt.param_groups[0]["lr"]) * scale
            for kind, value in st.event_counts(counts).items():
                metrics[f"{prefix}events/{kind}"] = float(value)
            layer_rows.append((key, last, present, expl_step, van_step))
            self._collect_events(st, key, step, expl_step, expl_value, van_step, van_value, nf_step)

        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        status = {"gn": metrics.get("gradguard/total_norm", metrics.get("gradguard/opt0/total_norm", math.nan))}
        if "gradguard/clip_coef" in metrics:
            status["clip"] = metrics["gradguard/clip_coef"]
        status["ev"] = float(
            sum(v for k, v in metrics.items() if "/events/" in k and not k.endswith(("lr_reduced", "clipped")))
        )
        if prog_bar:  # Lightning allows self.log in on_train_batch_end only
            pl_module.log_dict(
                {f"gg_{k}": v for k, v in status.items()}, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )

        board = self._get_board(trainer)
        if board is not None:
            for key, last, present, expl_step, van_step in layer_rows:
                if self.log_layers:
                    board.write_layer_norms(step, key, last, expl_step >= 0, van_step >= 0, present=present > 0)
            if self._event_rows:
                board.write_events(step, self._event_rows)
                self._event_rows = []
            if self.image_every_n_steps and board.should_write_images(step):
                board.write_images(step)
            if self._hist_samples:
                board.write_histograms(step, self._hist_samples)
                self._last_hist_step = step
        self._hist_samples = {}
        for _, st in states:
            self._reset_since_log(st)

    def _collect_events(
        self,
        st: _OptimizerState,
        key: int,
        step: int,
        expl_step: np.ndarray,
        expl_value: np.ndarray,
        van_step: np.ndarray,
        van_value: np.ndarray,
        nf_step: np.ndarray,
    ) -> None:
        """Turn the per-layer first-event records of one logging window into event rows and warnings."""
        rows = []
        for kind, steps, values, action in (
            ("exploding", expl_step, expl_value, self._explode_action()),
            ("vanishing", van_step, van_value, "none" if self.on_vanishing != "raise" else "raise"),
            ("nonfinite", nf_step, None, self.on_nonfinite),
        ):
            for i in (steps >= 0).nonzero()[0]:
                rows.append({"step": int(steps[i]), "kind": kind, "layer": st.index.names[i], "opt": key,
                             "value": float(values[i]) if values is not None else math.nan, "action": action})
        rows.sort(key=lambda r: (r["step"], r["kind"]))
        self._event_rows.extend(rows)
        shown: dict[str, int] = {}
        for row in rows:
            kind = row["kind"]
            mode = {"exploding": self.on_exploding, "vanishing": self.on_vanishing}.get(kind, "warn")
            if mode == "ignore" or (row["layer"], kind) in st.warned:
                continue
            if kind == "nonfinite" and self.on_nonfinite not in ("warn", "skip", "zero"):
                continue
            shown[kind] = shown.get(kind, 0) + 1
            if shown[kind] > self.max_warnings:
                continue
            st.warned.add((row["layer"], kind))
            where = f"layer {row['layer']!r} at step {row['step']}"
            if len(self._states) > 1:
                where += f" (optimizer {key})"
            if kind == "exploding":
                msg = f"GradGuard: exploding gradients in {where}: norm {row['value']:.3g}; action: {row['action']}."
            elif kind == "vanishing":
                msg = f"GradGuard: vanishing gradients in {where}: norm {row['value']:.3g}."
                hint = self._saturation_hint(row["layer"])
                if hint:
                    msg += " " + hint
            else:
                msg = f"GradGuard: non-finite gradients in {where}; action: {self.on_nonfinite}."
            rank_zero_warn(msg, category=UserWarning)
        extra = {k: n - self.max_warnings for k, n in shown.items() if n > self.max_warnings}
        if extra:
            rank_zero_warn(f"GradGuard: {extra} more new events at step {step} (see the events log in TensorBoard).")

    def _explode_action(self) -> str:
        actions = []
        if self.clip is not None:
            actions.append(f"clipped ({type(self.clip).__name__})")
        if self.lr_guard is not None:
            actions.append("LR guard")
        if self.on_exploding == "raise":
            actions.append("raise")
        return ", ".join(actions) or "none"

    def _saturation_hint(self, layer: str) -> str:
        fractions = self._last_saturation
        if not fractions or self._saturation is None:
            return ""
        top = self._saturation.most_saturated(fractions, upstream_of=layer)
        top = [(n, f) for n, f in top if f > 0.5]
        if not top:
            return ""
        listed = ", ".join(f"{n!r} ({f:.0%} saturated)" for n, f in top)
        return f"Most saturated activations upstream: {listed}. {SaturationMonitor.advice()}"

    def _get_board(self, trainer: pl.Trainer) -> Any:
        if self._board_checked and self._board_trainer is not None and self._board_trainer() is trainer:
            return self._board
        # First log, or the guard reused with another Trainer: its logger, not the previous run's directory.
        self._board, self._board_checked, self._board_trainer = None, True, weakref.ref(trainer)
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None:
            if trainer.loggers:
                rank_zero_info(
                    "GradGuard: no TensorBoardLogger attached; scalars go to the attached loggers, per-layer"
                    " scalars, pictures, histograms and text are skipped."
                )
            return None
        from lightning_gradguard.tensorboard import GradGuardBoard

        layer_names = {key: list(st.index.names) for key, st in self._states.items()}
        self._board = GradGuardBoard(
            tb.experiment,
            layer_names,
            [f"opt{key}" for key in sorted(self._states)],
            image_every_n_steps=self.image_every_n_steps,
            histogram_every_n_steps=self.histogram_every_n_steps,
        )
        for key, st in self._states.items():
            if st.vanishing is not None or st.exploding is not None:
                low = st.vanishing.min_norm if st.vanishing is not None else None
                high = st.exploding.max_layer_norm if st.exploding is not None else None
                self._board.set_bands(key, low, high)
        self._board.write_layout()
        config = self.config()
        self._board.write_config(config)
        try:  # also as hparams, so runs can be compared by their GradGuard settings
            tb.log_hyperparams({f"gradguard/{k}": str(v) for k, v in config.items()})
        except Exception as err:  # a logger that refuses late hparams must not stop training
            log.debug("GradGuard: hparams not written: %s", err)
        return self._board

    # ------------------------------------------------------------------ introspection
    def config(self) -> dict[str, Any]:
        """The configuration as plain values (written to TensorBoard once as text)."""
        return {
            "clip": repr(self.clip),
            "lr_guard": repr(self.lr_guard),
            "regularizers": [repr(r) for r in self.regularizers],
            "on_nonfinite": self.on_nonfinite,
            "on_exploding": self.on_exploding,
            "on_vanishing": self.on_vanishing,
            "exploding": repr(self.exploding),
            "vanishing": repr(self.vanishing),
            "log_every_n_steps": self.log_every_n_steps,
            "group_depth": self.group_depth,
            "layers": {f"opt{k}": st.index.num_layers for k, st in sorted(self._states.items())},
        }

    def summary(self) -> dict[str, int]:
        """Cumulative event counts over all optimizers (reads device counters: call it after training)."""
        totals = dict.fromkeys(EVENT_KINDS, 0)
        for st in self._states.values():
            for kind, value in st.event_counts(st.counts.tolist()).items():
                totals[kind] += value
        return totals

    def layer_names(self, optimizer_index: int = 0) -> list[str]:
        """The layers GradGuard watches for one optimizer, in definition order."""
        return list(self._states[optimizer_index].index.names)


def _grad_scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _gathered(t: Tensor) -> Tensor:
    # A DTensor (FSDP2) as the plain tensor it stands for; other tensors as they are.
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state
