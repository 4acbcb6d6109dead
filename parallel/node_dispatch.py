"""Hierarchical (node-limited) token dispatch for an EP group that spans several nodes.

DeepSeek-V3 §3.2.2: a token is sent across nodes at most once per node it needs, and forwarded
within the node to the ranks holding its experts; with group-limited routing (models/router.py)
and each routing group on one node (parallel/layout.py `check_node_limited`), a token reaches at
most topk_group nodes. The EP group of ep = nodes x ranks_per_node ranks: EP rank e sits on node
e // ranks_per_node with local index e % ranks_per_node, and holds experts [e E/ep, (e+1) E/ep)
as in flat expert parallelism, so node n holds experts [n E/nodes, (n+1) E/nodes).

Dispatch, both stages the deduplicated dispatch of parallel/expert_parallel.py (`pairs_per_rank`
applied twice):
  1. inter-node, over the ranks with this rank's local index (one per node): one row per
     (token, node holding any of its kept experts), with its slot map of node-local expert ids;
  2. intra-node, on the forwarding rank, over its node's ranks: each received row goes once to every
     rank of the node holding any of its experts there, which expands it to its local experts.
Gates (applied on the expert side, models/moe.py's TokenDispatcher): the tokens' gates travel with
the inter-node rows to the forwarding rank, then with the intra-node rows to the expert rank.
Combine in reverse: the expert rank sums its experts' gated outputs per received row (V3 eq. 12),
the forwarding rank's intra-node combine sums its node's ranks per (token, node), and one row per
(token, node) returns across nodes, where the source rank adds its nodes' rows.

Overlap (`parallel.ep_overlap`) applies to the inter-node stage, the one between nodes: its rows and
slot map fly while the shared experts compute, and their gradients' exchange runs during the shared
experts' backward (parallel/OVERLAP.md). The intra-node stage runs synchronously in `finish`: its
input is the inter-node stage's output, so no independent work is left to hide it behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from models.moe import MoE, TokenDispatcher
from parallel.expert_parallel import AllToAllDispatcher

if TYPE_CHECKING:
    from parallel.expert_parallel import _DispatchState, _Pending


class NodeLimitedDispatcher(TokenDispatcher):
    """Two-stage dispatch over `nodes` x `ranks_per_node` EP ranks: inter-node (`inter_group`, ledger
    role ep_inter), then intra-node (`intra_group`, role ep_intra)."""

    def __init__(self, n_experts: int, nodes: int, ranks_per_node: int, inter_group: Any, intra_group: Any,
                 overlap: bool = False) -> None:
        self.inter = AllToAllDispatcher(n_experts, nodes, inter_group, overlap, label="ep_inter")
        self.intra = AllToAllDispatcher(n_experts // nodes, ranks_per_node, intra_group, label="ep_intra")

    def start(self, x: torch.Tensor, topk_idx: torch.Tensor, keep: Optional[torch.Tensor]) -> "_Pending":
        return self.inter.start(x, topk_idx, keep)  # one row per (token, node) to that node's peer

    def finish(self, pending: "_Pending") -> tuple[torch.Tensor, torch.Tensor, tuple["_DispatchState", ...]]:
        forwarded, node_slots = self.inter.arrived(pending)  # node-local expert id per slot, -1: another node's
        rows, counts, intra = self.intra.dispatch(forwarded, node_slots.clamp(min=0), node_slots >= 0)
        return rows, counts, (pending.state, intra)

    def row_gates(self, topk_weight: torch.Tensor, ctx: tuple["_DispatchState", "_DispatchState"]) -> torch.Tensor:
        """Every expanded row's gate: the tokens' gates go to the forwarding rank with the inter-node rows,
        then with the intra-node rows to the expert rank."""
        inter, intra = ctx
        return self.intra.row_gates(self.inter.pair_gates(topk_weight, inter), intra)

    def combine(self, y: torch.Tensor, ctx: tuple["_DispatchState", "_DispatchState"]) -> torch.Tensor:
        inter, intra = ctx
        per_node = self.intra.combine(y, intra)  # [forwarded rows, H]: the node's gated sums per (token, node)
        return self.inter.return_sums(per_node, inter)


def apply_node_limited_dispatch(model: nn.Module, nodes: int, ranks_per_node: int, inter_group: Any,
                                intra_group: Any, overlap: bool = False) -> None:
    """Replace every MoE layer's dispatcher by the hierarchical one (after apply_expert_parallel, whose
    contiguous expert slices it keeps)."""
    for layer in model.modules():
        if isinstance(layer, MoE):
            layer.dispatcher = NodeLimitedDispatcher(layer.cfg.n_routed_experts, nodes, ranks_per_node, inter_group,
                                                     intra_group, overlap)
