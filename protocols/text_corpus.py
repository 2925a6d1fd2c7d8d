"""The text a run trains on, as bytes: the default corpus, a text file or a folder of them.

Here rather than in ``node/train/data.py`` because two sides read it: origins (which turn it into
token ids) and the coordinator, which trains a run's BPE tokenizer on the training split
(``protocols/tokenizer.py``) before any node joins. Both must cut the same split, so there is one
reader. Token files (``.bin``, ``.npy``) are not text: ``node/train/data.py`` reads those.

Default corpus: the Python standard library's own ``.py`` files, present on every machine with no
download. Files are listed in sorted order, shuffled with the run seed, split into train/validation
*by file*, and read until a byte cap. A single text file keeps its last ``val_fraction`` of bytes
for validation. Anything missing, empty or unreadable raises ``DataError`` saying what to fix.
"""

from __future__ import annotations

import logging
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """The training data cannot be used (missing, empty, unreadable, out of vocabulary)."""


@dataclass(frozen=True, slots=True)
class TextSplit:
    """A text corpus cut into its training and validation bytes."""

    train: bytes
    val: bytes
    source: str   # what was loaded, for logs and summaries


def load_text(path: str | Path | None, seed: int, max_bytes: int, val_fraction: float) -> TextSplit:
    """The default corpus (``path`` None or empty), a text file or a directory, as bytes.

    ``max_bytes`` caps the bytes kept (0 = no cap).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes < 0:
        raise DataError(f"max_bytes must be >= 0 (0 = no cap), got {max_bytes}")
    if path is None or str(path) == "":
        return _stdlib_text(seed, max_bytes, val_fraction)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        return _directory_text(path, max_bytes, val_fraction)
    data = read_bytes(path)
    if not data:
        raise DataError(f"data file is empty: {path}")
    return split_tail(data[:max_bytes] if max_bytes else data, val_fraction, str(path))


def _stdlib_text(seed: int, max_bytes: int, val_fraction: float) -> TextSplit:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    random.Random(seed).shuffle(files)
    if not files:
        raise DataError(f"no .py files found in the standard library at {root}; pass --data PATH")
    text = _split_files(files, max_bytes, val_fraction, f"python-stdlib:{root}", skip_errors=True)
    log.info("default corpus: %d train / %d val bytes from %s", len(text.train), len(text.val), root)
    return text


def _directory_text(root: Path, max_bytes: int, val_fraction: float) -> TextSplit:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"data directory has no files: {root}")
    return _split_files(files, max_bytes, val_fraction, str(root), skip_errors=False)


def _split_files(files: list[Path], max_bytes: int, val_fraction: float, source: str, *,
                 skip_errors: bool) -> TextSplit:
    """Every k-th file goes to validation (k = 1/val_fraction) until each side reaches its share of the cap."""
    every = max(2, round(1 / val_fraction))
    cap = max_bytes or float("inf")
    val_cap, train_cap = cap * val_fraction, cap * (1 - val_fraction)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    train_bytes = val_bytes = 0
    skipped = accepted = 0
    for file in files:
        to_val = accepted % every == 0 and len(files) > 1
        if (to_val and val_bytes >= val_cap) or (not to_val and train_bytes >= train_cap):
            if train_bytes >= train_cap and val_bytes >= val_cap:
                break
            continue
        try:
            data = read_bytes(file)
        except DataError:
            if skip_errors:
                skipped += 1
                continue
            raise
        if not data or b"\x00" in data[:8192]:   # empty or binary: not text
            skipped += 1
            continue
        accepted += 1
        if to_val:
            data = data[: int(val_cap - val_bytes)] if max_bytes else data
            val_parts.append(data)
            val_bytes += len(data)
        else:
            data = data[: int(train_cap - train_bytes)] if max_bytes else data
            train_parts.append(data)
            train_bytes += len(data)
    if skipped:
        log.info("skipped %d empty, binary or unreadable files under %s", skipped, source)
    if not train_parts and not val_parts:
        raise DataError(f"no readable, non-empty text files in {source}")
    if not train_parts or not val_parts:
        # Too few files to split by file: fall back to a split by bytes.
        return split_tail(b"".join(train_parts + val_parts), val_fraction, source)
    return TextSplit(b"".join(train_parts), b"".join(val_parts), source)


def split_tail(data: bytes, val_fraction: float, source: str) -> TextSplit:
    """The last ``val_fraction`` of ``data`` for validation, the rest for training."""
    n_val = max(1, int(len(data) * val_fraction))
    if len(data) - n_val < 2:
        raise DataError(f"{source}: only {len(data)} tokens, too few to split into train and validation")
    return TextSplit(data[:-n_val], data[-n_val:], source)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
