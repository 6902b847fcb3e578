"""The encoder (BERT-like) family."""

from __future__ import annotations

from typing import ClassVar

import torch

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
