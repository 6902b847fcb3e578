"""A non-finite loss or gradient: halt in that step (default) or skip it, with a budget of skips in a row."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_helpers import config, run_in_process, small_corpus, steps, write

from lmforge.reliability.checkpoint_io import committed_checkpoints


def nan_config(tmp_path, corpus, nan_at_steps, trace_steps, **model):
    data = small_corpus(tmp_path / "data")
    cfg = config(data, corpus["tokenizer"], tmp_path / "run", val_check_interval=2)
    cfg["model"]["init_args"]["objective"]["init_args"] = {"nan_at_steps": nan_at_steps}
    cfg["model"]["init_args"].update(model)
    cfg["trainer"]["callbacks"].append({"class_path": "rel_testkit.ParamTrace", "init_args": {"steps": trace_steps}})
    return write(tmp_path / "cfg.yaml", cfg)


def error_paragraph(stderr: str) -> str:
    """The one line the CLI printed for the error (progress bars of the data preparation aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("lmforge: error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def same_state(a: dict, b: dict) -> bool:
    params = a["params"].keys() == b["params"].keys() and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    moments = sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    return params and moments


def test_nan_loss_halts_in_that_step_with_the_previous_parameters(corpus, tmp_path, capsys):
    cfg = nan_config(tmp_path, corpus, nan_at_steps=[3], trace_steps=[2])
    assert run_in_process(["fit", "--config", str(cfg)]) == 2
    err = error_paragraph(capsys.readouterr().err)
    assert err.startswith("lmforge: error: Training stopped at step 3 (trainer.global_step 2): the loss was not finite on rank 0")
    assert "model.nonfinite: skip" in err  # naming the alternative
    trace = tmp_path / "run" / "trace"
    after_step_2 = torch.load(trace / "step-2.pt", weights_only=True)
    at_halt = torch.load(trace / "exception.pt", weights_only=True)
    assert same_state(after_step_2, at_halt)  # step 3 changed nothing
    assert sorted(steps(tmp_path / "run")) == [1, 2]
    assert [m["step"] for _, _, m in committed_checkpoints(tmp_path / "run" / "checkpoints")] == [2]


def test_skip_policy_skips_counts_logs_saves_and_halts_past_the_budget(corpus, tmp_path, capsys):
    cfg = nan_config(tmp_path, corpus, nan_at_steps=[3, 6, 7, 8], trace_steps=[2, 3, 4],
                     nonfinite="skip", max_consecutive_skips=2)
    assert run_in_process(["fit", "--config", str(cfg)]) == 2
    err = error_paragraph(capsys.readouterr().err)
    assert err.startswith("lmforge: error: Training stopped at step 8: the loss was not finite on rank 0")
    assert "3 steps in a row" in err and "max_consecutive_skips=2" in err

    trace = tmp_path / "run" / "trace"
    step2, step3, step4 = (torch.load(trace / f"step-{n}.pt", weights_only=True) for n in (2, 3, 4))
    assert same_state(step2, step3)  # the skipped step left parameters and optimizer state alone
    assert not same_state(step3, step4)  # and training went on
    logged = steps(tmp_path / "run")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6, 7]
    assert [s for s, r in logged.items() if r["loss"] == "nan"] == [3, 6, 7]

    newest = committed_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest[2]["step"] == 6
    saved = torch.load(newest[1] / "model.ckpt", weights_only=True)["callbacks"]["TrainingGuard"]
    assert saved == {"skipped_total": 2, "consecutive_skips": 1, "skipped_steps": [3, 6]}
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 2.0, 6: 3.0}  # logged at global_step = step - 1
