"""The node's place in the run, as the coordinator last said it (join replies and schedules update it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Membership:
    """Shared by the daemon (join, heartbeat), the schedule keeper and the origin's data loader."""

    node_id: str = ""
    epoch: int = 0
    origin_index: int = -1   # this origin's data shard among ``num_origins`` (-1: not an origin yet)
    num_origins: int = 0

    def set_origin(self, origin_index: int, num_origins: int) -> None:
        self.origin_index, self.num_origins = origin_index, num_origins
