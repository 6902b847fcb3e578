"""Training tokens/s of lmforge's EncoderLM (BERT + MLM) through the Lightning Trainer vs Hugging Face
``BertForMaskedLM`` trained by a plain PyTorch loop, on the same masked batches, in one process.

Same work on both sides:

* the same network: BERT post-LN, exact GELU, tied MLM decoder, the same shape (default: Google's
  BERT-Mini, 4 layers x 256 wide, 4 heads, its 30,522-token WordPiece vocabulary, 128 tokens per
  row), the same initial weights (the Hugging Face model's, converted with
  ``BERT.hf_state_dict_to_lmforge``), dropout 0.1 on both (hidden and attention), fp32;
* the same batches: rows of random token ids masked once, before timing, by lmforge's ``mlm``
  collator (15 %; 80/10/10), as ``{"input_ids", "labels"}`` tensors read by
  ``DataLoader(batches, batch_size=None, num_workers=0)`` on both sides (no collation in the loop);
* the same optimisation: AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8) with the same two parameter
  groups (weight decay 0.01 on matrices; none on biases, norms and embeddings), gradient clipping
  at norm 1.0 and lmforge's linear-warmup cosine ``LambdaLR``, the same torch thread count.

Lightning side: the production path, ``EncoderLM(BERT, MLM)`` with its ``configure_optimizers``,
``training_step`` and ``self.log`` calls (its AdamW is the fused kernel), a ``Trainer`` with lmforge's
``RunLogger`` (``log_every_n_steps=50``, no progress bar, summary or checkpointing) and the shipped
configs' ``TokenThroughputMonitor``. Its MLM loss projects only
the masked positions onto the vocabulary (``mlm_logits(hidden[selected])``); everything else is
the same computation.

HF side: ``for batch in loader``: ``BertForMaskedLM(input_ids=..., labels=...)`` (SDPA attention,
the transformers default), ``backward``, ``clip_grad_norm_``, ``step`` (``torch.optim.AdamW`` with
PyTorch's defaults), ``zero_grad``, ``scheduler.step``. Both loops are in ``_training.py``.

Timing: after ``warmup`` untimed steps, ``steps`` whole iterations are timed start to start
(Lightning: a Callback's ``on_train_batch_start``; HF: right after ``next(loader)``); rounds
alternate lmforge, HF, lmforge, HF, ... with a fresh model, optimizer and Trainer each, and the
medians are compared. Tokens per step are ``batch * block`` input tokens.

A correctness check runs first: with dropout off, both models' losses on the first batch must agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, quiet_lightning, set_threads, spread  # noqa: E402
from _training import CLIP, hf_loss, lightning_round, loop_round  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from lmforge import SpecialTokens  # noqa: E402
from lmforge.families import EncoderLM  # noqa: E402
from lmforge_plugins.architectures.bert import BERT  # noqa: E402
from lmforge_plugins.objectives.mlm import MLM  # noqa: E402

quiet_lightning()
transformers.logging.set_verbosity_error()

#: Optimisation settings shared by both sides.
HPARAMS = dict(lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, warmup_steps=10, schedule="cosine",
               min_lr_ratio=0.1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per round (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating (default 3)")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default: BERT's 30522)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def hf_config(args, dropout: float) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head, intermediate_size=4 * args.d_model, max_position_embeddings=args.block,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0,
    )


def make_pair(args, dropout: float) -> tuple[transformers.BertForMaskedLM, BERT]:
    """A Hugging Face model and an lmforge BERT holding the same weights."""
    torch.manual_seed(args.seed)
    hf = transformers.BertForMaskedLM(hf_config(args, dropout))
    bert = BERT(**{**BERT.options_from_hf_config({**hf.config.to_dict(), "architectures": ["BertForMaskedLM"]})})
    bert.load_state_dict(bert.hf_state_dict_to_lmforge(hf.state_dict()), strict=True)
    return hf, bert


def masked_batches(n: int, args) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random rows, masked by lmforge's mlm collator (ids 0-4 are special)."""
    special = SpecialTokens(vocab_size=args.vocab, pad_id=0, unk_id=1, cls_id=2, sep_id=3, eos_id=3, mask_id=4)
    gen = torch.Generator().manual_seed(1234)
    collate = MLM(seed=1234).collate
    rows = lambda: [{"input_ids": torch.randint(5, args.vocab, (args.block,), generator=gen).tolist()}  # noqa: E731
                    for _ in range(args.batch)]
    return [collate(rows(), special) for _ in range(n)]


# -- the two sides (the loops and their timing are in _training.py) -------------------------------


def lmforge_round(args, batches, workdir: Path, index: int):
    _, bert = make_pair(args, args.dropout)
    module = EncoderLM(architecture=bert, objective=MLM(), **HPARAMS)
    return lightning_round(module, batches, args.warmup, args.steps, workdir / f"lmforge-{index}")


def hf_round(args, batches):
    hf, _ = make_pair(args, args.dropout)
    return loop_round(hf, hf_loss, batches, HPARAMS, args.warmup, args.steps)


# -- driver ---------------------------------------------------------------------------------------


@torch.no_grad()
def check_same_computation(args, batch) -> float:
    """|loss difference| of the two models on one batch, dropout off (same weights, same inputs)."""
    hf, bert = make_pair(args, 0.0)
    module = EncoderLM(architecture=bert.eval(), objective=MLM())
    ours = module.objective.compute_loss(module, batch)["loss"]
    theirs = hf.eval()(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    return abs(ours.item() - theirs.item())


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    tokens_per_step = args.batch * args.block
    started = time.perf_counter()
    batches = masked_batches(args.warmup + args.steps + 1, args)
    masked = sum(int((b["labels"] != -100).sum()) for b in batches) / (len(batches) * tokens_per_step)
    print(
        f"encoder_throughput: EncoderLM(BERT + MLM) via Lightning vs HF BertForMaskedLM plain loop | {machine()}\n"
        f"  model: d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} d_ff={4 * args.d_model} "
        f"block={args.block} vocab={args.vocab} dropout={args.dropout} fp32 | batch={args.batch} -> "
        f"{tokens_per_step} tokens/step, {100 * masked:.1f}% masked\n"
        f"  AdamW lr={HPARAMS['lr']} wd={HPARAMS['weight_decay']} (matrices only) betas={HPARAMS['betas']}, clip "
        f"{CLIP}, LambdaLR {HPARAMS['schedule']} | transformers {transformers.__version__} (attention: sdpa)\n"
        f"  timing: {args.warmup} warmup + {args.steps} timed steps per round, {args.rounds} rounds per side "
        f"alternating, torch threads={threads}",
        flush=True,
    )
    print(f"check: first-batch loss |lmforge - HF| with dropout off = {check_same_computation(args, batches[0]):.2e}",
          flush=True)
    rates: dict[str, list[float]] = {"lmforge": [], "hf": []}
    results: dict[str, list] = {"lmforge": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for r in range(1, args.rounds + 1):
            for side in ("lmforge", "hf"):
                res = lmforge_round(args, batches, Path(tmp), r) if side == "lmforge" else hf_round(args, batches)
                rate = args.steps * tokens_per_step / res.seconds
                rates[side].append(rate)
                results[side].append(res)
                print(f"round {r}  {side:<8} {rate:>9,.0f} tokens/s  ({1000 * res.seconds / args.steps:7.1f} ms/step, "
                      f"load avg {os.getloadavg()[0]:.2f})", flush=True)
    same = results["lmforge"][0].groups == results["hf"][0].groups
    print(f"check: AdamW param groups (numel, wd) lmforge={results['lmforge'][0].groups} "
          f"hf={results['hf'][0].groups} {'identical' if same else 'DIFFER'}")
    print(f"spread: lmforge {spread(rates['lmforge'])}  hf {spread(rates['hf'])}")
    if os.getloadavg()[0] > threads + 0.5:
        print(f"WARNING: 1-min load average {os.getloadavg()[0]:.2f} > {threads} threads: other processes shared "
              "the CPUs; expect noisy numbers and rerun when the machine is quiet")
    ours, theirs = median(rates["lmforge"]), median(rates["hf"])
    print(f"median  lmforge {ours:>9,.0f} tokens/s   hf {theirs:>9,.0f} tokens/s")
    print(f"ratio lmforge/hf = {ours / theirs:.2f}")
    print(f"(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
