"""The ``lmforge`` command.

``fit | validate | test | predict`` are LightningCLI subcommands driven by YAML (``--config``) with
dotted overrides; ``generate``, ``plugins`` and ``tokenizer`` are small tools of their own. Every
user mistake ends as one paragraph on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hidden network: nothing is ever downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmforge.errors import LmforgeError, ToolArgumentParser, closest, find_user_error  # noqa: E402

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
              many prompts, to JSONL:        lmforge generate --checkpoint RUN_DIR --prompts_file P.txt --output out.jsonl
  plugins     list the installed plugins:    lmforge plugins list [--json]
              check that plugins conform:    lmforge plugins check NAME [--kind KIND]
              start a plugin package:        lmforge plugins new NAME --kind architecture|objective|task
  tokenizer   train a tokenizer:             lmforge tokenizer train FILES... --output tokenizer.json
  convert     move weights between formats:  lmforge convert hf-to-lmforge HF_DIR OUT
                                             lmforge convert lmforge-to-hf CKPT_OR_DIR OUT
                                             lmforge convert zero-to-safetensors RUN_OR_CKPT OUT
  estimate    memory per device, beforehand: lmforge estimate --config X.yaml --devices 8 --strategy deepspeed_stage_3
  doctor      preflight a multi-node launch: lmforge doctor --config X.yaml

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
            try:
                run_trainer_cli(argv)
            finally:
                close_process_group()
                stop_leftover_workers()
            return 0
        if command in TOOLS:
            return TOOLS[command](argv[1:])
        raise LmforgeError(
            f"Unknown command '{command}'.{closest(command, [*TRAINER_COMMANDS, *TOOLS])} "
            f"Commands: {', '.join([*TRAINER_COMMANDS, *TOOLS])} (see `lmforge --help`)."
        )
    except BrokenPipeError:  # the reader went away (`lmforge ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail too
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"lmforge: error: {user_error}", file=sys.stderr)
        return 2


def stop_leftover_workers() -> None:
    """Kill the data-loader workers a failed run left alive (this process's daemonic children).

    They ignore SIGTERM (lmforge.reliability.resume), and persistent workers of a loader an error
    interrupted (a failed save after validation) outlive the run; multiprocessing's exit handler
    sends them SIGTERM and joins them, which would wait forever.
    """
    import multiprocessing
    import signal
    import threading

    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers or threading.current_thread() is not threading.main_thread():
        return
    # torch's SIGCHLD handler raises here when a worker dies; these die on purpose (and are reaped
    # before it is back, so it does not see them later)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in workers:
            child.kill()
            child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def close_process_group() -> None:
    """Destroy the torch.distributed process group a run made, before the interpreter exits.

    Left to interpreter shutdown, tearing it down (gloo, DeepSpeed's CPU communicator) now and then
    aborted a process that had finished its work ("terminate called without an active exception",
    SIGABRT); torchrun then waits out its 5-minute exit barrier and reports the whole job failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _take_plugins_option(argv: list[str]) -> list[str]:
    """Remove ``--plugins a,b`` from argv and export the modules to every process we start."""
    from lmforge.plugin_manager import add_plugin_modules, env_modules

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
    if (modules or env_modules()) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a plugin module beside the config, with --plugins or $LMFORGE_PLUGINS alike
    if modules:
        add_plugin_modules(m.strip() for m in modules if m.strip())
    return out


def run_trainer_cli(argv: list[str], run: bool = True):
    """Run a LightningCLI subcommand and return the CLI object; ``run=False`` only builds it."""
    from lmforge.reliability.failfast import release_run_directory
    from lmforge.training_cli import LmforgeCLI

    if not run and argv and argv[0] in TRAINER_COMMANDS:
        argv = argv[1:]
    try:
        return LmforgeCLI(args=argv, run=run)
    finally:
        release_run_directory()


# -- tools -----------------------------------------------------------------------------------------
def plugins_command(argv: list[str]) -> int:
    kinds, families = ("architecture", "objective", "task"), ("decoder", "encoder", "seq2seq")
    parser = ToolArgumentParser(prog="lmforge plugins", description="List, check and create plugins.")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="every plugin: name, kind, families, package, version, status")
    listing.add_argument("--json", action="store_true", help="print JSON (broken plugins with a traceback summary)")
    check = sub.add_parser("check", help="run the conformance checks on plugins; exit status 1 if any check fails")
    check.add_argument("names", nargs="+", metavar="NAME", help="plugin name(s), as in YAML")
    check.add_argument("--kind", choices=kinds, help="needed only when a name is used by several kinds")
    check.add_argument("--partner", action="append", metavar="NAME",
                       help="pair with this plugin instead of lmforge's built-ins (repeatable)")
    check.add_argument("--json", action="store_true", help="print the reports as JSON")
    new = sub.add_parser("new", help="write a ready-to-install plugin package lmforge-NAME/ from a template")
    new.add_argument("name", help="the plugin's short name: a lowercase Python identifier")
    new.add_argument("--kind", required=True, choices=kinds)
    new.add_argument("--family", default="decoder", choices=families, help="the family it is written for")
    new.add_argument("--output", default=".", help="folder in which lmforge-NAME/ is created (default: here)")
    args = parser.parse_args(argv)

    if args.action == "new":
        from lmforge.scaffold import create_plugin_package, next_steps

        path = create_plugin_package(args.name, args.kind, output=args.output, family=args.family)
        print(next_steps(path, args.name, args.kind))
        return 0
    if args.action == "check":
        from lmforge.testing import check_plugin

        reports = [check_plugin(name, args.kind, partners=args.partner) for name in args.names]
        print(json.dumps([r.to_dict() for r in reports], indent=2) if args.json else "\n\n".join(map(str, reports)))
        return 0 if all(r.ok for r in reports) else 1

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
                "name": ",".join(broken.names) or broken.source.module,
                "kind": "?",
                "families": [],
                "package": broken.source.package,
                "version": broken.source.version,
                "status": "broken: " + broken.reason,
                "module": broken.source.module,
                "traceback": list(broken.frames),
                "short": "broken: " + broken.one_line(),
            }
        )
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "short"} for r in rows], indent=2))
        return 0
    headers = ["name", "kind", "families", "package", "version", "status"]
    table = [[r["name"], r["kind"], ",".join(r["families"]), r["package"], r["version"], r.get("short", r["status"])]
             for r in rows]
    widths = [max(len(h), *(len(str(row[i])) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if registry.broken:
        print(f"{len(registry.broken)} plugin module(s) failed to load; the other plugins work. "
              "`lmforge plugins list --json` shows where each failed (a traceback summary).", file=sys.stderr)
    return 0


def tokenizer_command(argv: list[str]) -> int:
    parser = ToolArgumentParser(prog="lmforge tokenizer", description="Train tokenizers.")
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
    parser = ToolArgumentParser(
        prog="lmforge generate",
        description="Generate text with a decoder checkpoint (continues each prompt) or a seq2seq checkpoint "
        "(each prompt is the encoder input; prints the decoder output). A single prompt is printed as it is "
        "generated; many prompts (--prompts_file) are generated in batches.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file, a run directory (its last.ckpt) or a model folder")
    parser.add_argument("--prompt", help="the text to continue (or, for seq2seq, to transform)")
    parser.add_argument("--prompts_file", help="a text file with one prompt per line (blank lines skipped); - reads stdin")
    parser.add_argument("--output", help="write JSONL here: one line per prompt, {\"prompt\": ..., \"generated\": [...]}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8; 0 = greedy)")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample from the smallest set holding probability p")
    parser.add_argument("--min_p", type=float, default=None, help="drop tokens below min_p x the top probability")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="sequences per prompt (sampling or beams)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the generated text contains TEXT, which is left out (repeatable)")
    parser.add_argument("--stop_token", action="append", default=[], metavar="TOKEN",
                        help="stop at this token of the vocabulary, e.g. '<|endoftext|>' (repeatable; EOS always stops)")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam score = log-prob / length**this")
    parser.add_argument("--early_stopping", action="store_true", help="stop beam search at num_beams finished")
    parser.add_argument("--no_stream", action="store_true", help="print a single prompt's text only at the end")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from lmforge.checkpoint import load_model
    from lmforge.data.tokenizer import find_special_tokens
    from lmforge.generation import TextStream, cut_at_stop_string, generate_batch
    from lmforge.output_files import check_output_file, expand_inputs, temporary_sibling

    prompts = _read_prompts(args)
    config = _generation_config(args)
    if args.output:
        inputs = expand_inputs([args.prompts_file] if args.prompts_file not in (None, "-") else None)
        checkpoint = Path(args.checkpoint)
        inputs += list(checkpoint.rglob("*")) if checkpoint.is_dir() else [checkpoint]
        check_output_file(args.output, "--output", args.overwrite, inputs)
    model = load_model(args.checkpoint, map_location=_check_device(args.device))
    if model.family not in ("decoder", "seq2seq"):
        raise LmforgeError(
            f"`lmforge generate` needs a decoder or seq2seq checkpoint; {args.checkpoint} is a {model.family} model."
        )
    tokenizer = model.tokenizer()
    special = find_special_tokens(tokenizer)
    config.stop_token_ids = tuple(_token_id(tokenizer, token) for token in args.stop_token)
    seq2seq = model.family == "seq2seq"
    if seq2seq:
        # The encoder input ends with EOS, as in training (span corruption, denoising). Sentinels
        # (<extra_id_N>) and mask tokens stay visible in the output: they say which gap the text fills.
        eos = [special.eos_id] if special.eos_id is not None else []
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids + eos
        hidden = {special.eos_id, special.pad_id, special.bos_id} - {None}
        text_of = lambda ids: tokenizer.decode([t for t in ids if t not in hidden], skip_special_tokens=False)
    else:
        encode = lambda text: tokenizer.encode(text).ids
        text_of = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    shown_prompt = (lambda p: "") if seq2seq else (lambda p: p)  # a decoder's output continues its prompt

    def run(batch: list[str], on_token=None) -> list[list[str]]:
        results = generate_batch(
            model.architecture, model.family, [encode(p) for p in batch], config,
            pad_id=special.pad_id, eos_id=special.eos_id, decode=text_of, on_token=on_token,
        )
        return [[cut_at_stop_string(text_of(ids), config.stop_strings) for ids in sequences] for sequences in results]

    stream = len(prompts) == 1 and config.num_return_sequences == 1 and config.num_beams == 1 \
        and not args.no_stream and not args.output
    if stream:
        text = TextStream(text_of, config.stop_strings)
        started = []

        def show(tokens: list[int | None]) -> None:
            if not started:  # the prompt, once generation has begun (a refused prompt prints nothing)
                started.append(True)
                print(shown_prompt(prompts[0]), end="", flush=True)
            if tokens[0] is not None:
                print(text.push(tokens[0]), end="", flush=True)

        run(prompts, on_token=show)
        print(("" if started else shown_prompt(prompts[0])) + text.finish())
        return 0
    partial = temporary_sibling(Path(args.output)) if args.output else None
    try:
        sink = open(partial, "w", encoding="utf-8") if partial else None  # noqa: SIM115
    except OSError as exc:
        raise LmforgeError(
            f"Cannot write --output {args.output}: {exc.strerror or exc}. Give a path in an existing, writable directory."
        ) from None
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            for prompt, texts in zip(batch, run(batch)):
                if sink is not None:
                    sink.write(json.dumps({"prompt": prompt, "generated": texts}, ensure_ascii=False) + "\n")
                else:
                    for text in texts:
                        print(shown_prompt(prompt) + text)
        if sink is not None:
            sink.close()
            os.replace(partial, args.output)  # only a complete file takes the name
    finally:
        if sink is not None:
            sink.close()
            partial.unlink(missing_ok=True)
    if sink is not None:
        print(f"wrote {args.output} ({len(prompts)} prompt{'s' if len(prompts) != 1 else ''})")
    return 0


def _read_prompts(args) -> list[str]:
    """The prompts of ``--prompt`` or ``--prompts_file`` (one per line; ``-`` is standard input)."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise LmforgeError(
            "`lmforge generate` needs exactly one of --prompt TEXT or --prompts_file FILE (one prompt per line; "
            "--prompts_file - reads them from standard input)."
        )
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts_file == "-":
        lines = _read_stdin_utf8().splitlines()
    else:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LmforgeError(f"Cannot read --prompts_file {args.prompts_file}: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            from lmforge.data.datamodule import check_utf8

            check_utf8(args.prompts_file)  # raises, naming the bad byte and line and how to re-encode
            raise
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise LmforgeError(f"--prompts_file {args.prompts_file} holds no prompt (every line is blank); "
                           "write one prompt per line.")
    return prompts


def _read_stdin_utf8() -> str:
    """Standard input decoded as UTF-8 whatever the locale, or a clear error naming the first bad byte."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise LmforgeError(
            f"Standard input (--prompts_file -) is not valid UTF-8: byte {exc.start} (line {line}) is "
            f"0x{raw[exc.start]:02x} ({exc.reason}). lmforge reads prompts as UTF-8; re-encode them on the way in, "
            "for example `iconv -f latin1 -t utf-8 prompts.txt | lmforge generate ... --prompts_file -`."
        ) from None


def _generation_config(args):
    """A validated GenerationConfig from the command line (stop tokens are added once the tokenizer is known)."""
    from lmforge.generation import GenerationConfig

    if args.batch_size < 1:
        raise LmforgeError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.num_beams > 1 and (args.temperature is not None or args.top_k is not None or args.top_p is not None
                               or args.min_p is not None):
        raise LmforgeError(
            "--num_beams > 1 (beam search) is deterministic: leave out --temperature, --top_k, --top_p and --min_p, "
            "or use --num_beams 1 to sample."
        )
    temperature = 1.0 if args.num_beams > 1 else (0.8 if args.temperature is None else args.temperature)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping,
        num_return_sequences=args.num_return_sequences, stop_strings=tuple(args.stop), seed=args.seed,
    )
    config.validate()
    return config


def _check_device(name: str) -> str:
    """``--device`` itself when torch can place the model there, else an LmforgeError saying what exists."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        have = f"{torch.cuda.device_count()} CUDA GPU(s) visible" if torch.cuda.is_available() else "no CUDA GPU"
        raise LmforgeError(f"--device {name}: this machine has {have}. Use --device cpu or an existing cuda:N.")
    return name


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        special = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        listed = f" Its special tokens: {', '.join(special)}." if special else ""
        raise LmforgeError(
            f"--stop_token {token!r} is not a token of this model's vocabulary.{listed} Give a single token as the "
            f"tokenizer spells it, or use --stop TEXT to stop at any text."
        )
    return token_id


def convert_command(argv: list[str]) -> int:
    parser = ToolArgumentParser(prog="lmforge convert", description="Convert model weights between formats.")
    sub = parser.add_subparsers(dest="action", required=True)
    to_lmforge = sub.add_parser("hf-to-lmforge", help="a Hugging Face folder -> an lmforge model folder")
    to_lmforge.add_argument("source", help="folder with config.json and model.safetensors")
    to_lmforge.add_argument("output", help="new lmforge model folder")
    to_lmforge.add_argument("--objective", default=None, help="objective to pair with (default: the architecture's)")
    to_hf = sub.add_parser("lmforge-to-hf", help="an lmforge checkpoint, run directory or model folder -> Hugging Face")
    to_hf.add_argument("source", help=".ckpt file, run directory or lmforge model folder")
    to_hf.add_argument("output", help="new Hugging Face folder (config.json, model.safetensors, tokenizer.json)")
    zero = sub.add_parser(
        "zero-to-safetensors", help="a DeepSpeed ZeRO checkpoint (sharded) -> an lmforge model folder, streamed"
    )
    zero.add_argument("source", help="run directory (its checkpoints/last.ckpt) or a DeepSpeed checkpoint directory")
    zero.add_argument("output", help="new lmforge model folder (model.safetensors, lmforge.json, tokenizer.json)")
    zero.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    for p in (to_lmforge, to_hf, zero):
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    args = parser.parse_args(argv)

    from lmforge import convert

    source, output = Path(args.source).resolve(), Path(args.output).resolve()
    if output == source or output in source.parents:
        raise LmforgeError(
            f"`lmforge convert {args.action}` would write into its own source ({args.source}), replacing the weights it "
            "reads. Give OUT a new folder."
        )
    if args.action == "zero-to-safetensors":
        from lmforge.zero_checkpoint import consolidate

        out = consolidate(args.source, args.output, overwrite=args.overwrite, dtype=args.dtype)
    elif args.action == "hf-to-lmforge":
        out = convert.hf_to_lmforge(args.source, args.output, objective=args.objective, overwrite=args.overwrite)
    else:
        out = convert.lmforge_to_hf(args.source, args.output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def estimate_command(argv: list[str]) -> int:
    from lmforge.estimate import estimate_command as run

    return run(argv)


def doctor_command(argv: list[str]) -> int:
    from lmforge.doctor import doctor_command as run

    return run(argv)


TOOLS = {
    "generate": generate_command,
    "plugins": plugins_command,
    "tokenizer": tokenizer_command,
    "convert": convert_command,
    "estimate": estimate_command,
    "doctor": doctor_command,
}


if __name__ == "__main__":
    sys.exit(main())
