"""Is a rescue a rescue on every seed? The stability suite's diverging configs over many seeds.

``benchmarks/stability.py`` compares one guarded run with the best of a few unguarded lower rates, on one seed. On
the configs that diverge, the seed decides much of the held-out loss: the LSTM at its tuned rate ends anywhere from
MSE 0.001 to 0.008, or fails to solve the task at all. One seed then says little about whether a guard rescues, and
"the best of the sweep on this seed" is the minimum of several noisy runs: a single run that trains just as well as
the best rate still misses that bar at least half the time. This benchmark runs the stability suite's configs
(``unguarded``, the guarded runs asked for, the unguarded sweep) on many seeds and reports, per config and guard:

* **diverged**: on how many seeds the unguarded run at the too-high rate diverged (the premise of a rescue);
* **<= best of sweep**: on how many seeds the guarded run did not diverge and ended no worse than the best sweep run
  of that seed (the stability suite's per-seed "rescued");
* **<= tuned rate**: on how many seeds it ended no worse than that seed's run at the *tuned rate*, one rate for the
  config: the sweep rate with the lowest median held-out loss over the seeds (what a user who tuned the rate once
  would train at);
* **median** held-out loss of the guarded runs, of the best sweep run per seed and of the tuned rate;
* **learned**: on how many seeds the run learned (for the adding problem: MSE below 0.9x predicting the mean; for
  classification: accuracy above chance by more than 2 standard errors), guarded / tuned rate, and for the adding
  problem on how many it **solved** the task (MSE below 0.01).

The sweep's other rates (``unguarded lr R``) get the same counts, as a reference: how often an unguarded run at a rate
a few times off the tuned one meets these bars. The per-seed figures are printed for the guarded runs only.

Each seed is a full stability suite run (``stability.run``) of the chosen configs; a non-finite held-out loss counts
as worse than any finite one. Run from the repository root::

    python benchmarks/rescue_seeds.py --configs lstm_10x --seeds 0-19       # about 5 minutes on 2 CPU cores
    python benchmarks/rescue_seeds.py --configs resnet20_nobn --seeds 0-9 --variants guarded,clip_agc
    python benchmarks/rescue_seeds.py --quick --seeds 0-1 --json -          # about 40 s; JSON on stdout
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import stability
from benchmarks._common import num, parse_seeds, run_main
from examples.lstm_adding import SOLVED_MSE

__all__ = ["main", "report", "run", "summarize"]

#: The configs that diverge unguarded and carry a sweep of lower rates.
DIVERGING = ("lstm_10x", "rnn_tanh", "resnet20_nobn")


def _loss(row: dict[str, Any]) -> float:
    """The held-out loss, with a non-finite one worse than any finite one."""
    x = row["heldout_loss"]
    return x if isinstance(x, float) and math.isfinite(x) else math.inf


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _solved(cfg: dict[str, Any], losses: Iterable[float]) -> int | None:
    """How many of these held-out MSEs solve the adding problem (``None`` for classification)."""
    return sum(x < SOLVED_MSE for x in losses) if cfg["metric"] == "mse" else None


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary per config and guarded run over the seeds of :func:`run`'s result.

    Args:
        result: What :func:`run` returned: ``configs`` (as in the stability suite), ``seeds`` and ``rows`` (each
            stability row with its ``seed``).
    """
    seeds = result["seeds"]
    summaries: list[dict[str, Any]] = []
    for cfg in result["configs"]:
        runs: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
        for row in result["rows"]:
            if row["config"] == cfg["config"]:
                runs[row["seed"]][row["variant"]] = row
        sweep = [v for v in cfg["variants"] if v.startswith(stability.SWEEP_PREFIX)]
        guarded = [v for v in cfg["variants"] if v != "unguarded" and v not in sweep]
        if not sweep:
            continue
        # One tuned rate per config: a user tunes the rate once, not per seed.
        tuned = min(sweep, key=lambda v: _median([_loss(runs[s][v]) for s in seeds]))
        best = {s: min(_loss(runs[s][v]) for v in sweep) for s in seeds}
        # The other sweep rates, counted as the guarded runs are: how often an unguarded run at a rate within a few
        # times the tuned one meets the same bars, so the guarded counts have something to be read against.
        references = [v for v in sweep if v != tuned]
        for variant in guarded + references:
            reference = variant in references
            losses = {s: _loss(runs[s][variant]) for s in seeds}
            # A diverged run rescues nothing, even where every sweep run diverged too.
            finite = {s: not runs[s][variant]["diverged"] for s in seeds}
            summaries.append(
                {
                    "config": cfg["config"],
                    "variant": variant,
                    "guard": f"unguarded lr {runs[seeds[0]][variant]['sweep_lr']:g}"
                    if reference
                    else cfg["guards"][variant],
                    "reference": reference,
                    "seeds": len(seeds),
                    "diverged_unguarded": sum(runs[s]["unguarded"]["diverged"] for s in seeds),
                    "le_best_of_sweep": sum(finite[s] and losses[s] <= best[s] for s in seeds),
                    "tuned_rate": runs[seeds[0]][tuned]["sweep_lr"],
                    "le_tuned_rate": sum(finite[s] and losses[s] <= _loss(runs[s][tuned]) for s in seeds),
                    "median": _median(list(losses.values())),
                    "median_best_of_sweep": _median(list(best.values())),
                    "median_tuned_rate": _median([_loss(runs[s][tuned]) for s in seeds]),
                    "learned": sum(stability.learned_more_than_chance(cfg, runs[s][variant]) for s in seeds),
                    "learned_tuned_rate": sum(stability.learned_more_than_chance(cfg, runs[s][tuned]) for s in seeds),
                    "solved": _solved(cfg, losses.values()),
                    "solved_tuned_rate": _solved(cfg, (_loss(runs[s][tuned]) for s in seeds)),
                    "per_seed": {s: (losses[s], best[s], _loss(runs[s][tuned])) for s in seeds},
                }
            )
    return summaries


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The stability suite's ``args.configs`` on each of ``args.seeds``: ``{"meta", "configs", "seeds", "rows",
    "summary"}``.

    Args:
        args: The parsed command line (see ``--help``), plus ``command``, the command as typed.
    """
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for seed in args.seeds:
        print(f"seed {seed}", file=sys.stderr, flush=True)
        logdir = os.path.join(args.logdir, f"seed{seed}")  # each seed's TensorBoard runs apart
        one = stability.run(
            argparse.Namespace(**{**vars(args), "seed": seed, "logdir": logdir, "sweep": True, "sweep_idle": 0})
        )
        configs, meta = one["configs"], one["meta"]
        rows += [{**row, "seed": seed} for row in one["rows"]]
    meta = {
        **meta,
        "command": args.command,
        "seeds": args.seeds,
        "logdir": args.logdir,
        "wall_s": time.perf_counter() - start,
    }
    meta.pop("seed", None)
    result = {"meta": meta, "configs": configs, "seeds": args.seeds, "rows": rows}
    result["summary"] = summarize(result)
    return result


def report(result: dict[str, Any]) -> str:
    """The summary of :func:`run` as a text table, with each seed's figures underneath."""
    meta, m = result["meta"], result["meta"]["machine"]
    seeds = result["seeds"]
    lines = [
        "GradGuard rescue over seeds",
        f"command: {meta['command']}",
        f"machine: {m['cpus']} CPUs available, python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, "
        f"device {m['device']}",
        f"suite: {meta['size']}, seeds {', '.join(map(str, seeds))}; held-out loss (MSE or CE) of the final weights; "
        f"TensorBoard logs: {meta['logdir']} (a folder per seed)",
        "<= best of sweep: seeds where the guarded run ended no worse than the best unguarded sweep run of that seed; "
        "<= tuned rate: no worse than the one sweep rate with the lowest median over the seeds; "
        "unguarded lr R: the sweep's other rates, counted the same way (what a run at a rate near the tuned one meets)",
        "",
    ]
    header = ("config", "run", "diverged", "<= best of sweep", "tuned rate", "<= tuned rate", "median", "learned")
    table = [
        (
            s["config"],
            s["guard"] or s["variant"],
            f"{s['diverged_unguarded']}/{s['seeds']}",
            f"{s['le_best_of_sweep']}/{s['seeds']}",
            f"{s['tuned_rate']:g}",
            f"{s['le_tuned_rate']}/{s['seeds']}",
            f"{num(s['median'])} (best {num(s['median_best_of_sweep'])}, tuned {num(s['median_tuned_rate'])})",
            f"{s['learned']}/{s['seeds']} (tuned {s['learned_tuned_rate']}/{s['seeds']})"
            + ("" if s["solved"] is None else f"; solved {s['solved']}/{s['seeds']} (tuned {s['solved_tuned_rate']})"),
        )
        for s in result["summary"]
    ]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(header)]
    lines += ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines += ["", "per seed: guarded / best of sweep / tuned rate"]
    for s in result["summary"]:
        if s["reference"]:
            continue
        cells = [f"{seed}: {' / '.join(num(x) for x in v)}" for seed, v in s["per_seed"].items()]
        lines.append(f"  {s['config']} {s['variant']}: " + "; ".join(cells))
    if meta["size"] == "quick":
        lines.append("(--quick: a few steps per config, to check that everything runs; these figures mean nothing)")
    lines.append(f"total wall time {meta['wall_s']:.0f} s")
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/rescue_seeds.py",
        description="Train the stability suite's diverging configs on many seeds; count where the guard rescues.",
    )
    stability.add_size_arguments(p)
    p.add_argument("--configs", default=",".join(DIVERGING), help=f"comma-separated subset of {', '.join(DIVERGING)}")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-19 or 0,3,7 (default: 0-4)")
    p.add_argument(
        "--variants",
        default="guarded",
        help=f"comma-separated guarded runs from the stability suite's ({', '.join(stability.GUARDED_VARIANTS)}); the "
        "unguarded run and the sweep always run (default: guarded, that is GradGuard())",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads, as in the stability suite (default 0: auto)")
    p.add_argument("--logdir", default=None, help="TensorBoard log root (default: a new temporary folder)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in DIVERGING for c in names):
        p.error(f"--configs: choose from {', '.join(DIVERGING)}, got {args.configs!r}")
    args.configs = names
    args.variants = stability.parse_variants(p, args.variants)
    args.clippers = any(v in stability.CLIPPER_GUARDS for v in args.variants)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    stability.check_machine_arguments(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "rescue_seeds.py", _parse, run, report, logdir_prefix="gradguard_rescue_seeds_")


if __name__ == "__main__":
    main()
