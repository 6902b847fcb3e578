"""Tokenizers: special tokens by role, training, loading, and the shipped demo corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmforge.data.tokenizer import find_special_tokens, load_tokenizer, train_tokenizer
from lmforge.errors import LmforgeError

CORPUS = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "corpus"

SENTENCES = [
    "The little cat sat on the mat and looked at the big red ball.",
    "Once upon a time, a brave girl named Lily walked into the forest.",
    "\"Can I play too?\" asked Tom. \"Yes, you can,\" said Mia with a smile.",
    "Café, naïve, Zoë and façade are words with accents.",
    "Numbers like 42, 3.14 and 1,000 appear in text too.",
]

ROUND_TRIP = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and   runs of spaces",
    "Grüße aus Köln, ça va? ¿Qué tal?",
    "日本語のテキストと中文",
    "emoji 🐈‍⬛🚀 and symbols ∑∫√ ©",
    "never seen in training: zyxwvq QXJZ ~`|^",
    "",
]


def _bpe_with_vocab(vocab: dict[str, int], specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def test_special_tokens_bpe_with_non_standard_ids():
    vocab = {"a": 0, "b": 1, "c": 2, "<|pad|>": 3, "d": 4, "e": 5, "<unk>": 6, "<|endoftext|>": 7, "<s>": 8}
    tok = _bpe_with_vocab(vocab, ["<|pad|>", "<unk>", "<|endoftext|>", "<s>"])
    special = find_special_tokens(tok)
    roles = {k: getattr(special, k) for k in ("vocab_size", "pad_id", "eos_id", "bos_id", "unk_id", "mask_id", "cls_id", "sep_id")}
    assert roles == dict(vocab_size=9, pad_id=3, eos_id=7, bos_id=8, unk_id=6, mask_id=None, cls_id=8, sep_id=None)
    assert special.all_ids() == {3, 6, 7, 8}


def test_special_tokens_wordpiece_with_non_standard_ids():
    vocab = {"[UNK]": 4, "the": 0, "cat": 1, "[PAD]": 7, "##s": 2, "[SEP]": 3, "[CLS]": 9, "dog": 5, "[MASK]": 6, "a": 8}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(["[UNK]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"])
    special = find_special_tokens(tok)
    assert special.vocab_size == 10
    assert (special.pad_id, special.unk_id, special.cls_id, special.sep_id, special.mask_id) == (7, 4, 9, 3, 6)
    # [SEP] is the document separator only because nothing better exists.
    assert special.eos_id == 3
    assert special.bos_id is None


def test_special_token_preference_order():
    vocab = {"[SEP]": 0, "</s>": 1, "<pad>": 2, "[PAD]": 3, "<bos>": 4, "<s>": 5, "x": 6, "<mask>": 7, "[MASK]": 8}
    tok = _bpe_with_vocab(vocab, list(vocab)[:6] + ["<mask>", "[MASK]"])
    special = find_special_tokens(tok)
    assert special.eos_id == 1  # </s> beats [SEP]
    assert special.pad_id == 2  # <pad> comes before [PAD]
    assert special.bos_id == 5  # <s> comes before <bos>
    assert special.cls_id == 5  # no [CLS]: <s>
    assert special.sep_id == 0
    assert special.mask_id == 7
    assert special.unk_id is None


def test_special_tokens_ignore_added_tokens_count_in_vocab_size():
    tok = _bpe_with_vocab({"a": 0, "b": 1}, [])
    tok.add_special_tokens(["<|endoftext|>"])
    special = find_special_tokens(tok)
    assert special.eos_id == 2
    assert special.vocab_size == 3


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "train.txt"
    path.write_text("\n".join(SENTENCES * 20) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_bpe(text_file, tmp_path_factory) -> Path:
    return train_tokenizer([str(text_file)], str(tmp_path_factory.mktemp("out") / "bpe.json"), vocab_size=400)


def test_train_bpe_round_trips_exactly(trained_bpe):
    tok = load_tokenizer(trained_bpe)
    for text in ROUND_TRIP + SENTENCES:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    special = find_special_tokens(tok)
    assert special.eos_id is not None and tok.id_to_token(special.eos_id) == "<|endoftext|>"
    assert special.pad_id is not None and tok.id_to_token(special.pad_id) == "<|pad|>"
    assert special.vocab_size <= 400
    # Byte-level: no unknown token is ever needed, every byte has a symbol.
    assert special.vocab_size >= 256 + 2
    # Training learned merges: common words take fewer tokens than bytes.
    assert len(tok.encode("The little cat sat on the mat").ids) < len("The little cat sat on the mat") / 2


def test_train_from_jsonl_uses_text_column(tmp_path):
    data = tmp_path / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for s in SENTENCES * 10:
            f.write(json.dumps({"id": 1, "body": s}) + "\n")
    out = train_tokenizer([str(data)], str(tmp_path / "tok"), vocab_size=300, text_column="body")
    assert out == tmp_path / "tok" / "tokenizer.json"
    tok = load_tokenizer(tmp_path / "tok")  # a directory holding tokenizer.json
    assert tok.decode(tok.encode(SENTENCES[1]).ids) == SENTENCES[1]
    with pytest.raises(LmforgeError, match=r"no column 'text'.*'id', 'body'"):
        train_tokenizer([str(data)], str(tmp_path / "other.json"), vocab_size=300)


def test_train_wordpiece(text_file, tmp_path):
    out = train_tokenizer([str(text_file)], str(tmp_path / "wp.json"), vocab_size=300, kind="wordpiece", min_frequency=1)
    tok = load_tokenizer(out)
    special = find_special_tokens(tok)
    assert None not in (special.pad_id, special.unk_id, special.cls_id, special.sep_id, special.mask_id)
    assert special.eos_id == special.sep_id
    encoding = tok.encode("the cat sat")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert tok.encode("the cat sat", add_special_tokens=False).tokens[0] != "[CLS]"
    assert tok.decode(tok.encode("the little cat sat").ids) == "the little cat sat"


def test_train_refuses_to_overwrite(text_file, tmp_path):
    out = tmp_path / "nested" / "dirs" / "tok.json"
    assert train_tokenizer([str(text_file)], str(out), vocab_size=300) == out
    before = out.read_bytes()
    with pytest.raises(LmforgeError, match=r"already exists.*overwrite"):
        train_tokenizer([str(text_file)], str(out), vocab_size=300)
    assert out.read_bytes() == before
    train_tokenizer([str(text_file)], str(out), vocab_size=350, overwrite=True)
    assert load_tokenizer(out).get_vocab_size() > 300


def test_train_rejects_bad_options(text_file, tmp_path):
    with pytest.raises(LmforgeError, match="vocab_size 100 is too small"):
        train_tokenizer([str(text_file)], str(tmp_path / "a.json"), vocab_size=100)
    with pytest.raises(LmforgeError, match="Unknown tokenizer kind 'unigram'"):
        train_tokenizer([str(text_file)], str(tmp_path / "a.json"), kind="unigram")  # type: ignore[arg-type]
    with pytest.raises(LmforgeError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "a.json"))
    assert not (tmp_path / "a.json").exists()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"'.*nope\.json' does not exist.*lmforge tokenizer train"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(LmforgeError, match=r"is a directory without a tokenizer\.json.*lmforge tokenizer train"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(LmforgeError, match=r"bad\.json' is not a valid Hugging Face tokenizer\.json"):
        load_tokenizer(bad)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 definitely not json")
    with pytest.raises(LmforgeError, match="not a valid"):
        load_tokenizer(garbage)


# ---------------------------------------------------------------------------------------------------
# The demo corpus shipped in the package
# ---------------------------------------------------------------------------------------------------


def test_shipped_corpus_sizes_and_tokenizer():
    train = CORPUS / "tiny_stories_train.txt"
    val = CORPUS / "tiny_stories_validation.txt"
    assert 400_000 <= train.stat().st_size <= 800_000
    assert 40_000 <= val.stat().st_size <= 60_000
    train_lines = train.read_text(encoding="utf-8").splitlines()
    val_lines = val.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in train_lines + val_lines)
    assert not set(val_lines) & set(train_lines)
    tok = load_tokenizer(CORPUS / "tokenizer.json")
    special = find_special_tokens(tok)
    assert special.vocab_size == 1024
    assert tok.id_to_token(special.eos_id) == "<|endoftext|>"
    for line in val_lines[:20]:
        assert tok.decode(tok.encode(line).ids) == line


def test_corpus_generator_is_seeded_and_matches_shipped_files():
    from lmforge.data.corpus import make_corpus

    a = [make_corpus.StoryWriter(5).story() for _ in range(3)]
    b = [make_corpus.StoryWriter(5).story() for _ in range(3)]
    c = [make_corpus.StoryWriter(6).story() for _ in range(3)]
    assert a == b and a != c
    for split, (filename, seed, _kb) in make_corpus.SPLITS.items():
        writer = make_corpus.StoryWriter(seed)
        shipped = (CORPUS / filename).read_text(encoding="utf-8").splitlines()[:5]
        assert [writer.story() for _ in range(5)] == shipped, split
    # Agreement: articles match the following word.
    for story in a + c:
        assert " a a" not in story and " a o" not in story and " an b" not in story
