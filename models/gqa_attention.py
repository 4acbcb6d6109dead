"""Grouped-query attention with learned attention sinks and an optional sliding window (gpt-oss).

Every query head h has a learned sink logit s_h appended to each row of its softmax and
then dropped, so a row may give weight to "nothing" (StreamingLLM's attention sink, learned):
  p'_ij = exp(z_ij) / (sum_k exp(z_ik) + exp(s_h)),   o'_i = sum_j p'_ij v_j
With o_i and lse_i = log sum_k exp(z_ik) the output and log-sum-exp of plain attention,
  o'_i = o_i * sigmoid(lse_i - s_h)                                            (1)
so any kernel that returns lse gives the exact sink output. Its gradient (derived from (1)):
a standard attention backward called with grad_out g * w and out o' (w = sigmoid(lse - s)),
and d s_h = -sum_i (1 - w_i) <g_i, o'_i>.

Kernels, chosen at run time by `sink_attention(impl="auto")`:
  CPU:  torch's fused flash-attention CPU kernel (aten, returns lse) with the backward above;
        sliding-window layers run in query blocks over their key band, so memory stays
        O(S * (block + window)) instead of O(S^2) for the mask.
  CUDA: FlexAttention (torch.compile'd Triton kernel; block-sparse causal / sliding-window
        mask, native GQA, differentiable lse) with (1) applied by autograd; with an explicit
        (document) mask, the eager math.
  "eager": the reference math (the sink as an extra key column); used by the tests.
Layout and names follow Hugging Face's GptOssAttention (q/k/v/o_proj with biases, `sinks`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from models.rope import apply_rope_half_split

SINK_ATTENTION_IMPLEMENTATIONS = ("auto", "cpu_flash", "flex", "eager")
WINDOW_QUERY_BLOCK = 512  # queries per block on the CPU sliding-window path


def band_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True = attend: causal, and within `window` tokens when set.

    Query i attends key j iff j <= i and j > i - window (HF's sliding_window: the window counts
    the token itself).
    """
    qi = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    kj = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    return allowed


def eager_sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float, window: Optional[int],
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: softmax over [scores, sink], sink column dropped. q/k/v [B, H, S, D] (k, v repeated).

    Computed in fp32 (fp64 for fp64 inputs); O(S^2) memory.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    allowed = band_mask(0, q.shape[-2], 0, k.shape[-2], window, q.device)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return (probs @ v.to(compute)).to(q.dtype)


def _query_blocks(seq: int, window: Optional[int], mask: Optional[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(q_start, q_end, k_start) blocks: one block for full attention, key bands for a window."""
    if window is None or mask is not None or seq <= WINDOW_QUERY_BLOCK:
        return [(0, seq, 0)]
    return [(q0, min(q0 + WINDOW_QUERY_BLOCK, seq), max(0, q0 - window + 1)) for q0 in range(0, seq, WINDOW_QUERY_BLOCK)]


def _additive_mask(
    q0: int, q1: int, k0: int, window: Optional[int], mask: Optional[torch.Tensor], like: torch.Tensor
) -> Optional[torch.Tensor]:
    """Float mask (0 / -inf, the kernel wants the query dtype) for one block; None = plain causal."""
    if window is None and mask is None:
        return None
    allowed = band_mask(q0, q1 - q0, k0, q1 - k0, window, like.device)
    if mask is not None:
        allowed = allowed & mask[..., q0:q1, k0:q1]
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(~allowed, float("-inf"))


class _CpuFlashSinkAttention(torch.autograd.Function):
    """Eq. (1) on aten's CPU flash-attention kernel, forward and backward, in query blocks."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale: float, window: Optional[int], mask: Optional[torch.Tensor]):  # type: ignore[override]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.promote_types(q.dtype, torch.float32))  # the kernel's lse dtype
        for q0, q1, k0 in _query_blocks(q.shape[-2], window, mask):
            bias = _additive_mask(q0, q1, k0, window, mask, q)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], 0.0, bias is None, attn_mask=bias, scale=scale
            )
            out[:, :, q0:q1], lse[:, :, q0:q1] = o, l
        keep = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))  # w = 1 - p'_sink
        out = (out.to(lse.dtype) * keep.unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, out, lse, keep, mask if mask is not None else torch.empty(0))
        ctx.scale, ctx.window, ctx.has_mask = scale, window, mask is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, sinks, out, lse, keep, mask = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        grad = grad.contiguous()
        row_dot = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # <g_i, o'_i>
        grad_sinks = -((1 - keep) * row_dot).sum(dim=(0, 2)).to(sinks.dtype)
        grad_in = (grad.to(lse.dtype) * keep.unsqueeze(-1)).to(q.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for q0, q1, k0 in _query_blocks(q.shape[-2], ctx.window, mask):
            bias = _additive_mask(q0, q1, k0, ctx.window, mask, q)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_in[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], out[:, :, q0:q1],
                lse[:, :, q0:q1], 0.0, bias is None, attn_mask=bias, scale=ctx.scale,
            )
            dq[:, :, q0:q1] = gq
            dk[:, :, k0:q1] += gk
            dv[:, :, k0:q1] += gv
        return dq, dk, dv, grad_sinks, None, None, None


_compiled_flex: Optional[Callable[..., object]] = None
_block_masks: dict[tuple[int, Optional[int], str], object] = {}  # (seq, window, device) -> BlockMask


def _flex_block_mask(seq: int, window: Optional[int], device: torch.device):
    """FlexAttention's block-sparse causal (or sliding-window) mask, built once per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (seq, window, str(device))
    if key not in _block_masks:

        def allowed(b, h, qi, kj):
            ok = kj <= qi
            return ok & (kj > qi - window) if window is not None else ok

        _block_masks[key] = create_block_mask(allowed, None, None, seq, seq, device=device)
    return _block_masks[key]


def flex_sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float, window: Optional[int],
    mask: Optional[torch.Tensor] = None, compiled: bool = True,
) -> torch.Tensor:
    """Eq. (1) on FlexAttention: q [B, H, S, D], k/v [B, H_kv, S, D] (GQA handled by the kernel)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    global _compiled_flex
    if mask is not None:
        raise ValueError("sink attention: the flex path takes no explicit mask; use impl='cpu_flash' or 'eager'")
    block_mask = _flex_block_mask(q.shape[-2], window, q.device)
    if compiled and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    kernel = _compiled_flex if compiled else flex_attention
    out, aux = kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * keep.unsqueeze(-1)).to(q.dtype)


def check_sink_attention_name(impl: str) -> None:
    if impl not in SINK_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"sink attention implementation {impl!r} is not one of {SINK_ATTENTION_IMPLEMENTATIONS}")


def resolve_sink_attention(impl: str, q: torch.Tensor, has_mask: bool = False) -> str:
    """The kernel `impl` stands for on q's device: auto = flex on CUDA (eager there with an
    explicit mask, which flex's static block mask does not take), cpu_flash on CPU."""
    check_sink_attention_name(impl)
    if impl == "auto":
        if q.is_cuda:
            return "eager" if has_mask else "flex"
        return "cpu_flash"
    if impl == "cpu_flash" and q.is_cuda:
        raise ValueError("sink attention implementation 'cpu_flash' runs on CPU tensors only")
    return impl


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
    window: Optional[int] = None, impl: str = "auto", mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention with per-head sinks. q [B, S, H, D], k/v [B, S, H_kv, D] -> [B, S, H, D].

    `window` limits each query to the last `window` keys (itself included); `mask`
    ([B, 1, S, S] bool, True = attend) further restricts it (e.g. document boundaries); with
    a mask the CPU kernel takes it whole, as a [B, 1, S, S] float mask (O(S^2) memory).
    sinks: [H] logits, one per query head.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"sink attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    kernel = resolve_sink_attention(impl, q, mask is not None)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel == "flex":
        return flex_sink_attention(q, k, v, sinks, scale, window, mask).transpose(1, 2)
    groups = heads // kv_heads  # query head h reads kv head h // groups (HF repeat_kv)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if kernel == "eager":
        out = eager_sink_attention(q, k, v, sinks, scale, window, mask)
    else:
        out = _CpuFlashSinkAttention.apply(q.contiguous(), k, v, sinks, scale, window, mask)
    return out.transpose(1, 2)


class GroupedQueryAttention(nn.Module):
    """gpt-oss attention: GQA with q/k/v/o biases, per-head sinks, half-split RoPE, optional window.

    HF names (GptOssAttention): q_proj, k_proj, v_proj, o_proj, sinks. Softmax scale 1/sqrt(head_dim).
    """

    def __init__(
        self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int, head_dim: int,
        sliding_window: Optional[int] = None, bias: bool = True, implementation: str = "auto",
    ) -> None:
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} must be a multiple of num_key_value_heads={num_key_value_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates pairs)")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window} must be positive or None")
        check_sink_attention_name(implementation)
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.implementation = implementation
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=bias)
        self.sinks = nn.Parameter(torch.empty(num_attention_heads))

    def reset_parameters(self, std: float) -> None:
        """HF GptOss init: normal(std) weights and sinks, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.sinks, std=std)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor] = None,
        cache: Optional[object] = None,
    ) -> torch.Tensor:
        """x [B, S, hidden]; rope = (cos, sin) [S, head_dim/2]; mask [B, 1, S, S] bool or None.

        `cache` is MLA's latent KV cache slot (models/kv_cache.py); GQA has no cached decode path yet.
        """
        if cache is not None:
            raise NotImplementedError("cached decoding is built for MLA (DeepSeek) only; gpt-oss generation "
                                      "recomputes the prefix (use_cache=False)")
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim)  # -1: heads (fewer per rank under TP)
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim)
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim)
        cos, sin = rope
        q, k = apply_rope_half_split(q, cos, sin), apply_rope_half_split(k, cos, sin)
        out = sink_attention(q, k, v, self.sinks, self.scale, self.sliding_window, self.implementation, mask)
        return self.o_proj(out.reshape(bsz, seq, -1))
