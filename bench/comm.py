"""Communication of the expert-parallel layouts on CPU: bytes per token, exposed all-to-all time, speed.

Layouts (configs/tiny.yaml shapes, seq 256, 8 sequences per step in total, fp32, the real Trainer,
one thread per rank, gloo):
  EP2          2 ranks: dp_shard 2, ep 2, FSDP2
  EP4          4 ranks: dp_shard 4, ep 4, FSDP2
  node 2x2     4 ranks: dp_shard 4, ep 4, parallel.ep_ranks_per_node 2: node-limited routing on
               2 "nodes" x 2 ranks, hierarchical dispatch (parallel/node_dispatch.py)
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
  fp8 dispatch     the same layout trained under train.precision=fp8 (overlap on): one row per pair as
                   E4M3 bytes + fp32 1x128 tile scales (H + 4 ceil(H/128)) plus the slot map and the split
                   sizes, measured; its ledger total (dispatch + combine, forward + backward in bf16) is
                   checked against train/plan_comm.py's figure for the counted pairs
  combine          the gates (fp32 per slot) and one returned row per pair
node 2x2 splits these by stage: `dispatch` / `min dispatch` / `combine` are the inter-node stage's
(one row per (token, node) and its slot map; min: one row per (token, node)), `intra_node_*` the
intra-node stage's (one row per (forwarded row, rank of the node)), `inter_node_crossing_*` the rows
that really leave their node (to the other node, not the rank's own), `total_dispatch_*` both stages.
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.expert_parallel import SEQ_LEN  # noqa: E402  (the length step_overrides trains at)

GLOBAL_SEQS = 8
COUNTS = {"tokens": 0, "pairs": 0, "assignments": 0, "dispatches": 0, "remote_pairs": 0,  # flat / inter-node
          "intra_pairs": 0,  # node-limited: the intra-node stage
          "routed": 0, "router_calls": 0}  # tokens every router saw (tp: each rank's shard under SP)

LAYOUTS = {  # name -> (ranks, overrides)
    "EP2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2}),
    "EP4": (4, {"parallel.dp_shard": 4, "parallel.ep": 4}),
    "node-limited 2x2": (4, {"parallel.dp_shard": 4, "parallel.ep": 4, "parallel.ep_ranks_per_node": 2}),
    "TP2+SP": (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    "TP2xEP2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.ep": 2}),
}


def count_pairs(n_experts: int, own: int) -> None:
    """Count tokens, (token, rank) pairs and kept assignments of every dispatch in this process; `own`:
    this rank's index among the first stage's destinations (node-limited: its node), for remote_pairs.
    A node-limited dispatch's second (intra-node) stage spans a node's experts only: intra_pairs."""
    import parallel.expert_parallel as ep

    inner = ep.pairs_per_rank

    def counted(topk_idx, keep, experts_per_rank, n_ranks):
        out = inner(topk_idx, keep, experts_per_rank, n_ranks)
        if not torch.is_grad_enabled():
            return out
        if experts_per_rank * n_ranks < n_experts:  # the intra-node stage
            COUNTS["intra_pairs"] += out[1].numel()
            return out
        COUNTS["tokens"] += topk_idx.shape[0]
        COUNTS["pairs"] += out[1].numel()
        COUNTS["remote_pairs"] += int((out[0] != own).sum())
        COUNTS["assignments"] += topk_idx.numel() if keep is None else int(keep.sum())
        COUNTS["dispatches"] += 1
        return out

    ep.pairs_per_rank = counted


def count_routed(module, args, out) -> None:
    if torch.is_grad_enabled():
        COUNTS["routed"] += args[0].shape[0]
        COUNTS["router_calls"] += 1


def bench_rank(rank: int, ranks: int, extra: dict, overlap: bool, steps: int, warmup: int, run_dir: str,
               precision: str = "fp32") -> dict:
    from bench.expert_parallel import step_overrides, tiny_trainer
    from train.config import load_config

    tp, ep = int(extra.get("parallel.tp", 1)), int(extra.get("parallel.ep", 1))
    per_node = int(extra.get("parallel.ep_ranks_per_node", ep))
    count_pairs(load_config(REPO / "configs" / "tiny.yaml", []).model.n_routed_experts, (rank // tp) % ep // per_node)
    dp = ranks // tp
    overrides = step_overrides(run_dir, GLOBAL_SEQS // dp, warmup + steps, precision=precision,
                               extra={"parallel.ep_overlap": str(overlap).lower(), **extra})
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
                a2a = [v for k, v in by.items() if k.startswith("all_to_all/ep")]
                tp_bytes = sum(v["bytes"] for k, v in by.items() if k.endswith("/tp"))
                rows.append({"step_s": m["step_time_s"], "a2a_bytes": sum(v["bytes"] for v in a2a), "tp_bytes": tp_bytes,
                             "a2a_wait_s": sum(v.get("wait_s", 0.0) for v in a2a),
                             **{k: float(v) for k, v in COUNTS.items()}})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run(ranks: int, extra: dict, overlap: bool, steps: int, warmup: int, precision: str = "fp32") -> dict:
    from tests.distributed import run_ranks

    with tempfile.TemporaryDirectory() as run_dir:
        per_rank = run_ranks(ranks, bench_rank, ranks, extra, overlap, steps, warmup, run_dir, precision,
                             timeout=1800)
    return {k: statistics.fmean(r[k] for r in per_rank) for k in per_rank[0]}


def bytes_per_token(r: dict, ep: int, hidden: int, top_k: int, nodes: int = 1) -> dict:
    """Per token per MoE layer, forward (see the module docstring); `nodes` > 1: node-limited, the first
    stage's destinations are the nodes."""
    tokens = max(r["tokens"], 1)  # summed over the step's dispatches (layers x micro-batches)
    row = hidden * 4
    first = nodes if nodes > 1 else ep
    out = {
        "naive_dispatch_bytes_per_token": r["assignments"] * row / tokens,
        "dispatch_bytes_per_token": (r["pairs"] * (row + top_k) + 8 * first * r["dispatches"]) / tokens,
        "min_dispatch_bytes_per_token": r["pairs"] * row / tokens,
        "combine_bytes_per_token": r["pairs"] * (row + 4 * top_k) / tokens,
        "naive_combine_bytes_per_token": r["assignments"] * row / tokens,
    }
    if nodes > 1:
        intra = (r["intra_pairs"] * (row + top_k) + 8 * (ep // nodes) * r["dispatches"]) / tokens
        out.update({
            "inter_node_crossing_bytes_per_token": r["remote_pairs"] * row / tokens,
            "intra_node_dispatch_bytes_per_token": intra,
            "intra_node_min_dispatch_bytes_per_token": r["intra_pairs"] * row / tokens,
            "intra_node_combine_bytes_per_token": r["intra_pairs"] * (row + 4 * top_k) / tokens,
            "total_dispatch_bytes_per_token": out["dispatch_bytes_per_token"] + intra,
        })
    return out


def fp8_dispatch(r: dict, ep: int, hidden: int, top_k: int, nodes: int = 1) -> dict:
    """FP8 dispatch bytes per token per MoE layer (forward) of an fp8 run, and the ratio of the ledger's
    all_to_all/ep bytes (dispatch + combine, forward + backward) to the planner's for the counted pairs
    (1.0 up to the medians being taken over steps separately). Node-limited: the inter-node stage's bytes
    (its pairs are what `count_pairs` counts), no ledger ratio (the planner's figure is for flat EP)."""
    from models.fp8 import TILE
    from train.config import load_config
    from train.plan_comm import routed_all_to_all_bytes

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.precision=fp8", f"parallel.dp_shard={ep}",
                                                       f"parallel.ep={ep}", "train.grad_accum_steps=1"])
    row = hidden + 4 * -(-hidden // TILE)
    tokens = max(r["tokens"], 1)
    ranks = nodes if nodes > 1 else ep
    return {"fp8_dispatch_bytes_per_token": (r["pairs"] * (row + top_k) + 8 * ranks * r["dispatches"]) / tokens,
            "fp8_ledger_to_plan": None if nodes > 1 else
            r["a2a_bytes"] / routed_all_to_all_bytes(cfg, r["pairs"], r["pairs"])}


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
        ranks, extra = spec
        off = run(ranks, extra, False, args.steps, args.warmup)
        on = run(ranks, extra, True, args.steps, args.warmup)
        ep = int(extra.get("parallel.ep", 1))
        nodes = ep // int(extra.get("parallel.ep_ranks_per_node", ep))
        b = bytes_per_token(on, ep, mc.hidden_size, mc.num_experts_per_tok, nodes)
        b8 = fp8_dispatch(run(ranks, extra, True, args.steps, args.warmup, "fp8"), ep, mc.hidden_size,
                          mc.num_experts_per_tok, nodes) if ep > 1 else {"fp8_dispatch_bytes_per_token": None,
                                                                         "fp8_ledger_to_plan": None}
        tp = int(extra.get("parallel.tp", 1))
        tp_group_tokens = GLOBAL_SEQS * SEQ_LEN * tp / ranks  # the tokens one tp group trains per step
        measured = on["a2a_bytes"] / max(on["tokens"], 1) / 2  # the ledger: forward and backward move the same
        results.append({
            "layout": name, **b,
            "ratio_to_min": b["dispatch_bytes_per_token"] / max(b["min_dispatch_bytes_per_token"], 1e-9),
            **b8,
            "routed_tokens_per_rank": on["routed"] / max(on["router_calls"], 1),
            "tp_bytes_per_token": on["tp_bytes"] / tp_group_tokens if tp > 1 else None,
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
        if r["tp_bytes_per_token"] is not None:
            print(f"{r['layout']:<18} tokens routed per rank and MoE layer call: {r['routed_tokens_per_rank']:,.0f}; "
                  f"over tp per token and step: {r['tp_bytes_per_token']:,.0f} B")
        if not r["min_dispatch_bytes_per_token"]:  # no all-to-all (ep 1)
            print(f"{'':<18} tokens/s vs 1 rank x 1 thread: {r['tokens_per_s_ratio_overlap_off']:.2f}x")
            continue
        print(f"{r['layout']:<18} dispatch B/token/layer: naive {r['naive_dispatch_bytes_per_token']:,.0f}  dedup "
              f"{r['dispatch_bytes_per_token']:,.0f}  min {r['min_dispatch_bytes_per_token']:,.0f}  "
              f"(x{r['ratio_to_min']:.3f} of min)  fp8 {r['fp8_dispatch_bytes_per_token']:,.0f}"
              + ("" if r["fp8_ledger_to_plan"] is None else f" (ledger/plan {r['fp8_ledger_to_plan']:.3f})")
              + "; combine naive "
              f"{r['naive_combine_bytes_per_token']:,.0f} dedup {r['combine_bytes_per_token']:,.0f}")
        if "intra_node_dispatch_bytes_per_token" in r:
            print(f"{'':<18} node-limited: the above is the inter-node stage (one row per (token, node)), of which "
                  f"{r['inter_node_crossing_bytes_per_token']:,.0f} leave the node; intra-node dispatch "
                  f"{r['intra_node_dispatch_bytes_per_token']:,.0f} (min "
                  f"{r['intra_node_min_dispatch_bytes_per_token']:,.0f}), combine "
                  f"{r['intra_node_combine_bytes_per_token']:,.0f}; both stages "
                  f"{r['total_dispatch_bytes_per_token']:,.0f}")
        print(f"{'':<18} exposed all-to-all per step: overlap off {1e3 * r['exposed_all_to_all_s_overlap_off']:.1f} ms"
              f", on {1e3 * r['exposed_all_to_all_s_overlap_on']:.1f} ms; step {1e3 * r['step_s_overlap_off']:.0f} / "
              f"{1e3 * r['step_s_overlap_on']:.0f} ms; tokens/s vs 1 rank x 1 thread: "
              f"{r['tokens_per_s_ratio_overlap_off']:.2f}x off, {r['tokens_per_s_ratio_overlap_on']:.2f}x on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
