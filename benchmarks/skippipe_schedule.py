"""SkipPipe planner benchmark: iteration time of each planner over several geo topologies, and
planning time at 1000 nodes. Prints one JSON object.

    python -m benchmarks.skippipe_schedule [--seeds 10] [--large-seeds 3]

(run as a module from the repository root: benchmarks/coordinator.py would shadow the
coordinator package if this file were run as a script)

Reference (SkipPipe paper, authors' simulator, 20 nodes, 6 stages, 33% skip, geo): full 79.9 s,
random 48.9 s, collision-unaware 35.4 s, collision-aware 33.3 s (skippipe/full = 0.417).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# `python benchmarks/skippipe_schedule.py` puts benchmarks/ first on sys.path, where
# benchmarks/coordinator.py would shadow the `coordinator` package: drop it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from lowband.sim.schedule import evaluate, register  # noqa: E402


def schedule_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["schedule", *argv])


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--seeds", type=int, default=10)
    cli.add_argument("--large-seeds", type=int, default=3)
    opts = cli.parse_args()
    small: list[dict[str, Any]] = []
    for seed in range(opts.seeds):
        out = evaluate(schedule_args("--topology", "geo", "--nodes", "20", "--stages", "6", "--skip", "0.33",
                                     "--seed", str(seed)))
        small.append({"seed": seed, "skippipe_vs_full": out["skippipe_vs_full"],
                      "skippipe_vs_random": out["skippipe_vs_random"],
                      **{name: res["iteration_s"] for name, res in out["planners"].items()}})
    large: list[dict[str, Any]] = []
    for seed in range(opts.large_seeds):
        out = evaluate(schedule_args("--topology", "geo", "--nodes", "1000", "--stages", "24", "--skip", "0.25",
                                     "--seed", str(seed), "--planners", "full,random,skippipe"))
        large.append({"seed": seed, "plan_s": out["plan_s"], "skippipe_vs_full": out["skippipe_vs_full"],
                      **{name: res["iteration_s"] for name, res in out["planners"].items()}})
    ratios = [r["skippipe_vs_full"] for r in small]
    result = {
        "geo_20n_6s_k0.33": {
            "per_seed": small,
            "skippipe_vs_full_mean": round(statistics.mean(ratios), 4),
            "skippipe_vs_full_max": max(ratios),
            "seeds_at_most_0.45": sum(r <= 0.45 for r in ratios),
            "skippipe_faster_than_random_all": all(r["skippipe_vs_random"] < 1 for r in small),
            "mean_iteration_s": {name: round(statistics.mean(r[name] for r in small), 3)
                                 for name in ("full", "random", "skippipe-unaware", "skippipe", "skippipe-noskip")},
        },
        "geo_1000n_24s_k0.25": {"per_seed": large, "plan_s_max": max(r["plan_s"] for r in large)},
    }
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
