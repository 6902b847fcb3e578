"""The shared training step's bookkeeping: gradient clipping with the guard's norm, and what is logged when."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmforge import DecoderLM
from lmforge.families.base import LMModule
from lmforge.run_logger import RunLogger
from lmforge_plugins.architectures.gpt import GPT
from lmforge_plugins.objectives.clm import CLM

STEPS = 6


def batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(STEPS)]


#: What torch.nn.utils.clip_grad_norm_ returned in the latest run that clipped through Lightning.
norms: list[float] = []


def train(tmp_path, monkeypatch, clip: float | None, algorithm: str = "norm", lightning_clipping: bool = False):
    """Parameters after STEPS steps, and how often Lightning's own clipping ran."""
    calls = []
    norms.clear()
    original = L.LightningModule.clip_gradients
    monkeypatch.setattr(L.LightningModule, "clip_gradients", lambda self, *a, **k: (calls.append(1), original(self, *a, **k)))
    if lightning_clipping:
        monkeypatch.setattr(LMModule, "_clips_here", lambda self: False)
        clip_grad_norm = torch.nn.utils.clip_grad_norm_
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(clip_grad_norm(*a, **k).item()))
    torch.manual_seed(0)
    module = DecoderLM(GPT(vocab_size=64, n_layer=2, n_head=2, d_model=16, block_size=12, dropout=0.0), CLM(), lr=3e-2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=RunLogger(str(tmp_path)), log_every_n_steps=2,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        gradient_clip_val=clip, gradient_clip_algorithm=algorithm, default_root_dir=str(tmp_path),
    )
    trainer.fit(module, DataLoader(batches(), batch_size=None))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, len(calls)


def test_clipping_with_the_guards_norm_equals_lightnings_clip_grad_norm(tmp_path, monkeypatch):
    reused, lightning_calls = train(tmp_path / "a", monkeypatch, clip=0.05)
    assert lightning_calls == 0  # the guard's norm was reused: no second pass over the gradients
    reference, reference_calls = train(tmp_path / "b", monkeypatch, clip=0.05, lightning_clipping=True)
    assert reference_calls == STEPS  # torch.nn.utils.clip_grad_norm_, through Lightning
    assert all(torch.equal(reused[k], reference[k]) for k in reference)  # the same to the bit
    unclipped, _ = train(tmp_path / "c", monkeypatch, clip=None)
    assert not all(torch.equal(reused[k], unclipped[k]) for k in reference)  # clipping did act


def test_the_gradient_norm_before_clipping_is_logged(tmp_path, monkeypatch):
    train(tmp_path / "a", monkeypatch, clip=0.05)
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")}
    train(tmp_path / "b", monkeypatch, clip=0.05, lightning_clipping=True)
    assert len(norms) == STEPS and min(norms) > 0.05  # every step was clipped
    assert logged == pytest.approx({1: norms[1], 3: norms[3], 5: norms[5]}, rel=1e-6)


def test_value_clipping_goes_through_lightning(tmp_path, monkeypatch):
    _, calls = train(tmp_path, monkeypatch, clip=0.01, algorithm="value")
    assert calls == STEPS


@pytest.mark.parametrize("column", ["train/loss", "train/ppl", "train/grad_norm"])
def test_training_values_are_written_on_logging_steps(tmp_path, monkeypatch, column):
    train(tmp_path, monkeypatch, clip=1.0)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    written = {int(r["step"]): float(r[column]) for r in rows if r.get(column)}
    assert sorted(written) == [1, 3, 5]  # log_every_n_steps=2: after steps 2, 4, 6 (global_step - 1)
    if column == "train/ppl":
        losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
        assert all(abs(written[s] - torch.exp(torch.tensor(losses[s])).item()) < 1e-3 * written[s] for s in written)
