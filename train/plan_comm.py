"""The planner's communication prediction: per rank and per optimizer step, the calls and bytes of
every collective the communication ledger (parallel/comm_ledger.py) counts, keyed as it keys them.

Exact for everything but the routed tokens' all-to-all, which depends on the routing: there the
prediction assumes uniform routing (every allowed group, then every expert of the chosen groups,
equally likely) and also gives the bounds that any dropless routing keeps the mean over the ep
ranks within (`bytes_min`, `bytes_max`: every token reaches one rank / min(K, ep) ranks; one rank
alone may receive more). Layouts: data parallelism (FSDP2 or ZeRO-1,
HSDP), expert parallelism (flat, or hierarchical across nodes: ep_inter's pairs are (token, node),
ep_intra's (token, rank) as flat EP's); the pipeline's and tensor parallelism's traffic is not predicted (nor
counted by the ledger yet).
"""

from __future__ import annotations

from itertools import combinations
from math import comb
from typing import Any

import torch

from models.accounting import build_meta_model
from models.config import ModelConfig
from models.moe import moe_layers
from parallel.layout import ep_nodes
from train.config import Config


def expected_ranks_per_token(mc: ModelConfig, ep: int) -> float:
    """E[number of ep ranks holding any of a token's K experts] under uniform group-limited routing."""
    e, k, n_local = mc.n_routed_experts, mc.num_experts_per_tok, mc.n_routed_experts // ep
    groups = mc.n_group if mc.n_group > 1 and mc.topk_group < mc.n_group else 1
    per_group = e // groups
    chosen_sets = list(combinations(range(groups), mc.topk_group if groups > 1 else 1))
    total = 0.0
    for chosen in chosen_sets:
        candidates = [g * per_group + i for g in chosen for i in range(per_group)]
        m = len(candidates)
        for r in range(ep):
            on_r = sum(1 for x in candidates if x // n_local == r)
            total += 1 - comb(m - on_r, k) / comb(m, k)
    return total / len(chosen_sets)


def _add(out: dict[str, dict[str, float]], key: str, calls: int, n_bytes: float) -> None:
    entry = out.setdefault(key, {"calls": 0, "bytes": 0})
    entry["calls"] += calls
    entry["bytes"] += n_bytes


def _add_dispatch(out: dict[str, dict[str, float]], group: str, ranks: int, pairs_per_token: float, max_pairs: int,
                  mc: ModelConfig, tokens: int, layer_calls: int, compute: int) -> None:
    """One deduplicated dispatch + combine (parallel/expert_parallel.py) over `ranks` ranks, per MoE layer
    and micro-batch: 8 calls; bytes at `pairs_per_token` pairs (bounds: 1 and `max_pairs`)."""
    k, h = mc.num_experts_per_tok, mc.hidden_size
    _add(out, f"all_to_all/{group}", layer_calls, layer_calls * 8 * ranks)  # pair counts (int64)
    # per pair: slot map (int8 K) + row + gates (fp32 K) + returned row, forward; the backward of
    # the last three. Sent and received pairs are equal on average over ranks.
    per_pair = k + 2 * (2 * h * compute + 4 * k)
    entry = out[f"all_to_all/{group}"]
    fixed = entry["bytes"]
    pairs = tokens * layer_calls
    entry["calls"] += 7 * layer_calls
    entry["bytes"] = fixed + pairs * pairs_per_token * per_pair
    entry["bytes_min"] = fixed + pairs * 1 * per_pair
    entry["bytes_max"] = fixed + pairs * max_pairs * per_pair


def _padded_numel(shape: torch.Size, ranks: int) -> int:
    """Elements of one rank's dim-0 shard padded to ceil(dim0 / ranks) rows (FSDP2 and DTensor pad so)."""
    if len(shape) == 0:
        return 1
    rest = 1
    for s in shape[1:]:
        rest *= s
    return -(-shape[0] // ranks) * rest


def _is_expert(name: str) -> bool:
    return ".experts." in name


def predict_comm(cfg: Config) -> dict[str, Any]:
    """{"calls", "bytes", "by": {"kind/group": {"calls", "bytes"[, "bytes_min", "bytes_max"]}}} of one rank's step."""
    p, mc, t = cfg.parallel, cfg.model, cfg.train
    if p.pp > 1 or p.tp > 1:
        raise ValueError("predict_comm: pipeline and tensor parallelism are not predicted yet")
    world = p.dp_replicate * p.dp_shard
    edp = p.dp_shard // p.ep
    dp, expert_dp = world, p.dp_replicate * edp
    model = build_meta_model(mc)
    n_moe = len(moe_layers(model))
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    depth, micro = mc.num_nextn_predict_layers, t.grad_accum_steps
    out: dict[str, dict[str, float]] = {}
    if world > 1:
        _add(out, "all_reduce/world", 1, 8)  # gradient-norm square sum (fp64)
    if dp > 1:
        _add(out, "all_reduce/dp", 1, 8 * (1 + depth))  # global target-token counts
        _add(out, "all_reduce/dp", 1, 8 * (3 + depth))  # objective, CE, MTP CEs, aux sums
        if n_moe:
            _add(out, "all_reduce/dp", 1, 4 * n_moe * (mc.n_routed_experts + 1))  # expert counts + dropped
    mode = p.data_parallel if world > 1 else "single"
    compute = 4 if t.precision == "fp32" else 2

    def shape_of(name: str) -> torch.Size:
        shape = params[name].shape
        return torch.Size((shape[0] // p.ep,) + tuple(shape[1:])) if _is_expert(name) and p.ep > 1 else shape

    if mode == "zero1":
        for expert, ranks, group in ((False, dp, "dp"), (True, expert_dp, "expert_dp")):
            names = [n for n in params if _is_expert(n) == expert]
            if ranks == 1 or not names:
                continue
            _add(out, f"all_reduce/{group}", 1, 4 * sum(shape_of(n).numel() for n in names))
            _add(out, f"all_gather/{group}", len(names), 4 * sum(_padded_numel(shape_of(n), ranks) for n in names))
    elif mode == "fsdp":
        blocks = [f"layers.{i}." for i in range(mc.num_hidden_layers)] + [f"mtp.{i}." for i in range(depth)]
        units: dict[tuple[str, bool], list[str]] = {}
        for n in params:
            block = next((b for b in blocks if n.startswith(b)), "root")
            units.setdefault((block, _is_expert(n)), []).append(n)
        gather = 4 if t.precision == "fp32" else 2  # FSDP2's param dtype (bf16 under bf16 / fp8)
        dense_group = "dp_shard"
        for (block, expert), names in units.items():
            ranks, group = (edp, "edp") if expert else (p.dp_shard, dense_group)
            if ranks == 1:
                continue
            shard = sum(_padded_numel(shape_of(n), ranks) for n in names)
            gathers = micro if block == "root" else 2 * micro  # non-root units reshard after forward
            _add(out, f"all_gather/{group}", gathers, gathers * gather * shard)
            _add(out, f"reduce_scatter/{group}", micro, micro * 4 * ranks * shard)
    if p.ep > 1 and n_moe:
        dispatch = (t.micro_batch_size * t.seq_len, n_moe * micro, compute)
        nodes = ep_nodes(p)
        if nodes == 1:
            _add_dispatch(out, "ep", p.ep, expected_ranks_per_token(mc, p.ep), min(mc.num_experts_per_tok, p.ep),
                          mc, *dispatch)
        else:  # hierarchical (parallel/node_dispatch.py): one row per (token, node), then per (row, rank)
            _add_dispatch(out, "ep_inter", nodes, expected_ranks_per_token(mc, nodes),
                          min(mc.num_experts_per_tok, nodes), mc, *dispatch)
            if p.ep // nodes > 1:  # a one-rank intra-node group moves nothing
                _add_dispatch(out, "ep_intra", p.ep // nodes, expected_ranks_per_token(mc, p.ep),
                              min(mc.num_experts_per_tok, p.ep), mc, *dispatch)
    by = dict(sorted(out.items()))
    return {"calls": sum(e["calls"] for e in by.values()), "bytes": sum(e["bytes"] for e in by.values()), "by": by}
