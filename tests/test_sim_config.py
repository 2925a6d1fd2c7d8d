"""The simulator's config: defaults as documented, overrides, and errors that name the field."""

from __future__ import annotations

import re

import pytest

from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.sim.config import load_sim_config


def test_default_is_the_documented_embedded_run() -> None:
    cfg = load_sim_config(None)
    assert cfg.run.model.preset == "tiny"
    assert cfg.sim.origins == 2 and cfg.sim.replicas_per_stage == 2 and cfg.run.model.stages == 4
    assert cfg.run.diloco.codec == "fp4"
    # the settings measured closest to data-parallel at equal tokens (benchmarks/wan.md)
    assert cfg.run.skippipe.planner == "skippipe" and cfg.run.skippipe.skip_ratio == 0.0
    assert (cfg.run.diloco.inner_steps, cfg.run.diloco.outer_lr, cfg.run.diloco.outer_momentum) == (5, 1.0, 0.0)
    assert cfg.run.recovery.swap_edges is False
    assert any(p.whole_stage and p.stage not in (0, 1, cfg.run.model.stages - 1) for p in cfg.sim.preemptions)


def test_file_and_overrides_layer_on_defaults(tmp_path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text("[train]\nsteps = 42\n[sim]\norigins = 3\n")
    cfg = load_sim_config(path, ["sim.replicas_per_stage=1", "diloco.inner_steps=7"])
    assert cfg.run.train.steps == 42
    assert cfg.sim.origins == 3 and cfg.sim.replicas_per_stage == 1
    assert cfg.run.diloco.inner_steps == 7
    assert cfg.run.model.preset == "tiny"  # untouched defaults survive


@pytest.mark.parametrize(
    ("toml", "overrides", "names"),
    [
        ("[sim]\norigins = 0\n", [], "sim.origins"),
        ("[sim]\nbogus = 1\n", [], "sim.bogus"),
        ("[train]\nsteps = 'many'\n", [], "train.steps"),
        ("", ["sim.max_slowdown=0.5"], "sim.max_slowdown"),
        ("", ["diloco.codec=fp3"], "diloco.codec"),
        ("[[sim.preemptions]]\ntarget = 'stage:9'\nat_step = 1\n", [], "sim.preemptions.target"),
        ("[[sim.preemptions]]\ntarget = 'stage:1'\n", [], "sim.preemptions"),
        ("[[sim.preemptions]]\ntarget = 'stage:1'\nat_step = 3\nsignal = 'HUP'\n", [], "sim.preemptions.signal"),
    ],
)
def test_bad_config_names_the_field(tmp_path, toml: str, overrides: list[str], names: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_sim_config(path, overrides)
    assert names in str(err.value)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_sim_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sim\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sim_config(bad)


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=1.5", "train.steps: expected an integer, got '1.5'"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.lr=2e-3x", "train.lr: expected a number, got '2e-3x'"),
])
def test_a_setting_of_the_wrong_type_is_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(RunConfig(), [override])


def test_numeric_settings_accept_strings_from_the_command_line() -> None:
    config = apply_overrides(RunConfig(), ["train.steps=12", "train.lr=0.002"])
    assert config.train.steps == 12 and isinstance(config.train.steps, int)
    assert config.train.lr == 0.002


def test_gradients_cross_in_the_activation_codec_unless_told_otherwise() -> None:
    assert RunConfig().train.gradient_codec == ""   # the agent then uses train.activation_codec
    assert apply_overrides(RunConfig(), ["train.gradient_codec=int8"]).train.gradient_codec == "int8"
    with pytest.raises(ConfigError, match=r"train\.gradient_codec"):
        apply_overrides(RunConfig(), ["train.gradient_codec=int3"])
