"""GradGuard in every Lightning training mode, on real ``Trainer.fit`` runs (CPU).

Mixed precision (16-mixed with a GradScaler, fused optimizers, bf16-mixed), gradient accumulation, manual
optimization with several optimizers, Lightning's own gradient clipping, checkpoint resume, unusual parameters
(frozen then unfrozen, sparse, complex, thousands of tensors) and runs without a training step. The distributed modes
(DDP, FSDP2, FSDP1/DeepSpeed refusal) are in ``test_distributed.py``.
"""

from __future__ import annotations

import copy
import glob
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import (
    AGC,
    L2,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    LRGuard,
    NormClip,
    VanishingDetector,
    ZClip,
)
from tests.models import Regressor, regression_data, trainer


# ---------------------------------------------------------------------------------------------------- helpers
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
        self.steps.append({
            "layers": layer_norms(pl_module, _optimizer_params(optimizer), divide=scale),
            "scale": scale,
            "has_nan": any(bool(torch.isnan(g.coalesce().values() if g.is_sparse else g).any()) for g in grads),
            "finite": all(bool(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all()) for g in grads),
        })


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
        self.measured.append({
            "key": key,
            "layers": dict(zip(st.index.names, st.layer_last.tolist())),
            "present": dict(zip(st.index.names, st.layer_present.tolist())),
            "total": st.scalars[0].item(),
            "threshold": st.clipper.last_threshold.item() if st.clipper is not None else math.inf,
            "coef": st.clipper.last_coef.item() if st.clipper is not None else 1.0,
        })

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.after_batch.append(copy.deepcopy(self.state_dict()))


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Bitwise equality of nested state (tensors compared with ``torch.equal``, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"


def _differs(a: Any, b: Any) -> bool:
    try:
        assert_same_state(a, b)
    except AssertionError:
        return True
    return False


def _event_tags(logdir: Any) -> list[str]:
    tags: list[str] = []
    for path in glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        for kind in ("scalars", "images", "histograms", "tensors"):
            tags += acc.Tags().get(kind, [])
    return tags


# ---------------------------------------------------------------------------------------------------- 16-mixed
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


class ParamSnapshots(Callback):
    """Parameters and optimizer state after every batch."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []
        self.opt_state: list[Any] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append([p.detach().clone() for p in pl_module.parameters()])
        self.opt_state.append(copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))


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
        clip=clip, lr_guard=LRGuard(cooldown=1, recovery_steps=3), exploding=ExplodingDetector(warmup_steps=2)
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
    before, during = guard.after_batch[inf_at - 1], guard.after_batch[inf_at]
    for part in ("clip", "exploding", "vanishing"):
        assert_same_state(before["optimizers"]["0"][part], during["optimizers"]["0"][part], part)
    assert_same_state(before["lr_guard"], during["lr_guard"], "lr_guard")
    after = guard.after_batch[inf_at + 1]
    assert _differs(during["optimizers"]["0"]["clip"], after["optimizers"]["0"]["clip"])  # a normal step does feed it
    assert _differs(during["optimizers"]["0"]["exploding"], after["optimizers"]["0"]["exploding"])
    # The scaler skipped the step: parameters unchanged, and finite throughout.
    assert all(torch.equal(a, b) for a, b in zip(snaps.params[inf_at - 1], snaps.params[inf_at]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_16_mixed_fused_optimizer_with_agc_is_refused() -> None:
    model = AmpRegressor(fused=True)
    guard = GradGuard(clip=AGC())
    with pytest.raises(MisconfigurationException, match="AGC.*fused"):
        trainer(max_steps=2, callbacks=[guard], plugins=[_gradscaler_plugin()]).fit(model, regression_data())
