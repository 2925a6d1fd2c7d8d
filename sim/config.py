"""Simulator configuration: a run config (the same TOML sections the coordinator
reads) plus a ``[sim]`` table for topology, link emulation, heterogeneity and
preemptions. Bad values raise ``ConfigError`` naming the field (``sim.origins``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowband.protocols.config import ConfigError, RunConfig, apply_overrides, build_dataclass, read_toml

SIGNALS = ("KILL", "TERM")
NETWORKS = ("loopback", "netns")
SIM_DEVICES = ("auto", "cpu")


@dataclass(kw_only=True, slots=True)
class ScriptedPreemption:
    """Preempt `target` once the origins reach `at_step` (or `at_s` seconds after start)."""

    target: str                  # "stage:N" (every replica of stage N), "replica:N" (one replica), "origin"
    signal: str = "KILL"
    at_step: int = -1
    at_s: float = -1.0
    replace: bool = True         # start a replacement node after sim.replacement_delay_s

    def __post_init__(self) -> None:
        kind, _, arg = self.target.partition(":")
        if kind not in ("stage", "replica", "origin") or (kind != "origin" and not arg.isdigit()):
            raise ConfigError(f"sim.preemptions.target: expected 'stage:N', 'replica:N' or 'origin', got {self.target!r}")
        if self.signal not in SIGNALS:
            raise ConfigError(f"sim.preemptions.signal: must be one of {SIGNALS}, got {self.signal!r}")
        if (self.at_step < 0) == (self.at_s < 0):
            raise ConfigError("sim.preemptions: give exactly one of at_step or at_s")

    @property
    def stage(self) -> int | None:
        kind, _, arg = self.target.partition(":")
        return 0 if kind == "origin" else int(arg)

    @property
    def whole_stage(self) -> bool:
        return self.target.startswith("stage:") or self.target == "origin"


@dataclass(kw_only=True, slots=True)
class SimSection:
    origins: int = 2
    replicas_per_stage: int = 2        # for block stages 1..S-1
    regions: int = 1
    intra_latency_s: float = 0.001
    inter_latency_s: float = 0.05
    intra_bandwidth_Bps: float = 1e9
    inter_bandwidth_Bps: float = 5e7
    max_slowdown: float = 1.0          # each node slows its compute by a factor in [1, max]
    preemption_rate_per_hour: float = 0.0  # random preemptions on top of the script
    sigkill_share: float = 0.5         # share of random preemptions that are SIGKILL (else SIGTERM notice)
    replacement_delay_s: float = 2.0
    max_wall_s: float = 280.0          # stop the run after this long whatever happened
    # "loopback": every process on 127.0.0.1, links emulated in the nodes' send path. "netns": each
    # machine in a network namespace of its own, uplinks shaped by the kernel at the bandwidths above
    # (latency stays emulated: this kernel has no netem); needs root and iproute2 (sim/netns.py).
    network: str = "loopback"
    # HOST:PORT of the coordinator's live dashboard (port 0: any free port; the run prints its address);
    # "": no dashboard. With network = "netns" it listens on the coordinator's namespace address.
    dashboard: str = "127.0.0.1:0"
    # mutual TLS on every channel and activation wire, from a run CA made in the run folder (tls/);
    # false (`lowband-sim run --no-tls`): plaintext, token only
    tls: bool = True
    # where node processes compute: "auto" spreads them round-robin over the visible CUDA devices, as
    # many per device as its free memory holds (sim/procs.py; a run that does not fit is refused), and
    # uses the CPU when there is none; "cpu" keeps every node on the CPU
    device: str = "auto"
    preemptions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"sim.{name}: {message}")

        check(self.origins >= 1, "origins", "must be >= 1")
        check(self.replicas_per_stage >= 1, "replicas_per_stage", "must be >= 1")
        check(self.regions >= 1, "regions", "must be >= 1")
        for name in ("intra_latency_s", "inter_latency_s"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("intra_bandwidth_Bps", "inter_bandwidth_Bps"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.max_slowdown >= 1.0, "max_slowdown", "must be >= 1")
        check(self.preemption_rate_per_hour >= 0, "preemption_rate_per_hour", "must be >= 0")
        check(0 <= self.sigkill_share <= 1, "sigkill_share", "must be in [0, 1]")
        check(self.replacement_delay_s >= 0, "replacement_delay_s", "must be >= 0")
        check(self.max_wall_s > 0, "max_wall_s", "must be > 0")
        check(self.network in NETWORKS, "network", f"must be one of {NETWORKS}, got {self.network!r}")
        check(self.device in SIM_DEVICES, "device", f"must be one of {SIM_DEVICES}, got {self.device!r}")
        port = self.dashboard.rpartition(":")[2]
        check(self.dashboard == "" or (port.isdigit() and int(port) <= 65535), "dashboard",
              f"must be HOST:PORT or empty, got {self.dashboard!r}")
        parsed = []
        for item in self.preemptions:
            if isinstance(item, ScriptedPreemption):
                parsed.append(item)
            elif isinstance(item, dict):
                parsed.append(build_dataclass(ScriptedPreemption, item, prefix="sim.preemptions."))
            else:
                raise ConfigError(f"sim.preemptions: expected tables, got {item!r}")
        self.preemptions = parsed


@dataclass(kw_only=True, slots=True)
class SimConfig:
    run: RunConfig = field(default_factory=RunConfig)
    sim: SimSection = field(default_factory=SimSection)

    def __post_init__(self) -> None:
        for p in self.sim.preemptions:
            if p.stage is not None and p.stage >= self.run.model.stages:
                hint = ("; with model.stages = 1 every node is a stage-0 replica: target 'replica:0' (one node) "
                        "or 'origin' (all)") if self.run.model.stages == 1 else ""
                raise ConfigError(
                    f"sim.preemptions.target: stage {p.stage} does not exist (model.stages = {self.run.model.stages})"
                    + hint
                )


def default_sim_config() -> SimConfig:
    """The embedded default: tiny model, stdlib corpus, 2 origins + 3 stages x 2 replicas,
    Streaming DiLoCo with fp4 exchange, skip ratio 0.25, and scripted preemptions
    including the loss of a whole middle stage (recovered by CheckFree)."""
    return load_sim_config(None)


DEFAULT_SIM_TOML = """
# The hops send a subspace model's 8 learned coordinates in int8 and the token ids: 29x fewer bytes
# than bf16 activations, and the subspace model validates better than the plain one in these short
# runs (benchmarks/activations.md); model.subspace_rank = 0 with train.activation_codec = "bf16" is
# the plain model.
[model]
preset = "tiny"
stages = 4
seq_len = 128
subspace_rank = 8

[train]
microbatch_size = 4
microbatches = 4
steps = 160
eval_every = 20
activation_codec = "subspace-int8"

# Measured on this run (benchmarks/wan.md, "where the loss gap went"): for a short run, plain
# averaging (outer lr 1, no momentum) every 5 steps is within 2% of data-parallel at equal tokens;
# the sync is still ~1% of the bytes, activations being the rest.
[diloco]
inner_steps = 5
fragments = 3
overlap = 1
alpha = 0.5
outer_lr = 1.0
outer_momentum = 0.0
codec = "fp4"

# Skipping pays off with many stages; over three block stages, a path that skips one never chains
# 1-2-3, and the whole model then validates 15-22% worse. The planner still places every microbatch.
[skippipe]
skip_ratio = 0.0
planner = "skippipe"

[membership]
heartbeat_interval_s = 0.5
lease_s = 3.0

# Middle stages are rebuilt from both neighbours; the swapped edge stages of CheckFree+ training
# cost ~3% of validation loss in this short run, so they are off (recovery.swap_edges = true turns
# them on for runs that expect to lose edge stages).
[recovery]
method = "checkfree-plus"
swap_edges = false
# the stage-0 copy is refreshed every 40 steps rather than every outer period (5): each refresh streams
# stage 0's whole state to the four holders
bookend_copy_every = 40

[sim]
origins = 2
replicas_per_stage = 2

[[sim.preemptions]]
target = "replica:1"
signal = "TERM"
at_step = 40

[[sim.preemptions]]
target = "stage:2"
signal = "KILL"
at_step = 80
"""


def load_sim_config(path: str | Path | None, overrides: list[str] | None = None) -> SimConfig:
    """Defaults, then the TOML file (if any) on top, then ``section.key=value`` overrides."""
    data: dict[str, Any] = tomllib.loads(DEFAULT_SIM_TOML)
    user = read_toml(path) if path is not None else {}
    data = _merge(data, user)
    sim_data = data.pop("sim", {})
    run = RunConfig.from_dict(data)
    sim_overrides = [o for o in overrides or [] if o.startswith("sim.")]
    run_overrides = [o for o in overrides or [] if not o.startswith("sim.")]
    run = apply_overrides(run, run_overrides)
    for item in sim_overrides:
        key, _, value = item.partition("=")
        name = key[len("sim."):]
        if name not in SimSection.__dataclass_fields__ or name == "preemptions":
            raise ConfigError(f"{key}: unknown or not overridable setting")
        sim_data = {**sim_data, name: value}
    sim = build_dataclass(SimSection, sim_data, prefix="sim.")
    if run.model.stages == 1 and "preemptions" not in (user.get("sim") or {}):
        # data-parallel mode: the default script's stages 1 and 2 do not exist; preempt single replicas
        # instead (each replacement copies a live one), and only when another replica is left to copy
        sim.preemptions = [ScriptedPreemption(target="replica:0", signal=sig, at_step=step)
                           for sig, step in (("TERM", 40), ("KILL", 80))] if sim.origins >= 2 else []
    return SimConfig(run=run, sim=sim)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
