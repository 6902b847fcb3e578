"""The nsp and sop objectives: pair structure, positive rates, where segments come from, the loss.

Every token of the synthetic documents is unique, so each segment of a pair can be traced back to
its document and position.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmforge import EncoderLM, LmforgeError, SpecialTokens
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.objectives.sentence_pairs import NSP, SOP

DOC_SPAN = 40  # document k owns the ids 10 + 40k ... 10 + 40k + 39
N_DOCS = 100
VOCAB = 10 + DOC_SPAN * N_DOCS


def is_sentence_end(token: int) -> bool:
    return token >= 10 and (token - 10) % DOC_SPAN % 7 == 6  # every 7th token of a document ends a sentence


SPECIAL = SpecialTokens(
    vocab_size=VOCAB, pad_id=0, unk_id=1, cls_id=2, sep_id=3, eos_id=3, mask_id=4,
    sentence_end=tuple(is_sentence_end(t) for t in range(VOCAB)),
)


def origin(token: int) -> tuple[int, int]:
    """(document, position in the document) of a content token."""
    return (token - 10) // DOC_SPAN, (token - 10) % DOC_SPAN


def documents(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[10 + DOC_SPAN * k + j for j in range(rng.randint(9, DOC_SPAN))] for k in range(N_DOCS)]


def unpacked_rows(docs: list[list[int]]) -> list[dict]:
    return [{"input_ids": d + [SPECIAL.eos_id]} for d in docs]


def packed_rows(docs: list[list[int]], block: int = 48) -> list[dict]:
    stream = [t for d in docs for t in d + [SPECIAL.eos_id]]
    return [{"input_ids": stream[i : i + block]} for i in range(0, len(stream) - block + 1, block)]


def unpack_pairs(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int], int]]:
    """(A, B, label) of each row, checking the [CLS] A [SEP] B [SEP] layout, token types and mask."""
    pairs = []
    ids, types = batch["input_ids"], batch["token_type_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    for row, label in enumerate(batch["pair_labels"].tolist()):
        n = int(mask[row].sum())
        tokens = ids[row, :n].tolist()
        assert tokens[0] == SPECIAL.cls_id and tokens[-1] == SPECIAL.sep_id
        seps = [i for i, t in enumerate(tokens) if t == SPECIAL.sep_id]
        assert len(seps) == 2, tokens
        a, b = tokens[1 : seps[0]], tokens[seps[0] + 1 : -1]
        assert a and b
        assert types[row, :n].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert (ids[row, n:] == SPECIAL.pad_id).all() and (mask[row, n:] == 0).all()
        pairs.append((a, b, label))
    return pairs


def contiguous(segment: list[int]) -> bool:
    places = [origin(t) for t in segment]
    return all(d == places[0][0] for d, _ in places) and [p for _, p in places] == list(
        range(places[0][1], places[0][1] + len(places))
    )


def follows(first: list[int], second: list[int]) -> bool:
    """``second`` starts right after ``first`` ends, in the same document."""
    (d1, p1), (d2, p2) = origin(first[-1]), origin(second[0])
    return d1 == d2 and p2 == p1 + 1


def collect(objective, rows: list[dict], batches: int, batch_size: int = 16, seed: int = 0):
    rng = random.Random(seed)
    pairs, limits = [], []
    for _ in range(batches):
        chunk = rng.sample(rows, batch_size)
        batch = objective.collate(chunk, SPECIAL)
        limit = max(len(r["input_ids"]) for r in chunk)
        assert batch["input_ids"].shape[1] <= limit  # a pair never outgrows the rows it was made from
        pairs += unpack_pairs(batch)
        limits.append(limit)
    return pairs


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
@pytest.mark.parametrize("positive_rate", [0.5, 0.8])
def test_nsp_pairs(layout, positive_rate):
    docs = documents(1)
    rows = unpacked_rows(docs) if layout == "unpacked" else packed_rows(docs)
    pairs = collect(NSP(positive_rate=positive_rate, seed=0), rows, batches=150)
    positives = [p for p in pairs if p[2] == 0]
    rate = len(positives) / len(pairs)
    print(f"nsp {layout}: {len(pairs)} pairs, positive rate {rate:.3f} (configured {positive_rate})")
    assert abs(rate - positive_rate) < 0.04  # 2400 pairs: 0.04 is about 4 standard deviations
    for a, b, label in pairs:
        assert contiguous(a) and contiguous(b)
        if label == 0:
            assert follows(a, b)  # B is the true continuation of A
            assert is_sentence_end(a[-1])  # cut at a sentence boundary
        else:
            assert not follows(a, b)
            if layout == "unpacked":  # packed: two rows of a batch may hold parts of one document
                assert origin(a[0])[0] != origin(b[0])[0]  # B comes from another document
            doc, pos = origin(b[0])
            assert pos == 0 or is_sentence_end(b[0] - 1)  # starting at a sentence


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
def test_sop_negatives_are_exactly_the_swapped_positives(layout):
    docs = documents(2)
    rows = unpacked_rows(docs) if layout == "unpacked" else packed_rows(docs)
    pairs = collect(SOP(seed=0), rows, batches=150)
    rate = sum(p[2] == 0 for p in pairs) / len(pairs)
    print(f"sop {layout}: {len(pairs)} pairs, positive rate {rate:.3f}")
    assert abs(rate - 0.5) < 0.04
    for a, b, label in pairs:
        assert contiguous(a) and contiguous(b)
        if label == 0:
            assert follows(a, b) and is_sentence_end(a[-1])
        else:
            assert follows(b, a) and is_sentence_end(b[-1])  # (A, B) of the same document, swapped
    # Seeded: the same seed gives the same pairs.
    assert collect(SOP(seed=0), rows, batches=3) == collect(SOP(seed=0), rows, batches=3)


def test_long_documents_are_truncated_at_the_outer_ends():
    doc = [10 + j for j in range(DOC_SPAN)]  # 40 tokens, one document
    other = [10 + DOC_SPAN + j for j in range(12)]
    rows = [{"input_ids": doc[:30]}, {"input_ids": other + [SPECIAL.eos_id]}]  # the longest row: 30 tokens
    for objective in (NSP(positive_rate=1.0, seed=0), SOP(positive_rate=0.0, seed=0)):
        batch = objective.collate(rows, SPECIAL)
        assert batch["input_ids"].shape[1] <= 30
        a, b, label = unpack_pairs(batch)[0]
        first, second = (a, b) if label == 0 else (b, a)
        assert follows(first, second)  # the junction survives truncation
        assert len(a) + len(b) == 27


def test_mlm_on_pairs_and_the_loss():
    docs = documents(3)
    objective = NSP(mlm=MLM(mask_prob=0.3, seed=1), seed=0)
    batch = objective.collate(unpacked_rows(docs[:8]), SPECIAL)
    labels = batch["labels"]
    structural = (batch["input_ids"] == SPECIAL.cls_id) | (batch["input_ids"] == SPECIAL.pad_id)
    assert (labels[structural] == -100).all() and (labels != -100).sum() > 20
    seps = labels.new_zeros(labels.shape, dtype=torch.bool)
    for row in range(len(labels)):
        real = labels[row] != -100
        seps[row] = real & (labels[row] == SPECIAL.sep_id)
    assert not seps.any()  # separators are never selected

    torch.manual_seed(0)
    architecture = BERT(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, pooler=True, pair_head=True, dropout=0.0)
    module = EncoderLM(architecture, objective).eval()
    out = objective.compute_loss(module, batch)
    hidden = architecture(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          token_type_ids=batch["token_type_ids"])
    pair_loss = F.cross_entropy(architecture.pair_logits(architecture.pooled(hidden)), batch["pair_labels"])
    mlm_logits = architecture.mlm_logits(hidden)
    mlm_loss = F.cross_entropy(mlm_logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["nsp_loss"], pair_loss)
    torch.testing.assert_close(out["mlm_loss"], mlm_loss)
    torch.testing.assert_close(out["loss"], pair_loss + mlm_loss)
    assert set(out) == {"loss", "tokens", "nsp_loss", "nsp_accuracy", "mlm_loss", "mlm_accuracy"}


def test_nested_mlm_is_stored_as_plain_data_and_rebuilt():
    objective = SOP(positive_rate=0.6, mlm=MLM(mask_prob=0.2, whole_word=True))
    options = objective.plugin_options()
    assert options["mlm"]["name"] == "mlm" and options["mlm"]["init_args"]["mask_prob"] == 0.2
    rebuilt = SOP(**options)
    assert isinstance(rebuilt.mlm, MLM) and rebuilt.mlm.whole_word and rebuilt.positive_rate == 0.6
    assert SOP().plugin_options()["mlm"] is None


def test_mistakes_are_explained():
    with pytest.raises(LmforgeError, match="positive_rate must be between 0 and 1"):
        NSP(positive_rate=1.5)
    one_document = [{"input_ids": documents(4)[0]}]
    with pytest.raises(LmforgeError, match="batch_size of 2 or more"):
        NSP(positive_rate=0.0, seed=0).collate(one_document, SPECIAL)
    with pytest.raises(LmforgeError, match="no \\[CLS\\] token"):
        SOP().collate(one_document, SpecialTokens(vocab_size=VOCAB, sep_id=3))
    with pytest.raises(LmforgeError, match="pooler: true and pair_head: true"):
        EncoderLM(BERT(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16), NSP())
    with pytest.raises(LmforgeError, match="mlm_head: true"):
        EncoderLM(BERT(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, pooler=True, pair_head=True, mlm_head=False),
                  SOP(mlm=MLM()))
