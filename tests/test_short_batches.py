"""A short batch (the last of an epoch, or a batch size lowered mid-run) is noisier by design, not an explosion.

The noise in a mean gradient grows as the batch shrinks: a last batch of 1 after batches of 64 has about 8x the noise
of the others. Before, such a batch at the end of every epoch (``DataLoader(drop_last=False)``, the default) was
flagged as exploding against the full batches' history, and the LR guard cut the rate of a healthy run.
"""

from __future__ import annotations

import math
from collections import UserDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GuardEngine, NormClip
from lightning_gradguard._lightning import batch_size, same_batch_size_on_every_rank

# ------------------------------------------------------------------------------------------- the engine's rule


def _engine(**kwargs: Any) -> tuple[nn.Linear, GuardEngine]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, GuardEngine(model, clip=None, lr_guard=None, **kwargs)


def _step(engine: GuardEngine, model: nn.Linear, norm: float, samples: int | None, loss: float | None = None) -> None:
    model.weight.grad = torch.full_like(model.weight, norm / math.sqrt(model.weight.numel() + 1))
    model.bias.grad = torch.full_like(model.bias, norm / math.sqrt(model.weight.numel() + 1))
    engine.step(samples=samples, loss=loss)


def test_a_short_batch_is_neither_judged_nor_learned_from() -> None:
    model, engine = _engine()
    for i in range(40):
        _step(engine, model, 1.0 + 0.05 * math.sin(i), samples=64)
    before = engine.state_dict()["exploding"]
    _step(engine, model, 8.0, samples=1)  # the last batch of the epoch: 8x the norm
    assert engine.summary()["exploding"] == 0
    after = engine.state_dict()["exploding"]
    assert all(torch.equal(before[k], after[k]) for k in ("mean", "var", "count"))
    _step(engine, model, 1.0, samples=64)
    _step(engine, model, 8.0, samples=64)  # the same norm on a full batch is an explosion
    assert engine.summary()["exploding"] == 1


def test_a_short_batch_far_beyond_its_noise_is_flagged_and_capped_without_being_learned_from() -> None:
    # A batch of 1 after batches of 64 is about 8x noisier: judged against 100x that (800x the average), a bad batch on
    # the short last batch is still one. Its cap is what a batch of its size shows on average.
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    # A clipper that never binds by itself: what clips is the exploding detector's cap.
    engine = GuardEngine(model, clip=NormClip(max_norm=1e9), lr_guard=None)
    for i in range(40):
        _step(engine, model, 1.0 + 0.05 * math.sin(i), samples=64)
    _step(engine, model, 500.0, samples=1)  # 62x its noise: a noisy batch, not judged
    assert engine.summary()["exploding"] == 0
    _step(engine, model, 1.0, samples=64)  # (two short batches in a row would be a new batch size)
    before = engine.state_dict()["exploding"]
    _step(engine, model, 1e4, samples=1)
    assert engine.summary()["exploding"] == 1 and engine.summary()["clipped"] == 1
    grad = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])
    assert float(grad.norm()) == pytest.approx(8.0, rel=0.05)  # the average norm, 1.0, times the noise of one example
    after = engine.state_dict()["exploding"]
    assert all(torch.equal(before[k], after[k]) for k in ("mean", "var", "count"))


def test_a_short_batch_is_judged_from_the_first_observation_on() -> None:
    model, engine = _engine()
    _step(engine, model, 64.0, samples=64)
    _step(engine, model, 1e6, samples=1)  # one observation: an average exists, and this is far beyond it
    assert engine.summary()["exploding"] == 1
    # A usual batch whose gradients were non-finite is no observation: no average to judge a short batch by.
    model, engine = _engine(on_nonfinite="skip")
    _step(engine, model, math.inf, samples=64)
    _step(engine, model, 1e6, samples=1)
    assert engine.summary()["exploding"] == 0


def test_a_short_batch_still_has_its_non_finite_gradients_skipped() -> None:
    model, engine = _engine(on_nonfinite="skip")
    for _ in range(5):
        _step(engine, model, 1.0, samples=64)
    _step(engine, model, math.inf, samples=3)
    assert engine.skipped and model.weight.grad is None
    assert engine.summary()["nonfinite"] == 1


def test_a_short_batch_keeps_its_loss_from_the_divergence_detector() -> None:
    model, engine = _engine()
    for _ in range(30):
        _step(engine, model, 1.0, samples=64, loss=1.0)
    _step(engine, model, 1.0, samples=2, loss=1e3)  # one example with a huge error: no divergence
    _step(engine, model, 1.0, samples=64, loss=1.0)
    assert engine.summary()["diverging"] == 0


def test_a_batch_size_that_lasts_is_the_new_normal() -> None:
    model, engine = _engine()
    for i in range(30):
        _step(engine, model, 1.0 + 0.05 * math.sin(i), samples=256)
    _step(engine, model, 8.0, samples=4)  # short: not judged
    _step(engine, model, 8.0, samples=4)  # the second in a row: a new batch size, the statistics start again on it
    assert engine.state_dict()["batch_size"] == 4
    assert float(engine.state_dict()["exploding"]["count"][0]) == 1
    for i in range(40):
        _step(engine, model, 8.0 + 0.4 * math.sin(i), samples=4)
    assert engine.summary()["exploding"] == 0
    # A larger batch again is judged (less noise cannot look like an explosion) and becomes the usual size.
    _step(engine, model, 8.0, samples=64)
    assert engine.state_dict()["batch_size"] == 64


def test_sizes_that_change_from_step_to_step_turn_the_rule_off() -> None:
    # Batches bucketed by length and read along a time-major layout (or dynamic batches) have no usual size: two full
    # steps in a row on another size than the step before turn the rule off, so a small one is judged and starts
    # no new phase. Before, every bucket of short sequences after long ones restarted the statistics.
    model, engine = _engine()
    for samples in (40, 55, 50):
        _step(engine, model, 1.0, samples=samples)
    assert engine.state_dict()["size_changes"] == 2
    for _ in range(2):
        _step(engine, model, 1.0, samples=10)  # two "short" steps in a row: judged, no new phase
    assert float(engine.state_dict()["exploding"]["count"][0]) == 5
    _, restored = _engine()
    restored.load_state_dict(engine.state_dict())
    assert restored.state_dict()["size_changes"] == 2
    # One change of a fixed size (a GradientAccumulationScheduler, a new data set) keeps the rule: the short last
    # batch after it is still left unjudged.
    for sizes in ((64, 64, 256, 256, 256, 8), (64, 64, 40, 40, 40, 8)):  # larger for good, or smaller within half
        model, engine = _engine()
        for samples in sizes:
            _step(engine, model, 1.0, samples=samples)
        state = engine.state_dict()
        assert state["size_changes"] == 0 and state["short_run"] == 1 and float(state["exploding"]["count"][0]) == 5


def test_the_usual_batch_size_is_saved_and_restored() -> None:
    model, engine = _engine()
    for _ in range(3):
        _step(engine, model, 1.0, samples=32)
    _step(engine, model, 1.0, samples=3)
    state = engine.state_dict()
    assert (state["batch_size"], state["short_run"]) == (32, 1)
    _, restored = _engine()
    restored.load_state_dict(state)
    assert (restored.state_dict()["batch_size"], restored.state_dict()["short_run"]) == (32, 1)
    legacy = {k: v for k, v in state.items() if k not in ("batch_size", "short_run")}
    restored.load_state_dict(legacy)  # a state saved before the rule: the next batch sets the size
    assert restored.state_dict()["batch_size"] == 0


def test_samples_takes_numpy_integers() -> None:
    model, engine = _engine()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    engine.step(samples=np.int64(32))
    assert engine.state_dict()["batch_size"] == 32


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "8", torch.tensor(8)])
def test_samples_must_be_a_positive_int(bad: Any) -> None:
    model, engine = _engine()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    with pytest.raises(ValueError, match="`samples`"):
        engine.step(samples=bad)


def test_a_partial_window_is_judged_at_its_share_of_the_norm() -> None:
    # An epoch's last window of 1 of 4 micro-batches, each loss divided by 4: its gradient is a quarter of a mean over
    # its batch, so the gross limit is 100 x 2 (noise) x 1/4 = 50x the average, not 200x.
    def engine_after_history() -> tuple[nn.Linear, GuardEngine]:
        model, engine = _engine()
        for i in range(40):
            _step(engine, model, 1.0 + 0.05 * math.sin(i), samples=64)
        return model, engine

    model, engine = engine_after_history()
    model.weight.grad = torch.full_like(model.weight, 100.0 / math.sqrt(5))
    model.bias.grad = torch.full_like(model.bias, 100.0 / math.sqrt(5))
    engine.step(samples=16, share=0.25)
    assert engine.summary()["exploding"] == 1
    model, engine = engine_after_history()
    model.weight.grad = torch.full_like(model.weight, 100.0 / math.sqrt(5))
    model.bias.grad = torch.full_like(model.bias, 100.0 / math.sqrt(5))
    engine.step(samples=16)  # a short batch of its own (a mean over 16): 100x is within 200x
    assert engine.summary()["exploding"] == 0


def test_a_partial_window_gives_the_divergence_detector_its_mean_loss() -> None:
    # Half a window whose losses were each divided by the full window's size sums to half the mean: divided by its
    # share, the detector sees the mean (0.5 * 1e3 / 0.5), and so the blown-up loss is one.
    model, engine = _engine()
    for _ in range(30):
        _step(engine, model, 1.0, samples=64, loss=1.0)
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight) / 2, torch.ones_like(model.bias) / 2
    seen: list[float] = []
    assert engine.divergence is not None
    update = engine.divergence.update
    engine.divergence.update = lambda loss: (seen.append(float(loss)), update(loss))[1]  # type: ignore[method-assign]
    engine.step(samples=32, share=0.5, loss=0.5)
    assert seen == [1.0]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan, True, "1"])
def test_share_must_be_in_zero_one(bad: Any) -> None:
    model, engine = _engine()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    with pytest.raises(ValueError, match="`share`"):
        engine.step(samples=8, share=bad)


def test_batch_size_is_the_first_dimension_every_tensor_shares() -> None:
    x = torch.zeros(5, 3)
    assert batch_size(x) == 5
    assert batch_size((x, torch.zeros(5))) == 5
    # Time-major sequences (T, B, F) beside targets (B,): no shared first dimension, no batch size.
    assert batch_size((torch.zeros(40, 5, 3), torch.zeros(5))) is None
    assert batch_size({"input_ids": torch.zeros(3, 9), "labels": [torch.zeros(3)]}) == 3
    assert batch_size([{"a": "text"}, [torch.zeros(4, 1)]]) == 4
    assert batch_size(UserDict(input_ids=torch.zeros(6, 2))) == 6  # e.g. Hugging Face's BatchEncoding
    assert batch_size(["no", "tensors"]) is None
    assert batch_size(torch.tensor(1.0)) is None
    # A 0-d tensor beside the data is passed over; dataclasses are looked into, field by field.
    assert batch_size({"epoch": torch.tensor(3), "x": torch.zeros(8, 2)}) == 8
    assert batch_size(_Batch(step=torch.tensor(0), x=torch.zeros(9, 16), y=torch.zeros(9, 1))) == 9
    assert batch_size(_Batch) is None  # the class itself is no batch


def test_several_processes_count_examples_only_where_their_batches_are_the_same_size() -> None:
    data = TensorDataset(torch.zeros(10, 1))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(range(3))

    def ranks(loader: Any, distributed_sampler: bool = True, world_size: int = 2) -> bool:
        connector = SimpleNamespace(use_distributed_sampler=distributed_sampler)
        trainer = SimpleNamespace(world_size=world_size, _accelerator_connector=connector, train_dataloader=loader)
        return same_batch_size_on_every_rank(trainer)

    assert ranks(DataLoader(data, batch_size=4), world_size=1, distributed_sampler=False)
    assert ranks(DataLoader(data, batch_size=4))
    assert ranks({"a": DataLoader(data, batch_size=4), "b": [DataLoader(data, batch_size=2)]})
    assert not ranks(DataLoader(data, batch_size=4), distributed_sampler=False)  # each process's own sampler
    assert not ranks(DataLoader(data, batch_sampler=[[0, 1], [2]]))  # a batch sampler of the user's: sizes may differ
    assert not ranks(DataLoader(Stream(), batch_size=2))  # an iterable data set: each process's share may differ
    assert not ranks(None)


# ----------------------------------------------------------------------------------------- in Trainer.fit


class _Noisy(L.LightningModule):
    """A small regression with label noise, so that one example's gradient is far from the batch mean's."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 1, generator=g)) + 0.3 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def _fit(
    loader: DataLoader, guard: GradGuard | None, model_cls: type[_Noisy] = _Noisy, **trainer_kwargs: Any
) -> tuple[_Noisy, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = model_cls(lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard] if guard is not None else [],
        **trainer_kwargs,
    )
    trainer.fit(model, loader)
    return model, trainer


@torch.no_grad()
def _mse(model: _Noisy, data: TensorDataset) -> float:
    x, y = data.tensors
    return float(nn.functional.mse_loss(model.net(x), y))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_last_batch_of_one_every_epoch_is_no_explosion(accumulate: int) -> None:
    # 64 x 20 + 1 examples: every epoch ends on a batch of one (before: 15 exploding events, 6 LR cuts).
    data = _data(64 * 20 + 1)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    guard = GradGuard()
    guarded, _ = _fit(loader(), guard, max_epochs=25, accumulate_grad_batches=accumulate)
    bare, _ = _fit(loader(), None, max_epochs=25, accumulate_grad_batches=accumulate)
    events = guard.summary()
    assert events["exploding"] == 0 and events["lr_reduced"] == 0 and events["diverging"] == 0, events
    assert _mse(guarded, data) <= 1.02 * _mse(bare, data)


class _SpikyLast(_Noisy):
    """Every epoch's short last batch, from the second epoch on, has its loss multiplied by 1e4 (a bad batch)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if batch[0].shape[0] < 16 and self.current_epoch >= 1 else loss


def test_a_bad_batch_on_the_short_last_batch_is_caught_within_the_clippers_warm_up() -> None:
    # 6 batches of 16 and one of 6 per epoch: the epoch-2 bad batch (step 13) comes within ZClip's 25-step warm-up,
    # where the unjudged short batch went through whole (user trial: an SGD run wrecked, held-out 5.7e27; now flagged
    # and capped). The same spike on a full batch was always flagged.
    data = _data(102)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=16, shuffle=False)

    class _Sgd(_SpikyLast):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class _Clean(_Noisy):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    guard = GradGuard()
    guarded, _ = _fit(loader(), guard, _Sgd, max_epochs=6)
    events = guard.summary()
    assert events["exploding"] == 5 and events["clipped"] >= 5 and events["lr_reduced"] == 0, events
    clean, _ = _fit(loader(), None, _Clean, max_epochs=6)
    assert _mse(guarded, data) <= 1.05 * _mse(clean, data)  # unguarded with the bad batches: NaN


class _SpikyPartial(_Noisy):
    """In epoch 9, the batch ``at`` has its loss multiplied by 300 (a bad batch)."""

    at = 8

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 300.0 if (self.current_epoch, batch_idx) == (9, self.at) else loss


@pytest.mark.parametrize("at", [4, 8], ids=["full_window", "partial_window"])
def test_a_bad_batch_alone_in_an_epochs_last_accumulation_window_is_flagged(at: int) -> None:
    # 9 batches per epoch, accumulated by 4: each epoch's last window holds one batch, whose loss Lightning divides by
    # 4 all the same. Before, that window counted as a short batch of a quarter of the usual size, 2x noisier: a 300x
    # bad batch there was clipped but not flagged (its norm came out 132x, under the 200x limit), where the same batch
    # in a full window was (user trial).
    data = _data(9 * 32)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=32, shuffle=False)

    model_cls = type("_Spiky", (_SpikyPartial,), {"at": at})
    guard = GradGuard()
    _fit(loader(), guard, model_cls, max_epochs=14, accumulate_grad_batches=4)
    events = guard.summary()
    assert events["exploding"] == 1 and events["lr_reduced"] == 0, events
    healthy = GradGuard()
    _fit(loader(), healthy, max_epochs=14, accumulate_grad_batches=4)
    assert healthy.summary()["exploding"] == 0


def test_partial_windows_of_half_a_window_leave_the_short_batch_rule_on() -> None:
    # 10 batches per epoch, accumulated by 4: windows of 4, 4 and 2 batches. The window of 2 is judged like a whole one
    # and is no change of the batch size: before, it and the whole window after it counted as two changes in a row,
    # which turned the short-batch rule off for the rest of the run.
    data = _data(10 * 32)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=32, shuffle=False)

    guard = GradGuard()
    _fit(loader(), guard, type("_Spiky", (_SpikyPartial,), {"at": 9}), max_epochs=14, accumulate_grad_batches=4)
    state = guard._states[0].state_dict()
    assert state["size_changes"] == 0 and state["batch_size"] == 4 * 32, state
    events = guard.summary()
    assert events["exploding"] == 1 and events["lr_reduced"] == 0, events  # the 300x batch in a window of 2


@dataclass
class _Batch:
    step: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


class _Dataclass(_Noisy):
    """Trains on :class:`_Batch` batches, whose first field is a 0-d tensor."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step((batch.x, batch.y), batch_idx)


def test_a_dataclass_batch_is_counted_and_its_short_last_batch_raises_nothing() -> None:
    # Before, the short-batch count stopped at the 0-d tensor and never looked into dataclasses: the rule was off
    # for such batches, while the noise scale read them through Lightning's own reader.
    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> _Batch:
        x, y = (torch.stack(t) for t in zip(*items))
        return _Batch(step=torch.tensor(0), x=x, y=y)

    guard = GradGuard()
    _fit(DataLoader(_data(64 * 20 + 1), batch_size=64, collate_fn=collate), guard, _Dataclass, max_epochs=10)
    assert guard._states[0].state_dict()["batch_size"] == 64
    events = guard.summary()
    assert events["exploding"] == 0 and events["lr_reduced"] == 0 and events["diverging"] == 0, events


class _Skips(_Noisy):
    """Returns no loss for batches 3-5 of each epoch: Lightning skips their optimizer step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if 3 <= batch_idx <= 5 else super().training_step(batch, batch_idx)


def test_a_batch_without_a_loss_adds_no_examples_to_the_next_step() -> None:
    guard = GradGuard()
    _fit(DataLoader(_data(64 * 12), batch_size=64), guard, _Skips, max_epochs=2)
    # The step after the skipped batches was on 64 examples, not 4 x 64 (which would make the usual size 256, the
    # next steps short, and two of them in a row would start the statistics again).
    engine = guard._states[0]
    assert engine.state_dict()["batch_size"] == 64 and engine.steps == 2 * 9
    assert float(engine.state_dict()["exploding"]["count"][0]) == engine.steps  # every step judged, none forgotten


def test_a_batch_size_lowered_mid_run_raises_nothing() -> None:
    # 256 examples a step for 100 steps, then 4: before, an exploding event (and, on another seed, an LR cut).
    data = _data(20000)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    batches, start = [], 0
    for step in range(300):
        size = 256 if step < 100 else 4
        batches.append(order[start : start + size])
        start = (start + size) % (len(data) - 256)
    guard = GradGuard()
    guarded, _ = _fit(DataLoader(data, batch_sampler=batches), guard, max_epochs=1)
    bare, _ = _fit(DataLoader(data, batch_sampler=batches), None, max_epochs=1)
    events = guard.summary()
    assert events["exploding"] == 0 and events["lr_reduced"] == 0, events
    assert _mse(guarded, data) <= 1.02 * _mse(bare, data)


class _TimeMajor(L.LightningModule):
    """An LSTM on sequences in PyTorch's default time-major layout: inputs (T, B, 4), targets (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 16)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(out[-1]).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _bucketed_fit(module: _TimeMajor, time_major_targets: bool) -> tuple[list[GuardEngine], GradGuard]:
    """40 steps on batches of 8 sequences each, bucketed by length (5 to 60 steps) and padded time-major as
    `pad_sequence` does (the targets too, with ``time_major_targets``); returns the engines that started a new phase
    (one entry per restart) and the guard."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 61, (320,), generator=g).sort().values.tolist()
    sequences = [torch.randn(n, 4, generator=g) for n in lengths]
    buckets = [list(range(i, i + 8)) for i in range(0, 320, 8)]
    order = torch.randperm(len(buckets), generator=g).tolist()

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*items)
        targets = nn.utils.rnn.pad_sequence(list(ys)) if time_major_targets else torch.stack(ys)
        return nn.utils.rnn.pad_sequence(list(xs)), targets

    data = [(x, x.cumsum(0)[:, 0] if time_major_targets else x.sum()) for x in sequences]
    loader = DataLoader(data, batch_sampler=[buckets[i] for i in order], collate_fn=collate)  # type: ignore[arg-type]
    phases: list[GuardEngine] = []
    original = GuardEngine.new_phase

    def counted(engine: GuardEngine) -> None:
        phases.append(engine)
        original(engine)

    L.seed_everything(0, verbose=False)
    guard = GradGuard()
    trainer = L.Trainer(
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GuardEngine, "new_phase", counted)
        trainer.fit(module, loader)
    return phases, guard


def test_time_major_sequences_bucketed_by_length_keep_their_statistics() -> None:
    # Read as a batch size, the length made every bucket of short sequences after long ones look like a smaller batch
    # size: the statistics started again every few steps, and the clipper and the detectors were in their warm-up
    # most of the run. With targets (B,) the tensors disagree on their first dimension: no batch size at all.
    phases, guard = _bucketed_fit(_TimeMajor(), time_major_targets=False)
    assert phases == []
    state = guard._states[0].state_dict()
    assert int(state["clip"]["count"]) == 40  # every step observed, none judged short
    assert state["batch_size"] == 0 and state["short_run"] == 0  # no batch size read from these batches


class _TimeMajorTargets(_TimeMajor):
    """The same LSTM with time-major targets too, ``(T, B)``: every tensor of a batch shares ``T`` first."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(out).squeeze(-1), y)


def test_fully_time_major_batches_bucketed_by_length_restart_at_most_once() -> None:
    # Every tensor time-major: the length is read as the batch size, and it changes from bucket to bucket. Before,
    # each bucket of short sequences after long ones was "a smaller batch size" and restarted the statistics (3 times
    # in these 40 steps); the sizes changing from step to step now turn the rule off after the first few steps.
    phases, guard = _bucketed_fit(_TimeMajorTargets(), time_major_targets=True)
    assert len(phases) <= 1, len(phases)
    assert guard._states[0].state_dict()["size_changes"] >= 2
