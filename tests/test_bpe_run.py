"""A BPE run across node processes: the coordinator trains the tokenizer once into its run directory, and
every origin encodes its data with exactly that one (the same SHA-256), fetched at join or read from its
--state-dir, whose edited copy is replaced; the run trains, in nats and in bits per byte, and a live
export carries the tokenizer, so the model writes text."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from node_procs import TOKEN, LocalRun

from lowband.coordinator.export import ExportFailed, export_live
from lowband.node.tokenizer_cache import TOKENIZER_FILE
from lowband.node.train.export import load_model
from lowband.protocols.tokenizer import BpeTokenizer, sha256_hex
from lowband.sim.generate import generate_text

TEXT = "".join(f"def handler_{i % 11}(request, value):\n    total = request.value + value * {i % 7}\n"
               f"    return total - {i % 3}\n\n" for i in range(3000))

RUN = ["model.stages=2", "model.seq_len=32", "train.microbatch_size=4", "train.microbatches=2", "train.steps=40",
       "train.eval_every=10", "train.eval_batches=2", "train.warmup_steps=3", "train.lr=0.004",
       "train.tokenizer=bpe", "train.vocab_size=512", "diloco.inner_steps=5", "diloco.codec=int8",
       "membership.heartbeat_interval_s=0.5", "membership.lease_s=3", "membership.sync_join_window_s=4",
       "membership.sync_timeout_s=8"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_origin_encodes_with_the_coordinators_tokenizer(tmp_path: Path,
                                                              local_run: Callable[..., LocalRun]) -> None:
    data = tmp_path / "code.txt"
    data.write_text(TEXT)
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    state_b.mkdir()
    (state_b / TOKENIZER_FILE).write_text('{"edited": true}')   # a cache that is not the run's tokenizer
    run = local_run([*RUN, f"train.data={data}"])
    cached = sorted((tmp_path / "run").glob("tokenizer-bpe-*.json"))
    assert [p.name for p in cached] == ["tokenizer-bpe-512.json"]   # trained at start, in the run directory
    tokenizer = BpeTokenizer.load(cached[0])
    run.start_node("origin-a", preferred_stage=0, extra=["--state-dir", str(state_a)])
    run.start_node("origin-b", preferred_stage=0, extra=["--state-dir", str(state_b)])
    run.start_node("s1", preferred_stage=1, extra=["--no-data"])
    deadline = time.monotonic() + 240
    exported: Path | None = None
    while any(p.poll() is None for p in run.nodes):
        assert time.monotonic() < deadline, run.tail()
        if exported is None and any(r["step"] >= 10 for r in run.records(0, "eval")):
            # the live run's model, as `lowband-coordinator export` writes it: with the run's tokenizer
            try:
                exported = asyncio.run(export_live(run.address, TOKEN, tmp_path / "live.pt")).path
            except ExportFailed:   # a stage between replicas for a moment: try again while the run goes on
                pass
        time.sleep(0.5)
    assert [p.returncode for p in run.nodes] == [0, 0, 0], run.tail()
    for index, state in ((0, state_a), (1, state_b)):
        (loaded,) = run.records(index, "data")
        assert loaded["tokenizer"] == tokenizer.sha256, loaded   # the coordinator's, on every origin
        assert loaded["bytes_per_token"] > 2.0, loaded
        assert sha256_hex((state / TOKENIZER_FILE).read_text()) == tokenizer.sha256   # kept, the edit replaced
        evals = run.records(index, "eval")
        assert evals[-1]["step"] == 40 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
        last = evals[-1]
        assert last["val_bits_per_byte"] == pytest.approx(
            last["val_loss"] / math.log(2) / loaded["bytes_per_token"], rel=1e-6)
    assert not run.records(2, "data")   # a stage node never loads data
    assert exported is not None, "no live export succeeded while the run trained"
    model = load_model(exported)
    assert model.tokenizer is not None and model.tokenizer.sha256 == tokenizer.sha256
    assert model.config.vocab_size == tokenizer.vocab_size
    assert generate_text(model, "def handler_", tokens=20, temperature=0.0, top_k=0)
