"""Sequence classification: one label (or a set of labels) per text or text pair.

Records have ``text``, optionally ``text_pair``, and ``label``: a label name, or with
``multi_label: true`` a list of label names (JSON Lines / Parquet). The label set is taken from the
training records. The head is a linear layer on one vector per input, which each family computes
its own way (``module.sequence_features``): an encoder's pooled first token, a decoder's last
non-padding token, a seq2seq model's encoder mean or first decoder state (``pooling``).

Metrics (torchmetrics, streaming): accuracy, macro-F1 and Matthews correlation; for multi-label,
their multilabel versions at ``threshold`` (accuracy there is per label: the fraction of
(example, label) decisions that are right).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef

from lmforge import LmforgeError, SpecialTokens, Task, hookimpl


def sorted_labels(names: set[str]) -> list[str]:
    """Label names in a stable order: numerically when they are all integers, else alphabetically."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def classification_metrics(num_labels: int, multi_label: bool, threshold: float) -> MetricCollection:
    """Accuracy, macro-F1 and Matthews correlation (multiclass, or multilabel at ``threshold``)."""
    if multi_label:
        common: dict[str, Any] = {"task": "multilabel", "num_labels": num_labels, "threshold": threshold}
        return MetricCollection(
            {
                "accuracy": Accuracy(**common, average="micro"),
                "f1_macro": F1Score(**common, average="macro"),
                "mcc": MatthewsCorrCoef(**common),
            }
        )
    common = {"task": "multiclass", "num_classes": num_labels}
    return MetricCollection(
        {
            "accuracy": Accuracy(**common, average="micro"),
            "f1_macro": F1Score(**common, average="macro"),
            "mcc": MatthewsCorrCoef(**common),
        }
    )


class SequenceClassification(Task):
    """Classify a text or a text pair into one of the labels (or several, with ``multi_label``).

    Args:
        labels: The label names, in head order. Leave null: they are taken from the training
            records (and stored with every checkpoint, so ``predict`` writes names).
        multi_label: Each record's ``label`` is a list of names; the head predicts each label
            independently (sigmoid, binary cross-entropy) and a label is on when its probability is
            at least ``threshold``.
        threshold: Probability at which a label counts as predicted (multi-label only).
        pooling: How a seq2seq model summarises its input: ``encoder_mean`` (``auto``) or
            ``decoder_first``. Encoders and decoders have one way each (``auto``).
        dropout: Dropout before the head.
    """

    name = "sequence_classification"
    weight_options = ("labels", "multi_label")  # a sigmoid head is not a softmax head
    families = ("encoder", "decoder", "seq2seq")
    fields = ("text", "label")
    optional_fields = ("text_pair",)
    label_fields = ("label",)

    def __init__(
        self,
        labels: list[str] | None = None,
        multi_label: bool = False,
        threshold: float = 0.5,
        pooling: Literal["auto", "encoder_mean", "decoder_first"] = "auto",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise LmforgeError(f"sequence_classification threshold must be between 0 and 1, not {threshold}.")
        self.labels = self.checked_labels(labels)
        self.multi_label = multi_label
        self.threshold = threshold
        self.pooling = pooling
        self.dropout = dropout

    # -- data --------------------------------------------------------------------------------------
    @classmethod
    def infer_labels(cls, columns: dict[str, list[Any]]) -> list[str]:
        names: set[str] = set()
        for value in columns["label"]:
            if isinstance(value, list):
                names.update(str(v) for v in value)
            elif value is not None:
                names.add(str(value))
        return sorted_labels(names)

    @classmethod
    def example_records(cls) -> dict[str, list[Any]]:
        return {
            "text": ["a lovely warm day", "a cold grey day", "the warm sun", "rain and cold wind"],
            "label": ["positive", "negative", "positive", "negative"],
        }

    def _label_ids(self, value: Any, example_id: int, index: dict[str, int]) -> int | list[float]:
        """The head target of one record's ``label`` (``index``: label name -> head position)."""
        names = value if isinstance(value, list) else [value]
        if not self.multi_label and isinstance(value, list):
            raise LmforgeError(
                f"Record {example_id} has a list of labels {value}, but the task is single-label. Set "
                "model.task.init_args.multi_label: true, or give one label per record."
            )
        unknown = [n for n in names if str(n) not in index]
        if value is None or unknown:
            raise LmforgeError(
                f"Record {example_id} has the label {unknown[0] if unknown else None!r}, which is not one of the "
                f"task's {len(self.labels)} labels ({', '.join(self.labels[:10])}{', ...' if len(self.labels) > 10 else ''}; "
                "model.task.init_args.labels, or those of data.train_files when not given). Fix the record, or add "
                "the label to the training data or to model.task.init_args.labels."
            )
        if not self.multi_label:
            return index[str(value)]
        hot = [0.0] * len(self.labels)
        for n in names:
            hot[index[str(n)]] = 1.0
        return hot

    def preprocess(
        self,
        records: dict[str, list[Any]],
        tokenizer: Any,
        special: SpecialTokens,
        max_length: int,
        family: str,
        stage: str,
    ) -> dict[str, list[Any]]:
        texts = [str(t) for t in records["text"]]
        ids_a = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        pairs = records.get("text_pair")
        ids_b = [e.ids for e in tokenizer.encode_batch([str(t) for t in pairs], add_special_tokens=False)] if pairs else None
        out: dict[str, list[Any]] = {"input_ids": [], "example_id": list(records["example_id"])}
        if family == "encoder":
            out["token_type_ids"] = []
        for i, a in enumerate(ids_a):
            input_ids, types, _, _ = self.frame_input(a, ids_b[i] if ids_b else None, special, family, max_length)
            out["input_ids"].append(input_ids)
            if family == "encoder":
                out["token_type_ids"].append(types)
        if "label" in records:
            index = {name: i for i, name in enumerate(self.labels)}  # once per batch, not per record
            out["labels"] = [self._label_ids(v, e, index) for v, e in zip(records["label"], records["example_id"])]
        if stage == "predict":
            out["text"] = texts
            if pairs:
                out["text_pair"] = [str(t) for t in pairs]
        return out

    # -- model -------------------------------------------------------------------------------------
    def build(self, module: Any) -> None:
        labels = self.required_labels()
        if self.pooling != "auto" and module.family != "seq2seq":
            raise LmforgeError(
                f"sequence_classification pooling '{self.pooling}' is for seq2seq models; the {module.family} "
                "family pools one way only. Set model.task.init_args.pooling: auto."
            )
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(module.architecture.d_model, len(labels)))
        self.metrics = classification_metrics(len(labels), self.multi_label, self.threshold)

    def logits(self, module: Any, batch: dict[str, Any]) -> torch.Tensor:
        """``(B, num_labels)`` scores for a batch."""
        return self.head(module.sequence_features(batch, self.pooling))

    def step(self, module: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        logits = self.logits(module, batch)  # (B, L)
        labels = batch["labels"]
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        else:
            loss = F.cross_entropy(logits.float(), labels)
        if stage in ("val", "test"):
            if self.multi_label:
                self.metrics.update(torch.sigmoid(logits.detach().float()), labels.long())
            else:
                self.metrics.update(logits.detach().float(), labels)
        return {"loss": loss, "tokens": torch.tensor(labels.size(0), device=logits.device)}

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        values = self.metrics.compute()  # synchronised over every process
        self.metrics.reset()
        return dict(values)

    def predict_step(self, module: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        logits = self.logits(module, batch).detach().float()
        rows = []
        if self.multi_label:
            probs = torch.sigmoid(logits)
            for i in range(probs.size(0)):
                on = [self.labels[j] for j in range(len(self.labels)) if probs[i, j] >= self.threshold]
                scores = {name: round(float(p), 6) for name, p in zip(self.labels, probs[i])}
                rows.append({"label": on, "scores": scores})
        else:
            probs = torch.softmax(logits, dim=-1)
            best = probs.argmax(-1)
            for i in range(probs.size(0)):
                rows.append({"label": self.labels[int(best[i])], "score": round(float(probs[i, best[i]]), 6)})
        out = []
        for i, row in enumerate(rows):
            inputs = {key: batch[key][i] for key in ("text", "text_pair") if key in batch}
            out.append({"id": int(batch["example_id"][i]), **inputs, **row})
        return out


@hookimpl
def lmforge_tasks():
    return [SequenceClassification]
