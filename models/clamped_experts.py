"""gpt-oss routed experts: clamped SwiGLU with a linear offset, and biases on both projections.

For gate g and up u of one expert (gpt-oss model card; HF GptOssExperts):
  g~ = min(g, limit),  u~ = clamp(u, -limit, limit)
  act = (u~ + 1) * g~ * sigmoid(alpha * g~)          alpha = 1.702, limit = 7
  FFN_e(x) = W_down,e act(W_gu,e x + b_gu,e) + b_down,e
Weights keep models/experts.py's layout ([E, out, in], gate and up as the two halves of
gate_up_proj), so the grouped GEMMs, the FP8 GEMM hook and the kernel choice are reused;
HF's interleaved [E, in, 2I] layout is an export-time permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from models.experts import GroupedExperts, grouped_linear, looped_linear

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class _ClampedSwiGLU(torch.autograd.Function):
    """(u~ + 1) g~ sigmoid(alpha g~) from one [N, 2I] (gate | up) tensor; saves only that input."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:  # type: ignore[override]
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        ctx.limit, ctx.alpha = limit, alpha
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (gate_up,) = ctx.saved_tensors
        limit, alpha = ctx.limit, ctx.alpha
        gate, up = gate_up.chunk(2, dim=-1)
        gate_c, up_c = gate.clamp(max=limit), up.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * gate_c)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        # clamp passes the gradient where the input lies inside the closed range (as torch.clamp)
        torch.mul(grad * gate_c * sig, (up.abs() <= limit).to(grad.dtype), out=grad_up)
        d_act_d_gate = sig * (1 + alpha * gate_c * (1 - sig))  # d/dg [g sigmoid(alpha g)]
        torch.mul(grad * (up_c + 1) * d_act_d_gate, (gate <= limit).to(grad.dtype), out=grad_gate)
        return grad_gate_up, None, None


def clamped_swiglu(gate_up: torch.Tensor, limit: float = SWIGLU_LIMIT, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """gpt-oss activation of a fused (gate | up) projection [..., 2I] -> [..., I]."""
    return _ClampedSwiGLU.apply(gate_up, limit, alpha)


def rows_bias(bias: torch.Tensor, counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """bias[e] repeated for each of expert e's counts[e] rows: [E, D] -> [n_rows, D]."""
    return bias.repeat_interleave(counts, dim=0, output_size=n_rows)


class ClampedSwiGLUExperts(GroupedExperts):
    """Biased experts with the clamped SwiGLU; a GroupedExperts with the same [E, ...] weights plus biases.

    HF names (GptOssExperts): gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias.
    """

    def __init__(
        self, n_experts: int, hidden_size: int, intermediate_size: int, implementation: str = "auto",
        limit: float = SWIGLU_LIMIT, alpha: float = SWIGLU_ALPHA,
    ) -> None:
        super().__init__(n_experts, hidden_size, intermediate_size, implementation)
        self.limit, self.alpha = limit, alpha
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(n_experts, hidden_size))

    def reset_parameters(self, std: float) -> None:
        """HF GptOss init: normal(std) weights, zero biases."""
        super().reset_parameters(std)
        nn.init.zeros_(self.gate_up_proj_bias)
        nn.init.zeros_(self.down_proj_bias)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, H] sorted by expert; counts: [E] rows per expert -> [N, H]."""
        n = x.shape[0]
        if self.gemm is not None or self.resolved_implementation(x) == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            gemm = self.gemm or (lambda rows, weight, _counts, offs: grouped_linear(rows, weight, offs))
            up = gemm(x, self.gate_up_proj, counts, offsets) + rows_bias(self.gate_up_proj_bias, counts, n)
            act = clamped_swiglu(up, self.limit, self.alpha)
            return gemm(act, self.down_proj, counts, offsets) + rows_bias(self.down_proj_bias, counts, n)
        sizes = counts.tolist()
        up = looped_linear(x, self.gate_up_proj, sizes) + rows_bias(self.gate_up_proj_bias, counts, n)
        act = clamped_swiglu(up, self.limit, self.alpha)
        return looped_linear(act, self.down_proj, sizes) + rows_bias(self.down_proj_bias, counts, n)
