"""GradGuard logs at Lightning's own steps (a logger row holds both), and warns once per kind and logging step."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_gradguard import ExplodingDetector, GradGuard
from tests.helpers import load_events
from tests.models import Regressor, regression_data, trainer


class LossLogger(Regressor):
    """Logs ``train_loss`` with ``self.log``, as most LightningModules do."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def _rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _steps(rows: list[dict[str, str]], column: str) -> list[int]:
    return sorted({int(r["step"]) for r in rows if r.get(column)})


@pytest.mark.parametrize(("accumulate", "every"), [(1, 5), (3, 4)])
def test_gradguard_scalars_share_their_rows_with_train_loss(tmp_path: Path, accumulate: int, every: int) -> None:
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="", version=0)
    fit = trainer(
        max_steps=4 * every,
        max_epochs=-1,
        callbacks=[GradGuard()],
        logger=logger,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
    )
    fit.fit(LossLogger(), regression_data(n=512))
    rows = _rows(logger)
    loss_steps, guard_steps = _steps(rows, "train_loss"), _steps(rows, "gradguard/total_norm")
    # Lightning numbers the n-th optimizer step n - 1 and logs every `every`-th one.
    assert loss_steps == [n - 1 for n in range(every, 4 * every + 1, every)]
    assert guard_steps == loss_steps


class TwoOptimizers(L.LightningModule):
    """Manual optimization: two optimizers step on every batch, so ``global_step`` runs twice as fast as the batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[attr-defined]
        loss = nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)
        self.log("train_loss", loss)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)]


def test_two_optimizers_log_on_lightnings_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="", version=0)
    trainer(max_steps=24, max_epochs=-1, callbacks=[GradGuard()], logger=logger, log_every_n_steps=4).fit(
        TwoOptimizers(), regression_data()
    )
    rows = _rows(logger)
    loss_steps = _steps(rows, "train_loss")
    assert loss_steps == [3, 7, 11]  # 12 batches of two optimizer steps each
    assert _steps(rows, "gradguard/opt0/total_norm") == loss_steps
    assert _steps(rows, "gradguard/opt1/total_norm") == loss_steps


def test_a_resumed_run_keeps_logging_on_lightnings_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    first = trainer(
        max_steps=7,
        max_epochs=-1,
        callbacks=[GradGuard(), checkpoints],
        logger=CSVLogger(tmp_path, name="", version=0),
        log_every_n_steps=5,
        enable_checkpointing=True,
    )
    first.fit(LossLogger(), regression_data())
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    logger = CSVLogger(tmp_path, name="", version=1)
    second = trainer(max_steps=21, max_epochs=-1, callbacks=[GradGuard()], logger=logger, log_every_n_steps=5)
    second.fit(LossLogger(), regression_data(), ckpt_path=str(ckpt))
    rows = _rows(logger)
    loss_steps = _steps(rows, "train_loss")
    assert loss_steps == [9, 14, 19]  # as the uninterrupted run: optimizer steps 10, 15 and 20
    # The tail (optimizer steps 20 and 21) is logged once more at the end, at the row Lightning gives the last
    # optimizer step: 20. Lightning 2.4 counts resumed steps one lower, so its row 19 already ends with step 21.
    last = second.fit_loop.epoch_loop._batches_that_stepped - 1
    tail = [last] if last > loss_steps[-1] else []
    assert [int(r["step"]) for r in rows if r.get("gradguard/total_norm")] == [*loss_steps, *tail]


def test_histograms_images_and_events_use_lightnings_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LossLogger(lr=0.05)
    spike_at = 12  # the 13th optimizer step: Lightning's step 12

    def step(batch: Any, batch_idx: int) -> torch.Tensor:
        loss = LossLogger.training_step(model, batch, batch_idx)
        return loss * (50.0 if model.trainer.global_step == spike_at else 1.0)

    model.training_step = step  # type: ignore[method-assign]
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5), histogram_every_n_steps=8, image_every_n_steps=8)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=16, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=4).fit(
            model, regression_data()
        )
    acc = load_events(tmp_path / "version_0")
    tags = acc.Tags()
    hist = next(t for t in tags["histograms"] if t.startswith("gradguard/grad_hist/"))
    assert [e.step for e in acc.Histograms(hist)] == [7, 15]  # the 8th and 16th optimizer steps
    assert [e.step for e in acc.Images("gradguard/gradient_flow")] == [3, 7, 15]  # first log, then every 8
    trouble = [t for t in tags["scalars"] if t.startswith("gradguard/trouble/exploding/")]
    assert trouble and {e.step for t in trouble for e in acc.Scalars(t)} == {spike_at}


def _deep(depth: int = 12, width: int = 24) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class Spiky(Regressor):
    """The loss is multiplied by 50 on some optimizer steps: every layer's gradient jumps 50x at once."""

    def __init__(self, *spikes: int, factor: float = 50.0) -> None:
        super().__init__(net=_deep(), lr=0.01)
        self.spikes = spikes
        self.factor = factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (self.factor if self.trainer.global_step in self.spikes else 1.0)


def test_a_loss_spike_is_one_warning_naming_the_worst_layers() -> None:
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=20, max_epochs=-1, callbacks=[guard], log_every_n_steps=10).fit(Spiky(12), regression_data())
    messages = [str(w.message) for w in caught if str(w.message).startswith("GradGuard")]
    exploding = [m for m in messages if "exploding gradients" in m]
    assert len(exploding) == 1, messages
    (message,) = exploding
    # Lightning's step of the spike (its 13th optimizer step), the worst layer first, two more named, the rest counted.
    # The yardstick is the layer's norm at the last report (the 10th optimizer step), named by its step: no logger
    # here, so "at an earlier log" would name nothing the user can look up.
    lead = re.match(
        r"GradGuard: exploding gradients in layer '([^']+)' at step 12: norm \S+ \((\S+)x its norm at step 9\)", message
    )
    assert lead, message
    more = re.search(
        r"also in (\d+) more layers: '[^']+' \(norm \S+, (\S+)x\), '[^']+' \(norm \S+, (\S+)x\) and (\d+) more", message
    )
    assert more, message
    flagged = int(more[1]) + 1
    assert flagged >= 6 and int(more[4]) == flagged - 3
    ratios = [float(lead[2]), float(more[2]), float(more[3])]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 10  # largest jump first
    assert guard.summary()["exploding"] >= 1


class SpikyBranch(Regressor):
    """An auxiliary head trained on even steps only, its loss x1e4 at step 12: the only layer that jumps."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.branch = nn.Linear(16, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        if step % 2 == 0:
            loss = loss + self.branch(batch[0]).pow(2).mean() * (1e4 if step == 12 else 1.0)
        return loss


def test_an_exploding_warning_compares_with_the_step_the_layer_was_last_seen() -> None:
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5), diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=20, max_epochs=-1, callbacks=[guard], log_every_n_steps=10).fit(
            SpikyBranch(), regression_data()
        )
    (message,) = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
    # The first report (step 9) saw the branch last at step 8, its latest even step: the jump is against that norm.
    lead = re.match(
        r"GradGuard: exploding gradients in layer 'branch' at step 12: norm \S+ \((\S+)x its norm at step 8\)", message
    )
    assert lead, message
    assert float(lead[1]) > 100


def _exploding_warnings(guard: GradGuard, model: Spiky, every: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=20, max_epochs=-1, callbacks=[guard], log_every_n_steps=every).fit(model, regression_data())
    return [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]


def test_a_layer_is_named_in_one_warning_only() -> None:
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False, max_warnings=100)
    messages = _exploding_warnings(guard, Spiky(12, 17), every=5)  # two spikes, two logging windows
    assert guard.summary()["exploding"] >= 2 and 1 <= len(messages) <= 2
    named = [re.findall(r"'([^']+)'", m) for m in messages]
    layers = [name for names in named for name in names]
    assert len(layers) == len(set(layers))  # each layer and kind warns once


def test_max_warnings_zero_counts_the_layers_without_naming_them() -> None:
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False, max_warnings=0)
    (message,) = _exploding_warnings(guard, Spiky(12), every=10)
    assert re.match(r"GradGuard: exploding gradients in \d+ layers at step 12; guarded by: ", message)
    assert "'" not in message


class Poisoned(Regressor):
    """One NaN loss at step ``at``: with ``on_nonfinite="warn"`` the step is applied, and the weights stay NaN."""

    def __init__(self, at: int) -> None:
        super().__init__(lr=0.01)
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.at else loss


def test_warn_on_nonfinite_warns_once_and_counts_every_applied_step() -> None:
    torch.manual_seed(0)
    guard = GradGuard(on_nonfinite="warn", lr_guard=None, rollback=None, diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=20, max_epochs=-1, callbacks=[guard], log_every_n_steps=5).fit(Poisoned(5), regression_data())
    messages = [str(w.message) for w in caught if "GradGuard: non-finite gradients at step" in str(w.message)]
    assert messages == [
        "GradGuard: non-finite gradients at step 5 (optimizer 0); the step was applied (`on_nonfinite='warn'`). "
        "Later non-finite steps are applied without a warning; `summary()['nonfinite']` counts them."
    ]
    assert guard.summary()["nonfinite"] == 15  # the NaN step was applied: every later step is NaN too
    assert guard.summary()["skipped"] == 0


class StepsInBackward(Regressor):
    """Manual optimization whose parameters are stepped inside the backward pass (one SGD per parameter, from
    ``register_post_accumulate_grad_hook``), as PyTorch's fused-optimizer-in-backward recipe does; with
    ``in_backward=False`` the module's optimizer is stepped every other batch through Lightning instead."""

    def __init__(self, in_backward: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.in_backward = in_backward
        if in_backward:
            self.own = {p: torch.optim.SGD([p], lr=0.05) for p in self.parameters()}
            for p in self.parameters():
                p.register_post_accumulate_grad_hook(self._step_now)

    def _step_now(self, p: torch.Tensor) -> None:
        self.own[p].step()
        self.own[p].zero_grad()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        if not self.in_backward and batch_idx % 2 == 1:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("in_backward", [True, False])
def test_a_fit_whose_optimizer_steps_never_reach_the_guard_says_so_once(in_backward: bool) -> None:
    # Optimizers stepped inside the backward pass never pass through Lightning's hook: GradGuard measured nothing,
    # logged nothing and said nothing.
    torch.manual_seed(0)
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, callbacks=[guard]).fit(StepsInBackward(in_backward), regression_data())
    unguarded = [w for w in caught if "no optimizer step reached GradGuard" in str(w.message)]
    assert len(unguarded) == (1 if in_backward else 0)
    # At the end of the fit: under manual optimization a module may step in its own epoch-end hook, after this one.
    assert not in_backward or "32 training batch(es)" in str(unguarded[0].message)
    assert (guard._states[0].steps if guard._states else 0) == (0 if in_backward else 16)


class StepsAtEpochEnd(Regressor):
    """Manual optimization that steps once per epoch, in its own ``on_train_epoch_end`` (after GradGuard's)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y) / 16)

    def on_train_epoch_end(self) -> None:
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()


def test_a_module_stepping_in_its_own_epoch_end_hook_gets_no_unguarded_warning() -> None:
    torch.manual_seed(0)
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=3, callbacks=[guard]).fit(StepsAtEpochEnd(), regression_data())
    assert guard._states[0].steps == 3
    assert not [w for w in caught if "no optimizer step reached GradGuard" in str(w.message)]


class SeveralStepsPerBatch(Regressor):
    """Manual optimization with four optimizer steps per batch (a PPO-style epoch over each batch); the loss of the
    first optimizer's 50th step is x1e4. With ``second``, another optimizer steps a scalar offset once per batch."""

    def __init__(self, second: bool) -> None:
        super().__init__(lr=0.01)
        self.automatic_optimization = False
        self.offset = nn.Parameter(torch.zeros(())) if second else None
        self.stepped = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opts = self.optimizers()
        opt = opts[0] if isinstance(opts, list) else opts
        for _ in range(4):
            self.stepped += 1
            loss = nn.functional.mse_loss(self(batch[0]), batch[1]) * (1e4 if self.stepped == 50 else 1.0)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        if isinstance(opts, list):
            opts[1].zero_grad()
            self.manual_backward(nn.functional.mse_loss(self(batch[0]).detach() + self.offset, batch[1]))
            opts[1].step()

    def configure_optimizers(self) -> Any:
        net = torch.optim.SGD(self.net.parameters(), lr=self.lr)
        return net if self.offset is None else [net, torch.optim.SGD([self.offset], lr=self.lr)]


@pytest.mark.parametrize("second", [False, True])
def test_a_warning_under_manual_optimization_names_the_optimizers_own_step(second: bool) -> None:
    torch.manual_seed(0)
    guard = GradGuard(diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, limit_train_batches=20, callbacks=[guard], log_every_n_steps=5).fit(
            SeveralStepsPerBatch(second), regression_data()
        )
    (message,) = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
    # Lightning's step is the batch's (its logged metrics' x-axis): the 50th optimizer step ran in the 13th batch.
    at = r"\(optimizer 0, its step 50\)" if second else r"\(optimizer step 50\)"
    assert re.match(rf"GradGuard: exploding gradients in layer '[^']+' at step 12 {at}: ", message), message


def test_a_bad_batch_in_the_warm_up_is_filed_under_every_layer_it_moved(tmp_path: Path) -> None:
    # Step 5: no layer has its own statistics yet, only the total's warm-up test flags the x50 batch. Every layer
    # that carries a share of the total is named and gets a trouble tag, not the largest alone.
    torch.manual_seed(0)
    guard = GradGuard(diagnostics=False)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=1).fit(
            Spiky(5), regression_data()
        )
    (message,) = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
    named = re.match(r"GradGuard: exploding gradients in layer '[^']+' at step 5: .*also in (\d+) more layers", message)
    assert named and int(named[1]) >= 3, message
    tags = [t for t in load_events(tmp_path / "version_0").Tags()["scalars"] if "trouble/exploding/" in t]
    assert len(tags) == int(named[1]) + 1


def test_a_second_fit_names_its_own_steps_only() -> None:
    # The guard and its engine go on into a second fit of the same model: the engine's count of steps runs 20 ahead
    # of Lightning's step, which says nothing the step does not, and the first fit's norms are no yardstick.
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5), diagnostics=False)
    model = Spiky(factor=1e4)  # the norms fell since the first steps: 50x would be back at that level, not a spike
    trainer(max_steps=20, max_epochs=-1, callbacks=[guard], log_every_n_steps=10).fit(model, regression_data())
    model.spikes = (12,)
    messages = _exploding_warnings(guard, model, every=10)
    assert len(messages) == 1 and "optimizer step" not in messages[0], messages
    assert re.match(
        r"GradGuard: exploding gradients in layer '[^']+' at step 12: norm \S+ \(\S+x its norm at step 9\)", messages[0]
    )


@pytest.mark.parametrize(("spike", "named"), [(12, True), (45, False)])
def test_an_exploding_warning_names_the_rollback_only_while_it_could_answer(spike: int, named: bool) -> None:
    # The default rollback restarts for trouble that begins by step 20 (or a diverging loss): a later spike's warning
    # promised "the rollback" too, and none could come.
    torch.manual_seed(0)
    guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5), diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Reported at step 49: the first spike's warning still names the rollback that could answer it then.
        trainer(max_steps=60, max_epochs=-1, callbacks=[guard], log_every_n_steps=50).fit(
            Spiky(spike, factor=1e4), regression_data()
        )
    (message,) = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
    assert message.startswith("GradGuard: exploding gradients in layer ") and f"at step {spike}" in message
    assert ("and the rollback" in message) is named, message


@pytest.mark.parametrize("before", [0.5, 2.0])
def test_an_exploding_warning_quotes_only_a_jump_that_explains_it(before: float) -> None:
    # A layer flagged against its running average may lie below the norm an earlier report saw (a spike then): a
    # ratio under the detector's min_ratio (2) is left out rather than quoted as "0.5x" under "exploding".
    from lightning_gradguard._events import EventReporter

    reporter = EventReporter(GradGuard())
    rows = [
        {"step": 12, "count": None, "kind": "exploding", "layer": "a", "value": 4.0},
        {"step": 12, "count": None, "kind": "exploding", "layer": "b", "value": 1.0},
    ]
    previous = {"a": (9, 1.0), "b": (9, before)}
    message = reporter._message("exploding", rows, previous, None, "ZClip clipping")
    assert message.startswith("GradGuard: exploding gradients in layer 'a' at step 12: norm 4 (4x its norm at step 9)")
    if before == 0.5:
        assert "'b' (norm 1, 2x)" in message
    else:
        assert "'b' (norm 1)" in message and "0.5x" not in message


class TwoJumps(SpikyBranch):
    """The auxiliary head jumps at step 12, every layer at step 17 (the whole loss x50)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (50.0 if self.trainer.global_step == 17 else 1.0)


def test_the_first_exploding_warning_alone_names_new_phase() -> None:
    # A task switch is a jump like any other, clipped for its first steps; the user who made it on purpose learns of
    # `new_phase()` from the first warning, and not again from every later one.
    torch.manual_seed(0)
    model, guard = TwoJumps(), GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=25, max_epochs=-1, callbacks=[guard], log_every_n_steps=5).fit(model, regression_data())
    messages = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
    assert len(messages) == 2 and "at step 12" in messages[0] and "at step 17" in messages[1]
    assert "call `guard.new_phase()` at that step" in messages[0] and "new_phase" not in messages[1]
    # A second fit with the same guard is often the next task: its first exploding warning names it again. (The
    # first fit stops before the jump of step 17, so its layers have not been warned about.)
    model, guard = TwoJumps(), GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False)
    named = []
    for steps in (15, 25):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=steps, max_epochs=-1, callbacks=[guard], log_every_n_steps=5).fit(
                model, regression_data()
            )
        messages = [str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)]
        named.append([("at step 17" in m, "guard.new_phase()" in m) for m in messages])
    assert named == [[(False, True)], [(True, True)]]


def test_a_later_fit_shows_a_warning_an_earlier_fit_gave_in_the_same_words() -> None:
    # Under Python's default filter a code location says a text once per process: a hyperparameter search that
    # tried one setup four times saw its warnings in the first trial only.
    shown = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            torch.manual_seed(0)
            guard = GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0), diagnostics=False)
            trainer(max_steps=15, max_epochs=-1, callbacks=[guard], log_every_n_steps=5).fit(
                Spiky(12), regression_data()
            )
            shown.append([str(w.message) for w in caught if "GradGuard: exploding" in str(w.message)])
            caught.clear()
    assert len(shown[0]) == 1 and shown[1] == shown[2] == shown[0]
    # Where GradGuard warns, as before: its own code, which a filter by module can name.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", module="lightning_gradguard")
        trainer(
            max_steps=15,
            max_epochs=-1,
            callbacks=[GradGuard(exploding=ExplodingDetector(warmup_steps=5, min_share=0.0))],
        ).fit(Spiky(12), regression_data())
    assert not [w for w in caught if str(w.message).startswith("GradGuard")]
