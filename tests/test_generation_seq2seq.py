"""Seq2seq generation (greedy, sampling, beam search) against Hugging Face ``generate`` on the same weights."""

import pytest
import torch
from hf_t5_reference import V, hf_t5, lmforge_t5, padded_batch

from lmforge import LmforgeError
from lmforge.generation import (
    GenerationConfig,
    _beam_search,
    _Seq2SeqStepper,
    generate_batch,
    generate_seq2seq,
)

transformers = pytest.importorskip("transformers")

MAX_NEW = 12


@pytest.fixture(scope="module")
def models():
    """A v1.1 reference and its lmforge copy, a padded batch, and an EOS id that ends some rows early."""
    torch.manual_seed(0)
    hf = hf_t5("v1.1", n_decoder_layer=2)
    model = lmforge_t5(hf)
    ids, mask = padded_batch(rows=4, length=10, lengths=(10, 7, 3, 8))
    # Take as EOS a token that row 0 produces early in its greedy output, so rows end at
    # different steps and the padding of finished rows is exercised.
    free = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True)
    eos = int(free[0, 2])
    return hf, model, ids, mask, eos


def hf_generate(hf, ids, mask, eos, **options):
    config = transformers.GenerationConfig(
        max_new_tokens=MAX_NEW, decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0, **options
    )
    return hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, 1:]  # drop the start token


def rows_until_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row up to and including its first EOS (padding conventions differ after it)."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def test_greedy_equals_transformers(models):
    hf, model, ids, mask, eos = models
    expected = hf_generate(hf, ids, mask, eos, do_sample=False, num_beams=1)
    got = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos, pad_id=0)
    print("greedy:", got.tolist())
    assert got.tolist() == expected.tolist()
    ended = [eos in row for row in got.tolist()]
    assert any(ended) and got.size(1) <= MAX_NEW


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [(3, 1.0, False), (4, 0.6, True), (2, 2.0, "never"), (3, -1.0, False)],
)
def test_beam_search_equals_transformers(models, num_beams, length_penalty, early_stopping):
    hf, model, ids, mask, eos = models
    expected = hf_generate(
        hf, ids, mask, eos, do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    got = generate_seq2seq(
        model, ids, mask, max_new_tokens=MAX_NEW, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_id=eos, pad_id=0,
    )
    assert rows_until_eos(got, eos) == rows_until_eos(expected, eos)
    assert got.shape == expected.shape


def test_beam_search_differs_from_greedy_somewhere(models):
    """Guards the beam-search parity test: on these weights beam search is not just greedy."""
    _, model, ids, mask, eos = models
    greedy = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos)
    beams = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, num_beams=4, eos_id=eos)
    assert rows_until_eos(greedy, eos) != rows_until_eos(beams, eos)


def test_one_beam_equals_greedy_and_cache_changes_nothing(models):
    _, model, ids, mask, eos = models
    greedy = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos, pad_id=0)
    # The beam-search loop itself with one beam (the public API sends num_beams=1 to greedy decoding).
    with torch.no_grad():
        stepper = _Seq2SeqStepper(model, model.encode(ids, mask), mask, 0, MAX_NEW, use_cache=True)
        config = GenerationConfig(max_new_tokens=MAX_NEW, num_beams=1, early_stopping=True)
        one_beam = _beam_search(stepper, ids.size(0), config, torch.tensor([eos]), 0, None).tokens
    assert rows_until_eos(one_beam, eos) == rows_until_eos(greedy, eos)
    uncached = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True, eos_id=eos, pad_id=0,
                                use_cache=False)
    assert uncached.tolist() == greedy.tolist()
    beams = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, num_beams=3, eos_id=eos)
    beams_uncached = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, num_beams=3, eos_id=eos, use_cache=False)
    assert beams.tolist() == beams_uncached.tolist()


def test_sampling_is_seeded_and_filters(models):
    _, model, ids, mask, _ = models
    first = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1.5, seed=3)
    again = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1.5, seed=3)
    other = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1.5, seed=4)
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    greedy = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, greedy=True)
    top1 = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, temperature=2.0, top_k=1, seed=5)
    assert top1.tolist() == greedy.tolist()
    nucleus = generate_seq2seq(model, ids, mask, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1e-6, seed=6)
    assert nucleus.tolist() == greedy.tolist()


def test_bad_requests_are_refused(models):
    _, model, ids, mask, _ = models
    with pytest.raises(LmforgeError, match="num_beams"):
        generate_seq2seq(model, ids, mask, num_beams=0)
    with pytest.raises(LmforgeError, match="at least one token"):
        generate_seq2seq(model, ids[:, :0])
    with pytest.raises(LmforgeError, match="early_stopping"):
        generate_seq2seq(model, ids, mask, num_beams=2, early_stopping="sometimes")
    with pytest.raises(LmforgeError, match="encoder_attention_mask"):
        model.decode(torch.zeros(4, 1, dtype=torch.long), model.encode(ids, mask), mask[:, :3])
    assert V > 0


def test_generate_batch_on_seq2seq_equals_transformers(models):
    """The batch API: unpadded prompts of different lengths, EOS left out of the results."""
    hf, model, ids, mask, eos = models
    prompts = [row[: int(n)] for row, n in zip(ids.tolist(), mask.sum(1).tolist())]

    def lmforge(**options):
        config = GenerationConfig(max_new_tokens=MAX_NEW, **options)
        results = generate_batch(model, "seq2seq", prompts, config, pad_id=0, eos_id=eos)
        return [sequence for sequences in results for sequence in sequences]

    def without_eos(rows):
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    greedy = lmforge(greedy=True, repetition_penalty=1.4)
    assert greedy == without_eos(hf_generate(hf, ids, mask, eos, do_sample=False, repetition_penalty=1.4).tolist())
    assert any(len(row) < MAX_NEW for row in greedy)
    torch.manual_seed(9)
    expected = hf_generate(hf, ids, mask, eos, do_sample=True, top_k=0, temperature=1.3, num_return_sequences=2)
    assert lmforge(temperature=1.3, seed=9, num_return_sequences=2) == without_eos(expected.tolist())
    # Padded prompts with their mask give the same as the unpadded lists.
    padded = generate_batch(model, "seq2seq", ids.tolist(), GenerationConfig(max_new_tokens=MAX_NEW, greedy=True,
                            repetition_penalty=1.4), pad_id=0, eos_id=eos, encoder_attention_mask=mask)
    assert [s for sequences in padded for s in sequences] == greedy
