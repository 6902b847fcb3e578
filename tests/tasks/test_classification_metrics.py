"""The classification tasks' metrics on fixed predictions, against scores computed by hand.

The predictions go through the task itself (its head set to the identity, fed chosen features), so
what is checked is the task's whole scoring path: argmax or sigmoid-and-threshold, the ignored
sub-token and padding positions, word-level BIO tags, then the torchmetrics / EntityF1 values.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmforge_plugins.tasks.sequence_classification import SequenceClassification
from lmforge_plugins.tasks.token_classification import TokenClassification

IGNORE = -100


class FixedFeatures(nn.Module):
    """Stands in for a family module: returns the features it was given."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features
        self.architecture = SimpleNamespace(d_model=features.size(-1))

    def sequence_features(self, batch, pooling="auto"):
        return self.features

    def token_features(self, batch):
        return self.features


def identity_head(task, n: int) -> None:
    linear = task.head[1]
    with torch.no_grad():
        linear.weight.copy_(torch.eye(n))
        linear.bias.zero_()


def built(task, n: int):
    task.build(FixedFeatures(torch.zeros(1, n)))
    identity_head(task, n)
    return task.eval()


def test_multiclass_accuracy_macro_f1_and_mcc():
    task = built(SequenceClassification(labels=["a", "b", "c"]), 3)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = nn.functional.one_hot(predicted, 3).float() * 3.0
    task.step(FixedFeatures(logits), {"labels": targets}, "val")
    scores = task.compute_metrics("val")
    # confusion (rows true, columns predicted): [[1,1,0],[0,2,0],[1,0,1]]
    # accuracy 4/6; F1 per class: a P=1/2 R=1/2 -> 1/2; b P=2/3 R=1 -> 4/5; c P=1 R=1/2 -> 2/3
    assert scores["accuracy"].item() == pytest.approx(4 / 6, abs=1e-6)
    assert scores["f1_macro"].item() == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3, abs=1e-6)
    # Gorodkin's multiclass MCC: s=6, c=4, t=(2,2,2), p=(2,3,1): (c*s - sum p*t) / sqrt((s^2 - sum p^2)(s^2 - sum t^2))
    assert scores["mcc"].item() == pytest.approx((4 * 6 - 12) / math.sqrt((36 - 14) * (36 - 12)), abs=1e-6)
    # compute_metrics resets: a second validation starts from nothing
    task.step(FixedFeatures(logits[:2]), {"labels": targets[:2]}, "val")
    assert task.compute_metrics("val")["accuracy"].item() == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    "threshold, accuracy, f1_macro, mcc, predicted",
    [
        # decisions at 0.5: label x [1,0,0] vs gold [1,1,0]; label y [1,1,1] vs gold [0,1,1]
        # F1 x = 2/3, y = 4/5; all 6 decisions: tp 3, fp 1, fn 1, tn 1 -> MCC (3-1)/sqrt(4*4*2*2)
        (0.5, 4 / 6, (2 / 3 + 4 / 5) / 2, 2 / 8, [["x", "y"], ["y"], ["y"]]),
        # at 0.7: x [1,0,0] (F1 2/3), y [0,1,0] vs [0,1,1] (F1 2/3); tp 2, fp 0, fn 2, tn 2 -> MCC 4/sqrt(2*4*4*2)
        (0.7, 4 / 6, 2 / 3, 4 / 8, [["x"], ["y"], []]),
    ],
)
def test_multilabel_scores_follow_the_threshold(threshold, accuracy, f1_macro, mcc, predicted):
    task = built(SequenceClassification(labels=["x", "y"], multi_label=True, threshold=threshold), 2)
    probs = torch.tensor([[0.9, 0.6], [0.4, 0.8], [0.2, 0.55]])
    logits = torch.log(probs / (1 - probs))  # sigmoid(logits) == probs
    gold = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    task.step(FixedFeatures(logits), {"labels": gold}, "val")
    scores = task.compute_metrics("val")
    assert scores["accuracy"].item() == pytest.approx(accuracy, abs=1e-6)
    assert scores["f1_macro"].item() == pytest.approx(f1_macro, abs=1e-6)
    assert scores["mcc"].item() == pytest.approx(mcc, abs=1e-6)
    rows = task.predict_step(FixedFeatures(logits), {"example_id": torch.arange(3), "text": ["p", "q", "r"]})
    assert [r["label"] for r in rows] == predicted
    assert rows[1]["scores"] == {"x": pytest.approx(0.4, abs=1e-5), "y": pytest.approx(0.8, abs=1e-5)}


TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def _token_batch():
    """Two sentences: [CLS] and [SEP], a word split in two sub-tokens, padding (all ignored)."""
    t = {tag: i for i, tag in enumerate(TAGS)}
    labels = torch.tensor(
        [
            # [CLS] w0      w1      w1'     w2    w3       w3'     w4       [SEP]
            [IGNORE, t["B-PER"], t["I-PER"], IGNORE, t["O"], t["B-LOC"], IGNORE, t["I-LOC"], IGNORE],
            # [CLS] w0    w1        w2     [SEP]   padding
            [IGNORE, t["O"], t["B-PER"], t["O"], IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
        ]
    )
    predicted_words = [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["O", "I-PER", "B-LOC"]]
    predicted = torch.full(labels.shape, t["B-LOC"])  # every ignored position predicts B-LOC
    for row, tags in enumerate(predicted_words):
        positions = (labels[row] != IGNORE).nonzero().flatten()
        predicted[row, positions] = torch.tensor([t[tag] for tag in tags])
    word_starts = (labels != IGNORE).long()
    return labels, nn.functional.one_hot(predicted, len(TAGS)).float() * 3.0, word_starts


def test_entity_scores_on_partial_overlaps_and_token_accuracy():
    task = built(TokenClassification(labels=TAGS), len(TAGS))
    labels, logits, _ = _token_batch()
    out = task.step(FixedFeatures(logits), {"labels": labels}, "val")
    assert out["tokens"].item() == 8  # the scored words; sub-tokens, specials and padding do not count
    scores = task.compute_metrics("val")
    # sentence 1: gold PER(0-1) LOC(3-4), predicted PER(0-0) LOC(3-4): tp 1 (LOC), fp 1, fn 1
    # sentence 2: gold PER(1); predicted I-PER after O opens PER(1) (seqeval's default), and LOC(2): tp 1, fp 1
    # tp 2, fp 2, fn 1 -> precision 1/2, recall 2/3, F1 4/7
    assert scores["entity_precision"].item() == pytest.approx(1 / 2)
    assert scores["entity_recall"].item() == pytest.approx(2 / 3)
    assert scores["entity_f1"].item() == pytest.approx(4 / 7)
    # word tags right: 4 of 5, then 1 of 3
    assert scores["token_accuracy"].item() == pytest.approx(5 / 8)


def test_predict_writes_one_tag_per_word():
    task = built(TokenClassification(labels=TAGS), len(TAGS))
    _, logits, word_starts = _token_batch()
    words = [["Tom", "Brown", "went", "Red", "Hill"], ["and", "Mia", "left", "Rome"]]  # the last word was cut off
    batch = {"example_id": torch.tensor([4, 5]), "words": words, "word_starts": word_starts}
    with pytest.warns(UserWarning, match="their words past it get no tag"):
        rows = task.predict_step(FixedFeatures(logits), batch)
    assert rows == [
        {"id": 4, "words": words[0], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"id": 5, "words": words[1], "tags": ["O", "I-PER", "B-LOC", None]},  # never seen: no tag
    ]
