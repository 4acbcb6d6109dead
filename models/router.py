"""Top-k expert selection: DeepSeek-V3 sigmoid router and DeepSeek-V2 softmax router.

V3 (topk_method "noaux_tc", V3 eqs. 13-16):
  s_i = sigmoid(u^T e_i)                       scores, fp32
  selection on s_i + b_i                       b = aux-loss-free bias, selection only
  group score = sum of the top-2 biased scores in each of n_group groups; keep topk_group groups
  g_i = s_i / sum_{j in topk} s_j * routed_scaling_factor   (norm_topk_prob)
V2 ("greedy" / "group_limited_greedy", V2 eqs. 20-21 and §2.2.2 device-limited routing):
  s = softmax(u^T e); group score = max score in the group; keep topk_group groups; top-k by s
  g_i = s_i (normalised only if norm_topk_prob) * routed_scaling_factor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


@dataclass
class RouterOutput:
    topk_idx: torch.Tensor  # [T, K] int64 expert ids
    topk_weight: torch.Tensor  # [T, K] fp32 gates (0 where the assignment was dropped)
    scores: torch.Tensor  # [T, E] fp32 unbiased affinities (sigmoid or softmax)
    keep: Optional[torch.Tensor]  # [T, K] bool, False = dropped by capacity; None when dropless


class Router(nn.Module):
    """The MoE gate. HF names: weight, e_score_correction_bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.capacity_factor = cfg.capacity_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Aux-loss-free balancing bias (V3 §2.1.2). fp32, persistent, never trained by autograd.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=True
        )

    @property
    def uses_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x: [T, H] -> RouterOutput. Scores and gates are computed in fp32."""
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        with torch.no_grad():
            topk_idx = self.select(scores.detach())
        topk_weight = scores.gather(1, topk_idx)
        # V3 (noaux_tc) always normalises, as HF DeepseekV3; V2 only for top_k > 1, as DeepSeek-V2's own code.
        if self.norm_topk_prob and (self.top_k > 1 or self.uses_bias):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep_mask(topk_idx, scores.detach().gather(1, topk_idx), self.n_experts, self.capacity_factor)
            topk_weight = topk_weight * keep
        return RouterOutput(topk_idx, topk_weight, scores, keep)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K] chosen from fp32 scores [T, E] (no gradient)."""
        choice = scores + self.e_score_correction_bias if self.uses_bias else scores
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(choice.shape[0], self.n_group, self.n_experts // self.n_group)
            if self.uses_bias:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of top-2
            else:
                group_scores = grouped.amax(dim=-1)  # V2: best expert of the group
            top_groups = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        return choice.topk(self.top_k, dim=-1).indices

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        self.e_score_correction_bias.zero_()


def capacity_keep_mask(topk_idx: torch.Tensor, topk_score: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    """V2 token dropping: each expert keeps at most ceil(cf * T * K / E) assignments, the highest-scored.

    Returns a bool mask [T, K]; the lowest-affinity assignments beyond capacity are False.
    """
    n_tokens, k = topk_idx.shape
    capacity = int(-(-capacity_factor * n_tokens * k // n_experts))  # ceil
    flat_idx, flat_score = topk_idx.flatten(), topk_score.flatten()
    # Order by expert, then by descending score inside each expert (two stable sorts).
    by_score = flat_score.argsort(descending=True, stable=True)
    order = by_score[flat_idx[by_score].argsort(stable=True)]
    counts = torch.bincount(flat_idx, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_idx[order]]
    keep = torch.empty_like(flat_idx, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view(n_tokens, k)
