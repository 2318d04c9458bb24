"""Smoke test of the overhead benchmark: it runs end to end in --quick mode and reports every section.

Only the structure is checked: timings on a shared machine say nothing, and no test asserts them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--quick", "--models", "mlp800", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_every_section_is_printed(quick_run: tuple[str, dict]) -> None:
    text, _ = quick_run
    for heading in ("Training steps", "Per-step work on fixed gradients", "Logging step", "Memory:", "Goals"):
        assert heading in text, f"missing section {heading!r}"
    assert "plain Lightning" in text and "GradGuard(clip=None, lr_guard=None)" in text


def test_json_holds_every_variant_and_case(quick_run: tuple[str, dict]) -> None:
    _, result = quick_run
    meta = result["meta"]
    assert meta["quick"] and meta["models"] == ["mlp800"]
    variants = {r["variant"] for r in result["steps"]}
    expected = {
        "plain",
        "gg_defaults",
        "gg_monitor",
        "gg_normclip",
        "gg_autoclip",
        "gg_agc",
        "gg_adagc",
        "lightning_grad_norm",
        "gradient_clip_val",
    }
    assert expected <= variants
    # zclip is optional: either measured or reported as skipped, never silently missing.
    assert ("zclip_callback" in variants) != any(s.startswith("zclip_callback") for s in meta["skipped"])
    for row in result["steps"]:
        assert row["model"] == "mlp800" and row["reps"] >= 1 and row["steps_timed"] >= 1
        assert row["step_ms"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    plain = next(r for r in result["steps"] if r["variant"] == "plain")
    assert plain["ratio"] == 1.0  # each repetition's plain step against itself

    cases = {r["case"]: r for r in result["micro"]}
    assert {"torch._foreach_norm", "clip_grad_norm_(1.0)", "gg_defaults", "gg_monitor", "lightning grad_norm()"} <= set(
        cases
    )
    assert cases["torch._foreach_norm"]["x_foreach_norm"] == 1.0
    assert cases["clip_grad_norm_(1.0)"]["x_clip_grad_norm"] == 1.0
    assert all(r["ms"] > 0 for r in cases.values())
    # Each guarded call is a whole quiet step (over a hundred small ops eagerly): a benchmark whose calls the guard
    # took for repeats of one step, and skipped, would time almost nothing.
    assert cases["gg_defaults"]["ops"] > 100 and cases["gg_monitor"]["ops"] > 50


def test_logging_memory_and_goals(quick_run: tuple[str, dict]) -> None:
    _, result = quick_run
    log = result["logging"]
    # One layer per parameter tensor: the quick model has 8 x (Linear + LayerNorm) = 32 tensors.
    assert log["layers"] == 32 and log["scalars"] > log["layers"]
    assert log["add_scalar_ms"] > 0 and log["flush_hook_ms"] > 0 and log["share_of_training"] >= 0
    (mem,) = result["memory"]
    few, many = mem["steps"]
    assert few < many
    assert mem[f"state_bytes_{few}"] > 0 and mem[f"held_bytes_{many}"] > 0
    goals = result["goals"]
    assert goals and all(g["met"] in (True, False, None) for g in goals)
    assert any("monitor-only" in g["goal"] for g in goals)
