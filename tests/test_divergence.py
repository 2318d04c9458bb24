"""The divergence detector: the training loss as a signal, for the runs whose gradient norms look ordinary.

Unit tests feed loss patterns straight to :class:`DivergenceDetector`; the Trainer tests check where the loss comes
from (accumulation, 16-bit AMP's scaled loss, several optimizers) and what a divergence does (LR cut, restart).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard import DivergenceDetector, GradGuard, GuardEngine, LossDivergenceError, LRGuard
from tests.models import Regressor, regression_data, trainer


def _feed(det: DivergenceDetector, losses: list[float]) -> list[int]:
    """The 0-based positions of the losses that completed an event."""
    return [i for i, loss in enumerate(losses) if bool(det.update(torch.tensor(loss)))]


# ------------------------------------------------------------------------------------------------- the rule
def test_a_blown_up_loss_is_one_event_after_patience_high_steps() -> None:
    det = DivergenceDetector()
    losses = [2.3, 2.2, 2.0, 1.9] + [60.0] * 8
    assert _feed(det, losses) == [8]  # the fifth high step; the lasting climb is one event, not one per step


def test_a_transient_blow_up_that_recovers_by_itself_raises_nothing() -> None:
    # Adam at 1e-2 on a 1500-layer residual net without warm-up (tests/test_do_no_harm.py): the loss went 54x up for
    # four steps while Adam's second moments warmed up, then trained on. The default patience outlasts it.
    losses = [0.879, 21.663, 47.51, 13.36, 14.649, 1.483, 3.741, 7.909, 2.876, 0.355, 2.035, 2.956, 1.703, 0.565]
    assert _feed(DivergenceDetector(), losses) == []
    assert _feed(DivergenceDetector(patience=3), losses) == [3]


def test_a_new_event_needs_the_loss_to_come_back_down_first() -> None:
    det = DivergenceDetector(patience=2)
    losses = [2.0, 2.0, 50.0, 500.0, 600.0, 2.0, 50.0, 500.0]  # climbing after each jump: no new level of the data
    assert _feed(det, losses) == [3, 7]


def test_isolated_spikes_and_spikes_between_calm_steps_raise_nothing() -> None:
    det = DivergenceDetector(patience=3)
    losses = [2.0, 1.9] + [1.8, 90.0, 1.8, 80.0, 80.0, 1.7] * 5  # a bad batch, then two in a row, repeatedly
    assert _feed(det, losses) == []


# GradGuard(clip=AutoClip()) on the fragile suite's tanh RNN (seed 1): a calm start, then a loss that oscillates
# between blown up and merely bad (and later into the thousands).
_CALM_START = [1.35, 0.117, 0.678, 0.83, 0.089, 0.485, 1.5, 1.16, 0.501, 0.32, 0.229, 0.671, 1.37, 1.96, 0.338]
_OSCILLATING = _CALM_START + [4.56, 35.6, 9.56, 14.4, 30.9, 44.4, 85.9, 41.3, 10.4, 3.36]


def test_a_loss_that_oscillates_between_blown_up_and_merely_bad_is_an_event() -> None:
    # Each step under 10x the level broke the streak (and entered the running mean), so there was no event, and the
    # run ended at MSE 720 against 0.17 at its start.
    assert _feed(DivergenceDetector(), _OSCILLATING) == [22]  # the fifth high step; the two between held the streak
    # A merely bad step holds a streak only above sqrt(ratio) x the level: a calm one still ends it.
    assert _feed(DivergenceDetector(), _CALM_START + [35.6, 44.4, 1.0, 85.9, 41.3, 30.9, 1.0, 50.0]) == []


def test_a_gradual_climb_past_twice_the_untrained_loss_is_caught_when_asked() -> None:
    # Adam at a too-high rate: no single step is 10x the running mean, but the model ends far worse than untrained.
    det = DivergenceDetector(start_ratio=2.0, patience=3)
    losses = [4.4, 6.0, 7.8, 9.0, 11.0, 12.5, 13.6, 12.0, 14.0]
    events = _feed(det, losses)
    assert len(events) == 1 and losses[events[0]] > 2 * 4.4
    assert _feed(DivergenceDetector(patience=3), losses) == []  # opt-in: no step is 10x the running mean


def test_a_loss_that_climbs_but_stays_below_the_untrained_loss_is_no_divergence() -> None:
    # A trained model's loss rising 20x (a data shift, a GAN-like game) is no event while it is below the start.
    det = DivergenceDetector(patience=2)
    losses = [3.0] + [0.01] * 60 + [1.0] * 10
    assert _feed(det, losses) == []


def test_a_climb_slow_enough_for_the_running_mean_to_follow_is_caught_against_the_lowest_settled_level() -> None:
    # The tanh RNN of the stability suite (seed 1): under constant clipping its loss rose 0.17 -> 7 over 20 steps,
    # then to 16, and the running mean followed it, so no step was 10x the mean. Here: settled at 1.0, then x1.1 per
    # step up to 40x.
    det = DivergenceDetector()
    losses = [2.0] + [1.0] * 99 + [min(1.1**k, 40.0) for k in range(1, 80)]
    events = _feed(det, losses)
    assert len(events) == 1
    assert 10.0 < losses[events[0]] < 10 * det.level()[0].item()  # 10x the lowest level, not 10x the mean
    # Before the mean has settled (1 / (1 - alpha) = 50 observations) its lowest value is no reference: the first
    # few losses' plain mean is too noisy.
    assert _feed(DivergenceDetector(), [2.0] + [1.0] * 9 + [min(1.1**k, 40.0) for k in range(1, 80)]) == []


def test_a_state_saved_before_the_lowest_level_was_kept_loads() -> None:
    det = DivergenceDetector(patience=2)
    det.load_state_dict({"state": torch.tensor([1.0, 60.0, 2.0, 0.0])})  # [mean, observations, first, streak]
    assert _feed(det, [1.0, 50.0, 500.0]) == [2]
    assert det._state is not None and det._state.numel() == 9


@pytest.mark.parametrize("kept", [5, 7, 8])
def test_a_state_saved_before_the_floor_faded_starts_its_floor_at_the_lowest_level(kept: int) -> None:
    # [mean, observations, first, streak, lowest, previous, onset, start]: settled at 2.0, once as low as 1.0.
    det = DivergenceDetector(patience=1)
    det.load_state_dict({"state": torch.tensor([2.0, 80.0, 5.0, 0.0, 1.0, 2.0, 0.0, 2.0])[:kept]})
    assert _feed(det, [12.0]) == [0]  # 10x the lowest level and above the first loss, not 10x the mean


def test_a_state_longer_than_this_version_keeps_is_refused() -> None:
    with pytest.raises(ValueError, match="holds 10 values, this version keeps 9"):
        DivergenceDetector().load_state_dict({"state": torch.zeros(10)})


def test_steps_without_a_loss_leave_the_floor_where_it_is() -> None:
    # Settled at 1.0 after a climb to 2.0 (the floor 1.0 while the mean is 2.0), then 300 steps without a loss
    # (NaN, 0, non-finite): the floor faded towards the mean on each, to 1.6, and a loss of 12 went unjudged.
    det = DivergenceDetector(patience=1)
    _feed(det, [5.0] + [1.0] * 99 + [2.0] * 100)
    before = det._state.clone() if det._state is not None else None
    _feed(det, [math.nan, 0.0, math.inf] * 100)
    assert before is not None and det._state is not None and torch.equal(det._state[8], before[8])
    assert _feed(det, [12.0]) == [0]


def test_a_summed_loss_over_a_length_curriculum_is_no_divergence() -> None:
    # A user's GRU tagger with `reduction="sum"`, batch lengths growing from 4 to 160 tokens over 400 steps: the loss
    # rose 25x by design, 10x past its lowest settled mean at step 322. Judged against that lowest mean the run was
    # cut and restarted from its initial weights (held-out +109%). Here: settled at 1.0, then 1% more per step, the
    # batches' lengths varying +-50%; the same climb at 5% per step is a divergence.
    generator = torch.Generator().manual_seed(0)
    jitter = torch.empty(500).uniform_(0.5, 1.5, generator=generator).tolist()
    for rate, events in ((1.01, 0), (1.05, 1)):
        losses = [2.0] + [1.0] * 99 + [min(rate**k, 40.0) for k in range(1, 400)]
        assert len(_feed(DivergenceDetector(), [x * j for x, j in zip(losses, jitter)])) == events, rate


def test_exact_zero_and_non_finite_losses_are_no_observation() -> None:
    det = DivergenceDetector(patience=2)
    # A fully masked first batch (loss 0) must not become the untrained loss, nor drag the running mean to 0.
    losses = [0.0, 0.0, 2.0, 2.1, math.nan, 0.0, 1.9, math.inf, 2.0, 2.2]
    assert _feed(det, losses) == []
    mean, first = det.level().tolist()
    assert first == 2.0 and 1.9 < mean < 2.2
    assert det._state is not None and det._state[1].item() == 5  # observations: the five finite, non-zero losses


def test_a_new_level_is_absorbed_by_the_running_mean() -> None:
    # The running mean follows a lasting change within a few dozen steps, so a later spike is judged against it.
    det = DivergenceDetector(patience=1)
    losses = [5.0] * 10 + [0.5] * 200
    assert _feed(det, losses) == []
    mean, _ = det.level().tolist()
    assert mean == pytest.approx(0.5, rel=0.2)  # from 5.0: an EMA over about 50 steps, after 200


def test_negative_losses_are_never_judged() -> None:
    det = DivergenceDetector(patience=1)
    assert _feed(det, [-1.0, -0.5, 50.0, 80.0, 100.0]) == []


# A PPO loss (clipped policy loss + value loss - entropy bonus) on a gridworld before its first rewards: about 0.01,
# of either sign; then the value loss meets the first returns, and the loss holds near 0.15-0.2 for a while.
_REWARDS = [0.05, 0.19, 0.2, 0.15, 0.18, 0.21, 0.2, 0.17]


def test_a_loss_once_below_zero_has_no_ratio_to_its_level() -> None:
    # Its zero is arbitrary, so 10x its level says nothing: a PPO run was restarted from its initial weights when its
    # first rewards came. The same climb from a loss that is never negative is an event, as before.
    signed = [0.05] + [0.005 + 0.03 * math.sin(i) for i in range(1, 200)] + _REWARDS
    det = DivergenceDetector()
    assert _feed(det, signed) == []
    assert math.isnan(float(det.progress()[0]))
    positive = [0.05] + [0.01 + 0.005 * math.sin(i) for i in range(1, 200)] + _REWARDS
    assert _feed(DivergenceDetector(), positive) == [205]
    # A rounding error below 0 (a KL divergence near 0) is no sign.
    rounding = [2.0] * 10 + [-1e-7] + [2.0] * 5 + [200.0] * 5
    assert _feed(DivergenceDetector(patience=3, level_shifts=False), rounding) == [18]
    # The sign survives a checkpoint.
    det = DivergenceDetector(patience=3, level_shifts=False)
    _feed(det, [2.0] * 10 + [-1.0, 2.0, -1.0])  # a second negative loss keeps it so
    resumed = DivergenceDetector(patience=3, level_shifts=False)
    resumed.load_state_dict(det.state_dict())
    assert _feed(resumed, [2.0] * 5 + [200.0] * 5) == []
    assert _feed(DivergenceDetector(patience=3, level_shifts=False), [2.0] * 15 + [200.0] * 5) == [17]


class _SignedLoss(Regressor):
    """Trains on its MSE while the loss it reports is a PPO-like value: about 0.01 of either sign, then 0.15-0.2 once
    the first rewards come (step 200)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        mse = super().training_step(batch, batch_idx)
        step = self.global_step
        value = _REWARDS[step - 199] if 199 <= step < 199 + len(_REWARDS) else 0.005 + 0.03 * math.sin(step)
        return mse - mse.detach() + (0.05 if step == 0 else value)


def test_a_trainer_run_whose_loss_is_once_below_zero_is_not_restarted_for_a_rise_of_its_loss() -> None:
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=230, max_epochs=-1, callbacks=[guard]).fit(_SignedLoss(), regression_data(n=512))
    events = guard.summary()
    assert events["diverging"] == 0 and events["rolled_back"] == 0 and events["lr_reduced"] == 0
    assert not [w for w in caught if "diverged" in str(w.message)]


def test_learning_progress_is_not_measured_on_a_loss_once_below_zero() -> None:
    falling = [4.0 - 0.03 * i for i in range(100)]
    det = DivergenceDetector()
    _feed(det, falling)
    assert float(det.progress()[0]) == pytest.approx(0.0, abs=0.05)  # at its lowest: nothing given back
    _feed(det, [-0.5])
    assert math.isnan(float(det.progress()[0]))


def test_state_dict_round_trip_continues_the_same_decisions() -> None:
    losses = [2.0, 2.1, 1.9, 40.0, 150.0, 500.0, 1600.0]  # a jump, then a climb
    whole = DivergenceDetector(patience=3)
    expected = _feed(whole, losses)
    first, second = DivergenceDetector(patience=3), DivergenceDetector(patience=3)
    _feed(first, losses[:4])
    second.load_state_dict(first.state_dict())
    assert [i + 4 for i in _feed(second, losses[4:])] == expected == [5]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"ratio": 1.0}, "ratio"), ({"start_ratio": 0.5}, "start_ratio"), ({"patience": 0}, "patience"),
     ({"alpha": 1.0}, "alpha")],
)  # fmt: skip
def test_bad_arguments_name_themselves(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DivergenceDetector(**kwargs)


# ------------------------------------------------------------------------------------------------- plain loop
def _adam_regression(lr: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g)
    return model, torch.optim.Adam(model.parameters(), lr=lr), x, y


def test_engine_restarts_a_diverging_adam_run_and_trains_where_the_gradient_signals_alone_do_not() -> None:
    def run(divergence: DivergenceDetector | None) -> tuple[float, dict[str, int]]:
        model, opt, x, y = _adam_regression(lr=3.0)
        engine = GuardEngine(model, lr_guard=LRGuard(), rollback="default", divergence=divergence)
        engine.attach(opt)
        losses = []
        for i in range(100):
            xb, yb = x[i % 32 * 16 : i % 32 * 16 + 16], y[i % 32 * 16 : i % 32 * 16 + 16]
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            losses.append(loss.detach())
            engine.step(optimizer=opt, loss=loss)
            opt.step()
        # The last 25 training losses: a too-high Adam rate makes any single final iterate a matter of luck.
        return torch.stack(losses[-25:]).mean().item(), engine.summary()

    blind, blind_events = run(None)
    watched, events = run(DivergenceDetector())
    # The gradient signals restart the run twice (a plain retry, then one cut lower), at a rate still too high for
    # Adam; the loss then stays 100x its untrained level with ordinary-looking norms (Adam normalises them), until the
    # loss signal restarts it again.
    assert blind_events["rolled_back"] == 2 and blind_events["lr_reduced"] >= 2
    assert events["diverging"] >= 1 and events["rolled_back"] > blind_events["rolled_back"]
    assert watched < 0.5 * blind, (watched, blind)


def test_engine_without_a_loss_observes_nothing() -> None:
    model, opt, x, y = _adam_regression(lr=1.0)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback="default")
    for _ in range(30):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:16]), y[:16]).backward()
        engine.step(optimizer=opt)
        opt.step()
    assert engine.divergence is not None and engine.divergence.level().isnan().all()
    with pytest.raises(ValueError, match="scalar"):
        engine.step(loss=torch.ones(2))


# ------------------------------------------------------------------------------------------------- Trainer
class _LossSpy(L.Callback):
    """The untrained loss the guard recorded, read after the first optimizer step."""

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.first: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        engine = self.guard._states.get(0)
        if self.first is None and engine is not None and engine.steps and engine.divergence is not None:
            self.first = engine.divergence.level()[1].item()


@pytest.mark.parametrize("case", ["fp32", "accumulate", "16-mixed"])
def test_the_guard_sees_the_unscaled_mean_loss_of_the_step(case: str) -> None:
    torch.manual_seed(0)
    model = Regressor(lr=1e-3)
    guard = GradGuard()
    spy = _LossSpy(guard)
    extra: dict[str, Any] = {}
    if case == "accumulate":
        extra = {"accumulate_grad_batches": 3}
    elif case == "16-mixed":
        # On the CPU `precision="16-mixed"` becomes bf16: fp16 with a GradScaler, asked for explicitly.
        extra = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    trainer(max_steps=2, max_epochs=-1, callbacks=[guard, spy], **extra).fit(model, regression_data())
    micro = 3 if case == "accumulate" else 1
    expected = torch.stack(model.losses[:micro]).float().mean().item()
    assert spy.first == pytest.approx(expected, rel=1e-3)  # the loss scale (65536) is divided out


def test_a_trainer_run_at_a_too_high_adam_rate_is_restarted_and_warned_about() -> None:
    def fit(guard: GradGuard | None) -> tuple[Regressor, list[str]]:
        torch.manual_seed(0)
        model = Regressor(optimizer="adam", lr=1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callbacks = [guard] if guard is not None else []
            trainer(max_steps=100, max_epochs=-1, callbacks=callbacks).fit(model, regression_data(n=512))
        return model, [str(w.message) for w in caught if "diverged" in str(w.message)]

    def mse(model: Regressor) -> float:
        x, y = regression_data(n=512).dataset.tensors  # type: ignore[attr-defined]
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    unguarded, _ = fit(None)
    blind_guard = GradGuard(divergence=None)
    blind, _ = fit(blind_guard)
    guard = GradGuard()
    rescued, messages = fit(guard)
    assert blind_guard.summary()["lr_reduced"] == 0 and mse(blind) == pytest.approx(mse(unguarded))
    events = guard.summary()
    assert events["diverging"] >= 1 and events["rolled_back"] >= 1
    assert mse(rescued) < 0.75 * mse(unguarded)
    assert len(messages) == events["diverging"] and "untrained model's" in messages[0]


def test_a_trainer_run_whose_loss_oscillates_between_blown_up_and_merely_bad_gets_its_rate_cut() -> None:
    class Scripted(Regressor):
        """The loss the guard sees is the tanh RNN's of the test above (then calm again); the gradients are the
        regression's own."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            value = _OSCILLATING[self.global_step] if self.global_step < len(_OSCILLATING) else 0.3
            return loss - loss.detach() + value

    guard = GradGuard(exploding=None, clip=None, rollback=None)  # the loss is the only signal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(Scripted(lr=1e-3), regression_data(n=512))
    summary = guard.summary()
    assert summary["diverging"] == 1 and summary["lr_reduced"] == 1


def test_on_diverging_raise_and_the_guard_reused_afterwards() -> None:
    torch.manual_seed(0)
    guard = GradGuard(on_diverging="raise")
    with pytest.raises(LossDivergenceError, match="diverged"):
        trainer(max_steps=60, max_epochs=-1, callbacks=[guard]).fit(
            Regressor(optimizer="adam", lr=1.0), regression_data(n=512)
        )
    guard._loss = torch.tensor(100.0)  # as if a fit had ended between a backward and its optimizer step
    # The next fit starts afresh: its first loss is its own, not a sum with a loss left over.
    model, spy = Regressor(lr=1e-3), _LossSpy(guard)
    trainer(max_steps=1, max_epochs=-1, callbacks=[guard, spy]).fit(model, regression_data())
    assert spy.first == pytest.approx(model.losses[0].item(), rel=1e-6)


class _TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers, each on its own half (a GAN's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for net, opt in zip((self.a, self.b), self.optimizers()):  # type: ignore[arg-type]
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(net(x[:, :4]), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)]


@pytest.mark.parametrize("explicit", [False, True])
def test_several_optimizers_are_watched_only_when_asked(explicit: bool) -> None:
    torch.manual_seed(0)
    guard = GradGuard(divergence=DivergenceDetector() if explicit else "default")
    trainer(max_steps=4, max_epochs=-1, callbacks=[guard]).fit(_TwoOptimizers(), regression_data())
    for key in (0, 1):
        det = guard._states[key].divergence
        if explicit:
            # Each optimizer's own loss: the one backpropagated just before its step.
            assert det is not None and math.isfinite(det.level()[1].item())
        else:
            assert det is None


class _SlowCritic(L.LightningModule):
    """An actor that steps on every batch and a critic whose loss (about 1000x the actor's) is accumulated over three
    batches before it steps; ``toggle`` freezes the other optimizer's parameters around each backward pass."""

    def __init__(self, toggle: bool) -> None:
        super().__init__()
        self.actor, self.critic = nn.Linear(16, 1), nn.Linear(17, 1)
        self.toggle = toggle
        self.automatic_optimization = False
        self.critic_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        actor_opt, critic_opt = self.optimizers()  # type: ignore[misc]
        for opt, loss_of in ((actor_opt, self._actor_loss), (critic_opt, self._critic_loss)):
            if self.toggle:
                self.toggle_optimizer(opt)
            loss = loss_of(x, y)
            self.manual_backward(loss)
            if opt is actor_opt or batch_idx % 3 == 2:
                opt.step()
                opt.zero_grad()
            if self.toggle:
                self.untoggle_optimizer(opt)

    def _actor_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.actor(x), y)

    def _critic_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        error = 30.0 * (self.actor(x).detach() - y).abs()
        loss = nn.functional.mse_loss(self.critic(torch.cat([x, error], 1)), error) / 3
        self.critic_losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.actor.parameters(), lr=1e-2), torch.optim.Adam(self.critic.parameters(), lr=1e-3)]


@pytest.mark.parametrize("toggle", [False, True])
def test_with_several_optimizers_each_detector_judges_its_own_loss(toggle: bool) -> None:
    torch.manual_seed(0)
    guard = GradGuard(divergence=DivergenceDetector())
    model = _SlowCritic(toggle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=60, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    # Before, the critic's losses waiting for its step went to the actor's detector with the actor's own: a
    # divergence of a healthy actor, a cut and a restart.
    assert guard.summary()["diverging"] == 0 and guard.summary()["lr_reduced"] == 0
    (actor_mean, actor_first), (_, critic_first) = (
        guard._states[key].divergence.level().tolist()  # type: ignore[union-attr]
        for key in (0, 1)
    )
    assert actor_first < 100 and actor_mean < 100 < critic_first  # the actor's detector never saw a critic's loss
    # Toggled, the critic's detector sees its whole accumulation window; otherwise the pass just before its step.
    window = model.critic_losses[:3] if toggle else model.critic_losses[2:3]
    assert critic_first == pytest.approx(sum(window), rel=1e-5)


def test_a_noisy_loss_that_stays_at_its_level_raises_nothing() -> None:
    # A model stuck at its untrained level, whose per-step loss is the mean of 4 or 8 squared Gaussians (a small-batch
    # regression): its spread must never look like a divergence, from the very first steps on.
    g = torch.Generator().manual_seed(0)
    for samples in (4, 8):
        for _ in range(40):
            det = DivergenceDetector()
            losses = torch.randn(300, samples, generator=g).square().mean(1).tolist()
            assert _feed(det, losses) == []


class _LBFGSRegressor(Regressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_a_step_that_evaluates_its_closure_several_times_brings_its_first_loss() -> None:
    # LBFGS calls the closure (training_step and backward) several times inside `optimizer.step`; Lightning runs
    # `on_before_optimizer_step` after each. The first evaluation is the step's (the loss at the weights the step
    # starts from); the trial points' losses are neither summed into it nor carried into the next step.
    torch.manual_seed(0)
    model = _LBFGSRegressor()
    guard = GradGuard()
    fit = trainer(max_steps=3, max_epochs=-1, callbacks=[guard])
    with pytest.warns(UserWarning, match="evaluates the closure several times"):
        fit.fit(model, regression_data())
    engine = guard._states[0]
    det = engine.divergence
    assert det is not None and det._state is not None
    assert len(model.losses) > 2 * fit.global_step and engine.steps == fit.global_step == 3
    assert det._state[1].item() == 3
    assert det.level()[1].item() == pytest.approx(model.losses[0].item())
    assert det.level()[0].item() <= max(loss.item() for loss in model.losses)


def test_a_state_saved_before_the_diverging_counter_still_loads() -> None:
    model, opt, x, y = _adam_regression(lr=1e-3)
    engine = GuardEngine(model)
    opt.zero_grad()
    nn.functional.mse_loss(model(x[:16]), y[:16]).backward()
    engine.step(loss=torch.tensor(1.0))
    state = engine.state_dict()
    state["counts"] = torch.tensor([3, 1, 2, 0, 7])  # exploding, vanishing, nonfinite, overflow, clipped
    del state["divergence"]
    fresh = GuardEngine(model)
    fresh.load_state_dict(state)
    summary = fresh.summary()
    assert (summary["exploding"], summary["clipped"], summary["diverging"]) == (3, 7, 0)
