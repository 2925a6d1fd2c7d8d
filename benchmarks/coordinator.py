"""Heartbeat throughput of one coordinator process under 1,000 simulated nodes.

Starts a real `lowband-coordinator serve` subprocess, joins N nodes from a few
client processes (grpc.aio, many concurrent calls over a few channels each),
then every node heartbeats in a loop (send, wait for the reply, sleep
--interval) for --duration seconds after a warm-up, either over one
HeartbeatStream per node (default) or with unary Heartbeat calls
(--mode unary). Prints one JSON object:

    python benchmarks/coordinator.py --json
    {"nodes": 1000, "heartbeats_per_s": ..., "p99_ms": ..., ...}

Target: at least 5,000 heartbeats/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from lowband.coordinator.launch import CoordinatorProcess, launch_coordinator
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.rpc import grpc_options, install_uvloop, token_metadata

TOKEN = "bench-token"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def start_coordinator(run_dir: Path, stages: int) -> CoordinatorProcess:
    return launch_coordinator(
        run_dir / "state", log_path=run_dir / "coordinator.log", log_level="WARNING",
        overrides=[f"model.stages={stages}", "membership.heartbeat_interval_s=1.0", "membership.lease_s=60"],
        env=dict(os.environ, LOWBAND_TOKEN=TOKEN), timeout_s=30)


async def _client(port: int, first: int, count: int, channels: int, interval: float, warmup: float,
                  duration: float, ready: Any, go: Any, mode: str) -> dict[str, Any]:
    md = token_metadata(TOKEN)
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) for _ in range(channels)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in chans]
    sem = asyncio.Semaphore(64)

    async def join(i: int) -> str:
        async with sem:
            reply = await stubs[i % channels].Join(
                pb.JoinRequest(address=f"10.0.{i // 250}.{i % 250 + 1}:7000", device="cpu", throughput=1.0 + i % 4,
                               version="bench", stage=-1, preferred_stage=-1, has_data=True),
                metadata=md, timeout=60)
            return reply.node_id

    ids = await asyncio.gather(*(join(first + i) for i in range(count)))
    ready.put(len(ids))
    await asyncio.to_thread(go.wait)  # every client has joined its nodes: start together
    start_at = time.time()
    latencies: list[float] = []
    errors = 0
    measure_from = start_at + warmup
    stop_at = measure_from + duration

    async def node(k: int, node_id: str) -> None:
        nonlocal errors
        stub = stubs[k % channels]
        stream = stub.HeartbeatStream(metadata=md) if mode == "stream" else None
        epoch = 0
        step = 0
        req = pb.HeartbeatRequest(node_id=node_id, metrics=pb.NodeMetrics(loss=2.0, tokens_per_s=1000.0,
                                                                          grad_norm=0.7))
        metrics = req.metrics
        await asyncio.sleep(max(0.0, start_at - time.time()) + interval * (k / max(1, count)))
        while True:
            t0 = time.perf_counter()
            now = time.time()
            if now >= stop_at:
                if stream is not None:
                    await stream.done_writing()
                return
            # One request object per node, updated in place: the clients share the machine with the server.
            req.epoch = epoch
            metrics.step = step
            metrics.bytes_sent = step * 1000
            metrics.bytes_received = step * 900
            try:
                if stream is None:
                    reply = await stub.Heartbeat(req, metadata=md, timeout=10)
                else:
                    await stream.write(req)
                    reply = await stream.read()
                epoch = reply.epoch
            except grpc.aio.AioRpcError:
                errors += now >= measure_from
                if stream is not None:
                    stream = stub.HeartbeatStream(metadata=md)
                continue
            if now >= measure_from:
                latencies.append(time.perf_counter() - t0)
            step += 1
            if interval > 0:
                await asyncio.sleep(interval)

    await asyncio.gather(*(node(k, i) for k, i in enumerate(ids)))
    for c in chans:
        await c.close()
    return {"latencies": latencies, "errors": errors}


def _client_proc(args: tuple[Any, ...], out: Any) -> None:
    install_uvloop()
    out.put(asyncio.run(_client(*args)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--mode", choices=("stream", "unary"), default="stream",
                        help="stream: one HeartbeatStream per node (what nodes should use); unary: one "
                             "Heartbeat call per beat")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels per client process")
    parser.add_argument("--interval", type=float, default=0.1, help="sleep between a node's heartbeats (s)")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--port", type=int, default=0,
                        help="use a coordinator already listening on 127.0.0.1:PORT (token: bench-token), e.g. "
                             "one started under a profiler")
    parser.add_argument("--server-pid", type=int, default=0, help="with --port: its pid, to measure its CPU")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lowband-bench-") as tmp:
        coordinator = start_coordinator(Path(tmp), args.stages) if not args.port else None
        port = coordinator.port if coordinator is not None else args.port
        try:
            ctx = mp.get_context("spawn")
            queue, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
            per = [args.nodes // args.clients + (i < args.nodes % args.clients) for i in range(args.clients)]
            procs = []
            first = 0
            for count in per:
                p = ctx.Process(target=_client_proc, args=((port, first, count, args.channels, args.interval,
                                                            args.warmup, args.duration, ready, go, args.mode), queue))
                p.start()
                procs.append(p)
                first += count
            joined = sum(ready.get(timeout=300) for _ in procs)
            assert joined == args.nodes, joined
            go.set()
            server_pid = coordinator.pid if coordinator is not None else args.server_pid
            time.sleep(args.warmup)
            cpu0 = _cpu_seconds(server_pid)
            time.sleep(args.duration)
            cpu1 = _cpu_seconds(server_pid)
            results = [queue.get(timeout=120 + args.duration) for _ in procs]
            for p in procs:
                p.join(timeout=30)
        finally:
            if coordinator is not None:
                coordinator.stop(timeout_s=10)

    lat = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["errors"] for r in results)

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else float("nan")

    cpu_us = (cpu1 - cpu0) * 1e6 / len(lat) if lat and cpu0 is not None and cpu1 is not None else None
    result = {
        "nodes": args.nodes,
        "heartbeats_per_s": round(len(lat) / args.duration, 1),
        "mode": args.mode,
        # Server CPU per heartbeat: robust to a busy machine; 1e6 / this = heartbeats/s one core can serve.
        "server_cpu_us_per_heartbeat": round(cpu_us, 1) if cpu_us else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "interval_s": args.interval,
        "client_processes": args.clients,
        "channels_per_client": args.channels,
        "duration_s": args.duration,
        "cpus": os.cpu_count(),
        "machine": platform.node(),
    }
    if not args.json:
        print(f"{result['heartbeats_per_s']:.0f} heartbeats/s from {args.nodes} nodes, "
              f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, {errors} errors", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
