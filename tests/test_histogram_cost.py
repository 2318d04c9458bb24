"""The histogram-cost benchmark runs end to end; histograms come on their schedule and their samples are released.

Timings on a shared machine say nothing, and no test asserts them.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.histogram_cost import main


def test_histogram_cost_runs_and_releases_the_samples(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = main(["--models", "small", "--steps", "8", "--json", str(out)])
    (row,) = result["models"]
    assert row["histogram_steps"] == 4  # histogram_every_n_steps=2 over 8 optimizer steps
    assert row["samples_held_bytes"] > 0 and row["samples_held_after_log_bytes"] == 0
    assert row["event_bytes_per_histogram_step"] > 0
    assert json.loads(out.read_text())["models"][0]["model"] == "small"
