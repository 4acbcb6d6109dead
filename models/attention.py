"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Queries and keys/values go through low-rank latents:
  c_Q = W_DQ h            q^C = W_UQ RMSNorm(c_Q)          q^R = RoPE(W_QR c_Q)     (V3 eqs. 6-8)
  c_KV, k^R = W_DKV h     k^C, v = W_UK/W_UV RMSNorm(c_KV)   k^R = RoPE(k^R) shared by all heads (eqs. 1-5)
  o = softmax(q k^T * scale) v;  u = W_O o                                          (eqs. 10-11)
The module names follow Hugging Face's DeepseekV3Attention so export is a rename.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.kv_cache import LayerCache
from models.norm import RMSNorm
from models.rope import apply_rope

try:  # optional GPU kernel, used only on CUDA
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - not installed on CPU machines
    flash_attn_func = None


def kernel_pads_v(q: torch.Tensor, v: torch.Tensor, impl: str, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether attention_core runs on v padded to Dqk (d_v < d_qk): flash-attn needs equal head dims; CPU's
    causal SDPA with d_v < d_qk drops to its math kernel, padding keeps the fused flash kernel (measured ~20%
    faster fwd+bwd at d_qk 48 / d_v 32)."""
    if v.shape[-1] >= q.shape[-1]:
        return False
    if _uses_flash(q, impl, mask):
        return True
    return impl != "eager" and mask is None and not q.is_cuda


def _uses_flash(q: torch.Tensor, impl: str, mask: Optional[torch.Tensor]) -> bool:
    return impl == "flash" or (impl == "auto" and flash_attn_func is not None and q.is_cuda and mask is None)


def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, impl: str, mask: Optional[torch.Tensor] = None,
    v_head_dim: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention. q, k: [B, S, H, Dqk]; v: [B, S, H, Dv] -> [B, S, H, Dv].

    impl "auto" uses flash-attn on CUDA when installed, otherwise torch SDPA; "eager" is the
    reference math. v is padded to Dqk where the kernel wants it (kernel_pads_v); a caller may pass
    it padded already, with its real width `v_head_dim`.
    `mask` ([B, 1, S, S] boolean, True = attend) replaces the causal mask when given.
    """
    dv = v_head_dim or v.shape[-1]
    if kernel_pads_v(q, v, impl, mask):
        v = pad_v(v, q.shape[-1])
    if _uses_flash(q, impl, mask):
        if flash_attn_func is None:
            raise RuntimeError("model.attn_implementation='flash' but flash-attn is not installed")
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[..., :dv]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if impl == "eager":
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        seq = q.shape[-2]
        if mask is None:
            mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(-1).to(v.dtype)) @ v
    elif mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[..., :dv].transpose(1, 2)


def pad_v(v: torch.Tensor, width: int) -> torch.Tensor:
    """v [..., Dv] zero-padded to [..., width]."""
    return F.pad(v, (0, width - v.shape[-1]))


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.impl = cfg.attn_implementation
        h, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * cfg.v_head_dim, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        """x [B, S, H]. With a `cache`, the new tokens' latents are stored; an empty cache (prefill) runs
        the training path, a filled one (decode) the absorbed path over every cached token."""
        q_in, kv_latent, k_pe = self.latents(x)
        if cache is None:
            out = self.attend(q_in, kv_latent, k_pe, rope, mask)
        elif cache.start == 0:
            cache.append(kv_latent, self.rope_key(k_pe, rope).squeeze(2))
            out = self.attend(q_in, kv_latent, k_pe, rope, mask)
        else:
            out = self.attend_absorbed(q_in, *cache.append(kv_latent, self.rope_key(k_pe, rope).squeeze(2)), rope, mask)
        return self.o_proj(out.flatten(2))  # [B, S, h * d_v]; S is the gathered sequence under SP

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The down-projections: (query input of the up-projection, normed c_KV, raw k^R) (V3 eqs. 1, 3, 6)."""
        q_in = x if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        kv_latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return q_in, self.kv_a_layernorm(kv_latent), k_pe

    def attend(
        self, q_in: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Up-projections and attention core: [B, S, H, Dv] from the latents."""
        return self.core(*self.up_project(q_in, kv_latent, k_pe, rope), mask)

    def queries(self, q_in: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q^C [B, S, h, d_nope] and RoPE(q^R) [B, S, h, d_rope] (V3 eqs. 7-8)."""
        bsz, seq, _ = q_in.shape
        q = self.q_proj(q_in) if self.q_lora_rank is None else self.q_b_proj(q_in)
        q = q.view(bsz, seq, -1, self.qk_head_dim)  # -1: heads (fewer per rank under TP)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, *rope)

    def rope_key(self, k_pe: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE(k^R) [B, S, 1, d_rope]: one rope key shared by every head (V3 eq. 3)."""
        return apply_rope(k_pe.unsqueeze(2), *rope)

    def up_project(
        self, q_in: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q = [q^C; RoPE(q^R)], k = [k^C; RoPE(k^R)], v per head (V3 eqs. 2-5, 7-9)."""
        bsz, seq, _ = kv_latent.shape
        q_nope, q_pe = self.queries(q_in, rope)
        kv = self.kv_b_proj(kv_latent).view(bsz, seq, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        heads = q_nope.shape[2]
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, self.rope_key(k_pe, rope).expand(-1, -1, heads, -1)], dim=-1)
        return q, k, v

    def attend_absorbed(
        self, q_in: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Attention over cached latents (DeepSeek-V2 §2.1.2): q^C k^C = (W_UK^T q^C) c_KV, o = W_UV (p c_KV).

        q_in [B, S, d_q] (the new tokens); latent [B, T, d_c] and k_pe [B, T, d_rope] (rotated), every cached
        token; mask [B, 1, S, T] (True = attend), None = causal with the S new tokens last. -> [B, S, h, d_v].
        """
        q_nope, q_pe = self.queries(q_in, rope)
        seq = q_nope.shape[1]
        w = self.kv_b_proj.weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [h, d_nope, d_c], [h, d_v, d_c]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK folded into the query
        scores = torch.einsum("bshc,btc->bhst", q_latent, latent) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
        scores = scores.float() * self.scale
        if mask is None:
            total = latent.shape[1]
            mask = torch.ones(seq, total, dtype=torch.bool, device=latent.device).tril(total - seq)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(latent.dtype)
        out_latent = torch.einsum("bhst,btc->bshc", probs, latent)
        return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)  # W_UV folded into the output

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T * scale) v (V3 eq. 10)."""
        dv = v.shape[-1]
        if kernel_pads_v(q, v, self.impl, mask):  # a pure function of v: recompute may drop it (mla_up_proj)
            v = self.padded_v(v)
        return attention_core(q, k, v, self.scale, self.impl, mask, v_head_dim=dv)

    def padded_v(self, v: torch.Tensor) -> torch.Tensor:
        """v zero-padded to d_qk, as the attention kernel takes it (kernel_pads_v)."""
        return pad_v(v, self.qk_head_dim)
