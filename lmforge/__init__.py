"""lmforge: train encoder, decoder and seq2seq language models on Lightning, assembled from plugins."""

from lmforge.errors import LmforgeError
from lmforge.hookspecs import hookimpl
from lmforge.plugin_api import FAMILIES, PLUGIN_API_VERSION, Architecture, Objective, Plugin, SpecialTokens, Task

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "PLUGIN_API_VERSION",
    "Architecture",
    "LmforgeError",
    "Objective",
    "Plugin",
    "SpecialTokens",
    "Task",
    "__version__",
    "hookimpl",
]
