"""AdaGC: the paper's per-tensor rule, the do-no-harm amendments, and AdaGC inside real Trainer runs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from lightning_gradguard import AdaGC, GradGuard
from tests.helpers import assert_same_state
from tests.models import Regressor, regression_data, trainer
from tests.test_clip import roundtrip
from tests.test_modes import AmpRegressor, NormProbe, Recorder, SparseBag, _gradscaler_plugin, _spiky_data


def reference_adagc(
    steps: list[list[Tensor]], lambda_rel: float, beta: float, warmup_steps: int, lambda_abs: float
) -> list[list[Tensor]]:
    """The rule of arXiv 2502.11034 written out per tensor, in float64: the clipped gradients of every step."""
    gamma: list[float | None] = [None] * len(steps[0])
    out = []
    for t, grads in enumerate(steps):
        norms = [float(g.double().norm()) for g in grads]
        if t < warmup_steps:
            total = math.sqrt(sum(n * n for n in norms))
            h = min(1.0, lambda_abs / (total + 1e-6))
            coefs = [h] * len(grads)
            for i, n in enumerate(norms):
                gamma[i] = h * n if gamma[i] is None else min(gamma[i], h * n)  # type: ignore[type-var]
        else:
            grads = []
            for i, n in enumerate(norms):
                h = min(1.0, lambda_rel * gamma[i] / n)  # type: ignore[operator]
                coefs.append(h)
                gamma[i] = beta * gamma[i] + (1.0 - beta) * h * n  # type: ignore[operator]
        out.append([g.double() * c for g, c in zip(grads, coefs)])
    return out


def random_steps(n: int, shapes: list[tuple[int, ...]], seed: int, spikes: dict[int, int]) -> list[list[Tensor]]:
    """Gradients with slowly drifting norms; ``spikes`` maps a step to the tensor whose gradient is 100x there."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for t in range(n):
        grads = [torch.randn(s, generator=gen) * (0.5 + 0.01 * t) for s in shapes]
        if t in spikes:
            grads[spikes[t]] *= 100.0
        steps.append(grads)
    return steps


def total_of(grads: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))


@pytest.mark.parametrize("lambda_rel, beta, warmup", [(1.05, 0.98, 10), (1.5, 0.9, 3)])
def test_matches_the_papers_rule(lambda_rel: float, beta: float, warmup: int) -> None:
    shapes = [(6, 4), (4,), (3, 6), (1,)]
    steps = random_steps(40, shapes, seed=0, spikes={15: 0, 22: 2, 30: 3})
    expected = reference_adagc(steps, lambda_rel, beta, warmup, lambda_abs=1.0)
    clipper = AdaGC(lambda_rel=lambda_rel, beta=beta, warmup_steps=warmup)
    clipped_any = 0
    for t, (grads, want) in enumerate(zip(steps, expected)):
        grads = [g.clone() for g in grads]
        clipper.clip_grads_(grads, total_of(grads), torch.tensor(True))
        for g, w in zip(grads, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7, msg=f"step {t}")
        clipped_any += bool(clipper.last_coef < 1.0)
    assert clipped_any >= 10  # the warm-up's absolute clip and the spikes


def test_a_spike_in_one_tensor_leaves_the_others_alone() -> None:
    clipper = AdaGC(lambda_rel=2.0, warmup_steps=5, lambda_abs=None)
    steps = random_steps(12, [(8, 8), (8,)], seed=1, spikes={10: 0})
    for grads in steps[:10]:
        clipper.clip_grads_(grads, total_of(grads), torch.tensor(True))
    grads = [g.clone() for g in steps[10]]
    before = [g.clone() for g in grads]
    clipper.clip_grads_(grads, total_of(grads), torch.tensor(True))
    assert torch.equal(grads[1], before[1])
    assert grads[0].norm() < 0.05 * before[0].norm()
    gamma = clipper.state_dict()["gamma"]
    assert float(grads[0].norm()) == pytest.approx(2.0 * float(gamma[0]) / (0.98 + 0.02 * 2.0), rel=1e-4)


def test_exact_zeros_are_no_observation_and_a_late_tensor_gets_its_own_warmup() -> None:
    # LoRA-style: `a` has an exactly-zero gradient for 12 steps (its partner is still zero), then starts small.
    clipper = AdaGC(warmup_steps=4, lambda_abs=None)
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):
        grads = [torch.randn(5, generator=gen), torch.zeros(3)]
        clipper.clip_grads_(grads, total_of(grads), torch.tensor(True), names=["w", "a"])
        assert torch.equal(grads[1], torch.zeros(3))
    state = clipper.state_dict()
    assert state["keys"] == ["w", "a"] and state["count"].tolist() == [12.0, 0.0] and state["gamma"][1] == 0.0
    # `a` grows 10x per step through its own warm-up: unclipped (a threshold from a zero would have frozen it).
    for t in range(4):
        grads = [torch.randn(5, generator=gen), torch.full((3,), 1e-3 * 10**t)]
        before = grads[1].clone()
        clipper.clip_grads_(grads, total_of(grads), torch.tensor(True), names=["w", "a"])
        assert torch.equal(grads[1], before), t
    assert clipper.state_dict()["count"][1] == 4.0
    # Warm now: a 100x spike in `a` is clipped to lambda_rel times its (smallest warm-up) norm.
    grads = [torch.randn(5, generator=gen), torch.full((3,), 100.0)]
    clipper.clip_grads_(grads, total_of(grads), torch.tensor(True), names=["w", "a"])
    assert float(grads[1].norm()) == pytest.approx(1.05 * 1e-3 * math.sqrt(3), rel=1e-4)


def test_statistics_follow_names_when_the_set_of_gradients_changes() -> None:
    # An idle expert has no gradient on some steps: keyed by name, each tensor keeps its own statistics, exactly as a
    # clipper that only ever saw that tensor.
    both, alone = AdaGC(warmup_steps=3, lambda_abs=None), AdaGC(warmup_steps=3, lambda_abs=None)
    gen = torch.Generator().manual_seed(3)
    for t in range(20):
        expert = torch.randn(4, generator=gen) * (30.0 if t == 15 else 1.0)
        shared = torch.randn(6, generator=gen)
        mine = expert.clone()
        if t % 3:  # the expert got tokens
            grads, names = [shared, expert], ["shared", "expert"]
        else:
            grads, names = [shared], ["shared"]
        both.clip_grads_(grads, total_of(grads), torch.tensor(True), names=names)
        if t % 3:
            alone.clip_grads_([mine], mine.norm(), torch.tensor(True), names=["expert"])
            assert torch.equal(expert, mine), t
    slot = both.state_dict()["keys"].index("expert")
    assert both.state_dict()["gamma"][slot] == alone.state_dict()["gamma"][0]
    # Without names the statistics go by position, so a changing number of gradients is an error, not a mix-up.
    by_position = AdaGC()
    by_position.clip_grads_([torch.ones(2), torch.ones(3)], torch.tensor(math.sqrt(5.0)), torch.tensor(True))
    with pytest.raises(ValueError, match="names"):
        by_position.clip_grads_([torch.ones(2)], torch.tensor(math.sqrt(2.0)), torch.tensor(True))
    # Nor is another set of the same count: other shapes, or (clip_) other parameters of the same shapes.
    with pytest.raises(ValueError, match="2 other gradients"):
        by_position.clip_grads_([torch.ones(3), torch.ones(2)], torch.tensor(math.sqrt(5.0)), torch.tensor(True))
    # Nor is a switch between positions and names, either way: the statistics would silently start afresh.
    before = by_position.state_dict()
    with pytest.raises(ValueError, match="by position"):
        by_position.clip_grads_(
            [torch.ones(2), torch.ones(3)], torch.tensor(5.0**0.5), torch.tensor(True), names=["a", "b"]
        )
    assert by_position.state_dict()["keys"] == before["keys"] == [0, 1]
    by_name = AdaGC()
    by_name.clip_grads_([torch.ones(2)], torch.tensor(2.0**0.5), torch.tensor(True), names=["a"])
    with pytest.raises(ValueError, match="names"):
        by_name.clip_grads_([torch.ones(2)], torch.tensor(2.0**0.5), torch.tensor(True))
    a, b, clipper = nn.Linear(4, 4), nn.Linear(4, 4), AdaGC()
    for expert in (a, a, b):  # expert a's two tensors, then expert b's: same count and shapes
        a.zero_grad(), b.zero_grad()
        expert(torch.ones(1, 4)).sum().backward()
        if expert is b:
            with pytest.raises(ValueError, match="2 other gradients"):
                clipper.clip_([*a.parameters(), *b.parameters()])
        else:
            clipper.clip_([*a.parameters(), *b.parameters()])


def test_gradients_still_carrying_a_loss_scale_are_clipped_like_unscaled_ones() -> None:
    scaled, plain = AdaGC(warmup_steps=3), AdaGC(warmup_steps=3)
    for grads in random_steps(10, [(4, 4), (4,)], seed=4, spikes={6: 1, 8: 0}):
        big = [g * 1024.0 for g in grads]
        true_total = total_of(grads)
        plain.clip_grads_(grads, true_total, torch.tensor(True))
        scaled.clip_grads_(big, true_total, torch.tensor(True))
        for g, b in zip(grads, big):
            torch.testing.assert_close(b / 1024.0, g, rtol=1e-5, atol=0.0)
    for key in ("gamma", "count", "steps"):
        torch.testing.assert_close(scaled.state_dict()[key], plain.state_dict()[key], rtol=1e-5, atol=0.0)


def test_mixed_dtypes_are_clipped_tensor_by_tensor_in_their_own_order() -> None:
    clipper = AdaGC(lambda_rel=2.0, warmup_steps=2, lambda_abs=None)
    for t in range(5):
        grads = [torch.ones(4), torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)]
        if t == 4:
            grads[1] *= 50.0  # the bf16 tensor, second in the list but in its own dtype group
        before = [g.clone() for g in grads]
        clipper.clip_grads_(grads, total_of([g.float() for g in grads]), torch.tensor(True))
    assert torch.equal(grads[0], before[0]) and torch.equal(grads[2], before[2])
    assert float(grads[1].float().norm()) == pytest.approx(2.0 * math.sqrt(3), rel=1e-2)


def test_standalone_clip_on_a_module_with_a_sparse_embedding() -> None:
    emb, head = nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1)
    model = nn.Sequential(emb, head)
    clipper = AdaGC(lambda_rel=2.0, warmup_steps=3, lambda_abs=None)
    idx = torch.tensor([[1, 2, 2, 5]])
    for t in range(5):
        model.zero_grad()
        (model(idx).sum() * (100.0 if t == 4 else 1.0)).backward()
        raw = emb.weight.grad.coalesce().values().norm()
        clipper.clip_(model)
    assert emb.weight.grad.is_sparse
    assert float(emb.weight.grad.coalesce().values().norm()) < 0.05 * float(raw)


# ---------------------------------------------------------------------------------------------- inside a Trainer
class SpikeOneLayer(Regressor):
    """Multiplies the first layer's gradient by 1000 after the backward pass of step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__(lr=1e-2, optimizer="adam")
        self.at = at

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.at:
            self.net[0].weight.grad.mul_(1000.0)


class GradsAt(Callback):
    """The gradients of every parameter at ``on_before_optimizer_step`` of step ``at`` (after GradGuard, if listed
    after it)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.at:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_in_a_fit_only_the_spiking_layer_is_clipped() -> None:
    at = 15
    torch.manual_seed(0)
    before, after = GradsAt(at), GradsAt(at)
    guard = GradGuard(clip=AdaGC(lambda_rel=10.0, warmup_steps=5), clip_exploding=False)
    trainer(max_steps=at + 3, callbacks=[before, guard, after]).fit(SpikeOneLayer(at), regression_data())
    spiked = "net.0.weight"
    assert after.grads[spiked].norm() < 0.01 * before.grads[spiked].norm()
    for name in before.grads:
        if name != spiked:
            assert torch.equal(after.grads[name], before.grads[name]), name
    assert guard.summary()["exploding"] >= 1  # the detector still reports what the clipper bounded
    keys = guard.state_dict()["optimizers"]["0"]["clip"]["keys"]
    assert spiked in keys  # statistics by parameter name


def test_16_mixed_with_a_fused_optimizer_clips_the_true_gradients() -> None:
    torch.manual_seed(0)
    pre, post = NormProbe(), NormProbe()
    guard = Recorder(clip=AdaGC(warmup_steps=3, lambda_abs=0.5), clip_exploding=False)
    trainer(max_steps=6, callbacks=[pre, guard, post], plugins=[_gradscaler_plugin()]).fit(
        AmpRegressor(fused=True), regression_data()
    )
    assert all(s["scale"] > 1.0 for s in pre.steps)  # GradGuard saw still-scaled gradients
    for step, (ref, after) in enumerate(zip(pre.steps[:3], post.steps[:3])):
        total = math.sqrt(sum(v * v for v in ref["layers"].values()))
        clipped = math.sqrt(sum(v * v for v in after["layers"].values()))
        assert clipped == pytest.approx(min(total, 0.5), rel=1e-3), step  # the warm-up's absolute clip, unscaled


def test_sparse_gradients_in_a_fit() -> None:
    torch.manual_seed(0)
    guard = Recorder(clip=AdaGC(warmup_steps=2, lambda_abs=0.1))
    trainer(max_steps=4, callbacks=[guard]).fit(SparseBag(), regression_data())
    assert any(m["coef"] < 1.0 for m in guard.measured)


def test_checkpoint_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Any) -> None:
    def guard() -> GradGuard:
        return GradGuard(clip=AdaGC(warmup_steps=3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        full_model, full_guard = Regressor(lr=1e-2, optimizer="adam"), guard()
        trainer(max_epochs=2, callbacks=[full_guard]).fit(full_model, _spiky_data())
        torch.manual_seed(0)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer(max_epochs=1, callbacks=[guard(), ckpt], enable_checkpointing=True).fit(
            Regressor(lr=1e-2, optimizer="adam"), _spiky_data()
        )
        torch.load(ckpt.last_model_path, weights_only=True)  # plain containers only
        torch.manual_seed(1)
        resumed_model, resumed_guard = Regressor(lr=1e-2, optimizer="adam"), guard()
        trainer(max_epochs=2, callbacks=[resumed_guard]).fit(
            resumed_model, _spiky_data(), ckpt_path=ckpt.last_model_path
        )
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert_same_state(full_guard.state_dict(), resumed_guard.state_dict())


def test_a_trainers_gradient_clip_val_is_folded_into_adagc() -> None:
    torch.manual_seed(0)
    pre, applied = NormProbe(), _Applied()
    guard = Recorder(clip=AdaGC(warmup_steps=2, lambda_abs=None))
    with pytest.warns(UserWarning, match="takes it over"):
        trainer(max_steps=5, callbacks=[pre, guard, applied], gradient_clip_val=0.05).fit(
            Regressor(lr=1e-2), regression_data()
        )
    assert len(applied.norms) == len(pre.steps) == 5
    for ref, clipped in zip(pre.steps, applied.norms):
        total = math.sqrt(sum(v * v for v in ref["layers"].values()))
        assert clipped <= min(total, 0.05) * (1 + 1e-4)


class _Applied(L.Callback):
    """The total gradient norm each optimizer step applied, read after the step (a gradient hook listed after the
    guard would keep the Trainer's clipping Lightning's)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_lightning_cli_builds_adagc_from_yaml(tmp_path: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_gradguard.GradGuard
      init_args:
        clip:
          class_path: lightning_gradguard.AdaGC
          init_args: {lambda_rel: 1.1, warmup_steps: 50, lambda_abs: null}
"""
    )
    cli = LightningCLI(Regressor, run=False, args=["--config", str(config)], save_config_callback=None)
    (guard,) = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert isinstance(guard.clip, AdaGC)
    assert (guard.clip.lambda_rel, guard.clip.warmup_steps, guard.clip.lambda_abs) == (1.1, 50, None)


def test_state_dict_round_trip_and_rejects_a_foreign_state() -> None:
    clipper = AdaGC(warmup_steps=2)
    for grads in random_steps(5, [(3,), (2, 2)], seed=5, spikes={}):
        clipper.clip_grads_(grads, total_of(grads), torch.tensor(True), names=["a", "b"])
    other = AdaGC(warmup_steps=2)
    other.load_state_dict(roundtrip(clipper.state_dict()))
    assert_same_state(other.state_dict(), clipper.state_dict())
    with pytest.raises(ValueError, match="AdaGC"):
        other.load_state_dict({"values": torch.zeros(2)})
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"keys": ["a"], "gamma": torch.zeros(2), "count": torch.zeros(2), "steps": 0})
    assert repr(other) == "AdaGC(lambda_rel=1.05, beta=0.98, warmup_steps=2, lambda_abs=1.0)"


def _adagc_steps(model: nn.Module, clip: AdaGC, steps: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        model.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        clip.clip_(model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return grads


def test_a_copied_or_reloaded_adagc_clips_its_copied_model_by_position() -> None:
    # By position, AdaGC remembers the ids of the last call's parameters. A deepcopy (or pickle) of the clipper with
    # its model, or a state loaded into a used clipper, refused the copied model's parameters as "other gradients".
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    clip = AdaGC(warmup_steps=3)
    _adagc_steps(model, clip, 6, seed=1)
    copied = copy.deepcopy({"model": model, "clip": clip})
    expected = _adagc_steps(model, clip, 4, seed=2)
    got = _adagc_steps(copied["model"], copied["clip"], 4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # A used clipper given a saved state goes on with a model restored beside it.
    restored = copy.deepcopy(copied["model"])
    copied["clip"].load_state_dict(clip.state_dict())
    again = _adagc_steps(restored, copied["clip"], 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_adagc_steps(model, clip, 2, seed=3), again))
