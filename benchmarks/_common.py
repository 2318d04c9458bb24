"""Plumbing shared by the benchmark scripts: machine description, number formatting, JSON output, quiet logs."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from lightning_gradguard import AGC, AdaGC, AutoClip, GradGuard, NormClip

_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard")


class MetricsLogger(Logger):
    """A Lightning logger that keeps, in ``rows``, every metrics dict it is sent with its step (nothing on disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, tag: str) -> list[float]:
        """The values logged under ``tag``, in order."""
        return [m[tag] for _, m in self.rows if tag in m]

    def points(self, tag: str) -> list[tuple[int, float]]:
        """``(step, value)`` of each value logged under ``tag``, in order."""
        return [(step, float(m[tag])) for step, m in self.rows if tag in m]


class LossRecorder(L.Callback):
    """Every training loss, kept on the device until the end (a read per step would sync)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach().float().reshape(1))

    def recorded(self) -> torch.Tensor:
        """The losses so far, one tensor (empty before any)."""
        return torch.cat(self.losses) if self.losses else torch.zeros(0)


def machine(device: str = "cpu") -> dict[str, Any]:
    """The CPUs this process may use, the Python/torch/lightning versions and the device (and GPU name)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpus": cpus,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


#: Each clipper other than the default ZClip in place of it, every other default of ``GradGuard()`` kept (the early
#: restart included), each at its own defaults; NormClip needs a norm: 1.0, the usual ``gradient_clip_val``.
#: Run name -> (the guard as written in user code, a factory).
CLIPPER_GUARDS: dict[str, tuple[str, Callable[[], GradGuard]]] = {
    "clip_autoclip": ("GradGuard(clip=AutoClip())", lambda: GradGuard(clip=AutoClip())),
    "clip_agc": ("GradGuard(clip=AGC())", lambda: GradGuard(clip=AGC())),
    "clip_adagc": ("GradGuard(clip=AdaGC())", lambda: GradGuard(clip=AdaGC())),
    "clip_normclip": ("GradGuard(clip=NormClip(max_norm=1.0))", lambda: GradGuard(clip=NormClip(max_norm=1.0))),
}


def add_clippers_argument(parser: Any, guards: dict[str, tuple[str, Callable[[], GradGuard]]] = CLIPPER_GUARDS) -> None:
    """The ``--clippers`` flag of the benchmarks that can also train with each of ``guards`` (by default
    :data:`CLIPPER_GUARDS`)."""
    parser.add_argument(
        "--clippers",
        action="store_true",
        help="also train each config with each other clipper in place of ZClip: "
        + ", ".join(label for label, _ in guards.values()),
    )


def num(x: float | None, fmt: str = ".4g") -> str:
    """A number for a table: ``-`` for ``None``, ``nan``/``inf`` spelled out."""
    if x is None:
        return "-"
    return format(x, fmt) if math.isfinite(x) else str(x)


def plain(value: Any) -> Any:
    """JSON without NaN/inf literals: a non-finite number becomes the string ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def command_line(argv: Sequence[str] | None, script: str) -> tuple[list[str], str]:
    """The arguments to parse and the command as typed (``python benchmarks/<script> ...`` when called from code)."""
    if argv is None:
        return sys.argv[1:], shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return list(argv), shlex.join(["python", f"benchmarks/{script}", *argv])


def run_quietly_and_emit(
    run: Callable[[Any], dict[str, Any]], report: Callable[[dict[str, Any]], str], args: Any
) -> dict[str, Any]:
    """``run(args)`` with Lightning's and GradGuard's info logs silenced, then print the report (or the JSON on
    stdout for ``--json -``) and write ``--json PATH``."""
    quiet = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        result = run(args)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    if args.json == "-":
        print(json.dumps(plain(result), indent=1))
    else:
        print(report(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(plain(result), f, indent=1)
    return result


def run_main(
    argv: Sequence[str] | None,
    script: str,
    parse: Callable[[Sequence[str]], Any],
    run: Callable[[Any], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    logdir_prefix: str | None = None,
) -> dict[str, Any]:
    """A benchmark's ``main``: parse ``argv`` (the command line when ``None``), note the command as typed, give
    ``--logdir`` a new temporary folder when ``logdir_prefix`` is set and none was named, then run and emit."""
    argv, command = command_line(argv, script)
    args = parse(argv)
    args.command = command
    if logdir_prefix is not None and args.logdir is None:
        args.logdir = tempfile.mkdtemp(prefix=logdir_prefix)
    return run_quietly_and_emit(run, report, args)


def parse_seeds(text: str) -> list[int]:
    """``"0-4"``, ``"0,3,7"`` or a mix (``"0-2,9"``) as a list of distinct seeds in order."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"--seeds: expected seeds such as 0-4 or 0,3,7, got {text!r}")
        span = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        if sep and int(hi) < int(lo):
            raise ValueError(f"--seeds: the range {part!r} is empty")
        seeds += [s for s in span if s not in seeds]
    return seeds
