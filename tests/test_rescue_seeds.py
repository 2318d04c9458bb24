"""The rescue-over-seeds benchmark: its counts on known inputs, and a --quick run end to end.

The figures of a --quick run mean nothing (a few steps per config); the test checks that the summary agrees with the
rows it was computed from.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks import rescue_seeds
from benchmarks._common import parse_seeds
from benchmarks.rescue_seeds import summarize


def _row(seed: int, variant: str, loss: float, diverged: bool = False) -> dict[str, Any]:
    rate = float(variant.removeprefix("unguarded_lr")) if variant.startswith("unguarded_lr") else None
    return {
        "config": "c",
        "variant": variant,
        "seed": seed,
        "sweep_lr": rate,
        "heldout_loss": loss,
        "heldout_acc": None,
        "metric": "mse",
        "diverged": diverged,
    }


def _result(table: dict[int, dict[str, float]]) -> dict[str, Any]:
    variants = ["unguarded", "guarded", "unguarded_lr0.3", "unguarded_lr0.1"]
    cfg = {
        "config": "c",
        "variants": variants,
        "guards": {"unguarded": None, "guarded": "GradGuard()", "unguarded_lr0.3": None, "unguarded_lr0.1": None},
        "metric": "mse",
        "chance": 0.5,
        "n_test": 100,
    }
    rows = [
        _row(seed, v, losses[v], diverged=v == "unguarded" and not math.isfinite(losses[v]))
        for seed, losses in table.items()
        for v in variants
    ]
    return {"configs": [cfg], "seeds": list(table), "rows": rows}


def test_counts_against_the_best_of_each_seed_and_the_one_tuned_rate() -> None:
    nan = math.nan
    result = _result(
        {
            # lr 0.3 has the lowest median (0.2) although lr 0.1 wins seed 2.
            0: {"unguarded": nan, "guarded": 0.15, "unguarded_lr0.3": 0.2, "unguarded_lr0.1": 0.4},
            1: {"unguarded": nan, "guarded": 0.25, "unguarded_lr0.3": 0.2, "unguarded_lr0.1": 0.3},
            2: {"unguarded": 0.9, "guarded": 0.12, "unguarded_lr0.3": nan, "unguarded_lr0.1": 0.1},
        }
    )
    s, reference = summarize(result)
    assert s["variant"] == "guarded" and not s["reference"]
    assert s["tuned_rate"] == 0.3
    assert s["diverged_unguarded"] == 2
    assert s["le_best_of_sweep"] == 1  # seed 0 only: seed 1 loses to 0.2, seed 2 to 0.1
    assert s["le_tuned_rate"] == 2  # seed 0, and seed 2 where the tuned rate diverged (NaN: worse than anything)
    assert s["median"] == 0.15
    assert s["median_best_of_sweep"] == 0.2
    assert s["median_tuned_rate"] == 0.2
    assert s["learned"] == 3 and s["learned_tuned_rate"] == 2  # below 0.9 x 0.5; NaN never learned
    assert s["per_seed"][2] == (0.12, 0.1, math.inf)
    assert s["solved"] == 0 and s["solved_tuned_rate"] == 0  # MSE below 0.01: none here
    # The sweep's other rate, counted against the same bars as the guarded run.
    assert reference["variant"] == "unguarded_lr0.1" and reference["reference"]
    assert reference["guard"] == "unguarded lr 0.1"
    assert reference["le_best_of_sweep"] == 1  # seed 2, where it is the best
    assert reference["le_tuned_rate"] == 1  # seed 2 again: seeds 0 and 1 lose to lr 0.3
    assert reference["median"] == 0.3
    assert reference["per_seed"][0] == (0.4, 0.2, 0.2)


def test_the_report_shows_the_other_rates_without_their_seeds() -> None:
    result = _result({0: {"unguarded": math.nan, "guarded": 0.15, "unguarded_lr0.3": 0.2, "unguarded_lr0.1": 0.4}})
    result["summary"] = summarize(result)
    result["meta"] = {
        "command": "c",
        "machine": {"cpus": 2, "python": "3", "torch": "t", "lightning": "l", "device": "cpu"},
        "size": "default",
        "logdir": "d",
        "wall_s": 1.0,
    }
    lines = rescue_seeds.report(result).splitlines()
    rows = [re.split(r"\s{2,}", line) for line in lines if line.startswith("c ")]
    assert [row[1] for row in rows] == ["GradGuard()", "unguarded lr 0.1"]
    # run, diverged, <= best of sweep, tuned rate, <= tuned rate: lr 0.1 lost to the tuned rate 0.3 on the one seed
    assert rows[0][2:6] == ["1/1", "1/1", "0.3", "1/1"]
    assert rows[1][2:6] == ["1/1", "0/1", "0.3", "0/1"]
    per_seed = lines[lines.index("per seed: guarded / best of sweep / tuned rate") + 1 :]
    assert [line for line in per_seed if line.startswith("  c ")] == ["  c guarded: 0: 0.15 / 0.2 / 0.2"]


def test_a_diverged_guarded_run_is_never_counted_even_where_the_sweep_diverged_too() -> None:
    nan = math.nan
    result = _result({0: {"unguarded": nan, "guarded": nan, "unguarded_lr0.3": nan, "unguarded_lr0.1": nan}})
    for row in result["rows"]:
        row["diverged"] = True
    for s in summarize(result):
        assert s["le_best_of_sweep"] == 0 and s["le_tuned_rate"] == 0


def test_solved_counts_mse_below_the_adding_problems_bar_and_not_classification() -> None:
    assert rescue_seeds._solved({"metric": "mse"}, [0.005, 0.0099, 0.01, math.inf]) == 2
    assert rescue_seeds._solved({"metric": "acc"}, [0.005]) is None


@pytest.mark.parametrize(("text", "seeds"), [("0-3", [0, 1, 2, 3]), ("4,1", [4, 1]), ("0-2,1,7", [0, 1, 2, 7])])
def test_seed_lists(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("argv", [["--seeds", "3-1"], ["--seeds", "a"], ["--configs", "resnet20"], ["--variants", "x"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        rescue_seeds._parse(argv)
    assert "error:" in capsys.readouterr().err


def test_quick_run_summarizes_its_own_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    logdir = tmp_path / "logs"
    argv = ["--quick", "--configs", "lstm_10x", "--seeds", "0-1", "--json", str(out), "--logdir", str(logdir)]
    rescue_seeds.main(argv)
    text = capsys.readouterr().out
    assert "GradGuard rescue over seeds" in text and "lstm_10x  GradGuard()" in text
    # The report says where the TensorBoard runs went: a folder per seed under --logdir.
    assert f"TensorBoard logs: {logdir} (a folder per seed)" in text
    assert sorted(p.name for p in logdir.iterdir()) == ["seed0", "seed1"]
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1]
    assert {r["seed"] for r in result["rows"]} == {0, 1}
    s, *references = result["summary"]
    assert not s["reference"]
    # The sweep's two rates other than the tuned one, each counted on at most the two seeds.
    assert sorted(r["variant"] for r in references) == sorted(
        f"unguarded_lr{rate:g}" for rate in (0.3, 0.1, 0.03) if rate != s["tuned_rate"]
    )
    assert all(r["reference"] and 0 <= r["le_best_of_sweep"] <= r["le_tuned_rate"] <= 2 for r in references)
    # JSON spells a non-finite number as a string; the summary ranks NaN as inf.
    guarded = [float(r["heldout_loss"]) for r in result["rows"] if r["variant"] == "guarded"]
    expected = statistics.median(x if math.isfinite(x) else math.inf for x in guarded)
    assert float(s["median"]) == pytest.approx(expected)
    assert 0 <= s["le_best_of_sweep"] <= s["le_tuned_rate"] <= 2  # the best of a seed is never above one rate
