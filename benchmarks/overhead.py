"""What GradGuard costs per training step, next to plain Lightning and to what users would pick instead.

Everything runs in one process, in one run:

* **steps**: real ``Trainer.fit`` training steps of each variant (plain Lightning, GradGuard's defaults, monitor-only,
  each clipper, Lightning's ``grad_norm`` logging recipe, ``zclip.ZClipLightningCallback``,
  ``Trainer(gradient_clip_val=1.0)``) on each model. Variants are interleaved (one fit of each per repetition, the
  order rotated between repetitions), a step is the time between two consecutive ``on_train_batch_end`` calls of a
  timer callback that runs after every other callback, and each variant's ratio to the plain step is taken pair by
  pair (same repetition) before the median. Fits are shorter than the logging interval and run without a logger:
  logging steps are measured on their own.
  ``hook`` is the time spent inside the variant's own hooks on those steps (GradGuard's three hooks, the module's
  ``on_before_optimizer_step`` for the recipe, ``configure_gradient_clipping`` for ``gradient_clip_val``).
* **micro**: the per-step work alone, called directly on fixed gradients: GradGuard's hooks of a non-logging step
  against one ``torch._foreach_norm`` and against ``torch.nn.utils.clip_grad_norm_`` over the same gradients, with the
  number of top-level torch ops each case runs per call (``torch.profiler``; on a GPU each is at least one launch).
* **logging**: the extra cost of a GradGuard logging step with one layer per parameter tensor, next to writing the
  same number of scalars with ``SummaryWriter.add_scalar``, and its share of training time at the default interval.
* **memory**: GradGuard's state after a few and after many steps (checkpoint bytes, tensors and numpy arrays it
  holds, Python heap it allocated), to show that nothing grows with the number of steps; on a GPU also the peak
  memory of each variant's fit.
* **syncs** (``--device cuda`` only): host-device synchronizations inside each variant's hooks on non-logging steps,
  counted with ``torch.cuda.set_sync_debug_mode("warn")``.
* **profile** (``--profile``): top-level torch ops per quiet step of the defaults and of monitor-only, split by
  component (measure, each detector, the clipper, the record, engine and callback glue), for every model; with
  ``--compile`` also for ``GradGuard(compile=True)`` (on a CPU each compilation takes tens of seconds).

On the CPU the default clock is the process's CPU time (``time.process_time``) and PyTorch runs one thread: on a
machine shared with other work, wall-clock time mostly measures the neighbours. ``--clock wall`` switches to
``time.perf_counter``; both are stored in the JSON. On a GPU the clock is wall time with ``torch.cuda.synchronize``
at every mark.

Run from the repository root::

    python -m benchmarks.overhead                      # all models, ~8 minutes on 2 CPU cores
    python -m benchmarks.overhead --quick --models mlp800 --json out.json
    python -m benchmarks.overhead --device cuda --profile
    python -m benchmarks.overhead --models lstm --profile --skip steps,micro,logging,memory   # op counts only

``zclip`` is an optional dependency (``pip install zclip``); its rows are skipped with a message when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_gradguard import AGC, AdaGC, AutoClip, GradGuard, NormClip, ZClip

try:
    from examples.cifar_resnet import cifar_resnet
except ImportError:  # run from outside the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples.cifar_resnet import cifar_resnet

try:
    from zclip import ZClipLightningCallback
except ImportError:
    ZClipLightningCallback = None

MODELS = ("mlp800", "mlp3000", "resnet20", "lstm", "mlp_tiny")
LOG_EVERY = 50  # Lightning's default logging interval
# GradGuard's default picture interval: the logging share amortizes one picture over it.
IMAGE_EVERY: int = inspect.signature(GradGuard).parameters["image_every_n_steps"].default
_GUARD_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")


# ----------------------------------------------------------------------------------------------------------- models
class _LSTMRegressor(nn.Module):
    """The adding-problem LSTM: last hidden state -> one number."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@dataclass(frozen=True)
class _ModelSpec:
    name: str
    build: Callable[[bool], nn.Module]  # quick -> model
    batch: Callable[[torch.Generator, bool], tuple[Tensor, Tensor]]  # generator, quick -> (inputs, targets)
    loss: Callable[[Tensor, Tensor], Tensor]
    describe: str
    steps: int  # timed steps per fit
    skip: int  # first steps of each fit left out (allocation, optimizer state)
    reps: int


def _mlp(blocks: int, width: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())])


def _linear_norm_stack(blocks: int, width: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.LayerNorm(width))])


def _adding_batch(g: torch.Generator, batch: int, seq: int) -> tuple[Tensor, Tensor]:
    values = torch.rand(batch, seq, generator=g)
    marks = torch.zeros(batch, seq)
    picks = torch.stack([torch.randperm(seq, generator=g)[:2] for _ in range(batch)])
    marks.scatter_(1, picks, 1.0)
    return torch.stack([values, marks], dim=-1), (values * marks).sum(1, keepdim=True)


# ``--quick`` shrinks every model (same structure, a fraction of the work): it only checks that everything runs.
SPECS: dict[str, _ModelSpec] = {
    "mlp800": _ModelSpec(
        "mlp800",
        lambda quick: _mlp(8, 16) if quick else _mlp(200, 64),
        lambda g, quick: (
            (torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g))
            if quick
            else (torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g))
        ),
        F.mse_loss,
        "200 x [Linear(64,64), LayerNorm(64), GELU], batch 64 (800 tensors)",
        20,
        3,
        5,
    ),
    "mlp3000": _ModelSpec(
        "mlp3000",
        lambda quick: _linear_norm_stack(8 if quick else 750, 16),
        lambda g, quick: (
            torch.randn(8 if quick else 64, 16, generator=g),
            torch.randn(8 if quick else 64, 16, generator=g),
        ),
        F.mse_loss,
        "750 x [Linear(16,16), LayerNorm(16)], batch 64 (3000 tensors)",
        10,
        3,
        3,
    ),
    "resnet20": _ModelSpec(
        "resnet20",
        lambda quick: cifar_resnet(8 if quick else 20),
        lambda g, quick: (
            torch.randn(4 if quick else 128, 3, 32, 32, generator=g),
            torch.randint(0, 10, (4 if quick else 128,), generator=g),
        ),
        F.cross_entropy,
        "CIFAR ResNet-20, batch 128 (65 tensors)",
        5,
        1,
        3,
    ),
    "lstm": _ModelSpec(
        "lstm",
        lambda quick: _LSTMRegressor(16 if quick else 128),
        lambda g, quick: _adding_batch(g, 8, 10) if quick else _adding_batch(g, 64, 100),
        F.mse_loss,
        "LSTM(2,128) + Linear, adding problem, seq 100, batch 64 (6 tensors)",
        20,
        3,
        4,
    ),
    # A step of about a millisecond: the guard's fixed cost against the smallest models users try first.
    "mlp_tiny": _ModelSpec(
        "mlp_tiny",
        lambda quick: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)),
        lambda g, quick: (torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)),
        F.mse_loss,
        "Linear(16,64), ReLU, Linear(64,64), ReLU, Linear(64,1), batch 32 (6 tensors)",
        200,
        10,
        5,
    ),
}


class _RepeatBatch(IterableDataset):
    """The same batch ``length`` times: no data pipeline in the measurement."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.length):
            yield self.batch


class _BenchModule(L.LightningModule):
    """One model trained with SGD (momentum 0.9) on a fixed batch; ``recipe`` turns on Lightning's grad-norm logging."""

    def __init__(self, spec: _ModelSpec, device: torch.device, quick: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = spec.build(quick)
        self.loss_fn = spec.loss
        g = torch.Generator().manual_seed(0)
        self.fixed_batch = tuple(t.to(device) for t in spec.batch(g, quick))
        self.recipe = False
        self.length = 1

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.recipe:
            # Lightning's documented recipe for tracking gradient norms.
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RepeatBatch(self.fixed_batch, self.length), batch_size=None)


# --------------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class _Variant:
    key: str
    label: str
    callback: Callable[[], Callback] | None = None
    recipe: bool = False
    clip_val: float | None = None
    requires: str | None = None  # optional package
    max_steps: int | None = None  # fewer timed steps for a variant far slower than the rest


def _zclip_callback() -> Callback:
    assert ZClipLightningCallback is not None
    return ZClipLightningCallback()


VARIANTS: tuple[_Variant, ...] = (
    _Variant("plain", "plain Lightning"),
    _Variant("gg_defaults", "GradGuard() [ZClip, LRGuard, detectors]", GradGuard),
    _Variant("gg_monitor", "GradGuard(clip=None, lr_guard=None)", lambda: GradGuard(clip=None, lr_guard=None)),
    _Variant("gg_normclip", "GradGuard(clip=NormClip(1.0))", lambda: GradGuard(clip=NormClip(1.0))),
    _Variant("gg_autoclip", "GradGuard(clip=AutoClip())", lambda: GradGuard(clip=AutoClip())),
    _Variant("gg_agc", "GradGuard(clip=AGC())", lambda: GradGuard(clip=AGC())),
    _Variant("gg_adagc", "GradGuard(clip=AdaGC())", lambda: GradGuard(clip=AdaGC())),
    _Variant("lightning_grad_norm", "log_dict(grad_norm(self, 2)) recipe", recipe=True, max_steps=8),
    _Variant("zclip_callback", "zclip.ZClipLightningCallback()", _zclip_callback, requires="zclip"),
    _Variant("gradient_clip_val", "Trainer(gradient_clip_val=1.0)", clip_val=1.0),
)


# With --compile: the defaults and monitor-only with the fused per-step tail compiled (GradGuard(compile=True)).
COMPILED_VARIANTS: tuple[_Variant, ...] = (
    _Variant("gg_defaults_compiled", "GradGuard(compile=True)", lambda: GradGuard(compile=True)),
    _Variant(
        "gg_monitor_compiled",
        "GradGuard(clip=None, lr_guard=None, compile=True)",
        lambda: GradGuard(clip=None, lr_guard=None, compile=True),
    ),
)


def _available(variant: _Variant) -> bool:
    return variant.requires != "zclip" or ZClipLightningCallback is not None


# ------------------------------------------------------------------------------------------------------------ clocks
@dataclass
class _Clock:
    """Which clock is primary, and the device synchronization around readings."""

    device: torch.device
    primary: str  # "cpu" or "wall"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self, sync: bool = True) -> tuple[float, float]:
        if sync:
            self.sync()
        return time.perf_counter(), time.process_time()

    def pick(self, wall: float, cpu: float) -> float:
        return cpu if self.primary == "cpu" else wall


class _StepTimer(Callback):
    """Marks the end of each training batch (appended after every other callback) and sums the time spent in wrapped
    hooks since the previous mark.

    On the CPU every step is timed on its own. On a GPU a synchronization at every mark would stop the host from
    running ahead of the device, which is part of what is being measured: there the device is synchronized only at
    the start and the end of the timed window, which gives the mean step, and hooks are timed on the host alone (the
    launch cost that a sync-free hook adds).
    """

    def __init__(self, clock: _Clock, skip: int = 0, per_step: bool | None = None) -> None:
        self.clock = clock
        self.per_step = clock.device.type != "cuda" if per_step is None else per_step
        self.skip = skip
        self.marks: list[tuple[int, float, float, float, float]] = []  # step, wall, cpu, hook wall, hook cpu
        self._hook = [0.0, 0.0]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        edge = len(self.marks) == self.skip or trainer.global_step >= (trainer.max_steps or 0)
        wall, cpu = self.clock.now(sync=self.per_step or edge)
        self.marks.append((trainer.global_step, wall, cpu, self._hook[0], self._hook[1]))
        self._hook = [0.0, 0.0]

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = self.clock.now(sync=self.per_step)
            try:
                return fn(*args, **kwargs)
            finally:
                w1, c1 = self.clock.now(sync=self.per_step)
                self._hook[0] += w1 - w0
                self._hook[1] += c1 - c0

        return timed

    def periods(self, skip: int, log_every: int) -> list[tuple[float, float, float, float]]:
        """(wall, cpu, hook wall, hook cpu) of each step after the first ``skip``, logging steps left out; on a GPU
        one entry, the mean over the window."""
        if not self.per_step:
            window = self.marks[skip:]
            n = len(window) - 1
            if n < 1:
                return []
            hooks = [m[3] for m in window[1:]], [m[4] for m in window[1:]]
            return [
                (
                    (window[-1][1] - window[0][1]) / n,
                    (window[-1][2] - window[0][2]) / n,
                    statistics.median(hooks[0]),
                    statistics.median(hooks[1]),
                )
            ]
        out = []
        for i in range(1, len(self.marks)):
            step, wall, cpu, hook_wall, hook_cpu = self.marks[i]
            if i <= skip or step % log_every in (0, 1, log_every - 1):
                continue  # the first steps allocate; GradGuard and the logger write around multiples of log_every
            out.append((wall - self.marks[i - 1][1], cpu - self.marks[i - 1][2], hook_wall, hook_cpu))
        return out


@contextlib.contextmanager
def _wrapped(obj: Any, names: Sequence[str], timer: _StepTimer) -> Iterator[None]:
    """Time the hooks ``names`` of ``obj`` (instance attributes shadow the methods, removed afterwards)."""
    for name in names:
        setattr(obj, name, timer.wrap(getattr(obj, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(obj, name)


def _own_hooks(callback: Callback) -> list[str]:
    return [h for h in _GUARD_HOOKS if getattr(type(callback), h) is not getattr(Callback, h)]


# --------------------------------------------------------------------------------------------------------- utilities
def _trainer(
    args: argparse.Namespace, steps: int, callbacks: list[Callback], logdir: str | None, **kwargs: Any
) -> L.Trainer:
    logger: Any = False
    if logdir is not None:
        logger = TensorBoardLogger(logdir, name="", version="")
    return L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=logger,
        log_every_n_steps=kwargs.pop("log_every_n_steps", LOG_EVERY),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def _fit(module: _BenchModule, trainer: L.Trainer, steps: int) -> None:
    module.length = steps
    trainer.fit(module)


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile."""
    if not values:
        return math.nan, math.nan, math.nan
    q = np.percentile(np.asarray(values, dtype=np.float64), [50, 25, 75])
    return float(q[0]), float(q[1]), float(q[2])


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(out)


def _fixed_grads(module: _BenchModule) -> list[Tensor]:
    """One real backward pass; a copy of its gradients."""
    module.zero_grad(set_to_none=True)
    x, y = module.fixed_batch
    module.loss_fn(module.net(x), y).backward()
    return [p.grad.detach().clone() for p in module.parameters()]


def _set_grads(module: _BenchModule, grads: list[Tensor]) -> None:
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()


# ------------------------------------------------------------------------------------------------------------- steps
@dataclass
class _Samples:
    periods: list[tuple[float, float, float, float]] = field(default_factory=list)
    per_rep: list[float] = field(default_factory=list)  # median step of each repetition (primary clock)
    peak_mb: list[float] = field(default_factory=list)
    timed: int = 0  # steps inside the timed windows


def _run_fit(
    args: argparse.Namespace,
    clock: _Clock,
    module: _BenchModule,
    variant: _Variant,
    steps: int,
    logdir: str | None,
    skip: int = 0,
) -> tuple[_StepTimer, float]:
    timer = _StepTimer(clock, skip)
    callbacks: list[Callback] = []
    wrap: list[tuple[Any, list[str]]] = [(module, ["configure_gradient_clipping"])]
    if variant.callback is not None:
        cb = variant.callback()
        callbacks.append(cb)
        wrap = [(cb, _own_hooks(cb))]
    if variant.recipe:
        wrap = [(module, ["on_before_optimizer_step"])]
    kwargs = {"gradient_clip_val": variant.clip_val} if variant.clip_val is not None else {}
    trainer = _trainer(args, steps, [*callbacks, timer], logdir, **kwargs)
    module.recipe = variant.recipe
    peak = math.nan
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as stack:
        for obj, names in wrap:
            stack.enter_context(_wrapped(obj, names, timer))
        _fit(module, trainer, steps)
    module.recipe = False
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return timer, peak


def bench_steps(
    args: argparse.Namespace, clock: _Clock, spec: _ModelSpec, variants: Sequence[_Variant]
) -> list[dict[str, Any]]:
    """Interleaved fits of every variant; per-step medians and pairwise ratios to the plain step."""
    module = _BenchModule(spec, torch.device(args.device), args.quick)
    steps, skip = args.steps or spec.steps, spec.skip
    reps = args.reps or spec.reps
    if args.quick:
        steps, skip, reps = 3, 1, 1
    samples = {v.key: _Samples() for v in variants}
    # No logger in these fits: the timed window holds no logging step (fits are shorter than the logging interval),
    # so a logger would only add its set-up and GradGuard's end-of-fit pictures (about a second each) to the run.
    # Logging steps, with TensorBoard, are measured on their own (bench_logging).
    for v in variants if not args.quick else variants[:1]:  # warm-up: imports, allocator, first-call costs
        _run_fit(args, clock, module, v, skip + 1, None)
    for rep in range(reps):
        order = list(variants[rep % len(variants) :]) + list(variants[: rep % len(variants)])
        for v in order:
            n = min(steps, v.max_steps or steps)
            timer, peak = _run_fit(args, clock, module, v, skip + n + 1, None, skip)
            periods = timer.periods(skip, LOG_EVERY)
            samples[v.key].periods += periods
            samples[v.key].timed += len(periods) if timer.per_step else n
            samples[v.key].per_rep.append(statistics.median(clock.pick(w, c) for w, c, _, _ in periods))
            samples[v.key].peak_mb.append(peak)
    plain = samples["plain"]
    rows = []
    for v in variants:
        s = samples[v.key]
        ratios = [a / b for a, b in zip(s.per_rep, plain.per_rep)]
        step_med, step_lo, step_hi = _quantiles([clock.pick(w, c) * 1e3 for w, c, _, _ in s.periods])
        hook_med, hook_lo, hook_hi = _quantiles([clock.pick(hw, hc) * 1e3 for _, _, hw, hc in s.periods])
        rows.append(
            {
                "model": spec.name,
                "variant": v.key,
                "label": v.label,
                "step_ms": step_med,
                "step_ms_p25": step_lo,
                "step_ms_p75": step_hi,
                "step_wall_ms": _quantiles([w * 1e3 for w, _, _, _ in s.periods])[0],
                "step_cpu_ms": _quantiles([c * 1e3 for _, c, _, _ in s.periods])[0],
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "hook_ms": hook_med,
                "hook_ms_p25": hook_lo,
                "hook_ms_p75": hook_hi,
                "hook_share": hook_med / _quantiles([clock.pick(w, c) * 1e3 for w, c, _, _ in plain.periods])[0],
                "peak_mb": max(s.peak_mb) if args.device == "cuda" else None,
                "reps": len(s.per_rep),
                "steps_timed": s.timed,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------------- micro
def _guard_step(guard: GradGuard, trainer: L.Trainer, module: _BenchModule) -> Callable[[], None]:
    optimizer = trainer.optimizers[0]

    def step() -> None:
        # Each call is a new optimizer step on the same (fixed) gradients: the engine would take a second call on
        # unchanged gradients for a repeated one and ignore it, so forget the last step's gradients first.
        for engine in guard._states.values():
            engine._processed = None
        # The hooks GradGuard runs on a step that does not log, in the order Lightning calls them.
        guard.on_train_batch_start(trainer, module, None, 0)
        guard.on_before_optimizer_step(trainer, module, optimizer)
        guard.on_train_batch_end(trainer, module, None, None, 0)

    return step


def _micro_cases(
    args: argparse.Namespace, module: _BenchModule, fixed: list[Tensor]
) -> tuple[dict[str, Callable[[], Any]], dict[str, GradGuard]]:
    params = list(module.parameters())
    cases: dict[str, Callable[[], Any]] = {
        "torch._foreach_norm": lambda: torch._foreach_norm([p.grad for p in params]),
        "clip_grad_norm_(1.0)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
    }
    guards: dict[str, GradGuard] = {}
    for v in VARIANTS + (COMPILED_VARIANTS if getattr(args, "compile", False) else ()):
        if v.callback is None or not v.key.startswith("gg_"):
            continue
        guard = v.callback()
        assert isinstance(guard, GradGuard)
        trainer = _trainer(args, 1, [guard], None)
        _fit(module, trainer, 1)
        guards[v.key] = guard
        cases[v.key] = _guard_step(guard, trainer, module)
    module.to(args.device)  # the end of a fit moves the model to the CPU; parameters stay the same objects
    if ZClipLightningCallback is not None:
        zc = ZClipLightningCallback()
        _set_grads(module, fixed)
        for _ in range(zc.zclip.warmup_steps + 1):  # steady state: past its warm-up
            zc.on_before_optimizer_step(None, module, None)
        cases["zclip_callback"] = lambda: zc.on_before_optimizer_step(None, module, None)
    cases["lightning grad_norm()"] = lambda: grad_norm(module, norm_type=2)
    _set_grads(module, fixed)
    return cases, guards


def bench_micro(args: argparse.Namespace, clock: _Clock, spec: _ModelSpec) -> list[dict[str, Any]]:
    """Per-step work on fixed gradients, interleaved rounds of ``calls`` calls per case."""
    module = _BenchModule(spec, torch.device(args.device), args.quick)
    module.to(args.device)
    fixed = _fixed_grads(module)
    cases, _ = _micro_cases(args, module, fixed)
    rounds, calls = (3, 2) if args.quick else (15, 10)
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for name in names:  # warm-up
        cases[name]()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = cases[name]
            w0, c0 = clock.now()
            for _ in range(calls):
                fn()
            w1, c1 = clock.now()
            times[name].append(clock.pick(w1 - w0, c1 - c0) / calls * 1e3)
    extra_mb: dict[str, float] = {}
    if args.device == "cuda":
        for name in names:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cases[name]()
            torch.cuda.synchronize()
            extra_mb[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    ref_norm = statistics.median(times["torch._foreach_norm"])
    ref_clip = statistics.median(times["clip_grad_norm_(1.0)"])
    ops = {name: _ops_per_call(cases[name]) for name in names}
    rows = []
    for name in names:
        med, lo, hi = _quantiles(times[name])
        rows.append(
            {
                "model": spec.name,
                "case": name,
                "ms": med,
                "ms_p25": lo,
                "ms_p75": hi,
                "ops": ops[name],
                "x_foreach_norm": med / ref_norm,
                "x_clip_grad_norm": med / ref_clip,
                "extra_mb": extra_mb.get(name),
                "rounds": rounds,
                "calls": calls,
            }
        )
    return rows


_SCOPE = "gradguard::"


def _top_level(events: Any) -> list[Any]:
    """The profiler events called from Python (not from inside another op), the component scopes left out."""
    return [
        e
        for e in events
        if not e.name.startswith(_SCOPE) and (e.cpu_parent is None or e.cpu_parent.name.startswith(_SCOPE))
    ]


def _ops_per_call(fn: Callable[[], Any], calls: int = 3) -> float:
    """Top-level torch ops per call of ``fn`` (``torch.profiler``, CPU activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return len(_top_level(prof.events())) / calls


@contextlib.contextmanager
def _component_scopes() -> Iterator[None]:
    """Label each component's ops with a ``record_function`` scope (only while profiling: the classes are patched)."""
    from torch.profiler import record_function

    from lightning_gradguard import engine as engine_module
    from lightning_gradguard.clip import Clipper
    from lightning_gradguard.detect import ExplodingDetector, VanishingDetector
    from lightning_gradguard.stats import GradStats

    targets = [
        (GradStats, "measure", "measure"),
        (ExplodingDetector, "update", "exploding detector"),
        (VanishingDetector, "update", "vanishing detector"),
        (Clipper, "clip_grads_", "clipper"),
        (Clipper, "prepare_", "clipper"),
        (Clipper, "scale_", "clipper"),
        (engine_module._Record, "update", "record"),
        (engine_module.GuardEngine, "step", "engine glue"),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in targets]

    def scoped(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(_SCOPE + label):
                return fn(*args, **kwargs)

        return wrapper

    def run(tail: Any, part: str, *args: Any) -> Any:
        # A compiled part runs as one region: its ops are the part's, whatever the components inside.
        names = {"pre": "derive + detectors", "post": "record", "whole": "whole tail", "whole_clip": "whole tail"}
        label = names[part] + " (compiled)"
        with record_function(_SCOPE + (label if tail.compiled else "engine glue")):
            return original_run(tail, part, *args)

    original_run = engine_module._Tail.__call__
    try:
        for cls, name, label in targets:
            setattr(cls, name, scoped(cls.__dict__[name], label))
        engine_module._Tail.__call__ = run  # type: ignore[method-assign]
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
        engine_module._Tail.__call__ = original_run  # type: ignore[method-assign]


_COMPONENTS = (
    "measure",
    "exploding detector",
    "vanishing detector",
    "clipper",
    "record",
    "engine glue",
    "derive + detectors (compiled)",
    "record (compiled)",
    "whole tail (compiled)",
    "callback glue",
)


def profile_components(args: argparse.Namespace, spec: _ModelSpec, table: bool = False) -> dict[str, Any]:
    """Top-level ops per quiet step of each GradGuard variant on ``spec``, split by component."""
    from torch.profiler import ProfilerActivity, profile

    module = _BenchModule(spec, torch.device(args.device), args.quick)
    module.to(args.device)
    fixed = _fixed_grads(module)
    cases, _ = _micro_cases(args, module, fixed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    n = 10
    result: dict[str, Any] = {"model": spec.name, "variants": {}, "tables": {}}
    names = ["gg_monitor", "gg_defaults"] + (["gg_monitor_compiled", "gg_defaults_compiled"] if args.compile else [])
    for name in names:
        # The first call after the guard's first (eager) step is the one that compiles a compiled variant: its wall
        # time is what a user waits for once (inductor's on-disk cache from an earlier run shortens it).
        start = time.perf_counter()
        cases[name]()
        first_call_s = time.perf_counter() - start
        for _ in range(ZClip().warmup_steps + 4):  # steady state: past the default clipper's warm-up (and compiled)
            cases[name]()
        with _component_scopes(), profile(activities=activities) as prof:
            for _ in range(n):
                cases[name]()
        per: dict[str, float] = dict.fromkeys(_COMPONENTS, 0.0)
        for e in _top_level(prof.events()):
            scope = e.cpu_parent.name[len(_SCOPE) :] if e.cpu_parent is not None else "callback glue"
            per[scope] = per.get(scope, 0.0) + 1.0 / n
        result["variants"][name] = {"total": sum(per.values()), **per, "first_call_s": first_call_s}
        if table:
            result["tables"][name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return result


def profile_guard(args: argparse.Namespace, specs: Sequence[_ModelSpec]) -> str:
    """Per-component op counts for every model, and a torch.profiler table of the first."""
    rows = []
    out = []
    compiles = []
    for i, spec in enumerate(specs):
        found = profile_components(args, spec, table=i == 0)
        for name, per in found["variants"].items():
            rows.append(
                [spec.name, name, f"{per['total']:.0f}"] + [f"{per[c]:.0f}" if per[c] else "-" for c in _COMPONENTS]
            )
            if name.endswith("_compiled"):
                compiles.append(f"  {spec.name} {name}: {per['first_call_s']:.1f} s (wall)")
        for name, text in found["tables"].items():
            out += [f"{name} on {spec.name}: {found['variants'][name]['total']:.0f} top-level ops per step", text]
    header = ["model", "variant", "ops/step", *_COMPONENTS]
    if compiles:
        compiles = ["First call of each compiled variant (the one that compiles):", *compiles, ""]
    return "\n".join(
        ["Top-level torch ops per quiet step, by component (torch.profiler, CPU activity)", _table(header, rows), ""]
        + compiles
        + out
    )


# ----------------------------------------------------------------------------------------------------------- logging
def bench_logging(
    args: argparse.Namespace, clock: _Clock, spec: _ModelSpec, logroot: str, plain_step_ms: float | None
) -> dict[str, Any]:
    """A logging step with one layer per parameter tensor, against ``SummaryWriter.add_scalar`` of as many scalars."""
    from torch.utils.tensorboard import SummaryWriter

    module = _BenchModule(spec, torch.device(args.device), args.quick)
    per_tensor = {"group_fn": lambda name: name}  # one layer per parameter tensor: the most scalars per log
    n = 3 if args.quick else 12
    logging_steps: list[float] = []
    quiet_steps: list[float] = []
    flush_ms: list[float] = []
    guard: GradGuard | None = None
    for rep in range(1 if args.quick else 2):
        for every, sink in ((1, logging_steps), (LOG_EVERY, quiet_steps)):
            # Pictures are timed on their own below (drawn every IMAGE_EVERY steps by default, never in this window).
            guard = GradGuard(log_every_n_steps=every, image_every_n_steps=None, **per_tensor)
            timer = _StepTimer(clock, per_step=True)  # every step on its own, on a GPU too
            trainer = _trainer(args, n + 2, [guard, timer], os.path.join(logroot, "logging", f"{every}-{rep}"))
            with _wrapped(guard, ["on_train_batch_end"], timer):
                _fit(module, trainer, n + 2)
            # Skip the first two steps: the first flush also writes the dashboard layout and the configuration.
            for i in range(3, len(timer.marks)):
                sink.append(
                    clock.pick(timer.marks[i][1] - timer.marks[i - 1][1], timer.marks[i][2] - timer.marks[i - 1][2])
                )
                if every == 1:
                    flush_ms.append(clock.pick(timer.marks[i][3], timer.marks[i][4]) * 1e3)
    assert guard is not None
    layers = len(guard.layer_names())
    # The scalars of one logging step: the per-layer norms plus the run-level scalars (about 20).
    scalars = layers + 20
    board = guard._board
    image_ms = math.nan
    if board is not None:
        drawn = []
        for step in range(1 if args.quick else 2):  # the second drawing: the first may still load fonts
            w0, c0 = clock.now()
            board.write_images(10**6 + step)
            w1, c1 = clock.now()
            drawn.append(clock.pick(w1 - w0, c1 - c0) * 1e3)
        image_ms = drawn[-1]
    writer = SummaryWriter(os.path.join(logroot, "logging", "add_scalar"))
    tags = [f"gradguard/layer/{i}" for i in range(scalars)]
    add_ms = []
    for rep in range(2 if args.quick else 5):
        w0, c0 = clock.now()
        for i, tag in enumerate(tags):
            writer.add_scalar(tag, float(i), rep)
        w1, c1 = clock.now()
        add_ms.append(clock.pick(w1 - w0, c1 - c0) * 1e3)
    writer.close()
    extra = statistics.median(logging_steps) * 1e3 - statistics.median(quiet_steps) * 1e3
    base = plain_step_ms if plain_step_ms else statistics.median(quiet_steps) * 1e3
    amortized = (extra + (image_ms if not math.isnan(image_ms) else 0.0) * LOG_EVERY / IMAGE_EVERY) / (LOG_EVERY * base)
    return {
        "model": spec.name,
        "layers": layers,
        "scalars": scalars,
        "logging_step_extra_ms": extra,
        "flush_hook_ms": statistics.median(flush_ms),
        "images_ms": image_ms,
        "add_scalar_ms": statistics.median(add_ms),
        "plain_step_ms": base,
        "share_of_training": amortized,
    }


# ------------------------------------------------------------------------------------------------------------ memory
def _held_bytes(root: Any) -> int:
    """Bytes of the tensors and numpy arrays reachable from ``root`` through lightning_gradguard objects."""
    seen: set[int] = set()
    storages: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.is_sparse or not hasattr(obj, "untyped_storage"):
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith("lightning_gradguard") and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


class _MemoryProbe(Callback):
    def __init__(self, guard: GradGuard, at: Sequence[int]) -> None:
        self.guard = guard
        self.at = set(at)
        self.rows: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step not in self.at:
            return
        gc.collect()
        buf = io.BytesIO()
        torch.save(self.guard.state_dict(), buf)
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*lightning_gradguard*")])
        self.rows[step] = {
            "state_bytes": buf.tell(),
            "held_bytes": _held_bytes(self.guard),
            "python_bytes": sum(s.size for s in snapshot.statistics("filename")),
            "rss_mb": _rss_mb(),
        }


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return math.nan


def bench_memory(args: argparse.Namespace, logroot: str) -> list[dict[str, Any]]:
    """GradGuard's state after ``few`` and after ``many`` steps of one fit (a small model, so many steps are cheap)."""
    few, many = (10, 30) if args.quick else (100, 1000)
    spec = _ModelSpec(
        "tiny",
        lambda quick: nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.Tanh())]),
        lambda g, quick: (torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)),
        F.mse_loss,
        "",
        0,
        0,
        0,
    )
    variants = [v for v in VARIANTS if v.key in ("gg_defaults", "gg_autoclip")]
    if args.quick:
        variants = variants[:1]
    rows = []
    for v in variants:
        module = _BenchModule(spec, torch.device(args.device), args.quick)
        guard = v.callback()  # type: ignore[misc]
        assert isinstance(guard, GradGuard)
        probe = _MemoryProbe(guard, (few, many))
        # --quick leaves TensorBoard out: its pictures, drawn under tracemalloc, would take most of the run.
        trainer = _trainer(
            args,
            many,
            [guard, probe],
            None if args.quick else os.path.join(logroot, "memory", v.key),
            log_every_n_steps=10 if args.quick else LOG_EVERY,
        )
        tracemalloc.start(1)
        try:
            _fit(module, trainer, many)
        finally:
            tracemalloc.stop()
        a, b = probe.rows[few], probe.rows[many]
        rows.append(
            {
                "variant": v.key,
                "steps": [few, many],
                **{f"{k}_{few}": a[k] for k in a},
                **{f"{k}_{many}": b[k] for k in b},
                # Checkpoint and held tensors/arrays are exact; the Python heap also moves with library caches (fonts,
                # text layout of the pictures) and is shown, not counted.
                "growth_bytes": (b["state_bytes"] - a["state_bytes"]) + (b["held_bytes"] - a["held_bytes"]),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------------- syncs
class _SyncCounter(Callback):
    def __init__(self) -> None:
        self.syncs = 0
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps += 1

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    self.syncs += sum("synchroniz" in str(w.message) for w in caught)

        return counted


def bench_syncs(args: argparse.Namespace, spec: _ModelSpec, variants: Sequence[_Variant]) -> list[dict[str, Any]]:
    """Host-device synchronizations inside each variant's hooks on non-logging steps (CUDA only)."""
    module = _BenchModule(spec, torch.device(args.device), args.quick)
    steps = 5 if args.quick else 20
    rows = []
    for v in variants:
        counter = _SyncCounter()
        callbacks: list[Callback] = []
        targets: list[tuple[Any, list[str]]] = [(module, ["configure_gradient_clipping"])]
        if v.callback is not None:
            cb = v.callback()
            callbacks.append(cb)
            targets = [(cb, _own_hooks(cb))]
        if v.recipe:
            targets = [(module, ["on_before_optimizer_step"])]
        kwargs = {"gradient_clip_val": v.clip_val} if v.clip_val is not None else {}
        trainer = _trainer(args, steps, [*callbacks, counter], None, **kwargs)
        module.recipe = v.recipe
        originals = []
        for obj, names in targets:
            for name in names:
                originals.append((obj, name))
                setattr(obj, name, counter.wrap(getattr(obj, name)))
        try:
            _fit(module, trainer, steps)
        finally:
            module.recipe = False
            for obj, name in originals:
                delattr(obj, name)
        rows.append({"model": spec.name, "variant": v.key, "syncs_per_step": counter.syncs / max(counter.steps, 1)})
    return rows


# ------------------------------------------------------------------------------------------------------------- goals
def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each with what was measured and whether it is met (``None``: not measured)."""
    goals: list[dict[str, Any]] = []

    def add(
        goal: str, measured: float | None, target: float, lower_is_better: bool = True, fmt: str = "{:.2f}x"
    ) -> None:
        met = (
            None
            if measured is None or math.isnan(measured)
            else (measured <= target if lower_is_better else measured >= target)
        )
        goals.append(
            {
                "goal": goal,
                "measured": measured,
                "target": target,
                "met": met,
                "text": "-" if measured is None else fmt.format(measured),
                "target_text": ("<= " if lower_is_better else ">= ") + fmt.format(target),
            }
        )

    micro = {(r["model"], r["case"]): r for r in result.get("micro", [])}
    steps = {(r["model"], r["variant"]): r for r in result.get("steps", [])}
    for model in result["meta"]["models"]:
        if (model, "gg_monitor") in micro:
            add(f"{model}: monitor-only work / one _foreach_norm", micro[model, "gg_monitor"]["x_foreach_norm"], 1.2)
        if (model, "gg_defaults") in micro:
            add(
                f"{model}: defaults work / clip_grad_norm_",
                micro[model, "gg_defaults"]["x_clip_grad_norm"],
                2.0 if model == "lstm" else 1.1,
            )
            add(f"{model}: defaults ops per quiet step", micro[model, "gg_defaults"]["ops"], 30, fmt="{:.0f}")
        if (model, "gg_monitor") in micro:
            add(f"{model}: monitor-only ops per quiet step", micro[model, "gg_monitor"]["ops"], 12, fmt="{:.0f}")
        for case in ("gg_defaults_compiled", "gg_monitor_compiled"):
            if (model, case) in micro:
                add(
                    f"{model}: {case} ops per quiet step",
                    micro[model, case]["ops"],
                    30 if case.startswith("gg_defaults") else 12,
                    fmt="{:.0f}",
                )
        if (model, "zclip_callback") in micro and (model, "gg_defaults") in micro:
            add(
                f"{model}: ZClipLightningCallback work / defaults work",
                micro[model, "zclip_callback"]["ms"] / micro[model, "gg_defaults"]["ms"],
                2.0,
                lower_is_better=False,
            )
        if (model, "gg_defaults") in steps:
            target = 1.12 if model == "mlp800" else 1.01
            add(
                f"{model}: defaults whole step / plain step",
                steps[model, "gg_defaults"]["ratio"],
                target,
                fmt="{:.3f}x",
            )
        if (model, "lightning_grad_norm") in steps and (model, "gg_defaults") in steps:
            add(
                f"{model}: defaults step / grad_norm-recipe step",
                steps[model, "gg_defaults"]["ratio"] / steps[model, "lightning_grad_norm"]["ratio"],
                1.0,
                fmt="{:.3f}x",
            )
    log = result.get("logging")
    if log:
        add(
            f"{log['model']}: logging-step extra / add_scalar of {log['scalars']} scalars",
            log["logging_step_extra_ms"] / log["add_scalar_ms"],
            1.0,
        )
        add(
            f"{log['model']}: logging share of training at every {LOG_EVERY} steps",
            log["share_of_training"] * 100,
            1.0,
            fmt="{:.2f}%",
        )
    for row in result.get("memory", []):
        add(
            f"memory growth {row['steps'][0]} -> {row['steps'][1]} steps ({row['variant']})",
            float(row["growth_bytes"]),
            0.0,
            fmt="{:.0f} B",
        )
    return goals


# -------------------------------------------------------------------------------------------------------------- main
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--variants", default=None, help="comma-separated variant keys (default: all); plain is always run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the interleaved fits (default: per model)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per fit (default: per model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on the CPU: 1)")
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="cpu = process CPU time (CPU default), wall = perf_counter (CUDA default)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': to stdout only)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print GradGuard's top-level ops per quiet step by component, and a torch.profiler table",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also measure GradGuard(compile=True) in micro and profile (slow to compile on a CPU)",
    )
    p.add_argument("--skip", default="", help="comma-separated sections to skip: steps,micro,logging,memory,syncs")
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in SPECS]
    if unknown or not args.model_list:
        p.error(f"--models must name some of {', '.join(MODELS)}, got {args.models!r}")
    keys = [v.key for v in VARIANTS]
    chosen = keys if args.variants is None else ["plain"] + [k.strip() for k in args.variants.split(",") if k.strip()]
    bad = [k for k in chosen if k not in keys]
    if bad:
        p.error(f"--variants must name some of {', '.join(keys)}, got {bad}")
    args.variant_list = [v for v in VARIANTS if v.key in chosen]
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("reps", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section chosen by ``args``; the results as plain values."""
    device = torch.device(args.device)
    clock = _Clock(device, args.clock or ("cpu" if device.type == "cpu" else "wall"))
    variants = []
    skipped = []
    for v in args.variant_list:
        if _available(v):
            variants.append(v)
        else:
            skipped.append(f"{v.key}: `{v.requires}` is not installed (pip install {v.requires})")
    result: dict[str, Any] = {
        "meta": {
            "command": "python -m benchmarks.overhead " + " ".join(args.argv),
            "device_type": device.type,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "clock": clock.primary,
            "quick": args.quick,
            "models": args.model_list,
            "variants": [v.key for v in variants],
            "skipped": skipped,
            "log_every_n_steps": LOG_EVERY,
            "describe": {m: SPECS[m].describe + (" (--quick: reduced)" if args.quick else "") for m in args.model_list},
        },
    }
    started = time.perf_counter()
    sections: dict[str, float] = {}

    @contextlib.contextmanager
    def section(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        sections[name] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as logroot:
        if "steps" not in args.skip_set:
            result["steps"] = []
            with section("steps"):
                for m in args.model_list:
                    result["steps"] += bench_steps(args, clock, SPECS[m], variants)
        if "micro" not in args.skip_set:
            result["micro"] = []
            with section("micro"):
                for m in args.model_list:
                    result["micro"] += bench_micro(args, clock, SPECS[m])
        if "logging" not in args.skip_set:
            model = "mlp800" if "mlp800" in args.model_list else args.model_list[0]
            plain = next(
                (r["step_ms"] for r in result.get("steps", []) if r["model"] == model and r["variant"] == "plain"), None
            )
            with section("logging"):
                result["logging"] = bench_logging(args, clock, SPECS[model], logroot, plain)
        if "memory" not in args.skip_set:
            with section("memory"):
                result["memory"] = bench_memory(args, logroot)
        if device.type == "cuda" and "syncs" not in args.skip_set:
            result["syncs"] = []
            with section("syncs"):
                for m in args.model_list:
                    result["syncs"] += bench_syncs(args, SPECS[m], variants)
        if args.profile:
            with section("profile"):
                result["profile"] = profile_guard(args, [SPECS[m] for m in args.model_list])
    result["meta"]["seconds"] = time.perf_counter() - started
    result["meta"]["section_seconds"] = sections
    result["goals"] = evaluate_goals(result)
    return result


def report(result: dict[str, Any]) -> str:
    """The results as text tables."""
    meta = result["meta"]
    clock = "CPU time" if meta["clock"] == "cpu" else "wall time"
    took = ", ".join(f"{k} {v:.0f} s" for k, v in meta.get("section_seconds", {}).items())
    out = [
        f"GradGuard overhead: {meta['device']}, torch {meta['torch']}, lightning {meta['lightning']}, "
        f"{meta['threads']} thread(s), clock: {clock}, {meta['seconds']:.0f} s ({took})",
        f"command: {meta['command']}",
    ]
    out += [f"  {m}: {d}" for m, d in meta["describe"].items()]
    out += [f"skipped: {s}" for s in meta["skipped"]]
    if result.get("steps"):
        if meta["device_type"] == "cuda":
            how = (
                "mean step of each fit, synchronized at both ends of the window; median and IQR over repetitions; "
                "hook: host time inside the variant's hooks"
            )
        else:
            how = "median and IQR over non-logging steps; hook: time inside the variant's hooks"
        out += ["", f"Training steps (Trainer.fit; {how}; ratio: per-repetition pairs vs plain, median [min-max])"]
        rows = [
            [
                r["model"],
                r["label"],
                r["step_ms"],
                f"{r['step_ms_p25']:.2f}-{r['step_ms_p75']:.2f}",
                f"{r['ratio']:.3f} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]",
                r["hook_ms"],
                f"{100 * r['hook_share']:.2f}%",
                r["peak_mb"],
                f"{r['reps']}x{r['steps_timed'] // max(r['reps'], 1)}",
            ]
            for r in result["steps"]
        ]
        out.append(
            _table(
                [
                    "model",
                    "variant",
                    "step ms",
                    "IQR",
                    "ratio vs plain",
                    "hook ms",
                    "hook/plain",
                    "peak MB",
                    "reps x steps",
                ],
                rows,
            )
        )
    if result.get("micro"):
        out += [
            "",
            "Per-step work on fixed gradients (GradGuard: its 3 hooks of a non-logging step), median over rounds",
        ]
        rows = [
            [
                r["model"],
                r["case"],
                r["ms"],
                f"{r['ms_p25']:.3f}-{r['ms_p75']:.3f}",
                r["x_foreach_norm"],
                r["x_clip_grad_norm"],
                f"{r['ops']:.0f}",
                r["extra_mb"],
            ]
            for r in result["micro"]
        ]
        out.append(
            _table(["model", "case", "ms", "IQR", "x _foreach_norm", "x clip_grad_norm_", "ops/call", "extra MB"], rows)
        )
    log = result.get("logging")
    if log:
        out += ["", f"Logging step ({log['model']}, {log['layers']} layers = one per tensor, {log['scalars']} scalars)"]
        out.append(
            _table(
                [
                    "logging-step extra ms",
                    "flush hook ms",
                    f"images ms (every {IMAGE_EVERY})",
                    f"add_scalar x{log['scalars']} ms",
                    f"share of training (every {LOG_EVERY})",
                ],
                [
                    [
                        log["logging_step_extra_ms"],
                        log["flush_hook_ms"],
                        log["images_ms"],
                        log["add_scalar_ms"],
                        f"{100 * log['share_of_training']:.2f}%",
                    ]
                ],
            )
        )
    if result.get("memory"):
        out += ["", "Memory: GradGuard state after few vs many steps (small model)"]
        rows = []
        for r in result["memory"]:
            a, b = r["steps"]
            rows.append(
                [
                    r["variant"],
                    f"{a} -> {b}",
                    f"{r[f'state_bytes_{a}']} -> {r[f'state_bytes_{b}']}",
                    f"{r[f'held_bytes_{a}']} -> {r[f'held_bytes_{b}']}",
                    f"{r[f'python_bytes_{a}']} -> {r[f'python_bytes_{b}']}",
                    f"{r[f'rss_mb_{a}']:.0f} -> {r[f'rss_mb_{b}']:.0f}",
                    r["growth_bytes"],
                ]
            )
        out.append(
            _table(
                ["variant", "steps", "checkpoint B", "tensors+arrays B", "python heap B (info)", "RSS MB", "growth B"],
                rows,
            )
        )
    if result.get("syncs"):
        out += ["", "Host-device syncs inside the hooks, per non-logging step"]
        out.append(
            _table(
                ["model", "variant", "syncs/step"],
                [[r["model"], r["variant"], r["syncs_per_step"]] for r in result["syncs"]],
            )
        )
    if result.get("goals"):
        out += ["", "Goals (measured, not asserted)"]
        out.append(
            _table(
                ["goal", "measured", "target", "met"],
                [
                    [g["goal"], g["text"], g["target_text"], {True: "yes", False: "NO", None: "-"}[g["met"]]]
                    for g in result["goals"]
                ],
            )
        )
    if result.get("profile"):
        out += ["", "Profile of GradGuard's per-step work", result["profile"]]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables (or the JSON with ``--json -``) and return the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    quiet = [
        logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard")
    ]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run(args)
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if args.json == "-":
        print(json.dumps(result, indent=1, default=str))
    else:
        print(report(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
