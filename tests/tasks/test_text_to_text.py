"""text_to_text: decoder rows mask the prompt, seq2seq rows frame the source, the loss counts targets only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.architectures.t5 import T5
from lmforge_plugins.tasks.text_to_text import TextToText
from tokenizers import Tokenizer

from lmforge.data.tokenizer import find_special_tokens
from lmforge.errors import LmforgeError
from lmforge.families import DecoderLM, Seq2SeqLM

BPE = REPO / "lmforge" / "data" / "corpus" / "tokenizer.json"
RECORDS = {
    "example_id": [0, 1],
    "source": ["Tom saw a red cat in the park.", "Anna liked the dog."],
    "target": ["Mia found a green dog.", "Leo loved the fox."],
}


@pytest.fixture(scope="module")
def bpe():
    tokenizer = Tokenizer.from_file(str(BPE))
    return tokenizer, find_special_tokens(tokenizer)


def test_decoder_rows_ignore_the_prompt_in_the_labels(bpe):
    tokenizer, special = bpe
    task = TextToText(prompt_template="{source}\nTranslation:")
    rows = task.preprocess(RECORDS, tokenizer, special, 64, "decoder", "fit")
    for i in range(2):
        prompt = tokenizer.encode(RECORDS["source"][i] + "\nTranslation:", add_special_tokens=False).ids
        target = tokenizer.encode(RECORDS["target"][i], add_special_tokens=False).ids
        assert rows["prompt_ids"][i] == prompt
        assert rows["input_ids"][i] == prompt + target + [special.eos_id]
        assert rows["labels"][i] == [-100] * len(prompt) + target + [special.eos_id]
        assert tokenizer.decode(rows["input_ids"][i][len(prompt) : -1]).strip() == RECORDS["target"][i]


def test_long_decoder_source_is_cut_to_fit_and_the_target_kept(bpe):
    tokenizer, special = bpe
    records = {"example_id": [0], "source": [" ".join(["the big dog ran"] * 20)], "target": ["a dog ran"]}
    rows = TextToText().preprocess(records, tokenizer, special, 24, "decoder", "fit")
    target = tokenizer.encode("a dog ran", add_special_tokens=False).ids + [special.eos_id]
    assert len(rows["input_ids"][0]) <= 24
    assert rows["input_ids"][0][-len(target) :] == target
    assert tokenizer.decode(rows["prompt_ids"][0]).endswith("\nOutput:")  # the template survives the cut
    # predict (no target): half of max_length at most is kept free for the generated text
    unlabelled = {"example_id": [0], "source": records["source"]}
    rows = TextToText(max_new_tokens=64).preprocess(unlabelled, tokenizer, special, 24, "decoder", "predict")
    assert 0 < len(rows["prompt_ids"][0]) <= 12 and "labels" not in rows


def test_seq2seq_rows_frame_source_and_target(bpe):
    tokenizer, special = bpe
    rows = TextToText(max_target_length=4).preprocess(RECORDS, tokenizer, special, 64, "seq2seq", "fit")
    source = tokenizer.encode(RECORDS["source"][0], add_special_tokens=False).ids
    target = tokenizer.encode(RECORDS["target"][0], add_special_tokens=False).ids
    assert rows["input_ids"][0] == source + [special.eos_id] == rows["prompt_ids"][0]
    assert rows["labels"][0] == target[:3] + [special.eos_id]  # cut to max_target_length, EOS kept


def test_bad_options_are_refused():
    with pytest.raises(LmforgeError, match="exactly once"):
        TextToText(prompt_template="Summary:")


def _module(family: str, special, vocab: int):
    task = TextToText()
    if family == "decoder":
        architecture = GPT(vocab_size=vocab, n_layer=1, n_head=2, d_model=32, block_size=64)
        module = DecoderLM(architecture=architecture, task=task)
    else:
        architecture = T5(vocab_size=vocab, d_model=32, d_ff=64, n_layer=1, n_head=2)
        module = Seq2SeqLM(architecture=architecture, task=task)
    module.special = special
    return module.eval()


@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_step_loss_is_cross_entropy_over_target_tokens_only(bpe, family):
    tokenizer, special = bpe
    torch.manual_seed(0)
    module = _module(family, special, tokenizer.get_vocab_size())
    task = module.task
    rows = task.preprocess(RECORDS, tokenizer, special, 64, family, "fit")
    batch = task.collate([{k: v[i] for k, v in rows.items()} for i in range(2)], special)
    out = task.step(module, batch, "train")

    # reference: plain PyTorch on each row alone (no padding), target positions picked by hand
    losses = []
    for i in range(2):
        ids = torch.tensor([rows["input_ids"][i]])
        if family == "decoder":
            n_prompt = len(rows["prompt_ids"][i])
            logits = module.architecture.logits(module.architecture(ids))[0]
            predicted, gold = logits[n_prompt - 1 : -1], ids[0, n_prompt:]
        else:
            gold = torch.tensor(rows["labels"][i])
            decoder_input = torch.tensor([[module.architecture.decoder_start_token_id, *gold[:-1].tolist()]])
            predicted = module.architecture.logits(module.architecture(ids, decoder_input))[0]
        losses.append(F.cross_entropy(predicted, gold, reduction="sum"))
    n_target = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in RECORDS["target"])  # + EOS
    assert out["tokens"].item() == n_target
    assert out["loss"].item() == pytest.approx((sum(losses) / n_target).item(), rel=1e-5)


@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_validation_generates_and_scores_text(bpe, family):
    tokenizer, special = bpe
    module = _module(family, special, tokenizer.get_vocab_size())
    module.tokenizer_json = tokenizer.to_str()
    task = module.task
    task.max_new_tokens = 5
    rows = task.preprocess(RECORDS, tokenizer, special, 64, family, "validate")
    batch = task.collate([{k: v[i] for k, v in rows.items()} for i in range(2)], special)
    with torch.no_grad():
        task.step(module, batch, "val")
        predictions = task.predict_step(module, batch)
    scores = task.compute_metrics("val")
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "bleu"}
    assert [(p["id"], p["source"]) for p in predictions] == list(enumerate(RECORDS["source"]))
    # an independent reference on the very texts it generated
    from torchmetrics.functional.text import sacre_bleu_score

    texts = [p["prediction"] for p in predictions]
    assert all(len(tokenizer.encode(t, add_special_tokens=False).ids) <= 6 for t in texts)
    expected = sacre_bleu_score(texts, [[t] for t in RECORDS["target"]], tokenize="13a")
    assert scores["bleu"].item() == pytest.approx(expected.item())
    assert task.compute_metrics("val") == {}  # reset, and nothing generated since


def test_generation_in_validation_is_bounded(bpe):
    tokenizer, special = bpe
    module = _module("decoder", special, tokenizer.get_vocab_size())
    module.tokenizer_json = tokenizer.to_str()
    task = module.task
    task.max_new_tokens, task.max_generate_examples, task.generate_every = 2, 2, 2
    rows = task.preprocess(RECORDS, tokenizer, special, 64, "decoder", "validate")
    batch = task.collate([{k: v[i] for k, v in rows.items()} for i in range(2)], special)
    with torch.no_grad():
        for _ in range(2):  # the second batch is over max_generate_examples
            task.step(module, batch, "val")
        assert task.metrics["val"].bleu.preds_len.item() > 0
        generated = len(task.metrics["val"].rouge.rouge1_fmeasure)
        assert generated == 2
        task.compute_metrics("val")
        task.step(module, batch, "val")  # validation run 1: skipped (generate_every=2)
        assert task.compute_metrics("val") == {}
        task.step(module, batch, "val")  # run 2: generates again
        assert "bleu" in task.compute_metrics("val")
