"""What several test files share: the host-sync recorder, a metrics-keeping logger, nested-state equality,
TensorBoard event readers, the synthetic layer names and the teardown of an in-process process group."""

from __future__ import annotations

import copy
import glob
import math
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The tests' in-memory logger, shared with the benchmarks (re-exported).
from benchmarks._common import MetricsLogger as MetricsLogger

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

# The tensor methods that copy a value to the host: on an accelerator each one waits for the device.
SYNC_METHODS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"})

# Twelve layers of a small transformer, in definition order: the layer names of the synthetic TensorBoard runs.
LAYERS = [
    "embed",
    "enc.0.attn",
    "enc.0.mlp",
    "enc.1.attn",
    "enc.1.mlp",
    "enc.2.attn",
    "enc.2.mlp",
    "enc.3.attn",
    "enc.3.mlp",
    "norm",
    "head.0",
    "head.1",
]


class SyncRecorder(TorchFunctionMode):
    """Records, by name and in order, each call of a method of ``SYNC_METHODS`` made while it is active.

    Args:
        calls: the list to append to (several recorders can share one); a new list when not given.

    Example:
        >>> with SyncRecorder() as recorder:
        ...     _ = torch.ones(1).item()
        >>> recorder.calls
        ['item']
    """

    def __init__(self, calls: list[str] | None = None) -> None:
        super().__init__()
        self.calls: list[str] = [] if calls is None else calls

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class RestartWatch(L.Callback):
    """Listed after a ``GradGuard``: records each step on which the guard rolled back, with whether the weights were
    then the initial ones and every gradient was dropped (the step skipped)."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.initial: list[torch.Tensor] = []
        self.restarts: list[tuple[int, bool]] = []
        self.before = 0  # rollbacks before this fit (a resumed run's)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = [p.detach().clone() for p in pl_module.parameters()]
        self.before = self.guard.summary()["rolled_back"]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.guard.summary()["rolled_back"] > self.before + len(self.restarts):
            params = list(pl_module.parameters())
            at_start = all(torch.equal(p, w) for p, w in zip(params, self.initial))
            skipped = all(p.grad is None for p in params)
            self.restarts.append((trainer.global_step + 1, at_start and skipped))


class ParamSnapshots(L.Callback):
    """Parameters and optimizer state (of the first optimizer) after every batch."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []
        self.opt_state: list[Any] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params.append([p.detach().clone() for p in pl_module.parameters()])
        self.opt_state.append(copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Asserts bitwise equality of nested state: dicts, lists, tuples, tensors and plain values, NaN equal to NaN.

    Tensors must agree in dtype and shape too; ``path`` names the part that differs in the assertion message.
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) if a.is_floating_point() else torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"


def event_files(root: str | Path) -> list[str]:
    """The TensorBoard event files anywhere below ``root``."""
    return glob.glob(f"{root}/**/events.out.tfevents.*", recursive=True)


def load_events(path: str | Path) -> EventAccumulator:
    """One event file, or the event files of one folder, read back: every scalar, image, histogram and tensor."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    everything = {ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}
    acc = ea.EventAccumulator(str(path), size_guidance=everything)
    acc.Reload()
    return acc


def custom_layout(acc: EventAccumulator) -> layout_pb2.Layout:
    """The custom-scalars layout of a run read by ``load_events``; it must have been written exactly once."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    return layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])


def scalar_series(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of ``path`` (as for ``load_events``): ``{tag: [(step, value), ...]}``."""
    acc = load_events(path)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def destroy_process_group(timeout_s: float = 60.0) -> None:
    """Tear down the default process group of a test that made one in this process.

    Now and then a gloo teardown never returns (pytorch/pytorch#75097; seen once in CI on torch 2.7, after the
    test had passed), and a pytest worker that waits for it stalls the whole suite. The teardown runs in a daemon
    thread: after ``timeout_s`` it is left to the process's exit, with a warning, and the later tests that need a
    fresh group skip themselves (they skip when one is already initialized).
    """
    dist = torch.distributed
    dist.barrier()  # no collective still in flight when the group goes
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
    teardown.start()
    teardown.join(timeout_s)
    if teardown.is_alive():
        warnings.warn(
            f"destroy_process_group did not return within {timeout_s:g} s; left to the process's exit", stacklevel=2
        )


class AddGroup(L.Callback):
    """At step ``at`` (counted from 1), gives the optimizer a new param group (a fine-tuning schedule's unfreeze)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step + 1 == self.at:
            # A parameter new to the model (the guard rebuilds its engine), last in `parameters()`.
            head = pl_module.net[-1]
            head.gate = nn.Parameter(torch.ones(()))
            trainer.optimizers[0].add_param_group({"params": [head.gate], "lr": 1e-3})
