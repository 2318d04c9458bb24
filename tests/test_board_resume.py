"""A resumed run's pictures go on from the checkpoint: heatmap histories and the events table are restored."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import GradGuard
from tests.models import Regressor, regression_data, trainer


def _guard() -> GradGuard:
    return GradGuard(image_every_n_steps=4, diagnostics=["update_ratio"])


def _fit(tmp_path: Path, version: int, max_steps: int, guard: GradGuard, ckpt_path: str | None = None) -> None:
    callbacks = [guard, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(
            max_steps=max_steps,
            max_epochs=-1,
            callbacks=callbacks,
            logger=TensorBoardLogger(tmp_path, name="", version=version),
            log_every_n_steps=2,
            enable_checkpointing=True,
        ).fit(Regressor(lr=0.05), regression_data(), ckpt_path=ckpt_path)


def test_a_resumed_run_keeps_its_heatmap_histories(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = _guard()
    _fit(tmp_path, 0, 8, first)
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)  # plain values and tensors only
    assert GradGuard().state_key in str(list(saved["gradguard_board"]))
    before_norms = first._board._histories[0].columns()[0]
    before_ratios = first._board._ratio_histories[0].columns()[0]
    assert len(before_norms) >= 3 and len(before_ratios) >= 3

    torch.manual_seed(1)
    resumed = _guard()
    _fit(tmp_path, 1, 16, resumed, ckpt_path=str(ckpt))
    norms = resumed._board._histories[0].columns()[0]
    ratios = resumed._board._ratio_histories[0].columns()[0]
    # The columns logged before the checkpoint come first, then the resumed run's own.
    assert list(norms[: len(before_norms)]) == list(before_norms) and len(norms) > len(before_norms)
    assert list(ratios[: len(before_ratios)]) == list(before_ratios) and len(ratios) > len(before_ratios)
    # In step order (Lightning 2.4 numbers a resumed run's first log one lower, so a step may repeat once there).
    assert np.all(np.diff(norms) >= 0)

    # Without the checkpoint's board state (a checkpoint from an older version) the pictures start afresh.
    torch.manual_seed(1)
    fresh = _guard()
    del saved["gradguard_board"]
    torch.save(saved, tmp_path / "older.ckpt")
    _fit(tmp_path, 2, 16, fresh, ckpt_path=str(tmp_path / "older.ckpt"))
    assert fresh._board._histories[0].columns()[0][0] >= before_norms[-1]
    assert len(fresh._board._histories[0].columns()[0]) < len(norms)
