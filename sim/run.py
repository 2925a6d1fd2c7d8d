"""`lowband-sim run`: a whole lowband run on one machine, as real OS processes.

Starts a coordinator and one node daemon per simulated machine, emulates links
and heterogeneity (per-node compute slow-down), preempts nodes on a script and
at random (SIGKILL, or SIGTERM as a spot notice) and starts their replacements,
shows live progress, and writes the run folder: metrics.jsonl, events.jsonl,
summary.json, PNG plots, report.html (with a sample of the trained model) and model.pt, assembled
from the nodes' state directories (state/<node>/, sim/model_out.py).

Two networks (``sim.network``): ``loopback``, where every process listens on
127.0.0.1 and each node delays its sends by latency + bytes/bandwidth from a
per-node links file; and ``netns``, where every machine (the coordinator too)
is a host of its own in a network namespace (sim/netns.py), its uplink shaped
by the kernel, and only the latency is emulated in the nodes. There the
simulator reaches the coordinator over a Unix socket, and the summary adds the
bytes each host's interface really sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from lowband.coordinator.launch import launch_coordinator
from lowband.protocols import coordinator_pb2, coordinator_pb2_grpc
from lowband.protocols.config import ConfigError, to_toml
from lowband.protocols.rpc import token_metadata
from lowband.protocols.tls import ADMIN_NAME, COORDINATOR_NAME, init_ca, issue
from lowband.protocols.vocab import bits_per_byte
from lowband.sim.config import ScriptedPreemption, SimConfig, load_sim_config
from lowband.sim.model_out import node_state_dir, run_sample, write_run_model
from lowband.sim.netns import TestNetwork
from lowband.sim.procs import (
    Child,
    DeviceRoom,
    Supervisor,
    choose_device,
    free_port,
    node_need_bytes,
    peak_rss_bytes,
    visible_cuda_devices,
)
from lowband.sim.report import read_jsonl, write_report

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 2.0  # a status poll that takes longer is skipped, the loop goes on
PLAIN_PROGRESS_S = 5.0  # without a terminal, a progress line at least this often (and one per event)
FINAL_EVAL_WAIT_S = 60.0  # how long the origins' validation after the last step may take
COORDINATOR_START_TIMEOUT_S = 60.0
# On namespace hosts every machine has its own ports: fixed ones, as a deployment would use.
NETNS_COORDINATOR_PORT = 7000
NETNS_NODE_PORT = 7100


@dataclass
class SimNode:
    """A simulated machine: one node daemon process and what the simulator knows of it."""

    name: str
    stage: int               # stage it asked for (the coordinator may assign another)
    address: str
    region: int
    slowdown: float
    child: Child | None = None
    host: str = ""           # its namespace host (sim.network = "netns")
    node_id: str = ""        # as the coordinator knows it (filled from status)
    preempted: bool = False
    replacement: bool = False  # a fresh spot machine: the coordinator picks its stage
    relaunches: int = 0        # times it exited before joining and was started again
    device: str = "cpu"        # --device of its process (placed by sim/procs.py)
    need_bytes: int = 0        # device memory it is counted for there (0 on the CPU)


@dataclass
class RunState:
    start: float = field(default_factory=time.monotonic)
    seen_events: set[tuple[float, str, str]] = field(default_factory=set)
    last_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_stage: dict[str, int] = field(default_factory=dict)
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    failures: int = 0
    recoveries: int = 0
    pending_replacements: list[tuple[float, int]] = field(default_factory=list)  # (due, stage)
    fired: set[int] = field(default_factory=set)
    last_event: str = ""
    peak_rss: dict[str, int] = field(default_factory=dict)   # process name -> highest VmHWM seen

    def elapsed(self) -> float:
        return time.monotonic() - self.start


MAX_RELAUNCHES = 3   # a node that exits before joining is started again (new port) this many times
def _finished(origins: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """When no origin is alive (the run is over): the origins that left furthest along. A killed
    origin's metrics are from before its death and must not stand for the run's end."""
    left = [m for m in origins if m.get("state") != "dead"] or origins
    last = max((m["step"] for m in left), default=0)
    return [m for m in left if m["step"] == last]


class Simulation:
    def __init__(self, config: SimConfig, out_dir: Path, *, progress: bool = True) -> None:
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        # a terminal gets one live line; a log file or pipe a line per event, or every PLAIN_PROGRESS_S
        self._live_line = sys.stderr.isatty()
        self._shown: tuple[float, str] = (-math.inf, "")
        self.rng = random.Random(config.run.seed)
        self.sup = Supervisor(out_dir / "logs")
        self.token = secrets.token_hex(16)
        self.nodes: list[SimNode] = []
        self.state = RunState()
        self.coordinator_address = ""
        self._counter = 0
        self._metrics_file = open(out_dir / "metrics.jsonl", "w")
        self._events_file = open(out_dir / "events.jsonl", "w")
        self._channel: grpc.Channel | None = None
        self._stub: coordinator_pb2_grpc.CoordinatorStub | None = None
        self.net: TestNetwork | None = None
        self._devices: list[DeviceRoom] | None = None   # visible CUDA devices, read at the first node

    @property
    def netns(self) -> bool:
        return self.config.sim.network == "netns"

    def start_network(self) -> None:
        """Namespace hosts on one bridge (sim.network = "netns"); refuses clearly without root or iproute2."""
        if self.netns:
            self.net = TestNetwork().start()

    def _add_host(self, name: str, region: int) -> str:
        """A namespace host for one machine, its uplink at the topology's rates; returns its address."""
        assert self.net is not None
        sim = self.config.sim
        host = self.net.add_host(name, rate_bps=sim.intra_bandwidth_Bps * 8, region=region,
                                 inter_rate_bps=sim.inter_bandwidth_Bps * 8)
        return host.address

    def _wrap(self, host: str, argv: list[str]) -> list[str]:
        return self.net.hosts[host].wrap(argv) if self.net is not None and host else argv

    # ---- processes -------------------------------------------------------------------------

    def _python(self) -> list[str]:
        return [sys.executable]

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        return env

    def start_coordinator(self) -> None:
        run_toml = self.out_dir / "run.toml"
        run_toml.write_text(to_toml(self.config.run))
        token_file = self.out_dir / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        host = ""
        bind = "127.0.0.1:0"
        if self.netns:
            host = "coordinator"
            bind = f"{self._add_host(host, region=0)}:{NETNS_COORDINATOR_PORT}"
        control_socket = self.out_dir / "coordinator.sock"   # a local file: plaintext behind the token
        tls_dir = self._make_tls()
        dashboard = self.config.sim.dashboard or None
        if dashboard and self.netns:   # on the coordinator's namespace host, the port as configured
            dashboard = f"{bind.rpartition(':')[0]}:{dashboard.rpartition(':')[2]}"
        coordinator = launch_coordinator(
            self.out_dir / "coordinator", log_path=self.sup.log_path("coordinator"), bind=bind,
            token_file=token_file, config=run_toml, control_socket=control_socket, env=self._child_env(),
            wrap=lambda argv: self._wrap(host, argv), timeout_s=COORDINATOR_START_TIMEOUT_S, http=dashboard,
            tls_dir=tls_dir)
        self.sup.adopt("coordinator", coordinator.popen)
        self.coordinator_address = coordinator.address
        if coordinator.dashboard_url:
            print(f"dashboard: {coordinator.dashboard_url}?token={self.token}", file=sys.stderr, flush=True)
        # The Unix socket reaches the coordinator from any network namespace, the root one included.
        self._channel = grpc.insecure_channel(f"unix:{control_socket}")
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        logger.info("coordinator listening on %s", self.coordinator_address)

    @property
    def tls_dir(self) -> Path | None:
        """The run CA and certificates (``sim.tls``), in the run folder; None: plaintext."""
        return self.out_dir / "tls" if self.config.sim.tls else None

    def _make_tls(self) -> Path | None:
        """A fresh run CA with the coordinator's and admin's certificates (a rerun in the same folder
        replaces them: the nodes' certificates are issued from it as they launch)."""
        if self.tls_dir is None:
            return None
        init_ca(self.tls_dir, run_name=f"lowband sim {self.out_dir.name}", overwrite=True)
        for name in (COORDINATOR_NAME, ADMIN_NAME):
            issue(self.tls_dir, name)
        return self.tls_dir

    def _links_for(self, node: SimNode) -> dict[str, Any]:
        """Per-peer emulated links. On namespace hosts the kernel shapes bandwidth, so only latency is left."""
        sim = self.config.sim

        def link(same_region: bool) -> dict[str, float]:
            bandwidth = sim.intra_bandwidth_Bps if same_region else sim.inter_bandwidth_Bps
            return {"latency_s": sim.intra_latency_s if same_region else sim.inter_latency_s,
                    "bandwidth_Bps": 0.0 if self.netns else bandwidth}

        peers = {other.address: link(other.region == node.region) for other in self.nodes}
        return {"peers": peers, "default": link(True)}

    def add_node(self, stage: int) -> SimNode:
        sim = self.config.sim
        self._counter += 1
        name = f"{'origin' if stage == 0 else 'stage' + str(stage)}-{self._counter}"
        region = self._counter % sim.regions
        slowdown = 1.0 + self.rng.random() * (sim.max_slowdown - 1.0)
        device, need = self._place(stage)
        if self.netns:
            node = SimNode(name=name, stage=stage, address=f"{self._add_host(name, region)}:{NETNS_NODE_PORT}",
                           region=region, slowdown=slowdown, host=name)
        else:
            node = SimNode(name=name, stage=stage, address=f"127.0.0.1:{free_port()}", region=region,
                           slowdown=slowdown)
        node.device, node.need_bytes = device, need
        self.nodes.append(node)
        return node

    def _place(self, stage: int) -> tuple[str, int]:
        """The device of the next node process and the memory it is counted for: round-robin over the
        visible CUDA devices, capped by their free memory (raises PlacementError), else the CPU."""
        sim = self.config.sim
        if self._devices is None:
            self._devices = visible_cuda_devices() if sim.device == "auto" else []
            if self._devices:
                logger.info("node processes go to %s", ", ".join(f"{d.name} ({d.free_bytes / 2**30:.1f} GiB free)"
                                                                  for d in self._devices))
        if not self._devices:
            return "cpu", 0
        need = node_need_bytes(self.config.run, stage, origins=sim.origins, replicas=sim.replicas_per_stage)
        live = [(n.device, n.need_bytes) for n in self.nodes if n.child is None or n.child.alive()]
        return choose_device(self._devices, live, need, self._counter - 1), need

    def launch(self, node: SimNode) -> None:
        links_file = self.out_dir / "links" / f"{node.name}.json"
        links_file.parent.mkdir(exist_ok=True)
        # Rewrite every node's links file: a replacement is a new peer for everyone.
        for other in self.nodes:
            (self.out_dir / "links" / f"{other.name}.json").write_text(json.dumps(self._links_for(other)))
        argv = [
            *self._python(), "-m", "lowband.node.cli",
            "--coordinator", self.coordinator_address,
            "--token-file", str(self.out_dir / "token"),
            "--listen", node.address,
            "--node-id", node.name,
            # A replacement block-stage node states no preference, so the coordinator sends it to
            # the weakest stage (the one that lost the most); origins must stay origins (data).
            "--preferred-stage", str(-1 if node.replacement and node.stage != 0 else node.stage),
            "--slowdown", f"{node.slowdown:.3f}",
            "--links-file", str(links_file),
            "--log-json", str(self.out_dir / "nodes" / f"{node.name}.jsonl"),
            "--state-dir", str(node_state_dir(self.out_dir, node.name)),
            "--device", node.device,
        ]
        if node.stage != 0:
            argv.append("--no-data")  # only origins hold data; the others never become stage 0
        if self.tls_dir is not None:   # the node's certificate, from this run's CA (a relaunch gets a new one)
            issue(self.tls_dir, node.name)
            argv += ["--tls-dir", str(self.tls_dir)]
        (self.out_dir / "nodes").mkdir(exist_ok=True)
        node.child = self.sup.spawn(node.name, self._wrap(node.host, argv), env=self._child_env())
        self.event("launch", node.name, node.stage, f"pid {node.child.pid}, slowdown {node.slowdown:.2f}")

    def start_nodes(self) -> None:
        sim = self.config.sim
        for _ in range(sim.origins):
            self.add_node(0)
        for stage in range(1, self.config.run.model.stages):
            for _ in range(sim.replicas_per_stage):
                self.add_node(stage)
        for node in list(self.nodes):
            self.launch(node)

    # ---- monitoring ---------------------------------------------------------------------------

    def event(self, kind: str, node_id: str, stage: int, detail: str = "", t: float | None = None) -> None:
        record = {"t": round(self.state.elapsed() if t is None else t, 3), "kind": kind, "node_id": node_id,
                  "stage": stage, "detail": detail}
        self._events_file.write(json.dumps(record) + "\n")
        self._events_file.flush()
        if kind in ("death", "preempt"):
            self.state.failures += kind == "preempt"
        if kind == "recovery":
            self.state.recoveries += 1
        self.state.last_event = f"{kind} {node_id} (stage {stage})"
        logger.debug("event %s", record)

    def poll(self) -> coordinator_pb2.StatusReply | None:
        assert self._stub is not None
        try:
            return self._stub.Status(coordinator_pb2.StatusRequest(max_events=200),
                                     metadata=token_metadata(self.token), timeout=STATUS_TIMEOUT_S)
        except grpc.RpcError as exc:
            logger.debug("status poll failed: %s", exc)
            return None

    def record(self, status: coordinator_pb2.StatusReply) -> dict[str, Any]:
        st = self.state
        wall_offset = time.time() - st.elapsed()
        for ev in status.events:
            key = (round(ev.time, 3), ev.kind, ev.node_id)
            if key in st.seen_events:
                continue
            st.seen_events.add(key)
            if ev.kind in ("join", "death", "leave", "recovery", "stage_change", "recovery_planned"):
                self.event(ev.kind, ev.node_id, ev.stage, ev.detail, t=max(0.0, ev.time - wall_offset))
        live_per_stage: dict[str, int] = {}
        for n in status.nodes:
            m = n.metrics
            st.node_stage[n.node_id] = n.stage
            prev = st.last_metrics.get(n.node_id, {})
            st.last_metrics[n.node_id] = {
                "stage": n.stage, "step": max(m.step, prev.get("step", 0)), "loss": m.loss or prev.get("loss"),
                "val_loss": m.val_loss or prev.get("val_loss"),
                "tokens": max(m.tokens, prev.get("tokens", 0)),
                "sync_bytes_sent": max(m.sync_bytes_sent, prev.get("sync_bytes_sent", 0)),
                "activation_bytes_sent": max(m.activation_bytes_sent, prev.get("activation_bytes_sent", 0)),
                "state_bytes_sent": max(m.state_bytes_sent, prev.get("state_bytes_sent", 0)),
                "control_bytes_sent": max(m.control_bytes_sent, prev.get("control_bytes_sent", 0)),
                "alive": n.state == "alive", "state": n.state,
            }
            if n.state == "alive":
                live_per_stage[str(n.stage)] = live_per_stage.get(str(n.stage), 0) + 1
        origins = [m for m in st.last_metrics.values() if m["stage"] == 0]
        live_origins = [m for m in origins if m["alive"]] or _finished(origins)
        losses = [m["loss"] for m in live_origins if m.get("loss")]
        vals = [m["val_loss"] for m in live_origins if m.get("val_loss")]
        val_loss = sum(vals) / len(vals) if vals else None
        if val_loss is not None:
            if st.initial_val_loss is None:
                st.initial_val_loss = val_loss
            st.final_val_loss = val_loss
        rec = {
            "t": round(st.elapsed(), 3),
            "step": min((m["step"] for m in live_origins), default=0),
            "tokens": sum(m["tokens"] for m in origins),
            "loss": sum(losses) / len(losses) if losses else None,
            "val_loss": val_loss,
            "sync_bytes_sent": sum(m["sync_bytes_sent"] for m in st.last_metrics.values()),
            "activation_bytes_sent": sum(m["activation_bytes_sent"] for m in st.last_metrics.values()),
            "state_bytes_sent": sum(m["state_bytes_sent"] for m in st.last_metrics.values()),
            "control_bytes_sent": sum(m["control_bytes_sent"] for m in st.last_metrics.values()),
            "live_nodes": sum(live_per_stage.values()),
            "live_per_stage": live_per_stage,
            "outer_step": status.outer_step,
            "epoch": status.epoch,
        }
        self._metrics_file.write(json.dumps(rec) + "\n")
        self._metrics_file.flush()
        return rec

    def show(self, rec: dict[str, Any]) -> None:
        if not self.progress:
            return
        elapsed = max(rec["t"], 1e-9)
        loss = f"{rec['loss']:.3f}" if rec["loss"] is not None else "-"
        val = f"{rec['val_loss']:.3f}" if rec["val_loss"] is not None else "-"
        line = (f"[{rec['t']:6.1f}s] step {rec['step']:4d}/{self.config.run.train.steps} loss {loss} val {val} "
                f"tok/s {rec['tokens'] / elapsed:7.0f} sync {rec['sync_bytes_sent'] / 1e6:6.2f}MB "
                f"act {rec['activation_bytes_sent'] / 1e6:7.1f}MB live {rec['live_nodes']} | {self.state.last_event}")
        if self._live_line:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            last_t, last_event = self._shown
            if self.state.last_event == last_event and rec["t"] - last_t < PLAIN_PROGRESS_S:
                return
            self._shown = (rec["t"], self.state.last_event)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    # ---- preemptions --------------------------------------------------------------------------

    def _live_nodes_of(self, stage: int) -> list[SimNode]:
        out = []
        for n in self.nodes:
            if n.child is None or not n.child.alive() or n.preempted:
                continue
            assigned = self.state.node_stage.get(n.name, n.stage)
            if assigned == stage:
                out.append(n)
        return out

    def preempt(self, node: SimNode, sig: str, replace: bool, why: str) -> None:
        assert node.child is not None
        node.preempted = True
        stage = self.state.node_stage.get(node.name, node.stage)
        node.child.signal_group(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
        self.event("preempt", node.name, stage, f"SIG{sig} ({why})")
        if replace:
            self.state.pending_replacements.append((self.state.elapsed() + self.config.sim.replacement_delay_s, stage))

    def apply_script(self, rec: dict[str, Any]) -> None:
        for index, p in enumerate(self.config.sim.preemptions):
            if index in self.state.fired:
                continue
            due = (p.at_step >= 0 and rec["step"] >= p.at_step) or (p.at_s >= 0 and rec["t"] >= p.at_s)
            if not due:
                continue
            self.state.fired.add(index)
            self._fire(p)

    def _fire(self, p: ScriptedPreemption) -> None:
        stage = p.stage if p.stage is not None else 0
        victims = self._live_nodes_of(stage)
        if not p.whole_stage:
            victims = victims[:1]
        if not victims:
            logger.warning("scripted preemption %s found no live node", p.target)
            return
        for node in victims:
            self.preempt(node, p.signal, p.replace, f"script {p.target}")

    def random_preemptions(self, dt: float) -> None:
        rate = self.config.sim.preemption_rate_per_hour
        if rate <= 0:
            return
        live = [n for n in self.nodes if n.child is not None and n.child.alive() and not n.preempted]
        if not live or self.rng.random() >= 1 - math.exp(-rate * dt / 3600.0):
            return
        node = self.rng.choice(live)
        sig = "KILL" if self.rng.random() < self.config.sim.sigkill_share else "TERM"
        self.preempt(node, sig, True, "random")

    def relaunch_failed_starts(self) -> None:
        """A node process that exited before it ever joined (it could not bind its port, say) is started
        again on a new port; without this its stage would stay empty and the run would wait for nothing
        until ``max_wall_s``. One that keeps failing ends the run with its log's path."""
        for node in self.nodes:
            child = node.child
            if child is None or child.alive() or node.preempted or node.name in self.state.node_stage:
                continue
            if node.relaunches >= MAX_RELAUNCHES:
                raise RuntimeError(f"node {node.name} exited before joining {node.relaunches + 1} times; "
                                   f"see {child.log_path}")
            node.relaunches += 1
            code = child.popen.returncode
            if not self.netns:   # a namespace host's port is its own: nothing else could have taken it
                node.address = f"127.0.0.1:{free_port()}"
            self.event("relaunch", node.name, node.stage, f"exited before joining (code {code}); see {child.log_path}")
            logger.warning("node %s exited before joining (code %s); starting it again on %s", node.name, code,
                           node.address)
            self.launch(node)

    def start_replacements(self) -> None:
        now = self.state.elapsed()
        due = [r for r in self.state.pending_replacements if r[0] <= now]
        self.state.pending_replacements = [r for r in self.state.pending_replacements if r[0] > now]
        for _, stage in due:
            node = self.add_node(stage)
            node.replacement = True
            self.launch(node)

    # ---- the run ------------------------------------------------------------------------------

    def finished(self, rec: dict[str, Any]) -> bool:
        origins_alive = [n for n in self.nodes if n.stage == 0 and n.child is not None and n.child.alive()]
        if rec["step"] >= self.config.run.train.steps:
            return True
        return not origins_alive and not any(stage == 0 for _, stage in self.state.pending_replacements)

    def await_final_evaluation(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The origins validate the whole model after their last step, then leave: wait (bounded) for
        them, so the run's final loss is that of its last step, not of the last eval_every before it."""
        deadline = time.monotonic() + FINAL_EVAL_WAIT_S
        while time.monotonic() < deadline and any(
                n.stage == 0 and n.child is not None and n.child.alive() and not n.preempted for n in self.nodes):
            time.sleep(0.5)
            self.sample_memory()
            status = self.poll()
            if status is not None:
                # the run's step stays the one it ended at: once the first origins leave, the min over
                # those still alive can read a laggard's older heartbeat
                rec = {**self.record(status), "step": max(rec["step"], self.config.run.train.steps)}
        return rec

    def final_evaluation(self) -> tuple[int, float] | None:
        """(step, mean val loss) of the origins' latest validation, read from their event logs; only the
        origins that got furthest count (a killed origin's last value is from before its death)."""
        latest: list[tuple[int, float]] = []
        for node in self.nodes:
            if node.stage != 0:
                continue
            last = None
            for record in read_jsonl(self.out_dir / "nodes" / f"{node.name}.jsonl"):
                value = record.get("val_loss")
                if record.get("kind") == "eval" and isinstance(value, (int, float)) and math.isfinite(value):
                    last = (int(record["step"]), float(value))
            if last is not None:
                latest.append(last)
        if not latest:
            return None
        step = max(s for s, _ in latest)
        values = [v for s, v in latest if s == step]
        return step, sum(values) / len(values)

    def bytes_per_token(self) -> float | None:
        """Bytes of text per validation token, as the origins measured it (their eval records give val_loss
        and val_bits_per_byte); None without one (a token file's tokenizer is not known)."""
        for node in self.nodes:
            for record in read_jsonl(self.out_dir / "nodes" / f"{node.name}.jsonl"):
                loss, bpb = record.get("val_loss"), record.get("val_bits_per_byte")
                if record.get("kind") == "eval" and isinstance(loss, (int, float)) and isinstance(bpb, (int, float)) \
                        and math.isfinite(loss) and bpb > 0:
                    return loss / math.log(2) / bpb
        return None

    def sample_memory(self) -> None:
        """Each process's peak resident memory so far (VmHWM), kept after the process is gone."""
        peaks = self.state.peak_rss
        for child in self.sup.live():
            peak = peak_rss_bytes(child.pid)
            if peak > peaks.get(child.name, 0):
                peaks[child.name] = peak

    def run(self) -> dict[str, Any]:
        self.start_network()
        self.start_coordinator()
        self.start_nodes()
        rec: dict[str, Any] = {"step": 0, "t": 0.0, "tokens": 0, "sync_bytes_sent": 0, "activation_bytes_sent": 0}
        last = time.monotonic()
        while self.state.elapsed() < self.config.sim.max_wall_s:
            time.sleep(0.5)
            status = self.poll()
            now = time.monotonic()
            if status is not None:
                rec = self.record(status)
                self.show(rec)
                self.apply_script(rec)
                if self.finished(rec):
                    if rec["step"] >= self.config.run.train.steps:
                        rec = self.await_final_evaluation(rec)
                    break
            self.sample_memory()
            self.random_preemptions(now - last)
            self.relaunch_failed_starts()
            self.start_replacements()
            last = now
        else:
            logger.warning("stopping: sim.max_wall_s = %.0f s reached", self.config.sim.max_wall_s)
        if self.progress and self._live_line:
            sys.stderr.write("\n")
        return self.summarize(rec)

    def summarize(self, rec: dict[str, Any]) -> dict[str, Any]:
        st = self.state
        steps = max(rec.get("step", 0), 0)
        self.sample_memory()
        extra: dict[str, Any] = {}
        final = self.final_evaluation()
        if final is not None:
            extra["final_val_step"], st.final_val_loss = final
        if self.net is not None:
            # Read at the run's end, beside the application's last counters (not after the shutdown).
            per_host = self.net.tx_bytes()
            # What lowband itself counted (activations, sync, recovery state, control), host by host, so the gap shows.
            app = {name: m["sync_bytes_sent"] + m["activation_bytes_sent"] + m["state_bytes_sent"]
                   + m["control_bytes_sent"] for name, m in st.last_metrics.items()}
            app_total = sum(app.values())
            extra["network_bytes"] = {"total": sum(per_host.values()), "per_host": per_host}
            extra["application_bytes_sent"] = {"total": app_total, "per_host": app}
            extra["network_vs_application"] = round(sum(per_host.values()) / app_total, 4) if app_total else None
        return {
            "initial_val_loss": st.initial_val_loss,
            "final_val_loss": st.final_val_loss,
            # bits per byte of text (byte-level data: loss / ln 2), comparable across tokenizers
            "final_val_bits_per_byte": bits_per_byte(st.final_val_loss, self.bytes_per_token()),
            "tokens": rec.get("tokens", 0),
            "wall_s": round(st.elapsed(), 2),
            "steps": steps,
            "sync_bytes_sent": rec.get("sync_bytes_sent", 0),
            "activation_bytes_sent": rec.get("activation_bytes_sent", 0),
            "state_bytes_sent": rec.get("state_bytes_sent", 0),
            "control_bytes_sent": rec.get("control_bytes_sent", 0),
            # every byte the nodes sent, each kind counted where it was sent
            "total_bytes_sent": sum(rec.get(kind, 0) for kind in ("activation_bytes_sent", "sync_bytes_sent",
                                                                  "state_bytes_sent", "control_bytes_sent")),
            "bytes_allreduce_equivalent": allreduce_equivalent_bytes(self.config, steps),
            "failures": st.failures,
            "recoveries": st.recoveries,
            "nodes_started": len(self.nodes),
            "network": self.config.sim.network,
            "peak_rss_bytes": {"max": max(st.peak_rss.values(), default=0), "per_host": dict(st.peak_rss)},
            **extra,
        }

    def close(self) -> None:
        # Graceful first (nodes leave), then the supervisor makes sure nothing survives.
        for node in self.nodes:
            if node.child is not None and node.child.alive():
                node.child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.child and n.child.alive() for n in self.nodes):
            time.sleep(0.1)
        self.sup.kill_all()
        if self._channel is not None:
            self._channel.close()
        if self.net is not None:
            self.net.close()
        self._metrics_file.close()
        self._events_file.close()


def allreduce_equivalent_bytes(config: SimConfig, steps: int) -> int:
    """Bytes a ring all-reduce of fp32 gradients among each stage's replicas would send every step.

    A ring all-reduce of B bytes among r peers sends 2(r-1)/r·B per peer, 2(r-1)·B in all.
    """
    from lowband.node.train.model import build_stage, model_config_for

    model_cfg = model_config_for(config.run.model)   # the model the run trains (a subspace one is smaller)
    num_stages = config.run.model.stages
    total = 0
    for stage in range(num_stages):
        replicas = config.sim.origins if stage == 0 else config.sim.replicas_per_stage
        if replicas < 2:
            continue
        params = sum(p.numel() for p in build_stage(model_cfg, stage, num_stages).parameters())
        total += 2 * (replicas - 1) * params * 4
    return int(total * steps)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a whole lowband training job as local processes",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", help="sim TOML: run sections ([model], [train], [diloco], ...) plus [sim]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set train.steps=100 --set sim.origins=3")
    p.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    p.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    p.add_argument("--out", default="runs/sim", help="run folder (default: runs/sim)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--no-tls", action="store_true", help="plaintext channels (shorthand for --set sim.tls=false)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "no_tls", False):   # a Namespace built by hand (tests) may lack it
        overrides.append("sim.tls=false")
    try:
        config = load_sim_config(args.config, overrides)
    except ConfigError as exc:
        print(f"lowband-sim run: bad config: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sim = Simulation(config, out_dir, progress=not args.no_progress)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    interrupted = False
    summary: dict[str, Any] = {}
    try:
        summary = sim.run()
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted: stopping every process")
    except RuntimeError as exc:   # the coordinator or a node could not start: every process is stopped
        print(f"lowband-sim run: {exc}", file=sys.stderr)
        return 1
    finally:
        sim.close()
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        return 130
    # every node has left (and written its stage's last state): the run's model, and a sample of it
    model_path, model_info = write_run_model(out_dir, config.run)
    summary.update(model_info)
    if model_path is not None:
        summary.update(run_sample(model_path))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(out_dir, summary)
    print(json.dumps(summary, indent=2))
    if model_path is not None:
        print(f"model: {model_path}", file=sys.stderr)
    if summary.get("sample") is not None:
        print(f"sample: {summary['sample_prompt']}{summary['sample']}", file=sys.stderr)
    print(f"report: {report}", file=sys.stderr)
    return 0
