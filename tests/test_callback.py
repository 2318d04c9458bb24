"""GradGuard on real Trainer.fit runs: measurement, detection, logging, and the no-sync rule."""

from __future__ import annotations

import csv
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import ExplodingDetector, GradGuard, VanishingDetector, ZClip
from tests.helpers import MetricsLogger, SyncRecorder, event_files, load_events
from tests.models import Regressor, regression_data, trainer


class TiedFrozenMixed(nn.Module):
    """Tied weights, a frozen layer, a layer without gradient, and fp64 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.out.weight = self.inp.weight  # tied
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(16, 4)
        self.wide = nn.Linear(16, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = self.frozen(self.out(h))
        return self.wide(h.double()).float()


class ReferenceNorms(Regressor):
    """Computes per-module reference norms in its own on_before_optimizer_step (runs after the callbacks)."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        seen: set[int] = set()
        ref = {}
        for name, module in self.named_modules():
            grads = []
            for p in module.parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.grad is not None:
                    grads.append(p.grad.double().flatten())
            if grads:
                ref[name] = torch.linalg.vector_norm(torch.cat(grads)).item()
        self.reference = ref


def test_norms_match_naive_reference_in_fit() -> None:
    torch.manual_seed(0)
    model = ReferenceNorms(net=TiedFrozenMixed())
    guard = GradGuard(clip=None, lr_guard=None)
    trainer(max_steps=7, callbacks=[guard]).fit(model, regression_data())
    st = guard._states[0]
    got = dict(zip(st.index.names, st.layer_last.tolist()))
    assert set(model.reference) == {"net.inp", "net.mid", "net.out", "net.wide"}  # net.out: its own bias
    for name, value in model.reference.items():
        assert got[name] == pytest.approx(value, rel=1e-6)
    assert got["net.unused"] == 0.0 and got["net.frozen"] == 0.0
    total = math.sqrt(sum(v * v for v in model.reference.values()))
    assert st.scalars[0].item() == pytest.approx(total, rel=1e-6)


def _deep_sigmoid(depth: int = 12, width: int = 32) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def test_deep_sigmoid_network_is_reported_as_vanishing_earliest_layers_first() -> None:
    torch.manual_seed(0)
    guard = GradGuard(clip=None, lr_guard=None, vanishing=VanishingDetector(patience=5))
    model = Regressor(net=_deep_sigmoid())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=20, callbacks=[guard], log_every_n_steps=10).fit(model, regression_data())
    messages = [str(w.message) for w in caught if "vanishing gradients" in str(w.message)]
    assert messages, "no vanishing warning"
    assert "layer 'net.0'" in messages[0] and "step" in messages[0]
    assert guard.summary()["vanishing"] >= 1
    vanishing_layers = [m.split("layer '")[1].split("'")[0] for m in messages]
    assert "net.22" not in vanishing_layers  # the output layer has healthy gradients
    assert guard.summary()["exploding"] == 0


def test_unstable_model_is_reported_as_exploding() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)  # large init
    model = Regressor(net=net, lr=0.3)  # too-high LR
    guard = GradGuard(clip=None, lr_guard=None, exploding=ExplodingDetector(warmup_steps=10), on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=4, callbacks=[guard]).fit(model, regression_data())
    assert guard.summary()["exploding"] >= 1
    assert any("exploding gradients in layer" in str(w.message) for w in caught)


def test_healthy_mlp_has_no_events_in_200_steps() -> None:
    torch.manual_seed(0)
    guard = GradGuard()
    model = Regressor(optimizer="adam", lr=1e-3)
    trainer(max_steps=200, max_epochs=-1, callbacks=[guard]).fit(model, regression_data())
    summary = guard.summary()
    assert summary.pop("clipped") < 20  # ZClip trims the odd step of a healthy run; nothing else happens
    assert summary == dict.fromkeys(summary, 0)
    assert model.losses[-1] < model.losses[0]


class RecordingGuard(GradGuard):
    """Runs every hook under a recorder and files what it saw under logging / non-logging steps."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.quiet_calls: list[tuple[int, str, str]] = []
        self.logging_calls: list[str] = []
        self.logging_steps: list[int] = []

    def _run(self, hook: str, logging_step: bool, trainer: Any, fn: Any) -> Any:
        with SyncRecorder() as recorder:
            out = fn()
        sink = recorder.calls
        if logging_step:
            self.logging_calls += sink
        else:
            self.quiet_calls += [(trainer.global_step, hook, s) for s in sink]
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        return self._run(
            "on_train_batch_start",
            False,
            trainer,
            lambda: super(RecordingGuard, self).on_train_batch_start(trainer, pl_module, batch, batch_idx),
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001, ANN201
        return self._run(
            "on_before_optimizer_step",
            False,
            trainer,
            lambda: super(RecordingGuard, self).on_before_optimizer_step(trainer, pl_module, optimizer),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        logging_step = trainer.global_step >= self._next_log_step
        if logging_step:
            self.logging_steps.append(trainer.global_step)
        return self._run(
            "on_train_batch_end",
            logging_step,
            trainer,
            lambda: super(RecordingGuard, self).on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx),
        )


def test_recorder_catches_a_sync() -> None:
    with SyncRecorder() as recorder:
        torch.ones(1).item()
        bool(torch.ones(1))
    assert recorder.calls == ["item", "__bool__"]


@pytest.mark.parametrize("clip", ["default", None])
def test_no_host_sync_on_steps_that_do_not_log(tmp_path: Any, clip: Any) -> None:
    torch.manual_seed(0)
    guard = RecordingGuard(clip=clip, on_nonfinite="zero", histogram_every_n_steps=10)
    logger = TensorBoardLogger(tmp_path)
    trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=10).fit(
        Regressor(optimizer="adam", lr=1e-3), regression_data()
    )
    assert guard.logging_steps == [10, 20, 30]
    assert guard.logging_calls, "the logging step must have copied to the host (the recorder must see it)"
    assert guard.quiet_calls == []


def _scalars(logdir: Any) -> EventAccumulator:
    assert event_files(logdir)
    return load_events(logdir / "lightning_logs" / "version_0")


def test_tensorboard_tags(tmp_path: Any) -> None:
    torch.manual_seed(0)
    guard = GradGuard()
    logger = TensorBoardLogger(tmp_path)
    trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
        Regressor(), regression_data()
    )
    acc = _scalars(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for tag in [
        "gradguard/total_norm",
        "gradguard/total_norm_max",
        "gradguard/clip_threshold",
        "gradguard/clip_coef",
        "gradguard/lr_scale",
        "gradguard/ema_mean",
        "gradguard/layer/net.0",
        "gradguard/layer/net.2",
        *(
            f"gradguard/events/{k}"
            for k in ("exploding", "vanishing", "nonfinite", "skipped", "overflow", "lr_reduced", "clipped")
        ),
    ]:
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars("gradguard/total_norm")]
    assert steps == [n - 1 for n in (5, 10, 15, 20, 25, 30)]  # Lightning's step of the 5th, 10th, ... optimizer step
    maxes = [e.value for e in acc.Scalars("gradguard/total_norm_max")]
    lasts = [e.value for e in acc.Scalars("gradguard/total_norm")]
    assert all(m >= v - 1e-6 for m, v in zip(maxes, lasts))


def test_csv_logger_gets_the_summary_scalars(tmp_path: Any) -> None:
    guard = GradGuard()
    logger = CSVLogger(tmp_path)
    trainer(max_steps=10, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(Regressor(), regression_data())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"gradguard/total_norm", "gradguard/clip_coef", "gradguard/events/exploding"} <= set(rows[0])
    values = [float(r["gradguard/total_norm"]) for r in rows if r.get("gradguard/total_norm")]
    assert len(values) == 2 and all(v > 0 for v in values)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_nonfinite": "ignore"},
        {"on_exploding": "stop"},
        {"on_vanishing": None},
        {"log_every_n_steps": 0},
        {"image_every_n_steps": -5},
        {"histogram_every_n_steps": 1.5},
        {"max_warnings": -1},
        {"clip": "zclip"},
        {"lr_guard": 0.5},
        {"exploding": VanishingDetector()},
        {"vanishing": ExplodingDetector()},
        {"regularizers": ["l2"]},
        {"compile": "cuda"},
        # A "raise" without its detector could never fire.
        {"on_exploding": "raise", "exploding": None},
        {"on_vanishing": "raise", "vanishing": None},
        {"on_diverging": "raise", "divergence": None},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GradGuard(**kwargs)


def test_a_mode_other_than_raise_needs_no_detector() -> None:
    guard = GradGuard(on_exploding="ignore", exploding=None, on_vanishing="warn", vanishing=None, divergence=None)
    assert guard.exploding is None and guard.vanishing is None and guard.divergence is None


class SpikeAt(Regressor):
    """Multiplies the loss of one step by 1e4 and records the gradient norm the optimizer receives."""

    def __init__(self, spike_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spike_step = spike_step
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.global_step == self.spike_step else loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # runs after the callbacks: post-clip gradients
        grads = [p.grad for p in self.parameters() if p.grad is not None]  # None: a skipped step
        self.seen.append(torch.nn.utils.get_total_norm(grads).item() if grads else math.nan)


@pytest.mark.parametrize("clip_exploding", [True, False])
def test_a_spike_during_the_clipper_warmup_is_clipped_to_the_detector_band(clip_exploding: bool) -> None:
    torch.manual_seed(0)
    model = SpikeAt(spike_step=6)
    guard = GradGuard(lr_guard=None, clip_exploding=clip_exploding)  # ZClip: 25 warm-up steps without clipping
    trainer(max_steps=10, callbacks=[guard]).fit(model, regression_data())
    before, spike = max(model.seen[:6]), model.seen[6]
    if clip_exploding:
        assert spike < 10 * before  # held near the band instead of 1e4 times larger
        band_upper = guard._states[0].exploding.band()[2].item()
        assert spike <= band_upper * 1.01
        assert guard._states[0].clipper.state_dict()["count"] == 10  # ZClip's own statistics saw every step
    else:
        assert spike > 1000 * before  # let through: the weights are thrown far off
    assert guard.summary()["exploding"] >= 1


@pytest.mark.parametrize("fast_dev_run", [True, False, "no logger"])
def test_the_logger_message_says_what_really_happened(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, fast_dev_run: bool | str
) -> None:
    # fast_dev_run swaps the TensorBoardLogger for a DummyLogger: GradGuard must not claim none was attached. With
    # no logger at all (logger=False) there is nothing to say about logs.
    logger = CSVLogger(tmp_path) if not fast_dev_run else TensorBoardLogger(tmp_path) if fast_dev_run is True else False
    kwargs: dict[str, Any] = {"fast_dev_run": True} if fast_dev_run else {"max_steps": 3, "log_every_n_steps": 1}
    with caplog.at_level("INFO", logger="lightning_gradguard"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(logger=logger, callbacks=[GradGuard(log_every_n_steps=1)], **kwargs).fit(Regressor(), regression_data())
    text = caplog.text
    if fast_dev_run == "no logger":
        assert "GradGuard: `fast_dev_run`" not in text and "TensorBoardLogger" not in text
    elif fast_dev_run:
        assert "`fast_dev_run` replaces the loggers with a dummy logger" in text
        assert "no TensorBoardLogger attached" not in text
    else:
        assert "no TensorBoardLogger attached" in text
        assert "fast_dev_run" not in text


def test_clip_threshold_is_not_logged_before_the_clipper_has_one() -> None:
    torch.manual_seed(0)
    logger = MetricsLogger()
    guard = GradGuard(clip=ZClip(warmup_steps=6))
    trainer(max_steps=12, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=1).fit(
        Regressor(), regression_data()
    )
    steps = [step for step, m in logger.rows if "gradguard/clip_threshold" in m]
    coefs = [step for step, m in logger.rows if "gradguard/clip_coef" in m]
    assert len(coefs) == 12  # the coefficient (1: nothing clipped) is logged from the first step
    assert steps == coefs[6:]  # the threshold from the first step after the six of the warm-up
    assert all(math.isfinite(v) for v in logger.series("gradguard/clip_threshold"))


def test_trainer_log_every_n_steps_0_logs_the_last_window_only() -> None:
    logger = MetricsLogger()
    guard = GradGuard()
    trainer(max_steps=120, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=0).fit(
        Regressor(), regression_data()
    )
    # Before, 0 read as "unset": a row every 50 steps.
    assert [step for step, m in logger.rows if "gradguard/total_norm" in m] == [119]  # at the end of training


def test_barebones_trainer_gets_no_logging_from_the_guard() -> None:
    guard = GradGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(barebones=True, accelerator="cpu", devices=1, max_steps=60, max_epochs=-1, callbacks=[guard]).fit(
            Regressor(), regression_data()
        )
    assert not [str(w.message) for w in caught if "barebones" in str(w.message)]
    assert guard.summary()["exploding"] == 0


def test_the_guard_shows_what_decides_its_actions() -> None:
    # The repr was object's default (`<GradGuard object at 0x...>`) where every component has its own.
    from lightning_gradguard import L2, AutoClip, LRGuard

    guard = GradGuard(clip=AutoClip(), lr_guard=LRGuard(factor=0.3), regularizers=[L2(1e-4)], on_nonfinite="zero")
    text = repr(guard)
    assert text.startswith("GradGuard(clip=AutoClip(") and f"lr_guard={guard.lr_guard!r}" in text
    assert f"regularizers=[{guard.regularizers[0]!r}]" in text and "on_nonfinite='zero'" in text
    assert "rollback=Rollback(" in text and "clip=None" in repr(GradGuard(clip=None))
