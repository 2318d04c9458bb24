"""GradGuard's TensorBoard board: the custom-scalars layout, scalars, gradient-flow images, histograms and text.

The callback calls :class:`GradGuardBoard` on logging steps only, with values already copied to the host, so nothing
here touches the training hot path. The pictures are drawn by :mod:`lightning_gradguard.render` (shared with
``gradguard report --png``).

This module imports neither Lightning nor (at import time) torch or matplotlib, so the command line tool and the
package import stay fast.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_gradguard._kinds import EVENT_KINDS
from lightning_gradguard._validation import check_bool, check_int, optional_int
from lightning_gradguard.layers import layer_source
from lightning_gradguard.render import ABSENT as _ABSENT
from lightning_gradguard.render import (
    block_name,
    group_layer_names,
    layer_blocks,
    render_bars,
    render_depth_flow,
    render_heatmap,
    render_update_ratio_heatmap,
)

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "DIAGNOSTIC_CHARTS",
    "EVENT_KINDS",
    "MAX_HISTOGRAM_BLOCKS",
    "TROUBLE_KINDS",
    "GradGuardBoard",
    "histogram_blocks",
    "sample_gradients",
]

#: Event kinds that name a layer: each event is also written as ``gradguard/trouble/<kind>/<layer>``.
TROUBLE_KINDS: tuple[str, ...] = ("exploding", "vanishing", "nonfinite")

_PREFIX = "gradguard/"
_ACT_PREFIX = f"{_PREFIX}act_grad/"
# The "layers in trouble" charts: a regex over the trouble tags of these kinds each. Exploding and non-finite norms
# are large (or NaN), vanishing ones tiny: on one linear axis the vanishing lines would sit flat on zero.
_TROUBLE_CHARTS: dict[str, tuple[str, ...]] = {
    "layers in trouble: exploding, non-finite": ("exploding", "nonfinite"),
    "layers in trouble: vanishing": ("vanishing",),
}
_EMA_PARTS = ("mean", "lower", "upper")
#: The diagnostics (``GradGuard(diagnostics=...)`` names) that have custom-scalar charts and pictures; ``epoch`` is
#: accepted by the board and has neither (its summaries are a handful of scalars per epoch).
DIAGNOSTIC_CHARTS: tuple[str, ...] = ("update_ratio", "zero_fraction", "act_grad", "noise_scale")
_DIAGNOSTIC_NAMES = (*DIAGNOSTIC_CHARTS, "epoch")
# A per-layer diagnostic chart holds every layer while they fit in this many lines, else one line per block of
# consecutive layers (the blocks of `layer_blocks`), with the block statistics below.
_DIAG_LINES = 12
# (quantity, per optimizer, chart title, block statistics): the largest update ratio of a block shows a layer moving
# too fast, the smallest one barely training; the largest zero fraction shows dead units; the median
# activation-gradient norm follows the flow through depth.
_DIAG_SPECS: tuple[tuple[str, bool, str, tuple[str, ...]], ...] = (
    ("update_ratio", True, "update/weight ratio", ("max", "min")),
    ("zero_fraction", True, "zero fraction", ("max",)),
    ("act_grad", False, "activation-gradient norm", ("median",)),
)
_STAT_WORDS = {"max": "largest", "min": "smallest", "median": "median"}
_REDUCERS: dict[str, Callable[[np.ndarray], Any]] = {"max": np.max, "min": np.min, "median": np.median}
#: Steps kept for the flow-through-depth picture (thinned evenly over the run when full).
_FLOW_COLUMNS = 32
_EVENT_COLUMNS = ("step", "kind", "layer", "value", "action")
_MAX_EVENT_ROWS = 200

# ``add_custom_scalars`` may be called only once per writer; several boards can share one writer (e.g. a callback
# re-created in the same process), so the guard lives with the writer, not with the board.
_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


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
    tensor smaller than its share is taken whole; a complex tensor counts as its real and imaginary parts). Indices are
    a fixed, scattered stride (no random generator is touched, no host-device synchronisation happens); the result
    stays on the device, cast to float32.

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
            # A complex gradient's real and imaginary parts, both: a cast to float32 would keep the real part only.
            per_block.setdefault(blocks(name), []).append(torch.view_as_real(grad) if grad.is_complex() else grad)

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


#: The most histogram tags per histogram step: a 1501-layer ``Sequential`` wrote 1501, one panel each, and a histogram
#: step of the 98-layer model of ``python -m benchmarks.histogram_cost`` took about twice as long with 98 as with 49.
MAX_HISTOGRAM_BLOCKS = 64


def histogram_blocks(names: Sequence[str], max_blocks: int = MAX_HISTOGRAM_BLOCKS) -> dict[str, str]:
    """The histogram block of each layer name: its first two name components, or, where that makes more than
    ``max_blocks`` blocks, the blocks of :func:`~lightning_gradguard.render.layer_blocks` (consecutive layers grouped
    by name prefix first, named ``"layers.0..9"`` where a block spans several).

    Args:
        names: the layer names, in definition order (every layer of the model, so that the blocks do not depend on
            which optimizer holds a layer or when it joins).
        max_blocks: the most blocks, ``>= 1``.

    Returns:
        ``{layer name: block name}`` for every name.

    Example:
        >>> histogram_blocks(["encoder.0.attn", "encoder.0.mlp", "head"])
        {'encoder.0.attn': 'encoder.0', 'encoder.0.mlp': 'encoder.0', 'head': 'head'}
        >>> blocks = histogram_blocks([f"layers.{i}" for i in range(600)], max_blocks=4)
        >>> sorted(set(blocks.values()))
        ['layers.0..149', 'layers.150..299', 'layers.300..449', 'layers.450..599']
    """
    if max_blocks < 1:
        raise ValueError(f"`max_blocks` must be an integer >= 1, got {max_blocks!r}")
    prefixes = {name: block_name(name, depth=2) for name in names}
    if len(set(prefixes.values())) <= max_blocks:
        return prefixes
    return {names[i]: block for block, members in layer_blocks(names, max_blocks) for i in members}


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
            leftover = (
                (self.norms[:, 2 * half].copy(), self.exploding[:, 2 * half].copy(), self.vanishing[:, 2 * half].copy())
                if odd
                else None
            )
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

    def remapped(self, rows: Sequence[int]) -> _LayerHistory:
        """This history for another list of layers: row ``i`` of the new one is row ``rows[i]`` of this one, or a
        layer without gradient so far where ``rows[i]`` is ``-1`` (a layer that joined)."""
        new = _LayerHistory(len(rows), self.capacity)
        new.size, new.stride, new.steps = self.size, self.stride, self.steps.copy()
        new.pending_count, new.pending_step = self.pending_count, self.pending_step
        for i, row in enumerate(rows):
            if row < 0:
                new.norms[i, : self.size] = _ABSENT
                continue
            new.norms[i], new.exploding[i], new.vanishing[i] = self.norms[row], self.exploding[row], self.vanishing[row]
            new.pending_norms[i] = self.pending_norms[row]
            new.pending_exploding[i] = self.pending_exploding[row]
            new.pending_vanishing[i] = self.pending_vanishing[row]
        return new

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
    :meth:`tag`) and image tags get a ``/opt{i}`` suffix, while layer, trouble, regularizer and saturation tags are
    shared (a layer name that several optimizers hold gets an ``opt{i}/`` of its own, see :meth:`layer_key`).
    Scalars go to the writer as one multi-value event per step, so thousands of per-layer norms stay cheap.

    The custom-scalars layout stays browsable at any depth (at most ``max_charts`` charts): the run-level charts, two
    *layers in trouble* charts over ``gradguard/trouble/<kind>/<layer>`` (written by :meth:`write_events` for each
    layer the detectors flag, at the event's step, with the layer's norm then), and per-layer charts of at most 12
    lines while those fit in the budget; beyond it, one chart per block of consecutive layers with the block's largest
    and median norm (``gradguard/block/<block>/max``, ``/median``, written by :meth:`write_layer_norms`). The
    gradient-flow heatmap is the per-layer view then.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (any object with the same ``add_*`` methods works).
        layer_names: for each optimizer index, its layer names in definition order.
        optimizer_names: display names of the optimizers, one per index.
        image_every_n_steps: draw the gradient-flow images when the step crosses a multiple of this (and once more at
            :meth:`close_run`); ``None`` = no pictures at all.
        histogram_every_n_steps: write gradient histograms when the step crosses a multiple of this; ``None`` = never.
        max_heatmap_rows: the most heatmap rows (and bars); more layers are grouped into consecutive ranges.
        history: the most heatmap columns kept per optimizer; older columns are merged pairwise beyond it. The
            histories are kept per layer and checkpointed (6 bytes per layer and column, twice with the update
            ratios): 500 columns are more than the picture's width in pixels draws apart.
        regularizers: the names of the configured regularizers: their two charts are laid out only when there is at
            least one; ``None`` (not told) lays them out.
        saturation: whether saturation is measured: its chart is laid out only then.
        loss_relapse: whether the training loss is watched (``gradguard/loss_relapse``): its chart is laid out only
            then.
        vanishing: whether vanishing layers are detected: the "layers in trouble: vanishing" chart is laid out only
            then.
        max_charts: the most custom-scalar charts; the per-layer or per-block charts get what the others leave.
        diagnostics: the diagnostics that feed this board (names of ``GradGuard(diagnostics=...)``): only these get
            charts ("GradGuard diagnostics") and pictures (``update_ratio``: the ``gradguard/update_ratio_heatmap``
            image; ``act_grad``: ``gradguard/act_grad_flow``, every layer written, in the order written). Their
            per-layer scalars arrive through :meth:`write_scalars` (``gradguard/update_ratio/<layer>``,
            ``gradguard/zero_fraction/<layer>``, ``gradguard/act_grad/<layer>``); with more than 12 layers the board
            also writes block statistics for the charts (``gradguard/update_ratio_block/<block>/max`` and ``/min``,
            ``zero_fraction_block/<block>/max``, ``act_grad_block/<block>/median``).

    Example:
        >>> import tempfile
        >>> import numpy as np
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
        history: int = 500,
        regularizers: Sequence[str] | None = None,
        saturation: bool = True,
        max_charts: int = 30,
        diagnostics: Sequence[str] = (),
        loss_relapse: bool = True,
        vanishing: bool = True,
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
        image_every_n_steps = optional_int("image_every_n_steps", image_every_n_steps, low=1)
        histogram_every_n_steps = optional_int("histogram_every_n_steps", histogram_every_n_steps, low=1)
        max_heatmap_rows = check_int("max_heatmap_rows", max_heatmap_rows, low=2)
        history = check_int("history", history, low=2)
        if regularizers is not None and (
            isinstance(regularizers, str) or not all(isinstance(name, str) for name in regularizers)
        ):
            raise ValueError(f"`regularizers` must be None or a list of names, got {regularizers!r}")
        check_bool("saturation", saturation)
        check_bool("loss_relapse", loss_relapse)
        check_bool("vanishing", vanishing)
        check_int("max_charts", max_charts, low=1)
        if isinstance(diagnostics, str) or not all(name in _DIAGNOSTIC_NAMES for name in diagnostics):
            raise ValueError(
                f"`diagnostics` must be a list of names among {list(_DIAGNOSTIC_NAMES)}, got {diagnostics!r}"
            )

        self.writer = writer
        self.layer_names = {idx: list(names) for idx, names in layer_names.items()}
        self.optimizer_names = list(optimizer_names)
        self.image_every_n_steps = image_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.max_heatmap_rows = max_heatmap_rows
        self.history = history
        self.regularizers = None if regularizers is None else list(regularizers)
        self.saturation = saturation
        self.loss_relapse = loss_relapse
        # The "layers in trouble" charts of the kinds that can be written.
        self._trouble_charts = {
            title: kinds for title, kinds in _TROUBLE_CHARTS.items() if vanishing or "vanishing" not in kinds
        }
        self.max_charts = max_charts
        self.diagnostics = frozenset(diagnostics)

        self._layer_tags: dict[int, list[str]] = {}
        self._shared_names: frozenset[str] = frozenset()
        self._retag_layers()
        self._histories = {idx: _LayerHistory(len(names), history) for idx, names in self.layer_names.items()}
        self._latest: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._bands: dict[int, tuple[float | None, float | None, float | None]] = {}
        # Optimizers whose layers are charted as block summaries: (block, max tag, median tag, layer indices) each.
        self._blocks: dict[int, list[tuple[str, str, str, np.ndarray]]] = {}
        self._setup_diagnostics()  # before the budget: the diagnostics' charts come out of it
        for idx in self.layer_names:
            self._plan_blocks(idx)
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

    def layer_key(self, name: str, opt_idx: int = 0) -> str:
        """The name a layer's scalars are written under: ``gradguard/layer/<key>``, ``gradguard/trouble/<kind>/<key>``.

        The layer's own name, or ``opt{i}/<name>`` where several optimizers each train part of a layer of that name
        (Muon's matrices beside AdamW's biases): one tag would otherwise hold two different norms per step.
        """
        return f"opt{opt_idx}/{name}" if name in self._shared_names else name

    def _retag_layers(self) -> None:
        seen: dict[str, int] = {}
        for names in self.layer_names.values():
            for name in names:
                seen[name] = seen.get(name, 0) + 1
        # Once shared, always: a param group added mid-run must not move an unchanged layer's series to another tag
        # and back (the layout's line takes both forms).
        shared = frozenset(name for name, times in seen.items() if times > 1)
        self._shared_names = self._shared_names | shared
        self._layer_tags = {
            idx: [f"{_PREFIX}layer/{self.layer_key(name, idx)}" for name in names]
            for idx, names in self.layer_names.items()
        }

    def _image_tag(self, name: str, opt_idx: int) -> str:
        return f"{_PREFIX}{name}/opt{opt_idx}" if self.multi_optimizer else f"{_PREFIX}{name}"

    def _opt_label(self, opt_idx: int) -> str:
        return f"opt{opt_idx}: {self.optimizer_names[opt_idx]}"

    # ---------------------------------------------------------------------------------------------------- layout
    def _main_charts(self) -> int:
        charts = (6 + int(self.loss_relapse)) * len(self.optimizer_names)
        charts += 0 if self.regularizers is not None and not self.regularizers else 2
        return charts + int(self.saturation) + len(self._diagnostic_charts())

    def _plan_blocks(self, idx: int) -> None:
        """Chart optimizer ``idx``'s layers as block summaries when their per-layer charts would not fit."""
        names, budget = self.layer_names[idx], self._layer_chart_budget()
        self._blocks.pop(idx, None)
        if len(group_layer_names(names)) > budget:
            self._blocks[idx] = [
                (
                    block,
                    self.tag(f"block/{block}/max", idx),
                    self.tag(f"block/{block}/median", idx),
                    np.asarray(members, dtype=np.int64),
                )
                for block, members in layer_blocks(names, budget)
            ]

    def set_layers(self, opt_idx: int, layer_names: Sequence[str]) -> None:
        """Change the layers of optimizer ``opt_idx``, in the order of the norms written from now on: a param group
        added mid-run (layers unfrozen, a new head) changes them.

        The pictures' histories keep the rows of the layers that stay (by name); a layer that joined shows as "no
        gradient" before it. The dashboard keeps the charts it was written with (TensorBoard reads one layout per
        run): a layer that joined has its ``gradguard/layer/<name>`` scalar (see :meth:`layer_key`) in the Scalars
        tab and its row in the pictures, and where the layers are charted as blocks it joins the block of the layer
        before it.

        Raises:
            ValueError: for an unknown ``opt_idx`` or a repeated name.
        """
        old, names = self._names(opt_idx), list(layer_names)
        if names == old:
            return
        if len(set(names)) != len(names):
            raise ValueError(f"`layer_names` must not repeat a name, got {len(names) - len(set(names))} repeats")
        rows = layer_source(old, names)
        self.layer_names[opt_idx] = names
        self._retag_layers()
        self._histories[opt_idx] = self._histories[opt_idx].remapped(rows)
        if opt_idx in self._ratio_histories:
            self._ratio_histories[opt_idx] = self._ratio_histories[opt_idx].remapped(rows)
        self._latest.pop(opt_idx, None)  # the bar chart's next latest norms come with the new layers
        self._diag_tables()
        if opt_idx in self._blocks:
            # The written layout charts these blocks by name: keep them, each layer in its block by name, and a
            # layer that joined in the block of the layer before it (the first block for the first layer).
            new_row = {name: row for row, name in enumerate(names)}
            blocks = [
                (block, top, median, [new_row[old[m]] for m in members if old[m] in new_row])
                for block, top, median, members in self._blocks[opt_idx]
            ]
            owner = {row: b for b, (_, _, _, rows_) in enumerate(blocks) for row in rows_}
            for row in range(len(names)):
                if row not in owner:
                    owner[row] = owner.get(row - 1, 0)
                    blocks[owner[row]][3].append(row)
            self._blocks[opt_idx] = [
                (block, top, median, np.asarray(sorted(rows_), dtype=np.int64)) for block, top, median, rows_ in blocks
            ]

    def _layer_chart_budget(self) -> int:
        # What the run-level charts and the "layers in trouble" charts leave, shared by the optimizers.
        spare = self.max_charts - self._main_charts() - len(self._trouble_charts)
        return max(1, spare // len(self.optimizer_names))

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The custom-scalars layout written by :meth:`write_layout` (tags are anchored regexes).

        "GradGuard" holds the run-level charts, "GradGuard layers" the layers in trouble and then per-layer charts
        (small models) or block summaries (large ones); at most ``max_charts`` charts in all.
        """

        def exact(*tags: str) -> list[str]:
            return [f"^{re.escape(tag)}$" for tag in tags]

        main: dict[str, list[Any]] = {}
        for idx in range(len(self.optimizer_names)):
            suffix = f" ({self._opt_label(idx)})" if self.multi_optimizer else ""
            total, total_max, total_min, threshold, clip_coef, lr_scale, lr, events, relapse = (
                self.tag(name, idx)
                for name in (
                    "total_norm",
                    "total_norm_max",
                    "total_norm_min",
                    "clip_threshold",
                    "clip_coef",
                    "lr_scale",
                    "lr",
                    "events/",
                    "loss_relapse",
                )
            )
            main[f"total norm{suffix}"] = ["Multiline", exact(total, total_max, total_min, threshold)]
            # The band's upper edge can sit three decades above its mean early in a run; in log10 both stay readable.
            # Margin series name exact tags, not regexes.
            main[f"EMA band, log10{suffix}"] = ["Margin", [self.tag(f"ema_log10/{part}", idx) for part in _EMA_PARTS]]
            main[f"clip coef{suffix}"] = ["Multiline", exact(clip_coef)]
            main[f"lr scale{suffix}"] = ["Multiline", exact(lr_scale)]
            main[f"learning rate{suffix}"] = ["Multiline", exact(lr)]
            main[f"events{suffix}"] = ["Multiline", [f"^{re.escape(events)}.*"]]
            if self.loss_relapse:
                main[f"loss relapse{suffix}"] = ["Multiline", exact(relapse)]
        if self.regularizers is None or self.regularizers:
            main["regularizers"] = ["Multiline", [f"^{re.escape(_PREFIX + 'reg/')}.*"]]
            main["regularizer strength"] = ["Multiline", [f"^{re.escape(_PREFIX + 'reg_strength/')}.*"]]
        if self.saturation:
            main["saturation"] = ["Multiline", [f"^{re.escape(_PREFIX + 'saturation/')}.*"]]

        layers: dict[str, list[Any]] = {
            title: ["Multiline", [f"^{re.escape(f'{_PREFIX}trouble/{kind}/')}" for kind in kinds]]
            for title, kinds in self._trouble_charts.items()
        }

        def add(title: str, tags: list[str]) -> None:
            title = f"{self._opt_label(idx)} · {title}" if self.multi_optimizer else title
            unique, n = title, 2
            while unique in layers:
                unique, n = f"{title} ({n})", n + 1
            layers[unique] = ["Multiline", tags]

        for idx, names in self.layer_names.items():
            if idx in self._blocks:
                for block, max_tag, median_tag, members in self._blocks[idx]:
                    add(f"{block} ({len(members)} layers): max, median", exact(max_tag, median_tag))
            else:
                for title, group in group_layer_names(names):
                    # With or without an optimizer component: a name that becomes shared later keeps its line.
                    prefix = f"^{re.escape(_PREFIX)}layer/" + (r"(?:opt\d+/)?" if self.multi_optimizer else "")
                    add(title, [f"{prefix}{re.escape(name)}$" for name in group])
        layout = {"GradGuard": main, "GradGuard layers": layers}
        diagnostics = self._diagnostic_charts()
        if diagnostics:
            layout["GradGuard diagnostics"] = diagnostics
        return layout

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

    # ---------------------------------------------------------------------------------------------------- diagnostics
    def _setup_diagnostics(self) -> None:
        """Tag tables, block statistics and picture histories of the diagnostics this board is fed."""
        self._diag_tables()
        self._ratio_histories: dict[int, _LayerHistory] = {}
        if "update_ratio" in self.diagnostics:
            self._ratio_histories = {
                idx: _LayerHistory(len(names), self.history) for idx, names in self.layer_names.items()
            }
        self._flow_columns: list[tuple[int, dict[str, float]]] = []  # (step, {layer: norm}), thinned when full
        self._flow_order: list[str] = []  # the layers of the flow picture in depth (definition) order

    def _diag_tables(self) -> None:
        """The diagnostics' tag tables and block statistics, for the current layers."""
        # Activation gradients are model-wide: their layers are the optimizers' layers in definition order.
        self._act_names: list[str] = list(dict.fromkeys(name for names in self.layer_names.values() for name in names))
        # tag -> (quantity, optimizer index, layer row) of every per-layer diagnostic scalar fed to this board
        self._diag_rows: dict[str, tuple[str, int, int]] = {}
        # (quantity, optimizer index or -1 for model-wide) -> [(block, {statistic: tag}, layer rows)]
        self._diag_blocks: dict[tuple[str, int], list[tuple[str, dict[str, str], np.ndarray]]] = {}
        for quantity, per_optimizer, _, stats in _DIAG_SPECS:
            if quantity not in self.diagnostics:
                continue
            owners = list(self.layer_names.items()) if per_optimizer else [(-1, self._act_names)]
            for idx, names in owners:
                for row, name in enumerate(names):
                    self._diag_rows[self._diag_tag(f"{quantity}/{name}", idx)] = (quantity, idx, row)
                if len(names) > _DIAG_LINES:
                    self._diag_blocks[(quantity, idx)] = [
                        (
                            block,
                            {stat: self._diag_tag(f"{quantity}_block/{block}/{stat}", idx) for stat in stats},
                            np.asarray(members, dtype=np.int64),
                        )
                        for block, members in layer_blocks(names, _DIAG_LINES)
                    ]

    def _diag_tag(self, name: str, opt_idx: int) -> str:
        # A per-optimizer diagnostic follows :meth:`tag`; a model-wide one (opt_idx -1) has no optimizer component.
        return self.tag(name, opt_idx) if opt_idx >= 0 else f"{_PREFIX}{name}"

    def _diagnostic_charts(self) -> dict[str, list[Any]]:
        """The "GradGuard diagnostics" charts of the diagnostics fed (empty when none)."""
        charts: dict[str, list[Any]] = {}
        for quantity, per_optimizer, title, stats in _DIAG_SPECS:
            if quantity not in self.diagnostics:
                continue
            for idx in range(len(self.optimizer_names)) if per_optimizer else [-1]:
                suffix = f" ({self._opt_label(idx)})" if per_optimizer and self.multi_optimizer else ""
                blocks = self._diag_blocks.get((quantity, idx))
                if blocks is None:
                    prefix = self._diag_tag(f"{quantity}/", idx)
                    charts[f"{title}{suffix}"] = ["Multiline", [f"^{re.escape(prefix)}"]]
                    continue
                for stat in stats:
                    tags = [f"^{re.escape(tags[stat])}$" for _, tags, _ in blocks]
                    charts[f"{title}: {_STAT_WORDS[stat]} per block{suffix}"] = ["Multiline", tags]
        if "noise_scale" in self.diagnostics:
            charts["gradient noise scale (critical batch size)"] = [
                "Multiline",
                [f"^{re.escape(_PREFIX + 'noise_scale')}$"],
            ]
        return charts

    def _take_diagnostics(self, step: int, items: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
        """Feed the diagnostic scalars among ``items`` to the pictures; return the block statistics to write."""
        if not self._diag_rows:
            return []
        columns: dict[tuple[str, int], np.ndarray] = {}
        for tag, value in items:
            found = self._diag_rows.get(tag)
            if found is None:
                continue
            quantity, idx, row = found
            column = columns.get((quantity, idx))
            if column is None:
                size = len(self._act_names) if idx < 0 else len(self.layer_names[idx])
                column = columns[(quantity, idx)] = np.full(size, np.nan)
            column[row] = value
        out: list[tuple[str, float]] = []
        for (quantity, idx), column in columns.items():
            for _, tags, members in self._diag_blocks.get((quantity, idx), []):
                values = column[members]
                values = values[np.isfinite(values)]
                if values.size:  # a block with no measured layer is not written
                    out += [(tag, float(_REDUCERS[stat](values))) for stat, tag in tags.items()]
            if quantity == "update_ratio" and idx in self._ratio_histories:
                none = np.zeros(column.shape, dtype=bool)
                measured = np.isfinite(column)
                self._ratio_histories[idx].append(step, np.where(measured, column, _ABSENT), none, none)
        if "act_grad" in self.diagnostics:
            # Every activation-gradient tag, those of layers no optimizer holds (a frozen backbone) included: the
            # callback writes them in definition order, which is the picture's depth order.
            flow = {
                tag[len(_ACT_PREFIX) :]: value
                for tag, value in items
                if tag.startswith(_ACT_PREFIX) and math.isfinite(value)
            }
            if flow:
                self._add_flow_column(step, flow)
        return out

    def _add_flow_column(self, step: int, values: dict[str, float]) -> None:
        # The newest write's order first: older names it lacks follow, in their own order.
        self._flow_order = list(dict.fromkeys([*values, *self._flow_order]))
        if self._flow_columns and self._flow_columns[-1][0] == step:
            self._flow_columns[-1][1].update(values)
            return
        if len(self._flow_columns) >= _FLOW_COLUMNS:
            # Keep every other step: the columns kept stay spread evenly over the whole run.
            self._flow_columns = self._flow_columns[::2]
        self._flow_columns.append((step, values))

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
        items += self._take_diagnostics(int(step), items)
        self._add_scalars(int(step), items)

    def write_layer_norms(
        self,
        step: int,
        opt_idx: int,
        norms: np.ndarray,
        exploding: np.ndarray,
        vanishing: np.ndarray,
        present: np.ndarray | None = None,
        nonfinite: np.ndarray | None = None,
        scalars: bool = True,
    ) -> None:
        """Write ``gradguard/layer/<name>`` for each layer of one optimizer and add a heatmap column.

        When the layout charts this optimizer's layers as blocks, also write ``gradguard/block/<block>/max`` and
        ``/median`` (over the block's layers with a finite gradient).

        Args:
            step: the global step.
            opt_idx: the optimizer index.
            norms: ``[L]`` per-layer gradient norms, in the order of ``layer_names[opt_idx]``.
            exploding: ``[L]`` flags of layers exploding at this step.
            vanishing: ``[L]`` flags of layers vanishing at this step.
            present: optional ``[L]`` flags of layers that had a gradient; others are not written and show as "no
                gradient" in the heatmap.
            nonfinite: optional ``[L]`` flags of layers with a non-finite gradient since the last column: shown as
                non-finite in the heatmap, whatever their latest norm (written as the scalar).
            scalars: write the per-layer (and block) scalars; ``False`` feeds the pictures only
                (``GradGuard(log_layers=False)``).
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
        if scalars:
            tags = self._layer_tags[opt_idx]
            items = [(tags[i], float(norms[i])) for i in np.flatnonzero(mask).tolist()]
            if opt_idx in self._blocks:
                # Block summaries over the layers that had a finite gradient; a block with none is not written.
                usable = mask & np.isfinite(norms) & (norms >= 0)
                for _, max_tag, median_tag, members in self._blocks[opt_idx]:
                    values = norms[members[usable[members]]]
                    if values.size:
                        items += [(max_tag, float(values.max())), (median_tag, float(np.median(values)))]
            self._add_scalars(int(step), items)
        column = np.where(mask, norms, _ABSENT)
        heat = column
        if nonfinite is not None:
            # A skipped NaN step between two logs leaves a finite latest norm: the heatmap shows the event, as for an
            # explosion between two logs; the bar chart keeps the latest norms.
            heat = column.copy()
            heat[np.asarray(nonfinite, dtype=bool).reshape(-1)] = np.nan
        self._histories[opt_idx].append(int(step), heat, exploding & mask, vanishing & mask)
        self._latest[opt_idx] = (int(step), column, exploding & mask, vanishing & mask)

    def _names(self, opt_idx: int) -> list[str]:
        if opt_idx not in self.layer_names:
            raise ValueError(f"`opt_idx` must be one of {sorted(self.layer_names)}, got {opt_idx!r}")
        return self.layer_names[opt_idx]

    # ---------------------------------------------------------------------------------------------------- images
    def set_bands(self, opt_idx: int, low: float | None, high: float | None, low_ratio: float | None = None) -> None:
        """Set the vanishing floor and exploding ceiling drawn on the bar chart of optimizer ``opt_idx``.

        Args:
            opt_idx: the optimizer index.
            low: the absolute vanishing floor (``VanishingDetector.min_norm``).
            high: the exploding ceiling per layer (``ExplodingDetector.max_layer_norm``).
            low_ratio: the relative vanishing floor (``VanishingDetector.ratio``): the floor drawn is then the
                detector's, ``max(low, low_ratio * largest layer norm)`` of the step drawn.

        A value of 0 (a detector without that bound, e.g. ``VanishingDetector(min_norm=0)``) draws no band, as
        ``None``.
        """
        self._names(opt_idx)
        for arg, value in (("low", low), ("high", high), ("low_ratio", low_ratio)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{arg}` must be None or a finite float >= 0, got {value!r}")
        low, high, low_ratio = (float(v) if v else None for v in (low, high, low_ratio))
        self._bands[opt_idx] = (low, high, low_ratio)

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
        low, high, low_ratio = self._bands.get(opt_idx, (None, None, None))
        finite = norms[np.isfinite(norms) & (norms > 0)]
        if low_ratio is not None and finite.size:
            low = max(low or 0.0, low_ratio * float(finite.max()))
        title = f"gradient flow at step {step}"
        if self.multi_optimizer:
            title += f" ({self._opt_label(opt_idx)})"
        return render_bars(
            norms,
            names,
            low=low,
            high=high,
            exploding=exploding,
            vanishing=vanishing,
            max_bars=self.max_heatmap_rows,
            title=title,
        )

    def update_ratio_image(self, opt_idx: int = 0) -> np.ndarray | None:
        """The update-to-weight ratio heatmap of one optimizer, or ``None`` before any ratio was written."""
        names = self._names(opt_idx)
        history = self._ratio_histories.get(opt_idx)
        if history is None:
            return None
        steps, ratios, _, _ = history.columns()
        if not names or steps.size == 0:
            return None
        title = "update/weight ratio ||Δθ|| / ||θ|| per layer (log10)"
        if self.multi_optimizer:
            title += f" ({self._opt_label(opt_idx)})"
        return render_update_ratio_heatmap(ratios, names, steps.tolist(), max_rows=self.max_heatmap_rows, title=title)

    def act_grad_flow_image(self) -> np.ndarray | None:
        """The flow-through-depth picture of the activation-gradient norms, or ``None`` before any was written."""
        if not self._flow_columns:
            return None
        names = self._flow_order
        norms = np.array([[values.get(name, np.nan) for _, values in self._flow_columns] for name in names])
        steps = [step for step, _ in self._flow_columns]
        return render_depth_flow(norms, names, steps, max_points=4 * self.max_heatmap_rows)

    def write_images(self, step: int) -> None:
        """Draw ``gradguard/gradient_flow`` (heatmap) and ``gradguard/gradient_flow_bars`` (latest norms), and for
        the diagnostics fed, ``gradguard/update_ratio_heatmap`` and ``gradguard/act_grad_flow``."""
        for idx in self.layer_names:
            heatmap = self.heatmap_image(idx)
            if heatmap is not None:
                self.writer.add_image(self._image_tag("gradient_flow", idx), heatmap, step, dataformats="HWC")
            bars = self.bars_image(idx)
            if bars is not None:
                self.writer.add_image(self._image_tag("gradient_flow_bars", idx), bars, step, dataformats="HWC")
            ratio = self.update_ratio_image(idx)
            if ratio is not None:
                self.writer.add_image(self._image_tag("update_ratio_heatmap", idx), ratio, step, dataformats="HWC")
        flow = self.act_grad_flow_image()
        if flow is not None:
            self.writer.add_image(f"{_PREFIX}act_grad_flow", flow, step, dataformats="HWC")
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
        """Write the detectors' events: the ``gradguard/events_log`` table and the ``gradguard/trouble/`` scalars.

        Each row has the keys ``step``, ``kind``, ``layer``, ``value``, ``action`` (and ``opt``, the optimizer
        index, shown as a column when there are several optimizers). The markdown table shows the last 200 rows. A
        row of a kind in :data:`TROUBLE_KINDS` that names a layer is also written as the scalar
        ``gradguard/trouble/<kind>/<layer>`` at the row's own step, valued at the layer's norm then (NaN for a
        non-finite one): a complete, machine-readable record of which layer the detectors flagged when, charted as
        "layers in trouble" and read back by ``gradguard report``. Nothing is written when ``rows`` is empty.
        """
        if not rows:
            return
        trouble: dict[int, list[tuple[str, float]]] = {}
        for row in rows:
            kind, layer = row.get("kind"), row.get("layer")
            if kind in TROUBLE_KINDS and layer is not None:
                value = row.get("value")
                number = float(value) if isinstance(value, (int, float, np.number)) else math.nan
                at = row.get("step")
                at = int(at) if isinstance(at, (int, np.integer)) else int(step)
                opt = row.get("opt")
                key = self.layer_key(str(layer), opt) if isinstance(opt, int) else layer
                trouble.setdefault(at, []).append((f"{_PREFIX}trouble/{kind}/{key}", number))
        for at, items in sorted(trouble.items()):
            self._add_scalars(at, items)
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

    def write_derived(self, step: int, metrics: dict[str, float]) -> None:
        """Write the tags the board derives from the run-level metrics that went to the loggers.

        Today: ``gradguard/ema_log10/{mean,lower,upper}`` (per optimizer, see :meth:`tag`), the ``log10`` of the
        exploding detector's EMA band, charted as "EMA band, log10": early in a run the band's upper edge sits
        decades above its mean and would squash a linear chart. Values that are missing, non-finite or not positive
        are left out.

        Args:
            step: the global step.
            metrics: the metrics of this logging step, keyed by full tag (``gradguard/ema_mean``, ...).
        """
        items = []
        for idx in range(len(self.optimizer_names)):
            for part in _EMA_PARTS:
                value = metrics.get(self.tag(f"ema_{part}", idx))
                if value is not None and math.isfinite(value) and value > 0:
                    items.append((self.tag(f"ema_log10/{part}", idx), math.log10(value)))
        self._add_scalars(int(step), items)

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``gradguard/config``, a markdown table of the (flattened) configuration; once per board."""
        if self._config_written:
            return
        self.writer.add_text(f"{_PREFIX}config", _md_table(["setting", "value"], _flatten(config)), 0)
        self._config_written = True

    def close_run(self, step: int) -> None:
        """Draw the final images (unless already drawn at ``step``, or pictures are off) and flush the writer."""
        drawn = (
            self._latest or self._flow_columns or any(h.size or h.pending_count for h in self._ratio_histories.values())
        )
        if self.image_every_n_steps is not None and drawn and self._last_image_step != step:
            self.write_images(step)
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            flush()

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The heatmap histories (gradient norms, update ratios), event table and image/histogram schedule (plain
        values and tensors only)."""
        return {
            "histories": {idx: history.state_dict() for idx, history in self._histories.items()},
            "ratio_histories": {idx: history.state_dict() for idx, history in self._ratio_histories.items()},
            "layer_names": {idx: list(names) for idx, names in self.layer_names.items()},
            "events": [dict(event) for event in self._events],
            "last_image_step": self._last_image_step,
            "last_histogram_step": self._last_histogram_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Each history follows its layers by name where the state names them (layers
        added or dropped since, e.g. an unfreezing schedule); a state without names (an older version) restores
        only the histories whose layer count is unchanged. The flow-through-depth picture starts afresh."""
        saved_names = {int(idx): list(names) for idx, names in state.get("layer_names", {}).items()}
        for key, histories in (("histories", self._histories), ("ratio_histories", self._ratio_histories)):
            for idx, history_state in state.get(key, {}).items():
                idx = int(idx)
                if idx not in histories:
                    continue
                rows = len(history_state["norms"])
                names = saved_names.get(idx)
                if names is not None and len(names) == rows:
                    saved = _LayerHistory(rows, self.history)
                    saved.load_state_dict(history_state)
                    where = {name: row for row, name in enumerate(names)}
                    histories[idx] = saved.remapped([where.get(name, -1) for name in self.layer_names[idx]])
                elif rows == len(self.layer_names[idx]):
                    histories[idx].load_state_dict(history_state)
        self._events = [dict(event) for event in state.get("events", [])][-_MAX_EVENT_ROWS:]
        self._last_image_step = state.get("last_image_step")
        self._last_histogram_step = state.get("last_histogram_step")


def _is_torch_writer(writer: Any) -> bool:
    from torch.utils.tensorboard import SummaryWriter

    return isinstance(writer, SummaryWriter)
