"""Files that ``lmforge predict`` and ``lmforge generate`` write: never over something already there.

An output path that exists is refused unless the user passes ``--overwrite``; a path that is one of
the command's own inputs, or an existing checkpoint or run file (followed through symlinks such as
``checkpoints/last.ckpt``), is refused even then. The files are written beside their target and
renamed into place at the end, so a failed command leaves the old file as it was.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterable
from pathlib import Path

from lmforge.errors import LmforgeError

#: Existing files an output must never replace: weights, checkpoints and what a run directory holds.
_PROTECTED_SUFFIXES = (".ckpt", ".pt", ".safetensors", ".bin")
_RUN_FILES = (".lmforge.lock", "config.yaml", "hparams.yaml", "plugins.json", "labels.json", "metrics.csv",
              "metrics.validate.csv", "metrics.test.csv", "MANIFEST.json", "tokenizer.json", "lmforge.json")


def expand_inputs(entries: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """The files that input options (paths or glob patterns) name, for comparison with an output."""
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    found: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(str(entry))
        found += [Path(m) for m in glob.glob(text, recursive=True)] if any(c in text for c in "*?[") else [Path(text)]
    return found


def check_output_file(
    path: str | os.PathLike, option: str, overwrite: bool, inputs: Iterable[Path] = (), overwrite_flag: str = "--overwrite"
) -> Path:
    """Refuse an output that would replace an input, a checkpoint or run file, or (without
    ``overwrite``) any existing file; return the path. ``overwrite_flag`` is how the command spells
    the option that allows replacing (the trainer commands take ``--overwrite true``)."""
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        if source.exists() and source.resolve() == target:
            raise LmforgeError(
                f"{option} {path} is also an input of this command ({source}); writing it would destroy that input. "
                f"Give {option} another file."
            )
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise LmforgeError(f"{option} {path} is a directory. Give {option} a file path, e.g. {path / 'out.jsonl'}.")
        if path.is_symlink() or target.suffix in _PROTECTED_SUFFIXES or target.name in _RUN_FILES \
                or "checkpoints" in target.parts:
            raise LmforgeError(
                f"{option} {path} is an existing checkpoint or run file ({target}); lmforge never writes over one. "
                f"Give {option} a new file."
            )
        if not overwrite:
            raise LmforgeError(
                f"{option} {path} already exists, and lmforge does not replace files it did not just write. Add "
                f"{overwrite_flag} to replace it, or give {option} a new file."
            )
    return path


def unused_path(path: Path) -> Path:
    """``path``, or ``stem.<time>.suffix`` beside it when ``path`` exists (a default output keeps its history)."""
    if not path.exists():
        return path
    stamped = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    n = 1
    while stamped.exists():
        stamped = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}-{n}{path.suffix}")
        n += 1
    return stamped


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same directory: an atomic rename)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
