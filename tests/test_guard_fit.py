"""LR guard, regularizers and saturation inside real ``Trainer.fit`` runs (CPU, tiny models)."""

from __future__ import annotations

import copy
import logging
import math
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateFinder, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    L1,
    L2,
    DivergenceDetector,
    ExplodingDetector,
    GradGuard,
    GradientExplosionError,
    LRGuard,
    Orthogonal,
    VanishingDetector,
    ZClip,
)
from lightning_gradguard.regularize import Regularizer
from tests.helpers import AddGroup, MetricsLogger, RestartWatch, load_events, scalar_series
from tests.models import Regressor, regression_data, trainer


class Shifting(Regressor):
    """A regressor whose data stream misbehaves at known optimizer steps.

    Args:
        hard: ``(start, stop)`` optimizer steps whose inputs and targets are multiplied by ``gain`` (a regime in
            which the learning rate is far too high).
        spikes: optimizer steps whose loss is multiplied by ``spike`` (one large, finite gradient).
        scheduler: builds an LR scheduler (interval ``"step"``) from the optimizer.
        penalties: regularizers whose penalty is added to the loss (the reference for the gradient terms).
    """

    def __init__(
        self,
        hard: tuple[int, int] = (0, 0),
        gain: float = 1.0,
        spikes: tuple[int, ...] = (),
        spike: float = 1e4,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        penalties: list[Regularizer] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hard, self.gain, self.spikes, self.spike = hard, gain, spikes, spike
        self.scheduler_fn = scheduler
        self.penalties = penalties or []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.hard[0] <= self.global_step < self.hard[1]:
            x, y = x * self.gain, y * self.gain
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach())
        if self.global_step in self.spikes:
            loss = loss * self.spike
        for r in self.penalties:
            # Lightning divides the returned loss by `accumulate_grad_batches`: adding the full penalty to every
            # micro-batch gives exactly one penalty gradient per optimizer step.
            loss = loss + r.penalty(self)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam-fused":
            # Fused optimizers unscale inside step(): under a GradScaler the hook sees still-scaled gradients.
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        else:
            optimizer = super().configure_optimizers()
        if self.scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer), "interval": "step"}}


def _counting(**kwargs: Any) -> GradGuard:
    """``GradGuard(**kwargs)`` whose LR guard counts lone spikes too: ``Shifting``'s spikes a few steps apart, each
    clipped between calm steps, then cut the rate (by default they count for nothing: ``LRGuard.spare_lone``)."""
    return GradGuard(lr_guard=LRGuard(spare_lone=False), **kwargs)


class LRProbe(L.Callback):
    """Placed after the guard: records, per optimizer step, the scheduled LR, the LR seen inside
    ``optimizer.step`` and the guard's multiplier."""

    def __init__(self, guard: GradGuard | None = None) -> None:
        self.guard = guard
        self.scheduled: list[float] = []  # param group 0 before optimizer.step
        self.effective: list[float] = []  # inside optimizer.step, after the guard's pre-hook
        self.after: list[float] = []  # after the scheduler stepped
        self.scheduler_lr: list[float] = []  # scheduler.get_last_lr()
        self.scales: list[float] = []  # multiplier after the step's flags reached the guard
        self._handle: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered after GradGuard's own hook (GradGuard attaches in its on_train_start, which runs first).
        self._handle = trainer.optimizers[0].register_step_pre_hook(
            lambda opt, args, kwargs: self.effective.append(float(opt.param_groups[0]["lr"]))
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.scheduled.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        if trainer.lr_scheduler_configs:
            self.scheduler_lr.append(float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]))
        if self.guard is not None and self.guard.lr_guard is not None:
            self.scales.append(self.guard.lr_guard.scale(0))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle.remove()


class LossTrace(L.Callback):
    """Every training loss, read after its step (``nan``/``inf`` kept)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.values.append(float(outputs["loss"]))


def _quiet_fit(trainer_: L.Trainer, model: L.LightningModule, data: Any, **kwargs: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_.fit(model, data, **kwargs)
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------- LR guard


def test_lr_guard_rescues_a_run_that_diverges_without_it() -> None:
    # Steps 25..49 feed inputs 5x larger: the curvature grows 25x, which puts the LR far past the stability limit.
    def fit(lr_guard: LRGuard | None) -> tuple[list[float], LRProbe, GradGuard, Shifting]:
        torch.manual_seed(0)
        model = Shifting(hard=(25, 50), gain=5.0, net=nn.Linear(16, 1), lr=0.05)
        guard = GradGuard(
            clip=None,
            lr_guard=lr_guard,
            # A short memory, so the fast early descent has left the history by the time the regime changes.
            exploding=ExplodingDetector(warmup_steps=10, z_thresh=4.0, alpha=0.8),
            vanishing=None,
            on_nonfinite="warn",
        )
        probe = LRProbe(guard)
        _quiet_fit(trainer(max_steps=110, max_epochs=-1, callbacks=[guard, probe]), model, regression_data())
        return torch.stack(model.losses).tolist(), probe, guard, model

    bare, _, bare_guard, _ = fit(None)
    losses, probe, guard, model = fit(LRGuard(factor=0.1, patience=1, cooldown=25, recovery_steps=20, memory=False))
    assert bare_guard.summary()["exploding"] >= 1

    # Without the guard the loss blows up by many orders of magnitude and is still huge at the end.
    assert not math.isfinite(max(bare)) or max(bare) > 1e15
    assert not math.isfinite(bare[-1]) or bare[-1] > 1e4

    # With it: finite throughout, and training ends far below where it started.
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 5 and last < 1.0
    assert max(losses) < 1e-6 * max(bare) or not math.isfinite(max(bare))

    # The multiplier drops on the explosion, holds through the bad regime and comes back to exactly 1.
    scales = probe.scales
    assert len(scales) == 110
    assert scales[:25] == [1.0] * 25
    assert scales[25] < 1.0  # the first hard step's flag lowers it right after that step
    assert min(scales) <= 0.1
    assert all(s < 1.0 for s in scales[25:50])
    back = next(i for i in range(25, 110) if scales[i] == 1.0)
    assert 50 < back < 100
    assert scales[back:] == [1.0] * (110 - back)
    assert guard.summary()["lr_reduced"] >= 1
    # Inside optimizer.step the LR was scaled by the multiplier decided on the step before; outside, never.
    assert probe.effective == pytest.approx([0.05] + [0.05 * s for s in scales[:-1]], rel=1e-12)
    assert probe.scheduled == [0.05] * 110 and probe.after == [0.05] * 110
    assert model.optimizers().optimizer.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ratio_test_at_5x_keeps_a_run_finite_that_diverges_from_its_first_steps(seed: int) -> None:
    # The adding-problem LSTM at 10x its stable SGD rate: the norm jumps 10x on the second step and keeps climbing,
    # inside ZClip's 25-step warm-up, where ZClip does not clip. The detector's ratio test at 5x, the clip it
    # triggers and the LR guard stop it; with the default 100x the run reaches losses of 1e10 (but stays finite).
    from examples.lstm_adding import AddingModule, AddingStream

    def fit(guard: GradGuard | None) -> list[float]:
        L.seed_everything(seed, verbose=False)
        model = AddingModule(model="lstm", hidden_size=64, optimizer="sgd", lr=1.0)
        data = DataLoader(AddingStream(10, 32, 150, seed=seed), batch_size=None)
        losses = LossTrace()
        callbacks: list[L.Callback] = [losses] if guard is None else [guard, losses]
        _quiet_fit(trainer(max_steps=150, max_epochs=-1, callbacks=callbacks), model, data)
        return losses.values

    assert not all(math.isfinite(v) for v in fit(None))
    guard = GradGuard(exploding=ExplodingDetector(max_ratio=5.0))
    losses = fit(guard)
    assert all(math.isfinite(v) for v in losses)
    # Flagged steps clipped to the average norm grow more slowly, so seeds 0 and 1 restart at the rate (no blow-up
    # to cut for) and need a second restart, one cut lower, for the divergence that follows: their losses peak at
    # 1.3e3 and 2.2e3 before it (1.1e2 and 1.3e2 when clipped to twice the average).
    assert max(losses) < 1e4 and max(losses[-20:]) < 10.0  # the predict-1 baseline is 0.167
    events = guard.summary()
    assert events["exploding"] >= 1 and events["lr_reduced"] >= 1


def _one_cycle(total: int) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=total)


def _lambda(total: int) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))


def _cosine(total: int) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=1e-4)


@pytest.mark.parametrize("make_scheduler", [_one_cycle, _lambda, _cosine], ids=["onecycle", "lambda", "cosine"])
def test_lr_guard_leaves_the_schedule_alone_and_scales_it_inside_the_step(tmp_path: Path, make_scheduler: Any) -> None:
    steps, spike, cooldown, recovery = 40, 12, 4, 8

    def fit(spikes: tuple[int, ...], logger: Any = False) -> tuple[LRProbe, GradGuard]:
        torch.manual_seed(0)
        model = Shifting(spikes=spikes, spike=1e4, scheduler=make_scheduler(steps), lr=0.05)
        guard = GradGuard(
            clip=ZClip(warmup_steps=5),  # clips the spike, so the run goes on calmly after it
            lr_guard=LRGuard(factor=0.5, patience=1, cooldown=cooldown, recovery_steps=recovery, memory=False),
            exploding=ExplodingDetector(warmup_steps=5),
            vanishing=None,
        )
        probe = LRProbe(guard)
        _quiet_fit(
            trainer(max_steps=steps, max_epochs=-1, callbacks=[guard, probe], logger=logger, log_every_n_steps=5),
            model,
            regression_data(),
        )
        return probe, guard

    calm, calm_guard = fit(())
    hit, guard = fit((spike,), TensorBoardLogger(tmp_path, name="", version=""))
    assert calm_guard.summary()["exploding"] == 0 and calm.scales == [1.0] * steps
    assert calm.effective == calm.scheduled
    assert guard.summary()["exploding"] == 1 and guard.summary()["lr_reduced"] == 1

    # The scheduler's own sequence is the same as in the run without events, to the last bit.
    assert hit.scheduler_lr == calm.scheduler_lr
    assert hit.scheduled == calm.scheduled
    assert hit.after == calm.after
    assert len(set(calm.scheduled)) > steps // 2  # the schedule really moves

    # Inside optimizer.step: scheduled x multiplier, the multiplier decided after the previous step.
    multipliers = [1.0] + hit.scales[:-1]
    assert hit.effective == pytest.approx([s * m for s, m in zip(hit.scheduled, multipliers)], rel=1e-12)
    assert multipliers[: spike + 1] == [1.0] * (spike + 1)
    held = multipliers[spike + 1 : spike + 2 + cooldown]
    assert held == [0.5] * (cooldown + 1)
    rising = multipliers[spike + 1 + cooldown : spike + 2 + cooldown + recovery]
    assert all(a < b for a, b in zip(rising, rising[1:])) and rising[-1] == 1.0
    assert multipliers[spike + 1 + cooldown + recovery :] == [1.0] * (steps - spike - 1 - cooldown - recovery)

    # Logged on each logging step: the multiplier and the LR that step ran with (as LearningRateMonitor's scheduled
    # rate, logged at the same step), not the next step's, which the scheduler and the LR guard have moved on to.
    scalars = scalar_series(tmp_path)
    logged_scale = dict(scalars["gradguard/lr_scale"])
    logged_lr = dict(scalars["gradguard/lr"])
    # Lightning numbers the n-th optimizer step n - 1: logged at 4, 9, ..., the values of steps 5, 10, ...
    assert sorted(logged_scale) == [n - 1 for n in range(5, steps + 1, 5)]
    for s in logged_scale:
        assert logged_scale[s] == pytest.approx(multipliers[s], rel=1e-6)
        assert logged_lr[s] == pytest.approx(hit.effective[s], rel=1e-6)
    assert min(logged_scale.values()) == 0.5
    reduced = dict(scalars["gradguard/events/lr_reduced"])
    assert reduced[10 - 1] == 0.0 and reduced[steps - 1] == 1.0


class GradNorm(L.Callback):
    """Placed before the guard: the true total gradient norm of the module being trained, per optimizer step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.detach().flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


def test_guard_reused_after_a_fit_stopped_by_an_error(tmp_path: Path) -> None:
    """A fit stopped by ``on_exploding="raise"`` never reaches ``on_train_end``; the next fit must start clean."""
    guard = GradGuard(
        clip=ZClip(warmup_steps=5),
        lr_guard=LRGuard(factor=0.5, patience=1, cooldown=50),
        exploding=ExplodingDetector(warmup_steps=5),
        vanishing=None,
        on_exploding="raise",
    )
    torch.manual_seed(0)
    first = Shifting(spikes=(10,), lr=0.05)
    first_trainer = trainer(
        max_steps=30,
        max_epochs=-1,
        callbacks=[guard],
        log_every_n_steps=4,
        logger=TensorBoardLogger(tmp_path / "a", name="", version=""),
    )
    # The spike is in batch 10, i.e. the 11th optimizer step: Lightning's step 10.
    with pytest.raises(GradientExplosionError, match="step 10"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first_trainer.fit(first, regression_data())
    assert guard.lr_guard.scale(0) == 0.5
    # Written when the run stopped; what would have answered the spike later (the LR guard's next cut) is moot.
    (exploding,) = [str(w.message) for w in caught if "exploding gradients in layer" in str(w.message)]
    assert "guarded by: on_exploding='raise' stops the run." in exploding

    # The stopped run's optimizer no longer carries the guard's LR hooks.
    old = first_trainer.optimizers[0]
    seen: list[float] = []
    old.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    old.step()
    assert seen == [0.05]

    # The same model again, with a new Trainer (and so a new optimizer): training goes on where it stopped.
    probe = LRProbe(guard)
    norms = GradNorm()
    _quiet_fit(
        trainer(
            max_steps=8,
            max_epochs=-1,
            callbacks=[norms, guard, probe],
            log_every_n_steps=4,
            logger=TensorBoardLogger(tmp_path / "b", name="", version=""),
        ),
        first,
        regression_data(),
    )
    # The lowered multiplier carries over (the same model's run goes on) and reaches the new optimizer.
    assert probe.effective[:3] == [0.025] * 3
    # The new run logs on its own cadence, with saturation, into its own directory only.
    new = scalar_series(tmp_path / "b")
    logged = [n - 1 for n in (4, 8)]  # Lightning's steps of the 4th and 8th optimizer steps
    assert [s for s, _ in new["gradguard/total_norm"]] == logged
    assert [s for s, _ in new["gradguard/saturation/net.1"]] == logged
    assert [s for s, _ in new["gradguard/layer/net.0"]] == logged
    # The stopped run's directory: its own logs, then the steps up to the error, written when it stopped.
    assert [s for s, _ in scalar_series(tmp_path / "a")["gradguard/layer/net.0"]] == [*logged, 10]
    # It measures the new optimizer's gradients, not the stopped run's.
    assert dict(new["gradguard/total_norm"])[logged[-1]] == pytest.approx(norms.norms[-1], rel=1e-5)


class _Refitted(Shifting):
    """``Shifting`` whose second fit may lay its parameters out in two groups, under a plateau schedule that halves
    the rate every epoch (a rate moved within a fit, which a resume brings back: no change of rate)."""

    def __init__(self, warm: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = 1
        self.warm = warm  # a warm-up from 0 over 5 steps instead (its `lr` is 0 when the fit starts)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("plateau", 1.0)  # never improves
        return loss

    def configure_optimizers(self) -> Any:
        first, rest = list(self.net[0].parameters()), [p for m in list(self.net)[1:] for p in m.parameters()]
        groups = [{"params": first + rest}] if self.groups == 1 else [{"params": first}, {"params": rest}]
        optimizer = torch.optim.SGD(groups, lr=self.lr)
        if self.warm:
            warm_up = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 5))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warm_up, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "plateau"}}


@pytest.mark.parametrize("change", ["none", "rate", "regrouped", "resumed", "warmed up"])
def test_the_same_model_fitted_again_at_another_rate_drops_the_cut(
    change: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A rate set anew between two fits (by hand, or by `Tuner.lr_find`): the first fit's cut to 0.5x of 3.0 went on
    halving a rate 2500x lower. The same rates again, or a resume (whose checkpoint brings back the rate the plateau
    schedule had lowered), go on where they stopped."""
    guard = GradGuard(
        clip=ZClip(warmup_steps=5),
        lr_guard=LRGuard(factor=0.5, patience=1, cooldown=50),
        exploding=ExplodingDetector(warmup_steps=5),
        vanishing=None,
    )
    torch.manual_seed(0)
    model = _Refitted(spikes=(10,), lr=0.05, warm=change == "warmed up")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = trainer(max_epochs=3, callbacks=[guard, checkpoint], enable_checkpointing=True)
    _quiet_fit(first, model, regression_data())  # 48 steps; the plateau schedule halves the rate from epoch 2 on
    assert guard.lr_guard is not None and guard.lr_guard.scale(0) == 0.5
    if change in ("rate", "regrouped", "warmed up"):
        model.lr = 0.01
    model.groups = 2 if change == "regrouped" else 1
    model.spikes = ()
    probe = LRProbe(guard)
    resume = {"ckpt_path": tmp_path / "last.ckpt"} if change == "resumed" else {}
    with caplog.at_level(logging.INFO):
        _quiet_fit(trainer(max_epochs=4, callbacks=[guard, probe]), model, regression_data(), **resume)
    notes = [r.getMessage() for r in caplog.records if "changed since the last fit" in r.getMessage()]
    if change == "none":
        assert probe.effective[0] == 0.025 and not notes
    elif change == "resumed":
        # The checkpoint's rate, once halved by the plateau schedule, times the cut it restored.
        assert probe.scheduled[0] == 0.025 and probe.effective[0] == 0.0125 and not notes
        # Fitted again (no checkpoint) at the rate `configure_optimizers` gives, as before the resume: no change,
        # though the resumed fit trained at the rate the plateau schedule had lowered.
        with caplog.at_level(logging.INFO):
            _quiet_fit(trainer(max_epochs=5, callbacks=[guard]), model, regression_data())
        assert not [r for r in caplog.records if "changed since the last fit" in r.getMessage()]
        assert guard.lr_guard.scale(0) < 1.0  # recovering from the cut, not dropped
    else:
        # Compared by the schedule's base: a warm-up from 0 has its `lr` at 0 when the fit starts (it went unnoticed).
        assert probe.effective[5 if change == "warmed up" else 0] == 0.01 and guard.lr_guard.scale(0) == 1.0
        rates = "0.01, 0.01" if change == "regrouped" else "0.01"
        assert notes == [
            f"GradGuard: optimizer 0's learning rate changed since the last fit (0.05 -> {rates}): what the guard"
            " found at the old rate starts afresh (its 0.5x multiplier)."
        ]
    assert guard.summary()["lr_reduced"] == 1  # the counts are the guard's, over both fits


@pytest.mark.parametrize("change", ["none", "by hand", "finder"])
def test_the_same_model_fitted_again_at_another_rate_drops_the_rescue(
    change: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The default's rescue (AGC from a restart) answered SGD at 10.0; at a rate set anew it has nothing to answer.
    A `LearningRateFinder` callback (which Lightning runs first, wherever it is listed) sets the rate in its
    `on_fit_start` and restores a checkpoint of its own: that fit was taken for a resume, and the new rate went unseen
    (the rescue clipped a user trial's refit at a 10^4x lower rate, +21% held-out)."""
    torch.manual_seed(0)
    model, guard = Regressor(lr=10.0), GradGuard()
    _quiet_fit(trainer(max_steps=40, max_epochs=-1, callbacks=[guard]), model, regression_data())
    assert guard.rescuing()
    caplog.clear()
    callbacks: list[Any] = [guard]
    if change == "by hand":
        model.lr = 0.01
    elif change != "none":
        finder = LearningRateFinder(min_lr=1e-3, max_lr=1e-2, num_training_steps=20, early_stop_threshold=None)
        callbacks = [guard, finder]
    rates: list[float] = []

    class Rate(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    with caplog.at_level(logging.INFO):
        _quiet_fit(
            trainer(max_steps=5, max_epochs=-1, callbacks=[*callbacks, Rate()], default_root_dir=tmp_path),
            model,
            regression_data(),
        )
    if change == "finder" and rates == [10.0]:
        pytest.skip(
            "this Lightning's LearningRateFinder callback sets the module's `lr` only: its checkpoint restore gives"
            " the optimizer its old rate back, so the fit trains at 10.0 and the rescue rightly stays"
        )
    notes = [r.getMessage() for r in caplog.records if "changed since the last fit" in r.getMessage()]
    assert guard.rescuing() is (change == "none")
    assert notes == (
        []
        if change == "none"
        else [
            f"GradGuard: optimizer 0's learning rate changed since the last fit (10 -> {model.lr:.3g}): what the guard"
            " found at the old rate starts afresh (the rescue clipping)."
        ]
    )
    assert change == "none" or model.lr < 0.1
    # The refit's own line says the rescue goes on; the first fit's restart line, said again, read as a new restart.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GradGuard: AGC(")]
    assert lines == (
        [
            "GradGuard: AGC(clip_factor=0.01, eps=0.001, exclude=None, exclude_types=()) still clips the"
            " gradients unit-wise, as it has since an earlier fit of this model restarted it (see that fit's last"
            " line)."
        ]
        if change == "none"
        else []
    )
    assert not [r for r in caplog.records if "early and the run restarted" in r.getMessage()]


def test_guard_reused_for_a_new_model_starts_afresh() -> None:
    """A sweep or a notebook reusing one GradGuard: a new LightningModule starts with fresh statistics, counts, rate
    multiplier and early-restart window (before, a first run's 25 steps had closed the second model's window, so a
    rate that diverged from the start was never rescued, and a cut of the first run lowered the second's rate)."""

    def fit(guard: GradGuard, model: Shifting, steps: int) -> LRProbe:
        probe = LRProbe(guard)
        _quiet_fit(trainer(max_steps=steps, max_epochs=-1, callbacks=[guard, probe]), model, regression_data())
        return probe

    reused = _counting()
    torch.manual_seed(0)
    fit(reused, Shifting(spikes=(30, 32), lr=0.05), 40)  # two spikes within the cooldown: one cut
    assert reused.summary()["lr_reduced"] == 1 and reused.lr_guard.scale(0) < 1.0

    results = []
    for guard in (reused, _counting()):
        torch.manual_seed(1)
        model = Shifting(lr=3.0)  # diverges from its first steps: restarted and rescued
        probe = fit(guard, model, 60)
        results.append((guard.summary(), guard.rescuing(0), probe.effective, [p.detach() for p in model.parameters()]))
    (reused_summary, reused_rescuing, reused_rates, reused_params), fresh = results
    assert reused_summary == fresh[0] and reused_summary["rolled_back"] == 1
    assert reused_rescuing and fresh[1]
    assert reused_rates == fresh[2] and reused_rates[0] == 3.0
    for a, b in zip(reused_params, fresh[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_fitted_guard_goes_on_as_the_guard_itself_would(how: str) -> None:
    # A copy kept the fit's engines, which watched deep copies of the parameters: used on the same model it measured
    # and clipped copies that never got a gradient (two 10^4x spikes went through). With the default diagnostics the
    # copy failed outright (a lock), and a pickle (`ddp_spawn`) failed on weak references.
    def fit(guard: GradGuard, model: Shifting, steps: int) -> None:
        _quiet_fit(trainer(max_steps=steps, max_epochs=-1, callbacks=[guard]), model, regression_data())

    runs = []
    for copied in (False, True):
        torch.manual_seed(0)
        model, guard = Shifting(spikes=(30, 32), lr=0.05), _counting()
        fit(guard, model, 20)  # calm: the spikes come in the next Trainer's run (its steps count from 0 again)
        if copied:
            guard = copy.deepcopy(guard) if how == "deepcopy" else pickle.loads(pickle.dumps(guard))
        assert guard.summary()["exploding"] == 0
        fit(guard, model, 40)
        runs.append((guard.summary(), guard.lr_guard.scale(0), [p.detach().clone() for p in model.parameters()]))
    (summary, scale, params), (copy_summary, copy_scale, copy_params) = runs
    assert summary["exploding"] >= 1 and summary["lr_reduced"] == 1 and scale < 1.0  # the spikes were caught
    assert copy_summary == summary and copy_scale == scale
    assert all(torch.equal(a, b) for a, b in zip(params, copy_params))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy of a copy"])
def test_a_copy_of_a_fitted_guard_starts_afresh_on_another_model(how: str) -> None:
    # The copy cannot know the model it was fitted on by identity (a pickle does not keep it): it compares weights.
    # Carried to another model of the same layout, the first model's state had its early restart write the first
    # model's initial weights into the second.
    torch.manual_seed(0)
    first, guard = Shifting(lr=0.05), GradGuard(regularizers=[L2(1e-4)])  # a bound regularizer copies too
    _quiet_fit(trainer(max_steps=3, max_epochs=-1, callbacks=[guard]), first, regression_data())
    if how == "copy of a copy":  # the first copy has not fitted: it passes on the weights it was copied with
        carried = pickle.loads(pickle.dumps(copy.deepcopy(guard)))
    else:
        carried = copy.deepcopy(guard) if how == "deepcopy" else pickle.loads(pickle.dumps(guard))
    assert "log" not in vars(carried)  # Lightning's binding of the model's `log`: the copy holds no model
    torch.manual_seed(1)
    second = Shifting(spikes=(1, 2), lr=0.05)  # early trouble: a plain retry from its own initial weights
    initial = [p.detach().clone() for p in second.parameters()]
    watch = RestartWatch(carried)
    _quiet_fit(trainer(max_steps=6, max_epochs=-1, callbacks=[carried, watch]), second, regression_data())
    assert [clean for _, clean in watch.restarts] == [True]  # back at the second model's initial weights
    assert all(torch.equal(a, b) for a, b in zip(watch.initial, initial)) and carried.summary()["rolled_back"] == 1
    assert carried.regularizers[0].param_names == ["net.0.weight", "net.2.weight"]  # bound to the second model


def test_the_weights_a_copy_compares_a_model_by() -> None:
    from lightning_gradguard.callback import _fingerprint, _same_weights

    torch.manual_seed(0)
    model, other = Regressor(), Regressor()
    with torch.no_grad():
        model.net[0].weight[0, 0] = math.nan  # a diverged model is still the same model
    assert _same_weights(_fingerprint(model), _fingerprint(model))
    assert not _same_weights(_fingerprint(model), _fingerprint(other))
    with torch.device("meta"):
        assert _fingerprint(Regressor()) is None  # nothing to compare: no check


def test_a_guard_reused_with_a_new_trainer_writes_histograms_on_its_schedule(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=5)
    model = Regressor()
    for run in ("a", "b"):
        logger = TensorBoardLogger(tmp_path / run, name="", version="")
        _quiet_fit(
            trainer(max_steps=12, callbacks=[guard], logger=logger, log_every_n_steps=5), model, regression_data()
        )
    steps = [
        [event.step for event in load_events(tmp_path / run).Histograms("gradguard/grad_hist/net.0")] for run in "ab"
    ]
    assert steps[0] == steps[1] == [4, 9]  # the second Trainer counts its steps from 0 again


@pytest.mark.parametrize(
    ("log_every", "hist_every", "first", "resumed"),
    [(1, 5, [4, 9, 14], [9, 14]), (5, 7, [9, 14], [9, 14])],
    ids=["histogram at each multiple", "histogram at the first log past a multiple"],
)
def test_a_resumed_run_writes_histograms_on_the_schedule_it_saved_with(
    log_every: int, hist_every: int, first: list[int], resumed: list[int], tmp_path: Path
) -> None:
    # A resumed run counted its histograms from 0 and wrote one at its first log (step 8); then, from the step it
    # resumed at, which skipped a histogram due at the first log past a multiple (every 7 steps, logged every 5: the
    # one at Lightning's step 9, due since step 7, was missing). Saved at an epoch's end (8 batches), where every
    # supported Lightning numbers the resumed steps alike.
    def fit(run: str, ckpt_path: str | None = None) -> list[int]:
        logger = TensorBoardLogger(tmp_path / run, name="", version="")
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
        callbacks = [GradGuard(histogram_every_n_steps=hist_every), saver]
        torch.manual_seed(0)
        fit = trainer(
            max_steps=15,
            max_epochs=-1,
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=log_every,
            enable_checkpointing=True,
        )
        _quiet_fit(fit, Regressor(), regression_data(n=128), ckpt_path=ckpt_path)
        return [event.step for event in load_events(tmp_path / run).Histograms("gradguard/grad_hist/net.0")]

    assert fit("a") == first
    # A new guard and Trainer from the checkpoint: the uninterrupted run's histograms after that step.
    assert fit("b", ckpt_path=str(tmp_path / "ckpt" / "step=8.ckpt")) == resumed


def test_a_finished_fit_leaves_its_module_trainer_and_optimizer_to_the_garbage_collector() -> None:
    # Lightning binds the module's `log` to every callback: kept by the guard, the module held the Trainer and the
    # optimizer with its state (Adam: twice the parameters) for as long as the guard lived.
    import gc
    import weakref

    torch.manual_seed(0)
    guard, model = GradGuard(), Regressor(optimizer="adam")
    fit = trainer(max_steps=5, callbacks=[guard])
    _quiet_fit(fit, model, regression_data())
    optimizer = fit.optimizers[0]
    module, state = weakref.ref(model), weakref.ref(optimizer.state[model.net[0].weight]["exp_avg"])
    del fit, model, optimizer
    gc.collect()
    assert module() is None and state() is None
    assert guard.summary()["exploding"] == 0  # the guard itself goes on


def test_a_param_group_added_between_two_logs_keeps_the_windows_record(tmp_path: Path) -> None:
    # The engine rebuilt for the new group started a blank window: the spike of step 16 was counted but had no
    # trouble point, no table row, no warning, and the window's maximum read 6.8 instead of 2.9e4.
    torch.manual_seed(0)
    guard = GradGuard()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit = trainer(max_epochs=-1, max_steps=20, callbacks=[guard, AddGroup(at=19)], logger=logger)
    messages = _quiet_fit(fit, Shifting(spikes=(16,), lr=0.01), regression_data())
    assert any("exploding gradients in layer" in m and "at step 16" in m for m in messages)
    scalars = scalar_series(tmp_path)
    assert dict(scalars["gradguard/total_norm_max"])[19] > 1e3
    assert [step for step, _ in scalars["gradguard/trouble/exploding/net.2"]] == [16]
    assert "net.2.gate" in guard._states[0].index.param_names  # the engine was rebuilt


def test_a_run_resumed_between_two_logs_logs_that_window_as_the_uninterrupted_run(tmp_path: Path) -> None:
    # The window since the last log was not in the checkpoint: the resumed run's first log read a calm maximum and
    # lost the spikes' trouble points and table rows, and the cut's row (a host-side row not yet written) too. Saved
    # at an epoch's end (8 batches, step 8), before the first log (step 9): the spikes at steps 4 and 7 and the cut they
    # bring are in the window the checkpoint holds.
    def fit(run: str, ckpt_path: str | None = None) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
        torch.manual_seed(0)
        logger = TensorBoardLogger(tmp_path / run, name="", version="")
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
        callbacks = [_counting(), saver] if ckpt_path is None else [_counting()]
        fit = trainer(
            max_steps=10,
            max_epochs=-1,
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=10,
            enable_checkpointing=True,
        )
        _quiet_fit(fit, Shifting(spikes=(4, 7), lr=0.01), regression_data(n=128), ckpt_path=ckpt_path)
        events = load_events(tmp_path / run)
        table = events.Tensors("gradguard/events_log/text_summary")[-1].tensor_proto.string_val[0].decode()
        series = scalar_series(tmp_path / run)
        tags = [tag for tag in series if tag.startswith(("gradguard/total_norm_max", "gradguard/trouble/"))]
        return table.splitlines()[2:], {tag: series[tag] for tag in tags}

    rows, scalars = fit("whole")
    assert any("lr_reduced" in row for row in rows) and scalars["gradguard/total_norm_max"][0][1] > 1e3
    assert fit("resumed", ckpt_path=str(tmp_path / "ckpt" / "step=8.ckpt")) == (rows, scalars)


class CrashesAt(Shifting):
    """``Shifting`` whose ``training_step`` raises at optimizer step ``crash`` (counted from 0, as ``global_step``)."""

    def __init__(self, crash: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crash = crash

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.crash:
            raise RuntimeError("a bad record")
        return super().training_step(batch, batch_idx)


def test_a_fit_stopped_by_an_error_writes_its_last_steps_and_the_next_fit_does_not_report_them(
    tmp_path: Path,
) -> None:
    # The steps since the last log were neither written nor warned about, and the same guard's next fit reported
    # them as its own: a warning and a trouble point at the old step, the old maximum in its first row.
    torch.manual_seed(0)
    guard, model = GradGuard(), CrashesAt(crash=23, spikes=(22,), lr=0.01)
    run = dict(max_epochs=-1, max_steps=40, callbacks=[guard], log_every_n_steps=5)
    with pytest.raises(RuntimeError, match="a bad record"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(logger=TensorBoardLogger(tmp_path / "a", name="", version=""), **run).fit(model, regression_data())
    assert any("exploding gradients" in str(w.message) and "at step 22" in str(w.message) for w in caught)
    first = load_events(tmp_path / "a")
    assert [e.step for e in first.Scalars("gradguard/trouble/exploding/net.0")] == [22]
    assert [e.step for e in first.Scalars("gradguard/total_norm_max")][-1] == 22

    model.crash, model.spikes = None, ()
    messages = _quiet_fit(
        trainer(logger=TensorBoardLogger(tmp_path / "b", name="", version=""), **run), model, regression_data()
    )
    assert not any("exploding" in m for m in messages)
    second = load_events(tmp_path / "b")
    assert "gradguard/trouble/exploding/net.0" not in second.Tags()["scalars"]
    assert max(e.value for e in second.Scalars("gradguard/total_norm_max")) < 100
    assert guard.summary()["exploding"] == 1  # the counts go on


def test_a_fit_stopped_by_an_error_under_warnings_as_errors_still_raises_that_error() -> None:
    # Under `-W error` the window written at the stop warns of the spike, which raised from `on_exception`: the
    # user's error came two levels down the context chain, and the LR hooks and the lent clipping stayed in place.
    torch.manual_seed(0)
    guard, model = GradGuard(), CrashesAt(crash=23, spikes=(22,), lr=0.01)
    fit = trainer(max_epochs=-1, max_steps=40, callbacks=[guard], log_every_n_steps=5)
    with pytest.raises(RuntimeError, match="a bad record") as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message="GradGuard")
        fit.fit(model, regression_data())
    assert raised.value.__context__ is None
    assert not guard._lr_hooks and not guard._step_hooks


def test_events_of_a_fit_without_tensorboard_stay_out_of_the_next_fits_board(tmp_path: Path) -> None:
    # With no TensorBoardLogger the events table's rows were never taken: the next fit with one wrote them (and their
    # trouble points) into its own directory.
    torch.manual_seed(0)
    guard, model = _counting(), Shifting(spikes=(20, 24), lr=0.01)
    _quiet_fit(trainer(max_epochs=-1, max_steps=30, callbacks=[guard], log_every_n_steps=5), model, regression_data())
    assert guard.summary()["exploding"] >= 1 and guard.summary()["lr_reduced"] == 1
    model.spikes = ()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit = trainer(max_epochs=-1, max_steps=20, callbacks=[guard], logger=logger, log_every_n_steps=5)
    _quiet_fit(fit, model, regression_data())
    tags = load_events(tmp_path).Tags()
    assert "gradguard/events_log/text_summary" not in tags["tensors"]
    assert not [tag for tag in tags["scalars"] if tag.startswith("gradguard/trouble/")]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_a_checkpoint_leaves_the_guards_training_state_alone(stage: str, tmp_path: Path) -> None:
    # Lightning restores callback states in validate/test/predict(ckpt_path=...) too: GradGuard took them, so
    # evaluating an early checkpoint after a fit rewound its counts and rate, and evaluating one before a fresh fit
    # started that fit at the checkpoint's lowered rate and step count.
    torch.manual_seed(0)

    class Evaluated(Shifting):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.validation_step(batch, batch_idx)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

    guard = _counting()
    model = Evaluated(spikes=(20, 24), lr=0.01)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    fitted = trainer(max_epochs=-1, max_steps=30, callbacks=[guard, saver], enable_checkpointing=True)
    _quiet_fit(fitted, model, regression_data())
    early = str(tmp_path / "epoch=0-step=10.ckpt")  # saved before either spike
    assert guard.summary()["lr_reduced"] == 1 and guard.lr_guard is not None
    before = (guard.summary(), guard.lr_guard.scale(), guard._states[0].steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(fitted, stage)(model, regression_data(n=64), ckpt_path=early)
    assert (guard.summary(), guard.lr_guard.scale(), guard._states[0].steps) == before

    fresh = _counting()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(trainer(callbacks=[fresh]), stage)(
            Evaluated(), regression_data(n=64), ckpt_path=str(next(tmp_path.glob("*step=30.ckpt")))
        )
    _quiet_fit(trainer(max_steps=12, callbacks=[fresh]), Evaluated(lr=0.01), regression_data())
    assert fresh.lr_guard is not None and fresh.lr_guard.scale() == 1.0
    assert fresh._states[0].steps == 12 and fresh.summary()["exploding"] == 0


def test_logged_lr_is_the_rate_each_logged_step_ran_with() -> None:
    # Lightning steps a per-step scheduler before the batch's log is written, and the LR guard's multiplier moves on
    # after a cut: read then, `gradguard/lr` was the next step's rate (2x off after a StepLR halving).
    torch.manual_seed(0)
    model = Shifting(
        spikes=(12, 14), lr=0.05, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    )
    guard, logger = _counting(), MetricsLogger()
    probe = LRProbe(guard)
    _quiet_fit(
        trainer(max_steps=30, max_epochs=-1, callbacks=[guard, probe], logger=logger, log_every_n_steps=1),
        model,
        regression_data(),
    )
    assert guard.summary()["lr_reduced"] == 1  # the multiplier changes inside the run too
    assert logger.series("gradguard/lr") == pytest.approx(probe.effective, rel=1e-6)
    assert len(probe.effective) == 30


# ---------------------------------------------------------------------------------------------- regularizers


class SequenceRegressor(Shifting):
    """An LSTM reading a short sequence, then a linear head."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(net=nn.Linear(8, 1), **kwargs)
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.net(out[:, -1])


class SpectralNet(nn.Module):
    """A complex weight mixing the inputs (as in a Fourier layer), then a real head on its real and imaginary parts."""

    def __init__(self, dim: int = 16, width: int = 8) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(dim, width, dtype=torch.cfloat) / dim**0.5)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.view_as_real(x.to(torch.cfloat) @ self.mix).flatten(1))


def _sequence_data(n: int = 128, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 4, generator=g)
    y = x.sum(dim=(1, 2)).unsqueeze(1) / 5.0
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _final_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize(
    "case",
    ["fp32", "16-mixed", "16-mixed-fused", "accumulate", "orthogonal-lstm", "complex", "lazy"],
)
def test_gradient_terms_equal_penalties_added_to_the_loss(case: str) -> None:
    def regs() -> list[Regularizer]:
        if case == "orthogonal-lstm":
            return [Orthogonal(1e-2, modules=r"lstm\.weight_hh"), L2(1e-2)]
        if case in ("complex", "lazy"):
            return [Orthogonal(1e-2), L2(1e-2), L1(1e-3)]
        return [L2(1e-2), L1(1e-3)]

    def make(penalties: list[Regularizer] | None) -> Shifting:
        torch.manual_seed(0)
        if case == "orthogonal-lstm":
            return SequenceRegressor(penalties=penalties, lr=0.1, optimizer="sgd")
        if case == "complex":
            return Shifting(net=SpectralNet(), penalties=penalties, lr=0.05)
        if case == "lazy":  # parameters created by the first forward pass, after the fit has started
            return Shifting(net=nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.LazyLinear(1)), penalties=penalties)
        if case == "16-mixed-fused":
            return Shifting(penalties=penalties, lr=1e-2, optimizer="adam-fused")
        return Shifting(penalties=penalties, lr=0.05)

    data = _sequence_data() if case == "orthogonal-lstm" else regression_data()
    steps = 12

    def fit(model: Shifting, callbacks: list[L.Callback]) -> dict[str, torch.Tensor]:
        extra: dict[str, Any] = {}
        if case.startswith("16-mixed"):
            # On the CPU `precision="16-mixed"` silently becomes bf16: ask for fp16 with a GradScaler explicitly.
            # A fresh scaler per run: its loss scale is state (the first step overflows and is skipped in both).
            extra = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
        elif case == "accumulate":
            extra = {"accumulate_grad_batches": 2}
        _quiet_fit(trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks, **extra), model, data)
        return _final_params(model)

    start = _final_params(make(None)) if case != "lazy" else None
    guard = GradGuard(clip=None, lr_guard=None, regularizers=regs(), exploding=None, vanishing=None)
    a = fit(make(None), [guard])
    b = fit(make(regs()), [])
    plain = fit(make(None), [])
    tol = 1e-5 if case.startswith("16-mixed") else 1e-6
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    # The penalties matter: without them the parameters end up elsewhere.
    moved = max((a[k] - plain[k]).abs().max().item() for k in a)
    assert moved > 100 * tol
    assert start is None or any((a[k] - start[k]).abs().max().item() > 0 for k in a)


class TwoPlayers(L.LightningModule):
    """Manual optimization with two optimizers on disjoint parameters (as in a GAN), each stepped after its own loss,
    zeroing its gradients after the step; ``penalized`` adds ``L2(0.1)`` and ``L1(0.01)`` of the stepping player's
    weight to its loss (the reference for GradGuard's terms)."""

    def __init__(self, penalized: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 1)
        self.penalized = penalized

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for optimizer, player in zip(self.optimizers(), (self.first, self.second)):
            self.toggle_optimizer(optimizer)
            loss = nn.functional.mse_loss(self.second(torch.tanh(self.first(x))), y)
            if self.penalized:
                loss = loss + 0.05 * player.weight.square().sum() + 0.01 * player.weight.abs().sum()
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            self.untoggle_optimizer(optimizer)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)


def test_each_optimizer_gets_the_penalty_terms_of_its_own_parameters() -> None:
    # Every optimizer's step used to add every selected parameter's term: the other player's parameters got a
    # gradient while it was not stepping, which its own step then counted a second time.
    def fit(penalized: bool, callbacks: list[L.Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TwoPlayers(penalized)
        _quiet_fit(trainer(max_steps=30, max_epochs=-1, callbacks=callbacks), model, regression_data(dim=8))
        return _final_params(model)

    guard = GradGuard(clip=None, lr_guard=None, exploding=None, vanishing=None, regularizers=[L2(0.1), L1(1e-2)])
    a = fit(False, [guard])
    b = fit(True, [])
    plain = fit(False, [])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert max((a[k] - plain[k]).abs().max().item() for k in a) > 1e-3


def test_orthogonal_penalty_drives_lstm_gate_blocks_orthogonal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceRegressor(lr=0.05, optimizer="adam")
    reg = Orthogonal(0.1, modules=r"lstm\.weight_hh")
    guard = GradGuard(clip=None, lr_guard=None, regularizers=[reg], exploding=None, vanishing=None)
    hidden = 8

    def gate_error() -> float:
        w = model.lstm.weight_hh_l0.detach().reshape(4, hidden, hidden)
        return (w.mT @ w - torch.eye(hidden)).norm(dim=(1, 2)).max().item()

    before = gate_error()
    initial = reg.penalty(model).item()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _quiet_fit(
        trainer(max_steps=60, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=10),
        model,
        _sequence_data(),
    )
    logged = [v for _, v in scalar_series(tmp_path)["gradguard/reg/orthogonal"]]
    assert len(logged) == 6
    assert logged[0] < initial
    assert logged[-1] < 0.02 * initial
    assert gate_error() < 0.2 * before
    # The logged value is the penalty of the weights at that step, times the weight.
    assert logged[-1] == pytest.approx(reg.penalty(model).item(), rel=1e-5)


def test_l1_makes_weights_sparse_in_fit() -> None:
    torch.manual_seed(0)
    model = Shifting(net=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), lr=0.05)
    guard = GradGuard(clip=None, lr_guard=None, regularizers=[L1(2e-2)], exploding=None, vanishing=None)

    def near_zero() -> float:
        w = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()]).detach()
        return (w.abs() < 2e-3).float().mean().item()  # SGD on |w| hovers within lr * weight = 1e-3 of zero

    before = near_zero()
    _quiet_fit(trainer(max_steps=150, max_epochs=-1, callbacks=[guard]), model, regression_data())
    assert before < 0.05
    assert near_zero() > 0.3

    torch.manual_seed(0)  # the same run without the penalty stays dense
    model = Shifting(net=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), lr=0.05)
    _quiet_fit(trainer(max_steps=150, max_epochs=-1), model, regression_data())
    assert near_zero() < 0.05


# ---------------------------------------------------------------------------------------------- saturation


def _saturated_sigmoid_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(16, 32),
        nn.Sigmoid(),  # huge weights: pre-activations far out on both sides
        nn.Linear(32, 32),
        nn.Sigmoid(),  # huge bias: stuck at 1
        nn.Linear(32, 32),
        nn.Sigmoid(),  # tiny weights: near 0.5, healthy
        nn.Linear(32, 1),
    )
    with torch.no_grad():
        net[0].weight.mul_(200.0)
        net[2].bias.fill_(20.0)
        net[4].weight.mul_(0.01)
    return net


def _dead_relu_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        net[2].bias.fill_(-100.0)  # every unit of the second ReLU is dead
    return net


@pytest.mark.parametrize(
    ("make_net", "expected"),
    [
        (_saturated_sigmoid_net, {"net.1": (0.9, 1.0), "net.3": (0.9, 1.0), "net.5": (0.0, 0.1)}),
        (_dead_relu_net, {"net.1": (0.2, 0.8), "net.3": (0.999, 1.0)}),
    ],
    ids=["sigmoid", "relu"],
)
def test_saturation_is_logged_per_activation(tmp_path: Path, make_net: Any, expected: dict) -> None:
    torch.manual_seed(0)
    model = Shifting(net=make_net(), lr=1e-3)
    guard = GradGuard(lr_guard=None, exploding=None, vanishing=None)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _quiet_fit(
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5),
        model,
        regression_data(),
    )
    scalars = scalar_series(tmp_path)
    prefix = "gradguard/saturation/"
    logged = {tag[len(prefix) :]: series for tag, series in scalars.items() if tag.startswith(prefix)}
    assert set(logged) == set(expected)
    for name, (low, high) in expected.items():
        assert [step for step, _ in logged[name]] == [5 - 1, 10 - 1]  # Lightning's steps of steps 5 and 10
        assert all(low <= value <= high for _, value in logged[name]), (name, logged[name])


def test_vanishing_warning_names_the_saturated_activations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        linear = nn.Linear(16, 16)
        with torch.no_grad():
            linear.bias.fill_(12.0)  # every sigmoid pinned at 1: almost no gradient reaches the early layers
        layers += [linear, nn.Sigmoid()]
    model = Shifting(net=nn.Sequential(*layers, nn.Linear(16, 1)), lr=1e-3)
    guard = GradGuard(lr_guard=None, clip=None, exploding=None, vanishing=VanishingDetector(patience=3))
    messages = _quiet_fit(
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], log_every_n_steps=5), model, regression_data()
    )
    vanishing = [m for m in messages if "vanishing gradients" in m]
    assert vanishing, messages
    assert guard.summary()["vanishing"] >= 1
    first = vanishing[0]
    assert "layer 'net.0'" in first
    assert "Most saturated activations upstream" in first
    assert "'net.1' (100% saturated)" in first
    assert "non-saturating activations" in first  # the suggested fix


class _ClampedScale(Regressor):
    """A learnable output scale clamped at 1 from its start at 2 (CLIP's logit scale at its bound): its gradient is
    exactly zero on every step, while most outputs of the ReLU before it are 0."""

    def __init__(self) -> None:
        super().__init__(net=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
        with torch.no_grad():
            self.net[0].bias.fill_(-0.5)  # most ReLU outputs at 0
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale.clamp(max=1.0)


def test_a_vanishing_warning_for_an_exactly_zero_gradient_says_so_not_what_saturates() -> None:
    # Before: "Most saturated activations upstream: 'net.1' (78% saturated). A ReLU unit ... is dead ... lower the
    # learning rate", for a parameter no activation stands between (and 78% is no dead layer).
    torch.manual_seed(0)
    guard = GradGuard(vanishing=VanishingDetector(patience=3))
    messages = _quiet_fit(
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], log_every_n_steps=5), _ClampedScale(), regression_data()
    )
    (vanishing,) = [m for m in messages if "vanishing gradients" in m]
    assert "'scale'" in vanishing and "norm 0" in vanishing
    assert "exactly zero" in vanishing and "clamped" in vanishing
    assert "Most saturated" not in vanishing and "ReLU" not in vanishing
    # An activation called as a function (dead on every input, in a quantization-aware MLP) is not watched: said.
    assert "Activations called as functions (`F.relu` in `forward`) are not watched" in vanishing
    # Without the saturation monitor, no activation is watched: said so, not "no watched activation is saturated".
    torch.manual_seed(0)
    guard = GradGuard(vanishing=VanishingDetector(patience=3), saturation=False)
    messages = _quiet_fit(
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], log_every_n_steps=5), _ClampedScale(), regression_data()
    )
    (vanishing,) = [m for m in messages if "vanishing gradients" in m]
    assert "exactly zero" in vanishing and "watched activation" not in vanishing
    assert "Activations are not watched (`saturation=False`)" in vanishing


class _MetMargin(Regressor):
    """A hinge loss whose margin every example meets: the loss, and every gradient, exactly 0 (a converged triplet
    loss with SGD was 0 on 26 and 52 batches in a row)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return torch.relu(0.5 - (self(x).abs() + 1.0)).mean()


def test_a_vanishing_warning_for_an_all_zero_loss_names_a_met_margin() -> None:
    guard = GradGuard(vanishing=VanishingDetector(patience=3))
    messages = _quiet_fit(
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], log_every_n_steps=5), _MetMargin(), regression_data()
    )
    (vanishing, *_) = [m for m in messages if "vanishing gradients" in m]
    assert "exactly zero" in vanishing and "a loss that is exactly 0 on these batches" in vanishing
    assert guard.summary()["exploding"] == 0 and guard.summary()["diverging"] == 0


class _AuxLater(Regressor):
    """An auxiliary head whose loss term a schedule weights 0 for the first steps (user trial: weighted 0 until step
    200, then ramped up): its gradient is exactly zero until the term is switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        weight = 0.0 if self.global_step < 50 else 1.0
        return nn.functional.mse_loss(self(x), y) + weight * nn.functional.mse_loss(self.aux_head(x), y)


def test_a_vanishing_warning_for_a_loss_term_weighted_0_by_a_schedule_names_it() -> None:
    guard = GradGuard(vanishing=VanishingDetector(patience=3))
    messages = _quiet_fit(trainer(max_steps=10, max_epochs=-1, callbacks=[guard]), _AuxLater(), regression_data())
    (vanishing, *_) = [m for m in messages if "vanishing gradients" in m]
    assert "'aux_head'" in vanishing and "exactly zero" in vanishing
    assert "a loss term weighted 0 for now by a schedule" in vanishing


# ---------------------------------------------------------------------------------------------- checkpoints


class StartProbe(L.Callback):
    """Placed after the guard: what the guard holds when training (re)starts."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen = {
            "scale": self.guard.lr_guard.scale(0),
            "lr_guard": self.guard.lr_guard.state_dict(),
            "strength": self.guard.regularizers[0].strength,
            "summary": self.guard.summary(),
            "global_step": trainer.global_step,
        }


def test_checkpoint_resume_keeps_lr_multiplier_cooldown_and_strength(tmp_path: Path) -> None:
    def make_guard() -> GradGuard:
        return GradGuard(
            clip=ZClip(warmup_steps=5),
            lr_guard=LRGuard(factor=0.5, patience=1, cooldown=8, recovery_steps=10),
            regularizers=[L2(1e-4, adaptive=True, decay=0.9)],
            exploding=ExplodingDetector(warmup_steps=5),
            vanishing=None,
        )

    def model() -> Shifting:
        torch.manual_seed(0)
        return Shifting(spikes=(14,), spike=1e4, lr=0.05)

    guard = make_guard()
    probe = LRProbe(guard)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=18, save_top_k=0)
    _quiet_fit(
        trainer(max_steps=18, max_epochs=-1, callbacks=[guard, probe, ckpt], enable_checkpointing=True),
        model(),
        regression_data(),
    )
    assert guard.summary()["lr_reduced"] == 1
    saved_scale = guard.lr_guard.scale(0)
    saved_lr_state = guard.lr_guard.state_dict()
    saved_strength = guard.regularizers[0].strength
    assert saved_scale == 0.5  # still in the hold: 3 calm steps after the event at step 14
    assert saved_lr_state["keys"]["0"]["calm"] == 3
    assert saved_strength > 1.0

    path = tmp_path / "last.ckpt"
    state = torch.load(path, weights_only=True)["callbacks"][guard.state_key]
    assert state["lr_guard"] == saved_lr_state
    assert state["regularizers"]["l2"] == {"strength": saved_strength}

    resumed = make_guard()
    start = StartProbe(resumed)
    after = LRProbe(resumed)
    _quiet_fit(
        trainer(max_steps=36, max_epochs=-1, callbacks=[resumed, start, after], default_root_dir=tmp_path),
        model(),
        regression_data(),
        ckpt_path=str(path),
    )
    assert start.seen["global_step"] == 18
    assert start.seen["scale"] == saved_scale
    assert start.seen["lr_guard"] == saved_lr_state
    assert start.seen["strength"] == saved_strength
    assert start.seen["summary"]["lr_reduced"] == 1 and start.seen["summary"]["exploding"] == 1

    # The restored hold continues where it stopped: an uninterrupted run takes the same multipliers.
    straight = make_guard()
    whole = LRProbe(straight)
    _quiet_fit(trainer(max_steps=36, max_epochs=-1, callbacks=[straight, whole]), model(), regression_data())
    assert whole.scales[:18] == probe.scales
    assert after.scales == whole.scales[18:]
    assert after.effective[0] == pytest.approx(0.05 * saved_scale, rel=1e-12)  # the first resumed step is scaled


def _adaptive_fit(tmp_path: Path, model: Shifting, steps: int) -> GradGuard:
    """A fit with an adaptive L2 (4x per exploding step, 0.8 of the excess left per calm step), logged every 4 steps
    to TensorBoard under ``tmp_path``."""
    torch.manual_seed(0)
    reg = L2(1e-3, adaptive=True, adaptive_factor=4.0, decay=0.8)
    guard = GradGuard(
        clip=ZClip(warmup_steps=5), regularizers=[reg], exploding=ExplodingDetector(warmup_steps=5), vanishing=None
    )
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _quiet_fit(
        trainer(max_steps=steps, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=4),
        model,
        regression_data(),
    )
    return guard


def test_adaptive_regularizer_strength_rises_on_explosion_and_decays(tmp_path: Path) -> None:
    torch.manual_seed(0)
    guard = _adaptive_fit(tmp_path, Shifting(spikes=(12,), spike=1e4, lr=0.05), 40)
    assert guard.summary()["exploding"] == 1
    # Keyed by optimizer step: Lightning logs the n-th one at step n - 1.
    strength = {s + 1: v for s, v in scalar_series(tmp_path)["gradguard/reg_strength/l2"]}
    assert [strength[s] for s in (4, 8, 12)] == [1.0, 1.0, 1.0]
    # The spike of step 12 is drained right after that step: 4x, then 0.8 of the excess per calm step (13, 14, 15).
    assert strength[16] == pytest.approx(1.0 + 3.0 * 0.8**3, rel=1e-6)
    later = [strength[s] for s in range(16, 41, 4)]
    assert all(a > b for a, b in zip(later, later[1:]))
    assert later[-1] < 1.01
    penalty = {s + 1: v for s, v in scalar_series(tmp_path)["gradguard/reg/l2"]}
    assert penalty[16] / strength[16] == pytest.approx(penalty[12] / strength[12], rel=0.2)


class NaNAfterSpike(Shifting):
    """Shifting with a non-finite loss at step 13 (``global_step``, as ``spikes``)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == 13 else loss


def test_non_finite_steps_do_not_decay_the_adaptive_strength(tmp_path: Path) -> None:
    """A skipped bad batch is neither an explosion nor a calm step, for the adaptive regularizers as for the LR
    guard: after the spike of step 12 only steps 14 and 15 of 13-15 decay the strength (as in the test above)."""
    torch.manual_seed(0)
    guard = _adaptive_fit(tmp_path, NaNAfterSpike(spikes=(12,), spike=1e4, lr=0.05), 20)
    assert guard.summary()["exploding"] == 1 and guard.summary()["nonfinite"] == 1
    assert guard.summary()["lr_reduced"] == 0
    strength = {s + 1: v for s, v in scalar_series(tmp_path)["gradguard/reg_strength/l2"]}
    assert strength[16] == pytest.approx(1.0 + 3.0 * 0.8**2, rel=1e-6)


class SelfSizedSteps(torch.optim.Optimizer):
    """An optimizer that sizes its own steps and keeps ``lr=None`` in its param groups, as
    ``Adafactor(lr=None, relative_step=True)`` of transformers: every step moves each entry by 1e-3 against the
    sign of its gradient. With ``named=True`` its groups have no ``lr`` key at all: a custom optimizer naming its rate
    otherwise (``step_size``)."""

    def __init__(self, params: Any, named: bool = False) -> None:
        super().__init__(params, {"step_size": 1e-3} if named else {"lr": None})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(1e-3 * p.grad.sign())
        return loss


class SelfSized(Shifting):
    def __init__(self, named: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.named = named

    def configure_optimizers(self) -> Any:
        return SelfSizedSteps(self.parameters(), named=self.named)


@pytest.mark.parametrize("named", [False, True], ids=["lr=None", "no lr key"])
def test_an_optimizer_without_a_learning_rate_gets_no_lr_guard(named: bool, recwarn: pytest.WarningsRecorder) -> None:
    # The LR guard multiplied `None` on its first cut (TypeError), and logging read `float(None)`; an optimizer
    # with no "lr" key died of a KeyError at the first cut.
    torch.manual_seed(0)
    guard = GradGuard(log_every_n_steps=5)
    # Two jumps within the LR guard's cooldown: a cut if it had one.
    model = SelfSized(named=named, spikes=(30, 33), spike=1e4)
    trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(model, regression_data())
    messages = [str(w.message) for w in recwarn.list]
    assert any("has no lr in any param group" in m and "LR guard and the rollback" in m for m in messages)
    exploding = [m for m in messages if "exploding gradients" in m]
    assert exploding and all("guarded by: ZClip clipping." in m for m in exploding)  # no LR guard claimed
    counts = guard.summary()
    assert counts["exploding"] == 2 and counts["lr_reduced"] == counts["rolled_back"] == 0


# ------------------------------------------------------------------------------------ batches whose shapes change
class _Lengthening(L.LightningModule):
    """A GRU over sequences whose length grows in stages (a curriculum), its loss summed over time, so each stage
    lifts the loss by design. ``lengths``: one batch's sequence length per batch (a user trial's setup, shortened)."""

    def __init__(self, lengths: list[int]) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(1, 32, batch_first=True), nn.Linear(32, 1)
        self.lengths = lengths

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return ((self.head(out) - y) ** 2).sum(dim=1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1000)
        batches = []
        for length in self.lengths:
            x = torch.randn(32, length, 1, generator=g)
            y = torch.zeros_like(x)
            y[:, 3:] = x[:, :-3] + 0.5 * x[:, 3:]
            batches.append((x, y))
        return DataLoader(batches, batch_size=None)


def test_a_curriculum_that_changes_the_batches_shapes_is_no_divergence() -> None:
    """A summed loss over sequences doubled in length every 50 batches climbs 2-5x a stage: at its fourth stage, 10x
    past its first stage's level, it was a divergence, and the run restarted from its initial weights (a user trial:
    held-out +827%). A lasting change of the batches' shapes now makes the divergence detector forget that level."""
    torch.manual_seed(0)
    guard = GradGuard()
    trainer(max_epochs=1, callbacks=[guard]).fit(_Lengthening([4 * 2 ** (i // 50) for i in range(160)]))
    counts = guard.summary()
    assert counts["diverging"] == counts["rolled_back"] == counts["lr_reduced"] == counts["exploding"] == 0


@pytest.mark.parametrize(
    ("lengths", "forgotten"),
    [
        ([8] * 30 + [4] * 10, 1),  # a lasting change after a settled layout
        ([8] * 30 + [4] + [8] * 9, 0),  # one odd batch
        ([8] * 10 + [4] * 10, 0),  # nothing settled yet
        ([8, 4] * 20, 0),  # shapes that vary from batch to batch
    ],
)
def test_the_divergence_floor_is_forgotten_at_lasting_changes_of_the_batches_shapes_only(
    lengths: list[int], forgotten: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    forget = DivergenceDetector.forget_floor
    monkeypatch.setattr(DivergenceDetector, "forget_floor", lambda det: calls.append(1) or forget(det))
    torch.manual_seed(0)
    trainer(max_epochs=1, callbacks=[GradGuard()]).fit(_Lengthening(lengths))
    assert len(calls) == forgotten


def test_a_change_of_the_batch_size_alone_keeps_the_divergence_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(DivergenceDetector, "forget_floor", lambda det: calls.append(1))
    model = _Lengthening([8] * 40)
    batches = [
        (x[: 16 if i >= 30 else 32], y[: 16 if i >= 30 else 32]) for i, (x, y) in enumerate(model.train_dataloader())
    ]
    trainer(max_epochs=1, callbacks=[GradGuard()]).fit(model, DataLoader(batches, batch_size=None))
    assert not calls
