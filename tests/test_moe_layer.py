"""DeepSeekMoE layer: grouped GEMM vs looped experts vs a naive per-token reference,
the local dispatcher, and V2 token dropping (capacity factor)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.moe import LocalDispatcher, MoE
from models.moe_state import MoEStepState
from models.router import Router, capacity_keep_mask
from tests.model_helpers import make_moe as base_make_moe, moe_cfg as base_moe_cfg


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def moe_cfg(**kw) -> ModelConfig:
    return base_moe_cfg(**{"n_group": 2, **kw})


def make_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    return base_make_moe(cfg, seed, std=0.2)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """For each token: shared(x) + sum_k g_k FFN_{e_k}(x), expert weights sliced from the stacks."""
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.gate(flat)
    inter = moe.experts.intermediate_size
    outs = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        y = moe.shared_experts(xt)
        for k in range(routing.topk_idx.shape[1]):
            e = int(routing.topk_idx[t, k])
            g = routing.topk_weight[t, k]
            if routing.keep is not None and not routing.keep[t, k]:
                continue
            w_gate = moe.experts.gate_up_proj[e, :inter]
            w_up = moe.experts.gate_up_proj[e, inter:]
            w_down = moe.experts.down_proj[e]
            y = y + g * (w_down @ (F.silu(w_gate @ xt) * (w_up @ xt)))
        outs.append(y)
    return torch.stack(outs).view_as(x)


def clone_with_impl(moe: MoE, impl: str) -> MoE:
    cfg = moe_cfg(**{**moe.cfg.__dict__, "experts_implementation": impl})
    other = MoE(cfg)
    other.load_state_dict(moe.state_dict())
    return other


def record_counts(moe: MoE) -> list:
    seen = []
    orig = moe.experts.forward

    def wrapped(x, counts, gates=None):
        seen.append((x.shape[0], counts.clone()))
        return orig(x, counts, gates)

    moe.experts.forward = wrapped
    return seen


@pytest.mark.parametrize("train", [False, True])
def test_grouped_mm_equals_loop_and_naive_with_an_idle_expert(train):
    cfg = moe_cfg()
    base = make_moe(cfg, seed=1)
    with torch.no_grad():
        base.gate.e_score_correction_bias[3] = -10.0  # expert 3 never selected
    a, b = clone_with_impl(base, "grouped_mm"), clone_with_impl(base, "loop")
    a.train(train)
    b.train(train)
    seen = record_counts(a)
    torch.manual_seed(2)
    x = torch.randn(2, 10, cfg.hidden_size)
    xa, xb, xn = (x.clone().requires_grad_(True) for _ in range(3))
    ya, yb = a(xa), b(xb)
    assert seen[0][1][3] == 0 and seen[0][1].sum() == 20 * cfg.num_experts_per_tok
    assert (seen[0][1] > 0).sum() >= 4
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ref_mod = clone_with_impl(base, "loop")
    yn = naive_moe(ref_mod, xn)
    torch.testing.assert_close(ya, yn, rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    upstream = torch.randn_like(ya)
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    (yn * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xn.grad, rtol=1e-5, atol=1e-6)
    pa, pb, pn = dict(a.named_parameters()), dict(b.named_parameters()), dict(ref_mod.named_parameters())
    for name in pa:
        torch.testing.assert_close(pa[name].grad, pb[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(pa[name].grad, pn[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    assert a.experts.gate_up_proj.grad[3].abs().sum() == 0
    assert a.experts.gate_up_proj.grad.abs().sum() > 0
    assert a.gate.weight.grad.abs().sum() > 0


def test_grouped_mm_backward_after_plain_sum():
    """.sum() sends a zero-stride gradient, which torch._grouped_mm's backward rejects unless made contiguous."""
    moe = clone_with_impl(make_moe(moe_cfg(), seed=4), "grouped_mm")
    moe(torch.randn(1, 6, 16)).sum().backward()
    assert moe.experts.down_proj.grad.abs().sum() > 0


def test_v2_softmax_moe_equals_naive():
    cfg = moe_cfg(scoring_func="softmax", topk_method="group_limited_greedy", routed_scaling_factor=1.0, norm_topk_prob=False, n_shared_experts=2)
    moe = make_moe(cfg, seed=5)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_local_dispatcher_round_trip():
    torch.manual_seed(6)
    T, H, E, K = 12, 5, 6, 3
    x = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    d = LocalDispatcher(E)
    rows, counts, ctx = d.dispatch(x, idx, None)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    assert rows.shape == (T * K, H)
    # rows are in expert-major order: each block holds the tokens routed to that expert
    start = 0
    for e, c in enumerate(counts.tolist()):
        tokens = sorted((idx == e).any(-1).nonzero().flatten().tolist())
        block = rows[start : start + c]
        assert sorted(int((x - r).abs().sum(-1).argmin()) for r in block) == tokens
        start += c
    torch.testing.assert_close(d.combine(rows * d.row_gates(w, ctx).unsqueeze(1), ctx), x * w.sum(-1, keepdim=True))
    # with dropped assignments: fewer rows, and only kept gates contribute
    keep = torch.rand(T, K) > 0.3
    rows, counts, ctx = d.dispatch(x, idx, keep)
    assert rows.shape[0] == int(keep.sum()) == int(counts.sum())
    torch.testing.assert_close(d.combine(rows * d.row_gates(w, ctx).unsqueeze(1), ctx), x * (w * keep).sum(-1, keepdim=True))


# --------------------------------------------------------------------------- token dropping


def reference_keep(topk_idx, score, E, cf):
    T, K = len(topk_idx), len(topk_idx[0])
    cap = math.ceil(cf * T * K / E)
    keep = [[False] * K for _ in range(T)]
    for e in range(E):
        assigned = [(score[t][k], t, k) for t in range(T) for k in range(K) if topk_idx[t][k] == e]
        for _, t, k in sorted(assigned, reverse=True)[:cap]:
            keep[t][k] = True
    return keep, cap


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.3])
def test_capacity_keep_mask_matches_loops(cf):
    torch.manual_seed(7)
    T, E, K = 20, 6, 2
    # skewed routing so that some experts overflow
    probs = torch.tensor([6.0, 3.0, 1.0, 1.0, 0.5, 0.5])
    idx = torch.stack([torch.multinomial(probs, K) for _ in range(T)])
    score = torch.rand(T, K)
    got = capacity_keep_mask(idx, score, E, cf)
    want, cap = reference_keep(idx.tolist(), score.tolist(), E, cf)
    assert got.tolist() == want
    kept_per_expert = torch.bincount(idx[got], minlength=E)
    assert kept_per_expert.max() <= cap
    assert (~got).any(), "nothing dropped: test does not exercise capacity"


def test_router_and_moe_drop_tokens():
    cf = 1.0
    cfg = moe_cfg(capacity_factor=cf, n_group=1, topk_group=1, experts_implementation="grouped_mm")
    moe = make_moe(cfg, seed=8)
    with torch.no_grad():  # make expert 0 popular so it overflows
        moe.gate.e_score_correction_bias[0] = 1.0
    moe.train()
    state = MoEStepState([moe])
    seen = record_counts(moe)
    torch.manual_seed(9)
    x = torch.randn(2, 8, 16)
    flat = x.reshape(-1, 16)
    routing = moe.gate(flat)
    assert routing.keep is not None
    want_keep, cap = reference_keep(routing.topk_idx.tolist(), routing.scores.detach().gather(1, routing.topk_idx).tolist(), 8, cf)
    assert routing.keep.tolist() == want_keep
    n_dropped = int((~routing.keep).sum())
    assert n_dropped > 0
    assert (routing.topk_weight[~routing.keep] == 0).all()
    # kept gates are unchanged from the dropless router
    dropless = Router(moe_cfg(n_group=1, topk_group=1))
    dropless.load_state_dict(moe.gate.state_dict())
    full = dropless(flat)
    torch.testing.assert_close(routing.topk_weight[routing.keep], full.topk_weight[routing.keep])

    y = moe(x)
    load = state.end_step(0.0)
    assert load.dropped_tokens == n_dropped
    n_rows, counts = seen[0]
    assert n_rows == 16 * 2 - n_dropped == int(counts.sum())
    assert counts.max() <= cap
    torch.testing.assert_close(load.counts[0], counts.float())
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-5, atol=1e-6)
    moe(x)
    moe(x)
    assert state.end_step(0.0).dropped_tokens == 2 * n_dropped  # accumulates over micro-batches


def test_unaligned_hidden_size_falls_back_to_the_loop_and_empty_batches_work():
    """torch._grouped_mm on CPU needs 16-byte row strides; odd sizes take the loop, same numbers."""
    from models.config import ModelConfig
    from models.moe import MoE

    cfg = ModelConfig(hidden_size=6, moe_intermediate_size=5, n_routed_experts=4, num_experts_per_tok=2,
                      n_group=2, topk_group=1, n_shared_experts=1)
    moe = MoE(cfg)
    moe.reset_parameters(0.1)
    x = torch.randn(2, 3, 6)
    assert moe.experts.resolved_implementation(x.reshape(-1, 6)) == "loop"
    moe(x).sum().backward()
    assert moe(torch.randn(1, 0, 6)).shape == (1, 0, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grouped_mm_applies_exactly_where_the_cpu_kernel_runs_forward_and_backward(dtype):
    """The one grouped-GEMM-or-loop rule agrees with torch._grouped_mm itself, widths in and out."""
    from models.experts import grouped_mm_applies

    offsets = torch.tensor([2, 5, 7], dtype=torch.int32)
    for width_in in (4, 5, 6, 8, 16):
        for width_out in (4, 5, 6, 8, 12):
            x = torch.randn(7, width_in, dtype=dtype, requires_grad=True)
            w = torch.randn(3, width_out, width_in, dtype=dtype, requires_grad=True)
            try:
                y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
                y.backward(torch.randn_like(y))  # a dense gradient (.sum()'s zero strides are refused)
                runs = True
            except RuntimeError:
                runs = False
            assert grouped_mm_applies(x, width_in, width_out) == runs, (dtype, width_in, width_out)


def test_fused_swiglu_matches_autograd_through_chunk():
    from models.experts import swiglu

    torch.manual_seed(0)
    gu = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gu,))
    gate, up = gu.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    grad = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(swiglu(gu), ref)
    torch.testing.assert_close(torch.autograd.grad(swiglu(gu), gu, grad)[0], torch.autograd.grad(ref, gu, grad)[0])
