"""``lmforge estimate``: the memory each device will need, before launching anything.

    lmforge estimate --config configs/gpt-tiny.yaml --devices 8 --strategy deepspeed_stage_3

The model is built on PyTorch's ``meta`` device (shapes only, no memory) from the config's
architecture (and task), so counting the parameters of a 70B model takes a second. Per device:

================  ==========================================================================
parameters        the working weights: all of them (DDP, ZeRO-1/2), or 1/N of them plus the
                  small "persistent" ones every rank keeps whole (ZeRO-3, DeepSpeed's
                  ``stage3_param_persistence_threshold``, 1e5 elements by default)
gradients         all of them (DDP), or 1/N in fp32 (ZeRO-2/3; ZeRO-1 too, once reduced)
optimizer states  AdamW's two moments in fp32, all (DDP) or 1/N (ZeRO), plus DeepSpeed's fp32
                  master partition (1/N; DeepSpeed keeps this copy in fp32 training as well)
buffers           communication buffers that stay allocated: DDP's gradient buckets (a copy of
                  the gradients unless ``gradient_as_bucket_view``), ZeRO-3's reduce bucket
activations       what the forward pass keeps for the backward of one micro-batch, by the
                  usual transformer accounting (Korthikanti et al. 2022): ~34·b·T·d bytes per
                  layer in 16 bits plus the attention scores, the logits, and with activation
                  checkpointing only each block's input plus one block recomputed
================  ==========================================================================

Offload (``_offload``) moves the optimizer states and master weights (and for ZeRO-3 the
parameters) to host memory: they are then reported as host memory, not device memory.
``benchmarks/zero_memory.py`` measures the same quantities and prints this estimate's error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, ToolArgumentParser

MB = 1024**2
GB = 1024**3

#: DeepSpeed defaults that change the per-rank numbers.
DS_PERSISTENCE_THRESHOLD = 100_000
DS_REDUCE_BUCKET = 500_000_000


@dataclass
class MemoryEstimate:
    """Bytes per device (``host`` = moved to host memory by offload)."""

    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    host: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def state(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        return self.state + self.activations


def _stage(strategy: str) -> int:
    strategy = (strategy or "").lower()
    if not strategy.startswith("deepspeed"):
        return 0
    for stage in (1, 2, 3):
        if f"stage_{stage}" in strategy:
            return stage
    return 2  # "deepspeed" alone is stage 2 in Lightning


def activation_bytes(
    n_layer: int, d_model: int, n_head: int, vocab_size: int, batch_size: int, seq_len: int, dtype_bytes: int,
    activation_checkpointing: bool = False,
) -> float:
    """Activations kept for backward for one micro-batch of ``batch_size x seq_len`` tokens."""
    scale = dtype_bytes / 2  # the per-layer constants below are for 16-bit activations
    bt = batch_size * seq_len
    per_layer = scale * (34 * bt * d_model + 5 * n_head * seq_len * seq_len * batch_size)
    logits = bt * vocab_size * (dtype_bytes + 4 + 4)  # logits, their fp32 copy for the loss, its gradient
    if activation_checkpointing:
        layers = n_layer * bt * d_model * dtype_bytes + per_layer  # each block's input + one block recomputed
    else:
        layers = n_layer * per_layer
    return layers + logits + 2 * bt * d_model * dtype_bytes


def persistent_numel(modules, threshold: int = DS_PERSISTENCE_THRESHOLD) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (fewer than ``threshold`` each)."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.numel() < threshold)


def estimate_memory(
    n_params: int,
    strategy: str,
    world_size: int,
    precision: str = "32-true",
    ds_config: dict[str, Any] | None = None,
    persistent_numel: int | None = None,
    n_layer: int = 0,
    d_model: int = 0,
    n_head: int = 1,
    vocab_size: int = 0,
    batch_size: int = 1,
    seq_len: int = 0,
    activation_checkpointing: bool = False,
    gradient_as_bucket_view: bool = False,
    optimizer_states: int = 2,
) -> MemoryEstimate:
    """Per-device bytes for AdamW training of ``n_params`` parameters (see the module docstring).

    ``persistent_numel``: parameters ZeRO-3 keeps whole on every rank (those with fewer elements
    than the persistence threshold); ``ds_config``: the DeepSpeed config, for bucket sizes and offload.
    """
    psi, n = float(n_params), max(int(world_size), 1)
    stage = _stage(strategy)
    half = precision in ("bf16-mixed", "16-mixed", "bf16-true", "16-true")
    true_half = precision in ("bf16-true", "16-true")
    zero = (ds_config or {}).get("zero_optimization") or {}
    notes: list[str] = []
    act = activation_bytes(n_layer, d_model, n_head, vocab_size, batch_size, seq_len, 2 if half else 4,
                           activation_checkpointing) if n_layer and seq_len else 0.0

    if stage == 0:  # DDP or a single device: every rank holds everything
        w = 2 if true_half else 4  # autocast (bf16-mixed) keeps fp32 weights
        params, grads, optim = w * psi, w * psi, optimizer_states * w * psi
        buffers = 0.0 if (n == 1 or gradient_as_bucket_view) else w * psi
        if buffers:
            notes.append("DDP keeps its gradient buckets beside the gradients (gradient_as_bucket_view=False).")
        return MemoryEstimate(params, grads, optim, buffers, act, notes=notes)

    w = 2 if half else 4  # DeepSpeed's working weights: bf16/fp16 with mixed precision, else fp32
    moments = optimizer_states * 4 * psi / n
    if stage in (1, 2):
        params = w * psi
        master = 4 * psi / n  # DeepSpeed's fp32 partition: a copy even when the weights are fp32
        grads = w * psi / n  # the reduced gradient partition (ZeRO-1 too, by the optimizer step)
        buffers = 0.0
        notes.append(
            f"Transient: the gradient bucket(s) during backward, {zero.get('reduce_bucket_size', DS_REDUCE_BUCKET):,.0f} "
            "elements each."
        )
    else:
        threshold = zero.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD)
        persistent = float(persistent_numel or 0)
        params = w * (psi - persistent) / n + w * persistent
        master = 4 * psi / n  # DeepSpeed's fp32 master partition (a separate copy in fp32 too)
        grads = w * psi / n
        buffers = w * float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))
        live = zero.get("stage3_max_live_parameters", 1_000_000_000)
        notes.append(
            f"Transient: ZeRO-3 gathers whole layers for forward/backward, up to {min(live, psi):,.0f} parameters "
            f"({w * min(live, psi) / MB:,.0f} MB) at once (stage3_max_live_parameters); parameters under "
            f"{threshold:,} elements ({persistent:,.0f} in all) stay whole on every rank."
        )
    optim = master + moments
    host = 0.0
    if isinstance(zero.get("offload_optimizer"), dict):
        host += optim
        optim = 0.0
        notes.append("Offload: the optimizer states and fp32 master weights live in host memory.")
    if stage == 3 and isinstance(zero.get("offload_param"), dict):
        host += params
        params = 0.0
        notes.append("Offload: the parameter partitions live in host memory.")
    return MemoryEstimate(params, grads, optim, buffers, act, host=host, notes=notes)


# -- the command -----------------------------------------------------------------------------------
def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _set(config: dict, dotted: str, value: Any) -> None:
    """``model.architecture.n_layer`` -> config[model][init_args][architecture][init_args][n_layer]."""
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        if key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        node = node.setdefault(key, {})
    if keys[-1] not in node and isinstance(node.get("init_args"), dict):
        node = node["init_args"]
    node[keys[-1]] = value


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return default
        if key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        node = node.get(key, default if key == dotted.split(".")[-1] else {})
    return node


def load_config(paths: list[str], overrides: list[str]) -> dict:
    import yaml

    from lmforge.config_names import read_yaml_file

    config: dict = {}
    for path in paths:
        _merge(config, read_yaml_file(path))
    it = iter(overrides)
    for arg in it:
        if not arg.startswith("--"):
            raise LmforgeError(f"Unexpected argument {arg!r}: overrides are --dotted.key value.")
        key, _, value = arg[2:].partition("=")
        if not _:
            value = next(it, None)
            if value is None:
                raise LmforgeError(f"--{key} needs a value.")
        _set(config, key, yaml.safe_load(value))
    return config


def build_on_meta(config: dict):
    """The architecture (and task) of a config, built on the meta device: ``(modules, architecture options)``."""
    import torch

    from lmforge.plugin_manager import get_registry

    registry = get_registry()
    model = config.get("model") or {}
    init = model.get("init_args", model)
    arch_cfg = init.get("architecture")
    if not isinstance(arch_cfg, dict) or "class_path" not in arch_cfg:
        raise LmforgeError("The config has no model.architecture with a class_path: nothing to estimate.")
    options = dict(arch_cfg.get("init_args") or {})
    if options.get("vocab_size") is None:
        tokenizer = _get(config, "data.tokenizer")
        if not tokenizer:
            raise LmforgeError("Set model.architecture.vocab_size or data.tokenizer to size the embeddings.")
        from lmforge.data.tokenizer import load_tokenizer

        options["vocab_size"] = load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
    modules = []
    with torch.device("meta"):
        info = registry.get("architecture", arch_cfg["class_path"].rsplit(".", 1)[-1].lower()) \
            if "." in arch_cfg["class_path"] else registry.get("architecture", arch_cfg["class_path"])
        architecture = _build(info.cls, options, "model.architecture")
        modules.append(architecture)
        task_cfg = init.get("task")
        if isinstance(task_cfg, dict) and task_cfg.get("class_path"):
            task = _build(registry.get("task", task_cfg["class_path"]).cls, task_cfg.get("init_args") or {}, "model.task")
            if hasattr(task, "parameters"):
                modules.append(task)
    return modules, {**options, "_architecture": architecture}


def _build(cls: type, options: dict[str, Any], where: str):
    """``cls(**options)``, an option the class does not take named as the training CLI names it."""
    from lmforge.errors import class_options, closest

    accepted = class_options(cls)
    for option in options:
        if option not in accepted:
            raise LmforgeError(
                f"Invalid config at '{where}.{option}': {cls.__name__} has no option '{option}'."
                f"{closest(option, accepted)} Run `lmforge fit --config ... --print_config` to see every option."
            )
    return cls(**options)


def estimate_command(argv: list[str]) -> int:
    parser = ToolArgumentParser(
        prog="lmforge estimate",
        description="Expected memory per device (parameters, gradients, optimizer states, activations) for a "
        "training config, before launching anything. Extra --dotted.key value arguments override the config.",
    )
    parser.add_argument("--config", action="append", required=True, help="YAML config (repeat to merge)")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: trainer.devices or 1)")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes (default: trainer.num_nodes or 1)")
    parser.add_argument("--strategy", default=None, help="ddp | deepspeed_stage_1|2|3[_offload] (default: trainer.strategy)")
    parser.add_argument("--precision", default=None, help="32-true | bf16-mixed | ... (default: trainer.precision)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    trainer = config.get("trainer") or {}
    configured_devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else None
    devices = _first_given(args.devices, configured_devices, 1)
    num_nodes = _first_given(args.num_nodes, trainer.get("num_nodes"), 1)
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if not isinstance(value, int) or value < 1:
            raise LmforgeError(f"--{name} (or trainer.{name}) must be a positive number of processes, not {value!r}.")
    strategy, ds_config = _strategy_and_config(
        args.strategy or trainer.get("strategy") or ("ddp" if devices * num_nodes > 1 else "single")
    )
    precision = str(args.precision or trainer.get("precision") or "32-true")
    precision = {"32": "32-true", "64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(precision, precision)
    if precision not in PRECISIONS:
        raise LmforgeError(
            f"--precision (or trainer.precision) {precision!r} is not a precision Lightning trains with; use one of "
            f"{', '.join(PRECISIONS)}."
        )
    world = devices * num_nodes

    modules, options = build_on_meta(config)
    params = [p for m in modules for p in m.parameters()]
    n_params = sum(p.numel() for p in params)
    persistent = persistent_numel(modules)
    architecture = options["_architecture"]
    batch = int(_get(config, "data.batch_size", 1) or 1)
    # text data: block_size; task data: max_length (its default when the config leaves it out)
    task_data = _get(config, "data.max_length") is not None or _get(config, "model.task") is not None
    length = _get(config, "data.block_size") or ((_get(config, "data.max_length") or 128) if task_data else None)
    seq = int(length or getattr(architecture, "block_size", 0) or 0)
    est = estimate_memory(
        n_params, strategy, world, precision, ds_config=ds_config, persistent_numel=persistent,
        n_layer=getattr(architecture, "n_layer", 0), d_model=getattr(architecture, "d_model", 0),
        n_head=getattr(architecture, "n_head", 1), vocab_size=getattr(architecture, "vocab_size", 0),
        batch_size=batch, seq_len=seq, activation_checkpointing=bool(options.get("activation_checkpointing")),
    )
    if args.json:
        import json

        print(json.dumps({"n_params": n_params, "world_size": world, "strategy": strategy, "precision": precision,
                          "bytes_per_device": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                                               "buffers": est.buffers, "activations": est.activations,
                                               "total": est.total, "host": est.host}, "notes": est.notes}, indent=2))
        return 0
    print(f"model: {n_params / 1e6:,.2f}M parameters ({type(architecture).__name__}), {precision}, strategy {strategy}, "
          f"{world} device(s) ({num_nodes} node(s) x {devices})")
    print(f"micro-batch: {batch} x {seq} tokens per device")
    print("per device:")
    for name, value in (("parameters", est.params), ("gradients", est.grads), ("optimizer states", est.optimizer),
                        ("buffers", est.buffers), ("activations", est.activations)):
        print(f"  {name:18} {_fmt(value):>10}")
    print(f"  {'total':18} {_fmt(est.total):>10}")
    if est.host:
        print(f"  {'host (offloaded)':18} {_fmt(est.host):>10}")
    for note in est.notes:
        print(f"note: {note}")
    return 0


#: The precisions an estimate understands (Lightning's names; 16/32/64/bf16 are mapped onto them).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def _first_given(*values: Any) -> Any:
    """The first value that is not None (0 counts as given, so it is refused rather than replaced)."""
    return next(v for v in values if v is not None)


def _check_strategy_name(name: str) -> None:
    from lmforge.strategies import ZERO_NAMES

    known = name.lower() in ("single", "auto", "deepspeed") or name.lower() in ZERO_NAMES or name.lower().startswith("ddp")
    if not known:
        raise LmforgeError(
            f"--strategy (or trainer.strategy) '{name}' is not a strategy lmforge estimates: use single, ddp or one "
            f"of {', '.join(ZERO_NAMES)}."
        )


def _strategy_and_config(strategy: Any) -> tuple[str, dict[str, Any] | None]:
    """(a name :func:`estimate_memory` understands, the DeepSpeed config) for ``trainer.strategy``:
    a name, or a ``class_path``/``init_args`` section (a DeepSpeed strategy's ``config`` JSON file or
    dict, or its ``stage``/``offload_*`` arguments)."""
    if isinstance(strategy, str):
        _check_strategy_name(strategy)
        return strategy, _ds_config_for(strategy)
    class_path = str((strategy or {}).get("class_path", "ddp"))
    if "deepspeed" not in class_path.lower():
        return class_path, None
    init_args = (strategy or {}).get("init_args") or {}
    ds_config = init_args.get("config")
    if isinstance(ds_config, (str, Path)):
        import json

        try:
            ds_config = json.loads(Path(ds_config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise LmforgeError(
                f"trainer.strategy.init_args.config: the DeepSpeed config {ds_config} cannot be read as JSON "
                f"({exc}). Point it at a DeepSpeed JSON file, or give the strategy's stage instead."
            ) from None
    if isinstance(ds_config, dict):
        stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
        where = f" ({init_args['config']})" if isinstance(init_args.get("config"), str) else ""
        return (f"deepspeed_stage_{stage}{where}" if stage else f"ddp (DeepSpeed without ZeRO{where})"), ds_config
    stage = int(init_args.get("stage", 2))
    if stage == 0:
        return "ddp (DeepSpeed without ZeRO)", None
    name = f"deepspeed_stage_{stage}"
    if init_args.get("offload_optimizer") or init_args.get("offload_parameters"):
        name += "_offload"
    return name, _ds_config_for(name)


def _ds_config_for(strategy: str) -> dict[str, Any] | None:
    """The DeepSpeed config a strategy name would use (without importing DeepSpeed)."""
    from lmforge.strategies import CPU_BUCKET_SIZE, ZERO_NAMES, cuda_available

    name = strategy.lower()
    if name not in ZERO_NAMES:
        return None
    kwargs = ZERO_NAMES[name]
    bucket = 200_000_000 if cuda_available() else CPU_BUCKET_SIZE
    zero: dict[str, Any] = {"stage": kwargs["stage"], "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if kwargs.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if kwargs.get("offload_parameters"):
        zero["offload_param"] = {"device": "cpu"}
    return {"zero_optimization": zero}


def _fmt(value: float) -> str:
    return f"{value / GB:,.2f} GiB" if value >= GB else f"{value / MB:,.1f} MiB"
