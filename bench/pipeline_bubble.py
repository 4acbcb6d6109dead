"""Pipeline bubble per schedule on CPU: measured idle fraction next to the theoretical one.

    python bench/pipeline_bubble.py [--pp 2] [--microbatches 4 8] [--steps 4] [--layers 8] [--hidden 128] [--seq 128]

Each schedule trains a small DeepSeek-V3-shaped model (MoE layers, MTP) for a few steps with
pp gloo processes, one thread each. On every rank the compute of each stage (the stage's
forward and backward calls, timed around the module and autograd calls, so no communication
or waiting) is summed over a step and compared with the wall time of the pipeline step
(schedule.step): idle = 1 - busy / wall, averaged over ranks and over the steps after the first.

Theory, with forward F, input-backward B and weight-backward W of equal cost per stage
(full backward = B + W = 2F), p ranks, m micro-batches, v stages per rank:
  GPipe, 1F1B            (p-1) / (m + p - 1)
  Interleaved1F1B        (p-1) / (v m + p - 1)
  LoopedBFS              (p-1) / (v m + p - 1)
  InterleavedZeroBubble  (p-1) / (3 v m + p - 1)   (ZB-H1: the bubble shrinks to (p-1)(F+B-W) = (p-1)F)
  ZBVZeroBubble          0                         (ZB-V with F = B = W)
  DualPipeV              0                         (DeepSeek-V3 Table 2: (p/2-1)(F&B + B - 3W) = 0 for p = 2)
On CPU, B and W are not equal to F (and this model's last stage carries the head + MTP), and
gloo point-to-point messages cost real time, so the measured numbers sit above the theory;
what they show is the ordering between schedules. More ranks than cores make the numbers
meaningless: keep --pp at or below the number of cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from parallel.layout import SCHEDULES  # noqa: E402


def theory(name: str, p: int, m: int, v: int) -> float:
    if name in ("GPipe", "1F1B"):
        return (p - 1) / (m + p - 1)
    if name in ("Interleaved1F1B", "LoopedBFS"):
        return (p - 1) / (v * m + p - 1)
    if name == "InterleavedZeroBubble":
        return (p - 1) / (3 * v * m + p - 1)
    return 0.0


@contextlib.contextmanager
def timed_stages(pipe):
    """Per-stage compute seconds (forward and backward calls) of a parallel.pipeline.Pipeline while inside."""
    busy = {stage.stage_index: 0.0 for stage in pipe.stages}
    originals = []
    for stage in pipe.stages:
        fwd, bwd = stage.forward_maybe_with_nosync, stage.backward_maybe_with_nosync

        def timed(fn, idx):
            def wrapped(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    busy[idx] += time.perf_counter() - t0
            return wrapped

        stage.forward_maybe_with_nosync = timed(fwd, stage.stage_index)
        stage.backward_maybe_with_nosync = timed(bwd, stage.stage_index)
        originals.append((stage, fwd, bwd))
    try:
        yield busy
    finally:
        for stage, fwd, bwd in originals:
            stage.forward_maybe_with_nosync, stage.backward_maybe_with_nosync = fwd, bwd


def overrides(args, name: str, m: int, run_dir: str) -> list[str]:
    return [
        "model.vocab_size=512", f"model.hidden_size={args.hidden}", f"model.intermediate_size={2 * args.hidden}",
        f"model.moe_intermediate_size={args.hidden // 2}", f"model.num_hidden_layers={args.layers}", "model.first_k_dense_replace=0",
        "model.num_attention_heads=4", "model.q_lora_rank=64", "model.kv_lora_rank=32",
        "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16", "model.v_head_dim=32",
        "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=4", "model.topk_group=2",
        "model.max_position_embeddings=256", "data.tokenizer_vocab_size=512", "data.max_files=20",
        f"data.cache_dir={args.cache}", f"run.dir={run_dir}", f"train.steps={args.steps}",
        f"train.seq_len={args.seq}", "train.micro_batch_size=2", f"train.grad_accum_steps={m}", "train.threads=1",
        "train.log_interval=1000", "train.sample_prompt=''", "checkpoint.interval=0", "checkpoint.at_end=false",
        "log.progress=false", "log.console=false", f"parallel.pp={args.pp}", "parallel.data_parallel=zero1",
        f"parallel.pipeline_schedule={name}",
    ]


def worker(rank: int, world: int, port: int, args, jobs: list, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from parallel.mesh import init_distributed
    from train.config import load_config
    from train.trainer import Trainer

    rows = []
    for name, m in jobs:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(args, name, m, run_dir))
            ctx = init_distributed(cfg.parallel, cfg.model)
            trainer = Trainer(cfg, ctx)
            pipe = trainer.pipeline
            step = pipe.schedule.step
            walls: list[float] = []

            def timed_step(*a, **k):
                dist.barrier(group=ctx.pp_group)
                t0 = time.perf_counter()
                result = step(*a, **k)
                walls.append(time.perf_counter() - t0)
                return result

            pipe.schedule.step = timed_step
            idle = []
            for i in range(cfg.train.steps):
                with timed_stages(pipe) as busy:
                    trainer.train_step()
                if i > 0:  # the first step includes one-off set-up
                    idle.append(1 - sum(busy.values()) / walls[-1])
            v = len(pipe.stage_ids)
            rows.append((name, m, v, statistics.mean(idle), statistics.mean(walls[1:])))
            dist.barrier()
    torch.save(rows, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "moeforge_bench_cache"))
    args = ap.parse_args()
    from tests.distributed import free_port

    jobs = [(name, m) for m in args.microbatches for name in args.schedules]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(args.pp, free_port(), args, jobs, out), nprocs=args.pp, join=True)
        per_rank = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.pp)]
    print(f"pipeline bubble on CPU/gloo: pp={args.pp} ranks x 1 thread, {args.layers} layers (8 experts, MTP 1), "
          f"hidden {args.hidden}, 2 x {args.seq} tokens per micro-batch, mean of {args.steps - 1} steps after the first")
    print(f"{'schedule':<22} {'m':>3} {'v':>2} {'idle measured':>14} {'idle theory':>12} {'step s':>8}")
    for i, (name, m, v, _, _) in enumerate(per_rank[0]):
        measured = statistics.mean(r[i][3] for r in per_rank)
        wall = statistics.mean(r[i][4] for r in per_rank)
        print(f"{name:<22} {m:>3} {v:>2} {measured:>14.3f} {theory(name, args.pp, m, v):>12.3f} {wall:>8.3f}")


if __name__ == "__main__":
    main()
