"""T5 span corruption: exact format, reconstruction, noise density, packed lengths, reproducibility."""

import numpy as np
import pytest
import torch

from lmforge import LmforgeError, SpecialTokens
from lmforge_plugins.objectives.span_corruption import (
    SpanCorruption,
    noise_span_to_unique_sentinel,
    random_spans_noise_mask,
)

VOCAB = 1000
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> is the last id, counting down (T5)
SPECIAL = SpecialTokens(vocab_size=VOCAB, pad_id=1, eos_id=2, sentinel_ids=SENTINELS)


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Put each span of the targets back in place of its sentinel in the inputs (both end with EOS)."""
    assert inputs[-1] == SPECIAL.eos_id and targets[-1] == SPECIAL.eos_id
    spans, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(token) if token in SENTINELS else [token])
    assert not spans  # every span was used
    return out


def test_t5_paper_example_by_hand():
    """The example of the T5 paper (Raffel et al. 2020, figure 2) with its noise mask."""
    words = "Thank you for inviting me to your party last week .".split()
    vocab = {w: i + 10 for i, w in enumerate(words)}
    tokens = np.array([vocab[w] for w in words])
    mask = np.array([w in ("for", "inviting", "last") for w in words])
    sentinels = np.array(SENTINELS)
    x, y, z = SENTINELS[:3]
    inputs = noise_span_to_unique_sentinel(tokens, mask, sentinels).tolist()
    targets = noise_span_to_unique_sentinel(tokens, ~mask, sentinels).tolist()
    t = vocab
    assert inputs == [t["Thank"], t["you"], x, t["me"], t["to"], t["your"], t["party"], y, t["week"], t["."]]
    assert targets == [x, t["for"], t["inviting"], y, t["last"], z]


def test_noise_mask_follows_t5():
    rng = np.random.default_rng(0)
    for length in (2, 5, 20, 141, 568):
        for _ in range(20):
            mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
            noise = max(min(round(length * 0.15), length - 1), 1)
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            assert mask.sum() == noise
            assert starts.sum() == max(round(noise / 3.0), 1)
            assert not mask[0] and mask[-1]  # non-noise first, noise last, alternating


def test_collate_format_reconstructs_the_rows():
    objective = SpanCorruption(seed=11)
    length = objective.packed_length(64)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, 500, length).tolist() for _ in range(8)]
    batch = objective.collate([{"input_ids": r} for r in rows], SPECIAL)
    assert set(batch) == {"input_ids", "labels"}  # packed rows: no padding, no attention mask
    assert batch["input_ids"].shape == (8, 64)
    assert batch["labels"].shape == (8, objective.target_length(64))
    for row, inputs, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert reconstruct(inputs, labels) == row
        assert labels[0] == SENTINELS[0]  # targets start with <extra_id_0>
        used = [t for t in inputs if t in SENTINELS]
        assert used == list(SENTINELS[: len(used)])  # in order, counting down from the top


def test_noise_density_and_span_length_over_many_rows():
    objective = SpanCorruption(noise_density=0.15, mean_noise_span_length=3.0, seed=0)
    rng = np.random.default_rng(2)
    noise, total, spans = 0, 0, 0
    for _ in range(50):
        rows = [rng.integers(3, 500, rng.integers(100, 300)).tolist() for _ in range(4)]
        batch = objective.collate([{"input_ids": r} for r in rows], SPECIAL)
        for row, labels in zip(rows, batch["labels"]):
            labels = labels[labels != -100][:-1]
            sentinel = torch.isin(labels, torch.tensor(SENTINELS))
            noise += int((~sentinel).sum())
            spans += int(sentinel.sum())
            total += len(row)
    print(f"realised noise density {noise / total:.4f}, mean span length {noise / spans:.3f}")
    assert abs(noise / total - 0.15) < 0.01 * 0.15
    assert abs(noise / spans - 3.0) < 0.05 * 3.0


@pytest.mark.parametrize("block_size", [16, 64, 128, 512, 513])
@pytest.mark.parametrize("density,span", [(0.15, 3.0), (0.5, 8.0), (0.3, 2.0)])
def test_packed_rows_fill_the_block(block_size, density, span):
    objective = SpanCorruption(noise_density=density, mean_noise_span_length=span)
    length = objective.packed_length(block_size)
    assert length > block_size
    rows = [{"input_ids": list(range(3, 3 + length))} for _ in range(2)]
    batch = objective.collate(rows, SpecialTokens(vocab_size=VOCAB + length, pad_id=1, eos_id=2, sentinel_ids=SENTINELS))
    assert batch["input_ids"].shape == (2, block_size)
    assert batch["labels"].shape == (2, objective.target_length(block_size))
    # One more raw token would overflow the block.
    longer = objective.collate([{"input_ids": list(range(3, 4 + length))}], SpecialTokens(
        vocab_size=VOCAB + length, pad_id=1, eos_id=2, sentinel_ids=SENTINELS))
    assert longer["input_ids"].shape[1] == block_size + 1


def test_t5_lengths_for_its_own_setting():
    """T5 pretraining: inputs of 512 tokens come from rows of 568 tokens and give 114-token targets."""
    objective = SpanCorruption()
    assert objective.packed_length(512) == 568 and objective.target_length(512) == 114


def test_reproducible_per_batch_and_padded_when_ragged():
    objective = SpanCorruption(seed=5)
    rows = [{"input_ids": list(range(10, 60))}, {"input_ids": list(range(100, 130))}]
    first = objective.collate(rows, SPECIAL)
    assert all(torch.equal(first[k], objective.collate(rows, SPECIAL)[k]) for k in first)
    other_seed = SpanCorruption(seed=6).collate(rows, SPECIAL)
    assert not torch.equal(first["input_ids"], other_seed["input_ids"])
    assert first["attention_mask"][1].sum() < first["attention_mask"][0].sum()
    for i, row in enumerate(rows):
        n = int(first["attention_mask"][i].sum())
        labels = first["labels"][i]
        assert reconstruct(first["input_ids"][i, :n].tolist(), labels[labels != -100].tolist()) == row["input_ids"]


def test_errors_name_the_fix():
    rows = [{"input_ids": list(range(10, 60))}]
    with pytest.raises(LmforgeError, match="sentinel tokens.*tokenizer_t5.json"):
        SpanCorruption().collate(rows, SpecialTokens(vocab_size=VOCAB, pad_id=1, eos_id=2))
    with pytest.raises(LmforgeError, match="needs 5 sentinel tokens"):
        SpanCorruption(noise_density=0.3, mean_noise_span_length=3.0).collate(
            rows, SpecialTokens(vocab_size=VOCAB, pad_id=1, eos_id=2, sentinel_ids=SENTINELS[:2]))
    with pytest.raises(LmforgeError, match="noise_density"):
        SpanCorruption(noise_density=1.5)


def test_datamodule_packs_rows_for_the_objective(corpus, tmp_path):
    """Attached to a trainer whose module trains span corruption, the datamodule packs longer rows."""
    from types import SimpleNamespace

    from lmforge.data.datamodule import TextDataModule

    def datamodule():
        return TextDataModule(train_files=str(corpus["train"]), val_files=str(corpus["val"]),
                              tokenizer=str(corpus["tokenizer"]), block_size=32, cache_dir=str(tmp_path))

    plain = datamodule()
    objective = SpanCorruption()
    attached = datamodule()
    attached.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=objective))
    assert attached.row_length() == objective.packed_length(32) > 32 and plain.row_length() == 32
    assert attached.cache_key() != plain.cache_key()  # the packed length is part of the cache key
    attached.prepare_data()
    attached.setup()
    assert {len(r) for r in attached.train_dataset["input_ids"]} == {objective.packed_length(32)}


def test_worker_processes_corrupt_exactly_like_the_main_process():
    """The corruption depends only on the seed and the batch, not on which process collates it."""
    from functools import partial

    from torch.utils.data import DataLoader

    objective = SpanCorruption(seed=3)
    rng = np.random.default_rng(4)
    rows = [{"input_ids": rng.integers(3, 500, 40).tolist()} for _ in range(16)]
    collate = partial(objective.collate, special=SPECIAL)
    here = list(DataLoader(rows, batch_size=4, collate_fn=collate))
    workers = list(DataLoader(rows, batch_size=4, collate_fn=collate, num_workers=2))
    assert len(here) == len(workers) == 4
    for a, b in zip(here, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
