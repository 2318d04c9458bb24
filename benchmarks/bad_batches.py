"""What do two bad batches in a row do to a healthy run under GradGuard? The price of the early restart's rescue.

Two consecutive batches (``--count``) whose loss is multiplied by ``--factor`` (10^4 by default: a corrupted label
scale, a unit mistake) from optimizer step ``--step`` on, of an otherwise healthy configuration of the healthy zoo
(``benchmarks/healthy_zoo.py``, same models, data, seeds and held-out metrics). The flagged steps are clipped to
the exploding detector's average norm. When the trouble began by step ``rescue_until`` (20) with no calm start before
it (``calm_factor``: the total norms of at least 3 steps before it within 4x of each other), it looks like a rate too
high from the start, and the default early restart (``default_rollback()``) restarts from the initial weights. The
first such restart is a plain retry, at the same rate (``retry``); when the trouble comes back, the next one restarts
an SGD run at its rate with AGC at work for the rest of the run (the rescue), any other one LR cut lower. After a calm
start, or later, the LR guard's cut is all (``early_only``). The runs of a config, all from the same weights on the
same batches:

* ``clean``: unguarded, without the bad batches: the reference;
* ``unguarded``: unguarded, with the bad batches (for information: often wrecked);
* ``guarded``: ``GradGuard()``, with the bad batches;
* ``guarded_restart``: ``GradGuard()`` whose early restart answers every cut of its 500-step window
  (``early_only=False``, the previous default), with the bad batches: what restarting a run that had trained costs;
* ``guarded_norescue``: ``GradGuard()`` whose early restart has no rescue clipper, with the bad batches;
* ``guarded_nocalm``: ``GradGuard()`` whose rescue answers any trouble in the first 20 steps, calm start or not
  (``calm_factor=None``), with the bad batches: what the calm-start test saves;
* ``guarded_laterescue``: the same at any step of the window (``rescue_until=500``): why the rescue waits for
  nothing later than the first steps;
* ``guarded_noretry``: ``GradGuard()`` whose first early restart already brings the remedy (``retry=False``, the
  previous default): what the plain retry saves;
* ``guarded_skip``: ``GradGuard(skip_exploding=True)``: the flagged steps skipped instead of clipped;
* ``guarded_counting``: ``GradGuard()`` whose LR guard counts lone spikes and every non-finite step too
  (``LRGuard(spare_lone=False)``, the previous default): what sparing a clipped spike between calm steps, and
  non-finite steps that a calm step follows, saves.

With ``--every N`` the bad batches are scattered instead: from step ``--step`` on, each step is bad with probability
``1/N`` (drawn with ``--seed``), bad data a batch at a time through the rest of the run.

The table gives each run's held-out metric, its difference from ``clean`` in percent, and the guard's events
(whether the rescue clipper came to work: ``rescued``). The default configs are the zoo's two SGD runs (the warm-up
and the dropout classifier), where clipping changes the step; the zoo's GAN (manual optimization) is refused.

Run from the repository root::

    python benchmarks/bad_batches.py                  # steps 40 and 41, about 15 s on 2 CPU cores
    python benchmarks/bad_batches.py --step 10        # inside the rescue's window
    python benchmarks/bad_batches.py --configs masked --factor 1e3 --json out.json
    python benchmarks/bad_batches.py --count 4 --configs rezero,masked,lora,dropout,warmup   # a burst of four
    python benchmarks/bad_batches.py --every 20 --step 1 --configs lora,masked,dropout      # one in 20, scattered
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine, num, run_main
from benchmarks.healthy_zoo import CONFIGS, _run_one
from lightning_gradguard import GradGuard, LRGuard, default_rollback

__all__ = ["main", "report", "run"]

#: The guarded runs besides ``GradGuard()``: variant -> the keyword arguments of ``default_rollback``.
ROLLBACKS: dict[str, dict[str, Any]] = {
    "guarded_restart": {"early_only": False},
    "guarded_norescue": {"rescue": False},
    "guarded_nocalm": {"calm_factor": None},
    "guarded_laterescue": {"rescue_until": 500, "calm_factor": None},
    "guarded_noretry": {"retry": False},
}


#: The guard that skips the flagged steps instead of clipping them.
SKIP_GUARD: tuple[str, Callable[[], GradGuard]] = (
    "GradGuard(skip_exploding=True)",
    lambda: GradGuard(skip_exploding=True),
)


#: The guard whose LR guard counts every exploding event, lone spikes too (the previous default).
COUNTING_GUARD: tuple[str, Callable[[], GradGuard]] = (
    "GradGuard(lr_guard=LRGuard(spare_lone=False))",
    lambda: GradGuard(lr_guard=LRGuard(spare_lone=False)),
)

#: The last step scattered bad batches are drawn for (beyond every config's length).
_LAST_STEP = 5000


def _guard_as(kwargs: dict[str, Any]) -> tuple[str, Callable[[], GradGuard]]:
    """The label (as written in code) and the factory of ``GradGuard(rollback=default_rollback(**kwargs))``."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"GradGuard(rollback=default_rollback({args}))", lambda: GradGuard(rollback=default_rollback(**kwargs))


def _bad_batches(steps: set[int], factor: float) -> Any:
    """Multiplies the training loss by ``factor`` on the given optimizer steps (counted from 1)."""

    def prepare(module: L.LightningModule) -> None:
        training_step = module.training_step

        def step(*args: Any, **kwargs: Any) -> Any:
            loss = training_step(*args, **kwargs)
            return loss * factor if module.trainer.global_step + 1 in steps else loss

        module.training_step = step  # type: ignore[method-assign]

    return prepare


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train each selected config clean, and with the bad batches unguarded and under both guards."""
    if args.every is None:
        bad = set(range(args.step, args.step + args.count))
    else:
        draw = random.Random(args.seed)
        bad = {step for step in range(args.step, _LAST_STEP) if draw.random() < 1.0 / args.every}
    prepare = _bad_batches(bad, args.factor)
    runs = (
        ("clean", None, None),
        ("unguarded", None, prepare),
        ("guarded", ("GradGuard()", GradGuard), prepare),
        *((variant, _guard_as(kwargs), prepare) for variant, kwargs in ROLLBACKS.items()),
        ("guarded_skip", SKIP_GUARD, prepare),
        ("guarded_counting", COUNTING_GUARD, prepare),
    )
    rows: list[dict[str, Any]] = []
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)
        for name in args.configs:
            job = CONFIGS[name]("quick" if args.quick else "default", args.seed, None)
            for variant, guard_as, hook in runs:
                row = _run_one(job, "unguarded", args, guard_as=guard_as, prepare=hook)
                row["variant"] = variant
                rows.append(row)
                print(f"  {name:<10} {variant:<17} {row['wall_s']:6.1f} s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "command": args.command,
        "seed": args.seed,
        "size": "quick" if args.quick else "default",
        "bad_steps": sorted(bad),
        "every": args.every,
        "from_step": args.step,
        "factor": args.factor,
        "machine": machine(),
        "wall_s": time.perf_counter() - start,
    }
    return {"meta": meta, "rows": rows}


def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as a markdown table."""
    meta = result["meta"]
    m = meta["machine"]
    steps = meta["bad_steps"]
    if meta.get("every") is None:
        what = f"{len(steps)} bad batch(es) in a row (loss x {meta['factor']:g} at steps {steps[0]}-{steps[-1]})"
    else:
        what = (
            f"scattered bad batches (loss x {meta['factor']:g}, each step from {meta['from_step']} on with"
            f" probability 1/{meta['every']}: {', '.join(map(str, steps[:12]))}{', ...' if len(steps) > 12 else ''})"
        )
    lines = [
        f"# {what} in healthy runs",
        "",
        f"command: `{meta['command']}`  ",
        f"machine: {m['cpus']} CPUs available, 1 thread per run, python {m['python']}, torch {m['torch']}, "
        f"lightning {m['lightning']}; seed {meta['seed']}",
        "",
        "| config | run | guard | held-out | vs clean | exploding | lr_reduced | LR at end | rolled back | rescued |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    clean = {r["config"]: r["heldout"] for r in result["rows"] if r["variant"] == "clean"}
    for r in result["rows"]:
        ref = clean[r["config"]]
        rel = (r["heldout"] - ref) / abs(ref) * 100
        diff = "(ref)" if r["variant"] == "clean" else f"{rel:+.1f}%" if math.isfinite(rel) else "nan"
        ev = r["events"]
        end = "-" if r["final_lr_scale"] is None else f"{r['final_lr_scale']:.2f}x"
        counts = (str(ev["exploding"]), str(ev["lr_reduced"]), end, str(ev["rolled_back"])) if ev else ("-",) * 4
        rescued = "-" if r["rescued"] is None else ("yes" if r["rescued"] else "no")
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['guard'] or '-'} | {r['metric']} {num(r['heldout'])} | {diff} | "
            + " | ".join(counts)
            + f" | {rescued} |"
        )
    lines += ["", f"total wall time {meta['wall_s']:.0f} s"]
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bad_batches.py",
        description="Two bad batches in a row in healthy zoo runs: unguarded, GradGuard(), and without the rescue.",
    )
    p.add_argument("--configs", default="warmup,dropout", help="comma-separated healthy-zoo configs (not gan)")
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="the first bad batch's optimizer step, >= 1 (default: 40; 3 with --quick)",
    )
    p.add_argument("--count", type=int, default=2, help="bad batches in a row, >= 1 (default: 2)")
    p.add_argument(
        "--every",
        type=int,
        default=None,
        metavar="N",
        help="scattered instead: each step from --step on bad with probability 1/N, N >= 2 (--count is not used)",
    )
    p.add_argument(
        "--factor",
        type=float,
        default=1e4,
        help="loss multiplier of the bad batches, > 1, or nan for non-finite batches (default 1e4)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of every run (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    p.add_argument("--quick", action="store_true", help="the zoo's tiny sizes, a few steps: checks that it runs")
    args = p.parse_args(argv)
    if args.step is None:
        args.step = 3 if args.quick else 40
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    allowed = [c for c in CONFIGS if c != "gan"]
    if not names or any(c not in allowed for c in names):
        p.error(f"--configs: choose from {', '.join(allowed)} (the GAN optimizes manually), got {args.configs!r}")
    args.configs = names
    if args.step < 1:
        p.error("--step must be >= 1")
    if args.count < 1:
        p.error("--count must be >= 1")
    if args.every is not None and args.every < 2:
        p.error("--every must be >= 2")
    if not (args.factor > 1 or math.isnan(args.factor)):
        p.error("--factor must be > 1, or nan")
    args.logdir = None
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "bad_batches.py", _parse, run, report)


if __name__ == "__main__":
    main()
