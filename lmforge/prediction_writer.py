"""What ``lmforge predict`` writes: one JSON object per input record, as JSON Lines.

The rows a task's ``predict_step`` returns for each batch are collected in order, passed once
through the task's ``finalize_predictions`` (which may merge several rows of one record, e.g. the
windows of a long question-answering context) and written to a temporary file that is renamed into
place, so a reader never sees half a file. With several processes each writes its own share to
``<stem>.rank-<r>.jsonl`` (the evaluation sampler gives every record to exactly one process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lmforge.errors import LmforgeError


def to_json(value: Any) -> Any:
    """``value`` with tensors turned into Python numbers and lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


class PredictionWriter(BasePredictionWriter):
    """Writes the model's task predictions to ``path`` (JSON Lines).

    Args:
        path: The output file. Its directory is created if needed.
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse an output that cannot be written before predicting, not after the whole run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
        else:
            writable = os.access(self.path.parent, os.W_OK | os.X_OK)
            reason = "it is a directory" if self.path.is_dir() else None if writable else "its directory is read-only"
        if reason is not None:
            raise LmforgeError(
                f"The predictions cannot be written to {self.path} ({reason}). Give `lmforge predict` a writable "
                "--output FILE.jsonl (default <trainer.default_root_dir>/predictions.jsonl)."
            )

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        if isinstance(prediction, dict):  # a scoring task returns one dict per batch
            prediction = [prediction]
        self._rows.extend(to_json(row) for row in prediction)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        task = getattr(pl_module, "task", None)
        rows = task.finalize_predictions(self._rows) if task is not None else self._rows
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank-{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        self._rows = []
