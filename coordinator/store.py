"""SQLite persistence of the coordinator's state, so a restarted coordinator resumes.

One file in the run directory (WAL mode, synchronous=NORMAL: a commit survives
the process being killed, and costs no fsync). Membership changes, events and
formed sync rounds are written at once; node metrics change every heartbeat, so
they are written in batches by a periodic flush (losing a few seconds of
metrics on a crash is harmless). Standard-library sqlite3 only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DB_NAME = "coordinator.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    device TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    throughput REAL NOT NULL,
    version TEXT NOT NULL,
    has_data INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    state TEXT NOT NULL,
    joined_at REAL NOT NULL,
    metrics BLOB
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    node_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    stage INTEGER NOT NULL,
    fragment INTEGER NOT NULL,
    round_id INTEGER NOT NULL,
    outer_step INTEGER NOT NULL,
    participants TEXT NOT NULL,
    PRIMARY KEY (stage, fragment)
);
"""


@dataclass(slots=True, eq=False)
class MemberInfo:
    """What the coordinator keeps of a node across its own restarts (the live member adds its lease)."""

    node_id: str
    address: str
    device: str
    memory_bytes: int
    throughput: float
    version: str
    has_data: bool
    stage: int
    state: str
    joined_at: float                 # wall clock, for humans

    def info(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(MemberInfo)}


@dataclass(slots=True)
class MemberRecord(MemberInfo):
    metrics: bytes = b""  # a serialized NodeMetrics


@dataclass(frozen=True, slots=True)
class EventRecord:
    time: float
    kind: str
    node_id: str
    stage: int
    detail: str


class Store:
    """The coordinator's SQLite file. Not thread-safe: use it from the event loop only."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit BEGIN for batches
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, value))

    # -- members ------------------------------------------------------------
    def upsert_member(self, m: MemberRecord) -> None:
        self._db.execute(
            "INSERT INTO members VALUES(?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(node_id) DO UPDATE SET "
            "address=excluded.address, device=excluded.device, memory_bytes=excluded.memory_bytes, "
            "throughput=excluded.throughput, version=excluded.version, has_data=excluded.has_data, "
            "stage=excluded.stage, state=excluded.state, metrics=excluded.metrics",
            (m.node_id, m.address, m.device, m.memory_bytes, m.throughput, m.version, int(m.has_data),
             m.stage, m.state, m.joined_at, m.metrics),
        )

    def save_metrics(self, batch: Iterable[tuple[str, bytes]]) -> None:
        """Write many nodes' latest metrics in one transaction."""
        self._db.execute("BEGIN")
        try:
            self._db.executemany("UPDATE members SET metrics = ? WHERE node_id = ?",
                                 ((blob, node_id) for node_id, blob in batch))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def load_members(self) -> list[MemberRecord]:
        rows = self._db.execute("SELECT * FROM members ORDER BY joined_at, node_id").fetchall()
        return [MemberRecord(r[0], r[1], r[2], int(r[3]), float(r[4]), r[5], bool(r[6]), int(r[7]), r[8],
                             float(r[9]), bytes(r[10] or b"")) for r in rows]

    # -- events ---------------------------------------------------------------
    def add_event(self, e: EventRecord) -> None:
        self._db.execute("INSERT INTO events(time, kind, node_id, stage, detail) VALUES(?,?,?,?,?)",
                         (e.time, e.kind, e.node_id, e.stage, e.detail))

    def recent_events(self, limit: int) -> list[EventRecord]:
        rows = self._db.execute("SELECT time, kind, node_id, stage, detail FROM events ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [EventRecord(float(r[0]), r[1], r[2], int(r[3]), r[4]) for r in reversed(rows)]

    # -- sync rounds -----------------------------------------------------------
    def save_round(self, stage: int, fragment: int, round_id: int, outer_step: int,
                   participants: Iterable[str]) -> None:
        self._db.execute(
            "INSERT INTO rounds VALUES(?,?,?,?,?) ON CONFLICT(stage, fragment) DO UPDATE SET "
            "round_id=excluded.round_id, outer_step=excluded.outer_step, participants=excluded.participants",
            (stage, fragment, round_id, outer_step, json.dumps(list(participants))),
        )

    def load_rounds(self) -> list[tuple[int, int, int, int, tuple[str, ...]]]:
        rows = self._db.execute("SELECT stage, fragment, round_id, outer_step, participants FROM rounds").fetchall()
        return [(int(r[0]), int(r[1]), int(r[2]), int(r[3]), tuple(json.loads(r[4]))) for r in rows]
