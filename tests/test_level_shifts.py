"""A jump that then holds its level is the data's, not a blow-up: the exploding and divergence detectors report it
once and leave the rate alone, while a norm or a loss that keeps climbing is still caught.

Unit tests feed the patterns straight to each detector; the Trainer runs are a task that gets ten times harder for
good mid-run (in ``tests/test_do_no_harm.py``) and bad batches in a row (``tests/test_bad_batches.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard import DivergenceDetector, ExplodingDetector

T = torch.tensor


def _losses(det: DivergenceDetector, losses: list[float]) -> list[int]:
    """The 0-based positions of the losses that completed a divergence event."""
    return [i for i, loss in enumerate(losses) if bool(det.update(T(loss)))]


def _norms(det: ExplodingDetector, norms: list[float]) -> tuple[list[int], list[int]]:
    """The 0-based positions of the exploding events, and of the steps given a cap (every flagged step)."""
    events, capped = [], []
    for i, n in enumerate(norms):
        r = det.update(T(n), T([n]), T(True))
        if bool(r.any):
            events.append(i)
        if bool(r.cap.isfinite()):
            capped.append(i)
    return events, capped


_SETTLED = [3.0] + [1.0] * 80  # the untrained loss, then a settled level of 1


# ------------------------------------------------------------------------------------------- the loss
def test_a_sudden_jump_that_holds_is_no_divergence_and_the_level_starts_again() -> None:
    det = DivergenceDetector()
    assert _losses(det, _SETTLED + [40.0, 38.0, 41.0, 39.0, 40.0, 37.0] + [35.0] * 20) == []
    mean, first = det.level().tolist()
    assert first == 3.0  # the untrained loss is kept
    assert 30.0 < mean < 41.0  # the new level, not the old one
    # A blow-up later in the new phase is judged against the new level.
    assert _losses(det, [35.0 * 10**k for k in range(1, 8)]) == [5]  # 350 is not above 10x the level of 35


def test_a_sudden_jump_that_keeps_climbing_is_a_divergence() -> None:
    det = DivergenceDetector()
    climbing = [40.0, 60.0, 100.0, 200.0, 400.0, 800.0]  # the fifth high step is 10x the first
    assert _losses(det, _SETTLED + climbing) == [len(_SETTLED) + 4]


def test_a_gradual_climb_is_a_divergence() -> None:
    # The loss before the first high step was already more than sqrt(10) above the level: no sudden jump.
    det = DivergenceDetector()
    losses = _SETTLED + [2.0, 4.0, 8.0, 12.0, 12.0, 12.0, 12.0, 12.0]
    assert _losses(det, losses) == [len(_SETTLED) + 7]


def test_a_jump_within_the_first_patience_observations_is_a_divergence() -> None:
    # Adam at a rate far too high: the loss jumps in the first steps and stays up. There is no calm history yet.
    det = DivergenceDetector()
    assert _losses(det, [16.0, 15.0, 15.0, 400.0, 380.0, 390.0, 410.0, 400.0]) == [7]


def test_a_jump_that_holds_after_patience_calm_observations_is_no_divergence_before_the_mean_settles() -> None:
    # A loss term switched on at step 6, long before the running mean settles (50 observations): a new level.
    start = [3.0, 2.6, 2.3, 2.1, 2.0, 1.9]
    det = DivergenceDetector()
    assert _losses(det, start + [200.0, 190.0, 205.0, 195.0, 200.0] + [185.0] * 20) == []
    assert det.level()[0] > 150.0  # the level starts again from the new loss
    # The same jump two observations earlier has too short a history to be judged calm; one that keeps climbing is
    # the weights'.
    assert _losses(DivergenceDetector(), start[:4] + [200.0] * 6) == [8]
    assert _losses(DivergenceDetector(), start + [200.0, 300.0, 500.0, 1000.0, 2000.0]) == [10]


def test_level_shifts_off_or_patience_one_keep_every_event() -> None:
    plateau = _SETTLED + [40.0] * 6
    assert _losses(DivergenceDetector(level_shifts=False), plateau) == [len(_SETTLED) + 4]
    assert _losses(DivergenceDetector(patience=1), plateau) == [len(_SETTLED)]


def test_the_level_shift_state_survives_a_round_trip() -> None:
    whole, first = DivergenceDetector(), DivergenceDetector()
    losses = _SETTLED + [40.0, 39.0, 41.0]
    rest = [40.0, 40.0] + [40.0 * 10**k for k in range(1, 8)]
    _losses(whole, losses)
    _losses(first, losses)
    second = DivergenceDetector()
    second.load_state_dict(first.state_dict())
    assert _losses(second, rest) == _losses(whole, rest)


# ------------------------------------------------------------------------------------------- the gradient norm
_CALM = [1.0, 1.1, 0.9, 1.05, 0.95] * 8  # 40 steps: past the warm-up


def test_a_jump_of_the_norm_that_holds_is_one_event_and_every_flagged_step_is_capped() -> None:
    det = ExplodingDetector()
    events, capped = _norms(det, _CALM + [30.0, 31.0, 29.0, 30.0] + [30.0] * 30)
    assert events == [len(_CALM)]
    assert capped[0] == len(_CALM) and len(capped) >= 2  # the steps after the jump are clipped too


def test_a_norm_that_keeps_climbing_counts_on_every_step_past_twice_the_streaks_first() -> None:
    det = ExplodingDetector()
    start = len(_CALM)
    events, capped = _norms(det, _CALM + [30.0, 45.0, 70.0, 400.0, 5000.0])
    assert events == [start, start + 2, start + 3, start + 4]  # 45 is under 2 x 30; 70, 400, 5000 are above it
    assert capped == [start, start + 1, start + 2, start + 3, start + 4]


def test_a_stretch_holds_a_step_back_down_towards_the_band() -> None:
    """Two bad batches in a row, the second 2.3x smaller (in one layer: 1968.6 then 852.1 in a real run): one event.
    Each is still clipped; a step further up than twice the first still counts."""
    det = ExplodingDetector()
    start = len(_CALM)
    events, capped = _norms(det, _CALM + [2000.0, 850.0] + [1.0] * 10 + [2000.0, 850.0, 5000.0])
    again = start + 12
    assert events == [start, again, again + 2]
    assert capped[:2] == [start, start + 1] and capped[-3:] == [again, again + 1, again + 2]


def test_a_spike_after_a_decaying_spike_is_still_caught() -> None:
    """A spike whose norm decays over a few steps (20x down to 3x) is no level: a 30x spike right after it is flagged
    and capped, as after any spike."""
    det = ExplodingDetector()
    start = len(_CALM)
    events, capped = _norms(det, _CALM + [20.0, 12.0, 8.0, 5.0, 3.5, 3.0, 1.0, 30.0])
    assert events[0] == start and events[-1] == start + 7 and capped[-1] == start + 7


def test_during_the_warm_up_every_flagged_step_counts() -> None:
    # A run that diverges from its first steps: the rollback needs two events in a row at once.
    det = ExplodingDetector()
    events, _ = _norms(det, [1.0, 1.2, 500.0, 600.0])
    assert events == [2, 3]


def test_an_absolute_ceiling_counts_on_every_step() -> None:
    det = ExplodingDetector(max_norm=10.0)
    events, _ = _norms(det, _CALM + [30.0, 30.0, 30.0])
    assert events == [len(_CALM), len(_CALM) + 1, len(_CALM) + 2]


def test_level_shifts_must_be_a_bool() -> None:
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="level_shifts"):
            DivergenceDetector(level_shifts=bad)  # type: ignore[arg-type]
    assert "level_shifts=False" in repr(DivergenceDetector(level_shifts=False))


# --------------------------------------------------------------------------- the band follows a level that holds
def _noisy(n: int, level: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` norms around ``level``, log-normal with a standard deviation of 0.1 (a steady run's step-to-step noise)."""
    g = torch.Generator().manual_seed(seed)
    return (level * (0.1 * torch.randn(n, generator=g)).exp()).tolist()


def _jump(scale: float, spike_after: int | None = None, spike: float = 100.0) -> list[float]:
    """100 calm steps, then the level ``scale`` times higher for 150 steps; ``spike`` times it ``spike_after`` steps
    into the new level."""
    norms = _noisy(100) + _noisy(150, scale, seed=1)
    if spike_after is not None:
        norms[100 + spike_after] *= spike
    return norms


@pytest.mark.parametrize("scale", [10.0, 30.0, 100.0])
@pytest.mark.parametrize("after", [10, 34])
def test_after_a_jump_that_holds_a_spike_on_the_new_level_is_caught(scale: float, after: int) -> None:
    # Folded into the variance step after step, the new level widened the band until it fit inside: the standard
    # deviation of the log-norm went from 0.1 to 1.6, and a 100x spike on the new level went unflagged for 60 steps.
    events, capped = _norms(ExplodingDetector(), _jump(scale, after))
    assert events == [100, 100 + after]
    assert capped == [100, 101, 102, 103, 104, 100 + after]  # the jump's steps until the level is taken in, the spike
    blind, _ = _norms(ExplodingDetector(level_steps=None), _jump(scale, after))
    assert blind == [100]  # the behaviour this replaces


def test_the_mean_moves_to_a_level_held_for_level_steps_and_the_band_keeps_its_width() -> None:
    det = ExplodingDetector(level_steps=3)
    _norms(det, _jump(30.0)[:103])  # the jump and two more steps at its level
    mean, low, high = det.band().tolist()
    assert 25.0 < mean < 36.0
    assert high / mean < 4.0  # a band as wide as one outlier left it, not one that spans the jump


def test_bad_batches_in_a_row_shorter_than_level_steps_leave_the_level_alone() -> None:
    det = ExplodingDetector()
    norms = _noisy(100) + [1e4] * 4 + _noisy(30, seed=2)
    norms[120] = 100.0  # a spike 16 steps after the bad batches
    events, _ = _norms(det, norms)
    assert events == [100, 120]  # the four bad batches once (one level, held), then the spike
    assert det.band()[0] < 2.0


def test_a_drop_that_holds_moves_the_level_down() -> None:
    # The norm falls 30x for good (a loss term switched off, a smaller learning signal): a spike of 10x the new
    # level is still a third of the old one, and only a band that came down with the level sees it.
    norms = _noisy(100) + _noisy(60, 1 / 30, seed=1)
    norms[140] *= 10.0
    events, _ = _norms(ExplodingDetector(), norms)
    assert events == [140]
    blind, _ = _norms(ExplodingDetector(level_steps=None), norms)
    assert blind == []


def test_a_norm_that_keeps_climbing_never_becomes_the_level() -> None:
    # 1.6x per step: past twice the stretch's first norm every other step, so each stretch restarts before it holds
    # for level_steps. The climb is an event more often than before (the held steps no longer widen the band), enough
    # for the LR guard's two events, and the mean only walks, winsorized.
    climb = [2.0 * 1.6**k for k in range(12)]
    det = ExplodingDetector()
    events, _ = _norms(det, _noisy(100) + climb)
    before, _ = _norms(ExplodingDetector(level_steps=None), _noisy(100) + climb)
    assert events[:2] == [100, 102] and len(events) > len(before) == 1
    assert det.band()[0] < climb[4]


def test_the_stretch_survives_a_round_trip_and_an_older_state_loads() -> None:
    norms = _jump(30.0, 20)
    whole, first = ExplodingDetector(), ExplodingDetector()
    _norms(whole, norms[:102])
    _norms(first, norms[:102])
    state = first.state_dict()
    length, start, _ = state["stretch"][:, 0].tolist()
    assert length == 2.0 and start == pytest.approx(math.log(norms[100]))  # two steps at the new level so far
    second = ExplodingDetector()
    second.load_state_dict(state)
    assert _norms(second, norms[102:]) == _norms(whole, norms[102:])
    # A state saved before stretches were kept (it may hold the "onset" of a streak of flagged steps instead) loads
    # as "in no stretch": the held level is reported once more, then taken in five steps later; the spike is caught.
    older = ExplodingDetector()
    older.load_state_dict({**{k: v for k, v in state.items() if k != "stretch"}, "onset": torch.zeros(2)})
    assert _norms(older, norms[102:])[0] == [0, 18]


def test_level_steps_is_checked_and_shown() -> None:
    for bad in (1, 0, 2.5, "5"):
        with pytest.raises(ValueError, match="level_steps"):
            ExplodingDetector(level_steps=bad)  # type: ignore[arg-type]
    assert "level_steps=None" in repr(ExplodingDetector(level_steps=None))
    assert "level_steps=5" in repr(ExplodingDetector())
