"""FP8 training numerics: the DeepSeek-V3 fine-grained recipe (arXiv 2412.19437 §3.3).

Every FP8 GEMM takes E4M3 (`torch.float8_e4m3fn`, max 448) operands with fine-grained
scales from online max-abs (§3.3.2, Fig. 7a), and accumulates in FP32 (§3.3.2):

  activations and output gradients   1 x 128 tiles along the contraction dimension
  weights                            128 x 128 blocks (one quantised copy serves forward and dgrad)
  wgrad operands (dY, X)             128 x 1 tiles along tokens, the contraction dimension of dW = dY^T X;
                                     X comes from the FP8 activations cached in forward (§3.3.3),
                                     dequantised and re-quantised, as the report does for its 1x128 -> 128x1
                                     conversion; inside the expert GEMM tiles never cross an expert.

scale = amax(tile) / 448 (fp32), q = cast_e4m3(x / scale) with round-to-nearest-even, so the largest
element of each tile maps to +-448 and every element keeps <= 2^-4 relative error (3 mantissa bits),
or <= 2^-10 * scale absolute in E4M3's subnormal range. Ragged edges (sizes not divisible by 128)
are zero-padded for the max-abs, so the last tile's scale comes from its real elements only.

Execution backends for the three GEMMs of a Linear (forward Y = X W^T, dgrad dX = dY W,
wgrad dW = dY^T X); which one runs where:

  "emulate"    exact quantise -> dequantise emulation: the FP8 operands times their scales in fp32,
               then an fp32 matmul (fp32 accumulation). Every FP8 rounding is real; the only
               difference from a tensor-core kernel is fp32 rounding order. Runs on any device.
               Default on CPU: measured faster than "scaled_mm" on this machine (bench/precision.py).
  "scaled_mm"  torch._scaled_mm with float8 operands, which on CPU (torch 2.13) supports tensor-wise
               and row-wise scales only. Exact for this recipe because tile and block scales are
               constant over each 128-slice of the contraction dimension: one row-wise scaled GEMM per
               slice, promoted and summed in fp32 -- DeepSeek's promotion interval N_C = 128 (§3.3.2).
               Runs on CPU and CUDA; slower than "emulate" on CPU (many small GEMMs).
  "blockwise"  torch._scaled_mm's native 1x128 / 128x128 block scaling (CUDA sm90+, cuBLAS >= 12.9).
               Verified once per GEMM kind against "emulate" on the device; a kind that fails the probe
               (or a shape it cannot take) runs "emulate". Not available on CPU.
  "auto"       "blockwise" on CUDA sm90+ where the probe passes, else "emulate".

The routed-expert grouped GEMMs always run the emulation (torch._grouped_mm in fp32 on CPU, a
per-expert fp32 loop on CUDA): torch has no CPU `_scaled_grouped_mm`, and its CUDA one takes
row-wise scales only. A real m-grouped FP8 kernel (e.g. DeepGEMM) would slot in behind
`Fp8GroupedGemm`. Its input is quantised before dispatch (`QuantisedRows`, made by
`Fp8GroupedGemm.dispatch_rows`): the token dispatcher moves and expands the E4M3 rows and their
scales, and the GEMM uses them as they are (report §3.3).

Pure tensor code: no torch.distributed calls. A TP-sharded (DTensor) weight is computed on its
local shard, so scales are per shard; see `Fp8Linear.forward`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn

from models.experts import (apply_gates, gates_backward, grouped_mm_applies, looped_linear, swiglu_backward,
                            swiglu_forward)

log = logging.getLogger("moeforge")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
BACKENDS = ("auto", "emulate", "scaled_mm", "blockwise")


@dataclass(frozen=True)
class Fp8Recipe:
    tile: int = TILE  # 1 x tile activation / gradient tiles (and tile x 1 for wgrad)
    block: int = TILE  # block x block weight blocks
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend must be one of {'|'.join(BACKENDS)}, got {self.backend!r}")
        if self.tile <= 0 or self.block <= 0:
            raise ValueError("fp8 tile and block sizes must be > 0")


# ---------------------------------------------------------------- quantisation


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 decoding scale amax / 448; all-zero tiles get scale 1 (their values stay 0)."""
    s = amax.float() / E4M3_MAX
    return torch.where(s > 0, s, torch.ones_like(s))


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def quantize_tiles(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x tile quantisation along the last dim. x [..., K] -> (q [..., K] e4m3, scales [..., ceil(K/tile)] fp32)."""
    k = x.shape[-1]
    xp = _pad_last(x.float(), tile)
    t = xp.view(*xp.shape[:-1], xp.shape[-1] // tile, tile)
    s = _scale_from_amax(t.abs().amax(-1, keepdim=True))
    q = _cast(t, s).view(xp.shape)
    if q.shape[-1] != k:
        q = q[..., :k].contiguous()
    return q, s.squeeze(-1)


def dequantize_tiles(q: torch.Tensor, scales: torch.Tensor, tile: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = q.shape[-1]
    if k % tile == 0 and q.is_contiguous():
        return (q.to(dtype).view(*q.shape[:-1], k // tile, tile) * scales.to(dtype).unsqueeze(-1)).view(q.shape)
    return q.to(dtype) * scales.to(dtype).repeat_interleave(tile, dim=-1)[..., :k]


def quantize_blocks(w: torch.Tensor, block: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """block x block quantisation of the last two dims. w [..., N, K] -> (q, scales [..., ceil(N/b), ceil(K/b)])."""
    n, k = w.shape[-2:]
    pn, pk = -n % block, -k % block
    wp = F.pad(w.float(), (0, pk, 0, pn)) if (pn or pk) else w.float()
    lead = wp.shape[:-2]
    t = wp.view(*lead, (n + pn) // block, block, (k + pk) // block, block)
    s = _scale_from_amax(t.abs().amax(dim=(-3, -1), keepdim=True))
    q = _cast(t, s).view(wp.shape)
    if pn or pk:
        q = q[..., :n, :k].contiguous()
    return q, s.squeeze(-1).squeeze(-2)


def expand_block_scales(scales: torch.Tensor, n: int, k: int, block: int = TILE) -> torch.Tensor:
    """Per-element scales [..., n, k] from block scales [..., nb, kb]."""
    return scales.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block: int = TILE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape[-2:]
    if n % block == 0 and k % block == 0 and q.is_contiguous():
        lead = q.shape[:-2]
        t = q.to(dtype).view(*lead, n // block, block, k // block, block)
        return (t * scales.to(dtype)[..., :, None, :, None]).view(q.shape)
    return q.to(dtype) * expand_block_scales(scales.to(dtype), n, k, block)


class QuantisedWeights:
    """FP8 copies of weights, made once per weight version and shared by every micro-batch.

    A weight is quantised (128 x 128 blocks) the first time a GEMM needs it after it changed, and the
    same (q, scales) tensors are then used -- and saved for backward -- by the forward and backward
    of every micro-batch until the weight changes again: one quantised copy per weight per optimizer
    step, not one per micro-batch in flight (DESIGN.md 4b). The key is the weight's storage address,
    layout and autograd version counter; every in-place write (the optimizer step, ZeRO-1's copy of
    the updated shard, an FSDP2 all-gather, load_state_dict) bumps the version, so a stale copy is
    never used. `release_quantised_weights` drops all copies after backward, before the optimizer
    step, so they do not outlive the step. At most `capacity` weights are held (a Linear has one,
    the routed experts two: gate_up and down); an evicted copy stays alive only in the autograd
    graphs that saved it. Not copied by deepcopy or pickling (a copy starts empty).
    """

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._entries: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _slot(weight: torch.Tensor, block: int) -> tuple:
        return (weight.device, weight.data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()),
                weight.dtype, block)

    def get(self, weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scales) of `weight` in block x block blocks, quantised now only if it changed since the last call."""
        try:
            version = weight._version
        except RuntimeError:  # inference tensors have no version counter: nothing to key a copy on
            return quantize_blocks(weight, block)
        slot = self._slot(weight, block)
        hit = self._entries.get(slot)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        with torch.no_grad():
            q, s = quantize_blocks(weight.detach(), block)
        self._entries.pop(slot, None)
        self._entries[slot] = (version, q, s)
        while len(self._entries) > self.capacity:
            self._entries.pop(next(iter(self._entries)))
        return q, s

    def tensors(self) -> list[torch.Tensor]:
        """The quantised weights and scales held now (for memory accounting)."""
        return [t for _, q, s in self._entries.values() for t in (q, s)]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict) -> "QuantisedWeights":
        return QuantisedWeights(self.capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "_entries": {}}


def row_tile_ids(counts: Optional[torch.Tensor], n_rows: int, tile: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Tile index of every row for tile x 1 tiles along rows that never cross a group boundary.

    counts [G] rows per group (None: one group). Returns (ids [n_rows] int64, number of tiles).
    """
    if counts is None:
        return torch.arange(n_rows, device=device) // tile, -(-n_rows // tile)
    counts = counts.to(device=device, dtype=torch.int64)
    tiles_per_group = (counts + tile - 1) // tile
    first_tile = tiles_per_group.cumsum(0) - tiles_per_group
    group_start = counts.cumsum(0) - counts
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=n_rows)
    local = torch.arange(n_rows, device=device) - group_start[group]
    return first_tile[group] + local // tile, int(tiles_per_group.sum())


def quantize_row_tiles(
    x: torch.Tensor, tile: int = TILE, counts: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tile x 1 quantisation along rows (tokens), within groups of `counts` rows.

    x [M, K] -> (q [M, K] e4m3, scales [n_tiles, K] fp32, tile id of every row [M]).
    """
    x = x.float()
    ids, n_tiles = row_tile_ids(counts, x.shape[0], tile, x.device)
    if counts is None and x.shape[0] % tile == 0:
        amax = x.abs().view(n_tiles, tile, x.shape[1]).amax(1)
    else:
        amax = x.new_zeros(n_tiles, x.shape[1]).scatter_reduce_(0, ids[:, None].expand_as(x), x.abs(), "amax")
    s = _scale_from_amax(amax)
    return _cast(x, s[ids]), s, ids


def dequantize_row_tiles(q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scales.to(dtype)[ids]


def fake_quantize(x: torch.Tensor, kind: str = "tiles", tile: int = TILE) -> torch.Tensor:
    """x rounded through E4M3 with the recipe's scaling (kind: tiles | blocks | row_tiles), in x's dtype."""
    if kind == "tiles":
        return dequantize_tiles(*quantize_tiles(x, tile), tile).to(x.dtype)
    if kind == "blocks":
        return dequantize_blocks(*quantize_blocks(x, tile), tile).to(x.dtype)
    q, s, ids = quantize_row_tiles(x, tile)
    return dequantize_row_tiles(q, s, ids).to(x.dtype)


# ---------------------------------------------------------------- GEMM backends
# Operands (all quantised with `recipe`):
#   forward  x [M,K] 1xT tiles (scales [M,kt])   w [N,K] blocks ([nb,kb])  -> x w^T  [M,N]
#   dgrad    g [M,N] 1xT tiles (scales [M,nt])   w [N,K] blocks            -> g w    [M,K]
#   wgrad    g [M,N] Tx1 tiles (scales [mt,N])   x [M,K] Tx1 tiles ([mt,K]) -> g^T x [N,K] (fp32)


def _emulate_fwd(xq, xs, wq, ws, r: Fp8Recipe, out_dtype):
    return (dequantize_tiles(xq, xs, r.tile) @ dequantize_blocks(wq, ws, r.block).t()).to(out_dtype)


def _emulate_dgrad(gq, gs, wq, ws, r: Fp8Recipe, out_dtype):
    return (dequantize_tiles(gq, gs, r.tile) @ dequantize_blocks(wq, ws, r.block)).to(out_dtype)


def _emulate_wgrad(gq, gs, gids, xq, xs, xids, r: Fp8Recipe):
    return dequantize_row_tiles(gq, gs, gids).t() @ dequantize_row_tiles(xq, xs, xids)


def _colmajor(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def _scaled_mm_chunked(a_chunks, out_shape, device) -> torch.Tensor:
    """sum over contraction slices of torch._scaled_mm(a_c, b_c, row scales, column scales) in fp32."""
    out = torch.zeros(out_shape, dtype=torch.float32, device=device)
    for a, b, sa, sb in a_chunks:
        out += torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return out


def _scaled_mm_fwd(xq, xs, wq, ws, r: Fp8Recipe, out_dtype):
    m, n, t, b = xq.shape[0], wq.shape[0], r.tile, r.block
    col = ws.repeat_interleave(b, 0)[:n]  # [N, kb]
    chunks = (
        (xq[:, c * t:(c + 1) * t].contiguous(), wq[:, c * t:(c + 1) * t].contiguous().t(),
         xs[:, c:c + 1].contiguous(), col[:, c].contiguous().view(1, n))
        for c in range(xs.shape[1])
    )
    return _scaled_mm_chunked(chunks, (m, n), xq.device).to(out_dtype)


def _scaled_mm_dgrad(gq, gs, wq, ws, r: Fp8Recipe, out_dtype):
    m = gq.shape[0]
    k, t, b = wq.shape[1], r.tile, r.block
    col = ws.repeat_interleave(b, 1)[:, :k]  # [nb, K]
    chunks = (
        (gq[:, c * t:(c + 1) * t].contiguous(), _colmajor(wq[c * t:(c + 1) * t]),
         gs[:, c:c + 1].contiguous(), col[c].contiguous().view(1, k))
        for c in range(gs.shape[1])
    )
    return _scaled_mm_chunked(chunks, (m, k), gq.device).to(out_dtype)


def _scaled_mm_wgrad(gq, gs, gids, xq, xs, xids, r: Fp8Recipe):
    n, k, t = gq.shape[1], xq.shape[1], r.tile
    chunks = (
        (gq[c * t:(c + 1) * t].t().contiguous(), _colmajor(xq[c * t:(c + 1) * t]),
         gs[c].contiguous().view(n, 1), xs[c].contiguous().view(1, k))
        for c in range(gs.shape[0])
    )
    return _scaled_mm_chunked(chunks, (n, k), gq.device)


# CUDA sm90+: native block scaling. Layouts follow torch's _scaled_mm contract (1x128 scales
# outer-dim-major, 128x128 scales in block units of the mat2 operand); each GEMM kind is checked
# against the emulation on first use, so a layout mismatch degrades to "emulate", never to wrong numbers.
def _blockwise_fwd(xq, xs, wq, ws, r: Fp8Recipe, out_dtype):
    st = F.ScalingType
    return F.scaled_mm(xq, wq.t(), _colmajor(xs), st.BlockWise1x128, ws.t(), st.BlockWise128x128, output_dtype=out_dtype)


def _blockwise_dgrad(gq, gs, wq, ws, r: Fp8Recipe, out_dtype):
    st = F.ScalingType
    return F.scaled_mm(gq, _colmajor(wq), _colmajor(gs), st.BlockWise1x128, ws, st.BlockWise128x128, output_dtype=out_dtype)


def _blockwise_wgrad(gq, gs, gids, xq, xs, xids, r: Fp8Recipe):
    st = F.ScalingType
    return F.scaled_mm(gq.t().contiguous(), _colmajor(xq), gs.t(), st.BlockWise1x128, xs.t(), st.BlockWise1x128,
                       output_dtype=torch.float32)


_EMULATE = {"fwd": _emulate_fwd, "dgrad": _emulate_dgrad, "wgrad": _emulate_wgrad}
_SCALED_MM = {"fwd": _scaled_mm_fwd, "dgrad": _scaled_mm_dgrad, "wgrad": _scaled_mm_wgrad}
_BLOCKWISE = {"fwd": _blockwise_fwd, "dgrad": _blockwise_dgrad, "wgrad": _blockwise_wgrad}
_PROBED: dict[tuple[str, int, str], bool] = {}


def _blockwise_ok(kind: str, device: torch.device) -> bool:
    """Does the native block-scaled kernel for `kind` run here and match the emulation? (cached)"""
    if device.type != "cuda" or not hasattr(F, "ScalingType"):
        return False
    key = (device.type, device.index or 0, kind)
    if key not in _PROBED:
        ok = False
        try:
            if torch.cuda.get_device_capability(device)[0] >= 9:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(256, 384, device=device, generator=g)
                b = torch.randn(512, 384, device=device, generator=g) * 0.02
                r = Fp8Recipe(backend="emulate")
                args = _gemm_operands(kind, a, b, r)
                want = _EMULATE[kind](*args, r, torch.float32) if kind != "wgrad" else _EMULATE[kind](*args, r)
                got = _BLOCKWISE[kind](*args, r, torch.float32) if kind != "wgrad" else _BLOCKWISE[kind](*args, r)
                ok = bool(torch.allclose(got.float(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max())))
        except Exception as e:  # pragma: no cover - CUDA only
            log.info("fp8: native block-scaled _scaled_mm unavailable for %s (%s); using the emulation", kind, e)
        _PROBED[key] = ok
        log.info("fp8 %s GEMM on %s: %s", kind, device, "torch._scaled_mm block-scaled" if ok else "emulation")
    return _PROBED[key]


def _gemm_operands(kind: str, a: torch.Tensor, b: torch.Tensor, r: Fp8Recipe):
    """Quantised operands of the probe problem for one GEMM kind (a: [M,K] activations, b: [N,K] weight)."""
    if kind == "fwd":
        return (*quantize_tiles(a, r.tile), *quantize_blocks(b, r.block))
    if kind == "dgrad":  # a plays dY [M, N=384]; b^T plays the weight [384, 512]
        return (*quantize_tiles(a, r.tile), *quantize_blocks(b.t().contiguous(), r.block))
    return (*quantize_row_tiles(a, r.tile), *quantize_row_tiles(b[:256], r.tile))  # wgrad: dY [256,384], X [256,384]


def resolve_backend(recipe: Fp8Recipe, kind: str, device: torch.device, shape_ok: bool = True) -> str:
    """The backend that runs GEMM `kind` on `device` (see the module docstring)."""
    if recipe.backend == "emulate":
        return "emulate"
    if recipe.backend == "scaled_mm":
        if recipe.tile != recipe.block:
            raise ValueError("fp8 backend scaled_mm needs tile == block")
        return "scaled_mm"
    if shape_ok and recipe.tile == recipe.block == 128 and _blockwise_ok(kind, device):
        return "blockwise"
    return "emulate"


def _blockwise_shape_ok(*dims: int) -> bool:
    return all(d % 128 == 0 for d in dims)


def _gemm(backend: str, kind: str, *args):
    table = {"emulate": _EMULATE, "scaled_mm": _SCALED_MM, "blockwise": _BLOCKWISE}[backend]
    if backend != "blockwise":
        return table[kind](*args)
    try:
        return table[kind](*args)
    except RuntimeError as e:  # pragma: no cover - CUDA only: a shape the native kernel refuses
        log.warning("fp8 %s: block-scaled _scaled_mm failed (%s); emulating this call", kind, e)
        return _EMULATE[kind](*args)


def describe_backend(recipe: Fp8Recipe, device: torch.device) -> str:
    """Which path the Linear GEMMs take on `device` (for logs and the benchmark)."""
    kinds = {k: resolve_backend(recipe, k, device) for k in ("fwd", "dgrad", "wgrad")}
    linear = ", ".join(f"{k}={v}" for k, v in kinds.items())
    return f"linear: {linear}; grouped experts: emulate"


# ---------------------------------------------------------------- Linear


class _Fp8LinearFn(torch.autograd.Function):
    """y = x w^T with FP8 operands in all three GEMMs; saves FP8 x and FP8 w for backward
    (w from `weights`, the step's shared copy, when given)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, out_dtype: torch.dtype,  # type: ignore[override]
                weights: Optional[QuantisedWeights]):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m, n = x2.shape[0], weight.shape[0]
        xq, xs = quantize_tiles(x2, recipe.tile)
        wq, ws = weights.get(weight, recipe.block) if weights is not None else quantize_blocks(weight, recipe.block)
        backend = resolve_backend(recipe, "fwd", x.device, _blockwise_shape_ok(k, n) and m % 4 == 0)
        y = _gemm(backend, "fwd", xq, xs, wq, ws, recipe, out_dtype)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.recipe, ctx.x_dtype, ctx.x_shape = recipe, x.dtype, x.shape
        return y.view(*lead, n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xq, xs, wq, ws = ctx.saved_tensors
        r: Fp8Recipe = ctx.recipe
        n, k = wq.shape
        g = grad.reshape(-1, n)
        m = g.shape[0]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, gs = quantize_tiles(g, r.tile)
            backend = resolve_backend(r, "dgrad", g.device, _blockwise_shape_ok(k, n) and m % 4 == 0)
            dx = _gemm(backend, "dgrad", gq, gs, wq, ws, r, ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x = dequantize_tiles(xq, xs, r.tile)  # the cached FP8 activations, re-tiled along tokens
            aq, as_, aids = quantize_row_tiles(g, r.tile)
            bq, bs, bids = quantize_row_tiles(x, r.tile)
            backend = resolve_backend(r, "wgrad", g.device, _blockwise_shape_ok(m, n, k))
            dw = _gemm(backend, "wgrad", aq, as_, aids, bq, bs, bids, r)
        return dx, dw, None, None, None


def _autocast_out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               recipe: Fp8Recipe = Fp8Recipe(), weights: Optional[QuantisedWeights] = None) -> torch.Tensor:
    """F.linear with the three GEMMs in FP8. Output dtype: the autocast dtype inside autocast, else x's.
    `weights`: where the quantised weight is kept for the step (None: quantised on every call)."""
    out_dtype = _autocast_out_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = _Fp8LinearFn.apply(x, weight, recipe, out_dtype, weights)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


class Fp8Linear(nn.Linear):
    """nn.Linear whose forward, input-grad and weight-grad GEMMs run in FP8 (weights stay fp32 masters).

    Same parameters and state-dict keys as nn.Linear; `from_linear` reuses the module's Parameters.
    Under tensor parallelism (DTensor weight) the GEMMs run on the local shard -- scales are computed
    per shard -- and the output is re-wrapped with the placement the plan implies:
    weight Shard(0) (colwise) -> output Shard(-1), and dx is a partial sum over ranks (the input's
    gradient placement says so, DTensor reduces it); weight Shard(1) (rowwise) -> output Partial.
    The quantised weight (of the local shard under TP) is made once per weight version and shared by
    every micro-batch (`quantised_weights`, see QuantisedWeights).
    """

    recipe: Fp8Recipe = Fp8Recipe()

    def __init__(self, *args: Any, recipe: Fp8Recipe = Fp8Recipe(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.quantised_weights = QuantisedWeights(1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe) -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe = recipe
        new.quantised_weights = QuantisedWeights(1)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(self.weight):
            return self._forward_dtensor(x)
        return fp8_linear(x, self.weight, self.bias, self.recipe, self.quantised_weights)

    def _forward_dtensor(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        w = self.weight
        (placement,) = w.placements
        bias = self.bias
        colwise = isinstance(placement, Shard) and placement.dim == 0
        if _is_dtensor(x):
            # colwise: every rank's dx covers only its output features -> a partial sum over ranks
            replicated = all(isinstance(p, Replicate) for p in x.placements)
            x_local = x.to_local(grad_placements=[Partial()] if colwise and replicated else None)
        else:
            x_local = x
        if colwise:
            out_placement = Shard(x_local.dim() - 1)
            b_local = bias.to_local() if bias is not None else None
        elif isinstance(placement, Shard) and placement.dim == 1:
            out_placement = Partial()
            b_local = None  # added once, after the reduction
        else:
            out_placement = Replicate()
            b_local = bias.to_local() if bias is not None else None
        y = fp8_linear(x_local, w.to_local(), b_local, self.recipe, self.quantised_weights)
        y = DTensor.from_local(y, w.device_mesh, [out_placement], run_check=False)
        if bias is not None and b_local is None:
            y = y.redistribute(placements=[Replicate()]) + bias  # reduce first: bias once, not per rank
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.recipe.backend}"


# ---------------------------------------------------------------- grouped experts


def _grouped_mm_fp32(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 grouped GEMM: a [N,K] @ b[e] ([E,K,O]) per group, or a^T-style [K,N]x[N,O] -> [E,K,O] when
    both are 2-D (offsets along the contraction). torch._grouped_mm where it applies (CPU), else a loop."""
    if grouped_mm_applies(a):  # device and dtype first: no copies where the loop runs anyway (CUDA)
        ga, gb = a.contiguous(), (b.contiguous() if b.dim() == 2 else b)
        # The row stride of each operand as the kernel gets it (no autograd: the backward GEMMs are explicit).
        if grouped_mm_applies(ga, *(max(t.stride(-2), t.stride(-1)) for t in (ga, gb))):
            return torch._grouped_mm(ga, gb, offs=offsets)
    sizes = counts.tolist()
    if b.dim() == 3:
        return looped_linear(a, b.transpose(-2, -1), sizes)
    return torch.stack([ac @ bc for ac, bc in zip(a.split(sizes, dim=1), b.split(sizes, dim=0))])


class _Fp8GroupedFn(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ weight[e]^T for every expert e, FP8 in all three GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, counts, offsets, recipe: Fp8Recipe, out_dtype,  # type: ignore[override]
                weights: Optional[QuantisedWeights], quantised: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        y, xq, xs, wq, ws = _grouped_forward(x, weight, counts, offsets, recipe, out_dtype, weights, quantised)
        ctx.save_for_backward(xq, xs, wq, ws, counts, offsets)
        ctx.recipe, ctx.x_dtype = recipe, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xq, xs, wq, ws, counts, offsets = ctx.saved_tensors
        dx, dw = _grouped_backward(grad, xq, xs, wq, ws, counts, offsets, ctx.recipe, ctx.x_dtype,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None, None


def _grouped_forward(x, weight, counts, offsets, recipe: Fp8Recipe, out_dtype: torch.dtype,
                     weights: Optional[QuantisedWeights],
                     quantised: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
    """(y, xq, xs, wq, ws): the grouped GEMM on 1x128 FP8 x tiles and 128x128 FP8 blocks of every expert's
    weight [E, O, H] (the step's shared copy when `weights` is given). `quantised`: x's tiles (xq, xs),
    made before dispatch (QuantisedRows); x is then only its gradient stand-in."""
    xq, xs = quantize_tiles(x, recipe.tile) if quantised is None else quantised
    wq, ws = weights.get(weight, recipe.block) if weights is not None else quantize_blocks(weight, recipe.block)
    xd = dequantize_tiles(xq, xs, recipe.tile)
    wd = dequantize_blocks(wq, ws, recipe.block)
    y = _grouped_mm_fp32(xd, wd.transpose(-2, -1), offsets, counts).to(out_dtype)
    return y, xq, xs, wq, ws


def _grouped_backward(grad, xq, xs, wq, ws, counts, offsets, r: Fp8Recipe, x_dtype: torch.dtype,
                      need_dx: bool, need_dw: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dgrad (1x128 dY tiles times the 128x128 weight blocks) and wgrad (128x1 tiles of dY and of the
    cached FP8 input, never crossing an expert) of the grouped GEMM."""
    grad = grad.contiguous()
    dx = dw = None
    if need_dx:
        g = dequantize_tiles(*quantize_tiles(grad, r.tile), r.tile)
        dx = _grouped_mm_fp32(g, dequantize_blocks(wq, ws, r.block), offsets, counts).to(x_dtype)
    if need_dw:
        x = dequantize_tiles(xq, xs, r.tile)
        g = dequantize_row_tiles(*quantize_row_tiles(grad, r.tile, counts))  # tiles stay inside an expert
        xr = dequantize_row_tiles(*quantize_row_tiles(x, r.tile, counts))
        dw = _grouped_mm_fp32(g.t(), xr, offsets, counts)
    return dx, dw


class _Fp8SwiGLUGroupedFn(torch.autograd.Function):
    """The down projection of the SwiGLU: out = swiglu(gate_up, gates) @ weight[e]^T per expert, FP8 as in
    _Fp8GroupedFn, keeping for backward only gate_up in FP8 (1 x 128 tiles) and the row gates -- neither
    gate_up at its own dtype nor the FP8 SwiGLU output: backward recomputes swiglu (and its gating) from the
    FP8 copy (and quantises it again for the weight gradient), as DeepSeek-V3 caches the SwiGLU input in FP8
    (report §3.3.3). The forward output is that of the unfused path exactly; gradients carry gate_up's FP8
    rounding. The gate gradient is <d act, swiglu(gate_up)> (models/experts.py's gates_backward)."""

    @staticmethod
    def forward(ctx, gate_up, weight, counts, offsets, recipe: Fp8Recipe, out_dtype,  # type: ignore[override]
                weights: Optional[QuantisedWeights], gates: Optional[torch.Tensor]):
        gq, gs = quantize_tiles(gate_up, recipe.tile)  # the only activation kept (besides the gates)
        ctx.recipe, ctx.gate_up_dtype = recipe, gate_up.dtype
        act = swiglu_forward(gate_up)
        act = act if gates is None else apply_gates(act, gates)
        y, _, _, wq, ws = _grouped_forward(act, weight, counts, offsets, recipe, out_dtype, weights)
        ctx.save_for_backward(gq, gs, wq, ws, counts, offsets, gates)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gq, gs, wq, ws, counts, offsets, gates = ctx.saved_tensors
        r: Fp8Recipe = ctx.recipe
        gate_up = dequantize_tiles(gq, gs, r.tile).to(ctx.gate_up_dtype)
        ungated = swiglu_forward(gate_up)
        act = ungated if gates is None else apply_gates(ungated, gates)
        aq, as_ = quantize_tiles(act, r.tile)
        need_gates = gates is not None and ctx.needs_input_grad[7]
        d_act, dw = _grouped_backward(grad, aq, as_, wq, ws, counts, offsets, r, act.dtype,
                                      ctx.needs_input_grad[0] or need_gates, ctx.needs_input_grad[1])
        d_gate_up = d_gates = None
        if d_act is not None:
            if gates is not None:
                d_act, d_gates = gates_backward(d_act, ungated, gates, need_gates)
            d_gate_up = swiglu_backward(d_act, gate_up)
        return d_gate_up, dw, None, None, None, None, None, d_gates


# ---------------------------------------------------------------- rows quantised before dispatch


def gradient_stand_in(n_rows: int, like: torch.Tensor) -> torch.Tensor:
    """A [n_rows, H] tensor of `like`'s dtype and device with zero strides (one element of storage, never
    read): what autograd sees in place of rows that travel as FP8, so that their gradient (in the compute
    dtype) flows back to where they came from."""
    return like.new_zeros(()).expand(n_rows, like.shape[1])


class _StandIn(torch.autograd.Function):
    """x -> its gradient stand-in; backward: the stand-in's gradient is x's (the quantisation is
    straight-through, as in the FP8 GEMMs, which return dX for their unquantised input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return gradient_stand_in(x.shape[0], x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _SelectStandIn(torch.autograd.Function):
    """The stand-in of rows[index]; backward: the gradient scattered back (index_select's backward)."""

    @staticmethod
    def forward(ctx, stand_in: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.n_rows = stand_in.shape[0]
        return gradient_stand_in(index.numel(), stand_in)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.n_rows, grad.shape[1]).index_add_(0, index, grad), None


class QuantisedRows:
    """Token rows quantised once to E4M3 with 1 x tile scales before they are dispatched (report §3.3:
    the activations before the MoE up-projection are quantised, then dispatched), in the form the FP8
    grouped GEMM takes as its input without quantising it again. Per-row tiles commute with selecting
    and permuting rows, so the GEMM gets exactly the operands its own quantisation would have made.
    `grad` stands in for the rows in autograd (`gradient_stand_in`): their gradient returns in the
    compute dtype (the report keeps the backward dispatch in BF16).

    A pytree node (so a recompute region holds its tensors as its inputs), deliberately not a dataclass:
    FSDP2's cast_forward_inputs casts the floating tensors of dataclass fields (E4M3 and scales to bf16)."""

    __slots__ = ("data", "scales", "grad", "tile")

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, grad: torch.Tensor, tile: int) -> None:
        self.data = data  # [N, H] e4m3
        self.scales = scales  # [N, ceil(H / tile)] fp32
        self.grad = grad  # [N, H] compute dtype, zero strides
        self.tile = tile

    @property
    def shape(self) -> torch.Size:
        return self.grad.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.grad.dtype

    @property
    def device(self) -> torch.device:
        return self.grad.device

    def index_select(self, dim: int, index: torch.Tensor) -> "QuantisedRows":
        """The rows `index` (dim 0), like Tensor.index_select."""
        if dim != 0:
            raise ValueError("QuantisedRows selects rows (dim 0) only")
        return QuantisedRows(self.data.index_select(0, index), self.scales.index_select(0, index),
                             _SelectStandIn.apply(self.grad, index), self.tile)


torch.utils._pytree.register_pytree_node(
    QuantisedRows, lambda r: ((r.data, r.scales, r.grad), r.tile), lambda children, tile: QuantisedRows(*children, tile),
    serialized_type_name="moeforge.QuantisedRows")


def quantise_rows(x: torch.Tensor, tile: int = TILE) -> QuantisedRows:
    """x [N, H] in 1 x tile FP8 tiles (quantize_tiles), with its gradient stand-in."""
    with torch.no_grad():
        q, s = quantize_tiles(x.detach(), tile)
    return QuantisedRows(q, s, _StandIn.apply(x), tile)


class Fp8GroupedGemm:
    """The GroupedExperts GEMM hook: (x [N,H] expert-sorted, weight [E,O,H], counts, offsets) -> [N,O].
    Its two weights (gate_up, down) are quantised once per weight version (`quantised_weights`).
    `swiglu_recomputed` (set by train.recompute's moe_act): GroupedExperts runs the SwiGLU and the down
    projection as `down_of_swiglu`, which caches the SwiGLU input in FP8 and recomputes its output."""

    # FP8 dispatch (`dispatch_rows`): the experts' input is quantised once, before the dispatcher moves it.
    # Bitwise the same training as quantising in the GEMM (tests/test_fp8_dispatch.py), so no config key;
    # False (tests, the benchmark's comparison) dispatches the rows in the compute dtype.
    quantised_dispatch: bool = True

    def __init__(self, recipe: Fp8Recipe) -> None:
        self.recipe = recipe
        self.quantised_weights = QuantisedWeights(2)
        self.swiglu_recomputed = False

    def __call__(self, x: "torch.Tensor | QuantisedRows", weight: torch.Tensor, counts: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
        if isinstance(x, QuantisedRows):  # quantised before dispatch: used as it is
            if x.tile != self.recipe.tile:
                raise ValueError(f"rows quantised in 1x{x.tile} tiles, the expert GEMM's recipe has 1x{self.recipe.tile}")
            return self._apply(_Fp8GroupedFn, x.grad, weight, counts, offsets, (x.data, x.scales))
        return self._apply(_Fp8GroupedFn, x, weight, counts, offsets)

    def dispatch_rows(self, x: torch.Tensor) -> "torch.Tensor | QuantisedRows":
        """What the token dispatcher moves to these experts for token rows x: x in FP8 (QuantisedRows)."""
        return quantise_rows(x, self.recipe.tile) if self.quantised_dispatch else x

    def down_of_swiglu(self, gate_up: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                       offsets: torch.Tensor, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """self(swiglu(gate_up, gates), weight, ...) keeping only gate_up in FP8 (and the gates) for backward
        (_Fp8SwiGLUGroupedFn)."""
        return self._apply(_Fp8SwiGLUGroupedFn, gate_up, weight, counts, offsets, gates)

    def _apply(self, fn: type, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
               offsets: torch.Tensor, *extra: Any) -> torch.Tensor:
        out_dtype = _autocast_out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return fn.apply(x, weight, counts, offsets, self.recipe, out_dtype, self.quantised_weights, *extra)

    def __repr__(self) -> str:
        return f"Fp8GroupedGemm({self.recipe})"


def quantised_weight_stores(model: nn.Module) -> list[QuantisedWeights]:
    """Every QuantisedWeights of a model's FP8 Linears and FP8 expert GEMMs."""
    stores = []
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            stores.append(m.quantised_weights)
        elif isinstance(getattr(m, "gemm", None), Fp8GroupedGemm):
            stores.append(m.gemm.quantised_weights)
    return stores


def release_quantised_weights(model: nn.Module) -> None:
    """Drop the step's quantised weights (after backward, before the optimizer changes the weights)."""
    for store in quantised_weight_stores(model):
        store.clear()


def e4m3_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |x - dequant(quant(x))| E4M3 round-to-nearest allows: 2^-4 |x| for normals,
    2^-10 * scale in the subnormal range (spacing 2^-9 below 2^-6), per element (scale broadcast)."""
    return torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)


__all__ = [
    "E4M3", "E4M3_MAX", "TILE", "Fp8Recipe", "Fp8Linear", "Fp8GroupedGemm", "fp8_linear",
    "quantize_tiles", "dequantize_tiles", "quantize_blocks", "dequantize_blocks", "quantize_row_tiles",
    "dequantize_row_tiles", "fake_quantize", "resolve_backend", "describe_backend", "e4m3_error_bound",
    "QuantisedWeights", "quantised_weight_stores", "release_quantised_weights", "QuantisedRows", "quantise_rows",
    "gradient_stand_in",
]
