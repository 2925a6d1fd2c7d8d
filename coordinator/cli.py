"""`lowband-coordinator`: run the coordinator (`serve`) or look at a running one (`status`).

    lowband-coordinator serve --bind 0.0.0.0:7000 --run-dir runs/a [--config run.toml] [--set k=v ...]
    lowband-coordinator status --coordinator HOST:PORT [--json] [--watch]

The run token comes from --token-file or the LOWBAND_TOKEN environment variable.
`serve` prints ``listening on HOST:PORT`` once bound and, with --port-file,
writes the port there (atomically), so a parent process started with
``--bind 127.0.0.1:0`` can find it (``lowband.coordinator.launch`` waits on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from lowband.coordinator.server import start_coordinator
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.rpc import grpc_options, install_uvloop, load_token, token_metadata

logger = logging.getLogger("lowband.coordinator.cli")

STATUS_TIMEOUT_S = 5.0   # one Status call; a healthy coordinator answers in milliseconds
STOP_GRACE_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowband-coordinator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the coordinator")
    serve.add_argument("--bind", default="0.0.0.0:7000", help="HOST:PORT to listen on (port 0: any free port)")
    serve.add_argument("--run-dir", required=True, type=Path, help="directory for the SQLite state (resumed if present)")
    serve.add_argument("--config", type=Path, help="run config TOML")
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config setting (repeatable)")
    serve.add_argument("--token-file", help="file holding the run token (default: $LOWBAND_TOKEN)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    serve.add_argument("--control-socket", type=Path,
                       help="also serve on this Unix socket (status then takes --coordinator unix:PATH)")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="show nodes, stage coverage, outer step and recent events")
    status.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    status.add_argument("--events", type=int, default=20, help="recent events to show")
    status.add_argument("--token-file", help="file holding the run token (default: $LOWBAND_TOKEN)")
    status.set_defaults(func=_status)

    args = parser.parse_args(argv)
    return int(args.func(args))


# -- serve -------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = load_token(args.token_file)
        config = RunConfig.from_toml(args.config) if args.config else RunConfig()
        config = apply_overrides(config, args.set)
    except (ValueError, ConfigError) as exc:
        print(f"lowband-coordinator: error: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    try:
        return asyncio.run(_serve_async(args, config, token))
    except (OSError, ConfigError) as exc:
        print(f"lowband-coordinator: error: {exc}", file=sys.stderr)
        return 1


async def _serve_async(args: argparse.Namespace, config: RunConfig, token: str) -> int:
    server = await start_coordinator(config, args.run_dir, token, args.bind, control_socket=args.control_socket)
    logger.info("resolved run config: %s", server.core.config.to_json())
    print(f"lowband-coordinator listening on {server.address}", flush=True)
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(f"{server.port}\n")
        os.replace(tmp, args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received: stopping (grace %.1f s)", STOP_GRACE_S)
    await server.stop(STOP_GRACE_S)
    return 0


# -- status ------------------------------------------------------------------------
def fetch_status(address: str, token: str, max_events: int = 20, timeout: float = STATUS_TIMEOUT_S) -> pb.StatusReply:
    """One Status call; raises grpc.RpcError."""
    with grpc.insecure_channel(address, options=grpc_options()) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        return stub.Status(pb.StatusRequest(max_events=max_events), metadata=token_metadata(token), timeout=timeout)


def status_dict(reply: pb.StatusReply, coordinator: str = "") -> dict[str, Any]:
    """The status as plain JSON-friendly data (what --json prints)."""
    nodes = []
    for n in reply.nodes:
        m = n.metrics
        nodes.append({
            "node_id": n.node_id, "address": n.address, "stage": n.stage, "state": n.state,
            "heartbeat_age_s": round(n.heartbeat_age_s, 3), "device": n.device, "throughput": n.throughput,
            "has_data": n.has_data, "memory_bytes": n.memory_bytes, "step": m.step, "outer_step": m.outer_step, "loss": m.loss,
            "tokens_per_s": m.tokens_per_s, "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received,
            "grad_norm": m.grad_norm,
        })
    return {
        "coordinator": coordinator,
        "epoch": reply.epoch,
        "outer_step": reply.outer_step,
        "stage_coverage": {str(k): v for k, v in sorted(reply.stage_coverage.items())},
        "nodes": nodes,
        "events": [json_format.MessageToDict(e, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True) for e in reply.events],
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000.0
    return f"{n:.1f}TB"


def format_status(data: dict[str, Any]) -> str:
    """A human-readable table of the status."""
    lines = [f"coordinator {data['coordinator']}  epoch {data['epoch']}  outer step {data['outer_step']}"]
    cov = "  ".join(f"{s}:{c}" for s, c in data["stage_coverage"].items())
    lines.append(f"stage coverage (live replicas)  {cov}")
    header = f"{'node':<16} {'address':<21} {'stage':>5} {'state':<10} {'hb age':>7} {'tok/s':>9} {'loss':>7} " \
             f"{'sent':>8} {'recv':>8} {'memory':>8}"
    lines += ["", header, "-" * len(header)]
    for n in sorted(data["nodes"], key=lambda n: (n["state"] not in ("alive", "recovering"), n["stage"], n["node_id"])):
        lines.append(f"{n['node_id']:<16} {n['address']:<21} {n['stage']:>5} {n['state']:<10} "
                     f"{n['heartbeat_age_s']:>6.1f}s {n['tokens_per_s']:>9.1f} {n['loss']:>7.3f} "
                     f"{_bytes(n['bytes_sent']):>8} {_bytes(n['bytes_received']):>8} "
                     f"{_bytes(n['memory_bytes']) if n['memory_bytes'] else '-':>8}")
    if not data["nodes"]:
        lines.append("(no nodes)")
    lines += ["", "recent events"]
    for e in data["events"]:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        lines.append(f"  {when} {e['kind']:<15} {e['node_id'] or '-':<16} stage {e['stage']:>2}  {e['detail']}")
    if not data["events"]:
        lines.append("  (none)")
    return "\n".join(lines)


def _status_error(address: str, exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"error: coordinator at {address} rejected the run token (wrong token?)"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"error: coordinator at {address} is unreachable ({code.name.lower()})"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"error: status call to {address} failed: {code.name if code else 'unknown'}: {details}"


def _status(args: argparse.Namespace) -> int:
    try:
        token = load_token(args.token_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        while True:
            try:
                reply = fetch_status(args.coordinator, token, max_events=max(0, min(args.events, 10_000)))
            except grpc.RpcError as exc:
                print(_status_error(args.coordinator, exc), file=sys.stderr)
                return 3 if exc.code() == grpc.StatusCode.UNAUTHENTICATED else 1
            data = status_dict(reply, args.coordinator)
            text = json.dumps(data, sort_keys=True) if args.json else format_status(data)
            if args.watch and not args.json and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(max(0.1, args.interval))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
