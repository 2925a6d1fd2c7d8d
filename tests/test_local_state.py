"""Durable local state (``--state-dir``): a stage's θ_global and outer state round-trip through the file,
the write is atomic, and a truncated, corrupt or foreign file is refused with a message saying so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lowband.node.recovery.local_state import STATE_FILE, StageState, StateFileError, read_state, write_state
from lowband.node.train.model import build_stage, model_config_for
from lowband.protocols.config import ModelSection, RunConfig
from lowband.sim.model_out import latest_states, write_run_model

SECTION = ModelSection(preset="tiny", stages=2, seq_len=32, subspace_rank=8)


def _state(stage: int, outer: int, seed: int = 0) -> StageState:
    module = build_stage(model_config_for(SECTION), stage, SECTION.stages, seed=seed)
    params = dict(module.named_parameters())
    return StageState(
        run_id="lowband", stage=stage, num_stages=SECTION.stages, model=dataclasses.asdict(SECTION),
        inner_step=outer * 6, outer_steps={0: outer},
        parts={"global": {n: p.detach().clone() for n, p in params.items()},
               "outer": {"steps": torch.tensor([float(outer)])}},
        buffers={n: t for n, t in module.state_dict().items() if n not in params})


def test_a_state_round_trips_and_the_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = _state(0, 3)
    path = write_state(tmp_path, state)
    assert path == tmp_path / STATE_FILE and [p.name for p in tmp_path.iterdir()] == [STATE_FILE]
    back = read_state(tmp_path)
    assert (back.stage, back.num_stages, back.inner_step, back.outer_steps) == (0, 2, 18, {0: 3})
    for name, tensor in state.theta_global.items():
        assert torch.equal(back.theta_global[name], tensor), name
    assert torch.equal(back.buffers["embed.anchors"], state.buffers["embed.anchors"])


def test_a_truncated_corrupt_or_foreign_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="no stage state"):
        read_state(tmp_path)
    path = write_state(tmp_path, _state(1, 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="truncated or corrupt"):
        read_state(tmp_path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(StateFileError, match="truncated or corrupt"):
        read_state(tmp_path)
    torch.save({"format": "something-else"}, path)
    with pytest.raises(StateFileError, match="not a lowband stage state"):
        read_state(tmp_path)
    bad = _state(1, 2)
    bad.parts["global"]["blocks.0.attn.wq.weight"] = torch.full((2, 2), float("nan"))
    write_state(tmp_path, bad)
    with pytest.raises(StateFileError, match="non-finite"):
        read_state(tmp_path)


def test_the_run_model_takes_each_stages_most_advanced_state(tmp_path: Path) -> None:
    config = RunConfig(model=SECTION)
    write_state(tmp_path / "state" / "origin-1", _state(0, 4, seed=1))
    write_state(tmp_path / "state" / "stage1-2", _state(1, 3, seed=2))
    write_state(tmp_path / "state" / "stage1-3", _state(1, 4, seed=3))   # the replica one round further
    (tmp_path / "state" / "stage1-4").mkdir()
    (tmp_path / "state" / "stage1-4" / STATE_FILE).write_bytes(b"partial")   # skipped, not fatal
    assert {s: st.outer_steps for s, st in latest_states(tmp_path, config).items()} == {0: {0: 4}, 1: {0: 4}}
    path, info = write_run_model(tmp_path, config)
    assert path == tmp_path / "model.pt" and info["model_behind"] == []
    exported = torch.load(path, weights_only=True)
    expected = _state(1, 4, seed=3).theta_global
    assert all(torch.equal(exported["stages"][1][n], t) for n, t in expected.items())
