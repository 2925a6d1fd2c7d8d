"""Hostile inputs for fuzz tests: random protobuf messages from a descriptor, and mutations of their bytes.

A seed message fills every field of a method's request type with random values (strings from a small
pool that never names a real member, so a fuzz call cannot address one); mutations flip bits, cut,
extend, splice in fields with random numbers and wire types, or replace everything with noise.
"""

from __future__ import annotations

import random

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

GHOST_STRINGS = ("", "ghost-0", "ghost-1", "127.0.0.1:1", "cpu", "\u2603", "x" * 300, "stage", "local")
_INT_EDGES = (0, 1, -1, 2, 7, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63))
_FLOAT_EDGES = (0.0, 1.0, -1.0, 1e30, -1e-30, float("nan"), float("inf"), float("-inf"))


def _scalar(rng: random.Random, field: FieldDescriptor) -> object:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(GHOST_STRINGS)
    if t == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 4, 16, 64)))
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice(_FLOAT_EDGES) if rng.random() < 0.3 else rng.uniform(-10, 10)
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values)
    bits = 32 if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
                       FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32) else 64
    unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_UINT64,
                     FieldDescriptor.TYPE_FIXED64)
    value = rng.choice(_INT_EDGES) if rng.random() < 0.3 else rng.randint(-3, 16)
    if unsigned:
        return abs(value) % (2**bits)
    return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, value))


def random_message(rng: random.Random, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of that type with random values in some of its fields (sub-messages to depth 3)."""
    message = GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if rng.random() < 0.3:
            continue
        is_repeated = field.is_repeated
        count = rng.choice((0, 1, 2, 5)) if is_repeated else 1
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.message_type.GetOptions().map_entry:
                target = getattr(message, field.name)
                key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                for _ in range(count):
                    key = _scalar(rng, key_field)
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        target[key].CopyFrom(random_message(rng, value_field.message_type, depth + 1))
                    else:
                        target[key] = _scalar(rng, value_field)
                continue
            for _ in range(count):
                sub = random_message(rng, field.message_type, depth + 1)
                if is_repeated:
                    getattr(message, field.name).add().CopyFrom(sub)
                else:
                    getattr(message, field.name).CopyFrom(sub)
            continue
        for _ in range(count):
            value = _scalar(rng, field)
            if is_repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def random_field(rng: random.Random) -> bytes:
    """One field with a random number and wire type, well formed or not (groups, bad lengths, reserved)."""
    number = rng.choice((1, 2, 3, 15, 16, 19000, 2**29 - 1, rng.randint(1, 2**29 - 1), 0))
    wire = rng.randint(0, 7)
    tag = _varint((number << 3) | wire)
    if wire == 0:
        return tag + _varint(rng.getrandbits(64))
    if wire == 1:
        return tag + rng.randbytes(8)
    if wire == 2:
        length = rng.choice((0, 3, 100, 2**31, 2**40))
        return tag + _varint(length) + rng.randbytes(min(length, rng.randint(0, 40)))
    if wire == 5:
        return tag + rng.randbytes(4)
    return tag + rng.randbytes(rng.randint(0, 8))   # groups and the invalid wire types 6 and 7


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One or more mutations of ``data``: bit flips, truncation, extension, spliced random fields, noise."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(7)
        if op == 0 and out:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            del out[rng.randrange(len(out)):]
        elif op == 2:
            out += rng.randbytes(rng.randint(1, 32))
        elif op == 3:
            at = rng.randint(0, len(out))
            out[at:at] = random_field(rng)
        elif op == 4:
            out += random_field(rng)
        elif op == 5 and out:
            i = rng.randrange(len(out))
            out[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        else:
            out = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(out)


def hostile_messages(rng: random.Random, descriptor: Descriptor, count: int,
                     seeds: list[bytes] | None = None) -> list[bytes]:
    """``count`` byte strings for a method of that request type: a quarter noise, the rest mutated seeds
    (random messages of the type, plus ``seeds`` if given), including some unmutated."""
    pool = list(seeds or ())
    out: list[bytes] = []
    for i in range(count):
        if i % 4 == 0:
            out.append(rng.randbytes(rng.randint(0, 80)))
            continue
        seed = rng.choice(pool) if pool and rng.random() < 0.3 else \
            random_message(rng, descriptor).SerializeToString()
        out.append(seed if i % 16 == 1 else mutate(rng, seed))
    return out
