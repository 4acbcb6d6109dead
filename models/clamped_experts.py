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

from typing import Optional

import torch
from torch import nn

from models.experts import GroupedExperts, apply_gates, gates_backward, grouped_linear, looped_linear

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class _ClampedSwiGLU(torch.autograd.Function):
    """(u~ + 1) g~ sigmoid(alpha g~) from one [N, 2I] (gate | up) tensor, times each row's gate if `gates`
    [N] is given (models/experts.py's apply_gates); saves only that input (and the gates)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, limit: float, alpha: float,  # type: ignore[override]
                gates: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(gate_up, gates)
        ctx.limit, ctx.alpha = limit, alpha
        act = clamped_swiglu_forward(gate_up, limit, alpha)
        return act if gates is None else apply_gates(act, gates)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate_up, gates = ctx.saved_tensors
        limit, alpha = ctx.limit, ctx.alpha
        grad_gates = None
        if gates is not None:
            grad, grad_gates = gates_backward(grad, clamped_swiglu_forward(gate_up, limit, alpha), gates,
                                              ctx.needs_input_grad[3])
        gate, up = gate_up.chunk(2, dim=-1)
        gate_c, up_c = gate.clamp(max=limit), up.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * gate_c)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        # clamp passes the gradient where the input lies inside the closed range (as torch.clamp)
        torch.mul(grad * gate_c * sig, (up.abs() <= limit).to(grad.dtype), out=grad_up)
        d_act_d_gate = sig * (1 + alpha * gate_c * (1 - sig))  # d/dg [g sigmoid(alpha g)]
        torch.mul(grad * (up_c + 1) * d_act_d_gate, (gate <= limit).to(grad.dtype), out=grad_gate)
        return grad_gate_up, None, None, grad_gates


def clamped_swiglu_forward(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """(u~ + 1) g~ sigmoid(alpha g~) without autograd bookkeeping (the forward, and its recomputation)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)


def clamped_swiglu(gate_up: torch.Tensor, limit: float = SWIGLU_LIMIT, alpha: float = SWIGLU_ALPHA,
                   gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gpt-oss activation of a fused (gate | up) projection [..., 2I] -> [..., I] (times each row's gate)."""
    return _ClampedSwiGLU.apply(gate_up, limit, alpha, gates)


def rows_bias(bias: torch.Tensor, counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """bias[e] repeated for each of expert e's counts[e] rows: [E, D] -> [n_rows, D]."""
    return bias.repeat_interleave(counts, dim=0, output_size=n_rows)


class _GatedRowsBias(torch.autograd.Function):
    """g_j bias[e(j)] for every row j of expert e(j) (the gated expert output's bias term, g (h W + b) =
    (g h) W + g b), keeping only the bias, the counts and the gates, not the [N, D] rows:
    dL/dbias[e] = sum over e's rows of g_j dout_j, dL/dg_j = <dout_j, bias[e(j)]>."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(bias, counts, gates)
        return rows_bias(bias, counts, gates.shape[0]) * gates.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        bias, counts, gates = ctx.saved_tensors
        g = grad.float()
        grad_gates = grad_bias = None
        if ctx.needs_input_grad[2]:
            rows = rows_bias(bias, counts, gates.shape[0]).float()
            grad_gates = torch.bmm(g.unsqueeze(1), rows.unsqueeze(2)).view(-1)
        if ctx.needs_input_grad[0]:
            expert_of = torch.arange(bias.shape[0], device=bias.device).repeat_interleave(counts, output_size=g.shape[0])
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            grad_bias = grad_bias.index_add_(0, expert_of, g * gates.unsqueeze(1)).to(bias.dtype)
        return grad_bias, None, grad_gates


def gated_rows_bias(bias: torch.Tensor, counts: torch.Tensor, n_rows: int,
                    gates: Optional[torch.Tensor]) -> torch.Tensor:
    """rows_bias, times each row's gate if given."""
    return rows_bias(bias, counts, n_rows) if gates is None else _GatedRowsBias.apply(bias, counts, gates)


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

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, H] sorted by expert; counts: [E] rows per expert -> [N, H], gated by `gates` [N] if given:
        g (h W + b) as (g h) W + g b."""
        n = x.shape[0]
        down_bias = gated_rows_bias(self.down_proj_bias, counts, n, gates)
        if self.gemm is not None or self.resolved_implementation(x) == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            gemm = self.gemm or (lambda rows, weight, _counts, offs: grouped_linear(rows, weight, offs))
            up = gemm(x, self.gate_up_proj, counts, offsets) + rows_bias(self.gate_up_proj_bias, counts, n)
            return gemm(self.activation(up, gates), self.down_proj, counts, offsets) + down_bias
        sizes = counts.tolist()
        up = looped_linear(x, self.gate_up_proj, sizes) + rows_bias(self.gate_up_proj_bias, counts, n)
        return looped_linear(self.activation(up, gates), self.down_proj, sizes) + down_bias

    def activation(self, gate_up: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The clamped SwiGLU of the fused [rows, 2I] projection output (times each row's gate if given):
        the down projection's input, which train.recompute's moe_act drops and recomputes."""
        return clamped_swiglu(gate_up, self.limit, self.alpha, gates)
