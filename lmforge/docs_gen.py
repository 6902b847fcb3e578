"""The plugin reference of docs/plugins.md, rendered from the code so that it cannot drift.

:func:`render_reference` builds the reference from the hook specifications' docstrings
(:mod:`lmforge.hookspecs`) and the plugin base classes' docstrings, documented attributes
(``#:`` comments) and methods (:mod:`lmforge.plugin_api`). docs/plugins.md holds it between two
markers; a test compares the two.

    python -m lmforge.docs_gen            # rewrite the reference in docs/plugins.md
    python -m lmforge.docs_gen --check    # exit status 1 if docs/plugins.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED REFERENCE: python -m lmforge.docs_gen rewrites this part -->"
END = "<!-- END GENERATED REFERENCE -->"
DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> list[str]:
    """Every hook of the contract, as pluggy sees it (``dir(pm.hook)``)."""
    import pluggy

    from lmforge import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return sorted(name for name in dir(pm.hook) if not name.startswith("_"))


def _annotation(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def format_signature(name: str, fn: object, drop_first: bool = False) -> str:
    """``name(a: int = 1, *, b: str | None = None) -> T`` with annotations written as in the source."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[1 if drop_first else 0 :]
    parts, star_done = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        star_done |= p.kind is p.VAR_POSITIONAL
        text = prefix + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    returns = (
        f" -> {_annotation(signature.return_annotation)}" if signature.return_annotation is not signature.empty else ""
    )
    return f"{name}({', '.join(parts)}){returns}"


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _documented_assignments(tree: ast.AST, source_lines: list[str]) -> dict[str, str]:
    """``name -> text`` of the ``#:`` comment lines right above each assignment in ``tree``'s body."""
    found = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        comments, line = [], node.lineno - 2
        while line >= 0 and source_lines[line].strip().startswith("#:"):
            comments.insert(0, source_lines[line].strip()[2:].strip())
            line -= 1
        if comments:
            found[name] = " ".join(comments)
    return found


def _render_class(cls: type, attributes: dict[str, str]) -> list[str]:
    bases = ", ".join(b.__name__ for b in cls.__bases__ if b is not object)
    out = [f"### `lmforge.{cls.__name__}`" + (f" ({bases})" if bases else ""), "", _doc(cls), ""]
    if dataclasses.is_dataclass(cls):
        out += ["Fields:", ""]
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else f" = {f.default!r}"
            out.append(f"- `{f.name}: {_annotation(f.type)}{default}`")
        out.append("")
    if attributes:
        out += ["Class attributes:", ""]
        for name, text in attributes.items():
            value = cls.__dict__.get(name)
            shown = f" = {value!r}" if isinstance(value, (str, int, tuple, type(None))) else ""
            out.append(f"- `{name}{shown}`: {text}")
        out.append("")
    methods = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name != "__init__":
            continue
        if name == "__init__" and not member.__doc__:
            continue
        if isinstance(member, (classmethod, staticmethod)):
            fn, drop = member.__func__, isinstance(member, classmethod)
        elif inspect.isfunction(member):
            fn, drop = member, True
        else:
            continue
        text = _doc(fn)
        entry = f"- `{format_signature(name, fn, drop_first=drop)}`"
        if text:
            entry += ": " + "\n".join(f"  {line}" if line else "" for line in text.splitlines()).lstrip()
        methods.append(entry)
    if methods:
        out += ["Methods:", "", *methods, ""]
    return out


def render_reference() -> str:
    """The reference section of docs/plugins.md (Markdown, without the markers)."""
    from lmforge import hookspecs, plugin_api

    source = inspect.getsource(plugin_api)
    lines = source.splitlines()
    tree = ast.parse(source)
    module_attrs = _documented_assignments(tree, lines)
    class_attrs = {n.name: _documented_assignments(n, lines) for n in tree.body if isinstance(n, ast.ClassDef)}

    out = [
        "## Reference",
        "",
        "Generated from `lmforge/hookspecs.py` and `lmforge/plugin_api.py` by `python -m lmforge.docs_gen`; "
        "edit the docstrings there, not this section.",
        "",
        "### Contract versions",
        "",
    ]
    for name in ("PLUGIN_API_VERSION", "MIN_SUPPORTED_API_VERSION", "FAMILIES"):
        if name in module_attrs:
            out.append(f"- `lmforge.{name} = {getattr(plugin_api, name)!r}`: {module_attrs[name]}")
    out += ["", "### Hooks", "", _doc(hookspecs), ""]
    for name in hook_names():
        spec = getattr(hookspecs, name)
        out += [f"#### `{format_signature(name, spec)}`", "", _doc(spec) or "(undocumented)", ""]
    for cls in (
        plugin_api.Plugin,
        plugin_api.Architecture,
        plugin_api.Objective,
        plugin_api.Task,
        plugin_api.SpecialTokens,
    ):
        out += _render_class(cls, class_attrs.get(cls.__name__, {}))
    return "\n".join(line.rstrip() for line in out).strip() + "\n"


def generated_part(text: str) -> str | None:
    """The text between the markers of a document, or None if it has none."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def update(path: Path = DEFAULT_DOC) -> bool:
    """Rewrite the reference in ``path``; True if the file changed."""
    text = path.read_text(encoding="utf-8")
    if generated_part(text) is None:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers to write the reference between.")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{BEGIN}\n{render_reference()}{END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.docs_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit status 1 if the file is out of date; write nothing")
    parser.add_argument("--path", type=Path, default=DEFAULT_DOC, help="the document (default: docs/plugins.md)")
    args = parser.parse_args(argv)
    if args.check:
        current = generated_part(args.path.read_text(encoding="utf-8"))
        if current != render_reference():
            print(f"{args.path} is out of date: run python -m lmforge.docs_gen", file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    print(f"{'updated' if update(args.path) else 'unchanged'}: {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
