"""A late collapse: the loss climbs back towards its untrained level without ever rising above it.

No divergence event sees it (the loss stays below the first one) and the gradient norms barely move, so the guard
measures how much of its progress the run has given back (:meth:`DivergenceDetector.progress`), charts it as
``gradguard/loss_relapse`` and warns once it passes :data:`RELAPSE_WARNING`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import DivergenceDetector, GradGuard, GuardEngine
from lightning_gradguard._events import RELAPSE_WARNING
from lightning_gradguard.cli import main
from lightning_gradguard.detect import START_LOSSES
from tests.helpers import MetricsLogger, event_files, scalar_series
from tests.models import trainer


def _progress(det: DivergenceDetector, losses: list[float]) -> list[float]:
    for loss in losses:
        det.update(torch.tensor(loss))
    return det.progress().tolist()


def test_progress_is_unknown_before_any_loss_and_before_the_run_has_learned() -> None:
    det = DivergenceDetector()
    assert all(math.isnan(v) for v in det.progress().tolist())
    share, mean, start, lowest = _progress(det, [2.3] * 5)  # no starting level yet, no settled lowest
    assert math.isnan(share) and mean == pytest.approx(2.3) and math.isnan(start) and math.isnan(lowest)
    share, mean, start, lowest = _progress(det, [2.3] * 55)  # a flat run: settled, but nothing learned
    assert math.isnan(share) and start == pytest.approx(2.3) and lowest == pytest.approx(2.3)


def test_a_loss_that_falls_and_climbs_back_has_given_back_its_share_of_the_progress() -> None:
    det = DivergenceDetector()
    falling = [2.0 - 1.0 * i / 100 for i in range(100)] + [1.0] * 100
    share, _, start, lowest = _progress(det, falling)
    # The starting level is the plain mean of the first eight losses, not the first (one batch's) alone.
    assert start == pytest.approx(sum(falling[:START_LOSSES]) / START_LOSSES)
    assert share == pytest.approx(0.0, abs=0.02) and lowest == pytest.approx(1.0, abs=0.1)
    # Back at 1.8 (below the first loss, so no divergence event) for long enough for the running mean to follow.
    events = [bool(det.update(torch.tensor(1.8))) for _ in range(200)]
    share, mean, _, lowest = det.progress().tolist()
    assert not any(events)
    assert share == pytest.approx((mean - lowest) / (start - lowest)) and 0.7 < share < 0.85


def test_a_noisy_reference_batch_does_not_read_as_lost_progress() -> None:
    # One easy first batch (0.65 where the run starts near 1.0), then a learning curve down to 0.5 with ordinary noise:
    # measured from the first loss alone, the noise of the running mean around 0.5 is a large part of 0.65 - 0.5 (a
    # share of 0.27 here; 0.12 from the starting level).
    g = torch.Generator().manual_seed(2)
    noise = 1 + 0.2 * torch.randn(599, generator=g)
    curve = [0.65] + [(1.0 - 0.5 * min(1.0, t / 150)) * float(noise[t]) for t in range(599)]
    det = DivergenceDetector()
    shares = []
    for loss in curve:
        det.update(torch.tensor(loss))
        shares.append(det.progress()[0].item())
    assert max(v for v in shares if not math.isnan(v)) < 0.2


def test_a_state_saved_before_the_starting_level_was_kept_measures_from_the_first_loss() -> None:
    det = DivergenceDetector()
    _progress(det, [2.0 - i / 100 for i in range(100)] + [1.6] * 50)
    old = {"state": det.state_dict()["state"][:7]}  # as saved by the previous release
    loaded = DivergenceDetector()
    loaded.load_state_dict(old)
    _, _, start, _ = loaded.progress().tolist()
    assert start == pytest.approx(2.0)


def test_progress_survives_a_state_dict_round_trip() -> None:
    det = DivergenceDetector()
    _progress(det, [2.0 - i / 100 for i in range(100)] + [1.6] * 50)
    copy = DivergenceDetector()
    copy.load_state_dict(det.state_dict())
    assert copy.progress().tolist() == det.progress().tolist()


# ------------------------------------------------------------------------------------------- Trainer runs
_IN, _CLASSES, _BATCH = 32, 10, 32


def _teacher_data(steps: int, seed: int) -> DataLoader:
    """Gaussian inputs labelled by a fixed random tanh teacher: a classifier an MLP learns to about half the loss."""
    teacher = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(_IN, 64, generator=teacher), torch.randn(64, _CLASSES, generator=teacher)
    x = torch.randn(steps * _BATCH, _IN, generator=torch.Generator().manual_seed(seed))
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=_BATCH)


class _Classifier(L.LightningModule):
    """An MLP classifier (SGD with momentum) whose rate is multiplied by ``raise_by`` from step ``raise_at`` on."""

    def __init__(self, raise_by: float, raise_at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(_IN, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        self.raise_by, self.raise_at = raise_by, raise_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.raise_by if s >= self.raise_at else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(raise_by: float, steps: int = 400) -> tuple[GradGuard, MetricsLogger, list[str]]:
    torch.manual_seed(0)
    guard, logger = GradGuard(), MetricsLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(max_steps=steps, callbacks=[guard], logger=logger)
        run.fit(_Classifier(raise_by, 200), _teacher_data(steps, 0))
    return guard, logger, [str(w.message) for w in caught if "climbed back" in str(w.message)]


def test_a_rate_raised_tenfold_mid_run_collapses_the_model_and_is_warned_about_once() -> None:
    guard, logger, messages = _fit(raise_by=10.0)
    shares = logger.series("gradguard/loss_relapse")
    # The collapse: no divergence event (the loss never rises above the untrained one) ...
    assert guard.summary()["diverging"] == 0
    # ... but most of the progress is given back, charted, and warned about once.
    assert max(shares) > 0.8 and len(messages) == 1
    assert guard.loss_relapse() == shares[-1]  # the last log's share, on the host
    assert "too high for this stage of training" in messages[0] and "at step" in messages[0]


def test_a_healthy_run_gives_nothing_back_and_is_not_warned_about() -> None:
    _, logger, messages = _fit(raise_by=1.0)
    shares = logger.series("gradguard/loss_relapse")
    assert shares and max(shares) < RELAPSE_WARNING / 2 and messages == []


def test_the_engine_snapshot_carries_the_progress_and_its_chart() -> None:
    model = nn.Linear(4, 1)
    engine = GuardEngine(model, clip=None, lr_guard=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)  # learnable: the loss falls well below its starting level
    assert engine.snapshot().loss_progress is None  # no loss yet
    for _ in range(80):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        engine.step(loss=loss)
        opt.step()
    snap = engine.snapshot()
    assert snap.loss_progress is not None
    share, mean, start, _ = snap.loss_progress
    assert mean < start and snap.metrics()["gradguard/loss_relapse"] == share


class _Scripted(L.LightningModule):
    """Returns a scripted loss (with an exactly-zero gradient, which no gradient detector observes)."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.losses = losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.w * 0.0).sum() + self.losses[self.global_step]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("bump", "warned"), [(40, False), (100, True)])
def test_the_warning_needs_the_share_to_hold_for_the_running_means_time_constant(bump: int, warned: bool) -> None:
    # Learned from 2 to 1, then back at 2 for `bump` steps, then at 1 again: 40 steps keep the share above the bar
    # for about 30 (the noise of a small-batch loss does that), 100 for about 90.
    losses = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * bump + [1.0] * 100
    steps = len(losses)
    logger = MetricsLogger()
    data = DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=steps, callbacks=[GradGuard()], logger=logger).fit(_Scripted(losses), data)
    messages = [str(w.message) for w in caught if "climbed back" in str(w.message)]
    assert max(logger.series("gradguard/loss_relapse")) > RELAPSE_WARNING
    assert len(messages) == int(warned)


def test_every_fit_is_warned_about_once_and_a_hold_does_not_carry_into_the_next_fit() -> None:
    collapse = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * 150
    guard, module = GradGuard(), _Scripted(collapse)
    for _ in range(2):  # the second fit's steps start from 0 again
        data = DataLoader(TensorDataset(torch.zeros(len(collapse), 1)), batch_size=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=len(collapse), callbacks=[guard]).fit(module, data)
        assert sum("climbed back" in str(w.message) for w in caught) == 1


def test_a_log_without_a_share_ends_the_hold() -> None:
    reporter = GradGuard()._reporter

    def log(step: int, share: float | None) -> None:
        progress = None if share is None else (share, 1.5, 2.0, 1.0)
        reporter._check_relapse(0, step, SimpleNamespace(loss_progress=progress), None)  # type: ignore[arg-type]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log(100, 0.5)
        log(110, None)  # a restart or a new phase: no loss seen since
        log(800, 0.5)  # relearned and over the bar again: a new hold starts here
        assert not caught
        log(850, 0.5)
    assert len(caught) == 1


def test_a_resumed_fit_is_the_same_fit_and_is_not_warned_about_again(tmp_path: Any) -> None:
    collapse = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * 250

    def fit(steps: int, ckpt_path: str | None = None) -> tuple[L.Trainer, int]:
        data = DataLoader(TensorDataset(torch.zeros(len(collapse), 1)), batch_size=1)
        run = trainer(max_steps=steps, max_epochs=-1, callbacks=[GradGuard()], default_root_dir=tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.fit(_Scripted(collapse), data, ckpt_path=ckpt_path)
        return run, sum("climbed back" in str(w.message) for w in caught)

    first, warned = fit(350)
    assert warned == 1
    first.save_checkpoint(tmp_path / "collapsed.ckpt")
    _, warned = fit(450, ckpt_path=str(tmp_path / "collapsed.ckpt"))  # still collapsed, for 100 more steps
    assert warned == 0


def test_on_diverging_ignore_silences_the_relapse_warning_too() -> None:
    collapse = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * 150
    data = DataLoader(TensorDataset(torch.zeros(len(collapse), 1)), batch_size=1)
    logger = MetricsLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(max_steps=len(collapse), callbacks=[GradGuard(on_diverging="ignore")], logger=logger)
        run.fit(_Scripted(collapse), data)
    assert not any("climbed back" in str(w.message) for w in caught)
    assert max(logger.series("gradguard/loss_relapse")) > 0.9  # still measured and charted


def test_the_share_reaches_tensorboard_and_gradguard_report_names_its_peak(tmp_path: Any, capsys: Any) -> None:
    collapse = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * 150
    data = DataLoader(TensorDataset(torch.zeros(len(collapse), 1)), batch_size=1)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=len(collapse), callbacks=[GradGuard()], logger=logger).fit(_Scripted(collapse), data)
    assert main(["report", str(tmp_path), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["runs"].values()
    relapse = summary["optimizers"]["opt0"]["loss_relapse"]
    shares = scalar_series(event_files(tmp_path)[0])["gradguard/loss_relapse"]
    peak_step, peak = max(shares, key=lambda point: point[1])
    assert relapse["max"] == pytest.approx(peak) and relapse["step"] == peak_step and peak > 0.9
    assert main(["report", str(tmp_path)]) == 0
    assert re.search(rf"loss relapse max\s+{peak:.2f} at step {peak_step}\b", capsys.readouterr().out)


class _GrowingScripted(_Scripted):
    """The scripted loss, with a head the optimizer is given as a param group at step ``add_at`` (the engine is
    rebuilt then, its statistics carried over)."""

    def __init__(self, losses: list[float], add_at: int) -> None:
        super().__init__(losses)
        self.head = nn.Linear(1, 1)
        self.add_at = add_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + (self.head.weight * 0.0).sum()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.add_at:
            self.optimizers().optimizer.add_param_group({"params": list(self.head.parameters()), "lr": 0.1})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.w], lr=0.1)


def test_an_engine_rebuilt_mid_fit_keeps_the_fits_relapse_warning() -> None:
    collapse = [2.0 - i / 100 for i in range(100)] + [1.0] * 100 + [2.0] * 250
    data = DataLoader(TensorDataset(torch.zeros(len(collapse), 1)), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=len(collapse), callbacks=[GradGuard()]).fit(_GrowingScripted(collapse, 300), data)
    assert sum("climbed back" in str(w.message) for w in caught) == 1  # it warned twice: before the rebuild and after
