"""Tiny randomly initialised Hugging Face T5 models and lmforge T5s with the same weights (test helpers)."""

from __future__ import annotations

import torch

V, D, DKV, FF, NH = 61, 32, 8, 48, 4

#: The two layouts: T5 v1.0 (ReLU, tied and rescaled head) and v1.1 (gated GELU, untied head).
VARIANTS = {
    "v1.0": {"feed_forward_proj": "relu", "tie_word_embeddings": True},
    "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


def hf_t5(variant: str, n_layer: int = 2, n_decoder_layer: int = 3, scale: float = 0.5):
    """A ``T5ForConditionalGeneration`` with every parameter drawn at random (norm weights too).

    transformers 5 ties ``lm_head`` to the embedding even for v1.1 configs (only the rescaling
    follows ``tie_word_embeddings``); an untied head is given its own parameter, as a v1.1
    checkpoint has.
    """
    import transformers

    config = transformers.T5Config(
        vocab_size=V, d_model=D, d_kv=DKV, d_ff=FF, num_layers=n_layer, num_decoder_layers=n_decoder_layer,
        num_heads=NH, relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **VARIANTS[variant],
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not VARIANTS[variant]["tie_word_embeddings"]:
        model.lm_head.weight = torch.nn.Parameter(torch.empty(V, D))
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model


def lmforge_t5(hf_model):
    """An lmforge T5 built from ``hf_model``'s config, holding its weights."""
    from lmforge_plugins.architectures.t5 import T5

    model = T5(**T5.options_from_hf_config(hf_model.config.to_dict())).eval()
    model.load_state_dict(model.hf_state_dict_to_lmforge(hf_model.state_dict()), strict=True)
    return model


def padded_batch(rows: int = 3, length: int = 14, lengths=(14, 9, 4), low: int = 2):
    """Random ids ``(rows, length)`` (no EOS/pad ids) and a right-padding attention mask."""
    ids = torch.randint(low, V, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask
