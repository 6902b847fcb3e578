"""The shipped classification configs fine-tune through the CLI; predict writes names; 2-process
validation scores exactly what one process does; a family a task does not support is refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, write_config
from ports import free_port

from lmforge.cli import main

TASKS = REPO / "lmforge" / "data" / "tasks"


def shipped_config(task: str, run_dir, cache_dir, **trainer) -> dict:
    """configs/tasks/<task>.yaml with absolute paths, a private cache and a short schedule."""
    cfg = yaml.safe_load((REPO / "configs" / "tasks" / f"{task}.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(run_dir), enable_progress_bar=False, enable_model_summary=False, **trainer)
    data = cfg["data"]
    for key in ("train_files", "val_files", "tokenizer"):
        data[key] = str(REPO / data[key])
    data["cache_dir"] = str(cache_dir)
    return cfg


def metric_rows(run_dir, name: str = "metrics.csv") -> list[dict[str, str]]:
    with open(run_dir / name, newline="") as f:
        return [row for row in csv.DictReader(f) if any(k.startswith("val/") and v for k, v in row.items())]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """configs/tasks/sequence_classification.yaml fine-tuned for one short epoch."""
    root = tmp_path_factory.mktemp("seqcls")
    cfg = shipped_config("sequence_classification", root / "run", root / "cache", max_epochs=1, limit_train_batches=8)
    config = write_config(root / "cfg.yaml", cfg)
    assert main(["fit", "--config", str(config)]) == 0
    return {"root": root, "run": root / "run", "config": config}


def test_fit_writes_labels_and_classification_metrics(classifier):
    run = classifier["run"]
    assert json.loads((run / "labels.json").read_text()) == ["calm", "happy", "sad"]
    last = metric_rows(run)[-1]
    for name in ("val/accuracy", "val/f1_macro", "val/mcc", "val/loss"):
        assert name in last and last[name], name
    assert 0.0 <= float(last["val/accuracy"]) <= 1.0 and -1.0 <= float(last["val/mcc"]) <= 1.0
    meta = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["lmforge"]
    assert meta["task"]["init_args"]["labels"] == ["calm", "happy", "sad"] and meta["objective"] is None


def test_predict_writes_one_line_per_record_with_label_names(classifier, tmp_path):
    texts = ["Mia laughed and smiled all day.", "Tom cried because the ball was broken.", "Sam looked at the dog."]
    records = tmp_path / "new.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))  # no labels needed
    out = tmp_path / "out" / "predictions.jsonl"
    args = ["predict", "--config", str(classifier["config"]), "--ckpt_path", "last",
            "--data.predict_files", str(records), "--output", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["text"] for r in rows] == texts
    assert all(r["label"] in ("calm", "happy", "sad") and 0.0 < r["score"] <= 1.0 for r in rows)


def test_predict_never_writes_over_what_exists(classifier, tmp_path, capsys):
    """An existing --output needs --overwrite; inputs and checkpoints are refused even then; the
    default output keeps the previous predictions beside the new ones."""
    records = tmp_path / "new.jsonl"
    records.write_text(json.dumps({"text": "Mia laughed and smiled all day."}) + "\n")
    base = ["predict", "--config", str(classifier["config"]), "--ckpt_path", "last", "--data.predict_files", str(records)]
    out = tmp_path / "mine.jsonl"
    out.write_text("my notes\n")
    assert main([*base, "--output", str(out)]) == 2
    assert "already exists" in (err := capsys.readouterr().err) and out.read_text() == "my notes\n"
    assert "Add --overwrite true to replace it" in err  # how the trainer commands spell it
    assert main([*base, "--output", str(out), "--overwrite", "true"]) == 0
    assert json.loads(out.read_text())["text"] == "Mia laughed and smiled all day."

    last = classifier["run"] / "checkpoints" / "last.ckpt"
    config = classifier["config"]
    before = {p: p.read_bytes() for p in (records, last.resolve(), config)}
    for target, message in ((records, "is also an input"), (config, "is also an input"), (last, "checkpoint or run file")):
        assert main([*base, "--output", str(target), "--overwrite", "true"]) == 2
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before and last.is_symlink()

    run = classifier["run"]
    for _ in range(2):
        assert main(base) == 0
    written = sorted(p.name for p in run.glob("predictions*.jsonl"))
    assert "predictions.jsonl" in written and len(written) == 2  # the second run kept the first's file
    stamped = next(run / name for name in written if name != "predictions.jsonl")
    assert f"lmforge: wrote 1 prediction to {stamped}" in capsys.readouterr().err  # where it went


def test_two_process_validation_equals_one_process(classifier, tmp_path):
    # 99 records in batches of 7: the two processes get 50 and 49 rows and 8 and 7 batches, so a
    # sampler that pads (repeats a row) or a metric averaged per process would show
    lines = (TASKS / "sequence_classification" / "val.jsonl").read_text().splitlines()[:99]
    val = tmp_path / "val99.jsonl"
    val.write_text("\n".join(lines) + "\n")
    ckpt = str(classifier["run"] / "checkpoints" / "last.ckpt")
    common = ["validate", "--config", str(classifier["config"]), "--ckpt_path", ckpt,
              "--data.val_files", str(val), "--data.batch_size", "7"]
    assert main([*common, "--trainer.default_root_dir", str(tmp_path / "one")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *common, "--trainer.default_root_dir", str(tmp_path / "two"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (metric_rows(tmp_path / side, "metrics.validate.csv")[-1] for side in ("one", "two"))
    assert not (tmp_path / "one" / "metrics.csv").exists()  # validation never writes the training log
    assert 0.0 < float(one["val/accuracy"]) < 1.0  # so one repeated or missing row would change it
    for name in ("val/accuracy", "val/f1_macro", "val/mcc"):
        assert float(two[name]) == pytest.approx(float(one[name]), abs=1e-7), name
    assert float(two["val/loss"]) == pytest.approx(float(one["val/loss"]), rel=1e-5)


def test_two_process_predict_writes_the_one_process_file(classifier, tmp_path):
    # 5 records in batches of 2: rank 0 gets records 0, 2, 4 and rank 1 records 1, 3 (interleaved),
    # so only putting the rows back by dataset index gives the input order.
    lines = (TASKS / "sequence_classification" / "val.jsonl").read_text().splitlines()[:5]
    records = tmp_path / "new.jsonl"
    records.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    common = ["predict", "--config", str(classifier["config"]), "--ckpt_path", str(classifier["run"] / "checkpoints" / "last.ckpt"),
              "--data.predict_files", str(records), "--data.batch_size", "2"]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *common, "--output", str(tmp_path / "two" / "predictions.jsonl"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["predictions.jsonl"]  # one file, no per-rank parts
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in one] == [0, 1, 2, 3, 4]
    assert [{k: r[k] for k in ("id", "text", "label")} for r in two] == [{k: r[k] for k in ("id", "text", "label")} for r in one]
    assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], abs=1e-5)


@pytest.mark.parametrize("ckpt", ["last", "best"])
def test_predict_takes_the_labels_from_the_checkpoint_without_the_training_files(classifier, tmp_path, ckpt):
    """The labels a head was trained with come from the checkpoint (`last`, `best` or a path): the
    training files need not be there (a prediction on another machine)."""
    records = tmp_path / "new.jsonl"
    records.write_text(json.dumps({"text": "Mia laughed and smiled all day."}) + "\n")
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--config", str(classifier["config"]), "--ckpt_path", ckpt, "--data.predict_files",
                 str(records), "--data.train_files", str(tmp_path / "not-here.jsonl"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["label"] in ("calm", "happy", "sad")


def test_evaluating_a_task_head_needs_a_checkpoint_not_init_from(classifier, tmp_path, capsys):
    """init_from loads the backbone only: the head would be freshly initialised, so it is refused."""
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--config", str(classifier["config"]), "--model.init_from", str(classifier["run"]),
                 "--data.predict_files", str(TASKS / "sequence_classification" / "val.jsonl"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "got no weights to use" in err and "the 'sequence_classification' head is trained only in a checkpoint" in err
    assert not out.exists()


def test_token_classification_fits_and_predicts_word_tags(tmp_path):
    cfg = shipped_config("token_classification", tmp_path / "run", tmp_path / "cache", max_epochs=1, limit_train_batches=6)
    config = write_config(tmp_path / "cfg.yaml", cfg)
    assert main(["fit", "--config", str(config)]) == 0
    tags = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert tags == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    last = metric_rows(tmp_path / "run")[-1]
    assert {"val/entity_f1", "val/entity_precision", "val/entity_recall", "val/token_accuracy"} <= set(last)
    records = tmp_path / "new.jsonl"
    sentences = ["Mia Brownstone went to Red Hill with Tom .", "In Paris , Leo saw a fox ."]
    records.write_text("".join(json.dumps({"words": s}) + "\n" for s in sentences))  # strings are split on spaces
    assert main(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_files", str(records)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["words"] for r in rows] == [s.split() for s in sentences]
    assert all(len(r["tags"]) == len(r["words"]) and set(r["tags"]) <= set(tags) for r in rows)

    # words past data.max_length were never seen by the model: no tag, and a warning says so
    out = tmp_path / "short.jsonl"
    with pytest.warns(UserWarning, match="longer than data.max_length tokens: their words past it get no tag"):
        assert main(["predict", "--config", str(config), "--ckpt_path", "last", "--data.predict_files", str(records),
                     "--data.max_length", "6", "--output", str(out)]) == 0
    short = [json.loads(line) for line in out.read_text().splitlines()]
    for row in short:
        tagged = [t for t in row["tags"] if t is not None]
        assert len(row["tags"]) == len(row["words"]) and 0 < len(tagged) < len(row["words"])
        assert row["tags"] == tagged + [None] * (len(row["words"]) - len(tagged)) and set(tagged) <= set(tags)


def test_a_family_the_task_does_not_support_is_refused_before_training(tmp_path, capsys):
    cfg = shipped_config("token_classification", tmp_path / "run", tmp_path / "cache")
    cfg["model"] = {
        "class_path": "seq2seq",
        "init_args": {
            "architecture": {"class_path": "t5", "init_args": {"n_layer": 1, "n_head": 2, "d_model": 32, "d_kv": 16, "d_ff": 64}},
            "task": {"class_path": "token_classification"},
        },
    }
    cfg["data"]["train_files"] = str(tmp_path / "missing.jsonl")  # refused before any data is read
    assert main(["fit", "--config", str(write_config(tmp_path / "bad.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "The task 'token_classification' does not support the seq2seq family; it supports encoder, decoder" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_refused_with_other_labels_a_multi_label_head_or_another_tokenizer(classifier, tmp_path, capsys):
    from lmforge.data.tokenizer import train_tokenizer

    records = tmp_path / "new.jsonl"
    records.write_text(json.dumps({"text": "Mia laughed and smiled all day."}) + "\n")
    base = ["predict", "--config", str(classifier["config"]), "--ckpt_path", "last", "--data.predict_files", str(records),
            "--output", str(tmp_path / "p.jsonl")]
    other_tokenizer = tmp_path / "other.json"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(json.loads(line)["text"] for line in (TASKS / "sequence_classification" / "train.jsonl")
                               .read_text().splitlines()) + "\n")
    train_tokenizer([str(texts)], str(other_tokenizer), vocab_size=400)
    for extra, message in ((["--model.task.init_args.labels", "[happy,calm,sad]"], "labels=['calm', 'happy', 'sad']"),
                           (["--model.task.init_args.multi_label", "true"], "multi_label=False"),
                           (["--data.tokenizer", str(other_tokenizer)], "another tokenizer than data.tokenizer")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_an_unknown_label_names_the_file_and_the_record_before_anything_is_written(tmp_path, capsys):
    val = tmp_path / "val_bad.jsonl"
    lines = (TASKS / "sequence_classification" / "val.jsonl").read_text().splitlines()[:5]
    val.write_text("\n".join([*lines, '{"text": "an odd one", "label": "mystery"}']) + "\n")
    cfg = shipped_config("sequence_classification", tmp_path / "run", tmp_path / "cache")
    cfg["data"]["val_files"] = str(val)
    assert main(["fit", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert f"data.val_files: {val} (records numbered from 0): Record 5 has the label 'mystery', which is not one of " \
           "the task's 3 labels (calm, happy, sad;" in err, err
    assert not (tmp_path / "run").exists()
