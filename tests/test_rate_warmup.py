"""The clipper starts afresh once a learning-rate warm-up reaches half its peak (``GuardEngine._watch_rate_warmup``).

At a rate near 0 the weights hardly move and the gradient norms vary by the batch alone: the default ZClip's
statistics from those steps were too narrow for the same run at its rate, and it clipped healthy steps as the rate
rose (user trial: a LambdaLR warm-up from 0, 10 steps clipped over 8 seeds, held-out +8.6% on one).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GuardEngine, LRGuard, Rollback, ZClip
from tests.models import trainer

WARMUP = 40


class _WarmedUp(L.LightningModule):
    """An MLP regression under SGD with momentum and a linear warm-up from exactly 0 (as Hugging Face's schedules)."""

    def __init__(self, schedule: str = "warmup") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.schedule = schedule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.schedule == "warmup":
            factor = lambda step: min(1.0, step / WARMUP)  # noqa: E731
        elif self.schedule == "onecycle":  # its own warm-up, from max_lr / 25, with the peak as `max_lr`
            return {
                "optimizer": opt,
                "lr_scheduler": {
                    "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=96),
                    "interval": "step",
                },
            }
        else:  # constant
            factor = lambda step: 1.0  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(512, 16, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(512, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def _fit(guard: GradGuard | None, schedule: str = "warmup") -> list[torch.Tensor]:
    L.seed_everything(0, verbose=False)
    model = _WarmedUp(schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=6, callbacks=[] if guard is None else [guard]).fit(model, _data())
    return [p.detach().clone() for p in model.parameters()]


def _plain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: GuardEngine,
    step: int,
    scale: float = 1.0,
) -> None:
    """One step of a plain loop on the step's own batch (the same batch for the same step number in any run)."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad()
    (model(x).square().mean() * scale).backward()
    engine.step(optimizer=optimizer)
    optimizer.step()
    scheduler.step()
    engine.drain()


def test_a_warm_up_from_zero_leaves_a_healthy_run_unclipped() -> None:
    # Before, ZClip clipped steps 27 and 32 (norms 1.72 and 2.60 after a warm-up at 0.6-0.8) and the held-out loss
    # ended 8.6% higher; now the run is the unguarded one, weight for weight.
    guard = GradGuard()
    guarded, plain = _fit(guard), _fit(None)
    assert guard.summary()["clipped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(guarded, plain, strict=True))
    # The clipper did start afresh: it has seen the steps from half the peak (step 20 of 96) on, not all of them.
    count = int(guard.state_dict()["optimizers"]["0"]["clip"]["count"])
    assert 96 - WARMUP // 2 - 1 <= count < 96


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_without_a_warm_up_from_near_zero_the_clipper_keeps_its_statistics(schedule: str) -> None:
    guard = GradGuard()
    _fit(guard, schedule)
    count = int(guard.state_dict()["optimizers"]["0"]["clip"]["count"])
    if schedule == "constant":
        assert count == 96  # every step, from the first
    else:  # OneCycleLR starts at a 25th of its peak: it warms up too, judged against `max_lr`
        assert count < 96


def test_a_rate_lowered_by_the_lr_guard_is_no_warm_up() -> None:
    # Under Lightning the guard's multiplier is in the param groups while GradGuard runs (inside optimizer.step): a cut
    # to a quarter is not a warm-up, and the recovery that follows must not restart the clipper.
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # gives the groups an `initial_lr`
    lr_guard = LRGuard(factor=0.25, patience=1, cooldown=2, recovery_steps=3)
    engine = GuardEngine(model, clip=ZClip(warmup_steps=5), lr_guard=lr_guard)
    engine.attach(optimizer)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def closure(scale: float) -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * scale
        loss.backward()
        engine.step()  # inside optimizer.step, as GradGuard's hook: the multiplier is applied
        return loss

    scales = []
    for step in range(1, 41):
        optimizer.step(functools.partial(closure, 1e4 if step == 10 else 1.0))
        scheduler.step()
        engine.drain()
        scales.append(lr_guard.scale())
    assert min(scales) <= 0.25 and scales[-1] == 1.0  # cut to a quarter, then recovered
    # Every step is in the clipper's statistics (the spike too, clipped): it never started afresh.
    assert int(engine.state_dict()["clip"]["count"]) == 40


def test_a_run_resumed_just_before_the_warm_up_reaches_half_its_peak_restarts_the_clipper_as_the_whole_run() -> None:
    # Saved at the last step under half the peak: the step after it is the one that starts the clipper afresh.
    def build() -> tuple[nn.Module, torch.optim.Optimizer, Any, GuardEngine]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 20))
        engine = GuardEngine(model, clip=ZClip(warmup_steps=5), lr_guard=LRGuard())
        engine.attach(optimizer)
        return model, optimizer, scheduler, engine

    def train(parts: tuple[nn.Module, torch.optim.Optimizer, Any, GuardEngine], steps: range) -> None:
        for step in steps:
            _plain_step(*parts, step)

    whole = build()
    train(whole, range(0, 30))
    first = build()
    train(first, range(0, 10))  # the 10th step ran at 9/20 of the peak: the next one is at half
    resumed = build()
    for a, b in zip(resumed[:3], first[:3]):
        a.load_state_dict(b.state_dict())
    resumed[3].load_state_dict(first[3].state_dict())
    train(resumed, range(10, 30))
    assert int(whole[3].state_dict()["clip"]["count"]) == 20  # started afresh at the 11th step
    assert resumed[3].state_dict()["clip"]["count"] == whole[3].state_dict()["clip"]["count"]
    assert all(torch.equal(a, b) for a, b in zip(whole[0].parameters(), resumed[0].parameters(), strict=True))


def _plain_run(
    schedule: Any,
    steps: int,
    *,
    lr: Any = 0.05,
    rollback: Rollback | None = None,
    spikes: tuple[int, ...] = (),
    add_group_at: int | None = None,
) -> GuardEngine:
    """A plain loop under ``schedule(optimizer)``; with ``add_group_at``, the head joins the optimizer as a group at
    that step (the engine rebuilt and carried over, as GradGuard does)."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 1)
    model = nn.Sequential(body, head)
    optimizer = torch.optim.SGD(model.parameters() if add_group_at is None else body.parameters(), lr=lr, momentum=0.9)
    scheduler = schedule(optimizer)
    lr_guard = LRGuard(patience=1)

    def build() -> tuple[GuardEngine, Any]:
        engine = GuardEngine(model, clip=ZClip(warmup_steps=5), lr_guard=lr_guard, rollback=rollback)
        return engine, engine.attach(optimizer)

    engine, handle = build()
    for step in range(1, steps + 1):
        if step == add_group_at:
            base = optimizer.param_groups[0]
            optimizer.add_param_group({"params": head.parameters(), "lr": base["lr"], "initial_lr": base["initial_lr"]})
            handle.remove()
            old, (engine, handle) = engine, build()
            engine.carry_over(old)
        _plain_step(model, optimizer, scheduler, engine, step, 1e3 if step in spikes else 1.0)
    return engine


def _clip_count(engine: GuardEngine) -> int:
    return int(engine.state_dict()["clip"]["count"])


def test_the_clipper_starts_afresh_once_not_at_every_warm_restart() -> None:
    # At every warm restart a cycle shorter than ZClip's warm-up (25 steps) kept it from ever clipping.
    def restarts(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=20, eta_min=0.0)

    assert _clip_count(_plain_run(restarts, 100)) == 100  # it starts at its peak: no warm-up, no fresh start

    def warm_then_restarts(optimizer: torch.optim.Optimizer) -> Any:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=20)
        cycles = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=20, eta_min=0.0)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cycles], milestones=[20])

    engine = _plain_run(warm_then_restarts, 100)
    assert 80 <= _clip_count(engine) < 100  # afresh once, in the warm-up (near step 10), not at each of 4 restarts


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_tensor_rate_warms_up_as_a_float_one(tensor_lr: bool) -> None:
    # Schedulers copy a tensor rate into `initial_lr`, which was no evidence: the fresh start never came.
    def warm(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 20))

    engine = _plain_run(warm, 40, lr=torch.tensor(0.05) if tensor_lr else 0.05)
    assert _clip_count(engine) == 30  # afresh at the 11th step, when the rate reached half its peak


def test_a_rollback_to_before_the_crossing_starts_the_clipper_afresh_again() -> None:
    # The rollback brings back the clipper's statistics of its copy, taken in the warm-up: without the warm-up's
    # place with them, the run went on for good on statistics of steps at 0-22% of its peak rate.
    def warm(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 40))

    engine = _plain_run(warm, 60, rollback=Rollback(every=10, rescue=None), spikes=(26, 27))
    assert engine.summary()["rolled_back"] == 1
    # Afresh at step 21, back to a copy of before it at the rollback, afresh again at the next step.
    assert _clip_count(engine) <= 60 - 27


class _HandWarmUp:
    """A warm-up written by hand, over every param group there is (torch's schedulers refuse a group added later)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int = 20) -> None:
        self.optimizer, self.steps, self.count = optimizer, steps, 0
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self._set()

    def _set(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * min(1.0, self.count / self.steps)

    def step(self) -> None:
        self.count += 1
        self._set()


@pytest.mark.parametrize("added_at", [8, 11, 15])
def test_a_param_group_added_on_the_crossing_step_does_not_miss_it(added_at: int) -> None:
    # The engine rebuilt for the new group on the very step the warm-up reached half its peak had forgotten that it
    # was warming up: the clipper kept the statistics of the steps near a rate of 0 for good.
    warm = _HandWarmUp

    engine = _plain_run(warm, 30, add_group_at=added_at)
    assert _clip_count(engine) == 20  # afresh at the 11th step wherever the group joined


def test_a_group_held_at_a_rate_of_0_then_given_its_rate_starts_the_clipper_afresh() -> None:
    # The highest share over the groups hid it: the head trained at its rate throughout, and the backbone, held at 0
    # for 100 steps, was clipped as it began to learn (user trial: a CNN, +9.7% held-out).
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 1)
    model = nn.Sequential(body, head)
    groups = [{"params": body.parameters()}, {"params": head.parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: float(step >= 30), lambda step: 1.0])
    engine = GuardEngine(model, clip=ZClip(warmup_steps=5), lr_guard=LRGuard())
    engine.attach(optimizer)
    for step in range(60):
        _plain_step(model, optimizer, scheduler, engine, step)
    assert _clip_count(engine) == 30  # afresh at the 31st step, when the backbone got its rate
