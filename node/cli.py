"""`lowband-node`: run one node of a lowband training run.

    lowband-node --coordinator HOST:PORT [--token-file F] [--listen HOST:PORT] [--device auto] [--data PATH]

Simulator flags: ``--slowdown F`` (compute slow-down factor), ``--links-file F``
(JSON per-peer latency_s/bandwidth_Bps emulation), ``--node-id``,
``--preferred-stage``, ``--log-json F`` (events and metrics as JSON lines).
Activations go on the activation wire, a TCP port beside the node service
(``--wire-port``, default any; see node/pipeline/wire.py); ``--no-wire`` keeps them on gRPC.
``--metrics HOST:PORT`` serves the node's own Prometheus ``/metrics`` (node/metrics_http.py).
``--state-dir DIR`` keeps the stage's θ_global and outer state there after each outer sync
(node/recovery/local_state.py) and the node's secret (node/identity.py).
``--tls-dir DIR`` turns on mutual TLS (DIR/ca.crt and DIR/<node-id>.crt/.key; needs ``--node-id``).
The run token comes from --token-file or the LOWBAND_TOKEN environment variable.
Exit codes: 0 after a clean leave (SIGTERM/SIGINT, run finished, SHUTDOWN),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lowband.node.daemon import NodeOptions, run_node
from lowband.node.train.reference import resolve_device
from lowband.protocols.rpc import load_token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowband-node", description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--token-file", help="file holding the run token (default: $LOWBAND_TOKEN)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the node service (port 0: any)")
    parser.add_argument("--advertise", default="", help="HOST:PORT peers should dial (default: listen host)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N: one device per node")
    parser.add_argument("--data", default="", help="training data path (overrides train.data for this node)")
    parser.add_argument("--no-data", action="store_true", help="never serve as an origin (stage 0)")
    parser.add_argument("--node-id", default="", help="node id to register with (default: assigned)")
    parser.add_argument("--preferred-stage", type=int, default=-1, help="stage to host if the coordinator agrees")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="emulate a slower device: sleep (F-1) x compute time after each computation")
    parser.add_argument("--links-file", default="", help="JSON with per-peer latency_s and bandwidth_Bps")
    parser.add_argument("--log-json", default="", help="append events and metrics as JSON lines to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--wire-port", type=int, default=0,
                        help="TCP port of the activation wire, on the --listen host (default 0: any free port)")
    parser.add_argument("--no-wire", action="store_true",
                        help="send activations on gRPC only (no TCP activation wire beside the node service)")
    parser.add_argument("--metrics", default="", metavar="HOST:PORT",
                        help="serve this node's Prometheus /metrics here, without a token (port 0: any free port)")
    parser.add_argument("--state-dir", default="",
                        help="keep this node's stage state (θ_global, outer state, step) here after each outer sync")
    parser.add_argument("--tls-dir", default="",
                        help="mutual TLS on every channel and the activation wire: DIR/ca.crt and "
                             "DIR/<node-id>.crt/.key (lowband-coordinator issue); needs --node-id")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.slowdown < 1.0:
        parser.error("--slowdown must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 0 <= args.wire_port <= 65535:
        parser.error("--wire-port must be in [0, 65535]")
    try:
        resolve_device(args.device)   # a device this machine does not have: exit 2 before anything starts
    except ValueError as exc:
        parser.error(str(exc))
    try:
        token = load_token(args.token_file)
    except ValueError as exc:
        parser.error(str(exc))
    options = NodeOptions(coordinator=args.coordinator, token=token, listen=args.listen, advertise=args.advertise,
                          device=args.device, data=args.data, node_id=args.node_id,
                          preferred_stage=args.preferred_stage, has_data=not args.no_data,
                          slowdown=args.slowdown, links_file=args.links_file, log_json=args.log_json,
                          torch_threads=args.threads, wire=not args.no_wire,
                          wire_port=args.wire_port, metrics=args.metrics, state_dir=args.state_dir,
                          tls_dir=args.tls_dir)
    try:
        return run_node(options)
    except ValueError as exc:
        print(f"lowband-node: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
