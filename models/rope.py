"""Rotary position embedding in DeepSeek's interleaved layout, with YaRN scaling.

DeepSeek rotates adjacent pairs (x[2i], x[2i+1]) as one complex number by
angle pos * freq_i (RoFormer eq. 34). YaRN (Peng et al. 2023, §3.2 "NTK-by-parts")
blends interpolated and extrapolated frequencies with a linear ramp between the
correction dimensions given by beta_fast / beta_slow.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from models.config import RopeScalingConfig, yarn_get_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Dimension index whose wavelength makes `num_rotations` turns over `max_pos` (YaRN eq. 15)."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_frequencies(
    dim: int, base: float, scaling: Optional[RopeScalingConfig], truncate: bool = True
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin amplitude factor.

    `truncate` rounds YaRN's correction range outwards to whole dimensions (DeepSeek, HF's
    default); gpt-oss uses the fractional range (HF rope_parameters "truncate": false).
    """
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if scaling is None or scaling.factor <= 1.0:
        return freqs.float(), 1.0
    if scaling.type != "yarn":
        raise ValueError(f"model.rope_scaling.type={scaling.type!r} is not supported (only 'yarn')")
    low = _correction_dim(scaling.beta_fast, dim, base, scaling.original_max_position_embeddings)
    high = _correction_dim(scaling.beta_slow, dim, base, scaling.original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 keeps the original (high-frequency) dims
    freqs = freqs / scaling.factor * (1 - extrapolate) + freqs * extrapolate
    # Attention factor on cos/sin, as Hugging Face's YaRN: the ratio when both mscales are set
    # (DeepSeek: 1 when they are equal, the temperature then lives in softmax_scale), else
    # YaRN's default 0.1 ln(factor) + 1.
    if scaling.mscale and scaling.mscale_all_dim:
        amplitude = yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    else:
        amplitude = yarn_get_mscale(scaling.factor)
    return freqs.float(), amplitude


class RotaryEmbedding(torch.nn.Module):
    """Holds cos/sin tables for positions [0, max_positions)."""

    def __init__(
        self, dim: int, max_positions: int, base: float, scaling: Optional[RopeScalingConfig], truncate: bool = True
    ) -> None:
        super().__init__()
        self.dim, self.max_positions, self.base, self.scaling = dim, max_positions, base, scaling
        self.truncate = truncate
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        freqs, amplitude = rope_frequencies(self.dim, self.base, self.scaling, self.truncate)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), freqs)
        device = self.cos.device if self.cos.device.type != "meta" else None
        self.cos = (angles.cos() * amplitude).to(device)
        self.sin = (angles.sin() * amplitude).to(device)

    def forward(self, seq_len: int, position_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [S, dim/2] (or [B, S, dim/2] with explicit positions)."""
        if position_ids is None:
            if seq_len > self.max_positions:
                raise ValueError(f"sequence length {seq_len} exceeds model.max_position_embeddings={self.max_positions}")
            return self.cos[:seq_len], self.sin[:seq_len]
        return self.cos[position_ids], self.sin[position_ids]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by cos/sin [S, D/2] or [B, S, D/2].

    Pair (x_2i, x_2i+1) read as the complex number x_2i + j x_2i+1 is multiplied by
    cos + j sin (RoFormer eq. 13): one complex kernel forward and backward, no stack/cat.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs (real, imag) adjacent and 8-byte aligned
    rotation = torch.complex(cos.float(), sin.float()).unsqueeze(-2)  # broadcast over heads
    out = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] in the half-split (GPT-NeoX / gpt-oss) layout by cos/sin [S, D/2] or [B, S, D/2].

    Dimension i is paired with i + D/2 (not with its neighbour): the same rotation as
    `apply_rope` (RoFormer eq. 13) on a different pairing of the dimensions.
    """
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # broadcast over heads
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)
