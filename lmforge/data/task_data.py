"""Labelled records for fine-tuning tasks: local files in, the task's feature rows out, cached.

Reading
    ``.jsonl``/``.json``, ``.csv`` and ``.parquet`` files (or ``save_to_disk`` directories), one
    record per row, checked like the text datamodule's inputs (missing, empty, not UTF-8, a bad
    JSON line: each an :class:`~lmforge.errors.LmforgeError` naming the file). A task names the
    record fields it reads (``Task.fields``); ``columns: {field: file_column}`` maps a field to a
    differently named column. Multi-label lists and word/tag lists need JSON Lines or Parquet.

Splits
    ``train_files`` and ``val_files`` (or ``val_fraction`` of the training records, a seeded
    choice), ``test_files`` for ``lmforge test``, ``predict_files`` for ``lmforge predict`` (label
    fields optional there). Every record gets ``example_id``: its row number in its split.

Preprocessing and caching
    The task's ``preprocess`` turns records into feature rows (batched ``datasets.map``). The rows
    of each split are saved under ``cache_dir/tasks/<key>`` where ``key`` hashes the files (paths,
    sizes, modification times), the tokenizer, the task's options (labels included), the family
    and the options here; a second run with the same inputs loads them without preprocessing.

Evaluation order
    Validation, test and predict loaders give each process every ``world_size``-th row without
    padding (unlike a ``DistributedSampler``, which repeats rows to even out the processes), so a
    metric over 2 processes equals the single-process value on the same data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from lmforge.data.datamodule import (
    DataSource,
    _check_file,
    _file_fingerprint,
    _load_builder,
    _load_saved,
    _quiet_progress,
    check_loader_options,
    default_cache_dir,
    find_bad_json_line,
    held_out_mask,
    holds_no_records,
    no_records_error,
    resolve_data_files,
)
from lmforge.data.tokenizer import find_special_tokens, load_tokenizer, resolve_tokenizer_path
from lmforge.errors import LmforgeError, closest
from lmforge.plugin_api import Task

log = logging.getLogger("lmforge.data")

#: Bump when the layout or meaning of cached feature rows changes: old caches are then ignored.
TASK_DATA_FORMAT_VERSION = 2

#: Lightning stage -> the splits it reads.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_SPLIT_OPTION = {"train": "train_files", "val": "val_files", "test": "test_files", "predict": "predict_files"}
_SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


# -- reading records --------------------------------------------------------------------------------
def check_columns(task_cls: type, columns: dict[str, str] | None) -> dict[str, str]:
    """``columns`` with every task field filled in (identity); an unknown field is an error."""
    known = (*task_cls.fields, *task_cls.optional_fields)
    columns = dict(columns or {})
    for field in columns:
        if field not in known:
            raise LmforgeError(
                f"data.columns maps '{field}', which is not a field of the task '{task_cls.name}' (its fields: "
                f"{', '.join(known)}).{closest(field, known)} The keys of data.columns are the task's field names, "
                "the values the column names in your files."
            )
    return {field: columns.get(field, field) for field in known}


def _load_source(source: DataSource, work: Path, option: str) -> datasets.Dataset:
    if source.format == "text":
        raise LmforgeError(
            f"{option}: '{source.path}' is a .txt file, which has no columns. Fine-tuning data needs named fields "
            "per record: use .jsonl, .csv or .parquet (one record per row)."
        )
    _check_file(source)
    if source.format == "save_to_disk":
        return _load_saved(source.path, option)
    try:
        return _load_builder(source.format, [source.path], work)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types
        if source.format == "json":
            bad = find_bad_json_line(source.path)
            if bad is not None:
                raise LmforgeError(
                    f"'{source.path}' line {bad[0]} is not a valid JSON object ({bad[1]}). Each line of a JSON "
                    "Lines file must be one record such as {\"text\": \"...\", \"label\": \"...\"}; fix or delete it."
                ) from None
        if holds_no_records(exc):
            raise no_records_error(option, source.path) from None
        reason = str(exc.__cause__ or exc).strip().splitlines()
        raise LmforgeError(
            f"{option}: could not read '{source.path}' as a {source.format} file ({reason[0] if reason else exc}). "
            f"Check that it is well-formed {source.format.upper()} with the same columns on every row."
        ) from None


def read_records(
    files: str | list[str],
    task_cls: type,
    columns: dict[str, str] | None,
    option: str,
    work_dir: str | os.PathLike,
    with_labels: bool = True,
    keep_ids: bool = False,
) -> datasets.Dataset:
    """The records of ``files`` with the task's field names as columns, plus ``example_id``.

    Required fields are ``task_cls.fields`` (without ``label_fields`` when ``with_labels`` is
    false, for predict); optional fields are kept when every file has them. With ``keep_ids``, a
    column ``id`` that every file has is kept as ``record_id`` (predictions carry the record's own id).
    """
    mapping = check_columns(task_cls, columns)
    required = [f for f in task_cls.fields if with_labels or f not in task_cls.label_fields]
    optional = [f for f in mapping if f not in required]
    parts = []
    for source in resolve_data_files(files, option=option):
        raw = _load_source(source, Path(work_dir), option)
        missing = [f for f in required if mapping[f] not in raw.column_names]
        if missing:
            field = missing[0]
            raise LmforgeError(
                f"{option}: '{source.path}' has no column '{mapping[field]}' for the task field '{field}' (its columns: "
                f"{', '.join(raw.column_names) or 'none'}).{closest(mapping[field], raw.column_names)} Map the field to "
                f"the right column with data.columns (e.g. --data.columns '{{\"{field}\": \"COLUMN\"}}') or rename it."
            )
        for field in required:
            column = raw.data.column(mapping[field])
            if column.null_count:
                first = column.is_null().to_pylist().index(True)
                raise LmforgeError(
                    f"{option}: record {first + 1} of '{source.path}' has no '{mapping[field]}' (missing or null), "
                    f"which the task field '{field}' needs in every record. Fill it in or remove the record."
                )
        present = required + [f for f in optional if mapping[f] in raw.column_names]
        part = raw.select_columns([mapping[f] for f in present])
        part = part.rename_columns({mapping[f]: f for f in present if mapping[f] != f})
        if keep_ids and "id" in raw.column_names and "id" not in present:
            part = part.add_column("record_id", raw.data.column("id").to_pylist())
        parts.append(part)
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    with _quiet_progress():
        dataset = datasets.concatenate_datasets([p.select_columns(common) for p in parts]) if len(parts) > 1 else parts[0]
    if len(dataset) == 0:
        raise LmforgeError(f"{option}: {files} hold no records. Point {option} at files with at least one row.")
    return dataset.add_column("example_id", list(range(len(dataset))))


def _preprocess_naming_files(preprocess, files: str, records: dict[str, list[Any]], **kwargs: Any):
    """A task's ``preprocess``, whose errors (they name the record by ``example_id``: its row number
    in the split, counted from 0) also name the option and the files the record comes from."""
    try:
        return preprocess(records, **kwargs)
    except LmforgeError as exc:
        raise LmforgeError(f"{files} (records numbered from 0): {exc}") from None


def infer_task_labels(task_cls: type, train_files: str | list[str], columns: dict[str, str] | None) -> list[str] | None:
    """``task_cls.infer_labels`` over the training records (None for a task without a label set)."""
    if getattr(task_cls.infer_labels, "__func__", None) is Task.infer_labels.__func__:
        return None  # a task without a label set: nothing to read
    with tempfile.TemporaryDirectory(prefix="lmforge-labels-") as tmp:
        records = read_records(train_files, task_cls, columns, "train_files", tmp)
        label_fields = [f for f in task_cls.label_fields if f in records.column_names] or records.column_names
        values = {f: records[f] for f in label_fields}
    labels = task_cls.infer_labels(values)
    if labels is not None and not labels:
        raise LmforgeError(f"train_files hold no labels for the task '{task_cls.name}'; check the label column.")
    return labels


# -- sampling -------------------------------------------------------------------------------------
class EvalSampler(DistributedSampler):
    """Rows ``rank, rank + world_size, ...`` in order, without padding: every row is seen exactly once
    over all processes (a DistributedSampler subclass, so Lightning leaves it in place)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_replicas, self.rank = length, max(1, num_replicas), rank
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0
        self.num_samples = len(range(rank, length, self.num_replicas))
        self.total_size = length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


# -- the datamodule ---------------------------------------------------------------------------------
class TaskDataModule(L.LightningDataModule):
    """Labelled records from local files, preprocessed by the model's task and cached.

    Used by ``lmforge fit | validate | test | predict`` whenever the model has a fine-tuning task
    (one that defines ``preprocess``); the ``data:`` section of such a config holds these options.

    Args:
        train_files: Training records: a path, a glob pattern, or a list of them (``.jsonl``,
            ``.csv``, ``.parquet`` or ``save_to_disk`` directories). The label set is taken from
            them (and saved as ``labels.json`` in the run directory).
        tokenizer: Path of a ``tokenizer.json`` (or the directory holding one).
        val_files: Validation records. When left out, ``val_fraction`` of the training records are
            held out instead.
        test_files: Records for ``lmforge test``.
        predict_files: Records for ``lmforge predict`` (label fields may be missing).
        val_fraction: Fraction of training records held out when ``val_files`` is not given.
        columns: Task field -> file column, for files whose columns are named differently
            (e.g. ``{text: sentence, label: sentiment}``).
        max_length: Longest input in tokens (longer inputs are truncated by the task).
        batch_size: Rows per batch (per device).
        num_workers: Data-loader worker processes (0 loads batches in the training process).
        cache_dir: Where preprocessed rows are cached. Default ``$LMFORGE_CACHE/datasets`` or
            ``~/.cache/lmforge/datasets``.
        seed: Seed of the validation split and of the shuffling of training rows.
    """

    def __init__(
        self,
        train_files: str | list[str],
        tokenizer: str,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        val_fraction: float = 0.1,
        columns: dict[str, str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if max_length < 4:
            raise LmforgeError(f"data.max_length must be at least 4 tokens, not {max_length}. Try 128.")
        check_loader_options(batch_size, num_workers, val_fraction, val_files is not None)
        self.save_hyperparameters()
        self.files = {"train": train_files, "val": val_files, "test": test_files, "predict": predict_files}
        self.val_fraction = val_fraction
        self.columns = dict(columns or {})
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = seed
        self.tokenizer_path = resolve_tokenizer_path(tokenizer)
        self.tokenizer = load_tokenizer(tokenizer)
        self.special = find_special_tokens(self.tokenizer)
        self.datasets: dict[str, datasets.Dataset] = {}
        #: split -> the records' own ``id`` values, when their files have an ``id`` column (predict only)
        self.record_ids: dict[str, list[Any]] = {}
        self._resume_from: tuple[int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self.special.vocab_size

    # -- the model's task --------------------------------------------------------------------------
    def _module(self):
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is None or getattr(module, "task", None) is None:
            raise LmforgeError(
                "The task datamodule needs a model with a task (model.task) to preprocess its records; this model "
                "has none. Add a fine-tuning task, or use the text datamodule's options for pretraining."
            )
        return module

    # -- caching -----------------------------------------------------------------------------------
    def _files(self, split: str):
        files = self.files[split]
        if split == "val" and files is None:
            files = self.files["train"]
        if files is None:
            option = _SPLIT_OPTION[split]
            command = {"test": "test", "predict": "predict"}.get(split, "fit")
            raise LmforgeError(f"`lmforge {command}` needs data.{option}: give the records to {command} on.")
        return files

    def cache_key(self, split: str) -> str:
        module = self._module()
        description = {
            "format_version": TASK_DATA_FORMAT_VERSION,
            "split": split,
            "files": [_file_fingerprint(s) for s in resolve_data_files(self._files(split), _SPLIT_OPTION[split])],
            "held_out": [self.val_fraction, self.seed] if split in ("train", "val") and self.files["val"] is None else None,
            "tokenizer_sha256": hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest(),
            "task": module.task.plugin_config(),
            "family": module.family,
            "columns": self.columns,
            "max_length": self.max_length,
        }
        blob = json.dumps(description, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def _describe_split(self, split: str) -> str:
        """Where a split's records come from, for error messages: the option and its files."""
        option = _SPLIT_OPTION[split]
        paths = ", ".join(str(source.path) for source in resolve_data_files(self._files(split), option=option))
        if split in ("train", "val") and self.files["val"] is None:
            part = "the held-out validation records" if split == "val" else "the training records (held-out ones removed)"
            return f"{part} of data.train_files: {paths}"
        return f"data.{option}: {paths}"

    def _cache_path(self, split: str) -> Path:
        return self.cache_dir / "tasks" / self.cache_key(split)

    def _records(self, split: str, work: Path) -> datasets.Dataset:
        task_cls = type(self._module().task)
        files = self._files(split)
        records = read_records(files, task_cls, self.columns, _SPLIT_OPTION[split], work, with_labels=split != "predict",
                               keep_ids=split == "predict")
        if split in ("train", "val") and self.files["val"] is None:
            n = len(records)
            if n < 2:
                raise LmforgeError("train_files hold only one record, so none can be held out: add records or val_files.")
            held_out = held_out_mask(n, self.val_fraction, self.seed)
            records = records.select(np.flatnonzero(held_out if split == "val" else ~held_out)).flatten_indices()
            records = records.remove_columns("example_id").add_column("example_id", list(range(len(records))))
        return records

    def _build(self, split: str) -> None:
        final = self._cache_path(split)
        if (final / "done").is_file():
            return
        module = self._module()
        (self.cache_dir / "tasks").mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / "tasks" / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            records = self._records(split, tmp / "work")
            if "record_id" in records.column_names:  # kept apart: the task sees only its own fields
                (tmp / "record_ids.json").write_text(json.dumps(records.data.column("record_id").to_pylist(), default=str))
                records = records.remove_columns("record_id")
            task = module.task
            fn = functools.partial(
                _preprocess_naming_files,
                task.preprocess,
                self._describe_split(split),
                tokenizer=self.tokenizer,
                special=self.special,
                max_length=self.max_length,
                family=module.family,
                stage=_SPLIT_STAGE[split],
            )
            with _quiet_progress():
                rows = records.map(
                    fn, batched=True, batch_size=256, remove_columns=records.column_names,
                    new_fingerprint=final.name, keep_in_memory=True,
                )
                if len(rows) == 0:
                    raise LmforgeError(f"The task '{task.name}' produced no rows from {_SPLIT_OPTION[split]}.")
                rows.save_to_disk(str(tmp / "rows"))
            (tmp / "done").write_text(json.dumps({"records": len(records), "rows": len(rows)}))
            shutil.rmtree(tmp / "work", ignore_errors=True)
            if final.exists() and not (final / "done").is_file():
                shutil.rmtree(final, ignore_errors=True)  # left by an interrupted build
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "done").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prepare_data(self) -> None:
        """Preprocess and cache the splits of the current stage (once per node)."""
        for split in self._stage_splits():
            self._build(split)

    def _stage_splits(self) -> tuple[str, ...]:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return STAGE_SPLITS.get(getattr(fn, "value", fn) or "fit", ("train", "val"))

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage or "fit", ("train", "val")):
            self._build(split)
            self.datasets[split] = datasets.load_from_disk(str(self._cache_path(split) / "rows"))
            ids = self._cache_path(split) / "record_ids.json"
            if ids.is_file():
                self.record_ids[split] = json.loads(ids.read_text())

    # -- loaders -----------------------------------------------------------------------------------
    def _collate(self):
        return functools.partial(self._module().task.collate, special=self.special)

    def train_dataloader(self) -> DataLoader:
        from lmforge.reliability.resume import make_loader

        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        trainer = getattr(self, "trainer", None)
        resume_from, self._resume_from = self._resume_from, None
        return make_loader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            rank=getattr(trainer, "global_rank", 0),
            world_size=getattr(trainer, "world_size", 1),
            resume_from=resume_from,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        dataset = self.datasets[split]
        sampler = EvalSampler(len(dataset), getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0))
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate(), num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from lmforge.reliability.resume import data_position

        return {"task_data_format_version": TASK_DATA_FORMAT_VERSION, "position": data_position(getattr(self, "trainer", None))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lmforge.reliability.resume import resume_position

        self._resume_from = resume_position(state_dict.get("position"))

