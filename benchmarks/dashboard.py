"""What the dashboard costs the coordinator's event loop: one sample, one ``/api/status``, one ``/metrics``.

Every handler runs on the loop that answers heartbeats (coordinator/dashboard.py), so its time is
time no heartbeat is answered. In one process, without gRPC: a ``Coordinator`` core with N members
(a tenth of them origins), each heartbeating once per simulated second for ``--samples`` seconds
(the loss and bytes history fills up), then the best of five builds of each view. Prints one JSON
object::

    python benchmarks/dashboard.py --nodes 200 --samples 600
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

from lowband.coordinator.core import Coordinator
from lowband.coordinator.prometheus import exposition, registry_for
from lowband.coordinator.watch import RunWatch
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig, apply_overrides


def _best_ms(fn: Callable[[], Any], repeat: int = 5) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times), out


def measure(nodes: int, stages: int, samples: int) -> dict[str, Any]:
    config = apply_overrides(RunConfig(), [f"model.stages={stages}", "membership.lease_s=1e6", "diloco.fragments=3"])
    now = [0.0]
    core = Coordinator(config, clock=lambda: 100.0 + now[0], wall_clock=lambda: 1e9 + now[0])
    origins = max(1, nodes // 10)
    joined = [core.join(pb.JoinRequest(
        address=f"127.0.0.1:{9000 + i}", device="cpu", throughput=1.0 + i % 7, version="bench", stage=-1,
        preferred_stage=0 if i < origins else 1 + i % (stages - 1), has_data=i < origins)) for i in range(nodes)]
    core.current_plan()
    watch = RunWatch(core, wall_clock=lambda: 1e9 + now[0])
    sample_s = []
    for step in range(1, samples + 1):
        now[0] = float(step)
        for j in joined:
            core.heartbeat(pb.HeartbeatRequest(node_id=j.node_id, epoch=core.epoch, metrics=pb.NodeMetrics(
                step=step, loss=3.0 - step / 1000, activation_bytes_sent=1000 * step, sync_bytes_sent=50 * step,
                control_bytes_sent=5 * step, bytes_sent=1055 * step)))
        started = time.perf_counter()
        watch.sample()
        sample_s.append(time.perf_counter() - started)
    status_ms, body = _best_ms(lambda: json.dumps(watch.document(max_events=100)))
    registry = registry_for(watch)
    metrics_ms, text = _best_ms(lambda: exposition(registry))
    return {"nodes": nodes, "origins": origins, "stages": stages, "samples": samples,
            "sample_ms_median": round(1e3 * sorted(sample_s)[len(sample_s) // 2], 3),
            "api_status_ms": round(status_ms, 2), "api_status_bytes": len(body),
            "metrics_ms": round(metrics_ms, 2), "metrics_bytes": len(text),
            "python": platform.python_version(), "machine": platform.machine()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--samples", type=int, default=600, help="seconds of history (one sample each)")
    args = parser.parse_args()
    print(json.dumps(measure(args.nodes, args.stages, args.samples)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
