"""Tiny models and data shared by the tests."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 256, dim: int = 16, seed: int = 0, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Regressor(L.LightningModule):
    """An MLP regressor; ``net`` can be replaced by any module mapping [B, dim] -> [B, 1]."""

    def __init__(self, net: nn.Module | None = None, dim: int = 16, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 1))
        self.lr = lr
        self.optimizer_name = optimizer
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NaNAtSteps(Regressor):
    """A regressor whose loss is NaN (on every rank) at the given optimizer steps."""

    def __init__(self, *steps: int) -> None:
        super().__init__()
        self.nan_steps = steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step in self.nan_steps else loss


class SplitRegressor(Regressor):
    """A regressor whose parameters several optimizers hold (``configure_optimizers`` of a subclass), stepped
    manually: one backward, then every optimizer's step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net=net)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()


# A quiet CPU trainer for tests (the arguments are the same for the standalone `pytorch_lightning` Trainer).
TRAINER_DEFAULTS: dict[str, Any] = dict(
    accelerator="cpu",
    devices=1,
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=10,
)


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer for tests."""
    return L.Trainer(**{**TRAINER_DEFAULTS, **kwargs})
