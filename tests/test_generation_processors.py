"""lmforge's logits filters and repetition penalty against Hugging Face's logits processors on fixed logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.generation import _RepetitionPenalty, filter_logits

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@pytest.fixture(scope="module")
def logits():
    torch.manual_seed(0)
    return torch.randn(6, 40) * 3  # spread out: a real mix of likely and unlikely tokens


def hf_chain(logits: torch.Tensor, *processors) -> torch.Tensor:
    ids = torch.zeros((logits.size(0), 1), dtype=torch.long)  # the warpers do not look at the ids
    for processor in processors:
        logits = processor(ids, logits)
    return logits


@pytest.mark.parametrize("top_k", [1, 5, 39, 100])
def test_top_k(logits, top_k):
    expected = hf_chain(logits, TopKLogitsWarper(top_k))
    assert torch.equal(filter_logits(logits, top_k=top_k), expected)


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.75, 0.95, 1.0])
def test_top_p(logits, top_p):
    expected = hf_chain(logits, TopPLogitsWarper(top_p))
    got = filter_logits(logits, top_p=top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    assert torch.equal(got, expected)
    if top_p < 1.0:
        assert not torch.isfinite(got).all()  # something was filtered


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9, 1.0])
def test_min_p(logits, min_p):
    expected = hf_chain(logits, MinPLogitsWarper(min_p))
    assert torch.equal(filter_logits(logits, min_p=min_p), expected)


def test_the_chain_in_hugging_face_order(logits):
    """Temperature, then top-k, top-p and min-p, each on what the previous one left."""
    expected = hf_chain(logits, TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9),
                        MinPLogitsWarper(0.1))
    got = filter_logits(logits / 0.7, top_k=12, top_p=0.9, min_p=0.1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    kept = torch.isfinite(got).sum(dim=-1)
    assert (kept >= 1).all() and (kept < 12).any()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_ignores_padding(logits, penalty):
    """Left-padded prompts: the padding id (0 here) is not a seen token; every real id is, once."""
    prompts = torch.tensor([[0, 0, 3, 5, 5], [7, 8, 9, 1, 2], [0, 0, 0, 0, 4], [0, 11, 11, 11, 0 + 12],
                            [0, 0, 2, 39, 20], [0, 30, 31, 32, 33]])
    mask = (torch.arange(5)[None] >= torch.tensor([2, 0, 4, 1, 2, 1])[:, None]).long()
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=(mask == 0).sum(dim=1))(
        prompts, logits.clone()
    )
    rule = _RepetitionPenalty(penalty, prompts, mask)
    got = rule.apply(logits)
    assert torch.equal(got, expected)
    assert not torch.equal(got[1], logits[1]) and torch.equal(got[2, :4], logits[2, :4])  # id 0 only padding in row 2

    # Tokens generated later count too (HF sees them as part of input_ids).
    new = torch.tensor([0, 8, 6, 11, 25, 30])
    rule.update(new)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.cat([torch.where(mask.bool(), prompts, new[:, None]), new[:, None]], dim=1), logits.clone()
    )
    assert torch.equal(rule.apply(logits), expected)
