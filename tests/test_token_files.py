"""Token files carry their own vocabulary: with ``model.vocab_size = 0`` the model embeds a token file's
largest id + 1 (a nanoGPT ``.bin`` of GPT-2 ids: 50257), text stays at 256 bytes, and a GPT-2-style
``.bin`` trains, in one process and as a distributed run whose stage nodes never see the data."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from node_procs import LocalRun

from lowband.node.train.data import DataError, bytes_per_token, load_run_corpus
from lowband.node.train.model import model_config_for
from lowband.node.train.reference import train_reference
from lowband.protocols.config import ConfigError, ModelSection, RunConfig, apply_overrides
from lowband.protocols.vocab import bits_per_byte, resolve_vocab, token_file_vocab

GPT2_VOCAB = 50257


def _gpt2_bin(path: Path, tokens: int = 60_000) -> Path:
    """A nanoGPT-style uint16 file: a repeating 97-token phrase over GPT-2's id range (learnable)."""
    phrase = (np.arange(97, dtype=np.int64) * 7919 + 11) % GPT2_VOCAB
    phrase[0] = GPT2_VOCAB - 1   # the file's largest id is GPT-2's last
    np.resize(phrase, tokens).astype(np.uint16).tofile(path)
    return path


def test_a_token_file_sets_the_vocabulary_and_text_keeps_bytes(tmp_path: Path) -> None:
    gpt2 = _gpt2_bin(tmp_path / "train.bin", tokens=1000)
    assert token_file_vocab(gpt2) == GPT2_VOCAB
    np.save(tmp_path / "ids.npy", np.array([3, 70_000, 5], dtype=np.int32))
    assert token_file_vocab(tmp_path / "ids.npy") == 70_001
    (tmp_path / "t.txt").write_text("hello")
    assert token_file_vocab(tmp_path / "t.txt") is None
    run = apply_overrides(RunConfig(), [f"train.data={gpt2}"])
    resolved = resolve_vocab(run)
    assert resolved.model.vocab_size == GPT2_VOCAB and model_config_for(resolved.model).vocab_size == GPT2_VOCAB
    assert resolve_vocab(RunConfig()).model.vocab_size == 256
    given = apply_overrides(run, ["model.vocab_size=60000"])
    assert resolve_vocab(given).model.vocab_size == 60000
    # the ids the run trains on are the file's, not bytes
    corpus = load_run_corpus(resolved)
    assert int(corpus.train.max()) == GPT2_VOCAB - 1
    # a vocabulary too small for the file is refused by name
    with pytest.raises(DataError, match=r"model\.vocab_size"):
        load_run_corpus(dataclasses.replace(run, model=ModelSection(vocab_size=1000)))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"train\.data"):
        resolve_vocab(apply_overrides(RunConfig(), [f"train.data={tmp_path / 'bad.bin'}"]))


GPT2_RUN = ["model.stages=2", "model.seq_len=32", "train.microbatch_size=4", "train.microbatches=2",
            "train.steps=30", "train.eval_every=10", "train.eval_batches=2", "train.warmup_steps=3",
            "train.lr=0.004", "diloco.inner_steps=5", "diloco.codec=int8", "membership.heartbeat_interval_s=0.5",
            "membership.lease_s=3", "membership.sync_join_window_s=4", "membership.sync_timeout_s=8"]


@pytest.mark.slow   # a 50257-token head on CPU: tens of seconds on the 2-core machine
@pytest.mark.timeout(240)
def test_a_gpt2_bin_trains_in_one_process(tmp_path: Path) -> None:
    data = _gpt2_bin(tmp_path / "train.bin")
    config = apply_overrides(RunConfig(), [*GPT2_RUN, "train.steps=10", "train.microbatches=1", "train.eval_batches=1",
                                           "model.stages=1", f"train.data={data}"])
    summary = train_reference(config, tmp_path / "out", device="cpu", progress=False)
    assert summary["config"]["model"]["vocab_size"] == GPT2_VOCAB
    assert summary["initial_val_loss"] > 10.0   # ~ln(50257): the whole vocabulary is in play
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0, summary


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_gpt2_bin_trains_across_node_processes(tmp_path: Path, local_run: Callable[..., LocalRun]) -> None:
    data = _gpt2_bin(tmp_path / "train.bin")
    run = local_run([*GPT2_RUN, f"train.data={data}"])   # the coordinator resolves the vocabulary
    run.start_node("origin", preferred_stage=0)
    run.start_node("s1", preferred_stage=1, extra=["--no-data"])
    deadline = time.monotonic() + 200
    while any(p.poll() is None for p in run.nodes):
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.5)
    assert [p.returncode for p in run.nodes] == [0, 0], run.tail()
    evals = run.records(0, "eval")
    assert evals[0]["val_loss"] > 10.0 and evals[-1]["step"] == 30, evals
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0, evals


def test_losses_are_also_bits_per_byte_where_a_token_is_a_byte(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x\n" * 50)
    tokens = _gpt2_bin(tmp_path / "train.bin", tokens=2000)
    corpora = {name: load_run_corpus(resolve_vocab(RunConfig.from_dict({"train": {"data": str(path)}})))
               for name, path in (("text", text), ("tokens", tokens))}
    batches = [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))]
    per_token = {name: bytes_per_token(corpus, batches) for name, corpus in corpora.items()}
    assert per_token["text"] == 1.0
    assert bits_per_byte(math.log(2) * 1.5, per_token["text"]) == pytest.approx(1.5)
    # a token file's bytes per token belong to its tokenizer, which the file does not carry
    assert per_token["tokens"] is None and bits_per_byte(2.0, per_token["tokens"]) is None
    assert bits_per_byte(None, 1.0) is None and bits_per_byte(float("nan"), 1.0) is None
