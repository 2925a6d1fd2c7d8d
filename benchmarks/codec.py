"""Codec throughput, size and error on a pseudo-gradient-shaped tensor, against hivemind's codecs.

    python benchmarks/codec.py --json

Tensor: 4M float32 values, N(0, 1e-3^2) with 0.01% outliers 50x larger (the heavy
tail DiLoCo pseudo-gradients show). One CPU thread. For each codec:
mb_per_s = fp32 input MB / (encode + decode seconds), best of `--repeats`;
ratio = encoded bytes (scales and framing included) / fp32 bytes;
rel_error = ||decoded - x|| / ||x||. Our codecs run with their defaults
(block 256, zstd when it shrinks the payload). hivemind 1.1.12's codecs run through
their own compress/extract and are sized by their serialized protobuf.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lowband.protocols.codec import decode, encode, relative_error, wire_bytes

OUR_CODECS = ("bf16", "int8", "int4", "fp8", "fp4")


def pseudo_gradient(numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 1e-3
    outliers = torch.randint(0, numel, (max(1, numel // 10_000),), generator=g)
    x[outliers] *= 50.0
    return x


def measure(x: torch.Tensor, roundtrip: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
            repeats: int) -> dict[str, float]:
    best = float("inf")
    y, nbytes = roundtrip(x)  # warm-up (allocator, lazy imports)
    for _ in range(repeats):
        t0 = time.perf_counter()
        y, nbytes = roundtrip(x)
        best = min(best, time.perf_counter() - t0)
    input_mb = x.numel() * 4 / 1e6
    return {
        "mb_per_s": round(input_mb / best, 1),
        "ratio": round(nbytes / (x.numel() * 4), 4),
        "rel_error": float(f"{relative_error(x, y):.5g}"),
        "seconds": round(best, 4),
    }


def ours(name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    def roundtrip(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        msg = encode(x, name)
        return decode(msg), wire_bytes(msg)

    return roundtrip


def hivemind_codecs() -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]]:
    from hivemind.compression import (
        CompressionInfo,
        Float16Compression,
        Quantile8BitQuantization,
        Uniform8BitQuantization,
    )

    def wrap(codec: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
        def roundtrip(x: torch.Tensor) -> tuple[torch.Tensor, int]:
            msg = codec.compress(x, CompressionInfo.from_tensor(x))
            return codec.extract(msg), msg.ByteSize()

        return roundtrip

    return {
        "hivemind_float16": wrap(Float16Compression()),
        "hivemind_uniform8bit": wrap(Uniform8BitQuantization()),
        "hivemind_quantile8bit": wrap(Quantile8BitQuantization()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-hivemind", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")  # inside hivemind's Uniform8Bit
    x = pseudo_gradient(args.numel)
    codecs: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]] = {n: ours(n) for n in OUR_CODECS}
    if not args.no_hivemind:
        codecs.update(hivemind_codecs())
    results = {name: measure(x, fn, args.repeats) for name, fn in codecs.items()}
    report = {
        "tensor_numel": args.numel,
        "codecs": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "processor": platform.processor() or platform.machine()},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'codec':24s} {'MB/s':>9s} {'ratio':>7s} {'rel_err':>9s}")
        for name, r in results.items():
            print(f"{name:24s} {r['mb_per_s']:9.1f} {r['ratio']:7.4f} {r['rel_error']:9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
