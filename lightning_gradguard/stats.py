"""Per-layer gradient norms in one pass, as device tensors (no host-device sync)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["GradStats", "StepStats", "total_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _local(t: Tensor) -> Tensor:
    # FSDP2 gradients are DTensors sharded on dim 0: norms are taken on the local shard and summed across ranks.
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _dense(t: Tensor) -> Tensor:
    # A sparse gradient's norm is the norm of its (coalesced) values.
    return t.coalesce()._values() if t.is_sparse else t


def _foreach_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norms of ``tensors`` (same device and dtype) as one fp32 vector.

    Half-precision tensors are reduced in fp32, so a finite fp16 gradient whose norm exceeds 65504 does not read as inf.
    """
    if tensors[0].dtype in _LOW_PRECISION:
        norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
    else:
        norms = torch._foreach_norm(tensors, 2.0)
    return torch.stack(norms).to(torch.float32)


def _grouped_norms(tensors: list[Tensor], device: torch.device) -> tuple[Tensor, list[int]]:
    """Norms of ``tensors`` (any devices/dtypes) on ``device``, and the order of the result as indices into ``tensors``."""
    groups = _group_tensors_by_device_and_dtype([tensors], with_indices=True)  # type: ignore[list-item]
    parts: list[Tensor] = []
    order: list[int] = []
    for (_, _), ([group], indices) in groups.items():
        parts.append(_foreach_norms(group).to(device, non_blocking=True))  # type: ignore[arg-type]
        order.extend(indices)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), order


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
        self._cache: dict[tuple[int, ...] | None, tuple[Tensor, Tensor, list[int]]] = {}

    def _segments(self, present: list[int], order: list[int], device: torch.device, all_present: bool) -> tuple[Tensor, Tensor]:
        key = None if all_present else tuple(present)
        hit = self._cache.get(key)
        if hit is None or hit[2] != order or hit[0].device != device:
            layer_ids = torch.tensor([self.layer_of_param[present[i]] for i in order], dtype=torch.long, device=device)
            mask = torch.zeros(self.num_layers, dtype=torch.bool)
            mask[[self.layer_of_param[i] for i in present]] = True
            hit = (layer_ids, mask.to(device), order)
            if len(self._cache) > 64:  # layers appearing mid-run (unfreezing) must not grow this forever
                self._cache.clear()
            self._cache[key] = hit
        return hit[0], hit[1]

    def compute(self, *, param_norms: bool = False, grad_scale: Tensor | None = None) -> StepStats:
        """Measure the gradients currently in ``.grad``.

        Args:
            param_norms: also compute each layer's parameter norm (AGC-style ratios, logging).
            grad_scale: the factor the gradients are still multiplied by (a GradScaler's scale when the optimizer
                unscales inside ``step``); the norms reported are those of the true, unscaled gradients.
        """
        grads: list[Tensor] = []
        params: list[Tensor] = []
        present: list[int] = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None:
                if g.is_sparse and not g.is_coalesced():
                    # Same gradient, duplicates summed (as the optimizer would do): norms, clipping and the in-place
                    # non-finite repair then all work on one tensor whose values are the gradient's entries.
                    g = p.grad = g.coalesce()
                grads.append(g)
                params.append(p)
                present.append(i)
        device = grads[0].device if grads else (self.params[0].device if self.params else torch.device("cpu"))
        if not grads:
            zeros = torch.zeros(self.num_layers, device=device)
            false = torch.zeros((), dtype=torch.bool, device=device)
            return StepStats(zeros, zeros.sum(), false, zeros.bool(), zeros.bool(), [], [], [])

        local = [_dense(_local(g)) for g in grads]
        device = local[0].device
        norms, order = _grouped_norms(local, device)
        layer_ids, layer_present = self._segments(present, order, device, len(present) == len(self.params))
        if grad_scale is not None:
            norms = norms / grad_scale.to(device=device, dtype=torch.float32)

        # One vector of [squared norms | non-finite counts] so that a sharded run needs one all_reduce, not two.
        values = torch.cat([norms.square(), (~torch.isfinite(norms)).to(torch.float32)])
        index = torch.cat([layer_ids, layer_ids + self.num_layers])
        per_layer = torch.zeros(2 * self.num_layers, dtype=torch.float32, device=device).index_add_(0, index, values)
        if self._should_all_reduce(grads[0]):
            torch.distributed.all_reduce(per_layer)
        layer_sq, layer_bad = per_layer[: self.num_layers], per_layer[self.num_layers :]
        layer_nonfinite = layer_bad > 0
        # A NaN anywhere must show in the total, even if the square sum of another layer overflowed to inf.
        total = layer_sq.sum().sqrt()
        stats = StepStats(
            layer_norm=layer_sq.sqrt(),
            total_norm=total,
            nonfinite=layer_nonfinite.any(),
            layer_nonfinite=layer_nonfinite,
            layer_present=layer_present,
            grads=grads,
            params=params,
            param_indices=present,
        )
        if param_norms:
            pnorms, porder = _grouped_norms([_local(p.detach()) for p in params], device)
            pids = layer_ids if porder == order else torch.tensor(
                [self.layer_of_param[present[i]] for i in porder], dtype=torch.long, device=device
            )
            psq = torch.zeros(self.num_layers, dtype=torch.float32, device=device).index_add_(0, pids, pnorms.square())
            if self._should_all_reduce(grads[0]):
                torch.distributed.all_reduce(psq)
            stats.layer_param_norm = psq.sqrt()
        return stats

    def _should_all_reduce(self, sample_grad: Tensor) -> bool:
        if self.distributed_sum is None:
            self.distributed_sum = hasattr(sample_grad, "to_local") and hasattr(sample_grad, "placements")
        return bool(self.distributed_sum) and torch.distributed.is_available() and torch.distributed.is_initialized()
