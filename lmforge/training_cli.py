"""The LightningCLI behind ``lmforge fit | validate | test | predict``.

What lmforge adds to a plain LightningCLI:

* plugins are named by their short name (``class_path: gpt``), resolved through the plugin
  registry, and an unknown name is refused with the closest valid names;
* the architecture's ``vocab_size`` is filled in from the data's tokenizer when left null;
* a model with a fine-tuning task reads its ``data:`` section with
  :class:`~lmforge.data.task_data.TaskDataModule` (labelled records) instead of
  :class:`~lmforge.data.datamodule.TextDataModule`; the task's null ``labels`` are filled from the
  training records (or the checkpoint being loaded) and saved as ``labels.json`` in the run directory;
* ``lmforge predict`` writes the task's predictions as JSON Lines (``--output``, default
  ``<run directory>/predictions.jsonl``);
* the run directory (``trainer.default_root_dir``) gets the resolved config, the plugin names and
  versions, a metrics CSV and resumable checkpoints (``last.ckpt`` and the best by ``val/loss``);
* a run directory that already holds checkpoints is never trained over: resume it with
  ``--ckpt_path last`` or pick another directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lmforge.config_errors import ConciseArgumentParser
from lmforge.config_names import install_short_names, validate_plugin_names
from lmforge.data.datamodule import TextDataModule
from lmforge.errors import LmforgeError
from lmforge.prediction_writer import PredictionWriter
from lmforge.families import LMModule
from lmforge.reliability.checkpoint_io import (
    STEP_PREFIX,
    CommittedCheckpoint,
    CommittedCheckpointIO,
    newest_checkpoint,
)
from lmforge.reliability.failfast import (
    check_input_length,
    check_output_writable,
    lock_run_directory,
    prepare_trainer_call,
    warn_uncommitted_checkpoints,
)
from lmforge.output_files import check_output_file, expand_inputs, unused_path
from lmforge.run_logger import RunLogger
from lmforge.strategies import DeepSpeedCPUStrategy, check_cpu_precision, prepare_for_strategy, resolve_strategy

DEFAULT_ROOT = "runs/lmforge"

# Lightning notices that say nothing about the user's run.
for _pattern in (
    ".*args parameter is intended to run from within Python.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    # DeepSpeed's own calls of collectives torch has renamed (nothing the user can change)
    ".*`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    # val/test losses and task metrics are torchmetrics states, already reduced over every process
    ".*self\\.log\\('(val|test)/[^']*', \\.\\.\\., sync_dist=True\\)` when logging on epoch level.*",
    # a fit into a run with checkpoints is refused unless it resumes, where they are expected
    "Checkpoint directory .* exists and is not empty.*",
    # lmforge's datamodules resume their position (TextDataModule.state_dict), which Lightning does not see
    ".*resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable.*",
):
    warnings.filterwarnings("ignore", message=_pattern)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdverts())


class RunDirectory(SaveConfigCallback):
    """Writes ``config.yaml`` and ``plugins.json`` into the run directory of a fit, never over a different one.

    On resume an identical config is left alone; a changed one is written beside it with a
    timestamp, so the history of a run is kept.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        self.already_saved = True
        if not trainer.is_global_zero or stage != "fit":
            return  # evaluation and prediction leave the run's record as it is (it may be read-only)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        # The first write of a fit (this callback runs before the checkpoint callbacks, which clean
        # up interrupted saves): from here on no other fit may write into root.
        lock_run_directory(root)
        log = root / "metrics.csv"
        if log.is_file() and newest_checkpoint(root / "checkpoints") is None:
            # An attempt that died before its first checkpoint (reached through `--ckpt_path last`):
            # this fit starts over, so its rows are kept apart instead of mixed with the new ones.
            log.rename(root / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.csv")
        config = self.config.clone()
        if "ckpt_path" in config:
            config["ckpt_path"] = None  # resuming is the same run: not a changed config
        config_text = self.parser.dump(config, skip_none=False)
        _write_once(root, "config", ".yaml", config_text)
        plugins = pl_module.lmforge_metadata()["plugins"] if isinstance(pl_module, LMModule) else []
        _write_once(root, "plugins", ".json", json.dumps(plugins, indent=2) + "\n")
        labels = getattr(getattr(pl_module, "task", None), "labels", None)
        if labels:
            _write_once(root, "labels", ".json", json.dumps(list(labels), indent=1) + "\n")


def _write_once(root: Path, stem: str, suffix: str, text: str) -> Path:
    target = root / f"{stem}{suffix}"
    if target.exists() and target.read_text() != text:
        target = root / f"{stem}.{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return target


class LmforgeCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        install_short_names()
        if args:
            validate_plugin_names(args)
        given = args if args is not None else sys.argv[1:]
        ConciseArgumentParser.command = given[0] if given and given[0] in ConciseArgumentParser.COMMANDS else "fit"
        super().__init__(
            LMModule,
            datamodule_class(args if args is not None else sys.argv[1:]),
            subclass_mode_model=True,
            save_config_callback=RunDirectory,
            parser_class=ConciseArgumentParser,
            trainer_defaults={"default_root_dir": DEFAULT_ROOT},
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument(
                "--output", type=Optional[str], default=None,
                help="Where to write the predictions, one JSON object per line (default: "
                "<trainer.default_root_dir>/predictions.jsonl, or predictions.<time>.jsonl beside an existing one).",
            )
            parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing --output file.")
        return parser

    def _section(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        """Check that ``--ckpt_path`` holds the model the config builds; never merge its hyper-parameters.

        Lightning's CLI loads the whole checkpoint here and writes its saved hyper-parameters over the
        config, which would silently replace options the user set (a new ``lr`` on resume) and, for a
        checkpoint of another model, blame the config's plugins for the mismatch. In lmforge the config
        (kept as config.yaml in the run directory) is the record of the model, so the checkpoint is only
        compared with it, from its plain-data metadata, memory-mapped.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last", "best", a run directory: lmforge resolves and checks these later
        from lmforge.reliability.checkpoint_io import safe_load

        meta = safe_load(Path(ckpt_path), mmap=True).get("lmforge") or {}
        model = section.get("model") or {}
        saved = (meta.get("module_class"), (meta.get("architecture") or {}).get("class_path"))
        wanted = (model.get("class_path"), ((model.get("init_args") or {}).get("architecture") or {}).get("class_path"))
        if None in saved or None in wanted or saved == wanted:
            return
        raise LmforgeError(
            f"The checkpoint {ckpt_path} holds a model of the {meta.get('family')} family with the "
            f"'{meta['architecture'].get('name')}' architecture ({saved[0]}, {saved[1]}), but the config builds "
            f"{wanted[0]} with {wanted[1]}. Give the config of the run that wrote the checkpoint (its "
            "config.yaml), or a checkpoint of this model."
        )

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        fill_vocab_size(cfg)
        fill_task_labels(cfg, self.subcommand)
        trainer_cfg = cfg.get("trainer") or {}
        prepare_for_strategy(trainer_cfg.get("strategy"), trainer_cfg.get("accelerator"))
        if self.subcommand == "fit":
            check_run_directory(Path(cfg.trainer.default_root_dir or DEFAULT_ROOT), cfg.get("ckpt_path"))
            check_output_writable(Path(cfg.trainer.default_root_dir or DEFAULT_ROOT))

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._get(self.config_init, "trainer", default={})
        root = Path(cfg.get("default_root_dir") or DEFAULT_ROOT)
        if cfg.get("logger") in (None, True):
            # predict logs nothing; validate/test write metrics.<command>.csv beside the training log
            kwargs["logger"] = RunLogger(str(root), self.subcommand) if self.subcommand != "predict" else False
        callbacks = list(cfg.get("callbacks") or [])
        if cfg.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(
                CommittedCheckpoint(  # a ModelCheckpoint whose saves are committed (lmforge.reliability)
                    dirpath=str(root / "checkpoints"),
                    filename="best-step{step}",
                    monitor="val/loss",
                    mode="min",
                    save_top_k=1,
                    save_last=True,
                    auto_insert_metric_name=False,
                )
            )
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in callbacks):
            section = self._section()
            data = self.datamodule  # text data name their predict files as an option, task data in `files`
            inputs = expand_inputs(getattr(data, "predict_files", None) or (getattr(data, "files", None) or {}).get("predict"))
            inputs += expand_inputs(section.get("ckpt_path"))
            inputs += [Path(getattr(c, "absolute", c)) for c in section.get("config") or []]  # --config files
            if section.get("output"):
                output = check_output_file(section.get("output"), "--output", bool(section.get("overwrite")), inputs,
                                           overwrite_flag="--overwrite true")
            else:
                output = unused_path(root / "predictions.jsonl")
            callbacks.append(PredictionWriter(str(output)))
        kwargs["callbacks"] = callbacks
        warn_uncommitted_checkpoints(callbacks)
        plugins = cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if "deepspeed" not in str(cfg.get("strategy", "")).lower() and not any(
            isinstance(p, CheckpointIO) for p in plugins
        ):
            kwargs["plugins"] = [*plugins, CommittedCheckpointIO()]  # atomic saves, verified weights_only loads
        # ZeRO names (deepspeed_stage_N[_offload]) run DeepSpeed's CPU accelerator when there is no GPU.
        cfg["strategy"] = resolve_strategy(cfg.get("strategy", "auto"), cfg.get("accelerator", "auto"))
        if isinstance(cfg["strategy"], DeepSpeedCPUStrategy):
            check_cpu_precision(cfg.get("precision"))  # before the run directory is written
        if cfg["strategy"] in ("ddp", "ddp_spawn") and reads_records(_task_class(self.model)):
            # a task head leaves parts of the backbone unused (a pretraining head, a T5 decoder under
            # encoder-mean pooling), which plain DDP refuses at the second step
            cfg["strategy"] = f"{cfg['strategy']}_find_unused_parameters_true"
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as exc:
            if not _raised_by_lightning(exc):
                raise
            raise LmforgeError(
                f"The trainer options are not valid: {str(exc).strip()} Fix the trainer section of the config or its "
                f"--trainer.* override (`lmforge {self.subcommand} --help` lists them); nothing was written."
            ) from None


    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        # --ckpt_path: a verified committed checkpoint ("last" = the newest), loaded with weights_only=True,
        # and for fit its tensors compared with the model's, before anything is written.
        fn_kwargs = super()._prepare_subcommand_kwargs(subcommand)
        check_input_length(self.model, self.datamodule)
        fn_kwargs = prepare_trainer_call(subcommand, fn_kwargs, self.trainer, self.model, self.datamodule)
        if isinstance(self.trainer.logger, RunLogger):
            self.trainer.logger.record_checkpoint(fn_kwargs.get("ckpt_path"))
        return fn_kwargs


def _raised_by_lightning(exc: BaseException) -> bool:
    """Whether ``exc`` came from Lightning's own checks of the Trainer's arguments (not from a bug here)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}lightning{os.sep}" in tb.tb_frame.f_code.co_filename


def fill_vocab_size(cfg) -> None:
    """Set a null ``architecture.vocab_size`` from the tokenizer; refuse a tokenizer that is too big.

    A null ``decoder_start_token_id`` (seq2seq architectures) becomes the tokenizer's padding token.
    """
    from lmforge.data.tokenizer import find_special_tokens, load_tokenizer

    arch = cfg.model.init_args.get("architecture") if cfg.get("model") else None
    tokenizer_path = cfg.data.get("tokenizer") if cfg.get("data") else None
    if arch is None or not tokenizer_path:
        return
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if "decoder_start_token_id" in arch.init_args and arch.init_args.get("decoder_start_token_id") is None:
        pad_id = find_special_tokens(tokenizer).pad_id
        if pad_id is not None:
            arch.init_args.decoder_start_token_id = pad_id
    current = arch.init_args.get("vocab_size")
    if current is None:
        arch.init_args.vocab_size = vocab
    elif vocab > current:
        raise LmforgeError(
            f"The tokenizer {tokenizer_path} has {vocab} tokens but model.architecture.vocab_size is {current}: "
            f"token ids would fall outside the embedding. Set vocab_size to at least {vocab}, or leave it null to "
            "take it from the tokenizer."
        )


def _task_name(args: list[str] | None) -> str | None:
    """The task a command line names (its last mention in --config files and overrides), if any."""
    from lmforge.config_names import plugin_names_in_args

    names = plugin_names_in_args(list(args or []))
    tasks = [name for kind, name in names if kind == "task"]
    return tasks[-1] if tasks and tasks[-1] not in ("null", "None") else None


def task_class(name: str | None) -> type | None:
    """The Task class behind a short name, class name or import path (None for no task)."""
    if not name:
        return None
    if "." in name:
        from jsonargparse._util import import_object

        return import_object(name)
    from lmforge.plugin_manager import get_registry

    registry = get_registry()
    for info in registry.plugins["task"].values():
        if info.cls.__name__ == name:
            return info.cls
    return registry.get("task", name).cls


def _task_class(model) -> type | None:
    task = getattr(model, "task", None)
    return None if task is None else type(task)


def reads_records(task_cls: type | None) -> bool:
    """Whether a task fine-tunes on labelled records (defines ``preprocess``) rather than scoring text."""
    from lmforge.plugin_api import Task

    return task_cls is not None and task_cls.preprocess is not Task.preprocess


def datamodule_class(args: list[str] | None) -> type:
    """:class:`TaskDataModule` for a model with a fine-tuning task, else :class:`TextDataModule`."""
    if reads_records(task_class(_task_name(args))):
        from lmforge.data.task_data import TaskDataModule

        return TaskDataModule
    return TextDataModule


def fill_task_labels(cfg, subcommand: str | None) -> None:
    """Set a fine-tuning task's null ``labels`` before the model is built.

    From the checkpoint being loaded (``--ckpt_path``) when there is one, so a resumed run, a test
    or a prediction uses exactly the labels the weights were trained with; else from the training
    records (``task.infer_labels``).
    """
    model = cfg.get("model")
    task_cfg = model.init_args.get("task") if model is not None and model.get("init_args") else None
    if task_cfg is None or not task_cfg.get("class_path"):
        return
    cls = task_class(task_cfg.class_path)
    init_args = task_cfg.get("init_args")
    if not reads_records(cls) or init_args is None or "labels" not in init_args or init_args.get("labels"):
        return
    _check_task_family(model.get("class_path"), cls)  # before reading any data
    labels = None
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        labels = _checkpoint_labels(ckpt_path, Path(cfg.trainer.default_root_dir or DEFAULT_ROOT), subcommand)
    if labels is None:
        from lmforge.data.task_data import infer_task_labels

        labels = infer_task_labels(cls, cfg.data.train_files, cfg.data.get("columns"))
    init_args.labels = labels


def _check_task_family(module_class_path: str | None, task_cls: type) -> None:
    """The family check the model runs when it is built (``check_supports``), done before labels are read."""
    from lmforge.families import FAMILY_MODULES
    from lmforge.families.base import check_supports

    for family, module_cls in FAMILY_MODULES.items():
        if module_class_path in (family, module_cls.__name__, f"{module_cls.__module__}.{module_cls.__qualname__}"):
            check_supports(family, None, None, task_cls)


def _checkpoint_labels(ckpt_path: str, root: Path, subcommand: str | None) -> list[str] | None:
    """The task labels stored with the checkpoint ``--ckpt_path`` names (last, best or a path), if any."""
    from lmforge.reliability.failfast import load_checkpoint_state, resolve_ckpt_path

    if ckpt_path == "hpc" or str(ckpt_path).startswith("registry:"):
        return None
    try:
        file = resolve_ckpt_path(ckpt_path, root, subcommand or "fit")
    except LmforgeError:
        return None  # the trainer call reports the bad path with its own message
    if file is None:
        return None
    task = (load_checkpoint_state(Path(file)).get("lmforge") or {}).get("task") or {}
    return (task.get("init_args") or {}).get("labels")


def check_run_directory(root: Path, ckpt_path: str | None) -> None:
    """Never train over a run directory that holds checkpoints unless resuming it."""
    if ckpt_path:
        return
    checkpoints = root / "checkpoints"
    existing = sorted([*checkpoints.glob("*.ckpt"), *checkpoints.glob(f"{STEP_PREFIX}*")]) if checkpoints.is_dir() else []
    if existing:
        raise LmforgeError(
            f"The run directory {root} already holds checkpoints of another run ({existing[0].name}, ...). "
            f"Resume it with `--ckpt_path last`, or start a new run with a different "
            f"`--trainer.default_root_dir`; nothing was changed."
        )
    if (root / "metrics.csv").is_file():  # a run without checkpoints: its rows would mix with the new run's
        raise LmforgeError(
            f"The run directory {root} already holds another run's metrics.csv (without checkpoints, so it cannot "
            "be resumed). Start the new run in a different `--trainer.default_root_dir`, or move that run away; "
            "nothing was changed."
        )
