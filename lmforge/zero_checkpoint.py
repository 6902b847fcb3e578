"""DeepSpeed ZeRO checkpoints: finding them, their lmforge metadata, consolidation, world-size changes.

With a DeepSpeed strategy Lightning writes each checkpoint as a *directory* (``last.ckpt/``)::

    last.ckpt/
      latest                                   # the tag: "checkpoint"
      checkpoint/
        mp_rank_00_model_states.pt             # ZeRO 1/2: module weights + Lightning's client state
        zero_pp_rank_R_mp_rank_00_model_states.pt   # ZeRO 3: one per rank (client state in each)
        zero_pp_rank_R_mp_rank_00_optim_states.pt   # one per rank: fp32 master partition + Adam states

Lightning's checkpoint dictionary (loops, callbacks, LR schedulers, and lmforge's
``checkpoint["lmforge"]`` metadata from :meth:`LMModule.on_save_checkpoint`) is DeepSpeed's
*client state*, stored in the model-states file, so a sharded checkpoint identifies its run just as
a ``.ckpt`` file does.

:func:`consolidate` turns one into an lmforge model folder (``model.safetensors`` + ``lmforge.json``
+ ``tokenizer.json``) **streaming**: the shard files are memory-mapped (``torch.load(mmap=True)``),
the safetensors header is computed from the recorded parameter shapes, and each parameter is
assembled from its slices in the shards, written, and dropped before the next one. At most one
parameter is ever materialised, so the whole model is never in memory even once (the page cache
holds mapped file pages, which the kernel can drop at will).

Files are read with ``weights_only=True``: the three DeepSpeed classes pickled in the optimizer
files (loss scaler, stage enum, fragment address) are mapped to inert placeholders, so no code is
ever unpickled and DeepSpeed need not even be imported to consolidate.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

MODEL_STATES_Z12 = "mp_rank_00_model_states.pt"
OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_Z3_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
UNIVERSAL_TAG = "universal"


class _Inert:
    """Stands in for a DeepSpeed object in a checkpoint; keeps its arguments and state as data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


_DEEPSPEED_PICKLED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_load(path: Path, mmap: bool = False) -> dict[str, Any]:
    placeholders = [(type(name.rsplit(".", 1)[1], (_Inert,), {}), name) for name in _DEEPSPEED_PICKLED]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any failure to read is reported the same way
        raise LmforgeError(
            f"Cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. The file is "
            "truncated or holds objects other than tensors and plain data (lmforge never unpickles code)."
        ) from None


# -- finding checkpoints ---------------------------------------------------------------------------
def is_zero_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed checkpoint directory (the ``*.ckpt/`` Lightning writes) or its tag folder."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or _has_model_states(path))


def _has_model_states(folder: Path) -> bool:
    return (folder / MODEL_STATES_Z12).is_file() or any(MODEL_Z3_RE.match(p.name) for p in folder.iterdir())


def tag_folder(path: str | Path) -> Path:
    """The folder holding the shard files, from a run directory, a ``*.ckpt`` directory or the folder itself."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path} does not exist. Pass a run directory or a DeepSpeed checkpoint directory.")
    if path.is_dir() and not is_zero_checkpoint(path):
        last = path / "checkpoints" / "last.ckpt"
        candidates = [last] if last.is_dir() else sorted(p for p in (path / "checkpoints").glob("*.ckpt") if p.is_dir())
        if candidates:
            path = candidates[-1]
    if not is_zero_checkpoint(path):
        raise LmforgeError(
            f"{path} is not a DeepSpeed ZeRO checkpoint (a directory with a 'latest' file and the shard files). "
            "A single-file .ckpt needs no consolidation: use `lmforge convert lmforge-to-hf` or load_model."
        )
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise LmforgeError(f"{path}/latest names the tag '{tag}' but {path / tag} is missing: the checkpoint is incomplete.")
        return path / tag
    return path


def saved_world_size(checkpoint_dir: str | Path) -> int | None:
    """How many data-parallel processes wrote a ZeRO checkpoint (its number of optimizer shards)."""
    try:
        folder = tag_folder(checkpoint_dir)
    except LmforgeError:
        return None
    return len([p for p in folder.iterdir() if OPTIM_RE.match(p.name)]) or None


def _model_states_file(folder: Path) -> Path:
    if (folder / MODEL_STATES_Z12).is_file():
        return folder / MODEL_STATES_Z12
    z3 = sorted((p for p in folder.iterdir() if MODEL_Z3_RE.match(p.name)), key=lambda p: int(MODEL_Z3_RE.match(p.name)[1]))
    if not z3:
        raise LmforgeError(f"{folder} holds no model-states file: the checkpoint is incomplete.")
    return z3[0]


def read_client_state(path: str | Path) -> dict[str, Any]:
    """The model-states dictionary of a ZeRO checkpoint (Lightning's checkpoint keys, ``lmforge`` included)."""
    return _safe_load(_model_states_file(tag_folder(path)))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``checkpoint["lmforge"]`` of a ZeRO checkpoint: the run's family, plugins and tokenizer."""
    state = read_client_state(path)
    if "lmforge" not in state:
        raise LmforgeError(f"The DeepSpeed checkpoint {path} was not written by lmforge (no 'lmforge' metadata).")
    return state["lmforge"]


def check_zero_checkpoint_fits(path: str | Path, model: Any) -> None:
    """Before resuming: the checkpoint's recorded parameter names and shapes must be the model's."""
    from lmforge.families.base import check_same_shapes

    state = read_client_state(path)
    found: dict[str, Any] = {}
    for group in state.get("param_shapes") or []:
        found.update({name: torch.empty(tuple(shape), device="meta") for name, shape in group.items()})
    found.update({name: torch.empty(tuple(shape), device="meta") for name, shape in (state.get("frozen_param_shapes") or {}).items()})
    buffers = set(state.get("buffer_names") or [])
    found.update({name: t for name, t in (state.get("module") or {}).items() if name in buffers})
    found.update({alias: found[src] for alias, src in (state.get("shared_params") or {}).items() if src in found})
    expected = {name: t for name, t in model.state_dict().items() if name in found or not name.endswith("_extra_state")}
    check_same_shapes(expected, found)


# -- consolidation ---------------------------------------------------------------------------------
def _optim_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if OPTIM_RE.match(p.name)), key=lambda p: int(OPTIM_RE.match(p.name)[1]))
    if not files:
        raise LmforgeError(f"{folder} holds no *_optim_states.pt files: it is not a ZeRO checkpoint.")
    return files


class _Shards:
    """The fp32 master weights of every rank, memory-mapped, and where each parameter lies in them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.model_states = _safe_load(_model_states_file(folder))
        states = [_safe_load(f, mmap=True)["optimizer_state_dict"] for f in _optim_files(folder)]
        self.world_size = len(states)
        stage = states[0].get("zero_stage")
        stage = getattr(stage, "args", (stage,))[0] if stage is not None else None
        if stage is None:
            stage = ((self.model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 2)
        self.stage = int(stage)
        partitions = states[0].get("partition_count")
        partitions = max(partitions) if isinstance(partitions, list) else partitions
        if partitions not in (None, self.world_size):
            raise LmforgeError(
                f"{folder} should hold {partitions} optimizer shards but holds {self.world_size}: a rank's file is "
                "missing (the save was interrupted or an older checkpoint was overwritten)."
            )
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self.flat = [s[key] for s in states]  # [rank][group] -> 1-D fp32 tensor (memory-mapped)
        self.alignment = states[0].get("param_alignment_paddings")
        self.param_shapes: list[OrderedDict] = self.model_states["param_shapes"]
        self._locate()

    def _locate(self) -> None:
        """name -> a function returning the parameter's fp32 tensor, in the order they are stored."""
        self.readers: OrderedDict[str, tuple[tuple[int, ...], Any]] = OrderedDict()
        if self.stage == 3:
            offsets = [0]
            for t in self.flat[0]:
                offsets.append(offsets[-1] + t.numel())
            offset = 0
            for name, shape in ((n, s) for group in self.param_shapes for n, s in group.items()):
                numel = math.prod(shape)
                part = math.ceil(numel / self.world_size)
                self.readers[name] = (tuple(shape), self._z3_reader(offsets, offset, part, tuple(shape)))
                offset += part
            if offset != offsets[-1]:
                raise LmforgeError(f"The ZeRO-3 shards hold {offsets[-1]} elements per rank but the parameters need {offset}.")
            return
        for group, shapes in enumerate(self.param_shapes):
            part = self.flat[0][group].numel()
            offset = 0
            paddings = self.alignment[group] if self.alignment is not None else None
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self.readers[name] = (tuple(shape), self._z12_reader(group, part, offset, numel, tuple(shape)))
                offset += numel + (paddings[i] if paddings is not None else 0)
            if offset > part * self.world_size:
                raise LmforgeError(f"Parameter group {group} needs {offset} elements but the shards hold {part * self.world_size}.")

    def _z12_reader(self, group: int, part: int, offset: int, numel: int, shape: tuple[int, ...]):
        def read() -> torch.Tensor:
            pieces, start, end = [], offset, offset + numel
            while start < end:
                rank, local = divmod(start, part)
                take = min(end - start, part - local)
                pieces.append(self.flat[rank][group][local : local + take])
                start += take
            return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).reshape(shape)

        return read

    def _z3_reader(self, offsets: list[int], offset: int, part: int, shape: tuple[int, ...]):
        def read() -> torch.Tensor:
            pieces = []
            for rank in range(self.world_size):
                start, end = offset, offset + part
                while start < end:  # a slice may cross from one parameter group's flat buffer into the next
                    group = next(g for g in range(len(offsets) - 1) if offsets[g] <= start < offsets[g + 1])
                    take = min(end, offsets[group + 1]) - start
                    local = start - offsets[group]
                    pieces.append(self.flat[rank][group][local : local + take])
                    start += take
            return torch.cat(pieces)[: math.prod(shape)].reshape(shape)

        return read

    def tensors(self) -> OrderedDict[str, tuple[tuple[int, ...], torch.dtype, Any]]:
        """Every tensor of the module's state dict: name -> (shape, dtype, reader), buffers included."""
        out: OrderedDict[str, tuple[tuple[int, ...], torch.dtype, Any]] = OrderedDict()
        module = self.model_states.get("module") or {}
        buffer_names = set(self.model_states.get("buffer_names") or [])
        for name, (shape, read) in self.readers.items():
            out[name] = (shape, torch.float32, read)
        frozen = self.model_states.get("frozen_param_shapes") or {}
        for name, shape in frozen.items():
            out[name] = (tuple(shape), torch.float32, self._frozen_reader(name, tuple(shape)))
        for name, tensor in module.items():
            if name in buffer_names and name not in out:
                value = tensor.float() if tensor.is_floating_point() else tensor
                out[name] = (tuple(value.shape), value.dtype, lambda v=value: v)
        for alias, source in (self.model_states.get("shared_params") or {}).items():
            if source in out and alias not in out:
                out[alias] = out[source]
        return out

    def _frozen_reader(self, name: str, shape: tuple[int, ...]):
        def read() -> torch.Tensor:
            if self.stage != 3:
                return self.model_states["frozen_param_fragments"][name].float().reshape(shape)
            pieces = []  # ZeRO-3: each rank's model-states file holds its fragment
            for file in sorted((p for p in self.folder.iterdir() if MODEL_Z3_RE.match(p.name)),
                               key=lambda p: int(MODEL_Z3_RE.match(p.name)[1])):
                pieces.append(_safe_load(file, mmap=True)["frozen_param_fragments"][name].reshape(-1))
            return torch.cat(pieces)[: math.prod(shape)].float().reshape(shape)

        return read


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                       torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}


def write_safetensors_streaming(tensors: OrderedDict[str, tuple[tuple[int, ...], torch.dtype, Any]], path: Path,
                                dtype: torch.dtype | None = None) -> dict[str, int]:
    """Write ``name -> (shape, dtype, reader)`` as safetensors, materialising one tensor at a time.

    Returns ``{"tensors": n, "bytes": total, "largest": bytes of the largest tensor}``.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    start, largest = 0, 0
    plan = []
    for name, (shape, src_dtype, read) in tensors.items():
        out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[out_dtype], "shape": list(shape), "data_offsets": [start, start + nbytes]}
        plan.append((name, out_dtype, nbytes, read))
        start += nbytes
        largest = max(largest, nbytes)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, out_dtype, nbytes, read in plan:
            tensor = read().to(out_dtype).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            if len(data) != nbytes:
                raise LmforgeError(f"{name}: expected {nbytes} bytes, assembled {len(data)}.")
            f.write(data)
            del tensor, data
    tmp.replace(path)
    return {"tensors": len(plan), "bytes": start, "largest": largest}


def read_zero_weights(source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, full fp32 state dict) of a ZeRO checkpoint, gathered in memory (for ``load_model``)."""
    shards = _Shards(tag_folder(source))
    meta = shards.model_states.get("lmforge")
    if not meta:
        raise LmforgeError(f"The DeepSpeed checkpoint {source} was not written by lmforge (no 'lmforge' metadata).")
    return meta, {name: read().clone() for name, (_, _, read) in shards.tensors().items()}


def consolidate(source: str | Path, out: str | Path, overwrite: bool = False, dtype: str = "float32") -> Path:
    """A ZeRO checkpoint (or a run directory) -> an lmforge model folder, streaming tensor by tensor."""
    from lmforge.convert import META_FILE, MODEL_FILE, TOKENIZER_FILE, _prepare_output

    folder = tag_folder(source)
    shards = _Shards(folder)
    meta = dict(shards.model_states.get("lmforge") or {})
    if not meta:
        raise LmforgeError(f"The DeepSpeed checkpoint {source} was not written by lmforge (no 'lmforge' metadata).")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise LmforgeError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}.")
    out = _prepare_output(out, overwrite)
    write_safetensors_streaming(shards.tensors(), out / MODEL_FILE, dtype=torch_dtype)
    tokenizer_json = meta.pop("tokenizer_json", None)
    if tokenizer_json:
        (out / TOKENIZER_FILE).write_text(tokenizer_json)
    meta["consolidated_from"] = {"checkpoint": str(folder.parent), "zero_stage": shards.stage,
                                 "world_size": shards.world_size, "global_step": shards.model_states.get("global_step")}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks the folder complete
    return out


# -- changing the world size -----------------------------------------------------------------------
def make_universal(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format in ``out``; return ``out``.

    ``out`` gets ``universal/`` (one folder per parameter: its fp32 weights and each optimizer state,
    independent of how many processes wrote them) and ``latest_universal`` naming it, which is what
    ``engine.load_checkpoint(out)`` reads with ``checkpoint.load_universal``. The checkpoint itself
    is only read.
    """
    import argparse
    import contextlib
    import io
    import shutil

    source = tag_folder(checkpoint_dir)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(out / UNIVERSAL_TAG), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)
    (out / "latest_universal").write_text(UNIVERSAL_TAG)
    return out
