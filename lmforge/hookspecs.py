"""The hook specifications: the whole plugin contract as pluggy sees it.

A plugin module implements one or more of these hooks with :data:`lmforge.hookimpl` and is made
known through the ``lmforge`` entry-point group (built-ins and third-party packages alike), or by
naming the module in ``--plugins`` / ``LMFORGE_PLUGINS``.

Each hook is collected from every plugin module (none stops at the first result). An implementation
may accept any subset of a hook's arguments.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "lmforge"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def lmforge_architectures() -> list[type]:
    """Return the :class:`lmforge.Architecture` subclasses this module provides.

    Each class needs a unique ``name`` and the ``families`` it supports. Called once per process
    when the plugin manager is created; return classes, not instances.
    """


@hookspec
def lmforge_objectives() -> list[type]:
    """Return the :class:`lmforge.Objective` subclasses this module provides.

    Each class needs a unique ``name`` and the ``families`` it supports.
    """


@hookspec
def lmforge_tasks() -> list[type]:
    """Return the :class:`lmforge.Task` subclasses this module provides.

    Each class needs a unique ``name`` and the ``families`` it supports.
    """
