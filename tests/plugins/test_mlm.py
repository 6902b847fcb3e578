"""The mlm objective: realised masking rates, special tokens, whole words, seeding and the loss."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from lmforge import EncoderLM, LmforgeError, SpecialTokens
from lmforge.data.tokenizer import find_special_tokens, load_tokenizer, train_tokenizer
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.objectives.mlm import MLM

#: A synthetic vocabulary of 100 ids: 0..4 are special, 5..99 ordinary.
SPECIAL = SpecialTokens(vocab_size=100, pad_id=0, unk_id=1, cls_id=2, sep_id=3, eos_id=3, mask_id=4)


def random_rows(n: int, length: int, generator: torch.Generator) -> list[dict]:
    """Rows of random ids over the whole vocabulary, so ~5% of tokens are special."""
    return [{"input_ids": torch.randint(0, 100, (length,), generator=generator).tolist()} for _ in range(n)]


def realised_rates(objective: MLM, batches: int = 200) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    counts = dict(eligible=0, selected=0, masked=0, random=0, kept=0, special_touched=0, random_special=0)
    for _ in range(batches):
        rows = random_rows(16, 64, gen)
        original = torch.tensor([r["input_ids"] for r in rows])
        batch = objective.collate(rows, SPECIAL)
        ids, labels = batch["input_ids"], batch["labels"]
        special = original < 5
        selected = labels != -100
        assert torch.equal(labels[selected], original[selected])  # labels are the original tokens
        counts["special_touched"] += int((special & (selected | (ids != original))).sum())
        counts["eligible"] += int((~special).sum())
        counts["selected"] += int(selected.sum())
        counts["masked"] += int((selected & (ids == 4)).sum())
        replaced = selected & (ids != 4) & (ids != original)
        counts["random"] += int(replaced.sum())
        counts["random_special"] += int((replaced & (ids < 5)).sum())
        counts["kept"] += int((selected & (ids == original)).sum())
        assert torch.equal(ids[~selected], original[~selected])  # nothing else changes
    return {
        "select": counts["selected"] / counts["eligible"],
        "mask": counts["masked"] / counts["selected"],
        "random": counts["random"] / counts["selected"],
        "keep": counts["kept"] / counts["selected"],
        "special_touched": counts["special_touched"],
        "random_special": counts["random_special"],
    }


@pytest.mark.parametrize("rates", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)], ids=["bert", "custom"])
def test_realised_rates_match_the_configuration(rates):
    mask_prob, mask_rate, random_rate = rates
    got = realised_rates(MLM(mask_prob=mask_prob, mask_token_rate=mask_rate, random_token_rate=random_rate, seed=1))
    print(f"realised mlm rates for {rates}: {got}")
    # ~200k eligible tokens, ~30k+ selected: 1% absolute is more than 4 standard deviations.
    assert abs(got["select"] - mask_prob) < 0.01
    assert abs(got["mask"] - mask_rate) < 0.01
    # A random replacement is drawn from the 95 ordinary ids, so 1 in 95 is the original token again
    # and is seen as kept.
    assert abs(got["random"] - random_rate * 94 / 95) < 0.01
    assert abs(got["keep"] - (1 - mask_rate - random_rate + random_rate / 95)) < 0.01
    assert got["special_touched"] == 0 and got["random_special"] == 0


def test_padding_is_never_selected_and_is_masked_out():
    rows = [{"input_ids": list(range(5, 45))}, {"input_ids": list(range(5, 15))}]
    batch = MLM(mask_prob=0.9, seed=0).collate(rows, SPECIAL)
    assert batch["input_ids"].shape == (2, 40)
    assert batch["attention_mask"][1].tolist() == [1] * 10 + [0] * 30
    assert (batch["labels"][1, 10:] == -100).all() and (batch["input_ids"][1, 10:] == 0).all()
    assert (batch["labels"][1, :10] != -100).any()
    packed = MLM(seed=0).collate([{"input_ids": list(range(5, 45))}] * 2, SPECIAL)
    assert "attention_mask" not in packed  # equal rows: no mask, the fast attention path


def test_documents_of_packed_rows():
    row = [5, 6, 3, 7, 8, 9, 3, 10]  # 3 is the end-of-document token
    batch = MLM(keep_documents_separate=True, seed=0).collate([{"input_ids": row}], SPECIAL)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]


@pytest.fixture(scope="module")
def small_wordpiece(corpus, tmp_path_factory):
    """A WordPiece tokenizer so small that most words are several pieces."""
    path = tmp_path_factory.mktemp("wp") / "tokenizer.json"
    train_tokenizer([str(corpus["train"])], str(path), vocab_size=45, kind="wordpiece")
    return load_tokenizer(path)


def test_whole_word_masking_takes_all_pieces_of_a_word_or_none(corpus, small_wordpiece):
    special = find_special_tokens(small_wordpiece)
    lines = corpus["train"].read_text().splitlines()[:400]
    rows = [{"input_ids": small_wordpiece.encode(line, add_special_tokens=False).ids} for line in lines]
    objective = MLM(whole_word=True, seed=0)
    starts = torch.tensor(special.word_start)
    selected_tokens = eligible_tokens = multi_piece_selected = multi_piece_unselected = 0
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        batch = objective.collate(chunk, special)
        for r, row in enumerate(chunk):
            ids = torch.tensor(row["input_ids"])
            selected = (batch["labels"][r, : len(ids)] != -100).tolist()
            word = torch.cumsum(starts[ids].long(), 0).tolist()
            groups: dict[int, list[bool]] = {}
            for w, s in zip(word, selected):
                groups.setdefault(w, []).append(s)
            for pieces in groups.values():
                assert all(pieces) or not any(pieces), f"a word was partly masked: {pieces}"
                if len(pieces) > 1:
                    multi_piece_selected += all(pieces)
                    multi_piece_unselected += not any(pieces)
            selected_tokens += sum(selected)
            eligible_tokens += len(ids)
    assert multi_piece_selected > 50 and multi_piece_unselected > 50  # the test saw real multi-piece words
    assert abs(selected_tokens / eligible_tokens - 0.15) < 0.015  # each token's word is chosen with p = 0.15


def test_word_starts_come_from_the_tokenizer(corpus, small_wordpiece):
    wordpiece = find_special_tokens(small_wordpiece)
    for token, token_id in small_wordpiece.get_vocab().items():
        assert wordpiece.word_start[token_id] == (not token.startswith("##")), token
    bpe_tokenizer = load_tokenizer(corpus["tokenizer"])  # byte-level BPE: "Ġ" starts a word
    bpe = find_special_tokens(bpe_tokenizer)
    encoding = bpe_tokenizer.encode("the cat sat", add_special_tokens=False)
    assert [bpe.word_start[i] for i in encoding.ids] == [t.startswith("Ġ") for t in encoding.tokens]
    added = set(bpe_tokenizer.get_added_tokens_decoder())
    for token, token_id in bpe_tokenizer.get_vocab().items():
        starts_with_space = bpe_tokenizer.decode([token_id])[:1].isspace()  # "Ġ" (space), "Ċ" (newline), ...
        assert bpe.word_start[token_id] == (token_id in added or starts_with_space), token


def test_masks_are_seeded_and_differ_between_workers():
    rows = [{"input_ids": list(range(5, 69))}] * 8
    first = MLM(seed=3).collate(rows, SPECIAL)
    assert torch.equal(first["labels"], MLM(seed=3).collate(rows, SPECIAL)["labels"])
    assert not torch.equal(first["labels"], MLM(seed=4).collate(rows, SPECIAL)["labels"])
    torch.manual_seed(11)  # seed=None follows the process's seed, as set by seed_everything
    unseeded = MLM().collate(rows, SPECIAL)["labels"]
    torch.manual_seed(11)
    assert torch.equal(unseeded, MLM().collate(rows, SPECIAL)["labels"])

    def run_loader():
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            rows, batch_size=4, num_workers=2, collate_fn=functools.partial(MLM().collate, special=SPECIAL)
        )
        return [b["labels"] for b in loader]

    a, b = run_loader(), run_loader()
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible with worker processes
    assert not torch.equal(a[0], a[1])  # the two workers draw different masks for identical rows


def test_inside_lmforge_loaders_masks_follow_the_batch_seed():
    """lmforge's loaders seed each batch from its position in the run (exact resume, any worker)."""
    from lmforge.reliability.resume import seeded_global_rngs

    rows = [{"input_ids": list(range(5, 69))}] * 4
    used, fresh = MLM(), MLM()
    used.collate(rows, SPECIAL)  # a generator that has already drawn does not matter
    with seeded_global_rngs(7):
        a = used.collate(rows, SPECIAL)["labels"]
    with seeded_global_rngs(7):
        b = fresh.collate(rows, SPECIAL)["labels"]
    with seeded_global_rngs(8):
        c = fresh.collate(rows, SPECIAL)["labels"]
    with seeded_global_rngs(7):
        d = MLM(seed=5).collate(rows, SPECIAL)["labels"]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_loss_and_accuracy_match_a_full_logits_reference():
    torch.manual_seed(0)
    module = EncoderLM(BERT(vocab_size=100, n_layer=1, n_head=2, d_model=16, dropout=0.0), MLM(seed=0)).eval()
    gen = torch.Generator().manual_seed(1)
    batch = module.objective.collate(random_rows(4, 12, gen)[:3] + [{"input_ids": [7, 8, 9]}], SPECIAL)
    out = module.objective.compute_loss(module, batch)
    logits = module(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V): every position
    labels = batch["labels"]
    expected = F.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], expected)
    selected = labels != -100
    assert out["tokens"] == selected.sum()
    torch.testing.assert_close(out["mlm_accuracy"], (logits.argmax(-1)[selected] == labels[selected]).float().mean())


def test_mistakes_are_explained():
    with pytest.raises(LmforgeError, match="mask_prob must be between 0 and 1"):
        MLM(mask_prob=1.5)
    with pytest.raises(LmforgeError, match="mask_token_rate \\+ random_token_rate is 1.2"):
        MLM(mask_token_rate=0.9, random_token_rate=0.3)
    rows = [{"input_ids": [5, 6, 7]}]
    with pytest.raises(LmforgeError, match="has none \\(looked for \\[MASK\\], <mask>\\)"):
        MLM().collate(rows, SpecialTokens(vocab_size=100, pad_id=0))
    with pytest.raises(LmforgeError, match="marks no word boundaries"):
        MLM(whole_word=True).collate(rows, SPECIAL)
    with pytest.raises(LmforgeError, match="outside the tokenizer's vocabulary of 100"):
        MLM().collate([{"input_ids": [5, 150]}], SPECIAL)
    with pytest.raises(LmforgeError, match="mlm_head: true"):
        EncoderLM(BERT(vocab_size=100, n_layer=1, n_head=2, d_model=16, mlm_head=False), MLM())
