"""GuardEngine in a plain PyTorch loop: the same decisions as GradGuard, state round-trips, skipping, no host sync,
and the compiled tail (against the eager one, bit for bit)."""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import lightning_gradguard.engine as engine_module
from lightning_gradguard import (
    L2,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    GuardEngine,
    LRGuard,
    NormClip,
    Rollback,
    VanishingDetector,
    ZClip,
)
from lightning_gradguard.engine import NonFiniteGradientError, StepEvent
from tests.helpers import SyncRecorder, assert_same_state, destroy_process_group
from tests.models import Regressor, regression_data, trainer

SPIKE, NAN = 9, 14


class Troubled(Regressor):
    """Healthy steps, a 1e4 loss spike at step ``SPIKE`` and a NaN loss at step ``NAN`` (steps counted from 1)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.scaled(super().training_step(batch, batch_idx), self.global_step + 1)

    @staticmethod
    def scaled(loss: torch.Tensor, step: int) -> torch.Tensor:
        if step == SPIKE:
            return loss * 1e4
        if step == NAN:
            return loss * math.nan
        return loss


def _parts() -> dict[str, Any]:
    return dict(
        clip=ZClip(warmup_steps=5),
        exploding=ExplodingDetector(warmup_steps=5),
        vanishing=VanishingDetector(patience=3),
        lr_guard=LRGuard(cooldown=3, recovery_steps=5),
        regularizers=[L2(1e-3)],
        rollback=Rollback(every=5),
    )


def test_a_plain_loop_takes_the_callbacks_decisions_on_the_same_gradients() -> None:
    steps = 24
    torch.manual_seed(0)
    fitted = Troubled(optimizer="adam", lr=1e-2)
    guard = GradGuard(**_parts(), log_every_n_steps=5)
    with pytest.warns(UserWarning):
        trainer(max_steps=steps, max_epochs=-1, callbacks=[guard]).fit(fitted, regression_data())

    torch.manual_seed(0)
    model = Troubled(optimizer="adam", lr=1e-2)  # the LightningModule as a plain nn.Module: same layer names
    parts = _parts()
    optimizer = model.configure_optimizers()
    engine = GuardEngine(model, **parts)
    handle = engine.attach(optimizer)
    events: list[StepEvent] = []
    step = 0
    while step < steps:
        for x, y in regression_data():
            step += 1
            optimizer.zero_grad()
            loss = Troubled.scaled(nn.functional.mse_loss(model(x), y), step)
            loss.backward()
            events += engine.drain()
            # The loss GradGuard takes from on_before_backward, the examples it counts from the batch.
            engine.step(optimizer=optimizer, loss=loss, samples=len(x))
            optimizer.step()
            if step == steps:
                break
    handle.remove()
    events += engine.drain()

    for a, b in zip(fitted.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # The logging windows differ: GradGuard logged every 5 steps, the plain loop never took a snapshot.
    logged, plain = guard.state_dict()["optimizers"]["0"], engine.state_dict()
    assert_same_state({**logged, "window": None}, {**plain, "window": None})
    assert guard.lr_guard is not None and guard.lr_guard.state_dict() == parts["lr_guard"].state_dict()
    assert guard.summary() == engine.summary()
    summary = engine.summary()
    assert summary["exploding"] >= 1 and summary["nonfinite"] == summary["skipped"] == 1
    assert [e.step for e in events if e.nonfinite] == [NAN]
    assert any(e.exploding and e.step == SPIKE for e in events)


def _grads(step: int, model: nn.Module, g: torch.Generator) -> None:
    """A fixed sequence of gradients: a spike, a NaN step and a layer without gradients for a while."""
    for i, p in enumerate(model.parameters()):
        grad = torch.randn(p.shape, generator=g)  # drawn either way: the stream does not depend on the pattern
        p.grad = None if (i in (2, 3) and 10 <= step < 15) else grad
    if step == 8:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(1e3)
    if step == 18:
        next(model.parameters()).grad[0, 0] = math.nan


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _run(
    engine_of: Callable[[nn.Module], GuardEngine],
    steps: range,
    engine: GuardEngine | None = None,
    model: nn.Module | None = None,
) -> tuple[GuardEngine, nn.Module, list[torch.Tensor]]:
    model = model if model is not None else _model()
    engine = engine if engine is not None else engine_of(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps.start - 1):  # the same random stream whatever the first step
        for p in model.parameters():
            torch.randn(p.shape, generator=g)
    gathered = []
    for step in steps:
        _grads(step, model, g)
        engine.step()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
        gathered.append(engine.gather().clone())
    return engine, model, gathered


def _engine(model: nn.Module, **kwargs: Any) -> GuardEngine:
    return GuardEngine(
        model,
        exploding=ExplodingDetector(warmup_steps=3),
        vanishing=VanishingDetector(patience=3),
        clip=ZClip(warmup_steps=3),
        **kwargs,
    )


def test_state_dict_round_trip_continues_exactly() -> None:
    whole, _, straight = _run(_engine, range(1, 31))
    first, model, _ = _run(_engine, range(1, 16))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _engine(model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    second, _, after = _run(_engine, range(16, 31), engine=resumed, model=model)
    assert_same_state(whole.state_dict(), second.state_dict())
    assert whole.summary() == second.summary()
    # The detectors and the clipper continue as if never interrupted: the recorded counters follow the same path.
    for a, b in zip(straight[15:], after):
        assert torch.equal(a[8:13], b[8:13])


def test_the_state_holds_the_adaptive_regularizers_strengths() -> None:
    # User trial: resumed from engine.state_dict() as the README shows, an adaptive L2 went from 4.78 back to 1.
    def regularized(model: nn.Module) -> GuardEngine:
        return _engine(model, regularizers=[L2(0.05, adaptive=True, decay=0.9)])

    whole, whole_model, _ = _run(regularized, range(1, 31))
    first, model, _ = _run(regularized, range(1, 16))
    assert first.regularizers[0].strength > 1.5  # the spike of step 8 raised it
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = regularized(model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.regularizers[0].strength == first.regularizers[0].strength
    second, _, _ = _run(regularized, range(16, 31), engine=resumed, model=model)
    assert second.regularizers[0].strength == whole.regularizers[0].strength
    assert all(torch.equal(a, b) for a, b in zip(whole_model.parameters(), model.parameters()))
    # A state from before the strengths were saved loads, leaving them as they are.
    older = first.state_dict()
    del older["regularizers"]
    stepping = regularized(_model())
    stepping.regularizers[0].on_exploding(True)
    strength = stepping.regularizers[0].strength
    stepping.load_state_dict(older)
    assert stepping.regularizers[0].strength == strength > 1.0


def test_a_regularizer_bound_to_another_models_engine_is_refused() -> None:
    # Binding it to the second model silently took it from the first engine, which then added no term at all.
    shared = L2(0.05)
    generator, discriminator = _model(), _model()
    GuardEngine(generator, regularizers=[shared])
    with pytest.raises(ValueError, match="bound to another model.*regularizers of its own"):
        GuardEngine(discriminator, regularizers=[shared])
    GuardEngine(generator, regularizers=[shared])  # the same model again: the same selection
    GuardEngine(torch.compile(generator), regularizers=[shared])  # compiled, the same module
    generator[4] = nn.Linear(8, 1)  # its head replaced: still the same module, compiled or not
    GuardEngine(torch.compile(generator), regularizers=[shared])
    # A model that holds the first one is another model: rebound there, the selection by name would move.
    head = L2(1.0, modules=r"^2$")
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    GuardEngine(inner, regularizers=[head])
    with pytest.raises(ValueError, match="bound to another model"):
        GuardEngine(nn.Sequential(inner, nn.Tanh(), nn.Linear(4, 1)), regularizers=[head])
    # Lazy models bind at their first step: the second engine's is refused there.
    lazy = L2(0.05)
    first, second = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 1)), nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 1))
    engines = [GuardEngine(m, regularizers=[lazy]) for m in (first, second)]
    for model, engine in zip((first, second), engines):
        model(torch.randn(2, 3)).sum().backward()
        if engine is engines[0]:
            engine.step()
        else:
            with pytest.raises(ValueError, match="bound to another model"):
                engine.step()


@pytest.mark.parametrize("lr_first", [True, False])
def test_the_lr_guards_state_holds_the_cut_of_the_last_step_whichever_state_is_taken_first(lr_first: bool) -> None:
    """Two spikes three steps apart call for a cut; the second one's flags are not acted on before the states are
    taken. Each state acts on them first: before, the LR guard's own did not, and taken before the engine's it
    lost the cut (a resumed run trained on at the full rate)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lr_guard = LRGuard(spare_lone=False)  # the spikes are lone ones, clipped: counted, they cut
    engine = GuardEngine(model, exploding=ExplodingDetector(warmup_steps=3), lr_guard=lr_guard, rollback=None)
    engine.attach(opt)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 17):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * (1e3 if step in (13, 16) else 1.0)
        engine.step(optimizer=opt)
        opt.step()
    if lr_first:
        saved_lr, saved = lr_guard.state_dict(), engine.state_dict()
    else:
        saved, saved_lr = engine.state_dict(), lr_guard.state_dict()
    assert engine.summary()["exploding"] == 2 and engine.summary()["lr_reduced"] == 1
    resumed = LRGuard()
    resumed.load_state_dict(copy.deepcopy(saved_lr))
    assert resumed.scale() == lr_guard.scale() == 0.5
    assert saved["host_counts"] == engine.host_counts


@pytest.mark.parametrize("load", ["engine only", "lr guard first", "lr guard second", "recovering at once"])
def test_a_resume_that_leaves_the_lr_guards_state_behind_is_warned_about(load: str) -> None:
    # The README saves both states; with the engine's alone the held cut was dropped silently (the multiplier back at
    # 1x, while `summary()` still counted the cut) and the resumed run trained on at the rate that exploded.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = GuardEngine(
        model, exploding=ExplodingDetector(warmup_steps=3), lr_guard=LRGuard(spare_lone=False), rollback=None
    )
    handle = engine.attach(opt)
    g = torch.Generator().manual_seed(1)

    def step(engine: GuardEngine, spike: bool = False) -> None:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * (1e3 if spike else 1.0)
        engine.step(optimizer=opt)
        opt.step()

    for n in range(1, 18):
        step(engine, spike=n in (13, 16))
    assert engine.lr_guard is not None and engine.lr_guard.scale() < 1.0
    saved, saved_lr = copy.deepcopy(engine.state_dict()), copy.deepcopy(engine.lr_guard.state_dict())
    handle.remove()
    # A guard that recovers at once is at 1x right after its state is loaded: loaded all the same, no warning.
    quick = load == "recovering at once"
    lr_guard = LRGuard(spare_lone=False, **({"memory": False, "recovery_steps": 1, "cooldown": 0} if quick else {}))
    resumed = GuardEngine(model, exploding=ExplodingDetector(warmup_steps=3), lr_guard=lr_guard)
    resumed.attach(opt)
    assert resumed.lr_guard is not None
    if load in ("lr guard first", "recovering at once"):
        resumed.lr_guard.load_state_dict(saved_lr)
    resumed.load_state_dict(saved)
    if load == "lr guard second":
        resumed.lr_guard.load_state_dict(saved_lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(resumed)
        step(resumed)
    said = [str(w.message) for w in caught if "its own state was not loaded" in str(w.message)]
    assert len(said) == (1 if load == "engine only" else 0)
    assert not quick or lr_guard.scale() == 1.0
    assert load != "engine only" or f"{engine.lr_guard.scale():.3g}x" in said[0]


def test_an_lr_guard_copied_or_pickled_leaves_its_engines_behind() -> None:
    lr_guard = LRGuard()
    GuardEngine(_model(), lr_guard=lr_guard, rollback=None)
    assert len(lr_guard._feeders) == 1
    for copied in (copy.deepcopy(lr_guard), pickle.loads(pickle.dumps(lr_guard))):
        assert len(copied._feeders) == 0 and copied.state_dict() == lr_guard.state_dict()


def test_a_copied_engine_refuses_to_be_used_and_its_state_carries_over_to_a_copied_model() -> None:
    # A deep copy watched the original's parameters by identity: its regularizers added nothing to the copy's
    # gradients, the copied optimizer had no LR hook (torch drops them), and it warned of an optimizer "holding none
    # of its parameters". A copy is now a placeholder that refuses every use; the state goes over as it says.
    def loop(model: nn.Module, optimizer: torch.optim.Optimizer, engine: GuardEngine, steps: range) -> None:
        for step in steps:
            optimizer.zero_grad()
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean() * (1e4 if step == 12 else 1.0)
            loss.backward()
            engine.step(loss=loss, optimizer=optimizer)
            optimizer.step()
            engine.drain()  # feeds the LR guard

    def guarded(model: nn.Module) -> tuple[torch.optim.Optimizer, GuardEngine]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = _engine(model, lr_guard=LRGuard(patience=1, spare_lone=False), regularizers=[L2(0.1)])
        engine.attach(optimizer)
        return optimizer, engine

    model = _model()
    optimizer, engine = guarded(model)
    loop(model, optimizer, engine, range(1, 15))
    for copied in (copy.deepcopy(engine), copy.copy(engine), pickle.loads(pickle.dumps(engine))):
        assert repr(copied) == "<copy of a GuardEngine of 3 layers: unusable>"
        assert not hasattr(copied, "step") and getattr(copied, "steps", None) is None  # probes go on
        with pytest.raises(TypeError, match=r"cannot be used.*`load_state_dict\(engine.state_dict\(\)\)`"):
            copied.step()
    twin = copy.deepcopy(model)
    twin_optimizer, twin_engine = guarded(twin)
    twin_optimizer.load_state_dict(optimizer.state_dict())
    twin_engine.load_state_dict(engine.state_dict())
    assert twin_engine.lr_guard is not None and engine.lr_guard is not None
    twin_engine.lr_guard.load_state_dict(engine.lr_guard.state_dict())
    assert engine.lr_guard.scale() < 1.0  # the spike cut the rate: the twin goes on at the lowered rate too
    loop(model, optimizer, engine, range(15, 30))
    loop(twin, twin_optimizer, twin_engine, range(15, 30))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert twin_engine.summary() == engine.summary()


def test_a_module_that_holds_an_engine_can_be_averaged_by_stochastic_weight_averaging() -> None:
    # SWA (and EMA) deep-copy the LightningModule: a module keeping its plain-loop engine must still train (a copy
    # that raised at once broke the fit).
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    class Manual(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.engine = GuardEngine(self.net)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            optimizer = self.optimizers()
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            self.engine.step(loss=loss.detach(), optimizer=optimizer)
            optimizer.step()

    model = Manual()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[StochasticWeightAveraging(swa_lrs=0.01)]).fit(model, regression_data())
    assert isinstance(model.engine, GuardEngine) and model.engine.steps == 32


def test_load_state_dict_refuses_other_layers() -> None:
    engine = _engine(_model())
    other = GuardEngine(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="saved for other parameters.*nothing was restored"):
        other.load_state_dict(engine.state_dict())


def test_load_state_dict_of_the_same_parameters_grouped_otherwise_restarts_the_per_layer_detectors() -> None:
    first, model, _ = _run(_engine, range(1, 16))
    regrouped = _engine(model, group_fn=lambda name: "net")  # one layer where the state has three
    assert len(regrouped.index.names) != len(first.index.names)
    with pytest.warns(UserWarning, match="grouped into other layers"):
        regrouped.load_state_dict(first.state_dict())
    assert regrouped.steps == first.steps == 15
    assert regrouped.summary() == first.summary()
    assert_same_state(regrouped.state_dict()["clip"], first.state_dict()["clip"])
    fresh = _engine(model, group_fn=lambda name: "net").state_dict()
    assert_same_state(regrouped.state_dict()["exploding"], fresh["exploding"])


def test_a_non_finite_step_is_skipped_in_a_plain_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(optimizer)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(1, 8):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (math.nan if step == 5 else 1.0)
        loss.backward()
        before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()["state"])
        engine.step()
        optimizer.step()
        if step == 5:
            assert engine.skipped and all(p.grad is None for p in model.parameters())
            assert_same_state(before[0], model.state_dict())
            assert_same_state(before[1], optimizer.state_dict()["state"])  # Adam's moments and step count untouched
        else:
            assert not engine.skipped
    assert [(e.step, e.nonfinite, e.lr_reduced) for e in engine.drain()] == [(5, True, False)]
    snap = engine.snapshot()
    assert snap.counts["nonfinite"] == snap.counts["skipped"] == 1 and snap.counts["lr_reduced"] == 0
    assert {(r["kind"], r["step"]) for r in snap.events} == {("nonfinite", 5)}
    assert {r["layer"] for r in snap.events} == {"0", "2"}
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0  # one bad batch changes nothing


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_finite_gradients_whose_squared_norm_overflows_float32_are_not_applied(mode: str) -> None:
    # Eight tensors of one layer, each with a norm of 8e18: every entry and every tensor's norm is a finite float32,
    # but the layer's squared norm (5.1e38) is not. Before, the step counted as finite with an inf total norm, which
    # neither the detectors nor the clipper act on: it went through unclipped and uncounted.
    layer = nn.ParameterList([nn.Parameter(torch.zeros(4)) for _ in range(8)])
    model = nn.ModuleDict({"big": layer, "small": nn.Linear(2, 1)})
    engine = GuardEngine(model, on_nonfinite=mode)  # type: ignore[arg-type]
    for p in layer:
        p.grad = torch.full((4,), 4e18)
    for p in model["small"].parameters():
        p.grad = torch.ones_like(p)
    if mode == "raise":
        with pytest.raises(NonFiniteGradientError, match=r"beyond the float32 range.*\['big'\]"):
            engine.step()
        return
    engine.step()
    assert engine.skipped and all(p.grad is None for p in model.parameters())
    assert [(e.nonfinite, e.exploding) for e in engine.drain()] == [(True, False)]


class WrappedOptimizer(torch.optim.Optimizer):
    """Built as accelerate's ``AcceleratedOptimizer``: an ``Optimizer`` subclass that never runs
    ``Optimizer.__init__`` (so it has no step hooks of its own) and forwards to the optimizer it holds."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def test_a_wrapped_optimizer_gets_the_lr_guard_inside_its_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = WrappedOptimizer(inner)
    engine = GuardEngine(model, lr_guard=LRGuard(cooldown=3, recovery_steps=50))
    handle = engine.attach(optimizer)  # raised AttributeError ("_optimizer_step_pre_hooks") before
    seen: list[float] = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(1, 31):
        optimizer.zero_grad()
        # A blow-up, not a plateau: a streak of flagged steps counts again only while it climbs.
        loss = nn.functional.mse_loss(model(x), y) * {25: 1e2, 26: 1e4}.get(step, 1.0)
        loss.backward()
        engine.step()
        optimizer.step()
    assert [e.step for e in engine.drain() if e.lr_reduced] == [26]
    assert seen[:26] == [0.1] * 26 and max(seen[27:]) < 0.1  # the cut applies from the step after the flags land
    assert inner.param_groups[0]["lr"] == 0.1  # outside step() the scheduled rate stays
    handle.remove()


def test_a_rollback_restores_the_state_of_a_wrapped_optimizer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = WrappedOptimizer(inner)
    engine = GuardEngine(model, lr_guard=LRGuard(cooldown=3), rollback=Rollback(every=5))
    engine.attach(optimizer)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    copies: dict[int, list[torch.Tensor]] = {}
    for step in range(1, 31):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * {23: 1e2, 24: 1e4}.get(step, 1.0)
        loss.backward()
        engine.step(optimizer=optimizer)
        if engine.skipped:
            restored = [inner.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        optimizer.step()
        copies[step] = [inner.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert engine.snapshot().counts["rolled_back"] == 1
    # The inner optimizer's momentum as it was after step 14: the copy taken then was trusted after the calm
    # stretch up to step 20 (`every=5`); the one taken at step 20 had no calm stretch before the trouble.
    for a, b in zip(restored, copies[14]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _state_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict[str, Any]]:
    return [copy.deepcopy(optimizer.state.get(p, {})) for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "adam", "lbfgs"])
def test_after_a_rollback_the_optimizer_state_is_the_copys(name: str) -> None:
    # The LR guard's cut zeroed the restored moments before the next step (momentum reset), and LBFGS's history
    # (Python lists the optimizer appends to) was the abandoned run's: the copy had kept references to the lists.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=3, history_size=4),
    }[name](model.parameters())
    engine = GuardEngine(model, lr_guard=LRGuard(cooldown=3), rollback=Rollback(every=5))
    engine.attach(optimizer)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    states: dict[int, list[dict[str, Any]]] = {}
    rolled_back_at = None
    for step in range(1, 31):
        spike = {23: 1e2, 24: 1e4}.get(step, 1.0)
        first = True

        def closure(spike: float = spike) -> torch.Tensor:
            nonlocal first
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) * spike
            loss.backward()
            if first:  # the engine judges the step's gradients once; LBFGS's re-evaluations only regularize
                first = False
                engine.step(optimizer=optimizer, loss=loss)
            return loss

        if name == "lbfgs":
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        if engine.rolled_back:
            rolled_back_at = step
            after_rollback = _state_of(optimizer, model)
        states[step] = _state_of(optimizer, model)
    assert rolled_back_at is not None and engine.summary()["rolled_back"] == 1
    # The copy taken after step 14 was trusted after the calm stretch up to step 20 (`every=5`).
    assert name != "lbfgs" or len(states[14][0]["old_dirs"]) == 4  # a full history to restore
    assert_same_state(after_rollback, states[14])
    with pytest.raises(AssertionError):  # the state the rollback left was another one
        assert_same_state(states[rolled_back_at - 1], states[14])


def test_a_rollback_restores_the_attached_optimizers_state_when_step_is_not_given_it() -> None:
    # `step()` without `optimizer=` restored the weights only: the momentum the exploding steps built stayed in the
    # attached optimizer (a user trial's SGD run at 0.6 restarted 5 times instead of 2 and ended at 15x the loss).
    # The attached optimizer is the one about to step: the run is the same as with `optimizer=` passed.
    def run(passed: bool) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[float]]:
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = GuardEngine(model, clip=None, lr_guard=LRGuard(), rollback=Rollback(every=5))
        engine.attach(optimizer)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        losses = []
        for step in range(1, 18):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).mul(1e4 if step in (12, 13) else 1.0).backward()
            engine.step(optimizer=optimizer) if passed else engine.step()
            optimizer.step()
            losses.append(float(nn.functional.mse_loss(model(x), y)))
        assert engine.summary()["rolled_back"] == 1
        return [p.detach().clone() for p in model.parameters()], _state_of(optimizer, model), losses

    weights, state, losses = run(passed=False)
    weights_passed, state_passed, losses_passed = run(passed=True)
    assert losses == losses_passed and max(losses[-3:]) < 1.0
    for a, b in zip(weights, weights_passed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_same_state(state, state_passed)


def test_a_rollback_of_the_weights_only_still_stops_the_exploded_momentum() -> None:
    # With no optimizer the engine may restore (none passed, and the LR guard attached directly rather than through
    # the engine) a rollback restores the weights only: the momentum the exploding steps built is still in the
    # optimizer, and the rollback's cut must zero it (it kept it, and the loss was back at 1e10 a step later).
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = GuardEngine(model, clip=None, lr_guard=LRGuard(), rollback=Rollback(every=5))
    assert engine.lr_guard is not None
    engine.lr_guard.attach(optimizer)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses, rolled_back_at = [], []
    for step in range(1, 18):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).mul(1e4 if step in (12, 13) else 1.0).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.step()
        if engine.rolled_back:
            rolled_back_at.append(step)
        optimizer.step()
        if engine.rolled_back:
            assert optimizer.state[model.weight]["momentum_buffer"].abs().max() == 0
        losses.append(float(nn.functional.mse_loss(model(x), y)))
    assert len(rolled_back_at) == 1 and max(losses[-3:]) < 1.0


def test_a_cut_event_carries_the_rate_it_left_and_other_events_none() -> None:
    # The events table read the multiplier when the event was drained: with the flags landing inside the next step
    # (several processes, a late device copy), after a rollback had rewound it (1x instead of the cut's 0.5x).
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = GuardEngine(model, clip=None, lr_guard=LRGuard(factor=0.5, patience=1))
    engine.attach(optimizer)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    events = []
    for step in range(1, 40):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).mul(1e4 if step == 30 else 1.0).backward()
        engine.step()
        optimizer.step()
        events += engine.drain()
    (cut,) = [e for e in events if e.lr_reduced]
    assert cut.lr_scale == 0.5 and all(e.lr_scale is None for e in events if not e.lr_reduced)


class ScalingOptimizer(WrappedOptimizer):
    """``WrappedOptimizer`` with accelerate's fp16 step: through its own ``GradScaler``, which unscales (unless that
    was done already), skips a step with inf/NaN gradients and backs the scale off."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        super().__init__(optimizer)
        self.scaler = scaler

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.scaler.step(self.optimizer, closure)
        self.scaler.update()


def _scaled_run(how: str) -> tuple[list[float], list[float], GuardEngine, list[torch.Tensor]]:
    """Ten steps on scaled gradients, an inf loss at step 5; the engine told of the scaler as ``how`` says. Returns
    the total norms it measured, the scales after each step, the engine and the final weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    optimizer = ScalingOptimizer(inner, scaler) if how == "wrapper" else inner
    engine = GuardEngine(model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norms, scales = [], []
    for step in range(1, 11):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (math.inf if step == 5 else 1.0)
        scaler.scale(loss).backward()
        if how == "unscaled first":
            scaler.unscale_(inner)
        told: dict[str, bool | torch.amp.GradScaler] = {"scaler": scaler, "wrapper": False, "unscaled first": True}
        stats = engine.step(optimizer=optimizer, grad_scaler=told[how])
        assert stats is not None
        norms.append(float(stats.total_norm))
        if how == "wrapper":
            optimizer.step()
        else:
            scaler.step(inner)
            scaler.update()
        scales.append(scaler.get_scale())
    return norms, scales, engine, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["scaler", "wrapper", "unscaled first"])
def test_a_grad_scaler_is_unscaled_once_and_keeps_its_inf_steps(how: str) -> None:
    norms, scales, engine, weights = _scaled_run(how)
    # The reference: the same steps without a scaler, the inf step left out of the optimizer by hand.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    expected = []
    for step in range(1, 11):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        expected.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        if step != 5:
            optimizer.step()
    # Unscaled norms: before, the wrapper's run measured them 4096 times too large.
    assert [n for i, n in enumerate(norms) if i != 4] == pytest.approx([n for i, n in enumerate(expected) if i != 4])
    assert not math.isfinite(norms[4])
    # The inf step is the scaler's: it backed the scale off, and counts as overflow, not skipped. Before, the guard
    # skipped it and set every .grad to None, and the scaler's step raised "No inf checks were recorded".
    assert scales[3] == 2.0**12 and scales[4] == 2.0**11
    counts = engine.snapshot().counts
    assert (counts["overflow"], counts["skipped"], counts["nonfinite"]) == (1, 0, 0)
    for a, b in zip(weights, model.parameters()):
        torch.testing.assert_close(a, b)


def test_a_grad_scaler_needs_its_optimizer_and_no_grad_scale() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    engine = GuardEngine(model)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    with pytest.raises(ValueError, match="pass it as `optimizer=...`"):
        engine.step(grad_scaler=scaler)
    with pytest.raises(ValueError, match="leave `grad_scale` out"):
        engine.step(grad_scaler=scaler, optimizer=optimizer, grad_scale=scaler._scale)
    with pytest.raises(ValueError, match="`grad_scaler` must be a bool or a torch.amp.GradScaler"):
        engine.step(grad_scaler=1)  # type: ignore[arg-type]
    # A disabled scaler scales nothing: the step runs as without one.
    assert engine.step(grad_scaler=torch.amp.GradScaler("cpu", enabled=False)) is not None


def test_fabric_under_fp16_is_unscaled_through_its_precision_plugin() -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    # On the CPU "16-mixed" means bf16 without a scaler: fp16 with a GradScaler, asked for explicitly.
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    torch.manual_seed(0)
    model = fabric.setup_module(nn.Linear(4, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    engine = GuardEngine(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    norms, scales = [], []
    for step in range(1, 5):
        optimizer.zero_grad()
        fabric.backward(nn.functional.mse_loss(model(x).float(), y) * (math.inf if step == 2 else 1.0))
        if step == 3:
            fabric.clip_gradients(model, optimizer, max_norm=1e3)  # unscales first: not unscaled twice
        expected = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        stats = engine.step(optimizer=optimizer)
        assert stats is not None
        norms.append((float(stats.total_norm), expected / (1.0 if step == 3 else scaler.get_scale())))
        optimizer.step()  # before, the inf step's raised here: the guard had dropped every .grad
        scales.append(scaler.get_scale())
    assert scales == [2.0**12, 2.0**11, 2.0**11, 2.0**11]
    assert [a for a, _ in norms if math.isfinite(a)] == pytest.approx([b for a, b in norms if math.isfinite(a)])
    assert engine.snapshot().counts["overflow"] == 1


def test_the_scaler_of_an_older_fabric_optimizer_is_found_too() -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    from lightning_gradguard._compat import optimizer_scaler, unwrap_optimizer

    scaler = torch.amp.GradScaler("cpu")
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    model = fabric.setup_module(nn.Linear(4, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = fabric.setup_optimizers(inner)
    assert optimizer_scaler(optimizer) is scaler and unwrap_optimizer(optimizer) is inner
    # Older Fabric releases copied the optimizer's attributes into their wrapper, hooks included: the wrapper then
    # passes for the optimizer itself, and its scaler must still be found.
    optimizer.__dict__.update({k: v for k, v in inner.__dict__.items() if k not in ("state_dict", "step")})
    assert unwrap_optimizer(optimizer) is optimizer and optimizer_scaler(optimizer) is scaler


def test_a_first_step_without_any_gradient_is_warned_about_once() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    engine = GuardEngine(model)
    with pytest.warns(UserWarning, match=r"found no gradient .* after backward\(\)"):
        assert engine.step() is None  # called before backward (or DeepSpeed, which leaves .grad empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.step() is None  # once
        model(torch.randn(2, 4)).sum().backward()
        assert engine.step() is not None
        for p in model.parameters():
            p.grad = None
        assert engine.step() is None  # a later step without gradients (an idle optimizer): nothing said


def test_a_first_step_of_an_all_frozen_model_says_so() -> None:
    # Frozen parameters are watched (to be unfrozen later), so the engine builds; its first step must name the cause
    # rather than the call order (user trial: a model frozen by mistake was pointed at backward() and DeepSpeed).
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)).requires_grad_(False)
    engine = GuardEngine(model)
    with pytest.warns(UserWarning, match=r"none of its 4 parameters requires a gradient \(all frozen\)") as caught:
        assert engine.step() is None
    assert "DeepSpeed" not in str(caught[0].message)


def test_fsdp1_is_refused_with_what_to_use_instead() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
        model = nn.Sequential(FullyShardedDataParallel(inner, device_id=torch.device("cpu")), nn.Linear(1, 1))
        # Before: one layer, "0._fsdp_wrapped_module", measured on this process's shard alone.
        with pytest.raises(ValueError, match=r"does not support FSDP1 .*`fully_shard`"):
            GuardEngine(model)
    finally:
        destroy_process_group()


class AccumulatingOptimizer(WrappedOptimizer):
    """``WrappedOptimizer`` with accelerate's gradient accumulation: ``step`` and ``zero_grad`` pass on the
    micro-batches that do not end the window (``gradient_state.sync_gradients`` is ``False``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        self.gradient_state = SimpleNamespace(sync_gradients=True)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.gradient_state.sync_gradients:
            self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.gradient_state.sync_gradients:
            self.optimizer.zero_grad(set_to_none)


def test_micro_batches_that_do_not_end_an_accumulation_window_are_left_alone() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(24)]
    batches[9] = (torch.full((8, 4), math.nan), batches[9][1])  # the second micro-batch of the third window

    def run(wrapped: bool) -> tuple[list[float], GuardEngine | None, list[torch.Tensor]]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer = AccumulatingOptimizer(inner)
        engine = GuardEngine(model) if wrapped else None
        norms = []
        for i, (x, y) in enumerate(batches):
            optimizer.gradient_state.sync_gradients = i % 4 == 3
            (nn.functional.mse_loss(model(x), y) / 4).backward()
            if engine is not None:
                stats = engine.step(optimizer=optimizer)
                if stats is not None:
                    norms.append(float(stats.total_norm))
            elif optimizer.gradient_state.sync_gradients:  # the reference: the window's norm, its NaN step left out
                norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
                if not math.isfinite(norms[-1]):
                    inner.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
        return norms, engine, [p.detach().clone() for p in model.parameters()]

    norms, engine, weights = run(True)
    expected, _, reference = run(False)
    assert engine is not None and engine.steps == 6  # one per window; before, one per micro-batch (24)
    assert norms[:2] + norms[3:] == pytest.approx(expected[:2] + expected[3:]) and math.isnan(norms[2])
    assert engine.snapshot().counts["skipped"] == 1
    # The whole NaN window is skipped; before, the skip dropped the window's first micro-batch only, and the step
    # went on with the last two.
    for a, b in zip(weights, reference):
        torch.testing.assert_close(a, b)


def test_regularizers_of_a_lazy_module_are_bound_at_the_first_step() -> None:
    def run(guarded: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(1))
        reg = L2(0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = GuardEngine(model, clip=None, exploding=None, vanishing=None, regularizers=[reg] if guarded else [])
        for _ in range(5):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not guarded:
                loss = loss + reg.penalty(model)  # the reference: the penalty in the loss
            loss.backward()
            engine.step()
            optimizer.step()
        assert reg.param_names == ["0.weight", "2.weight"]
        return [p.detach().clone() for p in model.parameters()]

    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)


def test_raise_names_the_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    engine = GuardEngine(model, on_nonfinite="raise")
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = math.inf
    with pytest.raises(NonFiniteGradientError, match=r"step 1 in layer\(s\) \['1'\]"):
        engine.step()


def test_snapshot_reads_the_window_once_and_starts_the_next() -> None:
    engine, model, _ = _run(_engine, range(1, 12))
    snap = engine.snapshot()
    assert snap.layer_names == ["0", "2", "4"]
    assert snap.present.tolist() == [True, True, True]
    assert snap.total_norm_max >= snap.total_norm >= snap.total_norm_min > 0
    assert {r["step"] for r in snap.events if r["kind"] == "exploding"} == {8}  # every layer jumped 1000x
    metrics = snap.metrics("gradguard/", lr=0.1)
    assert {"gradguard/total_norm", "gradguard/clip_coef", "gradguard/ema_mean", "gradguard/events/exploding"} <= set(
        metrics
    )
    assert "gradguard/lr" not in metrics  # no LR guard
    # Layer "2" had no gradient on steps 10 and 11: the next window starts without it.
    _run(_engine, range(12, 13), engine=engine, model=model)
    later = engine.snapshot()
    assert later.events == [] and later.total_norm_max > -math.inf
    assert engine.snapshot().total_norm_max == -math.inf  # an empty window


def test_event_steps_follow_the_callers_numbers() -> None:
    model = nn.Sequential(nn.Linear(3, 1))
    engine = GuardEngine(model, clip=None, exploding=ExplodingDetector(warmup_steps=2))
    for number in (10, 12, 14, 15, 16, 18):  # two optimizers alternating, then one
        model[0].weight.grad = torch.ones(1, 3) * (1e4 if number == 16 else 1.0)
        model[0].bias.grad = torch.ones(1)
        engine.step(number)
    assert [(r["step"], r["layer"]) for r in engine.snapshot().events] == [(16, "0")]
    assert [e.step for e in engine.drain()] == [16]


def test_no_host_sync_in_the_engine_on_quiet_steps() -> None:
    model = _model()
    engine = _engine(model, on_nonfinite="zero", lr_guard=LRGuard())
    g = torch.Generator().manual_seed(1)
    calls: list[str] = []
    for step in range(1, 31):
        _grads(step, model, g)
        with SyncRecorder(calls):
            engine.step()
            engine.drain()
    assert calls == []
    with SyncRecorder(calls):
        engine.snapshot()
    assert calls, "the snapshot must copy to the host (the recorder must see it)"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_nonfinite": "ignore"},
        {"compile": "yes"},
        {"clip_exploding": 1},
        {"clip": "zclip"},
        {"exploding": VanishingDetector()},
        {"lr_guard": 0.5},
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GuardEngine(nn.Linear(2, 1), **kwargs)


# ----------------------------------------------------------------------------------------------- compiled tail
class _CountingBackend:
    """A torch.compile backend that runs the captured graph as it is (the same kernels as eager) and counts graphs."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize(
    "clip",
    [ZClip(warmup_steps=3), ZClip(warmup_steps=3, warmup_ratio=2.0), NormClip(1.0), AutoClip(history=8), None],
    ids=["zclip", "zclip-warmup-ratio", "normclip", "autoclip", "none"],
)
@pytest.mark.parametrize("on_nonfinite", ["skip", "zero"])
def test_the_compiled_tail_matches_the_eager_one_and_compiles_once(
    clip: Any, on_nonfinite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch._dynamo.reset()
    backend = _CountingBackend()
    monkeypatch.setattr(engine_module, "_COMPILE_BACKEND", backend)

    def make(compile: bool) -> Callable[[nn.Module], GuardEngine]:
        return lambda model: GuardEngine(
            model,
            clip=copy.deepcopy(clip),
            compile=compile,
            on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
            exploding=ExplodingDetector(warmup_steps=3),
            vanishing=VanishingDetector(patience=3),
        )

    eager, eager_model, eager_gathered = _run(make(False), range(1, 25))
    compiled, compiled_model, compiled_gathered = _run(make(True), range(1, 25))
    assert compiled._tail.state == "on"
    # One graph (the clipper's coefficient inside it when the clipper is fusable; two, before and after the
    # clipper, otherwise), and no recompilation although a layer lost and regained its gradients, a step was
    # non-finite and the clipper left its warm-up.
    assert backend.graphs == (1 if clip is None or clip.fusable else 2)
    for step, (a, b) in enumerate(zip(eager_gathered, compiled_gathered), 1):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), step
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(eager.state_dict(), compiled.state_dict())
    assert eager.drain() == compiled.drain()


def test_a_failing_compiler_falls_back_to_eager_with_one_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(engine_module, "_COMPILE_BACKEND", broken)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard.engine"):
        compiled, _, got = _run(lambda m: _engine(m, compile=True), range(1, 8))
    _, _, expected = _run(_engine, range(1, 8))
    assert compiled._tail.state == "off"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1 and len(caplog.records) == 1
    assert "running it eagerly" in caplog.records[0].message
    for a, b in zip(expected, got):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_auto_compiles_on_cuda_only() -> None:
    model = _model()
    engine = _engine(model)
    assert engine.compile == "auto"
    _run(lambda m: engine, range(1, 3), engine=engine, model=model)
    assert engine._tail.state == "off"  # a CPU engine stays eager


def test_gradguard_compiles_inside_the_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning calls on_before_optimizer_step from the closure that runs inside optimizer.step(): the compiled tail
    # must still compile there (and, under AMP or not, decide as the eager one does).
    torch._dynamo.reset()
    backend = _CountingBackend()
    monkeypatch.setattr(engine_module, "_COMPILE_BACKEND", backend)
    guards = {}
    for compile in (False, True):
        torch.manual_seed(0)
        guards[compile] = GradGuard(**_parts(), compile=compile)
        with pytest.warns(UserWarning):
            trainer(max_steps=16, max_epochs=-1, callbacks=[guards[compile]]).fit(
                Troubled(optimizer="adam", lr=1e-2), regression_data()
            )
    assert guards[True]._states[0]._tail.state == "on" and backend.graphs == 1
    assert_same_state(guards[False].state_dict(), guards[True].state_dict())


def test_compiling_is_announced_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    torch._dynamo.reset()
    monkeypatch.setattr(engine_module, "_COMPILE_BACKEND", _CountingBackend())
    monkeypatch.setattr(engine_module, "_compile_announced", False)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard.engine"):
        for _ in range(2):  # two engines (two optimizers): one line
            _run(lambda m: _engine(m, compile=True), range(1, 4))
        _run(_engine, range(1, 4))  # an eager engine says nothing
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(lines) == 1 and "compile=False" in lines[0]


def test_the_plain_loop_pipeline_does_not_import_lightning() -> None:
    # GuardEngine is what a plain loop uses: it must work where Lightning is not installed.
    code = (
        "import sys, torch\n"
        "from lightning_gradguard import AGC, L2, GuardEngine, LRGuard, Rollback, ZClip\n"
        "model = torch.nn.Linear(3, 1)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "engine = GuardEngine(model, clip=ZClip(), lr_guard=LRGuard(), regularizers=[L2(1e-3)], rollback=Rollback())\n"
        "engine.attach(optimizer)\n"
        "model(torch.randn(4, 3)).sum().backward()\n"
        "engine.step(optimizer=optimizer)\n"
        "AGC().clip_(model)\n"
        "engine.snapshot()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------- decisions around a checkpoint, AMP, keys
def _spiky_loop(spikes: tuple[int, ...]) -> tuple[nn.Module, torch.optim.Optimizer, GuardEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Every spike counts: two clipped lone spikes would cut nothing (`spare_lone`), and there would be no decision.
    engine = GuardEngine(model, lr_guard=LRGuard(spare_lone=False))
    engine.attach(optimizer)
    return model, optimizer, engine


def _steps(
    model: nn.Module, optimizer: Any, engine: GuardEngine, first: int, last: int, spikes: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)) for _ in range(last)]
    for i in range(first, last + 1):
        x, y = data[i - 1]
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y * (1000.0 if i in spikes else 1.0))
        loss.backward()
        engine.step(i, optimizer=optimizer, loss=loss.detach())
        optimizer.step()


def test_a_checkpoint_right_after_a_step_keeps_the_decisions_still_on_their_way() -> None:
    """Saved right after the second spike's step, before its flags were acted on (no drain(), as in an accelerate
    loop; on a GPU the copy may not have landed): the resumed run cuts where the whole run does, bitwise."""
    spikes = (60, 62)
    whole = _spiky_loop(spikes)
    _steps(*whole, 1, 80, spikes)
    model, optimizer, engine = _spiky_loop(spikes)
    _steps(model, optimizer, engine, 1, 62, spikes)
    assert engine.lr_guard is not None and engine.lr_guard.scale() == 1.0  # not acted on yet
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "engine": engine.state_dict(),
         "lr": engine.lr_guard.state_dict()},
        buffer,
    )  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, optimizer, engine = _spiky_loop(spikes)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    engine.load_state_dict(saved["engine"])
    assert engine.lr_guard is not None
    engine.lr_guard.load_state_dict(saved["lr"])
    _steps(model, optimizer, engine, 63, 80, spikes)
    for part in (whole[2], engine):
        part.drain()
    assert whole[2].lr_guard is not None and whole[2].lr_guard.scale() < 1.0
    assert engine.lr_guard.scale() == whole[2].lr_guard.scale()
    assert engine.summary() == whole[2].summary()
    for a, b in zip(model.parameters(), whole[0].parameters()):
        assert torch.equal(a, b)


def test_a_divergence_on_a_grad_scaler_overflow_step_is_acted_on() -> None:
    """An overflow step is routine scale calibration, its gradients no observation; its loss still is one. A loss that
    blows up is when fp16 gradients overflow: the divergence on that step cuts the rate."""

    def run(overflow_at: int | None) -> tuple[dict[str, int], float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        engine = GuardEngine(model, lr_guard=LRGuard())
        engine.attach(optimizer)
        g = torch.Generator().manual_seed(0)
        for i in range(1, 61):
            x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            scaled = scaler.scale(loss) * (math.inf if i == overflow_at else 1.0)
            scaled.backward()
            reported = loss.detach() * (10.0 ** min(i - 39, 8) if i >= 40 else 1.0)  # diverging from step 40
            engine.step(i, optimizer=optimizer, grad_scaler=scaler, loss=reported)
            scaler.step(optimizer)
            scaler.update()
            engine.drain()
        assert engine.lr_guard is not None
        return engine.summary(), engine.lr_guard.scale()

    clean, clean_scale = run(None)
    summary, scale = run(45)  # the step the divergence is called on
    assert clean["diverging"] == summary["diverging"] == 1 and summary["overflow"] == 1
    assert clean["lr_reduced"] == summary["lr_reduced"] == 1 and scale == clean_scale < 1.0


def test_two_engines_sharing_an_lr_guard_under_one_key_are_refused() -> None:
    guard = LRGuard()
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    first = torch.optim.SGD(a.parameters(), lr=0.1)  # kept alive: a collected optimizer holds no key
    handle = GuardEngine(a, lr_guard=guard).attach(first)
    second = torch.optim.SGD(b.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="key=0"):
        GuardEngine(b, lr_guard=guard).attach(second)
    with pytest.raises(ValueError, match="key=0"):
        guard.attach(second)  # as GradGuard attaches: the same check
    GuardEngine(b, lr_guard=guard, key=1).attach(second)  # a key each: fine
    handle.remove()
    GuardEngine(b, lr_guard=guard).attach(torch.optim.SGD(b.parameters(), lr=0.1))  # key 0 free again


def test_a_state_loaded_into_an_engine_that_has_been_stepping_continues_as_in_a_fresh_one() -> None:
    # "The loss blew up: reload the last good checkpoint" into the same objects. The flags of the engine's last
    # (abandoned) step were still waiting, and the restored run counted them: an LR cut the fresh engine never took.
    def build() -> tuple[nn.Module, torch.optim.Optimizer, GuardEngine]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = GuardEngine(model, lr_guard=LRGuard(), rollback="default")
        engine.attach(opt)
        return model, opt, engine

    def train(run: tuple[nn.Module, torch.optim.Optimizer, GuardEngine], steps: range, spikes: set[int]) -> None:
        model, opt, engine = run
        for s in steps:
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(s))
            opt.zero_grad()
            loss = (model(x) - x[:, :4].sum(1, keepdim=True)).square().mean() * (1e4 if s in spikes else 1.0)
            loss.backward()
            engine.step(optimizer=opt, loss=loss)
            opt.step()

    def load(run: tuple[nn.Module, torch.optim.Optimizer, GuardEngine], saved: dict[str, Any]) -> None:
        model, opt, engine = run
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        engine.load_state_dict(saved["guard"])
        engine.lr_guard.load_state_dict(saved["lr_guard"])

    live = build()
    train(live, range(1, 41), set())
    model, opt, engine = live
    state = {"guard": engine.state_dict(), "lr_guard": engine.lr_guard.state_dict()}
    saved = copy.deepcopy({**state, "model": model.state_dict(), "opt": opt.state_dict()})
    train(live, range(41, 43), {41, 42})  # two bad batches, then the reload
    load(live, copy.deepcopy(saved))  # each its own: an optimizer takes the loaded momentum tensors as they are
    fresh = build()
    load(fresh, copy.deepcopy(saved))
    for run in (live, fresh):
        train(run, range(43, 46), set())
    # The logging window holds the restored run's steps only (not the abandoned blow-up's 10^4x norms).
    windows = [run[2].snapshot() for run in (live, fresh)]
    assert windows[0].total_norm_max == windows[1].total_norm_max < 10
    assert windows[0].clip_coef == windows[1].clip_coef
    for run in (live, fresh):
        train(run, range(46, 81), {50})
    assert live[2].summary() == fresh[2].summary() and live[2].summary()["lr_reduced"] == 0
    assert all(torch.equal(a, b) for a, b in zip(live[0].parameters(), fresh[0].parameters()))


def test_drain_reports_a_held_cut_withdrawn_by_the_calm_step_after_its_run() -> None:
    # A plain loop sees the withdrawal as the table does: `lr_restored`, with the rate it leaves.
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(opt)
    events = []
    for step in range(1, 12):
        opt.zero_grad()
        loss = model(torch.ones(2, 4)).sum() * (math.nan if 4 <= step <= 7 else 1.0)
        loss.backward()
        engine.step(optimizer=opt)
        opt.step()
        events += engine.drain()
    events += engine.drain()
    changes = [(e.step, e.lr_reduced, e.lr_restored, e.lr_scale) for e in events if e.lr_reduced or e.lr_restored]
    assert changes == [(7, True, False, 0.5), (8, False, True, 1.0)]


def test_last_loss_is_the_loss_the_last_step_judged() -> None:
    model = torch.nn.Linear(3, 1)
    engine = GuardEngine(model, clip=None)
    assert engine.last_loss() is None
    for loss, share, expected in ((2.0, 1.0, 2.0), (torch.tensor(1.5), 0.5, 3.0), (math.inf, 1.0, math.inf)):
        model.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        engine.step(loss=loss, share=share)
        assert engine.last_loss() == expected  # a partial window's loss is the window's mean, as the detector takes it
    model.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    engine.step()
    last = engine.last_loss()
    assert last is not None and math.isnan(last)  # no loss this step
    # Without a divergence detector the engine takes no loss.
    engine = GuardEngine(model, clip=None, divergence=None)
    engine.step(loss=2.0)
    assert engine.last_loss() is None


def test_non_finite_steps_before_any_applied_step_are_not_the_rates_doing() -> None:
    def run(finite_first: int, nan_steps: int, resume_at: int | None = None) -> GuardEngine:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = GuardEngine(model, clip=None, lr_guard=LRGuard(), rollback=None)
        handle = engine.attach(optimizer)
        for step in range(finite_first + nan_steps):
            if step == resume_at:
                state = engine.state_dict()
                handle.remove()
                engine = GuardEngine(model, clip=None, lr_guard=engine.lr_guard, rollback=None)
                handle = engine.attach(optimizer)
                engine.load_state_dict(state)
            optimizer.zero_grad()
            scale = 1.0 if step < finite_first else math.nan
            (scale * model(torch.ones(4, 3))).sum().backward()
            engine.step(loss=1.0)
            optimizer.step()
        engine.drain()
        return engine

    # Twelve non-finite steps from the first: all skipped, no weight moved, no cut; a resume among them knows it.
    for resume_at in (None, 5):
        engine = run(0, 12, resume_at=resume_at)
        assert engine.summary()["skipped"] == 12 and engine.summary()["lr_reduced"] == 0
    # The same run after three applied steps is the weights' (the rate's) trouble: cut, as before; a resume between
    # the two keeps that the weights have moved.
    for resume_at in (None, 3):
        engine = run(3, 12, resume_at=resume_at)
        assert engine.summary()["skipped"] == 12 and engine.summary()["lr_reduced"] >= 1
