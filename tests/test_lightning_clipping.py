"""``Trainer(gradient_clip_val=...)`` next to GradGuard: the logged ``clip_coef``, ``clip_threshold`` and
``events/clipped`` describe the gradients the optimizer actually receives (GradGuard takes clipping by norm over),
and clipping by value, which cannot be described by a norm coefficient, is left to Lightning with a precise warning.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_gradguard import AGC, ExplodingDetector, GradGuard, GuardEngine, NormClip, ZClip
from tests.helpers import MetricsLogger
from tests.models import Regressor, regression_data, trainer


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps fp64 copies of the gradients it steps with. Lightning runs the closure (forward, backward,
    ``on_before_optimizer_step``, its own clipping) inside ``step``: what is left after it is what the update uses."""

    def __init__(self, params: Any, lr: float, received: list[list[torch.Tensor]]) -> None:
        super().__init__(params, lr=lr)
        self.received = received

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.received.append([p.grad.double().clone() for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class Recorded(Regressor):
    def __init__(self, received: list[list[torch.Tensor]], lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.received = received

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return RecordingSGD(self.parameters(), self.lr, self.received)


class Received(L.Callback):
    """Per optimizer step: the gradients GradGuard is given (a callback placed before it) and the gradients the
    optimizer's update uses (after Lightning's own clipping), as fp64 copies."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []
        self.received: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.before.append([p.grad.double().clone() for p in pl_module.parameters()])

    @staticmethod
    def norm(grads: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(g.square().sum()) for g in grads))


def _fit(guard: GradGuard, steps: int, **kwargs: Any) -> tuple[Received, MetricsLogger, Regressor, L.Trainer]:
    probe, logger = Received(), MetricsLogger()
    torch.manual_seed(0)
    model = Recorded(probe.received, lr=0.1)
    callbacks = [probe, guard]
    run = trainer(max_steps=steps, max_epochs=-1, logger=logger, log_every_n_steps=1, callbacks=callbacks, **kwargs)
    run.fit(model, regression_data())
    return probe, logger, model, run


def _check_logs_describe_the_received_gradients(probe: Received, logger: MetricsLogger, steps: int) -> int:
    """Each step's logged clip_coef is the received norm over the measured one; events/clipped counts the steps
    whose gradients were scaled down. Returns the number of clipped steps."""
    coefs, clipped = logger.series("gradguard/clip_coef"), logger.series("gradguard/events/clipped")
    assert len(probe.before) == len(probe.received) == len(coefs) == steps
    scaled = 0
    for before, received, coef in zip(probe.before, probe.received, coefs):
        for b, r in zip(before, received):  # one coefficient for every gradient: the direction is kept
            torch.testing.assert_close(r, b * coef, rtol=1e-5, atol=1e-12)
        scaled += coef < 1.0
    assert clipped[-1] == scaled
    return scaled


def test_clip_none_takes_over_gradient_clip_val_and_logs_what_the_optimizer_received(
    caplog: pytest.LogCaptureFixture,
) -> None:
    val, lr = 0.01, 0.1
    torch.manual_seed(0)
    reference = Regressor(lr=lr)
    x, y = next(iter(regression_data()))
    nn.functional.mse_loss(reference(x), y).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = min(1.0, val / (float(norm) + 1e-6))  # torch.nn.utils.clip_grad_norm_'s coefficient
    expected = [p.detach() - lr * coef * g for p, g in zip(reference.parameters(), grads)]

    with caplog.at_level(logging.INFO):
        probe, logger, model, run = _fit(GradGuard(clip=None, lr_guard=None), 1, gradient_clip_val=val)
    assert sum("takes over `Trainer(gradient_clip_val=0.01)`" in r.getMessage() for r in caplog.records) == 1
    for got, want in zip(model.parameters(), expected):  # the step the optimizer took, computed by hand
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    assert Received.norm(probe.received[0]) == pytest.approx(val, rel=1e-5)  # clipped once, not twice
    assert _check_logs_describe_the_received_gradients(probe, logger, 1) == 1
    assert logger.series("gradguard/clip_threshold") == [pytest.approx(val)]
    assert logger.series("gradguard/clip_coef")[0] == pytest.approx(val / float(norm), rel=1e-5)
    assert run.gradient_clip_val == val  # given back at the end of the fit


@pytest.mark.parametrize(
    ("clip", "val"),
    [(ZClip(warmup_steps=3), 0.5), (NormClip(0.3), 0.5), (NormClip(2.0), 0.5)],
    ids=["zclip-then-val", "guard-lower", "val-lower"],
)
def test_a_guard_clipper_and_gradient_clip_val_clip_once_to_the_lower_threshold(clip: Any, val: float) -> None:
    steps = 8
    with pytest.warns(UserWarning, match="clipping happens twice.*takes it over"):
        probe, logger, _, _ = _fit(GradGuard(clip=clip, lr_guard=None), steps, gradient_clip_val=val)
    assert _check_logs_describe_the_received_gradients(probe, logger, steps) >= 1
    thresholds = logger.series("gradguard/clip_threshold")
    for before, received, threshold in zip(probe.before, probe.received, thresholds):
        assert threshold <= val * (1 + 1e-6)  # the logged threshold is the one the optimizer met
        assert Received.norm(received) <= min(Received.norm(before), threshold) * (1 + 1e-5)


def test_bf16_mixed_with_accumulation_logs_what_the_optimizer_received() -> None:
    steps = 4
    probe, logger, _, _ = _fit(
        GradGuard(clip=None, lr_guard=None),
        steps,
        gradient_clip_val=0.05,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    assert _check_logs_describe_the_received_gradients(probe, logger, steps) == steps


def test_value_clipping_stays_lightnings_and_the_warning_says_what_the_logs_describe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    val = 0.01
    # Without a clipper of GradGuard's nothing clips twice: an info line, which claimed "clipped by both" (user trial).
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        probe, logger, _, run = _fit(
            GradGuard(clip=None, lr_guard=None), 2, gradient_clip_val=val, gradient_clip_algorithm="value"
        )
    assert not [w for w in warned if "GradGuard" in str(w.message)]
    (line,) = [r.getMessage() for r in caplog.records if "clamps every gradient entry" in r.getMessage()]
    assert line.endswith("describe the gradients before that clipping.") and "twice" not in line
    assert run.gradient_clip_val == val
    with pytest.warns(UserWarning, match="clamps every gradient entry") as caught:
        _fit(GradGuard(lr_guard=None), 2, gradient_clip_val=val, gradient_clip_algorithm="value")
    said = str(caught[0].message)
    assert "clipping happens twice when GradGuard clips too" in said and "clipped by both" in said
    for before, received in zip(probe.before, probe.received):
        assert max(float(g.abs().max()) for g in received) <= val  # Lightning clamped...
        assert Received.norm(received) < Received.norm(before)
    # ...and GradGuard, without a clipper, claims no norm clipping of its own.
    assert logger.series("gradguard/clip_coef") == [] and set(logger.series("gradguard/events/clipped")) == {0.0}


def test_an_overridden_configure_gradient_clipping_is_left_alone() -> None:
    class OwnClipping(Regressor):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
            self.seen = gradient_clip_val

    torch.manual_seed(0)
    model = OwnClipping()
    with pytest.warns(UserWarning, match="own `configure_gradient_clipping`"):
        trainer(max_steps=1, max_epochs=-1, gradient_clip_val=0.5, callbacks=[GradGuard()]).fit(
            model, regression_data()
        )
    assert model.seen == 0.5


class OwnHooks(Regressor):
    """Clips its own gradients after every callback's hook, without `gradient_clip_val`."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        pass


def test_module_hooks_that_run_after_the_guard_get_one_note(caplog: pytest.LogCaptureFixture) -> None:
    # The module clips every step to 0.01 where the norms are about 1: GradGuard's logs describe the gradients before
    # that, and said nothing about it.
    guard, other = GradGuard(), GradGuard()
    notes = []
    # A second fit of the same guard says nothing again.
    for model, fit_guard, clip_val in (
        (OwnHooks(), guard, None),
        (OwnHooks(), guard, None),
        (Regressor(), other, None),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer(max_steps=2, max_epochs=-1, callbacks=[fit_guard], gradient_clip_val=clip_val).fit(
                model, regression_data()
            )
        notes.append([r.getMessage() for r in caplog.records if "run(s) after GradGuard's hook" in r.getMessage()])
    assert [len(found) for found in notes] == [1, 0, 0]
    assert "own `on_before_optimizer_step` and `configure_gradient_clipping` run(s)" in notes[0][0]
    # With `gradient_clip_val`, `on_before_optimizer_step` runs between GradGuard's hook and Lightning's clipping,
    # which therefore stays Lightning's: that one line names the hook.

    class StepHook(Regressor):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            pass

    caplog.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer(max_steps=2, max_epochs=-1, callbacks=[GradGuard()], gradient_clip_val=1.0).fit(
            StepHook(), regression_data()
        )
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in warned]
    (note,) = [line for line in said if "run after GradGuard's hook" in line]
    assert "which clips after the LightningModule's `on_before_optimizer_step`: they run after GradGuard's" in note


class _ClipsToo(L.Callback):
    """A user's callback that clips the gradients itself."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0)


def test_other_callbacks_that_change_the_gradients_get_one_note_that_says_on_which_side(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Listed before GradGuard, a user's clipping callback hid a 10^4x spike from the detectors with no word (user
    # trial); listed after it, its own clipping is what GradGuard's figures leave out.
    def notes(callbacks: list[L.Callback]) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer(max_steps=2, max_epochs=-1, callbacks=callbacks).fit(Regressor(), regression_data())
        return [
            r.getMessage()
            for r in caplog.records
            if "on_before_optimizer_step` before GradGuard" in r.getMessage()
            or "on_before_optimizer_step` after GradGuard" in r.getMessage()
        ]

    (before,) = notes([_ClipsToo(), GradGuard()])
    assert "callback(s) _ClipsToo run(s) `on_before_optimizer_step` before GradGuard" in before
    assert "list GradGuard first" in before and "after GradGuard" not in before
    (after,) = notes([GradGuard(), _ClipsToo()])
    assert "_ClipsToo run(s) `on_before_optimizer_step` after GradGuard" in after and "None" in after
    # Lightning's own callbacks have no such hook of their own: nothing to say.
    assert notes([GradGuard(), L.pytorch.callbacks.Timer()]) == []


class _OwnClipping(Regressor):
    """Clips in its own ``configure_gradient_clipping`` and records which steps it saw without gradients; its third
    batch is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.without_grads: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == 2:
            x = torch.full_like(x, float("nan"))
        return nn.functional.mse_loss(self(x), y)

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        grads = [p.grad for p in self.parameters()]
        if all(g is None for g in grads):
            self.without_grads.append(self.trainer.global_step)
            return
        for g in grads:
            g.clamp_(-1.0, 1.0)


def test_an_own_clipping_hook_sees_no_gradients_on_a_skipped_step_and_the_note_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _OwnClipping()
    with caplog.at_level(logging.INFO):
        trainer(max_steps=5, max_epochs=-1, callbacks=[GradGuard()]).fit(model, regression_data())
    assert model.without_grads == [2]  # the NaN batch's step, skipped: every .grad is None there
    (note,) = [r.getMessage() for r in caplog.records if "run(s) after GradGuard's hook" in r.getMessage()]
    assert "every gradient they see is None" in note


def test_a_second_fit_of_the_same_trainer_still_takes_it_over() -> None:
    guard = GradGuard(clip=None, lr_guard=None)
    probe, logger = Received(), MetricsLogger()
    run = trainer(max_epochs=1, limit_train_batches=2, logger=logger, log_every_n_steps=1, callbacks=[probe, guard])
    run.gradient_clip_val = 0.01
    torch.manual_seed(0)
    model = Recorded(probe.received)
    run.fit(model, regression_data())
    run.fit_loop.max_epochs = 2
    run.fit(model, regression_data())
    assert len(probe.received) == 4 and run.gradient_clip_val == 0.01
    assert all(Received.norm(g) == pytest.approx(0.01, rel=1e-5) for g in probe.received)


class _Fails(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise RuntimeError("the user's bug")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_raises_gives_gradient_clip_val_back() -> None:
    """Lightning calls no teardown when a fit raises: the Trainer must not be left without its clipping."""
    run = trainer(max_steps=5, gradient_clip_val=1.0, callbacks=[GradGuard()])
    with pytest.raises(RuntimeError, match="the user's bug"):
        run.fit(_Fails(), regression_data())
    assert run.gradient_clip_val == 1.0


# ------------------------------------------------------------------------------------------------- the engine
def test_engine_max_norm_is_the_clipper_chained_with_clip_grad_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    chained = copy.deepcopy(model)
    engine = GuardEngine(model, clip=NormClip(1.0), exploding=None, vanishing=None, max_norm=0.2)
    alone = NormClip(1.0)
    g = torch.Generator().manual_seed(1)
    for scale in (0.01, 1.0, 100.0):
        for a, b in zip(model.parameters(), chained.parameters()):
            a.grad = torch.randn(a.shape, generator=g) * scale
            b.grad = a.grad.clone()
        engine.step()
        alone.clip_(chained.parameters())
        torch.nn.utils.clip_grad_norm_(chained.parameters(), 0.2)
        for a, b in zip(model.parameters(), chained.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    snap = engine.snapshot()
    assert snap.clip_threshold == pytest.approx(0.2) and snap.counts["clipped"] == 2


def test_engine_max_norm_without_a_clipper_is_a_norm_clip_and_refuses_agc() -> None:
    engine = GuardEngine(nn.Linear(2, 1), clip=None, max_norm=0.5)
    assert isinstance(engine.clipper, NormClip) and engine.clipper.max_norm == 0.5
    with pytest.raises(ValueError, match="max_norm"):
        GuardEngine(nn.Linear(2, 1), clip=AGC(), max_norm=0.5)


def test_engine_max_norm_alone_clips_like_clip_grad_norm_and_nothing_more() -> None:
    # With no clipper of its own the engine must not add the exploding detector's cap: it stands in for
    # Trainer(gradient_clip_val=...) under GradGuard(clip=None), which never clipped a spike by itself.
    model = nn.Linear(4, 1)
    engine = GuardEngine(model, clip=None, max_norm=1e6, exploding=ExplodingDetector(warmup_steps=3), vanishing=None)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * (1e4 if step == 7 else 1.0)
        engine.step()
    snap = engine.snapshot()
    assert snap.counts["exploding"] >= 1 and snap.counts["clipped"] == 0 and snap.clip_coef == 1.0


class _Noisy(Recorded):
    """Adds gradient noise in its own `on_before_optimizer_step`, which Lightning runs after every callback's."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad), alpha=3.0)


class _NoisyCallback(L.Callback):
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad), alpha=3.0)


@pytest.mark.parametrize("where", ["module", "callback after"])
@pytest.mark.parametrize("clip", ["default", None])
def test_gradient_clip_val_still_bounds_what_a_later_gradient_hook_leaves(
    where: str, clip: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken over, the Trainer's bound was applied before the module's (or a later callback's) gradient hook: a
    user's noise injection there reached the optimizer at norm 22 under `gradient_clip_val=1.0`, on every step. With
    such a hook the clipping stays Lightning's, after it."""
    torch.manual_seed(0)
    received: list[list[torch.Tensor]] = []
    model = _Noisy(received) if where == "module" else Recorded(received)
    guard = GradGuard() if clip == "default" else GradGuard(clip=None)
    callbacks: list[L.Callback] = [guard] if where == "module" else [guard, _NoisyCallback()]
    fit = trainer(max_steps=20, max_epochs=-1, callbacks=callbacks, gradient_clip_val=1.0)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fit.fit(model, regression_data())
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() for grads in received]
    assert len(norms) == 20 and max(norms) <= 1.0 + 1e-6 and min(norms) > 0.99  # the noise is far above the bound
    # A line without a clipper of GradGuard's; a warning with one (clipping happens twice).
    lines = [r.getMessage() for r in caplog.records] if clip is None else [str(w.message) for w in warned]
    said = [line for line in lines if "GradGuard: `Trainer(gradient_clip_val=1.0)` stays Lightning's" in line]
    hook = "the LightningModule's `on_before_optimizer_step`" if where == "module" else "callback _NoisyCallback"
    assert len(said) == 1 and f"which clips after {hook}: they run after GradGuard's hook" in said[0]
    assert fit.gradient_clip_val == 1.0
    # One line, not a second one about the same hook.
    assert not [r for r in caplog.records if "run(s) after GradGuard's hook. If they" in r.getMessage()]
    assert not [r for r in caplog.records if "on_before_optimizer_step` after GradGuard" in r.getMessage()]
