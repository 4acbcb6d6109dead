"""DeepSeekMoE layer (V3 eq. 12): h' = h + sum_i FFN^s_i(h) + sum_i g_i FFN^r_i(h).

gpt-oss uses the same layer with its own router (models/topk_softmax_router.py) and biased
clamped-SwiGLU experts (models/clamped_experts.py), and no shared experts.

The only communication an MoE layer needs, moving token copies to the rank that owns
their expert and back, goes through a `TokenDispatcher`. `LocalDispatcher` keeps
everything in-process; `parallel/` swaps in an all-to-all dispatcher under expert
parallelism, so this file never calls torch.distributed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from models.balance import attach_aux_loss, balance_group_ids, balance_losses
from models.clamped_experts import ClampedSwiGLUExperts
from models.config import ModelConfig
from models.experts import GroupedExperts
from models.mlp import SwiGLU
from models.router import Router
from models.topk_softmax_router import TopKSoftmaxRouter


class TokenDispatcher:
    """Moves routed token copies to experts (dispatch) and their outputs back (combine).

    Dispatch comes in two halves so that work independent of the routed rows (the shared
    experts) can run while a distributed dispatcher's exchange is in flight: `start` may
    return before the rows arrive, `finish` waits for them.

    The gates are applied on the expert side (V3 eq. 12's g_i FFN_i(u) with FFN_i's down projection
    linear: g (h W) = (g h) W): `row_gates` brings every row's gate to the experts, which scale their
    down projection's input by it, so combine only sums each token's returned rows. The gate gradient
    then comes from that input and its gradient, <dout W, h> = <dout, h W> (models/experts.py's
    gates_backward), and no expert output is kept for backward."""

    def start(self, x: torch.Tensor, topk_idx: torch.Tensor, keep: Optional[torch.Tensor]) -> Any:
        """Begin dispatching x [T, H] by topk_idx [T, K]; returns what `finish` needs. x is what
        `GroupedExperts.dispatch_input` made of the tokens: a tensor, or FP8 rows (models.fp8.QuantisedRows),
        either way moved by row selection (index_select) and exchange only."""
        raise NotImplementedError

    def finish(self, pending: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (rows for this rank's experts in expert-major order, rows per local expert [E_local],
        context for row_gates and combine)."""
        raise NotImplementedError

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, keep: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return self.finish(self.start(x, topk_idx, keep))

    def row_gates(self, topk_weight: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The fp32 gate of every row `finish` returned, in its order, from the tokens' gates [T, K]."""
        raise NotImplementedError

    def combine(self, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Gated expert outputs -> [T, H]: each token's returned rows summed (in fp32)."""
        raise NotImplementedError


def permute_by_expert(
    topk_idx: torch.Tensor, keep: Optional[torch.Tensor], n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable expert-major order of the kept (token, slot) assignments, and counts per expert.

    Returns `order` (flat indices into topk_idx.flatten(), dropped ones excluded) and
    `counts` [n_experts]. Token of assignment j is j // K.
    """
    flat = topk_idx.flatten()
    if keep is not None:
        flat = flat.masked_fill(~keep.flatten(), n_experts)  # dropped ones sort last
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]
    if keep is not None:
        order = order[: int(keep.sum())]
    return order, counts


def gates_in_order(topk_weight: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """fp32 gates [T, K] of the assignments `order` picks (flat indices into them). Gating stays in fp32."""
    return topk_weight.float().flatten()[order]


class _SumPerToken(torch.autograd.Function):
    """out[t] = sum of the rows j with token_of[j] == t, accumulated in fp32, in y's dtype. Hand-written
    backward (a gather of the output gradient): autograd's index_add would keep the rows themselves."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token_of: torch.Tensor, n_tokens: int) -> torch.Tensor:  # type: ignore[override]
        out = torch.zeros(n_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token_of, y.float())
        ctx.save_for_backward(token_of)
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (token_of,) = ctx.saved_tensors
        return grad.index_select(0, token_of), None, None


def sum_per_token(y: torch.Tensor, token_of: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """out[t] = sum of the rows j with token_of[j] == t (V3 eq. 12's sum over i of the already gated
    g_i FFN_i), accumulated in fp32, in y's dtype. Keeps only the index for backward."""
    return _SumPerToken.apply(y, token_of, n_tokens)


class LocalDispatcher(TokenDispatcher):
    """All experts live in this process: a sort, a gather and a scatter-sum."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts

    def start(self, x, topk_idx, keep):
        order, counts = permute_by_expert(topk_idx, keep, self.n_experts)
        token_of = order // topk_idx.shape[1]
        return x.index_select(0, token_of), counts, (order, token_of, topk_idx.shape[0])

    def finish(self, pending):
        return pending

    def row_gates(self, topk_weight, ctx):
        return gates_in_order(topk_weight, ctx[0])

    def combine(self, y, ctx):
        _, token_of, n_tokens = ctx
        return sum_per_token(y, token_of, n_tokens)


class MoE(nn.Module):
    """Shared experts + routed experts + router. HF names: gate, experts, shared_experts.

    `layer_idx` is the layer's position in the model (decoder layers, then L + k for MTP depth
    k + 1); it orders the load statistics of pipeline stages. In training the layer records its
    routing and aux loss into the `step_state` (models/moe_state.py) that owns its layers, if any.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.gate: nn.Module
        self.experts: GroupedExperts
        if cfg.is_gpt_oss:  # HF: mlp.router, mlp.experts (train/hf/gpt_oss.py renames gate)
            self.gate = TopKSoftmaxRouter(cfg.n_routed_experts, cfg.hidden_size, cfg.num_experts_per_tok)
            self.experts = ClampedSwiGLUExperts(
                cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.experts_implementation,
                cfg.swiglu_limit, cfg.swiglu_alpha,
            )
        else:
            self.gate = Router(cfg)
            self.experts = GroupedExperts(
                cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.experts_implementation
            )
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.n_routed_experts)
        self.step_state: Optional[Any] = None  # a models.moe_state.MoEStepState, which sets it
        # Under sequence parallelism (set by parallel/): this layer sees sequence shard `index` of `count`
        # (doc_ids stay whole), and `balance_reduce` sums the balance statistics over the shards.
        self.sequence_shard: tuple[int, int] = (0, 1)
        self.balance_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        bsz, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        routing = self.gate(flat)
        pending = self.dispatcher.start(self.experts.dispatch_input(flat), routing.topk_idx, routing.keep)
        shared = None if self.shared_experts is None else self.shared_experts(flat)  # while the rows travel
        rows, counts, ctx = self.dispatcher.finish(pending)
        gates = self.dispatcher.row_gates(routing.topk_weight, ctx)  # applied by the experts (see TokenDispatcher)
        routed = self.dispatcher.combine(self.experts(rows, counts, gates), ctx)
        out = routed if shared is None else routed + shared
        out = out.view(bsz, seq, hidden)
        if self.training:
            aux = self._aux_loss(routing.scores, routing.topk_idx, bsz, seq, doc_ids)
            scale = 1.0
            if self.step_state is not None:
                self.step_state.record(self, routing.topk_idx, routing.keep, aux)
                scale = self.step_state.aux_loss_scale
            out = attach_aux_loss(out, aux, scale)
        return out

    def _aux_loss(
        self, scores: torch.Tensor, topk_idx: torch.Tensor, bsz: int, seq: int, doc_ids: Optional[torch.Tensor]
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.aux_loss_alpha == 0 and cfg.device_aux_loss_alpha == 0 and cfg.comm_aux_loss_alpha == 0:
            return scores.new_zeros(())
        if cfg.seq_aux:  # group ids over the whole sequence, then this shard's positions
            index, count = self.sequence_shard
            group_ids, n_groups = balance_group_ids(bsz, seq * count, doc_ids, scores.device)
            group_ids = group_ids.view(bsz, count, seq)[:, index].flatten()
        else:
            group_ids, n_groups = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device), 1
        return balance_losses(
            scores,
            topk_idx,
            group_ids,
            n_groups,
            top_k=cfg.num_experts_per_tok,
            n_device_groups=cfg.n_group,
            devices_per_token=cfg.topk_group,
            alpha_expert=cfg.aux_loss_alpha,
            alpha_device=cfg.device_aux_loss_alpha,
            alpha_comm=cfg.comm_aux_loss_alpha,
            reduce=self.balance_reduce,
        )

    def reset_parameters(self, std: float) -> None:
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a model (main stack and MTP), in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]
