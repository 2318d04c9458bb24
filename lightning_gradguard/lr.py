"""A learning-rate multiplier that backs off on exploding gradients and survives LR schedulers.

Schedulers own ``param_group["lr"]``: some overwrite it every step (``OneCycleLR``, ``LambdaLR``), others read it
back and multiply (``CosineAnnealingLR``, ``StepLR``, ``ReduceLROnPlateau``). A multiplier that simply rescaled the
value would be erased by the first kind and compounded by the second. :class:`LRGuard` therefore puts
``scheduled * m`` into the optimizer only for the duration of ``optimizer.step`` and puts the scheduled value back
right after, so every scheduler only ever sees its own numbers.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_gradguard._compat import foreach_zero_, state_holders, unwrap_optimizer
from lightning_gradguard._validation import check_bool, check_int, check_number, check_state

__all__ = ["LRGuard", "LRGuardHandle"]

_RECOVERY_MODES = ("linear", "exponential")


@dataclass
class _KeyState:
    anchor: float = 1.0  # multiplier in force since the last exploding event
    calm: int = 0  # consecutive calm steps since that event
    pending: int = 0  # exploding events counted towards ``patience``
    ceiling: float = 1.0  # highest multiplier recovery returns to: just below the lowest rate that exploded
    nonfinite: int = 0  # non-finite steps counted towards ``nonfinite_patience``
    since_nonfinite: int = 0  # steps since the last non-finite one
    since_cut: int = 1 << 30  # steps since the last reduction
    reset_due: int = 0  # 1: zero the optimizer's momentum before its next step
    # 1: the last reduction answered non-finite steps, and no gradient has exploded since: scattered non-finite
    # steps then come from the data, which a lower rate does not cure
    nonfinite_cut: int = 0
    nonfinite_streak: int = 0  # non-finite steps in a row, up to this one
    # 1: since that reduction a run of non-finite steps ended by itself, on the weights it had left (skipped steps
    # do not move them): the batches were non-finite, not the model, and runs of them in a row cut no more
    nonfinite_passed: int = 0
    # 1 once a reduction was followed by calm past its hold: a reduction after that, soon enough, answers a
    # recurrence and sets the ceiling (a first burst may be the data's: bad batches in a row)
    armed: int = 0
    # 1: the last step was a clipped exploding event after a calm step, not counted yet: it counts when the next
    # step is troubled too, and not at all when the next step is calm (a lone spike)
    deferred: int = 0
    # calm steps in a row up to the last one (neither exploding, flagged or clipped, non-finite nor diverging)
    calm_run: int = 0
    # The cut a run of non-finite steps in a row holds while it lasts (1: none): made real when trouble follows the
    # run, withdrawn when a calm step does (the run's skipped steps applied no rate)
    held: float = 1.0
    # What the last update did to a held cut (not saved: they describe that one call, for the engine): withdrew it
    # (a calm step followed the run), or confirmed it (trouble followed the run, which made the cut real)
    withdrew: int = 0
    confirmed: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in _STATE_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> _KeyState:
        """The state :meth:`as_dict` describes; fields it lacks (saved by an older version) keep their defaults."""
        state = cls()
        for name in _STATE_FIELDS:
            if name in values:
                setattr(state, name, type(getattr(state, name))(values[name]))
        return state


#: Calm steps a clipped spike needs before it to be a lone spike: a rate at the edge of stability alternates spikes
#: and ordinary steps (flagged every other step), which one calm step before each would have spared every time.
_LONE_CALM = 3

_STATE_FIELDS = (
    "anchor",
    "calm",
    "pending",
    "ceiling",
    "nonfinite",
    "since_nonfinite",
    "since_cut",
    "reset_due",
    "nonfinite_cut",
    "nonfinite_streak",
    "nonfinite_passed",
    "armed",
    "deferred",
    "calm_run",
    "held",
)


@dataclass
class _Swap:
    scheduled: float | Tensor | None  # None: an optimizer that sizes its own steps
    applied: float | Tensor | None
    # For a tensor lr: the applied copy's version counter, so an in-place write by a scheduler is noticed.
    version: int | None


def _zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero the first-moment buffers (SGD's momentum, Adam's ``exp_avg``): the velocity the exploding steps built
    would otherwise keep moving the weights at the old rate for ~1/(1 - momentum) steps (SPAM, arXiv 2501.06842,
    resets the moments for the same reason). Second moments are kept: zeroing them would make Adam's next steps
    larger, not smaller."""
    # The base optimizer of a SAM holds its momentum (`state_holders`).
    buffers = [
        buffer
        for _, holder in state_holders(optimizer)
        for group in holder.param_groups
        for p in group["params"]
        for name in _FIRST_MOMENTS
        if isinstance(buffer := holder.state.get(p, {}).get(name), Tensor)
    ]
    if buffers:
        foreach_zero_(buffers)


_FIRST_MOMENTS = ("momentum_buffer", "exp_avg")

# The LR guard (its id, the key) whose step hooks each optimizer carries: a second one would compound with it.
_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, int]] = weakref.WeakKeyDictionary()


class LRGuardHandle:
    """Detaches an :class:`LRGuard` from an optimizer: removes its step hooks and puts the scheduled lr back.

    Returned by :meth:`LRGuard.attach`; behaves like :class:`torch.utils.hooks.RemovableHandle` (``remove()`` and
    use as a context manager).

    Args:
        guard: the guard that was attached.
        optimizer: the optimizer it was attached to.
        key: the optimizer's key in the guard.
        handles: the step pre- and post-hook handles.
    """

    def __init__(
        self, guard: LRGuard, optimizer: torch.optim.Optimizer, key: int, handles: tuple[RemovableHandle, ...]
    ) -> None:
        self._guard = guard
        self._optimizer = optimizer
        self._key = key
        self._handles = handles

    def hold(self, handle: RemovableHandle) -> None:
        """Remove ``handle`` too (a hook of the attaching engine's) when this one is removed."""
        self._handles = (*self._handles, handle)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._guard.restore(self._optimizer, self._key)
        if _ATTACHED.get(self._optimizer) == (id(self._guard), self._key):
            del _ATTACHED[self._optimizer]

    def __enter__(self) -> LRGuardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class LRGuard:
    """Lower the learning rate when gradients explode, hold it, then recover to a rate that has not exploded.

    One multiplier ``m`` (starting at 1) is kept per optimizer ``key``. Call :meth:`update` once per optimizer
    step with the step's exploding and non-finite flags (Python bools; they may arrive one step late). The rules:

    * **Reduction.** Exploding events are counted; when ``patience`` of them have been counted,
      ``m <- max(m * factor, min_scale)`` and the count restarts. The count is forgotten after more than
      ``cooldown`` consecutive calm steps, so with ``cooldown=0`` the events must be consecutive, and with the
      default they must fall within ``cooldown`` calm steps of each other. ``m`` is taken at its current value,
      so an event during recovery lowers it from wherever recovery had reached. The default ``patience=2`` leaves
      the rate alone for one isolated spike (GradGuard's clipper has already bounded that step): healthy runs with
      heavy-tailed gradient norms (a mixture of experts on small batches) have such spikes, and halving the rate
      for each cost them progress, while a rate that is too high explodes again within a few steps.
    * **Lone spikes.** An exploding event on a step whose gradients were clipped (``clipped=True``: the spike was
      bounded), after three calm steps and before a calm one, counts for nothing (``spare_lone``, with ``patience``
      of 2 or more): bad data a step at a time, which the clipper has already made harmless. A calm step is one
      neither exploding, flagged by the detector (``flagged``; without it, clipped), non-finite nor diverging:
      GradGuard passes ``flagged``, so a step clipped only by a fixed ``max_norm`` that bounds most steps is calm.
      Its count is decided one step late,
      when the next step shows whether it was alone: a troubled next step counts it then, so a rate too high, whose
      norms climb from step to step, is cut on the same step as before (one cut, where the next step would cut by
      itself too). Counted, clipped bad batches a few steps apart cut
      the rate and, recurring within a few hundred steps, set its ceiling (memory, below): one in 30 steps of a
      healthy Adam regression took the rate to 5% of its schedule in 1000 steps and the run ended at 18x its clean
      loss (unguarded: 33x; clipped with no LR guard: as clean). Three calm steps before, not one: a rate at the
      edge of stability alternates spikes and ordinary steps, and is then cut at its third spike. Two spikes two
      steps apart are not cut: a plain-SGD ReLU regression whose rate was raised 10x mid-run ended 40-130% above
      counting every event on 4 of 8 seeds (``spare_lone=False`` counts them all).
    * **Non-finite steps.** A non-finite step (a bad batch, skipped by GradGuard) moves no weight, so the finite step
      after it runs on the weights it had: when that step is calm, those weights were fine and the batch was non-finite
      by itself, which a lower rate does not cure. So, with ``spare_lone`` and ``nonfinite_patience`` of 2 or more,
      scattered non-finite steps cut nothing, however close together, and only a run of twice ``nonfinite_patience`` of
      them in a row (4) cuts: a model wrecked into NaN stays there, and the cut lets the rollback restart it. That cut
      is held while the run lasts, made real when trouble (an explosion, a divergence) follows the run, and withdrawn
      when a calm step does: the run's skipped steps applied no rate (the step after the run may, where the flags land a
      step late: it runs at the held rate; under ``on_nonfinite="zero"`` the zeroed steps apply it to the optimizer's
      momentum). It counts as a reduction (``lr_reduced``) either way; a withdrawal is reported by :meth:`withdrew`
      (GradGuard's events table lists it as ``lr_restored``), and the logged ``lr_scale`` shows it. A rollback waits
      for the cut to be confirmed by trouble after the run (:meth:`confirmed`), or for the run to go on
      (:meth:`nonfinite_run`; see :class:`~lightning_gradguard.Rollback`; user trial: with ``Rollback()``, four NaN
      batches in a row restarted a healthy Adam run from its initial weights, 28x its loss at the end).
      Once a run has ended by itself, later ones cut nothing until something explodes. Measured: a triplet loss on
      ``sqrt`` distances, NaN for identical pairs on about 15% of the steps, was cut once for two of them within the
      cooldown, +9% to +14% held-out against skipping them alone; ``benchmarks/bad_batches.py --count 30 --factor nan``
      (a corrupted shard) cut the zoo's dropout run 7 times, to 1%, +15.4% above clean, under an earlier rule; now
      +4.5%. Without sparing (``spare_lone=False``, or ``nonfinite_patience=1``), ``nonfinite_patience`` of them with at
      most ``cooldown`` steps between each and the next count as one exploding event (which reduces at once); once they
      go on after that reduction with nothing exploding, only an explosion, or twice ``nonfinite_patience`` of them in a
      row, reduces again, once per run, and not once such a run has ended by itself.
    * **Memory.** A rate that explodes again is remembered: a reduction that answers a recurrence (an explosion
      after an earlier reduction had calmed the run past its hold, within ``2 * (cooldown + recovery_steps)`` steps
      of that reduction) sets the ``ceiling`` that recovery returns to, that multiplier times ``sqrt(factor)``, not 1.
      Repeated explosions therefore converge on a rate that trains instead of oscillating between the scheduled
      rate and the reduced one. The first burst of reductions sets no ceiling, nor do bursts further apart: bad
      batches in a row look just like a rate too high, and a ceiling would keep a run that only met bad data at a
      fraction of its rate for good (measured: four 1e4x batches in a row held Adam runs at a third of their rate,
      +14% to +112% held-out loss). A rollback's restart (:meth:`rewind`) is evidence enough and sets it at once.
      Once recovered, the ceiling creeps back up by ``increase`` (relative) per calm step, up to 1, so a rate that
      was too high early in training is tried again later (multiplicative decrease, slow increase).
    * **Hold.** Every exploding event (reducing or not) freezes ``m`` at its current value and restarts the hold:
      ``m`` stays put for ``cooldown`` consecutive calm steps.
    * **Recovery.** Over the next ``recovery_steps`` calm steps ``m`` returns from the held value ``a`` to the
      ceiling ``c``: ``"linear"`` in equal increments (``a + (c - a) * t``), ``"exponential"`` in equal ratios
      (``a * (c / a) ** t``), with ``t`` the fraction of recovery done.

    The multiplier reaches the optimizer through :meth:`attach` (recommended: it scales ``group["lr"]`` only
    inside ``optimizer.step``, so a step that is never taken, e.g. skipped by ``GradScaler``, leaves the lr
    untouched) or explicitly through :meth:`apply` before the step and :meth:`restore` after it and before the
    scheduler steps.

    Args:
        factor: multiplier applied on a reduction, in ``(0, 1)``.
        patience: number of exploding events (each within ``cooldown`` calm steps of the one before) that trigger a
            reduction, ``>= 1``; 1 reduces on every event.
        cooldown: calm steps the reduced multiplier is held before recovery starts, ``>= 0``. Also the longest calm
            gap over which events (exploding or non-finite) still count towards their patience.
        min_scale: lowest multiplier, in ``(0, 1]``.
        recovery_steps: calm steps over which the multiplier returns to its ceiling after the hold, ``>= 1``.
        recovery: ``"linear"`` or ``"exponential"``.
        nonfinite_patience: with ``spare_lone``, half the run of non-finite steps in a row that counts as one
            exploding event; without it, the non-finite steps (within ``cooldown`` steps of each other) that do,
            ``>= 1``; 1 treats every non-finite step as an explosion.
        memory: remember a rate that exploded again and recover to just below it (see above); ``False`` recovers
            to 1.
        increase: relative rise of the ceiling per calm step once recovered, ``>= 0`` (1e-3: doubles in about 700
            calm steps).
        settle_steps: after a reduction, exploding events in the next ``settle_steps`` steps only hold the
            multiplier (they may still reflect weights from before the cut), ``>= 0``.
        reset_momentum: on a reduction, zero the optimizer's first moments (SGD ``momentum_buffer``, Adam
            ``exp_avg``) before its next step, so the velocity built by the exploding steps stops at once (as SPAM,
            arXiv 2501.06842, resets moments on spikes). Needs :meth:`attach` or :meth:`apply`.
        spare_lone: a clipped exploding event alone among calm steps counts for nothing (see "Lone spikes"), and
            only a run of non-finite steps in a row cuts (see "Non-finite steps"); ``False`` counts every event at
            once, as does ``patience=1`` (a cut at every event) and, for non-finite steps, ``nonfinite_patience=1``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = LRGuard(factor=0.5, cooldown=2, recovery_steps=2, memory=False)
        >>> handle = guard.attach(opt)
        >>> guard.update(True)  # one spike: the rate is kept
        False
        >>> guard.update(True)  # a second within `cooldown` calm steps: cut
        True
        >>> guard.scale()
        0.5
        >>> for _ in range(3):
        ...     _ = guard.update(False)
        >>> guard.scale()
        0.75
        >>> guard.update(False, nonfinite=True)  # one bad batch changes nothing
        False
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()  # runs with lr 0.075
        >>> opt.param_groups[0]["lr"]  # the scheduled value is back
        0.1
    """

    def __init__(
        self,
        factor: float = 0.5,
        patience: int = 2,
        cooldown: int = 20,
        min_scale: float = 1e-2,
        recovery_steps: int = 100,
        recovery: Literal["linear", "exponential"] = "linear",
        nonfinite_patience: int = 2,
        memory: bool = True,
        increase: float = 1e-3,
        settle_steps: int = 0,
        reset_momentum: bool = True,
        spare_lone: bool = True,
    ) -> None:
        self.factor = check_number("factor", factor, low=0.0, high=1.0)
        self.patience = check_int("patience", patience, low=1)
        self.cooldown = check_int("cooldown", cooldown, low=0)
        self.min_scale = check_number("min_scale", min_scale, low=0.0, high=1.0, high_inclusive=True)
        self.recovery_steps = check_int("recovery_steps", recovery_steps, low=1)
        if recovery not in _RECOVERY_MODES:
            raise ValueError(f"`recovery` must be one of {_RECOVERY_MODES}, got {recovery!r}")
        self.recovery = recovery
        self.nonfinite_patience = check_int("nonfinite_patience", nonfinite_patience, low=1)
        self.memory = check_bool("memory", memory)
        self.increase = check_number("increase", increase, low=0.0, low_inclusive=True)
        self.settle_steps = check_int("settle_steps", settle_steps, low=0)
        self.reset_momentum = check_bool("reset_momentum", reset_momentum)
        self.spare_lone = check_bool("spare_lone", spare_lone)
        self._states: dict[int, _KeyState] = {}
        self._swaps: dict[int, list[_Swap]] = {}
        # The engine that feeds this guard the decisions of each key (a ``GuardEngine``; weak: a guard does not keep
        # it alive). An engine built for a key later (a new fit, a param group added) takes its place.
        self._feeders: dict[int, weakref.ref[Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle is fed by the engines built for it, not by this guard's.
        return {**self.__dict__, "_feeders": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._feeders = {}

    def __repr__(self) -> str:
        return (
            f"LRGuard(factor={self.factor!r}, patience={self.patience!r}, cooldown={self.cooldown!r}, "
            f"min_scale={self.min_scale!r}, recovery_steps={self.recovery_steps!r}, recovery={self.recovery!r}, "
            f"nonfinite_patience={self.nonfinite_patience!r}, memory={self.memory!r}, increase={self.increase!r}, "
            f"settle_steps={self.settle_steps!r}, reset_momentum={self.reset_momentum!r},"
            f" spare_lone={self.spare_lone!r})"
        )

    # ------------------------------------------------------------------ multiplier

    def _multiplier(self, state: _KeyState) -> float:
        done = (state.calm - self.cooldown) / self.recovery_steps
        if done <= 0.0:
            return state.anchor
        target = max(state.ceiling, state.anchor)  # never "recover" downwards
        if done >= 1.0:
            return target
        if self.recovery == "linear":
            return state.anchor + (target - state.anchor) * done
        return state.anchor * (target / state.anchor) ** done

    def scale(self, key: int = 0) -> float:
        """The current multiplier of optimizer ``key`` (1.0 for a key never updated)."""
        state = self._states.get(key)
        return 1.0 if state is None else self._multiplier(state) * state.held

    def tracks(self, key: int = 0) -> bool:
        """Whether optimizer ``key`` has a state here: updated by an engine, or loaded with :meth:`load_state_dict`."""
        return key in self._states

    def holds_cut(self, key: int = 0) -> bool:
        """Whether the multiplier of optimizer ``key`` holds a cut for a run of non-finite steps in a row that is
        still going on: neither withdrawn nor made real yet (see "Non-finite steps")."""
        state = self._states.get(key)
        return state is not None and state.held < 1.0

    def withdrew(self, key: int = 0) -> bool:
        """Whether the last :meth:`update` of optimizer ``key`` withdrew a held cut: a run of non-finite steps in a
        row ended on a calm step, so its batches were non-finite by themselves (see "Non-finite steps")."""
        state = self._states.get(key)
        return state is not None and bool(state.withdrew)

    def confirmed(self, key: int = 0) -> bool:
        """Whether the last :meth:`update` of optimizer ``key`` confirmed a held cut: trouble (an explosion, a
        divergence) followed the run, which made the cut real. A rollback waits for this, or for the run to go on
        (:meth:`nonfinite_run`; see :class:`~lightning_gradguard.Rollback`)."""
        state = self._states.get(key)
        return state is not None and bool(state.confirmed)

    def nonfinite_run(self, key: int = 0) -> int:
        """The non-finite steps in a row of optimizer ``key`` up to its last :meth:`update` (0 after a finite one)."""
        state = self._states.get(key)
        return 0 if state is None or state.since_nonfinite else state.nonfinite_streak

    def ceiling(self, key: int = 0) -> float:
        """The multiplier that recovery of optimizer ``key`` returns to (1.0 until a rate has exploded)."""
        state = self._states.get(key)
        return 1.0 if state is None else state.ceiling

    def pin(self, key: int = 0) -> None:
        """Lower the ceiling of optimizer ``key`` to its current multiplier: recovery stops there (used after a
        rollback: the rate that exploded is not tried again; the slow ``increase`` still applies once recovered)."""
        state = self._states.get(key)
        if state is not None:
            state.ceiling = min(state.ceiling, max(self._multiplier(state), self.min_scale))

    def forget(self, key: int = 0) -> None:
        """Forget what optimizer ``key``'s rate taught: its multiplier, ceiling and counters start afresh (the
        rate it applies to was changed: a multiplier found for another rate says nothing about it)."""
        self._states.pop(key, None)

    def snapshot(self, key: int = 0) -> dict[str, Any]:
        """The multiplier and counters of optimizer ``key`` (plain values), for :meth:`rewind`."""
        return self._states.get(key, _KeyState()).as_dict()

    def rewind(
        self,
        snapshot: dict[str, Any],
        key: int = 0,
        cut: bool = True,
        state_restored: bool = True,
        factor: float | None = None,
    ) -> bool:
        """Go back to a :meth:`snapshot` of optimizer ``key`` and take one reduction from there.

        Used by a rollback: the reductions taken since the snapshot answered weights that the rollback throws away,
        so the restarted run gets one reduction from the rate in force when the trouble began, not all of them.

        Args:
            snapshot: a :meth:`snapshot` of the same optimizer.
            key: which optimizer.
            cut: ``False``: go back without the reduction (a rollback whose remedy is a clipper, not the rate).
            state_restored: the rollback restored (or cleared) the optimizer's state with the weights: no momentum
                reset then. ``False`` (weights only): the moments of the exploding steps are zeroed as on any cut.
            factor: the reduction, in ``(0, 1)``, when it is to be deeper than the guard's own ``factor`` (the lower
                of the two is taken; ``None``: ``factor``). The ceiling is then set from it as from ``factor``.

        Returns:
            ``True`` when the multiplier was lowered (``False`` at the ``min_scale`` floor, or with ``cut=False``).
        """
        if factor is not None:
            factor = check_number("factor", factor, low=0.0, high=1.0)
        state = _KeyState.from_dict(snapshot)
        state.since_cut = 1 << 30  # the reduction below is the one the trouble asked for: never "settling"
        state.deferred = 0
        state.calm_run = _LONE_CALM  # the restarted run starts calm
        self._states[key] = state
        # Trouble bad enough to go back for: the rate it came at is remembered at once.
        reduced = self._explode(state, force=True, remember=True, factor=factor) if cut else False
        if state_restored:
            # No velocity of the exploding steps is left to stop, and zeroing the copy's moments would throw away
            # what the calm steps built.
            state.reset_due = 0
        return reduced

    def update(
        self,
        exploding: bool,
        key: int = 0,
        nonfinite: bool = False,
        diverging: bool = False,
        clipped: bool = False,
        flagged: bool | None = None,
    ) -> bool:
        """Advance optimizer ``key`` by one step.

        Args:
            exploding: whether this step's gradients exploded (a host-side Python bool).
            key: which optimizer.
            nonfinite: whether this step's gradients were non-finite (the step was skipped or zeroed); only a run
                of them in a row counts as an exploding event (see "Non-finite steps").
            diverging: whether the training loss diverged (a :class:`DivergenceDetector` event, itself several
                high steps in a row): an exploding event that reduces at once, whatever ``patience``.
            clipped: whether this step's gradients were clipped (or the step skipped) for their norm: an exploding
                event on such a step alone among calm steps is a lone spike (``spare_lone``).
            flagged: whether the exploding detector flagged (capped) this step; ``None``: as ``clipped``. A step is
                calm for the lone-spike test when it is neither exploding, flagged, non-finite nor diverging: with
                ``flagged`` given, a step clipped only by a fixed bound (``max_norm``, ``gradient_clip_val``) or by
                the clipper's own statistics is calm.

        Returns:
            ``True`` when the multiplier was lowered by this call (``False`` at the ``min_scale`` floor).
        """
        state = self._states.setdefault(key, _KeyState())
        state.withdrew = state.confirmed = 0
        troubled = exploding or nonfinite or diverging or (clipped if flagged is None else flagged)
        lone = (
            self.spare_lone
            and self.patience > 1
            and exploding
            and clipped
            and not (nonfinite or diverging)
            and state.calm_run >= _LONE_CALM
        )
        state.calm_run = 0 if troubled else min(state.calm_run + 1, _LONE_CALM)
        reduced = False
        if state.deferred:
            state.deferred = 0
            if troubled:  # the spike before was not alone: it counts, before this step
                state.nonfinite_cut = state.nonfinite_passed = 0
                reduced = self._explode(state, force=False)
        if lone:
            # Decided with the next step; until then neither an explosion nor a calm step.
            state.deferred = 1
            state.since_cut = min(state.since_cut + 1, 1 << 30)
            state.since_nonfinite += 1
            return reduced
        # A deferred spike that completed a cut makes this step's trouble part of the same cut: it holds, not cuts
        # again (one cut per call, as the engine counts them).
        return self._step(state, exploding, nonfinite, diverging, hold=reduced) or reduced

    def _step(self, state: _KeyState, exploding: bool, nonfinite: bool, diverging: bool, hold: bool = False) -> bool:
        """:meth:`update` of a step whose events count now (``hold``: they may hold the multiplier, not cut it)."""
        state.since_cut = min(state.since_cut + 1, 1 << 30)
        if nonfinite:
            recent = state.nonfinite > 0 and state.since_nonfinite <= self.cooldown
            in_a_row = state.nonfinite_streak > 0 and state.since_nonfinite == 0  # the step before was non-finite
            state.nonfinite_streak = state.nonfinite_streak + 1 if in_a_row else 1
            state.nonfinite = state.nonfinite + 1 if recent else 1
            state.since_nonfinite = 0
            if diverging:
                # The loss stayed blown up for the detector's patience: a divergence, whatever this step's gradients
                # (a blown-up loss often brings them non-finite). Taken as an isolated bad batch, it was lost: the
                # detector reports each divergence once.
                state.nonfinite = state.nonfinite_cut = state.nonfinite_passed = 0
                return self._explode(state, force=True, hold=hold)
            patience = self.nonfinite_patience
            if self.spare_lone and patience > 1:
                # Only a run in a row cuts, at twice the patience: the steps between scattered ones ran on the
                # weights the skipped steps left, so those were fine and the batches were non-finite (user trial:
                # a triplet loss on `sqrt` distances, NaN for identical pairs on ~15% of the steps, cut for two of
                # them within the cooldown, +9% to +14% held-out against skipping alone). A run that goes on (a
                # model wrecked into NaN) is cut then; the cut is held only while the run lasts, since its skipped
                # steps apply no rate (see `_end_of_run`).
                if state.nonfinite_streak != 2 * patience or state.nonfinite_passed:
                    return False
                state.nonfinite = 0
                return self._hold_run(state)
            if state.nonfinite < patience:
                return False  # an isolated bad batch: neither calm nor an explosion
            state.nonfinite = 0
            row_cut = 2 * patience <= state.nonfinite_streak < 3 * patience and not state.nonfinite_passed
            if state.nonfinite_cut and not row_cut:
                # A lower rate did not stop them and nothing exploded: batches that are non-finite by themselves (a
                # masked mean over a fully masked batch is 0/0), skipped each time. Cutting again would only stall
                # the run (measured: a GRU with one such batch in eleven, cut 8 times to 1% of its rate). A run of
                # them in a row (a model wrecked straight into NaN) cuts once more, when it reaches twice the
                # patience (the count reaches the patience once in every ``patience`` steps of it): not again
                # while it goes on, since skipped steps apply no rate (a NaN stretch of the data cut 7 times), and
                # not once such a run has ended by itself (a loss that is NaN on some batches, 0 * log 0 in a
                # hand-written BCE on 35-50% of the steps, was cut 4-7 times: +3% to +12% held-out).
                return False
            return self._nonfinite_cut(state, hold)
        if state.held < 1.0 and state.since_nonfinite == 0:
            hold = self._end_of_run(state, exploding or diverging, hold)
        if state.nonfinite_cut and state.since_nonfinite == 0:
            state.nonfinite_passed = 1  # a finite step right after non-finite ones, on the same weights
        state.since_nonfinite += 1
        if exploding or diverging:
            state.nonfinite_cut = state.nonfinite_passed = 0
            return self._explode(state, force=diverging, hold=hold)
        recovered = self.cooldown + self.recovery_steps
        if state.calm >= recovered:
            # Recovered: the ceiling creeps back towards 1 (slow increase), and the multiplier with it.
            if state.ceiling < 1.0:
                state.ceiling = min(1.0, state.ceiling * (1.0 + self.increase))
                state.anchor = state.ceiling
            return False
        state.calm += 1
        if state.calm > self.cooldown:
            state.pending = 0
            if state.since_cut < 1 << 30:
                state.armed = 1
        if state.calm == recovered:
            state.anchor = max(state.ceiling, state.anchor)
        return False

    def _hold_run(self, state: _KeyState) -> bool:
        """Cut the rate while a run of non-finite steps lasts (``factor``, down to ``min_scale``). Not while the last
        cut settles (``settle_steps``), which would hold back the cut made real at the run's end."""
        if state.since_cut <= self.settle_steps:
            return False
        current = self._multiplier(state) * state.held
        held = state.held * max(self.factor, self.min_scale / current)
        if held >= state.held:
            return False
        state.held, state.nonfinite_cut = held, 1
        return True

    def _end_of_run(self, state: _KeyState, troubled: bool, hold: bool) -> bool:
        """The first finite step after a run of non-finite steps whose cut is held: a calm one ran on the weights
        the run began with (its skipped steps moved none), so the batches were non-finite, and the cut, which applied
        to no step but this one where the flags land a step late, is withdrawn (``bad_batches.py --count 30 --factor
        nan``, a corrupted shard: the zoo's dropout run +9.8% held-out with the cut kept, +4.5% withdrawn). A troubled
        one makes it real. Returns ``hold`` for this step's own events: the cut just made real is the one reduction
        this step is counted for."""
        state.held = 1.0
        if not troubled:
            state.withdrew = 1
            return hold
        self._nonfinite_cut(state, hold)
        state.confirmed = 1
        return True

    def _nonfinite_cut(self, state: _KeyState, hold: bool) -> bool:
        """The cut that ``nonfinite_patience`` non-finite steps count for."""
        cut = self._explode(state, force=True, hold=hold)
        state.nonfinite_cut = 1
        return cut

    def _explode(
        self, state: _KeyState, force: bool, remember: bool = False, hold: bool = False, factor: float | None = None
    ) -> bool:
        factor = self.factor if factor is None else min(factor, self.factor)
        current = self._multiplier(state)
        # A recurrence: the rate exploded again after a cut had calmed it, within two holds and recoveries of that
        # cut (a rate too high explodes again as recovery brings it back). Bursts further apart (occasional bad
        # data in a long run) are each answered by a cut, never by a ceiling that would ratchet the rate down.
        recurrence = state.armed and state.since_cut <= 2 * (self.cooldown + self.recovery_steps)
        state.calm = 0
        state.anchor = current
        if hold or state.since_cut <= self.settle_steps:
            # The last reduction has not had time to show in the gradients (the flag arrives a step late, and
            # the step after a reduction still carries the weights that the old rate produced): hold, don't cut.
            return False
        state.pending += 1
        if state.pending < self.patience and not force:
            return False
        state.pending = 0
        state.since_cut = 0
        state.armed = 0  # a recurrence is judged against this cut from now on: it must calm past its hold first
        state.anchor = max(current * factor, self.min_scale)
        if self.memory and (recurrence or remember):
            # Just below the rate that exploded again: the geometric middle of it and the reduced rate.
            state.ceiling = max(min(state.ceiling, current * math.sqrt(factor)), state.anchor)
        if self.reset_momentum:
            state.reset_due = 1
        return state.anchor < current

    # ------------------------------------------------------------------ optimizer

    def apply(self, optimizer: torch.optim.Optimizer, key: int = 0) -> None:
        """Set every param group's lr to its scheduled value times the multiplier of ``key``.

        The scheduled values are remembered for :meth:`restore`. Calling ``apply`` twice does not compound.
        A tensor lr is replaced by a scaled copy; the scheduler's tensor is never written to.
        """
        self.restore(optimizer, key)
        state = self._states.get(key)
        if state is not None and state.reset_due:
            state.reset_due = 0
            _zero_momentum(optimizer)
        m = self.scale(key)
        if m == 1.0:
            return
        swaps = []
        for group in optimizer.param_groups:
            scheduled = group.get("lr")
            # The optimizer sizes its own steps (Adafactor(lr=None)) or has no rate (a custom one's "step_size"):
            # nothing to scale.
            if scheduled is None:
                swaps.append(_Swap(None, None, None))
                continue
            applied = scheduled * m
            group["lr"] = applied
            swaps.append(_Swap(scheduled, applied, applied._version if isinstance(applied, Tensor) else None))
        self._swaps[key] = swaps

    def restore(self, optimizer: torch.optim.Optimizer, key: int = 0) -> None:
        """Put back the lrs remembered by :meth:`apply` (idempotent; a no-op when nothing is applied).

        A group whose lr was replaced since :meth:`apply` (by a scheduler that stepped before ``restore``) keeps
        the new value; a tensor lr filled in place keeps the value written into it.
        """
        swaps = self._swaps.pop(key, None)
        if swaps is None:
            return
        for group, swap in zip(optimizer.param_groups, swaps):
            current = group.get("lr")
            if swap.applied is None or current is not swap.applied:
                continue
            # A tensor lr that a scheduler filled in place since apply: keep what it wrote.
            tensors = isinstance(current, Tensor) and isinstance(swap.scheduled, Tensor)
            if tensors and swap.version is not None and current._version != swap.version:  # type: ignore[union-attr]
                swap.scheduled.copy_(current)  # type: ignore[union-attr,arg-type]
            group["lr"] = swap.scheduled

    def scheduled_rates(self, optimizer: torch.optim.Optimizer, key: int = 0) -> list[Any]:
        """Each param group's scheduled rate: its ``lr``, or, while :meth:`apply` has put the multiplier in (inside
        ``optimizer.step()``), the value it replaced."""
        swaps = self._swaps.get(key) or []
        rates = [group.get("lr") for group in optimizer.param_groups]
        for i, swap in enumerate(swaps[: len(rates)]):
            if swap.applied is not None and rates[i] is swap.applied:
                rates[i] = swap.scheduled
        return rates

    def is_attached(self, optimizer: torch.optim.Optimizer, key: int = 0) -> bool:
        """Whether :meth:`attach` put this guard's hooks for ``key`` on ``optimizer`` (or the optimizer it wraps), and
        they have not been removed since."""
        return _ATTACHED.get(unwrap_optimizer(optimizer)) == (id(self), key)

    def attached(self, key: int = 0) -> bool:
        """Whether :meth:`attach` put this guard's hooks for ``key`` on some optimizer, not removed since: without
        them the multiplier reaches no learning rate."""
        return (id(self), key) in _ATTACHED.values()

    def attach(self, optimizer: torch.optim.Optimizer, key: int = 0) -> LRGuardHandle:
        """Scale the lr of ``optimizer`` inside each ``optimizer.step`` call only.

        Registers a step pre-hook that calls :meth:`apply` and a step post-hook that calls :meth:`restore` on the
        torch optimizer itself (under a wrapper such as accelerate's ``AcceleratedOptimizer``). A
        step that is never taken (skipped by ``GradScaler``, or not called) therefore never shows the scaled lr
        to a scheduler. Hooks registered on ``optimizer`` after this call see the scaled lr.

        Returns:
            A handle whose ``remove()`` removes both hooks.
        """

        optimizer = unwrap_optimizer(optimizer)  # a framework's wrapper has no hooks of its own (accelerate)
        if optimizer in _ATTACHED:
            # Two sets of hooks would each take the other's scaled rate for the scheduled one: the rate would shrink
            # on every step. The same guard twice is refused too: removing one handle would leave hooks behind.
            raise ValueError(
                f"LRGuard.attach: {type(optimizer).__name__} already has an LR guard attached (another LRGuard, this"
                " one already, or a second GradGuard callback). One optimizer takes one LR guard: remove the other"
                " handle first."
            )
        if (id(self), key) in _ATTACHED.values():
            # Two optimizers under one key share one multiplier and one event count: one spike seen by the engines of
            # both is "two events", a cut.
            raise ValueError(
                f"LRGuard.attach: `key={key}` is already attached to another optimizer. Optimizers that share an"
                " LRGuard need a key each (`GuardEngine(..., key=1)`); for a new optimizer, remove the old handle"
                " first."
            )
        if any(group.get("lr") is None for group in optimizer.param_groups):
            warnings.warn(
                f"LRGuard: {type(optimizer).__name__} has param groups with lr=None or no 'lr' at all: it sizes its own"
                " steps (e.g. Adafactor(relative_step=True)) or names its rate otherwise, so the LR guard cannot lower"
                " their rate. Clipping, skipping and rollback still act; give the optimizer an explicit lr for the LR"
                " guard to act on it.",
                UserWarning,
                stacklevel=2,
            )

        def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.apply(opt, key)

        def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.restore(opt, key)

        handles = (optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook))
        _ATTACHED[optimizer] = (id(self), key)
        return LRGuardHandle(self, optimizer, key, handles)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Multipliers and counters per optimizer key (keys as strings; plain Python values only).

        The engines that feed this guard first act on the steps they have not acted on yet (see
        :meth:`GuardEngine.state_dict <lightning_gradguard.GuardEngine.state_dict>`), so the state holds a cut their
        last step called for, whichever of the two states is taken first.
        """
        for ref in list(self._feeders.values()):
            engine = ref()
            if engine is not None:
                engine._settle()
        return {"keys": {str(key): s.as_dict() for key, s in self._states.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state returned by :meth:`state_dict` (a state saved before ``ceiling`` existed loads too)."""
        check_state("LRGuard", state_dict, ("keys",))
        states = {}
        for key, s in state_dict["keys"].items():
            state = _KeyState.from_dict(s)
            for name in ("anchor", "ceiling", "held"):
                value = getattr(state, name)
                if not (math.isfinite(value) and 0.0 < value <= 1.0):
                    raise ValueError(f"invalid {name} {value!r} for key {key!r} in the LRGuard state")
            if "armed" not in s and state.since_cut < 1 << 30 and state.calm > self.cooldown:
                # Saved before ``armed`` was kept: a cut that had calmed past its hold is armed, as it would have
                # been (a fully recovered state is never visited by the calm-step code that arms it).
                state.armed = 1
            states[int(key)] = state
        self._states = states
