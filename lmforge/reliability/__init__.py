"""Reliability: exact resume, numerical-fault policy, preemption, committed checkpoints, fail-fast checks.

See ``docs/reliability.md`` for each guarantee and the test that proves it.
"""

from lmforge.reliability.checkpoint_io import (
    CommittedCheckpoint,
    CommittedCheckpointIO,
    newest_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from lmforge.reliability.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from lmforge.reliability.resume import StepLog, batch_seed, read_step_log

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "CommittedCheckpoint",
    "CommittedCheckpointIO",
    "StepLog",
    "batch_seed",
    "newest_checkpoint",
    "read_step_log",
    "resolve_checkpoint",
    "verify_checkpoint",
]
