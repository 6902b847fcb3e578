"""Training tokens/s of lmforge's DecoderLM (GPT + CLM) through the Lightning Trainer vs a plain PyTorch loop.

Both sides train the same model (same seed, so the same initial weights) on the same pre-generated
random batches, with the same AdamW parameter groups and hyper-parameters, gradient clipping at
norm 1.0, the same LambdaLR schedule and dropout 0, in fp32 with the same number of torch threads.
The one intended difference is the AdamW implementation: lmforge uses the fused kernel (on CPU and
CUDA), the plain loop PyTorch's default (the multi-tensor "foreach" loop), which is what a plain
user writes; the two agree to float rounding, not bit for bit.

* Lightning side: the production path. ``DecoderLM(GPT, CLM)`` with its own ``configure_optimizers``,
  ``training_step`` and ``self.log`` calls; a ``Trainer`` with the lmforge ``RunLogger`` (CSV) in a
  temporary directory, the ``TokenThroughputMonitor`` the shipped configs enable,
  ``log_every_n_steps=50``, ``gradient_clip_val=1.0``; progress bar, model
  summary and checkpointing off (``enable_checkpointing=False``: the CLI's ModelCheckpoint only
  saves on validation/epoch end, never inside these training-only steps).
* Plain side: ``for batch in loader``: forward, cross-entropy on the shifted targets, backward,
  ``clip_grad_norm_(1.0)``, ``optimizer.step()`` (``torch.optim.AdamW`` with its defaults: foreach),
  ``zero_grad(set_to_none=True)``, ``scheduler.step()``.

Data: both sides iterate the *same kind of* loader, ``DataLoader(batches, batch_size=None,
num_workers=0)`` over one in-memory list of ready-made ``{"input_ids": (batch, block)}`` tensors,
so neither pays for collation or workers (Lightning adds only its own fetch/transfer bookkeeping,
which is part of what is measured).

Timing: the window of a measurement is ``steps`` whole loop iterations after ``warmup`` untimed
ones, from the start of iteration ``warmup`` to the start of iteration ``warmup + steps`` (the
plain loop: right after ``next(loader)``; Lightning: a Callback's ``on_train_batch_start``, which
Lightning calls right after fetching the batch and before the module's own hook). Start-to-start
includes everything Lightning does *after* ``on_train_batch_end`` (LR scheduler step, logger
connector updates, fetching the next batch); ending at the last step's ``on_train_batch_end``
would miss that for the last step, and the alternative (time ``trainer.fit`` for warmup + steps
and subtract a warmup-only fit) mixes in Trainer setup/teardown and subtracts two noisy numbers.
Lightning therefore runs one extra, untimed step per round. Rounds alternate Lightning, plain,
Lightning, plain, ... and the medians are compared; every round builds a fresh model, optimizer
and (Lightning) Trainer, outside the timed window.

Tokens per step are ``batch * block`` input tokens. The script also checks that both sides
compute the same thing: their per-step losses must agree within ``LOSS_RTOL`` (relative; fused and
foreach AdamW round differently in the last bits, and the difference grows a little step by step),
printed as max |difference| with the verdict.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lightning as L
from _common import (
    machine,
    median,
    quiet_lightning,
    random_batches,
    set_threads,
    spread,
)
from lightning.pytorch.callbacks import Callback
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.objectives.clm import CLM

from lmforge.families import DecoderLM
from lmforge.families.base import lr_lambda
from lmforge.run_logger import RunLogger
from lmforge.throughput import TokenThroughputMonitor

quiet_lightning()  # after importing Lightning, which installs its own console handler and level

#: Optimisation settings shared by both sides (DecoderLM's defaults, written out).
HPARAMS = {
    "lr": 3e-4,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "warmup_steps": 100,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
}
CLIP = 1.0
#: Per-step losses of the two sides must agree to this relative tolerance (fused vs foreach AdamW).
LOSS_RTOL = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating (default 3)")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block", type=int, default=256, help="sequence length = GPT block_size (default 256)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_gpt(args) -> GPT:
    return GPT(
        vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
        block_size=args.block, dropout=0.0,
    )


def loader(batches) -> DataLoader:
    """The loader both sides read: the ready-made batches as they are (no collation, no workers)."""
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def group_summary(optimizer) -> list[tuple]:
    return [(len(g["params"]), sum(p.numel() for p in g["params"]), g["weight_decay"]) for g in optimizer.param_groups]


# -- Lightning side -------------------------------------------------------------------------------


class StepTimer(Callback):
    """perf_counter at the start of every iteration ``first .. stop``; keeps the losses."""

    def __init__(self, first: int, stop: int) -> None:
        self.first, self.stop = first, stop
        self.stamps: list[float] = []
        self.cpu: list[float] = []
        self.threads = None
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first <= batch_idx <= self.stop:
            self.stamps.append(time.perf_counter())
            if batch_idx in (self.first, self.stop):
                self.cpu.append(time.process_time())
            if batch_idx == self.first:
                self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"])  # already detached by Lightning; no .item() in the loop


def lightning_round(args, batches, workdir: Path, index: int) -> dict:
    torch.manual_seed(args.seed)
    module = DecoderLM(architecture=make_gpt(args), objective=CLM(), **HPARAMS)
    timer = StepTimer(args.warmup, args.warmup + args.steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(batches),  # warmup + steps + 1 (the untimed step whose start ends the window)
        max_epochs=1,
        logger=RunLogger(str(workdir / f"lightning-{index}")),
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=CLIP,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(workdir / f"lightning-{index}"),
        callbacks=[timer, TokenThroughputMonitor()],
    )
    gc.collect()
    trainer.fit(module, train_dataloaders=loader(batches))
    if len(timer.stamps) != args.steps + 1:
        raise RuntimeError("the Lightning run ended before the timed window closed")
    optimizer = trainer.optimizers[0]
    return {
        "seconds": timer.stamps[-1] - timer.stamps[0],
        "cpu_seconds": timer.cpu[-1] - timer.cpu[0],
        "stamps": timer.stamps,
        "threads": timer.threads,
        "losses": torch.stack(timer.losses[: args.warmup + args.steps]),
        "groups": group_summary(optimizer),
        "defaults": {k: v for k, v in optimizer.defaults.items()},
    }


# -- plain PyTorch side ---------------------------------------------------------------------------


def plain_round(args, batches) -> dict:
    torch.manual_seed(args.seed)
    model = make_gpt(args)
    model.train()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HPARAMS["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=HPARAMS["lr"], betas=HPARAMS["betas"], eps=HPARAMS["eps"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(HPARAMS["schedule"], HPARAMS["warmup_steps"], len(batches), HPARAMS["min_lr_ratio"])
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    vocab = args.vocab
    first, stop = args.warmup, args.warmup + args.steps
    losses, stamps, cpu, threads = [], [], [], None
    gc.collect()
    for i, batch in enumerate(loader(batches)):
        if first <= i <= stop:
            stamps.append(time.perf_counter())
            if i in (first, stop):
                cpu.append(time.process_time())
            if i == first:
                threads = torch.get_num_threads()
            elif i == stop:
                break
        input_ids = batch["input_ids"]
        logits = model.logits(model(input_ids))  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.detach())
    return {
        "seconds": stamps[-1] - stamps[0],
        "cpu_seconds": cpu[-1] - cpu[0],
        "stamps": stamps,
        "threads": threads,
        "losses": torch.stack(losses),
        "groups": group_summary(optimizer),
        "defaults": {k: v for k, v in optimizer.defaults.items()},
    }


# -- driver ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    tokens_per_step = args.batch * args.block
    batches = random_batches(args.warmup + args.steps + 1, args.batch, args.block, args.vocab)
    print(
        f"train_throughput: DecoderLM(GPT + CLM) via Lightning Trainer vs plain PyTorch loop | {machine()}\n"
        f"  model: d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} block={args.block} "
        f"vocab={args.vocab} dropout=0 fp32 | batch={args.batch} -> {tokens_per_step} tokens/step\n"
        f"  AdamW (lightning: fused; plain: default foreach) lr={HPARAMS['lr']} wd={HPARAMS['weight_decay']} "
        f"(matrices only) betas={HPARAMS['betas']}, "
        f"clip_grad_norm {CLIP}, LambdaLR {HPARAMS['schedule']} (warmup {HPARAMS['warmup_steps']}, "
        f"total {len(batches)})\n"
        f"  Lightning: RunLogger CSV, TokenThroughputMonitor, log_every_n_steps=50, "
        f"no progress bar/summary/checkpointing\n"
        f"  data: DataLoader(list of {len(batches)} pre-generated batches, batch_size=None, num_workers=0) on both\n"
        f"  timing: {args.warmup} warmup + {args.steps} timed steps per round, {args.rounds} rounds per side "
        f"alternating (L,P,L,P,...), torch threads={threads}",
        flush=True,
    )
    rates = {"lightning": [], "plain": []}
    results = {"lightning": [], "plain": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for r in range(1, args.rounds + 1):
            for side in ("lightning", "plain"):
                res = lightning_round(args, batches, Path(tmp), r) if side == "lightning" else plain_round(args, batches)
                rate = args.steps * tokens_per_step / res["seconds"]
                rates[side].append(rate)
                results[side].append(res)
                print(
                    f"round {r}  {side:<9} {rate:>10,.0f} tokens/s  ({1000 * res['seconds'] / args.steps:7.1f} ms/step, "
                    f"cpu {res['cpu_seconds'] / res['seconds']:.2f}x wall, threads={res['threads']}, "
                    f"load avg {os.getloadavg()[0]:.2f})",
                    flush=True,
                )

    light, plain = results["lightning"][0], results["plain"][0]
    # The AdamW settings must match except the implementation switches (fused / foreach).
    impl = ("fused", "foreach")
    settings = [{k: v for k, v in side["defaults"].items() if k not in impl} for side in (light, plain)]
    same_settings = settings[0] == settings[1]
    same_groups = light["groups"] == plain["groups"] and same_settings
    diff = (light["losses"] - plain["losses"]).abs().max().item()
    losses_agree = torch.allclose(light["losses"], plain["losses"], rtol=LOSS_RTOL, atol=0.0)
    print(
        f"check: param groups (count, numel, wd) lightning={light['groups']} plain={plain['groups']} "
        f"{'identical' if same_groups else 'DIFFER'}; AdamW settings {'identical' if same_settings else 'DIFFER'} "
        f"(implementation: lightning fused={light['defaults'].get('fused')}, plain fused={plain['defaults'].get('fused')} "
        f"foreach={plain['defaults'].get('foreach')})"
    )
    print(
        f"check: per-step loss max |lightning - plain| over {len(plain['losses'])} steps = {diff:.2e} "
        f"(first {plain['losses'][0].item():.4f}, last {plain['losses'][-1].item():.4f}): "
        + (f"agree within rtol {LOSS_RTOL:g}" if losses_agree
           else f"DIFFER beyond rtol {LOSS_RTOL:g}: the sides do not compute the same thing")
    )
    # Secondary views for a shared machine: the median single-step time over every timed step of
    # every round (resists bursts of load from other processes, but would also hide a cost paid every
    # N steps), and tokens per second of this process's CPU time (insensitive to time spent waiting
    # for a CPU; with several threads it still counts their spinning).
    steps_ms = {
        side: [1000 * (b - a) for res in results[side] for a, b in zip(res["stamps"], res["stamps"][1:])]
        for side in results
    }
    step_ms = {side: median(v) for side, v in steps_ms.items()}
    cpu_rate = {side: median([args.steps * tokens_per_step / r["cpu_seconds"] for r in results[side]]) for side in results}
    ml, mp = median(rates["lightning"]), median(rates["plain"])
    print(f"spread: lightning {spread(rates['lightning'])}  plain {spread(rates['plain'])}")
    print(
        f"per-step median (secondary): lightning {step_ms['lightning']:.1f} ms  plain {step_ms['plain']:.1f} ms  "
        f"-> lightning/plain throughput {step_ms['plain'] / step_ms['lightning']:.3f}"
    )
    print(
        f"per CPU-second (secondary): lightning {cpu_rate['lightning']:,.0f}  plain {cpu_rate['plain']:,.0f} tokens per "
        f"process-CPU-second -> lightning/plain {cpu_rate['lightning'] / cpu_rate['plain']:.3f}"
    )
    load = os.getloadavg()
    if load[0] > threads + 0.5:
        print(f"WARNING: 1-min load average {load[0]:.2f} > {threads} threads: other processes shared the CPUs; "
              "expect noisy numbers and rerun when the machine is quiet")
    print(f"median  lightning {ml:>10,.0f} tokens/s   plain {mp:>10,.0f} tokens/s")
    print(f"ratio lightning/plain = {ml / mp:.2f}")
    print(f"(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
