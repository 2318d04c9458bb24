"""Does the default GradGuard rescue a too-high SGD rate on a model with sparse gradients?

An embedding-bag regression: ``nn.Embedding(2000, 32, sparse=True)`` (every gradient of the table a sparse COO
tensor), the mean of 10 token embeddings, an MLP head (32-64-1, tanh); the target is a fixed random function of the
tokens. SGD with momentum 0.9, batch 64, 600 steps, 4000 held-out examples. Per seed, the runs start from the same
weights and see the same batches:

* ``unguarded lr R``: each rate of ``--sweep`` without a guard (the best of them is the seed's tuned rate);
* ``GradGuard() lr R``: each rate of ``--rates`` with the default guard, whose early restart (``default_rollback()``)
  puts AGC to work after a retry, on the embedding's rows too.

The table gives each run's held-out MSE, the guard's restarts, LR cuts and whether its rescue clipper came to work.

Run from the repository root::

    python benchmarks/sparse_rescue.py                       # seeds 0-2, about 4 minutes on 2 CPU cores
    python benchmarks/sparse_rescue.py --seeds 0 --rates 3 --sweep 0.1 --json -
    python benchmarks/sparse_rescue.py --quick               # a few steps, to check that everything runs
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine, num, parse_seeds, run_main
from lightning_gradguard import GradGuard

__all__ = ["main", "report", "run"]

VOCAB, DIM, TOKENS, BATCH = 2000, 32, 10, 64


class EmbeddingBag(L.LightningModule):
    """The mean of ``TOKENS`` sparse embeddings, then an MLP head; SGD with momentum at ``lr``."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, sparse=True)
        self.head = nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 1))
        self.lr = lr

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, y = batch
        return nn.functional.mse_loss(self(tokens), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _data(seed: int, n_train: int, n_test: int) -> tuple[Tensor, Tensor]:
    """Token rows and targets from a private generator (the global RNG is left alone)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n_train + n_test, TOKENS), generator=g)
    table = torch.randn(VOCAB, 8, generator=g)
    y = torch.tanh(table[tokens].mean(1)) @ torch.randn(8, 1, generator=g)
    return tokens, y


def _run_one(seed: int, lr: float, guarded: bool, steps: int, n_train: int, n_test: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    tokens, y = _data(seed, n_train, n_test)
    model = EmbeddingBag(lr)
    guard = GradGuard() if guarded else None
    loader = DataLoader(
        TensorDataset(tokens[:n_train], y[:n_train]),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[guard] if guard is not None else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guard's advice and Lightning's hints: the table says what happened
        trainer.fit(model, loader)
    with torch.no_grad():
        held_out = nn.functional.mse_loss(model(tokens[n_train:]), y[n_train:]).item()
    events = guard.summary() if guard is not None else None
    return {
        "seed": seed,
        "lr": lr,
        "run": f"GradGuard() lr {lr:g}" if guarded else f"unguarded lr {lr:g}",
        "guarded": guarded,
        "heldout": held_out,
        "rolled_back": events["rolled_back"] if events else None,
        "lr_reduced": events["lr_reduced"] if events else None,
        "rescued": guard.rescuing() if guard is not None else None,
        "wall_s": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every seed at every rate of ``--sweep`` unguarded and of ``--rates`` with ``GradGuard()``."""
    steps, n_train, n_test = (20, 640, 256) if args.quick else (600, 20000, 4000)
    rows = []
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(1)  # a small model: extra threads only add synchronisation
        for seed in args.seeds:
            for guarded, rates in ((False, args.sweep), (True, args.rates)):
                for lr in rates:
                    row = _run_one(seed, lr, guarded, steps, n_train, n_test)
                    rows.append(row)
                    print(f"  seed {seed} {row['run']:<22} {row['wall_s']:6.1f} s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "command": args.command,
        "quick": args.quick,
        "steps": steps,
        "machine": machine(),
        "wall_s": time.perf_counter() - start,
    }
    return {"meta": meta, "rows": rows}


def _tuned(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The unguarded run with the lowest finite held-out MSE (NaN and inf count as worst)."""
    finite = [r for r in rows if not r["guarded"] and math.isfinite(r["heldout"])]
    return min(finite, key=lambda r: r["heldout"]) if finite else None


def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as a markdown table, one line per seed comparing each guarded run with the tuned
    rate."""
    meta, m = result["meta"], result["meta"]["machine"]
    lines = [
        "# GradGuard on a too-high SGD rate with sparse gradients (embedding bag)",
        "",
        f"command: `{meta['command']}`  ",
        f"machine: {m['cpus']} CPUs, torch {m['torch']}, lightning {m['lightning']}; {meta['steps']} steps per run",
        "",
        "| seed | run | held-out MSE | restarts | LR cuts | rescue clipper | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rescued = "-" if r["rescued"] is None else ("yes" if r["rescued"] else "no")
        lines.append(
            f"| {r['seed']} | {r['run']} | {num(r['heldout'])} | {num(r['rolled_back'], 'd')} | "
            f"{num(r['lr_reduced'], 'd')} | {rescued} | {r['wall_s']:.1f} |"
        )
    lines.append("")
    for seed in dict.fromkeys(r["seed"] for r in result["rows"]):
        mine = [r for r in result["rows"] if r["seed"] == seed]
        tuned = _tuned(mine)
        for r in (r for r in mine if r["guarded"]):
            if tuned is None:
                verdict = "no unguarded rate stayed finite"
            else:
                better = math.isfinite(r["heldout"]) and r["heldout"] <= tuned["heldout"]
                verdict = (
                    f"{'no worse than' if better else 'worse than'} the tuned {tuned['run']} ({num(tuned['heldout'])})"
                )
            lines.append(f"- seed {seed}, {r['run']}: {num(r['heldout'])}, {verdict}")
    if meta["quick"]:
        lines.append("(--quick: a few steps per run, to check that everything runs; these figures mean nothing)")
    return "\n".join(lines)


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive rates, got {text!r}")
    return rates


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/sparse_rescue.py",
        description="A too-high SGD rate on an embedding bag with sparse gradients: unguarded rates and GradGuard().",
    )
    p.add_argument("--seeds", default="0-2", help="seeds, e.g. 0-2 or 0,3 (default: 0-2)")
    p.add_argument("--rates", type=_rates, default=[1.0, 3.0], help="GradGuard()'s rates (default: 1,3)")
    p.add_argument("--sweep", type=_rates, default=[0.01, 0.03, 0.1, 0.3], help="unguarded rates (default: 0.01-0.3)")
    p.add_argument("--quick", action="store_true", help="a few steps per run (seconds; for tests)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    args = p.parse_args(argv)
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "sparse_rescue.py", _parse, run, report)


if __name__ == "__main__":
    main()
