"""GPU benchmark: a 4-stage pipeline of node processes against the single-process reference on CUDA.

    python benchmarks/gpu.py --json

On a machine with CUDA (defaults: the ``124m`` preset, bf16 autocast as ``train.precision = "auto"``
gives it, every visible GPU used round-robin as the simulator places nodes):

- ``reference``: the whole model trained in one process on ``cuda:0`` (microbatches accumulated into
  one step, as a pipeline iteration takes them): ``tokens_per_s``, ``peak_memory_bytes``
  (``torch.cuda.max_memory_reserved``) and ``mfu``;
- ``pipeline``: a coordinator and 4 node processes (1 origin + 3 block stages, ``--device cuda:i``) on
  loopback training the same config: ``tokens_per_s`` (origin's log, warm-up iterations excluded),
  ``peak_memory_bytes`` per node (``nvidia-smi`` sampled every 0.25 s, by pid; null where the driver
  does not show the processes, e.g. in a PID namespace; ``peak_memory_bytes_all_nodes`` is the devices'
  used memory above what it was before the run, every node together) and ``mfu``; ``ratio`` = pipeline / reference
  tokens/s on the same GPU count (target >= 0.8);
- ``diloco``: a short Streaming DiLoCo run (``model.stages = 1``, 2 node processes, 3 fragments) and the
  reference trained on as many tokens: both final validation losses and the relative gap.

MFU = tokens/s x (6 N + 12 L D T) / (peak bf16 dense FLOP/s x GPUs), N the non-embedding parameters
(PaLM's accounting); null for a GPU whose peak is not in ``PEAK_BF16_FLOPS``.

Without CUDA it prints ``{"cuda": false, "reason": ...}`` and exits 0. ``--device cpu`` runs every part
on the CPU instead (with ``--preset tiny``: a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowband.coordinator.launch import launch_coordinator  # noqa: E402
from lowband.node.train.data import load_run_corpus, split_microbatches  # noqa: E402
from lowband.node.train.model import Transformer, lm_loss, model_config_for  # noqa: E402
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr  # noqa: E402
from lowband.node.train.precision import autocast_context  # noqa: E402
from lowband.node.train.reference import reference_batches, train_reference  # noqa: E402
from lowband.protocols.codec import CODECS as RAW_AND_QUANT  # noqa: E402
from lowband.protocols.config import RunConfig, apply_overrides  # noqa: E402
from lowband.protocols.stage_memory import PRESET_SHAPES  # noqa: E402
from lowband.sim.procs import Supervisor  # noqa: E402

TOKEN = "gpu-bench-token"
STAGES = 4
WARMUP_ITERATIONS = 2   # excluded from every rate: CUDA context, cuBLAS autotuning, first allocations
# Dense bf16 peak FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def _overrides(preset: str, steps: int, seq_len: int, microbatch_size: int, microbatches: int,
               codec: str = "bf16") -> list[str]:
    return [f"model.preset={preset}", f"model.stages={STAGES}", f"model.seq_len={seq_len}",
            f"train.activation_codec={codec}",
            f"train.microbatch_size={microbatch_size}", f"train.microbatches={microbatches}",
            f"train.steps={steps}", "train.eval_every=100000", "train.eval_batches=1",
            "train.hop_timeout_s=60", "membership.heartbeat_interval_s=0.5", "membership.lease_s=20"]


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, None when unknown (CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():   # the longer keys ("H100 PCIe") come before their prefix
        if key in name:
            return flops
    return None


def flops_per_token(config: RunConfig) -> float:
    """Training FLOPs per token: 6 N (forward + backward of the non-embedding weights) + 12 L D T (attention)."""
    shape = PRESET_SHAPES[config.model.preset]
    d, f, layers = shape.dim, shape.ffn_hidden, shape.n_layers
    n = layers * (4 * d * d + 3 * d * f)
    return 6.0 * n + 12.0 * layers * d * config.model.seq_len


def _mfu(tokens_per_s: float, config: RunConfig, devices: list[torch.device]) -> float | None:
    peaks = [peak_flops(d) for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return round(tokens_per_s * flops_per_token(config) / sum(p for p in peaks if p is not None), 4)


# ----------------------------------------------------------------------------- reference


def reference_throughput(config: RunConfig, device: torch.device) -> dict[str, Any]:
    """The single-process reference's training rate on ``device`` (same work as a pipeline iteration)."""
    corpus = load_run_corpus(config)
    batches = reference_batches(config, corpus)
    model = Transformer(model_config_for(config.model), seed=config.seed).to(device)
    opt = build_inner_optimizer(model.parameters(), config.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens, start = 0, time.perf_counter()
    for step, (x, y) in zip(range(config.train.steps), batches, strict=False):
        if step == WARMUP_ITERATIONS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, tokens = time.perf_counter(), 0
        set_lr(opt, lr_at(step, config.train))
        opt.zero_grad(set_to_none=True)
        for xm, ym in split_microbatches(x, y, config.train.microbatch_size):
            with autocast_context(device, config.train.precision):
                loss = lm_loss(model(xm.to(device, non_blocking=True)), ym.to(device, non_blocking=True))
            (loss / config.train.microbatches).backward()
        opt.step()
        tokens += x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)   # the queued kernels are part of the time
    rate = tokens / (time.perf_counter() - start)
    peak = int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None
    return {"tokens_per_s": round(rate, 1), "peak_memory_bytes": peak, "mfu": _mfu(rate, config, [device]),
            "device": str(device)}


# ----------------------------------------------------------------------------- node processes


class GpuMemorySampler:
    """Peak GPU memory per process id, and of every device together above what was used before the run
    (for drivers that do not list processes, e.g. in a PID namespace), from ``nvidia-smi`` every
    ``period_s`` (on a thread)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.peak: dict[int, int] = {}
        self.baseline_used = self._device_used() if shutil.which("nvidia-smi") else 0
        self.peak_used_above_baseline = 0
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuMemorySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _device_used() -> int:
        """Bytes used on every GPU together (0 when nvidia-smi does not answer)."""
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(int(x.strip()) << 20 for x in out.splitlines() if x.strip().isdigit())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_used_above_baseline = max(self.peak_used_above_baseline,
                                                self._device_used() - self.baseline_used)
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    pid, mib = int(parts[0]), int(parts[1])
                    self.peak[pid] = max(self.peak.get(pid, 0), mib << 20)
            self._stop.wait(self.period_s)


def run_nodes(overrides: list[str], devices: list[torch.device], count: int, work: Path,
              timeout_s: float) -> tuple[list[list[dict[str, Any]]], list[int | None], int | None]:
    """A coordinator and ``count`` node processes (node i prefers stage i, or 0 in data-parallel mode, on
    ``devices[i % n]``) until the run ends; each node's event records, its peak GPU memory, and the
    peak of all of them together (None without nvidia-smi)."""
    (work / "token").write_text(TOKEN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    data_parallel = "model.stages=1" in overrides
    with Supervisor(work) as supervisor, GpuMemorySampler() as sampler:   # every process dies with it
        coordinator = launch_coordinator(work / "run", log_path=supervisor.log_path("coordinator"),
                                         token_file=work / "token", overrides=overrides, env=env, cwd=work)
        supervisor.adopt("coordinator", coordinator.popen)
        nodes = [supervisor.spawn(f"node{i}", [
            sys.executable, "-m", "lowband.node.cli", "--coordinator", coordinator.address,
            "--token-file", str(work / "token"), "--device", str(devices[i % len(devices)]),
            "--preferred-stage", str(0 if data_parallel else i), "--log-json", str(work / f"node{i}.jsonl"),
            "--log-level", "WARNING"], env=env, cwd=work) for i in range(count)]
        deadline = time.monotonic() + timeout_s
        while any(node.alive() for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        timed_out = any(node.alive() for node in nodes)
        pids = [node.pid for node in nodes]
    if timed_out:
        raise RuntimeError(f"the nodes did not finish in {timeout_s:.0f} s; logs in {work}")
    records = []
    for i in range(count):
        path = work / f"node{i}.jsonl"
        records.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    peaks = [sampler.peak.get(pid) for pid in pids]
    return records, peaks, sampler.peak_used_above_baseline if sampler.available else None


def pipeline_throughput(config_overrides: list[str], config: RunConfig, devices: list[torch.device],
                        timeout_s: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lowband-gpu-"))
    records, peaks, together = run_nodes(config_overrides, devices, STAGES, work, timeout_s)
    its = [r for r in records[0] if r["kind"] == "iteration"]
    if len(its) <= WARMUP_ITERATIONS + 1:
        raise RuntimeError(f"the pipeline ran {len(its)} iterations; logs in {work}")
    first, last = its[WARMUP_ITERATIONS - 1], its[-1]   # from the end of the warm-up
    rate = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    shutil.rmtree(work, ignore_errors=True)   # kept only when the run failed, for its logs
    used = sorted(set(devices[i % len(devices)] for i in range(STAGES)), key=str)
    return {"tokens_per_s": round(rate, 1), "peak_memory_bytes": peaks, "peak_memory_bytes_all_nodes": together,
            "mfu": _mfu(rate, config, used),
            "devices": [str(d) for d in used], "abandoned": sum(r.get("abandoned", 0) for r in its)}


def diloco_against_reference(base: list[str], steps: int, inner_steps: int, devices: list[torch.device],
                             timeout_s: float) -> dict[str, Any]:
    """Streaming DiLoCo (2 replicas of the whole model, 3 fragments) against the reference on as many
    tokens (twice the steps: each replica trains on its own batches)."""
    replicas = 2
    overrides = [*base, "model.stages=1", f"train.steps={steps}", f"diloco.inner_steps={inner_steps}",
                 "diloco.fragments=3", "diloco.overlap=1", "train.eval_every=100000", "train.eval_batches=4"]
    work = Path(tempfile.mkdtemp(prefix="lowband-gpu-diloco-"))
    records, _, _ = run_nodes(overrides, devices, replicas, work, timeout_s)
    evals = [[r for r in node if r["kind"] == "eval"] for node in records]
    if not all(evals):
        raise RuntimeError(f"a DiLoCo replica never evaluated; logs in {work}")
    diloco_val = sum(e[-1]["val_loss"] for e in evals) / replicas
    tokens = sum(max((r.get("tokens", 0) for r in node if r["kind"] == "iteration"), default=0) for node in records)
    shutil.rmtree(work, ignore_errors=True)
    # the same settings (later overrides win), on as many tokens as the replicas together
    ref_config = apply_overrides(RunConfig(), [*overrides, f"train.steps={steps * replicas}"])
    with tempfile.TemporaryDirectory(prefix="lowband-gpu-ref-") as out:
        summary = train_reference(ref_config, Path(out), device=str(devices[0]), progress=False)
    ref_val = summary["final_val_loss"]
    return {"steps_per_replica": steps, "inner_steps": inner_steps, "fragments": 3, "replicas": replicas,
            "tokens": tokens, "reference_tokens": summary["tokens"], "diloco_val_loss": round(diloco_val, 4),
            "reference_val_loss": round(ref_val, 4), "gap": round(diloco_val / ref_val - 1.0, 4)}


# ----------------------------------------------------------------------------- main


def no_cuda_reason() -> str | None:
    """Why CUDA cannot be used here, None when it can."""
    if torch.version.cuda is None:
        return f"no CUDA device: this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (every visible GPU); cpu only to smoke-test this script")
    parser.add_argument("--preset", default="124m")
    parser.add_argument("--steps", type=int, default=30, help="iterations of the throughput runs")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8, help="per iteration (fills the pipeline)")
    parser.add_argument("--diloco-steps", type=int, default=100, help="inner steps per DiLoCo replica (0: skip)")
    parser.add_argument("--inner-steps", type=int, default=20, help="DiLoCo H")
    parser.add_argument("--timeout-s", type=float, default=420.0, help="per multi-process run")
    parser.add_argument("--activation-codec", default="bf16", choices=RAW_AND_QUANT,
                        help="the pipeline hops' codec (train.activation_codec; gradients use the same)")
    args = parser.parse_args(argv)

    reason = no_cuda_reason() if args.device == "cuda" else None
    if reason is not None:
        print(json.dumps({"cuda": False, "reason": reason}))
        return 0
    if args.device == "cuda":
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [torch.device("cpu")]
        torch.set_num_threads(1)
    overrides = _overrides(args.preset, args.steps, args.seq_len, args.microbatch_size, args.microbatches,
                           args.activation_codec)
    config = apply_overrides(RunConfig(), overrides)
    result: dict[str, Any] = {
        "cuda": args.device == "cuda",
        "device_names": [torch.cuda.get_device_name(d) for d in devices] if args.device == "cuda" else ["cpu"],
        "gpus": len(devices) if args.device == "cuda" else 0,
        "preset": args.preset, "stages": STAGES, "seq_len": args.seq_len, "microbatch_size": args.microbatch_size,
        "microbatches": args.microbatches, "steps": args.steps, "precision": config.train.precision,
        "activation_codec": config.train.activation_codec,
        "torch": torch.__version__, "flops_per_token": flops_per_token(config),
    }
    reference = reference_throughput(config, devices[0])
    # the same GPU count for both: the reference has one device, so the pipeline's nodes share as many
    pipeline = pipeline_throughput(overrides, config, devices[:1], args.timeout_s)
    result.update(reference=reference, pipeline=pipeline,
                  ratio=round(pipeline["tokens_per_s"] / reference["tokens_per_s"], 3))
    if len(devices) > 1:   # every GPU: the pipeline spread over them (the reference stays on one)
        spread = pipeline_throughput(overrides, config, devices, args.timeout_s)
        result["pipeline_all_gpus"] = spread
    if args.diloco_steps > 0:
        base = [o for o in overrides if not o.startswith(("model.stages=", "train.steps=", "train.eval"))]
        result["diloco"] = diloco_against_reference(base, args.diloco_steps, args.inner_steps, devices,
                                                    args.timeout_s)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
