"""gpt-oss router: a biased linear gate, top-k on the logits, softmax over the k chosen.

  z = W x + b;  TopK = argtop-k(z);  g_i = exp(z_i) / sum_{j in TopK} exp(z_j) for i in TopK
Its auxiliary loss is Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4-6)
as HF's load_balancing_loss_func computes it, with P from the softmax over all E logits:
  L_aux = coef * E * sum_i (count_i / T) * P_i
which is models/balance.py's expert-level loss with alpha = coef * K (its f_i carries E / (K T)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.balance import balance_losses
from models.router import RouterOutput


class TopKSoftmaxRouter(nn.Module):
    """HF names (GptOssTopKRouter): weight [E, H], bias [E]. Logits and gates in fp32."""

    uses_bias = False  # no aux-loss-free correction bias (models/balance.update_router_biases skips it)

    def __init__(self, n_experts: int, hidden_size: int, top_k: int) -> None:
        super().__init__()
        if not 0 < top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(n_experts))

    def reset_parameters(self, std: float) -> None:
        """HF GptOss init: normal(std) weight and bias."""
        nn.init.normal_(self.weight, std=std)
        nn.init.normal_(self.bias, std=std)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """x [T, H] -> RouterOutput(topk_idx, topk_weight, scores = softmax over all E, keep=None)."""
        logits = F.linear(x.float(), self.weight.float(), self.bias.float())
        top_logits, topk_idx = logits.topk(self.top_k, dim=-1)
        return RouterOutput(topk_idx, top_logits.softmax(dim=-1), logits.softmax(dim=-1), None)


def switch_load_balancing_loss(scores: torch.Tensor, topk_idx: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * E * sum_i f_i P_i over all T tokens of one layer (HF router_aux_loss_coef; one layer).

    HF pools counts and probabilities over all layers before the product; per layer, as here,
    the two agree for a single MoE layer.
    """
    tokens = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return balance_losses(
        scores, topk_idx, tokens, 1, top_k=topk_idx.shape[1], n_device_groups=1, devices_per_token=1,
        alpha_expert=coef * topk_idx.shape[1], alpha_device=0.0, alpha_comm=0.0,
    )
