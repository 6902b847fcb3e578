"""What the three family modules share: plugin wiring, optimisation, logging and checkpoint metadata.

A family module is a LightningModule assembled from an architecture (the network), an objective
(the loss and how batches are built) and optionally a task. Its typed ``__init__`` is the
``model:`` section of a YAML config.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn

import lmforge
from lmforge.errors import LmforgeError
from lmforge.plugin_api import Architecture, Objective, Task

Schedule = Literal["cosine", "linear", "constant"]


class LMModule(L.LightningModule):
    """Base of :class:`EncoderLM`, :class:`DecoderLM` and :class:`Seq2SeqLM`.

    Args:
        architecture: The backbone network plugin, e.g. ``class_path: gpt``.
        objective: How the model learns, e.g. ``class_path: clm``.
        task: A fine-tuning task plugin, or null for pretraining.
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay, applied only to matrices (not to norms, biases or
            embeddings).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup from 0 to ``lr`` over this many optimizer steps.
        schedule: Learning-rate shape after warmup: ``cosine`` or ``linear`` decay to
            ``lr * min_lr_ratio`` at the last step, or ``constant``.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` for the decaying schedules.
        init_from: Start from these architecture weights: an lmforge checkpoint, run directory or
            model folder, or a Hugging Face folder (config.json + model.safetensors). A task head
            is always new.
        nonfinite: What a step whose loss or gradient norm is not finite (on any rank) does:
            ``halt`` stops training in that step with the parameters of the previous step;
            ``skip`` leaves parameters and optimizer state unchanged and goes on (the step still
            counts for ``max_steps`` and the schedule). See ``docs/reliability.md``.
        max_consecutive_skips: With ``nonfinite: skip``, halt when more steps than this in a row
            are not finite.
    """

    #: "encoder", "decoder" or "seq2seq"; set by each family.
    family: ClassVar[str] = ""

    def __init__(
        self,
        architecture: Architecture,
        objective: Objective,
        task: Task | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        nonfinite: Literal["halt", "skip"] = "halt",
        max_consecutive_skips: int = 5,
    ) -> None:
        super().__init__()
        if max_consecutive_skips < 0:
            raise LmforgeError(f"model.max_consecutive_skips must be 0 or more, not {max_consecutive_skips}.")
        check_supports(self.family, architecture, objective, task)
        objective.check_architecture(architecture)
        self.save_hyperparameters(ignore=["architecture", "objective", "task"])
        self.architecture = architecture
        self.objective = objective
        self.task = task
        #: tokenizer.json text of the data this model was trained on, stored in every checkpoint
        self.tokenizer_json: str | None = None
        self.val_loss = torchmetrics.MeanMetric()
        self._step_started: float | None = None
        #: The latest training step's loss (detached), read by the training guard's non-finite check.
        self.last_loss: torch.Tensor | None = None
        if init_from:
            self.load_architecture_weights(init_from)

    def load_architecture_weights(self, path: str) -> None:
        """Copy the architecture weights of ``path`` into this model (shapes must match)."""
        from lmforge.checkpoint import initial_architecture_weights

        state, tokenizer_json = initial_architecture_weights(path)
        check_same_shapes(self.architecture.state_dict(), state)
        self.architecture.load_state_dict(state)
        self.tokenizer_json = tokenizer_json or self.tokenizer_json

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.objective.compute_loss(self, batch)
        loss = out["loss"]
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)))
        for key, value in out.items():
            if key not in ("loss", "tokens"):
                self.log(f"train/{key}", value)
        self._log_throughput(out["tokens"])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.objective.compute_loss(self, batch)
        self.val_loss.update(out["loss"].detach(), weight=out["tokens"])
        for key, value in out.items():
            if key not in ("loss", "tokens"):
                self.log(f"val/{key}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss.clamp(max=50)), sync_dist=False)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss.clamp(max=50)))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.task is None or not hasattr(self.task, "predict_step"):
            raise LmforgeError(
                "`lmforge predict` writes a task's predictions, and this model has no task. Sample text from a "
                "decoder with `lmforge generate --checkpoint RUN_DIR --prompt ...`, or fine-tune with a task first."
            )
        return self.task.predict_step(self, batch)

    def _log_throughput(self, tokens: torch.Tensor) -> None:
        """Tokens per second of wall time between consecutive training steps (this rank)."""
        now = time.perf_counter()
        if self._step_started is not None:
            elapsed = now - self._step_started
            self.log("train/tokens_per_sec", float(tokens) / max(elapsed, 1e-9))
        self._step_started = now

    # -- optimisation ----------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay on matrices only; norms, biases and embeddings are exempt."""
        embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        extra = self.architecture.no_weight_decay()
        decay, no_decay, seen = [], [], set()
        for name, param in self.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            short = name.removeprefix("architecture.")
            if param.dim() < 2 or id(param) in embedding_ids or short in extra:
                no_decay.append(param)
            else:
                decay.append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused or None
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(hp.schedule, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """The training guard: non-finite policy, preemption, RNG restore (lmforge.reliability.guard)."""
        from lmforge.reliability.guard import TrainingGuard

        return [TrainingGuard()]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- checkpoint metadata ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if hasattr(tokenizer, "to_str"):  # a tokenizers.Tokenizer: keep it with every checkpoint
            self.tokenizer_json = tokenizer.to_str()

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` this model was trained with (stored in its checkpoints)."""
        from tokenizers import Tokenizer

        if not self.tokenizer_json:
            raise LmforgeError("This model has no tokenizer attached; it was not trained from a TextDataModule.")
        return Tokenizer.from_str(self.tokenizer_json)

    def lmforge_metadata(self) -> dict[str, Any]:
        """Plain data (no pickled objects) that rebuilds this model: see :func:`lmforge.load_model`."""
        from lmforge.plugin_manager import plugin_for

        plugins = []
        for obj in (self.architecture, self.objective, self.task):
            if obj is None:
                continue
            info = plugin_for(obj)
            plugins.append(
                {
                    "kind": obj.kind,
                    "name": obj.name,
                    "package": info.source.package if info else "?",
                    "version": info.source.version if info else "?",
                }
            )
        return {
            "lmforge_version": lmforge.__version__,
            "family": self.family,
            "module_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "module_options": self.module_options(),
            "architecture": self.architecture.plugin_config(),
            "objective": self.objective.plugin_config(),
            "task": self.task.plugin_config() if self.task is not None else None,
            "plugins": plugins,
            "tokenizer_json": self.tokenizer_json,
        }

    def module_options(self) -> dict[str, Any]:
        """This module's own ``__init__`` options (plugins excluded), as plain data."""
        names = set(inspect.signature(type(self).__init__).parameters)
        names -= {"self", "architecture", "objective", "task", "init_from"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmforge"] = self.lmforge_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("lmforge")
        if meta is None:
            raise LmforgeError(
                "This checkpoint was not written by lmforge (it has no 'lmforge' metadata). Resume only from "
                "checkpoints of an lmforge run, or convert foreign weights with `lmforge convert`."
            )
        if "state_dict" in checkpoint:  # a DeepSpeed checkpoint's weights are sharded; DeepSpeed loads and checks them
            check_same_shapes(self.state_dict(), checkpoint["state_dict"])
        self.tokenizer_json = meta.get("tokenizer_json") or self.tokenizer_json


def check_supports(family: str, architecture: Architecture, objective: Objective, task: Task | None) -> None:
    """Refuse, before any compute, a plugin that does not support this family."""
    for plugin in (architecture, objective, task):
        if plugin is None:
            continue
        if family not in plugin.families:
            raise LmforgeError(
                f"The {plugin.kind} '{plugin.name}' does not support the {family} family; it supports "
                f"{', '.join(plugin.families)}. Pick a {plugin.kind} that lists '{family}' "
                f"(see `lmforge plugins list`) or use a {'/'.join(plugin.families)} model."
            )


def check_same_shapes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """A clear error listing tensors whose names or shapes differ between a model and a checkpoint."""
    problems = []
    for name, tensor in expected.items():
        if name not in found:
            problems.append(f"{name} missing from the checkpoint")
        elif tuple(found[name].shape) != tuple(tensor.shape):
            problems.append(f"{name}: checkpoint {tuple(found[name].shape)} vs model {tuple(tensor.shape)}")
    problems += [f"{name} unexpected in the checkpoint" for name in found if name not in expected]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise LmforgeError(
            f"The checkpoint does not fit this model ({len(problems)} tensor(s) differ): {shown}. Use the same "
            "architecture options as the run that wrote it (see its config.yaml), or start a new run."
        )


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float):
    """The learning-rate multiplier as a function of the optimizer step."""

    def multiplier(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
