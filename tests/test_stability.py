"""Smoke test of the stability benchmark: the --quick suite runs in-process and reports every config and run.

Only the structure is checked, plus one outcome that is certain at any size (a 50-layer sigmoid MLP trained past
the vanishing detector's patience is reported as vanishing). Timings on a shared machine say nothing, and whether
a few quick steps diverge says little: neither is asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.stability import CONFIGS, GUARDS, DeepMLPModule, main
from lightning_gradguard import AGC, AdaGC, AutoClip, NormClip, ZClip
from lightning_gradguard.callback import EVENT_KINDS

#: The runs with each other clipper in place of the default, and their labels.
CLIPPERS = {
    "clip_autoclip": "GradGuard(clip=AutoClip())",
    "clip_agc": "GradGuard(clip=AGC())",
    "clip_adagc": "GradGuard(clip=AdaGC())",
    "clip_normclip": "GradGuard(clip=NormClip(max_norm=1.0))",
}

ROW_FIELDS = {
    "config",
    "variant",
    "guard",
    "steps_planned",
    "steps",
    "stopped_early",
    "metric",
    "heldout_loss",
    "heldout_acc",
    "threshold",
    "diverged",
    "first_nan_step",
    "nonfinite_losses",
    "train_loss_last10",
    "events",
    "first_vanishing",
    "guard_warnings",
    "other_warnings",
    "wall_s",
    "log_dir",
}
MARKS = ("nan", "inf", "-inf")


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name}: non-finite numbers must be written as strings")


def _finite_or_marked(value: Any) -> bool:
    if isinstance(value, str):
        return value in MARKS
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("stability")
    out = tmp / "result.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        # The default guard only (and the unguarded reference and sweep): every other guarded variant costs a run per
        # config; the variants' order and labels are checked on one config below.
        result = main(["--quick", "--variants", "guarded", "--json", str(out), "--logdir", str(tmp / "logs")])
    saved = json.loads(out.read_text(), parse_constant=_reject_constant)
    return stdout.getvalue(), result, saved, tmp / "logs"


def test_every_config_has_an_unguarded_and_a_guarded_row(quick: tuple[str, dict, dict, Path]) -> None:
    _, result, saved, _ = quick
    assert [c["config"] for c in saved["configs"]] == list(CONFIGS)
    for cfg in saved["configs"]:
        variants = [r["variant"] for r in saved["rows"] if r["config"] == cfg["config"]]
        assert variants == cfg["variants"], cfg["config"]
        assert variants[:2] == ["unguarded", "guarded"]
        sweep = variants[2:]
        assert all(v.startswith("unguarded_lr") for v in sweep), cfg["config"]
        # The configs that diverge unguarded get the tuned-rate sweep: lower rates, unguarded.
        diverging = cfg["config"] in ("lstm_10x", "rnn_tanh", "resnet20_nobn")
        assert len(sweep) == ((6 if cfg["config"] == "resnet20_nobn" else 3) if diverging else 0), cfg["config"]
        for v in sweep:
            assert cfg["guards"][v] is None
        assert cfg["guards"]["unguarded"] is None and cfg["guards"]["guarded"] == "GradGuard()"
        # Without --variants, every config runs every guarded variant, and no clipper run.
        every = CONFIGS[cfg["config"]]("quick", 0).variants(sweep=False)
        guards = ["guarded", "guarded_norestart", "guarded_ratio5", "guarded_rollback"]
        assert every[:5] == ["unguarded", *guards] and set(every) <= {"unguarded", *guards, "guarded_example"}
    assert len(saved["rows"]) == len(result["rows"])


def test_rows_hold_the_documented_fields(quick: tuple[str, dict, dict, Path]) -> None:
    _, _, saved, _ = quick
    for row in saved["rows"]:
        where = f"{row['config']}/{row['variant']}"
        assert set(row) >= ROW_FIELDS, where
        assert 1 <= row["steps"] <= row["steps_planned"], where
        for key in ("heldout_loss", "threshold", "train_loss_last10", "wall_s"):
            assert _finite_or_marked(row[key]), (where, key, row[key])
        if row["metric"] == "acc":
            assert _finite_or_marked(row["heldout_acc"]), where
        else:
            assert row["metric"] == "mse" and row["heldout_acc"] is None, where
        loss = float(row["heldout_loss"])  # "nan" and "inf" parse back
        assert row["diverged"] == (not math.isfinite(loss) or loss > row["threshold"]), where
        if row["first_nan_step"] is None:
            assert row["nonfinite_losses"] == 0, where
        else:
            assert 1 <= row["first_nan_step"] <= row["steps"] and row["nonfinite_losses"] >= 1, where
        if row["variant"].startswith("unguarded"):
            assert row["guard"] is None and row["events"] is None and row["first_vanishing"] is None, where
            assert (row["sweep_lr"] is None) == (row["variant"] == "unguarded"), where
        else:
            assert set(row["events"]) == set(EVENT_KINDS), where
            assert all(isinstance(v, int) and v >= 0 for v in row["events"].values()), where
            assert isinstance(row["guard_warnings"], int) and row["guard_warnings"] >= 0, where


def test_the_table_names_machine_command_and_every_run(quick: tuple[str, dict, dict, Path]) -> None:
    text, _, saved, logs = quick
    assert "command: python benchmarks/stability.py --quick --variants guarded --json" in text
    assert "machine:" in text and f"torch {saved['meta']['machine']['torch']}" in text
    for column in ("held-out", "diverged?", "NaN at", "clipped", "expl", "nonfin/skip", "lr_red", "van", "warns"):
        assert column in text, column
    lines = text.splitlines()
    for row in saved["rows"]:
        assert any(line.split()[:2] == [row["config"], row["variant"]] for line in lines), row["config"]
    for name in CONFIGS:
        assert any(line.startswith(f"{name}: unguarded") for line in lines), name  # the per-config verdict
    # Guard warnings are counted, not shown.
    assert "UserWarning" not in text and "GradGuard: " not in text
    # Every run wrote its TensorBoard events where --logdir said.
    for row in saved["rows"]:
        assert Path(row["log_dir"]).parent.parent == logs
        assert any(Path(row["log_dir"]).glob("events.out.tfevents.*")), row["log_dir"]


def test_clippers_add_one_run_per_clipper(tmp_path: Path) -> None:
    assert CONFIGS["lstm_10x"]("quick", 0).variants(sweep=False, clippers=True)[5:] == [*CLIPPERS, "guarded_example"]
    # Naming clipper runs in --variants runs them without --clippers.
    stdout = io.StringIO()
    argv = ["--quick", "--configs", "lstm_10x", "--no-sweep", "--variants", ",".join(CLIPPERS), "--json", "-"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main([*argv, "--logdir", str(tmp_path)])
    result = json.loads(stdout.getvalue())
    (cfg,) = result["configs"]
    assert [r["variant"] for r in result["rows"]] == cfg["variants"] == ["unguarded", *CLIPPERS]
    assert [cfg["guards"][v] for v in CLIPPERS] == list(CLIPPERS.values())
    rows = {r["variant"]: r for r in result["rows"]}
    assert all(rows[v]["guard"] == label and rows[v]["events"] is not None for v, label in CLIPPERS.items())


def test_the_skip_run_is_opt_in_and_comes_after_the_default(tmp_path: Path) -> None:
    assert "guarded_skip" not in CONFIGS["lstm_10x"]("quick", 0).variants(sweep=True, clippers=True)
    stdout = io.StringIO()
    argv = ["--quick", "--configs", "lstm_10x", "--no-sweep", "--variants", "guarded_skip,guarded", "--json", "-"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main([*argv, "--logdir", str(tmp_path)])
    result = json.loads(stdout.getvalue())
    (cfg,) = result["configs"]
    assert [r["variant"] for r in result["rows"]] == cfg["variants"] == ["unguarded", "guarded", "guarded_skip"]
    assert cfg["guards"]["guarded_skip"] == "GradGuard(skip_exploding=True)"
    assert GUARDS["guarded_skip"][1]().skip_exploding and not GUARDS["guarded"][1]().skip_exploding


def test_each_clipper_run_swaps_the_clipper_only() -> None:
    default = GUARDS["guarded"][1]()
    assert isinstance(default.clip, ZClip)
    for variant, kind in (
        ("clip_autoclip", AutoClip),
        ("clip_agc", AGC),
        ("clip_adagc", AdaGC),
        ("clip_normclip", NormClip),
    ):
        guard = GUARDS[variant][1]()
        assert type(guard.clip) is kind, variant
        # Everything else is the default's: the same LR guard, detectors and early restart.
        assert repr(guard.lr_guard) == repr(default.lr_guard) and guard.rollback is not None, variant
        assert repr(guard.exploding) == repr(default.exploding), variant
    assert GUARDS["clip_normclip"][1]().clip.max_norm == 1.0


def test_the_deep_sigmoid_mlp_is_reported_as_vanishing(quick: tuple[str, dict, dict, Path]) -> None:
    _, _, saved, _ = quick
    guarded = next(r for r in saved["rows"] if r["config"] == "mlp_sigmoid50" and r["variant"] == "guarded")
    assert guarded["steps"] > 25  # past the detector's default patience
    assert guarded["events"]["vanishing"] >= 1
    layers = [
        f"net.{name}"
        for name, m in DeepMLPModule(depth=50).net.named_children()
        if next(m.parameters(), None) is not None
    ]
    first = guarded["first_vanishing"]
    # The 25th optimizer step at the earliest (patience), which Lightning numbers 24.
    assert first is not None and first["layer"] in layers and 25 - 1 <= first["step"] <= guarded["steps"]
    # The gradient fades towards the input: what vanishes first is nearer the input than the output.
    assert layers.index(first["layer"]) < len(layers) // 2


def test_json_to_stdout_config_selection_and_every_guarded_variant(tmp_path: Path) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(["--quick", "--configs", "lstm_10x", "--no-sweep", "--json", "-", "--logdir", str(tmp_path)])
    result = json.loads(stdout.getvalue(), parse_constant=_reject_constant)
    (cfg,) = result["configs"]
    assert cfg["config"] == "lstm_10x" and {r["config"] for r in result["rows"]} == {"lstm_10x"}
    guards = ["guarded", "guarded_norestart", "guarded_ratio5", "guarded_rollback", "guarded_example"]
    assert [r["variant"] for r in result["rows"]] == cfg["variants"] == ["unguarded", *guards]
    assert cfg["guards"] == {
        "unguarded": None,
        "guarded": "GradGuard()",
        "guarded_norestart": "GradGuard(rollback=None)",
        "guarded_ratio5": "GradGuard(exploding=ExplodingDetector(max_ratio=5))",
        "guarded_rollback": "GradGuard(rollback=True)",
        "guarded_example": cfg["guards"]["guarded_example"],
    }
    assert cfg["guards"]["guarded_example"].endswith("build_guard()")
    for row in result["rows"][1:]:
        assert set(row["events"]) == set(EVENT_KINDS) and row["guard"] == cfg["guards"][row["variant"]], row


def test_variant_selection_keeps_the_unguarded_reference_and_the_sweep(tmp_path: Path) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(["--quick", "--configs", "rnn_tanh", "--variants", "guarded", "--json", "-", "--logdir", str(tmp_path)])
    result = json.loads(stdout.getvalue(), parse_constant=_reject_constant)
    variants = [r["variant"] for r in result["rows"]]
    assert variants[:2] == ["unguarded", "guarded"]
    assert variants[2:] and all(v.startswith("unguarded_lr") for v in variants[2:])  # the tuned-rate sweep


def test_sweep_idle_holds_the_sweep_runs_still_for_their_first_steps(tmp_path: Path) -> None:
    def sweep(*extra: str) -> tuple[list[float], str]:
        out = io.StringIO()
        argv = ["--quick", "--configs", "rnn_tanh", "--variants", "guarded", "--logdir", str(tmp_path), *extra]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            result = main(argv)
        losses = [r["heldout_loss"] for r in result["rows"] if r["sweep_lr"] is not None]
        return losses, out.getvalue()

    moving, _ = sweep()
    assert len(set(moving)) == len(moving) > 1  # each rate trains to its own weights
    # Idle for longer than the run: no rate moves the weights (no weight decay here), so every sweep run ends at the
    # initial weights' held-out loss.
    still, table = sweep("--sweep-idle", "1000")
    assert len(set(still)) == 1 and still[0] not in moving
    assert "idle for their first 1000 steps" in table and "idle for its first 1000 steps" in table


@pytest.mark.parametrize(
    "argv",
    [
        ["--sweep-idle", "-1"],
        ["--configs", "nope"],
        ["--quick", "--full"],
        ["--threads", "-1"],
        ["--variants", "unguarded"],
        ["--variants", ""],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(argv)


def test_a_guarded_run_is_rescued_only_when_it_matches_the_tuned_rate() -> None:
    from benchmarks.stability import _verdict

    def row(variant: str, loss: float, rate: float | None = None, guard: str | None = None) -> dict:
        return {
            "variant": variant,
            "guard": guard,
            "sweep_lr": rate,
            "metric": "mse",
            "heldout_loss": loss,
            "heldout_acc": None,
            "diverged": not math.isfinite(loss),
            "first_nan_step": 3 if loss != loss else None,
            "events": None,
            "first_vanishing": None,
        }

    cfg = {
        "config": "c",
        "variants": ["unguarded", "guarded", "unguarded_lr0.3", "unguarded_lr0.1"],
        "chance": 0.167,
        "n_test": 100,
    }
    runs = {
        "unguarded": row("unguarded", math.nan),
        "unguarded_lr0.3": row("unguarded_lr0.3", 0.05, 0.3),
        "unguarded_lr0.1": row("unguarded_lr0.1", 0.12, 0.1),
    }
    worse = _verdict(cfg, {**runs, "guarded": row("guarded", 0.08, guard="GradGuard()")})
    assert "tuned rate (best of the unguarded sweep): lr 0.3, MSE 0.05" in worse
    assert "worse than the tuned rate" in worse and "RESCUED" not in worse
    rescued = _verdict(cfg, {**runs, "guarded": row("guarded", 0.05, guard="GradGuard()")})
    assert "RESCUED" in rescued
