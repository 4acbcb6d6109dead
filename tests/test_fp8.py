"""FP8 numerics (models/fp8.py): tile/block scales, E4M3 error bounds, ragged edges, the three GEMMs
of an FP8 Linear and of the FP8 grouped experts, against an independent reference written here
with plain loops (the recipe's definition) and against fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.experts import GroupedExperts
from models.fp8 import (
    E4M3,
    Fp8GroupedGemm,
    Fp8Linear,
    Fp8Recipe,
    dequantize_blocks,
    dequantize_row_tiles,
    dequantize_tiles,
    e4m3_error_bound,
    fp8_linear,
    quantize_blocks,
    quantize_row_tiles,
    quantize_tiles,
    resolve_backend,
)

T = 128


# ---------------------------------------------------------------- independent reference
def ref_fake_quant(v: torch.Tensor, dim=None) -> torch.Tensor:
    """One scaling group (max-abs over `dim`, all if None): round through E4M3 with scale amax/448."""
    amax = v.abs().amax() if dim is None else v.abs().amax(dim=dim, keepdim=True)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (v / s).clamp(-448, 448).to(E4M3).float() * s


def ref_tiles(x: torch.Tensor) -> torch.Tensor:  # 1 x 128 along the last dim
    out = torch.empty_like(x)
    for j in range(0, x.shape[1], T):
        out[:, j:j + T] = ref_fake_quant(x[:, j:j + T], dim=1)
    return out


def ref_blocks(w: torch.Tensor) -> torch.Tensor:  # 128 x 128
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], T):
        for j in range(0, w.shape[1], T):
            out[i:i + T, j:j + T] = ref_fake_quant(w[i:i + T, j:j + T])
    return out


def ref_row_tiles(x: torch.Tensor, counts=None) -> torch.Tensor:  # 128 x 1 along rows, inside groups
    counts = [x.shape[0]] if counts is None else list(counts)
    out, start = torch.empty_like(x), 0
    for c in counts:
        for i in range(start, start + c, T):
            end = min(i + T, start + c)
            out[i:end] = ref_fake_quant(x[i:end], dim=0)
        start += c
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def spread(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values over ~6 decades, both signs: exercises normals, subnormals and per-tile outliers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * 2.5)


# ---------------------------------------------------------------- quantisation
def test_tile_scales_ragged_and_local():
    x = spread(5, 300)
    x[2, 290] = 1e4  # an outlier in the ragged last tile of row 2
    q, s = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (5, 3) and s.dtype == torch.float32
    for j, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
        torch.testing.assert_close(s[:, j], x[:, a:b].abs().amax(1) / 448, rtol=0, atol=0)
    assert float(s[2, 2]) == pytest.approx(1e4 / 448)
    assert float(s[2, 1]) < 1e4 / 448 / 10  # the outlier does not leak into other tiles
    # the max-abs element of every tile lands exactly on +-448
    for j, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
        idx = x[:, a:b].abs().argmax(1)
        top = q[:, a:b].float().gather(1, idx[:, None]).abs()
        assert torch.equal(top, torch.full_like(top, 448.0))
    torch.testing.assert_close(dequantize_tiles(q, s), ref_tiles(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (3, 130, 70)])
def test_block_scales_ragged_and_batched(shape):
    w = spread(*shape, seed=1)
    q, s = quantize_blocks(w)
    n, k = shape[-2:]
    assert q.shape == w.shape and s.shape == (*shape[:-2], -(-n // T), -(-k // T))
    ws = w.reshape(-1, n, k)
    ss = s.reshape(-1, *s.shape[-2:])
    for e in range(ws.shape[0]):
        for bi in range(ss.shape[1]):
            for bj in range(ss.shape[2]):
                blk = ws[e, bi * T:(bi + 1) * T, bj * T:(bj + 1) * T]
                assert float(ss[e, bi, bj]) == float(blk.abs().max() / 448)
        torch.testing.assert_close(dequantize_blocks(q, s).reshape(-1, n, k)[e], ref_blocks(ws[e]), rtol=0, atol=0)


def test_e4m3_error_bound_respected_and_tight():
    """|x - dq(q(x))| <= max(2^-4 |x|, 2^-10 scale) for every element (E4M3: 3 mantissa bits, subnormal
    spacing 2^-9 below 2^-6); and the bound is nearly reached, so values really went through E4M3."""
    x = spread(64, 1000, seed=2)
    q, s = quantize_tiles(x)
    err = (dequantize_tiles(q, s) - x).abs()
    bound = e4m3_error_bound(x, s.repeat_interleave(T, 1)[:, :1000])
    assert bool((err <= bound * (1 + 1e-6)).all()), float((err / bound).max())
    scaled = x.abs() / s.repeat_interleave(T, 1)[:, :1000]
    normal = scaled >= 2.0**-6
    worst_rel = float((err[normal] / x.abs()[normal]).max())
    assert 0.05 < worst_rel <= 2.0**-4 * (1 + 1e-6), worst_rel  # RNE with 3 mantissa bits: up to 1/16
    # weights (blocks) and row tiles obey the same bound
    w = spread(300, 260, seed=3)
    qw, sw = quantize_blocks(w)
    ew = (dequantize_blocks(qw, sw) - w).abs()
    full = sw.repeat_interleave(T, 0)[:300].repeat_interleave(T, 1)[:, :260]
    assert bool((ew <= e4m3_error_bound(w, full) * (1 + 1e-6)).all())
    qr, sr, ids = quantize_row_tiles(w)
    er = (dequantize_row_tiles(qr, sr, ids) - w).abs()
    assert bool((er <= e4m3_error_bound(w, sr[ids]) * (1 + 1e-6)).all())


def test_row_tiles_stay_inside_groups():
    x = spread(300, 40, seed=4)
    counts = torch.tensor([100, 0, 170, 30])
    x[99, 5] = 1e5  # last row of group 0: must not affect group 2's first tile
    q, s, ids = quantize_row_tiles(x, counts=counts)
    assert s.shape == (1 + 0 + 2 + 1, 40)
    assert ids.tolist()[:101] == [0] * 100 + [1] and ids[269] == 2 and ids[270] == 3
    torch.testing.assert_close(dequantize_row_tiles(q, s, ids), ref_row_tiles(x, counts.tolist()), rtol=0, atol=0)
    assert float(s[1, 5]) < 1e5 / 448 / 10


def test_zero_and_empty_inputs():
    q, s = quantize_tiles(torch.zeros(3, 200))
    assert torch.equal(dequantize_tiles(q, s), torch.zeros(3, 200)) and torch.equal(s, torch.ones(3, 2))
    q, s = quantize_tiles(torch.zeros(0, 64))
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s, ids = quantize_row_tiles(torch.zeros(0, 8), counts=torch.tensor([0, 0]))
    assert q.shape == (0, 8) and s.shape == (0, 8)


# ---------------------------------------------------------------- Linear
def _linear_case(m=150, k=300, n=200, seed=0, backend="emulate"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m // 2, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    dy = torch.randn(2, m // 2, n, generator=g)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xa, wa, recipe=Fp8Recipe(backend=backend))
    y.backward(dy)
    return x, w, dy, y.detach(), xa.grad, wa.grad


def test_fp8_linear_matches_recipe_reference():
    """Forward, dgrad and wgrad equal the recipe computed by hand: E4M3 operands with 1x128 tiles
    (x, dy), 128x128 blocks (w), 128x1 tiles for wgrad (dy and the cached FP8 x), fp32 GEMMs."""
    x, w, dy, y, dx, dw = _linear_case()
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y_ref = ref_tiles(x2) @ ref_blocks(w).t()
    dx_ref = ref_tiles(dy2) @ ref_blocks(w)
    dw_ref = ref_row_tiles(dy2).t() @ ref_row_tiles(ref_tiles(x2))
    torch.testing.assert_close(y.reshape(-1, 200), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.reshape(-1, 300), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-4)


def test_fp8_linear_vs_fp32_within_fp8_bounds():
    """Against exact fp32: every output element within the worst-case bound of two E4M3 operands,
    |y - y32| <= (2*2^-4 + 2^-8) |x|@|w|^T + subnormal slack; and the relative error is FP8-sized
    (~3.7% expected from RNE with 3 mantissa bits on both operands: sqrt(2) * 0.026)."""
    x, w, dy, y, dx, dw = _linear_case(seed=1)
    x2, dy2 = x.reshape(-1, 300), dy.reshape(-1, 200)
    y32, dx32, dw32 = x2 @ w.t(), dy2 @ w, dy2.t() @ x2
    eps = 2 * 2.0**-4 + 2.0**-8
    slack = 1e-3
    assert bool(((y.reshape(-1, 200) - y32).abs() <= eps * (x2.abs() @ w.abs().t()) + slack).all())
    assert bool(((dx.reshape(-1, 300) - dx32).abs() <= eps * (dy2.abs() @ w.abs()) + slack).all())
    # wgrad's x went through E4M3 twice (1x128 cache, 128x1 re-tile): 3 roundings of 2^-4 at most
    eps_w = (1 + 2.0**-4) ** 3 - 1
    assert bool(((dw - dw32).abs() <= eps_w * (dy2.abs().t() @ x2.abs()) + slack).all())
    for got, want in ((y.reshape(-1, 200), y32), (dx.reshape(-1, 300), dx32), (dw, dw32)):
        assert 0.01 < rel(got, want) < 0.06, rel(got, want)


def test_scaled_mm_backend_matches_emulation():
    """torch._scaled_mm (real float8 GEMM, row-wise scales per 128-slice of K, fp32 promotion) gives
    the emulation's numbers: both implement the same recipe."""
    assert resolve_backend(Fp8Recipe(backend="scaled_mm"), "fwd", torch.device("cpu")) == "scaled_mm"
    a = _linear_case(seed=2, backend="emulate")
    b = _linear_case(seed=2, backend="scaled_mm")
    for ea, eb in zip(a[3:], b[3:]):
        torch.testing.assert_close(eb, ea, rtol=1e-5, atol=1e-5)


def test_cpu_auto_backend_is_emulation():
    for kind in ("fwd", "dgrad", "wgrad"):
        assert resolve_backend(Fp8Recipe(), kind, torch.device("cpu")) == "emulate"
    with pytest.raises(ValueError):
        Fp8Recipe(backend="nope")


def test_grads_reach_fp32_master_weights_under_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=True)
    w0 = lin.weight
    ref = nn.Linear(96, 160, bias=True)
    ref.load_state_dict(lin.state_dict())
    fp8 = Fp8Linear.from_linear(lin, Fp8Recipe())
    assert fp8.weight is w0 and fp8.weight.dtype == torch.float32 and set(fp8.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 33, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16
    (y.float() ** 2).mean().backward()
    assert fp8.weight.grad is not None and fp8.weight.grad.dtype == torch.float32
    assert fp8.bias.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    (y_ref.float() ** 2).mean().backward()
    assert 0.005 < rel(fp8.weight.grad, ref.weight.grad) < 0.08
    before = fp8.weight.detach().clone()
    torch.optim.SGD(fp8.parameters(), lr=0.1).step()
    assert not torch.equal(before, fp8.weight) and fp8.weight.dtype == torch.float32


# ---------------------------------------------------------------- grouped experts
def test_fp8_grouped_experts_vs_reference_and_fp32():
    """Ragged expert groups (one empty, none a multiple of 128), hidden 96 (ragged tile)."""
    torch.manual_seed(0)
    counts = torch.tensor([130, 0, 5, 200])
    n, h, inter = int(counts.sum()), 96, 40
    exp32 = GroupedExperts(4, h, inter)
    exp32.reset_parameters(0.05)
    exp8 = GroupedExperts(4, h, inter)
    exp8.load_state_dict(exp32.state_dict())
    exp8.gemm = Fp8GroupedGemm(Fp8Recipe())
    x = torch.randn(n, h)
    dy = torch.randn(n, h)
    outs = {}
    for name, mod in (("fp32", exp32), ("fp8", exp8)):
        xa = x.clone().requires_grad_()
        y = mod(xa, counts)
        y.backward(dy)
        outs[name] = (y.detach(), xa.grad, mod.gate_up_proj.grad, mod.down_proj.grad)
    for got, want in zip(outs["fp8"], outs["fp32"]):
        assert got.dtype == torch.float32
        assert 0.005 < rel(got, want) < 0.08, rel(got, want)

    # the recipe by hand, expert by expert
    sizes = counts.tolist()
    fq_up = [ref_blocks(w) for w in exp32.gate_up_proj.detach()]
    fq_down = [ref_blocks(w) for w in exp32.down_proj.detach()]
    xs, dys = x.split(sizes), dy.split(sizes)
    gate_up = [ref_tiles(xe) @ wu.t() for xe, wu in zip(xs, fq_up)]
    acts = [torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:] for gu in gate_up]
    y_ref = torch.cat([ref_tiles(a) @ wd.t() for a, wd in zip(acts, fq_down)])
    torch.testing.assert_close(outs["fp8"][0], y_ref, rtol=1e-4, atol=1e-5)
    # down_proj wgrad: 128x1 tiles that restart at every expert boundary
    dwd_ref = torch.stack([
        ref_row_tiles(dye).t() @ ref_row_tiles(ref_tiles(a)) if len(a) else torch.zeros(h, inter)
        for dye, a in zip(dys, acts)
    ])
    torch.testing.assert_close(outs["fp8"][3], dwd_ref, rtol=1e-4, atol=1e-4)
    assert float(outs["fp8"][3][1].abs().max()) == 0.0  # the empty expert gets a zero gradient
