"""The link prober measures a peer's RTT every round and its bandwidth (the padded, costly probe) only
when the last measurement is old; what it sends is counted as control traffic."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch
from node_cluster import TOKEN, install_schedule, start_node, stopping

from lowband.node.link_probe import LINK_PROBE_BYTES, LinkProber
from lowband.node.pipeline.agent import PathSpec
from lowband.node.pipeline.transport import Transport
from lowband.node.train.model import ModelConfig, init_stage

CFG = ModelConfig.from_preset("tiny")


def test_bandwidth_is_probed_again_only_when_stale() -> None:
    async def main() -> list[tuple[int, list[float]]]:
        async with stopping([]) as nodes:
            for s, node_id in enumerate(["origin", "n1"]):
                nodes.append(await start_node(node_id, s, init_stage(CFG, s, 2, seed=0), dim=CFG.dim,
                                              max_seq_len=CFG.max_seq_len))
            install_schedule(nodes, {"origin": [PathSpec(0, (0, 1, 0), ("origin", "n1", "origin"))]})
            transport = Transport(TOKEN)
            try:
                prober = LinkProber(SimpleNamespace(agent=nodes[0].agent), SimpleNamespace(node_id="origin"),
                                    transport, client=None, stop_event=asyncio.Event())   # type: ignore[arg-type]
                rounds = []
                for stale_after_s in (60.0, 60.0, 0.0):
                    prober.bandwidth_every_s = stale_after_s
                    before = transport.control_bytes_sent
                    report = await prober.probe()
                    rounds.append((transport.control_bytes_sent - before,
                                   [link.bandwidth_bytes_per_s for link in report.links]))
                return rounds
            finally:
                await transport.close()

    torch.set_num_threads(1)
    (first, bw1), (second, bw2), (third, bw3) = asyncio.run(main())
    assert first > LINK_PROBE_BYTES and third > LINK_PROBE_BYTES   # measured: the padded probe went out
    assert second < 1024                                            # fresh: RTT only
    assert len(bw1) == len(bw2) == len(bw3) == 1 and bw2 == bw1 and bw1[0] > 0
