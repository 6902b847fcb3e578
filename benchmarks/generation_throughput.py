"""Generation tokens/s of lmforge's engine (``generate_batch``, KV cache) vs Hugging Face ``generate``
on the same GPT-2 weights, in the same run; and how flat lmforge's per-token time stays as the
cache fills.

Setup: a randomly initialised ``transformers.GPT2LMHeadModel`` (``--d_model``, ``--n_layer``,
``--n_head``, ``--vocab``, 1024 positions), saved with ``save_pretrained`` and converted with
lmforge's ``lmforge convert`` machinery (``lmforge.convert.architecture_from_hf``: the folder's
``config.json`` -> ``GPT.options_from_hf_config``, weights -> ``GPT.hf_state_dict_to_lmforge``).
Both run in fp32 on the CPU with the same torch thread count, under ``torch.inference_mode`` (HF
``generate`` runs under ``no_grad`` by itself).

Work: greedy decoding of ``--new_tokens`` (default 256) tokens after a ``--prompt`` (default 16)
token random prompt, at batch 1 and batch 8 (rows of the same length: no padding), with no stop
token on either side, so both generate exactly the same number of tokens. Before any timing the
script checks that the two produce identical tokens at both batch sizes and stops if not.

Timing: ``rounds`` rounds; each round times, in turn, HF then lmforge at batch 1, then HF then
lmforge at batch 8 (alternating, so that both sides see the same machine load), each call timed
whole with ``time.perf_counter`` (prompt processing included). tokens/s = batch x new tokens /
seconds; the medians over rounds are compared (``ratio lmforge/hf``, goal >= 1.5). A secondary
column compares the medians of the process CPU time of the same calls (less sensitive to waiting
for a CPU on a shared machine; with several threads it also counts their spin-waiting).

Per-token time: one lmforge greedy run of ``--long_tokens`` (default 528) new tokens at batch 1
per round, timestamping every token as it arrives (the ``on_token`` callback); the median step
time over tokens 8-24 is compared with tokens 504-520 (``ratio 512th/16th``, goal <= 1.2: the
cost of a step should hardly grow with the cache). HF's numbers are printed alongside (its
``streamer`` hook), for reference.

    python benchmarks/generation_throughput.py
    python benchmarks/generation_throughput.py --rounds 5 --d_model 128 --n_layer 4 --vocab 4096 --threads 2
    python benchmarks/generation_throughput.py --rounds 1 --new_tokens 16 --long_tokens 40   # smoke test (~10 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, set_threads  # noqa: E402

from lmforge.convert import architecture_from_hf  # noqa: E402
from lmforge.generation import GenerationConfig, generate_batch  # noqa: E402

BATCHES = (1, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--new_tokens", type=int, default=256, help="new tokens per throughput call (default 256)")
    p.add_argument("--long_tokens", type=int, default=528, help="new tokens of the per-token timing run (default 528)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_models(args):
    """A random HF GPT-2 and the lmforge GPT converted from its saved folder (the convert path)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=1024, n_embd=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder, safe_serialization=True)
        lm = architecture_from_hf(folder).eval()
    return hf, lm


def hf_generate(hf, prompts: torch.Tensor, new_tokens: int, streamer=None) -> torch.Tensor:
    import transformers

    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, num_beams=1,
        pad_token_id=0, eos_token_id=None,
    )
    out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config,
                      streamer=streamer)
    return out[:, prompts.size(1):]


def lm_generate(lm, prompts: torch.Tensor, new_tokens: int, on_token=None) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=new_tokens, greedy=True)
    rows = generate_batch(lm, "decoder", prompts.tolist(), config, pad_id=None, eos_id=None, on_token=on_token)
    return [row[0] for row in rows]


class Stamps:
    """Wall-clock time at each new token: lmforge's ``on_token`` callback and HF's streamer (``put``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def __call__(self, _tokens) -> None:
        self.times.append(time.perf_counter())

    def put(self, _value) -> None:  # HF calls put() with the prompt first, then once per new token
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_ms(self, first: int, last: int) -> float:
        """Median time (ms) between consecutive tokens, for tokens ``first..last`` (1-based)."""
        gaps = [self.times[i] - self.times[i - 1] for i in range(first - 1, last)]
        return 1000 * median(gaps)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = set_threads(args.threads)
    hf, lm = build_models(args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = {b: torch.randint(1, args.vocab, (b, args.prompt), generator=gen) for b in BATCHES}
    print(f"machine: {machine()}, threads {threads}")
    print(f"model: GPT-2 d_model {args.d_model}, {args.n_layer} layers, {args.n_head} heads, vocab {args.vocab}; "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy, fp32")

    with torch.inference_mode():
        for b in BATCHES:  # the same computation first: identical greedy tokens
            expected = hf_generate(hf, prompts[b], args.new_tokens).tolist()
            got = lm_generate(lm, prompts[b], args.new_tokens)
            if got != expected:
                row = next(i for i in range(b) if got[i] != expected[i])
                step = next(i for i, (x, y) in enumerate(zip(got[row], expected[row])) if x != y)
                print(f"MISMATCH at batch {b}: row {row} differs first at new token {step}; not timing.")
                return 1
            print(f"check: batch {b}: {b * args.new_tokens} greedy tokens identical to transformers generate")

        seconds = {(side, b): [] for side in ("hf", "lmforge") for b in BATCHES}
        cpu_seconds = {key: [] for key in seconds}
        lm_step, hf_step = {16: [], 512: []}, {16: [], 512: []}
        long_ok = args.prompt + args.long_tokens <= 1024 and args.long_tokens >= 520
        for r in range(args.rounds):
            line = []
            for b in BATCHES:
                for side, run in (("hf", hf_generate), ("lmforge", lm_generate)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    run(hf if side == "hf" else lm, prompts[b], args.new_tokens)
                    seconds[(side, b)].append(time.perf_counter() - t0)
                    cpu_seconds[(side, b)].append(time.process_time() - c0)
                    line.append(f"{side} b{b} {b * args.new_tokens / seconds[(side, b)][-1]:,.0f} tok/s")
            if long_ok:
                stamps = Stamps()
                lm_generate(lm, prompts[1], args.long_tokens, on_token=stamps)
                hf_stamps = Stamps()
                hf_generate(hf, prompts[1], args.long_tokens, streamer=hf_stamps)
                for n, store, s in ((16, lm_step, stamps), (512, lm_step, stamps), (16, hf_step, hf_stamps),
                                    (512, hf_step, hf_stamps)):
                    store[n].append(s.step_ms(n - 8, n + 8))
                line.append(f"lmforge step@16 {lm_step[16][-1]:.3f} ms @512 {lm_step[512][-1]:.3f} ms")
            print(f"round {r + 1}/{args.rounds} (load {load()}): " + ", ".join(line))

    print()
    print(f"{'batch':>5}  {'hf tok/s':>10}  {'lmforge tok/s':>13}  {'ratio lmforge/hf':>16}  {'CPU-time ratio':>14}"
          "  (goal >= 1.5)")
    for b in BATCHES:
        hf_tps = b * args.new_tokens / median(seconds[("hf", b)])
        lm_tps = b * args.new_tokens / median(seconds[("lmforge", b)])
        cpu_ratio = median(cpu_seconds[("hf", b)]) / median(cpu_seconds[("lmforge", b)])
        print(f"{b:>5}  {hf_tps:>10,.0f}  {lm_tps:>13,.0f}  {lm_tps / hf_tps:>16.2f}  {cpu_ratio:>14.2f}")
    if long_ok:
        lm16, lm512 = median(lm_step[16]), median(lm_step[512])
        hf16, hf512 = median(hf_step[16]), median(hf_step[512])
        print("per-token time, batch 1 (median over tokens n-8..n+8, then over rounds):")
        print(f"  lmforge: 16th {lm16:.3f} ms, 512th {lm512:.3f} ms, ratio 512th/16th {lm512 / lm16:.2f} (goal <= 1.2)")
        print(f"  hf:      16th {hf16:.3f} ms, 512th {hf512:.3f} ms, ratio 512th/16th {hf512 / hf16:.2f}")
    else:
        print("per-token time: skipped (needs --long_tokens >= 520 and prompt + long_tokens <= 1024)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
