"""GradGuard: the Lightning callback that runs the gradient pipeline in the right hooks."""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import weakref
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_gradguard._compat import unscale_once, unwrap_optimizer
from lightning_gradguard._events import EventReporter
from lightning_gradguard._fit_diagnostics import FitDiagnostics
from lightning_gradguard._host import host_rate
from lightning_gradguard._lightning import (
    CallbackBase,
    batch_layout,
    grad_scaler,
    layout_batch_size,
    lightning_types,
    loss_scale,
    overrides_hook,
    rank_zero_warn,
    restart_weight_averages,
    same_batch_size_on_every_rank,
    swa_rates,
)
from lightning_gradguard._trainer_clip import gradient_callbacks, later_hooks, restore_clipping, take_over_clipping
from lightning_gradguard._validation import check_bool, check_compile, check_int, check_state, optional_int
from lightning_gradguard.clip import AdaGC, Clipper, default_clipper
from lightning_gradguard.detect import DivergenceDetector, ExplodingDetector, VanishingDetector
from lightning_gradguard.diagnostics import STEP_SIZE_HIGH, adaptive_step_ratio
from lightning_gradguard.engine import (
    EVENT_KINDS,
    NONFINITE_MODES,
    EngineSnapshot,
    GradientExplosionError,
    GuardEngine,
    LossDivergenceError,
    NonFiniteGradientError,
    StepEvent,
    VanishingGradientError,
    _saved_event_counts,
)
from lightning_gradguard.layers import LayerIndex, build_layer_index, is_empty
from lightning_gradguard.lr import LRGuard
from lightning_gradguard.regularize import Orthogonal, Regularizer, bind_all, check_regularizers
from lightning_gradguard.rollback import Rollback, rollback_from
from lightning_gradguard.running_stats import RunningStats
from lightning_gradguard.saturation import SaturationMonitor
from lightning_gradguard.stats import StepStats

__all__ = [
    "GradGuard",
    "GradientExplosionError",
    "LossDivergenceError",
    "NonFiniteGradientError",
    "VanishingGradientError",
]

log = logging.getLogger(__name__)

_EVENT_MODES = ("warn", "raise", "ignore")
# The counters that make the progress bar's ``gg_ev``: the problems found. Not what answered them (skipped, clipped,
# lr_reduced, rolled_back), nor a GradScaler's overflows, which calibrate its scale in every healthy fp16 run.
_PROBLEM_EVENTS = frozenset({"exploding", "vanishing", "nonfinite", "diverging"})
_NEVER = 2**62  # a logging interval no run reaches
_DIAG_CHECKPOINT_KEY = "gradguard_diagnostics"
_BOARD_CHECKPOINT_KEY = "gradguard_board"
# Rows of the events table not yet written when a checkpoint was taken (rank zero's), under each guard's state key.
_ROWS_CHECKPOINT_KEY = "gradguard_rows"
_WARNED_CHECKPOINT_KEY = "gradguard_warned"
# Per optimizer, the run of wholly non-finite logging windows the stall warning counts (see EventReporter.stall).
_STALL_CHECKPOINT_KEY = "gradguard_stall"


def _base_rates(optimizer: Any) -> list[float | None]:
    """Each param group's base rate as a host float: a scheduler's ``initial_lr``, else its ``lr``."""
    return [host_rate(group.get("initial_lr", group.get("lr"))) for group in optimizer.param_groups]


#: The diagnostics' names, typed so that LightningCLI refuses a wrong one with a usage error.
Diagnostic = Literal["update_ratio", "zero_fraction", "act_grad", "noise_scale", "epoch"]
DIAGNOSTICS: tuple[str, ...] = get_args(Diagnostic)


def _default(value: Any, factory: Callable[[], Any]) -> Any:
    return factory() if isinstance(value, str) and value == "default" else value


class GradGuard(CallbackBase):
    r"""Watch every optimizer step's per-layer gradients; clip, skip and back off the learning rate when they go wrong.

    GradGuard runs in ``on_before_optimizer_step``, where gradients are complete (after accumulation) and unscaled
    (after AMP's ``unscale_``). Per optimizer step, in order: add the regularizers' gradient terms, measure the
    per-layer norms in one pass, run the detectors, handle non-finite gradients, clip, apply the LR guard, and fold
    the figures into device-side accumulators. Nothing is copied to the host on steps that do not log (with the one
    documented exception of ``on_nonfinite="skip"`` outside 16-bit AMP: one boolean per step, as a GradScaler does,
    and of ``skip_exploding=True``, which shares that boolean;
    under DDP/FSDP2 each step also waits for the previous step's small flag copy, so that the LR guard's cut falls on
    the same step on every rank).
    On logging steps one batched copy feeds every scalar, warning and picture. The per-step work is done by one
    :class:`~lightning_gradguard.GuardEngine` per optimizer (usable without Lightning); this callback adds the hooks,
    the strategy and AMP checks, the loggers, the checkpoints and the raise/warn policy.

    Args:
        clip: the clipper (:class:`ZClip`, :class:`AutoClip`, :class:`AGC`, :class:`AdaGC`, :class:`NormClip`);
            ``"default"`` is ``ZClip(z_thresh=4.0)`` (:func:`~lightning_gradguard.clip.default_clipper`), ``None``
            disables clipping.
            With ``Trainer(gradient_clip_val=v)`` (by norm) GradGuard clips once to ``min(this clipper's threshold,
            v)`` and switches Lightning's clipping off for the fit, so its logs describe what the optimizer receives
            (README, "Clipping").
        lr_guard: the learning-rate guard; ``"default"`` is ``LRGuard()``, ``None`` disables it. A run whose rate ends
            below its schedule after a rollback or two or more cuts gets one INFO line at the end of ``fit`` with
            the rate it ended at (a ceiling for the next run's rate); a run that the rollback's rescue clipper
            trained gets one naming that clipper.
        regularizers: gradient-term regularizers (:class:`L1`, :class:`L2`, :class:`Orthogonal`).
        on_nonfinite: what to do with a step whose gradients hold inf/NaN: ``"skip"`` the optimizer step (parameters
            and optimizer state untouched), ``"zero"`` the non-finite entries, ``"raise"`` an error naming the layers,
            or ``"warn"`` and let it through (one warning per optimizer, at the first such step; the logging step
            after it names the layers). Under 16-bit AMP with a GradScaler the scaler already skips such steps;
            they are counted as ``overflow`` and not handled twice.
        on_exploding: ``"warn"``, ``"raise"`` (:class:`GradientExplosionError`) or ``"ignore"``.
        on_vanishing: ``"warn"``, ``"raise"`` (:class:`VanishingGradientError`) or ``"ignore"``.
        exploding: the exploding-gradient detector; ``"default"`` is ``ExplodingDetector()``, ``None`` disables it.
        vanishing: the vanishing-gradient detector; ``"default"`` is ``VanishingDetector()``, ``None`` disables it.
        log_every_n_steps: optimizer steps between logs (Lightning's count; under manual optimization Lightning
            counts every training batch, whatever number of ``opt.step()`` calls it makes, and GradGuard logs on the
            first batch at or after each multiple that ran a step); ``None`` takes the Trainer's
            ``log_every_n_steps``. Logs follow Lightning's own convention for ``self.log``: a log is written on the
            batch for which ``(batches_that_stepped + 1) % log_every_n_steps == 0`` and carries Lightning's step for
            that batch (``trainer.fit_loop.epoch_loop._batches_that_stepped``: 9, 19, ... for 10), so a logger row
            holds both GradGuard's scalars and the module's ``train_loss``. Event steps, images and histograms use
            the same numbers.
        group_depth: group parameters into layers by the first ``group_depth`` components of the module name.
        group_fn: a callable mapping a parameter name to a layer name (from YAML: the import path of a function).
        log_layers: write one scalar per layer (TensorBoard only).
        saturation: on logging steps, measure how saturated each activation module is (named in vanishing warnings).
        image_every_n_steps: steps between gradient-flow pictures (TensorBoard only); ``None`` disables them.
        histogram_every_n_steps: steps between gradient histograms (TensorBoard only), written on the logging step
            that reaches each multiple (the default 1000 is ``wandb.watch``'s); ``None`` disables them. A histogram
            step samples at most 4096 gradient values per block on the device and keeps them until that log only.
        max_warnings: the most layers one warning names. GradGuard warns at most once per kind (exploding,
            vanishing, non-finite) per optimizer and logging step, about the layers not reported before, naming the
            worst ``max_warnings`` of them and counting the rest; ``0`` names none. Update-ratio hints come as one
            message per log.
        clip_exploding: when a clipper is set, also clip a step that the exploding detector flags down to
            ``cap_ratio`` (1) times the detector's average norm, or its ceiling ``max_norm`` where lower (where only
            layers are flagged: by what brings them to their own average, not lower; see
            :class:`~lightning_gradguard.detect.ExplodingResult`). A safety net
            for the first steps of a run, while an adaptive clipper is still warming up (ZClip does not clip during
            its warm-up), and a bound on what one bad batch can do (to Adam's second moments too); folded into the
            clipper's coefficient, no extra pass.
        skip_exploding: skip the optimizer step on every step the exploding detector caps (the steps
            ``clip_exploding`` clips) instead of clipping it (OLMo-core's skip step): the gradients are
            dropped, so the parameters and the optimizer state stay as they were, as on a skipped non-finite step
            (counted as ``skipped``). With Adam-type optimizers a clipped bad batch still makes a full-size step in
            its direction; a skipped one makes none. The cost: a jump to a new level that holds (a harder task) is
            skipped until the detector takes it in (``level_steps``, 5 steps). A spike in one layer under a total
            at or below its cap is reported, not skipped. Needs ``exploding``; one host read per step, shared with
            ``on_nonfinite="skip"`` (under 16-bit AMP too). README, "Skipping flagged steps".
        compile: run the fused per-step tail compiled with ``torch.compile`` (see :class:`GuardEngine`): ``True``,
            ``False``, or ``"auto"``: on CUDA only (compiling on a CPU takes tens of seconds).
        diagnostics: the logging-step-only diagnostics to log: ``True`` (default) all of them, ``False`` none, or a
            list of names (YAML: ``diagnostics: [update_ratio, noise_scale]``). None runs anything on steps that do
            not log. ``"update_ratio"``: ``gradguard/update_ratio/<layer>``, ``‖Δθ‖/‖θ‖`` of the update the optimizer
            step applied (costs one copy of the updated parameters on a logging step), with a warning for a layer
            whose ratio stays above ``1e-1`` or below ``1e-5`` for 3 logs, and one when training starts for an
            Adam-type optimizer whose rate is above 0.3x the typical size of its weights; ``"zero_fraction"``:
            ``gradguard/zero_fraction/<layer>``, the fraction of exactly-zero gradient entries; ``"act_grad"``:
            ``gradguard/act_grad/<layer>``, ``‖∂L/∂y‖`` of each layer module's output (hooks on the logging step's
            forward/backward passes only; unscaled under AMP; model-wide, without an optimizer prefix);
            ``"noise_scale"``: ``gradguard/noise_scale``, the gradient noise scale ``B_simple`` from gradient
            accumulation (first micro-batch against the step) or DDP (this process against the average), automatic
            optimization with one optimizer only; a run with neither gets one info message (with FSDP2's sharded
            parameters the update ratio, zero fraction and noise scale are left out: each would add a collective);
            ``"epoch"``:
            ``gradguard/epoch/...``, per-epoch total-norm percentiles, maximum and event counts. Per-layer tags go to
            TensorBoard only, the noise scale and the epoch summaries to every logger.
        rollback: a :class:`Rollback` skips the step on which the LR guard lowers the rate and puts back the last
            parameters, optimizer state and statistics known to have trained calmly (counted as ``rolled_back``); needs
            ``lr_guard``. ``"default"``: :func:`default_rollback`, an early restart: for the first 500 steps, after two
            troubled steps in a row (or a divergence of the loss), back to the initial weights one cut below the rate in
            force when the trouble began (a tenth of it after a divergence of the loss), or at that rate with ``AGC()``
            clipping unit-wise from then on when the trouble began in the first 20 steps of an SGD run without a calm
            start (with one cut as well when the norm blew up more than 10^6x in one step). The first restart for such
            early trouble is a plain retry at the same rate (bad batches there look the same, and do not come back); the
            remedy comes when the trouble does (one copy of the trainable parameters, only when it takes at most 1 GiB;
            off without an ``lr_guard``). ``True``: :func:`~lightning_gradguard.full_rollback`, the same remedies for
            early trouble, with two copies kept for the whole run of the trainable parameters and their optimizer state
            on their device (4x the trainable parameters' memory with SGD and momentum, 6x with Adam). ``None`` or
            ``False``: no rollback. A run whose rate is never lowered is not changed by any of them.
        divergence: the :class:`DivergenceDetector`, fed the training loss of each optimizer step (the losses
            backpropagated since the previous step, taken in ``on_before_backward``: unscaled under 16-bit AMP,
            the mean over an accumulation window, averaged over processes under DDP/FSDP2 with one scalar
            ``all_reduce`` per step). A divergence event is an explosion to the LR guard, and a full stretch of
            trouble to the rollback. ``"default"`` is ``DivergenceDetector()`` for a module with one optimizer;
            with several (a GAN: one player's loss rises as the other gets better) the default watches none, an
            explicit detector watches each optimizer's own loss. ``None`` disables it.
        on_diverging: ``"warn"``, ``"raise"`` (:class:`LossDivergenceError`) or ``"ignore"`` (still acted on, and
            listed in the events table).

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
        histogram_every_n_steps: int | None = 1000,
        max_warnings: int = 3,
        clip_exploding: bool = True,
        skip_exploding: bool = False,
        compile: bool | Literal["auto"] = "auto",
        diagnostics: bool | list[Diagnostic] = True,
        rollback: Rollback | bool | None | Literal["default"] = "default",
        divergence: DivergenceDetector | None | Literal["default"] = "default",
        on_diverging: Literal["warn", "raise", "ignore"] = "warn",
    ) -> None:
        super().__init__()
        regularizers = _check_arguments(locals())
        max_warnings = int(max_warnings)

        self.clip: Clipper | None = _default(clip, default_clipper)
        self.lr_guard: LRGuard | None = _default(lr_guard, LRGuard)
        self.regularizers = regularizers
        self.on_nonfinite = on_nonfinite
        self.on_exploding = on_exploding
        self.on_vanishing = on_vanishing
        self.exploding: ExplodingDetector | None = _default(exploding, ExplodingDetector)
        self.vanishing: VanishingDetector | None = _default(vanishing, VanishingDetector)
        self.divergence: DivergenceDetector | None = _default(divergence, DivergenceDetector)
        # The default watches a module with one optimizer only: with several (a GAN) each loss is one player's, and
        # it rises whenever the other player gets better.
        self._divergence_default = isinstance(divergence, str) and divergence == "default"
        self.on_diverging = on_diverging
        # Integers of any kind kept as Python ints (a numpy int64 from a config failed in the board, mid-fit).
        self.log_every_n_steps = optional_int("log_every_n_steps", log_every_n_steps, low=1)
        self.group_depth = optional_int("group_depth", group_depth, low=1)
        self.group_fn = group_fn
        self.log_layers = log_layers
        self.saturation = saturation
        self.image_every_n_steps = optional_int("image_every_n_steps", image_every_n_steps, low=1)
        self.histogram_every_n_steps = optional_int("histogram_every_n_steps", histogram_every_n_steps, low=1)
        self.max_warnings = max_warnings
        self.clip_exploding = clip_exploding
        if skip_exploding and self.exploding is None:
            raise ValueError("`skip_exploding` skips the steps the exploding detector flags: it needs `exploding`.")
        # A "raise" without its detector could never fire: say so rather than leave a promise that is never kept.
        for mode, value, detector, name in (
            ("on_exploding", on_exploding, self.exploding, "exploding"),
            ("on_vanishing", on_vanishing, self.vanishing, "vanishing"),
            ("on_diverging", on_diverging, self.divergence, "divergence"),
        ):
            if value == "raise" and detector is None:
                raise ValueError(f"`{mode}='raise'` raises on the events of `{name}`: it needs `{name}`, got None.")
        self.skip_exploding = skip_exploding
        self.compile = compile
        self.diagnostics = diagnostics
        # The default restart needs the LR guard's cut to act on; without a guard it is simply off.
        self.rollback: Rollback | None = (
            None if rollback == "default" and self.lr_guard is None else rollback_from(rollback)
        )
        self._diag_on: frozenset[str] = frozenset(
            DIAGNOSTICS if diagnostics is True else () if diagnostics is False else diagnostics
        )

        # What a fresh guard starts from: a new model (the guard reused for another fit) starts from it again.
        self._initial_regularizer_states = {r.name: r.state_dict() for r in self.regularizers}
        self._fitted_model: weakref.ref[pl.LightningModule] | None = None
        self._carried_state: dict[str, Any] | None = None  # the state the last copy carried (see __getstate__)
        self._copied_from: list[tuple[tuple[int, ...], float, float]] | None = None  # a copy's model (__getstate__)
        self._noted_hooks = False  # the note on the module's own later hooks was given
        self._noted_callbacks = False  # the note on other callbacks' gradient hooks was given
        # Per optimizer key, each param group's rate as `configure_optimizers` gave it at the last fit's start (before
        # a checkpoint's rates are restored): a fit of the same model at other rates drops the cut and the rescue
        # found at the old ones (`_note_rates`). Carried by a copy, as the state it goes with.
        self._fit_rates: dict[int, list[float | None]] = {}
        self._rates_changed: dict[int, str] = {}  # keys whose rates changed at this fit's start -> "old -> new"
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Everything one model's training builds up, as a fresh guard has it."""
        self._states: dict[int, GuardEngine] = {}  # optimizer key -> its engine
        self._signatures: dict[int, tuple[tuple[int, int], ...]] = {}  # per param group: size, id of first param
        self._optimizer_types: dict[int, type] = {}  # the type of the optimizer each engine was built for
        self._opt_keys: dict[int, int] = {}  # id(optimizer) -> optimizer index
        self._loaded: dict[str, Any] | None = None
        self._next_log_step = 0
        self._log_step_restored = False  # _next_log_step came from a checkpoint (see on_train_start)
        self._evaluating = False  # inside validate/test/predict: a checkpoint loaded there is not the training's
        self._model_index: LayerIndex | None = None
        self._unbound: list[Regularizer] = []  # regularizers not yet bound to this fit's module (lazy modules)
        self._board: Any = None
        self._board_checked = False
        self._board_loaded: dict[str, Any] | None = None  # a checkpoint's board state, for the board once it opens
        self._warned_loaded: dict[str, list[list[str]]] | None = None  # a checkpoint's warned layers, per optimizer
        self._stall_loaded: dict[str, list[int | None]] = {}  # a checkpoint's stall counts, per optimizer
        self._board_trainer: weakref.ref[pl.Trainer] | None = None  # the Trainer whose logger the board writes to
        self._saturation: SaturationMonitor | None = None
        self._sat_armed = False
        # A module created after the fit began joined the layers: the activation hooks (saturation, act_grad) follow
        # it at the next batch start where none is armed (`_follow_new_modules`).
        self._modules_joined = False
        # Optimizers of lazy modules whose Adam-type rate hint waits for their first step (`_hint_step_size`).
        self._hint_due: set[int] = set()
        self._lr_hooks: dict[int, Any] = {}
        self._reporter = EventReporter(self)
        # Per optimizer key, the gradient samples of its blocks at the last histogram step (merged when written: a
        # block whose layers are split over optimizers gets all its values, not one optimizer's).
        self._hist_samples: dict[int, dict[str, Tensor]] = {}
        # Schedules count optimizer-stepping batches as Lightning does (`batches_that_stepped + 1`), not log steps.
        self._last_hist_count = 0
        self._hist_loaded: int | None = None  # the count a checkpoint brought, for this fit's start
        self._hist_taken = False  # a histogram was due in the window being logged (on every rank)
        self._hist_trainer: weakref.ref[pl.Trainer] | None = None  # the Trainer the schedule counts the steps of
        self._last_image_count: int | None = None
        self._batch_stepped = False  # an optimizer step ran in the current batch (Lightning logs only then)
        self._fit_batches = 0  # training batches of this fit, for the "no optimizer step seen" warning
        self._warned_unguarded = False
        self._warned_outside: set[int] = set()  # the optimizers said to hold parameters of no submodule
        self._last_stamp: int | None = None  # Lightning's step of the latest optimizer step
        self._last_saturation: dict[str, float] = {}
        self._diag = FitDiagnostics()
        self._clip_norm: float | None = None  # Trainer(gradient_clip_val=...) when GradGuard took it over
        # Per optimizer key: the losses backpropagated for its next step since its last one, unscaled. With several
        # optimizers, a loss whose optimizer cannot be told waits in ``_unowned`` for the next step (see _loss_owner).
        self._losses: dict[int, Tensor] = {}
        self._unowned: Tensor | None = None
        # Examples that reached a backward pass this fit (None: a batch without a size found), and the count at each
        # optimizer's last step: the difference is the examples behind a step (see GuardEngine.step's `samples`).
        self._samples: int | None = 0
        self._samples_at_step: dict[int, int | None] = {}
        self._count_samples = True
        self._batch_samples: int | None = None  # the current batch's size, until its first backward counts it
        # Batches that reached a backward pass since the last optimizer step: Lightning divides each one's loss by
        # `accumulate_grad_batches`, also in an epoch's last window, which may hold fewer (see GuardEngine.step's
        # `share`).
        self._window_batches = 0
        # The batches' layout (`_note_layout`): the settled one, how many batches in a row had it, and another one
        # seen on the last batch only.
        self._layout: tuple[tuple[int, ...], ...] | None = None
        self._layout_run = 0
        self._odd_layout: tuple[tuple[int, ...], ...] | None = None
        self._batch_fresh = False
        # Optimizers whose step() evaluates the closure several times (LBFGS): Lightning runs this callback's hook on
        # every evaluation, so only the first of a step is the step's. Their keys; per key, the hook calls seen inside
        # the optimizer.step() call under way (absent: none under way), kept by the optimizer's own step hooks.
        self._reevaluating: set[int] = set()
        self._in_step: dict[int, int] = {}
        self._step_hooks: dict[int, tuple[Any, Any]] = {}
        # Per optimizer key, the learning rate of param group 0 the latest optimizer step ran with and the LR
        # guard's multiplier in it (see ``_watch_steps``).
        self._step_rates: dict[int, tuple[float | Tensor | None, float | None]] = {}
        # Per optimizer key, each param group's base rate when training started (a scheduler's `initial_lr`, else
        # its rate), for the end-of-fit rate line.
        self._start_rates: dict[int, list[float | None]] = {}
        # Per optimizer key, at its latest LR cut or rollback: param group 0's scheduled rate, and the groups' rates
        # of a StochasticWeightAveraging that trained them then (None: none did), for the end-of-fit rate line.
        self._trouble: dict[int, tuple[float | None, list[float | None] | None]] = {}
        # For a refit (not a resume) of the same model: per optimizer key, the counts of cuts and rollbacks at its
        # start, and whether the rescue clipping was on; the end-of-fit lines then say what is new.
        self._counts_before: dict[int, tuple[int, int, bool]] = {}
        # Per optimizer key, the counts of cuts and rollbacks when its multiplier last started afresh (a refit at
        # another rate): the rate line counts those since.
        self._counts_base: dict[int, tuple[int, int]] = {}
        self._rates_loaded: dict[int, list[float | None]] = {}  # a checkpoint's `_start_rates`, for a resume

    # ------------------------------------------------------------------ identity and state
    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle (``copy.deepcopy``, ``ddp_spawn``) carries the configuration and the checkpoint state, not
        the fit in progress: its engines watch the model's own parameters, and its hooks, writer and references
        belong to that fit. Fitted to the model it was copied from (the same weights, as in ``ddp_spawn``'s workers),
        the copy goes on as a guard resumed from a checkpoint of this one; fitted to another, it starts afresh, as
        this guard would."""
        # Lightning binds `log` and `log_dict` of the fitted model to every callback: not part of the guard.
        skipped = _run_state_names(type(self)) | {"_carried_state", "log", "log_dict"}
        state = {name: value for name, value in self.__dict__.items() if name not in skipped}
        model = self._fitted_model() if self._fitted_model is not None else None
        state["_fitted_model"] = None
        # A model's identity does not survive a pickle: its weights, summed, stand for it (a copy of a copy that has
        # not fitted passes on the one it was given).
        state["_copied_from"] = _fingerprint(model) if model is not None else self._copied_from
        gone = self._fitted_model is not None and model is None  # nothing left for a copy to go on with
        carried = self.state_dict() if (self._states or self._loaded is not None) and not gone else None
        # Held until the next fit or copy: a spawned process receives tensors as shared-memory file descriptors, which
        # close when the tensor is freed, and `ddp_spawn` starts its processes after this returns.
        self._carried_state = state["_carried_state"] = carried
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        carried = state.pop("_carried_state", None)
        self.__dict__.update(state)
        self._carried_state = None
        self._reset_run_state()
        if carried is not None:
            self.load_state_dict(carried)

    def __repr__(self) -> str:
        # What decides what the guard does, as in the components' own reprs; logging options are left out.
        parts = {
            "clip": self.clip,
            "lr_guard": self.lr_guard,
            "rollback": self.rollback,
            "exploding": self.exploding,
            "vanishing": self.vanishing,
            "divergence": self.divergence,
            "regularizers": self.regularizers,
            "on_nonfinite": self.on_nonfinite,
            "on_exploding": self.on_exploding,
            "on_vanishing": self.on_vanishing,
            "on_diverging": self.on_diverging,
            "skip_exploding": self.skip_exploding,
        }
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in parts.items())})"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clip=type(self.clip).__name__ if self.clip is not None else None,
            lr_guard=self.lr_guard is not None,
            regularizers=[r.name for r in self.regularizers],
            group_depth=self.group_depth,
        )

    def state_dict(self) -> dict[str, Any]:
        optimizers = {str(key): engine.state_dict() for key, engine in self._states.items()}
        if self._loaded is not None:  # state not yet claimed by an optimizer survives a save
            for key, value in self._loaded.get("optimizers", {}).items():
                optimizers.setdefault(key, value)
        return {
            "version": 1,
            "optimizers": optimizers,
            "lr_guard": self.lr_guard.state_dict() if self.lr_guard is not None else None,
            "regularizers": {r.name: r.state_dict() for r in self.regularizers},
            "next_log_step": self._next_log_step,
            "last_hist_count": self._last_hist_count,
            # For the end-of-fit rate line of a resumed fit: the rates training started with, and the latest trouble.
            "rate_record": {
                str(key): {
                    "start": rates,
                    "trouble": list(self._trouble.get(key, (None, None))),
                    "counts_base": list(self._counts_base.get(key, (0, 0))),
                }
                for key, rates in {**self._rates_loaded, **self._start_rates}.items()  # loaded, not yet claimed too
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._evaluating:
            # Lightning restores every callback's state in `validate/test/predict(ckpt_path=...)` too: taken, it would
            # rewind this guard's counts and rate to the checkpoint's after a fit, or hand them to the next fresh fit.
            return
        check_state("GradGuard", state_dict)
        if state_dict.get("version") != 1:
            raise ValueError(f"Unsupported GradGuard state version {state_dict.get('version')!r}")
        record = _rate_record(state_dict.get("rate_record"))  # checked before anything is taken
        optimizers = state_dict.get("optimizers", {})
        if not isinstance(optimizers, dict):
            raise ValueError(f"`state['optimizers']` must be a dict from GradGuard.state_dict(), got {optimizers!r}.")
        self._loaded = {"optimizers": dict(optimizers)}
        if self.lr_guard is not None and state_dict.get("lr_guard") is not None:
            self.lr_guard.load_state_dict(state_dict["lr_guard"])
        for r in self.regularizers:
            if r.name in state_dict.get("regularizers", {}):
                r.load_state_dict(state_dict["regularizers"][r.name])
        self._next_log_step = int(state_dict.get("next_log_step", 0))
        hist = state_dict.get("last_hist_count")
        self._hist_loaded = None if hist is None else int(hist)
        self._log_step_restored = True
        # Absent from checkpoints written before it was kept: the resumed fit's line then reads the restored rates.
        # The checkpoint's fit is the one that goes on: nothing of another fit of this guard's stays.
        self._rates_loaded = {key: start for key, (start, _, _) in record.items()}
        self._trouble = {key: trouble for key, (_, trouble, _) in record.items() if trouble[0] is not None}
        # A resumed refit at another rate goes on counting the cuts since its multiplier started afresh.
        self._counts_base = {key: base for key, (_, _, base) in record.items() if base != (0, 0)}
        # Already-built optimizer states take their part right away (load after on_fit_start: FSDP/DeepSpeed order).
        for key, engine in self._states.items():
            self._restore_optimizer_state(key, engine)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The diagnostics' host-side state (noise-scale EMAs, hint streaks, the epoch so far) lives on global rank
        # zero only, so it travels beside `state_dict` (which is identical on every rank), under this guard's key.
        last_batch = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        checkpoint.setdefault(_DIAG_CHECKPOINT_KEY, {})[self.state_key] = self._diag.state_dict(last_batch)
        # The pictures' histories (gradient-norm and update-ratio heatmaps, events table) live with the TensorBoard
        # writer on rank zero: a resumed run's pictures go on from them instead of starting blank.
        if self._board is not None and trainer.is_global_zero:
            checkpoint.setdefault(_BOARD_CHECKPOINT_KEY, {})[self.state_key] = self._board.state_dict()
        if self._reporter.rows and trainer.is_global_zero:
            # Rows of the events table not written yet (a cut or a rollback since the last log), rank zero's.
            checkpoint.setdefault(_ROWS_CHECKPOINT_KEY, {})[self.state_key] = list(self._reporter.rows)
        # The layers each optimizer has warned about (each layer and kind warns once, across a resume too): warnings
        # are rank zero's, so this travels beside `state_dict` as well.
        warned = dict(self._warned_loaded or {})
        for key, pairs in self._reporter.warned.items():
            warned[str(key)] = sorted([layer, kind] for layer, kind in pairs)
        checkpoint.setdefault(_WARNED_CHECKPOINT_KEY, {})[self.state_key] = warned
        # A run of non-finite steps goes on across a resume: its start, and the warning's "see the warning" after it.
        stall = dict(self._stall_loaded)
        for key, (steps, bad, run) in self._reporter.stall.items():
            stall[str(key)] = [steps, bad, *(run if run is not None else (None, None))]
        checkpoint.setdefault(_STALL_CHECKPOINT_KEY, {})[self.state_key] = stall

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._evaluating:
            return  # see load_state_dict
        key = self.state_key
        saved = checkpoint.get("callbacks") or {}
        if key not in saved:
            # The key names part of the configuration, so a guard configured otherwise than the one that saved
            # (another clipper, no LR guard) is not handed its state by Lightning: take it here. What does not fit
            # (the other clipper's statistics) starts afresh, with a warning; the counts, detectors and the lowered
            # rate go on.
            found = [k for k in saved if isinstance(k, str) and k.startswith(f"{type(self).__qualname__}{{")]
            if len(found) == 1:
                key = found[0]
                rank_zero_warn(
                    f"GradGuard: the checkpoint was saved by a GradGuard configured otherwise ({key}); its state is"
                    " restored where it fits this one."
                )
                self.load_state_dict(copy.deepcopy(saved[key]))
            elif found:
                rank_zero_warn(
                    f"GradGuard: the checkpoint holds the states of {len(found)} GradGuards configured otherwise"
                    f" ({', '.join(found)}); which one was this guard's cannot be told, so none is restored."
                )
        self._diag.load_state_dict(checkpoint.get(_DIAG_CHECKPOINT_KEY, {}).get(key))  # absent: older
        self._board_loaded = checkpoint.get(_BOARD_CHECKPOINT_KEY, {}).get(key)
        self._reporter.rows = list(checkpoint.get(_ROWS_CHECKPOINT_KEY, {}).get(key) or [])
        self._warned_loaded = dict(checkpoint.get(_WARNED_CHECKPOINT_KEY, {}).get(key) or {})  # absent: older
        self._stall_loaded = dict(checkpoint.get(_STALL_CHECKPOINT_KEY, {}).get(key) or {})
        for built in self._states:
            self._restore_warned(built)

    def _restore_warned(self, key: int) -> None:
        warned = self._warned_loaded.pop(str(key), None) if self._warned_loaded is not None else None
        if warned is not None:
            self._reporter.warned[key] = {(layer, kind) for layer, kind in warned}
        stall = self._stall_loaded.pop(str(key), None)
        if stall is not None:
            steps, bad, since, before = stall
            run = None if since is None or before is None else (int(since), int(before))
            self._reporter.stall[key] = (int(steps or 0), int(bad or 0), run)

    def _restore_optimizer_state(self, key: int, engine: GuardEngine) -> None:
        if self._loaded is None:
            return
        saved = self._loaded["optimizers"].pop(str(key), None)
        if saved is None:
            return
        try:
            problems = engine._load_state(saved)
        except ValueError:
            rank_zero_warn(
                f"GradGuard: the checkpoint's parameters for optimizer {key} differ from the model's (layers added or"
                " removed since it was saved, or parameters given to other optimizers), so none of its state for them"
                " is restored: the counts, the step count, the detectors' and clipper's statistics, the early-restart"
                " window and the rescue clipping start afresh, as in a new run (the early restart may go back to the"
                " weights of this resume)."
            )
            return
        for problem in problems:
            rank_zero_warn(f"GradGuard (optimizer {key}): {problem}")

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = stage != "fit"
        if stage != "fit":
            return
        self._reporter.take_rows()  # an earlier fit's, never written (here: a checkpoint restored next brings its own)
        self._reporter.previous.clear()  # an earlier fit's norms are no yardstick for this fit's steps
        self._reporter.start_fit()
        others = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, GradGuard) and c is not self]
        if others:
            # Both would clip, skip and lower the rate of the same steps, and the second finds gradients the first
            # already clipped (or dropped): their LR guards would compound on the same optimizer.
            raise MisconfigurationException(
                f"GradGuard: the Trainer has {len(others) + 1} GradGuard callbacks; one guards a model. Configure one"
                " GradGuard with everything it should do."
            )
        if self._fitted_model is not None and self._fitted_model() is not pl_module:
            self._start_over("a new LightningModule")
        elif self._copied_from is not None and not _same_weights(self._copied_from, _fingerprint(pl_module)):
            self._start_over("a copy of a guard, given a model whose weights differ from those it was copied with")
        self._fitted_model = weakref.ref(pl_module)
        self._copied_from = self._carried_state = None
        # By class, so that subclasses are caught too; the name test covers integrations outside Lightning.
        strategy = type(trainer.strategy).__name__
        if isinstance(trainer.strategy, lightning_types("strategies.DeepSpeedStrategy")) or "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"GradGuard does not support DeepSpeed (`{strategy}`): DeepSpeed keeps gradients inside its engine"
                " (`param.grad` is None) and calls `on_before_optimizer_step` on every micro-batch, so per-layer norms"
                " cannot be read there. Use DDP or FSDP2 (`ModelParallelStrategy`)."
            )
        if isinstance(trainer.strategy, lightning_types("strategies.FSDPStrategy")):
            raise MisconfigurationException(
                f"GradGuard does not support `FSDPStrategy` (FSDP1, got `{strategy}`): its flattened, sharded"
                " parameters do not map to layers. Use `ModelParallelStrategy` (FSDP2, `fully_shard`), which GradGuard"
                " supports."
            )

    def _note_rates(self, trainer: pl.Trainer) -> None:
        """Compare each optimizer's rates as `configure_optimizers` gives them (or a `LearningRateFinder` callback
        set them) with the last fit's (the same model fitted again; a resume from a checkpoint brings its own rates,
        and is no change)."""
        self._rates_changed.clear()
        resumed = _resumed(trainer)
        for optimizer in trainer.optimizers:
            if _placeholder(optimizer):
                continue
            key = self._optimizer_key(trainer, optimizer)
            # A schedule's base (`initial_lr`): a warm-up from 0 has already set `lr` to 0 here.
            rates = _base_rates(optimizer)
            before = self._fit_rates.get(key)
            if before is not None and not resumed and _rates_differ(before, rates):
                self._rates_changed[key] = f"{_rates_text(before)} -> {_rates_text(rates)}"
            self._fit_rates[key] = rates

    def _forget_rate(self, key: int, engine: GuardEngine, change: str) -> None:
        """The same model fitted again at another rate (a rate set by hand or by `Tuner.lr_find` between fits): the
        cut and the rescue clipping found at the old rate say nothing about the new one (a cut to 0.5x of 3.0 went on
        halving a rate of 0.0012)."""
        scale = self.lr_guard.scale(key) if self.lr_guard is not None else 1.0
        rescuing = engine.rollback is not None and engine.rollback.rescuing
        if scale == 1.0 and not rescuing:
            return
        if self.lr_guard is not None:
            self.lr_guard.forget(key)
        self._trouble.pop(key, None)
        counts = engine.host_counts
        self._counts_base[key] = (counts["lr_reduced"], counts["rolled_back"])
        if rescuing:
            engine.rollback.stop_rescue()  # type: ignore[union-attr]
        dropped = [f"its {scale:.3g}x multiplier"] * (scale != 1.0) + ["the rescue clipping"] * rescuing
        rank_zero_info(
            f"GradGuard: optimizer {key}'s learning rate changed since the last fit ({change}): what the guard found at"
            f" the old rate starts afresh ({', '.join(dropped)})."
        )

    def _start_over(self, why: str) -> None:
        """The guard reused for another model (a sweep, a notebook): the previous model's statistics, counts, lowered
        rate and early-restart window say nothing about this one (they kept its rescue off and its rate cut)."""
        self._release_hooks()
        self._reset_run_state()
        self._fit_rates.clear()
        self._trouble.clear()
        self._counts_base.clear()
        self._rates_loaded.clear()
        if self.lr_guard is not None:
            self.lr_guard._feeders.clear()  # the previous model's engines: their last steps are not this model's
            self.lr_guard.load_state_dict({"keys": {}})
        for r in self.regularizers:
            r.load_state_dict(self._initial_regularizer_states[r.name])
        rank_zero_info(f"GradGuard: {why}; its statistics, event counts and learning-rate multiplier start afresh.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._opt_keys.clear()  # a new fit brings new optimizer objects
        # Before a checkpoint's rates are restored. Lightning runs a LearningRateFinder or BatchSizeFinder callback
        # first, wherever it is listed: a finder's rate is set by now.
        self._note_rates(trainer)
        index = build_layer_index(pl_module, self.group_depth, self.group_fn, include_frozen=True)
        _check_fit(self, trainer, index)
        self._model_index = index
        self._unbound = bind_all(self.regularizers, pl_module, wait_for_lazy=True)  # the rest at the first step
        sharded = any(hasattr(p, "placements") for p in index.params)
        if sharded and any(isinstance(r, Orthogonal) for r in self.regularizers):
            raise MisconfigurationException(
                "GradGuard: the Orthogonal regularizer needs whole weight matrices (W^T W), but the parameters are"
                " sharded DTensors (FSDP2). Use L1/L2 with FSDP2, or Orthogonal with DDP."
            )
        if sharded and isinstance(self.clip, AdaGC):
            raise MisconfigurationException(
                "GradGuard(clip=AdaGC(...)) clips each parameter by its whole gradient norm, but the parameters are"
                " sharded DTensors (FSDP2). Use ZClip, AutoClip, NormClip or AGC with FSDP2, or AdaGC with DDP."
            )
        before, after = gradient_callbacks(trainer, self)
        # Trainer(gradient_clip_val=...) clips after this hook: folded into the engines' clipping (see _trainer_clip)
        # unless other gradient hooks run in between.
        between = [f"the LightningModule's {hook}" for hook in later_hooks(pl_module, clipping_hook=False)]
        between += [f"callback {name}" for name in after]
        self._clip_norm = take_over_clipping(trainer, pl_module, self.clip, between)
        # With `gradient_clip_val`, an own `configure_gradient_clipping` got a warning from the take-over instead.
        hooks = later_hooks(pl_module, clipping_hook=not (trainer.gradient_clip_val or self._clip_norm))
        if between and trainer.gradient_clip_val and not overrides_hook(pl_module, "configure_gradient_clipping"):
            # The line about the clipping staying Lightning's named them and what they see on a skipped step.
            self._noted_hooks, after = True, []
        if hooks and not self._noted_hooks:
            self._noted_hooks = True  # once per guard: the same module class fits again
            rank_zero_info(
                f"GradGuard: the LightningModule's own {' and '.join(hooks)} run(s) after GradGuard's hook. If they"
                " change the gradients (clip or scale them), GradGuard's total_norm, clip_coef, events and decisions"
                " describe the gradients before that change. On a step GradGuard skips (a non-finite or, with"
                " skip_exploding, a flagged one), every gradient they see is None."
            )
        if (before or after) and not self._noted_callbacks:
            self._noted_callbacks = True
            # A user trial's callback listed first clipped a 10^4x spike before GradGuard saw it: no event, no word.
            said = []
            if before:
                said.append(
                    f"{', '.join(before)} run(s) `on_before_optimizer_step` before GradGuard: if they clip or scale the"
                    " gradients, GradGuard measures and judges the changed ones (a clip there hides spikes from its"
                    " detectors); list GradGuard first in `callbacks=[...]` to judge the gradients as computed."
                )
            if after:
                said.append(
                    f"{', '.join(after)} run(s) `on_before_optimizer_step` after GradGuard: GradGuard's figures"
                    " describe the gradients before them, and on a step GradGuard skips every gradient they see is"
                    " None."
                )
            rank_zero_info("GradGuard: callback(s) " + " Callback(s) ".join(said))
        if self.saturation:
            self._saturation = SaturationMonitor(pl_module)
        if self._next_log_step == 0:
            self._next_log_step = _lightning_step(trainer) + self._log_every(trainer)
        self._last_stamp = None
        self._fit_batches, self._warned_unguarded = 0, False
        self._in_step.clear()
        self._losses.clear()  # a loss left over by an earlier fit that ended between backward and step
        self._hint_due.clear()  # a hint an earlier fit that took no step left waiting
        self._modules_joined = False  # this fit's hooks are placed on the model as it is now
        self._unowned = None
        self._samples, self._samples_at_step, self._batch_samples = 0, {}, None
        self._window_batches, self._batch_fresh = 0, False
        self._layout, self._layout_run, self._odd_layout = None, 0, None
        self._diag.start_fit(self, trainer, pl_module, index)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluating = False
        restore_clipping(trainer)
        self._unbind_log()

    def _unbind_log(self) -> None:
        """Drop the module's ``log``/``log_dict`` that Lightning binds to every callback at each run: they held the
        module (and through it the Trainer and the optimizers' state) alive as long as this guard. GradGuard logs
        through the module it is given; Lightning binds them again at the next run."""
        self.__dict__.pop("log", None)
        self.__dict__.pop("log_dict", None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The histogram schedule: a resumed run goes on from its checkpoint's; another Trainer counts its steps from
        # its own start (a checkpoint without the count, from where it resumed); the same Trainer fitting again goes on.
        if self._hist_loaded is not None:
            self._last_hist_count = self._hist_loaded
        elif self._hist_trainer is None or self._hist_trainer() is not trainer:
            self._last_hist_count = _lightning_step(trainer)
        self._hist_loaded, self._hist_trainer = None, weakref.ref(trainer)
        # Every optimizer gets its state now, so tags and the dashboard know all of them from the first log.
        for optimizer in trainer.optimizers:
            if _placeholder(optimizer):
                # Said once, here: the warning at the end about batches without a guarded step would repeat it.
                self._warned_unguarded = True
                rank_zero_warn(
                    "GradGuard: `configure_optimizers` returned None, so Lightning trains with no optimizer and"
                    " GradGuard guards nothing in this fit. It guards the optimizers that `configure_optimizers`"
                    " returns (stepped by Lightning or through `self.optimizers()`), not one created and stepped"
                    " inside `training_step`."
                )
                continue
            key = self._optimizer_key(trainer, optimizer)
            engine = self._state_for(trainer, optimizer, key)
            if key in self._rates_changed:
                self._forget_rate(key, engine, self._rates_changed.pop(key))
            counts = engine.host_counts
            rescuing = engine.rollback is not None and engine.rollback.rescuing
            self._counts_before[key] = (counts["lr_reduced"], counts["rolled_back"], rescuing)
            if _resumed(trainer):
                # The same fit: its lines say all it did, with the rates it started with (SWA's, restored as
                # `initial_lr`, would be taken for the base).
                self._counts_before.pop(key)
                self._start_rates[key] = self._rates_loaded.get(key) or _base_rates(optimizer)
            else:
                # Each group's base rate now (SWA later overwrites `initial_lr` with its `swa_lrs`).
                self._start_rates[key] = _base_rates(optimizer)
            if "update_ratio" in self._diag_on:
                held = (p for group in optimizer.param_groups for p in group["params"])
                if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in held):
                    # A lazy module's weights exist from its first forward pass on: judged at the first step.
                    self._hint_due.add(key)
                else:
                    self._hint_step_size(trainer, optimizer, key, engine)
            if self.lr_guard is not None and _sizes_own_steps(optimizer):
                rank_zero_warn(
                    f"GradGuard: optimizer {key} ({type(unwrap_optimizer(optimizer)).__name__}) has no lr in any param"
                    " group (lr=None, or no 'lr' key): it sizes its own steps (e.g. Adafactor(relative_step=True)) or"
                    " names its rate otherwise, so the LR guard and"
                    " the rollback (a restart goes with a lower rate) are off for it. Clipping, skipping and the"
                    " detectors still act; give it an explicit lr for the LR guard."
                )
            elif self.lr_guard is not None and key not in self._lr_hooks:
                self._lr_hooks[key] = self.lr_guard.attach(optimizer, key)
            if key not in self._step_hooks:
                self._step_hooks[key] = self._watch_steps(optimizer, key)
        # Every process must judge the same steps short: only where their batches are the same size (the loaders
        # are known from here on).
        self._count_samples = same_batch_size_on_every_rank(trainer)
        every, done = self._log_every(trainer), _lightning_step(trainer)
        # `_next_log_step` counts batches that stepped, as Lightning's `batches_that_stepped + 1`. Out of
        # (done, done + every]: a stale value, or one left by an earlier fit of a Trainer that ran further (the guard
        # reused with a new Trainer, which starts at step 0). One more for a value restored from a checkpoint: one
        # written at a batch's end (ModelCheckpoint(every_n_train_steps=...)) holds the count before that batch's
        # own increment, which Lightning adds after this hook on resume.
        restored, self._log_step_restored = self._log_step_restored, False
        if not done < self._next_log_step <= done + every + restored:
            self._next_log_step = (done // every + 1) * every

    def _hint_step_size(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, key: int, engine: GuardEngine
    ) -> None:
        """Warn when an Adam-type optimizer's rate (its schedule's peak) is large against the weights it trains: such
        a run can train far worse than at a lower rate without a gradient ever exploding, which is all the LR guard
        and the rollback act on (see :data:`~lightning_gradguard.diagnostics.STEP_SIZE_HIGH`)."""
        kind, rates = self._schedule_bases(trainer, key)
        index = engine.index
        names = {id(p): name for p, name in zip(index.params, index.param_names)}
        size = adaptive_step_ratio(optimizer, rates, names)
        if size is None or size.ratio <= STEP_SIZE_HIGH:
            return
        shown = {rate for rate in rates if rate is not None}
        rate = f"its {kind} rate {shown.pop():.3g} is" if len(shown) == 1 else f"its {kind} rates are"
        rank_zero_warn(
            f"GradGuard: optimizer {key} ({type(unwrap_optimizer(optimizer)).__name__}) moves each weight by about its"
            f" learning rate per step, and {rate} {size.ratio:.2g}x the typical size of the weights it trains (the"
            f" median root-mean-square of its {size.tensors} weight tensors: {size.rms:.2g}; {size.worst!r}:"
            f" {size.worst_ratio:.2g}x). Steps that size rewrite such weights within a few steps, and a run can train"
            " far worse than at a lower rate without a gradient ever exploding, which is what GradGuard acts on. Tuned"
            f" Adam rates usually sit below {STEP_SIZE_HIGH:g}x (the best of a sweep at 0.09-0.2x in GradGuard's"
            " trials): try a rate 3-10x lower, or `Tuner.lr_find`. (`GradGuard(diagnostics=[...])` without"
            " 'update_ratio' turns this off.)",
            category=UserWarning,
        )

    def _log_every(self, trainer: pl.Trainer) -> int:
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        every = getattr(trainer, "log_every_n_steps", None)
        if every is None:
            return 50
        # Trainer(log_every_n_steps=0) (and barebones=True) logs no step: GradGuard logs the last window only, at the
        # end of training.
        return int(every) if every > 0 else _NEVER

    def _optimizer_key(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        key = self._opt_keys.get(id(optimizer))
        if key is None:
            for i, opt in enumerate(trainer.optimizers):
                if opt is optimizer or unwrap_optimizer(opt) is optimizer:
                    key = i
                    break
            else:
                key = len(trainer.optimizers) + len(self._opt_keys)
            self._opt_keys[id(optimizer)] = key
        return key

    def _running_stats_of(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, index: LayerIndex
    ) -> RunningStats | None:
        """The running statistics an optimizer's engine keeps from harm: with one optimizer every normalization
        layer's and observer's, with several those of the layers it trains (another optimizer's rollback leaves them
        alone), the first optimizer's also those of the observers that own no parameter (an input's fake-quantize)."""
        if self.on_nonfinite not in ("skip", "zero"):  # "warn" and "raise" keep nothing from harm
            return None
        several = len(trainer.optimizers) > 1
        first = several and unwrap_optimizer(trainer.optimizers[0]) is unwrap_optimizer(optimizer)
        stats = RunningStats(trainer.lightning_module, index.params if several else None, unowned=first)
        return stats if len(stats) else None

    def _state_for(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, key: int) -> GuardEngine:
        # The first parameter's identity tells a new model (the guard reused for another fit) from the same one; the
        # engine holds its parameters, so their ids cannot be reused while it lives.
        signature = tuple((len(g["params"]), id(g["params"][0]) if g["params"] else 0) for g in optimizer.param_groups)
        kind = type(unwrap_optimizer(optimizer))
        if self._optimizer_types.get(key, kind) is not kind:
            # Another optimizer at this key (the same model refitted with another `configure_optimizers`): an SGD
            # after a SAM kept the SAM's engine, unclipped, and an LBFGS after an SGD the SGD's, clipped. Its engine
            # is built afresh, and whether it evaluates several times is found out afresh.
            self._reevaluating.discard(key)
            self._signatures.pop(key, None)
        self._optimizer_types[key] = kind
        engine = self._states.get(key)
        if engine is not None and self._signatures.get(key) == signature:
            return engine
        assert self._model_index is not None, "GradGuard.on_fit_start did not run"
        held = [p for g in optimizer.param_groups for p in g["params"]]
        known = {id(p) for p in self._model_index.params}
        if any(id(p) not in known for p in held):
            # A module created after the fit began (a new head given to the optimizer with add_param_group).
            self._model_index = build_layer_index(
                trainer.lightning_module, self.group_depth, self.group_fn, include_frozen=True
            )
            self._modules_joined = True
        index = self._model_index.subset(held)
        self._diag.forget(key)
        if not index.params:
            raise MisconfigurationException(
                f"GradGuard: optimizer {key} holds none of the LightningModule's parameters."
            )
        outside = len({id(p) for p in held if not is_empty(p)}) - len(index.params)
        if outside and key not in self._warned_outside:
            self._warned_outside.add(key)
            rank_zero_warn(
                f"GradGuard: optimizer {key} holds {outside} parameter(s) that are not the LightningModule's (no"
                " submodule registers them): they are neither measured nor clipped, and a skipped step drops their"
                " gradients too. Register them on the module (e.g. as an `nn.Parameter` attribute) to have them"
                " guarded."
            )
        reevaluating = self._reevaluates(optimizer, key)
        # No rate to lower (lr=None): no LR guard, and no rollback, whose restart goes with a lower rate.
        sizes_own_steps = _sizes_own_steps(optimizer)
        new = GuardEngine(
            index,
            # A quasi-Newton step builds its curvature estimate from differences of the gradients of its
            # evaluations: clipping one of them bends that estimate (an LBFGS run ended at 1.8x the loss).
            clip=None if reevaluating else copy.deepcopy(self.clip),
            exploding=copy.deepcopy(self.exploding),
            vanishing=copy.deepcopy(self.vanishing),
            divergence=copy.deepcopy(self.divergence) if self._watches_loss(trainer) else None,
            lr_guard=None if sizes_own_steps else self.lr_guard,
            regularizers=self.regularizers,
            on_nonfinite=self.on_nonfinite,
            clip_exploding=self.clip_exploding and not reevaluating,
            skip_exploding=self.skip_exploding or (reevaluating and self._skip_in_place_of_clip(optimizer)),
            compile=self.compile,
            key=key,
            max_norm=self._clip_norm,
            rollback=None if sizes_own_steps else copy.deepcopy(self.rollback),
            running_stats=self._running_stats_of(trainer, optimizer, index),
        )
        if engine is not None:
            # A param group was added (fine-tuning schedule) or a new model came: keep the counters, restart
            # per-layer statistics.
            new.carry_over(engine)
        new._warned_unwatched = True  # said above, in GradGuard's words
        self._restore_optimizer_state(key, new)
        self._states[key] = new
        self._reporter.forget(key)
        self._restore_warned(key)
        self._signatures[key] = signature
        return new

    def _follow_new_modules(self, pl_module: pl.LightningModule) -> None:
        """Give modules created after the fit began the activation hooks too: a block added with `add_param_group`
        got per-layer norms but no `act_grad` or `saturation` chart, which a run resumed after it had (a user trial).
        Both are measured anew from the module's current submodules, between steps (never while armed)."""
        act = self._diag.act
        if self._sat_armed or (act is not None and act.armed):
            return  # a measurement under way: the next batch start
        self._modules_joined = False
        if self._saturation is not None:
            self._saturation = SaturationMonitor(pl_module)
        if self._model_index is not None:
            self._diag.follow_modules(pl_module, self._model_index)

    def _reevaluates(self, optimizer: torch.optim.Optimizer, key: int) -> bool:
        """Whether ``optimizer``'s step evaluates the closure several times: LBFGS, or one seen doing it."""
        if key in self._reevaluating:
            return True
        if not isinstance(unwrap_optimizer(optimizer), torch.optim.LBFGS):
            return False  # found out on its first step instead, if it does (`_repeated_evaluation`)
        self._reevaluating.add(key)
        self._warn_reevaluating(optimizer, key)
        return True

    def _skip_in_place_of_clip(self, optimizer: torch.optim.Optimizer) -> bool | Literal["first"]:
        """The engine's ``skip_exploding`` for an optimizer that evaluates the closure several times: which of the
        steps this guard would clip for the exploding detector (``clip_exploding``) it skips instead."""
        if self.clip is None or not self.clip_exploding or self.exploding is None:
            return False
        # Its gradients cannot be clipped, so a flagged step is skipped whole (with every later evaluation): a
        # closure-form SAM given a 10^4x batch stepped it unclipped and never trained again. For LBFGS the first of a
        # stretch only: its own overshoots leave weights on which every batch is flagged, and it recovers only by
        # stepping on (skipping the stretch turned a healthy LBFGS regression that recovered by itself into a
        # blow-up, MSE 0.015 -> 8e13).
        return "first" if isinstance(unwrap_optimizer(optimizer), torch.optim.LBFGS) else True

    def _warn_reevaluating(self, optimizer: torch.optim.Optimizer, key: int) -> None:
        if self.clip is None:
            return  # nothing this guard would have done is left out (clip_exploding needs a clipper)
        name = type(unwrap_optimizer(optimizer)).__name__
        skip = self.skip_exploding or self._skip_in_place_of_clip(optimizer)
        skipped = {
            True: " or that the exploding detector flags",
            "first": " or that the exploding detector flags after an unflagged one",
        }.get(skip, "")
        rank_zero_warn(
            f"GradGuard: optimizer {key} ({name}) evaluates the closure several times per step, and Lightning runs"
            " `on_before_optimizer_step` on each evaluation. GradGuard measures the first evaluation of each step, and"
            " its clipper clips none of them (the step combines the gradients of all its evaluations: LBFGS builds its"
            " curvature estimate from them, SAM steps with the one at its perturbed weights, and clipping some of them"
            " bends the step); regularizers act on every evaluation, a step whose first evaluation is non-finite"
            f"{skipped} is skipped whole (every evaluation of it), and the LR guard and the rollback still act.",
            category=UserWarning,
        )

    def _watch_steps(self, optimizer: torch.optim.Optimizer, key: int) -> tuple[Any, Any]:
        """Hooks on ``optimizer.step()`` that open and close its count of closure evaluations (the hook calls made
        inside it: Lightning evaluates the closure from within the step, except under a GradScaler, which is never
        given a closure that it re-evaluates), and note the learning rate the step runs with."""

        def began(opt: torch.optim.Optimizer, *_: Any) -> None:
            self._in_step[key] = 0
            # Registered after the LR guard's hook: the rate is the one this step applies, which the scheduler and
            # the LR guard move on from before the log is written. A tensor rate is copied (a scheduler fills it in
            # place), and read when the log is written (reading it now would wait for the device).
            lr = opt.param_groups[0].get("lr")
            if isinstance(lr, Tensor):
                lr = lr.detach().clone()
            scale = self.lr_guard.scale(key) if key in self._lr_hooks and self.lr_guard is not None else None
            self._step_rates[key] = (lr, scale)

        def ended(*_: Any) -> None:
            self._in_step.pop(key, None)

        # A wrapper that never ran ``Optimizer.__init__`` (a Lookahead, written the common way) has no hooks of its
        # own: the optimizer it wraps steps inside its step, and evaluates the closure there.
        stepping = unwrap_optimizer(optimizer)
        return stepping.register_step_pre_hook(began), stepping.register_step_post_hook(ended)

    def _repeated_evaluation(self, optimizer: torch.optim.Optimizer, key: int) -> bool:
        """``True`` when this hook call is a further closure evaluation inside an ``optimizer.step()`` whose first
        one the guard has already seen (it then applies only what every evaluation needs)."""
        seen = self._in_step.get(key)
        if seen is None:
            return False  # outside a step: the closure ran before it (a GradScaler), or the hook was called directly
        self._in_step[key] = seen + 1
        if seen == 0:
            return False
        if key not in self._reevaluating:
            # Found out on its first step: the engine was built with a clipper; the next step gets one without.
            self._reevaluating.add(key)
            self._signatures.pop(key, None)
            self._warn_reevaluating(optimizer, key)
        self._losses.pop(key, None)  # the trial points' losses are not the step's
        self._unowned = None
        engine = self._states[key]
        if engine.skipped:
            # The step's first evaluation was skipped: so is the rest of the step. A SAM-style step applies the
            # gradient of its second evaluation, which a bad batch makes non-finite as well.
            for p in engine.index.params:
                p.grad = None
            return True
        engine.add_regularizer_grads_()  # part of the objective, at every point the optimizer evaluates
        if self._clip_norm is not None:  # Trainer(gradient_clip_val=...) clips every evaluation, as Lightning does
            torch.nn.utils.clip_grad_norm_([p for p in engine.index.params if p.grad is not None], self._clip_norm)
        return True

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_stepped = False
        single = trainer.world_size == 1  # under several processes each rank's shapes may differ, and so its decisions
        layout = batch_layout(batch) if self._count_samples or single else ()  # read once, only where it is used
        self._batch_samples = layout_batch_size(layout) if self._count_samples else None
        self._batch_fresh = True
        if single:
            self._note_layout(layout)
        # Activation hooks exist only for the forward passes that lead to a logging step (every micro-batch of an
        # accumulation window sees the same `batches_that_stepped`).
        due = _lightning_step(trainer) + 1 >= self._next_log_step
        if self._modules_joined:
            self._follow_new_modules(pl_module)
        if self._saturation is not None and not self._sat_armed and due:
            self._saturation.arm()
            self._sat_armed = True
        if self._diag.enabled and due:
            self._diag.batch_start(trainer, batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._diag.backward_began()
        if loss.numel() != 1 or not self._watches_loss(trainer):
            return
        value = loss.detach()
        if value.dtype != torch.float32:  # summed over micro-batches: in fp32
            value = value.float()
        scale = loss_scale(grad_scaler(trainer))
        if scale is not None:
            value = value / (scale if scale.device == value.device else scale.to(value.device))  # 16-mixed: scaled
        owner = self._loss_owner(trainer)
        if owner is None:
            # Several optimizers train on this pass: the loss belongs to the step that follows it, if no other
            # backward pass comes first (an unowned loss left waiting across another backward pass is dropped).
            # Summed into whichever optimizer stepped next, a slow critic's accumulated loss made its actor's
            # detector see a divergence, and the healthy actor was cut and restarted.
            self._unowned = value
            return
        self._unowned = None
        # Lightning divides each micro-batch's loss by the accumulation: the sum is the window's mean.
        pending = self._losses.get(owner)
        self._losses[owner] = value if pending is None else pending + value

    def _loss_owner(self, trainer: pl.Trainer) -> int | None:
        """The key of the optimizer whose step a backward pass's loss belongs to: the only optimizer, or with several
        the only one whose parameters require gradients (``LightningModule.toggle_optimizer`` freezes the others' for
        the pass). ``None``: it cannot be told."""
        optimizers = trainer.optimizers
        if len(optimizers) == 1:
            return self._optimizer_key(trainer, optimizers[0])
        live = [opt for opt in optimizers if any(p.requires_grad for g in opt.param_groups for p in g["params"])]
        return self._optimizer_key(trainer, live[0]) if len(live) == 1 else None

    def _step_samples(self, key: int) -> int | None:
        """The examples behind this optimizer's step: those of the batches since its last step."""
        seen, self._samples_at_step[key] = self._samples_at_step.get(key, 0), self._samples
        if seen is None or self._samples is None or self._samples <= seen:
            return None
        return self._samples - seen

    def _window_share(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The share of a full accumulation window behind this step: ``k / N`` for an epoch's last window of ``k``
        batches, whose losses Lightning divided by ``N = accumulate_grad_batches`` all the same; else 1."""
        batches, self._window_batches = self._window_batches, 0
        window = trainer.accumulate_grad_batches
        if not pl_module.automatic_optimization or not 0 < batches < window:
            return 1.0  # manual optimization scales its own losses
        return batches / window

    def _watches_loss(self, trainer: pl.Trainer) -> bool:
        """Whether the divergence detector watches this fit's losses."""
        return self.divergence is not None and not (self._divergence_default and len(trainer.optimizers) > 1)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._diag.backward_ended()
        if self._diag.pending_size is not None:
            self._diag.after_backward(trainer)
        # A batch counts once, at its first backward: a training_step that returned None adds no examples to a step,
        # and the second backward of a GAN's batch (or of a closure evaluated again) the same ones.
        if self._batch_fresh:
            self._window_batches, self._batch_fresh = self._window_batches + 1, False
        if self._count_samples and self._samples is not None and self._batch_samples != 0:
            size, self._batch_samples = self._batch_samples, 0
            self._samples = None if size is None else self._samples + size

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._unbound:  # a lazy module, whose parameters the first forward pass created
            self._unbound = bind_all(self._unbound, pl_module)
        if _placeholder(optimizer):
            return
        key = self._optimizer_key(trainer, optimizer)
        if self._repeated_evaluation(optimizer, key):
            return
        engine = self._state_for(trainer, optimizer, key)
        if key in self._hint_due:
            self._hint_due.discard(key)
            self._hint_step_size(trainer, optimizer, key, engine)
        self._drain(trainer, engine, key)

        scaler = grad_scaler(trainer)
        grad_scale: Tensor | None = None
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) and scaler._scale is not None:
            # Fused optimizers unscale inside step(): the gradients here are still multiplied by the loss scale.
            grad_scale = scaler._scale
        # A step whose gradients the engine drops (a skip, a rollback) leaves a fused optimizer's scaler no gradient to
        # check for infs: it unscales them first, so that its update() finds the check it needs (this step only).
        if grad_scale is not None:
            engine.before_drop = functools.partial(unscale_once, scaler, unwrap_optimizer(optimizer))
        # Events are stamped with Lightning's step for this batch, the x-axis value of its `self.log` metrics and of
        # GradGuard's scalars. The LR multiplier is applied by the guard's own optimizer step pre/post hooks (see
        # `LRGuard.attach`), so a step that GradScaler skips never shows the lowered LR to a scheduler.
        stamp = _lightning_step(trainer)
        self._batch_stepped, self._last_stamp = True, stamp
        logging = self._diag.enabled and stamp + 1 >= self._next_log_step
        if logging:
            self._diag.before_engine_step(self, key, engine, scaler, grad_scale)
        loss, unowned, self._unowned = self._losses.pop(key, None), self._unowned, None
        if unowned is not None:
            loss = unowned if loss is None else loss + unowned
        samples = self._step_samples(key)
        share = self._window_share(trainer, pl_module)
        try:
            stats = engine.step(
                stamp,
                grad_scale=grad_scale,
                grad_scaler=scaler is not None,
                optimizer=optimizer,
                loss=loss,
                samples=samples,
                share=share,
            )
        finally:
            engine.before_drop = None  # holds the scaler and the optimizer: not beyond the step
        if engine.rolled_back:
            self._note_trouble(trainer, key)
            restart_weight_averages(trainer)
            self._table_row(
                trainer, key, stamp, "rolled_back", "(weights)", math.nan, self._rollback_action(key, engine)
            )
        if engine.skipped and key in self._reevaluating:
            # Skipped, but the step goes on evaluating: a SAM-style step climbs along this gradient before its second
            # evaluation, and common implementations stack the gradients they find (none: an error). Zeros move
            # nothing, and for LBFGS read as None does (converged: no move); the later evaluations are skipped too.
            for p in engine.index.params:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        if logging:
            self._diag.after_engine_step(key, engine)
        if stats is not None and self._histogram_due(stamp + 1):
            self._hist_taken = True  # on every rank: the schedule is part of the state, the same on each
            if self._may_write_board(trainer):
                self._sample_histograms(key, engine, stats)

    def _drain(self, trainer: pl.Trainer, engine: GuardEngine, key: int) -> None:
        """Turn the steps the engine reports into raises and warnings (the LR guard already acted on them)."""
        for event in engine.drain():
            self._on_event(trainer, engine, key, event)

    def _table_row(
        self, trainer: pl.Trainer, key: int, step: int, kind: str, layer: str, value: float, action: str
    ) -> None:
        """A row of the events table for what the guard did (a cut, a rollback) or found beyond the layers."""
        if self._may_write_board(trainer):
            self._reporter.rows.append(
                {"step": step, "kind": kind, "layer": layer, "value": value, "opt": key, "action": action}
            )

    def _rollback_action(self, key: int, engine: GuardEngine) -> str:
        rollback = engine.rollback
        assert rollback is not None
        # The copy's step counts the engine's steps, as ``engine.steps`` does (the rolled-back step included).
        undone = engine.steps - rollback.copy_step
        action = (
            "restarted from the initial weights"
            if rollback.copy_step <= 1
            else f"back {undone} step{'s' if undone != 1 else ''}, to the last calm copy"
        )
        if rollback.rescuing:
            action += f", {type(rollback.rescue).__name__} clipping from now on"
        if self.lr_guard is not None:  # the cuts taken on the abandoned weights are undone (LRGuard.rewind)
            action += f", rate {self.lr_guard.scale(key):.3g}x its schedule"
        return action

    def _on_event(self, trainer: pl.Trainer, engine: GuardEngine, key: int, event: StepEvent) -> None:
        if (event.lr_reduced or event.lr_restored) and event.lr_scale is not None:
            scale = event.lr_scale  # as the change left it: flags landing late, a rollback may have rewound it since
            kind, why = (
                ("lr_restored", "the cut for the non-finite run withdrawn (a calm step followed it), ")
                if event.lr_restored
                else ("lr_reduced", "")
            )
            self._table_row(trainer, key, event.step, kind, "(rate)", scale, f"{why}rate {scale:.3g}x its schedule")
            if event.lr_reduced:
                self._note_trouble(trainer, key)
        if event.exploding and self.on_exploding == "raise":
            raise GradientExplosionError(
                f"GradGuard: exploding gradients at step {event.step} (optimizer {key}); see"
                f" {engine.layer_report('exploding')}."
            )
        if event.vanishing and self.on_vanishing == "raise":
            raise VanishingGradientError(
                f"GradGuard: vanishing gradients at step {event.step} (optimizer {key}) in"
                f" {engine.layer_report('vanishing')}."
            )
        if event.diverging:
            self._on_diverging(trainer, engine, key, event.step)
        if event.nonfinite and self.on_nonfinite == "warn":
            # Once per optimizer: an applied non-finite step usually makes every later step non-finite too.
            warned = self._reporter.warned.setdefault(key, set())
            if ("(applied)", "nonfinite") not in warned:
                warned.add(("(applied)", "nonfinite"))
                rank_zero_warn(
                    f"GradGuard: non-finite gradients at step {event.step} (optimizer {key}); the step was applied"
                    " (`on_nonfinite='warn'`). Later non-finite steps are applied without a warning; `summary()"
                    "['nonfinite']` counts them."
                )

    def _on_diverging(self, trainer: pl.Trainer, engine: GuardEngine, key: int, step: int) -> None:
        action = self._reporter.explode_action(engine, diverging=True)
        self._table_row(trainer, key, step, "diverging", "(loss)", math.nan, action)  # as the per-layer events
        if self.on_diverging == "ignore":
            return
        message = f"GradGuard: the training loss diverged at step {step} (optimizer {key})"
        det = engine.divergence
        if det is not None:
            message += (
                f": for {det.patience} steps in a row it stayed above {det.ratio:g}x its running mean and above the"
                " first loss GradGuard saw (the untrained model's)"
            )
            if det.start_ratio is not None:
                message += f", or above {det.start_ratio:g}x that first loss"
        if self.on_diverging == "raise":
            raise LossDivergenceError(message + ".")
        rank_zero_warn(f"{message}. Action: {action}.")

    def _histogram_due(self, count: int) -> bool:
        """Whether the batch numbered ``count`` (``batches_that_stepped + 1``) logs and reached a new multiple."""
        every = self.histogram_every_n_steps
        return every is not None and count >= self._next_log_step and count // every > self._last_hist_count // every

    def _may_write_board(self, trainer: pl.Trainer) -> bool:
        """False where nothing would be written: other ranks, or this Trainer has no TensorBoardLogger."""
        if not trainer.is_global_zero:
            return False
        same = self._board_trainer is not None and self._board_trainer() is trainer
        return not (same and self._board is None)

    def _image_due(self, count: int) -> bool:
        """Pictures at the first log, then on the log that reaches each multiple of ``image_every_n_steps``."""
        every = self.image_every_n_steps
        last = self._last_image_count
        return every is not None and (last is None or count // every > last // every)

    def _sample_histograms(self, key: int, engine: GuardEngine, stats: StepStats) -> None:
        from lightning_gradguard.board import histogram_blocks, sample_gradients
        from lightning_gradguard.render import block_name
        from lightning_gradguard.stats import _dense, _local

        # Histograms take plain tensors: a DTensor's local shard, a sparse gradient's stored values.
        index = engine.index
        named = [
            (index.names[index.layer_of_param[i]], _dense(_local(g))) for i, g in zip(stats.param_indices, stats.grads)
        ]
        # Blocks are the first two name components ("encoder.3.linear" -> "encoder.3"), or ranges of layers where
        # those are too many (a flat ModuleList). Cut over the whole model, frozen layers included, so that every
        # optimizer's share of a block gets the block's name (the samples are merged by name) and the names stay
        # when layers join (20 ms for 1500 layers, on histogram steps only).
        model = self._model_index
        blocks = histogram_blocks(model.names) if model is not None else {}
        self._hist_samples[key] = sample_gradients(named, lambda name: blocks.get(name) or block_name(name, depth=2))

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for key, engine in self._states.items():
            self._drain(trainer, engine, key)
        self._fit_batches += 1
        # Lightning's rule (`LoggerConnector.should_update_logs`): log a batch that ran an optimizer step when
        # `batches_that_stepped + 1` reaches a multiple, or when training was asked to stop.
        count = _lightning_step(trainer) + 1
        due = count >= self._next_log_step or trainer.should_stop
        if self._batch_stepped and due and any(e.steps_since_log for e in self._states.values()):
            self._flush(trainer, pl_module, count - 1)
            if count >= self._next_log_step:
                every = self._log_every(trainer)
                self._next_log_step = (count // every + 1) * every

    def _note_layout(self, layout: tuple[tuple[int, ...], ...]) -> None:
        """When the batches' shapes change for good (a curriculum that lengthens its sequences or resizes its
        images), the divergence detectors forget the lowest level of the loss (:meth:`DivergenceDetector.forget_floor`):
        a loss summed over a sequence length doubled every 50 steps climbed in stages of 2-5x and, 10x past the
        level of its first stage, was judged a divergence at its fourth: the run restarted from its initial weights
        (held-out +827%). The clipper's and the other detectors' statistics are kept, so a bad batch at the change
        is judged as any other.

        A change is lasting at the second batch in a row of another layout, after at least ``_SETTLED_LAYOUT``
        batches of one: a single odd batch (an epoch's short last one) changes nothing, nor do shapes that vary from
        batch to batch (bucketed or padded lengths), which never settle, nor a change of the batch size alone."""
        if layout == self._layout:
            self._layout_run += 1
            self._odd_layout = None
            return
        if layout != self._odd_layout:
            self._odd_layout = layout
            return
        if self._layout_run >= _SETTLED_LAYOUT and not _resized(self._layout, layout):
            for engine in self._states.values():
                if engine.divergence is not None:
                    engine.divergence.forget_floor()
        self._layout, self._layout_run, self._odd_layout = layout, 2, None

    def _last_step(self, trainer: pl.Trainer) -> int:
        """The latest optimizer step, as Lightning numbers it: the row the steps since the last log end with."""
        return self._last_stamp if self._last_stamp is not None else max(_lightning_step(trainer) - 1, 0)

    def _warn_if_unguarded(self) -> None:
        """Warn (once per fit) when training batches ran and no optimizer step reached this guard."""
        if self._last_stamp is not None or self._fit_batches == 0 or self._warned_unguarded:
            return
        self._warned_unguarded = True
        rank_zero_warn(
            f"GradGuard: {self._fit_batches} training batch(es) ran and no optimizer step reached GradGuard, so"
            " nothing was measured, guarded or logged. Lightning calls `on_before_optimizer_step` only for the"
            " optimizers of `configure_optimizers`, stepped by Lightning or through `self.optimizers()`: an optimizer"
            " stepped inside the backward pass (`register_post_accumulate_grad_hook`) or a torch optimizer stepped"
            " directly in `training_step` is not guarded.",
            category=UserWarning,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_if_unguarded()
        last = self._last_step(trainer)
        if any(e.steps_since_log for e in self._states.values()):
            self._flush(trainer, pl_module, last, prog_bar=False)
        if self._board is not None and trainer.is_global_zero:
            self._board.close_run(last)
        for key, engine in self._states.items():
            note = self._rate_note(trainer, key, engine)
            if note:
                rank_zero_info(note)
        # Under `ddp_spawn`/`ddp_notebook` this process is a worker and the launching process's GradGuard never sees
        # a step; the launcher sends `callback_metrics` back to it.
        for kind, count in self.summary().items():
            trainer.callback_metrics[f"gradguard/summary/{kind}"] = torch.tensor(float(count))
        self._release_hooks()

    def _rate_note(self, trainer: pl.Trainer, key: int, engine: GuardEngine) -> str:
        """What a run that needed rescuing should change next time: the clipper that rescued it, or the rate the
        guard settled on below its schedule (empty for a run that needed neither)."""
        guard = self.lr_guard
        scale = guard.scale(key) if guard is not None else 1.0
        counts = engine.host_counts
        # Since the multiplier last started afresh: a refit at another rate counted the old rate's cuts too.
        base = self._counts_base.get(key, (0, 0))
        reductions, restarts = counts["lr_reduced"] - base[0], counts["rolled_back"] - base[1]
        which = f" of optimizer {key}" if len(self._states) > 1 else ""
        notes = []
        rollback = engine.rollback
        before = self._counts_before.get(key)
        if rollback is not None and rollback.rescuing and before is not None and before[2]:
            # Nothing new: the line of the fit that restarted, said again at each refit, read as a new restart.
            notes.append(
                f"GradGuard: {rollback.rescue!r} still clips the gradients{which} unit-wise, as it has since an"
                " earlier fit of this model restarted it (see that fit's last line)."
            )
        elif rollback is not None and rollback.rescuing:
            # A divergence of the loss alone restarts with the rescue too: "the gradients exploded" misread it.
            loss = rollback.rescue_cause == "loss"
            trouble = f"the training loss{which} diverged" if loss else f"the gradients{which} exploded"
            # A clipper set from the start is left off an optimizer that evaluates the closure several times (see
            # `_warn_reevaluating`): only the rescue clips its first evaluation, so that advice would do nothing.
            again = (
                "lower the learning rate (a clipper given to GradGuard does not clip an optimizer that evaluates the"
                " closure several times; only this rescue does)"
                if key in self._reevaluating
                else f"clip that way from the start (`GradGuard(clip={rollback.rescue!r})`) or lower the learning rate"
            )
            notes.append(
                f"GradGuard: {trouble} early and the run restarted from its initial weights, with"
                f" {rollback.rescue!r} clipping the gradients unit-wise from then on. To train this setup again,"
                f" {again}."
            )
        # One cut can answer one bad spike; a rollback or repeated cuts say the rate itself was too high. Weights that
        # ended non-finite were the non-finite warning's subject: no rate would have trained them.
        if scale >= 1.0 or (reductions < 2 and not restarts) or self._reporter.broken_weights(key):
            return " ".join(notes)
        if before is not None and before[:2] == (counts["lr_reduced"], counts["rolled_back"]):
            # No cut or rollback in this fit: the earlier fit's advice, said again, read as this fit's.
            notes.append(
                f"GradGuard: the learning rate{which} is still at {scale:.3g}x its scheduled value, where an earlier"
                " fit of this model left it (see that fit's last line)."
            )
            return " ".join(notes)
        done = f"after {reductions} reduction{'s' if reductions != 1 else ''}"
        if restarts:
            done += f" and {restarts} rollback{'s' if restarts != 1 else ''}"
        stalled = self._reporter.stalled_since(key)
        if stalled is not None:
            # The cuts answered a run whose every step was non-finite at any rate: no ceiling for the next run.
            notes.append(
                f"GradGuard: the learning rate{which} ends at {scale:.3g}x its scheduled value {done}, but every step"
                f" since step {stalled} at the latest had non-finite gradients (see the warning about it): the cuts"
                " answered a run that had stopped training, and say nothing about the rate for the next one."
            )
            return " ".join(notes)
        events = engine.summary()  # the end of the fit: the device's counts may be read
        if not (restarts or events["exploding"] or events["diverging"]):
            # Cut for non-finite batches alone, with nothing exploding before or after them: a hand-written BCE whose
            # 0 * log 0 was NaN on 35-50% of the steps got "a ceiling ... a tenth of it", and a tenth trained far worse.
            notes.append(
                f"GradGuard: the learning rate{which} ends at {scale:.3g}x its scheduled value {done}, all for"
                " non-finite gradients with nothing exploding: a loss or data that is non-finite on some batches by"
                " itself (log(0), 0/0, a square root at 0, 0 * log 0 in a hand-written cross-entropy) is the usual"
                " cause, which a lower rate does not cure. This says nothing about the rate for the next run."
            )
            return " ".join(notes)
        rate, ceiling = "", "That rate"
        advice = "start well below it (a tenth of it, or a rate `Tuner.lr_find` finds)"
        if key < len(trainer.optimizers):
            groups = trainer.optimizers[key].param_groups
            scheduled = {float(group["lr"]) for group in groups if group.get("lr") is not None}
            # A scheduler that moved the rate (OneCycleLR's annealed tail, a decay, ReduceLROnPlateau's cuts) makes
            # the last rate no advice for a start: scale the schedule instead, named by its peak or base rate.
            kind, bases = self._schedule_bases(trainer, key)
            moved = any(
                base is not None and group.get("lr") is not None and not math.isclose(base, float(group["lr"]))
                for base, group in zip(bases, groups)
            )
            if len(scheduled) == 1 and not moved and scheduled != {0.0}:
                # The rate the run ends at; where a schedule moved it (a cosine to 0: "lr 0; the schedule says 0",
                # user trial) the schedule's peak is named below instead.
                (lr,) = scheduled
                rate = f" (lr {lr * scale:.3g}; the schedule says {lr:.3g})"
            swa = self._swa_rates(key)
            if swa is not None:
                # The trouble came at StochasticWeightAveraging's rate, which replaced the schedule's: the advice
                # named the base rate, which had trained calmly (user trial).
                ceiling = f"StochasticWeightAveraging's rate (`swa_lrs`) scaled by {scale:.3g}x"
                if len(set(swa)) == 1:
                    ceiling += f" ({swa[0] * scale:.3g} instead of {swa[0]:.3g})"
                advice = "set `swa_lrs` well below that (a tenth of it)"
            elif moved:
                # The last rate is the schedule's, decayed: the ceiling is the schedule scaled.
                ceiling = f"The schedule scaled by {scale:.3g}x"
                if len(set(bases)) == 1 and bases[0] is not None:
                    ceiling += f" (its {kind} rate {bases[0] * scale:.3g} instead of {bases[0]:.3g})"
                advice = "scale it well below that (by a tenth of it)"
        # The guard finds the edge of stability, not the best rate: a user read "start at or below that rate" as the
        # rate to use, 13x and 80x the best of a sweep (a CNN and an LSTM with Adam, user trial).
        notes.append(
            f"GradGuard: the learning rate{which} ends at {scale:.3g}x its scheduled value{rate} {done}. {ceiling} is"
            " a ceiling, the highest that stayed finite here; the best is often ten times lower or more. To train"
            f" this setup again, {advice}. Unless the cuts answered bad batches (bursts of spikes between calm"
            " stretches, in the events): those say nothing about the rate."
        )
        return " ".join(notes)

    def _note_trouble(self, trainer: pl.Trainer, key: int) -> None:
        """Keep the rate optimizer ``key``'s schedule gave its group 0 when the guard cut the rate or rolled back,
        and StochasticWeightAveraging's rates if it trained the optimizer then."""
        if self.lr_guard is not None and key < len(trainer.optimizers):
            optimizer = trainer.optimizers[key]
            rate = host_rate(self.lr_guard.scheduled_rates(optimizer, key)[0])
            self._trouble[key] = (rate, swa_rates(trainer, optimizer))

    def _swa_rates(self, key: int) -> list[float] | None:
        """StochasticWeightAveraging's rate of each param group of optimizer ``key``, when it trained the optimizer at
        its latest cut or rollback, at a rate nearer its own than the one training started with (SWA anneals from one
        to the other over epochs); else ``None``."""
        trouble, rates = self._trouble.get(key, (None, None))
        start = (self._start_rates.get(key) or [None])[0]
        swa = [rate for rate in rates or [] if rate]
        if not (trouble and start and rates) or len(swa) < len(rates):
            return None
        return swa if abs(math.log(trouble / swa[0])) < abs(math.log(trouble / start)) else None

    def _schedule_bases(self, trainer: pl.Trainer, key: int) -> tuple[str, list[float | None]]:
        """Each param group's peak rate (a cyclic schedule: ``max_lr`` in the group, as OneCycleLR keeps it, or
        CyclicLR's ``max_lrs``), else its base rate (``initial_lr``, or the rate when training started)."""
        optimizer = trainer.optimizers[key]
        groups = optimizer.param_groups
        peaks: list[Any] = [group.get("max_lr") for group in groups]
        if any(peak is None for peak in peaks):
            for config in getattr(trainer, "lr_scheduler_configs", []):
                scheduler = getattr(config, "scheduler", None)
                max_lrs = getattr(scheduler, "max_lrs", None)
                if getattr(scheduler, "optimizer", None) is optimizer and isinstance(max_lrs, (list, tuple)):
                    peaks = list(max_lrs)
        if len(peaks) == len(groups) and all(isinstance(peak, (int, float)) for peak in peaks):
            return "peak", [float(peak) for peak in peaks]
        # The base rates the fit started with: SWA overwrites `initial_lr` with its `swa_lrs` when it takes over.
        start = self._start_rates.get(key, [])
        bases = [
            start[i] if i < len(start) and start[i] is not None else host_rate(group.get("initial_lr"))
            for i, group in enumerate(groups)
        ]
        return "base", bases

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.automatic_optimization:
            # Under manual optimization the module may step later (in its own epoch-end hook, which runs after
            # this one, or every few epochs): judged at the end of the fit only.
            self._warn_if_unguarded()
        if self._diag.epoch_logged:  # the epoch's last batch was a logging step: the summary went with that log
            self._diag.epoch_logged = False
            return
        if not _epoch_complete(trainer):
            return  # an epoch cut short (max_steps, a stop request): its logs count in no summary of a full epoch
        metrics = self._diag.end_epoch(self)
        if metrics and trainer.is_global_zero:
            # Lightning logs epoch-end metrics at the epoch's last batch step (`batches_that_stepped - 1` here).
            step = max(_lightning_step(trainer) - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A fit stopped by an error (e.g. on_exploding="raise") never reaches on_train_end: without this the LR hooks
        # would stay on the dead optimizer and keep the next fit's optimizer from getting its own. Nor teardown: the
        # Trainer would keep the gradient_clip_val it lent the guard as None, and a later fit without it would not clip.
        try:
            # The steps since the last log are the ones that led up to the error: written (and warned about) now,
            # not left for the next fit of this guard to report as its own. One process only: the write gathers
            # diagnostics over ranks, and the others may not have stopped.
            if trainer.world_size == 1 and any(e.steps_since_log for e in self._states.values()):
                self._flush(trainer, pl_module, self._last_step(trainer), prog_bar=False)
        except Exception as error:  # never in the way of the error that stopped the run (nor a warning turned error)
            log.warning("GradGuard: the steps since the last log could not be written (%r).", error)
        finally:
            self._reporter.take_rows()
            for engine in self._states.values():
                engine.start_window()
            self._release_hooks()
            self.teardown(trainer, pl_module, "fit")  # which Lightning does not call after an error

    def _release_hooks(self) -> None:
        self._disarm_saturation()
        self._diag.disarm()
        for handle in self._lr_hooks.values():
            handle.remove()
        self._lr_hooks.clear()
        for handles in self._step_hooks.values():
            for handle in handles:
                handle.remove()
        self._step_hooks.clear()
        self._in_step.clear()

    def _disarm_saturation(self) -> dict[str, Tensor]:
        if self._saturation is not None and self._sat_armed:
            self._sat_armed = False
            return self._saturation.disarm()
        return {}

    def _prefix(self, key: int) -> str:
        return "gradguard/" if len(self._states) <= 1 else f"gradguard/opt{key}/"

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, prog_bar: bool = True) -> None:
        """Log the window that ends with the optimizer step Lightning numbers ``step``."""
        saturation = self._disarm_saturation()
        # On every rank: the update ratio of sharded parameters sums over ranks (a collective).
        diag_parts = self._diag.collect(self)
        penalties: list[Tensor] = []
        if self.regularizers:
            # On every rank: under FSDP2 a penalty is a DTensor whose reduction is a collective.
            with torch.no_grad():
                penalties = [_gathered(r.penalty(pl_module)).detach().float().reshape(1) for r in self.regularizers]
        if not trainer.is_global_zero:
            for engine in self._states.values():
                engine.start_window()
            self._end_histogram_window(step)
            return
        engines = sorted(self._states.items())
        device = engines[0][1].layer_last.device
        parts: list[Tensor] = [p.to(device) for p in penalties]
        parts += [v.detach().float().reshape(1).to(device) for v in saturation.values()]
        parts += [engine.gather().to(device) for _, engine in engines]
        engine_parts = parts[len(parts) - len(engines) :]
        parts += [p.to(device) for _, p in diag_parts]
        host = torch.cat([p.reshape(-1).float() for p in parts]).cpu().numpy()  # the one transfer

        metrics: dict[str, float] = {}
        for r, value in zip(self.regularizers, host[: len(penalties)]):
            metrics[f"gradguard/reg/{r.name}"] = float(value)
            metrics[f"gradguard/reg_strength/{r.name}"] = float(r.strength)
        offset = len(penalties)
        self._last_saturation = dict(zip(saturation, (float(v) for v in host[offset : offset + len(saturation)])))
        for name, value in self._last_saturation.items():
            metrics[f"gradguard/saturation/{name}"] = value
        offset += len(saturation)
        snapshots: list[tuple[int, EngineSnapshot]] = []
        for (key, engine), part in zip(engines, engine_parts):
            snap = engine.snapshot(host[offset : offset + part.numel()])
            offset += part.numel()
            # The rate the window's last step ran with (None: an optimizer that sizes its own steps, Adafactor).
            lr, scale = self._step_rates.get(key, (None, None))
            if scale is not None:
                snap.lr_scale = scale
            scalars = snap.metrics(self._prefix(key))
            if not snap.present.any():
                # No step of this optimizer in the window (a critic stepping every 5th batch, a head not stepped yet):
                # its last figures are an earlier window's, repeated as flat stretches that read as measurements, and
                # before its first step the record's initial 0 would read as a vanishing gradient.
                for name in ("total_norm", "clip_coef", "clip_threshold", "ema_mean", "ema_lower", "ema_upper"):
                    scalars.pop(f"{self._prefix(key)}{name}", None)
            metrics.update(scalars)
            if lr is not None and snap.lr_scale is not None:
                metrics[f"{self._prefix(key)}lr"] = float(lr)
            snapshots.append((key, snap))
            self._reporter.report(key, step, snap, several=len(self._states) > 1, module=pl_module)
        diag_values: dict[str, Any] = {}
        for name, part in diag_parts:
            diag_values[name] = host[offset : offset + part.numel()]
            offset += part.numel()
        layer_scalars = self._diag.report(self, trainer, diag_values, snapshots, metrics, step)
        if "epoch" in self._diag.on and _epoch_complete(trainer) and prog_bar:
            # The epoch ends with this batch: its summary goes into this log's row rather than a second row at the
            # same step.
            metrics.update(self._diag.end_epoch(self))
            self._diag.epoch_logged = True

        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # The first optimizer that has stepped (a generator stepping every 5th batch may not have yet).
        norms = (metrics.get(f"{self._prefix(key)}total_norm") for key in sorted(self._states))
        status = {"gn": next((value for value in norms if value is not None), math.nan)}
        # With several optimizers, the strongest clipping of the step (1: none clipped); no clipper, no coefficient.
        coefs = [metrics[name] for key in self._states if (name := f"{self._prefix(key)}clip_coef") in metrics]
        if coefs:
            status["clip"] = min(coefs)
        # The problems found, not what answered them: one NaN batch is one event, not "nonfinite" and "skipped".
        status["ev"] = float(
            sum(v for k, v in metrics.items() if "/epoch/" not in k and k.partition("/events/")[2] in _PROBLEM_EVENTS)
        )
        # Lightning allows self.log in on_train_batch_end only; barebones=True refuses it.
        if prog_bar and not getattr(trainer, "barebones", False):
            pl_module.log_dict(
                {f"gg_{k}": v for k, v in status.items()}, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )

        board = self._get_board(trainer)
        if board is not None:
            board.write_derived(step, metrics)
            for key, snap in snapshots:
                board.set_layers(key, snap.layer_names)  # a param group added since the last log
                # Without the per-layer scalars the pictures are still fed (they were left blank before).
                board.write_layer_norms(
                    step,
                    key,
                    snap.layer_norms,
                    snap.exploding,
                    snap.vanishing,
                    present=snap.present,
                    nonfinite=snap.nonfinite,
                    scalars=self.log_layers,
                )
            if layer_scalars:
                board.write_scalars(step, layer_scalars)
            rows = self._reporter.take_rows()
            if rows:
                board.write_events(step, rows)
            if self._image_due(step + 1):
                board.write_images(step)
                self._last_image_count = step + 1
            if self._hist_samples:
                board.write_histograms(step, _merged_samples(self._hist_samples))
        else:
            self._reporter.take_rows()  # nowhere to write them: not for the next fit's board either
        self._end_histogram_window(step)

    def _end_histogram_window(self, step: int) -> None:
        if self._hist_taken:  # due on every rank alike, written or not: the checkpointed schedule is the same
            self._last_hist_count = step + 1
        self._hist_samples, self._hist_taken = {}, False

    def _get_board(self, trainer: pl.Trainer) -> Any:
        if not (self._board_checked and self._board_trainer is not None and self._board_trainer() is trainer):
            # First log, or the guard reused with another Trainer: its logger, not the previous run's directory.
            self._board_checked, self._board_trainer = True, weakref.ref(trainer)
            self._board = _open_board(self, trainer)
            self._last_image_count = None  # a new board draws at its first log
            if self._board is not None and self._board_loaded is not None:
                self._board.load_state_dict(self._board_loaded)
            self._board_loaded = None
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
            "divergence": repr(self.divergence),
            "on_diverging": self.on_diverging,
            "skip_exploding": self.skip_exploding,
            "clip_exploding": self.clip_exploding,
            "rollback": repr(self.rollback),
            "saturation": self.saturation,
            "log_every_n_steps": self.log_every_n_steps,
            "log_layers": self.log_layers,
            "image_every_n_steps": self.image_every_n_steps,
            "histogram_every_n_steps": self.histogram_every_n_steps,
            "max_warnings": self.max_warnings,
            "group_depth": self.group_depth,
            "group_fn": getattr(self.group_fn, "__qualname__", repr(self.group_fn)),
            "compile": self.compile,
            "diagnostics": sorted(self._diag_on),
            "layers": {f"opt{k}": engine.index.num_layers for k, engine in sorted(self._states.items())},
        }

    def summary(self) -> dict[str, int]:
        """Cumulative event counts over all optimizers (reads device counters: call it after training).

        The counts of the process that trained: after a fit with ``strategy="ddp_spawn"`` or ``"ddp_notebook"``,
        which trains in worker processes, read ``trainer.callback_metrics["gradguard/summary/<kind>"]`` (set at the
        end of training) instead."""
        totals = dict.fromkeys(EVENT_KINDS, 0)
        counted = [engine.summary() for engine in self._states.values()]
        if self._loaded is not None:
            # A checkpoint's counts not claimed by an engine yet: resumed from a finished run, the fit built none.
            counted += [_saved_event_counts(state) for state in self._loaded["optimizers"].values()]
        for counts in counted:
            for kind, value in counts.items():
                totals[kind] += value
        return totals

    def new_phase(self) -> None:
        """Tell the guard that a new phase of training begins, whose loss and gradient levels are meant to differ: a
        harder curriculum stage, an auxiliary loss switched on, a new task. Every optimizer's clipper and detectors
        start their statistics afresh (see :meth:`GuardEngine.new_phase`); counts, the LR multiplier and the
        rollback's state are kept.

        Without it, a legitimate jump of the loss by 10x or more looks like a divergence: the LR guard cuts the rate
        and, in the first 500 steps, the default early restart restarts the run. Call it from any hook or from
        ``training_step`` when the phase begins, e.g. ``self.trainer.callbacks``' GradGuard at the first step of
        the new stage. (In one process, a stage that changes the batches' shapes, longer sequences or larger images,
        is no divergence by itself; its first steps are still clipped as a jump until the clipper takes in the new
        level.)

        Example:
            >>> guard = GradGuard()
            >>> guard.new_phase()  # before the first step: nothing to reset yet
        """
        for engine in self._states.values():
            engine.new_phase()

    def loss_relapse(self, optimizer_index: int = 0) -> float | None:
        """The share of its progress one optimizer's training loss had given back at the last log
        (``gradguard/loss_relapse``, see :meth:`DivergenceDetector.progress`): 0 at its lowest running mean, 1 back
        at its starting level. ``None`` before the run has learned (or without a divergence detector). A host value
        from the last log: no device read, also without a logger. Logs are read on global rank zero only: under DDP
        the other ranks get ``None`` (broadcast the value to act on it on every rank).

        Example:
            >>> GradGuard().loss_relapse() is None  # nothing logged yet
            True
        """
        return self._reporter.shares.get(optimizer_index)

    def layer_names(self, optimizer_index: int = 0) -> list[str]:
        """The layers GradGuard watches for one optimizer, in definition order."""
        return list(self._states[optimizer_index].index.names)

    def rescuing(self, optimizer_index: int = 0) -> bool:
        """Whether the rollback's rescue clipper is at work for one optimizer (see :class:`Rollback`); ``False``
        before that optimizer's first step."""
        engine = self._states.get(optimizer_index)
        return engine is not None and engine.rollback is not None and engine.rollback.rescuing


def _check_arguments(args: dict[str, Any]) -> list[Regularizer]:
    """Reject what GradGuard cannot take (a ValueError naming the argument); returns the regularizers as a list."""
    modes = (
        ("on_nonfinite", NONFINITE_MODES),
        ("on_exploding", _EVENT_MODES),
        ("on_vanishing", _EVENT_MODES),
        ("on_diverging", _EVENT_MODES),
    )
    for name, allowed in modes:
        if args[name] not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {args[name]!r}")
    for name in ("log_every_n_steps", "image_every_n_steps", "histogram_every_n_steps", "group_depth"):
        optional_int(name, args[name], low=1)
    check_int("max_warnings", args["max_warnings"], low=0)
    for name in ("log_layers", "saturation", "clip_exploding", "skip_exploding"):
        check_bool(name, args[name])
    diagnostics = args["diagnostics"]
    if not isinstance(diagnostics, bool):
        if isinstance(diagnostics, str) or not isinstance(diagnostics, (list, tuple)):
            raise ValueError(f"`diagnostics` must be True, False or a list of {list(DIAGNOSTICS)}, got {diagnostics!r}")
        unknown = [d for d in diagnostics if d not in DIAGNOSTICS]
        if unknown:
            raise ValueError(f"`diagnostics` names must be among {list(DIAGNOSTICS)}, got {unknown!r}")
    check_compile(args["compile"])
    if args["group_fn"] is not None and not callable(args["group_fn"]):
        raise ValueError(f"`group_fn` must be a callable or None, got {args['group_fn']!r}")
    for name, cls in (
        ("clip", Clipper),
        ("lr_guard", LRGuard),
        ("exploding", ExplodingDetector),
        ("vanishing", VanishingDetector),
        ("divergence", DivergenceDetector),
    ):
        value = args[name]
        if value is not None and value != "default" and not isinstance(value, cls):
            raise ValueError(f"`{name}` must be an instance of {cls.__name__}, None or 'default', got {value!r}")
    if args["rollback"] != "default" and rollback_from(args["rollback"]) is not None and args["lr_guard"] is None:
        raise ValueError("`rollback` acts when the LR guard lowers the rate: it needs an `lr_guard`.")
    return check_regularizers(args["regularizers"])


def _optimizer_name(trainer: pl.Trainer, key: int) -> str:
    """Optimizer ``key``'s class name (``Adam``), or ``opt{key}`` for one the Trainer does not list."""
    if key < len(trainer.optimizers):
        return type(unwrap_optimizer(trainer.optimizers[key])).__name__
    return f"opt{key}"


def _check_fit(guard: GradGuard, trainer: pl.Trainer, index: LayerIndex) -> None:
    """Refuse a fit GradGuard cannot watch, with a message that says what to change."""
    if not index.params:
        raise MisconfigurationException(
            "GradGuard found no parameters in the LightningModule: there are no gradients to watch."
        )
    if not any(p.requires_grad for p in index.params):
        raise MisconfigurationException(
            "GradGuard found no trainable parameters in the LightningModule (all have `requires_grad=False`):"
            " there are no gradients to watch. Unfreeze some parameters or remove GradGuard."
        )
    if (
        grad_scaler(trainer) is not None
        and guard.clip is not None
        and guard.clip.needs_params
        and any(getattr(opt, "_step_supports_amp_scaling", False) for opt in trainer.optimizers)
    ):
        # AGC compares each unit's gradient with its weights; a fused optimizer unscales inside `step`, so here
        # the gradients still carry the loss scale and the ratio would be off by that factor.
        raise MisconfigurationException(
            f"GradGuard(clip={type(guard.clip).__name__}(...)) cannot run under 16-bit AMP with a GradScaler and an"
            " optimizer that unscales inside `step` (a fused optimizer): the gradients are still scaled when they"
            " are compared with the weights. Use a non-fused optimizer, or ZClip, AutoClip or NormClip."
        )


#: Batches of one layout (their tensors' shapes) after which a lasting change of it is a new stage of the data.
_SETTLED_LAYOUT = 20

#: The checkpoints Lightning's tuners (`LearningRateFinder`, `BatchSizeFinder`, `Tuner`) save before their trial steps
#: and restore after them: the fit that follows sets out afresh, though `trainer.ckpt_path` then names one.
_TUNER_CHECKPOINTS = (".lr_find_", ".scale_batch_size_")


def _resized(before: Any, after: Any) -> bool:
    """Whether two batch layouts differ in their batch size alone: every tensor's first dimension is the same
    number, in each, and the rest of their shapes agree."""
    if before is None or len(before) != len(after):
        return False
    sized = layout_batch_size(before) is not None and layout_batch_size(after) is not None
    return sized and all(a[1:] == b[1:] for a, b in zip(before, after))


def _resumed(trainer: pl.Trainer) -> bool:
    """Whether this fit resumed from a checkpoint of its run (not a tuner's own temporary one)."""
    path = trainer.ckpt_path
    return path is not None and not os.path.basename(str(path)).startswith(_TUNER_CHECKPOINTS)


_RateRecord = tuple[list[float | None], tuple[float | None, list[float | None] | None], tuple[int, int]]


def _rate_record(record: Any) -> dict[int, _RateRecord]:
    """``GradGuard.state_dict()['rate_record']`` parsed: per optimizer key, the rates training started with, the
    latest trouble and the counts of cuts and rollbacks when the multiplier last started afresh (``(0, 0)`` when
    absent, as in checkpoints written before it was kept); a ``ValueError`` names what is wrong with a malformed
    record (``None`` or absent: empty)."""

    def rate(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    def rates(value: Any) -> bool:
        return isinstance(value, list) and all(rate(v) for v in value)

    def counts(value: Any) -> bool:
        pair = isinstance(value, list) and len(value) == 2
        return pair and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)

    if record is not None and not isinstance(record, dict):
        raise ValueError(f"`state['rate_record']` must be a dict from GradGuard.state_dict(), got {record!r}.")
    parsed: dict[int, _RateRecord] = {}
    for key, value in (record or {}).items():
        trouble = value.get("trouble") if isinstance(value, dict) else None
        base = value.get("counts_base", [0, 0]) if isinstance(value, dict) else None
        ok = str(key).isdigit() and isinstance(value, dict) and rates(value.get("start")) and counts(base)
        ok = ok and isinstance(trouble, list) and len(trouble) == 2 and rate(trouble[0])
        if not (ok and (trouble[1] is None or rates(trouble[1]))):  # type: ignore[index]
            raise ValueError(
                "`state['rate_record']` must map each optimizer index to {'start': [rates], 'trouble': [rate or"
                " None, [rates] or None], 'counts_base': [cuts, rollbacks]} as GradGuard.state_dict() writes it, got"
                f" {key!r}: {value!r}."
            )
        parsed[int(key)] = (list(value["start"]), (trouble[0], trouble[1]), (base[0], base[1]))  # type: ignore[index]
    return parsed


def _placeholder(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is the stand-in Lightning trains with when ``configure_optimizers`` returns None."""
    return isinstance(unwrap_optimizer(optimizer), lightning_types("core.optimizer._MockOptimizer"))


def _sizes_own_steps(optimizer: torch.optim.Optimizer) -> bool:
    """Whether no param group has a rate to scale: ``lr=None`` (``Adafactor(lr=None, relative_step=True)``), or no
    ``lr`` key at all (a custom optimizer that names its step size otherwise)."""
    return all(group.get("lr") is None for group in optimizer.param_groups)


def _open_board(guard: GradGuard, trainer: pl.Trainer) -> Any:
    """The TensorBoard writer for ``trainer``'s TensorBoardLogger (layout and configuration written), or None."""
    tensorboard = lightning_types("loggers.TensorBoardLogger")
    tb: Any = next((lg for lg in trainer.loggers if isinstance(lg, tensorboard)), None)
    if tb is None:
        if getattr(trainer, "fast_dev_run", False) and trainer.loggers:
            # Lightning swaps every logger for a DummyLogger under fast_dev_run: say that, not "none attached".
            rank_zero_info(
                "GradGuard: `fast_dev_run` replaces the loggers with a dummy logger, so nothing GradGuard logs is"
                " written (the guard still measures and acts). Run without `fast_dev_run` to get the TensorBoard logs."
            )
        elif trainer.loggers:
            rank_zero_info(
                "GradGuard: no TensorBoardLogger attached; scalars go to the attached loggers, per-layer"
                " scalars, pictures, histograms and text are skipped."
            )
        return None
    from lightning_gradguard.tensorboard import GradGuardBoard

    engines = guard._states
    board = GradGuardBoard(
        tb.experiment,
        {key: list(engine.index.names) for key, engine in engines.items()},
        # The optimizer's class as its name: the board labels it "opt{key}: <name>".
        [_optimizer_name(trainer, key) for key in sorted(engines)],
        image_every_n_steps=guard.image_every_n_steps,
        histogram_every_n_steps=guard.histogram_every_n_steps,
        regularizers=[r.name for r in guard.regularizers],
        # Charted only where an activation module is watched (functional activations are not modules).
        saturation=guard._saturation is not None and bool(guard._saturation.names),
        # The diagnostics that feed the board (the noise scale only with a second batch size to compare with).
        diagnostics=[d for d in sorted(guard._diag.on) if d != "noise_scale" or guard._diag.noise is not None],
        loss_relapse=guard._watches_loss(trainer),
        vanishing=any(engine.vanishing is not None for engine in engines.values()),
    )
    for key, engine in engines.items():
        if engine.vanishing is not None or engine.exploding is not None:
            low = engine.vanishing.min_norm if engine.vanishing is not None else None
            ratio = engine.vanishing.ratio if engine.vanishing is not None else None
            high = engine.exploding.max_layer_norm if engine.exploding is not None else None
            board.set_bands(key, low, high, low_ratio=ratio)
    board.write_layout()
    config = guard.config()
    if guard._diag.noise is not None and guard._diag.sizes and min(guard._diag.sizes) > 0:
        # Examples per optimizer step (micro-batches x processes), for the report to set against the noise scale.
        config["batch_size"] = sum(guard._diag.sizes) * guard._diag.world_size
    board.write_config(config)
    try:  # also as hparams, so runs can be compared by their GradGuard settings
        tb.log_hyperparams({f"gradguard/{k}": str(v) for k, v in config.items()})
    except Exception as err:  # a logger that refuses late hparams must not stop training
        log.debug("GradGuard: hparams not written: %s", err)
    return board


def _epoch_complete(trainer: pl.Trainer) -> bool:
    """Whether the batch now running (or the last one) is the last of its epoch's data."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", True)) if progress is not None else True


def _lightning_step(trainer: pl.Trainer) -> int:
    """Lightning's count of batches that stepped an optimizer so far: the step it stamps this batch's ``self.log``
    metrics with (it adds one after ``on_train_batch_end``). Counted once per batch whatever the number of optimizers,
    held through an accumulation window, and restored on resume."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(value) if isinstance(value, int) else int(trainer.global_step)


def _gathered(t: Tensor) -> Tensor:
    # A DTensor (FSDP2) as the plain tensor it stands for; other tensors as they are.
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _merged_samples(per_optimizer: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """One sample per block: the samples of a block that several optimizers hold side by side, in key order."""
    merged: dict[str, list[Tensor]] = {}
    for key in sorted(per_optimizer):
        for block, values in per_optimizer[key].items():
            merged.setdefault(block, []).append(values)
    return {
        block: parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].device) for p in parts])
        for block, parts in merged.items()
    }


_RUN_STATE_NAMES: dict[type, frozenset[str]] = {}


def _rates_differ(before: list[float | None], after: list[float | None]) -> bool:
    """Whether a fit starts at other rates than the last fit did: a group's rate changed, or, with the param groups
    laid out otherwise, the set of rates (a rate of none, an optimizer that sizes its own steps, is no evidence)."""

    def missing(rates: list[float | None], among: list[float | None]) -> bool:
        known = [b for b in among if b is not None]
        return any(a is not None and not any(math.isclose(a, b, rel_tol=1e-6) for b in known) for a in rates)

    if len(before) == len(after):
        return any(a is not None and b is not None and missing([a], [b]) for a, b in zip(before, after))
    return missing(after, before) or missing(before, after)


def _rates_text(rates: list[float | None]) -> str:
    return ", ".join("none" if rate is None else f"{rate:.3g}" for rate in rates)


def _run_state_names(cls: type[GradGuard]) -> frozenset[str]:
    """The attributes ``cls._reset_run_state`` sets: what one fit builds up."""
    names = _RUN_STATE_NAMES.get(cls)
    if names is None:
        probe = cls.__new__(cls)
        cls._reset_run_state(probe)
        names = _RUN_STATE_NAMES[cls] = frozenset(probe.__dict__)
    return names


def _fingerprint(module: pl.LightningModule) -> list[tuple[tuple[int, ...], float, float]] | None:
    """Each plain, materialized parameter's shape, sum and norm (one host read per device); ``None`` without any."""
    params = [
        p
        for p in (
            q.detach() for q in module.parameters() if not isinstance(q, torch.nn.parameter.UninitializedParameter)
        )
        if type(p) is Tensor and p.device.type != "meta"
    ]
    if not params:
        return None
    per_device: dict[torch.device, list[Tensor]] = {}
    with torch.no_grad():
        for p in params:
            wide = torch.float32 if p.device.type == "mps" else torch.float64  # MPS has no float64
            pair = torch.stack([p.sum(dtype=wide), torch.linalg.vector_norm(p, dtype=wide)])
            per_device.setdefault(p.device, []).append(pair)
    read = {device: iter(torch.stack(pairs).cpu().double().tolist()) for device, pairs in per_device.items()}
    return [(tuple(p.shape), *next(read[p.device])) for p in params]


def _same_weights(
    a: list[tuple[tuple[int, ...], float, float]], b: list[tuple[tuple[int, ...], float, float]] | None
) -> bool:
    # Close, not equal: the sums of the same weights on another device may differ in their last digits. NaN matches
    # NaN: a diverged model is still the same model.
    def close(x: float, y: float) -> bool:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y))

    return (
        b is not None
        and len(a) == len(b)
        and all(x[0] == y[0] and close(x[1], y[1]) and close(x[2], y[2]) for x, y in zip(a, b))
    )
