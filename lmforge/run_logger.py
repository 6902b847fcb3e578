"""The metrics CSV of a run directory, appended to (never truncated) when a run resumes.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a new logger opens the directory;
lmforge keeps every row an earlier attempt of the run logged, so a resumed run's history is whole.
"""

from __future__ import annotations

import csv

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
    same directory would otherwise see rewritten.
    """

    def __init__(self, run_dir: str, command: str = "fit") -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self.command = command

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
