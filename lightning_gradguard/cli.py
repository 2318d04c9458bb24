"""``gradguard report LOGDIR``: what happened to the gradients of a run, read back from its TensorBoard event files.

A *run* is every directory under ``LOGDIR`` (``LOGDIR`` included) whose ``events.out.tfevents.*`` files hold
``gradguard/`` scalars. For each run the report gives its length, total-norm percentiles, the final event counts, LR
reductions, the layers with the largest norms and the longest vanishing spells, and a root-cause hint: the first
logged step where a layer was in trouble and, among the layers in trouble at that step, the earliest one.

Trouble is judged from the per-layer norms (``gradguard/layer/<name>``) alone, so it works on any run:

* explode: a layer's norm exceeds :data:`EXPLODE_FACTOR` times its own median over the run;
* vanish: a layer's norm falls below :data:`VANISH_RELATIVE` times the largest layer norm at that step, or below
  :data:`VANISH_ABSOLUTE`;
* non-finite: a layer's norm is NaN or infinite.

"Earliest" means definition order, which is the order in which the layer tags were first written: GradGuard writes
every layer of a logging step in definition order, and TensorBoard keeps tags in first-seen order. (A layer left out
of the first logging steps, because it had no gradient yet, therefore sorts after the layers written before it.)

Usage::

    gradguard report lightning_logs                  # one summary per run, plus a comparison table
    gradguard report lightning_logs --json           # the same as one JSON object {"runs": {name: summary}}
    gradguard report lightning_logs --run version_3 --png flow.png   # gradient-flow picture of one run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "EXPLODE_FACTOR",
    "VANISH_ABSOLUTE",
    "VANISH_RELATIVE",
    "ReportError",
    "RunData",
    "build_parser",
    "find_runs",
    "layer_matrix",
    "load_run",
    "main",
    "summarize_run",
    "trouble_masks",
]

#: A layer explodes when its norm exceeds this many times its own median over the run.
EXPLODE_FACTOR = 10.0
#: A layer vanishes when its norm falls below this fraction of the largest layer norm at the same step ...
VANISH_RELATIVE = 1e-6
#: ... or below this absolute value.
VANISH_ABSOLUTE = 1e-10
TOP_K = 5

_PREFIX = "gradguard/"
_LAYER_PREFIX = "gradguard/layer/"
_EVENT_FILE = "events.out.tfevents."
_OPT_RE = re.compile(r"^gradguard/(opt\d+)/")
_PER_OPTIMIZER = re.compile(r"^gradguard/(?:(opt\d+)/)?(total_norm|total_norm_max|lr_scale|events/[^/]+)$")


class ReportError(Exception):
    """A problem with the input (missing directory, no event files, no GradGuard tags); exits with code 2."""


@dataclass
class RunData:
    """The ``gradguard/`` scalars of one run: ``tag -> (steps, values)``, tags in first-written order."""

    name: str
    path: str
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------
def _natural_key(text: str) -> list[Any]:
    # version_10 after version_9.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(logdir: str) -> list[tuple[str, str]]:
    """Directories under ``logdir`` (recursively, itself included) holding event files, as ``(name, path)``.

    The name is the path relative to ``logdir`` (``logdir``'s own name for ``logdir`` itself).

    Raises:
        ReportError: ``logdir`` is missing or holds no event files.
    """
    if not os.path.exists(logdir):
        raise ReportError(f"log directory {logdir!r} does not exist")
    if not os.path.isdir(logdir):
        raise ReportError(f"{logdir!r} is not a directory")
    runs = []
    for root, dirs, files in os.walk(logdir):
        dirs.sort(key=_natural_key)
        if any(name.startswith(_EVENT_FILE) for name in files):
            rel = os.path.relpath(root, logdir)
            name = os.path.basename(os.path.abspath(logdir)) if rel == "." else rel.replace(os.sep, "/")
            runs.append((name, root))
    if not runs:
        raise ReportError(f"no TensorBoard event files ({_EVENT_FILE}*) under {logdir!r}")
    return runs


def load_run(name: str, path: str) -> RunData:
    """Read every ``gradguard/`` scalar of the event files in ``path`` (not its subdirectories).

    A step written twice (a resumed run) keeps its last value.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    # 0 = keep every scalar; the report never looks at images, histograms or text, so keep one of each.
    guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.AUDIO: 1, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1, ea.TENSORS: 1}
    accumulator = ea.EventAccumulator(path, size_guidance=guidance)
    accumulator.Reload()
    run = RunData(name=name, path=path)
    for tag in accumulator.Tags().get("scalars", []):
        if not tag.startswith(_PREFIX):
            continue
        by_step = {int(event.step): float(event.value) for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        run.scalars[tag] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    return run


# --------------------------------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------------------------------
def layer_matrix(run: RunData) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer norms on a common step grid: ``(names, steps [T], norms [L, T], present [L, T])``.

    ``norms`` is NaN where a layer was not written (``present`` False); a written NaN or inf is kept as is.
    """
    tags = [tag for tag in run.scalars if tag.startswith(_LAYER_PREFIX)]
    names = [tag[len(_LAYER_PREFIX) :] for tag in tags]
    if not tags:
        return names, np.zeros(0, dtype=np.int64), np.zeros((0, 0)), np.zeros((0, 0), dtype=bool)
    steps = np.unique(np.concatenate([run.scalars[tag][0] for tag in tags]))
    norms = np.full((len(tags), len(steps)), np.nan)
    present = np.zeros((len(tags), len(steps)), dtype=bool)
    for i, tag in enumerate(tags):
        tag_steps, values = run.scalars[tag]
        cols = np.searchsorted(steps, tag_steps)
        norms[i, cols] = values
        present[i, cols] = True
    return names, steps, norms, present


def trouble_masks(norms: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(explode, vanish, nonfinite)`` ``[L, T]`` masks by the rules in the module docstring."""
    finite = present & np.isfinite(norms)
    nonfinite = present & ~np.isfinite(norms)
    if norms.size == 0:
        return finite, finite.copy(), nonfinite
    clean = np.where(finite, norms, np.nan)
    with warnings.catch_warnings():
        # All-NaN slices (a layer never written, a step without layers) are expected and simply match nothing.
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(clean, axis=1, keepdims=True)
        largest = np.nanmax(clean, axis=0, keepdims=True)
    with np.errstate(invalid="ignore"):
        # A layer whose median is 0 (mostly without gradient) has no scale to explode against.
        explode = finite & (median > 0) & (clean > EXPLODE_FACTOR * median)
        vanish = finite & ((clean < VANISH_RELATIVE * largest) | (clean < VANISH_ABSOLUTE))
    return explode, vanish, nonfinite


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _last(run: RunData, tag: str) -> float | None:
    if tag not in run.scalars or run.scalars[tag][1].size == 0:
        return None
    return float(run.scalars[tag][1][-1])


def _optimizer_summary(run: RunData, opt: str | None) -> dict[str, Any]:
    base = f"{_PREFIX}{opt}/" if opt else _PREFIX
    summary: dict[str, Any] = {}
    values = run.scalars.get(base + "total_norm", (None, np.zeros(0)))[1]
    maxima = run.scalars.get(base + "total_norm_max", (None, np.zeros(0)))[1]
    finite = values[np.isfinite(values)]
    pool = np.concatenate([finite, maxima[np.isfinite(maxima)]])
    summary["total_norm"] = {
        "p50": float(np.percentile(finite, 50)) if finite.size else None,
        "p90": float(np.percentile(finite, 90)) if finite.size else None,
        "p99": float(np.percentile(finite, 99)) if finite.size else None,
        "max": float(pool.max()) if pool.size else None,
    }
    events: dict[str, int] = {}
    for tag in run.scalars:
        if tag.startswith(base + "events/"):
            last = _last(run, tag)
            events[tag[len(base + "events/") :]] = int(last) if last is not None and math.isfinite(last) else 0
    summary["events"] = events
    summary["lr_reductions"] = events.get("lr_reduced")
    lr_scale = run.scalars.get(base + "lr_scale", (None, np.zeros(0)))[1]
    lr_scale = lr_scale[np.isfinite(lr_scale)]
    summary["min_lr_scale"] = float(lr_scale.min()) if lr_scale.size else None
    return summary


def _first_event(run: RunData, optimizers: list[str | None]) -> dict[str, Any] | None:
    best: dict[str, Any] | None = None
    for opt in optimizers:
        base = f"{_PREFIX}{opt}/events/" if opt else f"{_PREFIX}events/"
        for tag, (steps, values) in run.scalars.items():
            if not tag.startswith(base):
                continue
            hit = np.flatnonzero(values > 0)
            if hit.size and (best is None or steps[hit[0]] < best["step"]):
                best = {"step": int(steps[hit[0]]), "kind": tag[len(base) :], "optimizer": opt or "opt0"}
    return best


def _first_of(mask: np.ndarray, names: list[str], steps: np.ndarray, norms: np.ndarray) -> dict[str, Any] | None:
    cols = np.flatnonzero(mask.any(axis=0))
    if not cols.size:
        return None
    col = cols[0]
    row = int(np.flatnonzero(mask[:, col])[0])
    return {
        "step": int(steps[col]),
        "layer": names[row],
        "value": _num(float(norms[row, col])),
        "layers_in_trouble": int(mask[:, col].sum()),
    }


def summarize_run(run: RunData) -> dict[str, Any]:
    """The report of one run as plain JSON-ready data (non-finite numbers become ``None``)."""
    all_steps = np.unique(np.concatenate([steps for steps, _ in run.scalars.values()])) if run.scalars else []
    prefixes = sorted({m.group(1) for tag in run.scalars if (m := _PER_OPTIMIZER.match(tag)) and m.group(1)},
                      key=_natural_key)
    optimizers: list[str | None] = list(prefixes) if prefixes else [None]

    names, steps, norms, present = layer_matrix(run)
    explode, vanish, nonfinite = trouble_masks(norms, present)
    trouble = explode | vanish | nonfinite
    first_trouble = _first_of(trouble, names, steps, norms)
    if first_trouble is not None:
        col = int(np.searchsorted(steps, first_trouble["step"]))
        row = names.index(first_trouble["layer"])
        first_trouble["kind"] = (
            "nonfinite" if nonfinite[row, col] else "explode" if explode[row, col] else "vanish"
        )

    finite = present & np.isfinite(norms)
    top_max: list[dict[str, Any]] = []
    if names:
        masked = np.where(finite, norms, -np.inf)
        peak_col = masked.argmax(axis=1)
        peak = masked[np.arange(len(names)), peak_col]
        for row in sorted(np.flatnonzero(np.isfinite(peak)).tolist(), key=lambda r: (-peak[r], r))[:TOP_K]:
            top_max.append({"layer": names[row], "max_norm": float(peak[row]), "step": int(steps[peak_col[row]])})
    vanish_steps = vanish.sum(axis=1) if names else np.zeros(0, dtype=int)
    top_vanish = [
        {"layer": names[row], "steps": int(vanish_steps[row])}
        for row in sorted(np.flatnonzero(vanish_steps > 0).tolist(), key=lambda r: (-vanish_steps[r], r))[:TOP_K]
    ]

    return {
        "path": run.path,
        "steps": {
            "first": int(all_steps[0]) if len(all_steps) else None,
            "last": int(all_steps[-1]) if len(all_steps) else None,
            "logged": len(all_steps),
        },
        "num_layers": len(names),
        "optimizers": {opt or "opt0": _optimizer_summary(run, opt) for opt in optimizers},
        "first_event": _first_event(run, optimizers),
        "first_trouble": first_trouble,
        "first_explode": _first_of(explode | nonfinite, names, steps, norms),
        "first_vanish": _first_of(vanish, names, steps, norms),
        "top_max_norm": top_max,
        "top_vanishing": top_vanish,
    }


# --------------------------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, indent: str = "") -> str:
    """Align ``rows`` in left-aligned columns as plain text, with a dashed rule under the header."""
    table = ([list(header)] if header else []) + [list(row) for row in rows]
    if not table:
        return ""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    if header:
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The scalar metrics of a summary as ``(label, text)`` rows, shared by the per-run and comparison tables."""
    rows = [
        ("first step", _fmt(summary["steps"]["first"])),
        ("last step", _fmt(summary["steps"]["last"])),
        ("logged steps", _fmt(summary["steps"]["logged"])),
        ("layers", _fmt(summary["num_layers"])),
    ]
    several = len(summary["optimizers"]) > 1
    for opt, data in summary["optimizers"].items():
        prefix = f"{opt} " if several else ""
        for q in ("p50", "p90", "p99", "max"):
            rows.append((f"{prefix}total norm {q}", _fmt(data["total_norm"][q])))
        for kind, count in data["events"].items():
            rows.append((f"{prefix}events {kind}", _fmt(count)))
        rows.append((f"{prefix}lr reductions", _fmt(data["lr_reductions"])))
        rows.append((f"{prefix}min lr scale", _fmt(data["min_lr_scale"])))
    event = summary["first_event"]
    rows.append(("first event step", _fmt(event and event["step"])))
    rows.append(("first event kind", _fmt(event and event["kind"])))
    trouble = summary["first_trouble"]
    rows.append(("first trouble step", _fmt(trouble and trouble["step"])))
    rows.append(("first trouble layer", _fmt(trouble and trouble["layer"])))
    if trouble is not None:
        many = trouble["layers_in_trouble"]
        rows.append(("first trouble kind", trouble["kind"] + (f" ({many} layers in trouble)" if many > 1 else "")))
    else:
        rows.append(("first trouble kind", "-"))
    for what in ("explode", "vanish"):
        hit = summary[f"first_{what}"]
        rows.append((f"first {what} step", _fmt(hit and hit["step"])))
        rows.append((f"first {what} layer", _fmt(hit and hit["layer"])))
    top = summary["top_max_norm"]
    rows.append(("largest norm layer", top[0]["layer"] if top else "-"))
    return rows


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """The text report of one run."""
    parts = [f"run {name}  ({summary['path']})", format_table(metric_rows(summary), indent="  ")]
    if summary["top_max_norm"]:
        parts.append(f"  top {TOP_K} layers by max norm")
        rows = [[str(i + 1), t["layer"], _fmt(t["max_norm"]), str(t["step"])] for i, t in
                enumerate(summary["top_max_norm"])]
        parts.append(format_table(rows, ["#", "layer", "max norm", "at step"], indent="    "))
    if summary["top_vanishing"]:
        parts.append(f"  top {TOP_K} layers by logged steps vanishing")
        rows = [[str(i + 1), t["layer"], str(t["steps"])] for i, t in enumerate(summary["top_vanishing"])]
        parts.append(format_table(rows, ["#", "layer", "steps"], indent="    "))
    return "\n".join(parts)


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """Side-by-side table: one row per metric, one column per run."""
    labels: list[str] = []
    columns: dict[str, dict[str, str]] = {}
    for name, summary in summaries.items():
        columns[name] = dict(metric_rows(summary))
        labels += [label for label in columns[name] if label not in labels]
    rows = [[label] + [columns[name].get(label, "-") for name in summaries] for label in labels]
    return format_table(rows, ["metric", *summaries])


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------------------------------
# picture
# --------------------------------------------------------------------------------------------------------------------
def render_run_png(run: RunData, path: str) -> None:
    """Write the gradient-flow heatmap of a run, with the bar chart of its last logged step below, to a PNG file."""
    from lightning_gradguard.tensorboard import render_bars, render_heatmap

    names, steps, norms, present = layer_matrix(run)
    if not names:
        raise ReportError(f"run {run.name!r} has no per-layer scalars ({_LAYER_PREFIX}<name>) to draw")
    explode, vanish, _ = trouble_masks(norms, present)
    # The renderers read a negative norm as "no gradient at this step".
    drawn = np.where(present, norms, -1.0)
    heatmap = render_heatmap(drawn, names, steps.tolist(), explode, vanish,
                             title=f"gradient flow: log10 ||grad|| per layer ({run.name})")
    last = int(np.flatnonzero(present.any(axis=0))[-1])
    bars = render_bars(drawn[:, last], names, exploding=explode[:, last], vanishing=vanish[:, last],
                       title=f"gradient flow at step {int(steps[last])} ({run.name})")
    width = max(heatmap.shape[1], bars.shape[1])
    pad = lambda img: np.pad(img, ((0, 0), (0, width - img.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    from matplotlib.image import imsave

    try:
        imsave(path, np.concatenate([pad(heatmap), pad(bars)], axis=0), format="png")
    except OSError as err:
        raise ReportError(f"cannot write {path!r}: {err.strerror or err}") from err


# --------------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``gradguard`` argument parser."""
    parser = argparse.ArgumentParser(prog="gradguard", description="Inspect GradGuard TensorBoard logs.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="summarize the gradients of one or several runs",
        description="Summarize GradGuard runs found under LOGDIR (each directory with event files is a run).",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory (searched recursively)")
    report.add_argument("--png", metavar="FILE", help="write the gradient-flow heatmap of the first (or --run) run")
    report.add_argument("--json", action="store_true", help='print {"runs": {name: summary}} as JSON')
    report.add_argument("--run", metavar="NAME", help="report only this run (its path relative to LOGDIR)")
    return parser


def _report(args: argparse.Namespace) -> int:
    candidates = find_runs(args.logdir)
    if args.run is not None:
        chosen = [(name, path) for name, path in candidates if name == args.run]
        if not chosen:
            raise ReportError(f"no run named {args.run!r}; runs: {', '.join(name for name, _ in candidates)}")
        candidates = chosen
    runs = [run for run in (load_run(name, path) for name, path in candidates) if run.scalars]
    if not runs:
        raise ReportError(
            f"event files under {args.logdir!r} hold no {_PREFIX} scalars "
            "(was GradGuard used with a TensorBoard logger?)"
        )
    summaries = {run.name: summarize_run(run) for run in runs}
    if args.png:
        render_run_png(runs[0], args.png)
    if args.json:
        print(json.dumps({"runs": _json_ready(summaries)}, indent=2, allow_nan=False))
    else:
        blocks = [format_summary(name, summary) for name, summary in summaries.items()]
        if len(summaries) > 1:
            blocks.append("comparison\n" + format_comparison(summaries))
        if args.png:
            blocks.append(f"gradient flow of run {runs[0].name} written to {args.png}")
        print("\n\n".join(blocks))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``gradguard``; returns the exit code (2 for bad input, with a message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message already
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    if args.command != "report":
        parser.print_help(sys.stderr)
        return 2
    try:
        return _report(args)
    except ReportError as err:
        print(f"gradguard report: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
