"""The hop from and to a stage's device: pinned host buffers and non-blocking copies.

A CPU stage's tensors are already in host memory: both directions hand them over as they are (no copy).
A CUDA stage's activation leaves the device without a synchronous ``.cpu()``:

- out (``to_host``, on the event loop): a side copy stream waits for the compute stream, casts a raw
  codec's tensor to its wire dtype on the device (bf16 halves the bytes crossing PCIe, and the cast is
  then free on the host), copies into a pinned buffer with ``non_blocking=True`` and records an event.
  The wait for that event runs on a thread, so the event loop goes on writing the previous microbatch to
  the wire and the stage's worker thread goes on computing the next one while the copy is in flight;
- in (``to_device``, on the stage's worker thread): the received bytes are staged in a pinned buffer and
  copied with ``non_blocking=True`` on the compute stream, so the forward's kernels queue behind the
  copy instead of the thread waiting for it; the staging buffer is reused once its copy's event is done.

Pinned memory is slow to allocate (a driver call that locks pages), so buffers are pooled by size
(``PinnedPool``): a pipeline's hops repeat the same few shapes. The pool is plain logic over an
allocator and events, tested on CPU with stand-ins; the CUDA behaviour is tested where CUDA exists.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

# Free buffers kept per size: a stage has at most a few hops of one shape in flight at once (forward out,
# backward out, and the next microbatch's); more would only pin memory nobody uses.
MAX_FREE_PER_SIZE = 4


class Event(Protocol):
    """What the pool needs of a CUDA event: whether the work recorded before it is done."""

    def query(self) -> bool: ...


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer of ``nbytes`` bytes (CUDA must be present)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Host buffers reused by size. A buffer is ``acquire``d, used, and given back either at once
    (``release``) or once an asynchronous copy that reads or writes it is done (``release_after``):
    reusing it earlier would let the next hop overwrite bytes still being copied."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] = pinned_bytes, *,
                 max_free_per_size: int = MAX_FREE_PER_SIZE) -> None:
        if max_free_per_size < 0:
            raise ValueError(f"max_free_per_size must be >= 0, got {max_free_per_size}")
        self._allocate = allocate
        self._max_free = max_free_per_size
        self._free: dict[int, deque[torch.Tensor]] = defaultdict(deque)
        self._pending: list[tuple[Event, torch.Tensor]] = []
        # the event loop (hops out) and the stage's worker thread (hops in) share one pool
        self._lock = threading.Lock()
        self.allocations = 0   # buffers made, for tests and metrics: steady state makes none

    def _reap(self) -> None:
        still = []
        for event, buf in self._pending:
            if event.query():
                self._keep(buf)
            else:
                still.append((event, buf))
        self._pending = still

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly ``nbytes`` bytes: a free one of that size, else a new one."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            self._reap()
            free = self._free.get(nbytes)
            if free:
                return free.popleft()
            self.allocations += 1
        return self._allocate(nbytes)

    def release(self, buf: torch.Tensor) -> None:
        """Give ``buf`` back now (no copy touches it any more)."""
        with self._lock:
            self._keep(buf)

    def _keep(self, buf: torch.Tensor) -> None:
        free = self._free[buf.numel()]
        if len(free) < self._max_free:
            free.append(buf)

    def release_after(self, buf: torch.Tensor, event: Event) -> None:
        """Give ``buf`` back once ``event`` has completed (checked at the next ``acquire``)."""
        with self._lock:
            self._pending.append((event, buf))

    def free_count(self, nbytes: int) -> int:
        return len(self._free.get(nbytes, ()))


def _typed(buf: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``buf``'s bytes viewed as a tensor of ``shape`` and ``dtype`` (no copy)."""
    return buf.view(dtype).view(shape) if buf.numel() else torch.empty(shape, dtype=dtype)


@dataclass(slots=True)
class HostTensor:
    """A hop's tensor in host memory, and the pooled buffer behind it (None: not the pool's)."""

    tensor: torch.Tensor
    buffer: torch.Tensor | None = None


class DeviceHop:
    """Moves one stage's hop tensors between its device and host memory (see the module docstring)."""

    def __init__(self, device: torch.device | str, pool: PinnedPool | None = None) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.pool = pool if pool is not None else PinnedPool()
        self._copy_stream: torch.cuda.Stream | None = None

    def host_dtype(self, tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype a tensor leaves the device in: its raw codec's wire dtype when that is narrower
        (the cast is done on the device), else its own (quantised codecs encode fp32 on the host)."""
        if wire_dtype is not None and wire_dtype.itemsize < tensor.dtype.itemsize:
            return wire_dtype
        return tensor.dtype

    async def to_host(self, tensor: torch.Tensor, wire_dtype: torch.dtype | None = None) -> HostTensor:
        """``tensor`` in host memory. CPU: itself. CUDA: a pinned copy, in ``wire_dtype`` when that is
        narrower; the event loop is free while the copy runs. ``release`` it once sent."""
        if not tensor.is_cuda:
            return HostTensor(tensor)
        stream = self._stream()
        dtype = self.host_dtype(tensor, wire_dtype)
        buf = self.pool.acquire(tensor.numel() * dtype.itemsize)
        host = _typed(buf, tensor.shape, dtype)
        event = torch.cuda.Event()
        # The compute stream may still be producing ``tensor``: the copy stream waits for it on the GPU.
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            source = tensor.detach().to(dtype).contiguous()   # on the device: the cast costs no host time
            host.copy_(source, non_blocking=True)
            event.record(stream)
        # the caching allocator must not hand ``tensor``'s memory (or the cast's) to the compute stream
        # before the copy has read it
        tensor.record_stream(stream)
        source.record_stream(stream)
        await asyncio.to_thread(event.synchronize)   # a CPU-GPU sync point, off the event loop
        return HostTensor(host, buf)

    def release(self, host: HostTensor) -> None:
        """The hop's bytes are sent (or copied by the transport): its buffer may carry the next one."""
        if host.buffer is not None:
            self.pool.release(host.buffer)
            host.buffer = None

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` on the stage's device in ``dtype`` (default: its own). CPU: as ``Tensor.to`` (no copy
        when nothing changes). CUDA: staged through a pinned buffer, copied without blocking the thread;
        the kernels that use it queue behind the copy on the same stream. Call on the compute thread."""
        dtype = dtype or tensor.dtype
        if not self.on_cuda or tensor.device.type != "cpu":
            return tensor.to(self.device, dtype)
        source = tensor.detach().contiguous()
        if source.is_pinned():
            return source.to(self.device, non_blocking=True).to(dtype)
        buf = self.pool.acquire(source.numel() * source.element_size())
        staged = _typed(buf, source.shape, source.dtype)
        staged.copy_(source)
        on_device = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pool.release_after(buf, event)
        return on_device.to(dtype)

    def _stream(self) -> torch.cuda.Stream:
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream


__all__ = ["DeviceHop", "HostTensor", "PinnedPool", "pinned_bytes"]
