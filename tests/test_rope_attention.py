"""RoPE in DeepSeek's interleaved (complex-pair) layout, YaRN frequencies and temperature,
and the MLA attention core (SDPA vs eager vs explicit math)."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention import MultiHeadLatentAttention, attention_core
from models.config import ModelConfig, RopeScalingConfig, yarn_get_mscale
from models.rope import RotaryEmbedding, apply_rope, rope_frequencies


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def plain_freqs(dim: int, base: float) -> torch.Tensor:
    return torch.tensor([1.0 / base ** (2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def complex_rotate(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; positions [S] or [B, S]; rotate pair (x[2i], x[2i+1]) by exp(i pos freq_i)."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    angles = positions.double().unsqueeze(-1) * freqs  # [S, D/2] or [B, S, D/2]
    rot = torch.polar(torch.ones_like(angles), angles).unsqueeze(-2)  # broadcast over heads
    return torch.view_as_real(xc * rot).flatten(-2)


def test_apply_rope_is_complex_rotation():
    torch.manual_seed(0)
    B, S, H, D = 2, 9, 3, 8
    x = torch.randn(B, S, H, D)
    rope = RotaryEmbedding(D, 32, 10000.0, None)
    cos, sin = rope(S)
    got = apply_rope(x, cos, sin)
    want = complex_rotate(x, torch.arange(S), plain_freqs(D, 10000.0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # norms of every pair are preserved, position 0 is the identity
    torch.testing.assert_close(got[:, 0], x[:, 0])


def test_apply_rope_with_position_ids():
    torch.manual_seed(1)
    B, S, H, D = 2, 5, 2, 6
    x = torch.randn(B, S, H, D)
    pos = torch.tensor([[3, 4, 5, 0, 1], [10, 11, 12, 13, 14]])
    rope = RotaryEmbedding(D, 32, 500.0, None)
    cos, sin = rope(S, pos)
    assert cos.shape == (B, S, D // 2)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), complex_rotate(x, pos, plain_freqs(D, 500.0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [None, RopeScalingConfig(factor=1.0)])
def test_no_scaling_gives_plain_frequencies(scaling):
    freqs, amp = rope_frequencies(64, 10000.0, scaling)
    torch.testing.assert_close(freqs.double(), plain_freqs(64, 10000.0), rtol=1e-6, atol=0)
    assert amp == 1.0


def test_yarn_frequencies():
    dim, base, factor, orig = 64, 10000.0, 40.0, 4096
    sc = RopeScalingConfig(factor=factor, original_max_position_embeddings=orig, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    freqs, amp = rope_frequencies(dim, base, sc)
    plain = plain_freqs(dim, base)
    rotations = orig * plain / (2 * math.pi)  # turns each pair makes over the original context
    high = rotations >= 32  # high-frequency pairs: extrapolated (unchanged)
    low = rotations <= 1  # low-frequency pairs: interpolated (divided by factor)
    assert high.sum() >= 5 and low.sum() >= 5
    torch.testing.assert_close(freqs.double()[high], plain[high], rtol=1e-6, atol=0)
    torch.testing.assert_close(freqs.double()[low], plain[low] / factor, rtol=1e-6, atol=0)
    ratio = freqs.double() / plain
    assert ((ratio >= (1 / factor) * (1 - 1e-6)) & (ratio <= 1 + 1e-6)).all()  # freqs are fp32
    assert (ratio[1:] <= ratio[:-1] + 1e-6).all(), "the ramp must be monotone"
    assert amp == pytest.approx(1.0)  # mscale == mscale_all_dim: the temperature lives in softmax_scale


def test_yarn_amplitude_follows_hf():
    """Hugging Face's YaRN attention factor: mscale ratio when both are set, else 0.1 ln(factor) + 1."""
    _, amp = rope_frequencies(16, 10000.0, RopeScalingConfig(factor=40.0, mscale=1.0, mscale_all_dim=0.707))
    assert amp == pytest.approx((0.1 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1))
    _, amp = rope_frequencies(16, 10000.0, RopeScalingConfig(factor=40.0, mscale=1.0, mscale_all_dim=0.0))
    assert amp == pytest.approx(0.1 * math.log(40) + 1)
    rope = RotaryEmbedding(16, 8, 10000.0, RopeScalingConfig(factor=40.0, mscale=1.0, mscale_all_dim=0.0))
    torch.testing.assert_close(rope.cos[0], torch.full((8,), 0.1 * math.log(40) + 1))


def test_softmax_scale_includes_mscale_squared():
    d = 128 + 64
    cfg = ModelConfig()  # V3: factor 40, mscale_all_dim 1
    m = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(d**-0.5 * m * m)
    cfg = ModelConfig(rope_scaling=RopeScalingConfig(factor=40.0, mscale=0.707, mscale_all_dim=0.707))
    m = 0.1 * 0.707 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(d**-0.5 * m * m)
    assert ModelConfig(rope_scaling=None).softmax_scale == pytest.approx(d**-0.5)
    assert yarn_get_mscale(1.0, 1.0) == 1.0


def small_attn_cfg(**kw) -> ModelConfig:
    base = dict(
        hidden_size=32, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=64, num_hidden_layers=1, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=8,
        rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0),
    )
    base.update(kw)
    return ModelConfig(**base)


def test_attention_core_eager_matches_explicit_math():
    torch.manual_seed(2)
    B, S, H, Dqk, Dv = 1, 5, 2, 4, 3
    q, k, v = torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dqk), torch.randn(B, S, H, Dv)
    out = attention_core(q, k, v, 0.7, "eager")
    want = torch.zeros(B, S, H, Dv)
    for h in range(H):
        for i in range(S):
            logits = torch.tensor([(q[0, i, h] @ k[0, j, h]).item() * 0.7 for j in range(i + 1)])
            p = torch.softmax(logits, 0)
            want[0, i, h] = sum(p[j] * v[0, j, h] for j in range(i + 1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_core(q, k, v, 0.7, "sdpa"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_mla_sdpa_equals_eager(q_lora_rank):
    torch.manual_seed(3)
    cfg_s = small_attn_cfg(attn_implementation="sdpa", q_lora_rank=q_lora_rank)
    cfg_e = small_attn_cfg(attn_implementation="eager", q_lora_rank=q_lora_rank)
    a, b = MultiHeadLatentAttention(cfg_s), MultiHeadLatentAttention(cfg_e)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    b.load_state_dict(a.state_dict())
    assert a.scale == pytest.approx(cfg_s.softmax_scale) and a.scale != (8 + 4) ** -0.5
    rope = RotaryEmbedding(cfg_s.qk_rope_head_dim, 64, cfg_s.rope_theta, cfg_s.rope_scaling)
    x = torch.randn(2, 10, 32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa, rope(10)), b(xb, rope(10))
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    # with an explicit (document) mask too
    doc = torch.tensor([0] * 4 + [1] * 6)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    mask = mask.expand(2, 1, 10, 10)
    with torch.no_grad():
        ma, mb = a(x, rope(10), mask), b(x, rope(10), mask)
    torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-5)
    # the second document does not see the first: same output as running it alone
    with torch.no_grad():
        alone = a(x[:, 4:], (rope(10)[0][4:], rope(10)[1][4:]))
    torch.testing.assert_close(ma[:, 4:], alone, rtol=1e-5, atol=1e-5)
