"""Running statistics of normalization layers across a bad batch: the skipped step keeps the weights, and the NaN its
forward pass wrote into ``running_mean``/``running_var`` is put back, so evaluation after it is not NaN for ever."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard import GradGuard, GuardEngine, RunningStats
from lightning_gradguard.layers import build_layer_index
from tests.helpers import RestartWatch
from tests.models import Regressor, SplitRegressor, regression_data, trainer


def _stats(module: nn.Module) -> list[torch.Tensor]:
    return [module.running_mean.clone(), module.running_var.clone()]


def test_a_non_finite_entry_gets_its_previous_value_and_finite_updates_stay() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3)
    stats = RunningStats(norm)
    assert len(stats) == 1
    norm(torch.randn(8, 3))
    stats.repair_()
    before = _stats(norm)
    batch = torch.randn(8, 3)
    batch[0, 0] = float("nan")  # feature 0 alone
    batch[1, 2] = float("inf")  # feature 2: an infinite variance
    norm(batch)
    updated_mean = norm.running_mean[1].clone()
    assert norm.running_mean[0].isnan() and not norm.running_var[2].isfinite()
    stats.repair_()
    assert torch.equal(norm.running_mean[0], before[0][0]) and torch.equal(norm.running_var[0], before[1][0])
    assert torch.equal(norm.running_var[2], before[1][2])
    assert torch.equal(norm.running_mean[1], updated_mean) and not torch.equal(updated_mean, before[0][1])
    # The repaired values are the ones to fall back on next time.
    norm(torch.full((4, 3), float("nan")))
    stats.repair_()
    assert torch.equal(norm.running_mean[0], before[0][0]) and torch.equal(norm.running_mean[1], updated_mean)


def test_layers_of_several_dtypes_lazy_ones_and_a_model_moved_to_another_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyBatchNorm1d(), nn.BatchNorm1d(4).double(), nn.InstanceNorm1d(4), nn.Linear(4, 4))
    stats = RunningStats(model)  # the lazy layer has no statistics yet; InstanceNorm keeps none by default
    assert len(stats) == 2
    model[0](torch.randn(8, 4))  # the lazy layer takes its shape, its first statistics are the ones to fall back on
    stats.repair_()
    kept = [*_stats(model[0]), *_stats(model[1])]
    model[0](torch.full((8, 4), float("nan")))
    model[1](torch.full((8, 4), float("nan"), dtype=torch.float64))
    stats.repair_()
    assert all(torch.equal(a, b) for a, b in zip([*_stats(model[0]), *_stats(model[1])], kept))
    model.double()  # new buffer tensors, now one dtype: read through the modules, first sight again
    model[0](torch.randn(8, 4, dtype=torch.float64))
    stats.repair_()
    kept = _stats(model[0])
    model[0](torch.full((8, 4), float("nan"), dtype=torch.float64))
    stats.repair_()
    assert all(torch.equal(a, b) for a, b in zip(_stats(model[0]), kept))


def test_a_model_without_running_statistics_costs_nothing_and_bad_input_is_refused() -> None:
    assert (
        len(RunningStats(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.BatchNorm1d(2, track_running_stats=False))))
        == 0
    )
    with pytest.raises(ValueError, match="`model` must be an nn.Module"):
        RunningStats(build_layer_index(nn.Linear(2, 2)))  # type: ignore[arg-type]


class BatchNormRegressor(Regressor):
    """An MLP with a BatchNorm layer; one input entry of the batch that makes optimizer step ``bad_step`` is NaN."""

    def __init__(self, bad_step: int, **kwargs: Any) -> None:
        net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
        super().__init__(net=net, **kwargs)
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step + 1 == self.bad_step and batch_idx % self.trainer.accumulate_grad_batches == 0:
            x = x.clone()
            x[0, 0] = float("nan")
        return super().training_step((x, y), batch_idx)


class StatsWatch(L.Callback):
    """The BatchNorm layer's running statistics at the start of each optimizer step's window and after its step."""

    def __init__(self) -> None:
        self.at_start: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.at_start.setdefault(trainer.global_step + 1, _stats(pl_module.net[1]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.after.setdefault(trainer.global_step, _stats(pl_module.net[1]))  # right after the step


def _fit(on_nonfinite: str = "skip", accumulate: int = 1, plugins: Any = None) -> tuple[BatchNormRegressor, Any]:
    L.seed_everything(0, verbose=False)
    model = BatchNormRegressor(bad_step=6, optimizer="adam", lr=1e-2)
    watch = StatsWatch()
    guard = GradGuard(on_nonfinite=on_nonfinite)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(
            max_steps=12, max_epochs=-1, callbacks=[guard, watch], accumulate_grad_batches=accumulate, plugins=plugins
        )
        fit.fit(model, regression_data())
    return model, watch, guard


@pytest.mark.parametrize(
    ("accumulate", "plugins"),
    [(1, None), (2, None), (1, MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10)))],
    ids=["plain", "accumulation", "16-mixed-gradscaler"],
)
def test_in_a_trainer_a_nan_batch_leaves_the_running_statistics_as_they_were(accumulate: int, plugins: Any) -> None:
    model, watch, guard = _fit(accumulate=accumulate, plugins=plugins)
    events = guard.summary()
    assert events["skipped"] + events["overflow"] == 1  # the NaN batch's step did not update the weights
    # After the bad step, the statistics of its window's start: the NaN was put back everywhere it went.
    assert all(torch.equal(a, b) for a, b in zip(watch.after[6], watch.at_start[6]))
    assert all(t.isfinite().all() for t in watch.after[12])
    model.eval()
    x, _ = next(iter(regression_data(seed=1)))
    assert model(x).isfinite().all()


def test_with_on_nonfinite_warn_nothing_is_kept_from_harm() -> None:
    # "warn" lets the bad step through: the statistics turn NaN and stay so (what happened before with "skip" too).
    model, watch, _ = _fit(on_nonfinite="warn")
    assert watch.after[6][0].isnan().all() and watch.after[12][0].isnan().all()


def test_a_plain_loop_engine_repairs_them_at_its_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GuardEngine(model)
    kept: list[torch.Tensor] = []
    for step in range(1, 6):
        opt.zero_grad()
        x = torch.randn(16, 4)
        if step == 4:
            kept = _stats(model[1])
            x[0, 0] = float("nan")
        model(x).square().mean().backward()
        engine.step(optimizer=opt)
        if step == 4:
            assert engine.skipped and all(torch.equal(a, b) for a, b in zip(_stats(model[1]), kept))
        opt.step()
    assert all(t.isfinite().all() for t in _stats(model[1]))
    # An engine built from a LayerIndex has no modules to watch.
    assert GuardEngine(build_layer_index(model))._running_stats is None


class BlowUpRegressor(Regressor):
    """A BatchNorm MLP whose loss is multiplied by 1e8 on optimizer steps 2 and 3: without a clipper the updates wreck
    the weights and, through them, the running statistics, and the default early restart follows."""

    def __init__(self) -> None:
        net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
        super().__init__(net=net, lr=0.02)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e8 if self.global_step + 1 in (2, 3) else loss


@pytest.mark.parametrize("keep", [True, False])
def test_a_restart_puts_the_running_statistics_back_with_the_weights(
    keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not keep:  # what the statistics hold when the rollback leaves them (the check that the test can fail)
        monkeypatch.setattr(RunningStats, "restore_", lambda self, snapshot: None)
    L.seed_everything(0, verbose=False)
    model, watch, guard = BlowUpRegressor(), StatsWatch(), GradGuard(clip=None)
    restarts = RestartWatch(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=12, max_epochs=-1, callbacks=[guard, restarts, watch]).fit(model, regression_data(n=1024))
    assert len(restarts.restarts) == 1 and restarts.restarts[0][1]
    step = restarts.restarts[0][0]
    wrecked = watch.after[step - 1][1].max()
    after_restart = watch.after[step]
    if not keep:
        assert after_restart[1].max() > 100.0 and wrecked > 100.0
        return
    # The copy was taken at step 1's optimizer step, after its forward pass: the statistics that went with the weights.
    assert wrecked > 100.0 and all(torch.equal(a, b) for a, b in zip(after_restart, watch.after[1]))


def test_the_engine_takes_a_shared_instance_none_or_the_default() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    shared = RunningStats(model)
    assert GuardEngine(model, running_stats=shared)._running_stats is shared
    assert GuardEngine(model, running_stats=None)._running_stats is None
    assert GuardEngine(model, on_nonfinite="warn")._running_stats is None
    with pytest.raises(ValueError, match="`running_stats` must be an instance of RunningStats, None or 'default'"):
        GuardEngine(model, running_stats=True)  # type: ignore[arg-type]


def test_writes_leave_autograds_version_counter_and_params_select_the_layers() -> None:
    # A graph built before the write (a GAN's fake batch, used again after the other optimizer's step) must stay
    # valid: batch norm's backward checks that its running statistics are unchanged since the forward pass.
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False))
    stats = RunningStats(model)
    out = model(torch.randn(16, 4, requires_grad=True))
    versions = [model[1].running_mean._version, model[3].running_var._version]
    stats.repair_()
    stats.restore_(stats.snapshot())
    assert [model[1].running_mean._version, model[3].running_var._version] == versions
    out.sum().backward()  # before: "modified by an inplace operation"
    assert len(RunningStats(model, params=model[1].parameters())) == 1  # an affine-free layer owns no parameter
    assert len(RunningStats(model, params=model[0].parameters())) == 0


class BatchNormGAN(L.LightningModule):
    """DCGAN-style manual optimization: the fake batch is made once, D steps, then G's loss backpropagates through
    G's graph built before D's step; G has a BatchNorm layer, and one noise batch holds a NaN."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, noise = batch[0][:, :8], batch[0][:, 8:12].clone()
        if batch_idx == self.nan_at:
            noise[0, 0] = float("nan")
        opt_d, opt_g = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.g(noise)
        logits_real, logits_fake = self.d(real), self.d(fake.detach())
        opt_d.zero_grad()
        self.manual_backward(
            bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))
        )
        opt_d.step()
        logits = self.d(fake)
        opt_g.zero_grad()
        self.manual_backward(bce(logits, torch.ones_like(logits)))
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.d.parameters(), lr=2e-4), torch.optim.Adam(self.g.parameters(), lr=2e-4)]


def test_a_gan_that_reuses_its_fake_batch_trains_and_its_generators_statistics_stay_finite() -> None:
    L.seed_everything(0, verbose=False)
    model = BatchNormGAN(nan_at=5)
    guard = GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=24, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(dim=16))
    assert guard.summary()["skipped"] >= 1  # the NaN batch's steps
    assert all(t.isfinite().all() for t in _stats(model.g[1]))


def test_a_snapshot_taken_on_another_device_is_restored_by_dtype() -> None:
    # A checkpoint's snapshot is keyed by the device it was taken on (rank 0's GPU, or a GPU run resumed on the CPU):
    # the retry it is for would otherwise leave the running statistics where the troubled steps put them.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    stats = RunningStats(model)
    before = stats.snapshot()
    elsewhere = {(torch.device("cuda", 0), dtype): values for (_, dtype), values in before.items()}
    model.train()
    model(torch.randn(16, 4) * 5 + 3)  # moves the running statistics
    stats.restore_(elsewhere)
    assert torch.equal(torch.cat([model[1].running_mean, model[1].running_var]), before[next(iter(before))][:8])
    assert torch.equal(model[3].running_var, torch.ones(2))


# ---------------------------------------------------------------------------------------------- quantization observers


def _observer_refuses_nan() -> bool:
    """Older torch (2.7) asserts ``min_val <= max_val`` when an observer computes its scale, so a NaN input stops the
    forward pass itself, before any guard: nothing of this trap exists there."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    try:
        fq(torch.tensor([[float("nan"), 1.0]]))
    except AssertionError:
        return True
    return False


needs_nan_observers = pytest.mark.skipif(
    _observer_refuses_nan(), reason="this torch's observers raise on a NaN input in the forward pass"
)


@needs_nan_observers
def test_an_observers_minimum_maximum_and_scale_get_their_previous_values() -> None:
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver

    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    unseen = MinMaxObserver()  # has seen no data: its inf start stays
    model = nn.Sequential(fq, nn.Linear(4, 1), unseen)
    stats = RunningStats(model)
    assert len(stats) == 3  # the fake-quantize module, its observer and the other observer
    fq(torch.randn(8, 4))
    stats.repair_()
    before = [fq.scale.clone(), fq.activation_post_process.min_val.clone(), fq.activation_post_process.max_val.clone()]
    bad = torch.randn(8, 4)
    bad[0, 0] = float("nan")
    fq(bad)
    assert fq.activation_post_process.min_val.isnan()  # the trap: every later forward would quantize to NaN
    stats.repair_()
    after = [fq.scale, fq.activation_post_process.min_val, fq.activation_post_process.max_val]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert float(unseen.min_val) == float("inf") and float(unseen.max_val) == float("-inf")
    assert fq(torch.randn(8, 4)).isfinite().all()


class _FakeQuantRegressor(Regressor):
    """Quantization-aware training of a linear model: a fake-quantized input, one NaN input at ``bad_step``."""

    def __init__(self, bad_step: int | None) -> None:
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

        super().__init__(optimizer="adam", lr=1e-2)
        self.quant = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
        self.bad_step = bad_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.quant(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step + 1 == self.bad_step:
            x = x.clone()
            x[0, 0] = float("nan")
        return nn.functional.mse_loss(self(x), y)


@needs_nan_observers
def test_in_a_trainer_one_nan_batch_leaves_quantization_aware_training_going() -> None:
    # Before, the NaN the bad batch wrote into the observer made every later step non-finite: all skipped, the weights
    # frozen, and the LR guard cut the rate 7 times (to 0.01x) for a rate that was never the cause.
    def fit(bad_step: int | None) -> tuple[_FakeQuantRegressor, GradGuard]:
        L.seed_everything(0, verbose=False)
        model, guard = _FakeQuantRegressor(bad_step), GradGuard()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(model, regression_data())
        return model, guard

    model, guard = fit(bad_step=6)
    events = guard.summary()
    assert events["skipped"] == 1 and events["nonfinite"] == 1 and events["lr_reduced"] == 0
    assert guard.lr_guard is not None and guard.lr_guard.scale(0) == 1.0
    assert model.quant.scale.isfinite().all()
    clean, _ = fit(bad_step=None)
    x, y = next(iter(regression_data(seed=1)))
    with torch.no_grad():
        loss, clean_loss = (nn.functional.mse_loss(m(x), y).item() for m in (model, clean))
    assert loss < 1.2 * clean_loss  # it kept training (one batch fewer)


class _SplitQuant(SplitRegressor):
    """An input fake-quantize (it owns no parameter) before two layers that two optimizers hold; NaN at step 6."""

    def __init__(self) -> None:
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

        quant = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
        super().__init__(nn.Sequential(quant, nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 5:
            x = x.clone()
            x[0, 0] = float("nan")
        super().training_step((x, y), batch_idx)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [torch.optim.SGD(self.net[1].parameters(), lr=0.01), torch.optim.SGD(self.net[3].parameters(), lr=0.01)]


@needs_nan_observers
def test_with_several_optimizers_an_observer_that_owns_no_parameter_is_kept_by_the_first() -> None:
    L.seed_everything(0, verbose=False)
    model, guard = _SplitQuant(), GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=30, max_epochs=-1, callbacks=[guard]).fit(model, regression_data())
    assert model.net[0].scale.isfinite().all()
    assert guard.summary()["skipped"] == 2  # the NaN batch's step, once per optimizer; none after it
