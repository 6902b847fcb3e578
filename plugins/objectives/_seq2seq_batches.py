"""What the seq2seq pretraining objectives (``span_corruption``, ``denoising``) share: the per-batch
corruption generator, the padding of (inputs, labels) pairs and the loss.

A private helper module of this package, registered as no plugin (no entry point): both
objectives corrupt rows on the host into pairs of different lengths, so they batch and score them
the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge import SpecialTokens
from lmforge.plugin_api import IGNORE_INDEX


def batch_rng(seed: int, rows: list[np.ndarray]) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the token ids of ``rows``.

    So the corruption of a batch is the same in any data-loader worker or process and after a
    resume, without any generator state to carry.
    """
    digest = hashlib.blake2b(digest_size=16)
    for row in rows:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
        digest.update(b"|")
    return np.random.default_rng([seed, *np.frombuffer(digest.digest(), dtype=np.uint32).tolist()])


def pad_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], special: SpecialTokens) -> dict[str, torch.Tensor]:
    """Right-pad inputs (pad token, ``attention_mask`` only when some row is padded) and labels (-100)."""
    pad = special.pad_id if special.pad_id is not None else special.eos_id
    in_len = max(len(i) for i, _ in pairs)
    out_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), in_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), in_len), dtype=torch.long)
    labels = torch.full((len(pairs), out_len), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(pairs):
        input_ids[row, : len(inputs)] = torch.from_numpy(inputs)
        attention_mask[row, : len(inputs)] = 1
        labels[row, : len(targets)] = torch.from_numpy(targets)
    batch = {"input_ids": input_ids, "labels": labels}
    if not bool(attention_mask.all()):
        batch["attention_mask"] = attention_mask
    return batch


def seq2seq_loss(module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token-mean cross-entropy of the labels; the token count stays on the device (no host sync)."""
    labels = batch["labels"]
    logits = module(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    return {"loss": loss, "tokens": (labels != IGNORE_INDEX).sum()}
