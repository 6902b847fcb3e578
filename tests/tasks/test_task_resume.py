"""A fine-tuning run stopped mid-epoch and resumed with ``--ckpt_path last`` reproduces the
uninterrupted run bit for bit: the same rows per step, the same losses (float.hex), the same final
weights, optimizer state and schedule, and the label set comes back from the checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from rel_helpers import assert_same_training, config, run_in_process, steps, write

from lmforge.reliability import PREEMPTED_EXIT_CODE

DATA = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "tasks" / "sequence_classification"


def _config(tmp_path: Path, run: Path) -> Path:
    """The reliability tests' tiny encoder run, with a classification head on the shipped task data."""
    data = {"train": DATA / "train.jsonl", "val": DATA / "val.jsonl"}
    cfg = config(data, None, run, family="encoder", max_steps=8)
    init = cfg["model"]["init_args"]
    del init["objective"]
    init["task"] = {"class_path": "sequence_classification"}
    init["architecture"]["init_args"]["block_size"] = 64
    cfg["data"] = {**{k: cfg["data"][k] for k in ("train_files", "val_files", "tokenizer")},
                   "max_length": 48, "batch_size": 8}
    return write(tmp_path / f"{run.name}.yaml", cfg)


def test_task_fit_stopped_and_resumed_is_bit_exact(tmp_path):
    expected = tmp_path / "uninterrupted"
    assert run_in_process(["fit", "--config", str(_config(tmp_path, expected))]) == 0

    run = tmp_path / "resumed"
    cfg = _config(tmp_path, run)
    assert run_in_process(["fit", "--config", str(cfg)], {"LMFORGE_PREEMPT_AT_STEP": "3"}) == PREEMPTED_EXIT_CODE
    assert max(steps(run)) == 3
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0

    assert_same_training(expected, run)
    labels = json.loads((run / "labels.json").read_text())
    assert labels == json.loads((expected / "labels.json").read_text()) and len(labels) >= 2
