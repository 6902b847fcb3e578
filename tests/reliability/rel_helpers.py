"""Helpers of the reliability tests.

* small configs per family whose epochs are a few batches long (so stops can land at an epoch's
  end and just after it), with dropout, collate randomness and data-loader workers;
* running ``lmforge fit`` in this process, in a fresh child process, or as a 2-process DDP job.
  Child processes come from a ``forkserver`` that imported lmforge once, so a run that is killed or
  signalled is a real process without paying for the imports each time; DDP ranks started that way
  get ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` like ``torchrun``/``srun`` set them;
* reading what a run saw (``StepLog``) and its final state.

Every run uses one intra-op thread: results are bit-exact for a given thread count, and two
processes on two cores run much faster without oversubscription.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from ports import free_port

REL_DIR = Path(__file__).resolve().parent
REPO = REL_DIR.parents[1]
if str(REL_DIR) not in sys.path:
    sys.path.insert(0, str(REL_DIR))

WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "mat", "tree", "house", "red", "blue", "big", "small", "and", "then"]
BASE_ENV = {"LMFORGE_PLUGINS": "rel_testkit", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
#: Batches per epoch of the small corpus: 26 rows of 32 tokens, 4 rows a batch.
BATCHES_PER_EPOCH = {1: 7, 2: 4}


def small_corpus(root: Path) -> dict[str, Path]:
    """45 short documents (26 packed rows of 32 tokens) for training, 10 for validation."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(45)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines[:10]) + "\n")
    return {"train": root / "train.txt", "val": root / "val.txt"}


# family -> (architecture, its size options, an objective with collate randomness)
_MODELS = {
    "decoder": ("gpt", {"n_layer": 2, "block_size": 32}, "noisy_clm"),
    "seq2seq": ("t5", {"n_layer": 1, "d_ff": 64}, "span_corruption"),
    "encoder": ("bert", {"n_layer": 1, "block_size": 32}, "mlm"),
}


def model_section(family: str) -> dict[str, Any]:
    """A tiny model of ``family`` with dropout and an objective with collate randomness."""
    architecture, size, objective = _MODELS[family]
    return {
        "class_path": family,
        "init_args": {
            "architecture": {"class_path": architecture,
                             "init_args": {**size, "n_head": 2, "d_model": 32, "dropout": 0.1}},
            "objective": {"class_path": objective},
            "warmup_steps": 2,
            "lr": 1e-3,
        },
    }


TOKENIZERS = {
    "decoder": None,  # the session corpus tokenizer
    "seq2seq": REPO / "lmforge" / "data" / "corpus" / "tokenizer_t5.json",
    "encoder": REPO / "lmforge" / "data" / "corpus" / "wordpiece.json",
}


def config(
    data: dict[str, Path], tokenizer: Path, run_dir: Path, family: str = "decoder", devices: int = 1,
    step_log: bool = True, **trainer: Any,
) -> dict[str, Any]:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "default_root_dir": str(run_dir),
            "max_steps": 16 if devices == 1 else 9,  # the same in every segment: the LR schedule depends on it
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "devices": devices,
            **({"strategy": "ddp"} if devices > 1 else {}),
            "callbacks": [{"class_path": "lmforge.reliability.StepLog"}] if step_log else [],
            **trainer,
        },
        "model": model_section(family),
        "data": {
            "train_files": str(data["train"]),
            "val_files": str(data["val"]),
            "tokenizer": str(TOKENIZERS.get(family) or tokenizer),
            "block_size": 32,
            "batch_size": 4,
            "num_workers": 1,
        },
    }
    return cfg


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextlib.contextmanager
def environment(env: dict[str, str] | None):
    saved = dict(os.environ)
    os.environ.update({**BASE_ENV, **(env or {})})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_in_process(argv: list[str], env: dict[str, str] | None = None) -> int:
    """``lmforge ARGV`` in this process; returns the exit status (a SystemExit's code included)."""
    from lmforge.cli import main

    with environment(env), one_thread():
        try:
            return main(list(argv))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


# -- child processes ---------------------------------------------------------------------------------
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["torch", "lightning.pytorch", "datasets", "lmforge.training_cli", "lmforge.reliability.guard",
             "lmforge_plugins.objectives.clm", "rel_testkit"]
        )
        _CONTEXT = ctx
    return _CONTEXT


def _child(argv: list[str], env: dict[str, str], stderr_path: str) -> None:
    # A child of the forkserver inherits "forkserver" as its start method; a CLI process forks its
    # data-loader workers.
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(env)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    faulthandler.enable()  # a run that hangs shows where (``wait`` aborts it)
    import torch

    torch.set_num_threads(1)
    from lmforge.cli import main

    sys.exit(main(argv))


def start(argv: list[str], env: dict[str, str] | None, stderr_path: Path):
    """Start ``lmforge ARGV`` in a fresh process (from the forkserver); returns the Process."""
    process = _context().Process(target=_child, args=(list(argv), {**BASE_ENV, **(env or {})}, str(stderr_path)))
    process.start()
    return process


def wait(processes, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in processes]
    hung = [p for p in processes if p.is_alive()]
    for p in hung:  # faulthandler writes every thread's stack to the rank's log first
        os.kill(p.pid, signal.SIGABRT)
    for p in hung:
        p.join(10)
        p.kill()
        p.join()
    return codes


def start_ddp(argv: list[str], env: dict[str, str] | None, log_dir: Path, world_size: int = 2):
    """Start a ``world_size``-process DDP job as torchrun would (LOCAL_RANK etc. set per process)."""
    port = str(free_port())
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in range(world_size):
        rank_env = {**(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size),
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        processes.append(start(argv, rank_env, log_dir / f"rank-{rank}.log"))
    return processes


def log_tails(log_dir: Path, chars: int = 3000) -> str:
    """The end of every rank's log in ``log_dir``, for an assertion's message."""
    return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in sorted(log_dir.glob("rank-*.log")))


def wait_for_steps(run_dir: Path, n: int, processes, timeout: float = 120, rank: int = 0) -> None:
    """Wait until ``rank`` logged ``n`` training steps (or a process ended)."""
    log = run_dir / "steps" / f"rank-{rank}.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        if any(not (p.is_alive() if hasattr(p, "is_alive") else p.poll() is None) for p in processes):
            raise AssertionError(f"a process ended before {n} steps were logged in {log}")
        time.sleep(0.05)
    raise AssertionError(f"{n} steps were not logged in {log} within {timeout}s")


# -- what a run saw --------------------------------------------------------------------------------
def steps(run_dir: Path, rank: int = 0) -> dict[int, dict[str, Any]]:
    """step -> the last StepLog record of that step (a resumed run may repeat steps after its checkpoint)."""
    from lmforge.reliability import read_step_log

    return {r["step"]: r for r in read_step_log(run_dir / "steps" / f"rank-{rank}.jsonl")}


def final_checkpoint(run_dir: Path) -> dict[str, Any]:
    import torch

    from lmforge.reliability import resolve_checkpoint

    return torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)


def assert_same_training(expected_run: Path, run: Path, ranks: tuple[int, ...] = (0,)) -> None:
    """Every step's rows and loss (float.hex) and the final parameters/optimizer/scheduler are identical."""
    import torch

    for rank in ranks:
        expected, got = steps(expected_run, rank), steps(run, rank)
        assert sorted(got) == sorted(expected), (rank, sorted(got), sorted(expected))
        for step in sorted(expected):
            assert got[step]["rows"] == expected[step]["rows"], (rank, step, got[step]["rows"], expected[step]["rows"])
            assert got[step]["loss"] == expected[step]["loss"], (rank, step, got[step]["loss"], expected[step]["loss"])
    a, b = final_checkpoint(expected_run), final_checkpoint(run)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    sa, sb = a["optimizer_states"][0], b["optimizer_states"][0]
    assert sa["state"].keys() == sb["state"].keys()
    for index in sa["state"]:
        for key, value in sa["state"][index].items():
            assert torch.equal(value, sb["state"][index][key]), (index, key)
    assert a["lr_schedulers"] == b["lr_schedulers"]
