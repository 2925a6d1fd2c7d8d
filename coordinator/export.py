"""`lowband-coordinator export`: assemble the model a live run holds into one file.

The coordinator names the live replicas of every stage (its Status reply, which also carries the
run config); each stage's θ_global (the averaged weights every replica agrees on, not one
replica's local drift), its outer steps per fragment and its persistent buffers come straight from
one replica over the nodes' GetState, so tensors never pass through the coordinator process. Stages
are fetched one after another while the run trains, so a stage may land one outer round apart from
another: the export then fetches the laggards again, from their most advanced replica, and says
which stage is behind if it still is.

This module imports torch (through ``protocols.state_client`` and ``protocols.model_file``); only
the ``export`` subcommand loads it, so ``serve`` and ``status`` stay torch-free.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols import node_pb2_grpc
from lowband.protocols.config import ConfigError, RunConfig
from lowband.protocols.errors import ValidationError
from lowband.protocols.model_file import (
    ModelFileError,
    behind_stages,
    describe_lags,
    stage_state,
    write_model_file,
)
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.state_client import fetch_state
from lowband.protocols.tls import COORDINATOR_NAME, open_channel
from lowband.protocols.tokenizer import BpeTokenizer, TokenizerError

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0       # one Status call; a healthy coordinator answers in milliseconds
STAGE_TIMEOUT_S = 120.0      # one stage's θ_global, outer state and buffers (a large stage takes a while)
CATCH_UP_TRIES = 3           # refetches of stages that landed an outer round behind the others
CATCH_UP_WAIT_S = 1.0        # between them: the laggard's round is usually merging right now
REQUESTER_ID = "export"


class ExportFailed(RuntimeError):
    """The model could not be exported; the message says why in terms a user can act on."""


@dataclass(slots=True)
class StageCopy:
    """One stage as a replica held it: the file's state dict and where it came from."""

    stage: int
    node_id: str
    state: dict[str, torch.Tensor]
    theta_global: dict[str, torch.Tensor]
    outer_steps: dict[int, int]
    inner_step: int


@dataclass(slots=True)
class ExportResult:
    path: Path
    num_stages: int
    outer_steps: dict[int, dict[int, int]]
    sources: dict[int, str]
    behind: list[str] = field(default_factory=list)


def _outer_steps(outer: dict[str, torch.Tensor]) -> dict[int, int]:
    """The per-fragment outer steps GetState sends as the "outer"/"steps" float tensor."""
    steps = outer.get("steps")
    if steps is None or steps.dim() != 1:
        raise ValidationError("the replica sent no per-fragment outer steps")
    return {p: int(v) for p, v in enumerate(steps.tolist())}


async def fetch_stage(address: str, stage: int, node_id: str, metadata: Any,
                      timeout_s: float = STAGE_TIMEOUT_S) -> StageCopy:
    """θ_global, outer steps and buffers of ``stage`` from the node at ``address``."""
    async with open_channel(address, grpc_options()) as channel:   # the process's TLS (set_process_tls), if any
        snapshot = await fetch_state(node_pb2_grpc.NodeStub(channel), stage, ["global", "outer", "buffers"],
                                     REQUESTER_ID, metadata=metadata, timeout_s=timeout_s)
    theta = snapshot.parts.get("global")
    if not theta:
        raise ValidationError(f"node {node_id} sent no θ_global for stage {stage}")
    return StageCopy(stage=stage, node_id=node_id, theta_global=theta,
                     state=stage_state(theta, snapshot.parts.get("buffers", {})),
                     outer_steps=_outer_steps(snapshot.parts.get("outer", {})), inner_step=snapshot.inner_step)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return str(exc) or type(exc).__name__


async def _status(coordinator: str, metadata: Any) -> pb.StatusReply:
    async with open_channel(coordinator, grpc_options(), server_name=COORDINATOR_NAME) as channel:
        try:
            return await pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(max_events=0, tokenizer=True), metadata=metadata,
                                                                 timeout=STATUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ExportFailed(f"coordinator at {coordinator} rejected the run token (wrong token?)") from None
            raise ExportFailed(f"coordinator at {coordinator} is unreachable ({_describe(exc)})") from None


def _replicas(status: pb.StatusReply, num_stages: int) -> dict[int, list[pb.NodeStatus]]:
    """Live nodes per stage; a stage with none cannot be exported (its weights are on no machine now)."""
    replicas: dict[int, list[pb.NodeStatus]] = {s: [] for s in range(num_stages)}
    for node in status.nodes:
        if node.state == "alive" and node.stage in replicas and node.address:
            replicas[node.stage].append(node)
    empty = [s for s, nodes in replicas.items() if not nodes]
    if empty:
        raise ExportFailed(f"no live replica holds stage {empty[0]} (stages without one: {empty}); "
                           "export while the run trains, or once a replacement has recovered it")
    return replicas


async def _fetch_from_any(stage: int, nodes: Sequence[pb.NodeStatus], metadata: Any) -> StageCopy:
    """The stage from its first replica that answers; every failure is named if none does."""
    errors = []
    for node in nodes:
        try:
            return await fetch_stage(node.address, stage, node.node_id, metadata)
        except (grpc.aio.AioRpcError, ValidationError, ValueError) as exc:
            log.warning("stage %d from %s (%s) failed: %s", stage, node.node_id, node.address, _describe(exc))
            errors.append(f"{node.node_id} at {node.address}: {_describe(exc)}")
    raise ExportFailed(f"no replica of stage {stage} gave its state: " + "; ".join(errors))


async def _fetch_most_advanced(stage: int, nodes: Sequence[pb.NodeStatus], metadata: Any) -> StageCopy:
    """The stage from whichever replica holds the most outer steps (a replica that follows its group
    as a standby, or missed a round, can be a round behind the others)."""
    copies = []
    for node in nodes:
        try:
            copies.append(await fetch_stage(node.address, stage, node.node_id, metadata))
        except (grpc.aio.AioRpcError, ValidationError, ValueError) as exc:
            log.warning("stage %d from %s (%s) failed: %s", stage, node.node_id, node.address, _describe(exc))
    if not copies:
        return await _fetch_from_any(stage, nodes, metadata)   # names every failure
    return max(copies, key=lambda c: (sum(c.outer_steps.values()), c.inner_step))


async def export_live(coordinator: str, token: str, out: str | Path) -> ExportResult:
    """Fetch every stage from a live replica, check their outer steps agree, and write the model file."""
    metadata = token_metadata(token)
    status = await _status(coordinator, metadata)
    try:
        run = RunConfig.from_dict(json.loads(status.run_config_json or "{}"))
    except (ConfigError, ValueError) as exc:
        raise ExportFailed(f"the coordinator's run config cannot be read: {exc}") from None
    tokenizer = None
    if run.train.tokenizer == "bpe":   # the run's, so the file decodes text as the run encoded it
        try:
            tokenizer = BpeTokenizer.from_json(status.tokenizer_json)
        except TokenizerError as exc:
            raise ExportFailed(f"the coordinator's tokenizer cannot be read: {exc}") from None
    num_stages = run.model.stages
    replicas = _replicas(status, num_stages)
    copies = {s: await _fetch_from_any(s, replicas[s], metadata) for s in range(num_stages)}
    behind: list[str] = []
    for _ in range(CATCH_UP_TRIES):
        lags = behind_stages({s: c.outer_steps for s, c in copies.items()})
        behind = describe_lags(lags)
        if not lags:
            break
        lagging = sorted({lag[0] for lag in lags})
        log.info("refetching stages %s: %s", lagging, "; ".join(behind))
        await asyncio.sleep(CATCH_UP_WAIT_S)
        for s in lagging:
            copies[s] = await _fetch_most_advanced(s, replicas[s], metadata)
        behind = describe_lags(behind_stages({s: c.outer_steps for s, c in copies.items()}))
    outer_steps = {s: c.outer_steps for s, c in copies.items()}
    meta = {
        "source": "coordinator-export",
        "coordinator": coordinator,
        "run_id": run.run_id,
        "seed": run.seed,
        "outer_steps": {str(s): {str(p): v for p, v in steps.items()} for s, steps in outer_steps.items()},
        "inner_step": {str(s): c.inner_step for s, c in copies.items()},
        "sources": {str(s): c.node_id for s, c in copies.items()},
        "behind": behind,
    }
    try:
        path = write_model_file(out, {s: c.state for s, c in copies.items()}, model_section=asdict(run.model),
                                meta=meta, tokenizer=tokenizer)
    except (ModelFileError, OSError) as exc:
        raise ExportFailed(f"cannot write {out}: {exc}") from None
    return ExportResult(path=path, num_stages=num_stages, outer_steps=outer_steps,
                        sources={s: c.node_id for s, c in copies.items()}, behind=behind)
