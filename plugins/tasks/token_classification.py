"""Token classification (named entities with BIO / IOB2 tags): one tag per word.

Records have ``words`` (a list of words, or a string split on whitespace) and ``tags`` (one tag
per word, as a list or a whitespace-separated string). A word may become several sub-tokens: its
tag is learnt and predicted on the first one, the others are ignored (label -100). Words cut off by
``data.max_length`` are not scored, and ``predict`` gives them no tag (``null``, with a warning):
the model never saw them, so any tag would be a guess.

Metrics (streaming): entity-level precision / recall / F1 with seqeval's default semantics
(:class:`lmforge.metrics.EntityF1`) and the accuracy of word tags (torchmetrics).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import Accuracy

from lmforge import LmforgeError, SpecialTokens, Task, hookimpl
from lmforge.metrics import EntityF1, check_bio_labels
from lmforge.plugin_api import IGNORE_INDEX


def as_list(value: Any) -> list[str]:
    """A list of words/tags from a list or a whitespace-separated string."""
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def _closing_tokens(special: SpecialTokens, family: str) -> int:
    """How many tokens :meth:`Task.frame_input` puts after a single text (its SEP or end token)."""
    closing = special.sep_id if family == "encoder" and special.sep_id is not None else special.eos_id
    return 0 if closing is None else 1


class TokenClassification(Task):
    """Tag every word of a text (BIO / IOB2 tags such as ``B-PER``, ``I-PER``, ``O``).

    Args:
        labels: The tag names, in head order. Leave null: they are taken from the training records
            (and stored with every checkpoint, so ``predict`` writes tag names).
        dropout: Dropout before the head.
    """

    name = "token_classification"
    families = ("encoder", "decoder")
    fields = ("words", "tags")
    label_fields = ("tags",)
    pad_values: ClassVar[dict[str, Any]] = {"input_ids": "pad", "labels": IGNORE_INDEX, "word_starts": 0}

    def __init__(self, labels: list[str] | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.labels = self.checked_labels(labels)
        if self.labels is not None:
            check_bio_labels(self.labels)
        self.dropout = dropout

    # -- data --------------------------------------------------------------------------------------
    @classmethod
    def infer_labels(cls, columns: dict[str, list[Any]]) -> list[str]:
        tags = {t for value in columns["tags"] if value is not None for t in as_list(value)}
        check_bio_labels(tags)
        # "O" first, then each type's B- before its I-
        return sorted(tags, key=lambda t: ("" if t == "O" else t[2:], t[:1]))

    @classmethod
    def example_records(cls) -> dict[str, list[Any]]:
        return {
            "words": [["Mia", "lives", "in", "Paris"], ["Tom", "Lee", "left", "Rome"]],
            "tags": [["B-PER", "O", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]],
        }

    def preprocess(
        self,
        records: dict[str, list[Any]],
        tokenizer: Any,
        special: SpecialTokens,
        max_length: int,
        family: str,
        stage: str,
    ) -> dict[str, list[Any]]:
        words = [as_list(w) for w in records["words"]]
        # every word on its own, with the space that precedes it in running text (byte-level BPE
        # tokenizers encode " word" differently from "word"), in one call for the whole batch
        flat = [w if j == 0 else " " + w for ws in words for j, w in enumerate(ws)]
        pieces = [e.ids for e in tokenizer.encode_batch(flat, add_special_tokens=False)] if flat else []
        index = {name: i for i, name in enumerate(self.labels or [])}
        out: dict[str, list[Any]] = {"input_ids": [], "word_starts": [], "example_id": list(records["example_id"])}
        if family == "encoder":
            out["token_type_ids"] = []
        tags_column = records.get("tags")
        if tags_column is not None:
            out["labels"] = []
        if stage == "predict":
            out["words"] = words
        cursor = 0
        for r, ws in enumerate(words):
            word_pieces = [p or [special.unk_id if special.unk_id is not None else 0] for p in pieces[cursor : cursor + len(ws)]]
            cursor += len(ws)
            ids = [t for p in word_pieces for t in p]
            input_ids, types, start, _ = self.frame_input(ids, None, special, family, max_length)
            room = len(input_ids) - start - _closing_tokens(special, family)  # sub-tokens of the text that fit
            starts = [0] * len(input_ids)
            position = start
            first_positions = []
            for p in word_pieces:
                if position >= start + room:
                    break
                starts[position] = 1
                first_positions.append(position)
                position += len(p)
            out["input_ids"].append(input_ids)
            out["word_starts"].append(starts)
            if family == "encoder":
                out["token_type_ids"].append(types)
            if tags_column is not None:
                tags = as_list(tags_column[r])
                if len(tags) != len(ws):
                    raise LmforgeError(
                        f"Record {records['example_id'][r]} has {len(ws)} words but {len(tags)} tags; give one tag per word."
                    )
                labels = [IGNORE_INDEX] * len(input_ids)
                for position, tag in zip(first_positions, tags):
                    if tag not in index:
                        raise LmforgeError(
                            f"Record {records['example_id'][r]} has the tag {tag!r}, which is not one of the "
                            f"task's {len(index)} tags ({', '.join(list(index)[:12])}; model.task.init_args.labels, or "
                            "those of data.train_files when not given). Fix the record, or add the tag to the "
                            "training data or to model.task.init_args.labels."
                        )
                    labels[position] = index[tag]
                out["labels"].append(labels)
        return out

    # -- model -------------------------------------------------------------------------------------
    def build(self, module: Any) -> None:
        labels = self.required_labels()
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(module.architecture.d_model, len(labels)))
        self.entity_f1 = EntityF1()
        self.token_accuracy = Accuracy(task="multiclass", num_classes=len(labels), ignore_index=IGNORE_INDEX)

    def step(self, module: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        logits = self.head(module.token_features(batch)).float()  # (B, T, L)
        labels = batch["labels"]  # (B, T), -100 except on each word's first sub-token
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if stage in ("val", "test"):
            predicted = logits.detach().argmax(-1)  # (B, T)
            self.token_accuracy.update(predicted, labels)
            scored = labels != IGNORE_INDEX
            pred_tags = [[self.labels[int(t)] for t in predicted[i][scored[i]]] for i in range(labels.size(0))]
            true_tags = [[self.labels[int(t)] for t in labels[i][scored[i]]] for i in range(labels.size(0))]
            self.entity_f1.update(pred_tags, true_tags)
        return {"loss": loss, "tokens": (labels != IGNORE_INDEX).sum()}

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        entity = self.entity_f1.compute()  # synchronised over every process
        scores = {f"entity_{k}": v for k, v in entity.items()}
        scores["token_accuracy"] = self.token_accuracy.compute()
        self.entity_f1.reset()
        self.token_accuracy.reset()
        return scores

    def predict_step(self, module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        predicted = self.head(module.token_features(batch)).detach().argmax(-1)  # (B, T)
        rows = []
        for i, words in enumerate(batch["words"]):
            tags: list[str | None] = [self.labels[int(t)] for t in predicted[i][batch["word_starts"][i].bool()]]
            if len(tags) < len(words):  # words past data.max_length were never seen: no tag, not a guessed "O"
                rank_zero_warn(
                    "Some records are longer than data.max_length tokens: their words past it get no tag (null) in "
                    "the predictions. Raise data.max_length (up to what the architecture accepts) to tag them."
                )
                tags += [None] * (len(words) - len(tags))
            rows.append({"id": int(batch["example_id"][i]), "words": words, "tags": tags})
        return rows


@hookimpl
def lmforge_tasks():
    return [TokenClassification]
