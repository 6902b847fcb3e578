"""BERT: a bidirectional transformer encoder with masked-LM and sentence-pair heads, in one file.

The default configuration is BERT's (post-LayerNorm blocks, learned absolute positions, token-type
embeddings, exact-erf GELU, tied MLM decoder), so Hugging Face ``BertForPreTraining``,
``BertForMaskedLM``, ``BertForNextSentencePrediction`` and ``BertModel`` weights load into it exactly
(see :meth:`BERT.hf_state_dict_to_lmforge`). ``layout="pre_ln"`` (normalise before each sublayer,
as in Megatron-BERT), ``position="rotary"`` and ``norm="rmsnorm"`` give modern variants of the same
network without a second implementation.

Reading order: the rotary helpers, :class:`SelfAttention`, :class:`MLP`, :class:`Layer`, then
:class:`BERT` (embeddings, masks, the encoder stack, the heads, Hugging Face conversion).

Shape legend: ``B`` batch, ``T`` tokens, ``C`` d_model, ``nh`` heads, ``hs`` head size, ``V``
vocabulary, ``N`` selected (e.g. masked) positions.
"""

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import Architecture, LmforgeError, hookimpl

# ----------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention, as in Llama and GPT's position="rotary")


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(position_ids: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of each position's angles, ``(B|1, 1, T, hs)`` each, computed in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B|1, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm (BERT) or RMSNorm (weight only, no mean subtraction)."""
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


# ----------------------------------------------------------------------------------------------
# The layers


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention through ``scaled_dot_product_attention``.

    One fused projection ``qkv`` produces ``[q | k | v]`` (``C`` features each, heads in order):
    Hugging Face's separate ``query``/``key``/``value`` weights are concatenated into it on load.
    """

    def __init__(self, d_model: int, n_head: int, attention_dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        B, T, C = x.size()
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)  # (B, nh, T, hs) each
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)  # (B, T, C)


class MLP(nn.Module):
    """The feed-forward network: ``proj(gelu(fc(x)))`` with exact (erf) GELU, Hugging Face's "gelu"."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C)


class Layer(nn.Module):
    """One encoder block, post-LN (BERT) or pre-LN.

    Post-LN: ``x = norm1(x + attn(x))`` then ``x = norm2(x + mlp(x))`` (the original BERT; each
    sublayer's output is normalised together with the residual stream). Pre-LN: ``x = x +
    attn(norm1(x))`` then ``x = x + mlp(norm2(x))``, which keeps the residual stream an untouched
    sum and trains deep stacks stably without long warm-ups.
    """

    def __init__(
        self, d_model: int, n_head: int, d_ff: int, layout: str, norm: str, norm_eps: float,
        dropout: float, attention_dropout: float,
    ) -> None:
        super().__init__()
        self.pre_ln = layout == "pre_ln"
        self.attn = SelfAttention(d_model, n_head, attention_dropout)
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.mlp = MLP(d_model, d_ff)
        self.norm2 = make_norm(norm, d_model, norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attn(self.norm1(x), mask, rope))  # (B, T, C)
            return x + self.dropout(self.mlp(self.norm2(x)))  # (B, T, C)
        x = self.norm1(x + self.dropout(self.attn(x, mask, rope)))  # (B, T, C)
        return self.norm2(x + self.dropout(self.mlp(x)))  # (B, T, C)


# ----------------------------------------------------------------------------------------------
# The model

#: Hugging Face ``architectures`` entry -> (pooler, mlm_head, pair_head) of the checkpoint.
HF_HEADS: dict[str, tuple[bool, bool, bool]] = {
    "BertForPreTraining": (True, True, True),
    "BertForMaskedLM": (False, True, False),
    "BertForNextSentencePrediction": (True, False, True),
    "BertModel": (True, False, False),
}


class BERT(Architecture):
    """A BERT-style bidirectional encoder (BERT by default; pre-LN/rotary/RMSNorm with the switches).

    Args:
        vocab_size: Number of token ids. Normally left out: the CLI fills it in from the data's
            tokenizer. Required when building the model in Python.
        n_layer: Number of encoder blocks.
        n_head: Number of attention heads. Must divide ``d_model``.
        d_model: Width of the residual stream (Hugging Face's ``hidden_size``).
        d_ff: Hidden width of the MLP (``intermediate_size``). ``None`` means ``4 * d_model``.
        block_size: Longest sequence the model handles (``max_position_embeddings``). With
            ``position="learned"`` it is the size of the position table and a hard limit.
        type_vocab_size: Number of token types (segment A/B of a sentence pair: 2, as in BERT).
        dropout: Dropout on the embeddings and on each sublayer's output (``hidden_dropout_prob``).
        attention_dropout: Dropout on attention weights (``attention_probs_dropout_prob``);
            ``None`` means the same as ``dropout``.
        norm_eps: Epsilon of the normalisation layers (BERT: 1e-12).
        layout: ``"post_ln"``: BERT's blocks, normalising after each residual sum, with a
            LayerNorm on the embeddings. ``"pre_ln"``: normalise before each sublayer, no
            embedding norm, one final norm after the last block (Megatron-BERT; steadier training).
        position: ``"learned"``: an absolute position table added to the embeddings (BERT).
            ``"rotary"``: rotary embeddings on queries and keys (relative positions; no table).
        rope_base: Base of the rotary frequencies (only used with ``position="rotary"``).
        norm: ``"layernorm"`` (BERT) or ``"rmsnorm"``.
        tie_embeddings: Use the token embedding matrix as the MLM decoder (BERT does); otherwise
            the decoder is its own matrix.
        pooler: Build the pooler (``tanh(dense(hidden[:, 0]))``), the sequence summary that the
            sentence-pair head and classification tasks read.
        mlm_head: Build the masked-LM head (transform dense + GELU + norm, then the decoder with
            its own bias). Needed by the ``mlm`` objective.
        pair_head: Build the 2-way sentence-pair head on the pooler (BERT's ``seq_relationship``),
            needed by the ``nsp`` and ``sop`` objectives. Requires ``pooler``.
    """

    name = "bert"
    families = ("encoder",)
    hf_model_type = "bert"
    default_objective = "mlm"

    def __init__(
        self,
        vocab_size: int | None = None,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 256,
        d_ff: int | None = None,
        block_size: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        norm_eps: float = 1e-12,
        layout: Literal["post_ln", "pre_ln"] = "post_ln",
        position: Literal["learned", "rotary"] = "learned",
        rope_base: float = 10000.0,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        tie_embeddings: bool = True,
        pooler: bool = False,
        mlm_head: bool = True,
        pair_head: bool = False,
    ) -> None:
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        d_ff = 4 * d_model if d_ff is None else d_ff
        self._validate(vocab_size, n_layer, n_head, d_model, d_ff, block_size, type_vocab_size, dropout,
                       attention_dropout, layout, position, norm, pooler, pair_head)
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_ff = d_ff
        self.head_dim = d_model // n_head
        self.block_size = block_size
        self.type_vocab_size = type_vocab_size
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.norm_eps = norm_eps
        self.layout = layout
        self.position = position
        self.rope_base = rope_base
        self.norm = norm
        self.tie_embeddings = tie_embeddings
        self.has_mlm_head = mlm_head
        self.has_pair_head = pair_head
        self.has_pooler = pooler

        # Embeddings
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model) if position == "learned" else None
        self.type_emb = nn.Embedding(type_vocab_size, d_model)
        self.emb_norm = make_norm(norm, d_model, norm_eps) if layout == "post_ln" else None
        self.emb_dropout = nn.Dropout(dropout)
        # Encoder stack
        self.layers = nn.ModuleList(
            Layer(d_model, n_head, d_ff, layout, norm, norm_eps, dropout, attention_dropout) for _ in range(n_layer)
        )
        self.final_norm = make_norm(norm, d_model, norm_eps) if layout == "pre_ln" else None
        # Heads
        self.pooler = nn.Linear(d_model, d_model) if pooler else None
        self.mlm_transform = nn.Linear(d_model, d_model) if mlm_head else None
        self.mlm_norm = make_norm(norm, d_model, norm_eps) if mlm_head else None
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size)) if mlm_head else None
        # Tied: mlm_logits() reuses tok_emb.weight, so the state dict holds the matrix once.
        self.mlm_decoder = nn.Linear(d_model, vocab_size, bias=False) if mlm_head and not tie_embeddings else None
        self.pair_head = nn.Linear(d_model, 2) if pair_head else None

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @staticmethod
    def _validate(vocab_size, n_layer, n_head, d_model, d_ff, block_size, type_vocab_size, dropout,
                  attention_dropout, layout, position, norm, pooler, pair_head) -> None:
        """Check the options together, with messages that name the option and the fix."""
        if vocab_size is None:
            raise LmforgeError(
                "BERT needs vocab_size, the number of token ids. The lmforge CLI fills it in from the "
                "data's tokenizer, so leave it out of the YAML there; when building BERT in Python, "
                "pass it explicitly, e.g. BERT(vocab_size=tokenizer.get_vocab_size())."
            )
        for option, value in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head),
                              ("d_model", d_model), ("d_ff", d_ff), ("block_size", block_size),
                              ("type_vocab_size", type_vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise LmforgeError(f"BERT {option} must be a positive integer, got {value!r}.")
        if d_model % n_head:
            raise LmforgeError(
                f"BERT n_head ({n_head}) must divide d_model ({d_model}) so every head has the same size; "
                f"try n_head={math.gcd(d_model, n_head) or 1} or a d_model that is a multiple of {n_head}."
            )
        if position == "rotary" and (d_model // n_head) % 2:
            raise LmforgeError(
                f"BERT position='rotary' needs an even head size, but d_model/n_head = {d_model // n_head}. "
                "Change d_model or n_head."
            )
        for option, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise LmforgeError(f"BERT {option} must be in [0, 1), got {value}.")
        for option, value, allowed in (("layout", layout, ("post_ln", "pre_ln")),
                                       ("position", position, ("learned", "rotary")),
                                       ("norm", norm, ("layernorm", "rmsnorm"))):
            if value not in allowed:
                raise LmforgeError(f"BERT {option} must be one of {', '.join(allowed)}; got {value!r}.")
        if pair_head and not pooler:
            raise LmforgeError(
                "BERT pair_head: true reads the pooler's output, but pooler is false. Set pooler: true "
                "as well (BERT's next-sentence head sits on its pooler)."
            )

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Hidden states ``(B, T, C)`` of ``input_ids`` ``(B, T)``.

        Args:
            input_ids: Token ids ``(B, T)``.
            attention_mask: ``(B, T)``, 1 for real tokens and 0 for padding. No token attends to
                padding (the outputs at padded positions are meaningless).
            token_type_ids: ``(B, T)`` segment of each token (0 for sentence A, 1 for B); all 0 if
                not given.
            position_ids: ``(B, T)`` or ``(T,)`` positions; by default ``0..T-1``, restarting at 0
                in every document when ``document_ids`` are given.
            document_ids: ``(B, T)`` document of each token of a packed row: a token attends only to
                the tokens of its own document (both directions).
        """
        B, T = input_ids.shape
        self._check_inputs(B, T, attention_mask, token_type_ids, position_ids, document_ids)
        device = input_ids.device
        if position_ids is None and document_ids is not None:
            position_ids = self.document_positions(document_ids)  # (B, T)

        x = self.tok_emb(input_ids)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.type_emb.weight[0]  # every token is of type 0: skip the lookup
        else:
            x = x + self.type_emb(token_type_ids)
        rope = None
        if self.position == "learned":
            x = x + (self.pos_emb.weight[:T] if position_ids is None else self.pos_emb(position_ids))
        else:
            positions = torch.arange(T, device=device)[None] if position_ids is None else position_ids
            rope = rotary_tables(positions.view(-1, T), self.head_dim, self.rope_base, x.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.emb_dropout(x)

        mask = self.build_attention_mask(attention_mask, document_ids)  # None, (B,1,1,T) or (B,1,T,T)
        for layer in self.layers:
            x = layer(x, mask, rope)  # (B, T, C)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def _check_inputs(self, B, T, attention_mask, token_type_ids, position_ids, document_ids) -> None:
        """Shape checks that are cheap (no device sync) and turn silent misuse into clear errors."""
        if self.position == "learned" and T > self.block_size:
            raise LmforgeError(
                f"BERT got {T} tokens but block_size is {self.block_size} and position='learned' has no "
                "embedding beyond it. Use shorter inputs (data.block_size) or a larger block_size."
            )
        for option, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                              ("document_ids", document_ids)):
            if value is not None and tuple(value.shape) != (B, T):
                raise LmforgeError(
                    f"BERT {option} must have the shape of input_ids {(B, T)}, got {tuple(value.shape)}."
                )
        if position_ids is not None and position_ids.shape[-1] != T:
            raise LmforgeError(
                f"BERT position_ids must end in the sequence length {T}, got shape {tuple(position_ids.shape)}."
            )

    @staticmethod
    def document_positions(document_ids: Tensor) -> Tensor:
        """Positions that restart at 0 where the document id changes: ``(B, T)`` -> ``(B, T)``."""
        B, T = document_ids.shape
        idx = torch.arange(T, device=document_ids.device).expand(B, T)  # (B, T)
        starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, T): True where a document starts
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
        return idx - start_idx

    @staticmethod
    def build_attention_mask(attention_mask: Tensor | None, document_ids: Tensor | None) -> Tensor | None:
        """Boolean SDPA mask (True = attend): ``None`` when every token sees every other.

        Padding only: ``(B, 1, 1, T)``, masking padded keys. With documents: ``(B, 1, T, T)``, keys
        of the same document only, and every query may attend to itself, so no row is fully masked
        (SDPA would return NaN for it, and the NaN would reach other rows through the values).
        """
        if document_ids is None:
            if attention_mask is None:
                return None
            return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        T = document_ids.size(1)
        mask = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
        mask = mask | torch.eye(T, dtype=torch.bool, device=document_ids.device)
        return mask[:, None]  # (B, 1, T, T)

    # ------------------------------------------------------------------------------------------
    # Heads

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits ``(..., V)`` of hidden states ``(..., C)`` (any leading shape).

        Objectives pass only the positions that count in the loss (``(N, C)``), which skips the
        largest matrix product of the model at the other ~85% of positions.
        """
        if not self.has_mlm_head:
            raise LmforgeError(
                "This BERT has no masked-LM head (mlm_head: false, e.g. converted from a BertModel "
                "checkpoint). Build it with mlm_head: true to train or evaluate masked-LM."
            )
        h = self.mlm_norm(F.gelu(self.mlm_transform(hidden)))  # (..., C)
        weight = self.tok_emb.weight if self.mlm_decoder is None else self.mlm_decoder.weight
        return F.linear(h, weight, self.mlm_bias)  # (..., V)

    def max_positions(self) -> int | None:
        """``block_size`` with learned positions (the table's size); rotary positions have no limit."""
        return self.block_size if self.position == "learned" else None

    def logits(self, hidden: Tensor) -> Tensor:
        """Same as :meth:`mlm_logits`: an encoder's vocabulary logits are its masked-LM predictions."""
        return self.mlm_logits(hidden)

    def forward_flops(self, batch_size: int, input_len: int, target_len: int | None = None, vocab_positions=None):
        """Matmul FLOPs (2 per multiply-add) of one forward over ``batch_size x input_len`` tokens.

        Per layer: q|k|v and output projections, bidirectional scores and values over the full
        ``T x T``, the MLP; then the masked-LM head (transform and vocabulary projection) on
        ``vocab_positions`` rows (default: every position; ``mlm`` projects only the masked ones).
        The pooler and sentence-pair head (``2 B C (C + 2)``) are not counted. See
        :mod:`lmforge.throughput`.
        """
        B, T, C = batch_size, input_len, self.d_model
        n = B * T
        layer = 2 * n * C * 4 * C + 2 * 2 * B * self.n_head * T * T * self.head_dim + 2 * n * C * self.d_ff * 2
        rows = n if vocab_positions is None else vocab_positions
        head = 2 * rows * C * (C + self.vocab_size) if self.has_mlm_head else 0
        return self.n_layer * layer + head

    def embedding_modules(self) -> list[nn.Module]:
        """Token, position and segment embeddings (and the post-LN embedding norm)."""
        return [m for m in (self.tok_emb, self.pos_emb, self.type_emb, self.emb_norm) if m is not None]

    def layer_modules(self) -> list[nn.Module]:
        """The encoder layers, first to last."""
        return list(self.layers)

    def pooled(self, hidden: Tensor) -> Tensor:
        """BERT's pooler: ``tanh(dense(hidden[:, 0]))``, ``(B, T, C)`` -> ``(B, C)``."""
        if self.pooler is None:
            raise LmforgeError("This BERT has no pooler (pooler: false). Build it with pooler: true.")
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, C)

    def pair_logits(self, pooled: Tensor) -> Tensor:
        """Sentence-pair logits ``(B, 2)`` from :meth:`pooled` (0: B follows A; 1: it does not)."""
        if self.pair_head is None:
            raise LmforgeError("This BERT has no sentence-pair head (pair_head: false). Build it with "
                               "pooler: true and pair_head: true.")
        return self.pair_head(pooled)  # (B, 2)

    # ------------------------------------------------------------------------------------------
    # Hugging Face BERT conversion

    def _check_hf_compatible(self) -> None:
        if (self.layout, self.position, self.norm) != ("post_ln", "learned", "layernorm"):
            raise LmforgeError(
                "BERT converts weights to and from Hugging Face only in the BERT configuration: "
                "layout='post_ln', position='learned', norm='layernorm'; this model has "
                f"layout={self.layout!r}, position={self.position!r}, norm={self.norm!r}."
            )

    @classmethod
    def options_from_hf_config(cls, hf_config: dict[str, Any]) -> dict[str, Any]:
        """BERT options for a Hugging Face ``config.json`` of ``model_type`` "bert".

        The heads follow ``architectures``: ``BertForPreTraining`` (pooler, MLM and pair heads),
        ``BertForMaskedLM`` (MLM head only), ``BertForNextSentencePrediction`` (pooler and pair
        head) or ``BertModel`` (pooler only); a config without ``architectures`` is taken as
        ``BertForPreTraining``, the layout of Google's original checkpoints.
        """
        if hf_config.get("model_type") != "bert":
            raise LmforgeError(
                f"The Hugging Face config has model_type {hf_config.get('model_type')!r}, not 'bert'; "
                "the bert architecture converts BERT checkpoints only."
            )
        act = hf_config.get("hidden_act", "gelu")
        if act != "gelu":
            raise LmforgeError(
                f"The Hugging Face BERT config uses hidden_act={act!r}; lmforge's bert uses exact GELU "
                "('gelu') only, so the converted model would compute something else."
            )
        if hf_config.get("position_embedding_type", "absolute") != "absolute" or hf_config.get("is_decoder"):
            raise LmforgeError(
                "The Hugging Face BERT config uses relative position embeddings or is a decoder "
                f"(position_embedding_type={hf_config.get('position_embedding_type')!r}, "
                f"is_decoder={hf_config.get('is_decoder')}); lmforge's bert converts the absolute-position "
                "encoder only."
            )
        architectures = hf_config.get("architectures") or ["BertForPreTraining"]
        heads = HF_HEADS.get(architectures[0])
        if heads is None:
            raise LmforgeError(
                f"The Hugging Face checkpoint is a {architectures[0]}; lmforge's bert converts "
                f"{', '.join(HF_HEADS)}. Save its backbone as a BertModel (model.bert.save_pretrained) first."
            )
        pooler, mlm_head, pair_head = heads
        return {
            "vocab_size": hf_config["vocab_size"],
            "n_layer": hf_config.get("num_hidden_layers", 12),
            "n_head": hf_config.get("num_attention_heads", 12),
            "d_model": hf_config.get("hidden_size", 768),
            "d_ff": hf_config.get("intermediate_size", 3072),
            "block_size": hf_config.get("max_position_embeddings", 512),
            "type_vocab_size": hf_config.get("type_vocab_size", 2),
            "dropout": hf_config.get("hidden_dropout_prob", 0.1),
            "attention_dropout": hf_config.get("attention_probs_dropout_prob", 0.1),
            "norm_eps": hf_config.get("layer_norm_eps", 1e-12),
            "tie_embeddings": hf_config.get("tie_word_embeddings", True),
            "pooler": pooler,
            "mlm_head": mlm_head,
            "pair_head": pair_head,
        }

    def _hf_architecture(self) -> str:
        heads = (self.pooler is not None, self.has_mlm_head, self.has_pair_head)
        for name, layout in HF_HEADS.items():
            if layout == heads:
                return name
        return "BertForPreTraining" if self.has_pair_head else "BertForMaskedLM"

    def hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict for ``transformers.BertConfig`` describing this model."""
        self._check_hf_compatible()
        return {
            "model_type": "bert",
            "architectures": [self._hf_architecture()],
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "intermediate_size": self.d_ff,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.block_size,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": 0.02,
            "layer_norm_eps": self.norm_eps,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": self.tie_embeddings,
        }

    #: lmforge name -> Hugging Face name (after the ``bert.`` prefix for backbone tensors).
    _HF_BACKBONE = {
        "tok_emb.weight": "embeddings.word_embeddings.weight",
        "pos_emb.weight": "embeddings.position_embeddings.weight",
        "type_emb.weight": "embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    _HF_LAYER = {
        "attn.proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense",
        "mlp.proj": "output.dense",
        "norm2": "output.LayerNorm",
    }
    _HF_HEADS = {
        "mlm_transform.weight": "cls.predictions.transform.dense.weight",
        "mlm_transform.bias": "cls.predictions.transform.dense.bias",
        "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_bias": "cls.predictions.bias",
        "mlm_decoder.weight": "cls.predictions.decoder.weight",
        "pair_head.weight": "cls.seq_relationship.weight",
        "pair_head.bias": "cls.seq_relationship.bias",
    }

    def _bare_hf_layout(self) -> bool:
        """True when this model has no head, i.e. it is a ``BertModel`` (names without ``bert.``)."""
        return not self.has_mlm_head and not self.has_pair_head

    def hf_state_dict_to_lmforge(self, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a ``transformers`` BERT state dict to this model's parameter names.

        Accepts ``BertForPreTraining``/``BertForMaskedLM``/``BertForNextSentencePrediction`` keys
        (``bert.`` and ``cls.`` prefixes) and ``BertModel`` keys (no prefix), the older
        ``LayerNorm.gamma``/``beta`` spellings, and files with or without the tied
        ``cls.predictions.decoder.*`` tensors (``save_pretrained`` leaves them out). The separate
        query/key/value projections are concatenated into the fused ``qkv``. The result loads with
        ``self.load_state_dict(..., strict=True)``.
        """
        self._check_hf_compatible()
        hf_to_ours = {hf: ours for ours, hf in self._HF_BACKBONE.items()}
        hf_to_ours.update({hf: ours for ours, hf in self._HF_HEADS.items()})
        out: dict[str, Tensor] = {}
        origin: dict[str, str] = {}  # our name -> the Hugging Face key it came from, for errors
        qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
        decoder_bias = None
        for original, value in hf_state.items():
            key = original.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
                continue  # index buffers, not weights
            if key == "cls.predictions.decoder.bias":
                decoder_bias = value  # the same tensor as cls.predictions.bias (tied)
                continue
            if key == "cls.predictions.decoder.weight" and self.tie_embeddings:
                continue  # tied to the word embeddings
            name = key.removeprefix("bert.")
            if name.startswith("encoder.layer."):
                index, _, rest = name.removeprefix("encoder.layer.").partition(".")
                if rest.startswith("attention.self."):
                    which, _, param = rest.removeprefix("attention.self.").partition(".")
                    qkv.setdefault((int(index), param), {})[which] = value
                    continue
                module, _, param = rest.rpartition(".")
                ours = {hf: o for o, hf in self._HF_LAYER.items()}.get(module)
                ours = f"layers.{index}.{ours}.{param}" if ours else original
            else:
                ours = hf_to_ours.get(name, hf_to_ours.get(key, original))
            out[ours] = value
            origin[ours] = original
        for (index, param), parts in qkv.items():
            if set(parts) != {"query", "key", "value"}:
                raise LmforgeError(
                    f"The Hugging Face state dict has only {sorted(parts)} of layer {index}'s attention "
                    f"{param}; query, key and value are all needed. The checkpoint is incomplete."
                )
            out[f"layers.{index}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        if self.has_mlm_head and decoder_bias is not None and ("mlm_bias" not in out or not self.tie_embeddings):
            # Untied, transformers (5.x) keeps cls.predictions.bias as a separate tensor that its
            # forward never reads: the decoder's own bias is the one that counts.
            out["mlm_bias"] = decoder_bias
        if self.mlm_decoder is not None and "mlm_decoder.weight" not in out and "tok_emb.weight" in out:
            out["mlm_decoder.weight"] = out["tok_emb.weight"].clone()  # the checkpoint ties them; untie by copying
        self._check_keys(out, hf_state, origin)
        return out

    def lmforge_state_dict_to_hf(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Map this model's state dict (default: its current one) to Hugging Face BERT names.

        The names are those of :meth:`hf_config`'s ``architectures`` entry, and the set is what
        ``save_pretrained`` writes: the tied ``cls.predictions.decoder.*`` tensors are left out
        (``transformers`` re-ties them on load). Untied, the decoder matrix is written, and the MLM
        bias under both ``cls.predictions.decoder.bias`` (the one ``transformers`` 5 reads) and
        ``cls.predictions.bias``.
        """
        self._check_hf_compatible()
        state = self.state_dict() if state is None else state
        prefix = "" if self._bare_hf_layout() else "bert."
        out: dict[str, Tensor] = {}
        for name, value in state.items():
            if name in self._HF_BACKBONE:
                out[prefix + self._HF_BACKBONE[name]] = value
            elif name in self._HF_HEADS:
                out[self._HF_HEADS[name]] = value
                if name == "mlm_bias" and not self.tie_embeddings:
                    out["cls.predictions.decoder.bias"] = value  # untied: the bias the decoder reads
            elif name.startswith("layers."):
                index, _, rest = name.removeprefix("layers.").partition(".")
                module, _, param = rest.rpartition(".")
                base = f"{prefix}encoder.layer.{index}."
                if module == "attn.qkv":
                    q, k, v = value.chunk(3, dim=0)
                    for which, part in (("query", q), ("key", k), ("value", v)):
                        out[f"{base}attention.self.{which}.{param}"] = part
                else:
                    out[f"{base}{self._HF_LAYER[module]}.{param}"] = value
            else:
                raise LmforgeError(f"BERT cannot export the tensor {name!r} to Hugging Face names.")
        return out

    def _check_keys(self, converted: dict[str, Tensor], source: dict[str, Tensor], origin: dict[str, str]) -> None:
        """Names and shapes must match this model exactly; say which ones do not, and the fix."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
        if missing or unexpected:
            unexpected = sorted(origin.get(u, u) for u in unexpected)  # the checkpoint's own names
            raise LmforgeError(
                f"The Hugging Face state dict ({len(source)} tensors) does not match this BERT "
                f"(n_layer={self.n_layer}, pooler={self.pooler is not None}, mlm_head={self.has_mlm_head}, "
                f"pair_head={self.has_pair_head}, tie_embeddings={self.tie_embeddings}): missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Build BERT with the "
                "checkpoint's n_layer and heads (see options_from_hf_config)."
            )
        for name, value in converted.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise LmforgeError(
                    f"The Hugging Face tensor for {name} has shape {tuple(value.shape)} but this BERT "
                    f"expects {tuple(own[name].shape)}. Build BERT with the checkpoint's vocab_size, "
                    "d_model (hidden_size), d_ff (intermediate_size), block_size (max_position_embeddings) "
                    "and type_vocab_size."
                )


@hookimpl
def lmforge_architectures():
    return [BERT]
