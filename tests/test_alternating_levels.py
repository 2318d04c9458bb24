"""A run whose gradient alternates between two levels (two tasks in turn, a loss term switched off and on) is healthy:
each return to the louder level is a norm back where it was, not an explosion, and costs no LR cut."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_gradguard import GradGuard
from tests.models import Regressor, regression_data, trainer


class AlternatingRegressor(Regressor):
    """Adam; the loss weighted 1 and ``quiet`` in turn every ``period`` optimizer steps, times ``factor`` on the
    steps in ``bad`` (counted from 1)."""

    def __init__(self, quiet: float, period: int, bad: dict[int, float]) -> None:
        super().__init__(lr=2e-3, optimizer="adam")
        self.quiet, self.period, self.bad = quiet, period, bad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.global_step + 1
        weight = self.quiet if (step - 1) // self.period % 2 else 1.0
        return super().training_step(batch, batch_idx) * weight * self.bad.get(step, 1.0)


def _fit(bad: dict[int, float]) -> dict[str, int]:
    torch.manual_seed(0)
    guard = GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=300, max_epochs=-1, callbacks=[guard]).fit(
            AlternatingRegressor(0.01, 50, bad), regression_data(n=2048)
        )
    return guard.summary()


def test_returns_to_the_louder_level_raise_nothing_and_a_bad_batch_still_does() -> None:
    # Before, the returns to the louder level were flagged: 3 exploding events in this run.
    summary = _fit({})
    assert summary["exploding"] == 0 and summary["lr_reduced"] == 0
    summary = _fit({230: 1e4})  # a bad batch on the louder level, after a return
    assert summary["exploding"] == 1 and summary["clipped"] >= 1
