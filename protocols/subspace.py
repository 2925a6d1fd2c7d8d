"""The subspace hop: a pipeline activation sent as a few coordinates and the token ids.

In the style of Protocol Models (arXiv 2506.01260). A model built with ``model.subspace_rank = k``
keeps its residual stream in two parts (``lowband.node.train.model``): the first ``k`` coordinates,
which the learned token embedding and every block's output projections write, and the other
``D - k``, which hold a *fixed* anchor of the token at that position and are never written. A hop
then needs only the ``k`` learned coordinates and the token ids: the receiver puts the anchors back
from its own copy of the table. Backward is exact too: the sender's parameters reach the residual
only through the first ``k`` coordinates, so the gradient's other coordinates carry nothing it needs.
Either way the hop itself loses nothing; the coordinates may then go through a quantising codec
(``subspace-int8``: int8 coordinates), which is the only loss.

The anchors are the state both ends must share. They are a pure function of the model's shape
(width, rank, vocabulary) and a protocol version, made with integer draws only (every entry is
``+scale`` or ``-scale``), so every machine builds them bit for bit whatever its libm or BLAS: a
replica, a joiner and a stage rebuilt by CheckFree hold them by construction, with nothing to copy
and nothing a restart can lose. Every payload carries the sender's ``fingerprint``; a receiver whose
own differs refuses it. A token's id is written in the signs of its anchor's first ``ceil(log2 V)``
entries, so a sender reads the ids back from the activation itself (no change to what a hop
carries besides the tensor) and checks, while doing so, that the activation really has the layout.

The subspace is the first ``k`` coordinates rather than a random rotation: a model whose weights are
initialised i.i.d. per coordinate cannot tell the two apart, and slicing is exact where a rotation
would make two machines' bases differ in their last bits.

Pure: no I/O. ``lowband.node.pipeline.payload`` puts the result into a hop's message.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from lowband.protocols import tensor_pb2
from lowband.protocols.config import HOP_CODECS
from lowband.protocols.errors import ValidationError
from lowband.protocols.hop_bytes import inner_codec, is_subspace, token_bytes

SUBSPACE_CODECS = tuple(codec for codec in HOP_CODECS if is_subspace(codec))   # one per plain codec
ANCHOR_SCALE = 0.02           # the magnitude of every anchor entry: the scale of a token embedding at init
_ANCHOR_VERSION = 1           # bump when the anchors' construction changes: fingerprints then differ
_MAX_VOCAB = 1 << 31


def code_bits(vocab_size: int) -> int:
    """Anchor entries that spell a token id in their signs."""
    return max(1, math.ceil(math.log2(vocab_size)))


_TOKEN_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def check_shape(dim: int, rank: int, vocab_size: int) -> None:
    """Raise ValueError unless a subspace of ``rank`` fits a width of ``dim`` for ``vocab_size`` tokens."""
    if not 2 <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} out of range [2, {_MAX_VOCAB}]")
    if not 1 <= rank < dim:
        raise ValueError(f"subspace rank {rank} must be in [1, dim={dim})")
    if dim - rank < code_bits(vocab_size):
        raise ValueError(f"subspace rank {rank} leaves {dim - rank} anchor entries; {vocab_size} tokens need "
                         f"at least {code_bits(vocab_size)} (lower the rank)")


@dataclass(frozen=True, slots=True, eq=False)
class SubspaceBasis:
    """The anchors of a run and how a hop's tensor maps to (coordinates, token ids) and back."""

    dim: int
    rank: int
    vocab_size: int
    anchors: torch.Tensor     # (V, D - k) float32, entries +-ANCHOR_SCALE, never trained
    fingerprint: int          # 64 bits of (version, dim, rank, vocab, scale)

    @property
    def anchor_dim(self) -> int:
        return self.dim - self.rank

    # -- the sending side

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """The learned part of an activation or gradient (..., D) -> (..., k), contiguous."""
        return x[..., :self.rank].contiguous()

    def tokens_of(self, x: torch.Tensor) -> torch.Tensor:
        """The token ids an activation (..., D) carries in its anchors, as int64 (...).

        Raises ValidationError when the anchor part is not the anchor of any token: the activation
        came from a model without this layout, and the receiver could not rebuild it.
        """
        bits = code_bits(self.vocab_size)
        anchor_part = x[..., self.rank:].detach().float().cpu()   # the anchors table lives on the CPU
        weights = (1 << torch.arange(bits, dtype=torch.int64))
        tokens = ((anchor_part[..., :bits] > 0).to(torch.int64) * weights).sum(-1)
        if bool((tokens >= self.vocab_size).any()):
            raise ValidationError("activation's anchor spells a token id past the vocabulary: "
                                  "not an activation of this subspace model")
        expected = self.anchors[tokens]
        # exact in fp32 (nothing adds to the anchor part); the slack covers a sender that rounds its
        # residual stream, and is far below the anchors' spacing
        if bool(((anchor_part - expected).abs() > 0.25 * ANCHOR_SCALE).any()):
            raise ValidationError("activation's anchor part is not a token's anchor: not an activation "
                                  "of this subspace model (check model.subspace_rank)")
        return tokens

    # -- the receiving side

    def lift(self, coords: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """(..., k) coordinates back to (..., D) float32: the token anchors beside them for an activation,
        zeros for a gradient (``tokens`` None)."""
        coords = coords.float()
        if tokens is None:
            rest = coords.new_zeros((*coords.shape[:-1], self.anchor_dim))
        else:
            rest = self.anchors[tokens]
        return torch.cat([coords, rest], dim=-1)

    # -- the message's part

    def describe(self, x: torch.Tensor, *, with_tokens: bool) -> tensor_pb2.SubspaceCoding:
        """The message's ``subspace`` field for a tensor (B, T, D) sent as its coordinates."""
        coding = tensor_pb2.SubspaceCoding(fingerprint=self.fingerprint, dim=self.dim)
        if with_tokens:
            width = token_bytes(self.vocab_size)
            ids = self.tokens_of(x).reshape(-1)
            coding.tokens = ids.to(_TOKEN_DTYPES[width]).numpy().tobytes()
            coding.token_bytes = width
        return coding

    def receive(self, coords: torch.Tensor, coding: tensor_pb2.SubspaceCoding) -> torch.Tensor:
        """The full tensor (B, T, D) a message's coordinates and ``subspace`` field stand for.

        Raises ValidationError for a payload this basis cannot rebuild: another fingerprint (the
        sender's anchors differ), another width or rank, token ids of the wrong count or out of range.
        """
        if coding.fingerprint != self.fingerprint:
            raise ValidationError(f"subspace fingerprint {coding.fingerprint:#018x} is not this stage's "
                                  f"{self.fingerprint:#018x}: the sender's anchors differ (another "
                                  "model width, rank or vocabulary)")
        if coding.dim != self.dim or coords.ndim < 1 or coords.shape[-1] != self.rank:
            raise ValidationError(f"subspace payload of shape {list(coords.shape)} for width {coding.dim}; "
                                  f"this stage expects (..., {self.rank}) for width {self.dim}")
        if not coding.tokens:
            if coding.token_bytes:
                raise ValidationError("subspace payload names a token width but carries no tokens")
            return self.lift(coords, None)
        width = token_bytes(self.vocab_size)
        positions = coords.numel() // self.rank
        if coding.token_bytes != width or len(coding.tokens) != positions * width:
            raise ValidationError(f"subspace payload carries {len(coding.tokens)} bytes of token ids "
                                  f"({coding.token_bytes} each); {positions} positions need {positions * width} "
                                  f"({width} each)")
        raw = torch.frombuffer(bytearray(coding.tokens), dtype=_TOKEN_DTYPES[width]).to(torch.int64)
        if width == 2:
            raw = raw & 0xFFFF                           # int16 on the wire is unsigned
        if bool((raw < 0).any()) or bool((raw >= self.vocab_size).any()):
            raise ValidationError(f"subspace payload carries token ids outside [0, {self.vocab_size})")
        return self.lift(coords, raw.reshape(coords.shape[:-1]))


def _fingerprint(dim: int, rank: int, vocab_size: int) -> int:
    key = struct.pack("<IIIId", _ANCHOR_VERSION, dim, rank, vocab_size, ANCHOR_SCALE)
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


@functools.lru_cache(maxsize=8)
def make_basis(dim: int, rank: int, vocab_size: int) -> SubspaceBasis:
    """The anchors of a model shape: token ``v``'s first ``code_bits`` entries spell ``v`` in signs (bit
    ``j`` set: ``+scale``), the rest are signs drawn from a generator seeded by the fingerprint. Cached:
    the stages and the hops of a process share one."""
    check_shape(dim, rank, vocab_size)
    bits = code_bits(vocab_size)
    ids = torch.arange(vocab_size, dtype=torch.int64)
    code = ((ids[:, None] >> torch.arange(bits)) & 1).to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(_fingerprint(dim, rank, vocab_size) & ((1 << 63) - 1))
    rest = torch.randint(0, 2, (vocab_size, dim - rank - bits), generator=gen).to(torch.float32)
    anchors = (torch.cat([code, rest], dim=1) * 2.0 - 1.0) * ANCHOR_SCALE
    return SubspaceBasis(dim=dim, rank=rank, vocab_size=vocab_size, anchors=anchors,
                         fingerprint=_fingerprint(dim, rank, vocab_size))


__all__ = [
    "ANCHOR_SCALE",
    "SUBSPACE_CODECS",
    "SubspaceBasis",
    "check_shape",
    "code_bits",
    "inner_codec",
    "is_subspace",
    "make_basis",
    "token_bytes",
]
