"""What ``lmforge predict`` writes: one JSON object per input record, as JSON Lines.

A row's ``id`` is the record's own ``id`` when the predict files have that column (as SQuAD-style
files do), else the record's number in the files, counted from 0.

The rows a task's ``predict_step`` returns for each batch are collected in order, passed once
through the task's ``finalize_predictions`` (which may merge several rows of one record, e.g. the
windows of a long question-answering context) and written to a temporary file that is renamed into
place, so a reader never sees half a file. With several processes (the evaluation sampler gives
every record to exactly one of them, interleaved) the rows are gathered on rank 0, put back in input
order by their dataset index, and written there as one file, the same file one process writes.
"""

from __future__ import annotations

import json
import os
import sys
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
        #: (dataset index of the row's record, row) for every row returned so far in this epoch
        self._rows: list[tuple[int, dict[str, Any]]] = []

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
        rows = [to_json(row) for row in prediction]
        indices = list(batch_indices or [])
        if len(indices) != len(rows):  # not one row per record: the rows keep the place of their batch
            indices = [indices[0] if indices else len(self._rows)] * len(rows)
        self._rows.extend(zip(indices, rows))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        indexed, self._rows = self._rows, []
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, indexed)
            if not trainer.is_global_zero:
                return
            indexed = [pair for share in shares for pair in share]
        # A stable sort by dataset index: the input order (rows of one batch keep their order).
        rows = [row for _, row in sorted(indexed, key=lambda pair: pair[0])]
        task = getattr(pl_module, "task", None)
        rows = task.finalize_predictions(rows) if task is not None else rows
        record_ids = getattr(trainer.datamodule, "record_ids", {}).get("predict") if trainer.datamodule else None
        if record_ids:  # the records' own ids (an `id` column) instead of their row numbers
            for row in rows:
                if isinstance(row.get("id"), int) and 0 <= row["id"] < len(record_ids) and record_ids[row["id"]] is not None:
                    row["id"] = record_ids[row["id"]]
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        print(f"lmforge: wrote {len(rows)} prediction{'' if len(rows) == 1 else 's'} to {path}", file=sys.stderr)
