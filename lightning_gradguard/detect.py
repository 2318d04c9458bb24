"""Exploding and vanishing gradient detectors. State lives on the device; decisions are tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_gradguard._validation import (
    FLOAT32_MAX,
    check_bool,
    check_int,
    check_number,
    check_state,
    optional_int,
    optional_number,
)
from lightning_gradguard.layers import mapped_columns
from lightning_gradguard.rollback import CALM_STEPS

__all__ = ["DivergenceDetector", "ExplodingDetector", "ExplodingResult", "VanishingDetector", "VanishingResult"]

# Norms are compared in log space: gradient norms span orders of magnitude and a spike is a *ratio*.
_TINY = 1e-30
# A calm start, as the rollback's (norms within 4x of each other): the log-norms' spread (as a variance) at most that
# of half of log(4).
_CALM_VAR = (math.log(4.0) / 2.0) ** 2
# During the warm-up (after a calm start) a stretch holds the steps within this of its first (in log-norm: 4x), the
# calm start's own spread: bad batches of one loss scale spread by the batches' own variation.
_WARMUP_SPREAD = math.log(4.0)
# A drop remembered (see ExplodingDetector, "a return"): the norm this far below the band's centre (in log-norm: 4x)
# for this many steps in a row, from a level the mean held for this many observations (since it last moved to a new
# level), forgotten by this much per observation (in log-norm: halved every 200).
_DROP = math.log(4.0)
_DROP_STEPS = 3
_ESTABLISHED = 10
_FORGET = math.log(2.0) / 200


class ExplodingResult(NamedTuple):
    """What :meth:`ExplodingDetector.update` found this step (device tensors).

    Attributes:
        total: 0-d bool, the total norm spiked or crossed the ceiling (on a step that does not hold the level of a
            stretch of flagged steps before it: see :class:`ExplodingDetector`).
        layers: ``[L]`` bool, the layers whose own norm spiked or crossed the layer ceiling (the same rule).
        any: 0-d bool, ``total`` or any layer: one exploding *event* for the step.
        cap: 0-d, the norm a flagged step can be clipped to, ``inf`` on a step with no flag. Where the total norm is
            flagged (in a stretch too), ``cap_ratio`` times its (geometric) average norm, or the ceiling ``max_norm``
            where that is lower; where only layers are flagged, the total norm scaled by what brings each flagged
            layer to ``cap_ratio`` times its own average (or to ``max_layer_norm``), but not below the total's own
            cap, and ``inf`` where that leaves the step as it is (the total at or below it).
    """

    total: Tensor
    layers: Tensor
    any: Tensor
    cap: Tensor


class VanishingResult(NamedTuple):
    """What :meth:`VanishingDetector.update` found this step (device tensors).

    Attributes:
        layers: ``[L]`` bool, layers whose norm has stayed below the floor for at least ``patience`` steps.
        new: ``[L]`` bool, layers that reached ``patience`` on this very step (one event each).
    """

    layers: Tensor
    new: Tensor


def _as_float(t: Tensor) -> Tensor:
    # ``detach().float()`` without the two dispatcher calls when they would change nothing.
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == torch.float32 else t.float()


def _per_entry(
    size: int,
    device: torch.device,
    total: float | None,
    layer: float | None,
    off: float,
    transform: Callable[[float], float] = float,
) -> Tensor | None:
    """``[size]`` tensor: ``total`` at index 0 and ``layer`` after it (``off`` where ``None``); ``None`` if both are."""
    if total is None and layer is None:
        return None
    values = torch.full((size,), off, device=device)
    if total is not None:
        values[0] = transform(total)
    if layer is not None:
        values[1:] = transform(layer)
    return values


def _above_min_ratio(name: str, value: float | None, min_ratio: float, *, default: float) -> float | None:
    """A warm-up ratio limit, checked above ``min_ratio``; a default left as it is gets a hint in the message."""
    try:
        return optional_number(name, value, low=min_ratio, low_name="min_ratio")
    except ValueError as err:
        if value != default:
            raise
        # The user raised `min_ratio` alone: the error is about an argument they never passed.
        hint = f"That is `{name}`'s default: with this `min_ratio`, pass `{name}` above it, or None."
        raise ValueError(f"{err} {hint}") from None


class ExplodingDetector:
    """Flags steps whose gradient norm jumps far above its recent history, per layer as well as in total.

    The log of each norm is tracked with an exponential moving average (mean and variance). After ``warmup_steps``
    valid steps, a step is *exploding* when its log-norm lies more than ``z_thresh`` standard deviations above the
    mean **and** the norm is at least ``min_ratio`` times the mean norm (so a very steady history does not turn
    small wiggles into events), or when it exceeds the absolute ceiling ``max_norm``. A run that diverges from its
    first steps gives no calm history to compare with, so from the second step on a total norm more than
    ``warmup_ratio`` times the (geometric) mean so far is exploding too during the warm-up, more than ``calm_ratio``
    times it once the run has started calmly (below), and, when set, more than ``max_ratio`` times it at any time.
    Observations enter the average winsorized on both sides (to ``z_thresh`` standard deviations around it after the
    warm-up, to the ratio boundaries before), so one outlier, a spike or a nearly-zero gradient, moves it by a bounded
    amount: one explosion does not hide the next, and a steady climb is absorbed only slowly. A step flagged in the
    warm-up after a calm start does not enter at all: at the 100x boundary one bad batch after five calm steps doubled
    the plain mean of the warm-up, and a second one went through unflagged. Non-finite and AMP-overflow steps are not
    fed in at all, and neither is an exactly-zero norm (a fully masked batch, LoRA's ``A`` while ``B`` is still zero):
    its log would pull the average towards log(0) and turn every ordinary norm after it into a spike.

    After the warm-up, steps beyond the band at one level are one *stretch*: each still ``min_ratio`` beyond the
    average on the same side as the first, and within ``min_ratio`` of the first's norm. A stretch is one event: a
    jump to a new level that then holds (a task made harder for good, a loss term switched on, a run of bad batches
    of one size) is reported once, while a blow-up grows from step to step, starts a new stretch at each jump past
    ``min_ratio`` and counts each time. Every flagged step is still given the ``cap``. Counting each step of the new
    level made the LR guard cut for a jump the data made: an Adam regression made 10x to 100x harder for good mid-run
    ended up to +110% above unguarded (now at most +2.4%: the first steps of the new level, clipped until ZClip's
    ``level_steps`` takes it in, in a run that ends 60 steps later), and two or four 1e4x bad batches in a row at
    step 40 of the healthy zoo's runs cost up to +34.5% and +55.7% (``benchmarks/bad_batches.py``; now at most
    +0.7%). During the warm-up every flagged step counts (a run that diverges from its first steps must meet the
    rollback's "two in a row" at once), unless the run started calmly: once three observations lie within about 4x
    of each other (a log-norm spread of at most log(4) / 2 before the step, as the rollback's calm start), a stretch
    may begin in the warm-up too, and it holds the steps within 4x of its first (the calm start's own spread; after
    the warm-up, ``min_ratio``): bad batches of one loss scale spread by the batches' own variation. A calm start also
    gives the warm-up a history to compare with, so there the total is held to ``calm_ratio`` (10x) instead of
    ``warmup_ratio`` (100x), and a flagged step begins a stretch even where the young band is wider than it: bad
    batches 20x and 50x the norms at step 5 of the healthy zoo's LoRA run went through whole under the 100x test
    (+118% and +217% held-out; now +3.3%, one event). A too-high rate has no calm start (its norms grow 10-100x per
    step from the first); two bad batches in a row at step 10 of the
    healthy zoo's runs do, and were cut for on 5 of 6 (up to +42.9% held-out loss; now one event, no cut, at most
    +26.2%); two at step 5 of its LoRA run lay more than 2x apart and still counted twice (+32.8%; within 4x: one
    event, +0.6%). Every step over an absolute ceiling counts.

    A level that holds is taken in at once (``level_steps``): a stretch's first step enters winsorized, as any
    outlier, its later steps leave the variance alone, and once it is ``level_steps`` long the mean moves to its
    average. Before, each step of a new level entered winsorized and widened the band until the level fit inside it:
    after a 30x jump the log-norm's standard deviation went from 0.1 to 1.6 within ten steps, and a 100x spike on the
    new level 34 steps later (a bad batch) went unflagged. A shorter stretch (bad batches in a row) leaves the level
    where it was, a blow-up never becomes the level (each jump starts a new stretch), and a level that drops and
    holds is taken in the same way.

    Norms that fall steadily (training settling fast, a loss term annealed away) leave the mean behind them by about
    ``alpha / (1 - alpha)`` steps of their slope, and that lag used to enter the variance: log-norms falling 0.04 per
    step widened the band to 25x, and a 30x spike went unflagged (0.08 per step: a 1000x one). So each entry also
    keeps the average deviation of its log-norm from the mean (an EMA at the mean's rate): after the warm-up, where
    that average is negative, the band is centred on the mean plus it (where the norms are) and the variance is
    measured around that centre; a flagged step's ``cap`` is taken there too. Only downwards: a falling norm is never
    an explosion, while a rising one (a GAN's generator, growing 80x in 20 steps) keeps its lag inside the band as
    before. When the fall stops, the average deviation decays a little slower than the mean's lag, and the centre
    dips below the norms by at most about 0.4 of that lag (tested: no flag for falls of up to 0.08 per step that
    level off).

    A norm back at a level it dropped from is a return, not a spike: two tasks trained in turn, or a loss term
    switched off and on again, move the gradient between two levels, and after a stretch on the quieter one the
    band has narrowed around it. So each entry remembers the level it last dropped from: when the norm falls 4x
    below the band's centre for 3 steps in a row, from a level held for at least 10 observations (after the warm-up,
    and since the mean last moved to a new level), that level (where the norms were, past the mean's lag) is kept,
    and a later norm from ``1 / min_ratio`` of it (half, by default) to 4x above it is not flagged; a spike that stays
    further below it (a third of it) still is. The memory fades (halved every 200 observations), and it excuses
    nothing once the mean is back within 4x of it. A level that a run of bad batches became (``level_steps``) is kept
    only after 10 more observations on it (14 bad batches of one size in a row, at the default ``level_steps=5``),
    and a level held only during the warm-up (a too-high rate's first steps) never is. Before, an Adam regression
    whose loss weight alternated between 1 and 0.01 every 50 or 100 steps had each return flagged (often twice, its
    first steps climbing), and the LR guard's cuts cost it up to 36% of held-out loss.

    Per layer the same tests run on each layer's own norm, with ``max_layer_ratio`` and ``max_layer_norm``, once the
    layer has its own ``warmup_steps`` observations: a layer that starts receiving gradients late (an unfrozen
    backbone, a LoRA adapter leaving zero, a new param group) starts its own statistics silently. A layer is only
    named when it carries at least ``min_share`` of the step's total norm, so a layer that is usually silent (norm ~0)
    does not raise alarms when it wakes up with a tiny gradient.

    The ratio limits trade differently, hence three of them, and only a loose one is on by default. 5x on the
    total catches a too-high learning rate in its very first steps, but held for the whole run (``max_ratio=5``) it
    flagged 67 steps of a healthy, spiky run (the LSTM example on the adding problem, Adam), which then took 5500
    steps to solve the task instead of 3400; held during the warm-up only (``warmup_ratio=5``) it still flagged a
    healthy GAN, whose generator norm grows 80x in its first 20 steps (the healthy zoo benchmark), and the LR guard
    then cost it most of its progress. The same 5x on single layers, which swing far more than their sum, gave a
    healthy ResNet-20 75 events and cost it most of its accuracy. Hence 100x for the total during the warm-up, where
    there is no band yet. After the warm-up a fixed ratio adds something only where the history is so noisy that
    the band is wider than it (a log-norm standard deviation above log(ratio) / ``z_thresh``), and there it flagged
    healthy steps: a denoiser trained with one noise level per batch, whose norm legitimately spans four orders of
    magnitude, raised 49 events and was cut to 1% of its rate at 100x. Hence ``max_ratio`` and ``max_layer_ratio``
    opt-in.

    Args:
        z_thresh: z-score (in log-norm) above which a norm is a spike.
        alpha: EMA decay of the mean and variance (closer to 1: longer memory).
        warmup_steps: valid steps observed before any spike can be reported.
        min_ratio: a spike must also be at least this multiple of the EMA norm. The ratio limits below must each be
            above it (or ``None``).
        max_ratio: a total norm this many times its EMA is exploding at any time, warm-up included (``None``, the
            default: off); 5 guards the first steps of a run against a too-high learning rate, and holds a steady
            run to 5x as well.
        max_layer_ratio: the same test for each layer's norm, after the layer's own warm-up (``None``, the default:
            off).
        warmup_ratio: during the warm-up, a total norm this many times its running (geometric) mean is exploding
            (``None``: only ``max_ratio``). Before there is a band, this is what catches a run that diverges in its
            first steps; a flagged step is clipped towards the average (GradGuard's ``clip_exploding``) and the LR
            guard backs off. After the warm-up the band takes over. 5 flags healthy runs whose norm grows fast at
            first (a GAN), hence 100.
        calm_ratio: during the warm-up, once the run has started calmly (three observations within about 4x of
            each other), a total norm this many times its running (geometric) mean is exploding (``None``: only
            ``warmup_ratio``; the lower of the two holds, so a ``calm_ratio`` above ``warmup_ratio`` adds nothing).
            A too-high rate never starts calmly and meets ``warmup_ratio``; the healthy zoo's GAN, whose generator
            norm grows 80x in 20 steps, raises no event with it.
        max_norm: absolute ceiling for the total norm (``None``: none).
        max_layer_norm: absolute ceiling for any layer's norm (``None``: none).
        per_layer: also test each layer.
        min_share: fraction of the total norm a layer must carry to be reported as exploding.
        level_steps: the length of a stretch (steps beyond the band at one level) at which the mean moves to its
            level (above), ``>= 2``; ``None``: every step enters winsorized (the band widens until the level fits);
            a stretch is still one event.
        cap_ratio: a flagged step's ``cap`` (the norm GradGuard clips it to) is this multiple of the (geometric)
            average norm, ``> 0``. 1, the default: a flagged step stands in for a typical one. A larger cap still
            inflates Adam's second moments where they are young: two 10^4x bad batches at step 10 of a LoRA run
            (AdamW), clipped to 2x and 3.2x the average before them, ended it 26% above its clean run, 5% clipped to
            1x. The price is in a genuine jump of the level: its first ``level_steps`` steps are clipped to the old
            level (a regression whose target got 10x larger at step 180 of 240 ended 2.8% above unguarded instead
            of 2.3%).

    Example:
        >>> import torch
        >>> det = ExplodingDetector(warmup_steps=5)
        >>> valid = torch.tensor(True)
        >>> for n in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]:
        ...     r = det.update(torch.tensor(n), torch.tensor([n]), valid)
        >>> bool(det.update(torch.tensor(100.0), torch.tensor([100.0]), valid).total)
        True
    """

    def __init__(
        self,
        z_thresh: float = 6.0,
        alpha: float = 0.95,
        warmup_steps: int = 20,
        min_ratio: float = 2.0,
        max_ratio: float | None = None,
        max_layer_ratio: float | None = None,
        warmup_ratio: float | None = 100.0,
        calm_ratio: float | None = 10.0,
        max_norm: float | None = None,
        max_layer_norm: float | None = None,
        per_layer: bool = True,
        min_share: float = 0.05,
        level_steps: int | None = 5,
        cap_ratio: float = 1.0,
    ) -> None:
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.min_ratio = check_number("min_ratio", min_ratio, low=1.0, low_inclusive=True)
        # ``None`` switches a test off; a ratio limit at or below min_ratio would flag every step.
        self.max_ratio = optional_number("max_ratio", max_ratio, low=self.min_ratio, low_name="min_ratio")
        self.max_layer_ratio = optional_number(
            "max_layer_ratio", max_layer_ratio, low=self.min_ratio, low_name="min_ratio"
        )
        self.warmup_ratio = _above_min_ratio("warmup_ratio", warmup_ratio, self.min_ratio, default=100.0)
        self.calm_ratio = _above_min_ratio("calm_ratio", calm_ratio, self.min_ratio, default=10.0)
        self.max_norm = optional_number("max_norm", max_norm, low=0.0, high=FLOAT32_MAX, high_inclusive=True)
        self.max_layer_norm = optional_number(
            "max_layer_norm", max_layer_norm, low=0.0, high=FLOAT32_MAX, high_inclusive=True
        )
        self.per_layer = check_bool("per_layer", per_layer)
        self.min_share = check_number(
            "min_share", min_share, low=0.0, high=1.0, low_inclusive=True, high_inclusive=True
        )
        self.level_steps = optional_int("level_steps", level_steps, low=2)
        self.cap_ratio = check_number("cap_ratio", cap_ratio, low=0.0)
        # Device state, created on the first update: [mean, var, count] for the total (index 0) and each layer.
        self._mean: Tensor | None = None
        self._var: Tensor | None = None
        self._count: Tensor | None = None
        # Each entry's current stretch of steps at one level beyond the band: its signed length (+ above, - below,
        # 0: in none), its first log-norm and the sum of its log-norms.
        self._stretch: Tensor | None = None
        # The average deviation of each entry's log-norm from its mean: the mean's lag behind a trend.
        self._bias: Tensor | None = None
        # Each entry's memory of its levels: the level it last dropped from (log-norm, fading; -inf: none), the
        # observations since its mean last moved to a new level, the centre before the current run of low steps, and
        # that run's length.
        self._levels: Tensor | None = None
        self._const_cache: Any = None

    def _ensure_state(self, num_layers: int, device: torch.device) -> None:
        if self._mean is None or self._mean.numel() != num_layers + 1:
            self._mean = torch.zeros(num_layers + 1, device=device)
            self._var = torch.zeros(num_layers + 1, device=device)
            self._count = torch.zeros(num_layers + 1, device=device)
        elif self._mean.device != device:
            self._mean, self._var, self._count = (t.to(device) for t in (self._mean, self._var, self._count))  # type: ignore[union-attr]
        if self._stretch is None or self._stretch.shape != (3, num_layers + 1):
            # A fresh state, a new layer count, or a state saved before stretches were kept: in no stretch.
            self._stretch = torch.zeros(3, num_layers + 1, device=device)
        elif self._stretch.device != device:
            self._stretch = self._stretch.to(device)
        if self._bias is None or self._bias.numel() != num_layers + 1:
            self._bias = torch.zeros(num_layers + 1, device=device)  # a state saved before it was kept: no lag
        elif self._bias.device != device:
            self._bias = self._bias.to(device)
        if self._levels is None or self._levels.shape != (4, num_layers + 1):
            # A fresh state, or one saved before levels were remembered: no drop remembered, the level not yet
            # established.
            mean = self._mean
            assert mean is not None
            zeros = torch.zeros_like(mean)
            self._levels = torch.stack([torch.full_like(mean, -math.inf), zeros, mean, zeros])
        elif self._levels.device != device:
            self._levels = self._levels.to(device)

    def _constants(
        self, size: int, device: torch.device
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor]:
        # Built once per shape and device: a per-step ``torch.full``/``torch.ones`` would be one more kernel (and on
        # a GPU one more host-to-device copy) every step.
        key = (size, device)
        hit = self._const_cache
        if hit is None or hit[0] != key:
            one = torch.ones(1, dtype=torch.bool, device=device)
            start_at = torch.full((size,), float(self.warmup_steps), device=device)
            start_at[0] = 1.0
            # The ratio tests in log space (an ``inf`` entry never fires): after the warm-up, and during it, where
            # the total is held to ``warmup_ratio`` (or ``max_ratio`` where that is lower).
            limits = [r for r in (self.warmup_ratio, self.max_ratio) if r is not None]
            early_total = min(limits) if limits else None
            late = _per_entry(size, device, self.max_ratio, self.max_layer_ratio, math.inf, transform=math.log)
            early = (
                late  # the same object: the step then needs no ``where`` between the two
                if early_total == self.max_ratio
                else _per_entry(size, device, early_total, self.max_layer_ratio, math.inf, transform=math.log)
            )
            if (late is not None or self.calm_ratio is not None) and early is None:
                early = torch.full((size,), math.inf, device=device)
            if early is not None and late is None:
                late = torch.full((size,), math.inf, device=device)
            # During the warm-up after a calm start the total is held to calm_ratio as well (layers as before).
            calm_limits = early
            if self.calm_ratio is not None and (early_total is None or self.calm_ratio < early_total):
                # Only where it is tighter: the same object as ``early`` saves the step a ``where``.
                calm_limits = _per_entry(
                    size, device, self.calm_ratio, self.max_layer_ratio, math.inf, transform=math.log
                )
            hit = self._const_cache = (
                key,
                one,
                _per_entry(size, device, self.max_norm, self.max_layer_norm, math.inf),
                late,
                early,
                calm_limits,
                start_at,
            )
        return hit[1], hit[2], hit[3], hit[4], hit[5], hit[6]

    @staticmethod
    def _lag(bias: Tensor, warm: Tensor) -> Tensor:
        """How far below the mean the norms sit: the average deviation where it is negative, after the warm-up."""
        return bias.clamp_max(0.0).where(warm, 0.0)

    def _min_std(self) -> float:
        # The ratio test already demands min_ratio; the std floor keeps z finite on a perfectly steady history.
        return math.log(self.min_ratio) / self.z_thresh

    def update(
        self, total_norm: Tensor, layer_norm: Tensor, valid: Tensor, layer_present: Tensor | None = None
    ) -> ExplodingResult:
        """Test this step's norms, then fold them into the history.

        Args:
            total_norm: 0-d total gradient norm.
            layer_norm: ``[L]`` per-layer norms.
            valid: 0-d bool; ``False`` (non-finite gradients, AMP overflow) leaves the state untouched and reports
                nothing.
            layer_present: ``[L]`` bool, layers that received a gradient this step (default: all).
        """
        # Every tensor operation below is one kernel launch per step: no-ops (detach of a tensor that needs no
        # gradient, a cast to its own dtype, a move to its own device) are skipped on the host, and the arithmetic
        # is shared where the formula repeats. The results are bit-for-bit those of the plain formulas.
        layer_norm = _as_float(layer_norm)
        device = layer_norm.device
        self._ensure_state(layer_norm.numel(), device)
        mean, var, count, stretch, bias = self._mean, self._var, self._count, self._stretch, self._bias
        assert mean is not None and var is not None and count is not None and stretch is not None
        assert bias is not None and self._levels is not None
        prior, age, origin, run = self._levels.unbind()
        total = _as_float(total_norm)
        if total.device != device:
            total = total.to(device)
        norms = torch.cat([total.reshape(1), layer_norm])
        one, ceilings, late_jumps, early_jumps, calm_jumps, start_at = self._constants(norms.numel(), device)
        if valid.device != device:
            valid = valid.to(device)
        # An exactly-zero norm (a masked batch, LoRA's A before B leaves zero, an unused branch) is no observation:
        # its log would drag the average towards log(0) and make every ordinary norm afterwards look like a spike.
        # ``0 < norm < inf`` also drops inf and NaN (comparisons with NaN are False).
        observed = (norms > 0) & (norms < math.inf)
        if layer_present is None:
            use = observed & valid
        else:
            if layer_present.device != device:
                layer_present = layer_present.to(device)
            use = torch.cat([one, layer_present]) & valid & observed
        x = norms.clamp_min(_TINY).log()

        std = var.sqrt().clamp_min(self._min_std())
        z_std = self.z_thresh * std
        dev = x - mean
        warm = count >= self.warmup_steps
        # Norms falling steadily (training settling) leave the mean behind them: the deviation's average is that
        # lag, and the band is centred on it. Only downwards: a falling norm is never an explosion, while a rising
        # one (a GAN's generator, a warm-up) keeps the lag inside its variance, as before.
        shift = self._lag(bias, warm)
        centre = mean + shift
        dev_c = x - centre
        # The band's half-width: (dev_c > z * std) & (dev_c > log(min_ratio)) in one comparison.
        half = z_std.clamp_min(math.log(self.min_ratio))
        # Where the step lies: +1 above the band, -1 below it, 0 inside. After the warm-up, or during it after a calm
        # start (judged on the spread before this step, which a first bad batch would widen).
        calm = (count >= CALM_STEPS) & (var <= _CALM_VAR)
        side = dev_c.sign() * ((warm | calm) & (dev_c.abs() > half))
        calm_warmup = calm & ~warm
        ratio = math.log(self.min_ratio)
        # A norm back up at a level it dropped from is a return, not a spike (a task or a loss term that alternates
        # with a quieter one): from 1 / min_ratio of that level to 4x above it, while it is remembered and lies 4x
        # above the centre (once the mean is back up there, the band judges as before). A spike on the new level that
        # stays well below the old one (a third of it) is still a spike.
        back = x - prior
        returned = (back >= -ratio) & (back <= _DROP) & (prior >= centre + _DROP)
        spike = (side > 0) & warm & ~returned
        # The ratio test runs on the total from its second observation (a run that diverges from its first steps),
        # but on a layer only after the layer's own warm-up: a layer that starts receiving gradients late (an
        # unfrozen backbone, LoRA's A once B leaves zero) grows by orders of magnitude before it settles.
        started = count >= start_at
        jumps = None
        if late_jumps is not None and early_jumps is not None:  # with no ratio test, nothing to compute
            jumps = late_jumps if late_jumps is early_jumps else torch.where(warm, late_jumps, early_jumps)
            if calm_jumps is not None and calm_jumps is not early_jumps:
                # After a calm start the warm-up has a history to compare with: bad batches 20x and 50x the norms of
                # a LoRA run's first steps (AdamW) passed the 100x test whole and cost +118% and +217% held-out.
                jumps = torch.where(calm_warmup, calm_jumps, jumps)
            spike |= started & (dev > jumps)
        if ceilings is not None:  # without ceilings, ``norms > inf`` never holds
            spike |= norms > ceilings
        # A layer must carry min_share of the total to be named; the total itself always passes (x >= share * x).
        flags = use & spike & (norms >= norms[0] * self.min_share) if self.min_share > 0 else use & spike
        if not self.per_layer:
            flags[1:] = False
        # A step flagged in the warm-up after a calm start stays out of the plain mean and the variance (below) and
        # begins a stretch upwards even where the young band is wider than the step (a pair of bad batches is one
        # event). Entered at the ratio boundary, one 150x bad batch after five calm steps doubled the mean, and a
        # second one was then some 70x the mean, neither flagged nor clipped. A run that diverges from its first steps
        # has no calm start and feeds its flagged steps in as before; a level that holds is taken in by level_steps.
        kept_out = flags & calm_warmup
        side = torch.where(kept_out, 1.0, side)
        # Where a flagged total may be clipped to: cap_ratio times the average norm, or the ceiling, judged before
        # this step enters the history. Not the band's upper edge: a history whose norms trend (Adam's first steps)
        # makes the band wide, and a bad batch clipped to a 50x edge still wrecks Adam's second moments for
        # hundreds of steps (+257% held-out loss, two bad batches at step 20).
        # At the default ratio the add would be a kernel that adds 0.
        # A flagged layer bounds the step too: the total is scaled by what brings that layer back to its own average
        # (a bad batch scales every layer alike), but not below the total's own cap, so a layer waking up from a
        # near-silent level costs no more than a typical step, and one under a total at or below its average costs
        # nothing. Without it, a layer named exploding was not clipped wherever the total's band was wider than the
        # layer's: a 10x bad batch the step after a backbone joined (the total's level moved up by the backbone's
        # large first gradient) was named by the head's detector and went through whole, a regression ending at
        # 7.5 against 0.32 clean (now 0.33).
        edge = (centre if self.cap_ratio == 1.0 else centre.add(math.log(self.cap_ratio))).exp()
        if ceilings is not None:
            # Only a ceiling can flag an entry's very first step, before there is any average to clip towards.
            edge = torch.where(count >= 1, edge, math.inf).minimum(ceilings)
        bound = (norms[0] * torch.where(flags, edge / norms, math.inf).amin()).maximum(edge[0])
        cap = torch.where(flags[0], edge[0], torch.where(bound < norms[0], bound, math.inf))
        # After the warm-up, steps beyond the band at one level are one stretch: each still min_ratio beyond the
        # average on the stretch's side, and within min_ratio of the stretch's first norm. A step back towards the
        # band by more than that starts a stretch of its own without counting (a 10^4x bad batch beside one 2.3x
        # smaller is one event, where one layer's falling norm counted a second and the LR guard cut for one pair;
        # holding the level instead took a decaying spike's tail in as a level, and a spike after it passed). A step
        # that holds the
        # stretch's level is no new event: a jump to a new level that then holds (a harder task, a loss term switched
        # on, a run of bad batches) is reported once, even where later steps of it fall inside a band that its first
        # step widened. A norm that keeps climbing starts a new stretch, and counts, at each jump past min_ratio: a
        # blow-up grows from step to step. Every flagged step is still clipped to ``cap``. During the warm-up a stretch
        # begins only after a calm start: a run that diverges from its first steps has none, and each of its flagged
        # steps counts (the rollback's "two in a row" must come at once). There a stretch holds steps within 4x of its
        # first (the calm start's spread): two 1e4x bad batches at step 5 of a LoRA run (AdamW) lay more than 2x
        # apart, counted twice, and the LR guard's cut cost +32.8% held-out (one event, no cut: +0.6%). After the
        # warm-up the stretches also move the mean (level_steps) and shape the level memory, which 4x upset (an
        # alternating run got an event). An absolute ceiling counts on every step.
        length, first, level_sum = stretch.unbind()
        direction = length.sign()
        spread = torch.where(warm, ratio, _WARMUP_SPREAD)
        drift = x - first
        beyond = dev_c * direction > ratio
        holds = beyond & (drift.abs() <= spread)
        # A step back towards the band is no new event (it holds no level either: a spike that decays is not one).
        counts = ~(beyond & (drift * direction <= spread))
        if ceilings is not None:
            counts |= norms > ceilings
        length = torch.where(holds, length + direction, side)
        first = torch.where(holds, first, x)
        level_sum = torch.where(holds, level_sum + x, x)
        events = flags & counts
        # A drop that holds (the norm 4x below the centre, _DROP_STEPS in a row) from an established level remembers
        # that level, the highest one while several are remembered, and the memory fades. Not the band: one that
        # widened with earlier drops hides the next one, and narrows again before the norm returns. A level that a
        # run of bad batches became (level_steps) is young, and one held only in the warm-up is never established.
        low = dev_c < -_DROP
        # Where the norms were before the run's first low step, past the mean's lag either way.
        origin = torch.where(low & (run > 0), origin, mean + bias)
        run = (run + 1) * low
        # Established: held since the warm-up for _ESTABLISHED observations before the run of low steps began.
        dropped = (run >= _DROP_STEPS) & (age - run >= _ESTABLISHED - 1)
        prior = torch.where(dropped, torch.maximum(prior, origin), prior) - _FORGET

        # Warm-up uses a plain running mean (1/n), afterwards the EMA. Every observation enters winsorized, on both
        # sides: to the band after warm-up, to the ratio boundaries before it. One outlier (a spike, or a batch
        # whose gradient is nearly zero) then moves the statistics by a bounded amount, so it neither hides the
        # next spike nor turns ordinary norms into spikes.
        # A step flagged after a calm start enters at rate 0: mean, variance and lag stay as they were (above).
        rate = torch.where(warm, 1.0 - self.alpha, torch.where(kept_out, 0.0, (count + 1.0).reciprocal()))
        bound = torch.where(warm, z_std, math.inf if jumps is None else torch.where(count >= 1, jumps, math.inf))
        x_in = torch.clamp(x, centre - bound, centre + bound)
        delta = x_in - mean
        new_mean = mean + rate * delta
        new_var = (1.0 - rate) * (var + rate * (delta - shift).square())
        new_bias = bias.lerp(delta, rate)
        if self.level_steps is not None:
            # The first step of a stretch enters winsorized, as any outlier; the steps that hold its level leave the
            # variance alone: folded in one after another, they widened the band until the new level fit inside it
            # (a 30x jump: the standard deviation went from 0.1 to 1.6 in ten steps, and a 100x spike 34 steps
            # later was not flagged). Held for level_steps steps, the level is the new mean, and the band keeps the
            # width the stretch's first step left it: the next spike is measured against the level the norms are at.
            new_var = torch.where(holds, var, new_var)
            moved = length.abs() >= self.level_steps
            new_mean = torch.where(moved, level_sum / self.level_steps, new_mean)
            new_bias = torch.where(moved, 0.0, new_bias)  # at its level: no lag
            stays = ~moved
            age = age * stays
            length = length * stays
        self._stretch = torch.where(use, torch.stack([length, first, level_sum]), stretch)
        self._mean = torch.where(use, new_mean, mean)
        self._var = torch.where(use, new_var, var)
        # Not from a first observation: its deviation is from the mean's starting 0, not a lag (a norm of 1e-4 would
        # have started the average at -9). Nor from a layer's warm-up, whose norms settle from wherever they start.
        self._bias = torch.where(use & started, new_bias, bias)
        self._levels = torch.where(use, torch.stack([prior, (age + 1) * warm, origin, run]), self._levels)
        self._count = count + use
        return ExplodingResult(total=events[0], layers=events[1:], any=events.any(), cap=cap)

    def band(self) -> Tensor:
        """``[3]`` device tensor: the average total norm (where a falling norm has come to, past the mean's lag) and
        the lower/upper edges of its detection band; NaN before the total's first observation."""
        if self._mean is None or self._var is None or self._count is None or self._bias is None:
            return torch.full((3,), math.nan)
        warm = self._count[0] >= self.warmup_steps
        level = self._mean[0] + self._lag(self._bias[0], warm)
        std = self._var[0].sqrt().clamp_min(self._min_std())
        half = (self.z_thresh * std).clamp_min(math.log(self.min_ratio))
        # A fresh state's mean of 0 would read as an average norm of 1.
        return torch.stack([level, level - half, level + half]).exp().where(self._count[0] >= 1, math.nan)

    def _take_layers(self, old: ExplodingDetector, source: Sequence[int]) -> None:
        """Go on from ``old``'s history: the total's, and layer ``i``'s from ``old``'s layer ``source[i]`` (``-1``:
        a layer new since, which starts its own, silently, as a layer that receives gradients late)."""
        if old._mean is None:
            return
        device = old._mean.device
        old._ensure_state(old._mean.numel() - 1, device)
        self._ensure_state(len(source), device)
        columns = mapped_columns([0, *(j + 1 if j >= 0 else -1 for j in source)], device)
        assert columns is not None  # the total's column always goes on
        mine, theirs = columns
        for name in ("_mean", "_var", "_count", "_bias"):
            getattr(self, name)[mine] = getattr(old, name)[theirs]
        for name in ("_stretch", "_levels"):
            getattr(self, name)[:, mine] = getattr(old, name)[:, theirs]

    def _shift_total(self, log_factor: Tensor) -> None:
        """Move the total's statistics by ``log_factor`` (0-d device tensor, in log-norm), keeping their spread and
        their warm-up: the level where the total now is, parameters having joined it (see
        :meth:`GuardEngine._gradients_changed`). A level it remembers dropping from moves with it."""
        if self._mean is None:
            return
        self._ensure_state(self._mean.numel() - 1, self._mean.device)
        assert self._levels is not None
        mean, levels = self._mean.clone(), self._levels.clone()
        mean[0] = mean[0] + log_factor
        levels[0, 0] = levels[0, 0] + log_factor  # -inf (nothing remembered) stays -inf
        levels[2, 0] = levels[2, 0] + log_factor
        self._mean, self._levels = mean, levels

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {
            "mean": None if self._mean is None else self._mean.clone(),
            "var": None if self._var is None else self._var.clone(),
            "count": None if self._count is None else self._count.clone(),
            "stretch": None if self._stretch is None else self._stretch.clone(),
            "bias": None if self._bias is None else self._bias.clone(),
            "levels": None if self._levels is None else self._levels.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        check_state(type(self).__name__, state, ("mean", "var", "count"))
        self._mean, self._var, self._count = state["mean"], state["var"], state["count"]
        # Absent from states saved before stretches were kept (they may hold the "onset" of a streak of flagged
        # steps instead, which stretches replace): in no stretch.
        self._stretch = state.get("stretch")
        self._bias = state.get("bias")  # absent from states saved before it was kept: no lag
        self._levels = state.get("levels")  # likewise: no drop remembered

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(z_thresh={self.z_thresh}, alpha={self.alpha}, warmup_steps={self.warmup_steps},"
            f" min_ratio={self.min_ratio}, max_ratio={self.max_ratio}, max_layer_ratio={self.max_layer_ratio},"
            f" warmup_ratio={self.warmup_ratio}, calm_ratio={self.calm_ratio},"
            f" max_norm={self.max_norm},"
            f" max_layer_norm={self.max_layer_norm},"
            f" per_layer={self.per_layer}, min_share={self.min_share}, level_steps={self.level_steps},"
            f" cap_ratio={self.cap_ratio})"
        )


class VanishingDetector:
    """Flags layers whose gradient stays tiny for ``patience`` consecutive steps.

    A layer is *low* on a step when its norm is below the absolute floor ``min_norm`` or below ``ratio`` times the
    largest layer norm of that step. It is *vanishing* once it has been low for ``patience`` consecutive valid steps
    in which it received a gradient; the step on which it gets there counts as one event. A layer without a
    gradient on a step (unused branch, frozen) keeps its streak unchanged.

    Args:
        min_norm: absolute floor on a layer's gradient norm.
        ratio: floor relative to the largest layer's norm on the same step.
        patience: consecutive low steps before a layer is reported.

    Example:
        >>> import torch
        >>> det = VanishingDetector(patience=2)
        >>> valid = torch.tensor(True)
        >>> for _ in range(2):
        ...     r = det.update(torch.tensor([1.0, 1e-9]), valid)
        >>> r.new.tolist()
        [False, True]
    """

    def __init__(self, min_norm: float = 1e-9, ratio: float = 1e-4, patience: int = 25) -> None:
        self.min_norm = check_number(
            "min_norm", min_norm, low=0.0, low_inclusive=True, high=FLOAT32_MAX, high_inclusive=True
        )
        self.ratio = check_number("ratio", ratio, low=0.0, high=1.0, low_inclusive=True)
        self.patience = check_int("patience", patience, low=1)
        self._run: Tensor | None = None

    def update(self, layer_norm: Tensor, valid: Tensor, layer_present: Tensor | None = None) -> VanishingResult:
        """Test this step's per-layer norms.

        Args:
            layer_norm: ``[L]`` per-layer norms.
            valid: 0-d bool; ``False`` leaves the streaks untouched.
            layer_present: ``[L]`` bool, layers that received a gradient this step (default: all).
        """
        layer_norm = _as_float(layer_norm)
        if self._run is None or self._run.numel() != layer_norm.numel():
            self._run = torch.zeros(layer_norm.numel(), dtype=torch.int64, device=layer_norm.device)
        elif self._run.device != layer_norm.device:
            self._run = self._run.to(layer_norm.device)
        finite_max = torch.where(layer_norm < math.inf, layer_norm, 0.0).max()  # norms are >= 0: < inf is isfinite
        floor = torch.clamp_min(self.ratio * finite_max, self.min_norm)
        low = layer_norm < floor
        use = valid if layer_present is None else layer_present & valid
        # run + 1 where low, 0 where not, unchanged where not used: (run + 1) * low == where(low, run + 1, 0).
        run = torch.where(use, (self._run + 1) * low, self._run)
        self._run = run
        return VanishingResult(layers=run >= self.patience, new=use & (run == self.patience))

    def _take_layers(self, old: VanishingDetector, source: Sequence[int]) -> None:
        """Go on from ``old``'s streaks: layer ``i``'s from ``old``'s layer ``source[i]`` (``-1``: none yet)."""
        if old._run is None:
            return
        run = torch.zeros(len(source), dtype=old._run.dtype, device=old._run.device)
        columns = mapped_columns(source, run.device)
        if columns is not None:
            run[columns[0]] = old._run[columns[1]]
        self._run = run

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {"run": None if self._run is None else self._run.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        check_state(type(self).__name__, state, ("run",))
        self._run = state["run"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_norm={self.min_norm}, ratio={self.ratio}, patience={self.patience})"


_DIVERGENCE_STATE = 9  # DivergenceDetector's state vector: see its __init__
#: How far below 0, relative to its running mean, a loss must be for :class:`DivergenceDetector` to take it as a loss
#: that can be negative (and judge it no more): a loss that cannot be (a KL divergence) may come out a rounding error
#: below 0 once it is near it.
SIGNED_TOLERANCE = 1e-3
#: The share of its gap to the running mean that :class:`DivergenceDetector`'s floor (the lowest settled running mean,
#: as the level that a loss is judged against) closes per observation: a loss climbing about 1% a step or slower (a
#: summed loss over a length curriculum) keeps within 10x of it, one climbing 1.5% a step or faster (a blow-up: 10% and
#: more) does not.
FLOOR_FADE = 0.003
#: A run has learned, for :meth:`DivergenceDetector.progress`, once its lowest settled running mean of the loss is at
#: most this share of its starting level: closer to it, the noise of the running mean is a large part of the progress.
LEARNED = 0.8
#: Losses whose running mean is the starting level that :meth:`DivergenceDetector.progress` measures progress from: the
#: first loss alone made the share hang on one batch (an easy first batch, 0.65 where a run starts near 1, read the
#: noise of its plateau as 27% given back; 12% from this level).
START_LOSSES = 8


class DivergenceDetector:
    """Flags a training loss that has blown up: an order of magnitude above its running level, and above where
    training started, for several steps in a row.

    The gradient detectors see a diverging run through its gradient norms; an adaptive optimizer (Adam) normalises
    those, so a too-high Adam rate can wreck a model while every norm looks ordinary: an MLP regression at Adam rate
    1.0 went from MSE 16 to 5600 in two updates and stayed in the hundreds, without a single exploding step
    (tests/test_divergence.py). The loss does not hide it. This detector watches the loss of each optimizer step (the
    losses backpropagated since the previous step, summed: the mean over an accumulation window).

    A step is *high* when its loss is more than ``ratio`` times the running level of the losses before it **and**
    above the first loss observed (the untrained model's): a healthy run does get worse than it was for a while (a
    data shift, a restart of the schedule), but seldom worse than untrained, and by an order of magnitude at once.
    The running level is the running mean, or the lowest value the running mean has held since it settled (after
    ``1 / (1 - alpha)`` observations) when that is lower: a climb slow enough for the mean to follow it (a tanh RNN
    whose loss rose from 0.17 to 7 over 20 steps and to 16 later, under constant clipping, in the stability suite)
    is still measured against where training had got to. That lowest value closes 0.3% of its gap to the running
    mean at each observation (:data:`FLOOR_FADE`), so what counts is how fast the loss climbs: at 1.5% a step or
    faster (10x within 155 steps; a blow-up climbs 10% a step and more) it gets 10x past the floor and is caught, at
    about 1% a step or slower (10x over 230 steps or more) it never does, and between the two the batches' noise
    decides (with +-50% noise, 35 of 50 climbs at 1.2% a step were caught). A slow climb is a loss whose scale grows
    by design: a GRU tagger's loss summed over tokens (``reduction="sum"``), its batches growing from 4 to 160 tokens
    over 400 steps, rose 25x (0.8% a step) and was a divergence 10x past its lowest mean, cut and restarted from its
    initial weights (held-out +109%; now no event, as unguarded). The price is at the edge: a climb that ends just
    past 10x and holds there is caught only when fast (a noiseless one to 12x over 50 steps is, over 75 is not; with
    log-normal noise of 0.2, 10 of 10 over 75 steps and 8 of 10 over 100 were), one that ends at 30x up to a climb
    over 150 steps.
    After ``patience`` high steps in a row the step is one *divergence event*; the next one needs the loss to come
    back down first, so a lasting climb is one event, not one per step. A step between, above ``sqrt(ratio)`` times
    the level and above the first loss but not high, holds the streak without extending it: a loss that oscillates
    between blown up and merely bad has diverged too (``GradGuard(clip=AutoClip())`` on the stability suite's tanh
    RNN, seed 1, went 35.6, 9.6, 14.4, 30.9, 44.4, 85.9 from a level near 1, and on into the thousands; each step
    under 10x the level ended the streak, and the run ended at MSE 720 with no event). The default patience outlasts
    the transient of Adam's first steps without warm-up: a healthy 1500-layer residual net went 54x up for four steps
    while Adam's second moments settled, then trained on (tests/test_do_no_harm.py).

    The running mean starts as the plain mean of the first losses, then is an EMA (``alpha``); every loss enters it
    winsorized to within ``ratio`` of it, and a high loss with the EMA's small weight even in the first steps, so one
    outlier moves it little and a genuinely new level is absorbed within a few dozen steps (a level more than
    ``ratio`` times the lowest settled mean and above the first loss, reached within a hundred steps or so, is not:
    that is a model worse than untrained and an order of magnitude worse than it had just been). A non-finite loss (the
    non-finite gradient path handles it), an exactly-zero loss (a fully masked batch) and a step without a loss are
    no observation. A loss that has once been below 0 (by more than :data:`SIGNED_TOLERANCE` of its running mean:
    more than a rounding error) reports nothing from then on (until a ``new_phase()`` of the engine starts it
    afresh), neither events nor the share of :meth:`progress`: such a loss has no natural zero (a PPO loss with its
    entropy bonus, a density's log-likelihood, a critic's score), so a ratio to its level means nothing. A PPO run's
    loss, about 0.01 and of either sign, rose to 0.2 for a few dozen steps when its value loss met the first
    rewards: a divergence, before this rule, and a restart from the initial weights (mean training return 0.31
    unguarded, -0.69 guarded). The first loss stands for the untrained level, so it must not be much easier than the
    typical batch: simulated flat runs (300 steps of a loss that is the mean of ``n`` squared Gaussians) had an
    event in 12-15 of 200 runs with ``n=1`` and 7 with ``n=2``, none with 4 or 8; for a loss of one or two samples
    per step, pass ``divergence=None``.

    A loss that jumps by ``ratio`` or more in one step after a calm history (at least ``patience`` observations, the
    loss before the jump within ``sqrt(ratio)`` of the level) and then holds its new level without climbing further
    (after ``patience`` high steps, within ``sqrt(ratio)`` of the streak's first loss) is a new level of the *data*,
    not a divergence of the weights (``level_shifts``): a harder curriculum stage, a loss term switched on, a new
    task. One update with a calm gradient cannot raise the loss tenfold; a too-high rate wrecks the weights over
    several updates, and its loss keeps climbing. Such a jump raises no event: the detector starts its running level
    again from the new loss (the first loss is kept), so a divergence later in the new phase is judged against the
    new level. Before this rule, the default guard answered a tenfold harder task at step 120 with a divergence
    event, a cut and a restart from the initial weights (held-out +434%); while the rule waited for a settled mean
    (50 observations), a loss made 30x larger for good at step 5 or 10 of the healthy zoo's masked regression still
    cost a restart (+6.1% / +8.0%, now -0.3% / -0.0%). What it cannot tell apart: a model whose loss jumps tenfold in
    one step and then stays there, which a corrupted stretch of data longer than ``patience`` batches also does; the
    gradient detectors still see the jump's norms.

    ``start_ratio`` (opt-in) also calls high a loss more than that many times the first loss, which catches a climb
    that is gradual rather than sudden (no step 10x the running mean, but the model ends worse than untrained). Its
    reference is one batch's loss, so it suits a loss averaged over many samples (a language model's tokens): in the
    same simulation ``start_ratio=2`` had an event in 40 of 200 runs with ``n=8`` and 5 with ``n=32``; ``3`` in none
    with ``n=32``.

    A model that learned and then collapses late (a warm-up to too high a peak, a rate raised mid-run) ends at chance
    with a cross-entropy still below the untrained loss: no event. :meth:`progress` measures how much of its progress
    such a run has given back; GradGuard logs it and warns on it, and acts on events only.

    Args:
        ratio: how many times its running mean a loss above the first loss must be to be high, ``> 1``.
        start_ratio: how many times the first loss a loss must be to be high, ``> 1`` (``None``, the default:
            only ``ratio``).
        patience: high steps in a row that make one event, ``>= 1``.
        alpha: EMA decay of the running mean, in ``(0, 1)`` (0.98: about the last 50 steps).
        level_shifts: take a sudden jump that then holds its level as a new level of the data (above); ``False``:
            every ``patience`` high steps in a row are an event. Needs ``patience >= 2`` (one step shows no plateau),
            and is off at ``patience=1``.

    Example:
        >>> import torch
        >>> det = DivergenceDetector(patience=2)
        >>> events = [bool(det.update(torch.tensor(loss))) for loss in [2.3, 2.1, 1.9, 60.0, 580.0, 6100.0]]
        >>> events  # a loss that keeps climbing after its jump: the weights, not the data
        [False, False, False, False, True, False]
        >>> det = DivergenceDetector(patience=2)
        >>> [bool(det.update(torch.tensor(loss))) for loss in [2.3, 2.1, 1.9, 60.0, 58.0, 61.0]]  # a new level
        [False, False, False, False, False, False]
    """

    def __init__(
        self,
        ratio: float = 10.0,
        start_ratio: float | None = None,
        patience: int = 5,
        alpha: float = 0.98,
        level_shifts: bool = True,
    ) -> None:
        self.ratio = check_number("ratio", ratio, low=1.0)
        self.start_ratio = optional_number("start_ratio", start_ratio, low=1.0)
        self.patience = check_int("patience", patience, low=1)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.level_shifts = check_bool("level_shifts", level_shifts)
        self._settle = 1.0 / (1.0 - self.alpha)  # observations after which the mean is an EMA
        self._calm = math.sqrt(self.ratio)  # "calm before" and "holds its level" in a level shift
        # Device state, created on the first update: [running mean, observations, first loss, high steps in a row,
        # lowest settled running mean (0: none yet), previous loss (0: none), the loss that began a sudden high
        # streak (0: none, or the streak began gradually), the running mean after the first START_LOSSES losses (0:
        # not yet), the floor: the lowest settled running mean, fading up towards the mean (0: none yet)]. The first
        # loss is never 0 once there is one, so its sign is free to record whether a loss below 0 has been seen
        # since: negative, the detector judges nothing (class docstring).
        self._state: Tensor | None = None
        # 1 - alpha, 1 and 0 on the device, made once: a per-step constant is an op.
        self._consts: tuple[Tensor, ...] | None = None

    def forget_floor(self) -> None:
        """Judge the loss against its running mean from here on, forgetting the lowest level the mean had held (it
        settles again from the mean). For a change the caller knows of, after which the loss is meant to stay
        higher: GradGuard calls it when the batches' shapes change for good (a curriculum stage). A loss summed over
        a sequence length doubled every 50 steps climbed in stages of 2-5x; at its fourth stage it was 10x past that
        lowest level, a divergence, and the run restarted from its initial weights (held-out +827%). The running
        mean, the first loss and a streak in progress are kept, so one bad batch at the change moves nothing.

        Example:
            >>> import torch
            >>> def stages(forget: bool) -> bool:
            ...     det = DivergenceDetector(patience=1, alpha=0.5)
            ...     for loss in [1.0, 1.0, 1.0, 4.0, 4.0]:
            ...         det.update(torch.tensor(loss))
            ...     if forget:
            ...         det.forget_floor()
            ...     return bool(det.update(torch.tensor(12.0)))
            >>> stages(forget=False), stages(forget=True)  # 12x the first stage's level; 3.7x the running mean
            (True, False)
        """
        if self._state is not None:
            state = self._state.clone()  # a loaded state may be a checkpoint's own tensor
            state[8] = 0.0  # no floor: the next settled step takes the running mean as its floor
            self._state = state

    def update(self, loss: Tensor) -> Tensor:
        """Test this step's loss (a 0-d tensor; NaN: no loss this step), then fold it into the running mean.

        Returns:
            0-d bool: this step completes a divergence event.
        """
        loss = _as_float(loss)
        if loss.dim() != 0:
            loss = loss.reshape(())
        device = loss.device
        if self._state is None:
            self._state = torch.zeros(_DIVERGENCE_STATE, device=device)
        elif self._state.device != device:
            self._state = self._state.to(device)
        if self._consts is None or self._consts[0].device != device:
            self._consts = tuple(torch.tensor(v, device=device) for v in (1.0 - self.alpha, 1.0, 0.0))
        slow, one, zero = self._consts
        mean, count, first, streak, lowest, prev, onset, start, floor = self._state.unbind()
        # ``0 < |loss| < inf`` drops NaN, inf and the exact zero of a fully masked batch (``isfinite`` is six ops).
        size = loss.abs()
        observed = (size > 0) & (size < math.inf)
        limit = mean * self.ratio
        # A loss that was ever negative has no natural zero, so "10x its level" says nothing (class docstring): the
        # first loss turns negative for good (-inf too: such a loss can be negative). Not for a rounding error: a KL
        # divergence near 0 can come out a hair below it.
        first = first.copysign(torch.where(loss < mean * -SIGNED_TOLERANCE, -1.0, first))
        # ``first > 0`` also says that there is a first loss (it is never 0), that no loss was below 0 and that the
        # mean is positive (every loss enters it winsorized to at least mean / ratio).
        gated = observed & (first > 0)
        # 0 (what a fresh state holds): no floor yet. Once there is one it is never above the mean (at most the
        # minimum of every mean since it settled), so it is the level as it stands.
        has_floor = floor > 0
        level = torch.where(has_floor, floor, mean)
        high = gated & (loss > torch.maximum(first, level * self.ratio))
        if self.start_ratio is not None:
            high |= gated & (loss > first * self.start_ratio)
        # A step between the calm level and a high one (above sqrt(ratio) x the level and the first loss) holds a
        # streak without extending it: a loss that oscillates between blown up and merely bad has diverged. No
        # ``gated`` needed: an unobserved step keeps the streak below, and a fresh state has no streak to hold.
        elevated = loss > torch.maximum(first, level * self._calm)
        if self.start_ratio is not None:
            elevated |= high  # high by the first loss alone, under the level's bar
        run = torch.where(observed, (streak + high) * elevated, streak)
        event = high & (run == self.patience)
        shift = None
        if self.level_shifts and self.patience > 1:
            # A streak that begins with a jump from a calm loss, after a history at least as long as the streak that
            # makes an event, remembers its first loss; if the streak's last loss has not climbed well past it, the
            # jump is the data's (class docstring).
            sudden = high & (streak == 0) & (count >= self.patience) & (prev <= level * self._calm)
            onset = torch.where(sudden, loss, onset * (run > 0))
            complete = event
            event = complete & (loss > onset * self._calm)
            shift = complete ^ event
        else:
            onset = zero
        # Winsorized into [mean / ratio, mean * ratio]; the first observation is taken as it is. A high loss enters
        # with the EMA's weight even during the warm-up, so that a blow-up in the first steps does not become the
        # level it is judged against.
        fresh = first == 0
        x = torch.where(fresh, loss, torch.clamp(loss, mean / self.ratio, limit))
        n = count + 1.0
        rate = torch.where(high, slow, torch.clamp_min(n.reciprocal(), 1.0 - self.alpha))
        new_mean = torch.where(observed, torch.lerp(mean, x, rate), mean)
        # Only once the mean has settled: the plain mean of the first few losses is too noisy to be a floor (in the
        # flat-run simulation, tracking it from the start gave 57 runs of 200 an event instead of 13 with one sample
        # per loss). A high loss only raises the mean, so it never lowers this.
        settled = n >= self._settle
        has_lowest = lowest > 0
        fades = settled & observed  # a step without a loss holds the floor where it is
        # The floor closes a little of its gap to the mean each step: the lowest mean ever seen made a loss summed
        # over a length curriculum (25x over 400 steps, by design) a divergence, with a cut and a restart from the
        # initial weights (held-out +109%), while a blow-up is 10x past it long before it has moved.
        faded = torch.where(has_floor, torch.lerp(floor, new_mean, FLOOR_FADE), new_mean)
        new = torch.stack(
            [
                new_mean,
                count + observed,
                torch.where(observed & fresh, loss, first),
                run,
                torch.where(settled, torch.minimum(torch.where(has_lowest, lowest, new_mean), new_mean), lowest),
                torch.where(observed, loss, prev),
                onset,
                # After a level shift too: progress is then measured within the new level.
                torch.where(n == START_LOSSES, new_mean, start),
                torch.where(fades, torch.minimum(faded, new_mean), floor),
            ]
        )
        if shift is not None:
            # The new level starts afresh from this loss, as the first losses of a run do; the first loss is kept.
            new = torch.where(shift, torch.stack([loss, one, first, zero, zero, loss, zero, start, zero]), new)
        self._state = new
        return event

    def level(self) -> Tensor:
        """``[2]`` device tensor: the running mean of the loss and the first loss (NaN before any)."""
        if self._state is None:
            return torch.full((2,), math.nan)
        started = self._state[1] > 0
        return torch.where(started, self._state[[0, 2]], math.nan)

    def progress(self) -> Tensor:
        """``[4]`` device tensor: the share of its progress the run has given back, the running mean of the loss, the
        starting level and the lowest settled running mean (NaN for each that does not exist yet).

        The starting level is the running mean after the first :data:`START_LOSSES` losses (of the current level,
        after a level shift): their mean, each winsorized as the running mean takes it, so one outlier among them
        moves it little. The share is ``(mean - lowest) / (start - lowest)``: 0 at the lowest level, 1 back at the
        start. It exists once the lowest settled mean is at most :data:`LEARNED` times the start (NaN before). A
        model that collapses late (a warm-up to too high a peak, a rate raised mid-run) gives back what it learned
        with a loss that never rises above the first, so no divergence event: this measures it, and GradGuard warns
        on it. The share is NaN for a loss that has been below 0 (see the class docstring): it has no natural zero.
        """
        if self._state is None:
            return torch.full((4,), math.nan)
        mean, count, first, _, lowest, _, _, start, _ = self._state.unbind()
        # A state saved before the start was kept: the first loss stands in for it.
        start = torch.where((start == 0) & (count >= START_LOSSES), first, start)
        # A loss that was ever negative: its running mean (of winsorized losses) and ratios mean nothing.
        learned = (lowest > 0) & (start > 0) & (lowest <= start * LEARNED) & (first > 0)
        share = torch.where(learned, (mean - lowest) / (start - lowest).clamp_min(1e-30), math.nan)
        known = torch.stack([share, mean, start, lowest])
        return torch.where(torch.stack([learned, count > 0, start > 0, lowest > 0]), known, math.nan)

    def state_dict(self) -> dict[str, Any]:
        """The running state, to save beside the model; :meth:`load_state_dict` restores it."""
        return {"state": None if self._state is None else self._state.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state that :meth:`state_dict` returned (a ``ValueError`` for one that lacks a key or has
        another version)."""
        check_state(type(self).__name__, state, ("state",))
        saved = state["state"]
        if saved is not None and saved.numel() > _DIVERGENCE_STATE:
            raise ValueError(
                f"DivergenceDetector: the saved `state` holds {saved.numel()} values, this version keeps"
                f" {_DIVERGENCE_STATE} (a state saved by a newer version?)"
            )
        if saved is not None and saved.numel() < _DIVERGENCE_STATE:
            # Saved before the lowest settled mean (or the previous loss and a streak's onset) was kept: none yet (it
            # settles again from the running mean). Saved before the floor faded: the floor starts at the lowest.
            kept = saved.numel()
            saved = torch.cat([saved, saved.new_zeros(_DIVERGENCE_STATE - kept)])
            if kept >= 5:
                saved[-1] = saved[4]
        self._state = saved

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ratio={self.ratio}, start_ratio={self.start_ratio}, patience={self.patience},"
            f" alpha={self.alpha}, level_shifts={self.level_shifts})"
        )
