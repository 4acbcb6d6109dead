"""gpt-oss leaf modules against transformers' GptOss modules (fp32, tiny random shapes):
sink attention with sliding windows and half-split YaRN RoPE, clamped SwiGLU experts with
biases, the top-k softmax router and its aux loss, and MXFP4 (de)quantisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import gqa_attention
from models.clamped_experts import ClampedSwiGLUExperts, clamped_swiglu
from models.config import RopeScalingConfig
from models.experts import looped_linear
from models.gqa_attention import GroupedQueryAttention, band_mask, resolve_sink_attention, sink_attention
from models.moe import LocalDispatcher
from models.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from models.rope import RotaryEmbedding, rope_frequencies
from models.topk_softmax_router import TopKSoftmaxRouter, switch_load_balancing_loss
from train.hf.gpt_oss import gate_up_from_hf, halves_to_interleaved, interleaved_to_halves, swap_last_two

hf_gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
from transformers import GptOssConfig  # noqa: E402
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors  # noqa: E402
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


def hf_experts_to_ours(ref, ours: ClampedSwiGLUExperts) -> None:
    """HF [E, H, 2I] interleaved (gate even, up odd columns) -> ours [E, 2I, H] (gate | up halves)."""
    with torch.no_grad():
        w, b = ref.gate_up_proj, ref.gate_up_proj_bias
        ours.gate_up_proj.copy_(gate_up_from_hf(w))
        ours.gate_up_proj_bias.copy_(interleaved_to_halves(b))
        ours.down_proj.copy_(swap_last_two(ref.down_proj))
        ours.down_proj_bias.copy_(ref.down_proj_bias)


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
@pytest.mark.parametrize("hidden,inter", [(16, 8), (12, 12)])  # non-square and square experts
def test_router_and_experts_match_hf(hidden, inter, implementation):
    torch.manual_seed(0)
    config = hf_config(hidden_size=hidden, intermediate_size=inter)
    ref_router, ref_experts = hf_gpt_oss.GptOssTopKRouter(config), hf_gpt_oss.GptOssExperts(config)
    for p in list(ref_router.parameters()) + list(ref_experts.parameters()):
        torch.nn.init.normal_(p, std=1.5)  # large enough that both clamps are active
    router = TopKSoftmaxRouter(5, hidden, 2)
    router.load_state_dict(ref_router.state_dict())
    experts = ClampedSwiGLUExperts(5, hidden, inter, implementation)
    hf_experts_to_ours(ref_experts, experts)
    x = torch.randn(30, hidden, requires_grad=True)

    logits, ref_weights, ref_idx = ref_router(x)
    routing = router(x)
    assert torch.equal(routing.topk_idx, ref_idx) and routing.keep is None
    torch.testing.assert_close(routing.topk_weight, ref_weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routing.scores, logits.softmax(-1), rtol=1e-6, atol=1e-6)

    want = ref_experts(x, ref_idx, ref_weights)
    dispatcher = LocalDispatcher(5)
    rows, counts, ctx = dispatcher.dispatch(x, routing.topk_idx, routing.keep)
    assert ((x @ ref_experts.gate_up_proj + ref_experts.gate_up_proj_bias[:, None]).abs() > 7).any()  # clamps hit
    got = dispatcher.combine(experts(rows, counts, dispatcher.row_gates(routing.topk_weight, ctx)), ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(want)
    ref_params = [x, *ref_router.parameters(), *ref_experts.parameters()]
    want_grads = torch.autograd.grad(want, ref_params, grad)
    gate_up, gate_up_bias, down, down_bias, *rest = torch.autograd.grad(
        got, [experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias, x,
              router.weight, router.bias], grad
    )
    got_grads = [*rest, halves_to_interleaved(gate_up.transpose(1, 2)), halves_to_interleaved(gate_up_bias),
                 down.transpose(1, 2), down_bias]
    names = ["x", "router.weight", "router.bias", *(n for n, _ in ref_experts.named_parameters())]
    assert_grads_close(got_grads, want_grads, names)


def test_clamped_swiglu_values_and_gradcheck():
    gate = torch.tensor([-9.0, -1.0, 0.5, 6.9, 7.5, 20.0], dtype=torch.float64)
    up = torch.tensor([-8.0, 7.5, -7.0, 0.0, 3.0, -2.0], dtype=torch.float64)
    g, u = gate.clamp(max=7), up.clamp(-7, 7)
    torch.testing.assert_close(clamped_swiglu(torch.cat([gate, up])), (u + 1) * g * torch.sigmoid(1.702 * g))
    x = (torch.randn(7, 10, dtype=torch.float64) * 6).requires_grad_()  # values on both sides of the clamps
    assert torch.autograd.gradcheck(clamped_swiglu, (x,))


def test_experts_backward_gradcheck():
    torch.manual_seed(3)
    experts = ClampedSwiGLUExperts(3, 4, 4, "loop").double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=2.0)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(experts.parameters())

    def run(x, *weights):
        return torch.func.functional_call(experts, dict(zip([n for n, _ in experts.named_parameters()], weights)), (x, counts))

    assert torch.autograd.gradcheck(run, (x, *params))


def test_experts_replacement_gemm_hook_gets_the_biases_too():
    """The GroupedExperts GEMM hook (e.g. FP8, installed by train/precision.py) serves both projections."""
    torch.manual_seed(4)
    experts = ClampedSwiGLUExperts(3, 8, 4, "loop")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=1.0)
    counts, x = torch.tensor([3, 1, 2]), torch.randn(6, 8)
    want = experts(x, counts)
    calls = []

    def hook(rows, weight, counts, offsets):
        calls.append(weight.shape)
        return looped_linear(rows, weight, counts.tolist())

    experts.gemm = hook
    torch.testing.assert_close(experts(x, counts), want)
    assert calls == [experts.gate_up_proj.shape, experts.down_proj.shape]


def test_aux_loss_matches_hf_load_balancing_loss():
    torch.manual_seed(1)
    logits = torch.randn(40, 6)
    coef = 0.01
    routing_scores = logits.softmax(-1)
    topk_idx = routing_scores.topk(3, dim=-1).indices
    want = coef * hf_gpt_oss.load_balancing_loss_func((logits,), num_experts=6, top_k=3)
    torch.testing.assert_close(switch_load_balancing_loss(routing_scores, topk_idx, coef), want, rtol=1e-6, atol=0)


def test_router_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TopKSoftmaxRouter(4, 8, 5)


def test_mxfp4_dequantisation_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)  # [E, out, G, 16]
    scales = torch.randint(112, 140, (3, 10, 4), dtype=torch.uint8, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        want = _convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # HF returns [E, in, out]
        got = dequantize_mxfp4(blocks, scales, dtype, rows_per_chunk=7)  # chunks that do not divide the rows
        assert got.shape == (3, 10, 128) and torch.equal(got, want)


def test_mxfp4_round_trip_on_representable_values():
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    elements = grid[torch.randint(0, 8, (4, 6, 64), generator=gen)] * (torch.randint(0, 2, (4, 6, 64), generator=gen) * 2 - 1)
    elements[..., ::32] = 6.0  # every block reaches the top of the E2M1 range: the scale is exact
    exponents = torch.randint(-20, 20, (4, 6, 2), generator=gen).repeat_interleave(32, dim=-1)
    values = torch.ldexp(elements, exponents)
    blocks, scales = quantize_mxfp4(values, rows_per_chunk=5)
    assert blocks.shape == (4, 6, 2, 16) and scales.shape == (4, 6, 2)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), values)
    # packed codes survive a dequantise -> quantise cycle (the scale comes from the block max)
    again = quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.float32))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_mxfp4_quantisation_rounds_to_nearest_and_saturates():
    values = torch.tensor([[0.2, 0.25, 0.75, 2.5, 5.0, 5.5, 7.9, -1.3] + [6.0] + [0.0] * 23])
    blocks, scales = quantize_mxfp4(values)
    assert int(scales[0, 0]) == 127  # amax 7.9 -> 2^(2 - 2)
    got = dequantize_mxfp4(blocks, scales, torch.float32)[0, :9]
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 6.0, -1.5, 6.0]))


def test_mxfp4_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_mxfp4(torch.full((1, 32), float("nan")))
