"""GradGuard in every Lightning training mode, on real ``Trainer.fit`` runs (CPU).

Mixed precision (16-mixed with a GradScaler, fused optimizers, bf16-mixed), gradient accumulation, manual
optimization with several optimizers, Lightning's own gradient clipping, checkpoint resume, unusual parameters
(frozen then unfrozen, sparse, complex, thousands of tensors) and runs without a training step. The distributed modes
(DDP, FSDP2, FSDP1/DeepSpeed refusal) are in ``test_distributed.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    AGC,
    L2,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    GuardEngine,
    LRGuard,
    NormClip,
    VanishingDetector,
    ZClip,
)
from tests.helpers import MetricsLogger, ParamSnapshots, assert_same_state, event_files, load_events
from tests.models import NaNAtSteps, Regressor, regression_data, trainer


# ------------------------------------------------------------------------------------------------------------- helpers
def _optimizer_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def layer_norms(module: nn.Module, only: set[int] | None = None, divide: float = 1.0) -> dict[str, float]:
    """fp64 gradient norm of each module's own parameters (tied parameters counted once), the naive way."""
    seen: set[int] = set()
    out: dict[str, float] = {}
    for name, sub in module.named_modules():
        parts = []
        for p in sub.parameters(recurse=False):
            if id(p) in seen or (only is not None and id(p) not in only):
                continue
            seen.add(id(p))
            if p.grad is not None:
                g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                parts.append(g.detach().to(torch.complex128 if g.is_complex() else torch.float64).flatten())
        if parts:
            out[name] = torch.linalg.vector_norm(torch.cat(parts)).item() / divide
    return out


def _total(norms: dict[str, float]) -> float:
    return math.sqrt(sum(v * v for v in norms.values()))


def _loss_scale(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """The factor the gradients still carry in ``on_before_optimizer_step``: the GradScaler's scale when the optimizer
    unscales inside ``step`` (fused), 1 otherwise (Lightning has unscaled them)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        return float(scaler.get_scale())
    return 1.0


class NormProbe(Callback):
    """Records the true (unscaled) per-layer gradient norms of the stepping optimizer at ``on_before_optimizer_step``.

    Put one before GradGuard in ``callbacks`` to see what GradGuard should measure, one after it to see what it left.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scale = _loss_scale(trainer, optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.steps.append(
            {
                "layers": layer_norms(pl_module, _optimizer_params(optimizer), divide=scale),
                "scale": scale,
                "has_nan": any(bool(torch.isnan(g.coalesce().values() if g.is_sparse else g).any()) for g in grads),
                "finite": all(bool(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all()) for g in grads),
            }
        )


class Recorder(GradGuard):
    """GradGuard that keeps, per optimizer step, what it measured, and after every batch, a copy of its full state."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.measured: list[dict[str, Any]] = []
        self.after_batch: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        key = self._opt_keys[id(optimizer)]
        st = self._states[key]
        self.measured.append(
            {
                "key": key,
                "layers": dict(zip(st.index.names, st.layer_last.tolist())),
                "present": dict(zip(st.index.names, st.layer_present.tolist())),
                "total": st.scalars[0].item(),
                "threshold": st.clipper.last_threshold.item() if st.clipper is not None else math.inf,
                "coef": st.clipper.last_coef.item() if st.clipper is not None else 1.0,
            }
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.after_batch.append(copy.deepcopy(self.state_dict()))


def _differs(a: Any, b: Any) -> bool:
    try:
        assert_same_state(a, b)
    except AssertionError:
        return True
    return False


def _event_tags(logdir: Any) -> list[str]:
    tags: list[str] = []
    for path in event_files(logdir):
        acc = load_events(path)
        for kind in ("scalars", "images", "histograms", "tensors"):
            tags += acc.Tags().get(kind, [])
    return tags


# ------------------------------------------------------------------------------------------------------------ 16-mixed
class AmpRegressor(Regressor):
    """Adam (optionally fused); puts an inf into one gradient after the backward pass of step ``inf_at``."""

    def __init__(self, fused: bool = False, inf_at: int | None = None) -> None:
        super().__init__(lr=1e-3)
        self.fused = fused
        self.inf_at = inf_at
        self.autocast_dtypes: set[torch.dtype] = set()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.autocast_dtypes.add(out.dtype)
        return nn.functional.mse_loss(out.float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.inf_at:
            with torch.no_grad():
                self.net[0].weight.grad[0, 0] = math.inf  # still scaled here: the scaler will see it


def _gradscaler_plugin() -> MixedPrecision:
    # precision="16-mixed" silently becomes bf16 on the CPU: the GradScaler path needs the plugin spelled out.
    # A moderate initial scale so that the only overflow is the one the test puts there.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))


@pytest.mark.parametrize(
    ("fused", "clip"),
    [
        (False, ZClip(warmup_steps=2, max_grad_norm=0.5)),
        (True, ZClip(warmup_steps=2, max_grad_norm=0.5)),
        (True, AutoClip(percentile=50.0)),
    ],
    ids=["unscaled-zclip", "fused-zclip", "fused-autoclip"],
)
def test_16_mixed_gradscaler_measures_unscaled_norms_and_counts_overflow(fused: bool, clip: Any) -> None:
    torch.manual_seed(0)
    inf_at = 4
    model = AmpRegressor(fused=fused, inf_at=inf_at)
    pre, post, snaps = NormProbe(), NormProbe(), ParamSnapshots()
    guard = Recorder(
        clip=clip, lr_guard=LRGuard(cooldown=1, recovery_steps=100), exploding=ExplodingDetector(warmup_steps=2)
    )
    trainer(max_steps=8, callbacks=[pre, guard, post, snaps], plugins=[_gradscaler_plugin()]).fit(
        model, regression_data()
    )
    assert torch.float16 in model.autocast_dtypes  # really fp16 autocast
    assert len(guard.measured) == len(pre.steps) == 8
    if fused:
        assert all(s["scale"] > 1.0 for s in pre.steps)  # the gradients GradGuard sees are still scaled
    for step, (ref, got, after) in enumerate(zip(pre.steps, guard.measured, post.steps)):
        if step == inf_at:
            assert math.isinf(got["total"]) and not ref["finite"]
            assert not after["has_nan"], "clipping turned the overflow into NaN"
            continue
        assert ref["finite"], f"unexpected overflow at step {step}"
        for name, value in ref["layers"].items():
            assert got["layers"][name] == pytest.approx(value, rel=1e-5), (step, name)
        assert got["total"] == pytest.approx(_total(ref["layers"]), rel=1e-5)
        # Clipping happens in the unscaled space: what is left is min(norm, threshold), whatever the loss scale.
        assert _total(after["layers"]) == pytest.approx(min(got["total"], got["threshold"]), rel=1e-4)
    assert any(g["coef"] < 1.0 for g in guard.measured), "the clipper never clipped: the test proves nothing"

    summary = guard.summary()
    assert summary["overflow"] == 1 and summary["nonfinite"] == 0 and summary["skipped"] == 0
    assert summary["exploding"] == 0 and summary["lr_reduced"] == 0
    # The overflow step feeds nothing: detectors, clipper and LR guard are as they were before it.
    before, during, later = guard.after_batch[inf_at - 1 : inf_at + 2]
    for part in ("clip", "exploding", "vanishing"):
        a, b = dict(before["optimizers"]["0"][part]), dict(during["optimizers"]["0"][part])
        # AutoClip's host call counter only sizes its buffer (it counts calls, valid or not, to stay sync-free).
        a.pop("calls", None), b.pop("calls", None)
        assert_same_state(a, b, part)
    assert_same_state(before["lr_guard"], during["lr_guard"], "lr_guard")  # not a calm step either
    assert _differs(during["lr_guard"], later["lr_guard"])
    assert _differs(during["optimizers"]["0"]["clip"], later["optimizers"]["0"]["clip"])  # a normal step does feed it
    assert _differs(during["optimizers"]["0"]["exploding"], later["optimizers"]["0"]["exploding"])
    # The scaler skipped the step: parameters unchanged, and finite throughout.
    assert all(torch.equal(a, b) for a, b in zip(snaps.params[inf_at - 1], snaps.params[inf_at]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_16_mixed_fused_optimizer_with_agc_is_refused() -> None:
    model = AmpRegressor(fused=True)
    guard = GradGuard(clip=AGC())
    with pytest.raises(MisconfigurationException, match="AGC.*fused"):
        trainer(max_steps=2, callbacks=[guard], plugins=[_gradscaler_plugin()]).fit(model, regression_data())


# ---------------------------------------------------------------------------------------------------------- bf16-mixed
class NaNRegressor(Regressor):
    """Adam; puts a NaN into one gradient after the backward pass of step ``nan_at``."""

    def __init__(self, nan_at: int) -> None:
        super().__init__(lr=1e-2, optimizer="adam")
        self.nan_at = nan_at
        self.autocast_dtypes: set[torch.dtype] = set()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.autocast_dtypes.add(out.dtype)
        loss = nn.functional.mse_loss(out.float(), y)
        self.losses.append(loss.detach())
        return loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.nan_at:
            with torch.no_grad():
                self.net[2].weight.grad[0, 3] = math.nan


class PoisonedRegressor(Regressor):
    """Its optimizer writes a NaN into the first weight matrix after step ``at``, from finite gradients (what pure
    fp16 Adam does when its eps=1e-8 rounds to 0)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)

        def poison(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.trainer.global_step == self.at:
                with torch.no_grad():
                    self.net[0].weight[0, 0] = math.nan

        optimizer.register_step_post_hook(poison)
        return optimizer


def test_non_finite_weights_are_named_as_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    guard = GradGuard(rollback=None)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer(max_steps=16, callbacks=[guard], log_every_n_steps=4).fit(PoisonedRegressor(at=2), regression_data())
    messages = [str(w.message) for w in caught if "non-finite gradients" in str(w.message)]
    assert len(messages) == 1
    assert "The weights themselves are non-finite now (1 layer holds inf/NaN: 'net.0')" in messages[0]
    summary = guard.summary()
    assert summary["skipped"] == 13 and summary["lr_reduced"] >= 1  # at four in a row
    # The end-of-fit advice about a lower learning rate would mislead: no rate trains NaN weights.
    assert not any("learning rate" in r.getMessage() and "ends at" in r.getMessage() for r in caplog.records)


def test_bf16_mixed_skip_leaves_parameters_and_adam_state_bit_identical() -> None:
    torch.manual_seed(0)
    nan_at = 3
    model = NaNRegressor(nan_at)
    guard = Recorder(on_nonfinite="skip")
    snaps = ParamSnapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(precision="bf16-mixed", max_steps=7, callbacks=[guard, snaps], log_every_n_steps=5).fit(
            model, regression_data()
        )
    assert model.autocast_dtypes == {torch.bfloat16}
    summary = guard.summary()
    assert summary["nonfinite"] == 1 and summary["skipped"] == 1 and summary["overflow"] == 0
    assert any("non-finite gradients in layer 'net.2'" in str(w.message) for w in caught)
    assert not any("weights themselves" in str(w.message) for w in caught)  # one bad gradient, finite weights
    before, during = nan_at - 1, nan_at
    assert all(torch.equal(a, b) for a, b in zip(snaps.params[before], snaps.params[during]))
    state_before, state_during = snaps.opt_state[before], snaps.opt_state[during]
    assert set(state_before) == set(state_during) and state_before
    for i in state_before:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_before[i][key], state_during[i][key]), (i, key)
    # Training goes on: the next step moves every parameter, and nothing became NaN.
    assert all(not torch.equal(a, b) for a, b in zip(snaps.params[during], snaps.params[during + 1]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(loss) for loss in model.losses) and len(model.losses) == 7


# -------------------------------------------------------------------------------------------------------- accumulation
class StepCounter(Callback):
    """Counts real ``optimizer.step`` calls with a step post-hook."""

    def __init__(self) -> None:
        self.count = 0
        self._handles: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(lambda *a: setattr(self, "count", self.count + 1)))


def test_gradient_accumulation_acts_once_per_optimizer_step_on_the_large_batch_gradient() -> None:
    data = regression_data(n=128, batch_size=16)  # 8 micro-batches per epoch -> 2 optimizer steps
    runs = {}
    for name, accumulate, loader in (
        ("accumulated", 4, data),
        ("large_batch", 1, regression_data(n=128, batch_size=64)),
    ):
        torch.manual_seed(0)
        model = Regressor(lr=0.05)
        guard = Recorder(regularizers=[L2(1e-2)], exploding=ExplodingDetector(warmup_steps=2))
        counter = StepCounter()
        trainer(max_epochs=3, accumulate_grad_batches=accumulate, callbacks=[guard, counter]).fit(model, loader)
        runs[name] = (guard, counter, model)

    guard, counter, model = runs["accumulated"]
    big_guard, big_counter, big_model = runs["large_batch"]
    assert counter.count == big_counter.count == 6 == model.trainer.global_step
    st = guard._states[0]
    assert st.steps == len(guard.measured) == 6
    assert st.exploding is not None and st.exploding.state_dict()["count"][0].item() == 6
    assert guard.state_dict()["optimizers"]["0"]["clip"]["count"].item() == 6  # ZClip saw 6 norms
    assert guard.lr_guard is not None and guard.lr_guard.state_dict()["keys"]["0"]["calm"] == 6
    # Lightning divides each micro-batch loss by 4, so the accumulated gradient is the large batch's (regularizer
    # included, added once per optimizer step).
    for acc, big in zip(guard.measured, big_guard.measured, strict=True):
        assert acc["total"] == pytest.approx(big["total"], rel=1e-5)
        for layer, value in big["layers"].items():
            assert acc["layers"][layer] == pytest.approx(value, rel=1e-5)
    for a, b in zip(model.parameters(), big_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- manual optimization
class TinyGAN(L.LightningModule):
    """Manual optimization with two optimizers: D steps every batch, G every second batch.

    At G's step ``spike_at`` its gradients are blown up, so that only G's guard state sees an explosion.
    """

    def __init__(self, spike_at: int = 5) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spike_at = spike_at
        self.g_steps = 0
        self.d_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, noise = batch[0][:, :8], batch[0][:, 8:12]
        opt_d, opt_g = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.g(noise)
        logits_real, logits_fake = self.d(real), self.d(fake.detach())
        loss_d = bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.d_steps += 1
        if batch_idx % 2 == 0:
            logits = self.d(self.g(noise))
            loss_g = bce(logits, torch.ones_like(logits))
            opt_g.zero_grad()
            self.manual_backward(loss_g * (1e4 if self.g_steps == self.spike_at else 1.0))
            opt_g.step()
            self.g_steps += 1

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.d.parameters(), lr=1e-3), torch.optim.SGD(self.g.parameters(), lr=1e-3)]


def test_manual_optimization_two_optimizers_keep_separate_state_and_tags(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = TinyGAN(spike_at=5)
    pre = NormProbe()
    guard = Recorder(
        clip=ZClip(warmup_steps=3),
        lr_guard=LRGuard(patience=1, cooldown=5, recovery_steps=100),
        exploding=ExplodingDetector(warmup_steps=3),
    )
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    # G steps on every second batch: Lightning's step (the batch's) and G's own count of steps (its 6th) are both named.
    with pytest.warns(
        UserWarning, match=r"exploding gradients in layer 'g\.\d' at step 10 \(optimizer 1, its step 6\)"
    ):
        trainer(max_steps=30, max_epochs=-1, callbacks=[pre, guard], logger=logger, log_every_n_steps=6).fit(
            model, regression_data(n=320, dim=16, batch_size=16)
        )
    # 30 optimizer steps in all (manual optimization counts each opt.step): 20 for D, 10 for G.
    assert model.d_steps == 20 and model.g_steps == 10
    d_state, g_state = guard._states[0], guard._states[1]
    assert d_state.steps == 20 and g_state.steps == 10
    assert all(n.startswith("d.") for n in d_state.index.names) and all(n.startswith("g.") for n in g_state.index.names)
    assert d_state.exploding.state_dict()["count"][0].item() == 20
    assert g_state.exploding.state_dict()["count"][0].item() == 10
    # GradGuard measured inside opt.step(): each optimizer's own gradients.
    for ref, got in zip(pre.steps, guard.measured, strict=True):
        for layer, value in ref["layers"].items():
            assert got["layers"][layer] == pytest.approx(value, rel=1e-5)
    # Only G exploded: its LR multiplier is down, D's untouched; the events are G's.
    assert guard.lr_guard.scale(1) < 1.0 and guard.lr_guard.scale(0) == 1.0
    assert g_state.counts[0].item() >= 1 and d_state.counts[0].item() == 0
    assert g_state.host_counts["lr_reduced"] == 1 and d_state.host_counts["lr_reduced"] == 0

    acc = load_events(tmp_path / "version_0")
    tags = set(acc.Tags()["scalars"])
    for key in (0, 1):
        assert f"gradguard/opt{key}/total_norm" in tags and f"gradguard/opt{key}/lr_scale" in tags
    assert "gradguard/total_norm" not in tags
    lr_scales = {key: [e.value for e in acc.Scalars(f"gradguard/opt{key}/lr_scale")] for key in (0, 1)}
    assert min(lr_scales[1]) < 1.0 and set(lr_scales[0]) == {1.0}


# -------------------------------------------------------------------------------------------- Lightning's clipping too
class SlowHead(L.LightningModule):
    """Manual optimization: the body steps on every batch, the head on every 5th."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        body, head = self.optimizers()
        self.manual_backward(nn.functional.mse_loss(self.head(self.body(x)), y))
        body.step()
        body.zero_grad()
        if (batch_idx + 1) % 5 == 0:
            head.step()
            head.zero_grad()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.body.parameters(), lr=0.05), torch.optim.SGD(self.head.parameters(), lr=0.01)]


def test_an_optimizer_logs_its_norm_and_clipping_only_for_windows_in_which_it_stepped() -> None:
    logger = MetricsLogger()
    trainer(max_epochs=1, logger=logger, log_every_n_steps=2, callbacks=[GradGuard()]).fit(
        SlowHead(), regression_data()
    )
    body, head = logger.series("gradguard/opt0/total_norm"), logger.series("gradguard/opt1/total_norm")
    # Logs at batches 2, 4, ..., 16; the head steps at batches 5, 10 and 15: in three windows. Before it stepped its
    # record's initial 0 read as a vanishing gradient, and after, its last norm and clip coefficient were repeated
    # in the windows without a step of its own, flat stretches that read as measurements (user trial, a WGAN-GP).
    assert len(body) == 8 and len(head) == 3 and all(value > 0 for value in body + head)
    assert len(logger.series("gradguard/opt1/clip_coef")) <= 3 and len(logger.series("gradguard/opt0/clip_coef")) > 3
    assert len(logger.series("gradguard/opt1/ema_mean")) <= 3 and len(logger.series("gradguard/opt0/ema_mean")) > 3
    # Nor does its epoch summary count the logs before it stepped.
    assert logger.series("gradguard/opt1/epoch/logs") == [len(head)]
    assert logger.series("gradguard/opt1/epoch/total_norm_p50") == [pytest.approx(float(np.median(head)))]


class PreStepNorms(Callback):
    """The total gradient norm each ``optimizer.step`` really receives (after every clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.norms.append(_total(layer_norms(pl_module, _optimizer_params(opt))))

        trainer.optimizers[0].register_step_pre_hook(hook)


def test_lightning_gradient_clip_val_too_warns_once_and_both_clip() -> None:
    torch.manual_seed(0)
    pre, received = NormProbe(), PreStepNorms()
    guard = Recorder(clip=NormClip(max_norm=2.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, gradient_clip_val=0.5, callbacks=[pre, guard, received]).fit(
            Regressor(), regression_data(n=64)
        )
    twice = [w for w in caught if "clipping happens twice" in str(w.message)]
    assert len(twice) == 1
    assert len(guard.measured) == len(received.norms) == 8
    for ref, got, final in zip(pre.steps, guard.measured, received.norms):
        assert got["total"] == pytest.approx(_total(ref["layers"]), rel=1e-5)  # GradGuard measures before both
        assert final <= 0.5 * (1 + 1e-5)  # Lightning's clip is applied after GradGuard's
    assert any(got["coef"] < 1.0 for got in guard.measured)


# --------------------------------------------------------------------------------------------------- checkpoint resume
def _spiky_data() -> DataLoader:
    """8 batches per epoch; batch 5 has targets 1000x too large, so every epoch has an explosion."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g)
    y[80:96] *= 1000.0
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _resume_guard() -> GradGuard:
    return GradGuard(
        clip=ZClip(warmup_steps=3),
        lr_guard=LRGuard(patience=1, cooldown=1, recovery_steps=20),
        regularizers=[L2(1e-3, adaptive=True)],
        exploding=ExplodingDetector(warmup_steps=3),
        vanishing=VanishingDetector(patience=3),
    )


def test_checkpoint_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Any) -> None:
    torch.manual_seed(0)
    full_model, full_guard = Regressor(lr=1e-2, optimizer="adam"), _resume_guard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[full_guard]).fit(full_model, _spiky_data())

        torch.manual_seed(0)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        first_guard = _resume_guard()
        trainer(max_epochs=1, callbacks=[first_guard, ckpt], enable_checkpointing=True).fit(
            Regressor(lr=1e-2, optimizer="adam"), _spiky_data()
        )
        saved = torch.load(ckpt.last_model_path, weights_only=True)  # plain containers only
        state = saved["callbacks"][first_guard.state_key]
        # The checkpoint is taken while the guard is busy: LR lowered and the regularizer strengthened.
        assert state["lr_guard"]["keys"]["0"]["anchor"] < 1.0 and first_guard.lr_guard.scale(0) < 1.0
        assert state["regularizers"]["l2"]["strength"] > 1.0
        assert first_guard.summary()["exploding"] >= 1 and first_guard.summary()["lr_reduced"] == 1

        torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
        resumed_model, resumed_guard = Regressor(lr=1e-2, optimizer="adam"), _resume_guard()
        resumed_trainer = trainer(
            max_epochs=2, callbacks=[resumed_guard, ModelCheckpoint(dirpath=tmp_path / "b")], enable_checkpointing=True
        )
        resumed_trainer.fit(resumed_model, _spiky_data(), ckpt_path=ckpt.last_model_path)

    assert resumed_trainer.global_step == 16
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(full_guard.state_dict(), resumed_guard.state_dict())
    assert full_guard.summary() == resumed_guard.summary()
    assert full_guard.summary()["lr_reduced"] == 2
    assert resumed_guard.lr_guard.scale(0) == full_guard.lr_guard.scale(0) < 1.0
    assert resumed_guard.regularizers[0].strength == full_guard.regularizers[0].strength > 1.0


class _ResumableBatches:
    """Fixed batches that resume mid-epoch from a checkpoint (Lightning's stateful-loader protocol), so that a resumed
    run sees the batches the uninterrupted one does."""

    def __init__(self, loader: DataLoader) -> None:
        self.batches, self._start, self._done = list(loader), 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self._start = self._start, 0
        for done, batch in enumerate(self.batches[start:], start + 1):
            self._done = done
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"done": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = state["done"] % len(self.batches)


@pytest.mark.skipif(
    tuple(int(part) for part in L.__version__.split(".")[:2]) < (2, 6),
    reason="Lightning before 2.6 resumes these checkpoints with its own batch and step accounting (measured on 2.4:"
    " norms from other batches, logs one step off): no uninterrupted run to compare the summaries with",
)
@pytest.mark.parametrize(
    ("saved_at", "resumable", "again_at"), [(16, True, None), (16, False, None), (10, True, None), (16, True, 18)]
)
def test_a_resumed_runs_epoch_summaries_are_the_uninterrupted_runs(
    tmp_path: Any, saved_at: int, resumable: bool, again_at: int | None
) -> None:
    # Saved on an epoch's last batch (16 of 16), the checkpoint held that epoch's logs, and the resumed run never ran
    # that epoch's end: the next summary counted them again (6 logs for 3, a p90 5x too high). Lightning resumes
    # such a checkpoint at the next epoch with a resumable loader, and replays a plain loader as the same epoch; the
    # epoch saved is closed, unwritten, either way. Saved mid-epoch (10), the epoch goes on from its logs. Saved again
    # (18) by the resumed run before its first log, the closed epoch stays closed in the second resume.
    def fit(ckpt_path: str | None = None, callbacks: tuple[L.Callback, ...] = ()) -> MetricsLogger:
        logger = MetricsLogger()
        guard = GradGuard(diagnostics=["epoch"], log_every_n_steps=5)
        run = trainer(
            max_epochs=-1,
            max_steps=48,
            callbacks=[guard, *callbacks],
            logger=logger,
            log_every_n_steps=5,
            enable_checkpointing=bool(callbacks),
        )
        torch.manual_seed(0)
        data = _ResumableBatches(regression_data()) if resumable else regression_data()
        run.fit(Regressor(), data, ckpt_path=ckpt_path)
        return logger

    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=saved_at, save_top_k=-1)
    full = fit(callbacks=(ckpt,))
    (path,) = (tmp_path / "a").glob(f"*step={saved_at}.ckpt")
    if again_at is not None:
        again = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=again_at, save_top_k=-1)
        fit(ckpt_path=str(path), callbacks=(again,))
        (path,) = (tmp_path / "b").glob(f"*step={again_at}.ckpt")
    resumed = fit(ckpt_path=str(path))
    for tag in ("logs", "total_norm_p50", "total_norm_p90", "total_norm_max"):
        points = full.points(f"gradguard/epoch/{tag}")
        assert [step for step, _ in points] == [15, 31, 47]
        # The epochs that end after the resume point, with the uninterrupted run's values.
        expected = [(step, pytest.approx(value, rel=1e-6)) for step, value in points if step >= (again_at or saved_at)]
        assert resumed.points(f"gradguard/epoch/{tag}") == expected


def test_a_run_resumed_with_a_regularizer_that_is_not_adaptive_keeps_its_configured_weight(tmp_path: Any) -> None:
    # User trial: resumed from an adaptive L2's checkpoint (strength 4.03), a plain L2 of the same name took the
    # strength and trained at 4x its configured weight, silently.
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first_guard = _resume_guard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1, callbacks=[first_guard, ckpt], enable_checkpointing=True).fit(
            Regressor(lr=1e-2, optimizer="adam"), _spiky_data()
        )
    assert first_guard.regularizers[0].strength > 1.0
    plain = L2(1e-3)
    resumed_guard = GradGuard(clip=ZClip(warmup_steps=3), regularizers=[plain])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, callbacks=[resumed_guard]).fit(
            Regressor(lr=1e-2, optimizer="adam"), _spiky_data(), ckpt_path=ckpt.last_model_path
        )
    assert plain.strength == 1.0 and plain.effective_weight == 1e-3
    assert sum("is not adaptive: the saved strength" in str(w.message) for w in caught) == 1


# -------------------------------------------------------------------------------------------------- unusual parameters
class Frozen(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.net.requires_grad_(False)


class Paramless(L.LightningModule):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> None:
        return None


@pytest.mark.parametrize("model_cls", [Frozen, Paramless])
def test_model_without_trainable_parameters_is_refused_at_fit_start(model_cls: type) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "no optimizer" notice
        with pytest.raises(MisconfigurationException, match="GradGuard found no (trainable )?parameters"):
            trainer(max_steps=2, callbacks=[GradGuard()]).fit(model_cls(), regression_data())


class NoOptimizer(Regressor):
    def configure_optimizers(self) -> None:
        return None


def test_a_fit_without_an_optimizer_is_said_once_and_not_refused() -> None:
    model = NoOptimizer()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=[GradGuard()]).fit(model, regression_data())
    said = [str(w.message) for w in caught if "GradGuard" in str(w.message)]
    assert len(said) == 1 and "`configure_optimizers` returned None" in said[0], said
    assert len(model.losses) == 4 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class OutsideParameter(Regressor):
    """An optimizer that also holds a parameter no submodule registers (a tensor made beside the module)."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "loose", nn.Parameter(torch.zeros(16)))  # past nn.Module's registration

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x + self.loose), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([*self.parameters(), self.loose], lr=self.lr)


def test_a_parameter_of_no_submodule_is_named_in_gradguards_words() -> None:
    model = OutsideParameter()
    assert all(p is not model.loose for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=[GradGuard()]).fit(model, regression_data())
    said = [str(w.message) for w in caught if "parameter(s)" in str(w.message)]
    assert said == [
        "GradGuard: optimizer 0 holds 1 parameter(s) that are not the LightningModule's (no submodule registers"
        " them): they are neither measured nor clipped, and a skipped step drops their gradients too. Register them"
        " on the module (e.g. as an `nn.Parameter` attribute) to have them guarded."
    ]
    assert model.loose.abs().sum() > 0  # trained, if not guarded


class EmptyPrompt(Regressor):
    """A soft prompt of 0 tokens: a parameter of the module with no elements, which is no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(0, 16))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(torch.cat([self.prompt, x])), y)


def test_a_parameter_without_elements_is_no_parameter_left_unguarded() -> None:
    model = EmptyPrompt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=4, callbacks=[GradGuard()]).fit(model, regression_data())
    assert not [w for w in caught if "parameter(s)" in str(w.message)]
    engine = GuardEngine(model)
    optimizer = model.configure_optimizers()
    model.training_step(next(iter(regression_data())), 0).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step(optimizer=optimizer)


class Finetune(Regressor):
    """A backbone frozen by ``BackboneFinetuning`` for epoch 0, a head, and a layer that never gets a gradient."""

    def __init__(self) -> None:
        super().__init__(net=nn.Identity())
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_layers_unfrozen_mid_run_join_the_watch_and_unused_layers_stay_silent() -> None:
    torch.manual_seed(0)
    model = Finetune()
    pre = NormProbe()
    guard = Recorder(vanishing=VanishingDetector(patience=2), clip=ZClip(warmup_steps=2))
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=2, callbacks=[finetuning, pre, guard]).fit(model, regression_data(n=64))
    assert not [w for w in caught if "GradGuard" in str(w.message)]  # the unused layer is not "vanishing"
    epoch0, epoch1 = guard.measured[:4], guard.measured[4:]
    assert len(epoch1) == 4
    assert all("backbone.0" not in m["layers"] for m in epoch0)
    assert guard._states[0].index.names == ["backbone.0", "head", "unused"]
    assert guard._states[0].steps == 8  # counters survive the rebuild
    for ref, got in zip(pre.steps[4:], epoch1):
        assert got["present"]["backbone.0"] and not got["present"]["unused"]
        assert got["layers"]["unused"] == 0.0
        assert got["layers"]["backbone.0"] > 0
        for layer, value in ref["layers"].items():
            assert got["layers"][layer] == pytest.approx(value, rel=1e-5)
    assert guard.summary()["vanishing"] == 0


class AfterGuard(Callback):
    """Placed after GradGuard: each step's backbone weight and its gradient as the optimizer gets it."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        weight = pl_module.backbone[0].weight
        grad = None if weight.grad is None else weight.grad.detach().clone()
        self.steps.append((weight.detach().clone(), grad))


def test_a_backbone_unfrozen_mid_run_is_regularized_from_then_on() -> None:
    def run(regularizers: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        torch.manual_seed(0)
        after = AfterGuard()
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
        guard = GradGuard(regularizers=regularizers, clip=None)
        trainer(max_epochs=2, callbacks=[finetuning, guard, after]).fit(Finetune(), regression_data(n=64))
        return after.steps

    # Only the backbone is regularized: up to its first trained step both runs are the same.
    regularized, plain = run([L2(0.5, modules=r"^backbone")]), run([])
    assert len(regularized) == 8 and all(grad is None for _, grad in regularized[:4])
    assert all(torch.equal(regularized[0][0], weight) for weight, _ in regularized[:4])  # frozen: not pulled
    (weight, grad), (same_weight, loss_grad) = regularized[4], plain[4]
    assert torch.equal(weight, same_weight) and grad is not None and loss_grad is not None
    probe = nn.Linear(16, 32)
    with torch.no_grad():
        probe.weight.copy_(weight)
    reg = L2(0.5)
    reg.bind(probe)
    (term,) = torch.autograd.grad(reg.penalty(), [probe.weight])
    torch.testing.assert_close(grad, loss_grad + term)


def test_layers_frozen_mid_run_with_gradients_zeroed_in_place_are_absent_not_vanishing() -> None:
    class FrozenLater(Regressor):
        """Freezes the first layer at step 10; gradients are zeroed in place, so it keeps a zero ``.grad``."""

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
            optimizer.zero_grad(set_to_none=False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 10:
                self.net[0].requires_grad_(False)
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    guard = Recorder(vanishing=VanishingDetector(patience=5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=30, max_epochs=-1, callbacks=[guard]).fit(FrozenLater(), regression_data())
    assert not [w for w in caught if "vanishing" in str(w.message)]
    assert guard.summary()["vanishing"] == 0
    after = guard.measured[10:]
    assert after and all(not m["present"]["net.0"] and m["present"]["net.2"] for m in after)
    assert all(m["layers"]["net.2"] > 0 for m in after)


class SparseBag(L.LightningModule):
    """An ``nn.Embedding(sparse=True)`` trained by ``SparseAdam``: every gradient is a sparse COO tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.register_buffer("readout", torch.randn(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        idx = (x[:, :6].abs() * 7).long() % 50  # repeated indices: the raw gradient is not coalesced
        return nn.functional.mse_loss(self.emb(idx).sum(1) @ self.readout, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize(
    "clip",
    [NormClip(max_norm=0.5), ZClip(warmup_steps=2, max_grad_norm=0.5), AutoClip(percentile=10.0)],
    ids=["normclip", "zclip", "autoclip"],
)
def test_sparse_gradients_are_measured_on_coalesced_values_and_clipped(clip: Any) -> None:
    torch.manual_seed(0)
    model = SparseBag()
    pre, post = NormProbe(), NormProbe()
    guard = Recorder(clip=clip)
    trainer(max_steps=6, callbacks=[pre, guard, post]).fit(model, regression_data())
    assert len(guard.measured) == 6
    for ref, got, after in zip(pre.steps, guard.measured, post.steps):
        assert got["layers"]["emb"] == pytest.approx(ref["layers"]["emb"], rel=1e-5)
        assert after["layers"]["emb"] == pytest.approx(min(got["total"], got["threshold"]), rel=1e-4)
    assert any(g["coef"] < 1.0 for g in guard.measured)
    assert model.emb.weight.grad is None or model.emb.weight.grad.is_sparse
    assert torch.isfinite(model.emb.weight).all()


class DenseGrads(Callback):
    """Records the embedding's weight and its gradient in dense form, each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        weight = pl_module.emb.weight
        self.steps.append((weight.detach().clone(), weight.grad.to_dense()))


def test_sparse_gradients_are_clipped_by_agc_as_their_dense_form() -> None:
    # Each held row of the embedding is a unit, clipped against its own weights; a repeated row adds up first.
    torch.manual_seed(0)
    model = SparseBag()
    pre, post = DenseGrads(), DenseGrads()
    trainer(max_steps=6, callbacks=[pre, GradGuard(clip=AGC(clip_factor=0.01)), post]).fit(model, regression_data())
    assert len(pre.steps) == len(post.steps) == 6
    clipped = 0
    for (weight, grad), (_, after) in zip(pre.steps, post.steps):
        reference = grad.clone()
        AGC(clip_factor=0.01).clip_grads_([reference], torch.tensor(1.0), torch.tensor(True), params=[weight])
        torch.testing.assert_close(after, reference)
        clipped += int(not torch.equal(after, grad))
    assert clipped > 0  # the factor is small enough that AGC clipped
    assert model.emb.weight.grad is None or model.emb.weight.grad.is_sparse


class SparseNaN(SparseBag):
    def on_after_backward(self) -> None:
        if self.trainer.global_step == 2:
            self.emb.weight.grad._values()[0, 0] = math.nan  # a value that is stored: it reaches the optimizer


def test_sparse_gradient_nan_is_zeroed_and_histogrammed(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = SparseNaN()
    guard = GradGuard(on_nonfinite="zero", histogram_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    with pytest.warns(UserWarning, match="non-finite gradients in layer 'emb'"):
        trainer(max_steps=4, callbacks=[guard], logger=logger, log_every_n_steps=2).fit(model, regression_data())
    assert guard.summary()["nonfinite"] == 1
    assert torch.isfinite(model.emb.weight).all()
    assert any(t.startswith("gradguard/grad_hist/") for t in _event_tags(tmp_path))


class PaddedBag(L.LightningModule):
    """A sparse ``nn.EmbeddingBag`` whose every other batch holds padding ids alone: its gradient then stores no
    entries (values of shape ``(0, 8)``), beside a dense head's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 8, mode="sum", sparse=True, padding_idx=0)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        idx = 1 + (x[:, :6].abs() * 7).long() % 49
        if batch_idx % 2:
            idx = torch.zeros_like(idx)
        return nn.functional.mse_loss(self.head(self.emb(idx)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("clip", ["default", NormClip(max_norm=0.5, norm_type=math.inf)], ids=["default", "inf_norm"])
def test_a_sparse_gradient_with_no_entries_is_measured_as_zero(clip: Any, tmp_path: Any) -> None:
    # The largest entry of none raised (torch's infinity norm of an empty tensor has no identity): a recommender's fit
    # died at its first logging step whose batch was padding alone, and a max-norm clipper at its first such step.
    torch.manual_seed(0)
    guard = Recorder() if clip == "default" else Recorder(clip=clip)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer(max_steps=8, callbacks=[guard], logger=logger, log_every_n_steps=1).fit(PaddedBag(), regression_data())
    assert len(guard.measured) == 8
    assert [m["layers"]["emb"] == 0.0 for m in guard.measured] == [False, True] * 4
    assert guard.summary()["vanishing"] == 0 and guard.summary()["nonfinite"] == 0
    # The padding batches' gradient is all zeros: fraction 1; the others store some of the table's rows.
    (path,) = event_files(tmp_path)
    fractions = [event.value for event in load_events(path).Scalars("gradguard/zero_fraction/emb")]
    assert len(fractions) == 8 and [f == 1.0 for f in fractions] == [False, True] * 4


class ComplexModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 4, dtype=torch.complex64) * 0.3)
        self.out = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.out((x.to(torch.complex64) @ self.w).abs()), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_complex_parameters_have_the_modulus_norm() -> None:
    torch.manual_seed(0)
    model = ComplexModel()
    pre, post = NormProbe(), NormProbe()
    guard = Recorder(clip=NormClip(max_norm=0.5))
    trainer(max_steps=4, callbacks=[pre, guard, post]).fit(model, regression_data())
    for ref, got, after in zip(pre.steps, guard.measured, post.steps, strict=True):
        # sqrt(sum |z|^2), i.e. the norm of the real and imaginary parts together
        z = ref["layers"][""]
        assert got["layers"]["w"] == pytest.approx(z, rel=1e-5)
        assert got["total"] == pytest.approx(math.hypot(z, ref["layers"]["out"]), rel=1e-5)
        assert _total(after["layers"]) == pytest.approx(min(got["total"], 0.5), rel=1e-4)
    assert torch.isfinite(torch.view_as_real(model.w)).all()


class ManyTensors(L.LightningModule):
    """5,000 parameter tensors in 1,250 layers, half fp32 and half fp64."""

    def __init__(self) -> None:
        super().__init__()
        self.cells = nn.ModuleList(
            nn.ParameterDict(
                {
                    "a": nn.Parameter(torch.randn(3)),
                    "b": nn.Parameter(torch.randn(1)),
                    "c": nn.Parameter(torch.randn(2, dtype=torch.float64)),
                    "d": nn.Parameter(torch.randn(1, dtype=torch.float64)),
                }
            )
            for _ in range(1250)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        a = torch.stack([c["a"] for c in self.cells]).sum(0) + torch.stack([c["b"] for c in self.cells]).sum()
        c = torch.stack([c["c"] for c in self.cells]).sum(0) + torch.stack([c["d"] for c in self.cells]).sum()
        pred = x[:, :3] @ a / 1250 + (x[:, 3:5].double() @ c).float() / 1250
        return nn.functional.mse_loss(pred.unsqueeze(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountingGuard(Recorder):
    """Counts ``torch._foreach_norm`` calls made inside GradGuard's per-step hook."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm_calls: list[int] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        calls = []
        original = torch._foreach_norm

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(len(args[0]))
            return original(*args, **kwargs)

        torch._foreach_norm = counting
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            torch._foreach_norm = original
        self.norm_calls.append(len(calls))
        self.tensors_per_call = calls


def test_five_thousand_parameter_tensors_take_one_norm_call_per_dtype() -> None:
    torch.manual_seed(0)
    model = ManyTensors()
    assert sum(1 for _ in model.parameters()) == 5000
    pre = NormProbe()
    guard = CountingGuard(vanishing=None, clip=ZClip(warmup_steps=2))
    trainer(max_steps=3, callbacks=[pre, guard]).fit(model, regression_data())
    assert guard.norm_calls == [2, 2, 2]  # one fp32 group, one fp64 group
    assert sorted(guard.tensors_per_call) == [2500, 2500]
    assert len(guard._states[0].index.names) == 1250
    ref, got = pre.steps[-1], guard.measured[-1]
    for layer, value in ref["layers"].items():
        assert got["layers"][layer] == pytest.approx(value, rel=1e-5)


# ----------------------------------------------------------------------------------------------- runs without training
class EvalRegressor(Regressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


@pytest.mark.parametrize("kind", ["fast_dev_run", "limit_0", "limit_3", "validate", "predict"])
def test_runs_without_regular_training(tmp_path: Any, kind: str) -> None:
    torch.manual_seed(0)
    guard = GradGuard()
    model = EvalRegressor()
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    data = regression_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "fast_dev_run":
            trainer(fast_dev_run=True, callbacks=[guard], logger=logger).fit(model, data, data)
        elif kind == "limit_0":
            trainer(limit_train_batches=0, callbacks=[guard], logger=logger).fit(model, data, data)
        elif kind == "limit_3":
            trainer(
                limit_train_batches=3, limit_val_batches=2, callbacks=[guard], logger=logger, log_every_n_steps=50
            ).fit(model, data, data)
        elif kind == "validate":
            trainer(callbacks=[guard], logger=logger).validate(model, data)
        else:
            predictions = trainer(callbacks=[guard], logger=logger).predict(model, data)
            assert len(predictions) == 16
    tags = _event_tags(tmp_path)
    gg_tags = [t for t in tags if t.startswith("gradguard/")]
    if kind == "limit_3":
        # One optimizer step per batch; the partial logging window is flushed when training ends.
        assert guard._states[0].steps == 3
        acc = load_events(tmp_path / "version_0")
        assert [e.step for e in acc.Scalars("gradguard/total_norm")] == [3 - 1]  # Lightning's step of step 3
    elif kind == "fast_dev_run":
        assert guard._states[0].steps == 1  # it ran; fast_dev_run swaps in a dummy logger, so nothing is written
        assert gg_tags == []
    else:
        assert guard._states == {} and gg_tags == []
        assert guard.summary() == dict.fromkeys(guard.summary(), 0)
    if kind == "validate":
        assert "val_loss" in tags  # the logger did write: just nothing of GradGuard's


class HugeGradientRegressor(Regressor):
    """Multiplies one step's loss by ``factor``: finite gradients whose norm lies beyond the float32 range."""

    def __init__(self, at: int, factor: float) -> None:
        super().__init__(lr=0.01)
        self.at, self.factor = at, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.trainer.global_step == self.at else loss


def test_a_finite_gradient_beyond_the_float32_range_is_skipped_not_applied() -> None:
    # Under 64-true the gradients of 1e25 times the loss stay finite, but their squared norm overflows float32, which
    # no clipper can scale by. Before, the step went through unclipped and uncounted, and wrecked the weights.
    torch.manual_seed(0)
    model = HugeGradientRegressor(at=6, factor=1e25)
    snaps = ParamSnapshots()
    guard = GradGuard()
    # The warning says why finite gradients count as non-finite (it read as if an inf/NaN had to be found).
    with pytest.warns(UserWarning, match="non-finite gradients.*or when its norm is above about 1.8e19"):
        trainer(precision="64-true", max_steps=12, callbacks=[guard, snaps]).fit(model, regression_data())
    assert all(torch.equal(a, b) for a, b in zip(snaps.params[5], snaps.params[6]))  # the step was skipped
    summary = guard.summary()
    assert summary["nonfinite"] == 1 and summary["skipped"] == 1 and summary["lr_reduced"] == 0
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in model.parameters())


class _Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., 2019) written as most implementations are: a subclass that never runs
    ``Optimizer.__init__`` (so it has no step hooks of its own) and keeps the optimizer it wraps as ``optimizer``
    (lonePatient's, torch_optimizer's) or ``_base_optimizer`` (timm's)."""

    def __init__(self, base: torch.optim.Optimizer, attribute: str, k: int = 5, alpha: float = 0.5) -> None:
        setattr(self, attribute, base)
        self.base, self.k, self.alpha, self.steps = base, k, alpha, 0
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state: dict[Any, Any] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self.base.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self.state.setdefault(p, p.detach().clone())
                    slow += self.alpha * (p - slow)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)


@pytest.mark.parametrize("attribute", ["optimizer", "_base_optimizer"])
def test_a_lookahead_wrapper_without_hooks_of_its_own_is_guarded_through_the_optimizer_it_wraps(
    attribute: str,
) -> None:
    rates: list[float] = []

    class Looking(NaNAtSteps):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _Lookahead(torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9), attribute)

    class Rates(Callback):
        """After the guard: a hook on the wrapped optimizer, after the LR guard's, reads the rate it steps with."""

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            inner = trainer.optimizers[0].base
            inner.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))

    torch.manual_seed(0)
    model = Looking(10)
    guard = GradGuard(lr_guard=LRGuard(nonfinite_patience=1, cooldown=50))
    # It raised AttributeError ('_optimizer_step_pre_hooks') in on_train_start, with or without the LR guard.
    trainer(max_steps=30, max_epochs=-1, callbacks=[guard, Rates()]).fit(model, regression_data())
    summary = guard.summary()
    assert summary["nonfinite"] == 1 and summary["skipped"] == 1 and summary["lr_reduced"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The cut reaches the rate the wrapped optimizer steps with; outside its steps the scheduled rate is back.
    assert rates[:10] == [0.05] * 10 and max(rates[12:]) == pytest.approx(0.025)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 0.05


class _SharpnessAware(torch.optim.Optimizer):
    """Sharpness-aware minimization (Foret et al., 2021) as it is usually written: a full ``Optimizer`` (its own
    ``__init__``, step hooks and ``state``) built on a base optimizer that shares its param groups
    (``base_optimizer``), whose ``step(closure)`` evaluates twice: at the weights, then at the weights moved ``rho``
    up the gradient; the base optimizer steps with the second gradient from the first weights."""

    def __init__(self, params: Any, rho: float = 0.05, **sgd: Any) -> None:
        super().__init__(params, {"rho": rho})
        self.base_optimizer = torch.optim.SGD(self.param_groups, **sgd)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:  # the guard dropped the step's gradients: no ascent, no step
            return loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        ascent = [p.grad * (self.param_groups[0]["rho"] / (norm + 1e-12)) for p in params]
        for p, e in zip(params, ascent):
            self.state[p]["ascent"] = e  # the helper state such optimizers keep of their own
            p.add_(e)
        self.zero_grad()
        with torch.enable_grad():
            closure()
        for p, e in zip(params, ascent):
            p.sub_(e)
        self.base_optimizer.step()
        return loss


def _tanh_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


class _AfterRestarts(Callback):
    """Calls ``read(trainer)`` on the batch after each restart of ``guard``'s run and keeps what it returns."""

    def __init__(self, guard: GradGuard, read: Any) -> None:
        self.guard, self.read, self.restarts, self.seen = guard, read, 0, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        restarts = self.guard.summary()["rolled_back"]
        if restarts > self.restarts:
            self.restarts = restarts
            self.seen.append(self.read(trainer))


def _momentum(optimizer: torch.optim.Optimizer) -> float:
    buffers = [s["momentum_buffer"] for s in optimizer.state.values() if "momentum_buffer" in s]
    return float(sum(b.square().sum() for b in buffers)) ** 0.5


def test_a_sharpness_aware_optimizer_is_restarted_with_its_base_optimizers_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # At a rate far too high, the early restart put the initial weights back but kept the base SGD's momentum, which
    # the blow-up had made (norms of 80-5000 after each restart, in a user trial): each restart blew up again, and
    # the run ended at a loss of 3622. The momentum lives in the base optimizer's state, not in the SAM's own. (The
    # rate the restarts end at is a separate matter: this run ends finite, not yet trained.)
    class Sharp(Regressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _SharpnessAware(self.parameters(), lr=1.5, momentum=0.9)

    torch.manual_seed(0)
    model = Sharp(net=_tanh_net())
    guard = GradGuard()
    watch = _AfterRestarts(guard, lambda trainer: _momentum(trainer.optimizers[0].base_optimizer))
    with caplog.at_level(logging.INFO):
        trainer(max_steps=150, max_epochs=-1, callbacks=[guard, watch]).fit(model, regression_data(n=512))
    assert guard.summary()["rolled_back"] >= 1 and watch.seen == [0.0] * len(watch.seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Its base optimizer steps the weights, and SGD's steps grow with the gradient: the rescue clipper is put to work.
    assert "restarted from its initial weights, with AGC" in caplog.text
    # A clipper set from the start is left off a SAM: the advice is the rate alone.
    assert "To train this setup again, lower the learning rate (a clipper given to GradGuard" in caplog.text
    assert "GradGuard(clip=AGC" not in caplog.text


def test_an_sgd_that_follows_a_sam_on_the_same_model_is_clipped() -> None:
    # The same model and guard, fitted with a SAM and then with SGD (another `configure_optimizers`): the SGD kept
    # the SAM's engine, which clips nothing, and a spike was skipped instead of clipped.
    class Switching(Regressor):
        sam = True

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * (1e3 if not self.sam and self.trainer.global_step == 30 else 1.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.sam:
                return _SharpnessAware(self.parameters(), lr=0.05, momentum=0.9)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    model, guard = Switching(net=_tanh_net()), GradGuard()
    trainer(max_steps=10, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    before = guard.summary()
    model.sam = False
    trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    after = guard.summary()
    assert after["exploding"] > before["exploding"]
    assert after["clipped"] > before["clipped"] and after["skipped"] == before["skipped"]


def test_an_lbfgs_that_follows_an_sgd_on_the_same_model_is_not_clipped() -> None:
    # The other way round: the LBFGS kept the SGD's engine, whose clipper clipped its first evaluation of a spike
    # (bending its curvature estimate) where a fresh guard skips the step.
    class Switching(Regressor):
        lbfgs = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * (1e3 if self.lbfgs and self.trainer.global_step == 0 else 1.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.lbfgs:
                return torch.optim.LBFGS(self.parameters(), lr=0.05, max_iter=2)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    model, guard = Switching(net=_tanh_net()), GradGuard()
    trainer(max_steps=40, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    before = guard.summary()
    model.lbfgs = True
    trainer(max_steps=3, max_epochs=-1, callbacks=[guard]).fit(model, regression_data(n=512))
    after = guard.summary()
    assert after["exploding"] > before["exploding"]
    assert after["clipped"] == before["clipped"] and after["skipped"] == before["skipped"] + 1


def test_the_state_of_an_optimizer_built_on_a_base_optimizer_is_both_optimizers() -> None:
    from lightning_gradguard._compat import shards_state, state_holders, state_optimizer

    sam = _SharpnessAware([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9)
    assert state_holders(sam) == [("", sam), ("base_optimizer.", sam.base_optimizer)]
    assert state_optimizer(sam) is sam and not shards_state(sam)
    # The same group dicts in a list of the SAM's own are the same groups.
    sam.param_groups = list(sam.base_optimizer.param_groups)
    assert state_holders(sam) == [("", sam), ("base_optimizer.", sam.base_optimizer)]
    # A base optimizer of other parameters is another optimizer's business.
    sam.base_optimizer = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    assert state_holders(sam) == [("", sam)]


def test_a_copy_holds_and_counts_both_states_and_keeps_keys_that_are_not_strings() -> None:
    from lightning_gradguard.rollback import _nbytes, _Slot

    weight = torch.nn.Parameter(torch.ones(4))
    sam = _SharpnessAware([weight], lr=0.1, momentum=0.9)
    sam.state[weight]["ascent"] = torch.zeros(4)
    sam.base_optimizer.state[weight]["momentum_buffer"] = torch.full((4,), 0.5)
    sam.state[weight][0] = torch.ones(4)  # a key that is no string (a user's optimizer)
    assert _nbytes([weight], sam) == 4 * 4 * 4  # the weight, two entries of the SAM's own, the base's momentum
    slot = _Slot()
    slot.take([weight], sam, step=1, extra=None)
    sam.state[weight].clear()
    sam.base_optimizer.state[weight]["momentum_buffer"].fill_(9.0)
    slot.restore(sam)
    assert set(sam.state[weight]) == {"ascent", 0}
    assert sam.base_optimizer.state[weight]["momentum_buffer"].tolist() == [0.5] * 4


class _SlowWeights(torch.optim.Optimizer):
    """Lookahead written as a full ``Optimizer`` (its own ``__init__`` and ``state``, the slow weights) over a base
    optimizer that shares its param groups (``optimizer``)."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        super().__init__(base.param_groups, {"k": k, "alpha": alpha})
        self.optimizer, self.param_groups, self.k, self.alpha, self.steps = base, base.param_groups, k, alpha, 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for p in (p for group in self.param_groups for p in group["params"]):
                slow = self.state[p].setdefault("slow", p.detach().clone())
                slow += self.alpha * (p - slow)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def test_a_restart_puts_back_the_state_of_an_optimizer_and_of_its_base_optimizer() -> None:
    # At a rate far too high. Restoring only the base's state left the slow weights blown up, and the next sync pulled
    # the restarted weights halfway back to them (held-out 3604 / 59.2 / 13240 on three seeds of a review's run);
    # restoring only the outer's left the momentum (4.30 / 15.8 / 7.67). Now both, with the rescue clipper, as the
    # base optimizer is SGD: 0.14 / 0.16 / 0.16.
    class Slow(Regressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _SlowWeights(torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.9))

    torch.manual_seed(0)
    model = Slow(net=_tanh_net())
    guard = GradGuard()
    watch = _AfterRestarts(
        guard, lambda trainer: (_momentum(trainer.optimizers[0].optimizer), len(trainer.optimizers[0].state))
    )
    trainer(max_steps=200, max_epochs=-1, callbacks=[guard, watch]).fit(model, regression_data(n=512))
    # Back to the initial copy: no momentum, no slow weights (both optimizers start afresh).
    assert guard.summary()["rolled_back"] >= 1 and watch.seen == [(0.0, 0)] * len(watch.seen)
    x, y = next(iter(regression_data(n=512, batch_size=512)))
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), y) < 0.15 * y.var()


class PerSampleGradients(Regressor):
    """DP-SGD written by hand: per-sample gradients with ``torch.func.vmap(grad(...))`` over the model's own modules,
    each clipped to norm 1 and averaged (no noise: deterministic), set as ``.grad`` (manual optimization) or written
    over the loss's gradients in ``on_after_backward`` (automatic)."""

    def __init__(self, manual: bool) -> None:
        super().__init__(net=_tanh_net())
        self.automatic_optimization = not manual

    def _private_grads(self, batch: Any) -> list[torch.Tensor]:
        x, y = batch
        params = {name: p.detach() for name, p in self.named_parameters()}

        def loss(weights: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(self, weights, (xi.unsqueeze(0),))
            return nn.functional.mse_loss(out, yi.unsqueeze(0))

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        flat = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)
        scale = (1.0 / flat.norm(dim=1).clamp_min(1.0)).view(-1)
        return [(g * scale.view(-1, *[1] * (g.dim() - 1))).mean(0) for g in per_sample.values()]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.automatic_optimization:
            self._batch = batch
            return super().training_step(batch, batch_idx)
        opt = self.optimizers()
        for p, g in zip(self.parameters(), self._private_grads(batch)):
            p.grad = g
        opt.step()
        opt.zero_grad()
        return None

    def on_after_backward(self) -> None:
        if self.automatic_optimization:
            for p, g in zip(self.parameters(), self._private_grads(self._batch)):
                p.grad = g


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "automatic"])
def test_per_sample_gradients_taken_with_vmap_do_not_stop_the_fit(manual: bool) -> None:
    # The activation hooks kept the outputs of the vmapped forward passes, which cannot leave the transform: the
    # fit died at its first logging step ("tensor may have escaped from inside a function being vmapped").
    torch.manual_seed(0)
    model, guard = PerSampleGradients(manual), GradGuard()
    trainer(max_steps=6, max_epochs=-1, callbacks=[guard], log_every_n_steps=2).fit(model, regression_data())
    assert guard.summary()["nonfinite"] == 0 and model.trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
