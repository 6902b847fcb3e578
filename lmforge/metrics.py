"""Task metrics that torchmetrics does not provide in the form fine-tuning needs.

Both metrics keep only running sums (counts of true/false positives, summed scores), never the
predictions themselves: memory stays constant however large the validation set is, and
``torchmetrics`` syncs them across DDP ranks with an all-reduce ``sum``, which is exact (the
result equals a single-process run over the union of the ranks' data).

* :class:`EntityF1`: entity-level precision/recall/F1 over BIO (IOB2) tag sequences, with the
  semantics of ``seqeval``'s default (conlleval) mode: an ``I-X`` tag that follows ``O`` or a tag of
  another type starts a new entity instead of being dropped.
* :class:`SquadScores`: exact match and token F1 of extracted answers with the SQuAD v1.1/v2.0
  answer normalisation, the best score over several gold answers, and unanswerable questions (an
  empty gold list) matched only by an empty prediction.

Scores are fractions in ``[0, 1]`` like every other lmforge metric (SQuAD papers print them x100).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric

from lmforge.errors import LmforgeError

__all__ = [
    "EntityF1",
    "SquadScores",
    "answer_exact",
    "answer_f1",
    "best_answer_scores",
    "bio_entities",
    "check_bio_labels",
    "normalize_answer",
]


# -- BIO entities ---------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER" -> ("B", "PER")``; ``"O" -> ("O", "")``. Anything else is a labelling error."""
    if tag == "O":
        return "O", ""
    prefix, sep, entity_type = tag.partition("-")
    if sep and prefix in ("B", "I") and entity_type:
        return prefix, entity_type
    raise LmforgeError(
        f"Tag {tag!r} is not a BIO (IOB2) tag: entity metrics expect 'O' or 'B-TYPE' / 'I-TYPE' "
        "(e.g. 'B-PER', 'I-PER'). Convert the tags of the token-classification data (and any "
        "model.task.init_args.labels) to BIO."
    )


def check_bio_labels(labels: Iterable[str]) -> None:
    """Raise :class:`LmforgeError` naming the first label that is not a BIO tag.

    Meant for a task's ``build`` so that a label set the metric cannot read is refused before
    training, not at the first validation step.
    """
    for label in labels:
        _split_tag(label)


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as ``(type, first, last)`` (inclusive token indices).

    An entity begins at ``B-X``, or at ``I-X`` when the previous tag is ``O`` or of another type
    (seqeval's default mode; the strict IOB2 mode would drop such an ``I-X``). It continues over
    the following ``I-X`` tags of the same type.
    """
    entities: set[tuple[str, int, int]] = set()
    current_type, start = None, 0
    for i, tag in enumerate(tags):
        prefix, entity_type = _split_tag(tag)
        continues = prefix == "I" and entity_type == current_type
        if continues:
            continue
        if current_type is not None:
            entities.add((current_type, start, i - 1))
        current_type, start = (entity_type, i) if prefix != "O" else (None, i)
    if current_type is not None:
        entities.add((current_type, start, len(tags) - 1))
    return entities


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 when ``den`` is 0 (seqeval's zero_division default also gives 0)."""
    num, den = num.double(), den.double()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


class EntityF1(Metric):
    """Micro-averaged entity precision, recall and F1 over BIO tag sequences.

    ``update(pred_tags, true_tags)`` takes one list of tag strings per sequence (the two lists of a
    sequence have equal length). An entity counts as correct only if its type and both boundaries
    match a gold entity exactly.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_tags: Sequence[Sequence[str]], true_tags: Sequence[Sequence[str]]) -> None:
        if len(pred_tags) != len(true_tags):
            raise ValueError(f"EntityF1: {len(pred_tags)} predicted sequences but {len(true_tags)} gold ones")
        tp = fp = fn = 0
        for pred, true in zip(pred_tags, true_tags):
            if len(pred) != len(true):
                raise ValueError(f"EntityF1: a predicted sequence has {len(pred)} tags, its gold one {len(true)}")
            pred_entities, true_entities = bio_entities(pred), bio_entities(true)
            hits = len(pred_entities & true_entities)
            tp += hits
            fp += len(pred_entities) - hits
            fn += len(true_entities) - hits
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> dict[str, torch.Tensor]:
        tp = self.tp.double()
        precision = _ratio(tp, tp + self.fp)
        recall = _ratio(tp, tp + self.fn)
        f1 = _ratio(2 * precision * recall, precision + recall)
        return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}


# -- SQuAD answers --------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, squeeze spaces.

    The order matters and follows the official evaluation scripts: punctuation is removed before
    articles, so ``"the-end"`` becomes ``"theend"`` (no article left), not ``"end"``.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_exact(prediction: str, gold: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts (bag of words, counted with multiplicity).

    When either side normalises to no tokens at all (an unanswerable gold, an empty prediction, or
    an answer made only of articles/punctuation) the score is 1.0 if both are empty, else 0.0, as in
    the SQuAD v2.0 script.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_answer_scores(prediction: str, gold_answers: Sequence[str]) -> tuple[float, float]:
    """``(exact, f1)`` of ``prediction`` against the best-matching gold answer (each maximised alone).

    An empty ``gold_answers`` marks an unanswerable question: it is scored against the empty
    answer, so only an empty prediction gets credit.
    """
    golds = list(gold_answers) or [""]
    exact = max(answer_exact(prediction, gold) for gold in golds)
    f1 = max(answer_f1(prediction, gold) for gold in golds)
    return exact, f1


class SquadScores(Metric):
    """SQuAD exact match and F1, averaged over questions.

    ``update(pred_texts, gold_answers)``: one predicted answer string per question (``""`` =
    "no answer") and, for each, the list of acceptable gold answers (``[]`` = unanswerable).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("exact_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("f1_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_texts: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> None:
        if len(pred_texts) != len(gold_answers):
            raise ValueError(f"SquadScores: {len(pred_texts)} predictions but {len(gold_answers)} gold answer lists")
        exact_sum = f1_sum = 0.0
        for prediction, golds in zip(pred_texts, gold_answers):
            exact, f1 = best_answer_scores(prediction, golds)
            exact_sum += exact
            f1_sum += f1
        self.exact_sum += exact_sum
        self.f1_sum += f1_sum
        self.count += len(pred_texts)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.double()
        return {
            "exact_match": _ratio(self.exact_sum, count).float(),
            "f1": _ratio(self.f1_sum, count).float(),
        }
