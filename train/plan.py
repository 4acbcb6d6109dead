"""`python -m train.plan --config FILE [--gpus N] [--gpu-mem-gb 80] [--recompute none|selective|full] [--json] [key=value ...]`

Parameters (total, activated per token), training FLOPs per token, and the memory each rank
needs under the configured layout and precision, with a verdict for a given GPU memory and the
layout's known problems. Computed on the meta device: nothing is allocated, so the 671B preset
plans in seconds on a laptop. Exit status 2 when the config or the layout cannot work.

Memory model (per rank, bytes; GiB = 2**30 in the output), matching what moeforge runs:

* Stages: parallel/layout.py's split and placement (pp x stages-per-rank stages; the embedding on
  the first, final norm + head + MTP on the last, which keeps its own embedding copy for MTP when it
  lives on another rank; V schedules put stages r and 2pp-1-r on rank r, loop schedules stage s on
  rank s % pp). Every figure is for the busiest rank; the text output also lists each rank's total.
* Sharding. Non-expert weights split over tp as the TP plan splits them (the norms, MLA's q_a / kv_a,
  the router and MTP's eh_proj stay whole on every tp rank), routed experts over ep. FSDP2 (`fsdp`) shards
  weights, gradients and optimizer states over dp_shard (dense) / dp_shard / ep (experts; the
  dp_replicate dimension replicates: HSDP). ZeRO-1 (`zero1`) keeps weights and gradients whole and
  shards the optimizer (fp32 master copy + moments) over all data-parallel ranks (dense) / the
  expert-data-parallel ranks (experts). One process, or FSDP without data parallelism, wraps
  nothing: plain AdamW on whole parameters. DeepSpeed (`deepspeed`, deepspeed_memory): ZeRO-1 as zero1,
  ZeRO-2 also partitions gradients, offload_optimizer=cpu moves the optimizer states to host memory
  (reported apart, not in the GPU total); plus DeepSpeed's contiguous reduce bucket.
* Precision. Parameters are fp32 masters in every mode, gradients fp32, AdamW moments fp32 (bf16 with
  optim.bf16_moments). Weight copies ("bf16/fp8 weight copies"): FSDP2 gathers two blocks at a time in
  bf16 (a pipeline stage keeps all of its blocks gathered from forward to backward). Without FSDP,
  autocast casts every Linear / expert weight again in each micro-batch's forward and that graph saves
  the copy, so bf16 copies count once per micro-batch in flight (the fused head's cast is transient;
  router and norms stay fp32; under TP the head is not fused and its cast is saved: once per
  micro-batch, under SP once per head call, main and every MTP depth). FP8 GEMMs share one quantised copy per weight per optimizer step
  (models.fp8.QuantisedWeights: 1 byte + one fp32 scale per 128 x 128 block), except under FSDP2, whose
  re-gather writes the weight each micro-batch (a new version, so a new copy per micro-batch in flight).
* Activations: train/activations.py, term by term what the code saves for backward, per token and
  layer kind, for fp32 / bf16 / fp8 and every train.recompute mode (parallel/recompute.py's semantics);
  tests/test_plan_measured.py checks it against the bytes autograd saves on CPU, also on a TP2 rank.
  Under tensor parallelism the per-head / per-column tensors (attention core, o_proj's input, SwiGLU
  widths, the vocab-parallel log-softmax) are split over tp; with parallel.sequence_parallel (the default)
  the stream between TP regions (norms, residuals, MLA's down-projection inputs, router, routed experts,
  MTP's enorm/hnorm/eh_proj) is split too, while what the column-parallel projections save after their
  all-gather stays whole: MLA's latents (or its input without q_lora), the SwiGLU input of dense MLPs and
  shared experts, the head's input (measured on tiny, 2 layers, fp32, 2 x 48 tokens: a TP2+SP rank saves
  0.55x of the single process, a plain TP2 rank 0.74x; both predicted within 0.1%). A block recomputed
  whole keeps its input and, under EP, the rows its all-to-alls moved; one such block's activations live
  again while it recomputes.
* Buffers, one micro-batch at a time: the head (final norm, and the fused head+CE's grad_h and fp32
  weight gradient, for the main head and every MTP depth), the EP all-to-all send and receive rows of
  one layer, and under fp8 the emulated expert GEMM's transient fp32 gate_up weights of one layer.
* Micro-batches in flight on a rank: 1 without PP; GPipe all; 1F1B pp - rank; interleaved
  schedules their warm-up depth; V-shaped schedules per stage, from torch's action lists
  (`v_stage_peaks`): DualPipeV 2pp - r micro-batches of rank r's first stage and r + 1 of its second
  (2pp + 1 stage-micro-batches: the DualPipe table's PP + 1 counts its 2pp stages), ZBVZeroBubble 2pp.
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
from parallel.deepspeed_engine import REDUCE_BUCKET_ELEMENTS
from train.activations import ActivationModel, Recompute
from train.config import Config, ConfigError, load_config
from train.plan_comm import comm_predicted, predict_comm

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
    cast: int = 0  # non-expert weights a bf16 GEMM saves a cast copy of (Linears; not the fused head, router, norms)
    cast_expert: int = 0  # routed-expert weights likewise (all of them)
    tp_whole: int = 0  # non-expert parameters every tp rank keeps whole (norms, q_a / kv_a, router, eh_proj)
    fp8_tp_whole: int = 0  # of which FP8
    cast_tp_whole: int = 0  # of which a bf16 GEMM casts
    moe: bool = False  # a layer with routed experts
    layer: bool = False  # a transformer block (or an MTP module's block)
    mtp: bool = False
    position: int = -1  # model position of a block: decoder layer i, or L + k for MTP depth k + 1
    stage: int = 0  # pipeline stage holding it (stage_units)


def _is_expert(name: str) -> bool:
    return ".experts." in name  # parallel.expert_parallel.is_expert_param without importing parallel


def _fp8_selected(name: str, cfg: Config) -> bool:
    from train.precision import fp8_selected

    return fp8_selected(name, cfg.train.fp8.modules, cfg.train.fp8.exclude)


def model_units(cfg: Config) -> tuple[Unit, list[Unit], Unit, list[Unit]]:
    """(embedding, layers, head, mtp modules) with parameter counts, from the meta-device model."""
    from torch import nn

    from models.experts import GroupedExperts
    from models.head_loss import fused_head_applies

    from parallel.sequence_parallel import replicated_parameter_names

    model = build_meta_model(cfg.model)
    tp_whole = set(replicated_parameter_names(model))  # the TP plan (with or without SP) splits the rest
    fp8_params: set[int] = set()
    if cfg.train.precision == "fp8":
        for name, module in model.named_modules():
            if name and isinstance(module, (nn.Linear, GroupedExperts)) and _fp8_selected(name, cfg):
                fp8_params.update(id(p) for p in module.parameters(recurse=False))
    cast_params = {id(p) for name, m in model.named_modules() if isinstance(m, (nn.Linear, GroupedExperts))
                   and not (name == "lm_head" and fused_head_applies(m)) for p in m.parameters(recurse=False)}

    embed, head = Unit("embedding"), Unit("head")
    L = cfg.model.num_hidden_layers
    layers = [Unit(f"layer {i}", moe=cfg.model.is_moe_layer(i), layer=True, position=i) for i in range(L)]
    mtps = [Unit(f"mtp {k + 1}", moe=cfg.model.is_moe_layer(L + k), layer=True, mtp=True, position=L + k)
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
            unit.cast_expert += n if id(p) in cast_params else 0
            unit.expert += n
            unit.fp8_expert += n if id(p) in fp8_params else 0
        else:
            unit.cast += n if id(p) in cast_params else 0
            unit.dense += n
            unit.fp8_dense += n if id(p) in fp8_params else 0
            if name in tp_whole:
                unit.tp_whole += n
                unit.cast_tp_whole += n if id(p) in cast_params else 0
                unit.fp8_tp_whole += n if id(p) in fp8_params else 0
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
        for u in chunk:
            u.stage = s
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
    if style == "v":  # the heavier peak of the V's two stages, counted in all-layer units
        return max(sum(c.values()) for c in v_stage_peaks(name, p.pp, m, rank)) / 2
    if style == "loop":  # interleaved warm-up: (v - 1) pp + 2 (pp - rank - 1) + 1 stage-forwards
        return min(m * v, (v - 1) * p.pp + 2 * (p.pp - rank - 1) + 1) / v
    return float(max(1, min(m, p.pp - rank)))  # 1F1B


def v_stage_peaks(name: str, pp: int, m: int, rank: int) -> list[dict[int, int]]:
    """Micro-batches in flight on each of a V-shaped rank's two stages (r and 2pp-1-r) at its peaks: a
    stage's micro-batch holds its activations from its forward to its weight gradient (W, or the full
    backward). The rank's peak is the heaviest of these candidates, by its stages' bytes per micro-batch.
    From torch's schedules (torch.distributed.pipelining, m >= 2pp as parallel/layout.py requires;
    tests/test_plan.py replays their action lists):
      DualPipeV      one peak: 2pp - r of the first stage, r + 1 of the second (2pp + 1 stage-micro-batches:
                     the DualPipe table's PP + 1 with PP = its 2pp stages). Rank 0, which holds the embedding's
                     stage and the head's, keeps 2pp of the first and one of the last.
      ZBVZeroBubble  2pp - 1 - r and r + 1, or 2pp - r and r (2pp stage-micro-batches)."""
    first, second = rank, 2 * pp - 1 - rank
    if name == "DualPipeV":
        peaks = [(2 * pp - rank, rank + 1)]
    else:  # ZBVZeroBubble
        peaks = [(2 * pp - 1 - rank, rank + 1), (2 * pp - rank, rank)]
    return [{first: min(m, a), second: min(m, b)} for a, b in peaks]


def stage_flights(cfg: Config, rank: int) -> list[Optional[dict[int, int]]]:
    """Candidate peaks of a rank as micro-batches in flight per stage (V-shaped schedules), or [None]: every
    stage of the rank holds `in_flight` micro-batches."""
    p = cfg.parallel
    if p.pp > 1 and pipeline_shape(cfg)[0] == "v":
        try:
            return v_stage_peaks(layout.schedule_name(p), p.pp, microbatches(cfg), rank)
        except layout.LayoutError:  # reported by check_layout
            pass
    return [None]


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
    in_flight: float  # in all-layer units (V-shaped: half the stage-micro-batches of its two stages)
    in_flight_per_stage: dict[int, int] = field(default_factory=dict)  # V-shaped: stage -> micro-batches at the peak
    total: float = 0.0
    notes: list[str] = field(default_factory=list)
    host: float = 0.0  # host (CPU) memory: DeepSpeed's offloaded optimizer state; not in total
    host_ema: float = 0.0  # CPU memory, not in `total`: the weights' EMA (train.ema_decay), averages + snapshot

    def gib(self) -> dict[str, Any]:
        """The figures in GiB (counts and names as they are)."""
        return {k: (round(v / GiB, 6) if k in BYTE_FIELDS else v) for k, v in asdict(self).items()}


BYTE_FIELDS = ("weights", "grads", "optimizer", "compute_copies", "activations", "buffers", "overhead", "total",
               "host", "host_ema")


def data_parallel_mode(cfg: Config) -> str:
    """What parallel/parallelize.py does: no wrapping on one process or without data parallelism
    under FSDP ("single"), else the configured fsdp | zero1."""
    p = cfg.parallel
    world = layout.layout_size(p)
    if world == 1 or (p.data_parallel == "fsdp" and p.dp_replicate * p.dp_shard == 1):
        return "single"
    return p.data_parallel


def deepspeed_memory(cfg: Config, dense: float, expert: float, edp: int) -> tuple[float, float, float, float, float]:
    """(weights, grads, optimizer, host, reduce bucket) bytes under DeepSpeed ZeRO-1/2 (parallel/deepspeed_engine.py).

    Parameters stay fp32 and whole. ZeRO-1 keeps whole gradients, ZeRO-2 only this rank's partition. The
    fp32 master partition and the AdamW moments (12 bytes a parameter) are split over the data-parallel
    ranks (dense) / the expert-data-parallel ranks (experts); with offload_optimizer=cpu they, and the fp32
    gradient partition the update reads, live in host memory. The contiguous reduce bucket holds up to
    REDUCE_BUCKET_ELEMENTS fp32 gradients."""
    ds = cfg.parallel.deepspeed
    weights = 4 * (dense + expert)
    partition = dense / cfg.parallel.dp_shard + expert / edp
    grads = 4 * partition if ds.zero_stage == 2 else weights
    state = 12 * partition
    bucket = 4 * min(REDUCE_BUCKET_ELEMENTS, dense + expert)
    if ds.offload_optimizer == "cpu":
        return weights, grads, 0.0, state + 4 * partition, bucket
    return weights, grads, state, 0.0, bucket


def _per_tp_rank(params: float, whole: float, tp: int) -> float:
    """Of `params`, what one tp rank holds: the tp-split ones / tp, the `whole` ones entire."""
    return (params - whole) / tp + whole


def _copies_and_activations(cfg: Config, units: list[Unit], flights: list[float], recompute: Recompute,
                            am: ActivationModel, mode: str) -> tuple[float, float]:
    """(weight copies, activations) of a rank whose units have `flights` micro-batches in flight each."""
    p, t, mc, precision = cfg.parallel, cfg.train, cfg.model, cfg.train.precision
    tp, ep = p.tp, p.ep
    # Micro-batches whose graphs keep a unit's weight copies: a block recomputed whole keeps none between
    # its forward and its backward, only while it recomputes (one at a time).
    unit_flight = [1.0 if u.layer and recompute.full_block(u.position) else f for u, f in zip(units, flights)]
    fp8_units = [(_per_tp_rank(u.fp8_dense, u.fp8_tp_whole, tp) + u.fp8_expert / ep) * (1 + 4 / 128**2)
                 for u in units]  # E4M3 weights + one fp32 scale per 128 x 128 block
    quantised = sum(fp8_units)
    compute = 0.0
    if mode == "fsdp":
        if precision != "fp32" or p.pp > 1:
            c = 4 if precision == "fp32" else 2
            held = [_per_tp_rank(u.dense, u.tp_whole, tp) + u.expert / ep for u in units]
            if p.pp > 1:  # stage roots stay unsharded from forward to backward (parallel/pipeline.py)
                compute = c * sum(held)
            else:  # two blocks gathered at a time (current + prefetch), compute dtype
                compute = c * sum(sorted(held, reverse=True)[:2])
        if precision == "fp8":  # every re-gather writes the weight (a new version): quantised per micro-batch
            compute += sum(q * f for q, f in zip(fp8_units, flights))
    elif precision != "fp32":
        # autocast casts each weight again in every micro-batch's forward, and that graph saves the copy;
        # FP8 GEMMs instead share one quantised copy per weight per step (models.fp8.QuantisedWeights)
        fp8 = precision == "fp8"
        compute = sum(2 * (_per_tp_rank(u.cast - (u.fp8_dense if fp8 else 0), u.cast_tp_whole - (u.fp8_tp_whole if fp8 else 0), tp)
                           + (u.cast_expert - (u.fp8_expert if fp8 else 0)) / ep)
                      * f for u, f in zip(units, unit_flight))
        compute += quantised if fp8 else 0.0
    head_flight = [f for u, f in zip(units, flights) if u.name == "head"]
    if tp > 1 and precision != "fp32" and not am.fp8_head and head_flight:
        # the head is not fused under TP: its forward saves the cast of this rank's vocabulary rows -- once per
        # micro-batch under plain TP (autocast caches the cast of the DTensor leaf), once per head call (main
        # and every MTP depth) under SP, whose per-call to_local is no leaf autocast caches
        calls = 1 + mc.num_nextn_predict_layers if layout.sequence_parallel(p) else 1
        compute += 2 * mc.vocab_size * mc.hidden_size / tp * calls * head_flight[0]

    kept, recomputing = 0.0, 0.0  # bytes per token: over the micro-batches in flight, and of one block recomputing
    for u, f in zip(units, flights):
        if u.layer:
            kept += (am.block(u.moe, u.position, u.mtp) + (am.mtp_extra() if u.mtp else 0.0) + 8.0 * u.mtp) * f
            if recompute.full_block(u.position):  # one block's activations while it recomputes
                recomputing = max(recomputing, am.block_whole(u.moe, u.mtp))
        elif u.name == "embedding":
            kept += 8.0 * f  # the token ids the lookup saves
    # this rank's bytes: the tp / sequence-parallel splits are in the per-token terms (train/activations.py)
    return compute, t.micro_batch_size * t.seq_len * (kept + recomputing)


def rank_memory(cfg: Config, rank: int, units: list[Unit], recompute: Recompute, overhead_gb: float) -> RankMemory:
    p, t, mc = cfg.parallel, cfg.train, cfg.model
    precision = t.precision
    tp, ep = p.tp, p.ep
    edp = max(1, p.dp_shard // ep)
    dense = sum(_per_tp_rank(u.dense, u.tp_whole, tp) for u in units)
    expert = sum(u.expert for u in units) / ep
    moments = 4 if cfg.optim.bf16_moments else 8
    mode = data_parallel_mode(cfg)
    host = ds_bucket = 0.0
    if mode == "deepspeed":
        weights, grads, optimizer, host, ds_bucket = deepspeed_memory(cfg, dense, expert, edp)
    elif mode == "single":  # plain AdamW on whole parameters
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
    fp8_head = precision == "fp8" and _fp8_selected("lm_head", cfg)
    am = ActivationModel(mc, precision, recompute, t.micro_batch_size, tp, fp8_head, layout.sequence_parallel(p))
    names = {u.name for u in units}
    compute, activations, per_stage = -1.0, -1.0, {}
    for peak in stage_flights(cfg, rank):  # the heaviest candidate peak of the rank
        flights = [float(flight if peak is None else peak[u.stage]) for u in units]
        c_peak, a_peak = _copies_and_activations(cfg, units, flights, recompute, am, mode)
        if c_peak + a_peak > compute + activations:
            compute, activations, per_stage = c_peak, a_peak, dict(peak or {})

    buffers = 0.0
    if "head" in names:  # one micro-batch at a time: its backward follows its forward on the last stage
        head_mb = (t.grad_accum_steps if (p.pp > 1 and p.pipeline_schedule == "GPipe") else 1)
        buffers += (tokens * am.head_per_token() + am.head_per_micro_batch()) * head_mb
    if ep > 1 and any(u.moe for u in layer_units):  # all-to-all send + receive of one layer, compute dtype
        c = 4 if precision == "fp32" else 2
        buffers += 2 * tokens * mc.num_experts_per_tok * mc.hidden_size * c / layout.sequence_shards(p)
    if precision == "fp8":  # the emulated expert GEMM dequantises one layer's gate_up weights to fp32 (transient)
        buffers += 4 * max((u.fp8_expert / ep for u in layer_units), default=0.0) * 2 / 3
    buffers += ds_bucket
    overhead = overhead_gb * GiB
    rm = RankMemory(
        rank=rank, units=[u.name for u in units], params=int(dense + expert), weights=weights, grads=grads,
        optimizer=optimizer, compute_copies=compute, activations=activations, buffers=buffers,
        overhead=overhead, in_flight=round(flight, 2), in_flight_per_stage=per_stage, host=host,
    )
    rm.total = weights + grads + optimizer + compute + activations + buffers + overhead
    # parallel/ema.py: two fp32 CPU buffers (average, snapshot) per parameter element this rank holds
    rm.host_ema = 2 * weights if t.ema_decay else 0.0
    return rm


def _flight_text(rank: dict[str, Any]) -> str:
    """'17 micro-batches', or per stage of a V: '32 micro-batches of stage 0 + 1 of stage 31'."""
    per_stage = rank.get("in_flight_per_stage") or {}
    if not per_stage:
        return f"{rank['in_flight']:g} micro-batches"
    (s0, n0), *rest = sorted(per_stage.items())
    return f"{n0} micro-batches of stage {s0}" + "".join(f" + {n} of stage {s}" for s, n in rest)


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
def recompute_of(cfg: Config, mode: Optional[str] = None) -> Recompute:
    """train.recompute* of the config, or `mode` (none | selective | full) with the config's modules / N."""
    t = cfg.train
    mode = mode or t.recompute
    if mode == "selective":
        return Recompute("selective", frozenset(t.recompute_modules))
    return Recompute(mode, num_layers=t.recompute_num_layers if mode == "full" else 0)


def describe_recompute(rc: Recompute) -> str:
    if rc.mode == "selective":
        return "selective (" + ", ".join(sorted(rc.modules)) + ")"
    if rc.mode == "full" and rc.num_layers:
        return f"full (every {rc.num_layers}-th block)"
    return rc.mode


def plan(cfg: Config, gpus: Optional[int] = None, gpu_mem_gb: float = 80.0, recompute: Optional[str] = None,
         overhead_gb: float = 3.0) -> dict[str, Any]:
    """The plan as one dict (see the module doc). recompute: none | selective | full, default train.recompute."""
    rc = recompute_of(cfg, recompute)
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
        "microbatches": microbatches(cfg), "precision": cfg.train.precision, "recompute": describe_recompute(rc),
    }
    errors, warnings = check_layout(cfg, gpus)
    ranks, chunk_layers = stage_units(cfg)
    mems = [rank_memory(cfg, r, units, rc, overhead_gb) for r, units in enumerate(ranks)]
    worst = max(mems, key=lambda m: m.total)
    budget = gpu_mem_gb * GiB
    fits = worst.total <= budget
    if errors:
        verdict = "invalid layout"
    elif fits:
        verdict = "fits" if worst.total <= 0.9 * budget else "fits (tight: over 90%)"
    else:
        verdict = "does not fit"
    if not fits and rc.mode != "full":
        full = max(rank_memory(cfg, r, u, Recompute("full"), overhead_gb).total for r, u in enumerate(ranks))
        if full <= budget:
            warnings.append(
                f"needs {worst.total / GiB:.1f} GiB on pipeline rank {worst.rank} with recompute "
                f"{describe_recompute(rc)}; full activation recomputation would bring it to {full / GiB:.1f} GiB "
                "(train.recompute=full)"
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
    am = ActivationModel(cfg.model, cfg.train.precision, rc, cfg.train.micro_batch_size, p.tp,
                         cfg.train.precision == "fp8" and _fp8_selected("lm_head", cfg), layout.sequence_parallel(p))
    out["memory"]["activation_terms_per_token"] = {  # one rank's bytes per token (of the micro-batch) of a block part
        "attention": am.attention_terms(4),
        "moe": am.moe_terms(4) if cfg.model.n_routed_experts else {},
    }
    # per rank and step, keyed as the ledger keys it (train/plan_comm.py); under a pipeline rank 0's as `comm`,
    # every pipeline rank's as `comm_by_pp_rank`
    if not errors and comm_predicted(p):
        out["comm"] = predict_comm(cfg)
        if p.pp > 1:
            out["comm_by_pp_rank"] = [predict_comm(cfg, r) for r in range(p.pp)]
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
        extra = f"  ({_flight_text(w)} in flight)" if key == "activations" else ""
        print(f"  {label:<26}{w[key]:>9.2f}{extra}")
    print(f"  {'total':<26}{w['total']:>9.2f} of {mem['gpu_mem_gb']:g} -> {mem['verdict']}")
    if w["host"]:
        print(f"  {'host memory (offload)':<26}{w['host']:>9.2f}  (optimizer states + fp32 gradient partition)")
    if w["host_ema"]:
        print(f"host memory per GPU's process (GiB, CPU, not in the total): EMA of the weights {w['host_ema']:.2f} "
              "(fp32 average + snapshot, train.ema_decay)")
    if len(mem["ranks"]) > 1:
        print("  per pipeline rank: " + " ".join(f"{r['total']:.1f}" for r in mem["ranks"]))
    if not mem["fits"]:
        terms = [(f"{part}: {name}", b) for part, ts in mem["activation_terms_per_token"].items() for name, b in ts.items()]
        top = sorted(terms, key=lambda t: -t[1])[:5]
        print(f"  largest activation terms (bytes per token of one block part, x micro-batches in flight "
              "x layers x tokens): " + "; ".join(f"{n} {b / 1024:.1f} KiB" for n, b in top))
    if "comm" in result:
        c = result["comm"]
        print(f"communication per GPU per step: {c['bytes'] / 2**20:.2f} MiB in {c['calls']} collectives "
              "(" + ", ".join(f"{k} {e['bytes'] / 2**20:.2f} MiB" for k, e in c["by"].items()) + ")")
    for wmsg in result["warnings"]:
        print(f"warning: {wmsg}")
    for e in result["errors"]:
        print(f"error: {e}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: the layout's product)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="activation recomputation to assume (default: the config's train.recompute; selective "
                        "uses its train.recompute_modules)")
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
