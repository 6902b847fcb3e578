"""BART-style denoising: targets are the original rows, masking ratio, Poisson spans, permutation."""

import math

import numpy as np
import pytest
import torch

from lmforge import LmforgeError, SpecialTokens
from lmforge_plugins.objectives.denoising import Denoising, span_lengths

MASK = 4
SPECIAL = SpecialTokens(vocab_size=1000, pad_id=1, eos_id=2, mask_id=MASK)


def is_ordered_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(token in it for token in part)


def test_labels_are_the_original_and_inputs_are_the_infilled_rows():
    objective = Denoising(mask_ratio=0.3, seed=3)
    rng = np.random.default_rng(0)
    rows = [rng.integers(10, 900, n).tolist() for n in (63, 40, 63, 7)]
    batch = objective.collate([{"input_ids": r} for r in rows], SPECIAL)
    assert batch["labels"].shape == (4, 64)  # packed rows of block_size - 1, plus EOS
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == row + [SPECIAL.eos_id]  # target == original
        n = int(batch["attention_mask"][i].sum())
        inputs = batch["input_ids"][i, :n].tolist()
        assert inputs[-1] == SPECIAL.eos_id and MASK in inputs
        kept = [t for t in inputs[:-1] if t != MASK]
        assert is_ordered_subsequence(kept, row)
        assert len(row) - len(kept) == math.ceil(0.3 * len(row))  # exactly the masked share is removed
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == SPECIAL.pad_id)


def test_masked_fraction_span_lengths_and_insertions_over_many_rows():
    objective = Denoising(mask_ratio=0.3, poisson_lambda=3.0, seed=0)
    rng = np.random.default_rng(1)
    removed = total = masks = 0
    for _ in range(40):
        rows = [rng.integers(10, 900, 127).tolist() for _ in range(4)]
        batch = objective.collate([{"input_ids": r} for r in rows], SPECIAL)
        for row, inputs in zip(rows, batch["input_ids"].tolist()):
            kept = [t for t in inputs[:-1] if t not in (MASK, SPECIAL.pad_id)]
            removed += len(row) - len(kept)
            masks += inputs.count(MASK)
            total += len(row)
    print(f"masked fraction {removed / total:.4f}, tokens per mask {removed / masks:.3f}")
    assert abs(removed / total - 0.3) < 0.01
    # Poisson(3) spans, the last cut to fit: about 3 tokens per mask token.
    assert 2.5 < removed / masks < 3.3
    draws = span_lengths(100_000, 3.0, np.random.default_rng(2))
    assert draws.sum() == 100_000 and abs(draws.mean() - 3.0) < 0.05
    assert (draws == 0).mean() > 0.03  # zero-length spans occur: each inserts a mask token


def test_sentence_permutation_keeps_the_tokens_and_the_target():
    objective = Denoising(mask_ratio=0.0, permute_sentences=True, sentence_end_ids=[7], seed=1)
    row = [10, 11, 7, 20, 21, 22, 7, 30, 2, 40, 41, 7, 50]
    seen = set()
    for seed in range(12):
        objective.seed = seed
        batch = objective.collate([{"input_ids": row}], SPECIAL)
        inputs = batch["input_ids"][0].tolist()[:-1]
        assert sorted(inputs) == sorted(row)
        assert batch["labels"][0].tolist() == row + [SPECIAL.eos_id]
        # The input is the original sentences in some order (each starts with a distinct token).
        remaining = [(10, 11, 7), (20, 21, 22, 7), (30, 2), (40, 41, 7), (50,)]
        position = 0
        while remaining:
            sentence = next(s for s in remaining if s[0] == inputs[position])
            assert tuple(inputs[position : position + len(sentence)]) == sentence
            remaining.remove(sentence)
            position += len(sentence)
        seen.add(tuple(inputs))
    assert len(seen) > 3
    # The tokenizer's own sentence ends (SpecialTokens.sentence_end) cut sentences too.
    table = tuple(t in (7,) for t in range(1000))
    special = SpecialTokens(vocab_size=1000, pad_id=1, eos_id=2, mask_id=MASK, sentence_end=table)
    shuffled = {tuple(Denoising(mask_ratio=0.0, permute_sentences=True, seed=s).collate([{"input_ids": row}], special)
                      ["input_ids"][0].tolist()) for s in range(12)}
    assert len(shuffled) > 3


def test_reproducible_and_errors():
    rows = [{"input_ids": list(range(10, 70))}]
    a = Denoising(seed=1).collate(rows, SPECIAL)
    assert torch.equal(a["input_ids"], Denoising(seed=1).collate(rows, SPECIAL)["input_ids"])
    assert not torch.equal(a["input_ids"], Denoising(seed=2).collate(rows, SPECIAL)["input_ids"])
    with pytest.raises(LmforgeError, match="mask token.*<mask>"):
        Denoising().collate(rows, SpecialTokens(vocab_size=100, pad_id=1, eos_id=2))
    with pytest.raises(LmforgeError, match="mask_ratio"):
        Denoising(mask_ratio=1.2)
    assert Denoising().packed_length(128) == 127
