"""Tokenizers: load a ``tokenizer.json``, find its special tokens by role, train a new one.

lmforge uses 🤗 ``tokenizers`` directly (no ``transformers``): a tokenizer is one ``tokenizer.json``
file. Special tokens are never assumed to sit at fixed ids; :func:`find_special_tokens` looks them
up by role (padding, end of document, ...) among the usual spellings.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import LmforgeError
from lmforge.plugin_api import SpecialTokens

TOKENIZER_FILENAME = "tokenizer.json"

#: Spellings looked up for each role, in order of preference. Each role is a list of tiers: a later
#: tier is only consulted when no token of an earlier tier exists (``[SEP]`` is an end-of-document
#: token only for tokenizers that have nothing better).
SPECIAL_TOKEN_CANDIDATES: dict[str, tuple[tuple[str, ...], ...]] = {
    "pad": (("<|pad|>", "<pad>", "[PAD]"),),
    "eos": (("<|endoftext|>", "</s>", "<eos>"), ("[SEP]",)),
    "bos": (("<s>", "<bos>", "<|startoftext|>"),),
    "unk": (("<unk>", "[UNK]", "<|unk|>"),),
    "mask": (("<mask>", "[MASK]", "<|mask|>"),),
    "cls": (("[CLS]", "<s>"),),
    "sep": (("[SEP]", "</s>"),),
}

#: Special tokens written into a newly trained tokenizer, by kind.
BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_HOW_TO_MAKE = (
    "Point to an existing tokenizer.json (a Hugging Face `tokenizers` file, or the directory that holds "
    "one), or train one on your text with `lmforge tokenizer train data/train.txt "
    "--output tokenizers/my_tokenizer.json --vocab_size 8000`."
)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int | None, model: str) -> None:
    """Refuse a tokenizer with more tokens than ``model``'s embedding has rows: its higher ids would
    fail at the first lookup (an IndexError deep in generation) or read another token's row."""
    tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and tokens > vocab_size:
        raise LmforgeError(
            f"The tokenizer stored with {model} has {tokens} tokens, but the model's vocabulary has {vocab_size}: "
            f"token ids {vocab_size} and up fall outside its embedding. The tokenizer.json beside the weights is not the "
            "one the model was trained with; put that one in its place."
        )


def find_special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """Return the ids of ``tokenizer``'s special tokens, found by role from its vocabulary.

    For each role the candidates of :data:`SPECIAL_TOKEN_CANDIDATES` are tried in order and the first
    one present wins. Within a tier, tokens registered as *special* added tokens are preferred over
    ordinary vocabulary entries of the same spelling. A role with no candidate present is ``None``.
    """
    special_added = {
        added.content: token_id
        for token_id, added in tokenizer.get_added_tokens_decoder().items()
        if getattr(added, "special", False)
    }

    def lookup(tiers: tuple[tuple[str, ...], ...]) -> int | None:
        for tier in tiers:
            for token in tier:
                if token in special_added:
                    return special_added[token]
            for token in tier:
                token_id = tokenizer.token_to_id(token)
                if token_id is not None:
                    return token_id
        return None

    ids = {f"{role}_id": lookup(tiers) for role, tiers in SPECIAL_TOKEN_CANDIDATES.items()}
    word_start, sentence_end = vocabulary_tables(tokenizer)
    return SpecialTokens(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        sentinel_ids=find_sentinel_ids(tokenizer),
        word_start=word_start,
        sentence_end=sentence_end,
        **ids,
    )


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable symbol -> byte table (GPT-2's ``bytes_to_unicode``, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + n)
            n += 1
    return {chr(s): b for b, s in zip(printable, symbols)}


def _pieces_of(node: dict | None, kind: str) -> list[dict]:
    """Every component of type ``kind`` in a pre-tokenizer/decoder spec, looking inside Sequences."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == kind else []
    for child in node.get("pretokenizers", []) + node.get("decoders", []):
        found += _pieces_of(child, kind)
    return found


def vocabulary_tables(tokenizer: Tokenizer) -> tuple[tuple[bool, ...] | None, tuple[bool, ...] | None]:
    """``(word_start, sentence_end)``: per token id, whether it begins a word / ends a sentence.

    Word starts are read from how the tokenizer marks words: WordPiece's continuing-subword prefix
    (``##``: a token with it continues a word), byte-level BPE's space symbol (``Ġ``: a token with it
    begins one) or SentencePiece's ``▁``. Added (special) tokens always begin a word. When the
    tokenizer marks no word boundaries, ``word_start`` is ``None``. A token ends a sentence when its
    text is only punctuation and holds ``.``, ``!`` or ``?`` (``.``, ``?"``, ``!)``).
    """
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    continuing = model.get("continuing_subword_prefix") or ("##" if model.get("type") == "WordPiece" else None)
    byte_level = bool(_pieces_of(spec.get("pre_tokenizer"), "ByteLevel") or _pieces_of(spec.get("decoder"), "ByteLevel"))
    metaspace = _pieces_of(spec.get("pre_tokenizer"), "Metaspace") or _pieces_of(spec.get("decoder"), "Metaspace")
    marker = (metaspace[0].get("replacement") or "▁") if metaspace else None
    byte_decoder = _byte_decoder() if byte_level else {}
    added = set(tokenizer.get_added_tokens_decoder())

    def text_of(token: str) -> str:
        if byte_level:
            return bytes(byte_decoder.get(ch, 32) for ch in token).decode("utf-8", errors="replace")
        if marker:
            return token.replace(marker, " ")
        return token

    word_start: list[bool] = []
    sentence_end: list[bool] = []
    for token_id in range(vocab_size):
        token = tokenizer.id_to_token(token_id)
        if token is None or token_id in added:
            word_start.append(True)
            sentence_end.append(False)
            continue
        if continuing:
            starts = not token.startswith(continuing)
            token = token.removeprefix(continuing)
        else:
            starts = text_of(token)[:1].isspace()
        word_start.append(starts)
        text = text_of(token).strip()
        sentence_end.append(
            bool(text) and any(ch in ".!?" for ch in text) and not any(ch.isalnum() or ch.isspace() for ch in text)
        )
    known = continuing or byte_level or marker
    return (tuple(word_start) if known else None), tuple(sentence_end)


def find_sentinel_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids of the T5 sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... (up to the first one missing)."""
    ids: list[int] = []
    while (token_id := tokenizer.token_to_id(f"<extra_id_{len(ids)}>")) is not None:
        ids.append(token_id)
    return tuple(ids)


def add_sentinel_tokens(tokenizer: Tokenizer, count: int = 100, mask_token: str | None = "<mask>") -> Tokenizer:
    """Add T5's ``count`` sentinel tokens (and a ``mask_token``) to ``tokenizer``, in place; return it.

    As in T5, the sentinels take the highest ids, counting down: ``<extra_id_0>`` is the last id of
    the vocabulary, ``<extra_id_1>`` the one before. ``mask_token`` (for BART-style denoising) is
    added first, below them. Tokens already present are left alone.
    """
    tokens = ([mask_token] if mask_token else []) + [f"<extra_id_{k}>" for k in reversed(range(count))]
    tokenizer.add_special_tokens([t for t in tokens if tokenizer.token_to_id(t) is None])
    return tokenizer


def resolve_tokenizer_path(path: str | os.PathLike) -> Path:
    """The ``tokenizer.json`` that ``path`` designates (``path`` itself, or inside a directory)."""
    p = Path(path).expanduser()
    if p.is_dir():
        inner = p / TOKENIZER_FILENAME
        if not inner.is_file():
            raise LmforgeError(
                f"Tokenizer path '{path}' is a directory without a {TOKENIZER_FILENAME} in it. {_HOW_TO_MAKE}"
            )
        return inner
    if not p.exists():
        raise LmforgeError(f"Tokenizer file '{path}' does not exist. {_HOW_TO_MAKE}")
    return p


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a 🤗 ``tokenizers`` tokenizer from a ``tokenizer.json`` file or a directory holding one.

    Raises :class:`LmforgeError` when the file is missing or is not a valid tokenizer file.
    """
    p = resolve_tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmforgeError(
            f"Tokenizer file '{p}' is not a valid Hugging Face tokenizer.json ({detail}). {_HOW_TO_MAKE}"
        ) from None


def _iter_texts(dataset) -> Iterator[list[str]]:
    for batch in dataset.iter(batch_size=1000):
        yield batch["text"]


def _output_path(output: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(output).expanduser()
    if out.is_dir() or out.suffix.lower() != ".json":
        out = out / TOKENIZER_FILENAME
    if out.exists() and not overwrite:
        raise LmforgeError(
            f"Tokenizer output '{out}' already exists and would be overwritten. Choose another --output, "
            "delete the file, or pass --overwrite."
        )
    return out


def build_untrained_tokenizer(kind: Literal["bpe", "wordpiece"] = "bpe") -> Tokenizer:
    """An empty tokenizer pipeline of the given kind, ready for training."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        # ByteLevel maps every byte to a printable symbol, so any text (any language, any bytes)
        # is encodable without an unknown token and decodes back exactly.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok
    raise LmforgeError(f"Unknown tokenizer kind '{kind}'. Use --type bpe (byte-level BPE) or --type wordpiece.")


def train_tokenizer(
    files: list[str],
    output: str,
    vocab_size: int = 1024,
    kind: Literal["bpe", "wordpiece"] = "bpe",
    min_frequency: int = 2,
    text_column: str = "text",
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer on ``files`` and write it as ``tokenizer.json``; return the written path.

    Args:
        files: Text files (or glob patterns), read exactly like the datamodule reads training data:
            ``.txt`` one document per non-empty line; ``.jsonl``/``.json``/``.csv``/``.parquet`` the
            ``text_column`` column; a directory written by ``datasets.Dataset.save_to_disk``.
        output: Where to write: a path ending in ``.json`` is the file itself; anything else is a
            directory into which ``tokenizer.json`` is written. Missing directories are created.
        vocab_size: Size of the vocabulary, special tokens included.
        kind: ``"bpe"``: byte-level BPE (GPT-2 style; special tokens ``<|endoftext|>`` and
            ``<|pad|>``; decoding restores the text exactly). ``"wordpiece"``: BERT-style WordPiece
            (special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``; encodes ``[CLS] text [SEP]`` when
            special tokens are added).
        min_frequency: A merge must occur at least this often to be learned.
        text_column: Column holding the text in ``.jsonl``/``.csv``/``.parquet`` files.
        overwrite: Replace an existing output file instead of refusing.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [str(files)]
    if not files:
        raise LmforgeError(
            "No training files given for the tokenizer. Name at least one text file: "
            "`lmforge tokenizer train FILES... --output tokenizer.json`."
        )
    if kind not in ("bpe", "wordpiece"):
        raise LmforgeError(f"Unknown tokenizer kind '{kind}'. Use --type bpe (byte-level BPE) or --type wordpiece.")
    if min_frequency < 1:
        raise LmforgeError(f"--min_frequency must be at least 1 (a merge seen that often is learnt), not {min_frequency}.")
    specials = BPE_SPECIAL_TOKENS if kind == "bpe" else WORDPIECE_SPECIAL_TOKENS
    minimum = len(specials) + (256 if kind == "bpe" else 1)
    if vocab_size < minimum:
        raise LmforgeError(
            f"--vocab_size {vocab_size} is too small for a {kind} tokenizer: it needs at least {minimum} "
            f"entries (the special tokens{' and the 256 byte symbols' if kind == 'bpe' else ''}). "
            "Use a larger --vocab_size, such as 1024 or more."
        )
    out = _output_path(output, overwrite)

    tok = build_untrained_tokenizer(kind)
    if kind == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            continuing_subword_prefix="##",
            show_progress=False,
        )
    from lmforge.data.datamodule import read_documents  # late import: the datamodule imports this module

    with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-") as work_dir:
        # Read (and check) every file first, so a data mistake is reported before training starts.
        documents = read_documents(files, text_column=text_column, work_dir=work_dir, option="FILES")
        tok.train_from_iterator(_iter_texts(documents), trainer=trainer, length=len(documents))
        del documents
    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, out)
    return out
