"""Sentence-pair objectives: BERT's next-sentence prediction (``nsp``) and ALBERT's sentence-order
prediction (``sop``), each optionally combined with masked-LM (``mlm:``).

Each row of the batch (a document, or a packed block of several) is cut into documents at the
tokenizer's end-of-document token and into sentences after sentence-ending punctuation (see
:class:`lmforge.SpecialTokens`). The longest document of the row gives two consecutive spans: A,
whole sentences from the start of the document up to a random sentence boundary, and B, the
sentences after it (a document of one sentence is cut at a random token instead). The model
reads ``[CLS] A [SEP] B [SEP]`` with token types 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]`` and
classifies the pair from the pooled ``[CLS]`` state:

* ``nsp``: with probability ``positive_rate`` B is the true continuation (label 0), otherwise B
  is replaced by sentences of another document of the batch (label 1), starting at a random
  sentence and as long as the true B would have been allowed to be. With packed rows a document
  cut by the packing can sit in two rows of one batch, so a negative B is occasionally another
  part of A's document (never its continuation); ``data.packing: false`` (one document per row)
  avoids that.
* ``sop``: with probability ``positive_rate`` the pair is (A, B) (label 0), otherwise it is
  exactly the swapped (B, A) (label 1). Both segments come from the same document, so topic
  cannot give the answer away, only order.

Labels follow Hugging Face's ``next_sentence_label``/``sentence_order_label``: 0 = in order.

When a pair is longer than the longest row of the batch allows (with its three special tokens),
A loses tokens at its start and B at its end, so the junction between them, which the pair
label is about, is always kept.

Combining with masked-LM: ``mlm:`` takes an ``mlm`` objective (``class_path: mlm`` and its
options), which then masks the pair batch; the loss is the sum of both losses, and both
accuracies are logged. This is BERT's recipe with ``nsp`` and ALBERT's with ``sop``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from lmforge import LmforgeError, Objective, SpecialTokens, hookimpl
from lmforge_plugins.objectives.mlm import MLM, ProcessGenerator


def split_documents(row: list[int], eos_id: int | None) -> list[list[int]]:
    """The non-empty documents of a row, cut at (and without) the end-of-document token.

    The first one may be the end of a document that a packed row cut anywhere, even mid-sentence.
    """
    documents, current = [], []
    for token in row:
        if token == eos_id:
            if current:
                documents.append(current)
            current = []
        else:
            current.append(token)
    if current:
        documents.append(current)
    return documents


def split_sentences(document: list[int], sentence_end: tuple[bool, ...] | None) -> list[list[int]]:
    """Sentences of a document: a sentence ends after each sentence-ending token."""
    if sentence_end is None:
        return [document]
    sentences, current = [], []
    for token in document:
        current.append(token)
        if token < len(sentence_end) and sentence_end[token]:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


class SentencePairs(Objective):
    """Shared by ``nsp`` and ``sop``: pair building, batching, the pair loss and the MLM add-on."""

    #: "nsp" or "sop": how a negative pair is made.
    negatives: str = ""

    def __init__(self, positive_rate: float = 0.5, mlm: MLM | None = None, seed: int | None = None) -> None:
        if not 0.0 <= positive_rate <= 1.0:
            raise LmforgeError(
                f"{self.name} positive_rate must be between 0 and 1, got {positive_rate}. BERT and ALBERT use 0.5."
            )
        if isinstance(mlm, dict):  # as stored in checkpoints by plugin_options()
            mlm = MLM(**mlm.get("init_args", {}))
        if mlm is not None and not isinstance(mlm, MLM):
            raise LmforgeError(
                f"{self.name} mlm: must be an mlm objective (class_path: mlm) or null, not {type(mlm).__name__}."
            )
        self.positive_rate = positive_rate
        self.mlm = mlm
        self.rng = ProcessGenerator(seed, stream=1)  # not the stream of the nested mlm's generator

    def plugin_options(self) -> dict[str, Any]:
        """Plain data: the nested ``mlm`` objective is stored as its own ``plugin_config()``."""
        options = super().plugin_options()
        if isinstance(options.get("mlm"), MLM):
            options["mlm"] = options["mlm"].plugin_config()
        return options

    def check_architecture(self, architecture) -> None:
        if not getattr(architecture, "has_pair_head", False):
            raise LmforgeError(
                f"The {self.name} objective classifies sentence pairs with the architecture's pair head, and this "
                f"{architecture.name} has none. Set model.architecture.init_args.pooler: true and pair_head: true."
            )
        if getattr(architecture, "type_vocab_size", 2) < 2:
            raise LmforgeError(
                f"The {self.name} objective gives sentence B token type 1, but the architecture has "
                f"type_vocab_size={architecture.type_vocab_size}. Set type_vocab_size: 2."
            )
        if self.mlm is not None:
            self.mlm.check_architecture(architecture)

    # -- pairs -----------------------------------------------------------------------------------
    @staticmethod
    def _cut(document: list[int], sentences: list[list[int]], rng: random.Random) -> tuple[list[int], list[int]]:
        """(A, B): the document cut at a random sentence boundary (at a random token if one sentence)."""
        if len(sentences) >= 2:
            a_end = rng.randint(1, len(sentences) - 1)
            return [t for s in sentences[:a_end] for t in s], [t for s in sentences[a_end:] for t in s]
        cut = rng.randint(1, len(document) - 1)
        return document[:cut], document[cut:]

    def make_pairs(
        self, examples: list[dict[str, Any]], special: SpecialTokens, rng: random.Random
    ) -> tuple[list[list[int]], list[list[int]], list[int], int]:
        """(A segments, B segments, labels, length limit of a pair with its three special tokens)."""
        limit = max(len(e["input_ids"]) for e in examples)
        if limit < 5:
            raise LmforgeError(
                f"{self.name} needs rows of at least 5 tokens ([CLS] A [SEP] B [SEP]), but the longest row of the "
                f"batch has {limit}. Raise data.block_size."
            )
        budget = limit - 3  # tokens left for A and B together
        rows = [[int(t) for t in e["input_ids"]] for e in examples]
        documents = [split_documents(row, special.eos_id) for row in rows]
        firsts, a_segments, b_segments, labels = [], [], [], []
        for row_docs in documents:
            usable = [d for d in row_docs if len(d) >= 2]
            if not usable:
                continue  # a row without a document of two tokens cannot make a pair
            document = max(usable, key=len)
            a, b = self._cut(document, split_sentences(document, special.sentence_end), rng)
            firsts.append(document)
            a_segments.append(a)
            b_segments.append(b)
        if not a_segments:
            raise LmforgeError(
                f"No row of this batch holds a document of at least two tokens, so {self.name} cannot build a "
                "sentence pair. Check the data (one document per line) and data.block_size."
            )
        for i, (a, b) in enumerate(zip(a_segments, b_segments)):
            positive = rng.random() < self.positive_rate
            if not positive and self.negatives == "nsp":
                b = self._random_next(i, firsts, documents, special, budget - min(len(a), budget - 1), rng)
            elif not positive:  # sop: the same two segments, swapped
                a, b = b, a
            a, b = self._truncate(a, b, budget, swapped=not positive and self.negatives == "sop")
            a_segments[i], b_segments[i] = a, b
            labels.append(0 if positive else 1)
        return a_segments, b_segments, labels, limit

    @staticmethod
    def _random_next(
        i: int, firsts: list[list[int]], documents: list[list[list[int]]], special: SpecialTokens,
        length: int, rng: random.Random,
    ) -> list[int]:
        """Sentences of another document of the batch, from a random sentence on, up to ``length`` tokens."""
        own = firsts[i]
        # (sentences, first sentence B may start at). A row's first document may begin mid-sentence
        # (packing cuts anywhere), so B starts at its second sentence or later, or, if it has only one,
        # comes from another document when the batch has one.
        candidates, whole_sentences = [], []
        for row_docs in documents:
            for position, document in enumerate(row_docs):
                if document is not own:
                    sentences = split_sentences(document, special.sentence_end)
                    first = 1 if position == 0 and len(sentences) > 1 else 0
                    candidates.append((sentences, first))
                    if position > 0 or first == 1:
                        whole_sentences.append((sentences, first))
        if not candidates:
            raise LmforgeError(
                "nsp makes its negative pairs from another document of the same batch, and this batch holds only "
                "one document. Use data.batch_size of 2 or more."
            )
        sentences, first = rng.choice(whole_sentences or candidates)
        start = rng.randrange(first, len(sentences))
        tokens = [t for s in sentences[start:] for t in s]
        return tokens[: max(length, 1)]

    @staticmethod
    def _truncate(a: list[int], b: list[int], budget: int, swapped: bool) -> tuple[list[int], list[int]]:
        """Shorten the longer segment until ``len(a) + len(b) <= budget``, keeping the junction of the
        document: the segment that comes first in the document loses tokens at its start, the other
        at its end (for a swapped SOP pair, B came first)."""
        first, second = (b, a) if swapped else (a, b)
        start, stop = 0, len(second)  # keep first[start:] and second[:stop]
        while (len(first) - start) + stop > budget:
            if len(first) - start >= stop:
                start += 1
            else:
                stop -= 1
        first, second = first[start:], second[:stop]
        return (second, first) if swapped else (first, second)

    # -- batches ---------------------------------------------------------------------------------
    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        if special.cls_id is None or special.sep_id is None:
            raise LmforgeError(
                f"{self.name} builds [CLS] A [SEP] B [SEP] inputs, but the tokenizer has no "
                f"{'[CLS]' if special.cls_id is None else '[SEP]'} token. Use a WordPiece tokenizer "
                "(`lmforge tokenizer train --type wordpiece`) or one with <s> and </s>."
            )
        generator = self.rng.get()
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        a_segments, b_segments, labels, _ = self.make_pairs(examples, special, rng)
        rows, types = [], []
        for a, b in zip(a_segments, b_segments):
            rows.append([special.cls_id, *a, special.sep_id, *b, special.sep_id])
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        longest = max(len(r) for r in rows)
        pad = special.pad_id if special.pad_id is not None else special.sep_id
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (row, row_types) in enumerate(zip(rows, types)):
            input_ids[i, : len(row)] = torch.tensor(row)
            token_type_ids[i, : len(row)] = torch.tensor(row_types)
            attention_mask[i, : len(row)] = 1
        batch = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "pair_labels": torch.tensor(labels, dtype=torch.long),
        }
        if int(attention_mask.min()) == 0:
            batch["attention_mask"] = attention_mask
        if self.mlm is not None:
            batch = self.mlm.mask(batch, special)
        return batch

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        architecture = module.architecture
        hidden = architecture(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch["token_type_ids"],
        )
        logits = architecture.pair_logits(architecture.pooled(hidden))  # (B, 2)
        labels = batch["pair_labels"]
        pair_loss = F.cross_entropy(logits.float(), labels)
        out = {
            "loss": pair_loss,
            "tokens": labels.new_full((), labels.numel()),  # a fill on the device, not a host-to-device copy
            f"{self.name}_loss": pair_loss.detach(),
            f"{self.name}_accuracy": (logits.detach().argmax(dim=-1) == labels).float().mean(),
        }
        if self.mlm is not None:
            mlm = self.mlm.loss_from_hidden(architecture, hidden, batch["labels"], batch.get("mlm_positions"))
            out["loss"] = pair_loss + mlm["loss"]
            out["tokens"] = mlm["tokens"]
            out["mlm_loss"] = mlm["mlm_loss"]
            out["mlm_accuracy"] = mlm["mlm_accuracy"]
        return out


class NSP(SentencePairs):
    """Next-sentence prediction (BERT): is sentence B the continuation of A, or from another document?

    Args:
        positive_rate: Fraction of pairs whose B is the true continuation (BERT: 0.5).
        mlm: Also train masked-LM on the pairs: an ``mlm`` objective (``class_path: mlm`` with its
            options). The loss is the sum of both (BERT's pretraining). ``null``: NSP alone.
        seed: Seed of the pair choices. ``None`` follows the run's seed (``seed_everything``).
    """

    name = "nsp"
    families = ("encoder",)
    negatives = "nsp"

    def __init__(self, positive_rate: float = 0.5, mlm: MLM | None = None, seed: int | None = None) -> None:
        super().__init__(positive_rate=positive_rate, mlm=mlm, seed=seed)


class SOP(SentencePairs):
    """Sentence-order prediction (ALBERT): are two consecutive segments in order, or swapped?

    Args:
        positive_rate: Fraction of pairs in their original order (ALBERT: 0.5).
        mlm: Also train masked-LM on the pairs: an ``mlm`` objective (``class_path: mlm`` with its
            options). The loss is the sum of both (ALBERT's pretraining). ``null``: SOP alone.
        seed: Seed of the pair choices. ``None`` follows the run's seed (``seed_everything``).
    """

    name = "sop"
    families = ("encoder",)
    negatives = "sop"

    def __init__(self, positive_rate: float = 0.5, mlm: MLM | None = None, seed: int | None = None) -> None:
        super().__init__(positive_rate=positive_rate, mlm=mlm, seed=seed)


@hookimpl
def lmforge_objectives():
    return [NSP, SOP]
