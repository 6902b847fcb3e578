"""The encoder (BERT-like) family."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmforge.errors import LmforgeError
from lmforge.families.base import LMModule


class EncoderLM(LMModule):
    """A bidirectional encoder (BERT-like), trained with ``mlm`` and optionally ``nsp``/``sop``.

    The architecture returns hidden states; ``architecture.mlm_logits`` maps them to the vocabulary
    and ``architecture.pooled`` summarises a sequence (for sentence-pair heads and classification
    tasks). See :class:`lmforge.families.base.LMModule` for the optimisation options.
    """

    family: ClassVar[str] = "encoder"

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Masked-LM logits ``(B, T, vocab)`` for ``input_ids`` ``(B, T)``; kwargs go to the architecture
        (``attention_mask``, ``token_type_ids``, ``position_ids``, ``document_ids``)."""
        return self.architecture.mlm_logits(self.architecture(input_ids, **kwargs))

    def encode(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Hidden states ``(B, T, d_model)`` for ``input_ids`` ``(B, T)`` (no head)."""
        return self.architecture(input_ids, **kwargs)

    def token_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Hidden states ``(B, T, d_model)``, every token seeing the whole (unpadded) input."""
        return self.architecture(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids")
        )

    def sequence_features(self, batch: dict[str, Any], pooling: str = "auto") -> torch.Tensor:
        """The pooled first token, ``(B, d_model)``: the architecture's pooler over it (BERT's over
        ``[CLS]``), or its hidden state when the architecture has no pooler (``has_pooler``)."""
        if pooling not in ("auto", "first"):
            raise LmforgeError(f"An encoder pools its first token; pooling '{pooling}' is not available (use auto).")
        hidden = self.token_features(batch)  # (B, T, C)
        if not getattr(self.architecture, "has_pooler", True):
            return hidden[:, 0]
        return self.architecture.pooled(hidden)
