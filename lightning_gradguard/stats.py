"""Per-layer gradient norms in one pass, as device tensors (no host-device sync)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gradguard._compat import foreach_norm, group_by_device_and_dtype

__all__ = ["FlatStats", "GradStats", "StepStats", "total_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_PLAIN = {Tensor}


def _local(t: Tensor) -> Tensor:
    # FSDP2 gradients are DTensors sharded on dim 0: norms are taken on the local shard and summed across ranks.
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _dense(t: Tensor) -> Tensor:
    # A sparse gradient's norm is the norm of its (coalesced) values.
    return t.coalesce().values() if t.is_sparse else t


def _foreach_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norms of ``tensors`` (same device and dtype) as one fp32 vector.

    Half-precision tensors are reduced in fp32, so a finite fp16 gradient whose norm exceeds 65504 does not read as inf.
    """
    if tensors[0].dtype in _LOW_PRECISION:
        norms = foreach_norm(tensors, 2.0, dtype=torch.float32)
    else:
        norms = foreach_norm(tensors, 2.0)
    stacked = torch.stack(norms)
    return stacked if stacked.dtype == torch.float32 else stacked.to(torch.float32)


def _grouped_norms(tensors: list[Tensor], device: torch.device) -> tuple[Tensor, list[int] | None]:
    """Norms of ``tensors`` (any devices/dtypes) on ``device``, and the order of the result as indices into ``tensors``
    (``None``: the order of ``tensors``, the usual case of a single device and dtype)."""
    # Asking for the indices costs a third more; with a single group the order is the input order anyway.
    groups = group_by_device_and_dtype([tensors])
    if len(groups) == 1:
        (group_device, _), ([group], _) = next(iter(groups.items()))
        norms = _foreach_norms(group)
        return (norms if group_device == device else norms.to(device, non_blocking=True)), None
    groups = group_by_device_and_dtype([tensors], with_indices=True)
    parts: list[Tensor] = []
    order: list[int] = []
    for (_, _), ([group], indices) in groups.items():
        parts.append(_foreach_norms(group).to(device, non_blocking=True))
        order.extend(indices)
    return torch.cat(parts), order


def _flat_source(
    local: list[Tensor], device: torch.device, grad_scale: Tensor | None
) -> tuple[Tensor, list[int] | None]:
    """``[P]`` fp32 on ``device``: the squared norms; and their order (see :func:`_grouped_norms`).

    The norms are stacked into one vector before squaring: a ``_foreach_mul`` over the list of 0-d norms would save
    an op on paper, but allocates one tensor per parameter and, on a CPU, runs one kernel per parameter (twice the
    time of the whole measurement on a 3000-tensor model).
    """
    vector, order = _grouped_norms(local, device)
    if grad_scale is not None:
        vector = vector / grad_scale.to(device=device, dtype=torch.float32)
    return vector * vector, order


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small index tensor built on the host to ``device`` without making the host wait (pinned + async)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def total_norm(grads: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all ``grads`` together, as a 0-d fp32 tensor, without a host-device sync.

    Args:
        grads: gradient tensors (any mix of devices and dtypes).

    Example:
        >>> import torch
        >>> total_norm([torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64)])
        tensor(5.)
    """
    tensors = [_dense(_local(g)) for g in grads]
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms, _ = _grouped_norms(tensors, tensors[0].device)
    return norms.square().sum().sqrt()


@dataclass
class _Segments:
    """Device-side index tensors for one pattern of parameters with gradients."""

    layer_ids: Tensor  # [P] layer of each norm, in the order the norms come out
    present: Tensor  # [L] bool
    order: list[int] | None  # order of the norms (None: parameter order)
    zeros: Tensor  # [L] fp32 zeros, the base of the index_add


@dataclass
class FlatStats:
    """One step's gradient measurement as a single flat device vector, the input of the per-step pipeline.

    Attributes:
        flat: ``[L]`` fp32: each layer's squared gradient norm (``inf`` or ``NaN`` for a layer with an inf/NaN
            entry, and ``inf`` for one whose squared norm overflows float32).
        present: ``[L]`` bool, which layers received a gradient this step.
        grads: the gradients that are not ``None``, in parameter order.
        params: their parameters.
        param_indices: their positions in the engine's parameter list.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> params = list(model.parameters())
        >>> measured = GradStats(params, [0, 0, 1, 1], 2).measure()
        >>> total, layer_norm, finite = measured.split()
        >>> measured.flat.shape, layer_norm.shape, finite.tolist()
        (torch.Size([2]), torch.Size([2]), [True, True])
    """

    flat: Tensor
    present: Tensor
    grads: list[Tensor]
    params: list[Tensor]
    param_indices: list[int]

    def split(self) -> tuple[Tensor, Tensor, Tensor]:
        """The total norm (0-d), the per-layer norms ``[L]`` and ``[L]`` bool "norm finite" (see :func:`split_flat`)."""
        return split_flat(self.flat)


def nonfinite_weights(params: Sequence[Tensor], layer_of_param: Sequence[int], names: Sequence[str]) -> list[str]:
    """The layers whose trainable parameters hold an inf or NaN, in definition order.

    Reads the device (one copy): for a warning about non-finite gradients, not for the quiet step. Weights that are
    non-finite themselves make every later gradient non-finite, whatever the batch.

    Example:
        >>> w = [torch.nn.Parameter(torch.tensor([1.0, v])) for v in (2.0, float("nan"), 3.0)]
        >>> nonfinite_weights(w, [0, 0, 1], ["a", "b"])
        ['a']
    """
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if not trainable:
        return []
    tensors = [_local(params[i].detach()) for i in trainable]
    norms, order = _grouped_norms(tensors, tensors[0].device)
    positions = order if order is not None else range(len(tensors))
    finite = norms.isfinite().tolist()
    bad = {layer_of_param[trainable[i]] for i, ok in zip(positions, finite) if not ok}
    return [names[layer] for layer in sorted(bad)]


def nan_buffers(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s floating-point and complex buffers that hold a NaN, in definition order.

    Reads the device (one copy per buffer): for a warning, not for the quiet step. A buffer the forward pass reads (a
    running mean, an EMA teacher's centre) that took a NaN in makes every later batch's loss NaN, with finite weights.
    An infinity alone is left out: a causal attention mask holds ``-inf`` by design.

    Example:
        >>> net = torch.nn.BatchNorm1d(2)
        >>> net.running_mean[1] = float("nan")
        >>> net.register_buffer("mask", torch.tensor([0.0, -math.inf]))
        >>> nan_buffers(net)
        ['running_mean']
    """
    return [
        name
        for name, buffer in module.named_buffers()
        if (buffer.is_floating_point() or buffer.is_complex()) and bool(torch.isnan(_local(buffer.detach())).any())
    ]


def split_flat(flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The total norm (0-d), the per-layer norms ``[L]`` and ``[L]`` bool "norm finite" of a :attr:`FlatStats.flat`
    vector: a layer's norm is not finite when an entry is inf or NaN, or when the gradient, finite, is too large for
    its squared norm to be a float32 (a norm above about 1.8e19: fp64 gradients, or the last step before inf)."""
    layer_norm = flat.sqrt()
    # The total is a fixed-order reduction over the layers (not an atomic sum over parameters), so every rank of a
    # distributed run, and every rerun, gets the same bits and takes the same decisions. A norm that overflows is
    # not finite either: no clipper can scale by it, and a step nobody can measure is not one to apply.
    return torch.linalg.vector_norm(layer_norm), layer_norm, layer_norm < math.inf


@dataclass
class StepStats:
    """What one optimizer step's gradients look like. Every field is a device tensor (or a list of them).

    Attributes:
        layer_norm: ``[L]`` fp32 L2 gradient norm per layer (0 for a layer without gradients this step).
        total_norm: 0-d fp32 L2 norm over all gradients.
        nonfinite: 0-d bool, True when any gradient entry is inf or NaN.
        layer_nonfinite: ``[L]`` bool, which layers carry non-finite values.
        layer_present: ``[L]`` bool, which layers received a gradient this step.
        grads: the gradients that are not ``None``, in parameter order.
        params: their parameters.
        param_indices: their positions in the engine's parameter list.
        layer_param_norm: ``[L]`` fp32 L2 norm of each layer's parameters, when asked for.

    Example:
        >>> import torch
        >>> from lightning_gradguard import GuardEngine
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> model(torch.ones(4, 2)).sum().backward()
        >>> stats = GuardEngine(model).step()  # what a step measured, before the optimizer steps
        >>> stats.layer_norm.shape, bool(stats.nonfinite)
        (torch.Size([2]), False)
    """

    layer_norm: Tensor
    total_norm: Tensor
    nonfinite: Tensor
    layer_nonfinite: Tensor
    layer_present: Tensor
    grads: list[Tensor]
    params: list[Tensor]
    param_indices: list[int]
    layer_param_norm: Tensor | None = None


class GradStats:
    """Per-layer gradient norms, the total norm and a non-finite flag, in one pass per step.

    The per-parameter norms come from ``torch._foreach_norm`` (one fused call per device and dtype); a segment sum
    (``index_add_``) folds them into one squared norm per layer. Nothing is copied to the host, so the call never
    waits for the device.

    Args:
        params: the parameters to watch.
        layer_of_param: for each parameter, the index of its layer.
        num_layers: the number of layers.
        distributed_sum: sum the per-layer squared norms over all ranks with one ``all_reduce``. Needed when each
            rank holds a shard of the gradients (FSDP2); ``None`` decides from the gradients (``DTensor`` -> sum).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_gradguard import build_layer_index
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> index = build_layer_index(model)
        >>> stats = GradStats(index.params, index.layer_of_param, index.num_layers).compute()
        >>> stats.layer_norm.shape
        torch.Size([2])
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        layer_of_param: Sequence[int],
        num_layers: int,
        distributed_sum: bool | None = None,
    ) -> None:
        if len(params) != len(layer_of_param):
            raise ValueError(
                f"`layer_of_param` must have one entry per parameter ({len(params)}), got {len(layer_of_param)}"
            )
        if num_layers < 1 or any(not 0 <= i < num_layers for i in layer_of_param):
            raise ValueError(f"`layer_of_param` entries must lie in [0, num_layers={num_layers})")
        self.params = list(params)
        self.layer_of_param = list(layer_of_param)
        self.num_layers = num_layers
        self.distributed_sum = distributed_sum
        # Keyed by which parameters have gradients, which rarely changes: the device-side index tensors are built once.
        self._cache: dict[tuple[int, ...] | None, _Segments] = {}
        self._all = list(range(len(self.params)))

    def _layer_ids(self, present: list[int], order: list[int] | None, device: torch.device) -> Tensor:
        """The layer of each norm, in the order ``_grouped_norms`` returned them (``None``: parameter order)."""
        positions = range(len(present)) if order is None else order
        return _upload(torch.tensor([self.layer_of_param[present[i]] for i in positions], dtype=torch.long), device)

    def _segments(
        self, present: list[int], order: list[int] | None, device: torch.device, all_present: bool
    ) -> _Segments:
        key = None if all_present else tuple(present)
        hit = self._cache.get(key)
        if hit is None or hit.order != order or hit.layer_ids.device != device:
            layer_ids = self._layer_ids(present, order, device)
            mask = torch.zeros(self.num_layers, dtype=torch.bool)
            mask[[self.layer_of_param[i] for i in present]] = True
            hit = _Segments(
                layer_ids=layer_ids,
                present=_upload(mask, device),
                order=order,
                zeros=torch.zeros(self.num_layers, dtype=torch.float32, device=device),
            )
            if len(self._cache) > 64:  # layers appearing mid-run (unfreezing) must not grow this forever
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def _gradients(self, general: bool = False) -> tuple[list[Tensor], list[Tensor], list[int], list[Tensor]] | None:
        """Gradients, parameters, positions and plain local tensors of the parameters that have a gradient."""
        # A parameter frozen mid-run keeps the zeros of ``zero_grad(set_to_none=False)``: frozen, it has no gradient
        # (its zero norm would read as a vanishing layer).
        all_grads = [p.grad if p.requires_grad else None for p in self.params]
        # The usual step: every parameter has a plain tensor gradient (no None, no DTensor), so the gradient list is
        # the parameter list's and nothing needs converting. A set of the types is the cheapest test of that.
        if not general and all_grads and {type(g) for g in all_grads} == _PLAIN:
            return all_grads, list(self.params), list(self._all), all_grads  # type: ignore[return-value]
        grads: list[Tensor] = []
        params: list[Tensor] = []
        present: list[int] = []
        for i, (p, g) in enumerate(zip(self.params, all_grads)):
            if g is not None:
                if g.is_sparse and not g.is_coalesced():
                    # Same gradient, duplicates summed (as the optimizer would do): norms, clipping and the in-place
                    # non-finite repair then all work on one tensor whose values are the gradient's entries.
                    g = p.grad = g.coalesce()
                grads.append(g)
                params.append(p)
                present.append(i)
        if not grads:
            return None
        return grads, params, present, [_dense(_local(g)) for g in grads]

    def measure(self, *, grad_scale: Tensor | None = None) -> FlatStats | None:
        """Measure the gradients currently in ``.grad`` into one flat vector (``None``: no parameter has one).

        Four ops in the usual case (one device and dtype): ``_foreach_norm``, ``stack``, the squares and
        ``index_add``; under FSDP2 one ``all_reduce`` more.

        Args:
            grad_scale: the factor the gradients are still multiplied by (a GradScaler's scale when the optimizer
                unscales inside ``step``); the norms reported are those of the true, unscaled gradients.
        """
        found = self._gradients()
        if found is None:
            return None
        grads, params, present, local = found
        device = local[0].device
        try:
            source, order = _flat_source(local, device, grad_scale)
        except NotImplementedError:  # a sparse gradient (no norm kernel for it): measure its coalesced values
            found = self._gradients(general=True)
            assert found is not None
            grads, params, present, local = found
            source, order = _flat_source(local, device, grad_scale)
        seg = self._segments(present, order, device, len(present) == len(self.params))
        flat = torch.index_add(seg.zeros, 0, seg.layer_ids, source)
        if self._should_all_reduce(grads[0]):
            torch.distributed.all_reduce(flat)
        return FlatStats(flat=flat, present=seg.present, grads=grads, params=params, param_indices=present)

    def compute(self, *, param_norms: bool = False, grad_scale: Tensor | None = None) -> StepStats:
        """Measure the gradients currently in ``.grad``.

        Args:
            param_norms: also compute each layer's parameter norm (AGC-style ratios, logging).
            grad_scale: the factor the gradients are still multiplied by (a GradScaler's scale when the optimizer
                unscales inside ``step``); the norms reported are those of the true, unscaled gradients.
        """
        measured = self.measure(grad_scale=grad_scale)
        if measured is None:
            device = self.params[0].device if self.params else torch.device("cpu")
            zeros = torch.zeros(self.num_layers, device=device)
            false = torch.zeros((), dtype=torch.bool, device=device)
            return StepStats(zeros, zeros.sum(), false, zeros.bool(), zeros.bool(), [], [], [])
        total, layer_norm, layer_finite = measured.split()
        layer_nonfinite = ~layer_finite
        stats = StepStats(
            layer_norm=layer_norm,
            total_norm=total,
            nonfinite=~(total < math.inf),  # also finite layers whose norms overflow together
            layer_nonfinite=layer_nonfinite,
            layer_present=measured.present,
            grads=measured.grads,
            params=measured.params,
            param_indices=measured.param_indices,
        )
        if param_norms:
            params = measured.params
            device = layer_norm.device
            pnorms, porder = _grouped_norms([_local(p.detach()) for p in params], device)
            pids = self._layer_ids(measured.param_indices, porder, device)
            psq = torch.zeros(self.num_layers, dtype=torch.float32, device=device).index_add_(0, pids, pnorms.square())
            if self._should_all_reduce(measured.grads[0]):
                torch.distributed.all_reduce(psq)
            stats.layer_param_norm = psq.sqrt()
        return stats

    def _should_all_reduce(self, sample_grad: Tensor) -> bool:
        if self.distributed_sum is None:
            self.distributed_sum = hasattr(sample_grad, "to_local") and hasattr(sample_grad, "placements")
        return bool(self.distributed_sum) and torch.distributed.is_available() and torch.distributed.is_initialized()
