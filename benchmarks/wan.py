"""Time to a target validation loss over real slow links: DDP, torchft DiLoCo, lowband (DP and full).

K hosts (default 8), each a network namespace of ``sim/netns.py`` whose uplink the kernel shapes
to ``--rate`` (htb). Every mode trains the same model (the ``tiny`` preset, seq_len 128) on the
same data (the default corpus, each host's origin reading its own disjoint shard) for the same
token budget (``--steps`` x ``--seqs-per-step`` x 128 tokens, the global batch of a step being the
same in every mode), with lowband's inner optimizer (AdamW and the lr schedule of
``lowband.protocols.config.TrainSection``, node/train/optim.py). The target validation loss is fixed first from
the single-process reference (node/train/reference.py, in this process, same tokens):
``--target-factor`` x its validation loss at the end of the budget, unless ``--target`` is given.

Modes:
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over gloo, one process per host: every
  step all-reduces the fp32 gradients (benchmarks/_wan_worker.py).
- ``torchft_diloco``: torchft 0.2.0's Streaming DiLoCo (its ``Lighthouse`` on a host of its own,
  one ``Manager`` replica group per host, ``DiLoCo`` with P fragments, H, tau and alpha as lowband's;
  fp32 fragments: torchft quantizes on CUDA only).
- ``lowband_dp``: lowband with ``model.stages = 1``: K origins, one Streaming DiLoCo group.
- ``lowband``: the whole system: 2 origins + 3 stages x 2 replicas (8 hosts), SkipPipe paths,
  Streaming DiLoCo, its default codecs. Both lowband modes run ``python -m sim.cli run`` with
  ``sim.network = "netns"`` and no scripted preemptions.

Measured per mode: ``time_to_target_s``: seconds from the moment every host is ready (process
start-up, imports and rendezvous excluded; lowband: from its last origin's step-0 validation) to
the first validation at or below the target, time spent validating left out (every lowband
origin validates; on a shared CPU that is K hosts' work at once); null if never reached.
``time_to_target_wall_s``: the same with validation. ``final_val_loss``: the last validation
(``final_val_step``: lowband's nodes do not validate after their last step). ``network_bytes``:
the kernel's tx counters of every host's interface, summed (the Lighthouse's and coordinator's
hosts included). ``peak_rss_bytes_per_host``: the largest VmHWM of any host's training process.
Ratios are time-to-target ratios, baseline / lowband mode (> 1: lowband reaches the target
sooner); ``*_val_vs_*``: validation loss over the baseline's at the same step.

    sudo .venv/bin/python benchmarks/wan.py --json                  # 20 Mbit/s, every mode
    sudo .venv/bin/python benchmarks/wan.py --json --rate 1000mbit
    sudo .venv/bin/python benchmarks/wan.py --modes ddp,torchft_diloco --steps 40

Needs root and iproute2 (namespaces); see benchmarks/wan.md for the runs and what they show.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowband.node.train.reference import train_reference  # noqa: E402
from lowband.protocols.config import RunConfig  # noqa: E402
from lowband.sim.netns import Host, TestNetwork  # noqa: E402
from lowband.sim.procs import Child, Supervisor  # noqa: E402

logger = logging.getLogger("wan")
MODES = ("ddp", "torchft_diloco", "lowband_dp", "lowband")
WORKER = Path(__file__).resolve().parent / "_wan_worker.py"
SEQ_LEN = 128
# Fixed ports are safe: every host is a namespace of its own, nothing else listens there.
MASTER_PORT, STORE_PORT, MANAGER_PORT, LIGHTHOUSE_PORT = 29500, 29600, 29700, 29510
TORCHFT_INSTALL = "pip install torchft==0.2.0, or pip install -e '.[bench]'; it keeps torch >= 2.7 as installed"


@dataclass(kw_only=True, slots=True)
class Bench:
    hosts: int = 8                   # ddp, torchft_diloco, lowband_dp; lowband: origins + stages x replicas
    rate_bps: float = 20e6
    steps: int = 80
    seqs_per_step: int = 16          # global batch: 16 x 128 = 2,048 tokens a step
    eval_every: int = 5
    val_seqs: int = 64               # the fixed held-out set: 64 windows of 128 tokens
    seed: int = 0
    target: float | None = None
    target_factor: float = 1.10      # see wan.md: the tightest round factor the baselines reach in budget
    # Streaming DiLoCo, the same for torchft_diloco, lowband_dp and lowband
    # The setting both DiLoCo implementations do best with at this budget (wan.md): plain averaging
    # of a fragment every 2 steps, each fragment every 6; H must be a multiple of P for torchft.
    inner_steps: int = 6             # H
    fragments: int = 3               # P
    overlap: int = 1                 # tau
    alpha: float = 0.5
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    lowband_origins: int = 2
    lowband_stages: int = 4
    lowband_replicas: int = 2
    lowband_microbatches: int = 4
    timeout_s: float = 900.0         # one mode's limit, start-up included

    def __post_init__(self) -> None:
        if self.hosts < 2:
            raise ValueError("--hosts must be >= 2")
        if self.seqs_per_step % self.hosts:
            raise ValueError(f"--seqs-per-step {self.seqs_per_step} must be a multiple of --hosts {self.hosts}")
        per_origin = self.seqs_per_step // self.lowband_origins
        if self.seqs_per_step % self.lowband_origins or per_origin % self.lowband_microbatches:
            raise ValueError(f"--seqs-per-step {self.seqs_per_step} must split into {self.lowband_origins} "
                             f"origins x {self.lowband_microbatches} microbatches")
        if self.inner_steps % self.fragments or self.overlap >= self.inner_steps // self.fragments:
            raise ValueError("torchft's DiLoCo needs H a multiple of P and tau < H / P")
        for per in (self.seqs_per_step, self.seqs_per_step // self.hosts, per_origin):
            if self.val_seqs % per:
                raise ValueError(f"--val-seqs {self.val_seqs} must be a multiple of every per-origin batch ({per})")


def parse_rate(text: str) -> float:
    """``20mbit``, ``1000mbit``, ``1gbit``, ``500kbit`` or plain bits/s (``20e6``) -> bits/s."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmg]?)(?:bit|bps|b)?(?:/s)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"rate {text!r}: expected e.g. 20mbit, 1000mbit, 1gbit or 20e6")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError("rate must be > 0")
    return value


# --------------------------------------------------------------------------- configs


def train_section(bench: Bench, *, origins: int, microbatches: int) -> dict[str, Any]:
    """[train] for `origins` origins sharing the global batch; the validation set is the same
    `val_seqs` windows whatever the per-origin batch (node.data.val_batches spaces n x B windows)."""
    per_origin = bench.seqs_per_step // origins
    return {"microbatch_size": per_origin // microbatches, "microbatches": microbatches,
            "steps": bench.steps, "eval_every": bench.eval_every, "eval_batches": bench.val_seqs // per_origin}


def diloco_section(bench: Bench) -> dict[str, Any]:
    return {"inner_steps": bench.inner_steps, "fragments": bench.fragments, "overlap": bench.overlap,
            "alpha": bench.alpha, "outer_lr": bench.outer_lr, "outer_momentum": bench.outer_momentum}


def run_config(bench: Bench, *, origins: int) -> RunConfig:
    """The reference's (origins=1) and the per-host baselines' run config; lr and schedule: defaults."""
    return RunConfig.from_dict({
        "run_id": "wan", "seed": bench.seed, "model": {"preset": "tiny", "seq_len": SEQ_LEN},
        "train": train_section(bench, origins=origins, microbatches=1)})


def lowband_toml(bench: Bench, mode: str) -> str:
    """The simulator config of a lowband mode: the default TOML's settings but for these, no preemptions."""
    if mode == "lowband_dp":
        origins, stages, replicas, microbatches = bench.hosts, 1, 1, 1
    else:
        origins, stages, replicas = bench.lowband_origins, bench.lowband_stages, bench.lowband_replicas
        microbatches = bench.lowband_microbatches
    train = train_section(bench, origins=origins, microbatches=microbatches)
    lines = [f"seed = {bench.seed}", "", "[model]", 'preset = "tiny"', f"stages = {stages}", f"seq_len = {SEQ_LEN}",
             "", "[train]", *(f"{k} = {v}" for k, v in train.items()),
             "", "[diloco]", *(f"{k} = {v}" for k, v in diloco_section(bench).items()),
             "", "[sim]", f"origins = {origins}", f"replicas_per_stage = {replicas}",
             "intra_latency_s = 0.0",          # ddp and torchft get no added latency either (no netem here)
             f"max_wall_s = {bench.timeout_s}",
             "preemptions = []", ""]          # replaces the default TOML's scripted preemptions
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurement helpers


def time_to_target(curve: list[dict[str, Any]], target: float, clock: str = "train_s") -> float | None:
    """Seconds (``clock``: ``train_s`` validation excluded, ``t`` wall) to the first validation at or
    below `target`; curve records carry step, tokens, t, train_s and val_loss."""
    for rec in curve:
        if rec.get("val_loss") is not None and rec["val_loss"] <= target:
            return round(rec[clock], 2)
    return None


def _union_within(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of `intervals` clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def lowband_curve(run_dir: Path, tokens_per_step: int) -> dict[str, Any]:
    """The validation curve of a simulator run, from its origins' own event logs (``nodes/*.jsonl``).

    Every origin evaluates its model at the same steps; a step's val_loss is their mean (as the
    simulator's metrics.jsonl has it), known when the last origin's ``eval`` event is written. The
    clock starts at the last origin's step-0 ``eval`` (every origin ready: joined, scheduled, data
    loaded). ``train_s`` leaves out the time any origin was validating (from its ``iteration`` event
    of that step to its ``eval`` event), as the per-host baselines leave out rank 0's. Returns the curve, and the
    seconds from the start to the last origin's last iteration (``budget_s``), validation in ``validation_s``.
    """
    evals: dict[int, list[tuple[float, float]]] = {}
    busy: list[tuple[float, float]] = []
    last_iteration = 0.0
    for path in sorted((run_dir / "nodes").glob("*.jsonl")):
        finished: dict[int, float] = {}   # step -> when this node's iteration of that step ended
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue   # a line cut by the node's exit
            if ev.get("kind") == "iteration":
                finished[int(ev["step"])] = ev["time"]
                last_iteration = max(last_iteration, ev["time"])
            elif ev.get("kind") == "eval" and ev.get("val_loss") is not None:
                step = int(ev["step"])
                evals.setdefault(step, []).append((ev["time"], ev["val_loss"]))
                if step in finished:   # an origin validates right after the iteration that ends the step
                    busy.append((finished[step], ev["time"]))
    if 0 not in evals:
        return {"curve": [], "budget_s": None, "validation_s": None}
    origins = len(evals[0])
    t0 = max(t for t, _ in evals[0])
    curve = []
    for step in sorted(evals):
        if len(evals[step]) < origins:   # some origin's evaluation did not finish before the run ended
            continue
        done = max(t for t, _ in evals[step])
        wall = max(0.0, done - t0)
        curve.append({"step": step, "tokens": step * tokens_per_step, "t": round(wall, 3),
                      "train_s": round(wall - _union_within(busy, t0, done), 3),
                      "val_loss": sum(v for _, v in evals[step]) / len(evals[step])})
    end = max(last_iteration, t0)
    return {"curve": curve, "budget_s": round(end - t0, 3), "validation_s": round(_union_within(busy, t0, end), 3)}


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(children: list[Child], timeout_s: float) -> str | None:
    """Wait for every child to exit; the first failure (or the timeout) as text, else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [(c, c.popen.poll()) for c in children]
        failed = [(c, code) for c, code in codes if code not in (None, 0)]
        if failed:
            c, code = failed[0]
            return f"{c.name} exited with {code}; its log ends:\n{_tail(c.log_path)}"
        if all(code == 0 for _, code in codes):
            return None
        if time.monotonic() > deadline:
            return f"timed out after {timeout_s:.0f} s (--timeout)"
        time.sleep(0.2)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "eth0",   # gloo would otherwise look up the machine's hostname
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    })
    return env


def _mode_result(target: float, curve: list[dict[str, Any]], network: dict[str, int], peak_rss: int,
                 tokens: int, *, budget_s: float | None, validation_s: float | None, **extra: Any) -> dict[str, Any]:
    """One mode's JSON. ``budget_s``: start to the end of the last step, validation included;
    ``budget_train_s``: the same without validation (the clock of ``time_to_target_s``)."""
    last = curve[-1] if curve else {}
    extra["budget_s"], extra["validation_s"] = budget_s, validation_s
    if budget_s is not None and validation_s is not None:
        extra["budget_train_s"] = round(budget_s - validation_s, 2)
    return {"time_to_target_s": time_to_target(curve, target), "final_val_loss": last.get("val_loss"),
            "network_bytes": sum(network.values()), "peak_rss_bytes_per_host": peak_rss, "tokens": tokens,
            "time_to_target_wall_s": time_to_target(curve, target, clock="t"), "final_val_step": last.get("step"),
            **extra, "network_bytes_per_host": network, "curve": curve}


# --------------------------------------------------------------------------- the reference


def run_reference(bench: Bench, out: Path) -> dict[str, Any]:
    """The single-process reference on the same tokens (global batch in one process, in this process)."""
    config = run_config(bench, origins=1)
    start = time.perf_counter()
    summary = train_reference(config, out / "reference", device="cpu", progress=False)
    curve = [json.loads(line) for line in (out / "reference" / "metrics.jsonl").read_text().splitlines()]
    return {"final_val_loss": summary["final_val_loss"], "initial_val_loss": summary["initial_val_loss"],
            "tokens": summary["tokens"], "train_s": round(time.perf_counter() - start, 2),
            "curve": [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
                      for r in curve if "val_loss" in r]}


# --------------------------------------------------------------------------- ddp and torchft


def run_host_mode(bench: Bench, mode: str, target: float, out: Path) -> dict[str, Any]:
    """ddp or torchft_diloco: one worker per namespace host, launched with ``host.wrap``."""
    if mode == "torchft_diloco":
        if importlib.util.find_spec("torchft") is None:
            return {"error": f"torchft is not installed ({TORCHFT_INSTALL})"}
        lighthouse_bin = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
        if not Path(lighthouse_bin).exists():
            return {"error": "torchft_lighthouse not found next to the Python executable"}
    mode_dir = out / mode
    mode_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(bench, origins=bench.hosts)
    env = _child_env()
    net = TestNetwork()
    network: dict[str, int] = {}
    error: str | None = "the test network did not start"
    try:
        net.start()
        with Supervisor(mode_dir / "logs") as sup:
            hosts: list[Host] = [net.add_host(f"h{i}", rate_bps=bench.rate_bps) for i in range(bench.hosts)]
            lighthouse = ""
            if mode == "torchft_diloco":
                lh = net.add_host("lighthouse", rate_bps=bench.rate_bps)
                lighthouse = f"http://{lh.address}:{LIGHTHOUSE_PORT}"
                sup.spawn("lighthouse", lh.wrap([
                    lighthouse_bin, "--min_replicas", str(bench.hosts), "--quorum_tick_ms", "100",
                    "--join_timeout_ms", "10000", "--bind", f"[::]:{LIGHTHOUSE_PORT}"]), env=env)
            workers = []
            for rank, host in enumerate(hosts):
                spec = {"mode": "ddp" if mode == "ddp" else "torchft", "rank": rank, "world": bench.hosts,
                        "config": config.to_dict(), "address": host.address, "master": hosts[0].address,
                        "master_port": MASTER_PORT, "store_port": STORE_PORT, "manager_port": MANAGER_PORT,
                        "lighthouse": lighthouse, "diloco": diloco_section(bench), "timeout_s": bench.timeout_s,
                        "result": str(mode_dir / f"result-{rank}.json")}
                (mode_dir / f"spec-{rank}.json").write_text(json.dumps(spec))
                Path(spec["result"]).unlink(missing_ok=True)
                workers.append(sup.spawn(f"{mode}-{rank}", host.wrap(
                    [sys.executable, str(WORKER), str(mode_dir / f"spec-{rank}.json")]), env=env, cwd=ROOT))
            error = _wait(workers, bench.timeout_s)
            network = net.tx_bytes()
    finally:
        net.close()
    if error:
        return {"error": error, "network_bytes": sum(network.values())}
    results = [json.loads((mode_dir / f"result-{r}.json").read_text()) for r in range(bench.hosts)]
    head = results[0]
    (mode_dir / "curve.json").write_text(json.dumps(head["curve"], indent=1))
    extra = {k: head[k] for k in ("outer_steps", "batches_committed") if k in head}
    curve = [{**rec, "train_s": round(rec["t"] - rec["eval_s"], 3)} for rec in head["curve"]]
    return _mode_result(target, curve, network, max(r["peak_rss_bytes"] for r in results), head["tokens"],
                        budget_s=head["train_s"], validation_s=head["eval_s"], hosts=len(network), **extra)


# --------------------------------------------------------------------------- lowband (the simulator)


def run_lowband(bench: Bench, mode: str, target: float, out: Path) -> dict[str, Any]:
    """lowband_dp or lowband through ``python -m sim.cli run`` with ``sim.network = netns``."""
    mode_dir = out / mode
    mode_dir.mkdir(parents=True, exist_ok=True)
    toml = mode_dir / "config.toml"
    toml.write_text(lowband_toml(bench, mode))
    run_dir = mode_dir / "run"
    argv = [sys.executable, "-m", "lowband.sim.cli", "run", "--config", str(toml),
            "--set", "sim.network=netns", "--set", f"sim.intra_bandwidth_Bps={bench.rate_bps / 8:.0f}",
            "--out", str(run_dir), "--no-progress"]
    with Supervisor(mode_dir / "logs") as sup:
        child = sup.spawn(mode, argv, env=_child_env(), cwd=ROOT)
        error = _wait([child], bench.timeout_s + 120)
    summary_path = run_dir / "summary.json"
    if error or not summary_path.exists():
        return {"error": error or "the simulator wrote no summary.json", "command": " ".join(argv)}
    summary = json.loads(summary_path.read_text())
    missing = [k for k in ("network_bytes", "peak_rss_bytes") if k not in summary]
    if missing:
        return {"error": f"the simulator's summary has no {', '.join(missing)}: sim.network = netns not in "
                         "this checkout?", "final_val_loss": summary.get("final_val_loss")}
    measured = lowband_curve(run_dir, bench.seqs_per_step * SEQ_LEN)
    network = summary["network_bytes"]["per_host"]
    rss = summary["peak_rss_bytes"]
    nodes_rss = [v for k, v in rss.get("per_host", {}).items() if k != "coordinator"]
    return _mode_result(target, measured["curve"], network, max(nodes_rss, default=rss.get("max", 0)),
                        summary.get("tokens", 0), budget_s=measured["budget_s"], validation_s=measured["validation_s"],
                        hosts=len(network), steps=summary.get("steps"),
                        sim_final_val_loss=summary.get("final_val_loss"))


# --------------------------------------------------------------------------- main


BRIEF = ("curve", "network_bytes_per_host")   # in result.json, not in the printed JSON


def _ratio(base: dict[str, Any] | None, mode: dict[str, Any] | None, key: str = "time_to_target_s") -> float | None:
    a, b = (base or {}).get(key), (mode or {}).get(key)
    return round(a / b, 3) if a is not None and b else None


def _ratio_at_least(base: dict[str, Any] | None, mode: dict[str, Any] | None) -> float | None:
    """When only `mode` reaches the target: the baseline's whole budget / `mode`'s time, a lower bound."""
    base, mode = base or {}, mode or {}
    if base.get("time_to_target_s") is not None or not mode.get("time_to_target_s"):
        return None
    return round(base["budget_train_s"] / mode["time_to_target_s"], 3) if base.get("budget_train_s") else None


def _val_vs(base: dict[str, Any] | None, mode: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation loss of `mode` / `base` at the same tokens: `mode`'s last validation step."""
    curve = (mode or {}).get("curve") or []
    if not curve or not (base or {}).get("curve"):
        return None
    step = curve[-1]["step"]
    at = {r["step"]: r["val_loss"] for r in base["curve"]}   # type: ignore[index]
    if step not in at:
        return None
    return {"step": step, "ratio": round(curve[-1]["val_loss"] / at[step], 4)}


def run(bench: Bench, modes: list[str], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    logger.info("reference: %d steps x %d tokens", bench.steps, bench.seqs_per_step * SEQ_LEN)
    reference = run_reference(bench, out)
    target = bench.target if bench.target is not None else round(reference["final_val_loss"] * bench.target_factor, 4)
    logger.info("reference val loss %.4f -> target %.4f", reference["final_val_loss"], target)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        logger.info("mode %s: %d hosts at %.0f Mbit/s", mode, bench.hosts, bench.rate_bps / 1e6)
        started = time.monotonic()
        if mode in ("ddp", "torchft_diloco"):
            results[mode] = run_host_mode(bench, mode, target, out)
        else:
            results[mode] = run_lowband(bench, mode, target, out)
        results[mode]["wall_s"] = round(time.monotonic() - started, 1)
        logger.info("mode %s: %s", mode, json.dumps({k: v for k, v in results[mode].items() if k not in BRIEF}))
        (out / "modes.json").write_text(json.dumps(results, indent=1))
    doc: dict[str, Any] = {
        "rate_mbit": round(bench.rate_bps / 1e6, 3),
        "target_val_loss": target,
        "modes": results,
        "lowband_vs_ddp": _ratio(results.get("ddp"), results.get("lowband")),
        "lowband_dp_vs_torchft": _ratio(results.get("torchft_diloco"), results.get("lowband_dp")),
        # only the lowband mode reached the target: baseline's whole budget / lowband's time (a lower bound)
        "lowband_vs_ddp_at_least": _ratio_at_least(results.get("ddp"), results.get("lowband")),
        "lowband_dp_vs_torchft_at_least": _ratio_at_least(results.get("torchft_diloco"), results.get("lowband_dp")),
        # the same ratios on the wall clock (validation included)
        "lowband_vs_ddp_wall": _ratio(results.get("ddp"), results.get("lowband"), "time_to_target_wall_s"),
        "lowband_dp_vs_torchft_wall": _ratio(results.get("torchft_diloco"), results.get("lowband_dp"),
                                             "time_to_target_wall_s"),
        # validation loss at equal tokens (goal: lowband within 2% of ddp, ratio <= 1.02)
        "lowband_val_vs_ddp": _val_vs(results.get("ddp"), results.get("lowband")),
        "lowband_dp_val_vs_torchft": _val_vs(results.get("torchft_diloco"), results.get("lowband_dp")),
        "reference": reference,
        "settings": asdict(bench),
    }
    (out / "result.json").write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Bench()
    p.add_argument("--json", action="store_true", help="print only the result JSON on stdout")
    p.add_argument("--rate", type=parse_rate, default=d.rate_bps, help="every uplink, e.g. 20mbit (default), 1000mbit")
    p.add_argument("--hosts", type=int, default=d.hosts, help="K hosts (default 8)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps of the budget (default {d.steps})")
    p.add_argument("--seqs-per-step", type=int, default=d.seqs_per_step,
                   help=f"global batch in sequences of {SEQ_LEN} tokens (default {d.seqs_per_step})")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    p.add_argument("--val-seqs", type=int, default=d.val_seqs, help="held-out windows of the validation set")
    p.add_argument("--target", type=float, default=None, help="target validation loss (default: from the reference)")
    p.add_argument("--target-factor", type=float, default=d.target_factor,
                   help=f"target = this x the reference's final validation loss (default {d.target_factor})")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps, help="DiLoCo H for every DiLoCo mode")
    p.add_argument("--fragments", type=int, default=d.fragments, help="Streaming DiLoCo fragments P")
    p.add_argument("--overlap", type=int, default=d.overlap, help="steps a fragment's exchange overlaps (tau)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="merge weight of the local weights")
    p.add_argument("--outer-lr", type=float, default=d.outer_lr, help="outer SGD learning rate")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="outer Nesterov momentum (0: plain SGD)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds one mode may take")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/wan-<rate>mbit)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    try:
        bench = Bench(hosts=args.hosts, rate_bps=args.rate, steps=args.steps, seqs_per_step=args.seqs_per_step,
                      eval_every=args.eval_every, val_seqs=args.val_seqs, target=args.target,
                      target_factor=args.target_factor, inner_steps=args.inner_steps, fragments=args.fragments,
                      overlap=args.overlap, alpha=args.alpha, outer_lr=args.outer_lr,
                      outer_momentum=args.outer_momentum, seed=args.seed, timeout_s=args.timeout)
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(1)
    out = args.out or ROOT / "runs" / f"wan-{args.rate / 1e6:g}mbit"

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)   # unwinds through every finally: children killed, namespaces removed

    signal.signal(signal.SIGTERM, on_sigterm)
    doc = run(bench, modes, out)
    if args.json:
        brief = {m: {k: v for k, v in r.items() if k not in BRIEF} for m, r in doc["modes"].items()}
        reference = {k: v for k, v in doc["reference"].items() if k != "curve"}
        print(json.dumps({**doc, "modes": brief, "reference": reference}, indent=1))
    else:
        print(f"rate {doc['rate_mbit']} Mbit/s, target val loss {doc['target_val_loss']} "
              f"(reference {doc['reference']['final_val_loss']:.4f})")
        for mode, r in doc["modes"].items():
            if "error" in r:
                print(f"  {mode:15s} error: {r['error'].splitlines()[0]}")
                continue
            ttt = r["time_to_target_s"]
            print(f"  {mode:15s} time to target {'-' if ttt is None else f'{ttt:.1f} s':>9s}  "
                  f"final val {r['final_val_loss']:.4f}  {r['network_bytes'] / 1e6:9.1f} MB  "
                  f"peak RSS {r['peak_rss_bytes_per_host'] / 2**20:.0f} MiB")
        print(f"  lowband_vs_ddp {doc['lowband_vs_ddp']}  lowband_dp_vs_torchft {doc['lowband_dp_vs_torchft']}")
        print(f"  written to {out / 'result.json'}")
    return 0 if not any("error" in r for r in doc["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
