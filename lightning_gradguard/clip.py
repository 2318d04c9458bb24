"""Gradient clippers: :class:`NormClip`, :class:`AutoClip`, :class:`ZClip`, :class:`AGC` and :class:`AdaGC`.

Each clipper can be used on its own in a plain PyTorch loop, like :func:`torch.nn.utils.clip_grad_norm_`::

    loss.backward()
    total_norm = clipper.clip_(model)       # or model.parameters()
    optimizer.step()

:class:`~lightning_gradguard.GradGuard` calls :meth:`Clipper.clip_grads_` instead, handing over the norms it has
already measured so that the gradients are read only once more (to scale them).

All decisions are made on the device with tensor arithmetic: a call never waits for the device (no ``.item()``, no
Python ``if`` on a tensor), so clipping does not stall the training loop. State (histories, EMAs) lives on the
gradients' device and round-trips through :meth:`Clipper.state_dict` / :meth:`Clipper.load_state_dict` as plain
tensors, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import abc
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_gradguard._compat import (
    foreach_copy_,
    foreach_mul_,
    foreach_mul_each_,
    foreach_norm,
    group_by_device_and_dtype,
    loaded_type,
)
from lightning_gradguard._host import HostFlags
from lightning_gradguard._validation import (
    FLOAT32_MAX,
    check_bool,
    check_int,
    check_number,
    check_state,
    check_state_values,
    optional_int,
    optional_number,
)
from lightning_gradguard.layers import has_output_columns, note_output_columns
from lightning_gradguard.stats import _dense, _grouped_norms, _upload

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None  # type: ignore[assignment,misc]

__all__ = ["AGC", "AdaGC", "AutoClip", "Clipper", "NormClip", "ZClip", "default_clipper"]

# Same guard as torch.nn.utils.clip_grad_norm_, so that NormClip reproduces it exactly.
_NORM_EPS = 1e-6
#: The largest ``ZClip(warmup_steps=...)`` and ``AutoClip(history=...)``: their buffers are that many floats on the
#: gradients' device, scanned every step (40 MB at this bound).
MAX_BUFFER = 10_000_000
_TINY = 1e-30  # floor of a norm that is divided by
#: The largest share of a norm that the guard against dividing by it adds (see ``_scaled_eps``).
_EPS_SHARE = 1e-3


def _scaled_eps(scale: Tensor, eps: float = _NORM_EPS) -> Tensor:
    """``eps``, or ``_EPS_SHARE`` of ``scale`` where that is less (at least ``_TINY``, unless ``eps`` is smaller
    still): exactly ``eps`` from ``scale = eps / _EPS_SHARE`` (1e-3) up, so clipping does not turn on the gradients'
    scale below it. An absolute 1e-6 made ZClip's threshold 40x the mean of norms about 1e-7 (nothing clipped), and a
    norm of 1e-8 clipped to a cap came out 100x under it (user trial: a loss scaled by 1e-8)."""
    return torch.clamp(scale * _EPS_SHARE, min=_TINY, max=eps)


_SLOT_CACHE_SIZE = 64
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# ZClip's ``level_steps``: a spike within a factor of 2 of a stretch's first one holds its level (its ratio to the
# first lies in [1/2, 2], within _LEVEL_HALF of _LEVEL_MID).
_LEVEL_RATIO = 2.0
_LEVEL_MID = (_LEVEL_RATIO + 1.0 / _LEVEL_RATIO) / 2.0
_LEVEL_HALF = (_LEVEL_RATIO - 1.0 / _LEVEL_RATIO) / 2.0


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    # Half-precision norms overflow easily (fp16 max 65504), so accumulate them in fp32; fp64 cannot be narrowed by
    # the norm kernels and is cast afterwards.
    return torch.float32 if dtype in _LOW_PRECISION else None


def _total_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type``-norm of all ``grads`` seen as one vector: a 0-d fp32 tensor on the first gradient's device.

    One ``torch._foreach_norm`` per (device, dtype) group; no host synchronisation. A sparse gradient counts with its
    stored values (coalesced).
    """
    if len(grads) == 0:
        return torch.tensor(0.0)
    first_device = grads[0].device
    per_group: list[Tensor] = []
    for (_, dtype), ([tensors], _) in group_by_device_and_dtype([[_dense(g) for g in grads]]).items():
        norms = foreach_norm(tensors, norm_type, dtype=_norm_dtype(dtype))
        group_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), norm_type)
        per_group.append(group_norm.to(device=first_device, dtype=torch.float32))
    if len(per_group) == 1:
        return per_group[0]
    return torch.linalg.vector_norm(torch.stack(per_group), norm_type)


def _scale_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every gradient in place by the 0-d ``coef``.

    ``coef`` stays fp32: a foreach multiply by an fp32 tensor computes in fp32 and rounds once into fp16/bf16, which is
    more accurate than rounding the coefficient to the gradient's dtype first (this is also what
    ``torch.nn.utils.clip_grad_norm_`` does).
    """
    on_device: dict[torch.device, Tensor] = {}
    for (device, _), ([tensors], _) in group_by_device_and_dtype([list(grads)]).items():
        if device not in on_device:
            # ``.to`` of a tensor already there is still one dispatched op per step: skip it.
            on_device[device] = coef if coef.device == device else coef.to(device)
        foreach_mul_(tensors, on_device[device])


def _collect(
    parameters: Tensor | Iterable[Tensor] | nn.Module,
) -> tuple[list[Tensor], list[Tensor], list[str] | None, list[type] | None]:
    """Gradients, their parameters and, for a module, their qualified names and owning module types."""
    if isinstance(parameters, nn.Module):
        grads: list[Tensor] = []
        params: list[Tensor] = []
        names: list[str] = []
        owner_types: list[type] = []
        seen: set[int] = set()
        for module_name, module in parameters.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if param.grad is None:
                    continue
                grads.append(param.grad)
                params.append(param)
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
                owner_types.append(type(module))
                note_output_columns(module, param_name, param)
        return grads, params, names, owner_types
    if hasattr(parameters, "param_groups"):
        raise ValueError(
            "`parameters` must be a module, an iterable of parameters or a parameter, got an optimizer: pass the"
            " model (or `model.parameters()`)."
        )
    try:
        items = iter([parameters] if isinstance(parameters, Tensor) else parameters)
    except TypeError:
        raise ValueError(
            f"`parameters` must be a module, an iterable of parameters or a parameter, got {type(parameters).__name__}."
        ) from None
    tensors = list(items)
    if not all(isinstance(p, Tensor) for p in tensors):
        bad = next(p for p in tensors if not isinstance(p, Tensor))
        raise ValueError(f"`parameters` must hold tensors (parameters), got a {type(bad).__name__}.")
    # Once each, as for a module: a tied weight listed twice (two submodules' parameter lists joined) would count
    # twice in the norm and be scaled twice (`clip_grad_norm_` does both).
    with_grad = list({id(p): p for p in tensors if p.grad is not None}.values())
    return [p.grad for p in with_grad], with_grad, None, None


def _state_float_dtype(device: torch.device) -> torch.dtype:
    # Scalar statistics are kept in fp64 where the device has it (free for a handful of scalars), so long EMA chains
    # track the reference arithmetic (Python floats); MPS has no fp64.
    return torch.float32 if device.type == "mps" else torch.float64


def _to_cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", copy=True)


class Clipper(abc.ABC):
    """Base class of the gradient clippers.

    A clipper rescales gradients in place. :meth:`clip_` measures the norm itself (standalone use in a plain loop);
    :meth:`clip_grads_` takes a norm that was already measured (used by ``GradGuard``). Neither synchronises with the
    device: every decision is a tensor.

    Attributes:
        needs_params: ``True`` when :meth:`clip_grads_` needs the parameters themselves (``AGC``).
        needs_names: ``True`` when :meth:`clip_grads_` needs the parameter names (``AdaGC``).
        takes_cap: ``False`` when :meth:`clip_grads_` ignores ``cap`` (``AGC``).
        last_threshold: 0-d fp32 tensor, the clipping threshold of the last call (``inf`` when there is none).
        last_coef: 0-d fp32 tensor, the clipping coefficient of the last call (``1.0`` = gradients unchanged).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> (100 * model(torch.ones(8, 4))).sum().backward()
        >>> clipper = NormClip(max_norm=1.0)
        >>> total_norm = clipper.clip_(model)  # the norm before clipping, like clip_grad_norm_
        >>> bool(total_norm > 1.0), round(float(clipper.last_coef * total_norm), 3)
        (True, 1.0)
    """

    needs_params: bool = False
    #: ``True`` when the clipper keeps statistics per parameter and needs the ``names`` of :meth:`clip_grads_` to
    #: tell them apart (:class:`AdaGC`).
    needs_names: bool = False
    #: ``False`` when the clipper ignores :meth:`clip_grads_`'s ``cap`` (:class:`AGC`): no bound on the total norm
    #: (``GradGuard(max_norm=...)``, a Trainer's ``gradient_clip_val``) can be folded into its clipping.
    takes_cap: bool = True
    #: ``True`` when the clipper splits into :meth:`prepare_` (host bookkeeping), :meth:`coefficient_` (a pure tensor
    #: function of fixed-shape state: what a compiled per-step tail can take in) and :meth:`scale_`.
    fusable: bool = False

    def __init__(self) -> None:
        self.last_threshold: Tensor = torch.tensor(math.inf)
        self.last_coef: Tensor = torch.tensor(1.0)

    def prepare_(self, device: torch.device) -> None:
        """Host-side set-up before :meth:`coefficient_`: create or move the state to ``device`` (no tensor math)."""
        if self.last_coef.device != device:
            self.last_coef = self.last_coef.to(device, torch.float32)
            self.last_threshold = self.last_threshold.to(device, torch.float32)

    def coefficient_(
        self, total_norm: Tensor, valid: Tensor, cap: Tensor | None = None, flag_cap: Tensor | None = None
    ) -> Tensor:
        """The clipping coefficient of a step whose gradients have the L2 norm ``total_norm``, from the clipper's
        state alone; updates that state, :attr:`last_coef` and :attr:`last_threshold` (device tensors, no host
        read, no Python decision on a value), but does not touch the gradients: :meth:`scale_` does. Only for a
        :attr:`fusable` clipper, after :meth:`prepare_`. ``clip_grads_(grads, total_norm, valid, cap=cap)`` is
        ``prepare_`` + ``coefficient_`` + ``scale_``.

        Args:
            total_norm: 0-d fp32 tensor, the L2 norm of the gradients.
            valid: 0-d bool tensor; ``False`` leaves the state untouched (coefficient 1).
            cap: as in :meth:`clip_grads_`.
            flag_cap: as in :meth:`clip_grads_`.
        """
        raise NotImplementedError(f"{type(self).__name__} clips in one piece: use clip_grads_.")

    def scale_(self, grads: Sequence[Tensor], coef: Tensor) -> None:
        """Multiply ``grads`` in place by the 0-d ``coef`` (one foreach kernel per device and dtype)."""
        _scale_(grads, coef)

    @torch.no_grad()
    def clip_(self, parameters: Tensor | Iterable[Tensor] | nn.Module) -> Tensor:
        """Clip the gradients of ``parameters`` in place and return their total norm before clipping.

        Works like :func:`torch.nn.utils.clip_grad_norm_`: parameters whose ``.grad`` is ``None`` are ignored, and a
        step with a non-finite norm is left untouched (and does not enter the clipper's statistics). A parameter
        listed twice (a tied weight) counts once, where ``clip_grad_norm_`` counts and scales it twice. Passing an
        ``nn.Module`` gives :class:`AGC` the parameter names and owning module types it needs for ``exclude`` /
        ``exclude_types``.

        Args:
            parameters: a module, an iterable of parameters, or a single parameter.

        Returns:
            The total gradient norm before clipping (0-d fp32 tensor; L2, or ``norm_type`` for :class:`NormClip`).
        """
        grads, params, names, owner_types = _collect(parameters)
        if not grads:
            return torch.tensor(0.0)
        total_norm = self._standalone_norm(grads)
        self._clip(grads, total_norm, total_norm < math.inf, params, names, owner_types, None)
        return total_norm

    @torch.no_grad()
    def clip_grads_(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        *,
        params: list[Tensor] | None = None,
        names: list[str] | None = None,
        owner_types: list[type] | None = None,
        cap: Tensor | None = None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        """Clip ``grads`` in place given their already computed total L2 norm.

        Args:
            grads: the non-``None`` gradients, clipped in place.
            total_norm: 0-d fp32 tensor, the L2 norm of all ``grads`` together (a number is taken too).
            valid: 0-d bool tensor; ``False`` when the step's gradients are non-finite or an AMP overflow. The
                clipper then leaves the gradients and its own state (history, EMA, warm-up) untouched.
            params: the parameters of ``grads`` (same order); required when :attr:`needs_params` is ``True``.
            names: qualified parameter names (same order), used by :class:`AGC` ``exclude``.
            owner_types: types of the modules owning the parameters (same order), used by :class:`AGC`
                ``exclude_types``.
            cap: optional 0-d tensor, an upper bound on the total norm after clipping for this step only (``inf``:
                none). GradGuard passes the exploding detector's band edge on a flagged step, a safety net while an
                adaptive clipper is still warming up. It is folded into the clipper's own coefficient (no extra
                pass) and never enters the clipper's statistics. Ignored by :class:`AGC`.
            flag_cap: optional 0-d tensor, the part of ``cap`` that the exploding detector set for a flagged step
                (``inf`` on others). :class:`ZClip` collects ``min(norm, flag_cap)`` during its warm-up: a bad batch
                enters as what it was held to, not raw. The others ignore it.

        Returns:
            The clipping coefficient applied (0-d fp32 tensor, also stored in :attr:`last_coef`).
        """
        grads = list(grads)
        for arg_name, seq in (("params", params), ("names", names), ("owner_types", owner_types)):
            if seq is not None and len(seq) != len(grads):
                raise ValueError(f"`{arg_name}` must have one entry per gradient ({len(grads)}), got {len(seq)}.")
        if self.needs_params and params is None:
            raise ValueError(f"{type(self).__name__} needs `params` (the parameters of `grads`).")
        if not isinstance(total_norm, Tensor):
            if isinstance(total_norm, bool) or not isinstance(total_norm, numbers.Real):
                raise ValueError(f"`total_norm` must be a 0-d tensor or a number, got {type(total_norm).__name__}.")
            # A norm known on the host: on the gradients' device, as a computed one would be.
            device = grads[0].device if grads else torch.device("cpu")
            total_norm = torch.tensor(float(total_norm), dtype=torch.float32, device=device)
        if not isinstance(valid, Tensor):
            valid = torch.full((), bool(valid), dtype=torch.bool, device=total_norm.device)
        if total_norm.dtype != torch.float32:
            total_norm = total_norm.float()
        total_norm = self._norm_for_clipping(grads, total_norm)
        return self._clip(grads, total_norm, valid, params, names, owner_types, cap, flag_cap)

    @staticmethod
    def _capped(coef: Tensor, total_norm: Tensor, cap: Tensor | None) -> Tensor:
        """``coef`` lowered so that the clipped norm stays under ``cap`` (no NaN on inf/NaN norms)."""
        if cap is None:
            return coef
        if cap.device != coef.device or cap.dtype != torch.float32:
            cap = cap.to(device=coef.device, dtype=torch.float32)
        if total_norm.device != coef.device:
            total_norm = total_norm.to(coef.device)
        # An inf cap gives 1; a non-finite norm (an invalid step) keeps its coefficient rather than 0 or NaN. Norms
        # are >= 0, inf or NaN, so ``< inf`` is ``isfinite`` in one kernel instead of four.
        limit = (cap / (total_norm + _scaled_eps(total_norm))).clamp_max(1.0)
        return torch.where(total_norm < math.inf, torch.minimum(coef, limit), coef)

    def _standalone_norm(self, grads: list[Tensor]) -> Tensor:
        return _total_norm(grads)

    def _norm_for_clipping(self, grads: list[Tensor], l2_norm: Tensor) -> Tensor:
        return l2_norm

    @abc.abstractmethod
    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        """Scale ``grads`` in place, update the state, set ``last_coef``/``last_threshold``, return the coef.

        ``cap`` (or ``None``) is :meth:`clip_grads_`'s; a global-norm clipper folds it in with :meth:`_capped`.
        """

    def rescale_(self, factor: Tensor) -> None:
        """Scale what the clipper has learned of the total norm by ``factor`` (0-d device tensor): parameters joined
        the total (an unfrozen backbone), and its level moved with them. A no-op for clippers without total-norm
        statistics (``NormClip``, ``AGC``, and ``AdaGC``, whose statistics are per tensor)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The clipper's state: plain Python values and CPU tensors (empty for stateless clippers)."""
        return {}

    def device_state(self) -> dict[str, Any]:
        """:meth:`state_dict` with the tensors cloned where they are (no device-to-host copy, no wait): what a
        :class:`~lightning_gradguard.Rollback` keeps; :meth:`load_state_dict` takes it back."""
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        check_state(type(self).__name__, state)
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, got state keys {sorted(state)}.")

    def extra_repr(self) -> str:
        """The constructor arguments, as shown by ``repr``."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class NormClip(Clipper):
    """Clip the total gradient norm to ``max_norm`` (Pascanu et al., 2013), like ``torch.nn.utils.clip_grad_norm_``.

    The gradients are scaled by ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        max_norm: the largest total norm allowed (``> 0``).
        norm_type: the p of the p-norm (``> 0``); ``float("inf")`` for the largest absolute entry. With a norm other
            than L2, :meth:`clip_grads_` computes that norm itself (one extra pass over the gradients).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> (100 * model(torch.ones(8, 4))).sum().backward()
        >>> clipper = NormClip(max_norm=1.0)
        >>> total_norm = clipper.clip_(model.parameters())
        >>> grads = [p.grad for p in model.parameters()]
        >>> round(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))), 3)
        1.0
        >>> clipper
        NormClip(max_norm=1.0, norm_type=2.0)
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        super().__init__()
        self.max_norm = check_number("max_norm", max_norm, low=0.0, high=FLOAT32_MAX, high_inclusive=True)
        self.norm_type = check_number("norm_type", norm_type, low=0.0, allow_inf=True)
        self._threshold: dict[torch.device, Tensor] = {}
        self._device_threshold: Tensor = self.last_threshold  # the threshold on the device of the last prepare_

    def _standalone_norm(self, grads: list[Tensor]) -> Tensor:
        return _total_norm(grads, self.norm_type)

    def _norm_for_clipping(self, grads: list[Tensor], l2_norm: Tensor) -> Tensor:
        if self.norm_type == 2.0:
            return l2_norm
        return _total_norm(grads, self.norm_type).to(l2_norm.device)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        self.prepare_(total_norm.device)
        coef = self.coefficient_(total_norm, valid, cap)
        _scale_(grads, coef)
        return coef

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        # Another p-norm needs its own pass over the gradients.
        return self.norm_type == 2.0

    def prepare_(self, device: torch.device) -> None:
        super().prepare_(device)
        if device not in self._threshold:
            self._threshold[device] = torch.full((), self.max_norm, dtype=torch.float32, device=device)
        self._device_threshold = self._threshold[device]

    def coefficient_(
        self, total_norm: Tensor, valid: Tensor, cap: Tensor | None = None, flag_cap: Tensor | None = None
    ) -> Tensor:
        # An inf norm gives coef 0 (not NaN): max_norm / inf.
        coef = torch.clamp(self.max_norm / (total_norm + _NORM_EPS), max=1.0)
        coef = self._capped(torch.where(valid, coef, 1.0), total_norm, cap)
        if torch.compiler.is_compiling():
            # A constant made inside the graph: the cached tensor, stored as ``last_threshold`` and read back next
            # step, would alias two inputs of a compiled tail on its first call only, and recompile it on the next.
            self.last_threshold = torch.full((), self.max_norm, dtype=torch.float32, device=total_norm.device)
        else:
            self.last_threshold = self._device_threshold  # made once: no op per step
        self.last_coef = coef
        return coef

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm}, norm_type={self.norm_type}"


class AutoClip(Clipper):
    """Clip to a percentile of the gradient norms seen so far: AutoClip (Seetharaman et al., 2020).

    Each valid step appends its total L2 norm to the history; the threshold is the ``percentile``-th percentile of
    the history, the current norm included (linear interpolation, as ``numpy.percentile``'s default), and the
    gradients are scaled by ``min(1, threshold / (norm + 1e-6))`` (the 1e-6 at most 0.1% of the norm). Invalid steps
    (non-finite norm, AMP overflow) and exactly-zero norms (a fully masked batch) never enter the history.

    Cost: with ``history=None`` (the paper's setting) every norm of the run is kept, sorted, on the gradients'
    device: 4 bytes per step, and each step inserts with ``searchsorted`` in a constant number of kernels that read
    and write the whole history (O(steps) memory traffic: about 20 MB per step after a million steps, microseconds on
    a GPU but milliseconds on a CPU; the buffer doubles when full). With ``history=N`` a ring buffer keeps only the
    last ``N`` norms and each step sorts those ``N`` values.

    Args:
        percentile: the percentile of the history used as threshold, in ``[0, 100]``; the paper recommends 10.
        history: ``None`` to keep every norm, or the number of most recent norms to keep (``>= 1``, at most 10^7).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = AutoClip(percentile=10.0, history=1000)
        >>> for scale in (1.0, 2.0, 100.0):
        ...     model.zero_grad()
        ...     (scale * model(torch.ones(8, 4))).sum().backward()
        ...     total_norm = clipper.clip_(model)
        >>> bool(clipper.last_coef < 0.1)  # the last step was a spike
        True
    """

    _INITIAL_CAPACITY = 1024

    def __init__(self, percentile: float = 10.0, history: int | None = None) -> None:
        super().__init__()
        self.percentile = check_number(
            "percentile", percentile, low=0.0, high=100.0, low_inclusive=True, high_inclusive=True
        )
        if 0.0 < self.percentile < 1.0:
            # A fraction where a percentile is meant (0.5 for the median) clips nearly every step to the smallest norm.
            warnings.warn(
                f"AutoClip(percentile={self.percentile}) clips to the {self.percentile}th percentile of the norms seen,"
                f" near their minimum: `percentile` is on a 0-100 scale (the median is 50, the paper's 10 the default)."
                " Pass a value of 1 or more unless this is meant.",
                UserWarning,
                stacklevel=2,
            )
        # Held on the device, whole, from the first call: a bound the constructor checks rather than an allocation
        # that fails there (``None`` keeps every norm, growing as it goes).
        self.history = optional_int("history", history, low=1, high=MAX_BUFFER)
        self._calls = 0  # host-side, an upper bound of the number of valid entries: sizes the unbounded buffer
        self._values: Tensor | None = None  # sorted (history=None, +inf padded) or a ring buffer (history=N)
        self._count: Tensor | None = None  # valid steps seen, int64 on the device
        self._arange: Tensor | None = None

    def _prepare(self, device: torch.device) -> None:
        if self._values is None or self._count is None:
            self._values, self._count = self._empty_state(device)
        elif self._values.device != device:
            self._values = self._values.to(device)
            self._count = self._count.to(device)
        if self.history is None and self._calls >= self._values.numel():
            # Capacity comes from the host call counter, never from the device count, so growing never syncs.
            capacity = max(self._values.numel(), 1)
            while capacity <= self._calls:
                capacity *= 2
            pad = torch.full((capacity - self._values.numel(),), math.inf, device=device)
            self._values = torch.cat([self._values, pad])
        if self._arange is None or self._arange.device != device or self._arange.numel() != self._values.numel():
            self._arange = torch.arange(self._values.numel(), device=device)

    def _empty_state(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        size = self.history if self.history is not None else self._INITIAL_CAPACITY
        return torch.full((size,), math.inf, device=device), torch.zeros((), dtype=torch.int64, device=device)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        device = total_norm.device
        self._prepare(device)
        values, count, arange = self._values, self._count, self._arange
        assert values is not None and count is not None and arange is not None
        norm = total_norm.reshape(())
        # Whatever the caller says, a non-finite norm must never enter the history: it would poison it for good. An
        # exactly-zero norm (a fully masked batch) is no observation either: it would drag the percentile down.
        ok = valid.to(device) & (norm > 0) & (norm < math.inf)  # also False for NaN
        new_count = count + ok
        if self.history is None:
            # Insert into the sorted history: the +inf padding sorts last, so searchsorted lands among the entries.
            pos = torch.searchsorted(values, norm.reshape(1))
            shifted = torch.roll(values, 1)
            inserted = torch.where(arange < pos, values, torch.where(arange == pos, norm, shifted))
            values = torch.where(ok, inserted, values)
            ordered = values
            n = new_count
        else:
            values = torch.where(ok & (arange == count % self.history), norm, values)
            ordered = torch.sort(values).values
            n = torch.clamp(new_count, max=self.history)
        threshold = _sorted_percentile(ordered, n, self.percentile)
        coef = torch.clamp(threshold / (norm + _scaled_eps(norm)), max=1.0)
        coef = self._capped(torch.where(ok, coef, 1.0), norm, cap)
        _scale_(grads, coef)
        self._values, self._count = values, new_count
        self._calls += 1
        self.last_threshold = threshold
        self.last_coef = coef
        return coef

    def rescale_(self, factor: Tensor) -> None:
        if self._values is not None:
            self._values = self._values * factor.to(self._values)  # +inf padding stays +inf, the order stays

    def state_dict(self) -> dict[str, Any]:
        """The history (``values``: sorted for ``history=None``, a ring buffer otherwise), the valid-step count and
        the host call counter."""
        if self._values is None or self._count is None:
            values, count = self._empty_state("cpu")
        else:
            values, count = _to_cpu(self._values), _to_cpu(self._count)
        return {"values": values, "count": count, "calls": self._calls}

    def device_state(self) -> dict[str, Any]:
        if self._values is None or self._count is None:
            return self.state_dict()
        return {"values": self._values.clone(), "count": self._count.clone(), "calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`; the tensors move to the gradients' device on the next
        call."""
        check_state("AutoClip", state)
        if set(state) != {"values", "count", "calls"}:
            raise ValueError(f"Not an AutoClip state: keys {sorted(state)}.")
        values = torch.as_tensor(state["values"], dtype=torch.float32)
        if values.ndim != 1 or (self.history is not None and values.numel() != self.history):
            raise ValueError(f"AutoClip(history={self.history}) cannot load a history of shape {tuple(values.shape)}.")
        count = torch.as_tensor(state["count"], dtype=torch.int64).reshape(()).clone()
        # The sorted history holds every norm seen; a ring holds the last `history` of a count that goes on.
        if int(count) < 0 or (self.history is None and int(count) > values.numel()):
            raise ValueError(
                f"`state['count']` of AutoClip must be between 0 and the history's {values.numel()} entries,"
                f" got {int(count)}."
            )
        # The first `count` entries are the norms seen (sorted, or the ring's filled slots); the free ones are inf.
        check_state_values("AutoClip", "values", values[: int(count.clamp_min(0))])
        check_state_values("AutoClip", "values", values, allow_inf=True)
        self._values = values.clone()
        self._count = count
        self._calls = int(state["calls"])

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, history={self.history}"


def _sorted_percentile(ordered: Tensor, n: Tensor, percentile: float) -> Tensor:
    """``numpy.percentile(ordered[:n], percentile)`` (linear method) with ``n`` a device tensor; ``inf`` if ``n == 0``.

    ``ordered`` holds the ``n`` values sorted first; everything happens on the device.
    """
    last = (n - 1).clamp_min(0)
    # The rank is taken in fp64 where available so that its floor matches numpy's float64 arithmetic.
    rank = last.to(_state_float_dtype(ordered.device)) * (percentile / 100.0)
    low = rank.floor()
    frac = (rank - low).to(torch.float32)
    low_index = low.to(torch.int64)
    high_index = torch.minimum(low_index + 1, last)
    pair = ordered.index_select(0, torch.stack([low_index, high_index]))
    below, above = pair[0], pair[1]
    diff = above - below
    # numpy's lerp, which is exact at both ends of the interval.
    value = torch.where(frac >= 0.5, above - diff * (1.0 - frac), below + diff * frac)
    return torch.where(n > 0, value, math.inf)


class ZClip(Clipper):
    """Z-score based adaptive clipping: ZClip (Kumar et al., 2025, arXiv:2504.02507).

    Follows the authors' reference implementation step for step, except for what a spike feeds the EMA (see
    ``spike_update``; ``spike_update="clip"`` is the reference exactly) and for a climb (``trend_ratio``;
    ``trend_ratio=None`` is the reference's spike test). The first ``warmup_steps`` valid steps only
    collect the total norms (clipped to ``max_grad_norm`` if set); then the EMA mean and variance are initialised from
    them (population variance). After the warm-up, with ``std = sqrt(var)``:

    - ``mode="zscore"``: ``z = (norm - mean) / (std + eps)`` (``eps`` at most 0.1% of ``mean``); when
      ``z > z_thresh`` the step is a spike and is clipped to ``clip_factor * (mean + z_thresh * std / (z /
      z_thresh))`` (``clip_option="adaptive_scaling"``: the larger the outlier, the harder it is clipped) or to
      ``mean`` (``clip_option="mean"``);
    - ``mode="percentile"``: a norm above ``mean + z_thresh * std`` is a spike and is clipped to that value
      (``clip_option`` and ``clip_factor`` are not used).

    The clip value is capped by ``max_grad_norm`` when set; gradients above it are scaled by ``clip / (norm +
    1e-6)`` (the 1e-6 at most 0.1% of the norm). The EMA is then updated with ``x``, the raw norm on an ordinary
    step and on a spike the clip value (the reference), or, for a spike that follows a spike, the norm winsorized to
    the spike boundary ``mean + z_thresh * (std + eps)`` (``spike_update="boundary"``, the default;
    ``spike_update="clip"``: the reference on every spike): ``mean = alpha * mean + (1 - alpha) * x`` followed by
    ``var = alpha * var + (1 - alpha) * (x - mean) ** 2`` with the *new* mean, unless ``skip_update_on_spike`` is
    set and the step was a spike. In percentile mode the clip value is the boundary, so the two agree there.

    Why the boundary: the adaptive clip value of a far outlier is about the mean, so with the reference a lasting
    new norm level (a harder task from step N on, an auxiliary loss switched on) is never learned: every later step
    is a spike, it enters the EMA as the old mean, the variance shrinks, and every step of the rest of the run is
    clipped to the old level. In the level-shift runs this was measured on (an Adam MLP regression whose loss jumps
    50-80x at step 100 or 520, or an auxiliary loss switched on at step 150; two seeds), ZClip alone clipped all
    180-200 later steps by 10-70x and ended +4%, +15% and +300% in held-out loss. Fed the boundary, each spike in a
    row after the first multiplies the standard deviation by ``sqrt(alpha + (1 - alpha) * (alpha * z_thresh) **
    2)`` (1.19 at ``z_thresh=4``, the default clipper's; 1.07 at 2.5), so the new level stops being a spike after a
    number of steps that grows with the logarithm of the jump: 13-24 steps clipped in those runs, which ended -17%
    to +0.01% from unguarded. Why only in a row: fed the boundary on every spike, spikes a few steps apart (one
    corrupted label in 500, batches of 64: the demo) widened the spread faster than ``alpha`` let it decay, until
    50x spikes every 2-6 steps went through unclipped (threshold 77-122 after 300 steps) and the demo's guarded run
    diverged and ended ruined. A lone spike enters as the reference has it, and moves the mean by about ``(1 -
    alpha)`` times the clip value's distance from it.

    Why ``level_steps``: even fed the boundary, a new level is clipped to the old one for up to 31 steps, and those
    first steps of the new task are the ones that matter (an Adam regression made 10x to 100x harder for good at step
    120 or 180 of 240 ended up to +9.8% above unguarded). Spikes in a row, each within twice the first one's norm,
    are one level; once ``level_steps`` of them have held it, the mean moves to their average and the variance grows
    with the square of the level's ratio to the old mean (a norm's spread grows with the norm). The next step at the
    new level is then ordinary: 5 steps clipped in those runs, which ended at most +2.4% above unguarded. A shorter
    burst (bad batches in a row) and a norm that keeps climbing never become the level. A bad stretch long enough
    to become the level does: when the clean data returns, the mean decays back at ``alpha`` alone, with a spread
    the drop widened, and for about 150 steps a 20x spike passes this clipper (six 50x batches in a row; in
    GradGuard the exploding detector comes back down after five clean steps, and its cap, then twice its average,
    held such a spike to 2x the clean norm from ten steps after the stretch on). Taking a held drop in the same way
    was tried: it fixed that, and in the fragile suite's LSTM it made the clipper tighter as the norms fell
    (held-out MSE 0.0075 against 0.0051), so it was left out.

    Steps that are not valid (non-finite, AMP overflow) neither count towards the warm-up nor touch the EMA. The
    statistics are kept in fp64 (fp32 on MPS), as the reference's Python floats are. Despite its name,
    ``mode="percentile"`` (the authors' term) uses no percentile: its threshold is the fixed ``mean + z_thresh * std``.

    :attr:`last_threshold` is the norm the gradients were clipped to on a clipped step, and otherwise the norm above
    which they would have been (the z-score boundary ``mean + z_thresh * (std + eps)``, or ``mean + z_thresh * std``
    in percentile mode, or ``trend_ratio`` times the step before's norm when that is higher and the step before was no
    spike; capped by ``max_grad_norm``); during the warm-up it is ``max_grad_norm`` or ``inf``.

    Args:
        alpha: EMA smoothing factor, in ``(0, 1)``.
        z_thresh: z-score above which a norm is a spike (``> 0``); in percentile mode, the number of standard
            deviations above the mean of the threshold. 2.5 is the paper's; GradGuard's default clipper is
            ``ZClip(z_thresh=4.0)`` (fewer healthy steps clipped), so keep 4.0 when changing only another argument.
        warmup_steps: number of valid steps collected before the EMA starts (``>= 2``: the spread of one norm is 0,
            and with it ZClip clipped 298 of 299 healthy steps; at most 10^7, the buffer that collects them).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: in zscore mode, ``"adaptive_scaling"`` or ``"mean"``.
        clip_factor: multiplier of the adaptive-scaling threshold (``> 0``; 0.3 to 0.7 clips more aggressively).
        max_grad_norm: optional absolute cap on the clipping threshold (``> 0``), also applied during warm-up.
        skip_update_on_spike: leave the EMA unchanged on a spike.
        eps: added to the standard deviation in the z-score (``> 0``), at most 0.1% of the EMA mean norm: exactly
            ``eps`` from a mean of ``1000 * eps`` up, scaled with the mean below it, so that the test does not
            depend on the gradients' scale there (the reference's absolute 1e-6 made the threshold 40x the mean of
            norms about 1e-7).
        warmup_ratio: optional ceiling during the warm-up, as a multiple (``>= 1``) of the lower median of the norms
            collected so far; the warm-up buffer then keeps the clipped norms, so a run that diverges in its first
            steps meets a ceiling at once and the EMA starts from the calm level. ``None`` (default) follows the
            reference implementation: no clipping during the warm-up except ``max_grad_norm``.
        spike_update: what a spike feeds the EMA in zscore mode: ``"boundary"`` (default), the clip value for a
            lone spike and the spike boundary ``mean + z_thresh * (std + eps)`` for each spike that follows a spike,
            so that a lasting new level is absorbed within a few dozen steps; ``"clip"``, the clip value on every
            spike, as the reference implementation does (a lasting new level is then clipped to the old one for
            good). Not used in percentile mode, whose clip value is the boundary.
        level_steps: spikes in a row at one level (each within twice the first one's norm) after which the EMA moves
            to that level (above), ``>= 2``; ``None``: the boundary update alone. Used only with
            ``spike_update="boundary"`` and ``skip_update_on_spike=False`` in zscore mode.
        trend_ratio: a norm at most this many times the previous valid step's, when that step was no spike, is no
            spike (``> 1``): it continues a climb, which is the run's own, while a bad batch or a too-high rate jumps
            (by 10-100x a step in the stability suite). ``None``: the reference's test alone.

    Why ``trend_ratio``: a healthy model's norm can climb fast as it starts to learn, and the EMA lags the climb. A
    VAE with cyclical KL annealing (SGD) whose total norm climbed from 3.6 to 85 over steps 20-40, 1.1-1.5x a step,
    left the warm-up inside that climb: the reference's test clipped 6-11 of its steps (coefficients down to 0.36),
    and the run ended up to +21% in held-out loss (+6.6% to +13.7% on five of eight seeds, against noise floors of at
    most 2.4%). Judged against the step before, each of those steps is ordinary, and what ZClip is for, a spike, is a
    jump from it. The price: a climb that keeps within ``trend_ratio`` a step and goes on is a blow-up all the same,
    and ZClip does not hold it (a noiseless 1.3x a step: 2 of 30 steps clipped in GradGuard, where its exploding
    detector flagged them, against 30 with the reference's test). With noise, the first step over the ratio is a
    spike, and every step after it that stays a spike is judged by the z-score alone (27 of 30 clipped at 1.3x with
    +-10% noise).

    Exactly-zero norms (a fully masked batch) are no observation: they neither count towards the warm-up nor move
    the EMA, which would otherwise make every ordinary norm after them look like a spike.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = ZClip(warmup_steps=5)
        >>> for step in range(10):
        ...     model.zero_grad()
        ...     scale = 100.0 if step == 9 else 1.0 + 0.01 * step
        ...     (scale * model(torch.ones(8, 4))).sum().backward()
        ...     total_norm = clipper.clip_(model)
        >>> bool(clipper.last_coef < 0.05)  # the spike was clipped back towards the mean
        True
    """

    fusable = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: Literal["zscore", "percentile"] = "zscore",
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        clip_factor: float = 1.0,
        max_grad_norm: float | None = None,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
        warmup_ratio: float | None = None,
        spike_update: Literal["boundary", "clip"] = "boundary",
        level_steps: int | None = 5,
        trend_ratio: float | None = 1.5,
    ) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0)
        # One norm has no spread: the EMA would start with std 0, and every later norm above it would be a spike.
        # The warm-up's norms are kept in a buffer of this size, allocated at the first call (bounded here).
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=2, high=MAX_BUFFER)
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"`mode` must be 'zscore' or 'percentile', got {mode!r}.")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"`clip_option` must be 'adaptive_scaling' or 'mean', got {clip_option!r}.")
        self.mode = mode
        self.clip_option = clip_option
        self.clip_factor = check_number("clip_factor", clip_factor, low=0.0)
        self.max_grad_norm = optional_number("max_grad_norm", max_grad_norm, low=0.0)
        self.skip_update_on_spike = check_bool("skip_update_on_spike", skip_update_on_spike)
        self.eps = check_number("eps", eps, low=0.0)
        self.warmup_ratio = optional_number("warmup_ratio", warmup_ratio, low=1.0, low_inclusive=True)
        if spike_update not in ("boundary", "clip"):
            raise ValueError(f"`spike_update` must be 'boundary' or 'clip', got {spike_update!r}.")
        self.spike_update = spike_update
        self.level_steps = optional_int("level_steps", level_steps, low=2)
        self.trend_ratio = optional_number("trend_ratio", trend_ratio, low=1.0)
        self._buffer: Tensor | None = None  # warm-up norms
        self._count: Tensor | None = None  # valid steps seen (int64); the EMA is live once it reaches warmup_steps
        self._mean: Tensor | None = None
        self._var: Tensor | None = None
        self._run: Tensor | None = None  # bool: the last valid step was a spike
        self._prev: Tensor | None = None  # the last valid step's norm (0: none yet), for ``trend_ratio``
        # The spikes in a row at one level, for ``level_steps``: how many (0: none), the first one's norm, their sum.
        self._level: Tensor | None = None
        self._arange: Tensor | None = None
        # Once the host knows the warm-up is over, the warm-up bookkeeping (about 15 small kernels) is skipped. It
        # learns it from a copy of ``count >= warmup_steps`` that lands without a wait (see ``_watch_warmup``).
        self._warm_known = False
        self._warm_probe: HostFlags | None = None
        self._warmup_calls = 0

    def _empty_state(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "buffer": torch.zeros(self.warmup_steps, dtype=dtype, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "mean": torch.zeros((), dtype=dtype, device=device),
            "var": torch.zeros((), dtype=dtype, device=device),
            "run": torch.zeros((), dtype=torch.bool, device=device),
            "level": torch.zeros(3, dtype=dtype, device=device),
            "prev": torch.zeros((), dtype=dtype, device=device),
        }

    def _prepare(self, device: torch.device) -> None:
        dtype = _state_float_dtype(device)
        parts = self._parts()
        if parts is None:
            state = self._empty_state(device, dtype)
            self._buffer, self._count = state["buffer"], state["count"]
            self._mean, self._var, self._run = state["mean"], state["var"], state["run"]
            self._level, self._prev = state["level"], state["prev"]
            self._forget_warmup()
        elif parts["count"].device != device or parts["mean"].dtype != dtype:
            self._forget_warmup()
            self._buffer = parts["buffer"].to(device=device, dtype=dtype)
            self._count = parts["count"].to(device)
            self._mean = parts["mean"].to(device=device, dtype=dtype)
            self._var = parts["var"].to(device=device, dtype=dtype)
            self._run = parts["run"].to(device)
            self._level = parts["level"].to(device=device, dtype=dtype)
            self._prev = parts["prev"].to(device=device, dtype=dtype)
        if self._arange is None or self._arange.device != device:
            self._arange = torch.arange(self.warmup_steps, device=device)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        device = total_norm.device
        self.prepare_(device)
        coef = self.coefficient_(total_norm, valid, cap, flag_cap)
        _scale_(grads, coef)
        if not self._warm_known:
            self._watch_warmup(device)
        return coef

    def prepare_(self, device: torch.device) -> None:
        super().prepare_(device)
        self._prepare(device)
        if not self._warm_known and self._warm_probe is not None and self._warm_probe.ready():
            self._warm_known = bool(self._warm_probe.values[0])
            self._warm_probe.filled = False

    def coefficient_(
        self, total_norm: Tensor, valid: Tensor, cap: Tensor | None = None, flag_cap: Tensor | None = None
    ) -> Tensor:
        device = total_norm.device
        buffer, count, mean, var, arange = self._buffer, self._count, self._mean, self._var, self._arange
        run, prev = self._run, self._prev
        assert buffer is not None and count is not None and mean is not None and var is not None
        assert arange is not None and run is not None and prev is not None
        # On the host: the warm-up bookkeeping below may still matter. A compiled tail always traces it (checked
        # first, so the host flag is never read there): a Python flag inside the graph would recompile it when the
        # warm-up ends, and once fused the bookkeeping costs nothing. After the warm-up it changes no value.
        in_warmup = torch.compiler.is_compiling() or not self._warm_known
        # Reshape and move only when needed: each is one more dispatched op per step even when it changes nothing.
        x = (total_norm if total_norm.dim() == 0 else total_norm.reshape(())).to(mean.dtype)
        if valid.device != device:
            valid = valid.to(device)
        # A non-finite norm must never reach the EMA, whatever the caller says: it would poison it for good. An
        # exactly-zero norm (a fully masked batch) is no observation either: it would make ordinary norms spikes.
        ok = valid & (x > 0) & (x < math.inf)  # also False for NaN

        # The authors' spike test and clip value, from the statistics before this step.
        std = var.sqrt()
        if self.mode == "percentile":
            boundary = mean + self.z_thresh * std
            spike = x > boundary
            clip_value = boundary
        else:
            # The eps, at most 0.1% of the mean norm: an absolute one would make the test depend on the norms' scale.
            spread = std + _scaled_eps(mean, self.eps)
            z = (x - mean) / spread
            boundary = mean + self.z_thresh * spread
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                clip_value = (mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                clip_value = mean
        if self.trend_ratio is not None:
            # A step within ``trend_ratio`` of the step before it, when that one was no spike, continues a climb: the
            # run's own (a model starting to learn), not a bad batch or a blow-up, which jump. A VAE whose norm rose
            # 1.1-1.5x a step from 3.6 to 85 as it started to learn had 6-11 such steps clipped, +21% held-out.
            climb_bound = self.trend_ratio * prev
            spike = spike & ((x > climb_bound) | run)
            # The norm above which this step would have been a spike.
            shown_bound = torch.where(run, boundary, torch.maximum(boundary, climb_bound))
        else:
            shown_bound = boundary
        # The clip value on a spike, the raw norm otherwise: what the step is clipped to (before max_grad_norm) and
        # what enters the EMA (never capped by max_grad_norm).
        target = torch.where(spike, clip_value, x)
        shown = torch.where(spike & ok, clip_value, shown_bound)
        effective = target
        if self.max_grad_norm is not None:
            effective = torch.clamp(target, max=self.max_grad_norm)
            shown = torch.clamp(shown, max=self.max_grad_norm)
        live = ok
        if in_warmup:
            # Warm-up: store the norm; the step that fills the buffer initialises the EMA from it.
            warm = count < self.warmup_steps
            collect = ok & warm
            live = ok & ~warm
            # What a step the exploding detector flagged was held to (a bad batch): the warm-up's statistics are
            # those of the steps as taken. Collected raw, three 10^4x bad batches in a warm-up of 25 steps set the
            # threshold at 10^4x the norms, and ZClip clipped nothing for hundreds of steps. Not ``cap``, which
            # holds a fixed ``max_norm`` too: a warm-up at that bound would say nothing of the norms.
            stored = x if flag_cap is None else torch.minimum(x, flag_cap.to(device=device, dtype=x.dtype))
            if self.warmup_ratio is not None:
                # A ceiling from the calm first steps: ``warmup_ratio`` times the (lower) median of the norms
                # collected so far. A run that diverges inside the warm-up meets it at once; the median does not
                # follow a climb until half the warm-up has climbed, and the buffer keeps the clipped values, so
                # the EMA starts from the calm level too.
                ordered = torch.where(arange < count, buffer, math.inf).sort().values
                # The count is held to the buffer's size: a compiled tail runs this past the warm-up too, where the
                # value is not used but the index must stay inside the buffer.
                collected = count.clamp(1, self.warmup_steps)
                median = ordered.gather(0, ((collected - 1) // 2).reshape(1)).reshape(())
                warm_cap = torch.where(count > 0, self.warmup_ratio * median, math.inf)
                stored = torch.minimum(stored, warm_cap)
            buffer = torch.where(collect & (arange == count), stored, buffer)
            init_now = collect & (count == self.warmup_steps - 1)
            init_mean = buffer.mean()
            init_var = (buffer - init_mean).square().mean()
        coef = torch.where(live & (x > effective), effective / (x + _scaled_eps(x)), 1.0)
        if in_warmup:
            # During warm-up the reference calls torch.nn.utils.clip_grad_norm_(max_grad_norm).
            warm_limit = None if self.max_grad_norm is None else torch.full_like(x, self.max_grad_norm)
            if self.warmup_ratio is not None:
                warm_limit = warm_cap if warm_limit is None else torch.minimum(warm_cap, warm_limit)
            if warm_limit is not None:
                coef = torch.where(collect, torch.clamp(warm_limit / (x + _scaled_eps(x)), max=1.0), coef)
        coef = coef.to(torch.float32)

        # What enters the EMA: the clip value as in the reference (in percentile mode the boundary), or, with
        # ``spike_update="boundary"``, from the second spike in a row on the norm winsorized to the spike boundary.
        # The clip value of a far outlier is about the mean, so under a lasting new level the reference's EMA never
        # moves (see the class docstring); the boundary lets the variance grow by a fixed factor per spike in a row,
        # so the new level is absorbed within a few dozen steps. A lone spike enters as the reference has it: fed the
        # boundary too, spikes every few steps (corrupted labels) widened the spread faster than it decayed, until
        # they were no longer clipped.
        fed = target
        boundary_update = self.spike_update == "boundary" and self.mode != "percentile"
        if boundary_update:
            fed = torch.where(spike & run, boundary, target)
        update = live & ~spike if self.skip_update_on_spike else live
        new_mean = self.alpha * mean + (1.0 - self.alpha) * fed
        new_var = self.alpha * var + (1.0 - self.alpha) * (fed - new_mean).square()
        if in_warmup:
            new_mean = torch.where(update, new_mean, torch.where(init_now, init_mean, mean))
            new_var = torch.where(update, new_var, torch.where(init_now, init_var, var))
            self._buffer = buffer
        else:
            new_mean = torch.where(update, new_mean, mean)
            new_var = torch.where(update, new_var, var)
        if self.level_steps is not None and boundary_update and not self.skip_update_on_spike:
            new_mean, new_var = self._follow_level(x, spike, live, mean, var, new_mean, new_var)
        self._mean, self._var = new_mean, new_var
        self._count = count + ok
        self._run = torch.where(live, spike, run)
        self._prev = torch.where(ok, x, prev)

        coef = self._capped(coef, total_norm, cap)
        if in_warmup:
            warm_threshold = math.inf if warm_limit is None else warm_limit
            self.last_threshold = torch.where(warm, warm_threshold, shown).to(torch.float32)
        else:
            self.last_threshold = shown.to(torch.float32)
        self.last_coef = coef
        return coef

    def _follow_level(
        self, x: Tensor, spike: Tensor, live: Tensor, mean: Tensor, var: Tensor, new_mean: Tensor, new_var: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``level_steps``: the EMA after this step, moved to the level of the spikes in a row once it has held."""
        level = self._level
        assert level is not None and self.level_steps is not None
        length, first, total = level.unbind()
        # In the warm-up the spike test means nothing, and an invalid step (a non-finite norm) must leave the state as
        # it was.
        spike = spike & live
        holds = spike & (length > 0) & ((x / first - _LEVEL_MID).abs() <= _LEVEL_HALF)  # a spike at the same level
        length = (length * holds + 1.0) * spike
        first = torch.where(holds, first, x)
        total = total * holds + x
        moved = length >= self.level_steps
        level_mean = total / self.level_steps
        new_mean = torch.where(moved, level_mean, new_mean)
        # A norm's spread grows with the norm: the variance follows the level, so its ordinary steps are no spikes.
        new_var = torch.where(moved, var * (level_mean / mean).square(), new_var)
        self._level = torch.where(live, torch.stack([torch.where(moved, 0.0, length), first, total]), level)
        return new_mean, new_var

    def _watch_warmup(self, device: torch.device) -> None:
        """Start a host copy of "the warm-up is over" once it can be, unless one is still on its way."""
        self._warmup_calls += 1
        # Invalid steps do not count, so only the device knows; before ``warmup_steps`` calls it cannot be over.
        # Other backends (MPS, XLA) would wait for the copy: they keep the warm-up bookkeeping instead.
        if self._warmup_calls < self.warmup_steps or device.type not in ("cpu", "cuda"):
            return
        if self._warm_probe is None:
            self._warm_probe = HostFlags.create(1, device)
        if not self._warm_probe.filled:
            assert self._count is not None
            self._warm_probe.fill((self._count >= self.warmup_steps).reshape(1).to(torch.float32), self._warmup_calls)

    def _forget_warmup(self) -> None:
        self._warm_known = False
        self._warm_probe = None
        self._warmup_calls = 0

    def _parts(self) -> dict[str, Tensor] | None:
        """The live state tensors by name, or ``None`` before the first call."""
        parts = {
            "buffer": self._buffer,
            "count": self._count,
            "mean": self._mean,
            "var": self._var,
            "run": self._run,
            "level": self._level,
            "prev": self._prev,
        }
        return None if any(v is None for v in parts.values()) else parts  # type: ignore[return-value]

    def rescale_(self, factor: Tensor) -> None:
        parts = self._parts()
        if parts is None:
            return
        f = factor.to(parts["mean"])
        self._buffer, self._mean, self._var = parts["buffer"] * f, parts["mean"] * f, parts["var"] * f.square()
        self._level = parts["level"] * torch.stack([f.new_ones(()), f, f])  # (count, first norm, sum)
        self._prev = parts["prev"] * f

    def state_dict(self) -> dict[str, Any]:
        """Warm-up buffer, valid-step count, EMA mean and variance, whether the last valid step was a spike, the
        spikes in a row at one level (count, first norm, sum), and the last valid step's norm."""
        parts = self._parts()
        return self._empty_state("cpu", torch.float64) if parts is None else {k: _to_cpu(v) for k, v in parts.items()}

    def device_state(self) -> dict[str, Any]:
        parts = self._parts()
        return self.state_dict() if parts is None else {k: v.clone() for k, v in parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (one saved before ``run``, ``level`` or ``prev`` was kept
        loads too); the tensors move to the gradients' device on the next call."""
        check_state("ZClip", state)
        known = {"buffer", "count", "mean", "var", "run", "level", "prev"}
        if not {"buffer", "count", "mean", "var"} <= set(state) <= known:
            raise ValueError(f"Not a ZClip state: keys {sorted(state)}.")
        # fp64 here; the next call casts to the device's state dtype.
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float64).detach().clone()
        if buffer.shape != (self.warmup_steps,):
            raise ValueError(
                f"ZClip(warmup_steps={self.warmup_steps}) cannot load a warm-up buffer of shape {tuple(buffer.shape)}."
            )
        mean = torch.as_tensor(state["mean"], dtype=torch.float64).reshape(()).clone()
        var = torch.as_tensor(state["var"], dtype=torch.float64).reshape(()).clone()
        level = torch.as_tensor(state.get("level", torch.zeros(3)), dtype=torch.float64).reshape(3).clone()
        # Without a last norm (an older state), the first step after the load is judged by the z-score alone.
        prev = torch.as_tensor(state.get("prev", 0.0), dtype=torch.float64).reshape(()).clone()
        for key, values in (("buffer", buffer), ("mean", mean), ("var", var), ("level", level), ("prev", prev)):
            check_state_values("ZClip", key, values)
        self._buffer, self._mean, self._var, self._level, self._prev = buffer, mean, var, level, prev
        self._count = torch.as_tensor(state["count"], dtype=torch.int64).reshape(()).clone()
        self._run = torch.as_tensor(state.get("run", False), dtype=torch.bool).reshape(()).clone()
        self._forget_warmup()

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
            f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, max_grad_norm={self.max_grad_norm}, "
            f"skip_update_on_spike={self.skip_update_on_spike}, eps={self.eps}, warmup_ratio={self.warmup_ratio}, "
            f"spike_update={self.spike_update!r}, level_steps={self.level_steps}, trend_ratio={self.trend_ratio}"
        )


class AGC(Clipper):
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets).

    Each unit's gradient is clipped relative to the norm of its weights::

        max_norm_i = clip_factor * max(||W_i||, eps)
        G_i <- G_i * min(1, max_norm_i / max(||G_i||, 1e-6))

    For a parameter with 2 or more dimensions a unit is one output unit: the norm runs over every dimension but the
    first (a row of a ``Linear`` weight, a filter of a convolution); 1-D and 0-d parameters form a single unit. A
    module that stores its 2-D weight as ``[in_features, out_features]`` (transformers' ``Conv1D`` in GPT-2, found
    by default once ``transformers`` is imported; others through ``column_types``) has its output units in columns,
    and they are clipped as such (except for a weight sharded by FSDP2, whose columns straddle the shards: rows there).
    A transposed convolution (``nn.ConvTranspose1d/2d/3d``) with one group stores ``[in, out, k...]``: its units
    run along the second dimension, one per output channel. Both need the owners (pass the ``nn.Module`` to
    ``clip_``; ``GuardEngine`` and ``GradGuard`` know them). A grouped transposed convolution's output channel spans
    part of both dimensions (``[in, out/groups, k...]``); its weight, and a parametrized one's originals, are
    clipped by their stored rows.
    A sparse gradient (``nn.Embedding(sparse=True)``) is clipped as its dense form would be: each row it holds
    against the same row of the weights, which are read at those rows only. ``total_norm`` plays no part in the
    decision. :attr:`last_coef` is the smallest unit coefficient of the step (``1.0`` = nothing clipped);
    :attr:`last_threshold` is ``inf`` (there is no single threshold).

    The NFNets practice is to exclude the final classifier layer, e.g. ``exclude=r"^fc\\."`` or
    ``exclude_types=(MyHead,)``. Exclusion goes by qualified parameter name (a regular expression searched in names
    such as ``"layer1.0.conv1.weight"``) or by the type of the module that owns the parameter, never by position:
    :meth:`Clipper.clip_` needs the ``nn.Module`` for it, :meth:`Clipper.clip_grads_` the ``names`` /
    ``owner_types``. By default nothing is excluded.

    Parameters of the same shape, dtype and device are batched together (in bounded temporary buffers), so a step
    costs a few kernels per distinct parameter shape rather than several per parameter. Under FSDP2 (``DTensor``
    parameters sharded on dim 0) an output unit never straddles shards, so AGC works on each rank's local shard with
    no communication; 1-D parameters are then clipped per local shard.

    Args:
        clip_factor: the largest allowed ratio of gradient norm to weight norm per unit (``> 0``); NFNets use
            0.01 to 0.16 depending on batch size.
        eps: floor of the weight norm, so that zero-initialised units can still move (``> 0``).
        exclude: regular expression; parameters whose qualified name matches (``re.search``) are not clipped.
        exclude_types: module types whose own parameters are not clipped.
        column_types: module types whose 2-D weights hold one output unit per column; ``None``: transformers'
            ``Conv1D`` when ``transformers`` is imported. Needs ``owner_types`` (pass the ``nn.Module`` to ``clip_``).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> (1000 * model(torch.ones(3, 4))).sum().backward()
        >>> clipper = AGC(clip_factor=0.01, exclude=r"^1\\.")  # leave the head alone
        >>> head_grad = model[1].weight.grad.clone()
        >>> total_norm = clipper.clip_(model)
        >>> torch.equal(model[1].weight.grad, head_grad), bool(clipper.last_coef < 1.0)
        (True, True)
    """

    needs_params = True
    takes_cap = False

    # Elements per temporary buffer (per gradient and per parameter): bounds the extra memory of batching.
    _CHUNK_NUMEL = 1 << 24

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: str | None = None,
        exclude_types: tuple[type, ...] = (),
        column_types: tuple[type, ...] | None = None,
    ) -> None:
        super().__init__()
        self.clip_factor = check_number("clip_factor", clip_factor, low=0.0)
        self.eps = check_number("eps", eps, low=0.0, high=FLOAT32_MAX, high_inclusive=True)
        if exclude is not None:
            if not isinstance(exclude, str):
                raise ValueError(f"`exclude` must be a regular expression string or None, got {exclude!r}.")
            try:
                self._exclude_re: re.Pattern[str] | None = re.compile(exclude)
            except re.error as err:
                raise ValueError(f"`exclude` is not a valid regular expression ({err}): {exclude!r}.") from None
        else:
            self._exclude_re = None
        self.exclude = exclude
        if isinstance(exclude_types, type):
            exclude_types = (exclude_types,)
        if not isinstance(exclude_types, (tuple, list)) or not all(isinstance(t, type) for t in exclude_types):
            raise ValueError(f"`exclude_types` must be a tuple of classes, got {exclude_types!r}.")
        self.exclude_types = tuple(exclude_types)
        if column_types is not None:
            if isinstance(column_types, type):
                column_types = (column_types,)
            if not isinstance(column_types, (tuple, list)) or not all(isinstance(t, type) for t in column_types):
                raise ValueError(f"`column_types` must be a tuple of classes or None, got {column_types!r}.")
            column_types = tuple(column_types)
        self.column_types = column_types
        self._excluded_names: dict[str, bool] = {}
        self._no_threshold: dict[torch.device, Tensor] = {}

    def _selected(self, n: int, names: list[str] | None, owner_types: list[type] | None) -> Iterable[int]:
        if self._exclude_re is not None and names is None:
            raise ValueError("AGC(exclude=...) needs the parameter `names` (pass the nn.Module to clip_).")
        if self.exclude_types and owner_types is None:
            raise ValueError("AGC(exclude_types=...) needs `owner_types` (pass the nn.Module to clip_).")
        if self._exclude_re is None and not self.exclude_types:
            return range(n)
        keep = []
        for i in range(n):
            if names is not None and self._exclude_re is not None:
                name = names[i]
                hit = self._excluded_names.get(name)
                if hit is None:
                    hit = self._excluded_names[name] = self._exclude_re.search(name) is not None
                if hit:
                    continue
            if owner_types is not None and self.exclude_types and issubclass(owner_types[i], self.exclude_types):
                continue
            keep.append(i)
        return keep

    def _columns(self, grads: list[Tensor], params: list[Tensor], owner_types: list[type] | None) -> set[int]:
        """The indices of gradients whose output units run along their second dimension: 2-D weights stored
        ``[in, out]`` and the weights of transposed convolutions with one group, ``[in, out, k...]`` (not a DTensor,
        whose second dimension straddles its shards)."""
        if owner_types is None:
            return set()
        types = self.column_types if self.column_types is not None else _default_column_types()
        return {
            i
            for i, (grad, param, owner) in enumerate(zip(grads, params, owner_types))
            if not hasattr(grad, "placements")
            and not grad.is_sparse
            and (
                (grad.ndim == 2 and bool(types) and issubclass(owner, types))
                or has_output_columns(param)  # a transposed convolution's weight with one group
            )
        }

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        if params is None:
            raise ValueError("AGC needs `params` (the parameters of `grads`).")
        columns = self._columns(grads, params, owner_types)
        grads, params = _local_tensors(grads), _local_tensors(params)
        if columns:  # transposed views: their rows are the output units, and clipping them clips the gradient
            grads = [g.transpose(0, 1) if i in columns else g for i, g in enumerate(grads)]
            params = [p.transpose(0, 1) if i in columns else p for i, p in enumerate(params)]
        # Same-shaped tensors are stacked into one [units, unit_len] matrix: a handful of kernels per distinct shape
        # (one norm for all their units, one multiply, one foreach copy back) instead of several per parameter.
        groups: dict[tuple[torch.device, torch.dtype, torch.dtype, torch.Size], list[int]] = {}
        sparse: list[int] = []
        for i in self._selected(len(grads), names, owner_types):
            grad = grads[i]
            if grad.is_sparse:
                sparse.append(i)
            else:
                groups.setdefault((grad.device, grad.dtype, params[i].dtype, grad.shape), []).append(i)

        minima: list[Tensor] = []
        valid_on: dict[torch.device, Tensor] = {}
        for i in sparse:
            grad = grads[i]
            if grad._nnz() == 0:  # host metadata: an empty gradient has no unit to clip
                continue
            if grad.device not in valid_on:
                valid_on[grad.device] = valid.to(grad.device)
            minima.append(self._clip_sparse_(grad, params[i], valid_on[grad.device]).to(total_norm.device))
        for (device, _, _, shape), indices in groups.items():
            numel = shape.numel()
            if numel == 0:
                continue
            units = shape[0] if len(shape) >= 2 else 1
            if device not in valid_on:
                valid_on[device] = valid.to(device)
            per_batch = max(1, self._CHUNK_NUMEL // numel)
            for start in range(0, len(indices), per_batch):
                batch = indices[start : start + per_batch]
                batch_grads = [grads[i] for i in batch]
                batch_params = [params[i] for i in batch]
                in_place = len(batch) == 1 and batch_grads[0].is_contiguous()
                if in_place:
                    grad_rows = batch_grads[0].view(units, -1)
                else:
                    grad_rows = torch.stack(batch_grads).reshape(len(batch) * units, -1)
                if len(batch) == 1:
                    param_rows = batch_params[0].reshape(units, -1)
                else:
                    param_rows = torch.stack(batch_params).reshape(len(batch) * units, -1)
                coef = self._unit_coef(_row_norms(param_rows), _row_norms(grad_rows), valid_on[device])
                grad_rows.mul_(coef.unsqueeze(1))
                if not in_place:
                    foreach_copy_(batch_grads, grad_rows.view(len(batch), *shape).unbind(0))
                minima.append(coef.amin().to(total_norm.device))

        if not minima:
            min_coef = torch.ones((), device=total_norm.device)
        elif len(minima) == 1:
            min_coef = minima[0]
        else:
            min_coef = torch.stack(minima).amin()
        if total_norm.device not in self._no_threshold:
            self._no_threshold[total_norm.device] = torch.full((), math.inf, device=total_norm.device)
        self.last_threshold = self._no_threshold[total_norm.device]
        self.last_coef = min_coef
        return min_coef

    def _unit_coef(self, weight_norms: Tensor, grad_norms: Tensor, valid: Tensor) -> Tensor:
        """Each unit's ``min(1, clip_factor * max(|W_i|, eps) / |G_i|)``, 1 on an invalid step. ``grad_norms`` is
        overwritten; ``weight_norms`` is not (a 1-D parameter's is an expanded view)."""
        max_norm = weight_norms.clamp_min(self.eps).mul_(self.clip_factor)
        return torch.where(valid, max_norm.div_(grad_norms.clamp_min_(_NORM_EPS)).clamp_max_(1.0), 1.0)

    def _clip_sparse_(self, grad: Tensor, param: Tensor, valid: Tensor) -> Tensor:
        """Clip a sparse COO gradient (``nn.Embedding(sparse=True)``) in place, unit by unit as its dense form would
        be: each row it holds against the same row of the weights, which are read at those rows only. A repeated row
        adds up first (coalescing, as the norm measurement already does; on CUDA it waits for the number of rows),
        then one ``index_add`` over the parameter's rows sums each row's squares. Returns the smallest coefficient."""
        coalesced = grad if grad.is_coalesced() else grad.coalesce()
        values = coalesced._values()  # shares storage with ``coalesced``: scaling it scales the gradient
        if param.dim() >= 2:
            units, rows = param.shape[0], coalesced._indices()[0]
            weight_norms = _row_norms(param.reshape(units, -1).index_select(0, rows))
        else:  # a 1-D parameter is a single unit: every stored entry belongs to it
            units, rows = 1, torch.zeros_like(coalesced._indices()[0])
            weight_norms = _row_norms(param.reshape(1, -1)).expand(values.shape[0])
        entry_sq = values.float().square().reshape(values.shape[0], -1).sum(1)
        row_sq = torch.zeros(units, device=values.device).index_add_(0, rows, entry_sq)
        grad_norms = row_sq.index_select(0, rows).sqrt_()  # at the held rows only, not the whole table
        coef = self._unit_coef(weight_norms, grad_norms, valid)
        values.mul_(coef.to(values.dtype).view(-1, *([1] * (values.dim() - 1))))
        if coalesced is not grad:
            grad.copy_(coalesced)  # the same object keeps the clipped entries (an optimizer may hold it)
        return coef.amin()

    def extra_repr(self) -> str:
        text = (
            f"clip_factor={self.clip_factor}, eps={self.eps}, exclude={self.exclude!r},"
            f" exclude_types={_type_names(self.exclude_types)}"
        )
        # The default (transformers' Conv1D when it is loaded) is left out: the repr goes into the rescue's advice.
        return text if self.column_types is None else f"{text}, column_types={_type_names(self.column_types)}"


class AdaGC(Clipper):
    """Per-tensor adaptive clipping: AdaGC (Wang et al., 2025, arXiv 2502.11034).

    Each parameter tensor ``i`` keeps ``gamma_i``, an EMA of its own *clipped* gradient norms, and its gradient is
    clipped to ``lambda_rel`` times it::

        h_i = min(1, lambda_rel * gamma_i / ||G_i||)
        G_i <- h_i * G_i
        gamma_i <- beta * gamma_i + (1 - beta) * ||h_i * G_i||

    During the first ``warmup_steps`` valid steps the whole gradient is clipped to the global norm ``lambda_abs``
    instead (as :func:`torch.nn.utils.clip_grad_norm_`), and ``gamma_i`` is the smallest clipped norm tensor ``i``
    had. A spike in one tensor is clipped there, without shrinking the others' steps (a global clip scales them all);
    since ``gamma_i`` only averages clipped norms, it rises by at most ``(1 - beta) * (lambda_rel - 1)`` per step
    (0.1% with the paper's values), so a spike never lifts the threshold.

    What the paper leaves open is decided so that a healthy run is not harmed:

    * an exactly-zero gradient (a fully masked batch, LoRA's ``A`` while ``B`` is still zero, an idle expert) is no
      observation: the tensor's ``gamma_i`` and its count stay as they were (a zero would become a threshold of 0
      and clip the tensor to nothing for good);
    * every tensor counts its own observations, and is clipped relative to ``gamma_i`` only once it has
      ``warmup_steps`` of them: a tensor that starts receiving gradients late (an unfrozen layer, a new param group)
      gets its own warm-up, unclipped after the global one;
    * invalid steps (non-finite norm, AMP overflow) change nothing, and the gradients are left as they are.

    The paper trains LLMs with AdamW, which divides a tensor's gradient scale away: there the clip mostly bounds the
    relative weight of a spiking tensor. With SGD every clipped step is a smaller step, and the threshold, which
    rises by at most 0.1% per step, slows a run whose norms grow (see the healthy zoo benchmark in the README).

    Statistics are kept per parameter *name* (``names`` of :meth:`Clipper.clip_grads_`, or the names of an
    ``nn.Module`` passed to :meth:`Clipper.clip_`), so the set of gradients may change from step to step (idle
    experts, frozen layers); without names they are kept by position, and the number of gradients must not change.
    Give names on every call or on none: a switch is refused, since the statistics would start afresh.
    Sparse gradients are clipped as one tensor each (their stored values); FSDP2-sharded (DTensor) gradients are not
    supported. Cost per step: one foreach norm and one foreach multiply, plus about 45 small kernels on vectors with
    one entry per tensor (49 top-level ops per call in all, whatever the number of tensors).

    Args:
        lambda_rel: the largest allowed ratio of a tensor's gradient norm to its ``gamma_i``, ``>= 1`` (paper:
            1.05).
        beta: EMA decay of ``gamma_i``, in ``[0, 1)`` (paper: 0.98).
        warmup_steps: valid steps clipped to ``lambda_abs`` globally, and observations a tensor needs before it is
            clipped relative to its own ``gamma_i``, ``>= 1`` (paper: 100).
        lambda_abs: the global norm the gradients are clipped to during the warm-up, ``> 0`` (paper: 1.0); ``None``
            leaves the warm-up unclipped (``gamma_i`` is then the smallest raw norm).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> clipper = AdaGC(warmup_steps=3)
        >>> x = torch.ones(16, 4)
        >>> for _ in range(5):
        ...     model.zero_grad()
        ...     model(x).square().mean().backward()
        ...     total_norm = clipper.clip_(model)
        >>> model.zero_grad()
        >>> model[0](x).sum().mul(1e3).backward()  # a spike in the first layer's gradients only
        >>> total_norm = clipper.clip_(model)
        >>> bool(clipper.last_coef < 0.01)
        True
    """

    needs_names = True

    def __init__(
        self,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        lambda_abs: float | None = 1.0,
    ) -> None:
        super().__init__()
        self.lambda_rel = check_number("lambda_rel", lambda_rel, low=1.0, low_inclusive=True)
        self.beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.lambda_abs = optional_number("lambda_abs", lambda_abs, low=0.0, high=FLOAT32_MAX, high_inclusive=True)
        self._slots: dict[str | int, int] = {}  # parameter name (or position) -> index into the state vectors
        # By position: the parameters' ids (or the gradients' shapes) of the last call; not saved (ids are per process).
        self._seen: list[Any] | None = None
        # Index tensors per set of keys: a model whose gradients come and go (idle experts) cycles through a few.
        self._slot_cache: dict[tuple[str | int, ...], Tensor] = {}
        # Device state: gamma and the observation count per tensor, the number of valid steps.
        self._gamma = torch.zeros(0)
        self._count = torch.zeros(0)
        self._steps = torch.zeros(())
        self._no_threshold: dict[torch.device, Tensor] = {}

    def _slots_for(self, keys: tuple[str | int, ...], device: torch.device) -> Tensor:
        """The state indices of ``keys`` as a device tensor (cached while the keys stay the same); new keys get new,
        empty slots."""
        cached = self._slot_cache.get(keys)
        if cached is not None and cached.device == device:
            return cached
        new = [k for k in dict.fromkeys(keys) if k not in self._slots]
        for key in new:
            self._slots[key] = len(self._slots)
        if new or self._gamma.device != device:
            grow = len(self._slots) - self._gamma.numel()
            self._gamma = torch.cat([self._gamma.to(device), torch.zeros(grow, device=device)])
            self._count = torch.cat([self._count.to(device), torch.zeros(grow, device=device)])
            self._steps = self._steps.to(device)
        # Pinned and asynchronous: a plain host-to-device copy would make the host wait for the device.
        slots = _upload(torch.tensor([self._slots[k] for k in keys], dtype=torch.int64), device)
        if len(self._slot_cache) >= _SLOT_CACHE_SIZE:
            self._slot_cache.clear()
        self._slot_cache[keys] = slots
        return slots

    def _keys(self, grads: list[Tensor], names: list[str] | None, params: list[Tensor] | None) -> tuple[str | int, ...]:
        if names is not None:
            if self._slots and all(isinstance(k, int) for k in self._slots):
                # Switching to names would start every tensor's statistics afresh and leave the old ones unused.
                raise ValueError(
                    f"AdaGC keeps its {len(self._slots)} statistics by position (earlier calls had no `names`); this"
                    " call passes `names`. Give names (or the nn.Module to clip_) on every call, or on none."
                )
            return tuple(names)
        # What identifies the tensors by position: the parameters themselves where given (clip_), else the shapes.
        seen = [id(p) for p in params] if params is not None else [tuple(g.shape) for g in grads]
        positional = all(isinstance(k, int) for k in self._slots)
        same = len(self._slots) == len(grads) and (self._seen is None or self._seen == seen)
        if self._slots and not (positional and same):
            # By position, another set of tensors of the same count would take one tensor's statistics for another's.
            raise ValueError(
                f"AdaGC keeps one statistic per gradient tensor and has {len(self._slots)} of them; this call has"
                f" {len(grads)}{' other' if len(self._slots) == len(grads) else ''} gradients and no `names`. Pass"
                " `names` to clip_grads_ (or the nn.Module to clip_) when the set of gradients changes between steps."
            )
        self._seen = seen
        return tuple(range(len(grads)))

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        valid: Tensor,
        params: list[Tensor] | None,
        names: list[str] | None,
        owner_types: list[type] | None,
        cap: Tensor | None,
        flag_cap: Tensor | None = None,
    ) -> Tensor:
        device = total_norm.device
        if _DTensor is not None and any(isinstance(g, _DTensor) for g in grads):
            raise ValueError(
                "AdaGC does not support sharded (FSDP2 DTensor) gradients: use ZClip, AutoClip or NormClip."
            )
        slots = self._slots_for(self._keys(grads, names, params), device)
        raw, order = _grouped_norms([_dense(g) for g in grads], device)
        if order is not None:  # several devices or dtypes: back into the order of ``grads``
            raw = torch.empty_like(raw).index_copy_(0, _upload(torch.tensor(order), device), raw)
        # The norms of the true gradients: ``total_norm`` is, and a fused optimizer under a GradScaler leaves ``grads``
        # still multiplied by the loss scale, which this ratio divides away (1 otherwise).
        norms = raw * (total_norm / torch.linalg.vector_norm(raw).clamp_min(_TINY))
        valid = valid.to(device)
        gamma, count = self._gamma[slots], self._count[slots]
        observed = valid & (norms > 0) & (norms < math.inf)  # no NaN, inf or exact zero

        in_warmup = self._steps < self.warmup_steps
        if self.lambda_abs is None:
            h_abs = torch.ones((), device=device)
        else:
            h_abs = torch.where(in_warmup, (self.lambda_abs / (total_norm + _NORM_EPS)).clamp_max(1.0), 1.0)
        relative = (self.lambda_rel * gamma / norms.clamp_min(_TINY)).clamp_max(1.0)
        own_warmup = count < self.warmup_steps
        coef = torch.where(own_warmup, h_abs, relative)
        coef = torch.where(valid & (norms < math.inf), coef, 1.0)
        clipped = norms * coef
        warm_gamma = torch.where(count > 0, torch.minimum(gamma, clipped), clipped)
        new_gamma = torch.where(own_warmup, warm_gamma, gamma * self.beta + clipped * (1.0 - self.beta))
        # Scatter back: every key appears once per call.
        self._gamma = self._gamma.index_copy(0, slots, torch.where(observed, new_gamma, gamma))
        self._count = self._count.index_copy(0, slots, count + observed)
        self._steps = self._steps + (valid & (total_norm > 0) & (total_norm < math.inf))  # steps with a gradient

        if cap is not None:
            coef = coef * self._capped(torch.ones((), device=device), torch.linalg.vector_norm(clipped), cap)
        per_device = group_by_device_and_dtype([grads], with_indices=True)
        if len(per_device) == 1:
            foreach_mul_each_(grads, coef.unbind())
        else:
            for (grad_device, _), ([group], indices) in per_device.items():
                part = coef[_upload(torch.tensor(indices), device)].to(grad_device)
                foreach_mul_each_(group, part.unbind())

        if device not in self._no_threshold:
            self._no_threshold[device] = torch.full((), math.inf, device=device)
        abs_threshold = self._no_threshold[device] if self.lambda_abs is None else self.lambda_abs
        self.last_threshold = torch.where(in_warmup, abs_threshold, self._no_threshold[device])
        self.last_coef = coef.amin() if coef.numel() else torch.ones((), device=device)
        return self.last_coef

    def state_dict(self) -> dict[str, Any]:
        """``keys`` (parameter names, or positions), ``gamma`` and ``count`` per key, and the valid ``steps``."""
        return {k: _to_cpu(v) if isinstance(v, Tensor) else v for k, v in self.device_state().items()}

    def device_state(self) -> dict[str, Any]:
        return {
            "keys": list(self._slots),
            "gamma": self._gamma.clone(),
            "count": self._count.clone(),
            "steps": self._steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`; the tensors move to the gradients' device on the next
        call."""
        check_state("AdaGC", state)
        if set(state) != {"keys", "gamma", "count", "steps"}:
            raise ValueError(f"Not an AdaGC state: keys {sorted(state)}.")
        keys = list(state["keys"])
        gamma = torch.as_tensor(state["gamma"], dtype=torch.float32).reshape(-1)
        count = torch.as_tensor(state["count"], dtype=torch.float32).reshape(-1)
        if gamma.numel() != len(keys) or count.numel() != len(keys):
            raise ValueError(
                f"AdaGC state holds {len(keys)} keys but {gamma.numel()} gamma and {count.numel()} count entries."
            )
        check_state_values("AdaGC", "gamma", gamma)
        self._slots = {key: i for i, key in enumerate(keys)}
        self._slot_cache.clear()
        self._seen = None  # the state names no tensors: the next call's, by position, take it
        self._gamma, self._count = gamma.clone(), count.clone()
        self._steps = torch.as_tensor(state["steps"], dtype=torch.float32).reshape(()).clone()

    def __getstate__(self) -> dict[str, Any]:
        # Parameter ids mean nothing in a copy or another process: a copied or unpickled AdaGC takes the next call's
        # tensors by position, as one loaded from a state_dict does (it refused its own copied model before).
        return {**self.__dict__, "_seen": None}

    def extra_repr(self) -> str:
        return (
            f"lambda_rel={self.lambda_rel}, beta={self.beta}, warmup_steps={self.warmup_steps},"
            f" lambda_abs={self.lambda_abs}"
        )


def _type_names(types: tuple[type, ...]) -> str:
    return "(" + ", ".join(t.__name__ for t in types) + ("," if len(types) == 1 else "") + ")"


# Modules that keep a 2-D weight as [in_features, out_features]: transformers' Conv1D (GPT-2), in its current home and
# its former one.
_COLUMN_TYPES = (("transformers.pytorch_utils", "Conv1D"), ("transformers.modeling_utils", "Conv1D"))


def _default_column_types() -> tuple[type, ...]:
    return tuple({found for module, name in _COLUMN_TYPES if (found := loaded_type(module, name)) is not None})


def _local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    # FSDP2 shards parameters (and gradients) as DTensors on dim 0: output units are whole on every rank.
    if _DTensor is None or not any(isinstance(t, _DTensor) for t in tensors):
        return tensors
    return [t.to_local() if isinstance(t, _DTensor) else t for t in tensors]


def _row_norms(rows: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=_norm_dtype(rows.dtype))
    return norms if norms.dtype == torch.float32 else norms.float()


def default_clipper() -> ZClip:
    """The clipper of ``GradGuard(clip="default")``: ``ZClip(z_thresh=4.0)``.

    The paper's ``z_thresh=2.5`` clips 4-7% of the steps of a healthy GAN (24 to 39 of 600 in the healthy zoo), and
    in a game every changed step changes where it ends (+10.6% and +14.1% held-out MMD on two seeds of three). At
    4.0 the same runs clip 1 to 6 steps and end within 0.7% of unguarded. The rescue of a too-high learning rate
    does not rest on the clipper (the exploding detector, the LR guard and the opt-in rollback do it): with
    ``Rollback()`` the stability suite gives the same results at 2.5 and 4.0; without it, no diverging config is
    rescued at either (the LSTM at 10x its rate ends at MSE 0.30 at 4.0, 5.8 at 2.5).
    """
    return ZClip(z_thresh=4.0)
