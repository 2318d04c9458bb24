"""Smoke test of the late-collapse benchmark: a short ``mlp`` run and a small ``--simulate`` run, in-process.

Only the structure is checked, that the numbers that must exist are finite, and that the captured
``gradguard/loss_relapse`` agrees with the warning. Whether a run this short warns (it leaves the warning's 50-step
hold little room) is the guard's tuning, not asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import pytest

from benchmarks.late_collapse import main
from lightning_gradguard.callback import EVENT_KINDS

STEPS = 240
ROW_FIELDS = {
    "scenario",
    "seed",
    "run",
    "guard",
    "rate",
    "lr",
    "steps",
    "global_step",
    "heldout_loss",
    "heldout_acc",
    "relapse_logs",
    "peak_relapse",
    "peak_relapse_step",
    "last_relapse",
    "relapse_series",
    "relapse_warnings",
    "relapse_warning_step",
    "relapse_warning_share",
    "replayed_share",
    "replayed_low_over_start",
    "events",
    "guard_warnings",
    "other_warnings",
    "wall_s",
}


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name}: non-finite numbers must be written as strings")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _main(argv: list[str]) -> tuple[str, dict[str, Any]]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        result = main(argv)
    return stdout.getvalue(), result


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("late") / "late.json"
    # --quick: mlp, seed 0, 240 steps, a log every 10: the tuned run learns enough to be measured, so the logger's
    # capture is used.
    argv = ["--quick", "--json", str(out)]
    text, result = _main(argv)
    return text, result, json.loads(out.read_text(), parse_constant=_reject_constant)


@pytest.fixture(scope="module")
def simulated() -> tuple[str, dict[str, Any]]:
    return _main(["--simulate", "--runs", "4", "--steps", "120", "--samples", "1,8", "--log-every", "10"])


def test_three_runs_per_seed_in_order(short: tuple[str, dict, dict]) -> None:
    _, result, saved = short
    assert saved["meta"]["mode"] == "train" and saved["meta"]["seeds"] == [0]
    assert saved["meta"]["steps_override"] == STEPS and saved["meta"]["log_every"] == 10
    assert [s["scenario"] for s in saved["scenarios"]] == ["mlp"]
    assert saved["scenarios"][0]["steps"] == STEPS and "step 80" in saved["scenarios"][0]["schedule"]
    runs = [(r["run"], r["rate"], r["lr"]) for r in saved["rows"]]
    assert runs == [("unguarded", "high", 0.1), ("guarded", "high", 0.1), ("guarded", "tuned", 0.01)]
    assert len(saved["rows"]) == len(result["rows"])


def test_rows_hold_finite_results(short: tuple[str, dict, dict]) -> None:
    _, _, saved = short
    for row in saved["rows"]:
        where = f"{row['run']}/{row['lr']}"
        assert set(row) >= ROW_FIELDS, where
        assert row["scenario"] == "mlp" and row["seed"] == 0, where
        assert row["steps"] == row["global_step"] == STEPS, where
        assert _finite(row["heldout_loss"]) and row["heldout_loss"] > 0, where
        assert _finite(row["heldout_acc"]) and 0 <= row["heldout_acc"] <= 1, where
        assert _finite(row["wall_s"]), where
        # Past 50 losses the replayed detector's mean has settled, so it has a lowest and a start.
        assert _finite(row["replayed_low_over_start"]) and row["replayed_low_over_start"] > 0, where
        if row["run"] == "unguarded":
            assert row["guard"] is None and row["events"] is None, where
            assert row["relapse_logs"] == 0 and row["peak_relapse"] is None and row["relapse_warnings"] == 0, where
            continue
        assert row["guard"] == "GradGuard()", where
        assert set(row["events"]) == set(EVENT_KINDS), where
        assert all(isinstance(v, int) and v >= 0 for v in row["events"].values()), where
        series = {step: share for step, share in row["relapse_series"]}
        assert len(series) == row["relapse_logs"] and all(_finite(v) for v in series.values()), where
        if row["relapse_logs"]:
            assert row["peak_relapse"] == max(series.values()) and row["peak_relapse_step"] in series, where
            assert row["last_relapse"] == row["relapse_series"][-1][1], where
            assert all(0 <= step < STEPS for step in series), where
        else:
            assert row["peak_relapse"] is None and row["peak_relapse_step"] is None, where
        if row["relapse_warnings"]:
            # The warning comes at a log, over the bar, with the share that log captured (in whole percent).
            step = row["relapse_warning_step"]
            assert step in series and series[step] >= 0.4, where
            assert abs(series[step] - row["relapse_warning_share"]) <= 0.006, where
        else:
            assert row["relapse_warning_step"] is None and row["relapse_warning_share"] is None, where


def test_the_tuned_run_is_measured(short: tuple[str, dict, dict]) -> None:
    # A run that learned logs the share: the in-memory logger receives the guard's scalars.
    _, _, saved = short
    tuned = next(r for r in saved["rows"] if r["rate"] == "tuned")
    assert tuned["relapse_logs"] > 0 and 0 <= tuned["peak_relapse"] < 0.4


def test_summary_and_table(short: tuple[str, dict, dict]) -> None:
    text, _, saved = short
    [summary] = saved["summary"]
    assert summary["scenario"] == "mlp" and summary["seeds"] == 1
    for rate in ("high", "tuned"):
        assert 0 <= summary[rate]["warned"] <= 1
        assert all(_finite(p) for p in summary[rate]["peaks"])
    assert set(summary["median_heldout"]) == {"unguarded high", "guarded high", "guarded tuned"}
    assert all(_finite(v) for v in summary["median_heldout"].values())
    assert "command: `python benchmarks/late_collapse.py --quick" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| scenario |"))
    for column in ("held-out", "acc", "peak relapse (step)", "low/start", "warned at (share)", "events"):
        assert f"| {column} |" in header, column
    for prefix in ("| mlp | 0 | unguarded | 0.1 |", "| mlp | 0 | guarded | 0.1 |", "| mlp | 0 | guarded | 0.01 |"):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert any(line.startswith("- `mlp`: GradGuard() at lr 0.1 warned on ") for line in lines)
    assert lines[-1].startswith("total wall time")


def test_simulation_counts(simulated: tuple[str, dict]) -> None:
    text, result = simulated
    assert result["meta"]["mode"] == "simulate" and result["meta"]["seeds"] == [0]
    sim = result["simulation"]
    assert [s["n"] for s in sim] == [1, 8]
    for s in sim:
        assert (s["runs"], s["steps"], s["check_every"]) == (4, 120, 10)
        assert 0 <= s["held"] <= s["at_one_check"] <= s["measured"] <= s["runs"]
        if s["measured"]:
            assert _finite(s["median_peak"]) and _finite(s["max_peak"]) and s["max_peak"] >= s["median_peak"]
        else:
            assert s["median_peak"] is None and s["max_peak"] is None
    lines = text.splitlines()
    assert any(line.startswith("| n | runs | measured |") for line in lines)
    assert any(line.startswith("| 1 | 4 |") for line in lines) and any(line.startswith("| 8 | 4 |") for line in lines)
    # The noise comes from a private generator: the same seed gives the same counts, whatever ran before.
    _, again = _main(["--simulate", "--runs", "4", "--steps", "120", "--samples", "1,8", "--log-every", "10"])
    assert again["simulation"] == sim


def test_json_to_stdout() -> None:
    text, _ = _main(["--simulate", "--runs", "2", "--steps", "60", "--samples", "2", "--seed", "3", "--json", "-"])
    result = json.loads(text, parse_constant=_reject_constant)
    assert result["meta"]["seeds"] == [3] and [s["n"] for s in result["simulation"]] == [2]


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenarios", "nope"],
        ["--steps", "0"],
        ["--seed", "1", "--seeds", "0-2"],
        ["--samples", "0"],
        ["--high-lr", "0"],
        ["--log-every", "0"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
