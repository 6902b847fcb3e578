"""Batch building helpers shared by the datamodule and the objectives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.plugin_api import SpecialTokens


def pad_collate(
    examples: Sequence[dict[str, Any]],
    special: SpecialTokens,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad the ``input_ids`` of ``examples`` into a batch.

    Returns ``input_ids`` of shape ``(B, T)`` and ``attention_mask`` of shape ``(B, T)`` (1 for a
    real token, 0 for padding), both ``torch.long``. ``T`` is the longest example, rounded up to a
    multiple of ``pad_to_multiple_of`` when given. Padding uses the tokenizer's pad token, else its
    end-of-document token, else id 0 (the attention mask marks it either way).
    """
    if len(examples) == 0:
        raise ValueError("pad_collate() needs at least one example")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise LmforgeError(f"pad_to_multiple_of must be a positive integer, not {pad_to_multiple_of}.")
    rows = []
    for example in examples:
        ids = example["input_ids"]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    pad_id = special.pad_id if special.pad_id is not None else special.eos_id
    if pad_id is None:
        pad_id = 0
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
