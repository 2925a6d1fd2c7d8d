"""`lowband-sim baseline`: train the whole model in one process, the reference every run is compared with.

Writes ``metrics.jsonl`` (one JSON record per step) and ``summary.json``
(initial/final validation loss, tokens, wall time) into ``--out``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from lowband.node.train.data import DataError
from lowband.node.train.reference import train_reference
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("baseline", help="train the whole model in one process (the reference)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run TOML ([model], [train], ...); flags below override it")
    p.add_argument("--preset", help="model preset: tiny, small, 124m, 500m, 1.5b (default: tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: train.steps = 300)")
    p.add_argument("--seed", type=int, help="run seed: weights, data order (default: 0)")
    p.add_argument("--data", help="text file, directory, .bin (uint16), .u8.bin (uint8) or .npy of token ids "
                                  "(default: the Python standard library's source)")
    p.add_argument("--out", default="runs/baseline", help="output folder (default: runs/baseline)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: 16 = 2 microbatches x 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: train.lr)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice; 1 is fastest on a shared CPU)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set train.warmup_steps=50")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def build_config(args: argparse.Namespace) -> RunConfig:
    """TOML file -> flags -> validated RunConfig (one path, as everywhere else)."""
    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    overrides = list(args.set)
    flag_settings = {
        "model.preset": args.preset, "train.steps": args.steps, "seed": args.seed, "train.data": args.data,
        "model.seq_len": args.seq_len, "train.lr": args.lr,
    }
    overrides += [f"{key}={value}" for key, value in flag_settings.items() if value is not None]
    if args.batch_size is not None:
        # One microbatch per step of the whole batch: the single-process reference has no pipeline.
        overrides += ["train.microbatches=1", f"train.microbatch_size={args.batch_size}"]
    return apply_overrides(config, overrides)


def main(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"lowband-sim baseline: bad config: {exc}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt   # same clean stop as Ctrl-C: evaluate, write the summary

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = train_reference(config, Path(args.out), device=args.device, progress=not args.no_progress)
    except (DataError, ValueError) as exc:
        print(f"lowband-sim baseline: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = Path(args.out)
    print(f"summary: {out / 'summary.json'}")
    print(f"metrics: {out / 'metrics.jsonl'}")
    print(
        f"{summary['preset']} ({summary['params']:,} params) on {summary['device']}: "
        f"{summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f} s "
        f"({summary['tokens_per_s']:,.0f} tok/s); val loss {summary['initial_val_loss']:.3f} -> "
        f"{summary['final_val_loss']:.3f} nats"
    )
    return 130 if summary["interrupted"] else 0
