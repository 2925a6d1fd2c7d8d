"""`lowband-coordinator`: run the coordinator (`serve`) or look at a running one (`status`).

    lowband-coordinator serve --bind 0.0.0.0:7000 --run-dir runs/a [--config run.toml] [--set k=v ...]
                              [--http HOST:PORT [--viewer-token-file F] [--metrics-open]]
    lowband-coordinator status --coordinator HOST:PORT [--json] [--watch]
    lowband-coordinator export --coordinator HOST:PORT --out model.pt
    lowband-coordinator init-tls --dir DIR
    lowband-coordinator issue --dir DIR --name NODE [--host H ...]

The run token comes from --token-file or the LOWBAND_TOKEN environment variable.
`serve` prints ``listening on HOST:PORT`` once bound and, with --port-file,
writes the port there (atomically), so a parent process started with
``--bind 127.0.0.1:0`` can find it (``lowband.coordinator.launch`` waits on it).
With --http it also serves the dashboard (coordinator/dashboard.py), prints
``dashboard on http://HOST:PORT/`` and, with --http-port-file, writes that port
before the gRPC one. `status --json` prints the dashboard's status document
(coordinator/watch.py); `status --watch` keeps asking through a coordinator
restart, saying on stderr that it is reconnecting. `export` writes the model the live run
holds (every stage's θ_global, fetched from a replica: coordinator/export.py) to one file that
`lowband-sim eval` and `lowband-sim generate` read. `init-tls` makes a run CA and the coordinator's and
`admin`'s certificates in DIR, `issue` one node's (protocols/tls.py); `--tls-dir DIR` on `serve`, `status`
and `export` turns on mutual TLS (`serve` uses DIR/coordinator.crt, the clients DIR/admin.crt).
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

from lowband.coordinator.server import start_coordinator
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.rpc import grpc_options, install_uvloop, load_token, token_metadata
from lowband.protocols.tls import (
    ADMIN_NAME,
    COORDINATOR_NAME,
    TlsConfig,
    TlsError,
    init_ca,
    issue,
    load_tls,
    open_sync_channel,
    set_process_tls,
)
from lowband.protocols.tokenizer import run_tokenizer
from lowband.protocols.vocab import resolve_vocab

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
    serve.add_argument("--http", metavar="HOST:PORT",
                       help="serve the dashboard, /api/status and /metrics here (port 0: any free port)")
    serve.add_argument("--http-port-file", type=Path, help="write the dashboard's bound port here")
    serve.add_argument("--viewer-token-file",
                       help="file holding a read-only token for the dashboard (not accepted by the gRPC service)")
    serve.add_argument("--metrics-open", action="store_true",
                       help="serve /metrics without a token (for a scraper on a private network)")
    serve.add_argument("--tls-dir", type=Path,
                       help="mutual TLS with the run CA in this directory (DIR/ca.crt, DIR/coordinator.crt/.key)")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_serve)

    status = sub.add_parser("status", help="show nodes, stage coverage, outer step and recent events")
    status.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    status.add_argument("--events", type=int, default=20, help="recent events to show")
    status.add_argument("--token-file", help="file holding the run token (default: $LOWBAND_TOKEN)")
    status.add_argument("--tls-dir", type=Path, help="connect with mutual TLS (DIR/ca.crt, DIR/admin.crt/.key)")
    status.set_defaults(func=_status)

    export = sub.add_parser("export", help="write the live run's model (every stage's θ_global) to one file")
    export.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    export.add_argument("--out", required=True, type=Path, help="model file to write (a folder gets model.pt)")
    export.add_argument("--token-file", help="file holding the run token (default: $LOWBAND_TOKEN)")
    export.add_argument("--tls-dir", type=Path, help="connect with mutual TLS (DIR/ca.crt, DIR/admin.crt/.key)")
    export.set_defaults(func=_export)

    init_tls = sub.add_parser("init-tls", help="make a run CA and the coordinator's and admin's certificates")
    init_tls.add_argument("--dir", required=True, type=Path, help="directory for ca.crt, ca.key and certificates")
    init_tls.add_argument("--host", action="append", default=[],
                          help="an extra DNS name or IP address for the coordinator's certificate (repeatable)")
    init_tls.set_defaults(func=_init_tls)

    issue_cmd = sub.add_parser("issue", help="issue a node's certificate (NAME.crt, NAME.key) from the run CA")
    issue_cmd.add_argument("--dir", required=True, type=Path, help="the directory init-tls made")
    issue_cmd.add_argument("--name", required=True, help="the node id the certificate binds")
    issue_cmd.add_argument("--host", action="append", default=[],
                           help="an extra DNS name or IP address for the certificate (repeatable)")
    issue_cmd.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue_cmd.set_defaults(func=_issue)

    args = parser.parse_args(argv)
    return int(args.func(args))


# -- serve -------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = load_token(args.token_file)
        viewer_token = _read_token(args.viewer_token_file) if args.viewer_token_file else ""
        config = RunConfig.from_toml(args.config) if args.config else RunConfig()
        config = apply_overrides(config, args.set)
        tokenizer = run_tokenizer(config, args.run_dir)   # a BPE run's: trained once, kept in the run directory
        config = resolve_vocab(config, tokenizer)   # nodes without the data build the same model
        tls = load_tls(args.tls_dir, COORDINATOR_NAME)
    except (ValueError, OSError, ConfigError) as exc:
        print(f"lowband-coordinator: error: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    try:
        return asyncio.run(_serve_async(args, config, token, viewer_token, tls))
    except (OSError, ConfigError) as exc:
        print(f"lowband-coordinator: error: {exc}", file=sys.stderr)
        return 1


def _read_token(path: str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    return token


def _write_port(path: Path, port: int) -> None:
    """Atomically: a reader that sees the file sees the whole port."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


async def _serve_async(args: argparse.Namespace, config: RunConfig, token: str, viewer_token: str,
                       tls: TlsConfig | None) -> int:
    server = await start_coordinator(config, args.run_dir, token, args.bind, control_socket=args.control_socket,
                                     http=args.http, viewer_token=viewer_token, metrics_open=args.metrics_open,
                                     tls=tls)
    logger.info("resolved run config: %s", server.core.config.to_json())
    print(f"lowband-coordinator listening on {server.address}", flush=True)
    if server.dashboard is not None:
        print(f"lowband-coordinator dashboard on {server.dashboard.url}", flush=True)
        if args.http_port_file:
            _write_port(args.http_port_file, server.dashboard.port)
    if args.port_file:
        _write_port(args.port_file, server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received: stopping (grace %.1f s)", STOP_GRACE_S)
    await server.stop(STOP_GRACE_S)
    return 0


# -- status ---------------------------------------------------------------------
def fetch_status(address: str, token: str, max_events: int = 20, timeout: float = STATUS_TIMEOUT_S,
                 tls: TlsConfig | None = None) -> pb.StatusReply:
    """One Status call asking for the status document (over mutual TLS with ``tls``); raises grpc.RpcError."""
    with open_sync_channel(address, grpc_options(), tls) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        return stub.Status(pb.StatusRequest(max_events=max_events, document=True), metadata=token_metadata(token),
                           timeout=timeout)


def status_document(reply: pb.StatusReply, coordinator: str = "") -> dict[str, Any]:
    """The status document the coordinator built (the same JSON its ``/api/status`` serves)."""
    return {**json.loads(reply.status_json), "coordinator": coordinator}


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
    rejecting = [n for n in data["nodes"] if n.get("rejected_updates")]
    if rejecting:   # robust aggregation: whose pseudo-gradient parts each shard owner refused or clipped
        lines += ["", "rejected pseudo-gradient parts (by shard owner)"]
        for n in rejecting:
            peers = ", ".join(f"{p} x{c}" for p, c in n.get("rejected_peers", {}).items())
            lines.append(f"  {n['node_id']:<16} stage {n['stage']:>2}  {n['rejected_updates']:>5}  {peers}")
            if n.get("last_rejection"):
                lines.append(f"    last: {n['last_rejection']}")
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


def _reconnectable(exc: grpc.RpcError) -> bool:
    """A coordinator that is restarting (or briefly unreachable), as opposed to one that refuses us."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _client_token(args: argparse.Namespace) -> str | None:
    """The run token a client command was given (``--token-file`` or the environment); None after saying
    why there is none."""
    try:
        return load_token(args.token_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _client_tls(args: argparse.Namespace) -> tuple[bool, TlsConfig | None]:
    """(usable, the admin's TLS) for a client command given ``--tls-dir``; (False, None) after saying why not."""
    try:
        return True, load_tls(args.tls_dir, ADMIN_NAME)
    except TlsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False, None


def _status(args: argparse.Namespace) -> int:
    token = _client_token(args)
    ok, tls = _client_tls(args)
    if token is None or not ok:
        return 2
    if args.watch:   # a supervisor's SIGTERM ends the watch like Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    interval = max(0.1, args.interval)
    lost = False
    try:
        while True:
            try:
                reply = fetch_status(args.coordinator, token, max_events=max(0, min(args.events, 10_000)), tls=tls)
            except grpc.RpcError as exc:
                if not (args.watch and _reconnectable(exc)):
                    print(_status_error(args.coordinator, exc), file=sys.stderr)
                    return 3 if exc.code() == grpc.StatusCode.UNAUTHENTICATED else 1
                print(f"{_status_error(args.coordinator, exc)}: reconnecting in {interval:g} s",
                      file=sys.stderr, flush=True)
                lost = True
                time.sleep(interval)
                continue
            if lost:
                print(f"reconnected to {args.coordinator}", file=sys.stderr, flush=True)
                lost = False
            data = status_document(reply, args.coordinator)
            text = json.dumps(data, sort_keys=True) if args.json else format_status(data)
            if args.watch and not args.json and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# -- export ---------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    # Imported here, not at the top: export needs torch, and serve/status stay torch-free without it.
    from lowband.coordinator.export import ExportFailed, export_live

    token = _client_token(args)
    ok, tls = _client_tls(args)
    if token is None or not ok:
        return 2
    set_process_tls(tls)   # the channels to the coordinator and to each stage's replica
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(export_live(args.coordinator, token, args.out))
    except ExportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export interrupted: nothing written", file=sys.stderr)
        return 130
    for line in result.behind:
        print(f"warning: {line}", file=sys.stderr)
    for stage, steps in sorted(result.outer_steps.items()):
        frags = " ".join(f"{p}:{v}" for p, v in sorted(steps.items()))
        print(f"stage {stage} from {result.sources[stage]}: outer steps per fragment {frags}")
    print(f"wrote {result.path} ({result.num_stages} stages)")
    return 0


# -- TLS --------------------------------------------------------------------------------
def _init_tls(args: argparse.Namespace) -> int:
    try:
        init_ca(args.dir)
        issue(args.dir, COORDINATOR_NAME, hosts=tuple(args.host))
        issue(args.dir, ADMIN_NAME)
    except (TlsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run CA in {args.dir}: ca.crt, ca.key (keep it private), {COORDINATOR_NAME}.crt/.key, "
          f"{ADMIN_NAME}.crt/.key; issue each node's with `lowband-coordinator issue --dir {args.dir} --name ID`")
    return 0


def _issue(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("error: --days must be >= 1", file=sys.stderr)
        return 2
    try:
        path = issue(args.dir, args.name, hosts=tuple(args.host), days=args.days)
    except (TlsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.key')}: give them and ca.crt to node {args.name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
