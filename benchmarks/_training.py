"""The timed training rounds that ``train_all.py``, ``encoder_throughput.py`` and
``seq2seq_throughput.py`` alternate: lmforge through the Lightning Trainer, and a hand-written loop
over any model (a plain PyTorch loop over lmforge's own architecture, or a ``transformers`` model).

Both kinds of round do the same optimisation so that only the training loop and the model differ:
AdamW with lmforge's two parameter groups (weight decay on matrices; none on biases, norms and
embeddings), ``clip_grad_norm_`` 1.0, lmforge's warmup + cosine ``LambdaLR`` over ``len(batches)``
steps, fp32, one ``DataLoader(batches, batch_size=None, num_workers=0)`` over pre-made batches.
The AdamW implementation is each side's own: lmforge's module picks the fused kernel, the loop
uses PyTorch's default (foreach).

A round times ``steps`` whole loop iterations after ``warmup`` untimed ones, start to start (the
loop: right after ``next(loader)``; Lightning: a Callback's ``on_train_batch_start``, which runs right
after the fetch), so every timed window holds whole iterations, Lightning's bookkeeping after
``on_train_batch_end`` included. It records wall and process-CPU seconds and the per-step losses
(compared across sides to show that they computed the same thing).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lmforge.families.base import lr_lambda
from lmforge.run_logger import RunLogger
from lmforge.throughput import TokenThroughputMonitor

CLIP = 1.0
#: Per-step losses of lmforge and the plain loop must agree to this relative tolerance: lmforge's
#: fused AdamW and the loop's default (foreach) AdamW round differently in the last bits.
LOSS_RTOL = 1e-4


@dataclass
class Round:
    """One timed round: wall and CPU seconds of the window, and the loss of every step run."""

    seconds: float
    cpu_seconds: float
    losses: torch.Tensor
    groups: list[tuple[int, float]] = field(default_factory=list)
    fused: bool | None = None  # the AdamW implementation: fused kernel, or the default (foreach)


def loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    """What both sides iterate: the ready-made batches as they are (no collation, no workers)."""
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """lmforge's AdamW groups (``LMModule.parameter_groups``) for any model: decay on matrices only.

    Parameters shared between modules (a tied LM head) are listed once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_summary(optimizer: torch.optim.Optimizer) -> list[tuple[int, float]]:
    """(parameters, weight decay) per group: comparable across models that split q/k/v differently."""
    return [(sum(p.numel() for p in g["params"]), g["weight_decay"]) for g in optimizer.param_groups]


# -- lmforge through Lightning --------------------------------------------------------------------


class StepTimer(Callback):
    """Clocks at the start of iterations ``first`` and ``stop``; the loss of every step."""

    def __init__(self, first: int, stop: int) -> None:
        self.first, self.stop = first, stop
        self.t0 = self.t1 = None
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.t0 = clocks()
        elif batch_idx == self.stop:
            self.t1 = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"])  # detached by Lightning; no .item() inside the loop


def lightning_round(module: L.LightningModule, batches, warmup: int, steps: int, workdir: Path) -> Round:
    """Train ``module`` as ``lmforge fit`` does with a shipped config: the module's own optimizer,
    schedule, logging and training guard, lmforge's CSV logger and the ``TokenThroughputMonitor``."""
    timer = StepTimer(warmup, warmup + steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches), max_epochs=1,
        logger=RunLogger(str(workdir)), log_every_n_steps=50, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, gradient_clip_val=CLIP,
        gradient_clip_algorithm="norm", num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(workdir), callbacks=[timer, TokenThroughputMonitor()],
    )
    gc.collect()
    trainer.fit(module, train_dataloaders=loader(batches))
    if timer.t1 is None:
        raise RuntimeError("the Lightning run ended before the timed window closed")
    optimizer = trainer.optimizers[0]
    return Round(timer.t1[0] - timer.t0[0], timer.t1[1] - timer.t0[1], torch.stack(timer.losses[: warmup + steps]),
                 group_summary(optimizer), bool(optimizer.defaults.get("fused")))


# -- a hand-written loop --------------------------------------------------------------------------


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A ``transformers`` model's own loss: it shifts (decoders) or masks (encoders) the labels itself."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss


def loop_round(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    batches,
    hparams: dict,
    warmup: int,
    steps: int,
) -> Round:
    """``for batch in loader``: loss, backward, clip, AdamW step, zero_grad, scheduler step.

    AdamW with PyTorch's defaults (the multi-tensor "foreach" implementation), as a plain loop is
    written; lmforge picks the fused kernel itself.
    """
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, hparams["weight_decay"]), lr=hparams["lr"],
                                  betas=hparams["betas"], eps=hparams["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(hparams["schedule"], hparams["warmup_steps"], len(batches), hparams["min_lr_ratio"])
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    first, stop = warmup, warmup + steps
    t0 = t1 = None
    losses = []
    gc.collect()
    for i, batch in enumerate(loader(batches)):
        if i == first:
            t0 = clocks()
        elif i == stop:
            t1 = clocks()
            break
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
    return Round(t1[0] - t0[0], t1[1] - t0[1], torch.stack(losses), group_summary(optimizer),
                 bool(optimizer.defaults.get("fused")))


# -- alternating rounds ---------------------------------------------------------------------------


def alternate(sides: dict[str, Callable[[int], Round]], rounds: int, tokens_per_step: int, steps: int,
              label: str = "") -> dict[str, list[Round]]:
    """Run every side once per round, in turn (A, B, C, A, B, C, ...); print each round's rate."""
    results: dict[str, list[Round]] = {name: [] for name in sides}
    for r in range(1, rounds + 1):
        for name, run in sides.items():
            res = run(r)
            results[name].append(res)
            print(f"  {label}round {r}  {name:<13} {steps * tokens_per_step / res.seconds:>9,.0f} tokens/s  "
                  f"({1000 * res.seconds / steps:7.1f} ms/step, CPU {res.cpu_seconds / res.seconds:.2f}x wall, "
                  f"load avg {os.getloadavg()[0]:.2f})", flush=True)
    return results


def median_rate(rounds: list[Round], tokens_per_step: int, steps: int, cpu: bool = False) -> float:
    """Median tokens/s over rounds (of wall time, or with ``cpu`` of process CPU time)."""
    return statistics.median(steps * tokens_per_step / (r.cpu_seconds if cpu else r.seconds) for r in rounds)
