"""Masked language modelling (BERT pretraining): hide some tokens, predict them from both sides.

Of the tokens that may be masked (never a special token: padding, separators, ``[CLS]``,
``[MASK]``, ``[UNK]``), each is selected with probability ``mask_prob``; a selected token is
replaced by ``[MASK]`` (``mask_token_rate``), by a random ordinary token (``random_token_rate``)
or left as it is (the rest), and the model is trained to predict the original at every selected
position. With ``whole_word`` the selection is made per word: all pieces of a word, or none (the
word boundaries come from the tokenizer, see :class:`lmforge.SpecialTokens`).

Works on packed blocks (rows of ``block_size`` tokens with documents separated by the tokenizer's
end-of-document token; ``keep_documents_separate`` keeps attention within each document) and on
padded batches (padding is never selected and never attended to).

Masks are drawn from a dedicated ``torch.Generator``. Inside lmforge's data loaders it is seeded
per batch from :func:`lmforge.batch_seed` (the run's data seed and the batch's position in the run)
mixed with ``seed``, so a batch is masked the same way in a worker or in the main process, and in
a resumed run exactly as in the uninterrupted one. Called elsewhere (a plain ``DataLoader``, a
test), it is one generator per process, seeded from ``seed`` (or, by default, the process's torch
seed, which ``seed_everything`` and the data loader's worker seeding make reproducible) and the
data-loader worker id, so no two workers repeat each other's masks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from lmforge import LmforgeError, Objective, SpecialTokens, hookimpl
from lmforge.plugin_api import IGNORE_INDEX


def pad_rows(examples: list[dict[str, Any]], special: SpecialTokens, what: str) -> dict[str, torch.Tensor]:
    """Right-pad the examples' ``input_ids`` into ``(B, T)``; ``attention_mask`` only when rows differ."""
    rows = [e["input_ids"] for e in examples]
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    pad = special.pad_id if special.pad_id is not None else special.eos_id
    ragged = min(lengths) != longest
    if pad is None and ragged:
        raise LmforgeError(
            f"Rows of different lengths need padding, but the tokenizer has neither a pad nor an end-of-text "
            f"token, so {what} cannot batch them. Use packing (data.packing: true) or a tokenizer with [PAD]."
        )
    input_ids = torch.full((len(rows), longest), pad if pad is not None else 0, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    batch = {"input_ids": input_ids}
    if ragged:
        lengths_t = torch.tensor(lengths)
        batch["attention_mask"] = (torch.arange(longest)[None] < lengths_t[:, None]).long()
    return batch


class ProcessGenerator:
    """The ``torch.Generator`` of a collate call (see the module docs for how it is seeded).

    With a batch seed from lmforge's loader: a fresh generator per batch, seeded from it and
    ``seed``. Without: one generator per process, made on first use (never shared by forked
    data-loader workers), seeded from ``seed`` (or, when ``None``, the process's
    ``torch.initial_seed()``) and the worker id. ``stream`` tells apart the generators of objectives
    that collate the same batch together (``nsp`` and its nested ``mlm``), which would otherwise
    draw the same numbers.
    """

    def __init__(self, seed: int | None, stream: int = 0) -> None:
        self.seed = seed
        self.stream = stream
        self._owner: tuple[int, int] | None = None
        self._generator: torch.Generator | None = None

    def get(self) -> torch.Generator:
        from lmforge import batch_seed  # late: it lives with the training loop (Lightning)

        per_batch = batch_seed()
        if per_batch is not None:
            return torch.Generator().manual_seed(self._mix(per_batch))
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        owner = (os.getpid(), worker)
        if self._generator is None or self._owner != owner:
            base = torch.initial_seed() if self.seed is None else self.seed
            self._generator = torch.Generator().manual_seed(self._mix((base * 1_000_003 + worker + 1) % 2**63))
            self._owner = owner
        return self._generator

    def _mix(self, base: int) -> int:
        """A 63-bit seed from ``base``, ``seed`` and ``stream`` (``base`` itself when both are unset)."""
        extra = (0 if self.seed is None else self.seed + 1) * 0x9E3779B97F4A7C15 + self.stream * 0xBF58476D1CE4E5B9
        return (base ^ extra) % 2**63 if extra else base

    def __getstate__(self) -> dict[str, Any]:  # a Generator is process-local state: never pickled
        return {"seed": self.seed, "stream": self.stream, "_owner": None, "_generator": None}


class MLM(Objective):
    """Masked language modelling (BERT's and RoBERTa's pretraining objective).

    Args:
        mask_prob: Probability that a token (or, with ``whole_word``, a word) is selected for
            prediction. BERT: 0.15.
        mask_token_rate: Of the selected tokens, the fraction replaced by ``[MASK]`` (BERT: 0.8).
        random_token_rate: Of the selected tokens, the fraction replaced by a random ordinary
            (non-special) token (BERT: 0.1). The remaining ``1 - mask_token_rate -
            random_token_rate`` are left unchanged (but still predicted).
        whole_word: Select whole words: every piece of a word or none (BERT's whole-word masking).
            Word starts come from the tokenizer (WordPiece ``##`` pieces continue a word;
            byte-level BPE tokens without a leading space continue a word).
        keep_documents_separate: In packed blocks, let each token attend only to tokens of its own
            document (documents end at the tokenizer's end-of-document token), with positions
            restarting at every document.
        seed: Seed of the masking. ``None`` follows the run's seed (``seed_everything``).
    """

    name = "mlm"
    families = ("encoder",)

    def __init__(
        self,
        mask_prob: float = 0.15,
        mask_token_rate: float = 0.8,
        random_token_rate: float = 0.1,
        whole_word: bool = False,
        keep_documents_separate: bool = False,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise LmforgeError(f"mlm mask_prob must be between 0 and 1 (exclusive), got {mask_prob}. BERT uses 0.15.")
        for option, value in (("mask_token_rate", mask_token_rate), ("random_token_rate", random_token_rate)):
            if not 0.0 <= value <= 1.0:
                raise LmforgeError(f"mlm {option} must be between 0 and 1, got {value}. BERT uses 0.8 and 0.1.")
        if mask_token_rate + random_token_rate > 1.0 + 1e-9:
            raise LmforgeError(
                f"mlm mask_token_rate + random_token_rate is {mask_token_rate + random_token_rate:g}, more than 1: "
                "they are fractions of the selected tokens (the rest are kept unchanged). BERT uses 0.8 and 0.1."
            )
        self.mask_prob = mask_prob
        self.mask_token_rate = mask_token_rate
        self.random_token_rate = random_token_rate
        self.whole_word = whole_word
        self.keep_documents_separate = keep_documents_separate
        self.rng = ProcessGenerator(seed)
        self._tables: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def check_architecture(self, architecture) -> None:
        if not getattr(architecture, "has_mlm_head", True):
            raise LmforgeError(
                f"The mlm objective predicts tokens with the architecture's masked-LM head, and this "
                f"{architecture.name} has none. Set model.architecture.init_args.mlm_head: true."
            )

    # -- batches ---------------------------------------------------------------------------------
    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        batch = pad_rows(examples, special, "mlm")
        if self.keep_documents_separate:
            if special.eos_id is None:
                raise LmforgeError("mlm keep_documents_separate needs an end-of-document token in the tokenizer.")
            ends = (batch["input_ids"] == special.eos_id).long()
            batch["document_ids"] = torch.cumsum(ends, dim=1) - ends  # the separator ends its own document
        return self.mask(batch, special)

    def _vocabulary(self, special: SpecialTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(is_special (V,), ordinary ids, word_start (V,) or None), cached per tokenizer."""
        key = hash((special.vocab_size, tuple(sorted(special.all_ids())), special.word_start))
        if self._tables is None or self._tables[0] != key:
            is_special = torch.zeros(special.vocab_size, dtype=torch.bool)
            is_special[list(special.all_ids())] = True
            ordinary = (~is_special).nonzero().squeeze(1)
            word_start = None if special.word_start is None else torch.tensor(special.word_start, dtype=torch.bool)
            self._tables = (key, is_special, ordinary, word_start)
        return self._tables[1:]

    def mask(self, batch: dict[str, torch.Tensor], special: SpecialTokens) -> dict[str, torch.Tensor]:
        """Select and corrupt tokens of ``batch["input_ids"]`` in place; add ``labels`` ``(B, T)``.

        ``labels`` hold the original token at selected positions and -100 elsewhere;
        ``mlm_positions`` ``(N,)`` are the flat indices (``row * T + column``) of the selected
        positions, found here on the CPU so that the loss gathers them without waiting for the
        device (selecting with a boolean mask on a GPU stops the host until the count is known).
        """
        if special.mask_id is None and self.mask_token_rate > 0:
            raise LmforgeError(
                "The mlm objective replaces tokens by the tokenizer's mask token, but the tokenizer has none "
                "(looked for [MASK], <mask>). Train a WordPiece tokenizer (`lmforge tokenizer train --type "
                "wordpiece`), add a mask token, or set mask_token_rate: 0."
            )
        is_special, ordinary, word_start = self._vocabulary(special)
        if self.whole_word and word_start is None:
            raise LmforgeError(
                "mlm whole_word: true needs to know where words start, and this tokenizer marks no word "
                "boundaries (no WordPiece '##' prefix, byte-level 'Ġ' or SentencePiece '▁'). Set whole_word: false."
            )
        generator = self.rng.get()
        input_ids = batch["input_ids"]
        if int(input_ids.max()) >= special.vocab_size:
            raise LmforgeError(
                f"A token id ({int(input_ids.max())}) is outside the tokenizer's vocabulary of {special.vocab_size}; "
                "the data was tokenized with another tokenizer. Delete the data cache or use the same tokenizer."
            )
        B, T = input_ids.shape
        eligible = ~is_special[input_ids]  # (B, T)
        if "attention_mask" in batch:
            eligible &= batch["attention_mask"].bool()
        if self.whole_word:
            starts = word_start[input_ids] | ~eligible  # (B, T): special tokens and padding cut words
            starts[:, 0] = True
            word = torch.cumsum(starts.long(), dim=1) - 1  # (B, T): word index within its row
            chosen_word = torch.rand((B, T), generator=generator) < self.mask_prob  # one draw per word slot
            selected = chosen_word.gather(1, word) & eligible
        else:
            selected = (torch.rand((B, T), generator=generator) < self.mask_prob) & eligible
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        how = torch.rand((B, T), generator=generator)
        to_mask = selected & (how < self.mask_token_rate)
        to_random = selected & (how >= self.mask_token_rate) & (how < self.mask_token_rate + self.random_token_rate)
        corrupted = input_ids.clone()
        if special.mask_id is not None:
            corrupted[to_mask] = special.mask_id
        n_random = int(to_random.sum())
        if n_random:
            corrupted[to_random] = ordinary[torch.randint(len(ordinary), (n_random,), generator=generator)]
        batch["input_ids"] = corrupted
        batch["labels"] = labels
        batch["mlm_positions"] = selected.flatten().nonzero().squeeze(1)  # (N,)
        return batch

    # -- loss ------------------------------------------------------------------------------------
    def loss_from_hidden(
        self, architecture, hidden: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Masked-LM loss and accuracy from hidden states ``(B, T, C)``, at the selected positions only.

        Only the ``N`` selected positions go through the vocabulary projection (``(N, C) -> (N, V)``);
        the other positions' logits would be thrown away by the loss. ``positions`` are the batch's
        ``mlm_positions`` (see :meth:`mask`); without them they are found from ``labels``, which on a
        GPU waits for the device.
        """
        if positions is None:
            positions = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # (N,)
        targets = labels.flatten().index_select(0, positions)  # (N,)
        n = positions.numel()  # known on the host: no device sync
        if n == 0:  # nothing selected in the whole batch: a zero loss that keeps the graph
            zero = hidden.sum() * 0.0
            return {"loss": zero, "tokens": targets.new_zeros(()), "mlm_loss": zero.detach(),
                    "mlm_accuracy": zero.detach()}
        logits = architecture.mlm_logits(hidden.flatten(0, 1).index_select(0, positions))  # (N, V)
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "tokens": targets.new_full((), n), "mlm_loss": loss.detach(), "mlm_accuracy": accuracy}

    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        architecture = module.architecture
        hidden = architecture(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
            document_ids=batch.get("document_ids"),
        )
        out = self.loss_from_hidden(architecture, hidden, batch["labels"], batch.get("mlm_positions"))
        del out["mlm_loss"]  # the same as "loss" here
        return out


@hookimpl
def lmforge_objectives():
    return [MLM]
