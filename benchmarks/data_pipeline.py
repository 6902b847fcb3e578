"""Tokenize + pack throughput (MB of text per second) of lmforge's ``TextDataModule.prepare_data``
against a ``transformers``-examples-style ``datasets`` pipeline, and the peak memory of each as the
corpus grows 10x.

The corpora are made from the shipped ``lmforge/data/corpus/tiny_stories_train.txt``, repeated (each
copy's documents in another seeded order) into a temporary directory: a ``--base-mb`` corpus (1x,
default 10 MB) and one ``--growth`` times as large (default 10x). Both pipelines read the same files (train: the corpus; validation:
the shipped ``tiny_stories_validation.txt``) with the same tokenizer (``lmforge/data/corpus/
tokenizer.json``) into rows of the same ``--block`` tokens, documents separated by ``<|endoftext|>``:

* lmforge: ``TextDataModule(train_files=..., val_files=..., tokenizer=..., block_size=...,
  cache_dir=<fresh>).prepare_data()`` (reads and checks the files, tokenizes, packs, and saves the
  cache of rows);
* reference, as ``transformers/examples/pytorch/language-modeling/run_clm.py`` does it:
  ``datasets.load_dataset("text", data_files={"train": ..., "validation": ...})``, then
  ``.map(tokenize_function, batched=True)`` with ``PreTrainedTokenizerFast(tokenizer_file=...)``,
  then ``.map(group_texts, batched=True)`` (concatenate each batch of 1,000 documents and cut it into
  ``block``-token rows; the examples drop each batch's remainder). The one change from the example:
  ``tokenize_function`` appends ``<|endoftext|>`` to each document, as lmforge does, so both make
  the same rows (the GPT-2 tokenizer of the example separates nothing).

Each run is a fresh subprocess with fresh caches; it reports the seconds of the pipeline alone
(imports and tokenizer loading excluded) and its peak resident memory (``ru_maxrss``: the process's
high-water mark, imports included, so flat means the pipeline does not hold the corpus in memory).
MB/s counts the bytes of the train + validation files. A check compares the rows: the first rows
(those before the reference's first dropped remainder) must be identical token for token.

    python benchmarks/data_pipeline.py                  # ~1 minute on a quiet 2-core machine
    python benchmarks/data_pipeline.py --base-mb 0.5 --growth 2    # smoke run, ~15 s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "lmforge" / "data" / "corpus"
EOS = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 10 MB: datasets' text reader (used by both pipelines) reads 10 MB chunks, so a smaller 1x corpus
    # would count that fixed buffer's growth as growth with the corpus.
    p.add_argument("--base-mb", type=float, default=10.0, help="size of the 1x training corpus in MB (default 10)")
    p.add_argument("--growth", type=int, default=10, help="the large corpus is this many times the 1x one (default 10)")
    p.add_argument("--block", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--tokenizer", default=str(CORPUS / "tokenizer.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["lmforge", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--val", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)  # rows a worker reports for the check
    return p.parse_args(argv)


def make_corpus(path: Path, megabytes: float, seed: int) -> int:
    """Write copies of the shipped corpus, each in another seeded document order, until ``megabytes``."""
    documents = [line for line in (CORPUS / "tiny_stories_train.txt").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    rng = random.Random(seed)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(documents)
            for doc in documents:
                line = doc + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return written


# -- the two pipelines, each run in a fresh process -----------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``, Linux), sampled every millisecond by a thread.

    Resident memory also counts the pages of memory-mapped files that have been read (the reference
    reads its Arrow files through mmap; the kernel can drop those pages at any time). ``RssAnon`` is
    what the process itself allocated: it grows with the corpus only if the data is held in memory.
    """

    def __init__(self) -> None:
        self.peak = self.base = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def run_lmforge(args, work: Path) -> tuple[float, Callable[[], Any]]:
    """Seconds of ``prepare_data``, and how to open the train rows it cached."""
    import datasets

    from lmforge.data.datamodule import TextDataModule

    dm = TextDataModule(train_files=args.train, val_files=args.val, tokenizer=args.tokenizer, block_size=args.block,
                        cache_dir=str(work / "cache"))
    t0 = time.perf_counter()
    dm.prepare_data()
    seconds = time.perf_counter() - t0
    return seconds, lambda: datasets.load_from_disk(str(dm.cache_path / "train"))


def run_reference(args, work: Path) -> tuple[float, Callable[[], Any]]:
    """Seconds of run_clm.py's loading, tokenizing and grouping, and its train rows."""
    from itertools import chain

    import datasets
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=args.tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    block_size = args.block

    def tokenize_function(batch):
        """The examples' tokenizer call (ids and attention mask), plus a separator after each document."""
        encoded = tokenizer(batch["text"])
        encoded["input_ids"] = [ids + [eos] for ids in encoded["input_ids"]]
        encoded["attention_mask"] = [mask + [1] for mask in encoded["attention_mask"]]
        return encoded

    def group_texts(batch):
        """Join the batch's documents and cut every column into ``block_size`` rows; drop the rest."""
        joined = {column: list(chain.from_iterable(values)) for column, values in batch.items()}
        usable = len(joined["input_ids"]) // block_size * block_size
        rows = {column: [values[start: start + block_size] for start in range(0, usable, block_size)]
                for column, values in joined.items()}
        rows["labels"] = rows["input_ids"].copy()
        return rows

    t0 = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": args.train, "validation": args.val},
                                cache_dir=str(work / "hf"))
    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    lm_datasets = tokenized.map(group_texts, batched=True)
    seconds = time.perf_counter() - t0
    return seconds, lambda: lm_datasets["train"]


def worker(args) -> None:
    """Run one pipeline; print one JSON line: seconds, peak RSS before/after, the first rows."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="lmforge-data-bench-") as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf-home")
        run = run_lmforge if args.worker == "lmforge" else run_reference
        if args.worker == "lmforge":
            import lmforge.data.datamodule  # noqa: F401  (imports before the baseline, as for the reference)
        else:
            import transformers  # noqa: F401
        baseline = peak_rss_mb()
        with AnonPeak() as anon:
            seconds, rows = run(args, Path(tmp))
        peak = peak_rss_mb()  # before reading the rows back for the check
        rows = rows()
        first = rows.select(range(min(args.rows, len(rows))))["input_ids"]
        print(json.dumps({"seconds": seconds, "peak_mb": peak, "baseline_mb": baseline, "anon_peak_mb": anon.peak,
                          "anon_base_mb": anon.base, "n_rows": len(rows), "first_rows": [list(r) for r in first]}))


# -- driver ---------------------------------------------------------------------------------------


def rows_before_first_drop(train: Path, args) -> int:
    """Rows the reference cuts from its first map batch (1,000 documents, each + <|endoftext|>)."""
    from tokenizers import Tokenizer

    with open(train, encoding="utf-8") as f:
        documents = [line.rstrip("\n") for _, line in zip(range(1000), f)]
    tokenizer = Tokenizer.from_file(args.tokenizer)
    tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(documents, add_special_tokens=False))
    return tokens // args.block


def measure(args, pipeline: str, train: Path, val: Path, rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", pipeline, "--train", str(train), "--val", str(val),
           "--block", str(args.block), "--tokenizer", args.tokenizer, "--rows", str(rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {pipeline} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    val = CORPUS / "tiny_stories_validation.txt"
    print(f"data_pipeline: TextDataModule.prepare_data vs transformers-examples load_dataset + map(tokenize) + "
          f"map(group_texts) | {cpus} CPUs, python {sys.version.split()[0]}\n  tokenizer {args.tokenizer}, "
          f"block {args.block}; validation file {val.name} ({val.stat().st_size / 1e6:.2f} MB) on both; "
          f"one fresh process and cache per run", flush=True)
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-data-corpus-") as tmp:
        sizes = {"1x": args.base_mb, f"{args.growth}x": args.base_mb * args.growth}
        for label, mb in sizes.items():
            train = Path(tmp) / f"train-{label}.txt"
            total = make_corpus(train, mb, args.seed) + val.stat().st_size
            check_rows = rows_before_first_drop(train, args) if label == "1x" else 0
            for pipeline in ("lmforge", "reference"):
                res = measure(args, pipeline, train, val, check_rows)
                res["mb_per_s"] = total / 1e6 / res["seconds"]
                results[(label, pipeline)] = res
                print(f"{label:>4} corpus {total / 1e6:6.1f} MB  {pipeline:<9} {res['seconds']:6.1f} s  "
                      f"{res['mb_per_s']:6.2f} MB/s  peak RSS {res['peak_mb']:7.0f} MB (after imports "
                      f"{res['baseline_mb']:.0f} MB), anonymous {res['anon_peak_mb']:.0f} MB (after imports "
                      f"{res['anon_base_mb']:.0f} MB)  {res['n_rows']:,} train rows  load avg {os.getloadavg()[0]:.2f}",
                      flush=True)
    small, large = "1x", f"{args.growth}x"
    ours, theirs = results[(small, "lmforge")], results[(small, "reference")]
    pairs = list(zip(ours["first_rows"], theirs["first_rows"]))
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    verdict = "identical" if same == len(pairs) == len(theirs["first_rows"]) > 0 else f"DIFFERENT from row {same}"
    print(f"check: the first {len(pairs)} train rows of the 1x corpus (the reference's first map batch) are "
          f"{verdict} in both pipelines (rows in all: lmforge {ours['n_rows']:,}, reference {theirs['n_rows']:,}; "
          f"the reference drops each 1,000-document batch's remainder)")
    for label in (small, large):
        ratio = results[(label, "lmforge")]["mb_per_s"] / results[(label, "reference")]["mb_per_s"]
        print(f"throughput {label:>4}: lmforge {results[(label, 'lmforge')]['mb_per_s']:.2f} MB/s, reference "
              f"{results[(label, 'reference')]['mb_per_s']:.2f} MB/s -> ratio lmforge/reference = {ratio:.2f}")
    for pipeline in ("lmforge", "reference"):
        a, b = results[(small, pipeline)], results[(large, pipeline)]
        for what, key, base in (("peak RSS", "peak_mb", "baseline_mb"), ("peak anonymous", "anon_peak_mb", "anon_base_mb")):
            growth = b[key] / a[key]
            print(f"memory {pipeline:<9} {what:<14}: {a[key]:5.0f} MB at {small} -> {b[key]:5.0f} MB at {large}: "
                  f"x{growth:.2f} ({'flat, within 15%' if growth <= 1.15 else 'NOT flat, grew more than 15%'}); "
                  f"above the imports {a[key] - a[base]:.0f} -> {b[key] - b[base]:.0f} MB")
    ratio = results[(large, "lmforge")]["mb_per_s"] / results[(large, "reference")]["mb_per_s"]
    print(f"ratio lmforge/reference MB/s ({large} corpus) = {ratio:.2f}")
    print(f"(total wall time {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
