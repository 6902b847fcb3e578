"""Tests of the BERT architecture plugin against independent references.

References: Hugging Face ``BertModel`` / ``BertForMaskedLM`` / ``BertForPreTraining`` with eager
(explicit softmax) attention and every parameter randomised, the tensors ``save_pretrained`` writes,
a plain-PyTorch re-implementation of the pre-LN/rotary/RMSNorm variant, and the model itself run
on unpacked inputs.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge import LmforgeError
from lmforge_plugins.architectures.bert import BERT

transformers = pytest.importorskip("transformers")

#: (vocab, d_model, heads, layers, d_ff, max positions): two shapes, different in every dimension.
SHAPES = [(61, 32, 4, 2, 48, 32), (97, 48, 3, 3, 80, 40)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hf_config(shape, **extra):
    V, C, NH, L, FF, P = shape
    return transformers.BertConfig(
        vocab_size=V, hidden_size=C, num_attention_heads=NH, num_hidden_layers=L, intermediate_size=FF,
        max_position_embeddings=P, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager", **extra,
    )


@torch.no_grad()
def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm weights and biases too), so no mapping mistake can hide."""
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def bert_from_hf(hf, architectures: str) -> BERT:
    options = BERT.options_from_hf_config({**hf.config.to_dict(), "architectures": [architectures]})
    model = BERT(**options).eval()
    model.load_state_dict(model.hf_state_dict_to_lmforge(hf.state_dict()), strict=True)
    return model


def padded_batch(V, B=3, T=19):
    ids = torch.randint(0, V, (B, T))
    types = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, (n, split) in enumerate([(T, 8), (12, 5), (4, 2)][:B]):
        mask[row, n:] = 0
        types[row, split:n] = 1
    return ids, types, mask


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# 1. Parity with Hugging Face (fp32, eager attention), padded batches included


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "odd"])
@torch.no_grad()
def test_parity_with_hf_bert_for_pretraining(shape):
    hf = randomise(transformers.BertForPreTraining(hf_config(shape)))
    model = bert_from_hf(hf, "BertForPreTraining")
    ids, types, mask = padded_batch(shape[0])
    expected = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    reference_hidden = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    hidden = model(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    diffs = {
        "hidden": max_diff(hidden[real], reference_hidden[real]),
        "mlm": max_diff(model.mlm_logits(hidden)[real], expected.prediction_logits[real]),
        "nsp": max_diff(model.pair_logits(model.pooled(hidden)), expected.seq_relationship_logits),
    }
    print(f"BERT parity {shape}: max abs diff {diffs}")
    assert max(diffs.values()) < 1e-4, diffs
    assert reference_hidden[real].std() > 0.05 and expected.prediction_logits.std() > 0.5  # not near-constant
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "odd"])
@torch.no_grad()
def test_parity_with_hf_masked_lm_and_bert_model(shape):
    masked_lm = randomise(transformers.BertForMaskedLM(hf_config(shape)))
    model = bert_from_hf(masked_lm, "BertForMaskedLM")
    assert model.pooler is None and model.pair_head is None
    ids, types, mask = padded_batch(shape[0])
    real = mask.bool()
    expected = masked_lm(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    got = model.mlm_logits(model(ids, attention_mask=mask, token_type_ids=types))
    print(f"BertForMaskedLM parity {shape}: max abs diff {max_diff(got[real], expected[real]):.2e}")
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)

    bare = randomise(transformers.BertModel(hf_config(shape)))
    model = bert_from_hf(bare, "BertModel")
    assert not model.has_mlm_head and model.pooler is not None
    out = bare(input_ids=ids, attention_mask=mask)  # token types left out: all zero on both sides
    hidden = model(ids, attention_mask=mask)
    torch.testing.assert_close(hidden[real], out.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.pooled(hidden), out.pooler_output, atol=1e-4, rtol=1e-4)
    with pytest.raises(LmforgeError, match="no masked-LM head"):
        model.mlm_logits(hidden)


# ----------------------------------------------------------------------------------------------
# 2. HF -> lmforge -> HF gives back exactly what save_pretrained wrote


@pytest.mark.parametrize(
    "cls, tie", [("BertForPreTraining", True), ("BertForMaskedLM", True), ("BertModel", True),
                 ("BertForNextSentencePrediction", True), ("BertForMaskedLM", False)],
)
def test_round_trip_through_save_pretrained(cls, tie, tmp_path):
    hf = randomise(getattr(transformers, cls)(hf_config(SHAPES[0], tie_word_embeddings=tie)))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    written = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())

    model = BERT(**BERT.options_from_hf_config(config))
    model.load_state_dict(model.hf_state_dict_to_lmforge(written), strict=True)
    back = model.lmforge_state_dict_to_hf()
    assert set(back) == set(written)
    unused = set() if tie else {"cls.predictions.bias"}  # untied, transformers 5 never reads this one
    for name, tensor in written.items():
        if name not in unused:
            assert torch.equal(back[name], tensor), name
    if not tie:
        assert torch.equal(back["cls.predictions.bias"], written["cls.predictions.decoder.bias"])
        ids = torch.randint(0, SHAPES[0][0], (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(model.eval().mlm_logits(model(ids)), hf(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)

    # The exported config rebuilds the same Hugging Face model, which loads the exported tensors.
    exported = model.hf_config()
    assert exported["model_type"] == "bert" and exported["architectures"] == [cls]
    rebuilt_config = transformers.BertConfig(**exported)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "tie_word_embeddings"):
        assert getattr(rebuilt_config, key) == config.get(key, getattr(rebuilt_config, key)), key
    rebuilt = getattr(transformers, cls)(rebuilt_config)
    result = rebuilt.load_state_dict(back, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def test_conversion_errors_name_the_fix():
    hf = randomise(transformers.BertForPreTraining(hf_config(SHAPES[0])))
    state = hf.state_dict()
    options = BERT.options_from_hf_config({**hf.config.to_dict(), "architectures": ["BertForPreTraining"]})
    with pytest.raises(LmforgeError, match=r"missing.*layers\.2"):
        BERT(**{**options, "n_layer": 3}).hf_state_dict_to_lmforge(state)
    with pytest.raises(LmforgeError, match=r"pos_emb\.weight has shape \(32, 32\).*max_position_embeddings"):
        BERT(**{**options, "block_size": 16}).hf_state_dict_to_lmforge(state)
    with pytest.raises(LmforgeError, match=r"unexpected \['cls\.seq_relationship\.bias'"):
        BERT(**{**options, "pair_head": False}).hf_state_dict_to_lmforge(state)
    with pytest.raises(LmforgeError, match="layout='post_ln'"):
        BERT(**{**options, "layout": "pre_ln"}).hf_state_dict_to_lmforge(state)
    with pytest.raises(LmforgeError, match="hidden_act='gelu_new'"):
        BERT.options_from_hf_config({**hf.config.to_dict(), "hidden_act": "gelu_new"})
    with pytest.raises(LmforgeError, match="BertForTokenClassification"):
        BERT.options_from_hf_config({**hf.config.to_dict(), "architectures": ["BertForTokenClassification"]})


def test_legacy_layer_norm_names_load():
    hf = randomise(transformers.BertForMaskedLM(hf_config(SHAPES[0])))
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in hf.state_dict().items()}
    assert any(k.endswith("gamma") for k in legacy)
    model = bert_from_hf(hf, "BertForMaskedLM")
    converted = model.hf_state_dict_to_lmforge(legacy)
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted[name], tensor), name


# ----------------------------------------------------------------------------------------------
# 3. Variants against a plain-PyTorch reference; packed documents against separate runs


def reference_forward(model: BERT, ids: torch.Tensor) -> torch.Tensor:
    """pre-LN + rotary + RMSNorm written out by hand: explicit softmax attention, rotate-half RoPE."""
    B, T = ids.shape
    nh, hs = model.n_head, model.head_dim
    x = model.tok_emb.weight[ids] + model.type_emb.weight[0]

    def rms(t, mod):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + model.norm_eps) * mod.weight

    def rope(t):
        inv = 1.0 / (model.rope_base ** (torch.arange(0, hs, 2).float() / hs))
        ang = torch.arange(T).float()[:, None] * inv  # (T, hs/2)
        cos, sin = ang.cos(), ang.sin()
        t1, t2 = t[..., : hs // 2], t[..., hs // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    for layer in model.layers:
        a = rms(x, layer.norm1)
        q, k, v = (a @ layer.attn.qkv.weight.T + layer.attn.qkv.bias).split(model.d_model, dim=-1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + y @ layer.attn.proj.weight.T + layer.attn.proj.bias
        h = rms(x, layer.norm2) @ layer.mlp.fc.weight.T + layer.mlp.fc.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ layer.mlp.proj.weight.T + layer.mlp.proj.bias
    return rms(x, model.final_norm)


@torch.no_grad()
def test_pre_ln_rotary_rmsnorm_matches_reference():
    model = randomise(BERT(vocab_size=53, n_layer=2, n_head=4, d_model=32, layout="pre_ln", position="rotary",
                           norm="rmsnorm", norm_eps=1e-6, dropout=0.0))
    assert model.pos_emb is None and model.emb_norm is None
    ids = torch.randint(0, 53, (2, 11))
    got, expected = model(ids), reference_forward(model, ids)
    print(f"pre-LN/rotary/RMSNorm reference max abs diff: {max_diff(got, expected):.2e}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"layout": "pre_ln", "position": "rotary"}], ids=["bert", "pre_ln_rotary"])
@torch.no_grad()
def test_document_ids_keep_packed_documents_apart(options):
    model = randomise(BERT(vocab_size=40, n_layer=2, n_head=2, d_model=16, block_size=24, dropout=0.0, **options))
    docs = [torch.randint(0, 40, (1, n)) for n in (7, 5, 9)]
    packed = torch.cat(docs, dim=1)  # (1, 21)
    document_ids = torch.cat([torch.full((1, d.size(1)), i) for i, d in enumerate(docs)], dim=1)
    hidden = model(packed, document_ids=document_ids)
    separate = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(hidden, separate, atol=1e-5, rtol=1e-5)
    assert max_diff(model(packed), separate) > 1e-3  # without document ids the documents do mix


@torch.no_grad()
def test_padding_does_not_change_real_positions():
    model = randomise(BERT(vocab_size=40, n_layer=2, n_head=2, d_model=16, dropout=0.0))
    ids = torch.randint(0, 40, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :6], model(ids), atol=1e-5, rtol=1e-5)
    both = model(padded, attention_mask=mask, document_ids=torch.tensor([[0] * 3 + [1] * 3 + [2] * 4]))
    assert torch.isfinite(both).all()


def test_mlm_logits_of_selected_positions_equal_the_full_projection():
    model = randomise(BERT(vocab_size=40, n_layer=1, n_head=2, d_model=16))
    hidden = torch.randn(2, 5, 16)
    selected = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(model.mlm_logits(hidden[selected]), model.mlm_logits(hidden)[selected])
    untied = BERT(vocab_size=40, n_layer=1, n_head=2, d_model=16, tie_embeddings=False)
    assert untied.mlm_decoder is not None and "mlm_decoder.weight" in untied.state_dict()
    assert "mlm_decoder.weight" not in model.state_dict()


def test_option_errors_name_the_option():
    with pytest.raises(LmforgeError, match="BERT needs vocab_size"):
        BERT()
    with pytest.raises(LmforgeError, match=r"n_head \(3\) must divide d_model \(32\)"):
        BERT(vocab_size=10, d_model=32, n_head=3)
    with pytest.raises(LmforgeError, match="pair_head: true reads the pooler"):
        BERT(vocab_size=10, d_model=32, pair_head=True)
    with pytest.raises(LmforgeError, match="block_size is 8"):
        BERT(vocab_size=10, d_model=32, block_size=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(LmforgeError, match="token_type_ids must have the shape"):
        BERT(vocab_size=10, d_model=32)(torch.zeros(2, 4, dtype=torch.long), token_type_ids=torch.zeros(2, 3))


def test_bert_trains_like_hf_for_a_few_steps():
    """Gradients too: the same AdamW steps on the same masked batch keep both models equal."""
    hf = randomise(transformers.BertForMaskedLM(hf_config(SHAPES[0]))).train()
    model = bert_from_hf(hf, "BertForMaskedLM").train()
    ids, types, mask = padded_batch(SHAPES[0][0])
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss_hf = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels).loss
        hidden = model(ids, attention_mask=mask, token_type_ids=types)
        selected = labels != -100
        loss = F.cross_entropy(model.mlm_logits(hidden[selected]), labels[selected])
        torch.testing.assert_close(loss, loss_hf, atol=1e-5, rtol=1e-5)
        for o, lo in ((opt_hf, loss_hf), (opt, loss)):
            o.zero_grad()
            lo.backward()
            o.step()
    back = model.lmforge_state_dict_to_hf()
    for name, tensor in hf.state_dict().items():
        # A key bias shifts every score of a query equally, so softmax ignores it: its gradient is
        # rounding noise, which Adam's normalisation turns into arbitrary (but harmless) steps.
        if name in back and not name.endswith("attention.self.key.bias"):
            torch.testing.assert_close(back[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
