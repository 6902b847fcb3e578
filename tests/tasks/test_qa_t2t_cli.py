"""The shipped extractive_qa and text_to_text configs through the CLI: a short fit, then `lmforge predict`."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO

from lmforge.cli import main, run_trainer_cli

SHORT = [
    "--model.architecture.n_layer", "1", "--model.architecture.n_head", "2", "--model.architecture.d_model", "32",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "1",
    "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--data.batch_size", "4",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    """The configs name the shipped data relative to the repository root."""
    monkeypatch.chdir(REPO)


def _fit_and_predict(config: str, tmp_path, n_predict: int, *extra: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Fit a few steps, then predict the first validation records with their answers removed."""
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "tasks" / config), *SHORT, "--trainer.default_root_dir", str(run), *extra]
    run_trainer_cli(["fit", *args])
    val = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/loss")]
    task_dir = "extractive_qa" if "qa" in config else "text_to_text"
    records = [json.loads(line) for line in (REPO / "lmforge/data/tasks" / task_dir / "val.jsonl").open()][:n_predict]
    unlabelled = tmp_path / "predict.jsonl"
    unlabelled.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("answers", "target")}) + "\n" for r in records))
    output = tmp_path / "predictions.jsonl"
    run_trainer_cli(["predict", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                     "--data.predict_files", str(unlabelled), "--output", str(output)])
    predictions = [json.loads(line) for line in output.open()]
    return val, records, predictions


def test_extractive_qa_fits_and_predicts_one_answer_per_question(tmp_path):
    # max_length 32 cuts most shipped contexts into several windows (about 20 context tokens each)
    val, records, predictions = _fit_and_predict(
        "extractive_qa.yaml", tmp_path, 7, "--data.max_length", "32", "--model.task.stride", "4"
    )
    assert len(val) == 1 and 0.0 <= float(val[0]["val/exact_match"]) <= float(val[0]["val/f1"]) <= 1.0
    assert [p["id"] for p in predictions] == [r["id"] for r in records] == [f"val-{i}" for i in range(7)]  # their own ids
    for record, prediction in zip(records, predictions):
        assert prediction["question"] == record["question"]
        # an answer is "" (no answer) or a piece of its own context
        assert prediction["answer"] in record["context"]
        assert isinstance(prediction["score"], float)


@pytest.mark.parametrize("config", ["text_to_text.yaml", "text_to_text-gpt.yaml"])
def test_text_to_text_fits_generates_and_predicts(tmp_path, config):
    val, records, predictions = _fit_and_predict(config, tmp_path, 3, "--model.task.max_new_tokens", "4")
    assert len(val) == 1
    for key in ("val/rouge1", "val/rouge2", "val/rougeL", "val/bleu"):
        assert 0.0 <= float(val[0][key]) <= 1.0
    assert [p["id"] for p in predictions] == [0, 1, 2]
    assert [p["source"] for p in predictions] == [r["source"] for r in records]
    assert all(isinstance(p["prediction"], str) for p in predictions)


def test_a_family_the_task_does_not_support_is_refused_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "fit", "--config", str(REPO / "configs" / "tasks" / "text_to_text.yaml"),  # a seq2seq (t5) model
        "--model.task", "extractive_qa", "--trainer.default_root_dir", str(run),
    ]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert "The task 'extractive_qa' does not support the seq2seq family; it supports encoder" in err
    assert not (run / "checkpoints").exists()
