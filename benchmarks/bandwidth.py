"""Bytes on the wire vs loss: data-parallel, DiLoCo, Streaming DiLoCo (fp4 and sparse), hivemind backend.

Same tiny model, same tokens, same data and the same number of replicas for every
mode, in one process. Each replica trains a full copy of the model on its own
disjoint shard of the training split (``Corpus.train_shard``) with the inner AdamW
and schedule of node/train/optim.py; every mode sees the same total batch per step
(replicas x batch sequences) and the same number of steps.

Modes:
- ``ddp``: one model; each step, the replicas' fp32 gradients are averaged (here:
  the loss on the concatenated batch, which is the same mean). Its AdamW lr is
  tuned on its own (``--ddp-lr``, best of a sweep; see bandwidth.md), as is the
  replicas' inner lr (``--lr``).
- ``diloco``: H inner steps, then the whole model's pseudo-gradient is averaged in
  fp32 (P=1, no overlap, alpha 0, outer lr 0.7).
- ``streaming``: P strided fragments with offsets spread over H, overlap tau=1,
  alpha 0.5, outer lr 0.7, fp4 codec.
- ``sparse``: the streaming schedule and overlap with SparseLoCo's outer update
  (``protocols/sparse.py``): per fragment, chunked top-k of β·e + Δ with 1-2 bit values and
  bit-packed indices, error feedback in place of outer momentum, plain outer SGD; owners
  re-sparsify the mean of the (differently placed) parts, keeping more entries than a part
  (``--sparse-reply-topk``), and every replica applies that reply.
- ``hivemind``: the streaming outer loop averaged through hivemind's
  DecentralizedAverager (hivemind has no 4-bit codec: 8-bit uniform quantization).

How bytes are counted (the same rule for every mode): bytes a replica puts on the
wire for averaging, summed over replicas.
- grpc modes (diloco, streaming, sparse): the serialized size (protobuf ``ByteSize``) of
  every ReduceShard message actually sent over loopback gRPC: parts sent by each
  replica to the other shard owners, and averaged shards each owner sends back.
  That is reduce-scatter + all-gather: 2(n-1)/n x the encoded fragment per replica.
- ddp: no messages are sent in this single-process stand-in; it is charged what a
  ring all-reduce of the fp32 gradient sends: 2(n-1)/n x 4 bytes x parameters per
  replica per step (no framing: a lower bound, which favours ddp).
- hivemind: the serialized compressed tensor hivemind sends, times 2(n-1)/n per
  replica (hivemind's butterfly all-reduce is also reduce-scatter + all-gather).
HTTP/2 and libp2p framing are not counted anywhere.

``peak_step_bytes`` is the most bytes (all replicas) started in a single step.
``val_loss`` is the mean over replicas of each replica's local model on the fixed
validation batches (ddp: its one model) after the last step; no extra exchange.
``init_val_loss`` is the shared starting point's; ``streaming_progress_vs_ddp`` =
(init - streaming) / (init - ddp): the share of ddp's progress over the measured
steps that streaming made. Every mode's ``loss_gap`` is val_loss / ddp's - 1.

Protocols: by default every mode continues from one shared init trained
``--warm-start-steps`` steps (the DiLoCo paper's protocol); ``--from-scratch`` starts
every mode from the random init instead.

    python benchmarks/bandwidth.py --json
    python benchmarks/bandwidth.py --json --from-scratch
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from lowband.node.sync.diloco import StreamingDiLoCo, SyncJob
from lowband.node.sync.grpc_averager import ChannelPool, ShardReducer, allreduce_mean
from lowband.node.train.data import BatchIterator, load_corpus, val_batches
from lowband.node.train.model import ModelConfig, Transformer
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
from lowband.protocols import node_pb2_grpc
from lowband.protocols.config import DilocoSection, TrainSection
from lowband.protocols.rpc import TokenAuthInterceptor, grpc_options

logger = logging.getLogger("bandwidth")
TOKEN = "bandwidth-benchmark"
MODES = ("ddp", "diloco", "streaming", "sparse", "hivemind")


@dataclass
class Setup:
    replicas: int
    steps: int
    batch: int
    seq_len: int
    train: TrainSection
    model: ModelConfig
    seed: int
    eval_batches: int


@dataclass
class Replica:
    model: Transformer
    opt: torch.optim.Optimizer
    batches: BatchIterator
    diloco: StreamingDiLoCo | None = None


@dataclass
class ModeResult:
    bytes_sent: int = 0
    peak_step_bytes: int = 0
    val_loss: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {"bytes_sent": self.bytes_sent, "peak_step_bytes": self.peak_step_bytes,
               "val_loss": round(self.val_loss, 5), "seconds": round(self.seconds, 1)}
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------- shared pieces


def make_replicas(setup: Setup, corpus: Any, init: Transformer) -> list[Replica]:
    reps = []
    for i in range(setup.replicas):
        model = copy.deepcopy(init)
        reps.append(Replica(
            model=model,
            opt=build_inner_optimizer(model.parameters(), setup.train),
            batches=BatchIterator(corpus.train_shard(i, setup.replicas), setup.batch, setup.seq_len,
                                  seed=setup.seed + i),
        ))
    return reps


def inner_step(rep: Replica, lr: float, grad_clip: float) -> float:
    inputs, targets = next(rep.batches)
    set_lr(rep.opt, lr)
    rep.opt.zero_grad(set_to_none=True)
    loss = rep.model.loss(inputs, targets)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(rep.model.parameters(), grad_clip)
    rep.opt.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(models: list[Transformer], val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    losses = []
    for model in models:
        model.eval()
        losses.append(sum(float(model.loss(x, y)) for x, y in val) / len(val))
        model.train()
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- ddp


def run_ddp(setup: Setup, corpus: Any, init: Transformer, val: list) -> ModeResult:
    reps = make_replicas(setup, corpus, init)
    model = reps[0].model
    opt = reps[0].opt
    n = setup.replicas
    numel = sum(p.numel() for p in model.parameters())
    per_step = n * int(2 * (n - 1) / n * 4 * numel)   # ring all-reduce of fp32 grads, all replicas
    for step in range(setup.steps):
        parts = [next(r.batches) for r in reps]
        inputs = torch.cat([p[0] for p in parts])
        targets = torch.cat([p[1] for p in parts])
        set_lr(opt, lr_at(step, setup.train))
        opt.zero_grad(set_to_none=True)
        model.loss(inputs, targets).backward()   # mean over all replicas' sequences = averaged gradient
        if setup.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup.train.grad_clip)
        opt.step()
    return ModeResult(bytes_sent=per_step * setup.steps, peak_step_bytes=per_step, val_loss=evaluate([model], val))


# --------------------------------------------------------------------------- exchangers


class _ReduceOnlyServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, reducer: ShardReducer) -> None:
        self.reducer = reducer

    async def ReduceShard(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for reply in self.reducer.handle(request_iterator, context):
            yield reply


class GrpcExchanger:
    """One ReduceShard server per replica on loopback; averages a step's jobs with allreduce_mean."""

    def __init__(self, n: int, cfg: DilocoSection) -> None:
        self.n = n
        self.cfg = cfg
        self.reducers = [ShardReducer.from_config(cfg, node_id=f"r{i}") for i in range(n)]
        self.pools = [ChannelPool(TOKEN) for _ in range(n)]
        self.servers: list[grpc.aio.Server] = []
        self.peers: list[str] = []

    async def start(self) -> None:
        for reducer in self.reducers:
            server = grpc.aio.server(interceptors=[TokenAuthInterceptor(TOKEN)], options=grpc_options())
            node_pb2_grpc.add_NodeServicer_to_server(_ReduceOnlyServicer(reducer), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)
            self.peers.append(f"127.0.0.1:{port}")

    async def exchange(self, jobs: list[SyncJob]) -> tuple[list[tuple[torch.Tensor | None, Any]], int]:
        before = sum(r.bytes_sent for r in self.reducers)
        results = await asyncio.gather(*(
            allreduce_mean(self.peers, i, job.delta, round_id=job.step, codec=self.cfg.codec,
                           timeout_s=self.cfg.peer_timeout_s, reducer=self.reducers[i], channels=self.pools[i],
                           fragment=job.fragment, outer_step=job.outer_step, sender_id=f"r{i}",
                           contribute=job.finite, sparse=job.sparse)
            for i, job in enumerate(jobs)))
        sent = sum(stats.bytes_sent for _, stats in results) + sum(r.bytes_sent for r in self.reducers) - before
        return [(avg, stats.valid) for avg, stats in results], sent

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        for server in self.servers:
            await server.stop(0)


class HivemindExchanger:
    """One hivemind DHT + per-fragment DecentralizedAverager per replica."""

    def __init__(self, n: int, cfg: DilocoSection, fragment_numels: list[int]) -> None:
        from lowband.node.sync.hivemind_averager import (
            HivemindAverager,  # optional dependency, imported only for this mode
        )

        self.cfg = cfg
        self.averagers: list[Any] = []
        first = HivemindAverager(fragment_numels, run_id="bw", stage=0, codec=cfg.codec, target_group_size=n,
                                 min_group_size=n)
        self.averagers.append(first)
        for _ in range(n - 1):
            self.averagers.append(HivemindAverager(fragment_numels, run_id="bw", stage=0, codec=cfg.codec,
                                                   target_group_size=n, min_group_size=n,
                                                   initial_peers=first.maddrs))

    async def start(self) -> None:
        return None

    async def exchange(self, jobs: list[SyncJob]) -> tuple[list[tuple[torch.Tensor | None, Any]], int]:
        results = await asyncio.gather(*(
            a.average_async(job.fragment, job.delta, timeout_s=4 * self.cfg.peer_timeout_s, contribute=job.finite)
            for a, job in zip(self.averagers, jobs, strict=True)))
        return [(avg, None) for avg, _ in results], sum(stats.bytes_sent for _, stats in results)

    async def close(self) -> None:
        for a in self.averagers:
            await asyncio.to_thread(a.shutdown)


# --------------------------------------------------------------------------- outer loop


async def run_outer(setup: Setup, corpus: Any, init: Transformer, val: list, cfg: DilocoSection,
                    make_exchanger: Callable[[list[Replica]], Any]) -> ModeResult:
    reps = make_replicas(setup, corpus, init)
    for rep in reps:
        rep.diloco = StreamingDiLoCo(rep.model, cfg)
    exchanger = make_exchanger(reps)
    await exchanger.start()
    result = ModeResult()
    step_bytes: dict[int, int] = {}
    in_flight: dict[int, tuple[list[SyncJob], asyncio.Task]] = {}
    failed = 0

    def train_all(step: int) -> None:
        lr = lr_at(step - 1, setup.train)
        for rep in reps:
            inner_step(rep, lr, setup.train.grad_clip)

    async def finish(started: int) -> None:
        nonlocal failed
        jobs, task = in_flight.pop(started)
        results, sent = await task
        step_bytes[started] = sent
        for rep, job, (avg, valid) in zip(reps, jobs, results, strict=True):
            failed += avg is None
            rep.diloco.finish_sync(job, avg, valid)

    try:
        for step in range(1, setup.steps + 1):
            # the exchange started last step runs on the event loop while this step computes
            await asyncio.to_thread(train_all, step)
            jobs = [rep.diloco.begin_sync(step) for rep in reps]
            if jobs[0] is not None:
                in_flight[step] = (jobs, asyncio.ensure_future(exchanger.exchange(jobs)))  # type: ignore[arg-type]
            for started in sorted(s for s in in_flight if s + cfg.overlap <= step):
                await finish(started)
        for started in sorted(in_flight):
            await finish(started)
    finally:
        await exchanger.close()
    result.bytes_sent = sum(step_bytes.values())
    result.peak_step_bytes = max(step_bytes.values(), default=0)
    result.val_loss = evaluate([r.model for r in reps], val)
    # for information: θ_global itself (stale by up to H steps per fragment in streaming mode)
    global_model = copy.deepcopy(reps[0].model)
    with torch.no_grad():
        for name, p in global_model.named_parameters():
            p.copy_(reps[0].diloco.global_params[name])
    val_global = evaluate([global_model], val)
    result.extra = {"syncs": len(step_bytes), "failed_exchanges": failed, "val_loss_global": round(val_global, 5),
                    "fragment_numels": [sum(reps[0].diloco.params[n].numel() for n in f)
                                        for f in reps[0].diloco.fragments]}
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--batch", type=int, default=8, help="sequences per replica per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="inner AdamW lr of the diloco/streaming/hivemind replicas (batch --batch each)")
    parser.add_argument("--ddp-lr", type=float, default=2e-3,
                        help="ddp AdamW lr (tuned separately: ddp steps on the replicas' averaged gradient)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=12, help="H")
    parser.add_argument("--fragments", type=int, default=3, help="P (streaming)")
    parser.add_argument("--diloco-outer-lr", type=float, default=0.7)
    parser.add_argument("--diloco-outer-momentum", type=float, default=0.9)
    parser.add_argument("--streaming-outer-lr", type=float, default=0.7)
    parser.add_argument("--streaming-outer-momentum", type=float, default=0.9)
    parser.add_argument("--alpha", type=float, default=0.5, help="streaming: merge mixing (issue 6: 0.5)")
    parser.add_argument("--overlap", type=int, default=1, help="streaming: tau, steps the exchange overlaps")
    parser.add_argument("--streaming-codec", default="fp4")
    parser.add_argument("--hivemind-codec", default="int8")
    parser.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=False,
                        help="streaming: carry fp4 quantization error into the next send")
    parser.add_argument("--sparse-outer-lr", type=float, default=2.0,
                        help="sparse: outer SGD lr (no momentum; best of 1 / 2 / 3, bandwidth.md)")
    parser.add_argument("--sparse-alpha", type=float, default=0.0,
                        help="sparse: merge mixing (0: the unsent rest is owed in the error feedback only)")
    parser.add_argument("--sparse-inner-steps", type=int, default=0, help="sparse: H (0: --inner-steps)")
    parser.add_argument("--sparse-chunk", type=int, default=4096)
    parser.add_argument("--sparse-topk", type=int, default=320,
                        help="sparse: entries kept per chunk (7.8%%; best of 64 / 160 / 320 / 448)")
    parser.add_argument("--sparse-bits", type=int, default=2)
    parser.add_argument("--sparse-error-decay", type=float, default=0.9,
                        help="sparse: β of the error feedback (best of 0.8 / 0.9 / 0.95 / 1)")
    parser.add_argument("--sparse-outer-momentum", type=float, default=0.0,
                        help="sparse: Nesterov momentum on the averaged sparse update (0: none, SparseLoCo)")
    parser.add_argument("--sparse-reply-topk", type=int, default=800,
                        help="sparse: entries an owner's reply keeps per chunk (0: --sparse-topk; best of 320 / 640 / "
                             "800 within 400x of ddp's bytes)")
    parser.add_argument("--sparse-outer-lr-final", type=float, default=3.0,
                        help="sparse: ramp the outer lr linearly from --sparse-outer-lr to this (0: constant; "
                             "best of constant 2 / 2.5 / 3 and 2 -> 3 over 20 / 40)")
    parser.add_argument("--sparse-outer-lr-ramp", type=int, default=40,
                        help="sparse: outer steps per fragment the ramp takes (40: the whole default run)")
    parser.add_argument("--sparse-lr", type=float, default=0.0, help="sparse: inner AdamW lr (0: --lr)")
    parser.add_argument("--robust", default="off", choices=("off", "clip", "auto"),
                        help="diloco.robust of the grpc modes: off (default) measures the algorithms with the plain "
                             "mean the recorded figures used; auto/clip add the owners' robust aggregation")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--data-bytes", type=int, default=4 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-start-steps", type=int, default=1500,
                        help="first train one shared init this many steps (single model, not counted in any mode; "
                             "the DiLoCo paper's protocol of starting every method from one pretrained checkpoint)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="no warm start: every mode starts from the random init (--warm-start-steps 0)")
    parser.add_argument("--warm-start-batch", type=int, default=16)
    parser.add_argument("--warm-start-lr", type=float, default=2e-3)
    parser.add_argument("--init-cache", default="",
                        help="tuning aid: load the warm-started init from this file if it exists, else save it there")
    args = parser.parse_args(argv)
    if args.from_scratch:
        args.warm_start_steps = 0

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")

    train = TrainSection(lr=args.lr, warmup_steps=args.warmup, steps=args.steps, microbatch_size=args.batch,
                         microbatches=1)
    model_cfg = ModelConfig.from_preset("tiny", dim=args.dim, n_layers=args.layers, ffn_hidden=args.ffn,
                                        max_seq_len=max(args.seq_len, 64))
    setup = Setup(replicas=args.replicas, steps=args.steps, batch=args.batch, seq_len=args.seq_len, train=train,
                  model=model_cfg, seed=args.seed, eval_batches=args.eval_batches)
    corpus = load_corpus(seed=args.seed, max_bytes=args.data_bytes)
    val = val_batches(corpus, 16, args.seq_len, args.eval_batches)
    torch.manual_seed(args.seed)
    init = Transformer(model_cfg, seed=args.seed)
    if args.init_cache and Path(args.init_cache).exists():
        init.load_state_dict(torch.load(args.init_cache))
        logger.info("init loaded from %s", args.init_cache)
    elif args.warm_start_steps:
        warm = dataclasses.replace(train, steps=args.warm_start_steps, lr=args.warm_start_lr)
        warm_setup = dataclasses.replace(setup, replicas=1, batch=args.warm_start_batch, train=warm)
        # its own data stream (seed offset), the same for every mode
        pre = make_replicas(dataclasses.replace(warm_setup, seed=args.seed + 1000), corpus, init)[0]
        for step in range(args.warm_start_steps):
            inner_step(pre, lr_at(step, warm), warm.grad_clip)
        init = pre.model
        logger.info("warm start: %d steps, val loss %.4f", args.warm_start_steps, evaluate([init], val))
        if args.init_cache:
            torch.save(init.state_dict(), args.init_cache)
    init_val_loss = evaluate([init], val)
    h = args.inner_steps
    diloco_cfg = DilocoSection(inner_steps=h, fragments=1, overlap=0, alpha=0.0, outer_lr=args.diloco_outer_lr,
                               outer_momentum=args.diloco_outer_momentum, codec="fp32", peer_timeout_s=30.0,
                               robust=args.robust)
    streaming_cfg = DilocoSection(inner_steps=h, fragments=args.fragments, overlap=args.overlap, alpha=args.alpha,
                                  outer_lr=args.streaming_outer_lr, outer_momentum=args.streaming_outer_momentum,
                                  codec=args.streaming_codec, peer_timeout_s=30.0, error_feedback=args.error_feedback,
                                  robust=args.robust)
    hivemind_cfg = dataclasses.replace(streaming_cfg, codec=args.hivemind_codec, backend="hivemind")
    sparse_cfg = DilocoSection(inner_steps=args.sparse_inner_steps or h, fragments=args.fragments, overlap=args.overlap,
                               alpha=args.sparse_alpha, outer_lr=args.sparse_outer_lr, outer_momentum=0.0,
                               outer_lr_final=args.sparse_outer_lr_final, outer_lr_ramp=args.sparse_outer_lr_ramp,
                               codec="sparse", peer_timeout_s=30.0, robust=args.robust, sparse_chunk=args.sparse_chunk,
                               sparse_topk=args.sparse_topk, sparse_bits=args.sparse_bits,
                               sparse_error_decay=args.sparse_error_decay,
                               sparse_outer_momentum=args.sparse_outer_momentum,
                               sparse_reply_topk=args.sparse_reply_topk)

    results: dict[str, ModeResult] = {}
    for mode in modes:
        started = time.monotonic()
        if mode == "ddp":
            ddp_setup = dataclasses.replace(setup, train=dataclasses.replace(train, lr=args.ddp_lr or args.lr))
            res = run_ddp(ddp_setup, corpus, init, val)
        elif mode == "diloco":
            res = asyncio.run(run_outer(setup, corpus, init, val, diloco_cfg,
                                        lambda reps: GrpcExchanger(args.replicas, diloco_cfg)))
        elif mode == "streaming":
            res = asyncio.run(run_outer(setup, corpus, init, val, streaming_cfg,
                                        lambda reps: GrpcExchanger(args.replicas, streaming_cfg)))
        elif mode == "sparse":
            sparse_setup = dataclasses.replace(setup, train=dataclasses.replace(train, lr=args.sparse_lr or args.lr))
            res = asyncio.run(run_outer(sparse_setup, corpus, init, val, sparse_cfg,
                                        lambda reps: GrpcExchanger(args.replicas, sparse_cfg)))
        else:
            res = asyncio.run(run_outer(
                setup, corpus, init, val, hivemind_cfg,
                lambda reps: HivemindExchanger(args.replicas, hivemind_cfg,
                                               [sum(reps[0].diloco.params[n].numel() for n in f)
                                                for f in reps[0].diloco.fragments])))
        res.seconds = time.monotonic() - started
        results[mode] = res
        logger.info("%s: %s", mode, res.as_json())

    out: dict[str, Any] = {
        "modes": {m: r.as_json() for m, r in results.items()},
        "setup": {"replicas": args.replicas, "steps": args.steps, "batch_per_replica": args.batch,
                  "seq_len": args.seq_len, "params": sum(p.numel() for p in init.parameters()),
                  "inner_steps": h, "fragments": args.fragments, "lr": args.lr,
                  "ddp_lr": args.ddp_lr or args.lr, "streaming_codec": args.streaming_codec,
                  "hivemind_codec": args.hivemind_codec, "error_feedback": args.error_feedback,
                  "diloco_outer_lr": args.diloco_outer_lr,
                  "diloco_outer_momentum": args.diloco_outer_momentum, "streaming_outer_lr": args.streaming_outer_lr,
                  "streaming_outer_momentum": args.streaming_outer_momentum, "alpha": args.alpha,
                  "overlap": args.overlap, "robust": args.robust,
                  "sparse": {"inner_steps": sparse_cfg.inner_steps, "alpha": args.sparse_alpha,
                             "outer_lr": args.sparse_outer_lr, "outer_lr_final": args.sparse_outer_lr_final,
                             "outer_lr_ramp": args.sparse_outer_lr_ramp, "chunk": args.sparse_chunk, "topk": args.sparse_topk,
                             "bits": args.sparse_bits, "error_decay": args.sparse_error_decay,
                             "outer_momentum": args.sparse_outer_momentum,
                             "reply_topk": args.sparse_reply_topk or args.sparse_topk,
                             "lr": args.sparse_lr or args.lr},
                  "protocol": "from-scratch" if args.warm_start_steps == 0 else "warm-start", "seed": args.seed,
                  "warm_start_steps": args.warm_start_steps},
        "init_val_loss": round(init_val_loss, 5),
    }
    if "ddp" in results and "streaming" in results:
        ddp, streaming = results["ddp"], results["streaming"]
        out["streaming_bytes_reduction"] = round(ddp.bytes_sent / max(1, streaming.bytes_sent), 2)
        out["streaming_loss_gap"] = round(streaming.val_loss / ddp.val_loss - 1, 5)
        # how much of ddp's progress over the measured steps streaming made (1.0: all of it)
        out["streaming_progress_vs_ddp"] = round((init_val_loss - streaming.val_loss)
                                                 / max(1e-9, init_val_loss - ddp.val_loss), 4)
    if "diloco" in results and "streaming" in results:
        out["streaming_peak_reduction_vs_diloco"] = round(
            results["diloco"].peak_step_bytes / max(1, results["streaming"].peak_step_bytes), 2)
    if "ddp" in results:
        ddp_loss = results["ddp"].val_loss
        for mode, res in results.items():
            out["modes"][mode]["loss_gap"] = round(res.val_loss / ddp_loss - 1, 5)
            out["modes"][mode]["bytes_reduction_vs_ddp"] = round(results["ddp"].bytes_sent / max(1, res.bytes_sent), 2)
    if "ddp" in results and "sparse" in results:
        out["sparse_bytes_reduction"] = round(results["ddp"].bytes_sent / max(1, results["sparse"].bytes_sent), 2)
        out["sparse_loss_gap"] = round(results["sparse"].val_loss / results["ddp"].val_loss - 1, 5)
    if "streaming" in results and "sparse" in results:
        out["sparse_minus_streaming_val_loss"] = round(results["sparse"].val_loss - results["streaming"].val_loss, 5)
    if "ddp" in results and "diloco" in results:
        out["diloco_loss_gap"] = round(results["diloco"].val_loss / results["ddp"].val_loss - 1, 5)
    if not all(math.isfinite(r.val_loss) for r in results.values()):
        logger.error("a mode diverged (non-finite validation loss)")
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
