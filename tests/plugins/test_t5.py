"""Tests of the T5 architecture plugin against Hugging Face ``T5ForConditionalGeneration``.

Both layouts are checked (v1.0: ReLU, tied and rescaled head; v1.1: gated GELU, untied head) on
references whose every parameter is random, so that no mapping mistake can hide behind a
default value (norm weights of 1, a head equal to the embedding).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hf_t5_reference import DKV, NH, V, VARIANTS, hf_t5, lmforge_t5, padded_batch

from lmforge import LmforgeError
from lmforge_plugins.architectures.t5 import T5, relative_position_bucket

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_match_transformers_with_padding(variant):
    hf = hf_t5(variant)
    model = lmforge_t5(hf)
    ids, mask = padded_batch()
    decoder_ids = torch.randint(0, V, (3, 11))
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    got = model.logits(model(ids, decoder_ids, attention_mask=mask))
    print(f"T5 {variant} parity max abs diff: {max_diff(got, expected):.2e} (logits up to {expected.abs().max():.1f})")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The padding really is masked: changing padded tokens changes nothing.
    noisy = ids.masked_fill(mask == 0, 5)
    torch.testing.assert_close(model.logits(model(noisy, decoder_ids, attention_mask=mask)), got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_match_transformers(variant):
    hf = hf_t5(variant, scale=0.2).train()
    model = lmforge_t5(hf).train()
    ids, mask = padded_batch()
    labels = torch.randint(0, V, (3, 9))
    labels[2, 6:] = -100
    expected = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()

    start = torch.full((3, 1), model.decoder_start_token_id)
    decoder_ids = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    logits = model.logits(model(ids, decoder_ids, attention_mask=mask))
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    grads = model.lmforge_state_dict_to_hf({n: p.grad for n, p in model.named_parameters()})
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params)
    worst = max(max_diff(grads[n], hf_params[n].grad) for n in grads)
    print(f"T5 {variant} gradient max abs diff over {len(grads)} tensors: {worst:.2e}")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_to_lmforge_to_hf_is_exact(variant, tmp_path):
    from safetensors.torch import load_file

    hf = hf_t5(variant)
    hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))  # the key set Hugging Face writes
    config = transformers.T5Config.from_pretrained(tmp_path).to_dict()
    model = T5(**T5.options_from_hf_config(config))
    model.load_state_dict(model.hf_state_dict_to_lmforge(saved), strict=True)
    back = model.lmforge_state_dict_to_hf()
    assert set(back) == set(saved)
    assert ("lm_head.weight" in back) == (variant == "v1.1")
    for name, tensor in saved.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_hf_config_builds_the_same_transformers_model(variant):
    model = T5(vocab_size=V, d_model=32, d_kv=DKV, d_ff=48, n_layer=2, n_decoder_layer=1, n_head=NH,
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               feed_forward=VARIANTS[variant]["feed_forward_proj"],
               tie_embeddings=VARIANTS[variant]["tie_word_embeddings"]).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    config = model.hf_config()
    assert config["model_type"] == "t5" and config["architectures"] == ["T5ForConditionalGeneration"]
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)).eval()
    if variant == "v1.1":
        hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.lm_head.weight))
    result = hf.load_state_dict(model.lmforge_state_dict_to_hf(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    if variant == "v1.0":
        assert hf.lm_head.weight is hf.shared.weight
    ids, mask = padded_batch()
    decoder_ids = torch.randint(0, V, (3, 6))
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(model.logits(model(ids, decoder_ids, mask)), expected, atol=1e-4, rtol=1e-4)
    assert T5.options_from_hf_config(config) == {**model.plugin_options(), "decoder_start_token_id": 0}


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, distance), expected)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_cached_decoding_equals_uncached(variant):
    model = lmforge_t5(hf_t5(variant))
    ids, mask = padded_batch()
    decoder_ids = torch.randint(0, V, (3, 10))
    encoded = model.encode(ids, mask)
    full = model.decode(decoder_ids, encoded, mask)  # (3, 10, C)
    cache = model.new_cache(3, 10)
    steps = [model.decode(decoder_ids[:, :4], encoded, mask, cache=cache)]  # a prompt of 4, then one at a time
    steps += [model.decode(decoder_ids[:, t : t + 1], encoded, mask, cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # Reordering rows (beam search) keeps each row's cache with it.
    cache = model.new_cache(3, 10)
    model.decode(decoder_ids[:, :5], encoded, mask, cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    order = torch.tensor([2, 2, 0])
    step = model.decode(decoder_ids[order, 5:6], encoded[order], mask[order], cache=cache)
    torch.testing.assert_close(step, full[order, 5:6], atol=1e-5, rtol=1e-5)
    with pytest.raises(LmforgeError, match="cache is full"):
        model.decode(decoder_ids[order, :5], encoded[order], mask[order], cache=cache)


def test_options_errors_and_defaults():
    with pytest.raises(LmforgeError, match="vocab_size"):
        T5()
    with pytest.raises(LmforgeError, match="divisible by n_head"):
        T5(vocab_size=10, d_model=30, n_head=4)
    with pytest.raises(LmforgeError, match="feed_forward"):
        T5(vocab_size=10, feed_forward="swiglu")
    with pytest.raises(LmforgeError, match="decoder_start_token_id"):
        T5(vocab_size=10, decoder_start_token_id=10)
    with pytest.raises(LmforgeError, match="feed_forward_proj='gated-silu'"):
        T5.options_from_hf_config({"feed_forward_proj": "gated-silu"})
    model = T5(vocab_size=50, d_model=64, n_head=4, d_ff=128, n_layer=1)
    assert model.d_kv == 16 and model.n_decoder_layer == 1 and model.decoder_start_token_id == 0
    assert model.feed_forward == "gated-gelu" and model.lm_head is not None
    # T5 initialisation folds attention's 1/sqrt(d_kv) into the query projection.
    q = model.encoder.blocks[0].attn.qkv.weight[:64]
    assert abs(q.std().item() - (64 * 16) ** -0.5) < 0.2 * (64 * 16) ** -0.5
    assert math.isclose(model.encoder.blocks[0].attn_norm.weight.sum().item(), 64.0)


def test_mismatched_checkpoints_are_refused():
    hf = hf_t5("v1.1")
    tied = T5(**{**T5.options_from_hf_config(hf.config.to_dict()), "tie_embeddings": True})
    with pytest.raises(LmforgeError, match="tie_embeddings=False"):
        tied.hf_state_dict_to_lmforge(hf.state_dict())
    deeper = T5(**{**T5.options_from_hf_config(hf.config.to_dict()), "n_layer": 3})
    with pytest.raises(LmforgeError, match="missing.*encoder.block.2"):
        deeper.hf_state_dict_to_lmforge(hf.state_dict())
    wider = T5(**{**T5.options_from_hf_config(hf.config.to_dict()), "d_ff": 64})
    with pytest.raises(LmforgeError, match="d_ff"):
        wider.hf_state_dict_to_lmforge(hf.state_dict())
