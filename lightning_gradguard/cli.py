"""``gradguard report LOGDIR``: what happened to the gradients of a run, read back from its TensorBoard event files.

A *run* is every directory under ``LOGDIR`` (``LOGDIR`` included) whose ``events.out.tfevents.*`` files hold
``gradguard/`` scalars; a directory with event files but no GradGuard data is listed as skipped, with the reason. For
each run the report gives its length, total-norm percentiles, the final event counts, the lowest LR scale, the layers
with the largest norms, the weakest layers, and a root-cause hint.

Events have one definition, the detectors' (the same that TensorBoard's pictures mark): GradGuard writes each event
that names a layer as ``gradguard/trouble/<kind>/<layer>`` (kind ``exploding``, ``vanishing`` or ``nonfinite``) at the
event's step, and the counts as ``gradguard/events/<kind>``. The **root-cause hint** is the first event: its step and,
among the layers with an event at that step, the earliest in definition order. Runs written before the trouble tags
existed fall back to the first logging step at which an event count rose (no layer is named then).

The diagnostics (``GradGuard(diagnostics=...)``), when the run logged them: the update-to-weight ratio per layer (its
latest value and its median over the logged steps, and the layers whose median lies outside the
:data:`RATIO_BAND`), the layers with the largest fraction of zero gradient entries, the activation-gradient flow
through depth at the last logged step (the input-side and the output-side layer, and by how many decades the norm
changes between them), and the gradient noise scale: "critical batch size about N; you train at B", with ``B`` the
examples per optimizer step that GradGuard writes into the run's configuration text (``batch_size``, all
micro-batches and processes).

The report's own measure is labelled as such: *weak* layers are those whose norm falls below :data:`WEAK_RELATIVE`
times the largest layer norm at that step, or below :data:`WEAK_ABSOLUTE` (the "top weak layers" list). It is not an
event and is not marked on the picture.

"Definition order" is the order in which the layer tags were first written: GradGuard writes every layer of a logging
step in definition order, and TensorBoard keeps tags in first-seen order. (A layer left out of the first logging
steps, because it had no gradient yet, therefore sorts after the layers written before it.)

Usage::

    gradguard report lightning_logs                  # one summary per run, plus a comparison table
    gradguard report lightning_logs --json           # {"runs": {name: summary}, "skipped": {name: reason}}
    gradguard report lightning_logs --run version_3 --png flow.png   # gradient-flow picture of one run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_gradguard.board import TROUBLE_KINDS
from lightning_gradguard.render import RATIO_BAND

__all__ = [
    "RATIO_BAND",
    "TROUBLE_KINDS",
    "WEAK_ABSOLUTE",
    "WEAK_RELATIVE",
    "ReportError",
    "RunData",
    "build_parser",
    "event_masks",
    "find_runs",
    "layer_events",
    "layer_matrix",
    "load_run",
    "main",
    "summarize_run",
    "weak_mask",
]

#: The report's own measure (not an event): a layer is *weak* at a step when its norm is below this fraction of the
#: largest layer norm at that step ...
WEAK_RELATIVE = 1e-6
#: ... or below this absolute value.
WEAK_ABSOLUTE = 1e-10
TOP_K = 5

_PREFIX = "gradguard/"
_LAYER_PREFIX = "gradguard/layer/"
_CONFIG_TAG = "gradguard/config/text_summary"
_DIAG_RE = re.compile(r"^gradguard/(?:(opt\d+)/)?(update_ratio|zero_fraction)/(.+)$")
_ACT_PREFIX = "gradguard/act_grad/"
_TROUBLE_PREFIX = "gradguard/trouble/"
_NO_DATA = "no gradguard/ scalars (was GradGuard used with a TensorBoard logger?)"
_EVENT_FILE = "events.out.tfevents."
_OPT_RE = re.compile(r"^gradguard/(opt\d+)/")
_EPOCH_RE = re.compile(r"^gradguard/(?:opt\d+/)?epoch/")
_PER_OPTIMIZER = re.compile(r"^gradguard/(?:(opt\d+)/)?(total_norm|total_norm_max|lr_scale|events/[^/]+)$")


class ReportError(Exception):
    """A problem with the input (missing directory, no event files, no GradGuard tags); exits with code 2."""


@dataclass
class RunData:
    """The ``gradguard/`` scalars of one run: ``tag -> (steps, values)``, tags in first-written order."""

    name: str
    path: str
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)  # GradGuard's configuration text, setting -> value
    damaged: list[str] = field(default_factory=list)  # event files with a record that failed its checksum


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
    with _DamageWatch() as damage:
        accumulator.Reload()
    run = RunData(name=name, path=path, damaged=damage.files)
    for tag in accumulator.Tags().get("scalars", []):
        if not tag.startswith(_PREFIX):
            continue
        by_step = {int(event.step): float(event.value) for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        run.scalars[tag] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    if _CONFIG_TAG in accumulator.Tags().get("tensors", []):
        events = accumulator.Tensors(_CONFIG_TAG)
        if events and events[-1].tensor_proto.string_val:
            run.config = parse_config_text(events[-1].tensor_proto.string_val[0].decode("utf-8", "replace"))
    return run


class _DamageWatch(logging.Filter):
    """Collects the event files TensorBoard's reader found damaged while reading (a record that failed its checksum:
    the reader stops there, and everything after it is lost). TensorBoard says so at debug level only; a truncated
    last record, which a run still writing leaves, is not damage.

    A filter on TensorBoard's logger, which is lowered to debug level meanwhile: it sees every record first and lets
    through only those the logger passed before, so the user's own logging setup sees what it saw before.
    """

    # TensorBoard's own reader says "... failed ... crc32 check"; TensorFlow's, when installed, "corrupted record".
    _DAMAGE = re.compile(r"crc32|corrupt", re.IGNORECASE)

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []
        self._logger = logging.getLogger("tensorboard")
        self._level = logging.NOTSET
        self._passed = logging.NOTSET

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == "Truncated record in %s (%s)" and len(args) == 2 and self._DAMAGE.search(str(args[1])):
            path = str(args[0])
            if path not in self.files:
                self.files.append(path)
        return record.levelno >= self._passed

    def __enter__(self) -> _DamageWatch:
        self._level, self._passed = self._logger.level, self._logger.getEffectiveLevel()
        self._logger.setLevel(logging.DEBUG)
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeFilter(self)
        self._logger.setLevel(self._level)


def parse_config_text(text: str) -> dict[str, str]:
    """``{setting: value}`` from GradGuard's configuration text (the markdown table of ``gradguard/config``).

    Example:
        >>> rows = ["| setting | value |", "|---|---|", "| batch_size | 64 |", "| clip | ZClip(a\\\\|b) |"]
        >>> parse_config_text("\\n".join(rows))
        {'batch_size': '64', 'clip': 'ZClip(a|b)'}
    """
    config: dict[str, str] = {}
    for line in text.splitlines()[2:]:  # past the header and its rule
        # Cells escape "|" as "\|": split on the unescaped ones only.
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2:
            config[cells[0]] = cells[1]
    return config


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


def layer_events(run: RunData) -> list[dict[str, Any]]:
    """The detectors' per-layer events of a run (``gradguard/trouble/<kind>/<layer>``), sorted by step.

    Each is ``{"step", "kind", "layer", "value"}``; ``value`` is the layer's norm when the event fired (``None`` for a
    non-finite one).
    """
    events: list[dict[str, Any]] = []
    for tag, (steps, values) in run.scalars.items():
        if not tag.startswith(_TROUBLE_PREFIX):
            continue
        kind, _, layer = tag[len(_TROUBLE_PREFIX) :].partition("/")
        if kind not in TROUBLE_KINDS or not layer:
            continue
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            events.append({"step": int(step), "kind": kind, "layer": layer, "value": _num(value)})
    events.sort(key=lambda e: e["step"])
    return events


def event_masks(events: list[dict[str, Any]], names: list[str], steps: np.ndarray) -> dict[str, np.ndarray]:
    """``{kind: [L, T] bool}``: the logged column each event of :func:`layer_events` falls in.

    An event belongs to the first logged step at or after it (the logging step that closed its window), as in the
    TensorBoard heatmap. Events of layers without per-layer scalars are left out.
    """
    masks = {kind: np.zeros((len(names), len(steps)), dtype=bool) for kind in TROUBLE_KINDS}
    if not len(steps):
        return masks
    row = {name: i for i, name in enumerate(names)}
    for event in events:
        if event["layer"] in row:
            col = min(int(np.searchsorted(steps, event["step"], side="left")), len(steps) - 1)
            masks[event["kind"]][row[event["layer"]], col] = True
    return masks


def weak_mask(norms: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``[L, T]``: where a layer was *weak* by the report's own rule (see :data:`WEAK_RELATIVE`); not an event."""
    finite = present & np.isfinite(norms)
    if norms.size == 0:
        return finite
    clean = np.where(finite, norms, np.nan)
    with warnings.catch_warnings():
        # All-NaN slices (a step without layers) are expected and simply match nothing.
        warnings.simplefilter("ignore", RuntimeWarning)
        largest = np.nanmax(clean, axis=0, keepdims=True)
    with np.errstate(invalid="ignore"):
        return finite & ((clean < WEAK_RELATIVE * largest) | (clean < WEAK_ABSOLUTE))


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
    lr_scale = run.scalars.get(base + "lr_scale", (None, np.zeros(0)))[1]
    lr_scale = lr_scale[np.isfinite(lr_scale)]
    summary["min_lr_scale"] = float(lr_scale.min()) if lr_scale.size else None
    # The late-collapse measure: its peak and where (absent for a run logged before it, or one that never learned).
    steps, shares = run.scalars.get(base + "loss_relapse", (np.zeros(0), np.zeros(0)))
    known = np.isfinite(shares)
    if known.any():
        peak = int(np.argmax(np.where(known, shares, -np.inf)))
        summary["loss_relapse"] = {
            "max": float(shares[peak]),
            "step": int(steps[peak]),
            "last": float(shares[known][-1]),
        }
    else:
        summary["loss_relapse"] = None
    return summary


_KIND_ORDER = {"nonfinite": 0, "exploding": 1, "vanishing": 2}  # one layer, several kinds at one step


def _first(events: list[dict[str, Any]], order: dict[str, int]) -> dict[str, Any] | None:
    """The first event and, among the layers with an event at its step, the earliest in definition order."""
    if not events:
        return None
    step = events[0]["step"]
    at_step = [e for e in events if e["step"] == step]
    unknown = len(order)  # a layer without per-layer scalars sorts last
    best = min(at_step, key=lambda e: (order.get(e["layer"], unknown), _KIND_ORDER[e["kind"]]))
    return {
        "step": step,
        "kind": best["kind"],
        "layer": best["layer"],
        "value": best["value"],
        "layers": len({e["layer"] for e in at_step}),
    }


def _first_from_counts(run: RunData, optimizers: list[str | None]) -> dict[str, Any] | None:
    # Runs without trouble tags: the first logging step at which a count of a layer event kind rose.
    best: dict[str, Any] | None = None
    for opt in optimizers:
        base = f"{_PREFIX}{opt}/events/" if opt else f"{_PREFIX}events/"
        for kind in TROUBLE_KINDS:
            steps, values = run.scalars.get(base + kind, (np.zeros(0, dtype=np.int64), np.zeros(0)))
            hit = np.flatnonzero(values > 0)
            if hit.size and (best is None or steps[hit[0]] < best["step"]):
                best = {"step": int(steps[hit[0]]), "kind": kind, "layer": None, "value": None, "layers": None}
    return best


def _per_layer(run: RunData, quantity: str) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{optimizer ("opt0" when single): {layer: (steps, values)}}`` of a per-layer diagnostic, layers in first-written
    (definition) order."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for tag, series in run.scalars.items():
        match = _DIAG_RE.match(tag)
        if match and match.group(2) == quantity:
            out.setdefault(match.group(1) or "opt0", {})[match.group(3)] = series
    return out


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def update_ratio_summary(run: RunData, band: tuple[float, float] = RATIO_BAND) -> dict[str, Any] | None:
    """Per optimizer: every layer's latest and median update-to-weight ratio, and the layers whose median lies
    outside ``band`` (furthest out first); ``None`` when the run logged no ratio.

    The median over the logged steps, not the latest value, decides "out of the band": one log is a poor witness.
    """
    per_optimizer = _per_layer(run, "update_ratio")
    if not per_optimizer:
        return None
    low, high = band
    summary: dict[str, Any] = {"band": [low, high], "optimizers": {}}
    for opt, layers in per_optimizer.items():
        rows: list[dict[str, Any]] = []
        for layer, (_, values) in layers.items():
            finite = _finite(values)
            if finite.size:
                rows.append({"layer": layer, "latest": float(finite[-1]), "median": float(np.median(finite))})
        out: list[dict[str, Any]] = []
        for row in rows:
            median = row["median"]
            if median > high or median < low:
                side = "above" if median > high else "below"
                # A layer that never moved (a dead one: median 0) is the furthest below (`decades` null in JSON).
                decades = abs(math.log10(median / (high if median > high else low))) if median > 0 else math.inf
                out.append({**row, "side": side, "decades": decades})
        out.sort(key=lambda row: -row["decades"])
        latest = [float(row["latest"]) for row in rows]
        summary["optimizers"][opt] = {
            "layers": rows,
            "median_latest": float(np.median(latest)) if latest else None,
            "out_of_band": out,
        }
    return summary


def zero_fraction_summary(run: RunData) -> dict[str, Any] | None:
    """Per optimizer: the layers with the largest latest fraction of exactly-zero gradient entries (those above 0,
    largest first, at most :data:`TOP_K`); ``None`` when the run logged no zero fraction."""
    per_optimizer = _per_layer(run, "zero_fraction")
    if not per_optimizer:
        return None
    summary: dict[str, Any] = {}
    for opt, layers in per_optimizer.items():
        latest = [(layer, float(_finite(values)[-1])) for layer, (_, values) in layers.items() if _finite(values).size]
        top = sorted((item for item in latest if item[1] > 0), key=lambda item: -item[1])[:TOP_K]
        summary[opt] = {"layers": len(latest), "top": [{"layer": layer, "latest": value} for layer, value in top]}
    return summary


def act_grad_summary(run: RunData) -> dict[str, Any] | None:
    """The activation-gradient flow through depth at the last logged step: the input-side (first in the order
    GradGuard wrote them: forward order, the order the layers' outputs were computed) and output-side (last) layer
    with their norms, the change between them in decades (``log10`` of input-side
    over output-side: negative = the signal shrinks towards the input; ``None`` when either is exactly 0), the smallest
    layer, and the layers whose activation gradient is exactly 0 (no gradient reaches them). ``None`` when the run
    logged no activation gradient."""
    series = {tag[len(_ACT_PREFIX) :]: value for tag, value in run.scalars.items() if tag.startswith(_ACT_PREFIX)}
    if not series:
        return None
    step = max(int(steps[-1]) for steps, _ in series.values() if steps.size)
    at_step: list[tuple[str, float]] = []
    for layer, (steps, values) in series.items():
        hit = np.flatnonzero(steps == step)
        # Exact zeros count: a flow that vanished completely is the worst case, not a missing value.
        if hit.size and math.isfinite(values[hit[-1]]) and values[hit[-1]] >= 0:
            at_step.append((layer, float(values[hit[-1]])))
    if not at_step:
        return {
            "step": step,
            "layers": 0,
            "input_side": None,
            "output_side": None,
            "decades": None,
            "smallest": None,
            "zero_layers": [],
        }
    (first, first_norm), (last, last_norm) = at_step[0], at_step[-1]
    smallest = min(at_step, key=lambda item: item[1])
    return {
        "step": step,
        "layers": len(at_step),
        "input_side": {"layer": first, "norm": first_norm},
        "output_side": {"layer": last, "norm": last_norm},
        "decades": math.log10(first_norm / last_norm) if first_norm > 0 and last_norm > 0 else None,
        "smallest": {"layer": smallest[0], "norm": smallest[1]},
        "zero_layers": [layer for layer, norm in at_step if norm == 0],
    }


def noise_scale_summary(run: RunData) -> dict[str, Any] | None:
    """The gradient noise scale ``B_simple`` (the latest logged value: already a smoothed estimate) as the critical
    batch size, and the batch size the run trained at (``batch_size`` of its configuration text, or ``None``);
    ``None`` when the run logged no noise scale."""
    _, values = run.scalars.get(f"{_PREFIX}noise_scale", (None, np.zeros(0)))
    finite = _finite(values)
    if not finite.size:
        return None
    batch: int | None = None
    with_batch = run.config.get("batch_size")
    if with_batch is not None:
        try:
            batch = int(float(with_batch))
        except ValueError:
            batch = None
    critical = float(finite[-1])
    return {
        "critical_batch_size": critical,
        "batch_size": batch,
        "ratio": batch / critical if batch and critical > 0 else None,
        "logs": int(finite.size),
    }


def summarize_run(run: RunData) -> dict[str, Any]:
    """The report of one run as plain JSON-ready data (non-finite numbers become ``None``)."""
    # Event points and per-epoch summaries are written at steps of their own (an event's step, an epoch's last
    # batch): not logging steps.
    logged = [
        steps
        for tag, (steps, _) in run.scalars.items()
        if not tag.startswith(_TROUBLE_PREFIX) and not _EPOCH_RE.match(tag)
    ]
    all_steps = np.unique(np.concatenate(logged)) if logged else np.zeros(0, dtype=np.int64)
    prefixes = sorted(
        {m.group(1) for tag in run.scalars if (m := _PER_OPTIMIZER.match(tag)) and m.group(1)}, key=_natural_key
    )
    optimizers: list[str | None] = list(prefixes) if prefixes else [None]

    names, steps, norms, present = layer_matrix(run)
    order = {name: i for i, name in enumerate(names)}
    events = layer_events(run)
    first_by_kind = {
        kind: _first([e for e in events if e["kind"] == kind], order)
        for kind in TROUBLE_KINDS
        if any(e["kind"] == kind for e in events)
    }
    first_event = _first(events, order) if events else _first_from_counts(run, optimizers)

    finite = present & np.isfinite(norms)
    # Each layer's largest norm with its step: the logged norms are each log's last one, so a spike between two logs
    # is found in the trouble tags, which hold the layer's norm when its event fired.
    peaks: dict[int, tuple[float, int]] = {}
    if names:
        masked = np.where(finite, norms, -np.inf)
        peak_col = masked.argmax(axis=1)
        for row in np.flatnonzero(np.isfinite(masked[np.arange(len(names)), peak_col])).tolist():
            peaks[row] = (float(masked[row, peak_col[row]]), int(steps[peak_col[row]]))
    for event in events:
        row, value = order.get(event["layer"]), event["value"]
        if row is not None and value is not None and math.isfinite(value) and value > peaks.get(row, (-math.inf,))[0]:
            peaks[row] = (value, event["step"])
    top_max = [
        {"layer": names[row], "max_norm": peaks[row][0], "step": peaks[row][1]}
        for row in sorted(peaks, key=lambda r: (-peaks[r][0], r))[:TOP_K]
    ]
    weak_steps = weak_mask(norms, present).sum(axis=1) if names else np.zeros(0, dtype=int)
    top_weak = [
        {"layer": names[row], "steps": int(weak_steps[row])}
        for row in sorted(np.flatnonzero(weak_steps > 0).tolist(), key=lambda r: (-weak_steps[r], r))[:TOP_K]
    ]

    return {
        "path": run.path,
        "damaged": list(run.damaged),
        "steps": {
            "first": int(all_steps[0]) if len(all_steps) else None,
            "last": int(all_steps[-1]) if len(all_steps) else None,
            "logged": len(all_steps),
        },
        "num_layers": len(names),
        "optimizers": {opt or "opt0": _optimizer_summary(run, opt) for opt in optimizers},
        "first_event": first_event,
        "first_by_kind": first_by_kind,
        "top_max_norm": top_max,
        "top_weak": top_weak,
        "update_ratio": update_ratio_summary(run),
        "zero_fraction": zero_fraction_summary(run),
        "act_grad": act_grad_summary(run),
        "noise_scale": noise_scale_summary(run),
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
    """The scalar metrics of a summary as ``(label, text)`` rows, shared by the per-run and comparison tables.

    Each figure appears once: the ``lr_reduced`` count is the "lr reductions" row, and the first event (the
    root-cause hint) is the detectors' first event.
    """
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
            label = "lr reductions" if kind == "lr_reduced" else f"events {kind}"
            rows.append((f"{prefix}{label}", _fmt(count)))
        rows.append((f"{prefix}min lr scale", _fmt(data["min_lr_scale"])))
        relapse = data.get("loss_relapse")
        if relapse is not None:
            rows.append((f"{prefix}loss relapse max", f"{relapse['max']:.2f} at step {relapse['step']}"))
    event = summary["first_event"]
    rows.append(("first event step", _fmt(event and event["step"])))
    if event is not None:
        many = event["layers"]
        rows.append(("first event kind", event["kind"] + (f" ({many} layers)" if many and many > 1 else "")))
    else:
        rows.append(("first event kind", "-"))
    rows.append(("first event layer", _fmt(event and event["layer"])))
    top = summary["top_max_norm"]
    rows.append(("largest norm layer", top[0]["layer"] if top else "-"))
    ratio = summary.get("update_ratio")
    if ratio is not None:
        for opt, data in ratio["optimizers"].items():
            prefix = f"{opt} " if len(ratio["optimizers"]) > 1 else ""
            rows.append((f"{prefix}update ratio median (latest)", _fmt(data["median_latest"])))
            rows.append((f"{prefix}layers out of ratio band", f"{len(data['out_of_band'])} of {len(data['layers'])}"))
    act = summary.get("act_grad")
    if act is not None and act["decades"] is not None:
        decades = act["decades"] if abs(act["decades"]) >= 0.005 else 0.0  # +0.00, not -0.00
        rows.append(("act-grad input/output (decades)", f"{decades:+.2f}"))
    elif act is not None and act["input_side"] is not None:
        rows.append(("act-grad input/output (decades)", f"- ({len(act['zero_layers'])} layers at 0)"))
    noise = summary.get("noise_scale")
    if noise is not None:
        rows.append(("critical batch size", _fmt(_round2(noise["critical_batch_size"]))))
        rows.append(("batch size", _fmt(noise["batch_size"])))
    return rows


def _round2(value: float) -> float | int:
    """Two significant digits: the noise scale is an estimate, more digits would claim a precision it has not."""
    if not math.isfinite(value) or value == 0:
        return value
    rounded = round(value, 1 - int(math.floor(math.log10(abs(value)))))
    return int(rounded) if abs(rounded) >= 10 else rounded


def _scientific(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def format_diagnostics(summary: dict[str, Any]) -> list[str]:
    """The text of the diagnostics of one run (empty when it logged none)."""
    parts: list[str] = []
    ratio = summary.get("update_ratio")
    if ratio is not None:
        low, high = ratio["band"]
        for opt, data in ratio["optimizers"].items():
            where = f" ({opt})" if len(ratio["optimizers"]) > 1 else ""
            out = data["out_of_band"]
            parts.append(
                f"  update/weight ratio{where}: median over layers of the latest {_fmt(data['median_latest'])};"
                f" {len(out)} of {len(data['layers'])} layers with a median outside {low:g}..{high:g}"
            )
            if out:
                rows = [
                    [row["layer"], _scientific(row["median"]), _scientific(row["latest"]), row["side"]]
                    for row in out[:TOP_K]
                ]
                parts.append(format_table(rows, ["layer", "median", "latest", "band"], indent="    "))
                if len(out) > TOP_K:
                    parts.append(f"    ... and {len(out) - TOP_K} more (--json lists every layer)")
    zero = summary.get("zero_fraction")
    if zero is not None:
        for opt, data in zero.items():
            where = f" ({opt})" if len(zero) > 1 else ""
            if data["top"]:
                listed = ", ".join(f"{row['layer']} {row['latest']:.0%}" for row in data["top"])
                parts.append(f"  zero gradient entries{where}, latest: {listed}")
            else:
                parts.append(f"  zero gradient entries{where}: none in the latest log")
    act = summary.get("act_grad")
    if act is not None and act["input_side"] is not None:
        first, last, smallest = act["input_side"], act["output_side"], act["smallest"]
        line = (
            f"  activation-gradient flow at step {act['step']}: output side {last['layer']} {_scientific(last['norm'])}"
            f" -> input side {first['layer']} {_scientific(first['norm'])}"
        )
        if act["decades"] is not None and abs(act["decades"]) < 0.05:
            line += " (about the same at the input as at the output)"
        elif act["decades"] is not None:
            trend = "shrinks" if act["decades"] < 0 else "grows"
            line += f" ({trend} {abs(act['decades']):.1f} decades towards the input)"
        line += f"; smallest {smallest['layer']} {_scientific(smallest['norm'])}"
        zeros = act["zero_layers"]
        if zeros:
            named = ", ".join(zeros[:TOP_K]) + (f" and {len(zeros) - TOP_K} more" if len(zeros) > TOP_K else "")
            line += f"; {len(zeros)} of {act['layers']} layers at exactly 0, no gradient reaches them: {named}"
        parts.append(line)
    noise = summary.get("noise_scale")
    if noise is not None:
        line = f"  gradient noise scale: critical batch size about {_fmt(_round2(noise['critical_batch_size']))}"
        if noise["critical_batch_size"] < 1:
            # An estimate from two noisy squared norms: below one example it says nothing about the batch size.
            line += (
                " (below one example: the estimate is too noisy to read here; it compares few micro-batches per"
                " step, so read it over a longer run or more accumulation)"
            )
        elif noise["batch_size"] is not None:
            line += f"; you train at {noise['batch_size']}"
            if noise["ratio"] < 0.5:
                line += " (well below: a larger batch would likely cut the steps needed about in proportion)"
            elif noise["ratio"] > 2:
                line += " (well above: extra examples per step likely bring little)"
        else:
            line += "; the batch size is not recorded in this run"
        parts.append(line)
    return parts


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """The text report of one run."""
    parts = [f"run {name}  ({summary['path']})"]
    for path in summary.get("damaged", []):
        parts.append(f"  warning: damaged event file (a record failed its checksum), read up to the damage: {path}")
    parts.append(format_table(metric_rows(summary), indent="  "))
    if summary["top_max_norm"]:
        parts.append(f"  top {TOP_K} layers by max norm")
        rows = [
            [str(i + 1), t["layer"], _fmt(t["max_norm"]), str(t["step"])] for i, t in enumerate(summary["top_max_norm"])
        ]
        parts.append(format_table(rows, ["#", "layer", "max norm", "at step"], indent="    "))
    if summary["top_weak"]:
        parts.append(
            f"  top {TOP_K} weak layers: logged steps below {WEAK_RELATIVE:g} x the largest layer or {WEAK_ABSOLUTE:g}"
            " (the report's measure, not the detector's)"
        )
        rows = [[str(i + 1), t["layer"], str(t["steps"])] for i, t in enumerate(summary["top_weak"])]
        parts.append(format_table(rows, ["#", "layer", "steps"], indent="    "))
    diagnostics = format_diagnostics(summary)
    if diagnostics:
        parts.append("  diagnostics")
        parts += diagnostics
    return "\n".join(parts)


def format_skipped(skipped: dict[str, str]) -> str:
    """The notice of the runs left out, one line each with the reason."""
    lines = [f"skipped {len(skipped)} run{'s' if len(skipped) > 1 else ''} without GradGuard data:"]
    lines += [f"  {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


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
    """Write the gradient-flow heatmap of a run, with the bar chart of its last logged step below, to a PNG file.

    Exploding (red) and vanishing (blue) marks are the detectors' events, as on TensorBoard's picture.
    """
    from lightning_gradguard.render import flow_figure

    names, steps, norms, present = layer_matrix(run)
    if not names:
        raise ReportError(f"run {run.name!r} has no per-layer scalars ({_LAYER_PREFIX}<name>) to draw")
    masks = event_masks(layer_events(run), names, steps)
    # The renderers read a negative norm as "no gradient at this step".
    drawn = np.where(present, norms, -1.0)
    drawn[masks["nonfinite"]] = np.nan  # a non-finite step between two logs, as the TensorBoard heatmap shows it
    last = int(np.flatnonzero(present.any(axis=0))[-1])
    figure = flow_figure(
        drawn,
        names,
        steps.tolist(),
        masks["exploding"],
        masks["vanishing"],
        column=last,
        title=f"gradient flow: log10 ||grad|| per layer ({run.name})",
    )
    try:
        figure.savefig(path, format="png", bbox_inches="tight", pad_inches=0.1)
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
    report.add_argument(
        "--json", action="store_true", help='print {"runs": {name: summary}, "skipped": {name: reason}} as JSON'
    )
    report.add_argument("--run", metavar="NAME", help="report only this run (its path relative to LOGDIR)")
    return parser


def _load_runs(candidates: list[tuple[str, str]]) -> tuple[list[RunData], dict[str, str]]:
    """The runs with GradGuard data, and ``{name: reason}`` for the others."""
    runs: list[RunData] = []
    skipped: dict[str, str] = {}
    for name, path in candidates:
        try:
            run = load_run(name, path)
        except Exception as err:  # a damaged file must not hide the other runs; it is named with the reason
            skipped[name] = f"event files could not be read ({type(err).__name__}: {err})"
            continue
        if run.scalars:
            runs.append(run)
        elif run.damaged:
            skipped[name] = f"damaged event file, nothing read before the damage: {', '.join(run.damaged)}"
        else:
            skipped[name] = _NO_DATA
    return runs, skipped


def _report(args: argparse.Namespace) -> int:
    candidates = find_runs(args.logdir)
    if args.run is not None:
        chosen = [(name, path) for name, path in candidates if name == args.run]
        if not chosen:
            # Only the runs a report would show: the event files of a run without GradGuard's data are none.
            loaded, _ = _load_runs(candidates)
            names = ", ".join(run.name for run in loaded) or "none with GradGuard data"
            raise ReportError(f"no run named {args.run!r}; runs: {names}")
        candidates = chosen
    runs, skipped = _load_runs(candidates)
    if not runs:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ReportError(f"event files under {args.logdir!r} hold no GradGuard data ({reasons})")
    summaries = {run.name: summarize_run(run) for run in runs}
    drawn = ""
    if args.png:
        render_run_png(runs[0], args.png)
        # One picture of several runs: say which, and how to pick another.
        others = f" (the first of {len(runs)}; pick another with --run)" if len(runs) > 1 else ""
        drawn = f"gradient flow of run {runs[0].name}{others} written to {args.png}"
        if args.json and others:
            print(drawn, file=sys.stderr)
    if args.json:
        print(json.dumps({"runs": _json_ready(summaries), "skipped": skipped}, indent=2, allow_nan=False))
    else:
        blocks = [format_summary(name, summary) for name, summary in summaries.items()]
        if len(summaries) > 1:
            blocks.append("comparison\n" + format_comparison(summaries))
        if skipped:
            blocks.append(format_skipped(skipped))
        if drawn:
            blocks.append(drawn)
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
    except BrokenPipeError:
        # The reader stopped early (`gradguard report ... | head`): no traceback, and none at exit either, when
        # Python flushes stdout into the closed pipe (the recipe of Python's `signal` documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
