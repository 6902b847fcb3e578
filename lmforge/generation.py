"""Text generation: decoder models (greedy, sampling) and seq2seq models (also beam search), with caches.

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


# --------------------------------------------------------------------------------------------------
# Encoder-decoder (seq2seq) generation: the encoder runs once, the decoder uses the cache.
# --------------------------------------------------------------------------------------------------


def _supports_cache(architecture: torch.nn.Module) -> bool:
    return type(architecture).new_cache is not Architecture.new_cache


@torch.no_grad()
def generate_seq2seq(
    architecture: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    seed: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    decoder_start_token_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Generate decoder tokens for encoder inputs ``input_ids`` ``(B, S)``; returns ``(B, n)`` new tokens.

    The decoder starts from ``decoder_start_token_id`` (default: the architecture's), which is not
    part of the result. A row stops at ``eos_id`` (included); rows that stop before the longest are
    padded with ``pad_id`` (else ``eos_id``). ``attention_mask`` marks the real tokens of a padded
    batch of inputs.

    * ``num_beams == 1``: greedy (``greedy`` or ``temperature == 0``) or sampling with
      ``temperature``, ``top_k`` and ``top_p``; reproducible with ``seed``.
    * ``num_beams > 1``: beam search over log-probabilities (``temperature``, ``top_k`` and
      ``top_p`` are not used), returning the best hypothesis of each row. Finished hypotheses are
      scored ``sum of log-probabilities / generated_length ** length_penalty``; ``early_stopping``
      ``True`` stops a row once ``num_beams`` hypotheses are finished, ``False`` once no running
      beam can beat the finished ones at its current length, ``"never"`` only when none can at all.
      These are the semantics of Hugging Face ``generate``, whose results it reproduces.
    """
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise LmforgeError(
            f"generate_seq2seq() needs input_ids of shape (batch, length) with at least one token, got "
            f"{tuple(input_ids.shape)}; the prompt may be empty after tokenization."
        )
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if num_beams < 1:
        raise LmforgeError(f"num_beams must be at least 1 (1 = no beam search), got {num_beams}.")
    if temperature < 0:
        raise LmforgeError(f"temperature must be 0 (greedy) or positive, got {temperature}.")
    if early_stopping not in (True, False, "never"):
        raise LmforgeError(f"early_stopping must be true, false or 'never', got {early_stopping!r}.")
    start = architecture.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    use_cache = use_cache and _supports_cache(architecture)
    encoder_hidden = architecture.encode(input_ids, attention_mask)  # (B, S, C): the encoder runs once
    if num_beams > 1:
        return _beam_search(
            architecture, encoder_hidden, attention_mask, num_beams, max_new_tokens, length_penalty,
            early_stopping, eos_id, fill, start, use_cache,
        )

    B = input_ids.size(0)
    greedy = greedy or temperature == 0
    generator = torch.Generator(device=input_ids.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    cache = architecture.new_cache(B, max_new_tokens) if use_cache else None
    tokens = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)  # decoder input so far
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        step = tokens[:, -1:] if cache is not None else tokens
        hidden = architecture.decode(step, encoder_hidden, attention_mask, cache=cache)
        logits = architecture.logits(hidden[:, -1:])[:, -1].float()  # (B, V)
        if greedy:
            next_token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        next_token = next_token.masked_fill(finished, fill)  # (B,)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos_id is not None:
            finished |= next_token == eos_id
            if bool(finished.all()):
                break
    return tokens[:, 1:]


def _beam_search(
    architecture: torch.nn.Module,
    encoder_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
    eos_id: int | None,
    fill: int,
    start: int,
    use_cache: bool,
) -> torch.Tensor:
    """Beam search with Hugging Face's vectorised bookkeeping (its ``_beam_search``), step for step.

    Per row: ``running`` holds the ``num_beams`` live hypotheses and their summed log-probabilities;
    ``sequences`` the best ``num_beams`` finished ones and their length-penalised scores. Each step
    takes the top ``2 * num_beams`` continuations over all live beams (so that enough remain when
    some end in EOS); those ending (EOS, or the length limit) among the top ``num_beams`` compete
    for ``sequences``, the best others become the new live beams.
    """
    B, nb, device = encoder_hidden.size(0), num_beams, encoder_hidden.device
    encoder_hidden = encoder_hidden.repeat_interleave(nb, dim=0)  # (B*nb, S, C)
    if attention_mask is not None:
        attention_mask = attention_mask.repeat_interleave(nb, dim=0)  # (B*nb, S)
    max_length = 1 + max_new_tokens  # decoder tokens, the start token included
    keep = max(2, 1 + (eos_id is not None)) * nb
    top_num_beams = torch.arange(keep, device=device) < nb  # (keep,)
    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = start
    sequences = running.clone()
    running_scores = torch.zeros((B, nb), device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    beam_scores = torch.full((B, nb), -1e9, device=device)
    is_finished = torch.zeros((B, nb), dtype=torch.bool, device=device)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    cache = architecture.new_cache(B * nb, max_new_tokens) if use_cache else None
    batch_offset = torch.arange(B, device=device)[:, None] * nb  # (B, 1)

    def gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    cur_len = 1
    while True:
        flat = running[:, :, :cur_len].reshape(B * nb, cur_len)
        step = flat[:, -1:] if cache is not None else flat
        hidden = architecture.decode(step, encoder_hidden, attention_mask, cache=cache)
        logits = architecture.logits(hidden[:, -1:])[:, -1].float()  # (B*nb, V)
        V = logits.size(-1)
        log_probs = torch.log_softmax(logits, dim=-1).view(B, nb, V) + running_scores[:, :, None]
        topk_log_probs, topk_index = torch.topk(log_probs.reshape(B, nb * V), k=keep)  # (B, keep)
        source_beam = topk_index // V
        topk_sequences = gather(running, source_beam)  # (B, keep, max_length)
        topk_sequences[:, :, cur_len] = topk_index % V
        hits = torch.full_like(topk_log_probs, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos_id is not None:
            hits |= topk_sequences[:, :, cur_len] == eos_id

        # The best continuations that did not end are the live beams of the next step.
        live_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_index = torch.topk(live_log_probs, k=nb)[1]
        running = gather(topk_sequences, next_index)
        running_scores = gather(live_log_probs, next_index)
        source_flat = gather(source_beam, next_index) + batch_offset  # (B, nb): rows of the cache to keep

        # Hypotheses that just ended (among the top nb) compete with the finished ones.
        just_finished = hits & top_num_beams[None, :]
        scores = topk_log_probs / ((cur_len + 1 - 1) ** length_penalty)
        rows_full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        scores += rows_full.to(torch.float32) * -1.0e9
        scores += (~can_improve).to(torch.float32) * -1.0e9
        scores += (~just_finished) * -1.0e9
        merged_index = torch.topk(torch.cat((beam_scores, scores), dim=1), k=nb)[1]
        sequences = gather(torch.cat((sequences, topk_sequences), dim=1), merged_index)
        beam_scores = gather(torch.cat((beam_scores, scores), dim=1), merged_index)
        is_finished = gather(torch.cat((is_finished, just_finished), dim=1), merged_index)

        if cache is not None:
            cache.reorder(source_flat.reshape(-1))
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - 1
        else:
            best_length = cur_len - 1
        best_running = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(can_improve.any()) and open_beams and not bool(hits.all())):
            break

    best = sequences[:, 0, 1:]  # (B, max_new_tokens): the best hypothesis of each row
    if eos_id is None:
        return best[:, : cur_len - 1]
    is_eos = best == eos_id
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, cur_len - 1)
    return best[:, : int(lengths.max())]
