"""Does the default ``GradGuard()`` see a late collapse, and does it stay quiet where there is none?

A model that learned and then gave it back ends near chance without a divergence event: a cross-entropy at chance is
still below the untrained loss, and the gradient norms barely move. ``GradGuard()`` measures the share of its progress
the run has given back (``DivergenceDetector.progress()``: 0 at the lowest settled running mean of the training loss,
1 back at its starting level), logs it as ``gradguard/loss_relapse`` and warns ("climbed back") when it stays at or
above 0.4 at every log for 50 steps. This benchmark trains the runs behind the README's figures for it.

The scenarios (``--scenarios`` picks a subset); batches of 32, generated up front from the seed, in a fixed order:

* ``mlp``: an MLP classifier (32 -> 256 -> 256 -> 10, ReLU) on Gaussian inputs labelled by a fixed random tanh
  teacher (32 -> 64 -> 10, the argmax), SGD with momentum 0.9, the rate multiplied by 10 from step 300 (a
  ``LambdaLR``, stepped every step). 900 steps.
* ``mlpr``: the same as a regressor: the teacher's 10 outputs, divided by their standard deviation, MSE.
* ``tf``: a tiny causal transformer (2 post-norm encoder layers, d_model 64, 4 heads, no dropout) on a copy task
  (6 tokens from a vocabulary of 8, a separator, the 6 tokens again; the loss on the copy), AdamW (weight decay 0.01,
  betas (0.9, 0.98)), a 100-step linear warm-up to the peak rate, then cosine decay to 0. 600 steps.
* ``tfbf``: the same under ``precision="bf16-mixed"``.

Each scenario and seed trains three runs from the same weights on the same batches: unguarded at the too-high rate
(``--high-lr``, 0.1: the rate after the raise is 1.0 for the MLPs; the peak of the warm-up for the transformers),
``GradGuard()`` at that rate, and ``GradGuard()`` at the tuned rate (``--tuned-lr``, 0.01), where the raise only
shakes the MLPs and the transformers learn the copy. The table reports, per run:

* **held-out**: the loss of the final weights on a fixed held-out set (4096 examples for the MLPs, 2048 sequences for
  the transformers; cross-entropy per copied token, MSE for ``mlpr``) and **acc**, the accuracy (per copied token);
* **peak relapse**: the largest ``gradguard/loss_relapse`` the guard logged (captured by an in-memory Lightning
  logger; one log every ``--log-every`` steps, 50) and its step; ``-`` when it was never logged: the run never
  learned enough to be measured (its lowest settled running mean stayed above 0.8x its start);
* **low/start**: the training losses replayed through a fresh ``DivergenceDetector()``: its lowest settled running
  mean over its starting level at the end of the run (measured from 0.8 down; for unguarded runs too);
* **warned at**: the step of the relapse warning (from its message), ``-`` if none, and the share it named;
* **events**: the guard's ``summary()`` counts that are not 0 (exploding, vanishing, clipped, lr_reduced, ...).

Under the table one line per scenario counts the seeds warned about at each rate, and the peaks.

``--simulate`` trains nothing: it feeds a noisy learning curve to a ``DivergenceDetector()``, ``--runs`` runs (100) of
600 steps whose loss at step ``t`` is ``(1 - 0.5 * min(1, t / 150))`` times the mean of ``n`` squared standard
Gaussians (``--samples``: n = 1, 2, 4, 8; a loss averaged over very few samples), reads ``progress()`` every
``--log-every`` steps and counts the runs whose share is at least 0.4 at one check, and at every check over 50
steps (the warning's hold: what would have been warned about). The noise comes from one private generator seeded with
``--seed`` (the first of ``--seeds``, 0), drawn run by run for each n in turn.

``--quick`` (seconds, for the tests) trains ``mlp`` on seed 0 for 240 steps with a log every 10, and simulates 4
runs. ``--steps N`` trains every selected scenario for N steps instead (the raise at a third of the run for ``mlp`` and
``mlpr``, the warm-up a sixth for the transformers), and runs the simulation's curves for N steps (the descent a
quarter of them). The warning's hold stays 50 steps: a run much shorter than the default has no time to be warned.

The default run takes about 3 minutes on 2 CPU cores (one thread, ``--threads``), the simulation under a minute. On
the CPU a rerun reproduces the tables (wall times aside).

Run from the repository root::

    python benchmarks/late_collapse.py                              # every scenario on seeds 0-2
    python benchmarks/late_collapse.py --scenarios mlp,mlpr --seeds 0-4 --json out.json
    python benchmarks/late_collapse.py --simulate                   # the noise simulation
    python benchmarks/late_collapse.py --scenarios mlp --steps 90 --json -   # seconds; JSON on stdout
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
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
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if not __package__:  # run as a script: the repository root is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import LossRecorder, MetricsLogger, machine, num, parse_seeds, run_main
from lightning_gradguard import DivergenceDetector, GradGuard
from lightning_gradguard._events import RELAPSE_HOLD, RELAPSE_WARNING

__all__ = ["SCENARIOS", "CopyLM", "LateCollapseModule", "main", "report", "run", "simulate"]

Kind = Literal["mlp", "mlpr", "tf", "tfbf"]
#: The scenarios: name -> (title, default steps).
SCENARIOS: dict[str, tuple[str, int]] = {
    "mlp": ("MLP classifier, SGD momentum 0.9, rate x10 at a third of the run", 900),
    "mlpr": ("MLP regressor, SGD momentum 0.9, rate x10 at a third of the run", 900),
    "tf": ("2-layer transformer on a copy task, AdamW, warm-up then cosine, fp32", 600),
    "tfbf": ("2-layer transformer on a copy task, AdamW, warm-up then cosine, bf16-mixed", 600),
}
#: The three runs of a scenario and seed: (name, guarded, which rate).
RUNS: tuple[tuple[str, bool, Literal["high", "tuned"]], ...] = (
    ("unguarded", False, "high"),
    ("guarded", True, "high"),
    ("guarded", True, "tuned"),
)
GUARD_LABEL = "GradGuard()"
RELAPSE_TAG = "gradguard/loss_relapse"
#: The warning's bar, for the simulation's count (its hold is ``RELAPSE_HOLD``).
RELAPSE_SHARE = RELAPSE_WARNING
BATCH = 32
D_IN, TEACHER_HIDDEN, CLASSES = 32, 64, 10
VOCAB, COPY_LEN = 8, 6  # copy task: [x_1..x_T, SEP, x_1..x_T], the loss on the copied half
# The seeds the README's figures were measured with, kept so that they come out again: the teacher, the held-out
# set, and the training data (offset from the run's seed).
TEACHER_SEED, HELDOUT_SEED, TRAIN_SEED_OFFSET = 7, 99, 1000
N_HELDOUT = {"mlp": 4096, "mlpr": 4096, "tf": 2048, "tfbf": 2048}
EVAL_CHUNK = 512
_WARNED = re.compile(r"climbed back (\d+)% .* at step (\d+)", re.DOTALL)


# ------------------------------------------------------------------------------------------------------------ data
def _gen(seed: int) -> torch.Generator:
    """A private generator: data and teachers never touch (or depend on) the global RNG."""
    return torch.Generator().manual_seed(seed)


def _copy_task(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``[x, SEP, x]`` as (inputs, next-token targets), the targets before the copy ignored."""
    x = torch.randint(0, VOCAB, (n, COPY_LEN), generator=gen)
    seq = torch.cat([x, torch.full((n, 1), VOCAB), x], 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :COPY_LEN] = -100  # the first half is random: nothing to learn there
    return inputs, targets


def _teacher() -> tuple[Tensor, Tensor]:
    g = _gen(TEACHER_SEED)
    return torch.randn(D_IN, TEACHER_HIDDEN, generator=g), torch.randn(TEACHER_HIDDEN, CLASSES, generator=g)


def _teacher_task(n: int, gen: torch.Generator, regression: bool) -> tuple[Tensor, Tensor]:
    """Gaussian inputs and the tanh teacher's outputs: scaled to unit std (regression) or their argmax (classes)."""
    w1, w2 = _teacher()
    x = torch.randn(n, D_IN, generator=gen)
    h = torch.tanh(x @ w1) @ w2
    return (x, h / h.std()) if regression else (x, h.argmax(1))


def _data(kind: Kind, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return _copy_task(n, gen) if kind in ("tf", "tfbf") else _teacher_task(n, gen, regression=kind == "mlpr")


# ---------------------------------------------------------------------------------------------------------- models
class CopyLM(nn.Module):
    """A tiny causal transformer LM: token and learned position embeddings, post-norm encoder layers, a head."""

    def __init__(self, d_model: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        length = 2 * COPY_LEN
        self.emb = nn.Embedding(VOCAB + 1, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB + 1)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.emb(x) + self.pos[:t]
        mask = self.get_buffer("mask")[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.ln(h))


class LateCollapseModule(L.LightningModule):
    """One scenario's model, loss and schedule.

    Args:
        kind: The scenario (``mlp``, ``mlpr``, ``tf`` or ``tfbf``).
        lr: The base rate: the rate before the raise (MLPs) or the warm-up's peak (transformers).
        steps: The run's optimizer steps (the schedule's length).
    """

    def __init__(self, kind: Kind, lr: float, steps: int) -> None:
        super().__init__()
        self.kind, self.base_lr, self.total_steps = kind, lr, steps
        self.net: nn.Module
        if kind in ("tf", "tfbf"):
            self.net = CopyLM()
        else:
            self.net = nn.Sequential(
                nn.Linear(D_IN, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss_and_accuracy(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        x, y = batch
        out = self(x)
        if self.kind == "mlpr":
            return F.mse_loss(out.float(), y), None
        if self.kind == "mlp":
            return F.cross_entropy(out.float(), y), (out.argmax(-1) == y).float().mean()
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
        copied = y != -100
        return loss, (out.argmax(-1)[copied] == y[copied]).float().mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss_and_accuracy(batch)[0]

    def configure_optimizers(self) -> Any:
        optimizer: torch.optim.Optimizer
        schedule: Callable[[int], float]
        if self.kind in ("tf", "tfbf"):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.base_lr, weight_decay=0.01, betas=(0.9, 0.98))
            warm, total = _warmup_steps(self.total_steps), self.total_steps

            def schedule(s: int) -> float:
                if s < warm:
                    return (s + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.base_lr, momentum=0.9)
            raise_at = _raise_step(self.total_steps)

            def schedule(s: int) -> float:
                return 1.0 if s < raise_at else 10.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _raise_step(steps: int) -> int:
    """The MLPs' rate goes up 10x here: step 300 of 900."""
    return max(1, steps // 3)


def _warmup_steps(steps: int) -> int:
    """The transformers' warm-up: 100 steps of 600."""
    return max(1, round(steps / 6))


# --------------------------------------------------------------------------------------------------------- capture
def _replayed_progress(losses: Tensor) -> tuple[float, float]:
    """The share and the lowest settled running mean over the start of a fresh ``DivergenceDetector()`` fed these
    losses (NaN where it has none): how far a run got, also without a guard."""
    det = DivergenceDetector()
    for loss in losses:
        det.update(loss)
    share, _, start, lowest = det.progress().tolist()
    return share, lowest / start if start > 0 else math.nan


@torch.no_grad()
def _evaluate(module: LateCollapseModule, x: Tensor, y: Tensor, bf16: bool) -> tuple[float, float | None]:
    """Held-out loss and accuracy (``None`` for the regressor): the mean over chunks of equal size (the figures of
    the README were measured so; the same mean up to rounding)."""
    module.eval()
    losses, accs = [], []
    for i in range(0, len(x), EVAL_CHUNK):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, acc = module.loss_and_accuracy((x[i : i + EVAL_CHUNK], y[i : i + EVAL_CHUNK]))
        losses.append(float(loss))
        if acc is not None:
            accs.append(float(acc))
    return sum(losses) / len(losses), (sum(accs) / len(accs) if accs else None)


# ------------------------------------------------------------------------------------------------------------ runs
@dataclass
class _Setup:
    kind: Kind
    seed: int
    steps: int
    log_every: int


def _run_one(setup: _Setup, guarded: bool, lr: float, rate: str) -> dict[str, Any]:
    """Train and evaluate one run; the seed fixes the weights and (through private generators) the data."""
    kind, seed, steps = setup.kind, setup.seed, setup.steps
    L.seed_everything(seed, verbose=False)
    x_train, y_train = _data(kind, steps * BATCH, _gen(TRAIN_SEED_OFFSET + seed))
    x_test, y_test = _data(kind, N_HELDOUT[kind], _gen(HELDOUT_SEED))
    data = DataLoader(TensorDataset(x_train, y_train), batch_size=BATCH, shuffle=False, drop_last=True)
    module = LateCollapseModule(kind, lr, steps)
    guard = GradGuard() if guarded else None
    losses, logger = LossRecorder(), MetricsLogger()
    callbacks: list[Callback] = [losses] if guard is None else [guard, losses]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        precision="bf16-mixed" if kind == "tfbf" else "32-true",
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=setup.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=data)
    wall_s = time.perf_counter() - start
    loss, acc = _evaluate(module, x_test, y_test, bf16=kind == "tfbf")

    messages = [str(w.message) for w in caught]
    guard_warnings = [m for m in messages if m.startswith("GradGuard")]
    relapse = [m for m in guard_warnings if "climbed back" in m]
    found = _WARNED.search(relapse[0]) if relapse else None
    shares = logger.points(RELAPSE_TAG)
    peak = max(shares, key=lambda s: s[1]) if shares else None
    replay_share, low_over_start = _replayed_progress(losses.recorded())
    return {
        "scenario": kind,
        "seed": seed,
        "run": "guarded" if guarded else "unguarded",
        "guard": GUARD_LABEL if guarded else None,
        "rate": rate,
        "lr": lr,
        "steps": steps,
        "global_step": trainer.global_step,
        "heldout_loss": loss,
        "heldout_acc": acc,
        "relapse_logs": len(shares),
        "peak_relapse": peak[1] if peak else None,
        "peak_relapse_step": peak[0] if peak else None,
        "last_relapse": shares[-1][1] if shares else None,
        "relapse_series": [list(s) for s in shares],  # (step, share) at each log that measured it
        "relapse_warnings": len(relapse),
        "relapse_warning_step": int(found.group(2)) if found else None,
        "relapse_warning_share": int(found.group(1)) / 100 if found else None,
        "replayed_share": replay_share,
        "replayed_low_over_start": low_over_start,
        "events": guard.summary() if guard is not None else None,
        "guard_warnings": len(guard_warnings),
        "other_warnings": len(messages) - len(guard_warnings),
        "wall_s": wall_s,
    }


def _summarize(kind: str, rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per rate of the guarded runs: the seeds warned about and the peak shares; the median held-out losses."""
    mine = [r for r in rows if r["scenario"] == kind]
    out: dict[str, Any] = {"scenario": kind, "seeds": len(seeds)}
    for rate in ("high", "tuned"):
        guarded = [r for r in mine if r["run"] == "guarded" and r["rate"] == rate]
        peaks = [r["peak_relapse"] for r in guarded if r["peak_relapse"] is not None]
        out[rate] = {
            "warned": sum(r["relapse_warnings"] > 0 for r in guarded),
            "warning_steps": [r["relapse_warning_step"] for r in guarded if r["relapse_warning_step"] is not None],
            "warning_shares": [r["relapse_warning_share"] for r in guarded if r["relapse_warning_share"] is not None],
            "peaks": peaks,
        }
    out["median_heldout"] = {
        f"{run} {rate}": statistics.median(r["heldout_loss"] for r in mine if (r["run"], r["rate"]) == (run, rate))
        for run, _, rate in RUNS
        if any((r["run"], r["rate"]) == (run, rate) for r in mine)
    }
    return out


def _train(args: argparse.Namespace) -> dict[str, Any]:
    rates = {"high": args.high_lr, "tuned": args.tuned_lr}
    rows: list[dict[str, Any]] = []
    scenarios = []
    for kind in args.scenarios:
        title, default_steps = SCENARIOS[kind]
        steps = args.steps or default_steps
        when = (
            f"the rate x10 from step {_raise_step(steps)}"
            if kind in ("mlp", "mlpr")
            else f"{_warmup_steps(steps)}-step warm-up, cosine to 0"
        )
        scenarios.append({"scenario": kind, "title": title, "steps": steps, "schedule": when})
        for seed in args.seeds:
            setup = _Setup(kind, seed, steps, args.log_every)
            for run_name, guarded, rate in RUNS:
                row = _run_one(setup, guarded, rates[rate], rate)
                rows.append(row)
                print(
                    f"  {kind:<5} seed {seed} {run_name:<9} lr {rates[rate]:<6g} {row['wall_s']:6.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "scenarios": scenarios,
        "rows": rows,
        "summary": [_summarize(s["scenario"], rows, args.seeds) for s in scenarios],
    }


# ------------------------------------------------------------------------------------------------------ simulation
def simulate(
    samples: Sequence[int], runs: int, steps: int, every: int, seed: int, share: float = RELAPSE_SHARE
) -> list[dict[str, Any]]:
    """The noise simulation: per ``n`` of ``samples``, ``runs`` learning curves of ``steps`` steps (halving over the
    first quarter) times the mean of ``n`` squared standard Gaussians, through a ``DivergenceDetector()`` read every
    ``every`` steps. Counts the runs whose share reached ``share`` at one check, and held it at every check over
    ``RELAPSE_HOLD`` steps (what the guard warns on, at any check interval)."""
    gen = _gen(seed)
    descent = steps / 4  # 150 of 600
    t = torch.arange(steps, dtype=torch.float64)
    curve = 1.0 - 0.5 * torch.clamp(t / descent, max=1.0)
    out = []
    for n in samples:
        once = twice = measured = 0
        peaks: list[float] = []
        for _ in range(runs):
            noise = torch.randn(steps, n, generator=gen).pow(2).mean(1)
            # In float64 and then rounded, as a Python float times the float32 sample and a new tensor would be.
            losses = (curve * noise.double()).float()
            det = DivergenceDetector()
            since, hit_once, hit_twice, peak = None, False, False, math.nan
            for step in range(steps):
                det.update(losses[step])
                if step % every == every - 1:
                    value = float(det.progress()[0])
                    if math.isfinite(value):
                        peak = value if math.isnan(peak) else max(peak, value)
                    else:
                        value = 0.0  # not measured yet: no hold, as in the guard
                    hit_once |= value >= share
                    # The guard's hold: over the bar at every check since the first of a run of them, for
                    # RELAPSE_HOLD steps.
                    since = (step if since is None else since) if value >= share else None
                    hit_twice |= since is not None and step - since >= RELAPSE_HOLD
            once += hit_once
            twice += hit_twice
            if math.isfinite(peak):
                measured += 1
                peaks.append(peak)
        out.append(
            {
                "n": n,
                "runs": runs,
                "steps": steps,
                "check_every": every,
                "measured": measured,
                "at_one_check": once,
                "held": twice,
                "median_peak": statistics.median(peaks) if peaks else None,
                "max_peak": max(peaks) if peaks else None,
            }
        )
        print(f"  n={n}: {once} at one check, {twice} held {RELAPSE_HOLD} steps of {runs}", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the selected scenarios (or, with ``--simulate``, run the noise simulation); return meta and results.

    Args:
        args: The parsed command line (see ``--help``), plus ``command``, the command as typed.
    """
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(args.threads)  # small nets: extra threads only add synchronisation
        if args.simulate:
            steps = args.steps or 600
            body: dict[str, Any] = {
                "simulation": simulate(args.samples, args.runs, steps, args.log_every, args.seeds[0]),
            }
        else:
            body = _train(args)
    finally:
        torch.set_num_threads(threads_before)
    meta = {
        "command": args.command,
        "mode": "simulate" if args.simulate else "train",
        "seeds": args.seeds[:1] if args.simulate else args.seeds,
        "steps_override": args.steps,
        "log_every": args.log_every,
        "high_lr": args.high_lr,
        "tuned_lr": args.tuned_lr,
        "relapse_share": RELAPSE_SHARE,
        "machine": machine(),
        "threads": args.threads,
        "wall_s": time.perf_counter() - start,
    }
    return {"meta": meta, **body}


# ---------------------------------------------------------------------------------------------------------- report
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _events(events: dict[str, int] | None) -> str:
    if events is None:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in events.items() if v) or "none"


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _report_simulation(result: dict[str, Any]) -> list[str]:
    sim = result["simulation"]
    first = sim[0]
    lines = [
        f"{first['runs']} runs of {first['steps']} steps per n: loss = (1 - 0.5 min(1, t / {first['steps'] / 4:g})) x "
        f"the mean of n squared standard Gaussians, into DivergenceDetector(); progress() read every "
        f"{first['check_every']} steps; generator seed {result['meta']['seeds'][0]}",
        "",
    ]
    header = (
        "n",
        "runs",
        "measured",
        f"share >= {RELAPSE_SHARE:g} at one check",
        f"held {RELAPSE_HOLD} steps (warned)",
        "peak",
    )
    rows = [
        (
            str(s["n"]),
            str(s["runs"]),
            str(s["measured"]),
            str(s["at_one_check"]),
            str(s["held"]),
            f"median {num(s['median_peak'], '.2f')}, max {num(s['max_peak'], '.2f')}",
        )
        for s in sim
    ]
    return [*lines, *_table(header, rows)]


def _report_training(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    lines = ["scenarios (batch 32; each seed's three runs start from the same weights and see the same batches):", ""]
    for s in result["scenarios"]:
        lines.append(f"* `{s['scenario']}`: {s['title']}; {s['steps']} steps, {s['schedule']}")
    lines += [
        "",
        f"rates: too high {meta['high_lr']:g} (the MLPs' base rate before the raise, the transformers' peak), tuned "
        f"{meta['tuned_lr']:g}; the guard logs every {meta['log_every']} steps",
        "",
    ]
    header = (
        "scenario",
        "seed",
        "run",
        "lr",
        "held-out",
        "acc",
        "peak relapse (step)",
        "low/start",
        "warned at (share)",
        "events",
        "wall s",
    )
    rows = []
    for r in result["rows"]:
        peak = "-" if r["peak_relapse"] is None else f"{r['peak_relapse']:.2f} ({r['peak_relapse_step']})"
        warned = "-"
        if r["relapse_warning_step"] is not None:
            warned = f"{r['relapse_warning_step']} ({r['relapse_warning_share']:.2f})"
        rows.append(
            (
                r["scenario"],
                str(r["seed"]),
                r["run"],
                f"{r['lr']:g}",
                num(r["heldout_loss"]),
                num(r["heldout_acc"], ".3f"),
                peak if r["run"] == "guarded" else "-",
                num(r["replayed_low_over_start"], ".2f"),
                warned if r["run"] == "guarded" else "-",
                _events(r["events"]),
                f"{r['wall_s']:.1f}",
            )
        )
    lines += _table(header, rows)
    lines += [
        "",
        "held-out: cross-entropy (per copied token for the transformers) or MSE (`mlpr`); acc: accuracy. peak "
        f"relapse: the largest `{RELAPSE_TAG}` logged ('-': never measured, the run's lowest running mean stayed "
        "above 0.8x its start); low/start: the training losses replayed through DivergenceDetector(), its lowest "
        "settled running mean over its starting level at the end; warned at: the step of the relapse warning and "
        "the share it named; events: the guard's summary() counts that are not 0",
        "",
    ]
    for s in result["summary"]:
        high, tuned = s["high"], s["tuned"]
        medians = ", ".join(f"{k} {num(v)}" for k, v in s["median_heldout"].items())
        steps = ", ".join(map(str, high["warning_steps"])) or "-"
        lines.append(
            f"- `{s['scenario']}`: {GUARD_LABEL} at lr {meta['high_lr']:g} warned on {high['warned']}/{s['seeds']} "
            f"seeds (steps {steps}; shares {_span(high['warning_shares'])}), peak relapse {_span(high['peaks'])} "
            f"({len(high['peaks'])} measured); at lr {meta['tuned_lr']:g} warned on {tuned['warned']}/{s['seeds']}, "
            f"peak {_span(tuned['peaks'])} ({len(tuned['peaks'])} measured). Median held-out: {medians}"
        )
    return lines


def report(result: dict[str, Any]) -> str:
    """The result of :func:`run` as a markdown table, with a line per scenario underneath (training)."""
    meta, m = result["meta"], result["meta"]["machine"]
    what = "the noise simulation" if meta["mode"] == "simulate" else "late collapse under the default GradGuard()"
    lines = [
        f"# GradGuard late collapse: {what}",
        "",
        f"command: `{meta['command']}`  ",
        (
            f"machine: {m['cpus']} CPUs available ({m['cpu_count']} in total, {m['processor']}), {meta['threads']} "
            f"thread(s), python {m['python']}, torch {m['torch']}, lightning {m['lightning']}  "
        ),
        f"seeds: {', '.join(map(str, meta['seeds']))}",
        "",
    ]
    lines += _report_simulation(result) if meta["mode"] == "simulate" else _report_training(result)
    lines += ["", f"total wall time {meta['wall_s']:.0f} s"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main
def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        p.error(f"{flag}: expected positive integers, got {text!r}")
    return values


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/late_collapse.py",
        description="Train runs that collapse late, unguarded and with GradGuard(); report the relapse measure and "
        "warning. --simulate: how often noise alone passes the warning's bar.",
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (the simulation's generator seed)")
    seeds.add_argument("--seeds", default="0-2", help="seeds, e.g. 0-4 or 0,3,7 (default: 0-2; --simulate: the first)")
    p.add_argument("--steps", type=int, default=None, help="steps of every run instead of its default (events scaled)")
    p.add_argument("--high-lr", type=float, default=0.1, help="the too-high rate (default: 0.1)")
    p.add_argument("--tuned-lr", type=float, default=0.01, help="the tuned rate (default: 0.01)")
    p.add_argument("--log-every", type=int, default=50, help="steps between logs (simulation: checks; default: 50)")
    p.add_argument("--simulate", action="store_true", help="run the noise simulation instead of training")
    p.add_argument("--runs", type=int, default=100, help="--simulate: curves per n (default: 100)")
    p.add_argument("--samples", default="1,2,4,8", help="--simulate: the n of each loss's mean (default: 1,2,4,8)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout only)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds, for the tests: mlp only, seed 0, 240 steps, a log every 10 (--simulate: 4 runs)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.scenarios, args.seed, args.steps, args.log_every, args.runs = "mlp", 0, 240, 10, 4
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown or not names:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    args.scenarios = names
    if args.seed is not None:
        if args.seed < 0:
            p.error("--seed must be >= 0")
        args.seeds = [args.seed]
    else:
        try:
            args.seeds = parse_seeds(args.seeds)
        except ValueError as e:
            p.error(str(e))
    args.samples = _ints(p, "--samples", args.samples)
    for flag in ("steps", "log_every", "runs", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("high_lr", "tuned_lr"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (or the JSON with ``--json -``) and return the results."""
    return run_main(argv, "late_collapse.py", _parse, run, report)


if __name__ == "__main__":
    main()
