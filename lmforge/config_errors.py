"""One-paragraph config errors instead of jsonargparse's full usage text and nested reports.

jsonargparse explains a bad option as a tree ("Parser key "model": Does not validate against any
of the Union subtypes ... Problem with given class_path ... Option 'n_layr' is not accepted").
:func:`summarize` turns that into the dotted key, the reason, and the closest valid option names.
"""

from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from lmforge.errors import class_options, closest

_KEY = re.compile(r'^\s*Parser key "([^"]+)":\s*$')
_CLASS = re.compile(r"^\s*(?:- )?Problem with given class_path '([^']+)':\s*$")
_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_SUBCOMMAND_OPTION = re.compile(r"Subcommand '(\w+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?:\w+ )?--([\w.]+)")
FIX = "Run `lmforge {cmd} --print_config` to see every option with its default."


def _class_options(class_path: str) -> list[str]:
    from jsonargparse._util import import_object

    try:
        cls = import_object(class_path)
    except Exception:
        return []
    return class_options(cls)


def summarize(message: str, known_keys: list[str] | None = None, command: str = "fit") -> str:
    """A one-paragraph version of a jsonargparse error message."""
    fix = FIX.format(cmd=command)
    match = _SUBCOMMAND_OPTION.search(message) or _UNRECOGNIZED.search(message)
    if match:
        key = match.groups()[-1]
        if len(match.groups()) == 2:
            fix = FIX.format(cmd=match.group(1))
        hint = closest(key, known_keys or [])
        return f"Unknown config key '{key}'.{hint} {fix}"

    choices = _literal_choices(message)
    if choices:  # a value outside a union of literal values (trainer.precision): every accepted value
        key = _KEY.match(message.splitlines()[0])
        where = key.group(1) if key else "?"
        given = re.search(r"Given value: (.*)", message)
        return (f"Invalid config at '{where}': {given.group(1).strip() if given else 'the value'} is not one of "
                f"{', '.join(choices)}. {fix}")

    path: list[str] = []
    class_path = None
    reason = None
    depth = -1
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if not text or any(text.startswith(n) for n in _NOISE):
            continue
        key = _KEY.match(line)
        cls = _CLASS.match(line)
        if key:
            if indent > depth:
                path.append(key.group(1))
                depth = indent
        elif cls:
            class_path = cls.group(1)
        elif reason is None or indent > depth:
            reason = text
    if reason is None:
        return " ".join(message.split()) + f" {fix}"
    where = ".".join(path)
    hint = ""
    bad_option = _NOT_ACCEPTED.search(reason)
    if bad_option and class_path:
        # 'tsk.init_args.x' (a misspelled section): the section's name is what to match
        hint = closest(bad_option.group(1).split(".")[0], _class_options(class_path))
        where = f"{where}.{bad_option.group(1)}" if where else bad_option.group(1)
        reason = f"{class_path.rsplit('.', 1)[-1]} has no option '{bad_option.group(1)}'"
    owner = f" ({class_path.rsplit('.', 1)[-1]})" if class_path and not bad_option else ""
    return f"Invalid config at '{where}'{owner}: {reason}.{hint} {fix}".replace("..", ".")


_LITERAL = re.compile(r"^\s*- Expected a typing\.Literal\[(.*)\]\s*$")


def _literal_choices(message: str) -> list[str]:
    """The accepted values of a one-key error whose every alternative is a set of literal values."""
    if message.count("Parser key") != 1 or "Does not validate against any of the Union subtypes" not in message:
        return []
    expected = [line.strip() for line in message.splitlines() if line.strip().startswith("- Expected a ")]
    if not any(_LITERAL.match(e) for e in expected) or "Problem with given class_path" in message or not all(
        _LITERAL.match(e) or e == "- Expected a <class 'NoneType'>" for e in expected
    ):
        return []
    values = [v.strip() for e in expected if (m := _LITERAL.match(e)) for v in m.group(1).split(",")]
    return list(dict.fromkeys(values)) + (["null"] if "- Expected a <class 'NoneType'>" in expected else [])


class ConciseArgumentParser(LightningArgumentParser):
    """A LightningArgumentParser whose errors are one paragraph on stderr, then exit status 2."""

    COMMANDS = ("fit", "validate", "test", "predict")
    #: The subcommand being parsed (set by LmforgeCLI from its arguments), named in the fix.
    command = "fit"

    def error(self, message: str, ex: Exception | None = None):
        if not getattr(self, "exit_on_error", True):
            return super().error(message, ex)
        known = sorted({a.dest for a in _all_actions(self)})
        command = next((c for c in self.COMMANDS if f"'{c}'" in message), self.command)
        print(f"lmforge: error: {summarize(message, known, command)}", file=sys.stderr)
        sys.exit(2)


def _all_actions(parser: ArgumentParser):
    """Every action of a parser and of its subcommand parsers."""
    for action in parser._actions:
        yield action
        for sub in getattr(action, "_name_parser_map", {}).values():
            yield from _all_actions(sub)
