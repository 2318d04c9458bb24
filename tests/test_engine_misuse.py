"""A plain loop's mistakes meet a ValueError that names the argument, at the call that makes them, instead of an
AttributeError deep inside a later step or a silent wrong result."""

from __future__ import annotations

import gc
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import (
    AGC,
    L2,
    AdaGC,
    AutoClip,
    DivergenceDetector,
    ExplodingDetector,
    GradGuard,
    GuardEngine,
    LocalGradNorm,
    LRGuard,
    NormClip,
    Rollback,
    VanishingDetector,
    ZClip,
)
from lightning_gradguard.diagnostics import UpdateRatioHints
from lightning_gradguard.layers import build_layer_index
from lightning_gradguard.rollback import default_rollback


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def test_lr_guard_default_is_an_lr_guard_as_in_gradguard() -> None:
    model = _model()
    engine = GuardEngine(model, lr_guard="default")
    assert isinstance(engine.lr_guard, LRGuard)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    for _ in range(3):  # the second step lands the first one's flags on the LR guard
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        engine.step(optimizer=opt)
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": "encoder"}, "`key` must be an integer"),
        ({"key": 1.5}, "`key` must be an integer"),
        ({"key": True}, "`key` must be an integer"),
        ({"regularizers": L2(1e-4)}, "`regularizers` must be a list"),
        ({"regularizers": [L2]}, "`regularizers` must hold Regularizer instances"),
        ({"regularizers": [ZClip()]}, "`regularizers` must hold Regularizer instances"),
        ({"regularizers": [L2(1e-4), L2(1e-3)]}, "`regularizers` need distinct names"),
        ({"group_fn": "layer"}, "`group_fn` must be a callable or None"),
        ({"group_depth": True}, "`group_depth` must be an integer >= 1 or None"),
        ({"group_depth": 0}, "`group_depth` must be an integer >= 1 or None"),
        ({"compile": "Auto"}, "`compile` must be True, False or 'auto'"),
    ],
)
def test_constructor_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GuardEngine(_model(), **kwargs)


def test_no_regularizers_may_be_none_as_in_gradguard() -> None:
    assert GuardEngine(_model(), regularizers=None).regularizers == []


def test_no_optimizer_is_refused_and_another_models_is_warned_about_once() -> None:
    model, other = _model(), _model()
    engine = GuardEngine(model, lr_guard=LRGuard())
    for wrong in (model, "sgd"):
        with pytest.raises(ValueError, match="`optimizer` must be a torch.optim.Optimizer"):
            engine.attach(wrong)  # type: ignore[arg-type]
    # Another model's optimizer (or DeepSpeed's ZeRO one, which holds flat copies: the same test cannot tell them
    # apart): a warning, once per optimizer.
    foreign = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="holds none of the parameters this engine watches"):
        engine.attach(foreign)
    model(torch.randn(8, 4)).square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step(optimizer=foreign)  # checked already
    with pytest.raises(ValueError, match="`optimizer` must be a torch.optim.Optimizer"):
        engine.step(optimizer=model)  # type: ignore[arg-type]
    # The LR guard's hooks sit on the optimizer given to attach(): another one would step at the full rate.
    part = torch.optim.SGD(model[0].parameters(), lr=0.1)
    model(torch.randn(8, 4)).square().mean().backward()  # the next step's gradients
    with pytest.raises(ValueError, match="attached to another optimizer"):
        engine.step(optimizer=part)
    # An optimizer holding part of the model (one of several) is fine.
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(part)
    assert engine.step(optimizer=part) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "abc"}, "`loss` must be a tensor, a real number or None"),
        ({"loss": "1.0"}, "`loss` must be a tensor, a real number or None"),
        ({"loss": True}, "`loss` must be a tensor, a real number or None"),
        ({"loss": [1.0]}, "`loss` must be a tensor, a real number or None"),
        ({"step": "x"}, "`step` must be an integer step number or None"),
        ({"step": 1.7}, "`step` must be an integer step number or None"),
        ({"step": -3}, "`step` must be a step number >= 0 or None"),
        ({"grad_scale": "1024"}, "`grad_scale` must be a tensor, a real number > 0 and finite, or None"),
        # 0 or NaN would make every step non-finite; a negative scale would flip the clipped gradients
        ({"grad_scale": 0}, "`grad_scale` must be a tensor, a real number > 0 and finite, or None"),
        ({"grad_scale": -1.0}, "`grad_scale` must be a tensor, a real number > 0 and finite, or None"),
        ({"grad_scale": float("nan")}, "`grad_scale` must be a tensor, a real number > 0 and finite, or None"),
        ({"grad_scale": float("inf")}, "`grad_scale` must be a tensor, a real number > 0 and finite, or None"),
        # a tensor's value is not read (a sync), but its shape and kind are
        ({"grad_scale": torch.ones(3)}, r"`grad_scale` must be a one-element real tensor .* shape \(3,\)"),
        ({"grad_scale": torch.tensor(True)}, "`grad_scale` must be a one-element real tensor"),
        ({"grad_scale": torch.tensor(2j)}, "`grad_scale` must be a one-element real tensor"),
    ],
)
def test_step_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    model = _model()
    engine = GuardEngine(model, divergence=None)  # the loss is checked whether or not a detector reads it
    model(torch.randn(8, 4)).square().mean().backward()
    with pytest.raises(ValueError, match=match):
        engine.step(**kwargs)


def test_integer_step_numbers_of_any_kind_are_taken() -> None:
    import numpy as np

    model = _model()
    engine = GuardEngine(model)
    for number in (3, np.int64(4), torch.tensor(5)):
        model(torch.randn(8, 4)).square().mean().backward()
        assert engine.step(number) is not None  # type: ignore[arg-type]
    assert GuardEngine(_model(), key=-1).key == -1  # any integer names an optimizer in a shared LRGuard


def test_a_python_number_as_grad_scale_is_the_same_as_the_tensor() -> None:
    norms = []
    for scale in (1024.0, torch.tensor(1024.0)):
        model = _model()
        engine = GuardEngine(model)
        (model(torch.ones(8, 4)).square().mean() * 1024.0).backward()
        stats = engine.step(grad_scale=scale)
        assert stats is not None
        norms.append(engine.snapshot().total_norm)
    assert norms[0] == norms[1] and math.isfinite(norms[0])


def _cut_run(attach: bool) -> tuple[GuardEngine, list[float], list[str]]:
    """SGD at 0.05 with two x1e4 losses (steps 40 and 42): the LR guard, counting lone spikes too, cuts once."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GuardEngine(model, lr_guard=LRGuard(spare_lone=False), rollback=None)
    if attach:
        engine.attach(opt)
    rates: list[float] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: rates.append(o.param_groups[0]["lr"]))
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 80):
            opt.zero_grad()
            x = torch.randn(32, 4, generator=gen)
            loss = (model(x) - x.sum(1, keepdim=True)).square().mean() * (1e4 if step in (40, 42) else 1.0)
            loss.backward()
            engine.step(optimizer=opt)
            opt.step()
            engine.drain()
    return engine, rates, [str(w.message) for w in caught if "attached to no optimizer" in str(w.message)]


def test_a_cut_of_an_lr_guard_attached_to_no_optimizer_is_said_once() -> None:
    engine, rates, said = _cut_run(attach=False)
    assert engine.summary()["lr_reduced"] >= 1 and engine.lr_guard.scale(0) < 1.0
    assert min(rates) == 0.05  # the cut reached no learning rate ...
    assert len(said) == 1 and "engine.attach(optimizer)" in said[0]  # ... and the user is told, once
    engine, rates, said = _cut_run(attach=True)
    assert engine.summary()["lr_reduced"] >= 1 and min(rates) < 0.05 and not said


def test_load_state_dict_names_what_it_needs() -> None:
    with pytest.raises(ValueError, match="`state` must be a dict from GuardEngine.state_dict"):
        GuardEngine(_model()).load_state_dict(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"GuardEngine.state_dict\(\) \(it has 'layers'\), got keys \['mean'\]"):
        GuardEngine(_model()).load_state_dict({"mean": 1})


@pytest.mark.parametrize(
    "part",
    [
        ZClip(),
        AutoClip(),
        AdaGC(),
        AGC(),
        NormClip(1.0),
        ExplodingDetector(),
        VanishingDetector(),
        DivergenceDetector(),
        LRGuard(),
        Rollback(),
        L2(1e-4),
    ],
    ids=lambda part: type(part).__name__,
)
def test_every_part_refuses_a_state_that_is_no_dict_naming_itself(part: Any) -> None:
    name = type(part).__name__
    with pytest.raises(ValueError, match=rf"`state` must be a dict from {name}.state_dict\(\), got NoneType"):
        part.load_state_dict(None)
    part.load_state_dict(part.state_dict())  # its own state still loads


@pytest.mark.parametrize(
    "part", [ExplodingDetector(), VanishingDetector(), DivergenceDetector(), LRGuard(), Rollback()]
)
def test_a_state_without_its_keys_is_refused_with_the_missing_ones_named(part: Any) -> None:
    with pytest.raises(ValueError, match=r"state_dict\(\): it lacks \["):
        part.load_state_dict({})


def test_a_clipper_given_an_optimizer_or_no_tensors_says_what_it_takes() -> None:
    model = _model()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="`parameters` must be a module, .* got an optimizer"):
        ZClip().clip_(torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`parameters` must hold tensors .* got a str"):
        NormClip(1.0).clip_(["weight"])  # type: ignore[list-item]


def test_messages_name_the_argument_a_bound_comes_from_and_offer_none() -> None:
    with pytest.raises(ValueError, match=r"`warmup_ratio` must satisfy min_ratio \(200.0\) < warmup_ratio \(or None\)"):
        ExplodingDetector(min_ratio=200)
    with pytest.raises(ValueError, match=r"`max_ratio` must satisfy min_ratio \(200.0\) < max_ratio"):
        ExplodingDetector(min_ratio=200, warmup_ratio=None, max_ratio=100)
    with pytest.raises(ValueError, match=r"`high` must satisfy low \(0.5\) < high"):
        UpdateRatioHints(low=0.5)
    with pytest.raises(ValueError, match=r"`image_every_n_steps` must be an integer >= 1 or None, got 0"):
        GradGuard(image_every_n_steps=0)
    with pytest.raises(ValueError, match=r"`max_grad_norm` must satisfy 0.0 < max_grad_norm \(or None\)"):
        ZClip(max_grad_norm=0)
    with pytest.raises(ValueError, match="`compile` must be True, False or 'auto'"):
        GradGuard(compile="Auto")  # type: ignore[arg-type]


def test_a_module_where_parameters_belong_is_refused() -> None:
    model = _model()
    for wrong in (model, [1, 2], None):
        with pytest.raises(ValueError, match="`params` must"):
            LocalGradNorm(wrong)  # type: ignore[arg-type]
    assert len(LocalGradNorm(model.parameters()).params) == 4
    for wrong_model in (None, nn.Sequential):
        with pytest.raises(ValueError, match="`module` must be an nn.Module"):
            build_layer_index(wrong_model)  # type: ignore[arg-type]


def _backward(model: nn.Module, scale: float = 1.0) -> None:
    (model(torch.randn(8, 4)).square().mean() * scale).backward()


def test_a_second_step_call_on_the_same_gradients_is_ignored_with_one_warning() -> None:
    model = _model()
    engine = GuardEngine(model, clip=ZClip(), regularizers=[L2(0.1)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        opt.zero_grad(set_to_none=step % 2 == 0)  # both ways of clearing start a new step
        _backward(model)
        assert engine.step(optimizer=opt) is not None
        after_first = [p.grad.clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert engine.step(optimizer=opt) is None
        # Nothing was added (L2's term) or counted a second time.
        for p, want in zip(model.parameters(), after_first):
            torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
        assert engine.steps == step + 1
        messages = [str(w.message) for w in caught]
        if step == 0:
            assert len(messages) == 1 and messages[0].startswith("GuardEngine.step() was called again"), messages
        else:  # once per engine
            assert messages == []
        opt.step()


def test_accumulating_into_the_same_gradients_is_a_new_step() -> None:
    model = _model()
    engine = GuardEngine(model, clip=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # no zero_grad: each backward adds into the same tensors, which is a new step's gradient
            _backward(model)
            assert engine.step() is not None
    assert engine.steps == 3


def test_a_frozen_layers_stale_gradient_does_not_make_every_step_look_repeated() -> None:
    # Train everything, then freeze the first layer and train the rest with a new optimizer: the frozen layer keeps
    # its last gradient, which nothing writes again. The steps that follow are new ones (a NaN batch among them is
    # skipped), not repeats of the last.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    engine = GuardEngine(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        engine.step(optimizer=opt)
        opt.step()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*non-finite", category=UserWarning)
        for step in range(4):
            opt.zero_grad()
            (model(x).square().mean() * (math.nan if step == 3 else 1.0)).backward()
            assert engine.step(optimizer=opt) is not None
            assert engine.skipped == (step == 3)
            opt.step()
    assert engine.steps == 7
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evenly_spaced_step_numbers_keep_the_window_small_and_are_reported_right() -> None:
    # A second optimizer stepping every fourth batch, in a window that is never read: one record, not one per step.
    model = _model()
    engine = GuardEngine(model, lr_guard=None)
    for i in range(1, 301):
        model.zero_grad()
        loss = model(torch.randn(8, 4)).square().mean()
        (loss * (float("nan") if i in (7, 250) else 1.0)).backward()
        engine.step(4 * i)
    assert len(engine._stamps) == 1
    nonfinite = [e["step"] for e in engine.snapshot().events if e["kind"] == "nonfinite"]
    assert nonfinite and set(nonfinite) <= {28, 1000}
    # Irregular numbers still map exactly.
    for number in (1003, 1004, 1010, 1011, 1012):
        model.zero_grad()
        loss = model(torch.randn(8, 4)).square().mean()
        (loss * (float("nan") if number == 1010 else 1.0)).backward()
        engine.step(number)
    assert {e["step"] for e in engine.snapshot().events if e["kind"] == "nonfinite"} == {1010}  # one per layer


def test_the_engines_warnings_point_at_the_callers_line() -> None:
    # `step()` runs under `torch.no_grad`, whose wrapper is a frame of its own: the warnings pointed at torch's
    # `_contextlib.py` instead of the line that called the engine.
    model = nn.Linear(2, 1)
    engine = GuardEngine(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.step()  # no gradient yet
        model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.ones(1)
        engine.step()
        engine.step()  # the same gradients again
    assert len(caught) == 2 and {w.filename for w in caught} == {__file__}


def test_an_optimizer_step_before_the_engines_is_warned_about_once() -> None:
    # step() called after optimizer.step(): its skip of the NaN batch reached no step, the weights went NaN, and the
    # counts reported the skips, silently. The attached optimizer's step now says so, once, at the user's line.
    def run(order: str) -> tuple[nn.Module, list[warnings.WarningMessage]]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = GuardEngine(model, lr_guard=LRGuard())
        engine.attach(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 8):
                opt.zero_grad()
                x = torch.randn(8, 4) * (math.nan if step == 4 else 1.0)
                model(x).square().mean().backward()
                if order == "after":
                    opt.step()
                    engine.step()
                else:
                    engine.step()
                    opt.step()
        return model, [w for w in caught if "stepped without a GuardEngine.step()" in str(w.message)]

    model, said = run("after")
    assert not all(p.isfinite().all() for p in model.parameters())
    assert len(said) == 1 and said[0].filename == __file__
    model, said = run("before")
    assert all(p.isfinite().all() for p in model.parameters()) and not said


@pytest.mark.parametrize("calls", ["every", "first", "skipped", "after a raise"])
def test_step_called_on_every_closure_evaluation_is_warned_about_once(calls: str) -> None:
    # A closure calling step() on every evaluation had each counted, judged and clipped as a step of its own, silently
    # (a user trial: 150 steps counted for 30 LBFGS steps, held-out loss 0.205 against 0.170 called once per step).
    # Once per optimizer step is right, and so are two step() calls between two optimizer steps (a skipped step not
    # stepped, `if not engine.skipped: optimizer.step()`): neither is inside one optimizer step. Nor after an
    # optimizer step that raised (no post hook ran for it), which a loop may catch and go on from.
    torch.manual_seed(0)
    model = _model()
    opt: torch.optim.Optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    if calls in ("skipped", "after a raise"):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = GuardEngine(model, clip=None, lr_guard=LRGuard(), skip_exploding="first")
    engine.attach(opt)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            first = True

            def closure() -> torch.Tensor:
                nonlocal first
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if first or calls == "every":
                    engine.step(loss=loss)
                else:
                    engine.add_regularizer_grads_()
                first = False
                return loss

            if calls == "skipped":
                closure()
                closure()  # a second judged batch before the step: two calls, neither inside a step
                opt.step()
            elif calls == "after a raise":

                def fail(*_: Any) -> None:
                    raise RuntimeError("a step that fails")

                hook = opt.register_step_pre_hook(fail)
                with pytest.raises(RuntimeError):
                    opt.step()
                hook.remove()
                closure()
                closure()
                opt.step()
            else:
                opt.step(closure)
    said = [w for w in caught if "several times inside one step" in str(w.message)]
    assert len(said) == (1 if calls == "every" else 0)
    assert calls != "every" or engine.steps > 5  # what the warning is about: each evaluation counted as a step


def test_undrained_events_past_the_cap_are_dropped_with_one_warning() -> None:
    # A loop that never drained kept the last 1000 events and dropped the older ones silently (user trial).
    from lightning_gradguard import engine as engine_module

    model = _model()
    engine = GuardEngine(model)
    x = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(1005):
            model.zero_grad()
            model(x * math.nan).sum().backward()  # every step a NaN batch: one event each
            engine.step()
        engine.summary()  # lands the last step's flags
    said = [w for w in caught if "events are waiting for drain()" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    events = engine.drain()
    assert len(events) == engine_module._MAX_EVENTS == 1000
    assert events[-1].step == 1005 and events[0].step == 6  # the first five dropped
    assert engine.summary()["nonfinite"] == 1005


def test_an_optimizer_subclass_stepping_through_its_parent_is_judged_once_per_step() -> None:
    # Torch hooks every optimizer class's step(): a subclass whose step() calls super().step() runs the step hooks
    # twice per step (once a plain SGD has been built in the process), and the second post hook warned that the
    # optimizer "stepped without a GuardEngine.step()" although step() came first every time (user trial).
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # hooks SGD.step

    class ThroughParent(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            return super().step(closure)

    model = _model()
    opt = ThroughParent(model.parameters(), lr=0.05)
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            engine.step(optimizer=opt)
            opt.step()
        assert not [w for w in caught if "GuardEngine" in str(w.message)]
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()  # this one without engine.step(): still said
    said = [str(w.message) for w in caught if "GuardEngine" in str(w.message)]
    assert len(said) == 1 and "stepped without a GuardEngine.step()" in said[0]


def test_attaching_a_second_optimizer_names_attach_in_its_message() -> None:
    model = _model()
    engine = GuardEngine(model, lr_guard=LRGuard())
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(first)
    with pytest.raises(ValueError, match=r"than the one passed to attach\(\)"):
        engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_the_order_warning_points_at_the_users_line_through_a_grad_scaler() -> None:
    # The step hook runs inside GradScaler.step too: the warning pointed at torch's grad_scaler.py.
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(opt)
    with pytest.warns(UserWarning, match="stepped without a GuardEngine.step") as caught:
        scaler.scale(model(torch.randn(8, 4)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert [w.filename for w in caught if "stepped without" in str(w.message)] == [__file__]


def test_attach_warns_when_the_optimizer_holds_only_part_of_the_watched_parameters() -> None:
    # One engine on a model that two optimizers train: the cuts would reach the attached one's parameters only.
    model = _model()
    model[0].weight.requires_grad_(False)  # frozen: no optimizer needs to hold it
    body, head = torch.optim.SGD([model[0].bias], lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.warns(
        UserWarning, match=r"holds 1 of the 3 trainable parameters .* steps the other 2, they step at its full"
    ):
        GuardEngine(model, lr_guard=LRGuard()).attach(body)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuardEngine(model[2], lr_guard=LRGuard()).attach(head)  # the engine of the module it trains: no warning
        both = torch.optim.SGD([model[0].bias, *model[2].parameters()], lr=0.1)
        GuardEngine(model, lr_guard=LRGuard()).attach(both)  # every trainable parameter; the frozen one is not needed


def _cut_on_the_last_step() -> tuple[GuardEngine, torch.optim.Optimizer]:
    """A plain loop that never drains, whose last two steps explode (x1e4, x1e5): the LR guard cuts on the last."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = GuardEngine(model, lr_guard=LRGuard())
    engine.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    for i in range(1, 61):
        x = torch.randn(32, 4, generator=g)
        optimizer.zero_grad()
        loss = model(x).square().mean() * (10.0 ** (4 + i - 59) if i >= 59 else 1.0)
        loss.backward()
        engine.step(loss=loss.detach(), samples=32, optimizer=optimizer)
        optimizer.step()
    return engine, optimizer


def test_summary_counts_a_cut_on_the_last_step_without_a_drain() -> None:
    engine, _ = _cut_on_the_last_step()
    assert engine.summary()["lr_reduced"] == 1  # before, 0 until a drain() acted on the last step's flags
    assert [event.step for event in engine.drain() if event.lr_reduced] == [60]


def test_a_cut_landing_after_the_optimizer_is_gone_does_not_ask_to_attach_one() -> None:
    engine, optimizer = _cut_on_the_last_step()
    del optimizer
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "attached to no optimizer ... Call `engine.attach(optimizer)`"
        events = engine.drain()
    assert [event.step for event in events if event.lr_reduced] == [60]


def test_parameters_replaced_under_the_engine_are_named_in_the_ignored_call_warning() -> None:
    # load_state_dict(assign=True) puts new Parameters in the model: backward writes their gradients, while the
    # engine's old ones keep the last step's. The engine ignores the call, and its warning says why it may be.
    model = _model()
    engine = GuardEngine(model, lr_guard=None)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        engine.step()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model(torch.randn(8, 4)).square().mean().backward()
    with pytest.warns(UserWarning, match=r"called again .* parameters were replaced .* build a new engine"):
        assert engine.step() is None


class _Even(nn.Module):
    """Five parameters that always get the same gradient: each carries 1/sqrt(5) of the total norm."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(4, 1, bias=False) for _ in range(5))
        for part in self.parts:
            nn.init.constant_(part.weight, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(part(x) for part in self.parts)  # type: ignore[return-value]


def test_a_total_explosion_shared_evenly_is_still_filed_under_a_layer() -> None:
    # No layer carries min_share (0.5) of the total, so no layer's own test can flag the x1000 step: the event is
    # filed under the largest (here: all five, equal), not under none.
    model = _Even()
    engine = GuardEngine(model, clip=None, exploding=ExplodingDetector(warmup_steps=5, min_share=0.5), lr_guard=None)
    g = torch.Generator().manual_seed(0)
    for i in range(1, 31):
        model.zero_grad()
        (model(torch.randn(8, 4, generator=g)).mean() * (1000.0 if i == 30 else 1.0)).backward()
        engine.step()
    events = [row for row in engine.snapshot().events if row["kind"] == "exploding"]
    assert [(row["step"], row["layer"]) for row in events] == [(30, f"parts.{i}") for i in range(5)]


def test_a_window_saved_with_four_entries_per_run_still_loads() -> None:
    # States written before the runs kept the engine's count: the window loads, with its counts unknown.
    model = _model()
    engine = GuardEngine(model, lr_guard=None)
    for i in range(1, 31):
        model.zero_grad()
        (model(torch.randn(8, 4)).square().mean() * (math.nan if i == 25 else 1.0)).backward()
        engine.step(2 * i)
    state = engine.state_dict()
    state["window"]["stamps"] = [run[:4] for run in state["window"]["stamps"]]
    fresh = GuardEngine(model, lr_guard=None)
    fresh.load_state_dict(state)
    (row,) = [row for row in fresh.snapshot().events if row["kind"] == "nonfinite"][:1]
    assert (row["step"], row["count"]) == (50, None)
    assert fresh.steps == 30


def test_a_malformed_rescue_cause_is_refused_before_the_engine_restores_anything() -> None:
    model = nn.Linear(4, 2)
    engine = GuardEngine(model, lr_guard=LRGuard(), rollback=default_rollback())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        engine.step(optimizer=opt)
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    assert state["rollback"]["rescue_cause"] is None
    state["rollback"]["rescue_cause"] = "weights"
    fresh = GuardEngine(model, lr_guard=LRGuard(), rollback=default_rollback())
    with pytest.raises(ValueError, match="rescue_cause"):
        fresh.load_state_dict(state)
    assert fresh.steps == 0


@pytest.mark.parametrize(
    "record",
    [
        [[0.1]],
        {"0": {"start": [0.1]}},
        {"0": {"start": [0.1], "trouble": []}},
        {"0": {"start": None, "trouble": [None, None]}},
        {"opt0": {"start": [0.1], "trouble": [None, None]}},
        {"0": {"start": [0.1], "trouble": ["0.5", None]}},
        {"0": {"start": [0.1], "trouble": [None, None], "counts_base": [1]}},
        {"0": {"start": [0.1], "trouble": [None, None], "counts_base": [-1, 0]}},
        {"0": {"start": [0.1], "trouble": [None, None], "counts_base": ["1", 0]}},
    ],
)
def test_a_malformed_rate_record_is_refused_before_anything_is_loaded(record: Any) -> None:
    """The end-of-fit rate line's record in GradGuard's state: a malformed one raised KeyError, IndexError or
    TypeError after part of the state was already taken (or, a string rate, failed at the end of the fit)."""
    guard = GradGuard()
    state = {**guard.state_dict(), "next_log_step": 123, "rate_record": record}
    with pytest.raises(ValueError, match=r"`state\['rate_record'\]` must"):
        guard.load_state_dict(state)
    assert guard._next_log_step == 0
    written = {
        "0": {"start": [0.1, None], "trouble": [0.5, [0.5, None]], "counts_base": [3, 1]},
        "1": {"start": [], "trouble": [None, None], "counts_base": [0, 0]},
    }
    guard.load_state_dict({**state, "rate_record": written})
    assert guard.state_dict()["rate_record"] == written
    # Written before the counts were kept: none since a fresh start.
    older = {key: {k: v for k, v in value.items() if k != "counts_base"} for key, value in written.items()}
    guard.load_state_dict({**state, "rate_record": older})
    assert guard.state_dict()["rate_record"] == {key: {**value, "counts_base": [0, 0]} for key, value in older.items()}
    guard.load_state_dict({**state, "rate_record": None})  # as before the record was kept
