"""Does GradGuard rescue unstable training, and does it leave healthy training alone?

Each config of a small suite is trained from the same seed, on the same batches in the same order, without a guard,
with plain ``GradGuard()`` (``ZClip(z_thresh=4.0)``, LRGuard, ``on_nonfinite="skip"``, and the early restart of
``default_rollback()`` with its rescue clipper), with the same guard without that restart
(``GradGuard(rollback=None)``), with ``GradGuard()`` whose exploding detector holds the total norm to 5x its running
mean (``ExplodingDetector(max_ratio=5)``: the guard for runs that may diverge in their first steps) and with the
opt-in full rollback (``GradGuard(rollback=True)``, ``full_rollback()``: on an LR cut, back to the last weights and
optimizer state known to have trained calmly, with the early restart's remedies), and, with ``--clippers``, with each
other clipper in place of the default ZClip, every other default kept (``GradGuard(clip=AutoClip())``,
``GradGuard(clip=AGC())``, ``GradGuard(clip=AdaGC())``, ``GradGuard(clip=NormClip(max_norm=1.0))``, the last with the
usual ``gradient_clip_val``); the configs taken from an example that recommends its own guard (``build_guard()`` of
``examples/lstm_adding.py`` or ``examples/cifar_resnet.py``)
get one more run with that guard.
Every run is then evaluated on held-out data. The table reports, per run:

* **held-out**: the loss of the final weights on data the run never trained on (MSE for the adding problem,
  cross-entropy and accuracy for classification);
* **diverged?**: the held-out loss is NaN/inf or above the config's threshold (10x the predict-the-mean MSE of the
  adding problem, 3 ln(classes) for classification: far worse than guessing);
* **NaN at**: the first training step (counting from 1) whose loss was not finite, ``-`` if none, and how many
  steps had a non-finite loss; a run stops early after 20 non-finite losses in a row (marked ``stopped``): nothing
  brings it back, and NaN steps only cost time;
* the guard's events from ``GradGuard.summary()`` (clipped steps, exploding, nonfinite/skipped, lr_reduced,
  rolled_back, vanishing with the layer named first), and how many warnings the guard raised (kept out of the output,
  counted).

The configs that diverge unguarded (``lstm_10x``, ``rnn_tanh``, ``resnet20_nobn``) also train unguarded at a few
lower learning rates (variants ``unguarded_lr<rate>``; ``--no-sweep`` skips them): the best of them is the *tuned
rate*, and a guarded run at the too-high rate counts as **rescued** only when its held-out loss is no worse than
the tuned rate's, in the same number of steps. A run that merely stays finite is not a rescue. ``--sweep-idle N``
zeroes the sweep runs' gradients for their first N steps: the tuned rate then shows the best that a guard could
reach which restarted at that rate after N steps (a guard has to see a rate fail before it can lower it). One seed says
little on these configs: ``benchmarks/rescue_seeds.py`` runs them on many seeds and counts the rescues.

Under the table one line per config says what its runs show (diverged, rescued, finite but not learning, as good).

The suite (``--configs`` picks a subset):

* ``lstm_10x``: the adding problem with an LSTM, SGD (momentum 0.9) at learning rate 1.0, ten times the rate the
  example trains at stably (0.1), on sequences of 10 steps. Ten times the example's Adam rate (1e-2) is no test:
  Adam's step is bounded by its learning rate and trains without incident. At this length the example's guard
  turned the rate into a solved task (MSE < 0.01 in 400 steps) for seeds 0, 2 and 3 but not 1, where the stable
  rate itself reached 0.13 to 0.17; on 20- and 50-step sequences it kept the runs finite, but they did not learn
  in 400 steps (neither does SGD at the stable rate);
* ``rnn_tanh``: the adding problem (50 steps) with a plain tanh RNN at SGD rate 0.1, which the LSTM takes in its
  stride; below about 0.1 the RNN trains without incident, above it diverges within the first 40 steps;
* ``resnet20_nobn``: CIFAR ResNet-20 without batch norm at learning rate 0.5, on synthetic CIFAR-shaped data;
* ``mlp_sigmoid50``: a 50-layer plain sigmoid MLP: vanishing gradients, which GradGuard reports but cannot repair;
* ``resnet20``: ResNet-20 at the paper's recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, lr /10 at 50% and 75%,
  crop and flip), short: the healthy control, where the guarded run must do as well as the unguarded one.

The default suite fits two CPU cores in a few minutes (short sequences, a few hundred steps, small batches; the
header lists every setting). ``--full`` trains longer on larger batches, meant for a GPU (``--device cuda``);
``--quick`` runs a few steps per config: it checks that everything works, its verdicts mean nothing. On the CPU a
rerun reproduces the recurrent configs bitwise (one thread each); the ResNets train their convolutions on several
threads and vary in the last digits, and more where a guard's decision sits near its threshold (seed 0's
``max_ratio=5`` ResNet without BN ended at CE 2.3034 and 2.3047 in two runs of the same code). On a GPU some kernels
are not bitwise deterministic either.

Run from the repository root::

    python benchmarks/stability.py                              # default suite, a few minutes on 2 CPU cores
    python benchmarks/stability.py --configs lstm_10x,resnet20 --json out.json
    python benchmarks/stability.py --configs lstm_10x,rnn_tanh,resnet20_nobn --clippers   # and each other clipper
    python benchmarks/stability.py --configs resnet20 --variants guarded      # unguarded and GradGuard() only
    python benchmarks/stability.py --configs resnet20_nobn --variants guarded --sweep-idle 20   # a perfect restart
    python benchmarks/stability.py --full --device cuda
    python benchmarks/stability.py --quick --json -             # about a minute; JSON on stdout

TensorBoard logs go to a new temporary folder unless ``--logdir`` names one (``tensorboard --logdir DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import ExplodingDetector, GradGuard

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    CLIPPER_GUARDS,
    add_clippers_argument,
    machine,
    num,
    run_main,
)
from examples import cifar_resnet, lstm_adding
from examples.cifar_resnet import CifarDataModule, ResNetModule
from examples.lstm_adding import BASELINE_MSE, SOLVED_MSE, AddingModule, AddingStream, adding_problem

__all__ = ["CONFIGS", "DeepMLPModule", "main", "report", "run"]

Size = Literal["quick", "default", "full"]
#: Every config runs these; some add "guarded_example", with the guard their example recommends, and ``--clippers``
#: adds the runs of CLIPPER_GUARDS.
VARIANTS = ("unguarded", "guarded", "guarded_norestart", "guarded_ratio5", "guarded_rollback")
#: The guarded runs ``--variants`` may pick.
GUARDED_VARIANTS = (*VARIANTS[1:], "guarded_skip", *CLIPPER_GUARDS, "guarded_example")
#: The guard of each variant (besides the example's), as written in user code, and how to build it.
GUARDS: dict[str, tuple[str, Callable[[], GradGuard]]] = {
    "guarded": ("GradGuard()", GradGuard),
    # The default without its early restart: what the clipper, the detectors and the LR guard do alone.
    "guarded_norestart": ("GradGuard(rollback=None)", lambda: GradGuard(rollback=None)),
    # The ratio test held to 5x for the total norm: it catches a too-high learning rate in the first steps.
    "guarded_ratio5": (
        "GradGuard(exploding=ExplodingDetector(max_ratio=5))",
        lambda: GradGuard(exploding=ExplodingDetector(max_ratio=5.0)),
    ),
    # The opt-in full rollback: on an LR cut, back to the last weights and optimizer state known to have trained
    # calmly (`full_rollback()`: with the early restart's remedies).
    "guarded_rollback": ("GradGuard(rollback=True)", lambda: GradGuard(rollback=True)),
    # Opt-in (`--variants guarded_skip`): the flagged steps skipped instead of clipped.
    "guarded_skip": ("GradGuard(skip_exploding=True)", lambda: GradGuard(skip_exploding=True)),
    **CLIPPER_GUARDS,
}
#: Variant name prefix of the unguarded tuned-rate sweep runs ("unguarded_lr0.3").
SWEEP_PREFIX = "unguarded_lr"
#: Consecutive non-finite training losses after which a run is stopped: its NaN steps would only cost time.
STOP_AFTER_NONFINITE = 20
_CHECK_EVERY = 10  # losses are read from the device in chunks, not every step


# ------------------------------------------------------------------------------------------------------ models
class DeepMLPModule(L.LightningModule):
    """A deep plain MLP classifier (``depth`` Linear + activation layers, no normalisation, no shortcuts).

    With a sigmoid, whose slope is at most 1/4, the gradient reaching the first layers shrinks geometrically with
    depth: the classic vanishing-gradient net.

    Args:
        depth: Number of hidden Linear layers (a Linear head comes on top).
        width: Width of every hidden layer.
        in_features: Input features.
        num_classes: Output classes.
        lr: SGD learning rate (momentum 0.9).
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.

    Example:
        >>> m = DeepMLPModule(depth=3, width=8, in_features=4, num_classes=2)
        >>> m(torch.zeros(5, 4)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        depth: int = 50,
        width: int = 64,
        in_features: int = 32,
        num_classes: int = 10,
        lr: float = 0.1,
        activation: Literal["sigmoid", "tanh", "relu"] = "sigmoid",
    ) -> None:
        super().__init__()
        acts: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {tuple(acts)}, got {activation!r}")
        for name, value in (("depth", depth), ("width", width), ("in_features", in_features)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.net = nn.Sequential()
        for i in range(depth):
            self.net.add_module(f"fc{i}", nn.Linear(in_features if i == 0 else width, width))
            self.net.add_module(f"act{i}", acts[activation]())
        self.net.add_module("head", nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _teacher_data(n: int, in_features: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher: a shallow net learns it in a few hundred steps."""
    teacher = torch.randn(in_features, num_classes, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(n, in_features, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(dim=1)


# ------------------------------------------------------------------------------------------------------- configs
@dataclass
class _Job:
    """One config at one size: factories for everything a run needs (called afresh for each run)."""

    name: str
    title: str
    settings: str
    steps: int
    module: Callable[[], L.LightningModule]
    data: Callable[[], DataLoader | L.LightningDataModule]
    evaluate: Callable[[L.LightningModule, Any, torch.device], dict[str, float]]
    metric: Literal["mse", "acc"]
    threshold: float  # held-out loss above which a run counts as diverged
    chance: float  # held-out MSE of predicting the mean, or accuracy of guessing
    n_test: int
    # A third run with the guard the config's example recommends: (label, factory).
    example_guard: tuple[str, Callable[[], GradGuard]] | None = None
    log_every: int = 10
    parallel: bool = False  # convolutions: worth more than one CPU thread
    # The tuned-rate sweep: unguarded runs at these learning rates, and the module at a given rate.
    sweep: tuple[float, ...] = ()
    module_at: Callable[[float], L.LightningModule] | None = None

    def variants(self, sweep: bool = True, clippers: bool = False) -> list[str]:
        variants = [*VARIANTS, *(CLIPPER_GUARDS if clippers else ())]
        if self.example_guard is not None:
            variants.append("guarded_example")
        if sweep:
            variants += [f"{SWEEP_PREFIX}{lr:g}" for lr in self.sweep]
        return variants

    def sweep_lr(self, variant: str) -> float | None:
        """The learning rate of a sweep variant (``None`` for the others)."""
        return float(variant[len(SWEEP_PREFIX) :]) if variant.startswith(SWEEP_PREFIX) else None

    def _guard(self, variant: str) -> tuple[str, Callable[[], GradGuard]] | None:
        if variant == "guarded_example":
            return self.example_guard
        return GUARDS.get(variant)

    def guard_label(self, variant: str) -> str | None:
        guard = self._guard(variant)
        return None if guard is None else guard[0]

    def make_guard(self, variant: str) -> GradGuard | None:
        guard = self._guard(variant)
        return None if guard is None else guard[1]()


def _adding(
    name: str,
    size: Size,
    seed: int,
    model: Literal["lstm", "rnn"],
    lr: float,
    title: str,
    seq_len: int,
    sweep: tuple[float, ...] = (),
) -> _Job:
    hidden, batch, steps, n_test = {
        "quick": (16, 8, 6, 64),
        "default": (128, 32, 400, 1000),
        "full": (128, 50, 3000, 10000),
    }[size]
    if size == "quick":
        seq_len = min(seq_len, 10)

    def evaluate(module: L.LightningModule, data: Any, device: torch.device) -> dict[str, float]:
        x, y = adding_problem(n_test, seq_len, torch.Generator().manual_seed(seed + 777))
        total = 0.0
        for xb, yb in zip(x.split(500), y.split(500)):
            total += float(F.mse_loss(module(xb.to(device)), yb.to(device), reduction="sum"))
        return {"loss": total / n_test}

    return _Job(
        name=name,
        title=title,
        settings=f"T={seq_len}, hidden {hidden}, batch {batch}, {steps} steps, SGD lr {lr:g} momentum 0.9, "
        f"{n_test} held-out sequences",
        steps=steps,
        module=lambda: AddingModule(model=model, hidden_size=hidden, optimizer="sgd", lr=lr),
        module_at=lambda rate: AddingModule(model=model, hidden_size=hidden, optimizer="sgd", lr=rate),
        sweep=sweep,
        data=lambda: DataLoader(AddingStream(seq_len, batch, steps, seed=seed), batch_size=None),
        evaluate=evaluate,
        metric="mse",
        threshold=10 * BASELINE_MSE,
        chance=BASELINE_MSE,
        n_test=n_test,
        example_guard=("lstm_adding.build_guard()", lstm_adding.build_guard),
        log_every=2 if size == "quick" else 10,
    )


def _resnet(
    name: str, size: Size, seed: int, batch_norm: bool, lr: float, title: str, sweep: tuple[float, ...] = ()
) -> _Job:
    batch, steps, n_train, n_test = {
        "quick": (8, 4, 64, 32),
        "default": (32, 400 if batch_norm else 150, 4096, 1000),
        "full": (128, 4000 if batch_norm else 2000, 10000, 2000),
    }[size]

    def data() -> CifarDataModule:
        dm = CifarDataModule(batch_size=batch, synthetic_train=n_train, synthetic_test=n_test, seed=seed)
        with contextlib.redirect_stdout(io.StringIO()):  # the data module announces its synthetic data
            dm.setup("fit")
        return dm

    def evaluate(module: L.LightningModule, dm: CifarDataModule, device: torch.device) -> dict[str, float]:
        dm.augment = False  # on_after_batch_transfer then only normalises, as for the test set in the example
        loss = correct = 0.0
        for images, labels in dm.test_dataloader():
            x, y = dm.on_after_batch_transfer((images.to(device), labels.to(device)), 0)
            logits = module(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
        return {"loss": loss / n_test, "acc": correct / n_test}

    return _Job(
        name=name,
        title=title,
        settings=f"synthetic CIFAR-shaped data ({n_train} train / {n_test} held-out images), batch {batch}, "
        f"{steps} steps, SGD lr {lr:g} momentum 0.9 wd 1e-4, lr /10 at 50% and 75%, crop+flip",
        steps=steps,
        module=lambda: ResNetModule(depth=20, batch_norm=batch_norm, lr=lr),
        module_at=lambda rate: ResNetModule(depth=20, batch_norm=batch_norm, lr=rate),
        sweep=sweep,
        data=data,
        evaluate=evaluate,
        metric="acc",
        threshold=3 * math.log(10),
        chance=0.1,
        n_test=n_test,
        example_guard=None if batch_norm else ("cifar_resnet.build_guard()", cifar_resnet.build_guard),
        log_every=2 if size == "quick" else 10,
        parallel=True,
    )


def _mlp(name: str, size: Size, seed: int) -> _Job:
    depth, width, batch, steps, n_train, n_test = {
        # 30 steps: past the vanishing detector's patience (25), so even the quick run shows an event.
        "quick": (50, 16, 8, 30, 256, 64),
        "default": (50, 64, 64, 300, 8192, 2000),
        "full": (50, 64, 128, 3000, 50000, 10000),
    }[size]
    in_features, classes, lr = 32, 10, 0.1

    def data() -> DataLoader:
        x, y = _teacher_data(n_train, in_features, classes, seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)

    def evaluate(module: L.LightningModule, data_: Any, device: torch.device) -> dict[str, float]:
        x, y = _teacher_data(n_test, in_features, classes, seed + 1)
        logits = module(x.to(device))
        y = y.to(device)
        return {"loss": float(F.cross_entropy(logits, y)), "acc": float((logits.argmax(1) == y).float().mean())}

    return _Job(
        name=name,
        title=f"{depth}-layer plain sigmoid MLP (vanishing gradients)",
        settings=f"width {width}, PyTorch's default init, teacher-labelled Gaussian data ({in_features} features, "
        f"{classes} classes, {n_train} train / {n_test} held-out), batch {batch}, {steps} steps, "
        f"SGD lr {lr:g} momentum 0.9",
        steps=steps,
        module=lambda: DeepMLPModule(depth=depth, width=width, in_features=in_features, num_classes=classes, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="acc",
        threshold=3 * math.log(classes),
        chance=1 / classes,
        n_test=n_test,
        log_every=5 if size == "quick" else 10,
    )


CONFIGS: dict[str, Callable[[Size, int], _Job]] = {
    # Adam's step is bounded by its learning rate, so 10x the example's Adam rate (1e-2) trains without incident;
    # SGD's rate is the one that breaks. The example runs SGD stably at 0.1 (its --unstable uses 5x).
    # The diverging configs also train unguarded at a few lower rates (the sweep): the best of them is the "tuned
    # rate" that a guarded run at the too-high rate should match.
    "lstm_10x": lambda size, seed: _adding(
        "lstm_10x",
        size,
        seed,
        "lstm",
        1.0,
        "LSTM adding problem at 10x the example's stable SGD rate (0.1)",
        10,
        sweep=(0.3, 0.1, 0.03),
    ),
    "rnn_tanh": lambda size, seed: _adding(
        "rnn_tanh",
        size,
        seed,
        "rnn",
        0.1,
        "tanh-RNN adding problem at the SGD rate the example's LSTM takes",
        50,
        sweep=(0.03, 0.01, 0.003),
    ),
    "resnet20_nobn": lambda size, seed: _resnet(
        "resnet20_nobn",
        size,
        seed,
        False,
        0.5,
        "ResNet-20 without batch norm (--no-bn) at lr 0.5",
        # Down to 1/1000 of its rate: without BN it learns in this budget only at 0.005 and below.
        sweep=(0.15, 0.05, 0.015, 0.005, 0.0015, 0.0005),
    ),
    "mlp_sigmoid50": lambda size, seed: _mlp("mlp_sigmoid50", size, seed),
    "resnet20": lambda size, seed: _resnet(
        "resnet20", size, seed, True, 0.1, "ResNet-20 at the paper's recipe, short (healthy control)"
    ),
}


# -------------------------------------------------------------------------------------------------------- runs
class _LossTrace(Callback):
    """Records every training loss; stops the run after ``STOP_AFTER_NONFINITE`` non-finite losses in a row."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.stopped = False
        self._pending: list[Tensor] = []
        self._run = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._pending.append(loss.detach().float().reshape(1))
        if len(self._pending) >= _CHECK_EVERY:
            self._read(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer)

    def _read(self, trainer: L.Trainer) -> None:
        if not self._pending:
            return
        values = torch.cat(self._pending).cpu().tolist()  # one copy per chunk, not one per step
        self._pending = []
        for v in values:
            self._run = 0 if math.isfinite(v) else self._run + 1
        self.losses.extend(values)
        if self._run >= STOP_AFTER_NONFINITE:
            self.stopped = True
            trainer.should_stop = True


class _Idle(Callback):
    """Zeroes the gradients of the first ``steps`` optimizer steps (weight decay still applies): a sweep run that
    starts to learn only at step ``steps + 1``, as a run restarted at its rate by a perfect guard would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step < self.steps:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)


_VANISHING = re.compile(r"vanishing gradients in layer '([^']+)' at step (\d+)")


def _run_one(job: _Job, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    rate = job.sweep_lr(variant)
    module = job.module() if rate is None or job.module_at is None else job.module_at(rate)
    data = job.data()
    guard = job.make_guard(variant)
    trace = _LossTrace()
    callbacks: list[Callback] = [trace] if guard is None else [guard, trace]
    if rate is not None and args.sweep_idle:
        callbacks.append(_Idle(args.sweep_idle))
    logger = TensorBoardLogger(args.logdir, name=job.name, version=variant, default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=job.steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=job.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator=args.device,
        devices=1,
    )
    fit_kwargs: dict[str, Any] = (
        {"datamodule": data} if isinstance(data, L.LightningDataModule) else {"train_dataloaders": data}
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, **fit_kwargs)
    wall_s = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        held_out = job.evaluate(module, data, module.device)

    messages = [str(w.message) for w in caught]
    guard_warnings = [m for m in messages if m.startswith("GradGuard")]
    first_vanishing = None
    for message in guard_warnings:
        match = _VANISHING.search(message)
        if match:
            # The guard stamps an event with the step count after the optimizer step: from 1, like this table.
            first_vanishing = {"layer": match.group(1), "step": int(match.group(2))}
            break
    losses = trace.losses
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    finite_tail = [v for v in losses[-10:] if math.isfinite(v)]
    loss = held_out["loss"]
    return {
        "config": job.name,
        "variant": variant,
        "guard": job.guard_label(variant),
        "sweep_lr": rate,
        "steps_planned": job.steps,
        "steps": len(losses),
        "stopped_early": trace.stopped,
        "metric": job.metric,
        "heldout_loss": loss,
        "heldout_acc": held_out.get("acc"),
        "threshold": job.threshold,
        "diverged": not math.isfinite(loss) or loss > job.threshold,
        "first_nan_step": bad[0] + 1 if bad else None,
        "nonfinite_losses": len(bad),
        "train_loss_last10": sum(finite_tail) / len(finite_tail) if finite_tail else math.nan,
        "events": guard.summary() if guard is not None else None,
        "first_vanishing": first_vanishing,
        "guard_warnings": len(guard_warnings),
        "guard_warning_samples": guard_warnings[:3],
        "other_warnings": len(messages) - len(guard_warnings),
        "wall_s": wall_s,
        "log_dir": logger.log_dir,
    }


def _auto_threads(job: _Job, cpus: int) -> int:
    """Intra-op threads for a config: 1 for the small nets, the idle cores for convolutions.

    The recurrent nets and the MLP are chains of small kernels where extra threads only add synchronisation. The
    ResNets gain from every core, but on a machine whose cores are busy with other work, threads that wait on each
    other make a step several times slower than one thread: the 1-minute load average (less this process, which
    was just training) tells how many cores are free.
    """
    if not job.parallel:
        return 1
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:  # no load average on this platform
        others = 0.0
    return max(1, min(cpus, round(cpus - others)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the selected configs without and with a guard; return ``{"meta", "configs", "rows"}``.

    Args:
        args: The parsed command line (see ``--help``), plus ``command``, the command as typed.
    """
    size: Size = "quick" if args.quick else "full" if args.full else "default"
    host = machine(args.device)
    threads_before = torch.get_num_threads()
    jobs = [CONFIGS[name](size, args.seed) for name in args.configs]
    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for job in jobs:
            threads = None
            if args.device == "cpu":
                # --quick's batches are too small to share between threads.
                threads = args.threads or (1 if size == "quick" else _auto_threads(job, host["cpus"]))
                torch.set_num_threads(threads)
            variants = [
                v
                for v in job.variants(args.sweep, args.clippers)
                if args.variants is None or v == "unguarded" or v in args.variants or job.sweep_lr(v) is not None
            ]
            if args.variants is not None and "guarded_skip" in args.variants:
                # Opt-in, asked for by name only: after GradGuard()'s run when there is one.
                variants.insert(variants.index("guarded" if "guarded" in variants else "unguarded") + 1, "guarded_skip")
            configs.append(
                {
                    "config": job.name,
                    "title": job.title,
                    "settings": job.settings,
                    "steps": job.steps,
                    "variants": variants,
                    "guards": {v: job.guard_label(v) for v in variants},
                    "metric": job.metric,
                    "threshold": job.threshold,
                    "chance": job.chance,
                    "n_test": job.n_test,
                    "threads": threads,
                }
            )
            for variant in variants:
                row = _run_one(job, variant, args)
                rows.append(row)
                print(
                    f"  {job.name:<14} {variant:<16} {row['steps']:>5} steps {row['wall_s']:7.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "command": args.command,
        "size": size,
        "seed": args.seed,
        "logdir": args.logdir,
        "machine": host,
        "wall_s": time.perf_counter() - start,
        "stop_after_nonfinite": STOP_AFTER_NONFINITE,
        "sweep_idle": args.sweep_idle,
    }
    return {"meta": meta, "configs": configs, "rows": rows}


# ------------------------------------------------------------------------------------------------------ report
def _heldout(row: dict[str, Any]) -> str:
    if row["metric"] == "mse":
        return f"MSE {num(row['heldout_loss'])}"
    acc = row["heldout_acc"]
    return f"CE {num(row['heldout_loss'], '.3g')}, acc " + (f"{100 * acc:.1f}%" if math.isfinite(acc) else str(acc))


def learned_more_than_chance(cfg: dict[str, Any], row: dict[str, Any]) -> bool:
    """Better than chance by more than the held-out sampling error (2 standard errors)."""
    if row["metric"] == "mse":
        return math.isfinite(row["heldout_loss"]) and row["heldout_loss"] < 0.9 * cfg["chance"]
    p = cfg["chance"]
    return row["heldout_acc"] > p + 2 * math.sqrt(p * (1 - p) / cfg["n_test"])


def _verdict(cfg: dict[str, Any], runs: dict[str, dict[str, Any]], sweep_idle: int = 0) -> str:
    """What the runs of one config show, in one line."""
    un = runs["unguarded"]
    name = cfg["config"]
    if un["diverged"]:
        head = "unguarded diverged" + (f" (NaN loss from step {un['first_nan_step']})" if un["first_nan_step"] else "")
    else:
        chance = "" if learned_more_than_chance(cfg, un) else ", no better than chance"
        head = f"unguarded did not diverge ({_heldout(un)}{chance})"
    parts = [f"{name}: {head}"]
    tuned = _tuned(runs)
    if tuned is not None:
        idle = f", idle for its first {sweep_idle} steps" if sweep_idle else ""
        parts.append(f"tuned rate (best of the unguarded sweep{idle}): lr {tuned['sweep_lr']:g}, {_heldout(tuned)}")
    for variant in cfg["variants"][1:]:
        g = runs[variant]
        if g["sweep_lr"] is not None:
            continue
        label = g["guard"]
        if g["diverged"]:
            nan = f", NaN loss from step {g['first_nan_step']}" if g["first_nan_step"] else ""
            parts.append(f"{label}: diverged too ({_heldout(g)}{nan}): not rescued")
        elif un["diverged"]:
            if g["metric"] == "mse" and g["heldout_loss"] < SOLVED_MSE:
                how = f"solved the task (MSE below {SOLVED_MSE})"
            elif learned_more_than_chance(cfg, g):
                how = "learning"
            else:
                how = "no better than chance: it did not learn in this budget"
            if tuned is not None:
                rescued = g["heldout_loss"] <= tuned["heldout_loss"]
                how += ": RESCUED (no worse than the tuned rate)" if rescued else ": worse than the tuned rate"
            parts.append(f"{label}: stayed finite ({_heldout(g)}), {how}")
        else:
            if g["heldout_loss"] == un["heldout_loss"]:
                cmp = "identical to unguarded (the guard changed no step)"
            elif g["metric"] == "acc":
                b = un["heldout_acc"]
                se = math.sqrt(max(b * (1 - b), 1e-4) / cfg["n_test"])
                diff = g["heldout_acc"] - b
                ok = "as good" if diff >= -2 * se else "WORSE"
                cmp = f"{100 * diff:+.1f} points vs unguarded: {ok} (2 s.e. = {200 * se:.1f} points)"
            else:
                ok = "as good" if g["heldout_loss"] <= 1.1 * un["heldout_loss"] else "WORSE"
                cmp = f"vs unguarded MSE {num(un['heldout_loss'])}: {ok}"
            parts.append(f"{label}: {_heldout(g)}, {cmp}")
        ev = g["events"]
        if ev and ev["vanishing"]:
            fv = g["first_vanishing"]
            where = f", first {fv['layer']!r} at step {fv['step']}" if fv else ""
            parts[-1] += f"; {ev['vanishing']} vanishing event(s){where}"
    return "; ".join(parts)


def _tuned(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep run with the lowest finite held-out loss (``None`` without a sweep)."""
    sweep = [r for r in runs.values() if r["sweep_lr"] is not None and math.isfinite(r["heldout_loss"])]
    return min(sweep, key=lambda r: r["heldout_loss"]) if sweep else None


def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as a text table, one line per config underneath."""
    meta, m = result["meta"], result["meta"]["machine"]
    gpu = f" ({m['gpu']})" if "gpu" in m else ""
    lines = [
        "GradGuard stability benchmark",
        f"command: {meta['command']}",
        f"machine: {m['cpus']} CPUs available ({m['cpu_count']} in total, {m['processor']}), python {m['python']}, "
        f"torch {m['torch']}, lightning {m['lightning']}, device {m['device']}{gpu}",
        f"suite: {meta['size']}, seed {meta['seed']}; the runs of a config start from the same weights and see the "
        f"same batches; TensorBoard logs: {meta['logdir']}",
        "held-out: loss (and accuracy) of the final weights on data never trained on; diverged? = held-out loss "
        "NaN/inf or above the config's threshold",
        f"NaN at: first training step (from 1) with a non-finite loss (how many); a run stops after "
        f"{meta['stop_after_nonfinite']} non-finite losses in a row",
        "events of guarded runs (GradGuard.summary()): clipped steps, expl = exploding, nonfin/skip = "
        "nonfinite/skipped steps, div = diverging (the loss), lr_red = lr_reduced, rollb = rolled_back, van = "
        "vanishing (first layer @ step); "
        "warns = the guard's warnings (hidden here, counted)",
    ]
    if meta.get("sweep_idle"):
        lines.append(
            f"sweep runs (unguarded_lr*) idle for their first {meta['sweep_idle']} steps (gradients zeroed): the best "
            "a guard that restarted at their rate after that many steps could do"
        )
    lines += ["", "configs:"]
    for cfg in result["configs"]:
        threads = f"; {cfg['threads']} CPU thread(s)" if cfg["threads"] else ""
        lines.append(f"  {cfg['config']}: {cfg['title']}")
        lines.append(f"      {cfg['settings']}; diverged above {cfg['threshold']:.3g}{threads}")
    header = (
        "config",
        "run",
        "guard",
        "steps",
        "held-out",
        "diverged?",
        "NaN at",
        "clipped",
        "expl",
        "nonfin/skip",
        "div",
        "lr_red",
        "rollb",
        "van",
        "warns",
        "wall s",
    )
    table: list[tuple[str, ...]] = []
    for row in result["rows"]:
        ev = row["events"]
        van = "-"
        if ev is not None:
            van = str(ev["vanishing"])
            if row["first_vanishing"]:
                van += f" ({row['first_vanishing']['layer']} @{row['first_vanishing']['step']})"
        table.append(
            (
                row["config"],
                row["variant"],
                row["guard"] or "-",
                f"{row['steps']}" + (" stopped" if row["stopped_early"] else ""),
                _heldout(row),
                "YES" if row["diverged"] else "no",
                "-" if row["first_nan_step"] is None else f"{row['first_nan_step']} ({row['nonfinite_losses']})",
                str(ev.get("clipped", "?")) if ev else "-",
                str(ev["exploding"]) if ev else "-",
                f"{ev['nonfinite']}/{ev['skipped']}" if ev else "-",
                str(ev.get("diverging", 0)) if ev else "-",
                str(ev["lr_reduced"]) if ev else "-",
                str(ev.get("rolled_back", 0)) if ev else "-",
                van,
                str(row["guard_warnings"]) if ev else "-",
                f"{row['wall_s']:.1f}",
            )
        )
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(header)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("")
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for row in result["rows"]:
        by_config.setdefault(row["config"], {})[row["variant"]] = row
    for cfg in result["configs"]:
        runs = by_config.get(cfg["config"], {})
        if all(v in runs for v in cfg["variants"]):
            lines.append(_verdict(cfg, runs, meta.get("sweep_idle", 0)))
    if meta["size"] == "quick":
        lines.append("(--quick: a few steps per config, to check that everything runs; these verdicts mean nothing)")
    lines.append(f"total wall time {meta['wall_s']:.0f} s")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/stability.py",
        description="Train each config unguarded and with GradGuards; print what diverged and what the guard did.",
    )
    add_size_arguments(p)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: 1 for the recurrent nets, the MLP and anything in --quick; for the "
        "ResNets the cores that the load average shows idle, at least 1)",
    )
    p.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="skip the unguarded tuned-rate sweep of the diverging configs",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated subset of the guarded runs ({', '.join(GUARDED_VARIANTS)}); the "
        "unguarded run and the sweep always run (default: all but the clipper runs)",
    )
    add_clippers_argument(p)
    p.add_argument(
        "--sweep-idle",
        type=int,
        default=0,
        metavar="N",
        help="the sweep runs zero their gradients for the first N steps and learn only in the rest: what a guard "
        "that restarted at the tuned rate after N steps could reach at best (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of every run (default: 0)")
    p.add_argument("--logdir", default=None, help="TensorBoard log root (default: a new temporary folder)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    args.configs = names
    if args.variants is not None:
        args.variants = parse_variants(p, args.variants)
        args.clippers = args.clippers or any(v in CLIPPER_GUARDS for v in args.variants)  # a clipper run named is asked
    if args.sweep_idle < 0:
        p.error("--sweep-idle must be >= 0")
    check_machine_arguments(p, args)
    return args


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's sizes, ``--quick`` or ``--full`` (the default size without either)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few steps per config (about a minute; for tests)")
    size.add_argument("--full", action="store_true", help="longer runs on larger batches (meant for a GPU)")


def parse_variants(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The guarded runs that ``--variants`` names (comma-separated), or a parser error naming the allowed ones."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    if not chosen or any(v not in GUARDED_VARIANTS for v in chosen):
        parser.error(f"--variants: choose from {', '.join(GUARDED_VARIANTS)}, got {text!r}")
    return chosen


def check_machine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error for a negative ``--threads`` or ``--device cuda`` without a CUDA device."""
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "stability.py", _parse, run, report, logdir_prefix="gradguard_stability_")


if __name__ == "__main__":
    main()
