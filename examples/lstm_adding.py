"""The adding problem with an LSTM or a plain tanh RNN, trained under GradGuard.

The task (Hochreiter & Schmidhuber 1997, in the form used by Le et al. 2015 and Arjovsky et al. 2016):
each input is a sequence of ``T`` steps with two channels. The first channel holds numbers drawn
uniformly from ``[0, 1]``; the second is zero except for two markers, one in the first half of the
sequence and one in the second half. The target is the sum of the two marked numbers. Predicting
the mean, 1, whatever the input gives an MSE of ``Var(U + U) = 1/6 ~ 0.167``: a model only beats
that baseline once it carries information across up to ``T`` steps. A test MSE below 0.01 counts as
solved.

Recurrent nets are where gradients explode (and vanish): the guarded run clips with ZClip (capped
at norm 1, the classic clipping norm for RNNs), backs the learning rate off on an exploding event,
skips non-finite steps and nudges the recurrent weights towards orthogonality. ``--unstable``
trains with SGD (momentum 0.9) at learning rate 0.5, five times the 0.1 that SGD runs at stably
here: without the guard the loss overflows to inf/NaN within a few dozen steps; with it training
stays finite (SGD is far slower than Adam on this task: do not expect it to solve the problem).

Usage::

    python -m examples.lstm_adding                          # LSTM, T=200, guarded
    python -m examples.lstm_adding --seq-len 100            # shorter sequences, solved sooner
    python -m examples.lstm_adding --model rnn              # plain tanh RNN
    python -m examples.lstm_adding --unstable               # SGD at 5x a stable learning rate, guarded
    python -m examples.lstm_adding --unstable --no-guard    # the same run without the guard
    python -m examples.lstm_adding --quick                  # a few steps, runs in seconds

    # the same experiment through LightningCLI, configured in YAML:
    python -m examples.lstm_adding fit --config examples/configs/lstm_adding.yaml

    tensorboard --logdir gradguard_logs
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_gradguard import ExplodingDetector, GradGuard, LRGuard, Orthogonal, ZClip

#: MSE of always predicting 1, the mean target: ``Var(U1 + U2) = 2 / 12``.
BASELINE_MSE: float = 1.0 / 6.0
#: Test MSE under which the task counts as solved.
SOLVED_MSE: float = 0.01
#: SGD learning rate of ``--unstable``: five times the 0.1 that SGD with momentum 0.9 runs at without diverging.
UNSTABLE_LR: float = 0.5

__all__ = [
    "BASELINE_MSE",
    "SOLVED_MSE",
    "UNSTABLE_LR",
    "AddingDataModule",
    "AddingModule",
    "AddingStream",
    "adding_problem",
    "build_guard",
    "cli_main",
    "main",
]


def adding_problem(n: int, seq_len: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draws ``n`` examples of the adding problem.

    Args:
        n: Number of sequences.
        seq_len: Sequence length ``T`` (at least 2).
        generator: Random generator; the same seed gives the same examples.

    Returns:
        ``(x, y)``: ``x`` of shape ``[n, T, 2]`` (values, markers) and ``y`` of shape ``[n, 1]``,
        the sum of the two marked values. One marker lies in ``[0, T // 2)``, the other in
        ``[T // 2, T)``.

    Example:
        >>> x, y = adding_problem(4, 10, torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([4, 10, 2]), torch.Size([4, 1]))
        >>> x[..., 1].sum(dim=1).tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    values = torch.rand(n, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, seq_len, (n,), generator=generator)
    rows = torch.arange(n)
    markers = torch.zeros(n, seq_len)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values[rows, first] + values[rows, second]).unsqueeze(1)
    return x, y


class AddingStream(IterableDataset):
    """An endless supply of fresh adding-problem batches, ``batches_per_epoch`` per pass.

    Every pass continues the same random stream, so no batch is seen twice and the sequence of
    batches depends only on ``seed``. Meant for ``DataLoader(stream, batch_size=None)`` in the main
    process (workers would each replay the same stream).

    Args:
        seq_len: Sequence length ``T``.
        batch_size: Sequences per batch.
        batches_per_epoch: Batches yielded by one iteration (one "epoch").
        seed: Seed of the stream.

    Example:
        >>> stream = AddingStream(seq_len=8, batch_size=3, batches_per_epoch=2)
        >>> [tuple(x.shape) for x, _ in stream]
        [(3, 8, 2), (3, 8, 2)]
    """

    def __init__(self, seq_len: int, batch_size: int, batches_per_epoch: int, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.batches_per_epoch):
            yield adding_problem(self.batch_size, self.seq_len, self.generator)


class AddingDataModule(L.LightningDataModule):
    """Adding-problem data: a fresh training stream, fixed validation and test sets.

    Args:
        seq_len: Sequence length ``T`` (200 by default, as in Arjovsky et al. 2016).
        batch_size: Training batch size.
        batches_per_epoch: Training batches between two validations.
        val_size: Size of the fixed validation set.
        test_size: Size of the fixed test set.
        seed: Seed of all three sets (they use different streams derived from it).

    Example:
        >>> dm = AddingDataModule(seq_len=10, batch_size=4, batches_per_epoch=2, val_size=8, test_size=8)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 10, 2), (4, 1))
    """

    def __init__(
        self,
        seq_len: int = 200,
        batch_size: int = 50,
        batches_per_epoch: int = 100,
        val_size: int = 1000,
        test_size: int = 10000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        for name, value in (
            ("batch_size", batch_size),
            ("batches_per_epoch", batches_per_epoch),
            ("val_size", val_size),
            ("test_size", test_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self._train: AddingStream | None = None
        self._val: TensorDataset | None = None
        self._test: TensorDataset | None = None

    def _fixed_set(self, n: int, offset: int) -> TensorDataset:
        # Distinct seeds keep the training stream, validation and test sets disjoint draws.
        generator = torch.Generator().manual_seed(self.seed * 1000 + offset)
        return TensorDataset(*adding_problem(n, self.seq_len, generator))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._train is None:
            self._train = AddingStream(self.seq_len, self.batch_size, self.batches_per_epoch, self.seed * 1000)
        if stage in ("fit", "validate") and self._val is None:
            self._val = self._fixed_set(self.val_size, 1)
        if stage == "test" and self._test is None:
            self._test = self._fixed_set(self.test_size, 2)

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "call setup('fit') first"
        return DataLoader(self._train, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None, "call setup('fit') first"
        return DataLoader(self._val, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        assert self._test is not None, "call setup('test') first"
        return DataLoader(self._test, batch_size=1000)


class AddingModule(L.LightningModule):
    """A recurrent regressor for the adding problem: LSTM or tanh RNN, linear head on the last state.

    The recurrent layer is the submodule ``rnn`` in both cases, so regularizers can select its
    ``weight_hh`` by name.

    Args:
        model: ``"lstm"`` or ``"rnn"`` (a single-layer ``nn.RNN`` with tanh).
        hidden_size: Width of the recurrent state.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD with momentum 0.9).
        lr: Learning rate.
        forget_bias: Initial forget-gate bias of the LSTM (ignored for the RNN). A positive value
            lets the cell remember by default, the usual choice for long-range tasks.

    Example:
        >>> m = AddingModule(model="lstm", hidden_size=8)
        >>> m(torch.zeros(3, 5, 2)).shape
        torch.Size([3, 1])
    """

    def __init__(
        self,
        model: Literal["lstm", "rnn"] = "lstm",
        hidden_size: int = 128,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if model not in ("lstm", "rnn"):
            raise ValueError(f"model must be 'lstm' or 'rnn', got {model!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.rnn: nn.LSTM | nn.RNN
        if model == "lstm":
            self.rnn = nn.LSTM(2, hidden_size, batch_first=True)
            with torch.no_grad():
                # PyTorch orders the gates (input, forget, cell, output); both bias vectors add up.
                self.rnn.bias_ih_l0[hidden_size : 2 * hidden_size].fill_(forget_bias)
                self.rnn.bias_hh_l0[hidden_size : 2 * hidden_size].zero_()
        else:
            self.rnn = nn.RNN(2, hidden_size, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def _mse(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._mse(batch)
        self.log("train_mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_mse", self._mse(batch), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_mse", self._mse(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def build_guard(
    orthogonal: float = 1e-4, max_grad_norm: float | None = 1.0, max_ratio: float | None = None
) -> GradGuard:
    """The guard of this example: ZClip, LR backoff, skip non-finite steps, orthogonal ``weight_hh``.

    ZClip clips norms that jump above the run's own recent history; its cap ``max_grad_norm`` (1,
    the usual norm for clipping RNN gradients, Pascanu et al. 2013) also holds during ZClip's
    warm-up, when there is no history yet: a learning rate far too high diverges in the very first
    steps, and once the weights have overflowed no later clipping can bring them back.

    Args:
        orthogonal: Strength of the orthogonality penalty on the recurrent weights (0 disables it).
        max_grad_norm: Absolute cap of ZClip's threshold (``None``: adaptive only).
        max_ratio: The exploding detector's ratio limit for the total norm, at every step (``None``: its default, none;
            100 during its warm-up).

    Example:
        >>> guard = build_guard(max_ratio=5.0)
        >>> guard.exploding.max_ratio
        5.0
    """
    regularizers = [Orthogonal(orthogonal, modules=r"(rnn|lstm)\.weight_hh")] if orthogonal > 0 else []
    return GradGuard(
        clip=ZClip(max_grad_norm=max_grad_norm),
        lr_guard=LRGuard(),
        regularizers=regularizers,
        on_nonfinite="skip",
        exploding="default" if max_ratio is None else ExplodingDetector(max_ratio=max_ratio),
    )


class _Progress(Callback):
    """Remembers when the validation MSE first fell below ``SOLVED_MSE``; prints each validation if asked."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.perf_counter()
        self.solved_step: int | None = None
        self.solved_s: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.callback_metrics.get("val_mse")
        if val is None or trainer.sanity_checking:
            return
        val = float(val)
        elapsed = time.perf_counter() - self.start
        if self.solved_step is None and val < SOLVED_MSE:
            self.solved_step, self.solved_s = trainer.global_step, elapsed
        if self.verbose:
            print(f"step {trainer.global_step:6d}  val_mse {val:.4g}  ({elapsed:.0f} s)", flush=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.lstm_adding",
        description="The adding problem with an LSTM or tanh RNN under GradGuard.",
    )
    p.add_argument("--model", choices=("lstm", "rnn"), default="lstm", help="recurrent layer (default: lstm)")
    p.add_argument("--seq-len", type=int, default=200, help="sequence length T (default: 200)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    p.add_argument("--batch-size", type=int, default=50, help="batch size (default: 50)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="optimizer (default: adam)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 for adam, 0.1 for sgd)")
    p.add_argument("--max-steps", type=int, default=10000, help="training steps at most (default: 10000)")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations (default: 100)")
    p.add_argument(
        "--stop-mse",
        type=float,
        default=1e-3,
        help="stop once the validation MSE falls below this (default: 1e-3; 0 trains all --max-steps)",
    )
    p.add_argument(
        "--unstable",
        action="store_true",
        help=f"SGD at lr {UNSTABLE_LR:g}, five times a stable rate: diverges without the guard",
    )
    p.add_argument("--no-guard", action="store_true", help="train without GradGuard")
    p.add_argument("--orthogonal", type=float, default=1e-4, help="orthogonal penalty on weight_hh (default: 1e-4)")
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="flag a total norm this many times its running mean as exploding (default: none; 100 in the warm-up)",
    )
    p.add_argument("--quick", action="store_true", help="8 steps on short sequences (seconds; for tests)")
    p.add_argument("--logdir", default="gradguard_logs", help="TensorBoard log root (default: gradguard_logs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = p.parse_args(argv)
    if args.unstable:
        if args.lr is not None or args.optimizer is not None:
            p.error("--unstable sets the optimizer and learning rate; do not combine it with --lr or --optimizer")
        args.optimizer, args.lr = "sgd", UNSTABLE_LR
    args.optimizer = args.optimizer or "adam"
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 0.1
    if args.quick:
        args.seq_len, args.batch_size = 30, 16
        args.max_steps, args.val_every, args.stop_mse = 8, 4, 0.0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains on the adding problem and prints what the guard did; returns the figures.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``); see ``--help``.

    Returns:
        A dict with ``test_mse``, ``train_mse`` (the last logged one), ``solved_step`` (first step
        with validation MSE below 0.01, or ``None``), ``steps``, ``wall_s``, ``guard`` (the guard's
        ``summary()``, or ``None``) and ``log_dir``.
    """
    args = _parse(argv)
    L.seed_everything(args.seed, verbose=False)
    dm = AddingDataModule(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        batches_per_epoch=args.val_every,
        val_size=256 if args.quick else 1000,
        test_size=512 if args.quick else 10000,
        seed=args.seed,
    )
    module = AddingModule(model=args.model, hidden_size=args.hidden, optimizer=args.optimizer, lr=args.lr)
    guard = None if args.no_guard else build_guard(args.orthogonal, max_ratio=args.max_ratio)
    # Without a terminal (a log file) a line per validation reads better than a progress bar.
    progress_bar = not args.quick and sys.stderr.isatty()
    progress = _Progress(verbose=not args.quick and not progress_bar)
    callbacks: list[Callback] = [progress]
    if guard is not None:
        callbacks.insert(0, guard)
    if args.stop_mse > 0:
        # A run that turns NaN stops too (check_finite), which is what an unguarded blow-up looks like.
        callbacks.append(EarlyStopping("val_mse", stopping_threshold=args.stop_mse, patience=10**9))
    name = f"adding_{args.model}_T{args.seq_len}" + ("_unstable" if args.unstable else "")
    name += "_noguard" if args.no_guard else ""
    logger = TensorBoardLogger(args.logdir, name=name)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=2 if args.quick else 25,
        enable_checkpointing=not args.quick,
        enable_progress_bar=progress_bar,
        enable_model_summary=not args.quick,
        num_sanity_val_steps=0,
        accelerator="auto",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall_s = time.perf_counter() - start
    train_mse = float(trainer.callback_metrics.get("train_mse", float("nan")))
    test_mse = trainer.test(module, datamodule=dm, verbose=False)[0]["test_mse"]

    summary = guard.summary() if guard is not None else None
    print()
    print(
        f"Adding problem, {args.model.upper()}, T={args.seq_len}, {args.optimizer} lr={args.lr:g}, "
        f"{trainer.global_step} steps in {wall_s:.0f} s, last training MSE {train_mse:.4g}"
        + (" (no guard)" if guard is None else "")
    )
    if summary is not None:
        print("GradGuard events: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if test_mse < SOLVED_MSE:
        verdict = "solved"
    elif not math.isfinite(test_mse) or test_mse > 10 * BASELINE_MSE:
        verdict = "diverged"
    else:
        verdict = "not solved"
    print(f"Test MSE: {test_mse:.4g} (predict-1 baseline {BASELINE_MSE:.3f}, solved below {SOLVED_MSE}): {verdict}")
    if progress.solved_step is not None:
        print(f"Validation MSE first below {SOLVED_MSE} at step {progress.solved_step} ({progress.solved_s:.0f} s)")
    print(f"TensorBoard logs: {logger.log_dir}\n  tensorboard --logdir {args.logdir}")
    return {
        "test_mse": test_mse,
        "train_mse": train_mse,
        "solved_step": progress.solved_step,
        "steps": trainer.global_step,
        "wall_s": wall_s,
        "guard": summary,
        "log_dir": logger.log_dir,
    }


def _print_guard_report(trainer: L.Trainer) -> None:
    """Prints the event counts of every GradGuard among the trainer's callbacks, and where the logs are."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, GradGuard):
            print("GradGuard events: " + ", ".join(f"{k}={v}" for k, v in cb.summary().items()))
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        print(f"TensorBoard logs: {trainer.logger.log_dir}\n  tensorboard --logdir {trainer.logger.save_dir}")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """The LightningCLI entry point: ``python -m examples.lstm_adding fit --config CONFIG``.

    Args:
        args: Arguments for LightningCLI (``sys.argv[1:]`` when ``None``).
        run: Whether to run the subcommand; with ``False`` the CLI only builds its objects.

    Returns:
        The ``LightningCLI`` instance (its ``trainer``, ``model`` and ``datamodule``).
    """
    from lightning.pytorch.cli import LightningCLI  # needs jsonargparse, an optional dependency

    class _CLI(LightningCLI):
        def after_fit(self) -> None:
            _print_guard_report(self.trainer)

    return _CLI(
        AddingModule,
        AddingDataModule,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "predict"):
        cli_main()
    else:
        main()
