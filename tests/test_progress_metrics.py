"""The progress bar's ``gg_gn``, ``gg_clip`` and ``gg_ev``: the ``callback_metrics`` that ``EarlyStopping`` and
``ModelCheckpoint(monitor=...)`` can watch (README, "TensorBoard")."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from lightning_gradguard import GradGuard
from tests.helpers import MetricsLogger
from tests.models import NaNAtSteps, Regressor, SplitRegressor, regression_data, trainer


class TwoOptimizers(SplitRegressor):
    """The first layer on one optimizer, the rest on another, stepped manually; one batch ``spike`` times larger."""

    def __init__(self, spike_at: int) -> None:
        super().__init__(net=torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
        self.spike_at = spike_at

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        x, y = batch
        super().training_step((x, y * (1e3 if batch_idx == self.spike_at else 1.0)), batch_idx)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.01),
            torch.optim.SGD(self.net[2].parameters(), lr=0.01),
        ]


def test_one_nan_batch_is_one_event_on_the_progress_bar() -> None:
    # It is counted as non-finite and its step skipped: one problem, not two (EarlyStopping on `gg_ev` with a
    # threshold of one event stopped the run for a single bad batch).
    guard = GradGuard()
    fit = trainer(callbacks=[guard], log_every_n_steps=1)
    fit.fit(NaNAtSteps(5), regression_data())
    assert guard.summary()["nonfinite"] == 1 and guard.summary()["skipped"] == 1
    assert fit.callback_metrics["gg_ev"].item() == 1.0


def test_clip_coefficient_of_several_optimizers_is_the_strongest_clipping() -> None:
    logger = MetricsLogger()
    guard = GradGuard()
    fit = trainer(callbacks=[guard], log_every_n_steps=1, logger=logger)
    fit.fit(TwoOptimizers(spike_at=39), regression_data(n=640))  # the last of 40 batches
    coefs = [logger.series(f"gradguard/opt{i}/clip_coef")[-1] for i in (0, 1)]
    assert min(coefs) < 1.0  # the spike was clipped
    assert fit.callback_metrics["gg_clip"].item() == pytest.approx(min(coefs))
    # The norm shown is the first optimizer's.
    assert fit.callback_metrics["gg_gn"].item() == pytest.approx(logger.series("gradguard/opt0/total_norm")[-1])


def test_without_a_clipper_there_is_no_clip_coefficient_to_watch() -> None:
    fit = trainer(callbacks=[GradGuard(clip=None)], log_every_n_steps=1)
    fit.fit(Regressor(), regression_data())
    assert "gg_clip" not in fit.callback_metrics and {"gg_gn", "gg_ev"} <= set(fit.callback_metrics)


def test_early_stopping_watches_the_event_count() -> None:
    # The second NaN batch of the epoch makes two events: a threshold of 1.5 stops the run at the epoch's end.
    stop = EarlyStopping(monitor="gg_ev", mode="min", divergence_threshold=1.5, check_on_train_epoch_end=True)
    fit = trainer(callbacks=[GradGuard(), stop], log_every_n_steps=1, max_epochs=5)
    fit.fit(NaNAtSteps(5, 12), regression_data())
    assert fit.current_epoch == 1 and fit.callback_metrics["gg_ev"].item() == 2.0
