"""``model.compile: true``: a compiled model trains like the eager one, for every built-in architecture.

Each case builds one tiny model, copies it, compiles the copy the way Lightning does
(``configure_model``), and trains both for four AdamW steps on the same batches. Tolerance: the
per-step losses agree to a relative 1e-4 (Inductor fuses and reorders float32 reductions, so the
last bits differ; a wrong graph, e.g. a dropped mask or bias, changes the loss in the first digits).
Compilation is the slow part (CPU Inductor builds C++): the models have one layer each.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.architectures.t5 import T5
from lmforge_plugins.objectives.clm import CLM
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.objectives.span_corruption import SpanCorruption

from lmforge import LmforgeError
from lmforge.families import DecoderLM, EncoderLM, Seq2SeqLM

V = 300


def _batches(family: str, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (2, 16), generator=g)
        if family == "decoder":
            out.append({"input_ids": ids})
        elif family == "encoder":
            labels = ids.masked_fill(torch.rand(2, 16, generator=g) > 0.3, -100)
            out.append({"input_ids": ids, "labels": labels})
        else:
            mask = torch.ones(2, 16, dtype=torch.long)
            mask[1, 12:] = 0  # one padded row: the encoder mask must survive compilation
            out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, V, (2, 6), generator=g)})
    return out


def _module(family: str, compile: bool = False):
    torch.manual_seed(0)
    if family == "decoder":
        return DecoderLM(architecture=GPT(vocab_size=V, n_layer=1, n_head=2, d_model=32, block_size=16),
                         objective=CLM(), compile=compile)
    if family == "encoder":
        return EncoderLM(architecture=BERT(vocab_size=V, n_layer=1, n_head=2, d_model=32, block_size=16, dropout=0.0),
                         objective=MLM(), compile=compile)
    return Seq2SeqLM(architecture=T5(vocab_size=V, n_layer=1, n_head=2, d_model=32, d_ff=64),
                     objective=SpanCorruption(), compile=compile)


def _train(module, batches) -> list[float]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        loss = module.objective.compute_loss(module, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["decoder", "encoder", "seq2seq"])
def test_compiled_model_trains_like_eager(family):
    eager = _module(family)
    compiled = copy.deepcopy(eager)
    compiled.hparams.compile = True
    compiled.configure_model()
    compiled.configure_model()  # Lightning calls it for every stage: the second call must change nothing
    assert compiled.architecture._compiled_call_impl is not None
    assert eager.architecture._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: checkpoints keep their names

    first, second = _batches(family)
    batches = [first, second, first, first]  # the first batch again: its loss must have fallen
    expected, got = _train(eager, batches), _train(compiled, batches)
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0] - 0.05  # the steps did train


def test_compile_without_cpp_compiler_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    module = _module("decoder", compile=True)
    with pytest.raises(LmforgeError, match="no C\\+\\+ compiler was found.*model.compile: false"):
        module.configure_model()
    assert module.architecture._compiled_call_impl is None
