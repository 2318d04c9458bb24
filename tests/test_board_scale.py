"""The dashboard at depth: 1500 layers give a browsable custom-scalars layout (block summaries, layers in trouble)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import GradGuard
from lightning_gradguard.tensorboard import GradGuardBoard, histogram_blocks
from tests.helpers import custom_layout, load_events
from tests.models import Regressor, SplitRegressor, regression_data, trainer

MAX_CHARTS = 30
DEEP = [f"net.{i}" for i in range(1500)]


def _charts(acc: ea.EventAccumulator) -> dict[str, list[str]]:
    """``{chart title: its tag regexes (or Margin tags)}`` over every category of the one written layout."""
    layout = custom_layout(acc)
    charts: dict[str, list[str]] = {}
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                charts[chart.title] = [t for s in chart.margin.series for t in (s.value, s.lower, s.upper)]
            else:
                charts[chart.title] = list(chart.multiline.tag)
    return charts


def _block_range(tag: str) -> range:
    # "gradguard/block/net.94..187/max" -> layers 94..187 (the names are net.<index>)
    first, last = re.fullmatch(r"gradguard/block/net\.(\d+)\.\.(\d+)/(?:max|median)", tag).groups()
    return range(int(first), int(last) + 1)


def test_1500_layers_board_writes_block_summaries_within_the_chart_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: DEEP}, ["AdamW"], image_every_n_steps=None, regularizers=[])
    board.write_layout()
    norms = 10 ** rng.normal(-2, 1, (1500, 3))
    norms[5, 1] = np.nan  # a non-finite layer is left out of its block's summary
    present = np.ones(1500, dtype=bool)
    present[300:340] = False  # layers without a gradient too (fewer than a block: each block has a summary)
    for col, step in enumerate((10, 20, 30)):
        board.write_layer_norms(step, 0, norms[:, col], np.zeros(1500, bool), np.zeros(1500, bool), present=present)
    writer.close()

    acc = load_events(tmp_path)
    charts = _charts(acc)
    assert len(charts) <= MAX_CHARTS
    block_charts = {title: tags for title, tags in charts.items() if ": max, median" in title}
    assert 10 <= len(block_charts) <= MAX_CHARTS - 9
    scalars = acc.Tags()["scalars"]
    block_tags = [tag for tag in scalars if tag.startswith("gradguard/block/")]
    assert len(block_tags) == 2 * len(block_charts)
    covered = sorted(i for tag in block_tags if tag.endswith("/max") for i in _block_range(tag))
    assert covered == list(range(1500))  # the blocks cover every layer once
    for tags in block_charts.values():
        assert all(sum(bool(re.match(regex, tag)) for tag in scalars) == 1 for regex in tags)
    for tag in block_tags:
        members = np.array(list(_block_range(tag)))
        for event, col in zip(acc.Scalars(tag), range(3), strict=True):
            values = norms[members, col]
            values = values[present[members] & np.isfinite(values)]
            want = values.max() if tag.endswith("/max") else np.median(values)
            assert event.value == pytest.approx(want, rel=1e-6)
    assert sum(tag.startswith("gradguard/layer/") for tag in scalars) == 1460


def test_layers_that_join_a_deep_model_keep_the_written_block_charts_fed(tmp_path: Path) -> None:
    # The layout names its blocks once; a param group added mid-run must not rename them (every block chart would stop
    # getting data): the blocks keep their names and layers, and a layer that joined goes into its predecessor's.
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: DEEP[1:]}, ["AdamW"], image_every_n_steps=None, regularizers=[])
    board.write_layout()
    zeros = np.zeros(1499, dtype=bool)
    board.write_layer_norms(0, 0, np.ones(1499), zeros, zeros)
    board.set_layers(0, DEEP)  # net.0 unfrozen: it comes first
    board.write_layer_norms(1, 0, np.full(1500, 2.0), np.zeros(1500, bool), np.zeros(1500, bool))
    writer.close()
    acc = load_events(tmp_path)
    charted = {tag for tags in _charts(acc).values() for tag in tags if "block/" in tag}
    written = {tag for tag in acc.Tags()["scalars"] if tag.startswith("gradguard/block/")}
    assert charted and {f"^{re.escape(tag)}$" for tag in written} == charted
    assert all([e.step for e in acc.Scalars(tag)] == [0, 1] for tag in written)  # every block chart, before and after
    first = min(board._blocks[0], key=lambda block: block[3].min())
    assert first[3].min() == 0 and sorted(np.concatenate([b[3] for b in board._blocks[0]])) == list(range(1500))


def test_two_deep_optimizers_share_the_chart_budget() -> None:
    board = GradGuardBoard(_NoWriter(), {0: DEEP, 1: [f"disc.{i}" for i in range(900)]}, ["G", "D"])
    layout = board.layout()
    assert sum(len(charts) for charts in layout.values()) <= MAX_CHARTS
    blocks = [title for title in layout["GradGuard layers"] if title.endswith(": max, median")]
    assert any(title.startswith("opt0: G · net.0..") for title in blocks)
    assert any(title.startswith("opt1: D · disc.0..") for title in blocks)
    assert layout["GradGuard layers"][blocks[0]][1][0].startswith("^" + re.escape("gradguard/opt0/block/"))
    # A small model keeps its per-layer charts.
    small = GradGuardBoard(_NoWriter(), {0: [f"l{i}" for i in range(30)]}, ["SGD"]).layout()["GradGuard layers"]
    assert [title for title in small if "trouble" not in title] == ["l0 .. l11", "l12 .. l23", "l24 .. l29"]


def test_fit_1500_layers_layout_stays_browsable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(750) for m in (nn.Linear(16, 16), nn.LayerNorm(16))], nn.Linear(16, 1))
    logger = TensorBoardLogger(tmp_path, name="deep")
    guard = GradGuard(histogram_every_n_steps=10)
    trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
        Regressor(net=net), regression_data()
    )
    acc = load_events(tmp_path / "deep" / "version_0")
    # Histograms by ranges of consecutive layers, at most 64 of them (one per layer was 1501 panels), covering each
    # layer once.
    hists = [tag for tag in acc.Tags()["histograms"] if tag.startswith("gradguard/grad_hist/")]
    assert 16 <= len(hists) <= 64
    covered = []
    for tag in hists:
        first, last = re.fullmatch(r"gradguard/grad_hist/net\.(\d+)\.\.(\d+)", tag).groups()
        covered += range(int(first), int(last) + 1)
        assert [e.step for e in acc.Histograms(tag)] == [10 - 1]
    assert sorted(covered) == list(range(1501))
    charts = _charts(acc)
    assert len(charts) <= MAX_CHARTS
    scalars = acc.Tags()["scalars"]
    assert sum(tag.startswith("gradguard/layer/") for tag in scalars) == 1501  # per-layer scalars all written
    blocks = {title: tags for title, tags in charts.items() if ": max, median" in title}
    assert len(blocks) >= 10
    for tags in blocks.values():  # each block chart has its two lines on every logging step
        for regex in tags:
            (tag,) = [t for t in scalars if re.match(regex, t)]
            assert [e.step for e in acc.Scalars(tag)] == [5 - 1, 10 - 1]  # Lightning's steps of steps 5 and 10
    # Block maxima cover the largest layer, medians lie within the layers' range.
    last = {
        tag: acc.Scalars(tag)[-1].value for tag in scalars if tag.startswith(("gradguard/layer/", "gradguard/block/"))
    }
    layer_values = [v for tag, v in last.items() if tag.startswith("gradguard/layer/")]
    block_max = [v for tag, v in last.items() if tag.endswith("/max")]
    assert max(block_max) == pytest.approx(max(layer_values))
    assert all(min(layer_values) <= v <= max(layer_values) for tag, v in last.items() if tag.endswith("/median"))
    assert "layers in trouble: vanishing" in charts
    assert {e.step for e in acc.Images("gradguard/gradient_flow")} == {5 - 1, 10 - 1}


def _deep(pairs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 8), *[m for _ in range(pairs) for m in (nn.Linear(8, 8), nn.LayerNorm(8))], nn.Linear(8, 1)
    )


class _DeepSplit(SplitRegressor):
    """A deep model whose matrices one optimizer holds and whose biases and norms another (manual steps)."""

    def __init__(self) -> None:
        super().__init__(_deep(60))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        matrices = [p for p in self.parameters() if p.ndim == 2]
        rest = [p for p in self.parameters() if p.ndim != 2]
        return [torch.optim.SGD(matrices, lr=0.01), torch.optim.SGD(rest, lr=0.01)]


def _histogram_sizes(path: Path) -> dict[str, set[float]]:
    acc = load_events(path)
    tags = [tag for tag in acc.Tags()["histograms"] if tag.startswith("gradguard/grad_hist/")]
    return {
        tag.removeprefix("gradguard/grad_hist/"): {h.histogram_value.num for h in acc.Histograms(tag)} for tag in tags
    }


def test_deep_histogram_blocks_are_the_models_whatever_optimizer_holds_a_layer(tmp_path: Path) -> None:
    # 122 layers split over two optimizers: the ranges are cut over the model, so a layer's weight (one optimizer) and
    # bias (the other) land in one histogram, with every value of its block; at most 64 tags in all.
    torch.manual_seed(0)
    model = _DeepSplit()
    logger = TensorBoardLogger(tmp_path, name="split", version=0)
    guard = GradGuard(histogram_every_n_steps=5)
    trainer(max_steps=10, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(model, regression_data())
    sizes = _histogram_sizes(Path(logger.log_dir))
    names = [f"net.{i}" for i in range(len(model.net))]
    blocks = histogram_blocks(names)
    assert 1 < len(sizes) <= 64 and set(sizes) == set(blocks.values())
    for block in sizes:
        values = sum(
            p.numel()
            for name, m in model.net.named_children()
            if blocks[f"net.{name}"] == block
            for p in m.parameters()
        )
        assert sizes[block] == {values}, block


def test_deep_histogram_blocks_keep_their_names_when_layers_join(tmp_path: Path) -> None:
    # A frozen 122-layer backbone joins at step 5: the blocks were cut over every layer from the start, so the
    # head's histogram keeps its tag and the backbone's appear under the model's ranges.
    torch.manual_seed(0)
    backbone = _deep(60)
    backbone.requires_grad_(False)
    head = nn.Linear(1, 1)

    class _Join(Regressor):
        def __init__(self) -> None:
            super().__init__(net=nn.Sequential(backbone, head))

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.global_step == 5:
                backbone.requires_grad_(True)

    logger = TensorBoardLogger(tmp_path, name="join", version=0)
    guard = GradGuard(histogram_every_n_steps=2)
    trainer(max_steps=10, callbacks=[guard], logger=logger, log_every_n_steps=2).fit(_Join(), regression_data())
    acc = load_events(Path(logger.log_dir))
    tags = [tag for tag in acc.Tags()["histograms"] if tag.startswith("gradguard/grad_hist/")]
    assert 1 < len(tags) <= 64
    steps = {tag: [e.step for e in acc.Histograms(tag)] for tag in tags}
    (head_tag,) = [tag for tag in tags if tag.endswith("net.1")]
    assert steps[head_tag] == [1, 3, 5, 7, 9]  # before and after the join, under one tag
    assert all(s == [5, 7, 9] for tag, s in steps.items() if tag != head_tag)  # the backbone, once it joined


class _NoWriter:
    """Enough of a writer for a board whose layout is only inspected."""

    def add_scalar(self, tag, value, step):  # pragma: no cover - never called
        raise AssertionError("nothing is written")


def test_fit_writes_the_log10_ema_band_and_leaves_out_what_nothing_feeds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="small")
    guard = GradGuard(saturation=False, image_every_n_steps=None)
    trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=10).fit(
        Regressor(), regression_data()
    )
    acc = load_events(tmp_path / "small" / "version_0")
    scalars = acc.Tags()["scalars"]
    for part in ("mean", "lower", "upper"):
        linear = {e.step: e.value for e in acc.Scalars(f"gradguard/ema_{part}")}
        log10 = {e.step: e.value for e in acc.Scalars(f"gradguard/ema_log10/{part}")}
        assert log10 and set(log10) <= set(linear)
        for step, value in log10.items():
            assert value == pytest.approx(np.log10(linear[step]), rel=1e-5)
    charts = _charts(acc)
    assert not any("regulariz" in title or "saturation" in title for title in charts), sorted(charts)
    assert not acc.Tags()["images"]
    assert "gradguard/ema_log10/mean" in scalars
