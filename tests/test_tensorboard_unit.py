"""Unit tests of the TensorBoard writer: layout, scalars, images, histograms, text, history and sampling."""

from __future__ import annotations

import doctest
import io
import re
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import lightning_gradguard.board as board_module
import lightning_gradguard.render as render_module
from lightning_gradguard.tensorboard import (
    GradGuardBoard,
    flow_figure,
    group_layer_names,
    heatmap_rows,
    layer_blocks,
    layer_row_spans,
    render_bars,
    render_heatmap,
    sample_gradients,
)
from tests.helpers import LAYERS, custom_layout, load_events

STEPS = list(range(0, 400, 10))  # 40 logging steps
SPIKE_STEP, SPIKE_LAYER = 250, 5
VANISH_FROM, VANISH_LAYER = 300, 2


def _synthetic_norms(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = 10 ** rng.uniform(-2, 0, size=len(LAYERS))
    norms = base[:, None] * np.exp(0.05 * rng.standard_normal((len(LAYERS), len(STEPS))))
    exploding = np.zeros_like(norms, dtype=bool)
    vanishing = np.zeros_like(norms, dtype=bool)
    spike = STEPS.index(SPIKE_STEP)
    norms[SPIKE_LAYER, spike] *= 1000.0
    exploding[SPIKE_LAYER, spike] = True
    vanish = STEPS.index(VANISH_FROM)
    norms[VANISH_LAYER, vanish:] = 1e-12
    vanishing[VANISH_LAYER, vanish:] = True
    return norms, exploding, vanishing


@pytest.fixture(scope="module")
def written_run(tmp_path_factory):
    """A 12-layer, 40-step run written through GradGuardBoard, read back with EventAccumulator."""
    logdir = tmp_path_factory.mktemp("run")
    norms, exploding, vanishing = _synthetic_norms()
    writer = SummaryWriter(str(logdir))
    board = GradGuardBoard(writer, {0: LAYERS}, ["SGD"], image_every_n_steps=100, histogram_every_n_steps=200)
    board.write_layout()
    board.write_config({"clip": {"class": "ZClip", "z_thresh": 2.5}, "on_nonfinite": "skip"})
    board.set_bands(0, 1e-8, 50.0)
    grads = [(f"{name}.weight", torch.randn(32, 16) * (i + 1)) for i, name in enumerate(LAYERS)]
    image_steps, histogram_steps = [], []
    for col, step in enumerate(STEPS):
        board.write_scalars(
            step,
            {
                "total_norm": float(np.linalg.norm(norms[:, col])),
                "gradguard/clip_coef": 1.0,
                board.tag("events/exploding"): float(step >= SPIKE_STEP),
            },
        )
        board.write_layer_norms(step, 0, norms[:, col], exploding[:, col], vanishing[:, col])
        if step == SPIKE_STEP:
            board.write_events(
                step,
                [
                    {
                        "step": step,
                        "kind": "exploding",
                        "layer": LAYERS[SPIKE_LAYER],
                        "value": float(norms[SPIKE_LAYER, col]),
                        "action": "clip | lr",
                    }
                ],
            )
        if board.should_write_histograms(step):
            board.write_histograms(step, sample_gradients(grads, lambda n: n.split(".")[0], max_per_block=256))
            histogram_steps.append(step)
        if board.should_write_images(step):
            board.write_images(step)
            image_steps.append(step)
    board.write_layout()  # a second call must not write a second layout
    board.close_run(STEPS[-1])
    writer.close()
    return {
        "acc": load_events(logdir),
        "norms": norms,
        "image_steps": [*image_steps, STEPS[-1]],
        "histogram_steps": histogram_steps,
    }


# ------------------------------------------------------------------------------------------------------------- layout
def test_group_layer_names_resnet_like_model_gives_about_ten_small_charts():
    names = ["conv1", "bn1"]
    for stage in (1, 2, 3):
        for block in range(8):
            names += [
                f"layer{stage}.{block}.conv1",
                f"layer{stage}.{block}.bn1",
                f"layer{stage}.{block}.conv2",
                f"layer{stage}.{block}.bn2",
            ]
    names.append("linear")
    groups = group_layer_names(names)
    assert [name for _, group in groups for name in group] == names  # every layer once, definition order kept
    assert all(len(group) <= 12 for _, group in groups)
    assert 8 <= len(groups) <= 14
    # Blocks stay together: a chart never splits the four layers of one residual block.
    for _, group in groups:
        blocks = {".".join(name.split(".")[:2]) for name in group if name.startswith("layer")}
        for block in blocks:
            assert sum(name.startswith(block + ".") for name in names) == sum(
                name.startswith(block + ".") for name in group
            )


def test_group_layer_names_flat_sequential_is_chunked():
    names = [str(i) for i in range(100)]
    groups = group_layer_names(names, max_lines=12)
    assert len(groups) == 9
    assert groups[0] == ("0 .. 11", names[:12])


def test_layout_once_per_writer_with_anchored_regexes(tmp_path):
    names = ["a.1", "a.10", "a.1x", "(root)", "b"]
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: names}, ["Adam"])
    board.write_layout()
    board.write_layout()
    GradGuardBoard(writer, {0: names}, ["Adam"]).write_layout()  # same writer: still one layout
    writer.close()
    layout = custom_layout(load_events(tmp_path))
    categories = {category.title: category for category in layout.category}
    assert set(categories) == {"GradGuard", "GradGuard layers"}

    charts = {chart.title: chart for chart in categories["GradGuard"].chart}
    assert list(charts["total norm"].multiline.tag)[:2] == ["^gradguard/total_norm$", "^gradguard/total_norm_max$"]
    assert "^gradguard/clip_threshold$" in charts["total norm"].multiline.tag
    series = charts["EMA band, log10"].margin.series[0]
    assert (series.value, series.lower, series.upper) == (
        "gradguard/ema_log10/mean",
        "gradguard/ema_log10/lower",
        "gradguard/ema_log10/upper",
    )
    assert re.match(charts["events"].multiline.tag[0], "gradguard/events/lr_reduced")
    for title in ("clip coef", "lr scale", "learning rate", "regularizers", "saturation"):
        assert title in charts  # regularizers not named: their charts stay

    layer_charts = {chart.title: chart for chart in categories["GradGuard layers"].chart}
    trouble = layer_charts["layers in trouble: exploding, non-finite"].multiline.tag
    assert any(re.match(regex, "gradguard/trouble/nonfinite/a.1") for regex in trouble)
    assert not any(re.match(regex, "gradguard/trouble/vanishing/a.1") for regex in trouble)
    assert re.match(layer_charts["layers in trouble: vanishing"].multiline.tag[0], "gradguard/trouble/vanishing/b")
    regexes = [tag for chart in categories["GradGuard layers"].chart for tag in chart.multiline.tag]
    for name in names:
        tag = f"gradguard/layer/{name}"
        # The plugin matches with re.match: each layer tag must hit exactly its own regex.
        assert sum(bool(re.match(regex, tag)) for regex in regexes) == 1


def test_layout_with_two_optimizers_has_per_optimizer_charts():
    board = GradGuardBoard(_FakeWriter(), {0: ["gen.0", "gen.1"], 1: ["disc.0"]}, ["Adam", "SGD"])
    layout = board.layout()
    assert board.tag("total_norm", 1) == "gradguard/opt1/total_norm"
    chart = layout["GradGuard"]["total norm (opt1: SGD)"]
    assert chart[1][0] == "^gradguard/opt1/total_norm$"
    assert layout["GradGuard"]["EMA band, log10 (opt0: Adam)"][1] == [
        "gradguard/opt0/ema_log10/mean",
        "gradguard/opt0/ema_log10/lower",
        "gradguard/opt0/ema_log10/upper",
    ]
    assert any("disc" in title and title.startswith("opt1") for title in layout["GradGuard layers"])


def test_a_layer_name_two_optimizers_share_is_tagged_per_optimizer():
    writer = _FakeWriter()
    board = GradGuardBoard(writer, {0: ["fc1"], 1: ["fc1", "fc2"]}, ["Muon", "AdamW"])
    assert [board.layer_key(name, 1) for name in ("fc1", "fc2")] == ["opt1/fc1", "fc2"]
    board.write_layer_norms(4, 0, np.array([2.0]), np.zeros(1, bool), np.zeros(1, bool))
    board.write_layer_norms(4, 1, np.array([0.5, 1.0]), np.zeros(2, bool), np.zeros(2, bool))
    board.write_events(4, [{"step": 3, "kind": "exploding", "layer": "fc1", "value": 9.0, "action": "", "opt": 1}])
    written = {(tag, value) for tag, value, _ in writer.scalars}
    assert {
        ("gradguard/layer/opt0/fc1", 2.0),
        ("gradguard/layer/opt1/fc1", 0.5),
        ("gradguard/layer/fc2", 1.0),
    } <= written
    assert ("gradguard/trouble/exploding/opt1/fc1", 9.0) in written
    # Once shared, always: a param group that changes which names are shared must not move a series to another tag.
    board.set_layers(0, ["fc0"])
    assert board.layer_key("fc1", 1) == "opt1/fc1"
    board.set_layers(0, ["fc0", "fc2"])
    assert [board.layer_key("fc2", i) for i in (0, 1)] == ["opt0/fc2", "opt1/fc2"]
    # The layout's line of a layer takes both forms, so a name shared later stays on its chart.
    lines = [tag for chart in board.layout()["GradGuard layers"].values() for tag in chart[1] if "fc2" in tag]
    assert lines and all(
        re.match(line, "gradguard/layer/fc2") and re.match(line, "gradguard/layer/opt1/fc2") for line in lines
    )


# ------------------------------------------------------------------------------------------------------------ writing
def test_scalars_and_layer_norms_read_back(written_run):
    acc, norms = written_run["acc"], written_run["norms"]
    tags = acc.Tags()["scalars"]
    assert [t for t in tags if t.startswith("gradguard/layer/")] == [f"gradguard/layer/{n}" for n in LAYERS]
    spike = acc.Scalars(f"gradguard/layer/{LAYERS[SPIKE_LAYER]}")
    assert [e.step for e in spike] == STEPS
    np.testing.assert_allclose([e.value for e in spike], norms[SPIKE_LAYER].astype(np.float32), rtol=1e-6)
    assert [e.value for e in acc.Scalars("gradguard/events/exploding")] == [float(s >= SPIKE_STEP) for s in STEPS]
    assert [e.value for e in acc.Scalars("gradguard/clip_coef")] == [1.0] * len(STEPS)


def test_images_written_at_expected_steps_and_decode(written_run):
    acc = written_run["acc"]
    assert written_run["image_steps"] == [0, 100, 200, 300, 390]
    for tag in ("gradguard/gradient_flow", "gradguard/gradient_flow_bars"):
        events = acc.Images(tag)
        assert [e.step for e in events] == written_run["image_steps"]
        img = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert img.shape[0] > 100 and img.shape[1] > 500
        assert img.std() > 10  # a drawn figure, not a blank canvas


def test_histograms_and_text(written_run):
    acc = written_run["acc"]
    assert written_run["histogram_steps"] == [0, 200]
    assert {"gradguard/grad_hist/enc", "gradguard/grad_hist/head", "gradguard/grad_hist/embed"} <= set(
        acc.Tags()["histograms"]
    )
    hist = acc.Histograms("gradguard/grad_hist/enc")
    assert [h.step for h in hist] == [0, 200]
    assert hist[0].histogram_value.num == 256  # 8 tensors of 512 values sampled down to the block budget

    events_log = acc.Tensors("gradguard/events_log/text_summary")
    assert [e.step for e in events_log] == [SPIKE_STEP]
    table = events_log[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| step | kind | layer | value | action |"
    assert f"| {SPIKE_STEP} | exploding | {LAYERS[SPIKE_LAYER]} |" in table
    assert "clip \\| lr" in table  # a pipe inside a cell must not break the table

    config = acc.Tensors("gradguard/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| clip.class | ZClip |" in config and "| clip.z_thresh | 2.5 |" in config


def test_present_mask_skips_absent_layers(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["a", "b", "c"]}, ["SGD"])
    board.write_layer_norms(
        0, 0, np.array([1.0, 2.0, 3.0]), np.zeros(3, bool), np.zeros(3, bool), present=np.array([True, False, True])
    )
    writer.close()
    tags = load_events(tmp_path).Tags()["scalars"]
    assert tags == ["gradguard/layer/a", "gradguard/layer/c"]
    _, hist_norms, _, _ = board._histories[0].columns()
    assert hist_norms[1, 0] < 0  # drawn as "no gradient"


def _round_trip(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_set_layers_keeps_each_layers_history_by_name_and_shows_a_joined_one_without_gradient(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["b", "c"]}, ["SGD"], diagnostics=["update_ratio"])
    flags = np.zeros(2, bool)
    board.write_layer_norms(0, 0, np.array([2.0, 3.0]), flags, np.array([False, True]))
    board.set_layers(0, ["a", "b", "c"])  # "a" unfrozen: it comes first in definition order
    board.write_layer_norms(1, 0, np.array([1.0, 2.5, 3.5]), np.zeros(3, bool), np.zeros(3, bool))
    writer.close()
    steps, norms, _, vanishing = board._histories[0].columns()
    assert steps.tolist() == [0, 1]
    assert norms[0, 0] < 0 and norms[0, 1] == 1.0  # no gradient before it joined
    assert norms[1:, 0].tolist() == [2.0, 3.0] and norms[1:, 1].tolist() == [2.5, 3.5]
    assert vanishing[:, 0].tolist() == [False, False, True]  # the flags moved with their layer
    assert board._ratio_histories[0].num_layers == 3
    assert board.heatmap_image(0) is not None
    assert {e.step for e in load_events(tmp_path).Scalars("gradguard/layer/a")} == {1}
    with pytest.raises(ValueError, match="must not repeat a name"):
        board.set_layers(0, ["a", "a"])
    with pytest.raises(ValueError, match="opt_idx"):
        board.set_layers(3, ["a"])


def test_a_saved_board_restores_each_layers_history_by_name_into_other_layers():
    # A checkpoint written after layers joined (set_layers), resumed where the model starts with its first layers
    # again (or the other way round): each layer's history follows it by name. Before, the histories were dropped
    # whenever the layer count differed.
    flags = np.zeros(3, bool)
    board = GradGuardBoard(_FakeWriter(), {0: ["b", "c"]}, ["SGD"], diagnostics=["update_ratio"])
    board.set_layers(0, ["a", "b", "c"])
    board.write_layer_norms(0, 0, np.array([1.0, 2.0, 3.0]), flags, flags)
    state = torch.load(_round_trip(board.state_dict()), weights_only=True)
    resumed = GradGuardBoard(_FakeWriter(), {0: ["b", "c"]}, ["SGD"], diagnostics=["update_ratio"])
    resumed.load_state_dict(state)
    steps, norms, _, _ = resumed._histories[0].columns()
    assert steps.tolist() == [0] and norms[:, 0].tolist() == [2.0, 3.0]
    older = {k: v for k, v in state.items() if k != "layer_names"}  # no names: the count decides, as before
    again = GradGuardBoard(_FakeWriter(), {0: ["b", "c"]}, ["SGD"])
    again.load_state_dict(older)
    assert again._histories[0].columns()[0].size == 0


def test_events_table_keeps_last_rows_and_multi_optimizer_column():
    writer = _FakeWriter()
    board = GradGuardBoard(writer, {0: ["a"], 1: ["b"]}, ["Adam", "SGD"])
    board.write_events(1, [])
    assert writer.texts == []
    for step in range(250):
        board.write_events(
            step,
            [{"step": step, "kind": "vanishing", "layer": "b", "value": np.float32(1e-9), "action": "warn", "opt": 1}],
        )
    table = writer.texts[-1][1]
    lines = table.splitlines()
    assert len(lines) == 2 + 200
    assert lines[0] == "| step | optimizer | kind | layer | value | action |"
    assert lines[2].startswith("| 50 | opt1: SGD | vanishing | b | 1e-09 |")


def test_multi_optimizer_image_tags():
    writer = _FakeWriter()
    board = GradGuardBoard(writer, {0: ["a", "b"], 1: ["c"]}, ["Adam", "SGD"], image_every_n_steps=1000)
    board.write_layer_norms(5, 0, np.array([1.0, 2.0]), np.zeros(2, bool), np.zeros(2, bool))
    board.write_layer_norms(5, 1, np.array([3.0]), np.zeros(1, bool), np.zeros(1, bool))
    board.close_run(5)
    assert sorted(tag for tag, _ in writer.images) == [
        "gradguard/gradient_flow/opt0",
        "gradguard/gradient_flow/opt1",
        "gradguard/gradient_flow_bars/opt0",
        "gradguard/gradient_flow_bars/opt1",
    ]


def test_should_write_crosses_multiples_not_exact_steps():
    board = GradGuardBoard(_FakeWriter(), {0: ["a"]}, ["SGD"], image_every_n_steps=100)
    assert board.should_write_images(30)
    board.write_images(30)  # nothing to draw yet, but the schedule advances
    assert not board.should_write_images(90)
    assert board.should_write_images(120)  # logging every 30 steps never lands on 100 exactly


def test_nonfinite_histogram_values_are_dropped():
    writer = _FakeWriter()
    board = GradGuardBoard(writer, {0: ["a"]}, ["SGD"])
    board.write_histograms(
        3, {"a": torch.tensor([1.0, float("inf"), float("nan"), -2.0]), "b": torch.tensor([float("nan")])}
    )
    assert [tag for tag, _ in writer.histograms] == ["gradguard/grad_hist/a"]
    np.testing.assert_array_equal(writer.histograms[0][1], [1.0, -2.0])


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"layer_names": {1: ["a"]}}, "layer_names"),
        ({"layer_names": {0: ["a", "a"]}}, "layer_names"),
        ({"optimizer_names": []}, "optimizer_names"),
        ({"image_every_n_steps": 0}, "image_every_n_steps"),
        ({"histogram_every_n_steps": -5}, "histogram_every_n_steps"),
        ({"max_heatmap_rows": 1}, "max_heatmap_rows"),
        ({"history": 1}, "history"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, arg):
    base = {"writer": _FakeWriter(), "layer_names": {0: ["a"]}, "optimizer_names": ["SGD"]}
    with pytest.raises(ValueError, match=arg):
        GradGuardBoard(**{**base, **kwargs})


def test_wrong_lengths_and_bands_are_rejected():
    board = GradGuardBoard(_FakeWriter(), {0: ["a", "b"]}, ["SGD"])
    with pytest.raises(ValueError, match="norms"):
        board.write_layer_norms(0, 0, np.ones(3), np.zeros(3, bool), np.zeros(3, bool))
    with pytest.raises(ValueError, match="opt_idx"):
        board.write_layer_norms(0, 2, np.ones(2), np.zeros(2, bool), np.zeros(2, bool))
    with pytest.raises(ValueError, match="low"):
        board.set_bands(0, -1.0, 1.0)
    with pytest.raises(ValueError, match="low_ratio"):
        board.set_bands(0, 1e-9, None, low_ratio=float("inf"))
    board.set_bands(0, 0.0, None, low_ratio=0.0)  # a detector without that bound: no band


# ----------------------------------------------------------------------------------------------------------- heatmap
def test_heatmap_rows_group_500_layers():
    names = [f"block{i // 10}.layer{i % 10}" for i in range(500)]
    norms = np.ones((500, 7))
    norms[37, 3] = 1e4
    absent_span = layer_row_spans(500, 64)[5]
    norms[absent_span[0] : absent_span[1], 5] = -1.0  # a whole row without gradient
    norms[absent_span[0], 6] = -1.0  # one layer of the row without gradient: the row still has a value
    norms[123, 1] = np.inf
    exploding = np.zeros_like(norms, dtype=bool)
    exploding[37, 3] = True
    rows = heatmap_rows(norms, names, exploding, max_rows=64)
    assert rows.values.shape == (64, 7) and len(rows.labels) == 64
    assert rows.spans[0][0] == 0 and rows.spans[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(rows.spans, rows.spans[1:], strict=False))
    assert max(stop - start for start, stop in rows.spans) - min(stop - start for start, stop in rows.spans) <= 1
    row = next(i for i, (start, stop) in enumerate(rows.spans) if start <= 37 < stop)
    start, stop = rows.spans[row]
    assert rows.labels[row] == f"{names[start]} .. layer{(stop - 1) % 10} ({stop - start} layers)"
    assert rows.values[row, 3] == 1e4 and rows.exploding[row, 3] and rows.exploding.sum() == 1
    assert rows.values[5, 5] < 0 and rows.values[5, 6] == 1.0
    assert np.isnan(rows.values[next(i for i, (s, e) in enumerate(rows.spans) if s <= 123 < e), 1])
    rms = heatmap_rows(norms, names, max_rows=64, reduce="rms")
    assert rms.values[row, 3] == pytest.approx(np.sqrt((1e8 + (stop - start - 1)) / (stop - start)))
    # Few layers: one row each, labelled by the layer name.
    assert heatmap_rows(np.ones((3, 2)), ["x", "y", "z"]).labels == ["x", "y", "z"]
    assert layer_row_spans(500, 64)[0] == (0, 8)


def test_render_heatmap_shapes_and_speed():
    rng = np.random.default_rng(1)
    small = render_heatmap(10 ** rng.normal(-2, 1, (10, 40)), [f"l{i}" for i in range(10)], list(range(40)))
    assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3
    assert small.std() > 10

    norms = 10 ** rng.normal(-2, 1, (500, 200))
    norms[3, 4], norms[5, 6] = np.inf, 0.0
    flags = rng.random((500, 200)) < 0.01
    names = [f"encoder.layers.{i // 5}.sub{i % 5}" for i in range(500)]
    render_heatmap(norms[:5, :5], names[:5], list(range(5)))  # warm up fonts and caches
    # CPU time of this process: on a shared machine the wall clock also counts other jobs' turns.
    start = time.process_time()
    big = render_heatmap(norms, names, list(range(0, 2000, 10)), flags, ~flags & (rng.random((500, 200)) < 0.01))
    elapsed = time.process_time() - start
    assert elapsed < 3.0  # ~1 s (two panels: the largest and the smallest layer of each row); generous for CI
    assert big.shape[0] > small.shape[0]  # the figure grows with its rows
    assert big.shape[1] == small.shape[1]  # fixed width
    # Identical data renders identically (fixed DPI and layout).
    again = render_heatmap(10 ** rng.normal(-2, 1, (10, 40)), [f"l{i}" for i in range(10)], list(range(40)))
    assert again.shape == small.shape


def test_render_heatmap_marks_exploding_cells_in_red():
    norms = np.ones((4, 6))
    plain = render_heatmap(norms, list("abcd"), list(range(6)))
    exploding = np.zeros((4, 6), dtype=bool)
    exploding[1, 2] = True
    marked = render_heatmap(norms, list("abcd"), list(range(6)), exploding=exploding)
    red = (marked[..., 0] > 200) & (marked[..., 1] < 60) & (marked[..., 2] < 60)
    red_plain = (plain[..., 0] > 200) & (plain[..., 1] < 60) & (plain[..., 2] < 60)
    assert red.sum() > red_plain.sum() + 20


def test_render_bars_draws_bands():
    norms = np.array([1e-9, 0.3, 2.0, np.nan, 0.0])
    names = ["emb", "a", "b", "c", "d"]
    plain = render_bars(norms, names)
    banded = render_bars(norms, names, low=1e-6, high=1.0, exploding=np.array([0, 0, 1, 0, 0], bool))
    assert plain.shape == banded.shape and plain.dtype == np.uint8
    assert np.abs(plain.astype(int) - banded.astype(int)).sum() > 0
    with pytest.raises(ValueError, match="high"):
        render_bars(norms, names, high=-1.0)


# ----------------------------------------------------------------------------------------------------------- history
def test_history_is_bounded_and_keeps_spikes_and_flags():
    board = GradGuardBoard(_FakeWriter(), {0: ["a", "b"]}, ["SGD"], history=8, image_every_n_steps=None)
    for step in range(37):
        norms = np.array([1.0, 2.0])
        exploding = np.zeros(2, bool)
        if step == 5:
            norms[0], exploding[0] = 1e6, True
        if step == 12:
            norms[1] = np.nan  # a non-finite norm must survive merging too
        board.write_layer_norms(step, 0, norms, exploding, np.array([False, step == 20]))
    steps, norms, exploding, vanishing = board._histories[0].columns()
    assert norms.shape[1] <= 9  # 8 full columns plus a partial one
    assert steps[-1] == 36 and np.all(np.diff(steps) > 0)
    assert norms[0].max() == 1e6 and exploding[0].sum() == 1  # the spike survived decimation
    assert steps[np.argmax(norms[0])] >= 5 and vanishing[1].sum() == 1
    assert np.isnan(norms[1]).sum() == 1 and steps[np.isnan(norms[1])][0] >= 12
    assert np.nanmax(norms[1]) == 2.0


@pytest.mark.parametrize("capacity", [3, 4, 5, 7])
def test_history_columns_are_exact_merges_of_their_spans(capacity):
    # Each column covers the logged steps after the previous column's step up to its own: its norm must be the
    # largest norm of that span and its flags the OR of the span's flags, whatever the capacity (odd ones included).
    rng = np.random.default_rng(capacity)
    board = GradGuardBoard(_FakeWriter(), {0: ["a", "b", "c"]}, ["SGD"], history=capacity)
    raw_steps = np.arange(0, 600, 10)
    raw = 10 ** rng.normal(0, 1, (3, raw_steps.size))
    raw_exp, raw_van = rng.random(raw.shape) < 0.1, rng.random(raw.shape) < 0.1
    for col, step in enumerate(raw_steps.tolist()):
        board.write_layer_norms(step, 0, raw[:, col], raw_exp[:, col], raw_van[:, col])
    steps, norms, exploding, vanishing = board._histories[0].columns()
    assert norms.shape[1] <= capacity + 1 and steps[-1] == raw_steps[-1]
    lo, spans = -1, []
    for i, step in enumerate(steps.tolist()):
        span = (raw_steps > lo) & (raw_steps <= step)
        np.testing.assert_allclose(norms[:, i], raw[:, span].max(axis=1).astype(np.float32))
        np.testing.assert_array_equal(exploding[:, i], raw_exp[:, span].any(axis=1))
        np.testing.assert_array_equal(vanishing[:, i], raw_van[:, span].any(axis=1))
        lo = step
        spans.append(int(span.sum()))
    # Committed columns all span the same number of logged steps, so the time axis stays uniform.
    history = board._histories[0]
    assert set(spans[: history.size]) == {history.stride} and history.stride > 1


def test_state_dict_round_trip_with_weights_only(tmp_path):
    board = GradGuardBoard(_FakeWriter(), {0: ["a", "b", "c"]}, ["SGD"], history=4)
    rng = np.random.default_rng(2)
    for step in range(11):
        board.write_layer_norms(step, 0, rng.random(3), rng.random(3) < 0.3, rng.random(3) < 0.3)
    board.write_events(
        10, [{"step": 10, "kind": "exploding", "layer": None, "value": np.float64(3.0), "action": "clip"}]
    )
    board.write_images(10)
    torch.save(board.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    restored = GradGuardBoard(_FakeWriter(), {0: ["a", "b", "c"]}, ["SGD"], history=4)
    restored.load_state_dict(state)
    for got, want in zip(restored._histories[0].columns(), board._histories[0].columns(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert restored._events == board._events and not restored.should_write_images(10)
    # Continuing after a restore behaves as continuing the original.
    for b in (board, restored):
        b.write_layer_norms(11, 0, np.ones(3), np.zeros(3, bool), np.zeros(3, bool))
    for got, want in zip(restored._histories[0].columns(), board._histories[0].columns(), strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------- sampling
def test_sample_gradients_budget_values_and_no_rng():
    torch.manual_seed(0)
    grads = [
        ("enc.0.weight", torch.randn(100, 50)),
        ("enc.0.bias", torch.randn(50).to(torch.bfloat16)),
        ("enc.1.weight", torch.randn(30, 30).to(torch.float16)),
        ("enc.1.bias", None),
        ("enc.2.weight", torch.randn(40, 30).t()),  # non-contiguous
        ("head.weight", torch.randn(7, dtype=torch.float64)),
    ]
    rng_state = torch.get_rng_state()
    samples = sample_gradients(grads, lambda n: n.split(".")[0], max_per_block=500)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training's random stream is untouched
    assert list(samples) == ["enc", "head"]
    assert all(t.dtype == torch.float32 and t.ndim == 1 for t in samples.values())
    assert 1 <= samples["enc"].numel() <= 500
    torch.testing.assert_close(samples["head"], grads[-1][1].float())  # small tensors are taken whole
    pool = torch.cat([g.float().reshape(-1) for _, g in grads if g is not None])
    assert torch.isin(samples["enc"], pool).all()  # only real gradient values
    assert samples["enc"].unique().numel() == samples["enc"].numel()  # no index drawn twice
    # The sample spreads over the tensor instead of taking its first rows.
    idx = torch.nonzero(torch.isin(grads[0][1].reshape(-1), samples["enc"])).flatten()
    assert idx.max() > 0.9 * grads[0][1].numel()
    again = sample_gradients(grads, lambda n: n.split(".")[0], max_per_block=500)
    assert all(torch.equal(samples[k], again[k]) for k in samples)


def test_sample_gradients_of_complex_tensors_hold_both_parts():
    torch.manual_seed(0)
    spectral = torch.randn(6, 5, dtype=torch.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cast to float32 would warn and drop the imaginary parts
        whole = sample_gradients([("fno.w", spectral)], lambda n: n.split(".")[0])["fno"]
        part = sample_gradients([("fno.w", spectral.t())], lambda n: n.split(".")[0], max_per_block=20)["fno"]
    assert whole.numel() == 60
    torch.testing.assert_close(whole.sort().values, torch.view_as_real(spectral).flatten().sort().values)
    assert part.numel() == 20 and torch.isin(part, torch.view_as_real(spectral)).all()


@pytest.mark.parametrize("module", [render_module, board_module])
def test_module_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


# ------------------------------------------------------------------------------------ dashboard fixes (issue 15)
def test_layout_leaves_out_charts_of_parts_not_configured(tmp_path):
    for sub, kwargs, expect in (
        ("none", {"regularizers": [], "saturation": False}, set()),
        ("l2", {"regularizers": ["L2"], "saturation": True}, {"regularizers", "regularizer strength", "saturation"}),
    ):
        writer = SummaryWriter(str(tmp_path / sub))
        GradGuardBoard(writer, {0: ["a", "b"]}, ["SGD"], **kwargs).write_layout()
        writer.close()
        layout = custom_layout(load_events(tmp_path / sub))
        titles = {chart.title for category in layout.category for chart in category.chart}
        assert titles & {"regularizers", "regularizer strength", "saturation"} == expect
        assert "EMA band, log10" in titles and "layers in trouble: vanishing" in titles
    with pytest.raises(ValueError, match="regularizers"):
        GradGuardBoard(_FakeWriter(), {0: ["a"]}, ["SGD"], regularizers="L2")


def test_ema_band_is_written_in_log10_and_skips_unusable_values(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["a"], 1: ["b"]}, ["G", "D"])
    board.write_derived(
        5,
        {
            "gradguard/opt0/ema_mean": 1.0,
            "gradguard/opt0/ema_lower": 0.25,
            "gradguard/opt0/ema_upper": 5e3,
            "gradguard/opt1/ema_mean": float("nan"),
            "gradguard/opt1/ema_lower": 0.0,
            "gradguard/opt1/ema_upper": 2.0,
            "gradguard/lr": 0.1,
        },
    )
    writer.close()
    acc = load_events(tmp_path)
    values = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
    assert values == pytest.approx(
        {
            "gradguard/opt0/ema_log10/mean": 0.0,
            "gradguard/opt0/ema_log10/lower": np.log10(0.25),
            "gradguard/opt0/ema_log10/upper": np.log10(5e3),
            "gradguard/opt1/ema_log10/upper": np.log10(2.0),
        }
    )
    assert {e.step for tag in values for e in acc.Scalars(tag)} == {5}
    layout = board.layout()["GradGuard"]["EMA band, log10 (opt1: D)"]
    assert layout == [
        "Margin",
        ["gradguard/opt1/ema_log10/mean", "gradguard/opt1/ema_log10/lower", "gradguard/opt1/ema_log10/upper"],
    ]


def test_events_are_written_as_trouble_tags_at_their_own_steps(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["enc.0", "enc.1", "head"]}, ["SGD"])
    board.write_events(
        10,
        [
            {"step": 7, "kind": "exploding", "layer": "head", "value": 40.0, "action": "clip"},
            {"step": 9, "kind": "vanishing", "layer": "enc.0", "value": np.float32(1e-12), "action": "none"},
            {"step": 10, "kind": "nonfinite", "layer": "enc.1", "value": float("nan"), "action": "skip"},
            {"step": 10, "kind": "exploding", "layer": None, "value": 3.0, "action": "clip"},  # no layer: table only
        ],
    )
    board.write_events(20, [{"step": 14, "kind": "exploding", "layer": "head", "value": 50.0, "action": "clip"}])
    writer.close()
    acc = load_events(tmp_path)
    trouble = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert trouble.keys() == {
        "gradguard/trouble/exploding/head",
        "gradguard/trouble/vanishing/enc.0",
        "gradguard/trouble/nonfinite/enc.1",
    }
    assert trouble["gradguard/trouble/exploding/head"] == [(7, 40.0), (14, 50.0)]
    assert trouble["gradguard/trouble/vanishing/enc.0"] == [(9, pytest.approx(1e-12))]
    assert trouble["gradguard/trouble/nonfinite/enc.1"][0][0] == 10
    assert np.isnan(trouble["gradguard/trouble/nonfinite/enc.1"][0][1])
    table = acc.Tensors("gradguard/events_log/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert len(table.splitlines()) == 2 + 5  # the table keeps every row


def test_no_pictures_at_all_when_images_are_off(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["a", "b"]}, ["SGD"], image_every_n_steps=None)
    for step in (5, 10):
        board.write_layer_norms(step, 0, np.array([1.0, 2.0]), np.zeros(2, bool), np.zeros(2, bool))
        assert not board.should_write_images(step)
    board.close_run(10)
    writer.close()
    assert load_events(tmp_path).Tags()["images"] == []


def test_bar_axis_follows_the_data_not_the_vanishing_floor():
    names = [f"net.{i}" for i in range(1500)]
    norms = np.where(np.arange(1500) % 2 == 0, 0.05, 0.01)
    fig = flow_figure(norms[:, None], names, [10], low=1e-9)
    bars = fig.axes[-1]
    low, high = bars.get_ylim()
    assert 1e-4 <= low < 0.01 and 0.05 < high < 1.0  # a decade below the smallest norm, not 1e-9
    legend = [text.get_text() for text in bars.get_legend().get_texts()]
    assert "vanishing floor 1e-09 (below the axis)" in legend
    # Labels stay legible: at most ~32 of them, none smaller than 6 pt.
    labels = [label for label in bars.get_xticklabels() if label.get_text()]
    assert 8 <= len(labels) <= 33 and min(label.get_fontsize() for label in labels) >= 6
    assert labels[0].get_text() == "net.0"
    # A floor near the data is drawn, and the axis reaches down to it.
    near = flow_figure(norms[:, None], names, [10], low=1e-4).axes[-1]
    assert near.get_ylim()[0] <= 1e-4 / 2
    assert any(t.get_text() == "vanishing floor 0.0001" for t in near.get_legend().get_texts())


def test_bar_chart_draws_the_detectors_relative_floor():
    board = GradGuardBoard(_FakeWriter(), {0: [f"l{i}" for i in range(6)]}, ["SGD"])
    board.write_layer_norms(5, 0, np.array([1.0, 0.5, 0.2, 1e-5, 0.3, 0.4]), np.zeros(6, bool), np.zeros(6, bool))

    def band_pixels(img: np.ndarray) -> int:  # the pale blue of the vanishing band
        r, g, b = (img[..., i].astype(int) for i in range(3))
        return int(((r > 215) & (r < 235) & (g > 238) & (g < 252) & (b > 250)).sum())

    board.set_bands(0, 1e-9, None)  # the absolute floor alone lies far below the data: named, not drawn
    assert band_pixels(board.bars_image(0)) == 0
    board.set_bands(0, 1e-9, None, low_ratio=1e-4)  # the detector's floor here: 1e-4 x the largest layer
    assert band_pixels(board.bars_image(0)) > 1000


def test_grouped_heatmap_shows_the_weakest_layer_of_each_row():
    names = [f"net.{i}" for i in range(1500)]
    norms = np.full((1500, 6), 0.1)
    norms[700, 3:] = 1e-9  # one weak layer inside a row of ~23
    vanishing = np.zeros(norms.shape, dtype=bool)
    vanishing[700, 3] = True
    rows = heatmap_rows(norms, names, vanishing=vanishing)
    row = next(i for i, (start, stop) in enumerate(rows.spans) if start <= 700 < stop)
    assert rows.values[row, 3] == 0.1 and rows.low[row, 3] == 1e-9 and rows.low[row, 2] == 0.1
    assert rows.grouped and not heatmap_rows(norms[:5], names[:5]).grouped

    fig = flow_figure(norms, names, list(range(0, 60, 10)), vanishing=vanishing)
    largest, smallest = fig.axes[0], fig.axes[1]
    shown_max = np.ma.filled(largest.get_images()[0].get_array(), np.nan)
    shown_min = np.ma.filled(smallest.get_images()[0].get_array(), np.nan)
    assert shown_max[row, 3] == pytest.approx(-1.0) and shown_min[row, 3] == pytest.approx(-9.0)
    assert "smallest" in smallest.get_xlabel() and "largest" in largest.get_xlabel()
    # The vanishing mark sits on the "smallest" panel, where the weak layer shows.
    assert len(smallest.collections) == 1 and not largest.collections
    # The TensorBoard picture draws the same two panels at the same fixed width.
    one = render_heatmap(norms[:40], names[:40], list(range(6)))
    two = render_heatmap(norms, names, list(range(6)), vanishing=vanishing)
    assert one.shape[1] == two.shape[1]


@pytest.mark.parametrize("count", [1, 7, 40, 1500])
def test_layer_blocks_cover_every_layer_in_order(count):
    names = ["stem"] + [f"stage{s}.{b}.conv{c}" for s in range(3) for b in range(50) for c in range(2)]
    names = names[:count]
    for max_blocks in (1, 5, 21):
        blocks = layer_blocks(names, max_blocks)
        assert 1 <= len(blocks) <= max_blocks
        assert [i for _, members in blocks for i in members] == list(range(len(names)))
        assert len({name for name, _ in blocks}) == len(blocks)
        assert all(re.fullmatch(r"[\w.]+", name) for name, _ in blocks)


class _FakeWriter:
    """Records what the board writes without touching the disk."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, int]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.histograms: list[tuple[str, np.ndarray]] = []
        self.layouts: list[dict] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, img, step, dataformats="CHW"):
        assert dataformats == "HWC" and img.dtype == np.uint8
        self.images.append((tag, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, np.asarray(values)))

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)

    def flush(self):
        pass
