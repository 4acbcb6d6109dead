"""The planner's communication prediction: per rank and per optimizer step, the calls and bytes of
every collective the communication ledger (parallel/comm_ledger.py) counts, keyed as it keys them.

Exact for everything but the routed tokens' all-to-all, which depends on the routing: there the
prediction assumes uniform routing (every allowed group, then every expert of the chosen groups,
equally likely) and also gives the bounds that any dropless routing keeps the mean over the ep
ranks within (`bytes_min`, `bytes_max`: every token reaches one rank / min(K, ep) ranks; one rank
alone may receive more; `routed_all_to_all_bytes` gives the exact figure for counted pairs). Under
FP8 with FP8 routed experts, the dispatched rows travel as E4M3 bytes plus fp32 1x128 tile scales
(parallel/expert_parallel.py), their gradients and the combine in the compute dtype. Layouts: data
parallelism (FSDP2 or ZeRO-1, HSDP), expert parallelism (flat, or hierarchical across nodes: ep_inter's
pairs are (token, node), ep_intra's (token, rank) as flat EP's), tensor parallelism with sequence
parallelism (its all-gathers and reduce-scatters along the sequence, the balance statistics and the
replicated parameters' gradient sum, group "tp"; the balance statistics assume one document per
sequence, `bytes_max` one per token; each tp rank dispatches its own sequence shard), HSDP (FSDP2's
all-reduce of every reduce-scatter output over dp_replicate), and pipeline parallelism on its own
(every schedule; per pipeline rank, `predict_comm(cfg, pp_rank)`: the activation sends /
receives per stage boundary between ranks and their gradients', the pipeline sums, the tied embedding
and the expert-load gather; alone, with ZeRO-1 or with FSDP2, whose stage roots gather and reduce
once per step). Not predicted (refused): the pipeline with HSDP or tensor parallelism; DeepSpeed (its
collectives bypass the ledger); tensor parallelism without SP and loss_parallel's DTensor-internal
reductions (not counted by the ledger either: DTensor issues them inside `redistribute` and
torch's loss_parallel, which offer no hook).
"""

from __future__ import annotations

from itertools import combinations
from math import comb
import pickle
from typing import Any

import torch

from models.accounting import build_meta_model
from models.config import ModelConfig
from models.attention import MultiHeadLatentAttention
from models.experts import GroupedExperts
from models.fp8 import TILE, Fp8GroupedGemm
from models.gqa_attention import GroupedQueryAttention
from models.mlp import SwiGLU
from models.moe import moe_layers
from models.moe_state import ExpertLoad
from parallel.layout import (ep_nodes, fsdp_applies, schedule_style, sequence_parallel, sequence_shards, split_layers,
                             stage_to_rank, stages_per_rank)
from parallel.pipeline import load_payload, prune_model
from parallel.sequence_parallel import replicated_parameter_names
from train.config import Config
from train.precision import fp8_selected


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


def fp8_dispatch_layers(cfg: Config, model: torch.nn.Module) -> int:
    """How many MoE layers dispatch FP8 rows: under train.precision=fp8, those whose routed experts
    train.fp8.modules / exclude convert (models.fp8.Fp8GroupedGemm.dispatch_rows)."""
    f = cfg.train.fp8
    if cfg.train.precision != "fp8" or not Fp8GroupedGemm.quantised_dispatch:
        return 0
    return sum(1 for n, m in model.named_modules() if isinstance(m, GroupedExperts) and fp8_selected(n, f.modules, f.exclude))


def routed_bytes_per_pair(cfg: Config, fp8_rows: bool) -> int:
    """All-to-all bytes per (token, rank) pair of one MoE layer's step, forward and backward: slot map
    (int8 K); the row (H c, or FP8: H + 4 ceil(H/128)); the gates (fp32 K); the returned row (H c);
    backward: the row's gradient, the gates' and the returned row's (H c, 4 K, H c). Sent and received
    pairs are equal on average over the ranks."""
    k, h = cfg.model.num_experts_per_tok, cfg.model.hidden_size
    c = 4 if cfg.train.precision == "fp32" else 2
    row = h + 4 * -(-h // TILE) if fp8_rows else h * c
    return k + row + 4 * k + h * c + (h * c + 4 * k + h * c)


def routed_all_to_all_bytes(cfg: Config, pairs: float, fp8_pairs: float = 0) -> float:
    """Mean all_to_all/ep bytes per rank of a step whose dispatches sent `pairs` (token, rank) pairs per
    rank in all, `fp8_pairs` of them as FP8 rows; the pair-count exchange included."""
    layer_calls = len(moe_layers(build_meta_model(cfg.model))) * cfg.train.grad_accum_steps
    return (layer_calls * 8 * cfg.parallel.ep + (pairs - fp8_pairs) * routed_bytes_per_pair(cfg, False)
            + fp8_pairs * routed_bytes_per_pair(cfg, True))


def _add(out: dict[str, dict[str, float]], key: str, calls: int, n_bytes: float) -> None:
    entry = out.setdefault(key, {"calls": 0, "bytes": 0})
    entry["calls"] += calls
    entry["bytes"] += n_bytes


def _add_dispatch(out: dict[str, dict[str, float]], group: str, ranks: int, pairs_per_token: float, max_pairs: int,
                  cfg: Config, tokens: int, layer_calls: int, fp8_share: float) -> None:
    """One deduplicated dispatch + combine (parallel/expert_parallel.py) over `ranks` ranks, per MoE layer
    and micro-batch: 8 calls; bytes at `pairs_per_token` pairs (bounds: 1 and `max_pairs`), a `fp8_share`
    of the layers sending FP8 rows (both stages of a hierarchical dispatch forward them as they came)."""
    _add(out, f"all_to_all/{group}", layer_calls, layer_calls * 8 * ranks)  # pair counts (int64)
    per_pair = (1 - fp8_share) * routed_bytes_per_pair(cfg, False) + fp8_share * routed_bytes_per_pair(cfg, True)
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


def _sequence_parallel_comm(out: dict, cfg: Config, model: torch.nn.Module, compute: int, grad_elems: int) -> None:
    """SP's collectives over tp (parallel/sequence_parallel.py): per micro-batch an all-gather of B x S/tp
    positions before every column-parallel region (width: MLA's latents, else H) and a reduce-scatter of
    B x S positions x H after every row-parallel one and the embedding, each with its mirror in backward;
    the balance statistics per MoE layer; per step the replicated gradients and the expert loads."""
    p, mc, t = cfg.parallel, cfg.model, cfg.train
    full = t.micro_batch_size * t.seq_len
    widths: list[int] = []  # gathered values per position
    scatters = 0
    for m in model.modules():
        if isinstance(m, MultiHeadLatentAttention) and m.q_lora_rank is not None:
            widths += [m.q_lora_rank, m.kv_lora_rank + m.qk_rope_head_dim]
        elif isinstance(m, (MultiHeadLatentAttention, GroupedQueryAttention, SwiGLU)):
            widths.append(mc.hidden_size)
        scatters += isinstance(m, (MultiHeadLatentAttention, GroupedQueryAttention, SwiGLU))
    heads = 1 + mc.num_nextn_predict_layers  # the head and the embedding run once per depth
    widths += [mc.hidden_size] * heads
    scatters += heads
    micro = t.grad_accum_steps
    calls = micro * (len(widths) + scatters)
    gathered = micro * compute * (full // p.tp) * (sum(widths) + scatters * mc.hidden_size)
    _add(out, "all_gather/tp", calls, gathered)
    _add(out, "reduce_scatter/tp", calls, gathered * p.tp)
    n_moe = len(moe_layers(model))
    stats = stats_max = 0  # the balance statistics' sums: [groups, 2E + 1 (+ n_group)] fp32 per layer
    if n_moe and (mc.aux_loss_alpha or mc.device_aux_loss_alpha or mc.comm_aux_loss_alpha):
        width = 4 * (2 * mc.n_routed_experts + 1 + (mc.n_group if mc.comm_aux_loss_alpha else 0))
        stats = micro * n_moe * width * (t.micro_batch_size if mc.seq_aux else 1)  # one document per sequence
        stats_max = micro * n_moe * width * (full if mc.seq_aux else 1)  # one per token
        _add(out, "all_reduce/tp", micro * n_moe, stats)
    _add(out, "all_reduce/tp", 1, 4 * grad_elems)  # replicated parameters' gradients, one flat fp32 sum
    if n_moe:
        _add(out, "all_reduce/tp", 1, 4 * n_moe * (mc.n_routed_experts + 1))  # expert loads + dropped
    if stats_max > stats:
        out["all_reduce/tp"]["bytes_max"] = out["all_reduce/tp"]["bytes"] - stats + stats_max


def _pipeline_stages(cfg: Config, pp_rank: int) -> tuple[list[int], list[int]]:
    """(stage -> pipeline rank, the stages of `pp_rank`) as parallel/pipeline.py places them."""
    p = cfg.parallel
    n_stages = p.pp * stages_per_rank(p)
    owner = [stage_to_rank(s, p.pp, schedule_style(p)) for s in range(n_stages)]
    return owner, [s for s in range(n_stages) if owner[s] == pp_rank]


def _stage_model(cfg: Config, pp_rank: int) -> torch.nn.Module:
    """The meta model as pipeline rank `pp_rank` keeps it (the whole model without a pipeline)."""
    model = build_meta_model(cfg.model)
    if cfg.parallel.pp > 1:
        owner, mine = _pipeline_stages(cfg, pp_rank)
        split = split_layers(cfg.parallel, cfg.model)
        prune_model(model, {i for s in mine for i in split[s]}, first=0 in mine, last=len(owner) - 1 in mine)
    return model


def _holds_last_stage(cfg: Config, pp_rank: int) -> bool:
    owner, mine = _pipeline_stages(cfg, pp_rank)
    return len(owner) - 1 in mine


def _root_unit(cfg: Config, pp_rank: int, name: str) -> str:
    """The FSDP root holding a parameter outside the blocks: the model's, or under a pipeline its stage
    module's (the embedding on the first stage, the norm, head and MTP's embedding on the last)."""
    if cfg.parallel.pp == 1:
        return "root"
    _, mine = _pipeline_stages(cfg, pp_rank)
    return "root/first" if name.startswith("embed_tokens.") and 0 in mine else "root/last"


def _pipeline_comm(out: dict, cfg: Config, pp_rank: int, model: torch.nn.Module) -> None:
    """Pipeline rank `pp_rank`'s traffic (parallel/pipeline.py), per step: per micro-batch and stage boundary
    between ranks, the B x S x H activation forward (send / recv) and its gradient backward, in the residual
    stream's dtype (FSDP2's param dtype, else fp32); the objective / CE / MTP / aux sums over pp
    (fp64); the tied embedding copies' gradient sum over {first, last} (when on different ranks and the last
    stage needs the embedding); the pickled expert loads gathered over pp."""
    p, mc, t = cfg.parallel, cfg.model, cfg.train
    owner, mine = _pipeline_stages(cfg, pp_rank)
    n_stages = len(owner)
    act_bytes = (4 if t.precision == "fp32" else 2) if fsdp_applies(p) else 4  # FSDP2's param dtype, else fp32
    act = t.micro_batch_size * t.seq_len * mc.hidden_size * act_bytes
    micro = t.grad_accum_steps
    for s in mine:
        for peer, forward in ((s - 1, "recv"), (s + 1, "send")):  # the input from s - 1, the output to s + 1
            if 0 <= peer < n_stages and owner[peer] != pp_rank:
                backward = "send" if forward == "recv" else "recv"
                _add(out, f"{forward}/pp", micro, micro * act)
                _add(out, f"{backward}/pp", micro, micro * act)
    _add(out, "all_reduce/pp", 1, 8 * (3 + mc.num_nextn_predict_layers))
    last = owner[-1]
    needs_tie = last != 0 and (mc.num_nextn_predict_layers > 0 or mc.tie_word_embeddings)
    if needs_tie and pp_rank in (0, last):
        shard = _padded_numel(torch.Size((mc.vocab_size, mc.hidden_size)), p.dp_shard if fsdp_applies(p) else 1)
        _add(out, "all_reduce/pp_tie", 1, 4 * shard)  # the (FSDP2-sharded) gradient of each copy
    if mc.n_routed_experts and len(moe_layers(build_meta_model(mc))):
        layers = moe_layers(model)
        load = None
        if layers:
            zeros = torch.zeros(len(layers), mc.n_routed_experts)
            biases = zeros if all(m.gate.uses_bias for m in layers) else None
            load = ExpertLoad([m.layer_idx for m in layers], zeros, biases, 0.0)
        _add(out, "all_gather/pp", 1, len(pickle.dumps(load_payload(load))))


def comm_predicted(p: Any) -> bool:
    """Whether `predict_comm` covers the layout of ParallelConfig `p`."""
    pipeline_ok = p.pp == 1 or (p.tp == 1 and p.dp_replicate == 1)
    return pipeline_ok and (p.tp == 1 or sequence_parallel(p)) and p.data_parallel != "deepspeed"


def predict_comm(cfg: Config, pp_rank: int = 0) -> dict[str, Any]:
    """{"calls", "bytes", "by": {"kind/group": {"calls", "bytes"[, "bytes_min", "bytes_max"]}}} of one rank's step
    (under pipeline parallelism, a rank of pipeline rank `pp_rank`: the stages differ)."""
    p, mc, t = cfg.parallel, cfg.model, cfg.train
    if not comm_predicted(p):
        raise ValueError("predict_comm: not predicted yet: tensor parallelism without SP (nor counted), a pipeline "
                         "with HSDP or tensor parallelism, DeepSpeed (its collectives bypass the ledger)")
    world = p.dp_replicate * p.dp_shard
    edp = p.dp_shard // p.ep
    dp, expert_dp = world, p.dp_replicate * edp
    model = _stage_model(cfg, pp_rank)  # under a pipeline, this rank's stages only
    n_moe = len(moe_layers(model))
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    depth, micro = mc.num_nextn_predict_layers, t.grad_accum_steps
    out: dict[str, dict[str, float]] = {}
    if world * p.tp * p.pp > 1:
        _add(out, "all_reduce/world", 1, 8)  # gradient-norm square sum (fp64)
    if p.pp > 1:
        _pipeline_comm(out, cfg, pp_rank, model)
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

    if sequence_parallel(p):
        sharded_over = (lambda n: edp if _is_expert(n) else p.dp_shard) if mode == "fsdp" else (lambda n: 1)
        grad_elems = sum(_padded_numel(shape_of(n), sharded_over(n)) for n in replicated_parameter_names(model)
                         if n in params)
        _sequence_parallel_comm(out, cfg, model, compute, grad_elems)

    if mode == "zero1":
        for expert, ranks, group in ((False, dp, "dp"), (True, expert_dp, "expert_dp")):
            names = [n for n in params if _is_expert(n) == expert]
            if ranks == 1 or not names:
                continue
            _add(out, f"all_reduce/{group}", 1, 4 * sum(shape_of(n).numel() for n in names))
            _add(out, f"all_gather/{group}", len(names), 4 * sum(_padded_numel(shape_of(n), ranks) for n in names))
    elif mode == "fsdp":
        blocks = [f"layers.{i}." for i in range(mc.num_hidden_layers)] + [f"mtp.{i}." for i in range(depth)]
        units: dict[tuple[str, bool], list[torch.Size]] = {}
        for n in params:
            block = next((b for b in blocks if n.startswith(b)), None) or _root_unit(cfg, pp_rank, n)
            units.setdefault((block, _is_expert(n)), []).append(shape_of(n))
        if p.pp > 1 and schedule_style(p) == "v" and depth and p.tp == 1 and _holds_last_stage(cfg, pp_rank):
            # the last stage's private embedding copy (parallel/pipeline.py, Pipeline.embed_copy)
            units.setdefault(("root/last", False), []).append(torch.Size((mc.vocab_size, mc.hidden_size)))
        gather = 4 if t.precision == "fp32" else 2  # FSDP2's param dtype (bf16 under bf16 / fp8)
        dense_group = "dp_shard"
        # under a pipeline each stage module is an FSDP root whose units stay unsharded for the whole step and
        # reduce once at its end; otherwise non-root units reshard after forward and every micro-batch reduces
        reductions = 1 if p.pp > 1 else micro
        for (block, expert), shapes in units.items():
            ranks, group = (edp, "edp") if expert else (p.dp_shard, dense_group)
            shard = sum(_padded_numel(shape, ranks) for shape in shapes)
            if p.dp_replicate > 1:  # HSDP: each reduce-scatter's fp32 output summed over the replicas
                _add(out, "all_reduce/dp_replicate", reductions, reductions * 4 * shard)
            if ranks == 1:
                continue
            gathers = 1 if p.pp > 1 else micro if block.startswith("root") else 2 * micro
            _add(out, f"all_gather/{group}", gathers, gathers * gather * shard)
            _add(out, f"reduce_scatter/{group}", reductions, reductions * 4 * ranks * shard)
    if p.ep > 1 and n_moe:
        dispatch = (t.micro_batch_size * t.seq_len // sequence_shards(p), n_moe * micro, fp8_dispatch_layers(cfg, model) / n_moe)
        nodes = ep_nodes(p)
        if nodes == 1:
            _add_dispatch(out, "ep", p.ep, expected_ranks_per_token(mc, p.ep), min(mc.num_experts_per_tok, p.ep),
                          cfg, *dispatch)
        else:  # hierarchical (parallel/node_dispatch.py): one row per (token, node), then per (row, rank)
            _add_dispatch(out, "ep_inter", nodes, expected_ranks_per_token(mc, nodes),
                          min(mc.num_experts_per_tok, nodes), cfg, *dispatch)
            if p.ep // nodes > 1:  # a one-rank intra-node group moves nothing
                _add_dispatch(out, "ep_intra", p.ep // nodes, expected_ranks_per_token(mc, p.ep),
                              min(mc.num_experts_per_tok, p.ep), cfg, *dispatch)
    by = dict(sorted(out.items()))
    return {"calls": sum(e["calls"] for e in by.values()), "bytes": sum(e["bytes"] for e in by.values()), "by": by}
