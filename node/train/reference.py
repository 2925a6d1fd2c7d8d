"""The single-process reference: the whole model trained in one process.

This is the baseline every distributed run is compared with (same model, same
data order, same inner optimizer and schedule), and the numerical reference for
the distributed runtime.

Exact data order (reproduced by a distributed origin, see ``lowband.node.train.data.origin_batches``):
- corpus: ``load_run_corpus(config)`` = ``load_corpus(train.data or None,
  seed=config.seed, max_bytes=train.data_max_bytes, val_fraction=train.val_fraction)``;
- step t trains on the t-th batch of ``reference_batches(config, corpus)`` =
  ``BatchIterator(corpus.train_shard(0, 1), batch_size=train.microbatches *
  train.microbatch_size, seq_len=model.seq_len, seed=config.seed)``, i.e. origin 0 of 1.
  With ``train.microbatches = 1`` an origin's single microbatch per iteration is
  exactly the reference batch; with more, microbatch j is rows
  ``[j*microbatch_size, (j+1)*microbatch_size)`` and the reference loss is the
  mean over them (equal-sized microbatches, so the mean of means);
- weights: ``Transformer(cfg, seed=config.seed)``, equal to
  ``init_stage(cfg, s, S, seed=config.seed)`` stage by stage;
- learning rate at step t: ``lr_at(t, train)``; gradients clipped to ``train.grad_clip``;
- validation: ``run_val_batches(config, corpus)`` before step 0, every
  ``train.eval_every`` steps, and after the last step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lowband.node.train.data import BatchIterator, Corpus, load_run_corpus, origin_batches, run_val_batches
from lowband.node.train.model import Transformer, lm_loss, model_config_for
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
from lowband.node.train.precision import autocast_context
from lowband.protocols.config import RunConfig
from lowband.protocols.vocab import resolve_vocab

log = logging.getLogger(__name__)


def reference_batches(config: RunConfig, corpus: Corpus) -> BatchIterator:
    """The reference trainer's batches: origin 0 of 1 (see the module docstring)."""
    return origin_batches(config, corpus, 0, 1)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA if available (its current device), else CPU. A device string torch does not know, or
    a device this machine does not have, is a ValueError that says what there is."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())   # one device per node: name it
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported (auto, cpu, cuda, cuda:N)")
    return dev


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """``train.precision``'s autocast (node/train/precision.py): by default bf16 on CUDA with fp32 master
    weights and optimizer, plain fp32 on CPU; the stage runtime uses the same rule."""
    return autocast_context(device, precision)


@torch.no_grad()
def evaluate(
    model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    precision: str = "auto",
) -> float:
    """Mean validation loss (nats per token) over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with autocast_for(device, precision):
            logits = model(inputs.to(device))
        total += lm_loss(logits, targets.to(device)).item()
    model.train(was_training)
    return total / len(batches)


class _MetricsWriter:
    """JSON lines, flushed per record so a crashed or interrupted run keeps its curve."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def train_reference(
    config: RunConfig, out_dir: Path, *, device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Train the whole model in one process; write metrics.jsonl and summary.json; return the summary.

    Ctrl-C stops early but still evaluates and writes the summary (``interrupted: true``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    config = resolve_vocab(config)   # a token file's own vocabulary when model.vocab_size = 0
    train = config.train
    log.info("reference run config: %s", config.to_json())

    corpus = load_run_corpus(config)
    batches = reference_batches(config, corpus)
    val = run_val_batches(config, corpus)
    cfg = model_config_for(config.model)
    model = Transformer(cfg, seed=config.seed).to(dev)
    opt = build_inner_optimizer(model.parameters(), train)
    params = sum(p.numel() for p in model.parameters())
    tokens_per_step = batches.batch_size * batches.seq_len
    log.info("model %s: %d parameters on %s; corpus %s (%d train / %d val tokens)",
             config.model.preset, params, dev, corpus.source, corpus.train.numel(), corpus.val.numel())

    metrics = _MetricsWriter(out_dir / "metrics.jsonl")
    start = time.perf_counter()
    initial_val = evaluate(model, val, dev, train.precision)
    metrics.write({"step": 0, "val_loss": initial_val, "tokens": 0, "wall_s": 0.0, "lr": lr_at(0, train)})

    step, tokens, val_loss, loss_value = 0, 0, initial_val, float("nan")
    interrupted = False
    bar = tqdm(total=train.steps, disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="reference")
    try:
        for step, (inputs, targets) in zip(range(train.steps), _on_device(batches, dev), strict=False):
            lr = lr_at(step, train)
            set_lr(opt, lr)
            with autocast_for(dev, train.precision):
                loss = lm_loss(model(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            tokens += tokens_per_step
            loss_value = loss.item()   # CPU-GPU sync point, once per step, for the log
            wall = time.perf_counter() - start
            record: dict[str, Any] = {"step": step + 1, "loss": loss_value, "tokens": tokens,
                                      "wall_s": round(wall, 4), "lr": lr}
            if (step + 1) % train.eval_every == 0 or step + 1 == train.steps:
                val_loss = evaluate(model, val, dev, train.precision)
                record["val_loss"] = val_loss
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tokens / wall:,.0f}")
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d; evaluating and writing the summary", step)
        val_loss = evaluate(model, val, dev, train.precision)
    finally:
        bar.close()
        metrics.close()

    wall = time.perf_counter() - start
    summary = {
        "preset": config.model.preset,
        "params": params,
        "device": str(dev),
        "steps": tokens // tokens_per_step,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "initial_val_loss": initial_val,
        "final_val_loss": val_loss,
        "final_train_loss": loss_value,
        "interrupted": interrupted,
        "data": corpus.source,
        "config": config.to_dict(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(model.state_dict(), out_dir / "model.pt")
    return summary


def _on_device(
    batches: BatchIterator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for inputs, targets in batches:
        yield inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
