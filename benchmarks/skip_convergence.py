"""Does training with SkipPipe paths (skip ratio k) converge like the full pipeline?

For each seed, two in-process runs of the staged tiny model
(``lowband.sim.skiptrain.train_skip``) on the same tokens: the same number of
iterations over the same batches in the same order (``lowband.node.train.reference`` data
order), the same initial weights, the same schedule and per-stage AdamW. The
only difference is the paths:

* full: ``k = 0`` with the ``full`` planner, every microbatch ``[0, 1, ..., S-1, 0]``;
* skip: ``k = 0.25`` with the ``skippipe`` planner (uniform topology, one node
  per stage), each microbatch visiting ``m = round((1-k)(S-1))`` block stages
  (half rounded up) in ascending order: ``skippipe.max_swaps = 0`` by default
  (``--max-swaps``). This measures *skipping*. Adjacent swaps are a separate
  knob and, at this tiny scale and short training, cost much more than
  skipping (seed 0: gap +9.3% with max_swaps = 2 against -1.6% without);
  ``--with-swaps`` adds that run (``skip_swaps``, ``swaps_gap``).

Both models are validated on the **full path** over the held-out split (the
skip run is never scored along the paths it trained on). Reported:

* ``gap``: the mean over seeds of ``skip_val_loss / full_val_loss - 1``
  (relative excess validation loss of the skip-trained model, in nats per
  token; 0.03 means 3% higher loss); ``gap_per_seed`` lists each.
  One seed is not enough: the per-seed gap of this tiny, short run varies by
  several points (see benchmarks/skip_convergence.md);
* ``full_val_loss``/``skip_val_loss``: means over seeds;
* ``*_half_perplexity_ratio``: perplexity of each model run with half its
  block stages (``lowband.node.train.evaluate``, strided: stages 1, 3, 6 of 6) over its
  full-path perplexity, mean over seeds.

Stage count: the tiny preset has 6 blocks, so S - 1 must divide 6. With
S = 7 (one block per stage), k = 0.25 keeps m = round(4.5) = 5 of 6 stages per
path (actual skip 1/6); with S = 4 (two blocks per stage) m = round(2.25) = 2
of 3 (actual skip 1/3). ``--stages`` picks; the default is S = 7, where paths
skip single blocks and a plan holds more distinct paths.

Run: ``python benchmarks/skip_convergence.py --json`` (8 runs of 300 steps:
about 6-8 CPU minutes with one torch thread; ``--seeds 0`` for a 2-run check).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# `python benchmarks/skip_convergence.py` puts benchmarks/ first on sys.path, where a
# sibling script (benchmarks/coordinator.py) would shadow the coordinator package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from lowband.node.train.data import load_run_corpus, run_val_batches  # noqa: E402
from lowband.node.train.evaluate import evaluate_subsets  # noqa: E402
from lowband.protocols.config import RunConfig, apply_overrides  # noqa: E402
from lowband.sim.skiptrain import train_skip  # noqa: E402

TARGET_GAP = 0.03


def base_config(args: argparse.Namespace, seed: int) -> RunConfig:
    return apply_overrides(RunConfig(), [
        f"seed={seed}",
        "model.preset=tiny", f"model.stages={args.stages}", f"model.seq_len={args.seq_len}",
        f"train.steps={args.steps}", f"train.warmup_steps={args.warmup}", f"train.lr={args.lr}",
        f"train.microbatches={args.microbatches}", f"train.microbatch_size={args.microbatch_size}",
        "train.eval_every=1000000", f"train.eval_batches={args.eval_batches}",
        f"train.data_max_bytes={args.data_bytes}",
    ])


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Full and skip runs (and optionally skip with swaps) for one seed: same init, batches and val set."""
    base = base_config(args, seed)
    skip = [f"skippipe.skip_ratio={args.skip}", "skippipe.planner=skippipe"]
    runs = {
        "full": apply_overrides(base, ["skippipe.skip_ratio=0.0", "skippipe.planner=full"]),
        "skip": apply_overrides(base, [*skip, f"skippipe.max_swaps={args.max_swaps}"]),
    }
    if args.with_swaps:
        runs["skip_swaps"] = apply_overrides(base, [*skip, "skippipe.max_swaps=2"])
    val = run_val_batches(base, load_run_corpus(base))
    out: dict[str, Any] = {"seed": seed}
    for name, config in runs.items():
        start = time.perf_counter()
        result = train_skip(config, eval_every=0, clip=args.clip)
        s = result.summary
        half = evaluate_subsets(result.stages, val)
        out[name] = {
            "val_loss": s["final_val_loss"],
            "wall_s": round(time.perf_counter() - start, 1),
            "final_train_loss": s["final_train_loss"],
            "perplexity": math.exp(s["final_val_loss"]),
            "half_stages": half["subset"]["stages"],
            "half_perplexity": half["subset"]["perplexity"],
            "half_perplexity_ratio": half["perplexity_ratio"],
            "block_compute_fraction": s["block_compute_fraction"],
            "paths": s["paths"],
            "path_val_loss": s.get("path_val_loss"),
        }
        if name != "full":
            out[name]["gap"] = s["final_val_loss"] / out["full"]["val_loss"] - 1.0
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    per_seed = [run_seed(args, seed) for seed in args.seeds]

    def mean(run: str, key: str) -> float:
        return statistics.fmean(r[run][key] for r in per_seed)

    gap = mean("skip", "gap")
    result: dict[str, Any] = {
        "full_val_loss": mean("full", "val_loss"),
        "skip_val_loss": mean("skip", "val_loss"),
        "gap": gap,
        "gap_per_seed": [r["skip"]["gap"] for r in per_seed],
        "target_gap": TARGET_GAP,
        "meets_target": gap <= TARGET_GAP,
        "full_half_perplexity_ratio": mean("full", "half_perplexity_ratio"),
        "skip_half_perplexity_ratio": mean("skip", "half_perplexity_ratio"),
    }
    if args.with_swaps:
        result["swaps_gap"] = mean("skip_swaps", "gap")
    result["setup"] = {
        "preset": "tiny", "stages": args.stages, "skip_ratio": args.skip,
        "stages_per_path": len(per_seed[0]["skip"]["paths"][0]) - 2, "max_swaps": args.max_swaps,
        "steps": args.steps, "tokens_per_run": args.steps * args.microbatches * args.microbatch_size * args.seq_len,
        "microbatches": args.microbatches, "microbatch_size": args.microbatch_size, "seq_len": args.seq_len,
        "lr": args.lr, "warmup_steps": args.warmup, "clip": args.clip, "seeds": args.seeds,
        "eval_tokens": args.eval_batches * args.microbatches * args.microbatch_size * args.seq_len,
        "gap_definition": "mean over seeds of skip_val_loss / full_val_loss - 1; both models evaluated on "
                          "the full path over the held-out split; val losses reported are means over seeds",
    }
    result["seeds"] = per_seed
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=7, help="S including stage 0; S-1 must divide 6 (tiny)")
    p.add_argument("--skip", type=float, default=0.25, help="skip ratio of the skip run")
    p.add_argument("--max-swaps", type=int, default=0, choices=(0, 1, 2),
                   help="adjacent swaps per path allowed in the skip run (skippipe.max_swaps; default 0)")
    p.add_argument("--with-swaps", action="store_true",
                   help="also train a third run with max_swaps=2 and report its gap under runs.skip_swaps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--microbatches", type=int, default=4, help="microbatches (paths) per iteration")
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data-bytes", type=int, default=2 << 20, help="corpus cap in bytes")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2, 3],
                   help="comma-separated run seeds (weights, data order, held-out split); default 0,1,2,3")
    p.add_argument("--clip", choices=("stage", "global"), default="stage",
                   help="gradient clipping per stage (as the node runtime) or over the whole model")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"full path val loss {result['full_val_loss']:.4f}, skip-trained (k={args.skip}) "
              f"{result['skip_val_loss']:.4f}: gap {result['gap']:+.2%} (target <= {TARGET_GAP:.0%})")
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
