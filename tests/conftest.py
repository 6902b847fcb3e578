"""Shared fixtures: a small corpus, its tokenizer, and a writer for tiny training configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog bird sat ran flew on under over mat tree house red blue big small and then".split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test tokenizes into a cache of its session, never the user's ~/.cache."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "lmforge-cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """train.txt / val.txt of short random sentences and a 300-token BPE tokenizer trained on them."""
    from lmforge.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, n in (("train.txt", 1500), ("val.txt", 100)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]
        (root / name).write_text("\n".join(lines) + "\n")
    train_tokenizer([str(root / "train.txt")], str(root / "tokenizer.json"), vocab_size=300)
    return {"train": root / "train.txt", "val": root / "val.txt", "tokenizer": root / "tokenizer.json", "root": root}


def tiny_config(corpus: dict[str, Path], run_dir: Path, architecture: dict | None = None, **trainer) -> dict:
    """A config for a 2-layer GPT that fits in a few seconds."""
    return {
        "seed_everything": 7,
        "trainer": {
            "default_root_dir": str(run_dir),
            "max_steps": 6,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **trainer,
        },
        "model": {
            "class_path": "decoder",
            "init_args": {
                "architecture": architecture
                or {"class_path": "gpt", "init_args": {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}},
                "objective": {"class_path": "clm"},
                "warmup_steps": 2,
                "lr": 1e-3,
            },
        },
        "data": {
            "train_files": str(corpus["train"]),
            "val_files": str(corpus["val"]),
            "tokenizer": str(corpus["tokenizer"]),
            "block_size": 32,
            "batch_size": 4,
        },
    }


def packed_rows(text_file: Path, tokenizer, block_size: int) -> torch.Tensor:
    """The rows a packed text split holds, rebuilt by hand: every line's ids + end-of-text, cut into blocks."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    stream = []
    for line in text_file.read_text().splitlines():
        if line.strip():
            stream += tokenizer.encode(line, add_special_tokens=False).ids + [eos]
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size]).view(n, block_size)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
