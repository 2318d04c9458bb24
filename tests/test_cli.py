"""Tests of ``gradguard report``: numbers against the raw scalars, root cause, PNG, JSON, comparison, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard.cli import EXPLODE_FACTOR, VANISH_RELATIVE, main
from lightning_gradguard.tensorboard import GradGuardBoard

LAYERS = [
    "embed", "enc.0.attn", "enc.0.mlp", "enc.1.attn", "enc.1.mlp", "enc.2.attn",
    "enc.2.mlp", "enc.3.attn", "enc.3.mlp", "norm", "head.0", "head.1",
]
STEPS = np.arange(0, 400, 10)  # 40 logging steps
SPIKE_STEP = 250
SPIKE_LAYERS = (7, 5)  # both spike together: the root cause is the earlier one in definition order, 5
VANISH_FROM, VANISH_LAYER = 300, 2  # earlier in definition order, but later in time


def _f32(x) -> np.ndarray:
    # TensorBoard stores float32: expected values go through the same rounding.
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def write_run(logdir, seed: int = 0, trouble: bool = True) -> dict:
    """A synthetic 12-layer run written through GradGuardBoard; returns the raw values written."""
    rng = np.random.default_rng(seed)
    base = 10 ** rng.uniform(-2, 0, size=len(LAYERS))
    norms = base[:, None] * np.exp(0.05 * rng.standard_normal((len(LAYERS), len(STEPS))))
    if trouble:
        spike = int(np.searchsorted(STEPS, SPIKE_STEP))
        for layer in SPIKE_LAYERS:
            norms[layer, spike] *= 1000.0
        norms[VANISH_LAYER, np.searchsorted(STEPS, VANISH_FROM) :] = 1e-12
    total = np.sqrt((norms**2).sum(axis=0))
    total_max = total * np.where(np.arange(len(STEPS)) % 2 == 1, 1.2, 1.0)
    exploding = np.cumsum(trouble & (STEPS == SPIKE_STEP))
    vanishing = np.cumsum(trouble & (STEPS >= VANISH_FROM))
    lr_scale = np.where(trouble & (STEPS >= SPIKE_STEP) & (STEPS < 350), 0.5, 1.0)

    writer = SummaryWriter(str(logdir))
    board = GradGuardBoard(writer, {0: LAYERS}, ["AdamW"], image_every_n_steps=None)
    board.write_layout()
    for col, step in enumerate(STEPS.tolist()):
        board.write_scalars(step, {
            "total_norm": total[col], "total_norm_max": total_max[col], "clip_threshold": 5.0,
            "lr_scale": lr_scale[col], "events/exploding": exploding[col], "events/vanishing": vanishing[col],
            "events/nonfinite": 0.0, "events/lr_reduced": exploding[col],
        })
        board.write_layer_norms(step, 0, norms[:, col], np.zeros(len(LAYERS), bool), np.zeros(len(LAYERS), bool))
    writer.add_scalar("train/loss", 1.0, 0)  # foreign tags are ignored
    writer.close()
    return {"norms": norms, "total": total, "total_max": total_max, "lr_scale": lr_scale,
            "exploding": exploding, "vanishing": vanishing}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    raw = {"version_0": write_run(root / "version_0", seed=0), "version_1": write_run(root / "version_1", seed=1,
                                                                                      trouble=False)}
    return root, raw


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_numbers_match_raw_scalars(logdir, capsys):
    root, raw = logdir
    report = _json(capsys, ["report", str(root), "--json"])
    assert list(report["runs"]) == ["version_0", "version_1"]
    summary, data = report["runs"]["version_0"], raw["version_0"]

    assert summary["steps"] == {"first": 0, "last": int(STEPS[-1]), "logged": len(STEPS)}
    assert summary["num_layers"] == len(LAYERS)
    opt = summary["optimizers"]["opt0"]
    total = _f32(data["total"])
    for q in (50, 90, 99):
        assert opt["total_norm"][f"p{q}"] == pytest.approx(np.percentile(total, q), rel=1e-9)
    assert opt["total_norm"]["max"] == pytest.approx(max(total.max(), _f32(data["total_max"]).max()), rel=1e-9)
    assert opt["events"] == {"exploding": int(data["exploding"][-1]), "vanishing": int(data["vanishing"][-1]),
                             "nonfinite": 0, "lr_reduced": 1}
    assert opt["lr_reductions"] == 1 and opt["min_lr_scale"] == 0.5
    assert summary["first_event"] == {"step": SPIKE_STEP, "kind": "exploding", "optimizer": "opt0"}

    norms = _f32(data["norms"])
    peak = norms.max(axis=1)
    order = np.argsort(-peak, kind="stable")[:5]
    assert [t["layer"] for t in summary["top_max_norm"]] == [LAYERS[i] for i in order]
    assert [t["max_norm"] for t in summary["top_max_norm"]] == pytest.approx(peak[order].tolist(), rel=1e-9)
    assert summary["top_max_norm"][0]["step"] == SPIKE_STEP
    vanish_steps = int((STEPS >= VANISH_FROM).sum())
    assert summary["top_vanishing"] == [{"layer": LAYERS[VANISH_LAYER], "steps": vanish_steps}]


def test_root_cause_is_first_step_then_definition_order(logdir, capsys):
    root, raw = logdir
    summary = _json(capsys, ["report", str(root), "--json", "--run", "version_0"])["runs"]["version_0"]
    trouble = summary["first_trouble"]
    assert trouble["step"] == SPIKE_STEP
    assert trouble["layer"] == LAYERS[min(SPIKE_LAYERS)]
    assert trouble["kind"] == "explode" and trouble["layers_in_trouble"] == len(SPIKE_LAYERS)
    spike_col = int(np.searchsorted(STEPS, SPIKE_STEP))
    assert trouble["value"] == pytest.approx(_f32(raw["version_0"]["norms"])[min(SPIKE_LAYERS), spike_col])
    assert summary["first_explode"]["layer"] == LAYERS[min(SPIKE_LAYERS)]
    assert summary["first_vanish"]["step"] == VANISH_FROM
    assert summary["first_vanish"]["layer"] == LAYERS[VANISH_LAYER]
    # The healthy run has no trouble at all under the same rules.
    healthy = _json(capsys, ["report", str(root), "--json", "--run", "version_1"])["runs"]["version_1"]
    assert healthy["first_trouble"] is None and healthy["top_vanishing"] == []
    assert healthy["optimizers"]["opt0"]["events"]["exploding"] == 0


def test_trouble_rules_own_median_and_relative_floor(tmp_path, capsys):
    # "big" is large all along: not exploding. "small" jumps above 10x its own median while staying far below "big":
    # exploding. "tiny" drops below 1e-6 x the largest layer while staying above the 1e-10 absolute floor: vanishing.
    steps = list(range(0, 100, 10))
    writer = SummaryWriter(str(tmp_path))
    board = GradGuardBoard(writer, {0: ["big", "small", "tiny"]}, ["SGD"], image_every_n_steps=None)
    for step in steps:
        small = 1e-3 * (EXPLODE_FACTOR * 2 if step == 60 else 1.0)
        tiny = 100.0 * VANISH_RELATIVE * (0.5 if step >= 80 else 2.0)
        board.write_layer_norms(step, 0, np.array([100.0, small, tiny]), np.zeros(3, bool), np.zeros(3, bool))
        board.write_scalars(step, {"total_norm": 100.0})
    writer.close()
    summary = _json(capsys, ["report", str(tmp_path), "--json"])["runs"][tmp_path.name]
    assert summary["first_trouble"]["step"] == 60 and summary["first_trouble"]["layer"] == "small"
    assert summary["first_explode"]["layer"] == "small"
    assert summary["first_vanish"]["step"] == 80 and summary["first_vanish"]["layer"] == "tiny"
    assert summary["top_vanishing"] == [{"layer": "tiny", "steps": 2}]


def test_text_report_and_comparison(logdir, capsys):
    root, raw = logdir
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run version_0" in out and "run version_1" in out
    per_run = out[: out.index("run version_1")].splitlines()
    assert any(line.split() == ["first", "trouble", "layer", LAYERS[min(SPIKE_LAYERS)]] for line in per_run)
    assert any(line.split() == ["first", "trouble", "kind", "explode", "(2", "layers", "in", "trouble)"]
               for line in per_run)
    assert "top 5 layers by max norm" in out and "top 5 layers by logged steps vanishing" in out

    table = out[out.index("comparison") :].splitlines()[1:]
    assert table[0].split() == ["metric", "version_0", "version_1"]
    # Aligned columns: every cell of a column starts where its header starts.
    starts = [table[0].index("version_0"), table[0].index("version_1")]
    rows = {}
    for line in table[2:]:
        label = line[: starts[0]].strip()
        rows[label] = [line[starts[0] : starts[1]].strip(), line[starts[1] :].strip()]
        assert line[starts[0] - 2 : starts[0]] == "  " and line[starts[1] - 2 : starts[1]] == "  "
    p50 = [f"{np.percentile(_f32(raw[r]['total']), 50):.4g}" for r in ("version_0", "version_1")]
    assert rows["total norm p50"] == p50
    assert rows["logged steps"] == [str(len(STEPS))] * 2
    assert rows["events exploding"] == ["1", "0"]
    assert rows["first trouble step"] == [str(SPIKE_STEP), "-"]
    assert rows["first vanish layer"] == [LAYERS[VANISH_LAYER], "-"]


def test_png_is_a_valid_image(logdir, tmp_path, capsys):
    root, _ = logdir
    out = tmp_path / "flow.png"
    assert main(["report", str(root), "--run", "version_0", "--png", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] >= 800 and img.std() > 10
    # Exploding cells are marked in red.
    assert ((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).sum() > 10


def test_single_run_directory_and_nested_runs(tmp_path, capsys):
    write_run(tmp_path / "exp" / "a" / "version_0", seed=3, trouble=False)
    write_run(tmp_path / "exp" / "b", seed=4, trouble=False)
    report = _json(capsys, ["report", str(tmp_path / "exp"), "--json"])
    assert list(report["runs"]) == ["a/version_0", "b"]
    alone = _json(capsys, ["report", str(tmp_path / "exp" / "b"), "--json"])
    assert list(alone["runs"]) == ["b"]


@pytest.mark.parametrize("case", ["missing", "empty", "foreign", "unknown-run", "bad-png"])
def test_errors_exit_2_with_message(tmp_path, logdir, capsys, case):
    root, _ = logdir
    if case == "missing":
        argv, expect = ["report", str(tmp_path / "nope")], "does not exist"
    elif case == "empty":
        argv, expect = ["report", str(tmp_path)], "no TensorBoard event files"
    elif case == "foreign":
        writer = SummaryWriter(str(tmp_path / "other"))
        writer.add_scalar("train/loss", 0.5, 1)
        writer.close()
        argv, expect = ["report", str(tmp_path)], "no gradguard/ scalars"
    elif case == "unknown-run":
        argv, expect = ["report", str(root), "--run", "version_9"], "version_0, version_1"
    else:
        argv, expect = ["report", str(root), "--png", str(tmp_path / "no" / "dir" / "x.png")], "cannot write"
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expect in captured.err and captured.err.startswith("gradguard report: error:")
    assert captured.out == ""


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert "report" in capsys.readouterr().err
    assert main(["report"]) == 2  # LOGDIR missing: argparse's own message
    assert "LOGDIR" in capsys.readouterr().err
