"""The text datamodule: reading every file type, packing, splitting, caching, errors, collation."""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmforge.data.datamodule as dm_module
from lmforge.data.collate import pad_collate
from lmforge.data.datamodule import TextDataModule, check_utf8, read_documents
from lmforge.data.tokenizer import load_tokenizer, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.plugin_api import SpecialTokens

WORDS = (
    "the a cat dog bird sat ran jumped on under over mat tree house red blue green little big happy sad "
    "Lily Tom Mia Ben said asked and then one day café naïve Zoë 日本"
).split()


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 25))]
        docs.append(f"Story {i}: " + " ".join(words) + ", \"quoted\" text.")
    return docs


DOCS = _documents(40)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_documents(300, seed=1)) + "\n", encoding="utf-8")
    return str(train_tokenizer([str(corpus)], str(root / "tokenizer.json"), vocab_size=320))


@pytest.fixture
def txt_file(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def _make(tokenizer_path, train_files, tmp_path, **kwargs) -> TextDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return TextDataModule(train_files=train_files, tokenizer=tokenizer_path, **kwargs)


def _encode(tokenizer_path, texts):
    tok = load_tokenizer(tokenizer_path)
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------


def _write_all_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    paths = {}
    paths["txt"] = root / "d.txt"
    # Empty and whitespace-only lines are not documents.
    paths["txt"].write_text("\n\n".join(docs[:3]) + "\n   \n" + "\n".join(docs[3:]) + "\n", encoding="utf-8")
    paths["jsonl"] = root / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    paths["json"] = root / "d.json"
    paths["json"].write_text(json.dumps([{"text": d, "n": 1} for d in docs]), encoding="utf-8")
    paths["csv"] = root / "d.csv"
    with paths["csv"].open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, d] for i, d in enumerate(docs))
    paths["parquet"] = root / "d.parquet"
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), paths["parquet"])
    paths["disk"] = root / "saved"
    datasets.Dataset.from_dict({"text": docs, "label": [0] * len(docs)}).save_to_disk(str(paths["disk"]))
    return paths


def test_every_file_type_reads_the_same_documents(tmp_path):
    for fmt, path in _write_all_formats(tmp_path, DOCS).items():
        docs = read_documents(str(path), work_dir=tmp_path / f"work-{fmt}")
        assert docs.column_names == ["text"], fmt
        assert docs["text"] == DOCS, fmt


def test_mixed_formats_concatenate_in_order(tmp_path):
    paths = _write_all_formats(tmp_path, DOCS[:5])
    large = tmp_path / "large.parquet"
    pq.write_table(pa.table({"text": pa.array(DOCS[5:8], pa.large_string())}), large)
    files = [str(paths["txt"]), str(large), str(paths["disk"]), str(paths["csv"])]
    saved_before = sorted(p.name for p in paths["disk"].iterdir())
    assert read_documents(files)["text"] == DOCS[:5] + DOCS[5:8] + DOCS[:5] + DOCS[:5]
    assert sorted(p.name for p in paths["disk"].iterdir()) == saved_before  # no cache files in the user's data


def test_read_documents_glob_keeps_order_and_other_column(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(
            "".join(json.dumps({"body": d}) + "\n" for d in DOCS[i * 10 : (i + 1) * 10]), encoding="utf-8"
        )
    (tmp_path / "extra.txt").write_text("\n".join(DOCS[30:]) + "\n", encoding="utf-8")
    docs = read_documents([str(tmp_path / "part-*.jsonl"), str(tmp_path / "extra.txt")], text_column="body")
    assert docs["text"] == DOCS


def test_saved_dataset_dict_uses_train_split(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": DOCS[:5]}), "test": datasets.Dataset.from_dict({"text": DOCS[5:7]})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_documents(str(tmp_path / "dd"))["text"] == DOCS[:5]


# ---------------------------------------------------------------------------------------------------
# Errors: each names the file and the fix
# ---------------------------------------------------------------------------------------------------


def test_error_missing_path(tmp_path):
    with pytest.raises(LmforgeError, match=r"train_files: the data file '.*missing\.txt' does not exist"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(LmforgeError, match=r"pattern '.*\*\.jsonl' matches no file"):
        read_documents(str(tmp_path / "*.jsonl"))


def test_error_unknown_extension_and_plain_directory(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(LmforgeError, match=r"'.*notes\.docx' has the extension '\.docx'.*Supported inputs are \.txt"):
        read_documents(str(tmp_path / "notes.docx"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(LmforgeError, match=r"'.*folder' is a directory but not one written by datasets.*glob"):
        read_documents(str(tmp_path / "folder"))


def test_error_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmforgeError, match=r"data file '.*empty\.txt' is empty"):
        read_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n   \n\t\n\n")
    with pytest.raises(LmforgeError, match=r"'.*blank\.txt' contain no documents"):
        read_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(LmforgeError, match=r"contain no documents \(column 'text'\)"):
        read_documents(str(tmp_path / "blank.jsonl"))
    (tmp_path / "lines.jsonl").write_text("\n\n\n")  # no records at all, and a CSV header without rows
    (tmp_path / "header.csv").write_text("text\n")
    for name in ("lines.jsonl", "header.csv"):
        with pytest.raises(LmforgeError, match=rf"'.*{name}' holds no records \(only blank lines, or a header"):
            read_documents(str(tmp_path / name))


def test_error_missing_column_lists_existing_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,body,label\n1,hello there,0\n", encoding="utf-8")
    expected = r"d\.csv' has no column 'text' \(its columns are: 'id', 'body', 'label'\).*text_column"
    with pytest.raises(LmforgeError, match=expected):
        read_documents(str(path))
    # With several files, the one lacking the column is named.
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "fine"}\n')
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"content": "oops"}\n')
    with pytest.raises(LmforgeError, match=r"b\.jsonl' has no column 'text' \(its columns are: 'content'\)"):
        read_documents([str(good), str(bad)])
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(LmforgeError, match=r"column 'text' holds .*int64.*not text"):
        read_documents(str(numbers))


def test_error_bad_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"first line\nsecond caf\xe9 line\n")
    with pytest.raises(LmforgeError, match=r"latin1\.txt' is not valid UTF-8: byte 21 \(line 2\) is 0xe9.*iconv"):
        read_documents(str(path))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl' is not valid UTF-8: byte 25 \(line 2\) is 0xff.*fixed\.jsonl"):
        read_documents(str(jsonl))


def test_text_reader_splits_lines_like_the_datasets_text_builder(tmp_path):
    """The streaming .txt reader must yield exactly the lines 🤗 datasets' "text" builder reads (the
    reference the cached rows were built from before), whatever its chunk size."""
    path = tmp_path / "lines.txt"
    raw = "first\r\nsecond\rthird\n\n   \nnaïve 日本 🐈\u2028same line\x0cstill\n\tlast without newline"
    path.write_bytes(raw.encode("utf-8"))
    reference = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))["text"]
    assert len(reference) == 7  # \r\n, \r and \n end lines; \u2028 and \x0c do not
    for chunk_size in (1, 3, 7, 1 << 20):
        lines = [line for chunk in dm_module._iter_text_lines(path, chunk_size=chunk_size) for line in chunk]
        assert lines == reference, chunk_size


def test_check_utf8_across_chunk_boundaries(tmp_path):
    path = tmp_path / "u.txt"
    text = "héllo wörld 日本語 🐈 ok\n" * 3
    path.write_text(text, encoding="utf-8")
    for chunk_size in (1, 2, 3, 5, 7, 1 << 20):
        check_utf8(path, chunk_size=chunk_size)  # multi-byte characters split across chunks are fine
    data = text.encode("utf-8")
    broken = data + b"\xe6\x97"  # a truncated character at the very end
    path.write_bytes(broken)
    for chunk_size in (1, 4, 1 << 20):
        with pytest.raises(LmforgeError, match=rf"byte {len(data)} \(line 4\)"):
            check_utf8(path, chunk_size=chunk_size)
    path.write_bytes(data[:10] + b"\x80" + data[10:])
    for chunk_size in (3, 8, 1 << 20):
        with pytest.raises(LmforgeError, match=r"byte 10 \(line 1\) is 0x80"):
            check_utf8(path, chunk_size=chunk_size)


def test_error_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three",}\n{"text": "four"}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"broken\.jsonl' line 3 is not a valid JSON object"):
        read_documents(str(path))
    path.write_text('{"text": "one"}\n\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"broken\.jsonl' line 3 is not a valid JSON object"):
        read_documents(str(path))


def test_datamodule_errors(tokenizer_path, txt_file, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    with pytest.raises(LmforgeError, match=r"only 1 document.*val_files"):
        _make(tokenizer_path, str(one), tmp_path).prepare_data()
    with pytest.raises(LmforgeError, match=r"val_fraction must be between 0 and 1"):
        _make(tokenizer_path, str(txt_file), tmp_path, val_fraction=1.5)
    with pytest.raises(LmforgeError, match=r"train data yields no rows.*block_size=100000"):
        _make(tokenizer_path, str(txt_file), tmp_path, block_size=100_000, val_files=str(txt_file)).prepare_data()
    with pytest.raises(LmforgeError, match=r"Tokenizer file '.*nothing\.json' does not exist"):
        _make(str(tmp_path / "nothing.json"), str(txt_file), tmp_path)
    with pytest.raises(LmforgeError, match=r"val_files: the data file '.*nope\.txt' does not exist"):
        _make(tokenizer_path, str(txt_file), tmp_path, val_files=str(tmp_path / "nope.txt")).setup()
    assert not list((tmp_path / "cache").glob(".tmp-*")), "a failed build must not leave temporary directories"


def test_packing_needs_an_eos_token(txt_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "cat": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(LmforgeError, match=r"has no end-of-document token.*packing: false"):
        _make(str(tmp_path / "noeos.json"), str(txt_file), tmp_path)
    dm = _make(str(tmp_path / "noeos.json"), str(txt_file), tmp_path, packing=False, block_size=64)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(DOCS)


# ---------------------------------------------------------------------------------------------------
# Packing, long documents, validation split
# ---------------------------------------------------------------------------------------------------


def test_packing_rows_are_the_concatenated_documents(tokenizer_path, txt_file, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:10]), encoding="utf-8")
    dm = _make(tokenizer_path, str(txt_file), tmp_path, val_files=str(val), block_size=16)
    dm.prepare_data()
    dm.setup("fit")
    eos = dm.special.eos_id
    stream = [t for ids in _encode(tokenizer_path, DOCS) for t in ids + [eos]]
    rows = dm.train_dataset["input_ids"]
    assert len(rows) == len(stream) // 16
    assert all(len(r) == 16 for r in rows)
    flat = [t for r in rows for t in r]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < 16
    assert dm.stats["train_documents"] == len(DOCS)
    assert dm.stats["train_tokens"] == len(stream)
    assert dm.stats["train_dropped_tokens"] == len(stream) - len(flat)
    val_stream = [t for ids in _encode(tokenizer_path, DOCS[:10]) for t in ids + [eos]]
    assert [t for r in dm.val_dataset["input_ids"] for t in r] == val_stream[: len(val_stream) // 16 * 16]
    assert dm.vocab_size == load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
    assert dm.train_dataset.format["type"] is None
    assert isinstance(dm.train_dataset[0]["input_ids"], list)


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_unpacked_long_documents(tokenizer_path, txt_file, tmp_path, mode, caplog):
    lengths = sorted(len(ids) + 1 for ids in _encode(tokenizer_path, DOCS))
    block = lengths[len(lengths) // 2]  # about half the documents are too long
    dm = _make(tokenizer_path, str(txt_file), tmp_path, val_files=str(txt_file), packing=False,
               block_size=block, long_documents=mode)
    with caplog.at_level("WARNING", logger="lmforge.data"):
        dm.setup()
    eos = dm.special.eos_id
    docs = [ids + [eos] for ids in _encode(tokenizer_path, DOCS)]
    n_long = sum(len(d) > block for d in docs)
    assert 0 < n_long < len(docs)
    rows = dm.train_dataset["input_ids"]
    if mode == "truncate":
        assert rows == [d[:block] for d in docs]
        assert dm.stats["train_truncated_documents"] == n_long
        assert dm.stats["truncated_documents"] == 2 * n_long  # the same file is the validation data
        assert dm.stats["dropped_documents"] == 0
        assert f"{2 * n_long} documents were longer than block_size={block} and were truncated" in caplog.text
    else:
        assert rows == [d for d in docs if len(d) <= block]
        assert dm.stats["train_dropped_documents"] == n_long
        assert dm.stats["truncated_documents"] == 0
        assert "were dropped" in caplog.text


def test_unpacked_long_documents_error(tokenizer_path, txt_file, tmp_path):
    dm = _make(tokenizer_path, str(txt_file), tmp_path, packing=False, block_size=20, long_documents="error")
    with pytest.raises(LmforgeError, match=r"longer than block_size=20.*long_documents is 'error'"):
        dm.prepare_data()


def _split_docs(dm: TextDataModule, tokenizer_path) -> tuple[list[str], list[str]]:
    tok = load_tokenizer(tokenizer_path)
    decode = lambda rows: [tok.decode(r[:-1]) for r in rows]  # noqa: E731 - rows end with eos
    return decode(dm.train_dataset["input_ids"]), decode(dm.val_dataset["input_ids"])


def test_validation_split_sizes_and_seed(tokenizer_path, txt_file, tmp_path):
    common = dict(packing=False, block_size=512)
    dm = _make(tokenizer_path, str(txt_file), tmp_path, val_fraction=0.1, **common)
    dm.setup()
    train, val = _split_docs(dm, tokenizer_path)
    assert (len(train), len(val)) == (36, 4)
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in set(train)]  # document order is kept within a split
    assert (dm.stats["train_documents"], dm.stats["val_documents"]) == (36, 4)
    # The documented choice: the first round(n * val_fraction) of a permutation seeded with `seed` (1234).
    assert val == [DOCS[i] for i in sorted(np.random.default_rng(1234).permutation(len(DOCS))[:4])]

    same = _make(tokenizer_path, str(txt_file), tmp_path / "other", val_fraction=0.1, **common)
    same.setup()
    assert _split_docs(same, tokenizer_path)[1] == val
    reseeded = _make(tokenizer_path, str(txt_file), tmp_path, val_fraction=0.1, seed=99, **common)
    reseeded.setup()
    assert _split_docs(reseeded, tokenizer_path)[1] != val

    tiny = _make(tokenizer_path, str(txt_file), tmp_path, val_fraction=0.001, **common)
    tiny.setup()
    assert (len(tiny.train_dataset), len(tiny.val_dataset)) == (39, 1)
    two = tmp_path / "two.txt"
    two.write_text("first document\nsecond document\n")
    big = _make(tokenizer_path, str(two), tmp_path, val_fraction=0.9, **common)
    big.setup()
    assert (len(big.train_dataset), len(big.val_dataset)) == (1, 1)


# ---------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tokenize_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = dm_module.tokenize_documents

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return original(*args, **kwargs)

    monkeypatch.setattr(dm_module, "tokenize_documents", counting)
    return calls


def test_cache_is_reused_and_invalidated(tokenizer_path, txt_file, tmp_path, tokenize_calls):
    dm = _make(tokenizer_path, str(txt_file), tmp_path, block_size=16)
    dm.prepare_data()
    assert len(tokenize_calls) == 2  # train and validation
    first_key = dm.cache_key()
    assert (tmp_path / "cache" / first_key / "meta.json").is_file()
    first_rows = None

    again = _make(tokenizer_path, str(txt_file), tmp_path, block_size=16)
    again.prepare_data()
    again.setup("fit")
    assert len(tokenize_calls) == 2, "the second run must read the cache, not tokenize again"
    first_rows = again.train_dataset["input_ids"]
    assert again.stats["train_rows"] == len(first_rows)

    # Another block size is other data.
    _make(tokenizer_path, str(txt_file), tmp_path, block_size=8).prepare_data()
    assert len(tokenize_calls) == 4

    # Changing the file invalidates the cache.
    txt_file.write_text("\n".join(DOCS[:20]) + "\n", encoding="utf-8")
    st = txt_file.stat()
    os.utime(txt_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    changed = _make(tokenizer_path, str(txt_file), tmp_path, block_size=16)
    assert changed.cache_key() != first_key
    changed.setup()  # setup() builds the cache itself when prepare_data() was not called
    assert len(tokenize_calls) == 6
    assert len(changed.train_dataset["input_ids"]) < len(first_rows)
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 3


def test_cache_key_depends_on_tokenizer_and_options(tokenizer_path, txt_file, tmp_path):
    base = _make(tokenizer_path, str(txt_file), tmp_path).cache_key()
    assert _make(tokenizer_path, str(txt_file), tmp_path).cache_key() == base
    for options in ({"seed": 1}, {"val_fraction": 0.2}, {"packing": False}, {"text_column": "body"}):
        assert _make(tokenizer_path, str(txt_file), tmp_path, **options).cache_key() != base, options
    other_tok = tmp_path / "tok2.json"
    other_tok.write_bytes(Path(tokenizer_path).read_bytes().replace(b'"dropout": null', b'"dropout":null'))
    assert _make(str(other_tok), str(txt_file), tmp_path).cache_key() != base


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "lm"))
    assert dm_module.default_cache_dir() == tmp_path / "lm" / "datasets"
    monkeypatch.delenv("LMFORGE_CACHE")
    assert dm_module.default_cache_dir() == Path.home() / ".cache" / "lmforge" / "datasets"
    assert os.environ.get("HF_DATASETS_OFFLINE") and os.environ.get("HF_HUB_OFFLINE")


# ---------------------------------------------------------------------------------------------------
# Collation and data loaders
# ---------------------------------------------------------------------------------------------------


def test_pad_collate():
    special = SpecialTokens(vocab_size=10, pad_id=9, eos_id=0)
    batch = pad_collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}, {"input_ids": torch.tensor([5, 6, 7, 8, 1])}], special)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9], [5, 6, 7, 8, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    padded = pad_collate([{"input_ids": [1, 2, 3]}], special, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 9]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0]]
    no_pad = pad_collate([{"input_ids": [1]}, {"input_ids": [1, 2]}], SpecialTokens(vocab_size=10, eos_id=7))
    assert no_pad["input_ids"].tolist() == [[1, 7], [1, 2]]


class _Objective:
    def collate(self, examples, special):
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples]), "eos": torch.tensor(special.eos_id)}


def test_dataloaders_and_collate_sources(tokenizer_path, txt_file, tmp_path):
    dm = _make(tokenizer_path, str(txt_file), tmp_path, block_size=8, batch_size=4, seed=7)
    dm.setup("fit")
    # Without a trainer: the default padding collate.
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == dm.val_dataset["input_ids"][:4]  # not shuffled
    assert batch["attention_mask"].sum().item() == 32

    train_order = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    again = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    assert train_order == again  # a fresh loader replays the seeded order
    assert sorted(r for b in train_order for r in b) == sorted(dm.train_dataset["input_ids"])
    assert [r for b in train_order for r in b] != dm.train_dataset["input_ids"]  # shuffled

    # With a trainer: the objective's collate, bound to the special tokens, picklable for workers.
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=_Objective()))
    collate = dm.get_collate_fn()
    assert pickle.loads(pickle.dumps(collate)).keywords["special"] == dm.special
    batch = next(iter(dm.train_dataloader()))
    assert batch["eos"].item() == dm.special.eos_id and batch["input_ids"].shape == (4, 8)

    # An explicit collate_fn wins.
    dm.collate_fn = lambda examples: {"n": len(examples)}
    assert next(iter(dm.val_dataloader())) == {"n": 4}


def test_loaders_without_explicit_setup(tokenizer_path, txt_file, tmp_path):
    dm = _make(tokenizer_path, str(txt_file), tmp_path, block_size=8, batch_size=2, num_workers=0)
    loader = dm.train_dataloader()
    assert loader.batch_size == 2 and loader.num_workers == 0
    assert next(iter(loader))["input_ids"].shape == (2, 8)
    assert dm.state_dict()["cache_key"] == dm.cache_key()
