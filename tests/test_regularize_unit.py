"""Unit tests for the L1, L2 and Orthogonal regularizers in plain torch (no Lightning)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_gradguard.regularize import L1, L2, Orthogonal, Regularizer
from tests.helpers import SyncRecorder


class Net(nn.Module):
    """A bit of everything: embedding, linear, norms, conv, LSTM, root parameters, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.lstm = nn.LSTM(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.gain = nn.Parameter(torch.ones(8))
        self.proj = nn.Parameter(torch.randn(8, 8))


def _autograd_grads(reg: Regularizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    reg.penalty().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


GRAD_CASES = {
    "l1_mlp": (lambda: L1(0.3), lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))),
    "l2_mlp": (lambda: L2(0.3), lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))),
    "orth_lstm": (lambda: Orthogonal(0.3), lambda: nn.LSTM(6, 5, num_layers=2)),
    "orth_lstm_cell": (lambda: Orthogonal(0.3), lambda: nn.LSTMCell(3, 4)),
    "orth_gru": (lambda: Orthogonal(0.3), lambda: nn.GRU(4, 6)),
    "orth_attention": (lambda: Orthogonal(0.3), lambda: nn.MultiheadAttention(6, 2)),
    "orth_conv": (lambda: Orthogonal(0.3), lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 40, 1))),
    "orth_wide_tall": (lambda: Orthogonal(0.3), lambda: nn.Sequential(nn.Linear(10, 3), nn.Linear(3, 10))),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
@pytest.mark.parametrize("scale", [1.0, 2.5, "tensor"])
def test_add_grad_equals_autograd_of_penalty(case, scale):
    make_reg, make_model = GRAD_CASES[case]
    torch.manual_seed(0)
    model = make_model().double()
    reg = make_reg()
    reg.bind(model)
    params = list(reg._params)
    with torch.no_grad():
        params[0].view(-1)[:3] = 0.0  # L1's subgradient at exactly 0 must match autograd's
    expected_terms = _autograd_grads(reg, params)
    assert any(t.abs().max() > 1e-3 for t in expected_terms)

    # Half of the parameters already hold a gradient, the others have none yet.
    existing = [torch.randn_like(p) if i % 2 == 0 else None for i, p in enumerate(params)]
    for p, g in zip(params, existing):
        p.grad = None if g is None else g.clone()
    factor = 3.0 if scale == "tensor" else scale
    reg.add_grad_(torch.tensor(3.0) if scale == "tensor" else scale)
    for p, g, term in zip(params, existing, expected_terms):
        want = factor * term if g is None else g + factor * term
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=0)


def test_add_grad_equals_autograd_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(6, 8))
    reg = Orthogonal(0.1)
    reg.bind(model)
    params = list(reg._params)
    expected = _autograd_grads(reg, params)
    reg.add_grad_()
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make_reg", [L1, L2, Orthogonal], ids=["l1", "l2", "orthogonal"])
def test_add_grad_only_touches_the_given_parameters(make_reg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 5))
    reg = make_reg(0.3)
    reg.bind(model)
    expected = dict(zip((id(p) for p in reg._params), _autograd_grads(reg, list(reg._params))))
    mine = frozenset(id(p) for p in model[2].parameters())
    for _ in range(2):  # the second call takes the cached subset
        reg.add_grad_(only=mine)
    assert model[0].weight.grad is None and model[3].weight.grad is None  # not created for the others
    torch.testing.assert_close(model[2].weight.grad, 2 * expected[id(model[2].weight)])
    reg.add_grad_(only=frozenset())  # nothing to do
    reg.add_grad_()
    torch.testing.assert_close(model[0].weight.grad, expected[id(model[0].weight)])


@pytest.mark.parametrize("make_reg", [L1, L2, Orthogonal], ids=["l1", "l2", "orthogonal"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weights_penalty_and_gradient(make_reg, dtype):
    # Complex weights (Fourier layers): |w| and the conjugate transpose, and the gradient autograd gives a real loss.
    torch.manual_seed(0)
    model = nn.ParameterDict(
        {"wide": nn.Parameter(torch.randn(3, 5, dtype=dtype)), "tall": nn.Parameter(torch.randn(6, 2, dtype=dtype))}
    )
    with torch.no_grad():
        model["wide"].view(-1)[:2] = 0.0  # L1's subgradient at exactly 0
    reg = make_reg(0.3)
    assert sorted(reg.bind(model)) == ["tall", "wide"]

    def gram(w: torch.Tensor) -> torch.Tensor:
        return w @ w.mH if w.shape[0] < w.shape[1] else w.mH @ w

    expected = {
        "l1": lambda w: w.abs().sum(),
        "l2": lambda w: 0.5 * w.abs().square().sum(),
        "orthogonal": lambda w: (gram(w) - torch.eye(gram(w).shape[0], dtype=dtype)).abs().square().sum(),
    }[type(reg).__name__.lower()]
    reference = 0.3 * sum(expected(w) for w in model.values())
    penalty = reg.penalty()
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(reference.item(), rel=1e-5)
    want = torch.autograd.grad(reference, list(model.values()))
    reg.add_grad_()
    for p, g in zip(model.values(), want):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_reg", [L1, L2, Orthogonal], ids=["l1", "l2", "orthogonal"])
def test_add_grad_has_no_host_sync(make_reg):
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(4, 6), "lstm": nn.LSTM(6, 3), "low": nn.Linear(3, 5).to(torch.bfloat16)})
    reg = make_reg(0.1)
    reg.bind(model)
    with SyncRecorder() as recorder:
        reg.add_grad_(torch.tensor(4.0))
        reg.add_grad_(2.0)
    assert recorder.calls == []
    assert all(p.grad is not None for p in reg._params)


def test_mixed_dtypes_and_missing_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4), nn.Linear(4, 4).double())
    reg = L2(0.5)
    reg.bind(model)
    reg.add_grad_(torch.tensor(2.0))
    for layer in model:
        assert layer.weight.grad.dtype == layer.weight.dtype
        torch.testing.assert_close(layer.weight.grad, layer.weight.detach() * 1.0)
        assert layer.bias.grad is None
    value = reg.penalty()
    assert value.dtype == torch.float32
    manual = sum(0.25 * layer.weight.double().pow(2).sum() for layer in model)
    torch.testing.assert_close(value.double(), manual, rtol=1e-6, atol=0)


def test_orthogonal_half_precision_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(12, 6, bias=False).to(torch.bfloat16)
    reg = Orthogonal(1.0)
    reg.bind(layer)
    reg.add_grad_()
    w = layer.weight.detach().double()
    want = 4 * (w @ w.T - torch.eye(6, dtype=torch.float64)) @ w
    assert layer.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight.grad.double(), want, rtol=1e-2, atol=1e-2)


def _orth_manual(w: torch.Tensor, gates: int) -> torch.Tensor:
    total = w.new_zeros(())
    for block in w.reshape(w.shape[0], -1).chunk(gates, dim=0):
        small = block @ block.T if block.shape[0] < block.shape[1] else block.T @ block
        total = total + (small - torch.eye(small.shape[0], dtype=w.dtype)).pow(2).sum()
    return total


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_orthogonal_views_a_transposed_convolution_as_out_by_the_rest(groups: int) -> None:
    # With one group [in, out, 3, 3] becomes [out, in * 9]; grouped ([in, out/groups, 3, 3]) the stored rows, as
    # before (depthwise, [4, 1, 3, 3], those are its output channels).
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 4 if groups == 4 else 6, 3, groups=groups)
    reg = Orthogonal(0.3)
    assert reg.bind(conv) == ["weight"]
    weight = conv.weight.detach().double()
    w = weight.transpose(0, 1).reshape(6, -1) if groups == 1 else weight.reshape(4, -1)
    gram = w @ w.T if w.shape[0] < w.shape[1] else w.T @ w
    expected = 0.3 * (gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum()
    assert float(reg.penalty().detach()) == pytest.approx(float(expected), rel=1e-5)
    expected_grads = _autograd_grads(reg, [conv.weight])
    conv.weight.grad = torch.zeros_like(conv.weight)
    reg.add_grad_()
    torch.testing.assert_close(conv.weight.grad, expected_grads[0], rtol=1e-5, atol=1e-7)


def test_orthogonal_leaves_vectors_in_matrix_shape_alone() -> None:
    # A [1, 1, d] class token or a single-output head's [1, d] weight: "orthogonal" would only mean a unit norm.
    model = nn.Module()
    model.cls_token = nn.Parameter(torch.randn(1, 1, 6))
    model.column = nn.Parameter(torch.randn(6, 1))
    model.head = nn.Linear(6, 1)
    model.body = nn.Linear(6, 6)
    assert Orthogonal(0.1).bind(model) == ["body.weight"]
    with pytest.raises(ValueError, match="selected no parameter"):
        Orthogonal(0.1, modules=r"head").bind(model)


def test_orthogonal_penalty_per_gate_block_and_smaller_gram():
    torch.manual_seed(0)
    lstm, gru = nn.LSTM(3, 5).double(), nn.GRU(7, 5).double()
    wide, tall = nn.Linear(9, 4, bias=False).double(), nn.Linear(4, 9, bias=False).double()
    conv = nn.Conv2d(2, 3, 2, bias=False).double()
    attention = nn.MultiheadAttention(6, 2, bias=False).double()
    cases = [
        (lstm, 4),  # weight_ih [20, 3], weight_hh [20, 5]
        (gru, 3),  # weight_ih [15, 7], weight_hh [15, 5]
        (attention, 3),  # in_proj_weight [18, 6]: query, key, value (out_proj.weight [6, 6] is one block)
        (wide, 1),
        (tall, 1),
        (conv, 1),  # [3, 8]
    ]
    for module, gates in cases:
        reg = Orthogonal(2.0)
        names = reg.bind(module)
        manual = sum(
            _orth_manual(p.detach(), 1 if name.startswith("out_proj") else gates) for name, p in zip(names, reg._params)
        )
        torch.testing.assert_close(reg.penalty().double(), 2.0 * manual, rtol=1e-6, atol=0)
    # The smaller Gram matters: for a tall matrix the larger one differs by rows - cols.
    w = tall.weight.detach()
    big = (w @ w.T - torch.eye(9, dtype=w.dtype)).pow(2).sum()
    assert big - _orth_manual(w, 1) == pytest.approx(9 - 4)


def test_orthogonal_stacks_in_bounded_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_gradguard.regularize as regularize

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.LSTM(6, 6), nn.Linear(6, 9), nn.Linear(9, 6))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        reg = Orthogonal(0.5)
        reg.bind(model)
        for p in model.parameters():
            p.grad = None
        reg.add_grad_()
        return reg.penalty().detach(), [p.grad.clone() for p in reg._params]

    whole_penalty, whole = run()
    monkeypatch.setattr(regularize, "_STACK_ELEMENTS", 80)  # two 6x6 blocks per stack at most
    chunked_penalty, chunked = run()
    torch.testing.assert_close(chunked_penalty, whole_penalty)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b)


def test_orthogonal_sgd_drives_lstm_gate_blocks_orthogonal():
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16)
    reg = Orthogonal(1.0, modules=r"weight_hh")
    assert reg.bind(lstm) == ["weight_hh_l0"]
    weight_ih = lstm.weight_ih_l0.detach().clone()
    opt = torch.optim.SGD(lstm.parameters(), lr=0.02)

    def block_errors():
        return [float((b.T @ b - torch.eye(16)).norm()) for b in lstm.weight_hh_l0.detach().chunk(4)]

    start, start_blocks = float(reg.penalty().detach()), block_errors()
    for _ in range(300):
        opt.zero_grad()
        reg.add_grad_()
        opt.step()
    end, end_blocks = float(reg.penalty().detach()), block_errors()
    assert end < start / 10
    assert all(e < s / 3 for s, e in zip(start_blocks, end_blocks))
    assert torch.equal(lstm.weight_ih_l0.detach(), weight_ih)  # not selected, untouched


def _sparse_regression(reg: Regularizer | None) -> torch.Tensor:
    """Least squares with 5 relevant of 20 features; SGD with a decaying lr so the L1 oscillation settles."""
    torch.manual_seed(0)
    x = torch.randn(64, 20)
    w_true = torch.zeros(20)
    w_true[:5] = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.0])
    y = x @ w_true + 0.5 * torch.randn(64)
    model = nn.Linear(20, 1, bias=False)
    if reg is not None:
        reg.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400, eta_min=1e-4)
    for _ in range(400):
        opt.zero_grad()
        (model(x).squeeze(1) - y).pow(2).mean().backward()
        if reg is not None:
            reg.add_grad_()
        opt.step()
        sched.step()
    return model.weight.detach()[0]


def test_l1_with_sgd_makes_weights_sparse():
    dense = _sparse_regression(None)
    sparse = _sparse_regression(L1(0.2))
    assert (dense.abs() < 1e-3).float().mean() < 0.1
    assert (sparse.abs() < 1e-3).float().mean() >= 0.6
    assert (sparse[:5].abs() > 0.5).all()  # the relevant weights survive


def test_default_selection_skips_biases_and_norms():
    net = Net()
    assert L2(1e-3).bind(net) == [
        "proj",
        "emb.weight",
        "fc.weight",
        "conv.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "frozen.weight",  # selected, and left alone while frozen (below)
    ]
    assert Orthogonal(1e-3).bind(net) == [
        "proj",
        "fc.weight",
        "conv.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "frozen.weight",
    ]
    with_bias = L1(1e-3, include_bias=True).bind(net)
    assert {"gain", "fc.bias", "conv.bias", "lstm.bias_ih_l0", "lstm.bias_hh_l0"} <= set(with_bias)
    assert not [n for n in with_bias if n.startswith(("ln.", "bn."))]


@pytest.mark.parametrize("reg_class", [L1, L2, Orthogonal])
def test_attention_bias_k_v_and_empty_parameters_are_not_weights(reg_class: type) -> None:
    # MultiheadAttention's bias_k/bias_v ([1, 1, E]) were selected as weights (Orthogonal pulled each towards unit
    # norm), and Orthogonal divided by zero on an empty matrix (a rank-0 adapter) at its first penalty.
    net = nn.Module()
    net.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    net.adapter = nn.Parameter(torch.zeros(0, 8))
    net.head = nn.Linear(8, 0)
    reg = reg_class(1e-3)
    assert reg.bind(net) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    torch.testing.assert_close(reg.penalty(), reg_class(1e-3, modules=r"weight$").penalty(net))
    with_bias = L2(1e-3, include_bias=True).bind(net)
    assert {"attn.bias_k", "attn.bias_v"} <= set(with_bias) and "adapter" not in with_bias


@pytest.mark.parametrize("reg_class", [L1, L2, Orthogonal])
def test_frozen_parameters_are_left_alone_while_frozen(reg_class: type) -> None:
    """A backbone frozen at the start and unfrozen mid-run is regularized from then on; one frozen mid-run is no
    longer pulled (its optimizer would move it by the term alone)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[0].requires_grad_(False)
    reg = reg_class(0.5)
    reg.bind(net)
    for frozen, trained in ((net[0], net[1]), (net[1], net[0])):
        frozen.requires_grad_(False)
        trained.requires_grad_(True)
        net.zero_grad(set_to_none=True)
        reg.add_grad_()
        assert frozen.weight.grad is None and trained.weight.grad is not None
        added = trained.weight.grad.clone()
        alone = reg_class(0.5)
        alone.bind(trained)
        torch.testing.assert_close(reg.penalty(), alone.penalty())
        torch.testing.assert_close(added, _autograd_grads(alone, [trained.weight])[0])


def test_regex_and_type_selection():
    net = Net()
    assert L2(1e-3, modules=r"^fc$").bind(net) == ["fc.weight"]
    assert L2(1e-3, modules=r"lstm\.weight_hh").bind(net) == ["lstm.weight_hh_l0"]
    assert L2(1e-3, module_types=(nn.Conv1d, nn.Embedding)).bind(net) == ["emb.weight", "conv.weight"]
    assert L2(1e-3, module_types=(nn.LayerNorm,), include_bias=True).bind(net) == ["ln.weight", "ln.bias"]
    assert Orthogonal(1e-3, module_types=(nn.Embedding,)).bind(net) == ["emb.weight"]
    with pytest.raises(ValueError, match="selected no parameter"):
        L2(1e-3, modules=r"nothing_here").bind(net)
    with pytest.raises(ValueError, match="selected no parameter"):
        L2(1e-3, module_types=(nn.LayerNorm,)).bind(net)  # only bias-like parameters there
    # An embedding named alone: Orthogonal leaves embeddings out unless `module_types` names them, and says so.
    with pytest.raises(ValueError, match=r"include_bias` \(Orthogonal also leaves out embeddings.*module_types=\(nn"):
        Orthogonal(1e-3, modules=r"^emb$").bind(net)
    with pytest.raises(ValueError, match=r"include_bias`$"):
        L2(1e-3, modules=r"nothing_here").bind(net)


def test_penalty_rebinds_and_requires_binding():
    reg = L2(1.0)
    with pytest.raises(RuntimeError, match="bind"):
        reg.penalty()
    with pytest.raises(RuntimeError, match="bind"):
        reg.add_grad_()
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(3, 3, bias=False)
    torch.testing.assert_close(reg.penalty(a), 0.5 * a.weight.pow(2).sum())
    torch.testing.assert_close(reg.penalty(b), 0.5 * b.weight.pow(2).sum())
    assert reg.param_names == ["weight"] and reg._params[0] is b.weight


def test_adaptive_strength_rises_is_bounded_and_decays():
    torch.manual_seed(0)
    model = nn.Linear(3, 3, bias=False)
    reg = L2(0.1, adaptive=True, adaptive_factor=3.0, max_strength=20.0, decay=0.5)
    reg.bind(model)
    base = float(reg.penalty().detach())
    strengths = []
    for _ in range(4):
        reg.on_exploding(True)
        strengths.append(reg.strength)
    assert strengths == [3.0, 9.0, 20.0, 20.0]
    assert float(reg.penalty().detach()) == pytest.approx(20 * base, rel=1e-6)
    reg.add_grad_()
    torch.testing.assert_close(model.weight.grad, 0.1 * 20 * model.weight.detach())
    calm = []
    for _ in range(30):
        reg.on_exploding(False)
        calm.append(reg.strength)
    assert calm[0] == pytest.approx(1 + 19 * 0.5)
    assert all(a > b for a, b in zip(calm, calm[1:]))
    assert calm[-1] == pytest.approx(1.0, abs=1e-6)

    fixed = L2(0.1)
    fixed.on_exploding(True)
    assert fixed.strength == 1.0


def test_state_dict_round_trip():
    reg = Orthogonal(1e-3, adaptive=True)
    reg.on_exploding(True)
    reg.on_exploding(False)
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    restored = Orthogonal(1e-3, adaptive=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.strength == reg.strength != 1.0
    restored.on_exploding(True)
    reg.on_exploding(True)
    assert restored.state_dict() == reg.state_dict()


def test_a_saved_strength_loads_under_the_configuration_it_meets() -> None:
    saved = {"strength": 4.0}
    capped = L2(0.05, adaptive=True, max_strength=2.0)
    capped.load_state_dict(saved)
    assert capped.strength == 2.0  # its own cap, not the saved run's
    plain = L2(0.05)
    with pytest.warns(UserWarning, match="not adaptive: the saved strength 4 .*stays 1"):
        plain.load_state_dict(saved)  # before: 4.0, an L2 four times the configured weight
    assert plain.strength == 1.0 and plain.effective_weight == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_state_dict({"strength": 1.0})  # a non-adaptive one's own state: no warning
    for bad in (math.nan, math.inf, -3.0, 0.0, 0.5, "2", True):
        with pytest.raises(ValueError, match="strength"):
            L2(0.05, adaptive=True).load_state_dict({"strength": bad})


def test_names():
    assert (L1(1.0).name, L2(1.0).name, Orthogonal(1.0).name) == ("l1", "l2", "orthogonal")
    assert L2(1.0, name="decay").name == "decay"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weight": -1.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": 1.0, "modules": "("}, "modules"),
        ({"weight": 1.0, "module_types": (int,)}, "module_types"),
        ({"weight": 1.0, "adaptive_factor": 0.5}, "adaptive_factor"),
        ({"weight": 1.0, "max_strength": 0.5}, "max_strength"),
        ({"weight": 1.0, "decay": 1.0}, "decay"),
        ({"weight": 1.0, "name": ""}, "name"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        L2(**kwargs)


def test_orthogonal_refuses_include_bias():
    with pytest.raises(ValueError, match="include_bias"):
        Orthogonal(1.0, include_bias=True)


def test_orthogonal_is_exact_inside_autocast() -> None:
    # A plain loop may run the whole step under torch.autocast: the Gram matrix must not be taken in bf16, where
    # W^T W - I (differences of numbers near 1) is rounded to noise.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    nn.init.orthogonal_(model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(torch.randn(64, 64) * 1e-3)  # near orthogonal: the terms are small differences
    reg = Orthogonal(1.0)
    reg.bind(model)
    results = []
    for autocast in (False, True):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reg.add_grad_()
            penalty = reg.penalty()
        results.append((penalty.detach(), [p.grad.clone() for p in model.parameters()]))
    (exact, exact_grads), (under, under_grads) = results
    assert torch.equal(exact, under)
    for a, b in zip(exact_grads, under_grads):
        assert torch.equal(a, b)


class _SelfRegularized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.reg = L2(1e-2)
        self.reg.bind(self)


def test_a_copy_keeps_its_selection_and_a_pickle_drops_the_weak_reference() -> None:
    import copy
    import pickle

    net = _SelfRegularized()
    twin = copy.deepcopy(net)  # a teacher/student pair, an EMA model: the copy's regularizer selects its own weights
    twin.reg.penalty().backward()
    assert twin.lin.weight.grad is not None and net.lin.weight.grad is None
    unpickled = pickle.loads(pickle.dumps(net))  # a weak reference cannot be pickled
    assert unpickled.reg.penalty(unpickled).item() == pytest.approx(net.reg.penalty(net).item())
