"""What the three family modules share: plugin wiring, optimisation, logging and checkpoint metadata.

A family module is a LightningModule assembled from an architecture (the network), an objective
(the loss and how batches are built) and optionally a task. Its typed ``__init__`` is the
``model:`` section of a YAML config.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn

import lmforge
from lmforge.errors import LmforgeError
from lmforge.plugin_api import Architecture, Objective, Task
from lmforge.throughput import TokenThroughputMonitor  # noqa: F401 (YAML: class_path: TokenThroughputMonitor)

Schedule = Literal["cosine", "linear", "constant"]


class LMModule(L.LightningModule):
    """Base of :class:`EncoderLM`, :class:`DecoderLM` and :class:`Seq2SeqLM`.

    Args:
        architecture: The backbone network plugin, e.g. ``class_path: gpt``.
        objective: How the model learns, e.g. ``class_path: clm``. Optional when a task is given
            (the task's ``step`` then trains the model).
        task: A fine-tuning task plugin (its head, metrics and predictions), or null for pretraining.
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
        freeze_embeddings: Keep the architecture's input embeddings fixed (fine-tuning).
        freeze_layers: Keep the first this many layers of the architecture fixed (seq2seq: counted
            over the encoder's layers, then the decoder's).
        compile: Compile the architecture's forward (and so its backward) with ``torch.compile``
            when training starts (:meth:`configure_model`). Off by default: compiling takes from
            seconds (tiny models) to minutes, and pays off on long runs. On CPU it needs a C++
            compiler (Inductor builds C++ kernels). Loss heads and objectives stay eager.
    """

    #: "encoder", "decoder" or "seq2seq"; set by each family.
    family: ClassVar[str] = ""

    def __init__(
        self,
        architecture: Architecture,
        objective: Objective | None = None,
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
        freeze_embeddings: bool = False,
        freeze_layers: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if max_consecutive_skips < 0:
            raise LmforgeError(f"model.max_consecutive_skips must be 0 or more, not {max_consecutive_skips}.")
        if objective is None and task is None:
            raise LmforgeError(
                f"The {self.family} model has neither an objective nor a task, so nothing says how to train it. "
                "Set model.objective (pretraining, e.g. class_path: clm) or model.task (fine-tuning)."
            )
        if freeze_layers < 0:
            raise LmforgeError(f"model.freeze_layers must be 0 or more, not {freeze_layers}.")
        if not (lr > 0 and math.isfinite(lr)):  # also refuses nan, before anything is written
            raise LmforgeError(f"model.lr must be a positive, finite learning rate, not {lr}. Try 3e-4.")
        check_supports(self.family, architecture, objective, task)
        if objective is not None:
            objective.check_architecture(architecture)
        self.save_hyperparameters(ignore=["architecture", "objective", "task"])
        self.architecture = architecture
        self.objective = objective
        self.task = task
        #: tokenizer.json text of the data this model was trained on, stored in every checkpoint
        self.tokenizer_json: str | None = None
        self.val_loss = torchmetrics.MeanMetric()
        #: The latest training step's loss (detached), read by the training guard's non-finite check.
        self.last_loss: torch.Tensor | None = None
        #: This step's gradient norm, measured by the training guard and reused to clip (None: not measured).
        self.last_grad_norm: torch.Tensor | None = None
        #: The tokenizer's special tokens, set from the datamodule (tasks use them to decode and pad).
        self.special = None
        if init_from:
            self.load_architecture_weights(init_from)
        if task is not None:
            task.build(self)  # the heads are new, never loaded from init_from
        self.freeze_backbone(freeze_embeddings, freeze_layers)

    def freeze_backbone(self, embeddings: bool, layers: int) -> None:
        """Stop gradients to the input embeddings and/or the first ``layers`` layers of the architecture."""
        if embeddings:
            for module in self.architecture.embedding_modules():
                module.requires_grad_(False)
        if layers:
            stack = self.architecture.layer_modules()
            if layers > len(stack):
                raise LmforgeError(
                    f"model.freeze_layers is {layers} but the {self.architecture.name} architecture has only "
                    f"{len(stack)} layers; set it to at most {len(stack)}."
                )
            for module in stack[:layers]:
                module.requires_grad_(False)

    def load_architecture_weights(self, path: str) -> None:
        """Copy the architecture weights of ``path`` into this model (shapes must match)."""
        from lmforge.checkpoint import initial_architecture_weights

        state, tokenizer_json = initial_architecture_weights(path)
        check_same_shapes(self.architecture.state_dict(), state)
        self.architecture.load_state_dict(state)
        self.tokenizer_json = tokenizer_json or self.tokenizer_json

    # -- steps -----------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """``{"loss", "tokens", ...}`` of a batch: the task's ``step`` when there is a task, else the objective's."""
        if self.task is not None:
            return self.task.step(self, batch, stage)
        return self.objective.compute_loss(self, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch, "train")
        loss = out["loss"]
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        if self._language_model_loss() and self._logging_step():
            self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)))
        for key, value in out.items():
            if key not in ("loss", "tokens"):
                self.log(f"train/{key}", value)
        return loss

    def _logging_step(self) -> bool:
        """Whether Lightning writes this training step's logged values (what only they need is computed
        then: every ``self.log`` call costs host time, a noticeable share of a small model's step)."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs  # as Lightning's ThroughputMonitor asks

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip by norm with the norm the training guard has just measured, instead of measuring it again.

        The arithmetic is ``torch.nn.utils.clip_grad_norm_``'s (``coef = clip / (norm + 1e-6)``, at most
        1, times every gradient), so the result is the same to the bit; it saves one pass over all
        gradients per step. Used on one device and under DDP (whose gradients are already averaged
        when the guard runs) with every gradient of one dtype; anything else (value clipping, a loss
        scaler, DeepSpeed, FSDP) goes through Lightning's own clipping.
        """
        norm, self.last_grad_norm = self.last_grad_norm, None
        if norm is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm") and self._clips_here():
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads and len({(g.device, g.dtype) for g in grads}) == 1:
                coef = torch.clamp(gradient_clip_val / (norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
                return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _clips_here(self) -> bool:
        """Whether the gradients are whole and final in ``p.grad`` when clipping runs (see above)."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = self.trainer.strategy
        return (isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
                and getattr(self.trainer.precision_plugin, "scaler", None) is None)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.compute_loss(batch, stage)
        self.val_loss.update(out["loss"].detach(), weight=out["tokens"])
        for key, value in out.items():
            if key not in ("loss", "tokens"):
                self.log(f"{stage}/{key}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        if self._language_model_loss():
            self.log("val/ppl", torch.exp(loss.clamp(max=50)), sync_dist=False)
        self._log_task_metrics("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        if self._language_model_loss():
            self.log("test/ppl", torch.exp(loss.clamp(max=50)))
        self._log_task_metrics("test")

    def _language_model_loss(self) -> bool:
        """Whether the loss is the objective's (a perplexity means something) rather than a task's."""
        return self.task is None or type(self.task).step is Task.step

    def _log_task_metrics(self, stage: str) -> None:
        """The task's streaming metrics (already reduced over every process by torchmetrics)."""
        if self.task is None:
            return
        for name, value in self.task.compute_metrics(stage).items():
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val", sync_dist=False)

    # -- task features ---------------------------------------------------------------------------
    def sequence_features(self, batch: dict[str, Any], pooling: str = "auto") -> torch.Tensor:
        """One ``(B, d_model)`` vector per sequence for classification heads (see each family)."""
        raise NotImplementedError(f"The {self.family} family has no sequence features")

    def token_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """One ``(B, T, d_model)`` state per input token for token-level heads (see each family)."""
        raise NotImplementedError(f"The {self.family} family has no token features")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.task is None:
            raise LmforgeError(
                "`lmforge predict` writes a task's predictions, and this model has no task. Sample text from a "
                "decoder with `lmforge generate --checkpoint RUN_DIR --prompt ...`, or fine-tune with a task first."
            )
        return self.task.predict_step(self, batch)

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
        """AdamW (fused where torch has the kernel) and the per-step learning-rate schedule.

        The fused AdamW updates every parameter in one kernel, about 15x faster than the
        multi-tensor (foreach) loop on CPU and several times on GPU. It is not used with a
        ``GradScaler`` (``precision: 16-mixed``): a fused step unscales the gradients itself, which
        Lightning refuses together with gradient clipping.
        """
        hp = self.hparams
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        fused = self.device.type in ("cpu", "cuda") and scaler is None
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused or None
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(hp.schedule, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Compile the architecture in place when ``compile`` is set (idempotent: Lightning calls it
        for every fit/validate/test/predict). In place (``nn.Module.compile``) keeps the parameter
        names, so checkpoints of compiled and eager runs are interchangeable."""
        if not self.hparams.get("compile") or getattr(self.architecture, "_compiled_call_impl", None) is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if device.type == "cpu":
            check_cpp_compiler()
        self.architecture.compile()

    def configure_callbacks(self) -> list[L.Callback]:
        """The training guard: non-finite policy, preemption, RNG restore (lmforge.reliability.guard)."""
        from lmforge.reliability.guard import TrainingGuard

        return [TrainingGuard()]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._logging_step():  # by global step, so a resumed run logs on the same steps
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- checkpoint metadata ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if hasattr(tokenizer, "to_str"):  # a tokenizers.Tokenizer: keep it with every checkpoint
            self.tokenizer_json = tokenizer.to_str()
        if getattr(datamodule, "special", None) is not None:
            self.special = datamodule.special

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` this model was trained with (stored in its checkpoints)."""
        from tokenizers import Tokenizer

        if not self.tokenizer_json:
            raise LmforgeError("This model has no tokenizer attached; it was not trained from an lmforge datamodule.")
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
            "objective": self.objective.plugin_config() if self.objective is not None else None,
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


def check_cpp_compiler() -> None:
    """Refuse ``compile: true`` on CPU early when Inductor could not build its C++ kernels."""
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise LmforgeError(
            "model.compile: true compiles the architecture with torch.compile, whose CPU backend (Inductor) "
            "builds C++ kernels, and no C++ compiler was found (looked for $CXX, g++, c++ and clang++ on PATH). "
            "Install one (e.g. `apt-get install g++`), point $CXX at it, or set model.compile: false."
        )


def check_supports(family: str, architecture: Architecture, objective: Objective, task: Task | None) -> None:
    """Refuse, before any compute, a plugin that does not support this family."""
    for plugin in (architecture, objective, task):
        if plugin is None:
            continue
        if family not in plugin.families:
            raise LmforgeError(
                f"The {plugin.kind} '{plugin.name}' does not support the {family} family; it supports "
                f"{', '.join(plugin.families)}. Pick a {plugin.kind} that lists '{family}' "
                f"(see `lmforge plugins list`) or a model of a family it supports (model.class_path)."
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
