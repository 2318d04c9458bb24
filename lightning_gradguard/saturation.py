"""Fraction of saturated activation outputs, measured with forward hooks only on the steps that ask for it.

A saturated unit passes (almost) no gradient: a tanh or sigmoid near its asymptotes, a ReLU at zero, a hardtanh
at its clamps. When gradients vanish, the most saturated activations between the layer and the loss are the
first suspects; :class:`SaturationMonitor` measures them without a host-device synchronization, so it can run on
any training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from lightning_gradguard._validation import check_int, check_number

__all__ = ["SaturationMonitor"]

_Rule = Callable[[Tensor], Tensor]


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

    Hooks exist only between :meth:`arm` and :meth:`disarm`, so other steps pay nothing. Inside the hooks
    everything stays on the device.

    Args:
        module: the model to watch; its activation modules are found once, here.
        tanh_threshold: ``|y|`` above which a tanh output is saturated, in ``(0, 1)``.
        sigmoid_low: sigmoid output below which it is saturated, in ``(0, sigmoid_high)``.
        sigmoid_high: sigmoid output above which it is saturated, in ``(sigmoid_low, 1)``.

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
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be an nn.Module, got {module!r}")
        self.tanh_threshold = check_number("tanh_threshold", tanh_threshold, low=0.0, high=1.0)
        self.sigmoid_low = check_number("sigmoid_low", sigmoid_low, low=0.0, high=1.0)
        self.sigmoid_high = check_number("sigmoid_high", sigmoid_high, low=self.sigmoid_low, high=1.0)

        # Position of every module (not only activations) in definition order, for most_saturated().
        self._order: dict[str, int] = {}
        self._watched: list[tuple[str, nn.Module, _Rule]] = []
        for index, (name, sub) in enumerate(module.named_modules()):
            name = name or "(root)"
            self._order[name] = index
            rule = self._rule_for(sub)
            if rule is not None:
                self._watched.append((name, sub, rule))
        self.names: list[str] = [name for name, _, _ in self._watched]
        self._handles: list[RemovableHandle] = []
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

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
        if isinstance(module, nn.ReLU):
            return relu_rule
        if isinstance(module, nn.RNN):
            return tanh_rule if module.nonlinearity == "tanh" else relu_rule
        return None

    # ------------------------------------------------------------------ measuring

    @property
    def armed(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def arm(self) -> None:
        """Register the forward hooks and start a fresh measurement (a no-op when already armed)."""
        if self._handles:
            return
        self._sums, self._counts = {}, {}
        for name, module, rule in self._watched:
            self._handles.append(module.register_forward_hook(self._make_hook(name, rule)))

    def _make_hook(self, name: str, rule: _Rule) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            y = output[0] if isinstance(output, tuple) and not isinstance(output, PackedSequence) else output
            if isinstance(y, PackedSequence):
                y = y.data
            if not isinstance(y, Tensor) or y.numel() == 0:
                return
            with torch.no_grad():
                fraction = torch.count_nonzero(rule(y.detach())).to(torch.float32) / y.numel()
                previous = self._sums.get(name)
                self._sums[name] = fraction if previous is None else previous + fraction
            self._counts[name] = self._counts.get(name, 0) + 1

        return hook

    def disarm(self) -> dict[str, Tensor]:
        """Remove the hooks and return the saturated fraction per activation module.

        Returns:
            ``{name: 0-d fp32 tensor}`` on the device of the module's outputs, averaged over the forward calls
            seen while armed, in definition order. Modules that did not run are left out; nothing is returned
            when the monitor was not armed.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        sums, counts = self._sums, self._counts
        self._sums, self._counts = {}, {}
        return {name: sums[name] / counts[name] for name in self.names if name in sums}

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

    @staticmethod
    def advice() -> str:
        """One sentence of remedies for saturated activations, for warnings."""
        return (
            "Saturated activations pass almost no gradient: prefer non-saturating activations (ReLU, LeakyReLU, "
            "GELU), normalize their inputs (BatchNorm/LayerNorm), add residual connections, and use orthogonal "
            "initialization for recurrent weights."
        )
