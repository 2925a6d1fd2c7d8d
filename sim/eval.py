"""`lowband-sim eval`: perplexity of a trained model with all its stages and with a subset.

Reads an exported model (``lowband.node.train.export``: ``sim.skiptrain --export``) or a
``lowband-sim baseline`` run folder / ``model.pt``, and evaluates it on the
held-out split of the data (``lowband.node.train.data``; the default corpus unless
``--data``) along the full path and along subsets of the block stages, each
run in ascending order. With no ``--stages``, or with ``--half``, it reports
the model run on half of its block stages (``lowband.node.train.evaluate``: ``strided`` by
default, or ``--half-method search``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch

from lowband.node.train.data import DataError, bytes_per_token, load_corpus, val_batches
from lowband.node.train.evaluate import HALF_METHODS, evaluate_subsets
from lowband.node.train.export import ExportError, load_model
from lowband.protocols.vocab import bits_per_byte

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a trained model with all stages and with a subset",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model file, or a baseline run folder")
    p.add_argument("--stages", help="block stages to keep, comma separated (e.g. 1,3); run in ascending order")
    p.add_argument("--half", action="store_true", help="also report half of the block stages "
                                                      "(the default when --stages is not given)")
    p.add_argument("--half-method", choices=HALF_METHODS, default="strided",
                   help="which half: strided (evenly spaced, ends kept) or search (best on selection batches)")
    p.add_argument("--data", help="evaluation data (default: the Python standard library's source); "
                                  "its held-out split is used")
    p.add_argument("--max-bytes", type=int, default=8 << 20, help="cap on tokens loaded from the data")
    p.add_argument("--seed", type=int, help="data seed (default: the model's training seed, else 0)")
    p.add_argument("--batches", type=int, default=8, help="evaluation batches (default: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--num-stages", type=int, help="stage count for a baseline's whole-model file "
                                                  "(default: the run's model.stages)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=main)


def parse_stage_list(text: str, block_stages: list[int]) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``; refuses non-integers, unknown stages, stage 0, repeats and empty lists."""
    parts = [t.strip() for t in text.split(",")]
    if not parts or any(not t for t in parts):
        raise ValueError(f"--stages {text!r}: give block stages separated by commas, e.g. 1,3")
    try:
        stages = [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--stages {text!r}: stage ids must be integers, e.g. 1,3") from None
    if 0 in stages:
        raise ValueError(f"--stages {text!r}: stage 0 (embedding and head) is always used; "
                         f"choose among the block stages {block_stages}")
    unknown = [s for s in stages if s not in block_stages]
    if unknown:
        raise ValueError(f"--stages {text!r}: stage {unknown[0]} does not exist; "
                         f"this model's block stages are {block_stages}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"--stages {text!r}: a stage is listed twice")
    return sorted(stages)


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, and return the report (raises ExportError, DataError or ValueError)."""
    model = load_model(args.model, num_stages=args.num_stages)
    block_stages = list(range(1, model.num_stages))
    subset = parse_stage_list(args.stages, block_stages) if args.stages is not None else None
    if args.batches < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise ValueError("--batches and --batch-size must be >= 1 and --seq-len >= 2")
    if args.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    seed = args.seed if args.seed is not None else int(model.meta.get("seed") or 0)
    corpus = load_corpus(args.data or None, seed=seed, max_bytes=args.max_bytes, vocab_size=model.config.vocab_size,
                         tokenizer=model.tokenizer)   # a BPE model's text is encoded with its own merges
    batches = val_batches(corpus, args.batch_size, args.seq_len, args.batches)
    per_token = bytes_per_token(corpus, batches)

    rows: list[dict[str, Any]] = []
    full: dict[str, Any] | None = None
    wanted: list[tuple[str, list[int] | None]] = []
    if subset is not None:
        wanted.append(("given", subset))
    if subset is None or args.half:
        wanted.append(("half", None))
    for name, keep in wanted:
        if keep is None and args.half_method == "search":
            report = evaluate_subsets(model.stages, corpus, half="search", batch_size=args.batch_size,
                                      seq_len=args.seq_len, batches=args.batches, seed=seed)
        else:
            report = evaluate_subsets(model.stages, batches, subset=keep, half="strided")
        if full is None:
            full = report["full"]
            rows.append({"name": "all", "stages": block_stages, **full, "ratio": 1.0,
                         "bits_per_byte": bits_per_byte(full["loss"], per_token)})
        part = report["subset"]
        label = "subset" if name == "given" else f"half ({part['method']})"
        rows.append({"name": label, "stages": part["stages"], "path": part["path"], "loss": part["loss"],
                     "perplexity": part["perplexity"], "ratio": report["perplexity_ratio"],
                     "bits_per_byte": bits_per_byte(part["loss"], per_token)})
    return {
        "model": model.path,
        "num_stages": model.num_stages,
        "data": corpus.source,
        "seed": seed,
        "tokens_evaluated": args.batches * args.batch_size * args.seq_len,
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['num_stages']} stages), data {report['data']}, "
             f"{report['tokens_evaluated']:,} held-out tokens",
             f"{'run':<16} {'block stages':<20} {'loss':>8} {'perplexity':>11} {'vs all':>8}"]
    for row in report["results"]:
        stages = ",".join(map(str, row["stages"]))
        lines.append(f"{row['name']:<16} {stages:<20} {row['loss']:>8.4f} {row['perplexity']:>11.3f} "
                     f"{row['ratio']:>7.3f}x")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate_model(args)
    except (ExportError, DataError, ValueError) as exc:
        print(f"lowband-sim eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_table(report))
    return 0
