"""The regularizer-cost benchmark runs end to end, and its batched Orthogonal terms equal the per-matrix ones.

Timings on a shared machine say nothing, and no test asserts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.regularizer_cost import main


def test_regularizer_cost_runs_and_matches_the_per_matrix_terms(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    result = main(["--models", "small", "--quick", "--json", str(out)])
    rows = {row["regularizer"]: row for row in result["rows"]}
    assert set(rows) == {"L1", "L2", "Orthogonal"}
    orthogonal = rows["Orthogonal"]
    assert orthogonal["max_abs_diff"] == pytest.approx(0.0, abs=1e-6)
    # 200 small matrices in one batched product: far fewer computing ops than one matrix at a time.
    assert orthogonal["compute_ops"] < 10 < orthogonal["per_matrix_compute_ops"]
    assert json.loads(out.read_text())["rows"][0]["model"] == "small"


def test_regularizer_cost_refuses_unknown_names() -> None:
    with pytest.raises(SystemExit):
        main(["--models", "resnet"])
    with pytest.raises(SystemExit):
        main(["--regularizers", "L3"])
