"""GPT: a decoder-only transformer in one readable file (nanoGPT style).

The default configuration is GPT-2 (learned positions, pre-LayerNorm, GELU MLP, multi-head
attention, tied embeddings), so GPT-2 weights from Hugging Face load into it exactly (see
:meth:`GPT.hf_state_dict_to_lmforge`). Three switches turn it into a Llama-style model without a
second implementation: ``position="rotary"``, ``norm="rmsnorm"`` and ``mlp="swiglu"``; together
with ``n_kv_head`` (grouped-query attention), ``bias=False`` and ``tie_embeddings=False`` the
layout is the same as Llama's.

Reading order: :class:`KVCache`, the rotary helpers, :class:`CausalSelfAttention`, :class:`MLP`,
:class:`Block`, then :class:`GPT`.

Shape legend: ``B`` batch, ``T`` new tokens, ``Tk`` keys attended to (cached + new), ``C``
d_model, ``nh`` query heads, ``nkv`` key/value heads, ``hs`` head size.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import Architecture, LmforgeError, hookimpl

# ----------------------------------------------------------------------------------------------
# Key/value cache


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Memory is allocated once (``(B, nkv, max_length, hs)`` per layer and for each of k and v) so
    that generating token by token never reallocates or concatenates. ``length`` is the number of
    positions already written; :meth:`GPT.forward` writes the keys/values of its new tokens at
    ``length`` in every layer and then advances it.

    Slots are positions *in the cache*, not token positions: with a left-padded batch, slot ``s``
    of a row may hold padding, which the ``attention_mask`` passed to ``forward`` masks out.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, n_kv_head, max_length, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` (B, nkv, T, hs) at the current length; return everything cached so far.

        Does not advance :attr:`length` (every layer writes at the same slots; the model advances
        once after the last layer).
        """
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, Tk, hs)

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as filled."""
        self.length += n

    def reset(self) -> None:
        """Forget everything cached (the memory is kept and reused)."""
        self.length = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep (and repeat) the cached rows ``rows`` (1-D indices), in that order: beam search.

        With as many rows as before, only the filled slots are copied, into the same memory.
        """
        if rows.numel() == self.batch_size:
            filled = slice(0, self.length)
            for cached in (*self.k, *self.v):
                cached[:, :, filled] = cached[:, :, filled].index_select(0, rows)
        else:
            self.k = [k.index_select(0, rows) for k in self.k]
            self.v = [v.index_select(0, rows) for v in self.v]
            self.batch_size = rows.numel()


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), as in Llama: rotate-half on the two halves of each head


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (i, i + hs/2) of ``x`` (B, nh, T, hs) by the angle of its position.

    After the rotation, the dot product of a query at position m with a key at position n depends
    only on m - n: attention sees relative positions only.
    """
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# The layers


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """LayerNorm (GPT-2; bias optional) or RMSNorm (Llama; weight only, no mean subtraction)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with ``n_kv_head`` key/value heads (MHA, GQA or MQA).

    One fused projection ``c_attn`` produces ``[q | k | v]`` with ``nh*hs`` then ``nkv*hs`` then
    ``nkv*hs`` features. With ``nkv == nh`` this is exactly GPT-2's ``c_attn``, so GPT-2 weights
    load without reshuffling. With fewer key/value heads, query head ``h`` uses key/value head
    ``h // (nh // nkv)`` (consecutive query heads share one, as in Llama).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, hs) each
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, Tk, hs): cached keys followed by the new ones
            k, v = k.to(q.dtype), v.to(q.dtype)
        if nkv != nh:
            # Share each key/value head among nh // nkv consecutive query heads. Repeating (rather
            # than SDPA's newer enable_gqa flag) works on every torch version this package supports.
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # Fast path: plain causal attention lets SDPA pick a flash/memory-efficient kernel. One new
            # query after a cache (token-by-token decoding) attends to every key: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh*hs)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """The feed-forward network: GELU (GPT-2) or SwiGLU (Llama).

    GELU: ``c_proj(gelu_tanh(c_fc(x)))``. SwiGLU: ``c_proj(silu(c_gate(x)) * c_fc(x))``; the gate
    makes it more expressive per parameter, which is why its default width is 2/3 of GELU's.
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        if kind == "swiglu":
            self.c_gate = nn.Linear(d_model, d_ff, bias=bias)
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)  # (B, T, d_ff)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, d_ff); GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Normalising before each sublayer (GPT-2) keeps the residual stream an untouched sum, which
    trains stably without warm-up tricks.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        d_ff: int,
        norm: str,
        norm_eps: float,
        mlp: str,
        bias: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.ln_1 = make_norm(norm, d_model, norm_eps, bias)
        self.attn = CausalSelfAttention(d_model, n_head, n_kv_head, bias, dropout)
        self.ln_2 = make_norm(norm, d_model, norm_eps, bias)
        self.mlp = MLP(d_model, d_ff, mlp, bias, dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# ----------------------------------------------------------------------------------------------
# The model


class GPT(Architecture):
    """A GPT-style decoder-only transformer (GPT-2 by default; Llama-style with the switches below).

    Args:
        vocab_size: Number of token ids. Normally left out: the CLI fills it in from the data's
            tokenizer. Required when building the model in Python.
        n_layer: Number of transformer blocks.
        n_head: Number of attention (query) heads. Must divide ``d_model``.
        n_kv_head: Number of key/value heads. ``None`` means ``n_head`` (multi-head attention);
            ``1`` is multi-query attention; a value in between is grouped-query attention, which
            shrinks the KV cache. Must divide ``n_head``.
        d_model: Width of the residual stream (embedding size).
        d_ff: Hidden width of the MLP. ``None`` means ``4 * d_model`` for ``mlp="gelu"`` and, for
            ``mlp="swiglu"``, ``8 * d_model / 3`` rounded up to a multiple of 64 (about the same
            number of parameters as the GELU MLP, since SwiGLU has three matrices instead of two).
        block_size: Longest sequence the model handles. With ``position="learned"`` it is the
            size of the position table and a hard limit; with ``"rotary"`` it is only nominal.
        dropout: Dropout probability on embeddings, attention weights and residual branches.
        bias: Whether linear layers and LayerNorms have biases (GPT-2: yes; Llama: no).
        tie_embeddings: Use the token embedding matrix as the output projection (GPT-2 does).
            Otherwise the LM head is a separate bias-free linear layer.
        position: ``"learned"``: an absolute position embedding table added to the token
            embeddings (GPT-2). ``"rotary"``: rotary embeddings applied to queries and keys
            (RoPE, Llama), which makes attention depend on relative positions only.
        rope_base: Base of the rotary frequencies (only used with ``position="rotary"``).
        norm: ``"layernorm"`` (GPT-2) or ``"rmsnorm"`` (Llama; weight only).
        norm_eps: Epsilon of the normalisation layers.
        mlp: ``"gelu"``: GELU with tanh approximation (GPT-2's ``gelu_new``). ``"swiglu"``: gated
            SiLU (Llama).
        activation_checkpointing: Keep only each block's input during the forward pass and
            recompute the block's activations in the backward pass (``torch.utils.checkpoint``,
            non-reentrant): activation memory falls from every layer's intermediates to one
            ``(B, T, d_model)`` tensor per block, for about one extra forward pass of compute.
            Training only; works with every strategy, DeepSpeed ZeRO 1-3 included.
    """

    name = "gpt"
    families = ("decoder",)
    hf_model_type = "gpt2"
    default_objective = "clm"

    def __init__(
        self,
        vocab_size: int | None = None,
        n_layer: int = 4,
        n_head: int = 4,
        n_kv_head: int | None = None,
        d_model: int = 256,
        d_ff: int | None = None,
        block_size: int = 256,
        dropout: float = 0.0,
        bias: bool = True,
        tie_embeddings: bool = True,
        position: Literal["learned", "rotary"] = "learned",
        rope_base: float = 10000.0,
        norm: Literal["layernorm", "rmsnorm"] = "layernorm",
        norm_eps: float = 1e-5,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        self._validate(vocab_size, n_layer, n_head, n_kv_head, d_model, block_size, dropout, position, norm, mlp)
        if d_ff is None:
            d_ff = 4 * d_model if mlp == "gelu" else 64 * math.ceil(8 * d_model / 3 / 64)

        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.d_model = d_model
        self.d_ff = d_ff
        self.head_dim = d_model // n_head
        self.block_size = block_size
        self.position = position
        self.norm = norm
        self.mlp = mlp
        self.bias = bias
        self.tie_embeddings = tie_embeddings

        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model) if position == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            Block(d_model, n_head, n_kv_head, d_ff, norm, norm_eps, mlp, bias, dropout) for _ in range(n_layer)
        )
        self.ln_f = make_norm(norm, d_model, norm_eps, bias)
        # Tied embeddings reuse wte.weight in logits() rather than sharing a Parameter between two
        # modules, so the state dict holds each tensor once (safetensors refuses shared tensors).
        self.lm_head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.rope_base = rope_base
        self.activation_checkpointing = activation_checkpointing

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth (each block adds two such outputs).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _validate(vocab_size, n_layer, n_head, n_kv_head, d_model, block_size, dropout, position, norm, mlp) -> None:
        """Check the options together, with messages that name the option and the fix."""
        if vocab_size is None:
            raise LmforgeError(
                "GPT needs vocab_size, the number of token ids. The lmforge CLI fills it in from the "
                "data's tokenizer, so leave it out of the YAML there; when building GPT in Python, "
                "pass it explicitly, e.g. GPT(vocab_size=tokenizer.vocab_size)."
            )
        if vocab_size < 1:
            raise LmforgeError(f"GPT vocab_size must be a positive integer, got {vocab_size}.")
        for option, value in (("n_layer", n_layer), ("n_head", n_head), ("n_kv_head", n_kv_head),
                              ("d_model", d_model), ("block_size", block_size)):
            if value < 1:
                raise LmforgeError(f"GPT {option} must be a positive integer, got {value}.")
        if not 0.0 <= dropout < 1.0:
            raise LmforgeError(f"GPT dropout is a probability in [0, 1), got {dropout}.")
        if d_model % n_head != 0:
            raise LmforgeError(
                f"GPT d_model ({d_model}) must be divisible by n_head ({n_head}): each head gets "
                f"d_model / n_head features. Change d_model or n_head so that n_head divides d_model."
            )
        if n_head % n_kv_head != 0:
            raise LmforgeError(
                f"GPT n_kv_head ({n_kv_head}) must divide n_head ({n_head}): each key/value head is "
                f"shared by n_head / n_kv_head query heads. Use a divisor of n_head (n_head for "
                f"multi-head attention, 1 for multi-query), or leave n_kv_head unset."
            )
        if position == "rotary" and (d_model // n_head) % 2 != 0:
            raise LmforgeError(
                f"GPT position='rotary' needs an even head size, but d_model / n_head = "
                f"{d_model // n_head}. Change d_model or n_head."
            )
        for option, value, allowed in (("position", position, ("learned", "rotary")),
                                       ("norm", norm, ("layernorm", "rmsnorm")),
                                       ("mlp", mlp, ("gelu", "swiglu"))):
            if value not in allowed:
                raise LmforgeError(f"GPT {option} must be one of {allowed}, got {value!r}.")

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases (norms keep ones/zeros)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Hidden states after the final norm, ``(B, T, d_model)``.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, Tk)`` of 1 (real token) / 0 (padding), over every key: the
                ``T`` new tokens without a cache, the ``cache.length + T`` cached and new tokens
                with one. Padding keys are never attended to.
            position_ids: ``(B, T)`` or ``(T,)`` absolute positions of the new tokens. Default:
                ``0 .. T-1``; with ``document_ids``, restarting at 0 at each new document; with a
                cache, continuing from ``cache.length``. With left padding, pass them (e.g.
                ``attention_mask.cumsum(-1) - 1`` clamped at 0) so real tokens start at 0.
            document_ids: ``(B, T)`` ids of the packed document each token belongs to: a token
                only attends to earlier tokens of the same document. Not supported with a cache.
            cache: A :class:`KVCache` from :meth:`new_cache`. The new keys/values are written at
                ``cache.length``, attention covers everything cached so far, and the cache's
                length then advances by ``T``.
        """
        B, T = input_ids.size()
        past = 0 if cache is None else cache.length
        self._check_inputs(B, T, past, attention_mask, position_ids, document_ids, cache)
        device = input_ids.device

        if position_ids is None:
            if document_ids is not None:
                position_ids = self.document_positions(document_ids)  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=device)  # (T,)
        position_ids = position_ids.expand(B, T)  # (B, T)

        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.position == "learned":
            x = x + self.wpe(position_ids)  # (B, T, C)
        else:
            # Frequencies are recomputed in float32 each call (hs/2 numbers) rather than kept in a
            # buffer, which a bf16 model would round and so blur the angles of far positions.
            hs = self.head_dim
            inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs))
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        x = self.drop(x)

        mask = None
        # A single new token with a cache and no padding sees every cached key: it needs no mask.
        if (cache is not None and T > 1) or attention_mask is not None or document_ids is not None:
            mask = self.build_attention_mask(T, past, attention_mask, document_ids, device)  # (B|1, 1, T, Tk)
        checkpointing = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.h):
            if checkpointing:  # recompute the block in backward instead of keeping its activations
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, layer, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)  # (B, T, C)

    def _check_inputs(self, B, T, past, attention_mask, position_ids, document_ids, cache) -> None:
        """Shape checks that are cheap (no device sync) and turn silent misuse into clear errors."""
        if self.position == "learned" and past + T > self.block_size:
            raise LmforgeError(
                f"GPT got {past + T} positions but block_size is {self.block_size} and "
                f"position='learned' has no embedding beyond it. Use shorter inputs or a larger "
                f"block_size."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise LmforgeError(
                f"GPT attention_mask must have shape (batch, cached + new tokens) = {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}. With a cache it covers every cached token too."
            )
        if document_ids is not None:
            if cache is not None:
                raise LmforgeError("GPT does not support document_ids together with a KV cache; "
                                   "generate one document per row instead.")
            if tuple(document_ids.shape) != (B, T):
                raise LmforgeError(f"GPT document_ids must have the shape of input_ids {(B, T)}, "
                                   f"got {tuple(document_ids.shape)}.")
        if position_ids is not None and position_ids.shape[-1] != T:
            raise LmforgeError(f"GPT position_ids must end in the sequence length {T}, "
                               f"got shape {tuple(position_ids.shape)}.")
        if cache is not None:
            if cache.batch_size != B:
                raise LmforgeError(f"GPT got a batch of {B} rows but the cache was made for "
                                   f"{cache.batch_size}; make it with new_cache({B}, max_length).")
            if past + T > cache.max_length:
                raise LmforgeError(
                    f"GPT KV cache is full: it holds {cache.max_length} positions, {past} are used "
                    f"and {T} more were given. Make it with a larger max_length."
                )

    @staticmethod
    def document_positions(document_ids: Tensor) -> Tensor:
        """Positions that restart at 0 where the document id changes: ``(B, T)`` -> ``(B, T)``.

        Example: document ids ``[7, 7, 7, 9, 9]`` give positions ``[0, 1, 2, 0, 1]``.
        """
        B, T = document_ids.shape
        idx = torch.arange(T, device=document_ids.device).expand(B, T)  # (B, T)
        starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, T): True where a document starts
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
        return idx - start_idx

    @staticmethod
    def build_attention_mask(
        T: int,
        past: int,
        attention_mask: Tensor | None,
        document_ids: Tensor | None,
        device: torch.device,
    ) -> Tensor:
        """Boolean mask for SDPA (True = attend), ``(B, 1, T, Tk)`` or ``(1, 1, T, Tk)``.

        Query ``i`` sits in cache slot ``past + i`` and key ``j`` in slot ``j``: causality is by
        slot, which is the order in which tokens were fed (so it is right however the position ids
        of a left-padded batch are chosen). Padding keys and keys of another document are masked.
        Every query may attend to itself: a row with nothing else to attend to (a left-padding
        token) would otherwise be fully masked and SDPA would return NaN for it.
        """
        Tk = past + T
        q_slot = torch.arange(past, Tk, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
        mask = (k_slot <= q_slot)[None, None]  # (1, 1, T, Tk)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, Tk)
        if document_ids is not None:  # no cache here, so Tk == T
            same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
            mask = mask & same_doc[:, None]  # (B, 1, T, T)
        return mask | (k_slot == q_slot)[None, None]  # (B|1, 1, T, Tk)

    def max_positions(self) -> int | None:
        """``block_size`` with learned positions (the table's size); rotary positions have no limit."""
        return self.block_size if self.position == "learned" else None

    def logits(self, hidden: Tensor) -> Tensor:
        """Project hidden states ``(B, T, C)`` to vocabulary logits ``(B, T, vocab_size)``."""
        if self.lm_head is None:
            return F.linear(hidden, self.wte.weight)  # (B, T, V)
        return self.lm_head(hidden)  # (B, T, V)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` rows and up to ``max_length`` positions.

        It is allocated in the dtype and on the device of the model's parameters.
        """
        if self.position == "learned" and max_length > self.block_size:
            raise LmforgeError(
                f"GPT cache max_length ({max_length}) exceeds block_size ({self.block_size}), and "
                f"position='learned' has no embedding beyond block_size. Use max_length <= "
                f"{self.block_size} or train with a larger block_size."
            )
        w = self.wte.weight
        return KVCache(self.n_layer, batch_size, self.n_kv_head, max_length, self.head_dim, w.dtype, w.device)

    def embedding_modules(self) -> list[nn.Module]:
        """Token and (learned) position embeddings; the token embedding is also the tied output head."""
        return [m for m in (self.wte, self.wpe) if m is not None]

    def layer_modules(self) -> list[nn.Module]:
        """The transformer blocks, first to last."""
        return list(self.h)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the family's default rule (biases, norms and embeddings)."""
        return set()

    def forward_flops(self, batch_size: int, input_len: int, target_len: int | None = None, vocab_positions=None):
        """Matmul FLOPs (2 per multiply-add) of one forward over ``batch_size x input_len`` tokens.

        Per layer: the fused q|k|v projection (``nh + 2 nkv`` heads), scores and values over the
        full ``T x T`` (causal counted in full, as PaLM's MFU does), the output projection and the
        MLP (three matrices for SwiGLU); then the vocabulary projection of ``vocab_positions`` rows
        (default: every position). See :mod:`lmforge.throughput`.
        """
        B, T, C, hs = batch_size, input_len, self.d_model, self.head_dim
        n = B * T
        projections = 2 * n * C * (self.n_head + 2 * self.n_kv_head) * hs + 2 * n * self.n_head * hs * C
        attention = 2 * 2 * B * self.n_head * T * T * hs  # q @ k^T and probs @ v
        mlp = 2 * n * C * self.d_ff * (3 if self.mlp == "swiglu" else 2)
        rows = n if vocab_positions is None else vocab_positions
        return self.n_layer * (projections + attention + mlp) + 2 * rows * C * self.vocab_size

    # ------------------------------------------------------------------------------------------
    # Hugging Face GPT-2 conversion

    _HF_SKIP = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers
    _HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def _check_hf_compatible(self) -> None:
        if (self.position, self.norm, self.mlp) != ("learned", "layernorm", "gelu") or not self.bias \
                or self.n_kv_head != self.n_head:
            raise LmforgeError(
                "GPT converts weights to and from Hugging Face GPT-2 only in the GPT-2 configuration: "
                "position='learned', norm='layernorm', mlp='gelu', bias=True and n_kv_head equal to "
                f"n_head; this model has position={self.position!r}, norm={self.norm!r}, "
                f"mlp={self.mlp!r}, bias={self.bias}, n_head={self.n_head}, n_kv_head={self.n_kv_head}."
            )

    @classmethod
    def options_from_hf_config(cls, hf_config: dict) -> dict:
        """GPT options for a Hugging Face GPT-2 ``config.json``."""
        if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmforgeError(
                f"GPT converts GPT-2 checkpoints with the tanh GELU only; this one uses "
                f"activation_function={hf_config['activation_function']!r}."
            )
        return {
            "vocab_size": hf_config["vocab_size"],
            "n_layer": hf_config["n_layer"],
            "n_head": hf_config["n_head"],
            "d_model": hf_config["n_embd"],
            "d_ff": hf_config.get("n_inner") or 4 * hf_config["n_embd"],
            "block_size": hf_config["n_positions"],
            "dropout": 0.0,
            "norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": hf_config.get("tie_word_embeddings", True),
        }

    def hf_config(self) -> dict:
        """A ``transformers.GPT2Config`` dict for this model (GPT-2 configuration only)."""
        self._check_hf_compatible()
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_embd": self.d_model,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.ln_f.eps,
            "tie_word_embeddings": self.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }

    def hf_state_dict_to_lmforge(self, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a ``transformers`` GPT-2 state dict to this model's parameter names.

        Accepts ``GPT2LMHeadModel`` (``transformer.`` prefix) and ``GPT2Model`` (no prefix) keys.
        GPT-2 stores its linear layers as ``Conv1D`` with weights ``(in, out)``; they are transposed
        to ``nn.Linear``'s ``(out, in)``. ``lm_head.weight`` is used only when this model does not
        tie embeddings. The result loads with ``self.load_state_dict(..., strict=True)``.
        """
        self._check_hf_compatible()
        out: dict[str, Tensor] = {}
        for key, value in hf_state.items():
            if key.endswith(self._HF_SKIP):
                continue
            if key == "lm_head.weight":
                if not self.tie_embeddings:
                    out["lm_head.weight"] = value
                continue
            name = key.removeprefix("transformer.")
            if name.endswith(self._HF_CONV1D):
                value = value.t().contiguous()
            out[name] = value
        if not self.tie_embeddings and "lm_head.weight" not in out and "wte.weight" in out:
            out["lm_head.weight"] = out["wte.weight"].clone()  # HF ties them; untie by copying
        self._check_keys(out, hf_state)
        return out

    def lmforge_state_dict_to_hf(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Map this model's state dict (default: its current one) to ``GPT2LMHeadModel`` names."""
        self._check_hf_compatible()
        state = self.state_dict() if state is None else state
        out: dict[str, Tensor] = {}
        for name, value in state.items():
            if name == "lm_head.weight":
                out["lm_head.weight"] = value
                continue
            if name.endswith(self._HF_CONV1D):
                value = value.t().contiguous()
            out["transformer." + name] = value
        if "lm_head.weight" not in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]  # tied, as in GPT-2
        return out

    def _check_keys(self, converted: dict[str, Tensor], source: dict[str, Tensor]) -> None:
        """Names and shapes must match this model exactly; say which ones do not, and the fix."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(converted)), sorted(set(converted) - set(own))
        if missing or unexpected:
            raise LmforgeError(
                f"The Hugging Face state dict ({len(source)} tensors) does not match this GPT "
                f"(n_layer={self.n_layer}, tie_embeddings={self.tie_embeddings}): missing "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Build GPT with the "
                f"checkpoint's n_layer, d_model, n_head and vocab_size."
            )
        for name, value in converted.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise LmforgeError(
                    f"The Hugging Face tensor for {name} has shape {tuple(value.shape)} but this GPT "
                    f"expects {tuple(own[name].shape)}. Build GPT with the checkpoint's vocab_size, "
                    f"d_model, block_size (n_positions) and d_ff (n_inner)."
                )


@hookimpl
def lmforge_architectures():
    return [GPT]
