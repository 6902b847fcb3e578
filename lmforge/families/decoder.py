"""The decoder (GPT-like) family."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmforge.errors import LmforgeError
from lmforge.families.base import LMModule


class DecoderLM(LMModule):
    """A decoder-only language model (GPT-like), trained with a causal objective such as ``clm``.

    The architecture returns hidden states; ``architecture.logits`` maps them to the vocabulary.
    See :class:`lmforge.families.base.LMModule` for the optimisation options.
    """

    family: ClassVar[str] = "decoder"

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for ``input_ids`` ``(B, T)``; kwargs go to the architecture."""
        return self.architecture.logits(self.architecture(input_ids, **kwargs))

    def token_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Hidden states ``(B, T, d_model)``; each token sees only the tokens to its left."""
        return self.architecture(batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def sequence_features(self, batch: dict[str, Any], pooling: str = "auto") -> torch.Tensor:
        """The state of the last non-padding token (the only one that has seen the whole input),
        ``(B, d_model)``. Inputs are right-padded, as the task collate functions build them."""
        if pooling not in ("auto", "last"):
            raise LmforgeError(f"A decoder pools its last token; pooling '{pooling}' is not available (use auto).")
        hidden = self.token_features(batch)  # (B, T, C)
        mask = batch.get("attention_mask")
        B, T = batch["input_ids"].shape
        last = mask.long().sum(1) - 1 if mask is not None else torch.full((B,), T - 1, device=hidden.device)
        return hidden[torch.arange(B, device=hidden.device), last.clamp(min=0)]  # (B, C)
