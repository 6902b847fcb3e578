"""The three family LightningModules and their shared base."""

from lmforge.families.base import LMModule
from lmforge.families.decoder import DecoderLM

#: family name -> module class; the CLI accepts these names as ``model.class_path``.
FAMILY_MODULES = {"decoder": DecoderLM}

__all__ = ["FAMILY_MODULES", "DecoderLM", "LMModule"]
