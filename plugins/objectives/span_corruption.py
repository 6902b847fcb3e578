"""T5 span corruption: drop random spans of the input, predict them from their sentinels.

Exactly T5's format (``t5.data.preprocessors.span_corruption``). For a row of tokens, a noise mask
marks ``round(length * noise_density)`` tokens in ``round(noise / mean_noise_span_length)`` spans
(:func:`random_spans_noise_mask`); then

* inputs: the row with each noise span replaced by one sentinel, then EOS;
* targets: each noise span preceded by its sentinel, then EOS.

Sentinel ``k`` is ``<extra_id_k>`` of the tokenizer (``SpecialTokens.sentinel_ids``); as in T5 they
count down from the top of the vocabulary in the tokenizer that ships for this
(``lmforge/data/corpus/tokenizer_t5.json``; :func:`lmforge.data.tokenizer.add_sentinel_tokens`
adds them to any tokenizer). Example, with noise on "for inviting" and "last"::

    row      Thank you for inviting me to your party last week .
    inputs   Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    targets  <extra_id_0> for inviting <extra_id_1> last </s>

Packed rows are :meth:`SpanCorruption.packed_length` tokens long, chosen (like T5's
``random_spans_helper``) so that the inputs are exactly ``block_size`` tokens: the model's input
length is the datamodule's ``block_size``.

Randomness: each batch is corrupted with a ``numpy`` generator seeded from ``seed`` and a hash of
the batch's token ids, so the corruption is a pure function of the seed and the batch: the same in
any data-loader worker or process and after a resume; validation batches (not shuffled) are
corrupted identically at every evaluation; training rows meet new batch-mates every epoch and so
new noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge import LmforgeError, Objective, SpecialTokens, hookimpl
from lmforge_plugins.objectives._seq2seq_batches import batch_rng, pad_pairs, seq2seq_loss


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(noise tokens, noise spans)`` that :func:`random_spans_noise_mask` marks in ``length`` tokens."""
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, min(num_spans, length - num_noise)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: a boolean array of ``length``, True on the noise tokens.

    The row alternates non-noise and noise spans, starting with non-noise and ending with noise;
    the noise and non-noise tokens are each split into ``num_spans`` non-empty spans at random
    (uniformly among all such splits).
    """
    original_length = length
    length = max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)

    def random_segmentation(num_items: int) -> np.ndarray:
        """Lengths of ``num_spans`` non-empty segments that partition ``num_items`` items."""
        first_in_segment = rng.permutation(np.arange(num_items - 1) < num_spans - 1)
        segment_id = np.cumsum(np.concatenate([[0], first_in_segment]))
        return np.bincount(segment_id, minlength=num_spans)

    noise_lengths = random_segmentation(num_noise)
    nonnoise_lengths = random_segmentation(length - num_noise)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # non-noise, noise, ...
    span_start = np.zeros(length, dtype=np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    is_noise = np.cumsum(span_start) % 2 == 1
    return is_noise[:original_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """Replace each run of ``noise_mask`` with one sentinel: the k-th run with ``sentinel_ids[k]``.

    ``inputs = f(tokens, mask)`` and ``targets = f(tokens, ~mask)`` give T5's format (before EOS).
    """
    previous = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~previous
    subsequent = noise_mask & previous
    span_index = np.cumsum(first) - 1
    out = np.where(first, sentinel_ids[np.clip(span_index, 0, None)], tokens)
    return out[~subsequent]


def input_and_target_lengths(
    raw_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Lengths (EOS included) of the inputs and targets made from a row of ``raw_length`` tokens."""
    num_noise, num_spans = noise_counts(raw_length, noise_density, mean_noise_span_length)
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


class SpanCorruption(Objective):
    """T5's span corruption (pretraining objective of the seq2seq family).

    Args:
        noise_density: Fraction of each row's tokens that are dropped from the inputs and predicted.
        mean_noise_span_length: Average length of a dropped span.
        seed: Seed of the corruption (combined with each batch's content; see the module docs).
    """

    name = "span_corruption"
    families = ("seq2seq",)

    def __init__(self, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, seed: int = 0) -> None:
        if not 0.0 < noise_density < 1.0:
            raise LmforgeError(f"span_corruption noise_density must be between 0 and 1 (T5: 0.15), got {noise_density}.")
        if mean_noise_span_length < 1.0:
            raise LmforgeError(
                f"span_corruption mean_noise_span_length must be at least 1 token (T5: 3.0), got {mean_noise_span_length}."
            )
        self.noise_density = noise_density
        self.mean_noise_span_length = mean_noise_span_length
        self.seed = seed

    def packed_length(self, block_size: int) -> int:
        """The longest row whose inputs (sentinels and EOS included) fit ``block_size``; they fill it exactly."""
        length = block_size - 1
        while input_and_target_lengths(length + 1, self.noise_density, self.mean_noise_span_length)[0] <= block_size:
            length += 1
        return length

    def target_length(self, block_size: int) -> int:
        """Length of the targets (EOS included) of packed rows for ``block_size``."""
        return input_and_target_lengths(self.packed_length(block_size), self.noise_density, self.mean_noise_span_length)[1]

    def corrupt(
        self, tokens: np.ndarray, special: SpecialTokens, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)`` of one row, EOS appended to both."""
        mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, rng)
        sentinels = np.asarray(special.sentinel_ids, dtype=np.int64)
        num_spans = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
        if num_spans > len(sentinels):
            raise LmforgeError(
                f"span_corruption needs {num_spans} sentinel tokens for a row of {len(tokens)} tokens but the "
                f"tokenizer has {len(sentinels)} (<extra_id_0>..). Add more with "
                "lmforge.data.tokenizer.add_sentinel_tokens, or use shorter rows (block_size)."
            )
        eos = np.asarray([special.eos_id], dtype=np.int64)
        inputs = np.concatenate([noise_span_to_unique_sentinel(tokens, mask, sentinels), eos])
        targets = np.concatenate([noise_span_to_unique_sentinel(tokens, ~mask, sentinels), eos])
        return inputs, targets

    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        check_special_tokens(special)
        rows = [np.asarray(e["input_ids"], dtype=np.int64) for e in examples]
        rng = batch_rng(self.seed, rows)
        pairs = [self.corrupt(row, special, rng) for row in rows]
        return pad_pairs(pairs, special)

    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return seq2seq_loss(module, batch)


def check_special_tokens(special: SpecialTokens) -> None:
    if not special.sentinel_ids:
        raise LmforgeError(
            "span_corruption needs T5 sentinel tokens (<extra_id_0>, <extra_id_1>, ...) but the tokenizer has none. "
            "Use lmforge/data/corpus/tokenizer_t5.json (the shipped tokenizer with 100 sentinels), a T5 "
            "tokenizer.json, or add them to yours with lmforge.data.tokenizer.add_sentinel_tokens(tokenizer)."
        )
    if special.eos_id is None:
        raise LmforgeError(
            "span_corruption ends inputs and targets with an end-of-sequence token, but the tokenizer has none "
            "(looked for <|endoftext|>, </s>, <eos>). Use a tokenizer that has one."
        )


@hookimpl
def lmforge_objectives():
    return [SpanCorruption]
