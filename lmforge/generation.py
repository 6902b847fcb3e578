"""Text generation for decoder models: greedy and sampling, with the architecture's KV cache.

Sampling is reproducible: the same seed gives the same tokens (a dedicated ``torch.Generator`` is
used, so the global RNG is left alone).
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.plugin_api import Architecture


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k and outside the smallest top-p nucleus."""
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    architecture: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue ``input_ids`` ``(1, T)``; returns the new token ids ``(1, n)`` (n <= max_new_tokens).

    Stops early when ``eos_id`` is produced. ``temperature == 0`` means greedy. Architectures without
    a KV cache (no ``new_cache``) are run on the whole sequence at every step.
    """
    if input_ids.dim() != 2 or input_ids.size(0) != 1:
        raise LmforgeError("generate() takes one prompt at a time: input_ids of shape (1, T).")
    if input_ids.size(1) == 0:
        raise LmforgeError("The prompt is empty after tokenization; give at least one token of prompt text.")
    block_size = getattr(architecture, "block_size", None)
    if block_size is not None and input_ids.size(1) + max_new_tokens > block_size:
        raise LmforgeError(
            f"The prompt ({input_ids.size(1)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"block_size ({block_size}). Shorten the prompt or lower max_new_tokens."
        )
    greedy = greedy or temperature == 0
    generator = torch.Generator(device=input_ids.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    supports_cache = type(architecture).new_cache is not Architecture.new_cache
    cache = architecture.new_cache(1, input_ids.size(1) + max_new_tokens) if use_cache and supports_cache else None
    tokens = input_ids
    step_input = input_ids
    position = 0
    new_tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if cache is not None:
            positions = torch.arange(position, position + step_input.size(1), device=input_ids.device)[None]
            hidden = architecture(step_input, position_ids=positions, cache=cache)
            position += step_input.size(1)
        else:
            hidden = architecture(tokens)
        logits = architecture.logits(hidden[:, -1:])[:, -1].float()  # (1, V)
        if greedy:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        new_tokens.append(next_token)
        tokens = torch.cat([tokens, next_token], dim=1)
        step_input = next_token
        if eos_id is not None and int(next_token) == eos_id:
            break
    return torch.cat(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
