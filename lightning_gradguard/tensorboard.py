"""Everything GradGuard writes to TensorBoard, under one import (kept for existing imports).

The code lives in two modules:

* :mod:`lightning_gradguard.render`: layer grouping, heatmap data and the gradient-flow pictures (numpy and
  matplotlib only, shared with ``gradguard report --png``);
* :mod:`lightning_gradguard.board`: :class:`GradGuardBoard` (layout, scalars, images, histograms, text), its bounded
  per-layer history, :func:`sample_gradients` and :func:`histogram_blocks`.
"""

from __future__ import annotations

from lightning_gradguard.board import (
    EVENT_KINDS,
    MAX_HISTOGRAM_BLOCKS,
    TROUBLE_KINDS,
    GradGuardBoard,
    histogram_blocks,
    sample_gradients,
)
from lightning_gradguard.render import (
    HeatmapRows,
    block_name,
    flow_figure,
    group_layer_names,
    heatmap_rows,
    layer_blocks,
    layer_row_spans,
    render_bars,
    render_heatmap,
)

__all__ = [
    "EVENT_KINDS",
    "MAX_HISTOGRAM_BLOCKS",
    "TROUBLE_KINDS",
    "GradGuardBoard",
    "HeatmapRows",
    "block_name",
    "flow_figure",
    "group_layer_names",
    "heatmap_rows",
    "histogram_blocks",
    "layer_blocks",
    "layer_row_spans",
    "render_bars",
    "render_heatmap",
    "sample_gradients",
]
