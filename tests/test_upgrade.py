"""Checkpoints written by an earlier release resume with this one: the guard's counts, statistics and LR
multiplier carry on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from tests.models import trainer

# What GradGuard 0.2.0 saved (its callback state and its diagnostics' state) after 64 steps of `_Model` below, on
# `_data()` in batches of 16, with `GradGuard(log_every_n_steps=5)` and `Trainer(max_epochs=2, log_every_n_steps=5)`:
# the loss was multiplied by 1e4 at global steps 40, 41, 50 and 51, and the guard counted 4 exploding steps,
# clipped 4 and cut the rate 4 times (to 0.0625x at the save).
STATE_0_2_0 = Path(__file__).parent / "data" / "gradguard-0.2.0-state.pt"


class _Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
        self.rates: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_start(self) -> None:
        # Registered after the guard's own pre-hook (on_fit_start): sees the rate the step runs at.
        self.optimizers().optimizer.register_step_pre_hook(  # type: ignore[union-attr]
            lambda opt, args, kwargs: self.rates.append(opt.param_groups[0]["lr"])
        )


def _data() -> DataLoader:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    return DataLoader(TensorDataset(x, (x @ torch.randn(16, 1)).tanh()), batch_size=16)


def test_a_checkpoint_of_version_0_2_0_resumes(tmp_path: Path) -> None:
    old = torch.load(STATE_0_2_0, weights_only=True)
    # A checkpoint at the same step, written by this version, with 0.2.0's guard state in place of its own.
    guard = GradGuard(log_every_n_steps=5)
    fit = trainer(max_epochs=3, max_steps=64, callbacks=[guard], default_root_dir=tmp_path)
    fit.fit(_Model(), _data())
    path = tmp_path / "resume.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    old_key = next(iter(old["diagnostics"]))
    assert old_key == guard.state_key  # the state key did not change: Lightning finds the old state
    checkpoint["callbacks"][guard.state_key] = old["callback"]
    checkpoint["gradguard_diagnostics"] = old["diagnostics"]
    torch.save(checkpoint, path)

    resumed = GradGuard(log_every_n_steps=5)
    model = _Model()
    trainer(max_epochs=4, callbacks=[resumed], default_root_dir=tmp_path).fit(model, _data(), ckpt_path=path)
    counts = resumed.summary()
    assert (counts["exploding"], counts["clipped"], counts["lr_reduced"], counts["rolled_back"]) == (4, 4, 4, 0)
    # The cut rate carries on from 0.2.0's multiplier (0.0625 at the save) and goes on recovering, slowly.
    assert len(model.rates) == 64 and model.rates[0] == pytest.approx(0.05 * 0.0625)
    assert model.rates == sorted(model.rates) and model.rates[0] < model.rates[-1] < 0.05 * 0.1
