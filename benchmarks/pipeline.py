"""Pipeline data-plane benchmark: cost of one hop, and pipeline throughput against the reference.

    python benchmarks/pipeline.py --json

- ``hop_ms``: one activation hop on loopback as the node does it: encode (the
  activation codec, bf16 by default), send to a node process, decode and check
  there, acknowledge. ``--transport wire`` (the default, what nodes use): the
  activation wire (node/pipeline/wire.py), a framed TCP connection beside the node's gRPC
  service, whose receiver reads the payload straight into the decoded tensor.
  ``--transport grpc``: the gRPC fallback for peers without a wire (a ``Forward`` call
  streaming the message in chunks). The activation is sized so that 1 MiB goes on the
  wire. Fastest repetition (see below); ``hop_ms_median`` is the median.
  ``activation_bytes_per_hop``: what the transport counted as sent per hop (the tensor's
  metadata and payload; on gRPC the whole serialized message).
- ``raw_socket_ms``: the same bytes over a plain TCP socket to a process that reads them
  and answers one byte (the floor any transport pays on this machine, in Python). Fastest
  repetition; ``raw_socket_ms_median`` is the median.
- ``hop_overhead_ratio`` = hop_ms / raw_socket_ms (target <= 2.0), from the fastest repetition
  of each: on a shared, busy machine the minimum is the closest to the uncontended cost, and the
  raw socket's median is inflated by load far less than the gRPC hop's (one syscall pair against
  two event loops), so a ratio of medians measures the machine's load as much as the code.
  ``hop_overhead_ratio_median`` is the ratio of medians. ``encode_ms``/``decode_ms``: the codec's
  share of the hop (fastest of each, measured in the client process; on the wire, decoding is
  allocating the tensor the payload is read into, plus the finite check). ``hop_cpu_ms`` /
  ``raw_socket_cpu_ms`` / ``hop_cpu_ratio``: CPU time per hop of sender and receiver together
  (all threads; Linux /proc), which waiting for a busy machine's cores does not inflate.
- ``tls_hop_ms`` (fastest) / ``tls_hop_ms_median`` / ``tls_hop_cpu_ms``: the same hop with mutual TLS
  (protocols/tls.py: TLS 1.3 on the wire, or gRPC's TLS with ``--transport grpc``) to a third process, timed in
  the same loop as the plaintext hop (alternating which goes first), so both see the same load;
  ``tls_hop_ratio`` = tls_hop_ms / hop_ms (fastest of each), ``tls_hop_ratio_median`` of the medians,
  ``tls_hop_cpu_ratio`` of the CPU per hop. ``--no-tls`` leaves it out.
- ``--quickstart-pairs N`` (alone: no hop, no pipeline): the README's quick start (``lowband-sim run``
  with its defaults) N times with TLS and N times with ``--no-tls``, interleaved (TLS first, then
  plaintext, ...); ``quickstart_tokens_per_s``: tokens per second over the training (from the first
  metrics record with tokens to the last), one value per run, and ``quickstart_tls_ratio`` = mean with
  TLS / mean without.
- ``pipeline_tokens_per_s``: a 4-node pipeline (1 origin + 3 stage nodes, separate
  processes, plus a coordinator) training the same model; ``reference_tokens_per_s``:
  the single-process reference on the same config. On a machine with fewer cores than
  processes the pipeline cannot win; the number shows the overhead of distributing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowband.coordinator.launch import launch_coordinator  # noqa: E402
from lowband.node.pipeline.payload import SegmentedPayload, build_microbatch, receive_target  # noqa: E402
from lowband.node.pipeline.transport import Transport  # noqa: E402
from lowband.node.service import NodeServicer, start_server, start_wire  # noqa: E402
from lowband.protocols import node_pb2  # noqa: E402
from lowband.protocols.codec import check_finite, decode, encode, native_codec, tensor_bytes  # noqa: E402
from lowband.protocols.rpc import install_uvloop  # noqa: E402
from lowband.protocols.tls import TlsConfig, init_ca, issue  # noqa: E402
from lowband.sim.procs import Supervisor  # noqa: E402

TOKEN = "bench-token"
WIRE_BYTES = 1 << 20


# ----------------------------------------------------------------------------- hop


class _SinkAgent:
    """Does what PipelineAgent.accept does with an arriving tensor (decode, validate), then drops it."""

    def accept(self, header: node_pb2.MicrobatchHeader, tensor: Any, *, backward: bool,
               payload: memoryview | None = None, decoded: torch.Tensor | None = None) -> None:
        if decoded is not None:
            h = decoded   # read in place by the wire, which checked it finite as it arrived
        else:
            h = decode(tensor, payload=payload, require_checksum=payload is None, require_finite=True)
        assert h.ndim == 3


def _node_server(port_queue: Any, stop_event: Any, use_wire: bool, tls_dir: str = "") -> None:
    torch.set_num_threads(1)
    install_uvloop()
    tls = TlsConfig.load(tls_dir, "sink") if tls_dir else None

    async def main() -> None:
        servicer = NodeServicer("sink")
        servicer.agent = _SinkAgent()  # type: ignore[assignment]
        server, port = await start_server(servicer, "127.0.0.1:0", TOKEN, tls=tls)
        wire = await start_wire(servicer, "127.0.0.1", TOKEN, tls=tls) if use_wire else None
        port_queue.put(port)
        while not stop_event.is_set():
            await asyncio.sleep(0.1)
        if wire is not None:
            await wire.stop()
        await server.stop(None)

    asyncio.run(main())


def _raw_server(port_queue: Any) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        got = 0
        while got < n:
            got += conn.recv_into(view[got:n])
        conn.sendall(b"k")


def _activation(codec: str) -> torch.Tensor:
    per_elem = {"fp32": 4, "bf16": 2, "fp16": 2}[codec]
    numel = WIRE_BYTES // per_elem
    dim = 512
    return torch.randn(4, numel // (4 * dim), dim)


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used; NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_hops(reps: int, codec: str, wire: bool = True, tls: bool = True) -> dict[str, float]:
    """ms of a hop, of the same hop with mutual TLS (``tls``) and of a raw-socket send of the same bytes
    (fastest and median), interleaved so that all see the same machine load (this matters on a shared,
    busy machine)."""
    ctx = mp.get_context("spawn")
    grpc_ports, raw_ports, tls_ports, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    tls_dir = Path(tempfile.mkdtemp(prefix="lowband-bench-tls-"))
    init_ca(tls_dir)
    for name in ("sink", "o"):
        issue(tls_dir, name)
    grpc_proc = ctx.Process(target=_node_server, args=(grpc_ports, stop, wire), daemon=True)
    raw_proc = ctx.Process(target=_raw_server, args=(raw_ports,), daemon=True)
    tls_proc = ctx.Process(target=_node_server, args=(tls_ports, stop, wire, str(tls_dir)), daemon=True)
    procs = [grpc_proc, raw_proc, *([tls_proc] if tls else [])]
    for proc in procs:
        proc.start()
    try:
        grpc_port, raw_port = grpc_ports.get(timeout=60), raw_ports.get(timeout=60)
        tls_port = tls_ports.get(timeout=60) if tls else 0
        activation = _activation(codec)
        sock = socket.create_connection(("127.0.0.1", raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = encode(activation, codec, compress=False).SerializeToString()
        head = struct.pack("<Q", len(payload))

        def raw_send() -> float:
            start = time.perf_counter()
            sock.sendall(head)
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("raw server misbehaved")
            return time.perf_counter() - start

        header = node_pb2.MicrobatchHeader(run_id="bench", iteration=0, microbatch=0, origin_id="o",
                                           stages=[0, 1, 0], node_ids=["o", "sink", "o"], hop=1)

        async def hop(transport: Transport, address: str) -> tuple[float, float]:
            """Seconds and this process's CPU seconds of one hop."""
            start, cpu_start = time.perf_counter(), time.process_time()
            ack = await transport.send_microbatch(address, False, header, activation, codec, timeout_s=30)
            if not ack.ok:
                raise RuntimeError(ack.message)
            return time.perf_counter() - start, time.process_time() - cpu_start

        async def client() -> tuple[list[float], list[float], list[float]]:
            transport = Transport(TOKEN, wire=wire)
            tls_transport = Transport(TOKEN, wire=wire, tls=TlsConfig.load(tls_dir, "o")) if tls else None
            address, tls_address = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{tls_port}"
            hops, raws, tls_hops = [], [], []
            for i in range(reps + 5):
                if i == 5:   # warm-up over: channel setup, HTTP/2 window growth
                    cpu["hop_server"] = -_proc_cpu_s(grpc_proc.pid or 0)
                    cpu["raw_server"] = -_proc_cpu_s(raw_proc.pid or 0)
                    cpu["tls_server"] = -_proc_cpu_s(tls_proc.pid or 0) if tls else 0.0
                    cpu["hop_client"] = cpu["raw_client"] = cpu["tls_client"] = 0.0
                plain = tls_hop = (0.0, 0.0)
                if tls_transport is not None and i % 2:   # which goes first alternates
                    tls_hop = await hop(tls_transport, tls_address)
                plain = await hop(transport, address)
                if tls_transport is not None and not i % 2:
                    tls_hop = await hop(tls_transport, tls_address)
                cpu_mid = time.process_time()
                raw = raw_send()
                if i >= 5:
                    hops.append(plain[0])
                    raws.append(raw)
                    tls_hops.append(tls_hop[0])
                    cpu["hop_client"] += plain[1]
                    cpu["tls_client"] += tls_hop[1]
                    cpu["raw_client"] += time.process_time() - cpu_mid
            cpu["hop_server"] += _proc_cpu_s(grpc_proc.pid or 0)
            cpu["raw_server"] += _proc_cpu_s(raw_proc.pid or 0)
            if tls:
                cpu["tls_server"] += _proc_cpu_s(tls_proc.pid or 0)
            sent["activation_bytes_per_hop"] = transport.activation_bytes_sent / (reps + 5)
            await transport.close()
            if tls_transport is not None:
                await tls_transport.close()
            return hops, raws, tls_hops

        cpu: dict[str, float] = {}
        sent: dict[str, float] = {}
        install_uvloop()
        hops, raws, tls_hops = asyncio.run(client())
        if tls:
            sent.update({"tls_hop_ms": 1000 * min(tls_hops), "tls_hop_ms_median": 1000 * statistics.median(tls_hops),
                         "tls_hop_cpu_ms": 1000 * (cpu["tls_client"] + cpu["tls_server"]) / reps})
        sock.close()
        encodes, decodes = [], []
        scratch = bytearray(4 * activation.numel())   # the wire connection's cast buffer
        for _ in range(reps):
            start = time.perf_counter()   # what the transport does before the first byte goes out
            out = build_microbatch(header, activation, codec)
            data = out.payload
            segments = list(data.segments(scratch if wire else None)) if isinstance(data, SegmentedPayload) else [data]
            msg = out.meta if wire else out.whole()
            encodes.append(time.perf_counter() - start)
            if wire:   # the receiver reads the payload straight into this tensor (the socket's work), checks it
                start = time.perf_counter()
                target = receive_target(msg, len(data))
                allocated = time.perf_counter() - start
                assert target is not None
                view, offset = tensor_bytes(target), 0
                for segment in segments:
                    view[offset:offset + len(segment)] = segment
                    offset += len(segment)
                start = time.perf_counter()
                check_finite(target)
                decodes.append(allocated + time.perf_counter() - start)
            else:
                start = time.perf_counter()
                check_finite(decode(msg))
                decodes.append(time.perf_counter() - start)
        return {"hop_ms": 1000 * min(hops), "raw_socket_ms": 1000 * min(raws),
                "hop_ms_median": 1000 * statistics.median(hops), "raw_socket_ms_median": 1000 * statistics.median(raws),
                "encode_ms": 1000 * min(encodes), "decode_ms": 1000 * min(decodes),
                # CPU per hop, both processes (and all their threads): what load cannot inflate much
                "hop_cpu_ms": 1000 * (cpu["hop_client"] + cpu["hop_server"]) / reps,
                "raw_socket_cpu_ms": 1000 * (cpu["raw_client"] + cpu["raw_server"]) / reps, **sent}
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        shutil.rmtree(tls_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- throughput


def _overrides(steps: int) -> list[str]:
    return ["model.stages=4", "model.seq_len=128", "train.microbatch_size=8", "train.microbatches=4",
            f"train.steps={steps}", "train.eval_every=100000", "train.eval_batches=1",
            "train.hop_timeout_s=30", "membership.heartbeat_interval_s=0.5", "membership.lease_s=10"]


def reference_tokens_per_s(steps: int) -> float:
    from lowband.node.train.data import load_run_corpus, split_microbatches
    from lowband.node.train.model import Transformer, lm_loss, model_config_for
    from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
    from lowband.node.train.reference import reference_batches
    from lowband.protocols.config import RunConfig, apply_overrides

    config = apply_overrides(RunConfig(), _overrides(steps))
    corpus = load_run_corpus(config)
    batches = reference_batches(config, corpus)
    model = Transformer(model_config_for(config.model), seed=config.seed)
    opt = build_inner_optimizer(model.parameters(), config.train)
    tokens, start = 0, 0.0
    for step, (x, y) in zip(range(steps), batches, strict=False):
        if step == 2:   # skip warm-up steps, as for the pipeline
            start, tokens = time.perf_counter(), 0
        set_lr(opt, lr_at(step, config.train))
        opt.zero_grad(set_to_none=True)
        # same work as the pipeline: microbatches accumulated into one step
        for xm, ym in split_microbatches(x, y, config.train.microbatch_size):
            (lm_loss(model(xm), ym) / config.train.microbatches).backward()
        opt.step()
        tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def pipeline_tokens_per_s(steps: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="lowband-bench-"))
    (work / "token").write_text(TOKEN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with Supervisor(work) as supervisor:   # every process group it started dies with it, however this ends
        coordinator = launch_coordinator(work / "run", log_path=supervisor.log_path("coordinator"),
                                         token_file=work / "token", overrides=_overrides(steps), env=env, cwd=work)
        supervisor.adopt("coordinator", coordinator.popen)
        address = coordinator.address
        nodes = [supervisor.spawn(f"node{stage}", [
            sys.executable, "-m", "lowband.node.cli", "--coordinator", address, "--token-file", str(work / "token"),
            "--device", "cpu", "--preferred-stage", str(stage), "--log-json", str(work / f"node{stage}.jsonl"),
            "--log-level", "WARNING"], env=env, cwd=work) for stage in range(4)]
        deadline = time.monotonic() + 600
        while any(node.alive() for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
    records = [json.loads(line) for line in (work / "node0.jsonl").read_text().splitlines()]
    its = [r for r in records if r["kind"] == "iteration"]
    if len(its) < 4:
        raise RuntimeError(f"pipeline ran {len(its)} iterations; logs in {work}")
    first, last = its[1], its[-1]   # from the end of iteration 2: warm-up excluded
    shutil.rmtree(work, ignore_errors=True)   # kept only when the run failed, for its logs
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def quickstart_tokens_per_s(tls: bool) -> dict[str, float]:
    """One run of the README's quick start (``lowband-sim run`` with its defaults), with or without TLS:
    tokens per second over the training and the run's wall time."""
    work = Path(tempfile.mkdtemp(prefix="lowband-quickstart-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "lowband.sim.cli", "run", "--out", str(work / "run"), "--no-progress",
            *([] if tls else ["--no-tls"])]
    done = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"quick start failed ({done.returncode}); logs in {work}: {done.stderr[-2000:]}")
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("tokens", 0) > 0]
    first, last = trained[0], trained[-1]
    summary = json.loads((work / "run" / "summary.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["t"] - first["t"]),
            "wall_s": summary["wall_s"], "final_val_loss": summary["final_val_loss"]}


def quickstart_pairs(pairs: int) -> dict[str, Any]:
    """``pairs`` quick starts with TLS and as many without, interleaved, and the ratio of their means."""
    runs: dict[str, list[dict[str, float]]] = {"tls": [], "plaintext": []}
    for _ in range(pairs):
        for key, tls in (("tls", True), ("plaintext", False)):
            runs[key].append(quickstart_tokens_per_s(tls))
    mean = {k: statistics.mean(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    return {"quickstart_tokens_per_s": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in runs.items()},
            "quickstart_wall_s": {k: [r["wall_s"] for r in v] for k, v in runs.items()},
            "quickstart_final_val_loss": {k: [round(r["final_val_loss"], 4) for r in v] for k, v in runs.items()},
            "quickstart_tls_ratio": round(mean["tls"] / mean["plaintext"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=400,
                        help="hops to time (and raw sends): the fastest of each is the headline, so more reps give a steadier floor")
    parser.add_argument("--codec", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=12, help="training iterations for the throughput runs")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the hop measurement")
    parser.add_argument("--transport", default="wire", choices=("wire", "grpc"),
                        help="hop over the activation wire (what nodes use) or over its gRPC fallback")
    parser.add_argument("--no-tls", action="store_true", help="no TLS hop beside the plaintext one")
    parser.add_argument("--quickstart-pairs", type=int, default=0, metavar="N",
                        help="only the quick start's tokens/s, N runs with TLS and N without, interleaved")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quickstart_pairs > 0:
        print(json.dumps({**quickstart_pairs(args.quickstart_pairs), "cpus": os.cpu_count()}))
        return 0
    hop = measure_hops(args.reps, args.codec, wire=args.transport == "wire", tls=not args.no_tls)
    result: dict[str, Any] = {"hop_ms": round(hop["hop_ms"], 3), "raw_socket_ms": round(hop["raw_socket_ms"], 3),
                              # the fastest of each: closest to the uncontended cost on a busy machine
                              "hop_overhead_ratio": round(hop["hop_ms"] / hop["raw_socket_ms"], 2),
                              "hop_ms_median": round(hop["hop_ms_median"], 3),
                              "raw_socket_ms_median": round(hop["raw_socket_ms_median"], 3),
                              "hop_overhead_ratio_median": round(hop["hop_ms_median"] / hop["raw_socket_ms_median"], 2),
                              "encode_ms": round(hop["encode_ms"], 3), "decode_ms": round(hop["decode_ms"], 3),
                              "hop_cpu_ms": round(hop["hop_cpu_ms"], 3),
                              "raw_socket_cpu_ms": round(hop["raw_socket_cpu_ms"], 3),
                              "hop_cpu_ratio": round(hop["hop_cpu_ms"] / hop["raw_socket_cpu_ms"], 2),
                              "activation_bytes_per_hop": round(hop["activation_bytes_per_hop"])}
    if "tls_hop_ms" in hop:
        result.update({"tls_hop_ms": round(hop["tls_hop_ms"], 3), "tls_hop_ms_median": round(hop["tls_hop_ms_median"], 3),
                       "tls_hop_ratio": round(hop["tls_hop_ms"] / hop["hop_ms"], 2),
                       "tls_hop_ratio_median": round(hop["tls_hop_ms_median"] / hop["hop_ms_median"], 2),
                       "tls_hop_cpu_ms": round(hop["tls_hop_cpu_ms"], 3),
                       "tls_hop_cpu_ratio": round(hop["tls_hop_cpu_ms"] / hop["hop_cpu_ms"], 2)})
    if not args.skip_pipeline:
        result["pipeline_tokens_per_s"] = round(pipeline_tokens_per_s(args.steps), 1)
        result["reference_tokens_per_s"] = round(reference_tokens_per_s(args.steps), 1)
    result.update({"wire_bytes": WIRE_BYTES, "codec": args.codec, "transport": args.transport, "grpc": grpc.__version__,
                   "native_codec": native_codec(), "cpus": os.cpu_count()})
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
