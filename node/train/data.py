"""Data: a byte tokenizer, the corpus (default or user-supplied), and batch iterators.

Default corpus: the Python standard library's own ``.py`` files, present on
every machine with no download. Files are listed in sorted order, shuffled with
the run seed, split into train/validation *by file*, and read until a byte cap
(8 MiB by default) so loading stays well under a second. Machines with a
different Python version see a different standard library; use ``--data`` when
nodes must train on identical bytes across versions.

User data (``path``):
- a text file, or a directory of text files (read recursively in sorted order,
  hidden entries skipped, files that look binary skipped; ``protocols/text_corpus.py``): bytes
  are tokens, or a byte-level BPE's ids (``train.tokenizer = "bpe"``, ``protocols/tokenizer.py``);
- ``NAME.bin``: raw little-endian **uint16** token ids (the nanoGPT format);
  ``NAME.u8.bin``: raw **uint8** token ids;
- ``NAME.npy``: a 1-D integer array of token ids.
Token files are read through a numpy memmap. Every id must lie in
``[0, vocab_size)``. Text and token files are split train/validation by
keeping the last ``val_fraction`` of tokens for validation; directories split
by file.

Anything missing, empty, unreadable or out of vocabulary raises ``DataError``
with a message that says what to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowband.protocols.config import TOKEN_FILE_SUFFIXES, RunConfig
from lowband.protocols.text_corpus import DataError, load_text
from lowband.protocols.tokenizer import BpeTokenizer, train_run_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 20
DEFAULT_VAL_FRACTION = 0.05

__all__ = ["BatchIterator", "ByteTokenizer", "Corpus", "DataError", "bytes_per_token", "load_corpus",
           "load_run_corpus", "origin_batches", "run_val_batches", "split_microbatches", "val_batches"]


class ByteTokenizer:
    """UTF-8 bytes are the tokens: vocabulary 256, no training, no files."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(int(v) for v in values).decode("utf-8", errors="replace")


@dataclass(slots=True)
class Corpus:
    train: torch.Tensor   # 1-D token ids (uint8 when vocab_size <= 256)
    val: torch.Tensor
    source: str           # what was loaded, for logs and summaries
    tokenizer: BpeTokenizer | None = None   # the BPE that encoded text (None: bytes, or a token file)
    is_text: bool = True                    # False: ids from a token file

    def train_shard(self, origin_index: int, num_origins: int) -> torch.Tensor:
        """The contiguous slice of ``train`` owned by one origin; shards are disjoint and cover it."""
        if num_origins < 1 or not 0 <= origin_index < num_origins:
            raise DataError(f"origin index {origin_index} out of range for {num_origins} origins")
        n = self.train.numel()
        return self.train[origin_index * n // num_origins : (origin_index + 1) * n // num_origins]


# ---------------------------------------------------------------------------
# Loading


def load_corpus(
    path: str | Path | None = None,
    seed: int = 0,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    vocab_size: int = 256,
    tokenizer: BpeTokenizer | None = None,
) -> Corpus:
    """Load the default corpus (``path`` None or empty) or the user's data.

    ``max_bytes`` caps the tokens kept from any source (0 = no cap; of text, the bytes before a
    ``tokenizer`` encodes them). Text is read as bytes, or encoded with ``tokenizer`` (a BPE), each
    split on its own so that no token straddles train and validation.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes < 0:
        raise DataError(f"max_bytes must be >= 0 (0 = no cap), got {max_bytes}")
    if path is not None and str(path) != "":
        path = Path(path).expanduser()
        name = path.name.lower()
        if path.is_file() and name.endswith(TOKEN_FILE_SUFFIXES) and tokenizer is not None:
            raise DataError(f"{path} is a token file (already tokenized): it cannot be encoded with a BPE "
                            "(set train.tokenizer = 'bytes')")
        if path.is_file() and name.endswith(".u8.bin"):
            return _split_tail(_token_file(path, np.uint8, vocab_size, max_bytes), val_fraction, str(path))
        if path.is_file() and name.endswith(".bin"):
            return _split_tail(_token_file(path, np.uint16, vocab_size, max_bytes), val_fraction, str(path))
        if path.is_file() and name.endswith(".npy"):
            return _split_tail(_npy_file(path, vocab_size, max_bytes), val_fraction, str(path))
    text = load_text(path, seed, max_bytes, val_fraction)
    if tokenizer is None:
        return Corpus(_bytes_tensor(text.train), _bytes_tensor(text.val), text.source)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"the BPE tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                        f"{vocab_size} (set model.vocab_size = 0 to take the tokenizer's)")
    train, val = (torch.from_numpy(tokenizer.encode_bytes(part)) for part in (text.train, text.val))
    log.info("%s: %d train / %d val BPE tokens (%.2f bytes a token)", text.source, train.numel(), val.numel(),
             len(text.train) / max(1, train.numel()))
    return Corpus(train, val, text.source, tokenizer)


def _split_tail(tokens: torch.Tensor, val_fraction: float, source: str) -> Corpus:
    n_val = max(1, int(tokens.numel() * val_fraction))
    if tokens.numel() - n_val < 2:
        raise DataError(f"{source}: only {tokens.numel()} tokens, too few to split into train and validation")
    return Corpus(tokens[:-n_val].clone(), tokens[-n_val:].clone(), source, is_text=False)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _token_file(path: Path, dtype: Any, vocab_size: int, max_tokens: int) -> torch.Tensor:
    itemsize = np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise DataError(f"token file is empty: {path}")
    if size % itemsize:
        raise DataError(
            f"token file {path} has {size} bytes, not a multiple of {itemsize}: "
            f"'.bin' holds uint16 ids, '.u8.bin' holds uint8 ids"
        )
    try:
        ids = np.memmap(path, dtype=dtype, mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read token file {path}: {exc}") from exc
    return _checked_ids(ids, path, vocab_size, max_tokens)


def _npy_file(path: Path, vocab_size: int, max_tokens: int) -> torch.Tensor:
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read .npy token file {path}: {exc}") from exc
    if not isinstance(ids, np.ndarray) or ids.ndim != 1:
        raise DataError(f".npy token file {path} must hold a 1-D array, got shape {getattr(ids, 'shape', None)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f".npy token file {path} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size == 0:
        raise DataError(f".npy token file is empty: {path}")
    return _checked_ids(ids, path, vocab_size, max_tokens)


def _checked_ids(ids: np.ndarray, path: Path, vocab_size: int, max_tokens: int) -> torch.Tensor:
    if max_tokens:
        ids = ids[:max_tokens]
    chunk = 1 << 24
    for start in range(0, ids.size, chunk):   # bounded memory over huge memmaps
        part = ids[start : start + chunk]
        lo, hi = int(part.min()), int(part.max())
        if lo < 0 or hi >= vocab_size:
            raise DataError(
                f"token file {path} holds id {hi if hi >= vocab_size else lo}, outside the vocabulary "
                f"[0, {vocab_size}) of the model (set model.vocab_size, or 0 to take the file's own)"
            )
    out_dtype = np.uint8 if vocab_size <= 256 else np.int32
    return torch.from_numpy(np.array(ids, dtype=out_dtype, copy=True))   # copy: never alias the file


# ---------------------------------------------------------------------------
# Batches


class BatchIterator:
    """Endless, deterministic random windows of ``seq_len + 1`` tokens -> (inputs, targets) int64 [B, T].

    The same (tokens, batch_size, seq_len, seed) always yields the same batches;
    ``state_dict``/``load_state_dict`` resume the stream exactly.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.ndim != 1:
            raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if tokens.numel() < seq_len + 1:
            raise DataError(f"only {tokens.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.tokens.numel() - self.seq_len   # exclusive bound for a window start
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets].long()   # (B, T+1)
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.batches_drawn = int(state["batches_drawn"])


def val_batches(corpus: Corpus, batch_size: int, seq_len: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed validation batches: windows evenly spaced over the validation split."""
    val = corpus.val
    if val.numel() < seq_len + 1:
        raise DataError(f"validation split has {val.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}")
    starts = torch.linspace(0, val.numel() - seq_len - 1, n * batch_size).long()
    windows = val[starts[:, None] + torch.arange(seq_len + 1)].long()   # (n*B, T+1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


# ---------------------------------------------------------------------------
# The run's data order, shared by the reference trainer and every origin


def load_run_corpus(config: RunConfig, tokenizer: BpeTokenizer | None = None) -> Corpus:
    """The corpus every process of a run loads: ``train.data`` (or the default) with the run seed.

    A BPE run encodes it with ``tokenizer`` (nodes: the coordinator's); without one, this process
    trains the run's tokenizer itself (the single-process trainers, which have no coordinator)."""
    train = config.train
    if train.tokenizer == "bpe" and tokenizer is None:
        tokenizer = train_run_tokenizer(config)
    return load_corpus(
        train.data or None, seed=config.seed, max_bytes=train.data_max_bytes, val_fraction=train.val_fraction,
        vocab_size=config.model.vocab_size or (tokenizer.vocab_size if tokenizer else ByteTokenizer.vocab_size),
        tokenizer=tokenizer,
    )


def bytes_per_token(corpus: Corpus, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Bytes of text per target token of ``batches``: what turns their loss into bits per byte.

    1 where a token is a byte, the BPE's exact mean over those targets, None for a token file (its
    tokenizer is not known here)."""
    if corpus.tokenizer is None:
        return 1.0 if corpus.is_text else None
    lengths = torch.from_numpy(corpus.tokenizer.token_bytes)
    targets = torch.cat([y.reshape(-1) for _, y in batches]) if batches else torch.empty(0, dtype=torch.long)
    return float(lengths[targets].double().mean()) if targets.numel() else None


def origin_batches(config: RunConfig, corpus: Corpus, origin_index: int, num_origins: int) -> BatchIterator:
    """The iteration batches of one origin (stage-0 node).

    Each iteration draws one batch of ``train.microbatches * train.microbatch_size``
    sequences of ``model.seq_len`` tokens from
    ``BatchIterator(corpus.train_shard(origin_index, num_origins), ..., seed=config.seed + origin_index)``;
    microbatch j is rows ``[j * microbatch_size, (j + 1) * microbatch_size)``
    (see ``split_microbatches``). The single-process reference is origin 0 of 1.
    """
    train = config.train
    return BatchIterator(
        corpus.train_shard(origin_index, num_origins),
        batch_size=train.microbatches * train.microbatch_size,
        seq_len=config.model.seq_len,
        seed=config.seed + origin_index,
    )


def split_microbatches(
    inputs: torch.Tensor, targets: torch.Tensor, microbatch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut an iteration batch into its microbatches, in order."""
    return list(zip(inputs.split(microbatch_size), targets.split(microbatch_size), strict=True))


def run_val_batches(config: RunConfig, corpus: Corpus) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's fixed validation set: ``train.eval_batches`` batches of one iteration's size."""
    train = config.train
    return val_batches(corpus, train.microbatches * train.microbatch_size, config.model.seq_len, train.eval_batches)
