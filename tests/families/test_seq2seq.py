"""The seq2seq family module: teacher forcing, the objectives' loss, plugin checks, optimiser groups."""

import pytest
import torch
from hf_t5_reference import V, hf_t5, lmforge_t5, padded_batch

from lmforge import LmforgeError, SpecialTokens
from lmforge.families import FAMILY_MODULES, DecoderLM, Seq2SeqLM
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.architectures.t5 import T5
from lmforge_plugins.objectives.clm import CLM
from lmforge_plugins.objectives.denoising import Denoising
from lmforge_plugins.objectives.span_corruption import SpanCorruption

transformers = pytest.importorskip("transformers")


def test_registered_as_seq2seq():
    assert FAMILY_MODULES["seq2seq"] is Seq2SeqLM and Seq2SeqLM.family == "seq2seq"


@pytest.mark.parametrize("objective", [SpanCorruption(seed=1), Denoising(seed=1)], ids=["span_corruption", "denoising"])
def test_objective_loss_equals_transformers_loss(objective):
    torch.manual_seed(0)
    hf = hf_t5("v1.1")
    module = Seq2SeqLM(lmforge_t5(hf), objective).eval()
    special = SpecialTokens(vocab_size=V, pad_id=0, eos_id=1, mask_id=2, sentinel_ids=tuple(range(V - 1, V - 11, -1)))
    rows = [{"input_ids": torch.randint(3, V - 11, (n,)).tolist()} for n in (30, 22, 30)]
    batch = objective.collate(rows, special)
    with torch.no_grad():
        got = objective.compute_loss(module, batch)
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    torch.testing.assert_close(got["loss"], expected.loss, atol=1e-5, rtol=1e-5)
    assert got["tokens"] == (batch["labels"] != -100).sum()


def test_shift_right_matches_transformers():
    torch.manual_seed(0)
    hf = hf_t5("v1.0")
    module = Seq2SeqLM(lmforge_t5(hf), SpanCorruption())
    labels = torch.randint(0, V, (3, 7))
    labels[1, 4:] = -100
    assert torch.equal(module.shift_right(labels), hf._shift_right(labels))
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(module(ids, attention_mask=mask, labels=labels),
                                   module(ids, hf._shift_right(labels), attention_mask=mask))


def test_family_refuses_plugins_of_other_families():
    t5 = T5(vocab_size=20, d_model=16, n_head=2, d_ff=32, n_layer=1)
    with pytest.raises(LmforgeError, match="objective 'clm' does not support the seq2seq family"):
        Seq2SeqLM(t5, CLM())
    with pytest.raises(LmforgeError, match="architecture 'gpt' does not support the seq2seq family"):
        Seq2SeqLM(GPT(vocab_size=20, n_layer=1, n_head=2, d_model=16, block_size=8), SpanCorruption())
    with pytest.raises(LmforgeError, match="architecture 't5' does not support the decoder family"):
        DecoderLM(t5, CLM())


def test_weight_decay_spares_embeddings_norms_and_position_biases():
    module = Seq2SeqLM(T5(vocab_size=20, d_model=16, n_head=2, d_ff=32, n_layer=1), SpanCorruption())
    decay, no_decay = module.parameter_groups()
    exempt = {id(p) for p in no_decay["params"]}
    names = {n for n, p in module.named_parameters() if id(p) in exempt}
    assert {"architecture.shared.weight", "architecture.encoder.position_bias.weight",
            "architecture.decoder.position_bias.weight", "architecture.encoder.final_norm.weight"} <= names
    assert "architecture.lm_head.weight" not in names and "architecture.encoder.blocks.0.attn.qkv.weight" not in names
