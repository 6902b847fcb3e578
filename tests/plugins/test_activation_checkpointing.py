"""GPT's activation_checkpointing: same numbers, blocks recomputed in backward, off at inference."""

from __future__ import annotations

import torch
from lmforge_plugins.architectures.gpt import GPT


def _pair(**options):
    torch.manual_seed(0)
    plain = GPT(vocab_size=97, n_layer=3, n_head=2, d_model=32, block_size=16, **options)
    ckpt = GPT(vocab_size=97, n_layer=3, n_head=2, d_model=32, block_size=16, activation_checkpointing=True, **options)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _count_block_forwards(model):
    # pre-hooks: a recomputation stops as soon as the saved tensors are rebuilt, so it may never
    # reach the point where a block's forward hook would fire
    calls = []
    for block in model.h:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_checkpointed_gpt_gives_the_same_loss_and_gradients():
    for options in ({}, {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu"}):
        plain, ckpt = _pair(**options)
        ids = torch.randint(0, 97, (2, 16))
        losses = []
        for model in (plain, ckpt):
            model.train()
            loss = model.logits(model(ids)).float().logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_blocks_are_recomputed_in_backward_only_when_training():
    plain, ckpt = _pair()
    ids = torch.randint(0, 97, (2, 16))
    for model, forwards_per_step in ((plain, 3), (ckpt, 6)):  # checkpointing runs each block's forward twice
        calls = _count_block_forwards(model)
        model.train()
        model.logits(model(ids)).sum().backward()
        assert len(calls) == forwards_per_step
    calls = _count_block_forwards(ckpt)
    ckpt.eval()
    with torch.no_grad():
        ckpt(ids)
    assert len(calls) == 3  # inference never checkpoints (and generation with a KV cache works as before)
    assert ckpt.plugin_options()["activation_checkpointing"] is True  # stored with the model's options
