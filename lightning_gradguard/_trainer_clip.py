"""``Trainer(gradient_clip_val=...)`` next to GradGuard: folded into GradGuard's own clipping, so that the logged
``clip_coef``, ``clip_threshold`` and ``events/clipped`` describe the gradients the optimizer receives.

Lightning clips in ``configure_gradient_clipping``, after every ``on_before_optimizer_step`` hook, so GradGuard would
log its own coefficient while the optimizer received gradients clipped once more. For clipping by norm, chaining
``clip_grad_norm_(val)`` after the guard's clipper clips to ``min(guard threshold, val)``: GradGuard's engines take
``val`` as their ``max_norm`` and Lightning's clipping is switched off for the fit (restored at teardown). Clipping by
value cannot be folded into a norm coefficient (a clamp of each entry changes the gradient's direction), so it stays
Lightning's and a warning says precisely what the logs then describe. So does any clipping with a gradient hook that
runs after GradGuard's (the module's ``on_before_optimizer_step``, a callback listed after GradGuard): Lightning's
bound holds for what such a hook leaves, GradGuard's would not.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard._lightning import is_lightning_class, overrides_hook, rank_zero_warn
from lightning_gradguard.clip import Clipper

__all__ = ["restore_clipping", "take_over_clipping"]

_ATTRIBUTE = "_gradguard_gradient_clip_val"  # where the Trainer keeps the value it was given while GradGuard holds it


def _algorithm(trainer: Any) -> str:
    algorithm = getattr(trainer, "gradient_clip_algorithm", None)
    return str(getattr(algorithm, "value", algorithm) or "norm").lower()


def take_over_clipping(trainer: Any, pl_module: Any, clip: Clipper | None, later: list[str]) -> float | None:
    """Fold ``Trainer(gradient_clip_val=...)`` into GradGuard's clipping where that is exact; warn where it is not.

    Args:
        trainer: The Trainer of the fit.
        pl_module: Its LightningModule.
        clip: GradGuard's clipper.
        later: The hooks that run between GradGuard's and Lightning's clipping and may change the gradients (the
            module's ``on_before_optimizer_step``, callbacks listed after GradGuard), named for the message.

    Returns:
        The norm bound GradGuard's engines take over (``GuardEngine(max_norm=...)``), or ``None``.
    """
    val = getattr(trainer, _ATTRIBUTE, None) or trainer.gradient_clip_val  # a second fit of the same Trainer
    if not val:
        return None
    if not getattr(pl_module, "automatic_optimization", True):
        return None  # Lightning refuses gradient_clip_val under manual optimization itself
    clipping = f"`Trainer(gradient_clip_val={val})`"
    before = (
        "GradGuard's total_norm, clip_coef, clip_threshold and events/clipped describe the gradients before that"
        " clipping" + ("." if clip is None else "; the optimizer receives gradients clipped by both.")
    )
    # Without a clipper of GradGuard's nothing clips twice: a line, not a warning.
    say = rank_zero_info if clip is None else rank_zero_warn
    if overrides_hook(pl_module, "configure_gradient_clipping"):
        rank_zero_warn(
            f"GradGuard: {clipping} goes to the LightningModule's own `configure_gradient_clipping`, which runs after"
            f" GradGuard's hook: clipping happens twice if it clips. {before}"
        )
        return None
    if later:
        # A user's noise injection there reached the optimizer at norm 22 under a bound of 1.0 once GradGuard had
        # taken the bound over (user trial): Lightning clips after every hook, so it keeps the bound.
        said = (
            f"GradGuard: {clipping} stays Lightning's, which clips after {' and '.join(later)}: they run after"
            " GradGuard's hook and may change the gradients (one that only reads them counts too), so only"
            f" Lightning's clipping bounds what the optimizer receives. {before} On a step GradGuard skips (a"
            " non-finite or, with skip_exploding, a flagged one), every gradient those hooks see is None."
        )
        say(said if clip is None else f"{said} Clipping happens twice when GradGuard clips too: set one of them.")
        return None
    if _algorithm(trainer) == "value":
        twice = "" if clip is None else " (clipping happens twice when GradGuard clips too)"
        say(
            f"GradGuard: {clipping[:-2]}, gradient_clip_algorithm='value')` clamps every gradient entry to"
            f" [-{val}, {val}] after GradGuard's hook{twice}. A clamp changes the gradient's direction, so no norm"
            f" coefficient can describe it: {before}"
        )
        return None
    if clip is not None and (not clip.takes_cap or getattr(clip, "norm_type", 2.0) != 2.0):
        rank_zero_warn(
            f"GradGuard clips gradients with {type(clip).__name__} and {clipping} clips their L2 norm again after it:"
            f" clipping happens twice. {before} Set one of them."
        )
        return None
    setattr(trainer, _ATTRIBUTE, val)
    trainer.gradient_clip_val = None
    if clip is not None:
        rank_zero_warn(
            f"GradGuard clips gradients and {clipping} would clip them again after it (clipping happens twice):"
            f" GradGuard takes it over and clips to min(its clipper's threshold, {val}) once, so its logs describe"
            " what the optimizer receives. Set one of them to silence this."
        )
    else:
        rank_zero_info(
            f"GradGuard: takes over {clipping} (clipping by norm, as Lightning would) so that its clip_coef,"
            " clip_threshold and events/clipped describe what the optimizer receives; Lightning clips nothing more."
        )
    return float(val)


def restore_clipping(trainer: Any) -> None:
    """Give the Trainer back the ``gradient_clip_val`` that :func:`take_over_clipping` took (at the end of a fit)."""
    val = getattr(trainer, _ATTRIBUTE, None)
    if val is not None:
        trainer.gradient_clip_val = val
        delattr(trainer, _ATTRIBUTE)


def later_hooks(pl_module: Any, clipping_hook: bool = True) -> list[str]:
    """The LightningModule's own hooks that Lightning runs after GradGuard's and that may change the gradients (a
    module that clips or scales them itself), as ``"`name`"``: ``on_before_optimizer_step``, and, under automatic
    optimization and with ``clipping_hook``, ``configure_gradient_clipping``."""
    hooks = ["on_before_optimizer_step"]
    if clipping_hook and getattr(pl_module, "automatic_optimization", True):
        hooks.append("configure_gradient_clipping")  # called by Lightning under automatic optimization only
    return [f"`{hook}`" for hook in hooks if overrides_hook(pl_module, hook)]


def gradient_callbacks(trainer: Any, guard: Any) -> tuple[list[str], list[str]]:
    """The names of the other callbacks with an ``on_before_optimizer_step`` of their own (not Lightning's), that
    Lightning runs before and after ``guard``'s: they may clip or scale the gradients GradGuard judges."""
    before: list[str] = []
    after: list[str] = []
    seen = False
    for callback in trainer.callbacks:
        if callback is guard:
            seen = True
            continue
        owner = next((c for c in type(callback).__mro__ if "on_before_optimizer_step" in vars(c)), None)
        if owner is None or is_lightning_class(owner):
            continue
        (after if seen else before).append(type(callback).__name__)
    return before, after
