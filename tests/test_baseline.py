"""The single-process reference trainer, its optimizer schedule and the `lowband-sim baseline` CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lowband.node.train.model import ModelConfig, Transformer
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
from lowband.node.train.reference import train_reference
from lowband.protocols.config import RunConfig, TrainSection, apply_overrides
from lowband.sim.cli import main as sim_main

torch.set_num_threads(1)

SMALL_RUN = [
    "train.steps=20", "train.warmup_steps=4", "train.eval_every=10", "train.eval_batches=2",
    "train.microbatch_size=4", "train.microbatches=2", "model.seq_len=32", "train.data_max_bytes=300000",
]


def test_lr_schedule_warmup_then_cosine() -> None:
    train = TrainSection(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, train) == pytest.approx(1e-4)
    assert lr_at(9, train) == pytest.approx(1e-3)
    assert lr_at(10, train) == pytest.approx(1e-3)
    assert lr_at(60, train) == pytest.approx(0.55e-3)
    assert lr_at(110, train) == pytest.approx(1e-4)
    assert lr_at(500, train) == pytest.approx(1e-4)
    lrs = [lr_at(s, train) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert lr_at(0, TrainSection(warmup_steps=0, steps=10, lr=2e-3)) == pytest.approx(2e-3)


def test_inner_optimizer_decays_matrices_only() -> None:
    model = Transformer(ModelConfig.from_preset("tiny"), seed=0)
    train = TrainSection(weight_decay=0.1, beta1=0.8, beta2=0.9)
    opt = build_inner_optimizer(model.parameters(), train, lr_scale=1.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim == 2), name
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    set_lr(opt, 1e-3)
    assert all(g["lr"] == pytest.approx(1.1e-3) for g in opt.param_groups)


def test_reference_training_lowers_loss_and_writes_outputs(tmp_path: Path) -> None:
    config = apply_overrides(RunConfig(), SMALL_RUN)
    summary = train_reference(config, tmp_path, device="cpu", progress=False)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0
    assert math.log(256) - 0.3 < summary["initial_val_loss"] < math.log(256) + 0.5
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 8 * 32
    assert json.loads((tmp_path / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(21))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20]
    assert all({"loss", "tokens", "wall_s", "lr"} <= set(r) for r in records[1:])


def test_reference_is_reproducible_with_a_fixed_seed(tmp_path: Path) -> None:
    overrides = [*SMALL_RUN, "train.steps=4", "train.eval_every=100"]
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        config = apply_overrides(RunConfig(), [*overrides, f"seed={seed}"])
        train_reference(config, tmp_path / name, device="cpu", progress=False)
        runs.append([json.loads(line).get("loss") for line in (tmp_path / name / "metrics.jsonl").open()])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_baseline_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = sim_main(["baseline", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--out", str(out),
                     "--no-progress", "--set", "train.data_max_bytes=100000", "--set", "train.eval_batches=1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 16
    assert summary["config"]["train"]["microbatches"] == 1
    assert "summary.json" in capsys.readouterr().out


def test_baseline_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["baseline", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "model.preset" in capsys.readouterr().err
    assert sim_main(["baseline", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
