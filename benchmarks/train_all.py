"""Training tokens/s of every lmforge family through the Lightning Trainer against two references, in
one process, and a table of the six ratios.

For each family (decoder: ``DecoderLM(GPT + CLM)``; encoder: ``EncoderLM(BERT + MLM)``; seq2seq:
``Seq2SeqLM(T5 + span_corruption)``) three sides train the same network from the same initial
weights on the same pre-made batches, alternating round by round (lmforge, plain, transformers,
lmforge, ...):

* ``lmforge``: the production path, the family module with its own ``configure_optimizers``,
  ``training_step``, ``self.log`` calls and training guard, in a ``Trainer`` with lmforge's
  ``RunLogger``, as ``lmforge fit`` trains it;
* ``plain PyTorch``: lmforge's own architecture in a hand-written loop that writes the objective's
  loss out in a few lines of tensor code (what someone would write without Lightning or lmforge);
* ``transformers``: the Hugging Face model of the same shape (``GPT2LMHeadModel``,
  ``BertForMaskedLM``, ``T5ForConditionalGeneration``) loaded with the lmforge model's weights
  converted by the architecture's own HF converters, in the same hand-written loop, computing its
  loss with ``model(input_ids=..., labels=...).loss``.

Shapes, batches and optimiser settings are those of the per-family scripts (``train_throughput.py``,
``encoder_throughput.py``, ``seq2seq_throughput.py``), imported from them: pass a script's own options
through ``--decoder-args``/``--encoder-args``/``--seq2seq-args``. The loops and timing are in
``_training.py``.

Optimisation is the same on every side (AdamW groups and settings, clipping, schedule, fp32) except
the AdamW implementation: lmforge picks the fused kernel, the two loops use PyTorch's default
(foreach), as a plain loop is written.

Checks printed before the table: with dropout off, the lmforge and transformers models give the same
loss on the first batch; the lmforge and plain sides give the same loss at every step of a round
(within a relative 1e-4: fused and foreach AdamW round differently); all sides use AdamW groups of
the same sizes and weight decays.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import encoder_throughput
import seq2seq_throughput
import train_throughput
import transformers
from _common import machine, quiet_lightning, random_batches, set_threads
from _training import LOSS_RTOL, alternate, hf_loss, lightning_round, loop_round, median_rate
from lmforge_plugins.objectives.clm import CLM
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.objectives.span_corruption import SpanCorruption

from lmforge.families import DecoderLM, EncoderLM, Seq2SeqLM

quiet_lightning()
transformers.logging.set_verbosity_error()

IGNORE_INDEX = -100
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
REFERENCES = {"plain": "plain PyTorch", "hf": "transformers"}
#: The issue's goals (lmforge / reference); the plain comparisons of encoder and seq2seq have none.
GOALS = {("decoder", "plain"): 1.0, ("decoder", "hf"): 1.1, ("encoder", "hf"): 1.1, ("seq2seq", "hf"): 1.1}


@dataclass
class Family:
    """What one family's comparison needs: models, losses and batches (shapes from its own script)."""

    name: str
    title: str
    shape: str
    hparams: dict
    batches: list[dict[str, torch.Tensor]]
    tokens_per_step: int
    lmforge: Callable[[], torch.nn.Module]
    plain: Callable[[], torch.nn.Module]
    plain_loss: LossFn
    hf: Callable[[], torch.nn.Module]
    hf_loss: LossFn
    hf_check: Callable[[dict[str, torch.Tensor]], float]  # |lmforge - HF| loss on a batch, dropout off


# -- decoder: GPT + CLM ---------------------------------------------------------------------------


def clm_loss(gpt: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over every position (unpadded rows), as CLM computes it."""
    input_ids = batch["input_ids"]
    logits = gpt.logits(gpt(input_ids))  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))


def decoder(argv: list[str], seed_batches: int = 1234) -> Family:
    args = train_throughput.parse_args(argv)

    def gpt():
        torch.manual_seed(args.seed)
        return train_throughput.make_gpt(args)

    def gpt2(model=None):
        """GPT2LMHeadModel holding the lmforge GPT's weights (GPT-2 layout: same math, Conv1D weights)."""
        model = model or gpt()
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**model.hf_config()))
        missing, unexpected = hf.load_state_dict(model.lmforge_state_dict_to_hf(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"GPT -> GPT2LMHeadModel conversion: missing {missing}, unexpected {unexpected}")
        return hf

    @torch.no_grad()
    def check(batch) -> float:
        ours = DecoderLM(architecture=gpt().eval(), objective=CLM())
        theirs = gpt2(ours.architecture).eval()
        a = ours.objective.compute_loss(ours, batch)["loss"]
        b = theirs(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return (a - b).abs().item()

    batches = random_batches(args.warmup + args.steps + 1, args.batch, args.block, args.vocab, seed=seed_batches)
    for b in batches:
        b["labels"] = b["input_ids"]  # what transformers wants; lmforge's CLM reads input_ids only
    return Family(
        "decoder", "DecoderLM(GPT + CLM) vs GPT2LMHeadModel",
        f"d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} block={args.block} vocab={args.vocab} "
        f"dropout=0 batch={args.batch}",
        train_throughput.HPARAMS, batches, args.batch * args.block,
        lmforge=lambda: DecoderLM(architecture=gpt(), objective=CLM(), **train_throughput.HPARAMS),
        plain=gpt, plain_loss=clm_loss, hf=gpt2, hf_loss=hf_loss, hf_check=check,
    )


# -- encoder: BERT + MLM --------------------------------------------------------------------------


def mlm_loss(bert: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy at the masked positions only, projected onto the vocabulary (as MLM does)."""
    labels = batch["labels"]
    hidden = bert(batch["input_ids"])  # (B, T, C)
    selected = labels != IGNORE_INDEX  # (B, T)
    return F.cross_entropy(bert.mlm_logits(hidden[selected]), labels[selected])


def encoder(argv: list[str]) -> Family:
    args = encoder_throughput.parse_args(argv)
    pair = lambda: encoder_throughput.make_pair(args, args.dropout)
    return Family(
        "encoder", "EncoderLM(BERT + MLM) vs BertForMaskedLM",
        f"d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} block={args.block} vocab={args.vocab} "
        f"dropout={args.dropout} batch={args.batch}",
        encoder_throughput.HPARAMS, encoder_throughput.masked_batches(args.warmup + args.steps + 1, args),
        args.batch * args.block,
        lmforge=lambda: EncoderLM(architecture=pair()[1], objective=MLM(), **encoder_throughput.HPARAMS),
        plain=lambda: pair()[1], plain_loss=mlm_loss, hf=lambda: pair()[0], hf_loss=hf_loss,
        hf_check=lambda batch: encoder_throughput.check_same_computation(args, batch),
    )


# -- seq2seq: T5 + span corruption ----------------------------------------------------------------


def span_corruption_loss(t5: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced cross-entropy on the targets (decoder input: the start token, then labels[:-1])."""
    labels = batch["labels"]  # (B, T)
    start = t5.decoder_start_token_id
    decoder_input_ids = labels.new_full(labels.shape, start)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids.masked_fill_(decoder_input_ids == IGNORE_INDEX, start)
    logits = t5.logits(t5(batch["input_ids"], decoder_input_ids, attention_mask=batch.get("attention_mask")))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def seq2seq(argv: list[str]) -> Family:
    args = seq2seq_throughput.parse_args(argv)
    batches, target_length = seq2seq_throughput.make_batches(args, args.warmup + args.steps + 1)
    return Family(
        "seq2seq", "Seq2SeqLM(T5 + span_corruption) vs T5ForConditionalGeneration",
        f"d_model={args.d_model} d_ff={args.d_ff} {args.n_layer}+{args.n_layer} layers n_head={args.n_head} "
        f"{args.feed_forward} vocab={args.vocab} dropout={args.dropout} batch={args.batch} x (inputs {args.block} + "
        f"targets {target_length}); HF attention={args.hf_attention}",
        seq2seq_throughput.HPARAMS, batches, args.batch * (args.block + target_length),
        lmforge=lambda: Seq2SeqLM(architecture=seq2seq_throughput.make_t5(args), objective=SpanCorruption(seed=args.seed),
                                  **seq2seq_throughput.HPARAMS),
        plain=lambda: seq2seq_throughput.make_t5(args), plain_loss=span_corruption_loss,
        hf=lambda: seq2seq_throughput.make_hf(args), hf_loss=hf_loss,
        hf_check=lambda batch: seq2seq_throughput.initial_loss_difference(args, batch),
    )


FAMILIES = {"decoder": decoder, "encoder": encoder, "seq2seq": seq2seq}


# -- driver ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="decoder,encoder,seq2seq", help="comma-separated (default: all three)")
    p.add_argument("--references", default="plain,hf", help="comma-separated: plain, hf (default: both)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: all CPUs)")
    for name in FAMILIES:
        p.add_argument(f"--{name}-args", default="", metavar="OPTIONS",
                       help=f"shape options for {name}, as its own script takes them, e.g. '--d_model 128 --batch 4'")
    args = p.parse_args(argv)
    for option, allowed in (("families", FAMILIES), ("references", REFERENCES)):
        values = [v.strip() for v in getattr(args, option).split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            p.error(f"--{option}: unknown {unknown or 'empty'}; choose from {', '.join(allowed)}")
        setattr(args, option, values)
    return args


def compare(family: Family, references: list[str], args, workdir: Path) -> list[dict]:
    """Alternate the sides of one family; return one table row per reference."""
    w, s = args.warmup, args.steps
    print(f"\n{family.name}: {family.title} | {family.shape} | {family.tokens_per_step} tokens/step", flush=True)
    hf_diff = family.hf_check(family.batches[0]) if "hf" in references else None
    if hf_diff is not None:
        print(f"  check: first-batch loss |lmforge - transformers| with dropout off = {hf_diff:.2e}", flush=True)
    sides = {"lmforge": lambda r: lightning_round(family.lmforge(), family.batches, w, s, workdir / f"{family.name}-{r}")}
    if "plain" in references:
        sides["plain"] = lambda r: loop_round(family.plain(), family.plain_loss, family.batches, family.hparams, w, s)
    if "hf" in references:
        sides["hf"] = lambda r: loop_round(family.hf(), family.hf_loss, family.batches, family.hparams, w, s)
    results = alternate(sides, args.rounds, family.tokens_per_step, s, label=f"{family.name} ")
    ours = results["lmforge"]
    rows = []
    for ref in references:
        theirs = results[ref]
        same_groups = ours[0].groups == theirs[0].groups
        if ref == "plain":
            a, b = ours[0].losses, theirs[0].losses
            agree = torch.allclose(a, b, rtol=LOSS_RTOL, atol=0.0)
            check = (f"per-step losses max|diff| {(a - b).abs().max().item():.1e} over {w + s} steps: "
                     + (f"agree within rtol {LOSS_RTOL:g}" if agree else f"DIFFER beyond rtol {LOSS_RTOL:g}"))
        else:
            check = f"first-batch loss |diff| {hf_diff:.1e}"
        check += "; AdamW groups " + ("identical" if same_groups else f"DIFFER {ours[0].groups} vs {theirs[0].groups}")
        check += f" (fused: lmforge {ours[0].fused}, {ref} {theirs[0].fused})"
        rate = lambda res, cpu=False: median_rate(res, family.tokens_per_step, s, cpu)
        rows.append({
            "name": f"{family.name} vs {REFERENCES[ref]}", "ours": rate(ours), "theirs": rate(theirs),
            "ratio": rate(ours) / rate(theirs), "cpu_ratio": rate(ours, True) / rate(theirs, True),
            "goal": GOALS.get((family.name, ref)), "check": check,
        })
        print(f"  check ({REFERENCES[ref]}): {check}", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    started = time.perf_counter()
    print(f"train_all: lmforge (Lightning) vs {' and '.join(REFERENCES[r] for r in args.references)} | {machine()}, "
          f"transformers {transformers.__version__}\n  {args.warmup} warmup + {args.steps} timed steps per round, "
          f"{args.rounds} rounds per side alternating, torch threads={threads}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for name in args.families:
            timing = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
            family = FAMILIES[name](timing + shlex.split(getattr(args, f"{name}_args")))
            rows.extend(compare(family, args.references, args, Path(tmp)))
    load = os.getloadavg()[0]
    print(f"\n{'comparison':<32} {'lmforge tok/s':>13} {'reference tok/s':>15} {'ratio':>7} {'goal':>7} {'CPU-time ratio':>14}")
    for row in rows:
        goal = f">= {row['goal']:.1f}" if row["goal"] else "-"
        met = "" if not row["goal"] else ("  met" if row["ratio"] >= row["goal"] else "  NOT met")
        print(f"{row['name']:<32} {row['ours']:>13,.0f} {row['theirs']:>15,.0f} {row['ratio']:>7.3f} {goal:>7} "
              f"{row['cpu_ratio']:>14.2f}{met}")
    if load > threads + 0.5:
        print(f"WARNING: 1-min load average {load:.2f} > {threads} threads: other processes shared the CPUs; "
              "expect noisy numbers and rerun when the machine is quiet")
    print(f"(load average at the end {load:.2f}; total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
