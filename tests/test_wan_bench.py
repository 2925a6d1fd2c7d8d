"""benchmarks/wan.py's ddp mode on two namespace hosts for a few steps: it trains, the kernel counts
its all-reduce bytes, and the test network is gone afterwards."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from bench_loader import load_benchmark
from netns_support import needs_netns

from lowband.sim.netns import list_namespaces, owner_tag

pytestmark = [needs_netns, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def wan() -> ModuleType:
    return load_benchmark("wan")


def test_parse_rate(wan: ModuleType) -> None:
    assert wan.parse_rate("20mbit") == 20e6
    assert wan.parse_rate("1000mbit") == 1e9
    assert wan.parse_rate("1gbit") == 1e9
    assert wan.parse_rate("20e6") == 20e6


def test_ddp_two_hosts(wan: ModuleType, tmp_path: Path) -> None:
    # 2 hosts x 2 sequences, 3 steps at 100 Mbit/s: a few MB of fp32 gradients
    bench = wan.Bench(hosts=2, rate_bps=100e6, steps=3, seqs_per_step=4, eval_every=3, val_seqs=8,
                      lowband_origins=2, lowband_microbatches=1, timeout_s=180)
    result = wan.run_host_mode(bench, "ddp", target=100.0, out=tmp_path)
    assert "error" not in result, result.get("error")
    assert math.isfinite(result["final_val_loss"])
    assert result["time_to_target_s"] is not None      # any finite loss is under 100 nats
    assert result["tokens"] == 3 * 4 * wan.SEQ_LEN
    # every step all-reduces ~3.6 MB of fp32 gradients between the two hosts
    assert result["network_bytes"] > 3 * 2 * 1_000_000
    assert all(v > 0 for v in result["network_bytes_per_host"].values())
    assert result["peak_rss_bytes_per_host"] > 0
    # ours are named after this process (other runs on the machine may hold theirs meanwhile)
    assert [n for n in list_namespaces() if n.startswith(owner_tag() + "-")] == []
