"""Committed checkpoints: a checkpoint is either complete and verified, or it does not exist.

Layout of ``<run>/checkpoints/``::

    step-00000006/          a committed checkpoint (a directory, never modified once committed)
      model.ckpt            the Lightning checkpoint (weights, optimizer, loops, metadata), rank 0
      rank-0.pt rank-1.pt   what is private to each rank (its RNG states)
      MANIFEST.json         written last: every file with its size and sha256, the step, the world
                            size, a hash of the model and data configuration, the plugin versions
    last.ckpt -> step-00000006/model.ckpt        pointers: relative symbolic links
    best-step6.ckpt -> step-00000006/model.ckpt

Saving (:func:`commit_checkpoint`, all ranks): every rank writes its files into the same hidden
temporary directory ``.tmp-step-…``, each file fsynced; a barrier; rank 0 writes the manifest last
(fsynced), renames the directory to ``step-…`` in one atomic ``rename`` and fsyncs the parent; the
``last`` pointer is then replaced atomically (a new symlink renamed over the old one). A process
killed at any point leaves either the previous committed checkpoints or a new complete one, plus at
most a hidden temporary directory that is never read and is removed at the next start.

Loading (:func:`resolve_checkpoint`): a checkpoint is loaded only from a directory with a manifest
whose files all have the recorded size and sha256; a missing or unreadable manifest means "not a
checkpoint", a mismatch is an error naming the file. ``last`` means the newest committed checkpoint
(by commit sequence), whatever the pointer says, so a crash between the commit and the pointer
update loses nothing. Every ``torch.load`` uses ``weights_only=True``.

Retention (:func:`apply_retention`) deletes committed checkpoints no pointer refers to, but never the
newest committed one nor the one the run resumed from.

Test hook: ``LMFORGE_CHECKPOINT_FAULT=<point>[:<n>]`` makes the process SIGKILL itself at the named
point of its ``n``-th commit (default 1): ``before-write`` (temporary directory made, nothing
written), ``mid-file`` (part of ``model.ckpt`` written), ``before-commit`` (all files and the
manifest written, not renamed), ``before-pointer`` (renamed, the ``last`` pointer not updated).
``<point>:<n>:enospc`` raises the full disk's ``OSError`` there instead.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lmforge.errors import LmforgeError, in_chain

log = logging.getLogger("lmforge.reliability")

MANIFEST = "MANIFEST.json"
MODEL_FILE = "model.ckpt"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 1
#: Key of the per-rank part of a checkpoint dict (written to ``rank-<r>.pt``, not ``model.ckpt``).
RANK_STATE_KEY = "lmforge_rank_state"
#: Test hook (see the module docs).
FAULT_ENV = "LMFORGE_CHECKPOINT_FAULT"
FAULT_POINTS = ("before-write", "mid-file", "before-commit", "before-pointer")

_commits_started = 0
#: path -> (size, sha256) of files this process wrote and hashed while writing.
_written: dict[str, tuple[int, str]] = {}
#: (path, size, mtime_ns) of manifests verified by this process.
_verified: set[tuple[str, int, int]] = set()


# -- test hook ---------------------------------------------------------------------------------------
def _armed_fault(point: str) -> str | None:
    """The fault (``kill`` or ``enospc``) the test hook arms at ``point`` of this commit, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    name, nth, action = (spec.split(":") + ["", ""])[:3]
    return (action or "kill") if name == point and _commits_started == int(nth or 1) else None


def _fault(point: str) -> None:
    action = _armed_fault(point)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{FAULT_ENV} at {point}")
    if action is not None:
        log.warning("%s=%s: killing this process (SIGKILL) at '%s'", FAULT_ENV, os.environ[FAULT_ENV], point)
        os.kill(os.getpid(), signal.SIGKILL)


# -- durable, hashed writes --------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A binary file that hashes what is written through it (and can fault mid-file)."""

    def __init__(self, file, fault_mid_file: bool) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.fault_mid_file = fault_mid_file

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self.file.write(view)
        self.sha256.update(view)
        self.size += len(view)
        if self.fault_mid_file and self.size > 0:
            self.file.flush()
            os.fsync(self.file.fileno())
            _fault("mid-file")
        return written

    def flush(self) -> None:
        self.file.flush()


def write_file(path: Path, write: Callable[[Any], None], fault_mid_file: bool = False) -> tuple[int, str]:
    """Write ``path`` through ``write(file)`` atomically and durably; return its (size, sha256)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            writer = _HashingWriter(f, fault_mid_file)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    result = (writer.size, writer.sha256.hexdigest())
    _written[str(path)] = result
    return result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- manifests ---------------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a committed checkpoint directory, or ``None`` if it has no valid one."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file of a committed checkpoint against its manifest; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise LmforgeError(
            f"{directory} is not a committed lmforge checkpoint: it has no valid {MANIFEST} (a checkpoint whose "
            "save was interrupted has none, and is never loaded). Resume with `--ckpt_path last` (the newest "
            "committed checkpoint of the run) or name a checkpoints/step-* directory."
        )
    stat = (directory / MANIFEST).stat()
    if (str(directory.resolve()), stat.st_size, stat.st_mtime_ns) in _verified:
        return manifest
    for name, entry in sorted(manifest["files"].items()):
        file = directory / name
        if not file.is_file():
            raise LmforgeError(
                f"The checkpoint {directory} is damaged: its file {file} is missing (the manifest lists it). "
                "Resume from another checkpoint of the run (checkpoints/step-*)."
            )
        size = file.stat().st_size
        if size != entry["size"] or file_sha256(file) != entry["sha256"]:
            raise LmforgeError(
                f"The checkpoint file {file} is corrupt: its "
                f"{'size' if size != entry['size'] else 'sha256'} differs from the one recorded in "
                f"{directory / MANIFEST} when it was saved. Restore the file from a copy, or resume from another "
                "checkpoint of the run (checkpoints/step-*); lmforge does not load it."
            )
    _verified.add((str(directory.resolve()), stat.st_size, stat.st_mtime_ns))
    return manifest


def committed_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """``(sequence, directory, manifest)`` of the committed checkpoints in a directory, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        if entry.name.startswith(STEP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            manifest = read_manifest(entry)
            if manifest is not None:
                found.append((int(manifest.get("sequence", 0)), entry, manifest))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def newest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest committed checkpoint directory (by commit sequence), or ``None``."""
    found = committed_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def _checkpoints_dir_of(path: Path) -> Path | None:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if any(p.name.startswith(STEP_PREFIX) for p in path.iterdir()) or (path / "last.ckpt").is_symlink():
        return path
    return None


def resolve_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """The verified ``model.ckpt`` behind a path.

    ``path`` may be a run directory or its ``checkpoints/`` directory (the newest committed
    checkpoint), a committed ``step-*`` directory, a pointer such as ``checkpoints/last.ckpt``, or
    the ``model.ckpt`` of a committed directory. Anything else is refused.
    """
    path = Path(path)
    if path.is_dir():
        if path.resolve().name == MODEL_FILE and (path.resolve().parent / MANIFEST).exists():
            directory = path.resolve().parent  # a DeepSpeed checkpoint (model.ckpt is a directory of shards)
        elif (path / MANIFEST).exists() or path.name.startswith(STEP_PREFIX):
            directory = path
        else:
            checkpoints = _checkpoints_dir_of(path)
            directory = newest_checkpoint(checkpoints) if checkpoints is not None else None
            if directory is None:
                raise LmforgeError(
                    f"No committed checkpoint in {path}: it is neither a run directory with checkpoints "
                    "(checkpoints/step-*/MANIFEST.json) nor a model folder (lmforge.json + model.safetensors)."
                )
    elif path.is_file():
        directory = path.resolve().parent
        if read_manifest(directory) is None:
            raise LmforgeError(
                f"{path} is not part of a committed lmforge checkpoint (no valid {MANIFEST} beside "
                f"{path.resolve()}), so it is not loaded: it may be a partial write or a copy taken out of its "
                "checkpoint directory. Pass the run directory, its checkpoints/step-* directory, or "
                "checkpoints/last.ckpt."
            )
    elif path.is_symlink():
        raise LmforgeError(f"{path} points to {os.readlink(path)}, which does not exist.")
    else:
        raise LmforgeError(f"{path} does not exist. Pass a run directory, a checkpoint directory or a .ckpt file.")
    if verify:
        verify_checkpoint(directory)
    elif read_manifest(directory) is None:
        verify_checkpoint(directory)  # raises the "not committed" error
    return directory / MODEL_FILE


def safe_load(file: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)``, with a refusal sentence instead of an unpickling traceback.

    Every lmforge checkpoint read goes through here so that a corrupt, truncated or foreign (pickled
    code) file gets the same one-paragraph explanation wherever it is read.
    """
    try:
        return torch.load(file, map_location=map_location or "cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # torch's weights_only refusal: the file pickles code or classes
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(exc))
        raise LmforgeError(
            f"Cannot load checkpoint {file}: it holds objects other than tensors and plain data"
            f"{f' ({found.group(1)})' if found else ''}. lmforge loads checkpoints with torch.load(weights_only=True) "
            "and never unpickles code, so a checkpoint it did not write is refused."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a file torch cannot read at all
        if not zipfile.is_zipfile(file):  # (torch's own words then are about mmap or pickle protocols)
            reason = "the file is empty" if os.path.getsize(file) == 0 else "not the zip archive torch.save writes"
        else:
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0].rstrip(".")
        raise LmforgeError(
            f"Cannot load checkpoint {file}: it is not a complete PyTorch checkpoint ({reason}). It was cut short "
            "(a copy or save that did not finish), damaged, or is another kind of file. Restore it from a copy, or "
            "pass another checkpoint of the run (its checkpoints/step-* directories)."
        ) from None


def load_rank_state(model_file: Path, rank: int) -> dict[str, Any] | None:
    """The per-rank part of a committed checkpoint for ``rank``, or ``None`` if it has none."""
    file = Path(model_file).parent / f"rank-{rank}.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


# -- the CheckpointIO plugin -------------------------------------------------------------------------
class CommittedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for lmforge: atomic fsynced writes, verified ``weights_only`` loads.

    ``save_checkpoint`` writes one file atomically (temporary file, fsync, rename, fsync of the
    directory). ``load_checkpoint`` accepts only committed checkpoints (see
    :func:`resolve_checkpoint`), loads with ``weights_only=True`` whatever it is asked, and adds this
    rank's ``rank-<r>.pt`` to the dict under :data:`RANK_STATE_KEY`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("lmforge's checkpoint I/O takes no storage_options")
        write_file(Path(path), lambda f: torch.save(checkpoint, f), fault_mid_file=_in_commit and _armed_fault("mid-file") is not None)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        file = resolve_checkpoint(path)
        checkpoint = safe_load(file, map_location)
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if isinstance(checkpoint, dict):
            own = load_rank_state(file, rank)
            if own is not None:
                checkpoint[RANK_STATE_KEY] = own.get("state")
            elif rank != 0:
                checkpoint.pop(RANK_STATE_KEY, None)  # rank 0's, not ours
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


_in_commit = False


# -- committing --------------------------------------------------------------------------------------
def _config_sha256(checkpoint: dict[str, Any]) -> str:
    described = {k: checkpoint.get(k) for k in ("hyper_parameters", "datamodule_hyper_parameters")}
    meta = checkpoint.get("lmforge") or {}
    described["lmforge"] = {k: v for k, v in meta.items() if k != "tokenizer_json"}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _unique_final(checkpoints_dir: Path, step: int) -> Path:
    final = checkpoints_dir / f"{STEP_PREFIX}{step:08d}"
    n = 1
    while final.exists():
        final = checkpoints_dir / f"{STEP_PREFIX}{step:08d}-{n}"
        n += 1
    return final


def commit_checkpoint(trainer: Any, checkpoints_dir: Path, weights_only: bool = False) -> Path:
    """Save the trainer's state as a new committed checkpoint directory (all ranks call this)."""
    global _commits_started, _in_commit
    strategy = trainer.strategy
    checkpoints_dir = Path(checkpoints_dir)
    step = int(trainer.global_step)
    token = strategy.broadcast(uuid.uuid4().hex[:12])
    tmp = checkpoints_dir / f"{TMP_PREFIX}{STEP_PREFIX}{step:08d}-{token}"
    _commits_started += 1
    try:
        if trainer.is_global_zero:
            tmp.mkdir(parents=True)
        strategy.barrier("lmforge-commit-start")
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only)
        rank_state = checkpoint.pop(RANK_STATE_KEY, None)
        _fault("before-write")
        _in_commit = True
        try:
            strategy.save_checkpoint(checkpoint, tmp / MODEL_FILE)
        finally:
            _in_commit = False
        rank = int(trainer.global_rank)
        state = {"rank": rank, "world_size": int(trainer.world_size), "state": rank_state}
        write_file(tmp / f"rank-{rank}.pt", lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as exc:  # a full disk, a quota, a file system gone read-only
        cause = in_chain(exc, lambda e: isinstance(e, OSError))  # torch.save wraps it in a RuntimeError
        if cause is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial save took
        raise _save_failed(step, checkpoints_dir, cause) from None
    strategy.barrier("lmforge-commit-written")
    final = tmp
    if trainer.is_global_zero:
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = file.relative_to(tmp).as_posix()
            size = file.stat().st_size
            recorded = _written.pop(str(file), None)
            sha = recorded[1] if recorded is not None and recorded[0] == size else file_sha256(file)
            files[name] = {"size": size, "sha256": sha}
        existing = committed_checkpoints(checkpoints_dir)
        meta = checkpoint.get("lmforge") or {}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "sequence": (existing[-1][0] + 1) if existing else 1,
            "step": step,
            "epoch": int(checkpoint.get("epoch", trainer.current_epoch)),
            "world_size": int(trainer.world_size),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config_sha256": _config_sha256(checkpoint),
            "lmforge_version": meta.get("lmforge_version"),
            "plugins": meta.get("plugins", []),
            "files": files,
        }
        write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))
        _fault("before-commit")
        final = _unique_final(checkpoints_dir, step)
        os.rename(tmp, final)
        fsync_dir(checkpoints_dir)
        _fault("before-pointer")
    final = Path(strategy.broadcast(str(final)))
    return final


def _save_failed(step: int, checkpoints_dir: Path, exc: OSError) -> LmforgeError:
    """The error for a save the file system refused: what failed, and that nothing committed was lost."""
    newest = newest_checkpoint(checkpoints_dir)
    kept = (f"the newest committed checkpoint, {newest}, is intact and `--ckpt_path last` resumes from it"
            if newest is not None else "no checkpoint of this run had been committed yet")
    where = f" ({exc.filename})" if exc.filename else ""
    return LmforgeError(
        f"Saving the checkpoint of step {step} failed: {exc.strerror or exc}{where}. The partial save was removed and "
        f"{kept}. Free space on that file system (or fix it), then run the same command with --ckpt_path last."
    )


def point(pointer: Path, target: Path) -> None:
    """Make ``pointer`` a relative symlink to ``target``, replacing it atomically."""
    pointer = Path(pointer)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(os.path.relpath(target, pointer.parent), tmp)
    if pointer.is_dir() and not pointer.is_symlink():
        shutil.rmtree(pointer)
    os.replace(tmp, pointer)
    fsync_dir(pointer.parent)


def pointer_targets(checkpoints_dir: Path) -> dict[Path, Path]:
    """pointer -> the committed directory it refers to, for every ``*.ckpt`` symlink in the directory."""
    targets = {}
    for entry in Path(checkpoints_dir).glob("*.ckpt"):
        if entry.is_symlink():
            target = entry.resolve()
            targets[entry] = target.parent if target.name == MODEL_FILE else target
    return targets


def apply_retention(checkpoints_dir: Path, protect: set[Path] = frozenset(), keep_newest: int = 1) -> list[Path]:
    """Delete committed checkpoints that no pointer refers to; return what was deleted.

    Never deleted: the ``keep_newest`` newest committed checkpoints, those in ``protect`` (the one the
    run resumed from) and those a pointer refers to.
    """
    committed = committed_checkpoints(checkpoints_dir)
    keep = {p.resolve() for p in protect}
    keep |= {d.resolve() for d in pointer_targets(checkpoints_dir).values()}
    keep |= {d.resolve() for _, d, _ in committed[-max(1, keep_newest):]}
    removed = []
    for _, directory, _ in committed:
        if directory.resolve() not in keep:
            trash = directory.with_name(f"{TRASH_PREFIX}{directory.name}-{uuid.uuid4().hex[:8]}")
            os.rename(directory, trash)  # atomically out of sight, then deleted
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(directory)
    return removed


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Remove temporary directories and files of interrupted saves (only ever called at startup)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return
    for entry in checkpoints_dir.iterdir():
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


class CommittedCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose saves are committed checkpoints (see the module docs).

    ``last.ckpt`` and ``best-stepN.ckpt`` become pointers to ``step-*`` directories; a step saved
    under two names is written once. Takes ModelCheckpoint's arguments, plus:

    Args:
        keep_newest: How many of the newest committed checkpoints retention keeps besides those a
            pointer refers to and the one the run resumed from.
    """

    def __init__(self, *args: Any, keep_newest: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self.keep_newest = keep_newest
        self._committed: tuple[int, Path] | None = None
        self._own_commits: set[Path] = set()  # the committed directories this run wrote
        self._final_loops: tuple[int, int, dict] | None = None  # (step, epoch, fit-loop state) ending training
        self._saving_at_train_end = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit" and self.dirpath:
            remove_leftovers(Path(self.dirpath))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 <= trainer.max_steps <= trainer.global_step or trainer.should_stop:
            # The loop state of the step that ends training, in mid-epoch (see on_save_checkpoint).
            self._final_loops = (trainer.global_step, trainer.current_epoch, copy.deepcopy(trainer.fit_loop.state_dict()))

    def on_train_end(self, trainer, pl_module) -> None:
        """The state training ended with is always committed (Lightning's only when nothing was saved yet)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._saving_at_train_end = True
            try:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            finally:
                self._saving_at_train_end = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """A save at the end of training records the loop state of its last step.

        When ``max_steps`` (or a callback's stop) ends training in mid-epoch, Lightning marks the
        epoch completed before ``on_train_end``; a checkpoint saved then would make a resume with a
        larger ``max_steps`` start the next epoch, skipping the rest of this one. The loop state
        taken at the last step's ``on_train_batch_end`` is what a save at that moment would hold
        (the data position is read from the same progress counters).
        """
        final = self._final_loops
        if self._saving_at_train_end and final is not None and final[0] == trainer.global_step:
            checkpoint["epoch"] = final[1]
            checkpoint.setdefault("loops", {})["fit_loop"] = copy.deepcopy(final[2])

    def commit(self, trainer) -> Path:
        """A committed checkpoint of the current step (written once per step)."""
        step = int(trainer.global_step)
        if self._committed is None or self._committed[0] != step or not self._committed[1].is_dir():
            self._committed = (step, commit_checkpoint(trainer, Path(self.dirpath), self.save_weights_only))
            self._own_commits.add(self._committed[1].resolve())
        return self._committed[1]

    def save_last_now(self, trainer) -> Path:
        """Commit the current step and point ``last`` at it (the preemption save)."""
        directory = self.commit(trainer)
        last = Path(self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST))
        self.last_model_path = str(last)
        self._save_checkpoint(trainer, str(last))
        return directory

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        directory = self.commit(trainer)
        if trainer.is_global_zero:
            point(Path(filepath), directory / MODEL_FILE)
            self._retain(trainer)
        trainer.strategy.barrier("lmforge-pointer")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            path = Path(filepath)
            if path.is_symlink():
                path.unlink()
            self._retain(trainer)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        return previous != current  # only a pointer goes; retention decides about directories

    def _retain(self, trainer) -> None:
        protect = set()
        if trainer.ckpt_path:
            resumed = Path(trainer.ckpt_path).resolve()
            resumed = resumed.parent if resumed.name == MODEL_FILE else resumed
            protect.add(resumed)
            # A run resumed from an older checkpoint never deletes the later ones of the line it left
            # (the weights a user stepped back from); only its own commits are subject to retention.
            committed = committed_checkpoints(Path(self.dirpath))
            steps = {d.resolve(): m.get("step", -1) for _, d, m in committed}
            resumed_step = steps.get(resumed, float("inf"))
            protect |= {d for d, step in steps.items() if step > resumed_step and d not in self._own_commits}
        apply_retention(Path(self.dirpath), protect=protect, keep_newest=self.keep_newest)

    def file_exists(self, filepath, trainer) -> bool:
        return trainer.strategy.reduce_boolean_decision(os.path.lexists(filepath) if trainer.is_global_zero else False, all=False)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        newest = newest_checkpoint(Path(self.dirpath)) if self.dirpath else None
        return {str(newest / MODEL_FILE)} if newest is not None else set()
