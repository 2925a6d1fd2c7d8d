"""Pure Streaming DiLoCo: outer step and its sign, schedule, fragments, merge, state, robust mean."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from lowband.node.sync.diloco import (
    OuterOptimizer,
    StreamingDiLoCo,
    fragment_due,
    fragment_of_params,
    fragment_offsets,
    state_from_items,
    state_to_items,
)
from lowband.node.sync.robust_mean import robust_mean, shard_bounds
from lowband.protocols.config import ConfigError, DilocoSection

torch.set_num_threads(1)


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))


class Blocks(nn.Module):
    """Stand-in for a block stage: blocks.{j}.* plus a stage-0-like extra."""

    def __init__(self, n_blocks: int = 5, extras: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(n_blocks))
        if extras:
            self.embed = nn.Embedding(7, 3)
            self.norm = nn.LayerNorm(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def cfg(**kw: object) -> DilocoSection:
    base = dict(inner_steps=4, fragments=1, overlap=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9, codec="fp32")
    base.update(kw)
    return DilocoSection(**base)  # type: ignore[arg-type]


def test_two_replica_outer_step_pins_sign_and_nesterov() -> None:
    # θ_g = 1, locals 0.8 and 0.6: Δ_i = θ_g - θ_i = 0.2, 0.4 -> mean 0.3.
    c = cfg(inner_steps=1, fragments=1, overlap=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9)
    reps = [StreamingDiLoCo(Scalar(1.0), c) for _ in range(2)]
    for rep, local in zip(reps, (0.8, 0.6), strict=True):
        with torch.no_grad():
            rep.module.w.fill_(local)
    jobs = [rep.begin_sync(1) for rep in reps]
    assert all(j is not None for j in jobs)
    torch.testing.assert_close(jobs[0].delta, torch.tensor([0.2]))
    torch.testing.assert_close(jobs[1].delta, torch.tensor([0.4]))
    mean = (jobs[0].delta + jobs[1].delta) / 2
    for rep, job in zip(reps, jobs, strict=True):
        rep.finish_sync(job, mean)
    # Nesterov: b = 0.3; update = 0.3 + 0.9*0.3 = 0.57; θ_g = 1 - 0.7*0.57 = 0.601.
    for rep in reps:
        torch.testing.assert_close(rep.global_params["w"], torch.tensor([0.601]))
        torch.testing.assert_close(rep.outer.buffers[0]["w"], torch.tensor([0.3]))
        torch.testing.assert_close(rep.module.w.detach(), torch.tensor([0.601]))  # alpha=0: θ_local = θ_g
    # Second round: locals 0.5 and 0.401 -> Δ = 0.101, 0.2 -> mean 0.1505.
    for rep, local in zip(reps, (0.5, 0.401), strict=True):
        with torch.no_grad():
            rep.module.w.fill_(local)
    jobs = [rep.begin_sync(2) for rep in reps]
    mean = (jobs[0].delta + jobs[1].delta) / 2
    torch.testing.assert_close(mean, torch.tensor([0.1505]))
    for rep, job in zip(reps, jobs, strict=True):
        rep.finish_sync(job, mean)
    # b = 0.9*0.3 + 0.1505 = 0.4205; update = 0.1505 + 0.9*0.4205 = 0.52895; θ = 0.601 - 0.7*0.52895.
    for rep in reps:
        torch.testing.assert_close(rep.outer.buffers[0]["w"], torch.tensor([0.4205]))
        torch.testing.assert_close(rep.global_params["w"], torch.tensor([0.601 - 0.7 * 0.52895]))
        assert rep.outer.steps[0] == 2


def test_outer_step_matches_torch_sgd_nesterov() -> None:
    torch.manual_seed(0)
    theta = torch.randn(10)
    ref = nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([ref], lr=0.4, momentum=0.9, nesterov=True)
    params = {"x": theta.clone()}
    outer = OuterOptimizer(0.4, 0.9)
    for _ in range(4):
        g = torch.randn(10)
        ref.grad = g.clone()
        sgd.step()
        outer.step(0, params, {"x": g})
    torch.testing.assert_close(params["x"], ref.detach())


def test_outer_lr_ramp_is_linear_per_fragment_then_holds() -> None:
    """lr 2 -> 3 over 4 outer steps: steps 0..4 use 2, 2.25, 2.5, 2.75, 3, then 3; each fragment counts
    its own outer steps, so a fragment that has not synced yet still takes the first lr."""
    outer = OuterOptimizer(2.0, 0.0, lr_final=3.0, ramp_steps=4)
    params = {"x": torch.zeros(1)}
    seen = []
    for _ in range(6):
        seen.append(outer.lr_at(0))
        outer.step(0, params, {"x": torch.ones(1)})
    assert seen == [2.0, 2.25, 2.5, 2.75, 3.0, 3.0]
    # momentum 0: theta moved by minus the sum of the lrs used
    torch.testing.assert_close(params["x"], torch.tensor([-sum(seen)]))
    assert outer.lr_at(1) == 2.0
    assert OuterOptimizer(0.7, 0.9).lr_at(0) == 0.7   # no ramp: constant


def test_outer_lr_ramp_settings_are_validated_together() -> None:
    with pytest.raises(ConfigError, match=r"diloco\.outer_lr_ramp"):
        DilocoSection(outer_lr_final=3.0)
    with pytest.raises(ConfigError, match=r"diloco\.outer_lr_ramp"):
        DilocoSection(outer_lr_ramp=10)
    with pytest.raises(ConfigError, match=r"diloco\.outer_lr_final"):
        DilocoSection(outer_lr_final=-1.0, outer_lr_ramp=10)
    with pytest.raises(ValueError, match="ramp"):
        OuterOptimizer(1.0, 0.0, lr_final=2.0)
    cfg = DilocoSection(outer_lr=2.0, outer_lr_final=3.0, outer_lr_ramp=40)
    assert StreamingDiLoCo(nn.Linear(2, 2), cfg).outer.lr_at(0) == 2.0


def test_merge_with_alpha_keeps_local_progress_made_during_overlap() -> None:
    c = cfg(inner_steps=4, fragments=1, overlap=1, alpha=0.5, outer_lr=1.0, outer_momentum=0.0)
    rep = StreamingDiLoCo(Scalar(1.0), c)
    with torch.no_grad():
        rep.module.w.fill_(0.8)
    assert rep.begin_sync(3) is None
    job = rep.begin_sync(4)
    assert job is not None and job.merge_step == 5
    with torch.no_grad():  # training went on during the exchange
        rep.module.w.fill_(0.7)
    assert rep.due_merges(4) == [] and rep.due_merges(5) == [job]
    rep.finish_sync(job, job.delta)  # alone: average = own Δ = 0.2 -> θ_g = 1 - 0.2 = 0.8
    torch.testing.assert_close(rep.global_params["w"], torch.tensor([0.8]))
    torch.testing.assert_close(rep.module.w.detach(), torch.tensor([0.5 * 0.7 + 0.5 * 0.8]))
    assert rep.pending == []


def test_schedule_each_fragment_once_per_cycle_offsets_spread() -> None:
    for h, p in [(12, 3), (25, 3), (100, 4), (7, 7), (5, 1)]:
        c = cfg(inner_steps=h, fragments=p, overlap=0)
        offsets = fragment_offsets(c)
        assert offsets == sorted(set(offsets)) and offsets[0] == 0 and offsets[-1] < h
        gaps = [b - a for a, b in zip(offsets, [*offsets[1:], h], strict=True)]
        assert max(gaps) - min(gaps) <= 1, "offsets must be spread evenly over H"
        seen: dict[int, list[int]] = {q: [] for q in range(p)}
        for t in range(0, 3 * h + 1):
            q = fragment_due(t, c)
            if q is not None:
                seen[q].append(t)
        for q, steps in seen.items():
            assert all(s > 0 for s in steps)
            assert [b - a for a, b in itertools.pairwise(steps)] == [h] * (len(steps) - 1)
            assert all(s % h == offsets[q] for s in steps)
            # within any window of H consecutive steps the fragment syncs exactly once
            for start in range(1, 2 * h + 2):
                assert sum(1 for s in steps if start <= s < start + h) == 1


def test_fragment_rule_strided_blocks_and_balanced_extras() -> None:
    model = Blocks(n_blocks=5, extras=True)
    frags = fragment_of_params(model.named_parameters(), 3)
    names = [n for f in frags for n in f]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    for p, frag in enumerate(frags):
        for n in frag:
            if n.startswith("blocks."):
                assert int(n.split(".")[1]) % 3 == p
    # blocks 0,3 | 1,4 | 2 -> fragment 2 is smallest, so the biggest extra (embed, sorted first) lands there
    assert "embed.weight" in frags[2]
    # a bookend-like stage with no blocks still spreads over the fragments
    bookend = nn.ModuleDict({"embed": nn.Embedding(8, 4), "head": nn.Linear(4, 8, bias=False),
                             "norm": nn.LayerNorm(4)})
    b_frags = fragment_of_params(bookend.named_parameters(), 3)
    assert all(b_frags), b_frags
    # depends on names and shapes only, not on the order the module lists them
    shuffled = fragment_of_params(reversed(list(bookend.named_parameters())), 3)
    assert [sorted(f) for f in shuffled] == [sorted(f) for f in b_frags]


def test_streaming_fragments_only_touch_their_parameters() -> None:
    c = cfg(inner_steps=6, fragments=3, overlap=0, alpha=0.0, outer_lr=0.5, outer_momentum=0.9)
    rep = StreamingDiLoCo(Blocks(n_blocks=3, extras=False), c)
    with torch.no_grad():
        for p in rep.module.parameters():
            p.sub_(0.1)
    before = {n: t.clone() for n, t in rep.global_params.items()}
    job = rep.begin_sync(2)  # offset of fragment 1 = 6//3*1 = 2
    assert job is not None and job.fragment == 1
    assert set(job.names) == {"blocks.1.weight", "blocks.1.bias"}
    rep.finish_sync(job, job.delta)
    for n, t in rep.global_params.items():
        changed = not torch.equal(t, before[n])
        assert changed == n.startswith("blocks.1."), n


def test_lost_shard_leaves_state_untouched() -> None:
    c = cfg(inner_steps=2, fragments=1, overlap=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.9)
    rep = StreamingDiLoCo(Blocks(n_blocks=1, extras=False), c)
    with torch.no_grad():
        for p in rep.module.parameters():
            p.add_(1.0)
    local_before = {n: p.detach().clone() for n, p in rep.params.items()}
    glob_before = {n: t.clone() for n, t in rep.global_params.items()}
    job = rep.begin_sync(2)
    valid = torch.ones(job.numel, dtype=torch.bool)
    valid[:5] = False
    rep.finish_sync(job, job.delta, valid)
    flat_g = torch.cat([rep.global_params[n].reshape(-1) for n in job.names])
    flat_g0 = torch.cat([glob_before[n].reshape(-1) for n in job.names])
    flat_l = torch.cat([rep.params[n].detach().reshape(-1) for n in job.names])
    flat_l0 = torch.cat([local_before[n].reshape(-1) for n in job.names])
    torch.testing.assert_close(flat_g[:5], flat_g0[:5])
    torch.testing.assert_close(flat_l[:5], flat_l0[:5])
    torch.testing.assert_close(flat_g[5:], flat_g0[5:] + 1.9)  # lr 1, Δ = -1, Nesterov: -(1 + 0.9·1)
    buf = torch.cat([rep.outer.buffers[0][n].reshape(-1) for n in job.names])
    assert torch.all(buf[:5] == 0)
    torch.testing.assert_close(buf[5:], torch.full((buf.numel() - 5,), -1.0))


def test_non_finite_local_is_not_contributed_and_is_reset() -> None:
    c = cfg(inner_steps=1, fragments=1, overlap=0, alpha=0.5)
    rep = StreamingDiLoCo(Scalar(1.0), c)
    with torch.no_grad():
        rep.module.w.fill_(float("nan"))
    job = rep.begin_sync(1)
    assert job is not None and not job.finite and torch.isfinite(job.delta).all()
    rep.finish_sync(job, torch.tensor([0.1]))  # the others' average
    assert torch.isfinite(rep.module.w).all()
    torch.testing.assert_close(rep.module.w.detach(), rep.global_params["w"])


def test_state_roundtrip_for_newcomer() -> None:
    c = cfg(inner_steps=4, fragments=2, overlap=0, alpha=0.0)
    old = StreamingDiLoCo(Blocks(n_blocks=2, seed=1), c)
    for step in range(1, 9):
        with torch.no_grad():
            for p in old.module.parameters():
                p.mul_(0.9)
        job = old.begin_sync(step)
        if job:
            old.finish_sync(job, job.delta)
    new = StreamingDiLoCo(Blocks(n_blocks=2, seed=2), c)
    items = state_to_items(old.state_dict())
    new.load_state_dict(state_from_items(items, new.fragments))
    for n in old.global_params:
        torch.testing.assert_close(new.global_params[n], old.global_params[n])
        torch.testing.assert_close(new.params[n].detach(), old.global_params[n])
    assert new.outer.steps == old.outer.steps == {0: 2, 1: 2}
    for p, bufs in old.outer.buffers.items():
        for n, t in bufs.items():
            torch.testing.assert_close(new.outer.buffers[p][n], t)
    bad = old.state_dict()
    bad["global"]["blocks.0.weight"] = torch.full((3, 3), float("inf"))
    snapshot = {n: t.clone() for n, t in new.global_params.items()}
    with pytest.raises(ValueError, match="non-finite"):
        new.load_state_dict(bad)
    for n, t in snapshot.items():
        assert torch.equal(new.global_params[n], t)  # nothing changed


def test_a_replica_behind_in_one_fragment_adopts_only_that_fragment() -> None:
    """A replica that missed fragment 1's round but went further in fragment 0 takes fragment 1's θ_global,
    momentum and outer step from the source, and keeps its own fragment 0 (and that fragment's pending
    exchange)."""
    c = cfg(inner_steps=4, fragments=2, overlap=1, alpha=0.0)
    source = StreamingDiLoCo(Blocks(n_blocks=2, seed=1), c)
    behind = StreamingDiLoCo(Blocks(n_blocks=2, seed=2), c)
    for rep, fragment, rounds in ((source, 1, 3), (behind, 0, 2)):
        for _ in range(rounds):
            with torch.no_grad():
                for p in rep.module.parameters():
                    p.mul_(0.9)
            job = rep.begin_sync(4, fragment=fragment)
            assert job is not None
            rep.finish_sync(job, job.delta)
    kept = {n: t.clone() for n, t in behind.global_params.items() if n in behind.fragments[0]}
    pending = behind.begin_sync(5, fragment=0)
    state = source.state_dict()
    assert behind.fragments_behind(state) == [1]
    behind.load_state_dict(state, reset_local=False, fragments=behind.fragments_behind(state))
    assert behind.outer.steps == {0: 2, 1: 3}
    for n in behind.fragments[1]:
        torch.testing.assert_close(behind.global_params[n], source.global_params[n])
        torch.testing.assert_close(behind.outer.buffers[1][n], source.outer.buffers[1][n])
    for n, t in kept.items():
        assert torch.equal(behind.global_params[n], t)
    assert behind.pending == [pending]
    with pytest.raises(ValueError, match="out of range"):
        behind.load_state_dict(state, fragments=[2])


def test_config_validation_names_setting() -> None:
    with pytest.raises(ConfigError, match=r"diloco\.fragments"):
        DilocoSection(inner_steps=2, fragments=3)
    with pytest.raises(ConfigError, match=r"diloco\.overlap"):
        DilocoSection(inner_steps=4, overlap=4)
    assert dataclasses.replace(DilocoSection(), inner_steps=50).inner_steps == 50


def test_robust_mean_rejects_non_finite_and_norm_outliers() -> None:
    parts = [torch.ones(4), torch.ones(4) * 3, torch.tensor([1.0, float("nan"), 0, 0]), torch.ones(4) * 100]
    res = robust_mean(parts)
    assert res.rejected_nonfinite == [2] and res.accepted == [0, 1, 3]
    torch.testing.assert_close(res.mean, torch.full((4,), 104 / 3))
    res = robust_mean(parts, reject_norm_ratio=5.0)
    assert res.rejected_norm == [3] and res.accepted == [0, 1]
    torch.testing.assert_close(res.mean, torch.full((4,), 2.0))
    assert robust_mean([torch.tensor([float("inf")])]).mean is None


def test_shard_bounds_cover_exactly() -> None:
    for numel, n in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        b = shard_bounds(numel, n)
        assert len(b) == n and b[0][0] == 0 and b[-1][1] == numel
        assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
        assert [e - s for s, e in b] == [t.numel() for t in torch.tensor_split(torch.zeros(numel), n)]
