"""Everything GradGuard writes to TensorBoard: the dashboard layout, scalars, images, histograms and text.

The callback calls :class:`GradGuardBoard` on logging steps only, with values already copied to the host, so nothing
here touches the training hot path. The image renderers (:func:`render_heatmap`, :func:`render_bars`) are plain
functions of numpy arrays, shared with ``gradguard report --png``.

This module imports neither Lightning nor (at import time) torch or matplotlib, so the command line tool and the
package import stay fast.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "EVENT_KINDS",
    "GradGuardBoard",
    "HeatmapRows",
    "block_name",
    "group_layer_names",
    "heatmap_rows",
    "layer_row_spans",
    "render_bars",
    "render_heatmap",
    "sample_gradients",
]

#: Event counters written as ``gradguard/events/<kind>``.
EVENT_KINDS: tuple[str, ...] = ("exploding", "vanishing", "nonfinite", "skipped", "overflow", "lr_reduced", "clipped")

_PREFIX = "gradguard/"
_EVENT_COLUMNS = ("step", "kind", "layer", "value", "action")
_MAX_EVENT_ROWS = 200
# A norm below zero never comes from a gradient, so it marks "this layer had no gradient at this step" in the history
# without a second array; NaN stays free to mean "non-finite gradient".
_ABSENT = -1.0

# ``add_custom_scalars`` may be called only once per writer; several boards can share one writer (e.g. a callback
# re-created in the same process), so the guard lives with the writer, not with the board.
_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


# --------------------------------------------------------------------------------------------------------------------
# layer grouping
# --------------------------------------------------------------------------------------------------------------------
def block_name(name: str, depth: int = 1) -> str:
    """The first ``depth`` dot-separated components of a layer or parameter name (its model block).

    Example:
        >>> block_name("encoder.layers.3.attn.q_proj.weight", depth=2)
        'encoder.layers'
        >>> block_name("head")
        'head'
    """
    if depth < 1:
        raise ValueError(f"`depth` must be an integer >= 1, got {depth!r}")
    return ".".join(name.split(".")[:depth])


def group_layer_names(names: Sequence[str], max_lines: int = 12) -> list[tuple[str, list[str]]]:
    """Split layer names into small groups of related layers, keeping definition order.

    Names are grouped by their leading dot-separated components, going one component deeper only for groups larger
    than ``max_lines``; groups that cannot be split further are cut into consecutive chunks, and consecutive small
    groups are merged while they fit. A 100-layer network gives about 10 groups of at most ``max_lines`` names.

    Args:
        names: layer names in definition order.
        max_lines: the largest group size (one line per layer in a chart).

    Returns:
        ``(title, names)`` pairs; a merged group is titled ``"first .. last"``.

    Example:
        >>> names = ["stem"] + [f"stage{s}.{b}.conv{c}" for s in range(2) for b in range(3) for c in range(2)]
        >>> [(title, len(group)) for title, group in group_layer_names(names, max_lines=6)]
        [('stem', 1), ('stage0', 6), ('stage1', 6)]
    """
    if max_lines < 1:
        raise ValueError(f"`max_lines` must be an integer >= 1, got {max_lines!r}")

    def split(members: list[str], depth: int) -> list[tuple[str, list[str]]]:
        by_prefix: dict[str, list[str]] = {}
        for name in members:
            by_prefix.setdefault(".".join(name.split(".")[: depth + 1]), []).append(name)
        out: list[tuple[str, list[str]]] = []
        for prefix, group in by_prefix.items():
            if len(group) <= max_lines:
                out.append((prefix, group))
            elif any(name.count(".") > depth for name in group):
                out.extend(split(group, depth + 1))
            else:
                for start in range(0, len(group), max_lines):
                    out.append((f"{prefix} [{start // max_lines + 1}]", group[start : start + max_lines]))
        return out

    merged: list[tuple[str, str, list[str]]] = []  # (first title, last title, names)
    for title, group in split(list(names), 0):
        if merged and len(merged[-1][2]) + len(group) <= max_lines:
            first, _, members = merged[-1]
            merged[-1] = (first, title, members + group)
        else:
            merged.append((title, title, list(group)))
    return [(first if first == last else f"{first} .. {last}", members) for first, last, members in merged]


def layer_row_spans(num_layers: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` layer ranges, at most ``max_rows`` of them, of nearly equal size.

    Example:
        >>> layer_row_spans(5, 8)
        [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
        >>> layer_row_spans(10, 4)
        [(0, 2), (2, 5), (5, 8), (8, 10)]
    """
    if num_layers < 0:
        raise ValueError(f"`num_layers` must be an integer >= 0, got {num_layers!r}")
    if max_rows < 1:
        raise ValueError(f"`max_rows` must be an integer >= 1, got {max_rows!r}")
    rows = min(num_layers, max_rows)
    bounds = np.linspace(0, num_layers, rows + 1).round().astype(int).tolist()
    return [(bounds[i], bounds[i + 1]) for i in range(rows)]


def _short(name: str, width: int = 40) -> str:
    # The tail of a qualified name tells layers apart, so long names lose their head.
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _span_label(names: Sequence[str], start: int, stop: int) -> str:
    first, last = names[start], names[stop - 1]
    if stop - start == 1:
        return _short(first)
    # The last name drops the components it shares with the first: "enc.3.attn .. 5.mlp (9 layers)".
    a, b = first.split("."), last.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return f"{_short(first, 32)} .. {_short('.'.join(b[common:]), 24)} ({stop - start} layers)"


# --------------------------------------------------------------------------------------------------------------------
# heatmap data
# --------------------------------------------------------------------------------------------------------------------
class HeatmapRows(NamedTuple):
    """Per-row data of a gradient-flow heatmap (see :func:`heatmap_rows`)."""

    values: np.ndarray  # [R, T] float64 norms: NaN = non-finite, < 0 = no gradient
    labels: list[str]
    exploding: np.ndarray  # [R, T] bool
    vanishing: np.ndarray  # [R, T] bool
    spans: list[tuple[int, int]]


def _as_flags(flags: np.ndarray | None, shape: tuple[int, ...], arg: str) -> np.ndarray:
    if flags is None:
        return np.zeros(shape, dtype=bool)
    out = np.asarray(flags, dtype=bool)
    if out.shape != shape:
        raise ValueError(f"`{arg}` must have the shape of `norms` {shape}, got {out.shape}")
    return out


def heatmap_rows(
    norms: np.ndarray,
    layer_names: Sequence[str],
    exploding: np.ndarray | None = None,
    vanishing: np.ndarray | None = None,
    max_rows: int = 64,
    reduce: str = "max",
) -> HeatmapRows:
    """Aggregate a ``[layers, steps]`` norm matrix into at most ``max_rows`` rows of consecutive layers.

    Args:
        norms: ``[L, T]`` per-layer gradient norms; NaN/inf = non-finite gradient, a negative value = no gradient.
        layer_names: the ``L`` layer names in definition order.
        exploding: optional ``[L, T]`` flags; a row is flagged when any of its layers is.
        vanishing: optional ``[L, T]`` flags, aggregated the same way.
        max_rows: the most rows; with more layers, consecutive layers share a row labelled
            ``"first .. last (n layers)"``.
        reduce: how a row combines its layers: ``"max"`` (spikes stay visible) or ``"rms"``.

    Example:
        >>> rows = heatmap_rows(np.ones((500, 3)), [f"l{i}" for i in range(500)], max_rows=64)
        >>> rows.values.shape, rows.labels[0]
        ((64, 3), 'l0 .. l7 (8 layers)')
    """
    if reduce not in ("max", "rms"):
        raise ValueError(f"`reduce` must be one of 'max', 'rms', got {reduce!r}")
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"`norms` must be a non-empty [layers, steps] matrix, got shape {values.shape}")
    if len(layer_names) != values.shape[0]:
        raise ValueError(f"`layer_names` has {len(layer_names)} names for {values.shape[0]} rows of `norms`")
    exp = _as_flags(exploding, values.shape, "exploding")
    van = _as_flags(vanishing, values.shape, "vanishing")
    spans = layer_row_spans(values.shape[0], max_rows)
    starts = np.array([start for start, _ in spans])

    nonfinite = ~np.isfinite(values)
    present = (values >= 0) & ~nonfinite
    if reduce == "max":
        agg = np.maximum.reduceat(np.where(present, values, _ABSENT), starts, axis=0)
    else:
        sq = np.add.reduceat(np.where(present, values * values, 0.0), starts, axis=0)
        count = np.add.reduceat(present.astype(np.int64), starts, axis=0)
        agg = np.where(count > 0, np.sqrt(sq / np.maximum(count, 1)), _ABSENT)
    agg[np.logical_or.reduceat(nonfinite, starts, axis=0)] = np.nan
    return HeatmapRows(
        values=agg,
        labels=[_span_label(layer_names, start, stop) for start, stop in spans],
        exploding=np.logical_or.reduceat(exp, starts, axis=0),
        vanishing=np.logical_or.reduceat(van, starts, axis=0),
        spans=spans,
    )


# --------------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------------
_DPI = 100
_WIDTH_IN = 10.0
_EXPLODING_COLOR = "red"
_VANISHING_COLOR = "deepskyblue"
_NONFINITE_COLOR = "magenta"
_ZERO_COLOR = "black"
_ABSENT_COLOR = "0.85"


def _figure(width: float, height: float, dpi: int) -> tuple[Any, Any]:
    # The object API with an explicit Agg canvas renders off-screen without switching the process-wide pyplot backend
    # (which would break a user's notebook or GUI session).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def _to_rgb(fig: Any, canvas: Any) -> np.ndarray:
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def _text_inches(labels: Sequence[str], font: float) -> float:
    # DejaVu Sans averages about 0.6 em per character; a slight overestimate only widens the margin.
    return max((len(label) for label in labels), default=0) * font * 0.6 / 72


def _step_ticks(steps: Sequence[int], max_ticks: int = 8) -> tuple[list[int], list[str]]:
    # Round step numbers (0, 500, 1000, ...) read better than evenly spaced columns; each lands on the nearest
    # column and is labelled with that column's real step.
    from matplotlib.ticker import MaxNLocator

    arr = np.asarray(steps, dtype=np.int64)
    if arr.size == 1 or arr[-1] <= arr[0]:
        return [0], [str(int(arr[0]))]
    nice = MaxNLocator(nbins=max_ticks, integer=True).tick_values(int(arr[0]), int(arr[-1]))
    nice = nice[(nice >= arr[0]) & (nice <= arr[-1])]
    positions = sorted({int(np.abs(arr - value).argmin()) for value in nice})
    return positions, [str(int(arr[p])) for p in positions]


def render_heatmap(
    norms: np.ndarray,
    layer_names: Sequence[str],
    steps: Sequence[int],
    exploding: np.ndarray | None = None,
    vanishing: np.ndarray | None = None,
    *,
    max_rows: int = 64,
    reduce: str = "max",
    title: str | None = None,
    dpi: int = _DPI,
) -> np.ndarray:
    """Draw the gradient-flow heatmap: ``log10`` per-layer gradient norm over the logged steps.

    Rows are layers in definition order (grouped as in :func:`heatmap_rows` when there are more than ``max_rows``),
    columns are logged steps labelled with their step numbers. Exploding layers get a red ``▲``, vanishing layers a
    blue ``▼``; non-finite norms are magenta, zero norms black, and steps without a gradient light grey.

    Args:
        norms: ``[L, T]`` per-layer norms (NaN/inf = non-finite, negative = no gradient).
        layer_names: the ``L`` layer names.
        steps: the ``T`` step numbers of the columns.
        exploding: optional ``[L, T]`` flags.
        vanishing: optional ``[L, T]`` flags.
        max_rows: the most rows drawn.
        reduce: ``"max"`` or ``"rms"``, how grouped layers combine.
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_heatmap(np.random.rand(4, 6) + 0.1, ["a", "b", "c", "d"], list(range(0, 60, 10)))
        >>> img.dtype, img.shape[2]
        (dtype('uint8'), 3)
    """
    rows = heatmap_rows(norms, layer_names, exploding, vanishing, max_rows=max_rows, reduce=reduce)
    num_rows, num_cols = rows.values.shape
    if len(steps) != num_cols:
        raise ValueError(f"`steps` has {len(steps)} entries for {num_cols} columns of `norms`")

    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    values = rows.values
    nonfinite = np.isnan(values)
    absent = values < 0
    zero = values == 0
    positive = ~nonfinite & ~absent & ~zero
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(np.where(positive, values, 1.0))
    if positive.any():
        vmin, vmax = float(logv[positive].min()), float(logv[positive].max())
    else:
        vmin, vmax = -1.0, 1.0
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    # Special cells reuse the colormap's out-of-range colours so one imshow draws everything.
    display = np.where(positive, logv, np.nan)
    display[zero] = vmin - 1.0
    display[nonfinite] = vmax + 1.0
    cmap = colormaps["viridis"].with_extremes(under=_ZERO_COLOR, over=_NONFINITE_COLOR, bad=_ABSENT_COLOR)

    dense = num_rows > 64
    font = 5 if dense else 7
    # Fixed margins (in inches) instead of tight_layout: measuring every label doubles the drawing time.
    left = min(_text_inches(rows.labels, font) + 0.2, 0.45 * _WIDTH_IN)
    right, top, bottom = 1.0, 0.4, 0.75
    height = float(np.clip(top + bottom + num_rows * (0.1 if dense else 0.16), 3.0, 24.0))
    fig, canvas = _figure(_WIDTH_IN, height, dpi)
    ax_w, ax_h = _WIDTH_IN - left - right, height - top - bottom
    ax = fig.add_axes((left / _WIDTH_IN, bottom / height, ax_w / _WIDTH_IN, ax_h / height))
    cax = fig.add_axes(((_WIDTH_IN - right + 0.1) / _WIDTH_IN, bottom / height, 0.14 / _WIDTH_IN, ax_h / height))
    image = ax.imshow(
        np.ma.masked_invalid(display), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax
    )
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    colorbar = fig.colorbar(
        image, cax=cax, extend=extend[(bool(zero.any()), bool(nonfinite.any()))], extendfrac=min(0.05, 0.3 / ax_h)
    )
    colorbar.set_label("log10 ||grad||", fontsize=font + 1)
    colorbar.ax.tick_params(labelsize=font)

    ax.set_yticks(range(num_rows), rows.labels, fontsize=font)
    positions, labels = _step_ticks(steps)
    ax.set_xticks(positions, labels, fontsize=font)
    ax.set_xlabel("step", fontsize=font + 1, labelpad=1)
    ax.set_title(title or "gradient flow: log10 ||grad|| per layer", fontsize=font + 2, loc="left")

    # Markers shrink with the cells so that 200 columns of 64 rows stay legible.
    size = float(np.clip(0.8 * 72 * min(ax_w / num_cols, ax_h / num_rows), 2.0, 9.0)) ** 2
    handles: list[Any] = []
    for flags, marker, color, label in (
        (rows.exploding, "^", _EXPLODING_COLOR, "exploding"),
        (rows.vanishing, "v", _VANISHING_COLOR, "vanishing"),
    ):
        r, c = np.nonzero(flags)
        if r.size:
            ax.scatter(c, r, s=size, marker=marker, c=color, edgecolors="white", linewidths=0.3, zorder=3)
            handles.append(Line2D([], [], ls="", marker=marker, color=color, markeredgecolor="white", label=label))
    for mask, color, label in (
        (nonfinite, _NONFINITE_COLOR, "non-finite"),
        (zero, _ZERO_COLOR, "zero"),
        (absent, _ABSENT_COLOR, "no gradient"),
    ):
        if mask.any():
            handles.append(Patch(facecolor=color, edgecolor="0.5", label=label))
    ax.set_xlim(-0.5, num_cols - 0.5)
    ax.set_ylim(num_rows - 0.5, -0.5)
    if handles:
        ax.legend(
            handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), fontsize=font,
            frameon=False, borderaxespad=0.1, handlelength=1.2, columnspacing=1.0,
        )
    return _to_rgb(fig, canvas)


def render_bars(
    norms: np.ndarray,
    layer_names: Sequence[str],
    *,
    low: float | None = None,
    high: float | None = None,
    exploding: np.ndarray | None = None,
    vanishing: np.ndarray | None = None,
    max_bars: int = 64,
    title: str | None = None,
    dpi: int = _DPI,
) -> np.ndarray:
    """Draw the classic gradient-flow bar chart: one bar per layer, the latest gradient norm on a log axis.

    Args:
        norms: ``[L]`` per-layer norms (NaN/inf = non-finite, drawn to the top in magenta; zero or negative = no bar).
        layer_names: the ``L`` layer names.
        low: the vanishing floor, drawn as a blue band below it.
        high: the exploding ceiling, drawn as a red band above it.
        exploding: optional ``[L]`` flags, bars drawn red.
        vanishing: optional ``[L]`` flags, bars drawn blue.
        max_bars: the most bars; with more layers, consecutive layers share a bar (their largest norm).
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_bars(np.array([1e-3, 0.5, 2.0]), ["emb", "body", "head"], low=1e-4, high=10.0)
        >>> img.shape[2]
        3
    """
    for arg, value in (("low", low), ("high", high)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{arg}` must be None or a finite float > 0, got {value!r}")
    column = np.asarray(norms, dtype=np.float64).reshape(-1, 1)
    exp = None if exploding is None else np.asarray(exploding, dtype=bool).reshape(-1, 1)
    van = None if vanishing is None else np.asarray(vanishing, dtype=bool).reshape(-1, 1)
    rows = heatmap_rows(column, layer_names, exp, van, max_rows=max_bars, reduce="max")
    values = rows.values[:, 0]
    nonfinite = np.isnan(values)
    positive = ~nonfinite & (values > 0)

    finite_pool = [v for v in (low, high) if v is not None] + values[positive].tolist()
    lo = min(finite_pool) / 3.0 if finite_pool else 1e-8
    hi = max(finite_pool) * 3.0 if finite_pool else 1.0

    n = len(values)
    font = 7 if n <= 32 else 5
    left, right, top, bottom = 0.75, 0.2, 0.4, _text_inches(rows.labels, font) + 0.15
    height = 3.0 + top + bottom
    fig, canvas = _figure(_WIDTH_IN, height, dpi)
    ax = fig.add_axes((left / _WIDTH_IN, bottom / height, 1 - (left + right) / _WIDTH_IN, 3.0 / height))
    ax.set_yscale("log")
    colors = np.full(n, "0.45", dtype=object)
    colors[rows.vanishing[:, 0]] = _VANISHING_COLOR
    colors[rows.exploding[:, 0]] = _EXPLODING_COLOR
    colors[nonfinite] = _NONFINITE_COLOR
    # Bars start at the bottom of the log axis (zero has no place on it) and end at the norm.
    tops = np.where(positive, values, np.where(nonfinite, hi, lo))
    ax.bar(np.arange(n), tops - lo, width=0.8, color=colors.tolist(), bottom=lo)
    if low is not None:
        ax.axhspan(lo, low, color=_VANISHING_COLOR, alpha=0.12, lw=0)
        ax.axhline(low, color=_VANISHING_COLOR, ls="--", lw=0.8, label=f"vanishing floor {low:.3g}")
    if high is not None:
        ax.axhspan(high, hi, color=_EXPLODING_COLOR, alpha=0.10, lw=0)
        ax.axhline(high, color=_EXPLODING_COLOR, ls="--", lw=0.8, label=f"exploding ceiling {high:.3g}")
    if low is not None or high is not None:
        ax.legend(fontsize=font, loc="upper right", frameon=False)
    ax.set_ylim(lo, hi)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(range(n), rows.labels, rotation=90, fontsize=font)
    ax.tick_params(axis="y", labelsize=font + 1)
    ax.set_ylabel("||grad||", fontsize=font + 2)
    ax.set_title(title or "gradient flow: latest ||grad|| per layer", fontsize=font + 3, loc="left")
    ax.grid(axis="y", which="major", lw=0.3, alpha=0.5)
    return _to_rgb(fig, canvas)


# --------------------------------------------------------------------------------------------------------------------
# gradient sampling for histograms
# --------------------------------------------------------------------------------------------------------------------
# A multiplicative-hash stride: i * P mod n visits distinct, well scattered indices whenever gcd(P, n) == 1, so a
# sample needs no random generator (drawing from the global one would change the training's random stream).
_HASH_STRIDE = 2654435761


def _coprime_stride(n: int) -> int:
    stride = _HASH_STRIDE % n or 1
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def sample_gradients(
    named_grads: Sequence[tuple[str, torch.Tensor | None]],
    blocks: Callable[[str], str],
    max_per_block: int = 4096,
) -> dict[str, torch.Tensor]:
    """Sample gradient values per block on their device, for histograms.

    Each block gets at most ``max_per_block`` values, shared among its tensors in proportion to their sizes (a
    tensor smaller than its share is taken whole). Indices are a fixed, scattered stride (no random generator is
    touched, no host-device synchronisation happens); the result stays on the device, cast to float32.

    Args:
        named_grads: ``(name, grad)`` pairs; ``None`` gradients are skipped. Pass local shards of distributed tensors.
        blocks: maps a name to its block (e.g. ``lambda n: block_name(n, 1)``).
        max_per_block: the most values kept per block.

    Returns:
        ``{block: 1-d float32 tensor}`` in first-seen block order.

    Example:
        >>> import torch
        >>> grads = [("enc.0.weight", torch.randn(64, 64)), ("enc.0.bias", torch.randn(64)),
        ...          ("head.weight", torch.ones(3))]
        >>> samples = sample_gradients(grads, lambda n: n.split(".")[0], max_per_block=100)
        >>> {block: tuple(t.shape) for block, t in samples.items()}
        {'enc': (99,), 'head': (3,)}
    """
    import torch

    if max_per_block < 1:
        raise ValueError(f"`max_per_block` must be an integer >= 1, got {max_per_block!r}")
    per_block: dict[str, list[torch.Tensor]] = {}
    for name, grad in named_grads:
        if grad is not None and grad.numel() > 0:
            per_block.setdefault(blocks(name), []).append(grad)

    out: dict[str, torch.Tensor] = {}
    for block, grads in per_block.items():
        total = sum(g.numel() for g in grads)
        device = grads[0].device
        largest = max(range(len(grads)), key=lambda i: grads[i].numel())
        pieces = []
        for i, grad in enumerate(grads):
            n = grad.numel()
            # Shapes are host metadata: sizing the sample costs no synchronisation.
            k = n if total <= max_per_block else (max_per_block * n) // total
            if k == 0 and i == largest:
                k = 1
            if k == 0:
                continue
            if k < n:
                index = torch.arange(k, device=grad.device, dtype=torch.int64).mul_(_coprime_stride(n)).remainder_(n)
                # take() indexes in row-major order without first copying a non-contiguous gradient.
                flat = torch.take(grad.detach(), index)
            else:
                flat = grad.detach().reshape(-1)
            pieces.append(flat.to(device=device, dtype=torch.float32, non_blocking=True))
        out[block] = torch.cat(pieces)
    return out


# --------------------------------------------------------------------------------------------------------------------
# bounded per-layer history
# --------------------------------------------------------------------------------------------------------------------
def _merge_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # The larger norm survives so that a spike is never averaged away; a non-finite value (NaN) must survive too,
    # which plain np.fmax would drop and np.maximum would spread from absent entries.
    out = np.fmax(a, b)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


class _LayerHistory:
    """The last ``capacity`` heatmap columns of one optimizer's layers.

    When full, neighbouring columns are merged pairwise (max of norms, OR of flags) and later steps are folded into
    columns spanning twice as many logged steps, so the heatmap always covers the whole run at a bounded cost.
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.num_layers = num_layers
        self.capacity = capacity
        self.size = 0
        self.stride = 1
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.norms = np.zeros((num_layers, capacity), dtype=np.float32)
        self.exploding = np.zeros((num_layers, capacity), dtype=bool)
        self.vanishing = np.zeros((num_layers, capacity), dtype=bool)
        self._reset_pending()

    def _reset_pending(self) -> None:
        self.pending_count = 0
        self.pending_step = 0
        self.pending_norms = np.full(self.num_layers, _ABSENT, dtype=np.float32)
        self.pending_exploding = np.zeros(self.num_layers, dtype=bool)
        self.pending_vanishing = np.zeros(self.num_layers, dtype=bool)

    def append(self, step: int, norms: np.ndarray, exploding: np.ndarray, vanishing: np.ndarray) -> None:
        self.pending_norms = _merge_max(self.pending_norms, norms.astype(np.float32))
        self.pending_exploding |= exploding
        self.pending_vanishing |= vanishing
        self.pending_step = step
        self.pending_count += 1
        if self.pending_count >= self.stride:
            self._commit()

    def _commit(self) -> None:
        if self.size == self.capacity:
            half = self.size // 2
            odd = self.size % 2 == 1
            a, b = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
            leftover = (self.norms[:, 2 * half].copy(), self.exploding[:, 2 * half].copy(),
                        self.vanishing[:, 2 * half].copy()) if odd else None
            self.norms[:, :half] = _merge_max(self.norms[:, a], self.norms[:, b])
            self.exploding[:, :half] = self.exploding[:, a] | self.exploding[:, b]
            self.vanishing[:, :half] = self.vanishing[:, a] | self.vanishing[:, b]
            self.steps[:half] = self.steps[b]
            self.size = half
            self.stride *= 2
            if leftover is not None:
                # The odd column left over is older than the pending one; together they span the new stride.
                self.pending_norms = _merge_max(leftover[0], self.pending_norms)
                self.pending_exploding |= leftover[1]
                self.pending_vanishing |= leftover[2]
                self.pending_count += self.stride // 2
            if self.pending_count < self.stride:
                return
        self.steps[self.size] = self.pending_step
        self.norms[:, self.size] = self.pending_norms
        self.exploding[:, self.size] = self.pending_exploding
        self.vanishing[:, self.size] = self.pending_vanishing
        self.size += 1
        self._reset_pending()

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(steps [T], norms [L, T], exploding [L, T], vanishing [L, T])``, a partly filled column included."""
        n = self.size
        steps, norms = self.steps[:n], self.norms[:, :n]
        exploding, vanishing = self.exploding[:, :n], self.vanishing[:, :n]
        if self.pending_count:
            steps = np.append(steps, self.pending_step)
            norms = np.concatenate([norms, self.pending_norms[:, None]], axis=1)
            exploding = np.concatenate([exploding, self.pending_exploding[:, None]], axis=1)
            vanishing = np.concatenate([vanishing, self.pending_vanishing[:, None]], axis=1)
        return steps, norms, exploding, vanishing

    def state_dict(self) -> dict[str, Any]:
        import torch

        n = self.size
        return {
            "size": n,
            "stride": self.stride,
            "steps": torch.from_numpy(self.steps[:n].copy()),
            "norms": torch.from_numpy(self.norms[:, :n].copy()),
            "exploding": torch.from_numpy(self.exploding[:, :n].copy()),
            "vanishing": torch.from_numpy(self.vanishing[:, :n].copy()),
            "pending_count": self.pending_count,
            "pending_step": self.pending_step,
            "pending_norms": torch.from_numpy(self.pending_norms.copy()),
            "pending_exploding": torch.from_numpy(self.pending_exploding.copy()),
            "pending_vanishing": torch.from_numpy(self.pending_vanishing.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = state["norms"].numpy()
        if norms.shape[0] != self.num_layers:
            raise ValueError(f"history has {norms.shape[0]} layers, expected {self.num_layers}")
        self.size, self.stride = 0, int(state["stride"])
        self._reset_pending()
        steps = state["steps"].numpy()
        # A smaller capacity than when saved keeps the newest columns.
        keep = min(len(steps), self.capacity)
        n0 = len(steps) - keep
        self.size = keep
        self.steps[:keep] = steps[n0:]
        self.norms[:, :keep] = norms[:, n0:]
        self.exploding[:, :keep] = state["exploding"].numpy()[:, n0:]
        self.vanishing[:, :keep] = state["vanishing"].numpy()[:, n0:]
        self.pending_count = int(state["pending_count"])
        self.pending_step = int(state["pending_step"])
        self.pending_norms = state["pending_norms"].numpy().astype(np.float32).copy()
        self.pending_exploding = state["pending_exploding"].numpy().astype(bool).copy()
        self.pending_vanishing = state["pending_vanishing"].numpy().astype(bool).copy()


# --------------------------------------------------------------------------------------------------------------------
# the board
# --------------------------------------------------------------------------------------------------------------------
def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _plain(value: Any) -> Any:
    # Checkpoints load with weights_only=True: numpy scalars must become Python ones.
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class GradGuardBoard:
    """Writes GradGuard's TensorBoard dashboard: custom-scalar layout, scalars, gradient-flow images, histograms and
    text.

    It is called on logging steps only, with host values (numpy arrays and Python numbers). Tags follow
    ``gradguard/...``; with several optimizers, per-optimizer tags get ``opt{i}/`` after ``gradguard/`` (see
    :meth:`tag`) and image tags get a ``/opt{i}`` suffix, while layer, regularizer and saturation tags are shared.
    Scalars go to the writer as one multi-value event per step, so thousands of per-layer norms stay cheap.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (any object with the same ``add_*`` methods works).
        layer_names: for each optimizer index, its layer names in definition order.
        optimizer_names: display names of the optimizers, one per index.
        image_every_n_steps: draw the gradient-flow images when the step crosses a multiple of this; ``None`` = only
            at :meth:`close_run`.
        histogram_every_n_steps: write gradient histograms when the step crosses a multiple of this; ``None`` = never.
        max_heatmap_rows: the most heatmap rows (and bars); more layers are grouped into consecutive ranges.
        history: the most heatmap columns kept per optimizer; older columns are merged pairwise beyond it.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> writer = SummaryWriter(tempfile.mkdtemp())
        >>> board = GradGuardBoard(writer, {0: ["encoder.0", "encoder.1", "head"]}, ["Adam"])
        >>> board.write_layout()
        >>> board.write_scalars(10, {"total_norm": 1.5, "gradguard/clip_coef": 1.0})
        >>> board.write_layer_norms(10, 0, np.array([0.5, 0.2, 1.0]), np.zeros(3, bool), np.zeros(3, bool))
        >>> board.should_write_images(500)
        True
        >>> board.close_run(10)
        >>> writer.close()
    """

    def __init__(
        self,
        writer: SummaryWriter,
        layer_names: dict[int, list[str]],
        optimizer_names: list[str],
        image_every_n_steps: int | None = 500,
        histogram_every_n_steps: int | None = None,
        max_heatmap_rows: int = 64,
        history: int = 2000,
    ) -> None:
        if writer is None or not hasattr(writer, "add_scalar"):
            raise ValueError(f"`writer` must be a SummaryWriter-like object with `add_scalar`, got {writer!r}")
        if not optimizer_names:
            raise ValueError("`optimizer_names` must name at least one optimizer")
        if not isinstance(layer_names, dict) or sorted(layer_names) != list(range(len(optimizer_names))):
            raise ValueError(
                f"`layer_names` must map every optimizer index 0..{len(optimizer_names) - 1} to its layer names, "
                f"got keys {sorted(layer_names) if isinstance(layer_names, dict) else layer_names!r}"
            )
        for idx, names in layer_names.items():
            if len(set(names)) != len(names):
                raise ValueError(f"`layer_names[{idx}]` must not repeat a name")
        for arg, value in (("image_every_n_steps", image_every_n_steps),
                           ("histogram_every_n_steps", histogram_every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{arg}` must be None or an integer >= 1, got {value!r}")
        if not isinstance(max_heatmap_rows, int) or max_heatmap_rows < 2:
            raise ValueError(f"`max_heatmap_rows` must be an integer >= 2, got {max_heatmap_rows!r}")
        if not isinstance(history, int) or history < 2:
            raise ValueError(f"`history` must be an integer >= 2, got {history!r}")

        self.writer = writer
        self.layer_names = {idx: list(names) for idx, names in layer_names.items()}
        self.optimizer_names = list(optimizer_names)
        self.image_every_n_steps = image_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.max_heatmap_rows = max_heatmap_rows
        self.history = history

        self._layer_tags = {
            idx: [f"{_PREFIX}layer/{name}" for name in names] for idx, names in self.layer_names.items()
        }
        self._histories = {idx: _LayerHistory(len(names), history) for idx, names in self.layer_names.items()}
        self._latest: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._bands: dict[int, tuple[float | None, float | None]] = {}
        self._events: list[dict[str, Any]] = []
        self._last_image_step: int | None = None
        self._last_histogram_step: int | None = None
        self._layout_written = False
        self._config_written = False

    # ---------------------------------------------------------------------------------------------------- naming
    @property
    def multi_optimizer(self) -> bool:
        """Whether per-optimizer tags carry an ``opt{i}`` component."""
        return len(self.optimizer_names) > 1

    def tag(self, name: str, opt_idx: int = 0) -> str:
        """The full tag of a per-optimizer scalar, e.g. ``tag("total_norm", 1) -> "gradguard/opt1/total_norm"``.

        With a single optimizer no ``opt{i}`` component is inserted.
        """
        return f"{_PREFIX}opt{opt_idx}/{name}" if self.multi_optimizer else f"{_PREFIX}{name}"

    def _image_tag(self, name: str, opt_idx: int) -> str:
        return f"{_PREFIX}{name}/opt{opt_idx}" if self.multi_optimizer else f"{_PREFIX}{name}"

    def _opt_label(self, opt_idx: int) -> str:
        return f"opt{opt_idx}: {self.optimizer_names[opt_idx]}"

    # ---------------------------------------------------------------------------------------------------- layout
    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars layout written by :meth:`write_layout` (tags are anchored regexes)."""

        def exact(*tags: str) -> list[str]:
            return [f"^{re.escape(tag)}$" for tag in tags]

        main: dict[str, list[Any]] = {}
        for idx in range(len(self.optimizer_names)):
            suffix = f" ({self._opt_label(idx)})" if self.multi_optimizer else ""
            total, total_max, total_min, threshold, ema_mean, ema_lower, ema_upper, clip_coef, lr_scale, lr, events = (
                self.tag(name, idx) for name in ("total_norm", "total_norm_max", "total_norm_min", "clip_threshold",
                                                 "ema_mean", "ema_lower", "ema_upper", "clip_coef", "lr_scale", "lr",
                                                 "events/")
            )
            main[f"total norm{suffix}"] = ["Multiline", exact(total, total_max, total_min, threshold)]
            # Margin series name exact tags, not regexes.
            main[f"EMA band{suffix}"] = ["Margin", [ema_mean, ema_lower, ema_upper]]
            main[f"clip coef{suffix}"] = ["Multiline", exact(clip_coef)]
            main[f"lr scale{suffix}"] = ["Multiline", exact(lr_scale)]
            main[f"learning rate{suffix}"] = ["Multiline", exact(lr)]
            main[f"events{suffix}"] = ["Multiline", [f"^{re.escape(events)}.*"]]
        main["regularizers"] = ["Multiline", [f"^{re.escape(_PREFIX + 'reg/')}.*"]]
        main["regularizer strength"] = ["Multiline", [f"^{re.escape(_PREFIX + 'reg_strength/')}.*"]]
        main["saturation"] = ["Multiline", [f"^{re.escape(_PREFIX + 'saturation/')}.*"]]

        layers: dict[str, list[Any]] = {}
        for idx, names in self.layer_names.items():
            for title, group in group_layer_names(names):
                title = f"{self._opt_label(idx)} · {title}" if self.multi_optimizer else title
                unique, n = title, 2
                while unique in layers:
                    unique, n = f"{title} ({n})", n + 1
                layers[unique] = ["Multiline", exact(*(f"{_PREFIX}layer/{name}" for name in group))]
        return {"GradGuard": main, "GradGuard layers": layers}

    def write_layout(self) -> None:
        """Write the "GradGuard" custom-scalars dashboard; once per writer, later calls do nothing."""
        if self._layout_written or self.writer in _LAYOUT_WRITTEN:
            self._layout_written = True
            return
        self.writer.add_custom_scalars(self.layout())
        self._layout_written = True
        # A writer that cannot be weakly referenced is guarded by this board's flag alone.
        with contextlib.suppress(TypeError):
            _LAYOUT_WRITTEN.add(self.writer)

    # ---------------------------------------------------------------------------------------------------- scalars
    def _add_scalars(self, step: int, items: Sequence[tuple[str, float]]) -> None:
        if not items:
            return
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if _is_torch_writer(self.writer) and file_writer is not None:
            # One event holding every value costs ~0.1% of one add_scalar call per value (measured with 500
            # layers) and reads back identically; a plain float scalar is what add_scalar writes too.
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in items])
            file_writer().add_summary(summary, step)
        else:
            for tag, value in items:
                self.writer.add_scalar(tag, value, step)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Write scalars; a key without the ``gradguard/`` prefix gets it (use :meth:`tag` for per-optimizer names).

        Example: ``board.write_scalars(step, {board.tag("total_norm", i): 1.3, "events/exploding": 2})``.
        """
        items = [(key if key.startswith(_PREFIX) else _PREFIX + key, float(value)) for key, value in scalars.items()]
        self._add_scalars(int(step), items)

    def write_layer_norms(
        self,
        step: int,
        opt_idx: int,
        norms: np.ndarray,
        exploding: np.ndarray,
        vanishing: np.ndarray,
        present: np.ndarray | None = None,
    ) -> None:
        """Write ``gradguard/layer/<name>`` for each layer of one optimizer and add a heatmap column.

        Args:
            step: the global step.
            opt_idx: the optimizer index.
            norms: ``[L]`` per-layer gradient norms, in the order of ``layer_names[opt_idx]``.
            exploding: ``[L]`` flags of layers exploding at this step.
            vanishing: ``[L]`` flags of layers vanishing at this step.
            present: optional ``[L]`` flags of layers that had a gradient; others are not written and show as "no
                gradient" in the heatmap.
        """
        names = self._names(opt_idx)
        num = len(names)
        norms = np.asarray(norms, dtype=np.float64).reshape(-1)
        exploding = np.asarray(exploding, dtype=bool).reshape(-1)
        vanishing = np.asarray(vanishing, dtype=bool).reshape(-1)
        mask = np.ones(num, dtype=bool) if present is None else np.asarray(present, dtype=bool).reshape(-1)
        for arg, arr in (("norms", norms), ("exploding", exploding), ("vanishing", vanishing), ("present", mask)):
            if arr.shape != (num,):
                raise ValueError(f"`{arg}` must have {num} entries (the layers of optimizer {opt_idx}), got {arr.size}")
        tags = self._layer_tags[opt_idx]
        self._add_scalars(int(step), [(tags[i], float(norms[i])) for i in np.flatnonzero(mask).tolist()])
        column = np.where(mask, norms, _ABSENT)
        self._histories[opt_idx].append(int(step), column, exploding & mask, vanishing & mask)
        self._latest[opt_idx] = (int(step), column, exploding & mask, vanishing & mask)

    def _names(self, opt_idx: int) -> list[str]:
        if opt_idx not in self.layer_names:
            raise ValueError(f"`opt_idx` must be one of {sorted(self.layer_names)}, got {opt_idx!r}")
        return self.layer_names[opt_idx]

    # ---------------------------------------------------------------------------------------------------- images
    def set_bands(self, opt_idx: int, low: float | None, high: float | None) -> None:
        """Set the vanishing floor and exploding ceiling drawn on the bar chart of optimizer ``opt_idx``."""
        self._names(opt_idx)
        for arg, value in (("low", low), ("high", high)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{arg}` must be None or a finite float > 0, got {value!r}")
        self._bands[opt_idx] = (None if low is None else float(low), None if high is None else float(high))

    @staticmethod
    def _crossed(step: int, every: int | None, last: int | None) -> bool:
        if every is None:
            return False
        # "Crossed a multiple since the last write" rather than "step % every == 0": logging steps need not land on
        # multiples of the image interval.
        return last is None or step // every > last // every

    def should_write_images(self, step: int) -> bool:
        """Whether ``step`` crossed a multiple of ``image_every_n_steps`` since the images were last drawn."""
        return self._crossed(step, self.image_every_n_steps, self._last_image_step)

    def should_write_histograms(self, step: int) -> bool:
        """Whether ``step`` crossed a multiple of ``histogram_every_n_steps`` since histograms were last written."""
        return self._crossed(step, self.histogram_every_n_steps, self._last_histogram_step)

    def heatmap_image(self, opt_idx: int = 0) -> np.ndarray | None:
        """The current gradient-flow heatmap of one optimizer, or ``None`` before any layer norms were written."""
        names = self._names(opt_idx)
        steps, norms, exploding, vanishing = self._histories[opt_idx].columns()
        if not names or steps.size == 0:
            return None
        title = "gradient flow: log10 ||grad|| per layer"
        if self.multi_optimizer:
            title += f" ({self._opt_label(opt_idx)})"
        return render_heatmap(
            norms, names, steps.tolist(), exploding, vanishing, max_rows=self.max_heatmap_rows, title=title
        )

    def bars_image(self, opt_idx: int = 0) -> np.ndarray | None:
        """The latest per-layer bar chart of one optimizer, or ``None`` before any layer norms were written."""
        names = self._names(opt_idx)
        if not names or opt_idx not in self._latest:
            return None
        step, norms, exploding, vanishing = self._latest[opt_idx]
        low, high = self._bands.get(opt_idx, (None, None))
        title = f"gradient flow at step {step}"
        if self.multi_optimizer:
            title += f" ({self._opt_label(opt_idx)})"
        return render_bars(
            norms, names, low=low, high=high, exploding=exploding, vanishing=vanishing,
            max_bars=self.max_heatmap_rows, title=title,
        )

    def write_images(self, step: int) -> None:
        """Draw ``gradguard/gradient_flow`` (heatmap) and ``gradguard/gradient_flow_bars`` (latest norms)."""
        for idx in self.layer_names:
            heatmap = self.heatmap_image(idx)
            if heatmap is not None:
                self.writer.add_image(self._image_tag("gradient_flow", idx), heatmap, step, dataformats="HWC")
            bars = self.bars_image(idx)
            if bars is not None:
                self.writer.add_image(self._image_tag("gradient_flow_bars", idx), bars, step, dataformats="HWC")
        self._last_image_step = int(step)

    # ---------------------------------------------------------------------------------------------------- others
    def write_histograms(self, step: int, samples: dict[str, torch.Tensor]) -> None:
        """Write ``gradguard/grad_hist/<block>`` from small gradient samples (see :func:`sample_gradients`)."""
        for block, values in samples.items():
            data = values.detach().float().cpu().numpy().reshape(-1) if hasattr(values, "detach") else values
            data = np.asarray(data, dtype=np.float64).reshape(-1)
            # numpy cannot bin inf or NaN; those are counted by the non-finite events instead.
            data = data[np.isfinite(data)]
            if data.size:
                self.writer.add_histogram(f"{_PREFIX}grad_hist/{block}", data, step)
        self._last_histogram_step = int(step)

    def write_events(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Append event rows to the ``gradguard/events_log`` markdown table (the last 200 rows are shown).

        Each row has the keys ``step``, ``kind``, ``layer``, ``value``, ``action`` (and ``opt``, the optimizer
        index, shown as a column when there are several optimizers). Nothing is written when ``rows`` is empty.
        """
        if not rows:
            return
        for row in rows:
            self._events.append({key: _plain(row.get(key)) for key in (*_EVENT_COLUMNS, "opt")})
        del self._events[:-_MAX_EVENT_ROWS]
        header = list(_EVENT_COLUMNS)
        if self.multi_optimizer:
            header.insert(1, "optimizer")
        table_rows = []
        for event in self._events:
            cells = [event[key] for key in _EVENT_COLUMNS]
            if self.multi_optimizer:
                opt = event["opt"]
                cells.insert(1, self._opt_label(opt) if isinstance(opt, int) and opt in self.layer_names else opt)
            table_rows.append(cells)
        self.writer.add_text(f"{_PREFIX}events_log", _md_table(header, table_rows), step)

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``gradguard/config``, a markdown table of the (flattened) configuration; once per board."""
        if self._config_written:
            return
        self.writer.add_text(f"{_PREFIX}config", _md_table(["setting", "value"], _flatten(config)), 0)
        self._config_written = True

    def close_run(self, step: int) -> None:
        """Draw the final images (unless already drawn at ``step``) and flush the writer."""
        if self._latest and self._last_image_step != step:
            self.write_images(step)
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            flush()

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The heatmap history, event table and image/histogram schedule (plain values and tensors only)."""
        return {
            "histories": {idx: history.state_dict() for idx, history in self._histories.items()},
            "events": [dict(event) for event in self._events],
            "last_image_step": self._last_image_step,
            "last_histogram_step": self._last_histogram_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; histories of optimizers whose layer count changed are dropped."""
        for idx, history_state in state.get("histories", {}).items():
            idx = int(idx)
            if idx in self._histories and history_state["norms"].shape[0] == len(self.layer_names[idx]):
                self._histories[idx].load_state_dict(history_state)
        self._events = [dict(event) for event in state.get("events", [])][-_MAX_EVENT_ROWS:]
        self._last_image_step = state.get("last_image_step")
        self._last_histogram_step = state.get("last_histogram_step")


def _is_torch_writer(writer: Any) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(writer, SummaryWriter)
