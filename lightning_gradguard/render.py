"""Gradient-flow pictures and the layer grouping behind them: numpy and matplotlib only.

Shared by the TensorBoard board (:mod:`lightning_gradguard.board`) and ``gradguard report --png``
(:mod:`lightning_gradguard.cli`), so that a run's picture looks the same in both places and marks the same thing: the
detectors' events, passed in as flags. Nothing here decides what is exploding or vanishing.

Norm conventions, everywhere below: a NaN or infinite norm is a non-finite gradient, a negative one means "no
gradient at this step" (the layer was not updated), zero is a gradient of exactly zero.

This module imports matplotlib lazily (inside the renderers) and never imports torch or Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "RATIO_BAND",
    "HeatmapRows",
    "block_name",
    "flow_figure",
    "group_layer_names",
    "heatmap_rows",
    "layer_blocks",
    "layer_row_spans",
    "render_bars",
    "render_depth_flow",
    "render_heatmap",
    "render_update_ratio_heatmap",
]

# A norm below zero never comes from a gradient, so it marks "this layer had no gradient at this step" without a
# second array; NaN stays free to mean "non-finite gradient".
ABSENT = -1.0


# --------------------------------------------------------------------------------------------------------------------
# layer grouping
# --------------------------------------------------------------------------------------------------------------------


def _legend_above(ax: Any, handles: list[Any], font: float) -> None:
    """One row of legend entries above the axes, right-aligned: inside them it would cover the data."""
    ax.legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=len(handles),
        fontsize=font,
        frameon=False,
        borderaxespad=0.1,
        handlelength=1.2,
        columnspacing=1.0,
    )


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


def _groups(names: Sequence[str], max_lines: int) -> list[tuple[str, str, list[str]]]:
    """``(first title, last title, names)`` of :func:`group_layer_names`."""

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

    merged: list[tuple[str, str, list[str]]] = []
    for title, group in split(list(names), 0):
        if merged and len(merged[-1][2]) + len(group) <= max_lines:
            first, _, members = merged[-1]
            merged[-1] = (first, title, members + group)
        else:
            merged.append((title, title, list(group)))
    return merged


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
    return [
        (first if first == last else f"{first} .. {last}", members)
        for first, last, members in _groups(names, max_lines)
    ]


def _range_name(first: str, last: str) -> str:
    # "net.0" .. "net.93" -> "net.0..93": the last name drops the components it shares with the first.
    a, b = first.split("."), last.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return f"{first}..{'.'.join(b[common:])}"


def layer_blocks(names: Sequence[str], max_blocks: int = 16) -> list[tuple[str, list[int]]]:
    """Cut the layers into at most ``max_blocks`` blocks of consecutive, related layers (for block summaries).

    The blocks are the groups of :func:`group_layer_names` with the smallest group size that gives at most
    ``max_blocks`` groups, so model blocks stay whole where they can. A block that is one model block is named by its
    prefix (``"layer2"``); a range of several is named ``"first..last"`` with the shared head written once
    (``"net.0..93"``). Names hold only the characters of layer names and ``..``, so they are safe in tags.

    Returns:
        ``(name, layer indices)`` pairs in definition order, covering every layer once.

    Example:
        >>> [(name, len(idx)) for name, idx in layer_blocks([f"net.{i}" for i in range(1500)], max_blocks=16)]
        ... # doctest: +ELLIPSIS
        [('net.0..93', 94), ('net.94..187', 94), ..., ('net.1410..1499', 90)]
        >>> layer_blocks(["stem", "stage0.0", "stage0.1", "stage1.0", "stage1.1", "head"], max_blocks=4)
        [('stem', [0]), ('stage0', [1, 2]), ('stage1', [3, 4]), ('head', [5])]
    """
    if max_blocks < 1:
        raise ValueError(f"`max_blocks` must be an integer >= 1, got {max_blocks!r}")
    if not names:
        return []
    size = max(1, math.ceil(len(names) / max_blocks))
    groups = _groups(names, size)
    while len(groups) > max_blocks:
        size = max(size + 1, math.ceil(size * 1.1))
        groups = _groups(names, size)
    position = {name: i for i, name in enumerate(names)}
    out: list[tuple[str, list[int]]] = []
    seen: set[str] = set()
    for first, last, members in groups:
        name = first if first == last else _range_name(first, last)
        unique, n = name, 2
        while unique in seen:
            unique, n = f"{name}~{n}", n + 1
        seen.add(unique)
        out.append((unique, [position[member] for member in members]))
    return out


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

    values: np.ndarray  # [R, T] float64 norms combined by `reduce`: NaN = non-finite, < 0 = no gradient
    labels: list[str]
    exploding: np.ndarray  # [R, T] bool
    vanishing: np.ndarray  # [R, T] bool
    spans: list[tuple[int, int]]
    low: np.ndarray  # [R, T] the smallest norm of the row's layers that had a gradient (same conventions)

    @property
    def grouped(self) -> bool:
        """Whether some row holds several layers (then ``values`` and ``low`` differ)."""
        return any(stop - start > 1 for start, stop in self.spans)


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
        reduce: how a row combines its layers into ``values``: ``"max"`` (spikes stay visible) or ``"rms"``. The
            smallest norm of each row is kept apart in ``low``, so a weak layer inside a group is not hidden.

    Example:
        >>> norms = np.ones((500, 3))
        >>> norms[3, 0] = 1e-9
        >>> rows = heatmap_rows(norms, [f"l{i}" for i in range(500)], max_rows=64)
        >>> rows.values.shape, rows.labels[0], float(rows.values[0, 0]), float(rows.low[0, 0])
        ((64, 3), 'l0 .. l7 (8 layers)', 1.0, 1e-09)
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
        agg = np.maximum.reduceat(np.where(present, values, ABSENT), starts, axis=0)
    else:
        sq = np.add.reduceat(np.where(present, values * values, 0.0), starts, axis=0)
        count = np.add.reduceat(present.astype(np.int64), starts, axis=0)
        agg = np.where(count > 0, np.sqrt(sq / np.maximum(count, 1)), ABSENT)
    low = np.minimum.reduceat(np.where(present, values, np.inf), starts, axis=0)
    low[np.isinf(low)] = ABSENT
    row_nonfinite = np.logical_or.reduceat(nonfinite, starts, axis=0)
    agg[row_nonfinite] = np.nan
    low[row_nonfinite] = np.nan
    return HeatmapRows(
        values=agg,
        labels=[_span_label(layer_names, start, stop) for start, stop in spans],
        exploding=np.logical_or.reduceat(exp, starts, axis=0),
        vanishing=np.logical_or.reduceat(van, starts, axis=0),
        spans=spans,
        low=low,
    )


# --------------------------------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------------------------------
_DPI = 100
_WIDTH_IN = 10.0
_EXPLODING_COLOR = "red"
_VANISHING_COLOR = "deepskyblue"
_NONFINITE_COLOR = "magenta"
_ZERO_COLOR = "black"
_ABSENT_COLOR = "0.85"
_BAR_COLOR = "0.45"
#: The bar chart's axis starts this many decades below the smallest norm drawn (rounded down to a decade).
BAR_DECADES_BELOW = 1.0
#: A vanishing floor or exploding ceiling further than this many decades outside the data is named, not drawn.
BAND_REACH_DECADES = 3.0
#: With more bars than this, only every k-th bar is labelled (about this many labels).
MAX_BAR_LABELS = 32


def _figure(width: float, height: float, dpi: int, layout: Literal["constrained"] | None = None) -> tuple[Any, Any]:
    # The object API with an explicit Agg canvas renders off-screen without switching the process-wide pyplot backend
    # (which would break a user's notebook or GUI session).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
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


class _Panels(NamedTuple):
    """What the heatmap panels show: one matrix per panel, its title and the flags marked on it."""

    matrices: list[np.ndarray]
    titles: list[str]
    markers: list[list[tuple[np.ndarray, str, str, str]]]  # per panel: (flags, marker, colour, label)


def _panels(
    rows: HeatmapRows, show_min: bool | None, reduce: str, flag_labels: tuple[str, str] = ("exploding", "vanishing")
) -> _Panels:
    exploding = (rows.exploding, "^", _EXPLODING_COLOR, flag_labels[0])
    vanishing = (rows.vanishing, "v", _VANISHING_COLOR, flag_labels[1])
    two = rows.grouped if show_min is None else bool(show_min)
    if not two:
        return _Panels([rows.values], [""], [[exploding, vanishing]])
    # Exploding events show where they live, on the largest layer of a row; vanishing ones on the smallest.
    return _Panels(
        [rows.values, rows.low],
        [f"{'largest' if reduce == 'max' else 'rms'} layer of each row", "smallest layer of each row"],
        [[exploding], [vanishing]],
    )


class _Labels(NamedTuple):
    """What a heatmap's colours mean: the colour-bar label, the legend of zero and absent cells, reference marks."""

    value: str = "log10 ||grad||"
    zero: str = "zero"
    absent: str = "no gradient"
    marks: tuple[float, ...] = ()  # reference values, drawn as lines across the colour bar
    marks_label: str = ""


def _color_range(matrices: Sequence[np.ndarray]) -> tuple[float, float]:
    pool = np.concatenate([m[np.isfinite(m) & (m > 0)].ravel() for m in matrices])
    if pool.size == 0:
        return -1.0, 1.0
    vmin, vmax = float(np.log10(pool.min())), float(np.log10(pool.max()))
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax


def _draw_heatmap(
    fig: Any,
    axes: Sequence[Any],
    cax: Any,
    rows: HeatmapRows,
    panels: _Panels,
    steps: Sequence[int],
    font: float,
    title: str,
    marker_size: float,
    labels: _Labels | None = None,
) -> None:
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    num_rows, num_cols = rows.values.shape
    vmin, vmax = _color_range(panels.matrices)
    # Special cells reuse the colormap's out-of-range colours so one imshow per panel draws everything.
    cmap = colormaps["viridis"].with_extremes(under=_ZERO_COLOR, over=_NONFINITE_COLOR, bad=_ABSENT_COLOR)
    any_zero = any_nonfinite = any_absent = False
    handles: list[Any] = []
    image = None
    positions, tick_labels = _step_ticks(steps)
    for i, (ax, values, panel_title, markers) in enumerate(
        zip(axes, panels.matrices, panels.titles, panels.markers, strict=True)
    ):
        nonfinite, absent, zero = np.isnan(values), values < 0, values == 0
        positive = ~nonfinite & ~absent & ~zero
        any_zero |= bool(zero.any())
        any_nonfinite |= bool(nonfinite.any())
        any_absent |= bool(absent.any())
        with np.errstate(divide="ignore", invalid="ignore"):
            display = np.where(positive, np.log10(np.where(positive, values, 1.0)), np.nan)
        display[zero] = vmin - 1.0
        display[nonfinite] = vmax + 1.0
        image = ax.imshow(
            np.ma.masked_invalid(display), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax
        )
        for flags, marker, color, label in markers:
            r, c = np.nonzero(flags)
            if r.size:
                ax.scatter(c, r, s=marker_size, marker=marker, c=color, edgecolors="white", linewidths=0.3, zorder=3)
                handles.append(Line2D([], [], ls="", marker=marker, color=color, markeredgecolor="white", label=label))
        if i == 0:
            ax.set_yticks(range(num_rows), rows.labels, fontsize=font)
        else:
            ax.tick_params(axis="y", left=False, labelleft=False)
        ax.set_xticks(positions, tick_labels, fontsize=font)
        ax.set_xlabel(f"step: {panel_title}" if panel_title else "step", fontsize=font + 1, labelpad=1)
        ax.set_xlim(-0.5, num_cols - 0.5)
        ax.set_ylim(num_rows - 0.5, -0.5)
    axes[0].set_title(title, fontsize=font + 2, loc="left")
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    colorbar = fig.colorbar(image, cax=cax, extend=extend[(any_zero, any_nonfinite)], extendfrac=0.05)
    labels = labels or _Labels()
    colorbar.set_label(labels.value, fontsize=font + 1)
    colorbar.ax.tick_params(labelsize=font)
    marked = [value for value in labels.marks if value > 0 and vmin <= math.log10(value) <= vmax]
    for value in marked:
        # Reference values (a healthy band) as lines across the colour bar, where the colours reach them.
        colorbar.ax.axhline(math.log10(value), color="white", lw=2.0)
        colorbar.ax.axhline(math.log10(value), color="black", lw=1.0, ls=(0, (2, 1)))
    if labels.marks:
        band = " .. ".join(f"{value:g}" for value in labels.marks)
        label = f"{labels.marks_label} {band}" + ("" if marked else " (outside the colours)")
        handles.append(Line2D([], [], color="black", lw=1.0, ls=(0, (2, 1)), label=label))
    for present, color, label in (
        (any_nonfinite, _NONFINITE_COLOR, "non-finite"),
        (any_zero, _ZERO_COLOR, labels.zero),
        (any_absent, _ABSENT_COLOR, labels.absent),
    ):
        if present:
            handles.append(Patch(facecolor=color, edgecolor="0.5", label=label))
    if handles:
        _legend_above(axes[-1], handles, font)


class _BarData(NamedTuple):
    top: np.ndarray  # [n] bar heights (largest norm per bar); NaN = non-finite, <= 0 = no bar
    low: np.ndarray  # [n] smallest norm per bar (grouped bars only)
    colors: list[str]
    labels: list[str]
    grouped: bool
    lo: float
    hi: float
    low_band: float | None  # the floor as drawn (None: not drawn)
    high_band: float | None
    notes: list[str]  # bands outside the axis, named in the legend


def _bar_data(
    norms: np.ndarray,
    layer_names: Sequence[str],
    low: float | None,
    high: float | None,
    exploding: np.ndarray | None,
    vanishing: np.ndarray | None,
    max_bars: int,
) -> _BarData:
    for arg, value in (("low", low), ("high", high)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{arg}` must be None or a finite float > 0, got {value!r}")
    column = np.asarray(norms, dtype=np.float64).reshape(-1, 1)
    exp = None if exploding is None else np.asarray(exploding, dtype=bool).reshape(-1, 1)
    van = None if vanishing is None else np.asarray(vanishing, dtype=bool).reshape(-1, 1)
    rows = heatmap_rows(column, layer_names, exp, van, max_rows=max_bars, reduce="max")
    top, smallest = rows.values[:, 0], rows.low[:, 0]
    nonfinite = np.isnan(top)
    drawn = np.concatenate([top[~nonfinite & (top > 0)], smallest[np.isfinite(smallest) & (smallest > 0)]])
    # The axis follows the data, not the vanishing floor (1e-9 by default would squash every bar to the same height).
    if drawn.size:
        data_lo, data_hi = float(drawn.min()), float(drawn.max())
        lo = 10.0 ** math.floor(math.log10(data_lo) - BAR_DECADES_BELOW)
        hi = data_hi * 3.0
    else:
        data_lo, data_hi, lo, hi = 1.0, 1.0, 1e-3, 10.0
    notes: list[str] = []
    low_band = high_band = None
    if low is not None:
        if low >= data_lo / 10.0**BAND_REACH_DECADES:
            low_band, lo = low, min(lo, low / 3.0)
            hi = max(hi, low * 3.0)
        else:
            notes.append(f"vanishing floor {low:.3g} (below the axis)")
    if high is not None:
        if high <= data_hi * 10.0**BAND_REACH_DECADES:
            high_band, hi = high, max(hi, high * 3.0)
        else:
            notes.append(f"exploding ceiling {high:.3g} (above the axis)")

    colors = np.full(len(top), _BAR_COLOR, dtype=object)
    colors[rows.vanishing[:, 0]] = _VANISHING_COLOR
    colors[rows.exploding[:, 0]] = _EXPLODING_COLOR
    colors[nonfinite] = _NONFINITE_COLOR
    grouped = rows.grouped
    # Grouped bars are labelled by their first layer; the axis label says how many layers a bar holds.
    labels = [_short(layer_names[start], 28) for start, _ in rows.spans] if grouped else rows.labels
    return _BarData(top, smallest, colors.tolist(), labels, grouped, lo, hi, low_band, high_band, notes)


def _draw_bars(ax: Any, data: _BarData, layers: int, font: float, title: str) -> None:
    from matplotlib.lines import Line2D

    n = len(data.top)
    lo, hi = data.lo, data.hi
    ax.set_yscale("log")
    nonfinite = np.isnan(data.top)
    positive = ~nonfinite & (data.top > 0)
    # Bars start at the bottom of the log axis (zero has no place on it) and end at the norm; a non-finite norm
    # fills the axis.
    tops = np.where(positive, data.top, np.where(nonfinite, hi, lo))
    ax.bar(np.arange(n), tops - lo, width=0.8, color=data.colors, bottom=lo)
    handles: list[Any] = []
    zero = ~nonfinite & (data.top == 0)
    if zero.any():
        ax.scatter(
            np.flatnonzero(zero), np.full(int(zero.sum()), lo), marker="x", c=_ZERO_COLOR, s=20, zorder=3, clip_on=False
        )
        handles.append(Line2D([], [], ls="", marker="x", color=_ZERO_COLOR, label="zero gradient"))
    if data.grouped:
        # The smallest layer of each bar, so a weak layer inside a group is not hidden by the group's largest.
        weak = np.isfinite(data.low) & (data.low > 0) & positive
        ax.scatter(np.flatnonzero(weak), data.low[weak], marker="_", c="black", s=40, linewidths=1.2, zorder=3)
        handles.append(
            Line2D([], [], ls="", marker="_", color="black", markeredgewidth=1.2, label="smallest layer of the bar")
        )
    if data.low_band is not None:
        ax.axhspan(lo, data.low_band, color=_VANISHING_COLOR, alpha=0.12, lw=0)
        handles.append(
            ax.axhline(
                data.low_band, color=_VANISHING_COLOR, ls="--", lw=0.8, label=f"vanishing floor {data.low_band:.3g}"
            )
        )
    if data.high_band is not None:
        ax.axhspan(data.high_band, hi, color=_EXPLODING_COLOR, alpha=0.10, lw=0)
        handles.append(
            ax.axhline(
                data.high_band, color=_EXPLODING_COLOR, ls="--", lw=0.8, label=f"exploding ceiling {data.high_band:.3g}"
            )
        )
    for note in data.notes:
        handles.append(Line2D([], [], ls="", label=note))
    if handles:
        _legend_above(ax, handles, font)
    ax.set_ylim(lo, hi)
    ax.set_xlim(-0.6, n - 0.4)
    every = max(1, math.ceil(n / MAX_BAR_LABELS)) if n > MAX_BAR_LABELS else 1
    shown = list(range(0, n, every))
    ax.set_xticks(shown, [data.labels[i] for i in shown], rotation=90, fontsize=font)
    ax.tick_params(axis="y", labelsize=font + 1)
    ax.set_ylabel("||grad||", fontsize=font + 2)
    if data.grouped:
        per_bar = math.ceil(layers / n)
        xlabel = f"{layers} layers in definition order, about {per_bar} per bar (height: the largest)"
        if every > 1:
            xlabel += f"; one bar in {every} labelled by its first layer"
        ax.set_xlabel(xlabel, fontsize=font + 1)
    ax.set_title(title, fontsize=font + 3, loc="left")
    ax.grid(axis="y", which="major", lw=0.3, alpha=0.5)


# --------------------------------------------------------------------------------------------------------------------
# renderers
# --------------------------------------------------------------------------------------------------------------------
def _check_steps(steps: Sequence[int], num_cols: int) -> None:
    if len(steps) != num_cols:
        raise ValueError(f"`steps` has {len(steps)} entries for {num_cols} columns of `norms`")


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
    show_min: bool | None = None,
) -> np.ndarray:
    """Draw the gradient-flow heatmap: ``log10`` per-layer gradient norm over the logged steps.

    Rows are layers in definition order (grouped as in :func:`heatmap_rows` when there are more than ``max_rows``),
    columns are logged steps labelled with their step numbers. Exploding layers get a red ``▲``, vanishing layers a
    blue ``▼``; non-finite norms are magenta, zero norms black, and steps without a gradient light grey. When rows
    group several layers, two panels share the colour scale: the largest layer of each row (with the exploding
    marks) and the smallest (with the vanishing marks), so one weak layer in a group stays visible.

    Args:
        norms: ``[L, T]`` per-layer norms (NaN/inf = non-finite, negative = no gradient).
        layer_names: the ``L`` layer names.
        steps: the ``T`` step numbers of the columns.
        exploding: optional ``[L, T]`` flags (the detector's events).
        vanishing: optional ``[L, T]`` flags.
        max_rows: the most rows drawn.
        reduce: ``"max"`` or ``"rms"``, how grouped layers combine in the first panel.
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.
        show_min: draw the "smallest layer" panel; ``None`` (default): when rows are grouped.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_heatmap(np.random.rand(4, 6) + 0.1, ["a", "b", "c", "d"], list(range(0, 60, 10)))
        >>> img.dtype, img.shape[2]
        (dtype('uint8'), 3)
    """
    rows = heatmap_rows(norms, layer_names, exploding, vanishing, max_rows=max_rows, reduce=reduce)
    _check_steps(steps, rows.values.shape[1])
    panels = _panels(rows, show_min, reduce)
    return _heatmap_image(rows, panels, steps, title or "gradient flow: log10 ||grad|| per layer", dpi, _Labels())


def _heatmap_image(
    rows: HeatmapRows, panels: _Panels, steps: Sequence[int], title: str, dpi: int, labels: _Labels
) -> np.ndarray:
    num_rows, num_cols = rows.values.shape
    count = len(panels.matrices)
    dense = num_rows > 64
    font = 5 if dense else 7
    # Fixed margins (in inches) instead of tight_layout: measuring every label doubles the drawing time.
    left = min(_text_inches(rows.labels, font) + 0.2, 0.4 * _WIDTH_IN)
    right, top, bottom, gap = 1.0, 0.4, 0.75, 0.15
    height = float(np.clip(top + bottom + num_rows * (0.1 if dense else 0.16), 3.0, 24.0))
    fig, canvas = _figure(_WIDTH_IN, height, dpi)
    ax_h = height - top - bottom
    ax_w = (_WIDTH_IN - left - right - gap * (count - 1)) / count
    axes = [
        fig.add_axes(((left + i * (ax_w + gap)) / _WIDTH_IN, bottom / height, ax_w / _WIDTH_IN, ax_h / height))
        for i in range(count)
    ]
    cax = fig.add_axes(((_WIDTH_IN - right + 0.1) / _WIDTH_IN, bottom / height, 0.14 / _WIDTH_IN, ax_h / height))
    # Markers shrink with the cells so that 200 columns of 64 rows stay legible.
    size = float(np.clip(0.8 * 72 * min(ax_w / num_cols, ax_h / num_rows), 2.0, 9.0)) ** 2
    _draw_heatmap(fig, axes, cax, rows, panels, steps, font, title, size, labels)
    return _to_rgb(fig, canvas)


#: The band of a healthy update-to-weight ratio (the hints' defaults): below it a layer barely trains, above it the
#: learning rate may be too high for it.
RATIO_BAND = (1e-5, 1e-2)


def render_update_ratio_heatmap(
    ratios: np.ndarray,
    layer_names: Sequence[str],
    steps: Sequence[int],
    *,
    band: tuple[float, float] | None = RATIO_BAND,
    max_rows: int = 64,
    title: str | None = None,
    dpi: int = _DPI,
) -> np.ndarray:
    """Draw the update-to-weight ratio ``‖Δθ‖/‖θ‖`` per layer over the logged steps, on a ``log10`` colour scale.

    The gradient-flow heatmap's layout (:func:`render_heatmap`): rows are layers in definition order, grouped beyond
    ``max_rows`` into ranges drawn in two panels (the largest and the smallest ratio of each row, so one layer that
    barely trains stays visible in a group). The healthy band is drawn across the colour bar; a cell above it gets a
    red ``▲`` (on the largest-layer panel), one below it a blue ``▼`` (on the smallest-layer panel). A step that left
    a layer unchanged (ratio 0, e.g. a step GradScaler skipped) is black, a layer not measured at a step grey.

    Args:
        ratios: ``[L, T]`` ratios; NaN or a negative value = not measured, inf = non-finite.
        layer_names: the ``L`` layer names.
        steps: the ``T`` step numbers of the columns.
        band: ``(low, high)`` drawn on the colour bar (where the colours reach), or ``None``.
        max_rows: the most rows drawn.
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_update_ratio_heatmap(np.full((3, 4), 1e-3), ["a", "b", "c"], [10, 20, 30, 40])
        >>> img.dtype, img.shape[2]
        (dtype('uint8'), 3)
    """
    values = np.asarray(ratios, dtype=np.float64)
    # NaN means "not measured" for a ratio (no gradient, zero weights), the heatmap's "absent"; inf stays non-finite.
    values = np.where(np.isnan(values), ABSENT, values)
    values = np.where(np.isinf(values), np.nan, values)
    above = below = None
    if band is not None:
        low, high = band
        if not (0 < low < high and math.isfinite(high)):
            raise ValueError(f"`band` must be None or (low, high) with 0 < low < high, got {band!r}")
        measured = np.isfinite(values) & (values > 0)
        above, below = measured & (values > high), measured & (values < low)
    rows = heatmap_rows(values, layer_names, above, below, max_rows=max_rows, reduce="max")
    _check_steps(steps, rows.values.shape[1])
    flag_labels = ("above the band", "below the band")
    panels = _panels(rows, None, "max", flag_labels)
    labels = _Labels(
        value="log10 ||Δθ|| / ||θ||",
        zero="unchanged",
        absent="not measured",
        marks=tuple(band) if band is not None else (),
        marks_label="band",
    )
    return _heatmap_image(rows, panels, steps, title or "update/weight ratio per layer (log10)", dpi, labels)


def _depth_columns(num_steps: int, max_lines: int) -> list[int]:
    # The newest column always, then evenly spaced older ones back to the first.
    if num_steps <= max_lines:
        return list(range(num_steps))
    picked = np.linspace(0, num_steps - 1, max_lines).round().astype(int)
    return sorted(set(picked.tolist()))


def render_depth_flow(
    norms: np.ndarray,
    layer_names: Sequence[str],
    steps: Sequence[int],
    *,
    max_lines: int = 8,
    max_points: int = 512,
    title: str | None = None,
    dpi: int = _DPI,
) -> np.ndarray:
    """Draw the gradient flow through depth: ``log10 ‖∂L/∂y‖`` of each layer's output against the layer's depth.

    One line per logged step (at most ``max_lines``, spread over the history, the newest always), older steps lighter
    and newer darker, each labelled with its step. A line that falls from right (the output) to left (the input) by
    orders of magnitude is vanishing gradient flow; one that grows is exploding. With more than ``max_points``
    layers, consecutive layers are combined (root mean square) so the lines stay readable.

    Args:
        norms: ``[L, T]`` activation-gradient norms in layer (depth) order; NaN, inf, zero or a negative value = not
            drawn (a gap in the line).
        layer_names: the ``L`` layer names, in depth order.
        steps: the ``T`` step numbers of the columns.
        max_lines: the most steps drawn.
        max_points: the most points per line.
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_depth_flow(np.array([[1e-3, 2e-3], [1e-1, 3e-1]]), ["enc", "head"], [10, 20])
        >>> img.dtype, img.shape[2]
        (dtype('uint8'), 3)
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    values = np.asarray(norms, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"`norms` must be a non-empty [layers, steps] matrix, got shape {values.shape}")
    if len(layer_names) != values.shape[0]:
        raise ValueError(f"`layer_names` has {len(layer_names)} names for {values.shape[0]} rows of `norms`")
    _check_steps(steps, values.shape[1])
    if max_lines < 1 or max_points < 2:
        raise ValueError(f"`max_lines` must be >= 1 and `max_points` >= 2, got {max_lines!r} and {max_points!r}")
    usable = np.isfinite(values) & (values > 0)
    # Several layers per point beyond max_points: the RMS over the ones with a gradient, as heatmap_rows does.
    rows = heatmap_rows(np.where(usable, values, ABSENT), layer_names, max_rows=max_points, reduce="rms")
    points = np.where(rows.values > 0, rows.values, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(points)
    depth = np.arange(points.shape[0])
    columns = _depth_columns(points.shape[1], max_lines)

    font = 7
    tick_names = [_short(layer_names[start], 28) for start, _ in rows.spans]
    # Fixed margins in inches, the bottom one sized from the rotated layer names (as the bar chart does).
    plot_h, top, left, right = 3.2, 0.4, 0.8, 1.7
    bottom = _text_inches(tick_names, font) + 0.55
    height = plot_h + top + bottom
    fig, canvas = _figure(_WIDTH_IN, height, dpi)
    ax = fig.add_axes((left / _WIDTH_IN, bottom / height, 1 - (left + right) / _WIDTH_IN, plot_h / height))
    cmap = colormaps["Blues"]
    handles: list[Any] = []
    for rank, column in enumerate(columns):
        # Lightest 0.3 (still visible on white) to darkest 1.0 for the newest step.
        shade = 0.3 + 0.7 * (rank + 1) / len(columns)
        newest = rank == len(columns) - 1
        (line,) = ax.plot(
            depth,
            logs[:, column],
            color=cmap(shade),
            lw=2.0 if newest else 1.1,
            marker="o" if len(depth) <= 48 else None,
            ms=3,
            zorder=2 + rank,
            label=f"step {int(steps[column])}" + (" (latest)" if newest else ""),
        )
        handles.append(line)
    if not np.isfinite(logs[:, columns]).any():
        ax.text(0.5, 0.5, "no activation gradient measured", transform=ax.transAxes, ha="center", fontsize=font + 2)
        handles.append(Line2D([], [], ls="", label="(nothing to draw)"))
    # Newest first in the legend: it is the line one reads first.
    ax.legend(handles=handles[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=font, frameon=False)
    every = max(1, math.ceil(len(depth) / MAX_BAR_LABELS))
    shown = list(range(0, len(depth), every))
    grouped = rows.grouped
    ax.set_xticks(shown, [tick_names[i] for i in shown], rotation=90, fontsize=font)
    ax.set_xlim(-0.5, len(depth) - 0.5)
    ax.tick_params(axis="y", labelsize=font + 1)
    ax.set_ylabel("log10 ||dL/dy||", fontsize=font + 2)
    xlabel = "layer depth (definition order): input -> output"
    if grouped:
        xlabel += f"; {len(layer_names)} layers, about {math.ceil(len(layer_names) / len(depth))} per point (rms)"
    ax.set_xlabel(xlabel, fontsize=font + 1)
    ax.grid(lw=0.3, alpha=0.5)
    ax.set_title(
        title or "gradient flow through depth: activation-gradient norm per layer", fontsize=font + 3, loc="left"
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

    The axis spans the norms drawn (from a decade below the smallest), not the vanishing floor: a floor or ceiling
    more than :data:`BAND_REACH_DECADES` decades away from the data is named in the legend instead of drawn. With
    more than ``max_bars`` layers, consecutive layers share a bar: its height is their largest norm and a black tick
    marks their smallest; beyond :data:`MAX_BAR_LABELS` bars only every k-th bar is labelled.

    Args:
        norms: ``[L]`` per-layer norms (NaN/inf = non-finite, drawn to the top in magenta; zero = a black ``x`` at
            the bottom; negative = no gradient, no bar).
        layer_names: the ``L`` layer names.
        low: the vanishing floor, drawn as a blue band below it.
        high: the exploding ceiling, drawn as a red band above it.
        exploding: optional ``[L]`` flags (the detector's events), bars drawn red.
        vanishing: optional ``[L]`` flags, bars drawn blue.
        max_bars: the most bars.
        title: the figure title.
        dpi: the resolution; the figure is 10 inches wide.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_bars(np.array([1e-3, 0.5, 2.0]), ["emb", "body", "head"], low=1e-4, high=10.0)
        >>> img.shape[2]
        3
    """
    data = _bar_data(norms, layer_names, low, high, exploding, vanishing, max_bars)
    n = len(data.top)
    font = 7 if n <= 32 else 6
    left, right, top = 0.9, 0.2, 0.4
    bottom = _text_inches(data.labels, font) + 0.2 + 0.2 * data.grouped
    height = 3.0 + top + bottom
    fig, canvas = _figure(_WIDTH_IN, height, dpi)
    ax = fig.add_axes((left / _WIDTH_IN, bottom / height, 1 - (left + right) / _WIDTH_IN, 3.0 / height))
    _draw_bars(ax, data, len(layer_names), font, title or "gradient flow: latest ||grad|| per layer")
    return _to_rgb(fig, canvas)


def flow_figure(
    norms: np.ndarray,
    layer_names: Sequence[str],
    steps: Sequence[int],
    exploding: np.ndarray | None = None,
    vanishing: np.ndarray | None = None,
    *,
    column: int = -1,
    low: float | None = None,
    high: float | None = None,
    max_rows: int = 64,
    title: str | None = None,
    dpi: int = _DPI,
) -> Any:
    """The heatmap and, below it, the bar chart of one column, as one matplotlib ``Figure`` (constrained layout).

    Meant to be saved with ``fig.savefig(path, bbox_inches="tight")`` (``gradguard report --png``): the layout engine
    sizes the margins from the labels, so nothing is cut off and no gap is left between the two plots.

    Args:
        norms, layer_names, steps, exploding, vanishing, max_rows: as for :func:`render_heatmap`.
        column: the column drawn as bars (default: the last).
        low, high: the bands of the bar chart (see :func:`render_bars`).
        title: the heatmap's title.
        dpi: the resolution.

    Example:
        >>> fig = flow_figure(np.random.rand(4, 6) + 0.1, ["a", "b", "c", "d"], list(range(0, 60, 10)))
        >>> [ax.get_ylabel() for ax in fig.axes][-1]
        '||grad||'
    """
    rows = heatmap_rows(norms, layer_names, exploding, vanishing, max_rows=max_rows)
    num_rows, num_cols = rows.values.shape
    _check_steps(steps, num_cols)
    panels = _panels(rows, None, "max")
    count = len(panels.matrices)
    column = column % num_cols
    values = np.asarray(norms, dtype=np.float64)
    flags = [None if f is None else np.asarray(f, dtype=bool)[:, column] for f in (exploding, vanishing)]
    bars = _bar_data(values[:, column], layer_names, low, high, flags[0], flags[1], max_rows)

    font = 7
    heat_h = float(np.clip(num_rows * 0.16 + 0.8, 2.0, 12.0))
    bar_labels = _text_inches(bars.labels, font) + 0.3
    fig, _ = _figure(_WIDTH_IN, heat_h + 3.0 + bar_labels + 0.4, dpi, layout="constrained")
    grid = fig.add_gridspec(2, count + 1, height_ratios=[heat_h, 3.0 + bar_labels], width_ratios=[1.0] * count + [0.03])
    axes = [fig.add_subplot(grid[0, i]) for i in range(count)]
    cax = fig.add_subplot(grid[0, count])
    size = float(np.clip(0.8 * 72 * min(7.0 / count / num_cols, heat_h / num_rows), 2.0, 9.0)) ** 2
    _draw_heatmap(fig, axes, cax, rows, panels, steps, font, title or "gradient flow: log10 ||grad|| per layer", size)
    bar_ax = fig.add_subplot(grid[1, :count])
    _draw_bars(bar_ax, bars, len(layer_names), font, f"gradient flow at step {int(steps[column])}")
    return fig
