"""Does the default ``GradGuard()`` leave healthy training alone? A zoo of healthy but unusual training setups.

GradGuard's detectors and its clipper learn what "normal" gradients look like from the run itself. Healthy training
has plenty that does not look normal: adapters whose gradients are exactly zero at the first step, batches that
contribute nothing, a learning rate that starts at almost zero and jumps back up at a warm restart, a backbone that
joins training half-way, two optimizers taking turns, a thousand layers, dropout noise on tiny batches. None of
these needs a guard; the guard must not lower the learning rate, report an explosion or change the result there.

Each config is trained twice from the same seed (``L.seed_everything`` before the model is built), on the same
batches in the same order (tensors generated up front from the seed, ``shuffle=False``): once unguarded and once
with plain ``GradGuard()`` (ZClip, LRGuard, ``on_nonfinite="skip"``, every default). Each run is then evaluated on
held-out data it never trained on. The table reports, per run:

* **held-out**: the metric of the final weights on held-out data (lower is better; MSE, cross-entropy, or an MMD
  for the GAN), and **init**: the same metric for the untrained weights (equal in both runs: same start);
* **rel. diff**: ``(guarded - unguarded) / unguarded`` of the held-out metric, in percent;
* **non-finite**: training losses that were NaN/inf (a NaN loss never stops a run here);
* the guard's events from ``GradGuard.summary()`` (exploding, diverging, lr_reduced, skipped, clipped, vanishing), the
  lowest LR multiplier of its ``LRGuard`` over the run (over all optimizers), and how many warnings the guard raised;
* the wall time of the run (``fit`` only).

Under the table one verdict per config: **PASS** when the guarded run had no exploding or diverging event and no LR
reduction and its held-out metric is at most 2% (relative) worse than the unguarded one; for ``nan_batch`` the guard
must also have skipped exactly one step. Otherwise **FAIL** with the reasons. A config whose unguarded run itself looks
unhealthy (non-finite losses, or a held-out metric no better than at initialisation) is flagged: the config needs
adjusting, not the guard.

The zoo (``--configs`` picks a subset); steps are optimizer steps (GAN: iterations of one D and one G step):

* ``lora``: a frozen random 3-layer MLP (64 wide) with LoRA adapters (rank 4) on its three Linear layers,
  ``lora_A`` kaiming-initialised, ``lora_B`` zero (as in the LoRA paper and peft), so ``lora_A``'s gradients are
  exactly zero at the first step; only the adapters train (AdamW 5e-3), regressing a teacher that is the same base
  plus a random rank-4 delta per layer. 200 steps.
* ``masked``: an MLP regression (Adam 1e-3) whose batches 10-14 (steps 11-15) are fully masked: the loss is
  multiplied by a zero mask, so all gradients are exactly 0 for five steps. 200 steps.
* ``rezero``: a residual MLP with ReZero gates (``alpha = nn.Parameter(torch.zeros(()))`` on each of 4 residual
  branches): the branch weights get exactly-zero gradients at the first step. Adam 1e-3. 200 steps.
* ``warmup``: an MLP classifier, SGD (0.1, momentum 0.9), a linear warm-up from 1e-4 of the rate over 50 steps,
  then cosine decay with one warm restart (cycles of 100 and 150 steps), stepped every step. 300 steps.
* ``warmup_zero``: the same classifier, SGD (0.1, momentum 0.9), a linear warm-up from exactly 0 over 40 steps (as
  Hugging Face's schedules start), then constant. 300 steps. At a rate near 0 the weights hardly move, so the norms
  of the first steps vary by the batch alone.
* ``nan_batch``: an MLP regression (Adam 1e-3) where one batch (index 30, step 31) holds a NaN input, so that step's
  loss and gradients are NaN. Unguarded, that batch destroys the weights; the unguarded reference of the verdict is
  therefore the same run with that batch replaced by a clean one (``unguarded``), and the run that trains on the
  NaN batch without a guard (``unguarded_nan``) is shown for information. The guarded run trains on the NaN batch
  and must skip exactly that step (``summary()["skipped"] == 1``) without lowering the LR.
* ``unfreeze``: a backbone (2 Linear layers) and a head; the backbone is frozen (``requires_grad_(False)``) for the
  first 50 steps and unfrozen in ``on_train_batch_start`` at step 50; AdamW (1e-3) holds all parameters from the
  start (frozen ones simply have no gradient). 200 steps.
* ``finetune``: the same, fine-tuned as Lightning's ``BackboneFinetuning`` does it: AdamW (1e-3) holds the head alone,
  and at step 50 ``BaseFinetuning.unfreeze_and_add_param_group`` gives it the backbone as a param group of its own at
  a tenth of the rate (the guard rebuilds its per-optimizer state and keeps its statistics). 200 steps.
* ``transformer_bf16``: a tiny causal transformer LM (2 pre-norm layers, d_model 64, 4 heads, vocab 64, sequences
  of 32) on a synthetic language (a random sparse Markov chain: 4 successors per token), ``precision="bf16-mixed"``,
  batches of 4 with ``accumulate_grad_batches=2``, AdamW 3e-3 with a 20-step linear warm-up, then cosine decay. 150
  optimizer steps. Held-out: cross-entropy in nats per token (the chain's entropy rate, the best possible, is in the
  settings). The batches are small because CPUs without bf16 units emulate bf16 matmuls (about 5x slower than fp32).
* ``gan``: a GAN (MLP generator and discriminator, 128 wide) on a ring of 8 Gaussians (std 0.2), manual
  optimization with two Adam optimizers (2e-3, betas (0.5, 0.999); one D step and one G step per batch; the guard
  keeps state per optimizer and ``summary()`` sums over both). Held-out: the (biased, multi-bandwidth RBF) MMD
  between 1000 generated samples from fixed noise and 1000 held-out real ones; the MMD of two real sample sets, the
  floor, is in the settings. 300 iterations.
* ``deep1000``: 600 residual blocks ``x + LayerNorm(Linear(x))`` (width 16: 1200 layers) and a LayerNorm and
  Linear head, Adam 1e-3, regression. 50 steps (it is slow per step).
* ``dropout``: an MLP classifier with dropout 0.5 on batches of 8 (noisy gradients), SGD (0.01, momentum 0.9).
  300 steps.
* ``moe``: a mixture of experts (8 two-layer experts, top-1 routing, as a residual layer between an input layer and
  a head) on batches of 8 tokens, AdamW 1e-3, regression: an expert that gets no token has no gradient at that step,
  and the others' norms swing with their share of the batch (heavy-tailed norms). 300 steps.
* ``checkpointed``: 6 pre-norm residual MLP blocks under activation checkpointing (``torch.utils.checkpoint``,
  non-reentrant: each block's forward runs again in backward), AdamW 1e-3, classification. 200 steps.
* ``contrastive``: two MLP encoders, a symmetric InfoNCE loss and a learnable temperature as in CLIP (a scalar
  ``logit_scale``, initialised to log(1/0.07), capped at log(100)), AdamW 1e-3 with weight decay 0.1, on paired
  noisy views of Gaussian samples; held-out: InfoNCE of new pairs. 300 steps.
* ``alternating``: the ``masked`` config's regression whose loss weight alternates between 1 and 0.01 every 50
  steps (two tasks trained in turn, a loss term switched off and on): the gradient norm drops 100x and comes back
  five times. 300 steps.
* ``diffusion``: a DDPM-style denoiser on a ring of 8 Gaussians: an MLP predicts the noise from the noised point and
  a sinusoidal embedding of its timestep (1000 timesteps, linear noise schedule, drawn uniformly per example); the
  output layer starts at exactly zero (as diffusion codebases often initialise it), so every other layer's gradient
  is exactly zero at the first step, and each batch mixes timesteps whose losses differ by orders of magnitude. Adam
  1e-3, batch 32; held-out: the denoising MSE of new (point, timestep, noise) triples. 400 steps.
* ``reinforce``: REINFORCE on a contextual bandit (8 contexts, 4 arms; a softmax policy starting uniform), each arm
  paying 20 with probability 0.02-0.12, else nothing; no baseline, Adam 1e-2, batch 32. Most batches carry small
  gradients, and the rare jackpot of an arm the policy seldom picks a large one: that gradient is the learning
  signal, which clipping takes away. Held-out: the exact regret (the best arm's expected reward minus the policy's).
  400 steps.
* ``catapult``: an MLP regression without normalisation on plain SGD (no momentum) at rate 0.8, past the edge of
  stability: the training loss first rises to 1.5-2.3x its start, then falls (the catapult of Lewkowycz et al.,
  2020), and the run converges (at 1.0 it barely learns). 400 steps.
* ``last_batch``: an MLP regression with label noise (std 0.3), Adam 1e-3, batches of 64 over 64 x 20 + 1 examples
  (``drop_last=False``, the default): every epoch ends on a batch of one example, whose gradient carries about 8x
  the noise of the others. 25 epochs, 525 steps.

The default zoo takes about a minute on two CPU cores (one thread per run). ``--quick`` runs a few steps per
config with smaller data (the event positions above move inside those steps): it checks that everything runs, its
verdicts mean nothing. ``--steps N`` trains every selected config for N steps (events at or before the default
positions, scaled down for a shorter run). On the CPU a rerun reproduces the table (wall times aside).

``--clippers`` trains every config five more times, with ``GradGuard(clip=AutoClip())``, ``GradGuard(clip=AGC())``,
``GradGuard(clip=AdaGC())``, ``GradGuard(clip=NormClip(max_norm=1.0))`` and ``GradGuard(clip=None)`` (no clipper;
every other default kept), and reports one PASS count per clipper under the same bar; the zoo's verdicts stay the
default guard's.

``--noise N`` trains each config's unguarded reference N more times, each with the gradients of one optimizer step
multiplied by 1.001 or 0.999 (alternately, at steps spread evenly over the run): the range of their held-out change
is the config's noise floor, how far a change that harms nothing moves the metric. Most configs move by hundredths
of a percent; ``catapult`` (SGD past the edge of stability) is chaotic and moves by more than the 2% bar, so its
verdict says little either way. The bar itself is not relaxed: a verdict line only adds the floor, and says when a
failing held-out difference lies inside it.

Run from the repository root::

    python benchmarks/healthy_zoo.py                            # the default zoo, about a minute on 2 CPU cores
    python benchmarks/healthy_zoo.py --clippers                 # and each other clipper, about 4x as long
    python benchmarks/healthy_zoo.py --configs lora,gan --json out.json
    python benchmarks/healthy_zoo.py --noise 8                  # and each config's noise floor, about 3x as long
    python benchmarks/healthy_zoo.py --quick --json -           # seconds; JSON on stdout

Nothing is logged unless ``--logdir DIR`` names a TensorBoard log root (``tensorboard --logdir DIR``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    CLIPPER_GUARDS,
    LossRecorder,
    add_clippers_argument,
    machine,
    num,
    run_main,
)
from lightning_gradguard import GradGuard

__all__ = [
    "CONFIGS",
    "BanditPolicyModule",
    "CheckpointedModule",
    "ContrastiveModule",
    "DeepResidualModule",
    "DenoiserModule",
    "GANModule",
    "LoRAModule",
    "MLPClassifierModule",
    "MoEModule",
    "ReZeroModule",
    "RegressionModule",
    "TinyLMModule",
    "UnfreezeModule",
    "FinetuneModule",
    "main",
    "report",
    "run",
]

Size = Literal["quick", "default"]
#: Largest relative difference (%) of the held-out metric between the guarded and the unguarded run for a PASS.
TOLERANCE_PCT = 2.0
#: The runs ``--clippers`` adds: each other clipper, and no clipper at all (detection, skipping and the LR guard
#: only), the setting for gradients whose rare spikes are the signal (``reinforce``).
ZOO_CLIPPERS: dict[str, tuple[str, Callable[[], GradGuard]]] = {
    **CLIPPER_GUARDS,
    "clip_none": ("GradGuard(clip=None)", lambda: GradGuard(clip=None)),
}
#: ``--noise``: the relative change of one optimizer step's gradients in each of the reference's extra runs, far
#: below anything a guard does (its smallest clip here is about 0.7).
NOISE_SCALE = 1e-3
#: The ``catapult`` config's SGD rate (see its entry in the module docstring).
CATAPULT_LR = 0.8
#: The guard under test, as written in user code.
GUARD_LABEL = "GradGuard()"


# ------------------------------------------------------------------------------------------------------- helpers
def _gen(seed: int, salt: int) -> torch.Generator:
    """A private generator: data and teachers never touch (or depend on) the global RNG."""
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


def _scaled(position: int, steps: int, default_steps: int) -> int:
    """An event position of the default schedule, moved proportionally into a shorter run."""
    if steps >= default_steps:
        return position
    return max(1, int(position * steps / default_steps))


def _mlp(sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class _Teacher:
    """A fixed random 2-layer tanh network: the regression target (its own generator, not the global RNG)."""

    def __init__(self, in_features: int, out_features: int, seed: int, hidden: int = 32) -> None:
        g = _gen(seed, 11)
        self.w1 = torch.randn(in_features, hidden, generator=g) / math.sqrt(in_features)
        self.w2 = torch.randn(hidden, out_features, generator=g) * (2.0 / math.sqrt(hidden))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.tanh(2.0 * x @ self.w1) @ self.w2


def _regression(
    n: int, in_features: int, teacher: Callable[[Tensor], Tensor], g: torch.Generator
) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, in_features, generator=g)
    return x, teacher(x)


def _classification(n: int, in_features: int, classes: int, seed: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled by a fixed random teacher MLP (nonlinear, so a linear model is not enough)."""
    t = _gen(seed, 21)
    w1 = torch.randn(in_features, 64, generator=t) / math.sqrt(in_features)
    w2 = torch.randn(64, classes, generator=t)
    x = torch.randn(n, in_features, generator=g)
    return x, (torch.tanh(2.0 * x @ w1) @ w2).argmax(dim=1)


# ------------------------------------------------------------------------------------------------------- models
class RegressionModule(L.LightningModule):
    """An MLP regressor on batches ``(x, y, mask)``; the loss is the masked MSE ``mean(mask * (f(x) - y) ** 2)``
    (Adam, or plain SGD with ``optimizer="sgd"``).

    A batch whose mask is all zero contributes a loss of exactly 0 and gradients of exactly 0 (``masked``); a NaN in
    ``x`` makes the loss and every gradient NaN (``nan_batch``).

    Example:
        >>> m = RegressionModule(in_features=4, out_features=2, hidden=8)
        >>> m(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int = 32,
        out_features: int = 4,
        hidden: int = 64,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__()
        self.net = _mlp([in_features, hidden, hidden, out_features])
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, mask = batch
        return (mask * (self(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":  # plain SGD, no momentum: the step is the rate times the gradient
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B @ A`` (LoRA, as in peft).

    ``lora_A`` is kaiming-uniform initialised, ``lora_B`` zero: the adapter starts as the identity update, and at the
    first step ``lora_A``'s gradient is exactly zero (it is multiplied by ``lora_B``).
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def _lora_base(seed: int, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """The frozen base network's weights (the "pretrained" model): PyTorch's Linear init, from a private generator."""
    g = _gen(seed, 31)
    out = []
    for a, b in itertools.pairwise(sizes):
        bound = 1 / math.sqrt(a)
        out.append(((torch.rand(b, a, generator=g) * 2 - 1) * bound, (torch.rand(b, generator=g) * 2 - 1) * bound))
    return out


class LoRAModule(L.LightningModule):
    """A frozen MLP with LoRA adapters on every Linear layer; only the adapters are trainable (AdamW).

    Example:
        >>> base = _lora_base(0, [4, 8, 2])
        >>> m = LoRAModule(base, rank=2)
        >>> [n for n, p in m.named_parameters() if p.requires_grad]
        ['net.0.lora_A', 'net.0.lora_B', 'net.2.lora_A', 'net.2.lora_B']
    """

    def __init__(self, base: list[tuple[Tensor, Tensor]], rank: int = 4, alpha: float = 8.0, lr: float = 5e-3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(base):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            layers.append(LoRALinear(lin, rank, alpha))
            if i < len(base) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


class _LoRATeacher:
    """The base network with a random rank-``rank`` delta added to each weight (what the adapters can learn)."""

    def __init__(self, base: list[tuple[Tensor, Tensor]], seed: int, rank: int = 4, rel: float = 0.5) -> None:
        g = _gen(seed, 32)
        self.layers = []
        for w, b in base:
            delta = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            self.layers.append((w + delta * (rel * w.norm() / delta.norm()), b))

    def __call__(self, x: Tensor) -> Tensor:
        for i, (w, b) in enumerate(self.layers):
            x = F.linear(x, w, b)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ReZeroModule(L.LightningModule):
    """A residual MLP ``x + alpha_i * f_i(x)`` with ReZero gates ``alpha_i`` starting at exactly zero (Adam).

    Example:
        >>> m = ReZeroModule(in_features=4, out_features=1, width=8, blocks=2)
        >>> [float(a) for a in m.alphas]
        [0.0, 0.0]
    """

    def __init__(
        self, in_features: int = 32, out_features: int = 4, width: int = 64, blocks: int = 4, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.branches = nn.ModuleList(_mlp([width, width, width]) for _ in range(blocks))
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(blocks))
        self.head = nn.Linear(width, out_features)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for branch, alpha in zip(self.branches, self.alphas):
            h = h + alpha * branch(h)
        return self.head(F.relu(h))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _warmup_restart(
    warmup: int, cycles: Sequence[int], start: float = 1e-4, floor: float = 0.01
) -> Callable[[int], float]:
    """LR factor: linear warm-up from ``start`` to 1 over ``warmup`` steps, then cosine cycles (1 -> ``floor``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        t = step - warmup
        for length in cycles:
            if t < length:
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t / length))
            t -= length
        return floor

    return factor


def _linear_warmup(warmup: int) -> Callable[[int], float]:
    """LR factor: linear from exactly 0 to 1 over ``warmup`` steps, then 1."""

    def factor(step: int) -> float:
        return min(1.0, step / warmup)

    return factor


class MLPClassifierModule(L.LightningModule):
    """An MLP classifier with SGD (momentum 0.9), optional dropout and an optional per-step LR schedule.

    Example:
        >>> m = MLPClassifierModule(in_features=4, classes=3, hidden=8, dropout=0.5)
        >>> m(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int = 32,
        classes: int = 10,
        hidden: int = 128,
        dropout: float = 0.0,
        lr: float = 0.1,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.net = _mlp([in_features, hidden, hidden, classes], dropout=dropout)
        self.lr = lr
        self.schedule = schedule

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.schedule is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class UnfreezeModule(L.LightningModule):
    """A backbone and a head; the backbone is frozen until ``unfreeze_at`` (AdamW holds every parameter throughout).

    Example:
        >>> m = UnfreezeModule(in_features=4, classes=3, hidden=8, unfreeze_at=5)
        >>> sorted({p.requires_grad for p in m.backbone.parameters()})
        [False]
    """

    def __init__(
        self, in_features: int = 32, classes: int = 10, hidden: int = 128, unfreeze_at: int = 50, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.backbone.requires_grad_(False)
        self.unfreeze_at = unfreeze_at
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.unfreeze_at:
            self.backbone.requires_grad_(True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class FinetuneModule(UnfreezeModule):
    """:class:`UnfreezeModule` fine-tuned as ``BackboneFinetuning`` does it: the optimizer holds the head alone, and
    the backbone joins it at ``unfreeze_at`` as a param group of its own at a tenth of the rate
    (``BaseFinetuning.unfreeze_and_add_param_group``).

    Example:
        >>> m = FinetuneModule(in_features=4, classes=3, hidden=8, unfreeze_at=5)
        >>> len(m.configure_optimizers().param_groups)
        1
    """

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.unfreeze_at:
            optimizer = self.trainer.optimizers[0]
            BaseFinetuning.unfreeze_and_add_param_group(self.backbone, optimizer, initial_denom_lr=10.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.01)


class TinyLMModule(L.LightningModule):
    """A tiny causal transformer language model (pre-norm ``nn.TransformerEncoderLayer`` with a causal mask).

    Example:
        >>> m = TinyLMModule(vocab=16, seq_len=8, d_model=16, heads=2, layers=1)
        >>> m(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 16])
    """

    def __init__(
        self,
        vocab: int = 64,
        seq_len: int = 32,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        lr: float = 3e-3,
        warmup: int = 20,
        total_steps: int = 150,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.mask: Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)
        self.lr, self.warmup, self.total_steps = lr, warmup, total_steps

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))

    def loss(self, tokens: Tensor) -> Tensor:
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        return self.loss(batch[0])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        warmup, total = self.warmup, max(self.total_steps, self.warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _markov_chain(vocab: int, successors: int, seed: int) -> tuple[Tensor, float]:
    """A random sparse transition matrix (``successors`` next tokens per token) and its entropy rate in nats."""
    g = _gen(seed, 41)
    probs = torch.zeros(vocab, vocab)
    for i in range(vocab):
        nxt = torch.randperm(vocab, generator=g)[:successors]
        w = -torch.log(torch.rand(successors, generator=g))  # Dirichlet(1, ..., 1)
        probs[i, nxt] = w / w.sum()
    # The stationary distribution (power iteration) weighs each token's entropy.
    pi = torch.full((vocab,), 1.0 / vocab)
    for _ in range(500):
        pi = pi @ probs
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(1)
    return probs, float((pi * ent).sum())


def _markov_sequences(probs: Tensor, n: int, length: int, g: torch.Generator) -> Tensor:
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, probs.shape[0], (n,), generator=g)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=g).squeeze(1)
    return tokens


class GANModule(L.LightningModule):
    """A GAN with MLP generator and discriminator, manual optimization, one D step then one G step per batch.

    Batches are ``(real, z)``: the generator's noise comes with the data, so both runs of a config see the same.

    Example:
        >>> m = GANModule(latent=4, hidden=8)
        >>> m(torch.zeros(5, 4)).shape
        torch.Size([5, 2])
    """

    def __init__(self, latent: int = 8, hidden: int = 128, lr: float = 2e-3) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )
        self.discriminator = nn.Sequential(
            nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )
        self.lr = lr

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        real, z = batch
        optimizers = self.optimizers()
        assert isinstance(optimizers, list), "configure_optimizers returns two optimizers"
        opt_g, opt_d = optimizers
        ones = torch.ones(real.shape[0], 1, device=real.device)
        zeros = torch.zeros_like(ones)
        fake = self.generator(z)
        bce = F.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = bce(self.discriminator(fake), ones)  # the non-saturating generator loss
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        return (d_loss + g_loss).detach()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas),
        ]


def _ring(n: int, g: torch.Generator, modes: int = 8, radius: float = 2.0, std: float = 0.2) -> Tensor:
    k = torch.randint(0, modes, (n,), generator=g).float()
    angle = 2 * math.pi * k / modes
    centres = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=g)


def _mmd(a: Tensor, b: Tensor, bandwidths: Sequence[float] = (0.05, 0.2, 1.0)) -> float:
    """The biased MMD (a V-statistic, always >= 0) with a sum of RBF kernels."""
    xx, yy, xy = torch.cdist(a, a) ** 2, torch.cdist(b, b) ** 2, torch.cdist(a, b) ** 2
    total = 0.0
    for s in bandwidths:
        k_xx, k_yy, k_xy = (torch.exp(-d / (2 * s * s)).mean() for d in (xx, yy, xy))
        total += float(k_xx + k_yy - 2 * k_xy)
    return math.sqrt(max(total, 0.0))


class DeepResidualModule(L.LightningModule):
    """``depth`` residual blocks ``x + LayerNorm(Linear(x))`` (2 * depth layers), a LayerNorm and a Linear head.

    Example:
        >>> m = DeepResidualModule(depth=3, width=4, out_features=1)
        >>> len(m.blocks), m(torch.zeros(2, 4)).shape
        (3, torch.Size([2, 1]))
    """

    def __init__(self, depth: int = 600, width: int = 16, out_features: int = 4, lr: float = 1e-3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_features)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # foreach: one kernel per op over all 2400 tensors instead of a Python loop (PyTorch's CPU default is the loop).
        return torch.optim.Adam(self.parameters(), lr=self.lr, foreach=True)


class MoEModule(L.LightningModule):
    """A residual layer of top-1 routed experts (a mixture of experts) between an input layer and a head (AdamW).

    Each token goes to the expert its router scores highest, weighted by that score. On small batches some experts
    get no token: their parameters have no gradient at that step (``None``), and the others' norms swing with how
    many tokens they got.

    Example:
        >>> m = MoEModule(in_features=4, out_features=1, hidden=8, experts=3)
        >>> m(torch.zeros(5, 4)).shape
        torch.Size([5, 1])
    """

    def __init__(
        self, in_features: int = 16, out_features: int = 4, hidden: int = 32, experts: int = 8, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.router = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(_mlp([hidden, hidden, hidden]) for _ in range(experts))
        self.head = nn.Linear(hidden, out_features)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        weight, choice = self.router(h).softmax(dim=-1).max(dim=-1)
        routed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            mine = (choice == e).nonzero(as_tuple=True)[0]
            if len(mine):  # an idle expert stays out of the graph, as in real MoE layers
                routed[mine] = expert(h[mine]) * weight[mine, None]
        return self.head(h + routed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class CheckpointedModule(L.LightningModule):
    """Pre-norm residual MLP blocks under activation checkpointing (``torch.utils.checkpoint``, non-reentrant): each
    block's forward runs again during backward (AdamW, classification).

    Example:
        >>> m = CheckpointedModule(in_features=4, classes=3, width=8, blocks=2)
        >>> m(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, in_features: int = 32, classes: int = 10, width: int = 64, blocks: int = 6, lr: float = 1e-3
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + (checkpoint(block, h, use_reentrant=False) if self.training else block(h))
        return self.head(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ContrastiveModule(L.LightningModule):
    """Two MLP encoders trained with a symmetric InfoNCE loss and a learnable temperature, as CLIP: the scalar
    ``logit_scale`` starts at log(1/0.07) and is capped at log(100) (AdamW with weight decay).

    Example:
        >>> m = ContrastiveModule(in_features=4, embedding=3)
        >>> m.loss(torch.randn(5, 4), torch.randn(5, 4)).shape
        torch.Size([])
    """

    def __init__(self, in_features: int = 32, embedding: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.encoder_a = _mlp([in_features, 64, embedding])
        self.encoder_b = _mlp([in_features, 64, embedding])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.encoder_a(x), dim=-1)

    def loss(self, a: Tensor, b: Tensor) -> Tensor:
        """The symmetric InfoNCE loss of paired views ``a[i]``, ``b[i]`` against the other pairs of the batch."""
        za, zb = self(a), F.normalize(self.encoder_b(b), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * za @ zb.T
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


class DenoiserModule(L.LightningModule):
    """A DDPM-style denoiser on 2-D points: an MLP predicts the noise ``eps`` of ``x_t = sqrt(abar_t) * x_0 +
    sqrt(1 - abar_t) * eps`` from ``x_t`` and a sinusoidal embedding of the timestep ``t`` (Adam, MSE on ``eps``).

    Its output layer starts at exactly zero, as diffusion codebases often initialise it, so every other layer's
    gradient is exactly zero at the first step; each batch mixes timesteps drawn uniformly from ``timesteps``, whose
    losses differ by orders of magnitude (almost clean points at small ``t``, almost pure noise at large ``t``).

    Example:
        >>> m = DenoiserModule(timesteps=10)
        >>> float(m(torch.zeros(3, 2), torch.tensor([0, 4, 9])).abs().sum())  # the zero output layer
        0.0
    """

    def __init__(self, timesteps: int = 1000, hidden: int = 128, embedding: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + embedding, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        # The DDPM paper's linear schedule of the noise variances, 1e-4 to 0.02.
        self.register_buffer("abar", torch.cumprod(1 - torch.linspace(1e-4, 0.02, timesteps), dim=0))
        self.embedding = embedding
        self.lr = lr

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        half = self.embedding // 2
        angles = t.float()[:, None] * torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        return self.net(torch.cat([x_t, angles.sin(), angles.cos()], dim=1))

    def loss(self, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The denoising loss: MSE between ``eps`` and its prediction from the noised ``x_0`` at timesteps ``t``."""
        abar = self.abar[t][:, None]
        return F.mse_loss(self(abar.sqrt() * x_0 + (1 - abar).sqrt() * eps, t), eps)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class BanditPolicyModule(L.LightningModule):
    """REINFORCE on a contextual bandit: a softmax policy over the arms of each one-hot context, trained on
    ``-reward * log pi(action | context)`` with no baseline (Adam).

    Arm ``a`` of context ``c`` pays ``jackpot`` with probability ``payout[c, a]``, else nothing. Most batches carry
    small gradients; the rare jackpot of an arm the policy seldom picks carries a large one, and that gradient is the
    signal the policy learns from. Batches are ``(context, u_action, u_reward)``: the action is drawn from the policy
    by inverting its CDF at ``u_action``, the reward paid when ``u_reward < payout``, so a batch is the same in every
    run that has the same policy.

    Example:
        >>> m = BanditPolicyModule(torch.tensor([[0.1, 0.2], [0.3, 0.05]]))
        >>> round(float(m.regret()), 3)  # the uniform start: best arms pay 20 * (0.2 + 0.3) / 2, it gets 20 * 0.1625
        1.75
    """

    def __init__(self, payout: Tensor, jackpot: float = 20.0, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        contexts, arms = payout.shape
        self.net = nn.Sequential(nn.Linear(contexts, hidden), nn.Tanh(), nn.Linear(hidden, arms))
        with torch.no_grad():  # a uniform policy at the start: every arm is tried
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        self.register_buffer("payout", payout.clone())
        self.jackpot = jackpot
        self.lr = lr

    def forward(self, context: Tensor) -> Tensor:
        return self.net(F.one_hot(context, self.payout.shape[0]).to(self.payout.dtype))

    def regret(self) -> Tensor:
        """The mean over contexts of the best arm's expected reward minus the policy's (exact; 0 is optimal)."""
        contexts = torch.arange(self.payout.shape[0], device=self.payout.device)
        expected = self.jackpot * self.payout
        return (expected.max(dim=1).values - (self(contexts).softmax(dim=-1) * expected).sum(dim=1)).mean()

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        context, u_action, u_reward = batch
        log_probs = F.log_softmax(self(context), dim=-1)
        with torch.no_grad():
            cdf = log_probs.exp().cumsum(dim=-1)
            action = (u_action[:, None] > cdf).sum(dim=-1).clamp(max=self.payout.shape[1] - 1)
            reward = self.jackpot * (u_reward < self.payout[context, action]).to(log_probs.dtype)
        return -(reward * log_probs.gather(1, action[:, None]).squeeze(1)).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------------------- configs
@dataclass
class _Job:
    """One config at one size: factories for everything a run needs (called afresh for each run)."""

    name: str
    title: str
    settings: str
    steps: int  # optimizer steps (GAN: iterations, one step of each optimizer)
    module: Callable[[], L.LightningModule]
    data: Callable[[str], DataLoader]  # the variant's batches
    evaluate: Callable[[L.LightningModule], float]  # the held-out metric, lower is better
    metric: str
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ("unguarded", "guarded")
    #: The variant that trains without a guard and is compared with "guarded".
    reference: str = "unguarded"
    expect_skipped: int = 0  # skipped steps the guarded run must show
    note: str | None = None

    @property
    def max_steps(self) -> int:
        """The Trainer's ``max_steps``: it counts every optimizer's steps, two per iteration for the GAN."""
        return self.steps * self.trainer_kwargs.get("_steps_per_iteration", 1)


def _loader(*tensors: Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=False)


def _regression_task(
    teacher: Callable[[Tensor], Tensor],
    in_features: int,
    seed: int,
    salts: tuple[int, int],
    n_train: int,
    batch: int,
    n_test: int,
) -> tuple[Callable[[str], DataLoader], Callable[[L.LightningModule], float]]:
    """A teacher regression's batches (the same for every variant) and held-out MSE, drawn from two private salts."""

    def data(variant: str) -> DataLoader:
        return _loader(*_regression(n_train, in_features, teacher, _gen(seed, salts[0])), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        x, y = _regression(n_test, in_features, teacher, _gen(seed, salts[1]))
        return float(F.mse_loss(module(x), y))

    return data, evaluate


def _classification_task(
    in_features: int, classes: int, seed: int, salts: tuple[int, int], n_train: int, batch: int, n_test: int
) -> tuple[Callable[[str], DataLoader], Callable[[L.LightningModule], float]]:
    """A teacher-labelled classification's batches (the same for every variant) and held-out cross-entropy."""

    def data(variant: str) -> DataLoader:
        return _loader(*_classification(n_train, in_features, classes, seed, _gen(seed, salts[0])), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        x, y = _classification(n_test, in_features, classes, seed, _gen(seed, salts[1]))
        return float(F.cross_entropy(module(x), y))

    return data, evaluate


def _job_lora(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 200)
    batch, n_test, sizes, rank, lr = 64, 2000, [32, 64, 64, 8], 4, 5e-3
    base = _lora_base(seed, sizes)
    teacher = _LoRATeacher(base, seed, rank)

    data, evaluate = _regression_task(teacher, sizes[0], seed, (1, 2), steps * batch, batch, n_test)

    return _Job(
        name="lora",
        title="LoRA adapters (lora_B = 0) on a frozen MLP",
        settings=f"MLP {'-'.join(map(str, sizes))} frozen, LoRA rank {rank} alpha 8 on all 3 Linear layers, teacher = "
        f"base + rank-{rank} delta (0.5x the weight norm), batch {batch}, {steps} steps, AdamW lr {lr:g}, "
        f"{n_test} held-out",
        steps=steps,
        module=lambda: LoRAModule(base, rank=rank, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


#: The ``alternating`` config's loss weight on its quiet phases.
_QUIET = 0.01


def _regression_job(
    name: str, size: Size, seed: int, steps: int | None, kind: Literal["masked", "nan_batch", "alternating"]
) -> _Job:
    default_steps = 300 if kind == "alternating" else 200
    steps = steps or (10 if size == "quick" else default_steps)
    batch, n_test, d_in, d_out, lr = 64, 2000, 32, 4, 1e-3
    teacher = _Teacher(d_in, d_out, seed)
    period = max(1, _scaled(50, steps, default_steps))  # alternating: the steps of each phase
    if kind == "masked":
        first = _scaled(10, steps, default_steps)
        count = min(5, max(1, steps - first - 1)) if steps < default_steps else 5
        bad = list(range(first, first + count))
    elif kind == "alternating":
        bad = [b for b in range(steps) if b // period % 2 == 1]  # the quiet phases' batches
    else:
        bad = [_scaled(30, steps, default_steps)]

    def data(variant: str) -> DataLoader:
        x, y = _regression(steps * batch, d_in, teacher, _gen(seed, 3))
        mask = torch.ones(steps, batch, 1)
        if kind == "masked":
            mask[bad] = 0.0
        elif kind == "alternating":
            mask[bad] = _QUIET
        elif variant != "unguarded":  # "unguarded" is the clean reference; the others train on the NaN batch
            x = x.clone()
            x[bad[0] * batch, 0] = math.nan
        return _loader(x, y, mask.reshape(-1, 1), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        x, y = _regression(n_test, d_in, teacher, _gen(seed, 4))
        return float(F.mse_loss(module(x), y))

    common = f"MLP {d_in}-64-64-{d_out}, teacher-generated regression, batch {batch}, {steps} steps, Adam lr {lr:g}, "
    common += f"{n_test} held-out"
    if kind != "nan_batch":
        title, detail = {
            "alternating": (
                f"two loss levels in turn (weight 1, then {_QUIET:g}, every {period} steps)",
                f"the loss mask is {_QUIET:g} on steps {period + 1}-{2 * period}, {3 * period + 1}-{4 * period}, ... "
                "(the gradient norm drops 100x and comes back)",
            ),
            "masked": (
                "five fully masked batches (all gradients exactly 0)",
                f"batches {bad[0]}-{bad[-1]} (steps {bad[0] + 1}-{bad[-1] + 1}) have an all-zero loss mask",
            ),
        }[kind]
        return _Job(
            name=name,
            title=title,
            settings=f"{common}; {detail}",
            steps=steps,
            module=lambda: RegressionModule(d_in, d_out, lr=lr),
            data=data,
            evaluate=evaluate,
            metric="MSE",
        )
    return _Job(
        name=name,
        title="one batch with a NaN input (fp32)",
        settings=f"{common}; batch {bad[0]} (step {bad[0] + 1}) holds one NaN input",
        steps=steps,
        module=lambda: RegressionModule(d_in, d_out, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
        variants=("unguarded", "guarded", "unguarded_nan"),
        expect_skipped=1,
        note=f"nan_batch: 'unguarded' trains on a clean batch {bad[0]} in place of the NaN one (the reference); "
        "'unguarded_nan' trains on the NaN batch without a guard (for information)",
    )


def _job_rezero(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 200)
    batch, n_test, d_in, d_out, lr, blocks = 64, 2000, 32, 4, 1e-3, 4
    teacher = _Teacher(d_in, d_out, seed)

    data, evaluate = _regression_task(teacher, d_in, seed, (5, 6), steps * batch, batch, n_test)

    return _Job(
        name="rezero",
        title="ReZero residual MLP (gates start at 0)",
        settings=f"stem {d_in}-64, {blocks} branches 64-64-64 gated by alpha=0, head 64-{d_out}, teacher regression, "
        f"batch {batch}, {steps} steps, Adam lr {lr:g}, {n_test} held-out",
        steps=steps,
        module=lambda: ReZeroModule(d_in, d_out, blocks=blocks, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


def _classifier_job(
    name: str, size: Size, seed: int, steps: int | None, kind: Literal["warmup", "warmup_zero", "dropout"]
) -> _Job:
    default_steps = 300
    steps = steps or (10 if size == "quick" else default_steps)
    d_in, classes, n_test = 32, 10, 2000
    if kind == "warmup":
        batch, lr, dropout = 64, 0.1, 0.0
        warm = _scaled(50, steps, default_steps)
        first = _scaled(100, steps, default_steps)
        cycles = (first, max(1, steps - warm - first))
        schedule: Callable[[int], float] | None = _warmup_restart(warm, cycles)
        title = "SGD, warm-up from 1e-4 of the rate, cosine with a warm restart"
        extra = (
            f"linear warm-up from 1e-4 of the rate over {warm} steps, cosine cycles of {cycles[0]} and "
            f"{cycles[1]} steps (restart at step {warm + cycles[0] + 1})"
        )
    elif kind == "warmup_zero":
        batch, lr, dropout = 64, 0.1, 0.0
        warm = _scaled(40, steps, default_steps)
        schedule = _linear_warmup(warm)
        title = "SGD, linear warm-up from exactly 0, then constant"
        extra = f"linear warm-up from 0 over {warm} steps (as Hugging Face's schedules), then constant"
    else:
        batch, lr, dropout = 8, 0.01, 0.5  # 0.05 (0.5 with momentum) on batches of 8 does not learn
        schedule = None
        title = "dropout 0.5 on batches of 8 (noisy gradients)"
        extra = "dropout 0.5 after each hidden layer"

    data, evaluate = _classification_task(d_in, classes, seed, (7, 8), steps * batch, batch, n_test)

    return _Job(
        name=name,
        title=title,
        settings=f"MLP {d_in}-128-128-{classes}, teacher-labelled Gaussian data, batch {batch}, {steps} steps, SGD lr "
        f"{lr:g} momentum 0.9, {extra}, {n_test} held-out",
        steps=steps,
        module=lambda: MLPClassifierModule(d_in, classes, dropout=dropout, lr=lr, schedule=schedule),
        data=data,
        evaluate=evaluate,
        metric="CE",
    )


def _job_unfreeze(size: Size, seed: int, steps: int | None, name: Literal["unfreeze", "finetune"]) -> _Job:
    default_steps = 200
    steps = steps or (8 if size == "quick" else default_steps)
    at = _scaled(50, steps, default_steps)
    batch, d_in, classes, n_test, lr = 64, 32, 10, 2000, 1e-3

    data, evaluate = _classification_task(d_in, classes, seed, (9, 10), steps * batch, batch, n_test)
    if name == "unfreeze":
        title, optimizer, module = "backbone frozen, then unfrozen mid-run", "on all parameters", UnfreezeModule
    else:
        title = "backbone frozen, then given to the optimizer mid-run (BackboneFinetuning's way)"
        optimizer, module = (
            f"on the head, the backbone's param group at lr {lr / 10:g} from step {at + 1}",
            FinetuneModule,
        )

    return _Job(
        name=name,
        title=title,
        settings=f"backbone {d_in}-128-128 (frozen for steps 1-{at}, unfrozen at step {at + 1}) + head 128-{classes}, "
        f"teacher-labelled data, batch {batch}, {steps} steps, AdamW lr {lr:g} {optimizer}, {n_test} held-out",
        steps=steps,
        module=lambda: module(d_in, classes, unfreeze_at=at, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="CE",
    )


def _job_transformer(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (6 if size == "quick" else 150)
    # Batches of 4: bf16 matmuls are emulated on CPUs without bf16 units (5x slower than fp32).
    vocab, seq_len, batch, accumulate, n_test, lr = 64, 32, 4, 2, 256, 3e-3
    warmup = min(20, max(1, steps // 5))
    probs, entropy = _markov_chain(vocab, 4, seed)

    def data(variant: str) -> DataLoader:
        tokens = _markov_sequences(probs, steps * accumulate * batch, seq_len + 1, _gen(seed, 12))
        return _loader(tokens, batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        tokens = _markov_sequences(probs, n_test, seq_len + 1, _gen(seed, 13))
        return float(module.loss(tokens))  # type: ignore[operator]

    return _Job(
        name="transformer_bf16",
        title="tiny causal transformer LM, bf16-mixed, gradient accumulation",
        settings=f"2 pre-norm layers, d_model 64, 4 heads, vocab {vocab}, {seq_len} tokens, random Markov chain with 4 "
        f"successors per token (entropy rate {entropy:.3f} nats: the best held-out CE; uniform {math.log(vocab):.3f}), "
        f"batch {batch} x accumulate {accumulate}, {steps} optimizer steps, AdamW lr {lr:g}, warm-up {warmup} steps "
        f"then cosine to 0.1x, precision bf16-mixed, {n_test} held-out sequences (CE in fp32)",
        steps=steps,
        module=lambda: TinyLMModule(vocab, seq_len, lr=lr, warmup=warmup, total_steps=steps),
        data=data,
        evaluate=evaluate,
        metric="CE",
        trainer_kwargs={"precision": "bf16-mixed", "accumulate_grad_batches": accumulate},
    )


def _job_gan(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (6 if size == "quick" else 300)
    batch, latent, hidden, n_test, lr = 128, 8, 128, 1000, 2e-3
    floor = _mmd(_ring(n_test, _gen(seed, 14)), _ring(n_test, _gen(seed, 15)))

    def data(variant: str) -> DataLoader:
        g = _gen(seed, 16)
        real = _ring(steps * batch, g)
        return _loader(real, torch.randn(steps * batch, latent, generator=g), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        z = torch.randn(n_test, latent, generator=_gen(seed, 17))
        return _mmd(module(z), _ring(n_test, _gen(seed, 14)))

    return _Job(
        name="gan",
        title="GAN, manual optimization, two optimizers",
        settings=f"generator {latent}-{hidden}-{hidden}-2, discriminator 2-{hidden}-{hidden}-1 (LeakyReLU), ring of 8 "
        f"Gaussians (radius 2, std 0.2), batch {batch}, {steps} iterations (one D step, one G step), Adam lr {lr:g} "
        f"betas (0.5, 0.999) each; "
        f"held-out: MMD (RBF 0.05+0.2+1) of {n_test} generated vs {n_test} held-out real samples (real vs real: "
        f"{floor:.3f})",
        steps=steps,
        module=lambda: GANModule(latent, hidden, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MMD",
        trainer_kwargs={"_steps_per_iteration": 2},
    )


def _job_deep(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (3 if size == "quick" else 50)
    depth, width, d_out, batch, n_test, lr = 600, 16, 4, 64, 2000, 1e-3
    teacher = _Teacher(width, d_out, seed)

    data, evaluate = _regression_task(teacher, width, seed, (18, 19), steps * batch, batch, n_test)

    return _Job(
        name="deep1000",
        title=f"{depth} residual Linear+LayerNorm blocks ({2 * depth} layers)",
        settings=f"{depth} x (x + LayerNorm(Linear({width},{width})(x))), LayerNorm + Linear head to {d_out}, teacher "
        f"regression, batch {batch}, {steps} steps, Adam lr {lr:g} (foreach), {n_test} held-out",
        steps=steps,
        module=lambda: DeepResidualModule(depth, width, d_out, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


def _job_moe(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 300)
    batch, n_test, d_in, d_out, experts, lr = 8, 2000, 16, 4, 8, 1e-3
    teacher = _Teacher(d_in, d_out, seed)
    # Salts 31 and 32 (the LoRA config's too; the configs are independent): the draw of the first MoE run tried, whose
    # seeds 0 and 4 (of 0-9) hold one genuine isolated spike of the total norm (4.5x its average on seed 0).
    data, evaluate = _regression_task(teacher, d_in, seed, (31, 32), steps * batch, batch, n_test)

    return _Job(
        name="moe",
        title="mixture of experts, top-1 routing, idle experts",
        settings=f"input {d_in}-32, {experts} experts 32-32-32 (top-1 router, residual), head 32-{d_out}, teacher "
        f"regression, batch {batch} (experts without a token get no gradient), {steps} steps, AdamW lr {lr:g}, "
        f"{n_test} held-out",
        steps=steps,
        module=lambda: MoEModule(d_in, d_out, experts=experts, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


def _job_last_batch(size: Size, seed: int, steps: int | None) -> _Job:
    per_epoch = 21  # 20 batches of 64, then one of 1
    steps = steps or (per_epoch + 2 if size == "quick" else 25 * per_epoch)
    batch, n_test, d_in, d_out, lr, noise = 64, 2000, 32, 4, 1e-3, 0.3
    teacher = _Teacher(d_in, d_out, seed)

    def noisy(n: int, salt: int) -> tuple[Tensor, Tensor]:
        g = _gen(seed, salt)
        x, y = _regression(n, d_in, teacher, g)
        return x, y + noise * torch.randn(y.shape, generator=g)

    def data(variant: str) -> DataLoader:
        x, y = noisy(batch * (per_epoch - 1) + 1, 28)
        return _loader(x, y, torch.ones(len(x), 1), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        x, y = noisy(n_test, 29)
        return float(F.mse_loss(module(x), y))

    return _Job(
        name="last_batch",
        title="a last batch of one example every epoch",
        settings=f"MLP {d_in}-64-64-{d_out}, teacher regression + label noise (std {noise:g}), "
        f"{batch * (per_epoch - 1) + 1} examples in batches of {batch} (the last of each epoch: 1), {steps} steps, "
        f"Adam lr {lr:g}, {n_test} held-out (noisy labels)",
        steps=steps,
        module=lambda: RegressionModule(d_in, d_out, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


def _job_checkpointed(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 200)
    batch, d_in, classes, n_test, blocks, lr = 64, 32, 10, 2000, 6, 1e-3

    data, evaluate = _classification_task(d_in, classes, seed, (24, 25), steps * batch, batch, n_test)

    return _Job(
        name="checkpointed",
        title="activation checkpointing (blocks recomputed in backward)",
        settings=f"stem {d_in}-64, {blocks} pre-norm residual blocks 64-64-64 under torch.utils.checkpoint "
        f"(non-reentrant), head 64-{classes}, teacher-labelled data, batch {batch}, {steps} steps, AdamW lr {lr:g}, "
        f"{n_test} held-out",
        steps=steps,
        module=lambda: CheckpointedModule(d_in, classes, blocks=blocks, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="CE",
    )


def _views(n: int, in_features: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two noisy views (noise std 0.3) of the same Gaussian samples: the positive pairs of a contrastive loss."""
    base = torch.randn(n, in_features, generator=g)
    return base + 0.3 * torch.randn(n, in_features, generator=g), base + 0.3 * torch.randn(n, in_features, generator=g)


def _job_contrastive(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 300)
    batch, d_in, embedding, n_test, lr = 64, 32, 16, 512, 1e-3

    def data(variant: str) -> DataLoader:
        return _loader(*_views(steps * batch, d_in, _gen(seed, 26)), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        return float(module.loss(*_views(n_test, d_in, _gen(seed, 27))))  # type: ignore[operator]

    return _Job(
        name="contrastive",
        title="contrastive encoders with a learnable temperature (CLIP-style)",
        settings=f"two encoders {d_in}-64-{embedding}, symmetric InfoNCE, learnable logit scale (init 1/0.07, cap "
        f"100), paired noisy views, batch {batch}, {steps} steps, AdamW lr {lr:g} weight decay 0.1, held-out: "
        f"InfoNCE on {n_test} new pairs in one batch (chance {math.log(n_test):.3f})",
        steps=steps,
        module=lambda: ContrastiveModule(d_in, embedding, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="InfoNCE",
    )


def _job_diffusion(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 400)
    batch, n_test, timesteps, lr = 32, 4000, 1000, 1e-3

    def draw(n: int, salt: int) -> tuple[Tensor, Tensor, Tensor]:
        g = _gen(seed, salt)
        return _ring(n, g), torch.randint(0, timesteps, (n,), generator=g), torch.randn(n, 2, generator=g)

    def data(variant: str) -> DataLoader:
        return _loader(*draw(steps * batch, 61), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        return float(module.loss(*draw(n_test, 62)))  # type: ignore[operator]

    return _Job(
        name="diffusion",
        title="DDPM denoiser with a zero-initialised output layer",
        settings=f"eps-prediction MLP (2 + 16-dim timestep embedding)-128-128-2, SiLU, output layer zero-initialised, "
        f"{timesteps} timesteps (linear betas 1e-4 to 0.02), uniform timesteps, ring of 8 Gaussians, batch {batch}, "
        f"{steps} steps, Adam lr {lr:g}, held-out: denoising MSE on {n_test} new (point, timestep, noise) triples",
        steps=steps,
        module=lambda: DenoiserModule(timesteps, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


def _job_reinforce(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (8 if size == "quick" else 400)
    contexts, arms, batch, lr = 8, 4, 32, 1e-2
    payout = 0.02 + 0.1 * torch.rand(contexts, arms, generator=_gen(seed, 63))

    def data(variant: str) -> DataLoader:
        g = _gen(seed, 64)
        n = steps * batch
        return _loader(
            torch.randint(0, contexts, (n,), generator=g),
            torch.rand(n, generator=g),
            torch.rand(n, generator=g),
            batch=batch,
        )

    def evaluate(module: L.LightningModule) -> float:
        return float(module.regret())  # type: ignore[operator]

    return _Job(
        name="reinforce",
        title="REINFORCE on a bandit with rare jackpots (no baseline)",
        settings=f"softmax policy, one-hot context ({contexts})-32-{arms}, tanh, uniform start; each arm pays 20 with "
        f"probability 0.02-0.12, else 0; loss -reward * log pi, no baseline, batch {batch}, {steps} steps, Adam lr "
        f"{lr:g}; held-out: the exact regret (best arm's expected reward minus the policy's, mean over contexts)",
        steps=steps,
        module=lambda: BanditPolicyModule(payout, lr=lr),
        data=data,
        evaluate=evaluate,
        metric="regret",
    )


def _job_catapult(size: Size, seed: int, steps: int | None) -> _Job:
    steps = steps or (10 if size == "quick" else 400)
    batch, n_test, d_in, d_out, lr = 64, 2000, 32, 4, CATAPULT_LR
    teacher = _Teacher(d_in, d_out, seed)

    def data(variant: str) -> DataLoader:
        x, y = _regression(steps * batch, d_in, teacher, _gen(seed, 65))
        return _loader(x, y, torch.ones(len(x), 1), batch=batch)

    def evaluate(module: L.LightningModule) -> float:
        x, y = _regression(n_test, d_in, teacher, _gen(seed, 66))
        return float(F.mse_loss(module(x), y))

    return _Job(
        name="catapult",
        title="plain SGD at a rate past the edge of stability (a catapult)",
        settings=f"MLP {d_in}-64-64-{d_out}, no normalisation, teacher regression, batch {batch}, {steps} steps, plain "
        f"SGD (no momentum) lr {lr:g}: the training loss first rises above its start, then falls; {n_test} held-out",
        steps=steps,
        module=lambda: RegressionModule(d_in, d_out, lr=lr, optimizer="sgd"),
        data=data,
        evaluate=evaluate,
        metric="MSE",
    )


CONFIGS: dict[str, Callable[[Size, int, int | None], _Job]] = {
    "lora": _job_lora,
    "masked": lambda size, seed, steps: _regression_job("masked", size, seed, steps, "masked"),
    "rezero": _job_rezero,
    "warmup": lambda size, seed, steps: _classifier_job("warmup", size, seed, steps, "warmup"),
    "warmup_zero": lambda size, seed, steps: _classifier_job("warmup_zero", size, seed, steps, "warmup_zero"),
    "nan_batch": lambda size, seed, steps: _regression_job("nan_batch", size, seed, steps, "nan_batch"),
    "unfreeze": lambda size, seed, steps: _job_unfreeze(size, seed, steps, "unfreeze"),
    "finetune": lambda size, seed, steps: _job_unfreeze(size, seed, steps, "finetune"),
    "transformer_bf16": _job_transformer,
    "gan": _job_gan,
    "deep1000": _job_deep,
    "dropout": lambda size, seed, steps: _classifier_job("dropout", size, seed, steps, "dropout"),
    "moe": _job_moe,
    "checkpointed": _job_checkpointed,
    "contrastive": _job_contrastive,
    "last_batch": _job_last_batch,
    "alternating": lambda size, seed, steps: _regression_job("alternating", size, seed, steps, "alternating"),
    "diffusion": _job_diffusion,
    "reinforce": _job_reinforce,
    "catapult": _job_catapult,
}


# -------------------------------------------------------------------------------------------------------- runs
class _Trace(LossRecorder):
    """Records every training loss, the lowest LR multiplier of the guard's LRGuard and the largest share of its
    progress a run gave back (``gradguard/loss_relapse``, read at each log; after the guard's hooks)."""

    def __init__(self, guard: GradGuard | None) -> None:
        super().__init__()
        self.guard = guard
        self.min_lr_scale = 1.0
        self.max_relapse: float | None = None

    def _watch(self, trainer: L.Trainer) -> None:
        if self.guard is None:
            return
        lr_guard = self.guard.lr_guard
        for key in range(len(trainer.optimizers)):
            if lr_guard is not None:
                self.min_lr_scale = min(self.min_lr_scale, lr_guard.scale(key))
            share = self.guard.loss_relapse(key)
            if share is not None:
                self.max_relapse = share if self.max_relapse is None else max(self.max_relapse, share)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._watch(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._watch(trainer)

    def values(self) -> list[float]:
        return self.recorded().tolist()


@torch.no_grad()
def _evaluate(job: _Job, module: L.LightningModule) -> float:
    was_training = module.training
    module.eval()
    try:
        return job.evaluate(module)
    finally:
        module.train(was_training)


def _run_one(
    job: _Job,
    variant: str,
    args: argparse.Namespace,
    guard_as: tuple[str, Callable[[], GradGuard]] | None = None,
    prepare: Callable[[L.LightningModule], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run. ``guard_as``: (label, factory) in place of the variant's own guard; ``prepare``
    changes the module before training (another benchmark's bad batches)."""
    L.seed_everything(args.seed, verbose=False)
    module = job.module()
    if prepare is not None:
        prepare(module)
    data = job.data(variant)
    init = _evaluate(job, module)  # no global RNG is drawn: the training run is unaffected
    if guard_as is None:
        guard_as = (GUARD_LABEL, GradGuard) if variant == "guarded" else ZOO_CLIPPERS.get(variant)
    label = guard_as[0] if guard_as is not None else None
    guard = guard_as[1]() if guard_as is not None else None
    trace = _Trace(guard)
    callbacks: list[Callback] = [trace] if guard is None else [guard, trace]  # the trace reads after the guard
    logger: TensorBoardLogger | bool = False
    if args.logdir:
        logger = TensorBoardLogger(args.logdir, name=job.name, version=variant, default_hp_metric=False)
    kwargs = {k: v for k, v in job.trainer_kwargs.items() if not k.startswith("_")}
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    cublas_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=job.max_steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
        **kwargs,
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=data)
    finally:
        # deterministic=True sets process-wide flags: leave the process as it was.
        torch.use_deterministic_algorithms(deterministic_before)
        if cublas_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas_before
    wall_s = time.perf_counter() - start
    held_out = _evaluate(job, module)

    messages = [str(w.message) for w in caught]
    guard_warnings = [m for m in messages if m.startswith("GradGuard")]
    losses = trace.values()
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    finite = [v for v in losses if math.isfinite(v)]
    head, tail = finite[: max(1, len(finite) // 10)], finite[-max(1, len(finite) // 10) :]
    return {
        "config": job.name,
        "variant": variant,
        "guard": label,
        "steps": job.steps,
        "global_step": trainer.global_step,
        "metric": job.metric,
        "init_heldout": init,
        "heldout": held_out,
        "train_loss_first10pct": sum(head) / len(head) if head else math.nan,
        "train_loss_last10pct": sum(tail) / len(tail) if tail else math.nan,
        "losses_recorded": len(losses),
        "nonfinite_losses": len(bad),
        "first_nonfinite_batch": bad[0] if bad else None,
        "events": guard.summary() if guard is not None else None,
        "min_lr_scale": trace.min_lr_scale if guard is not None and guard.lr_guard is not None else None,
        "final_lr_scale": (
            min(guard.lr_guard.scale(i) for i in range(len(trainer.optimizers)))
            if guard is not None and guard.lr_guard is not None
            else None
        ),
        # The early restart's rescue clipper at work (for any optimizer): never in a healthy run.
        "rescued": any(guard.rescuing(i) for i in range(len(trainer.optimizers))) if guard is not None else None,
        # The late-collapse measure's peak (None: unguarded, or never learned enough to be measured): no healthy
        # run should come near the warning's 0.4.
        "max_loss_relapse": trace.max_relapse,
        "guard_warnings": len(guard_warnings),
        "guard_warning_samples": guard_warnings[:3],
        "other_warnings": len(messages) - len(guard_warnings),
        "wall_s": wall_s,
    }


def _nudge(at: int, factor: float) -> Callable[[L.LightningModule], None]:
    """A ``prepare`` that multiplies the gradients of optimizer step ``at`` (counted from 1, every optimizer's steps
    together, as ``max_steps``) by ``factor``, after the backward pass (AMP's unscaling and accumulation done)."""

    def prepare(module: L.LightningModule) -> None:
        hook = module.on_before_optimizer_step
        calls = itertools.count(1)

        def nudged(optimizer: torch.optim.Optimizer) -> None:
            if next(calls) == at:
                with torch.no_grad():
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad.mul_(factor)
            hook(optimizer)

        module.on_before_optimizer_step = nudged  # type: ignore[method-assign]

    return prepare


def _noise_floor(job: _Job, reference: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train the config's reference ``args.noise`` more times, each with one step's gradients nudged by
    ``1 +- NOISE_SCALE`` (alternately, at steps spread evenly over the run): how far a change that harms nothing
    moves the held-out metric. A chaotic run (SGD past the edge of stability) moves by more than the zoo's bar."""
    n = args.noise
    steps = [max(1, round(i * job.max_steps / (n + 1))) for i in range(1, n + 1)]
    factors = [1.0 + NOISE_SCALE if i % 2 == 0 else 1.0 - NOISE_SCALE for i in range(n)]
    u = reference["heldout"]
    rels = []
    for at, factor in zip(steps, factors, strict=True):
        v = _run_one(job, job.reference, args, prepare=_nudge(at, factor))["heldout"]
        rels.append((v - u) / abs(u) * 100 if math.isfinite(u) and math.isfinite(v) and u != 0 else math.nan)
        print(f"  {job.name:<17} noise x{factor:<8g} at step {at:>4}", file=sys.stderr, flush=True)
    finite = [r for r in rels if math.isfinite(r)]
    return {
        "runs": n,
        "scale": NOISE_SCALE,
        "steps": steps,
        "factors": factors,
        "rel_diff_pct": rels,
        "low_pct": min(finite) if finite else math.nan,
        "high_pct": max(finite) if finite else math.nan,
    }


def _unhealthy(cfg: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Why the unguarded reference run does not look like healthy training (empty: it does)."""
    why = []
    if ref["nonfinite_losses"]:
        why.append(f"{ref['nonfinite_losses']} non-finite training loss(es)")
    if not math.isfinite(ref["heldout"]):
        why.append(f"held-out {cfg['metric']} is {ref['heldout']}")
    elif not ref["heldout"] < 0.95 * ref["init_heldout"]:
        why.append(
            f"held-out {cfg['metric']} {ref['heldout']:.4g} is not below 95% of its initial {ref['init_heldout']:.4g}"
        )
    return why


def _verdict(cfg: dict[str, Any], runs: dict[str, dict[str, Any]], variant: str = "guarded") -> dict[str, Any]:
    """PASS/FAIL of one guarded run of a config, with the reasons and the relative difference of the held-out metric."""
    ref, g = runs[cfg["reference"]], runs[variant]
    ev = g["events"] or {}
    u, v = ref["heldout"], g["heldout"]
    rel = (v - u) / abs(u) * 100 if math.isfinite(u) and math.isfinite(v) and u != 0 else (0.0 if u == v else math.nan)
    reasons = []
    if ev.get("lr_reduced", 0):
        reasons.append(f"lr_reduced={ev['lr_reduced']} (min LR multiplier {g['min_lr_scale']:.3g})")
    for kind in ("exploding", "diverging"):
        if ev.get(kind, 0):
            reasons.append(f"{kind}={ev[kind]}")
    # One-sided: a guarded run that ends better than the unguarded one did no harm.
    if not (math.isfinite(rel) and rel <= TOLERANCE_PCT):
        reasons.append(
            f"held-out {cfg['metric']} {v:.4g} vs {u:.4g} unguarded ({rel:+.2f}%, limit +{TOLERANCE_PCT:g}%)"
        )
    if cfg["expect_skipped"] and ev.get("skipped") != cfg["expect_skipped"]:
        reasons.append(f"skipped={ev.get('skipped')} (expected exactly {cfg['expect_skipped']})")
    noise = cfg.get("noise")
    return {
        "config": cfg["config"],
        "variant": variant,
        "guard": g["guard"],
        "verdict": "FAIL" if reasons else "PASS",
        "reasons": reasons,
        "rel_diff_pct": rel,
        # The bar is not relaxed: this only says whether a nudge of the reference moved its metric as far.
        "inside_noise": None if noise is None else bool(math.isfinite(rel) and rel <= noise["high_pct"]),
        "unguarded_unhealthy": _unhealthy(cfg, ref),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the selected configs unguarded and with ``GradGuard()``; return meta, configs, rows and verdicts.

    Args:
        args: The parsed command line (see ``--help``), plus ``command``, the command as typed.
    """
    size: Size = "quick" if args.quick else "default"
    jobs = [CONFIGS[name](size, args.seed, args.steps) for name in args.configs]
    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    clipper_verdicts: list[dict[str, Any]] = []
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)  # small nets: extra threads only add synchronisation (and load a shared machine)
        for job in jobs:
            cfg = {
                "config": job.name,
                "title": job.title,
                "settings": job.settings,
                "steps": job.steps,
                "variants": [*job.variants, *(ZOO_CLIPPERS if args.clippers else ())],
                "reference": job.reference,
                "metric": job.metric,
                "expect_skipped": job.expect_skipped,
                "note": job.note,
                "noise": None,
            }
            configs.append(cfg)
            runs = {}
            for variant in cfg["variants"]:
                row = _run_one(job, variant, args)
                rows.append(row)
                runs[variant] = row
                print(
                    f"  {job.name:<17} {variant:<14} {row['global_step']:>5} steps {row['wall_s']:7.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if args.noise:
                cfg["noise"] = _noise_floor(job, runs[job.reference], args)
            verdicts.append(_verdict(cfg, runs))
            clipper_verdicts += [_verdict(cfg, runs, v) for v in runs if v in ZOO_CLIPPERS]
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "command": args.command,
        "size": size,
        "seed": args.seed,
        "steps_override": args.steps,
        "noise_runs": args.noise,
        "logdir": args.logdir,
        "machine": machine(),
        "threads": 1,
        "tolerance_pct": TOLERANCE_PCT,
        "wall_s": time.perf_counter() - start,
    }
    return {"meta": meta, "configs": configs, "rows": rows, "verdicts": verdicts, "clipper_verdicts": clipper_verdicts}


# ------------------------------------------------------------------------------------------------------ report
def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as a markdown table, one verdict line per config underneath."""
    meta, m = result["meta"], result["meta"]["machine"]
    steps = f", {meta['steps_override']} steps per config" if meta["steps_override"] else ""
    lines = [
        "# GradGuard healthy zoo: does the default GradGuard() leave healthy training alone?",
        "",
        f"command: `{meta['command']}`  ",
        (
            f"machine: {m['cpus']} CPUs available ({m['cpu_count']} in total, {m['processor']}), {meta['threads']} "
            f"thread per run, python {m['python']}, torch {m['torch']}, lightning {m['lightning']}  "
        ),
        (
            f"zoo: {meta['size']}, seed {meta['seed']}{steps}; both runs of a config start from the same weights and "
            "see the same batches"
        ),
        "",
        "configs:",
        "",
    ]
    for cfg in result["configs"]:
        lines.append(f"* `{cfg['config']}`: {cfg['title']}. {cfg['settings']}")
    header = (
        "config",
        "run",
        "steps",
        "metric",
        "init",
        "held-out",
        "rel. diff",
        "non-finite",
        "exploding",
        "diverging",
        "lr_reduced",
        "min LR x",
        "skipped",
        "clipped",
        "vanishing",
        "warns",
        "wall s",
    )
    rel = {(v["config"], v["variant"]): v["rel_diff_pct"] for v in result["verdicts"] + result["clipper_verdicts"]}
    refs = {c["config"]: c["reference"] for c in result["configs"]}
    table: list[tuple[str, ...]] = []
    for row in result["rows"]:
        ev = row["events"]
        diff = "-"
        if (row["config"], row["variant"]) in rel:
            r = rel[row["config"], row["variant"]]
            diff = f"{r:+.2f}%" if math.isfinite(r) else "nan"
        elif row["variant"] == refs[row["config"]]:
            diff = "(ref)"
        table.append(
            (
                row["config"],
                row["variant"],
                str(row["steps"]),
                row["metric"],
                num(row["init_heldout"]),
                num(row["heldout"]),
                diff,
                str(row["nonfinite_losses"]),
                *(
                    (
                        str(ev["exploding"]),
                        str(ev["diverging"]),
                        str(ev["lr_reduced"]),
                        num(row["min_lr_scale"], ".3g"),
                        str(ev["skipped"]),
                        str(ev["clipped"]),
                        str(ev["vanishing"]),
                        str(row["guard_warnings"]),
                    )
                    if ev
                    else ("-",) * 8
                ),
                f"{row['wall_s']:.1f}",
            )
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    lines.append("")
    notes = [c["note"] for c in result["configs"] if c["note"]]
    lines += [f"note: {n}  " for n in notes]
    lines.append(
        "PASS: the guarded run had exploding == 0, diverging == 0 and lr_reduced == 0 and its held-out metric is at "
        f"most {meta['tolerance_pct']:g}% worse than the unguarded reference (nan_batch: also skipped == 1)"
    )
    noise = {c["config"]: c["noise"] for c in result["configs"] if c.get("noise")}
    if noise:
        lines.append(
            f"noise floor: the unguarded reference trained {meta['noise_runs']} more times, each with one step's "
            f"gradients multiplied by 1 +- {NOISE_SCALE:g}; the range of its held-out change"
        )
    lines.append("")
    for v in result["verdicts"]:
        line = f"- **{v['verdict']}** `{v['config']}`"
        line += f": {'; '.join(v['reasons'])}" if v["reasons"] else f" (held-out {v['rel_diff_pct']:+.2f}%)"
        if v["config"] in noise:
            floor = noise[v["config"]]
            line += f"; noise floor {floor['low_pct']:+.2f}% to {floor['high_pct']:+.2f}%"
            if v["inside_noise"] and any(r.startswith("held-out") for r in v["reasons"]):
                line += " (the held-out difference lies inside it)"
        if v["unguarded_unhealthy"] and meta["size"] != "quick":
            line += (
                f" -- WARNING, the unguarded run looks unhealthy ({'; '.join(v['unguarded_unhealthy'])}): "
                "adjust the config"
            )
        lines.append(line)
    passed = sum(v["verdict"] == "PASS" for v in result["verdicts"])
    lines.append("")
    lines.append(f"{passed}/{len(result['verdicts'])} configs PASS; total wall time {meta['wall_s']:.0f} s")
    if result["clipper_verdicts"]:
        lines += ["", "The same bar for each other clipper (--clippers; the verdicts above are the default's):"]
        for label in dict.fromkeys(v["guard"] for v in result["clipper_verdicts"]):
            mine = [v for v in result["clipper_verdicts"] if v["guard"] == label]
            fails = [f"`{v['config']}` ({'; '.join(v['reasons'])})" for v in mine if v["verdict"] == "FAIL"]
            fail = f"; FAIL: {', '.join(fails)}" if fails else ""
            lines.append(f"- `{label}`: {len(mine) - len(fails)}/{len(mine)} PASS{fail}")
    if meta["size"] == "quick":
        lines.append("(--quick: a few steps per config, to check that everything runs; these verdicts mean nothing)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/healthy_zoo.py",
        description="Train healthy but unusual configs unguarded and with GradGuard(); check the guard does no harm.",
    )
    p.add_argument("--quick", action="store_true", help="a few steps per config (seconds; for tests)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of every selected config (GAN: iterations), instead of its default",
    )
    add_clippers_argument(p, ZOO_CLIPPERS)
    p.add_argument(
        "--noise",
        type=int,
        default=0,
        metavar="N",
        help=f"also train each config's unguarded reference N more times, each with one step's gradients multiplied "
        f"by 1 +- {NOISE_SCALE:g}: the range of their held-out change is the config's noise floor (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of every run (default: 0)")
    p.add_argument("--logdir", default=None, help="TensorBoard log root (default: no logger)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    args.configs = names
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.noise < 0:
        p.error("--noise must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "healthy_zoo.py", _parse, run, report)


if __name__ == "__main__":
    main()
