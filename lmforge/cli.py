"""The ``lmforge`` command.

``fit | validate | test | predict`` are LightningCLI subcommands driven by YAML (``--config``) with
dotted overrides; ``generate``, ``plugins`` and ``tokenizer`` are small tools of their own. Every
user mistake ends as one paragraph on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hidden network: nothing is ever downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmforge.errors import LmforgeError, closest, find_user_error  # noqa: E402

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """\
usage: lmforge COMMAND [options]

Train encoder, decoder and seq2seq language models assembled from plugins.

Training (LightningCLI; `lmforge fit --help` lists every option):
  fit         train a model:             lmforge fit --config configs/gpt-tiny.yaml
  validate    validation loss of a model: lmforge validate --config X.yaml --ckpt_path CKPT
  test        test loss of a model
  predict     run the model's task over a dataset

Tools:
  generate    sample text from a checkpoint: lmforge generate --checkpoint RUN_DIR --prompt "Once"
  plugins     list the installed plugins:    lmforge plugins list [--json]
  tokenizer   train a tokenizer:             lmforge tokenizer train FILES... --output tokenizer.json
  convert     move weights between formats:  lmforge convert hf-to-lmforge HF_DIR OUT
                                             lmforge convert lmforge-to-hf CKPT_OR_DIR OUT

Options for every command:
  --plugins MODULES   extra plugin modules to load (comma separated; also $LMFORGE_PLUGINS)
  --version           print lmforge's version
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _take_plugins_option(argv)
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(HELP)
            return 0
        if argv[0] == "--version":
            from lmforge import __version__

            print(f"lmforge {__version__}")
            return 0
        command = argv[0]
        if command in TRAINER_COMMANDS:
            run_trainer_cli(argv)
            return 0
        if command in TOOLS:
            return TOOLS[command](argv[1:])
        raise LmforgeError(
            f"Unknown command '{command}'.{closest(command, [*TRAINER_COMMANDS, *TOOLS])} "
            f"Commands: {', '.join([*TRAINER_COMMANDS, *TOOLS])} (see `lmforge --help`)."
        )
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"lmforge: error: {user_error}", file=sys.stderr)
        return 2


def _take_plugins_option(argv: list[str]) -> list[str]:
    """Remove ``--plugins a,b`` from argv and export the modules to every process we start."""
    from lmforge.plugin_manager import add_plugin_modules

    out, modules = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--plugins":
            value = next(it, None)
            if value is None:
                raise LmforgeError("--plugins needs a value: a comma-separated list of importable module names.")
            modules += value.split(",")
        elif arg.startswith("--plugins="):
            modules += arg.split("=", 1)[1].split(",")
        else:
            out.append(arg)
    if modules:
        sys.path.insert(0, os.getcwd()) if os.getcwd() not in sys.path else None
        add_plugin_modules(m.strip() for m in modules if m.strip())
    return out


def run_trainer_cli(argv: list[str], run: bool = True):
    """Run a LightningCLI subcommand and return the CLI object; ``run=False`` only builds it."""
    from lmforge.training_cli import LmforgeCLI

    if not run and argv and argv[0] in TRAINER_COMMANDS:
        argv = argv[1:]
    return LmforgeCLI(args=argv, run=run)


# -- tools -----------------------------------------------------------------------------------------
def plugins_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge plugins", description="Inspect the installed plugins.")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="every plugin: name, kind, families, package, version")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from lmforge.plugin_manager import get_registry

    registry = get_registry()
    rows = [
        {
            "name": info.name,
            "kind": info.kind,
            "families": list(info.families),
            "package": info.source.package,
            "version": info.source.version,
            "status": "ok",
        }
        for info in registry.all()
    ]
    for (kind, name), sources in registry.duplicates.items():
        rows += [
            {"name": name, "kind": kind, "families": [], "package": s.package, "version": s.version, "status": "duplicate"}
            for s in sources
        ]
    for broken in registry.broken:
        rows.append(
            {
                "name": broken.source.module,
                "kind": "?",
                "families": [],
                "package": broken.source.package,
                "version": broken.source.version,
                "status": "broken: " + broken.reason,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["name", "kind", "families", "package", "version", "status"]
    table = [[r["name"], r["kind"], ",".join(r["families"]), r["package"], r["version"], r["status"]] for r in rows]
    widths = [max(len(h), *(len(str(row[i])) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def tokenizer_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge tokenizer", description="Train tokenizers.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a tokenizer from text files and write tokenizer.json")
    train.add_argument("files", nargs="+", help=".txt (one document per line), .jsonl, .csv or .parquet files")
    train.add_argument("--output", required=True, help="tokenizer.json path (or a directory to write it into)")
    train.add_argument("--vocab_size", type=int, default=1024)
    train.add_argument("--type", choices=["bpe", "wordpiece"], default="bpe", help="byte-level BPE or WordPiece")
    train.add_argument("--min_frequency", type=int, default=2)
    train.add_argument("--text_column", default="text", help="column holding the text in .jsonl/.csv/.parquet")
    train.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.json")
    args = parser.parse_args(argv)

    from lmforge.data.tokenizer import train_tokenizer

    path = train_tokenizer(
        args.files,
        args.output,
        vocab_size=args.vocab_size,
        kind=args.type,
        min_frequency=args.min_frequency,
        text_column=args.text_column,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge generate", description="Sample text from a decoder checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory (uses its last.ckpt)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from lmforge.checkpoint import load_model
    from lmforge.generation import generate

    model = load_model(args.checkpoint, map_location=args.device)
    if model.family != "decoder":
        raise LmforgeError(f"`lmforge generate` needs a decoder checkpoint; {args.checkpoint} is a {model.family} model.")
    tokenizer = model.tokenizer()
    from lmforge.data.tokenizer import find_special_tokens

    special = find_special_tokens(tokenizer)
    ids = torch.tensor([tokenizer.encode(args.prompt).ids], device=args.device)
    new = generate(
        model.architecture,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        eos_id=special.eos_id,
    )
    print(args.prompt + tokenizer.decode(new[0].tolist(), skip_special_tokens=True))
    return 0


def convert_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge convert", description="Convert model weights between formats.")
    sub = parser.add_subparsers(dest="action", required=True)
    to_lmforge = sub.add_parser("hf-to-lmforge", help="a Hugging Face folder -> an lmforge model folder")
    to_lmforge.add_argument("source", help="folder with config.json and model.safetensors")
    to_lmforge.add_argument("output", help="new lmforge model folder")
    to_lmforge.add_argument("--objective", default=None, help="objective to pair with (default: the architecture's)")
    to_hf = sub.add_parser("lmforge-to-hf", help="an lmforge checkpoint, run directory or model folder -> Hugging Face")
    to_hf.add_argument("source", help=".ckpt file, run directory or lmforge model folder")
    to_hf.add_argument("output", help="new Hugging Face folder (config.json, model.safetensors, tokenizer.json)")
    for p in (to_lmforge, to_hf):
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)

    from lmforge import convert

    if args.action == "hf-to-lmforge":
        out = convert.hf_to_lmforge(args.source, args.output, objective=args.objective, overwrite=args.overwrite)
    else:
        out = convert.lmforge_to_hf(args.source, args.output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


TOOLS = {
    "generate": generate_command,
    "plugins": plugins_command,
    "tokenizer": tokenizer_command,
    "convert": convert_command,
}


if __name__ == "__main__":
    sys.exit(main())
