"""Weight penalties applied as gradient terms: L1, L2 and soft orthogonality.

A regularizer selects parameters once (:meth:`Regularizer.bind`) and then either returns a differentiable
penalty to add to the loss (:meth:`Regularizer.penalty`) or adds that penalty's exact gradient straight to
``.grad`` (:meth:`Regularizer.add_grad_`). The second form runs once per optimizer step, after the gradients are
complete, so it is unaffected by gradient accumulation and can follow the AMP loss scale.
"""

from __future__ import annotations

import abc
import contextlib
import math
import re
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._compat import foreach_add_, foreach_mul, foreach_norm, foreach_sgn, group_by_device_and_dtype
from lightning_gradguard._validation import check_bool, check_number, check_state
from lightning_gradguard.layers import (
    PARAMETRIZATION,
    PARAMETRIZED,
    PLAIN,
    SPECTRAL_NORM,
    WEIGHT_NORM_G,
    WEIGHT_NORM_V,
    note_output_columns,
    parameter_sites,
)

__all__ = ["L1", "L2", "Orthogonal", "Regularizer", "check_regularizers"]

# _NormBase is the common base of BatchNorm*, SyncBatchNorm and InstanceNorm* (lazy variants included).
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
# Recurrent layers whose input/hidden weights stack one [H, *] block per gate along dim 0.
_GATE_BLOCKS: tuple[tuple[tuple[type[nn.Module], ...], int], ...] = (
    ((nn.LSTM, nn.LSTMCell), 4),
    ((nn.GRU, nn.GRUCell), 3),
)


# Orthogonal stacks blocks of at most _STACK_BLOCK entries (64 x 64) into batched products of at most _STACK_ELEMENTS
# entries (256 MiB in fp32). Larger blocks go one by one: their products cost more than a launch, and on a CPU the
# stacking copy and the batched product made 48 blocks of 512 x 512 10-30% slower (benchmarks/regularizer_cost.py).
_STACK_BLOCK = 64 * 64
_STACK_ELEMENTS = 1 << 26


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """No autocast on ``device`` while a penalty or its gradient is computed: a plain loop may call ``add_grad_`` (or
    ``GuardEngine.step``) inside ``torch.autocast``, where a Gram matrix in bf16 would round ``W^T W - I``, whose
    entries are differences of numbers near 1, to noise."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums and Gram matrices lose too much; fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


class Regularizer(abc.ABC):
    """Base class of the weight penalties: parameter selection, adaptive strength, gradient application.

    **Selection.** A parameter is selected when all of the following hold:

    * ``modules`` is ``None``, or the regex is found (``re.search``) in the qualified name of the module owning
      the parameter (``"encoder.0"``) or in the parameter's qualified name (``"encoder.0.weight"``). Names read as
      in the plain model: ``torch.compile``'s ``_orig_mod.`` is left out (``net.0``, not ``net._orig_mod.0``);
    * ``module_types`` is ``None`` and the owner is not a normalization layer (BatchNorm, SyncBatchNorm,
      InstanceNorm, LayerNorm, GroupNorm, RMSNorm), or the owner is an instance of one of ``module_types``;
    * ``include_bias`` is true, or the parameter is not bias-like. Bias-like means: fewer than two dimensions
      (biases, normalization gains, scalars) or an own name that ends or begins with ``"bias"`` (``in_proj_bias``,
      and ``MultiheadAttention``'s ``bias_k``/``bias_v``, which are ``[1, 1, E]``);
    * the parameter holds at least one entry (a rank-0 adapter, ``nn.Linear(d, 0)``: nothing to regularize);
    * the subclass accepts it (:class:`Orthogonal` needs matrices, see there).

    Shared parameters are considered once, under the module that defines them first. A selected parameter that is
    frozen (``requires_grad`` false) is left alone, in :meth:`penalty` and :meth:`add_grad_`, for as long as it is:
    a backbone frozen at the start and unfrozen mid-run is regularized from then on, and one frozen mid-run stops
    being pulled (the optimizer would move it by the term alone).

    **Parametrized weights** (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``; the deprecated hook-based ``torch.nn.utils.weight_norm`` and
    ``spectral_norm`` alike). The module (``ParametrizedLinear``, a ``Linear``) owns the weight, whose name is the
    weight's (``modules`` is matched against ``"net.0.weight"`` as well as the real
    ``"net.0.parametrizations.weight.original0"``), and the penalty falls on the parameters that exist,
    ``original*``, chosen by what the weight ``W`` is made of; the gradient term is always the exact gradient of
    the stated penalty with respect to those parameters:

    * ``weight_norm``, ``W = g * v / ||v||`` (``original0 = g``, ``original1 = v``): :class:`L2` and :class:`L1`
      penalize the magnitude ``g``, :class:`Orthogonal` the direction ``v``. See each class for what this means
      for ``W``; ``g`` counts as a weight, not a bias, whatever its shape;
    * ``spectral_norm``, ``W = original / sigma(original)``: the raw weight ``original`` (``W`` does not depend on
      its scale, so a penalty on ``W`` would shrink nothing; penalizing the raw weight is what weight decay does);
    * ``orthogonal``: nothing. ``W`` is orthogonal by construction, so ``||W||^2`` and ``W^T W - I`` are constant:
      the L2 and orthogonality penalties of ``W`` have zero gradient, and an L1 pull on the entries of an
      orthogonal matrix is not wanted;
    * any other or stacked parametrization: its originals, and the parameters of the parametrization modules
      themselves (e.g. LoRA factors), as ordinary parameters under the rules above.

    **Adaptive strength.** With ``adaptive=True`` a strength ``s`` (starting at 1) multiplies ``weight``: each
    :meth:`on_exploding` call with an exploding step sets ``s <- min(s * adaptive_factor, max_strength)``, each
    call with a calm step sets ``s <- 1 + (s - 1) * decay``. Without ``adaptive``, ``s`` stays 1.

    Args:
        weight: penalty coefficient, ``>= 0``.
        modules: regex selecting parameters by module or parameter name (see above); ``None`` selects all.
        module_types: module classes whose own parameters are selected; ``None`` selects every module except
            normalization layers.
        include_bias: also select bias-like parameters.
        adaptive: raise the strength on exploding gradients and let it decay back.
        adaptive_factor: strength multiplier per exploding step, ``>= 1``.
        max_strength: upper bound of the strength, ``>= 1``.
        decay: per calm step, the fraction of the excess strength ``s - 1`` that remains, in ``[0, 1)``.
        name: name used in logs (``gradguard/reg/<name>``); defaults to the class name in lower case.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> reg = L2(1e-2)
        >>> reg.bind(model)
        ['weight']
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> reg.add_grad_()  # same gradient as adding reg.penalty() to the loss
    """

    def __init__(
        self,
        weight: float,
        modules: str | None = None,
        module_types: tuple[type, ...] | None = None,
        include_bias: bool = False,
        adaptive: bool = False,
        adaptive_factor: float = 2.0,
        max_strength: float = 10.0,
        decay: float = 0.99,
        name: str | None = None,
    ) -> None:
        weight = check_number("weight", weight, low=0.0, low_inclusive=True)
        self._pattern: re.Pattern[str] | None = None
        if modules is not None:
            try:
                self._pattern = re.compile(modules)
            except (re.error, TypeError) as err:
                raise ValueError(f"`modules` must be a regular expression or None, got {modules!r}: {err}") from err
        if module_types is not None:
            if isinstance(module_types, type):  # one class for a one-class tuple
                module_types = (module_types,)
            if not (
                isinstance(module_types, (tuple, list))
                and module_types
                and all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types)
            ):
                raise ValueError(
                    f"`module_types` must be None or a non-empty tuple of nn.Module subclasses, got {module_types!r}"
                )
            module_types = tuple(module_types)
        adaptive_factor = check_number("adaptive_factor", adaptive_factor, low=1.0, low_inclusive=True)
        max_strength = check_number("max_strength", max_strength, low=1.0, low_inclusive=True)
        decay = check_number("decay", decay, low=0.0, high=1.0, low_inclusive=True)
        include_bias = check_bool("include_bias", include_bias)
        adaptive = check_bool("adaptive", adaptive)
        if name is not None and not (isinstance(name, str) and name):
            raise ValueError(f"`name` must be a non-empty string or None, got {name!r}")
        self.weight = weight
        self.modules = modules
        self.module_types = module_types
        self.include_bias = include_bias
        self.adaptive = adaptive
        self.adaptive_factor = adaptive_factor
        self.max_strength = max_strength
        self.decay = decay
        self.name: str = name if name is not None else type(self).__name__.lower()
        self.param_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._layouts: list[Any] = []
        self._module_ref: weakref.ref[nn.Module] | None = None
        # Per ``only`` set of add_grad_ (one per optimizer): (the bound list, that set, its parameters, their layouts).
        self._subsets: dict[int, tuple[list[nn.Parameter], frozenset[int], list[nn.Parameter], list[Any]]] = {}
        self._strength = 1.0
        self._warned_not_adaptive = False

    def __getstate__(self) -> dict[str, Any]:
        """A copy or pickle keeps the selected parameters (a module deep-copied with it maps them to its own), not the
        weak reference to the module, which cannot be pickled: the next call given a module binds to it again."""
        state = self.__dict__.copy()
        state.update(_module_ref=None, _subsets={})
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight={self.weight!r}, modules={self.modules!r}, "
            f"module_types={self.module_types!r}, include_bias={self.include_bias!r}, adaptive={self.adaptive!r}, "
            f"adaptive_factor={self.adaptive_factor!r}, max_strength={self.max_strength!r}, decay={self.decay!r}, "
            f"name={self.name!r})"
        )

    # ------------------------------------------------------------------ selection

    # Kinds of parameters (lightning_gradguard.layers) this regularizer penalizes; see "Parametrized weights".
    _kinds: frozenset[str] = frozenset({PLAIN, WEIGHT_NORM_G, SPECTRAL_NORM, PARAMETRIZED, PARAMETRIZATION})

    def _selects(
        self,
        owner_name: str,
        owner: nn.Module,
        param_name: str,
        param: nn.Parameter,
        *,
        qualified: str | None = None,
        kind: str = PLAIN,
    ) -> bool:
        """The common selection. ``param_name`` is the parameter's name on ``owner`` (for the originals of a
        parametrized tensor, the tensor's name), ``qualified`` its real qualified name, ``kind`` what it is."""
        # Frozen parameters are selected too: they are left alone while frozen (see _trainable), and regularized
        # from the step they train (a backbone unfrozen mid-run).
        if kind not in self._kinds:
            return False
        if self._pattern is not None:
            names = [owner_name, f"{owner_name}.{param_name}" if owner_name else param_name]
            if qualified is not None:
                names.append(qualified)
            if not any(self._pattern.search(name) for name in names):
                return False
        if self.module_types is not None:
            if not isinstance(owner, self.module_types):
                return False
        elif isinstance(owner, _NORM_TYPES):
            return False
        # weight_norm's magnitude g has the weight's role whatever its shape (0-d with dim=None).
        bias_like = param_name.endswith("bias") or param_name.startswith("bias")
        bias_like = bias_like or (param.ndim < 2 and kind != WEIGHT_NORM_G)
        if not self.include_bias and bias_like:
            return False
        if param.numel() == 0:
            return False
        return self._accepts(owner, param_name, param)

    def _accepts(self, owner: nn.Module, param_name: str, param: nn.Parameter) -> bool:
        """Subclass hook: a further condition on a parameter that passed the common selection."""
        return True

    def _layout(self, owner: nn.Module, param_name: str, param: nn.Parameter) -> Any:
        """Subclass hook: per-parameter information kept with the selection and passed to ``_grad_terms``."""
        return None

    def _left_out(self) -> str:
        """What this kind leaves out beyond the selection rules, for the "selected no parameter" error."""
        return ""

    def bind(self, module: nn.Module) -> list[str]:
        """Select the parameters of ``module`` (see the class docstring) and remember them.

        Returns:
            The qualified names of the selected parameters, as in the uncompiled model
            (``"net.0.parametrizations.weight.original0"`` for weight_norm's ``g``).

        Raises:
            ValueError: nothing was selected, or a selected parameter is still uninitialized (lazy module).
        """
        params: list[nn.Parameter] = []
        names: list[str] = []
        layouts: list[Any] = []
        for site in parameter_sites(module):
            if isinstance(site.param, nn.parameter.UninitializedParameter):
                raise ValueError(f"parameter {site.name!r} is uninitialized; run a forward pass before binding")
            if self._selects(site.module_name, site.module, site.attr, site.param, qualified=site.name, kind=site.kind):
                params.append(site.param)
                names.append(site.name)
                layouts.append(self._layout(site.module, site.attr, site.param))
        if not params:
            raise ValueError(
                f"{self!r} selected no parameter of {type(module).__name__}; "
                f"check `modules`, `module_types` and `include_bias`{self._left_out()}"
            )
        self._params, self.param_names, self._layouts = params, names, layouts
        self._module_ref = weakref.ref(module)
        return list(names)

    def bound_module(self) -> nn.Module | None:
        """The module this regularizer is bound to (``None``: not bound, or that module is gone)."""
        return self._module_ref() if self._module_ref is not None else None

    def bound_parameters(self) -> list[nn.Parameter]:
        """The parameters selected at the last :meth:`bind` (empty before one)."""
        return list(self._params)

    def _bound_params(self, module: nn.Module | None) -> list[nn.Parameter]:
        if module is not None and (self._module_ref is None or self._module_ref() is not module):
            self.bind(module)
        if not self._params:
            raise RuntimeError(f"{type(self).__name__} is not bound to a module: call bind(module) first")
        return self._params

    # ------------------------------------------------------------------ strength

    @property
    def strength(self) -> float:
        """Current adaptive strength (1.0 when not adaptive)."""
        return self._strength

    @property
    def effective_weight(self) -> float:
        """``weight * strength``: the coefficient used by :meth:`penalty` and :meth:`add_grad_`."""
        return self.weight * self._strength

    def on_exploding(self, exploding: bool) -> None:
        """Update the adaptive strength with this step's exploding flag (a host-side Python bool)."""
        if not self.adaptive:
            return
        if exploding:
            self._strength = min(self._strength * self.adaptive_factor, self.max_strength)
        else:
            self._strength = 1.0 + (self._strength - 1.0) * self.decay

    # ------------------------------------------------------------------ penalty and gradient

    @abc.abstractmethod
    def _penalty_sum(self, params: list[Tensor], layouts: list[Any], dtype: torch.dtype) -> Tensor:
        """Unweighted, differentiable penalty of one device/dtype group, a 0-d tensor of ``dtype``."""

    @abc.abstractmethod
    def _grad_terms(self, params: list[Tensor], layouts: list[Any]) -> list[Tensor]:
        """Gradient of the unweighted penalty for each parameter of one device/dtype group, in its dtype.

        May return the parameters themselves; callers must not write into the result.
        """

    @staticmethod
    def _trainable(params: list[nn.Parameter], layouts: list[Any]) -> tuple[list[nn.Parameter], list[Any]]:
        """The parameters that train now (``requires_grad``), and their layouts: a frozen one is left alone, as the
        penalty added to the loss would leave it (one host attribute read per parameter)."""
        if all(p.requires_grad for p in params):
            return params, layouts
        keep = [i for i, p in enumerate(params) if p.requires_grad]
        return [params[i] for i in keep], [layouts[i] for i in keep]

    def penalty(self, module: nn.Module | None = None) -> Tensor:
        """The penalty times ``weight * strength`` over the selected parameters that train now (``requires_grad``):
        a differentiable 0-d fp32 tensor (a constant 0 while every selected parameter is frozen).

        Args:
            module: bind to this module first if it is not the bound one; ``None`` uses the bound parameters.
        """
        bound = self._bound_params(module)
        params, layouts = self._trainable(bound, self._layouts)
        out_device = bound[0].device
        total = torch.zeros((), dtype=torch.float32, device=out_device)
        groups = group_by_device_and_dtype([params], with_indices=True) if params else {}
        for (_, dtype), ((group,), indices) in groups.items():
            with _autocast_off(group[0].device):
                value = self._penalty_sum(group, [layouts[i] for i in indices], _accumulation_dtype(dtype))
            total = total + value.to(device=out_device, dtype=torch.float32)
        return total * self.effective_weight

    def _selection(self, only: frozenset[int] | None) -> tuple[list[nn.Parameter], list[Any]]:
        """The bound parameters and their layouts, or those of them whose ``id`` is in ``only``."""
        params = self._bound_params(None)
        if only is None:
            return params, self._layouts
        cached = self._subsets.get(id(only))
        if cached is None or cached[0] is not params or cached[1] is not only:
            if len(self._subsets) >= 16:  # engines rebuilt (new param groups) leave their sets behind
                self._subsets.clear()
            keep = [i for i, p in enumerate(params) if id(p) in only]
            cached = (params, only, [params[i] for i in keep], [self._layouts[i] for i in keep])
            self._subsets[id(only)] = cached
        return cached[2], cached[3]

    @torch.no_grad()
    def add_grad_(self, scale: Tensor | float = 1.0, only: frozenset[int] | None = None) -> None:
        """Add the gradient of :meth:`penalty` times ``scale`` to each selected parameter's ``.grad``.

        Equivalent to adding ``penalty()`` to the loss once per optimizer step. A missing ``.grad`` is created
        (as adding the penalty to the loss would do). No host-device synchronization.

        Args:
            scale: extra factor, a Python number or a 0-d tensor on any device (e.g. the AMP loss scale while
                gradients are still scaled).
            only: the ``id`` of each parameter to act on, e.g. those of the optimizer about to step (``None``: every
                selected parameter). With several optimizers each step then adds the terms of its own parameters
                only, as the penalty of those parameters added to that optimizer's loss would.
        """
        params, layouts = self._trainable(*self._selection(only))
        coef = self.effective_weight
        if coef == 0.0 or not params:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            elif param.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
        grads = [p.grad for p in params]
        groups = group_by_device_and_dtype([params, grads], with_indices=True)
        for (device, dtype), ((group_params, group_grads), indices) in groups.items():
            with _autocast_off(device):
                terms = self._grad_terms(group_params, [layouts[i] for i in indices])
            if isinstance(scale, Tensor):
                factor = (scale.detach().to(device=device, dtype=torch.float32) * coef).to(dtype)
                foreach_add_(group_grads, foreach_mul(terms, factor))
            else:
                foreach_add_(group_grads, terms, alpha=coef * float(scale))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The adaptive strength (plain Python values only)."""
        return {"strength": self._strength}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state returned by :meth:`state_dict`, under this regularizer's configuration: the strength is
        capped at ``max_strength``, and a regularizer that is not ``adaptive`` keeps 1 (with a warning when the saved
        strength differs: it was saved by an adaptive one).

        Raises:
            ValueError: the saved strength is not a finite number ``>= 1``.
        """
        check_state(type(self).__name__, state_dict, ("strength",))
        saved = state_dict["strength"]
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not 1.0 <= saved < math.inf:
            raise ValueError(f"{self.name!r}: the saved `strength` must be a finite number >= 1, got {saved!r}.")
        if not self.adaptive:
            if saved != 1.0 and not getattr(self, "_warned_not_adaptive", False):  # (unpickled from before it)
                self._warned_not_adaptive = True  # GradGuard restores it with its own state and each engine's
                warnings.warn(
                    f"{type(self).__name__} {self.name!r} is not adaptive: the saved strength {saved:.4g} (of an"
                    " adaptive one) is not restored; its strength stays 1.",
                    stacklevel=2,
                )
            self._strength = 1.0
            return
        self._strength = min(float(saved), self.max_strength)


def bind_all(regularizers: Sequence[Regularizer], module: nn.Module, wait_for_lazy: bool = False) -> list[Regularizer]:
    """Bind each regularizer to ``module``.

    Args:
        regularizers: the regularizers to bind.
        module: the module whose parameters they select.
        wait_for_lazy: when ``module`` still has uninitialized parameters (lazy modules get theirs in the first forward
            pass), bind none of them yet and return them all, to be bound after that pass.

    Returns:
        The regularizers left to bind (empty once bound).
    """
    if wait_for_lazy and any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        return list(regularizers)
    for r in regularizers:
        r.bind(module)
    return []


class L1(Regularizer):
    """L1 penalty ``weight * sum(|w|)``; its gradient is ``weight * sign(w)`` (0 at exactly 0; ``w / |w|`` for a
    complex ``w``).

    Pushes weights towards exact zeros (sparsity). Arguments and selection as in :class:`Regularizer`.

    A ``weight_norm`` weight ``W = g * v / ||v||`` is penalized through its magnitude: ``sum |g|``, which is the
    sum of the norms of ``W``'s output units (a group lasso: it pushes whole units to zero, not single entries);
    the direction ``v`` is left alone.

    Args:
        weight: penalty coefficient, ``>= 0``.
        modules, module_types, include_bias, adaptive, adaptive_factor, max_strength, decay, name: the parameter
            selection, the adaptive strength and the name in logs, as in :class:`Regularizer`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -3.0]]))
        >>> reg = L1(0.5)
        >>> _ = reg.bind(model)
        >>> reg.penalty()
        tensor(2., grad_fn=<MulBackward0>)
        >>> reg.add_grad_()
        >>> model.weight.grad
        tensor([[ 0.5000, -0.5000]])
    """

    def _penalty_sum(self, params: list[Tensor], layouts: list[Any], dtype: torch.dtype) -> Tensor:
        return torch.stack(foreach_norm(params, 1, dtype=dtype)).sum()

    def _grad_terms(self, params: list[Tensor], layouts: list[Any]) -> list[Tensor]:
        return foreach_sgn(params)


class L2(Regularizer):
    """L2 penalty ``weight / 2 * sum(||w||^2)``; its gradient is ``weight * w``.

    With the ``1/2`` the gradient is the classic (coupled) weight decay with coefficient ``weight``, the same as
    ``torch.optim.SGD(weight_decay=weight)``; unlike an optimizer's ``weight_decay`` it follows the parameter
    selection (biases and normalization layers left out by default). Arguments as in :class:`Regularizer`.

    A ``weight_norm`` weight ``W = g * v / ||v||`` gets exactly the L2 penalty of ``W``: each output unit of ``W``
    has norm ``|g|``, so ``||W||^2 = ||g||^2``, whose gradient is ``g`` on the magnitude and zero on the direction
    ``v`` (decaying ``v`` would not shrink ``W``, only speed up its direction's updates). Only ``g`` is selected.

    Args:
        weight: penalty coefficient, ``>= 0``.
        modules, module_types, include_bias, adaptive, adaptive_factor, max_strength, decay, name: the parameter
            selection, the adaptive strength and the name in logs, as in :class:`Regularizer`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -3.0]]))
        >>> reg = L2(0.5)
        >>> _ = reg.bind(model)
        >>> reg.penalty()
        tensor(2.5000, grad_fn=<MulBackward0>)
        >>> reg.add_grad_()
        >>> model.weight.grad
        tensor([[ 0.5000, -1.5000]])
    """

    def _penalty_sum(self, params: list[Tensor], layouts: list[Any], dtype: torch.dtype) -> Tensor:
        return 0.5 * torch.stack(foreach_norm(params, 2, dtype=dtype)).pow(2).sum()

    def _grad_terms(self, params: list[Tensor], layouts: list[Any]) -> list[Tensor]:
        return params


class Orthogonal(Regularizer):
    """Soft orthogonality ``weight * sum ||W^T W - I||_F^2`` over the selected weight matrices.

    Each parameter is viewed as a matrix ``[rows, -1]`` (a convolution kernel ``[out, in, kh, kw]`` becomes
    ``[out, in * kh * kw]``; a transposed convolution's ``[in, out, kh, kw]`` becomes ``[out, in * kh * kw]`` too,
    with one group: a grouped one's ``[in, out/groups, kh, kw]`` is taken by its stored rows)
    and the smaller Gram matrix is used: ``W^T W`` when ``rows >= cols``, ``W W^T`` when
    ``rows < cols``, so a wide matrix is pushed towards orthonormal rows and a tall one towards orthonormal
    columns. The gradient is analytic: ``4 W (W^T W - I)``, respectively ``4 (W W^T - I) W``. A complex matrix is
    pushed towards a unitary one, with the conjugate transpose ``W^H`` in place of ``W^T``.

    The input and hidden weights of ``nn.LSTM``/``nn.LSTMCell`` (4 gates) and ``nn.GRU``/``nn.GRUCell``
    (3 gates), ``weight_ih*`` and ``weight_hh*``, stack one block per gate along the rows, and
    ``nn.MultiheadAttention``'s ``in_proj_weight`` stacks the query, key and value projections; each block
    ``[H, cols]`` is penalized on its own: orthonormal columns of the stacked matrix ``[k*H, H]`` would only make the
    blocks' Gram matrices sum to the identity, not any one of them orthogonal.

    By default every matrix-shaped parameter (``ndim >= 2``) is selected except those of embeddings and
    normalization layers, and vectors in matrix shape (one row or one column, as a ``[1, 1, d]`` class token or the
    ``[1, d]`` weight of a single-output head, whose only "orthogonality" would be a unit norm); ``module_types``
    overrides the module filter. ``include_bias`` is not supported.
    Other arguments as in :class:`Regularizer`.

    A ``weight_norm`` weight ``W = g * v / ||v||`` is penalized through its direction: the matrix ``v`` (its
    magnitude ``g`` is a vector and is left alone). A ``spectral_norm`` weight through its raw weight ``original``,
    and an ``orthogonal`` one not at all (it is orthogonal already).

    Args:
        weight: penalty coefficient, ``>= 0``.
        include_bias: must be ``False`` (vectors have no orthogonality).
        modules, module_types, adaptive, adaptive_factor, max_strength, decay, name: the parameter selection, the
            adaptive strength and the name in logs, as in :class:`Regularizer`.

    Example:
        >>> import torch
        >>> lstm = torch.nn.LSTM(8, 16)
        >>> reg = Orthogonal(1e-3, modules=r"weight_hh")
        >>> reg.bind(lstm)
        ['weight_hh_l0']
        >>> bool(reg.penalty() > 0)
        True
    """

    def _left_out(self) -> str:
        # Said when nothing is selected: `modules=` naming an embedding alone selects nothing.
        if self.module_types is not None:
            return ""
        return (
            " (Orthogonal also leaves out embeddings, normalization layers and vectors in matrix shape; name"
            " embeddings with `module_types=(nn.Embedding,)`)"
        )

    def __init__(
        self,
        weight: float,
        modules: str | None = None,
        module_types: tuple[type, ...] | None = None,
        include_bias: bool = False,
        adaptive: bool = False,
        adaptive_factor: float = 2.0,
        max_strength: float = 10.0,
        decay: float = 0.99,
        name: str | None = None,
    ) -> None:
        if include_bias:
            raise ValueError("`include_bias` must be False for Orthogonal: vectors have no orthogonality")
        super().__init__(
            weight, modules, module_types, include_bias, adaptive, adaptive_factor, max_strength, decay, name
        )

    _kinds = frozenset({PLAIN, WEIGHT_NORM_V, SPECTRAL_NORM, PARAMETRIZED, PARAMETRIZATION})

    def _accepts(self, owner: nn.Module, param_name: str, param: nn.Parameter) -> bool:
        if param.ndim < 2:
            return False
        rows = param.shape[1] if note_output_columns(owner, param_name, param) else param.shape[0]
        if rows <= 1 or param.numel() <= rows:
            return False  # a vector in matrix shape (a [1, 1, d] token, a [1, d] head): orthogonality is only a norm
        return self.module_types is not None or not isinstance(owner, _EMBEDDING_TYPES)

    def _layout(self, owner: nn.Module, param_name: str, param: nn.Parameter) -> tuple[int, bool]:
        """The number of blocks stacked along the rows, and whether the rows are the second dimension."""
        if param_name.startswith(("weight_ih", "weight_hh")):
            for types, gates in _GATE_BLOCKS:
                if isinstance(owner, types) and param.shape[0] % gates == 0:
                    return gates, False
        if param_name == "in_proj_weight" and isinstance(owner, nn.MultiheadAttention) and param.shape[0] % 3 == 0:
            return 3, False  # the query, key and value projections, stacked along the rows
        return 1, note_output_columns(owner, param_name, param)

    @staticmethod
    def _stacks(
        params: list[Tensor], layouts: list[tuple[int, bool]], dtype: torch.dtype
    ) -> list[tuple[list[int], Tensor]]:
        """The parameters' blocks, stacked by block shape: ``(indices into params, [n * gates, rows, cols])``.

        Small blocks of one shape share one batched matrix product instead of several kernels per parameter: 600
        blocks of 64 x 64 are a handful of launches, not thousands. Larger blocks are their own stack (a view).
        """
        shapes: dict[tuple[int, int], list[list[int]]] = {}
        filled: dict[tuple[int, int], int] = {}  # entries in the last chunk of each shape
        params = [p.transpose(0, 1) if transposed else p for p, (_, transposed) in zip(params, layouts)]
        for i, (param, (gates, _)) in enumerate(zip(params, layouts)):
            shape = (param.shape[0] // gates, param.numel() // param.shape[0])
            chunks = shapes.setdefault(shape, [[]])
            # A stack is a copy: only small blocks (where launching, not computing, is the cost) are stacked, and
            # at most _STACK_ELEMENTS entries at once.
            if chunks[-1] and (shape[0] * shape[1] > _STACK_BLOCK or filled[shape] + param.numel() > _STACK_ELEMENTS):
                chunks.append([])
                filled[shape] = 0
            chunks[-1].append(i)
            filled[shape] = filled.get(shape, 0) + param.numel()
        stacks = []
        for (rows, cols), chunks in shapes.items():
            for indices in chunks:
                blocks = [params[i].reshape(-1, rows, cols) for i in indices]
                stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                stacks.append((indices, stacked if stacked.dtype == dtype else stacked.to(dtype)))
        return stacks

    @staticmethod
    def _gram(w: Tensor) -> Tensor:
        # The smaller Gram matrix of each block: rows orthonormal for a wide block, columns for a tall one.
        return w @ w.mH if w.shape[-2] < w.shape[-1] else w.mH @ w

    def _penalty_sum(self, params: list[Tensor], layouts: list[tuple[int, bool]], dtype: torch.dtype) -> Tensor:
        total = []
        for _, w in self._stacks(params, layouts, dtype):
            gram = self._gram(w)
            eye = torch.eye(gram.shape[-1], dtype=dtype, device=gram.device)
            # The norm, not ``pow(2).sum()``: it is real for a complex Gram matrix too.
            total.append(torch.linalg.vector_norm(gram - eye, dim=(-2, -1)).square().sum())
        return torch.stack(total).sum()

    def _grad_terms(self, params: list[Tensor], layouts: list[tuple[int, bool]]) -> list[Tensor]:
        terms: list[Tensor] = [params[0]] * len(params)  # every entry is replaced below
        for indices, w in self._stacks(params, layouts, _accumulation_dtype(params[0].dtype)):
            gram = self._gram(w)
            gram.diagonal(dim1=-2, dim2=-1).sub_(1.0)
            flat = (gram @ w if w.shape[-2] < w.shape[-1] else w @ gram).mul_(4.0).view(-1).to(params[0].dtype)
            offset = 0
            for i in indices:  # views into the one result, no kernel per parameter
                size, shape = params[i].numel(), params[i].shape
                if layouts[i][1]:  # computed on the transposed view: transposed back
                    terms[i] = flat[offset : offset + size].view(shape[1], shape[0], *shape[2:]).transpose(0, 1)
                else:
                    terms[i] = flat[offset : offset + size].view(shape)
                offset += size
        return terms


def check_regularizers(regularizers: Any) -> list[Regularizer]:
    """``regularizers`` (a list or tuple of :class:`Regularizer` instances with distinct names, or ``None``) as a
    list; a :class:`ValueError` naming the argument otherwise.

    Example:
        >>> [r.name for r in check_regularizers([L2(1e-4), L1(1e-5)])]
        ['l2', 'l1']
    """
    if regularizers is not None and not isinstance(regularizers, (list, tuple)):
        raise ValueError(f"`regularizers` must be a list of Regularizer instances or None, got {regularizers!r}")
    checked = list(regularizers or [])
    for r in checked:
        if not isinstance(r, Regularizer):
            raise ValueError(f"`regularizers` must hold Regularizer instances, got {r!r}")
    names = [r.name for r in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"`regularizers` need distinct names (pass name=...), got {names}")
    return checked
