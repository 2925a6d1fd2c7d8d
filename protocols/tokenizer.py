"""A run's BPE tokenizer (``train.tokenizer = "bpe"``): trained once, shared by hash, never downloaded.

Byte-level BPE (the GPT-2 scheme, HuggingFace ``tokenizers``): every byte is a base token, so any
text encodes and decodes back to itself, and ``train.vocab_size - 256`` merges are learnt from the
run's training split (``protocols/text_corpus.py``: the same bytes the origins train on, never the
validation split). Training is deterministic (same text, same vocabulary size: the same JSON), but
nodes do not rely on that: the coordinator trains it once at start, keeps it in its run directory
(``RUN_DIR/tokenizer-bpe-N.json``) and gives every node the JSON with its SHA-256 at join; a node
refuses a tokenizer whose hash is not the one the coordinator named, so every origin of a run
encodes with the same merges. A model file carries the JSON too, so ``generate`` decodes text.

Free of torch: the coordinator imports it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lowband.protocols.config import BYTE_VOCAB, ConfigError, RunConfig
from lowband.protocols.text_corpus import load_text

log = logging.getLogger(__name__)

_CHUNK_CHARS = 1 << 16   # text handed to the trainer at a time (its word counts do not depend on it)


class TokenizerError(ValueError):
    """A tokenizer cannot be used: not the one the run named (hash mismatch), or not a byte-level BPE."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class BpeTokenizer:
    """A trained byte-level BPE: encode, decode, its canonical JSON and that JSON's SHA-256."""

    def __init__(self, tokenizer: Tokenizer, json_text: str) -> None:
        self._tok = tokenizer
        self.json = json_text
        self.sha256 = sha256_hex(json_text)
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_json(cls, json_text: str, *, sha256: str = "") -> BpeTokenizer:
        """Load ``json_text``; with ``sha256``, refuse it unless its hash is that one."""
        if sha256 and sha256_hex(json_text) != sha256:
            raise TokenizerError(f"tokenizer refused: its SHA-256 is {sha256_hex(json_text)[:16]}..., the run's is "
                                 f"{sha256[:16]}... (tampered with, or another run's)")
        try:
            tok = Tokenizer.from_str(json_text)
        except Exception as exc:   # the Rust side raises plain Exceptions on bad JSON
            raise TokenizerError(f"not a tokenizer JSON: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(tok.model, models.BPE) or not isinstance(tok.decoder, decoders.ByteLevel):
            raise TokenizerError("not a byte-level BPE tokenizer")
        return cls(tok, json_text)

    @classmethod
    def load(cls, path: str | Path, *, sha256: str = "") -> BpeTokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
        try:
            return cls.from_json(text, sha256=sha256)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temporary file, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(self.json, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Text bytes as token ids (int32); bytes that are not UTF-8 become U+FFFD first."""
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int32)

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for (a byte-level token's string has one character per byte)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tok.get_vocab().items():
            lengths[index] = len(token)
        return lengths


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (fewer when the text has no more pairs to merge)."""
    if vocab_size <= BYTE_VOCAB:
        raise ConfigError(f"train.vocab_size: a BPE needs more than the {BYTE_VOCAB} byte tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return BpeTokenizer(tok, tok.to_str())


@functools.lru_cache(maxsize=4)
def _train_on(data: str, seed: int, max_bytes: int, val_fraction: float, vocab_size: int) -> BpeTokenizer:
    text = load_text(data or None, seed, max_bytes, val_fraction).train.decode("utf-8", errors="replace")
    chunks = (text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS))
    tok = train_bpe(chunks, vocab_size)
    log.info("trained a byte-level BPE of %d tokens on %d bytes of training text (sha256 %s)",
             tok.vocab_size, len(text), tok.sha256[:16])
    return tok


def train_run_tokenizer(config: RunConfig) -> BpeTokenizer | None:
    """The BPE ``config`` asks for, trained on the run's training split; None for bytes. Once per process."""
    train = config.train
    if train.tokenizer != "bpe":
        return None
    return _train_on(train.data, config.seed, train.data_max_bytes, train.val_fraction, train.vocab_size)


def cache_name(config: RunConfig) -> str:
    return f"tokenizer-bpe-{config.train.vocab_size}.json"


def run_tokenizer(config: RunConfig, cache_dir: str | Path | None = None) -> BpeTokenizer | None:
    """The run's tokenizer: None for bytes; a BPE read from ``cache_dir`` when it holds one, else trained
    (and written there). A cached file that is not a tokenizer is refused by name."""
    if config.train.tokenizer != "bpe":
        return None
    path = Path(cache_dir) / cache_name(config) if cache_dir is not None else None
    if path is not None and path.exists():
        tok = BpeTokenizer.load(path)
        log.info("the run's BPE tokenizer from %s (%d tokens, sha256 %s)", path, tok.vocab_size, tok.sha256[:16])
        return tok
    tok = train_run_tokenizer(config)
    if path is not None and tok is not None:
        tok.save(path)
    return tok
