"""Labelled records: reading and column mapping, label inference, framing, word alignment, errors."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from tokenizers import Tokenizer

from lmforge import LmforgeError, Task
from lmforge.data.task_data import EvalSampler, infer_task_labels, read_records
from lmforge.data.tokenizer import find_special_tokens
from lmforge_plugins.tasks.sequence_classification import SequenceClassification
from lmforge_plugins.tasks.token_classification import TokenClassification

WORDPIECE = REPO / "lmforge" / "data" / "corpus" / "wordpiece.json"
BPE = REPO / "lmforge" / "data" / "corpus" / "tokenizer.json"
IGNORE = -100


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_csv_columns_are_mapped_and_numeric_labels_sorted_as_numbers(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("sentence,sentiment,extra\nthe cat sat,10,x\na dog ran,2,y\nthe bird flew,10,z\n")
    columns = {"text": "sentence", "label": "sentiment"}
    records = read_records(str(csv), SequenceClassification, columns, "train_files", tmp_path / "work")
    assert records.column_names == ["text", "label", "example_id"]
    assert records["text"] == ["the cat sat", "a dog ran", "the bird flew"] and records["example_id"] == [0, 1, 2]
    assert infer_task_labels(SequenceClassification, str(csv), columns) == ["2", "10"]


def test_a_missing_column_names_the_file_and_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "the cat", "label": "a"}])
    with pytest.raises(LmforgeError) as info:
        read_records(str(path), SequenceClassification, None, "train_files", tmp_path / "work")
    message = str(info.value)
    assert "train.jsonl' has no column 'text' for the task field 'text'" in message
    assert "its columns: sentence, label" in message and "data.columns" in message
    with pytest.raises(LmforgeError, match="'txet', which is not a field of the task 'sequence_classification'.*Did you mean 'text'"):
        read_records(str(path), SequenceClassification, {"txet": "sentence"}, "train_files", tmp_path / "work")
    txt = tmp_path / "train.txt"
    txt.write_text("the cat\n")
    with pytest.raises(LmforgeError, match="is a .txt file, which has no columns"):
        read_records(str(txt), SequenceClassification, None, "train_files", tmp_path / "work")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(LmforgeError, match=r"train_files: '.*blank\.jsonl' holds no records"):
        read_records(str(blank), SequenceClassification, None, "train_files", tmp_path / "work")


def test_a_record_without_a_required_field_is_named(tmp_path):
    from lmforge_plugins.tasks.text_to_text import TextToText

    path = write_jsonl(tmp_path / "train.jsonl", [{"source": "a b", "target": "b a"}, {"source": "Jack saw the pig."}])
    with pytest.raises(LmforgeError, match=r"train_files: record 2 of '.*train.jsonl' has no 'target' \(missing or null\)"):
        read_records(str(path), TextToText, None, "train_files", tmp_path / "work")
    path = write_jsonl(tmp_path / "val.jsonl", [{"source": None, "target": "x"}, {"source": "a", "target": "b"}])
    with pytest.raises(LmforgeError, match=r"val_files: record 1 of '.*val.jsonl' has no 'source'"):
        read_records(str(path), TextToText, None, "val_files", tmp_path / "work")


def test_predict_files_need_no_labels_but_training_files_do(tmp_path):
    path = write_jsonl(tmp_path / "new.jsonl", [{"words": "Mia ran"}])
    records = read_records(str(path), TokenClassification, None, "predict_files", tmp_path / "w", with_labels=False)
    assert records.column_names == ["words", "example_id"]
    with pytest.raises(LmforgeError, match="no column 'tags' for the task field 'tags'"):
        read_records(str(path), TokenClassification, None, "train_files", tmp_path / "w")


def test_frame_input_per_family_truncates_the_longer_text_first():
    special = find_special_tokens(Tokenizer.from_file(str(WORDPIECE)))
    cls, sep = special.cls_id, special.sep_id
    ids, types, a_start, b_start = Task.frame_input([11, 12], [21, 22, 23, 24, 25, 26], special, "encoder", 9)
    assert ids == [cls, 11, 12, sep, 21, 22, 23, 24, sep] and types == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert (a_start, b_start) == (1, 4)
    ids, _, a_start, _ = Task.frame_input([11, 12, 13], None, special, "decoder", 3)
    assert ids == [11, 12, special.eos_id] and a_start == 0  # a decoder's last token closes the text


@pytest.mark.parametrize("tokenizer_file", [WORDPIECE, BPE], ids=["wordpiece", "byte-level-bpe"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_word_tags_land_on_first_sub_tokens(tokenizer_file, family):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    special = find_special_tokens(tokenizer)
    words = ["Hello", "Anna", "Brownstone", "went", "to", "Rome", "."]
    tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    task = TokenClassification(labels=["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])
    out = task.preprocess(
        {"words": [words], "tags": [tags], "example_id": [0]}, tokenizer, special, 64, family, "fit"
    )
    ids, labels, starts = out["input_ids"][0], out["labels"][0], out["word_starts"][0]
    text = tokenizer.encode(" ".join(words), add_special_tokens=False).ids
    offset = 1 if family == "encoder" and special.cls_id is not None else 0  # [CLS]
    assert ids[offset : offset + len(text)] == text  # words encoded as in running text
    first = [i for i, s in enumerate(starts) if s]
    assert len(first) == len(words) and first[0] == offset
    assert [task.labels[labels[i]] for i in first] == tags
    assert all(label == IGNORE for i, label in enumerate(labels) if i not in first)
    assert len(ids) > len(words) + offset  # some word was split, and its later pieces are ignored
    # cut short: only the words whose first piece fits are tagged
    short = task.preprocess({"words": [words], "tags": [tags], "example_id": [0]}, tokenizer, special, 6, family, "fit")
    kept = [i for i, s in enumerate(short["word_starts"][0]) if s]
    assert len(short["input_ids"][0]) == 6 and 0 < len(kept) < len(words) and max(kept) < 6


def test_an_unknown_label_or_a_list_for_a_single_label_task_names_the_record():
    tokenizer = Tokenizer.from_file(str(WORDPIECE))
    special = find_special_tokens(tokenizer)
    task = SequenceClassification(labels=["happy", "sad"])
    records = {"text": ["a", "b"], "label": ["happy", "angry"], "example_id": [0, 7]}
    with pytest.raises(LmforgeError, match="Record 7 has the label 'angry', which is not one of the task's 2 labels"):
        task.preprocess(records, tokenizer, special, 32, "encoder", "validate")
    records = {"text": ["a"], "label": [["happy", "sad"]], "example_id": [3]}
    with pytest.raises(LmforgeError, match="Record 3 has a list of labels.*multi_label: true"):
        task.preprocess(records, tokenizer, special, 32, "encoder", "fit")
    hot = SequenceClassification(labels=["happy", "sad"], multi_label=True).preprocess(
        records, tokenizer, special, 32, "decoder", "fit"
    )
    assert hot["labels"] == [[1.0, 1.0]] and "token_type_ids" not in hot


def test_text_pairs_get_segment_ids_on_an_encoder():
    tokenizer = Tokenizer.from_file(str(WORDPIECE))
    special = find_special_tokens(tokenizer)
    records = {"text": ["the cat sat"], "text_pair": ["a dog ran"], "label": ["happy"], "example_id": [0]}
    out = SequenceClassification(labels=["happy"]).preprocess(records, tokenizer, special, 32, "encoder", "predict")
    a = tokenizer.encode("the cat sat", add_special_tokens=False).ids
    b = tokenizer.encode("a dog ran", add_special_tokens=False).ids
    assert out["input_ids"][0] == [special.cls_id, *a, special.sep_id, *b, special.sep_id]
    assert out["token_type_ids"][0] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert out["text_pair"] == ["a dog ran"] and out["labels"] == [0]


def test_eval_sampler_shards_without_repeating_rows():
    shards = [list(EvalSampler(7, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(shards[0] + shards[1]) == list(range(7))
