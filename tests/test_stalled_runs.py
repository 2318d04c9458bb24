"""A run whose every step has non-finite gradients while its weights stay finite has stopped training: GradGuard says
so once, names a non-finite buffer where one is the cause, and gives no advice about the rate at the end of the fit.
Real ``Trainer.fit`` runs on CPU."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_gradguard import GradGuard, LRGuard
from tests.models import NaNAtSteps, Regressor, regression_data, trainer

STOPPED = "had non-finite gradients, each"


class PoisonedBuffer(Regressor):
    """A regressor that centres its inputs by a running mean (a buffer); one NaN input at ``at`` leaves the mean NaN,
    and every later loss with it."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.register_buffer("centre", torch.zeros(16))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.at:
            x = x.clone()
            x[0, 0] = float("nan")
        with torch.no_grad():
            self.centre.lerp_(x.mean(0), 0.1)
        return nn.functional.mse_loss(self(x - self.centre), y)


def _fit(
    module: Regressor,
    caplog: pytest.LogCaptureFixture,
    log_every_n_steps: int = 10,
    callbacks: tuple[Any, ...] = (),
    ckpt_path: str | None = None,
    **guard: Any,
) -> tuple[GradGuard, list[str], str]:
    torch.manual_seed(0)
    gg = GradGuard(**guard)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        fit = trainer(
            max_epochs=8,
            callbacks=[gg, *callbacks],
            log_every_n_steps=log_every_n_steps,
            enable_checkpointing=bool(callbacks),
        )
        fit.fit(module, regression_data(n=320, batch_size=16), ckpt_path=ckpt_path)
    messages = [str(w.message) for w in caught if str(w.message).startswith("GradGuard")]
    return gg, messages, caplog.text


def test_a_run_that_stopped_training_is_named_once_with_the_buffer_behind_it(caplog: pytest.LogCaptureFixture) -> None:
    module = PoisonedBuffer(at=30)
    guard, messages, log = _fit(module, caplog)
    # One cut for the run in a row, at twice the patience, none after: nothing applied.
    assert guard.summary()["skipped"] == 160 - 30 and guard.summary()["lr_reduced"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == 1
    assert "since step 30 at the latest" in stopped[0] and "skipped" in stopped[0]
    assert "buffer 'centre' holds NaN" in stopped[0]
    # The weights themselves are among the sources named, and the skipped steps leave them where they are.
    assert "from the weights themselves" in stopped[0] and "go back to a checkpoint" in stopped[0]
    assert "a ceiling, the highest that stayed finite" not in log
    # Cut twice (without sparing: the pair, then the run), the end-of-fit rate line gives no ceiling for the next run
    # either: the cuts answered a run that had stopped.
    guard, messages, log = _fit(PoisonedBuffer(at=30), caplog, lr_guard=LRGuard(spare_lone=False))
    assert guard.summary()["lr_reduced"] == 2 and len([m for m in messages if STOPPED in m]) == 1
    assert "say nothing about the rate for the next one" in log
    # The run may have stopped before the first log that saw it: "at the latest", as the warning says.
    assert "since step 30 at the latest had non-finite gradients (see the warning about it)" in log
    assert "a ceiling, the highest that stayed finite" not in log


def test_a_burst_of_nonfinite_batches_is_no_stopped_run(caplog: pytest.LogCaptureFixture) -> None:
    # Six non-finite steps in a row (a logging window of ten with four finite steps): bad batches, not a stop.
    guard, messages, _ = _fit(NaNAtSteps(*range(41, 47)), caplog)
    assert guard.summary()["skipped"] == 6
    assert not any(STOPPED in m for m in messages)


@pytest.mark.parametrize(("every", "since"), [(50, None), (10, 40)])
def test_only_whole_logging_windows_of_nonfinite_steps_make_a_stopped_run(
    caplog: pytest.LogCaptureFixture, every: int, since: int | None
) -> None:
    # Thirty non-finite steps in a row, 35-64: in logging windows of 50 each window has finite steps; in windows of
    # 10, two whole windows (40-49, 50-59) are non-finite, 20 steps, and the run has stopped since step 40 so far.
    guard, messages, _ = _fit(NaNAtSteps(*range(35, 65)), caplog, log_every_n_steps=every)
    assert guard.summary()["skipped"] == 30
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == (0 if since is None else 1)
    if since is not None:
        assert f"since step {since} at the latest (20 steps, up to step 59)" in stopped[0]


@pytest.mark.parametrize("at", [40, 60])
def test_a_stopped_run_resumed_from_a_checkpoint_counts_from_the_same_step(
    caplog: pytest.LogCaptureFixture, tmp_path: Any, at: int
) -> None:
    # Checkpoints before the warning (step 40: the run of non-finite windows has begun) and after it (step 60). Before,
    # the count started again at the resume: the warning came 20 steps late and named a later step, or the end of
    # the fit referred to a warning the resumed fit never gave, at a later step.
    # Without sparing, the run is cut twice, and the end of the fit refers to the warning.
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1, save_last=False)
    _fit(PoisonedBuffer(at=30), caplog, callbacks=(saver,), lr_guard=LRGuard(spare_lone=False))
    path = next(tmp_path.glob(f"*step={at}.ckpt"))
    guard, messages, log = _fit(PoisonedBuffer(at=30), caplog, ckpt_path=str(path), lr_guard=LRGuard(spare_lone=False))
    stopped = [m for m in messages if STOPPED in m]
    if at == 40:
        # The count of steps between them read 21 under Lightning 2.4.0 (20 on later versions); the steps agree.
        assert len(stopped) == 1 and "since step 30 at the latest (" in stopped[0] and "up to step 49)" in stopped[0]
    else:
        assert stopped == []  # given before the checkpoint
    assert "every step since step 30 at the latest had non-finite gradients" in log
    assert guard.summary()["lr_reduced"] == 2


def test_zeroed_steps_of_a_stopped_run_are_said_to_be_zeroed(caplog: pytest.LogCaptureFixture) -> None:
    _, messages, _ = _fit(PoisonedBuffer(at=30), caplog, on_nonfinite="zero")
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == 1 and "its inf/NaN entries zeroed" in stopped[0]
    # The finite entries still train: not "the model has not trained since", nor weights left where they are.
    assert "those entries have not trained since" in stopped[0]
    assert "the model has not trained since" not in stopped[0] and "where they are" not in stopped[0]


def test_runs_of_nonfinite_batches_that_end_by_themselves_cut_no_more(caplog: pytest.LogCaptureFixture) -> None:
    # Runs of five NaN batches with a finite step between (a loss NaN on some batches by itself: 0 * log 0 in a
    # hand-written BCE): the first run cuts once, at four in a row; a run that ended on the weights it began with
    # was the batches' doing, and the later ones cut nothing (before, one cut per run: 20 here).
    bad = [s for s in range(42, 142) if s % 6 != 5]
    guard, messages, log = _fit(NaNAtSteps(*bad), caplog, log_every_n_steps=50)
    assert guard.summary()["skipped"] == len(bad) and guard.summary()["lr_reduced"] == 1
    assert not any(STOPPED in m for m in messages)
    assert "a ceiling, the highest that stayed finite" not in log
    # Without sparing the pair cuts too: two cuts, and the end-of-fit line gives no ceiling, since nothing exploded.
    guard, messages, log = _fit(NaNAtSteps(*bad), caplog, log_every_n_steps=50, lr_guard=LRGuard(spare_lone=False))
    assert guard.summary()["lr_reduced"] == 2
    assert guard.lr_guard is not None and guard.lr_guard.scale() < 1.0
    assert "all for non-finite gradients with nothing exploding" in log
    assert "a ceiling, the highest that stayed finite" not in log
    # Ended below its schedule: the end-of-fit line gives no ceiling, since nothing exploded.
    assert guard.lr_guard is not None and guard.lr_guard.scale() < 1.0
    assert "all for non-finite gradients with nothing exploding" in log
    assert "a ceiling, the highest that stayed finite" not in log


class InfeasibleCTC(Regressor):
    """A CTC model whose targets are longer than its inputs from step ``bad_from`` on: the loss is +inf on every batch
    from there (no alignment exists)."""

    def __init__(self, bad_from: int | None) -> None:
        super().__init__()
        self.bad_from = bad_from
        self.head = nn.Linear(16, 5)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        bad = self.bad_from is not None and self.global_step >= self.bad_from
        frames = 3 if bad else 12
        steps = self.head(x).unsqueeze(0).expand(frames, -1, -1)  # (T, N, C)
        targets = torch.ones(x.shape[0], 4, dtype=torch.long)
        inputs = torch.full((x.shape[0],), frames, dtype=torch.long)
        lengths = torch.full((x.shape[0],), 4, dtype=torch.long)
        return nn.functional.ctc_loss(steps.log_softmax(-1), targets, inputs, lengths)


def test_non_finite_steps_on_weights_no_step_has_changed_neither_cut_nor_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # +inf from the first step: every step is skipped, so every gradient comes from the initial weights, which no
    # rate made. Before, the run of them was cut 5 times and restarted 4 (to a rate 0.06x), for nothing.
    guard, messages, log = _fit(InfeasibleCTC(bad_from=0), caplog)
    summary = guard.summary()
    assert summary["nonfinite"] == summary["skipped"] == 160
    assert summary["lr_reduced"] == 0 and summary["rolled_back"] == 0
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == 1 and "since step 0 at the latest" in stopped[0]
    # The loss itself is infinite, and the warning says so.
    assert "The training loss is +inf" in stopped[0] and "zero_infinity=True" in stopped[0]
    assert "restarted" not in log and "exploded early" not in log


def test_only_an_infinite_loss_is_called_infinite(caplog: pytest.LogCaptureFixture) -> None:
    # +inf from step 30 on, after training on feasible targets: said too.
    _, messages, _ = _fit(InfeasibleCTC(bad_from=30), caplog)
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == 1 and "The training loss is +inf" in stopped[0]
    # A loss that is finite while the gradients are not (a NaN buffer) is not called infinite.
    _, messages, _ = _fit(PoisonedBuffer(at=30), caplog)
    assert [m for m in messages if STOPPED in m] and not any("+inf" in m for m in messages)
    # Feasible targets: the loss is finite and nothing stops.
    _, messages, _ = _fit(InfeasibleCTC(bad_from=None), caplog)
    assert not any(STOPPED in m for m in messages)


def test_a_refit_that_stalls_from_its_first_step_names_no_step_before_it(caplog: pytest.LogCaptureFixture) -> None:
    # The same guard and model fitted again, +inf throughout: the engine's steps go on from the first fit, and the
    # run was named "since step -40". A refit's run is named from its first log, "at the latest".
    guard = GradGuard()
    model = InfeasibleCTC(bad_from=0)
    stopped: list[str] = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=40, max_epochs=-1, callbacks=[guard], log_every_n_steps=10).fit(
                model, regression_data(n=320)
            )
        stopped += [str(w.message) for w in caught if STOPPED in str(w.message)]
    assert len(stopped) == 2 and "since step 0 at the latest" in stopped[0]
    assert "since step -" not in stopped[1] and "since step 10 at the latest" in stopped[1]


class MaskedNaNTargets(Regressor):
    """Targets with missing entries (NaN) masked out with ``torch.where``: the loss is finite, but the discarded branch
    sends NaN gradients back on every batch (``masked=False``; ``masked=True`` fills the NaN first)."""

    def __init__(self, fill_first: bool) -> None:
        super().__init__()
        self.fill_first = fill_first

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        y = y.clone()
        y[::4] = float("nan")
        observed = ~torch.isnan(y)
        if self.fill_first:
            y = torch.nan_to_num(y)
        squared = (self(x) - y) ** 2
        return torch.where(observed, squared, torch.zeros_like(squared)).sum() / observed.sum()


def test_a_finite_loss_over_nan_gradients_is_traced_to_the_backward_pass(caplog: pytest.LogCaptureFixture) -> None:
    # A user trial skipped all 600 steps of this bug while the warning listed buffers, data and checkpoints.
    guard, messages, _ = _fit(MaskedNaNTargets(fill_first=False), caplog)
    assert guard.summary()["skipped"] == 160
    stopped = [m for m in messages if STOPPED in m]
    assert len(stopped) == 1 and "The training loss is finite (" in stopped[0]
    assert "arises in the backward pass" in stopped[0] and "torch.nan_to_num(y)" in stopped[0]
    # A NaN loss is not called finite: NaN inputs on every batch (no buffer to name), the poisoned buffer's.
    _, messages, _ = _fit(NaNAtSteps(*range(200)), caplog)
    assert [m for m in messages if STOPPED in m] and not any("backward pass" in m for m in messages)
    _, messages, _ = _fit(PoisonedBuffer(at=30), caplog)
    assert [m for m in messages if STOPPED in m] and not any("backward pass" in m for m in messages)
    # Filling the NaN first trains without a warning.
    guard, messages, _ = _fit(MaskedNaNTargets(fill_first=True), caplog)
    assert guard.summary().get("nonfinite", 0) == 0 and not any(STOPPED in m for m in messages)
