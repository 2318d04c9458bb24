"""Running statistics of normalization layers and quantization observers that a bad batch cannot poison.

Skipping a step with non-finite gradients keeps the parameters and the optimizer state as they were, but the forward
pass of the bad batch has already moved every ``BatchNorm``'s ``running_mean`` and ``running_var``: one NaN in the
batch makes them NaN, and an exponential average never recovers from a NaN (``0.9 * nan + 0.1 * x`` is ``nan``).
Training goes on unharmed, since training mode normalizes with the batch's own statistics, but every evaluation after
it (validation, test, the deployed model) outputs NaN. :class:`RunningStats` puts back the last finite value of each
entry that turned non-finite, once per optimizer step, on the device and without waiting for it.

Quantization-aware training has the same trap in its observers: a ``FakeQuantize``'s observer takes the batch's
minimum and maximum into ``min_val``/``max_val``, and from them its ``scale``; one NaN input makes them NaN, and every
later forward pass quantizes to NaN. The weights stay finite and every step after it is skipped, so training stops
for good while the LR guard, seeing only non-finite steps, keeps lowering the rate.

A rollback has the same blind spot: it puts the weights back, while the running statistics keep what the wrecked
weights produced (a ``running_var`` of 1e5 where 1 is usual, which an average with ``momentum=0.1`` takes hundreds of
steps to forget, and every evaluation until then is off). :meth:`RunningStats.snapshot` and
:meth:`RunningStats.restore_` let a rollback keep them with its copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedBuffer

from lightning_gradguard._compat import foreach_copy_
from lightning_gradguard._validation import check_bool

__all__ = ["RunningStats"]

_NORM_BUFFERS = ("running_mean", "running_var")


def _watched(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s buffers that a forward pass averages into: a normalization layer's running
    statistics, a quantization observer's or fake-quantize module's floating-point buffers (``min_val``,
    ``max_val``, ``scale``; the integer ones, a zero point or an on/off flag, are not averaged from the data)."""
    if isinstance(module, _NormBase):
        return _NORM_BUFFERS if module.track_running_stats else ()
    if isinstance(module, _QUANT_OBSERVERS):
        return tuple(name for name, b in module.named_buffers(recurse=False) if b.is_floating_point())
    return ()


def _quant_observers() -> tuple[type, ...]:
    try:
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase
        from torch.ao.quantization.observer import ObserverBase
    except ImportError:  # pragma: no cover - a torch built without quantization
        return ()
    return (ObserverBase, FakeQuantizeBase)


_QUANT_OBSERVERS = _quant_observers()


class RunningStats:
    """Keeps the running statistics of a model's normalization layers and quantization observers finite across bad
    batches.

    Watches ``running_mean`` and ``running_var`` of every module with running statistics (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, ``InstanceNorm*`` with ``track_running_stats=True``, their lazy forms once initialized), and
    the floating-point buffers of every quantization observer and fake-quantize module of ``torch.ao.quantization``
    (``min_val``, ``max_val``, ``scale``: an observer that has seen no data yet keeps its ``inf`` start). Each
    :meth:`repair_` puts back, in every entry that is NaN or infinite, its value at the previous call, and keeps the
    finite entries as the new values to fall back on. Finite but unusual updates (a batch of huge inputs) are left
    alone: the exponential average forgets them within some ``1 / momentum`` steps, a NaN never.

    Per call and per device and dtype of the buffers: one concatenation, one finiteness test, one ``where`` and one
    fused copy back, all on the device (no host sync). A model without such layers costs nothing.

    The writes do not count as in-place changes for autograd: a graph built before them (a GAN's fake batch, reused
    for the generator's backward after the discriminator's step) stays valid.

    Args:
        model: the model whose normalization layers are watched; their current statistics are the first values to
            fall back on (build it before the first forward pass of training).
        params: watch only the layers that own one of these parameters (one optimizer's share of a model with
            several); ``None``: every layer of ``model``.
        unowned: with ``params``, also watch the modules that own no parameter (an observer of an input's
            ``FakeQuantize``): give it to one optimizer's share, so that some share watches them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> stats = RunningStats(model)
        >>> _ = model(torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 2.0, 3.0]]))  # a bad batch
        >>> bool(model[1].running_mean.isnan().any())
        True
        >>> stats.repair_()
        >>> bool(model[1].running_mean.isfinite().all())
        True
    """

    def __init__(self, model: nn.Module, params: Iterable[Tensor] | None = None, unowned: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
        check_bool("unowned", unowned)
        self._modules = [(m, names) for m in model.modules() if (names := _watched(m))]
        if params is not None:
            owned = {id(p) for p in params}

            def mine(module: nn.Module) -> bool:
                own = list(module.parameters(recurse=False))
                return any(id(p) in owned for p in own) or (unowned and not own)

            self._modules = [(m, names) for m, names in self._modules if mine(m)]
        # Per (device, dtype): the flat values to fall back on, and the size of each buffer in it.
        self._saved: dict[tuple[object, object], tuple[Tensor, list[int]]] = {}
        self.repair_()

    def __len__(self) -> int:
        """The number of modules watched (normalization layers and quantization observers)."""
        return len(self._modules)

    def _buffers(self) -> dict[tuple[object, object], list[Tensor]]:
        # Read through the modules on every call: ``model.to(...)`` replaces the buffer tensors.
        groups: dict[tuple[object, object], list[Tensor]] = {}
        for module, names in self._modules:
            for name in names:
                buffer = getattr(module, name, None)
                if isinstance(buffer, Tensor) and not isinstance(buffer, UninitializedBuffer):
                    groups.setdefault((buffer.device, buffer.dtype), []).append(buffer)
        return groups

    @staticmethod
    def _write(buffers: list[Tensor], values: Tensor, sizes: list[int]) -> None:
        # Through ``.data``: the version counter stays. Batch norm's backward checks that its running statistics are
        # unchanged since the forward pass, and a graph built before this write (a GAN's fake batch, used again after
        # the other optimizer's step) would otherwise fail in backward.
        pieces = [v if b.dim() == 1 else v.view(b.shape) for b, v in zip(buffers, values.split(sizes))]
        foreach_copy_([b.data for b in buffers], pieces)

    @staticmethod
    def _flat(buffers: list[Tensor]) -> Tensor:
        # Running statistics are 1-d and go in as they are (a reshape would be one more op per buffer); an observer's
        # minimum and maximum are 0-d.
        return torch.cat([b if b.dim() == 1 else b.reshape(-1) for b in buffers])

    def snapshot(self) -> dict[tuple[object, object], Tensor]:
        """The current running statistics, one flat device copy per device and dtype (no host sync), for
        :meth:`restore_`."""
        return {key: self._flat(buffers) for key, buffers in self._buffers().items()}

    def restore_(self, snapshot: dict[tuple[object, object], Tensor]) -> None:
        """Write a :meth:`snapshot` back into the running statistics (the layers that changed since are left alone)."""
        for key, buffers in self._buffers().items():
            values = snapshot.get(key)
            if values is None:
                # Taken on another device (rank 0's checkpoint on another rank, a GPU's on the CPU): the one of the
                # same dtype.
                same = [v for (_, dtype), v in snapshot.items() if dtype == key[1]]
                values = same[0].to(buffers[0].device) if len(same) == 1 else None
            sizes = [b.numel() for b in buffers]
            if values is not None and values.numel() == sum(sizes):
                self._write(buffers, values, sizes)
                self._saved[key] = (values.clone(), sizes)  # what a later bad batch falls back to

    def repair_(self) -> None:
        """Put back the previous value of every non-finite entry, and keep the current values to fall back on."""
        for key, buffers in self._buffers().items():
            flat = self._flat(buffers)
            sizes = [b.numel() for b in buffers]
            saved = self._saved.get(key)
            if saved is None or saved[1] != sizes:
                # First sight (or the layers changed): nothing earlier to fall back on.
                self._saved[key] = (flat, sizes)
                continue
            values = saved[0]
            torch.where(flat.isfinite(), flat, values, out=values)
            self._write(buffers, values, sizes)
