"""Layer names read as in the plain model: torch.compile wrappers, parametrizations, parameters of the root module.

Issue 15, items 1-3. Unit tests on ``build_layer_index`` / ``SaturationMonitor`` / the regularizers' selection, and a
real ``Trainer.fit`` with ``GradGuard(log_every_n_steps=1)`` for each case. The compiled tests use the ``eager`` /
``aot_eager`` backends (the hooks are a dynamo matter; inductor only changes the kernels) and one the default backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from lightning_gradguard import GradGuard
from lightning_gradguard.layers import ROOT_LAYER, build_layer_index, module_sites, parameter_sites
from lightning_gradguard.regularize import L1, L2, Orthogonal
from lightning_gradguard.saturation import SaturationMonitor
from tests.helpers import MetricsLogger, destroy_process_group
from tests.models import Regressor, regression_data, trainer


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled-graph caches are per code object (``nn.Sequential.forward`` is shared by every test): start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid())


class Capture(MetricsLogger):
    """Keeps what GradGuard sends to the loggers."""

    def saturation(self) -> dict[int, dict[str, float]]:
        prefix = "gradguard/saturation/"
        # Keyed by optimizer step (1-based): Lightning logs the n-th optimizer step at step n - 1.
        return {
            step + 1: {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)}
            for step, m in self.rows
            if any(k.startswith("gradguard/") for k in m)
        }


class Plain(L.LightningModule):
    """A regressor whose training_step can be compiled whole (no Python-side state)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(model: Any, steps: int = 3, **guard_kwargs: Any) -> tuple[GradGuard, Capture]:
    guard = GradGuard(log_every_n_steps=guard_kwargs.pop("log_every_n_steps", 1), **guard_kwargs)
    logger = Capture()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(TensorBoardLogger|logging interval|LeafSpec).*")
        trainer(max_steps=steps, callbacks=[guard], logger=logger).fit(model, regression_data(n=64))
    return guard, logger


def _sat_net(dim: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 1))


# ---------------------------------------------------------------------- 1. torch.compile: names


def test_a_compiled_submodule_is_named_as_uncompiled() -> None:
    torch.manual_seed(0)
    plain = Holder(_mlp())
    expected = build_layer_index(plain)
    assert expected.names == ["net.0", "net.2", "head"]
    for compiled in (
        Holder(torch.compile(_mlp())),
        torch.compile(Holder(_mlp())),
        torch.compile(Holder(torch.compile(_mlp()))),
    ):
        index = build_layer_index(compiled)
        assert index.names == expected.names
        assert index.param_names == expected.param_names
        assert index.owner_types == expected.owner_types
        assert build_layer_index(compiled, group_depth=1).names == ["net", "head"]
        assert build_layer_index(compiled, group_fn=lambda n: n.split(".")[0]).names == ["net", "head"]
        assert [s.name for s in module_sites(compiled)] == ["", "net", "net.0", "net.1", "net.2", "net.3", "head"]
        assert SaturationMonitor(compiled).names == ["net.1", "net.3"]
    in_place = Holder(_mlp())
    in_place.net.compile()
    assert build_layer_index(in_place).names == expected.names
    # which modules run inside compiled code (their activations are then measured inside the graph)
    sites = {s.name: s for s in module_sites(Holder(torch.compile(_mlp())))}
    assert sites["net.1"].compiled and sites["net.1"].wrapper is not None and not sites["head"].compiled
    assert all(s.compiled for s in module_sites(torch.compile(Holder(_mlp()))))
    assert all(s.compiled for s in module_sites(in_place) if s.name.startswith("net"))


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-process gloo group, for wrapping a module in DistributedDataParallel in this process."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_process_group()


def test_plain_loop_wrappers_are_looked_through(process_group: None) -> None:
    # DataParallel, DistributedDataParallel and Fabric's setup() (of `lightning` and of the standalone
    # `lightning_fabric`) wrap the model a plain loop hands to GuardEngine.
    from lightning.fabric import Fabric

    standalone = pytest.importorskip("lightning_fabric")
    torch.manual_seed(0)
    expected = build_layer_index(Holder(_mlp()))
    for wrapped in (
        nn.DataParallel(Holder(_mlp())),
        nn.parallel.DistributedDataParallel(Holder(_mlp())),
        Fabric(accelerator="cpu", devices=1).setup_module(Holder(_mlp())),
        standalone.Fabric(accelerator="cpu", devices=1).setup_module(Holder(_mlp())),
        nn.parallel.DistributedDataParallel(torch.compile(Holder(_mlp()))),
    ):
        index = build_layer_index(wrapped)
        assert index.names == expected.names, type(wrapped).__name__
        assert index.param_names == expected.param_names
        assert [s.name for s in module_sites(wrapped)] == ["", "net", "net.0", "net.1", "net.2", "net.3", "head"]
        assert SaturationMonitor(wrapped).names == ["net.1", "net.3"]
        assert L2(1e-3, modules=r"^net\.0$").bind(wrapped) == ["net.0.weight"]


def test_regularizer_selection_under_compile_uses_the_plain_names() -> None:
    reg = L2(1e-3, modules=r"^net\.0$")
    assert reg.bind(Holder(torch.compile(_mlp()))) == ["net.0.weight"]
    assert L2(1e-3).bind(torch.compile(Holder(_mlp()))) == ["net.0.weight", "net.2.weight", "head.weight"]


# ---------------------------------------------------------------------- 1. torch.compile: saturation


def _reference(net: nn.Sequential, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        h1 = torch.tanh(net[0](x))
        h3 = torch.sigmoid(net[2](h1))
    return {"net.1": float((h1.abs() > 0.5).float().mean()), "net.3": float(((h3 < 0.25) | (h3 > 0.75)).float().mean())}


def test_saturation_is_measured_inside_a_compiled_submodule(fresh_dynamo: None) -> None:
    torch.manual_seed(0)
    inner = _mlp()
    model = Holder(torch.compile(inner, backend="eager"))
    thresholds = dict(tanh_threshold=0.5, sigmoid_low=0.25, sigmoid_high=0.75)
    for _ in range(2):  # a second monitor (a second fit) takes the hooks over
        monitor = SaturationMonitor(model, **thresholds)
        for step in range(5):
            x = torch.randn(8, 3) * (step + 1)
            armed = step % 2 == 0  # armed, quiet, armed, ...: the graph without the measurement in between
            micro = 2 if step == 2 else 1  # gradient accumulation: several forward passes per measurement
            if armed:
                monitor.arm()
            expected: list[dict[str, float]] = []
            for k in range(micro):
                model(x + k).sum().backward()
                expected.append(_reference(inner, x + k))
            if armed:
                got = {name: float(v) for name, v in monitor.disarm().items()}
                assert got == pytest.approx({n: sum(e[n] for e in expected) / micro for n in ("net.1", "net.3")})
            assert monitor.disarm() == {}
    # one hook per activation module, however many monitors: the compiled graphs stay valid
    assert [len(m._forward_hooks) for m in inner] == [0, 1, 0, 1]
    assert not monitor.armed


def test_saturation_compiled_before_the_monitor_is_reported_once(fresh_dynamo: None) -> None:
    model = Holder(torch.compile(_mlp(), backend="eager"))
    model(torch.randn(2, 3))  # the graph is built before any hook exists
    monitor = SaturationMonitor(model)
    monitor.arm()
    model(torch.randn(2, 3))
    with pytest.warns(UserWarning, match=r"`net` ran under torch.compile without the forward hooks .*net\.1, net\.3"):
        assert monitor.disarm() == {}
    monitor.arm()
    model(torch.randn(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.disarm() == {}  # said once
    torch._dynamo.reset()  # the remedy the warning names
    monitor.arm()
    model(torch.randn(2, 3))
    assert sorted(monitor.disarm()) == ["net.1", "net.3"]


def test_a_compiled_module_run_only_without_gradients_is_no_missed_measurement(fresh_dynamo: None) -> None:
    """A frozen compiled teacher runs under no_grad: the probes skip such passes, so it must not be reported as
    compiled before the hooks (a warning whose cause and remedy would both be wrong)."""
    model = Holder(torch.compile(_mlp(), backend="eager"))
    monitor = SaturationMonitor(model)
    monitor.arm()
    with torch.no_grad():
        model(torch.randn(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.disarm() == {}


def test_copies_of_a_compiled_model_get_inert_hooks(fresh_dynamo: None) -> None:
    import copy
    import pickle

    inner = _mlp()
    model = Holder(torch.compile(inner, backend="eager"))
    monitor = SaturationMonitor(model)
    monitor.arm()
    for clone in (copy.deepcopy(inner), pickle.loads(pickle.dumps(inner))):
        hooks = [hook for m in clone for hook in m._forward_hooks.values()]
        assert len(hooks) == 2 and all(not hook.active and hook.rule is None for hook in hooks)
        clone(torch.randn(2, 3))  # runs eagerly: the copied hooks do nothing
        assert all(hook.total is None for hook in hooks)
    model(torch.randn(2, 3))
    assert sorted(monitor.disarm()) == ["net.1", "net.3"]


def test_fit_with_a_compiled_submodule(fresh_dynamo: None) -> None:
    torch.manual_seed(0)
    guard, logger = _fit(Regressor(torch.compile(_sat_net(), backend="aot_eager")))
    assert guard.layer_names() == ["net.0", "net.2"]
    saturation = logger.saturation()
    assert sorted(saturation) == [1, 2, 3]
    assert all(set(row) == {"net.1"} and 0.0 <= row["net.1"] <= 1.0 for row in saturation.values())


def test_fit_with_a_compiled_lightning_module(fresh_dynamo: None) -> None:
    # Lightning unwraps torch.compile(module) (from_compiled) and compiles training_step: every module runs compiled.
    torch.manual_seed(0)
    model = Plain(_sat_net())
    guard, logger = _fit(torch.compile(model, backend="eager"), steps=4, log_every_n_steps=2)
    assert guard.layer_names() == ["net.0", "net.2"]
    saturation = logger.saturation()
    assert sorted(saturation) == [2, 4]  # measured on both logging steps, not in between
    assert all(set(row) == {"net.1"} for row in saturation.values())
    assert [len(m._forward_hooks) for m in model.net] == [0, 1, 0]


def test_fit_with_a_compiled_submodule_default_backend(fresh_dynamo: None) -> None:
    torch.manual_seed(0)
    guard, logger = _fit(Regressor(torch.compile(_sat_net())), steps=1)  # inductor
    assert guard.layer_names() == ["net.0", "net.2"]
    assert set(logger.saturation()[1]) == {"net.1"}


# ---------------------------------------------------------------------- 2. parametrizations


class LoRA(nn.Module):
    """A parametrization with its own parameters: W + B @ A."""

    def __init__(self, rows: int, cols: int, rank: int = 2) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, cols) * 0.1)
        self.B = nn.Parameter(torch.zeros(rows, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A


def _parametrized() -> nn.Sequential:
    lora = nn.Linear(4, 4)
    parametrize.register_parametrization(lora, "weight", LoRA(4, 4))
    return nn.Sequential(
        P.weight_norm(nn.Linear(3, 16)),
        nn.Tanh(),
        P.spectral_norm(nn.Linear(16, 4)),
        P.orthogonal(nn.Linear(4, 4)),
        lora,
        nn.Linear(4, 1),
    )


def test_a_parametrized_module_is_one_layer() -> None:
    net = _parametrized()
    index = build_layer_index(net)
    assert index.names == ["0", "2", "3", "4", "5"]
    layer = dict(zip(index.param_names, (index.names[i] for i in index.layer_of_param)))
    assert layer == {
        "0.bias": "0",
        "0.parametrizations.weight.original0": "0",
        "0.parametrizations.weight.original1": "0",
        "2.bias": "2",
        "2.parametrizations.weight.original": "2",
        "3.bias": "3",
        "3.parametrizations.weight.original": "3",
        "4.bias": "4",
        "4.parametrizations.weight.original": "4",
        "4.parametrizations.weight.0.A": "4",
        "4.parametrizations.weight.0.B": "4",
        "5.weight": "5",
        "5.bias": "5",
    }
    assert all(issubclass(t, nn.Linear) for t in index.owner_types)  # the parametrized module owns them
    assert build_layer_index(nn.Sequential(net), group_depth=2).names == ["0.0", "0.2", "0.3", "0.4", "0.5"]
    # the modules that implement a parametrization are no activations of the network
    assert [s.name for s in module_sites(net)] == ["", "0", "1", "2", "3", "4", "5"]
    assert SaturationMonitor(net).names == ["1"]
    kinds = {s.name: s.kind for s in parameter_sites(net)}
    assert kinds["0.parametrizations.weight.original0"] == "weight_norm.g"
    assert kinds["0.parametrizations.weight.original1"] == "weight_norm.v"
    assert kinds["2.parametrizations.weight.original"] == "spectral_norm"
    assert kinds["3.parametrizations.weight.original"] == "orthogonal"
    assert kinds["4.parametrizations.weight.original"] == "parametrized"
    assert kinds["4.parametrizations.weight.0.A"] == "parametrization"


def test_parametrized_root_and_legacy_weight_norm() -> None:
    root = P.weight_norm(nn.Linear(3, 2))
    assert build_layer_index(root).names == ["bias", "weight"]  # the root's tensors, by attribute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.utils.spectral_norm(nn.Linear(4, 2)))
    assert build_layer_index(legacy).names == ["0", "1"]
    assert L2(1.0).bind(legacy) == ["0.weight_g", "1.weight_orig"]
    assert Orthogonal(1.0).bind(legacy) == ["0.weight_v", "1.weight_orig"]


def test_regularizers_select_what_the_parametrized_weight_is_made_of() -> None:
    net = _parametrized()
    # weight_norm: L1/L2 on the magnitude g, Orthogonal on the direction v; spectral_norm: the raw weight;
    # orthogonal: nothing; other parametrizations: their originals and own parameters, as ordinary parameters.
    others = ["4.parametrizations.weight.original", "4.parametrizations.weight.0.A", "4.parametrizations.weight.0.B"]
    l2 = ["0.parametrizations.weight.original0", "2.parametrizations.weight.original", *others, "5.weight"]
    assert L2(1.0).bind(net) == l2
    assert L1(1.0).bind(net) == l2
    # Not the head's [1, 4] weight: a vector in matrix shape.
    orth = ["0.parametrizations.weight.original1", "2.parametrizations.weight.original", *others]
    assert Orthogonal(1.0).bind(net) == orth
    # `modules` matches the weight's own name as well as the real one; biases stay out
    assert L2(1.0, modules=r"^0\.weight$").bind(net) == ["0.parametrizations.weight.original0"]
    with pytest.raises(ValueError, match="selected no parameter"):
        L2(1.0, modules=r"original1").bind(net)  # v is no L2 target
    with pytest.raises(ValueError, match="selected no parameter"):
        L2(1.0).bind(nn.Sequential(P.orthogonal(nn.Linear(4, 4, bias=False))))
    # g is a weight whatever its shape (0-d with dim=None)
    assert L2(1.0).bind(P.weight_norm(nn.Linear(3, 4), dim=None)) == ["parametrizations.weight.original0"]


@pytest.mark.parametrize("dim", [0, 1, None])
def test_l2_on_weight_norm_is_the_exact_l2_of_the_weight(dim: int | None) -> None:
    torch.manual_seed(0)
    layer = P.weight_norm(nn.Conv2d(3, 5, 3), dim=dim)
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(3.0)
    reg = L2(0.7)
    reg.bind(layer)
    want = 0.35 * layer.weight.pow(2).sum()  # 0.7 / 2 * ||W||^2 of the weight the module uses
    assert float(reg.penalty().detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    want_g, want_v = torch.autograd.grad(want, [g, v])
    reg.add_grad_()
    torch.testing.assert_close(g.grad, want_g, rtol=1e-5, atol=1e-6)
    assert v.grad is None and float(want_v.abs().max()) < 1e-5  # the direction gets no gradient: none is added

    l1 = L1(1.0)
    l1.bind(layer)
    # sum |g|: the sum of the norms of W's slices along `dim` (group lasso)
    keep = (dim,) if dim is not None else ()
    other = tuple(d for d in range(4) if d not in keep)
    row_norms = layer.weight.detach().pow(2).sum(dim=other).sqrt() if dim is not None else layer.weight.detach().norm()
    assert float(l1.penalty().detach()) == pytest.approx(float(row_norms.sum()), rel=1e-5)


def test_orthogonal_on_weight_norm_penalizes_the_direction_exactly() -> None:
    torch.manual_seed(0)
    layer = P.weight_norm(nn.Linear(6, 4))
    v = layer.parametrizations.weight.original1
    reg = Orthogonal(0.5)
    assert reg.bind(layer) == ["parametrizations.weight.original1"]
    gram = v @ v.T
    want = 0.5 * (gram - torch.eye(4)).pow(2).sum()
    assert float(reg.penalty().detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    (want_v,) = torch.autograd.grad(want, [v])
    reg.add_grad_()
    torch.testing.assert_close(v.grad, want_v, rtol=1e-4, atol=1e-6)


def test_fit_with_parametrized_layers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        P.weight_norm(nn.Linear(16, 32)), nn.Tanh(), P.spectral_norm(nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 1)
    )
    l2, orth = L2(1e-3), Orthogonal(1e-3)
    guard, logger = _fit(Regressor(net), regularizers=[l2, orth])
    assert guard.layer_names() == ["net.0", "net.2", "net.4"]
    assert l2.param_names == [
        "net.0.parametrizations.weight.original0",
        "net.2.parametrizations.weight.original",
        "net.4.weight",
    ]
    assert orth.param_names[0] == "net.0.parametrizations.weight.original1"
    assert set(logger.saturation()[3]) == {"net.1", "net.3"}
    assert all("gradguard/reg/l2" in m for _, m in logger.rows)


# ---------------------------------------------------------------------- 3. parameters of the root module


class Scaled(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def test_a_root_parameter_is_named_by_its_attribute() -> None:
    model = Scaled()
    index = build_layer_index(model)
    assert index.names == ["scale", "net.0", "net.2"]
    assert ROOT_LAYER not in index.names
    assert build_layer_index(model, group_depth=1).names == ["scale", "net"]
    assert build_layer_index(torch.compile(model)).names == ["scale", "net.0", "net.2"]
    two = nn.Module()
    two.a, two.b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    assert build_layer_index(two).names == ["a", "b"]  # each its own layer


def test_fit_with_a_root_parameter() -> None:
    torch.manual_seed(0)
    guard, _ = _fit(Scaled())
    assert guard.layer_names() == ["scale", "net.0", "net.2"]
