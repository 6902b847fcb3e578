"""A run stopped after step k and resumed reproduces the uninterrupted run bit for bit (single process).

Stops land mid-epoch, on an epoch's last step and on the next epoch's first step, with shuffling,
dropout, collate randomness and a data-loader worker. Each family that exists is tested with a
small config. The negative control shows that the comparison fails when the data position is not
restored. Real signals (SIGUSR1 under a fake SLURM) and SIGKILLs at each point of a checkpoint save
are tested against the same uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_helpers import (
    assert_same_training,
    config,
    run_in_process,
    small_corpus,
    start,
    steps,
    wait,
    wait_for_steps,
    write,
)

from lmforge.families import FAMILY_MODULES
from lmforge.reliability import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, read_step_log
from lmforge.reliability.checkpoint_io import (
    FAULT_POINTS,
    committed_checkpoints,
    read_manifest,
)

FAMILIES = [f for f in ("decoder", "encoder", "seq2seq") if f in FAMILY_MODULES]


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus):
    return {**small_corpus(tmp_path_factory.mktemp("reldata")), "tokenizer": corpus["tokenizer"]}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """family -> the run directory of an uninterrupted run (made on first use, shared by the module)."""
    runs = {}

    def get(family: str):
        if family not in runs:
            root = tmp_path_factory.mktemp(f"uninterrupted-{family}")
            cfg = write(root / "cfg.yaml", config(data, data["tokenizer"], root / "run", family))
            assert run_in_process(["fit", "--config", str(cfg)]) == 0
            runs[family] = root / "run"
        return runs[family]

    return get


def stop_points(run) -> tuple[int, int, int]:
    """(a step mid-epoch 0, the last step of epoch 0, the first step of epoch 1) of a run."""
    records = steps(run)
    end = max(s for s, r in records.items() if r["epoch"] == 0)
    assert end >= 4 and end + 1 < max(records), "the config's epochs are too long or too short for this test"
    return 2, end, end + 1


def run_segments(cfg, run, env: dict[str, str], limit: int = 6) -> list[tuple[int, int]]:
    """Run, then resume with --ckpt_path last after each stop, until the run finishes.

    Returns (exit status, step of the newest committed checkpoint) per segment.
    """
    segments = []
    args = ["fit", "--config", str(cfg)]
    while not segments or (segments[-1][0] == PREEMPTED_EXIT_CODE and len(segments) < limit):
        code = run_in_process(args, env)
        segments.append((code, committed_checkpoints(run / "checkpoints")[-1][2]["step"]))
        args = ["fit", "--config", str(cfg), "--ckpt_path", "last"]
    return segments


@pytest.mark.parametrize("family", FAMILIES)
def test_stops_mid_epoch_at_epoch_end_and_after_it_resume_bit_exact(family, data, uninterrupted, tmp_path):
    expected = uninterrupted(family)
    mid, end, after = stop_points(expected)
    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run", family))

    segments = run_segments(cfg, tmp_path / "run", {"LMFORGE_PREEMPT_AT_STEP": f"{mid},{end},{after}"})

    # each stop committed a checkpoint of its step and exited with 75; the last segment finished
    assert segments == [(PREEMPTED_EXIT_CODE, mid), (PREEMPTED_EXIT_CODE, end), (PREEMPTED_EXIT_CODE, after), (0, 16)]
    assert_same_training(expected, tmp_path / "run")
    seen = steps(tmp_path / "run")
    assert (seen[end]["epoch"], seen[after]["epoch"], seen[after]["batch"]) == (0, 1, 0)


def test_rows_follow_a_seeded_permutation_per_epoch(data, uninterrupted):
    records = steps(uninterrupted("decoder"))
    epoch0 = [row for r in records.values() if r["epoch"] == 0 for row in r["rows"]]
    epoch1 = [row for r in records.values() if r["epoch"] == 1 for row in r["rows"]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(len(epoch0)))  # every row once per epoch
    assert epoch0 != epoch1  # shuffled anew each epoch


def test_a_run_ended_by_max_steps_mid_epoch_goes_on_with_that_epoch(data, uninterrupted, tmp_path):
    """Stopped by a smaller max_steps in mid-epoch, then resumed with the full one: steps 4-16 read the
    same rows as the uninterrupted run (before, the resume started the next epoch, skipping the rest
    of this one). Losses differ: the LR schedule follows max_steps."""
    expected = steps(uninterrupted("decoder"))
    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run"))
    assert run_in_process(["fit", "--config", str(cfg), "--trainer.max_steps", "3"]) == 0
    assert expected[3]["epoch"] == expected[4]["epoch"] == 0  # step 3 is in mid-epoch
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    got = steps(tmp_path / "run")
    assert sorted(got) == sorted(expected)
    assert [got[s]["rows"] for s in sorted(got)] == [expected[s]["rows"] for s in sorted(expected)]
    # the last step's validation still names the best checkpoint: the one with the lowest val/loss
    with open(tmp_path / "run" / "metrics.csv") as f:
        val = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}
    assert 16 in val
    best = sorted((tmp_path / "run" / "checkpoints").glob("best-step*.ckpt"))
    assert [p.name for p in best] == [f"best-step{min(val, key=val.get)}.ckpt"], (val, best)


def test_comparison_detects_a_resume_without_the_data_position(data, uninterrupted, tmp_path):
    """Negative control: with the data position not restored, the same comparison fails."""
    expected = uninterrupted("decoder")
    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run"))
    assert run_in_process(["fit", "--config", str(cfg)], {"LMFORGE_PREEMPT_AT_STEP": "3"}) == PREEMPTED_EXIT_CODE
    code = run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"], {"LMFORGE_DISABLE_DATA_RESUME": "1"})
    assert code == 0
    with pytest.raises(AssertionError):
        assert_same_training(expected, tmp_path / "run")
    seen, want = steps(tmp_path / "run"), steps(expected)
    assert seen[3]["rows"] == want[3]["rows"] and seen[3]["loss"] == want[3]["loss"]  # before the stop: same
    assert seen[4]["rows"] == want[1]["rows"] != want[4]["rows"]  # after it: the epoch started over
    assert seen[4]["loss"] != want[4]["loss"]


def test_sigusr1_under_slurm_stops_saves_requeues_once_and_resumes_exactly(data, uninterrupted, tmp_path):
    """A real SIGUSR1 to a real process under (fake) SLURM: clean stop, exit 75, one requeue, exact resume."""
    expected = uninterrupted("decoder")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    cfg_dict = config(data, data["tokenizer"], tmp_path / "run")
    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {"step_seconds": 0.3}  # time to send the signal
    cfg = write(tmp_path / "cfg.yaml", cfg_dict)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    process = start(["fit", "--config", str(cfg)], env, tmp_path / "run.log")
    wait_for_steps(tmp_path / "run", 2, [process])
    os.kill(process.pid, signal.SIGUSR1)
    assert wait([process], timeout=120) == [PREEMPTED_EXIT_CODE], (tmp_path / "run.log").read_text()[-3000:]

    log = (tmp_path / "run.log").read_text()
    stopped = len(read_step_log(tmp_path / "run" / "steps" / "rank-0.jsonl"))
    assert 2 <= stopped < 16
    assert f"stopped after step {stopped} on request" in log
    assert calls.read_text().split("\n") == ["requeue 4242", ""]  # exactly once
    newest = committed_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest[2]["step"] == stopped
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve().parent == newest[1]

    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {}
    write(tmp_path / "cfg.yaml", cfg_dict)  # the same training, without the sleep
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    assert_same_training(expected, tmp_path / "run")


def _ctrl_c(pid: int) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the process and to its children (data-loader workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for target in [pid, *map(int, children)]:
        os.kill(target, signal.SIGINT)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(data, uninterrupted, tmp_path):
    """A real Ctrl-C (SIGINT to the run and its data-loader worker), passed on again 0.1 s later as torchrun
    does: the step finishes, a checkpoint is committed, exit 130, and the resumed run equals the
    uninterrupted one. (Before, the steps since the last checkpoint were lost.)"""
    expected = uninterrupted("decoder")
    cfg_dict = config(data, data["tokenizer"], tmp_path / "run")
    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {"step_seconds": 0.3}  # time to send the signal
    cfg = write(tmp_path / "cfg.yaml", cfg_dict)

    process = start(["fit", "--config", str(cfg)], {}, tmp_path / "run.log")
    wait_for_steps(tmp_path / "run", 2, [process])
    _ctrl_c(process.pid)
    time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)  # the launcher's copy of the same Ctrl-C: not a second one
    assert wait([process], timeout=120) == [INTERRUPTED_EXIT_CODE], (tmp_path / "run.log").read_text()[-3000:]

    log = (tmp_path / "run.log").read_text()
    stopped = len(read_step_log(tmp_path / "run" / "steps" / "rank-0.jsonl"))
    assert 2 <= stopped < 16
    assert "Ctrl-C: stopping after this step with a checkpoint" in log
    assert f"stopped after step {stopped} on request (Ctrl-C reached rank 0)" in log
    assert "Traceback" not in log
    newest = committed_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest[2]["step"] == stopped  # nothing trained was lost
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve().parent == newest[1]

    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {}
    write(tmp_path / "cfg.yaml", cfg_dict)  # the same training, without the sleep
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    assert_same_training(expected, tmp_path / "run")


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(data, tmp_path):
    """Ctrl-C, then Ctrl-C again 1.2 s later, during a step that would take 120 s: the second one ends the
    run in that step (Lightning's KeyboardInterrupt shutdown, exit 1) and commits nothing."""
    cfg_dict = config(data, data["tokenizer"], tmp_path / "run")
    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {"stall_at_step": 2}
    cfg = write(tmp_path / "cfg.yaml", cfg_dict)
    process = start(["fit", "--config", str(cfg)], {}, tmp_path / "run.log")
    wait_for_steps(tmp_path / "run", 1, [process])  # step 2, the stalled one, is under way
    _ctrl_c(process.pid)
    time.sleep(1.2)
    _ctrl_c(process.pid)
    assert wait([process], timeout=60) == [1], (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "Ctrl-C: stopping after this step" in log and "Detected KeyboardInterrupt" in log
    assert "second Ctrl-C: stopping now, without a checkpoint of this step; `--ckpt_path last` resumes" in log
    assert "stopped after step" not in log
    assert [m["step"] for _, _, m in committed_checkpoints(tmp_path / "run" / "checkpoints")] in ([], [1])


def test_a_full_disk_during_a_save_is_one_paragraph_and_the_restart_resumes_exactly(data, uninterrupted, tmp_path):
    """ENOSPC in the middle of writing the second checkpoint (step 8, after validation): the process exits
    with status 2 and one paragraph naming the step and the intact checkpoint of step 4, and leaves no
    partial save. (Before, a traceback, and the exit hung: the validation loader's persistent workers
    ignore SIGTERM, which multiprocessing's exit handler sends before joining them.) Once there is
    space again, `--ckpt_path last` finishes equal to the uninterrupted run."""
    expected = uninterrupted("decoder")
    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run"))
    process = start(["fit", "--config", str(cfg)], {"LMFORGE_CHECKPOINT_FAULT": "mid-file:2:enospc"}, tmp_path / "run.log")
    assert wait([process], timeout=90) == [2], (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"lmforge: error: Saving the checkpoint of step 8 failed: {os.strerror(errno.ENOSPC)}" in log, log[-3000:]
    assert f"the newest committed checkpoint, {checkpoints / 'step-00000004'}, is intact" in log
    assert "Traceback" not in log
    assert [m["step"] for _, _, m in committed_checkpoints(checkpoints)] == [4]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # the partial save is gone

    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0  # space again
    assert_same_training(expected, tmp_path / "run")


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_sigkill_during_a_save_resumes_from_the_newest_committed_checkpoint(point, data, uninterrupted, tmp_path):
    """SIGKILL at each point of the second save (step 8): the restart resumes from the newest committed
    checkpoint (step 4, or step 8 once its rename happened) and finishes equal to the uninterrupted run."""
    expected = uninterrupted("decoder")
    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run"))
    process = start(["fit", "--config", str(cfg)], {"LMFORGE_CHECKPOINT_FAULT": f"{point}:2"}, tmp_path / "run.log")
    assert wait([process], timeout=120) == [-signal.SIGKILL], (tmp_path / "run.log").read_text()[-3000:]

    checkpoints = tmp_path / "run" / "checkpoints"
    committed = [m["step"] for _, _, m in committed_checkpoints(checkpoints)]
    resumed_from = 8 if point == "before-pointer" else 4
    assert committed == ([4, 8] if point == "before-pointer" else [4])
    assert json.loads((checkpoints / "last.ckpt").resolve().parent.joinpath("MANIFEST.json").read_text())["step"] == 4
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    assert bool(leftovers) == (point != "before-pointer")  # an interrupted save leaves only a hidden temporary

    logged = len(read_step_log(tmp_path / "run" / "steps" / "rank-0.jsonl"))
    assert run_in_process(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 0
    records = read_step_log(tmp_path / "run" / "steps" / "rank-0.jsonl")
    assert records[logged]["step"] == resumed_from + 1  # the restart went on from the newest committed step
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]  # cleaned at the restart
    assert_same_training(expected, tmp_path / "run")
    assert read_manifest((checkpoints / "last.ckpt").resolve().parent)["step"] == 16


def test_a_resumed_run_logs_on_the_same_steps(data, tmp_path):
    """Rows of metrics.csv come every log_every_n_steps global steps, across a stop that is not on one."""
    import csv

    cfg = write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], tmp_path / "run", log_every_n_steps=3))
    assert [code for code, _ in run_segments(cfg, tmp_path / "run", {"LMFORGE_PREEMPT_AT_STEP": "4"})] == [
        PREEMPTED_EXIT_CODE, 0,
    ]
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    for column in ("train/loss", "train/lr", "train/ppl", "train/grad_norm"):
        assert [int(r["step"]) for r in rows if r.get(column)] == [2, 5, 8, 11, 14], column
