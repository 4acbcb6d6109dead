"""Tensor parallelism with DTensor plans applied to the plain model from outside.

Per block (Megatron-style column -> row pairs, heads split over the `tp` ranks):
  MLA     q_b_proj / q_proj and kv_b_proj column-parallel (each rank owns whole heads),
          o_proj row-parallel; the low-rank down-projections q_a_proj / kv_a_proj_with_mqa
          and their RMSNorms stay replicated (they are small, V2 §2.1.2).
  GQA     (gpt-oss) q_proj, k_proj, v_proj column-parallel (q heads and kv heads both split,
          so each rank keeps whole kv groups), o_proj row-parallel; the per-head `sinks`
          sharded along the heads like q_proj's rows (`shard_sinks`).
  MLP     gate_proj / up_proj column-parallel, down_proj row-parallel (dense layers and
          shared experts alike).
  MoE     router and routed experts replicated over tp (experts are split by expert
          parallelism instead); every tp rank routes the same tokens.
Embedding is vocab-parallel (row-wise over the vocabulary) and the output head is
column-parallel with vocab-parallel cross-entropy (`loss_parallel`).
This is the plan of `parallel.sequence_parallel=false`; with sequence parallelism (the default)
parallel/sequence_parallel.py applies the same splits with the sequence sharded between them.

The one place DTensor cannot see a partial gradient is MLA's shared RoPE key k^R:
it is computed by the replicated kv_a_proj_with_mqa and consumed by this rank's heads
only, so its gradient is summed over tp by a hook (`_SumGradOverColumns`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from models.attention import MultiHeadLatentAttention
from models.gqa_attention import GroupedQueryAttention
from models.mlp import SwiGLU
from parallel import comm_ledger


class _SumGradOverColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces gradient columns [start:] over `group`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, start: int, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        comm_ledger.all_reduce(part, "tp", ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


def _sum_rope_key_grad(kv_lora_rank: int, group: Any):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _SumGradOverColumns.apply(output, kv_lora_rank, group)

    return hook


def _local_sinks_pre_hook(module: nn.Module, args: tuple) -> None:
    """Shadow the DTensor `sinks` with this rank's heads for the forward (its gradient flows back to
    the DTensor through to_local); state_dict and the optimizer keep seeing the DTensor parameter."""
    module.__dict__["sinks"] = module._parameters["sinks"].to_local()


def _local_sinks_post_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    module.__dict__.pop("sinks", None)


def shard_sinks(module: GroupedQueryAttention, tp_mesh) -> None:
    """sinks [H] -> a DTensor sharded over tp along the heads (rank r: the heads of its q_proj rows)."""
    sinks = module.sinks
    module.sinks = nn.Parameter(distribute_tensor(sinks.detach(), tp_mesh, [Shard(0)]), sinks.requires_grad)
    module.register_forward_pre_hook(_local_sinks_pre_hook)
    module.register_forward_hook(_local_sinks_post_hook)


def MLP_PLAN() -> dict:
    """SwiGLU: both input projections column-parallel, the output projection row-parallel."""
    return {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard attention heads, MLP widths, embedding and head over `tp_mesh`."""
    group = tp_mesh.get_group()
    tied = model.lm_head is not None and model.embed_tokens is not None and \
        model.lm_head.weight is model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            plan = {"kv_b_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}
            plan["q_proj" if module.q_lora_rank is None else "q_b_proj"] = ColwiseParallel()
            parallelize_module(module, tp_mesh, plan)
            module.kv_a_proj_with_mqa.register_forward_hook(_sum_rope_key_grad(module.kv_lora_rank, group))
        elif isinstance(module, GroupedQueryAttention):
            plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                    "o_proj": RowwiseParallel()}
            parallelize_module(module, tp_mesh, plan)
            shard_sinks(module, tp_mesh)
        elif isinstance(module, SwiGLU):
            parallelize_module(module, tp_mesh, MLP_PLAN())
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if tied:  # each plan distributed the shared weight on its own (both Shard(0)): share one DTensor again
        model.lm_head.weight = model.embed_tokens.weight
