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

from lmforge.errors import LmforgeError

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
        if isinstance(self, nn.Module) and "_modules" not in self.__dict__:
            nn.Module.__init__(self)  # a module plugin whose __init__ does not call super().__init__()
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
      (the sentence-pair head of NSP/SOP; class 0 = in order, 1 = not). ``has_mlm_head``,
      ``has_pair_head`` and ``has_pooler`` (bool attributes) say which heads exist, so objectives
      can refuse an architecture without the one they need before training starts (without a
      pooler, classification tasks use the first token's hidden state).
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

    For fine-tuning tasks: ``d_model`` (an int attribute) is the hidden size task heads are built
    for; :meth:`embedding_modules` and :meth:`layer_modules` let ``model.freeze_embeddings`` and
    ``model.freeze_layers`` freeze parts of the backbone.
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

    def max_positions(self) -> int | None:
        """The longest input this architecture accepts (a learned position table's size), or None when
        any length works. Optional: ``lmforge`` compares ``data.block_size``/``data.max_length`` with
        it before a run writes anything, instead of failing at the first forward pass."""
        return None

    def new_cache(self, batch_size: int, max_length: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not support cached generation")

    def embedding_modules(self) -> list[nn.Module]:
        """The input embeddings (token, position, segment), frozen by ``model.freeze_embeddings``."""
        raise NotImplementedError(f"{type(self).__name__} does not name its embeddings (embedding_modules())")

    def layer_modules(self) -> list[nn.Module]:
        """The layers in order from the input side (seq2seq: the encoder's, then the decoder's);
        ``model.freeze_layers: N`` freezes the first ``N``."""
        raise NotImplementedError(f"{type(self).__name__} does not list its layers (layer_modules())")

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


#: Label value that losses and metrics skip: padding, a word's later sub-tokens, special tokens.
IGNORE_INDEX = -100


class Task(Plugin, nn.Module):
    """A fine-tuning task: the head, the preprocessing of raw records, the metrics and what
    ``lmforge predict`` writes.

    A task is an ``nn.Module`` so that its heads and its torchmetrics move, train and checkpoint
    with the model (a subclass need not call ``super().__init__()``; the module part is set up
    before its ``__init__`` runs). The same YAML shape fine-tunes every family in ``families``:
    ``model.init_args.task: {class_path: NAME, init_args: {...}}`` beside the architecture; an
    objective is then optional.

    How a run uses a task, in order:

    1. Before the model is built, the CLI reads the training split and, if the task has a
       ``labels`` option left null, sets it to :meth:`infer_labels` of the training records (so the
       label names are recorded with every checkpoint) and writes ``labels.json`` into the run
       directory.
    2. The family module calls :meth:`build` once the architecture exists: create heads here.
    3. The task datamodule (``lmforge.data.task_data.TaskDataModule``) reads the records of each
       split, renames file columns to the task's field names (``data.columns``), adds
       ``example_id`` (the record's row number in its split) and maps :meth:`preprocess` over them
       in batches; the result is cached. :meth:`collate` builds batches from the feature rows.
    4. ``training``/``validation``/``test`` steps call :meth:`step`. At the end of a validation or
       test epoch, :meth:`compute_metrics` values are logged as ``val/<name>`` (``test/<name>``)
       beside ``val/loss``.
    5. ``lmforge predict`` calls :meth:`predict_step` per batch, then :meth:`finalize_predictions`
       once with every row in order; each resulting dict is one line of the predictions JSONL.

    Metrics must be streaming (torchmetrics ``Metric`` objects held as attributes, so their states
    move with the model and are synchronised across processes by ``compute()``): never keep whole
    logits, so evaluation memory does not grow with the validation set, and keep sum (not mean)
    states so a metric under DDP equals the single-process value on the same data.

    What the family module offers a task (``module`` below):

    * ``module.family`` (``"encoder"``, ``"decoder"`` or ``"seq2seq"``), ``module.architecture``
      (its ``d_model`` is the hidden size), ``module.special`` (the tokenizer's
      :class:`SpecialTokens`, set when data is attached);
    * ``module.sequence_features(batch, pooling="auto") -> (B, d_model)``: encoder: the pooled
      first token (the architecture's ``pooled``); decoder: the last non-padding token; seq2seq:
      ``"encoder_mean"`` (mean of the encoder states over real tokens, the default) or
      ``"decoder_first"`` (the decoder's state for its start token);
    * ``module.token_features(batch) -> (B, T, d_model)``: one state per input token (encoder and
      decoder; a decoder's states see only the tokens to their left);
    * the architecture itself for anything else (``logits``, ``encode``/``decode``, generation).

    Batches hold ``input_ids`` and ``attention_mask`` (1 = real token) ``(B, T)``, optional
    ``token_type_ids`` (encoder), and whatever else :meth:`collate` adds.
    """

    kind: ClassVar[str] = "task"
    #: Record fields the task reads, e.g. ``("text", "label")``. In YAML, ``data.columns: {text:
    #: sentence}`` maps a field to a differently named file column (identity by default).
    fields: ClassVar[tuple[str, ...]] = ()
    #: Fields that may be missing from the files (e.g. ``text_pair``); absent ones are not passed.
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: The fields that hold the answers (e.g. ``("label",)``): not required by ``predict``.
    label_fields: ClassVar[tuple[str, ...]] = ()
    #: Options the trained head's weights mean something only with (e.g. ``("labels",
    #: "multi_label")``): loading a checkpoint whose value differs from the config's is refused.
    weight_options: ClassVar[tuple[str, ...]] = ("labels",)

    def __init__(self) -> None:
        nn.Module.__init__(self)

    # -- data ----------------------------------------------------------------------------------------
    def checked_labels(self, labels: list[str] | None) -> list[str] | None:
        """A copy of a ``labels`` option for ``__init__`` (``None`` stays ``None``), refused with
        :class:`~lmforge.LmforgeError` when it names a label twice: the head would get two outputs
        for one name, and only the last could ever be learnt."""
        if labels is None:
            return None
        repeated = sorted({name for name in labels if labels.count(name) > 1})
        if repeated:
            raise LmforgeError(
                f"The task '{self.name}' lists the label(s) {', '.join(map(repr, repeated))} more than once in "
                "model.task.init_args.labels. List each label once (or leave labels null to take them from the "
                "training data)."
            )
        return list(labels)

    def required_labels(self) -> list[str]:
        """The ``labels`` option for :meth:`build`, refused with :class:`~lmforge.LmforgeError` while
        it is null (the task was built outside ``lmforge fit``) or has fewer than two labels (nothing
        to tell apart; torchmetrics' classification metrics refuse it too)."""
        labels = getattr(self, "labels", None)
        if labels is None:
            raise LmforgeError(
                f"The task '{self.name}' has no labels: run it through `lmforge fit`, which takes them from "
                "data.train_files, or list them in model.task.init_args.labels."
            )
        if len(labels) < 2:
            raise LmforgeError(
                f"The task '{self.name}' needs at least two labels to tell apart, and has {list(labels)} (from "
                "model.task.init_args.labels, or from the training data when that option is null). Give "
                "training data with at least two different labels, or list them in model.task.init_args.labels."
            )
        return labels

    @classmethod
    def infer_labels(cls, columns: dict[str, list[Any]]) -> list[str] | None:
        """The label set seen in the training split's ``columns`` (field name -> values), in a
        deterministic order; ``None`` (the default) for a task without a label set.

        A task that returns a list here takes a ``labels: list[str] | None = None`` option: the CLI
        fills a null one with this result before the model is built.
        """
        return None

    @classmethod
    def example_records(cls) -> dict[str, list[Any]] | None:
        """A handful of raw records (field -> values) that show the expected input; ``lmforge plugins
        check`` runs them through ``preprocess``, ``collate``, ``step`` and ``predict_step`` with a
        small tokenizer built from their words. ``None`` (the default) skips that check."""
        return None

    def preprocess(
        self,
        records: dict[str, list[Any]],
        tokenizer: Any,
        special: SpecialTokens,
        max_length: int,
        family: str,
        stage: str,
    ) -> dict[str, list[Any]]:
        """Turn a batch of raw records into feature rows (a ``datasets.map(batched=True)`` function).

        ``records`` maps each field (and ``example_id``) to a list of values; ``tokenizer`` is a
        ``tokenizers.Tokenizer`` (encode with ``add_special_tokens=False`` and frame with
        :meth:`frame_input`); rows must be at most ``max_length`` tokens. ``stage`` is ``"fit"``,
        ``"validate"``, ``"test"`` or ``"predict"`` (label fields are absent for predict files
        without them). May return more rows than records (e.g. question-answering windows; keep
        ``example_id`` on each). Raise :class:`~lmforge.LmforgeError` naming the record
        (``Record {example_id} ...``) for bad input (an unknown label, a malformed tag sequence);
        lmforge prefixes the option and files the records came from.
        """
        raise NotImplementedError(f"The task '{self.name}' does not read labelled records (it defines no preprocess).")

    #: Padding value of each list column in :meth:`collate` (columns not named pad with 0);
    #: ``"pad"`` means the tokenizer's padding token.
    pad_values: ClassVar[dict[str, Any]] = {"input_ids": "pad", "labels": IGNORE_INDEX}
    #: Columns :meth:`collate` passes through as Python lists even though they hold numbers (e.g.
    #: unpadded prompt ids kept for generation), for :meth:`predict_step` and metrics.
    list_columns: ClassVar[tuple[str, ...]] = ()

    def collate(self, features: list[dict[str, Any]], special: SpecialTokens) -> dict[str, Any]:
        """Build a batch from feature rows (runs in data-loader workers).

        The default right-pads every column of int/float lists to the longest row (values from
        :attr:`pad_values`), adds ``attention_mask`` from ``input_ids``, stacks numbers into
        tensors, and passes any other column (strings, nested lists, those named in
        :attr:`list_columns`) through as a Python list, for :meth:`predict_step`.
        """
        pad_id = special.pad_id if special.pad_id is not None else (special.eos_id or 0)
        batch: dict[str, Any] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            first = values[0]
            if key in self.list_columns:
                batch[key] = values
            elif isinstance(first, (int, float)):  # bool is an int
                batch[key] = torch.tensor(values)
            elif isinstance(first, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for v in values for x in v
            ):
                pad = self.pad_values.get(key, 0)
                pad = pad_id if pad == "pad" else pad
                length = max(len(v) for v in values)
                dtype = torch.float if any(isinstance(x, float) for v in values for x in v) else torch.long
                batch[key] = torch.tensor([list(v) + [pad] * (length - len(v)) for v in values], dtype=dtype)
                if key == "input_ids" and "attention_mask" not in features[0]:
                    batch["attention_mask"] = torch.tensor(
                        [[1] * len(v) + [0] * (length - len(v)) for v in values], dtype=torch.long
                    )
            else:
                batch[key] = values
        return batch

    @staticmethod
    def frame_input(
        ids_a: list[int],
        ids_b: list[int] | None,
        special: SpecialTokens,
        family: str,
        max_length: int,
    ) -> tuple[list[int], list[int], int, int | None]:
        """Frame one or two token sequences the way each family expects, truncating to ``max_length``.

        Encoder: ``[CLS] a [SEP] b [SEP]`` (the tokenizer's CLS/SEP, else its end token between and
        after), ``token_type_ids`` 0 for ``a`` and 1 for ``b``. Decoder and seq2seq: ``a <eos> b
        <eos>``, so a decoder's last token has seen everything. The longer sequence is cut first.
        Returns ``(input_ids, token_type_ids, start of a, start of b or None)``.
        """
        sep = special.sep_id if family == "encoder" and special.sep_id is not None else special.eos_id
        cls = [special.cls_id] if family == "encoder" and special.cls_id is not None else []
        end = [sep] if sep is not None else []
        budget = max_length - len(cls) - len(end) * (2 if ids_b is not None else 1)
        if budget < 2:
            raise LmforgeError(f"max_length={max_length} leaves no room for the text; raise it (try 128).")
        a, b = list(ids_a), list(ids_b) if ids_b is not None else None
        while len(a) + (len(b) if b is not None else 0) > budget:
            if b is not None and len(b) > len(a):
                b.pop()
            else:
                a.pop()
        input_ids = cls + a + end
        types = [0] * len(input_ids)
        b_start = None
        if b is not None:
            b_start = len(input_ids)
            input_ids += b + end
            types += [1] * (len(b) + len(end))
        return input_ids, types, len(cls), b_start

    # -- model -----------------------------------------------------------------------------------------
    def build(self, module: Any) -> None:
        """Create the heads (and metrics) now that ``module.architecture`` exists. Default: nothing."""

    def step(self, module: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """Loss of one batch: ``{"loss": scalar, "tokens": count it is weighted by}`` (+ any other
        scalar, logged as ``train/<key>``). ``stage`` is ``"train"``, ``"val"`` or ``"test"``; in the
        latter two also update the metrics. The default (for scoring tasks that only predict)
        leaves training to the model's objective.
        """
        if getattr(module, "objective", None) is None:
            raise LmforgeError(
                f"The task '{self.name}' defines no step() and the model has no objective, so nothing says how "
                "to train it. Add an objective to the model, or use a fine-tuning task."
            )
        return module.objective.compute_loss(module, batch)

    def compute_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """The metrics accumulated since the last call (``stage``: ``"val"`` or ``"test"``), as
        ``{name: scalar}``; then reset them. Default: none."""
        return {}

    def predict_step(self, module: Any, batch: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        """One JSON-serialisable dict per row of ``batch`` (label names, tagged words, answers, text);
        a task that scores packed text (no records) may return one dict for the whole batch."""
        raise NotImplementedError(f"The task '{self.name}' does not predict.")

    def finalize_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every row :meth:`predict_step` returned, in input order -> the lines of the predictions
        file (e.g. merge the windows of one ``example_id``). Default: unchanged."""
        return rows


PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "architecture": Architecture,
    "objective": Objective,
    "task": Task,
}
