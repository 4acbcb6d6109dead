"""MXFP4 (OCP Microscaling v1.0): 32-value blocks of FP4 E2M1 elements sharing one E8M0 scale.

Storage as in the released gpt-oss checkpoints:
  `*_blocks` uint8 [..., G, 16]: two E2M1 codes per byte, element 2j in the low nibble, 2j+1 in the high
  `*_scales` uint8 [..., G]:     E8M0 exponent with bias 127, block value = element * 2^(scale - 127)
so a [..., G, 16] / [..., G] pair holds a [..., G * 32] tensor (the last dimension blocked).
E2M1 codes: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa -> 0, .5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZE = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX_EXPONENT = 2  # 6 = 1.5 * 2^2
SCALE_BIAS = 127
ROWS_PER_CHUNK = 1 << 16  # blocks (de)quantised at a time: bounds the temporaries to ~20 MiB


def _check_packed(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks must have shape [..., G, {BLOCK_SIZE // 2}], got {tuple(blocks.shape)}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 scales shape {tuple(scales.shape)} does not match blocks {tuple(blocks.shape)}")


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, rows_per_chunk: int = ROWS_PER_CHUNK
) -> torch.Tensor:
    """Packed blocks [..., G, 16] and scales [..., G] -> values [..., G * 32] in `dtype`.

    Works through `rows_per_chunk` blocks at a time, so beyond the output only bounded
    temporaries are allocated (the output is written in place).
    """
    _check_packed(blocks, scales)
    *prefix, groups, half = blocks.shape
    n_blocks = math.prod(prefix) * groups
    flat_blocks, flat_scales = blocks.reshape(n_blocks, half), scales.reshape(n_blocks)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(n_blocks, BLOCK_SIZE, dtype=dtype, device=blocks.device)
    for r0 in range(0, n_blocks, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_blocks)
        packed = flat_blocks[r0:r1].long()
        values = torch.stack([table[packed & 0x0F], table[packed >> 4]], dim=-1).flatten(1)  # low nibble first
        exponent = flat_scales[r0:r1].to(torch.int32).sub_(SCALE_BIAS).unsqueeze(1)
        out[r0:r1] = torch.ldexp(values, exponent)  # exact: a power-of-two scale
    return out.view(*prefix, groups * BLOCK_SIZE)


def _nearest_e2m1_code(magnitude: torch.Tensor) -> torch.Tensor:
    """Code 0..7 of the E2M1 magnitude nearest to |x| (saturating at 6), ties to the even code."""
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=magnitude.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    code = torch.bucketize(magnitude, midpoints)  # a tie lands on the lower code
    tie = magnitude == midpoints[code.clamp(max=midpoints.numel() - 1)]
    return code + (tie & (code % 2 == 1)).long()


def quantize_mxfp4(values: torch.Tensor, rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    Scale per block (OCP MX v1.0 §6.3): 2^(floor(log2(amax)) - 2), so the largest element
    lands in [4, 8) before rounding; elements round to the nearest E2M1 value and saturate at 6.
    """
    if values.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 quantisation needs the last dimension to be a multiple of {BLOCK_SIZE}, got {values.shape[-1]}")
    if not torch.isfinite(values).all():
        raise ValueError("MXFP4 quantisation got non-finite values")
    *prefix, k = values.shape
    n_blocks = math.prod(prefix) * (k // BLOCK_SIZE)
    flat = values.reshape(n_blocks, BLOCK_SIZE)
    blocks = torch.empty(n_blocks, BLOCK_SIZE // 2, dtype=torch.uint8, device=values.device)
    scales = torch.empty(n_blocks, dtype=torch.uint8, device=values.device)
    for r0 in range(0, n_blocks, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_blocks)
        chunk = flat[r0:r1].float()
        amax = chunk.abs().amax(dim=1)
        exponent = torch.where(amax > 0, torch.frexp(amax).exponent - 1, -SCALE_BIAS) - E2M1_MAX_EXPONENT
        exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS)  # E8M0 holds 2^-127 .. 2^127 (255 = NaN)
        scaled = torch.ldexp(chunk, -exponent.unsqueeze(1))
        code = _nearest_e2m1_code(scaled.abs()) | (scaled.signbit().long() << 3)
        pairs = code.view(-1, BLOCK_SIZE // 2, 2)
        blocks[r0:r1] = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
        scales[r0:r1] = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.view(*prefix, k // BLOCK_SIZE, BLOCK_SIZE // 2), scales.view(*prefix, k // BLOCK_SIZE)
