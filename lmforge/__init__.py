"""lmforge: train encoder, decoder and seq2seq language models on Lightning, assembled from plugins.

The public API is ``__all__``. Plugin authors need only the plugin base classes and ``hookimpl``;
the family modules and the datamodule are imported on first use (they pull in Lightning).
"""

from lmforge.checkpoint import load_model
from lmforge.errors import LmforgeError
from lmforge.hookspecs import hookimpl
from lmforge.plugin_api import (
    FAMILIES,
    MIN_SUPPORTED_API_VERSION,
    PLUGIN_API_VERSION,
    Architecture,
    Objective,
    Plugin,
    SpecialTokens,
    Task,
)

__version__ = "0.1.0"

_LAZY = {
    "LMModule": "lmforge.families",
    "DecoderLM": "lmforge.families",
    "EncoderLM": "lmforge.families",
    "Seq2SeqLM": "lmforge.families",
    "TextDataModule": "lmforge.data.datamodule",
    "pad_collate": "lmforge.data.collate",
    "save_model_folder": "lmforge.convert",
    "batch_seed": "lmforge.reliability.resume",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "MIN_SUPPORTED_API_VERSION",
    "PLUGIN_API_VERSION",
    "Architecture",
    "DecoderLM",
    "EncoderLM",
    "LMModule",
    "LmforgeError",
    "Objective",
    "Plugin",
    "Seq2SeqLM",
    "SpecialTokens",
    "Task",
    "TextDataModule",
    "__version__",
    "batch_seed",
    "hookimpl",
    "load_model",
    "pad_collate",
    "save_model_folder",
]
