"""Small helpers shared by the benchmark scripts: threads, input data, quiet Lightning, summaries."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import warnings

import torch


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the CPUs this process may run on); return it."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def random_batches(n: int, batch: int, block: int, vocab: int, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """``n`` pre-generated ``{"input_ids": (batch, block)}`` batches of uniform random token ids."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, block), generator=gen)} for _ in range(n)]


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer banners and the warnings that do not apply to a benchmark."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",  # num_workers=0 is deliberate: both sides read an in-memory list
        ".*smaller than the logging interval.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*litlogger.*",
        ".*but have no `val_dataloader`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``min..max (±x% of the median)``: how noisy the rounds were."""
    m = median(values)
    half = (max(values) - min(values)) / 2
    return f"{min(values):,.0f}..{max(values):,.0f} (±{100 * half / m:.1f}%)"


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.machine()} {cpus}-CPU, torch {torch.__version__}, python {platform.python_version()}"
