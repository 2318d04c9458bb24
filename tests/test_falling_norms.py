"""A bad batch while the gradient norm falls steadily (a loss term annealed away, training settling fast) is still an
exploding event: the exploding detector's band is centred where the norms are, not on its lagging mean."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from lightning_gradguard import GradGuard
from tests.models import Regressor, regression_data, trainer


class AnnealedRegressor(Regressor):
    """The loss weighted by ``exp(-decay * step)`` (its gradient norm falls by that much a step), times ``factor`` on
    the optimizer steps in ``bad`` (counted from 1)."""

    def __init__(self, decay: float, bad: dict[int, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decay, self.bad = decay, bad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.global_step + 1
        weight = math.exp(-self.decay * step) * self.bad.get(step, 1.0)
        return super().training_step(batch, batch_idx) * weight


def _fit(decay: float, bad: dict[int, float]) -> dict[str, int]:
    torch.manual_seed(0)
    guard = GradGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=90, max_epochs=-1, callbacks=[guard]).fit(
            AnnealedRegressor(decay, bad, lr=0.05), regression_data(n=1024)
        )
    return guard.summary()


def test_a_bad_batch_on_a_falling_norm_is_flagged_and_clipped() -> None:
    # The norm halves about every 12 steps (decay 0.06): the mean lags it by about 1.1 in log-norm, which used to
    # widen the band past 30x. A 30x batch at step 70 is now one event, clipped, and costs no cut.
    summary = _fit(0.06, {70: 30.0})
    assert summary["exploding"] == 1 and summary["clipped"] >= 1 and summary["lr_reduced"] == 0
    # The falling norm alone raises nothing.
    summary = _fit(0.06, {})
    assert summary["exploding"] == 0 and summary["clipped"] == 0
