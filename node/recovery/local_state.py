"""Durable local state (``lowband-node --state-dir DIR``): this node's stage as of its last outer sync.

After every outer sync the node writes its stage's θ_global, outer optimizer state (momentum, the
sparse codec's error feedback, the per-fragment outer steps: ``OuterSync.state_at``'s parts), its
local weights (what it trained since the merge: resuming them resumes the exact model it had), its
persistent buffers and the step they belong to into ``DIR/stage-state.pt``. Not a checkpoint of the
whole model: one stage, the part a replica already serves to newcomers over GetState. The write
happens on a worker thread of its own (never the training thread), to a temporary file that is
renamed into place, so a crash mid-write leaves the previous state whole. Losing every machine then
costs at most one outer round. ``read_state`` refuses a file that is truncated, corrupt or from
another run/model with a message that says which.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.stored_stage import stage_fingerprint

if TYPE_CHECKING:   # stage_assembly resumes stages from here: the type only, no import cycle
    from lowband.node.stage_assembly import CurrentStage

log = logging.getLogger(__name__)

FORMAT = "lowband-stage-state"
VERSION = 1
STATE_FILE = "stage-state.pt"
POLL_S = 0.5          # how often the keeper looks for a new outer step (a round takes seconds at least)


class StateFileError(ValueError):
    """A state file is missing, truncated, corrupt, or holds another run's or model's stage."""


@dataclass(slots=True)
class StageState:
    """One stage as this node held it after an outer sync."""

    run_id: str
    stage: int
    num_stages: int
    model: dict[str, Any]                            # the run's [model] section
    inner_step: int
    outer_steps: dict[int, int]                      # per fragment
    parts: dict[str, dict[str, torch.Tensor]]        # GetState layout: "global", "outer", "local"
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    written_at: float = 0.0

    @property
    def theta_global(self) -> dict[str, torch.Tensor]:
        return self.parts.get("global", {})


def state_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FILE


def write_state(state_dir: str | Path, state: StageState) -> Path:
    """Write ``state`` atomically (temporary file, fsync, rename); blocking, so call it off the loop."""
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "run_id": state.run_id, "stage": state.stage,
        "num_stages": state.num_stages, "model": dict(state.model), "inner_step": state.inner_step,
        "outer_steps": dict(state.outer_steps), "parts": state.parts, "buffers": state.buffers,
        "written_at": time.time(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _int_map(data: Any, what: str, path: Path) -> dict[int, int]:
    if not isinstance(data, Mapping) or not all(isinstance(k, int) and isinstance(v, int) for k, v in data.items()):
        raise StateFileError(f"{path}: {what} must map integers to integers")
    return dict(data)


def _tensor_map(data: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in data.items()):
        raise StateFileError(f"{path}: {what} must map names to tensors")
    for name, tensor in data.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StateFileError(f"{path}: {what} {name} holds non-finite values")
    return dict(data)


def read_state(state_dir: str | Path) -> StageState:
    """The stage state in ``state_dir``; ``StateFileError`` says what is wrong with it."""
    path = state_path(state_dir)
    if not path.exists():
        raise StateFileError(f"no stage state in {path.parent} (no {STATE_FILE})")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"PK\x03\x04":   # torch.save writes a zip archive; anything else was cut short or overwritten
        raise StateFileError(f"{path} cannot be read (truncated or corrupt?): not a torch.save archive")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise StateFileError(f"{path} holds objects other than tensors and plain data; refused") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateFileError(f"{path} cannot be read (truncated or corrupt?): {reason}") from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise StateFileError(f"{path} is not a lowband stage state file")
    if payload.get("version") != VERSION:
        raise StateFileError(f"{path}: unsupported state version {payload.get('version')!r} (this build reads {VERSION})")
    try:
        stage, num_stages, inner_step = int(payload["stage"]), int(payload["num_stages"]), int(payload["inner_step"])
        run_id, model = str(payload["run_id"]), dict(payload["model"])
        raw_parts = payload["parts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{path}: a field is missing or malformed ({exc})") from None
    if not 0 <= stage < num_stages or inner_step < 0:
        raise StateFileError(f"{path}: stage {stage} of {num_stages} at step {inner_step} is out of range")
    if not isinstance(raw_parts, Mapping) or not raw_parts.get("global"):
        raise StateFileError(f"{path}: holds no θ_global")
    parts = {str(k): _tensor_map(v, f"part {k!r}", path) for k, v in raw_parts.items()}
    return StageState(run_id=run_id, stage=stage, num_stages=num_stages, model=model, inner_step=inner_step,
                      outer_steps=_int_map(payload.get("outer_steps", {}), "outer_steps", path), parts=parts,
                      buffers=_tensor_map(payload.get("buffers", {}), "buffers", path),
                      written_at=float(payload.get("written_at", 0.0)))


def describe_stored(state_dir: str | Path) -> pb.StoredStage | None:
    """What a state directory holds, as a join tells the coordinator (None: nothing usable): the stage, its
    outer and inner step and the fingerprint of the run and model it belongs to, which the coordinator
    checks against its own before it plans ``local-state``."""
    if not state_path(state_dir).exists():
        return None
    try:
        state = read_state(state_dir)
    except StateFileError as exc:
        log.error("refusing the stored stage state: %s; joining without a stage preference", exc)
        return None
    return pb.StoredStage(stage=state.stage, outer_step=sum(state.outer_steps.values()), inner_step=state.inner_step,
                          fingerprint=stage_fingerprint(state.run_id, state.num_stages, state.model))


def resumable_state(state_dir: str | Path, *, stage: int, run_id: str, num_stages: int,
                    model: Mapping[str, Any]) -> StageState | None:
    """This run's stored state of ``stage``, or None; a file that cannot be used is named and refused,
    and the node then obtains the stage as the coordinator's plan says (a replica copy, a rebuild)."""
    if not state_path(state_dir).exists():
        return None
    try:
        state = read_state(state_dir)
    except StateFileError as exc:
        log.error("refusing the stored stage state: %s; obtaining the stage as planned instead", exc)
        return None
    if state.run_id != run_id or state.num_stages != num_stages or state.model != dict(model):
        log.error("refusing the stored stage state in %s: it is another run's or model's (run %r, %d stages, "
                  "model %s); obtaining the stage as planned instead", state_dir, state.run_id, state.num_stages,
                  state.model)
        return None
    if state.stage != stage:
        log.info("the stored state in %s is of stage %d, not %d: not used", state_dir, state.stage, stage)
        return None
    return state


class StateKeeper:
    """Writes the stage's state to ``state_dir`` after each outer sync (and once more at shutdown).

    It watches the DiLoCo outer steps from the event loop; a change means a round merged, so it
    takes a consistent copy between two inner steps (``OuterSync.state_at`` on the worker thread, a
    clone) and writes it on a thread of its own while training goes on.
    """

    def __init__(self, state_dir: str | Path, current: CurrentStage, *, run_id: str, num_stages: int,
                 model: Mapping[str, Any]) -> None:
        self.state_dir = Path(state_dir)
        self.current = current
        self.run_id = run_id
        self.num_stages = num_stages
        self.model = dict(model)
        self.written: tuple[int, int, int] | None = None   # (stage, total outer steps, inner step) last written
        self.writes = 0
        self._lock = asyncio.Lock()

    def _pending(self) -> bool:
        agent, outer = self.current.agent, self.current.outer
        if agent is None or outer is None:
            return False
        total = outer.total_outer_steps()
        return total > 0 and (self.written is None or self.written[:2] != (agent.stage, total))

    async def save(self) -> Path | None:
        """Write the current stage's state if an outer step merged since the last write."""
        async with self._lock:
            agent, outer = self.current.agent, self.current.outer
            if agent is None or outer is None or not self._pending():
                return None
            module = agent.runtime.module

            def snapshot() -> tuple[dict[str, dict[str, torch.Tensor]], int, dict[str, torch.Tensor]]:
                # on the worker thread, between two inner steps: θ_global, outer state and the local
                # weights all belong to the same step
                parts, step = outer.state_at()
                return parts, step, {n: t.detach().cpu().clone() for n, t in module.state_dict().items()}

            parts, step, local = await agent.runtime.run(snapshot, slow=False)
            params = {name for name, _ in module.named_parameters()}
            buffers = {n: t for n, t in local.items() if n not in params}
            parts = {**parts, "local": local}
            steps = parts.get("outer", {}).get("steps")
            outer_steps = {p: int(v) for p, v in enumerate(steps.tolist())} if steps is not None else {}
            state = StageState(run_id=self.run_id, stage=agent.stage, num_stages=self.num_stages, model=self.model,
                               inner_step=int(step), outer_steps=outer_steps, parts=parts, buffers=buffers)
            try:
                path = await asyncio.to_thread(write_state, self.state_dir, state)
            except OSError as exc:   # a full disk costs durability, never the training run
                log.warning("cannot write the stage state to %s: %s", self.state_dir, exc)
                return None
            self.written = (agent.stage, sum(outer_steps.values()), int(step))
            self.writes += 1
            log.debug("stage %d state at step %d (outer %s) written to %s", agent.stage, step, outer_steps, path)
            return path

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: save after every outer sync."""
        while not stop.is_set():
            if self._pending():
                await self.save()
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                pass
