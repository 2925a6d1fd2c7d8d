"""The GPU path (issue 24), tested on the CPU where it can be and on CUDA where it exists.

CPU: bf16 autocast of a stage against fp32 (torch autocasts on the CPU too), the hop's buffer pool and
its no-copy CPU path, free-memory reporting, the memory-aware stage assignment and planner cap, the
simulator's device placement, ``--device`` validation and ``benchmarks/gpu.py`` without CUDA.
CUDA (skipped with a reason without one): the same bf16 check on the GPU, the pinned-buffer hop, the
device's free memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowband.coordinator.assignment import NodeView, choose_stage, fits, rebalance
from lowband.coordinator.planning import PlanInputs, compute_plan, memory_cap
from lowband.node.device_info import cgroup_room_bytes, device_memory_bytes, host_available_bytes
from lowband.node.pipeline.device_hop import DeviceHop, PinnedPool
from lowband.node.pipeline.runtime import MicrobatchKey, StageRuntime
from lowband.node.train.model import PRESETS, build_stage, model_config_for
from lowband.node.train.precision import autocast_context, autocast_dtype
from lowband.node.train.reference import resolve_device
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.stage_memory import (
    PRESET_SHAPES,
    microbatch_activation_bytes,
    microbatches_that_fit,
    stage_need_bytes,
    stage_needs,
    stage_params,
    stage_state_bytes,
    uses_bf16,
)
from lowband.sim.config import SimSection
from lowband.sim.procs import DeviceRoom, PlacementError, choose_device, node_need_bytes, place_nodes

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none visible to torch here)")

# bf16 keeps 8 significant bits (relative rounding 2^-9 per op). Through two blocks (norms, attention,
# SwiGLU, fp32 residual) and their backward the outputs and gradients stay within 2% of fp32 in
# relative L2 norm (measured on CPU: block output 4e-5, its weight change 4e-3; origin loss 3e-5, its
# gradient 2.4e-3); a wrong autocast (fp16 overflow, a bf16 residual stream or bf16 master weights)
# lands far outside.
BF16_REL_TOL = 2e-2


def _config(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), list(overrides))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ---------------------------------------------------------------- precision


def test_precision_rule_and_config_key() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cuda, "auto") is torch.bfloat16
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cuda, "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="not supported on mps"):
        autocast_dtype(torch.device("mps"), "bf16")
    assert _config("train.precision=bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        _config("train.precision=half")
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _stage_step(precision: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One microbatch through a tiny block stage's runtime (forward, backward, SGD lr 1 step): its output,
    the gradient it sends back, and the weight change (= minus the mean gradient)."""
    cfg = model_config_for(_config().model)
    module = build_stage(cfg, 1, 4, seed=3).to(device)   # two blocks of the tiny preset
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, cfg.dim, generator=gen)
    grad_out = torch.randn(2, 16, cfg.dim, generator=gen) * 1e-2

    async def main() -> dict[str, torch.Tensor]:
        runtime = StageRuntime(module, 1, optimizer, device=device, precision=precision, expected=1)
        try:
            key = MicrobatchKey("o", 0, 0)
            out = await runtime.forward(key, h)
            grad_in = await runtime.backward(key, grad_out)
            assert grad_in is not None and runtime.steps_applied == 1
            assert all(p.dtype == torch.float32 for p in module.parameters())   # master weights stay fp32
            assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values()
                       if isinstance(v, torch.Tensor))
            delta = torch.cat([(before[n] - p.detach()).flatten() for n, p in module.named_parameters()])
            return {"out": out.cpu(), "grad_in": grad_in.cpu(), "delta": delta.cpu()}
        finally:
            runtime.shutdown()

    return asyncio.run(main())


def _origin_step(precision: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One microbatch at an origin (stage 0 of 4): embedding, head and loss, backward through both."""
    cfg = model_config_for(_config().model)
    module = build_stage(cfg, 0, 4, seed=5).to(device)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)

    async def main() -> dict[str, torch.Tensor]:
        runtime = StageRuntime(module, 0, optimizer, device=device, precision=precision, expected=1)
        try:
            key = MicrobatchKey("o", 0, 0)
            h = await runtime.embed(key, tokens)
            loss, grad = await runtime.head(key, h, targets)   # the head runs on the embedding directly
            assert grad is not None
            await runtime.backward(key, grad)
            delta = torch.cat([(before[n] - p.detach()).flatten() for n, p in module.named_parameters()])
            return {"loss": torch.tensor(loss), "grad": grad.cpu(), "delta": delta.cpu()}
        finally:
            runtime.shutdown()

    return asyncio.run(main())


def _check_bf16_matches_fp32(device: torch.device) -> None:
    fp32 = _stage_step("fp32", device)
    bf16 = _stage_step("bf16", device)
    for name in ("out", "grad_in", "delta"):
        rel = _rel(bf16[name], fp32[name])
        assert rel < BF16_REL_TOL, (name, rel)
        assert bf16[name].dtype == torch.float32   # the residual stream and gradients leave in fp32
    # autocast really ran: bf16 rounding shows in the weight change
    assert _rel(bf16["delta"], fp32["delta"]) > 1e-5
    fp32, bf16 = _origin_step("fp32", device), _origin_step("bf16", device)
    for name in ("loss", "grad", "delta"):
        rel = _rel(bf16[name], fp32[name])
        assert rel < BF16_REL_TOL, (name, rel)
    assert bf16["grad"].dtype == torch.float32 and _rel(bf16["delta"], fp32["delta"]) > 1e-5


def test_bf16_stage_forward_backward_matches_fp32_on_cpu() -> None:
    _check_bf16_matches_fp32(torch.device("cpu"))


@needs_cuda
def test_bf16_stage_forward_backward_matches_fp32_on_cuda() -> None:
    _check_bf16_matches_fp32(torch.device("cuda", 0))


def test_runtime_refuses_a_precision_its_device_cannot_run() -> None:
    with pytest.raises(ValueError, match="precision"):
        StageRuntime(torch.nn.Linear(2, 2), 1, None, precision="int4")


# ---------------------------------------------------------------- the hop


class _FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_pinned_pool_reuses_by_size_and_only_after_the_copy() -> None:
    made: list[int] = []

    def allocate(n: int) -> torch.Tensor:
        made.append(n)
        return torch.empty(n, dtype=torch.uint8)

    pool = PinnedPool(allocate, max_free_per_size=1)
    a = pool.acquire(64)
    pool.release(a)
    assert pool.acquire(64) is a and made == [64]          # the same size comes back from the pool
    b = pool.acquire(32)
    assert b is not a and made == [64, 32]
    event = _FakeEvent()
    pool.release_after(b, event)
    assert pool.acquire(32) is not b                        # its copy is still running: a new buffer
    event.done = True
    assert pool.acquire(32) is b                            # done: reused
    pool.release(a)
    pool.release(torch.empty(64, dtype=torch.uint8))        # over max_free_per_size: dropped
    assert pool.free_count(64) == 1
    with pytest.raises(ValueError):
        pool.acquire(-1)


def test_cpu_hop_makes_no_copy() -> None:
    hop = DeviceHop("cpu")
    t = torch.randn(2, 3, 4)

    async def main() -> None:
        host = await hop.to_host(t, torch.bfloat16)
        assert host.tensor is t and host.buffer is None   # the wire casts as it writes, as before
        hop.release(host)

    asyncio.run(main())
    assert hop.to_device(t) is t
    assert hop.to_device(t.bfloat16(), torch.float32).dtype == torch.float32
    assert hop.pool.allocations == 0
    assert hop.host_dtype(t, torch.bfloat16) == torch.bfloat16 and hop.host_dtype(t, None) == torch.float32
    assert hop.host_dtype(t.bfloat16(), torch.float32) == torch.bfloat16   # never widened for the copy


@needs_cuda
def test_cuda_hop_goes_through_pinned_buffers_without_blocking_the_loop() -> None:
    hop = DeviceHop("cuda:0")
    x = torch.randn(4, 64, 128, device="cuda:0")

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        for _ in range(3):
            host = await hop.to_host(x * 2, torch.bfloat16)
            assert host.tensor.is_pinned() and host.tensor.dtype == torch.bfloat16
            torch.testing.assert_close(host.tensor.float(), (x * 2).bfloat16().float().cpu())
            hop.release(host)
        task.cancel()
        assert ticks > 0   # the loop ran while the copies were awaited
        assert hop.pool.allocations == 1   # one pinned buffer, reused

    asyncio.run(main())
    back = hop.to_device(torch.arange(12.0).view(3, 4))
    assert back.is_cuda
    torch.testing.assert_close(back.cpu(), torch.arange(12.0).view(3, 4))


# ---------------------------------------------------------------- memory reporting


def test_cpu_free_memory_is_available_memory_within_the_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert host_available_bytes(meminfo) == 8_000_000 * 1024
    assert host_available_bytes(tmp_path / "absent") == 0
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("4000000000\n")
    usage.write_text("1000000000\n")
    assert cgroup_room_bytes(((limit, usage),)) == 3_000_000_000
    limit.write_text("max\n")
    assert cgroup_room_bytes(((limit, usage),)) is None
    assert cgroup_room_bytes(((tmp_path / "none", usage),)) is None
    free = device_memory_bytes(torch.device("cpu"))
    if Path("/proc/meminfo").exists():
        total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:")).split()[1]) * 1024
        assert 0 < free <= total


@needs_cuda
def test_cuda_free_memory_drops_when_memory_is_taken() -> None:
    device = torch.device("cuda", 0)
    before = device_memory_bytes(device)
    block = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    after = device_memory_bytes(device)
    assert 0 < after <= before - (200 << 20) and before <= torch.cuda.get_device_properties(device).total_memory
    del block


def test_stage_memory_estimate_matches_the_model() -> None:
    for name, shape in PRESET_SHAPES.items():
        cfg = PRESETS[name]
        assert (shape.dim, shape.n_layers, shape.n_heads, shape.ffn_hidden) == \
            (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden), name
    for stages in (1, 4):
        config = _config(f"model.stages={stages}")
        cfg = model_config_for(config.model)
        for stage in range(stages):
            actual = sum(p.numel() for p in build_stage(cfg, stage, stages, seed=0).parameters())
            assert stage_params(config, stage) == actual, (stages, stage)
    config = _config("model.preset=124m")
    assert stage_state_bytes(config, 1) == 24 * stage_params(config, 1)
    bf16 = microbatch_activation_bytes(config, 1, bf16=True)
    assert 0 < bf16 < microbatch_activation_bytes(config, 1, bf16=False)
    assert microbatches_that_fit(config, 1, stage_state_bytes(config, 1) + 3 * bf16, bf16=True) == 3
    assert microbatches_that_fit(config, 1, 1000, bf16=True) == 0
    assert uses_bf16("auto", "cuda:1") and not uses_bf16("auto", "cpu") and uses_bf16("bf16", "cpu")
    # a BPE run's bookend holds its vocabulary before the model's size is resolved
    bpe = _config("model.preset=124m", "train.tokenizer=bpe", "train.vocab_size=4096")
    assert stage_params(bpe, 0) - stage_params(config, 0) == 2 * (4096 - 256) * 768
    assert stage_params(bpe, 1) == stage_params(config, 1)


# ---------------------------------------------------------------- the coordinator's use of it


def test_a_node_is_not_given_a_stage_it_cannot_hold() -> None:
    need = [1000, 100, 100]
    nodes = [NodeView("a", 1, 1.0, True, 0), NodeView("b", 2, 1.0, True, 0)]
    small = NodeView("s", -1, 1.0, True, 500)
    # stage 0 is empty and would be chosen, but "s" cannot hold it: the weakest stage it fits
    assert choose_stage(nodes, small, 3, need=need) in (1, 2)
    assert choose_stage(nodes, NodeView("big", -1, 1.0, True, 5000), 3, need=need) == 0
    assert choose_stage(nodes, NodeView("unknown", -1, 1.0, True, 0), 3, need=need) == 0   # 0: not reported
    tiny = NodeView("t", -1, 1.0, True, 10)
    assert choose_stage(nodes, tiny, 3, need=need) == 1   # fits none: the lightest (lowest index on a tie)
    assert not fits(tiny, 1, need) and fits(tiny, 1)
    assert choose_stage(nodes, small, 3) == 0              # without a need: as before
    with pytest.raises(ValueError):
        choose_stage(nodes, small, 3, need=[1, 2])
    # a re-balance never moves a node into a stage it cannot hold
    crowd = [NodeView("x", 1, 1.0, True, 500), NodeView("y", 1, 1.0, True, 500), NodeView("z", 2, 1.0, True, 50)]
    assert rebalance(crowd, 3, need=need) == []
    moves = rebalance([*crowd, NodeView("w", 2, 1.0, True, 5000)], 3, need=need)
    assert [m.node_id for m in moves] == ["w"] and moves[0].to_stage == 0


def test_the_planner_cap_comes_from_reported_free_memory() -> None:
    config = _config("model.stages=3", "train.microbatches=2")
    nodes = (("o1", 0, 1.0), ("o2", 0, 1.0), ("a", 1, 1.0), ("b", 2, 1.0), ("c", 2, 1.0))
    per_mb = microbatch_activation_bytes(config, 2, bf16=False)

    def inputs(memory: tuple[tuple[str, str, int], ...], cfg: RunConfig = config) -> PlanInputs:
        return PlanInputs(1, cfg, nodes, (), memory)

    assert memory_cap(inputs(())) == 0                                  # nobody reported: no cap
    roomy = stage_state_bytes(config, 2) + 9 * per_mb
    assert memory_cap(inputs((("b", "cpu", roomy), ("c", "cpu", 0)))) == 9
    # under bf16 the same memory holds more microbatches
    assert memory_cap(inputs((("b", "cuda:0", roomy),))) > 9
    # too tight for the pipeline to run: raised to what it needs (stage 1's one replica takes all 4)
    tight = stage_state_bytes(config, 1) + microbatch_activation_bytes(config, 1, bf16=False)
    assert memory_cap(inputs((("a", "cpu", tight),))) == 4
    explicit = dataclasses.replace(config, skippipe=dataclasses.replace(config.skippipe, memory_cap=7))
    assert memory_cap(inputs((("a", "cpu", tight),), explicit)) == 7   # the config's cap wins
    plan = compute_plan(inputs((("b", "cpu", roomy),)))
    assert sum(len(p) for p in plan.paths.values()) == 4


# ---------------------------------------------------------------- the simulator's placement


def test_sim_spreads_nodes_over_devices_and_caps_them_by_memory() -> None:
    gib = 1 << 30
    two = [DeviceRoom("cuda:0", 10 * gib), DeviceRoom("cuda:1", 10 * gib)]
    assert place_nodes(two, [gib] * 4) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    uneven = [DeviceRoom("cuda:0", 10 * gib), DeviceRoom("cuda:1", 3 * gib)]
    assert place_nodes(uneven, [2 * gib] * 5) == ["cuda:0", "cuda:1", "cuda:0", "cuda:0", "cuda:0"]
    with pytest.raises(PlacementError, match=r"sim.device = \"cpu\""):
        place_nodes(uneven, [2 * gib] * 7)
    assert place_nodes([], [gib] * 3) == ["cpu"] * 3
    # a dead node's memory is free again for its replacement
    assert choose_device(uneven, [("cuda:0", 9 * gib)], 2 * gib, 0) == "cuda:1"
    config = _config("model.preset=124m")
    origin = node_need_bytes(config, 0, origins=2, replicas=2)
    block = node_need_bytes(config, 1, origins=2, replicas=2)
    assert block > stage_state_bytes(config, 1) and origin > 0
    assert node_need_bytes(config, 1, origins=8, replicas=1) > block   # more microbatches held
    assert SimSection(device="cpu").device == "cpu"
    with pytest.raises(ConfigError, match=r"sim\.device"):
        SimSection(device="gpu")


# ---------------------------------------------------------------- --device


def test_device_flag_names_what_is_wrong() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(ValueError, match=r"not available|does not exist"):
        resolve_device(missing)
    result = subprocess.run([sys.executable, "-m", "lowband.node.cli", "--coordinator", "127.0.0.1:1",
                             "--device", missing], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and missing in result.stderr


@needs_cuda
def test_auto_device_names_its_index_on_cuda() -> None:
    assert resolve_device("auto").index is not None and resolve_device("cuda").type == "cuda"


# ---------------------------------------------------------------- benchmarks/gpu.py


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA answer; with CUDA the script runs the benchmark")
def test_gpu_benchmark_without_cuda_says_so_and_exits_0() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["cuda"] is False and "CUDA" in answer["reason"]


def test_stage_needs_cover_every_stage() -> None:
    config = _config("model.preset=small", "model.stages=4")
    needs = stage_needs(config)
    assert len(needs) == 4 and all(n == stage_need_bytes(config, s) for s, n in enumerate(needs))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_benchmark_script_runs_end_to_end_on_the_cpu() -> None:
    """Every part of benchmarks/gpu.py (reference, 4 node processes, DiLoCo against the reference at equal
    tokens) on the CPU with the tiny preset: the script's plumbing, not a measurement."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--json", "--device", "cpu",
                             "--preset", "tiny", "--steps", "5", "--seq-len", "64", "--microbatch-size", "4",
                             "--microbatches", "4", "--diloco-steps", "6", "--inner-steps", "3"],
                            capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    assert answer["reference"]["tokens_per_s"] > 0 and answer["pipeline"]["tokens_per_s"] > 0
    assert len(answer["pipeline"]["peak_memory_bytes"]) == 4 and answer["ratio"] > 0
    diloco = answer["diloco"]
    assert diloco["tokens"] == diloco["reference_tokens"] > 0
    assert 0 < diloco["diloco_val_loss"] < 6 and 0 < diloco["reference_val_loss"] < 6


class _FakeChild:
    """What ``Simulation.launch`` keeps of a spawned node process (nothing is started)."""

    pid = 0

    def __init__(self) -> None:
        self.running = True

    def alive(self) -> bool:
        return self.running

    def signal_group(self, sig: int) -> None:
        self.running = False


def _simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rooms: list[DeviceRoom], *overrides: str
                ) -> tuple[object, list[list[str]]]:
    from lowband.sim import run as sim_run
    from lowband.sim.config import load_sim_config

    monkeypatch.setattr(sim_run, "visible_cuda_devices", lambda: rooms)
    spawned: list[list[str]] = []

    def spawn(self: object, name: str, argv: list[str], **kwargs: object) -> _FakeChild:
        spawned.append(list(argv))
        return _FakeChild()

    monkeypatch.setattr(sim_run.Supervisor, "spawn", spawn)
    # no TLS: the certificates would need the run CA the coordinator's start makes
    sim = sim_run.Simulation(load_sim_config(None, ["sim.tls=false", *overrides]), tmp_path, progress=False)
    sim.coordinator_address = "127.0.0.1:1"
    return sim, spawned


def test_the_simulation_gives_each_node_process_its_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1 << 30
    two = [DeviceRoom("cuda:0", 40 * gib), DeviceRoom("cuda:1", 40 * gib)]
    sim, spawned = _simulation(tmp_path / "a", monkeypatch, two, "model.preset=124m", "sim.origins=2",
                               "sim.replicas_per_stage=2")
    try:
        sim.start_nodes()   # type: ignore[attr-defined]
    finally:
        sim.close()   # type: ignore[attr-defined]
    devices = [argv[argv.index("--device") + 1] for argv in spawned]
    assert len(devices) == 2 + 2 * 3 and devices == ["cuda:0", "cuda:1"] * 4
    # 8 nodes of the 124m preset do not fit in 3 GiB: refused before any node process starts
    sim, spawned = _simulation(tmp_path / "b", monkeypatch, [DeviceRoom("cuda:0", 3 * gib)], "model.preset=124m")
    try:
        with pytest.raises(PlacementError, match="cuda:0"):
            sim.start_nodes()   # type: ignore[attr-defined]
    finally:
        sim.close()   # type: ignore[attr-defined]
    assert spawned == []
    # sim.device = "cpu", or no CUDA device: every node on the CPU
    sim, spawned = _simulation(tmp_path / "c", monkeypatch, two, "sim.device=cpu")
    try:
        sim.start_nodes()   # type: ignore[attr-defined]
    finally:
        sim.close()   # type: ignore[attr-defined]
    assert spawned and all(argv[argv.index("--device") + 1] == "cpu" for argv in spawned)
