"""Apply the configured layout to a freshly built model, from outside the model.

Order: expert parallelism (slice experts, install the all-to-all dispatcher, hierarchical when the EP
group spans nodes), tensor
parallelism (DTensor plans), then data parallelism (FSDP2 wrapping, or nothing for ZeRO-1 whose work happens in the
optimizer). Returns what the trainer needs to reduce and clip gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from parallel.context import ParallelContext
from parallel.data_parallel import ZeroOneOptimizer, apply_fsdp, clip_grad_norm, grad_norm_replicas
from parallel.expert_parallel import apply_expert_parallel
from parallel.layout import fsdp_applies
from parallel.node_dispatch import apply_node_limited_dispatch
from parallel.sequence_parallel import apply_sequence_parallel, sum_replicated_grads
from parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelPlan:
    mode: str  # single | fsdp | zero1 | deepspeed (the engine reduces and clips: parallel/deepspeed_engine.py)
    grad_replicas: list = field(default_factory=list)
    tp_summed: set = field(default_factory=set)  # sequence parallelism: parameters whose gradients sum over tp
    sp_group: Any = None
    model: Optional[nn.Module] = None

    def finish_gradients(self) -> None:
        """After the step's backward: sum over tp the gradients of the parameters each tp rank computed from its
        sequence shard only."""
        if self.tp_summed:
            sum_replicated_grads(self.model, self.tp_summed, self.sp_group)

    def clip_grad_norm(self, max_norm: float) -> float:
        return clip_grad_norm(self.grad_replicas, max_norm)


def parallelize(
    model: nn.Module, ctx: ParallelContext, data_parallel: str, mp_policy: Any = None, pipeline: Any = None,
    ep_overlap: bool = False,
) -> ParallelPlan:
    """`pipeline`: a parallel.pipeline.Pipeline whose stages were already cut from `model` (pp > 1);
    `ep_overlap`: the dispatch all-to-all runs behind the shared experts."""
    if ctx.mesh is None:
        return ParallelPlan("single", grad_norm_replicas(model, "single", ctx))
    if ctx.ep_size > 1:
        apply_expert_parallel(model, ctx.ep_rank, ctx.ep_size, ctx.ep_group, ep_overlap)
        if ctx.ep_nodes > 1:  # the EP group spans nodes: dispatch hierarchically
            apply_node_limited_dispatch(model, ctx.ep_nodes, ctx.ep_size // ctx.ep_nodes, ctx.ep_inter_group,
                                        ctx.ep_intra_group, ep_overlap)
    tp_summed: set = set()
    if ctx.tp_size > 1 and ctx.sp_group is not None:
        tp_summed = set(apply_sequence_parallel(model, ctx.mesh["tp"]))
    elif ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx.mesh["tp"])
    if data_parallel == "fsdp" and (pipeline is None or fsdp_applies(pipeline.parallel)):  # pp-only layouts skip it
        apply_fsdp(model, ctx.mesh, mp_policy, roots=pipeline.modules if pipeline is not None else None)
    replicas = grad_norm_replicas(model, data_parallel, ctx)
    if pipeline is not None:  # tied embedding copies on the first and last stage count once
        replicas = pipeline.adjust_grad_replicas(replicas)
    return ParallelPlan(data_parallel, replicas, tp_summed, ctx.sp_group, model)


def build_parallel_optimizer(
    model: nn.Module,
    plan: ParallelPlan,
    ctx: ParallelContext,
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    param_groups: Callable[[nn.Module], list[dict]],
):
    """The optimizer for the plan: plain (single/FSDP) or ZeRO-1 over sharded fp32 masters."""
    if plan.mode != "zero1":
        return make_optimizer(param_groups(model))

    def inner(model: nn.Module, masters: dict) -> torch.optim.Optimizer:
        groups = param_groups(model)
        for g in groups:
            g["params"] = [masters[p] for p in g["params"]]
        return make_optimizer(groups)

    return ZeroOneOptimizer(model, inner, ctx.mesh)
