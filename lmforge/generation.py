"""Text generation for decoder and seq2seq models: one engine, batched, with a preallocated KV cache.

The public entry point is :func:`generate_batch` with a :class:`GenerationConfig`: a batch of prompts
of different lengths (decoder prompts are left-padded, with positions that start at 0 at each row's
first real token and an attention mask that hides the padding), greedy decoding, sampling
(temperature, top-k, top-p, min-p), repetition penalty, beam search, stop tokens and stop strings,
and several sequences per prompt. :func:`generate` and :func:`generate_seq2seq` are the older
tensor-in, tensor-out front ends, kept for their callers; they run the same engine.

How it is built: a *stepper* (:class:`_DecoderStepper`, :class:`_Seq2SeqStepper`) hides the family:
``prefill()`` runs the prompt once and returns the next-token logits, ``step(tokens)`` feeds one new
token per row, ``reorder(rows)`` follows beam search. Two loops drive a stepper: :func:`_sample_loop`
(greedy and sampling) and :func:`_beam_search`. The loops keep work on the device; the only
per-step host sync is the "has every row stopped?" check (only when there are stop tokens) and the
decoding of text for stop strings (only when there are stop strings); on an accelerator the
first is made every 8 steps only.

Sampling is reproducible: the same seed gives the same tokens. A dedicated ``torch.Generator`` is
used, so the global RNG is left alone; it draws exactly what Hugging Face ``generate`` draws from the
global RNG after ``torch.manual_seed(seed)``, which is what the parity tests check.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.plugin_api import Architecture

FAMILY_NAMES = ("decoder", "seq2seq")


@dataclass
class GenerationConfig:
    """How to generate. Every field has the meaning it has in Hugging Face ``generate``.

    * ``greedy`` (or ``temperature == 0``) takes the most likely token; otherwise tokens are sampled
      from the softmax of ``logits / temperature`` restricted by ``top_k`` (the k most likely),
      ``top_p`` (the smallest set whose probability reaches p) and ``min_p`` (tokens at least
      ``min_p`` times as likely as the most likely one), applied in that order.
    * ``repetition_penalty`` (> 1 discourages repeats; CTRL's rule): the logit of every token already
      in the sequence (prompt and generated, padding excluded) is divided by it when positive and
      multiplied by it when negative. It applies to greedy, sampling and beam search.
    * ``num_beams > 1`` is beam search (deterministic: leave temperature/top_k/top_p/min_p unset);
      finished hypotheses are scored ``sum of log-probabilities / new_length ** length_penalty``;
      ``early_stopping`` is ``True``, ``False`` or ``"never"`` as in Hugging Face.
    * ``num_return_sequences`` sequences per prompt: distinct samples when sampling, the best
      hypotheses in beam search (at most ``num_beams``); greedy gives one.
    * Generation of a sequence ends at ``max_new_tokens``, at any of ``stop_token_ids`` (and the
      ``eos_id`` given to :func:`generate_batch`), or once its text contains one of ``stop_strings``.
    * ``use_cache=False`` reruns the whole sequence at every step (for checking the cache; slow).
    """

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    seed: int | None = None
    use_cache: bool = True
    early_stopping: bool | str = False

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Raise :class:`LmforgeError` naming the first option that cannot work, and the fix."""
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # `not >=` also catches nan
            raise LmforgeError(f"temperature must be 0 (greedy) or a positive number, got {self.temperature}.")
        if not math.isfinite(self.length_penalty):
            raise LmforgeError(f"length_penalty must be a finite number (1.0 = none), got {self.length_penalty}.")
        if any(stop == "" for stop in self.stop_strings):
            raise LmforgeError("A stop string is empty, which would stop at once; give --stop some text.")
        if self.top_k is not None and self.top_k < 0:
            raise LmforgeError(f"top_k must be a positive number of tokens (0 or unset: no limit), got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LmforgeError(f"top_p is a probability in (0, 1], got {self.top_p}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise LmforgeError(f"min_p is a fraction of the top token's probability in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise LmforgeError(
                f"repetition_penalty must be positive (1.0 = none, > 1 discourages repeats), got "
                f"{self.repetition_penalty}."
            )
        if self.num_beams < 1:
            raise LmforgeError(f"num_beams must be at least 1 (1 = no beam search), got {self.num_beams}.")
        if self.num_return_sequences < 1:
            raise LmforgeError(f"num_return_sequences must be at least 1, got {self.num_return_sequences}.")
        if self.early_stopping not in (True, False, "never"):
            raise LmforgeError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}.")
        if self.num_beams > 1:
            sampling = [name for name, value, unset in (
                ("temperature", self.temperature, 1.0), ("top_k", self.top_k, None),
                ("top_p", self.top_p, None), ("min_p", self.min_p, None),
            ) if value != unset]
            if sampling:
                raise LmforgeError(
                    f"num_beams={self.num_beams} is beam search, which is deterministic, but "
                    f"{', '.join(sampling)} {'is' if len(sampling) == 1 else 'are'} set. Leave "
                    f"{'it' if len(sampling) == 1 else 'them'} unset, or use num_beams=1 to sample."
                )
            if self.num_return_sequences > self.num_beams:
                raise LmforgeError(
                    f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams "
                    f"({self.num_beams}): beam search returns its best hypotheses. Raise num_beams."
                )
        elif self.is_greedy and self.num_return_sequences > 1:
            raise LmforgeError(
                f"Greedy decoding gives one sequence per prompt, but num_return_sequences is "
                f"{self.num_return_sequences}. Sample (greedy=False, temperature > 0) or use beam search "
                f"with num_beams >= num_return_sequences."
            )


# --------------------------------------------------------------------------------------------------
# Logits processing (the same rules as Hugging Face's logits processors, on the last position only)
# --------------------------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k, outside the top-p nucleus, and below min-p.

    ``logits`` is ``(..., V)``, already divided by the temperature. The nucleus is the smallest set
    of most likely tokens whose probability reaches ``top_p`` (the token that crosses it is kept);
    min-p keeps the tokens whose probability is at least ``min_p`` times the top token's. Each
    filter keeps at least one token.
    """
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Ascending order: a token goes when it and every less likely one together hold <= 1 - p.
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        remove = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)  # the top token is never below this
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class _RepetitionPenalty:
    """Which tokens each row has seen (``(R, V)`` booleans) and CTRL's penalty on their scores.

    A boolean table updated by one scatter per step costs about one read of the logits, and needs
    no per-row lists of previous tokens. It is built on the first :meth:`apply`, when the
    vocabulary size (the width of the logits) is known.
    """

    def __init__(self, penalty: float, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.penalty = penalty
        self.initial = (tokens, mask)
        self.seen: torch.Tensor | None = None

    def _build(self, vocab: int) -> None:
        tokens, mask = self.initial
        sink = vocab  # padding and ids the logits do not cover land in one extra column, then dropped
        ids = tokens.clamp(max=sink) if mask is None else torch.where(mask.bool(), tokens.clamp(max=sink), sink)
        seen = torch.zeros((tokens.size(0), vocab + 1), dtype=torch.bool, device=tokens.device)
        self.seen = seen.scatter_(1, ids, True)[:, :vocab].contiguous()

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            self._build(scores.size(-1))
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(self.seen, penalised, scores)

    def update(self, tokens: torch.Tensor) -> None:
        self.seen.scatter_(1, tokens[:, None], True)

    def reorder(self, rows: torch.Tensor) -> None:
        self.seen = self.seen.index_select(0, rows)


# --------------------------------------------------------------------------------------------------
# Steppers: the family-specific part (how the model is run on a prompt, then token by token)
# --------------------------------------------------------------------------------------------------


def _supports_cache(architecture: torch.nn.Module) -> bool:
    return type(architecture).new_cache is not Architecture.new_cache


def _next_logits(architecture: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return architecture.logits(hidden[:, -1:])[:, -1].float()  # (R, V): only the last position


class _DecoderStepper:
    """A left-padded batch of decoder prompts, continued one token per row per step.

    Buffers cover the full length ``L = P + max_new_tokens`` from the start: ``tokens`` (only needed
    without a cache), ``mask`` (1 at real tokens; generated slots are real) and ``positions``
    (``mask.cumsum - 1``: 0 at each row's first real token, continuing through the generated ones).
    With a cache the prompt runs once (``prefill``) and each step feeds one token at its position.
    """

    def __init__(self, architecture, prompts: torch.Tensor, prompt_mask: torch.Tensor, max_new: int, use_cache: bool):
        R, P = prompts.shape
        L = P + max_new
        block_size = getattr(architecture, "block_size", None)
        if block_size is not None and L > block_size:
            raise LmforgeError(
                f"The prompt ({P} tokens, the longest of the batch) plus max_new_tokens ({max_new}) exceeds the "
                f"model's block_size ({block_size}). Shorten the prompt or lower max_new_tokens."
            )
        self.architecture = architecture
        self.padded = bool((prompt_mask == 0).any())
        device = prompts.device
        self.mask = torch.ones((R, L), dtype=torch.long, device=device)
        self.mask[:, :P] = prompt_mask
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)  # (R, L)
        self.tokens = torch.zeros((R, L), dtype=torch.long, device=device)
        self.tokens[:, :P] = prompts
        self.length = P
        self.cache = architecture.new_cache(R, L) if use_cache and _supports_cache(architecture) else None

    def _run(self, start: int, end: int) -> torch.Tensor:
        mask = self.mask[:, :end] if self.padded else None
        hidden = self.architecture(
            self.tokens[:, start:end], attention_mask=mask, position_ids=self.positions[:, start:end], cache=self.cache
        )
        return _next_logits(self.architecture, hidden)

    def prefill(self) -> torch.Tensor:
        return self._run(0, self.length)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[:, self.length] = tokens
        self.length += 1
        return self._run(self.length - 1 if self.cache is not None else 0, self.length)

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)
        self.mask = self.mask.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


class _Seq2SeqStepper:
    """Encoder inputs (encoded once), and decoder tokens that start with ``decoder_start_token_id``."""

    def __init__(self, architecture, encoder_hidden, encoder_mask, start: int, max_new: int, use_cache: bool):
        R = encoder_hidden.size(0)
        self.architecture = architecture
        self.encoder_hidden = encoder_hidden
        self.encoder_mask = encoder_mask
        self.tokens = torch.full((R, 1 + max_new), start, dtype=torch.long, device=encoder_hidden.device)
        self.length = 1
        self.cache = architecture.new_cache(R, max_new) if use_cache and _supports_cache(architecture) else None

    def _run(self) -> torch.Tensor:
        start = self.length - 1 if self.cache is not None else 0
        step = self.tokens[:, start : self.length]
        hidden = self.architecture.decode(step, self.encoder_hidden, self.encoder_mask, cache=self.cache)
        return _next_logits(self.architecture, hidden)

    def prefill(self) -> torch.Tensor:
        return self._run()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens[:, self.length] = tokens
        self.length += 1
        return self._run()

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, rows)
        self.encoder_hidden = self.encoder_hidden.index_select(0, rows)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


# --------------------------------------------------------------------------------------------------
# The two loops
# --------------------------------------------------------------------------------------------------


@dataclass
class _Result:
    """Generated tokens ``(R, n)`` (``fill`` after a row ended), each row's ``lengths`` (stop token
    included) and whether it ended on a stop token (``by_token``)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    by_token: torch.Tensor
    rows_per_prompt: int = 1

    def as_lists(self) -> list[list[list[int]]]:
        """Per prompt, its sequences as lists of new token ids, the stop token left out."""
        keep = (self.lengths - self.by_token.long()).tolist()
        rows = [row[:n] for row, n in zip(self.tokens.tolist(), keep)]
        k = self.rows_per_prompt
        return [rows[i : i + k] for i in range(0, len(rows), k)]


class _StopStrings:
    """Host-side check of each row's text for stop strings (decodes the new tokens each step)."""

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str], rows: int) -> None:
        self.stop_strings = list(stop_strings)
        self.decode = decode
        self.longest = max(len(s) for s in self.stop_strings)
        self.checked = [0] * rows  # characters of each row's text already searched

    def hits(self, tokens: torch.Tensor, n: int, finished: list[bool]) -> list[int]:
        """Rows (not yet finished) whose text of the first ``n`` new tokens now holds a stop string."""
        found = []
        for row, ids in enumerate(tokens[:, :n].tolist()):
            if finished[row]:
                continue
            text = self.decode(ids)
            start = max(0, self.checked[row] - self.longest)
            if any(s in text[start:] for s in self.stop_strings):
                found.append(row)
            self.checked[row] = len(text)
        return found


def _sample_loop(
    stepper,
    config: GenerationConfig,
    stop_ids: torch.Tensor | None,
    fill: int,
    penalty: _RepetitionPenalty | None,
    stop_strings: _StopStrings | None,
    on_token: Callable[[list[int | None]], None] | None,
) -> _Result:
    """Greedy decoding or sampling, every row one token per step, until all rows stop."""
    logits = stepper.prefill()  # (R, V)
    R, device = logits.size(0), logits.device
    generator = None
    if not config.is_greedy:
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()
    max_new = config.max_new_tokens
    out = torch.full((R, max_new), fill, dtype=torch.long, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.full((R,), max_new, dtype=torch.long, device=device)
    by_token = torch.zeros(R, dtype=torch.bool, device=device)
    may_stop = stop_ids is not None or stop_strings is not None
    # "Has every row stopped?" makes the host wait for the device: on an accelerator ask every 8
    # steps (finished rows just produce padding meanwhile); on the CPU it costs nothing.
    check_every = 1 if device.type == "cpu" or stop_strings is not None else 8
    steps = max_new
    for t in range(max_new):
        if penalty is not None:
            logits = penalty.apply(logits)
        if config.is_greedy:
            next_token = logits.argmax(dim=-1)  # (R,)
        else:
            logits = filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p)
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]  # (R,)
        if may_stop:
            next_token = next_token.masked_fill(finished, fill)
        out[:, t] = next_token
        if may_stop:
            was_finished = finished.clone()
            if stop_ids is not None:
                hit = torch.isin(next_token, stop_ids) & ~finished
                by_token |= hit
                finished = finished | hit
            if stop_strings is not None:
                for row in stop_strings.hits(out, t + 1, finished.tolist()):
                    finished[row] = True
            lengths = torch.where(finished & ~was_finished, t + 1, lengths)
        if on_token is not None:
            shown = next_token.tolist()
            hidden = (was_finished | by_token).tolist() if may_stop else [False] * R
            on_token([None if h else tok for tok, h in zip(shown, hidden)])
        if t + 1 == max_new or (may_stop and (t + 1) % check_every == 0 and bool(finished.all())):
            steps = t + 1
            break
        if penalty is not None:
            penalty.update(next_token)
        logits = stepper.step(next_token)
    return _Result(out[:, :steps], lengths.clamp(max=steps), by_token)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, i], ...]`` for a ``(B, k)`` index."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_search(
    stepper,
    batch: int,
    config: GenerationConfig,
    stop_ids: torch.Tensor | None,
    fill: int,
    penalty: _RepetitionPenalty | None,
) -> _Result:
    """Beam search with Hugging Face's vectorised bookkeeping (its ``_beam_search``), step for step.

    The stepper holds ``batch * num_beams`` rows (each prompt repeated ``num_beams`` times). Per
    prompt: ``running`` holds the ``num_beams`` live hypotheses (new tokens only) and their summed
    log-probabilities; ``sequences`` the best ``num_beams`` finished ones and their length-penalised
    scores. Each step takes the top ``max(2, 1 + number of stop tokens) * num_beams`` continuations
    over all live beams (so that enough remain when some end); those ending (a stop token, or the
    length limit) among the top ``num_beams`` compete for ``sequences``, the best others become the
    new live beams. Returns the best ``num_return_sequences`` hypotheses of each prompt.
    """
    B, nb, max_new = batch, config.num_beams, config.max_new_tokens
    lp, early_stopping = config.length_penalty, config.early_stopping
    logits = stepper.prefill()  # (B*nb, V)
    device = logits.device
    keep = max(2, 1 + (0 if stop_ids is None else stop_ids.numel())) * nb
    top_num_beams = torch.arange(keep, device=device) < nb  # (keep,)
    running = torch.full((B, nb, max_new), fill, dtype=torch.long, device=device)
    sequences = running.clone()
    running_scores = torch.zeros((B, nb), device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    beam_scores = torch.full((B, nb), -1e9, device=device)
    is_finished = torch.zeros((B, nb), dtype=torch.bool, device=device)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * nb  # (B, 1)

    n = 0  # new tokens in the hypotheses so far
    while True:
        V = logits.size(-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        if penalty is not None:
            log_probs = penalty.apply(log_probs)
        log_probs = log_probs.view(B, nb, V) + running_scores[:, :, None]
        topk_log_probs, topk_index = torch.topk(log_probs.reshape(B, nb * V), k=keep)  # (B, keep)
        source_beam = topk_index // V
        topk_sequences = _gather(running, source_beam)  # (B, keep, max_new)
        topk_sequences[:, :, n] = topk_index % V
        hits = torch.full_like(topk_log_probs, n + 1 >= max_new, dtype=torch.bool)
        if stop_ids is not None:
            hits |= torch.isin(topk_sequences[:, :, n], stop_ids)

        # The best continuations that did not end are the live beams of the next step.
        live_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_index = torch.topk(live_log_probs, k=nb)[1]
        running = _gather(topk_sequences, next_index)
        running_scores = _gather(live_log_probs, next_index)
        source_rows = (_gather(source_beam, next_index) + batch_offset).reshape(-1)  # (B*nb,)

        # Hypotheses that just ended (among the top nb) compete with the finished ones.
        just_finished = hits & top_num_beams[None, :]
        scores = topk_log_probs / ((n + 1) ** lp)
        rows_full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        scores += rows_full.to(torch.float32) * -1.0e9
        scores += (~can_improve).to(torch.float32) * -1.0e9
        scores += (~just_finished) * -1.0e9
        merged_index = torch.topk(torch.cat((beam_scores, scores), dim=1), k=nb)[1]
        sequences = _gather(torch.cat((sequences, topk_sequences), dim=1), merged_index)
        beam_scores = _gather(torch.cat((beam_scores, scores), dim=1), merged_index)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), merged_index)

        n += 1
        best_length = max_new if early_stopping == "never" and lp > 0.0 else n
        best_running = running_scores[:, :1] / (best_length**lp)
        worst_finished = torch.where(is_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(can_improve.any()) and open_beams and not bool(hits.all())):
            break
        last = running[:, :, n - 1].reshape(-1)  # (B*nb,)
        stepper.reorder(source_rows)
        if penalty is not None:
            penalty.reorder(source_rows)
            penalty.update(last)
        logits = stepper.step(last)

    k = config.num_return_sequences
    best = sequences[:, :k, :n].reshape(B * k, n)  # the best k hypotheses of each prompt, best first
    lengths = torch.full((B * k,), n, dtype=torch.long, device=device)
    by_token = torch.zeros(B * k, dtype=torch.bool, device=device)
    if stop_ids is not None:
        is_stop = torch.isin(best, stop_ids)
        by_token = is_stop.any(dim=1)
        lengths = torch.where(by_token, is_stop.int().argmax(dim=1) + 1, lengths)
    return _Result(best, lengths, by_token, rows_per_prompt=k)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _device(architecture: torch.nn.Module) -> torch.device:
    parameter = next(architecture.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _clean_prompts(prompts, encoder_attention_mask) -> list[list[int]]:
    """Plain lists of ints; with a mask, only the tokens it marks (1) are kept."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if encoder_attention_mask is not None:
        masks = encoder_attention_mask.tolist() if isinstance(encoder_attention_mask, torch.Tensor) else encoder_attention_mask
        if len(masks) != len(prompts) or any(len(m) != len(p) for m, p in zip(masks, prompts)):
            raise LmforgeError(
                "encoder_attention_mask must have one row per prompt, each as long as its prompt (1 = real token, "
                "0 = padding); leave it out when the prompts are unpadded lists."
            )
        prompts = [[t for t, m in zip(p, row) if m] for p, row in zip(prompts, masks)]
    for i, p in enumerate(prompts):
        if not p:
            raise LmforgeError(
                f"Prompt {i} is empty (after removing padding); give at least one token of prompt text."
            )
    return prompts


def _pad(prompts: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P)`` ids and mask, padded on the left (decoder) or the right (encoder)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        span = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, span] = torch.tensor(p, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _run(
    architecture, family, prompts, config, *, pad_id, eos_id, decoder_start_token_id, decode, on_token
) -> _Result:
    config.validate()
    if family not in FAMILY_NAMES:
        raise LmforgeError(f"generate_batch family must be 'decoder' or 'seq2seq', got {family!r}.")
    if family == "seq2seq" and not hasattr(architecture, "encode"):
        raise LmforgeError(f"family='seq2seq' needs an encoder-decoder architecture; {type(architecture).__name__} "
                           "has no encode(). Use family='decoder'.")
    if config.stop_strings and decode is None:
        raise LmforgeError("stop_strings need the text of the generated tokens: pass decode= (e.g. "
                           "lambda ids: tokenizer.decode(ids)) to generate_batch.")
    if config.stop_strings and config.num_beams > 1:
        raise LmforgeError("stop_strings work with greedy decoding and sampling, not with beam search "
                           "(num_beams > 1); use stop_token_ids, or num_beams=1.")
    if on_token is not None and config.num_beams > 1:
        raise LmforgeError("Streaming (on_token) shows tokens as they are chosen; beam search (num_beams > 1) "
                           "chooses them only at the end. Use num_beams=1 to stream.")
    device = _device(architecture)
    stops = sorted({*config.stop_token_ids, *([eos_id] if eos_id is not None else [])})
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    k = config.num_beams if config.num_beams > 1 else config.num_return_sequences  # rows per prompt

    if family == "decoder":
        ids, mask = _pad(prompts, fill, left=True, device=device)
        ids, mask = ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
        stepper = _DecoderStepper(architecture, ids, mask, config.max_new_tokens, config.use_cache)
        seen, seen_mask = ids, mask
    else:
        ids, mask = _pad(prompts, fill, left=False, device=device)
        start = architecture.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
        encoder_mask = mask if bool((mask == 0).any()) else None
        encoded = architecture.encode(ids, encoder_mask).repeat_interleave(k, dim=0)  # the encoder runs once
        if encoder_mask is not None:
            encoder_mask = encoder_mask.repeat_interleave(k, dim=0)
        stepper = _Seq2SeqStepper(architecture, encoded, encoder_mask, start, config.max_new_tokens, config.use_cache)
        seen, seen_mask = stepper.tokens[:, :1], None  # the decoder's own tokens: its start token

    penalty = None
    if config.repetition_penalty != 1.0:
        penalty = _RepetitionPenalty(config.repetition_penalty, seen, seen_mask)
    if config.num_beams > 1:
        if stepper.cache is not None and not hasattr(stepper.cache, "reorder"):
            stepper.cache = None  # a cache that cannot follow the beams: rerun the sequence instead
        result = _beam_search(stepper, len(prompts), config, stop_ids, fill, penalty)
    else:
        checker = _StopStrings(config.stop_strings, decode, ids.size(0)) if config.stop_strings else None
        result = _sample_loop(stepper, config, stop_ids, fill, penalty, checker, on_token)
        result.rows_per_prompt = k
    return result


def generate_batch(
    architecture: torch.nn.Module,
    family: str,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    pad_id: int | None,
    eos_id: int | None,
    decoder_start_token_id: int | None = None,
    encoder_attention_mask: list[list[int]] | torch.Tensor | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[list[int | None]], None] | None = None,
) -> list[list[list[int]]]:
    """Generate for a batch of prompts; per prompt, ``num_return_sequences`` lists of new token ids.

    Args:
        architecture: a decoder or seq2seq :class:`~lmforge.Architecture` (in eval mode for
            deterministic results; this function does not change its mode).
        family: ``"decoder"`` (each prompt is continued) or ``"seq2seq"`` (each prompt is an encoder
            input; the decoder starts from ``decoder_start_token_id``, default the architecture's).
        prompts: token ids, one list per prompt, of any lengths (decoder prompts are left-padded
            inside, encoder inputs right-padded, each with its attention mask).
        config: the :class:`GenerationConfig`.
        pad_id: the id used for padding (``None``: ``eos_id``, else 0). Padding never reaches the
            results.
        eos_id: the end-of-sequence id; a stop token in addition to ``config.stop_token_ids``.
        encoder_attention_mask: for prompts given already padded (all one length): 1 at real tokens,
            0 at padding, on either side; only the real tokens are used.
        decode: ids -> text, needed only for ``config.stop_strings``.
        on_token: streaming: called after every step with, per row (prompt-major, then sequence),
            the token that was just appended to that row's result, or ``None`` (the row has ended,
            or ended on this step with a stop token). Greedy and sampling only.

    The results leave out the stop token that ended a sequence (EOS or one of ``stop_token_ids``).
    A sequence ended by a stop string keeps the token that completed the string (tokens are not
    split), so its text may run past the stop string: cut it with :func:`cut_at_stop_string`.
    """
    prompts = _clean_prompts(prompts, encoder_attention_mask)
    result = _run(
        architecture, family, prompts, config, pad_id=pad_id, eos_id=eos_id,
        decoder_start_token_id=decoder_start_token_id, decode=decode, on_token=on_token,
    )
    return result.as_lists()


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of ``stop_strings`` in it."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


@dataclass
class TextStream:
    """Turns tokens arriving one by one into text that can be printed as it comes.

    ``push(token)`` returns the new printable text; ``finish()`` the rest. The pieces add up to
    ``cut_at_stop_string(decode(all tokens), stop_strings)``, the text printed without streaming: text
    is held back while it ends in an incomplete character (a byte-level token may carry part of a
    UTF-8 character) or in what could be the beginning of a stop string.
    """

    decode: Callable[[list[int]], str]
    stop_strings: Sequence[str] = ()
    ids: list[int] = field(default_factory=list)
    shown: str = ""

    def _text(self) -> tuple[str, bool]:
        text = self.decode(self.ids)
        cut = cut_at_stop_string(text, self.stop_strings)
        return cut, len(cut) < len(text)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text, stopped = self._text()
        if not stopped:
            if text.endswith("\ufffd"):
                return ""
            hold = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - hold]
        return self._emit(text)

    def finish(self) -> str:
        return self._emit(self._text()[0])

    def _emit(self, text: str) -> str:
        if not text.startswith(self.shown):  # a decoder whose text of a prefix is not a prefix: wait
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new


# --------------------------------------------------------------------------------------------------
# Tensor front ends (older API, same engine)
# --------------------------------------------------------------------------------------------------


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

    Stops early when ``eos_id`` is produced (it is included). ``temperature == 0`` means greedy.
    Architectures without a KV cache (no ``new_cache``) are run on the whole sequence at every step.
    """
    if input_ids.dim() != 2 or input_ids.size(0) != 1:
        raise LmforgeError("generate() takes one prompt at a time: input_ids of shape (1, T); "
                           "generate_batch() takes several.")
    if input_ids.size(1) == 0:
        raise LmforgeError("The prompt is empty after tokenization; give at least one token of prompt text.")
    config = GenerationConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, use_cache=use_cache)
    result = _run(architecture, "decoder", input_ids.tolist(), config, pad_id=None, eos_id=eos_id,
                  decoder_start_token_id=None, decode=None, on_token=None)
    return result.tokens[:, : int(result.lengths[0])]


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
    batch of inputs. ``num_beams > 1`` is beam search (``temperature``, ``top_k`` and ``top_p`` are
    not used), returning the best hypothesis of each row; see :class:`GenerationConfig`.
    """
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise LmforgeError(
            f"generate_seq2seq() needs input_ids of shape (batch, length) with at least one token, got "
            f"{tuple(input_ids.shape)}; the prompt may be empty after tokenization."
        )
    beams = num_beams > 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, greedy=greedy, temperature=1.0 if beams else temperature,
        top_k=None if beams else top_k, top_p=None if beams else top_p, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=early_stopping, seed=seed, use_cache=use_cache,
    )
    prompts = _clean_prompts(input_ids, attention_mask)
    result = _run(architecture, "seq2seq", prompts, config, pad_id=pad_id, eos_id=eos_id,
                  decoder_start_token_id=decoder_start_token_id, decode=None, on_token=None)
    return result.tokens[:, : int(result.lengths.max())]
