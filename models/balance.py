"""Load-balancing: auxiliary losses and the aux-loss-free bias update.

Losses are computed per balance group: a sequence (V3 §2.1.2 "sequence-wise") or,
with packed data and known document ids, a document. With G groups, T_g tokens in
group g, E routed experts of which K are chosen per token:
  f_{g,i} = E / (K T_g) * sum_{t in g} 1[i in TopK(t)]       (V3 eq. 18 / V2 eq. 13)
  P_{g,i} = 1 / T_g * sum_{t in g} s'_{i,t}                   (V3 eq. 19-20 / V2 eq. 14)
  L_seq   = alpha * mean_g sum_i f_{g,i} P_{g,i}              (V3 eq. 17 / V2 eq. 12)
with s' the scores normalised over all experts (softmax scores already are).
V2 adds device-level and communication losses with D = n_group expert groups
(devices) and M = topk_group devices per token (V2 eqs. 15-19).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def group_sums(
    scores: torch.Tensor, topk_idx: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group selection counts [G, E], sums of the normalised scores [G, E] and token counts [G]."""
    n_tokens, n_experts = scores.shape
    probs = scores / scores.sum(dim=-1, keepdim=True)
    tokens = torch.zeros(num_groups, device=scores.device, dtype=scores.dtype).index_add_(
        0, group_ids, torch.ones(n_tokens, device=scores.device, dtype=scores.dtype)
    )
    prob_sum = torch.zeros(num_groups, n_experts, device=scores.device, dtype=scores.dtype).index_add_(0, group_ids, probs)
    selected = torch.zeros(n_tokens, n_experts, device=scores.device, dtype=scores.dtype)
    selected.scatter_(1, topk_idx, 1.0)
    counts = torch.zeros(num_groups, n_experts, device=scores.device, dtype=scores.dtype).index_add_(0, group_ids, selected)
    return counts, prob_sum, tokens


def balance_losses(
    scores: torch.Tensor,
    topk_idx: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    top_k: int,
    n_device_groups: int,
    devices_per_token: int,
    alpha_expert: float,
    alpha_device: float,
    alpha_comm: float,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Sum of the enabled balance losses, averaged over non-empty groups. scores: [T, E] fp32.

    `reduce` sums the per-group sums over the processes that each hold some of every group's tokens
    (sequence parallelism), so f and P are those of the whole groups."""
    counts, prob_sum, tokens = group_sums(scores, topk_idx, group_ids, num_groups)
    n_experts = scores.shape[1]
    d = n_device_groups
    sent_per_group = None
    if alpha_comm > 0:  # a token counts once per device it is sent to
        sent = counts.new_zeros(topk_idx.shape[0], d).scatter_(1, topk_idx // (n_experts // d), 1.0)
        sent_per_group = counts.new_zeros(num_groups, d).index_add_(0, group_ids, sent)
    if reduce is not None:
        parts = [counts, prob_sum, tokens.unsqueeze(1)] + ([] if sent_per_group is None else [sent_per_group])
        widths = [p.shape[1] for p in parts]
        parts = list(reduce(torch.cat(parts, dim=1)).split(widths, dim=1))
        counts, prob_sum, tokens = parts[0], parts[1], parts[2].squeeze(1)
        sent_per_group = parts[3] if sent_per_group is not None else None
    present = tokens > 0
    t = tokens.clamp(min=1).unsqueeze(1)
    p = prob_sum / t
    f = counts * n_experts / (top_k * t)  # f_{g,i}
    per_group = torch.zeros(num_groups, device=scores.device, dtype=scores.dtype)
    if alpha_expert > 0:
        per_group = per_group + alpha_expert * (f * p).sum(-1)
    if alpha_device > 0 or alpha_comm > 0:
        p_dev = p.view(num_groups, d, -1).sum(-1)  # P'_i = sum of P_j over the device's experts
        if alpha_device > 0:
            f_dev = f.view(num_groups, d, -1).mean(-1)  # f'_i = mean of f_j over the device's experts
            per_group = per_group + alpha_device * (f_dev * p_dev).sum(-1)
        if alpha_comm > 0:
            # f''_i = D / (M T) * #tokens sent to device i (a token counts once per device)
            f_comm = sent_per_group * d / (devices_per_token * t)
            per_group = per_group + alpha_comm * (f_comm * p_dev).sum(-1)
    return per_group[present].sum() / present.sum().clamp(min=1)


def balance_group_ids(batch: int, seq: int, doc_ids: Optional[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """Flat group id per token: its sequence, or its (sequence, document) when doc_ids [B, S] is given."""
    seq_ids = torch.arange(batch, device=device).repeat_interleave(seq)
    if doc_ids is None:
        return seq_ids, batch
    # Renumber (sequence, document) pairs densely.
    key = seq_ids * (int(doc_ids.max().item()) + 1) + doc_ids.flatten().long()
    unique, inverse = torch.unique(key, return_inverse=True)
    return inverse, unique.numel()


class _AuxLossGradient(torch.autograd.Function):
    """Identity on `hidden` whose backward also sends `scale` as the gradient of `aux_loss`.

    This lets an auxiliary loss computed deep inside a layer reach the parameters
    without being threaded through every module's return value (and through every
    pipeline stage): autograd delivers it when the layer output is back-propagated.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):  # type: ignore[override]
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_hidden.device)
        return grad_hidden, grad_aux, None


def attach_aux_loss(hidden: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """Return `hidden` unchanged, with d(total)/d(aux_loss) = scale added on backward."""
    if not aux_loss.requires_grad or scale == 0:
        return hidden
    return _AuxLossGradient.apply(hidden, aux_loss, scale)


def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing (V3 §2.1.2): b_i += gamma * sign(mean load - load_i). In place."""
    bias.add_(gamma * torch.sign(load.float().mean() - load.float()))
