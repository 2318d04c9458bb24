"""Which parameters form a "layer", and what the layer is called in the logs.

Names read as in the plain, uncompiled model: the wrapper that ``torch.compile`` puts around a module
(``net._orig_mod.0`` is ``net.0``), the activation-checkpoint wrapper and a plain loop's ``DistributedDataParallel``,
``DataParallel`` and Fabric wrappers are looked through, the parameters of a
parametrized tensor (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``, ...) belong to
the module that uses the tensor (``net.0``, not ``net.0.parametrizations.weight``), and a parameter set directly on the
root module is called by its attribute name (``scale``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils import parametrize

from lightning_gradguard._compat import loaded_type
from lightning_gradguard._validation import optional_int

# The name of the root module itself where a module name is needed (SaturationMonitor, for a model that is a single
# activation). Layers are never called this: a parameter of the root module is named by its attribute.
ROOT_LAYER = "(root)"

# Kinds of parameters, for callers that treat the parameters behind a parametrized tensor by what they mean
# (regularize.py): the magnitude ``g`` and direction ``v`` of a weight-normalized weight, the raw weight of a spectrally
# normalized one, the unconstrained original of an orthogonal one, the originals of any other (or stacked)
# parametrization, and a parameter of a parametrization module itself (e.g. LoRA factors).
PLAIN = ""
WEIGHT_NORM_G = "weight_norm.g"
WEIGHT_NORM_V = "weight_norm.v"
SPECTRAL_NORM = "spectral_norm"
ORTHOGONAL = "orthogonal"
PARAMETRIZED = "parametrized"
PARAMETRIZATION = "parametrization"


@dataclass
class LayerIndex:
    """The trainable parameters of a model, grouped into named layers.

    A *layer* is the module that directly owns parameters (``encoder.3.linear`` owns its ``weight`` and ``bias``),
    unless a coarser grouping is asked for. Layers are listed in definition order, which for most models is the
    forward order, so "the earliest layer" in a report is the one closest to the input.

    Attributes:
        names: layer names, in definition order.
        params: the unique trainable parameters, in definition order.
        param_names: the qualified name of each parameter (the first one, for tied weights), as in the uncompiled
            model (``torch.compile``'s ``_orig_mod.`` left out).
        layer_of_param: for each parameter, the index of its layer in ``names``.
        owner_types: for each parameter, the type of the module that owns it (for the parameters of a parametrized
            tensor, the parametrized module, e.g. ``ParametrizedLinear``, a subclass of ``nn.Linear``).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> index = build_layer_index(model)
        >>> index.names
        ['0', '2']
        >>> index.layer_of_param
        [0, 0, 1, 1]
    """

    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    layer_of_param: list[int] = field(default_factory=list)
    owner_types: list[type] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def subset(self, params: Iterable[nn.Parameter]) -> LayerIndex:
        """The part of this index that covers ``params`` (e.g. one optimizer's parameters), layers renumbered.

        Parameters that are not in the index (frozen, or not part of the model) are left out.
        """
        wanted = {id(p) for p in params}
        sub = LayerIndex()
        renumber: dict[int, int] = {}
        for p, name, layer, owner in zip(self.params, self.param_names, self.layer_of_param, self.owner_types):
            if id(p) not in wanted:
                continue
            if layer not in renumber:
                renumber[layer] = len(sub.names)
                sub.names.append(self.names[layer])
            sub.params.append(p)
            sub.param_names.append(name)
            sub.layer_of_param.append(renumber[layer])
            sub.owner_types.append(owner)
        return sub


# ---------------------------------------------------------------------- walking a model under its plain names


class ModuleSite(NamedTuple):
    """A module of a model, under the name it has in the plain model.

    Attributes:
        name: the module's qualified name with wrappers looked through (``""`` for the root).
        module: the module.
        compiled: whether the module runs inside code compiled by ``torch.compile``: it is (inside) a module wrapped by
            ``torch.compile(module)`` or compiled in place with ``module.compile()``, or the root is a LightningModule
            that was compiled and handed to ``Trainer.fit`` (Lightning compiles its ``training_step``).
        wrapper: the innermost ``torch.compile`` wrapper (``OptimizedModule``) around the module, if any: it runs
            eagerly, outside the compiled code.
    """

    name: str
    module: nn.Module
    compiled: bool
    wrapper: nn.Module | None


class ParamSite(NamedTuple):
    """A parameter of a model, with the module it belongs to in the plain model.

    Attributes:
        param: the parameter.
        name: its qualified name, wrappers looked through (``net.0.parametrizations.weight.original0``).
        module_name: the module it belongs to (``""`` for the root). For a parameter behind a parametrized tensor
            (``torch.nn.utils.parametrize``), the parametrized module (``net.0``).
        module: that module.
        attr: its name on that module: its own name, or for the originals of a parametrized tensor the tensor's
            name (``weight``).
        kind: what it is (:data:`PLAIN`, or for parametrizations :data:`WEIGHT_NORM_G`, :data:`WEIGHT_NORM_V`,
            :data:`SPECTRAL_NORM`, :data:`ORTHOGONAL`, :data:`PARAMETRIZED`, :data:`PARAMETRIZATION`). The deprecated
            hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` are recognised too.
    """

    param: nn.Parameter
    name: str
    module_name: str
    module: nn.Module
    attr: str
    kind: str


# Pass-through wrappers: (module that defines the type, type name, attribute holding the wrapped module).
_WRAPPERS = (
    ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),  # torch.compile
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "ActivationWrapper", "_checkpoint_wrapped_module"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel", "module"),  # a plain loop's DDP
    ("torch.nn.parallel.data_parallel", "DataParallel", "module"),
    ("lightning.fabric.wrappers", "_FabricModule", "_forward_module"),  # Fabric's setup()
    ("lightning_fabric.wrappers", "_FabricModule", "_forward_module"),  # the same, from `pip install lightning-fabric`
)


def layer_source(old: Sequence[str], new: Sequence[str]) -> list[int]:
    """For each layer name of ``new``, its position in ``old`` (``-1``: not there): how per-layer state follows the
    layers by name when they change (a param group added, a resume with other layers)."""
    where = {name: i for i, name in enumerate(old)}
    return [where.get(name, -1) for name in new]


def mapped_columns(source: Sequence[int], device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor] | None:
    """The columns of a per-layer state that a :func:`layer_source` carries over, as index tensors on ``device``:
    ``(new, old)``, each shifted by ``offset`` (a leading total column); ``None`` when no layer is carried."""
    pairs = [(i + offset, j + offset) for i, j in enumerate(source) if j >= 0]
    if not pairs:
        return None
    new, old = zip(*pairs)
    return torch.tensor(new, device=device), torch.tensor(old, device=device)


def _wrapped_child(module: nn.Module) -> str | None:
    """The attribute holding the wrapped module, when ``module`` is a pass-through wrapper."""
    for source, type_name, attribute in _WRAPPERS:
        wrapper = loaded_type(source, type_name)
        if wrapper is not None and isinstance(module, wrapper):
            return attribute
    return None


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside pass-through wrappers (``torch.compile``, DDP, Fabric's, activation checkpointing)."""
    while (attribute := _wrapped_child(module)) is not None:
        module = getattr(module, attribute)
    return module


def _is_compile_wrapper(module: nn.Module) -> bool:
    compiled = loaded_type("torch._dynamo.eval_frame", "OptimizedModule")
    return compiled is not None and isinstance(module, compiled)


def _compiled_in_place(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Node(NamedTuple):
    path: str  # qualified name, wrappers looked through, parametrization containers kept
    site: ModuleSite | None  # None for a parametrization container or a parametrization module
    owner_name: str  # the module the node's own parameters belong to
    owner: nn.Module
    plist_of: str | None = None  # for a ParametrizationList, the name of the tensor it parametrizes
    in_parametrization: bool = False  # a parametrization module, or a module inside one


def _walk(root: nn.Module) -> Iterator[tuple[nn.Module, _Node]]:
    """Every module of ``root`` in ``named_modules(remove_duplicate=False)`` order, with its plain-model names."""
    compiled = _is_compile_wrapper(root) or _compiled_in_place(root) or getattr(root, "_compiler_ctx", None) is not None
    wrapper = root if _is_compile_wrapper(root) else None
    stack = [(root, _Node("", ModuleSite("", root, compiled, wrapper), "", root))]
    while stack:
        module, node = stack.pop()
        yield module, node
        through = _wrapped_child(module)
        parametrized = node.site is not None and parametrize.is_parametrized(module)
        children = []
        for child_name, child in module._modules.items():
            if child is None:
                continue
            path = _join(node.path, child_name)
            if node.site is None:
                # Inside `parametrizations`: first the ParametrizationList of each tensor, then the parametrization
                # modules. Their parameters belong to the parametrized module.
                if node.plist_of is None and not node.in_parametrization:
                    child_node = _Node(path, None, node.owner_name, node.owner, plist_of=child_name)
                else:
                    child_node = _Node(path, None, node.owner_name, node.owner, in_parametrization=True)
            elif parametrized and child_name == "parametrizations":
                child_node = _Node(path, None, node.owner_name, node.owner)
            else:
                if child_name == through:  # the wrapped module takes the wrapper's place, and name
                    path, name = node.path, node.site.name
                else:
                    name = _join(node.site.name, child_name)
                is_wrapper = _is_compile_wrapper(child)
                site = ModuleSite(
                    name,
                    child,
                    node.site.compiled or is_wrapper or _compiled_in_place(child),
                    child if is_wrapper else node.site.wrapper,
                )
                child_node = _Node(path, site, name, child)
            children.append((child, child_node))
        stack.extend(reversed(children))


def module_sites(root: nn.Module) -> Iterator[ModuleSite]:
    """The modules of ``root`` in definition order, each once, under their plain-model names.

    A ``torch.compile`` (or activation-checkpoint) wrapper is replaced by the module it wraps, and the modules that
    implement a parametrization (``torch.nn.utils.parametrize``) are left out: they transform weights, they are not
    layers of the network.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> net = nn.Sequential(weight_norm(nn.Linear(2, 2)), nn.Tanh())
        >>> [site.name for site in module_sites(net)]
        ['', '0', '1']
    """
    seen: set[int] = set()
    for module, node in _walk(root):
        if node.site is None or id(module) in seen or _wrapped_child(module) is not None:
            continue
        seen.add(id(module))
        yield node.site


def _legacy_kinds(module: nn.Module) -> dict[str, tuple[str, str]]:
    """``{parameter name: (tensor name, kind)}`` for the deprecated hook-based weight and spectral norms."""
    kinds: dict[str, tuple[str, str]] = {}
    for hook in module._forward_pre_hooks.values():
        name = getattr(hook, "name", None)
        if not isinstance(name, str) or not type(hook).__module__.startswith("torch.nn.utils"):
            continue
        if type(hook).__name__ == "WeightNorm":
            kinds[f"{name}_g"] = (name, WEIGHT_NORM_G)
            kinds[f"{name}_v"] = (name, WEIGHT_NORM_V)
        elif type(hook).__name__ == "SpectralNorm":
            kinds[f"{name}_orig"] = (name, SPECTRAL_NORM)
    return kinds


def _original_kind(plist: nn.Module, local_name: str) -> str:
    parametrizations = list(plist.children())  # a ParametrizationList: the parametrizations, in order
    if len(parametrizations) != 1:
        return PARAMETRIZED
    kind = type(parametrizations[0]).__name__
    if kind == "_WeightNorm" and local_name in ("original0", "original1"):
        # right_inverse returns (g, v): original0 is the magnitude, original1 the direction.
        return WEIGHT_NORM_G if local_name == "original0" else WEIGHT_NORM_V
    if kind == "_SpectralNorm" and local_name == "original":
        return SPECTRAL_NORM
    if kind == "_Orthogonal" and local_name == "original":
        return ORTHOGONAL
    return PARAMETRIZED


def parameter_sites(root: nn.Module) -> Iterator[ParamSite]:
    """The parameters of ``root`` in definition order, each once (tied weights where they first appear), frozen ones
    included, with the module each belongs to in the plain model (see :class:`ParamSite`).

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> net = nn.Sequential(weight_norm(nn.Linear(2, 3)))
        >>> [(s.name, s.module_name, s.attr, s.kind) for s in parameter_sites(net)]  # doctest: +NORMALIZE_WHITESPACE
        [('0.bias', '0', 'bias', ''),
         ('0.parametrizations.weight.original0', '0', 'weight', 'weight_norm.g'),
         ('0.parametrizations.weight.original1', '0', 'weight', 'weight_norm.v')]
    """
    seen: set[int] = set()
    for module, node in _walk(root):
        legacy = _legacy_kinds(module) if node.site is not None and module._forward_pre_hooks else {}
        for local_name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            if node.plist_of is not None:
                attr, kind = node.plist_of, _original_kind(module, local_name)
            elif node.in_parametrization:
                attr, kind = local_name, PARAMETRIZATION
            else:
                attr, kind = legacy.get(local_name, (local_name, PLAIN))
            yield ParamSite(param, _join(node.path, local_name), node.owner_name, node.owner, attr, kind)


# ---------------------------------------------------------------------- layers


def _group_name(site: ParamSite, group_depth: int | None, group_fn: Callable[[str], str] | None) -> str:
    if group_fn is not None:
        group = group_fn(site.name)
        if not isinstance(group, str) or not group:
            raise ValueError(
                f"`group_fn` must return a non-empty str for every parameter name, got {group!r} for {site.name!r}"
            )
        return group
    if not site.module_name:
        return site.attr  # a parameter set directly on the root module is its own layer, called by its attribute
    if group_depth is not None:
        return ".".join(site.module_name.split(".")[:group_depth])
    return site.module_name


def is_empty(param: Tensor) -> bool:
    """Whether ``param`` has no elements (a lazy module's parameter, not materialized yet, has a size to come)."""
    return not isinstance(param, nn.parameter.UninitializedParameter) and param.numel() == 0


def build_layer_index(
    module: nn.Module,
    group_depth: int | None = None,
    group_fn: Callable[[str], str] | None = None,
    include_frozen: bool = False,
) -> LayerIndex:
    """Group the trainable parameters of ``module`` into layers.

    Layer names read as in the plain model (see the module docstring):

    * a module wrapped by ``torch.compile`` keeps its own name (``net.0``, not ``net._orig_mod.0``), and so does a
      compiled model passed in whole;
    * the parameters behind a parametrized tensor (``weight_norm``'s ``original0``/``original1``, ``spectral_norm``'s
      and ``orthogonal``'s ``original``, and the parameters of any parametrization module, e.g. LoRA factors) belong
      to the parametrized module: ``net.0`` is one layer with its bias;
    * a parameter set directly on ``module`` (``self.scale = nn.Parameter(...)``) is a layer named by its attribute,
      ``scale``.

    Args:
        module: the model.
        group_depth: group by the first ``group_depth`` components of the owning module's name
            (``encoder.3.linear`` with ``group_depth=2`` is in layer ``encoder.3``). ``None``: the owning module itself.
        group_fn: a callable mapping a parameter's qualified name (as in :attr:`LayerIndex.param_names`) to its layer
            name; overrides ``group_depth``.
        include_frozen: also list parameters with ``requires_grad=False``. GradGuard uses this so that layers
            unfrozen mid-run (fine-tuning schedules) are already indexed; a frozen layer has no gradient and is
            simply absent from every step's figures.

    Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``, and so are parameters with no
    elements (a soft prompt of 0 tokens); a parameter shared by several modules (tied weights) is counted once, in the
    layer where it first appears.

    Raises:
        ValueError: on a ``module`` that is no ``nn.Module``, an invalid ``group_depth`` or ``group_fn``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
        >>> build_layer_index(model, group_depth=1).names
        ['0', '1']
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module (the model), got {module!r}")
    optional_int("group_depth", group_depth, low=1)
    if group_fn is not None and not callable(group_fn):
        raise ValueError(f"`group_fn` must be a callable or None, got {group_fn!r}")
    index = LayerIndex()
    layer_ids: dict[str, int] = {}
    for site in parameter_sites(module):
        if not site.param.requires_grad and not include_frozen:
            continue
        if is_empty(site.param):
            continue  # nothing to measure: its norm, always 0, read as a vanishing layer
        layer = _group_name(site, group_depth, group_fn)
        if layer not in layer_ids:
            layer_ids[layer] = len(index.names)
            index.names.append(layer)
        index.params.append(site.param)
        index.param_names.append(site.name)
        index.layer_of_param.append(layer_ids[layer])
        index.owner_types.append(type(site.module))
        note_output_columns(site.module, site.attr, site.param)
    return index


# The weights of transposed convolutions with one group: ``[in, out, k...]``, one output unit per column. Neither
# their type nor their shape tells them from a grouped one's ``[in, out/groups, k...]``, whose output units are
# neither rows nor columns; AGC, given owner types only, looks them up here.
_OUTPUT_COLUMNS: dict[int, weakref.ref[Tensor]] = {}


def note_output_columns(module: nn.Module, attr: str, param: Tensor) -> bool:
    """Whether ``param`` (``module``'s ``attr``) is a transposed convolution's own weight with one group, whose output
    units run along its second dimension; such a weight is noted for :func:`has_output_columns`, and one that no longer
    is (it became a parametrization's original) is forgotten."""
    key = id(param)
    if not (
        attr == "weight"
        and isinstance(module, _ConvTransposeNd)
        and module.groups == 1
        and module._parameters.get("weight") is param  # not a parametrization's original
    ):
        ref = _OUTPUT_COLUMNS.get(key)
        if ref is not None and ref() is param:
            del _OUTPUT_COLUMNS[key]
        return False
    if key not in _OUTPUT_COLUMNS:

        def forget(_: weakref.ref[Tensor]) -> None:
            _OUTPUT_COLUMNS.pop(key, None)

        _OUTPUT_COLUMNS[key] = weakref.ref(param, forget)
    return True


def has_output_columns(param: Tensor) -> bool:
    """Whether ``param`` was noted by :func:`note_output_columns` (a module's layer index or ``clip_`` saw it)."""
    ref = _OUTPUT_COLUMNS.get(id(param))
    return ref is not None and ref() is param
