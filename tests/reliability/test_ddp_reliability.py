"""Two-process DDP: exact resume after stops mid-epoch (a real SIGTERM to one rank only), at an
epoch's end and just after it; a NaN on one rank only is skipped on both, then halts both."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rel_helpers import (
    BASE_ENV,
    REL_DIR,
    assert_same_training,
    config,
    free_port,
    log_tails,
    small_corpus,
    start_ddp,
    steps,
    wait,
    wait_for_steps,
    write,
)

from lmforge.reliability import PREEMPTED_EXIT_CODE
from lmforge.reliability.checkpoint_io import committed_checkpoints

EPOCH_END = 4  # 26 rows, 2 ranks, 4 rows a batch: 4 batches per epoch and rank


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus):
    return {**small_corpus(tmp_path_factory.mktemp("ddpdata")), "tokenizer": corpus["tokenizer"]}


@pytest.fixture(scope="module")
def ddp_uninterrupted(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-uninterrupted")
    cfg = write(root / "cfg.yaml", config(data, data["tokenizer"], root / "run", devices=2))
    codes = wait(start_ddp(["fit", "--config", str(cfg)], {}, root), timeout=300)
    assert codes == [0, 0], log_tails(root)
    records = steps(root / "run", 0)
    assert max(s for s, r in records.items() if r["epoch"] == 0) == EPOCH_END
    return root / "run"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def launch_until_rank_1_trains(cfg: Path, run: Path) -> subprocess.Popen:
    """``lmforge fit`` through Lightning's launcher, once rank 1 has trained a step.

    A launch that trains nothing for two minutes (rank 1 normally steps within 15 s) is reported
    with every process's stacks, as a warning, and started once more with a fresh rendezvous port:
    one CI run saw such a start-up hang, which hundreds of runs here have not repeated. What the
    test checks (the stop, the exit codes, the exact resume) still has to hold in full.
    """
    for attempt in (1, 2):
        env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(REL_DIR), "MASTER_PORT": str(free_port()),
               "PYTHONFAULTHANDLER": "1"}  # a hang shows every process's stacks (stacks_of_hung_launch)
        launcher = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "fit", "--config", str(cfg)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_steps(run, 1, [launcher], rank=1, timeout=120)
            return launcher
        except AssertionError as exc:
            hung = launcher.poll() is None
            report = f"{exc}\n{stacks_of_hung_launch(launcher)}"
            if attempt == 2 or not hung:
                raise AssertionError(report) from None
            warnings.warn(f"the DDP launch hung before its first step; starting it again. {report}", stacklevel=1)
            shutil.rmtree(run, ignore_errors=True)
    raise AssertionError("unreachable")


def stacks_of_hung_launch(launcher: subprocess.Popen) -> str:
    """Abort the launcher and every process under it; returns their output, stacks included."""
    family, queue = [], [launcher.pid]
    while queue:
        pid = queue.pop()
        family.append(pid)
        queue.extend(children(pid))
    for pid in reversed(family):  # faulthandler (PYTHONFAULTHANDLER) prints each one's threads
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass
        time.sleep(1)  # one at a time: they all write to the same pipe
    try:
        out, err = launcher.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        launcher.kill()
        out, err = launcher.communicate()
    return f"processes {family}; the launch's output:\n{out[-3000:]}\n{err[-20000:]}"


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_to_one_rank_stops_both_then_resumes_exactly_across_epoch_end(data, ddp_uninterrupted, tmp_path):
    run = tmp_path / "run"
    slow = config(data, data["tokenizer"], run, devices=2)
    slow["model"]["init_args"]["objective"]["init_args"] = {"step_seconds": 0.4}  # time to send the signal
    cfg = write(tmp_path / "cfg.yaml", slow)

    # 1. Lightning's own launcher (it re-executes the command for rank 1); SIGTERM to rank 1 only.
    launcher = launch_until_rank_1_trains(cfg, run)
    try:
        # rank 1 is the child the launcher started with LOCAL_RANK=1 (the others are data-loader workers)
        rank1 = [pid for pid in children(launcher.pid) if b"\0LOCAL_RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=180)  # no hang
    finally:
        launcher.kill()
    assert launcher.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    deadline = time.monotonic() + 30
    while alive(rank1[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(rank1[0])  # rank 1 stopped too
    stopped = committed_checkpoints(run / "checkpoints")[-1][2]["step"]
    assert 2 <= stopped < EPOCH_END
    assert f"stopped after step {stopped} on request (a stop signal reached rank 1)" in stderr
    assert max(steps(run, 0)) == max(steps(run, 1)) == stopped

    # 2. Resume (ranks started externally, as torchrun/srun do), stopping at the epoch's end and just after it.
    write(tmp_path / "cfg.yaml", config(data, data["tokenizer"], run, devices=2))  # same training, no sleep
    segments = []
    for segment in range(3):
        codes = wait(start_ddp(["fit", "--config", str(cfg), "--ckpt_path", "last"],
                               {"LMFORGE_PREEMPT_AT_STEP": f"{EPOCH_END},{EPOCH_END + 1}"}, tmp_path / f"s{segment}"),
                     timeout=300)
        assert None not in codes, log_tails(tmp_path / f"s{segment}")
        segments.append((codes, committed_checkpoints(run / "checkpoints")[-1][2]["step"]))
        if codes == [0, 0]:
            break
    assert segments == [([PREEMPTED_EXIT_CODE, 0], EPOCH_END), ([PREEMPTED_EXIT_CODE, 0], EPOCH_END + 1), ([0, 0], 9)]
    assert_same_training(ddp_uninterrupted, run, ranks=(0, 1))
    seen0, seen1 = steps(run, 0), steps(run, 1)
    for step in seen0:  # the ranks trained on different rows in every step
        assert not set(seen0[step]["rows"]) & set(seen1[step]["rows"])


def test_nan_on_one_rank_is_skipped_on_both_then_halts_both_naming_step_and_rank(data, tmp_path):
    cfg_dict = config(data, data["tokenizer"], tmp_path / "run", devices=2)
    cfg_dict["model"]["init_args"]["objective"]["init_args"] = {"nan_at_steps": [2, 4, 5], "nan_ranks": [1]}
    cfg_dict["model"]["init_args"].update(nonfinite="skip", max_consecutive_skips=1)
    cfg = write(tmp_path / "cfg.yaml", cfg_dict)

    codes = wait(start_ddp(["fit", "--config", str(cfg)], {}, tmp_path), timeout=300)

    log0 = (tmp_path / "rank-0.log").read_text()
    assert codes == [2, 0], log_tails(tmp_path)  # rank 0 reports; rank 1 leaves quietly; nothing hangs
    errors = [line for line in log0.splitlines() if line.startswith("lmforge: error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "lmforge: error: Training stopped at step 5: the loss was not finite on rank 1")
    assert "max_consecutive_skips=1" in errors[0]
    assert "lmforge: error" not in (tmp_path / "rank-1.log").read_text()
    run = tmp_path / "run"
    for rank in (0, 1):  # both ranks took and skipped the same steps
        assert sorted(steps(run, rank)) == [1, 2, 3, 4]
    assert [s for s, r in steps(run, 1).items() if r["loss"] == "nan"] == [2, 4]
    assert all(r["loss"] != "nan" for r in steps(run, 0).values())
    newest = committed_checkpoints(run / "checkpoints")[-1]
    assert newest[2]["step"] == 4 and newest[2]["world_size"] == 2
    guard = torch.load(newest[1] / "model.ckpt", weights_only=True)["callbacks"]["TrainingGuard"]
    assert guard["skipped_steps"] == [2, 4]
    assert sorted(p.name for p in newest[1].iterdir()) == ["MANIFEST.json", "model.ckpt", "rank-0.pt", "rank-1.pt"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 2.0
