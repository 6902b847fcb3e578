"""The preallocated KV cache with left-padded batches: positions, masks, memory, beam reordering."""

from __future__ import annotations

import pytest
import torch
from lmforge_plugins.architectures.gpt import GPT

from lmforge.generation import GenerationConfig, generate_batch

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]


def tiny_gpt(**options) -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=61, n_layer=2, n_head=4, d_model=32, block_size=48, **options).eval()
    with torch.no_grad():  # spread the logits: greedy choices are clear, no near-ties
        for p in model.parameters():
            p.mul_(8)
    return model


@pytest.mark.parametrize("options", [{}, {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2}])
def test_cached_left_padded_steps_equal_each_prompt_alone(options):
    """Step by step with the cache, each row's logits equal a full forward over that prompt alone."""
    model = tiny_gpt(**options)
    width, new = max(map(len, PROMPTS)), 5
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (ids != 0).long()
    cache = model.new_cache(len(PROMPTS), width + new)
    assert tuple(cache.k[0].shape) == (3, model.n_kv_head, width + new, model.head_dim)  # allocated once, full length
    pointers = [t.data_ptr() for t in (*cache.k, *cache.v)]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    steps = [ids]
    with torch.no_grad():
        logits = model.logits(model(ids, attention_mask=mask, position_ids=positions, cache=cache))[:, -1:]
        outs = [logits]
        for t in range(new):
            token = torch.randint(1, 61, (3, 1), generator=torch.Generator().manual_seed(t))
            steps.append(token)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            position = positions[:, -1:] + 1 + t
            outs.append(model.logits(model(token, attention_mask=mask, position_ids=position, cache=cache)))
        assert [t.data_ptr() for t in (*cache.k, *cache.v)] == pointers and cache.length == width + new
        cached = torch.cat(outs, dim=1)  # (3, new + 1, V)
        sequence = torch.cat(steps, dim=1)
        for row, prompt in enumerate(PROMPTS):
            alone = sequence[row : row + 1, width - len(prompt) :]  # the padding cut off
            full = model.logits(model(alone))[:, len(prompt) - 1 :]
            torch.testing.assert_close(cached[row : row + 1], full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"position": "rotary", "n_kv_head": 1}])
def test_batched_greedy_equals_per_prompt_and_uncached(options):
    model = tiny_gpt(**options)
    config = GenerationConfig(max_new_tokens=12, greedy=True)
    batched = generate_batch(model, "decoder", PROMPTS, config, pad_id=0, eos_id=None)
    assert batched == [generate_batch(model, "decoder", [p], config, pad_id=0, eos_id=None)[0] for p in PROMPTS]
    config.use_cache = False
    assert batched == generate_batch(model, "decoder", PROMPTS, config, pad_id=0, eos_id=None)
    beams = GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    cached_beams = generate_batch(model, "decoder", PROMPTS, beams, pad_id=0, eos_id=None)
    beams.use_cache = False
    assert cached_beams == generate_batch(model, "decoder", PROMPTS, beams, pad_id=0, eos_id=None)


def test_reorder_keeps_the_filled_slots_of_the_chosen_rows_in_place():
    model = tiny_gpt()
    cache = model.new_cache(3, 10)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), cache=cache)
    before = [k.clone() for k in cache.k]
    pointer = cache.k[0].data_ptr()
    rows = torch.tensor([2, 2, 0])
    cache.reorder(rows)
    assert cache.k[0].data_ptr() == pointer
    for old, new in zip(before, cache.k):
        assert torch.equal(new[:, :, :3], old[rows, :, :3])
    cache.reorder(torch.tensor([1]))  # a different number of rows: new memory
    assert cache.batch_size == 1 and torch.equal(cache.k[0][:, :, :3], before[0][[2], :, :3])
