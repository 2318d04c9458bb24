"""GradGuard in one minute: the same model trained on data with a few corrupted labels, with and without the guard.

Run:
    python examples/demo.py            # both runs, TensorBoard logs under ./gradguard_logs
    tensorboard --logdir gradguard_logs

After a clean start, one sample in 500 carries a corrupted label (a broken sensor reporting 300 instead of a value
near 1). Each such sample makes one gradient step orders of magnitude too large. Without the guard, they throw the
weights so far that the model is ruined. With the default ``GradGuard()``, ZClip
clips those spikes back to the usual norm, the LR guard lowers the learning rate while they last, and the model
keeps learning: the error on clean held-out data keeps falling.
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


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5]


def make_data(n: int = 8192, corrupt: float = 0.002, seed: int = 0) -> tuple[DataLoader, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = target(x)
    bad = torch.rand(n, generator=g) < corrupt
    bad[: n // 8] = False  # the feed starts clean and breaks later in the run
    y[bad] = 300.0  # corrupted labels: the source of the gradient spikes
    x_val = torch.randn(2048, 16, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64), TensorDataset(x_val, target(x_val))


class Regression(L.LightningModule):
    """A 3-layer MLP; SGD with momentum at a learning rate that suits the clean data."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def run(guarded: bool, steps: int, logdir: str, lr: float) -> tuple[float, dict[str, int] | None, str]:
    """Train one model; returns its MSE on clean held-out data, the guard's event counts and the log directory."""
    L.seed_everything(0, verbose=False)
    loader, val = make_data()
    model = Regression(lr=lr)
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
        trainer.fit(model, loader)
    with torch.no_grad():
        clean_mse = float(nn.functional.mse_loss(model.net(val.tensors[0]), val.tensors[1]))
    return clean_mse, (guard.summary() if guard else None), logger.log_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--logdir", default="gradguard_logs")
    args = parser.parse_args(argv)
    baseline = float(target(torch.randn(100_000, 16, generator=torch.Generator().manual_seed(1))).var())
    print(f"Predicting the mean gives a clean-data MSE of {baseline:.3f}.\n")
    for guarded in (False, True):
        mse, events, logdir = run(guarded, args.steps, args.logdir, args.lr)
        label = "with GradGuard   " if guarded else "without GradGuard"
        shown = "NaN (training diverged)" if math.isnan(mse) else f"{mse:.4f}"
        print(f"{label}: clean-data MSE {shown}")
        if events:
            print(f"                   guard events: {events}")
        print(f"                   logs: {logdir}")
    print(f"\nOpen the dashboard:  tensorboard --logdir {os.path.abspath(args.logdir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
