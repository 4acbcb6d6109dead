"""Routed experts as stacked weights, computed with one grouped GEMM per projection.

Tokens arrive sorted by expert (expert-major order) with `counts[e]` rows for expert e.
Weights are stored as [E, out, in] like a stack of nn.Linear weights (gate and up fused,
as in Hugging Face's in-memory DeepseekV3 experts), so export only splits them per expert.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects gradients with zero strides (e.g. from .sum()).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


class _SwiGLUFused(torch.autograd.Function):
    """silu(gate) * up from one [N, 2I] projection output (gate | up), without splitting it; with
    `gates` [N] (fp32), each row times its gate (`apply_gates`).

    Autograd through `.chunk(2)` concatenates the two half gradients into a fresh [N, 2I]
    tensor; this backward writes both halves of one buffer directly. Saved: gate_up (and the gates).
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, gates: Optional[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate_up, gates)
        act = swiglu_forward(gate_up)
        return act if gates is None else apply_gates(act, gates)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gate_up, gates = ctx.saved_tensors
        if gates is None:
            return swiglu_backward(grad, gate_up), None
        grad, grad_gates = gates_backward(grad, swiglu_forward(gate_up), gates, ctx.needs_input_grad[1])
        return swiglu_backward(grad, gate_up), grad_gates


def apply_gates(act: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """g_j act_j per row j (fp32 product, act's dtype): the gates of V3 eq. 12 applied on the expert side,
    to the down projection's input. The down projection is linear, so (g h) W^T = g (h W^T) is the gated
    expert output; a bias b after it (gpt-oss) needs g b beside it (models/clamped_experts.py)."""
    return (act.float() * gates.unsqueeze(1)).to(act.dtype)


def gates_backward(grad: torch.Tensor, act: torch.Tensor, gates: torch.Tensor,
                   need_gates: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of `apply_gates`: (g_j grad_j, <grad_j, act_j>). grad_j = dout_j W is the ungated gradient
    of the down projection's input, so <grad_j, act_j> = <dout_j, act_j W^T> = dL/dg_j without the expert
    output y_j = act_j W^T ever being kept (row-wise dot products as one batched GEMM, in fp32)."""
    g = grad.float()
    grad_gates = torch.bmm(g.unsqueeze(1), act.float().unsqueeze(2)).view(-1) if need_gates else None
    return (g * gates.unsqueeze(1)).to(grad.dtype), grad_gates


def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * up)/d(gate | up) applied to `grad`, written into one [N, 2I] buffer."""
    gate, up = gate_up.chunk(2, dim=-1)
    grad_gate_up = torch.empty_like(gate_up)
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    torch.mul(grad, F.silu(gate), out=grad_up)
    grad_gate.copy_(torch.ops.aten.silu_backward(grad * up, gate))
    return grad_gate_up


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up without autograd bookkeeping (the forward of `swiglu`, and its recomputation)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU activation of a fused (gate | up) projection: silu(gate) * up, times each row's gate if given."""
    return _SwiGLUFused.apply(gate_up, gates)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] @ weight[e].T for every expert e, in one kernel."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets))


# Operand dtypes torch._grouped_mm takes off CUDA (CPU: fp32, bf16, fp16; float64 is refused).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_applies(x: torch.Tensor, *row_widths: int) -> bool:
    """Whether torch._grouped_mm runs expert GEMMs on rows like `x` (its device and dtype) whose operands
    and gradients have rows of `row_widths` elements; where it does not, a per-expert loop of matmuls runs.

    CUDA: bf16 on sm90+. Elsewhere fp32, bf16 or fp16. Everywhere: every row stride a multiple of
    16 bytes (the kernel's check, in the forward and in autograd's backward GEMMs alike)."""
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in GROUPED_MM_DTYPES:
        return False
    return all(n * x.element_size() % 16 == 0 for n in row_widths)


def looped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Reference / fallback: one matmul per expert on its contiguous slice of rows."""
    chunks = x.split(counts)
    return torch.cat([c @ w.T for c, w in zip(chunks, weight)] or [x.new_zeros(0, weight.shape[1])])


class GroupedExperts(nn.Module):
    """SwiGLU experts: down(silu(gate(x)) * up(x)) with per-expert weights (V3 eq. 12's FFN_i)."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, implementation: str = "auto") -> None:
        super().__init__()
        self.n_experts = n_experts
        self.intermediate_size = intermediate_size
        self.implementation = implementation
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        # Optional replacement GEMM (x, weight [E, out, in], counts, offsets) -> rows @ weight[e].T,
        # e.g. models.fp8.Fp8GroupedGemm installed by train/precision.py; None = the paths below.
        # A hook whose `swiglu_recomputed` is true also provides down_of_swiglu(gate_up, weight, counts,
        # offsets, gates) = its GEMM of swiglu(gate_up, gates), which keeps only its own copy of gate_up
        # (and the gates) for backward.
        self.gemm: Optional[Callable[..., torch.Tensor]] = None

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def dispatch_input(self, x: torch.Tensor) -> Any:
        """What the token dispatcher moves to these experts for token rows x [T, H]: x, or the form the GEMM
        hook takes as it is (models.fp8.Fp8GroupedGemm: the rows quantised once, before dispatch). The
        dispatchers only select and exchange its rows (index_select, parallel/'s all-to-all)."""
        prepare = getattr(self.gemm, "dispatch_rows", None)
        return x if prepare is None else prepare(x)

    def resolved_implementation(self, x: torch.Tensor) -> str:
        if self.implementation != "auto":
            return self.implementation
        # Rows of both GEMMs: hidden (x, the down projection's output) and intermediate (its input).
        return "grouped_mm" if grouped_mm_applies(x, x.shape[-1], self.intermediate_size) else "loop"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, H] sorted by expert; counts: [E] rows per expert -> [N, H]. `gates` [N] (fp32): each row's
        gate, applied to the down projection's input (`apply_gates`), so the outputs come back gated."""
        if self.gemm is not None:
            offsets = counts.cumsum(0).to(torch.int32)
            gate_up = self.gemm(x, self.gate_up_proj, counts, offsets)
            if getattr(self.gemm, "swiglu_recomputed", False):
                return self.gemm.down_of_swiglu(gate_up, self.down_proj, counts, offsets, gates)
            return self.gemm(self.activation(gate_up, gates), self.down_proj, counts, offsets)
        if self.resolved_implementation(x) == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            act = self.activation(grouped_linear(x, self.gate_up_proj, offsets), gates)
            # The output is returned unwrapped (not a view): its consumer (combine's sum per token)
            # always sends a dense gradient, and FSDP2 hooks need a non-view module output.
            return torch._grouped_mm(act, self.down_proj.transpose(-2, -1), offs=offsets)
        sizes = counts.tolist()
        act = self.activation(looped_linear(x, self.gate_up_proj, sizes), gates)
        return looped_linear(act, self.down_proj, sizes)

    def activation(self, gate_up: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """silu(gate) * up of the fused [rows, 2I] projection output, times each row's gate if given
        (the down projection's input)."""
        return swiglu(gate_up, gates)
