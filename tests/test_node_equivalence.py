"""The distributed pipeline computes what the single-process reference computes.

One origin and three stage nodes as separate processes on loopback (plus a
coordinator process), same seed and data order as node/train/reference.py, one
microbatch per iteration, fp32 activation codec: the origin's losses equal the
reference trainer's losses step by step. Stage 2 runs with ``--no-wire``, so hops
to and from it go by gRPC (the chunked Forward/Backward fallback) while the others use the activation wire:
both transports carry the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from node_procs import LocalRun

from lowband.node.train.data import load_run_corpus
from lowband.node.train.model import Transformer, lm_loss, model_config_for
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
from lowband.node.train.reference import reference_batches
from lowband.protocols.config import RunConfig, apply_overrides

STEPS = 6
OVERRIDES = [
    "model.stages=4", "model.seq_len=32",
    "train.microbatch_size=4", "train.microbatches=1", f"train.steps={STEPS}",
    "train.activation_codec=fp32", "train.warmup_steps=2", "train.eval_every=100", "train.eval_batches=1",
    # Clipping is per stage in the pipeline (each node clips its own gradient; a global norm would cost
    # an extra exchange per step) but global in the reference, so compare without clipping.
    "train.grad_clip=0",
    "train.hop_timeout_s=10", "membership.heartbeat_interval_s=0.5", "membership.lease_s=6",
]


def reference_losses(config: RunConfig, steps: int) -> list[float]:
    torch.manual_seed(0)
    corpus = load_run_corpus(config)
    batches = reference_batches(config, corpus)
    model = Transformer(model_config_for(config.model), seed=config.seed)
    opt = build_inner_optimizer(model.parameters(), config.train)
    out = []
    for step, (x, y) in zip(range(steps), batches, strict=False):
        set_lr(opt, lr_at(step, config.train))
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_pipeline_of_processes_matches_reference(local_run: Callable[..., LocalRun]) -> None:
    config = apply_overrides(RunConfig(), OVERRIDES)
    expected = reference_losses(config, STEPS)
    run = local_run(OVERRIDES)
    for stage in range(4):
        run.start_node(f"stage{stage}", preferred_stage=stage, extra=["--no-wire"] if stage == 2 else None)
    codes = run.wait_nodes(timeout_s=150)
    assert codes == [0, 0, 0, 0], run.tail()
    iterations = run.records(0, "iteration")
    losses = [r["loss"] for r in iterations]
    assert len(losses) == STEPS, run.tail()
    assert all(r["abandoned"] == 0 for r in iterations)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # Same ops on the same fp32 numbers, cut at stage boundaries: equal up to float rounding.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # every stage took every step
    for i in range(1, 4):
        steps = run.records(i, "step")
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), run.tail()
