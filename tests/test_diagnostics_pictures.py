"""The diagnostics on the board and in the report, on real runs: the update-ratio heatmap and the flow-through-depth
picture, the "GradGuard diagnostics" charts, the recorded batch size, the report's figures, quiet hints, and the
cost benchmark's smoke test."""

from __future__ import annotations

import json
import re
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import GradGuard
from lightning_gradguard.cli import main as gradguard
from lightning_gradguard.cli import parse_config_text
from lightning_gradguard.render import _depth_columns, render_depth_flow, render_update_ratio_heatmap
from lightning_gradguard.tensorboard import GradGuardBoard
from tests.helpers import custom_layout, load_events
from tests.models import Regressor, regression_data, trainer

MAX_CHARTS = 30
DIAG_IMAGES = ("gradguard/update_ratio_heatmap", "gradguard/act_grad_flow")


def _layout(acc: ea.EventAccumulator) -> dict[str, dict[str, list[str]]]:
    """``{category: {chart title: tag regexes}}`` of the one layout written."""
    layout = custom_layout(acc)
    return {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }


def _scalars(acc: ea.EventAccumulator) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _config(acc: ea.EventAccumulator) -> dict[str, str]:
    return parse_config_text(acc.Tensors("gradguard/config/text_summary")[-1].tensor_proto.string_val[0].decode())


def _net(depth: int = 4, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with every diagnostic fed: accumulation gives the noise scale its second batch size."""
    root = tmp_path_factory.mktemp("diag")
    torch.manual_seed(0)
    guard = GradGuard(log_every_n_steps=2, image_every_n_steps=4)
    logger = TensorBoardLogger(root, name="run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hints are tested below
        trainer(max_steps=8, max_epochs=-1, accumulate_grad_batches=2, callbacks=[guard], logger=logger).fit(
            Regressor(net=_net(), optimizer="adam", lr=1e-2), regression_data()
        )
    return Path(logger.log_dir)


def test_new_pictures_follow_the_gradient_flow_schedule(run: Path) -> None:
    acc = load_events(run)
    images = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    flow_steps = images["gradguard/gradient_flow"]
    assert len(flow_steps) >= 2  # on the schedule (every 4 steps), the last at the end of training
    for tag in DIAG_IMAGES:
        assert images[tag] == flow_steps
        picture = np.asarray(Image.open(BytesIO(acc.Images(tag)[-1].encoded_image_string)))
        assert picture.ndim == 3 and len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 20


def test_diagnostics_charts_match_written_tags_within_the_budget(run: Path) -> None:
    acc = load_events(run)
    layout = _layout(acc)
    assert sum(len(charts) for charts in layout.values()) <= MAX_CHARTS
    charts = layout["GradGuard diagnostics"]
    assert set(charts) == {
        "update/weight ratio",
        "zero fraction",
        "activation-gradient norm",
        "gradient noise scale (critical batch size)",
    }
    tags = acc.Tags()["scalars"]
    for title, regexes in charts.items():  # no empty chart: every line has data
        for regex in regexes:
            assert any(re.match(regex, tag) for tag in tags), (title, regex)
    # A 4-layer model fits one chart per quantity: every layer is a line of it.
    assert sum(bool(re.match(charts["update/weight ratio"][0], t)) for t in tags) == 4


class Tempered(nn.Module):
    """Three layers, then a learnable temperature that the module owns itself: defined before its children, its
    output (the model's) computed after theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) / self.temperature


def test_the_report_reads_the_flow_from_input_to_output_in_forward_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The report took definition order for depth: the model's output (`net`, which owns the temperature) was its
    # "input side".
    torch.manual_seed(0)
    guard = GradGuard(diagnostics=["act_grad"], log_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=4, callbacks=[guard], logger=logger).fit(Regressor(net=Tempered()), regression_data())
    assert guard.layer_names() == ["net", "net.fc1", "net.fc2", "net.fc3"]  # definition order
    assert gradguard(["report", str(tmp_path), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["runs"].values()
    act = summary["act_grad"]
    assert act["input_side"]["layer"] == "net.fc1" and act["output_side"]["layer"] == "net"
    scalars = _scalars(load_events(tmp_path))
    first, last = (scalars[f"gradguard/act_grad/{name}"][act["step"]] for name in ("net.fc1", "net"))
    assert act["decades"] == pytest.approx(np.log10(first / last), rel=1e-5)


def test_batch_size_is_recorded_and_the_report_sets_it_against_the_noise_scale(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acc = load_events(run)
    assert _config(acc)["batch_size"] == "32"  # 2 micro-batches of 16 per optimizer step
    scalars = _scalars(acc)
    assert gradguard(["report", str(run), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["runs"].values()
    noise = summary["noise_scale"]
    last_noise = scalars["gradguard/noise_scale"][max(scalars["gradguard/noise_scale"])]
    assert noise["batch_size"] == 32
    assert noise["critical_batch_size"] == pytest.approx(last_noise, rel=1e-6)
    # Update ratios: latest and median per layer from the logged values; out of band by the median.
    ratio = summary["update_ratio"]["optimizers"]["opt0"]
    assert [row["layer"] for row in ratio["layers"]] == ["net.0", "net.2", "net.4", "net.6"]
    for row in ratio["layers"]:
        logged = scalars[f"gradguard/update_ratio/{row['layer']}"]
        assert row["latest"] == pytest.approx(logged[max(logged)], rel=1e-6)
        assert row["median"] == pytest.approx(float(np.median(list(logged.values()))), rel=1e-6)
    assert {row["layer"] for row in ratio["out_of_band"]} == {
        row["layer"] for row in ratio["layers"] if not 1e-5 <= row["median"] <= 1e-2
    }
    # The activation-gradient flow at the last logged step: input side and output side in definition order.
    act = summary["act_grad"]
    last_step = max(scalars["gradguard/act_grad/net.0"])
    assert act["step"] == last_step
    first, last = scalars["gradguard/act_grad/net.0"][last_step], scalars["gradguard/act_grad/net.6"][last_step]
    assert act["input_side"]["layer"] == "net.0" and act["output_side"]["layer"] == "net.6"
    assert act["decades"] == pytest.approx(np.log10(first / last), rel=1e-5)

    assert gradguard(["report", str(run)]) == 0
    text = capsys.readouterr().out
    critical = f"{noise['critical_batch_size']:.2g}"
    assert f"critical batch size about {float(critical):g}; you train at 32" in text
    assert "update/weight ratio: median over layers of the latest" in text
    assert "activation-gradient flow at step" in text


def test_what_is_not_fed_gets_no_chart_and_no_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    # No accumulation and one process: the noise scale has no second batch size.
    guard = GradGuard(log_every_n_steps=2, image_every_n_steps=4, diagnostics=["zero_fraction", "noise_scale"])
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(max_steps=6, max_epochs=-1, callbacks=[guard], logger=logger).fit(Regressor(), regression_data())
    acc = load_events(Path(logger.log_dir))
    assert list(_layout(acc)["GradGuard diagnostics"]) == ["zero fraction"]
    images = acc.Tags()["images"]
    assert "gradguard/gradient_flow" in images and not set(DIAG_IMAGES) & set(images)
    assert "batch_size" not in _config(acc)
    assert gradguard(["report", str(logger.log_dir), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert summary["noise_scale"] is None and summary["update_ratio"] is None and summary["act_grad"] is None
    assert summary["zero_fraction"]["opt0"]["layers"] == 2


def test_no_pictures_at_all_when_off(tmp_path: Path) -> None:
    guard = GradGuard(log_every_n_steps=2, image_every_n_steps=None)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer(max_steps=6, max_epochs=-1, accumulate_grad_batches=2, callbacks=[guard], logger=logger).fit(
        Regressor(), regression_data()
    )
    acc = load_events(Path(logger.log_dir))
    assert not acc.Tags()["images"]  # none on the schedule and none at the end of training
    assert any(tag.startswith("gradguard/update_ratio/") for tag in acc.Tags()["scalars"])


def test_1500_layers_diagnostics_charts_are_block_statistics_within_the_budget(tmp_path: Path) -> None:
    names = [f"net.{i}" for i in range(1500)]
    rng = np.random.default_rng(0)
    writer = SummaryWriter(str(tmp_path))
    diagnostics = ["update_ratio", "zero_fraction", "act_grad", "noise_scale", "epoch"]
    board = GradGuardBoard(writer, {0: names}, ["AdamW"], image_every_n_steps=None, diagnostics=diagnostics)
    board.write_layout()
    ratio = 10 ** rng.normal(-3, 1, 1500)
    ratio[7] = np.nan  # not measured: left out of its block
    zero = rng.uniform(0, 0.5, 1500)
    act = 10 ** rng.normal(-2, 1, 1500)
    for step in (9, 19):
        scalars = {f"gradguard/update_ratio/{n}": r for n, r in zip(names, ratio) if np.isfinite(r)}
        scalars.update({f"gradguard/zero_fraction/{n}": z for n, z in zip(names, zero)})
        scalars.update({f"gradguard/act_grad/{n}": a for n, a in zip(names, act)})
        board.write_scalars(step, scalars)
    writer.close()
    acc = load_events(tmp_path)
    layout = _layout(acc)
    assert sum(len(charts) for charts in layout.values()) <= MAX_CHARTS
    assert sum(": max, median" in title for title in layout["GradGuard layers"]) >= 10  # the layer norms keep blocks
    charts = layout["GradGuard diagnostics"]
    assert set(charts) == {
        "update/weight ratio: largest per block",
        "update/weight ratio: smallest per block",
        "zero fraction: largest per block",
        "activation-gradient norm: median per block",
        "gradient noise scale (critical batch size)",
    }
    scalars = _scalars(acc)
    values = {"update_ratio": ratio, "zero_fraction": zero, "act_grad": act}
    reduce = {"max": np.nanmax, "min": np.nanmin, "median": np.nanmedian}
    covered: dict[str, list[int]] = {}
    for title, regexes in charts.items():
        if "noise" in title:
            continue
        assert len(regexes) <= 12
        for regex in regexes:
            (tag,) = [t for t in scalars if re.match(regex, t)]
            quantity, first, last, stat = re.fullmatch(
                r"gradguard/(\w+)_block/net\.(\d+)\.\.(\d+)/(max|min|median)", tag
            ).groups()
            members = list(range(int(first), int(last) + 1))
            covered.setdefault(f"{quantity}/{stat}", []).extend(members)
            want = reduce[stat](values[quantity][members])
            assert scalars[tag] == {9: pytest.approx(want, rel=1e-5), 19: pytest.approx(want, rel=1e-5)}
    assert all(sorted(rows) == list(range(1500)) for rows in covered.values())  # every layer in one block


def test_hints_warn_once_per_log_at_most_naming_the_worst_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    guard = GradGuard(log_every_n_steps=1, diagnostics=["update_ratio"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=False).fit(
            Regressor(net=_net(depth=6), optimizer="adam", lr=0.05), regression_data()
        )
    hints = [str(w.message) for w in caught if "update/weight ratio" in str(w.message)]
    # Adam at 0.05 moves every layer of this small net by more than 1e-1 of its norm on every step: one streak per
    # layer, all completed at the third log, all in one message; none repeated while the streaks last.
    assert len(hints) == 1, hints
    assert "above 1e-1 over the last 3 logs for 6 layers:" in hints[0]
    assert hints[0].count("'net.") == 3 and "and 3 more" in hints[0]


def test_update_ratio_heatmap_marks_the_cells_out_of_the_band() -> None:
    def red(image: np.ndarray) -> int:
        return int(((image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)).sum())

    ratios = np.full((3, 5), 1e-3)
    plain = render_update_ratio_heatmap(ratios, ["a", "b", "c"], [1, 2, 3, 4, 5])
    ratios[1, 2] = 0.5
    marked = render_update_ratio_heatmap(ratios, ["a", "b", "c"], [1, 2, 3, 4, 5])
    unmarked = render_update_ratio_heatmap(ratios, ["a", "b", "c"], [1, 2, 3, 4, 5], band=None)
    assert red(plain) == red(unmarked) == 0 and red(marked) > 20
    with pytest.raises(ValueError, match="band"):
        render_update_ratio_heatmap(ratios, ["a", "b", "c"], [1, 2, 3, 4, 5], band=(1e-2, 1e-5))


def test_flow_picture_draws_the_newest_step_and_spreads_the_others() -> None:
    assert _depth_columns(5, 8) == [0, 1, 2, 3, 4]
    picked = _depth_columns(100, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 99
    norms = 10 ** np.linspace(-4, 0, 6)[:, None] * np.ones((6, 3))
    norms[2, 1] = np.nan  # a gap, not a failure
    image = render_depth_flow(norms, [f"l{i}" for i in range(6)], [9, 19, 29])
    assert image.ndim == 3 and image.dtype == np.uint8
    with pytest.raises(ValueError, match="layer_names"):
        render_depth_flow(norms, ["a"], [9, 19, 29])


def test_cost_benchmark_runs_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.diagnostics_cost import DIAGNOSTICS
    from benchmarks.diagnostics_cost import main as cost

    out = tmp_path / "cost.json"
    result: dict[str, Any] = cost(["--quick", "--models", "small", "--json", str(out)])
    text = capsys.readouterr().out
    variants = result["models"]["small"]["variants"]
    assert list(variants) == ["off", *DIAGNOSTICS, "all"]
    assert all(row["step_ms"] > 0 and np.isfinite(row["ratio"]) for row in variants.values())
    assert variants["off"]["ratio"] == 1.0 and variants["off"]["extra_ms"] == 0.0
    assert json.loads(out.read_text())["meta"]["quick"] is True
    assert all(label in text for label in variants)


@pytest.mark.parametrize("decades", [-0.0004, 0.0004])
def test_a_flow_that_does_not_change_reads_as_unchanged(decades: float) -> None:
    # It read "-0.00" in the table and "shrinks 0.0 decades towards the input" in the text.
    from lightning_gradguard.cli import format_diagnostics

    act = {
        "step": 9,
        "layers": 2,
        "input_side": {"layer": "net.0", "norm": 1.0},
        "output_side": {"layer": "net.2", "norm": 1.0},
        "decades": decades,
        "smallest": {"layer": "net.0", "norm": 1.0},
        "zero_layers": [],
    }
    (line,) = format_diagnostics({"act_grad": act})
    assert "(about the same at the input as at the output)" in line and "decades" not in line
    act["decades"] = -1.26
    (line,) = format_diagnostics({"act_grad": act})
    assert "(shrinks 1.3 decades towards the input)" in line
