"""Smoke test of the sparse-rescue benchmark: the --quick run reports every seed and rate, and at 100x the tuned
rate the default guard's rescue clipper comes to work on the model with sparse gradients (before AGC clipped them,
such a model was left out of the rescue)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from benchmarks.sparse_rescue import main


def test_quick_run_reports_every_seed_and_rate(tmp_path: Path) -> None:
    out = tmp_path / "sparse.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        result = main(["--quick", "--seeds", "0-1", "--rates", "3", "--sweep", "0.03,0.3", "--json", str(out)])
    rows = result["rows"]
    assert [(r["seed"], r["run"]) for r in rows] == [
        (seed, run) for seed in (0, 1) for run in ("unguarded lr 0.03", "unguarded lr 0.3", "GradGuard() lr 3")
    ]
    for r in rows:
        assert (r["rescued"] is None) == (not r["guarded"])
    # At 100x the tuned rate the default guard restarts, and its rescue clipper comes to work on every seed.
    assert all(r["rolled_back"] >= 1 and r["rescued"] for r in rows if r["guarded"])
    assert json.loads(out.read_text())["rows"][0]["run"] == "unguarded lr 0.03"
    text = stdout.getvalue()
    assert text.count("| GradGuard() lr 3 |") == 2
    assert sum(line.startswith("- seed ") for line in text.splitlines()) == 2


@pytest.mark.parametrize("argv", [["--rates", "0"], ["--sweep", "x"], ["--seeds", ""]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
