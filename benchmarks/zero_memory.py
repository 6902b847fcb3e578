"""Per-rank memory of parameters + gradients + optimizer states: DDP vs DeepSpeed ZeRO-1/2/3, 2 ranks.

    python benchmarks/zero_memory.py                 # ~50M-parameter GPT, fp32, 2 CPU ranks (a few minutes)
    python benchmarks/zero_memory.py --precision bf16-mixed

Every mode trains the same GPT (lmforge's ``DecoderLM(GPT, CLM)``) for ``--steps`` steps through
the Lightning Trainer on 2 ranks (``torchrun --nproc_per_node 2``), with lmforge's strategies:
``ddp`` is Lightning's DDPStrategy with ``gradient_as_bucket_view=True`` (its leanest setting: the
gradients *are* the all-reduce buckets, so DDP holds exactly params + grads + Adam states);
``zero1/2/3`` are ``deepspeed_stage_N``, which lmforge runs on DeepSpeed's CPU accelerator over gloo.

What is measured, on each rank, right before the optimizer step of the last step (gradients of
this step, Adam states of the previous ones and the weights all alive; activations freed):

* **state**: the bytes of every distinct tensor storage alive in the process (found through the
  garbage collector, so views and flat buffers are counted once), split into parameters (the
  module's parameters, ZeRO-3's partitions), optimizer states (Adam moments and DeepSpeed's fp32
  master partitions), gradients (``.grad`` of both) and buffers (everything else: DeepSpeed's
  gradient buckets, the batch). This is the memory the strategy keeps, exactly.
* **peak RSS**: the growth of the process's peak resident memory (``VmHWM``, reset after imports
  and before the model is built) over the whole run: everything, transient buffers, optimizer
  temporaries and activations included.

Then ``lmforge estimate`` (lmforge.estimate.estimate_memory) predicts the same per-rank numbers
from the configuration alone, and the script prints its error against the measured state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"ddp": "ddp", "zero1": "deepspeed_stage_1", "zero2": "deepspeed_stage_2", "zero3": "deepspeed_stage_3"}
MB = 1024 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=16)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block", type=int, default=64, help="tokens per row")
    p.add_argument("--batch", type=int, default=1, help="rows per rank and step (kept small: states, not activations)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- measuring, inside each rank -------------------------------------------------------------------
def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def storages_of(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage") or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def census(trainer) -> dict[str, int]:
    """Bytes of distinct live tensor storages, by role (see the module docstring)."""
    import torch

    gc.collect()
    everything = storages_of(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    module = trainer.lightning_module
    params = [p for p in module.parameters()] + [getattr(p, "ds_tensor", None) for p in module.parameters()]
    optimizer = trainer.strategy.optimizers[0] if trainer.strategy.optimizers else None
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the torch AdamW
    masters = [p for g in base.param_groups for p in g["params"]] if base is not None else []
    states = [v for st in base.state.values() for v in st.values() if isinstance(v, torch.Tensor)] if base else []
    param_storages = storages_of(params)
    roles = {
        "params": param_storages,
        "optimizer": storages_of(states + [m for m in masters if m.untyped_storage().data_ptr() not in param_storages]),
        "grads": storages_of([p.grad for p in module.parameters()] + [m.grad for m in masters]),
    }
    for attr in ("averaged_gradients", "grad_partitions_flat_buffer"):  # ZeRO's own gradient partitions
        value = getattr(optimizer, attr, None)
        if isinstance(value, dict):
            value = [t for v in value.values() for t in (v if isinstance(v, list) else [v])]
        if isinstance(value, torch.Tensor):
            value = [value]
        if value:
            roles["grads"].update(storages_of(t for t in value if isinstance(t, torch.Tensor)))
    out, seen = {}, set()
    for role in ("params", "optimizer", "grads"):
        ptrs = {p: n for p, n in roles[role].items() if p in everything and p not in seen}
        seen |= set(ptrs)
        out[role] = sum(ptrs.values())
    out["buffers"] = sum(n for p, n in everything.items() if p not in seen)
    return out


def worker(args) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import quiet_lightning, random_batches

    from lmforge.strategies import resolve_strategy

    quiet_lightning()
    from lightning.pytorch.strategies import DDPStrategy
    from lmforge_plugins.architectures.gpt import GPT
    from lmforge_plugins.objectives.clm import CLM

    from lmforge.families import DecoderLM

    mode = args.worker
    strategy = DDPStrategy(gradient_as_bucket_view=True) if mode == "ddp" else resolve_strategy(MODES[mode], "cpu")
    gc.collect()  # everything is imported (DeepSpeed too): the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    rss0 = vm_kib("VmHWM")

    torch.manual_seed(0)
    model = DecoderLM(
        GPT(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, block_size=args.block),
        CLM(), warmup_steps=1, lr=1e-4,
    )
    n_params = sum(p.numel() for p in model.parameters())
    measured: dict = {}

    class Measure(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == args.steps - 1:
                measured.update(census(trainer))

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, precision=args.precision, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Measure()], use_distributed_sampler=False,
    )
    loader = DataLoader(random_batches(args.steps, args.batch, args.block, args.vocab), batch_size=None)
    trainer.fit(model, loader)
    result = {"mode": mode, "rank": trainer.global_rank, "n_params": n_params, "state": measured,
              "peak_rss_growth": (vm_kib("VmHWM") - rss0) * 1024,
              "ds_config": getattr(trainer.strategy, "config", None)}
    Path(f"{args.out}.rank{trainer.global_rank}").write_text(json.dumps(result, default=str))


# -- driving ---------------------------------------------------------------------------------------
def run_mode(mode: str, args, tmp: Path) -> list[dict]:
    out = tmp / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", mode, "--out", str(out)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("d_model", "n_layer", "n_head", "vocab", "block", "batch", "steps", "precision")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    import torch
    from lmforge_plugins.architectures.gpt import GPT

    from lmforge.estimate import estimate_memory, persistent_numel

    modes = args.modes.split(",")
    print(f"GPT d_model={args.d_model} n_layer={args.n_layer} vocab={args.vocab}, {args.precision}, 2 ranks, "
          f"batch {args.batch}x{args.block} per rank, AdamW")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            results[mode] = run_mode(mode, args, Path(tmp))
            r = results[mode][0]
            print(f"  measured {mode}: {sum(r['state'].values()) / MB:,.0f} MB", flush=True)
    n_params = results[modes[0]][0]["n_params"]
    with torch.device("meta"):  # what `lmforge estimate` does: the model's shapes, no memory
        meta_model = GPT(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                         block_size=args.block)
    assert sum(p.numel() for p in meta_model.parameters()) == n_params
    print(f"parameters: {n_params / 1e6:.1f}M\n")
    header = (f"{'mode':6} {'params':>7} {'grads':>7} {'optim':>7} {'buffers':>7} {'state':>7} {'vs DDP':>6} | "
              f"{'peak RSS':>8} {'vs DDP':>6} | {'estimate':>8} {'error':>6}")
    print(header + "\n" + "-" * len(header))
    ddp = results.get("ddp", results[modes[0]])
    base = max(sum(r["state"].values()) for r in ddp)
    base_rss = max(r["peak_rss_growth"] for r in ddp)
    worst = 0.0
    for mode in modes:
        r = max(results[mode], key=lambda x: sum(x["state"].values()))  # the fuller rank
        state = r["state"]
        total = sum(state.values())
        est = estimate_memory(
            n_params=n_params, strategy=MODES[mode], world_size=2, precision=args.precision,
            ds_config=r["ds_config"], persistent_numel=persistent_numel([meta_model]), n_layer=args.n_layer,
            d_model=args.d_model, vocab_size=args.vocab, batch_size=args.batch, seq_len=args.block, n_head=args.n_head,
            gradient_as_bucket_view=True,
        )
        err = est.state / total - 1
        worst = max(worst, abs(err))
        print(f"{mode:6} {state['params'] / MB:7.0f} {state['grads'] / MB:7.0f} {state['optimizer'] / MB:7.0f} "
              f"{state['buffers'] / MB:7.0f} {total / MB:7.0f} {total / base:5.2f}x | "
              f"{r['peak_rss_growth'] / MB:8.0f} {r['peak_rss_growth'] / base_rss:5.2f}x | "
              f"{est.state / MB:8.0f} {100 * err:+5.1f}%")
    print("\nMB per rank. state: params + grads + optimizer states (+ buffers: DeepSpeed's reduce bucket, and its fp32 "
          "master\npartition where not counted as optimizer state) alive at the optimizer step. peak RSS: growth of the "
          "process's\npeak resident memory from before the model is built (everything imported) to the end: model "
          "construction,\nDeepSpeed's setup, transient buffers, optimizer temporaries and activations included.")
    if "zero3" in results and "ddp" in results:
        ratio = max(sum(r["state"].values()) for r in results["zero3"]) / base
        print(f"ZeRO-3 / DDP state: {ratio:.2f}x (goal <= 0.6x): {'met' if ratio <= 0.6 else 'NOT met'}")
    print(f"lmforge estimate vs measured state: worst error {100 * worst:.1f}% (goal within 20%): "
          f"{'met' if worst <= 0.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
