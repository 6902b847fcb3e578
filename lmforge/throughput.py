"""Training throughput and model FLOPs utilisation (MFU): the :class:`TokenThroughputMonitor` callback.

The one place where lmforge measures speed during training. It logs, every ``log_every_n_steps``:

* ``train/tokens_per_sec``: token positions processed per second of wall time, all processes
  together (this process's rate times the world size: DDP ranks step in lockstep). A position is
  one entry of ``input_ids`` (seq2seq: of ``input_ids`` plus of the decoder targets), padding
  included (with packing, the default, there is almost none).
* ``train/mfu``: model FLOPs per second of one device divided by that device's peak FLOP/s.

How the FLOPs are counted (the convention of the PaLM paper's MFU):

* only matrix multiplications, 2 FLOPs per multiply-add: attention projections, attention scores
  and the weighted sum of values, the MLP, the vocabulary projection. Embedding lookups, norms,
  softmax, activations and the optimizer are left out;
* attention over the actual sequence lengths: ``T x T`` for encoders (bidirectional), ``S x S`` /
  ``T x T`` / ``T x S`` for the encoder, decoder self- and cross-attention of seq2seq, and the *full*
  ``T x T`` for causal attention too (as PaLM does; a causal kernel skips about half of it);
* the vocabulary projection only where it is computed: every position of a decoder or of the
  seq2seq decoder, only the masked positions of masked-LM (``labels != -100``), none for a
  sentence-pair head or for a fine-tuning task on an encoder or decoder (task heads are small and
  not counted; a decoder task that does project onto the vocabulary, such as ``text_to_text`` on
  GPT, is under-counted by that projection);
* a training step is 3 forward passes (the backward pass costs two: gradients of the inputs and of
  the weights). Recomputation by activation checkpointing is not counted (model FLOPs, not
  hardware FLOPs), nor are frozen layers discounted.

The per-architecture formula is the architecture's ``forward_flops(batch_size, input_len,
target_len=None, vocab_positions=None)`` (built-ins: gpt, bert, t5; tests/test_throughput_monitor.py
checks each against ``torch.utils.flop_counter.FlopCounterMode``). An architecture without it gets
tokens/s only.

Peak FLOP/s of a device: the ``peak_flops`` option when given; on NVIDIA GPUs (and TPUs) the dense
datasheet number for the compute dtype from Lightning's table
(:func:`lightning.fabric.utilities.throughput.get_available_flops`: A100, H100, H200, L4, ...; bf16,
fp16, tf32 when fp32 matmuls may use it, fp32); on CPU it is *measured*: the best rate of a
``1024 x 1024`` matmul in the compute dtype over about 0.2 s, once per process (cached), with the
torch threads of the run. CPU MFU is therefore relative to what this machine's matmul reaches,
not to a datasheet.

No host-device synchronisation per step: batch shapes are host numbers (the ``mlm`` collator's
``mlm_positions`` give the masked-LM count; from ``labels`` alone it stays a device tensor), and
values go through ``LightningModule.log``, which converts them only when it writes a row of metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

IGNORE_INDEX = -100
_CPU_PEAK: dict[tuple[torch.dtype, int], float] = {}


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Trainer ``precision`` setting (``"bf16-mixed"`` -> bfloat16)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def measured_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.2) -> float:
    """FLOP/s of the best ``size x size`` matmul in ``dtype`` on this CPU (cached per dtype and threads)."""
    key = (dtype, torch.get_num_threads())
    if key not in _CPU_PEAK:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool, allocator
        best, deadline = float("inf"), time.perf_counter() + seconds
        for _ in range(3):  # at least three timings, then as many as fit in `seconds`
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        _CPU_PEAK[key] = 2 * size**3 / best
    return _CPU_PEAK[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one ``device`` in ``dtype``: Lightning's datasheet table on GPU/TPU, measured on CPU.

    ``None`` when unknown (an unlisted GPU, MPS): MFU is then not logged.
    """
    if device.type == "cpu":
        return measured_cpu_peak(dtype)
    from lightning.fabric.utilities.throughput import get_available_flops

    found = get_available_flops(device, dtype)
    return float(found) if found else None


def step_dims(family: str, batch: dict[str, Any], has_task: bool = False) -> dict[str, Any] | None:
    """Shapes of a training batch as ``forward_flops`` takes them, plus ``tokens`` (positions).

    ``None`` when the batch has no 2-D ``input_ids`` (or a seq2seq batch no 2-D targets).
    Only shapes are read, except for masked-LM, whose count of masked positions stays on the device.
    """
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return None
    B, T = input_ids.shape
    dims: dict[str, Any] = {"batch_size": B, "input_len": T, "target_len": None}
    if family == "seq2seq":
        target = batch.get("decoder_input_ids", batch.get("labels"))
        if not isinstance(target, torch.Tensor) or target.dim() != 2:
            return None
        dims["target_len"] = target.size(1)
        dims["vocab_positions"] = B * target.size(1)  # the decoder's logits at every position
        dims["tokens"] = B * (T + target.size(1))
        return dims
    dims["tokens"] = B * T
    labels = batch.get("labels")
    if has_task:
        dims["vocab_positions"] = 0  # a task head instead of the vocabulary projection (not counted)
    elif family == "decoder":
        dims["vocab_positions"] = B * T  # causal LM: logits at every position
    elif isinstance(batch.get("mlm_positions"), torch.Tensor):
        dims["vocab_positions"] = batch["mlm_positions"].numel()  # masked-LM: the masked positions only
    elif isinstance(labels, torch.Tensor) and labels.shape == input_ids.shape:
        dims["vocab_positions"] = (labels != IGNORE_INDEX).sum()  # the same, counted on the device
    else:
        dims["vocab_positions"] = 0  # sentence-pair objective alone: no vocabulary projection
    return dims


def training_step_flops(
    module: Any, batch: dict[str, Any], dims: dict[str, Any] | None = None,
) -> float | torch.Tensor | None:
    """Model FLOPs of one training step (forward + backward = 3 forwards) of ``module`` on ``batch``.

    ``None`` when the architecture has no ``forward_flops`` or the batch shapes are not recognised.
    ``dims`` is ``step_dims`` of the batch when the caller has it already (no second device count).
    """
    forward_flops = getattr(module.architecture, "forward_flops", None)
    if dims is None:
        dims = step_dims(module.family, batch, getattr(module, "task", None) is not None)
    if forward_flops is None or dims is None:
        return None
    return 3 * forward_flops(
        batch_size=dims["batch_size"], input_len=dims["input_len"], target_len=dims["target_len"],
        vocab_positions=dims["vocab_positions"],
    )


class TokenThroughputMonitor(Callback):
    """Logs ``train/tokens_per_sec`` and ``train/mfu`` (see :mod:`lmforge.throughput` for the counting).

    In YAML: ``trainer.callbacks: [{class_path: TokenThroughputMonitor}]``. Values are averages
    over the steps since the previous logged row (every ``trainer.log_every_n_steps``), timed
    from the end of one training step to the end of the next, so data loading, the optimizer and
    checkpoint saving count; time spent in validation does not. The first step (warm-up,
    compilation) is never counted.

    Args:
        peak_flops: Peak FLOP/s of one device in the run's precision, overriding the datasheet
            table (GPU) or the measured matmul rate (CPU), e.g. ``9.894e14`` for an H100 SXM in bf16.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        if peak_flops is not None and peak_flops <= 0:
            from lmforge.errors import LmforgeError

            raise LmforgeError(f"TokenThroughputMonitor peak_flops must be positive FLOP/s, got {peak_flops}.")
        self.peak_flops = peak_flops
        self._peak: float | None = None
        self._warned: set[str] = set()
        self._reset_window()
        self._last_end: float | None = None
        self._paused = 0.0  # seconds of validation since the last training step ended
        self._validation_started: float | None = None

    def _reset_window(self) -> None:
        self._seconds = 0.0
        self._tokens = 0
        self._flops: float | torch.Tensor | None = 0.0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._peak = self.peak_flops or peak_flops(trainer.strategy.root_device, precision_dtype(trainer.precision))
        if self._peak is None:
            self._warn_once("peak", f"TokenThroughputMonitor: the peak FLOP/s of {trainer.strategy.root_device} "
                                    "is unknown, so train/mfu is not logged; pass peak_flops to log it.")
        if not hasattr(pl_module.architecture, "forward_flops"):
            self._warn_once("arch", f"TokenThroughputMonitor: the {pl_module.architecture.name} architecture has "
                                    "no forward_flops(), so train/mfu is not logged (see lmforge.throughput).")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_started is not None:
            self._paused += time.perf_counter() - self._validation_started
            self._validation_started = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None and isinstance(batch, dict):
            self._seconds += max(now - self._last_end - self._paused, 0.0)
            dims = step_dims(pl_module.family, batch, getattr(pl_module, "task", None) is not None)
            self._tokens += dims["tokens"] if dims else 0
            flops = training_step_flops(pl_module, batch, dims) if dims else None
            self._flops = None if flops is None or self._flops is None else self._flops + flops
        self._last_end, self._paused = now, 0.0
        # Lightning writes logged values only on its logging steps (and after the last micro-batch
        # of an accumulated step); its own ThroughputMonitor asks the same two questions.
        if not trainer._logger_connector.should_update_logs or trainer.fit_loop._should_accumulate():
            return
        if self._seconds <= 0 or not self._tokens:
            return
        world = max(1, trainer.world_size)
        pl_module.log("train/tokens_per_sec", world * self._tokens / self._seconds, on_step=True, on_epoch=False)
        if self._peak is not None and self._flops is not None:
            mfu = self._flops / (self._seconds * self._peak)
            pl_module.log("train/mfu", mfu, on_step=True, on_epoch=False)
        self._reset_window()
