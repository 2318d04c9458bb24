"""The kinds of event GradGuard counts, in one place for the engine (which counts them) and the board (which charts
them); free of torch, so that reading event files does not import it."""

from __future__ import annotations

#: Event counters, written as ``gradguard/events/<kind>`` and returned by ``summary()``.
EVENT_KINDS: tuple[str, ...] = (
    "exploding",
    "vanishing",
    "nonfinite",
    "skipped",
    "overflow",
    "lr_reduced",
    "clipped",
    "rolled_back",
    "diverging",
)
