"""``lmforge plugins new``: a ready-to-install plugin package, written from templates.

:func:`create_plugin_package` writes ``lmforge-NAME/`` with a ``pyproject.toml`` declaring the
``lmforge`` entry point, the package ``lmforge_NAME/`` holding a working minimal plugin of the
chosen kind and family, a test that runs the conformance check, and a README. ``pip install -e``
of it makes the plugin appear in ``lmforge plugins list`` and train from YAML at once.

The templates (``templates/*.tmpl``, :class:`string.Template` syntax) are:

============  =====================================================================================
kind          what the template holds, by family
============  =====================================================================================
architecture  decoder: gated causal convolutions with a cache; encoder: a small bidirectional
              transformer with MLM and sentence-pair heads; seq2seq: a convolutional encoder and
              a GRU decoder with attention and a cache
objective     decoder: label-smoothed next-token prediction; encoder: masked language modelling;
              seq2seq: continue the text (the encoder reads the start of a row, the decoder the rest)
task          scoring: ``predict`` writes each batch's loss or perplexity (a fine-tuning task
              adds fields, preprocess, a head, step and metrics: see plugins/tasks/)
============  =====================================================================================
"""

from __future__ import annotations

import keyword
from importlib import resources
from pathlib import Path
from string import Template

from lmforge.errors import LmforgeError, closest

KINDS = ("architecture", "objective", "task")
FAMILIES = ("decoder", "encoder", "seq2seq")

#: The built-in plugins a README's example config pairs a new plugin with, by family.
_REFERENCE = {
    "decoder": ("gpt", "clm"),
    "encoder": ("bert", "mlm"),
    "seq2seq": ("t5", "span_corruption"),
}
_DESCRIPTION = {
    ("architecture", "decoder"): "A decoder made of gated causal convolutions.",
    ("architecture", "encoder"): "A small bidirectional transformer encoder with MLM and sentence-pair heads.",
    ("architecture", "seq2seq"): "A small encoder-decoder: convolutions in, a GRU with attention out.",
    ("objective", "decoder"): "Next-token prediction with label smoothing.",
    ("objective", "encoder"): "Masked language modelling.",
    ("objective", "seq2seq"): "Continue the text: the encoder reads the start of a row, the decoder writes the rest.",
    ("task", "decoder"): "Score text with a decoder: the loss or perplexity of every batch.",
    ("task", "encoder"): "Score text with an encoder: the loss or perplexity of every batch.",
    ("task", "seq2seq"): "Score text with an encoder-decoder: the loss or perplexity of every batch.",
}


def validate_name(name: str) -> None:
    """Refuse a plugin name that is not a lowercase Python identifier."""
    if not name.isidentifier() or keyword.iskeyword(name) or name != name.lower() or name.startswith("_"):
        suggestion = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        if suggestion[:1].isdigit():
            suggestion = "p" + suggestion
        hint = f" e.g. '{suggestion}'" if suggestion.isidentifier() and not keyword.iskeyword(suggestion) else ""
        raise LmforgeError(
            f"Invalid plugin name '{name}': a plugin name is a lowercase Python identifier (letters, digits and "
            f"underscores, not starting with a digit or underscore, not a Python keyword),{hint or ' e.g. my_plugin'}. "
            "It becomes the YAML name (class_path: NAME) and part of the package name."
        )


def class_name_for(name: str) -> str:
    """``tiny_conv`` -> ``TinyConv``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or name.title()


def _template(filename: str) -> Template:
    return Template(resources.files("lmforge.scaffold").joinpath("templates", filename).read_text(encoding="utf-8"))


_TOKENIZER = {"decoder": "tokenizer.json", "encoder": "wordpiece.json", "seq2seq": "tokenizer_t5.json"}


def _example_config(name: str, kind: str, family: str) -> str:
    """``train.yaml``: the new plugin with built-in partners, on the demo corpus installed with lmforge."""
    arch, objective = _REFERENCE[family]
    if kind == "architecture":
        arch = name
    elif kind == "objective":
        objective = name
    corpus = Path(__file__).resolve().parents[1] / "data" / "corpus"
    tokenizer = corpus / _TOKENIZER[family]
    if not tokenizer.is_file():
        tokenizer = corpus / _TOKENIZER["decoder"]
    lines = [
        f"# Train with the {kind} '{name}': lmforge fit --config train.yaml",
        "# (the data is the demo corpus installed with lmforge; point data: at your own files)",
        "trainer:",
        f"  default_root_dir: runs/{name}",
        "  max_steps: 200",
        "  val_check_interval: 100",
        "  limit_val_batches: 10",
        "model:",
        f"  class_path: {family}",
        "  init_args:",
        "    architecture:",
        f"      class_path: {arch}  # vocab_size is filled in from the tokenizer",
        "    objective:",
        f"      class_path: {objective}",
    ]
    if kind == "task":
        lines += ["    task:", f"      class_path: {name}"]
    lines += [
        "    lr: 1.0e-3",
        "    warmup_steps: 20",
        "data:",
        f"  train_files: {corpus / 'tiny_stories_train.txt'}",
        f"  val_files: {corpus / 'tiny_stories_validation.txt'}",
        f"  tokenizer: {tokenizer}",
        "  block_size: 64",
        "  batch_size: 8",
    ]
    return "\n".join(lines) + "\n"


def create_plugin_package(name: str, kind: str, output: str | Path = ".", family: str = "decoder") -> Path:
    """Write the plugin package ``lmforge-NAME/`` into ``output``; return its path.

    Args:
        name: The plugin's short name (a lowercase Python identifier): its YAML name, and the
            package is ``lmforge-NAME`` with the import package ``lmforge_NAME``.
        kind: ``"architecture"``, ``"objective"`` or ``"task"``.
        output: The folder to create the package in. ``output/lmforge-NAME`` must not exist.
        family: The family the plugin is written for: ``"decoder"``, ``"encoder"`` or ``"seq2seq"``.
    """
    from lmforge import __version__
    from lmforge.plugin_api import PLUGIN_API_VERSION

    validate_name(name)
    if kind not in KINDS:
        raise LmforgeError(f"Unknown plugin kind '{kind}'.{closest(kind, KINDS)} Kinds: {', '.join(KINDS)}.")
    if family not in FAMILIES:
        raise LmforgeError(f"Unknown family '{family}'.{closest(family, FAMILIES)} Families: {', '.join(FAMILIES)}.")
    _refuse_taken_name(name, kind)
    root = Path(output) / f"lmforge-{name}"
    if root.exists():
        raise LmforgeError(
            f"{root} already exists; nothing was written. Choose another --output folder or plugin name, or remove "
            "the folder first."
        )
    package = f"lmforge_{name}"
    values = {
        "name": name,
        "kind": kind,
        "family": family,
        "module": kind,
        "package": package,
        "dist": f"lmforge-{name.replace('_', '-')}",
        "class_name": class_name_for(name),
        "description": _DESCRIPTION[(kind, family)],
        "api_version": str(PLUGIN_API_VERSION),
        "lmforge_version": __version__,
        "config": _example_config(name, kind, family).rstrip("\n"),
    }
    plugin_template = "task.py.tmpl" if kind == "task" else f"{kind}_{family}.py.tmpl"
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"{package}/__init__.py": "package_init.py.tmpl",
        f"{package}/{kind}.py": plugin_template,
        f"tests/test_{name}.py": "test_plugin.py.tmpl",
        "train.yaml": "train.yaml.tmpl",
    }
    rendered = {path: _template(template).substitute(values) for path, template in files.items()}
    for path, text in rendered.items():  # everything rendered first: a template error writes nothing
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return root


def _refuse_taken_name(name: str, kind: str) -> None:
    """A name an installed plugin of the same kind already uses would be refused as a duplicate."""
    from lmforge.plugin_manager import get_registry

    taken = get_registry().plugins[kind].get(name)
    if taken is not None:
        raise LmforgeError(
            f"The {kind} name '{name}' is already provided by {taken.source.describe()}; two plugins with one name "
            "are refused. Choose another name."
        )


def next_steps(root: Path, name: str, kind: str) -> str:
    """What to do after :func:`create_plugin_package`, for the command line."""
    steps = [
        (f"cd {root}", ""),
        ("pip install -e .", "lmforge finds the plugin through its entry point"),
        ("lmforge plugins list", f"'{name}' is listed with its package"),
        (f"lmforge plugins check {name}", "the conformance checks"),
        ("python -m pytest", "the same checks, as a test"),
        ("lmforge fit --config train.yaml", "train with it: README.md has a config"),
    ]
    width = max(len(command) for command, why in steps if why)
    lines = [f"  {command.ljust(width)}  # {why}" if why else f"  {command}" for command, why in steps]
    return f"wrote {root}/ (the {kind} '{name}')\nnext:\n" + "\n".join(lines)


__all__ = ["FAMILIES", "KINDS", "class_name_for", "create_plugin_package", "next_steps", "validate_name"]
