"""The seq2seq (encoder-decoder, T5-like) family."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmforge.errors import LmforgeError
from lmforge.families.base import LMModule

IGNORE_INDEX = -100


class Seq2SeqLM(LMModule):
    """An encoder-decoder language model (T5-like), trained with an objective such as ``span_corruption``.

    The encoder reads ``input_ids``; the decoder predicts ``labels`` one token at a time from the
    labels shifted right behind the architecture's ``decoder_start_token_id`` (teacher forcing).
    See :class:`lmforge.families.base.LMModule` for the optimisation options.
    """

    family: ClassVar[str] = "seq2seq"

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder logits ``(B, T, vocab)`` for encoder ``input_ids`` ``(B, S)``.

        Give either ``decoder_input_ids`` ``(B, T)`` or ``labels`` ``(B, T)`` (then the decoder input
        is :meth:`shift_right` of the labels).
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Seq2SeqLM.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        hidden = self.architecture(input_ids, decoder_input_ids, attention_mask=attention_mask)
        return self.architecture.logits(hidden)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``labels`` ``(B, T)``: the start token, then ``labels[:, :-1]``.

        Ignored label positions (``-100``, padding) become the start token; they only ever sit after
        the real targets, so causal attention keeps them from affecting any predicted position.
        """
        start = self.architecture.decoder_start_token_id
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill_(shifted == IGNORE_INDEX, start)

    def sequence_features(self, batch: dict[str, Any], pooling: str = "auto") -> torch.Tensor:
        """One vector per input, ``(B, d_model)``: ``encoder_mean`` (``auto``) averages the encoder
        states of the real tokens; ``decoder_first`` is the decoder's state for its start token."""
        mask = batch.get("attention_mask")
        encoded = self.architecture.encode(batch["input_ids"], mask)  # (B, S, C)
        if pooling in ("auto", "encoder_mean"):
            if mask is None:
                return encoded.mean(1)
            weights = mask[..., None].to(encoded.dtype)  # (B, S, 1)
            return (encoded * weights).sum(1) / weights.sum(1).clamp(min=1)
        if pooling == "decoder_first":
            start = batch["input_ids"].new_full((encoded.size(0), 1), self.architecture.decoder_start_token_id)
            return self.architecture.decode(start, encoded, mask)[:, 0]  # (B, C)
        raise LmforgeError(
            f"A seq2seq model pools with 'encoder_mean' or 'decoder_first' (or auto), not '{pooling}'."
        )
