"""Which parameters form a "layer", and what the layer is called in the logs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

ROOT_LAYER = "(root)"


@dataclass
class LayerIndex:
    """The trainable parameters of a model, grouped into named layers.

    A *layer* is the module that directly owns parameters (``encoder.3.linear`` owns its ``weight`` and ``bias``),
    unless a coarser grouping is asked for. Layers are listed in definition order, which for most models is the
    forward order, so "the earliest layer" in a report is the one closest to the input.

    Attributes:
        names: layer names, in definition order.
        params: the unique trainable parameters, in definition order.
        param_names: the qualified name of each parameter (the first one, for tied weights).
        layer_of_param: for each parameter, the index of its layer in ``names``.
        owner_types: for each parameter, the type of the module that owns it.

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


def _group_name(
    module_name: str, param_name: str, group_depth: int | None, group_fn: Callable[[str], str] | None
) -> str:
    if group_fn is not None:
        group = group_fn(param_name)
        if not isinstance(group, str) or not group:
            raise ValueError(
                f"`group_fn` must return a non-empty str for every parameter name, got {group!r} for {param_name!r}"
            )
        return group
    if not module_name:
        return ROOT_LAYER
    if group_depth is not None:
        return ".".join(module_name.split(".")[:group_depth])
    return module_name


def build_layer_index(
    module: nn.Module,
    group_depth: int | None = None,
    group_fn: Callable[[str], str] | None = None,
    include_frozen: bool = False,
) -> LayerIndex:
    """Group the trainable parameters of ``module`` into layers.

    Args:
        module: the model.
        group_depth: group by the first ``group_depth`` components of the owning module's name
            (``encoder.3.linear`` with ``group_depth=2`` is in layer ``encoder.3``). ``None``: the owning module itself.
        group_fn: a callable mapping a parameter's qualified name to its layer name; overrides ``group_depth``.
        include_frozen: also list parameters with ``requires_grad=False``. GradGuard uses this so that layers
            unfrozen mid-run (fine-tuning schedules) are already indexed; a frozen layer has no gradient and is
            simply absent from every step's figures.

    Frozen parameters (``requires_grad=False``) are left out unless ``include_frozen``; a parameter shared by several
    modules (tied weights) is counted once, in the layer where it first appears.

    Raises:
        ValueError: on an invalid ``group_depth``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
        >>> build_layer_index(model, group_depth=1).names
        ['0', '1']
    """
    if group_depth is not None and (not isinstance(group_depth, int) or group_depth < 1):
        raise ValueError(f"`group_depth` must be a positive int or None, got {group_depth!r}")
    index = LayerIndex()
    seen: set[int] = set()
    layer_ids: dict[str, int] = {}
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for local_name, p in sub.named_parameters(recurse=False):
            if p is None or (not p.requires_grad and not include_frozen) or id(p) in seen:
                continue
            seen.add(id(p))
            qualified = f"{module_name}.{local_name}" if module_name else local_name
            layer = _group_name(module_name, qualified, group_depth, group_fn)
            if layer not in layer_ids:
                layer_ids[layer] = len(index.names)
                index.names.append(layer)
            index.params.append(p)
            index.param_names.append(qualified)
            index.layer_of_param.append(layer_ids[layer])
            index.owner_types.append(type(sub))
    return index
