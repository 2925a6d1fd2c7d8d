"""The model a simulated run yields: ``model.pt`` assembled from its nodes' state directories, and a sample.

Every node of a ``lowband-sim run`` keeps its stage's θ_global in a state directory of its own
(``lowband-node --state-dir``, written after each outer sync and at its clean exit). When the run is
over, every node is gone, so the model comes from those files rather than from live replicas: per
stage, the most advanced state (most outer steps, then the latest inner step). Stages whose outer
steps disagree are named, as ``lowband-coordinator export`` does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from lowband.node.recovery.local_state import STATE_FILE, StageState, StateFileError, read_state
from lowband.node.train.export import ExportError, load_model
from lowband.node.train.model import model_config_for
from lowband.protocols.config import RunConfig
from lowband.protocols.model_file import (
    MODEL_FILE,
    ModelFileError,
    behind_stages,
    describe_lags,
    stage_state,
    write_model_file,
)
from lowband.protocols.tokenizer import run_tokenizer
from lowband.protocols.vocab import resolve_vocab
from lowband.sim.generate import generate_text

log = logging.getLogger(__name__)

STATE_ROOT = "state"          # <run folder>/state/<node name>/stage-state.pt
COORDINATOR_DIR = "coordinator"   # the coordinator's run directory: its SQLite state and a BPE run's tokenizer
SAMPLE_PROMPT = "def "
SAMPLE_TOKENS = 200


def node_state_dir(out_dir: Path, node_name: str) -> Path:
    return out_dir / STATE_ROOT / node_name


def latest_states(out_dir: Path, config: RunConfig) -> dict[int, StageState]:
    """Per stage, the most advanced state any node of this run left (unreadable files are skipped)."""
    best: dict[int, StageState] = {}
    for path in sorted((out_dir / STATE_ROOT).glob(f"*/{STATE_FILE}")):
        try:
            state = read_state(path.parent)
        except StateFileError as exc:
            log.warning("skipping %s", exc)
            continue
        if state.run_id != config.run_id or state.num_stages != config.model.stages:
            log.warning("skipping %s: another run's or model's stage", path)
            continue
        rank = (sum(state.outer_steps.values()), state.inner_step)
        held = best.get(state.stage)
        if held is None or rank > (sum(held.outer_steps.values()), held.inner_step):
            best[state.stage] = state
    return best


def write_run_model(out_dir: Path, config: RunConfig) -> tuple[Path | None, dict[str, Any]]:
    """Write ``out_dir/model.pt`` from the nodes' states; (its path or None, what the summary records)."""
    # the tokenizer the coordinator trained and shared (a BPE run's), and the model it resolved for the nodes
    tokenizer = run_tokenizer(config, out_dir / COORDINATOR_DIR)
    config = resolve_vocab(config, tokenizer)
    states = latest_states(out_dir, config)
    missing = [s for s in range(config.model.stages) if s not in states]
    if missing:
        log.warning("no model.pt: no node left a state of stage(s) %s (no outer sync completed?)", missing)
        return None, {"model_file": None, "model_missing_stages": missing}
    outer_steps = {s: st.outer_steps for s, st in states.items()}
    behind = describe_lags(behind_stages(outer_steps))
    for line in behind:
        log.warning("model.pt: %s", line)
    meta = {
        "source": "lowband-sim run", "run_id": config.run_id, "seed": config.seed,
        "outer_steps": {str(s): {str(p): v for p, v in steps.items()} for s, steps in outer_steps.items()},
        "inner_step": {str(s): st.inner_step for s, st in states.items()}, "behind": behind,
    }
    try:
        path = write_model_file(out_dir / MODEL_FILE,
                                {s: stage_state(st.theta_global, st.buffers) for s, st in states.items()},
                                model_config=dataclasses.asdict(model_config_for(config.model)),
                                model_section=dataclasses.asdict(config.model), meta=meta, tokenizer=tokenizer)
    except (ModelFileError, OSError) as exc:
        log.warning("cannot write %s: %s", out_dir / MODEL_FILE, exc)
        return None, {"model_file": None}
    return path, {"model_file": str(path), "model_outer_steps": meta["outer_steps"], "model_behind": behind}


def run_sample(path: Path, *, prompt: str = SAMPLE_PROMPT, tokens: int = SAMPLE_TOKENS) -> dict[str, Any]:
    """A sample the run's model writes after ``prompt`` (seeded, top-k 40, temperature 0.8)."""
    try:
        model = load_model(path)
        text = generate_text(model, prompt, tokens=tokens, temperature=0.8, top_k=40, seed=0)
    except (ExportError, ValueError) as exc:
        log.warning("no sample from %s: %s", path, exc)
        return {}
    return {"sample_prompt": prompt, "sample": text}
