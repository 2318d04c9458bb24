import math

import pytest
import torch
from torch import nn

from lightning_gradguard.layers import ROOT_LAYER, build_layer_index
from lightning_gradguard.stats import GradStats, total_norm


class Tricky(nn.Module):
    """Tied weights, a frozen layer, a parameter without gradient, fp64 parameters and a root-owned parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(8, 8)  # never called: its parameters get no gradient
        self.wide = nn.Linear(8, 8).double()
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed(idx))
        h = self.frozen(h)
        h = h + self.wide(h.double()).float()
        return self.head(h) * self.temperature


def _reference(model: nn.Module) -> tuple[dict[str, float], float]:
    seen: set[int] = set()
    per_layer: dict[str, float] = {}
    for name, module in model.named_modules():
        grads: dict[str, list[torch.Tensor]] = {}
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p.grad is not None:
                # A parameter set on the root module is a layer of its own, named by its attribute.
                grads.setdefault(name or attr, []).append(p.grad.double().flatten())
        for layer, parts in grads.items():
            per_layer[layer] = torch.linalg.vector_norm(torch.cat(parts)).item()
    total = math.sqrt(sum(v * v for v in per_layer.values()))
    return per_layer, total


def test_per_layer_and_total_norms_match_a_naive_reference() -> None:
    torch.manual_seed(0)
    model = Tricky()
    model(torch.randint(0, 10, (4, 5))).square().mean().backward()
    index = build_layer_index(model)
    assert "frozen" not in index.names
    ids = [id(p) for p in index.params]
    assert ids.count(id(model.embed.weight)) == 1  # tied weight counted once
    assert index.names[index.layer_of_param[ids.index(id(model.embed.weight))]] == "embed"
    stats = GradStats(index.params, index.layer_of_param, index.num_layers).compute(param_norms=True)
    ref, ref_total = _reference(model)
    got = dict(zip(index.names, stats.layer_norm.tolist()))
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-6)
    assert got["unused"] == 0.0
    present = dict(zip(index.names, stats.layer_present.tolist()))
    assert not present["unused"] and present["wide"] and present["temperature"]
    assert ROOT_LAYER not in index.names
    assert stats.total_norm.item() == pytest.approx(ref_total, rel=1e-6)
    assert not stats.nonfinite.item()
    assert stats.layer_param_norm is not None
    body0 = index.names.index("body.0")
    expected = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.body[0].parameters()])).item()
    assert stats.layer_param_norm[body0].item() == pytest.approx(expected, rel=1e-6)


def test_nonfinite_flags_name_the_layer_and_fp16_norms_do_not_overflow() -> None:
    lin = nn.Linear(4, 4)
    half = nn.Linear(4, 4).half()
    model = nn.ModuleDict({"a": lin, "b": half})
    lin.weight.grad = torch.ones_like(lin.weight)
    lin.bias.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    half.weight.grad = torch.full_like(half.weight, 60000.0)  # finite fp16, norm 240000 > fp16 max
    index = build_layer_index(model)
    stats = GradStats(index.params, index.layer_of_param, index.num_layers).compute()
    assert stats.nonfinite.item()
    assert stats.layer_nonfinite.tolist() == [True, False]
    assert stats.layer_norm[1].item() == pytest.approx(240000.0, rel=1e-3)
    assert math.isnan(stats.total_norm.item())


def test_grouping_by_depth_and_callable() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert build_layer_index(model).names == ["0.0", "0.1", "1"]
    assert build_layer_index(model, group_depth=1).names == ["0", "1"]
    assert build_layer_index(model, group_fn=lambda n: n.split(".")[-1]).names == ["weight", "bias"]
    with pytest.raises(ValueError, match="group_depth"):
        build_layer_index(model, group_depth=0)
    with pytest.raises(ValueError, match="group_fn"):
        build_layer_index(model, group_fn=lambda n: "")


def test_subset_and_layers_appearing_mid_run() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    index = build_layer_index(model, include_frozen=True)
    assert index.names == ["0", "1"]
    sub = index.subset(model[1].parameters())
    assert sub.names == ["1"] and sub.layer_of_param == [0, 0]
    engine = GradStats(index.params, index.layer_of_param, index.num_layers)
    model(torch.randn(2, 3)).sum().backward()
    assert engine.compute().layer_present.tolist() == [False, True]
    model[0].requires_grad_(True)  # unfrozen: the layer now shows up
    model.zero_grad()
    model(torch.randn(2, 3)).sum().backward()
    stats = engine.compute()
    assert stats.layer_present.tolist() == [True, True] and stats.layer_norm[0] > 0


def test_total_norm_helper_and_empty() -> None:
    assert total_norm([torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.float64)]).item() == pytest.approx(5.0)
    engine = GradStats([nn.Parameter(torch.ones(2))], [0], 1)
    stats = engine.compute()
    assert stats.grads == [] and stats.total_norm.item() == 0.0


def test_invalid_arguments() -> None:
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="layer_of_param"):
        GradStats([p], [0, 1], 2)
    with pytest.raises(ValueError, match="layer_of_param"):
        GradStats([p], [3], 2)
