"""Conformance checks: does a plugin keep the contract that lmforge relies on?

:func:`check_plugin` runs one architecture, objective or task through every family it claims and
returns a :class:`ConformanceReport` (one line per check: pass, fail or skip, with the reason);
:func:`assert_conforms` does the same inside a test and fails it with the report.
``lmforge plugins check NAME`` prints the report from the command line.

What is checked, on a synthetic vocabulary (:func:`sample_special_tokens`) and short rows:

* every kind: the class attributes (name, families, api_version); building it from its default
  options (``vocab_size`` filled in for architectures); the options recorded by
  ``plugin_options()`` survive a checkpoint (``torch.load(weights_only=True)``) and rebuild an
  equal plugin;
* architectures, per family: the family contract's output shapes; with every built-in objective
  of the family: loss, backward (finite gradients), an optimizer step; every parameter receives a
  gradient from some objective; state dict -> a fresh instance from ``plugin_config()`` -> equal
  outputs; cached generation equal to uncached (when ``new_cache`` is implemented); the Hugging
  Face name map and config round trip (when ``hf_model_type`` is set);
* objectives, per family: picklable (data-loader workers); ``collate`` on packed and on padded
  rows produces a batch whose ``compute_loss`` (with every built-in architecture of the family)
  is finite, backpropagates finite gradients and survives an optimizer step;
* tasks, per family: the family module accepts the task next to a built-in architecture and
  objective, and ``predict_step`` (when defined) runs; a fine-tuning task that gives
  ``example_records()`` runs them through ``preprocess``, ``collate``, ``step`` (finite loss and
  gradients), its metrics and ``predict_step`` (one JSON line per record), with a word-level
  tokenizer built from the records.

A family that this lmforge does not have, or has no built-in partner plugin for, is skipped with a
report line saying so; pass ``partners=`` (``--partner`` on the command line) to pair a plugin with
plugins of your own instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import LmforgeError, closest
from lmforge.plugin_api import (
    PLUGIN_KINDS,
    Architecture,
    Objective,
    Plugin,
    SpecialTokens,
)

Status = Literal["pass", "fail", "skip"]

#: Size of the synthetic vocabulary, and the ``vocab_size`` architectures are built with.
SAMPLE_VOCAB_SIZE = 160
#: Length of the sample rows (``block_size``); packed rows are ``objective.packed_length(this)``.
SAMPLE_BLOCK_SIZE = 16
_N_SENTINELS = 32
_FIRST_WORD_ID = 8  # ids below are special tokens; 7 is a sentence end (".")
_SENTENCE_END_ID = 7


# -- sample data -----------------------------------------------------------------------------------
def sample_special_tokens(vocab_size: int = SAMPLE_VOCAB_SIZE) -> SpecialTokens:
    """Special tokens of a synthetic vocabulary that has every role an objective may need.

    Ids 0-6 are pad, eos, bos, unk, mask, cls and sep; 7 ends a sentence; the top 32 ids are T5
    sentinels (``<extra_id_0>`` is the last id, as :func:`lmforge.data.tokenizer.add_sentinel_tokens`
    lays them out); the ids in between are words, every third of them continuing a word.
    """
    if vocab_size < _FIRST_WORD_ID + _N_SENTINELS + 16:
        raise LmforgeError(f"sample_special_tokens needs vocab_size >= {_FIRST_WORD_ID + _N_SENTINELS + 16}.")
    sentinels = tuple(range(vocab_size - 1, vocab_size - 1 - _N_SENTINELS, -1))
    word_start = tuple(i < _FIRST_WORD_ID or i in sentinels or i % 3 != 0 for i in range(vocab_size))
    sentence_end = tuple(i == _SENTENCE_END_ID for i in range(vocab_size))
    return SpecialTokens(
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        mask_id=4,
        cls_id=5,
        sep_id=6,
        sentinel_ids=sentinels,
        word_start=word_start,
        sentence_end=sentence_end,
    )


def _document(rng: random.Random, special: SpecialTokens, length: int) -> list[int]:
    """``length`` word ids with a sentence end every few words."""
    last_word = special.vocab_size - len(special.sentinel_ids)
    ids = []
    for i in range(length):
        ids.append(_SENTENCE_END_ID if i % 5 == 4 else rng.randrange(_FIRST_WORD_ID, last_word))
    return ids


def sample_rows(
    special: SpecialTokens, length: int, packed: bool, n_rows: int = 2, seed: int = 0
) -> list[dict[str, Any]]:
    """Dataset rows shaped like the datamodule's.

    Packed: ``n_rows`` rows of exactly ``length`` tokens, documents each followed by the
    end-of-text token, cut across row boundaries. Padded: one document per row, followed by
    end-of-text, of decreasing lengths (the first ``length`` long, the last 5 tokens).
    """
    rng = random.Random(seed)
    if packed:
        stream: list[int] = []
        while len(stream) < n_rows * length:
            stream += _document(rng, special, rng.randint(3, 12)) + [special.eos_id]
        return [{"input_ids": stream[i * length : (i + 1) * length]} for i in range(n_rows)]
    lengths = [max(5, length - i * (length - 5) // max(1, n_rows)) for i in range(n_rows + 1)]
    return [{"input_ids": _document(rng, special, n - 1) + [special.eos_id]} for n in lengths]


# -- the report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """One check: what (``check``, in ``family``, with ``partner``), ``status`` and why (``detail``)."""

    check: str
    status: Status
    detail: str = ""
    family: str = ""
    partner: str = ""


@dataclass
class ConformanceReport:
    """Every check run on one plugin. ``ok`` when none failed; ``str(report)`` is a table."""

    name: str
    kind: str
    class_path: str
    package: str
    version: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    def summary(self) -> str:
        verdict = "conforms" if self.ok else "DOES NOT CONFORM"
        return (
            f"{self.name}: {self.count('pass')} passed, {self.count('fail')} failed, "
            f"{self.count('skip')} skipped: {verdict}"
        )

    def format_table(self) -> str:
        if self.package.startswith("$"):
            origin = f"loaded through {self.package}"
        else:
            origin = f"package {self.package} {self.version}" if self.version != "-" else self.package
        header = f"{self.kind} '{self.name}' ({self.class_path}), {origin}"
        rows = [("family", "check", "result", "detail")]
        for r in self.results:
            check = f"{r.check} [{r.partner}]" if r.partner else r.check
            rows.append((r.family or "-", check, r.status.upper() if r.status == "fail" else r.status, r.detail))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [header] + [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows
        ]
        return "\n".join(line.rstrip() for line in lines + [self.summary()])

    __str__ = format_table

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "class_path": self.class_path,
            "package": self.package,
            "version": self.version,
            "ok": self.ok,
            "results": [r.__dict__.copy() for r in self.results],
        }


class _Skip(Exception):
    """Raised inside a check to report it as skipped, with the reason."""


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message (at file:line)``: a failed check's reason.

    The location is the last frame outside this module and outside torch: the plugin's own line
    that raised (or called what raised). A failed assertion of the check itself has none.
    """
    import traceback

    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    torch_dir = str(Path(torch.__file__).parent)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if Path(f.filename) != Path(__file__) and not f.filename.startswith(torch_dir)
    ]
    return text + (f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else "")


class _Recorder:
    """Runs checks and records each result; a check whose ``needs`` did not pass is skipped."""

    def __init__(self, report: ConformanceReport) -> None:
        self.report = report

    def run(
        self,
        check: str,
        fn: Callable[[], str | None],
        family: str = "",
        partner: str = "",
        needs: Iterable[bool] = (),
    ) -> bool:
        if not all(needs):
            self.report.results.append(
                CheckResult(check, "skip", "not run: a check it depends on failed", family, partner)
            )
            return False
        try:
            detail = fn() or ""
        except _Skip as skip:
            self.report.results.append(CheckResult(check, "skip", str(skip), family, partner))
            return False
        except Exception as exc:  # noqa: BLE001 - a failing plugin is exactly what is being reported
            self.report.results.append(CheckResult(check, "fail", describe_exception(exc), family, partner))
            return False
        self.report.results.append(CheckResult(check, "pass", detail, family, partner))
        return True

    def skip(self, check: str, detail: str, family: str = "", partner: str = "") -> None:
        self.report.results.append(CheckResult(check, "skip", detail, family, partner))


# -- resolving what to check -----------------------------------------------------------------------
def _resolve(name_or_class: str | type, kind: str | None) -> tuple[type, str]:
    from lmforge.plugin_manager import get_registry

    if kind is not None and kind not in PLUGIN_KINDS:
        raise LmforgeError(
            f"Unknown plugin kind '{kind}'.{closest(kind, PLUGIN_KINDS)} Kinds: {', '.join(PLUGIN_KINDS)}."
        )
    if isinstance(name_or_class, type):
        cls = name_or_class
        if not issubclass(cls, Plugin) or cls.kind not in PLUGIN_KINDS:
            raise LmforgeError(f"{cls!r} is not an lmforge Architecture, Objective or Task subclass.")
        if kind is not None and cls.kind != kind:
            raise LmforgeError(f"{cls.__qualname__} is a plugin of kind '{cls.kind}', not '{kind}'.")
        return cls, cls.kind
    name = str(name_or_class)
    registry = get_registry()
    kinds = [
        k
        for k in PLUGIN_KINDS
        if (kind is None or k == kind) and (name in registry.plugins[k] or (k, name) in registry.duplicates)
    ]
    if len(kinds) > 1:
        raise LmforgeError(f"'{name}' names plugins of several kinds ({', '.join(kinds)}); say which with --kind.")
    if not kinds:
        for broken in registry.broken:
            if name in broken.names or broken.source.module.rsplit(".", 1)[-1] == name:
                raise LmforgeError(registry.broken_message(broken))
        if kind is not None:
            registry.get(kind, name)  # raises: unknown, with the closest names
        known = sorted({n for k in PLUGIN_KINDS for n in registry.plugins[k]})
        raise LmforgeError(f"No plugin is called '{name}'.{closest(name, known)} Known plugins: {', '.join(known)}.")
    return registry.get(kinds[0], name).cls, kinds[0]


def _partner_classes(kind: str, family: str, partners: Iterable[str | type] | None) -> list[type]:
    """Plugins of ``kind`` for ``family`` to pair with: ``partners`` if given, else lmforge's built-ins."""
    from lmforge.plugin_manager import get_registry

    if partners is not None:
        found = []
        for p in partners:
            cls = p if isinstance(p, type) else None
            if cls is None:
                infos = [get_registry().plugins[k].get(p) for k in PLUGIN_KINDS]
                infos = [i for i in infos if i is not None]
                if not infos:
                    _resolve(p, None)  # raises the right error
                cls = next((i.cls for i in infos if i.kind == kind), None)
            if cls is not None and cls.kind == kind and family in cls.families:
                found.append(cls)
        return found
    infos = get_registry().plugins[kind].values()
    return [
        i.cls for i in sorted(infos, key=lambda i: i.name) if i.source.package == "lmforge" and family in i.families
    ]


# -- building ----------------------------------------------------------------------------------
def _options_of(cls: type) -> list[inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def build_default(cls: type, vocab_size: int = SAMPLE_VOCAB_SIZE, seed: int = 0) -> Plugin:
    """``cls`` built from its default options (an architecture gets ``vocab_size``), seeded."""
    kwargs = {}
    if issubclass(cls, Architecture):
        if "vocab_size" not in {p.name for p in _options_of(cls)}:
            raise LmforgeError(
                f"{cls.__qualname__}.__init__ has no vocab_size option; the lmforge CLI fills vocab_size in from the "
                "data's tokenizer, so every architecture takes one."
            )
        kwargs["vocab_size"] = vocab_size
    required = [p.name for p in _options_of(cls) if p.default is p.empty and p.name not in kwargs]
    if required:
        raise LmforgeError(
            f"{cls.__qualname__}.__init__ option(s) {', '.join(required)} have no default; every option needs one, so "
            f"that `class_path: {cls.name}` alone builds the plugin and --print_config can show it."
        )
    torch.manual_seed(seed)
    return cls(**kwargs)


def _checkpoint_round_trip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as checkpoints store it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LmforgeError(
            "plugin_config() holds something other than plain data (numbers, strings, lists, dicts, tensors), "
            f"so checkpoints could not store it: {str(exc).strip().splitlines()[-1]}"
        ) from None


@torch.no_grad()
def _perturb(module: nn.Module, seed: int, scale: float = 0.02) -> None:
    """Nudge every parameter (biases and norms start at 0/1, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.float().abs().max().item() if b.numel() else 1.0)
    if not diff <= atol * scale:
        raise AssertionError(f"{what}: max abs difference {diff:.3g}")


def _is_tensor_dict(batch: Any) -> bool:
    return isinstance(batch, Mapping) and bool(batch) and all(isinstance(v, torch.Tensor) for v in batch.values())


# -- family contracts ------------------------------------------------------------------------------
class _Contract:
    """What the conformance check calls on an architecture of one family."""

    def inputs(self, special: SpecialTokens, seed: int) -> dict[str, torch.Tensor]:
        """A right-padded batch of 2 rows: ``input_ids`` and ``attention_mask``."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(_FIRST_WORD_ID, special.vocab_size - len(special.sentinel_ids), (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        ids = ids.masked_fill(mask == 0, special.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def shapes(self, arch: Architecture, inputs: dict[str, torch.Tensor], vocab: int) -> str:
        raise NotImplementedError

    def outputs(self, arch: Architecture, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The architecture's outputs on ``inputs`` at real (unpadded) positions, to compare two models."""
        raise NotImplementedError


def _expect(tensor: Any, shape: tuple[int | None, ...], what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise AssertionError(f"{what} returned {type(tensor).__name__}, not a tensor")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise AssertionError(f"{what} has shape {tuple(tensor.shape)}, expected {want}")
    return tensor


def _finite_where(tensor: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor[mask.bool()]).all():
        raise AssertionError(f"{what} is not finite at real (unpadded) positions")


class _DecoderContract(_Contract):
    def shapes(self, arch, inputs, vocab):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, T = ids.shape
        hidden = _expect(arch(ids), (B, T, None), "forward(input_ids)")
        logits = _expect(arch.logits(hidden), (B, T, vocab), "logits(hidden)")
        padded = _expect(arch(ids, attention_mask=mask), (B, T, hidden.size(-1)), "forward(input_ids, attention_mask)")
        _finite_where(arch.logits(padded), mask, "logits of a padded batch")
        return f"hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)}"

    def outputs(self, arch, inputs):
        mask = inputs["attention_mask"]
        return arch.logits(arch(inputs["input_ids"], attention_mask=mask))[mask.bool()]


class _EncoderContract(_Contract):
    def shapes(self, arch, inputs, vocab):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        B, T = ids.shape
        hidden = _expect(arch(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)), (B, T, None), "forward")
        _finite_where(hidden, mask, "hidden states of a padded batch")
        done = [f"hidden {tuple(hidden.shape)}"]
        if getattr(arch, "has_mlm_head", False):
            _expect(arch.mlm_logits(hidden), (B, T, vocab), "mlm_logits(hidden)")
            picked = hidden[mask.bool()]
            _expect(arch.mlm_logits(picked), (picked.size(0), vocab), "mlm_logits(hidden[positions])")
            done.append(f"mlm_logits (N, {vocab})")
        if getattr(arch, "has_pair_head", False):
            pooled = _expect(arch.pooled(hidden), (B, hidden.size(-1)), "pooled(hidden)")
            _expect(arch.pair_logits(pooled), (B, 2), "pair_logits(pooled)")
            done.append("pooled, pair_logits (B, 2)")
        return ", ".join(done)

    def outputs(self, arch, inputs):
        mask = inputs["attention_mask"]
        hidden = arch(inputs["input_ids"], attention_mask=mask)[mask.bool()]
        return arch.mlm_logits(hidden) if getattr(arch, "has_mlm_head", False) else hidden


class _Seq2SeqContract(_Contract):
    def inputs(self, special, seed):
        batch = super().inputs(special, seed)
        g = torch.Generator().manual_seed(seed + 1)
        batch["decoder_input_ids"] = torch.randint(_FIRST_WORD_ID, 64, (2, 7), generator=g)
        return batch

    def shapes(self, arch, inputs, vocab):
        ids, mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
        B, S = ids.shape
        T = dec.size(1)
        if not isinstance(getattr(arch, "decoder_start_token_id", None), int):
            raise AssertionError("the architecture has no integer decoder_start_token_id attribute")
        enc = _expect(arch.encode(ids, attention_mask=mask), (B, S, None), "encode(input_ids, attention_mask)")
        _finite_where(enc, mask, "encoder hidden states of a padded batch")
        hidden = _expect(arch.decode(dec, enc, encoder_attention_mask=mask), (B, T, None), "decode(...)")
        logits = _expect(arch.logits(hidden), (B, T, vocab), "logits(hidden)")
        if not torch.isfinite(logits).all():
            raise AssertionError("decoder logits are not finite")
        _assert_close(
            arch(ids, dec, attention_mask=mask), hidden, "forward(input_ids, decoder_input_ids) vs decode(encode(...))"
        )
        return f"encoder {tuple(enc.shape)}, decoder {tuple(hidden.shape)}, logits {tuple(logits.shape)}"

    def outputs(self, arch, inputs):
        return arch.logits(
            arch(inputs["input_ids"], inputs["decoder_input_ids"], attention_mask=inputs["attention_mask"])
        )


_CONTRACTS: dict[str, _Contract] = {
    "decoder": _DecoderContract(),
    "encoder": _EncoderContract(),
    "seq2seq": _Seq2SeqContract(),
}


def _implements(arch: Architecture, method: str) -> bool:
    return getattr(type(arch), method, None) is not getattr(Architecture, method, None)


# -- the checks --------------------------------------------------------------------------------
@contextlib.contextmanager
def _check_environment(seed: int) -> Iterator[None]:
    """Seeded torch and ``random``, one CPU thread; the caller's generators and threads are restored.

    The sample tensors are tiny: intra-op threads only add synchronisation (on a busy machine,
    tens of times the work itself).
    """
    state, threads = random.getstate(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            random.setstate(state)


def check_plugin(
    name_or_class: str | type,
    kind: str | None = None,
    partners: Iterable[str | type] | None = None,
    *,
    vocab_size: int = SAMPLE_VOCAB_SIZE,
    seed: int = 0,
) -> ConformanceReport:
    """Run every conformance check on a plugin; return the report (it never raises for a failed check).

    Args:
        name_or_class: A registered plugin name (``"gpt"``) or a plugin class.
        kind: ``"architecture"``, ``"objective"`` or ``"task"``, needed only when a name is used by
            plugins of several kinds.
        partners: Plugins (names or classes) to pair with, instead of lmforge's built-ins: the
            objectives an architecture is trained with, the architectures an objective is trained
            on, or both for a task.
        vocab_size: Vocabulary of the sample data (architectures are built with it).
        seed: Seeds every random choice; the same seed gives the same report.
    """
    from lmforge.plugin_manager import _check_plugin_class, get_registry

    cls, kind = _resolve(name_or_class, kind)
    info = get_registry().find_by_class(cls)
    report = ConformanceReport(
        name=cls.name or cls.__qualname__,
        kind=kind,
        class_path=f"{cls.__module__}.{cls.__qualname__}",
        package=info.source.package if info else "not registered in this process",
        version=info.source.version if info else "-",
    )
    partners = list(partners) if partners is not None else None
    rec = _Recorder(report)
    special = sample_special_tokens(vocab_size)
    with _check_environment(seed), torch.enable_grad():

        def registration() -> str:
            _check_plugin_class(kind, cls)
            return f"registered by {info.source.describe()}" if info else "class attributes valid (not registered)"

        registered = rec.run("registration", registration)
        plugin: dict[str, Any] = {}

        def build() -> str:
            plugin["it"] = build_default(cls, vocab_size, seed)
            n = sum(p.numel() for p in plugin["it"].parameters()) if isinstance(plugin["it"], nn.Module) else 0
            return f"{n:,} parameters" if isinstance(plugin["it"], nn.Module) else ""

        built = rec.run("build from defaults", build, needs=[registered])
        rec.run("options rebuild the plugin", lambda: _check_options(cls, plugin["it"], seed), needs=[built])
        if kind == "objective":
            rec.run(
                "picklable (data-loader workers)", lambda: _check_pickle(plugin["it"], special, seed), needs=[built]
            )
        if kind == "architecture" and cls.hf_model_type:
            rec.run("Hugging Face name map", lambda: _check_hf_names(cls, vocab_size, seed), needs=[built])
            rec.run("Hugging Face config", lambda: _check_hf_config(cls, vocab_size, seed), needs=[built])
        if not built:
            return report
        for family in cls.families:
            _check_family(rec, cls, kind, family, partners, special, vocab_size, seed)
    return report


def _check_options(cls: type, plugin: Plugin, seed: int) -> str:
    options = plugin.plugin_options()
    missing = [p.name for p in _options_of(cls) if p.name not in options]
    if missing:
        raise AssertionError(
            f"plugin_options() lacks {', '.join(missing)}: the options were not recorded (is __init__ replaced after "
            "the class is created?)"
        )
    config = _checkpoint_round_trip(plugin.plugin_config())
    torch.manual_seed(seed + 1)
    again = cls(**config["init_args"])
    if again.plugin_options() != options:
        raise AssertionError(
            f"rebuilt from its options, the plugin records {again.plugin_options()} instead of {options}"
        )
    if isinstance(plugin, nn.Module):
        shapes = {k: tuple(v.shape) for k, v in plugin.state_dict().items()}
        again_shapes = {k: tuple(v.shape) for k, v in again.state_dict().items()}
        if shapes != again_shapes:
            differ = sorted(set(shapes.items()) ^ set(again_shapes.items()))[:3]
            raise AssertionError(f"rebuilt from its options, the state dict differs: {differ}")
    return f"{len(options)} option(s)"


def _check_pickle(objective: Objective, special: SpecialTokens, seed: int) -> str:
    copy_ = pickle.loads(pickle.dumps(objective))
    rows = sample_rows(special, objective.packed_length(SAMPLE_BLOCK_SIZE), packed=True, seed=seed)
    batches = []
    for obj in (objective, copy_):
        torch.manual_seed(seed)
        random.seed(seed)
        batches.append(obj.collate(copy.deepcopy(rows), special))
    a, b = batches
    if not _is_tensor_dict(a):
        return "pickles (what its collate returns is checked per family)"
    if not _is_tensor_dict(b) or a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        raise AssertionError("the unpickled copy collates the same rows differently (state lost in pickling?)")
    return "the unpickled copy collates the same batch"


def _check_hf_names(cls: type, vocab_size: int, seed: int) -> str:
    arch = build_default(cls, vocab_size, seed)
    _perturb(arch, seed)
    own = arch.state_dict()
    hf = arch.lmforge_state_dict_to_hf()
    back = arch.hf_state_dict_to_lmforge(dict(hf))
    missing, extra = sorted(set(own) - set(back)), sorted(set(back) - set(own))
    if missing or extra:
        raise AssertionError(f"lmforge -> HF -> lmforge loses {missing[:5]} and adds {extra[:5]}")
    differ = [k for k in own if back[k].shape != own[k].shape or not torch.equal(back[k], own[k])]
    if differ:
        raise AssertionError(f"lmforge -> HF -> lmforge changes {len(differ)} tensor(s): {differ[:5]}")
    return f"{len(own)} tensors round-trip exactly ({len(hf)} Hugging Face tensors)"


def _check_hf_config(cls: type, vocab_size: int, seed: int) -> str:
    arch = build_default(cls, vocab_size, seed).eval()
    _perturb(arch, seed)
    hf_config = _checkpoint_round_trip(arch.hf_config())
    if hf_config.get("model_type") != cls.hf_model_type:
        raise AssertionError(
            f"hf_config()['model_type'] is {hf_config.get('model_type')!r}, not hf_model_type {cls.hf_model_type!r}"
        )
    options = cls.options_from_hf_config(hf_config)
    torch.manual_seed(seed + 1)
    rebuilt = cls(**options).eval()
    if rebuilt.hf_config() != hf_config:
        changed = sorted(
            k for k in set(hf_config) | set(rebuilt.hf_config()) if hf_config.get(k) != rebuilt.hf_config().get(k)
        )
        raise AssertionError(f"options_from_hf_config(hf_config()) builds a model whose hf_config differs in {changed}")
    rebuilt.load_state_dict(arch.hf_state_dict_to_lmforge(arch.lmforge_state_dict_to_hf()), strict=True)
    family = next((f for f in cls.families if f in _CONTRACTS), None)
    if family is not None:
        contract = _CONTRACTS[family]
        inputs = contract.inputs(sample_special_tokens(vocab_size), seed)
        with torch.no_grad():
            _assert_close(
                contract.outputs(rebuilt, inputs), contract.outputs(arch, inputs), "outputs after HF round trip"
            )
    return f"{len(options)} option(s) from config.json rebuild the same model"


def _check_family(
    rec: _Recorder,
    cls: type,
    kind: str,
    family: str,
    partners: list | None,
    special: SpecialTokens,
    vocab_size: int,
    seed: int,
) -> None:
    from lmforge.families import FAMILY_MODULES

    if family not in FAMILY_MODULES:
        rec.skip(
            "family", f"family '{family}' is not available in this lmforge (it has {', '.join(FAMILY_MODULES)})", family
        )
        return
    module_cls = FAMILY_MODULES[family]
    if kind == "architecture":
        _check_architecture_family(rec, cls, family, module_cls, partners, special, vocab_size, seed)
    elif kind == "objective":
        archs = _partner_classes("architecture", family, partners)
        if not archs:
            rec.skip("training", f"no reference architecture for family {family}", family)
            return
        for arch_cls in archs:
            _check_training(rec, family, module_cls, arch_cls, cls, special, vocab_size, seed, partner=arch_cls.name)
    else:
        _check_task_family(rec, cls, family, module_cls, partners, special, vocab_size, seed)


def _check_architecture_family(rec, cls, family, module_cls, partners, special, vocab_size, seed) -> None:
    contract = _CONTRACTS.get(family)
    inputs = contract.inputs(special, seed) if contract else {}
    if contract is None:
        rec.skip("forward shapes", f"lmforge.testing has no contract check for family '{family}'", family)
    else:

        def shapes() -> str:
            arch = build_default(cls, vocab_size, seed).eval()
            with torch.no_grad():
                return contract.shapes(arch, inputs, vocab_size)

        rec.run("forward shapes", shapes, family)
        rec.run("save/load round trip", lambda: _check_save_load(cls, contract, inputs, vocab_size, seed), family)
    if family == "decoder":
        rec.run("cached generation", lambda: _check_decoder_cache(cls, special, vocab_size, seed), family)
    elif family == "seq2seq":
        rec.run("cached decoding", lambda: _check_seq2seq_cache(cls, inputs, vocab_size, seed), family)
    objectives = _partner_classes("objective", family, partners)
    if not objectives:
        rec.skip("training", f"no reference objective for family {family}", family)
        return
    trained: set[str] = set()
    ran = False
    for objective_cls in objectives:
        ran |= _check_training(
            rec,
            family,
            module_cls,
            cls,
            objective_cls,
            special,
            vocab_size,
            seed,
            partner=objective_cls.name,
            trained=trained,
        )
    if partners is not None:  # a parameter may be meant for an objective that was not given
        rec.skip("every parameter trained", "checked only against all of lmforge's built-in objectives", family)
    elif ran:
        rec.run("every parameter trained", lambda: _check_all_trained(cls, trained, vocab_size, seed), family)


def _check_save_load(cls, contract: _Contract, inputs, vocab_size: int, seed: int) -> str:
    arch = build_default(cls, vocab_size, seed).eval()
    _perturb(arch, seed)
    saved = _checkpoint_round_trip({"config": arch.plugin_config(), "state_dict": arch.state_dict()})
    torch.manual_seed(seed + 1)
    fresh = cls(**saved["config"]["init_args"])
    fresh.load_state_dict(saved["state_dict"], strict=True)
    fresh.eval()
    with torch.no_grad():
        _assert_close(contract.outputs(fresh, inputs), contract.outputs(arch, inputs), "outputs of the reloaded model")
    return "state_dict -> plugin_config() -> equal outputs"


def _check_decoder_cache(cls, special: SpecialTokens, vocab_size: int, seed: int) -> str:
    from lmforge.generation import generate

    arch = build_default(cls, vocab_size, seed).eval()
    if not _implements(arch, "new_cache"):
        raise _Skip("new_cache is not implemented (generation reruns the whole sequence)")
    _perturb(arch, seed, scale=0.2)  # spread the logits so greedy choices are clear
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(_FIRST_WORD_ID, vocab_size - len(special.sentinel_ids), (1, 5), generator=g)
    n = 8
    cached = generate(arch, prompt, max_new_tokens=n, greedy=True, use_cache=True)
    uncached = generate(arch, prompt, max_new_tokens=n, greedy=True, use_cache=False)
    if torch.equal(cached, uncached):
        return f"{n} greedy tokens equal"
    # A different token is a bug unless the two runs' logits agree and only a near-tie flipped.
    sequence = torch.cat([prompt, uncached], dim=1)
    with torch.no_grad():
        full = arch.logits(arch(sequence))[:, prompt.size(1) - 1 : -1]
        cache = arch.new_cache(1, sequence.size(1))
        steps = [arch.logits(arch(prompt, position_ids=torch.arange(prompt.size(1))[None], cache=cache))[:, -1:]]
        for t in range(prompt.size(1), sequence.size(1) - 1):
            steps.append(arch.logits(arch(sequence[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache)))
    _assert_close(
        torch.cat(steps, dim=1),
        full,
        f"cached tokens {cached.tolist()} != uncached {uncached.tolist()}; logits",
        atol=1e-4,
    )
    return f"{n} greedy tokens: a near-tie differs, logits equal"


def _check_seq2seq_cache(cls, inputs, vocab_size: int, seed: int) -> str:
    arch = build_default(cls, vocab_size, seed).eval()
    if not _implements(arch, "new_cache"):
        raise _Skip("new_cache is not implemented")
    _perturb(arch, seed)
    ids, mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    with torch.no_grad():
        enc = arch.encode(ids, attention_mask=mask)
        full = arch.logits(arch.decode(dec, enc, encoder_attention_mask=mask))
        cache = arch.new_cache(ids.size(0), dec.size(1))
        steps = []
        for t in range(dec.size(1)):
            steps.append(arch.logits(arch.decode(dec[:, t : t + 1], enc, encoder_attention_mask=mask, cache=cache)))
    if getattr(cache, "length", dec.size(1)) != dec.size(1):
        raise AssertionError(f"after {dec.size(1)} cached steps the cache's length is {cache.length}")
    _assert_close(torch.cat(steps, dim=1), full, "cached step-by-step logits vs the whole sequence", atol=1e-4)
    return f"{dec.size(1)} cached decoder steps equal the uncached logits"


def _check_training(
    rec: _Recorder,
    family: str,
    module_cls: type,
    arch_cls: type,
    objective_cls: type,
    special: SpecialTokens,
    vocab_size: int,
    seed: int,
    partner: str,
    trained: set[str] | None = None,
) -> bool:
    """collate (packed, padded) -> loss -> backward -> optimizer step; True if training ran."""
    state: dict[str, Any] = {}

    def assemble() -> None:
        arch = build_default(arch_cls, vocab_size, seed)
        objective = build_default(objective_cls, vocab_size, seed)
        try:
            objective.check_architecture(arch)
        except LmforgeError as exc:
            raise _Skip(f"objective '{objective.name}' refuses architecture '{arch.name}': {exc}") from None
        state["module"] = module_cls(architecture=arch, objective=objective)
        state["objective"] = objective

    try:
        assemble()
    except _Skip as skip:
        rec.skip("training", str(skip), family, partner)
        return False
    except Exception as exc:  # noqa: BLE001
        rec.report.results.append(
            CheckResult("build the family module", "fail", describe_exception(exc), family, partner)
        )
        return False
    module, objective = state["module"], state["objective"]
    module.train()
    batches: dict[str, dict[str, torch.Tensor]] = {}

    def collate(packed: bool) -> str:
        length = objective.packed_length(SAMPLE_BLOCK_SIZE) if packed else SAMPLE_BLOCK_SIZE
        rows = sample_rows(special, length, packed=packed, seed=seed)
        try:
            batch = objective.collate(rows, special)
        except LmforgeError as exc:  # a deliberate refusal, e.g. an objective that only takes packed rows
            raise _Skip(f"refused {'packed' if packed else 'padded'} rows: {exc}") from None
        if not _is_tensor_dict(batch):
            raise AssertionError(f"collate returned {type(batch).__name__}, not a non-empty dict of tensors")
        batches["packed" if packed else "padded"] = batch
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())

    packed_ok = rec.run("collate packed rows", lambda: collate(True), family, partner)
    padded_ok = rec.run("collate padded rows", lambda: collate(False), family, partner)
    if not batches:
        return False
    losses: dict[str, torch.Tensor] = {}

    def loss() -> str:
        for what, batch in batches.items():
            out = objective.compute_loss(module, batch)
            if not isinstance(out, Mapping) or "loss" not in out or "tokens" not in out:
                raise AssertionError(f"compute_loss returned {type(out).__name__} without 'loss' and 'tokens'")
            value, tokens = out["loss"], out["tokens"]
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise AssertionError(f"the {what} batch's loss is not a scalar tensor")
            if not torch.isfinite(value):
                raise AssertionError(f"the {what} batch's loss is {value.item()}")
            if not value.requires_grad:
                raise AssertionError(
                    f"the {what} batch's loss does not require grad (computed without the parameters?)"
                )
            if not float(tokens) > 0:
                raise AssertionError(f"the {what} batch's 'tokens' is {float(tokens)}, expected > 0")
            losses[what] = value
        return ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items())

    loss_ok = rec.run("finite loss", loss, family, partner, needs=[packed_ok or padded_ok])

    def backward() -> str:
        module.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise AssertionError(f"non-finite gradient in {len(bad)} parameter(s): {bad[:5]}")
        got = [n for n, p in module.named_parameters() if p.grad is not None and bool(p.grad.any())]
        if not got:
            raise AssertionError("no parameter received a non-zero gradient")
        if trained is not None:
            trained.update(n.removeprefix("architecture.") for n, p in module.named_parameters() if p.grad is not None)
        total = sum(1 for p in module.parameters() if p.requires_grad)
        return f"{len(got)}/{total} parameter tensors have a non-zero gradient, all finite"

    backward_ok = rec.run("backward", backward, family, partner, needs=[loss_ok])

    def step() -> str:
        params = [(n, p) for n, p in module.named_parameters() if p.grad is not None and bool(p.grad.any())]
        before = [p.detach().clone() for _, p in params]
        optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-3)
        optimizer.step()
        unchanged = [n for (n, p), b in zip(params, before) if torch.equal(p.detach(), b)]
        if unchanged:
            raise AssertionError(f"{len(unchanged)} parameter(s) with a gradient did not change: {unchanged[:5]}")
        batch = batches.get("packed") or batches["padded"]
        with torch.no_grad():
            after = objective.compute_loss(module, batch)["loss"]
        if not torch.isfinite(after):
            raise AssertionError(f"the loss after one step is {after.item()}")
        return f"{len(params)} parameter tensors changed; loss after the step {after.item():.3f}"

    rec.run("optimizer step", step, family, partner, needs=[backward_ok])
    return backward_ok


def _check_all_trained(cls, trained: set[str], vocab_size: int, seed: int) -> str:
    arch = build_default(cls, vocab_size, seed)
    names = [n for n, p in arch.named_parameters() if p.requires_grad]
    never = [n for n in names if n not in trained]
    if never:
        raise AssertionError(
            f"{len(never)} parameter(s) get no gradient from any objective: {never[:5]} (unused in forward? "
            "freeze them with requires_grad_(False) or remove them)"
        )
    return f"all {len(names)} parameter tensors get a gradient"


def example_tokenizer(records: dict[str, list[Any]]):
    """A word-level ``tokenizers.Tokenizer`` over every word in ``records`` (BERT's special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str):
            words.update(w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(value))
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(list(records.values()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _check_finetuning_task(rec, cls, family, module_cls, partners, records, seed) -> None:
    """preprocess -> collate -> step -> backward -> metrics -> predict_step on ``example_records``."""
    import json

    from lmforge.data.tokenizer import find_special_tokens
    from lmforge.prediction_writer import to_json

    tokenizer = example_tokenizer(records)
    special = find_special_tokens(tokenizer)
    vocab_size = special.vocab_size
    n = len(next(iter(records.values())))
    archs = _partner_classes("architecture", family, partners)
    if not archs:
        rec.skip("family module", f"no reference architecture for family {family}", family)
        return
    arch_cls = archs[0]
    state: dict[str, Any] = {}

    def assemble() -> str:
        task = build_default(cls, vocab_size, seed)
        labels = cls.infer_labels(records)
        if labels is not None:
            task = cls(**{**task.plugin_options(), "labels": labels})
        arch = build_default(arch_cls, vocab_size, seed)
        state["module"] = module = module_cls(architecture=arch, task=task)
        module.special = special  # what LMModule.setup takes from the datamodule
        module.tokenizer_json = tokenizer.to_str()
        return f"{module_cls.__name__}(architecture={arch.name}, task={task.name})"

    built = rec.run("family module accepts it", assemble, family, arch_cls.name)

    def batch_for(stage: str) -> dict[str, Any]:
        task, fields = state["module"].task, dict(records)
        if stage == "predict":
            fields = {k: v for k, v in fields.items() if k not in cls.label_fields}
        out = task.preprocess({**fields, "example_id": list(range(n))}, tokenizer, special, 64, family, stage)
        rows = [dict(zip(out, values)) for values in zip(*out.values())]
        if not rows:
            raise AssertionError("preprocess returned no rows for example_records()")
        return task.collate(rows, special)

    def train_step() -> str:
        module = state["module"].train()
        out = module.task.step(module, batch_for("fit"), "train")
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise AssertionError(f"the loss is {loss.item()}")
        loss.backward()
        bad = [name for name, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise AssertionError(f"non-finite gradients in {bad[:3]}")
        return f"loss {loss.item():.3f} over {int(out['tokens'])}"

    trained = rec.run("preprocess, collate, step, backward", train_step, family, arch_cls.name, needs=[built])

    def evaluate() -> str:
        module = state["module"].eval()
        with torch.no_grad():
            module.task.step(module, batch_for("validate"), "val")
        metrics = module.task.compute_metrics("val")
        bad = {k: v for k, v in metrics.items() if not torch.isfinite(torch.as_tensor(v)).all()}
        if bad:
            raise AssertionError(f"non-finite metrics {bad}")
        return ", ".join(sorted(metrics)) or "no metrics"

    rec.run("metrics", evaluate, family, arch_cls.name, needs=[trained])

    def predict() -> str:
        module = state["module"].eval()
        with torch.no_grad():
            rows = module.task.finalize_predictions(list(module.task.predict_step(module, batch_for("predict"))))
        if len(rows) != n:
            raise AssertionError(f"{len(rows)} predictions for {n} records; write one line per input record")
        json.dumps(to_json(rows))  # every line must be JSON
        return f"{len(rows)} JSON lines"

    rec.run("predict_step", predict, family, arch_cls.name, needs=[built])


def _check_task_family(rec, cls, family, module_cls, partners, special, vocab_size, seed) -> None:
    records = cls.example_records() if hasattr(cls, "example_records") else None
    if records is not None:
        _check_finetuning_task(rec, cls, family, module_cls, partners, records, seed)
        return
    pair = None
    for arch_cls in _partner_classes("architecture", family, partners):
        for objective_cls in _partner_classes("objective", family, partners):
            try:
                arch = build_default(arch_cls, vocab_size, seed)
                objective = build_default(objective_cls, vocab_size, seed)
                objective.check_architecture(arch)
            except Exception:  # noqa: BLE001 - not a usable pair; try the next
                continue
            pair = (arch, objective)
            break
        if pair:
            break
    if pair is None:
        rec.skip("family module", f"no reference architecture/objective for family {family}", family)
        return
    arch, objective = pair
    partner = f"{arch.name}+{objective.name}"
    state: dict[str, Any] = {}

    def assemble() -> str:
        task = build_default(cls, vocab_size, seed)
        state["module"] = module_cls(architecture=arch, objective=objective, task=task)
        return f"{module_cls.__name__}(architecture={arch.name}, objective={objective.name}, task={task.name})"

    built = rec.run("family module accepts it", assemble, family, partner)

    def predict() -> str:
        module = state["module"].eval()
        from lmforge.plugin_api import Task

        if type(module.task).predict_step is Task.predict_step:
            raise _Skip("the task defines no predict_step")
        batch = objective.collate(sample_rows(special, SAMPLE_BLOCK_SIZE, packed=False, seed=seed), special)
        with torch.no_grad():
            out = module.predict_step(batch, 0)
        if out is None:
            raise AssertionError("predict_step returned None; return what `lmforge predict` should write")
        return f"returned {type(out).__name__}"

    rec.run("predict_step", predict, family, partner, needs=[built])


def assert_conforms(name_or_class: str | type, kind: str | None = None, **kwargs: Any) -> ConformanceReport:
    """:func:`check_plugin`, failing the calling test with the whole report if any check failed."""
    report = check_plugin(name_or_class, kind, **kwargs)
    if not report.ok:
        raise AssertionError("the plugin does not conform to the lmforge plugin contract:\n" + report.format_table())
    return report


__all__ = [
    "SAMPLE_BLOCK_SIZE",
    "SAMPLE_VOCAB_SIZE",
    "CheckResult",
    "ConformanceReport",
    "assert_conforms",
    "build_default",
    "check_plugin",
    "sample_rows",
    "sample_special_tokens",
]
