"""Tests of ``gradguard report``: numbers against the raw scalars, root cause, PNG, JSON, comparison, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard.cli import WEAK_RELATIVE, event_masks, layer_events, layer_matrix, load_run, main
from lightning_gradguard.tensorboard import GradGuardBoard
from tests.helpers import LAYERS

STEPS = np.arange(0, 400, 10)  # 40 logging steps
SPIKE_STEP = 250  # the logging step whose window holds the explosion ...
EVENT_STEP = 247  # ... which the detector flagged at this exact step
SPIKE_LAYERS = (7, 5)  # both spike together: the root cause is the earlier one in definition order, 5
VANISH_FROM, VANISH_LAYER = 300, 2  # earlier in definition order, but later in time


def _f32(x) -> np.ndarray:
    # TensorBoard stores float32: expected values go through the same rounding.
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def write_run(logdir, seed: int = 0, trouble: bool = True) -> dict:
    """A synthetic 12-layer run written through GradGuardBoard, events included; returns the raw values written."""
    rng = np.random.default_rng(seed)
    base = 10 ** rng.uniform(-2, 0, size=len(LAYERS))
    norms = base[:, None] * np.exp(0.05 * rng.standard_normal((len(LAYERS), len(STEPS))))
    exploding_flags = np.zeros(norms.shape, dtype=bool)
    vanishing_flags = np.zeros(norms.shape, dtype=bool)
    spike, vanish = int(np.searchsorted(STEPS, SPIKE_STEP)), int(np.searchsorted(STEPS, VANISH_FROM))
    if trouble:
        for layer in SPIKE_LAYERS:
            norms[layer, spike] *= 1000.0
            exploding_flags[layer, spike] = True
        norms[VANISH_LAYER, vanish:] = 1e-12
        vanishing_flags[VANISH_LAYER, vanish] = True  # an onset: one event
    total = np.sqrt((norms**2).sum(axis=0))
    total_max = total * np.where(np.arange(len(STEPS)) % 2 == 1, 1.2, 1.0)
    exploding = np.cumsum(trouble & (STEPS == SPIKE_STEP))
    vanishing = np.cumsum(trouble & (STEPS == VANISH_FROM))
    lr_scale = np.where(trouble & (STEPS >= SPIKE_STEP) & (STEPS < 350), 0.5, 1.0)

    writer = SummaryWriter(str(logdir))
    board = GradGuardBoard(writer, {0: LAYERS}, ["AdamW"], image_every_n_steps=None)
    board.write_layout()
    for col, step in enumerate(STEPS.tolist()):
        board.write_scalars(
            step,
            {
                "total_norm": total[col],
                "total_norm_max": total_max[col],
                "clip_threshold": 5.0,
                "lr_scale": lr_scale[col],
                "events/exploding": exploding[col],
                "events/vanishing": vanishing[col],
                "events/nonfinite": 0.0,
                "events/lr_reduced": exploding[col],
            },
        )
        board.write_layer_norms(step, 0, norms[:, col], exploding_flags[:, col], vanishing_flags[:, col])
        # The rows the callback hands over: one per flagged layer and kind, stamped with the event's own step.
        rows = [
            {
                "step": EVENT_STEP if kind == "exploding" else step,
                "kind": kind,
                "layer": LAYERS[i],
                "value": float(norms[i, col]),
                "action": "clip",
            }
            for kind, flags in (("exploding", exploding_flags), ("vanishing", vanishing_flags))
            for i in np.flatnonzero(flags[:, col])
        ]
        board.write_events(step, rows)
    writer.add_scalar("train/loss", 1.0, 0)  # foreign tags are ignored
    # A per-epoch summary at an epoch's last batch, between two logs: not a logging step.
    writer.add_scalar("gradguard/epoch/total_norm_max", float(total_max.max()), int(STEPS[3]) + 3)
    writer.close()
    return {
        "norms": norms,
        "total": total,
        "total_max": total_max,
        "lr_scale": lr_scale,
        "exploding": exploding,
        "vanishing": vanishing,
        "exploding_flags": exploding_flags,
        "vanishing_flags": vanishing_flags,
    }


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    raw = {
        "version_0": write_run(root / "version_0", seed=0),
        "version_1": write_run(root / "version_1", seed=1, trouble=False),
    }
    return root, raw


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_numbers_match_raw_scalars(logdir, capsys):
    root, raw = logdir
    report = _json(capsys, ["report", str(root), "--json"])
    assert list(report["runs"]) == ["version_0", "version_1"] and report["skipped"] == {}
    summary, data = report["runs"]["version_0"], raw["version_0"]

    # The trouble tags are stamped with event steps (247), the epoch summary with an epoch's end: not logged steps.
    assert summary["steps"] == {"first": 0, "last": int(STEPS[-1]), "logged": len(STEPS)}
    assert summary["num_layers"] == len(LAYERS)
    opt = summary["optimizers"]["opt0"]
    total = _f32(data["total"])
    for q in (50, 90, 99):
        assert opt["total_norm"][f"p{q}"] == pytest.approx(np.percentile(total, q), rel=1e-9)
    assert opt["total_norm"]["max"] == pytest.approx(max(total.max(), _f32(data["total_max"]).max()), rel=1e-9)
    assert opt["events"] == {
        "exploding": int(data["exploding"][-1]),
        "vanishing": int(data["vanishing"][-1]),
        "nonfinite": 0,
        "lr_reduced": 1,
    }
    assert "lr_reductions" not in opt  # one figure, one place: events["lr_reduced"]
    assert opt["min_lr_scale"] == 0.5

    norms = _f32(data["norms"])
    peak = norms.max(axis=1)
    order = np.argsort(-peak, kind="stable")[:5]
    assert [t["layer"] for t in summary["top_max_norm"]] == [LAYERS[i] for i in order]
    assert [t["max_norm"] for t in summary["top_max_norm"]] == pytest.approx(peak[order].tolist(), rel=1e-9)
    assert summary["top_max_norm"][0]["step"] == SPIKE_STEP
    weak_steps = int((STEPS >= VANISH_FROM).sum())
    assert summary["top_weak"] == [{"layer": LAYERS[VANISH_LAYER], "steps": weak_steps}]


def test_root_cause_is_the_detectors_first_event_then_definition_order(logdir, capsys):
    root, raw = logdir
    summary = _json(capsys, ["report", str(root), "--json", "--run", "version_0"])["runs"]["version_0"]
    spike_col = int(np.searchsorted(STEPS, SPIKE_STEP))
    norms = _f32(raw["version_0"]["norms"])
    first = summary["first_event"]
    assert first == {
        "step": EVENT_STEP,
        "kind": "exploding",
        "layer": LAYERS[min(SPIKE_LAYERS)],
        "value": pytest.approx(norms[min(SPIKE_LAYERS), spike_col]),
        "layers": len(SPIKE_LAYERS),
    }
    assert summary["first_by_kind"]["exploding"]["step"] == EVENT_STEP
    assert summary["first_by_kind"]["vanishing"] == {
        "step": VANISH_FROM,
        "kind": "vanishing",
        "layer": LAYERS[VANISH_LAYER],
        "value": pytest.approx(1e-12),
        "layers": 1,
    }
    # The healthy run has no event at all.
    healthy = _json(capsys, ["report", str(root), "--json", "--run", "version_1"])["runs"]["version_1"]
    assert healthy["first_event"] is None and healthy["first_by_kind"] == {} and healthy["top_weak"] == []
    assert healthy["optimizers"]["opt0"]["events"]["exploding"] == 0


def test_report_marks_the_same_cells_as_the_tensorboard_heatmap(logdir):
    # One definition of an event: the flags the board marks on its heatmap are the cells the report marks.
    root, raw = logdir
    run = load_run("version_0", str(root / "version_0"))
    names, steps, _, _ = layer_matrix(run)
    masks = event_masks(layer_events(run), names, steps)
    np.testing.assert_array_equal(masks["exploding"], raw["version_0"]["exploding_flags"])
    np.testing.assert_array_equal(masks["vanishing"], raw["version_0"]["vanishing_flags"])
    assert not masks["nonfinite"].any()


def test_the_reports_own_rule_is_not_an_event(tmp_path, capsys):
    # "small" jumps 20x above its own median, "tiny" drops below 1e-6 x the largest layer: neither is an event unless
    # a detector said so. Only "big" has one (the detector's), at step 40, where its norm is ordinary.
    steps = list(range(0, 100, 10))
    writer = SummaryWriter(str(tmp_path / "run"))
    board = GradGuardBoard(writer, {0: ["big", "small", "tiny"]}, ["SGD"], image_every_n_steps=None)
    for step in steps:
        small = 1e-3 * (20.0 if step == 60 else 1.0)
        tiny = 100.0 * WEAK_RELATIVE * (0.5 if step >= 80 else 2.0)
        board.write_layer_norms(
            step, 0, np.array([100.0, small, tiny]), np.array([step == 40, False, False]), np.zeros(3, bool)
        )
        board.write_scalars(step, {"total_norm": 100.0, "events/exploding": float(step >= 40)})
        if step == 40:
            board.write_events(step, [{"step": 38, "kind": "exploding", "layer": "big", "value": 100.0}])
    writer.close()
    summary = _json(capsys, ["report", str(tmp_path), "--json"])["runs"]["run"]
    assert summary["first_event"] == {"step": 38, "kind": "exploding", "layer": "big", "value": 100.0, "layers": 1}
    assert list(summary["first_by_kind"]) == ["exploding"]
    assert summary["top_weak"] == [{"layer": "tiny", "steps": 2}]  # the report's measure, labelled as such
    assert main(["report", str(tmp_path)]) == 0
    assert "weak layers" in capsys.readouterr().out


def test_the_largest_norm_of_a_layer_includes_a_spike_between_two_logs(tmp_path, capsys):
    # The logged per-layer norm is each log's last one; "b" exploded to 500 at step 37, between the logs of 30 and 40,
    # which only its trouble tag holds. Before, "a" (at most 3.0, logged) topped the list and "b" showed 1.0.
    writer = SummaryWriter(str(tmp_path / "run"))
    board = GradGuardBoard(writer, {0: ["a", "b"]}, ["SGD"], image_every_n_steps=None)
    for step in range(0, 100, 10):
        board.write_layer_norms(
            step, 0, np.array([3.0 if step == 60 else 2.0, 1.0]), np.zeros(2, bool), np.zeros(2, bool)
        )
        board.write_scalars(step, {"total_norm": 3.0, "events/exploding": float(step >= 40)})
        if step == 40:
            board.write_events(step, [{"step": 37, "kind": "exploding", "layer": "b", "value": 500.0}])
    writer.close()
    top = _json(capsys, ["report", str(tmp_path), "--json"])["runs"]["run"]["top_max_norm"]
    assert top == [{"layer": "b", "max_norm": 500.0, "step": 37}, {"layer": "a", "max_norm": 3.0, "step": 60}]


@pytest.mark.parametrize(("last", "says"), [(0.068, "below one example"), (100.0, "you train at 32 (well below")])
def test_a_noise_scale_below_one_example_is_called_too_noisy_not_advice(tmp_path, capsys, last, says):
    # A noisy estimate (few micro-batches per step) can fall below 1; before, the report set it against the batch
    # size: "critical batch size about 0.068; you train at 32 (well above: extra examples per step likely bring
    # little)".
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, value in ((10, 6.1), (20, 0.5), (30, last)):
        writer.add_scalar("gradguard/total_norm", 1.0, step)
        writer.add_scalar("gradguard/noise_scale", value, step)
    writer.add_text("gradguard/config", "| setting | value |\n|---|---|\n| batch_size | 32 |", 0)
    writer.close()
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert says in text
    assert ("you train at" in text) == (last >= 1)


def test_runs_without_trouble_tags_fall_back_to_the_counts(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path / "old"))
    for step, count in ((10, 0.0), (20, 0.0), (30, 2.0)):
        writer.add_scalar("gradguard/total_norm", 1.0, step)
        writer.add_scalar("gradguard/events/vanishing", count, step)
        writer.add_scalar("gradguard/events/clipped", 5.0, step)  # routine: not a layer event
    writer.close()
    summary = _json(capsys, ["report", str(tmp_path), "--json"])["runs"]["old"]
    assert summary["first_event"] == {"step": 30, "kind": "vanishing", "layer": None, "value": None, "layers": None}


def test_text_report_and_comparison(logdir, capsys):
    root, raw = logdir
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "run version_0" in out and "run version_1" in out
    per_run = out[: out.index("run version_1")].splitlines()
    assert any(line.split() == ["first", "event", "layer", LAYERS[min(SPIKE_LAYERS)]] for line in per_run)
    assert any(line.split() == ["first", "event", "kind", "exploding", "(2", "layers)"] for line in per_run)
    assert any(line.split() == ["first", "event", "step", str(EVENT_STEP)] for line in per_run)
    # One definition each, no repeats: no second "first explode" rule, the lr_reduced count appears once.
    labels = [" ".join(line.split()[:3]) for line in per_run]
    assert not any(label.startswith(("first explode", "first vanish", "first trouble")) for label in labels)
    assert sum("lr reductions" in line for line in per_run) == 1
    assert not any("events lr_reduced" in line for line in per_run)
    assert "top 5 layers by max norm" in out and "top 5 weak layers" in out and "not the detector's" in out

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
    assert rows["lr reductions"] == ["1", "0"]
    assert rows["first event step"] == [str(EVENT_STEP), "-"]
    assert rows["first event layer"] == [LAYERS[min(SPIKE_LAYERS)], "-"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _red(img: np.ndarray) -> np.ndarray:
    return (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)


def test_png_is_one_tight_picture_with_the_detectors_marks(logdir, tmp_path, capsys):
    root, _ = logdir
    out = tmp_path / "flow.png"
    assert main(["report", str(root), "--run", "version_0", "--png", str(out)]) == 0
    assert f"gradient flow of run version_0 written to {out}" in capsys.readouterr().out
    # Without --run, of several runs the first is drawn: the line says so (it said nothing of the others before).
    assert main(["report", str(root), "--png", str(out)]) == 0
    said = f"gradient flow of run version_0 (the first of 2; pick another with --run) written to {out}"
    assert said in capsys.readouterr().out
    assert main(["report", str(root), "--png", str(out), "--json"]) == 0
    assert said in capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = _png(out)
    assert img.shape[0] > 300 and img.shape[1] >= 800 and img.std() > 10
    assert _red(img).sum() > 10  # the detector's exploding events, marked in red
    # No large empty band between the heatmap and the bar chart (constrained layout, tight bounding box).
    blank_rows = (img > 245).all(axis=(1, 2))
    longest, run = 0, 0
    for blank in blank_rows.tolist():
        run = run + 1 if blank else 0
        longest = max(longest, run)
    assert longest < 40
    # The bar chart's y label is inside the picture: ink within the first 20 columns of its lower half.
    lower = img[img.shape[0] // 2 :]
    assert (lower[:, :20] < 128).any()

    # The same norms without the detector's events carry no red mark, however large the spike.
    _write_without_events(tmp_path / "unflagged")
    quiet = tmp_path / "quiet.png"
    assert main(["report", str(tmp_path / "unflagged"), "--png", str(quiet)]) == 0
    capsys.readouterr()
    assert _red(_png(quiet)).sum() < _red(img).sum() // 4


def _write_without_events(logdir) -> None:
    # The norms of write_run(seed=0), the 1000x spike included, but no detector event.
    rng = np.random.default_rng(0)
    base = 10 ** rng.uniform(-2, 0, size=len(LAYERS))
    norms = base[:, None] * np.exp(0.05 * rng.standard_normal((len(LAYERS), len(STEPS))))
    norms[list(SPIKE_LAYERS), int(np.searchsorted(STEPS, SPIKE_STEP))] *= 1000.0
    writer = SummaryWriter(str(logdir))
    board = GradGuardBoard(writer, {0: LAYERS}, ["AdamW"], image_every_n_steps=None)
    for col, step in enumerate(STEPS.tolist()):
        board.write_scalars(step, {"total_norm": 1.0})
        board.write_layer_norms(step, 0, norms[:, col], np.zeros(len(LAYERS), bool), np.zeros(len(LAYERS), bool))
    writer.close()


def test_skipped_runs_are_named_with_the_reason(logdir, tmp_path, capsys):
    root, _ = logdir
    write_run(tmp_path / "guarded", seed=0, trouble=False)
    other = SummaryWriter(str(tmp_path / "plain"))
    other.add_scalar("train/loss", 0.5, 1)
    other.close()
    report = _json(capsys, ["report", str(tmp_path), "--json"])
    assert list(report["runs"]) == ["guarded"]
    assert list(report["skipped"]) == ["plain"] and "no gradguard/ scalars" in report["skipped"]["plain"]
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 run without GradGuard data:" in out and "  plain: no gradguard/ scalars" in out


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
        # Beside a run without GradGuard's data (a plain model's logs), which is no run to name.
        write_run(tmp_path / "version_0", seed=0)
        write_run(tmp_path / "version_1", seed=1, trouble=False)
        writer = SummaryWriter(str(tmp_path / "plain"))
        writer.add_scalar("train/loss", 0.5, 1)
        writer.close()
        argv, expect = ["report", str(tmp_path), "--run", "version_9"], "runs: version_0, version_1\n"
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


def _damage(run_dir, at: float) -> str:
    """Overwrite a stretch of bytes at fraction ``at`` of the run's event file; returns its path."""
    (path,) = [p for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + 40] = bytes((b + 1) % 256 for b in data[start : start + 40])
    path.write_bytes(bytes(data))
    return str(path)


def test_a_damaged_event_file_is_named_not_reported_as_a_short_run(tmp_path, capsys):
    # A record failing its checksum stops TensorBoard's reader, which says so at debug level only: before, the
    # report showed the records before it as if the run had logged no more (or "no gradguard/ scalars").
    write_run(tmp_path / "middle", seed=0)
    write_run(tmp_path / "early", seed=1)
    write_run(tmp_path / "intact", seed=2)
    middle = _damage(tmp_path / "middle", 0.5)
    early = _damage(tmp_path / "early", 0.0005)  # inside the first records, before any gradguard/ scalar
    report = _json(capsys, ["report", str(tmp_path), "--json"])
    assert report["runs"]["middle"]["damaged"] == [middle]
    assert report["runs"]["middle"]["steps"]["logged"] < len(STEPS)
    assert report["runs"]["intact"]["damaged"] == [] and report["runs"]["intact"]["steps"]["logged"] == len(STEPS)
    assert report["skipped"] == {"early": f"damaged event file, nothing read before the damage: {early}"}
    assert main(["report", str(tmp_path / "middle")]) == 0
    assert f"warning: damaged event file (a record failed its checksum), read up to the damage: {middle}" in (
        capsys.readouterr().out
    )


def test_reading_leaves_tensorboards_own_log_records_to_the_users_logging(tmp_path, caplog):
    import logging

    from lightning_gradguard.cli import _DamageWatch

    damaged = str(tmp_path / "a (copy)" / "events.out.tfevents.1")
    with caplog.at_level(logging.INFO), _DamageWatch() as watch:
        logger = logging.getLogger("tensorboard")
        logger.warning("Found more than one graph event per run")
        logger.debug("Truncated record in %s (%s)", damaged, "b'x' failed event crc32 check")
        logger.debug("Truncated record in %s (%s)", str(tmp_path / "live"), "b'y' has truncated record in data")
    messages = [r.getMessage() for r in caplog.records if r.name == "tensorboard"]
    assert messages == ["Found more than one graph event per run"]  # the warning passes, the debug records do not
    assert watch.files == [damaged]  # a path with " (" in it is kept whole; the live file's cut-off end is no damage
    assert logging.getLogger("tensorboard").level == logging.NOTSET
