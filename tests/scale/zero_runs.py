"""Helpers for the ZeRO tests, imported by spawned training processes (not a test module).

* :class:`GlobalLossRecorder`: a callback that writes each optimizer step's loss averaged over
  all ranks (``train/loss`` in metrics.csv is rank 0's local loss) to a JSON file.
* ``python zero_runs.py JOBS.json``: runs several ``lmforge fit`` command lines one after the other
  in this process (under torchrun each rank runs them all), so that the interpreter and DeepSpeed
  are imported once for many runs. A job may ask for the logits of the trained model on fixed
  token ids (computed through the DeepSpeed engine, so ZeRO-3 gathers its shards) and for the
  DeepSpeed config the strategy used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

LOGIT_IDS = torch.arange(24).reshape(2, 12) % 250 + 3


class GlobalLossRecorder(L.Callback):
    """Writes ``{"rows": [{step, batch_idx, loss}], "grad_norms": {step: norm}}`` to ``path``.

    ``loss``: each micro-batch's loss averaged over ranks. ``grad_norms``: the global gradient norm
    (before clipping) of each optimizer step: DeepSpeed's own for DeepSpeed runs, else the norm of
    the parameters' gradients.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.grad_norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.strategy, "deepspeed_engine", None) is None:
            grads = [p.grad.detach().float().norm() for p in pl_module.parameters() if p.grad is not None]
            self.grad_norms[trainer.global_step + 1] = torch.stack(grads).norm().item()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        self.rows.append({"step": trainer.global_step, "batch_idx": batch_idx, "loss": loss.item()})
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and trainer.global_step not in self.grad_norms and trainer.global_step > 0:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                self.grad_norms[trainer.global_step] = float(norm)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"rows": self.rows, "grad_norms": self.grad_norms}))


def run_jobs(jobs: list[dict]) -> None:
    from lmforge.cli import run_trainer_cli

    for job in jobs:
        if job.get("error") is not None:  # a run that must be refused: record the message
            try:
                run_trainer_cli(job["argv"])
                message = "no error"
            except Exception as exc:  # noqa: BLE001 - the test reads the message
                message = f"{type(exc).__name__}: {exc}"
            Path(job["error"]).write_text(message)
            continue
        started = time.perf_counter()
        cli = run_trainer_cli(job["argv"])
        trainer = cli.trainer
        print(f"[zero_runs] {job['argv'][-1] if job['argv'][-1] != 'last' else job['argv'][-3]}: "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        rank0 = trainer.is_global_zero
        if job.get("logits") is not None:
            engine = trainer.strategy.model
            with torch.no_grad():
                logits = engine(LOGIT_IDS)
            if rank0:
                torch.save(logits.float(), job["logits"])
        if job.get("ds_config") is not None and rank0:
            Path(job["ds_config"]).write_text(json.dumps(getattr(trainer.strategy, "config", None), default=str))
        if job.get("done") is not None and rank0:
            Path(job["done"]).write_text(json.dumps({"world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                                                     "global_step": trainer.global_step,
                                                     "strategy": type(trainer.strategy).__name__}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run_jobs(json.loads(Path(sys.argv[1]).read_text()))
    from lmforge.cli import close_process_group

    close_process_group()  # as `lmforge` does at the end of every command
