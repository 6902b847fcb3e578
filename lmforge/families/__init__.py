"""The three family LightningModules and their shared base."""

from lmforge.families.base import LMModule
from lmforge.families.decoder import DecoderLM
from lmforge.families.encoder import EncoderLM
from lmforge.families.seq2seq import Seq2SeqLM

#: family name -> module class; the CLI accepts these names as ``model.class_path``.
FAMILY_MODULES = {"encoder": EncoderLM, "decoder": DecoderLM, "seq2seq": Seq2SeqLM}

__all__ = ["FAMILY_MODULES", "DecoderLM", "EncoderLM", "LMModule", "Seq2SeqLM"]
