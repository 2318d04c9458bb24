"""What each of GradGuard's diagnostics adds to a logging step, on real ``Trainer.fit`` runs on the CPU.

For each model (``small``: a 3-layer MLP; ``mid``: a 24-layer, 4.7M-parameter MLP), every variant trains in the same
process, in one run: ``GradGuard(diagnostics=False)`` (the reference) and ``GradGuard(diagnostics=[name])`` for each
diagnostic alone (``update_ratio``, ``zero_fraction``, ``act_grad``, ``noise_scale``, ``epoch``), then ``True`` (all).
Every step is a logging step (``log_every_n_steps=1``), with a ``TensorBoardLogger`` (per-layer scalars are written,
pictures and histograms are off) and ``accumulate_grad_batches=2`` for every variant (the noise scale needs a second
batch size). A step is the time between two consecutive optimizer-step ends seen by a timer callback that runs after
GradGuard's; each fit's first steps are warm-up and left out, and a fit's figure is the median of its other steps.

Variants are interleaved (one fit of each per repetition, the order rotated between repetitions), and each variant's
extra time and ratio to the reference are taken pair by pair (same repetition) before the median over repetitions.
The clock is the process's CPU time (``time.process_time``) with one PyTorch thread: on a machine shared with other
work, wall-clock time mostly measures the neighbours (``--clock wall`` switches; the JSON says which).

The extra time is per *logging* step: GradGuard measures diagnostics on logging steps only, so at the default
``log_every_n_steps=50`` a diagnostic's share of training time is about ``extra / (50 x step)``.

Run from the repository root::

    python -m benchmarks.diagnostics_cost                 # both models, a few minutes on 2 CPU cores
    python -m benchmarks.diagnostics_cost --quick          # tiny models, one repetition: checks that it runs
    python -m benchmarks.diagnostics_cost --models mid --repeats 7 --json cost.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import command_line, machine, num, run_quietly_and_emit
from lightning_gradguard import GradGuard

#: Each diagnostic alone; the reference (``False``) and all of them (``True``) come around these.
DIAGNOSTICS = ("update_ratio", "zero_fraction", "act_grad", "noise_scale", "epoch")


@dataclass(frozen=True)
class _Model:
    name: str
    depth: int  # Linear layers
    width: int
    batch: int  # examples per micro-batch


_MODELS = {"small": _Model("small", 3, 64, 32), "mid": _Model("mid", 24, 448, 64)}
# --quick keeps the structure and shrinks the work: it only checks that everything runs.
_QUICK = {"small": _Model("small", 3, 8, 8), "mid": _Model("mid", 6, 16, 8)}


def _mlp(depth: int, width: int, inputs: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class _Regressor(L.LightningModule):
    def __init__(self, spec: _Model) -> None:
        super().__init__()
        self.net = _mlp(spec.depth, spec.width)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data(spec: _Model, batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch * batches, 32, generator=g)
    y = x[:, :1] + 0.1 * torch.randn(spec.batch * batches, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=spec.batch, shuffle=False)


class _StepTimer(Callback):
    """Clock readings at the end of each optimizer step (the batch that stepped), after every other callback."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.marks: list[float] = []
        self._step = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self._step:  # an accumulation step that did not step the optimizer is no mark
            self._step = trainer.global_step
            self.marks.append(self.clock())


def _label(diagnostics: bool | list[str]) -> str:
    return "off" if diagnostics is False else "all" if diagnostics is True else diagnostics[0]


def _fit(spec: _Model, diagnostics: bool | list[str], steps: int, warmup: int, clock: Callable[[], float]) -> float:
    """The median step time (seconds) of one fit, past its warm-up steps."""
    torch.manual_seed(0)
    timer = _StepTimer(clock)
    guard = GradGuard(diagnostics=diagnostics, log_every_n_steps=1, image_every_n_steps=None)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps + warmup,
            max_epochs=-1,
            accumulate_grad_batches=2,
            logger=TensorBoardLogger(logdir, name="cost"),
            log_every_n_steps=1,
            callbacks=[guard, timer],  # the timer's hooks run after GradGuard's
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(_Regressor(spec), _data(spec, 2 * (steps + warmup)))
    durations = [b - a for a, b in zip(timer.marks[warmup:], timer.marks[warmup + 1 :])]
    if not durations:
        raise RuntimeError(f"no timed step: raise --steps (got {steps}) above 1")
    return statistics.median(durations)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant on every model (see the module docstring)."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants: list[bool | list[str]] = [False, *([d] for d in DIAGNOSTICS), True]
    specs = _QUICK if args.quick else _MODELS
    result: dict[str, Any] = {
        "meta": {
            "command": args.command,
            "quick": args.quick,
            "clock": args.clock,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "accumulate_grad_batches": 2,
            "machine": machine("cpu"),
        },
        "models": {},
    }
    for name in args.models:
        spec = specs[name]
        model = _Regressor(spec)
        layers = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
        params = sum(p.numel() for p in model.parameters())
        times: dict[str, list[float]] = {_label(v): [] for v in variants}
        for repeat in range(args.repeats):
            shift = repeat % len(variants)  # rotate the order: no variant always runs first or last
            for variant in variants[shift:] + variants[:shift]:
                times[_label(variant)].append(_fit(spec, variant, args.steps, args.warmup, clock))
        reference = times["off"]
        rows = {}
        for label, values in times.items():
            rows[label] = {
                "step_ms": 1e3 * statistics.median(values),
                "extra_ms": 1e3 * statistics.median(v - r for v, r in zip(values, reference)),
                "ratio": statistics.median(v / r for v, r in zip(values, reference)),
                "runs_ms": [1e3 * v for v in values],
            }
        result["models"][name] = {
            "layers": layers,
            "parameters": params,
            "batch": spec.batch,
            "variants": rows,
        }
    return result


def report(result: dict[str, Any]) -> str:
    """The result as text tables, one per model."""
    meta = result["meta"]
    lines = [
        f"GradGuard diagnostics: extra time of a logging step (every step logs), {meta['clock']} clock,"
        f" {meta['threads']} thread(s), median over {meta['repeats']} repetitions of {meta['steps']} steps"
        f" (accumulate_grad_batches=2){' [quick]' if meta['quick'] else ''}",
        f"command: {meta['command']}",
    ]
    for name, data in result["models"].items():
        lines += [
            "",
            f"{name}: {data['layers']} Linear layers, {data['parameters']:,} parameters, {data['batch']} x 2 examples"
            " per step",
            f"  {'diagnostics':<14} {'step ms':>9} {'extra ms':>9} {'ratio':>7}",
        ]
        for label, row in data["variants"].items():
            lines.append(
                f"  {label:<14} {num(row['step_ms'], '.2f'):>9} {num(row['extra_ms'], '+.2f'):>9}"
                f" {num(row['ratio'], '.3f'):>7}"
            )
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one repetition of a few steps")
    parser.add_argument("--models", default="small,mid", help="comma-separated: small, mid (default: both)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 30; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per fit (default 5; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="fits of each variant (default 5; quick 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': print only the JSON)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in _MODELS]
    if unknown or not args.models:
        parser.error(f"--models must name some of {sorted(_MODELS)}, got {args.models!r}")
    for field, full, quick, low in (("steps", 30, 3, 2), ("warmup", 5, 1, 0), ("repeats", 5, 1, 1)):
        value = getattr(args, field)
        value = (quick if args.quick else full) if value is None else value
        if value < low:
            parser.error(f"--{field} must be >= {low}, got {value}")
        setattr(args, field, value)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables (or the JSON with ``--json -``) and return the results."""
    arguments, command = command_line(argv, "diagnostics_cost.py")
    args = _parse(arguments)
    args.command = command
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradGuard's hints and Lightning's advice are not what is measured
            return run_quietly_and_emit(run, report, args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
