"""``diloco.backend = "hivemind"``: the same outer loop, averaged through hivemind.

Each replica runs one hivemind DHT (loopback, no NAT traversal: ``nat_port_map`` and
``auto_nat`` off) and one ``DecentralizedAverager`` per fragment, all under the
stage's prefix (``{run_id}_stage{s}_frag{p}``), so replicas of a stage, and only
they, match into groups. ``StreamingDiLoCo`` is unchanged: its ``job.delta`` goes in,
the group mean comes out, ``finish_sync`` applies it. This exists to compare our
gRPC ReduceShard path with hivemind's butterfly all-reduce side by side.

Codec mapping (hivemind has no 4-bit codec): fp32 -> NoCompression, bf16/fp16 ->
Float16Compression, int8/int4/fp8/fp4 -> Uniform8BitQuantization.
``wire_bytes_per_peer`` counts the serialized compressed tensor, times what a
reduce-scatter + all-gather sends per peer (2(n-1)/n), as the gRPC path is counted.

Blocking calls: run ``average`` in a worker thread (``average_async`` does).
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import hivemind
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
)

logger = logging.getLogger(__name__)

LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)


def hivemind_compression(codec: str) -> CompressionBase:
    """The closest hivemind compression to one of our codecs."""
    if codec == "fp32":
        return NoCompression()
    if codec in ("bf16", "fp16"):
        return Float16Compression()
    if codec in ("int8", "int4", "fp8", "fp4"):
        return Uniform8BitQuantization()
    raise ValueError(f"unknown codec {codec!r}")


def wire_bytes_per_peer(flat: torch.Tensor, codec: str, group_size: int) -> int:
    """Bytes one peer sends to average `flat` in a group: serialized size x 2(n-1)/n."""
    if group_size <= 1:
        return 0
    compression = hivemind_compression(codec)
    x = flat.detach().to(torch.float32).reshape(-1)
    with warnings.catch_warnings():  # hivemind's 8-bit path uses torch's deprecated quantize_per_tensor
        warnings.simplefilter("ignore", UserWarning)
        size = compression.compress(x, CompressionInfo.from_tensor(x)).ByteSize()
    return round(size * 2 * (group_size - 1) / group_size)


@dataclass(slots=True)
class HivemindStats:
    group_size: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    error: str = ""


class HivemindAverager:
    """One replica's hivemind DHT and per-fragment averagers for one stage."""

    def __init__(
        self,
        fragment_numels: Sequence[int],
        *,
        run_id: str,
        stage: int,
        codec: str,
        target_group_size: int,
        initial_peers: Sequence[str] = (),
        min_group_size: int = 2,
        matchmaking_time_s: float = 1.0,
        request_timeout_s: float = 0.5,
    ) -> None:
        self.codec = codec
        self.dht = hivemind.DHT(
            start=True,
            initial_peers=list(initial_peers),
            host_maddrs=list(LOOPBACK_MADDRS),
            nat_port_map=False,
            auto_nat=False,
        )
        self.averagers: list[hivemind.averaging.DecentralizedAverager | None] = []
        try:
            for p, numel in enumerate(fragment_numels):
                if numel == 0:
                    self.averagers.append(None)
                    continue
                self.averagers.append(hivemind.averaging.DecentralizedAverager(
                    [torch.zeros(numel)],
                    self.dht,
                    prefix=f"{run_id}_stage{stage}_frag{p}".replace(".", "_"),
                    target_group_size=target_group_size,
                    min_group_size=min_group_size,
                    min_matchmaking_time=matchmaking_time_s,
                    request_timeout=request_timeout_s,
                    compression=hivemind_compression(codec),
                    start=True,
                ))
        except Exception:
            self.shutdown()
            raise

    @property
    def maddrs(self) -> list[str]:
        """Addresses a newcomer passes as ``initial_peers``."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def average(self, fragment: int, flat: torch.Tensor, *, timeout_s: float,
                contribute: bool = True) -> tuple[torch.Tensor | None, HivemindStats]:
        """Group mean of `flat` (blocking). None when no group formed or the round failed.

        A replica that must not contribute (non-finite Δ) joins with weight 0.
        """
        averager = self.averagers[fragment]
        stats = HivemindStats()
        if averager is None:
            return None, stats
        x = flat.detach().to(torch.float32).reshape(-1)
        if contribute and not bool(torch.isfinite(x).all()):
            contribute = False
        started = time.monotonic()
        with averager.get_tensors() as tensors:
            tensors[0].copy_(x if contribute else torch.zeros_like(x))
        try:
            group = averager.step(timeout=timeout_s, weight=1.0 if contribute else 0.0, allow_retries=True)
        except Exception as exc:  # hivemind raises assorted errors on failed rounds
            stats.error = f"{type(exc).__name__}: {exc}"
            group = None
        stats.seconds = time.monotonic() - started
        if not group:
            logger.warning("hivemind fragment %d: no group formed (%s)", fragment, stats.error or "timeout")
            return None, stats
        stats.group_size = len(group)
        stats.bytes_sent = wire_bytes_per_peer(x, self.codec, stats.group_size)
        with averager.get_tensors() as tensors:
            out = tensors[0].detach().clone()
        return out, stats

    async def average_async(self, fragment: int, flat: torch.Tensor, *, timeout_s: float,
                            contribute: bool = True) -> tuple[torch.Tensor | None, HivemindStats]:
        return await asyncio.to_thread(self.average, fragment, flat, timeout_s=timeout_s, contribute=contribute)

    def shutdown(self) -> None:
        for averager in self.averagers:
            if averager is not None:
                averager.shutdown()
        self.averagers = []
        self.dht.shutdown()
