"""GradGuard with the standalone ``pytorch_lightning`` package, whose classes are distinct from ``lightning.pytorch``'s.

Each test trains a ``pytorch_lightning`` module with a ``pytorch_lightning.Trainer``: the guard must find that
package's TensorBoardLogger, GradientAccumulationScheduler and strategies, take over its ``gradient_clip_val`` and
be accepted by its LightningCLI, exactly as with ``lightning.pytorch``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard._lightning import overrides_hook
from lightning_gradguard.diagnostics import NOISE_SCALE_NOTE
from tests.helpers import assert_same_state, scalar_series
from tests.models import TRAINER_DEFAULTS, regression_data

pl = pytest.importorskip("pytorch_lightning")


class PLRegressor(pl.LightningModule):  # type: ignore[misc,name-defined]
    """An MLP regressor of the standalone package; the loss is multiplied by ``spike`` at the steps in ``spikes``."""

    def __init__(self, spikes: tuple[int, ...] = (), spike: float = 1e4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.spikes, self.spike = spikes, spike

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * self.spike if self.global_step in self.spikes else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class OwnClipping(PLRegressor):
    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val)


class NormProbe(pl.Callback):  # type: ignore[misc,name-defined]
    """The total gradient norm the optimizer stepped with, per step (read after the step: a gradient hook of its own
    after the guard's would keep the Trainer's clipping Lightning's)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def _trainer(**kwargs: Any) -> Any:
    return pl.Trainer(**{**TRAINER_DEFAULTS, "log_every_n_steps": 5, **kwargs})


def test_guard_is_a_callback_of_both_packages() -> None:
    import lightning.pytorch as lp

    guard = GradGuard()
    assert isinstance(guard, pl.Callback) and isinstance(guard, lp.Callback)
    trainer = _trainer(callbacks=guard)  # a single callback, not in a list: the Trainer wraps only its own kind
    assert guard in trainer.callbacks


def test_tensorboard_logger_gets_the_per_layer_scalars_and_events(tmp_path: Path) -> None:
    guard = GradGuard(log_every_n_steps=5)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="", version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exploding event's warning
        _trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger).fit(
            PLRegressor(spikes=(22,)), regression_data()
        )
    series = scalar_series(tmp_path)
    assert {"gradguard/layer/net.0", "gradguard/layer/net.2", "gradguard/total_norm"} <= set(series)
    assert [step for step, _ in series["gradguard/layer/net.0"]] == [4, 9, 14, 19, 24, 29]
    assert series["gradguard/events/exploding"][-1][1] == 1.0 == guard.summary()["exploding"]


def test_gradient_clip_val_is_taken_over(recwarn: pytest.WarningsRecorder) -> None:
    # Lightning's own `is_overridden` raised "Expected a parent" for a pytorch_lightning module.
    probe = NormProbe()
    trainer = _trainer(max_steps=20, max_epochs=-1, callbacks=[GradGuard(), probe], gradient_clip_val=0.5)
    trainer.fit(PLRegressor(), regression_data())
    assert any("GradGuard takes it over" in str(w.message) for w in recwarn.list)
    assert max(probe.norms) <= 0.5 * (1 + 1e-5)
    assert trainer.gradient_clip_val == 0.5  # given back after the fit


def test_own_configure_gradient_clipping_keeps_the_clipping(recwarn: pytest.WarningsRecorder) -> None:
    trainer = _trainer(max_steps=5, callbacks=[GradGuard()], gradient_clip_val=0.5)
    trainer.fit(OwnClipping(), regression_data())
    assert any("own `configure_gradient_clipping`" in str(w.message) for w in recwarn.list)
    assert overrides_hook(OwnClipping(), "configure_gradient_clipping")
    assert not overrides_hook(PLRegressor(), "configure_gradient_clipping")


def test_gradient_accumulation_scheduler_feeds_the_noise_scale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="", version="")
    scheduler = pl.callbacks.GradientAccumulationScheduler({0: 1, 1: 2})
    with caplog.at_level(logging.INFO):
        _trainer(max_epochs=2, callbacks=[scheduler, GradGuard(log_every_n_steps=2)], logger=logger).fit(
            PLRegressor(), regression_data()
        )
    assert not any(NOISE_SCALE_NOTE in r.getMessage() for r in caplog.records)
    steps = [step for step, _ in scalar_series(tmp_path)["gradguard/noise_scale"]]
    assert steps and min(steps) >= 16  # 16 steps in epoch 0 (one batch size), then pairs of micro-batches


def test_fsdp1_of_the_standalone_package_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*FSDP1"):
        GradGuard().setup(SimpleNamespace(strategy=pl.strategies.FSDPStrategy()), PLRegressor(), "fit")


def test_checkpoint_resume_restores_the_guard(tmp_path: Path) -> None:
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    first = GradGuard()
    common = dict(max_steps=12, max_epochs=-1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    _trainer(callbacks=[first, checkpoint], **common).fit(PLRegressor(), regression_data())
    resumed = GradGuard()
    _trainer(callbacks=[resumed], **common).fit(PLRegressor(), regression_data(), ckpt_path=str(tmp_path / "last.ckpt"))
    # The logging window aside: the checkpoint holds the steps since the last log, which the first run's end then
    # wrote (and started a new window); the resumed run, at max_steps already, took no step to write them in.
    restored, saved = resumed.state_dict(), first.state_dict()
    for state in (restored, saved):
        for engine in state["optimizers"].values():
            engine.pop("window")
    assert_same_state(restored, saved)


def test_lightning_cli_of_the_standalone_package_accepts_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["cli"])  # LightningCLI warns when pytest's own argv is present

    config = tmp_path / "config.yaml"
    guard = "    - class_path: lightning_gradguard.GradGuard\n      init_args: {log_every_n_steps: 7}\n"
    config.write_text("trainer:\n  callbacks:\n" + guard)
    cli = LightningCLI(PLRegressor, run=False, args=["--config", str(config)], save_config_callback=None)
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert guard.log_every_n_steps == 7


def test_without_the_standalone_package_the_guard_is_a_lightning_callback() -> None:
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None\n"  # as if it were not installed
        "import lightning.pytorch as lp\n"
        "from lightning_gradguard import GradGuard\n"
        "assert GradGuard.__bases__ == (lp.Callback,), GradGuard.__bases__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
