"""Tokenizer, corpus loading (default and user data), shards and batch iterators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowband.node.train.data import (
    BatchIterator,
    ByteTokenizer,
    Corpus,
    DataError,
    load_corpus,
    load_run_corpus,
    origin_batches,
    split_microbatches,
    val_batches,
)
from lowband.protocols.config import RunConfig, apply_overrides

torch.set_num_threads(1)

TEXT = "def f(x):\n    return x * 2  # héllo\n" * 200


def test_byte_tokenizer_roundtrip() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == torch.uint8 and ids.numel() == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode([104, 105]) == "hi"


def test_default_corpus_deterministic_and_split_by_seed() -> None:
    a, b = load_corpus(seed=0, max_bytes=1 << 20), load_corpus(seed=0, max_bytes=1 << 20)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.dtype == torch.uint8 and a.train.ndim == 1
    assert a.train.numel() + a.val.numel() <= 1 << 20
    assert a.val.numel() > 10_000 and a.train.numel() > 20 * a.val.numel() / 2
    assert b"import" in bytes(a.train[:200_000].tolist())
    c = load_corpus(seed=1, max_bytes=1 << 20)
    assert not torch.equal(a.train[:10_000], c.train[:10_000])
    # Held out by file: a validation window of 200 bytes should not appear in train.
    window = bytes(a.val[5000:5200].tolist())
    assert window not in bytes(a.train.tolist())


def test_train_shards_disjoint_cover_and_deterministic() -> None:
    corpus = Corpus(torch.arange(1000) % 256, torch.arange(100) % 256, "test")
    corpus.train = torch.arange(1000)
    shards = [corpus.train_shard(i, 3) for i in range(3)]
    assert torch.equal(torch.cat(shards), corpus.train)
    assert all(s.numel() in (333, 334) for s in shards)
    assert torch.equal(corpus.train_shard(1, 3), shards[1])
    with pytest.raises(DataError, match="out of range"):
        corpus.train_shard(3, 3)


def test_batch_iterator_deterministic_windows() -> None:
    tokens = torch.arange(500, dtype=torch.int64)
    a, b = BatchIterator(tokens, 4, 16, seed=5), BatchIterator(tokens, 4, 16, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (4, 16) and xa.dtype == torch.int64
    assert torch.equal(ya, xa + 1)   # targets are the inputs shifted by one (arange data)
    other = next(BatchIterator(tokens, 4, 16, seed=6))[0]
    first = next(BatchIterator(tokens, 4, 16, seed=5))[0]
    assert not torch.equal(other, first)
    state = a.state_dict()
    after = next(a)
    b2 = BatchIterator(tokens, 4, 16, seed=0)
    b2.load_state_dict(state)
    assert torch.equal(next(b2)[0], after[0])
    with pytest.raises(DataError, match="seq_len"):
        BatchIterator(torch.arange(10), 2, 10, seed=0)


def test_val_batches_fixed() -> None:
    corpus = Corpus(torch.arange(300) % 256, (torch.arange(1000) % 256).to(torch.uint8), "t")
    a, b = val_batches(corpus, 2, 8, 3), val_batches(corpus, 2, 8, 3)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert a[0][0].shape == (2, 8) and a[0][0].dtype == torch.int64


def test_origin_batches_match_reference_with_one_microbatch() -> None:
    cfg = apply_overrides(RunConfig(), ["train.microbatches=1", "train.microbatch_size=4", "model.seq_len=32",
                                        "train.data_max_bytes=200000"])
    corpus = load_run_corpus(cfg)
    ref = BatchIterator(corpus.train_shard(0, 1), 4, 32, seed=cfg.seed)
    origin = origin_batches(cfg, corpus, 0, 1)
    for _ in range(3):
        assert torch.equal(next(ref)[0], next(origin)[0])
    cfg2 = apply_overrides(cfg, ["train.microbatches=2", "train.microbatch_size=2"])
    x, y = next(origin_batches(cfg2, corpus, 0, 1))
    micro = split_microbatches(x, y, 2)
    assert len(micro) == 2 and torch.equal(micro[1][0], x[2:4])
    other = next(origin_batches(cfg2, corpus, 1, 2))[0]
    assert other.shape == (4, 32)


# --- user data -------------------------------------------------------------


def test_user_text_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    corpus = load_corpus(path, val_fraction=0.1)
    data = TEXT.encode()
    assert bytes((torch.cat([corpus.train, corpus.val])).tolist()) == data
    assert corpus.val.numel() == int(len(data) * 0.1)


def test_user_directory_split_by_file(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}\n" * 50)
    (tmp_path / ".hidden").write_text("SECRET" * 100)
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01" * 100)
    corpus = load_corpus(tmp_path, val_fraction=0.2)
    train, val = bytes(corpus.train.tolist()), bytes(corpus.val.tolist())
    assert b"SECRET" not in train + val and b"\x00" not in train + val
    assert b"file 0\n" in val and b"file 0\n" not in train
    assert len(train) + len(val) == 10 * len(b"file 0\n") * 50


def test_user_token_files(tmp_path: Path) -> None:
    ids = np.arange(2000) % 256
    ids.astype("<u2").tofile(tmp_path / "t.bin")
    ids.astype(np.uint8).tofile(tmp_path / "t.u8.bin")
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    for name in ("t.bin", "t.u8.bin", "t.npy"):
        corpus = load_corpus(tmp_path / name, val_fraction=0.1)
        assert torch.equal(torch.cat([corpus.train, corpus.val]).long(), torch.from_numpy(ids).long()), name
        assert corpus.val.numel() == 200


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.txt", "not found"),
        (lambda d: ((d / "e.txt").write_text("") and None) or d / "e.txt", "empty"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no files"),
        (lambda d: np.save(d / "f.npy", np.ones(10, dtype=np.float32)) or d / "f.npy", "integer"),
        (lambda d: np.save(d / "o.npy", np.array([1, 2, 300])) or d / "o.npy", "id 300, outside the vocabulary"),
        (lambda d: np.save(d / "n.npy", np.array([1, -2, 3])) or d / "n.npy", "id -2"),
        (lambda d: np.save(d / "m.npy", np.ones((2, 3), dtype=np.int64)) or d / "m.npy", "1-D"),
        (lambda d: ((d / "odd.bin").write_bytes(b"\x01\x02\x03") and None) or d / "odd.bin", "multiple of 2"),
        (lambda d: ((d / "big.bin").write_bytes(np.array([5, 1000], dtype="<u2").tobytes()) and None)
         or d / "big.bin", "id 1000"),
        (lambda d: ((d / "e.npy").write_bytes(b"not numpy") and None) or d / "e.npy", "cannot read"),
    ],
    ids=["missing", "empty-file", "empty-dir", "npy-float", "npy-too-big", "npy-negative", "npy-2d",
         "bin-odd-size", "bin-too-big", "npy-corrupt"],
)
def test_bad_data_paths_raise_data_error(tmp_path: Path, setup, message: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_corpus(path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("x" * 100)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)   # chmod 0 does not stop root, which runs CI here
    with pytest.raises(DataError, match=r"cannot read data file .*Permission denied"):
        load_corpus(path)
