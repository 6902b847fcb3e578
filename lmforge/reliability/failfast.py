"""Checks that run before anything is written: output writable, resume checkpoint valid and fitting.

:func:`check_output_writable` refuses a run directory that cannot be written (a read-only mount, an
immutable directory, missing permissions), before the data is prepared or any file is created.

:func:`prepare_trainer_call` turns the ``--ckpt_path`` of ``fit | validate | test | predict`` into a
verified committed checkpoint (``last`` = the newest committed checkpoint of the run directory,
none yet meaning a fresh start; ``best`` = its ``best-step*.ckpt``), makes Lightning load it with
``weights_only=True``, and loads it once (``weights_only``, memory-mapped) to compare its tensors
with the model's (names and shapes listed on a mismatch) — all before Lightning writes the config,
the metrics log or anything else into the run directory.
"""

from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lmforge.errors import LmforgeError
from lmforge.reliability.checkpoint_io import (
    STEP_PREFIX,
    newest_checkpoint,
    read_manifest,
    resolve_checkpoint,
    safe_load,
)


def check_output_writable(root: Path) -> None:
    """Raise :class:`LmforgeError` unless the run directory (or where it would be created) is writable."""
    root = Path(root).absolute()
    targets = [root, root / "checkpoints"] if root.exists() else []
    if not targets:
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        targets = [parent]
    for target in targets:
        if target.exists() and not os.access(target, os.W_OK | os.X_OK):
            raise LmforgeError(
                f"The run directory {root} cannot be written: {target} is read-only for this process (a read-only "
                "file system, an immutable directory or missing permissions). Choose a writable "
                "--trainer.default_root_dir or fix the permissions; nothing was prepared or written."
            )


def _resolve_last(root: Path, subcommand: str) -> str | None:
    """The newest committed checkpoint of the run in ``root``. None only for ``fit`` (a first run starts
    from the beginning); ``validate``/``test``/``predict`` of untrained weights are refused."""
    checkpoints = root / "checkpoints"
    newest = newest_checkpoint(checkpoints)
    if newest is not None:
        return str(resolve_checkpoint(newest))
    leftovers = sorted(p.name for p in checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else []
    if leftovers:
        raise LmforgeError(
            f"`--ckpt_path last`: {checkpoints} holds {', '.join(leftovers[:3])} but no committed checkpoint "
            f"({STEP_PREFIX}*/MANIFEST.json), so there is nothing lmforge can resume safely. Name a checkpoint "
            "directory with --ckpt_path, or start a new run in another --trainer.default_root_dir."
        )
    if subcommand != "fit":
        raise LmforgeError(
            f"`lmforge {subcommand} --ckpt_path last`: the run in {root} has no committed checkpoint "
            f"({checkpoints} holds no {STEP_PREFIX}*/MANIFEST.json), so there are no trained weights to {subcommand}. "
            "Train it first with `lmforge fit` and the same config, set --trainer.default_root_dir to the run "
            "that holds them, or name a checkpoint with --ckpt_path."
        )
    return None


def check_input_length(model: Any, datamodule: Any) -> None:
    """Refuse data rows longer than the architecture accepts, before anything is written (a learned
    position table would otherwise fail at the first forward pass, after the run directory exists)."""
    architecture = getattr(model, "architecture", None)
    limit = architecture.max_positions() if hasattr(architecture, "max_positions") else None
    if limit is None:
        return
    for option in ("block_size", "max_length"):
        length = getattr(datamodule, option, None)
        if isinstance(length, int) and length > limit:
            raise LmforgeError(
                f"data.{option} is {length} tokens, but the {type(architecture).__name__} architecture accepts at most "
                f"{limit} positions (model.architecture.block_size, with learned position embeddings). Lower "
                f"data.{option} to {limit} or less, or build the model for longer inputs (a larger "
                "model.architecture.block_size, or position: rotary, which has no table); nothing was written."
            )


def best_pointer(root: Path, subcommand: str) -> Path:
    """``--ckpt_path best``: the run's ``best-step*.ckpt`` pointer (the checkpoint with the lowest
    ``val/loss``; Lightning's own ``best`` only knows the fit of the same process)."""
    checkpoints = root / "checkpoints"
    pointers = sorted(checkpoints.glob("best-step*.ckpt")) if checkpoints.is_dir() else []
    if len(pointers) == 1:
        return pointers[0]
    if pointers:
        raise LmforgeError(
            f"`lmforge {subcommand} --ckpt_path best`: {checkpoints} holds {len(pointers)} best checkpoints "
            f"({', '.join(p.name for p in pointers[:4])}), so which one is meant is unclear. Name one with --ckpt_path."
        )
    raise LmforgeError(
        f"`lmforge {subcommand} --ckpt_path best`: {checkpoints} holds no best-step*.ckpt. A run saves one when it "
        "validates (the checkpoint with the lowest val/loss), so give it validation data (data.val_files) and let it "
        "reach a validation, or use --ckpt_path last (the newest checkpoint)."
    )


def prepare_trainer_call(
    subcommand: str, fn_kwargs: dict[str, Any], trainer: Any, model: Any, datamodule: Any = None
) -> dict[str, Any]:
    """Resolve and check ``ckpt_path`` and set ``weights_only`` for a Trainer call (see the module docs)."""
    method = getattr(trainer, subcommand, None)
    accepts = method is not None and "weights_only" in inspect.signature(method).parameters  # Lightning >= 2.5
    if accepts and fn_kwargs.get("weights_only") is None:
        fn_kwargs["weights_only"] = True
    ckpt_path = fn_kwargs.get("ckpt_path")
    if not ckpt_path and subcommand != "fit":
        _check_has_weights(subcommand, model, Path(trainer.default_root_dir))
    if not ckpt_path or ckpt_path == "hpc" or str(ckpt_path).startswith("registry:"):
        return fn_kwargs
    root = Path(trainer.default_root_dir)
    resolved = resolve_ckpt_path(ckpt_path, root, subcommand)
    if resolved is None:
        rank_zero_info(f"`--ckpt_path last`: no checkpoint in {root / 'checkpoints'} yet; training starts from the beginning.")
    fn_kwargs["ckpt_path"] = resolved
    if resolved is not None and model is not None:
        saved = check_checkpoint_fits(Path(resolved), model, datamodule)
        if subcommand == "fit":
            _warn_if_data_changed(saved, datamodule)
    if resolved is not None and subcommand == "fit":
        _warn_if_nothing_to_train(Path(resolved), trainer)
    return fn_kwargs


def resolve_ckpt_path(ckpt_path: str, root: Path, subcommand: str) -> str | None:
    """``--ckpt_path`` of a trainer command as a checkpoint file: ``last`` (the newest committed
    checkpoint of ``root``; None for a first ``fit``), ``best`` (its best-step pointer) or a path."""
    if ckpt_path == "last":
        return _resolve_last(root, subcommand)
    if ckpt_path == "best":
        return str(resolve_checkpoint(best_pointer(root, subcommand)))
    return str(resolve_checkpoint(ckpt_path))


def load_checkpoint_state(file: Path) -> dict[str, Any]:
    """A checkpoint's dictionary, memory-mapped and ``weights_only`` (a ZeRO checkpoint's client state)."""
    if Path(file).is_dir():
        from lmforge.zero_checkpoint import read_client_state

        return read_client_state(file)
    checkpoint = safe_load(file, mmap=True)
    return checkpoint if isinstance(checkpoint, dict) else {}


def _check_has_weights(subcommand: str, model: Any, root: Path) -> None:
    """validate/test/predict without --ckpt_path would use a freshly initialised model: refuse, unless
    the model starts from saved weights (``model.init_from``) and has no task head of its own (a head
    is always new, so only a checkpoint holds trained head weights)."""
    task = getattr(model, "task", None)
    has_head = isinstance(task, torch.nn.Module) and any(True for _ in task.parameters())
    if getattr(model, "hparams", {}).get("init_from") and not has_head:
        return
    has_run = (root / "checkpoints").is_dir()
    alternative = (
        f"; model.init_from loads only the backbone, and the '{task.name}' head is trained only in a checkpoint"
        if has_head else "; or set model.init_from to start from saved architecture weights (an lmforge checkpoint "
        "or run, or a Hugging Face model folder)"
    )
    raise LmforgeError(
        f"`lmforge {subcommand}` got no weights to use: without --ckpt_path it would run a freshly initialised "
        f"model. Pass --ckpt_path last (the newest checkpoint{f' of {root}' if has_run else ' of the run directory'}), "
        f"--ckpt_path best (the lowest val/loss), or the path of a checkpoint{alternative}."
    )


#: Data options that do not change which rows training sees, or in what order (the tokenizer's
#: contents are compared on their own, in _check_same_run_kind; val_files only by being set or not).
_DATA_OPTIONS_OUTSIDE_TRAINING = {"test_files", "predict_files", "num_workers", "cache_dir", "tokenizer"}


def _warn_if_data_changed(saved: dict[str, Any], datamodule: Any) -> None:
    """A resume with other data options than the checkpoint's run continues, but not exactly: say which."""
    before, now = saved.get("datamodule_hyper_parameters"), getattr(datamodule, "hparams", None)
    if not isinstance(before, dict) or not now:
        return
    ignored = set(_DATA_OPTIONS_OUTSIDE_TRAINING)
    if "val_files" in before and (before["val_files"] is None) == (now.get("val_files") is None):
        ignored.add("val_files")  # other validation files: the training rows stay the same
        if before["val_files"] is not None:
            ignored.add("val_fraction")  # the share held out of the training files, used only without val_files
    changed = [
        f"data.{name} {_short(before.get(name))} -> {_short(now.get(name))}"
        for name in sorted(set(before) | set(now))
        if not name.startswith("_") and name not in ignored and before.get(name) != now.get(name)
    ]
    if changed:
        rank_zero_warn(
            f"Resuming with other data options than the checkpoint's run: {', '.join(changed)}. Training goes on "
            "from the checkpoint's step and as many batches into its epoch, but over rows arranged differently, so "
            "it does not continue that run exactly. That is fine for a deliberate change; to continue exactly, "
            "resume with the run's own data options (its config.yaml, or the newest config.<time>.yaml beside it)."
        )


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, its middle left out when long (a path keeps its file name)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 3]}...{text[-(limit - limit // 3 - 3):]}"


def _warn_if_nothing_to_train(checkpoint: Path, trainer: Any) -> None:
    """A resume whose checkpoint is already at (or past) ``trainer.max_steps`` trains nothing: say so."""
    manifest = read_manifest(checkpoint.parent) or {}
    step, max_steps = manifest.get("step"), getattr(trainer, "max_steps", -1)
    if isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step:
        rank_zero_warn(
            f"The checkpoint is at step {step} and trainer.max_steps is {max_steps}: this fit trains nothing. Raise "
            "--trainer.max_steps to train further."
        )


def check_checkpoint_fits(file: Path, model: Any, datamodule: Any = None) -> dict[str, Any]:
    """Refuse a checkpoint of another model, tokenizer or task head (from its plain-data metadata),
    then compare its tensors with ``model``'s (``weights_only``, memory-mapped).

    Returns the checkpoint's dictionary (a ZeRO checkpoint's client state), for further checks.
    """
    from lmforge.families.base import check_same_shapes

    checkpoint = load_checkpoint_state(file)
    _check_same_run_kind(file, checkpoint.get("lmforge") or {}, model, datamodule)
    if Path(file).is_dir():  # a DeepSpeed ZeRO checkpoint: shards, with the parameter shapes recorded
        from lmforge.zero_checkpoint import check_zero_checkpoint_fits

        check_zero_checkpoint_fits(file, model)
    elif isinstance(checkpoint.get("state_dict"), dict):
        check_same_shapes(model.state_dict(), checkpoint["state_dict"])
    return checkpoint


def _check_same_run_kind(file: Path, meta: dict[str, Any], model: Any, datamodule: Any) -> None:
    """The checkpoint's family and architecture, tokenizer and task head options against this run's."""
    if not meta or not hasattr(model, "lmforge_metadata"):
        return
    mine = model.lmforge_metadata()
    saved_arch, my_arch = meta.get("architecture") or {}, mine.get("architecture") or {}
    if (meta.get("family"), saved_arch.get("name")) != (mine.get("family"), my_arch.get("name")):
        raise LmforgeError(
            f"The checkpoint {file} holds a {meta.get('family')} model with the '{saved_arch.get('name')}' "
            f"architecture, but the config builds a {mine.get('family')} model with '{my_arch.get('name')}'. Give "
            "the config of the run that wrote the checkpoint (its config.yaml), or a checkpoint of this model."
        )
    tokenizer = getattr(datamodule, "tokenizer", None)
    saved_tokenizer = meta.get("tokenizer_json")
    if saved_tokenizer and hasattr(tokenizer, "to_str") and tokenizer.to_str() != saved_tokenizer:
        where = getattr(datamodule, "tokenizer_path", "data.tokenizer")
        raise LmforgeError(
            f"The checkpoint {file} was trained with another tokenizer than data.tokenizer ({where}), so its token "
            "ids would stand for other text. Point data.tokenizer at the tokenizer the run was trained with (its "
            "config.yaml names it; `lmforge convert lmforge-to-hf` also writes it out as tokenizer.json)."
        )
    task = getattr(model, "task", None)
    saved_task = meta.get("task") or {}
    if task is None or not saved_task or saved_task.get("name") != task.name:
        return
    saved_options, my_options = saved_task.get("init_args") or {}, (mine.get("task") or {}).get("init_args") or {}
    for option in type(task).weight_options:
        if option in saved_options and my_options.get(option) not in (None, saved_options[option]):
            raise LmforgeError(
                f"The checkpoint {file} trained the '{task.name}' head with {option}={saved_options[option]!r}, but "
                f"the config sets {option}={my_options[option]!r}; the head's weights mean nothing under another "
                f"value. Leave model.task.init_args.{option} out (it is read from the checkpoint) or set it to "
                f"{saved_options[option]!r}."
            )


def warn_uncommitted_checkpoints(callbacks: list[Any]) -> None:
    """Warn about a plain Lightning ``ModelCheckpoint``: its files are not committed checkpoints."""
    if any(type(c) is ModelCheckpoint for c in callbacks):
        rank_zero_warn(
            "trainer.callbacks holds Lightning's ModelCheckpoint: its files are written atomically but are not "
            "committed checkpoints (no manifest), so lmforge will not resume from them. Use class_path: "
            "lmforge.reliability.CommittedCheckpoint, which takes the same options."
        )


#: The open lock file of the run this process is fitting (released when the command ends).
_run_lock: Any = None


def lock_run_directory(root: Path) -> None:
    """Hold an exclusive lock on ``root/.lmforge.lock`` while this process fits into ``root``.

    Two fits started at once into one run directory would interleave their checkpoints and
    metrics; the second is refused instead. The lock is a POSIX record lock (``lockf``): the kernel
    drops it when the process dies, so a crashed or killed run never leaves a stale lock, and
    unlike ``flock`` it is not inherited by forked data-loader workers, which may outlive a killed
    run by seconds. Called by global rank 0 only (the other ranks of the same run write into the
    same directory); a file system without locks runs unlocked.
    """
    global _run_lock
    if _run_lock is not None:
        return
    import fcntl

    handle = open(root / ".lmforge.lock", "a+")  # noqa: SIM115 - held for the whole command
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LmforgeError(
            f"Another `lmforge fit` ({holder}) is writing to the run directory {root} right now. Wait for it to "
            "end, or start this run with a different --trainer.default_root_dir; nothing was changed."
        ) from None
    except OSError:  # no locks on this file system: run unlocked
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _run_lock = handle


def release_run_directory() -> None:
    """Release the lock :func:`lock_run_directory` took (a no-op when none is held)."""
    global _run_lock
    if _run_lock is not None:
        _run_lock.close()  # closing the file releases the lock
        _run_lock = None
