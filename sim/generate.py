"""`lowband-sim generate`: sample text from a model file (``lowband-coordinator export``, ``lowband-sim run``).

    lowband-sim generate --model model.pt --prompt "def main(" [--tokens 200] [--temperature 0.8] [--top-k 40]

The prompt is encoded with the run's tokenizer (UTF-8 bytes, or the BPE the model file carries);
the sample is printed after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from lowband.node.train.export import ExportedModel, ExportError, load_model
from lowband.node.train.generate import BYTE_VOCAB, check_sampling, decode_bytes, encode_bytes, sample

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from an exported model",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model file (or a run folder holding model.pt)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0: all (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=main)


def generate_text(model: ExportedModel, prompt: str, *, tokens: int, temperature: float, top_k: int,
                  seed: int = 0) -> str:
    """The sample (without the prompt) the model continues ``prompt`` with, in its own tokenizer."""
    tokenizer = model.tokenizer
    if tokenizer is None and model.config.vocab_size != BYTE_VOCAB:
        raise ValueError(f"this model has a {model.config.vocab_size}-token vocabulary and carries no tokenizer "
                         f"(a token file's run): generate reads byte-level ({BYTE_VOCAB} tokens) and BPE models")
    encoded = tokenizer.encode(prompt) if tokenizer is not None else encode_bytes(prompt)
    ids = sample(model.stages, encoded, tokens=tokens, max_seq_len=model.config.max_seq_len,
                 temperature=temperature, top_k=top_k, seed=seed)
    return tokenizer.decode(ids) if tokenizer is not None else decode_bytes(ids)


def main(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        check_sampling(args.temperature, args.top_k, args.tokens)
        if not args.prompt:
            raise ValueError("--prompt is empty: give some text to continue")
        model = load_model(args.model)
        text = generate_text(model, args.prompt, tokens=args.tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed)
    except (ExportError, ValueError) as exc:
        print(f"lowband-sim generate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps({"model": model.path, "prompt": args.prompt, "sample": text}))
    else:
        print(args.prompt + text)
    return 0
