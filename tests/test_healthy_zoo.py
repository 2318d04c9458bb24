"""Smoke test of the healthy-zoo benchmark: the --quick zoo runs in-process and reports every config and run.

Only the structure is checked, plus one outcome that holds at any size and with any tuning of the guard's
statistics: the guarded run of ``nan_batch`` skips exactly the one step whose batch holds a NaN. The PASS/FAIL
verdicts are the benchmark's output, not asserted here (a few quick steps say nothing about them).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.healthy_zoo import CONFIGS, main
from lightning_gradguard._events import RELAPSE_WARNING
from lightning_gradguard.callback import EVENT_KINDS

ROW_FIELDS = {
    "config",
    "variant",
    "guard",
    "steps",
    "global_step",
    "metric",
    "init_heldout",
    "heldout",
    "train_loss_first10pct",
    "train_loss_last10pct",
    "losses_recorded",
    "nonfinite_losses",
    "first_nonfinite_batch",
    "events",
    "min_lr_scale",
    "rescued",
    "max_loss_relapse",
    "guard_warnings",
    "guard_warning_samples",
    "other_warnings",
    "wall_s",
}
MARKS = ("nan", "inf", "-inf")


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name}: non-finite numbers must be written as strings")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("zoo") / "zoo.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        result = main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text(), parse_constant=_reject_constant)
    return stdout.getvalue(), result, saved


def test_every_config_has_an_unguarded_and_a_guarded_run(quick: tuple[str, dict, dict]) -> None:
    _, result, saved = quick
    assert [c["config"] for c in saved["configs"]] == list(CONFIGS)
    for cfg in saved["configs"]:
        variants = [r["variant"] for r in saved["rows"] if r["config"] == cfg["config"]]
        assert variants == cfg["variants"], cfg["config"]
        assert variants[:2] == ["unguarded", "guarded"] and cfg["reference"] == "unguarded", cfg["config"]
    nan_cfg = next(c for c in saved["configs"] if c["config"] == "nan_batch")
    assert nan_cfg["variants"] == ["unguarded", "guarded", "unguarded_nan"] and nan_cfg["expect_skipped"] == 1
    assert [v["config"] for v in saved["verdicts"]] == list(CONFIGS)
    assert all(v["verdict"] in ("PASS", "FAIL") for v in saved["verdicts"])
    assert len(saved["rows"]) == len(result["rows"])


def test_rows_hold_the_documented_fields_and_finite_losses(quick: tuple[str, dict, dict]) -> None:
    _, _, saved = quick
    for row in saved["rows"]:
        where = f"{row['config']}/{row['variant']}"
        assert set(row) >= ROW_FIELDS, where
        assert row["global_step"] == row["steps"] * (2 if row["config"] == "gan" else 1), where
        assert _finite(row["init_heldout"]) and _finite(row["wall_s"]), where
        if row["variant"] == "unguarded_nan":
            # Without a guard the NaN batch poisons the weights: every later loss and the held-out metric are NaN.
            assert row["heldout"] in MARKS and row["nonfinite_losses"] >= 1, where
            continue
        assert _finite(row["heldout"]) and _finite(row["train_loss_last10pct"]), where
        expected_nonfinite = 1 if (row["config"], row["variant"]) == ("nan_batch", "guarded") else 0
        assert row["nonfinite_losses"] == expected_nonfinite, where
        if row["variant"] == "unguarded":
            assert row["guard"] is None and row["events"] is None and row["min_lr_scale"] is None, where
            assert row["rescued"] is None and row["max_loss_relapse"] is None, where
        else:
            assert row["guard"] == "GradGuard()", where
            assert set(row["events"]) == set(EVENT_KINDS), where
            assert all(isinstance(v, int) and v >= 0 for v in row["events"].values()), where
            assert 0 < row["min_lr_scale"] <= 1, where
            assert row["rescued"] is False, where  # no healthy run puts the rescue clipper to work
            # A healthy run gives nothing back (None: too short to have learned by this measure).
            assert row["max_loss_relapse"] is None or row["max_loss_relapse"] < RELAPSE_WARNING, where
    # Both runs of a config start from the same weights.
    by_config: dict[str, set[float]] = {}
    for row in saved["rows"]:
        by_config.setdefault(row["config"], set()).add(row["init_heldout"])
    assert all(len(inits) == 1 for inits in by_config.values()), by_config


def test_the_guard_skips_exactly_the_nan_batch(quick: tuple[str, dict, dict]) -> None:
    _, _, saved = quick
    guarded = next(r for r in saved["rows"] if r["config"] == "nan_batch" and r["variant"] == "guarded")
    assert guarded["events"]["skipped"] == 1
    assert guarded["events"]["nonfinite"] == 1
    assert guarded["first_nonfinite_batch"] is not None


def test_the_table_prints_every_run_and_a_verdict_per_config(quick: tuple[str, dict, dict]) -> None:
    text, _, saved = quick
    assert "command: `python benchmarks/healthy_zoo.py --quick --json" in text
    assert f"torch {saved['meta']['machine']['torch']}" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| config |"))
    columns = ("held-out", "rel. diff", "exploding", "diverging", "lr_reduced", "min LR x", "skipped", "clipped")
    for column in (*columns, "vanishing"):
        assert f"| {column} |" in header, column
    for row in saved["rows"]:
        assert any(line.startswith(f"| {row['config']} | {row['variant']} |") for line in lines), row["variant"]
    for name in CONFIGS:
        assert any(line.startswith(("- **PASS**", "- **FAIL**")) and f"`{name}`" in line for line in lines), name
    assert "UserWarning" not in text and "GradGuard: " not in text  # guard warnings are counted, not shown


def test_json_to_stdout_config_selection_and_steps(tmp_path: Path) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(["--configs", "lora,gan", "--steps", "2", "--json", "-", "--logdir", str(tmp_path)])
    result = json.loads(stdout.getvalue(), parse_constant=_reject_constant)
    assert [c["config"] for c in result["configs"]] == ["lora", "gan"]
    assert [(r["config"], r["global_step"]) for r in result["rows"]] == [
        ("lora", 2),
        ("lora", 2),
        ("gan", 4),
        ("gan", 4),
    ]
    assert any(tmp_path.glob("lora/guarded/events.out.tfevents.*"))


def test_clippers_add_one_run_and_one_verdict_per_clipper() -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        result = main(["--quick", "--clippers", "--configs", "nan_batch,masked"])
    clippers = {
        "clip_autoclip": "GradGuard(clip=AutoClip())",
        "clip_agc": "GradGuard(clip=AGC())",
        "clip_adagc": "GradGuard(clip=AdaGC())",
        "clip_normclip": "GradGuard(clip=NormClip(max_norm=1.0))",
        "clip_none": "GradGuard(clip=None)",
    }
    for cfg in result["configs"]:
        assert cfg["variants"][-len(clippers) :] == list(clippers), cfg["config"]
    rows = {(r["config"], r["variant"]): r for r in result["rows"]}
    for variant, label in clippers.items():
        for config in ("nan_batch", "masked"):
            assert rows[config, variant]["guard"] == label
        # Skipping the NaN step is the guard's, whatever the clipper.
        assert rows["nan_batch", variant]["events"]["skipped"] == 1, variant
    # The clipped counts differ from the default's: each run really used its own clipper (AutoClip's 10th
    # percentile clips most steps, the default ZClip none in its warm-up).
    assert rows["masked", "clip_autoclip"]["events"]["clipped"] > rows["masked", "guarded"]["events"]["clipped"]
    assert rows["masked", "clip_none"]["events"]["clipped"] == 0
    assert [(v["config"], v["guard"]) for v in result["clipper_verdicts"]] == [
        (c, label) for c in ("nan_batch", "masked") for label in clippers.values()
    ]
    assert [v["variant"] for v in result["verdicts"]] == ["guarded", "guarded"]  # the zoo's verdict stays the default's
    text = stdout.getvalue()
    for label in clippers.values():
        assert any(line.startswith(f"- `{label}`: ") and "/2 PASS" in line for line in text.splitlines()), label


@pytest.mark.parametrize("scale", [1e-3, 0.0])
def test_noise_nudges_one_step_of_the_reference_per_run(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    # The GAN steps its two optimizers by hand: the nudge must reach manual optimization too. With a nudge of 0 the
    # extra runs repeat the reference bit for bit, so whatever they move comes from the nudged gradients alone.
    monkeypatch.setattr("benchmarks.healthy_zoo.NOISE_SCALE", scale)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        result = main(["--quick", "--configs", "masked,gan", "--noise", "2"])
    for cfg in result["configs"]:
        noise = cfg["noise"]
        max_steps = CONFIGS[cfg["config"]]("quick", 0, None).max_steps
        assert noise["runs"] == 2 and noise["scale"] == scale
        assert noise["factors"] == [1.0 + scale, 1.0 - scale]
        assert noise["steps"] == sorted(noise["steps"]) and all(1 <= at <= max_steps for at in noise["steps"])
        rels = noise["rel_diff_pct"]
        assert all(_finite(r) for r in rels), rels
        assert (noise["low_pct"], noise["high_pct"]) == (min(rels), max(rels))
        if scale:
            assert any(r != 0.0 for r in rels), cfg["config"]
        else:
            assert rels == [0.0, 0.0], cfg["config"]
    for v in result["verdicts"]:
        assert isinstance(v["inside_noise"], bool)
        floor = next(c["noise"] for c in result["configs"] if c["config"] == v["config"])
        assert v["inside_noise"] == (v["rel_diff_pct"] <= floor["high_pct"])
    text = stdout.getvalue()
    assert sum("; noise floor " in line for line in text.splitlines() if line.startswith("- **")) == 2


def test_without_noise_no_floor_is_reported(quick: tuple[str, dict, dict]) -> None:
    text, result, _ = quick
    assert all(c["noise"] is None for c in result["configs"])
    assert all(v["inside_noise"] is None for v in result["verdicts"])
    assert "noise floor" not in text


@pytest.mark.parametrize("argv", [["--configs", "nope"], ["--steps", "0"], ["--noise", "-1"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
