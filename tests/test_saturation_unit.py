"""Unit tests for SaturationMonitor in plain torch (no Lightning)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_gradguard.saturation import SaturationMonitor
from tests.helpers import SyncRecorder


def _measure(monitor: SaturationMonitor, net: nn.Module, *inputs) -> dict[str, float]:
    monitor.arm()
    net(*inputs)
    return {name: float(value) for name, value in monitor.disarm().items()}


def _no_hooks_left(net: nn.Module) -> bool:
    return all(not m._forward_hooks for m in net.modules())


def test_saturated_sigmoid_and_tanh_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1), nn.Sigmoid())
    monitor = SaturationMonitor(net)
    assert monitor.names == ["1", "3", "5"]
    x = torch.randn(64, 10)
    healthy = _measure(monitor, net, x)
    assert healthy["1"] < 0.1 and healthy["3"] < 0.1

    nn.init.normal_(net[0].weight, std=30.0)  # pre-activations with a std of about 100
    nn.init.normal_(net[2].weight, std=30.0)
    saturated = _measure(monitor, net, x)
    assert saturated["1"] > 0.9
    assert saturated["3"] > 0.9


def test_dead_relu_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
    with torch.no_grad():
        net[0].bias.zero_()
        net[2].bias.fill_(-100.0)
    fractions = _measure(SaturationMonitor(net), net, torch.randn(128, 10))
    assert fractions["1"] == pytest.approx(0.5, abs=0.05)
    assert fractions["3"] == 1.0


def test_rules_for_hardtanh_relu6_hardsigmoid_and_thresholds():
    x = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 7.0, 2.0])
    cases = [
        (nn.Hardtanh(), 5 / 8),  # -5, -1 at the clamp -1; 1, 7, 2 at the clamp 1
        (nn.ReLU6(), 5 / 8),  # -5, -1, -0.5, 0 give 0; 7 gives 6
        (nn.Hardsigmoid(), 2 / 8),  # -5 gives 0, 7 gives 1
        (nn.ReLU(), 4 / 8),
    ]
    for act, expected in cases:
        fractions = _measure(SaturationMonitor(act), act, x)
        assert fractions == {"(root)": pytest.approx(expected)}, type(act).__name__

    sig = nn.Sigmoid()
    logits = torch.tensor([-10.0, -3.0, 0.0, 3.0, 10.0])  # sigmoid: 4.5e-5, 0.047, 0.5, 0.953, 0.99995
    assert _measure(SaturationMonitor(sig), sig, logits)["(root)"] == pytest.approx(2 / 5)
    loose = SaturationMonitor(sig, sigmoid_low=0.05, sigmoid_high=0.95)
    assert _measure(loose, sig, logits)["(root)"] == pytest.approx(4 / 5)
    tanh = nn.Tanh()
    z = torch.tensor([0.0, 1.0, 2.0, 3.0])  # tanh: 0, 0.76, 0.964, 0.995
    assert _measure(SaturationMonitor(tanh), tanh, z)["(root)"] == pytest.approx(1 / 4)
    assert _measure(SaturationMonitor(tanh, tanh_threshold=0.9), tanh, z)["(root)"] == pytest.approx(2 / 4)


def test_unmonitored_modules():
    net = nn.Sequential(nn.LeakyReLU(), nn.GELU(), nn.LSTM(3, 3), nn.GRU(3, 3), nn.Linear(3, 3))
    monitor = SaturationMonitor(net)
    assert monitor.names == []
    monitor.arm()
    assert monitor.disarm() == {}


def test_rnn_tanh_and_relu_outputs_including_packed():
    torch.manual_seed(0)
    rnn = nn.RNN(4, 16, batch_first=True)
    with torch.no_grad():
        rnn.weight_ih_l0.mul_(100.0)
    x = torch.randn(3, 5, 4)
    assert _measure(SaturationMonitor(rnn), rnn, x)["(root)"] > 0.9
    packed = pack_padded_sequence(x, lengths=[5, 3, 2], batch_first=True)
    assert _measure(SaturationMonitor(rnn), rnn, packed)["(root)"] > 0.9

    relu_rnn = nn.RNN(4, 16, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        relu_rnn.bias_ih_l0.fill_(-100.0)
    assert _measure(SaturationMonitor(relu_rnn), relu_rnn, x)["(root)"] == 1.0


def test_average_over_forwards_and_fresh_after_rearm():
    tanh = nn.Tanh()
    monitor = SaturationMonitor(tanh)
    monitor.arm()
    tanh(torch.zeros(10))
    tanh(torch.full((30,), 10.0))  # a per-forward average, not a per-element one
    tanh(torch.tensor([0.0, 10.0]))
    out = monitor.disarm()
    assert set(out) == {"(root)"}
    assert out["(root)"].dtype == torch.float32 and out["(root)"].ndim == 0
    assert float(out["(root)"]) == pytest.approx((0.0 + 1.0 + 0.5) / 3)
    assert monitor.disarm() == {}
    assert _measure(monitor, tanh, torch.zeros(4)) == {"(root)": 0.0}


def test_hooks_only_while_armed_and_modules_that_did_not_run():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()
            self.unused = nn.Sigmoid()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(self.fc(x))

    net = Branchy()
    monitor = SaturationMonitor(net)
    assert monitor.names == ["act", "unused"]
    assert _no_hooks_left(net)
    monitor.arm()
    monitor.arm()  # idempotent: one hook per module
    assert monitor.armed and sum(len(m._forward_hooks) for m in net.modules()) == 2
    net(torch.randn(2, 4))
    out = monitor.disarm()
    assert list(out) == ["act"]
    assert _no_hooks_left(net) and not monitor.armed
    net(torch.randn(2, 4))
    assert monitor.disarm() == {}


def test_sync_recorder_catches_a_deliberate_sync():
    t = torch.ones(3)
    with SyncRecorder() as recorder:
        t.sum().item()
        if t.sum() > 0:
            pass
        float(t[0])
    assert recorder.calls == ["item", "__bool__", "__float__"]


def test_no_host_sync_while_measuring():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Hardtanh(),
        nn.ReLU6(),
        nn.Hardsigmoid(),
        nn.ReLU(),
    )
    rnn = nn.RNN(8, 8)
    monitor = SaturationMonitor(nn.ModuleDict({"net": net, "rnn": rnn}))
    x = torch.randn(5, 6)
    with SyncRecorder() as recorder:
        monitor.arm()
        for _ in range(2):
            h = net(x)
            rnn(h.unsqueeze(1))
        out = monitor.disarm()
    assert recorder.calls == []
    assert list(out) == ["net.1", "net.3", "net.4", "net.5", "net.6", "net.7", "rnn"]


def test_forward_results_and_gradients_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1), nn.Sigmoid())
    x = torch.randn(16, 4)
    expected = net(x)
    monitor = SaturationMonitor(net)
    monitor.arm()
    got = net(x)
    got.sum().backward()
    out = monitor.disarm()
    assert torch.equal(got, expected)
    assert set(out) == {"1", "3"} and not any(v.requires_grad for v in out.values())


def test_most_saturated_upstream_in_the_backward_pass():
    net = nn.Sequential(
        nn.Linear(2, 2),
        nn.Tanh(),
        nn.Linear(2, 2),
        nn.Sigmoid(),
        nn.Linear(2, 2),
        nn.ReLU(),
        nn.Linear(2, 2),
        nn.Tanh(),
    )
    monitor = SaturationMonitor(net)
    fractions = {"1": 0.9, "3": 0.2, "5": 0.6, "7": 0.6}
    assert monitor.most_saturated(fractions, None) == [("1", 0.9), ("5", 0.6), ("7", 0.6)]
    assert monitor.most_saturated(fractions, "(root)", k=1) == [("1", 0.9)]
    # Layer "2" is reached by gradients through activations 3, 5 and 7, not through 1.
    assert monitor.most_saturated(fractions, "2") == [("5", 0.6), ("7", 0.6), ("3", 0.2)]
    assert monitor.most_saturated(fractions, "6", k=5) == [("7", 0.6)]
    assert monitor.most_saturated({"5": 0.3}, "2") == [("5", 0.3)]
    assert monitor.most_saturated(fractions, "a custom group") == monitor.most_saturated(fractions, None)
    with pytest.raises(ValueError, match="k"):
        monitor.most_saturated(fractions, None, k=0)


def test_advice_is_one_sentence():
    advice = SaturationMonitor.advice()
    assert advice.count(".") == 1 and advice.endswith(".")
    for word in ("ReLU", "LeakyReLU", "GELU", "LayerNorm", "residual", "orthogonal"):
        assert word in advice
    # Dead ReLUs are not told to use ReLU.
    dead = SaturationMonitor.advice(dead_units=True)
    assert dead.count(".") == 1 and dead.endswith(".") and "learning rate" in dead and "LeakyReLU" in dead
    assert "prefer non-saturating" not in dead


def test_dead_units_are_told_apart_by_module_type():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Tanh(), nn.RNN(2, 2, nonlinearity="relu"), nn.RNN(2, 2))
    monitor = SaturationMonitor(model)
    assert [monitor.counts_dead_units(name) for name in ("1", "2", "3", "4", "no.such")] == [
        True,
        False,
        True,
        False,
        False,
    ]


def test_forward_passes_without_gradients_are_not_counted():
    """Validation between two micro-batches of a logging step runs under no_grad: not the training activations."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    monitor = SaturationMonitor(model)
    monitor.arm()
    x = torch.randn(16, 4)
    model(x)
    with torch.no_grad():
        model(x * 1e3)  # all saturated
    with torch.inference_mode():
        model(x * 1e3)
    measured = monitor.disarm()
    monitor.arm()
    model(x)
    alone = monitor.disarm()
    assert measured["1"].item() == alone["1"].item() < 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tanh_threshold": 1.0}, "tanh_threshold"),
        ({"tanh_threshold": 0.0}, "tanh_threshold"),
        ({"sigmoid_low": 0.0}, "sigmoid_low"),
        ({"sigmoid_high": 1.0}, "sigmoid_high"),
        ({"sigmoid_low": 0.6, "sigmoid_high": 0.5}, "sigmoid_high"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SaturationMonitor(nn.Tanh(), **kwargs)
