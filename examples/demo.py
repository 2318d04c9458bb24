"""GradGuard in one minute: an MLP trained at a learning rate that makes it blow up, with and without the guard.

Run:
    python examples/demo.py            # both runs, logs under ./gradguard_logs
    tensorboard --logdir gradguard_logs

Each run trains the same model on the same data for the same number of steps. The unguarded one overshoots,
its gradients explode and the loss turns to NaN; the guarded one clips the spikes (ZClip), lowers the learning
rate while they last (LRGuard), skips steps with non-finite gradients and ends with a finite, falling loss.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard


class SpikyRegression(L.LightningModule):
    """A 4-layer tanh MLP on a regression task whose inputs have rare, large outliers."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)
        )
        self.last_loss = math.nan

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_data(n: int = 4096, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) * 3 + x[:, 4:5] ** 2
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)


def run(guarded: bool, steps: int, logdir: str, lr: float) -> tuple[float, dict[str, int] | None, str]:
    L.seed_everything(0, verbose=False)
    model = SpikyRegression(lr=lr)
    guard = GradGuard() if guarded else None
    logger = TensorBoardLogger(logdir, name="guarded" if guarded else "unguarded")
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=logger,
        callbacks=[guard] if guard else [],
        log_every_n_steps=20,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guard's warnings are summarised below
        trainer.fit(model, make_data())
    return model.last_loss, (guard.summary() if guard else None), logger.log_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--logdir", default="gradguard_logs")
    args = parser.parse_args(argv)
    for guarded in (False, True):
        loss, events, logdir = run(guarded, args.steps, args.logdir, args.lr)
        label = "guarded  " if guarded else "unguarded"
        print(f"{label}: final training loss {loss:.4g}" + (f"   GradGuard events: {events}" if events else ""))
        print(f"           logs: {logdir}")
    print(f"\nOpen the dashboard:  tensorboard --logdir {os.path.abspath(args.logdir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
