"""Expert parallelism: routed experts split over the `ep` ranks, tokens moved by all-to-all.

Deduplicated dispatch (dropless, uneven splits; V3 report §3.2.2 sends a token once per node):
  1. a token goes once to every rank that holds any of its kept selected experts: the
     (token, rank) pairs, rank-major, each rank's in token order (dropped assignments,
     V2's capacity mode, were removed before; a token with none left is not sent);
  2. one small all-to-all of pair counts gives the split sizes;
  3. all_to_all_single the rows, and, beside them, each pair's slot map: for every one of
     the token's K slots the receiving rank's local expert id, or -1 when the slot's
     expert lives elsewhere (int8: n_local < 128 on every layout moeforge builds);
  4. the receiving rank expands each row to its local experts (`permute_by_expert` on the
     slot map), in local-expert-major, source-rank-major order for the grouped GEMM.
Gates: the gates of each pair's slots travel to the expert's rank (a small fp32 all-to-all, after the
rows), where the experts apply them to their down projection's input (models/moe.py's TokenDispatcher).
Combine: the expert's rank sums its experts' gated outputs per pair (V3 eq. 12's sum over the rank's
share of g_i FFN_i, in fp32), so one row per (token, rank) returns; the source rank adds its pairs.
FP8 dispatch (train.precision=fp8, report §3.3): the rows arrive already quantised (models/fp8.py's
QuantisedRows, made by the experts' GEMM hook before `start`); each row travels as its E4M3 bytes and
fp32 1x128 tile scales in one uint8 message, is expanded by indexing both, and reaches the FP8 grouped
GEMM as it is. Its gradient stand-in takes the all-to-all's autograd path, so backward sends the
rows' gradient in the compute dtype, as before.
The backward of each all-to-all is the all-to-all with the splits swapped.

`pairs_per_rank` is the one rule for "which ranks a token reaches"; the hierarchical
(node-limited) dispatch, parallel/node_dispatch.py, applies it twice: with ranks = nodes across
nodes, then within one (two of these dispatchers, `arrived`, `pair_gates` and `return_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from models.fp8 import E4M3, QuantisedRows, gradient_stand_in
from models.moe import MoE, TokenDispatcher, gates_in_order, permute_by_expert, sum_per_token
from parallel import comm_ledger


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: Any, label: str) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group, ctx.label = output_splits, input_splits, group, label
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        comm_ledger.all_to_all_single(out, x.contiguous(), label, group, output_splits, input_splits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        comm_ledger.all_to_all_single(out, grad.contiguous(), ctx.label, ctx.group, ctx.input_splits,
                                      ctx.output_splits)
        return out, None, None, None, None


def all_to_all(x: "torch.Tensor | QuantisedRows", output_splits: list[int], input_splits: list[int], group: Any,
               label: str = "ep") -> "torch.Tensor | QuantisedRows":
    """`label`: the group's role in the communication ledger. FP8 rows travel as one uint8 payload."""
    if isinstance(x, QuantisedRows):
        payload = _fp8_payload(x)
        out = payload.new_empty((sum(output_splits), payload.shape[1]))
        comm_ledger.all_to_all_single(out, payload, label, group, output_splits, input_splits)
        return _fp8_rows(out, _StandInAllToAll.apply(x.grad, output_splits, input_splits, group, label), x)
    return _AllToAll.apply(x, output_splits, input_splits, group, label)


class _InFlight:
    """The one all-to-all of an async exchange that is in flight: the forward one, then its reverse."""

    def __init__(self, output_splits: list[int], input_splits: list[int], group: Any, label: str = "ep") -> None:
        self.output_splits, self.input_splits, self.group, self.label = output_splits, input_splits, group, label
        self.work: Any = None
        self.back: Optional[torch.Tensor] = None  # the gradient's reverse exchange lands here

    def wait(self) -> None:
        comm_ledger.wait(self.work, "all_to_all", self.label)
        self.work = None


class _AllToAllStart(torch.autograd.Function):
    """Launch the exchange (async_op); backward: wait for the reverse one `_AllToAllFinish` launched."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: _InFlight) -> torch.Tensor:  # type: ignore[override]
        ctx.flight = flight
        out = x.new_empty((sum(flight.output_splits),) + tuple(x.shape[1:]))
        flight.work = comm_ledger.all_to_all_single(out, x.contiguous(), flight.label, flight.group,
                                                    flight.output_splits, flight.input_splits, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.flight.wait()  # the reverse exchange launched by _AllToAllFinish's backward (which passed `grad` on)
        back, ctx.flight.back = ctx.flight.back, None
        return back, None


class _AllToAllFinish(torch.autograd.Function):
    """Wait for the exchange; backward: launch the reverse one, waited for in `_AllToAllStart`'s
    backward, so the autograd nodes recorded between the two (the shared experts) run meanwhile."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, flight: _InFlight) -> torch.Tensor:  # type: ignore[override]
        ctx.flight = flight
        flight.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        f = ctx.flight
        grad = grad.contiguous()
        f.back = grad.new_empty((sum(f.input_splits),) + tuple(grad.shape[1:]))
        f.work = comm_ledger.all_to_all_single(f.back, grad, f.label, f.group, f.input_splits, f.output_splits,
                                               async_op=True)
        return grad, None  # unchanged: _AllToAllStart's backward returns the exchanged gradient


# ---------------------------------------------------------------- FP8 rows (QuantisedRows) through the all-to-all


def _fp8_payload(rows: QuantisedRows) -> torch.Tensor:
    """[N, H + scale bytes] uint8: each row's E4M3 values, then its tile scales (gloo sends no float8)."""
    return torch.cat([rows.data.view(torch.uint8), rows.scales.view(torch.uint8)], dim=1)


def _fp8_rows(payload: torch.Tensor, grad: torch.Tensor, like: QuantisedRows) -> QuantisedRows:
    """The received rows of an arrived payload, with their gradient stand-in."""
    h = like.data.shape[1]
    scales = payload[:, h:].contiguous().view(like.scales.dtype)
    return QuantisedRows(payload[:, :h].view(E4M3), scales, grad, like.tile)


class _StandInAllToAll(_AllToAll):
    """A gradient stand-in across the exchange: forward only makes the received rows' stand-in (their
    payload travels beside it); backward is _AllToAll's (the gradient, in the compute dtype, goes back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: Any, label: str) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group, ctx.label = output_splits, input_splits, group, label
        return gradient_stand_in(sum(output_splits), x)


class _StandInStart(_AllToAllStart):
    """_AllToAllStart for a gradient stand-in: the payload was launched beside it (flight.work)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: _InFlight) -> torch.Tensor:  # type: ignore[override]
        ctx.flight = flight
        return gradient_stand_in(sum(flight.output_splits), x)


@dataclass
class _Fp8InFlight:
    """Started FP8 rows: the payload's receive buffer (filled once the flight's work is waited for)."""
    payload: torch.Tensor
    grad: torch.Tensor
    like: QuantisedRows


def _start_exchange(rows: "torch.Tensor | QuantisedRows", flight: _InFlight) -> Any:
    if not isinstance(rows, QuantisedRows):
        return _AllToAllStart.apply(rows, flight)
    payload = _fp8_payload(rows)
    out = payload.new_empty((sum(flight.output_splits), payload.shape[1]))
    flight.work = comm_ledger.all_to_all_single(out, payload, flight.label, flight.group, flight.output_splits,
                                                flight.input_splits, async_op=True)
    return _Fp8InFlight(out, _StandInStart.apply(rows.grad, flight), rows)


def _finish_exchange(received: Any, flight: _InFlight) -> "torch.Tensor | QuantisedRows":
    if not isinstance(received, _Fp8InFlight):
        return _AllToAllFinish.apply(received, flight)
    return _fp8_rows(received.payload, _AllToAllFinish.apply(received.grad, flight), received.like)


def pairs_per_rank(topk_idx: torch.Tensor, keep: Optional[torch.Tensor], experts_per_rank: int,
                   n_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, rank) pairs a deduplicated dispatch sends, rank-major, tokens ascending.

    Returns (pair_rank [P], pair_token [P], slot_on [P, K]: which of the token's slots pick
    a kept expert on that rank). Expert e lives on rank e // experts_per_rank."""
    dest = topk_idx // experts_per_rank
    kept = torch.ones_like(topk_idx, dtype=torch.bool) if keep is None else keep
    hit = torch.zeros(topk_idx.shape[0], n_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, dest.masked_fill(~kept, n_ranks), True)  # dropped slots land in the extra column
    hit = hit[:, :n_ranks]
    pair_rank, pair_token = hit.t().nonzero(as_tuple=True)
    slot_on = (dest[pair_token] == pair_rank.unsqueeze(1)) & kept[pair_token]
    return pair_rank, pair_token, slot_on


@dataclass
class _DispatchState:
    pair_token: torch.Tensor  # source token of every pair this rank sent
    order: torch.Tensor  # expanded assignments (indices into the received slot map) in local-expert order (finish)
    pair_of_row: torch.Tensor  # received pair of every expanded row (finish)
    send_splits: list[int]  # pairs sent to each ep rank
    recv_splits: list[int]  # pairs received from each ep rank
    n_tokens: int


@dataclass
class _Pending:
    """A started dispatch: the rows and slot map in flight (or arrived, without overlap)."""
    received: Any  # a tensor or QuantisedRows (arrived), or what _start_exchange returned
    slot_map: torch.Tensor
    flight: Optional[_InFlight]
    slot_work: Any
    state: _DispatchState


class AllToAllDispatcher(TokenDispatcher):
    """Deduplicated token dispatcher over an expert-parallel group of `ep_size` ranks.

    `overlap`: `start` returns with the rows and slot map still in flight (async all-to-all),
    so the caller's shared experts compute meanwhile, forward and backward (parallel/OVERLAP.md).
    `label`: the group's role in the communication ledger (parallel/node_dispatch.py runs two of these)."""

    def __init__(self, n_experts: int, ep_size: int, group: Any, overlap: bool = False, label: str = "ep") -> None:
        self.n_experts, self.ep_size, self.group, self.overlap = n_experts, ep_size, group, overlap
        self.label = label
        self.n_local = n_experts // ep_size
        if self.n_local >= 128:
            raise ValueError(f"{self.n_local} experts per ep rank: the int8 slot map holds at most 127")

    def start(self, x: "torch.Tensor | QuantisedRows", topk_idx: torch.Tensor, keep: Optional[torch.Tensor]) -> _Pending:
        pair_rank, pair_token, slot_on = pairs_per_rank(topk_idx, keep, self.n_local, self.ep_size)
        send = torch.bincount(pair_rank, minlength=self.ep_size)
        recv = torch.empty_like(send)
        comm_ledger.all_to_all_single(recv, send, self.label, self.group)  # split sizes: needed before anything
        send_splits, recv_splits = send.tolist(), recv.tolist()
        local_id = (topk_idx[pair_token] - pair_rank.unsqueeze(1) * self.n_local).masked_fill(~slot_on, -1)
        slot_map = torch.empty((sum(recv_splits), topk_idx.shape[1]), dtype=torch.int8, device=topk_idx.device)
        slot_work = comm_ledger.all_to_all_single(slot_map, local_id.to(torch.int8), self.label, self.group,
                                                  recv_splits, send_splits, async_op=self.overlap)
        rows = x.index_select(0, pair_token)
        state = _DispatchState(pair_token, torch.empty(0), torch.empty(0), send_splits, recv_splits,
                               topk_idx.shape[0])
        if not self.overlap:
            return _Pending(all_to_all(rows, recv_splits, send_splits, self.group, self.label), slot_map, None, None,
                            state)
        flight = _InFlight(recv_splits, send_splits, self.group, self.label)
        return _Pending(_start_exchange(rows, flight), slot_map, flight, slot_work, state)

    def arrived(self, pending: _Pending) -> tuple["torch.Tensor | QuantisedRows", torch.Tensor]:
        """The received rows and their slot map (long), once the exchange `start` began has landed."""
        received = pending.received
        if pending.flight is not None:
            comm_ledger.wait(pending.slot_work, "all_to_all", self.label)
            received = _finish_exchange(received, pending.flight)
        return received, pending.slot_map.long()

    def finish(self, pending: _Pending):
        received, slot_map = self.arrived(pending)
        order, counts = permute_by_expert(slot_map.clamp(min=0), slot_map >= 0, self.n_local)
        pending.state.order, pending.state.pair_of_row = order, order // slot_map.shape[1]
        return received.index_select(0, pending.state.pair_of_row), counts, pending.state

    def row_gates(self, topk_weight: torch.Tensor, ctx: _DispatchState) -> torch.Tensor:
        return gates_in_order(self.pair_gates(topk_weight, ctx), ctx.order)

    def pair_gates(self, topk_weight: torch.Tensor, ctx: _DispatchState) -> torch.Tensor:
        """The received pairs' gates [recv pairs, K] (fp32), from the source tokens' gates [T, K]."""
        return all_to_all(topk_weight.float()[ctx.pair_token], ctx.recv_splits, ctx.send_splits, self.group,
                          self.label)

    def combine(self, y: torch.Tensor, ctx: _DispatchState) -> torch.Tensor:
        return self.return_sums(sum_per_token(y, ctx.pair_of_row, sum(ctx.recv_splits)), ctx)

    def return_sums(self, per_pair: torch.Tensor, ctx: _DispatchState) -> torch.Tensor:
        """One gated sum per received pair goes back; the source rank adds its pairs -> [T, H]."""
        returned = all_to_all(per_pair, ctx.send_splits, ctx.recv_splits, self.group, self.label)
        return sum_per_token(returned, ctx.pair_token, ctx.n_tokens)


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int, group: Any, overlap: bool = False) -> None:
    """Keep only this rank's slice of every MoE layer's experts and dispatch by all-to-all
    (`overlap`: asynchronously, behind the shared experts).

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
        layer.dispatcher = AllToAllDispatcher(layer.cfg.n_routed_experts, ep_size, group, overlap)


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over ep, data-parallel over expert_dp)."""
    return ".experts." in name or name.startswith("experts.")
