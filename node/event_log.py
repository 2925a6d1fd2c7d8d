"""The ``--log-json`` stream: one JSON object per line (the record kinds are listed in node/daemon.py)."""

from __future__ import annotations

import json
import time
from typing import Any


class EventLog:
    """JSON lines of events and metrics (the simulator reads them); each record names node, stage, step."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1) if path else None
        self.context: dict[str, Any] = {}

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": time.time(), "kind": kind, **self.context, **fields}
        self._file.write(json.dumps(record, default=str) + "\n")

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
