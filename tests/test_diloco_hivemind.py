"""The hivemind backend: the same outer loop, averaged by hivemind's DecentralizedAverager."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lowband.protocols.config import DilocoSection

hivemind_backend = pytest.importorskip("lowband.node.sync.hivemind_averager")
from lowband.node.sync.diloco import StreamingDiLoCo  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # spawns hivemind's DHT and averager processes (~10-30 s on a busy machine)
def test_two_replicas_average_through_hivemind() -> None:
    cfg = DilocoSection(inner_steps=2, fragments=2, overlap=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9,
                        codec="fp32", backend="hivemind")
    models = [nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reps = [StreamingDiLoCo(m, cfg) for m in models]
    numels = [sum(reps[0].params[n].numel() for n in f) for f in reps[0].fragments]
    first = hivemind_backend.HivemindAverager(numels, run_id="t", stage=1, codec="fp32", target_group_size=2)
    second = hivemind_backend.HivemindAverager(numels, run_id="t", stage=1, codec="fp32", target_group_size=2,
                                               initial_peers=first.maddrs)
    avgs = [first, second]
    try:
        with ThreadPoolExecutor(2) as pool:
            for step in (1, 2, 3, 4):
                with torch.no_grad():
                    for i, m in enumerate(models):
                        for p in m.parameters():
                            p.sub_(0.1 * (i + 1))   # replica-specific "training"
                jobs = [r.begin_sync(step) for r in reps]
                if jobs[0] is None:
                    continue
                futures = [pool.submit(a.average, j.fragment, j.delta, timeout_s=20.0, contribute=True)
                           for a, j in zip(avgs, jobs, strict=True)]
                results = [f.result() for f in futures]
                expected = (jobs[0].delta + jobs[1].delta) / 2
                for (avg, stats), rep, job in zip(results, reps, jobs, strict=True):
                    assert avg is not None, stats.error
                    assert stats.group_size == 2 and stats.bytes_sent > 0
                    torch.testing.assert_close(avg, expected)
                    rep.finish_sync(job, avg)
        for name, t in reps[0].global_params.items():
            # hivemind sums in its own order per peer: equal up to fp32 rounding, not bitwise
            torch.testing.assert_close(reps[1].global_params[name], t, rtol=1e-6, atol=1e-6)
        assert reps[0].outer.steps == reps[1].outer.steps == {0: 2, 1: 2}
    finally:
        for a in avgs:
            a.shutdown()


def test_codec_mapping_and_wire_bytes() -> None:
    x = torch.randn(4096)
    full = hivemind_backend.wire_bytes_per_peer(x, "fp32", 4)
    assert full == pytest.approx(4096 * 4 * 1.5, rel=0.01)
    assert hivemind_backend.wire_bytes_per_peer(x, "fp4", 4) < full / 3
    assert hivemind_backend.wire_bytes_per_peer(x, "fp32", 1) == 0
    with pytest.raises(ValueError, match="codec"):
        hivemind_backend.hivemind_compression("zip")
