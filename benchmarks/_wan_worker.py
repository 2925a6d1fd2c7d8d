"""One host's trainer for benchmarks/wan.py: DDP over gloo, or torchft's Streaming DiLoCo over gloo.

Started by wan.py inside a namespace host (``ip netns exec``), one process per host, with
``python benchmarks/_wan_worker.py SPEC.json``. The spec (written by wan.py) holds the run
config, this host's rank and addresses; the worker writes ``spec["result"]`` (JSON) just
before it exits: its validation curve (rank 0 only), train time and its own peak RSS.

Data and model are lowband's (``lowband.node.train.data``, ``lowband.node.train.model``, ``lowband.node.train.optim``): rank r of K
trains on ``origin_batches(config, corpus, r, K)``, the disjoint shard a lowband origin r of
K reads; AdamW, lr schedule and grad clip as in the reference trainer. Rank 0 evaluates on
``run_val_batches(config, corpus)`` every ``train.eval_every`` steps and after the last.

The clock: every rank waits at a barrier once its process group (DDP) or manager and
TCPStore (torchft) are up; ``t`` of a validation is seconds since rank 0 left that barrier,
so interpreter start-up, imports and rendezvous are not counted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowband.node.sync.diloco import fragment_of_params  # noqa: E402
from lowband.node.train.data import load_run_corpus, origin_batches, run_val_batches  # noqa: E402
from lowband.node.train.model import Transformer, lm_loss, model_config_for  # noqa: E402
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr  # noqa: E402
from lowband.node.train.reference import evaluate  # noqa: E402
from lowband.protocols.config import RunConfig  # noqa: E402

CPU = torch.device("cpu")
BARRIER_TIMEOUT = timedelta(seconds=300)   # every host starts torch within this on a loaded 2-core machine


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Trainer:
    """The loop both modes share: one inner step per batch, rank 0 validates on schedule."""

    def __init__(self, spec: dict[str, Any], model: nn.Module) -> None:
        self.config = RunConfig.from_dict(spec["config"])
        self.rank, self.world = spec["rank"], spec["world"]
        corpus = load_run_corpus(self.config)
        self.batches = origin_batches(self.config, corpus, self.rank, self.world)
        self.val = run_val_batches(self.config, corpus) if self.rank == 0 else []
        self.model = model
        self.tokens_per_step = self.world * self.batches.batch_size * self.batches.seq_len
        self.curve: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.eval_s = 0.0   # rank 0's time in validation since t0 (inside every t; reported beside it)

    def validate(self, step: int, eval_model: nn.Module) -> None:
        if self.rank != 0:
            return
        started = time.time()
        val = evaluate(eval_model, self.val, CPU)   # type: ignore[arg-type]
        t = time.time() - self.t0 if self.t0 else 0.0
        if self.t0:
            self.eval_s += time.time() - started
        self.curve.append({"step": step, "tokens": step * self.tokens_per_step, "t": round(t, 3),
                           "eval_s": round(self.eval_s, 3), "val_loss": val})
        print(f"step {step} t {t:.1f}s val {val:.4f}", flush=True)

    def train(self, opt: torch.optim.Optimizer, eval_model: nn.Module) -> float:
        """All steps of the run; returns seconds from the barrier to the end of the last validation."""
        train = self.config.train
        for step, (inputs, targets) in zip(range(train.steps), self.batches, strict=False):
            set_lr(opt, lr_at(step, train))
            loss = lm_loss(self.model(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()   # DDP: the gradient all-reduce runs here
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
            opt.step()        # torchft DiLoCo: its optimizer hooks start / finish a fragment's sync here
            if (step + 1) % train.eval_every == 0 or step + 1 == train.steps:
                self.validate(step + 1, eval_model)
        return time.time() - self.t0

    def result(self, train_s: float, **extra: Any) -> dict[str, Any]:
        return {"rank": self.rank, "curve": self.curve, "train_s": round(train_s, 3), "eval_s": round(self.eval_s, 3),
                "steps": self.config.train.steps, "tokens": self.config.train.steps * self.tokens_per_step,
                "peak_rss_bytes": peak_rss_bytes(), **extra}


def run_ddp(spec: dict[str, Any]) -> dict[str, Any]:
    """``DistributedDataParallel`` with its defaults: every step's fp32 gradients all-reduced over gloo."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = RunConfig.from_dict(spec["config"])
    model = Transformer(model_config_for(config.model), seed=config.seed)
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}:{spec['master_port']}",
                            rank=spec["rank"], world_size=spec["world"], timeout=BARRIER_TIMEOUT)
    ddp = DistributedDataParallel(model)   # broadcasts rank 0's weights (equal seeds: equal already)
    trainer = Trainer(spec, ddp)
    opt = build_inner_optimizer(ddp.parameters(), trainer.config.train)
    trainer.validate(0, model)
    dist.barrier()
    trainer.t0 = time.time()
    train_s = trainer.train(opt, model)
    dist.barrier()
    dist.destroy_process_group()
    return trainer.result(train_s)


class _Fragment(nn.Module):
    """A set of the model's own parameters (shared, not copied) as one module, for torchft's DiLoCo."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.params = nn.ParameterDict({name.replace(".", "__"): p for name, p in named})


def run_torchft(spec: dict[str, Any]) -> dict[str, Any]:
    """torchft 0.2.0: one replica group (world size 1) per host, Lighthouse on its own host.

    Set up as torchft's own DiLoCo tests (``torchft/_test/diloco_trainer.py``) do:
    ``ProcessGroupGloo``, ``Manager(use_async_quorum=False, ...)``, one Nesterov SGD outer optimizer
    per fragment, ``DiLoCo(manager, fragments, inner, outers, sync_every=H, ...)``. Outside torchrun,
    this process hosts its group's TCPStore and advertises its own address (``hostname``); equal
    seeds make every replica's weights equal, so ``init_sync=False`` skips the step-0 weight copy.
    """
    from torch.distributed import TCPStore
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    d = spec["diloco"]
    config = RunConfig.from_dict(spec["config"])
    model = Transformer(model_config_for(config.model), seed=config.seed)
    trainer = Trainer(spec, model)
    inner = build_inner_optimizer(model.parameters(), config.train)
    params = dict(model.named_parameters())
    fragments = [_Fragment([(n, params[n]) for n in names])
                 for names in fragment_of_params(model.named_parameters(), d["fragments"])]
    outers = [torch.optim.SGD(f.parameters(), lr=d["outer_lr"], momentum=d["outer_momentum"],
                              nesterov=d["outer_momentum"] > 0) for f in fragments]

    address, port = spec["address"], spec["store_port"]
    store = TCPStore(host_name=address, port=port, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=spec["timeout_s"])

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner_optim": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        min_replica_size=spec["world"],          # every step waits for every host, as DDP does
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        use_async_quorum=False,                  # DiLoCo requires the synchronous quorum
        replica_id=f"wan_{spec['rank']}",
        store_addr=address,
        store_port=port,
        rank=0,
        world_size=1,
        lighthouse_addr=spec["lighthouse"],
        hostname=address,
        port=spec["manager_port"],
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
        init_sync=False,
    )
    try:
        trainer.validate(0, model)
        # The start barrier on host 0's store (keys outside torchft's own "torchft/" prefix).
        barrier = store if spec["rank"] == 0 else TCPStore(
            host_name=spec["master"], port=port, is_master=False, timeout=BARRIER_TIMEOUT)
        barrier.add("wan/ready", 1)
        if spec["rank"] == 0:
            while barrier.add("wan/ready", 0) < spec["world"]:
                time.sleep(0.01)
            barrier.set("wan/go", "1")
        else:
            barrier.wait(["wan/go"], BARRIER_TIMEOUT)
        trainer.t0 = time.time()
        with DiLoCo(manager, fragments, inner, outers, sync_every=d["inner_steps"],
                    backup_device=CPU, pin_memory=False, fragment_sync_delay=d["overlap"],
                    fragment_update_alpha=d["alpha"]):
            train_s = trainer.train(inner, model)
        return trainer.result(train_s, outer_steps=manager.current_step(),
                              batches_committed=manager.batches_committed())
    finally:
        manager.shutdown(wait=False)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    torch.manual_seed(spec["config"]["seed"])
    result = run_ddp(spec) if spec["mode"] == "ddp" else run_torchft(spec)
    path = Path(spec["result"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    sys.stdout.flush()
    # torchft's manager threads and gloo's may hold the interpreter at exit: the result is written
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
