"""Task options a user can get wrong are refused with a sentence, before any data is read."""

from __future__ import annotations

import pytest
from conftest import REPO
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.tasks.sequence_classification import SequenceClassification
from lmforge_plugins.tasks.token_classification import TokenClassification

from lmforge import LmforgeError
from lmforge.families import DecoderLM, EncoderLM


@pytest.mark.parametrize(
    "make",
    [
        lambda: SequenceClassification(labels=["pos", "neg", "pos"]),
        lambda: TokenClassification(labels=["O", "B-PER", "I-PER", "B-PER"]),
    ],
)
def test_a_label_listed_twice_is_named(make):
    with pytest.raises(LmforgeError, match=r"lists the label\(s\) '(pos|B-PER)' more than once.*List each label once"):
        make()


def test_labels_are_copied_so_the_option_list_is_not_shared():
    names = ["a", "b"]
    task = SequenceClassification(labels=names)
    names.append("c")
    assert task.labels == ["a", "b"]


@pytest.mark.parametrize("pooling", ["encoder_mean", "decoder_first"])
def test_seq2seq_pooling_on_another_family_is_refused_when_the_model_is_built(pooling):
    task = SequenceClassification(labels=["a", "b"], pooling=pooling)
    with pytest.raises(LmforgeError, match=rf"pooling '{pooling}' is for seq2seq models; the encoder family.*pooling: auto"):
        EncoderLM(BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16), task=task)
    task = SequenceClassification(labels=["a", "b"], pooling=pooling)
    with pytest.raises(LmforgeError, match=rf"pooling '{pooling}' is for seq2seq models; the decoder family.*pooling: auto"):
        DecoderLM(GPT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16), task=task)


def test_a_tag_that_is_not_bio_is_named_with_the_fix():
    with pytest.raises(LmforgeError, match=r"Tag 'PER' is not a BIO \(IOB2\) tag.*Convert the tags"):
        TokenClassification(labels=["O", "PER"])


@pytest.mark.parametrize(
    ("task", "labels"), [(SequenceClassification, ["x"]), (TokenClassification, ["O"]), (SequenceClassification, None)]
)
def test_fewer_than_two_labels_is_refused_when_the_model_is_built(task, labels):
    expected = "needs at least two labels to tell apart" if labels else "has no labels: run it through `lmforge fit`"
    with pytest.raises(LmforgeError, match=expected):
        EncoderLM(BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16), task=task(labels=labels))


def test_qa_answers_that_are_not_a_squad_object_name_the_record():
    from lmforge_plugins.tasks.extractive_qa import ExtractiveQA
    from tokenizers import Tokenizer

    from lmforge.data.tokenizer import find_special_tokens

    tokenizer = Tokenizer.from_file(str(REPO / "lmforge" / "data" / "corpus" / "wordpiece.json"))
    records = {"example_id": [3], "question": ["who sat"], "context": ["the cat sat"], "answers": ["cat"]}
    with pytest.raises(LmforgeError, match=r"record 3's answers is 'cat', not a SQuAD answers object"):
        ExtractiveQA().preprocess(records, tokenizer, find_special_tokens(tokenizer), 32, "encoder", "fit")
