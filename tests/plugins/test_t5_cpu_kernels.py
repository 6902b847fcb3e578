"""T5's hand-written CPU paths against plain PyTorch: the gated-GELU backward (same bits as
autograd through ``chunk``) and the uniform-threshold dropout (same law as ``F.dropout``)."""

import pytest
import torch
import torch.nn.functional as F
from lmforge_plugins.architectures.t5 import Dropout, GatedGeluFunction, dropout


def test_gated_gelu_matches_autograd_bit_for_bit():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 2 * 24, requires_grad=True)
    grad = torch.randn(3, 7, 24)
    gate, linear = h.chunk(2, dim=-1)
    expected = F.gelu(gate, approximate="tanh") * linear
    (expected_grad,) = torch.autograd.grad(expected, h, grad)
    out = GatedGeluFunction.apply(h)
    (out_grad,) = torch.autograd.grad(out, h, grad)
    assert torch.equal(out, expected)
    assert torch.equal(out_grad, expected_grad)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_1_minus_p_scales_and_backpropagates_its_mask(p):
    torch.manual_seed(0)
    x = torch.full((200_000,), 2.0, requires_grad=True)
    y = dropout(x, p)
    kept = y != 0
    # 200k Bernoulli(1 - p) draws: the kept fraction is within 0.005 of 1 - p (> 4 sigma).
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, kept.float() / (1 - p))


def test_dropout_is_the_identity_in_eval_and_reproducible_under_a_seed():
    x = torch.randn(4, 8)
    module = Dropout(0.3).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(dropout(x, 0.3, training=False), x)
    torch.manual_seed(1)
    a = module.train()(x)
    torch.manual_seed(1)
    assert torch.equal(module(x), a)
