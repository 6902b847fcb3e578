"""Loading a trained model back: ``lmforge.load_model(path)`` and the weights behind ``init_from``.

Checkpoints carry plain-data metadata (``checkpoint["lmforge"]``: family, each plugin's name and
options, plugin versions, the tokenizer) so a model is rebuilt from the plugin registry, never by
unpickling objects: every load uses ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError


def find_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint file behind a path: a run directory (its newest committed checkpoint),
    a ``checkpoints/step-*`` directory, a pointer such as ``checkpoints/last.ckpt``, or a file of a
    committed checkpoint. Checkpoints whose save did not complete, or whose files do not match their
    manifest, are refused (see :mod:`lmforge.reliability.checkpoint_io`).
    """
    from lmforge.reliability.checkpoint_io import resolve_checkpoint

    return resolve_checkpoint(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents safely (tensors and plain Python types only)."""
    file = find_checkpoint(path)
    from lmforge.reliability.checkpoint_io import safe_load

    checkpoint = safe_load(file)
    if not isinstance(checkpoint, dict) or "lmforge" not in checkpoint:
        raise LmforgeError(
            f"{file} is not an lmforge checkpoint (no 'lmforge' metadata). Convert foreign weights with "
            "`lmforge convert` first."
        )
    return checkpoint


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, family-module state dict) from a checkpoint, run directory or model folder."""
    from lmforge.convert import is_model_folder, read_model_folder

    if is_model_folder(path):
        return read_model_folder(path)
    file = find_checkpoint(path)
    if file.is_dir():  # a DeepSpeed ZeRO checkpoint: its shards, gathered
        from lmforge.zero_checkpoint import read_zero_weights

        return read_zero_weights(file)
    checkpoint = read_checkpoint(path)
    return checkpoint["lmforge"], checkpoint["state_dict"]


def build_plugin(kind: str, config: dict[str, Any] | None):
    """Rebuild a plugin from its stored ``{"name", "class_path", "init_args"}``."""
    from lmforge.plugin_manager import get_registry

    if config is None:
        return None
    info = get_registry().get(kind, config["name"])
    try:
        return info.cls(**config.get("init_args", {}))
    except TypeError as exc:
        raise LmforgeError(
            f"The {kind} '{config['name']}' installed now ({info.source.describe()}) does not accept the options "
            f"stored with the model: {exc}. Install the plugin version that wrote it."
        ) from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Return a ready model (in eval mode) from a checkpoint file, run directory or model folder.

    The model's tokenizer, when it has one, is available as ``model.tokenizer()``.
    """
    from lmforge.families import FAMILY_MODULES
    from lmforge.families.base import check_same_shapes

    meta, state = read_weights(path)
    family = meta.get("family")
    if family not in FAMILY_MODULES:
        raise LmforgeError(f"The model's family '{family}' is not known to this lmforge ({', '.join(FAMILY_MODULES)}).")
    architecture = build_plugin("architecture", meta["architecture"])
    objective = build_plugin("objective", meta["objective"])
    task = build_plugin("task", meta.get("task"))
    module = FAMILY_MODULES[family](architecture=architecture, objective=objective, task=task, **meta["module_options"])
    check_same_shapes(module.state_dict(), state)
    module.load_state_dict(state)
    module.tokenizer_json = meta.get("tokenizer_json")
    if module.tokenizer_json:
        from lmforge.data.tokenizer import check_tokenizer_fits

        check_tokenizer_fits(module.tokenizer(), getattr(architecture, "vocab_size", None), str(path))
    return module.to(map_location).eval()


def initial_architecture_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Architecture weights (and tokenizer text) for ``init_from``: any lmforge source or a HF folder."""
    from lmforge.convert import architecture_from_hf, is_hf_folder

    if is_hf_folder(path):
        return architecture_from_hf(path).state_dict(), None
    meta, state = read_weights(path)
    prefix = "architecture."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, meta.get("tokenizer_json")
