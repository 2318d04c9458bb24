"""Rollback: when the LR guard lowers the rate, go back to the last parameters known to have trained calmly.

At a learning rate far too high, the first one or two updates can wreck the weights before any statistic has a calm
history to compare with: the LSTM of the stability suite goes from loss 0.8 to 9.6 in one step at 10x its stable
rate. Lowering the rate afterwards leaves the run where it landed (saturated gates, a ResNet full of NaN).
:class:`Rollback` keeps a copy of the trainable parameters and of their optimizer state from a point known to have
trained calmly, and puts it back when the LR guard lowers the rate, so that the lower rate starts again from
healthy weights. Repeated, this is an automatic learning-rate finder: each cut halves the rate (the LR guard's
``factor``) and returns to the last healthy point.

A copy is *known healthy* once ``every`` further steps have passed without an exploding or non-finite event: the
damage of a too-large update shows in the gradients of the steps after it, not in the update itself, so the copy
taken just before an explosion may already hold wrecked weights. Two slots make the delay possible: a *candidate*
copy, taken every ``every`` steps, becomes the *safe* copy once the ``every`` steps after it were calm; a rollback
restores the safe copy. The copy taken before the first optimizer step (the initial weights, no optimizer state) is
safe from the start.

``GradGuard()`` rolls back by default, but only early and cheaply (:func:`default_rollback`): one copy of the
initial trainable parameters, kept for the first 500 optimizer steps and only when it takes at most 1 GiB, used only
after two troubled steps in a row (so isolated spikes, bad batches between calm steps, never restart a run). That is
where a too-high learning rate shows itself, and where a restart loses least. The first restart for trouble in the
first 20 steps of a run that had no calm start (``calm_factor``) is a plain retry at the same rate (``retry``): bad
batches there look just like a rate too high, and only the rate's trouble comes back. When it does, in an SGD run, the
restart puts a rescue clipper (AGC) to work instead of cutting the rate (``rescue``), unless one of those steps blew the
gradient norm up by more than ``blowup_factor``: then it does both, with no retry before. The full rollback
(``GradGuard(rollback=True)``, :func:`full_rollback`) keeps two copies of the parameters and of their optimizer state
for the whole run: opt-in, for its memory.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._compat import foreach_copy_, shards_state, state_holders, user_stacklevel
from lightning_gradguard._validation import check_bool, check_int, check_state, optional_int, optional_number
from lightning_gradguard.clip import AGC, Clipper

__all__ = ["Rollback", "default_rollback", "full_rollback", "rollback_from"]

_NEVER = -(1 << 62)  # "no event yet", as a step number
#: Calm steps (total gradient norm known, positive and untroubled) that a calm start needs before its trouble began.
CALM_STEPS = 3
# Optimizers whose step grows with the gradient, so that clipping bounds it. Adaptive ones (Adam, RMSprop, ...)
# divide the gradient's size away: clipping cannot slow their steps, and only a lower rate rescues them.
_PROPORTIONAL = (torch.optim.SGD, torch.optim.ASGD)


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


def _optimizer_state(
    params: Sequence[Tensor], optimizer: torch.optim.Optimizer | None
) -> tuple[list[tuple[int, str]], list[Tensor], dict[tuple[int, str], Any]]:
    """The optimizer state of ``params``: the (position, name) of each tensor, the tensors (not copied), and the
    values that are not tensors (copied deeply: the optimizer changes LBFGS's lists in place)."""
    keys: list[tuple[int, str]] = []
    tensors: list[Tensor] = []
    plain: dict[tuple[int, str], Any] = {}
    # A base optimizer's entries are named with its prefix (`state_holders`): "base_optimizer.momentum_buffer". The
    # outer optimizer's keep their names as they are (a key need not be a string).
    for prefix, holder in state_holders(optimizer):
        for i, p in enumerate(params):
            for name, value in (holder.state.get(p) or {}).items():
                key = f"{prefix}{name}" if prefix else name
                if isinstance(value, Tensor):
                    keys.append((i, key))
                    tensors.append(value.detach())
                else:
                    plain[(i, key)] = copy.deepcopy(value)
    return keys, tensors, plain


class _Slot:
    """One copy of some parameters and of their optimizer state (buffers reused from one copy to the next)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drop the copies (their memory is freed once nothing else holds them)."""
        self.params: list[Tensor] = []  # the parameters copied (references, to restore into)
        self.positions: list[int] = []  # their positions among the parameters the copy was taken from
        # Positions among those parameters of the ones left out (frozen at the copy): see :meth:`Rollback.join`.
        self.frozen: list[int] = []
        self.values: list[Tensor] = []  # their copies
        self.state_keys: list[tuple[int, str]] = []  # (position in ``params``, name) of each optimizer state tensor
        self.state: list[Tensor] = []
        # Optimizer state that is not a tensor: ints and floats, or containers (LBFGS's lists of past directions),
        # copied deeply because the optimizer changes them in place.
        self.plain: dict[tuple[int, str], Any] = {}
        self.step = -1  # the engine step (1-based) whose gradients were computed on these weights
        self.sharded_state = False  # the optimizer state copied is one rank's shard (ZeroRedundancyOptimizer)
        self.valid = False
        self.extra: Any = None  # the caller's own state at the copy (the engine's statistics)

    def take(
        self,
        params: list[Tensor],
        optimizer: torch.optim.Optimizer | None,
        step: int,
        extra: Any,
        positions: list[int] | None = None,
        total: int | None = None,
    ) -> None:
        """Copy ``params`` (at ``positions`` among ``total`` parameters, the others frozen) and their optimizer
        state, at engine step ``step``; ``extra``: the caller's own state."""
        sources = [p.detach() for p in params]
        if _same_layout(self.values, sources):
            _copy_(self.values, sources)
        else:
            self.values = [s.clone() for s in sources]
        self.params = list(params)
        self.positions = list(range(len(params))) if positions is None else list(positions)
        copied = set(self.positions)
        self.frozen = [i for i in range(total) if i not in copied] if total is not None else []
        keys, tensors, plain = _optimizer_state(params, optimizer)
        self.sharded_state = shards_state(optimizer)
        if keys == self.state_keys and _same_layout(self.state, tensors):
            _copy_(self.state, tensors)
        else:
            self.state = [t.clone() for t in tensors]
            self.state_keys = keys
        self.plain = plain
        self.step = step
        self.extra = extra
        self.valid = True

    def join(self, params: Sequence[Tensor], joined: list[int], optimizer: torch.optim.Optimizer | None) -> bool:
        """Add the parameters at positions ``joined`` among ``params`` (frozen at the copy) as they are now, with
        their optimizer state; ``True`` when any were added."""
        if not joined:
            return False
        added = [params[i] for i in joined]
        offset = len(self.params)
        keys, tensors, plain = _optimizer_state(added, optimizer)
        self.params += added
        self.positions += joined
        self.values += [p.detach().clone() for p in added]
        self.state_keys += [(offset + i, name) for i, name in keys]
        self.state += [t.clone() for t in tensors]
        self.plain.update({(offset + i, name): value for (i, name), value in plain.items()})
        taken = set(joined)
        self.frozen = [i for i in self.frozen if i not in taken]
        self.sharded_state |= shards_state(optimizer)
        return True

    def restore(self, optimizer: torch.optim.Optimizer | None) -> None:
        _copy_([p.detach() for p in self.params], self.values)
        if optimizer is None:
            return
        holders = state_holders(optimizer)
        # Each entry goes back to the optimizer its prefix names; the rest (any key) to the outer one.
        saved: dict[tuple[int, int], dict[Any, Any]] = {}
        for (i, name), value in [*zip(self.state_keys, self.state), *self.plain.items()]:
            which = next((k for k, (prefix, _) in enumerate(holders) if prefix and str(name).startswith(prefix)), 0)
            key = name[len(holders[which][0]) :] if which else name
            saved.setdefault((which, i), {})[key] = value
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        for which, (_, holder) in enumerate(holders):
            for i, p in enumerate(self.params):
                entries = saved.get((which, i))
                if not entries:
                    holder.state.pop(p, None)  # no state yet at the copy: the optimizer creates it afresh
                    continue
                current = holder.state.get(p) or {}
                new: dict[str, Any] = {}
                for name, value in entries.items():
                    old = current.get(name)
                    if isinstance(value, Tensor) and isinstance(old, Tensor) and old.shape == value.shape:
                        targets.append(old)  # in place: whoever holds the optimizer's tensors keeps valid references
                        sources.append(value if old.dtype == value.dtype else value.to(old.dtype))
                        new[name] = old
                    else:
                        # The slot's own values stay as they were copied: the same copy may be restored again.
                        new[name] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
                holder.state[p] = new
        _copy_(targets, sources)

    def portable(self) -> bool:
        """Whether the copies are plain tensors, the same on every rank of a data-parallel run (a sharded DTensor's
        copy holds one rank's shard, which no other rank could load, and so does a ZeroRedundancyOptimizer's state)."""
        return not self.sharded_state and all(type(t) is Tensor for t in (*self.values, *self.state))

    def saved(self) -> dict[str, Any]:
        """The copy as plain values and tensors (references to the copy's buffers, as ``Module.state_dict`` gives)."""
        return {
            "positions": list(self.positions),
            "values": list(self.values),
            "state_keys": [[i, name] for i, name in self.state_keys],
            "state": list(self.state),
            "plain": [[i, name, value] for (i, name), value in self.plain.items()],
            "step": self.step,
            "extra": self.extra,
        }

    def load_(self, saved: dict[str, Any], params: Sequence[Tensor]) -> bool:
        """Take a :meth:`saved` copy back, into the parameters at its positions among ``params``; ``False`` (and no
        change) when they do not match it in number, shape or dtype, or are sharded."""
        positions = [int(i) for i in saved["positions"]]
        values = saved["values"]
        if len(values) != len(positions) or any(not 0 <= i < len(params) for i in positions):
            return False
        bound = [params[i] for i in positions]
        if any(
            v.shape != p.shape or v.dtype != p.dtype or type(p.detach()) is not Tensor for v, p in zip(values, bound)
        ):
            return False  # another layout, or sharded parameters (a DTensor's shape is the whole tensor's)
        self.params, self.positions = bound, positions
        copied = set(positions)
        self.frozen = [i for i in range(len(params)) if i not in copied]
        # Copies, not the loaded tensors: the caller may hold on to the state (or load it twice), and a slot is
        # written in place by later copies.
        self.values = [v.to(p.device, copy=True) for v, p in zip(values, bound)]
        self.state_keys = [(int(i), str(name)) for i, name in saved["state_keys"]]
        # Optimizer state beside its parameter, but 0-d values (Adam's step counts) where they were saved: a
        # non-capturable optimizer keeps them on the CPU.
        self.state = [
            t.to(bound[i].device if t.dim() > 0 else t.device, copy=True)
            for (i, _), t in zip(self.state_keys, saved["state"])
        ]
        self.plain = {(int(i), str(name)): copy.deepcopy(value) for i, name, value in saved["plain"]}
        self.step = int(saved["step"])
        self.extra = saved["extra"]
        self.sharded_state = False  # only portable copies are saved
        self.valid = True
        return True


def _tensor_nbytes(value: Any) -> int:
    """The memory of the tensors in ``value``: a tensor, or a list, tuple or dict of them (LBFGS's history)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_nbytes(v) for v in value.values())
    return 0


def _slot_nbytes(slot: _Slot) -> int:
    return _tensor_nbytes([slot.values, slot.state, list(slot.plain.values())])


def _nbytes(params: list[Tensor], optimizer: torch.optim.Optimizer | None) -> int:
    """The memory one copy of ``params`` and of their optimizer state takes."""
    total = sum(p.numel() * p.element_size() for p in params)
    # ZeroRedundancyOptimizer's own `state` is empty (each rank's shard is in its local optimizer): counting the shard
    # would let ranks whose shards differ in size decide differently whether to keep a copy.
    if optimizer is not None:
        for p in params:
            total += _tensor_nbytes(optimizer.state.get(p) or {})
        # A base optimizer that shares its groups (a SAM's) holds the momentum, copied too (`state_holders`).
        for prefix, holder in state_holders(optimizer):
            if prefix:
                total += sum(_tensor_nbytes(holder.state.get(p) or {}) for p in params)
    return total


class Rollback:
    """Go back to the last known-healthy parameters and optimizer state when the LR guard lowers the rate.

    ``GradGuard()`` uses :func:`default_rollback` (early, one copy of the initial weights, at most 1 GiB);
    ``GradGuard(rollback=True)`` (:func:`full_rollback`, this class with the early restart's remedies), a
    ``Rollback(...)`` of one's own, and ``GuardEngine(..., rollback=True)`` keep two copies for the whole run. It acts
    only together with an :class:`~lightning_gradguard.LRGuard`, on the steps where the guard lowers its multiplier (an
    exploding step, a divergence of the loss, or a run of non-finite steps in a row once the guard confirms its cut:
    trouble right after the run, or the run going on: to twice the length that cut for early trouble, to 20 steps, the
    stall warning's length, after a calm start; a calm step after it withdraws the cut, and the run's weights are kept).
    A run that never has its rate lowered is never touched: the copies change no number of it.

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
    copied, so LoRA pays for its adapters only); with ``every=None`` one copy of the initial trainable parameters
    (1x; the optimizer has no state yet). One fused copy every ``every`` steps; nothing on the other steps, and no
    host-device synchronization on a single device (the decision uses the flags the LR guard already reads, at most
    a step late). Under several processes (DDP, FSDP2) the engine waits, each step, for the previous step's flags to
    land (a small copy issued a forward and backward pass earlier), so that the LR guard's cut and the rollback fall
    on the same step on every rank; it does so with or without a rollback.

    Args:
        every: optimizer steps between copies, ``>= 1``; also the calm stretch after which a copy is trusted.
            ``None``: no later copies, a rollback always returns to the first copy (the initial weights).
        pin_lr: after a rollback, recovery of the LR guard's multiplier stops at the lowered rate instead of
            returning to the guard's ceiling (just below the rate that exploded).
        max_rollbacks: the most rollbacks per optimizer (``None``: no limit); beyond it the LR guard acts alone.
        until: the last optimizer step at which a rollback may happen, ``>= 1``; the copies are freed after it.
            ``None``: the whole run.
        patience: troubled steps (exploding or non-finite) in one stretch that a rollback needs, ``>= 1``: with 2,
            spikes apart from each other may lower the rate (the LR guard's decision) but do not roll back. Above 1,
            a stretch of non-finite steps only (bad batches in a row) needs twice as many.
        within: troubled steps form one stretch while each comes fewer than ``within`` steps after the one before,
            ``>= 1`` (2: in a row).
        max_bytes: the most memory the copies may take, ``> 0``: a larger model gets no rollback (one warning says
            so) rather than a slower or out-of-memory run. ``None``: no limit.
        rescue: a :class:`~lightning_gradguard.Clipper` that a rollback puts to work, after the guard's own clipper, for
            the rest of the run (:func:`default_rollback` uses ``AGC()``), when the optimizer's step grows with the
            gradient (``torch.optim.SGD`` and its subclasses; Adam, RMSprop and other adaptive optimizers divide the
            gradient's size away, so clipping cannot slow them) and no gradient still carries a GradScaler's scale (a
            fused optimizer under 16-bit AMP unscales inside its step). That rollback returns to the copy at the rate
            in force when the trouble began instead of lowering it (unless the norm blew up, ``blowup_factor``): the
            clipper is the remedy tried first; the rollbacks after it lower the rate as usual. ``None``: every rollback
            lowers the rate. A run that never rolls back never calls it. Its clipping is not in ``clipped`` or
            ``clip_coef`` (those describe the guard's clipper); :attr:`rescuing` says whether it is at work, and it
            stays at work after a checkpoint resume; :attr:`rescue_cause` says what the stretch of trouble that put it
            to work held: ``"loss"`` (a divergence of the loss alone) or ``"gradients"`` (an exploding or non-finite
            step).
        rescue_until: the rescue clipper is put to work only for trouble that began by this optimizer step (counted from
            the plain retry after one, ``retry``), ``>= 1``: a rate too high from the start fails in its first steps,
            before the run has been calm; trouble after a calm stretch is more often a few bad batches, which a clipper
            kept for the rest of the run would only slow down (measured: two bad batches in a row at step 40 of a
            healthy SGD run, +45% held-out loss with the rescue, +0.1% with the cut).
        calm_factor: trouble that follows a calm start is bad batches, not a bad rate: when at least
            :data:`CALM_STEPS` (3) steps before the trouble began had total gradient norms within this factor of each
            other (largest <= ``calm_factor`` x smallest; zero norms, of masked batches, and troubled steps not
            counted), the rollback cuts the rate instead of putting the rescue clipper to work, ``> 1``. A rate too
            high from the start has no calm start: its norms grow 10-100x per step from the first (measured in the
            stability suite), while the healthy zoo's SGD runs keep theirs within 1.5x until a bad batch. ``None``:
            no such test (any trouble that began by ``rescue_until`` gets the rescue). Costs one concatenation per
            step, in the first ``rescue_until`` steps only, to send the total norm to the host with the flags.
        blowup_factor: a rescue whose trouble multiplied the total gradient norm by more than this in one step (a
            troubled step's norm over the step's before it, in the first ``rescue_until`` steps; zero and non-finite
            norms not compared) also takes the LR guard's cut, ``> 1``. Such a jump (10^8-10^12x on the stability
            suite's ResNet-20 without normalisation, against at most 541x on its LSTM) says the rate is orders of
            magnitude too high, where unit-wise clipping at that rate still moves the whole net too far: a bounded step
            of every layer compounds through the depth. ``None``: the rescue keeps the rate. The cut lasts as the LR
            guard's cuts do (held, then recovered to just below the rate that exploded).
        early_only: roll back on a stretch of exploding or non-finite steps only when it began by ``rescue_until``
            without a calm start before it (``calm_factor``): a rate too high from the start. Later trouble, or
            trouble after a calm start, is bad batches or a late instability at weights worth keeping: the LR guard's
            cut answers it, and the run goes on from where it is. A divergence event of the loss (blown up above its
            first value for several steps: the weights are wrecked) still rolls back at any step up to ``until``.
            :func:`default_rollback` sets it, because its only copy is the initial weights: two bad batches in a row
            at step 150 of 200 restarted the healthy zoo's masked-batch Adam run from scratch, and it ended +354%
            (held-out loss), against +1.3% with the cut alone.
        retry: the first rollback for trouble that began by ``rescue_until`` without a calm start (``calm_factor``)
            is a plain retry: it returns to the copy at the rate in force when the trouble began, with no cut and no
            rescue clipper, and only the next such stretch gets the remedy. One attempt cannot tell a rate too high
            from bad batches among the first steps: a rate too high fails again, on fresh batches, within a few steps;
            bad batches do not come back. The steps after the retry are counted from it, as a run's first steps
            (``rescue_until``, the calm start), and judged against the clipper's and the detectors' statistics of the
            step before the trouble began (the engine keeps them for the first steps), not the copy's: the retried run
            is the same run, and a bad batch right after the retry is clipped like one before it. A divergence event of
            the loss, or a blow-up (``blowup_factor``), gets the remedy at once. :attr:`retried` says whether the retry
            was used; it is kept with the state.
            :func:`default_rollback` sets it: two bad batches at steps 2 and 3 of the healthy zoo's SGD runs otherwise
            put the rescue clipper to work for the whole run (+30% and +55% held-out loss on two of them).
        save_copies: keep the copies in :meth:`state_dict` (and so in Lightning checkpoints) while they are held,
            for a resume that restarts from the same weights as the run that was not interrupted. ``False`` keeps
            checkpoints small: a resumed run's weights at its first step become its safe copy, and trouble after the
            resume goes back only to them. The copies of sharded parameters (FSDP2's DTensors) are never saved: each
            rank holds its own shard.
        diverged_factor: the LR guard's reduction on a rollback for a divergence event of the loss, in ``(0, 1)``
            (the deeper of it and the guard's ``factor`` is taken); recovery then returns to just below the rate
            that diverged, as after any cut (the geometric middle of the two). A loss an order of magnitude above both
            its running level and its untrained level says that the rate is far too high, not a little: an LR range
            test takes a tenth of the rate at which the loss blows up. :func:`default_rollback` sets 0.1 (see "Why a
            tenth" below). ``None``: the guard's ``factor``.

    Why a rescue clipper: at a learning rate 10-1000x too high, halving the rate after each failure takes several
    failures to get there, each one a restart; unit-wise clipping (:class:`~lightning_gradguard.AGC`, Brock et al.,
    2021) bounds every unit's step relative to its own weights, which is what the too-high rate lacks, and trains at
    that rate. In the stability suite (README, "Fragile suite") the default's restarts took the ResNet-20 without BN
    at 100-1000x its best rate from chance to CE 1.72 / 0.549 / 1.45 (seeds 0 / 1 / 2; its best rate unguarded:
    1.73 / 1.93 / 2.09; the rescue with its cut, ``blowup_factor``), and the LSTM at 10x its rate to MSE 0.0048 /
    0.010 / 0.0087 (its best rate: 0.0026 / 0.0047 / 0.143; a retry first, then the rescue). Used from the
    first step, AGC slows healthy SGD runs (+30% and +55% held-out loss in two configs of the healthy zoo), which is
    why it waits for a failure, and only for one in the first steps (``benchmarks/bad_batches.py``).

    Why a tenth on a divergence of the loss: a halving restarted such runs at a rate that still trained noisily. The
    stability suite's tanh RNN (SGD 0.1, the loss 40x up in 20 steps) restarted at 0.05 and recovered to 0.09, ending
    at MSE 0.1765 / 0.1833 / 0.1662 (seeds 0-2; its best lower rate: 0.1678 / 0.1646 / 0.1650); at a tenth, 0.1704 /
    0.1718 / 0.1646. A no-norm transformer language model at Adam 0.03 that blew up late in its warm-up ended 2.7-4.1%
    above its best lower rate after a halving, 2.0-2.2% after a tenth (user trial, seeds 0-2).

    Checkpoints keep the copies while they are held (``save_copies``), with the record of the steps since, so that a
    run resumed inside the rollback's window restarts from the same weights as the run that was not interrupted
    (the default's: the initial weights, for its first 500 steps). They add the copies' size to the checkpoint: one
    copy of the trainable parameters for the default (at most ``max_bytes``), up to two copies of them and of their
    optimizer state for :class:`Rollback` with ``every``.

    Raises:
        ValueError: for an argument outside its allowed values.

    Example:
        >>> import torch
        >>> from lightning_gradguard import GradGuard, GuardEngine, LRGuard
        >>> guard = GradGuard(rollback=Rollback(every=50))  # in a Trainer (GradGuard(rollback=True): full_rollback())
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = GuardEngine(model, lr_guard=LRGuard(), rollback=Rollback(every=10))
        >>> handle = engine.attach(opt)
        >>> start = model.weight.detach().clone()
        >>> for step in range(1, 12):  # non-finite from step 3 on: wrecked, as far as the first steps can tell
        ...     opt.zero_grad()
        ...     loss = model(torch.ones(2, 4)).sum() * (float("nan") if 3 <= step <= 10 else 1.0)
        ...     loss.backward()
        ...     _ = engine.step(optimizer=opt)  # before opt.step(): copies, or rolls back and skips the step
        ...     opt.step()
        >>> engine.summary()["rolled_back"], torch.equal(model.weight, start)
        (1, True)
    """

    def __init__(
        self,
        every: int | None = 50,
        pin_lr: bool = False,
        max_rollbacks: int | None = None,
        until: int | None = None,
        patience: int = 1,
        within: int = 2,
        max_bytes: int | None = None,
        rescue: Clipper | None = None,
        rescue_until: int = 20,
        calm_factor: float | None = 4.0,
        blowup_factor: float | None = 1e6,
        early_only: bool = False,
        retry: bool = False,
        save_copies: bool = True,
        diverged_factor: float | None = None,
    ) -> None:
        self.every = optional_int("every", every, low=1)
        self.pin_lr = check_bool("pin_lr", pin_lr)
        self.max_rollbacks = optional_int("max_rollbacks", max_rollbacks, low=0)
        self.until = optional_int("until", until, low=1)
        self.patience = check_int("patience", patience, low=1)
        self.within = check_int("within", within, low=1)
        self.max_bytes = optional_int("max_bytes", max_bytes, low=1)
        if rescue is not None and not isinstance(rescue, Clipper):
            raise ValueError(f"`rescue` must be a Clipper (e.g. AGC()) or None, got {rescue!r}.")
        self.rescue = rescue
        self.rescue_until = check_int("rescue_until", rescue_until, low=1)
        self.calm_factor = optional_number("calm_factor", calm_factor, low=1.0)
        self.blowup_factor = optional_number("blowup_factor", blowup_factor, low=1.0)
        self.early_only = check_bool("early_only", early_only)
        self.retry = check_bool("retry", retry)
        self.save_copies = check_bool("save_copies", save_copies)
        self.diverged_factor = optional_number("diverged_factor", diverged_factor, low=0.0, high=1.0)
        self.retried = False  # the plain retry (``retry``) has been used
        self._origin = 0  # the step the run last started from: 0, or that of the plain retry (windows count from it)
        self._early_norms: list[tuple[int, float]] = []  # (step, total norm) of the untroubled steps by rescue_until
        self._last_norm = math.nan  # the last positive finite total norm by rescue_until, troubled steps included
        self.growth = 0.0  # the largest growth of the total norm into a troubled step by rescue_until
        self.rescuing = False  # the rescue clipper is at work (from the rollback that put it to work on)
        # What the stretch that put the rescue clipper to work held: "loss" (a divergence of the loss alone) or
        # "gradients" (an exploding or non-finite step), for the end-of-fit line; None while it is not at work.
        self.rescue_cause: str | None = None
        self._safe = _Slot()
        self._candidate = _Slot()
        self._last_event = _NEVER  # the last engine step with an exploding or non-finite event, as the host knows
        # The current stretch of troubled steps: its length, its last step, whether one of them exploded (finite).
        self._stretch = (0, _NEVER, False)
        self.stretch_start: dict[str, Any] | None = None  # the LR guard's state when the stretch began
        self._known = 0  # the last engine step whose flags the host has seen
        self._stretch_began = _NEVER  # the first step of the current stretch of trouble
        self._stretch_diverged = False  # the current stretch holds a divergence event of the loss
        self._stretch_gradients = False  # the current stretch holds an exploding or non-finite step
        self._off = False  # past ``until``, or over ``max_bytes``: no copies, no rollback
        self.count = 0  # rollbacks so far

    def __repr__(self) -> str:
        return (
            f"Rollback(every={self.every}, pin_lr={self.pin_lr}, max_rollbacks={self.max_rollbacks}, "
            f"until={self.until}, patience={self.patience}, within={self.within}, max_bytes={self.max_bytes}"
            + (", early_only=True" if self.early_only else "")
            + (", retry=True" if self.retry else "")
            + ("" if self.save_copies else ", save_copies=False")
            + (f", diverged_factor={self.diverged_factor}" if self.diverged_factor is not None else "")
            + (f", rescue={self.rescue!r}" if self.rescue is not None else "")
            # Read by early_only and retry as well as by the rescue: shown whenever one of them is on.
            + (
                f", rescue_until={self.rescue_until}, calm_factor={self.calm_factor},"
                f" blowup_factor={self.blowup_factor}"
                if self.rescue is not None or self.early_only or self.retry
                else ""
            )
            + ")"
        )

    def observe(
        self,
        step: int,
        exploding: bool,
        nonfinite: bool = False,
        before: Callable[[], dict[str, Any]] | None = None,
        diverging: bool = False,
        norm: float = math.nan,
    ) -> None:
        """Record the flags of engine step ``step`` (1-based) once they have reached the host.

        ``before`` returns the LR guard's state (:meth:`LRGuard.snapshot`) before it acts on this step; it is called
        only when the step begins a stretch of trouble, and kept as :attr:`stretch_start`. ``diverging`` (the loss
        has stayed blown up for the divergence detector's patience) is a full stretch by itself. ``norm``: the step's
        total gradient norm, when :meth:`wants_norm` asked for it (NaN: not known), for ``calm_factor``'s and
        ``blowup_factor``'s tests.
        """
        self._known = max(self._known, step)
        troubled = exploding or nonfinite or diverging
        if step - self._origin <= self.rescue_until and math.isfinite(norm) and norm > 0:
            if not troubled:
                self._early_norms.append((step, norm))
            elif self._last_norm > 0:  # a jump into trouble, not the growth of a calm start
                self.growth = max(self.growth, norm / self._last_norm)
            self._last_norm = norm
        if troubled:
            self._last_event = max(self._last_event, step)
            length, last, exploded = self._stretch
            if step - last >= self.within:
                length, exploded = 0, False  # too far from the last one: a new stretch
                self.stretch_start = before() if before is not None else None
                self._stretch_began = step
                self._stretch_diverged = self._stretch_gradients = False
            self._stretch_gradients = self._stretch_gradients or exploding or nonfinite
            length += 1
            if diverging:
                length = max(length, self.patience)
                self._stretch_diverged = True
            self._stretch = (length, step, exploded or diverging or (exploding and not nonfinite))

    def not_started(self, step: int) -> None:
        """Engine step ``step`` (1-based) was skipped on weights that no step had changed (non-finite gradients
        from the initial weights): the run has not started yet, so its early windows (``rescue_until``, the plain
        retry's) count from after it. Counted from the first step, 25 such steps at the start of a run whose rate was
        then too high used up the window: no retry and no rescue, three cuts instead (held-out 0.27-0.54 against
        0.23-0.27)."""
        self._known = max(self._known, step)
        self._origin = max(self._origin, step)

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
        if self._off:
            return
        if self.until is not None and step > self.until:
            self._release()
            return
        candidate = self._candidate
        if candidate.valid and self._last_event >= candidate.step:
            # Trouble since the copy: never to be trusted. Dropped, so that a later calm stretch can take a new one
            # (kept, it would block every later copy until a rollback).
            candidate.valid = False
        elif self.every is not None and candidate.valid and self._known >= candidate.step + self.every:
            self._safe, self._candidate = candidate, self._safe  # calm since the copy: trusted from now on
            self._candidate.valid = False
        if not self._safe.valid:
            slot = self._safe
        elif (
            self.every is not None
            and step % self.every == 0
            and not self._candidate.valid
            and self._last_event <= self._known - self.every
        ):
            slot = self._candidate
        else:
            return  # the usual step: a few integer comparisons, nothing per parameter
        positions = [i for i, p in enumerate(params) if p.requires_grad]
        trainable = [params[i] for i in positions]
        if self.max_bytes is not None:
            # Checked at every copy: the optimizer's state (Adam's moments) only exists after its first step.
            needed = _nbytes(trainable, optimizer) * (1 if self.every is None else 2)
            if needed > self.max_bytes:
                self._refuse(needed)
                return
        slot.take(trainable, optimizer, step, capture() if capture is not None else None, positions, len(params))

    def join(self, params: Sequence[Tensor], present: Sequence[int], optimizer: torch.optim.Optimizer | None) -> None:
        """Add to the copies the parameters among ``present`` (positions among ``params``, the engine's: those with a
        gradient this step) that were frozen when they were taken (an unfrozen backbone, a param group added), before
        their first update: they still hold their values at the copy. Frozen parameters are not copied; left out,
        a rollback after the unfreeze restored the rest and left them wrecked, and repeated to no effect down to the
        LR guard's floor. The engine calls it when the set of parameters with a gradient changes."""
        held = [slot for slot in (self._safe, self._candidate) if slot.valid and slot.frozen]
        if self._off or not held:
            return
        grew = False
        for slot in held:
            frozen = set(slot.frozen)
            grew |= slot.join(params, [i for i in present if i in frozen], optimizer)
        if grew and self.max_bytes is not None:
            needed = _slot_nbytes(self._safe) + (_slot_nbytes(self._candidate) if self._candidate.valid else 0)
            if needed > self.max_bytes:
                self._refuse(needed)

    def rebind(self, params: Sequence[Tensor], statistics: Callable[[Any], Any] | None = None) -> None:
        """Go on for an engine rebuilt on ``params`` (its optimizer got a param group): each copy restores the
        parameters it was taken of, now found at their positions among ``params`` (a copy holding one that is gone
        is dropped: the next step takes a new one); parameters new since join a copy at their first gradient
        (:meth:`join`). ``statistics`` maps the caller's state kept with a copy to the rebuilt engine's (its
        layers); without it that state is dropped, and a rollback leaves the new engine's statistics as they are."""
        where = {id(p): i for i, p in enumerate(params)}
        for slot in (self._safe, self._candidate):
            if not slot.valid:
                continue
            if any(id(p) not in where for p in slot.params):
                slot.clear()
                continue
            slot.positions = [where[id(p)] for p in slot.params]
            copied = set(slot.positions)
            slot.frozen = [i for i in range(len(params)) if i not in copied]
            slot.extra = statistics(slot.extra) if statistics is not None and slot.extra is not None else None

    def _refuse(self, needed: int) -> None:
        """No rollback for this run: its copies would take ``needed`` bytes, more than ``max_bytes``."""
        warnings.warn(
            f"GradGuard: no rollback in this run: its copies would take {needed / 2**20:.0f} MiB, more than "
            f"`max_bytes={self.max_bytes}` allows. Raise it (or pass `None`) to keep it: for the default,"
            " `GradGuard(rollback=default_rollback(max_bytes=...))` (a bare `Rollback(max_bytes=...)` lacks the"
            " default's retry and rescue); or pass `rollback=None` to silence this.",
            stacklevel=user_stacklevel(),
        )
        self._release()

    def _release(self) -> None:
        self._off = True
        self._safe.clear()
        self._candidate.clear()

    def can_restore(self, step: int | None = None) -> bool:
        """Whether a rollback is possible now (at engine step ``step``, when given)."""
        if self._off or not self._safe.valid:
            return False
        if step is not None and self.until is not None and step > self.until:
            return False
        if self.max_rollbacks is not None and self.count >= self.max_rollbacks:
            return False
        if self.early_only and not self._stretch_diverged and not self.early_trouble():
            return False
        # Without a finite explosion in it, a stretch needs twice the length: two non-finite batches in a row are
        # bad data far more often than a wrecked model; a model wrecked straight into NaN stays there.
        length, _, exploded = self._stretch
        return length >= (self.patience if exploded or self.patience == 1 else 2 * self.patience)

    def wants_norm(self, step: int) -> bool:
        """Whether engine step ``step`` should send its total gradient norm to :meth:`observe` (``calm_factor``'s
        and ``blowup_factor``'s tests: only in the first ``rescue_until`` steps, and for the rescue's tests only
        before the rescue clipper is at work; the calm-start test of :meth:`early_trouble`, which ``early_only`` and
        a run of non-finite steps ask, needs them after it too)."""
        rescue_tests = self.rescue is not None and self.blowup_factor is not None and not self.rescuing
        early = step - self._origin <= self.rescue_until
        return (rescue_tests or self.calm_factor is not None) and not self._off and early

    def early_trouble(self) -> bool:
        """Whether the current stretch of trouble began by ``rescue_until`` without a calm start: a rate too high from
        the start (``early_only``), or bad batches, which look the same there, and where a restart costs little."""
        return 0 < self._stretch_began - self._origin <= self.rescue_until and not self.calm_start()

    def answers(self, step: int, diverging: bool = False) -> bool:
        """Whether trouble now, at engine step ``step``, could still make this rollback restart: it holds a copy,
        and the trouble is a diverging loss, or any trouble without ``early_only``, or trouble by ``rescue_until``
        (for the warnings, which say what answers an event)."""
        return self.holds_copy and (diverging or not self.early_only or step - self._origin <= self.rescue_until)

    def calm_start(self) -> bool:
        """Whether the steps before the current stretch of trouble were calm (see ``calm_factor``)."""
        if self.calm_factor is None:
            return False
        norms = [norm for step, norm in self._early_norms if step < self._stretch_began]
        return len(norms) >= CALM_STEPS and max(norms) <= self.calm_factor * min(norms)

    def blew_up(self) -> bool:
        """Whether a troubled step by ``rescue_until`` had a total gradient norm more than ``blowup_factor`` times the
        step's before it: the rescue then also cuts the rate."""
        return self.blowup_factor is not None and self.growth > self.blowup_factor

    @property
    def stretch_began(self) -> int | None:
        """The engine step at which the current stretch of trouble began (``None``: no trouble since the last
        restart)."""
        return None if self._stretch_began == _NEVER else self._stretch_began

    def may_retry(self, step: int) -> bool:
        """Whether trouble that began at engine step ``step`` could still get the plain retry (see ``retry``). The
        engine then keeps its statistics from before that step: the retry starts from them."""
        return self.retry and not self.retried and not self._off and 0 < step - self._origin <= self.rescue_until

    def retries(self) -> bool:
        """Whether a rollback now is the plain retry (see ``retry``): not used yet, for trouble that began by
        ``rescue_until`` without a calm start, with no divergence event and no blow-up in it."""
        return (
            self.retry
            and not self.retried
            and not self._stretch_diverged
            and self.early_trouble()
            and not self.blew_up()
        )

    def cut_factor(self) -> float | None:
        """The LR guard's reduction for a rollback now: ``diverged_factor`` when the current stretch of trouble holds
        a divergence event of the loss, else ``None`` (the guard's own ``factor``)."""
        return self.diverged_factor if self._stretch_diverged else None

    def rescues(self, optimizer: torch.optim.Optimizer | None, scaled: bool = False) -> bool:
        """Whether a rollback now would put the :attr:`rescue` clipper to work (and keep the rate, unless
        :meth:`blew_up`): there is one, it is not at work yet, the trouble began by step ``rescue_until`` and did not
        follow a calm start (``calm_factor``), ``optimizer``'s step grows with the gradient (``torch.optim.SGD``,
        ``ASGD``) and the gradients do not carry a GradScaler's scale (``scaled``: a fused optimizer under 16-bit AMP
        unscales inside its step, and AGC would compare them with the weights off by that factor)."""
        # The optimizer that steps the weights: a ZeroRedundancyOptimizer's local one, a SAM's base optimizer.
        holders = state_holders(optimizer)
        optimizer = holders[-1][1] if holders else None
        return (
            self.rescue is not None
            and not self.rescuing
            and self.early_trouble()
            and isinstance(optimizer, _PROPORTIONAL)
            and not scaled
        )

    def restore(self, optimizer: torch.optim.Optimizer | None, rescue: bool = False, retry: bool = False) -> Any:
        """Write the safe copy back into the parameters and ``optimizer``'s state; returns what ``capture`` returned
        when the copy was taken. ``rescue``: put the rescue clipper to work from now on (see :meth:`rescues`).
        ``retry``: this is the plain retry (see :meth:`retries`)."""
        if rescue and self.rescue is not None and not self.rescuing:
            self.rescue_cause = "loss" if self._stretch_diverged and not self._stretch_gradients else "gradients"
        self.rescuing = self.rescuing or (rescue and self.rescue is not None)
        if retry:
            # The run starts again: its first steps are first steps again, for the rescue's window and calm start.
            self.retried, self._origin = True, self._known
        self._safe.restore(optimizer)
        self._candidate.valid = False
        self._forget_stretch()  # the abandoned trajectory's events: the next rollback needs fresh evidence
        self._forget_norms()
        self.count += 1
        return self._safe.extra

    def stop_rescue(self) -> None:
        """Take the rescue clipper off (and its cause): the rate it answered is gone (a refit at another rate)."""
        self.rescuing, self.rescue_cause = False, None

    def _forget_stretch(self) -> None:
        self._stretch = (0, _NEVER, False)
        self._stretch_began = _NEVER
        self._stretch_diverged = self._stretch_gradients = False
        self.stretch_start = None

    def _forget_norms(self) -> None:
        # The norms of a trajectory that a restart or a resume leaves behind say nothing about the next one.
        self._early_norms.clear()
        self._last_norm, self.growth = math.nan, 0.0

    def reset(self) -> None:
        """Forget the copies (the next step takes a new safe copy)."""
        self._safe.valid = self._candidate.valid = False

    def state_dict(self) -> dict[str, Any]:
        """The rollback count, the rescue clipper's state and, while a copy is held (``save_copies``), the copies
        and the record of the steps since (under ``"copies"``; see the class docstring)."""
        state: dict[str, Any] = {"count": self.count, "retried": self.retried, "origin": self._origin}
        if self.rescue is not None:
            state.update(rescuing=self.rescuing, rescue=self.rescue.state_dict(), rescue_cause=self.rescue_cause)
        if self.saves_copies():
            state["copies"] = {
                "safe": self._safe.saved(),
                "candidate": self._candidate.saved() if self._candidate.valid else None,
                "last_event": self._last_event,
                "known": self._known,
                "stretch": list(self._stretch),
                "stretch_began": self._stretch_began,
                "stretch_diverged": self._stretch_diverged,
                "stretch_gradients": self._stretch_gradients,
                "stretch_start": self.stretch_start,
                "early_norms": [list(pair) for pair in self._early_norms],
                "last_norm": self._last_norm,
                "growth": self.growth,
            }
        return state

    @property
    def copy_step(self) -> int:
        """The engine step whose gradients were computed on the safe copy's weights (1: the initial weights; -1:
        no copy). After a rollback, the step the run went back to."""
        return self._safe.step if self._safe.valid else -1

    @property
    def holds_copy(self) -> bool:
        """Whether a safe copy is held: one taken at a first step, or loaded with a checkpoint."""
        return not self._off and self._safe.valid

    def saves_copies(self) -> bool:
        """Whether :meth:`state_dict` holds the copies: ``save_copies``, a copy held, and plain tensors (not the
        shards of sharded parameters)."""
        return (
            self.save_copies
            and self.holds_copy
            and self._safe.portable()
            and (not self._candidate.valid or self._candidate.portable())
        )

    def load_state_dict(self, state: dict[str, Any], params: Sequence[Tensor] | None = None) -> None:
        """Restore a :meth:`state_dict`.

        The copies it holds are written back into their places among ``params`` (all the parameters the rollback
        was given, in that order: the engine's), and the run goes on exactly as it would have. Without copies (or
        without ``params``, for parameters that no longer match them or are sharded, or for copies larger than
        ``max_bytes``) the copies are forgotten, and the next step's weights become the safe copy (unless the run is
        past ``until``).
        """
        check_state("Rollback", state, ("count",))
        cause = rescue_cause_of(state)
        self.count = int(state["count"])
        self.retried = bool(state.get("retried", False))
        self._origin = int(state.get("origin", 0))
        self.rescuing = bool(state.get("rescuing", False)) and self.rescue is not None
        self.rescue_cause = cause if self.rescuing else None
        if self.rescue is not None and state.get("rescue") is not None:
            self.rescue.load_state_dict(state["rescue"])
        self._last_event, self._known = _NEVER, 0
        self._forget_stretch()
        self._forget_norms()
        self._off = False
        self.reset()
        copies = state.get("copies")
        if copies is None or params is None or not self._safe.load_(copies["safe"], params):
            return
        # A candidate only under `every` (one loaded into a rollback without would never be trusted).
        if self.every is not None and copies.get("candidate") is not None:
            self._candidate.load_(copies["candidate"], params)
        held = _slot_nbytes(self._safe) + (_slot_nbytes(self._candidate) if self._candidate.valid else 0)
        if self.max_bytes is not None and held > self.max_bytes:
            self._safe.clear()  # saved under a larger `max_bytes`: the next step takes a copy, or warns
            self._candidate.clear()
            return
        self._last_event, self._known = int(copies["last_event"]), int(copies["known"])
        length, last, exploded = copies["stretch"]
        self._stretch = (int(length), int(last), bool(exploded))
        self._stretch_began = int(copies["stretch_began"])
        self._stretch_diverged = bool(copies["stretch_diverged"])
        # Saved before it was kept: count the stretch as the gradients' (the line's wording before).
        self._stretch_gradients = bool(copies.get("stretch_gradients", True))
        self.stretch_start = copies["stretch_start"]
        self._early_norms = [(int(step), float(norm)) for step, norm in copies["early_norms"]]
        self._last_norm, self.growth = float(copies["last_norm"]), float(copies["growth"])


def rescue_cause_of(state: dict[str, Any]) -> str | None:
    """``state['rescue_cause']`` of a :meth:`Rollback.state_dict`, checked (a ``ValueError`` for another value), so
    that a caller can refuse a state before it loads any of it. Saved before the cause was kept: ``"gradients"``,
    what the end-of-fit line said then."""
    cause = state.get("rescue_cause", "gradients")
    if cause not in (None, "loss", "gradients"):
        raise ValueError(f"`state['rescue_cause']` must be 'loss', 'gradients' or None, got {cause!r}.")
    return cause


def default_rollback(
    rescue: Clipper | bool = True,
    rescue_until: int = 20,
    calm_factor: float | None = 4.0,
    blowup_factor: float | None = 1e6,
    early_only: bool = True,
    retry: bool = True,
    save_copies: bool = True,
    diverged_factor: float | None = 0.1,
    max_bytes: int | None = 1 << 30,
) -> Rollback:
    """The rollback of ``GradGuard(rollback="default")``, the default: an early restart.

    ``Rollback(every=None, until=500, patience=2, within=2, max_bytes=1 GiB, rescue=AGC(), calm_factor=4.0,
    blowup_factor=1e6, early_only=True, retry=True, save_copies=True, diverged_factor=0.1)``: one copy of the initial
    trainable parameters (no optimizer state exists yet), kept for the first 500 optimizer steps (and in the checkpoints
    taken then) and then freed. When the rate is lowered after two exploding steps in a row, or for a run of non-finite
    steps in a row (the LR guard's run rule: four) that an explosion or a divergence follows or that goes on to eight,
    that began in the first 20 steps (``rescue_until``) without a calm start before them (``calm_factor``), the run
    restarts from the initial weights at the same rate: a plain retry (``retry``), since bad batches among the first
    steps look just like a rate too high, and do not come back. When such trouble comes back, or on a divergence event
    of the loss (itself several high steps in a row), or a blow-up (``blowup_factor``), the run restarts from the
    initial weights at the lowered rate (the LR guard's ``factor``; after a divergence of the loss, a tenth of the rate:
    ``diverged_factor``), or, the first time, for early trouble in an SGD run, at its rate with unit-wise clipping
    (``AGC()``, clip factor 0.01) from then on (one cut below it when the norm blew up by more than ``blowup_factor`` in
    one step). Trouble after a calm start, or later, is left to the LR guard's cut (``early_only``): the run had weights
    worth keeping, and the flagged steps were clipped to the average norm. A diverging run explodes on every step once
    its weights are wrecked; bad batches (a corrupted label, a NaN) explode alone, between calm steps, and at most lower
    the rate. A too-high learning rate wrecks the weights in its first updates, before any statistic has a calm history,
    and lowering the rate then leaves the run where it landed; a restart at the lower rate is what a person would do,
    and early on it loses little. A model whose trainable parameters take more than 1 GiB gets no rollback (one
    warning), so the default never makes a large run run out of memory.

    Args:
        rescue: the rescue clipper (see :class:`Rollback`): ``True``, the default, for a fresh ``AGC()``; ``False``
            for none, so that every restart lowers the rate; or a :class:`~lightning_gradguard.Clipper`.
        rescue_until: the last optimizer step at which trouble may begin and still get the rescue, ``>= 1``.
        calm_factor: trouble after a calm start gets the cut, not the rescue (see :class:`Rollback`); ``None``: any
            trouble by ``rescue_until`` gets the rescue.
        blowup_factor: a rescue whose trouble grew the total gradient norm by more than this in one step also cuts
            the rate (see :class:`Rollback`); ``None``: the rescue keeps the rate.
        early_only: restart only for trouble that began by ``rescue_until`` without a calm start, or on a divergence
            event of the loss (see :class:`Rollback`); ``False``: on every cut of the first 500 steps (the previous
            default, which restarted healthy runs from scratch for two bad batches in a row).
        retry: the first restart for early trouble is a plain retry, at the same rate and without the rescue (see
            :class:`Rollback`); ``False``: the remedy at the first restart (the previous default).
        save_copies: checkpoints keep the copy of the initial weights while it is held (see :class:`Rollback`).
        diverged_factor: the reduction of a restart for a divergence event of the loss (see :class:`Rollback`);
            ``None``: the LR guard's ``factor`` (the previous default, a halving).
        max_bytes: the most memory the copy may take (see :class:`Rollback`), 1 GiB by default: a larger model gets
            no rollback (one warning); ``None``: no limit.

    Raises:
        ValueError: for a ``rescue`` that is neither a bool nor a clipper, ``rescue_until < 1``, a ``calm_factor``
            or ``blowup_factor`` that is neither ``None`` nor a finite number above 1, or a ``diverged_factor`` that
            is neither ``None`` nor in ``(0, 1)``.

    Example:
        >>> rollback = default_rollback()
        >>> rollback.every, rollback.until, rollback.patience, rollback.within, rollback.max_bytes
        (None, 500, 2, 2, 1073741824)
        >>> rollback.rescue
        AGC(clip_factor=0.01, eps=0.001, exclude=None, exclude_types=())
        >>> default_rollback(rescue=False).rescue is None
        True
    """
    return Rollback(
        every=None,
        until=500,
        patience=2,
        within=2,
        max_bytes=max_bytes,
        rescue=_rescue_clipper(rescue),
        rescue_until=rescue_until,
        calm_factor=calm_factor,
        blowup_factor=blowup_factor,
        early_only=early_only,
        retry=retry,
        save_copies=save_copies,
        diverged_factor=diverged_factor,
    )


def full_rollback(
    every: int = 50,
    rescue: Clipper | bool = True,
    retry: bool = True,
    diverged_factor: float | None = 0.1,
    save_copies: bool = True,
) -> Rollback:
    """The rollback of ``GradGuard(rollback=True)``: copies for the whole run, with the early restart's remedies.

    ``Rollback(every=50, rescue=AGC(), retry=True, diverged_factor=0.1)``: a copy of the trainable parameters and their
    optimizer state every ``every`` steps, trusted once ``every`` calm steps followed it, restored whenever the LR guard
    cuts (see :class:`Rollback`); for trouble among the first steps it answers as :func:`default_rollback` does (a
    plain retry first, then, in an SGD run, ``AGC()`` at the rate), and after a divergence of the loss it restarts at a
    tenth of the rate. A bare ``Rollback()`` has none of those remedies: in a user trial (an MLP regression, SGD at
    40x and 100x its rate, and its rate raised 30x at step 150) it ended at held-out 0.574, 0.978 and 0.703 where this
    one ended at 0.029, 0.336 and 0.594 (the default early restart: 0.017, 0.336, 0.605).

    Args:
        every: optimizer steps between copies, ``>= 1`` (see :class:`Rollback`).
        rescue: the rescue clipper: ``True``, the default, for a fresh ``AGC()``; ``False`` for none; or a
            :class:`~lightning_gradguard.Clipper`.
        retry: the first restart for early trouble is a plain retry (see :class:`Rollback`).
        diverged_factor: the reduction of a restart for a divergence event of the loss; ``None``: the LR guard's
            ``factor``.
        save_copies: checkpoints keep the copies (see :class:`Rollback`).

    Raises:
        ValueError: for a ``rescue`` that is neither a bool nor a clipper, and as :class:`Rollback` for the others.

    Example:
        >>> rollback = full_rollback()
        >>> rollback.every, rollback.until, rollback.patience, rollback.retry, rollback.diverged_factor
        (50, None, 1, True, 0.1)
        >>> rollback.rescue
        AGC(clip_factor=0.01, eps=0.001, exclude=None, exclude_types=())
    """
    return Rollback(
        every=every,
        rescue=_rescue_clipper(rescue),
        retry=retry,
        save_copies=save_copies,
        diverged_factor=diverged_factor,
    )


def _rescue_clipper(rescue: Clipper | bool) -> Clipper | None:
    """The ``rescue`` argument of :func:`default_rollback` and :func:`full_rollback` as a clipper."""
    if isinstance(rescue, bool):
        return AGC() if rescue else None
    if isinstance(rescue, Clipper):
        return rescue
    raise ValueError(f"`rescue` must be True (AGC()), False (no rescue) or a Clipper, got {rescue!r}.")


def rollback_from(value: Rollback | bool | str | None) -> Rollback | None:
    """The ``rollback=`` argument of ``GradGuard`` and ``GuardEngine``: a :class:`Rollback`, ``True``
    (:func:`full_rollback`), ``"default"`` (:func:`default_rollback`), ``False`` or ``None`` (no rollback).

    Raises:
        ValueError: for anything else.

    Example:
        >>> rollback_from(True).every, rollback_from(None)
        (50, None)
    """
    if value is None or value is False:
        return None
    if value is True:
        return full_rollback()
    if isinstance(value, str) and value == "default":
        return default_rollback()
    if isinstance(value, Rollback):
        return value
    raise ValueError(f"`rollback` must be a Rollback, True (full_rollback()), 'default', False or None, got {value!r}")
