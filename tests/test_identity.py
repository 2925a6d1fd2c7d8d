"""Node identity without TLS: a node id is bound to the secret its node joined with while that node lives.

The coordinator core with a fake clock (leases expire when the test says), then the same over real gRPC,
and the node's secret kept in its state directory.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import grpc
import pytest
from fake_clock import Clock

from lowband.coordinator.core import Coordinator
from lowband.coordinator.errors import IdentityRefused, InvalidRequest
from lowband.coordinator.server import start_coordinator
from lowband.node.identity import SECRET_FILE, node_secret
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.rpc import token_metadata

TOKEN = "identity-token"
pytestmark = pytest.mark.timeout(60)



def _config() -> RunConfig:
    return apply_overrides(RunConfig(), ["model.stages=2", "membership.heartbeat_interval_s=0.5",
                                         "membership.lease_s=2"])


def _join(node_id: str, secret: bytes, port: int = 1) -> pb.JoinRequest:
    return pb.JoinRequest(node_id=node_id, address=f"127.0.0.1:{port}", device="cpu", throughput=1.0, version="0.1",
                          stage=-1, preferred_stage=-1, has_data=True, secret=secret)


def test_a_live_id_is_refused_to_another_secret_and_given_back_to_its_own() -> None:
    clock = Clock(100.0)
    core = Coordinator(_config(), clock=clock)
    first = core.join(_join("a", b"secret-of-a"))
    assert first.node_id == "a"
    member = core.members["a"]
    with pytest.raises(IdentityRefused, match="held by a live node"):
        core.join(_join("a", b"impostor", port=666))
    assert core.members["a"] is member and member.address == "127.0.0.1:1"   # the impostor changed nothing
    with pytest.raises(IdentityRefused):
        core.join(_join("a", b""))   # no secret is another identity too
    # the same node rejoining (a restart that kept its secret) is welcome, at its new address
    assert core.join(_join("a", b"secret-of-a", port=2)).node_id == "a"
    assert core.members["a"].address == "127.0.0.1:2"
    # once its lease has ended the id is free: whoever joins next holds it
    clock.t += 10.0
    core.expire_leases()
    assert not core.members["a"].live
    assert core.join(_join("a", b"new-owner", port=3)).node_id == "a"
    with pytest.raises(IdentityRefused):
        core.join(_join("a", b"secret-of-a"))
    with pytest.raises(InvalidRequest, match="at most 256"):
        core.join(_join("b", b"x" * 257))
    assert "b" not in core.members


def test_an_impostor_join_over_grpc_gets_already_exists(tmp_path: Path) -> None:
    async def main() -> None:
        server = await start_coordinator(_config(), tmp_path, TOKEN)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                md = token_metadata(TOKEN)
                assert (await stub.Join(_join("a", b"mine"), metadata=md, timeout=5)).node_id == "a"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Join(_join("a", b"not-mine", port=9), metadata=md, timeout=5)
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert server.core.members["a"].address == "127.0.0.1:1"
                assert (await stub.Join(_join("a", b"mine"), metadata=md, timeout=5)).node_id == "a"
        finally:
            await server.stop(0.2)

    asyncio.run(main())


def test_the_node_secret_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    a, b = node_secret(), node_secret()
    assert len(a) == 32 and a != b   # without a state dir: a new one per process
    kept = node_secret(str(tmp_path / "state"))
    assert node_secret(str(tmp_path / "state")) == kept   # a restart joins as the same node
    assert stat.S_IMODE((tmp_path / "state" / SECRET_FILE).stat().st_mode) == 0o600
    (tmp_path / "state" / SECRET_FILE).write_bytes(b"short")
    assert node_secret(str(tmp_path / "state")) != kept   # a damaged file is replaced, not trusted
