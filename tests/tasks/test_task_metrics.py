"""Task metrics: hand-computed scores, and EntityF1 against the independent ``seqeval`` package."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.metrics import (
    EntityF1,
    SquadScores,
    answer_f1,
    best_answer_scores,
    bio_entities,
    check_bio_labels,
    normalize_answer,
)

# -- entities -------------------------------------------------------------------------------------


def test_bio_entities_follow_conlleval_semantics():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "B-PER", "B-PER"]
    assert bio_entities(tags) == {
        ("PER", 0, 1),
        ("LOC", 3, 4),  # I- after O starts an entity
        ("LOC", 5, 5),  # B- ends the previous one even with the same type
        ("ORG", 6, 6),  # I- of another type starts a new entity
        ("PER", 7, 7),
        ("PER", 8, 8),
    }


def test_entity_f1_partial_overlaps_hand_computed():
    true = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"]]
    # PER boundary wrong (too short), LOC typed as ORG, ORG exact, plus a spurious I-MISC after O.
    pred = [["B-PER", "O", "O", "B-ORG", "I-MISC", "B-ORG", "I-ORG"]]
    metric = EntityF1()
    metric.update(pred, true)
    scores = metric.compute()
    # pred entities: PER(0,0) ORG(3,3) MISC(4,4) ORG(5,6) -> 1 hit; gold: PER(0,1) LOC(3,3) ORG(5,6)
    assert scores["precision"].item() == pytest.approx(1 / 4)
    assert scores["recall"].item() == pytest.approx(1 / 3)
    assert scores["f1"].item() == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))


def test_entity_f1_accumulates_and_resets():
    metric = EntityF1()
    metric.update([["B-A", "O"]], [["B-A", "O"]])
    metric.update([["O", "O"]], [["B-A", "I-A"]])
    assert metric.compute()["recall"].item() == pytest.approx(0.5)
    assert metric.compute()["precision"].item() == pytest.approx(1.0)
    metric.reset()
    metric.update([["O"]], [["O"]])
    assert metric.compute()["f1"].item() == 0.0  # nothing to find, nothing found: 0 like seqeval


def test_non_bio_labels_refused_by_name():
    with pytest.raises(LmforgeError, match="'PER'.*BIO"):
        check_bio_labels(["O", "B-PER", "PER"])
    with pytest.raises(LmforgeError, match="'E-LOC'"):
        bio_entities(["B-LOC", "E-LOC"])


def test_entity_f1_matches_seqeval_on_random_sequences():
    from seqeval import (
        metrics as seqeval_metrics,  # the independent reference (the dev extra "seqeval")
    )

    rng = random.Random(0)
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for trial in range(5):
        true, pred = [], []
        for _ in range(60):
            n = rng.randint(1, 12)
            true.append([rng.choice(tags) for _ in range(n)])
            # predictions agree with gold most of the time, so the scores are not all near 0
            pred.append([t if rng.random() < 0.7 else rng.choice(tags) for t in true[-1]])
        metric = EntityF1()
        for i in range(0, len(true), 16):  # several updates, like validation batches
            metric.update(pred[i : i + 16], true[i : i + 16])
        ours = metric.compute()
        assert ours["precision"].item() == pytest.approx(seqeval_metrics.precision_score(true, pred), abs=1e-6)
        assert ours["recall"].item() == pytest.approx(seqeval_metrics.recall_score(true, pred), abs=1e-6)
        assert ours["f1"].item() == pytest.approx(seqeval_metrics.f1_score(true, pred), abs=1e-6)


# -- SQuAD ----------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("the-end") == "theend"  # punctuation goes first, as in the official script
    assert normalize_answer("A\tB\nC") == "b c"  # 'a' is an article even upper-case


def test_answer_f1_hand_computed():
    # pred tokens: paris france ; gold: paris -> p = 1/2, r = 1, f1 = 2/3
    assert answer_f1("Paris, France", "paris") == pytest.approx(2 / 3)
    # multiplicity counts: pred "a b b" -> [b, b] after dropping 'a'; gold "b c" -> 1 common
    assert answer_f1("a b b", "b c") == pytest.approx(2 * 0.5 * 0.5 / 1.0)
    assert answer_f1("London", "Paris") == 0.0


def test_best_over_gold_answers_and_unanswerable():
    assert best_answer_scores("the Louvre museum", ["Louvre", "the Louvre Museum"]) == (1.0, 1.0)
    exact, f1 = best_answer_scores("Louvre in Paris", ["museum", "the Louvre"])
    assert exact == 0.0 and f1 == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert best_answer_scores("", []) == (1.0, 1.0)  # unanswerable, abstained
    assert best_answer_scores("Paris", []) == (0.0, 0.0)  # unanswerable, answered anyway
    assert best_answer_scores("", ["Paris"]) == (0.0, 0.0)  # answerable, abstained


def test_squad_scores_mean_over_questions():
    metric = SquadScores()
    metric.update(["Paris, France", ""], [["Paris"], []])
    metric.update(["Berlin"], [["Rome", "Milan"]])
    scores = metric.compute()
    assert scores["exact_match"].item() == pytest.approx(1 / 3)
    assert scores["f1"].item() == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_squad_scores_match_torchmetrics_squad_on_answerable_questions():
    from torchmetrics.text import SQuAD

    rng = random.Random(1)
    words = ["the", "a", "Paris", "paris,", "tower", "Eiffel", "old", "old", "city!", "An", "river"]
    preds, golds = [], []
    for _ in range(50):
        preds.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))))
        golds.append([" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))])
    ours = SquadScores()
    ours.update(preds, golds)
    reference = SQuAD()
    reference.update(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
        [{"answers": {"text": g, "answer_start": [0] * len(g)}, "id": str(i)} for i, g in enumerate(golds)],
    )
    expected = reference.compute()
    got = ours.compute()
    assert got["exact_match"].item() * 100 == pytest.approx(expected["exact_match"].item(), abs=1e-3)
    assert got["f1"].item() * 100 == pytest.approx(expected["f1"].item(), abs=1e-3)


def test_merged_rank_states_equal_a_single_run():
    """Two "ranks" merged with the states' reductions (what DDP sync does) give the one-process result."""
    true = [["B-A", "I-A", "O"], ["B-B", "O", "B-A"], ["I-A", "O", "O"]]
    pred = [["B-A", "I-A", "O"], ["B-B", "B-A", "O"], ["B-A", "O", "B-B"]]
    texts, golds = ["x y", "", "z"], [["x"], [], ["z", "w"]]
    for make, args in ((EntityF1, (pred, true)), (SquadScores, (texts, golds))):
        whole, rank0, rank1 = make(), make(), make()
        whole.update(*args)
        rank0.update(*(a[:2] for a in args))
        rank1.update(*(a[2:] for a in args))
        rank0.merge_state(rank1)
        for key, value in whole.compute().items():
            assert rank0.compute()[key].item() == pytest.approx(value.item()), key
