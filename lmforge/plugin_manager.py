"""Finding plugins: a pluggy manager built by a factory, and the registry of what it found.

Plugins come from three places, loaded in this order and the same way in every process (spawned
DDP ranks and data-loader workers build their own registry on first use):

1. the ``lmforge`` entry-point group of every installed distribution, lmforge's own built-ins first
   (they are registered through the very same group a third-party package uses);
2. modules named in the ``LMFORGE_PLUGINS`` environment variable (comma separated); the CLI's
   ``--plugins`` option appends to that variable so child processes inherit it.

Nothing here runs at import time: :func:`get_registry` builds the registry on first call.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
import traceback
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import pluggy

from lmforge import hookspecs
from lmforge.errors import LmforgeError, closest
from lmforge.plugin_api import FAMILIES, MIN_SUPPORTED_API_VERSION, PLUGIN_API_VERSION, PLUGIN_KINDS, Plugin

ENTRY_POINT_GROUP = "lmforge"
ENV_VAR = "LMFORGE_PLUGINS"
_HOOK_FOR_KIND = {
    "architecture": "lmforge_architectures",
    "objective": "lmforge_objectives",
    "task": "lmforge_tasks",
}


@dataclass(frozen=True)
class Source:
    """Where a plugin module came from: the entry point (or env var) and its distribution."""

    module: str
    package: str
    version: str

    def describe(self) -> str:
        return f"module '{self.module}' of package '{self.package} {self.version}'"


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin class and where it came from."""

    name: str
    kind: str
    cls: type
    source: Source

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.cls.families)

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin module that could not be used, with the reason.

    ``reason`` is one paragraph (for an exception: its type and message); ``frames`` the last
    frames that led to it, each ``file:line in function`` (paths relative to their ``sys.path``
    entry, import machinery left out); ``details`` the whole formatted traceback; ``names`` the
    plugin names the module provides, when they are known (a refused plugin class).
    """

    source: Source
    reason: str
    details: str = ""
    frames: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def from_exception(cls, source: Source, exc: BaseException) -> BrokenPlugin:
        reason = f"{type(exc).__name__}: {exc}"
        return cls(source, reason, "".join(traceback.format_exception(exc)), summarize_traceback(exc))

    def one_line(self) -> str:
        """The reason's first line, and where it was raised: for a table cell."""
        first = self.reason.strip().splitlines()[0] if self.reason.strip() else "failed to load"
        return first + (f" (at {self.frames[-1].split(' in ')[0]})" if self.frames else "")


_IMPORT_MACHINERY = "<frozen importlib"
_HIDDEN_DIRS = (f"{os.sep}importlib{os.sep}", f"{os.sep}pluggy{os.sep}")


def _short_path(filename: str) -> str:
    """``filename`` relative to the longest ``sys.path`` entry holding it (``pkg/mod.py``)."""
    best = ""
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir)
        if filename.startswith(root + os.sep) and len(root) > len(best):
            best = root
    return os.path.relpath(filename, best) if best else filename


def summarize_traceback(exc: BaseException, limit: int = 3) -> tuple[str, ...]:
    """The last ``limit`` frames of ``exc``'s traceback as ``file:line in function``.

    Frames of the import machinery, of pluggy and of this module are left out: what remains is the
    plugin's own code (and the libraries it called), which is where the fix is.
    """
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_IMPORT_MACHINERY)
        and not any(d in f.filename for d in _HIDDEN_DIRS)
        and os.path.abspath(f.filename) != os.path.abspath(__file__)
    ]
    return tuple(f"{_short_path(f.filename)}:{f.lineno} in {f.name}" for f in frames[-limit:])


@dataclass
class PluginRegistry:
    """Every plugin known to this process, by kind and name."""

    plugins: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in PLUGIN_KINDS})
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: plugin or entry-point names provided twice: name -> the sources that provide it
    duplicates: dict[tuple[str, str], list[Source]] = field(default_factory=dict)
    manager: pluggy.PluginManager | None = None

    # -- queries ---------------------------------------------------------------------------------
    def all(self) -> list[PluginInfo]:
        return [info for kind in PLUGIN_KINDS for info in sorted(self.plugins[kind].values(), key=lambda i: i.name)]

    def get(self, kind: str, name: str) -> PluginInfo:
        """The plugin ``name`` of ``kind``; a clear :class:`LmforgeError` if it is unusable."""
        self._raise_if_duplicate(kind, name)
        found = self.plugins[kind].get(name)
        if found is not None:
            return found
        for broken in self.broken:
            if broken.source.module.rsplit(".", 1)[-1] == name or broken.source.module == name or name in broken.names:
                raise LmforgeError(self.broken_message(broken) + f" It cannot be used as {kind} '{name}'.")
        known = sorted(self.plugins[kind])
        hint = closest(name, known) or closest(name.lower(), known)
        msg = f"Unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(known) or 'none'}."
        if self.broken:
            msg += " Some plugin modules failed to load (see `lmforge plugins list`): " + "; ".join(
                b.source.describe() for b in self.broken
            ) + "."
        raise LmforgeError(msg + " Install the package that provides it, or name its module in --plugins.")

    def find_by_class(self, cls: type) -> PluginInfo | None:
        for info in self.plugins.get(getattr(cls, "kind", ""), {}).values():
            if info.cls is cls:
                return info
        return None

    def resolve(self, base: type, name: str) -> str | None:
        """Import path of the plugin called ``name`` whose class derives from ``base``, if any.

        ``base`` is the type an option is annotated with: a plugin base class (``Objective``) or a
        plugin class itself (``nsp``'s ``mlm: MLM`` option).
        """
        for kind, kind_base in PLUGIN_KINDS.items():
            if isinstance(base, type) and (issubclass(kind_base, base) or issubclass(base, kind_base)):
                if name in self.plugins[kind] or (kind, name) in self.duplicates:
                    info = self.get(kind, name)
                    if issubclass(info.cls, base):
                        return info.class_path
        return None

    def raise_errors(self) -> None:
        """Raise if any name is provided twice: which plugin is meant would be a guess."""
        for kind, name in self.duplicates:
            self._raise_if_duplicate(kind, name)

    def broken_message(self, broken: BrokenPlugin) -> str:
        return f"Error loading plugin {broken.source.describe()}: {broken.reason}"

    def _raise_if_duplicate(self, kind: str, name: str) -> None:
        sources = self.duplicates.get((kind, name))
        if sources:
            what = "entry point" if kind == "entry-point" else kind
            raise LmforgeError(
                f"The {what} name '{name}' is provided twice: by "
                + " and by ".join(s.describe() for s in sources)
                + ". Names must be unique; uninstall one of the packages or rename the plugin."
            )

    # -- building --------------------------------------------------------------------------------
    def add_module(self, pm: pluggy.PluginManager, module: object, source: Source) -> None:
        """Register one plugin module and collect the classes its hooks return."""
        try:
            pm.register(module, name=f"{source.package}:{source.module}")
            collected: list[tuple[str, type]] = []
            for kind, hook_name in _HOOK_FOR_KIND.items():
                impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin is module]
                for impl in impls:
                    for cls in impl.function() or ():
                        collected.append((kind, cls))
            for kind, cls in collected:
                _check_plugin_class(kind, cls, source)
        except LmforgeError as exc:
            pm.unregister(module)
            names = tuple(n for _, cls in collected if isinstance(n := getattr(cls, "name", None), str) and n)
            self.broken.append(BrokenPlugin(source, str(exc), names=names))
            return
        except Exception as exc:  # a plugin's hook raising is the plugin's fault: report, keep going
            pm.unregister(module)
            self.broken.append(BrokenPlugin.from_exception(source, exc))
            return
        for kind, cls in collected:
            info = PluginInfo(cls.name, kind, cls, source)
            existing = self.plugins[kind].get(cls.name)
            if existing is not None and existing.cls is not cls:
                self.duplicates.setdefault((kind, cls.name), [existing.source]).append(source)
            else:
                self.plugins[kind][cls.name] = info


def _check_plugin_class(kind: str, cls: type, source: Source | None = None) -> None:
    base = PLUGIN_KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise LmforgeError(f"its {_HOOK_FOR_KIND[kind]} hook returned {cls!r}, which is not a subclass of lmforge.{base.__name__}.")
    if not cls.name or not isinstance(cls.name, str):
        raise LmforgeError(f"{cls.__qualname__} has no `name` (set a unique short name as a class attribute).")
    bad = [f for f in cls.families if f not in FAMILIES]
    if not cls.families or bad:
        raise LmforgeError(
            f"{cls.__qualname__}.families must be a non-empty subset of {FAMILIES}, got {tuple(cls.families)}."
        )
    check_api_version(cls, source)


def check_api_version(cls: type, source: Source | None = None) -> None:
    """Refuse a plugin class whose ``api_version`` this lmforge does not support.

    The message names the plugin, the package it came from and both versions, and says which side
    to upgrade.
    """
    version = getattr(cls, "api_version", None)
    if isinstance(version, int) and not isinstance(version, bool) and \
            MIN_SUPPORTED_API_VERSION <= version <= PLUGIN_API_VERSION:
        return
    from lmforge import __version__

    supported = (
        f"version {PLUGIN_API_VERSION}" if MIN_SUPPORTED_API_VERSION == PLUGIN_API_VERSION
        else f"versions {MIN_SUPPORTED_API_VERSION} to {PLUGIN_API_VERSION}"
    )
    where = f" from package '{source.package} {source.version}'" if source is not None else ""
    if not isinstance(version, int) or isinstance(version, bool):
        fix = "Set `api_version` to an integer (the lmforge.PLUGIN_API_VERSION the plugin was written for)."
    elif version > PLUGIN_API_VERSION:
        fix = "Upgrade lmforge, or install a release of the plugin written for this lmforge."
    else:
        fix = "Upgrade the plugin to the current contract (see docs/plugins.md), or install an older lmforge."
    raise LmforgeError(
        f"The {getattr(cls, 'kind', '') or 'plugin'} '{getattr(cls, 'name', '') or cls.__qualname__}' "
        f"({cls.__module__}.{cls.__qualname__}){where} targets plugin API version {version!r}, but lmforge "
        f"{__version__} supports plugin API {supported}. {fix}"
    )


def _entry_points() -> list[md.EntryPoint]:
    """The ``lmforge`` entry points, lmforge's own first, each (distribution, name, value) once."""
    seen = set()
    result = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        key = (dist.lower().replace("_", "-"), ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            result.append(ep)
    return sorted(result, key=lambda ep: (ep.dist is None or ep.dist.name != "lmforge",))


def env_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]


def create_registry(
    entry_points: Iterable[md.EntryPoint] | None = None, extra_modules: Iterable[str] | None = None
) -> PluginRegistry:
    """Build a fresh plugin manager and registry.

    ``entry_points`` defaults to the installed ``lmforge`` group and ``extra_modules`` to
    ``LMFORGE_PLUGINS``; tests pass their own.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = PluginRegistry(manager=pm)
    eps = list(_entry_points() if entry_points is None else entry_points)

    by_name: dict[str, list[Source]] = defaultdict(list)
    for ep in eps:
        dist = ep.dist
        source = Source(ep.value, dist.name if dist else "?", dist.version if dist else "?")
        by_name[ep.name].append(source)
        if len(by_name[ep.name]) > 1:  # pluggy would silently keep the first: refuse instead
            registry.duplicates[("entry-point", ep.name)] = by_name[ep.name]
            continue
        try:
            module = ep.load()
        except Exception as exc:
            registry.broken.append(BrokenPlugin.from_exception(source, exc))
            continue
        registry.add_module(pm, module, source)

    for name in extra_modules if extra_modules is not None else env_modules():
        source = Source(name, f"${ENV_VAR}", "-")
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            registry.broken.append(BrokenPlugin.from_exception(source, exc))
            continue
        if pm.is_registered(module):
            continue
        registry.add_module(pm, module, source)
    return registry


_registry: PluginRegistry | None = None
_registry_env: str | None = None


def get_registry() -> PluginRegistry:
    """This process's registry, built on first use (and rebuilt if ``LMFORGE_PLUGINS`` changed)."""
    global _registry, _registry_env
    env = os.environ.get(ENV_VAR, "")
    if _registry is None or env != _registry_env:
        _registry, _registry_env = create_registry(), env
    return _registry


def add_plugin_modules(modules: Iterable[str]) -> None:
    """Add modules to ``LMFORGE_PLUGINS`` so this process and every child process load them."""
    current = env_modules()
    for m in modules:
        if m not in current:
            current.append(m)
    os.environ[ENV_VAR] = ",".join(current)


def plugin_for(obj: Plugin) -> PluginInfo | None:
    """The registry entry of a plugin instance (None for an unregistered class)."""
    return get_registry().find_by_class(type(obj))
