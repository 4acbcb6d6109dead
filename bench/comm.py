"""Communication of the expert-parallel layouts on CPU: bytes per token, exposed all-to-all time, speed.

Layouts (configs/tiny.yaml shapes, seq 256, 8 sequences per step in total, fp32, the real Trainer,
one thread per rank, gloo):
  EP2          2 ranks: dp_shard 2, ep 2, FSDP2
  EP4          4 ranks: dp_shard 4, ep 4, FSDP2
  node 2x2     node-limited routing on 2 "nodes" x 2 ranks (issue 15 part B: runs once
               parallel.ep_ranks_per_node exists, else printed as 'not built' with the reason)
  TP2+SP       2 ranks: tp 2 with parallel.sequence_parallel (each tp rank routes its half of the
               sequence; no all-to-all: the row shows SP's collectives over tp instead)
  TP2xEP2      4 ranks: tp 2, dp_shard 2, ep 2, with sequence parallelism (the default): each tp rank
               routes and dispatches its own sequence shard

Per layout, per token and per MoE layer (forward; the backward moves the same rows back):
  naive dispatch   one row per kept (token, expert) assignment: what the dispatcher sent before
                   deduplication (H x 4 bytes per assignment)
  dispatch         one row per (token, rank holding any of its experts) plus its int8 slot map, and
                   the split-size exchange (8 x ep bytes per rank and call), measured
  min dispatch     the layout's theoretical minimum for this routing: each token's hidden state once
                   per distinct destination rank, nothing else
  fp8 dispatch     not built (issue 15: FP8 payload + 1x128 tile scales): printed as such
  combine          the gates (fp32 per slot) and one returned row per pair
Under tp: `routed_tokens_per_rank` (tokens the routers of one rank saw per step, per MoE layer call,
counted by a hook on every router: B x S / tp with SP) and `tp_bytes_per_token` (the ledger's
all-gathers, reduce-scatters and all-reduces over tp, forward and backward, per token of the rank's
tp group and per step).
The pairs and assignments are counted by wrapping parallel.expert_parallel.pairs_per_rank inside the
bench process; the all-to-all bytes and the exposed all-to-all time (`wait_s`: the whole duration of
synchronous all-to-alls plus the blocked part of async waits, forward and backward) come from the
communication ledger (parallel/comm_ledger.py), with parallel.ep_overlap off and on. tokens/s is
the trainer's, against one rank x 1 thread on the same global batch. The machine is shared: the
load average is printed; numbers are medians over the measured steps, mean over ranks.

python bench/comm.py [--steps 4] [--warmup 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

GLOBAL_SEQS = 8
SEQ_LEN = 256
COUNTS = {"tokens": 0, "pairs": 0, "assignments": 0, "dispatches": 0, "routed": 0, "router_calls": 0}

LAYOUTS = {  # name -> (ranks, overrides) or None when the layout needs issue 15 part B
    "EP2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2}),
    "EP4": (4, {"parallel.dp_shard": 4, "parallel.ep": 4}),
    "node-limited 2x2": None,  # PART_B
    "TP2+SP": (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    "TP2xEP2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.ep": 2}),
}


PART_B = {  # layout -> (ranks, overrides, the config key it needs from issue 15 part B)
    "node-limited 2x2": (4, {"parallel.dp_shard": 4, "parallel.ep": 4, "parallel.ep_ranks_per_node": 2},
                         "ep_ranks_per_node"),
}


def missing_part_b(name: str) -> Optional[str]:
    """Why `name` cannot run in this checkout, or None when its part-B config key exists."""
    from train.config import ParallelConfig

    key = PART_B[name][2]
    if hasattr(ParallelConfig(), key):
        return None
    return f"parallel.{key} does not exist here: issue 15 part B (branch seqpar) has not landed on main"


def count_pairs() -> None:
    """Count tokens, (token, rank) pairs and kept assignments of every dispatch in this process."""
    import parallel.expert_parallel as ep

    inner = ep.pairs_per_rank

    def counted(topk_idx, keep, experts_per_rank, n_ranks):
        out = inner(topk_idx, keep, experts_per_rank, n_ranks)
        if torch.is_grad_enabled():
            COUNTS["tokens"] += topk_idx.shape[0]
            COUNTS["pairs"] += out[1].numel()
            COUNTS["assignments"] += topk_idx.numel() if keep is None else int(keep.sum())
            COUNTS["dispatches"] += 1
        return out

    ep.pairs_per_rank = counted


def count_routed(module, args, out) -> None:
    if torch.is_grad_enabled():
        COUNTS["routed"] += args[0].shape[0]
        COUNTS["router_calls"] += 1


def bench_rank(rank: int, ranks: int, extra: dict, overlap: bool, steps: int, warmup: int, run_dir: str) -> dict:
    from bench.expert_parallel import tiny_trainer

    count_pairs()
    tp = int(extra.get("parallel.tp", 1))
    dp = ranks // tp
    overrides = [
        f"run.dir={run_dir}", f"train.seq_len={SEQ_LEN}", f"train.micro_batch_size={GLOBAL_SEQS // dp}",
        "train.grad_accum_steps=1", "train.precision=fp32", "train.threads=1", f"train.steps={warmup + steps}",
        "train.sample_prompt=''", "checkpoint.interval=0", "checkpoint.at_end=false", "log.console=false",
        "log.progress=false", "data.max_files=200", f"parallel.ep_overlap={str(overlap).lower()}",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    rows = []
    with tiny_trainer(overrides) as trainer:
        from models.moe import moe_layers

        for layer in moe_layers(trainer.model):
            layer.gate.register_forward_hook(count_routed)
        for i in range(warmup + steps):
            for k in COUNTS:
                COUNTS[k] = 0
            m = trainer.train_step()
            if i >= warmup:
                by = m.get("comm", {}).get("by", {})
                a2a = by.get("all_to_all/ep", {})
                tp_bytes = sum(v["bytes"] for k, v in by.items() if k.endswith("/tp"))
                rows.append({"step_s": m["step_time_s"], "a2a_bytes": a2a.get("bytes", 0), "tp_bytes": tp_bytes,
                             "a2a_wait_s": a2a.get("wait_s", 0.0), **{k: float(v) for k, v in COUNTS.items()}})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run(ranks: int, extra: dict, overlap: bool, steps: int, warmup: int) -> dict:
    from tests.distributed import run_ranks

    with tempfile.TemporaryDirectory() as run_dir:
        per_rank = run_ranks(ranks, bench_rank, ranks, extra, overlap, steps, warmup, run_dir, timeout=1800)
    return {k: statistics.fmean(r[k] for r in per_rank) for k in per_rank[0]}


def bytes_per_token(r: dict, ep: int, hidden: int, top_k: int) -> dict:
    """Per token per MoE layer, forward (see the module docstring)."""
    tokens = max(r["tokens"], 1)  # summed over the step's dispatches (layers x micro-batches)
    row = hidden * 4
    return {
        "naive_dispatch_bytes_per_token": r["assignments"] * row / tokens,
        "dispatch_bytes_per_token": (r["pairs"] * (row + top_k) + 8 * ep * r["dispatches"]) / tokens,
        "min_dispatch_bytes_per_token": r["pairs"] * row / tokens,
        "combine_bytes_per_token": r["pairs"] * (row + 4 * top_k) / tokens,
        "naive_combine_bytes_per_token": r["assignments"] * row / tokens,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--only", nargs="*", default=None, help="layout names to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per layout")
    args = parser.parse_args(argv)
    from train.config import load_config

    mc = load_config(REPO / "configs" / "tiny.yaml", []).model
    load_before = os.getloadavg()
    single = run(1, {}, False, args.steps, args.warmup)
    base_tps = GLOBAL_SEQS * SEQ_LEN / single["step_s"]
    results = []
    for name, spec in LAYOUTS.items():
        if args.only and name not in args.only:
            continue
        if spec is None:
            why = missing_part_b(name)
            if why is not None:
                results.append({"layout": name, "not_built": why, "dispatch_bytes_per_token": None,
                                "naive_dispatch_bytes_per_token": None, "min_dispatch_bytes_per_token": None,
                                "tokens_per_s_ratio": None})
                continue
            spec = PART_B[name][:2]
        ranks, extra = spec
        off = run(ranks, extra, False, args.steps, args.warmup)
        on = run(ranks, extra, True, args.steps, args.warmup)
        tp = int(extra.get("parallel.tp", 1))
        b = bytes_per_token(on, int(extra.get("parallel.ep", 1)), mc.hidden_size, mc.num_experts_per_tok)
        tp_group_tokens = GLOBAL_SEQS * SEQ_LEN * tp / ranks  # the tokens one tp group trains per step
        measured = on["a2a_bytes"] / max(on["tokens"], 1) / 2  # the ledger: forward and backward move the same
        results.append({
            "layout": name, **b,
            "routed_tokens_per_rank": on["routed"] / max(on["router_calls"], 1),
            "tp_bytes_per_token": on["tp_bytes"] / tp_group_tokens if tp > 1 else None,
            "ratio_to_min": b["dispatch_bytes_per_token"] / max(b["min_dispatch_bytes_per_token"], 1e-9),
            "fp8_dispatch_bytes_per_token": None, "fp8_dispatch": "not built",
            "ledger_dispatch_plus_combine_bytes_per_token": measured,  # cross-check of the two above
            "exposed_all_to_all_s_overlap_off": off["a2a_wait_s"], "exposed_all_to_all_s_overlap_on": on["a2a_wait_s"],
            "step_s_overlap_off": off["step_s"], "step_s_overlap_on": on["step_s"],
            "tokens_per_s": GLOBAL_SEQS * SEQ_LEN / on["step_s"],
            "tokens_per_s_ratio": (GLOBAL_SEQS * SEQ_LEN / min(on["step_s"], off["step_s"])) / base_tps,
            "tokens_per_s_ratio_overlap_off": (GLOBAL_SEQS * SEQ_LEN / off["step_s"]) / base_tps,
            "tokens_per_s_ratio_overlap_on": (GLOBAL_SEQS * SEQ_LEN / on["step_s"]) / base_tps,
        })
    load_after = os.getloadavg()
    if args.json:
        for r in results:
            print(json.dumps({**r, "load_avg_before_after": [load_before[0], load_after[0]]}))
        return 0
    print(f"tiny model, seq {SEQ_LEN}, {GLOBAL_SEQS} seq/step, fp32, 1 thread per rank; one rank x 1 thread: "
          f"{base_tps:,.0f} tokens/s; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    for r in results:
        if "not_built" in r:
            print(f"{r['layout']:<18} not built: {r['not_built']}")
            continue
        if r["tp_bytes_per_token"] is not None:
            print(f"{r['layout']:<18} tokens routed per rank and MoE layer call: {r['routed_tokens_per_rank']:,.0f}; "
                  f"over tp per token and step: {r['tp_bytes_per_token']:,.0f} B")
        if not r["min_dispatch_bytes_per_token"]:  # no all-to-all (ep 1)
            print(f"{'':<18} tokens/s vs 1 rank x 1 thread: {r['tokens_per_s_ratio_overlap_off']:.2f}x")
            continue
        print(f"{r['layout']:<18} dispatch B/token/layer: naive {r['naive_dispatch_bytes_per_token']:,.0f}  dedup "
              f"{r['dispatch_bytes_per_token']:,.0f}  min {r['min_dispatch_bytes_per_token']:,.0f}  "
              f"(x{r['ratio_to_min']:.3f} of min)  fp8 not built; combine naive "
              f"{r['naive_combine_bytes_per_token']:,.0f} dedup {r['combine_bytes_per_token']:,.0f}")
        print(f"{'':<18} exposed all-to-all per step: overlap off {1e3 * r['exposed_all_to_all_s_overlap_off']:.1f} ms"
              f", on {1e3 * r['exposed_all_to_all_s_overlap_on']:.1f} ms; step {1e3 * r['step_s_overlap_off']:.0f} / "
              f"{1e3 * r['step_s_overlap_on']:.0f} ms; tokens/s vs 1 rank x 1 thread: "
              f"{r['tokens_per_s_ratio_overlap_off']:.2f}x off, {r['tokens_per_s_ratio_overlap_on']:.2f}x on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
