"""The vocabulary a run's model embeds, when ``model.vocab_size = 0`` leaves it to the data.

Text (the default corpus, a text file, a folder) is read as UTF-8 bytes: 256 ids. A token file
carries its own vocabulary: a nanoGPT ``.bin`` of GPT-2 ids needs 50257, a ``.npy`` whatever its
tokenizer had. Nodes without the data (every stage but the origins) must build the same embedding,
so the size is resolved once where the run starts (the coordinator, the single-process trainers)
and travels in the run config. Only the file's largest id is read, through a memory map. A BPE
(``train.tokenizer = "bpe"``) has the size its training reached (``train.vocab_size`` at most).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from lowband.protocols.config import BYTE_VOCAB, TOKEN_FILE_SUFFIXES, ConfigError, RunConfig, is_token_file
from lowband.protocols.tokenizer import BpeTokenizer, train_run_tokenizer

log = logging.getLogger(__name__)

_CHUNK = 1 << 24   # ids scanned at a time: bounded memory over a file of billions of tokens

__all__ = ["BYTE_VOCAB", "TOKEN_FILE_SUFFIXES", "bits_per_byte", "is_token_file", "resolve_vocab",
           "token_file_vocab"]


def bits_per_byte(loss_nats: float | None, bytes_per_token: float | None) -> float | None:
    """A loss in nats per token as bits per byte of text, so runs of other tokenizers compare.

    ``bytes_per_token``: 1 where text is read as bytes; a BPE's mean over the tokens the loss was taken
    on (``node/train/data.py`` ``bytes_per_token``). A token file's bytes per token are its tokenizer's,
    which the file does not carry: None, and so is the answer.
    """
    if loss_nats is None or not math.isfinite(loss_nats) or not bytes_per_token or bytes_per_token <= 0:
        return None
    return loss_nats / math.log(2) / bytes_per_token


def token_file_vocab(path: str | Path) -> int | None:
    """Largest id + 1 of a token file (``.bin`` uint16, ``.u8.bin`` uint8, ``.npy``); None for text."""
    p = Path(path).expanduser()
    name = p.name.lower()
    try:
        if name.endswith(".u8.bin"):
            ids = np.memmap(p, dtype=np.uint8, mode="r")
        elif name.endswith(".bin"):
            ids = np.memmap(p, dtype=np.uint16, mode="r")
        elif name.endswith(".npy"):
            ids = np.load(p, mmap_mode="r", allow_pickle=False)
        else:
            return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.data: cannot read token file {p}: {exc}") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"train.data: {p} must hold a non-empty 1-D array of integer token ids")
    top = max(int(ids[i : i + _CHUNK].max()) for i in range(0, ids.size, _CHUNK))
    return top + 1


def resolve_vocab(config: RunConfig, tokenizer: BpeTokenizer | None = None) -> RunConfig:
    """``config`` with ``model.vocab_size`` set: as given, else the data's own (see the module doc).

    A BPE run's size is its tokenizer's (``tokenizer``, else the one ``config`` trains); a
    ``model.vocab_size`` below it is refused."""
    if config.train.tokenizer == "bpe":
        tokenizer = tokenizer or train_run_tokenizer(config)
        assert tokenizer is not None
        if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size: {config.model.vocab_size} is below the BPE tokenizer's "
                              f"{tokenizer.vocab_size} tokens (set 0 to take the tokenizer's)")
        vocab = config.model.vocab_size or tokenizer.vocab_size
        return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    if config.model.vocab_size:
        return config
    vocab = token_file_vocab(config.train.data) if config.train.data else None
    if vocab is None or vocab <= BYTE_VOCAB:
        vocab = BYTE_VOCAB   # bytes, or token ids that fit the byte vocabulary (a .u8.bin)
    else:
        log.info("model.vocab_size = %d: the largest id of %s + 1", vocab, config.train.data)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
