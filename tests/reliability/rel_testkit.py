"""Plugins for the reliability tests: an objective with collate randomness, NaN injection and a slow mode.

Loaded with ``LMFORGE_PLUGINS=rel_testkit`` (this directory on ``sys.path`` / ``PYTHONPATH``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lmforge_plugins.objectives.clm import CLM

from lmforge import hookimpl


class NoisyCLM(CLM):
    """Next-token prediction on inputs whose tokens are replaced at random in ``collate``.

    Args:
        noise: Fraction of input tokens replaced by random ids (drawn from the global torch RNG in
            ``collate``, so it exercises lmforge's per-batch collate seeding).
        nan_at_steps: 1-based optimizer steps whose training loss becomes NaN.
        nan_ranks: Ranks on which those losses become NaN (all ranks when empty).
        step_seconds: Sleep this long in every training step (to let a test send a signal mid-run).
        stall_at_step: Sleep 120 s in this training step (1-based; 0: never), a step a signal must cut short.
    """

    name = "noisy_clm"
    families = ("decoder",)

    def __init__(
        self,
        noise: float = 0.2,
        nan_at_steps: list[int] | None = None,
        nan_ranks: list[int] | None = None,
        step_seconds: float = 0.0,
        stall_at_step: int = 0,
    ) -> None:
        super().__init__()
        self.stall_at_step = stall_at_step
        self.noise = noise
        self.nan_at_steps = list(nan_at_steps or [])
        self.nan_ranks = list(nan_ranks or [])
        self.step_seconds = step_seconds

    def collate(self, examples, special):
        batch = super().collate(examples, special)
        ids = batch["input_ids"]
        replace = torch.rand(ids.shape) < self.noise
        batch["input_ids"] = torch.where(replace, torch.randint(0, special.vocab_size, ids.shape), ids)
        return batch

    def compute_loss(self, module, batch):
        out = super().compute_loss(module, batch)
        if module.training and module._trainer is not None:
            step = module.trainer.global_step + 1
            rank = module.trainer.global_rank
            if step in self.nan_at_steps and (not self.nan_ranks or rank in self.nan_ranks):
                out["loss"] = out["loss"] * float("nan")
            if self.step_seconds:
                time.sleep(self.step_seconds)
            if step == self.stall_at_step:
                time.sleep(120)
        return out


@hookimpl
def lmforge_objectives():
    return [NoisyCLM]



class ParamTrace(Callback):
    """Saves the parameters and optimizer state after the given steps, and when training raises.

    Files: ``<run>/trace/step-<n>.pt`` and ``<run>/trace/exception.pt`` (``{"params", "optimizer"}``).
    """

    def __init__(self, steps: list[int] | None = None) -> None:
        self.steps = list(steps or [])

    def _save(self, trainer, pl_module, name: str) -> None:
        path = Path(trainer.default_root_dir) / "trace" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict() if trainer.optimizers else None,
        }
        torch.save(state, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self._save(trainer, pl_module, f"step-{trainer.global_step}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._save(trainer, pl_module, "exception")
