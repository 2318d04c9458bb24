"""Rollback: when the LR guard lowers the rate, go back to the last parameters known to have trained calmly.

At a learning rate far too high, the first one or two updates can wreck the weights before any statistic has a calm
history to compare with: the LSTM of the stability suite goes from loss 0.8 to 9.6 in one step at 10x its stable
rate. Lowering the rate afterwards leaves the run where it landed (saturated gates, a ResNet full of NaN).
:class:`Rollback` keeps a copy of the trainable parameters and of their optimizer state from a point known to have
trained calmly, and puts it back when the LR guard lowers the rate, so that the lower rate starts again from
healthy weights. Repeated, this is an automatic learning-rate finder: each explosion halves the rate (the LR guard's
``factor``) and returns to the last healthy point.

A copy is *known healthy* once ``every`` further steps have passed without an exploding or non-finite event: the
damage of a too-large update shows in the gradients of the steps after it, not in the update itself, so the copy
taken just before an explosion may already hold wrecked weights. Two slots make the delay possible: a *candidate*
copy, taken every ``every`` steps, becomes the *safe* copy once the ``every`` steps after it were calm; a rollback
restores the safe copy. The copy taken before the first optimizer step (the initial weights, no optimizer state) is
safe from the start.

Opt-in (``GradGuard(rollback=Rollback())``): the two copies cost memory that a callback on by default cannot take
from a large model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._compat import foreach_copy_
from lightning_gradguard._validation import check_bool, check_int

__all__ = ["Rollback", "rollback_from"]

_NEVER = -(1 << 62)  # "no event yet", as a step number


def _same_layout(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device for x, y in zip(a, b)
    )


def _copy_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``t.copy_(s)`` for each pair, one fused copy per device of the targets."""
    groups: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    for t, s in zip(targets, sources):
        group = groups.setdefault(t.device, ([], []))
        group[0].append(t)
        group[1].append(s if s.device == t.device else s.to(t.device))
    for t_list, s_list in groups.values():
        foreach_copy_(t_list, s_list)


class _Slot:
    """One copy of some parameters and of their optimizer state (buffers reused from one copy to the next)."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []  # the parameters copied (references, to restore into)
        self.values: list[Tensor] = []  # their copies
        self.state_keys: list[tuple[int, str]] = []  # (position in ``params``, name) of each optimizer state tensor
        self.state: list[Tensor] = []
        self.plain: dict[tuple[int, str], Any] = {}  # optimizer state that is not a tensor (ints, floats)
        self.step = -1  # the engine step (1-based) whose gradients were computed on these weights
        self.valid = False
        self.extra: Any = None  # the caller's own state at the copy (the engine's statistics)

    def take(self, params: list[Tensor], optimizer: torch.optim.Optimizer | None, step: int, extra: Any) -> None:
        sources = [p.detach() for p in params]
        if _same_layout(self.values, sources):
            _copy_(self.values, sources)
        else:
            self.values = [s.clone() for s in sources]
        self.params = list(params)
        keys: list[tuple[int, str]] = []
        tensors: list[Tensor] = []
        plain: dict[tuple[int, str], Any] = {}
        for i, p in enumerate(params):
            state = optimizer.state.get(p) if optimizer is not None else None
            for name, value in (state or {}).items():
                if isinstance(value, Tensor):
                    keys.append((i, name))
                    tensors.append(value.detach())
                else:
                    plain[(i, name)] = value
        if keys == self.state_keys and _same_layout(self.state, tensors):
            _copy_(self.state, tensors)
        else:
            self.state = [t.clone() for t in tensors]
            self.state_keys = keys
        self.plain = plain
        self.step = step
        self.extra = extra
        self.valid = True

    def restore(self, optimizer: torch.optim.Optimizer | None) -> None:
        _copy_([p.detach() for p in self.params], self.values)
        if optimizer is None:
            return
        saved: dict[int, dict[str, Any]] = {i: {} for i in range(len(self.params))}
        for (i, name), value in zip(self.state_keys, self.state):
            saved[i][name] = value
        for (i, name), value in self.plain.items():
            saved[i][name] = value
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        for i, p in enumerate(self.params):
            if not saved[i]:
                optimizer.state.pop(p, None)  # no state yet at the copy: the optimizer creates it afresh
                continue
            current = optimizer.state.get(p) or {}
            new: dict[str, Any] = {}
            for name, value in saved[i].items():
                old = current.get(name)
                if isinstance(value, Tensor) and isinstance(old, Tensor) and old.shape == value.shape:
                    targets.append(old)  # in place: whoever holds the optimizer's tensors keeps valid references
                    sources.append(value if old.dtype == value.dtype else value.to(old.dtype))
                    new[name] = old
                else:
                    new[name] = value.clone() if isinstance(value, Tensor) else value
            optimizer.state[p] = new
        _copy_(targets, sources)


class Rollback:
    """Go back to the last known-healthy parameters and optimizer state when the LR guard lowers the rate.

    Opt-in: ``GradGuard(rollback=Rollback())`` (or ``rollback=True``) and ``GuardEngine(..., rollback=Rollback())``;
    the default is no rollback, because the two copies it keeps cost memory that a large model may not have. It acts
    only together with an :class:`~lightning_gradguard.LRGuard`, on the steps where the guard lowers its multiplier
    (an exploding step, repeated non-finite steps). A run that never has its rate lowered is never touched: the
    copies change no number of it.

    Every ``every`` optimizer steps, the trainable parameters (``requires_grad``) of the optimizer and their optimizer
    state (momentum, Adam's moments and step) are copied into a spare buffer, one fused copy per device (the
    *candidate*). Once the ``every`` steps after it have passed without an exploding or non-finite event, the
    candidate becomes the *safe* copy; the initial weights are the first safe copy. When the LR guard lowers the
    rate, the step is skipped, the safe copy is written back into the parameters and the optimizer state, and the
    flags of the steps taken since are dropped (they describe the abandoned trajectory). The clipper's and the
    detectors' statistics go back to where they were at the copy (a small clone of each, taken with it): the norms
    of the abandoned steps would otherwise make the next climb look ordinary. Repeated, this is an automatic
    learning-rate finder: each explosion lowers the rate (the LR guard's ``factor``) and returns to healthy weights.

    Cost: memory for two copies of the trainable parameters and their optimizer state, on their device (the copies
    take 4x the memory of the trainable parameters with SGD and momentum, 6x with Adam; frozen parameters are not
    copied, so LoRA pays for its adapters only); one fused copy every ``every`` steps; nothing on the other steps,
    and no host-device synchronization on a single device (the decision uses the flags the LR guard already reads,
    at most a step late). Under several processes (DDP, FSDP2) the engine waits, each step, for the previous step's
    flags to land (a small copy issued a forward and backward pass earlier), so that the LR guard's cut and the
    rollback fall on the same step on every rank; it does so with or without a rollback.

    Args:
        every: optimizer steps between copies, ``>= 1``; also the calm stretch after which a copy is trusted.
        pin_lr: after a rollback, recovery of the LR guard's multiplier stops at the lowered rate instead of
            returning to the guard's ceiling (just below the rate that exploded).
        max_rollbacks: the most rollbacks per optimizer (``None``: no limit); beyond it the LR guard acts alone.

    Checkpoints keep the counters only, not the copies (they would double a checkpoint's size): after resuming,
    the resumed weights become the safe copy.

    Raises:
        ValueError: for an argument outside its allowed values.

    Example:
        >>> import torch
        >>> from lightning_gradguard import GradGuard, GuardEngine, LRGuard
        >>> guard = GradGuard(rollback=Rollback(every=50))  # in a Trainer; GradGuard(rollback=True) is the same
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = GuardEngine(model, lr_guard=LRGuard(), rollback=Rollback(every=10))
        >>> handle = engine.attach(opt)
        >>> start = model.weight.detach().clone()
        >>> for step in range(1, 6):
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(2, 4)).sum() * (float("nan") if step in (3, 4) else 1.0)
        ...     loss.backward()
        ...     _ = engine.step(optimizer=opt)  # before opt.step(): copies, or rolls back and skips the step
        ...     opt.step()
        >>> engine.summary()["rolled_back"], torch.equal(model.weight, start)
        (1, True)
    """

    def __init__(self, every: int = 50, pin_lr: bool = False, max_rollbacks: int | None = None) -> None:
        self.every = check_int("every", every, low=1)
        self.pin_lr = check_bool("pin_lr", pin_lr)
        self.max_rollbacks = None if max_rollbacks is None else check_int("max_rollbacks", max_rollbacks, low=0)
        self._safe = _Slot()
        self._candidate = _Slot()
        self._last_event = _NEVER  # the last engine step with an exploding or non-finite event, as the host knows
        self._known = 0  # the last engine step whose flags the host has seen
        self.count = 0  # rollbacks so far

    def __repr__(self) -> str:
        return f"Rollback(every={self.every}, pin_lr={self.pin_lr}, max_rollbacks={self.max_rollbacks})"

    def observe(self, step: int, troubled: bool) -> None:
        """Record the flags of engine step ``step`` (1-based) once they have reached the host."""
        self._known = max(self._known, step)
        if troubled:
            self._last_event = max(self._last_event, step)

    def before_step(
        self,
        step: int,
        params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer | None,
        capture: Callable[[], Any] | None = None,
    ) -> None:
        """Take the copies that are due at engine step ``step`` (1-based), before its gradients are used.

        The parameters hold the weights this step's gradients were computed on. ``capture`` returns the caller's
        own state to keep with a copy (given back by :meth:`restore`); it must not wait for the device.
        """
        candidate = self._candidate
        if candidate.valid and self._known >= candidate.step + self.every and self._last_event < candidate.step:
            self._safe, self._candidate = candidate, self._safe  # calm since the copy: trusted from now on
            self._candidate.valid = False
        if not self._safe.valid:
            slot = self._safe
        elif step % self.every == 0 and not self._candidate.valid and self._last_event <= self._known - self.every:
            slot = self._candidate
        else:
            return  # the usual step: a few integer comparisons, nothing per parameter
        trainable = [p for p in params if p.requires_grad]
        slot.take(trainable, optimizer, step, capture() if capture is not None else None)

    def can_restore(self) -> bool:
        """Whether a rollback is possible now."""
        return self._safe.valid and (self.max_rollbacks is None or self.count < self.max_rollbacks)

    def restore(self, optimizer: torch.optim.Optimizer | None) -> Any:
        """Write the safe copy back into the parameters and ``optimizer``'s state; returns what ``capture`` returned
        when the copy was taken."""
        self._safe.restore(optimizer)
        self._candidate.valid = False
        self.count += 1
        return self._safe.extra

    def reset(self) -> None:
        """Forget the copies (the next step takes a new safe copy)."""
        self._safe.valid = self._candidate.valid = False

    def state_dict(self) -> dict[str, Any]:
        """The rollback count (the copies are not saved; see the class docstring)."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the copies are forgotten, so the next step's weights become the safe copy."""
        self.count = int(state.get("count", 0))
        self._last_event, self._known = _NEVER, 0
        self.reset()


def rollback_from(value: Rollback | bool | None) -> Rollback | None:
    """The ``rollback=`` argument of ``GradGuard`` and ``GuardEngine``: a :class:`Rollback`, ``True`` (the same as
    ``Rollback()``), ``False`` or ``None`` (no rollback, the default).

    Raises:
        ValueError: for anything else (``"default"`` included: the default is no rollback).

    Example:
        >>> rollback_from(True), rollback_from(None)
        (Rollback(every=50, pin_lr=False, max_rollbacks=None), None)
    """
    if value is None or value is False:
        return None
    if value is True:
        return Rollback()
    if isinstance(value, Rollback):
        return value
    raise ValueError(f"`rollback` must be a Rollback, True (Rollback()), False or None, got {value!r}")
