"""moe_act under fp8 (report §3.3.3): the routed experts keep only an FP8 copy of the SwiGLU input.

models/fp8.py's down_of_swiglu is the down projection of swiglu(gate_up) whose backward recomputes the SwiGLU
(and its FP8 quantisation) from the FP8 copy of gate_up. Checked: its forward is the unfused path's bitwise;
its gradients are bitwise those of the unfused path run on gate_up's FP8 round trip (so the only numerical
change is that rounding); what autograd keeps is the FP8 gate_up (1x128 tiles), no [rows, 2I] copy at the
activation dtype and no FP8 SwiGLU output; and a whole model under moe_act trains within FP8 error of none.
"""

from __future__ import annotations

import pytest
import torch

from models.experts import GroupedExperts
from models.fp8 import E4M3, Fp8GroupedGemm, Fp8Recipe, dequantize_tiles, quantize_tiles
from tests.test_recompute import MODULES, step

ROWS, HIDDEN, INTER, EXPERTS = 96, 128, 192, 4  # 2I = 384: three 128-tiles; I = 192: a ragged tile


def _experts(recomputed: bool) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(EXPERTS, HIDDEN, INTER)
    experts.reset_parameters(0.05)
    experts.gemm = Fp8GroupedGemm(Fp8Recipe(backend="emulate"))
    experts.gemm.swiglu_recomputed = recomputed
    return experts


def _gate_up_and_counts(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(ROWS, 2 * INTER, generator=g).to(dtype)
    counts = torch.tensor([30, 0, 41, 25])
    return gate_up, counts, counts.cumsum(0).to(torch.int32)


def _down(experts: GroupedExperts, gate_up: torch.Tensor, counts, offsets, fused: bool) -> torch.Tensor:
    if fused:
        return experts.gemm.down_of_swiglu(gate_up, experts.down_proj, counts, offsets)
    return experts.gemm(experts.activation(gate_up), experts.down_proj, counts, offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_is_bitwise_and_backward_is_the_unfused_one_on_the_fp8_copy(dtype):
    experts = _experts(True)
    gate_up, counts, offsets = _gate_up_and_counts(dtype)
    grad = torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run(x: torch.Tensor, fused: bool):
        x = x.detach().requires_grad_(True)
        experts.down_proj.grad = None
        y = _down(experts, x, counts, offsets, fused)
        y.backward(grad)
        return y.detach(), x.grad, experts.down_proj.grad

    y, d_gate_up, d_down = run(gate_up, fused=True)
    assert torch.equal(y, run(gate_up, fused=False)[0])  # forward numerics unchanged
    fp8_copy = dequantize_tiles(*quantize_tiles(gate_up)).to(dtype)  # what backward recomputes from
    _, ref_d_gate_up, ref_d_down = run(fp8_copy, fused=False)
    assert torch.equal(d_gate_up, ref_d_gate_up)
    assert torch.equal(d_down, ref_d_down)


def test_only_the_fp8_swiglu_input_is_saved():
    gate_up, counts, offsets = _gate_up_and_counts(torch.bfloat16)
    saved: dict[str, list[tuple[torch.dtype, tuple[int, ...]]]] = {}
    for fused in (False, True):
        experts = _experts(fused)
        seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if type(t) is torch.Tensor and t.dim() == 2 and t.shape[0] == ROWS:
                seen.append((t.dtype, tuple(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _down(experts, gate_up.clone().requires_grad_(True), counts, offsets, fused)
        saved[str(fused)] = seen
    # unfused: the bf16 SwiGLU input and the FP8 SwiGLU output; fused: only the FP8 input (and its scales)
    assert (torch.bfloat16, (ROWS, 2 * INTER)) in saved["False"]
    assert (E4M3, (ROWS, INTER)) in saved["False"]
    assert saved["True"] == [(E4M3, (ROWS, 2 * INTER)), (torch.float32, (ROWS, 3))]


def test_forward_routes_through_the_fused_gemm_only_when_recomputed():
    x = torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(3))
    counts = torch.tensor([30, 0, 41, 25])
    assert torch.equal(_experts(True)(x, counts), _experts(False)(x, counts))


@pytest.mark.parametrize("modules", [("moe_act",), MODULES], ids=["moe_act", "all_selective"])
def test_model_under_fp8_moe_act_matches_none_within_fp8_error(modules, single_thread):
    loss, grads, kept_none, _ = step("none", precision="fp8")
    got_loss, got_grads, kept, _ = step("selective", modules, precision="fp8")
    assert torch.equal(got_loss, loss)  # the forward is unchanged
    assert kept < kept_none
    assert got_grads.keys() == grads.keys()
    worst = 0.0
    for name, g in grads.items():  # one more E4M3 rounding (<= 2^-4 relative) on the routed SwiGLU's input
        err = float((got_grads[name] - g).float().norm() / g.float().norm().clamp_min(1e-30))
        worst = max(worst, err)
        assert err < 0.1, (name, err)  # relative RMS, the FP8 tolerance of tests/test_hf_fp8.py
    assert worst > 0, "the FP8 copy is what backward used"
