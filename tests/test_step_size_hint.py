"""The start-of-training hint for an Adam-type optimizer whose rate is large against the weights it trains."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard.diagnostics import STEP_SIZE_HIGH, adaptive_step_ratio
from tests.models import Regressor, regression_data, trainer


def _net(scale: float) -> nn.Sequential:
    """Two weight matrices whose entries are all ``scale`` (root-mean-square ``scale``), biases far larger."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with torch.no_grad():
        for layer in net:
            layer.weight.fill_(scale)
            layer.bias.fill_(100.0)
    return net


def test_the_ratio_is_the_rate_over_each_weight_tensors_root_mean_square() -> None:
    net = _net(0.05)
    size = adaptive_step_ratio(torch.optim.Adam(net.parameters(), lr=0.1), [0.1])
    assert size is not None
    # Biases (one dimension) are left out: with them the median would be far lower.
    assert size.tensors == 2
    assert size.ratio == pytest.approx(2.0)
    assert size.rms == pytest.approx(0.05)
    assert size.worst_ratio == pytest.approx(2.0)


def test_each_group_is_judged_at_its_own_rate_and_zero_or_unrated_tensors_are_left_out() -> None:
    net = _net(0.05)
    zero = nn.Linear(8, 8)
    nn.init.zeros_(zero.weight)  # LoRA's B, a zero-initialised output layer: grows from its own start
    frozen = nn.Linear(8, 8)
    nn.init.constant_(frozen.weight, 1e-6)
    frozen.weight.requires_grad_(False)  # a frozen backbone handed to the optimizer: never stepped
    empty = nn.Parameter(torch.zeros(0, 4))  # a soft prompt of 0 tokens: before, a division by its 0 elements
    groups = [
        {"params": [net[0].weight], "lr": 0.5},
        {"params": [net[1].weight, zero.weight, frozen.weight, empty], "lr": 0.01},
    ]
    optimizer = torch.optim.AdamW(groups)
    size = adaptive_step_ratio(optimizer, [0.5, 0.01], names={id(net[0].weight): "enc.weight"})
    assert size is not None
    assert size.tensors == 2
    assert size.ratio == pytest.approx((10.0 + 0.2) / 2)
    assert (size.worst, size.worst_ratio) == ("enc.weight", pytest.approx(10.0))
    only_second = adaptive_step_ratio(optimizer, [None, 0.01])
    assert only_second is not None and only_second.tensors == 1
    assert only_second.ratio == pytest.approx(0.2)
    assert only_second.worst == "a (1, 8) tensor"  # no name given: its shape


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=10.0),
        lambda p: torch.optim.Adagrad(p, lr=10.0),
        lambda p: torch.optim.Adafactor(p, lr=10.0),
    ],
)
def test_optimizers_whose_steps_do_not_follow_the_rate_per_weight_are_not_judged(optimizer: Any) -> None:
    net = _net(0.05)
    assert adaptive_step_ratio(optimizer(net.parameters()), [10.0]) is None


def _fit(lr: float, optimizer: str = "adam", **guard: Any) -> list[str]:
    model = Regressor(net=_net(0.05), dim=4, lr=lr, optimizer=optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[GradGuard(**guard)]).fit(model, regression_data(n=64, dim=4))
    return [str(w.message) for w in caught if "moves each weight" in str(w.message)]


def test_a_fit_at_a_rate_above_the_weights_size_gets_one_hint() -> None:
    (hint,) = _fit(lr=0.1)
    assert "optimizer 0 (Adam)" in hint
    assert "base rate 0.1 is 2x the typical size of the weights" in hint
    assert "2 weight tensors: 0.05" in hint
    assert "try a rate 3-10x lower" in hint


def test_no_hint_at_a_usual_rate_for_sgd_or_with_the_update_ratio_off() -> None:
    assert STEP_SIZE_HIGH > 0.01 / 0.05  # the usual rate below
    assert _fit(lr=0.01) == []
    assert _fit(lr=0.1, optimizer="sgd") == []
    assert _fit(lr=0.1, diagnostics=["noise_scale"]) == []
    assert len(_fit(lr=0.1, diagnostics=["update_ratio"])) == 1


class _OneCycle(Regressor):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.001)
        cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}


def test_a_schedule_is_judged_by_its_peak() -> None:
    # OneCycleLR starts at max_lr / 25: the rate it reaches is the one the weights meet.
    model = _OneCycle(net=_net(0.05), dim=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[GradGuard()]).fit(model, regression_data(n=64, dim=4))
    (hint,) = [str(w.message) for w in caught if "moves each weight" in str(w.message)]
    assert "peak rate 0.2 is 4x" in hint


class _TwoRates(Regressor):
    def configure_optimizers(self) -> Any:
        first, last = self.net[0], self.net[1]
        return torch.optim.Adam([{"params": first.parameters(), "lr": 0.2}, {"params": last.parameters(), "lr": 0.1}])


def test_several_rates_are_named_as_such() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=2, callbacks=[GradGuard()]).fit(
            _TwoRates(net=_net(0.05), dim=4), regression_data(n=64, dim=4)
        )
    (hint,) = [str(w.message) for w in caught if "moves each weight" in str(w.message)]
    assert "and its base rates are 3x the typical size" in hint  # "rates is", before


def test_a_lazy_module_trained_with_adam_is_judged_on_its_initialized_weights_only() -> None:
    # Lightning starts training before the first forward pass creates a lazy module's weights: `dim()` of an
    # uninitialized parameter raises, and the hint stopped such a fit before its first step.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LazyLinear(1))
    with torch.no_grad():
        net[0].weight.fill_(0.05)
    size = adaptive_step_ratio(torch.optim.Adam(net.parameters(), lr=0.1), [0.1])
    assert size is not None and size.tensors == 1 and size.ratio == pytest.approx(2.0)
    model = Regressor(net=nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(1)), dim=4, optimizer="adam")
    trainer(max_steps=3, callbacks=[GradGuard()]).fit(model, regression_data(n=64, dim=4))
    assert model.trainer.global_step == 3
    assert all(not isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def test_a_lazy_model_is_judged_at_its_first_step_once_its_weights_exist() -> None:
    # At the start of training a lazy model has no weights to measure, and got no hint at all (user trial: AdamW at
    # 0.09 against weights of 0.07, hinted for the same model built eagerly).
    def hints(net: nn.Module) -> list[str]:
        torch.manual_seed(0)
        model = Regressor(net=net, dim=4, lr=0.1, optimizer="adam")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(max_steps=3, callbacks=[GradGuard()]).fit(model, regression_data(n=64, dim=4))
        return [str(w.message) for w in caught if "moves each weight" in str(w.message)]

    (hint,) = hints(nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(1)))
    assert "optimizer 0 (Adam)" in hint and "2 weight tensors" in hint
    assert hints(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))) != []  # as built eagerly
