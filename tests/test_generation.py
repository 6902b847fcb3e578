"""Sampling helpers and the decoder generation loop."""

from __future__ import annotations

import torch
from lmforge_plugins.architectures.gpt import GPT

from lmforge.generation import filter_logits, generate


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # cumulative 0.5, 0.75, 0.9: the nucleus for p=0.7 needs the first two tokens
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]


def test_greedy_is_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = GPT(vocab_size=50, n_layer=2, n_head=2, d_model=32, block_size=64).eval()
    prompt = torch.randint(0, 50, (1, 7))
    cached = generate(model, prompt, max_new_tokens=20, greedy=True, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=20, greedy=True, use_cache=False)
    assert cached.shape == (1, 20)
    assert torch.equal(cached, uncached)
    # and greedy really takes the argmax of a full forward at every step
    seq = torch.cat([prompt, cached], dim=1)
    with torch.no_grad():
        argmax = model.logits(model(seq[:, :-1])).argmax(-1)[:, prompt.size(1) - 1 :]
    assert torch.equal(argmax, cached)


def test_same_seed_same_sample_and_eos_stops():
    torch.manual_seed(0)
    model = GPT(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=64).eval()
    prompt = torch.randint(0, 50, (1, 3))
    a = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=11)
    b = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=11)
    c = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    stop = int(a[0, 4])
    stopped = generate(model, prompt, max_new_tokens=15, temperature=1.0, seed=11, eos_id=stop)
    assert stopped.tolist()[0] == a.tolist()[0][: a.tolist()[0].index(stop) + 1]


def test_text_stream_holds_back_partial_characters_and_stop_strings(corpus):
    """Streamed pieces add up to the cut text; no piece shows half a character or half a stop string."""
    from tokenizers import Tokenizer

    from lmforge.generation import TextStream, cut_at_stop_string

    tokenizer = Tokenizer.from_file(str(corpus["tokenizer"]))
    text = "the cat \u00e9t\u00e9 \u2603 sat ENDE on END the mat"  # é, ☃: several byte-level tokens each
    ids = tokenizer.encode(text).ids
    decode = lambda ids: tokenizer.decode(ids)
    assert decode(ids) == text and len(ids) > len(text.split())
    stream = TextStream(decode, stop_strings=("END ",))
    pieces = [stream.push(token) for token in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == cut_at_stop_string(text, ["END "]) == "the cat \u00e9t\u00e9 \u2603 sat ENDE on "
    assert not any("\ufffd" in piece for piece in pieces)
    emitted, held = "", 0
    for k, piece in enumerate(pieces[:-1], start=1):
        emitted += piece
        if decode(ids[:k]).endswith("END"):  # could become the stop string: nothing of it is shown yet
            assert emitted == decode(ids[:k])[:-3]
            held += 1
    assert held == 2  # in "ENDE" (then released) and in "END " (then cut)
