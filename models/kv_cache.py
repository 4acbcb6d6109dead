"""MLA's latent KV cache (DeepSeek-V2 §2.1, "Low-Rank Key-Value Joint Compression").

Per token and layer the cache stores what inference needs and nothing more: the normalised
compressed latent c_KV (kv_lora_rank values, eq. 9) and the rotated key k^R shared by all heads
(qk_rope_head_dim values, eq. 14): (d_c + d_h^R) values instead of 2 n_h d_h for multi-head
attention. Keys and values are never materialised at decode: W_UK is folded into the query and
W_UV into the output (models.attention.MultiHeadLatentAttention, "absorbed" path).

Rows are slot-aligned with left padding: row b's prompt occupies slots [pad[b], P), every row
appends at the same slot, and a token's RoPE position is its slot minus pad[b]. No torch.distributed.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig


def padded_positions(pad: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """RoPE positions [B, n] of slots start..start+n-1 (slot - pad; pad slots get 0)."""
    slots = torch.arange(start, start + n, device=pad.device)
    return (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)


def padded_mask(pad: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Boolean [B, 1, n, start + n], True = attend: causal over slots, padding slots hidden.

    A padding query attends to itself only, so its row has one finite score (no NaN reaches
    the values that real tokens mask out).
    """
    query = torch.arange(start, start + n, device=pad.device).view(1, n, 1)
    key = torch.arange(start + n, device=pad.device).view(1, 1, -1)
    visible = (key <= query) & (key >= pad.view(-1, 1, 1))
    return (visible | (key == query)).unsqueeze(1)


class LatentKVCache:
    """c_KV and k^R of every cached token for `n_layers` MLA layers: [n_layers, B, capacity, d_c + d_h^R]."""

    def __init__(self, cfg: ModelConfig, n_layers: int, pad: torch.Tensor, capacity: int,
                 dtype: torch.dtype = torch.float32) -> None:
        if capacity > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {capacity} tokens exceeds model.max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.pad = pad
        self.values = torch.zeros(n_layers, pad.shape[0], capacity, self.kv_lora_rank + self.rope_dim,
                                  dtype=dtype, device=pad.device)
        self.length = 0  # slots filled (the same for every row and layer)

    @property
    def capacity(self) -> int:
        return self.values.shape[2]

    def values_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x layers."""
        return self.values.shape[0] * self.values.shape[3]

    def positions(self, n: int) -> torch.Tensor:
        return padded_positions(self.pad, self.length, n)

    def attention_mask(self, n: int) -> torch.Tensor:
        return padded_mask(self.pad, self.length, n)

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def advance(self, n: int) -> None:
        """Every layer has written the n new tokens."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget slots >= length (rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


class LayerCache:
    """One layer's view of the cache while the new tokens pass through it."""

    def __init__(self, cache: LatentKVCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def start(self) -> int:
        """Tokens cached before this forward pass (0: prefill)."""
        return self.cache.length

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' c_KV [B, n, d_c] and k^R [B, n, d_h^R]; return all cached ones (with these)."""
        start, n = self.start, latent.shape[1]
        if start + n > self.cache.capacity:
            raise ValueError(f"the KV cache holds {self.cache.capacity} tokens; {start + n} requested")
        buf = self.cache.values[self.index]
        buf[:, start:start + n] = torch.cat([latent, k_rope], dim=-1).to(buf.dtype)
        return buf[:, :start + n].split([self.cache.kv_lora_rank, self.cache.rope_dim], dim=-1)
