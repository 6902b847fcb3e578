"""Plugins named by short name in YAML and on the command line.

jsonargparse resolves ``class_path: GPT`` by class name among imported subclasses. lmforge lets a
config name a plugin by its registered short name (``class_path: gpt``) and a family by its name
(``class_path: decoder``): :func:`install_short_names` puts the plugin registry in front of
jsonargparse's name lookup (falling back to it for everything else).

jsonargparse reports an unknown class deep inside a long message, so :func:`validate_plugin_names`
checks every plugin name in the config files and overrides first, and refuses an unknown one with
the closest valid names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError, closest

PLUGIN_KEYS = ("architecture", "objective", "task")


def _family_path(name: str) -> str | None:
    from lmforge.families import FAMILY_MODULES

    cls = FAMILY_MODULES.get(name)
    return f"{cls.__module__}.{cls.__qualname__}" if cls else None


def _lookup(base: Any, name: str) -> str | None:
    from lmforge.families import LMModule
    from lmforge.plugin_manager import get_registry

    if isinstance(base, tuple):
        for b in base:
            found = _lookup(b, name)
            if found:
                return found
        return None
    if not isinstance(base, type):
        return None
    if issubclass(LMModule, base) and base is not object:
        return _family_path(name)
    return get_registry().resolve(base, name)


def install_short_names() -> None:
    """Make jsonargparse resolve plugin short names and family names (idempotent)."""
    from jsonargparse import _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_lmforge", False):
        return

    def resolve_class_path_by_name(cls, name):
        if isinstance(name, str) and "." not in name:
            found = _lookup(cls, name)
            if found:
                return found
        return original(cls, name)

    resolve_class_path_by_name._lmforge = True
    _typehints.resolve_class_path_by_name = resolve_class_path_by_name


# -- early validation of names ---------------------------------------------------------------------
def read_yaml_file(path: str) -> dict:
    """A YAML config file as a dict (``safe_load``: Python object tags are refused); a file that is
    missing, not UTF-8 or not YAML is one paragraph naming the line and column."""
    file = Path(path)
    if not file.is_file():
        raise LmforgeError(f"Config file {path} does not exist. Pass the path of a YAML file to --config.")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LmforgeError(f"Config file {path} is not valid YAML: {_yaml_problem(exc)}. Fix the file.") from None
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"Config file {path} is not UTF-8 text (bad byte at offset {exc.start}).") from None
    return data if isinstance(data, dict) else {}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What went wrong and where, in one line: ``expected ',' or ']' ... (line 3, column 1)``."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, yaml.constructor.ConstructorError):
        problem = f"{problem} (Python object tags are refused)"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    text = f"{problem}{where}" + (f", {context}" if context else "")
    return " ".join(text.split())


def _name_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        return value["class_path"]
    return None


def _names_in_config(config: dict) -> list[tuple[str, str]]:
    """(kind, name) pairs found under ``model`` in one parsed config file."""
    model = config.get("model")
    if not isinstance(model, dict):
        return []
    found = []
    family = _name_of(model)
    if family:
        found.append(("family", family))
    sections = [model, model.get("init_args") if isinstance(model.get("init_args"), dict) else {}]
    for section in sections:
        for kind in PLUGIN_KEYS:
            name = _name_of(section.get(kind))
            if name:
                found.append((kind, name))
    return found


def _names_in_overrides(args: list[str]) -> list[tuple[str, str]]:
    found = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, _, value = arg[2:].partition("=")
        if not _ and i + 1 < len(args):
            value = args[i + 1]
        parts = [p for p in key.split(".") if p != "init_args"]
        if parts and parts[-1] == "class_path":
            parts = parts[:-1]
        if len(parts) == 2 and parts[0] == "model" and parts[1] in PLUGIN_KEYS and value and not value.startswith("{"):
            found.append((parts[1], value))
        if parts == ["model"] and value and not value.startswith("{") and not value.endswith((".yaml", ".yml")):
            found.append(("family", value))
    return found


def plugin_names_in_args(args: list[str]) -> list[tuple[str, str]]:
    """``(kind, name)`` of every plugin or family a command line names, in ``--config`` files and
    overrides, in order (a later mention overrides an earlier one)."""
    names: list[tuple[str, str]] = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            names += _names_in_config(read_yaml_file(args[i + 1]))
        elif arg.startswith("--config="):
            names += _names_in_config(read_yaml_file(arg.split("=", 1)[1]))
    return names + _names_in_overrides(args)


def validate_plugin_names(args: list[str]) -> None:
    """Refuse unknown plugin or family names in ``--config`` files and overrides, before parsing."""
    from lmforge.families import FAMILY_MODULES
    from lmforge.plugin_manager import get_registry

    names = plugin_names_in_args(args)

    registry = get_registry()
    for kind, name in names:
        if "." in name:
            continue  # a full import path: jsonargparse checks it
        if kind == "family":
            family_classes = {cls.__name__ for cls in FAMILY_MODULES.values()}
            if name not in FAMILY_MODULES and name not in family_classes:
                raise LmforgeError(
                    f"Unknown model family '{name}'.{closest(name, [*FAMILY_MODULES, *family_classes])} "
                    f"model.class_path must be one of: {', '.join(sorted(FAMILY_MODULES))} "
                    f"(or {', '.join(sorted(family_classes))})."
                )
            continue
        if name in registry.plugins[kind] or (kind, name) in registry.duplicates:
            registry.get(kind, name)  # raises for a duplicated name
            continue
        if any(info.cls.__name__ == name for info in registry.plugins[kind].values()):
            continue  # the class name works too
        registry.get(kind, name)  # raises: unknown name, with suggestions
