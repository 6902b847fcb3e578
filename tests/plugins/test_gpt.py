"""Tests of the GPT architecture plugin against independent references.

References used: Hugging Face ``GPT2LMHeadModel`` (the default configuration), Hugging Face
``LlamaForCausalLM`` (rotary + rmsnorm + swiglu + GQA), a plain-PyTorch re-implementation with
explicit softmax attention, and the model itself run on unpadded / unpacked / uncached inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge import LmforgeError
from lmforge_plugins.architectures import gpt as gpt_module
from lmforge_plugins.architectures.gpt import GPT, KVCache

transformers = pytest.importorskip("transformers")

V, C, NH, L, BLOCK = 61, 32, 4, 2, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kwargs) -> GPT:
    options = dict(vocab_size=V, n_layer=L, n_head=NH, d_model=C, block_size=BLOCK)
    options.update(kwargs)
    return GPT(**options).eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Randomise every parameter (biases and norm weights start at 0/1, which would hide mistakes)."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# 1. Parity with Hugging Face GPT-2


def hf_gpt2():
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=BLOCK, n_embd=C, n_layer=L, n_head=NH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb(model)
    return model


def gpt_from_hf(hf) -> GPT:
    model = tiny()
    model.load_state_dict(model.hf_state_dict_to_lmforge(hf.state_dict()), strict=True)
    return model


@torch.no_grad()
def test_gpt2_parity_logits():
    hf = hf_gpt2()
    model = gpt_from_hf(hf)
    ids = torch.randint(0, V, (3, 17))
    expected = hf(input_ids=ids).logits
    got = model.logits(model(ids))
    print(f"GPT-2 parity max abs diff: {max_diff(got, expected):.3e}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_gpt2_parity_right_padded_batch():
    hf = hf_gpt2()
    model = gpt_from_hf(hf)
    ids = torch.randint(0, V, (3, 12))
    lengths = [12, 7, 3]
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    expected = hf(input_ids=ids, attention_mask=mask).logits
    got = model.logits(model(ids, attention_mask=mask))
    real = mask.bool()
    print(f"GPT-2 padded parity max abs diff: {max_diff(got[real], expected[real]):.3e}")
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


@torch.no_grad()
def test_gpt2_state_dict_round_trip():
    model = tiny()
    perturb(model)
    hf_state = model.lmforge_state_dict_to_hf()
    # The converted dict loads into a real GPT2LMHeadModel with nothing missing or left over.
    hf = hf_gpt2()
    result = hf.load_state_dict(hf_state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in result.missing_keys)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D: (in, out)
    back = model.hf_state_dict_to_lmforge(hf_state)
    original = model.state_dict()
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(hf(input_ids=ids).logits, model.logits(model(ids)), atol=1e-5, rtol=1e-5)


def test_gpt2_untied_head_and_unsupported_config():
    hf = hf_gpt2()
    untied = tiny(tie_embeddings=False)
    untied.load_state_dict(untied.hf_state_dict_to_lmforge(hf.state_dict()), strict=True)
    assert torch.equal(untied.lm_head.weight, hf.lm_head.weight)
    with pytest.raises(LmforgeError, match="position='learned'"):
        tiny(position="rotary").hf_state_dict_to_lmforge(hf.state_dict())
    with pytest.raises(LmforgeError, match="n_layer"):
        tiny(n_layer=3).hf_state_dict_to_lmforge(hf.state_dict())
    with pytest.raises(LmforgeError, match=r"wpe\.weight has shape \(32, 32\)"):
        tiny(block_size=16).hf_state_dict_to_lmforge(hf.state_dict())


# ----------------------------------------------------------------------------------------------
# 2. GQA / MQA against a plain-PyTorch reference and against Llama


def reference_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2 layout written out by hand: explicit softmax attention, kv heads repeated."""
    B, T = ids.shape
    nh, nkv, hs = model.n_head, model.n_kv_head, model.head_dim
    x = model.wte.weight[ids] + model.wpe.weight[:T]
    causal = torch.ones(T, T).tril().bool()

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * mod.weight + mod.bias

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))

    for blk in model.h:
        a = ln(x, blk.ln_1)
        qkv = a @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)
        k = k.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        v = v.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, nh * hs)
        x = x + y @ blk.attn.c_proj.weight.T + blk.attn.c_proj.bias
        a = ln(x, blk.ln_2)
        x = x + gelu_tanh(a @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias) @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    return ln(x, model.ln_f)


@pytest.mark.parametrize("n_kv_head", [NH, 2, 1])
@torch.no_grad()
def test_gqa_mqa_matches_reference(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    perturb(model)
    hs = C // NH
    assert model.h[0].attn.c_attn.weight.shape == ((NH + 2 * n_kv_head) * hs, C)
    ids = torch.randint(0, V, (2, 11))
    hidden = model(ids)
    assert hidden.shape == (2, 11, C)
    assert model.logits(hidden).shape == (2, 11, V)
    torch.testing.assert_close(hidden, reference_forward(model, ids), atol=1e-5, rtol=1e-5)


def llama_from_gpt(model: GPT):
    """A Hugging Face Llama with this (rotary/rmsnorm/swiglu, bias-free, untied) GPT's weights."""
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=C, intermediate_size=model.d_ff, num_hidden_layers=model.n_layer,
        num_attention_heads=model.n_head, num_key_value_heads=model.n_kv_head,
        max_position_embeddings=BLOCK, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation="eager",
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    nq, nkv = model.n_head * model.head_dim, model.n_kv_head * model.head_dim
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.h):
        q, k, v = blk.attn.c_attn.weight.split([nq, nkv, nkv], dim=0)
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": blk.attn.c_proj.weight,
            p + "mlp.gate_proj.weight": blk.mlp.c_gate.weight, p + "mlp.up_proj.weight": blk.mlp.c_fc.weight,
            p + "mlp.down_proj.weight": blk.mlp.c_proj.weight,
            p + "input_layernorm.weight": blk.ln_1.weight, p + "post_attention_layernorm.weight": blk.ln_2.weight,
        }
    llama.load_state_dict(state, strict=True)
    return llama


def llama_style(**kwargs) -> GPT:
    options = dict(position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, d_ff=48)
    options.update(kwargs)
    return tiny(**options)


@pytest.mark.parametrize("n_kv_head", [NH, 2, 1])
@torch.no_grad()
def test_rotary_rmsnorm_swiglu_gqa_matches_llama(n_kv_head):
    model = llama_style(n_kv_head=n_kv_head)
    perturb(model)
    llama = llama_from_gpt(model)
    ids = torch.randint(0, V, (2, 13))
    got = model.logits(model(ids))
    expected = llama(input_ids=ids).logits
    print(f"Llama parity (n_kv_head={n_kv_head}) max abs diff: {max_diff(got, expected):.3e}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. Rotary + rmsnorm + swiglu: trains; rotary sees relative positions only


def test_llama_style_trains():
    model = llama_style(n_kv_head=2).train()
    ids = torch.randint(0, V, (4, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        logits = model.logits(model(ids))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@torch.no_grad()
def test_rotary_depends_on_relative_position_only():
    ids = torch.randint(0, V, (2, 10))
    shifted = torch.arange(10) + 7
    rotary = llama_style(n_kv_head=2)
    perturb(rotary)
    torch.testing.assert_close(rotary(ids, position_ids=shifted), rotary(ids), atol=1e-5, rtol=1e-5)
    learned = tiny()
    perturb(learned)
    assert max_diff(learned(ids, position_ids=shifted), learned(ids)) > 1e-2


# ----------------------------------------------------------------------------------------------
# 4. KV cache


CACHE_CONFIGS = {
    "learned-mha": dict(),
    "rotary-gqa": dict(position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
}


@pytest.mark.parametrize("config", CACHE_CONFIGS)
@torch.no_grad()
def test_cache_matches_full_forward(config):
    model = tiny(**CACHE_CONFIGS[config])
    perturb(model)
    ids = torch.randint(0, V, (2, 12))
    full = model.logits(model(ids))
    # Token by token from the start.
    cache = model.new_cache(2, 12)
    assert isinstance(cache, KVCache) and cache.k[0].shape == (2, model.n_kv_head, 12, model.head_dim)
    for t in range(12):
        step = model.logits(model(ids[:, t:t + 1], position_ids=torch.tensor([t]), cache=cache))
        torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.length == 12
    # Prompt, then one token at a time with the default positions (continuing from the cache).
    cache = model.new_cache(2, 16)
    step = model.logits(model(ids[:, :5], cache=cache))
    torch.testing.assert_close(step, full[:, :5], atol=1e-5, rtol=1e-5)
    for t in range(5, 12):
        step = model.logits(model(ids[:, t:t + 1], cache=cache))
        torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", CACHE_CONFIGS)
@torch.no_grad()
def test_cache_left_padded_batch_matches_single_prompts(config):
    model = tiny(**CACHE_CONFIGS[config])
    perturb(model)
    prompts = [torch.randint(1, V, (6,)), torch.randint(1, V, (3,))]
    continuations = torch.randint(1, V, (2, 4))
    width = 6
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    cache = model.new_cache(2, width + continuations.size(1))
    logits = model.logits(model(ids, attention_mask=mask, position_ids=positions, cache=cache))
    assert torch.isfinite(logits).all()
    # Left-padding queries would have nothing to attend to (NaN in some SDPA kernels and torch
    # versions; zeros in others): every query row of the mask must keep at least one key.
    assert GPT.build_attention_mask(width, 0, mask, None, ids.device).any(-1).all()
    for row, p in enumerate(prompts):
        alone = model.logits(model(p[None]))
        torch.testing.assert_close(logits[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)

    for s in range(continuations.size(1)):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model.logits(model(continuations[:, s:s + 1], attention_mask=mask, position_ids=positions,
                                    cache=cache))
        for row, p in enumerate(prompts):
            seq = torch.cat([p, continuations[row, :s + 1]])
            alone = model.logits(model(seq[None]))
            torch.testing.assert_close(logits[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_cache_limits():
    with pytest.raises(LmforgeError, match="block_size"):
        tiny().new_cache(1, BLOCK + 1)
    tiny(position="rotary").new_cache(1, BLOCK + 1)  # rotary has no hard limit
    model = tiny()
    cache = model.new_cache(1, 4)
    model(torch.randint(0, V, (1, 3)), cache=cache)
    with pytest.raises(LmforgeError, match="cache is full"):
        model(torch.randint(0, V, (1, 2)), cache=cache)


# ----------------------------------------------------------------------------------------------
# 5. Packed documents


@pytest.mark.parametrize("config", CACHE_CONFIGS)
@torch.no_grad()
def test_document_ids_isolate_packed_documents(config):
    model = tiny(**CACHE_CONFIGS[config])
    perturb(model)
    a, b = torch.randint(0, V, (5,)), torch.randint(0, V, (4,))
    packed = torch.cat([a, b])[None]
    docs = torch.tensor([[3] * 5 + [8] * 4])
    hidden = model(packed, document_ids=docs)
    torch.testing.assert_close(hidden[0, 5:], model(b[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[0, :5], model(a[None])[0], atol=1e-5, rtol=1e-5)
    # Without document ids the second document sees the first: the check above can fail.
    assert max_diff(model(packed)[0, 5:], model(b[None])[0]) > 1e-3


def test_document_positions_restart():
    docs = torch.tensor([[7, 7, 7, 9, 9, 1], [2, 2, 2, 2, 2, 2]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(GPT.document_positions(docs), expected)


@torch.no_grad()
def test_mask_path_equals_causal_fast_path():
    model = tiny(n_kv_head=2)
    perturb(model)
    ids = torch.randint(0, V, (2, 9))
    ones = torch.ones(2, 9, dtype=torch.long)
    torch.testing.assert_close(model(ids, attention_mask=ones), model(ids), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(ids, document_ids=torch.zeros_like(ids)), model(ids), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. Configuration errors, initialisation, registration


def test_config_errors_name_the_option():
    with pytest.raises(LmforgeError, match="vocab_size"):
        GPT()
    with pytest.raises(LmforgeError, match=r"d_model \(30\) must be divisible by n_head \(4\)"):
        GPT(vocab_size=V, d_model=30, n_head=4)
    with pytest.raises(LmforgeError, match=r"n_kv_head \(3\) must divide n_head \(4\)"):
        GPT(vocab_size=V, d_model=32, n_head=4, n_kv_head=3)
    with pytest.raises(LmforgeError, match="even head size"):
        GPT(vocab_size=V, d_model=12, n_head=4, position="rotary")


def test_defaults_and_initialisation():
    model = GPT(vocab_size=V, n_layer=8)
    assert model.d_ff == 4 * 256 and model.n_kv_head == 4 and model.wpe is not None and model.lm_head is None
    assert GPT(vocab_size=V, mlp="swiglu").d_ff == 704  # 8 * 256 / 3 = 682.7, rounded up to 64
    assert torch.equal(model.logits(torch.eye(256)[None])[0], model.wte.weight.T)  # tied head
    blk = model.h[3]
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert blk.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(b.abs().max() == 0 for n, b in model.named_parameters() if n.endswith(".bias") and "ln" not in n)
    assert model.no_weight_decay() == set()
    assert model.plugin_options()["n_layer"] == 8


def test_hook_and_metadata():
    assert gpt_module.lmforge_architectures() == [GPT]
    assert (GPT.name, GPT.families, GPT.hf_model_type, GPT.kind) == ("gpt", ("decoder",), "gpt2", "architecture")
