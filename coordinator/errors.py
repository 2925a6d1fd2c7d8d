"""Typed request errors of the coordinator core, each mapped to one gRPC status by the servicer."""

from __future__ import annotations

from lowband.protocols.errors import ValidationError


class InvalidRequest(ValidationError):
    """A field is missing, malformed, oversized or out of range (INVALID_ARGUMENT)."""


class UnknownNode(LookupError):
    """A node id (or plan id) the coordinator does not know (NOT_FOUND)."""


class Conflict(RuntimeError):
    """The request is well formed but contradicts current state, e.g. the wrong stage (FAILED_PRECONDITION)."""


class IdentityRefused(PermissionError):
    """A join under the id of a live node by another identity (ALREADY_EXISTS: the id frees when its lease ends)."""
