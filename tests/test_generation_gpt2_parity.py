"""The generation engine on a decoder (GPT-2) against Hugging Face ``generate`` on the same weights.

One tiny random ``GPT2LMHeadModel`` is converted with ``GPT.hf_state_dict_to_lmforge``. The batch
has prompts of three lengths, so lmforge left-pads them (positions restart at each row's first real
token, padding masked) exactly as HF does with an attention mask. Sampling draws from the same
RNG stream: lmforge's seeded generator against the global one after ``torch.manual_seed``.
"""

from __future__ import annotations

import pytest
import torch
from lmforge_plugins.architectures.gpt import GPT

from lmforge import LmforgeError
from lmforge.generation import GenerationConfig, generate_batch

transformers = pytest.importorskip("transformers")

V, PAD, MAX_NEW = 97, 0, 10
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # large random weights: clear choices, no near-ties between tokens
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    lm = GPT(**GPT.options_from_hf_config(config.to_dict())).eval()
    lm.load_state_dict(lm.hf_state_dict_to_lmforge(hf.state_dict()), strict=True)
    # As EOS, a token that row 1 produces early in its greedy output: rows then stop at different steps.
    free = generate_batch(lm, "decoder", PROMPTS, GenerationConfig(MAX_NEW, greedy=True), pad_id=PAD, eos_id=None)
    eos = free[1][0][2]
    return hf, lm, eos


def hf_generate(hf, prompts, eos, **options) -> list[list[int]]:
    """HF ``generate`` on the left-padded batch; each sequence cut before its first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=eos, **options)
    rows = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def lm_generate(lm, eos, prompts=PROMPTS, **options) -> list[list[int]]:
    """lmforge's sequences in HF's layout: every sequence of prompt 0, then of prompt 1, ..."""
    results = generate_batch(lm, "decoder", prompts, GenerationConfig(MAX_NEW, **options), pad_id=PAD, eos_id=eos)
    return [sequence for sequences in results for sequence in sequences]


def test_greedy_equals_transformers_and_per_prompt_and_uncached(models):
    hf, lm, eos = models
    expected = hf_generate(hf, PROMPTS, eos, do_sample=False)
    batched = lm_generate(lm, eos, greedy=True)
    assert batched == expected
    assert [len(s) for s in batched] != [MAX_NEW] * 3 and any(len(s) < MAX_NEW for s in batched)  # EOS was hit
    assert batched == [lm_generate(lm, eos, [p], greedy=True)[0] for p in PROMPTS]  # padding changes nothing
    assert batched == lm_generate(lm, eos, greedy=True, use_cache=False)


def test_sampling_with_a_seed_equals_transformers(models):
    hf, lm, eos = models
    torch.manual_seed(5)
    expected = hf_generate(hf, PROMPTS, eos, do_sample=True, top_k=0, temperature=0.9, num_return_sequences=3)
    got = lm_generate(lm, eos, temperature=0.9, seed=5, num_return_sequences=3)
    assert got == expected
    for prompt in range(len(PROMPTS)):  # three distinct samples per prompt
        samples = got[3 * prompt : 3 * prompt + 3]
        assert len({tuple(s) for s in samples}) == 3
    assert got == lm_generate(lm, eos, temperature=0.9, seed=5, num_return_sequences=3)
    assert got != lm_generate(lm, eos, temperature=0.9, seed=6, num_return_sequences=3)


def test_filters_and_repetition_penalty_equal_transformers(models):
    hf, lm, eos = models
    options = {"top_k": 8, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.3, "temperature": 1.2}
    torch.manual_seed(7)
    expected = hf_generate(hf, PROMPTS, eos, do_sample=True, **options)
    assert lm_generate(lm, eos, seed=7, **options) == expected
    greedy_penalised = hf_generate(hf, PROMPTS, eos, do_sample=False, repetition_penalty=1.5)
    assert lm_generate(lm, eos, greedy=True, repetition_penalty=1.5) == greedy_penalised
    assert greedy_penalised != hf_generate(hf, PROMPTS, eos, do_sample=False)  # the penalty did something


@pytest.mark.parametrize("num_beams,num_return_sequences,length_penalty,early_stopping", [(3, 2, 1.0, False), (4, 1, 0.5, True)])
def test_beam_search_equals_transformers(models, num_beams, num_return_sequences, length_penalty, early_stopping):
    hf, lm, eos = models
    options = {"num_beams": num_beams, "num_return_sequences": num_return_sequences,
               "length_penalty": length_penalty, "early_stopping": early_stopping}
    expected = hf_generate(hf, PROMPTS, eos, do_sample=False, **options)
    assert lm_generate(lm, eos, **options) == expected
    assert lm_generate(lm, eos, use_cache=False, **options) == expected
    if num_return_sequences == 1:
        assert expected != lm_generate(lm, eos, greedy=True)  # beam search is not just greedy here


def test_stop_tokens_and_stop_strings_end_where_expected(models):
    _, lm, _ = models
    free = lm_generate(lm, None, greedy=True)
    stop = free[0][3]
    stopped = lm_generate(lm, None, greedy=True, stop_token_ids=(stop,))
    assert stopped == [s[: s.index(stop)] if stop in s else s for s in free]  # the stop token is left out

    def decode(ids: list[int]) -> str:  # one letter per token, two for ids >= 50: tokens of unequal width
        return "".join(chr(ord("a") + i % 26) * (1 + (i >= 50)) for i in ids)

    target = decode(free[2])[4:7]  # three letters from the middle of row 2's text
    results = generate_batch(lm, "decoder", PROMPTS, GenerationConfig(MAX_NEW, greedy=True, stop_strings=(target,)),
                             pad_id=PAD, eos_id=None, decode=decode)
    for row, (got,) in zip(free, results):
        text = decode(row)
        if target not in text:
            assert got == row
            continue
        # tokens up to and including the one that completes the first occurrence of the stop string
        end = next(n for n in range(1, len(row) + 1) if target in decode(row[:n]))
        assert got == row[:end]
    assert results[2][0] != free[2]


def test_streaming_callback_sees_exactly_the_results(models):
    _, lm, eos = models
    seen: list[list[int]] = [[] for _ in range(6)]

    def on_token(tokens):
        assert len(tokens) == 6
        for row, token in enumerate(tokens):
            if token is not None:
                seen[row].append(token)

    results = generate_batch(lm, "decoder", PROMPTS, GenerationConfig(MAX_NEW, seed=1, num_return_sequences=2),
                             pad_id=PAD, eos_id=eos, on_token=on_token)
    assert seen == [sequence for sequences in results for sequence in sequences]


def test_bad_configurations_are_refused_by_name(models):
    _, lm, eos = models
    cases = [
        (GenerationConfig(greedy=True, num_return_sequences=2), "num_return_sequences"),
        (GenerationConfig(num_beams=2, top_k=5), "top_k is set"),
        (GenerationConfig(num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
        (GenerationConfig(top_p=1.5), "top_p"),
        (GenerationConfig(stop_strings=("x",)), "decode="),
        (GenerationConfig(max_new_tokens=60), "block_size"),
    ]
    for config, message in cases:
        with pytest.raises(LmforgeError, match=message):
            generate_batch(lm, "decoder", PROMPTS, config, pad_id=PAD, eos_id=eos)
    with pytest.raises(LmforgeError, match="Prompt 1 is empty"):
        generate_batch(lm, "decoder", [[1], []], GenerationConfig(), pad_id=PAD, eos_id=eos)
