"""The text datamodule: local files in, tokenized (and packed) rows out, cached on disk.

Reading
    ``.txt`` files hold one document per line (empty and whitespace-only lines are skipped; a
    document therefore cannot contain a line break, use ``.jsonl`` for multi-line documents).
    ``.jsonl``/``.json``, ``.csv`` and ``.parquet`` files hold one document per row, in the
    ``text_column`` column. A directory written by ``datasets.Dataset.save_to_disk`` (or a
    ``DatasetDict`` with a ``train`` split) is read the same way. Glob patterns are expanded.
    Every file is checked before 🤗 ``datasets`` sees it, so a mistake is reported as an
    :class:`~lmforge.errors.LmforgeError` naming the file (and the line or byte) and the fix.
    Building the cache streams: ``.txt`` files are read a chunk at a time, each batch of documents is
    tokenized and packed at once, and the rows are written straight into the cache, so memory stays
    flat as the corpus grows (``benchmarks/data_pipeline.py`` measures it).

Caching
    The tokenized rows are written once under ``cache_dir/<key>`` where ``key`` hashes everything
    they depend on (file paths, sizes and modification times, the tokenizer file, the options and
    :data:`DATA_FORMAT_VERSION`). The cache is built in a temporary directory and renamed into
    place, so a reader never sees a half-written cache; a second run with the same inputs reads it
    without tokenizing again.
"""

from __future__ import annotations

import os

# Nothing is ever downloaded: lmforge reads local files only. Set before `datasets` is imported.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import datasets  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lmforge.data.collate import pad_collate  # noqa: E402
from lmforge.data.tokenizer import find_special_tokens, load_tokenizer, resolve_tokenizer_path  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

log = logging.getLogger("lmforge.data")

#: Bump when the layout or meaning of cached rows changes: old caches are then ignored.
DATA_FORMAT_VERSION = 1

#: File extension -> 🤗 datasets packaged builder.
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_DISK = "save_to_disk"
_UTF8_CHECKED = ("text", "json", "csv")
_SUPPORTED_TEXT = (
    "Supported inputs are .txt (one document per line), .jsonl/.json, .csv and .parquet files (the text in "
    "the text_column column), and directories written by datasets.Dataset.save_to_disk."
)
_ROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
#: Splits read only by one command, each cached on its own: split -> the option naming its files.
_EXTRA_SPLITS = {"test": "test_files", "predict": "predict_files"}


def default_cache_dir() -> Path:
    """``$LMFORGE_CACHE/datasets`` if ``LMFORGE_CACHE`` is set, else ``~/.cache/lmforge/datasets``."""
    root = os.environ.get("LMFORGE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lmforge"
    return base / "datasets"


def check_loader_options(batch_size: int, num_workers: int, val_fraction: float, has_val_files: bool) -> None:
    """Check the options the text and the task datamodule share, with one wording for both."""
    if batch_size < 1:
        raise LmforgeError(f"data.batch_size must be at least 1, not {batch_size}.")
    if num_workers < 0:
        raise LmforgeError(f"data.num_workers must be 0 or more, not {num_workers}.")
    if not has_val_files and not 0.0 < val_fraction < 1.0:
        raise LmforgeError(
            f"data.val_fraction must be between 0 and 1 (exclusive), not {val_fraction}. Use for example 0.05, "
            "or give validation data with data.val_files."
        )


def held_out_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of ``n`` training items (``n >= 2``) are held out for validation: a seeded random
    ``fraction`` of them, at least one on each side."""
    n_val = min(max(1, round(n * fraction)), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Finding and checking the input files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One input: a file (or ``save_to_disk`` directory) and the builder that reads it."""

    path: Path
    format: str  # "text", "json", "csv", "parquet" or "save_to_disk"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _source_for(path: Path, option: str) -> DataSource:
    if path.is_dir():
        if _is_saved_dataset(path):
            return DataSource(path.resolve(), _DISK)
        raise LmforgeError(
            f"{option}: '{path}' is a directory but not one written by datasets.Dataset.save_to_disk (it has no "
            f"state.json/dataset_info.json). To use the files inside it, give a glob pattern such as "
            f"'{path / '*.jsonl'}'. {_SUPPORTED_TEXT}"
        )
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LmforgeError(
            f"{option}: '{path}' has the extension '{path.suffix or '(none)'}', which lmforge cannot read. "
            f"{_SUPPORTED_TEXT} Convert the file or rename it if it is plain text."
        )
    return DataSource(path.resolve(), fmt)


def resolve_data_files(files: str | os.PathLike | Sequence[str | os.PathLike], option: str = "train_files") -> list[DataSource]:
    """Expand ``files`` (paths and glob patterns) into checked :class:`DataSource` entries, in order.

    ``option`` names the setting the files came from, for error messages.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise LmforgeError(f"{option} is empty. Give at least one data file, for example {option}: data/train.txt.")
    sources: list[DataSource] = []
    for entry in files:
        text = os.path.expanduser(str(entry))
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise LmforgeError(
                    f"{option}: the pattern '{entry}' matches no file. Check the directory and the pattern "
                    f"(relative paths are taken from the current directory, {os.getcwd()})."
                )
            sources.extend(_source_for(Path(m), option) for m in matches)
        else:
            path = Path(text)
            if not path.exists():
                raise LmforgeError(
                    f"{option}: the data file '{entry}' does not exist. Check the path (relative paths are "
                    f"taken from the current directory, {os.getcwd()})."
                )
            sources.append(_source_for(path, option))
    return sources


def check_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20) -> None:
    """Raise :class:`LmforgeError` naming the byte offset (and line) of the first invalid UTF-8 byte."""
    offset = 0  # file offset of buf[0]
    lines = 1
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            buf = carry + chunk
            if not buf:
                return
            try:
                buf.decode("utf-8")
                consumed = len(buf)
            except UnicodeDecodeError as exc:
                if chunk and exc.reason == "unexpected end of data":
                    consumed = exc.start  # a character split across two chunks: finish it next time
                else:
                    bad = offset + exc.start
                    line = lines + buf.count(b"\n", 0, exc.start)
                    raise LmforgeError(
                        f"'{path}' is not valid UTF-8: byte {bad} (line {line}) is 0x{buf[exc.start]:02x} "
                        f"({exc.reason}). lmforge reads text as UTF-8; re-encode the file, for example with "
                        f"`iconv -f latin1 -t utf-8 '{path}' > 'fixed{Path(path).suffix}'`, or remove the bad bytes."
                    ) from None
            lines += buf.count(b"\n", 0, consumed)
            offset += consumed
            carry = buf[consumed:]
            if not chunk:
                return


def find_bad_json_line(path: str | os.PathLike) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object: ``(line_number, reason)``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1)
    if first == "[":  # a .json file holding one array: parse it whole
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as exc:
            return exc.lineno, exc.msg
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return number, f"{exc.msg} at column {exc.colno}"
            if not isinstance(value, dict):
                return number, f"it is a JSON {type(value).__name__}, not an object"
    return None


def _check_file(source: DataSource) -> None:
    if source.format == _DISK:
        return
    if source.path.stat().st_size == 0:
        raise LmforgeError(
            f"The data file '{source.path}' is empty. Put documents in it or remove it from the data files."
        )
    if source.format in _UTF8_CHECKED:
        check_utf8(source.path)


def _load_builder(fmt: str, paths: list[Path], work_dir: Path) -> datasets.Dataset:
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        kwargs["keep_default_na"] = False  # an empty cell is an empty string, not NaN
    return datasets.load_dataset(
        fmt,
        data_files=[str(p) for p in paths],
        split="train",
        cache_dir=str(work_dir / "hf"),
        **kwargs,
    )


def holds_no_records(exc: BaseException) -> bool:
    """Whether a 🤗 datasets loading failure means the file has no records (blank lines, a bare CSV header)."""
    return "corresponds to no data" in str(exc.__cause__ or exc)


def no_records_error(option: str, path: Path) -> LmforgeError:
    return LmforgeError(
        f"{option}: '{path}' holds no records (only blank lines, or a header without rows). Put one record per row "
        "in it, or remove it from the data files."
    )


def _load_saved(path: Path, option: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise LmforgeError(
            f"{option}: '{path}' is a DatasetDict with the splits {', '.join(loaded)} and no 'train' split. "
            f"Save the split you want on its own (dataset_dict['name'].save_to_disk(...)) and point to it."
        )
    return loaded


def _diagnose_load_failure(
    fmt: str, paths: list[Path], work_dir: Path, exc: Exception, text_column: str, option: str
) -> LmforgeError:
    """Turn a 🤗 datasets loading failure into an error that names the file at fault."""
    if fmt == "json":
        for path in paths:
            bad = find_bad_json_line(path)
            if bad is not None:
                line, reason = bad
                return LmforgeError(
                    f"'{path}' line {line} is not a valid JSON object ({reason}). Each line of a JSON Lines file "
                    f'must be one object such as {{"text": "..."}}; fix or delete that line.'
                )

    def first_line(error: BaseException) -> str:
        lines = str(error.__cause__ or error).strip().splitlines()
        return lines[0] if lines else type(error).__name__

    if len(paths) > 1:
        columns: list[tuple[Path, list[str]]] = []
        for path in paths:
            try:
                single = _load_builder(fmt, [path], work_dir)
            except Exception as single_exc:  # noqa: BLE001 - we are looking for the file that fails
                exc, paths = single_exc, [path]
                break
            if fmt != "text":
                _text_only(single, text_column, f"The data file '{path}'", option)  # names a missing column
            columns.append((path, single.column_names))
        else:
            (first, first_columns), *rest = columns
            for path, names in rest:
                if names != first_columns:
                    return LmforgeError(
                        f"{option}: '{path}' has the columns {names} but '{first}' has {first_columns}; files read "
                        f"together must have the same columns. Make the columns match, or convert the files."
                    )
    if holds_no_records(exc):
        return no_records_error(option, paths[0])
    return LmforgeError(
        f"{option}: could not read '{paths[0]}' as a {fmt} file ({first_line(exc)}). Check that the file is "
        f"well-formed {fmt.upper()} and that all files given together have the same columns."
    )


def _text_only(dataset: datasets.Dataset, text_column: str, where: str, option: str) -> datasets.Dataset:
    if text_column not in dataset.column_names:
        existing = ", ".join(f"'{c}'" for c in dataset.column_names) or "none"
        raise LmforgeError(
            f"{where} has no column '{text_column}' (its columns are: {existing}). Set text_column "
            f"(--data.text_column) to the column that holds the text, or rename the column in the file."
        )
    feature = dataset.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise LmforgeError(
            f"{where}: column '{text_column}' holds {feature!r}, not text. Set text_column (--data.text_column) "
            f"to the column that holds the documents as strings."
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset


def _group(sources: list[DataSource]) -> list[tuple[str, list[Path]]]:
    """Consecutive sources of the same builder, so that order is kept and few builders run."""
    groups: list[tuple[str, list[Path]]] = []
    for source in sources:
        if source.format != _DISK and groups and groups[-1][0] == source.format:
            groups[-1][1].append(source.path)
        else:
            groups.append((source.format, [source.path]))
    return groups


@contextlib.contextmanager
def _quiet_progress():
    """Hide 🤗 datasets progress bars for quick bookkeeping steps (filtering, saving)."""
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _non_empty(texts: list) -> list[str]:
    return [t for t in texts if t is not None and t != "" and not t.isspace()]


#: Characters of a ``.txt`` file read at a time: bounds the memory of reading, whatever the file size.
_TEXT_CHUNK = 1 << 20


def _iter_text_lines(path: Path, chunk_size: int = _TEXT_CHUNK) -> Iterator[list[str]]:
    """The lines of a ``.txt`` file, a chunk at a time, split exactly as 🤗 datasets' ``text`` builder does.

    Universal newlines (``\\n``, ``\\r\\n``, ``\\r``) end a line, nothing else; the line break is not kept.
    Streaming the file (instead of converting it to a memory-mapped Arrow file with
    ``load_dataset("text")``) keeps memory flat however large the corpus is.
    """
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return
            chunk += f.readline()  # finish the current line
            lines = chunk.split("\n")
            if lines[-1] == "":
                lines.pop()
            yield lines


class _Documents:
    """The non-empty documents of some sources, in file order, as batches of strings; re-iterable.

    Every file is checked, and every non-``.txt`` group loaded (by its 🤗 datasets builder, into
    ``work``), when this is made, so a data mistake is reported before any tokenizing. ``.txt`` files
    are streamed by :func:`_iter_text_lines`. Iterating raises :class:`LmforgeError` when the sources
    hold no document at all.
    """

    def __init__(self, sources: list[DataSource], text_column: str, work: Path, option: str) -> None:
        self.sources, self.option, self.text_column = sources, option, text_column
        for source in sources:
            _check_file(source)
        self.parts: list[list[Path] | datasets.Dataset] = []
        for fmt, paths in _group(sources):
            if fmt == "text":
                self.parts.append(paths)
            elif fmt == _DISK:
                saved = _load_saved(paths[0], option)
                self.parts.append(_text_only(saved, text_column, f"The saved dataset '{paths[0]}'", option))
            else:
                self.parts.append(_load_file_group(fmt, paths, work, text_column, option))
        self._reported = False

    def _raw_batches(self) -> Iterator[list]:
        for part in self.parts:
            if isinstance(part, list):
                for path in part:
                    yield from _iter_text_lines(path)
            else:
                for table in part.with_format("arrow").iter(batch_size=_DOCUMENT_BATCH):
                    yield table.column("text").to_pylist()

    def batches(self, keep: np.ndarray | None = None) -> Iterator[list[str]]:
        """Batches of documents; with ``keep``, only the documents whose index (among all) it marks True."""
        rows = seen = 0
        for raw in self._raw_batches():
            rows += len(raw)
            texts = _non_empty(raw)
            if keep is not None:
                mask = keep[seen : seen + len(texts)]
                texts = [t for t, k in zip(texts, mask) if k]
                seen += len(mask)
            else:
                seen += len(texts)
            if texts:
                yield texts
        if seen == 0:
            names = ", ".join(f"'{s.path}'" for s in self.sources)
            column = "" if all(s.format == "text" for s in self.sources) else f" (column '{self.text_column}')"
            raise LmforgeError(
                f"{self.option}: {names} contain no documents{column}: {rows} rows, all empty. Put text in the "
                f"file(s) or point {self.option} at the right data."
            )
        if seen < rows and not self._reported:
            self._reported = True
            log.info("Skipped %d empty documents in %s.", rows - seen, self.option)

    def count(self) -> int:
        """Number of (non-empty) documents: one pass over the files, without tokenizing."""
        return sum(len(texts) for texts in self.batches())


def _load_file_group(fmt: str, paths: list[Path], work: Path, text_column: str, option: str) -> datasets.Dataset:
    """Consecutive ``.jsonl``/``.csv``/``.parquet`` files read by their 🤗 datasets builder, ``text`` column only."""
    try:
        raw = _load_builder(fmt, paths, work)
    except LmforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types
        raise _diagnose_load_failure(fmt, paths, work, exc, text_column, option) from None
    if text_column not in raw.column_names and len(paths) > 1:
        # Name the file that lacks the column.
        for path in paths:
            _text_only(_load_builder(fmt, [path], work), text_column, f"The data file '{path}'", option)
        return _text_only(raw, text_column, f"The data files {', '.join(map(str, paths))}", option)
    where = f"The data file '{paths[0]}'" if len(paths) == 1 else f"The data files {', '.join(map(str, paths))}"
    return _text_only(raw, text_column, where, option)


_DOCUMENT_BATCH = 1000
_TEXT_SCHEMA = pa.schema([("text", pa.string())])


def read_documents(
    files: str | os.PathLike | Sequence[str | os.PathLike] | list[DataSource],
    text_column: str = "text",
    work_dir: str | os.PathLike | None = None,
    option: str = "train_files",
) -> datasets.Dataset:
    """Read the documents of ``files`` into a dataset with one ``text`` column, in file order.

    Empty documents (empty lines of a ``.txt`` file, empty or null cells) are skipped. ``work_dir`` is
    where the documents are written as an Arrow file (and where 🤗 datasets may write its own); by
    default a temporary directory is used and the result is kept in memory. Every user mistake
    raises :class:`LmforgeError`. (The datamodule does not use this: it streams the documents.)
    """
    if isinstance(files, list) and files and all(isinstance(f, DataSource) for f in files):
        sources = files
    else:
        sources = resolve_data_files(files, option=option)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="lmforge-read-") as tmp:
            documents = _Documents(sources, text_column, Path(tmp), option)
            batches = [pa.record_batch([pa.array(t, pa.string())], schema=_TEXT_SCHEMA) for t in documents.batches()]
            return datasets.Dataset(pa.Table.from_batches(batches, schema=_TEXT_SCHEMA))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    documents = _Documents(sources, text_column, work, option)
    path = work / f"documents-{uuid.uuid4().hex[:8]}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _TEXT_SCHEMA) as writer:
        for texts in documents.batches():
            writer.write_batch(pa.record_batch([pa.array(texts, pa.string())], schema=_TEXT_SCHEMA))
    return datasets.Dataset.from_file(str(path))


# --------------------------------------------------------------------------------------------------
# Tokenizing and building rows
# --------------------------------------------------------------------------------------------------


def tokenize_documents(
    batches: Iterable[list[str]], tokenizer: Tokenizer, desc: str = "Tokenizing"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenize batches of documents (no special tokens added): yields ``(lengths, flat ids)`` per batch.

    A generator, so that only one batch of documents and ids is in memory at a time.
    """
    log.info("%s ...", desc)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets computed
    for texts in batches:
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        yield lengths, values


def _with_separators(lengths: np.ndarray, values: np.ndarray, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Append ``eos_id`` to each document: returns the new lengths and flat values."""
    if eos_id is None:
        return lengths, values
    new_lengths = lengths + 1
    out = np.empty(int(new_lengths.sum()), dtype=np.int32)
    is_eos = np.zeros(len(out), dtype=bool)
    is_eos[np.cumsum(new_lengths) - 1] = True
    out[is_eos] = eos_id
    out[~is_eos] = values
    return new_lengths, out


def _row_batch(values: np.ndarray, lengths: np.ndarray) -> pa.RecordBatch:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    array = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
    return pa.record_batch([array], schema=_ROW_SCHEMA)


#: The file name ``datasets.Dataset.save_to_disk`` gives a one-shard dataset (read by ``load_from_disk``).
_SAVED_SHARD = "data-00000-of-00001.arrow"


def write_saved_dataset_metadata(directory: Path, fingerprint: str) -> None:
    """Write the ``state.json``/``dataset_info.json`` that make ``directory/_SAVED_SHARD`` (rows in
    :data:`_ROW_SCHEMA`) loadable by ``datasets.load_from_disk``, as ``save_to_disk`` would: the rows
    are written there directly rather than copied by ``save_to_disk`` (a copy that would read, and
    map, every row once more).
    """
    state = {
        "_data_files": [{"filename": _SAVED_SHARD}],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    (directory / "dataset_info.json").write_text(json.dumps({"features": features.to_dict()}, indent=2))


def build_rows(
    tokenized: Iterable[tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    block_size: int,
    eos_id: int | None,
    packing: bool = True,
    long_documents: str = "truncate",
    split: str = "train",
) -> dict[str, int]:
    """Turn batches of tokenized documents ``(lengths, flat ids)`` into training rows, streamed into an
    Arrow stream file at ``path`` (only one batch and the packing remainder are in memory).

    Packing: every document's ids followed by ``eos_id``, concatenated in order and cut into rows of
    exactly ``block_size`` tokens; the incomplete last row is dropped. Without packing: one row per
    document (with ``eos_id`` appended when there is one); a row longer than ``block_size`` is
    truncated to its first ``block_size`` tokens, dropped, or an error, per ``long_documents``.

    Returns counts (``documents``, ``tokens``, ``rows``, ``truncated_documents``,
    ``dropped_documents``, ``dropped_tokens``).
    """
    stats = {"documents": 0, "tokens": 0, "rows": 0, "truncated_documents": 0, "dropped_documents": 0, "dropped_tokens": 0}
    carry = np.zeros(0, dtype=np.int32)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _ROW_SCHEMA) as writer:
        for lengths, values in tokenized:
            lengths, values = _with_separators(lengths, values, eos_id)
            stats["documents"] += len(lengths)
            stats["tokens"] += len(values)
            if packing:
                buffer = np.concatenate([carry, values]) if len(carry) else values
                n_rows = len(buffer) // block_size
                if n_rows:
                    writer.write_batch(_row_batch(buffer[: n_rows * block_size], np.full(n_rows, block_size)))
                carry = buffer[n_rows * block_size :].copy()
                stats["rows"] += n_rows
                continue
            starts = np.cumsum(lengths) - lengths
            too_long = lengths > block_size
            if too_long.any():
                if long_documents == "error":
                    first = int(np.argmax(too_long))
                    raise LmforgeError(
                        f"A {split} document (number {stats['documents'] - len(lengths) + first + 1}, "
                        f"{int(lengths[first])} tokens with the separator) is longer than block_size={block_size}, "
                        f"and long_documents is 'error'. Raise block_size, set long_documents to 'truncate' or "
                        f"'drop', or use packing: true."
                    )
                if long_documents == "drop":
                    stats["dropped_documents"] += int(too_long.sum())
                    stats["dropped_tokens"] += int(lengths[too_long].sum())
                    keep = ~too_long
                    starts, lengths = starts[keep], lengths[keep]
                else:
                    stats["truncated_documents"] += int(too_long.sum())
                    stats["dropped_tokens"] += int((lengths[too_long] - block_size).sum())
                    lengths = np.minimum(lengths, block_size)
            if len(lengths) == 0:
                continue
            # Gather each kept row's first `lengths[i]` tokens from its start.
            row_offsets = np.cumsum(lengths) - lengths
            index = np.repeat(starts - row_offsets, lengths) + np.arange(int(lengths.sum()))
            writer.write_batch(_row_batch(values[index], lengths))
            stats["rows"] += len(lengths)
    if packing:
        stats["dropped_tokens"] = int(len(carry))
    return stats


# --------------------------------------------------------------------------------------------------
# The datamodule
# --------------------------------------------------------------------------------------------------


def _file_fingerprint(source: DataSource) -> list[Any]:
    """Path, size and modification time of a source (every file of a saved dataset)."""
    if source.format == _DISK:
        entries = []
        for root, _dirs, names in sorted(os.walk(source.path)):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                entries.append([os.path.relpath(os.path.join(root, name), source.path), st.st_size, st.st_mtime_ns])
        return [str(source.path), source.format, entries]
    st = source.path.stat()
    return [str(source.path), source.format, st.st_size, st.st_mtime_ns]


class TextDataModule(L.LightningDataModule):
    """Plain text from local files, tokenized, packed into blocks and cached.

    Documents are read from ``.txt`` files (one document per line; empty lines are skipped),
    ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` files (the ``text_column`` column), or directories
    written by ``datasets.Dataset.save_to_disk``. Glob patterns such as ``data/*.jsonl`` are expanded.
    The tokenized rows are cached, so a second run with the same data and options starts at once.
    Batches are built by the collate function of the objective being trained.

    Args:
        train_files: Training data: a path, a glob pattern, or a list of them.
        tokenizer: Path of a ``tokenizer.json`` (or of the directory holding one), as written by
            ``lmforge tokenizer train``.
        val_files: Validation data, like ``train_files``. When left out, ``val_fraction`` of the
            training documents are held out instead.
        val_fraction: Fraction of training documents held out for validation when ``val_files`` is
            not given (a seeded random choice; at least one document on each side).
        text_column: Column holding the text in ``.jsonl``/``.csv``/``.parquet`` files and saved
            datasets (``.txt`` files have no columns).
        block_size: Length of a training row in tokens (the model's context length).
        packing: Concatenate documents, each followed by the end-of-document token, and cut the
            stream into rows of exactly ``block_size`` tokens. When false, each document is one row.
        batch_size: Rows per batch (per device).
        num_workers: Data-loader worker processes (0 loads batches in the training process).
        cache_dir: Where tokenized data is cached. Default ``$LMFORGE_CACHE/datasets`` if the
            ``LMFORGE_CACHE`` environment variable is set, else ``~/.cache/lmforge/datasets``.
        seed: Seed of the validation split and of the shuffling of training rows.
        long_documents: Without packing, what to do with a document longer than ``block_size``:
            ``truncate`` keeps its first ``block_size`` tokens, ``drop`` leaves it out, ``error``
            stops with an error. Ignored when ``packing`` is true.
        test_files: Data for ``lmforge test`` (the test loss), like ``train_files``; rows are built
            the same way and cached apart from the training cache, when ``lmforge test`` first needs them.
        predict_files: Data for ``lmforge predict`` with a task that scores text, like ``test_files``.
    """

    def __init__(
        self,
        train_files: str | list[str],
        tokenizer: str,
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.05,
        text_column: str = "text",
        block_size: int = 256,
        packing: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        long_documents: Literal["truncate", "drop", "error"] = "truncate",
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise LmforgeError(f"block_size must be a positive number of tokens, not {block_size}. Try 256.")
        check_loader_options(batch_size, num_workers, val_fraction, val_files is not None)
        if long_documents not in ("truncate", "drop", "error"):
            raise LmforgeError(
                f"long_documents must be 'truncate', 'drop' or 'error', not '{long_documents}'."
            )
        self.save_hyperparameters()
        self.train_files = train_files
        self.val_files = val_files
        self.val_fraction = val_fraction
        self.text_column = text_column
        self.block_size = block_size
        self.packing = packing
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = seed
        self.long_documents = long_documents
        self.test_files = test_files
        self.predict_files = predict_files

        self.tokenizer_path = resolve_tokenizer_path(tokenizer)
        self.tokenizer = load_tokenizer(tokenizer)
        self.special = find_special_tokens(self.tokenizer)
        if packing and self.special.eos_id is None:
            raise LmforgeError(
                f"The tokenizer '{self.tokenizer_path}' has no end-of-document token (looked for <|endoftext|>, "
                "</s>, <eos>, [SEP]), which packing needs to separate documents. Add one when training the "
                "tokenizer (`lmforge tokenizer train` adds <|endoftext|>), or set packing: false."
            )

        #: Explicit batch builder ``collate_fn(examples) -> dict``; overrides the objective's.
        self.collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None
        #: Counts about the data (documents, tokens, rows, truncated and dropped documents, ...).
        self.stats: dict[str, Any] = {}
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.predict_dataset: datasets.Dataset | None = None
        self._cache_key: str | None = None
        self._resume_from: tuple[int, int] | None = None  # (epoch, batches consumed) when resuming

    # ----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary, added tokens included."""
        return self.special.vocab_size

    def row_length(self) -> int:
        """Length of a packed row: the trained objective's ``packed_length(block_size)``, else ``block_size``.

        An objective whose model inputs are not the raw rows asks for other lengths (T5 span
        corruption packs longer rows so that its corrupted inputs are exactly ``block_size``). The
        objective is the one of the LightningModule attached to this datamodule's trainer.
        """
        trainer = getattr(self, "trainer", None)
        try:
            objective = getattr(trainer.lightning_module, "objective", None) if trainer is not None else None
        except Exception:  # noqa: BLE001 - no module attached yet
            objective = None
        packed_length = getattr(objective, "packed_length", None)
        if not self.packing or packed_length is None:
            return self.block_size
        length = int(packed_length(self.block_size))
        if length < 1:
            raise LmforgeError(
                f"The objective '{objective.name}' asks for packed rows of {length} tokens for block_size="
                f"{self.block_size}; raise block_size."
            )
        return length

    def _sources(self) -> tuple[list[DataSource], list[DataSource] | None]:
        train = resolve_data_files(self.train_files, option="train_files")
        val = resolve_data_files(self.val_files, option="val_files") if self.val_files is not None else None
        return train, val

    def cache_key(self) -> str:
        """Hash of everything the cached rows depend on."""
        train, val = self._sources()
        description = {
            "train": [_file_fingerprint(s) for s in train],
            "val": [_file_fingerprint(s) for s in val] if val is not None else None,
            "val_fraction": self.val_fraction if val is None else None,
            "seed": self.seed,
        }
        self._cache_key = self._hash_with_row_options(description)
        return self._cache_key

    def _hash_with_row_options(self, description: dict[str, Any]) -> str:
        """Hash of ``description`` plus everything that shapes a row (tokenizer, lengths, packing)."""
        description = dict(
            description,
            format_version=DATA_FORMAT_VERSION,
            tokenizer_sha256=hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest(),
            text_column=self.text_column,
            block_size=self.block_size,
            row_length=self.row_length(),
            packing=self.packing,
            long_documents=self.long_documents,
        )
        blob = json.dumps(description, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @property
    def cache_path(self) -> Path:
        """The directory holding this data's cache (it may not exist yet)."""
        return self.cache_dir / (self._cache_key or self.cache_key())

    # ----------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the cache of tokenized rows unless it exists (Lightning runs this once per node), and
        the test or prediction rows when the trainer is testing or predicting."""
        self._build_cache(self.cache_dir / self.cache_key(), self._build)
        split = self._extra_split()
        if split is not None:
            self._build_cache(self._extra_path(split), functools.partial(self._build_extra, split))

    def _extra_split(self) -> str | None:
        """``"test"`` or ``"predict"`` when the attached trainer runs that command, else ``None``."""
        state = getattr(getattr(self, "trainer", None), "state", None)
        fn = getattr(getattr(state, "fn", None), "value", None)
        return fn if fn in _EXTRA_SPLITS else None

    def _extra_path(self, split: str) -> Path:
        """The cache of the ``test``/``predict`` rows: apart from the training cache, so that adding
        test data never rebuilds the training rows."""
        option = _EXTRA_SPLITS[split]
        files = getattr(self, option)
        if files is None:
            raise LmforgeError(
                f"`lmforge {split}` needs data.{option}: the text to {'compute the test loss on' if split == 'test' else 'predict on'}"
                f" (a path, a glob pattern or a list, like train_files). Add --data.{option} FILE to the command."
            )
        fingerprints = [_file_fingerprint(s) for s in resolve_data_files(files, option=option)]
        return self.cache_dir / f"{split}-{self._hash_with_row_options({'split': split, 'files': fingerprints})}"

    def _build_extra(self, split: str, out: Path) -> dict[str, Any]:
        key = self._extra_path(split).name
        work = out / "work"
        work.mkdir()
        option = _EXTRA_SPLITS[split]
        docs = _Documents(resolve_data_files(getattr(self, option), option=option), self.text_column, work, option)
        counts = self._write_split(out, split, docs, None, option, key)
        del docs
        shutil.rmtree(work, ignore_errors=True)
        log.info("Data: %d %s documents -> %d rows.", counts["documents"], split, counts["rows"])
        stats = {f"{split}_{name}": value for name, value in counts.items()}
        return {"format_version": DATA_FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stats": stats}

    def _build_cache(self, final: Path, build: Callable[[Path], dict[str, Any]]) -> None:
        """Run ``build(tmp)`` in a fresh temporary directory and rename it to ``final``, unless ``final``
        is complete already (its ``meta.json``, written last, marks completeness)."""
        if (final / "meta.json").is_file():
            log.info("Using cached tokenized data in %s", final)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tmp = self.cache_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completeness
            if final.exists() and not (final / "meta.json").is_file():
                shutil.rmtree(final, ignore_errors=True)  # a foreign, incomplete directory
            try:
                os.replace(tmp, final)  # atomic: readers see no cache or a complete one
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                log.info("Another process built the same cache first; using %s", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("Cached tokenized data in %s", final)

    def _remove_stale_temporaries(self, max_age_s: float = 24 * 3600) -> None:
        now = time.time()
        for stale in self.cache_dir.glob(".tmp-*"):
            try:
                if now - stale.stat().st_mtime > max_age_s:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass

    def _val_mask(self, n: int) -> np.ndarray:
        """Which of the ``n`` training documents are held out: a seeded random ``val_fraction`` of them."""
        if n < 2:
            raise LmforgeError(
                f"train_files hold only {n} document, so none can be held out for validation. Add documents "
                "(a .txt file has one document per line) or give validation data with val_files."
            )
        return held_out_mask(n, self.val_fraction, self.seed)

    def _build(self, out: Path) -> dict[str, Any]:
        """Stream documents -> token ids -> rows for each split, into ``out/<split>`` (a saved dataset).

        Nothing the size of the corpus is held in memory or memory-mapped: files are read a chunk at a
        time, each batch is tokenized and packed at once (the remainder carried to the next batch),
        and the rows are written where ``load_from_disk`` reads them. With ``val_fraction``, the
        training files are read three times (counting, train, validation), but tokenized once.
        """
        work = out / "work"
        work.mkdir()
        train_sources, val_sources = self._sources()
        train_docs = _Documents(train_sources, self.text_column, work, "train_files")
        if val_sources is None:
            val_mask = self._val_mask(train_docs.count())
            splits = (("train", train_docs, ~val_mask), ("val", train_docs, val_mask))
        else:
            val_docs = _Documents(val_sources, self.text_column, work, "val_files")
            splits = (("train", train_docs, None), ("val", val_docs, None))

        stats: dict[str, Any] = {}
        key = self._cache_key or self.cache_key()
        for split, docs, keep in splits:
            option = "train_files" if split == "train" else ("val_files" if val_sources else "val_fraction")
            for name, value in self._write_split(out, split, docs, keep, option, key).items():
                stats[f"{split}_{name}"] = value
        stats["truncated_documents"] = stats["train_truncated_documents"] + stats["val_truncated_documents"]
        stats["dropped_documents"] = stats["train_dropped_documents"] + stats["val_dropped_documents"]
        del train_docs, splits
        shutil.rmtree(work, ignore_errors=True)
        self._log_stats(stats)
        return {
            "format_version": DATA_FORMAT_VERSION,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tokenizer": str(self.tokenizer_path),
            "stats": stats,
        }

    def _write_split(
        self, out: Path, split: str, docs: _Documents, keep: np.ndarray | None, option: str, key: str
    ) -> dict[str, int]:
        """Tokenize and pack ``docs`` (those ``keep`` marks) into the saved dataset ``out/<split>``
        (``key``, the cache's hash, makes its fingerprint)."""
        (out / split).mkdir()
        tokenized = tokenize_documents(docs.batches(keep), self.tokenizer, desc=f"Tokenizing {split}")
        counts = build_rows(
            tokenized,
            out / split / _SAVED_SHARD,
            self.row_length(),
            self.special.eos_id,
            packing=self.packing,
            long_documents=self.long_documents,
            split=split,
        )
        if counts["rows"] == 0:
            reason = (
                f"its {counts['tokens']} tokens do not fill one row of block_size={self.block_size}"
                if self.packing
                else "every document was dropped for being longer than block_size"
            )
            raise LmforgeError(f"The {split} data yields no rows: {reason}. Lower block_size or add data ({option}).")
        write_saved_dataset_metadata(out / split, f"{key[:16]}-{split}")
        pa.default_memory_pool().release_unused()  # give back what pyarrow's allocator keeps
        return counts

    def _log_stats(self, stats: dict[str, Any]) -> None:
        log.info(
            "Data: %d train documents -> %d rows (%d tokens); %d validation documents -> %d rows.",
            stats["train_documents"],
            stats["train_rows"],
            stats["train_tokens"],
            stats["val_documents"],
            stats["val_rows"],
        )
        if stats["truncated_documents"]:
            log.warning(
                "%d documents were longer than block_size=%d and were truncated (long_documents='truncate').",
                stats["truncated_documents"],
                self.block_size,
            )
        if stats["dropped_documents"]:
            log.warning(
                "%d documents were longer than block_size=%d and were dropped (long_documents='drop').",
                stats["dropped_documents"],
                self.block_size,
            )

    def setup(self, stage: str | None = None) -> None:
        """Load the cached rows (building them first if :meth:`prepare_data` was not run)."""
        final = self.cache_dir / self.cache_key()
        if not (final / "meta.json").is_file():
            self.prepare_data()
        meta = json.loads((final / "meta.json").read_text())
        self.stats = dict(meta.get("stats", {}))
        self.train_dataset = datasets.load_from_disk(str(final / "train"))
        self.val_dataset = datasets.load_from_disk(str(final / "val"))
        split = stage if stage in _EXTRA_SPLITS else None
        if split is not None:
            extra = self._extra_path(split)
            if not (extra / "meta.json").is_file():
                self._build_cache(extra, functools.partial(self._build_extra, split))
            setattr(self, f"{split}_dataset", datasets.load_from_disk(str(extra / split)))

    # ----------------------------------------------------------------------------------------------

    def get_collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The batch builder: ``collate_fn`` if set, else the trained objective's, else :func:`pad_collate`."""
        if self.collate_fn is not None:
            return self.collate_fn
        objective = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            try:
                module = trainer.lightning_module
            except Exception:  # noqa: BLE001 - no module attached yet
                module = None
            objective = getattr(module, "objective", None)
        if objective is not None and hasattr(objective, "collate"):
            return functools.partial(objective.collate, special=self.special)
        return functools.partial(pad_collate, special=self.special)

    def _loader(self, dataset: datasets.Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            dataset = self.train_dataset if shuffle else self.val_dataset
        if self.num_workers > 0:
            # Worker processes only collate; keep tokenizers from warning about forking.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # A seeded, sharded, resumable sampler, per-batch seeded collation and the loader's own generator
        # (lmforge.reliability.resume): a resumed run sees exactly the batches the uninterrupted one would.
        from lmforge.reliability.resume import make_loader

        trainer = getattr(self, "trainer", None)
        resume_from, self._resume_from = (self._resume_from, None) if shuffle else (None, self._resume_from)
        return make_loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            collate_fn=self.get_collate_fn(),
            num_workers=self.num_workers,
            rank=getattr(trainer, "global_rank", 0),
            world_size=getattr(trainer, "world_size", 1),
            resume_from=resume_from,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            self.setup("predict")
        return self._loader(self.predict_dataset, shuffle=False)

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        from lmforge.reliability.resume import data_position

        position = data_position(getattr(self, "trainer", None))  # from the trainer's progress, not the sampler
        return {"data_format_version": DATA_FORMAT_VERSION, "cache_key": self._cache_key, "position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lmforge.reliability.resume import resume_position

        self._resume_from = resume_position(state_dict.get("position"))  # used by the next train_dataloader()
        key = state_dict.get("cache_key")
        if key and self._cache_key and key != self._cache_key:
            log.info("The data differs from the checkpoint's (cache key %s, now %s).", key, self._cache_key)
