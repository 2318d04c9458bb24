"""Every private PyTorch API this package uses, behind small functions with a public fallback.

The fused multi-tensor kernels (``torch._foreach_*``) and the grouping helpers of ``torch.utils._foreach_utils`` are
fast but private: their signatures and their support for tensor subclasses change between releases (torch 2.15's
DTensor dispatch rejects ``torch._foreach_norm(..., dtype=...)``). The rest of the package calls them only through
this module, which uses them where they are present and known to be safe, and otherwise computes the same result with
public per-tensor operations.

* Plain dense tensors (``torch.Tensor``, ``nn.Parameter``) on a device with foreach kernels take the private fast path.
* DTensors (FSDP2) and other tensor subclasses never reach a private foreach kernel through their own dispatch. Norms
  and out-of-place results are computed per tensor with public operations on the DTensor itself, so a norm stays a
  DTensor that stands for the norm of the *whole* tensor (its reduction over the ranks happens where the caller reads
  it, e.g. ``full_tensor()``), exactly as the fused call returned it before. Callers that want the norm of the local
  shard only (and all-reduce the squares themselves, as :mod:`lightning_gradguard.stats` does) pass ``to_local()``
  shards. In-place elementwise updates whose result does not depend on the placement (a multiply by a scalar, an add
  of a tensor laid out the same way) run the fused kernel on the local shards, with no collective.
* The environment variable ``GRADGUARD_NO_PRIVATE_TORCH=1`` (read at import) or :func:`use_private_torch` forces the
  public fallback everywhere; the tests use it to check that both paths give the same results.

Nothing here reads a device value on the host (no ``.item()``, no ``bool(tensor)``): no host-device synchronization,
except that coalescing a sparse gradient (:func:`nan_to_num_`) needs its number of entries, as any coalesce does.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "device_has_foreach_support",
    "in_function_transform",
    "foreach_add_",
    "foreach_copy_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_mul_each_",
    "foreach_norm",
    "foreach_sgn",
    "foreach_zero_",
    "group_by_device_and_dtype",
    "loaded_type",
    "nan_to_num_",
    "optimizer_scaler",
    "step_deferred",
    "unscale_once",
    "unwrap_optimizer",
    "private_torch_enabled",
    "use_private_torch",
]

try:  # private module: present in every release so far, but nothing promises it
    import torch.utils._foreach_utils as _foreach_utils
except ImportError:  # pragma: no cover - depends on the torch release
    _foreach_utils = None  # type: ignore[assignment]

ENV_VAR = "GRADGUARD_NO_PRIVATE_TORCH"

# Exact types that the private foreach kernels handle without a subclass's own dispatch in between. nn.Parameter is
# a plain tensor for dispatch; a Parameter wrapping a DTensor has type DTensor.
_PLAIN = frozenset((Tensor, nn.Parameter))

# Device types with foreach kernels, for the public fallback of `device_has_foreach_support` (torch's own list adds
# the PrivateUse1 backend, whose name only a private function gives).
_FOREACH_DEVICE_TYPES = frozenset(("cpu", "cuda", "xpu", "mtia"))

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first line outside this package and torch (``torch.no_grad``
    adds a frame of its own, a step hook runs inside ``Optimizer.step``, and that inside ``GradScaler.step``), for
    ``warnings.warn(..., stacklevel=user_stacklevel())``."""
    frame = sys._getframe(1)  # the function that calls warnings.warn
    level = 1
    while frame.f_back is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE_DIR + os.sep) or name.startswith(_TORCH_DIR + os.sep)):
            break
        frame, level = frame.f_back, level + 1
    return level


def _env_enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("", "0", "false", "no", "off")


_use_private = _env_enabled()


def _private(name: str) -> Any:
    """The private ``torch.<name>``, or ``None`` when it is missing or forbidden.

    Looked up at each call (a dict lookup), so that a test that wraps ``torch._foreach_norm`` sees the calls.
    """
    return getattr(torch, name, None) if _use_private else None


def _private_util(name: str) -> Any:
    """The private ``torch.utils._foreach_utils.<name>``, or ``None`` when it is missing or forbidden."""
    return getattr(_foreach_utils, name, None) if _use_private else None


def use_private_torch(enabled: bool) -> bool:
    """Allow (``True``) or forbid (``False``) the private torch fast paths; returns the previous setting.

    Forbidding them makes every function of this module take its public fallback, as
    ``GRADGUARD_NO_PRIVATE_TORCH=1`` does at import.
    """
    global _use_private
    previous = _use_private
    _use_private = bool(enabled)
    return previous


def private_torch_enabled() -> bool:
    """Whether the private torch fast paths may be used (see :func:`use_private_torch`)."""
    return _use_private


def _all_plain(tensors: Sequence[Tensor]) -> bool:
    # `map(type, ...)` runs in C: about 0.1 us per tensor.
    return _PLAIN.issuperset(map(type, tensors))


def _foreach_ok(tensors: Sequence[Tensor]) -> bool:
    """Whether a fused kernel may take ``tensors`` (non-empty): plain tensors, on a device with foreach kernels."""
    return _all_plain(tensors) and device_has_foreach_support(tensors[0].device)


def _dtensor_api() -> Any:
    """``torch.distributed.tensor`` if it has been imported, else ``None``: no DTensor can exist before it is.

    Looked up rather than imported, so that plain-PyTorch users do not pay for importing it. ``None`` too before
    torch 2.5, whose DTensor was not public yet (such DTensors then take the per-tensor public path).
    """
    api = sys.modules.get("torch.distributed.tensor")
    return api if hasattr(api, "DTensor") and hasattr(api, "Shard") and hasattr(api, "Replicate") else None


# ---------------------------------------------------------------------------------------------------------- grouping
def device_has_foreach_support(device: torch.device) -> bool:
    """Whether ``device`` has fused foreach kernels (CPU counts: its foreach ops loop over the tensors)."""
    private = _private_util("_device_has_foreach_support")
    if private is not None:
        return bool(private(device))
    return device.type in _FOREACH_DEVICE_TYPES and not torch.jit.is_scripting()


def group_by_device_and_dtype(
    tensorlistlist: Sequence[Sequence[Tensor | None]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]]:
    """Split parallel tensor lists into groups by the device and dtype of the *first* list's tensors.

    Same contract as ``torch.utils._foreach_utils._group_tensors_by_device_and_dtype``: every tensor of the first list
    must be defined; index ``i`` of every other list (a tensor or ``None``) goes to the group of the first list's
    ``i``-th tensor. Each value is ``(lists, indices)``: one list per input list, in input order within the group, and
    the positions of the group's entries in the input when ``with_indices`` (else ``[]``); a ``None`` of a later list
    stays ``None`` (the type says tensors, the usual case). The grouped lists hold the input tensors themselves, so
    in-place changes reach them. The order of the groups is unspecified (the private version uses a hash map): use
    the keys or the indices. An empty first list gives ``{}``.
    """
    if not tensorlistlist or len(tensorlistlist[0]) == 0:
        return {}
    private = _private_util("_group_tensors_by_device_and_dtype")
    if private is not None:
        result: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]] = private(
            tensorlistlist, with_indices
        )
        return result
    first = tensorlistlist[0]
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]] = {}
    for i, t in enumerate(first):
        if t is None:
            raise RuntimeError(
                f"Tensors of the first list of nested Tensor lists are supposed to be defined but the {i}-th Tensor "
                "is not."
            )
        key = (t.device, t.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([[] for _ in tensorlistlist], [])
        for lst, out in zip(tensorlistlist, group[0]):
            out.append(lst[i])  # type: ignore[arg-type]  # a None of a later list stays None
        if with_indices:
            group[1].append(i)
    return groups


# ------------------------------------------------------------------------------------------------------------- norms
def foreach_norm(tensors: Sequence[Tensor], ord: float = 2.0, dtype: torch.dtype | None = None) -> list[Tensor]:
    """``torch.linalg.vector_norm(t, ord, dtype=dtype)`` of each of ``tensors`` (dense), as a list in input order.

    Differentiable. One fused ``torch._foreach_norm`` for plain tensors on a foreach device; per tensor otherwise. A
    DTensor's norm is a DTensor standing for the norm of the whole tensor (see the module docstring). ``dtype`` as in
    ``vector_norm``: the accumulation and result dtype, which may widen but not narrow the input's (pass ``None`` to
    keep it). An empty input gives ``[]``; a tensor with no entries has norm 0, its largest entry (``ord=inf``)
    included, where torch raises (a DTensor is judged by its global size: an empty local shard still raises).
    """
    if len(tensors) == 0:
        return []
    if math.isinf(ord) and any(t.numel() == 0 for t in tensors):
        # torch raises for the largest entry of none (no identity): a sparse gradient of a batch of padding ids
        # alone crashed a recommender's fit. The other norms of nothing are 0 already.
        tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]
    fused = _private("_foreach_norm")
    if fused is not None and _foreach_ok(tensors):
        return list(fused(list(tensors), ord, dtype=dtype))
    return [torch.linalg.vector_norm(t, ord, dtype=dtype) for t in tensors]


# ------------------------------------------------------------------------------------------------- elementwise updates
def _local_shards(*lists: Sequence[Tensor]) -> list[list[Tensor]] | None:
    """The local shards of parallel lists of DTensors whose elementwise combination is placement-independent.

    ``None`` unless every tensor is a DTensor and, position by position, all lists share the device mesh and the
    placements, which must be ``Shard``/``Replicate`` only (an elementwise op on the local shards then gives the local
    shard of the result; a pending ``Partial`` reduction may not commute with it).
    """
    api = _dtensor_api()
    if api is None:
        return None
    dtensor, elementwise_safe = api.DTensor, (api.Shard, api.Replicate)
    for lst in lists:
        if not all(isinstance(t, dtensor) for t in lst):
            return None
    ref: Any
    other: Any
    for i, ref in enumerate(lists[0]):
        placements = ref.placements
        if not all(isinstance(p, elementwise_safe) for p in placements):
            return None
        for lst in lists[1:]:
            other = lst[i]
            if other.device_mesh != ref.device_mesh or other.placements != placements:
                return None
    return [[t.to_local() for t in lst] for lst in lists]  # type: ignore[attr-defined]


def foreach_mul_(tensors: Sequence[Tensor], scalar: Tensor | float) -> None:
    """``t.mul_(scalar)`` for each of ``tensors`` (one device), in place; ``scalar`` a number or a 0-d tensor.

    A 0-d fp32 ``scalar`` multiplies half-precision tensors in fp32 and rounds once (as
    ``torch.nn.utils.clip_grad_norm_`` does). DTensors are scaled on their local shards (any placement but ``Partial``
    commutes with a multiply; a ``Partial`` DTensor is multiplied through its own dispatch).
    """
    if len(tensors) == 0:
        return
    fused = _private("_foreach_mul_")
    if fused is not None:
        if _foreach_ok(tensors):
            fused(list(tensors), scalar)
            return
        shards = _local_shards(tensors)
        if shards is not None:
            foreach_mul_(shards[0], scalar)
            return
    for t in tensors:
        t.mul_(scalar)


def foreach_mul_each_(tensors: Sequence[Tensor], scalars: Sequence[Tensor]) -> None:
    """``t.mul_(s)`` for each pair of ``tensors`` (one device) and 0-d ``scalars``, in place: one fused kernel where
    the device has them (a per-tensor clip coefficient), else one multiply per tensor."""
    if len(tensors) != len(scalars):
        raise ValueError(f"foreach_mul_each_: {len(tensors)} tensors but {len(scalars)} scalars")
    if len(tensors) == 0:
        return
    fused = _private("_foreach_mul_")
    if fused is not None and _foreach_ok(tensors) and _all_plain(scalars):
        fused(list(tensors), list(scalars))
        return
    for t, s in zip(tensors, scalars):
        t.mul_(s)


def foreach_mul(tensors: Sequence[Tensor], other: Tensor | float | Sequence[Tensor]) -> list[Tensor]:
    """``[t * other for t in tensors]`` (one device) for a number or 0-d tensor ``other``; for a list ``other``,
    ``[t * o for t, o in zip(tensors, other)]``. New tensors."""
    if len(tensors) == 0:
        return []
    fused = _private("_foreach_mul") if _foreach_ok(tensors) else None
    if isinstance(other, (Tensor, int, float)):
        if fused is not None:
            return list(fused(list(tensors), other))
        return [t * other for t in tensors]
    others = list(other)
    if len(others) != len(tensors):
        raise ValueError(f"foreach_mul: {len(tensors)} tensors but {len(others)} others")
    if fused is not None and _all_plain(others):
        return list(fused(list(tensors), others))
    return [t * o for t, o in zip(tensors, others)]


def foreach_add_(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float = 1.0) -> None:
    """``t.add_(o, alpha=alpha)`` for each pair (one device), in place.

    DTensor pairs with the same mesh and ``Shard``/``Replicate`` placements (FSDP2 gradients and parameters) add their
    local shards; other DTensors go through their own dispatch per tensor.
    """
    if len(tensors) != len(others):
        raise ValueError(f"foreach_add_: {len(tensors)} tensors but {len(others)} others")
    if len(tensors) == 0:
        return
    fused = _private("_foreach_add_")
    if fused is not None:
        if _foreach_ok(tensors) and _all_plain(others):
            fused(list(tensors), list(others), alpha=alpha)
            return
        shards = _local_shards(tensors, others)
        if shards is not None:
            foreach_add_(shards[0], shards[1], alpha=alpha)
            return
    for t, o in zip(tensors, others):
        t.add_(o, alpha=alpha)


def foreach_zero_(tensors: Sequence[Tensor]) -> None:
    """``t.zero_()`` for each of ``tensors`` (one device), in place; DTensors on their local shards."""
    if len(tensors) == 0:
        return
    fused = _private("_foreach_zero_")
    if fused is not None:
        if _foreach_ok(tensors):
            fused(list(tensors))
            return
        shards = _local_shards(tensors)
        if shards is not None:
            foreach_zero_(shards[0])
            return
    for t in tensors:
        t.zero_()


def foreach_sgn(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``[torch.sgn(t) for t in tensors]`` (one device), as new tensors: the sign, and ``z / |z|`` for a complex
    entry (the gradient of ``|z|``, which ``torch.sign`` refuses)."""
    if len(tensors) == 0:
        return []
    fused = _private("_foreach_sign")
    if fused is not None and _foreach_ok(tensors) and not any(t.is_complex() for t in tensors):
        return list(fused(list(tensors)))
    return [torch.sgn(t) for t in tensors]


def foreach_copy_(tensors: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``t.copy_(s)`` for each pair (one device), in place."""
    if len(tensors) != len(sources):
        raise ValueError(f"foreach_copy_: {len(tensors)} tensors but {len(sources)} sources")
    if len(tensors) == 0:
        return
    fused = _private("_foreach_copy_")
    if fused is not None and _foreach_ok(tensors) and _all_plain(sources):
        fused(list(tensors), list(sources))
        return
    for t, s in zip(tensors, sources):
        t.copy_(s)


_SPARSE_COMPRESSED = frozenset((torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc))


def nan_to_num_(grad: Tensor, nan: float = 0.0, posinf: float = 0.0, neginf: float = 0.0) -> Tensor:
    """Replace NaN, +inf and -inf in ``grad`` in place (by default with 0) and return ``grad``; dense or sparse.

    A sparse COO gradient (``nn.Embedding(sparse=True)``) usually holds repeated indices whose values add up; it is
    coalesced first, so that what is cleaned is the gradient's actual entries (two finite fp16 values can add up to
    inf, a NaN and a finite value to NaN), and the coalesced result is copied back into ``grad`` (same object).
    ``torch.nan_to_num_`` itself refuses an uncoalesced tensor.
    """
    if grad.layout == torch.sparse_coo:
        if grad.is_coalesced():
            grad.values().nan_to_num_(nan=nan, posinf=posinf, neginf=neginf)
        else:
            coalesced = grad.coalesce()
            coalesced.values().nan_to_num_(nan=nan, posinf=posinf, neginf=neginf)
            grad.copy_(coalesced)
        return grad
    if grad.layout in _SPARSE_COMPRESSED:
        grad.values().nan_to_num_(nan=nan, posinf=posinf, neginf=neginf)
        return grad
    return torch.nan_to_num_(grad, nan=nan, posinf=posinf, neginf=neginf)


def loaded_type(module_name: str, type_name: str) -> type | None:
    """The class ``type_name`` of ``module_name`` if that module was imported already, else ``None``: no instance of
    it can exist otherwise, and importing ``torch._dynamo``, ``torch.distributed`` or ``transformers`` just to find
    out is slow."""
    found = getattr(sys.modules.get(module_name), type_name, None)
    return found if isinstance(found, type) else None


def in_function_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``): a tensor made here is
    wrapped for the transform and must not be kept past it. Per-sample gradients taken with ``vmap(grad(...))`` run
    the model's own modules, and a forward hook that kept their outputs crashed the fit at its first logging step
    (a user trial's DP-SGD). ``False`` while ``torch.compile`` traces (no transform is traced there) and on a torch
    without ``torch._C._functorch``."""
    if torch.compiler.is_compiling():
        return False
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer itself, under the wrappers frameworks hand out: Lightning's ``LightningOptimizer``
    (``_optimizer``) and accelerate's ``AcceleratedOptimizer`` (``optimizer``), and under a user's wrapper written
    the same way (a Lookahead: ``optimizer``, or timm's ``_base_optimizer``).

    A wrapper is told by what it lacks: it never ran ``Optimizer.__init__``, so it has no step-hook registry of its
    own (``AcceleratedOptimizer`` subclasses ``Optimizer``, and registering a hook on it fails). Lightning Fabric's
    optimizer is looked through to ``_optimizer``; older Fabric releases copy the wrapped one's ``__dict__``, hooks
    included, and theirs is returned as it is (its hooks are the optimizer's).

    Example:
        >>> import torch
        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> class Wrapper(torch.optim.Optimizer):
        ...     def __init__(self, optimizer):  # no super().__init__(), as accelerate's
        ...         self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(sgd)) is sgd, unwrap_optimizer(sgd) is sgd, unwrap_optimizer(None)
        (True, True, None)
    """
    for wrapper in _wrappers(optimizer):
        optimizer = _inner(wrapper) or wrapper
    return optimizer


def state_optimizer(optimizer: Any) -> Any:
    """The optimizer whose ``state`` holds the per-parameter state (momentum, Adam's moments) of ``optimizer``: the
    optimizer itself under its wrappers (:func:`unwrap_optimizer`), or the local optimizer of a
    ``ZeroRedundancyOptimizer``, which keeps its shard's state there (``optim``) while its own ``state`` stays empty:
    a momentum reset or a rollback that read that found nothing to reset or restore.

    Example:
        >>> import torch
        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> state_optimizer(sgd) is sgd, state_optimizer(None)
        (True, None)
    """
    optimizer = unwrap_optimizer(optimizer)
    return getattr(optimizer, "optim", optimizer) if _is_zero(optimizer) else optimizer


def state_holders(optimizer: Any) -> list[tuple[str, Any]]:
    """Each optimizer whose per-parameter ``state`` steps with the weights of ``optimizer``, with the prefix that
    names its entries: :func:`state_optimizer`'s (prefix ``""``), and the base optimizer of one built on another that
    shares its param groups (SAM, a Lookahead that runs ``Optimizer.__init__``: ``"base_optimizer."``). The base one
    holds the momentum, the outer one its own (a Lookahead's slow weights): a rollback of a closure-form SAM over SGD
    that restored the SAM's state alone restarted into the blown-up momentum each time, and one that restored the base
    optimizer's alone put a Lookahead back onto its blown-up slow weights at the next sync.

    Example:
        >>> import torch
        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> [prefix for prefix, _ in state_holders(sgd)], state_holders(None)
        ([''], [])
    """
    outer = state_optimizer(optimizer)
    if outer is None:
        return []
    holders: list[tuple[str, Any]] = [("", outer)]
    groups = getattr(outer, "param_groups", None) or []
    for name in _INNER_NAMES:
        inner = getattr(outer, name, None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is outer:
            continue
        # The same groups: the same list, or the same group dicts in a list of its own (a SAM that keeps its own).
        shared = inner.param_groups is groups or (
            len(inner.param_groups) == len(groups) > 0 and all(a is b for a, b in zip(inner.param_groups, groups))
        )
        if shared:
            holders.append((f"{name}.", inner))
            break
    return holders


def _is_zero(optimizer: Any) -> bool:
    zero = loaded_type("torch.distributed.optim.zero_redundancy_optimizer", "ZeroRedundancyOptimizer")
    return zero is not None and isinstance(optimizer, zero)


def shards_state(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps only this rank's shard of the per-parameter state (a ``ZeroRedundancyOptimizer``):
    a copy of that state is no other rank's."""
    optimizer = unwrap_optimizer(optimizer)
    return _is_zero(optimizer) and getattr(optimizer, "optim", optimizer) is not optimizer


_MAX_WRAPPERS = 4  # a LightningOptimizer around a framework's wrapper around the optimizer, at most


#: Where wrappers keep the optimizer they wrap, after Lightning's and Fabric's ``_optimizer``: accelerate's and most
#: Lookahead implementations' ``optimizer``, timm's Lookahead's ``_base_optimizer``, others' ``base_optimizer``.
_INNER_NAMES = ("optimizer", "_base_optimizer", "base_optimizer")


def _inner(wrapper: Any) -> Any:
    attributes = getattr(wrapper, "__dict__", {})
    found = getattr(wrapper, "_optimizer", None)
    return found or next((attributes[name] for name in _INNER_NAMES if attributes.get(name) is not None), None)


def _wrappers(optimizer: Any) -> Iterator[Any]:
    """The wrappers from ``optimizer`` inwards, the torch optimizer (which has its own step-hook registry) left out."""
    for _ in range(_MAX_WRAPPERS):
        if (
            optimizer is None
            or isinstance(optimizer, torch.optim.Optimizer)
            and "_optimizer_step_pre_hooks" in vars(optimizer)
        ):
            return
        yield optimizer
        optimizer = _inner(optimizer)


def optimizer_scaler(optimizer: Any) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` that a framework's optimizer wrapper steps through under fp16 (accelerate's
    ``AcceleratedOptimizer.scaler``, the precision plugin's of Lightning Fabric's optimizer), or ``None``.

    Example:
        >>> import torch
        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> class Wrapper(torch.optim.Optimizer):
        ...     def __init__(self, optimizer, scaler):  # no super().__init__(), as accelerate's
        ...         self.optimizer, self.scaler = optimizer, scaler
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> optimizer_scaler(Wrapper(sgd, scaler)) is scaler, optimizer_scaler(Wrapper(sgd, None))
        (True, None)
    """
    fabric = tuple(t for m in _FABRIC_WRAPPERS if (t := loaded_type(m, "_FabricOptimizer")) is not None)
    # Older Fabric releases copy the optimizer's attributes, hooks included, so their wrapper passes for the optimizer
    # itself: it is looked at before the walk through wrappers.
    for wrapper in (optimizer, *_wrappers(optimizer)):
        if fabric and isinstance(wrapper, fabric):
            precision = getattr(getattr(wrapper, "_strategy", None), "precision", None)
            scaler = getattr(precision, "scaler", None)
        else:
            scaler = getattr(wrapper, "__dict__", {}).get("scaler")
        if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            return scaler
    return None


# Lightning Fabric's optimizer wrapper, in both packages (Lightning's own optimizer, whose gradients Lightning
# unscales before any callback sees them, is not one).
_FABRIC_WRAPPERS = ("lightning.fabric.wrappers", "lightning_fabric.wrappers")


def step_deferred(optimizer: Any) -> bool:
    """Whether a framework's optimizer wrapper will let this ``step()`` pass without stepping: accelerate's
    ``AcceleratedOptimizer`` inside ``accelerator.accumulate()`` on a micro-batch that does not end the accumulation
    window (``gradient_state.sync_gradients`` is ``False``; its ``zero_grad`` passes too).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> class Wrapper(torch.optim.Optimizer):
        ...     def __init__(self, optimizer, sync):  # no super().__init__(), as accelerate's
        ...         self.optimizer, self.gradient_state = optimizer, SimpleNamespace(sync_gradients=sync)
        >>> step_deferred(Wrapper(sgd, False)), step_deferred(Wrapper(sgd, True)), step_deferred(sgd)
        (True, False, False)
    """
    return any(
        getattr(getattr(wrapper, "__dict__", {}).get("gradient_state"), "sync_gradients", True) is False
        for wrapper in _wrappers(optimizer)
    )


def unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it was called since the scaler's last ``update()`` (by the user, by
    accelerate's ``clip_grad_norm_`` or Fabric's ``clip_gradients``): a second call raises, and the gradients are
    unscaled already."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as err:
        if "already been called" not in str(err):
            raise
