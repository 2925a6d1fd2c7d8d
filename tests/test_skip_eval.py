"""SkipPipe inference and training numerics: evaluation along paths, export/load, `lowband-sim eval`, skiptrain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lowband.coordinator.skippipe.paths import check_stage_sequence, stages_visited
from lowband.node.train.along_path import full_path
from lowband.node.train.data import Corpus, val_batches
from lowband.node.train.evaluate import evaluate, evaluate_subsets, half_count, search_half, strided_half
from lowband.node.train.export import ExportError, export_model, export_transformer, load_model
from lowband.node.train.model import ModelConfig, Transformer, lm_loss, split_model
from lowband.node.train.reference import train_reference
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.sim.cli import main as sim_main
from lowband.sim.skiptrain import backward_iteration, plan_training_paths, train_skip

torch.set_num_threads(1)

CFG = ModelConfig.from_preset("tiny")
SEQ = 16


def _tokens(n: int = 4000, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


def _stages(num_stages: int = 4, seed: int = 0) -> tuple[Transformer, list[torch.nn.Module]]:
    model = Transformer(CFG, seed=seed)
    model.eval()
    return model, split_model(model, num_stages)


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return val_batches(Corpus(train=_tokens()[:0], val=_tokens(), source="test"), 2, SEQ, 3)


# --- evaluation -------------------------------------------------------------------------------------

def test_full_path_evaluation_equals_the_whole_model(batches: list) -> None:
    model, stages = _stages(4)
    with torch.no_grad():
        expected = sum(lm_loss(model(x), y).item() for x, y in batches) / len(batches)
    result = evaluate(stages, batches)
    assert result["path"] == [0, 1, 2, 3, 0]
    # Same modules, same ops in the same order: equal up to float summation order.
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    # Raw validation tokens give the evenly spaced windows of node.data.val_batches.
    from_tokens = evaluate(stages, _tokens(), batch_size=2, seq_len=SEQ, batches=3)
    assert from_tokens["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_a_path_uses_only_its_stages(batches: list) -> None:
    _, stages = _stages(4)
    stages[1].train()
    before = evaluate(stages, batches, path=[0, 1, 0])["loss"]
    with torch.no_grad():
        for p in stages[2].parameters():
            p.add_(torch.randn_like(p))
    assert evaluate(stages, batches, path=[0, 1, 0])["loss"] == before   # stage 2 not on the path
    with torch.no_grad():
        for p in stages[1].parameters():
            p.add_(torch.randn_like(p))
    assert evaluate(stages, batches, path=[0, 1, 0])["loss"] != before
    assert stages[1].training and stages[1].blocks[0].training   # evaluation restores the mode


def test_evaluate_refuses_bad_paths(batches: list) -> None:
    _, stages = _stages(4)
    for path in ([1, 2, 0], [0, 5, 0], [0, 1], [0, 1, 0, 2, 0]):
        with pytest.raises(ValueError):
            evaluate(stages, batches, path=path)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate(stages, _tokens(), seq_len=CFG.max_seq_len + 1, batch_size=1, batches=1)


def test_strided_half_keeps_half_in_ascending_order_with_both_ends() -> None:
    assert strided_half([1, 2, 3, 4, 5, 6]) == [1, 3, 6]
    assert strided_half([1, 2, 3]) == [1, 3]
    assert strided_half([1]) == [1]
    for n in range(1, 13):
        kept = strided_half(list(range(1, n + 1)))
        assert len(kept) == half_count(n) == stages_visited(n + 1, 0.5)
        assert kept == sorted(set(kept))
        if n >= 2 and len(kept) >= 2:
            assert kept[0] == 1 and kept[-1] == n


def test_evaluate_subsets_respects_the_subset_and_search_picks_the_best(batches: list) -> None:
    _, stages = _stages(7)
    given = evaluate_subsets(stages, batches, subset=[5, 2])
    assert given["subset"]["stages"] == [2, 5] and given["subset"]["path"] == [0, 2, 5, 0]
    assert given["subset"]["loss"] == pytest.approx(evaluate(stages, batches, path=[0, 2, 5, 0])["loss"])
    assert given["full"]["path"] == full_path(7)
    assert given["perplexity_ratio"] == pytest.approx(given["subset"]["perplexity"] / given["full"]["perplexity"])
    strided = evaluate_subsets(stages, batches)
    assert strided["subset"]["stages"] == [1, 3, 6] and strided["subset"]["method"] == "strided"

    chosen, tried = search_half(stages, batches[:1])
    assert len(tried) == math.comb(6, 3) and len(chosen) == 3
    best = min(tried, key=lambda t: t["selection_loss"])
    assert chosen == best["stages"]
    greedy, tried_greedy = search_half(stages, batches[:1], max_candidates=5)   # forces elimination
    assert len(greedy) == 3 and greedy == sorted(greedy) and len(tried_greedy) == 6 + 5 + 4
    for bad in ([], [0], [7], [1, 1]):
        with pytest.raises(ValueError, match="block stages"):
            evaluate_subsets(stages, batches, subset=bad)
    with pytest.raises(ValueError, match="half method"):
        evaluate_subsets(stages, batches, half="best")


# --- export -----------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path: Path, batches: list) -> None:
    model, stages = _stages(4, seed=3)
    path = export_transformer(tmp_path / "out", model, 4, meta={"seed": 3, "note": "x"})
    assert path == tmp_path / "out"   # a path that is not an existing folder is the file itself
    loaded = load_model(path)
    assert loaded.num_stages == 4 and loaded.config == CFG and loaded.meta == {"seed": 3, "note": "x"}
    for s in range(4):
        want, got = stages[s].state_dict(), loaded.stages[s].state_dict()
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert evaluate(loaded.stages, batches)["loss"] == evaluate(stages, batches)["loss"]
    folder = tmp_path / "dir"
    folder.mkdir()
    assert export_model(folder, stages, CFG) == folder / "model.pt"
    assert load_model(folder).num_stages == 4
    with pytest.raises(ExportError, match="exported with 4 stages"):
        load_model(folder, num_stages=3)


def _payload(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_load_refuses_bad_files_with_clear_errors(tmp_path: Path) -> None:
    _, stages = _stages(4)
    good = export_model(tmp_path / "good.pt", stages, CFG)
    with pytest.raises(ExportError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ExportError, match="not a model file"):
        load_model(tmp_path / "text.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ExportError, match="corrupt or truncated"):
        load_model(tmp_path / "trunc.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ExportError, match="not a lowband model export"):
        load_model(tmp_path / "list.pt")

    def variant(name: str, change: callable) -> Path:
        payload = _payload(good)
        change(payload)
        torch.save(payload, tmp_path / name)
        return tmp_path / name

    cases = {
        "shape": (lambda p: p["model_config"].update(dim=64), "does not match the model config"),
        "missing": (lambda p: p["stages"].pop(2), "stage 2 of 4 is missing"),
        "extra": (lambda p: p["stages"].update({7: {}}), "unexpected stage 7"),
        "version": (lambda p: p.update(version=99), "unsupported export version"),
        "field": (lambda p: p["model_config"].update(colour=1), "unknown model_config field"),
        "stages": (lambda p: p.update(num_stages=0), "num_stages must be an integer >= 1"),
        "nan": (lambda p: p["stages"][1]["blocks.0.attn.wq.weight"].fill_(float("nan")), "non-finite"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ExportError, match=message):
            load_model(variant(name, change))
    assert load_model(good).num_stages == 4   # the good file still loads


def test_loads_a_baseline_run_folder(tmp_path: Path, batches: list) -> None:
    model, _ = _stages(4, seed=5)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ExportError, match=r"summary\.json"):
        load_model(tmp_path)
    config = apply_overrides(RunConfig(), ["model.stages=7", "seed=5"])
    (tmp_path / "summary.json").write_text(json.dumps({"config": config.to_dict(), "final_val_loss": 1.0}))
    loaded = load_model(tmp_path)
    assert loaded.num_stages == 7 and loaded.meta["seed"] == 5
    with torch.no_grad():
        expected = sum(lm_loss(model(x), y).item() for x, y in batches) / len(batches)
    assert evaluate(loaded.stages, batches)["loss"] == pytest.approx(expected, rel=1e-6)
    assert load_model(tmp_path, num_stages=3).num_stages == 3
    with pytest.raises(ExportError, match="cannot be split evenly"):
        load_model(tmp_path, num_stages=5)


# --- lowband-sim eval -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    model, _ = _stages(4, seed=2)
    path = export_transformer(root / "model.pt", model, 4, meta={"seed": 0})
    data = root / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 400)
    return path, data


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = sim_main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_cli_table_and_json(exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, data = exported
    common = ["--model", str(model), "--data", str(data), "--batches", "2", "--batch-size", "2",
              "--seq-len", str(SEQ)]
    code, out, _ = _eval(capsys, *common)
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("all ") and "1,2,3" in line for line in lines)
    assert any(line.startswith("half (strided)") and "1,3" in line for line in lines)

    code, out, _ = _eval(capsys, *common, "--stages", "3,2", "--half", "--json")
    assert code == 0
    report = json.loads(out)
    names = [r["name"] for r in report["results"]]
    assert names == ["all", "subset", "half (strided)"]
    subset = report["results"][1]
    assert subset["stages"] == [2, 3] and subset["path"] == [0, 2, 3, 0]
    # The CLI's numbers are node.evaluate's on the held-out split of the same data.
    loaded = load_model(model)
    from lowband.node.train.data import load_corpus
    vb = val_batches(load_corpus(data), 2, SEQ, 2)
    assert subset["loss"] == pytest.approx(evaluate(loaded.stages, vb, path=[0, 2, 3, 0])["loss"], rel=1e-6)
    assert report["results"][0]["loss"] == pytest.approx(evaluate(loaded.stages, vb)["loss"], rel=1e-6)
    assert subset["ratio"] == pytest.approx(subset["perplexity"] / report["results"][0]["perplexity"])

    code, out, _ = _eval(capsys, *common, "--stages", "1", "--json")
    assert [r["name"] for r in json.loads(out)["results"]] == ["all", "subset"]


def test_eval_cli_errors(exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = exported
    common = ["--data", str(data), "--batches", "1", "--batch-size", "1", "--seq-len", str(SEQ)]
    for stages, message in (("1,4", "stage 4 does not exist"), ("0,1", "stage 0"), ("1,x", "integers"),
                            ("1,,2", "separated by commas"), ("2,2", "listed twice")):
        code, out, err = _eval(capsys, "--model", str(model), "--stages", stages, *common)
        assert code == 2 and out == "" and message in err, (stages, err)
    code, _, err = _eval(capsys, "--model", str(tmp_path / "nope.pt"), *common)
    assert code == 2 and "not found" in err
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    code, _, err = _eval(capsys, "--model", str(tmp_path / "bad.pt"), *common)
    assert code == 2 and "not a model file" in err
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(tmp_path / "none.txt"))
    assert code == 2 and "not found" in err
    code, _, err = _eval(capsys, "--model", str(model), "--data", str(data), "--seq-len", "100000")
    assert code == 2 and "max_seq_len" in err


# --- skip training ----------------------------------------------------------------------------------

TINY_RUN = ["train.steps=3", "train.warmup_steps=1", "train.eval_every=100", "train.eval_batches=1",
            "train.microbatch_size=2", "train.microbatches=2", "model.seq_len=16",
            "train.data_max_bytes=60000"]


def test_planned_training_paths_obey_the_rules() -> None:
    for S, k in ((4, 0.25), (7, 0.25)):
        plan = plan_training_paths(S, k, 4, seed=1)
        m = stages_visited(S, k)
        assert len(plan) == 4
        for path in plan:
            assert path[0] == path[-1] == 0
            check_stage_sequence(path[1:-1], S, m)
    assert plan_training_paths(4, 0.0, 2, planner="full") == [[0, 1, 2, 3, 0]] * 2


def test_stage_gradient_is_the_mean_over_visiting_microbatches(batches: list) -> None:
    _, stages = _stages(4)
    mbs = batches[:3]
    plan = [[0, 1, 3, 0], [0, 1, 2, 0], [0, 2, 3, 0]]

    def grads_of(path: list[int], mb: tuple) -> dict[int, list[torch.Tensor]]:
        for m in stages:
            m.zero_grad(set_to_none=True)
        backward_iteration(stages, [path], [mb])
        return {s: [p.grad.clone() for p in stages[s].parameters()] for s in set(path)}

    single = [grads_of(p, mb) for p, mb in zip(plan, mbs, strict=True)]
    for m in stages:
        m.zero_grad(set_to_none=True)
    _, counts = backward_iteration(stages, plan, mbs)
    assert counts == {0: 3, 1: 2, 2: 2, 3: 2}
    for s in range(4):
        visitors = [g[s] for g in single if s in g]
        for i, p in enumerate(stages[s].parameters()):
            want = sum(v[i] for v in visitors) / len(visitors)
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


def test_full_path_skiptrain_equals_the_reference_trainer(tmp_path: Path) -> None:
    config = apply_overrides(RunConfig(), TINY_RUN)
    ref = train_reference(config, tmp_path / "ref", device="cpu", progress=False)
    ref_losses = [json.loads(line).get("loss") for line in (tmp_path / "ref" / "metrics.jsonl").open()][1:]
    result = train_skip(config, clip="global", export=tmp_path / "skip" / "model.pt")
    losses = [h["loss"] for h in result.history if "loss" in h]
    # Same batches, same init, same optimizer; only float summation order differs (per-stage backward).
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert result.summary["final_val_loss"] == pytest.approx(ref["final_val_loss"], rel=1e-5)
    loaded = load_model(tmp_path / "skip" / "model.pt")
    assert loaded.meta["source"] == "skiptrain" and loaded.meta["skip_ratio"] == 0.0


def test_skiptrain_steps_only_visited_stages() -> None:
    config = apply_overrides(RunConfig(), [*TINY_RUN, "train.steps=2"])
    from lowband.node.train.model import init_stage
    initial = {s: init_stage(CFG, s, 4, seed=0).state_dict() for s in range(4)}
    result = train_skip(config, paths=[[0, 1, 3, 0], [0, 3, 0]], eval_every=0, eval_paths=False)
    assert result.summary["stage_visits"] == {"0": 4, "1": 2, "2": 0, "3": 4}
    assert result.summary["block_compute_fraction"] == pytest.approx(6 / 12)
    for s in range(4):
        same = all(torch.equal(v, result.stages[s].state_dict()[k]) for k, v in initial[s].items())
        assert same == (s == 2), s
    with pytest.raises(ValueError, match="unknown stage"):
        train_skip(config, paths=[[0, 4, 0]])


def test_skiptrain_cli_exports_a_model_that_eval_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "skip" / "model.pt"
    common = [x for o in TINY_RUN[1:] for x in ("--set", o)]
    code = sim_main(["skiptrain", "--stages", "4", "--skip-ratio", "0.25", "--steps", "2", "--export", str(out),
                     "--json", *common])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["planner"] == "skippipe" and summary["stages_per_path"] == 2
    assert all(len(p) == 4 for p in summary["paths"])
    data = tmp_path / "data.txt"
    data.write_text("import os\nprint(os.sep)\n" * 300)
    code = sim_main(["eval", "--model", str(out), "--data", str(data), "--batches", "1", "--batch-size", "2",
                     "--seq-len", str(SEQ), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["num_stages"] == 4
    assert [r["stages"] for r in report["results"]] == [[1, 2, 3], [1, 3]]
    assert sim_main(["skiptrain", "--stages", "5", "--steps", "1", *common]) == 2   # 6 blocks, 4 block stages
    assert "split evenly" in capsys.readouterr().err
