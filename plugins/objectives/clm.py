"""Causal language modelling: predict every next token.

Works on packed blocks (every row is ``block_size`` tokens with documents separated by the
tokenizer's end-of-text token) and on padded batches (padding never counts in the loss). With
``keep_documents_separate`` the collator derives document ids from the separators, so the
architecture keeps attention (and positions) within each document of a packed block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmforge import LmforgeError, Objective, SpecialTokens, hookimpl
from lmforge.plugin_api import IGNORE_INDEX


class CLM(Objective):
    """Next-token prediction (GPT pretraining).

    Args:
        keep_documents_separate: In packed blocks, let each token attend only to earlier tokens of
            its own document, with positions restarting at every document (costs the fast causal
            attention kernel: a mask is built per batch).
    """

    name = "clm"
    families = ("decoder",)

    def __init__(self, keep_documents_separate: bool = False) -> None:
        self.keep_documents_separate = keep_documents_separate

    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        longest = max(lengths)
        pad = special.pad_id if special.pad_id is not None else special.eos_id
        if pad is None and min(lengths) != longest:
            raise LmforgeError(
                "Rows of different lengths need padding, but the tokenizer has neither a pad nor an end-of-text "
                "token. Use packing (data.packing: true) or a tokenizer with a <|pad|> token."
            )
        input_ids = torch.full((len(examples), longest), pad if pad is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids}
        if min(lengths) != longest:
            batch["attention_mask"] = attention_mask
        if self.keep_documents_separate:
            if special.eos_id is None:
                raise LmforgeError("keep_documents_separate needs an end-of-text token in the tokenizer.")
            ends = (input_ids == special.eos_id).long()
            batch["document_ids"] = torch.cumsum(ends, dim=1) - ends  # the separator ends its own document
        return batch

    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        hidden = module.architecture(
            input_ids, attention_mask=attention_mask, document_ids=batch.get("document_ids")
        )
        logits = module.architecture.logits(hidden)  # (B, T, V)
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        # Shift the labels, not the logits: position t predicts token t+1 and the last position nothing.
        # Slicing the logits instead would copy all (B, T-1, V) of them, the largest tensor of the step.
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return {"loss": loss, "tokens": (labels != IGNORE_INDEX).sum()}


@hookimpl
def lmforge_objectives():
    return [CLM]
