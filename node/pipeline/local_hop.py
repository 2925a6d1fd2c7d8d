"""A hop without the network: the message a node would send, decoded as the receiving node would.

For training in one process with the pipeline's compression (``lowband.sim.skiptrain``'s ``hop``,
``benchmarks/activations.py``): the forward pass sends activations in the activation codec, the
backward pass their gradients in the gradient codec, each through ``build_microbatch`` and
``codec.decode`` with the receiver's checks (shape, finite), and counts the bytes each direction
would have put on the wire.
"""

from __future__ import annotations

from typing import Any

import torch

from lowband.node.pipeline.payload import build_microbatch, lift_received
from lowband.protocols import node_pb2
from lowband.protocols.codec import decode
from lowband.protocols.subspace import SubspaceBasis


class CodecHop:
    """A network hop as an autograd step: encode and decode activations forward, gradients backward."""

    def __init__(self, activation_codec: str, gradient_codec: str, subspace: SubspaceBasis | None = None) -> None:
        self.activation_codec = activation_codec
        self.gradient_codec = gradient_codec
        self.subspace = subspace          # the model's basis, for the subspace-* codecs
        self.bytes = {"forward": 0, "backward": 0}
        self.hops = 0
        self._header = node_pb2.MicrobatchHeader(run_id="local", origin_id="o", microbatch=0, iteration=0)

    def cross(self, tensor: torch.Tensor, codec: str, direction: str) -> torch.Tensor:
        out = build_microbatch(self._header, tensor.detach().float().contiguous(), codec, subspace=self.subspace,
                               backward=direction == "backward")
        self.bytes[direction] += len(out.header_bytes) + out.nbytes
        # as a receiving node reads it: bounded, finite (the wire's TCP stream stands in for the checksum),
        # lifted out of the subspace, shape-checked
        received = decode(out.meta, payload=bytearray(bytes(out.payload)), require_finite=True,
                          require_checksum=False)
        received = lift_received(out.meta, received, self.subspace)
        if received.shape != tensor.shape:
            raise AssertionError(f"hop changed the shape {list(tensor.shape)} -> {list(received.shape)}")
        return received.to(tensor.dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hops += 1
        return _Hop.apply(hidden, self)


class _Hop(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, hop: CodecHop) -> torch.Tensor:   # type: ignore[override]
        ctx.hop = hop
        return hop.cross(hidden, hop.activation_codec, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:   # type: ignore[override]
        return ctx.hop.cross(grad, ctx.hop.gradient_codec, "backward"), None
