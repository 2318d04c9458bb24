"""The dashboard a real run writes, and `gradguard report` on it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import GradGuard, VanishingDetector
from lightning_gradguard.cli import main as gradguard
from lightning_gradguard.cli import parse_config_text
from tests.helpers import custom_layout, load_events
from tests.models import Regressor, SplitRegressor, regression_data, trainer


def _deep_sigmoid(depth: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real runs under one directory: a deep sigmoid net (vanishing) and a healthy MLP."""
    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    guard = GradGuard(vanishing=VanishingDetector(patience=3), image_every_n_steps=10, histogram_every_n_steps=10)
    logger = TensorBoardLogger(root, name="sigmoid")
    with pytest.warns(UserWarning, match="vanishing gradients"):
        trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
            Regressor(net=_deep_sigmoid()), regression_data()
        )
    torch.manual_seed(0)
    trainer(
        max_steps=30,
        max_epochs=-1,
        callbacks=[GradGuard()],
        logger=TensorBoardLogger(root, name="mlp"),
        log_every_n_steps=5,
    ).fit(Regressor(), regression_data())
    return root


def test_layout_images_histograms_and_text_are_written(run_dir: Path) -> None:
    acc = load_events(run_dir / "sigmoid" / "version_0")
    tags = acc.Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    images = {tag: [e.step for e in acc.Images(tag)] for tag in tags["images"]}
    every_10 = [n - 1 for n in (10, 20, 30)]  # Lightning's step of the 10th, 20th, 30th optimizer step
    assert set(every_10) <= set(images["gradguard/gradient_flow"])  # every 10 steps, and at the end
    assert "gradguard/gradient_flow_bars" in images
    hists = [t for t in tags["histograms"] if t.startswith("gradguard/grad_hist/")]
    assert hists and [e.step for e in acc.Histograms(hists[0])] == every_10  # sampled on those steps only
    text_tags = {t for t in tags["tensors"] if t.startswith("gradguard/")}
    assert {"gradguard/events_log/text_summary", "gradguard/config/text_summary"} <= text_tags
    log = acc.Tensors("gradguard/events_log/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "vanishing" in log and "net.0" in log
    # The heatmap is a real picture: many distinct colours, one row per layer (11 layers here).
    from io import BytesIO

    from PIL import Image

    picture = np.asarray(Image.open(BytesIO(acc.Images("gradguard/gradient_flow")[-1].encoded_image_string)))
    assert picture.ndim == 3 and len(np.unique(picture.reshape(-1, picture.shape[-1]), axis=0)) > 20


def test_report_numbers_match_the_raw_scalars(
    run_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "flow.png"
    assert gradguard(["report", str(run_dir), "--json", "--png", str(png), "--run", "sigmoid/version_0"]) == 0
    output = json.loads(capsys.readouterr().out)
    report = output["runs"]["sigmoid/version_0"]
    acc = load_events(run_dir / "sigmoid" / "version_0")
    totals = np.array([e.value for e in acc.Scalars("gradguard/total_norm")])
    maxes = np.array([e.value for e in acc.Scalars("gradguard/total_norm_max")])
    got = report["optimizers"]["opt0"]["total_norm"]
    assert got["p50"] == pytest.approx(float(np.percentile(totals, 50)), rel=1e-6)
    assert got["max"] == pytest.approx(float(max(totals.max(), maxes.max())), rel=1e-6)
    vanishing = acc.Scalars("gradguard/events/vanishing")[-1].value
    assert report["optimizers"]["opt0"]["events"]["vanishing"] == int(vanishing) > 0
    assert output["skipped"] == {}
    # The root-cause hint is the detector's first event: the first row of the events table (earliest layer first).
    rows = _event_rows(acc)
    first_step = min(row["step"] for row in rows)
    first_layers = [row["layer"] for row in rows if row["step"] == first_step]
    assert report["first_event"]["step"] == first_step
    assert report["first_event"]["layer"] == first_layers[0] == "net.0"
    assert report["first_event"]["layers"] == len(set(first_layers))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _event_rows(acc: EventAccumulator) -> list[dict[str, Any]]:
    table = acc.Tensors("gradguard/events_log/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = []
    for line in table.splitlines()[2:]:
        step, kind, layer, value, _ = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append({"step": int(step), "kind": kind, "layer": layer, "value": float(value)})
    return rows


def test_events_reach_the_event_files_as_trouble_tags(run_dir: Path) -> None:
    # Every layer event of the text table is a gradguard/trouble/<kind>/<layer> point at the same step, charted by
    # a "layers in trouble" regex.
    acc = load_events(run_dir / "sigmoid" / "version_0")
    rows = _event_rows(acc)
    assert rows and {row["kind"] for row in rows} == {"vanishing"}
    points = sorted(
        (e.step, tag.split("/")[2], tag.split("/", 3)[3], e.value)
        for tag in acc.Tags()["scalars"]
        if tag.startswith("gradguard/trouble/")
        for e in acc.Scalars(tag)
    )
    assert [(s, k, layer) for s, k, layer, _ in points] == sorted((r["step"], r["kind"], r["layer"]) for r in rows)
    assert [v for *_, v in points] == pytest.approx(
        [r["value"] for r in sorted(rows, key=lambda r: (r["step"], r["kind"], r["layer"]))], rel=1e-3
    )
    layout = custom_layout(acc)
    regexes = [
        tag
        for category in layout.category
        for chart in category.chart
        if chart.title == "layers in trouble: vanishing"
        for tag in chart.multiline.tag
    ]
    assert regexes and all(
        any(re.match(r, f"gradguard/trouble/vanishing/{row['layer']}") for r in regexes) for row in rows
    )


def test_image_every_n_steps_none_draws_no_picture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer(
        max_steps=10,
        max_epochs=-1,
        callbacks=[GradGuard(image_every_n_steps=None)],
        logger=TensorBoardLogger(tmp_path, name="quiet"),
        log_every_n_steps=5,
    ).fit(Regressor(), regression_data())
    acc = load_events(tmp_path / "quiet" / "version_0")
    assert acc.Tags()["images"] == []  # not during training, not at the end
    assert "gradguard/layer/net.0" in acc.Tags()["scalars"]


def test_without_layer_scalars_the_pictures_are_still_drawn(tmp_path: Path) -> None:
    # `log_layers=False` left the gradient-flow pictures blank as well (user trial): only the scalars go now.
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="nolayers", version=0)
    guard = GradGuard(log_layers=False, image_every_n_steps=5)
    trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
        Regressor(), regression_data()
    )
    tags = load_events(Path(logger.log_dir)).Tags()
    assert {"gradguard/gradient_flow", "gradguard/gradient_flow_bars"} <= set(tags["images"])
    assert not [tag for tag in tags["scalars"] if tag.startswith("gradguard/layer/")]
    assert "gradguard/total_norm" in tags["scalars"]


def test_report_compares_several_runs(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gradguard(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "comparison" in out and "sigmoid/version_0" in out and "mlp/version_0" in out


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gradguard(["report", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gradguard(["report", str(empty)]) == 2


class NaNAt(Regressor):
    """One NaN input entry on the batch of optimizer step ``at`` (counted from 1)."""

    def __init__(self, at: int) -> None:
        super().__init__(lr=0.05)
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step + 1 == self.at:
            x = x.clone()
            x[0, 0] = float("nan")
        return super().training_step((x, y), batch_idx)


def test_a_non_finite_step_between_two_logs_shows_in_the_heatmap_and_the_report_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Logs at steps 5, 10, 15, 20; the NaN batch is step 8, skipped: the latest norms at step 10 are finite.
    guard = GradGuard(log_every_n_steps=5, image_every_n_steps=5)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    with pytest.warns(UserWarning):
        trainer(max_steps=20, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
            NaNAt(8), regression_data()
        )
    assert guard.summary()["skipped"] == 1
    steps, norms, _, _ = guard._board._histories[0].columns()
    bad = steps == 9  # the log after the bad step (Lightning's 0-based step)
    assert bad.sum() == 1 and np.isnan(norms[:, bad]).all()  # both layers: shown non-finite, as a NaN at a log is
    assert np.isfinite(norms[:, ~bad]).all()
    assert np.isfinite(guard._board._latest[0][1]).all()  # the bar chart draws the latest norms, finite
    acc = load_events(tmp_path / "version_0")
    layer_tags = [t for t in acc.Tags()["scalars"] if t.startswith("gradguard/layer/")]
    assert layer_tags and all(np.isfinite(e.value) for t in layer_tags for e in acc.Scalars(t))  # the latest norms
    # The report's picture marks the same cell.
    import lightning_gradguard.render as render

    drawn: list[np.ndarray] = []
    real = render.flow_figure
    monkeypatch.setattr(render, "flow_figure", lambda norms, *a, **k: drawn.append(norms) or real(norms, *a, **k))
    png = tmp_path / "flow.png"
    assert gradguard(["report", str(tmp_path), "--png", str(png)]) == 0 and png.stat().st_size > 0
    assert np.isnan(drawn[0][:, 1]).all() and np.isfinite(drawn[0][:, [0, 2, 3]]).all()


class _SplitLayers(SplitRegressor):
    """A layer split over two optimizers (the Muon recipe: matrices to one, biases to another), manual steps."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        first, last = self.net[0], self.net[2]
        return [
            torch.optim.SGD([first.weight], lr=0.05),
            torch.optim.Adam([first.bias, last.weight, last.bias], lr=1e-3),
        ]


def test_a_layer_split_over_two_optimizers_gets_one_tag_per_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _SplitLayers()
    logger = TensorBoardLogger(tmp_path, name="split", version=0)
    trainer(max_steps=20, callbacks=[GradGuard()], logger=logger, log_every_n_steps=5).fit(model, regression_data())
    acc = load_events(Path(logger.log_dir))
    tags = set(acc.Tags()["scalars"])
    # The first Linear is in both optimizers: one tag each, none shared. The last one is in the second optimizer only.
    assert "gradguard/layer/net.0" not in tags
    assert {"gradguard/layer/opt0/net.0", "gradguard/layer/opt1/net.0", "gradguard/layer/net.2"} <= tags
    weight = acc.Scalars("gradguard/layer/opt0/net.0")
    bias = acc.Scalars("gradguard/layer/opt1/net.0")
    steps = [e.step for e in weight]
    assert steps == [e.step for e in bias] and len(steps) >= 2 and len(set(steps)) == len(steps)  # one point per log
    first = model.net[0]
    assert weight[-1].value == pytest.approx(float(first.weight.grad.norm()), rel=1e-5)
    assert bias[-1].value == pytest.approx(float(first.bias.grad.norm()), rel=1e-5)
    charted = {
        tag for category in custom_layout(acc).category for chart in category.chart for tag in chart.multiline.tag
    }
    for tag in ("gradguard/layer/opt0/net.0", "gradguard/layer/opt1/net.0", "gradguard/layer/net.2"):
        assert any(re.match(line, tag) for line in charted), tag
    # Charts are labelled by index and optimizer class (they read "opt1: opt1" before).
    titles = {chart.title for category in custom_layout(acc).category for chart in category.chart}
    assert {"total norm (opt0: SGD)", "total norm (opt1: Adam)"} <= titles
    # The default divergence detector watches a module with one optimizer only: no loss relapse is written or charted.
    assert not any(title.startswith("loss relapse") for title in titles)
    assert not any(tag.endswith("loss_relapse") for tag in tags)


def test_charts_of_switched_off_detectors_are_not_laid_out(run_dir: Path, tmp_path: Path) -> None:
    def titles(acc: EventAccumulator) -> set[str]:
        return {chart.title for category in custom_layout(acc).category for chart in category.chart}

    assert {"loss relapse", "layers in trouble: vanishing"} <= titles(load_events(run_dir / "mlp" / "version_0"))
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="off", version=0)
    guard = GradGuard(divergence=None, vanishing=None, skip_exploding=True, histogram_every_n_steps=7)
    trainer(max_steps=10, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
        Regressor(), regression_data()
    )
    acc = load_events(Path(logger.log_dir))
    off = titles(acc)
    assert "total norm" in off and "layers in trouble: exploding, non-finite" in off
    assert "loss relapse" not in off and "layers in trouble: vanishing" not in off
    # The configuration text tells this run from a default one.
    config = parse_config_text(acc.Tensors("gradguard/config/text_summary")[-1].tensor_proto.string_val[0].decode())
    assert config["skip_exploding"] == "True" and config["histogram_every_n_steps"] == "7"
    assert config["divergence"] == "None" and config["group_fn"] == "None"


def test_a_block_split_over_two_optimizers_gets_all_its_values_in_its_histogram(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="split", version=0)
    guard = GradGuard(histogram_every_n_steps=5)
    trainer(max_steps=20, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(_SplitLayers(), regression_data())
    acc = load_events(Path(logger.log_dir))
    first, last = acc.Histograms("gradguard/grad_hist/net.0"), acc.Histograms("gradguard/grad_hist/net.2")
    assert len(first) == len(last) >= 2
    # net.0's weight (512 values) is the first optimizer's, its bias (32) the second's: both, not the last one's.
    assert {h.histogram_value.num for h in first} == {16 * 32 + 32}
    assert {h.histogram_value.num for h in last} == {32 + 1}


def test_the_report_counts_layers_whose_activation_gradient_is_exactly_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every unit of the first ReLU is dead: no gradient reaches net.0's output, while net.2 and net.4 get one.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    logger = TensorBoardLogger(tmp_path, name="dead", version=0)
    guard = GradGuard(log_every_n_steps=2, diagnostics=["act_grad", "update_ratio"])
    trainer(max_steps=4, callbacks=[guard], logger=logger, log_every_n_steps=2).fit(Regressor(net), regression_data())
    assert gradguard(["report", str(tmp_path), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["runs"].values()
    act = summary["act_grad"]
    assert act["layers"] == 3 and act["zero_layers"] == ["net.0"]
    assert act["input_side"] == {"layer": "net.0", "norm": 0.0} and act["output_side"]["layer"] == "net.4"
    assert act["decades"] is None and act["smallest"]["norm"] == 0.0
    # net.0 never moves: an update ratio of exactly 0 lies outside the band too, the furthest below it.
    ratio = summary["update_ratio"]["optimizers"]["opt0"]
    dead = ratio["out_of_band"][0]
    assert (dead["layer"], dead["median"], dead["side"], dead["decades"]) == ("net.0", 0.0, "below", None)
    assert all(row["median"] > 0 for row in ratio["out_of_band"][1:])
    assert gradguard(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "1 of 3 layers at exactly 0, no gradient reaches them: net.0" in text
    assert re.search(r"net\.0\s+0\.0e\+0\s+0\.0e\+0\s+below", text), text


class _Spiky(Regressor):
    """10^4x losses at the given optimizer steps (counted from 0, as ``global_step``)."""

    def __init__(self, spikes: tuple[int, ...]) -> None:
        super().__init__(lr=0.05)
        self.spikes = spikes

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.global_step in self.spikes else loss


def test_the_events_table_shows_the_cuts_and_restarts_in_step_order(tmp_path: Path) -> None:
    # The table held the detectors' events only, each with a fixed sentence of what would answer it: when the rate
    # was cut and when the run restarted could not be read from it.
    torch.manual_seed(0)
    guard = GradGuard()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    with pytest.warns(UserWarning):
        trainer(max_steps=30, max_epochs=-1, callbacks=[guard], logger=logger, log_every_n_steps=5).fit(
            _Spiky(spikes=(1, 2, 5, 6)), regression_data()
        )
    assert guard.summary()["rolled_back"] == 2 and guard.summary()["lr_reduced"] == 2
    table = load_events(tmp_path).Tensors("gradguard/events_log/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [int(row[0]) for row in rows] == sorted(int(row[0]) for row in rows)
    actions = [(row[1], row[4]) for row in rows if row[1] in ("lr_reduced", "rolled_back")]
    assert actions == [
        ("lr_reduced", "rate 0.5x its schedule"),
        ("rolled_back", "restarted from the initial weights, rate 1x its schedule"),  # the plain retry: no cut
        ("lr_reduced", "rate 0.5x its schedule"),
        ("rolled_back", "restarted from the initial weights, AGC clipping from now on, rate 1x its schedule"),
    ]


def test_a_report_whose_reader_stops_early_exits_without_a_traceback(run_dir: Path) -> None:
    # `gradguard report logs | head`: the closed pipe ended in a BrokenPipeError traceback.
    command = [sys.executable, "-c", "import sys; from lightning_gradguard.cli import main; sys.exit(main())"]
    process = subprocess.Popen(
        [*command, "report", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent
    )
    assert process.stdout is not None
    process.stdout.close()  # before the report writes anything: its first write meets a closed pipe
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err
