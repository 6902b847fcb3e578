"""Preemption: stop at a step boundary on SIGTERM (or SIGUSR1 under SLURM), save, exit with 75.

Lightning's own signal handling is replaced for ``fit`` (:class:`LmforgeSignalConnector`): its
SIGTERM handler broadcasts from inside the signal handler and kills the other processes, and its
SLURM handler saves an ``hpc_ckpt`` and requeues from inside the handler. lmforge's handlers only
set a flag; :class:`~lmforge.reliability.guard.TrainingGuard` acts on it at the next optimizer step,
where all ranks agree (one all-reduce), so a signal that reaches any single rank stops all of them
in the same step, after which they commit a checkpoint and exit:

* rank 0 (the process you started) exits with :data:`PREEMPTED_EXIT_CODE` = 75 (``EX_TEMPFAIL``:
  "try again later"), after printing where the checkpoint is; the other ranks exit with 0;
* under SLURM (``SLURM_JOB_ID`` is set) SIGUSR1 is handled too (ask SLURM for it before the time
  limit: ``#SBATCH --signal=USR1@120``), and when the stop came from SIGUSR1, rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` (``<array job>_<task>`` for array jobs) once. SIGTERM does
  not requeue: it is what ``scancel`` sends, and what SLURM sends when it preempts a job it will
  requeue itself.

Run the same command with ``--ckpt_path last`` (it also works for the first attempt: with no
checkpoint yet, training starts from scratch), and the resumed run continues exactly.

Ctrl-C (SIGINT) stops the same way, so an interactive run keeps every step it trained: the first
Ctrl-C prints that the run will stop after the current step, and rank 0 exits with
:data:`INTERRUPTED_EXIT_CODE` = 130 (the shell's status for a process ended by SIGINT) after the
checkpoint is committed. A second Ctrl-C, a second or more after the first, stops at once without a
checkpoint (Lightning's KeyboardInterrupt shutdown, as before). A second SIGINT within a second of
the first is taken for the same Ctrl-C: launchers such as torchrun pass a terminal's SIGINT on to
their workers, which the terminal has already signalled.

Data-loader worker processes ignore SIGTERM, SIGUSR1 (SLURM signals every process of a job step) and
SIGINT (a terminal's Ctrl-C reaches every process in its foreground group): the training process
stops them when it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

log = logging.getLogger("lmforge.reliability")

#: Exit status of rank 0 after a clean stop for preemption (sysexits.h EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75
#: Exit status of rank 0 after a clean stop on Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT_CODE = 130
#: A second SIGINT sooner than this after the first is the same Ctrl-C, passed on by a launcher.
REPEATED_INTERRUPT_SECONDS = 1.0
#: Test hook: a comma-separated list of 1-based optimizer steps at which to act as if SIGTERM arrived.
PREEMPT_AT_STEP_ENV = "LMFORGE_PREEMPT_AT_STEP"


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job; return whether it worked (a failure is logged, not raised)."""
    job_id = slurm_job_id()
    if not job_id:
        return False
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("Could not requeue SLURM job %s: %s", job_id, exc)
        return False
    if result.returncode != 0:
        log.warning("`scontrol requeue %s` failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("Requeued SLURM job %s", job_id)
    return True


class Preempted(SystemExit):
    """Raised on every rank after the stop checkpoint is committed: ends the process."""

    def __init__(self, rank: int, interrupted: bool = False) -> None:
        super().__init__(self.code_for_rank(rank, interrupted))

    @staticmethod
    def code_for_rank(rank: int, interrupted: bool = False) -> int:
        if rank != 0:
            return 0
        return INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE


class LmforgeSignalConnector(_SignalConnector):
    """Replaces Lightning's signal handling during ``fit``: handlers only record the request."""

    def __init__(self, trainer: Any, guard: Any) -> None:
        super().__init__(trainer)
        self.guard = guard

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle_interrupt)
        self._first_interrupt: float | None = None
        if under_slurm() and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.guard.request_stop(signum)

    def _handle_interrupt(self, signum: int, frame: Any) -> None:
        """Ctrl-C: the first stops after this step with a checkpoint; a later one stops at once."""
        now = time.monotonic()
        if self._first_interrupt is None:
            self._first_interrupt = now
            self.guard.request_stop(signum)
            if self.trainer.global_rank == 0:  # os.write: print() may not be re-entered from a handler
                os.write(2, b"\nlmforge: Ctrl-C: stopping after this step with a checkpoint "
                            b"(press Ctrl-C again to stop at once, without one).\n")
        elif now - self._first_interrupt >= REPEATED_INTERRUPT_SECONDS:
            if self.trainer.global_rank == 0:
                os.write(2, b"\nlmforge: second Ctrl-C: stopping now, without a checkpoint of this step; "
                            b"`--ckpt_path last` resumes from the newest committed checkpoint.\n")
            raise KeyboardInterrupt
