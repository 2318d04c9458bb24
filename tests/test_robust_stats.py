"""Do no harm, unit level: each statistic fed the patterns of a healthy run that must raise no alarm.

DESIGN, "Decisions: first, do no harm":

* an exactly-zero or absent gradient norm is no observation for explosion statistics (``log(0)`` must never enter
  an EMA): after zeros, ordinary norms are not flagged;
* a layer that starts receiving gradients later (unfrozen, LoRA ``B`` leaving zero) starts its own statistics
  silently: no exploding event for its first norms (its own warm-up);
* one outlier never poisons running statistics: after one 1000x spike the next ordinary steps are not flagged, and
  a second spike of the same size some steps later is still flagged;
* non-finite steps are skipped and counted, not punished with a lower LR, unless a run of them in a row goes on.

Every pattern goes straight into one component (no Lightning).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from lightning_gradguard.clip import AutoClip, ZClip
from lightning_gradguard.detect import ExplodingDetector, VanishingDetector
from lightning_gradguard.lr import LRGuard

VALID = torch.tensor(True)


def _noisy(n: int, sigma: float = 0.1, level: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` log-normal norms around ``level``: a steady, slightly noisy run."""
    g = torch.Generator().manual_seed(seed)
    return (level * torch.exp(sigma * torch.randn(n, generator=g))).tolist()


# ---------------------------------------------------------------------------------------------- ExplodingDetector


def _feed(
    det: ExplodingDetector, total: float, layers: list[float], present: list[bool] | None = None
) -> tuple[bool, list[bool]]:
    """One step; returns (any event, per-layer flags) as host values."""
    res = det.update(
        torch.tensor(total),
        torch.tensor(layers),
        VALID,
        None if present is None else torch.tensor(present),
    )
    return bool(res.any), [bool(v) for v in res.layers]


def _split(total: float) -> list[float]:
    # Two layers carrying 0.6 and 0.8 of the total (0.36 + 0.64 = 1: consistent L2 shares).
    return [0.6 * total, 0.8 * total]


def test_exploding_one_zero_step_then_constant_norms_raise_nothing() -> None:
    # (a) A first step with an exactly-zero gradient (a fully masked batch) must not put log(0) into the EMA.
    det = ExplodingDetector()
    _feed(det, 0.0, [0.0, 0.0])
    flagged = [step for step in range(300) if _feed(det, 1.0, _split(1.0))[0]]
    assert flagged == [], f"{len(flagged)} of 300 constant steps flagged after one zero step (first: {flagged[:5]})"


def test_exploding_zero_steps_mid_run_leave_the_band_alone() -> None:
    # (b) Five exactly-zero steps (masked batches) in the middle of a steady, noisy run.
    det = ExplodingDetector()
    before, after = _noisy(100, seed=1), _noisy(100, seed=2)
    flagged_before = [i for i, n in enumerate(before) if _feed(det, n, _split(n))[0]]
    assert flagged_before == []
    band0 = det.band()
    assert torch.isfinite(band0).all()
    for _ in range(5):
        assert not _feed(det, 0.0, [0.0, 0.0])[0]
    bands = [det.band()]
    flagged = []
    for i, n in enumerate(after):
        if _feed(det, n, _split(n))[0]:
            flagged.append(i)
        bands.append(det.band())
    assert flagged == [], f"ordinary steps flagged after 5 zero steps: {flagged[:10]} (of {len(flagged)})"
    # The EMA mean and both edges stay within a small factor of where they were before the zeros.
    factor = 1.5
    for k, band in enumerate(bands):
        ratio = band / band0
        assert torch.isfinite(ratio).all() and bool(((ratio < factor) & (ratio > 1 / factor)).all()), (
            f"band {band.tolist()} {k} steps after the zeros, {band0.tolist()} before them"
        )


def test_exploding_layer_waking_up_starts_its_own_statistics_silently() -> None:
    # (c) Layer 1 gets exact-zero gradients for 30 steps (frozen, LoRA A while B is 0), then grows smoothly from
    # 1e-6 (x1.3 per step for 20 steps) and holds; the total stays steady. Layer 0 carries ~1e-3, so the waking layer
    # ends near 19% of the total: it is large enough to be named (min_share), but it is no explosion.
    det = ExplodingDetector()
    base = _noisy(100, sigma=0.05, level=1e-3, seed=3)
    waking = [0.0] * 30 + [1e-6 * 1.3**k for k in range(20)] + [1e-6 * 1.3**19] * 50
    events = []
    for step, (a, b) in enumerate(zip(base, waking)):
        total = math.hypot(a, b)
        any_flag, layers = _feed(det, total, [a, b])
        if any_flag:
            events.append((step, layers))
    assert events == [], f"a layer waking up from zero raised exploding events: {events[:5]} (of {len(events)})"


def test_exploding_one_spike_does_not_poison_the_statistics() -> None:
    # (d) After warm-up: one 1000x spike is flagged, the 10 ordinary steps after it are not, and a second 1000x
    # spike 30 steps after the first is flagged again.
    det = ExplodingDetector()
    norms = _noisy(120, seed=4)
    first, second = 60, 90
    norms[first] *= 1000.0
    norms[second] *= 1000.0
    flags = [_feed(det, n, _split(n))[0] for n in norms]
    assert flags[first], "the first 1000x spike was not flagged"
    assert not any(flags[first + 1 : first + 11]), f"steps after the spike flagged: {flags[first + 1 : first + 11]}"
    assert flags[second], "a second 1000x spike 30 steps later was not flagged: the first one poisoned the EMA"
    flagged = {i for i, f in enumerate(flags) if f}
    assert flagged == {first, second}


def test_exploding_absent_layer_state_never_changes() -> None:
    # (e) A layer that receives no gradient (layer_present False) keeps its state, whatever norm sits in its slot.
    det = ExplodingDetector()
    for n in _noisy(40, seed=5):
        _feed(det, n, _split(n))
    before = det.state_dict()
    junk = [0.0, 1e6, 1e-12, 0.0, 5.0, 1e30, 0.0]
    for j, n in zip(junk, _noisy(len(junk), seed=6)):
        any_flag, layers = _feed(det, n, [0.6 * n, j], present=[True, False])
        assert not layers[1], f"absent layer flagged with norm {j}"
        assert not any_flag
    after = det.state_dict()
    for key in ("mean", "var", "count"):
        assert torch.equal(after[key][2], before[key][2]), f"absent layer's {key} changed"


# ---------------------------------------------------------------------------------------------- VanishingDetector


def test_vanishing_short_run_of_zeros_is_no_event() -> None:
    # A few fully masked batches (every layer exactly 0) are fewer than `patience` steps: no event.
    det = VanishingDetector(patience=10)
    events = 0
    for step in range(60):
        zero = 20 <= step < 29  # 9 < patience
        norms = torch.tensor([0.0, 0.0, 0.0] if zero else [1.0, 0.5, 0.2])
        events += int(det.update(norms, VALID).new.sum())
    assert events == 0


def test_vanishing_layer_at_zero_for_patience_steps_is_one_event() -> None:
    # An exactly-zero gradient is a vanishing candidate through its own rule and patience: one event, not one per step
    # and not none.
    det = VanishingDetector(patience=10)
    new_per_layer = torch.zeros(3, dtype=torch.int64)
    first_step = None
    for step in range(40):
        res = det.update(torch.tensor([1.0, 0.0, 0.3]), VALID)
        new_per_layer += res.new.to(torch.int64)
        if first_step is None and bool(res.new.any()):
            first_step = step
    assert new_per_layer.tolist() == [0, 1, 0]
    assert first_step == 9  # the 10th consecutive zero step


# ---------------------------------------------------------------------------------------------- ZClip


def _grads(norm: float, seed: int) -> list[torch.Tensor]:
    """Real gradient tensors whose total L2 norm is ``norm`` (all exactly zero for 0)."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(8, 4, generator=g), torch.randn(4, generator=g)]
    scale = norm / math.sqrt(sum(float(t.square().sum()) for t in grads))
    return [t * scale for t in grads]


def _zclip_step(clipper: ZClip | AutoClip, norm: float, seed: int) -> float:
    grads = _grads(norm, seed)
    total = torch.linalg.vector_norm(torch.cat([t.flatten() for t in grads]))
    return float(clipper.clip_grads_(grads, total, torch.tensor(True)))


def test_zclip_zero_norms_after_warmup_do_not_enter_the_statistics() -> None:
    clipper = ZClip()
    for step, n in enumerate(_noisy(40, sigma=0.05, seed=7)):
        _zclip_step(clipper, n, step)
    before = clipper.state_dict()
    for step in range(5):
        assert _zclip_step(clipper, 0.0, 100 + step) == 1.0
    after = clipper.state_dict()
    assert float(after["mean"]) == float(before["mean"]), "a zero norm moved ZClip's EMA mean"
    assert float(after["var"]) == float(before["var"]), "a zero norm moved ZClip's EMA variance"
    coefs = [_zclip_step(clipper, n, 200 + step) for step, n in enumerate(_noisy(20, sigma=0.02, seed=8))]
    assert coefs == [1.0] * 20, f"ordinary norms clipped after zero steps: {coefs}"
    assert float(clipper.last_coef) == 1.0


def test_zclip_zero_norm_does_not_count_towards_the_warmup() -> None:
    clipper = ZClip(warmup_steps=25)
    ones = _noisy(30, sigma=0.05, seed=9)
    for step in range(10):
        _zclip_step(clipper, ones[step], step)
    for step in range(5):
        _zclip_step(clipper, 0.0, 50 + step)
    for step in range(10, 24):
        _zclip_step(clipper, ones[step], step)
    # 29 calls, 24 of them with a gradient: still warming up (no threshold yet), and no zero in the warm-up buffer.
    assert math.isinf(float(clipper.last_threshold)), "the zero-norm steps counted towards ZClip's warm-up"
    state = clipper.state_dict()
    assert int(state["count"]) == 24
    _zclip_step(clipper, ones[24], 24)
    state = clipper.state_dict()
    assert int(state["count"]) == 25
    assert float(state["buffer"].min()) > 0.5, f"a zero norm entered the warm-up buffer: {state['buffer'].tolist()}"
    assert float(state["mean"]) == pytest.approx(sum(ones[:25]) / 25, rel=1e-6)
    # Warm: an ordinary norm goes through untouched.
    assert _zclip_step(clipper, ones[25], 25) == 1.0


# ---------------------------------------------------------------------------------------------- AutoClip


@pytest.mark.parametrize("history", [None, 50])
def test_autoclip_zero_norms_do_not_enter_the_history(history: int | None) -> None:
    clipper = AutoClip(percentile=10.0, history=history)
    for step, n in enumerate(_noisy(30, sigma=0.05, seed=10)):
        _zclip_step(clipper, n, step)
    count = int(clipper.state_dict()["count"])
    assert count == 30
    for step in range(5):
        _zclip_step(clipper, 0.0, 100 + step)
    assert int(clipper.state_dict()["count"]) == count, "zero norms entered AutoClip's history"
    # The 10th percentile is still that of the ordinary norms, not 0: an ordinary norm is not clipped to nothing.
    coef = _zclip_step(clipper, 1.0, 200)
    assert coef > 0.5


# ---------------------------------------------------------------------------------------------- LRGuard


def test_lrguard_isolated_nonfinite_step_changes_nothing() -> None:
    guard = LRGuard()
    for _ in range(10):
        assert guard.update(False) is False
    assert guard.update(False, nonfinite=True) is False
    assert guard.scale() == 1.0
    for _ in range(50):
        assert guard.update(False) is False
        assert guard.scale() == 1.0


def test_lrguard_scattered_nonfinite_steps_cut_nothing_and_a_run_in_a_row_cuts_once() -> None:
    # Two within the cooldown, and even two or three in a row: the calm steps after them ran on the weights the
    # skipped steps left, so the batches were non-finite. A run of four (twice the patience) cuts, once.
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2)
    pattern = [s in (3, 6, 10, 11, 15, 16, 17) for s in range(30)]
    assert [guard.update(False, nonfinite=bad) for bad in pattern].count(True) == 0 and guard.scale() == 1.0
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2)
    assert [i for i in range(10) if guard.update(False, nonfinite=True)] == [3]
    assert guard.scale() == 0.5
    # Without sparing (or with a patience of 1) two within the cooldown cut at once, as the first rule did.
    for kwargs, first in (({"spare_lone": False}, 6), ({"nonfinite_patience": 1}, 3)):
        guard = LRGuard(factor=0.5, cooldown=20, **kwargs)
        cuts = [guard.update(False, nonfinite=step in (3, 6)) for step in range(10)]
        assert cuts.index(True) == first, kwargs


def test_lrguard_two_nonfinite_steps_far_apart_do_not_reduce() -> None:
    guard = LRGuard(factor=0.5, cooldown=5, nonfinite_patience=2)
    assert guard.update(False, nonfinite=True) is False
    for _ in range(6):  # more than `cooldown` calm steps
        guard.update(False)
    assert guard.update(False, nonfinite=True) is False
    assert guard.scale() == 1.0


def test_lrguard_holds_a_runs_cut_while_it_lasts_and_withdraws_it_after_a_calm_step() -> None:
    # The run's skipped steps applied no rate: a calm step after it ran on the weights it began with, and the rate
    # goes back to where it was, counters and all, as if no run had been cut.
    guard, untouched = LRGuard(factor=0.5, cooldown=20), LRGuard(factor=0.5, cooldown=20)
    for g in (guard, untouched):
        for _ in range(5):
            g.update(False)
    assert [guard.update(False, nonfinite=True) for _ in range(6)] == [False, False, False, True, False, False]
    assert guard.scale() == 0.5
    guard.update(False)
    assert guard.scale() == 1.0
    untouched.update(False)
    assert guard.state_dict()["keys"]["0"]["held"] == 1.0

    def rate_state(g: LRGuard) -> dict[str, Any]:  # the run's own counters, and the calm run it broke, left out
        return {k: v for k, v in g.state_dict()["keys"]["0"].items() if "nonfinite" not in k and k != "calm_run"}

    assert rate_state(guard) == rate_state(untouched)
    # Trouble after the run makes the cut real: it stays, held as any cut, and the trouble counts for no second one.
    for trouble in ({"exploding": True}, {"exploding": False, "diverging": True}):
        guard = LRGuard(factor=0.5, cooldown=20)
        for _ in range(4):
            guard.update(False, nonfinite=True)
        assert guard.update(**trouble) is False and guard.scale() == 0.5, trouble
        for _ in range(20):
            guard.update(False)
        assert guard.scale() == 0.5  # held through the cooldown, then recovered as after any cut
    # A held cut survives a checkpoint: the restored guard withdraws it the same way.
    guard = LRGuard(factor=0.5, cooldown=20)
    for _ in range(4):
        guard.update(False, nonfinite=True)
    restored = LRGuard(factor=0.5, cooldown=20)
    restored.load_state_dict(guard.state_dict())
    assert restored.scale() == 0.5
    restored.update(False)
    assert restored.scale() == 1.0


def test_lrguard_holds_no_run_cut_while_the_last_cut_settles_and_refuses_a_bad_held_value() -> None:
    # Within `settle_steps` of a cut, a cut made real at the run's end would be held back: none is held either
    # (before, the held cut vanished at the run's end and the trouble after it counted for nothing).
    guard = LRGuard(factor=0.5, patience=1, cooldown=20, settle_steps=10)
    assert guard.update(True) is True
    assert [guard.update(False, nonfinite=True) for _ in range(4)] == [False] * 4
    assert guard.scale() == 0.5 and guard.state_dict()["keys"]["0"]["held"] == 1.0
    for bad in (0.0, math.nan, 1.5):
        state = guard.state_dict()
        state["keys"]["0"]["held"] = bad
        with pytest.raises(ValueError, match="invalid held"):
            LRGuard().load_state_dict(state)


def test_lrguard_non_finite_steps_that_a_cut_did_not_stop_cut_no_further() -> None:
    # Batches non-finite by themselves (a masked mean over a fully masked batch, 0/0), every few steps, each followed
    # by calm steps: the data's doing, no cut (before: the first pair cut).
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2)
    cuts = 0
    for step in range(1, 200):
        cuts += guard.update(False, nonfinite=step % 9 == 0)
    assert cuts == 0
    # Non-finite steps in a row from the first (a model wrecked straight into NaN) cut once, at four, twice the
    # patience: skipped steps apply no rate (before: a cut at two and one at four; earlier, 7 cuts for 30).
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2)
    assert [i for i in range(30) if guard.update(False, nonfinite=True)] == [3]
    # Runs of five with a finite step between: the first run cuts; once it has ended by itself, on the weights it
    # began with, the later ones are the batches' and cut not at all.
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2)
    pattern = ([True] * 5 + [False]) * 30
    assert [i for i, bad in enumerate(pattern) if guard.update(False, nonfinite=bad)] == [3]
    # An explosion puts the rate in question again: a run in a row after it cuts as a first one does.
    guard.update(True)
    for _ in range(60):
        guard.update(False)
    assert [guard.update(False, nonfinite=True) for _ in range(5)].count(True) == 1
    # The run is twice the patience for another patience too; a patience of 1 treats each as an explosion.
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=3)
    assert [i for i in range(30) if guard.update(False, nonfinite=True)] == [5]
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=1)
    assert [guard.update(False, nonfinite=True) for _ in range(30)].count(True) == 2
    # Without sparing, the first rule: the pair cuts, the pairs after it (nothing exploding) do not.
    guard = LRGuard(factor=0.5, cooldown=20, nonfinite_patience=2, spare_lone=False)
    assert sum(guard.update(False, nonfinite=step % 9 == 0) for step in range(1, 200)) == 1


def _calm(guard: LRGuard, n: int) -> list[float]:
    out = []
    for _ in range(n):
        assert guard.update(False) is False
        out.append(guard.scale())
    return out


def test_lrguard_recovers_to_just_below_the_rate_that_exploded_again_then_creeps_up() -> None:
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    # A first burst may be the data's (bad batches in a row): cut, then recover all the way.
    assert guard.update(True) is True
    assert guard.scale() == 0.5 and guard.ceiling() == 1.0
    assert _calm(guard, 6)[-1] == 1.0
    # The rate explodes again: now it is remembered, just below.
    assert guard.update(True) is True
    assert guard.scale() == 0.5
    ceiling = math.sqrt(0.5)
    assert guard.ceiling() == pytest.approx(ceiling)
    scales = _calm(guard, 6)  # hold 2, recover 4
    assert scales[-1] == pytest.approx(ceiling), f"recovered to {scales[-1]}, not to sqrt(factor)"
    # Then the ceiling creeps up by `increase` per calm step (relative), and the multiplier with it, up to 1.
    creep = _calm(guard, 10)
    assert creep[0] == pytest.approx(ceiling * (1 + guard.increase))
    assert all(b > a for a, b in itertools.pairwise(creep))
    steps = math.ceil(math.log(1 / ceiling) / math.log1p(guard.increase)) + 10
    rest = _calm(guard, steps)
    assert all(b >= a for a, b in itertools.pairwise(rest))
    assert rest[-1] == 1.0 and guard.ceiling() == 1.0


def test_lrguard_cuts_within_one_burst_set_no_ceiling() -> None:
    # Four flagged steps in a row (four bad batches): two cuts, then recovery to the full rate.
    guard = LRGuard(factor=0.5, patience=2, cooldown=2, recovery_steps=4)
    cuts = [guard.update(True) for _ in range(4)]
    assert cuts == [False, True, False, True] and guard.scale() == 0.25
    assert guard.ceiling() == 1.0
    assert _calm(guard, 6)[-1] == 1.0


def test_lrguard_bursts_far_apart_never_ratchet_the_rate_down() -> None:
    # Occasional bad data in a long run: a pair of flagged steps every 400 steps. Each pair cuts; none sets a
    # ceiling, so the rate is back on schedule between them (before: 0.25x after 20 pairs, and falling).
    guard = LRGuard()
    for _ in range(20):
        assert [guard.update(True) for _ in range(2)] == [False, True]
        assert _calm(guard, 398)[-1] == 1.0 and guard.ceiling() == 1.0


def test_lrguard_bursts_of_two_cuts_far_apart_never_ratchet_the_rate_down() -> None:
    # Each burst cuts twice; the second cut of a burst is no recurrence of the burst before it, however many came.
    guard = LRGuard()
    for _ in range(3):
        for _ in range(4):
            guard.update(True)
        assert guard.scale() == 0.25 and guard.ceiling() == 1.0
        assert _calm(guard, 996)[-1] == 1.0


def test_lrguard_without_memory_never_sets_a_ceiling() -> None:
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4, memory=False)
    for _ in range(3):
        assert guard.update(True) is True
        assert _calm(guard, 6)[-1] == 1.0 and guard.ceiling() == 1.0


def test_lrguard_second_explosion_at_the_ceiling_lowers_it() -> None:
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    guard.update(True)
    _calm(guard, 6)
    guard.update(True)  # the recurrence sets the ceiling
    _calm(guard, 6)
    first = guard.ceiling()
    assert first == pytest.approx(math.sqrt(0.5))
    assert guard.scale() == pytest.approx(first)
    assert guard.update(True) is True
    assert guard.ceiling() < first
    assert guard.ceiling() == pytest.approx(first * math.sqrt(0.5))
    scales = _calm(guard, 6)
    assert scales[-1] == pytest.approx(guard.ceiling())


def test_lrguard_state_saved_before_arming_was_kept_still_remembers_a_recurrence() -> None:
    # A cut that had calmed past its hold, saved without "armed": a recurrence after the resume sets the ceiling, as
    # in the run that was not interrupted (before, the state was never armed until another cut).
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    guard.update(True)
    _calm(guard, 10)
    state = guard.state_dict()
    older = {"keys": {k: {n: v for n, v in s.items() if n != "armed"} for k, s in state["keys"].items()}}
    resumed = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    resumed.load_state_dict(older)
    for g in (guard, resumed):
        g.update(True)
        assert g.ceiling() == pytest.approx(math.sqrt(0.5))
    # A state saved without a cut stays unarmed: its first cut sets no ceiling.
    fresh = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    _calm(fresh, 10)
    unarmed = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    unarmed.load_state_dict(
        {"keys": {k: {n: v for n, v in s.items() if n != "armed"} for k, s in fresh.state_dict()["keys"].items()}}
    )
    unarmed.update(True)
    assert unarmed.ceiling() == 1.0


def test_lrguard_state_round_trip_keeps_ceiling_and_nonfinite_counters() -> None:
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    for _ in range(2):  # two bursts: the second sets the ceiling
        guard.update(True)
        _calm(guard, 6)
    assert guard.update(False, nonfinite=True) is False  # one bad batch pending
    state = guard.state_dict()
    restored = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    restored.load_state_dict(state)
    assert restored.ceiling() == guard.ceiling() == pytest.approx(math.sqrt(0.5))
    assert restored.scale() == guard.scale()
    assert restored.state_dict() == state
    # The run in a row survived: its fourth step cuts in both, and identically.
    for _ in range(2):
        assert guard.update(False, nonfinite=True) is False
        assert restored.update(False, nonfinite=True) is False
    assert guard.update(False, nonfinite=True) is True
    assert restored.update(False, nonfinite=True) is True
    assert restored.scale() == guard.scale()
    assert restored.state_dict() == guard.state_dict()


def test_lrguard_loads_a_state_saved_before_ceiling_and_nonfinite_existed() -> None:
    old = {"keys": {"0": {"anchor": 0.5, "calm": 1, "pending": 0}}}
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    guard.load_state_dict(old)
    assert guard.scale() == 0.5
    assert guard.ceiling() == 1.0
    # One non-finite step is still an isolated one (no counter carried over).
    assert guard.update(False, nonfinite=True) is False
    assert guard.scale() == 0.5
