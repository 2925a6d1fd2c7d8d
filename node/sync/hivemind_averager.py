"""``diloco.backend = "hivemind"``: the same outer loop, averaged through hivemind.

Each replica runs one hivemind DHT, listening on the host its peers reach it at (no
NAT traversal: ``nat_port_map`` and ``auto_nat`` off), and one ``DecentralizedAverager``
per (fragment, group size), under the stage's prefix (``{run_id}_stage{s}_frag{p}_n{n}``),
so replicas of a stage, and only they, match into groups. ``StreamingDiLoCo`` is
unchanged: its ``job.delta`` goes in, the group mean comes out, ``finish_sync`` applies it.

The coordinator still decides who averages when (JoinSyncRound, as for gRPC); hivemind
only moves the numbers. The round's participants carry their DHT multiaddrs, so a
replica connects its DHT to them before the step (no hand-made bootstrap peer), and the
averager looks for a group of exactly the round's size (``min_group_size`` =
``target_group_size``): all of them or nobody, so no replica ends a round with a mean
its peers did not apply. What every peer sent along (round id, node id) is checked
against the round: a group of other replicas is never applied.

Equal θ_global on every replica needs bitwise equal means. Stock hivemind returns each
peer ``own + (mean - own)`` (with the codec applied to that difference), equal only up to
rounding; here an owner answers every peer with the mean itself, encoded once the same
way for all (``_MeanReducer``), as the gRPC ReduceShard owner does.

No robust aggregation: ``diloco.robust`` (norm clipping, trimmed mean) is the gRPC
ReduceShard owner's; hivemind's reducer sums each sender's parts piece by piece as they
stream in, so nobody holds a whole part to clip or trim. Use the grpc backend on open networks.

Codec mapping (hivemind has no 4-bit codec): fp32 -> NoCompression, bf16/fp16 ->
Float16Compression, int8/int4/fp8/fp4 -> Uniform8BitQuantization.
``wire_bytes_per_peer`` counts the serialized compressed tensor, times what a
reduce-scatter + all-gather sends per peer (2(n-1)/n), as the gRPC path is counted.

Blocking calls (every hivemind call waits on its background processes): run them in a
worker thread (``average_async``, ``HivemindBackend``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import TensorPartReducer
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.multiaddr import Multiaddr

from lowband.node.sync.averaging_backend import Averaged
from lowband.node.sync.diloco import SyncJob
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import DilocoSection

logger = logging.getLogger(__name__)

# hivemind's defaults: a declared group stays open this long (a full group starts at once), and a request
# must time out well within it (hivemind warns of rare matchmaking deadlocks otherwise)
MATCHMAKING_TIME_S = 5.0
REQUEST_TIMEOUT_S = 3.0
RESULT_SLACK_S = 5.0       # past hivemind's own deadlines before we stop waiting for a step's result
STARTUP_TIMEOUT_S = 30.0   # an averager process comes up in about a second; a busy machine may take far longer


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


def listen_maddr(host: str) -> str:
    """The DHT's listen multiaddr on `host` (an IP literal or a name), any free port."""
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:   # a host name: listen on the address it resolves to
        ip = ipaddress.ip_address(socket.getaddrinfo(bare, None, socket.AF_INET)[0][4][0])
    return f"/ip{ip.version}/{ip}/tcp/0"


# --------------------------------------------------------------------------- equal means for every peer


class _Mean:
    """A part's mean where hivemind computes ``mean - part``: the difference stays the mean itself."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __sub__(self, _part: torch.Tensor) -> torch.Tensor:
        return self.value


class _MeanReducer(TensorPartReducer):
    """Answers every sender with the mean, not with its difference to the sender's part.

    Remote senders get it encoded with the codec; this node's own part gets the same
    encode-decode, so all peers hold the same bits."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, local_sender: int,
                 compression: CompressionBase) -> None:
        super().__init__(part_shapes, num_senders)
        self.local_sender = local_sender
        self.compression = compression

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> Any:
        mean = await super().accumulate_part(sender_index, part_index, tensor_part, weight)
        if sender_index == self.local_sender:
            mean = deserialize_torch_tensor(serialize_torch_tensor(mean, self.compression.compression_type))
        return _Mean(mean)


class _MeanRunner(AllReduceRunner):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unused = self.tensor_part_reducer   # never fed: finished now, or its finalize warns it received nothing
        unused.current_part_future.cancel()
        unused.finished.set()
        self.tensor_part_reducer = _MeanReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids),
            local_sender=self.sender_peer_ids.index(self.peer_id),
            compression=kwargs.get("compression", NoCompression()))


class _MeanAverager(hivemind.averaging.DecentralizedAverager):
    """A DecentralizedAverager whose result is the group mean itself (runs in the averager's process)."""

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: Any,
                                      group_id: bytes | None = None, **kwargs: Any) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = _MeanRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                             group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        self._running_groups[group_id].set_result(runner)
        async for tensor, mean in azip(as_aiter(*tensors), runner):
            tensor.copy_(mean)
        if runner.tensor_part_container.failed_size:   # a lost part holds no mean: the caller drops the round
            for tensor in tensors:
                tensor.fill_(float("nan"))


# --------------------------------------------------------------------------- one replica's DHT and averagers


@dataclass(slots=True)
class HivemindStats:
    group_size: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    error: str = ""
    gathered: list[Any] = field(default_factory=list)   # what each group member sent along (``gather``)


async def _connect_peers(_dht: hivemind.DHT, node: Any, maddrs: Sequence[str]) -> int:
    """Inside the DHT process: connect to the peers at `maddrs` and add them to the routing table."""
    by_peer: dict[str, list[Multiaddr]] = {}
    for text in maddrs:
        maddr = Multiaddr(text)
        peer = maddr.value_for_protocol("p2p")
        by_peer.setdefault(peer, []).append(maddr.decapsulate(Multiaddr(f"/p2p/{peer}")))
    connected = 0
    for peer, addrs in by_peer.items():
        peer_id = PeerID.from_base58(peer)
        if peer_id == node.peer_id:
            continue
        try:
            await node.p2p._client.connect(peer_id, addrs)   # hivemind 1.1.12 has no public connect
            connected += await node.protocol.call_ping(peer_id) is not None
        except Exception as exc:   # an unreachable peer just forms no group
            logger.warning("hivemind: could not reach %s: %s", peer, exc)
    return connected


class HivemindAverager:
    """One replica's hivemind DHT and its averagers for one stage."""

    def __init__(
        self,
        fragment_numels: Sequence[int],
        *,
        run_id: str,
        stage: int,
        codec: str,
        target_group_size: int,
        initial_peers: Sequence[str] = (),
        min_group_size: int | None = None,
        matchmaking_time_s: float = MATCHMAKING_TIME_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        allreduce_timeout_s: float | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.fragment_numels = list(fragment_numels)
        self.prefix = f"{run_id}_stage{stage}".replace(".", "_")
        self.codec = codec
        self.target_group_size = target_group_size
        self.min_group_size = min_group_size
        self.matchmaking_time_s = matchmaking_time_s
        self.request_timeout_s = request_timeout_s
        self.allreduce_timeout_s = allreduce_timeout_s
        self.dht = hivemind.DHT(
            start=True,
            initial_peers=list(initial_peers),
            host_maddrs=[listen_maddr(host)],
            nat_port_map=False,
            auto_nat=False,
        )
        # (fragment, group size) -> averager: a round of another size matches only rounds of that size
        self.averagers: dict[tuple[int, int], _MeanAverager] = {}
        self._steps: set[Any] = set()   # StepControls in flight, cancelled by shutdown
        self._closed = False

    @property
    def maddrs(self) -> list[str]:
        """Where this DHT listens (with its peer id): what peers connect to."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def connect(self, maddrs: Sequence[str]) -> int:
        """Connect this DHT to the peers at `maddrs` (blocking); returns how many answered."""
        return self.dht.run_coroutine(functools.partial(_connect_peers, maddrs=list(maddrs)))

    def _averager(self, fragment: int, group_size: int) -> _MeanAverager:
        key = (fragment, group_size)
        averager = self.averagers.get(key)
        if averager is None:
            if self._closed:   # a round still running in a thread as the node leaves starts no new process
                raise RuntimeError("the hivemind averager is shut down")
            averager = _MeanAverager(
                [torch.zeros(self.fragment_numels[fragment])],
                self.dht,
                prefix=f"{self.prefix}_frag{fragment}_n{group_size}",
                target_group_size=group_size,
                min_group_size=self.min_group_size or group_size,
                min_matchmaking_time=self.matchmaking_time_s,
                request_timeout=self.request_timeout_s,
                allreduce_timeout=self.allreduce_timeout_s,
                compression=hivemind_compression(self.codec),
                allow_state_sharing=False,   # θ_global travels by GetState, never through hivemind
                start=False,
            )
            # not start=True: hivemind's run_in_background sets a SIGINT handler, which only the main thread
            # may do, and averagers start in the worker thread of the round that first needs them
            averager.start()
            try:
                averager.wait_until_ready(STARTUP_TIMEOUT_S)
            except BaseException:
                averager.shutdown()
                raise
            self.averagers[key] = averager
        return averager

    def average(self, fragment: int, flat: torch.Tensor, *, timeout_s: float, contribute: bool = True,
                group_size: int | None = None, gather: Any = None) -> tuple[torch.Tensor | None, HivemindStats]:
        """Group mean of `flat` (blocking). None when no group formed or the round failed.

        A replica that must not contribute (non-finite Δ) joins with weight 0. `timeout_s` bounds
        finding the group; the all-reduce itself is bounded by ``allreduce_timeout_s``.
        """
        stats = HivemindStats()
        if self.fragment_numels[fragment] == 0:
            return None, stats
        size = group_size or self.target_group_size
        x = flat.detach().to(torch.float32).reshape(-1)
        if contribute and not bool(torch.isfinite(x).all()):
            contribute = False
        started = time.monotonic()
        gathered: dict[Any, Any] | None = None
        try:
            averager = self._averager(fragment, size)
            with averager.get_tensors() as tensors:
                tensors[0].copy_(x if contribute else torch.zeros_like(x))
            control = averager.step(timeout=timeout_s, weight=1.0 if contribute else 0.0, allow_retries=True,
                                    gather=gather, wait=False)
            self._steps.add(control)
            try:
                # hivemind's own deadline covers matchmaking only: bound the whole wait, never hang the caller
                gathered = control.result(timeout=timeout_s + (self.allreduce_timeout_s or timeout_s) + RESULT_SLACK_S)
            finally:
                self._steps.discard(control)
        except Exception as exc:  # hivemind raises assorted errors on failed rounds
            stats.error = f"{type(exc).__name__}: {exc}"
        stats.seconds = time.monotonic() - started
        if not gathered:
            logger.warning("hivemind fragment %d: no group formed (%s)", fragment, stats.error or "timeout")
            return None, stats
        stats.group_size = len(gathered)
        stats.gathered = list(gathered.values())
        stats.bytes_sent = wire_bytes_per_peer(x, self.codec, stats.group_size)
        with averager.get_tensors() as tensors:
            out = tensors[0].detach().clone()
        if not bool(torch.isfinite(out).all()):   # a lost part, or nobody could contribute
            stats.error = "non-finite mean"
            logger.warning("hivemind fragment %d: the round lost a part or had no contributor", fragment)
            return None, stats
        return out, stats

    async def average_async(self, fragment: int, flat: torch.Tensor, *, timeout_s: float,
                            contribute: bool = True) -> tuple[torch.Tensor | None, HivemindStats]:
        return await asyncio.to_thread(self.average, fragment, flat, timeout_s=timeout_s, contribute=contribute)

    def shutdown(self) -> None:
        """Stop the averagers' processes, then the DHT's (which stops its p2pd)."""
        self._closed = True
        for control in list(self._steps):   # a caller waiting in average() returns now, with None
            control.cancel()
        for averager in self.averagers.values():
            averager.shutdown()
        self.averagers = {}
        if self.dht.is_alive():
            self.dht.shutdown()


# --------------------------------------------------------------------------- OuterSync's backend


class HivemindBackend:
    """``OuterSync``'s averaging through hivemind: the coordinator's round says who, hivemind averages."""

    name = "hivemind"
    reducer = None     # nobody calls ReduceShard on this node
    served_bytes = 0   # hivemind's replies are inside wire_bytes_per_peer already

    def __init__(self, fragment_numels: Sequence[int], *, run_id: str, stage: int, node_id: str,
                 cfg: DilocoSection, host: str) -> None:
        self.fragment_numels = list(fragment_numels)
        self.run_id = run_id
        self.stage = stage
        self.node_id = node_id
        self.cfg = cfg
        self.host = host
        if cfg.robust != "off":
            # hivemind's TensorPartReducer sums each sender's parts as they stream in, a piece of a
            # sender's span at a time: no owner ever holds a whole part to clip by its norm or to trim
            logger.warning("stage %d: diloco.robust = %r applies to the grpc backend only; hivemind averages "
                           "with its plain mean (one hostile replica can move θ_global at will)",
                           stage, cfg.robust)
        # finding the group, then the all-reduce, each within the peer timeout: the exchange ends within the
        # two peer timeouts OuterSync's merge waits for (the gRPC owner's wait, then its reply)
        self.timeout_s = cfg.peer_timeout_s
        self.matchmaking_time_s = min(MATCHMAKING_TIME_S, cfg.peer_timeout_s / 2)   # must end before the timeout
        self.request_timeout_s = min(REQUEST_TIMEOUT_S, self.matchmaking_time_s / 2)
        # the DHT's start, in a thread; kept (not just awaited) so that close() stops a DHT whose start
        # was still under way when the node began to leave
        self._starting: asyncio.Future[HivemindAverager] | None = None
        self._maddrs: list[str] = []

    @property
    def maddrs(self) -> list[str]:
        return self._maddrs

    def _start(self) -> HivemindAverager:
        averager = HivemindAverager(self.fragment_numels, run_id=self.run_id, stage=self.stage, codec=self.cfg.codec,
                                    target_group_size=2, matchmaking_time_s=self.matchmaking_time_s,
                                    request_timeout_s=self.request_timeout_s,
                                    allreduce_timeout_s=self.cfg.peer_timeout_s, host=self.host)
        try:
            self._maddrs = averager.maddrs
        except BaseException:
            averager.shutdown()
            raise
        logger.info("hivemind DHT of stage %d listening at %s", self.stage, self._maddrs)
        return averager

    async def start(self) -> None:
        """Start the DHT once (a failed start is tried again by the next round): its maddrs go into every
        round request."""
        await self._ready()

    async def _ready(self) -> HivemindAverager:
        if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
            self._starting = asyncio.ensure_future(asyncio.to_thread(self._start))
        return await asyncio.shield(self._starting)

    async def average(self, job: SyncJob, reply: pb.SyncRoundReply, my_index: int) -> Averaged:
        averager = await self._ready()
        ids = [p.node_id for p in reply.participants]
        if len(ids) == 1:   # a round of one: its mean is its own Δ
            return Averaged(job.delta.detach().to(torch.float32).reshape(-1).clone(), fields={"group_size": 1})
        peers = [m for i, p in enumerate(reply.participants) if i != my_index for m in p.sync_maddrs]
        mine = {"round_id": reply.round_id, "node_id": self.node_id}

        def run() -> tuple[torch.Tensor | None, HivemindStats]:
            if peers:
                averager.connect(peers)
            return averager.average(job.fragment, job.delta, timeout_s=self.timeout_s, contribute=job.finite,
                                    group_size=len(ids), gather=mine)

        mean, stats = await asyncio.to_thread(run)
        if mean is not None:
            members = sorted(str(g.get("node_id")) for g in stats.gathered if isinstance(g, dict))
            rounds = {g.get("round_id") for g in stats.gathered if isinstance(g, dict)}
            if members != sorted(ids) or rounds != {reply.round_id}:
                # every member sees the same gathered data, so they all drop this group alike
                logger.warning("hivemind fragment %d: the group (%s, rounds %s) is not round %d's participants",
                               job.fragment, members, sorted(map(str, rounds)), reply.round_id)
                mean = None
        return Averaged(mean, bytes_sent=stats.bytes_sent,
                        fields={"group_size": stats.group_size, "error": stats.error})

    async def close(self) -> None:
        starting, self._starting = self._starting, None
        if starting is None:
            return
        try:
            averager = await starting
        except Exception:   # it never started: nothing to stop
            return
        await asyncio.to_thread(averager.shutdown)
