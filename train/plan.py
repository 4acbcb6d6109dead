"""`python -m train.plan --config FILE [--gpus N] [--gpu-mem-gb 80] [--recompute none|full] [--json] [key=value ...]`

Parameters (total, activated per token), training FLOPs per token, and the memory each rank
needs under the configured layout and precision, with a verdict for a given GPU memory and the
layout's known problems. Computed on the meta device: nothing is allocated, so the 671B preset
plans in seconds on a laptop. Exit status 2 when the config or the layout cannot work.

Memory model (per rank, bytes; GiB = 2**30 in the output), matching what moeforge runs:

* Stages: parallel/layout.py's split and placement (pp x stages-per-rank stages; the embedding on
  the first, final norm + head + MTP on the last, which keeps its own embedding copy for MTP when it
  lives on another rank; V schedules put stages r and 2pp-1-r on rank r, loop schedules stage s on
  rank s % pp). Every figure is for the busiest rank; the text output also lists each rank's total.
* Sharding. Non-expert weights split over tp, routed experts over ep. FSDP2 (`fsdp`) shards
  weights, gradients and optimizer states over dp_shard (dense) / dp_shard / ep (experts; the
  dp_replicate dimension replicates: HSDP). ZeRO-1 (`zero1`) keeps weights and gradients whole and
  shards the optimizer (fp32 master copy + moments) over all data-parallel ranks (dense) / the
  expert-data-parallel ranks (experts). One process, or FSDP without data parallelism, wraps
  nothing: plain AdamW on whole parameters.
* Precision. Parameters are fp32 masters in every mode, gradients fp32, AdamW moments fp32 (bf16 with
  optim.bf16_moments). bf16/fp8 add compute copies: FSDP2 gathers two blocks at a time in bf16 (a
  pipeline stage keeps all of its blocks gathered from forward to backward); replicated parameters
  get a bf16 autocast copy; FP8 GEMMs keep their quantised (1-byte) weights for the backward pass
  of every micro-batch in flight.
* Activations, per token and layer, for flash-style attention (no S x S term): norm inputs and the
  residual stream fp32; q, k, v, attention output, SwiGLU inputs and expert outputs in the compute
  dtype; Linear inputs in the compute dtype, or 1 byte under FP8 (quantised inputs are what FP8 GEMMs
  save). MoE layers hold num_experts_per_tok copies of the token's expert path. The head keeps
  fp32 logits and their softmax for the main and every MTP depth (one micro-batch at a time).
  Tensor parallelism is assumed sequence-parallel (activations / tp). `--recompute full` keeps only
  each layer's input (plus one layer being recomputed); moeforge trains with `none` today.
* Micro-batches in flight on a rank: 1 without PP; GPipe all; 1F1B pp - rank; interleaved
  schedules their warm-up depth; V-shaped (DualPipe) pp + 1 (DeepSeek-V3 report, Table 2).
* Fixed overhead (CUDA context, NCCL and allocator slack): `--overhead-gb`, 3 GiB by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from models.accounting import build_meta_model, count_model
from parallel import layout
from train.config import Config, ConfigError, load_config

GiB = 2**30
NOT_YET = ("not available yet", "not supported yet")


# ---------------------------------------------------------------- parameters by unit
@dataclass
class Unit:
    """A piece of the model that lives on one pipeline stage: embedding, a layer, the head, an MTP module."""

    name: str
    dense: int = 0  # non-expert parameters
    expert: int = 0  # routed-expert parameters
    fp8_dense: int = 0  # of which run their GEMMs in FP8 (train.precision=fp8)
    fp8_expert: int = 0
    moe: bool = False  # a layer with routed experts
    layer: bool = False  # a transformer block (or an MTP module's block)
    mtp: bool = False


def _is_expert(name: str) -> bool:
    return ".experts." in name  # parallel.expert_parallel.is_expert_param without importing parallel


def model_units(cfg: Config) -> tuple[Unit, list[Unit], Unit, list[Unit]]:
    """(embedding, layers, head, mtp modules) with parameter counts, from the meta-device model."""
    import fnmatch

    from torch import nn

    from models.experts import GroupedExperts

    model = build_meta_model(cfg.model)
    fp8 = cfg.train.precision == "fp8"
    inc, exc = list(cfg.train.fp8.modules), list(cfg.train.fp8.exclude)
    fp8_params: set[int] = set()
    if fp8:
        for name, module in model.named_modules():
            if not name or not isinstance(module, (nn.Linear, GroupedExperts)):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in inc) and not any(fnmatch.fnmatchcase(name, p) for p in exc):
                fp8_params.update(id(p) for p in module.parameters(recurse=False))

    embed, head = Unit("embedding"), Unit("head")
    layers = [Unit(f"layer {i}", moe=cfg.model.is_moe_layer(i), layer=True) for i in range(cfg.model.num_hidden_layers)]
    mtps = [Unit(f"mtp {k + 1}", moe=cfg.model.is_moe_layer(cfg.model.num_hidden_layers + k), layer=True, mtp=True)
            for k in range(cfg.model.num_nextn_predict_layers)]
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embedding / head: counted once, with the embedding
            continue
        seen.add(id(p))
        top, _, rest = name.partition(".")
        if top == "embed_tokens":
            unit = embed
        elif top == "layers":
            unit = layers[int(rest.split(".", 1)[0])]
        elif top == "mtp":
            unit = mtps[int(rest.split(".", 1)[0])]
        else:  # norm, lm_head
            unit = head
        n = p.numel()
        if _is_expert(name):
            unit.expert += n
            unit.fp8_expert += n if id(p) in fp8_params else 0
        else:
            unit.dense += n
            unit.fp8_dense += n if id(p) in fp8_params else 0
    return embed, layers, head, mtps


# ---------------------------------------------------------------- pipeline stages
def pipeline_shape(cfg: Config) -> tuple[str, int]:
    """(placement style: single | loop | v, stages per rank), as parallel/layout.py decides."""
    p = cfg.parallel
    if p.pp == 1:
        return "single", 1
    try:
        return layout.schedule_style(p), layout.stages_per_rank(p)
    except layout.LayoutError:  # unknown schedule or bad stages_per_rank: reported by check_layout
        return "single", 1


def stage_units(cfg: Config) -> tuple[list[list[Unit]], list[int]]:
    """Units per pipeline rank, and the number of transformer layers of each stage.

    The split is parallel.layout.split_layers' (even, or parallel.pipeline_layers_per_stage);
    a layout it refuses falls back to an even split so that the plan still prints (check_layout
    reports the error)."""
    p = cfg.parallel
    embed, layers, head, mtps = model_units(cfg)
    if p.pp == 1:
        return [[embed] + layers + [head] + mtps], [len(layers)]
    style, v = pipeline_shape(cfg)
    n_stages = p.pp * v
    try:
        sizes = [len(ids) for ids in layout.split_layers(p, cfg.model)]
    except layout.LayoutError:
        sizes = layout.even_split(len(layers), n_stages)
    ranks: list[list[Unit]] = [[] for _ in range(p.pp)]
    start = 0
    for s, size in enumerate(sizes):
        chunk = layers[start:start + size]
        start += size
        if s == 0:
            chunk = [embed] + chunk
        if s == n_stages - 1:
            chunk = chunk + [head] + mtps
            last_rank = layout.stage_to_rank(s, p.pp, style)
            if last_rank != 0 and (mtps or cfg.model.tie_word_embeddings):  # MTP needs its own embedding copy
                chunk.append(Unit("embedding copy", dense=embed.dense, fp8_dense=embed.fp8_dense))
        ranks[layout.stage_to_rank(s, p.pp, style)].extend(chunk)
    return ranks, sizes


def microbatches(cfg: Config) -> int:
    return cfg.parallel.pipeline_microbatches or cfg.train.grad_accum_steps


def in_flight(cfg: Config, rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak (units: all of its layers)."""
    p, m = cfg.parallel, microbatches(cfg)
    if p.pp == 1:
        return 1.0
    try:
        name = layout.schedule_name(p)
    except layout.LayoutError:  # reported by check_layout
        name = ""
    style, v = pipeline_shape(cfg)
    if name in ("GPipe", "LoopedBFS"):  # every forward before any backward
        return float(m)
    if style == "v":  # DualPipe(V): PP + 1 (DeepSeek-V3 report, Table 2)
        return float(min(m, p.pp + 1))
    if style == "loop":  # interleaved warm-up: (v - 1) pp + 2 (pp - rank - 1) + 1 stage-forwards
        return min(m * v, (v - 1) * p.pp + 2 * (p.pp - rank - 1) + 1) / v
    return float(max(1, min(m, p.pp - rank)))  # 1F1B


# ---------------------------------------------------------------- activations
def layer_activation_bytes(cfg: Config, moe: bool, precision: str) -> float:
    """Bytes one transformer block saves for backward, per token (before the /tp split)."""
    mc = cfg.model
    c = 4 if precision == "fp32" else 2  # compute dtype
    n = 4  # fp32 residual stream and norms
    li = 1 if precision == "fp8" else c  # Linear inputs (FP8 GEMMs save the quantised input)
    H, nh = mc.hidden_size, mc.num_attention_heads
    dqk, dv, dr = mc.qk_head_dim, mc.v_head_dim, mc.qk_rope_head_dim
    attn = H * n + H * li  # input norm, normed x (input of q_a / q_proj and kv_a)
    if mc.q_lora_rank:
        attn += mc.q_lora_rank * (n + li)  # q_a_layernorm input, q_b_proj input
    attn += mc.kv_lora_rank * (n + li)  # kv_a_layernorm input, kv_b_proj input
    attn += (nh * dr + dr) * c  # RoPE inputs
    attn += (2 * nh * dqk + 2 * nh * dv) * c  # SDPA: q, k, v, output
    attn += nh * dv * li  # o_proj input
    ffn = H * n  # post-attention norm input
    if moe:
        I, k, E = mc.moe_intermediate_size, mc.num_experts_per_tok, mc.n_routed_experts
        ffn += H * 4 + E * 4  # router: fp32 input and scores
        per_expert = H * li + 2 * I * c + I * li + H * c  # input, gate/up out, down input, output (combine)
        ffn += k * per_expert
        if mc.n_shared_experts:
            Is = mc.n_shared_experts * I
            ffn += H * li + 2 * Is * c + Is * li
    else:
        Id = mc.intermediate_size
        ffn += H * li + 2 * Id * c + Id * li
    return float(attn + ffn)


def head_activation_bytes(cfg: Config, precision: str) -> float:
    """Per token: final norm, head input, logits (compute dtype), fp32 logits and softmax, x (1 + MTP depth)."""
    mc = cfg.model
    c = 4 if precision == "fp32" else 2
    logits = mc.vocab_size * (c + 8) if precision != "fp32" else mc.vocab_size * 8
    return float((mc.hidden_size * (4 + c) + logits) * (1 + mc.num_nextn_predict_layers))


def mtp_extra_bytes(cfg: Config, precision: str) -> float:
    """An MTP module besides its block: enorm/hnorm inputs and the eh_proj input, per token."""
    li = 1 if precision == "fp8" else (4 if precision == "fp32" else 2)
    return float(2 * cfg.model.hidden_size * (4 + li) + cfg.model.hidden_size * 4)


# ---------------------------------------------------------------- memory per rank
@dataclass
class RankMemory:
    rank: int
    units: list[str]
    params: int  # parameters this rank stores (after tp/ep split, before data-parallel sharding)
    weights: float
    grads: float
    optimizer: float
    compute_copies: float
    activations: float
    buffers: float  # logits/softmax of the head, EP dispatch buffers: one micro-batch at a time
    overhead: float
    in_flight: float
    total: float = 0.0
    notes: list[str] = field(default_factory=list)

    def gib(self) -> dict[str, Any]:
        """The figures in GiB (counts and names as they are)."""
        return {k: (round(v / GiB, 6) if k in BYTE_FIELDS else v) for k, v in asdict(self).items()}


BYTE_FIELDS = ("weights", "grads", "optimizer", "compute_copies", "activations", "buffers", "overhead", "total")


def data_parallel_mode(cfg: Config) -> str:
    """What parallel/parallelize.py does: no wrapping on one process or without data parallelism
    under FSDP ("single"), else the configured fsdp | zero1."""
    p = cfg.parallel
    world = layout.layout_size(p)
    if world == 1 or (p.data_parallel == "fsdp" and p.dp_replicate * p.dp_shard == 1):
        return "single"
    return p.data_parallel


def rank_memory(cfg: Config, rank: int, units: list[Unit], recompute: str, overhead_gb: float) -> RankMemory:
    p, t, mc = cfg.parallel, cfg.train, cfg.model
    precision = t.precision
    tp, ep = p.tp, p.ep
    edp = max(1, p.dp_shard // ep)
    dense = sum(u.dense for u in units) / tp
    expert = sum(u.expert for u in units) / ep
    fp8_w = (sum(u.fp8_dense for u in units) / tp + sum(u.fp8_expert for u in units) / ep)
    moments = 4 if cfg.optim.bf16_moments else 8
    mode = data_parallel_mode(cfg)
    if mode == "single":  # plain AdamW on whole parameters
        weights = 4 * (dense + expert)
        grads = weights
        optimizer = moments * (dense + expert)
    elif mode == "fsdp":
        d_shard, e_shard = p.dp_shard, edp
        weights = 4 * (dense / d_shard + expert / e_shard)
        grads = weights
        optimizer = moments * (dense / d_shard + expert / e_shard)
    else:  # zero1: replicated weights and grads; fp32 master + moments sharded over data parallel
        d_opt, e_opt = p.dp_replicate * p.dp_shard, p.dp_replicate * edp
        weights = 4 * (dense + expert)
        grads = weights
        optimizer = (4 + moments) * (dense / d_opt + expert / e_opt)

    layer_units = [u for u in units if u.layer]
    tokens = t.micro_batch_size * t.seq_len
    flight = in_flight(cfg, rank)
    compute = 0.0
    if precision != "fp32" or mode == "fsdp":
        if mode == "fsdp":
            c = 4 if precision == "fp32" else 2
            if p.pp > 1:  # stage roots stay unsharded from forward to backward (parallel/pipeline.py)
                compute = c * (dense + expert)
            else:  # two blocks gathered at a time (current + prefetch), compute dtype
                biggest = sorted((u.dense / tp + u.expert / ep for u in units), reverse=True)[:2]
                compute = c * sum(biggest)
        else:  # autocast copies of the replicated weights (not of the embedding: a lookup, never cast)
            embedding = sum(u.dense for u in units if u.name == "embedding") / tp
            compute = 2 * (dense + expert - embedding - fp8_w)
    if precision == "fp8":  # quantised weights saved by each FP8 GEMM for its micro-batch's backward
        compute += 1 * fp8_w * (flight if recompute == "none" else 1)

    per_token = 0.0
    biggest_layer = 0.0
    for u in layer_units:
        b = layer_activation_bytes(cfg, u.moe, precision) + (mtp_extra_bytes(cfg, precision) if u.mtp else 0.0)
        biggest_layer = max(biggest_layer, b)
        per_token += b if recompute == "none" else mc.hidden_size * 4  # full: only the block's input
    if recompute == "full":
        per_token_flight = per_token * flight + biggest_layer  # one block's activations while it recomputes
    else:
        per_token_flight = per_token * flight
    activations = tokens * per_token_flight / tp

    buffers = 0.0
    if any(u.name == "head" for u in units):
        head_mb = (t.grad_accum_steps if (p.pp > 1 and p.pipeline_schedule == "GPipe") else 1)
        buffers += tokens * head_activation_bytes(cfg, precision) * head_mb / tp
    if ep > 1 and any(u.moe for u in layer_units):  # all-to-all send + receive of one layer, compute dtype
        c = 4 if precision == "fp32" else 2
        buffers += 2 * tokens * mc.num_experts_per_tok * mc.hidden_size * c / tp
    overhead = overhead_gb * GiB
    rm = RankMemory(
        rank=rank, units=[u.name for u in units], params=int(dense + expert), weights=weights, grads=grads,
        optimizer=optimizer, compute_copies=compute, activations=activations, buffers=buffers,
        overhead=overhead, in_flight=round(flight, 2),
    )
    rm.total = weights + grads + optimizer + compute + activations + buffers + overhead
    return rm


def _compact(names: list[str]) -> str:
    """'embedding, layer 0, layer 1, layer 2' -> 'embedding, layers 0-2'."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}")
            run.clear()

    for n in names:
        if n.startswith("layer ") and (not run or int(n[6:]) == run[-1] + 1):
            run.append(int(n[6:]))
        else:
            flush()
            if n.startswith("layer "):
                run.append(int(n[6:]))
            else:
                out.append(n)
    flush()
    return ", ".join(out)


# ---------------------------------------------------------------- layout checks
def check_layout(cfg: Config, gpus: Optional[int]) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the layout on `gpus` GPUs (None: the layout's own product)."""
    p, mc = cfg.parallel, cfg.model
    errors: list[str] = []
    warnings: list[str] = []
    world = layout.layout_size(p)
    if gpus is not None and world != gpus:
        rest = p.pp * p.dp_replicate * p.tp
        fix = (f"; e.g. parallel.dp_shard={gpus // rest}" if gpus % rest == 0 else "")
        errors.append(
            f"parallel: pp({p.pp}) x dp_replicate({p.dp_replicate}) x dp_shard({p.dp_shard}) x tp({p.tp}) = {world}, "
            f"but there are {gpus} GPUs; make the product equal the number of GPUs{fix}"
        )
    if p.ep > 1 and mc.n_group > 1 and mc.topk_group < mc.n_group and p.ep % mc.n_group and mc.n_group % p.ep:
        warnings.append(
            f"parallel.ep={p.ep} does not line up with model.n_group={mc.n_group}: expert groups straddle EP "
            "ranks, so group-limited routing (topk_group) no longer bounds how many ranks a token reaches; "
            "use an ep that divides or is a multiple of n_group"
        )
    if p.pp > 1:
        _, v = pipeline_shape(cfg)
        stages = p.pp * v
        if mc.num_hidden_layers >= stages and mc.num_hidden_layers % stages:
            warnings.append(
                f"parallel.pp: {mc.num_hidden_layers} layers over {stages} stages are uneven "
                f"({mc.num_hidden_layers // stages}-{-(-mc.num_hidden_layers // stages)} layers each); the stages "
                "holding the embedding or head and MTP are heavier still (parallel.pipeline_layers_per_stage)"
            )
        m = microbatches(cfg)
        if m < p.pp:
            warnings.append(f"parallel.pp: {m} micro-batches per step leave {p.pp} stages mostly idle; "
                            f"raise train.grad_accum_steps well above pp={p.pp}")
    try:  # the runtime's own rules (parallel/layout.py), including what this build cannot run yet
        layout.check(p, mc)  # the process count is checked above, in GPUs
        if p.pp > 1:
            layout.check_microbatches(p, microbatches(cfg))
    except layout.LayoutError as e:
        msg = str(e)
        if any(s in msg for s in NOT_YET):
            warnings.append(f"this build cannot run the layout yet: {msg}")
        else:
            errors.append(msg)
    if p.data_parallel == "fsdp" and p.dp_shard == 1 and p.dp_replicate > 1:
        warnings.append("parallel.data_parallel=fsdp with dp_shard=1 shards nothing; use zero1 or raise dp_shard")
    return errors, warnings


# ---------------------------------------------------------------- the plan
def plan(cfg: Config, gpus: Optional[int] = None, gpu_mem_gb: float = 80.0, recompute: str = "none",
         overhead_gb: float = 3.0) -> dict[str, Any]:
    counts = count_model(cfg.model, cfg.train.seq_len)
    out: dict[str, Any] = asdict(counts)
    tokens_per_step = cfg.global_batch_sequences * cfg.train.seq_len
    out.update(
        seq_len=cfg.train.seq_len,
        tokens_per_step=tokens_per_step,
        flops_per_step=counts.flops_per_token * tokens_per_step,
    )
    p = cfg.parallel
    world = layout.layout_size(p)
    out["gpus"] = gpus if gpus is not None else world
    out["layout"] = {
        "pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "ep": p.ep,
        "edp": max(1, p.dp_shard // p.ep), "data_parallel": data_parallel_mode(cfg), "pipeline_schedule": p.pipeline_schedule,
        "microbatches": microbatches(cfg), "precision": cfg.train.precision, "recompute": recompute,
    }
    errors, warnings = check_layout(cfg, gpus)
    ranks, chunk_layers = stage_units(cfg)
    mems = [rank_memory(cfg, r, units, recompute, overhead_gb) for r, units in enumerate(ranks)]
    worst = max(mems, key=lambda m: m.total)
    budget = gpu_mem_gb * GiB
    fits = worst.total <= budget
    if errors:
        verdict = "invalid layout"
    elif fits:
        verdict = "fits" if worst.total <= 0.9 * budget else "fits (tight: over 90%)"
    else:
        verdict = "does not fit"
    if not fits and recompute == "none":
        full = max(rank_memory(cfg, r, u, "full", overhead_gb).total for r, u in enumerate(ranks))
        if full <= budget:
            warnings.append(
                f"needs {worst.total / GiB:.1f} GiB on pipeline rank {worst.rank} with every activation kept; "
                f"full activation recomputation would bring it to {full / GiB:.1f} GiB (--recompute full)"
            )
    out["memory"] = {
        "gpu_mem_gb": gpu_mem_gb,
        "fits": fits and not errors,
        "verdict": verdict,
        "worst_rank": worst.rank,
        "per_rank_gb": worst.gib(),
        "ranks": [m.gib() for m in mems],
        "layers_per_stage": chunk_layers,
    }
    out["errors"] = errors
    out["warnings"] = warnings
    return out


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def print_plan(result: dict[str, Any], config: str) -> None:
    print(f"model: {config}")
    print(f"  parameters        {_human(result['params_total'])} total "
          f"({_human(result['params_total_no_mtp'])} without MTP)")
    print(f"  activated/token   {_human(result['params_active'])} "
          f"({_human(result['params_active_no_mtp'])} without MTP)")
    print(f"  FLOPs/token       {_human(result['flops_per_token'])} (training, seq {result['seq_len']})")
    print(f"  FLOPs/step        {_human(result['flops_per_step'])} ({_human(result['tokens_per_step'])} tokens)")
    lay, mem = result["layout"], result["memory"]
    print(f"layout: {result['gpus']} GPUs = pp {lay['pp']} x dp_replicate {lay['dp_replicate']} x dp_shard "
          f"{lay['dp_shard']} x tp {lay['tp']}; ep {lay['ep']} (expert dp {lay['edp']}), {lay['data_parallel']}, "
          f"{lay['precision']}" + (f", {lay['pipeline_schedule']} x {lay['microbatches']} micro-batches"
                                   if lay["pp"] > 1 else ""))
    w = mem["per_rank_gb"]
    print(f"memory per GPU (GiB, busiest rank {w['rank']}: {_compact(w['units'])}; recompute {lay['recompute']}):")
    for key, label in (("weights", "weights"), ("grads", "gradients"), ("optimizer", "optimizer states"),
                       ("compute_copies", "bf16/fp8 weight copies"), ("activations", "activations"),
                       ("buffers", "logits + dispatch buffers"), ("overhead", "CUDA/NCCL overhead")):
        extra = f"  ({w['in_flight']:g} micro-batches in flight)" if key == "activations" else ""
        print(f"  {label:<26}{w[key]:>9.2f}{extra}")
    print(f"  {'total':<26}{w['total']:>9.2f} of {mem['gpu_mem_gb']:g} -> {mem['verdict']}")
    if len(mem["ranks"]) > 1:
        print("  per pipeline rank: " + " ".join(f"{r['total']:.1f}" for r in mem["ranks"]))
    for wmsg in result["warnings"]:
        print(f"warning: {wmsg}")
    for e in result["errors"]:
        print(f"error: {e}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: the layout's product)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--recompute", choices=("none", "full"), default="none",
                   help="activation recomputation to assume (moeforge trains with none)")
    p.add_argument("--overhead-gb", type=float, default=3.0, help="fixed per-GPU overhead in GiB (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        p.error("--gpus must be >= 1")
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.gpus)  # dp_shard auto fills --gpus
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = plan(cfg, args.gpus, args.gpu_mem_gb, args.recompute, args.overhead_gb)
    if args.json:
        print(json.dumps(result))
    else:
        print_plan(result, args.config)
    return 2 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
