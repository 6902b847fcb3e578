"""Memory of `lmforge convert zero-to-safetensors`: it streams, so it never holds the model even once.

    python benchmarks/zero_consolidation.py          # a ~55M-parameter GPT, ZeRO-3 on 2 CPU ranks (about 1 minute)

1. ``torchrun --nproc_per_node 2`` trains the GPT one step with ``deepspeed_stage_3`` (lmforge's
   CPU strategy) and saves the sharded checkpoint;
2. a fresh process consolidates it into an lmforge model folder while a thread samples its
   anonymous resident memory (``RssAnon``: what the process allocated; the memory-mapped shard files
   are page cache, which the kernel can drop) every millisecond;
3. the folder is loaded with ``lmforge.load_model`` and compared with the shards.

It prints the peak growth of anonymous memory against the size of the fp32 model and of its
largest tensor: streaming means the first is about the second, not the model's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

MB = 1024 * 1024

WORKER = textwrap.dedent(
    """
    import sys, torch, lightning as L
    from torch.utils.data import DataLoader
    from lmforge.families import DecoderLM
    from lmforge.strategies import resolve_strategy
    from lmforge_plugins.architectures.gpt import GPT
    from lmforge_plugins.objectives.clm import CLM
    torch.manual_seed(0)
    model = DecoderLM(GPT(vocab_size=8192, n_layer=16, n_head=8, d_model=512, block_size=64), CLM(), warmup_steps=1)
    batches = [{"input_ids": torch.randint(0, 8192, (1, 64))}]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=resolve_strategy("deepspeed_stage_3", "cpu"),
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(sys.argv[1])
    """
)

CONSOLIDATE = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    def anon():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    import torch  # imported before the baseline: its own memory is not the conversion's
    from lmforge.zero_checkpoint import consolidate
    base, peak, stop = anon(), [0], threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = consolidate(sys.argv[1], sys.argv[2])
    stop.set(); thread.join()
    print(json.dumps({"peak_anon_growth": peak[0] - base, "deepspeed_imported": "deepspeed" in sys.modules}))
    """
)


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="It takes no options.").parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "zero3.ckpt", Path(tmp) / "model"
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        train = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                str(script), str(ckpt)], capture_output=True, text=True, env=env, check=False)
        if train.returncode != 0:
            sys.exit(f"training failed:\n{train.stderr[-4000:]}")
        shard_bytes = sum(p.stat().st_size for p in ckpt.rglob("*.pt"))
        run = subprocess.run([sys.executable, "-c", CONSOLIDATE, str(ckpt), str(out)], capture_output=True,
                             text=True, env=env, check=False)
        if run.returncode != 0:
            sys.exit(f"consolidation failed:\n{run.stderr[-4000:]}")
        measured = json.loads(run.stdout.strip().splitlines()[-1])

        import torch

        from lmforge.checkpoint import load_model
        from lmforge.zero_checkpoint import read_zero_weights

        model = load_model(out)
        state = model.state_dict()
        model_bytes = sum(t.numel() * t.element_size() for t in state.values())
        largest = max(t.numel() * t.element_size() for t in state.values())
        _, from_shards = read_zero_weights(ckpt)
        same = all(torch.equal(state[k], from_shards[k]) for k in state)
    print(f"ZeRO-3 checkpoint of 2 ranks: {shard_bytes / MB:,.0f} MB of shards (weights + Adam states)")
    print(f"consolidated fp32 model: {model_bytes / MB:,.0f} MB in {len(state)} tensors, the largest {largest / MB:,.1f} MB")
    print(f"peak anonymous memory growth while consolidating: {measured['peak_anon_growth'] / MB:,.1f} MB "
          f"= {measured['peak_anon_growth'] / model_bytes:.2f}x the model, "
          f"{measured['peak_anon_growth'] / largest:.1f}x its largest tensor")
    print(f"loaded folder equals the shards: {same}; DeepSpeed imported by the conversion: "
          f"{measured['deepspeed_imported']}")


if __name__ == "__main__":
    main()
