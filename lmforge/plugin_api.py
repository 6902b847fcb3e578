"""The base classes every plugin derives from: the part of the contract that is Python classes.

A plugin is a class with a unique short ``name``, the ``families`` it supports and a typed
``__init__``. The typed ``__init__`` is the plugin's configuration: LightningCLI turns each argument
into a YAML key, validates it, and ``--print_config`` shows its default.

Three kinds exist:

* :class:`Architecture` is the backbone network (an ``nn.Module``) of one or more families.
* :class:`Objective` says how a batch is built from token ids (its ``collate``) and what loss is
  minimised (its ``compute_loss``).
* :class:`Task` is a fine-tuning task: head, preprocessing, metrics and what ``predict`` writes.

The options a plugin was built with are recorded automatically (see :meth:`Plugin.plugin_config`),
so checkpoints can rebuild the plugin without pickling it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

#: The three model families. A plugin lists the subset it supports in ``families``.
FAMILIES: tuple[str, ...] = ("encoder", "decoder", "seq2seq")

#: Version of the plugin contract (hook specifications and these base classes). A plugin may
#: declare ``api_version`` to say which contract it targets.
PLUGIN_API_VERSION = 1
#: The oldest contract version this lmforge still loads. A plugin whose ``api_version`` lies
#: outside ``MIN_SUPPORTED_API_VERSION .. PLUGIN_API_VERSION`` is refused by name, with both
#: versions. A change that breaks existing plugins raises ``PLUGIN_API_VERSION``; this one rises
#: only when support for the old contract is removed.
MIN_SUPPORTED_API_VERSION = 1


def _record_options(init):
    """Wrap a plugin ``__init__`` so the arguments of the outermost call are kept on the instance."""

    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapper:  # the most derived __init__ only, not a super() call
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            options = dict(bound.arguments)
            options.pop("self")
            for name, param in signature.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(options.pop(name, {}))
            object.__setattr__(self, "_plugin_options", options)

    return wrapper


class Plugin:
    """Common base of all plugins. Subclasses set ``name`` and ``families``."""

    #: Unique short name used in YAML (``class_path: gpt``) and in ``lmforge plugins list``.
    name: ClassVar[str] = ""
    #: The families this plugin supports, a subset of :data:`FAMILIES`.
    families: ClassVar[tuple[str, ...]] = ()
    #: "architecture", "objective" or "task"; set by the kind's base class.
    kind: ClassVar[str] = ""
    #: The plugin contract version this plugin was written against.
    api_version: ClassVar[int] = PLUGIN_API_VERSION

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _record_options(cls.__dict__["__init__"])

    def plugin_options(self) -> dict[str, Any]:
        """The keyword arguments this instance was built with (defaults filled in)."""
        return dict(getattr(self, "_plugin_options", {}))

    def plugin_config(self) -> dict[str, Any]:
        """A plain-data description that rebuilds this plugin: ``class_path`` and ``init_args``."""
        cls = type(self)
        return {
            "name": cls.name,
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": self.plugin_options(),
        }


class Architecture(Plugin, nn.Module):
    """A backbone network.

    The contract by family (what the family module and the objectives call):

    * ``encoder``: ``forward(input_ids, attention_mask=None, token_type_ids=None,
      position_ids=None, document_ids=None) -> hidden`` ``(B, T, d_model)``, attention
      bidirectional (within each document when ``document_ids`` are given, never to padding);
      ``mlm_logits(hidden) -> (..., vocab)`` for hidden states of any leading shape (objectives
      pass only the masked positions, ``(N, d_model)``); ``pooled(hidden) -> (B, d_model)`` (a
      summary of the sequence, BERT's pooler on the first token); ``pair_logits(pooled) -> (B, 2)``
      (the sentence-pair head of NSP/SOP; class 0 = in order, 1 = not). ``has_mlm_head`` and
      ``has_pair_head`` (bool attributes) say which heads exist, so objectives can refuse an
      architecture without the one they need before training starts.
    * ``decoder``: ``forward(input_ids, attention_mask=None, position_ids=None, document_ids=None,
      cache=None) -> hidden`` of shape ``(B, T, d_model)``; ``logits(hidden) -> (B, T, vocab)``;
      ``new_cache(batch_size, max_length)`` returns a key/value cache that ``forward`` fills in
      place when it is passed (``position_ids`` then give the absolute positions of the new tokens).
    * ``seq2seq``: ``encode(input_ids, attention_mask=None) -> encoder_hidden`` ``(B, S, d_model)``;
      ``decode(decoder_input_ids, encoder_hidden, encoder_attention_mask=None, cache=None) ->
      hidden`` ``(B, T, d_model)`` (causal over the decoder tokens, attending to every unmasked
      encoder position); ``logits(hidden) -> (B, T, vocab)``; ``forward(input_ids,
      decoder_input_ids, attention_mask=None)`` does both. ``decoder_start_token_id`` (an int
      attribute) is the token the decoder input starts with (labels shifted right behind it).
      ``new_cache(batch_size, max_length)`` returns a cache that ``decode`` fills in place: the
      decoder self-attention keys/values of up to ``max_length`` decoder tokens, and the
      cross-attention keys/values of the encoder output (computed on the first cached call and
      reused); it has ``length`` (decoder tokens cached so far) and ``reorder(rows)`` (keep/repeat
      rows, for beam search).

    ``vocab_size`` may be left ``None`` in YAML: the CLI fills it from the data's tokenizer before
    the architecture is built.
    """

    kind: ClassVar[str] = "architecture"
    #: The ``model_type`` of the Hugging Face ``config.json`` this architecture converts, if any.
    hf_model_type: ClassVar[str | None] = None
    #: The objective a converted Hugging Face checkpoint is paired with (e.g. "mlm" for BERT).
    default_objective: ClassVar[str | None] = None

    def __init__(self) -> None:
        nn.Module.__init__(self)

    # -- Hugging Face conversion (optional; needed by `lmforge convert`) ---------------------------
    @classmethod
    def options_from_hf_config(cls, hf_config: dict[str, Any]) -> dict[str, Any]:
        """This architecture's ``__init__`` options for a Hugging Face ``config.json`` (as a dict)."""
        raise NotImplementedError(f"{cls.__name__} does not convert Hugging Face checkpoints")

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` (as a dict) describing this architecture."""
        raise NotImplementedError(f"{type(self).__name__} does not convert Hugging Face checkpoints")

    def hf_state_dict_to_lmforge(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a Hugging Face state dict to this module's ``state_dict()`` names and layouts."""
        raise NotImplementedError(f"{type(self).__name__} does not convert Hugging Face checkpoints")

    def lmforge_state_dict_to_hf(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`hf_state_dict_to_lmforge` (``state`` defaults to ``state_dict()``)."""
        raise NotImplementedError(f"{type(self).__name__} does not convert Hugging Face checkpoints")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define logits()")

    def new_cache(self, batch_size: int, max_length: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support cached generation")

    def no_weight_decay(self) -> set[str]:
        """Names of parameters exempt from weight decay beyond the default rule.

        The default rule (in the family module) already exempts every tensor with fewer than two
        dimensions (biases, norm weights) and every ``nn.Embedding`` weight.
        """
        return set()


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokenizer's special tokens, found by role rather than hard-coded.

    ``None`` means the tokenizer has no token for that role. ``sentinel_ids[k]`` is the id of the
    T5 sentinel ``<extra_id_k>`` (empty when the tokenizer has none).

    Two tables over the vocabulary (indexed by token id; ``None`` when unknown) tell collators
    about word and sentence boundaries without the tokenizer: ``word_start[i]`` is whether token
    ``i`` begins a word (WordPiece: it is not a ``##`` continuation; byte-level BPE: it starts
    with the space symbol ``Ġ``; special tokens: always), used by whole-word masking;
    ``sentence_end[i]`` is whether token ``i`` ends a sentence (``.``, ``!``, ``?``, possibly with
    closing punctuation), used by sentence-pair objectives to cut documents into sentences.
    """

    vocab_size: int
    pad_id: int | None = None
    eos_id: int | None = None
    bos_id: int | None = None
    unk_id: int | None = None
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    sentinel_ids: tuple[int, ...] = ()
    word_start: tuple[bool, ...] | None = field(default=None, repr=False)
    sentence_end: tuple[bool, ...] | None = field(default=None, repr=False)

    def all_ids(self) -> set[int]:
        """Every special token id that is defined."""
        ids = (self.pad_id, self.eos_id, self.bos_id, self.unk_id, self.mask_id, self.cls_id, self.sep_id)
        return {i for i in ids if i is not None} | set(self.sentinel_ids)


class Objective(Plugin):
    """How the model learns: how a batch is built from token ids, and the loss.

    ``collate(examples, special)`` receives a list of dataset rows (each at least
    ``{"input_ids": list[int]}``; packed rows are exactly ``block_size`` long) and returns a dict of
    tensors. It runs in data-loader worker processes, so an objective must be picklable (keep only
    plain options on it).

    ``compute_loss(module, batch)`` runs the module's architecture on the batch and returns a dict
    with at least ``"loss"`` (a scalar tensor) and ``"tokens"`` (the number of tokens that count in
    the loss, a tensor); any other entry is logged as a metric under ``train/`` or ``val/``.

    ``packed_length(block_size)`` is the length of the packed rows ``collate`` receives, for an
    objective whose model inputs are not the raw rows (T5 span corruption packs longer rows so that
    the corrupted inputs fill ``block_size``). The default is ``block_size``.
    """

    kind: ClassVar[str] = "objective"

    def check_architecture(self, architecture: Architecture) -> None:
        """Raise :class:`~lmforge.LmforgeError` if ``architecture`` lacks what this objective needs.

        Called when the family module is built, before any data is read (e.g. ``nsp`` refuses an
        encoder without a sentence-pair head). The default accepts every architecture.
        """

    def packed_length(self, block_size: int) -> int:
        """Length of the packed rows to build so that this objective's inputs fill ``block_size``."""
        return block_size

    def collate(self, examples: list[dict[str, Any]], special: SpecialTokens) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Task(Plugin):
    """A fine-tuning task: head, preprocessing of raw columns, metrics and prediction output."""

    kind: ClassVar[str] = "task"


PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "architecture": Architecture,
    "objective": Objective,
    "task": Task,
}
