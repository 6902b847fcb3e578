"""The training guard: one agreement per optimizer step on numerical faults and on stopping.

:class:`TrainingGuard` is added to every trainer by :meth:`lmforge.LMModule.configure_callbacks`.
Before each optimizer step (after the backward pass) every rank contributes, in **one
all-reduce**, whether its loss was finite, whether the gradient norm was finite, and whether it
was asked to stop. Every rank then takes the same decision in the same step:

Numerical faults (module options ``nonfinite`` and ``max_consecutive_skips``)
    ``halt`` (default): every rank stops in that step, before the optimizer changes anything, so
    the parameters and optimizer state stay as after the previous step. Rank 0 raises an
    :class:`~lmforge.LmforgeError` naming the step and the rank(s) (the CLI prints it as one
    paragraph and exits with status 2); the other ranks exit quietly with status 0 (so that
    Lightning's process launcher, which kills the whole group when a child fails, cannot cut rank
    0 short). ``skip``: every rank drops the step's gradients, so the optimizer leaves the
    parameters and its state unchanged; the step still counts (``global_step`` and the learning
    rate schedule advance, so ``max_steps`` means the same). Skips are counted, logged
    (``train/skipped_steps``) and saved in checkpoints; more than ``max_consecutive_skips`` in a
    row halts as above. Under ``16-mixed`` precision an infinite gradient is the loss scaler's
    business (it skips the step itself), so only the loss is checked.

Preemption (:mod:`lmforge.reliability.preemption`)
    SIGTERM (SIGUSR1 under SLURM, and the first Ctrl-C) only set a flag. At the next optimizer step
    the ranks learn through the same all-reduce that one of them was signalled; all of them finish
    that step, commit a checkpoint (``last`` points to it), and exit: rank 0 with status
    :data:`~lmforge.reliability.preemption.PREEMPTED_EXIT_CODE` (75; 130 after Ctrl-C), the
    others with 0. Under
    SLURM, when the signal was SIGUSR1, rank 0 requeues the job once (``scontrol requeue``).

RNG states
    Each rank's torch/numpy/python RNG states go into the checkpoint (``rank-<r>.pt``) and are
    restored right before the first training step of a resumed run.

Test hook: ``LMFORGE_PREEMPT_AT_STEP=3,5`` behaves as if SIGTERM reached the process during steps 3
and 5 (1-based optimizer steps), to stop a run at an exact step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lmforge.errors import LmforgeError
from lmforge.reliability.checkpoint_io import (
    RANK_STATE_KEY,
    CommittedCheckpoint,
    commit_checkpoint,
    point,
)
from lmforge.reliability.preemption import (
    PREEMPT_AT_STEP_ENV,
    LmforgeSignalConnector,
    Preempted,
    requeue_slurm_job,
    under_slurm,
)
from lmforge.reliability.resume import capture_rng_state, restore_rng_state

log = logging.getLogger("lmforge.reliability")


def _ranks(flags: list[float]) -> list[int]:
    return [rank for rank, value in enumerate(flags) if value > 0]


class TrainingGuard(Callback):
    """Numerical-fault policy, preemption and RNG restore (see the module docs).

    The policy comes from the LightningModule's ``nonfinite`` and ``max_consecutive_skips``
    hyperparameters when it has them, else from these arguments.
    """

    def __init__(self, nonfinite: str = "halt", max_consecutive_skips: int = 5) -> None:
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.skipped_steps: list[int] = []
        self._loss_bad: torch.Tensor | None = None
        self._stop_signal: int | None = None
        self._signalled_requeue = False
        self._stop_now: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._preempt_steps: set[int] = set()

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        hparams = getattr(pl_module, "hparams", {}) or {}
        self.nonfinite = hparams.get("nonfinite", self.nonfinite)
        self.max_consecutive_skips = int(hparams.get("max_consecutive_skips", self.max_consecutive_skips))
        if self.nonfinite not in ("halt", "skip"):
            raise LmforgeError(f"model.nonfinite must be 'halt' or 'skip', not {self.nonfinite!r}.")
        if self.nonfinite == "skip" and "deepspeed" in type(trainer.strategy).__name__.lower():
            raise LmforgeError(
                "model.nonfinite: skip is not available with DeepSpeed, which owns the optimizer step; use "
                "nonfinite: halt (the default) with DeepSpeed."
            )
        if stage == "fit":
            trainer._signal_connector = LmforgeSignalConnector(trainer, self)
            spec = os.environ.get(PREEMPT_AT_STEP_ENV, "")
            self._preempt_steps = {int(s) for s in spec.replace(" ", "").split(",") if s}

    def request_stop(self, signum: int) -> None:
        """Called by the signal handler: remember the request; act at the next optimizer step."""
        self._stop_signal = signum
        if under_slurm() and signum == getattr(signal, "SIGUSR1", None):
            self._signalled_requeue = True

    # -- checkpoint contents -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            "skipped_steps": list(self.skipped_steps[-1000:]),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.skipped_steps = list(state_dict.get("skipped_steps", []))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RANK_STATE_KEY] = {"rng": capture_rng_state()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        rank_state = checkpoint.get(RANK_STATE_KEY) or {}
        self._pending_rng = rank_state.get("rng")
        if self._pending_rng is None and trainer.world_size > 1:
            log.warning(
                "The checkpoint holds no RNG state for rank %d (it was written by a different number of processes?): "
                "dropout will not continue the interrupted run's random stream exactly.",
                trainer.global_rank,
            )

    # -- per step ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)  # right before the first resumed training step
            self._pending_rng = None

    def on_after_backward(self, trainer, pl_module) -> None:
        loss = getattr(pl_module, "last_loss", None)
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._loss_bad = bad if self._loss_bad is None else (self._loss_bad | bad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1  # the optimizer step about to happen, counted from 1
        world = max(1, trainer.world_size)
        rank = trainer.global_rank
        device = pl_module.device
        flags = torch.zeros(3 * world + 2, device=device)
        if self._loss_bad is not None:
            flags[rank] = self._loss_bad.to(device=device, dtype=flags.dtype)
        self._loss_bad = None
        norm = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16 loss scaling handles inf grads
            # The parameters this step would change, in the optimizer's order: the order in which
            # torch.nn.utils.clip_grad_norm_ sums them, so clipping can reuse the norm to the bit.
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                flags[world + rank] = (~torch.isfinite(norm)).to(flags.dtype)
        if hasattr(pl_module, "last_grad_norm"):
            pl_module.last_grad_norm = norm  # gradient clipping reuses it (LMModule.configure_gradient_clipping)
        if norm is not None and trainer._logger_connector.should_update_logs:
            pl_module.log("train/grad_norm", norm)  # before clipping, as the Hugging Face Trainer reports it
        if self._stop_signal is not None or step in self._preempt_steps:
            flags[2 * world + rank] = 1.0
        if self._signalled_requeue:
            flags[3 * world] = 1.0
        if self._stop_signal == signal.SIGINT:
            flags[3 * world + 1] = 1.0
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags)  # the one collective of the step
        values = flags.tolist()
        loss_ranks = _ranks(values[:world])
        grad_ranks = _ranks(values[world : 2 * world])
        stop_ranks = _ranks(values[2 * world : 3 * world])

        if loss_ranks or grad_ranks:
            self._on_nonfinite(trainer, pl_module, step, loss_ranks, grad_ranks)
        elif self.consecutive_skips:
            self.consecutive_skips = 0
        if self.nonfinite == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_total))  # steps skipped so far
        if stop_ranks:
            self._stop_now = {"step": step, "ranks": stop_ranks, "requeue": values[3 * world] > 0,
                              "interrupted": values[3 * world + 1] > 0}

    def _on_nonfinite(self, trainer, pl_module, step: int, loss_ranks: list[int], grad_ranks: list[int]) -> None:
        what = []
        if loss_ranks:
            what.append(f"the loss was not finite on rank{'s' if len(loss_ranks) > 1 else ''} "
                        f"{', '.join(map(str, loss_ranks))}")
        if grad_ranks:
            what.append(f"the gradient norm was not finite on rank{'s' if len(grad_ranks) > 1 else ''} "
                        f"{', '.join(map(str, grad_ranks))}")
        culprit = " and ".join(what)
        if self.nonfinite == "skip" and self.consecutive_skips < self.max_consecutive_skips:
            for param in pl_module.parameters():
                param.grad = None  # the optimizer skips parameters without gradients: nothing changes
            self.consecutive_skips += 1
            self.skipped_total += 1
            self.skipped_steps.append(step)
            if trainer.is_global_zero:
                log.warning(
                    "Skipped step %d: %s (model.nonfinite=skip; %d in a row, at most %d; %d skipped in all).",
                    step, culprit, self.consecutive_skips, self.max_consecutive_skips, self.skipped_total,
                )
            return
        if self.nonfinite == "skip":
            reason = (
                f"Training stopped at step {step}: {culprit}, making {self.consecutive_skips + 1} steps in a row "
                f"with a non-finite loss or gradient, more than model.max_consecutive_skips="
                f"{self.max_consecutive_skips} allows ({self.skipped_total} steps were skipped in all)."
            )
        else:
            reason = f"Training stopped at step {step} (trainer.global_step {step - 1}): {culprit}."
        message = (
            f"{reason} The parameters and optimizer state are those after step {step - 1}; step {step} changed "
            "nothing. Common causes: a learning rate too high for the model (lower model.lr or raise "
            "model.warmup_steps), no gradient clipping (set trainer.gradient_clip_val), or a bad batch. "
            + ("" if self.nonfinite == "skip" else
               "To skip such steps instead, set model.nonfinite: skip (at most model.max_consecutive_skips in a row).")
        )
        self._exit(trainer, LmforgeError(message.strip()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stop_now is None:
            return
        request, self._stop_now = self._stop_now, None
        directory = self._save_for_stop(trainer)
        if trainer.is_global_zero:
            ranks = ", ".join(map(str, request["ranks"]))
            cause = "Ctrl-C" if request["interrupted"] else "a stop signal"
            print(
                f"lmforge: stopped after step {request['step']} on request ({cause} reached rank {ranks}); "
                f"checkpoint committed in {directory}. Resume with the same command and `--ckpt_path last`. "
                f"Exit status {Preempted.code_for_rank(0, request['interrupted'])}.",
                file=sys.stderr,
                flush=True,
            )
            if request["requeue"]:
                requeue_slurm_job()
        trainer.strategy.barrier("lmforge-preempted")
        raise Preempted(trainer.global_rank, request["interrupted"])

    def _save_for_stop(self, trainer) -> Path:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, CommittedCheckpoint):
                return callback.save_last_now(trainer)
        directory = commit_checkpoint(trainer, Path(trainer.default_root_dir) / "checkpoints")
        if trainer.is_global_zero:
            point(directory.parent / "last.ckpt", directory / "model.ckpt")
        trainer.strategy.barrier("lmforge-pointer")
        return directory

    @staticmethod
    def _exit(trainer, error: LmforgeError) -> None:
        """Stop this rank: rank 0 reports ``error``; the others leave quietly (see the module docs)."""
        if trainer.global_rank == 0:
            raise error
        raise SystemExit(0)
