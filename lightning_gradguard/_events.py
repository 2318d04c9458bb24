"""GradGuard's warnings: one message per kind of event and logging step, naming the worst layers first.

:class:`EventReporter` turns the events of a logging step's snapshot into rows for the TensorBoard events table and
into warnings that say what happened, where, and what GradGuard did about it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_gradguard._lightning import rank_zero_warn
from lightning_gradguard.engine import STALL_STEPS, EngineSnapshot, GuardEngine
from lightning_gradguard.stats import nan_buffers, nonfinite_weights

if TYPE_CHECKING:
    from lightning_gradguard.callback import GradGuard

__all__ = ["EventReporter"]


#: Kinds of the events table's rows that record what the guard did, not what it found.
_ACTION_KINDS = ("lr_reduced", "lr_restored", "rolled_back")
#: The share of its progress a run must have given back (:meth:`DivergenceDetector.progress`) for the relapse warning,
#: at every log over at least ``RELAPSE_HOLD`` steps (the running mean's time constant): its noise on small-batch
#: losses passes the share for a while now and then, a collapse stays.
RELAPSE_WARNING = 0.4
RELAPSE_HOLD = 50
#: The relapse warning's mark among an optimizer's warned (layer, kind) pairs, which a checkpoint keeps.
RELAPSE_MARK = ("(loss)", "relapse")
#: The stall warning's mark among an optimizer's warned (layer, kind) pairs.
STALL_MARK = ("(weights)", "stalled")
#: The mark of the hint to call ``new_phase()``, given with an optimizer's first exploding warning of a fit only.
PHASE_MARK = ("(phase)", "new_phase")


class EventReporter:
    """Turns the first-event records of each logging window into event rows (TensorBoard) and warnings.

    One warning per kind, optimizer and logging step, about the layers not reported before (each layer and kind warns
    once): a spike that flags 28 layers is one warning naming the worst ``max_warnings`` and counting the rest.
    """

    _TITLES = {
        "exploding": "exploding gradients",
        "vanishing": "vanishing gradients",
        "nonfinite": "non-finite gradients",
    }

    def __init__(self, guard: GradGuard) -> None:
        self.guard = guard
        self.rows: list[dict[str, Any]] = []
        self.warned: dict[int, set[tuple[str, str]]] = {}  # optimizer key -> (layer, kind) already warned about
        # optimizer key -> layer -> (step, norm) at the latest report that saw it: the exploding warning's yardstick
        self.previous: dict[int, dict[str, tuple[int, float]]] = {}
        self.relapsing: dict[int, int] = {}  # optimizer key -> step of the first log of its run over the share
        self.shares: dict[int, float] = {}  # optimizer key -> the share at the last log (absent: not measured)
        # optimizer key -> (engine steps, non-finite count) at its last report, and the first step of the unbroken
        # run of wholly non-finite logging windows up to it with the engine's steps before it (None: the last window
        # had a finite step)
        self.stall: dict[int, tuple[int, int, tuple[int, int] | None]] = {}

    def start_fit(self) -> None:
        """Warn about a relapse or a stall, and name ``new_phase()``, once per fit: an earlier fit's warnings and hold
        (at its own step numbers) go. A checkpoint restored next brings its warnings back (a resumed fit is the same
        fit)."""
        for pairs in self.warned.values():
            pairs.discard(RELAPSE_MARK)
            pairs.discard(STALL_MARK)
            pairs.discard(PHASE_MARK)  # a second fit is often the next task: the hint is for it too
        self.relapsing.clear()
        self.shares.clear()
        self.stall.clear()

    def forget(self, key: int) -> None:
        # A rebuilt engine carries its statistics and counts over, and with them the loss's share and a run of
        # non-finite steps: the fit's relapse and stall warnings, once given, stay given.
        self.warned[key] = self.warned.get(key, set()) & {RELAPSE_MARK, STALL_MARK, PHASE_MARK}
        self.previous.pop(key, None)
        self.relapsing.pop(key, None)
        self.shares.pop(key, None)

    def take_rows(self) -> list[dict[str, Any]]:
        """The rows since the last call, in step order (the detectors' come with the log, the guard's actions as
        they happen), a step's events before what the guard did about them."""
        rows, self.rows = self.rows, []
        return sorted(rows, key=lambda row: (row["step"], row["kind"] in _ACTION_KINDS))

    def report(
        self, key: int, step: int, snap: EngineSnapshot, several: bool, module: torch.nn.Module | None = None
    ) -> None:
        """Rows and warnings for one logging window of optimizer ``key`` (``module``: the model, whose buffers the
        warning about a run that stopped training looks through)."""
        guard = self.guard
        engine = guard._states[key]
        # The engine's count at the window's first exploding step, for what could answer it then (the count runs
        # beside Lightning's step; this report is at `step`).
        first = min((row["step"] for row in snap.events if row["kind"] == "exploding"), default=step)
        actions = {
            "exploding": self.explode_action(engine, at=engine.steps - (step - first)),
            "vanishing": "none" if guard.on_vanishing != "raise" else "raise",
            "nonfinite": guard.on_nonfinite,
        }
        rows = [{**row, "opt": key, "action": actions[row["kind"]]} for row in snap.events]
        self.rows.extend(rows)
        warned = self.warned.setdefault(key, set())
        fresh: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            kind = row["kind"]
            mode = {"exploding": guard.on_exploding, "vanishing": guard.on_vanishing}.get(kind, "warn")
            if mode == "ignore" or (row["layer"], kind) in warned:
                continue
            if kind == "nonfinite" and guard.on_nonfinite not in ("warn", "skip", "zero"):
                continue
            warned.add((row["layer"], kind))
            fresh.setdefault(kind, []).append(row)
        previous = self.previous.setdefault(key, {})
        opt = key if several else None
        for kind, found in fresh.items():
            message = self._message(kind, found, previous, opt, actions[kind])
            if kind == "exploding" and guard.max_warnings and PHASE_MARK not in warned:
                # A jump the user made (a task switch) is clipped for its first steps like any other: a continual-
                # learning trial with a new head per task forgot 13-15% more of its first task on 2 of 3 seeds.
                warned.add(PHASE_MARK)
                message += (
                    " If the data or the loss changed here on purpose (a new task, a curriculum stage, a loss term"
                    " switched on), call `guard.new_phase()` at that step: the new level is then measured afresh"
                    " instead of against the old one."
                )
            if kind == "nonfinite":
                message += self._weights_note(key) or (
                    " A gradient counts as non-finite when an entry is inf or NaN, or when its norm is above about"
                    " 1.8e19, whose square overflows float32 (a loss scaled far up): no clipper can measure it."
                )
            rank_zero_warn(message, category=UserWarning)
        # Each layer's latest norm, the yardstick for the next exploding warning (host floats, one per layer). Named
        # by its step: reports follow the logging schedule even without a logger, so "at an earlier log" misled.
        seen = snap.seen_steps if snap.seen_steps is not None else np.full(len(snap.layer_names), step)
        for name, norm, present, at in zip(snap.layer_names, snap.layer_norms, snap.present, seen):
            if present and math.isfinite(norm) and norm > 0:
                previous[name] = (int(at), float(norm))
        self._check_relapse(key, step, snap, opt)
        self._check_stall(key, step, snap, engine, opt, module)

    def stalled_since(self, key: int) -> int | None:
        """The step from which every optimizer step of ``key`` had non-finite gradients, up to its last report, once
        that run is long enough to have been warned about (``None``: it is not)."""
        state = self.stall.get(key)
        if state is None or state[2] is None or STALL_MARK not in self.warned.get(key, set()):
            return None
        return state[2][0]

    def _check_stall(
        self,
        key: int,
        step: int,
        snap: EngineSnapshot,
        engine: GuardEngine,
        opt: int | None,
        module: torch.nn.Module | None,
    ) -> None:
        """Warn, once per fit and optimizer, when every step for ``STALL_STEPS`` or more had non-finite gradients while
        the weights stayed finite: skipped each time, the run has stopped training, and the only warning was the
        first step's (user trial: one NaN batch left a running-mean buffer NaN, and 150 steps later the run ended with
        advice about its rate, cut seven times to no effect)."""
        steps, bad = engine.steps, snap.counts.get("nonfinite", 0)
        before = self.stall.get(key)
        if before is None and 0 < steps <= bad and steps <= step + 1:
            # Non-finite from the engine's first step, which was this fit's (not a refit's engine that goes on): the
            # run began there, not at this report.
            before = (0, 0, None)
        if before is None or steps < before[0] or bad < before[1]:
            self.stall[key] = (steps, bad, None)  # the first report of this engine's count: a baseline
            return
        last_steps, last_bad, run = before
        window = steps - last_steps
        if window == 0:
            return
        if bad - last_bad < window:
            self.stall[key] = (steps, bad, None)
            return
        run = run if run is not None else (step - window + 1, last_steps)
        self.stall[key] = (steps, bad, run)
        warned = self.warned.setdefault(key, set())
        since, steps_before = run
        if STALL_MARK in warned or steps - steps_before < STALL_STEPS:
            return
        warned.add(STALL_MARK)
        if self.broken_weights(key):
            return  # non-finite weights are the non-finite warning's subject
        which = f" of optimizer {opt}" if opt is not None else ""
        done = {"skip": "skipped", "zero": "its inf/NaN entries zeroed"}.get(self.guard.on_nonfinite, "left as it was")
        buffers = nan_buffers(module) if module is not None else []
        found = (
            f" The model's {'buffer' if len(buffers) == 1 else 'buffers'} "
            f"{_listing([repr(n) for n in buffers[: max(self.guard.max_warnings, 1)]], len(buffers))}"
            f" {'holds' if len(buffers) == 1 else 'hold'} NaN: the likely cause."
            if buffers
            else ""
        )
        # An infinite loss on every batch is the loss's own doing (no rate, no checkpoint cures it): a CTC loss on
        # targets that its inputs cannot align to gave +inf from step 0, and the run was restarted four times.
        loss = engine.last_loss()
        about_loss = (
            " The training loss is +inf: a loss that is infinite on some inputs gives it on every such batch (a CTC"
            " loss on a target its input is too short for: `CTCLoss(zero_infinity=True)` drops those samples; a log"
            " of 0 or of a probability that underflowed)."
            if loss == math.inf
            else ""
        )
        # A finite loss over NaN gradients points at the backward pass: a user trial's `torch.where` over NaN targets
        # skipped all 600 steps while the warning listed buffers, data and checkpoints.
        if loss is not None and math.isfinite(loss) and not buffers:
            about_loss = (
                f" The training loss is finite ({loss:.4g} at the last step), so unless the gradients' norm overflows"
                " (above), the inf/NaN arises in the backward pass: a NaN that the loss masks out still sends NaN back"
                " through the op that drops it (`torch.where(mask, (pred - y) ** 2, 0)` or `torch.nanmean` over NaN"
                " targets: replace the NaN in the targets first, e.g. `torch.nan_to_num(y)`, or index the observed"
                " entries), or an op whose gradient is infinite where its value is finite (`sqrt` of a sum of squares"
                " at 0)."
            )
        cuts = engine.host_counts.get("lr_reduced", 0)
        cut = f" (it was cut {cuts} time{'s' if cuts != 1 else ''})" if cuts else ""
        # Zeroing keeps the finite entries training; only skipped steps leave every weight where it is.
        skipped = self.guard.on_nonfinite == "skip"
        trained = "the model has not trained since" if skipped else "those entries have not trained since"
        still = ": the skipped steps leave the weights where they are" if skipped else ""
        rank_zero_warn(
            f"GradGuard: every optimizer step{which} since step {since} at the latest ({steps - steps_before} steps, up"
            f" to step {step}) had non-finite gradients, each {done}: {trained}. Its weights"
            " are finite, so the inf/NaN arises anew on every batch: in a buffer or running statistic that took one"
            " in (a running mean, a teacher's centre), in the data, in the loss, or from the weights themselves (an"
            " exp or a division that overflows on them: a variance a rate too high drove towards 0), or the gradients"
            " are finite and their norm is above about 1.8e19, whose square overflows float32 (a loss scaled far"
            f" up).{found}{about_loss} A lower learning rate alone does not cure that{cut}{still}. If the loss climbed"
            " before this, go back to a checkpoint from before the climb with a lower rate.",
            category=UserWarning,
        )

    def _check_relapse(self, key: int, step: int, snap: EngineSnapshot, opt: int | None) -> None:
        """Warn, once per fit and optimizer, when the loss has climbed back towards its starting level: a model that
        collapses late without a blown-up loss or an exploding gradient (a warm-up to too high a peak) is seen by
        nothing else."""
        progress = snap.loss_progress
        if progress is not None and math.isfinite(progress[0]):
            self.shares[key] = progress[0]
        else:
            self.shares.pop(key, None)
        warned = self.warned.setdefault(key, set())
        if RELAPSE_MARK in warned or self.guard.on_diverging == "ignore":
            return
        # No share (no loss since a restart or a new phase, or nothing learned yet) ends a hold as a low one does.
        if progress is None or not progress[0] >= RELAPSE_WARNING:
            self.relapsing.pop(key, None)
            return
        if step - self.relapsing.setdefault(key, step) < RELAPSE_HOLD:
            return
        warned.add(RELAPSE_MARK)
        share, mean, start, lowest = progress
        which = f" (optimizer {opt})" if opt is not None else ""
        rank_zero_warn(
            f"GradGuard: the training loss{which} has climbed back {share:.0%} of the way from its lowest running mean"
            f" {lowest:.4g} to its starting level {start:.4g} (its running mean after the first losses)"
            f"{', and past it' if share > 1 else ''}: its running mean is {mean:.4g} at step {step}. If the data did"
            " not change, the model is losing what it learned, and a learning rate too high for this stage of training"
            " is the usual cause (a warm-up to too high a peak, a rate raised mid-run): lower it. A change of the data"
            " gives back progress the same way (a new task or curriculum stage, label noise, more negatives for a"
            " contrastive loss, a critic's value loss growing with the returns), so the guard does not act on this."
            " Call `guard.new_phase()` where the data change to measure from there, or pass"
            " `GradGuard(on_diverging='ignore')`. `gradguard/loss_relapse` charts the share.",
            category=UserWarning,
        )

    def broken_weights(self, key: int) -> list[str]:
        """The layers of optimizer ``key`` whose weights hold inf/NaN now (reads the device)."""
        engine = self.guard._states.get(key)
        if engine is None:
            return []
        index = engine.index
        return nonfinite_weights(index.params, index.layer_of_param, index.names)

    def _weights_note(self, key: int) -> str:
        """Why every step is non-finite when the weights themselves are: the warning's second sentence, or ''."""
        bad = self.broken_weights(key)
        if not bad:
            return ""
        layers = "layer holds" if len(bad) == 1 else "layers hold"
        return (
            f" The weights themselves are non-finite now ({len(bad)} {layers} inf/NaN: "
            f"{_listing([repr(n) for n in bad[: max(self.guard.max_warnings, 1)]], len(bad))}): every later gradient"
            " will be too, and skipping steps cannot undo it. An optimizer step wrote them, or code that changes the"
            " weights in place (a SAM-style climb along a NaN gradient, a weight update in a hook); from finite"
            ' gradients an optimizer step does it usually in pure fp16 (`precision="16-true"`) with Adam, whose'
            " eps=1e-8 is 0 in fp16: use 16-mixed or bf16, or a larger eps."
        )

    def _message(
        self,
        kind: str,
        rows: list[dict[str, Any]],
        previous: dict[str, tuple[int, float]],
        opt: int | None,
        action: str,
    ) -> str:
        """One warning for the new ``rows`` of one kind: the worst layer first, then up to ``max_warnings`` in all
        (``opt``: the optimizer's key, named when there are several)."""
        guard = self.guard
        where = f" (optimizer {opt})" if opt is not None else ""

        def counted(row: dict[str, Any]) -> str:
            # Steps are Lightning's (a batch's, as its logged metrics); an optimizer stepping several times per batch
            # (manual optimization) or every few batches gets the count of its own steps as well.
            count = row["count"]
            if count is None:
                return ""
            return f"its step {count}" if opt is not None else f"optimizer step {count}"

        def ratio(row: dict[str, Any]) -> float:
            _, before = previous.get(row["layer"], (0, 0.0))
            return row["value"] / before if before and math.isfinite(row["value"]) else math.nan

        if kind == "exploding":  # the largest jump against the layer's norm at an earlier report, then the largest
            rows = sorted(
                rows,
                key=lambda r: (
                    (0, -ratio(r)) if math.isfinite(ratio(r)) else (1, -r["value"] if math.isfinite(r["value"]) else 0)
                ),
            )
        # Vanishing and non-finite rows stay in event order: earliest step, then definition order (the root cause).

        # The detector flags a norm against its running average, not against the one norm an earlier report saw: a
        # jump below its min_ratio from there explains nothing, and "0.916x its norm at step 349" under "exploding"
        # read as a contradiction (user trial: a learned quantization step whose norm had spiked at that report).
        telling = self.guard.exploding.min_ratio if self.guard.exploding is not None else 1.0

        def detail(row: dict[str, Any], lead: bool) -> str:
            if kind == "nonfinite":
                return ""
            text = f"norm {row['value']:.3g}"
            jump = ratio(row) if kind == "exploding" else math.nan
            if math.isfinite(jump) and jump >= telling:
                text += f" ({jump:.3g}x its norm at step {previous[row['layer']][0]})" if lead else f", {jump:.3g}x"
            return text

        # A non-finite step's action was taken (skip, zero, warn); an exploding one is answered by parts that act
        # depending on the step (see explode_action).
        action = {"nonfinite": f"; action: {action}", "exploding": f"; guarded by: {action}"}.get(kind, "")
        title, named = self._TITLES[kind], guard.max_warnings
        if named == 0:
            layers = "layer" if len(rows) == 1 else "layers"
            first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
            at = f"at step {first}" if first == last else f"at steps {first} to {last}"
            return f"GradGuard: {title} in {len(rows)} {layers} {at}{where}{action}."
        lead = rows[0]
        lead_detail = detail(lead, lead=True)
        lead_at = ", ".join(part for part in (f"optimizer {opt}" if opt is not None else "", counted(lead)) if part)
        message = f"GradGuard: {title} in layer {lead['layer']!r} at step {lead['step']}"
        message += f" ({lead_at})" if lead_at else ""
        message += f": {lead_detail}" if lead_detail else ""
        if len(rows) > 1:
            others = []
            for row in rows[1:named]:
                text = detail(row, lead=False)
                if row["step"] != lead["step"] or row["count"] != lead["count"]:
                    text += (", " if text else "") + f"at step {row['step']}"
                    text += f", {counted(row)}" if counted(row) else ""
                others.append(f"{row['layer']!r}" + (f" ({text})" if text else ""))
            layers = "layer" if len(rows) == 2 else "layers"
            message += f"; also in {len(rows) - 1} more {layers}" + (": " if others else "")
            message += _listing(others, len(rows) - 1)
        message += action + "."
        if kind == "vanishing":
            hint = self._saturation_hint(lead["layer"])
            if not hint and lead["value"] == 0.0:
                # Exactly zero with nothing saturated on the way (saturation can underflow to zero too): the loss
                # does not reach it. CLIP's logit scale clamped at 100 got advice for an ordinary ReLU instead.
                watched = self.guard._saturation is not None
                hint = (
                    "Its gradient norm is exactly zero in float32"
                    + (" and no watched activation is saturated" if watched else "")
                    + ": the loss does not depend on it at this point (a value clamped at its bound, a detached or"
                    " unused branch, a loss term weighted 0 for now by a schedule that switches it on later, or a loss"
                    " that is exactly 0 on these batches: a hinge or triplet margin that every example meets), or its"
                    " entries are below about 1e-22, whose squares underflow float32 (a loss scaled far down). "
                    + (
                        "Activations called as functions (`F.relu` in `forward`) are not watched: one that is 0 on"
                        " every input reads the same."
                        if watched
                        else "Activations are not watched (`saturation=False`): dead ones (0 on every input) read the"
                        " same."
                    )
                )
            if hint:
                message += " " + hint
        return message

    def explode_action(self, engine: GuardEngine, diverging: bool = False, at: int | None = None) -> str:
        """What ``engine`` does about an exploding step (or, with ``diverging``, a diverged loss) at its step ``at``
        (default: its latest), in words: its own parts, since an optimizer may go without some of GradGuard's (LBFGS
        is not clipped, an optimizer with ``lr=None`` has no LR guard)."""
        guard = self.guard
        if (guard.on_diverging if diverging else guard.on_exploding) == "raise":
            # The run stops at the event: what would answer it later does not matter.
            return f"{'on_diverging' if diverging else 'on_exploding'}='raise' stops the run"
        actions = []
        if engine.skip_exploding and not diverging:
            # As for clipping, a layer's spike under a calm total is not skipped: say what answers, not that it did.
            actions.append(
                "skipping the first flagged step of a stretch"
                if engine.skip_exploding == "first"
                else "skipping the flagged steps"
            )
        elif engine.clipper is not None and not diverging:
            # What the clipper does depends on the step (a layer's spike under a calm total is not clipped): say
            # which clipper answers, not that it clipped.
            actions.append(f"{type(engine.clipper).__name__} clipping")
        if engine.lr_guard is not None:
            lr_guard = engine.lr_guard
            if diverging or lr_guard.patience == 1:
                when = "now"
            elif lr_guard.cooldown == 0:
                when = f"at {lr_guard.patience} such events in a row"
            else:
                when = f"at {lr_guard.patience} such events within {lr_guard.cooldown} steps"
            bounded = engine.clipper is not None or engine.skip_exploding
            if lr_guard.spare_lone and lr_guard.patience > 1 and bounded and not diverging:
                when += " (a clipped spike alone among calm steps counts for nothing)"
            actions.append(
                f"the LR guard lowers the rate {when}"
                # Past its window the default rollback answers a diverging loss only: naming it for a late spike
                # promised a restart that could not come.
                + (
                    " (and the rollback, while it is on)"
                    if engine.rollback is not None
                    and engine.rollback.answers(engine.steps if at is None else at, diverging)
                    else ""
                )
            )
        return ", ".join(actions) or "none"

    def _saturation_hint(self, layer: str) -> str:
        fractions, monitor = self.guard._last_saturation, self.guard._saturation
        if not fractions or monitor is None:
            return ""
        # Half of a ReLU's outputs at 0 is ordinary; a dead layer has nearly all of them there.
        top = [
            (n, f)
            for n, f in monitor.most_saturated(fractions, upstream_of=layer)
            if f > (_DEAD_FRACTION if monitor.counts_dead_units(n) else 0.5)
        ]
        if not top:
            return ""
        listed = ", ".join(f"{n!r} ({f:.0%} saturated)" for n, f in top)
        dead_units = all(monitor.counts_dead_units(name) for name, _ in top)
        return f"Most saturated activations upstream: {listed}. {monitor.advice(dead_units)}"


#: The saturated fraction of a ReLU's outputs above which the vanishing warning names it (dead units).
_DEAD_FRACTION = 0.9


def _listing(named: list[str], total: int) -> str:
    """``'a' (x), 'b' (y) and 25 more``: the named items, then how many of ``total`` were left out."""
    rest = total - len(named)
    if not named:
        return ""
    if rest <= 0:
        return named[0] if len(named) == 1 else ", ".join(named[:-1]) + f" and {named[-1]}"
    return ", ".join(named) + f" and {rest} more"
