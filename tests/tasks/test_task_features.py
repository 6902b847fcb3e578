"""What each family gives a task head, compared with the bare architecture; freezing; init_from."""

from __future__ import annotations

import pytest
import torch

from lmforge import LmforgeError
from lmforge.convert import save_model_folder
from lmforge.families import DecoderLM, EncoderLM, Seq2SeqLM
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.architectures.t5 import T5
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.tasks.sequence_classification import SequenceClassification
from lmforge_plugins.tasks.token_classification import TokenClassification

PAD = 0
SHORT = [5, 9, 14, 7]
LONG = [8, 6, 11, 12, 13, 10, 4]


def padded_batch() -> dict[str, torch.Tensor]:
    """SHORT and LONG right-padded into one batch."""
    ids = torch.full((2, len(LONG)), PAD)
    ids[0, : len(SHORT)] = torch.tensor(SHORT)
    ids[1] = torch.tensor(LONG)
    mask = (torch.arange(len(LONG))[None, :] < torch.tensor([[len(SHORT)], [len(LONG)]])).long()
    return {"input_ids": ids, "attention_mask": mask}


def task() -> SequenceClassification:
    return SequenceClassification(labels=["a", "b"], dropout=0.0)


def test_decoder_features_are_the_last_real_token_of_each_unpadded_input():
    torch.manual_seed(0)
    module = DecoderLM(GPT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16, dropout=0.0), task=task()).eval()
    with torch.no_grad():
        features = module.sequence_features(padded_batch())
        for row, ids in enumerate((SHORT, LONG)):
            alone = module.architecture(torch.tensor([ids]))[0, -1]  # the bare architecture on the unpadded input
            torch.testing.assert_close(features[row], alone, atol=1e-5, rtol=1e-5)


def test_encoder_features_are_the_pooled_first_token_and_ignore_padding():
    torch.manual_seed(0)
    arch = BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16, dropout=0.0, pooler=True)
    module = EncoderLM(arch, task=task()).eval()
    with torch.no_grad():
        features = module.sequence_features(padded_batch())
        alone = torch.tanh(arch.pooler(arch(torch.tensor([SHORT]))[:, 0]))[0]
        torch.testing.assert_close(features[0], alone, atol=1e-5, rtol=1e-5)
        no_pooler = EncoderLM(BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16), task=task()).eval()
        first = no_pooler.architecture(torch.tensor([LONG]))[0, 0]
        torch.testing.assert_close(no_pooler.sequence_features(padded_batch())[1], first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["encoder_mean", "decoder_first"])
def test_seq2seq_features_ignore_padding(pooling):
    torch.manual_seed(0)
    arch = T5(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_kv=8, d_ff=32, dropout=0.0, decoder_start_token_id=PAD)
    module = Seq2SeqLM(arch, task=SequenceClassification(labels=["a", "b"], pooling=pooling)).eval()
    with torch.no_grad():
        features = module.sequence_features(padded_batch(), pooling)
        encoded = arch.encode(torch.tensor([SHORT]))  # (1, S, C), no padding at all
        if pooling == "encoder_mean":
            expected = encoded.mean(1)[0]
        else:
            expected = arch.decode(torch.tensor([[PAD]]), encoded)[0, 0]
        torch.testing.assert_close(features[0], expected, atol=1e-5, rtol=1e-5)


def test_frozen_embeddings_and_layers_do_not_move():
    torch.manual_seed(0)
    arch = BERT(vocab_size=32, n_layer=2, n_head=2, d_model=16, block_size=16, pooler=True)
    module = EncoderLM(
        arch, task=TokenClassification(labels=["O", "B-X"]), freeze_embeddings=True, freeze_layers=1, lr=1e-2
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-2)
    batch = {**padded_batch(), "labels": torch.tensor([[0, 1, 0, 1, -100, -100, -100], [1, 0, 1, 0, 1, 0, 1]])}
    module.compute_loss(batch, "train")["loss"].backward()
    optimizer.step()
    after = module.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not {k for k in moved if k.startswith(("architecture.tok_emb", "architecture.type_emb", "architecture.layers.0."))}
    assert {k for k in moved if k.startswith("architecture.layers.1.")} and {k for k in moved if k.startswith("task.head")}
    with pytest.raises(LmforgeError, match="freeze_layers is 3 but the bert architecture has only 2 layers"):
        EncoderLM(BERT(vocab_size=32, n_layer=2, n_head=2, d_model=16, block_size=16), task=task(), freeze_layers=3)


def test_init_from_copies_the_backbone_and_the_head_is_new(tmp_path):
    torch.manual_seed(0)
    pretrained = EncoderLM(BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16, pooler=True), MLM())
    folder = save_model_folder(pretrained, tmp_path / "pretrained")
    torch.manual_seed(1)
    tuned = EncoderLM(
        BERT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16, pooler=True), task=task(), init_from=str(folder)
    )
    for name, tensor in pretrained.architecture.state_dict().items():
        assert torch.equal(tuned.architecture.state_dict()[name], tensor), name
    assert tuned.objective is None and tuned.task.head[1].weight.shape == (2, 16)


def test_a_model_needs_an_objective_or_a_task():
    with pytest.raises(LmforgeError, match="neither an objective nor a task"):
        DecoderLM(GPT(vocab_size=32, n_layer=1, n_head=2, d_model=16, block_size=16))
