"""What a gradient-histogram step costs: a GradGuard logging step with histograms against one without.

GradGuard writes gradient histograms on the logging step that reaches each multiple of ``histogram_every_n_steps``
(default 1000). This measures, on real ``Trainer.fit`` steps with a ``TensorBoardLogger``, every step logging
(``log_every_n_steps=1``) and ``histogram_every_n_steps=2``, so histogram and plain logging steps alternate and share
the machine's drift:

* **step time**: the whole training step (first hook to last), median over histogram steps and over plain logging
  steps after a warm-up; the difference is the cost of one histogram step (sampling at most 4096 values per block on
  the device, one copy to the host, ``SummaryWriter.add_histogram`` per block);
* **memory**: the gradient samples GradGuard holds between the optimizer step and the log (the only state histograms
  add), what it still holds after the log (nothing), and the event-file bytes one histogram step adds.

On the CPU the clock is the process CPU time with one torch thread, as in ``benchmarks/overhead.py`` (wall time on
a shared machine mostly measures the neighbours; ``--clock wall`` switches)::

    python -m benchmarks.histogram_cost                 # about 1 min on 2 CPU cores; --steps N --json PATH --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import machine, num, run_main
from lightning_gradguard import GradGuard

MODELS = {
    "small": "MLP 64-256-256-10 (6 tensors, 85k parameters)",
    "mid": "48 x [Linear(512, 512), LayerNorm] (196 tensors, 12.7M parameters)",
}


def _net(name: str) -> nn.Module:
    if name == "small":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    blocks: list[nn.Module] = []
    for _ in range(48):
        blocks += [nn.Linear(512, 512), nn.LayerNorm(512)]
    return nn.Sequential(nn.Linear(64, 512), *blocks, nn.Linear(512, 10))


class _Model(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = _net(name)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class _Mark(L.Callback):
    """Reads the clock at a batch's start (put it first in the callback list) or end (put it last)."""

    def __init__(self, clock: str, at: str) -> None:
        self.now = time.process_time if clock == "cpu" else time.perf_counter
        self.at = at
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.at == "start":
            self.marks.append(self.now())

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.at == "end":
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.marks.append(self.now())


class _Guard(GradGuard):
    """GradGuard that records the bytes of gradient samples it holds after each optimizer step and after each log."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.held_after_step: list[int] = []
        self.held_after_log: list[int] = []

    @staticmethod
    def _bytes(samples: dict[int, dict[str, torch.Tensor]]) -> int:
        """The bytes of the samples held, over every optimizer's blocks."""
        return sum(t.numel() * t.element_size() for blocks in samples.values() for t in blocks.values())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.held_after_step.append(self._bytes(self._hist_samples))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.held_after_log.append(self._bytes(self._hist_samples))


def _event_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files if "tfevents" in f)


def measure(name: str, steps: int, clock: str, device: str, root: str) -> dict[str, Any]:
    """Step times of histogram and plain logging steps, and what histograms hold in memory and write to disk."""
    torch.manual_seed(0)
    x, y = torch.randn(64 * 8, 64), torch.randint(0, 10, (64 * 8,))
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    results: dict[str, Any] = {"model": name, "description": MODELS[name]}
    times: dict[str, list[float]] = {}
    guards: dict[str, _Guard] = {}
    for every in (2, None):  # histograms on every other step, then none at all (the event-file baseline)
        start, end = _Mark(clock, "start"), _Mark(clock, "end")
        guard = _Guard(histogram_every_n_steps=every, image_every_n_steps=None, diagnostics=False)
        logger = TensorBoardLogger(root, name=name, version=f"hist_{every}", default_hp_metric=False)
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            logger=logger,
            log_every_n_steps=1,
            callbacks=[start, guard, end],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(_Model(name), data)
        times[str(every)] = [(t1 - t0) * 1e3 for t0, t1 in zip(start.marks, end.marks)]
        guards[str(every)] = guard
        results[f"event_bytes_{every}"] = _event_bytes(logger.log_dir)
    warmup = min(10, steps // 4)
    # The n-th step (1-based) reaches a multiple of 2 when n is even: histograms on the even-numbered steps.
    with_hist = [t for n, t in enumerate(times["2"], start=1) if n > warmup and n % 2 == 0]
    plain = [t for n, t in enumerate(times["2"], start=1) if n > warmup and n % 2 == 1]
    off = [t for n, t in enumerate(times["None"], start=1) if n > warmup]
    guard = guards["2"]
    hist_steps = len([b for b in guard.held_after_step if b])
    results.update(
        params=sum(p.numel() for p in _net(name).parameters()),
        tensors=len(list(_net(name).parameters())),
        histogram_step_ms=statistics.median(with_hist),
        logging_step_ms=statistics.median(plain),
        logging_step_no_histograms_ms=statistics.median(off),
        histogram_extra_ms=statistics.median(with_hist) - statistics.median(plain),
        samples_held_bytes=max(guard.held_after_step),
        samples_held_after_log_bytes=max(guard.held_after_log),
        event_bytes_per_histogram_step=(results["event_bytes_2"] - results["event_bytes_None"]) / max(hist_steps, 1),
        histogram_steps=hist_steps,
    )
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.clock == "cpu":
        torch.set_num_threads(1)
    out: dict[str, Any] = {"meta": {**machine(args.device), "command": args.command, "clock": args.clock}}
    with tempfile.TemporaryDirectory() as root:
        out["models"] = [measure(m, args.steps, args.clock, args.device, root) for m in args.models]
    return out


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"Gradient histogram cost ({meta['clock']} time; {meta['cpus']} CPUs, torch {meta['torch']}, lightning"
        f" {meta['lightning']}, {meta['device']})",
        f"command: {meta['command']}",
        "",
        "| model | logging step | + histograms | extra per histogram step | samples held (after the log) |"
        " event file per histogram step |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['description']} | {num(r['logging_step_ms'], '.3g')} ms | {num(r['histogram_step_ms'], '.3g')} ms"
            f" | {num(r['histogram_extra_ms'], '.3g')} ms | {r['samples_held_bytes'] / 1024:.1f} KiB"
            f" ({r['samples_held_after_log_bytes']} B) | {r['event_bytes_per_histogram_step'] / 1024:.1f} KiB |"
        )
    lines.append("")
    lines.append(
        "Logging steps without any histogram (histogram_every_n_steps=None): "
        + ", ".join(f"{r['model']} {num(r['logging_step_no_histograms_ms'], '.3g')} ms" for r in result["models"])
    )
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,mid", help="comma-separated: small, mid")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (half of them histogram steps)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="20 steps per run")
    p.add_argument("--json", default=None, help="write the results here (- prints them instead of the table)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    if args.quick:
        args.steps = 20
    if args.device != "cpu":
        args.clock = "wall"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the measurement, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "histogram_cost.py", _parse, run, report)


if __name__ == "__main__":
    main()
