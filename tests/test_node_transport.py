"""Emulated links: per-peer latency and bandwidth from a JSON file, applied before each send."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from node_cluster import start_node

from lowband.node.pipeline.transport import Link, LinkTable, Transport
from lowband.node.service import StateSnapshot, fetch_state
from lowband.node.train.model import ModelConfig, init_stage
from lowband.protocols import node_pb2
from lowband.protocols.codec import encode
from lowband.protocols.rpc import token_metadata

CFG = ModelConfig.from_preset("tiny")


def test_link_delay_is_latency_plus_serialization() -> None:
    assert Link(0.05, 1e6).delay_s(500_000) == pytest.approx(0.55)
    assert Link(0.01, 0.0).delay_s(10**9) == pytest.approx(0.01)   # 0 bandwidth = unlimited


def test_links_file_by_address_and_node_id_with_default(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"default": {"latency_s": 0.001},
                                "peers": {"127.0.0.1:9": {"latency_s": 0.2, "bandwidth_Bps": 1000},
                                          "n-7": {"latency_s": 0.3}}}))
    table = LinkTable(path)
    assert table.get("127.0.0.1:9") == Link(0.2, 1000)
    assert table.get("127.0.0.1:10", "n-7") == Link(0.3, 0.0)
    assert table.get("127.0.0.1:11") == Link(0.001, 0.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"peers": {"x": {"latency_s": -1}}}))
    with pytest.raises(ValueError, match="negative"):
        LinkTable(bad)


def test_send_waits_for_the_emulated_link(tmp_path: Path) -> None:
    async def main() -> tuple[float, float]:
        node = await start_node("n1", 1, init_stage(CFG, 1, 4, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len)
        try:
            path = tmp_path / "links.json"
            x = torch.zeros(1, 4, CFG.dim)
            nbytes = encode(x, "fp32", compress=False).ByteSize()
            path.write_text(json.dumps({"peers": {node.address: {"latency_s": 0.2, "bandwidth_Bps": nbytes / 0.3}}}))
            header = node_pb2.MicrobatchHeader(run_id="other-run", hop=1)   # refused by the node; timing only
            timings = []
            for links in (None, LinkTable(path)):
                transport = Transport("test-token", links=links)
                start = time.monotonic()
                ack = await transport.send_microbatch(node.address, False, header, x, "fp32", timeout_s=5)
                assert not ack.ok and "other-run" in ack.message   # refused, but the send itself happened
                timings.append(time.monotonic() - start)
                await transport.close()
            return timings[0], timings[1]
        finally:
            await node.stop()

    plain, emulated = asyncio.run(main())
    assert emulated >= 0.5 - 0.01            # 0.2 s latency + ~0.3 s at the link's bandwidth
    assert emulated - plain >= 0.45


def test_get_state_streams_the_stage_weights() -> None:
    async def main() -> None:
        module = init_stage(CFG, 2, 4, seed=3)
        node = await start_node("n2", 2, module, dim=CFG.dim, max_seq_len=CFG.max_seq_len)

        async def provider(stage: int, parts: list[str]) -> StateSnapshot:
            return StateSnapshot(parts={"local": await node.runtime.state()}, inner_step=7, grad_norm=0.5)

        node.servicer.state_provider = provider
        node.servicer.state_chunk_bytes = 4096   # force multi-chunk tensors
        transport = Transport("test-token")
        try:
            snap = await fetch_state(transport.stub(node.address), 2, ["local"], "me",
                                     metadata=token_metadata("test-token"), timeout_s=10)
            assert snap.inner_step == 7 and snap.grad_norm == 0.5
            own = module.state_dict()
            assert set(snap.parts["local"]) == set(own)
            for name, t in own.items():
                assert torch.equal(snap.parts["local"][name], t)
            # The stream is counted as sent, so the network-bytes check can account for recoveries.
            weights_bytes = sum(t.numel() * 4 for t in own.values())
            assert weights_bytes <= node.servicer.state_bytes_sent <= weights_bytes * 1.1
            with pytest.raises(grpc.aio.AioRpcError) as err:   # asks for a stage the node does not hold
                await fetch_state(transport.stub(node.address), 1, ["local"], "me",
                                  metadata=token_metadata("test-token"), timeout_s=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await transport.close()
            await node.stop()

    asyncio.run(main())
