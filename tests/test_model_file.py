"""The model file a run yields: stage states assembled from θ_global and buffers, outer-step checks,
the [model]-section form the coordinator writes, sampling, and the commands' answers to bad input."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowband.node.train.export import ExportError, export_model, load_model
from lowband.node.train.generate import decode_bytes, encode_bytes, sample
from lowband.node.train.model import ModelConfig, build_stage, model_config_for
from lowband.protocols.config import ModelSection
from lowband.protocols.model_file import (
    ModelFileError,
    behind_stages,
    describe_lags,
    stage_state,
    write_model_file,
)
from lowband.sim.generate import generate_text

SECTION = ModelSection(preset="tiny", stages=3, seq_len=32, subspace_rank=8)


def _stages(section: ModelSection = SECTION, seed: int = 1) -> dict[int, torch.nn.Module]:
    cfg = model_config_for(section)
    return {s: build_stage(cfg, s, section.stages, seed=seed) for s in range(section.stages)}


def _split(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers): what GetState's "global" and "buffers" parts carry."""
    params = dict(module.named_parameters())
    return ({n: p.detach() for n, p in params.items()},
            {n: t for n, t in module.state_dict().items() if n not in params})


def test_a_file_of_theta_global_and_buffers_with_the_model_section_loads_strictly(tmp_path: Path) -> None:
    stages = _stages()
    states = {s: stage_state(*_split(m)) for s, m in stages.items()}
    assert "embed.anchors" in states[0]   # the subspace model's anchors travel beside θ_global
    path = write_model_file(tmp_path, states, model_section=dataclasses.asdict(SECTION), meta={"seed": 3})
    assert path == tmp_path / "model.pt" and not list(tmp_path.glob(".*tmp"))
    model = load_model(path)
    assert model.config == model_config_for(SECTION) and model.num_stages == 3 and model.meta["seed"] == 3
    for s, module in stages.items():
        for name, tensor in module.state_dict().items():
            assert torch.equal(model.stages[s].state_dict()[name], tensor), (s, name)


def test_a_file_without_the_anchors_or_a_stage_is_refused(tmp_path: Path) -> None:
    stages = _stages()
    states = {s: stage_state(*_split(m)) for s, m in stages.items()}
    del states[0]["embed.anchors"]
    write_model_file(tmp_path / "a.pt", states, model_section=dataclasses.asdict(SECTION))
    with pytest.raises(ExportError, match="stage 0 does not match"):
        load_model(tmp_path / "a.pt")
    with pytest.raises(ModelFileError, match="none missing"):
        write_model_file(tmp_path / "b.pt", {0: states[0], 2: states[2]}, model_section={})
    write_model_file(tmp_path / "c.pt", states, model_section={"preset": "nope"})
    with pytest.raises(ExportError, match=r"model\.preset"):
        load_model(tmp_path / "c.pt")


def test_a_name_both_parameter_and_buffer_is_refused() -> None:
    with pytest.raises(ModelFileError, match="both"):
        stage_state({"w": torch.zeros(1)}, {"w": torch.zeros(1)})


def test_behind_stages_names_the_stage_and_fragment_that_lags() -> None:
    assert behind_stages({0: {0: 3, 1: 3}, 1: {0: 3, 1: 3}}) == []
    lags = behind_stages({0: {0: 3, 1: 2}, 1: {0: 3, 1: 3}, 2: {0: 2, 1: 3}})
    assert lags == [(2, 0, 2, 3), (0, 1, 2, 3)]
    assert describe_lags(lags)[0] == "stage 2 fragment 0 is at outer step 2, behind 3"
    # a stage cut into another number of fragments syncs at other steps: not compared
    assert behind_stages({0: {0: 9}, 1: {0: 3, 1: 3}}) == []
    # a fragment that never synced holds no parameters (3 fragments over 2 blocks): not a lag
    assert behind_stages({0: {0: 4, 1: 4, 2: 4}, 1: {0: 4, 1: 4, 2: 0}}) == []


def test_sampling_is_greedy_at_temperature_zero_and_seeded_otherwise() -> None:
    stages = _stages(ModelSection(preset="tiny", stages=2, seq_len=16))
    prompt = encode_bytes("def f(")
    greedy = sample(stages, prompt, tokens=12, max_seq_len=16, temperature=0.0)   # the window slides past 16
    assert len(greedy) == 12 and greedy == sample(stages, prompt, tokens=12, max_seq_len=16, temperature=0.0)
    a = sample(stages, prompt, tokens=6, max_seq_len=16, temperature=1.0, top_k=5, seed=1)
    assert a == sample(stages, prompt, tokens=6, max_seq_len=16, temperature=1.0, top_k=5, seed=1)
    # top-k 1 is greedy whatever the temperature
    assert sample(stages, prompt, tokens=4, max_seq_len=16, temperature=2.0, top_k=1) == greedy[:4]
    assert decode_bytes(encode_bytes("héllo")) == "héllo"
    with pytest.raises(ValueError, match="--top-k"):
        sample(stages, prompt, tokens=1, max_seq_len=16, top_k=-1)
    with pytest.raises(ValueError, match="empty"):
        sample(stages, [], tokens=1, max_seq_len=16)


def test_generate_text_refuses_a_vocabulary_it_cannot_spell(tmp_path: Path) -> None:
    cfg = ModelConfig.from_preset("tiny", vocab_size=300)
    export_model(tmp_path / "m.pt", [build_stage(cfg, 0, 1, seed=0)], cfg)
    with pytest.raises(ValueError, match="300-token vocabulary"):
        generate_text(load_model(tmp_path / "m.pt"), "x", tokens=1, temperature=1.0, top_k=0)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LOWBAND_TOKEN": "t"})


def test_commands_answer_bad_input_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    done = _run("-m", "lowband.sim.cli", "generate", "--model", str(bad), "--prompt", "x")
    assert done.returncode == 2 and "not a model file" in done.stderr and "Traceback" not in done.stderr
    done = _run("-m", "lowband.sim.cli", "generate", "--model", str(bad), "--prompt", "x", "--temperature", "-1")
    assert done.returncode == 2 and "--temperature" in done.stderr
    # nothing listens on port 1 of loopback
    done = _run("-m", "lowband.coordinator.cli", "export", "--coordinator", "127.0.0.1:1", "--out", str(tmp_path / "m.pt"))
    assert done.returncode == 1 and "unreachable" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "m.pt").exists()
