"""GradGuard under DDP and FSDP2 on two CPU processes (gloo), and its refusal of FSDP1 and DeepSpeed.

Each distributed scenario is one real ``Trainer.fit`` in two worker processes, launched the way ``torchrun`` does it
(``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` in the environment, so Lightning does not launch them itself). The
workers run this very file (``python -m tests.test_distributed <scenario> <dir>``) and write what they saw, per
optimizer step, to ``<dir>/<scenario>_rank<r>.pt``; the tests compare the ranks with each other and with a
single-process run of the same model on the same samples.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_gradguard import (
    AGC,
    L2,
    AdaGC,
    AutoClip,
    ExplodingDetector,
    GradGuard,
    GuardEngine,
    LRGuard,
    NormClip,
    Orthogonal,
    ZClip,
)
from tests.helpers import RestartWatch, assert_same_state, event_files, load_events
from tests.models import NaNAtSteps, Regressor, regression_data

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
_QUIET = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


# ------------------------------------------------------------------------------------------------------- shared pieces
def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def full_layer_norms(module: nn.Module, l2: dict[str, float] | None = None) -> dict[str, float]:
    """fp64 per-module gradient norms of the *whole* gradients (DTensor shards gathered): the reference.

    ``l2`` maps parameter names to an L2 coefficient whose gradient term (``coef * w``) is added first, as GradGuard's
    L2 regularizer does before it measures.
    """
    l2 = l2 or {}
    out: dict[str, float] = {}
    for name, sub in module.named_modules():
        grads = []
        for pname, p in sub.named_parameters(recurse=False):
            if p.grad is not None:
                g = _full(p.grad).double()
                qualified = f"{name}.{pname}" if name else pname
                if qualified in l2:
                    g = g + l2[qualified] * _full(p.detach()).double()
                grads.append(g.flatten())
        if grads:
            out[name] = torch.linalg.vector_norm(torch.cat(grads)).item()
    return out


class CountCollectives:
    """Counts collectives (c10d calls and DTensor redistributions) made inside a ``with`` block."""

    def __enter__(self) -> CountCollectives:
        from torch.distributed.tensor.debug import CommDebugMode

        self.all_reduce_calls = 0
        self._original = torch.distributed.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.all_reduce_calls += 1
            return self._original(*args, **kwargs)

        torch.distributed.all_reduce = counting
        self._mode = CommDebugMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        torch.distributed.all_reduce = self._original
        self.total = self._mode.get_total_counts()
        self.ops = sorted(str(op) for op in self._mode.get_comm_counts())


class RefProbe(Callback):
    """The whole-gradient per-layer norms at ``on_before_optimizer_step`` (before or after GradGuard in the list).

    Before GradGuard, pass the guard: its L2 regularizers' gradient terms are added to the reference.
    """

    def __init__(self, guard: GradGuard | None = None) -> None:
        self.guard = guard
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        l2: dict[str, float] = {}
        for r in self.guard.regularizers if self.guard is not None else []:
            assert isinstance(r, L2)
            names = r.param_names or [n for n, p in pl_module.named_parameters() if p.ndim >= 2]  # bound on 1st step
            l2.update(dict.fromkeys(names, r.effective_weight))
        self.steps.append(full_layer_norms(pl_module, l2))


class DumpGuard(GradGuard):
    """GradGuard that records, per optimizer step, what it measured and decided, and the collectives it made."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_seen: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if torch.distributed.is_initialized():
            with CountCollectives() as comm:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            collectives = {"all_reduce": comm.all_reduce_calls, "total": comm.total, "ops": comm.ops}
        else:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            collectives = {}
        st = self._states[0]
        self.steps_seen.append(
            {
                "layers": dict(zip(st.index.names, st.layer_last.tolist())),
                "layer_last": st.layer_last.clone(),
                "scalars": st.scalars.clone(),
                "counts": st.counts.clone(),
                "threshold": st.clipper.last_threshold.item() if st.clipper is not None else math.inf,
                "loss_level": st.divergence.level().clone() if st.divergence is not None else None,
                "collectives": collectives,
            }
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.batches.append(
            {
                "lr_scale": self.lr_guard.scale(0) if self.lr_guard is not None else 1.0,
                "strengths": [r.strength for r in self.regularizers],
                "state": copy.deepcopy(self.state_dict()),
                "summary": self.summary(),
            }
        )


def _rank_data(rank: int) -> DataLoader:
    """This rank's part of ``regression_data(n=256)``, 16 samples per batch: samples ``rank, rank + 2, ...``.

    Lightning's own distributed sampler shuffles training data; without shuffling, one process with batches of 32 sees
    exactly the samples the two ranks see together, so the runs can be compared step by step.
    """
    dataset = regression_data(n=256).dataset
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=16, sampler=sampler)


# ----------------------------------------------------------------------------------------------------------------- DDP
class DDPRegressor(Regressor):
    """Rank 1 turns one micro-batch's loss into NaN, rank 0 blows one up: after the all-reduce both ranks must see
    (and act on) the same NaN and the same spike."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.current_epoch == 0 and batch_idx == 5 and self.global_rank == 1:
            loss = loss * math.nan
        if self.current_epoch == 1 and batch_idx == 3 and self.global_rank == 0:
            loss = loss * 1e3
        return loss


def _ddp_guard(cls: type[GradGuard] = DumpGuard) -> GradGuard:
    return cls(
        clip=ZClip(warmup_steps=3),
        lr_guard=LRGuard(patience=1, cooldown=2, recovery_steps=50),
        regularizers=[L2(1e-3, adaptive=True)],
        exploding=ExplodingDetector(warmup_steps=3),
        on_nonfinite="skip",
        # Due inside the run: rank zero alone samples and writes them, and the schedule in the state must still be
        # the same on every rank (it stayed at 0 on the others).
        histogram_every_n_steps=4,
    )


DDP_SETTINGS = dict(max_epochs=3, accumulate_grad_batches=2, log_every_n_steps=2)


def _ddp_trainer(callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    """A 2-process CPU DDP Trainer that keeps each rank's own samples (see :func:`_rank_data`)."""
    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        callbacks=callbacks,
        use_distributed_sampler=False,
        **kwargs,
        **_QUIET,
    )


def _ddp_worker(outdir: Path, rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    guard = _ddp_guard()
    pre = RefProbe(guard)
    trainer = _ddp_trainer([pre, guard], logger=TensorBoardLogger(outdir, name="tb", version=0), **DDP_SETTINGS)
    trainer.fit(DDPRegressor(), _rank_data(rank))  # 8 micro-batches per rank and epoch
    return {
        "steps": guard.steps_seen,
        "batches": guard.batches,
        "reference": pre.steps,
        "global_step": trainer.global_step,
    }


# --------------------------------------------------------------------------------------------------------------- FSDP2
class ShardedRegressor(Regressor):
    """Shards every ``Linear`` with ``fully_shard`` under ``ModelParallelStrategy``; a plain module otherwise.

    The widths make uneven shards: 5 rows over 2 ranks (3 + 2), and 1 row (1 + an empty shard).
    """

    def __init__(self) -> None:
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5), nn.ReLU(), nn.Linear(5, 1))
        super().__init__(net=net, lr=0.05)

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _fsdp_guard(cls: type[GradGuard] = DumpGuard) -> GradGuard:
    return cls(clip=ZClip(warmup_steps=2, max_grad_norm=0.3), regularizers=[L2(1e-3)], lr_guard=LRGuard())


FSDP_STEPS = 4


def _fsdp2_strategy() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)  # FSDP2 only, no tensor parallel


class ClipperCheck(Callback):
    """At one step, runs each clipper on copies of the sharded (DTensor) gradients and on the gathered ones."""

    def __init__(self, at_step: int = 1) -> None:
        self.at_step = at_step
        self.results: dict[str, list[dict[str, Any]]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != self.at_step:
            return
        names = [n for n, p in pl_module.named_parameters() if p.grad is not None]
        params = [p for p in pl_module.parameters() if p.grad is not None]
        assert all(_is_dtensor(p.grad) for p in params)
        full_grads = [_full(p.grad) for p in params]
        full_params = [_full(p.detach()) for p in params]
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in full_grads]))
        history = torch.full((4,), math.inf)
        history[0] = 0.05 * total  # AutoClip(percentile=0) then clips to this norm
        for clipper in (
            NormClip(max_norm=0.05),
            ZClip(warmup_steps=2, max_grad_norm=0.05),
            AutoClip(percentile=0.0, history=4),
            AGC(clip_factor=0.01),
        ):
            if isinstance(clipper, AutoClip):
                clipper.load_state_dict({"values": history, "count": torch.tensor(1), "calls": 1})
            sharded, gathered = copy.deepcopy(clipper), copy.deepcopy(clipper)
            shard_grads = [p.grad.detach().clone() for p in params]
            ref_grads = [g.clone() for g in full_grads]
            coef = sharded.clip_grads_(shard_grads, total, torch.tensor(True), params=params, names=names)
            gathered.clip_grads_(ref_grads, total, torch.tensor(True), params=full_params, names=names)
            self.results[type(clipper).__name__] = [
                {
                    "name": n,
                    "ndim": g.ndim,
                    "max_diff": (_full(s) - g).abs().max().item(),
                    "changed": not torch.equal(g, f),
                    "is_dtensor": _is_dtensor(s),
                }
                for n, s, g, f in zip(names, shard_grads, ref_grads, full_grads)
            ]
            self.results[type(clipper).__name__ + "_coef"] = float(_full(coef)) if torch.is_tensor(coef) else coef


def _refusal(rank: int, guard: GradGuard) -> str:
    """The message with which a one-step FSDP2 fit with ``guard`` is refused at fit start ("" if it is not)."""
    try:
        L.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=_fsdp2_strategy(),
            callbacks=[guard],
            max_steps=1,
            logger=False,
            use_distributed_sampler=False,
            **_QUIET,
        ).fit(ShardedRegressor(), _rank_data(rank))
    except MisconfigurationException as err:
        return str(err)
    return ""


def _fsdp2_worker(outdir: Path, rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    guard, post, check = _fsdp_guard(), RefProbe(), ClipperCheck()
    pre = RefProbe(guard)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=_fsdp2_strategy(),
        callbacks=[pre, guard, post, check],
        max_steps=FSDP_STEPS,
        log_every_n_steps=2,
        logger=TensorBoardLogger(outdir, name="tb", version=0),
        use_distributed_sampler=False,
        **_QUIET,
    )
    model = ShardedRegressor()
    trainer.fit(model, _rank_data(rank))
    grad_types = {type(p).__name__ for p in model.parameters()}
    # Last: further fits in the same processes, each refused at fit start on every rank.
    refusal = _refusal(rank, GradGuard(regularizers=[Orthogonal(1e-3)]))
    adagc_refusal = _refusal(rank, GradGuard(clip=AdaGC()))
    return {
        "steps": guard.steps_seen,
        "batches": guard.batches,
        "reference": pre.steps,
        "after": post.steps,
        "clippers": check.results,
        "param_types": sorted(grad_types),
        "global_step": trainer.global_step,
        "orthogonal_refusal": refusal,
        "adagc_refusal": adagc_refusal,
    }


# ------------------------------------------------------------------------------------------------ DDP, early restart
class SpikyDDPRegressor(Regressor):
    """Rank 0 blows up the loss on pairs of optimizer steps in a row, each pair climbing (1e4x, then 1e8x): after the
    all-reduce both ranks see a diverging run (a pair of one size after a calm start would be one jump, one event and no
    cut)."""

    def __init__(self, spikes: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spikes = spikes

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.global_step + 1
        if self.global_rank == 0 and step in self.spikes:
            loss = loss * 1e4 ** (1 + self.spikes.index(step) % 2)
        return loss


def _ddp_restart_worker(
    outdir: Path, rank: int, spikes: tuple[int, ...] = (2, 3, 7, 8), skip: bool = False
) -> dict[str, Any]:
    torch.manual_seed(0)
    guard = GradGuard(skip_exploding=skip)  # the default, with its early restart
    probe = RestartWatch(guard)
    trainer = _ddp_trainer([guard, probe], logger=False, max_epochs=8)  # 8 steps per epoch: 64 steps
    model = SpikyDDPRegressor(spikes, lr=0.02)
    trainer.fit(model, _rank_data(rank))
    return {
        "summary": guard.summary(),
        "restarts": probe.restarts,
        "scale": guard.lr_guard.scale(0) if guard.lr_guard is not None else None,
        "rescuing": guard.rescuing(),
        "weights": [p.detach().clone() for p in model.parameters()],
    }


# ------------------------------------------------------------------------------------------ plain loop under torch DDP
def _plain_ddp_worker(outdir: Path, rank: int) -> dict[str, Any]:
    """``GuardEngine`` in a plain loop under torch's DDP. From step 20 rank 0 alone reports a diverging loss, 1000x
    its own and doubling every step (its gradients stay as they are; a jump that held would be a new level of the
    data), and every seventh step it reports none."""
    return _in_process_group(rank, _plain_ddp_steps)


def _in_process_group(rank: int, steps: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # The DDP model's reducer holds the process group. Freed only after destroy_process_group(), it drops the
        # group's last reference with the GIL held, and ProcessGroupGloo's destructor joins gloo threads that may still
        # need the GIL to release the last all_reduce's tensor: a deadlock, 5 runs in 28 on a loaded 2-core machine.
        # The steps run in a function of their own, so that the model is gone before the group is destroyed.
        return steps(rank)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # nor may a failure's frames keep the model alive
        raise
    finally:
        gc.collect()  # anything in a cycle with the model too
        torch.distributed.destroy_process_group()


def _plain_ddp_steps(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(optimizer)
    torch.manual_seed(1 + rank)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    diverging = []
    for step in range(1, 41):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        blown_up = rank == 0 and step >= 20
        reported = (
            None if rank == 0 and step % 7 == 0 else loss.detach() * (1e3 * 2.0 ** (step - 20) if blown_up else 1)
        )
        engine.step(optimizer=optimizer, loss=reported)  # before, a loss of rank 0's own
        optimizer.step()
        diverging += [event.step for event in engine.drain() if event.diverging]
    return {
        "diverging": diverging,
        "counts": engine.snapshot().counts,
        "scale": engine.lr_guard.scale(0) if engine.lr_guard is not None else None,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def test_plain_ddp_ranks_judge_the_same_loss(tmp_path: Path) -> None:
    r0, r1 = _launch("plain_ddp", tmp_path)
    # The mean of the two ranks' losses diverges: both ranks see it on the same step, and cut the rate alike.
    assert r0["diverging"] and r0["diverging"] == r1["diverging"]
    assert r0["counts"] == r1["counts"] and r0["counts"]["lr_reduced"] >= 1
    assert r0["scale"] == r1["scale"] < 1.0
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))  # the replicas never drifted


def _plain_samples_worker(outdir: Path, rank: int) -> dict[str, Any]:
    """Each rank passes ``samples=len(x)``: the same sizes on every rank ("same"), or short batches on rank 1 alone at
    steps 10-11 ("differ", as per-rank batching by tokens or a hand-made shard gives), or None on rank 1 alone there
    ("mixed": only rank 0 would judge a short batch as one)."""
    return _in_process_group(rank, _plain_samples_steps)


def _plain_samples_steps(rank: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for case in ("same", "differ", "mixed"):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = GuardEngine(model, lr_guard=LRGuard())
        engine.attach(optimizer)
        g = torch.Generator().manual_seed(1 + rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 21):
                size = 4 if case == "differ" and rank == 1 and step in (10, 11) else 16
                x = torch.randn(size, 4, generator=g)
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
                loss.backward()
                told = None if case == "mixed" and rank == 1 and step in (10, 11) else len(x)
                engine.step(optimizer=optimizer, loss=loss.detach(), samples=told)
                optimizer.step()
                engine.drain()
        results[case] = [str(w.message) for w in caught if "another `samples`" in str(w.message)]
        del model, optimizer, engine
    return results


def test_plain_ddp_ranks_that_pass_different_samples_are_told(tmp_path: Path) -> None:
    # Each rank judged a short batch against its own batch size: one rank cut its rate and the replicas drifted apart,
    # silently (user trial). The loss's all_reduce now carries the sizes too, and each rank whose size differed from
    # the mean warns once (a step later: no wait on the device).
    r0, r1 = _launch("plain_samples", tmp_path)
    assert r0["same"] == [] and r1["same"] == []
    for said in (r0["differ"], r1["differ"], r0["mixed"], r1["mixed"]):
        assert len(said) == 1 and "at step 10 this process passed another `samples`" in said[0]


def _plain_zero_worker(outdir: Path, rank: int) -> dict[str, Any]:
    """The plain DDP loop at a too-high SGD rate (momentum 0.9), with ``torch.optim.SGD`` and with a
    ``ZeroRedundancyOptimizer`` over SGD, which keeps each rank's shard of the momentum in its local optimizer."""
    return _in_process_group(rank, _zero_steps)


def _zero_steps(rank: int) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    results: dict[str, Any] = {}
    for name in ("sgd", "zero"):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
        if name == "zero":
            optimizer: Any = ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.SGD, lr=1.2, momentum=0.9
            )
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=1.2, momentum=0.9)
        engine = GuardEngine(model, lr_guard=LRGuard(), rollback="default")
        engine.attach(optimizer)
        g = torch.Generator().manual_seed(1 + rank)
        w = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        for _ in range(60):
            x = torch.randn(16, 8, generator=g)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), x @ w)
            loss.backward()
            engine.step(optimizer=optimizer, loss=loss.detach())
            optimizer.step()
            engine.drain()
        results[name] = {
            "summary": engine.summary(),
            "scale": engine.lr_guard.scale(0) if engine.lr_guard is not None else None,
            "weights": [p.detach().clone() for p in model.parameters()],
            "saves_copies": engine.rollback is not None and engine.rollback.saves_copies(),
        }
        del model, optimizer, engine
    return results


def test_a_zero_redundancy_optimizer_is_guarded_as_the_optimizer_it_shards(tmp_path: Path) -> None:
    # The momentum reset of an LR cut and a rollback's restore of the optimizer state reach the local optimizer that
    # holds each rank's shard. Before, they read the wrapper's empty `state`: the restarted runs kept the momentum of
    # the abandoned weights, and one that plain SGD rescued with 2 rollbacks took 6, down to the rate's floor.
    for rank in _launch("plain_zero", tmp_path):
        sgd, zero = rank["sgd"], rank["zero"]
        assert sgd["summary"]["rolled_back"] >= 1 and sgd["summary"]["lr_reduced"] >= 1
        assert zero["summary"] == sgd["summary"] and zero["scale"] == sgd["scale"]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(zero["weights"], sgd["weights"]))
        # A checkpoint keeps the copy of plain SGD's state, not of one rank's shard, which no other rank could load.
        assert sgd["saves_copies"] and not zero["saves_copies"]


def _ddp_short_batch_worker(outdir: Path, rank: int) -> dict[str, Any]:
    """Lightning's own distributed sampler; 2 x (64 x 5 + 1) noisy examples: every epoch ends on a batch of one on
    each rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * (64 * 5 + 1), 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 1, generator=g)) + 0.3 * torch.randn(len(x), 1, generator=g)
    torch.manual_seed(0)
    guard = GradGuard()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy="ddp", callbacks=[guard], max_epochs=15, logger=False, **_QUIET
    )
    model = Regressor(lr=1e-3, optimizer="adam")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    return {
        "summary": guard.summary(),
        "batch_size": guard._states[0].state_dict()["batch_size"],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def test_ddp_ranks_agree_on_short_batches(tmp_path: Path) -> None:
    r0, r1 = _launch("ddp_short", tmp_path)
    assert r0["batch_size"] == r1["batch_size"] == 64  # the batch sizes were counted: the rule was on
    assert r0["summary"] == r1["summary"]
    assert r0["summary"]["exploding"] == 0 and r0["summary"]["lr_reduced"] == 0, r0["summary"]
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))


WORKERS = {
    "plain_ddp": _plain_ddp_worker,
    "plain_zero": _plain_zero_worker,
    "plain_samples": _plain_samples_worker,
    "ddp": _ddp_worker,
    "fsdp2": _fsdp2_worker,
    "ddp_restart": _ddp_restart_worker,
    "ddp_restart_calm": functools.partial(_ddp_restart_worker, spikes=(8, 9)),
    "ddp_skip": functools.partial(_ddp_restart_worker, spikes=(8, 9), skip=True),
    "ddp_short": _ddp_short_batch_worker,
}


def _main(scenario: str, outdir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    result = WORKERS[scenario](Path(outdir), rank)
    torch.save(result, Path(outdir) / f"{scenario}_rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    # Lightning leaves its process group to the interpreter's exit, whose teardown of gloo's threads can abort the
    # process ("terminate called without an active exception", once in the newest torch's CI leg) after the work is
    # done and saved. What the test checks is on disk: leave without running the C++ destructors.
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, outdir: Path, timeout: float = 180.0) -> list[dict[str, Any]]:
    # A second try on a fresh port when the workers hang: the free port is found before the workers bind it, so
    # another process group can take it in between, and two groups meeting on one port wait for ever. (The plain DDP
    # workers' teardown deadlock, which a retry only made less likely, is avoided in _plain_ddp_worker.)
    for _ in range(2):
        outputs = _launch_once(scenario, outdir, timeout)
        if outputs is not None:
            return outputs
    pytest.fail(f"{scenario} workers did not finish within {timeout} s, twice (fresh ports)")


def _launch_once(scenario: str, outdir: Path, timeout: float) -> list[dict[str, Any]] | None:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(WORLD),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_distributed", scenario, str(outdir)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own worker's process group
        return None
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        saved = (outdir / f"{scenario}_rank{rank}.pt").exists()
        assert proc.returncode == 0, f"{scenario} rank {rank} failed (result saved: {saved}):\n{out[-6000:]}"
    return [torch.load(outdir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


class _Recorder(GradGuard):
    """Single-process counterpart of DumpGuard: the per-step layer norms."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_seen: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        st = self._states[0]
        self.steps_seen.append(
            {"layers": dict(zip(st.index.names, st.layer_last.tolist())), "total": st.scalars[0].item()}
        )


def _single_process(model_cls: type[L.LightningModule], guard: _Recorder, **kwargs: Any) -> _Recorder:
    # Batches of 32: the samples the two ranks see together at each step (see `_rank_data`).
    torch.manual_seed(0)
    L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[guard], **kwargs, **_QUIET).fit(
        model_cls(), regression_data(n=256, batch_size=32)
    )
    return guard


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    outdir = tmp_path_factory.mktemp("ddp")
    return _launch("ddp", outdir), outdir


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    outdir = tmp_path_factory.mktemp("fsdp2")
    return _launch("fsdp2", outdir), outdir


# ----------------------------------------------------------------------------------------------------------- DDP tests
def test_ddp_ranks_measure_and_decide_identically(ddp_results: Any) -> None:
    (r0, r1), _ = ddp_results
    assert r0["global_step"] == r1["global_step"] == 12  # 3 epochs x 8 micro-batches / accumulation 2
    assert len(r0["steps"]) == len(r1["steps"]) == 12
    for step, (a, b) in enumerate(zip(r0["steps"], r1["steps"])):
        # The divergence detector judges the loss averaged over the ranks (each rank's own batches differ).
        for key in ("layer_last", "scalars", "counts", "threshold", "loss_level"):
            assert_same_state(a[key], b[key], f"step {step} {key}")
    assert r0["steps"][0]["loss_level"] is not None and r0["steps"][0]["loss_level"].isfinite().all()
    assert_same_state(r0["batches"], r1["batches"], "after each batch")
    # The decisions were not trivial: rank 1's NaN was skipped on both ranks, rank 0's spike lowered both LRs.
    summary = r0["batches"][-1]["summary"]
    assert summary["nonfinite"] == 1 and summary["skipped"] == 1
    # The spike lowered the LR; the one NaN step was skipped but is no reason to (LRGuard.nonfinite_patience=2).
    assert summary["exploding"] >= 1 and summary["lr_reduced"] == 1
    assert min(b["lr_scale"] for b in r0["batches"]) < 1.0
    assert max(b["strengths"][0] for b in r0["batches"]) > 1.0


def test_ddp_norms_are_those_of_the_averaged_gradient(ddp_results: Any) -> None:
    (r0, r1), _ = ddp_results
    for rank in (r0, r1):
        for got, ref in zip(rank["steps"], rank["reference"], strict=True):
            if not all(math.isfinite(v) for v in ref.values()):
                continue
            for layer, value in ref.items():
                assert got["layers"][layer] == pytest.approx(value, rel=1e-6)
        # DDP gradients are already whole: the one collective averages the loss for the divergence detector.
        assert all(s["collectives"]["ops"] == ["c10d.allreduce_"] for s in rank["steps"])
    single = _single_process(Regressor, _ddp_guard(_Recorder), max_steps=2, accumulate_grad_batches=2)
    for got, ref in zip(r0["steps"][:2], single.steps_seen, strict=True):  # before the injected NaN and spike
        for layer, value in ref["layers"].items():
            assert got["layers"][layer] == pytest.approx(value, rel=1e-5)


def test_ddp_only_rank_zero_writes_tensorboard(ddp_results: Any) -> None:
    _, outdir = ddp_results
    files = event_files(outdir / "tb")
    assert len(files) == 1
    acc = load_events(files[0])
    # Lightning numbers the n-th optimizer step n - 1.
    assert [e.step for e in acc.Scalars("gradguard/total_norm")] == [n - 1 for n in (2, 4, 6, 8, 10, 12)]
    assert "gradguard/reg/l2" in acc.Tags()["scalars"]


# --------------------------------------------------------------------------------------------------------- FSDP2 tests
def test_fsdp2_norms_equal_a_single_process_run(fsdp2_results: Any) -> None:
    (r0, r1), _ = fsdp2_results
    assert r0["param_types"] == ["DTensor"]  # really sharded
    assert r0["global_step"] == r1["global_step"] == FSDP_STEPS
    for step, (a, b) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
        for key in ("layer_last", "scalars", "counts", "threshold"):
            assert_same_state(a[key], b[key], f"step {step} {key}")
    assert_same_state(r0["batches"], r1["batches"], "after each batch")
    for rank in (r0, r1):  # against the gathered gradients in the same run
        for got, ref in zip(rank["steps"], rank["reference"], strict=True):
            assert set(got["layers"]) == set(ref)
            for layer, value in ref.items():
                assert got["layers"][layer] == pytest.approx(value, rel=1e-6)
            assert got["scalars"][0].item() == pytest.approx(math.sqrt(sum(v * v for v in ref.values())), rel=1e-6)
    single = _single_process(ShardedRegressor, _fsdp_guard(_Recorder), max_steps=FSDP_STEPS)
    for got, ref in zip(r0["steps"], single.steps_seen, strict=True):
        for layer, value in ref["layers"].items():
            assert got["layers"][layer] == pytest.approx(value, rel=1e-6)
        assert got["scalars"][0].item() == pytest.approx(ref["total"], rel=1e-6)


def test_fsdp2_takes_two_all_reduces_per_step(fsdp2_results: Any) -> None:
    (r0, r1), _ = fsdp2_results
    for rank in (r0, r1):
        for s in rank["steps"]:
            # The loss for the divergence detector, then the per-layer squared norms of the sharded gradients.
            assert s["collectives"]["all_reduce"] == 2
            assert s["collectives"]["total"] == 2 and s["collectives"]["ops"] == ["c10d.allreduce_"]


def test_fsdp2_clipping_acts_on_the_whole_gradient(fsdp2_results: Any) -> None:
    (r0, _), outdir = fsdp2_results
    for got, after in zip(r0["steps"], r0["after"], strict=True):
        total_after = math.sqrt(sum(v * v for v in after.values()))
        assert total_after == pytest.approx(min(got["scalars"][0].item(), got["threshold"]), rel=1e-5)
    assert any(s["threshold"] < s["scalars"][0].item() for s in r0["steps"])  # it did clip
    files = event_files(outdir / "tb")
    assert len(files) == 1  # the logging steps (with a regularizer penalty to reduce) ran on both ranks


@pytest.mark.parametrize("name", ["NormClip", "ZClip", "AutoClip", "AGC"])
def test_fsdp2_clippers_on_sharded_gradients_match_the_gathered_ones(fsdp2_results: Any, name: str) -> None:
    (r0, r1), _ = fsdp2_results
    for rank in (r0, r1):
        rows = rank["clippers"][name]
        assert all(row["is_dtensor"] for row in rows)
        assert any(row["changed"] for row in rows), "the clipper did not clip: the check proves nothing"
        for row in rows:
            if name == "AGC" and row["ndim"] < 2:
                continue  # AGC: a 1-D parameter is one unit, clipped per local shard under FSDP2 (documented)
            assert row["max_diff"] <= 1e-7, row
    assert r0["clippers"][name + "_coef"] == r1["clippers"][name + "_coef"] or name == "AGC"


def test_fsdp2_with_orthogonal_regularizer_or_adagc_is_refused(fsdp2_results: Any) -> None:
    (r0, r1), _ = fsdp2_results
    for rank in (r0, r1):
        assert "Orthogonal regularizer needs whole weight matrices" in rank["orthogonal_refusal"]
        assert "AdaGC(...)) clips each parameter by its whole gradient norm" in rank["adagc_refusal"]


@pytest.mark.parametrize(
    ("worker", "spikes", "rescued"), [("ddp_restart", (2, 3, 7, 8), True), ("ddp_restart_calm", (8, 9), False)]
)
def test_ddp_ranks_take_the_same_restart_decision_on_the_same_step(
    tmp_path: Path, worker: str, spikes: tuple[int, ...], rescued: bool
) -> None:
    r0, r1 = _launch(worker, tmp_path)
    restarts = [(spikes[1] + 1, True), (spikes[3] + 1, True)] if rescued else []
    for rank in (r0, r1):
        # From the second step: the flags of the second spike land before the next step, both ranks skip it and go
        # back to their initial weights (a plain retry); the trouble comes back and both restart again, now with the
        # rescue. After seven calm steps (the calm-start test reads the same all-reduced norms on both ranks): both
        # cut the rate and go on from where they are.
        assert rank["restarts"] == restarts
        assert rank["summary"]["rolled_back"] == len(restarts)
        assert rank["summary"]["lr_reduced"] == (2 if rescued else 1)
    # The restart keeps the rate and puts AGC to work on both ranks, on the same all-reduced gradients.
    assert r0["summary"] == r1["summary"] and r0["scale"] == r1["scale"]
    assert (r0["scale"] == 1.0) is rescued and r0["rescuing"] is r1["rescuing"] is rescued
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))  # the replicas never drifted


def test_ddp_ranks_skip_the_same_flagged_steps(tmp_path: Path) -> None:
    r0, r1 = _launch("ddp_skip", tmp_path)
    # Two spikes after a calm start: flagged on the same all-reduced norms, skipped on both ranks (not clipped).
    assert r0["summary"] == r1["summary"]
    assert r0["summary"]["skipped"] == 2 and r0["summary"]["rolled_back"] == 0
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))


# ------------------------------------------------------------------------------------------------------------ refusals
def _stub_trainer(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


def _fit_spawned(guard: GradGuard, max_steps: int, model: L.LightningModule, data: DataLoader) -> L.Trainer:
    """``trainer.fit`` under ``ddp_spawn``, once more if a worker died of SIGABRT: gloo's teardown at the interpreter's
    exit can abort a worker after its results are sent (see ``_main``), and the launcher then raises. A failed spawn
    changes nothing here (the workers train copies), and an exception in a worker is raised, never retried."""
    for attempt in range(2):
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp_spawn",
            logger=False,
            callbacks=[guard],
            **_QUIET,
        )
        try:
            trainer.fit(model, data)
        except torch.multiprocessing.ProcessExitedException as error:
            if attempt or error.signal_name != "SIGABRT":
                raise
            os.environ["MASTER_PORT"] = str(_free_port())  # the fixture restores the environment
            continue
        return trainer
    raise AssertionError("unreachable")


@pytest.fixture
def fresh_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning takes `MASTER_PORT` from the environment when it is there, and `ddp_spawn` leaves its port there: a
    # second spawn in this process met on the first one's port, which another test's process group may hold by then
    # (a worker aborted, SIGABRT). Each spawn gets a fresh port, and the environment is restored after it.
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


@pytest.mark.usefixtures("fresh_port")
def test_ddp_spawn_sends_the_summary_back_to_the_launching_process() -> None:
    # `ddp_spawn` trains in worker processes: the GradGuard object of this process sees no step, and the counts come
    # back through the trainer's callback metrics, which the launcher returns.
    guard = GradGuard()
    trainer = _fit_spawned(guard, 30, NaNAtSteps(25), regression_data())
    assert guard.summary()["skipped"] == 0
    counts = {k[len("gradguard/summary/") :]: v.item() for k, v in trainer.callback_metrics.items() if "summary" in k}
    assert counts == {**dict.fromkeys(counts, 0.0), "nonfinite": 1.0, "skipped": 1.0}
    assert set(counts) == set(guard.summary())


@pytest.mark.usefixtures("fresh_port")
def test_a_guard_that_fitted_in_this_process_goes_on_under_ddp_spawn() -> None:
    # `ddp_spawn` pickles the callbacks into its workers: a guard that had fitted here held weak references, hooks and
    # a lock, and the launch failed. Its copy now carries its checkpoint state: the count of the first fit goes on.
    # A regularizer holds a weak reference too. `spare_lone=False`: the two NaN batches cut though calm steps follow.
    guard = GradGuard(regularizers=[L2(1e-4)], lr_guard=LRGuard(spare_lone=False))
    model = NaNAtSteps(5)
    L.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, callbacks=[guard], **_QUIET).fit(
        model, regression_data()
    )
    assert guard.summary()["skipped"] == 1
    trainer = _fit_spawned(guard, 10, model, regression_data())  # the same model: its workers' copies have its weights
    counts = {k[len("gradguard/summary/") :]: v.item() for k, v in trainer.callback_metrics.items() if "summary" in k}
    # The second NaN batch comes 10 engine steps after the first: a repeat within the LR guard's window, one cut.
    assert counts == {**dict.fromkeys(counts, 0.0), "nonfinite": 2.0, "skipped": 2.0, "lr_reduced": 1.0}


class _RateLogged(Regressor):
    """NaN losses at given optimizer steps (two cut the rate once, with ``spare_lone=False``), and the rate each step
    runs at logged: inside ``optimizer.step``, with the LR guard's multiplier in, where ``training_step`` runs."""

    def __init__(self, nan_steps: tuple[int, ...], lr: float) -> None:
        super().__init__(lr=lr)
        self.nan_steps = nan_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("lr_seen", float(self.trainer.optimizers[0].param_groups[0]["lr"]))
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step in self.nan_steps else loss


@pytest.mark.usefixtures("fresh_port")
def test_a_rate_changed_before_a_ddp_spawn_fit_drops_the_cut_in_the_workers() -> None:
    # The workers' copies compare the rate with the one the guard last fitted at (carried with its state): they ran
    # the new rate at the old cut.
    guard, model = GradGuard(lr_guard=LRGuard(spare_lone=False)), _RateLogged(nan_steps=(2, 4), lr=0.05)
    single = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, callbacks=[guard], **_QUIET)
    single.fit(model, regression_data())
    assert guard.lr_guard is not None and guard.lr_guard.scale(0) == 0.5
    assert single.callback_metrics["lr_seen"].item() == pytest.approx(0.025)
    model.lr, model.nan_steps = 0.01, ()
    trainer = _fit_spawned(guard, 4, model, regression_data())
    assert trainer.callback_metrics["lr_seen"].item() == pytest.approx(0.01)  # sent back: the rate set, uncut


def test_fsdp1_is_refused_with_a_clear_error() -> None:
    # Lightning itself only runs FSDPStrategy on GPUs; the refusal is GradGuard's own, tested on a real instance.
    class MyFSDP(FSDPStrategy):
        pass

    for strategy in (FSDPStrategy(), MyFSDP()):
        with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*FSDP1.*ModelParallelStrategy"):
            GradGuard().setup(_stub_trainer(strategy), Regressor(), "fit")
    GradGuard().setup(_stub_trainer(FSDPStrategy()), Regressor(), "validate")  # only training is watched


def test_deepspeed_is_refused_with_a_clear_error() -> None:
    # DeepSpeed is not installed here, and DeepSpeedStrategy.__init__ refuses to run without it: the instance is made
    # without __init__, which is all GradGuard.setup looks at (its class).
    strategy = object.__new__(DeepSpeedStrategy)
    with pytest.raises(MisconfigurationException, match=r"does not support DeepSpeed.*param.grad"):
        GradGuard().setup(_stub_trainer(strategy), Regressor(), "fit")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
