"""Mutual TLS: the run CA and its certificates, and who is refused on the coordinator, the node service
and the activation wire (a plaintext client, a certificate of another CA, a certificate naming another
node than the one its caller claims to be).

Real servers on port 0 in this process; clients are real channels and wires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import torch

from lowband.coordinator.cli import fetch_status
from lowband.coordinator.cli import main as coordinator_main
from lowband.coordinator.server import CoordinatorServer, start_coordinator
from lowband.node.coordinator_client import CoordinatorClient
from lowband.node.pipeline.transport import Transport
from lowband.node.pipeline.wire import WireConnection
from lowband.node.service import NodeServicer, start_server, start_wire
from lowband.node.sync.grpc_averager import ShardReducer
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols import node_pb2, node_pb2_grpc
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.tls import (
    ADMIN_NAME,
    COORDINATOR_NAME,
    TlsConfig,
    TlsError,
    check_claimed_id,
    init_ca,
    issue,
    open_channel,
)

TOKEN = "tls-token"
MD = token_metadata(TOKEN)
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The run's CA (coordinator, admin, nodes o, n, m) and another CA that issued its own 'o' and 'admin'."""
    run, other = tmp_path_factory.mktemp("run-ca"), tmp_path_factory.mktemp("other-ca")
    assert coordinator_main(["init-tls", "--dir", str(run)]) == 0
    for name in ("o", "n", "m"):
        assert coordinator_main(["issue", "--dir", str(run), "--name", name]) == 0
    init_ca(other)
    for name in ("o", ADMIN_NAME, COORDINATOR_NAME):
        issue(other, name)
    return run, other


def tls(directory: Path, name: str) -> TlsConfig:
    return TlsConfig.load(directory, name)


def _config() -> RunConfig:
    return apply_overrides(RunConfig(), ["model.stages=2", "membership.heartbeat_interval_s=0.3",
                                         "membership.lease_s=3"])


def _join(node_id: str = "") -> pb.JoinRequest:
    return pb.JoinRequest(node_id=node_id, address="127.0.0.1:1", device="cpu", throughput=1.0, version="0.1",
                          stage=-1, preferred_stage=-1, has_data=True)


# ----------------------------------------------------------------------------- certificates

def test_init_tls_and_issue_make_a_ca_and_certificates_that_load(cas: tuple[Path, Path]) -> None:
    run, other = cas
    for name in ("ca", COORDINATOR_NAME, ADMIN_NAME, "o", "n"):
        assert (run / f"{name}.crt").is_file()
        assert stat.S_IMODE((run / f"{name}.key").stat().st_mode) == 0o600   # keys are the owner's only
    assert tls(run, "o").name == "o"
    # a certificate of another CA, next to this run's ca.crt, is refused at load with its file named
    mixed = run.parent / "mixed"
    mixed.mkdir(exist_ok=True)
    (mixed / "ca.crt").write_bytes((run / "ca.crt").read_bytes())
    for suffix in (".crt", ".key"):
        (mixed / f"o{suffix}").write_bytes((other / f"o{suffix}").read_bytes())
    with pytest.raises(TlsError, match="not issued by the run CA"):
        tls(mixed, "o")
    # a certificate under another name than the node's, and missing files
    (mixed / "x.crt").write_bytes((run / "n.crt").read_bytes())
    (mixed / "x.key").write_bytes((run / "n.key").read_bytes())
    with pytest.raises(TlsError, match="issued to 'n', not 'x'"):
        tls(mixed, "x")
    with pytest.raises(TlsError, match="lacks"):
        tls(mixed, "nobody")
    # a second init-tls on the same directory refuses to replace the CA; a bad name is refused
    assert coordinator_main(["init-tls", "--dir", str(run)]) == 2
    assert coordinator_main(["issue", "--dir", str(run), "--name", "no spaces"]) == 2
    assert tls(run, "o").cert_pem == (run / "o.crt").read_bytes()   # nothing was replaced


def test_a_node_refuses_to_start_without_its_certificate(cas: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = cas
    base = [sys.executable, "-m", "lowband.node.cli", "--coordinator", "127.0.0.1:1", "--tls-dir", str(run)]
    env = {"LOWBAND_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    missing = subprocess.run([*base, "--node-id", "ghost"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "lacks" in missing.stderr and "ghost.crt" in missing.stderr
    no_id = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert no_id.returncode == 2 and "--tls-dir needs --node-id" in no_id.stderr


# ----------------------------------------------------------------------------- the coordinator

@contextlib.asynccontextmanager
async def _coordinator(run: Path, tmp_path: Path) -> AsyncIterator[CoordinatorServer]:
    server = await start_coordinator(_config(), tmp_path / "coord", TOKEN, tls=tls(run, COORDINATOR_NAME))
    try:
        yield server
    finally:
        await server.stop(0.2)


async def _status_code(address: str, client: TlsConfig | None) -> grpc.StatusCode:
    async with open_channel(address, grpc_options(), client, server_name=COORDINATOR_NAME) as channel:
        try:
            await pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), metadata=MD, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_coordinator_refuses_plaintext_and_other_ca_clients(cas: tuple[Path, Path], tmp_path: Path) -> None:
    run, other = cas

    async def main() -> None:
        async with _coordinator(run, tmp_path) as server:
            assert await _status_code(server.address, tls(run, ADMIN_NAME)) == grpc.StatusCode.OK
            assert await _status_code(server.address, None) == grpc.StatusCode.UNAVAILABLE
            assert await _status_code(server.address, tls(other, ADMIN_NAME)) == grpc.StatusCode.UNAVAILABLE
            # the status command's own call, blocking API, with the admin's certificate
            reply = await asyncio.to_thread(fetch_status, server.address, TOKEN, tls=tls(run, ADMIN_NAME))
            assert reply.status_json
            assert server.core.members == {}   # nobody got in

    asyncio.run(main())


def test_a_node_can_join_only_as_the_node_its_certificate_names(cas: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = cas

    async def main() -> None:
        async with _coordinator(run, tmp_path) as server:
            client = CoordinatorClient(server.address, TOKEN, tls=tls(run, "o"))
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:   # o claims to be n
                    await client.call(client.stub.Join, _join("n"))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "names 'o', not 'n'" in (err.value.details() or "")
                assert "n" not in server.core.members
                reply = await client.call(client.stub.Join, _join())   # no id: the certificate's name
                assert reply.node_id == "o"
                assert (await client.call(client.stub.Join, _join("o"))).node_id == "o"   # restart: same identity
                with pytest.raises(grpc.aio.AioRpcError) as err:   # o heartbeats or leaves for n
                    await client.heartbeat(pb.HeartbeatRequest(node_id="n"))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.call(client.stub.Leave, pb.LeaveRequest(node_id="n", reason="impostor"))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert (await client.heartbeat(pb.HeartbeatRequest(node_id="o"))).epoch >= 1
            finally:
                await client.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------- the node service and the wire

class RecordingAgent:
    def __init__(self) -> None:
        self.got: list[int] = []

    def accept(self, header: node_pb2.MicrobatchHeader, tensor: object, *, backward: bool,
               payload: memoryview | None = None, decoded: torch.Tensor | None = None) -> None:
        self.got.append(header.microbatch)


def _header(mb: int) -> node_pb2.MicrobatchHeader:
    """Origin o sends hop 1 to n."""
    return node_pb2.MicrobatchHeader(run_id="r", iteration=1, microbatch=mb, origin_id="o", stages=[0, 1, 0],
                                     node_ids=["o", "n", "o"], hop=1)


@contextlib.asynccontextmanager
async def _node_n(run: Path) -> AsyncIterator[tuple[NodeServicer, str, int]]:
    """Node n's service and wire, with mutual TLS."""
    servicer = NodeServicer("n")
    servicer.agent = RecordingAgent()  # type: ignore[assignment]
    server, port = await start_server(servicer, "127.0.0.1:0", TOKEN, tls=tls(run, "n"))
    wire = await start_wire(servicer, "127.0.0.1", TOKEN, tls=tls(run, "n"))
    try:
        yield servicer, f"127.0.0.1:{port}", wire.port
    finally:
        await wire.stop()
        await server.stop(None)


async def _send(transport: Transport, address: str, mb: int) -> node_pb2.NodeAck:
    return await transport.send_microbatch(address, False, _header(mb), torch.randn(2, 3, 8), "bf16", timeout_s=5)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])   # nodes run on uvloop, whose TLS transport is its own
def test_node_service_and_wire_take_only_the_run_ca_and_the_path_s_sender(cas: tuple[Path, Path], loop: str) -> None:
    run, other = cas

    async def main() -> None:
        async with _node_n(run) as (servicer, address, wire_port):
            got: list[int] = servicer.agent.got  # type: ignore[union-attr]
            # o, the path's previous node, on the wire and on gRPC
            for use_wire, mb in ((True, 1), (False, 2)):
                transport = Transport(TOKEN, tls=tls(run, "o"), wire=use_wire)
                try:
                    assert (await _send(transport, address, mb)).ok
                    assert bool(transport._wires) == use_wire
                finally:
                    await transport.close()
            assert got == [1, 2]
            # m, a node of this run but not on the path before n, is refused on both
            transport = Transport(TOKEN, tls=tls(run, "m"))
            try:
                ack = await _send(transport, address, 3)
                assert not ack.ok and "names 'm'" in ack.message and transport._wires
            finally:
                await transport.close()
            transport = Transport(TOKEN, tls=tls(run, "m"), wire=False)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _send(transport, address, 4)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                await transport.close()
            # plaintext and another CA's certificate: refused on gRPC and on the wire
            for client in (None, tls(other, "o")):
                transport = Transport(TOKEN, tls=client)
                try:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _send(transport, address, 5)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                finally:
                    await transport.close()
                with pytest.raises((OSError, ConnectionError, TimeoutError)):
                    conn = await WireConnection.open("127.0.0.1", wire_port, TOKEN, 5, tls=client)
                    # TLS 1.3: a client learns that its certificate was refused on its first read
                    await conn.send(0, _header(6).SerializeToString(), b"", b"", deadline=None)
            assert got == [1, 2]

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


def test_a_plaintext_wire_server_is_refused_by_a_tls_client(cas: tuple[Path, Path]) -> None:
    """The other direction: a TLS node does not talk to a peer that cannot show a run certificate."""
    run, _ = cas

    async def main() -> None:
        servicer = NodeServicer("n")
        wire = await start_wire(servicer, "127.0.0.1", TOKEN)
        try:
            with pytest.raises((OSError, ConnectionError, TimeoutError)):
                await WireConnection.open("127.0.0.1", wire.port, TOKEN, 5, tls=tls(run, "o"))
        finally:
            await wire.stop()

    asyncio.run(main())


def test_a_shard_is_taken_only_under_its_sender_s_own_certificate(cas: tuple[Path, Path]) -> None:
    """ReduceShard with the node's identity hook (what ``ShardReducer.from_config`` installs): m cannot send
    a part as o; o can."""
    run, _ = cas

    async def main() -> None:
        servicer = NodeServicer("n")
        servicer.shard_reducer = ShardReducer(timeout_s=1.0, node_id="n", identity_check=check_claimed_id)
        server, port = await start_server(servicer, "127.0.0.1:0", TOKEN, tls=tls(run, "n"))

        async def send_as(client: str, sender: str) -> grpc.StatusCode:
            header = node_pb2.ShardHeader(round_id=1, stage=1, fragment=0, shard_index=0, num_shards=1,
                                          sender_id=sender, total_numel=4, abstain=True)
            async with open_channel(f"127.0.0.1:{port}", grpc_options(), tls(run, client)) as channel:
                try:
                    async for _ in node_pb2_grpc.NodeStub(channel).ReduceShard(
                            iter([node_pb2.ShardChunk(header=header)]), metadata=MD, timeout=10):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        try:
            assert await send_as("m", "o") == grpc.StatusCode.PERMISSION_DENIED
            assert await send_as("o", "o") != grpc.StatusCode.PERMISSION_DENIED
        finally:
            await server.stop(None)

    asyncio.run(main())


class _Context:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth


def test_check_claimed_id_is_the_certificate_name_or_nothing_without_tls() -> None:
    """The averaging hook (ShardReducer.identity_check): a shard's sender must be the certificate's node."""
    assert check_claimed_id(_Context({"x509_common_name": [b"a"]}), "a") == ""   # type: ignore[arg-type]
    assert "names 'a', not 'b'" in check_claimed_id(_Context({"x509_common_name": [b"a"]}), "b")  # type: ignore[arg-type]
    assert check_claimed_id(_Context({}), "b") == ""   # type: ignore[arg-type]


# ----------------------------------------------------------------------------- a live run

LIVE_RUN = """
[model]
stages = 2
seq_len = 64

[train]
steps = 30
eval_every = 10
microbatches = 2
microbatch_size = 4

[diloco]
inner_steps = 5
fragments = 1
codec = "fp4"

[skippipe]
skip_ratio = 0.0
planner = "full"

[membership]
heartbeat_interval_s = 0.3
lease_s = 3

[sim]
origins = 1
replicas_per_stage = 2
max_wall_s = 150
preemptions = []
"""


@pytest.mark.slow   # 1-3 minutes; the default suite's tests/test_sim_run.py runs the simulator, TLS on by default
@pytest.mark.timeout(400)
def test_a_live_run_with_tls_trains(tmp_path: Path, sim_process: Callable[..., subprocess.Popen[bytes]]) -> None:
    """The simulator's default: a run CA in the run folder, every process on mutual TLS; activations go on
    the TLS wire and the stage-1 replicas average over TLS channels, and the model learns."""
    out = tmp_path / "run"
    config = tmp_path / "sim.toml"
    config.write_text(LIVE_RUN)
    proc = sim_process(out, "--config", str(config))
    output, _ = proc.communicate(timeout=380)
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert summary["activation_bytes_sent"] > 0 and summary["sync_bytes_sent"] > 0
    names = sorted(p.stem for p in (out / "tls").glob("*.crt"))
    assert names == sorted(["admin", "ca", "coordinator", "origin-1", "stage1-2", "stage1-3"])
    assert "mutual TLS" in (out / "logs" / "coordinator.log").read_text()
    for log in (out / "logs").glob("origin-*.log"):   # the origin's hops never fell back to gRPC
        assert "using gRPC" not in log.read_text()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["kind"] == "relaunch"]
