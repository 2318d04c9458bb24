"""Both Lightning packages: ``lightning.pytorch`` (from ``pip install lightning``) and ``pytorch_lightning``.

Lightning ships one Trainer under two names. Their classes are distinct objects, so ``isinstance(logger,
lightning.pytorch.loggers.TensorBoardLogger)`` is false for a ``pytorch_lightning`` TensorBoardLogger, and
``pytorch_lightning``'s LightningCLI rejects a callback that is not its own ``Callback``. GradGuard is therefore a
``Callback`` of every installed package (:data:`CallbackBase`), and each check of a Lightning class goes through
:func:`lightning_types`, which accepts the class of either package.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_gradguard._host import host_rate

__all__ = [
    "CallbackBase",
    "grad_scaler",
    "is_lightning_class",
    "lightning_types",
    "loss_scale",
    "overrides_hook",
    "rank_zero_warn",
    "restart_weight_averages",
]

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_PREFIXES = tuple(f"{package}." for package in PACKAGES)


@rank_zero_only
def rank_zero_warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Lightning's ``rank_zero_warn`` without Python's memory of what a code location has said: each call is shown,
    unless a filter ignores it or turns it into an error. GradGuard says each thing once per fit itself, and Python's
    default filter also hid a later fit's warning whose text matched an earlier one's (a hyperparameter search that
    tried one setup four times in one process saw its three warnings in the first trial only)."""
    caller = sys._getframe(2)  # past rank_zero_only's wrapper: where GradGuard warns, as Lightning's names it
    warnings.warn_explicit(
        message,
        category,
        caller.f_code.co_filename,
        caller.f_lineno,
        module=caller.f_globals.get("__name__"),
        registry=None,
        module_globals=caller.f_globals,
    )


def is_lightning_class(cls: type) -> bool:
    """Whether ``cls`` is defined in either Lightning package (Lightning's own, not a user's subclass)."""
    return cls.__module__.startswith(_PREFIXES)


def _standalone() -> ModuleType | None:
    """``pytorch_lightning`` when it is installed (imported here if it was not: 0.3 s after ``lightning``)."""
    try:
        import pytorch_lightning
    except Exception:  # not installed, or an install that fails to import: GradGuard must not fail with it
        return None
    return pytorch_lightning


def _callback_base() -> type:
    standalone = _standalone()
    if standalone is None:
        return Callback

    class _Callback(Callback, standalone.Callback):  # type: ignore[name-defined]
        """A Callback to the Trainers of both Lightning packages (their hooks are the same)."""

    return _Callback


if TYPE_CHECKING:
    CallbackBase = Callback
else:
    CallbackBase = _callback_base()


def lightning_types(path: str) -> tuple[type, ...]:
    """The class ``path`` (relative to the package, e.g. ``"loggers.TensorBoardLogger"``) of every Lightning package
    already imported: a Trainer of a package that was never imported cannot hold its objects.

    Example:
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> TensorBoardLogger in lightning_types("loggers.TensorBoardLogger")
        True
    """
    module_path, _, name = path.rpartition(".")
    found: list[type] = []
    for package in PACKAGES:
        if package not in sys.modules:
            continue
        try:
            value: Any = getattr(importlib.import_module(f"{package}.{module_path}"), name)
        except (ImportError, AttributeError):  # a class that this package's version does not have
            continue
        if isinstance(value, type):
            found.append(value)
    return tuple(found)


def overrides_hook(instance: Any, name: str) -> bool:
    """Whether ``instance``'s class overrides the ``LightningModule`` method ``name`` (either package's module).

    Lightning's own ``is_overridden`` resolves the base class in ``lightning.pytorch`` only and raises for a
    ``pytorch_lightning`` module.

    Example:
        >>> import lightning as L
        >>> class Module(L.LightningModule):
        ...     def configure_gradient_clipping(self, *args, **kwargs): ...
        >>> overrides_hook(Module(), "configure_gradient_clipping"), overrides_hook(Module(), "on_fit_start")
        (True, False)
    """
    cls = type(instance)
    for base in cls.__mro__:
        if base.__name__ == "LightningModule" and is_lightning_class(base):
            return getattr(cls, name, None) is not getattr(base, name, None)
    return False


def grad_scaler(trainer: Any) -> Any:
    """The trainer's ``GradScaler`` (16-bit AMP), or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def loss_scale(scaler: Any) -> Tensor | None:
    """A GradScaler's current scale (the factor in the backward pass's gradients) as its device tensor, or ``None``
    (no scaler, or one that has not scaled yet)."""
    return scaler._scale if scaler is not None and getattr(scaler, "_scale", None) is not None else None


#: The most tensors of a batch whose first dimensions :func:`batch_size` compares (a batch of many images, a list
#: of per-sample tensors, is not walked to its end every step).
_SIZE_PROBES = 32


def _probed_tensors(batch: Any) -> Iterator[Tensor]:
    """The first ``_SIZE_PROBES`` tensors of ``batch`` with at least one dimension, in order (nested in mappings,
    lists, tuples and dataclasses; other iterables are not entered: a generator would be consumed)."""
    probes = 0
    stack = [batch]
    while stack and probes < _SIZE_PROBES:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.dim() > 0:
                probes += 1
                yield item
        elif isinstance(item, Mapping):  # a dict, or a UserDict such as Hugging Face's BatchEncoding
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(reversed([getattr(item, field.name) for field in dataclasses.fields(item)]))


def batch_size(batch: Any) -> int | None:
    """The batch size of ``batch``: the first dimension that its tensors (nested in mappings, lists, tuples and
    dataclasses) share, or ``None`` when it holds none or they disagree. A sequence batch in PyTorch's default
    time-major layout (``pad_sequence``, ``nn.LSTM``: inputs ``(T, B, ...)``) beside targets ``(B,)`` has no shared
    first dimension, and its length ``T`` is no number of examples: read as one, sequences bucketed by length looked
    like batch-size changes, and the statistics started again every few steps. A 0-d tensor (a scalar field beside
    the data) is passed over. Host-side only: shapes, never values; the first ``_SIZE_PROBES`` tensors are
    compared."""
    return layout_batch_size(batch_layout(batch))


def batch_layout(batch: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``batch``'s first ``_SIZE_PROBES`` tensors (host-side: shapes, never values). A curriculum that
    lengthens its sequences, or resizes its images, changes it for good at each stage."""
    return tuple(tuple(tensor.shape) for tensor in _probed_tensors(batch))


def layout_batch_size(layout: tuple[tuple[int, ...], ...]) -> int | None:
    """:func:`batch_size` of a batch whose :func:`batch_layout` is ``layout``."""
    sizes = {shape[0] for shape in layout}
    return sizes.pop() if len(sizes) == 1 else None


def same_batch_size_on_every_rank(trainer: Any) -> bool:
    """Whether every process trains on batches of the same size: one process, or Lightning's distributed sampler
    (which gives each process an equal share) over map-style data in batches of a fixed size. A batch sampler of the
    user's own (bucketing, dynamic batches) or an iterable data set may size each process's batches differently."""
    if getattr(trainer, "world_size", 1) <= 1:
        return True
    connector = getattr(trainer, "_accelerator_connector", None)
    if not getattr(connector, "use_distributed_sampler", False):
        return False
    loaders = _loaders(getattr(trainer, "train_dataloader", None))
    return bool(loaders) and all(
        loader.batch_size is not None and not isinstance(loader.dataset, IterableDataset) for loader in loaders
    )


def _loaders(iterables: Any) -> list[DataLoader]:
    """The DataLoaders in Lightning's ``train_dataloader`` (one, or nested in mappings, lists and tuples)."""
    if isinstance(iterables, DataLoader):
        return [iterables]
    if isinstance(iterables, Mapping):
        iterables = list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        return [loader for item in iterables for loader in _loaders(item)]
    return []


def restart_weight_averages(trainer: Any) -> list[str]:
    """Make the averages of Lightning's weight-averaging callbacks (``EMAWeightAveraging`` and the other
    ``WeightAveraging`` callbacks, ``StochasticWeightAveraging``) start again from the model's current weights, and
    return the names of the callbacks restarted.

    Called after a rollback: the average holds the weights the rollback abandoned, which an EMA carries for thousands
    of steps (a share of ``decay ** n`` after ``n`` more), and for ever if they held a NaN. Each of these averages
    copies the model's weights at its next update when its count of averaged models is 0.
    """
    restarted: list[str] = []
    for callback in trainer.callbacks:
        if isinstance(callback, lightning_types("callbacks.WeightAveraging")):
            count = getattr(getattr(callback, "_average_model", None), "n_averaged", None)
        elif isinstance(callback, lightning_types("callbacks.StochasticWeightAveraging")):
            count = getattr(callback, "n_averaged", None)  # None until averaging has begun: nothing to restart
        else:
            continue
        if isinstance(count, Tensor):
            count.zero_()
            restarted.append(type(callback).__name__)
    return restarted


def swa_rates(trainer: Any, optimizer: Any) -> list[float | None] | None:
    """The rate of each param group of ``optimizer`` (the ``initial_lr`` it writes) of a ``StochasticWeightAveraging``
    callback that trains it now, from its start epoch on; ``None`` when none does (one reused from an earlier fit
    keeps its flag, so the epoch is checked too)."""
    swa = lightning_types("callbacks.StochasticWeightAveraging")
    for callback in trainer.callbacks:
        start = getattr(callback, "swa_start", None) if isinstance(callback, swa) else None
        if getattr(callback, "_initialized", False) and start is not None and start <= trainer.current_epoch:
            return [host_rate(group.get("initial_lr")) for group in optimizer.param_groups]
    return None
