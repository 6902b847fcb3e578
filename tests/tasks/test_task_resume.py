"""A fine-tuning run stopped mid-epoch and resumed with ``--ckpt_path last`` reproduces the
uninterrupted run bit for bit: the same rows per step, the same losses (float.hex), the same final
weights, optimizer state and schedule, and the label set comes back from the checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from rel_helpers import assert_same_training, run_in_process, steps  # noqa: E402

from lmforge.reliability import PREEMPTED_EXIT_CODE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "lmforge" / "data" / "tasks" / "sequence_classification"


def _config(tmp_path: Path, run: Path) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "default_root_dir": str(run),
            "max_steps": 8,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "callbacks": [{"class_path": "lmforge.reliability.StepLog"}],
        },
        "model": {
            "class_path": "encoder",
            "init_args": {
                "architecture": {
                    "class_path": "bert",
                    "init_args": {"n_layer": 1, "n_head": 2, "d_model": 32, "block_size": 64, "dropout": 0.1},
                },
                "task": {"class_path": "sequence_classification"},
                "lr": 1e-3,
                "warmup_steps": 2,
            },
        },
        "data": {
            "train_files": str(DATA / "train.jsonl"),
            "val_files": str(DATA / "val.jsonl"),
            "tokenizer": str(REPO / "lmforge" / "data" / "corpus" / "wordpiece.json"),
            "max_length": 48,
            "batch_size": 8,
        },
    }
    path = tmp_path / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


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
