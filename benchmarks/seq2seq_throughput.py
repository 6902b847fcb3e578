"""Training tokens/s of lmforge's Seq2SeqLM (T5 + span corruption) through the Lightning Trainer vs
Hugging Face ``T5ForConditionalGeneration`` of the same shape, in the same run.

Both sides train the same network (the Hugging Face model is built from ``T5.hf_config()`` and
loaded with the lmforge model's initial weights, so the two start identical) on the same
pre-collated span-corruption batches, with the same AdamW parameter groups and hyper-parameters,
gradient clipping at norm 1.0, the same LambdaLR schedule and the same dropout, in fp32 with the
same number of torch threads.

* lmforge side: the production path. ``Seq2SeqLM(T5, SpanCorruption)`` with its own
  ``configure_optimizers`` (fused AdamW), ``training_step`` and ``self.log`` calls, in a ``Trainer``
  with the lmforge ``RunLogger`` (CSV), ``log_every_n_steps=50``, the shipped configs'
  ``TokenThroughputMonitor``, no progress bar/summary/checkpointing.
* Hugging Face side: a plain loop: ``model(input_ids=..., labels=...)`` (its own shift-right and
  cross-entropy), backward, ``clip_grad_norm_(1.0)``, ``optimizer.step()`` (``torch.optim.AdamW``
  with PyTorch's defaults), ``zero_grad``, ``scheduler.step()``. Both loops are in
  ``_training.py``. Attention is transformers' default for T5 (``sdpa``; ``--hf_attention
  eager`` for the other).

Data: rows of random token ids of ``SpanCorruption.packed_length(block)`` tokens, corrupted once by
the objective's collate (inputs exactly ``block`` tokens, targets ``target_length``); both sides
iterate ``DataLoader(batches, batch_size=None)`` over that one list.

Timing: per round, ``steps`` whole iterations after ``warmup`` untimed ones; rounds alternate
(lmforge, HF, lmforge, HF, ...), each with a fresh model, optimizer (and Trainer) built outside
the timed window; the medians over rounds are compared. Tokens per step = encoder input tokens
+ target tokens. A check prints the loss difference of the two initial models on the first batch.

    python benchmarks/seq2seq_throughput.py            # the shape of configs/t5-tiny-span.yaml
    python benchmarks/seq2seq_throughput.py --d_model 256 --d_ff 1024 --n_layer 4 --batch 8 --dropout 0.1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, quiet_lightning, set_threads, spread  # noqa: E402
from _training import hf_loss, lightning_round, loop_round  # noqa: E402

from lmforge import SpecialTokens  # noqa: E402
from lmforge.families import Seq2SeqLM  # noqa: E402
from lmforge_plugins.architectures.t5 import T5  # noqa: E402
from lmforge_plugins.objectives.span_corruption import SpanCorruption  # noqa: E402

quiet_lightning()

#: Optimisation settings shared by both sides (the family module's defaults, written out).
HPARAMS = dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, warmup_steps=100, schedule="cosine",
               min_lr_ratio=0.1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round (default 3)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per side, alternating (default 8)")
    # The defaults are the shape of configs/t5-tiny-span.yaml.
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--d_ff", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=2, help="encoder and decoder blocks each (default 2)")
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block", type=int, default=128, help="encoder input length (default 128)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1125, help="the shipped tokenizer_t5.json's size (default 1125)")
    p.add_argument("--dropout", type=float, default=0.0, help="on both sides (default 0.0, as in the config)")
    p.add_argument("--feed_forward", choices=["relu", "gated-gelu"], default="gated-gelu")
    p.add_argument("--hf_attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_t5(args) -> T5:
    torch.manual_seed(args.seed)
    return T5(vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff, n_layer=args.n_layer,
              n_head=args.n_head, dropout=args.dropout, feed_forward=args.feed_forward, tie_embeddings=False)


def make_hf(args):
    """The Hugging Face model of the same shape, holding the lmforge model's initial weights."""
    import transformers

    t5 = make_t5(args)
    config = transformers.T5Config(**t5.hf_config())
    config._attn_implementation = args.hf_attention
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))  # v1.1: untied head
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    missing = model.load_state_dict(t5.lmforge_state_dict_to_hf(), strict=False).missing_keys
    assert set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}, missing
    return model


def make_batches(args, n: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    objective = SpanCorruption(seed=args.seed)
    length = objective.packed_length(args.block)
    sentinels = tuple(range(args.vocab - 1, args.vocab - 101, -1))
    special = SpecialTokens(vocab_size=args.vocab, pad_id=1, eos_id=0, sentinel_ids=sentinels)
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(n):
        rows = [{"input_ids": rng.integers(2, args.vocab - 101, length).tolist()} for _ in range(args.batch)]
        batches.append(objective.collate(rows, special))
    return batches, objective.target_length(args.block)


# -- the two sides (the loops and their timing are in _training.py) -------------------------------


def lmforge_round(args, batches, workdir: Path, index: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of the timed window: CPU time is the steadier on a shared machine."""
    module = Seq2SeqLM(architecture=make_t5(args), objective=SpanCorruption(seed=args.seed), **HPARAMS)
    res = lightning_round(module, batches, args.warmup, args.steps, workdir / f"lmforge-{index}")
    return res.seconds, res.cpu_seconds


def hf_round(args, batches) -> tuple[float, float]:
    res = loop_round(make_hf(args), hf_loss, batches, HPARAMS, args.warmup, args.steps)
    return res.seconds, res.cpu_seconds


@torch.no_grad()
def initial_loss_difference(args, batch) -> float:
    """Both initial models in eval mode on one batch: the same network gives the same loss."""
    ours = Seq2SeqLM(architecture=make_t5(args), objective=SpanCorruption()).eval()
    theirs = make_hf(args).eval()
    a = ours.objective.compute_loss(ours, batch)["loss"]
    b = theirs(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    return (a - b).abs().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    batches, target_length = make_batches(args, args.warmup + args.steps + 1)
    tokens_per_step = args.batch * (args.block + target_length)
    print(
        f"seq2seq_throughput: Seq2SeqLM(T5 + span_corruption) via Lightning vs transformers T5ForConditionalGeneration"
        f" | {machine()}\n"
        f"  model: d_model={args.d_model} d_ff={args.d_ff} {args.n_layer}+{args.n_layer} layers n_head={args.n_head} "
        f"{args.feed_forward} untied vocab={args.vocab} dropout={args.dropout} fp32 | HF attention={args.hf_attention}\n"
        f"  batch={args.batch} x (inputs {args.block} + targets {target_length}) = {tokens_per_step} tokens/step; "
        f"AdamW lr={HPARAMS['lr']} wd={HPARAMS['weight_decay']} (matrices only), clip 1.0, LambdaLR cosine\n"
        f"  timing: {args.warmup} warmup + {args.steps} timed steps per round, {args.rounds} rounds per side "
        f"alternating, torch threads={threads}",
        flush=True,
    )
    print(f"check: initial loss |lmforge - transformers| on batch 0 = {initial_loss_difference(args, batches[0]):.2e}")
    rates: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    cpu_rates: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for r in range(1, args.rounds + 1):
            for side in rates:
                wall, cpu = lmforge_round(args, batches, Path(tmp), r) if side == "lmforge" else hf_round(args, batches)
                rates[side].append(args.steps * tokens_per_step / wall)
                cpu_rates[side].append(args.steps * tokens_per_step / cpu)
                print(f"round {r}  {side:<12} {rates[side][-1]:>9,.0f} tokens/s  ({1000 * wall / args.steps:7.1f} ms/step; "
                      f"CPU {1000 * cpu / args.steps:7.1f} ms/step)", flush=True)
    ours, theirs = median(rates["lmforge"]), median(rates["transformers"])
    cpu_ratio = median(cpu_rates["lmforge"]) / median(cpu_rates["transformers"])
    print(f"spread: lmforge {spread(rates['lmforge'])}  transformers {spread(rates['transformers'])}")
    paired = median([a / b for a, b in zip(rates["lmforge"], rates["transformers"])])
    print(f"check: median of the per-round ratios (adjacent in time) = {paired:.2f}; per CPU second "
          f"(process time, all threads) = {cpu_ratio:.2f}")
    print(f"median  lmforge {ours:>9,.0f} tokens/s   transformers {theirs:>9,.0f} tokens/s")
    print(f"ratio lmforge/transformers = {ours / theirs:.2f}")
    print(f"(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
