"""Where EP2's speed-up goes on a CPU box: the half-batch ceiling, and the cost of moving the bytes.

Issue 15's goal is EP2 on 2 ranks x 1 thread >= 1.7x one rank x 1 thread. This script measures the
three numbers that bound it, on configs/tiny.yaml shapes (seq 256, 8 sequences per step in total, fp32,
the real Trainer, gloo on one machine):
  full     one rank x 1 thread on the whole batch: the peer
  half     one rank x 1 thread on half the batch: the work one EP2 rank would do if communication
           and dispatch were free (per-op overhead that does not shrink with the batch shows up here)
  EP2      2 ranks x 1 thread (dp_shard 2, ep 2), FSDP2 and ZeRO-1, overlap on and off
  replay   the same collectives as one EP2 step (kinds, call counts and bytes from the communication
           ledger) issued alone on 2 ranks with nothing else running: what gloo spends moving them.
           On one CPU box the "network" is memcpy through TCP loopback on the same cores that compute,
           where a GPU cluster moves these bytes with NVLink/RDMA engines beside the SMs.
Per row: median wall time per step and CPU time per step (process time, gloo's threads included),
slowest rank. The ceiling is full / half; the projected EP2 step is half + replay.

python bench/ep_scaling.py [--steps 6] [--warmup 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.expert_parallel import SEQ_LEN  # noqa: E402  (the length step_overrides trains at)

GLOBAL_SEQS = 8
LAYOUTS = {  # name -> (ranks, sequences per step in total, overrides)
    "full (1 rank)": (1, GLOBAL_SEQS, {}),
    "half (1 rank)": (1, GLOBAL_SEQS // 2, {}),
    "EP2 FSDP2 overlap on": (2, GLOBAL_SEQS, {"parallel.dp_shard": 2, "parallel.ep": 2}),
    "EP2 FSDP2 overlap off": (2, GLOBAL_SEQS, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.ep_overlap": "false"}),
    "EP2 ZeRO-1 overlap on": (2, GLOBAL_SEQS, {"parallel.dp_shard": 2, "parallel.ep": 2,
                                               "parallel.data_parallel": "zero1"}),
}


def step_rank(rank: int, ranks: int, seqs: int, extra: dict, steps: int, warmup: int, run_dir: str) -> dict:
    from bench.expert_parallel import step_overrides, tiny_trainer

    overrides = step_overrides(run_dir, seqs // ranks, warmup + steps, extra=extra)
    wall, cpu, comm = [], [], {}
    with tiny_trainer(overrides) as trainer:
        for i in range(warmup + steps):
            w0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step()
            if i >= warmup:
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
                comm = m.get("comm", {}).get("by", {})
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "comm": comm}


def replay_rank(rank: int, comm: dict, repeats: int) -> dict:
    """Issue `comm`'s collectives (calls and bytes per kind) on fp32 buffers, alone; best of `repeats`."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # run_ranks set torchrun's environment variables
    world = dist.get_world_size()
    try:
        plan = []
        for key, v in comm.items():
            kind = key.split("/")[0]
            calls, nbytes = int(v.get("calls", 0)), int(v.get("bytes", 0))
            if calls and nbytes and kind in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
                plan.append((kind, calls, max(nbytes // calls // 4 // world * world, world)))
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            w0 = time.perf_counter()
            for kind, calls, numel in plan:
                x = torch.ones(numel)
                for _ in range(calls):
                    if kind == "all_to_all":
                        dist.all_to_all_single(torch.empty_like(x), x)
                    elif kind == "all_gather":
                        dist.all_gather_into_tensor(torch.empty(numel * world), x)
                    elif kind == "reduce_scatter":
                        dist.reduce_scatter_tensor(torch.empty(numel // world), x)
                    else:
                        dist.all_reduce(x)
            best = min(best, time.perf_counter() - w0)
        return {"replay_s": best}
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.distributed import run_ranks

    rows = []
    for name, (ranks, seqs, extra) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            per_rank = run_ranks(ranks, step_rank, ranks, seqs, extra, args.steps, args.warmup, run_dir, timeout=1800)
        slow = max(per_rank, key=lambda r: r["wall_s"])
        row = {"layout": name, "wall_s": slow["wall_s"], "cpu_s": max(r["cpu_s"] for r in per_rank),
               "comm": per_rank[0]["comm"], "load": os.getloadavg()[0]}
        if ranks == 2:
            row["replay_s"] = max(r["replay_s"] for r in run_ranks(2, replay_rank, row["comm"], 3, timeout=900))
        rows.append(row)
    full, half = rows[0]["wall_s"], rows[1]["wall_s"]
    for row in rows:
        row["speedup_vs_full"] = full / row["wall_s"]
        if "replay_s" in row:
            row["projected_step_s"] = half + row["replay_s"]
            row["projected_speedup"] = full / row["projected_step_s"]
    if args.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "comm"}))
        return 0
    print(f"tiny model, seq {SEQ_LEN}, {GLOBAL_SEQS} seq/step, fp32, 1 thread per rank, gloo")
    print(f"ceiling if communication and dispatch were free: full / half = {full / half:.2f}x")
    for row in rows:
        mb = sum(v.get("bytes", 0) for v in row["comm"].values()) / 1e6
        line = (f"{row['layout']:24s} wall {row['wall_s'] * 1e3:6.0f} ms  cpu {row['cpu_s'] * 1e3:6.0f} ms  "
                f"x{row['speedup_vs_full']:.2f} of full  comm {mb:6.1f} MB/step  load {row['load']:.1f}")
        if "replay_s" in row:
            line += (f"\n{'':24s} replaying its collectives alone: {row['replay_s'] * 1e3:.0f} ms  ->  half + replay = "
                     f"{row['projected_step_s'] * 1e3:.0f} ms (x{row['projected_speedup']:.2f})")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
