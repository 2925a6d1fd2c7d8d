"""Which run a stored stage state belongs to, as node and coordinator both compute it.

A node with a ``--state-dir`` tells the coordinator at join which stage states it holds
(``JoinRequest.stored_stages``); the coordinator uses only those of its own run: the same run id,
stage count and ``[model]`` section (the resolved one the coordinator hands out, which the node
wrote into its state file). Both sides hash the same three things here, so neither has to send
the other its whole model section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

LOCAL_STATE = "local-state"   # the plan method: resume the stage from the node's own --state-dir


def stage_fingerprint(run_id: str, num_stages: int, model: Mapping[str, Any]) -> str:
    """A short hash of what a stage state must match to be resumed in a run."""
    text = json.dumps({"run_id": run_id, "num_stages": int(num_stages), "model": dict(model)}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
