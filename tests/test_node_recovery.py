"""A node executes a coordinator's recovery plan: fetch the sources over GetState, rebuild, load."""

from __future__ import annotations

import asyncio

import torch
from node_cluster import TOKEN, start_node

from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.obtain import obtain_weights
from lowband.node.service import StateSnapshot
from lowband.node.train.model import ModelConfig, build_stage, init_stage
from lowband.protocols import coordinator_pb2 as pb

CFG = ModelConfig.from_preset("tiny")


def _serve_state(node) -> None:   # type: ignore[no-untyped-def]
    async def provider(stage: int, parts: list[str]) -> StateSnapshot:
        return StateSnapshot(parts={"local": await node.runtime.state()}, inner_step=40 + stage)

    node.servicer.state_provider = provider


def test_checkfree_plan_rebuilds_from_neighbours_and_replica_copy_copies() -> None:
    async def main() -> None:
        n1 = await start_node("n1", 1, init_stage(CFG, 1, 4, seed=1), dim=CFG.dim, max_seq_len=CFG.max_seq_len)
        n3 = await start_node("n3", 3, init_stage(CFG, 3, 4, seed=3), dim=CFG.dim, max_seq_len=CFG.max_seq_len)
        for n in (n1, n3):
            _serve_state(n)
        transport = Transport(TOKEN)
        try:
            plan = pb.RecoveryPlan(stage=2, method="checkfree", lr_scale=1.1, plan_id=5)
            plan.sources.add(node_id="n1", address=n1.address, stage=1)
            plan.sources.add(node_id="n3", address=n3.address, stage=3)
            plan.weights.extend([1.0, 3.0])
            module = build_stage(CFG, 2, 4, seed=99)
            iteration, lr_scale, outer = await obtain_weights(transport, "me", module, "checkfree", plan, 1.0)
            assert (iteration, lr_scale, outer) == (43, 1.1, {})
            s1, s3 = n1.runtime.module.state_dict(), n3.runtime.module.state_dict()
            for name, t in module.state_dict().items():
                torch.testing.assert_close(t, (1.0 * s1[name] + 3.0 * s3[name]) / 4.0)

            copy = pb.RecoveryPlan(stage=1, method="replica-copy", plan_id=6)
            copy.sources.add(node_id="n1", address=n1.address, stage=1)
            module = build_stage(CFG, 1, 4, seed=99)
            iteration, lr_scale, _ = await obtain_weights(transport, "me", module, "replica-copy", copy, 1.0)
            assert (iteration, lr_scale) == (41, 1.0)
            for name, t in module.state_dict().items():
                assert torch.equal(t, s1[name])
        finally:
            await transport.close()
            for n in (n1, n3):
                await n.stop()

    asyncio.run(main())
