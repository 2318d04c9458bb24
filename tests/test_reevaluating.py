"""Optimizers whose ``step`` evaluates the closure several times (LBFGS): Lightning runs ``on_before_optimizer_step``
on every evaluation, so GradGuard must treat the first evaluation as the step and change no gradient the optimizer
compares across evaluations. Real ``Trainer.fit`` runs on CPU."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_gradguard import L2, GradGuard
from tests.models import regression_data, trainer


class TwiceSGD(torch.optim.SGD):
    """SGD whose step evaluates the closure twice at the same point (as a SAM-style or line-search step would)."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        assert closure is not None
        with torch.enable_grad():
            closure()
            loss = closure()
        super().step()
        return loss


class Fit(L.LightningModule):
    """An MLP regressor whose loss is multiplied by ``scale_at[batch_idx]`` (a spike, or NaN), and which adds
    ``penalty`` to its loss (the reference for a regularizer applied by the guard)."""

    def __init__(
        self,
        optimizer: str,
        scale_at: dict[int, float] | None = None,
        penalty: L2 | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        self.optimizer = optimizer
        self.scale_at = scale_at or {}
        self.penalty = penalty
        self.closure_calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.closure_calls += 1
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) * self.scale_at.get(batch_idx, 1.0)
        if self.penalty is not None:
            loss = loss + self.penalty.penalty()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05)
        return TwiceSGD(self.parameters(), lr=0.05)


class GradRecorder(L.Callback):
    """The gradients the optimizer is handed at each evaluation (after the guard's hook, which runs first)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]))


class BatchParams(L.Callback):
    """The parameters before and after batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.at:
            self.before = _params(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx == self.at:
            self.after = _params(pl_module)


def _fit(
    optimizer: str,
    guard: GradGuard | None,
    scale_at: dict[int, float] | None = None,
    penalty: L2 | None = None,
    epochs: int = 3,
    extra: tuple[L.Callback, ...] = (),
) -> tuple[Fit, L.Trainer, list[str]]:
    L.seed_everything(0, verbose=False)
    module = Fit(optimizer, scale_at, penalty)
    if penalty is not None:
        penalty.bind(module)
    fit = trainer(max_epochs=epochs, callbacks=([guard] if guard is not None else []) + list(extra))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module, regression_data(n=640, batch_size=32))
    return module, fit, [str(w.message) for w in caught if str(w.message).startswith("GradGuard")]


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_lbfgs_with_the_default_guard_trains_exactly_as_without_it() -> None:
    plain, fit, _ = _fit("lbfgs", None)
    guard = GradGuard(log_every_n_steps=5)
    guarded, guarded_fit, messages = _fit("lbfgs", guard)
    # Several evaluations per step: each one ran the hook, but the guard counted steps, not evaluations.
    assert guarded.closure_calls > 2 * guarded_fit.global_step
    assert guard._states[0].steps == guarded_fit.global_step == fit.global_step
    assert all(torch.equal(a, b) for a, b in zip(_params(plain), _params(guarded)))
    assert guard.summary()["clipped"] == 0
    assert sum("evaluates the closure several times" in m and "LBFGS" in m for m in messages) == 1


def test_lbfgs_step_with_a_nonfinite_first_evaluation_is_skipped() -> None:
    guard, probe = GradGuard(), BatchParams(at=7)
    module, fit, _ = _fit("lbfgs", guard, scale_at={7: math.nan}, epochs=1, extra=(probe,))
    events = guard.summary()
    assert events["nonfinite"] == 1 and events["skipped"] == 1 and events["lr_reduced"] == 0
    # No gradient for the step: LBFGS returns before moving the weights, as any optimizer leaves them.
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert fit.global_step == 20


def test_a_regularizer_acts_on_every_evaluation_as_a_penalty_in_the_loss_would() -> None:
    # Compared evaluation by evaluation: LBFGS turns fp32 rounding into different trajectories after a few steps.
    reference, guarded = GradRecorder(), GradRecorder()
    _fit("lbfgs", None, penalty=L2(0.01), epochs=1, extra=(reference,))
    _fit("lbfgs", GradGuard(clip=None, lr_guard=None, regularizers=[L2(0.01)]), epochs=1, extra=(guarded,))
    unregularized = GradRecorder()
    _fit("lbfgs", None, epochs=1, extra=(unregularized,))
    assert len(reference.grads) == len(guarded.grads) > 20
    for a, b, c in zip(reference.grads[:12], guarded.grads[:12], unregularized.grads[:12]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(c, a, rtol=1e-4, atol=1e-6)  # the penalty does change each gradient


def test_a_spike_is_skipped_not_clipped_when_the_closure_runs_several_times() -> None:
    # A spike after ZClip's warm-up: an optimizer that evaluates once gets it clipped (the control, below); one that
    # evaluates twice (a SAM-style step) is found out on its first step and from then on its gradients are measured,
    # never changed: the step the detector would have clipped is skipped whole.
    guard, probe = GradGuard(lr_guard=None, rollback=None), BatchParams(at=15)
    _, fit, messages = _fit("twice", guard, scale_at={15: 1e4}, extra=(probe,))
    events = guard.summary()
    assert events["exploding"] >= 1
    assert events["clipped"] == 0 and events["skipped"] == 3  # batch 15 of each of the three epochs
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))
    assert guard._states[0].steps == fit.global_step
    warned = [m for m in messages if "evaluates the closure several times" in m]
    assert len(warned) == 1 and "or that the exploding detector flags is skipped whole" in warned[0]


def test_a_lone_lbfgs_spike_is_skipped_and_a_stretch_goes_on_after_its_first_step() -> None:
    # A bad batch is alone: skipped as for any optimizer that evaluates several times (a 10^4x batch in each epoch).
    guard, probe = GradGuard(lr_guard=None, rollback=None), BatchParams(at=15)
    _, _, messages = _fit("lbfgs", guard, scale_at={15: 1e4}, extra=(probe,))
    assert guard.summary()["skipped"] == 3 and guard.summary()["clipped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))
    warned = [m for m in messages if "evaluates the closure several times" in m]
    assert len(warned) == 1 and "flags after an unflagged one is skipped whole" in warned[0]
    assert any("guarded by: skipping the first flagged step of a stretch" in m for m in messages)
    # Two in a row: the second is flagged on the same weights, which a skip would keep; it goes on.
    guard, probe = GradGuard(lr_guard=None, rollback=None), BatchParams(at=16)
    _fit("lbfgs", guard, scale_at={15: 1e4, 16: 1e4}, epochs=1, extra=(probe,))
    assert guard.summary()["exploding"] >= 1 and guard.summary()["skipped"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))
    # Asked for, the whole stretch is skipped.
    asked, probe = GradGuard(lr_guard=None, rollback=None, skip_exploding=True), BatchParams(at=16)
    _fit("lbfgs", asked, scale_at={15: 1e4, 16: 1e4}, epochs=1, extra=(probe,))
    assert asked.summary()["skipped"] == 2
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))


class SkippedSteps(L.Callback):
    """Whether the guard skipped each step."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard, self.skipped = guard, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.skipped.append(self.guard._states[0].skipped)


class Overshoot(L.Callback):
    """Multiplies the output layer's weights by 30 before step ``at``: weights on which every batch's gradient is
    large, as after an LBFGS step that overshot."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                module.net[2].weight.mul_(30.0)


def test_lbfgs_weights_that_every_batch_flags_are_not_held_by_skipping() -> None:
    # User trial: LBFGS (lr 0.5, no line search) overshot by itself (training loss 0.08 -> 180) and recovered
    # unguarded within a few steps; the guard skipped the stretch of flagged steps that followed, which kept the
    # weights where every batch was flagged, and the run ended at a held-out MSE of 8e13 against 0.015. Now only the
    # stretch's first step is skipped: the next batch, flagged on the same weights, says the weights are the trouble.
    guard = GradGuard(lr_guard=None, rollback=None)
    skips = SkippedSteps(guard)
    _fit("lbfgs", guard, epochs=1, extra=(Overshoot(at=10), skips))
    assert guard.summary()["exploding"] >= 1
    assert [i for i, skipped in enumerate(skips.skipped) if skipped] == [10]
    # What skip_exploding=True (the whole stretch) does there: the weights held for five steps.
    guard = GradGuard(lr_guard=None, rollback=None, skip_exploding=True)
    skips = SkippedSteps(guard)
    _fit("lbfgs", guard, epochs=1, extra=(Overshoot(at=10), skips))
    assert [i for i, skipped in enumerate(skips.skipped) if skipped] == [10, 11, 12, 13, 14]


def test_without_a_clipper_a_spike_of_a_reevaluating_optimizer_goes_through() -> None:
    # clip=None asks for no intervention on spikes: nothing is skipped in place of a clip either.
    guard, probe = GradGuard(clip=None, lr_guard=None, rollback=None), BatchParams(at=15)
    _fit("twice", guard, scale_at={15: 1e4}, extra=(probe,))
    assert guard.summary()["exploding"] >= 1 and guard.summary()["skipped"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))


def test_a_single_evaluation_optimizer_gets_the_same_spike_clipped() -> None:
    guard = GradGuard(lr_guard=None, rollback=None)
    _, _, messages = _fit("sgd", guard, scale_at={15: 1e4})
    assert guard.summary()["exploding"] >= 1 and guard.summary()["clipped"] >= 1
    assert not any("evaluates the closure several times" in m for m in messages)


def test_manual_optimization_stepping_an_optimizer_twice_in_a_batch_takes_two_steps() -> None:
    # Two optimizer steps in one batch (a critic trained several times per batch) are two steps, not one step that
    # evaluated its closure twice: both are measured and clipped.
    class TwoSteps(Fit):
        def __init__(self) -> None:
            super().__init__("sgd", {15: 1e4})
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            for _ in range(2):
                opt.zero_grad()
                self.manual_backward(super().training_step(batch, batch_idx))
                opt.step()

    guard = GradGuard(lr_guard=None, rollback=None)
    L.seed_everything(0, verbose=False)
    fit = trainer(max_epochs=1, callbacks=[guard])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TwoSteps(), regression_data(n=640, batch_size=32))
    assert fit.global_step == 40
    assert guard._states[0].steps == 40
    assert guard.summary()["clipped"] >= 1
    assert not any("evaluates the closure several times" in str(w.message) for w in caught)


def test_hook_calls_outside_an_optimizer_step_are_one_step_each() -> None:
    # Under a GradScaler Lightning runs the closure before `scaler.step`, outside the optimizer's step; a harness may
    # call the hook directly (benchmarks/overhead.py does). Neither is a closure evaluated again inside a step.
    guard = GradGuard()
    module, fit, _ = _fit("sgd", guard, epochs=1)
    optimizer = fit.optimizers[0]
    engine = guard._states[0]
    before = engine.steps
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    for _ in range(3):
        module.zero_grad()
        nn.functional.mse_loss(module.net(x), y).backward()
        guard.on_before_optimizer_step(fit, module, optimizer)
    assert engine.steps == before + 3 and 0 not in guard._reevaluating


class SAM(torch.optim.SGD):
    """Sharpness-aware minimization as commonly written: climb along the normalized gradient, evaluate again there,
    step from the original weights with that second gradient. ``_grad_norm`` stacks the gradients it finds, as the
    widely used implementation does (so it fails on a step with none)."""

    def __init__(self, params: Any, lr: float = 0.05, rho: float = 0.05) -> None:
        super().__init__(params, lr=lr, momentum=0.9)
        self.rho = rho

    def _grad_norm(self) -> torch.Tensor:
        return torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"] if p.grad is not None]).norm()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        assert closure is not None
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            scale = self.rho / (self._grad_norm() + 1e-12)
            old = {p: p.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None}
            for p in old:
                p.add_(p.grad * scale)
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for p, w in old.items():
                p.copy_(w)
        super().step()
        return loss


class SAMFit(Fit):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SAM(self.parameters())


def test_a_sam_step_with_a_nonfinite_batch_is_skipped_with_every_evaluation() -> None:
    # Before, the first evaluation's skip left no gradient (this SAM's norm then failed), and a SAM that tolerates
    # that applied the second evaluation's NaN gradient: the weights ended NaN.
    L.seed_everything(0, verbose=False)
    module = SAMFit("sam", scale_at={7: math.nan})
    guard, probe = GradGuard(), BatchParams(at=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1, callbacks=[guard, probe]).fit(module, regression_data(n=640, batch_size=32))
    events = guard.summary()
    assert events["nonfinite"] == 1 and events["skipped"] == 1 and events["lr_reduced"] == 0
    assert module.closure_calls == 40  # two evaluations on each of the 20 steps
    assert all(torch.equal(a, b) for a, b in zip(probe.before, probe.after))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_sam_step_on_a_bad_batch_is_skipped_and_training_goes_on() -> None:
    # Before, the clipper was off for a SAM (its step combines two evaluations), and the flagged 10^4x batch was
    # stepped whole: the weights blew up and every later step was non-finite.
    def run(scale_at: dict[int, float]) -> tuple[SAMFit, GradGuard | None]:
        L.seed_everything(0, verbose=False)
        module, guard = SAMFit("sam", scale_at=scale_at), GradGuard() if scale_at else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            callbacks = [guard] if guard is not None else []
            trainer(max_epochs=3, callbacks=callbacks).fit(module, regression_data(n=640, batch_size=32))
        return module, guard

    clean, _ = run({})
    spiked, guard = run({15: 1e4})  # batch 15 of each of the three epochs
    assert guard is not None
    events = guard.summary()
    assert events["skipped"] == 3 and events["nonfinite"] == 0 and events["lr_reduced"] == 0
    x, y = next(iter(regression_data(n=640, batch_size=640)))
    with torch.no_grad():
        loss_clean = nn.functional.mse_loss(clean.net(x), y).item()
        loss_spiked = nn.functional.mse_loss(spiked.net(x), y).item()
    assert math.isfinite(loss_spiked) and loss_spiked < 1.5 * loss_clean
