"""gpt-oss leaf modules against transformers' GptOss modules (fp32, tiny random shapes):
sink attention with sliding windows and half-split YaRN RoPE, clamped SwiGLU experts with
biases, the top-k softmax router and its aux loss, and MXFP4 (de)quantisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import gqa_attention
from models.config import RopeScalingConfig
from models.gqa_attention import GroupedQueryAttention, band_mask, resolve_sink_attention, sink_attention
from models.rope import RotaryEmbedding, rope_frequencies

hf_gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
from transformers import GptOssConfig  # noqa: E402
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py

WINDOW = 4
YARN = dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=64)


def hf_config(truncate: bool = False, **overrides) -> GptOssConfig:
    shapes = dict(
        hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=12,
        num_local_experts=5, num_experts_per_tok=2, sliding_window=WINDOW, num_hidden_layers=2,
        max_position_embeddings=2048, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, truncate=truncate, **YARN),
    )
    shapes.update(overrides)
    config = GptOssConfig(**shapes)
    config._attn_implementation = "eager"
    return config


def our_rope(config: GptOssConfig, truncate: bool = False) -> RotaryEmbedding:
    scaling = RopeScalingConfig(type="yarn", mscale=0.0, **YARN)
    return RotaryEmbedding(config.head_dim, config.max_position_embeddings, 150000.0, scaling, truncate=truncate)


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_rope_tables_match_hf(truncate):
    config = hf_config(truncate)
    hf_rope = hf_gpt_oss.GptOssRotaryEmbedding(config)
    seq = 40
    cos_ref, sin_ref = hf_rope(torch.zeros(1, dtype=torch.float32), torch.arange(seq).unsqueeze(0))
    cos, sin = our_rope(config, truncate)(seq)
    torch.testing.assert_close(cos, cos_ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref[0], rtol=1e-6, atol=1e-6)


def test_yarn_frequencies_at_published_shapes_match_hf():
    """head_dim 64, theta 150000, original 4096: the fractional ("truncate": false) correction range matters."""
    config = GptOssConfig(num_hidden_layers=1)  # HF's gpt-oss defaults: YaRN 32 / 32 / 1 / 4096, no truncation
    hf_rope = hf_gpt_oss.GptOssRotaryEmbedding(config)
    scaling = RopeScalingConfig(type="yarn", factor=32.0, original_max_position_embeddings=4096, mscale=0.0)
    freqs, amplitude = rope_frequencies(64, config.rope_parameters["rope_theta"], scaling, truncate=False)
    torch.testing.assert_close(freqs, hf_rope.inv_freq, rtol=1e-6, atol=0)
    assert amplitude == pytest.approx(hf_rope.attention_scaling)
    assert not torch.allclose(rope_frequencies(64, 150000.0, scaling, truncate=True)[0], freqs)


def hf_additive_mask(seq: int, window) -> torch.Tensor:
    """HF's own mask rule (masking_utils), as the additive mask its eager attention takes."""
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    idx = torch.arange(seq)
    allowed = rule(0, 0, idx[:, None], idx[None, :])
    return torch.zeros(seq, seq).masked_fill(~allowed, float("-inf"))[None, None]


def paired_attention(layer_type: str, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    config = hf_config(layer_types=[layer_type, layer_type])
    ref = hf_gpt_oss.GptOssAttention(config, layer_idx=0)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    window = WINDOW if layer_type == "sliding_attention" else None
    ours = GroupedQueryAttention(24, 4, 2, 8, sliding_window=window, implementation=impl)
    ours.load_state_dict(ref.state_dict())
    return config, ref, ours, window


@pytest.mark.parametrize("impl", ["cpu_flash", "eager"])
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_attention_matches_hf_forward_and_backward(layer_type, impl, monkeypatch):
    monkeypatch.setattr(gqa_attention, "WINDOW_QUERY_BLOCK", 5)  # several key bands at this length
    config, ref, ours, window = paired_attention(layer_type, impl)
    seq = 13  # > 2 windows, so windowing and sinks both matter
    x = torch.randn(2, seq, 24)
    cos, sin = hf_gpt_oss.GptOssRotaryEmbedding(config)(x, torch.arange(seq).unsqueeze(0))
    want, _ = ref(x, (cos, sin), hf_additive_mask(seq, window))
    got = ours(x, our_rope(config)(seq))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, list(ref.parameters()), grad)
    got_grads = torch.autograd.grad(got, list(ours.parameters()), grad)
    assert_grads_close(got_grads, want_grads, [name for name, _ in ref.named_parameters()])


def assert_grads_close(got, want, names) -> None:
    """fp32 round-off of two summation orders; exactness is gradcheck's job (float64, below)."""
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()), msg=lambda m: f"{name}: {m}")


def random_qkv(seq: int = 11, heads: int = 4, kv_heads: int = 2, dim: int = 8, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq, heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(2, seq, kv_heads, dim, generator=gen, dtype=dtype)
    v = torch.randn(2, seq, kv_heads, dim, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("impl", ["cpu_flash", "eager"])
@pytest.mark.parametrize("window", [None, WINDOW])
def test_minus_inf_sink_is_plain_softmax_attention(impl, window):
    q, k, v = random_qkv()
    sinks = torch.full((4,), float("-inf"))
    got = sink_attention(q, k, v, sinks, 0.35, window, impl)
    allowed = band_mask(0, q.shape[1], 0, q.shape[1], window, q.device)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=0.35, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["cpu_flash", "eager"])
def test_large_sink_drives_output_to_zero(impl):
    q, k, v = random_qkv()
    out = sink_attention(q, k, v, torch.full((4,), 60.0), 0.35, WINDOW, impl)
    assert out.abs().max() < 1e-15
    # one head with a large sink goes quiet, the others are untouched
    mixed = sink_attention(q, k, v, torch.tensor([60.0, -torch.inf, -torch.inf, -torch.inf]), 0.35, None, impl)
    plain = sink_attention(q, k, v, torch.full((4,), -torch.inf), 0.35, None, impl)
    assert mixed[:, :, 0].abs().max() < 1e-15
    torch.testing.assert_close(mixed[:, :, 1:], plain[:, :, 1:])


@pytest.mark.parametrize("window", [None, WINDOW])
def test_cpu_flash_sink_attention_gradcheck(window, monkeypatch):
    monkeypatch.setattr(gqa_attention, "WINDOW_QUERY_BLOCK", 4)
    q, k, v = random_qkv(seq=10, dim=4, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, sinks))
    assert torch.autograd.gradcheck(lambda *t: sink_attention(*t, 0.5, window, "cpu_flash"), inputs)


def test_cpu_flash_matches_eager_with_document_mask():
    q, k, v = random_qkv(dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)
    doc = torch.tensor([0] * 5 + [1] * 6)
    mask = (doc[:, None] == doc[None, :])[None, None].expand(2, 1, 11, 11)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    got = sink_attention(*inputs, 0.4, WINDOW, "cpu_flash", mask)
    want = sink_attention(q, k, v, sinks, 0.4, WINDOW, "eager", mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: sink_attention(*t, 0.4, WINDOW, "cpu_flash", mask), tuple(inputs))


@pytest.mark.parametrize("window", [None, WINDOW])
def test_flex_path_forward_matches_eager(window):
    """The CUDA kernel's formula (flex lse + eq. 1), run uncompiled on CPU (forward only there)."""
    q, k, v = random_qkv(seq=16)
    sinks = torch.randn(4)
    want = sink_attention(q, k, v, sinks, 0.35, window, "eager")
    with torch.no_grad():
        got = gqa_attention.flex_sink_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sinks, 0.35, window, compiled=False
        ).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_shapes_and_names():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GroupedQueryAttention(24, 4, 3, 8)
    with pytest.raises(ValueError, match="sliding_window"):
        GroupedQueryAttention(24, 4, 2, 8, sliding_window=0)
    with pytest.raises(ValueError, match="not one of"):
        GroupedQueryAttention(24, 4, 2, 8, implementation="fast")
    q, k, v = random_qkv(kv_heads=3)
    assert resolve_sink_attention("auto", q) == "cpu_flash"
    with pytest.raises(ValueError, match="kv heads"):
        sink_attention(q, k, v, torch.zeros(4), 0.3)
