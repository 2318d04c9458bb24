"""The default early restart: a run whose rate explodes twice in a row early starts again from its initial weights,
first as a plain retry at the same rate; when the trouble comes back, one LR cut below the rate in force when it began,
or (trouble in the first 20 steps of an SGD run) at that rate with AGC clipping unit-wise from then on; one isolated
spike, bad batches, a late explosion or a model too large for the copy never restarts anything."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import lightning.pytorch.callbacks
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_gradguard
from lightning_gradguard import AGC, GradGuard, GuardEngine, LRGuard, NormClip, Rollback
from lightning_gradguard._lightning import restart_weight_averages
from lightning_gradguard.engine import STALL_STEPS
from lightning_gradguard.rollback import default_rollback
from tests.helpers import AddGroup, RestartWatch
from tests.models import Regressor, regression_data, trainer


class SpikyRegressor(Regressor):
    """Multiplies the loss by ``factor`` on the given optimizer steps (counted from 1): one bad batch each; a dict
    gives each step its own factor."""

    def __init__(self, spikes: set[int] | dict[int, float], factor: float = 1e4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factors = spikes if isinstance(spikes, dict) else dict.fromkeys(spikes, factor)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factors.get(self.global_step + 1, 1.0)


# Two troubled steps in a row after the exploding detector's warm-up: the second 100x the first, a blow-up. Two of
# one size would be one jump that holds, one event (tests/test_level_shifts.py).
_CLIMB = {40: 1e2, 41: 1e4}

# Early trouble (10^4x batches at steps 2-3, retried at step 4) that comes back climbing, as a rate too high does. The
# retry restarts from the statistics of before the trouble, against which two spikes of one size would be a burst of
# bad batches: one event, clipped, no cut.
_BACK = {2: 1e4, 3: 1e4, 7: 1e4, 8: 1e6}
# Trouble at steps 5-6 that climbs: two events after the calm start too (a stretch there holds steps within 4x).
_CLIMB_AT_5 = {5: 1e4, 6: 1e6}


class UnitRatios(L.Callback):
    """Listed after a ``GradGuard``: the largest ``||G_i|| / max(||W_i||, 1e-3)`` over the output units of every
    weight matrix, per optimizer step, as the optimizer gets the gradients (AGC's quantity)."""

    def __init__(self) -> None:
        self.ratios: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        ratios = [
            (p.grad.flatten(1).norm(dim=1) / p.detach().flatten(1).norm(dim=1).clamp_min(1e-3)).max()
            for p in pl_module.parameters()
            if p.grad is not None and p.dim() >= 2
        ]
        if ratios:
            self.ratios[trainer.global_step + 1] = float(torch.stack(ratios).max())


def _fit(
    spikes: set[int] | dict[int, float],
    rollback: Any = "default",
    steps: int = 80,
    extra: list[L.Callback] | None = None,
    factor: float = 1e4,
) -> tuple[GradGuard, Regressor, list[int]]:
    L.seed_everything(0, verbose=False)
    model = SpikyRegressor(spikes, factor=factor, lr=0.02)
    guard = GradGuard(rollback=rollback)
    watch = RestartWatch(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callbacks = [guard, watch, *(extra or [])]
        trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks).fit(model, regression_data(n=1024))
    assert all(clean for _, clean in watch.restarts)  # back at the initial weights, the step skipped
    return guard, model, [step for step, _ in watch.restarts]


def _engine_run(
    rollback: Rollback,
    spikes: set[int] | dict[int, float],
    steps: int = 60,
    nans: frozenset[int] = frozenset(),
    adam: bool = False,
    ratios: dict[int, float] | None = None,
    scales: dict[int, float] | None = None,
) -> tuple[GuardEngine, nn.Module, list[torch.Tensor], list[int]]:
    """A plain loop (SGD with momentum, or Adam); returns the engine, the model, its initial weights and the steps
    that rolled back. ``ratios`` collects each step's largest unit ratio ``||G_i|| / max(||W_i||, 1e-3)`` as the
    optimizer gets the gradients; ``scales`` multiplies the loss of the steps it names. ``spikes``: steps whose loss is
    multiplied by 1e4, or by the factor given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    initial = [p.detach().clone() for p in model.parameters()]
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=0.01) if adam else torch.optim.SGD(params, lr=0.05, momentum=0.9)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=rollback)
    engine.attach(opt)
    g = torch.Generator().manual_seed(0)
    restarts = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        spike = spikes.get(step) if isinstance(spikes, dict) else 1e4 if step in spikes else None
        scale = spike if spike is not None else math.nan if step in nans else (scales or {}).get(step, 1.0)
        loss = model(torch.randn(8, 4, generator=g)).square().mean() * scale
        loss.backward()
        before = engine.summary()["rolled_back"]
        engine.step(optimizer=opt)
        assert engine.rolled_back is (engine.summary()["rolled_back"] > before)
        if engine.rolled_back:
            restarts.append(step)
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), initial))
            assert not opt.state or all(not s for s in opt.state.values())  # no optimizer state at the start
        if ratios is not None and model[0].weight.grad is not None:
            ratios[step] = max(_unit_ratio(layer) for layer in (model[0], model[2]))
        opt.step()
    return engine, model, initial, restarts


def _unit_ratio(layer: nn.Linear) -> float:
    grad, weight = layer.weight.grad, layer.weight.detach()
    assert grad is not None
    return float((grad.norm(dim=1) / weight.norm(dim=1).clamp_min(1e-3)).max())


def test_the_default_guard_restarts_early_and_cheaply() -> None:
    guard = GradGuard()
    assert repr(guard.rollback) == repr(default_rollback())
    rollback = guard.rollback
    assert rollback is not None
    assert (rollback.every, rollback.until, rollback.patience, rollback.within) == (None, 500, 2, 2)
    assert rollback.early_only and not Rollback().early_only and "early_only=True" in repr(rollback)
    assert rollback.max_bytes == 1 << 30 and not rollback.pin_lr
    assert GradGuard(rollback="default").rollback is not None
    assert GradGuard(lr_guard=None).rollback is None  # nothing to act on: off, not an error
    # The engine takes no copy unless asked; it can be asked for the same early restart.
    assert GuardEngine(nn.Linear(2, 1), lr_guard=LRGuard()).rollback is None
    engine_rollback = GuardEngine(nn.Linear(2, 1), lr_guard=LRGuard(), rollback="default").rollback
    assert repr(engine_rollback) == repr(default_rollback())
    with pytest.raises(ValueError, match="needs an `lr_guard`"):
        GradGuard(lr_guard=None, rollback=default_rollback())
    bad_args = ({"until": 0}, {"patience": 0}, {"within": 0}, {"max_bytes": 0}, {"every": 0}, {"until": 2.5})
    for bad in (*bad_args, {"early_only": 1}, {"early_only": "yes"}, {"retry": 1}, {"retry": None}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Rollback(**bad)
    assert rollback.retry and not Rollback().retry


def test_two_spikes_after_a_calm_start_cut_the_rate_and_keep_the_weights() -> None:
    # Bad batches at step 30 of a calm run: the LR guard cuts on the second, the run goes on from where it is (the
    # spikes were clipped to twice the average norm). A restart would throw 30 steps away.
    engine, model, initial, restarts = _engine_run(default_rollback(), spikes={30, 31})
    assert restarts == [] and engine.summary()["lr_reduced"] == 1 and engine.summary()["rolled_back"] == 0
    assert engine.lr_guard is not None and engine.lr_guard.scale() < 1.0
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), initial))


def test_with_early_only_off_two_spikes_in_a_row_restart_from_the_initial_weights() -> None:
    engine, _, _, restarts = _engine_run(default_rollback(early_only=False), spikes={30, 31})
    # The flags of step 31 land before step 32: the cut (the LR guard's second event) is taken there, and with it
    # the restart.
    assert restarts == [32]
    summary = engine.summary()
    assert summary["lr_reduced"] == 1 and summary["rolled_back"] == 1
    # The restart takes one cut from the rate in force when the trouble began (1 -> 0.5), recovering towards just
    # below the rate that exploded. Trouble after 30 calm steps (past `rescue_until`): no rescue clipper.
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    assert 0.5 <= engine.lr_guard.scale() < 0.6
    assert engine.rollback is not None and not engine.rollback.rescuing


def test_early_trouble_is_first_retried_at_the_rate_and_the_run_goes_on_when_it_does_not_come_back() -> None:
    # Trouble from the second step: no calm start to call it bad batches (see the calm-start tests below). The LR
    # guard cuts on the second troubled step; the restart is a plain retry: the initial weights, the rate in force
    # when the trouble began, no rescue clipper. These spikes were bad batches: nothing else happens.
    ratios: dict[int, float] = {}
    rollback = default_rollback()
    engine, _, _, restarts = _engine_run(rollback, spikes={2, 3}, ratios=ratios)
    assert restarts == [4] and engine.summary()["lr_reduced"] == 1 and rollback.count == 1
    assert rollback.retried and not rollback.rescuing and "retry=True" in repr(rollback)
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0 and engine.lr_guard.ceiling() == 1.0
    assert max(ratios[s] for s in range(5, 61)) > 0.02  # nothing clips unit-wise
    # Without the retry (the previous default) the first restart brings the rescue clipper for the rest of the run.
    rollback = default_rollback(retry=False)
    _, _, _, restarts = _engine_run(rollback, spikes={2, 3})
    assert restarts == [4] and rollback.rescuing and not rollback.retried and "retry" not in repr(rollback)


def test_early_trouble_that_comes_back_after_the_retry_restarts_at_the_rate_with_the_rescue_clipper_at_work() -> None:
    ratios: dict[int, float] = {}
    rollback = default_rollback()
    engine, _, _, restarts = _engine_run(rollback, spikes=set(), scales=_BACK, ratios=ratios)
    # The retry at 4; three steps after it (no calm start yet) the trouble is back: a rate too high from the start.
    assert restarts == [4, 9] and engine.summary()["lr_reduced"] == 2 and rollback.retried
    # The second restart goes back to the rate in force when the trouble began and puts AGC to work instead of
    # cutting: from then on no unit's gradient exceeds 0.01 x its weights' norm.
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0
    assert rollback.rescuing
    assert max(ratios[s] for s in (1, 2, 3, 5, 6, 7, 8)) > 0.02  # before: unbounded
    after = [ratios[s] for s in range(10, 61)]
    assert max(after) <= 0.01 * (1 + 1e-4) and sum(r > 0.0099 for r in after) >= 10  # it binds


def test_after_the_retry_the_window_counts_from_it() -> None:
    # Trouble at steps 15-16: the retry at 17. Back at 25-26, past step 20 but within 20 steps of the retry: the run's
    # first steps again, so the rescue (and without the retry's window it would get only the LR guard's cut). Every
    # other loss 10x: no calm start, before the trouble or after the retry. The retry restarts from the detector's
    # statistics of before the trouble, whose band that noise makes about 1000x wide, and against them two spikes of
    # one size in a row are one event: the trouble comes back climbing (10^5x, then 10^7x), as a rate too high does.
    rollback = default_rollback()
    noisy = {s: 10.0 for s in range(1, 25, 2)}
    engine, _, _, restarts = _engine_run(rollback, spikes={15, 16}, scales={**noisy, 25: 1e5, 26: 1e7})
    assert restarts == [17, 27] and rollback.retried and rollback.rescuing
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0
    # Trouble that comes back more than `rescue_until` steps after the retry is a later trouble: the cut alone.
    rollback = default_rollback(rescue_until=5)
    _, _, _, restarts = _engine_run(rollback, spikes={2, 3, 12, 13})
    assert restarts == [4] and rollback.retried and not rollback.rescuing


def test_the_trouble_must_begin_by_rescue_until() -> None:
    for until, rescued in ((4, False), (5, True)):
        rollback = Rollback(
            every=None, until=500, patience=2, within=2, rescue=AGC(), rescue_until=until, calm_factor=None
        )
        engine, _, _, restarts = _engine_run(rollback, spikes=_CLIMB_AT_5)
        assert restarts == [7] and rollback.rescuing is rescued
        assert engine.lr_guard is not None and (engine.lr_guard.scale() == 1.0) is rescued


def test_trouble_after_a_calm_start_is_bad_batches_and_gets_the_cut() -> None:
    # Four calm steps, then two bad batches of one size: one event (within 4x of each other), clipped, no cut.
    engine, _, _, restarts = _engine_run(default_rollback(), spikes={5, 6})
    assert restarts == [] and engine.summary()["exploding"] == 1 and engine.summary()["lr_reduced"] == 0
    # Trouble that climbs after a calm start (two events): bad batches, not a rate too high. The LR guard's cut, no
    # restart.
    rollback = default_rollback()
    engine, _, _, restarts = _engine_run(rollback, spikes=_CLIMB_AT_5)
    assert restarts == [] and not rollback.rescuing and engine.summary()["lr_reduced"] == 1
    # A restart for them (early_only=False) is one cut below the rate, with no clipper.
    rollback = default_rollback(early_only=False)
    engine, _, _, restarts = _engine_run(rollback, spikes=_CLIMB_AT_5)
    assert restarts == [7] and not rollback.rescuing
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    # Without the calm-start test the same run looks like a rate too high from the start: first the plain retry,
    # and without it the rescue.
    rollback = default_rollback(calm_factor=None)
    engine, _, _, restarts = _engine_run(rollback, spikes=_CLIMB_AT_5)
    assert restarts == [7] and rollback.retried and not rollback.rescuing
    rollback = default_rollback(calm_factor=None, retry=False)
    engine, _, _, restarts = _engine_run(rollback, spikes=_CLIMB_AT_5)
    assert restarts == [7] and rollback.rescuing and engine.lr_guard is not None and engine.lr_guard.scale() == 1.0


def test_a_start_whose_norms_grow_is_no_calm_start_and_gets_the_rescue() -> None:
    # The loss grows 3x a step before the spikes (as at a rate too high): 27x across the first four steps. The retry
    # off, the first restart shows the remedy that the calm-start test chose.
    rollback = default_rollback(retry=False)
    _, _, _, restarts = _engine_run(rollback, spikes={5, 6}, scales={2: 3.0, 3: 9.0, 4: 27.0})
    assert restarts and restarts[0] <= 7 and rollback.rescuing
    # Within 4x (the default calm_factor) it is still a calm start; a calm_factor below the spread makes it none.
    # The spikes climb (1e4x, then 1e8x): after the detector's own calm start (4x), two of one size would be one
    # event, a single troubled step to the rollback.
    for factor, rescued in ((4.0, False), (1.5, True)):
        rollback = default_rollback(calm_factor=factor, retry=False)
        _, _, _, restarts = _engine_run(rollback, spikes={5}, scales={2: 1.4, 3: 1.9, 4: 2.5, 6: 1e8})
        assert restarts == ([7] if rescued else []) and rollback.rescuing is rescued, factor


def test_a_masked_batch_does_not_break_a_calm_start() -> None:
    # Step 3's gradients are exactly zero (a fully masked batch): no observation, so steps 1, 2 and 4 are the calm
    # start. Counted as a norm of 0 it would be an infinite spread, and the bad batches would get the rescue.
    rollback = default_rollback()
    engine, _, _, restarts = _engine_run(rollback, spikes={5, 6}, scales={3: 0.0})
    assert restarts == [] and not rollback.rescuing


def test_the_norms_reach_the_host_only_while_the_rescue_needs_them() -> None:
    rollback = default_rollback()
    assert rollback.wants_norm(1) and rollback.wants_norm(20) and not rollback.wants_norm(21)
    assert default_rollback(calm_factor=None).wants_norm(1) and default_rollback(blowup_factor=None).wants_norm(1)
    assert not default_rollback(calm_factor=None, blowup_factor=None).wants_norm(1)
    # Without a rescue the calm-start test still decides whether to restart at all (early_only), and how long a run
    # of non-finite steps must be to restart (`Rollback.early_trouble`): a bare `Rollback()` never saw a calm start.
    assert default_rollback(rescue=False).wants_norm(1) and not default_rollback(rescue=False).wants_norm(21)
    assert default_rollback(rescue=False, early_only=False).wants_norm(1) and Rollback().wants_norm(1)
    assert not Rollback(calm_factor=None).wants_norm(1)
    rollback = default_rollback(early_only=False, calm_factor=None)
    rollback.rescuing = True  # the blow-up test is the rescue's, and done once it is at work
    assert not rollback.wants_norm(1)
    # In a run: the norms of the untroubled steps of the window, each its step's true total norm.
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=default_rollback(rescue_until=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.attach(opt)
    seen = []
    for step in range(1, 9):
        opt.zero_grad()
        (model(torch.full((2, 4), float(step))).sum()).backward()
        seen.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
        engine.step(optimizer=opt)
        opt.step()
    assert engine.rollback is not None
    assert [s for s, _ in engine.rollback._early_norms] == [1, 2, 3, 4, 5]
    assert [n for _, n in engine.rollback._early_norms] == pytest.approx(seen[:5], rel=1e-5)
    # Growth counts only jumps into trouble: none here, though the norm grows every step.
    assert engine.rollback.growth == 0.0 and seen[4] > 2 * seen[0]
    for bad in (1.0, 0.5, math.nan, "4"):
        with pytest.raises(ValueError, match="calm_factor"):
            Rollback(rescue=AGC(), calm_factor=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="blowup_factor"):
            default_rollback(blowup_factor=bad)  # type: ignore[arg-type]


def test_a_blow_up_by_orders_of_magnitude_gets_the_rescue_and_one_cut() -> None:
    # The norm jumps 10^8x from step 1 to 2 (as the stability suite's ResNet without BN does at its rate): the rescue
    # clipper goes to work and the restart also takes one cut, held and then recovered to just below the rate. No
    # plain retry first: bad batches do not blow the norm up by orders of magnitude.
    ratios: dict[int, float] = {}
    rollback = default_rollback()
    engine, _, _, restarts = _engine_run(rollback, spikes=set(), scales={2: 1e8, 3: 1e8}, ratios=ratios)
    assert restarts == [4] and rollback.rescuing and rollback.count == 1 and not rollback.retried
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    assert max(ratios[s] for s in range(5, 61)) <= 0.01 * (1 + 1e-4)
    assert rollback.growth == 0.0  # forgotten with the abandoned trajectory
    # 10^4x (the spikes of the tests above) is below the default's 10^6: the rescue keeps the rate; so does a 10^8x
    # jump with blowup_factor=None, or above a larger factor (the retry off: without a blow-up it would come first).
    for kwargs in ({"blowup_factor": None, "retry": False}, {"blowup_factor": 1e9, "retry": False}):
        rollback = default_rollback(**kwargs)
        engine, _, _, restarts = _engine_run(rollback, spikes=set(), scales={2: 1e8, 3: 1e8})
        assert restarts == [4] and rollback.rescuing, kwargs
        assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0, kwargs


def test_the_rescue_clips_unit_wise_and_the_next_restart_lowers_the_rate() -> None:
    ratios: dict[int, float] = {}
    # The default leaves the later trouble to the LR guard, and retries the first.
    rollback = default_rollback(early_only=False, retry=False)
    engine, _, _, restarts = _engine_run(rollback, spikes={2, 3}, scales=_CLIMB, ratios=ratios)
    assert restarts == [4, 42]
    after = [ratios[s] for s in range(5, 61) if s in ratios]  # the restart steps have no gradient
    assert len(after) == 55 and max(after) <= 0.01 * (1 + 1e-4)  # the two spikes between the restarts included
    # The first restart kept the rate; the second, with the clipper already at work, cuts it as before.
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    assert 0.5 <= engine.lr_guard.scale() < 0.6


def test_an_adaptive_optimizer_gets_the_cut_and_no_rescue_clipper() -> None:
    # Adam divides the gradient's size away: clipping cannot slow it, only a lower rate can. The retry first.
    ratios: dict[int, float] = {}
    engine, _, _, restarts = _engine_run(default_rollback(), spikes=set(), scales=_BACK, adam=True, ratios=ratios)
    assert restarts == [4, 9] and engine.rollback is not None and not engine.rollback.rescuing
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    assert max(ratios[s] for s in range(10, 61)) > 0.02


def test_a_model_with_sparse_gradients_gets_the_rescue_clipper_on_its_embedding_rows_too() -> None:
    # AGC clips a sparse gradient row by row, as its dense form: the embedding is slowed with the rest.
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(50, 8, mode="mean", sparse=True), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=default_rollback())
    engine.attach(opt)
    g = torch.Generator().manual_seed(0)
    rescued_rows = 0
    for step in range(1, 31):
        opt.zero_grad()
        loss = model(torch.randint(0, 50, (16, 4), generator=g)).square().mean()
        (loss * _BACK.get(step, 1.0)).backward()
        engine.step(optimizer=opt)
        grad = model[0].weight.grad
        if engine.rollback is not None and engine.rollback.rescuing and grad is not None:
            assert grad.is_sparse
            dense, weight = grad.to_dense(), model[0].weight.detach()
            held = dense.norm(dim=1) > 0
            ratio = dense[held].norm(dim=1) / weight[held].norm(dim=1).clamp_min(1e-3)
            assert float(ratio.max()) <= 0.01 * (1 + 1e-4), step
            rescued_rows += int(held.sum())
        opt.step()
    # The retry, then the rescue at the rate in force (no cut), as for a dense model.
    assert engine.summary()["rolled_back"] == 2 and engine.rollback is not None and engine.rollback.rescuing
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0
    assert rescued_rows > 0


def test_gradients_still_scaled_by_a_grad_scaler_get_the_cut_and_no_rescue_clipper() -> None:
    # A fused optimizer under 16-bit AMP unscales inside its step: here the gradients still carry the loss scale, and
    # AGC would compare them with the weights off by that factor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=default_rollback())
    engine.attach(opt)
    scale = torch.tensor(1024.0)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 31):
        opt.zero_grad()
        loss = model(torch.randn(8, 4, generator=g)).square().mean() * _BACK.get(step, 1.0)
        (loss * scale).backward()
        engine.step(optimizer=opt, grad_scale=scale)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scale)  # what the fused step does
        opt.step()
    # The retry, then the cut.
    assert engine.summary()["rolled_back"] == 2 and engine.rollback is not None and not engine.rollback.rescuing


def test_the_rescue_survives_a_checkpoint_and_is_validated() -> None:
    engine, model, _, _ = _engine_run(default_rollback(), spikes=set(), scales=_BACK, steps=30)
    assert engine.rollback is not None and engine.rollback.rescuing and engine.rollback.retried
    resumed = GuardEngine(model, lr_guard=LRGuard(), rollback="default")
    assert resumed.rollback is not None and not resumed.rollback.rescuing
    resumed.load_state_dict(engine.state_dict())
    assert resumed.rollback.rescuing and resumed.rollback.retried
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    resumed.attach(opt)
    (1e3 * model(torch.ones(2, 4)).sum()).backward()
    resumed.step(optimizer=opt)
    assert _unit_ratio(model[0]) <= 0.01 * (1 + 1e-4) and _unit_ratio(model[2]) <= 0.01 * (1 + 1e-4)
    with pytest.raises(ValueError, match="`rescue` must be a Clipper"):
        Rollback(rescue="agc")  # type: ignore[arg-type]
    assert "rescue=AGC(" in repr(default_rollback()) and "rescue" not in repr(Rollback())
    with pytest.raises(ValueError, match="rescue_until"):
        Rollback(rescue=AGC(), rescue_until=0)


def test_default_rollback_takes_its_rescue_clipper_and_window() -> None:
    plain, own = default_rollback(rescue=False), default_rollback(rescue=NormClip(max_norm=0.5), rescue_until=7)
    assert plain.rescue is None and isinstance(own.rescue, NormClip) and own.rescue.max_norm == 0.5
    assert own.rescue_until == 7
    # Everything but the rescue is the default's, and each call has a fresh clipper (its state is its own).
    head = repr(default_rollback()).split(", rescue=")[0]
    assert repr(own).split(", rescue=")[0] == head == repr(plain).split(", rescue_until=")[0]
    assert default_rollback().rescue is not default_rollback().rescue
    with pytest.raises(ValueError, match="`rescue` must be True"):
        default_rollback(rescue="agc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rescue_until"):
        default_rollback(rescue_until=0)
    assert lightning_gradguard.default_rollback is default_rollback


def test_a_divergence_cut_is_a_tenth_by_default_and_validated() -> None:
    assert default_rollback().diverged_factor == 0.1 and Rollback().diverged_factor is None
    assert default_rollback(diverged_factor=None).diverged_factor is None
    assert "diverged_factor=0.1" in repr(default_rollback()) and "diverged_factor" not in repr(Rollback())
    for bad in (0.0, 1.0, -0.5, "0.1", math.nan):
        with pytest.raises(ValueError, match="diverged_factor"):
            Rollback(diverged_factor=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("diverged_factor", [0.1, None])
def test_in_a_trainer_a_divergence_restarts_at_a_tenth_of_the_rate(diverged_factor: float | None) -> None:
    class Scales(L.Callback):
        def __init__(self, guard: GradGuard) -> None:
            self.guard, self.scales = guard, []

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            assert self.guard.lr_guard is not None
            self.scales.append(self.guard.lr_guard.scale(0))

    torch.manual_seed(0)
    # Adam at a rate that wrecks the model: its norms look ordinary (Adam divides their size away), the loss blows up.
    guard = GradGuard(rollback=default_rollback(diverged_factor=diverged_factor))
    watch = Scales(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=60, max_epochs=-1, callbacks=[guard, watch]).fit(
            Regressor(optimizer="adam", lr=1.0), regression_data(n=512)
        )
    summary = guard.summary()
    assert summary["diverging"] >= 1 and summary["rolled_back"] == 1 and summary["lr_reduced"] == 1
    cut = 0.5 if diverged_factor is None else diverged_factor
    assert min(watch.scales) == pytest.approx(cut)  # the restart's rate, held through the cooldown
    assert guard.lr_guard is not None and guard.lr_guard.ceiling(0) == pytest.approx(math.sqrt(cut))


def test_without_a_rescue_clipper_early_trouble_restarts_one_cut_below_the_rate() -> None:
    rollback = default_rollback(rescue=False)
    engine, _, _, restarts = _engine_run(rollback, spikes=set(), scales=_BACK)
    assert restarts == [4, 9] and not rollback.rescuing
    assert engine.lr_guard is not None and engine.lr_guard.ceiling() == pytest.approx(0.5**0.5)


def test_a_copy_that_trouble_followed_is_dropped_and_a_later_calm_one_taken() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    rollback = Rollback(every=10)
    for step in range(1, 46):
        rollback.before_step(step, params, None)
        rollback.observe(step, exploding=step == 12)  # one isolated event, which did not roll back
    # The copy taken at 10 saw the trouble at 12: never trusted. Kept as the candidate it blocked every later copy,
    # and a rollback went back to the initial weights; dropped, the calm stretch after it takes the copy at 30,
    # trusted from step 41 on.
    assert rollback._safe.valid and rollback._safe.step == 30


def test_isolated_spikes_keep_the_rate_and_a_climbing_pair_only_cuts_it() -> None:
    # One spike: clipped, nothing else. A second within the LR guard's cooldown with a calm step between: the
    # first is a lone spike (`LRGuard.spare_lone`), the second counts alone: no cut either (before, one cut). Two in a
    # row, the second 100x the first (a climb, two events): one cut, and no restart (the restart needs two
    # troubled steps in a row that began without a calm start).
    for spikes, cuts in (({30: 1e4}, 0), ({30: 1e4, 32: 1e4}, 0), ({30: 1e2, 31: 1e4}, 1)):
        engine, model, initial, restarts = _engine_run(default_rollback(), spikes=spikes)
        assert restarts == [] and engine.summary()["rolled_back"] == 0
        assert engine.summary()["exploding"] == len(spikes) and engine.summary()["lr_reduced"] == cuts
        assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), initial))


def test_non_finite_batches_in_a_row_need_twice_the_stretch_without_a_finite_explosion() -> None:
    # Two or three NaN batches in a row: bad data far more often than a wrecked model. The calm steps after them ran
    # on the weights they left: no cut, the run goes on from where it is.
    for nans in ({30, 31}, {30, 31, 32}):
        engine, _, _, restarts = _engine_run(default_rollback(), spikes=set(), nans=frozenset(nans))
        assert restarts == [] and engine.summary()["skipped"] == len(nans)
        assert engine.summary()["lr_reduced"] == 0

    # Four in a row cut (held), but the calm step after them withdraws the cut and restarts nothing: the weights were
    # fine (user trial: with `Rollback()`, a healthy Adam run went back to its initial weights, 28x its loss at the
    # end). Checked with early_only=False, and with no calm start before them, where the default restarts too.
    def late() -> Rollback:
        return default_rollback(early_only=False)

    for rollback, nans in ((late(), range(30, 34)), (default_rollback(), range(2, 6))):
        engine, _, _, restarts = _engine_run(rollback, spikes=set(), nans=frozenset(nans))
        assert restarts == [] and engine.summary()["lr_reduced"] == 1 and engine.summary()["rolled_back"] == 0
    # A run that goes on to twice that among the first steps, with no calm start (a model wrecked straight into NaN
    # stays there), restarts at once. After a calm start it does not: its skipped steps left the weights calm steps
    # made (user trial: 8-10 NaN batches at step 80 went back to the initial weights, +22% to +124% at the end).
    engine, _, _, restarts = _engine_run(default_rollback(), spikes=set(), nans=frozenset(range(2, 10)))
    assert restarts == [10] and engine.summary()["lr_reduced"] == 1
    engine, _, _, restarts = _engine_run(late(), spikes=set(), nans=frozenset(range(30, 40)))
    assert restarts == [] and engine.summary()["lr_reduced"] == 1 and engine.summary()["skipped"] == 10
    # A run that never ends (weights that make every batch non-finite) restarts after a calm start too, at the stall
    # warning's length (`STALL_STEPS`): before, it would have stayed stuck for good.
    engine, _, _, restarts = _engine_run(late(), spikes=set(), nans=frozenset(range(30, 60)))
    assert restarts == [30 + STALL_STEPS] and engine.summary()["rolled_back"] == 1
    # Ten after a calm start and then an explosion: the cut is made real, and restarts.
    engine, _, _, restarts = _engine_run(late(), spikes={40}, nans=frozenset(range(30, 40)))
    assert restarts == [41] and engine.summary()["rolled_back"] == 1
    # So does a run of four that trouble follows: a finite explosion after it makes the cut real.
    engine, _, _, restarts = _engine_run(late(), spikes={34}, nans=frozenset(range(30, 34)))
    assert restarts == [35] and engine.summary()["rolled_back"] == 1


def test_a_parameter_unfrozen_after_the_copy_joins_it_at_its_first_step() -> None:
    # Frozen parameters are not copied. One unfrozen later joins the copy as it is at its first step with a gradient
    # (still its value at the copy): a rollback restores it too, also after the state's round trip. Before, it
    # stayed wrecked.
    head, backbone = torch.zeros(2, requires_grad=True), torch.ones(3, requires_grad=False)
    opt = torch.optim.SGD([head, backbone], lr=0.1, momentum=0.9)
    rollback = Rollback(every=None)
    rollback.before_step(1, [head, backbone], opt)
    assert rollback._safe.positions == [0] and rollback._safe.frozen == [1]
    rollback.join([head, backbone], [0], opt)  # no change while it stays frozen
    assert rollback._safe.positions == [0]
    backbone.requires_grad_(True)
    rollback.join([head, backbone], [0, 1], opt)
    assert rollback._safe.positions == [0, 1] and rollback._safe.frozen == []
    saved = copy.deepcopy(rollback.state_dict())
    with torch.no_grad():
        head.fill_(5.0), backbone.fill_(1e6)
    rollback.restore(opt)
    assert torch.equal(head, torch.zeros(2)) and torch.equal(backbone, torch.ones(3))
    with torch.no_grad():
        backbone.fill_(1e6)
    resumed = Rollback(every=None)
    resumed.load_state_dict(saved, [head, backbone])
    resumed.restore(opt)
    assert torch.equal(backbone, torch.ones(3))


def test_a_copy_that_an_unfreeze_grows_over_max_bytes_is_dropped_with_one_warning() -> None:
    head, backbone = torch.zeros(2, requires_grad=True), torch.ones(100, requires_grad=False)
    rollback = Rollback(every=None, max_bytes=100)  # 8 bytes fit, 408 do not
    rollback.before_step(1, [head, backbone], None)
    assert rollback.holds_copy
    backbone.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"no rollback in this run: its copies would take 0 MiB.*max_bytes=100"):
        rollback.join([head, backbone], [0, 1], None)
    assert not rollback.holds_copy and not rollback.can_restore()


def test_past_until_the_copy_is_freed_and_nothing_restarts() -> None:
    rollback = Rollback(every=None, until=20, patience=2)
    engine, _, _, restarts = _engine_run(rollback, spikes={30, 31})
    assert restarts == [] and engine.summary()["lr_reduced"] == 1
    assert not rollback._safe.valid and rollback._safe.values == []
    assert not rollback.can_restore()


def test_a_model_over_max_bytes_gets_no_copy_and_one_warning() -> None:
    # 4*8 + 8 + 8 + 1 = 49 float32 values: 196 bytes, over a 100-byte budget.
    with pytest.warns(UserWarning, match=r"no rollback in this run.*max_bytes=100") as caught:
        engine, _, _, restarts = _engine_run(Rollback(every=None, patience=2, max_bytes=100), spikes={30, 31})
    assert restarts == [] and engine.summary()["lr_reduced"] == 1
    assert sum("no rollback" in str(w.message) for w in caught) == 1
    # Two copies (``every`` set) count twice: 392 bytes fit in 400, not in 300.
    _, _, _, restarts = _engine_run(Rollback(every=50, patience=2, max_bytes=400), spikes={30, 31})
    assert restarts == [32]


def test_the_default_rollback_takes_max_bytes_and_the_warning_names_it() -> None:
    # The warning advised `Rollback(max_bytes=...)`, which lacks the default's retry and rescue, and the default had
    # no way to raise its limit (user trial: a 1.03 GiB embedding table).
    rollback = default_rollback(max_bytes=100)
    assert rollback.max_bytes == 100 and rollback.retry and rollback.rescue is not None
    with pytest.warns(UserWarning, match=r"max_bytes=100.*default_rollback\(max_bytes=\.\.\.\)"):
        _engine_run(rollback, spikes={30, 31})
    assert default_rollback(max_bytes=None).max_bytes is None and default_rollback().max_bytes == 1 << 30
    with pytest.raises(ValueError, match="max_bytes"):
        default_rollback(max_bytes=0)


def test_in_a_trainer_one_spike_keeps_training_and_two_restart() -> None:
    single, _, restarts = _fit({40})
    assert single.summary()["exploding"] == 1 and single.summary()["lr_reduced"] == 0 and restarts == []
    assert single.summary()["rolled_back"] == 0 and single.lr_guard is not None and single.lr_guard.scale() == 1.0
    pair, _, restarts = _fit({40, 41})  # two of one size after the warm-up: one jump that holds, one event
    assert pair.summary()["exploding"] == 1 and pair.summary()["lr_reduced"] == 0 and restarts == []
    kept, _, restarts = _fit(_CLIMB)  # after 40 calm steps: the cut, and training goes on from there
    assert kept.summary()["lr_reduced"] == 1 and kept.summary()["rolled_back"] == 0 and restarts == []
    double, _, restarts = _fit(_CLIMB, rollback=default_rollback(early_only=False))
    assert double.summary()["lr_reduced"] == 1 and double.summary()["rolled_back"] == 1
    assert restarts == [42]  # step 41's flags land before step 42: the restart skips step 42
    # After 40 calm steps: the restart lowers the rate, no rescue clipper.
    assert double.lr_guard is not None and double.lr_guard.ceiling() < 1.0
    assert not double.rescuing()
    off, _, restarts = _fit(_CLIMB, rollback=None)
    assert off.summary()["lr_reduced"] == 1 and off.summary()["rolled_back"] == 0 and restarts == []


def test_in_a_trainer_the_restart_clips_unit_wise_from_then_on() -> None:
    def fit(rollback: Any) -> dict[int, float]:
        ratios = UnitRatios()
        # Early trouble, retried at step 4, and back at steps 7 and 8: a rate too high from the start.
        guard, _, restarts = _fit(_BACK, rollback=rollback, extra=[ratios])
        assert restarts == [4, 9] and guard.summary()["lr_reduced"] == 2
        assert guard.lr_guard is not None and (guard.lr_guard.scale() == 1.0) is (rollback == "default")
        assert guard.rescuing() is (rollback == "default")
        return ratios.ratios

    rescued = fit("default")
    # Before the restart, units step past AGC's bound; from the restart on none does, on every step to the end.
    assert max(rescued[s] for s in range(1, 9) if s in rescued) > 0.02
    after = [rescued[s] for s in range(10, 81)]
    assert len(after) == 71 and max(after) <= 0.01 * (1 + 1e-4)
    assert sum(r > 0.0099 for r in after) >= 10  # the bound is what binds, not a coincidence of small gradients
    # Without a rescue clipper nothing bounds them after the restart (at a lower rate).
    plain = fit(default_rollback(rescue=False))
    assert max(plain[s] for s in range(10, 81)) > 0.02


@pytest.mark.parametrize("at", [4, 9])
def test_a_param_group_added_when_a_restart_is_due_does_not_lose_it(at: int) -> None:
    # Added on the step the retry (4) or the rescue's restart (9) was due: the rebuilt engine dropped the old one's
    # due restart, so the run went on with the cut instead (one restart, no rescue, for `at=4`).
    guard, _, restarts = _fit(_BACK, extra=[AddGroup(at=at)])
    assert restarts == [4, 9] and guard.rescuing()


def test_a_param_group_added_after_the_rescue_keeps_it_at_work() -> None:
    # The engine rebuilt for the new group took a fresh rollback: the rescue clipper stopped, the used retry was
    # available again (the unfrozen run blew up to 1e11 and was restarted 5 more times, where it was rescued).
    ratios = UnitRatios()
    guard, _, restarts = _fit(_BACK, extra=[ratios, AddGroup(at=30)])
    assert restarts == [4, 9] and guard.rescuing() and guard.summary()["rolled_back"] == 2
    rollback = guard._states[0].rollback
    assert rollback is not None and rollback.retried and rollback.count == 2
    assert "net.2.gate" in guard._states[0].index.param_names  # the rebuilt engine, which watches the new group too
    after = [ratios.ratios[s] for s in range(30, 81)]
    assert max(after) <= 0.01 * (1 + 1e-4) and sum(r > 0.0099 for r in after) >= 5


def test_in_a_trainer_a_blow_up_gets_the_rescue_and_one_cut() -> None:
    # Spikes of 10^8 (the 10^4 ones above keep the rate): the same restart, the rescue clipper at work, one cut.
    ratios = UnitRatios()
    guard, _, restarts = _fit({2, 3}, extra=[ratios], factor=1e8)
    assert restarts == [4] and guard.rescuing()
    assert guard.lr_guard is not None and guard.lr_guard.ceiling() == pytest.approx(0.5**0.5)
    assert guard.lr_guard.scale() < 1.0  # still recovering at step 80 (held 20 steps, then 100 to recover)
    assert max(ratios.ratios[s] for s in range(5, 81)) <= 0.01 * (1 + 1e-4)


class AverageWatch(L.Callback):
    """Listed after a weight-averaging callback: after each optimizer step, the count of models in its average and
    the average's weights."""

    def __init__(self, averaging: Any) -> None:
        self.averaging = averaging
        self.counts: list[int] = []
        self.averages: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        average = self.averaging._average_model
        self.counts.append(int(average.n_averaged))
        self.averages.append([p.detach().clone() for p in average.module.parameters()])


@pytest.mark.skipif(
    not hasattr(lightning.pytorch.callbacks, "EMAWeightAveraging"), reason="lightning.pytorch 2.5 added it"
)
@pytest.mark.parametrize("restart_averages", [True, False])
def test_a_restart_starts_a_weight_average_again_from_the_restored_weights(
    restart_averages: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    if not restart_averages:  # what the average holds when nothing restarts it (the check that the test can fail)
        monkeypatch.setattr(lightning_gradguard.callback, "restart_weight_averages", lambda trainer: [])
    # Without a clipper the blow-up of steps 2 and 3 reaches the weights (10^6 and more), as a too-high rate does.
    L.seed_everything(0, verbose=False)
    model = SpikyRegressor({2, 3}, factor=1e8, lr=0.02)
    guard = GradGuard(clip=None)
    ema = EMAWeightAveraging()  # decay 0.999: the average keeps 0.999^n of what it once held
    restarts, averages = RestartWatch(guard), AverageWatch(ema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        callbacks = [guard, restarts, ema, averages]
        trainer(max_steps=40, max_epochs=-1, callbacks=callbacks).fit(model, regression_data(n=1024))
    assert len(restarts.restarts) == 1 and restarts.restarts[0][1]
    step = restarts.restarts[0][0]
    before = averages.averages[step - 2]  # after the step before the restart
    assert max(p.abs().max() for p in before) > 1e4  # the blow-up is in the average
    counts = averages.counts[step - 2 : step + 1]
    if not restart_averages:
        assert counts == [step - 1, step, step + 1]
        assert max(p.abs().max() for p in model.parameters()) > 1e3  # the model ends as the average: wrecked
        return
    # The restart's update copies the restored (initial) weights: the average starts again there.
    assert counts == [step - 1, 1, 2]
    assert all(torch.equal(a, w) for a, w in zip(averages.averages[step - 1], restarts.initial))
    # What the run ends with (Lightning copies the average into the model) holds no trace of the blow-up.
    assert max(p.abs().max() for p in model.parameters()) < 5.0


def test_restart_weight_averages_restarts_swa_once_it_averages() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    swa = StochasticWeightAveraging(swa_lrs=0.01)
    fit = SimpleNamespace(callbacks=[swa, GradGuard()])
    assert restart_weight_averages(fit) == []  # averaging has not begun: nothing to restart
    swa.n_averaged = torch.tensor(3)
    assert restart_weight_averages(fit) == ["StochasticWeightAveraging"] and int(swa.n_averaged) == 0


def test_a_run_that_ends_below_its_rate_says_which_rate_it_settled_on(caplog: pytest.LogCaptureFixture) -> None:
    def fit(spikes: set[int] | dict[int, float], rollback: Any = "default") -> tuple[float, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            guard, _, _ = _fit(spikes, rollback=rollback)
        assert guard.lr_guard is not None
        starts = ("GradGuard: the learning rate", "GradGuard: the gradients exploded")
        notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith(starts)]
        return guard.lr_guard.scale(), notes

    # The default's restart keeps the rate and rescues with AGC: the line names the clipper to start with. A plain
    # retry that trains on (bad batches at steps 2 and 3 alone) changed nothing to report.
    assert fit({2, 3}) == (1.0, [])
    scale, notes = fit(_BACK)
    assert scale == 1.0 and len(notes) == 1
    assert notes[0].startswith("GradGuard: the gradients exploded early and the run restarted from its initial")
    assert "`GradGuard(clip=AGC(clip_factor=0.01, eps=0.001, exclude=None, exclude_types=()))`" in notes[0]
    # A restart that lowered the rate: one line with the multiplier in force at the end, the rate it means and what
    # happened.
    scale, notes = fit(_CLIMB, rollback=default_rollback(early_only=False))
    assert 0.0 < scale < 1.0 and len(notes) == 1
    assert notes[0].startswith(f"GradGuard: the learning rate ends at {scale:.3g}x its scheduled value")
    assert f"(lr {0.02 * scale:.3g}; the schedule says 0.02) after 1 reduction and 1 rollback." in notes[0]
    # A ceiling, not the rate to use: a user took "start at or below that rate" for one, 13x and 80x the best.
    assert "That rate is a ceiling" in notes[0] and "start well below it (a tenth of it" in notes[0]
    # One spike keeps the rate: nothing to say; nor for a healthy run, nor for a single cut that is recovering.
    assert fit({40}) == (1.0, [])
    scale, notes = fit(_CLIMB)
    assert scale < 1.0 and notes == []
    assert fit(set()) == (1.0, [])


class _Scheduled(SpikyRegressor):
    """SpikyRegressor under a per-step schedule: a linear decay to a tenth, or a one-cycle schedule."""

    def __init__(self, spikes: dict[int, float], schedule: str) -> None:
        super().__init__(spikes, lr=0.02)
        self.schedule = schedule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.schedule == "groups":  # two param groups at different rates, one decay
            first, last = self.net[0], self.net[2]
            groups = [{"params": first.parameters(), "lr": self.lr}, {"params": last.parameters(), "lr": self.lr / 2}]
            opt = torch.optim.SGD(groups, lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        config: dict[str, Any] = {"interval": "step"}
        if self.schedule in ("decay", "groups"):
            config["scheduler"] = torch.optim.lr_scheduler.LinearLR(
                opt, start_factor=1.0, end_factor=0.1, total_iters=80
            )
        elif self.schedule == "onecycle":
            config["scheduler"] = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=80)
        elif self.schedule == "cyclic":
            config["scheduler"] = torch.optim.lr_scheduler.CyclicLR(
                opt, base_lr=0.002, max_lr=0.05, step_size_up=20, cycle_momentum=False
            )
        else:  # plateau: keeps no initial_lr, the rate training started with is its base
            config["scheduler"] = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            config["monitor"] = "train_loss"
        return {"optimizer": opt, "lr_scheduler": config}


@pytest.mark.parametrize(
    ("schedule", "kind", "base"),
    [
        ("decay", "base", 0.02),
        ("onecycle", "peak", 0.05),
        ("cyclic", "peak", 0.05),
        ("plateau", "base", 0.02),
        ("groups", "base", None),
    ],
)
def test_under_a_schedule_the_rate_note_scales_the_schedule(
    caplog: pytest.LogCaptureFixture, schedule: str, kind: str, base: float | None
) -> None:
    """The last rate of a decaying schedule is no rate to start at: the note scales the schedule's base or peak."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard(rollback=default_rollback(early_only=False))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        trainer(max_steps=80, max_epochs=-1, callbacks=[guard]).fit(
            _Scheduled(_CLIMB, schedule), regression_data(n=1024)
        )
    assert guard.lr_guard is not None
    scale = guard.lr_guard.scale()
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradGuard: the learning rate")]
    assert 0.0 < scale < 1.0 and len(notes) == 1
    if base is None:  # the groups' rates differ: no one rate to name
        assert f"The schedule scaled by {scale:.3g}x is a ceiling" in notes[0]
    else:
        scaled = f"The schedule scaled by {scale:.3g}x (its {kind} rate {base * scale:.3g} instead of {base:.3g})"
        assert f"{scaled} is a ceiling" in notes[0]
    assert "scale it well below that (by a tenth of it)" in notes[0] and "start well below it" not in notes[0]
    if schedule in ("decay", "onecycle", "cyclic"):  # the rate the schedule ended at is no rate to quote: "lr 0"
        assert "the schedule says" not in notes[0]


@pytest.mark.parametrize(("swa_lrs", "annealing_epochs"), [(0.005, 10), (0.5, 1)])
def test_under_stochastic_weight_averaging_the_rate_note_names_the_rate_in_force_at_the_trouble(
    caplog: pytest.LogCaptureFixture, swa_lrs: float, annealing_epochs: int
) -> None:
    """SWA writes its `swa_lrs` into the groups' `initial_lr` when it takes over. Trouble while its rate still anneals
    from the base rate (0.02 towards 0.005 over 10 epochs) is the base rate's: the note scaled 0.005 as the base,
    advising a lower SWA rate beside the rate that exploded. Trouble at SWA's own rate (0.5, reached in one epoch) is
    `swa_lrs`'s: the note blamed the base rate, which had trained calmly (user trial)."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard(rollback=default_rollback(early_only=False))
    swa = lightning.pytorch.callbacks.StochasticWeightAveraging(
        swa_lrs=swa_lrs, swa_epoch_start=2, annealing_epochs=annealing_epochs
    )
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        # 16 steps an epoch: SWA takes over at step 16, the climb comes at steps 40-41.
        trainer(max_epochs=5, callbacks=[guard, swa]).fit(SpikyRegressor(_CLIMB, lr=0.02), regression_data())
    assert guard.lr_guard is not None
    scale = guard.lr_guard.scale()
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradGuard: the learning rate")]
    assert 0.0 < scale < 1.0 and len(notes) == 1
    if swa_lrs < 0.02:
        assert f"(its base rate {0.02 * scale:.3g} instead of 0.02) is a ceiling" in notes[0]
        assert "swa_lrs" not in notes[0]
    else:
        swa_scaled = f"StochasticWeightAveraging's rate (`swa_lrs`) scaled by {scale:.3g}x ({0.5 * scale:.3g} instead"
        assert f"{swa_scaled} of 0.5) is a ceiling" in notes[0]
        assert "set `swa_lrs` well below that" in notes[0] and "base rate" not in notes[0]


class _StepDecayed(SpikyRegressor):
    """SGD at 0.02, a tenth of it from epoch 2 (the usual recipe before SWA at the decayed rate)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)}


def _rate_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradGuard: the learning rate")]


def test_the_rate_note_blames_swa_lrs_only_for_trouble_while_swa_trained(caplog: pytest.LogCaptureFixture) -> None:
    """The climb at steps 40-41 comes in epoch 2 at the decayed 0.002, before SWA (at that same rate) starts in epoch
    4: the trouble is the schedule's, though SWA's rate is nearer the rate at the trouble than the base rate is."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard(rollback=default_rollback(early_only=False))
    swa = lightning.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.002, swa_epoch_start=4, annealing_epochs=1)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        trainer(max_epochs=5, callbacks=[guard, swa]).fit(_StepDecayed(_CLIMB, lr=0.02), regression_data())
    assert guard.lr_guard is not None
    scale = guard.lr_guard.scale()
    (note,) = _rate_lines(caplog)
    assert 0.0 < scale < 1.0 and f"(its base rate {0.02 * scale:.3g} instead of 0.02) is a ceiling" in note
    assert "swa_lrs" not in note


def test_the_rate_note_after_swa_trouble_holds_across_a_resume_and_a_refit_says_what_is_new(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Trouble at SWA's rate (0.5 from epoch 2). A resume is the same fit: its line names `swa_lrs` as the
    uninterrupted run's does (it read SWA's restored `initial_lr` as the base rate, and named no SWA). A refit with
    nothing new said the first fit's advice again, with the base rate as the ceiling (the multiplier goes on)."""

    def fit(epochs: int, guard: GradGuard, model: SpikyRegressor, **kwargs: Any) -> list[str]:
        swa = lightning.pytorch.callbacks.StochasticWeightAveraging(swa_lrs=0.5, swa_epoch_start=2, annealing_epochs=1)
        save = ModelCheckpoint(dirpath=tmp_path / str(epochs), save_last=True, save_top_k=0)
        caplog.clear()
        with warnings.catch_warnings(), caplog.at_level(logging.INFO):
            warnings.simplefilter("ignore")
            fit = trainer(max_epochs=epochs, callbacks=[guard, swa, save], enable_checkpointing=True)
            fit.fit(model, regression_data(), **kwargs)
        return _rate_lines(caplog)

    def swa_line(scale: float) -> str:
        return f"StochasticWeightAveraging's rate (`swa_lrs`) scaled by {scale:.3g}x ({0.5 * scale:.3g} instead of 0.5)"

    L.seed_everything(0, verbose=False)
    whole, first = GradGuard(rollback=default_rollback(early_only=False)), SpikyRegressor(_CLIMB, lr=0.02)
    (line,) = fit(5, whole, first)
    assert whole.lr_guard is not None and swa_line(whole.lr_guard.scale()) in line
    L.seed_everything(0, verbose=False)
    model = SpikyRegressor(_CLIMB, lr=0.02)
    fit(3, GradGuard(rollback=default_rollback(early_only=False)), model)
    L.seed_everything(0, verbose=False)
    resumed = GradGuard(rollback=default_rollback(early_only=False))
    (line,) = fit(5, resumed, SpikyRegressor(_CLIMB, lr=0.02), ckpt_path=tmp_path / "3" / "last.ckpt")
    assert resumed.lr_guard is not None and swa_line(resumed.lr_guard.scale()) in line
    # Fitted again, without the bad batches: nothing new to advise.
    first.factors = {}
    assert fit(4, whole, first) == [
        f"GradGuard: the learning rate is still at {whole.lr_guard.scale():.3g}x its scheduled value, where an earlier"
        " fit of this model left it (see that fit's last line)."
    ]


class _LossBlownUp(Regressor):
    """Reports its loss 1000x on steps 1-8 (the gradients stay its MSE's): a divergence of the loss alone; and, when
    asked, one bad batch (10^4x loss and gradient) later."""

    def __init__(self, spike_at: int | None = None) -> None:
        super().__init__()
        self.spike_at = spike_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        mse = super().training_step(batch, batch_idx)
        if self.global_step == self.spike_at:
            return mse * 1e4
        return mse + mse.detach() * 999.0 if 1 <= self.global_step <= 8 else mse


@pytest.mark.parametrize("spike_at", [None, 30])
def test_the_rescue_line_names_the_loss_when_the_loss_alone_diverged(
    caplog: pytest.LogCaptureFixture, spike_at: int | None
) -> None:
    """A restart for an early divergence of the loss (no gradient exploded) said "the gradients exploded early" (a
    user trial's batch-2 regression, whose first norms spread too widely for a calm start). The line names what the
    restart answered, not an exploding step that came later."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard(rollback=default_rollback(calm_factor=None))  # these norms are calm: no calm-start test
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(_LossBlownUp(spike_at), regression_data())
    events = guard.summary()
    assert events["diverging"] == 1 and events["nonfinite"] == 0 and events["rolled_back"] == 1
    assert events["exploding"] == (spike_at is not None)
    (line,) = [r.getMessage() for r in caplog.records if "restarted from its initial weights" in r.getMessage()]
    assert line.startswith("GradGuard: the training loss diverged early and the run restarted from its initial")
    assert "AGC(clip_factor=0.01" in line and "clipping the gradients unit-wise" in line
    # The cause travels in the checkpoint (a resumed fit's line is the uninterrupted one's).
    (engine,) = guard._states.values()
    assert engine.rollback is not None and engine.rollback.rescue_cause == "loss"
    state = engine.rollback.state_dict()
    resumed = default_rollback()
    resumed.load_state_dict(state)
    assert resumed.rescuing and resumed.rescue_cause == "loss"
    resumed.load_state_dict({k: v for k, v in state.items() if k != "rescue_cause"})  # saved before it was kept
    assert resumed.rescue_cause == "gradients"
    with pytest.raises(ValueError, match="rescue_cause"):
        resumed.load_state_dict({**state, "rescue_cause": "weights"})


class _LossBlownUpNaN(_LossBlownUp):
    """The loss blown up on steps 1-8 as above, and one gradient NaN on step 5, where the divergence event comes."""

    def on_after_backward(self) -> None:
        if self.global_step == 5:
            self.net[0].weight.grad[0, 0] = float("nan")


def test_a_divergence_on_a_step_with_non_finite_gradients_still_restarts_the_run() -> None:
    """The LR guard took the step as an isolated bad batch (no cut) and the divergence, reported once, was lost: no
    restart, the run went on from the weights the blown-up loss left."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(_LossBlownUpNaN(), regression_data())
    events = guard.summary()
    assert events["diverging"] == 1 and events["nonfinite"] == 1
    assert events["lr_reduced"] == 1 and events["rolled_back"] == 1


def test_after_a_refit_at_another_rate_the_rate_note_counts_the_new_rates_cuts(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The multiplier found at 0.05 starts afresh at 0.03; the line counted the old rate's cuts and rollbacks too
    ("after 3 reductions and 3 rollbacks" for one climb at the new rate, where a fresh guard says 1 and 1). A resume
    of that refit is the same fit: its line counted the old rate's cuts again (the start was not checkpointed)."""
    L.seed_everything(0, verbose=False)
    guard = GradGuard(rollback=default_rollback(early_only=False))
    model = SpikyRegressor({40: 1e2, 41: 1e4, 60: 1e2, 61: 1e4}, lr=0.05)
    line = "(lr 0.015; the schedule says 0.03) after 1 reduction and 1 rollback."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=5, callbacks=[guard]).fit(model, regression_data())
        assert guard.summary()["lr_reduced"] >= 2
        model.lr, model.factors = 0.03, {26: 1e2, 27: 1e4}
        caplog.clear()
        save = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        with caplog.at_level(logging.INFO):
            trainer(max_epochs=2, callbacks=[guard, save], enable_checkpointing=True).fit(model, regression_data())
        (note,) = _rate_lines(caplog)
        assert line in note
        resumed = GradGuard(rollback=default_rollback(early_only=False))
        caplog.clear()
        with caplog.at_level(logging.INFO):
            fit = trainer(max_epochs=3, callbacks=[resumed], enable_checkpointing=False)
            fit.fit(model, regression_data(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.summary()["lr_reduced"] > 1  # the counts go on from the checkpoint's
    (note,) = _rate_lines(caplog)
    assert line in note


def test_a_healthy_run_is_bitwise_the_same_with_the_default_restart() -> None:
    def weights(rollback: Any) -> list[torch.Tensor]:
        guard, model, _ = _fit(set(), rollback=rollback, steps=60)
        assert guard.summary()["lr_reduced"] == 0 and guard.summary()["rolled_back"] == 0
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(weights("default"), weights(None)))


def test_a_resumed_run_without_saved_copies_copies_the_resumed_weights_only_before_until() -> None:
    engine, model, _, _ = _engine_run(default_rollback(save_copies=False), spikes=set(), steps=30)
    state = engine.state_dict()
    assert "copies" not in state["rollback"]
    for until, copied in ((40, True), (25, False)):
        resumed = GuardEngine(model, lr_guard=LRGuard(), rollback=Rollback(every=None, until=until, patience=2))
        resumed.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        resumed.attach(opt)
        at_resume = [p.detach().clone() for p in model.parameters()]
        model(torch.ones(2, 4)).sum().backward()
        resumed.step(optimizer=opt)  # engine step 31: the steps count on from the checkpoint
        rollback = resumed.rollback
        assert rollback is not None and rollback._safe.valid is copied
        if copied:
            assert all(torch.equal(v, w) for v, w in zip(rollback._safe.values, at_resume))
        model.zero_grad()


class StepBatches(SpikyRegressor):
    """Its batch is a function of the optimizer step alone: a run resumed mid-epoch sees the batches the run that was
    not interrupted saw."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.global_step)
        x = torch.randn(16, 16, generator=g)
        return super().training_step((x, x[:, :4].sum(1, keepdim=True)), batch_idx)


def _step_fit(
    rollback: Any, spikes: dict[int, float], steps: int, callbacks: list[L.Callback], ckpt_path: str | None = None
) -> tuple[GradGuard, StepBatches, RestartWatch]:
    torch.manual_seed(0 if ckpt_path is None else 1)  # resumed: everything must come from the checkpoint
    model = StepBatches(spikes, lr=0.02)
    guard = GradGuard(rollback=rollback)
    watch = RestartWatch(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(
            max_steps=steps, max_epochs=-1, callbacks=[guard, watch, *callbacks], enable_checkpointing=bool(callbacks)
        ).fit(model, regression_data(n=1024), ckpt_path=ckpt_path)
    return guard, model, watch


@pytest.mark.parametrize(
    ("rollback", "spikes", "restarts", "copies"),
    [
        # _BACK's trouble: a retry at step 4, then the rescue at step 9, both from the initial weights.
        ("default", _BACK, [4, 9], {1}),
        # A full rollback after a calm start: back to the copy of step 9. A copy is on trial until the flags of the
        # `every` steps after it have landed, so one is taken every other multiple of 3 (at steps 3 and 9).
        (Rollback(every=3), {13: 1e4, 14: 1e6}, [15], {1, 3, 9}),
    ],
    ids=["default", "every3"],
)
def test_a_run_resumed_inside_the_rollback_window_restarts_from_the_same_copy(
    rollback: Any, spikes: dict[int, float], restarts: list[int], copies: set[int], tmp_path: Any
) -> None:
    full_guard, full_model, full_watch = _step_fit(copy.deepcopy(rollback), spikes, 20, [])
    assert [step for step, _ in full_watch.restarts] == restarts
    saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    last = restarts[-1] - 1
    _step_fit(copy.deepcopy(rollback), spikes, last, [saver])
    seen = set()
    for at in range(1, last + 1):
        path = str(tmp_path / f"epoch=0-step={at}.ckpt")
        saved = next(iter(torch.load(path, weights_only=True)["callbacks"].values()))
        held = saved["optimizers"]["0"]["rollback"]["copies"]
        seen |= {held["safe"]["step"], *([held["candidate"]["step"]] if held["candidate"] else [])}
        guard, model, watch = _step_fit(copy.deepcopy(rollback), spikes, 20, [], ckpt_path=path)
        assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), model.parameters())), at
        assert guard.summary() == full_guard.summary(), at
        assert [step for step, _ in watch.restarts] == [step for step in restarts if step > at], at
    assert seen == copies


def test_save_copies_false_keeps_the_copies_out_of_the_state() -> None:
    engine, _, _, _ = _engine_run(Rollback(every=3, save_copies=False), spikes=set(), steps=10)
    assert "copies" not in engine.state_dict()["rollback"]
    engine, _, _, _ = _engine_run(Rollback(every=3), spikes=set(), steps=10)
    copies = engine.state_dict()["rollback"]["copies"]
    assert copies["safe"]["step"] == 3 and copies["candidate"]["step"] == 9  # the calm copy, and the one on trial
    assert "save_copies=False" in repr(Rollback(save_copies=False))
    with pytest.raises(ValueError, match="save_copies"):
        Rollback(save_copies=1)  # type: ignore[arg-type]


def test_copies_that_no_longer_fit_the_parameters_are_forgotten() -> None:
    engine, _, _, _ = _engine_run(default_rollback(), spikes=set(), steps=5)
    state = engine.state_dict()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)  # the copy was of four trainable tensors; three now
    rollback = default_rollback()
    rollback.load_state_dict(state["rollback"], params=[model[2].weight, model[2].bias])
    assert not rollback.holds_copy
    rollback.load_state_dict(state["rollback"], params=list(model.parameters()))
    assert rollback.holds_copy  # the positions hold the shapes the copy was taken of
    # Its own copies: the state stays as it was when the run goes on (later copies are written in place).
    saved = state["rollback"]["copies"]["safe"]["values"]
    held = rollback.state_dict()["copies"]["safe"]["values"]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(saved, held))
    # Saved under a larger `max_bytes` (4 tensors of 49 float32 values: 196 bytes).
    for max_bytes, kept in ((195, False), (196, True)):
        bounded = Rollback(every=None, max_bytes=max_bytes)
        bounded.load_state_dict(state["rollback"], params=list(model.parameters()))
        assert bounded.holds_copy is kept

    class Shard(torch.Tensor):  # stands for a sharded parameter (a DTensor's shape is the whole tensor's)
        pass

    sharded = [nn.Parameter(p.detach().as_subclass(Shard)) for p in model.parameters()]
    rollback.load_state_dict(state["rollback"], params=sharded)
    assert not rollback.holds_copy


def test_max_bytes_counts_the_optimizer_state_once_it_exists() -> None:
    # 49 float32 values: two copies of the parameters take 392 bytes and fit; once Adam has its two moments (and a
    # step counter per tensor) the candidate copy would need three times that, and the rollback turns itself off.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rollback = Rollback(every=5, max_bytes=500)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=rollback)
    engine.attach(opt)
    with pytest.warns(UserWarning, match="no rollback in this run") as caught:
        for step in range(1, 8):
            opt.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            engine.step(optimizer=opt)
            if step < 5:
                assert rollback._safe.valid  # the first copy (no optimizer state yet) fits
            opt.step()
    assert len(caught) == 1 and not rollback._safe.valid and not rollback.can_restore()


def test_the_rescue_is_configurable_from_yaml() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(GradGuard, "guard")
    cfg = parser.parse_string(
        """
        guard:
          rollback:
            class_path: lightning_gradguard.Rollback
            init_args:
              every: null
              patience: 2
              rescue: {class_path: lightning_gradguard.AGC, init_args: {clip_factor: 0.02}}
              rescue_until: 10
              calm_factor: 2.5
              blowup_factor: 1000.0
        """
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    rollback = instantiate(cfg).guard.rollback
    assert isinstance(rollback, Rollback)
    assert (rollback.every, rollback.patience, rollback.rescue_until, rollback.calm_factor) == (None, 2, 10, 2.5)
    assert rollback.blowup_factor == 1000.0
    assert isinstance(rollback.rescue, AGC) and rollback.rescue.clip_factor == 0.02


class _InfiniteFirst(L.LightningModule):
    """A tanh MLP regression at SGD 0.5 or ASGD 1.5 (far too high) whose loss is +inf on its first ``k`` batches."""

    def __init__(self, k: int, optimizer: type[torch.optim.Optimizer] = torch.optim.SGD) -> None:
        super().__init__()
        self.k, self.calls, self.optimizer = k, 0, optimizer
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.calls += 1
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * math.inf if self.calls <= self.k else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is torch.optim.ASGD:
            return torch.optim.ASGD(self.parameters(), lr=1.5)
        return self.optimizer(self.parameters(), lr=0.5, momentum=0.9)


def test_asgd_at_a_rate_far_too_high_is_rescued_as_sgd_is(caplog: pytest.LogCaptureFixture) -> None:
    # ASGD's step grows with the gradient as SGD's does: the rescue clipper bounds it. Before, it got cuts alone and
    # ended at 0.42 of the targets' variance (user trial; SGD at the same rate 0.053, now ASGD too).
    torch.manual_seed(0)
    guard = GradGuard()
    with caplog.at_level(logging.INFO):
        from tests.models import regression_data, trainer

        model = _InfiniteFirst(0, torch.optim.ASGD)
        trainer(max_steps=80, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    assert guard.summary()["rolled_back"] >= 1
    assert "restarted from its initial weights, with AGC" in caplog.text


@pytest.mark.parametrize("k", [0, 25])
def test_steps_skipped_on_untouched_weights_do_not_use_up_the_early_window(
    k: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The rollback's early window (the retry, the rescue) counts from the first step that could move the weights:
    # counted from step 0, 25 non-finite steps on the initial weights used it up, and the too-high rate that followed
    # got three cuts instead of the rescue.
    torch.manual_seed(0)
    guard = GradGuard()
    with caplog.at_level(logging.INFO):
        from tests.models import regression_data, trainer

        trainer(max_steps=60 + k, max_epochs=-1, callbacks=[guard]).fit(_InfiniteFirst(k), regression_data(n=512))
    assert guard.summary()["skipped"] >= k and guard.summary()["rolled_back"] >= 1
    assert "restarted from its initial weights, with AGC" in caplog.text
