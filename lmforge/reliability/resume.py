"""Exact resume: the data order, the collate randomness and the RNG states of a run.

A run stopped after step ``k`` and resumed from its checkpoint takes exactly the steps the
uninterrupted run would have taken. Three things make that so:

Data order
    :class:`ResumableSampler` is the training sampler. Its permutation for an epoch depends only on
    ``(seed, epoch)`` and each rank takes every ``world_size``-th index of it (like
    ``DistributedSampler``, which it subclasses so that Lightning leaves it alone). The number of
    batches already consumed in the current epoch is taken from the trainer's progress when a
    checkpoint is saved (:func:`data_position`), never from the sampler (data-loader workers run
    ahead of training), and on resume the sampler skips exactly those batches. The data loader has
    its own ``torch.Generator``, so creating an iterator never draws from the global RNG.

Collate randomness
    Every batch is collated by :class:`SeededCollate` with the global ``torch``, ``numpy`` and
    ``random`` generators seeded from ``(seed, stream, epoch, batch index, rank)`` (and restored
    afterwards), in whichever process collates it. :func:`batch_seed` returns that seed for an
    objective that prefers its own generator. An objective's masking is therefore a function of
    the batch's position in the run, the same in a worker or the main process, before or after a
    resume.

RNG states
    :func:`capture_rng_state` / :func:`restore_rng_state` hold the torch (CPU and current CUDA
    device), numpy and Python RNG states as plain data (tensors, lists, ints), so checkpoints stay
    loadable with ``torch.load(weights_only=True)``. :class:`~lmforge.reliability.guard.TrainingGuard`
    saves each rank's state in the checkpoint and restores it right before the first resumed
    training step, so dropout continues the uninterrupted run's stream.

Test hook: ``LMFORGE_DISABLE_DATA_RESUME=1`` makes a resumed run ignore the saved data position
(it starts the epoch's permutation from its first batch). It exists so that tests can show that a
comparison of resumed and uninterrupted runs does detect a wrong data order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

# Lightning warns on a mid-epoch resume unless the DataLoader itself is stateful; here the datamodule
# carries the data position (see TextDataModule.state_dict), so the warning would be wrong.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")

#: Test hook: when set to 1, a resumed run ignores the saved data position (see the module docs).
DISABLE_DATA_RESUME_ENV = "LMFORGE_DISABLE_DATA_RESUME"

TRAIN_STREAM = 0
EVAL_STREAM = 1

_BATCH_SEED: int | None = None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (a hash, so nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def batch_seed() -> int | None:
    """The seed of the batch being collated (inside an objective's ``collate``), else ``None``.

    It is derived from the data seed, the epoch, the batch's index in the epoch and the rank, so an
    objective that seeds its own generator with it per call (``torch.Generator().manual_seed(s)``,
    ``numpy.random.default_rng(s)``) masks identically in an uninterrupted and a resumed run.
    """
    return _BATCH_SEED


class BatchKey(int):
    """A row index that also carries the epoch and the index of the batch it belongs to."""

    def __new__(cls, index: int, epoch: int, batch: int, stream: int = TRAIN_STREAM) -> BatchKey:  # noqa: PYI034
        key = super().__new__(cls, index)
        key.epoch, key.batch, key.stream = epoch, batch, stream
        return key

    def __reduce__(self):
        return (BatchKey, (int(self), self.epoch, self.batch, self.stream))


class ResumableSampler(DistributedSampler):
    """A seeded, sharded, resumable sampler of row indices (see the module docs).

    Args:
        length: Number of rows in the dataset.
        batch_size: Rows per batch (to skip whole batches and to tag each row with its batch).
        seed: Seed of the permutation: epoch ``e`` uses the permutation of ``(seed, e)``.
        num_replicas: World size; rank ``r`` takes every ``num_replicas``-th index from ``r``.
        rank: This process's global rank.
        shuffle: Permute the rows each epoch (training) or keep their order (evaluation).
        stream: Tag mixed into the collate seeds, so training and evaluation batches differ.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        stream: int = TRAIN_STREAM,
    ) -> None:
        # DistributedSampler.__init__ wants a dataset and an initialised process group: set its fields.
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = max(1, num_replicas)
        self.rank = rank
        self.shuffle = shuffle
        self.stream = stream
        self.epoch = 0
        self.drop_last = False
        self.num_samples = math.ceil(length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        #: (epoch, batches already consumed in it) to skip once, set when resuming.
        self.resume_from: tuple[int, int] | None = None
        #: Row indices of the batches handed out and not yet claimed by :meth:`pop_batch` (main process;
        #: data-loader workers run a few batches ahead at most, so a bounded queue never loses a claim).
        self._handed_out: deque[list[int]] = deque(maxlen=1024)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        """This rank's row indices for ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.total_size > len(order):  # pad by wrapping, so every rank has as many batches
            order += (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]

    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        skip = 0
        if self.resume_from is not None:
            resume_epoch, consumed = self.resume_from
            self.resume_from = None
            if resume_epoch == epoch:
                skip = consumed
        order = self.indices(epoch)
        self._handed_out.clear()
        epoch_tag = epoch if self.shuffle else 0
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            self._handed_out.append(rows)
            batch = start // self.batch_size
            for index in rows:
                yield BatchKey(index, epoch_tag, batch, self.stream)

    def pop_batch(self) -> list[int] | None:
        """Row indices of the oldest batch handed out and not yet claimed (call once per training batch)."""
        return self._handed_out.popleft() if self._handed_out else None


class Examples(list):
    """The rows of one batch, with the batch's identity (``seed_parts``) for :class:`SeededCollate`."""

    seed_parts: tuple[int, int, int] | None = None


class KeyedRows(Dataset):
    """Wraps a map-style dataset so that a batch's rows arrive with the batch's identity."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        return self.dataset[int(key)]

    def __getitems__(self, keys: list[int]) -> Examples:
        plain = [int(k) for k in keys]
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(plain) if callable(getitems) else [self.dataset[i] for i in plain]
        examples = Examples(rows)
        first = keys[0] if keys else None
        if isinstance(first, BatchKey):
            examples.seed_parts = (first.stream, first.epoch, first.batch)
        return examples


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed torch (CPU), numpy and random with ``seed`` inside the block; restore their states after."""
    global _BATCH_SEED
    torch_state = torch.random.default_generator.get_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    previous = _BATCH_SEED
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    _BATCH_SEED = seed
    try:
        yield
    finally:
        _BATCH_SEED = previous
        torch.random.default_generator.set_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededCollate:
    """Calls ``collate_fn`` with the global RNGs seeded from the batch's identity (see the module docs)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], seed: int, rank: int) -> None:
        self.collate_fn = collate_fn
        self.seed = seed
        self.rank = rank

    def __call__(self, examples: list[Any]) -> Any:
        parts = getattr(examples, "seed_parts", None)
        if parts is None:
            return self.collate_fn(list(examples))
        with seeded_global_rngs(derive_seed(self.seed, *parts, self.rank)):
            return self.collate_fn(list(examples))


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM/SIGUSR1/SIGINT to the training process, which stops cleanly."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":  # keep Lightning's worker seeding when it was asked for
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))))


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    resume_from: tuple[int, int] | None = None,
) -> torch.utils.data.DataLoader:
    """The data loader of :class:`~lmforge.data.datamodule.TextDataModule` (see the module docs)."""
    sampler = ResumableSampler(
        len(dataset),
        batch_size,
        seed,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        stream=TRAIN_STREAM if shuffle else EVAL_STREAM,
    )
    sampler.resume_from = resume_from
    if resume_from is not None:
        sampler.set_epoch(resume_from[0])
    return torch.utils.data.DataLoader(
        KeyedRows(dataset),
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(derive_seed(seed, 1 if shuffle else 2)),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=False,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        collate_fn=SeededCollate(collate_fn, seed, rank),
    )


def train_sampler(trainer: Any) -> ResumableSampler | None:
    """The :class:`ResumableSampler` of the trainer's training data loader, if it has one."""
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    for dl in getattr(loader, "flattened", []) or []:
        sampler = getattr(dl, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            return sampler
    return None


def data_position(trainer: Any) -> dict[str, int] | None:
    """Where training is in the data, from the trainer's progress: ``{"epoch", "batches"}``.

    ``batches`` counts the batches of ``epoch`` whose training step has run (Lightning's
    ``batch_progress.current.processed``); a finished epoch is reported as the next epoch at batch 0.
    """
    if trainer is None or getattr(trainer, "fit_loop", None) is None:
        return None
    sampler = train_sampler(trainer)
    if sampler is None:
        return None
    consumed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    epoch = int(sampler.epoch)
    total = trainer.num_training_batches
    if total != float("inf") and consumed >= int(total):
        epoch, consumed = epoch + 1, 0
    return {"epoch": epoch, "batches": consumed, "world_size": int(trainer.world_size)}


def resume_position(state: dict[str, Any] | None) -> tuple[int, int] | None:
    """The ``(epoch, batches)`` to resume the sampler at, from a saved :func:`data_position`."""
    if not state or os.environ.get(DISABLE_DATA_RESUME_ENV) == "1":
        return None
    return int(state["epoch"]), int(state["batches"])


# -- RNG states as plain data ------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's torch/numpy/python RNG states as tensors, lists and ints (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.random.default_generator.get_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    torch.random.default_generator.set_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- what each rank saw ------------------------------------------------------------------------------
class StepLog(Callback):
    """Writes, per rank, one JSON line per training step: the rows it trained on and its loss.

    ``<default_root_dir>/steps/rank-<r>.jsonl``, appended to (a resumed run continues the file):
    ``{"step": 1-based optimizer step, "epoch", "batch": index in the epoch, "rows": [row indices],
    "loss": float.hex() of the loss}``. Add it with ``trainer.callbacks: [{class_path:
    lmforge.reliability.StepLog}]``; it is how the tests compare an uninterrupted and a resumed run.

    Args:
        dirname: Sub-directory of the run directory that holds the files.
    """

    def __init__(self, dirname: str = "steps") -> None:
        self.dirname = dirname
        self._rows: list[int] | None = None

    def path(self, trainer: Any) -> Path:
        return Path(trainer.default_root_dir) / self.dirname / f"rank-{trainer.global_rank}.jsonl"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sampler = train_sampler(trainer)
        self._rows = sampler.pop_batch() if sampler is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        record = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batch": int(batch_idx),
            "rows": self._rows,
            "loss": float(loss).hex() if loss is not None else None,
        }
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_step_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a :class:`StepLog` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
