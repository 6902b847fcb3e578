"""TokenThroughputMonitor: FLOP formulas against torch's FLOP counter, and tokens/s + MFU in metrics.csv.

The FLOP formulas (each architecture's ``forward_flops`` and the monitor's choice of which rows go
through the vocabulary projection) are checked against an independent reference:
``torch.utils.flop_counter.FlopCounterMode`` over one real forward + backward of the objective's loss,
with SDPA forced onto its "math" backend so that attention runs as matmuls the counter sees.
Tolerance: exact (relative 1e-9); both count 2 FLOPs per multiply-add of every matmul, and a
training step is exactly 3 forwards when every matmul input needs a gradient.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import REPO
from lmforge_plugins.architectures.bert import BERT
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.architectures.t5 import T5
from lmforge_plugins.objectives.clm import CLM
from lmforge_plugins.objectives.mlm import MLM
from lmforge_plugins.objectives.span_corruption import SpanCorruption
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge import SpecialTokens
from lmforge.cli import run_trainer_cli
from lmforge.families import DecoderLM, EncoderLM, LMModule, Seq2SeqLM
from lmforge.throughput import TokenThroughputMonitor, precision_dtype, training_step_flops

V = 300
SPECIAL = SpecialTokens(vocab_size=V, pad_id=0, mask_id=1, cls_id=2, sep_id=3, eos_id=3)


def _ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _masked(ids, seed=1):
    keep = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    return ids.masked_fill(~keep, -100)


CASES = {
    "gpt2-style": lambda: (
        DecoderLM(architecture=GPT(vocab_size=V, n_layer=2, n_head=2, d_model=32, block_size=32), objective=CLM()),
        {"input_ids": _ids(2, 24)},
    ),
    "llama-style gqa swiglu": lambda: (
        DecoderLM(architecture=GPT(vocab_size=V, n_layer=1, n_head=4, n_kv_head=2, d_model=32, block_size=32,
                                   mlp="swiglu", position="rotary", norm="rmsnorm", bias=False, tie_embeddings=False),
                  objective=CLM()),
        {"input_ids": _ids(2, 24)},
    ),
    "bert mlm, labels only (masked rows only)": lambda: (
        EncoderLM(architecture=BERT(vocab_size=V, n_layer=2, n_head=2, d_model=32, block_size=32, dropout=0.0),
                  objective=MLM()),
        {"input_ids": _ids(3, 20), "labels": _masked(_ids(3, 20))},
    ),
    "bert mlm, the mlm collator's batch": lambda: (
        EncoderLM(architecture=BERT(vocab_size=V, n_layer=1, n_head=2, d_model=32, block_size=32, dropout=0.0,
                                    layout="pre_ln"), objective=MLM(mask_prob=0.3, seed=0)),
        MLM(mask_prob=0.3, seed=0).collate([{"input_ids": row} for row in _ids(3, 20).tolist()], SPECIAL),
    ),
    "t5 v1.1, S != T, deeper encoder": lambda: (
        Seq2SeqLM(architecture=T5(vocab_size=V, n_layer=2, n_decoder_layer=1, n_head=2, d_model=32, d_ff=48),
                  objective=SpanCorruption()),
        {"input_ids": _ids(2, 20), "labels": _ids(2, 7, seed=3)},
    ),
    "t5 v1.0 relu tied, padded source": lambda: (
        Seq2SeqLM(architecture=T5(vocab_size=V, n_layer=1, n_head=2, d_model=32, d_ff=48, feed_forward="relu",
                                  tie_embeddings=True), objective=SpanCorruption()),
        {"input_ids": _ids(2, 20), "attention_mask": torch.ones(2, 20, dtype=torch.long).index_fill_(1, torch.arange(15, 20), 0),
         "labels": _ids(2, 7, seed=3)},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_flops_match_torch_flop_counter(case):
    torch.manual_seed(0)
    module, batch = CASES[case]()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module.objective.compute_loss(module, batch)["loss"].backward()
    counted = counter.get_total_flops()
    assert counted > 0
    if "mlm_positions" in batch:  # the collator's count is the one the monitor reads, without a device sync
        assert isinstance(training_step_flops(module, batch), int)
    assert float(training_step_flops(module, batch)) == pytest.approx(counted, rel=1e-9)


def test_precision_names_map_to_matmul_dtypes():
    assert [precision_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", "64-true")] == [
        torch.bfloat16, torch.bfloat16, torch.float16, torch.float32, torch.float64]


TINY = [
    "--model.architecture.n_layer", "1", "--model.architecture.n_head", "2", "--model.architecture.d_model", "32",
    "--model.architecture.block_size", "32", "--data.block_size", "32", "--data.batch_size", "4",
    "--trainer.max_steps", "7", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
]

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts tensor-to-Python reads (each a device sync on a GPU) made inside the training step and the
    monitor's per-step hook: lmforge's own per-step code."""
    state = {"inside": 0, "reads": []}

    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if state["inside"]:
                state["reads"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def inside(fn):
        def wrapper(*args, **kwargs):
            state["inside"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state["inside"] -= 1
        return wrapper

    monkeypatch.setattr(LMModule, "training_step", inside(LMModule.training_step))
    monkeypatch.setattr(TokenThroughputMonitor, "on_train_batch_end", inside(TokenThroughputMonitor.on_train_batch_end))
    return state


def _rows(run):
    return list(csv.DictReader((run / "metrics.csv").open()))


@pytest.mark.parametrize("config", ["gpt-tiny.yaml", "bert-tiny-mlm.yaml"])
def test_shipped_config_logs_tokens_per_sec_and_mfu_without_host_reads(config, tmp_path, monkeypatch, host_reads):
    monkeypatch.chdir(REPO)  # the configs name the shipped corpus relative to the repository root
    run = tmp_path / "run"
    cli = run_trainer_cli(["fit", "--config", str(REPO / "configs" / config), *TINY, "--trainer.default_root_dir", str(run)])
    assert host_reads["reads"] == []
    assert cli.trainer.optimizers[0].defaults["fused"] is True  # fused AdamW on CPU too

    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, TokenThroughputMonitor))
    rows = [r for r in _rows(run) if r.get("train/tokens_per_sec")]
    # Logged on every logging step (1, 3, 5; 0-based) but the first (step 0 has no window yet), fresh each
    # time: step 5's window spans the validation after step 3, whose time is left out.
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    assert len({r["train/tokens_per_sec"] for r in rows}) == 3  # each row a new measurement, none repeated
    architecture = cli.model.architecture
    for row in rows:
        rate, mfu = float(row["train/tokens_per_sec"]), float(row["train/mfu"])
        assert math.isfinite(rate) and rate > 0 and 0 < mfu
        # model FLOPs per token implied by the two logged numbers and the monitor's peak FLOP/s
        per_token = mfu * monitor._peak / rate
        if config == "gpt-tiny.yaml":  # every position is projected onto the vocabulary: constant per token
            assert per_token == pytest.approx(3 * architecture.forward_flops(4, 32) / (4 * 32), rel=1e-5)
        else:  # masked-LM: between no masked position and all of them projected
            low = 3 * architecture.forward_flops(4, 32, vocab_positions=0) / (4 * 32)
            high = 3 * architecture.forward_flops(4, 32, vocab_positions=4 * 32) / (4 * 32)
            assert low < per_token < 0.5 * (low + high)  # 15% of positions are masked, not half
