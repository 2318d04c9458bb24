"""GradGuard's logging-step diagnostics on real Trainer.fit runs, against manual computations."""

from __future__ import annotations

import csv
import logging
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.diagnostics import NOISE_SCALE_MANUAL_NOTE, NOISE_SCALE_NOTE
from tests.helpers import scalar_series
from tests.models import Regressor, regression_data, trainer


def _tb(tmp_path: Any) -> dict[str, dict[int, float]]:
    """Every scalar keyed by optimizer step (1-based): Lightning logs the n-th optimizer step at step n - 1."""
    series = scalar_series(tmp_path / "lightning_logs" / "version_0")
    return {tag: {step + 1: value for step, value in points} for tag, points in series.items()}


def _assert_act_grad_matches(
    logged: dict[str, dict[int, float]], norms: dict[int, dict[str, float]], layers: tuple[str, ...], rel: float
) -> None:
    """Each layer's logged ``act_grad`` is at steps 3, 6 and 9 and equals the module's own hook there."""
    for layer in layers:
        values = logged[f"gradguard/act_grad/{layer}"]
        assert sorted(values) == [3, 6, 9]
        for step, value in values.items():
            assert value == pytest.approx(norms[step][layer], rel=rel)


def _csv(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


class Recording(Regressor):
    """Records, per optimizer step, the per-layer gradients and parameters just before the step and after it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.before: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _layers(self) -> dict[str, list[nn.Parameter]]:
        return {f"net.{n}": list(m.parameters()) for n, m in self.net.named_children() if list(m.parameters())}

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # runs after the callbacks' hook
        step = self.trainer.global_step + 1
        self.before[step] = {
            name: (
                torch.cat([p.grad.flatten() for p in ps]).clone(),
                torch.cat([p.detach().flatten() for p in ps]).clone(),
            )
            for name, ps in self._layers().items()
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[self.trainer.global_step] = {
            name: torch.cat([p.detach().flatten() for p in ps]).clone() for name, ps in self._layers().items()
        }


class LoRA(Regressor):
    """A frozen base layer with a LoRA adapter (``lora_B`` zero-initialised, as usual) and a head whose weights are
    100x smaller than usual, trained with Adam at a high rate: the head's update/weight ratio is far above 1e-1."""

    def __init__(self) -> None:
        super().__init__(net=nn.Identity(), lr=5e-2, optimizer="adam")
        self.base = nn.Linear(16, 16).requires_grad_(False)
        self.lora_A = nn.Linear(16, 4, bias=False)
        self.lora_B = nn.Linear(4, 16, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.head.weight.mul_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x) + self.lora_B(self.lora_A(x))))


def test_no_too_high_hint_for_a_layer_growing_from_zero(recwarn: pytest.WarningsRecorder) -> None:
    # Before, the LoRA B of every such run was said to have a learning rate that "may be too high".
    trainer(max_steps=40, max_epochs=-1, callbacks=[GradGuard(log_every_n_steps=1)]).fit(LoRA(), regression_data())
    hints = [str(w.message) for w in recwarn.list if "update/weight ratio above" in str(w.message)]
    assert hints and any("'head'" in hint for hint in hints), hints
    assert not any("lora_B" in hint for hint in hints)


class Troughs(Regressor):
    """SGD whose step-wise schedule drops the rate 10^5-fold on every fifth step (a warm-restart trough), or on every
    step from step 30 on (a decay to zero), with the logs on those steps: tiny updates by the schedule's choice."""

    def __init__(self, decay: bool) -> None:
        super().__init__()
        self.decay = decay

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05)

        def factor(step: int) -> float:
            return 1e-5 if (step + 1) % 5 == 0 or (self.decay and step >= 30) else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("decay", [False, True])
def test_no_too_low_hint_where_the_schedule_lowered_the_rate(
    tmp_path: Any, recwarn: pytest.WarningsRecorder, decay: bool
) -> None:
    # Before, every run logged at its schedule's troughs was told its layers "barely train".
    guard = GradGuard(log_every_n_steps=5, diagnostics=["update_ratio"])
    trainer(max_steps=60, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        Troughs(decay), regression_data()
    )
    logged = list(_tb(tmp_path)["gradguard/update_ratio/net.2"].values())
    assert len(logged) == 12 and max(logged) < 1e-5  # every log below the hint's floor: 3 in a row would hint
    assert not [str(w.message) for w in recwarn.list if "barely train" in str(w.message)]


class LayerwiseRates(Regressor):
    """SGD with the first layer's param group at ``first`` times the head's rate (a layer-wise decay), the head's
    rate so low that every layer's update ratio is below the "too low" floor; with ``temperature``, a one-entry
    output scale in a group of its own at 100 times the head's rate."""

    def __init__(self, first: float, temperature: bool = False) -> None:
        super().__init__()
        self.first = first
        self.temperature = nn.Parameter(torch.ones(())) if temperature else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.temperature is None else out * self.temperature

    def configure_optimizers(self) -> Any:
        groups = [
            {"params": self.net[0].parameters(), "lr": 5e-6 * self.first},
            {"params": self.net[2].parameters(), "lr": 5e-6},
        ]
        if self.temperature is not None:
            groups.append({"params": [self.temperature], "lr": 5e-4})
        return torch.optim.SGD(groups)


@pytest.mark.parametrize(("first", "temperature"), [(0.05, False), (1.0, False), (1.0, True)])
def test_no_too_low_hint_for_a_layer_whose_group_rate_was_lowered_on_purpose(
    recwarn: pytest.WarningsRecorder, first: float, temperature: bool
) -> None:
    # A fine-tuning run with a layer-wise decay was told its deep layers "barely train" (user trial); the rate
    # read was the first group's alone. The reference is a rate that trains a share of the weights: a one-entry
    # temperature at 100x silenced the hint for every other layer (a review).
    guard = GradGuard(log_every_n_steps=5, diagnostics=["update_ratio"])
    model = LayerwiseRates(first, temperature)
    trainer(max_steps=30, max_epochs=-1, callbacks=[guard]).fit(model, regression_data())
    low = " ".join(str(w.message) for w in recwarn.list if "barely train" in str(w.message))
    assert ("'net.0'" in low) == (first == 1.0)


def test_frozen_integer_parameters_do_not_stop_the_fit(tmp_path: Any) -> None:
    # Finding the layers that start at zero took a norm of every parameter, integers included, and crashed.
    model = Regressor()
    model.count = nn.Parameter(torch.tensor(3), requires_grad=False)  # a step counter kept as a parameter
    guard = GradGuard(log_every_n_steps=2)
    trainer(max_steps=4, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        model, regression_data()
    )
    assert {"gradguard/update_ratio/net.0", "gradguard/update_ratio/net.2"} <= set(_tb(tmp_path))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_update_ratio_is_the_applied_update(tmp_path: Any, optimizer: str) -> None:
    torch.manual_seed(0)
    model = Recording(lr=0.05 if optimizer == "sgd" else 1e-2)
    if optimizer == "adamw":
        model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # type: ignore[method-assign]
    guard = GradGuard(clip=None, lr_guard=None, log_every_n_steps=1)
    trainer(max_steps=6, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        model, regression_data()
    )
    logged = _tb(tmp_path)
    for layer in ("net.0", "net.2"):
        values = logged[f"gradguard/update_ratio/{layer}"]
        assert sorted(values) == [1, 2, 3, 4, 5, 6]
        for step, value in values.items():
            grad, theta = model.before[step][layer]
            if optimizer == "sgd":
                expected = 0.05 * grad.norm() / theta.norm()
            else:
                expected = (model.after[step][layer] - theta).norm() / theta.norm()
            assert value == pytest.approx(float(expected), rel=1e-4)


def test_zero_fraction_counts_dead_units(tmp_path: Any) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].bias[:8] = -1e3  # 8 of 32 units never fire: their rows and the matching head columns get no gradient
    guard = GradGuard(clip=None, lr_guard=None, log_every_n_steps=2)
    trainer(max_steps=6, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        Regressor(net=net), regression_data()
    )
    logged = _tb(tmp_path)
    first, head = logged["gradguard/zero_fraction/net.0"], logged["gradguard/zero_fraction/net.2"]
    assert sorted(first) == [2, 4, 6]
    assert all(v == pytest.approx(8 * 17 / (32 * 17)) for v in first.values())
    assert all(v == pytest.approx(8 / 33) for v in head.values())


class ActHooks(Regressor):
    """Measures ‖∂L/∂y‖ of each layer's output with its own hooks, every step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norms: dict[int, dict[str, float]] = {}
        self.penalizing = False  # a forward pass of a gradient penalty's own: not measured
        for name in ("0", "2"):
            self.net.get_submodule(name).register_forward_hook(self._hook(f"net.{name}"))

    def _hook(self, name: str) -> Any:
        def forward(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if self.penalizing:
                return
            step = self.trainer.global_step + 1
            out.register_hook(lambda g: self.norms.setdefault(step, {}).__setitem__(name, float(g.norm())))

        return forward


class PenalizedActHooks(ActHooks):
    """ActHooks with a gradient penalty on the inputs (WGAN-GP style, ``torch.autograd.grad`` with
    ``create_graph=True``) taken before the loss's own forward pass."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        xi = x.clone().requires_grad_(True)
        self.penalizing = True
        slope = torch.autograd.grad(self(xi).sum(), xi, create_graph=True)[0]
        self.penalizing = False
        return nn.functional.mse_loss(self(x), y) + 1e-6 * slope.pow(2).sum(1).mean()


@pytest.mark.parametrize(("model_type", "rel"), [(ActHooks, 1e-5), (PenalizedActHooks, 1e-4)])
def test_activation_gradient_norms_match_own_hooks(tmp_path: Any, model_type: type[ActHooks], rel: float) -> None:
    # Under a gradient penalty, before, its autograd.grad call counted too: the head's output read the norm of
    # D(x).sum()'s ones.
    torch.manual_seed(0)
    model = model_type()
    guard = GradGuard(log_every_n_steps=3)
    trainer(max_steps=9, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        model, regression_data()
    )
    _assert_act_grad_matches(_tb(tmp_path), model.norms, ("net.0", "net.2"), rel=rel)


class Skipping(Regressor):
    """Returns ``None`` from every ``every``-th ``training_step`` (Lightning then runs no backward for that batch)."""

    def __init__(self, every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every, self.calls = every, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        self.calls += 1
        loss = super().training_step(batch, batch_idx)
        return None if self.calls % self.every == 0 else loss


def _noise_scale_fit(
    tmp_path: Any, skip_every: int | None = None, **trainer_kwargs: Any
) -> tuple[list[tuple[int, float]], float]:
    """A linear regression with GradGuard logging every step: the logged (step, noise scale) pairs, and the true
    ``B_simple`` at the final weights."""
    g = torch.Generator().manual_seed(0)
    n, dim = trainer_kwargs.pop("examples", 4096), 8
    x = torch.randn(n, dim, generator=g)
    w_true = torch.randn(dim, 1, generator=g)
    y = x @ w_true + 1.0 * torch.randn(n, 1, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    if skip_every is None:
        model = Regressor(net=nn.Linear(dim, 1), dim=dim, lr=0.003)
    else:
        model = Skipping(skip_every, net=nn.Linear(dim, 1), dim=dim, lr=0.003)
    guard = GradGuard(clip=None, lr_guard=None, log_every_n_steps=1)
    logger = CSVLogger(tmp_path)
    trainer(callbacks=[guard, *trainer_kwargs.pop("callbacks", [])], logger=logger, **trainer_kwargs).fit(model, data)
    values = [
        (int(r["step"]), float(r["gradguard/noise_scale"])) for r in _csv(logger) if r.get("gradguard/noise_scale")
    ]
    # The truth at the final weights, from per-example gradients of the per-example loss (w·x + b - y)².
    with torch.no_grad():
        lin = model.net
        residual = (lin(x) - y).squeeze(1)  # [n]
        per_example = torch.cat([2 * residual[:, None] * x, 2 * residual[:, None]], dim=1).double()  # [n, dim + 1]
        mean = per_example.mean(0)
        true = float((per_example - mean).square().sum(1).mean() / mean.square().sum())
    return values, true


def test_noise_scale_from_accumulation_is_near_the_true_b_simple(tmp_path: Any) -> None:
    values, true = _noise_scale_fit(tmp_path, max_steps=200, max_epochs=-1, accumulate_grad_batches=4)
    assert len(values) > 150
    assert true / 2 <= values[-1][1] <= true * 2, (values[-1], true)


def test_noise_scale_counts_only_the_micro_batches_that_ran(tmp_path: Any) -> None:
    # Every third training_step returns None: a step whose window lost a batch averages fewer examples, while
    # Lightning still divides each loss by the full accumulation (counting them all put the estimate 17x too high).
    values, true = _noise_scale_fit(tmp_path, skip_every=3, max_steps=200, max_epochs=-1, accumulate_grad_batches=4)
    assert len(values) > 150
    assert true / 2 <= values[-1][1] <= true * 2, (values[-1], true)


def test_noise_scale_weighs_a_short_last_batch_by_what_it_adds(tmp_path: Any) -> None:
    # 4052 examples in batches of 16: each epoch's last window holds a batch of 16 and one of 4. Lightning averages the
    # two batches' mean gradients, so their average is as noisy as one over 12.8 examples, not 20: counted as 20, the
    # window's one observation pulled the smoothed trace down, and the estimate ended at 3.65 against a true 42 (a
    # user trial's batches of 32 and 4: unlogged, NaN, for several logs). A window no less noisy than its first batch
    # measures nothing and is left out.
    values, true = _noise_scale_fit(tmp_path, examples=4052, max_epochs=4, accumulate_grad_batches=4)
    assert len(values) > 200  # 4 epochs of 63 full windows
    assert true / 2 <= values[-1][1] <= true * 2, (values[-1], true)


@pytest.mark.parametrize("schedule", [{0: 1, 1: 4}, {0: 2, 1: 8}])
def test_noise_scale_follows_a_gradient_accumulation_scheduler(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, schedule: dict[int, int]
) -> None:
    # The scheduler sets the accumulation at each epoch start: each logging step compares the batch sizes it has.
    with caplog.at_level(logging.INFO):
        values, true = _noise_scale_fit(
            tmp_path, max_epochs=3, callbacks=[GradientAccumulationScheduler(schedule)], enable_checkpointing=False
        )
    assert not any(NOISE_SCALE_NOTE in r.getMessage() for r in caplog.records)
    first_epoch = 256 // schedule[0]  # 4096 examples in batches of 16
    steps = [step for step, _ in values]
    if schedule[0] == 1:  # nothing to compare with before the scheduler raises the accumulation
        assert min(steps) == first_epoch
    assert len(values) == 2 * 256 // schedule[1] + (first_epoch if schedule[0] > 1 else 0)
    assert true / 2 <= values[-1][1] <= true * 2, (values[-1], true)


def test_one_note_when_there_is_no_second_batch_size(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard(log_every_n_steps=2)
    logger = CSVLogger(tmp_path)
    with caplog.at_level(logging.INFO):
        trainer(max_steps=6, max_epochs=-1, callbacks=[guard], logger=logger).fit(Regressor(), regression_data())
    assert sum(NOISE_SCALE_NOTE in r.getMessage() for r in caplog.records) == 1
    assert not any(r.get("gradguard/noise_scale") for r in _csv(logger))
    # Without a logger no diagnostic goes anywhere: nothing to advise about.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(max_steps=6, max_epochs=-1, callbacks=[GradGuard()], logger=False).fit(Regressor(), regression_data())
    assert not any(NOISE_SCALE_NOTE in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("logged", [True, False])
def test_one_note_while_the_noise_scale_estimate_is_not_positive(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, logged: bool
) -> None:
    # Targets that are pure noise, and a model at their optimum (zero weights, a rate too small to move them): the
    # true gradient is 0, so the estimate of |G|^2 is noise around 0, and the noise scale has no positive value.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 8, generator=g), torch.randn(1024, 1, generator=g)
    model = Regressor(net=nn.Linear(8, 1), dim=8, lr=1e-9)
    nn.init.zeros_(model.net.weight)
    nn.init.zeros_(model.net.bias)
    logger = CSVLogger(tmp_path)
    with caplog.at_level(logging.INFO):
        trainer(
            max_steps=40,
            max_epochs=-1,
            accumulate_grad_batches=4,
            callbacks=[GradGuard(clip=None, lr_guard=None, log_every_n_steps=1)],
            logger=logger if logged else False,
        ).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    notes = [r.getMessage() for r in caplog.records if "is not logged yet" in r.getMessage()]
    if not logged:  # nothing is logged anywhere: no note about a chart
        assert notes == []
        return
    assert len(notes) == 1 and "on 64 examples" in notes[0]
    logged = [r for r in _csv(logger) if r.get("gradguard/noise_scale")]
    assert len(logged) < 40  # the steps whose smoothed |G|^2 was not positive logged none


@pytest.mark.parametrize("every, logs", [(2, 8), (3, 5)])  # the epoch ends on a logging step, or between two
def test_epoch_summaries_go_to_every_logger(tmp_path: Any, every: int, logs: int) -> None:
    guard = GradGuard(log_every_n_steps=every)
    logger = CSVLogger(tmp_path)
    trainer(max_epochs=2, callbacks=[guard], logger=logger).fit(Regressor(), regression_data())  # 16 steps per epoch
    rows = [r for r in _csv(logger) if r.get("gradguard/epoch/total_norm_p50")]
    assert [int(r["step"]) for r in rows] == [16 - 1, 32 - 1]  # Lightning's step of each epoch's last batch
    assert all(float(r["gradguard/epoch/logs"]) == logs for r in rows)
    assert all(float(r["gradguard/epoch/total_norm_max"]) >= float(r["gradguard/epoch/total_norm_p99"]) for r in rows)
    if every == 2:  # one row per step: the summary rides with the step's log
        assert all(r.get("gradguard/total_norm") for r in rows)


def test_an_epoch_cut_short_gets_no_summary(tmp_path: Any) -> None:
    logger = CSVLogger(tmp_path)
    trainer(max_steps=8, max_epochs=-1, callbacks=[GradGuard(log_every_n_steps=2)], logger=logger).fit(
        Regressor(), regression_data()
    )
    assert not any(k.startswith("gradguard/epoch/") and v for r in _csv(logger) for k, v in r.items())


@pytest.mark.parametrize(
    "diagnostics, absent",
    [
        (False, ("update_ratio", "zero_fraction", "act_grad", "noise_scale", "epoch")),
        (["noise_scale", "epoch"], ("update_ratio", "zero_fraction", "act_grad")),
        (["update_ratio", "zero_fraction", "act_grad"], ("noise_scale", "epoch")),
    ],
)
def test_switching_a_diagnostic_off_removes_its_tags(tmp_path: Any, diagnostics: Any, absent: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    guard = GradGuard(log_every_n_steps=2, diagnostics=diagnostics)
    trainer(
        max_steps=8, max_epochs=-1, accumulate_grad_batches=2, callbacks=[guard], logger=TensorBoardLogger(tmp_path)
    ).fit(Regressor(), regression_data())
    tags = {t.split("/")[1] for t in _tb(tmp_path) if t.startswith("gradguard/")}
    present = {"update_ratio", "zero_fraction", "act_grad", "noise_scale", "epoch"} - set(absent)
    assert not tags & set(absent)
    assert present <= tags


@pytest.mark.parametrize("value", ["all", ["noise"], 1, None])
def test_invalid_diagnostics(value: Any) -> None:
    with pytest.raises(ValueError, match="diagnostics"):
        GradGuard(diagnostics=value)


def test_diagnostics_state_round_trips_and_old_checkpoints_load() -> None:
    guard = GradGuard(log_every_n_steps=1)
    fit = trainer(max_steps=5, max_epochs=-1, accumulate_grad_batches=2, callbacks=[guard])
    fit.fit(Regressor(), regression_data())
    checkpoint: dict[str, Any] = {}
    guard.on_save_checkpoint(fit, fit.lightning_module, checkpoint)
    state = checkpoint["gradguard_diagnostics"][guard.state_key]
    assert state["noise"]["count"] == 5
    fresh = GradGuard()
    fresh.on_load_checkpoint(fit, fit.lightning_module, checkpoint)
    again: dict[str, Any] = {}
    fresh.on_save_checkpoint(fit, fit.lightning_module, again)
    assert again["gradguard_diagnostics"][guard.state_key]["noise"] == state["noise"]
    GradGuard().on_load_checkpoint(fit, fit.lightning_module, {})  # a checkpoint from before the diagnostics
    GradGuard().load_state_dict(guard.state_dict())  # the state_dict keeps its version-1 layout


def test_quiet_steps_stay_free_of_syncs_and_hooks(tmp_path: Any) -> None:
    from tests.test_callback import RecordingGuard

    class Guard(RecordingGuard):
        def on_after_backward(self, trainer, pl_module):  # noqa: ANN001, ANN201
            return self._run(
                "on_after_backward", False, trainer, lambda: super(Guard, self).on_after_backward(trainer, pl_module)
            )

    class HookCount(Regressor):
        hooks: dict[int, int] = {}

        def on_before_backward(self, loss: torch.Tensor) -> None:
            self.hooks[self.trainer.global_step + 1] = sum(len(m._forward_hooks) for m in self.modules())

    torch.manual_seed(0)
    guard = Guard(log_every_n_steps=5, saturation=False, on_nonfinite="zero")
    model = HookCount()
    trainer(
        max_steps=10, max_epochs=-1, accumulate_grad_batches=2, callbacks=[guard], logger=TensorBoardLogger(tmp_path)
    ).fit(model, regression_data())
    assert guard.logging_steps == [5, 10]
    assert guard.quiet_calls == []
    assert {s for s, n in model.hooks.items() if n} == {5, 10}  # hooks only on the passes of logging steps
    assert "gradguard/noise_scale" in _tb(tmp_path)


class HookedGAN(L.LightningModule):
    """Manual optimization, D's step then G's in every batch; the norm of the gradient at each G layer's output in G's
    backward, from its own hooks (G's first forward pass feeds D detached: no gradient reaches it)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.norms: dict[int, dict[str, float]] = {}
        for name in ("0", "2"):
            self.g.get_submodule(name).register_forward_hook(self._hook(f"g.{name}"))

    def _hook(self, name: str) -> Any:
        def forward(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            step = self.trainer.global_step // 2 + 1  # two optimizer steps per batch
            out.register_hook(lambda g: self.norms.setdefault(step, {}).__setitem__(name, float(g.norm())))

        return forward

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, noise = batch[0][:, :8], batch[0][:, 8:12]
        opt_d, opt_g = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        logits_real, logits_fake = self.d(real), self.d(self.g(noise).detach())
        opt_d.zero_grad()
        self.manual_backward(
            bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))
        )
        opt_d.step()
        logits = self.d(self.g(noise))
        opt_g.zero_grad()
        self.manual_backward(bce(logits, torch.ones_like(logits)))
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.d.parameters(), lr=1e-2), torch.optim.SGD(self.g.parameters(), lr=1e-2)]


def test_manual_optimization_is_not_advised_to_accumulate_for_the_noise_scale(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Lightning refuses accumulate_grad_batches under manual optimization: the note must not advise it there.
    with caplog.at_level(logging.INFO):
        trainer(max_steps=4, max_epochs=-1, callbacks=[GradGuard()], logger=CSVLogger(tmp_path)).fit(
            HookedGAN(), regression_data(dim=16)
        )
    messages = [r.getMessage() for r in caplog.records]
    assert sum(NOISE_SCALE_MANUAL_NOTE in m for m in messages) == 1
    assert not any(NOISE_SCALE_NOTE in m for m in messages)


def test_with_several_optimizers_activation_gradients_cover_every_backward_of_the_batch(tmp_path: Any) -> None:
    # Before, the first optimizer step of the batch (D's) ended the measurement: G's layers were never measured.
    torch.manual_seed(0)
    model = HookedGAN()
    guard = GradGuard(log_every_n_steps=3, diagnostics=["act_grad"])
    trainer(max_steps=18, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        model, regression_data(dim=16)
    )
    logged = _tb(tmp_path)
    assert {"gradguard/act_grad/d.0", "gradguard/act_grad/d.2"} <= set(logged)
    # Logged by batch (Lightning's step of a batch with two optimizer steps): steps 3, 6 and 9 of 18.
    _assert_act_grad_matches(logged, model.norms, ("g.0", "g.2"), rel=1e-5)


class ScaledHookedGAN(HookedGAN):
    """HookedGAN whose own hooks divide by the GradScaler's scale in effect during each backward."""

    def _hook(self, name: str) -> Any:
        def forward(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            step = self.trainer.global_step // 2 + 1
            scaler = self.trainer.precision_plugin.scaler  # type: ignore[attr-defined]

            def on_grad(g: torch.Tensor) -> None:
                self.norms.setdefault(step, {})[name] = float(g.float().norm()) / scaler.get_scale()

            out.register_hook(on_grad)

        return forward


def test_activation_gradients_of_several_optimizers_are_unscaled_with_each_backwards_own_scale(tmp_path: Any) -> None:
    # growth_interval=1: the GradScaler doubles its scale at each optimizer step, so G's backward runs with twice the
    # scale of D's, and the scale at the end of the batch is twice G's. Before, every norm of the batch was divided by
    # that last scale: G's layers were logged at half their norm.
    torch.manual_seed(0)
    model = ScaledHookedGAN()
    guard = GradGuard(log_every_n_steps=3, diagnostics=["act_grad"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    trainer(
        max_steps=18,
        max_epochs=-1,
        callbacks=[guard],
        logger=TensorBoardLogger(tmp_path),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    ).fit(model, regression_data(dim=16))
    assert scaler.get_scale() > 2.0**8  # the scale did change along the way
    _assert_act_grad_matches(_tb(tmp_path), model.norms, ("g.0", "g.2"), rel=1e-3)


class _Functional(Regressor):
    """An MLP whose activation is a function, not a module: nothing for the saturation measure to watch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](torch.nn.functional.gelu(self.net[0](x)))


def _layout_titles(tmp_path: Any) -> set[str]:
    from tests.helpers import custom_layout, load_events

    layout = custom_layout(load_events(tmp_path / "lightning_logs" / "version_0"))
    return {chart.title for category in layout.category for chart in category.chart}


@pytest.mark.parametrize("functional", [True, False], ids=["functional-gelu", "tanh-module"])
def test_the_saturation_chart_is_laid_out_only_when_a_module_is_watched(tmp_path: Any, functional: bool) -> None:
    activation = nn.Identity() if functional else nn.Tanh()
    model = (_Functional if functional else Regressor)(
        net=nn.Sequential(nn.Linear(16, 32), activation, nn.Linear(32, 1))
    )
    logger = TensorBoardLogger(tmp_path, name="lightning_logs", version=0)
    trainer(max_steps=6, callbacks=[GradGuard(log_every_n_steps=3)], logger=logger).fit(model, regression_data())
    written = {tag for tag in scalar_series(tmp_path / "lightning_logs" / "version_0") if "saturation/" in tag}
    assert ("saturation" in _layout_titles(tmp_path)) is (not functional)
    assert written == (set() if functional else {"gradguard/saturation/net.1"})


def test_compiled_layers_get_one_note_and_no_activation_gradient_chart(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    # The eager backend: a compiled module's hooks behave as under Inductor, without its compile time.
    net = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), backend="eager")
    logger = TensorBoardLogger(tmp_path, name="lightning_logs", version=0)
    with caplog.at_level(logging.INFO):
        trainer(max_steps=6, callbacks=[GradGuard(log_every_n_steps=3)], logger=logger).fit(
            Regressor(net=net), regression_data()
        )
    notes = [r.getMessage() for r in caplog.records if "gradguard/act_grad" in r.getMessage()]
    assert len(notes) == 1 and "2 layers that run under torch.compile ('net.0', 'net.2')" in notes[0]
    tags = scalar_series(tmp_path / "lightning_logs" / "version_0")
    assert "gradguard/layer/net.0" in tags and not any(tag.startswith("gradguard/act_grad/") for tag in tags)
    assert not any("activation-gradient" in title for title in _layout_titles(tmp_path))
    torch._dynamo.reset()


class _HugeValidation(Regressor):
    """Validation on inputs 1000x the training ones: every tanh output saturates there, none in training."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x * 1e3), y))


def test_validation_inside_a_logging_window_is_not_training_saturation(tmp_path: Any) -> None:
    rows = {}
    for interval in (None, 7):
        torch.manual_seed(0)
        model = _HugeValidation(net=nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)), lr=0.01)
        logger = CSVLogger(tmp_path, name=f"val{interval}")
        extra: dict[str, Any] = {} if interval is None else {"val_check_interval": interval, "num_sanity_val_steps": 0}
        # Accumulation over 4 batches: validation after batch 7 falls inside the window of the log at step 2.
        trainer(
            max_steps=3,
            max_epochs=-1,
            callbacks=[GradGuard(log_every_n_steps=1)],
            logger=logger,
            accumulate_grad_batches=4,
            limit_val_batches=2,
            **extra,
        ).fit(model, regression_data(), regression_data() if interval else None)
        rows[interval] = [
            float(r["gradguard/saturation/net.1"]) for r in _csv(logger) if r.get("gradguard/saturation/net.1")
        ]
    assert len(rows[7]) == 3 and rows[7] == rows[None]
    assert max(rows[7]) < 0.5


def _parameter_names(name: str) -> str:
    return name  # each parameter its own layer: 'net.0.weight' names no module


@pytest.mark.parametrize("group_fn", [_parameter_names, None])
def test_layer_names_that_name_no_module_get_one_note_about_activation_gradients(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, group_fn: Any
) -> None:
    """`act_grad` hooks the modules that layers are named after: a `group_fn` returning parameter names dropped the
    chart without a word (user trial)."""
    logger = TensorBoardLogger(tmp_path, name="lightning_logs", version=0)
    with caplog.at_level(logging.INFO):
        trainer(max_steps=6, callbacks=[GradGuard(log_every_n_steps=3, group_fn=group_fn)], logger=logger).fit(
            Regressor(), regression_data()
        )
    notes = [r.getMessage() for r in caplog.records if "no layer name from `group_fn` names a module" in r.getMessage()]
    tags = scalar_series(tmp_path / "lightning_logs" / "version_0")
    measured = any(tag.startswith("gradguard/act_grad/") for tag in tags)
    if group_fn is None:
        assert not notes and measured
    else:
        assert len(notes) == 1 and not measured and "gradguard/layer/net.0.weight" in tags


class Growing(Regressor):
    """A regressor that gains a residual block (Linear, Tanh) at step ``at``, given to the optimizer with
    ``add_param_group``, and measures the block's output gradient with its own hook."""

    def __init__(self, at: int) -> None:
        super().__init__(dim=16)
        self.at = at
        self.blocks = nn.ModuleList()
        self.norms: dict[int, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0](x)
        for block in self.blocks:
            h = h + block(h)
        return self.net[2](self.net[1](h))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.at and not len(self.blocks):
            block = nn.Sequential(nn.Linear(self.net[0].out_features, self.net[0].out_features), nn.Tanh())
            block[0].register_forward_hook(self._hook("blocks.0.0"))
            self.blocks.append(block)
            self.trainer.optimizers[0].add_param_group({"params": list(block.parameters())})

    def _hook(self, name: str) -> Any:
        def forward(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            step = self.trainer.global_step + 1
            out.register_hook(lambda g: self.norms.setdefault(step, {}).__setitem__(name, float(g.norm())))

        return forward


def test_a_module_created_mid_fit_gets_the_activation_diagnostics(tmp_path: Any) -> None:
    # Before, a block given to the optimizer mid-fit got per-layer norms but neither `act_grad` nor `saturation`:
    # the hooks were placed at the fit's start, and only a run resumed after the growth had them.
    torch.manual_seed(0)
    model = Growing(at=4)
    guard = GradGuard(log_every_n_steps=3)
    trainer(max_steps=12, max_epochs=-1, callbacks=[guard], logger=TensorBoardLogger(tmp_path)).fit(
        model, regression_data()
    )
    logged = _tb(tmp_path)
    assert sorted(logged["gradguard/layer/blocks.0.0"]) == [6, 9, 12]
    act = logged["gradguard/act_grad/blocks.0.0"]
    assert sorted(act) == [6, 9, 12]
    for step, value in act.items():
        assert value == pytest.approx(model.norms[step]["blocks.0.0"], rel=1e-5)
    assert sorted(logged["gradguard/saturation/blocks.0.1"]) == [6, 9, 12]
