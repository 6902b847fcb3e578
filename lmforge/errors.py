"""The one exception type users see.

Every mistake a user can make (a wrong config key, an unknown plugin, an empty data file, a
checkpoint from another model) is raised as :class:`LmforgeError` with a single paragraph that names
the culprit and the fix. The CLI prints that paragraph and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
from collections.abc import Callable, Iterable
from typing import Any


class LmforgeError(Exception):
    """A user-facing error: its message says what is wrong and how to fix it."""

    #: The most recently raised one. jsonargparse wraps errors raised while it instantiates classes
    #: into its own ValueError (keeping only the text); this lets the CLI recover the original.
    latest: LmforgeError | None = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        LmforgeError.latest = self


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse for lmforge's tool commands: a bad argument is one ``lmforge: error:`` line and exit
    status 2, like every other lmforge error, instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"lmforge: error: {self.prog}: {message}. `{self.prog} --help` lists the options.\n")


def find_user_error(exc: BaseException) -> LmforgeError | None:
    """The LmforgeError behind ``exc``: itself, one it was raised from, or one whose text it quotes."""
    original = exc
    found = in_chain(exc, lambda e: isinstance(e, LmforgeError))
    if found is not None:
        return found
    latest = LmforgeError.latest
    if latest is not None and str(latest)[:80].replace("\\", "") in str(original).replace("\\", ""):
        return latest
    refused = in_chain(original, lambda e: isinstance(e, OSError) and e.errno in _WRITE_REFUSED)
    if refused is not None:
        where = f" ({refused.filename})" if refused.filename else ""
        return LmforgeError(
            f"The file system refused: {refused.strerror}{where}. Committed checkpoints are never changed by a "
            "failed write (a fit loses only the steps since its newest one). Free space or fix the permissions, "
            "then run the same command again (a fit with --ckpt_path last resumes from its newest committed checkpoint; "
            "validate or test a read-only run with --trainer.logger false, which writes no metrics file)."
        )
    return None


#: Errors of the file system rather than of lmforge: a full disk, a quota, a read-only or immutable target.
_WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def in_chain(exc: BaseException | None, wanted: Callable[[BaseException], bool]) -> Any:
    """The first exception in ``exc``'s chain (itself, then what it was raised from or while handling)
    that ``wanted`` accepts, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if wanted(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def class_options(cls: type) -> list[str]:
    """The options (``__init__`` parameters) a plugin class takes, for "did you mean" hints."""
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'a' or 'b'?"`` for the closest candidates, or ``""`` if none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not matches:
        return ""
    quoted = [f"'{m}'" for m in matches]
    return " Did you mean " + " or ".join(quoted) + "?"
