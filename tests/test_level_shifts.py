"""A jump that then holds its level is the data's, not a blow-up: the exploding and divergence detectors report it
once and leave the rate alone, while a norm or a loss that keeps climbing is still caught.

Unit tests feed the patterns straight to each detector; the Trainer runs are a task that gets ten times harder for
good mid-run (in ``tests/test_do_no_harm.py``) and bad batches in a row (``tests/test_bad_batches.py``).
"""

from __future__ import annotations

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


def test_a_jump_before_the_level_has_settled_is_a_divergence() -> None:
    # Adam at a rate far too high: the loss jumps in the first steps and stays up. There is no calm history yet.
    det = DivergenceDetector()
    assert _losses(det, [16.0, 15.0, 15.0, 400.0, 380.0, 390.0, 410.0, 400.0]) == [7]


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


def test_during_the_warm_up_every_flagged_step_counts() -> None:
    # A run that diverges from its first steps: the rollback needs two events in a row at once.
    det = ExplodingDetector()
    events, _ = _norms(det, [1.0, 1.2, 500.0, 600.0])
    assert events == [2, 3]


def test_an_absolute_ceiling_counts_on_every_step() -> None:
    det = ExplodingDetector(max_norm=10.0)
    events, _ = _norms(det, _CALM + [30.0, 30.0, 30.0])
    assert events == [len(_CALM), len(_CALM) + 1, len(_CALM) + 2]


def test_the_streak_survives_a_round_trip_and_an_older_state_loads() -> None:
    whole, first = ExplodingDetector(), ExplodingDetector()
    head, tail = _CALM + [30.0], [31.0, 32.0, 100.0]
    _norms(whole, head)
    _norms(first, head)
    state = first.state_dict()
    assert state["onset"] is not None and state["onset"][0].item() == 30.0
    second = ExplodingDetector()
    second.load_state_dict(state)
    assert _norms(second, tail) == _norms(whole, tail)
    # A state saved before streaks were kept (no "onset") loads as "in no streak".
    older = ExplodingDetector()
    older.load_state_dict({k: v for k, v in state.items() if k != "onset"})
    events, _ = _norms(older, [31.0])
    assert events == [0]


def test_level_shifts_must_be_a_bool() -> None:
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="level_shifts"):
            DivergenceDetector(level_shifts=bad)  # type: ignore[arg-type]
    assert "level_shifts=False" in repr(DivergenceDetector(level_shifts=False))
