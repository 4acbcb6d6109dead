"""Expert parallelism: routed experts split over the `ep` ranks, tokens moved by all-to-all.

Dispatch (dropless, uneven splits):
  1. sort this rank's (token, slot) assignments by global expert id (dropped ones excluded);
  2. exchange how many rows go to each (rank, local expert): one small all-to-all of counts;
  3. all_to_all_single the rows with those split sizes;
  4. regroup the received rows, which arrive source-rank-major, into local-expert-major
     order for the grouped GEMM.
Combine runs the same steps backwards and applies the gates on the source rank.
The backward of each all-to-all is the all-to-all with the splits swapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from models.moe import MoE, TokenDispatcher, permute_by_expert, unpermute_and_combine


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class _DispatchState:
    order: torch.Tensor  # expert-major order of local assignments (indices into topk_idx.flatten())
    regroup: torch.Tensor  # received rows -> local-expert-major order
    send_splits: list[int]  # rows sent to each ep rank
    recv_splits: list[int]  # rows received from each ep rank
    n_tokens: int


class AllToAllDispatcher(TokenDispatcher):
    """Token dispatcher over an expert-parallel group of `ep_size` ranks."""

    def __init__(self, n_experts: int, ep_size: int, group: Any) -> None:
        self.n_experts, self.ep_size, self.group = n_experts, ep_size, group
        self.n_local = n_experts // ep_size

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, keep: Optional[torch.Tensor]):
        order, counts = permute_by_expert(topk_idx, keep, self.n_experts)
        rows = x.index_select(0, order // topk_idx.shape[1])
        # counts[r * n_local + e]: rows for local expert e of rank r. Tell every rank what it gets.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        per_rank_send = counts.view(self.ep_size, self.n_local)
        per_rank_recv = recv_counts.view(self.ep_size, self.n_local)  # [source rank, local expert]
        send_splits = per_rank_send.sum(1).tolist()
        recv_splits = per_rank_recv.sum(1).tolist()
        received = all_to_all(rows, recv_splits, send_splits, self.group)
        # Received rows are grouped by source rank, each group sorted by local expert.
        local_expert = torch.repeat_interleave(
            torch.arange(self.n_local, device=x.device).repeat(self.ep_size), per_rank_recv.flatten()
        )
        regroup = local_expert.argsort(stable=True)
        state = _DispatchState(order, regroup, send_splits, recv_splits, topk_idx.shape[0])
        return received.index_select(0, regroup), per_rank_recv.sum(0), state

    def combine(self, y: torch.Tensor, topk_weight: torch.Tensor, ctx: _DispatchState) -> torch.Tensor:
        back_in_source_order = torch.empty_like(y).index_copy(0, ctx.regroup, y)
        returned = all_to_all(back_in_source_order, ctx.send_splits, ctx.recv_splits, self.group)
        return unpermute_and_combine(returned, ctx.order, topk_weight, ctx.n_tokens, y.dtype)


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int, group: Any) -> None:
    """Keep only this rank's slice of every MoE layer's experts and dispatch by all-to-all.

    Rank r keeps experts [r * E/ep, (r+1) * E/ep) of every expert parameter (weights, and
    gpt-oss's biases) as plain parameters (the model was initialised identically on every rank
    from the same seed, so slicing preserves the single-process initialisation exactly).
    """
    for layer in model.modules():
        if not isinstance(layer, MoE):
            continue
        experts = layer.experts
        n_local = experts.n_experts // ep_size
        lo, hi = ep_rank * n_local, (ep_rank + 1) * n_local
        for name, full in list(experts.named_parameters(recurse=False)):  # all [E, ...]
            setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        experts.n_experts = n_local
        layer.dispatcher = AllToAllDispatcher(layer.cfg.n_routed_experts, ep_size, group)


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over ep, data-parallel over expert_dp)."""
    return ".experts." in name or name.startswith("experts.")
