"""Moving weights between lmforge and Hugging Face, and the lmforge model folder.

An **lmforge model folder** is what lmforge shares: ``model.safetensors`` (the family module's
state dict), ``lmforge.json`` (family, plugin names and options, plugin versions) and, when the model
has one, ``tokenizer.json``. ``lmforge.load_model`` and ``init_from`` read it.

A **Hugging Face folder** holds ``config.json`` and ``model.safetensors``. The architecture plugin
whose ``hf_model_type`` equals the config's ``model_type`` translates options and tensor names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

MODEL_FILE = "model.safetensors"
META_FILE = "lmforge.json"
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "config.json"


# -- helpers ---------------------------------------------------------------------------------------
#: Every file a conversion writes, in either direction: --overwrite removes them all first, so no
#: file of the folder's previous model (a tokenizer the new one lacks) is left beside the new one.
_WRITTEN_FILES = (MODEL_FILE, META_FILE, TOKENIZER_FILE, HF_CONFIG_FILE)


def _prepare_output(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"The output {out} is a file; a conversion writes a folder. Give a new folder's path.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LmforgeError(
                f"The output folder {out} already exists and is not empty. Choose a new folder or pass --overwrite."
            )
        for name in _WRITTEN_FILES:
            (out / name).unlink(missing_ok=True)
        others = sorted(p.name for p in out.iterdir())
        if others:
            print(f"lmforge: --overwrite kept files that lmforge convert does not write in {out}: "
                  f"{', '.join(others[:8])}{' ...' if len(others) > 8 else ''}. Remove them if they belonged to the "
                  "previous model.", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses tensors that share storage (tied weights): store a copy of each repeat."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone().contiguous() if key in seen or not tensor.is_contiguous() else tensor
        seen.add(key)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt", **(metadata or {})})
    tmp.replace(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LmforgeError(f"{path} is missing: a model folder needs its weights in {MODEL_FILE}.")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is a refusal
        raise LmforgeError(f"Cannot read {path}: {exc}. The file is corrupt or not safetensors.") from None


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / HF_CONFIG_FILE).is_file() and not is_model_folder(path)


# -- the lmforge model folder ----------------------------------------------------------------------
def save_model_folder(module, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``module`` (a family LightningModule) as an lmforge model folder."""
    out = _prepare_output(out, overwrite)
    meta = module.lmforge_metadata()
    tokenizer_json = meta.pop("tokenizer_json", None)
    _save_tensors(module.state_dict(), out / MODEL_FILE)
    if tokenizer_json:
        (out / TOKENIZER_FILE).write_text(tokenizer_json)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks the folder complete
    return out


def read_model_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state dict) of an lmforge model folder; the tokenizer text is put in the metadata."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise LmforgeError(f"{path / META_FILE} is unreadable ({exc}); the model folder is incomplete.") from None
    if (path / TOKENIZER_FILE).is_file():
        meta["tokenizer_json"] = (path / TOKENIZER_FILE).read_text()
    return meta, _load_tensors(path / MODEL_FILE)


# -- Hugging Face ----------------------------------------------------------------------------------
def _architecture_for_hf(model_type: str):
    from lmforge.plugin_manager import get_registry

    registry = get_registry()
    matches = [i for i in registry.plugins["architecture"].values() if i.cls.hf_model_type == model_type]
    if not matches:
        known = sorted({i.cls.hf_model_type for i in registry.plugins["architecture"].values() if i.cls.hf_model_type})
        raise LmforgeError(
            f"No architecture plugin converts Hugging Face model_type '{model_type}'. Convertible types: "
            f"{', '.join(known) or 'none'}."
        )
    return matches[0]


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """A Hugging Face folder's ``config.json``, or an error naming what is wrong with it."""
    file = hf_dir / HF_CONFIG_FILE
    if not file.is_file():
        raise LmforgeError(f"{hf_dir} is not a Hugging Face model folder: it has no {HF_CONFIG_FILE}.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise LmforgeError(f"{file} is not readable JSON ({exc}); re-save the model with save_pretrained().") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise LmforgeError(
            f"{file} names no model_type, so lmforge cannot tell which architecture it holds; a folder written "
            "by transformers' save_pretrained() has one."
        )
    return config


def read_hf_folder(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    _architecture_for_hf(config["model_type"])  # refuse an unconvertible type before reading the weights
    if not (hf_dir / MODEL_FILE).is_file():
        raise LmforgeError(
            f"{hf_dir} has no {MODEL_FILE}. lmforge reads only safetensors weights (never pickled .bin files); "
            "re-save the model with save_pretrained(..., safe_serialization=True)."
        )
    return config, _load_tensors(hf_dir / MODEL_FILE)


def architecture_from_hf(hf_dir: str | Path):
    """Build the architecture plugin for a Hugging Face folder and load its weights into it."""
    config, hf_state = read_hf_folder(hf_dir)
    model_type = config["model_type"]
    info = _architecture_for_hf(model_type)
    try:
        options = info.cls.options_from_hf_config(config)
    except KeyError as exc:
        raise LmforgeError(
            f"{Path(hf_dir) / HF_CONFIG_FILE} lacks {exc}, which a '{model_type}' config needs; it is incomplete "
            "or was edited by hand. Re-save the model with save_pretrained()."
        ) from None
    architecture = info.cls(**options)
    state = architecture.hf_state_dict_to_lmforge(hf_state)
    from lmforge.families.base import check_same_shapes

    check_same_shapes(architecture.state_dict(), state)
    architecture.load_state_dict(state)
    return architecture


def hf_to_lmforge(hf_dir: str | Path, out: str | Path, objective: str | None = None, overwrite: bool = False) -> Path:
    """Convert a Hugging Face folder into an lmforge model folder."""
    from lmforge.families import FAMILY_MODULES
    from lmforge.plugin_manager import get_registry

    architecture = architecture_from_hf(hf_dir)
    objective_name = objective or architecture.default_objective
    if not objective_name:
        raise LmforgeError(f"Name the objective to pair with {architecture.name} weights: --objective NAME.")
    objective_obj = get_registry().get("objective", objective_name).cls()
    family = architecture.families[0]
    module = FAMILY_MODULES[family](architecture=architecture, objective=objective_obj)
    tokenizer = Path(hf_dir) / TOKENIZER_FILE
    if tokenizer.is_file():
        from lmforge.data.tokenizer import check_tokenizer_fits

        module.tokenizer_json = tokenizer.read_text()
        check_tokenizer_fits(module.tokenizer(), getattr(architecture, "vocab_size", None), str(hf_dir))
    return save_model_folder(module, out, overwrite=overwrite)


def lmforge_to_hf(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export a checkpoint, run directory or lmforge model folder as a Hugging Face folder."""
    from lmforge.checkpoint import load_model

    module = load_model(source)
    architecture = module.architecture
    try:
        config = architecture.hf_config()
        tensors = architecture.lmforge_state_dict_to_hf()
    except NotImplementedError:
        raise LmforgeError(f"The architecture '{architecture.name}' does not support Hugging Face export.") from None
    if module.tokenizer_json:
        config = with_special_token_ids(config, module.tokenizer())
    out = _prepare_output(out, overwrite)
    _save_tensors(tensors, out / MODEL_FILE)
    if module.tokenizer_json:
        (out / TOKENIZER_FILE).write_text(module.tokenizer_json)
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def with_special_token_ids(config: dict, tokenizer) -> dict:
    """``config`` plus the tokenizer's pad/eos/bos ids where the architecture left them out.

    Architectures describe shapes; which ids mean "end" or "padding" belong to the tokenizer, and
    ``transformers``' ``generate`` stops at ``eos_token_id`` only if ``config.json`` names it. Ids the
    architecture already set (T5's ``pad_token_id`` = decoder start) are kept.
    """
    from lmforge.data.tokenizer import find_special_tokens

    special = find_special_tokens(tokenizer)
    config = dict(config)
    for key, value in (("pad_token_id", special.pad_id), ("eos_token_id", special.eos_id), ("bos_token_id", special.bos_id)):
        if value is not None and config.get(key) is None:
            config[key] = value
    if config.get("bos_token_id") is None and config.get("model_type") == "gpt2" and special.eos_id is not None:
        config["bos_token_id"] = special.eos_id  # GPT-2's convention (else transformers assumes 50256)
    return config
