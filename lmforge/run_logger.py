"""The metrics CSV of a run directory, appended to (never truncated) when a run resumes.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a new logger opens the directory;
lmforge keeps every row an earlier attempt of the run logged, so a resumed run's history is whole.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, metrics_file: str) -> None:
        self.NAME_METRICS_FILE = metrics_file
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class RunLogger(CSVLogger):
    """A CSVLogger writing ``metrics.csv`` and ``hparams.yaml`` straight into the run directory.

    An evaluation (``command`` ``validate``/``test``) writes ``metrics.<command>.csv`` and no
    ``hparams.yaml``: it never changes the training log, whose columns a fit still writing to the
    same directory would otherwise see rewritten. Its rows name the checkpoint they evaluated and
    carry that checkpoint's step and epoch (outside ``fit`` the trainer counts from 0).
    """

    def __init__(self, run_dir: str, command: str = "fit") -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self.command = command
        self._checkpoint: dict[str, Any] | None = None

    def record_checkpoint(self, path: str | None) -> None:
        """Name ``path`` (and its step and epoch, from its manifest) in every row an evaluation logs."""
        from lmforge.reliability.checkpoint_io import read_manifest

        if self.command == "fit" or not path:
            return
        manifest = read_manifest(Path(path).parent) or {}
        self._checkpoint = {"checkpoint": str(path), "step": manifest.get("step"), "epoch": manifest.get("epoch")}

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._checkpoint is not None:
            metrics = {**metrics, "checkpoint": self._checkpoint["checkpoint"]}
            if self._checkpoint["epoch"] is not None:
                metrics["epoch"] = self._checkpoint["epoch"]
            if self._checkpoint["step"] is not None:
                step = self._checkpoint["step"]
        super().log_metrics(metrics, step)

    @property
    def metrics_file(self) -> str:
        return "metrics.csv" if self.command == "fit" else f"metrics.{self.command}.csv"

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, metrics_file=self.metrics_file)
        return self._experiment

    def log_hyperparams(self, params=None) -> None:
        if self.command == "fit":
            super().log_hyperparams(params)
