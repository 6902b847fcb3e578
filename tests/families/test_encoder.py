"""The encoder family module: what it computes, which plugins it accepts, how it optimises."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from lmforge import EncoderLM, LmforgeError
from lmforge.cli import run_trainer_cli
from lmforge.families import FAMILY_MODULES
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.objectives.clm import CLM
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.objectives.sentence_pairs import NSP


def tiny_bert(**options) -> BERT:
    return BERT(vocab_size=50, n_layer=1, n_head=2, d_model=16, dropout=0.0, **options)


def test_forward_is_the_mlm_logits_of_the_hidden_states():
    torch.manual_seed(0)
    module = EncoderLM(tiny_bert(), MLM()).eval()
    ids, types = torch.randint(0, 50, (2, 7)), torch.tensor([[0] * 3 + [1] * 4] * 2)
    with torch.no_grad():
        hidden = module.encode(ids, token_type_ids=types)
        assert hidden.shape == (2, 7, 16)
        torch.testing.assert_close(hidden, module.architecture(ids, token_type_ids=types))
        torch.testing.assert_close(module(ids, token_type_ids=types), module.architecture.mlm_logits(hidden))
    assert FAMILY_MODULES["encoder"] is EncoderLM


def test_plugins_of_other_families_and_missing_heads_are_refused():
    with pytest.raises(LmforgeError, match="objective 'clm' does not support the encoder family"):
        EncoderLM(tiny_bert(), CLM())
    with pytest.raises(LmforgeError, match="architecture 'gpt' does not support the encoder family"):
        EncoderLM(GPT(vocab_size=50, n_layer=1, n_head=2, d_model=16), MLM())
    with pytest.raises(LmforgeError, match="pair_head: true"):
        EncoderLM(tiny_bert(), NSP(mlm=MLM()))
    EncoderLM(tiny_bert(pooler=True, pair_head=True), NSP(mlm=MLM()))  # with the heads it is accepted


def test_weight_decay_only_on_matrices():
    module = EncoderLM(tiny_bert(pooler=True, pair_head=True), MLM())
    decay, no_decay = module.parameter_groups()
    names = {id(p): n.removeprefix("architecture.") for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"layers.0.attn.qkv.weight", "mlm_transform.weight", "pooler.weight", "pair_head.weight"} <= decayed
    assert {"tok_emb.weight", "pos_emb.weight", "type_emb.weight", "mlm_bias", "emb_norm.weight",
            "layers.0.attn.qkv.bias"} <= exempt
    assert not decayed & exempt and len(decayed | exempt) == len(list(module.parameters()))


def test_a_config_names_the_family_and_plugins_by_short_name():
    cli = run_trainer_cli(["fit", "--config", str(REPO / "configs" / "bert-tiny-mlm-nsp.yaml"),
                           "--data.train_files", str(REPO / "lmforge" / "data" / "corpus" / "tiny_stories_validation.txt"),
                           "--data.tokenizer", str(REPO / "lmforge" / "data" / "corpus" / "wordpiece.json"),
                           "--data.val_files", str(REPO / "lmforge" / "data" / "corpus" / "tiny_stories_validation.txt")],
                          run=False)
    assert isinstance(cli.model, EncoderLM)
    assert isinstance(cli.model.architecture, BERT) and cli.model.architecture.has_pair_head
    assert isinstance(cli.model.objective, NSP) and isinstance(cli.model.objective.mlm, MLM)
    assert cli.model.objective.mlm.whole_word and cli.model.architecture.vocab_size == 895
