"""Logging-step diagnostics (diagnostics.py), each against a manual computation: update-to-weight ratios, zero
fractions, activation-gradient norms, the gradient noise scale, per-epoch summaries; nothing registered or run on quiet
steps, no host sync; and the hook points in a real ``Trainer.fit`` with gradient accumulation."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.diagnostics import (
    NOISE_SCALE_NOTE,
    ActivationGradients,
    EpochSummary,
    LocalGradNorm,
    NoiseScale,
    UpdateRatio,
    UpdateRatioHints,
    ZeroFraction,
    noise_scale_source,
    squared_grad_norm,
)
from lightning_gradguard.layers import build_layer_index
from tests.helpers import SyncRecorder
from tests.models import trainer

# ---------------------------------------------------------------------- helpers


def _hooks(model: nn.Module) -> int:
    """Every module and tensor hook on ``model`` and its parameters."""
    count = 0
    for m in model.modules():
        count += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        count += len(m._backward_pre_hooks)
    for p in model.parameters():
        count += len(p._backward_hooks or {})
    return count


def _layer_norms(index: Any, tensors: dict[int, Tensor]) -> list[float]:
    """Per-layer L2 norm (float64) of ``{param position: tensor}``; NaN for a layer with none."""
    squares = [0.0] * index.num_layers
    seen = [False] * index.num_layers
    for i, t in tensors.items():
        layer = index.layer_of_param[i]
        squares[layer] += float(t.double().square().sum())
        seen[layer] = True
    return [math.sqrt(s) if ok else math.nan for s, ok in zip(squares, seen)]


class Branchy(nn.Module):
    """``head(relu(body(x))) + side(x)``: ``side`` starts at zero (no ratio), ``head`` is float64 (two dtype groups),
    ``unused`` never runs (no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 7)
        self.unused = nn.Linear(2, 2)
        self.head = nn.Linear(7, 1).double()
        self.side = nn.Linear(5, 1)
        nn.init.zeros_(self.side.weight)
        nn.init.zeros_(self.side.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)).double()).float() + self.side(x)


# ---------------------------------------------------------------------- update-to-weight ratio


def test_update_ratio_under_plain_sgd_is_lr_times_gradient_over_weight_norm() -> None:
    torch.manual_seed(0)
    model = Branchy()
    index = build_layer_index(model)
    assert index.names == ["body", "unused", "head", "side"]
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ratio = UpdateRatio(index)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(16, 5)).pow(2).mean().backward()
        grads = {i: p.grad.clone() for i, p in enumerate(index.params) if p.grad is not None}
        weights = {i: p.detach().clone() for i, p in enumerate(index.params)}
        ratio.before_step()
        assert ratio.pending
        opt.step()
        got = ratio.after_step()
        assert got is not None and got.dtype == torch.float32 and not ratio.pending
        grad_norm = _layer_norms(index, grads)
        weight_norm = _layer_norms(index, weights)
        for layer in (0, 2, 3):  # body, head, side: lr * ‖g‖ / ‖θ‖
            if weight_norm[layer] > 0:
                assert float(got[layer]) == pytest.approx(lr * grad_norm[layer] / weight_norm[layer], rel=1e-5)
            else:  # side, before its first step: zero weights, nothing to compare with
                assert math.isnan(float(got[layer]))
        assert math.isnan(float(got[1]))  # unused: no gradient, not watched
    assert weight_norm[3] > 0  # the second step measured side
    assert ratio.after_step() is None  # nothing pending


def test_update_ratio_under_adamw_equals_the_measured_parameter_change() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    index = build_layer_index(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.5)
    ratio = UpdateRatio(index)
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(32, 6)).pow(2).mean().backward()
        before = {i: p.detach().clone() for i, p in enumerate(index.params)}
        ratio.before_step()
        opt.step()
        got = ratio.after_step()
        assert got is not None
        delta = _layer_norms(index, {i: p.detach() - before[i] for i, p in enumerate(index.params)})
        norm = _layer_norms(index, before)
        expected = torch.tensor([d / n for d, n in zip(delta, norm)], dtype=torch.float32)
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=0.0, msg=f"step {step}")

    # Only some parameters watched: the other layers are NaN.
    opt.zero_grad()
    model(torch.randn(8, 6)).sum().backward()
    ratio.before_step([model[2].weight, nn.Parameter(torch.ones(1))])  # a parameter outside the index is ignored
    opt.step()
    got = ratio.after_step()
    assert got is not None
    assert math.isnan(float(got[0])) and math.isnan(float(got[2])) and float(got[1]) > 0


def test_update_ratio_of_a_step_that_changed_nothing_is_zero_and_discard_drops_the_copy() -> None:
    model = nn.Linear(3, 1)
    ratio = UpdateRatio(build_layer_index(model))
    model(torch.ones(2, 3)).sum().backward()
    ratio.before_step()
    got = ratio.after_step()  # no optimizer step (e.g. GradScaler skipped it)
    assert got is not None and float(got[0]) == 0.0
    ratio.before_step()
    ratio.discard()
    assert not ratio.pending and ratio.after_step() is None


def test_a_layer_growing_from_zero_is_not_hinted_about_until_its_ratio_comes_into_the_band() -> None:
    # LoRA's B starts at zero: its ratio starts infinite and falls as ~1/steps with Adam, whatever the rate.
    hints = UpdateRatioHints(high=1e-2, low=1e-5, patience=2)
    hints.start_from_zero(["lora_B"])
    names = ["lora_B", "lora_A"]
    assert hints.update(names, [0.5, 3e-2]) == []
    assert hints.update(names, [0.2, 3e-2]) == [  # lora_A: an ordinary layer, hinted as before
        "update/weight ratio above 1e-2 over the last 2 logs for 1 layer: 'lora_A' 3.0e-2; the learning rate may be"
        " too high for it (about 1e-3 is usual)"
    ]
    restored = UpdateRatioHints(high=1e-2, low=1e-5, patience=2)
    restored.load_state_dict(hints.state_dict())  # the layer still growing is remembered
    for h in (hints, restored):
        assert h.update(names, [0.1, 1e-3]) == [] and h.update(names, [0.1, 1e-3]) == []
        assert h.update(names, [5e-3, 1e-3]) == []  # in the band once: from now on an ordinary layer
        assert h.update(names, [0.1, 1e-3]) == []
        assert h.update(names, [0.1, 1e-3]) == [
            "update/weight ratio above 1e-2 over the last 2 logs for 1 layer: 'lora_B' 1.0e-1; the learning rate may"
            " be too high for it (about 1e-3 is usual)"
        ]
    legacy = hints.state_dict()
    del legacy["from_zero"]  # a checkpoint saved before layers growing from zero were told apart
    UpdateRatioHints().load_state_dict(legacy)
    # A checkpoint saved before the hints were once per side: streaks of five entries, the fourth saying whether the
    # streak was hinted about. Such a streak's layer and side count as named.
    older = {
        "version": legacy["version"],
        "streaks": {"head": [-1.0, 3.0, -18.0, 1.0, 0.0], "emb": [1.0, 1.0, -0.7, 0.0, 0.0]},
    }
    loaded = UpdateRatioHints(patience=2)
    loaded.load_state_dict(older)
    for _ in range(2):
        assert loaded.update(["head"], [1e-3]) == []
    assert loaded.update(["head"], [1e-6]) == [] and loaded.update(["head"], [1e-6]) == []
    assert loaded.state_dict()["hinted"] == [["head", -1]]


def test_a_scheduled_low_rate_gives_no_too_low_hint_and_the_peak_is_kept_with_the_state() -> None:
    names = ["emb", "head"]
    hints = UpdateRatioHints(patience=2)
    assert hints.update(names, [1e-3, 1e-3], lr=1e-2) == []  # the peak so far
    # Warm restarts logged at their troughs (lr 1e-4): tiny updates by the schedule's choice, not a starved layer.
    assert hints.update(names, [8e-6, 1e-3], lr=1e-4) == []
    assert hints.update(names, [9e-6, 1e-3], lr=1e-4) == []
    restored = UpdateRatioHints(patience=2)
    restored.load_state_dict(hints.state_dict())
    for h in (hints, restored):
        assert h.update(names, [8e-6, 0.5], lr=1e-4) == []
        assert h.update(names, [8e-6, 0.5], lr=1e-4)[0].startswith("update/weight ratio above 1e-1 ")  # still judged
        # At a tenth of the peak or more, a tiny ratio counts again.
        assert h.update(names, [8e-6, 1e-3], lr=2e-3) == []
        assert "'emb' 8.0e-6; it barely trains" in h.update(names, [8e-6, 1e-3], lr=2e-3)[0]
    assert UpdateRatioHints(patience=1).update(names, [8e-6, 1e-3])  # no rate given: judged as before


def test_a_layer_whose_group_rate_is_below_a_tenth_of_the_highest_gets_no_too_low_hint() -> None:
    # A layer-wise decay (0.8 ** depth over 12 blocks: 0.07x) slows the deep layers on purpose.
    names = ["blocks.0", "blocks.11", "head"]
    hints = UpdateRatioHints(patience=2)
    for _ in range(2):
        assert hints.update(names, [6e-6, 6e-6, 1e-3], lr=1e-3, rate_scales=[0.07, 0.9, 1.0]) in (
            [],
            [
                "update/weight ratio below 1e-5 over the last 2 logs for 1 layer: 'blocks.11' 6.0e-6; it barely trains:"
                " the learning rate may be too low for it, or the gradient has become small (a task already fitted,"
                " vanishing gradients, or a model that a too-high rate has collapsed)"
            ],
        )
    assert not any("blocks.0" in h for h in hints.update(names, [6e-6, 6e-6, 1e-3], rate_scales=[0.07, 0.9, 1.0]))
    assert "'blocks.0'" in UpdateRatioHints(patience=1).update(names, [6e-6, 1e-3, 1e-3])[0]  # one rate: judged
    with pytest.raises(ValueError, match="rate_scales"):
        UpdateRatioHints().update(names, [1e-3] * 3, rate_scales=[1.0])


def test_update_ratio_hints_fire_once_per_layer_and_side_and_ignore_non_observations() -> None:
    hints = UpdateRatioHints(high=1e-2, low=1e-5, patience=3)
    names = ["encoder.3", "head", "frozen"]
    assert hints.update(names, [3.0e-2, 1e-3, 0.0]) == []
    assert hints.update(names, [math.nan, 1e-6, math.nan]) == []  # NaN: no observation, the streak goes on
    state = hints.state_dict()
    restored = UpdateRatioHints(high=1e-2, low=1e-5, patience=3)
    restored.load_state_dict(state)
    for h in (hints, restored):
        assert h.update(names, [3.0e-2, 1e-6, 0.0]) == []
        # Third observation of each streak; 3.1e-2 is the geometric mean of 3.0e-2, 3.0e-2 and 3.3e-2. Both layers
        # in one message.
        assert h.update(names, [3.3e-2, 1e-6, 0.0]) == [
            "update/weight ratio above 1e-2 over the last 3 logs for 1 layer: 'encoder.3' 3.1e-2; the learning rate"
            " may be too high for it (about 1e-3 is usual); and below 1e-5 over the last 3 logs for 1 layer: 'head'"
            " 1.0e-6; it barely trains: the learning rate may be too low for it, or the gradient has become small"
            " (a task already fitted, vanishing gradients, or a model that a too-high rate has collapsed)"
        ]
        assert h.update(names, [5e-2, 1e-6, 0.0]) == []  # once per streak
    # One log back in the band is no recovery (a layer hovering at the edge of the band does not hint at every
    # crossing) ...
    assert hints.update(names, [1e-3, 1e-3, 0.0]) == []
    for _ in range(3):
        assert hints.update(names, [2e-2, 1e-3, 0.0]) == []
    # ... and after `patience` logs in the band, out of it again in the same direction, the layer is not named again:
    # once per direction (a layer hovering at the band's edge in a long run was named again after each recovery, 9
    # times in 8000 steps). Out on the other side, it is.
    for _ in range(3):
        assert hints.update(names, [1e-3, 1e-3, 0.0]) == []
    for _ in range(3):
        assert hints.update(names, [2e-2, 1e-3, 0.0]) == []
    for _ in range(3):
        assert hints.update(names, [1e-3, 1e-3, 0.0]) == []
    assert hints.update(names, [1e-6, 1e-3, 0.0]) == []
    assert hints.update(names, [1e-6, 1e-3, 0.0]) == []
    (message,) = hints.update(names, [1e-6, 1e-3, 0.0])
    assert "below 1e-5 over the last 3 logs for 1 layer: 'encoder.3'" in message
    restored = UpdateRatioHints(high=1e-2)
    restored.load_state_dict(hints.state_dict())
    for _ in range(3):
        assert restored.update(names, [1e-3, 1e-3, 0.0]) == []
    for _ in range(4):
        assert restored.update(names, [2e-2, 1e-6, 0.0]) == []  # encoder.3 and head were both named before
    with pytest.raises(ValueError, match="`ratios`"):
        hints.update(names, [1.0])


def test_update_ratio_hints_by_default_wait_for_a_tenth_of_the_weights_per_step() -> None:
    # Fresh heads and adapters trained with Adam sit at a few 1e-2 in healthy runs: no hint for them by default.
    hints = UpdateRatioHints()
    for _ in range(10):
        assert hints.update(["head", "adapter"], [4e-2, 9e-2]) == []
    assert hints.update(["head", "adapter"], [2e-1, 9e-2]) == []
    assert hints.update(["head", "adapter"], [2e-1, 9e-2]) == []
    (message,) = hints.update(["head", "adapter"], [2e-1, 9e-2])
    assert message.startswith("update/weight ratio above 1e-1 over the last 3 logs for 1 layer: 'head' 2.0e-1;")


def test_update_ratio_hints_name_the_worst_layers_in_one_message() -> None:
    hints = UpdateRatioHints(high=1e-2, patience=2, max_named=3)
    names = [f"block.{i}" for i in range(9)]
    ratios = [1.5e-2 * (i + 1) for i in range(9)]  # all nine above 1e-2, block.8 the furthest out
    assert hints.update(names, ratios) == []
    (message,) = hints.update(names, ratios)
    assert message.startswith("update/weight ratio above 1e-2 over the last 2 logs for 9 layers:")
    assert "'block.8' 1.4e-1, 'block.7' 1.2e-1, 'block.6' 1.0e-1 and 6 more;" in message
    assert "block.5" not in message
    # Streaks that already hinted stay quiet while they last, however long; a layer that joins later hints alone.
    for _ in range(5):
        assert hints.update(names, ratios) == []
    ratios[0] = 1e-3
    assert hints.update(names, ratios) == []
    assert hints.update(names, ratios) == []  # block.0 recovered: two logs in the band
    ratios[0] = 2e-2
    assert hints.update(names, ratios) == []
    assert hints.update(names, ratios) == []  # out again on the side it was named for: not named twice
    # Crossing to the other side is named.
    ratios[1] = 1e-7
    assert hints.update(names, ratios) == []
    assert "below 1e-5 over the last 2 logs for 1 layer: 'block.1' 1.0e-7" in hints.update(names, ratios)[0]


# ---------------------------------------------------------------------- zero fraction


def test_zero_fraction_counts_the_gradient_entries_of_dead_relu_units_exactly() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-100.0, -100.0, -100.0, 100, 100, 100, 100, 100]))  # 3 dead units
    model[3].weight.requires_grad_(True)
    index = build_layer_index(model)
    zeros = ZeroFraction(index)
    model[:3](torch.randn(32, 4)).pow(2).mean().backward()  # the last layer gets no gradient
    got = zeros.compute()
    # First layer: 3 dead rows of the weight (3 x 4) and 3 bias entries, of 8 x 4 + 8. Second: 3 of 8 weights + bias.
    assert got.tolist()[:2] == pytest.approx([15 / 40, 3 / 9])
    manual = [
        sum(int((p.grad == 0).sum()) for p in layer.parameters()) / sum(p.numel() for p in layer.parameters())
        for layer in (model[0], model[2])
    ]
    assert got.tolist()[:2] == pytest.approx(manual, abs=1e-7)
    assert math.isnan(float(got[2]))


def test_zero_fraction_of_a_layer_with_a_non_finite_gradient_is_nan_not_dense() -> None:
    # A NaN entry is not zero: a NaN batch read as "no zero gradient at all" (0.0) while its gradients were all NaN.
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    zeros = ZeroFraction(build_layer_index(model))
    model(torch.randn(4, 3)).sum().backward()
    model[0].weight.grad[0, 0] = math.nan
    model[1].bias.grad.zero_()  # the second layer: 1 zero of 3 entries
    got = zeros.compute()
    assert math.isnan(float(got[0])) and float(got[1]) == pytest.approx(1 / 3)
    model[0].weight.grad[0, 0] = math.inf
    assert math.isnan(float(zeros.compute()[0]))


def test_zero_fraction_of_a_sparse_embedding_gradient_counts_the_unused_rows() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    model = nn.Sequential(embedding, nn.Linear(3, 1))
    zeros = ZeroFraction(build_layer_index(model))
    model(torch.tensor([1, 2, 2, 1])).sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.is_sparse
    got = zeros.compute()
    assert got.tolist() == pytest.approx([8 / 10, 0.0])  # rows 1 and 2 of 10 used


def test_zero_fraction_of_complex_gradients_counts_entries_whose_modulus_is_zero_without_a_cast_warning() -> None:
    # Shapes whose fused 0-norm made torch cast the complex gradients to real: a cast warning, and purely imaginary
    # entries counted as zero.
    model = nn.Module()
    for name, shape in (("w1", (8, 32)), ("b1", (32,)), ("w2", (32, 1)), ("b2", (1,))):
        model.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.complex64)))
    zeros = ZeroFraction(build_layer_index(model))
    expected = []  # each parameter set on the module is its own layer
    for p in model.parameters():
        grad = torch.zeros_like(p).flatten()
        grad[0] = 1j  # purely imaginary: not zero
        grad[-1] = grad[-1] + 2.0
        p.grad = grad.reshape(p.shape)
        expected.append(1.0 - int((grad != 0).sum()) / p.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Casting complex values to real discards the imaginary part"
        got = zeros.compute()
    assert got.tolist() == pytest.approx(expected)


# ---------------------------------------------------------------------- activation-gradient norms


class Stack(nn.Module):
    """``late`` is defined before ``early`` but runs after it; an in-place ReLU follows ``early``."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(8, 3)
        self.early = nn.Linear(5, 8)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.late(self.act(self.early(x)))))

    def reference(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The same function, with every layer output kept for ``autograd.grad``."""
        early = self.early(x)
        late = self.late(torch.relu(early))
        head = self.head(torch.tanh(late))
        return head, [late, early, head]  # in `names` order


def _reference_norms(model: Stack, batches: list[Tensor], divide: float = 1.0) -> Tensor:
    squares = torch.zeros(3, dtype=torch.float64)
    for x in batches:
        out, outputs = model.reference(x)
        grads = torch.autograd.grad(out.pow(2).mean() / divide, outputs)
        squares += torch.stack([g.double().square().sum() for g in grads])
    return squares.sqrt().float()


def test_activation_gradient_norms_match_autograd_on_the_outputs() -> None:
    torch.manual_seed(3)
    model = Stack()
    grads = ActivationGradients(model)
    assert grads.names == ["late", "early", "head"]
    x = torch.randn(16, 5)

    grads.arm()
    model(x).pow(2).mean().backward()
    got = grads.disarm()
    assert got is not None
    torch.testing.assert_close(got, _reference_norms(model, [x]), rtol=1e-5, atol=0.0)

    # Gradient accumulation: two micro-batches, each loss divided by 2; the squares add up.
    first, second = torch.randn(8, 5), torch.randn(8, 5)
    grads.arm()
    grads.arm()  # armed once per step, however often asked
    for micro in (first, second):
        (model(micro).pow(2).mean() / 2).backward()
    got = grads.disarm()
    assert got is not None
    torch.testing.assert_close(got, _reference_norms(model, [first, second], divide=2.0), rtol=1e-5, atol=0.0)

    # A loss scale (16-bit AMP): the norms come out unscaled.
    scale = torch.tensor(1024.0)
    grads.arm()
    (model(x).pow(2).mean() * scale).backward()
    got = grads.disarm(grad_scale=scale)
    assert got is not None
    torch.testing.assert_close(got, _reference_norms(model, [x]), rtol=1e-5, atol=0.0)


def test_activation_gradients_leave_out_an_autograd_grad_call_outside_the_marked_backward() -> None:
    # A gradient penalty's torch.autograd.grad runs the hooks with the gradient of D(x).sum(), ones, not the loss's.
    torch.manual_seed(3)
    model = Stack()
    grads = ActivationGradients(model)
    x = torch.randn(16, 5)

    def step(mark: bool) -> torch.Tensor:
        grads.arm()
        xi = x.clone().requires_grad_(True)
        penalty = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)[0].pow(2).sum()
        loss = model(x).pow(2).mean() + 0.0 * penalty
        if mark:
            grads.backward_began()
        loss.backward()
        if mark:
            grads.backward_ended()
        got = grads.disarm()
        assert got is not None
        return got

    reference = _reference_norms(model, [x])
    torch.testing.assert_close(step(mark=True), reference, rtol=1e-5, atol=0.0)
    # Unmarked (a plain loop that does not mark), every pass counts: the penalty's ones dominate.
    assert bool((step(mark=False) > 2 * reference).all())


def test_flow_through_depth_follows_the_forward_order() -> None:
    torch.manual_seed(4)
    model = Stack()
    grads = ActivationGradients(model)
    x = torch.randn(16, 5)
    grads.arm()
    model(x).pow(2).mean().backward()
    norms = grads.disarm()
    assert norms is not None
    values = norms.tolist()
    points = grads.flow(values)
    assert [(p.depth, p.name) for p in points] == [(0, "early"), (1, "late"), (2, "head")]
    for p in points:
        assert p.log10_norm == pytest.approx(math.log10(values[grads.names.index(p.name)]))
    with pytest.raises(ValueError, match="`norms`"):
        grads.flow(values[:1])


@pytest.mark.parametrize("reentrant", [False, True])
def test_flow_through_depth_follows_the_forward_order_under_activation_checkpointing(reentrant: bool) -> None:
    """Checkpointed blocks recompute their forward during the backward, last block first; reentrant checkpointing
    runs the first forward under no_grad. Before, its flow came out in that recompute order (output to input)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(self.fc(x))

    class Checkpointed(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.inp, self.blocks, self.head = (
                nn.Linear(4, 8),
                nn.ModuleList([Block() for _ in range(3)]),
                nn.Linear(8, 1),
            )
            self.checkpointed = checkpointed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            for block in self.blocks:
                h = checkpoint(block, h, use_reentrant=reentrant) if self.checkpointed else block(h)
            return self.head(h)

    x = torch.randn(16, 4)
    measured = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Checkpointed(checkpointed)
        grads = ActivationGradients(model)
        grads.arm()
        model(x).pow(2).mean().backward()
        norms = grads.disarm()
        assert norms is not None
        measured.append(([p.name for p in grads.flow(norms.tolist())], norms))
    assert measured[1][0] == measured[0][0] == ["inp", "blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]
    torch.testing.assert_close(measured[1][1], measured[0][1])


def test_activation_gradient_of_an_lstm_is_that_of_its_output_sequence() -> None:
    torch.manual_seed(5)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    model = Recurrent()
    grads = ActivationGradients(model, names=["lstm", "head", "no.such.module"])
    assert grads.names == ["lstm", "head"] and grads.skipped == {"no.such.module": "not a module of the model"}
    x = torch.randn(6, 5, 3)
    grads.arm()
    model(x).pow(2).mean().backward()
    got = grads.disarm()
    out, _ = model.lstm(x)
    head = model.head(out[:, -1])
    reference = torch.autograd.grad(head.pow(2).mean(), [out, head])
    assert got is not None
    torch.testing.assert_close(got, torch.stack([g.norm() for g in reference]), rtol=1e-5, atol=0.0)


def test_activation_gradient_adds_up_every_output_tensor_the_loss_reads() -> None:
    """A classifier on an LSTM's last hidden state reads ``h_n``, not the output sequence; a dict-returning module
    whose first value is unused: both layers are measured, over every output tensor that got a gradient."""
    torch.manual_seed(6)

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            y = self.proj(x)
            return {"unused": y * 0.5, "logits": y, "same": y}  # the same tensor twice counts once

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.heads = Heads()

        def forward(self, x: Tensor) -> Tensor:
            out, (h_n, c_n) = self.lstm(x)
            return self.heads(h_n[-1] + c_n[-1].sum(1, keepdim=True))["logits"]

    model = Classifier()
    grads = ActivationGradients(model, names=["lstm", "heads.proj", "heads"])
    x = torch.randn(6, 5, 3)
    grads.arm()
    model(x).pow(2).mean().backward()
    got = grads.disarm()
    out, (h_n, c_n) = model.lstm(x)
    y = model.heads.proj(h_n[-1] + c_n[-1].sum(1, keepdim=True))
    g_h, g_c, g_y = torch.autograd.grad(y.pow(2).mean(), [h_n, c_n, y])
    expected = torch.stack([(g_h.square().sum() + g_c.square().sum()).sqrt(), g_y.norm(), g_y.norm()])
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0.0)


def test_activation_gradient_counts_no_output_twice() -> None:
    """Outputs computed from another output (a view, a mean), an input passed through and a 0-d auxiliary loss are
    left out: the main output's gradient already holds what flows through the first two, the layer before owns the
    third's, and the fourth's is the loss weight."""
    torch.manual_seed(7)

    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            y = self.proj(x)
            return y, y[:, -1], y.mean(1)

    class PassThrough(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            y = self.proj(x)
            return y, x, (y - 1.0).square().mean()  # the output, the input, an auxiliary loss

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.views = Views()
            self.passing = PassThrough()

        def forward(self, x: Tensor) -> Tensor:
            y, last, mean = self.views(x)
            z, same, aux = self.passing(y)
            return z.square().mean() + last.square().mean() + mean.sum() + same.mean() + 0.5 * aux

    model = Net()
    grads = ActivationGradients(model, names=["views", "passing"])
    x = torch.randn(6, 3)
    grads.arm()
    model(x).backward()
    got = grads.disarm()
    y, last, mean = model.views(x)
    z, same, aux = model.passing(y)
    loss = z.square().mean() + last.square().mean() + mean.sum() + same.mean() + 0.5 * aux
    g_y, g_z = torch.autograd.grad(loss, [y, z])  # y's gradient through every use, z's
    assert got is not None
    torch.testing.assert_close(got, torch.stack([g_y.norm(), g_z.norm()]), rtol=1e-5, atol=0.0)


# ---------------------------------------------------------------------- noise scale


def test_noise_scale_estimator_follows_the_formulas_of_appendix_a1() -> None:
    noise = NoiseScale(beta=0.5)
    assert math.isnan(noise.value) and noise.count == 0
    # Observation 1: |G|² = (32*1.5 - 8*3)/24 = 1, tr Σ = 1.5 / (1/8 - 1/32) = 16.
    # Observation 2: |G|² = (32*2.5 - 8*4)/24 = 2, tr Σ = 1.5 / (3/32) = 16.
    assert noise.update(3.0, 1.5, 8, 32) == pytest.approx(16.0)
    state = noise.state_dict()
    assert noise.update(torch.tensor(4.0), torch.tensor(2.5), 8, 32) == pytest.approx(
        (0.25 * 16 + 0.5 * 16) / (0.25 * 1 + 0.5 * 2)
    )
    assert noise.trace_sigma == pytest.approx(16.0)
    assert noise.grad_sq_norm == pytest.approx((0.25 + 1.0) / 0.75)
    assert noise.update(math.inf, 1.0, 8, 32) == noise.value and noise.count == 2  # no observation
    restored = NoiseScale(beta=0.5)
    restored.load_state_dict(state)
    assert restored.update(4.0, 2.5, 8, 32) == pytest.approx(noise.value)
    assert math.isnan(NoiseScale(beta=0.0).update(1.0, 2.0, 8, 32))  # a negative tr Σ estimate: undefined yet
    with pytest.raises(ValueError, match="`big_batch`"):
        noise.update(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="`small_batch`"):
        noise.update(1.0, 1.0, 0, 8)


def _true_noise_scale(model: nn.Linear, x: Tensor, y: Tensor) -> float:
    """B_simple = tr Σ / |G|² from the per-example gradients ``(x·w - y) x`` of ``0.5 (x·w - y)²`` over the data set."""
    with torch.no_grad():
        per_example = (x @ model.weight.T - y) * x
        return float(per_example.var(0, unbiased=False).sum() / per_example.mean(0).square().sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_scale_of_linear_regression_is_within_2x_of_the_per_example_truth(seed: int) -> None:
    dim, n, micro, k = 16, 4096, 16, 4
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w_star = torch.randn(dim, 1, generator=g)
    y = x @ w_star + torch.randn(n, 1, generator=g)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + torch.randn(dim, 1, generator=g) / dim**0.5).T)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    noise = NoiseScale(beta=0.95)
    local = LocalGradNorm(model.parameters())
    for _ in range(200):
        opt.zero_grad(set_to_none=True)
        order = torch.randperm(n, generator=g)[: micro * k]
        for i in range(k):
            batch = order[i * micro : (i + 1) * micro]
            if i == 0:
                local.arm()
            (0.5 * (model(x[batch]) - y[batch]).square().mean() / k).backward()
            if i == 0:
                small = squared_grad_norm(model.parameters(), scale=1.0 / k)  # |g_1|²: the loss was divided by k
                hooked = local.disarm(scale=1.0 / k)
                assert hooked is not None
                torch.testing.assert_close(hooked, small, rtol=1e-5, atol=0.0)
        big = squared_grad_norm(model.parameters())
        noise.update(small, big, micro, micro * k)
        opt.step()
    truth = _true_noise_scale(model, x, y)
    assert 20 < truth < 100  # a regime where the test means something: B_simple near B_big
    assert truth / 2 < noise.value < truth * 2, (noise.value, truth)


def test_local_grad_norm_sees_each_backward_alone() -> None:
    w = nn.Parameter(torch.ones(3))
    (2 * w).sum().backward()
    local = LocalGradNorm([w, nn.Parameter(torch.ones(1), requires_grad=False)])
    assert len(local.params) == 1
    local.arm()
    (3 * w).sum().backward()  # .grad is now 5, the backward's own gradient 3
    assert float(local.disarm()) == pytest.approx(27.0)  # type: ignore[arg-type]
    assert local.disarm() is None
    local.arm()
    assert local.disarm() is None  # no backward: nothing measured


def test_noise_scale_source_and_its_note() -> None:
    assert noise_scale_source(2, 1) == "accumulation"
    assert noise_scale_source(4, 8) == "accumulation"  # the first micro-batch is local under DDP (no_sync)
    assert noise_scale_source(1, 2) == "distributed"
    assert noise_scale_source(1, 1) is None
    assert "accumulate_grad_batches" in NOISE_SCALE_NOTE
    with pytest.raises(ValueError, match="`world_size`"):
        noise_scale_source(1, 0)


# ---------------------------------------------------------------------- per-epoch summaries


def test_epoch_summary_percentiles_max_and_event_counts_per_epoch() -> None:
    summary = EpochSummary(percentiles=(50, 90, 99))
    assert summary.end_epoch() == {}
    for value in range(101):  # 0..100: the q-th percentile is q
        summary.update(float(value), events={"exploding": value // 40, "nonfinite": 0})
    summary.update(math.nan, total_norm_max=250.0)  # a spike between two logs; a NaN total counts for no percentile
    first = summary.end_epoch()
    assert first == {
        "gradguard/epoch/total_norm_p50": 50.0,
        "gradguard/epoch/total_norm_p90": 90.0,
        "gradguard/epoch/total_norm_p99": 99.0,
        "gradguard/epoch/total_norm_max": 250.0,
        "gradguard/epoch/events/exploding": 2.0,
        "gradguard/epoch/events/nonfinite": 0.0,
        "gradguard/epoch/logs": 101.0,
    }
    summary.update(3.0, events={"exploding": 5, "nonfinite": 1})
    state = summary.state_dict()
    restored = EpochSummary()
    restored.load_state_dict(state)
    for s in (summary, restored):
        second = s.end_epoch(prefix="x/")
        assert second["x/events/exploding"] == 3.0 and second["x/events/nonfinite"] == 1.0
        assert second["x/total_norm_p50"] == 3.0 and second["x/logs"] == 1.0
    manual = np.percentile(np.arange(101.0), [50, 90, 99])
    assert manual.tolist() == [50.0, 90.0, 99.0]


def test_an_endless_epoch_keeps_a_bounded_evenly_spread_sample_of_its_norms() -> None:
    # A run of one endless epoch (an IterableDataset) logged every 50 steps for a million steps: 20,000 logs.
    summary = EpochSummary(percentiles=(50, 90), max_samples=64)
    for value in range(20_000):
        summary.update(float(value))
        assert len(summary.state_dict()["norms"]) < 128
    epoch = summary.end_epoch()
    assert epoch["gradguard/epoch/logs"] == 20_000.0  # every log counted, not only the kept ones
    # The kept norms are spread evenly over the epoch: the percentiles land within one stride of the exact ones.
    assert abs(epoch["gradguard/epoch/total_norm_p50"] - 9_999.5) < 512
    assert abs(epoch["gradguard/epoch/total_norm_p90"] - 17_999.1) < 512
    restored = EpochSummary(max_samples=64)  # a state saved before the thinning still loads, counting its norms
    legacy = {k: v for k, v in summary.state_dict().items() if k not in ("logs", "stride")}
    restored.load_state_dict({**legacy, "norms": [1.0, 2.0, 3.0]})
    assert restored.end_epoch()["gradguard/epoch/logs"] == 3.0
    restored.load_state_dict({**legacy, "norms": [float(v) for v in range(10_000)]})  # kept whole before: thinned
    restored.update(1.0)
    assert len(restored.state_dict()["norms"]) < 128


def test_host_state_survives_a_weights_only_checkpoint() -> None:
    noise, hints, summary = NoiseScale(), UpdateRatioHints(patience=2), EpochSummary()
    noise.update(3.0, 1.5, 8, 32)
    hints.update(["a"], [0.5])
    summary.update(2.0, 4.0, {"exploding": 1.0})
    buffer = io.BytesIO()
    torch.save({"noise": noise.state_dict(), "hints": hints.state_dict(), "summary": summary.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as Lightning's fit(ckpt_path=...) loads
    copies = NoiseScale(), UpdateRatioHints(patience=2), EpochSummary()
    for copy, key in zip(copies, ("noise", "hints", "summary")):
        copy.load_state_dict(state[key])
    assert copies[0].update(3.0, 1.5, 8, 32) == noise.update(3.0, 1.5, 8, 32)
    assert copies[1].update(["a"], [0.5]) == hints.update(["a"], [0.5]) != []
    assert copies[2].end_epoch() == summary.end_epoch()
    with pytest.raises(ValueError, match="version"):
        NoiseScale().load_state_dict({"version": 99})


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: UpdateRatio("index"), "index"),  # type: ignore[arg-type]
        (lambda: UpdateRatio(build_layer_index(nn.Linear(1, 1)), distributed_sum="yes"), "distributed_sum"),  # type: ignore[arg-type]
        (lambda: ZeroFraction(None), "index"),  # type: ignore[arg-type]
        (lambda: UpdateRatioHints(high=1e-6, low=1e-5), "high"),
        (lambda: UpdateRatioHints(low=0.0), "low"),
        (lambda: UpdateRatioHints(patience=0), "patience"),
        (lambda: UpdateRatioHints(patience=True), "patience"),
        (lambda: UpdateRatioHints(max_named=0), "max_named"),
        (lambda: ActivationGradients("model"), "module"),  # type: ignore[arg-type]
        (lambda: ActivationGradients(nn.Linear(1, 1), names="0"), "names"),
        (lambda: LocalGradNorm(torch.ones(1)), "params"),
        (lambda: NoiseScale(beta=1.0), "beta"),
        (lambda: NoiseScale(beta=math.nan), "beta"),
        (lambda: EpochSummary(percentiles=(50, 101)), "percentiles"),
        (lambda: EpochSummary(percentiles=()), "percentiles"),
        (lambda: squared_grad_norm([], scale=-1.0), "scale"),
        (lambda: ActivationGradients(nn.Linear(1, 1)).disarm(grad_scale="2"), "grad_scale"),
    ],
)
def test_arguments_are_checked_by_name(build: Any, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        build()


# ---------------------------------------------------------------------- quiet steps


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_ops(model: nn.Module, x: Tensor) -> list[str]:
    model.zero_grad(set_to_none=True)
    with _OpCounter() as counter:
        model(x).pow(2).mean().backward()
    return counter.ops


def test_quiet_steps_have_no_hooks_and_run_no_extra_op() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(8, 4)
    before = _step_ops(model, x)
    index = build_layer_index(model)
    act, local = ActivationGradients(model), LocalGradNorm(model.parameters())
    UpdateRatio(index), ZeroFraction(index), NoiseScale(), EpochSummary(), UpdateRatioHints()
    assert _hooks(model) == 0  # constructing registers nothing
    assert _step_ops(model, x) == before  # and a quiet step runs exactly the ops it ran without diagnostics

    act.arm()
    local.arm()
    assert all(model[i]._forward_hooks for i in (0, 2)) and _hooks(model) == 2 + 4
    model(x).pow(2).mean().backward()
    act.disarm()
    local.disarm()
    assert _hooks(model) == 0 and all(not m._forward_hooks for m in model.modules())
    assert _step_ops(model, x) == before

    # A graph built while armed but run backward after disarm feeds nothing into the next measurement.
    act.arm()
    stale = model(x).pow(2).mean()
    assert act.disarm() is not None
    act.arm()
    stale.backward()
    fresh = act.disarm()
    assert fresh is not None and bool(fresh.isnan().all())


def test_logging_step_calls_never_sync_with_the_device() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    index = build_layer_index(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    act, local = ActivationGradients(model), LocalGradNorm(model.parameters())
    ratio, zeros = UpdateRatio(index), ZeroFraction(index)
    calls: list[str] = []
    for _ in range(2):  # the second time, from the caches
        with SyncRecorder(calls):
            act.arm()
            local.arm()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            local.disarm(scale=torch.tensor(2.0))
            squared_grad_norm(model.parameters())
            zeros.compute()
            act.disarm(grad_scale=torch.tensor(1.0))
            ratio.before_step()
            opt.step()
            ratio.after_step()
    assert calls == []


# ---------------------------------------------------------------------- the hook points in Trainer.fit


class DeadUnits(L.LightningModule):
    """An MLP whose first four hidden units are dead, keeping each layer's output for reference gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        with torch.no_grad():
            self.net[0].bias[:4] = -100.0
        self.outputs: list[list[Tensor]] = []  # per micro-batch of the current step
        self.batches: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        outputs = []
        h = x
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in (0, 2, 4):
                h.retain_grad()
                outputs.append(h)
        self.outputs.append(outputs)
        self.batches.append((x, y))
        return nn.functional.mse_loss(h, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class DiagnosticsProbe(Callback):
    """The adapter's wiring in miniature, with a reference for every value, every ``every``-th step a logging step."""

    def __init__(self, every: int = 2) -> None:
        self.every = every
        self.records: list[dict[str, Any]] = []
        self.quiet_hooks: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.index = build_layer_index(pl_module)
        self.params = list(self.index.params)
        self.ratio = UpdateRatio(self.index)
        self.zeros = ZeroFraction(self.index)
        self.act = ActivationGradients(pl_module, self.index.names)
        self.noise = NoiseScale(beta=0.0)
        self.source = noise_scale_source(trainer.accumulate_grad_batches, trainer.world_size)
        self.micro = 0
        self.sizes: list[int] = []

    def _logging(self, trainer: L.Trainer) -> bool:
        return (trainer.global_step + 1) % self.every == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.micro == 0:
            pl_module.outputs.clear()
            pl_module.batches.clear()
            self.sizes = []
        self.sizes.append(len(batch[0]))
        if self._logging(trainer):
            self.act.arm()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.micro == 0 and self._logging(trainer):
            # Lightning divided the loss by accumulate_grad_batches: undo it.
            self.small = squared_grad_norm(self.params, scale=1.0 / trainer.accumulate_grad_batches)
        self.micro += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.micro = 0
        if not self._logging(trainer):
            self.quiet_hooks.append(_hooks(pl_module))
            return
        record: dict[str, Any] = {"step": trainer.global_step + 1}
        record["zero"] = self.zeros.compute()
        record["big"] = squared_grad_norm(self.params)
        record["small"] = self.small
        record["act"] = self.act.disarm()
        self.ratio.before_step()
        # References: reading the gradients and outputs directly, and the small and big batch gradients again with
        # autograd at the current weights.
        record["zero_ref"] = [
            sum(int((p.grad == 0).sum()) for p in pl_module.net[i].parameters())
            / sum(p.numel() for p in pl_module.net[i].parameters())
            for i in (0, 2, 4)
        ]
        record["act_ref"] = [
            math.sqrt(sum(float(outputs[j].grad.double().square().sum()) for outputs in pl_module.outputs))
            for j in range(3)
        ]
        losses = [nn.functional.mse_loss(pl_module.net(x), y) for x, y in pl_module.batches]
        small = torch.autograd.grad(losses[0], self.params, retain_graph=True)
        big = torch.autograd.grad(sum(losses) / len(losses), self.params)
        record["small_ref"] = sum(float(g.double().square().sum()) for g in small)
        record["big_ref"] = sum(float(g.double().square().sum()) for g in big)
        record["weights"] = [p.detach().clone() for p in self.params]
        record["sizes"] = list(self.sizes)
        self.records.append(record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ratio.pending:  # the end of a logging step's last micro-batch: the update is in the parameters
            record = self.records[-1]
            record["ratio"] = self.ratio.after_step()
            before = dict(enumerate(record.pop("weights")))
            after = {i: p.detach() - before[i] for i, p in enumerate(self.params)}
            delta, norm = _layer_norms(self.index, after), _layer_norms(self.index, before)
            record["ratio_ref"] = [d / n for d, n in zip(delta, norm)]
            sizes = record["sizes"]
            record["noise"] = self.noise.update(
                record["small"], record["big"], sizes[0], sum(sizes) * trainer.world_size
            )


def test_the_hook_points_work_in_trainer_fit_with_gradient_accumulation() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(48, 6, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(48, 1, generator=g)), batch_size=4)
    torch.manual_seed(8)
    model = DeadUnits()
    probe = DiagnosticsProbe(every=2)
    trainer(callbacks=[probe], max_steps=6, accumulate_grad_batches=2).fit(model, data)

    assert probe.source == "accumulation"
    assert [r["step"] for r in probe.records] == [2, 4, 6]
    assert probe.quiet_hooks == [0, 0, 0]  # quiet steps: no hook anywhere
    assert _hooks(model) == 0
    assert not math.isnan(probe.records[0]["noise"])  # (later steps: a negative estimate, and beta=0 keeps no memory)
    for r in probe.records:
        assert r["zero"].tolist() == pytest.approx(r["zero_ref"], abs=1e-6)
        assert r["zero_ref"][0] == pytest.approx((4 * 6 + 4) / (8 * 6 + 8))  # the four dead units
        assert r["act"].tolist() == pytest.approx(r["act_ref"], rel=1e-5)
        assert r["ratio"].tolist() == pytest.approx(r["ratio_ref"], rel=1e-4)
        assert float(r["small"]) == pytest.approx(r["small_ref"], rel=1e-5)
        assert float(r["big"]) == pytest.approx(r["big_ref"], rel=1e-5)
        assert r["sizes"] == [4, 4]
        small, big = r["small_ref"], r["big_ref"]
        trace, grad_sq = (small - big) / (1 / 4 - 1 / 8), (8 * big - 4 * small) / 4
        expected = trace / grad_sq if trace > 0 and grad_sq > 0 else math.nan
        assert r["noise"] == pytest.approx(expected, rel=1e-4, nan_ok=True)


def test_activation_gradients_divide_each_backward_by_the_scale_it_ran_with() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x1, x2 = torch.randn(16, 4), torch.randn(16, 4)

    def measure(scales: tuple[float, float], by_arm: bool) -> torch.Tensor:
        grads = ActivationGradients(net)
        scale = torch.tensor(scales[0])
        grads.arm(grad_scale=(lambda: scale) if by_arm else None)
        (net(x1).pow(2).mean() * scales[0]).backward()
        scale.fill_(scales[1])  # in place, as GradScaler.update() does between two optimizers' backwards
        (net(x2).pow(2).mean() * scales[1]).backward()
        net.zero_grad()
        result = grads.disarm()
        assert result is not None
        return result

    plain = measure((1.0, 1.0), by_arm=False)
    assert torch.allclose(measure((256.0, 512.0), by_arm=True), plain, rtol=1e-5)
    grads = ActivationGradients(net)
    with pytest.raises(ValueError, match="`grad_scale`"):
        grads.arm(grad_scale=2.0)  # type: ignore[arg-type]
    grads.arm(grad_scale=lambda: 2.0)
    with pytest.raises(ValueError, match="`grad_scale`"):
        grads.disarm(grad_scale=2.0)
