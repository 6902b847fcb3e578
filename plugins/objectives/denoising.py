"""BART-style denoising: corrupt the text, reconstruct all of it.

Text infilling (BART, Lewis et al. 2019): span lengths are drawn from Poisson(``poisson_lambda``)
until they cover ``ceil(mask_ratio * length)`` tokens; each span is replaced by a single mask token,
and a span of length 0 inserts a mask token without removing anything (so the model must also
learn how many tokens are missing). The spans do not overlap and are placed uniformly at random
among the kept tokens. Optionally the sentences are shuffled first (sentence permutation).

inputs: the corrupted row, then EOS; labels: the original row, then EOS. Packed rows are
``block_size - 1`` tokens long, so that the labels are exactly ``block_size``.

Randomness: as in ``span_corruption``, each batch uses a ``numpy`` generator seeded from ``seed`` and
a hash of the batch's token ids (reproducible in any worker, process or resumed run).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lmforge import LmforgeError, Objective, SpecialTokens, hookimpl
from lmforge_plugins.objectives._seq2seq_batches import batch_rng, pad_pairs, seq2seq_loss


def span_lengths(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson span lengths (zeros allowed) whose sum is exactly ``num_to_mask`` (the last one is cut)."""
    lengths: list[int] = []
    total = 0
    while total < num_to_mask:
        length = int(rng.poisson(poisson_lambda))
        lengths.append(length)
        total += length
    if lengths:
        lengths[-1] -= total - num_to_mask
    return np.asarray(lengths, dtype=np.int64)


def text_infilling(
    tokens: np.ndarray, mask_ratio: float, poisson_lambda: float, mask_id: int, rng: np.random.Generator
) -> np.ndarray:
    """``tokens`` with ``ceil(mask_ratio * len)`` tokens in Poisson spans, each span one ``mask_id``."""
    n = len(tokens)
    num_to_mask = min(int(math.ceil(n * mask_ratio)), n)
    lengths = span_lengths(num_to_mask, poisson_lambda, rng)
    k = len(lengths)
    if k == 0:
        return tokens.copy()
    # Arrange the n - num_to_mask kept tokens and the k spans in a random order (spans in the order
    # drawn): choose which of the n - num_to_mask + k slots hold a span.
    slots = n - num_to_mask + k
    is_span = np.zeros(slots, dtype=bool)
    is_span[rng.choice(slots, size=k, replace=False)] = True
    consumed = np.ones(slots, dtype=np.int64)  # original tokens each slot covers
    consumed[is_span] = lengths
    start = np.cumsum(consumed) - consumed  # index of each slot's first original token
    kept = tokens[np.minimum(start, n - 1)]
    return np.where(is_span, mask_id, kept)


def permute_sentences(tokens: np.ndarray, is_end: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffle the sentences of ``tokens``: a sentence ends after each token where ``is_end`` is True."""
    boundaries = np.flatnonzero(is_end) + 1
    sentences = np.split(tokens, boundaries[boundaries < len(tokens)])
    order = rng.permutation(len(sentences))
    return np.concatenate([sentences[i] for i in order])


class Denoising(Objective):
    """BART-style denoising: text infilling (and optional sentence permutation), reconstruct the original.

    Args:
        mask_ratio: Fraction of each row's tokens covered by masked spans (BART: 0.3).
        poisson_lambda: Mean of the Poisson distribution of span lengths (BART: 3).
        permute_sentences: Shuffle the sentences of each row before masking. A sentence ends
            after the tokenizer's end-of-text token and after every token the tokenizer marks as
            ending a sentence (``SpecialTokens.sentence_end``: ``.``, ``!``, ``?``).
        sentence_end_ids: More token ids that end a sentence for ``permute_sentences``.
        seed: Seed of the corruption (combined with each batch's content).
    """

    name = "denoising"
    families = ("seq2seq",)

    def __init__(
        self,
        mask_ratio: float = 0.3,
        poisson_lambda: float = 3.0,
        permute_sentences: bool = False,
        sentence_end_ids: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= mask_ratio < 1.0:
            raise LmforgeError(f"denoising mask_ratio must be in [0, 1) (BART: 0.3), got {mask_ratio}.")
        if poisson_lambda <= 0:
            raise LmforgeError(f"denoising poisson_lambda must be positive (BART: 3.0), got {poisson_lambda}.")
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda
        self.permute_sentences = permute_sentences
        self.sentence_end_ids = list(sentence_end_ids or [])
        self.seed = seed

    def packed_length(self, block_size: int) -> int:
        """One less than ``block_size``: the labels (the row and EOS) are then ``block_size`` long."""
        return max(block_size - 1, 1)

    def corrupt(self, tokens: np.ndarray, special: SpecialTokens, rng: np.random.Generator) -> np.ndarray:
        """The corrupted row (without EOS)."""
        if self.permute_sentences:
            is_end = np.isin(tokens, np.asarray([special.eos_id, *self.sentence_end_ids], dtype=np.int64))
            table = getattr(special, "sentence_end", None)
            if table is not None:
                is_end |= np.asarray(table, dtype=bool)[tokens]
            tokens = permute_sentences(tokens, is_end, rng)
        return text_infilling(tokens, self.mask_ratio, self.poisson_lambda, special.mask_id, rng)

    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        if special.mask_id is None:
            raise LmforgeError(
                "denoising replaces spans with a mask token, but the tokenizer has none (looked for <mask>, [MASK], "
                "<|mask|>). Use lmforge/data/corpus/tokenizer_t5.json (the shipped tokenizer with <mask> and "
                "sentinels added) or add one with tokenizer.add_special_tokens(['<mask>'])."
            )
        if special.eos_id is None:
            raise LmforgeError(
                "denoising ends inputs and labels with an end-of-sequence token, but the tokenizer has none "
                "(looked for <|endoftext|>, </s>, <eos>). Use a tokenizer that has one."
            )
        rows = [np.asarray(e["input_ids"], dtype=np.int64) for e in examples]
        rng = batch_rng(self.seed, rows)
        eos = np.asarray([special.eos_id], dtype=np.int64)
        pairs = [(np.concatenate([self.corrupt(row, special, rng), eos]), np.concatenate([row, eos])) for row in rows]
        return pad_pairs(pairs, special)

    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return seq2seq_loss(module, batch)


@hookimpl
def lmforge_objectives():
    return [Denoising]
