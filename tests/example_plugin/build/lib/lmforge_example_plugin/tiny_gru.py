"""A GRU language model as an lmforge architecture, written only against lmforge's public API."""

from __future__ import annotations

import torch
from torch import nn

from lmforge import Architecture, LmforgeError, hookimpl


class TinyGRU(Architecture):
    """A one-layer GRU decoder.

    Args:
        vocab_size: Vocabulary size (filled in from the tokenizer when null).
        d_model: Width of the embedding and of the GRU state.
        n_layer: Number of stacked GRU layers.
    """

    name = "tiny_gru"
    families = ("decoder",)

    def __init__(self, vocab_size: int | None = None, d_model: int = 64, n_layer: int = 1) -> None:
        super().__init__()
        if vocab_size is None:
            raise LmforgeError("tiny_gru needs vocab_size (the CLI fills it in from the tokenizer).")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.gru = nn.GRU(d_model, d_model, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, document_ids=None, cache=None):
        hidden, _ = self.gru(self.embed(input_ids))  # (B, T, d_model)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


@hookimpl
def lmforge_architectures():
    return [TinyGRU]
