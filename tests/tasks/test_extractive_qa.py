"""extractive_qa: windows over long contexts, answer positions, and best-span selection."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from lmforge_plugins.tasks.extractive_qa import ExtractiveQA, best_spans
from tokenizers import Tokenizer

from lmforge.data.tokenizer import find_special_tokens
from lmforge.errors import LmforgeError

WORDPIECE = REPO / "lmforge" / "data" / "corpus" / "wordpiece.json"
# 20 words that the shipped WordPiece tokenizer keeps whole (one token each), so token i = word i.
WORDS = [
    "the", "cat", "sat", "on", "a", "big", "red", "hat", "and", "the",
    "dog", "ran", "to", "the", "park", "with", "his", "ball", "then", "slept",
]


@pytest.fixture(scope="module")
def wordpiece():
    tokenizer = Tokenizer.from_file(str(WORDPIECE))
    return tokenizer, find_special_tokens(tokenizer)


def _record(context: str, question: str, answer: str | None, **extra):
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer)]}
    return {"example_id": [0], "question": [question], "context": [context], "answers": [answers], **extra}


def test_answer_at_a_window_edge_is_labelled_in_the_window_that_holds_it_whole(wordpiece):
    tokenizer, special = wordpiece
    context = " ".join(WORDS)
    assert len(tokenizer.encode(context, add_special_tokens=False).ids) == 20
    question = "did the dog run"  # 4 tokens: [CLS] + 4 + [SEP] + window + [SEP] = max_length 15 -> window 8
    assert len(tokenizer.encode(question, add_special_tokens=False).ids) == 4
    answer = "hat and"  # words 7 and 8: window 0 covers words 0-7 and cuts it
    task = ExtractiveQA(stride=3)
    rows = task.preprocess(_record(context, question, answer), tokenizer, special, 15, "encoder", "fit")

    # windows start every 8 - 3 = 5 tokens; the context starts after [CLS] + question + [SEP] = position 6
    assert rows["windows"][0] == [[6, 0, 8], [6, 5, 8], [6, 10, 8], [6, 15, 5]]
    assert rows["start_positions"][0] == [0, 6 + 7 - 5, 0, 0]
    assert rows["end_positions"][0] == [0, 6 + 8 - 5, 0, 0]
    window = rows["input_ids"][0][1]
    expected = tokenizer.encode(question, " ".join(WORDS[5:13])).ids  # the tokenizer's own framing
    assert window == expected
    assert tokenizer.decode(window[8:10]) == answer
    assert rows["token_type_ids"][0][1] == [0] * 6 + [1] * 9
    # the offsets of the labelled tokens give back the answer's characters
    offsets = rows["context_offsets"][0]
    assert context[offsets[7][0] : offsets[8][1]] == answer


def test_bad_records_are_refused_by_name(wordpiece):
    tokenizer, special = wordpiece
    record = _record("the cat sat", "who sat", "cat")
    record["answers"][0]["answer_start"] = [0]
    with pytest.raises(LmforgeError, match="record 0's answer 'cat' is not at character 0"):
        ExtractiveQA().preprocess(record, tokenizer, special, 32, "encoder", "fit")
    with pytest.raises(LmforgeError, match="no answer.*allow_unanswerable: true"):
        ExtractiveQA().preprocess(_record("the cat sat", "who ran", None), tokenizer, special, 32, "encoder", "fit")
    with pytest.raises(LmforgeError, match="max_length=8.*stride=4"):
        ExtractiveQA(stride=4).preprocess(_record(" ".join(WORDS), "who sat", "cat"), tokenizer, special, 8, "encoder", "fit")
    rows = ExtractiveQA(allow_unanswerable=True).preprocess(
        _record("the cat sat", "who ran", None), tokenizer, special, 32, "encoder", "fit"
    )
    assert rows["start_positions"] == [[0]] and rows["gold_answers"] == [[]]


def test_best_spans_enforces_order_length_and_context():
    #                 0    1    2    3    4    5
    start = torch.tensor([[9.0, 8.0, 1.0, 0.0, 5.0, 0.0]])
    end = torch.tensor([[9.0, 8.0, 0.0, 4.0, 0.0, 2.0]])
    context = torch.tensor([[False, False, True, True, True, True]])
    # the best scores sit outside the context (0, 1); start 4 > end 3 is invalid; 4..5 = 5 + 2 = 7
    score, first, last = best_spans(start, end, context, max_answer_length=30)
    assert (score.item(), first.item(), last.item()) == (7.0, 4, 5)
    # length <= 1 token: the best single token is 4..4 = 5 + 0 = 5 (2..2 = 1, 3..3 = 4, 5..5 = 2)
    score, first, last = best_spans(start, end, context, max_answer_length=1)
    assert (score.item(), first.item(), last.item()) == (5.0, 4, 4)
    none = best_spans(start, end, torch.zeros_like(context), max_answer_length=30)[0]
    assert none.item() == float("-inf")


def test_answer_is_the_best_span_over_all_windows_of_an_example():
    context = "aa bb cc dd"
    # two records: record 0 has windows 0 and 1, record 1 has window 2; the context sits at 2..4
    batch = {
        "windows": torch.tensor([[2, 0, 3], [2, 1, 3], [2, 0, 2]]),
        "window_example": torch.tensor([0, 0, 1]),
        "context_offsets": [[[0, 2], [3, 5], [6, 8], [9, 11]]] * 2,
        "qa_context": [context, context],
    }
    start = torch.full((3, 5), -5.0)
    end = torch.full((3, 5), -5.0)
    start[0, 2], end[0, 3] = 1.0, 1.0  # window 0: tokens 0..1 "aa bb", score 2
    start[1, 3], end[1, 4] = 3.0, 2.0  # window 1 (first token 1): tokens 2..3 "cc dd", score 5
    start[2, 0], end[2, 0] = 4.0, 4.0  # record 1: null score 8 beats its best span
    start[2, 3], end[2, 3] = 1.0, 1.0  # tokens 1..1 "bb", score 2
    answers = ExtractiveQA(max_answer_length=5)._answers(batch, start, end)
    assert [a["answer"] for a in answers] == ["cc dd", "bb"]  # SQuAD 1.1: always a span
    unanswerable = ExtractiveQA(allow_unanswerable=True)._answers(batch, start, end)
    assert [a["answer"] for a in unanswerable] == ["cc dd", ""]
    # null 8 - span 2 = 6: a threshold of 6 or more keeps the span
    lenient = ExtractiveQA(allow_unanswerable=True, null_threshold=6.0)._answers(batch, start, end)
    assert [a["answer"] for a in lenient] == ["cc dd", "bb"]


def test_collate_flattens_windows_and_keeps_records_together(wordpiece):
    tokenizer, special = wordpiece
    task = ExtractiveQA(stride=3)
    long = task.preprocess(_record(" ".join(WORDS), "did the dog run", "hat and"), tokenizer, special, 15, "encoder", "fit")
    short = task.preprocess(_record("the cat sat", "who sat", "cat"), tokenizer, special, 15, "encoder", "fit")
    features = [{k: v[0] for k, v in rows.items()} for rows in (long, short)]
    batch = task.collate(features, special)
    assert batch["input_ids"].shape == (5, 15)
    assert batch["window_example"].tolist() == [0, 0, 0, 0, 1]
    assert batch["start_positions"].tolist() == [0, 8, 0, 0, 6]
    assert batch["attention_mask"][4].sum().item() == len(short["input_ids"][0][0])
    assert batch["gold_answers"] == [["hat and"], ["cat"]]
