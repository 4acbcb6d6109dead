"""Layout rules, written once: which layouts can run, how the pipeline splits the model, where stages live.

Pure functions of the parallel config (`train.config.ParallelConfig`) and the model config; no
process group is touched. Config validation (`train/config.py`), mesh set-up (`parallel/mesh.py`),
the pipeline builder (`parallel/pipeline.py`) and the planner (`train/plan.py`) all ask this module.

Every refusal is a `LayoutError` whose message starts with the config key at fault and ends with
the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from models.config import ModelConfig


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the key and the fix."""


# ------------------------------------------------------------------------------------------ schedules
# name (case-insensitive in config, "_" ignored) -> (class name in torch.distributed.pipelining, placement style)
SCHEDULES: dict[str, tuple[str, str]] = {
    "GPipe": ("ScheduleGPipe", "single"),
    "1F1B": ("Schedule1F1B", "single"),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", "loop"),
    "LoopedBFS": ("ScheduleLoopedBFS", "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", "v"),
    "DualPipeV": ("ScheduleDualPipeV", "v"),
}
# Schedules that split the backward into input-gradient and weight-gradient passes.
SPLIT_BACKWARD = {"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"}


def schedule_name(parallel) -> str:
    """Canonical schedule name for parallel.pipeline_schedule (case-insensitive)."""
    wanted = str(parallel.pipeline_schedule).replace("_", "").lower()
    for name in SCHEDULES:
        if name.lower() == wanted:
            return name
    raise LayoutError(
        f"parallel.pipeline_schedule: unknown schedule {parallel.pipeline_schedule!r}; "
        f"choose one of {', '.join(SCHEDULES)}"
    )


def schedule_style(parallel) -> str:
    """Stage placement of the configured schedule: single (one stage per rank), loop or v."""
    return SCHEDULES[schedule_name(parallel)][1]


def schedule_class(name: str) -> type:
    """The torch.distributed.pipelining schedule class for a canonical name (a lookup, no process group)."""
    import torch
    import torch.distributed.pipelining.schedules as schedules

    cls = getattr(schedules, SCHEDULES[name][0], None)
    if cls is None:
        raise LayoutError(
            f"parallel.pipeline_schedule: {name} is not available in this torch ({torch.__version__}); "
            "pick another schedule"
        )
    return cls


# ------------------------------------------------------------------------------------------ stages
def stages_per_rank(parallel) -> int:
    """Virtual stages per pipeline rank: 1 for single schedules, 2 for V, parallel.pipeline_stages_per_rank (2) for loops."""
    name = schedule_name(parallel)
    style = SCHEDULES[name][1]
    v = getattr(parallel, "pipeline_stages_per_rank", None)
    if style == "single":
        if v not in (None, 1):
            raise LayoutError(
                f"parallel.pipeline_stages_per_rank: {name} runs one stage per rank, got {v}; "
                "leave it unset or pick Interleaved1F1B / InterleavedZeroBubble for virtual stages"
            )
        return 1
    if style == "v":
        if v not in (None, 2):
            raise LayoutError(f"parallel.pipeline_stages_per_rank: {name} needs exactly 2 stages per rank, got {v}")
        return 2
    v = 2 if v is None else v
    if v < 1:
        raise LayoutError(f"parallel.pipeline_stages_per_rank: must be >= 1, got {v}")
    return v


def stage_to_rank(stage: int, pp: int, style: str) -> int:
    """Pipeline rank of a stage: a loop (stage s on rank s mod pp) or a V (stages r and 2pp-1-r on rank r)."""
    if style == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def even_split(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage when split evenly, the first stages taking one more when it does not divide."""
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def split_layers(parallel, model: "ModelConfig") -> list[list[int]]:
    """Layer indices of every stage (stage order): even, or parallel.pipeline_layers_per_stage;
    parallel.pipeline_mtp_stage gives the head + MTP a last stage without transformer layers."""
    n_stages = parallel.pp * stages_per_rank(parallel)
    n_layers = model.num_hidden_layers
    has_mtp = model.num_nextn_predict_layers > 0
    counts = getattr(parallel, "pipeline_layers_per_stage", None)
    mtp_stage = bool(getattr(parallel, "pipeline_mtp_stage", False))
    if counts:
        counts = list(counts)
        if len(counts) != n_stages:
            raise LayoutError(
                f"parallel.pipeline_layers_per_stage: {len(counts)} entries for {n_stages} stages "
                f"(pp={parallel.pp} x {n_stages // parallel.pp} stages per rank); give one count per stage"
            )
        if sum(counts) != n_layers or any(c < 0 for c in counts):
            raise LayoutError(
                f"parallel.pipeline_layers_per_stage: {counts} must be non-negative and sum to "
                f"model.num_hidden_layers={n_layers}"
            )
    else:
        body = n_stages - 1 if mtp_stage else n_stages
        if mtp_stage and not has_mtp:
            raise LayoutError("parallel.pipeline_mtp_stage: the model has no MTP modules (num_nextn_predict_layers=0)")
        if body < 1 or n_layers < body:
            raise LayoutError(
                f"parallel.pp: {n_stages} pipeline stages (pp={parallel.pp} x {n_stages // parallel.pp} per rank"
                f"{', one for MTP' if mtp_stage else ''}) cannot split model.num_hidden_layers={n_layers}; "
                "use fewer stages or more layers (at most one stage per layer)"
            )
        counts = even_split(n_layers, body) + ([0] if mtp_stage else [])
    for i, c in enumerate(counts):
        if c == 0 and not (i == n_stages - 1 and has_mtp):
            raise LayoutError(
                f"parallel.pp: stage {i} of {n_stages} would hold no transformer layers "
                f"(split {counts}); only the last stage may be empty, and only when it holds MTP; "
                "use fewer stages or set parallel.pipeline_layers_per_stage"
            )
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def check_microbatches(parallel, n_micro: int, key: str = "parallel.pipeline_microbatches") -> None:
    """Micro-batches per step vs stages and schedule (the schedule classes' own requirements).
    `key` names the setting that gives the count (train.grad_accum_steps at config load)."""
    name = schedule_name(parallel)
    pp = parallel.pp
    n_stages = pp * stages_per_rank(parallel)
    style = SCHEDULES[name][1]
    if name == "1F1B" or style == "v":
        need = n_stages if style == "v" else pp
        if n_micro < need:
            raise LayoutError(
                f"{key}: {name} needs at least {need} micro-batches per step "
                f"({'stages' if style == 'v' else 'pp'}={need}), got {n_micro}; "
                f"raise train.grad_accum_steps to at least {need}"
            )
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_micro // pp)  # the schedules run the micro-batches in max(1, m // pp) rounds
        if n_micro % rounds:
            raise LayoutError(
                f"{key}: {name} needs the micro-batch count ({n_micro}) to be a "
                f"multiple of max(1, m // pp) = {rounds}; use a multiple of pp={pp}"
            )


# ------------------------------------------------------------------------------------------ data parallelism
def fsdp_applies(parallel) -> bool:
    """Whether FSDP2 wraps the model: data_parallel=fsdp with more than one data-parallel rank or
    with tensor parallelism (a pipeline-only layout has nothing to shard and skips it)."""
    dp = parallel.dp_replicate * resolve_dp_shard(parallel, None)
    return parallel.data_parallel == "fsdp" and (dp > 1 or parallel.tp > 1)


def check_deepspeed(parallel) -> None:
    """Layouts the DeepSpeed engine (parallel/deepspeed_engine.py) runs; the others are refused, with why."""
    if parallel.deepspeed.zero_stage == 3:
        raise LayoutError(
            "parallel.deepspeed.zero_stage: 3 is refused: ZeRO-3 partitions every parameter over all data-parallel "
            "ranks as if it were replicated, but under expert parallelism (ep > 1) each rank holds different experts "
            "(DeepSpeed refuses MoE under ZeRO-3); with ep=1 it misses the single-process gradients (DeepSpeed "
            "0.19.8: grad norm 0.68 instead of 1.03 with two micro-batches per step, 3e-5 off with one); "
            "use zero_stage 1|2, or parallel.data_parallel=fsdp to shard the weights"
        )
    for key, why in (("pp", "the pipeline schedule runs backward itself, not DeepSpeed's engine"),
                     ("tp", "tensor-parallel parameters are DTensors, which ZeRO cannot flatten"),
                     ("dp_replicate", "HSDP's replicate x shard split has no DeepSpeed mapping here")):
        if getattr(parallel, key) > 1:
            raise LayoutError(f"parallel.{key}: {getattr(parallel, key)} with parallel.data_parallel=deepspeed is "
                              f"not supported ({why}); set parallel.{key}=1 or use parallel.data_parallel=fsdp")


# ------------------------------------------------------------------------------------------ dp_shard: auto
AUTO = "auto"


def resolve_dp_shard(parallel, world_size: Optional[int]) -> int:
    """parallel.dp_shard as a number: an explicit value as it is; "auto" (the default) takes whatever
    the world size leaves after pp x dp_replicate x tp (torchtitan's -1), and 1 when no world size is
    known (one process)."""
    d = parallel.dp_shard
    if d != AUTO:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise LayoutError(f"parallel.dp_shard: must be auto or an integer >= 1, got {d!r}")
        return d
    if world_size is None:
        return 1
    rest = parallel.pp * parallel.dp_replicate * parallel.tp
    if world_size % rest:
        raise LayoutError(
            f"parallel.dp_shard: auto takes what WORLD_SIZE={world_size} leaves after pp({parallel.pp}) x "
            f"dp_replicate({parallel.dp_replicate}) x tp({parallel.tp}) = {rest}, which does not divide it; "
            f"launch a multiple of {rest} processes or set parallel.dp_shard"
        )
    return world_size // rest


def resolve_ep_ranks_per_node(parallel, local_world_size: Optional[int]) -> int:
    """parallel.ep_ranks_per_node as a number: an explicit value as it is; "auto" (the default) is how
    many ranks of one EP group share a node, torchrun's LOCAL_WORLD_SIZE / tp (tp is the innermost mesh
    dimension, so consecutive EP ranks sit tp ranks apart), at most ep; ep (one node) outside torchrun."""
    v = getattr(parallel, "ep_ranks_per_node", AUTO)
    if v != AUTO:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LayoutError(f"parallel.ep_ranks_per_node: must be auto or an integer >= 1, got {v!r}")
        return v
    if local_world_size is None:
        return parallel.ep
    return max(1, min(parallel.ep, local_world_size // max(parallel.tp, 1)))


def ep_nodes(parallel) -> int:
    """Nodes one EP group spans: ep / ep_ranks_per_node (1 when the group fits in one node)."""
    rpn = resolve_ep_ranks_per_node(parallel, None)
    return 1 if rpn >= parallel.ep else parallel.ep // rpn


def resolved(parallel, world_size: Optional[int] = None, local_world_size: Optional[int] = None):
    """A copy of the parallel config with dp_shard (resolve_dp_shard) and ep_ranks_per_node
    (resolve_ep_ranks_per_node) numbers; itself when they already are."""
    dp_shard = resolve_dp_shard(parallel, world_size)
    ranks_per_node = resolve_ep_ranks_per_node(parallel, local_world_size)
    if parallel.dp_shard == dp_shard and getattr(parallel, "ep_ranks_per_node", AUTO) == ranks_per_node:
        return parallel
    import copy

    out = copy.copy(parallel)
    out.dp_shard = dp_shard
    out.ep_ranks_per_node = ranks_per_node
    return out


# ------------------------------------------------------------------------------------------ checks
def layout_size(parallel) -> int:
    """Processes the layout needs: pp x dp_replicate x dp_shard x tp (ep folds into dp_shard; dp_shard auto: 1)."""
    return parallel.pp * parallel.dp_replicate * resolve_dp_shard(parallel, None) * parallel.tp


def check_world_size(parallel, world_size: int) -> None:
    """The layout's product of dimensions must equal the number of processes."""
    p = parallel
    product = layout_size(p)
    if product != world_size:
        raise LayoutError(
            f"parallel: pp({p.pp}) x dp_replicate({p.dp_replicate}) x dp_shard({p.dp_shard}) x tp({p.tp}) = "
            f"{product}, but WORLD_SIZE is {world_size}; make the product equal the number of processes"
        )


def check_expert_parallel(parallel, model: "ModelConfig") -> None:
    """ep splits the routed experts evenly and folds into dp_shard (DeepSeek-V3 §3.2: EP ranks are DP ranks)."""
    p, n = parallel, model.n_routed_experts
    if p.ep == 1:
        return
    if n == 0:
        raise LayoutError("parallel.ep: the model has no routed experts (model.n_routed_experts=0); set parallel.ep=1")
    if n % p.ep:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise LayoutError(
            f"parallel.ep: model.n_routed_experts={n} cannot be split evenly over ep={p.ep} ranks; "
            f"use an ep that divides it ({', '.join(map(str, divisors[:12]))})"
        )
    dp_shard = resolve_dp_shard(p, None)
    if dp_shard % p.ep and p.tp > 1 and (dp_shard * p.tp) % p.ep == 0:
        raise LayoutError(
            f"parallel.ep: ep={p.ep} spans the tp ranks (dp_shard={dp_shard} x tp={p.tp}); an expert-parallel group "
            "over tensor-parallel ranks is not supported yet: set dp_shard to a multiple of ep"
        )
    if dp_shard % p.ep:
        raise LayoutError(
            f"parallel.ep: ep={p.ep} must divide parallel.dp_shard={dp_shard} (experts are split over the sharded "
            "data-parallel ranks); set dp_shard to a multiple of ep"
        )


def check_node_limited(parallel, model: "ModelConfig") -> None:
    """An EP group spanning nodes fills whole nodes, and every routing group lives on one node, so
    topk_group bounds the nodes a token reaches (V3 §3.2.2 node-limited routing). Experts are placed
    contiguously (node n holds experts [n E/nodes, (n+1) E/nodes)) and routing group g is experts
    [g E/n_group, (g+1) E/n_group) (models/router.py), so the groups map to nodes iff nodes divides n_group.
    Without groups (n_group 1, or greedy top-k, which ignores them) there is nothing to map."""
    p = parallel
    if p.ep == 1:
        return
    rpn = resolve_ep_ranks_per_node(p, None)
    if rpn >= p.ep:
        return
    if p.ep % rpn:
        raise LayoutError(
            f"parallel.ep_ranks_per_node: ep={p.ep} is not a multiple of ep_ranks_per_node={rpn}, so an EP group "
            "would fill part of a node; use an ep that is a multiple of it, or an ep_ranks_per_node that divides ep"
        )
    nodes = p.ep // rpn
    n, groups = model.n_routed_experts, model.n_group
    if groups > 1 and model.topk_method != "greedy" and groups % nodes:  # the router's group-limited selection
        fits = [d for d in range(1, groups + 1) if groups % d == 0 and p.ep % d == 0]
        raise LayoutError(
            f"parallel.ep_ranks_per_node: the EP group spans {nodes} nodes (ep={p.ep} / ep_ranks_per_node={rpn}), "
            f"which model.n_group={groups} routing groups cannot be split over: groups would straddle nodes and "
            f"topk_group would no longer bound the nodes a token reaches; use an n_group that is a multiple of "
            f"{nodes}, or an ep_ranks_per_node giving a node count (ep / ep_ranks_per_node) that divides n_group: "
            f"{', '.join(map(str, fits))}"
        )
    if n // nodes >= 128:
        raise LayoutError(
            f"parallel.ep_ranks_per_node: {n // nodes} experts per node (model.n_routed_experts={n} over {nodes} "
            "nodes); the node-level slot map is int8 and holds at most 127; span more nodes (a smaller "
            "ep_ranks_per_node)"
        )


def check_tensor_parallel(parallel, model: "ModelConfig") -> None:
    """tp divides every size it splits: heads (gpt-oss: query and kv heads), the dense MLP, the vocabulary,
    the shared experts. (gpt-oss's intermediate_size is the experts' width: experts are not split by tp.)"""
    tp = parallel.tp
    if tp == 1:
        return
    sizes = {"model.num_attention_heads": (model.num_attention_heads, "the number of heads")}
    if model.family == "gpt_oss":
        sizes["model.num_key_value_heads"] = (model.num_key_value_heads, "the number of kv heads (each rank keeps "
                                              "whole kv heads)")
    else:
        sizes["model.intermediate_size"] = (model.intermediate_size, "it")
    sizes["model.vocab_size"] = (model.vocab_size, "it")
    if model.n_shared_experts:
        sizes["model.moe_intermediate_size x n_shared_experts"] = (
            model.moe_intermediate_size * model.n_shared_experts, "it")
    for key, (size, what) in sizes.items():
        if size % tp:
            raise LayoutError(f"parallel.tp: {key}={size} is not divisible by tp={tp}; use a tp that divides {what}")


def sequence_parallel(parallel) -> bool:
    """Whether the layout splits the sequence over the tp ranks between TP regions (parallel.sequence_parallel)."""
    return parallel.tp > 1 and bool(parallel.sequence_parallel)


def sequence_shards(parallel) -> int:
    """Ranks the tokens between TP regions (and so the routed tokens) are split over: tp under SP, else 1."""
    return parallel.tp if sequence_parallel(parallel) else 1


def check_sequence_length(parallel, seq_len: int, key: str = "train.seq_len") -> None:
    """Under sequence parallelism every tp rank holds seq_len / tp positions."""
    if sequence_parallel(parallel) and seq_len % parallel.tp:
        raise LayoutError(
            f"{key}: {seq_len} is not divisible by parallel.tp={parallel.tp} (sequence parallelism splits the "
            "sequence over the tp ranks); use a multiple of tp or set parallel.sequence_parallel=false"
        )


def local_seq_len(parallel, seq_len: int) -> int:
    """Positions of the residual stream one rank holds between TP regions."""
    return seq_len // sequence_shards(parallel)


def check_pipeline(parallel, model: "ModelConfig") -> None:
    """pp > 1: the schedule exists, the layers split over the stages, the micro-batches fit the
    schedule, and the V placement's shared first/last-stage rank works with the data parallelism."""
    name = schedule_name(parallel)
    schedule_class(name)
    split_layers(parallel, model)
    if parallel.pipeline_microbatches is not None:
        check_microbatches(parallel, parallel.pipeline_microbatches)
    v_under_fsdp = SCHEDULES[name][1] == "v" and fsdp_applies(parallel)
    last_needs_embedding = model.num_nextn_predict_layers > 0 or model.tie_word_embeddings
    if v_under_fsdp and last_needs_embedding and parallel.tp > 1:
        raise LayoutError(
            f"parallel.pipeline_schedule: {name} puts the first and the last stage (MTP: it embeds the shifted "
            "tokens) on one rank; with FSDP2 the last stage then uses its own embedding copy, which is not "
            "tensor-parallel; use parallel.tp=1 or a loop schedule (Interleaved1F1B, InterleavedZeroBubble)"
        )
    if v_under_fsdp and model.tie_word_embeddings:
        raise LayoutError(
            f"parallel.pipeline_schedule: {name} with model.tie_word_embeddings puts the shared embedding/head "
            "weight under two FSDP2 roots on rank 0; use parallel.data_parallel=zero1 or a loop schedule"
        )


def check(parallel, model: "ModelConfig", world_size: Optional[int] = None) -> None:
    """Every layout rule the runtime needs; `world_size` None skips the process-count rule
    (dp_shard auto then counts as 1)."""
    parallel = resolved(parallel, world_size)
    if world_size is not None:
        check_world_size(parallel, world_size)
    check_expert_parallel(parallel, model)
    check_node_limited(parallel, model)
    check_tensor_parallel(parallel, model)
    if parallel.tp > 1 and parallel.data_parallel == "zero1":
        raise LayoutError("parallel.data_parallel: zero1 with tp > 1 is not supported yet; use fsdp")
    if parallel.data_parallel == "deepspeed":
        check_deepspeed(parallel)
    if parallel.pp > 1:
        check_pipeline(parallel, model)
