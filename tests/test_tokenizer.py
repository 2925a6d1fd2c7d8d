"""BPE tokenizers (``train.tokenizer = "bpe"``): trained deterministically on the run's training split,
shared by the coordinator under their SHA-256 (a node refuses any other), carried by model files so
``generate`` writes text, and losses reported in bits per byte with the real bytes per token."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lowband.coordinator.core import Coordinator
from lowband.coordinator.server import start_coordinator
from lowband.coordinator.store import Store
from lowband.node.recovery.local_state import StageState, write_state
from lowband.node.tokenizer_cache import TOKENIZER_FILE, cached_sha256, tokenizer_from_join
from lowband.node.train.data import bytes_per_token, load_run_corpus, run_val_batches
from lowband.node.train.export import ExportError, export_model, load_model
from lowband.node.train.model import build_stage, model_config_for
from lowband.node.train.reference import train_reference
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.text_corpus import load_text
from lowband.protocols.tokenizer import (
    BpeTokenizer,
    TokenizerError,
    run_tokenizer,
    sha256_hex,
    train_bpe,
    train_run_tokenizer,
)
from lowband.protocols.vocab import bits_per_byte, resolve_vocab
from lowband.sim.cli import main as sim_main
from lowband.sim.generate import generate_text
from lowband.sim.model_out import COORDINATOR_DIR, node_state_dir, run_sample, write_run_model
from lowband.sim.skiptrain import train_skip

torch.set_num_threads(1)

TEXT = "".join(f"def handler_{i % 7}(request, value):\n    return request.value + value * {i % 5}\n\n"
               for i in range(400))


def _bpe_config(data: Path, vocab: int = 400, *extra: str) -> RunConfig:
    return apply_overrides(RunConfig(), ["train.tokenizer=bpe", f"train.vocab_size={vocab}", f"train.data={data}",
                                         "model.stages=2", "model.seq_len=32", *extra])


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "code.txt"
    path.write_text(TEXT)
    return path


def test_training_is_deterministic_and_round_trips_any_text() -> None:
    chunks = [TEXT[i : i + 500] for i in range(0, len(TEXT), 500)]
    a, b = train_bpe(chunks, 400), train_bpe(list(chunks), 400)
    assert a.json == b.json and a.sha256 == b.sha256
    assert 256 < a.vocab_size <= 400
    assert train_bpe(chunks, 300).sha256 != a.sha256   # another size, another tokenizer
    ids = a.encode(TEXT[:2000])
    assert len(ids) < 2000 / 2   # merges learnt: far fewer tokens than bytes
    odd = "héllo wörld ✓\n\tdef f(x):\x00 return 2 # 日本"
    assert a.decode(a.encode(odd)) == odd   # byte-level: nothing is unknown
    assert int(a.token_bytes[a.encode("return")].sum()) == len(b"return")


def test_a_tokenizer_whose_hash_is_not_the_runs_is_refused() -> None:
    tok = train_bpe([TEXT], 300)
    assert BpeTokenizer.from_json(tok.json, sha256=tok.sha256).sha256 == tok.sha256
    tampered = tok.json.replace('"return"', '"retur"', 1) if '"return"' in tok.json else tok.json + " "
    with pytest.raises(TokenizerError, match="tampered"):
        BpeTokenizer.from_json(tampered, sha256=tok.sha256)
    with pytest.raises(TokenizerError, match="not a tokenizer JSON"):
        BpeTokenizer.from_json("{not json")


def test_config_keys_are_coherent_and_bad_settings_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.vocab_size.*\[257, 65536\]"):
        apply_overrides(RunConfig(), ["train.tokenizer=bpe"])
    with pytest.raises(ConfigError, match=r"train\.vocab_size"):
        apply_overrides(RunConfig(), ["train.tokenizer=bpe", "train.vocab_size=256"])
    with pytest.raises(ConfigError, match=r"train\.vocab_size: sets the size of a BPE"):
        apply_overrides(RunConfig(), ["train.vocab_size=1000"])
    with pytest.raises(ConfigError, match=r"train\.tokenizer: must be one of"):
        apply_overrides(RunConfig(), ["train.tokenizer=wordpiece"])
    with pytest.raises(ConfigError, match=r"token file \(already tokenized\)"):
        apply_overrides(RunConfig(), ["train.tokenizer=bpe", "train.vocab_size=1000", f"train.data={tmp_path}/x.bin"])


def test_the_run_trains_it_on_its_training_split_and_caches_it(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file)
    tok = run_tokenizer(config, tmp_path / "run")
    assert tok is not None and (tmp_path / "run" / f"tokenizer-bpe-{400}.json").read_text() == tok.json
    assert run_tokenizer(config, tmp_path / "run").sha256 == tok.sha256   # read back from the cache
    assert train_run_tokenizer(config).sha256 == tok.sha256
    assert run_tokenizer(RunConfig()) is None
    resolved = resolve_vocab(config, tok)
    assert resolved.model.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 257 is below"):
        resolve_vocab(apply_overrides(config, ["model.vocab_size=257"]), tok)
    corpus = load_run_corpus(resolved, tok)
    split = load_text(str(text_file), config.seed, config.train.data_max_bytes, config.train.val_fraction)
    assert tok.decode(corpus.train.tolist()) == split.train.decode() and tok.decode(corpus.val.tolist()) == split.val.decode()
    assert int(corpus.train.max()) < tok.vocab_size
    val = run_val_batches(resolved, corpus)
    per_token = bytes_per_token(corpus, val)
    targets = torch.cat([y.reshape(-1) for _, y in val]).tolist()
    assert per_token == pytest.approx(len(tok.decode(targets).encode()) / len(targets), rel=0.02)
    assert per_token > 2.0
    assert bits_per_byte(3.0, per_token) == pytest.approx(3.0 / math.log(2) / per_token)


def test_the_coordinator_shares_it_at_join_and_refuses_a_changed_one(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file)
    tok = run_tokenizer(config, tmp_path / "run")
    config = resolve_vocab(config, tok)
    with pytest.raises(ConfigError, match="needs the run's tokenizer"):
        Coordinator(config)
    core = Coordinator(config, Store(tmp_path / "run"), tokenizer=tok)
    base = {"address": "127.0.0.1:1", "device": "cpu", "throughput": 10.0, "version": "t", "stage": -1,
            "preferred_stage": -1}
    first = core.join(pb.JoinRequest(**base, has_data=True))
    assert first.tokenizer_sha256 == tok.sha256 and first.tokenizer_json == tok.json
    cached = core.join(pb.JoinRequest(**base, has_data=True, tokenizer_sha256=tok.sha256))
    assert cached.tokenizer_sha256 == tok.sha256 and cached.tokenizer_json == ""   # it holds it already
    stage_only = core.join(pb.JoinRequest(**base, has_data=False))
    assert stage_only.tokenizer_sha256 == tok.sha256 and stage_only.tokenizer_json == ""   # never an origin
    assert core.status(pb.StatusRequest(tokenizer=True)).tokenizer_json == tok.json
    core.close()
    # the cached file changed under the run directory: a restart refuses it, naming what to do
    other = train_bpe([TEXT[:3000]], 300)
    with pytest.raises(ConfigError, match="tokenizer file was changed"):
        Coordinator(config, Store(tmp_path / "run"), tokenizer=other)


def test_a_node_verifies_the_tokenizer_and_keeps_it(tmp_path: Path) -> None:
    tok = train_bpe([TEXT], 300)
    state = tmp_path / "state"
    state.mkdir()
    assert cached_sha256(str(state)) == ""
    got = tokenizer_from_join(pb.JoinReply(tokenizer_sha256=tok.sha256, tokenizer_json=tok.json), str(state),
                              has_data=True)
    assert got is not None and got.sha256 == tok.sha256 and cached_sha256(str(state)) == tok.sha256
    again = tokenizer_from_join(pb.JoinReply(tokenizer_sha256=tok.sha256), str(state), has_data=True)
    assert again is not None and again.json == tok.json   # from its cache, no JSON sent
    assert tokenizer_from_join(pb.JoinReply(tokenizer_sha256=tok.sha256), str(state), has_data=False) is None
    assert tokenizer_from_join(pb.JoinReply(), str(state), has_data=True) is None   # a byte-level run
    with pytest.raises(TokenizerError, match="tampered"):   # JSON that is not the named tokenizer
        tokenizer_from_join(pb.JoinReply(tokenizer_sha256=tok.sha256, tokenizer_json=tok.json + " "), "", has_data=True)
    (state / TOKENIZER_FILE).write_text(tok.json.replace("BPE", "BPE ", 1))   # the cache edited by hand
    with pytest.raises(TokenizerError, match="tampered"):
        tokenizer_from_join(pb.JoinReply(tokenizer_sha256=tok.sha256), str(state), has_data=True)


def test_a_model_file_carries_its_tokenizer_and_generate_writes_text(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file)
    tok = run_tokenizer(config)
    config = resolve_vocab(config, tok)
    cfg = model_config_for(config.model)
    stages = [build_stage(cfg, s, 2, seed=0) for s in range(2)]
    path = export_model(tmp_path / "model.pt", stages, cfg, tokenizer=tok)
    model = load_model(path)
    assert model.tokenizer is not None and model.tokenizer.sha256 == tok.sha256
    text = generate_text(model, "def handler_", tokens=20, temperature=0.8, top_k=40, seed=0)
    assert isinstance(text, str) and text and tok.decode(tok.encode(text)) == text
    payload = torch.load(path, weights_only=True)
    payload["tokenizer"]["json"] = payload["tokenizer"]["json"] + " "
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ExportError, match="tampered"):
        load_model(tmp_path / "tampered.pt")


@pytest.mark.timeout(240)
def test_a_tiny_bpe_run_trains_and_writes_text(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file, 400, "model.stages=1", "train.steps=40", "train.microbatch_size=4",
                         "train.microbatches=1", "train.eval_every=20", "train.eval_batches=2", "train.warmup_steps=4",
                         "train.lr=0.01")
    summary = train_reference(config, tmp_path / "out", device="cpu", progress=False)
    assert summary["config"]["train"]["tokenizer"] == "bpe" and summary["config"]["model"]["vocab_size"] > 256
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0, summary
    model = load_model(tmp_path / "out")
    assert model.tokenizer is not None
    text = generate_text(model, "def handler_", tokens=30, temperature=0.0, top_k=0)
    assert "return" in text or "request" in text, text   # the merges it learnt, decoded as text


def test_a_simulated_runs_model_carries_the_coordinators_tokenizer(tmp_path: Path, text_file: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = _bpe_config(text_file)
    tok = run_tokenizer(config, tmp_path / COORDINATOR_DIR)   # what the run's coordinator trained and kept
    resolved = resolve_vocab(config, tok)
    cfg = model_config_for(resolved.model)
    for stage in range(2):
        module = build_stage(cfg, stage, 2, seed=0)
        state = StageState(run_id=resolved.run_id, stage=stage, num_stages=2,
                           model=dataclasses.asdict(resolved.model), inner_step=10, outer_steps={0: 2},
                           parts={"global": {n: p.detach().clone() for n, p in module.named_parameters()}})
        write_state(node_state_dir(tmp_path, f"node-{stage}"), state)
    path, info = write_run_model(tmp_path, config)
    assert path is not None and info["model_file"] == str(path)
    model = load_model(path)
    assert model.tokenizer is not None and model.tokenizer.sha256 == tok.sha256
    sample = run_sample(path, prompt="def ", tokens=10)
    assert isinstance(sample["sample"], str) and sample["sample"]
    # eval encodes its data with the model's own tokenizer, and reports bits per byte by its bytes per token
    assert sim_main(["eval", "--model", str(path), "--data", str(text_file), "--batches", "2", "--batch-size", "2",
                     "--seq-len", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    full = report["results"][0]
    assert full["name"] == "all" and 2.0 < full["loss"] / math.log(2) / full["bits_per_byte"] < 6.0, full


def test_skiptrain_of_a_bpe_run_exports_its_tokenizer(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file, 400, "model.stages=3", "train.steps=4", "train.microbatch_size=2",
                         "train.eval_every=4", "train.eval_batches=1")
    train_skip(config, export=tmp_path / "skip.pt", eval_paths=False)
    model = load_model(tmp_path / "skip.pt")
    assert model.tokenizer is not None and model.tokenizer.sha256 == train_run_tokenizer(config).sha256
    assert model.config.vocab_size == model.tokenizer.vocab_size


def test_a_coordinator_restarted_on_an_edited_tokenizer_refuses_to_start(tmp_path: Path, text_file: Path) -> None:
    config = _bpe_config(text_file, 300)
    run_dir = tmp_path / "run"

    async def start_and_stop() -> str:
        server = await start_coordinator(config, run_dir, "t")
        try:
            return server.core.tokenizer.sha256 if server.core.tokenizer else ""
        finally:
            await server.stop(0)

    sha = asyncio.run(start_and_stop())
    cached = run_dir / "tokenizer-bpe-300.json"
    assert sha and sha256_hex(cached.read_text()) == sha
    assert asyncio.run(start_and_stop()) == sha   # a restart reads the same tokenizer back
    cached.write_text(train_bpe([TEXT[:5000]], 280).json)   # replaced by another tokenizer
    with pytest.raises(ConfigError, match="tokenizer file was changed"):
        asyncio.run(start_and_stop())
    cached.write_text("{broken")
    with pytest.raises(ConfigError, match=r"tokenizer-bpe-300\.json: not a tokenizer JSON"):
        asyncio.run(start_and_stop())
