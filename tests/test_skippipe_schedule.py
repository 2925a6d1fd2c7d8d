"""`lowband-sim schedule` and the topology generators."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowband.coordinator.skippipe.paths import PlanError
from lowband.protocols.config import ConfigError, RunConfig
from lowband.sim.cli import main
from lowband.sim.topology import KINDS, make_topology


@pytest.mark.parametrize("kind", KINDS)
def test_topology_shape_and_stage_spread(kind: str) -> None:
    topo = make_topology(kind, 23, 5, seed=7)
    n = len(topo.nodes)
    assert n == 23
    counts = np.bincount([s.stage for s in topo.nodes], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts[0] == counts.max()
    off = ~np.eye(n, dtype=bool)
    assert np.allclose(topo.latency_s, topo.latency_s.T) and np.allclose(topo.bandwidth_Bps[off],
                                                                         topo.bandwidth_Bps.T[off])
    assert (topo.latency_s[off] > 0).all() and (topo.bandwidth_Bps[off] > 0).all()
    again = make_topology(kind, 23, 5, seed=7)
    assert np.array_equal(again.latency_s, topo.latency_s) and again.nodes == topo.nodes
    other = make_topology(kind, 23, 5, seed=8)
    assert [s.stage for s in other.nodes] != [s.stage for s in topo.nodes]


def test_geo_ranges() -> None:
    topo = make_topology("geo", 60, 6, seed=3)
    region = np.asarray(topo.regions)
    same = region[:, None] == region[None, :]
    off = ~np.eye(60, dtype=bool)
    inter, intra = off & ~same, off & same
    assert 2 <= len(set(region.tolist())) <= 12
    assert topo.latency_s[inter].min() >= 0.010 and topo.latency_s[inter].max() <= 0.300
    assert topo.bandwidth_Bps[inter].min() >= 0.01e9 and topo.bandwidth_Bps[inter].max() <= 0.25e9
    assert np.allclose(topo.latency_s[intra], 0.001)
    assert topo.bandwidth_Bps[intra].min() >= 1e9
    # farther regions are slower: latency and bandwidth are anti-correlated across region pairs
    assert np.corrcoef(topo.latency_s[inter], topo.bandwidth_Bps[inter])[0, 1] < -0.5


def test_topology_errors() -> None:
    with pytest.raises(PlanError, match="unknown topology"):
        make_topology("mesh", 10, 3)
    with pytest.raises(PlanError, match="at least one node per stage"):
        make_topology("geo", 3, 5)


def test_schedule_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["schedule", "--topology", "geo", "--nodes", "14", "--stages", "5", "--skip", "0.25",
               "--microbatches", "2", "--seed", "1", "--search-evals", "200", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["planners"]) == {"full", "random", "skippipe-unaware", "skippipe", "skippipe-noskip"}
    span = {k: v["iteration_s"] for k, v in out["planners"].items()}
    assert all(v > 0 for v in span.values())
    assert out["skippipe_vs_full"] == pytest.approx(span["skippipe"] / span["full"], abs=1e-3)
    assert out["plan_s"] == out["planners"]["skippipe"]["plan_s"] >= 0
    assert out["visits_per_path"] == 3 and out["origins"] == 3 and out["nodes"] == 14
    lo, hi = out["planners"]["skippipe"]["coverage_min_max"]
    assert hi - lo <= 1


def test_schedule_table_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", "--topology", "hetero", "--nodes", "9", "--stages", "3", "--skip", "0.5",
                 "--planners", "full,skippipe", "--swap-edges"]) == 0
    text = capsys.readouterr().out
    assert "hetero topology, 9 nodes" in text and "skippipe" in text and "random" not in text
    assert main(["schedule", "--nodes", "3", "--stages", "5"]) == 2
    assert "fewer than --stages" in capsys.readouterr().err
    assert main(["schedule", "--planners", "astar"]) == 2
    assert main(["schedule", "--nodes", "8", "--stages", "4", "--skip", "0.1", "--memory-cap", "1",
                 "--microbatches", "2"]) == 2
    assert "memory_cap=1" in capsys.readouterr().err
    # a cap only the skipping planners can meet: full is reported as unplannable, the others run
    assert main(["schedule", "--nodes", "20", "--stages", "6", "--skip", "0.33", "--memory-cap", "4",
                 "--planners", "full,skippipe", "--search-evals", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "memory_cap=4" in out["planners"]["full"]["error"] and "skippipe_vs_full" not in out
    assert out["planners"]["skippipe"]["iteration_s"] > 0


def test_config_section() -> None:
    cfg = RunConfig.from_dict({"skippipe": {"planner": "skippipe-unaware", "skip_ratio": 0.33}})
    assert cfg.skippipe.planner == "skippipe-unaware"
    with pytest.raises(ConfigError, match=r"skippipe\.planner"):
        RunConfig.from_dict({"skippipe": {"planner": "astar"}})
