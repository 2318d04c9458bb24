"""``skip_exploding``: a flagged step is skipped (gradients dropped) instead of clipped, in real Trainer runs and in a
plain loop; eager and compiled agree, and the decision shares the one host read of ``on_nonfinite="skip"``. Also: a
step dropped under a fused optimizer's GradScaler (a skip, a rollback) does not stop the run."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_gradguard import ExplodingDetector, GradGuard, GuardEngine, LRGuard, Rollback, ZClip
from lightning_gradguard import engine as engine_module
from tests.helpers import ParamSnapshots, SyncRecorder, assert_same_state
from tests.models import Regressor, regression_data, trainer
from tests.test_do_no_harm import _level_shift_run

BAD = (30, 31)  # optimizer steps (0-based global_step) whose loss is multiplied: two bad batches in a row


class BadBatches(Regressor):
    """Adam (optionally fused, optionally under fp16 autocast); the loss of the steps in ``BAD`` is ``factor`` times
    larger."""

    def __init__(self, fused: bool = False, factor: float = 1e3) -> None:
        super().__init__(lr=1e-2, optimizer="adam")
        self.fused = fused
        self.factor = factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        return loss * self.factor if self.trainer.global_step in BAD else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)


def _fit(
    guard: GradGuard, fused: bool = False, plugins: list[Any] | None = None, factor: float = 1e3
) -> tuple[BadBatches, ParamSnapshots]:
    torch.manual_seed(0)
    model, snaps = BadBatches(fused=fused, factor=factor), ParamSnapshots()
    trainer(max_steps=40, callbacks=[guard, snaps], plugins=plugins or []).fit(model, regression_data(n=640))
    return model, snaps


def _moved(snaps: ParamSnapshots, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based) changed any parameter."""
    return any(not torch.equal(a, b) for a, b in zip(snaps.params[step - 1], snaps.params[step]))


def _guard(skip: bool) -> GradGuard:
    return GradGuard(skip_exploding=skip, exploding=ExplodingDetector(warmup_steps=5), rollback=None)


def test_flagged_steps_are_skipped_with_the_optimizer_state_untouched() -> None:
    guard = _guard(skip=True)
    _, snaps = _fit(guard)
    summary = guard.summary()
    assert summary["exploding"] >= 1 and summary["skipped"] == len(BAD) and summary["nonfinite"] == 0
    for step in BAD:
        assert not _moved(snaps, step), step
        assert_same_state(snaps.opt_state[step - 1], snaps.opt_state[step], f"Adam state at step {step}")
    assert _moved(snaps, BAD[-1] + 1)  # training goes on after them
    # Adam counted only the steps it took.
    assert int(snaps.opt_state[-1][0]["step"]) == 40 - len(BAD)


def test_by_default_flagged_steps_are_clipped_and_still_step() -> None:
    guard = _guard(skip=False)
    _, snaps = _fit(guard)
    summary = guard.summary()
    assert summary["exploding"] >= 1 and summary["skipped"] == 0
    assert all(_moved(snaps, step) for step in BAD)
    assert int(snaps.opt_state[-1][0]["step"]) == 40


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused-adam"])
def test_under_16_mixed_with_a_gradscaler_flagged_steps_are_skipped(fused: bool) -> None:
    # precision="16-mixed" silently becomes bf16 on the CPU: the GradScaler path needs the plugin spelled out. A small
    # scale and 100x bad batches: they spike without overflowing in fp16 (an overflow is the scaler's to skip).
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = _guard(skip=True)
    model, snaps = _fit(guard, fused=fused, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], factor=100.0)
    summary = guard.summary()
    assert summary["exploding"] >= 1 and summary["skipped"] == len(BAD) and summary["overflow"] == 0
    assert all(not _moved(snaps, step) for step in BAD)
    assert _moved(snaps, BAD[-1] + 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_rollback_under_16_mixed_with_a_fused_optimizer_does_not_stop_the_run() -> None:
    # The rollback drops the step's gradients while they still carry the loss scale: the scaler must have recorded
    # its inf check before, or its update() raised "No inf checks were recorded prior to update."
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    guard = GradGuard(lr_guard=LRGuard(patience=1), rollback=Rollback(), exploding=ExplodingDetector(warmup_steps=5))
    model, snaps = _fit(guard, fused=True, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], factor=1e4)
    summary = guard.summary()
    assert summary["rolled_back"] == 1 and summary["overflow"] == 0
    assert len(snaps.params) == 40 and all(torch.isfinite(p).all() for p in model.parameters())
    assert scaler.get_scale() == 1.0  # no overflow was recorded for the dropped step


def _engine_run(
    skip: bool | Literal["first"], compile: bool, on_nonfinite: str = "skip", scaler: bool = False, clip: bool = True
) -> tuple[GuardEngine, nn.Module, list[int]]:
    """A plain loop: Adam, a steady regression, two 1e3x batches at steps 20 and 21 and a NaN batch at 26 (with
    ``scaler``: an overflow that a GradScaler, played by the loop, skips)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = GuardEngine(
        model,
        clip=ZClip(warmup_steps=3) if clip else None,
        exploding=ExplodingDetector(warmup_steps=5),
        skip_exploding=skip,
        compile=compile,
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
    )
    g = torch.Generator().manual_seed(1)
    skipped = []
    for step in range(1, 31):
        opt.zero_grad()
        x = torch.randn(32, 8, generator=g)
        loss = (model(x) - x[:, :1]).square().mean()
        loss = loss * {20: 1e3, 21: 1e3, 26: float("nan")}.get(step, 1.0)
        loss.backward()
        engine.step(grad_scaler=scaler)
        if engine.skipped:
            skipped.append(step)
        if not (scaler and step == 26):
            opt.step()
    return engine, model, skipped


@pytest.mark.parametrize("clip", [True, False], ids=["zclip", "no-clipper"])
def test_in_a_plain_loop_the_flagged_and_the_nonfinite_steps_are_skipped(clip: bool) -> None:
    engine, _, skipped = _engine_run(skip=True, compile=False, clip=clip)
    assert skipped == [20, 21, 26]
    counts = engine.snapshot().counts
    assert counts["skipped"] == 3 and counts["nonfinite"] == 1 and counts["exploding"] >= 1
    _, _, skipped = _engine_run(skip=False, compile=False, clip=clip)
    assert skipped == [26]


@pytest.mark.parametrize("clip", [True, False], ids=["zclip", "no-clipper"])
def test_skip_exploding_first_skips_only_the_first_flagged_step_of_a_stretch(clip: bool) -> None:
    # Step 21 is flagged right after step 20: it goes on (clipped, where a clipper is set).
    engine, _, skipped = _engine_run(skip="first", compile=False, clip=clip)
    assert skipped == [20, 26]
    counts = engine.snapshot().counts
    assert counts["skipped"] == 2 and counts["nonfinite"] == 1 and counts["exploding"] >= 1
    assert (counts["clipped"] >= 1) == clip


class _Backend:
    """A torch.compile backend that runs the captured graph as it is (the same kernels as eager)."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        return gm.forward


@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "gradscaler"])
def test_the_compiled_tail_skips_the_same_steps_as_the_eager_one(scaler: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    monkeypatch.setattr(engine_module, "_COMPILE_BACKEND", _Backend())
    eager, eager_model, eager_skipped = _engine_run(skip=True, compile=False, scaler=scaler)
    compiled, compiled_model, compiled_skipped = _engine_run(skip=True, compile=True, scaler=scaler)
    assert compiled._tail.state == "on"
    assert eager_skipped == compiled_skipped == ([20, 21] if scaler else [20, 21, 26])
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
    # The clipper learnt from neither skipped step nor the overflow, in both orders.
    assert_same_state(eager.state_dict(), compiled.state_dict())


@pytest.mark.parametrize(
    ("skip", "on_nonfinite", "scaler", "reads"),
    [(False, "skip", False, 1), (True, "skip", False, 1), (True, "warn", False, 1), (False, "skip", True, 0),
     (True, "skip", True, 1)],
)  # fmt: skip
def test_the_decision_is_one_host_read_per_step(skip: bool, on_nonfinite: str, scaler: bool, reads: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    engine = GuardEngine(model, skip_exploding=skip, on_nonfinite=on_nonfinite)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    for step in range(1, 31):
        model.zero_grad()
        model(torch.randn(32, 8, generator=g)).square().mean().backward()
        calls: list[str] = []
        with SyncRecorder(calls):
            engine.step(grad_scaler=scaler)  # with a GradScaler, non-finite steps are the scaler's to skip
        assert len(calls) == reads, (step, calls)


def test_a_plain_loop_with_a_fused_optimizer_under_a_gradscaler_skips_through_before_drop() -> None:
    # The gradients are still scaled when the engine runs (the fused step unscales them): a step without gradients
    # leaves the scaler no inf check unless it unscales first, which `before_drop` asks for.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    engine = GuardEngine(model, exploding=ExplodingDetector(warmup_steps=5), skip_exploding=True)
    engine.before_drop = lambda: scaler.unscale_(opt)
    g = torch.Generator().manual_seed(1)
    skipped = []
    for step in range(1, 31):
        opt.zero_grad()
        x = torch.randn(32, 8, generator=g)
        loss = (model(x) - x[:, :1]).square().mean() * (1e3 if step in (20, 21) else 1.0)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        engine.step(grad_scaler=True, grad_scale=scaler._scale)
        scaler.step(opt)
        scaler.update()
        if engine.skipped:
            skipped.append(step)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert skipped == [20, 21] and scaler.get_scale() == 4.0


def test_the_warning_says_the_flagged_steps_are_skipped() -> None:
    with pytest.warns(UserWarning, match="guarded by: skipping the flagged steps") as caught:
        _fit(_guard(skip=True))
    assert not any("ZClip clipping" in str(w.message) for w in caught)


def test_without_skip_or_raise_nothing_is_read() -> None:
    model = nn.Linear(4, 1)
    engine = GuardEngine(model, on_nonfinite="warn")
    for _ in range(5):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        calls: list[str] = []
        with SyncRecorder(calls):
            engine.step()
        assert calls == []


def test_skip_exploding_first_goes_on_across_a_resume_a_non_finite_step_and_a_new_phase() -> None:
    def steps(engine: GuardEngine, model: nn.Module, run: range, factors: dict[int, float]) -> list[int]:
        g = torch.Generator().manual_seed(1)
        skipped = []
        for step in range(1, run.stop):
            x = torch.randn(32, 8, generator=g)  # the same stream whatever the first step
            if step not in run:
                continue
            model.zero_grad()
            ((model(x) - x[:, :1]).square().mean() * factors.get(step, 1.0)).backward()
            engine.step()
            skipped += [step] if engine.skipped else []
        return skipped

    def engine_of(model: nn.Module, on_nonfinite: str = "skip") -> GuardEngine:
        return GuardEngine(
            model, clip=ZClip(warmup_steps=3), exploding=ExplodingDetector(warmup_steps=5), lr_guard=None,
            skip_exploding="first", on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
        )  # fmt: skip

    spikes = {20: 1e3, 21: 1e3, 22: 1e3}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    whole = steps(engine_of(model), model, range(1, 26), spikes)
    assert whole == [20]
    # Resumed after the stretch's first step, the next one goes on as in the uninterrupted run.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    first = engine_of(model)
    assert steps(first, model, range(1, 21), spikes) == [20]
    resumed = engine_of(model)
    resumed.load_state_dict(first.state_dict())
    assert steps(resumed, model, range(21, 26), spikes) == []
    # A non-finite step inside the stretch is no observation, whatever on_nonfinite says.
    for mode in ("skip", "zero", "warn"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skipped = steps(engine_of(model, mode), model, range(1, 24), {20: 1e3, 21: math.inf, 22: 1e3})
        assert 20 in skipped and 22 not in skipped, mode
    # A new phase starts afresh: its first capped step is a first.
    engine = engine_of(model)
    engine._last_capped = True
    engine.new_phase()
    assert not engine._last_capped


@pytest.mark.parametrize("make", [lambda **kw: GradGuard(**kw), lambda **kw: GuardEngine(nn.Linear(2, 1), **kw)])
def test_bad_arguments_are_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="skip_exploding"):
        make(skip_exploding="yes")
    with pytest.raises(ValueError, match="skip_exploding"):
        make(skip_exploding=1)
    with pytest.raises(ValueError, match="skip_exploding.*needs `exploding`"):
        make(skip_exploding=True, exploding=None)


def test_a_jump_that_holds_is_skipped_until_taken_in_unless_the_new_phase_is_announced() -> None:
    # The task gets 30x harder for good at step 180 of 240 (a second, larger teacher): its first level_steps (5)
    # steps are skipped, which costs the run; announced with new_phase(), nothing is flagged and nothing skipped.
    _, unguarded = _level_shift_run(None, at=180, scale=30.0)
    guard = GradGuard(skip_exploding=True)
    _, skipping = _level_shift_run(guard, at=180, scale=30.0)
    assert guard.summary()["exploding"] == 1 and guard.summary()["skipped"] == 5
    assert skipping > unguarded * 1.02
    guard = GradGuard(skip_exploding=True)
    _, told = _level_shift_run(guard, at=180, scale=30.0, tell=True)
    assert guard.summary()["exploding"] == 0 and guard.summary()["skipped"] == 0
    assert told == pytest.approx(unguarded, rel=1e-3)
