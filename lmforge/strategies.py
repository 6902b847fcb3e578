"""DeepSpeed ZeRO strategies by name, on GPUs and on CPUs.

``trainer.strategy: deepspeed_stage_1 | deepspeed_stage_2 | deepspeed_stage_3`` and their
``_offload`` variants name DeepSpeed ZeRO. On CUDA they are :class:`DeepSpeedZeroStrategy`:
Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` with the same arguments, plus
correct gradient accumulation and resuming a checkpoint on another number of processes (see the
class). Lightning refuses DeepSpeed without CUDA,
so on a machine without a GPU (or with ``trainer.accelerator: cpu``) lmforge resolves the same names
to :class:`DeepSpeedCPUStrategy`: DeepSpeed's CPU accelerator over the ``gloo`` backend, running the
same ZeRO partitioning code for real, one process per ``trainer.devices``.

On CPU:

* the optimizer is the module's own ``torch.optim.AdamW`` (DeepSpeed wraps it as a "client
  optimizer"); DeepSpeed's ``DeepSpeedCPUAdam`` would need a C++ build and is never required;
* ``_offload`` keeps its meaning for DeepSpeed (the fp32 master weights and optimizer states, and
  for stage 3 the parameters, live in host memory and the optimizer step runs there), but on a CPU
  the "device" already *is* host memory, so offload saves nothing: it only exercises the offload
  code path, so that a configuration can be checked on a laptop before it is sent to GPUs;
* ``bf16-mixed`` works (DeepSpeed keeps bf16 weights and fp32 master weights); ``16-mixed``
  (fp16 with loss scaling) is refused with a clear message.

A complete DeepSpeed JSON config is given with ``class_path``::

    trainer:
      strategy:
        class_path: lmforge.strategies.DeepSpeedCPUStrategy   # or lightning.pytorch.strategies.DeepSpeedStrategy
        init_args: {config: ds_config.json}

(on a machine without CUDA Lightning's class is replaced by the CPU one with the same config).

Nothing here imports DeepSpeed at import time: ``import deepspeed`` happens when a strategy is built.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge.strategies")

#: strategy name -> DeepSpeedStrategy keyword arguments (Lightning's names plus stage 1 offload).
ZERO_NAMES: dict[str, dict[str, Any]] = {
    "deepspeed": {"stage": 2},
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_1_offload": {"stage": 1, "offload_optimizer": True},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}

#: Bucket sizes (elements) for CPU runs. Lightning's GPU defaults (2e8 elements) would reserve
#: gigabytes of host memory per process for a model of any size.
CPU_BUCKET_SIZE = 5_000_000


def _set_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator once, when first imported: make it the CPU one."""
    if "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        raise LmforgeError(
            f"DeepSpeed was already imported with DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}; the CPU strategy "
            "needs DS_ACCELERATOR=cpu. Unset DS_ACCELERATOR or run on a machine with CUDA."
        )


class DeepSpeedZeroStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, plus resuming a ZeRO checkpoint on a different number of processes.

    A sharded checkpoint written by N processes is converted by global rank 0 to DeepSpeed's
    *universal checkpoint* format (one folder per parameter with its fp32 weights and optimizer
    states, independent of the world size) in a scratch folder of the run directory, which every
    rank loads and which is removed afterwards; the checkpoint itself is only read. It must be on a
    filesystem every node sees (as any sharded DeepSpeed checkpoint must).
    """

    # Gradient accumulation: Lightning decides when the optimizer steps (``accumulate_grad_batches``,
    # counted per epoch) and already divides each micro-batch loss by it. Lightning's own
    # DeepSpeedStrategy lets DeepSpeed count micro-steps on its own and scale the loss a second time,
    # so the two drift apart at epoch ends and gradients come out divided by N twice. Here DeepSpeed
    # is told, before every micro-batch, whether it ends an accumulation window, and does not rescale.
    def training_step(self, *args: Any, **kwargs: Any):
        trainer = self.lightning_module.trainer
        if trainer.accumulate_grad_batches > 1:
            self.deepspeed_engine.set_gradient_accumulation_boundary(not trainer.fit_loop._should_accumulate())
        return super().training_step(*args, **kwargs)

    def backward(self, closure_loss, optimizer, *args: Any, **kwargs: Any):
        if self.lightning_module.trainer.accumulate_grad_batches > 1:
            kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _auto_select_batch_size(self) -> int:
        # Lightning's reads train_dataloader.batch_sampler.batch_size, which a loader built with
        # batch_size=None (batches made by the dataset) does not have. Only used for DeepSpeed's logs.
        try:
            return super()._auto_select_batch_size()
        except AttributeError:
            return 1

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from lmforge.zero_checkpoint import saved_world_size

        path = Path(checkpoint_path)
        saved = saved_world_size(path) if path.is_dir() and not (self.load_full_weights and self.zero_stage_3) else None
        if saved is None or saved == self.world_size:
            return super().load_checkpoint(checkpoint_path, weights_only)
        return self._load_other_world_size(path, saved)

    def _load_other_world_size(self, path: Path, saved: int) -> dict[str, Any]:
        """Resume a checkpoint of ``saved`` processes on this world size via DeepSpeed's universal format."""
        import hashlib
        import shutil

        from lmforge.zero_checkpoint import make_universal

        rank_zero_info(
            f"lmforge: the checkpoint {path} was written by {saved} process(es) and this run has {self.world_size}; "
            "converting it to DeepSpeed's universal checkpoint format to resume."
        )
        trainer = self.lightning_module.trainer
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        work = Path(trainer.default_root_dir) / f".zero-universal-{digest}"  # on the run's (shared) filesystem
        if self.is_global_zero:
            make_universal(path, work)
        self.barrier()
        engine = self.deepspeed_engine
        engine._config.load_universal_checkpoint = True
        try:
            _, client_state = engine.load_checkpoint(
                str(work),
                load_optimizer_states=trainer.state.fn == TrainerFn.FITTING,
                load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading,
            )
        finally:
            engine._config.load_universal_checkpoint = False
            self.barrier()
            if self.is_global_zero:
                shutil.rmtree(work, ignore_errors=True)
        if client_state is None:
            raise LmforgeError(f"DeepSpeed could not load the universal conversion of {path}.")
        return client_state


class DeepSpeedCPUStrategy(DeepSpeedZeroStrategy):
    """Lightning's DeepSpeed strategy on CPUs: DeepSpeed's CPU accelerator and the gloo backend.

    Takes every argument of :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config`` for a full DeepSpeed JSON config, ...).
    Bucket sizes default to :data:`CPU_BUCKET_SIZE` elements instead of Lightning's 2e8.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(
        self,
        *args: Any,
        allgather_bucket_size: int = CPU_BUCKET_SIZE,
        reduce_bucket_size: int = CPU_BUCKET_SIZE,
        overlap_comm: bool = False,
        process_group_backend: str | None = "gloo",
        **kwargs: Any,
    ) -> None:
        _set_cpu_accelerator()
        super().__init__(
            *args,
            allgather_bucket_size=allgather_bucket_size,
            reduce_bucket_size=reduce_bucket_size,
            overlap_comm=overlap_comm,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        _adapt_config_for_cpu(self.config)

    # Lightning's checks for CUDA, lifted -------------------------------------------------------
    def setup_environment(self) -> None:
        if self.accelerator is not None and type(self.accelerator).__name__ != "CPUAccelerator":
            raise LmforgeError(
                f"DeepSpeedCPUStrategy runs on CPUs but the trainer's accelerator is {type(self.accelerator).__name__}; "
                "set trainer.accelerator: cpu, or use Lightning's DeepSpeedStrategy on CUDA."
            )
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check, then setup_distributed()

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy checks that device indices equal local ranks; CPU devices have no index.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or "gloo"

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # As Lightning's, but DeepSpeed is given the local rank: a CPU device has no index.
        import argparse

        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _format_config(self) -> None:
        check_cpu_precision(self.precision_plugin.precision)
        super()._format_config()
        _adapt_config_for_cpu(self.config)


def check_cpu_precision(precision: Any) -> None:
    """Refuse fp16 (with loss scaling) for DeepSpeed on CPU, which does not support it."""
    if str(precision) in ("16", "16-mixed", "16-true"):
        raise LmforgeError(
            f"trainer.precision={precision} (fp16) is not supported by DeepSpeed on CPU. Use bf16-mixed (bf16 "
            "weights and activations with fp32 master weights) or 32-true."
        )


def _adapt_config_for_cpu(config: dict[str, Any] | None) -> None:
    """What a DeepSpeed config needs to run on DeepSpeed's CPU accelerator with a torch optimizer."""
    if config is None:
        return
    # Offload with a client torch optimizer (DeepSpeedCPUAdam needs a C++ build we do not require).
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("zero_allow_untested_optimizer", True)
    zero = config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict):
            if zero[key].get("device", "cpu") == "nvme":
                raise LmforgeError("NVMe offload needs DeepSpeed's async I/O build and a GPU; use CPU offload here.")
            zero[key]["pin_memory"] = False  # pinned memory is a CUDA notion


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_zero_name(strategy: Any) -> bool:
    return isinstance(strategy, str) and strategy.lower() in ZERO_NAMES


def resolve_strategy(strategy: Any, accelerator: Any = "auto") -> Any:
    """The strategy to give the Trainer: ZeRO names and DeepSpeed strategies become CPU ones without CUDA.

    ``strategy`` is what the config holds (a name or an instantiated strategy). With CUDA (and an
    accelerator other than ``cpu``) a ZeRO name becomes :class:`DeepSpeedZeroStrategy` (Lightning's
    DeepSpeedStrategy with the same arguments, able to resume on another world size) and anything
    else is returned unchanged.
    """
    on_cpu = accelerator == "cpu" or type(accelerator).__name__ == "CPUAccelerator" or not cuda_available()
    if not on_cpu:
        # Lightning's DeepSpeedStrategy, plus resuming on a different number of GPUs.
        return DeepSpeedZeroStrategy(**ZERO_NAMES[strategy.lower()]) if is_zero_name(strategy) else strategy
    if is_zero_name(strategy):
        return DeepSpeedCPUStrategy(**ZERO_NAMES[strategy.lower()])
    if isinstance(strategy, DeepSpeedStrategy) and not isinstance(strategy, DeepSpeedCPUStrategy):
        return DeepSpeedCPUStrategy(
            config=copy.deepcopy(strategy.config),
            load_full_weights=strategy.load_full_weights,
            exclude_frozen_parameters=strategy.exclude_frozen_parameters,
            process_group_backend="gloo",
        )
    return strategy


def prepare_for_strategy(strategy: Any, accelerator: Any = "auto") -> None:
    """Before anything imports DeepSpeed: select its CPU accelerator when the run will use it."""
    named = is_zero_name(strategy) or (isinstance(strategy, str) and strategy.startswith("deepspeed"))
    class_path = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else None)
    if class_path and "DeepSpeed" in str(class_path):
        named = True
    if named and (accelerator == "cpu" or not cuda_available()):
        _set_cpu_accelerator()


def register_strategies() -> None:
    """Lightning registers most ZeRO names; add stage 1 offload and the explicit CPU names."""
    if "deepspeed_stage_1_offload" not in StrategyRegistry:
        StrategyRegistry.register(
            "deepspeed_stage_1_offload",
            DeepSpeedStrategy,
            description="DeepSpeed ZeRO Stage 1 and CPU Offload",
            stage=1,
            offload_optimizer=True,
        )
    for name, kwargs in ZERO_NAMES.items():
        cpu_name = name.replace("deepspeed", "deepspeed_cpu", 1)
        if cpu_name not in StrategyRegistry:
            StrategyRegistry.register(
                cpu_name, DeepSpeedCPUStrategy, description=f"{name} on CPUs (DeepSpeed CPU accelerator, gloo)", **kwargs
            )


register_strategies()
