"""Whether namespace hosts can be made here, for the tests that need them.

Elsewhere those tests skip with the reason. CI sets ``LOWBAND_REQUIRE_NETNS=1``: there a
machine that cannot make them fails the tests instead of skipping them unseen.
"""

from __future__ import annotations

import os

import pytest

from lowband.sim.netns import NetnsUnavailable, check_available

try:
    check_available()
    UNAVAILABLE = ""
except NetnsUnavailable as exc:
    UNAVAILABLE = str(exc)

if UNAVAILABLE and os.environ.get("LOWBAND_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"LOWBAND_REQUIRE_NETNS=1 but {UNAVAILABLE}")

needs_netns = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"needs root and iproute2: {UNAVAILABLE}")
