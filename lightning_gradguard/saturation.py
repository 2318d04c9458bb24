"""Fraction of saturated activation outputs, measured with forward hooks only on the steps that ask for it.

A saturated unit passes (almost) no gradient: a tanh or sigmoid near its asymptotes, a ReLU at zero, a hardtanh
at its clamps. When gradients vanish, the most saturated activations between the layer and the loss are the
first suspects; :class:`SaturationMonitor` measures them without a host-device synchronization, so it can run on
any training step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from lightning_gradguard._compat import in_function_transform
from lightning_gradguard._validation import check_bool, check_int, check_number
from lightning_gradguard.layers import ROOT_LAYER, module_sites

__all__ = ["SaturationMonitor"]

_Rule = Callable[[Tensor], Tensor]


class _Probe:
    """The forward hook of one activation module: while active, adds ``[saturated fraction, 1]`` to :attr:`total`.

    One object per module and monitor (per module, under ``torch.compile``), registered again and again as the same
    object, so that a compiled graph that traced it stays valid: its side effect is replayed on this object, and
    its ``active`` flag is a guard of the graph.
    """

    def __init__(self, rule: _Rule | None, key: Any = None) -> None:
        self.rule = rule
        self.key = key  # what the rule depends on, to reuse an equal rule (and the graphs that traced it)
        self.active = False
        self.total: Tensor | None = None  # [sum of fractions, number of calls], fp32 on the outputs' device

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        # A forward pass without gradients (validation between two micro-batches of a logging step, a teacher's
        # forward) neither trains nor passes a gradient back: its activations are not this step's.
        if not self.active or self.rule is None or not torch.is_grad_enabled() or in_function_transform():
            return  # (inside `vmap(grad(...))` the outputs are per-sample copies that must not leave the transform)
        y = output[0] if isinstance(output, tuple) and not isinstance(output, PackedSequence) else output
        if isinstance(y, PackedSequence):
            y = y.data
        if not isinstance(y, Tensor) or y.numel() == 0:
            return
        with torch.no_grad():
            fraction = torch.count_nonzero(self.rule(y.detach())).to(torch.float32) / y.numel()
            # The call count is a tensor too: a Python counter would be a guard of a compiled graph, one more
            # recompilation per micro-batch of gradient accumulation.
            stat = torch.stack((fraction, torch.ones_like(fraction)))
            self.total = stat if self.total is None else self.total + stat

    # A copy of the model (deepcopy, pickling) gets an inert hook: no rule, no measurement, nothing to pickle.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None)  # type: ignore[misc]


class _Spy:
    """Eager forward hook on a ``torch.compile`` wrapper: notes that the compiled module ran."""

    def __init__(self) -> None:
        self.ran = False

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        # As the probes: a pass without gradients (a frozen compiled teacher) is not one the probes should have seen.
        if torch.is_grad_enabled():
            self.ran = True


# The probes of activation modules that run inside compiled code: registered once and never removed, so that the
# graphs compiled with them stay valid. torch.compile does not guard on hooks (`skip_nnmodule_hook_guards`): a graph
# compiled while a module had no hook ignores a hook added later, and one compiled with a hook may run it after it was
# removed. Keyed weakly: the entry goes with the module.
_PERSISTENT: weakref.WeakKeyDictionary[nn.Module, _Probe] = weakref.WeakKeyDictionary()


class SaturationMonitor:
    """Measure the fraction of saturated outputs of each activation module of a model.

    What counts as saturated, per module type (an output element ``y``):

    * ``nn.Tanh``: ``|y| > tanh_threshold``;
    * ``nn.Sigmoid``: ``y < sigmoid_low`` or ``y > sigmoid_high``;
    * ``nn.Hardtanh`` and its subclass ``nn.ReLU6``: ``y`` at a clamp (``<= min_val`` or ``>= max_val``);
    * ``nn.Hardsigmoid``: ``y <= 0`` or ``y >= 1``;
    * ``nn.ReLU``: ``y == 0`` (a dead unit for this input);
    * ``nn.RNN``: the output sequence, with the ``tanh`` or ``relu`` rule of its ``nonlinearity``.

    Activations whose gradient never vanishes (``LeakyReLU``, ``PReLU``, ``ELU``, ``GELU``, ``SiLU``) are not
    monitored, nor are ``nn.LSTM``/``nn.GRU``, whose gate activations are internal to the fused kernel and not
    visible in the output, nor activations called as functions (``F.relu``) rather than as modules.

    Hooks exist only between :meth:`arm` and :meth:`disarm` (in compiled code they are only active then), so other
    steps pay nothing. Inside the hooks everything stays on the device.

    Modules are named as in the plain model (see :func:`~lightning_gradguard.layers.module_sites`): ``net.1``, not
    ``net._orig_mod.1``; the modules inside a parametrization are not watched.

    **torch.compile.** An activation module that runs inside compiled code (a submodule wrapped by
    ``torch.compile``, a module compiled in place with ``module.compile()``, every module of a LightningModule that
    was compiled and passed to ``Trainer.fit``, or any module when ``compiled=True``) is measured too, inside the
    compiled graph: its hook is registered once, here, and stays registered (inactive between measurements, where
    the compiled graph does not contain it), because ``torch.compile`` ignores hooks added after it compiled a graph
    and may keep running hooks that were removed. This costs one more compiled graph (two with gradient
    accumulation) and leaves an inactive hook on those modules for their lifetime; copies of the model get an inert
    one. A graph compiled *before* the monitor existed (the compiled module ran before training started) does not
    contain the hooks: when a ``torch.compile``-wrapped module runs while armed and none of its activations report,
    the monitor warns once that their saturation cannot be measured and how to fix it (create the monitor first,
    or call ``torch._dynamo.reset()``). One monitor at a time per compiled module: a new one takes the hooks over.

    Args:
        module: the model to watch; its activation modules are found once, here.
        tanh_threshold: ``|y|`` above which a tanh output is saturated, in ``(0, 1)``.
        sigmoid_low: sigmoid output below which it is saturated, in ``(0, sigmoid_high)``.
        sigmoid_high: sigmoid output above which it is saturated, in ``(sigmoid_low, 1)``.
        compiled: whether the activation modules run inside code compiled by ``torch.compile``. ``None`` detects
            it per module (see above); pass ``True`` when your own compiled function calls the modules.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
        >>> monitor = SaturationMonitor(net)
        >>> monitor.names
        ['1', '3']
        >>> monitor.arm()
        >>> _ = net(torch.randn(16, 4))
        >>> fractions = monitor.disarm()  # {name: 0-d fp32 tensor on the outputs' device}
        >>> sorted(fractions)
        ['1', '3']
        >>> 0.0 <= float(fractions["1"]) <= 1.0
        True
    """

    def __init__(
        self,
        module: nn.Module,
        tanh_threshold: float = 0.99,
        sigmoid_low: float = 0.01,
        sigmoid_high: float = 0.99,
        compiled: bool | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be an nn.Module, got {module!r}")
        self.tanh_threshold = check_number("tanh_threshold", tanh_threshold, low=0.0, high=1.0)
        self.sigmoid_low = check_number("sigmoid_low", sigmoid_low, low=0.0, high=1.0)
        self.sigmoid_high = check_number("sigmoid_high", sigmoid_high, low=self.sigmoid_low, high=1.0)
        self.compiled = None if compiled is None else check_bool("compiled", compiled)

        # Position of every module (not only activations) in definition order, for most_saturated().
        self._order: dict[str, int] = {}
        # (name, module, probe, persistent): persistent probes stay registered (compiled code), the others are
        # registered by arm() and removed by disarm().
        self._watched: list[tuple[str, nn.Module, _Probe, bool]] = []
        # torch.compile wrappers around watched modules: {id: (wrapper, its name, names of the modules inside)}.
        self._wrappers: dict[int, tuple[nn.Module, str, list[str]]] = {}
        names_of: dict[int, str] = {}
        for index, site in enumerate(module_sites(module)):
            name = site.name or ROOT_LAYER
            self._order[name] = index
            names_of.setdefault(id(site.module), name)
            rule = self._rule_for(site.module)
            if rule is None:
                continue
            persistent = site.compiled if self.compiled is None else self.compiled
            probe = self._persistent_probe(site.module, rule) if persistent else _Probe(rule)
            self._watched.append((name, site.module, probe, persistent))
            if persistent and site.wrapper is not None:
                inner = names_of.get(id(getattr(site.wrapper, "_orig_mod", None)), name)
                self._wrappers.setdefault(id(site.wrapper), (site.wrapper, inner, []))[2].append(name)
        self.names: list[str] = [name for name, _, _, _ in self._watched]
        self._armed = False
        self._handles: list[RemovableHandle] = []
        self._spies: dict[int, _Spy] = {}
        self._warned: set[int] = set()

    def _rule_key(self) -> tuple[float, float, float]:
        return (self.tanh_threshold, self.sigmoid_low, self.sigmoid_high)

    def _persistent_probe(self, module: nn.Module, rule: _Rule) -> _Probe:
        probe = _PERSISTENT.get(module)
        if probe is None:
            probe = _PERSISTENT[module] = _Probe(rule, self._rule_key())
        elif probe.key != self._rule_key():
            # A new rule changes the compiled graph (one recompilation); an equal one keeps the old graphs valid.
            probe.rule, probe.key = rule, self._rule_key()
        if not any(hook is probe for hook in module._forward_hooks.values()):
            module.register_forward_hook(probe)
        probe.active, probe.total = False, None  # taken over from an earlier monitor, if any
        return probe

    def _rule_for(self, module: nn.Module) -> _Rule | None:
        tanh_threshold, low, high = self.tanh_threshold, self.sigmoid_low, self.sigmoid_high

        def tanh_rule(y: Tensor) -> Tensor:
            return y.abs() > tanh_threshold

        def relu_rule(y: Tensor) -> Tensor:
            return y == 0

        if isinstance(module, nn.Tanh):
            return tanh_rule
        if isinstance(module, nn.Sigmoid):
            return lambda y: (y < low) | (y > high)
        if isinstance(module, nn.Hardtanh):
            min_val, max_val = module.min_val, module.max_val
            return lambda y: (y <= min_val) | (y >= max_val)
        if isinstance(module, nn.Hardsigmoid):
            return lambda y: (y <= 0) | (y >= 1)
        if _dead_at_zero(module):
            return relu_rule
        if isinstance(module, nn.RNN):
            return tanh_rule
        return None

    # ------------------------------------------------------------------ measuring

    @property
    def armed(self) -> bool:
        """Whether the hooks are measuring."""
        return self._armed

    def arm(self) -> None:
        """Register the forward hooks (activate them, in compiled code) and start a fresh measurement (a no-op when
        already armed)."""
        if self._armed:
            return
        self._armed = True
        for _, module, probe, persistent in self._watched:
            probe.total = None
            probe.active = True
            if not persistent:
                self._handles.append(module.register_forward_hook(probe))
        for key, (wrapper, _, _) in self._wrappers.items():
            if key not in self._warned:
                spy = self._spies[key] = _Spy()
                self._handles.append(wrapper.register_forward_hook(spy))

    def disarm(self) -> dict[str, Tensor]:
        """Remove the hooks (deactivate them, in compiled code) and return the saturated fraction per activation module.

        Returns:
            ``{name: 0-d fp32 tensor}`` on the device of the module's outputs, averaged over the forward calls
            seen while armed, in definition order. Modules that did not run are left out; nothing is returned
            when the monitor was not armed.
        """
        if not self._armed:
            return {}
        self._armed = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        fractions: dict[str, Tensor] = {}
        for name, _, probe, _ in self._watched:
            probe.active = False
            if probe.total is not None:
                fractions[name] = probe.total[0] / probe.total[1]
                probe.total = None
        spies, self._spies = self._spies, {}
        for key, spy in spies.items():
            wrapper, wrapper_name, inside = self._wrappers[key]
            if spy.ran and not any(name in fractions for name in inside):
                self._warned.add(key)
                warnings.warn(
                    f"SaturationMonitor: `{wrapper_name}` ran under torch.compile without the forward hooks of its"
                    f" activation modules ({', '.join(inside)}), so their saturation cannot be measured: its graph"
                    " was compiled before the hooks were registered, and torch.compile does not notice hooks added"
                    " later (`torch._dynamo.config.skip_nnmodule_hook_guards`). Create the monitor (add GradGuard to"
                    " the Trainer) before the compiled module first runs, or call `torch._dynamo.reset()` before"
                    " training.",
                    UserWarning,
                    stacklevel=2,
                )
        return fractions

    # ------------------------------------------------------------------ reporting (host side)

    def most_saturated(
        self, fractions: dict[str, float], upstream_of: str | None, k: int = 3
    ) -> list[tuple[str, float]]:
        """The ``k`` most saturated activations upstream of a layer in the backward pass.

        The gradient reaching layer ``upstream_of`` has passed through the activations between that layer and
        the loss; with definition order standing in for execution order, those are the activations defined at or
        after the layer (the layer itself counts when it is a monitored ``nn.RNN``).

        Args:
            fractions: saturated fractions by activation name, as host floats (e.g. from :meth:`disarm`).
            upstream_of: a module name (e.g. a layer reported as vanishing). ``None``, ``"(root)"`` and a name
                that is not a module of the watched model (a custom layer group) consider every activation.
            k: how many to return at most, ``>= 1``.

        Returns:
            ``(name, fraction)`` pairs, most saturated first (ties in definition order).

        Raises:
            ValueError: ``k`` is not an integer >= 1.
        """
        check_int("k", k, low=1)
        # Warnings call this: an unknown name widens the search instead of failing the training run.
        start = self._order.get(upstream_of, 0) if upstream_of is not None else 0
        candidates = [
            (name, float(fractions[name])) for name in self.names if name in fractions and self._order[name] >= start
        ]
        candidates.sort(key=lambda item: -item[1])  # stable: ties keep definition order
        return candidates[:k]

    def counts_dead_units(self, name: str) -> bool:
        """Whether the watched module ``name`` is a ReLU (or a ReLU RNN): its saturated outputs are dead units."""
        return any(watched == name and _dead_at_zero(module) for watched, module, _, _ in self._watched)

    @staticmethod
    def advice(dead_units: bool = False) -> str:
        """One sentence of remedies for saturated activations, for warnings.

        Args:
            dead_units: the saturated activations are ReLUs, whose saturation is units stuck at 0: a remedy for those
                (recommending ReLU to them would be none).
        """
        if dead_units:
            return (
                "A ReLU unit that outputs 0 for every input is dead and passes no gradient: lower the learning rate (a"
                " too-high one pushes units below zero for good), use LeakyReLU or GELU, or normalize the layer's"
                " inputs (BatchNorm/LayerNorm)."
            )
        return (
            "Saturated activations pass almost no gradient: prefer non-saturating activations (ReLU, LeakyReLU, "
            "GELU), normalize their inputs (BatchNorm/LayerNorm), add residual connections, and use orthogonal "
            "initialization for recurrent weights."
        )


def _dead_at_zero(module: nn.Module) -> bool:
    """A ReLU, or an RNN with ``nonlinearity="relu"``: its saturated outputs are 0, units that pass no gradient."""
    return isinstance(module, nn.ReLU) or (isinstance(module, nn.RNN) and module.nonlinearity == "relu")
