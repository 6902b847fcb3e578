"""The decoder (GPT-like) family."""

from __future__ import annotations

from typing import ClassVar

import torch

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
