"""Reading small device tensors on the host without stalling the step that produced them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class HostFlags:
    """A small device vector copied to host memory without waiting: read once the copy has landed.

    On CUDA the copy goes to pinned memory behind an event; ``ready()`` polls the event, so a decision that needs
    the flags on the host is taken at most a step late instead of stalling the step. On the CPU the copy is
    immediate.
    """

    host: Tensor
    values: Any  # numpy view of ``host``: reading it is not a tensor operation
    event: Any = None
    step: int = -1
    filled: bool = False
    _heads: dict[int, Tensor] = field(default_factory=dict)  # views of ``host``'s first entries, by length

    @classmethod
    def create(cls, size: int, device: torch.device) -> HostFlags:
        if device.type == "cuda":
            host = torch.zeros(size, dtype=torch.float32, pin_memory=True)
            return cls(host=host, values=host.numpy(), event=torch.cuda.Event())
        values = np.zeros(size, dtype=np.float32)
        return cls(host=torch.from_numpy(values), values=values)

    def fill(self, flags: Tensor, step: int) -> None:
        """Copy ``flags`` into the first ``flags.numel()`` entries; the entries after them read NaN."""
        n = flags.numel()
        target = self.host
        if n < self.values.size:
            self.values[n:] = np.nan
            # A view made once per length: slicing on every fill would be one more op on every step.
            head = self._heads.get(n)
            target = head if head is not None else self._heads.setdefault(n, self.host[:n])
        target.copy_(flags, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.step = step
        self.filled = True

    def ready(self) -> bool:
        return self.filled and (self.event is None or self.event.query())


def host_rate(rate: Any) -> float | None:
    """A learning rate as a host float without waiting: a number (not a bool), or a one-element CPU tensor; ``None``
    for anything else (a rate on a device would wait for it, an optimizer that sizes its own steps has none)."""
    if isinstance(rate, Tensor):
        return float(rate) if rate.device.type == "cpu" and rate.numel() == 1 else None
    real = isinstance(rate, (int, float, np.floating, np.integer)) and not isinstance(rate, bool)
    return float(rate) if real else None
