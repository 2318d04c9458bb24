"""Unit tests for LRGuard in plain torch loops (no Lightning)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lightning_gradguard.lr import LRGuard
from tests.helpers import SyncRecorder

# ---------------------------------------------------------------------------------------------- multiplier


def _calm(guard: LRGuard, n: int, key: int = 0) -> list[float]:
    scales = []
    for _ in range(n):
        assert guard.update(False, key) is False
        scales.append(guard.scale(key))
    return scales


def test_untouched_guard_has_unit_scale():
    guard = LRGuard()
    assert guard.scale() == 1.0
    assert _calm(guard, 5) == [1.0] * 5


def test_by_default_an_isolated_spike_keeps_the_rate_and_a_second_within_cooldown_cuts():
    guard = LRGuard()
    assert guard.patience == 2 and guard.cooldown == 20
    assert guard.update(True) is False  # one spike: the clipper has bounded it, the rate stays
    assert _calm(guard, 21) == [1.0] * 21  # more than `cooldown` calm steps: that spike is forgotten
    assert guard.update(True) is False and guard.scale() == 1.0
    _calm(guard, 20)  # exactly `cooldown` calm steps: still counted
    assert guard.update(True) is True and guard.scale() == 0.5


def test_a_divergence_event_cuts_at_once_whatever_the_patience():
    # A diverged loss is already persistent evidence (several high steps in a row), unlike one gradient spike.
    guard = LRGuard(patience=3)
    assert guard.update(False, diverging=True) is True and guard.scale() == 0.5
    assert guard.update(True) is False  # a gradient spike still waits for its patience
    # On a step whose gradients are non-finite too (a blown-up loss often brings them): it was taken as an isolated
    # bad batch, and the divergence, reported once, was lost.
    guard = LRGuard()
    assert guard.update(False, nonfinite=True, diverging=True) is True and guard.scale() == 0.5


@pytest.mark.parametrize("recovery", ["linear", "exponential"])
def test_drop_hold_and_exact_recovery(recovery):
    guard = LRGuard(
        factor=0.25, patience=1, cooldown=4, recovery_steps=8, recovery=recovery, min_scale=0.01, memory=False
    )
    assert guard.update(True) is True
    assert guard.scale() == 0.25
    assert _calm(guard, 4) == [0.25] * 4  # hold for `cooldown` calm steps
    scales = [0.25] + _calm(guard, 8)
    assert scales[-1] == 1.0  # exactly back, not 0.9999999
    assert all(a < b for a, b in zip(scales, scales[1:]))
    if recovery == "linear":
        steps = [b - a for a, b in zip(scales, scales[1:])]
        assert steps == pytest.approx([0.75 / 8] * 8, rel=1e-9)
    else:
        ratios = [b / a for a, b in zip(scales, scales[1:])]
        assert ratios == pytest.approx([4.0 ** (1 / 8)] * 8, rel=1e-9)
    assert _calm(guard, 20) == [1.0] * 20


def test_min_scale_floor():
    guard = LRGuard(factor=0.5, patience=1, min_scale=0.1, cooldown=3, settle_steps=0)
    lowered = [guard.update(True) for _ in range(6)]
    assert lowered == [True, True, True, True, False, False]  # 0.5, 0.25, 0.125, 0.1, 0.1, 0.1
    assert guard.scale() == 0.1


def test_event_during_recovery_lowers_from_current_value():
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4, memory=False)
    guard.update(True)
    _calm(guard, 4)  # hold 2, then half-way through recovery
    current = guard.scale()
    assert current == pytest.approx(0.75)
    assert guard.update(True) is True
    assert guard.scale() == pytest.approx(current * 0.5)
    assert _calm(guard, 2) == pytest.approx([current * 0.5] * 2)  # a fresh hold


def test_patience_counts_events_within_cooldown_gaps():
    guard = LRGuard(factor=0.5, patience=3, cooldown=2, recovery_steps=5, settle_steps=0)
    assert guard.update(True) is False
    _calm(guard, 2)  # a gap of `cooldown` calm steps keeps the count
    assert guard.update(True) is False
    assert guard.update(True) is True  # third event
    assert guard.scale() == 0.5
    # After a reduction the count restarts.
    assert guard.update(True) is False
    assert guard.update(True) is False
    assert guard.scale() == 0.5
    assert guard.update(True) is True
    assert guard.scale() == 0.25


def test_patience_count_forgotten_after_long_calm():
    guard = LRGuard(factor=0.5, patience=2, cooldown=2)
    guard.update(True)
    _calm(guard, 3)  # more than `cooldown` calm steps
    assert guard.update(True) is False
    assert guard.scale() == 1.0
    assert guard.update(True) is True


def test_patience_with_zero_cooldown_needs_consecutive_events():
    guard = LRGuard(factor=0.5, patience=2, cooldown=0, recovery_steps=3)
    for _ in range(4):
        assert guard.update(True) is False
        _calm(guard, 1)
    assert guard.scale() == 1.0
    guard.update(True)
    assert guard.update(True) is True


def test_event_below_patience_freezes_recovery_and_restarts_hold():
    guard = LRGuard(factor=0.5, patience=2, cooldown=2, recovery_steps=4, memory=False)
    guard.update(True)
    guard.update(True)
    _calm(guard, 3)  # 0.5 held for 2, then one recovery step
    frozen = guard.scale()
    assert 0.5 < frozen < 1.0
    assert guard.update(True) is False
    assert _calm(guard, 2) == [frozen, frozen]
    assert _calm(guard, 4)[-1] == 1.0


def test_keys_are_independent():
    guard = LRGuard(factor=0.5, patience=1, cooldown=1, recovery_steps=1, settle_steps=0)
    guard.update(True, key=1)
    guard.update(False, key=0)
    assert guard.scale(1) == 0.5
    assert guard.scale(0) == 1.0
    guard.update(True, key=0)
    guard.update(True, key=0)
    assert guard.scale(0) == 0.25
    assert guard.scale(1) == 0.5
    assert guard.scale(7) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"factor": 0.0}, "factor"),
        ({"factor": 1.0}, "factor"),
        ({"patience": 0}, "patience"),
        ({"cooldown": -1}, "cooldown"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 1.5}, "min_scale"),
        ({"recovery_steps": 0}, "recovery_steps"),
        ({"recovery": "cosine"}, "recovery"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LRGuard(**kwargs)


def test_state_dict_round_trip_continues_identically():
    guard = LRGuard(factor=0.5, patience=2, cooldown=3, recovery_steps=5, recovery="exponential")
    pattern = [True, False, True, False, False, True, True, False]
    for step, exploding in enumerate(pattern):
        guard.update(exploding, key=0)
        guard.update(step % 3 == 0, key=2)

    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(isinstance(k, str) for k in state["keys"])

    resumed = LRGuard(factor=0.5, patience=2, cooldown=3, recovery_steps=5, recovery="exponential")
    resumed.load_state_dict(state)
    for key in (0, 2):
        assert resumed.scale(key) == guard.scale(key)
    for step in range(20):
        exploding = step in (4, 5, 11)
        for key in (0, 2):
            assert resumed.update(exploding, key) == guard.update(exploding, key)
            assert resumed.scale(key) == guard.scale(key)
    assert resumed.state_dict() == guard.state_dict()


# ---------------------------------------------------------------------------------------------- optimizer


def _model_and_optimizer(lr_type=float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    groups = [
        {"params": model[0].parameters(), "lr": lr_type(0.1)},
        {"params": model[1].parameters(), "lr": lr_type(0.01)},
    ]
    return model, torch.optim.SGD(groups, lr=lr_type(0.1), momentum=0.9)


def _lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def _flat(rows):
    return [v for row in rows for v in row]


def test_apply_restore_several_groups_and_idempotent():
    _, opt = _model_and_optimizer()
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True)
    guard.apply(opt)
    assert _lrs(opt) == [0.05, 0.005]
    guard.apply(opt)  # does not compound
    assert _lrs(opt) == [0.05, 0.005]
    guard.restore(opt)  # the step was skipped: optimizer.step never ran
    assert _lrs(opt) == [0.1, 0.01]
    guard.restore(opt)
    assert _lrs(opt) == [0.1, 0.01]


@pytest.mark.parametrize("missing", ["none", "no key"])
def test_a_group_without_lr_is_left_alone_and_attach_says_so(missing):
    # Adafactor(lr=None, relative_step=True) sizes its own steps: `None * m` crashed the first scaled step. A custom
    # optimizer may name its rate otherwise (no "lr" key): a KeyError at the first scaled step.
    _, opt = _model_and_optimizer()
    if missing == "none":
        opt.param_groups[1]["lr"] = None
    else:
        del opt.param_groups[1]["lr"]
    guard = LRGuard(factor=0.5, patience=1)
    with pytest.warns(UserWarning, match=r"lr=None.*cannot lower their rate"):
        handle = guard.attach(opt)
    guard.update(True)
    guard.apply(opt)
    assert [g.get("lr") for g in opt.param_groups] == [0.05, None]
    guard.restore(opt)
    assert [g.get("lr") for g in opt.param_groups] == [0.1, None]
    assert ("lr" in opt.param_groups[1]) == (missing == "none")
    handle.remove()


def test_restore_without_apply_and_unit_scale_are_noops():
    _, opt = _model_and_optimizer()
    guard = LRGuard()
    guard.restore(opt)
    guard.apply(opt)
    assert _lrs(opt) == [0.1, 0.01]
    guard.restore(opt)
    assert _lrs(opt) == [0.1, 0.01]


def test_keys_apply_to_their_own_optimizer():
    _, opt_a = _model_and_optimizer()
    _, opt_b = _model_and_optimizer()
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True, key=1)
    guard.apply(opt_a, key=0)
    guard.apply(opt_b, key=1)
    assert _lrs(opt_a) == [0.1, 0.01]
    assert _lrs(opt_b) == [0.05, 0.005]
    guard.restore(opt_b, key=1)
    assert _lrs(opt_b) == [0.1, 0.01]


def test_tensor_lr_is_scaled_as_a_copy():
    _, opt = _model_and_optimizer(lr_type=torch.tensor)
    originals = [g["lr"] for g in opt.param_groups]
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True)
    guard.apply(opt)
    for group, original in zip(opt.param_groups, originals):
        assert group["lr"] is not original
    assert _lrs(opt) == pytest.approx([0.05, 0.005])
    assert [float(t) for t in originals] == pytest.approx([0.1, 0.01])  # never mutated
    guard.restore(opt)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, originals))


def test_tensor_lr_apply_and_restore_have_no_host_sync():
    _, opt = _model_and_optimizer(lr_type=torch.tensor)
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True)
    with SyncRecorder() as recorder:
        guard.apply(opt)
        guard.restore(opt)
    assert recorder.calls == []


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_restore_after_a_scheduler_already_stepped_keeps_the_scheduler_value():
    # The documented order is restore-then-schedule; if a scheduler got there first, its value must win.
    _, opt = _model_and_optimizer()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True)
    guard.apply(opt)
    sched.step()
    guard.restore(opt)
    assert _lrs(opt) == pytest.approx([0.05, 0.005])  # LambdaLR's own 0.1 / 2, not the guard's

    _, opt = _model_and_optimizer(lr_type=torch.tensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 3 * s))
    guard.apply(opt)
    sched.step()  # fills the applied copy in place
    guard.restore(opt)
    assert _lrs(opt) == pytest.approx([0.025, 0.0025])


def test_attach_handle_removes_hooks_and_restores():
    model, opt = _model_and_optimizer()
    guard = LRGuard(factor=0.5, patience=1)
    guard.update(True)
    seen = []
    with guard.attach(opt):
        opt.register_step_pre_hook(lambda o, a, k: seen.append(_lrs(o)))
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        assert _lrs(opt) == [0.1, 0.01]
    opt.step()
    assert seen == [[0.05, 0.005], [0.1, 0.01]]


N_STEPS = 40
EVENTS = {5, 6, 24}  # two reductions, a partial recovery, one more


def _make_scheduler(name, opt):
    lr_sched = torch.optim.lr_scheduler
    if name == "none":
        return None
    if name == "onecycle":
        return lr_sched.OneCycleLR(opt, max_lr=[0.1, 0.01], total_steps=N_STEPS + 1)
    if name in ("lambda", "lambda_tensor"):
        return lr_sched.LambdaLR(opt, [lambda s: 1.0 / (1 + 0.1 * s), lambda s: 0.97**s])
    if name == "cosine":
        return lr_sched.CosineAnnealingLR(opt, T_max=15, eta_min=1e-3)
    if name == "step":
        return lr_sched.StepLR(opt, step_size=4, gamma=0.7)
    if name == "plateau":
        return lr_sched.ReduceLROnPlateau(opt, factor=0.5, patience=2, min_lr=1e-4)
    raise AssertionError(name)


def _train(sched_name, mode, events=frozenset(), skipped=frozenset()):
    """Plain loop; returns the scheduled lrs per step, the lrs seen inside optimizer.step, and the scales."""
    model, opt = _model_and_optimizer(lr_type=torch.tensor if sched_name == "lambda_tensor" else float)
    sched = _make_scheduler(sched_name, opt)
    guard = LRGuard(factor=0.5, patience=1, cooldown=3, recovery_steps=6, memory=False, settle_steps=0)
    if mode == "attach":
        guard.attach(opt)
    seen = {}
    step_index = [0]
    opt.register_step_pre_hook(lambda o, a, k: seen.__setitem__(step_index[0], _lrs(o)))
    scheduled, scales = [], []
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    for step in range(N_STEPS):
        step_index[0] = step
        scheduled.append(_lrs(opt))
        guard.update(step in events)
        scales.append(guard.scale())
        if mode == "explicit":
            guard.apply(opt)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step not in skipped:
            opt.step()
        if mode == "explicit":
            guard.restore(opt)  # the post-step restore (also for a skipped step)
        assert _lrs(opt) == scheduled[-1]
        if sched_name == "plateau":
            sched.step(1.0)  # a flat metric: reduces every `patience + 1` steps
        elif sched is not None:
            sched.step()
    return scheduled, seen, scales


@pytest.mark.parametrize("mode", ["attach", "explicit"])
@pytest.mark.parametrize("sched_name", ["none", "onecycle", "lambda", "lambda_tensor", "cosine", "step", "plateau"])
def test_schedulers_see_their_own_lr_and_step_sees_scaled_lr(sched_name, mode):
    baseline, _, _ = _train(sched_name, mode)
    skipped = {7, 8}  # skipped steps inside the reduction window
    scheduled, seen, scales = _train(sched_name, mode, events=EVENTS, skipped=skipped)

    assert min(scales) == 0.25 and scales[-1] == 1.0  # the run really had a reduction window and recovered
    assert _flat(scheduled) == pytest.approx(_flat(baseline), rel=1e-12, abs=0)
    if sched_name != "none":
        assert len({tuple(v) for v in baseline}) > 3  # the scheduler really moved the lr
    assert sorted(seen) == [s for s in range(N_STEPS) if s not in skipped]
    for step, lrs in seen.items():
        expected = [lr * scales[step] for lr in scheduled[step]]
        assert lrs == pytest.approx(expected, rel=1e-6, abs=0)
    assert any(not math.isclose(seen[s][0], scheduled[s][0]) for s in seen)


# ---------------------------------------------------------------- do no harm, then converge


def test_every_nonfinite_step_counts_with_patience_one():
    # The default (2) is tested with the other do-no-harm patterns in test_robust_stats.py.
    strict = LRGuard(factor=0.5, nonfinite_patience=1)
    assert strict.update(False, nonfinite=True) is True
    assert strict.scale() == 0.5


def test_settle_steps_hold_without_cutting_again():
    guard = LRGuard(factor=0.5, patience=1, settle_steps=2)
    assert guard.update(True) is True
    assert guard.update(True) is False  # the next two flags reflect weights from before the cut
    assert guard.update(True) is False
    assert guard.scale() == 0.5
    assert guard.update(True) is True
    assert guard.scale() == 0.25


@pytest.mark.parametrize("reset", [True, False])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=0.1),
    ],
)
def test_a_reduction_zeroes_the_first_moments_before_the_next_step(reset, make_opt):
    model = torch.nn.Linear(3, 1)
    opt = make_opt(model.parameters())
    guard = LRGuard(factor=0.5, patience=1, reset_momentum=reset)
    guard.attach(opt)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    opt.step()
    name = "momentum_buffer" if isinstance(opt, torch.optim.SGD) else "exp_avg"
    before = {id(p): opt.state[p][name].clone() for p in model.parameters()}
    second = {id(p): opt.state[p].get("exp_avg_sq", torch.zeros(())).clone() for p in model.parameters()}
    guard.update(True)
    opt.step()  # the same gradients again
    for p in model.parameters():
        grad_term = p.grad if name == "momentum_buffer" else 0.1 * p.grad  # (1 - beta1) * grad for Adam
        expected = grad_term if reset else opt.state[p][name]
        if reset:
            assert torch.allclose(opt.state[p][name], expected)
            # Adam's second moments are kept: zeroing them would enlarge the next steps.
            if "exp_avg_sq" in opt.state[p]:
                assert not torch.equal(opt.state[p]["exp_avg_sq"], torch.zeros_like(second[id(p)]))
        else:
            assert not torch.allclose(opt.state[p][name], grad_term)
        assert before[id(p)].abs().sum() > 0


def test_state_with_memory_loads_with_weights_only_and_is_checked():
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=3)
    guard.update(True)
    guard.update(False, nonfinite=True)
    resumed = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=3)
    resumed.load_state_dict(torch.load(_roundtrip(guard.state_dict()), weights_only=True))
    assert resumed.state_dict() == guard.state_dict()
    with pytest.raises(ValueError, match="ceiling"):
        resumed.load_state_dict({"keys": {"0": {"anchor": 0.5, "calm": 0, "pending": 0, "ceiling": 0.0}}})


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_rewind_replaces_the_cuts_since_a_snapshot_with_one():
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    for _ in range(10):
        guard.update(False)
    before = guard.snapshot()
    assert before["anchor"] == 1.0 and before["ceiling"] == 1.0
    for _ in range(3):  # three cuts in a row on weights that a rollback is about to throw away
        assert guard.update(True)
    # One burst: no ceiling yet (it may have been bad batches); the rollback's restart is evidence enough.
    assert guard.scale() == 0.125 and guard.ceiling() == 1.0
    assert guard.rewind(before)
    assert guard.scale() == 0.5 and guard.ceiling() == pytest.approx(math.sqrt(0.5))
    # From there on it behaves as if that one cut had been the only one: hold, then recover to the ceiling.
    for _ in range(2 + 4):
        assert not guard.update(False)
    assert guard.scale() == pytest.approx(math.sqrt(0.5))
    # Another key is untouched; the snapshot of a key never updated is the fresh state.
    assert guard.scale(1) == 1.0 and guard.snapshot(1)["anchor"] == 1.0
    assert guard.rewind(guard.snapshot(1), key=1) and guard.scale(1) == 0.5


def test_rewind_takes_the_deeper_of_its_factor_and_the_guards():
    guard = LRGuard(factor=0.5, patience=1, cooldown=2, recovery_steps=4)
    before = guard.snapshot()
    assert guard.rewind(before, factor=0.1)
    # A tenth, and recovery to just below the rate that diverged: the geometric middle of the two.
    assert guard.scale() == pytest.approx(0.1) and guard.ceiling() == pytest.approx(math.sqrt(0.1))
    for _ in range(2 + 4):
        guard.update(False)
    assert guard.scale() == pytest.approx(math.sqrt(0.1))
    # A guard whose own factor is deeper keeps it; a factor outside (0, 1) is refused, naming the argument.
    deep = LRGuard(factor=0.05)
    assert deep.rewind(deep.snapshot(), factor=0.1) and deep.scale() == pytest.approx(0.05)
    kept = guard.snapshot()
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="factor"):
            guard.rewind(before, factor=bad)
    assert guard.snapshot() == kept  # a refused call changes nothing


# ---------------------------------------------------------------------------------------------- lone spikes


def test_clipped_spikes_between_calm_steps_count_for_nothing():
    # Bad batches a few steps apart, each clipped: before, the second one within the cooldown cut the rate.
    guard = LRGuard(cooldown=20)
    _calm(guard, 3)
    for _ in range(5):
        assert guard.update(True, clipped=True) is False
        _calm(guard, 3)
    assert guard.scale() == 1.0 and guard.state_dict()["keys"]["0"]["pending"] == 0
    # Unclipped (no clipper), or with spare_lone=False, each counts: the second cuts.
    for guard, clipped in ((LRGuard(), False), (LRGuard(spare_lone=False), True)):
        assert guard.update(True, clipped=clipped) is False
        _calm(guard, 2)
        assert guard.update(True, clipped=clipped) is True
        assert guard.scale() == 0.5


@pytest.mark.parametrize("after", ["exploding", "clipped", "nonfinite", "diverging"])
def test_a_clipped_spike_followed_by_trouble_counts_on_the_next_step(after: str):
    # A rate too high climbs from step to step: its first spike counts once the next step shows trouble too, so the
    # cut comes on the same step as when every event counted at once.
    guard = LRGuard(nonfinite_patience=3)
    _calm(guard, 3)
    assert guard.update(True, clipped=True) is False  # decided with the next step
    kwargs = {"clipped": True} if after in ("clipped", "exploding") else {after: True}
    reduced = guard.update(after == "exploding", **kwargs)
    # The deferred spike counts (patience 1 of 2); an exploding or diverging step then cuts, as before.
    assert reduced is (after in ("exploding", "diverging"))
    assert guard.state_dict()["keys"]["0"]["pending"] == (0 if reduced else 1)
    # A spike after a troubled step is no lone one: it counts at once.
    guard = LRGuard()
    guard.update(False, clipped=True)
    guard.update(True, clipped=True)
    assert guard.state_dict()["keys"]["0"]["pending"] == 1


def test_a_deferred_spike_survives_the_state_round_trip():
    guard = LRGuard(cooldown=5)
    guard.update(True)  # an unclipped event counts at once: pending 1
    _calm(guard, 3)
    guard.update(True, clipped=True)  # a clipped one after three calm steps: deferred
    state = guard.state_dict()
    assert state["keys"]["0"]["pending"] == 1
    assert state["keys"]["0"]["deferred"] == 1
    resumed = LRGuard()
    resumed.load_state_dict(state)
    for g in (guard, resumed):
        assert g.update(True) is True  # the deferred spike counts (pending 2): the cut; this step only holds
        assert g.scale() == 0.5
    assert resumed.state_dict() == guard.state_dict()
    with pytest.raises(ValueError, match="spare_lone"):
        LRGuard(spare_lone="yes")  # type: ignore[arg-type]


def test_a_deferred_spike_that_completes_a_cut_on_a_step_that_cuts_by_itself_makes_one_cut():
    # Both are the same trouble on adjacent steps: one cut, as the engine counts one per call.
    guard = LRGuard()
    guard.update(True)  # pending 1
    _calm(guard, 3)
    guard.update(True, clipped=True)  # deferred
    assert guard.update(False, diverging=True) is True
    assert guard.scale() == 0.5


def test_a_step_clipped_only_by_a_fixed_bound_is_calm_when_flagged_is_given():
    # Under a max_norm below the usual norm every step is clipped; only the detector's flag says trouble.
    guard = LRGuard(cooldown=20)
    for _ in range(4):
        for _ in range(3):
            guard.update(False, clipped=True, flagged=False)
        guard.update(True, clipped=True, flagged=True)
    guard.update(False, clipped=True, flagged=False)
    assert guard.scale() == 1.0
    # Without `flagged`, a clipped step is trouble: the spikes are not alone, and the second cuts.
    guard = LRGuard(cooldown=20)
    cuts = 0
    for _ in range(2):
        for _ in range(3):
            cuts += guard.update(False, clipped=True)
        cuts += guard.update(True, clipped=True)
    assert cuts == 1 and guard.scale() == 0.5


def test_spikes_every_other_step_are_no_lone_ones():
    # A rate at the edge of stability: a clipped spike, an ordinary step, a spike... Each had a calm step on either
    # side; spared, the rate was never cut. A spike needs three calm steps before it to be a lone one.
    guard = LRGuard()
    _calm(guard, 5)
    cuts = []
    for _ in range(3):
        cuts.append(guard.update(True, clipped=True))
        cuts.append(guard.update(False))
    assert cuts.count(True) == 1 and guard.scale() == 0.5
    assert cuts.index(True) == 4  # on the third spike: the first was spared, the second and third counted


@pytest.mark.parametrize("after", ["calm", "exploding"])
def test_withdrew_reports_the_held_cut_withdrawn_by_the_calm_step_after_a_run(after: str) -> None:
    # A calm step after a run of non-finite steps withdraws the cut the run held; trouble makes it real.
    guard = LRGuard()
    assert [guard.update(False, nonfinite=True) for _ in range(4)] == [False, False, False, True]
    assert guard.scale() == 0.5 and guard.holds_cut() and not (guard.withdrew() or guard.confirmed())
    guard.update(after == "exploding", clipped=after == "exploding")
    assert guard.withdrew() is (after == "calm") and guard.confirmed() is (after == "exploding")
    assert guard.scale() == (1.0 if after == "calm" else 0.5) and not guard.holds_cut()
    guard.update(False)
    assert not (guard.withdrew() or guard.confirmed())  # they describe one update only
    assert not {"withdrew", "confirmed"} & set(guard.state_dict()["keys"]["0"])


def test_nonfinite_run_counts_the_steps_in_a_row_and_a_long_run_still_holds_its_cut() -> None:
    # What a rollback waits for besides trouble after the run: the run going on (a model wrecked into NaN stays there).
    guard = LRGuard()
    runs = []
    for _ in range(10):
        guard.update(False, nonfinite=True)
        runs.append(guard.nonfinite_run())
    assert runs == list(range(1, 11)) and not guard.confirmed()
    assert guard.holds_cut() and guard.scale() == 0.5  # still held: a calm step would withdraw it
    guard.update(False)
    assert guard.withdrew() and guard.scale() == 1.0 and guard.nonfinite_run() == 0
