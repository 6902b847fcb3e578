"""T5: an encoder-decoder transformer with bucketed relative position biases (T5 v1.0 and v1.1).

What makes T5 T5, all of it here:

* no position embeddings: each attention layer adds a learned bias per head and *bucket* of
  relative distance (exact for short distances, logarithmic up to ``relative_attention_max_distance``,
  one bucket beyond). The encoder's buckets are bidirectional, the decoder's causal. The bias is
  computed once per forward (from the first layer's table, as T5 does) and shared by every layer;
  cross-attention has none;
* RMSNorm without bias (``T5LayerNorm``: no mean subtraction, variance in float32), pre-norm blocks,
  no bias in any linear layer;
* no ``1/sqrt(d)`` scaling of attention scores (T5 folds it into the initialisation of the query
  projection);
* the feed-forward is ReLU (T5 v1.0) or gated GELU with the tanh approximation (v1.1);
* tied embeddings (v1.0: the decoder output is scaled by ``d_model**-0.5`` before the projection
  with the shared embedding) or a separate LM head (v1.1, no scaling).

Hugging Face ``T5ForConditionalGeneration`` weights load exactly (:meth:`T5.hf_state_dict_to_lmforge`).
The layout differs from Hugging Face's only in fusing projections that read the same input:
``q|k|v`` of self-attention, ``k|v`` of cross-attention and, in v1.1, ``wi_0|wi_1``.

Reading order: :class:`T5Cache`, :func:`relative_position_bucket`, :class:`RelativePositionBias`,
:class:`T5Norm`, :class:`SelfAttention`, :class:`CrossAttention`, :class:`FeedForward`,
:class:`EncoderBlock`, :class:`DecoderBlock`, then :class:`T5`.

Shape legend: ``B`` batch, ``S`` encoder tokens, ``T`` new decoder tokens, ``Tk`` decoder keys
(cached + new), ``C`` d_model, ``nh`` heads, ``hs`` d_kv (head size), ``F`` d_ff.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import Architecture, LmforgeError, hookimpl

# ----------------------------------------------------------------------------------------------
# Decoder cache


class T5Cache:
    """Decoder self-attention keys/values and cross-attention keys/values, for incremental decoding.

    Self-attention memory is allocated once (``(B, nh, max_length, hs)`` per decoder layer for each
    of k and v); :meth:`T5.decode` writes the new tokens' keys/values at :attr:`length` and then
    advances it. Cross-attention keys/values depend only on the encoder output: the first cached
    ``decode`` call computes them and later calls reuse them.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, n_head, max_length, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.cross_k: list[Tensor | None] = [None] * n_layer
        self.cross_v: list[Tensor | None] = [None] * n_layer
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` (B, nh, T, hs) at the current length; return everything cached so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, Tk, hs)

    def advance(self, n: int) -> None:
        """Mark ``n`` more decoder positions as filled (called once per ``decode``, after all layers)."""
        self.length += n

    def reorder(self, rows: Tensor) -> None:
        """Keep (and repeat) the cached rows ``rows`` (1-D indices), in that order: beam search.

        With as many rows as before, only the filled self-attention slots are copied, into the same
        memory; the cross-attention keys/values (as long as the encoder output) are selected anew.
        """
        if rows.numel() == self.batch_size:
            filled = slice(0, self.length)
            for cached in (*self.k, *self.v):
                cached[:, :, filled] = cached[:, :, filled].index_select(0, rows)
        else:
            self.k = [k.index_select(0, rows) for k in self.k]
            self.v = [v.index_select(0, rows) for v in self.v]
        self.cross_k = [None if k is None else k.index_select(0, rows) for k in self.cross_k]
        self.cross_v = [None if v is None else v.index_select(0, rows) for v in self.cross_v]
        self.batch_size = rows.numel()


# ----------------------------------------------------------------------------------------------
# Relative position buckets


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """The bucket of each ``relative_position`` (key position minus query position), as in T5.

    Bidirectional: half the buckets for keys after the query, half for keys before it. Within each
    half, distances below ``max_exact`` (a quarter of the buckets, bidirectionally) get a bucket
    each; larger ones share logarithmically wider buckets up to ``max_distance``, and everything
    farther falls in the last bucket. Causal: only keys at or before the query count (a future key
    maps to the bucket of distance 0; the causal mask hides it anyway).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Embedding):
    """A learned bias per (bucket, head): ``forward(q_len, k_len, offset)`` -> ``(1, nh, q_len, k_len)``.

    Query ``i`` sits at position ``offset + i`` and key ``j`` at position ``j`` (with a decoder
    cache, ``offset`` is the number of tokens already cached).
    """

    def __init__(self, num_buckets: int, max_distance: int, n_head: int, bidirectional: bool) -> None:
        super().__init__(num_buckets, n_head)
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> Tensor:  # type: ignore[override]
        device = self.weight.device
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        bucket = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_embeddings, self.max_distance)
        # Contiguous: the (nh, T, Tk) bias is added to every row's scores, and adding a transposed
        # (strided) operand is several times slower than the one small copy made here.
        return F.embedding(bucket, self.weight).permute(2, 0, 1).contiguous().unsqueeze(0)  # (1, nh, T, Tk)


# ----------------------------------------------------------------------------------------------
# The layers


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout``, except on CPU, where the mask is ``uniform[0, 1) >= p`` (kept with probability
    ``1 - p``, then scaled by ``1 / (1 - p)`` as always).

    PyTorch's CPU Bernoulli sampler takes about twice as long as drawing uniforms and comparing,
    and T5 applies dropout to six tensors per layer: with ``dropout: 0.1`` the masks were a sixth
    of a CPU training step. The masks differ from ``F.dropout``'s for the same seed, not in law.
    """
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    keep = torch.rand(x.shape, dtype=torch.float32) >= p  # bool: what autograd keeps for backward
    return x.mul(keep).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`dropout` (faster on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class RMSNormFunction(torch.autograd.Function):
    """``weight * x / sqrt(mean(x^2) + eps)`` in float32, with a hand-written backward.

    Autograd through the composite (square, mean, rsqrt, two products) makes about twice as many
    passes over the activations as the closed form used here; T5 has ``3 * n_layer + 2`` such norms.
    With ``y = x * rstd`` and ``g`` the output gradient: ``dL/dx = rstd * (g*w - y * mean(g*w*y))``
    and ``dL/dw = sum over positions of g*y``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x.float()
        norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)  # (..., 1): sqrt(sum x^2), one pass
        rstd = torch.rsqrt(norm.square_().div_(x.size(-1)).add_(eps))  # (..., 1)
        y = x32 * rstd
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return (y * weight).to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, rstd, weight = ctx.saved_tensors
        grad = grad.float()
        gy = grad * weight.float()
        mean_gy_y = torch.linalg.vecdot(gy, y, dim=-1).unsqueeze(-1).div_(y.size(-1))  # (..., 1)
        grad_x = torch.addcmul(gy, y, mean_gy_y, value=-1).mul_(rstd)
        grad_w = (grad * y).reshape(-1, y.size(-1)).sum(0)
        return grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), None


class T5Norm(nn.Module):
    """T5's layer norm: RMSNorm with a weight and no bias, the mean square taken in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused ``[q | k | v]`` projection and no score scaling.

    ``mask`` is an additive float mask ``(B|1, nh, T, Tk)``: the relative position bias, with the
    smallest float where attention is not allowed (padding, the future). It goes to
    ``scaled_dot_product_attention`` (with ``scale=1.0``), except while the bias is being trained on CPU.
    """

    def __init__(self, d_model: int, n_head: int, d_kv: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_kv
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * n_head * d_kv, bias=False)
        self.o = nn.Linear(n_head * d_kv, d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor, cache: T5Cache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        # split (not view + unbind): its backward concatenates the three gradients straight into the
        # (B, T, 3C) layout, where unbind's would stack them and then copy once more. 3 x (B, nh, T, hs).
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in self.qkv(x).split(nh * hs, dim=-1))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, Tk, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if mask.requires_grad and q.device.type == "cpu":
            # Training the bias on CPU: SDPA can then only run its reference "math" path, which also
            # scales q and k by 1.0 and runs a NaN-guarding softmax. This is the same math, ~7% faster
            # per step. On GPU, SDPA's memory-efficient kernel takes a bias that needs a gradient.
            scores = torch.matmul(q, k.transpose(-1, -2))  # (B, nh, T, Tk); no 1/sqrt(hs) in T5
            # In place (matmul's backward needs only q and k) unless a float32 bias must promote
            # lower-precision scores (autocast), as the out-of-place sum does.
            scores = scores.add_(mask) if scores.dtype == mask.dtype else scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # (B, nh, T, Tk)
            if dropout_p:
                probs = dropout(probs, dropout_p)
            y = torch.matmul(probs, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout_p, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, C)


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, fused ``[k | v]`` from the encoder.

    No position bias (T5 has none here); ``mask`` is ``None`` or a boolean ``(B, 1, 1, S)`` that is
    False at encoder padding.
    """

    def __init__(self, d_model: int, n_head: int, d_kv: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_kv
        self.dropout = dropout
        self.q = nn.Linear(d_model, n_head * d_kv, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_head * d_kv, bias=False)
        self.o = nn.Linear(n_head * d_kv, d_model, bias=False)

    def forward(
        self, x: Tensor, encoder_hidden: Tensor, mask: Tensor | None, cache: T5Cache | None = None, layer: int = 0
    ) -> Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None and cache.cross_k[layer] is not None:
            k, v = cache.cross_k[layer], cache.cross_v[layer]  # (B, nh, S, hs)
        else:
            S = encoder_hidden.size(1)
            kv = self.kv(encoder_hidden).split(nh * hs, dim=-1)  # 2 x (B, S, nh*hs): see SelfAttention
            k, v = (t.view(B, S, nh, hs).transpose(1, 2) for t in kv)  # (B, nh, S, hs)
            if cache is not None:
                cache.cross_k[layer], cache.cross_v[layer] = k, v
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, C)


class GatedGeluFunction(torch.autograd.Function):
    """``gelu_tanh(gate) * linear`` of ``h = [gate | linear]`` ``(B, T, 2F)``, with a hand-written backward.

    Autograd through ``chunk`` computes the two halves' gradients separately and then concatenates
    them for ``wi``'s backward, an extra pass that costs as much as the GELU on CPU; here they are
    written into one tensor directly. The arithmetic (``gelu_backward`` of ``grad * linear``; ``grad * gelu(gate)``) is
    autograd's own, so the gradients are the same to the bit.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, linear = h.chunk(2, dim=-1)  # (B, T, F) each
        act = F.gelu(gate, approximate="tanh")
        ctx.save_for_backward(h, act)
        return act * linear

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        h, act = ctx.saved_tensors
        gate, linear = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)  # (B, T, 2F)
        grad_gate, grad_linear = grad_h.chunk(2, dim=-1)
        torch.ops.aten.gelu_backward.grad_input(grad * linear, gate, approximate="tanh", grad_input=grad_gate)
        torch.mul(grad, act, out=grad_linear)
        return grad_h


class FeedForward(nn.Module):
    """ReLU (T5 v1.0): ``wo(relu(wi(x)))``; gated GELU (v1.1): ``wo(gelu_tanh(x W0) * (x W1))``.

    For the gated form ``wi`` holds ``[W0 | W1]`` fused (Hugging Face's ``wi_0`` and ``wi_1``).
    """

    def __init__(self, d_model: int, d_ff: int, kind: str, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.wi = nn.Linear(d_model, (2 if kind == "gated-gelu" else 1) * d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gated-gelu":
            h = GatedGeluFunction.apply(self.wi(x))  # (B, T, F): T5 v1.1's "gelu_new" gate
        else:
            h = F.relu(self.wi(x))  # (B, T, F)
        return self.wo(self.dropout(h))  # (B, T, C)


class EncoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``x + ff(norm(x))``, with dropout on each branch."""

    def __init__(self, d_model: int, n_head: int, d_kv: int, d_ff: int, ff: str, eps: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = T5Norm(d_model, eps)
        self.attn = SelfAttention(d_model, n_head, d_kv, dropout)
        self.ff_norm = T5Norm(d_model, eps)
        self.ff = FeedForward(d_model, d_ff, ff, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), mask))  # (B, S, C)
        return x + self.drop(self.ff(self.ff_norm(x)))  # (B, S, C)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder, then the feed-forward; all pre-norm."""

    def __init__(self, d_model: int, n_head: int, d_kv: int, d_ff: int, ff: str, eps: float, dropout: float) -> None:
        super().__init__()
        self.attn_norm = T5Norm(d_model, eps)
        self.attn = SelfAttention(d_model, n_head, d_kv, dropout)
        self.cross_attn_norm = T5Norm(d_model, eps)
        self.cross_attn = CrossAttention(d_model, n_head, d_kv, dropout)
        self.ff_norm = T5Norm(d_model, eps)
        self.ff = FeedForward(d_model, d_ff, ff, dropout)
        self.drop = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        encoder_hidden: Tensor,
        cross_mask: Tensor | None,
        cache: T5Cache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), mask, cache, layer))  # (B, T, C)
        x = x + self.drop(self.cross_attn(self.cross_attn_norm(x), encoder_hidden, cross_mask, cache, layer))
        return x + self.drop(self.ff(self.ff_norm(x)))  # (B, T, C)


class Stack(nn.Module):
    """The encoder or the decoder: the shared relative position bias, the blocks and a final norm."""

    def __init__(self, blocks: list[nn.Module], position_bias: RelativePositionBias, d_model: int, eps: float) -> None:
        super().__init__()
        self.position_bias = position_bias
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = T5Norm(d_model, eps)


# ----------------------------------------------------------------------------------------------
# The model


class T5(Architecture):
    """A T5 encoder-decoder (v1.1 by default; v1.0 with ``feed_forward: relu, tie_embeddings: true``).

    Args:
        vocab_size: Number of token ids. Normally left out: the CLI fills it in from the data's
            tokenizer. Required when building T5 in Python.
        d_model: Width of the residual stream (embedding size).
        d_kv: Size of each attention head. ``None`` means ``d_model // n_head``.
        d_ff: Hidden width of the feed-forward network.
        n_layer: Number of encoder blocks.
        n_decoder_layer: Number of decoder blocks. ``None`` means ``n_layer``.
        n_head: Number of attention heads.
        relative_attention_num_buckets: Number of relative-distance buckets (per direction in the
            encoder, half are for keys before the query and half for keys after it).
        relative_attention_max_distance: Distances from here on share the last bucket.
        dropout: Dropout probability on embeddings, attention weights, every residual branch, the
            feed-forward hidden layer and the final outputs (T5 pretraining used 0.1; 0.0 is usual
            for short runs).
        layer_norm_eps: Epsilon of the RMS norms.
        feed_forward: ``"relu"`` (T5 v1.0) or ``"gated-gelu"`` (T5 v1.1: gated GELU with the tanh
            approximation).
        tie_embeddings: Project the decoder output with the shared embedding matrix, after scaling
            it by ``d_model**-0.5`` (T5 v1.0). Otherwise a separate bias-free LM head, unscaled
            (T5 v1.1).
        decoder_start_token_id: The token the decoder starts from, in training (labels are shifted
            right behind it) and in generation. ``None``: the tokenizer's padding token, filled in
            by the CLI (T5 uses its pad id, 0); 0 when T5 is built in Python.
    """

    name = "t5"
    families = ("seq2seq",)
    hf_model_type = "t5"
    default_objective = "span_corruption"

    def __init__(
        self,
        vocab_size: int | None = None,
        d_model: int = 256,
        d_kv: int | None = None,
        d_ff: int = 1024,
        n_layer: int = 4,
        n_decoder_layer: int | None = None,
        n_head: int = 4,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-6,
        feed_forward: Literal["relu", "gated-gelu"] = "gated-gelu",
        tie_embeddings: bool = False,
        decoder_start_token_id: int | None = None,
    ) -> None:
        super().__init__()
        n_decoder_layer = n_layer if n_decoder_layer is None else n_decoder_layer
        decoder_start_token_id = 0 if decoder_start_token_id is None else decoder_start_token_id
        self._validate(
            vocab_size, d_model, d_kv, d_ff, n_layer, n_decoder_layer, n_head, relative_attention_num_buckets,
            relative_attention_max_distance, dropout, feed_forward, decoder_start_token_id,
        )
        d_kv = d_model // n_head if d_kv is None else d_kv
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.n_layer = n_layer
        self.n_decoder_layer = n_decoder_layer
        self.n_head = n_head
        self.num_buckets = relative_attention_num_buckets
        self.max_distance = relative_attention_max_distance
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.feed_forward = feed_forward
        self.tie_embeddings = tie_embeddings
        self.decoder_start_token_id = decoder_start_token_id

        block_args = (d_model, n_head, d_kv, d_ff, feed_forward, layer_norm_eps, dropout)
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = Stack(
            [EncoderBlock(*block_args) for _ in range(n_layer)],
            RelativePositionBias(relative_attention_num_buckets, relative_attention_max_distance, n_head, True),
            d_model,
            layer_norm_eps,
        )
        self.decoder = Stack(
            [DecoderBlock(*block_args) for _ in range(n_decoder_layer)],
            RelativePositionBias(relative_attention_num_buckets, relative_attention_max_distance, n_head, False),
            d_model,
            layer_norm_eps,
        )
        # Tied embeddings reuse shared.weight in logits() instead of sharing a Parameter between two
        # modules, so the state dict holds each tensor once (safetensors refuses shared tensors).
        self.lm_head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.drop = Dropout(dropout)
        self._init_weights()

    @staticmethod
    def _validate(
        vocab_size, d_model, d_kv, d_ff, n_layer, n_decoder_layer, n_head, num_buckets, max_distance, dropout,
        feed_forward, decoder_start_token_id,
    ) -> None:
        """Check the options together, with messages that name the option and the fix."""
        if vocab_size is None:
            raise LmforgeError(
                "T5 needs vocab_size, the number of token ids. The lmforge CLI fills it in from the data's "
                "tokenizer, so leave it out of the YAML there; when building T5 in Python, pass it explicitly, "
                "e.g. T5(vocab_size=tokenizer.get_vocab_size())."
            )
        for option, value in (("vocab_size", vocab_size), ("d_model", d_model), ("d_ff", d_ff), ("n_layer", n_layer),
                              ("n_decoder_layer", n_decoder_layer), ("n_head", n_head)):
            if not isinstance(value, int) or value < 1:
                raise LmforgeError(f"T5 {option} must be a positive integer, got {value!r}.")
        if d_kv is None and d_model % n_head:
            raise LmforgeError(
                f"T5 d_model ({d_model}) must be divisible by n_head ({n_head}) when d_kv is left out; "
                f"change one of them or give d_kv (the head size) explicitly."
            )
        if d_kv is not None and d_kv < 1:
            raise LmforgeError(f"T5 d_kv (the head size) must be a positive integer, got {d_kv!r}.")
        if num_buckets < 4:
            raise LmforgeError(
                f"T5 relative_attention_num_buckets must be at least 4 (T5 uses 32), got {num_buckets}."
            )
        if max_distance <= num_buckets // 2:
            raise LmforgeError(
                f"T5 relative_attention_max_distance ({max_distance}) must exceed half the number of buckets "
                f"({num_buckets // 2}), or the logarithmic buckets are empty. T5 uses 32 buckets and 128."
            )
        if not 0.0 <= dropout < 1.0:
            raise LmforgeError(f"T5 dropout must be in [0, 1), got {dropout}.")
        if feed_forward not in ("relu", "gated-gelu"):
            raise LmforgeError(
                f"T5 feed_forward must be 'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1), got {feed_forward!r}."
            )
        if not 0 <= decoder_start_token_id < vocab_size:
            raise LmforgeError(
                f"T5 decoder_start_token_id ({decoder_start_token_id}) is not a token id of the vocabulary "
                f"(0..{vocab_size - 1}). Leave it out to use the tokenizer's padding token, as T5 does."
            )

    @torch.no_grad()
    def _init_weights(self) -> None:
        """T5's initialisation (Mesh TensorFlow), which folds attention's 1/sqrt(d) into the queries.

        Embeddings N(0, 1); query N(0, (C*hs)^-1/2); key, value N(0, C^-1/2); attention output
        N(0, (nh*hs)^-1/2); feed-forward in N(0, C^-1/2), out N(0, F^-1/2); relative biases
        N(0, C^-1/2); an untied LM head N(0, C^-1/2) (so logits start near unit scale); norms 1.
        """
        C, inner = self.d_model, self.n_head * self.d_kv
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=C**-0.5)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.position_bias.weight, std=C**-0.5)
            for block in stack.blocks:
                attentions = [block.attn] + ([block.cross_attn] if isinstance(block, DecoderBlock) else [])
                for attn in attentions:
                    if isinstance(attn, SelfAttention):
                        q, kv = attn.qkv.weight[:inner], attn.qkv.weight[inner:]
                    else:
                        q, kv = attn.q.weight, attn.kv.weight
                    nn.init.normal_(q, std=(C * self.d_kv) ** -0.5)
                    nn.init.normal_(kv, std=C**-0.5)
                    nn.init.normal_(attn.o.weight, std=inner**-0.5)
                nn.init.normal_(block.ff.wi.weight, std=C**-0.5)
                nn.init.normal_(block.ff.wo.weight, std=self.d_ff**-0.5)

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Decoder hidden states ``(B, T, C)``: encode ``input_ids`` ``(B, S)`` and decode ``(B, T)``."""
        encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output ``(B, S, C)`` for ``input_ids`` ``(B, S)`` (``attention_mask``: 1 = real token)."""
        B, S = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise LmforgeError(
                f"T5 attention_mask must have the shape of input_ids {(B, S)}, got {tuple(attention_mask.shape)}."
            )
        x = self.drop(self.shared(input_ids))  # (B, S, C)
        mask = self.encoder.position_bias(S, S)  # (1, nh, S, S): computed once, shared by every layer
        if attention_mask is not None:
            mask = mask.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(mask.dtype).min)  # (B, nh, S, S)
        for block in self.encoder.blocks:
            x = block(x, mask)  # (B, S, C)
        return self.drop(self.encoder.final_norm(x))  # (B, S, C)

    def decode(
        self,
        decoder_input_ids: Tensor,
        encoder_hidden: Tensor,
        encoder_attention_mask: Tensor | None = None,
        cache: T5Cache | None = None,
    ) -> Tensor:
        """Decoder hidden states ``(B, T, C)`` for ``decoder_input_ids`` ``(B, T)``.

        With a ``cache`` the new tokens follow the ``cache.length`` already cached (their positions
        continue from there) and their keys/values are added to it.
        """
        B, T = decoder_input_ids.shape
        past = cache.length if cache is not None else 0
        self._check_decode(B, T, past, encoder_hidden, encoder_attention_mask, cache)
        x = self.drop(self.shared(decoder_input_ids))  # (B, T, C)
        Tk = past + T
        mask = self.decoder.position_bias(T, Tk, offset=past)  # (1, nh, T, Tk)
        if T > 1:  # a single new token may attend to every cached one; otherwise hide the future
            q_pos = torch.arange(past, Tk, device=x.device)[:, None]
            future = torch.arange(Tk, device=x.device)[None, :] > q_pos  # (T, Tk)
            mask = mask.masked_fill(future, torch.finfo(mask.dtype).min)
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = encoder_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for layer, block in enumerate(self.decoder.blocks):
            x = block(x, mask, encoder_hidden, cross_mask, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.drop(self.decoder.final_norm(x))  # (B, T, C)

    def _check_decode(self, B, T, past, encoder_hidden, encoder_attention_mask, cache) -> None:
        """Cheap shape checks that turn silent misuse into clear errors."""
        if encoder_hidden.dim() != 3 or encoder_hidden.size(0) != B or encoder_hidden.size(2) != self.d_model:
            raise LmforgeError(
                f"T5 decode needs encoder_hidden of shape (batch={B}, source length, d_model={self.d_model}) "
                f"from encode(), got {tuple(encoder_hidden.shape)}."
            )
        S = encoder_hidden.size(1)
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != (B, S):
            raise LmforgeError(
                f"T5 encoder_attention_mask must have shape (batch, source length) = {(B, S)}, "
                f"got {tuple(encoder_attention_mask.shape)}: pass the attention_mask given to encode()."
            )
        if cache is not None:
            if cache.batch_size != B:
                raise LmforgeError(
                    f"T5 got a batch of {B} rows but the cache holds {cache.batch_size}; make it with "
                    f"new_cache({B}, max_length)."
                )
            if past + T > cache.max_length:
                raise LmforgeError(
                    f"T5 decoder cache is full: it holds {cache.max_length} positions, {past} are used and {T} "
                    f"more were given. Make it with a larger max_length."
                )

    def embedding_modules(self) -> list[nn.Module]:
        """The shared token embedding and both stacks' relative position biases."""
        return [self.shared, self.encoder.position_bias, self.decoder.position_bias]

    def layer_modules(self) -> list[nn.Module]:
        """The encoder blocks, then the decoder blocks."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    def forward_flops(self, batch_size: int, input_len: int, target_len: int | None = None, vocab_positions=None):
        """Matmul FLOPs (2 per multiply-add) of one forward: the encoder over ``input_len`` (S) tokens,
        the decoder over ``target_len`` (T) tokens, per row of ``batch_size``.

        Encoder layer: q|k|v and output projections, scores and values over ``S x S``, the
        feed-forward (three matrices when gated). Decoder layer: the same over ``T`` with causal
        ``T x T`` attention counted in full (as PaLM's MFU does), plus cross-attention: queries and
        output over ``T``, keys|values over ``S``, scores and values over ``T x S``. Then the
        vocabulary projection of ``vocab_positions`` rows (default: every decoder position).
        """
        B, S, C, hs, nh = batch_size, input_len, self.d_model, self.d_kv, self.n_head
        T = S if target_len is None else target_len
        inner = nh * hs
        per_token = 2 * C * 3 * inner + 2 * inner * C + 2 * C * self.d_ff * (3 if self.feed_forward == "gated-gelu" else 2)
        encoder = B * S * per_token + 2 * 2 * B * nh * S * S * hs
        cross = B * T * 2 * 2 * C * inner + B * S * 2 * C * 2 * inner + 2 * 2 * B * nh * T * S * hs
        decoder = B * T * per_token + 2 * 2 * B * nh * T * T * hs + cross
        rows = B * T if vocab_positions is None else vocab_positions
        return self.n_layer * encoder + self.n_decoder_layer * decoder + 2 * rows * C * self.vocab_size

    def logits(self, hidden: Tensor) -> Tensor:
        """Project decoder hidden states ``(B, T, C)`` to vocabulary logits ``(B, T, vocab_size)``."""
        if self.lm_head is None:
            return F.linear(hidden * self.d_model**-0.5, self.shared.weight)  # (B, T, V): T5 v1.0 rescaling
        return self.lm_head(hidden)  # (B, T, V)

    def new_cache(self, batch_size: int, max_length: int) -> T5Cache:
        """An empty :class:`T5Cache` for ``batch_size`` rows and up to ``max_length`` decoder tokens.

        There is no length limit beyond memory (positions are relative). The cache is allocated in
        the dtype and on the device of the model's parameters.
        """
        w = self.shared.weight
        return T5Cache(self.n_decoder_layer, batch_size, self.n_head, max_length, self.d_kv, w.dtype, w.device)

    # ------------------------------------------------------------------------------------------
    # Hugging Face T5 conversion

    _HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # tied to shared.weight
    # Older transformers versions saved an unused cross-attention bias table.
    _HF_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

    @classmethod
    def options_from_hf_config(cls, hf_config: dict) -> dict:
        """T5 options for a ``transformers`` ``T5Config`` (as the dict of its ``config.json``).

        A v1.0 checkpoint (``tie_word_embeddings`` true) gives ``tie_embeddings=True``; v1.1
        (``tie_word_embeddings`` false) gives an untied head. transformers 5 writes
        ``scale_decoder_outputs`` instead, which then decides.
        """
        feed_forward = hf_config.get("feed_forward_proj", "relu")
        if feed_forward not in ("relu", "gated-gelu"):
            raise LmforgeError(
                f"The Hugging Face T5 config has feed_forward_proj={feed_forward!r}; lmforge's t5 supports 'relu' "
                "(T5 v1.0) and 'gated-gelu' (T5 v1.1, Flan-T5). Convert a checkpoint of one of those."
            )
        tie = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
        start = hf_config.get("decoder_start_token_id")
        if start is None:
            start = hf_config.get("pad_token_id") or 0
        return {
            "vocab_size": hf_config["vocab_size"],
            "d_model": hf_config["d_model"],
            "d_kv": hf_config["d_kv"],
            "d_ff": hf_config["d_ff"],
            "n_layer": hf_config["num_layers"],
            "n_decoder_layer": hf_config.get("num_decoder_layers") or hf_config["num_layers"],
            "n_head": hf_config["num_heads"],
            "relative_attention_num_buckets": hf_config.get("relative_attention_num_buckets", 32),
            "relative_attention_max_distance": hf_config.get("relative_attention_max_distance", 128),
            "dropout": hf_config.get("dropout_rate", 0.1),
            "layer_norm_eps": hf_config.get("layer_norm_epsilon", 1e-6),
            "feed_forward": feed_forward,
            "tie_embeddings": bool(tie),
            "decoder_start_token_id": start,
        }

    def hf_config(self) -> dict:
        """A ``config.json`` for ``transformers.T5ForConditionalGeneration`` with this model's shape.

        ``pad_token_id`` is ``decoder_start_token_id`` (T5's convention); ids of other special tokens
        (``eos_token_id``) belong to the tokenizer and are left to the caller.
        """
        return {
            "model_type": "t5",
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.n_layer,
            "num_decoder_layers": self.n_decoder_layer,
            "num_heads": self.n_head,
            "relative_attention_num_buckets": self.num_buckets,
            "relative_attention_max_distance": self.max_distance,
            "dropout_rate": self.dropout,
            "layer_norm_epsilon": self.layer_norm_eps,
            "feed_forward_proj": self.feed_forward,
            "tie_word_embeddings": self.tie_embeddings,
            "is_encoder_decoder": True,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.decoder_start_token_id,
            "initializer_factor": 1.0,
        }

    def _hf_layout(self) -> list[tuple[str, list[str]]]:
        """Every tensor: (lmforge name, the Hugging Face names concatenated along dim 0 to make it)."""
        wi = ["wi"] if self.feed_forward == "relu" else ["wi_0", "wi_1"]
        rows: list[tuple[str, list[str]]] = [("shared.weight", ["shared.weight"])]
        for side, n in (("encoder", self.n_layer), ("decoder", self.n_decoder_layer)):
            rows.append((f"{side}.position_bias.weight",
                         [f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]))
            for i in range(n):
                ours, hf = f"{side}.blocks.{i}.", f"{side}.block.{i}.layer."
                rows += [
                    (ours + "attn_norm.weight", [hf + "0.layer_norm.weight"]),
                    (ours + "attn.qkv.weight", [hf + f"0.SelfAttention.{p}.weight" for p in "qkv"]),
                    (ours + "attn.o.weight", [hf + "0.SelfAttention.o.weight"]),
                ]
                ff = 1
                if side == "decoder":
                    ff = 2
                    rows += [
                        (ours + "cross_attn_norm.weight", [hf + "1.layer_norm.weight"]),
                        (ours + "cross_attn.q.weight", [hf + "1.EncDecAttention.q.weight"]),
                        (ours + "cross_attn.kv.weight", [hf + "1.EncDecAttention.k.weight", hf + "1.EncDecAttention.v.weight"]),
                        (ours + "cross_attn.o.weight", [hf + "1.EncDecAttention.o.weight"]),
                    ]
                rows += [
                    (ours + "ff_norm.weight", [hf + f"{ff}.layer_norm.weight"]),
                    (ours + "ff.wi.weight", [hf + f"{ff}.DenseReluDense.{w}.weight" for w in wi]),
                    (ours + "ff.wo.weight", [hf + f"{ff}.DenseReluDense.wo.weight"]),
                ]
            rows.append((f"{side}.final_norm.weight", [f"{side}.final_layer_norm.weight"]))
        if not self.tie_embeddings:
            rows.append(("lm_head.weight", ["lm_head.weight"]))
        return rows

    def hf_state_dict_to_lmforge(self, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a ``transformers`` ``T5ForConditionalGeneration`` state dict to this model's names.

        Fused tensors are concatenations of Hugging Face's (``q|k|v``, ``k|v``, ``wi_0|wi_1``). The
        embedding may come as ``shared.weight`` or its tied aliases ``encoder/decoder.embed_tokens``.
        ``lm_head.weight`` is used by an untied model (a checkpoint without one gives a copy of the
        embedding); a tied model refuses one that differs from the embedding. The result loads
        with ``self.load_state_dict(..., strict=True)``.
        """
        hf_state = dict(hf_state)
        if "shared.weight" not in hf_state:
            for alias in self._HF_ALIASES:
                if alias in hf_state:
                    hf_state["shared.weight"] = hf_state[alias]
                    break
        for key in (*self._HF_ALIASES, *self._HF_UNUSED):
            hf_state.pop(key, None)
        head = hf_state.pop("lm_head.weight", None)
        if self.tie_embeddings:
            if head is not None and "shared.weight" in hf_state and not torch.equal(head, hf_state["shared.weight"]):
                raise LmforgeError(
                    "The Hugging Face T5 state dict has an lm_head.weight different from its embedding (an untied "
                    "T5 v1.1 checkpoint), but this T5 has tie_embeddings=True. Build it with tie_embeddings=False "
                    "(options_from_hf_config reads this from the checkpoint's config.json)."
                )
        else:
            hf_state["lm_head.weight"] = head if head is not None else hf_state.get("shared.weight")

        out: dict[str, Tensor] = {}
        missing: list[str] = []
        for name, sources in self._hf_layout():
            if any(s not in hf_state or hf_state[s] is None for s in sources):
                missing += [s for s in sources if s not in hf_state or hf_state[s] is None]
                continue
            parts = [hf_state.pop(s) for s in sources]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        unexpected = sorted(hf_state)
        if missing or unexpected:
            raise LmforgeError(
                f"The Hugging Face state dict does not match this T5 (n_layer={self.n_layer}, n_decoder_layer="
                f"{self.n_decoder_layer}, feed_forward={self.feed_forward!r}, tie_embeddings={self.tie_embeddings}): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Build T5 with "
                f"T5.options_from_hf_config(config) of the checkpoint's config.json."
            )
        own = self.state_dict()
        for name, value in out.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise LmforgeError(
                    f"The Hugging Face tensors for {name} make shape {tuple(value.shape)} but this T5 expects "
                    f"{tuple(own[name].shape)}. Build T5 with the checkpoint's vocab_size, d_model, d_kv, d_ff and "
                    f"num_heads (T5.options_from_hf_config reads them from config.json)."
                )
        return out

    def lmforge_state_dict_to_hf(self, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Map this model's state dict (default: its current one) to ``T5ForConditionalGeneration`` names.

        The key set is the one ``save_pretrained`` writes: ``shared.weight`` only for the tied
        embeddings, plus ``lm_head.weight`` when untied. Fused tensors are split into copies.
        """
        state = self.state_dict() if state is None else state
        out: dict[str, Tensor] = {}
        for name, targets in self._hf_layout():
            value = state[name]
            if len(targets) == 1:
                out[targets[0]] = value
                continue
            for target, part in zip(targets, value.chunk(len(targets), dim=0)):
                out[target] = part.clone()
        return out


@hookimpl
def lmforge_architectures():
    return [T5]
