"""Parameter and FLOP accounting (models.accounting.count_model) against the published
figures: DeepSeek-V3 671B total / 37B activated (+14B MTP = 685B released), DeepSeek-V2-Lite
15.7B / 2.4B, and an independent FLOP count for the tiny-v3 shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.hf_baseline import model_shapes
from models.accounting import count_model
from models.config import ModelConfig


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    topk_method="greedy",
    scoring_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
)

TINY_V3 = dict(model_shapes(), num_nextn_predict_layers=0)  # bench/model_step.py's shapes


def v3_configs(repo_root):
    cfgs = [ModelConfig()]
    path = repo_root / "configs" / "deepseek_v3_671b.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        raw = OmegaConf.load(path)
        cfgs.append(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)))
    return cfgs


def test_deepseek_v3_totals(repo_root):
    for cfg in v3_configs(repo_root):
        c = count_model(cfg)
        assert c.params_total_no_mtp == pytest.approx(671e9, rel=0.005)
        # released weights (685B) hold the MTP module with its own copy of embedding and head
        assert c.params_total + 2 * c.params_embedding == pytest.approx(685e9, rel=0.005)
        assert c.params_embedding == 129280 * 7168
        assert c.params_total > c.params_total_no_mtp


def test_deepseek_v3_activated(repo_root):
    for cfg in v3_configs(repo_root):
        c = count_model(cfg)
        # 37B published; a token reads one embedding row, so the table does not count (36.6B)
        assert c.params_active_no_mtp == pytest.approx(37e9, rel=0.015)
        assert c.params_active > c.params_active_no_mtp
        # activated = total - unused routed experts - unread embedding rows
        expert = 3 * 7168 * 2048
        unused = (61 - 3) * (256 - 8) * expert
        assert c.params_active_no_mtp == c.params_total_no_mtp - unused - (c.params_embedding - 7168)


def test_deepseek_v2_lite():
    c = count_model(ModelConfig(**V2_LITE))
    assert c.params_total == c.params_total_no_mtp
    assert c.params_total == pytest.approx(15.7e9, rel=0.03)
    assert c.params_active == pytest.approx(2.4e9, rel=0.03)


def expected_flops(cfg: ModelConfig, seq: int) -> float:
    """6 x activated non-embedding matmul weights + 6 S heads (d_qk + d_v) per layer."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = h * cfg.q_lora_rank + cfg.q_lora_rank * nh * dqk  # q down / up
    attn += h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv down + rope key
    attn += cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv up
    attn += nh * cfg.v_head_dim * h  # o_proj
    dense = 3 * h * cfg.intermediate_size
    moe = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * h * cfg.moe_intermediate_size
    moe += cfg.n_routed_experts * h  # router
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    head = cfg.vocab_size * h
    matmul = cfg.num_hidden_layers * attn + n_dense * dense + n_moe * moe + head
    return 6 * matmul + 6 * seq * nh * (dqk + cfg.v_head_dim) * cfg.num_hidden_layers


def test_tiny_v3_flops_per_token():
    cfg = ModelConfig(**TINY_V3)
    c = count_model(cfg, seq_len=256)
    want = expected_flops(cfg, 256)
    assert want == pytest.approx(26e6, rel=0.05)
    assert c.flops_per_token == pytest.approx(want, rel=1e-9)
    # longer sequences cost more attention FLOPs only
    c2 = count_model(cfg, seq_len=512)
    assert c2.flops_per_token - c.flops_per_token == pytest.approx(6 * 256 * 8 * (48 + 32) * 4)


def test_tiny_v3_with_mtp_counts_an_extra_layer_and_head():
    base = ModelConfig(**TINY_V3)
    mtp = dataclasses.replace(base, num_nextn_predict_layers=1)
    a, b = count_model(base, 256), count_model(mtp, 256)
    h = base.hidden_size
    assert b.params_total_no_mtp == a.params_total
    # MTP module: enorm, hnorm, eh_proj, one MoE block, final norm
    assert b.params_total - a.params_total > 2 * h * h
    assert b.flops_per_token > a.flops_per_token + 6 * base.vocab_size * h


def test_tied_embeddings_keep_the_head_in_flops():
    untied = ModelConfig(**TINY_V3)
    tied = dataclasses.replace(untied, tie_word_embeddings=True)
    a, b = count_model(untied, 256), count_model(tied, 256)
    assert b.params_total == a.params_total - untied.vocab_size * untied.hidden_size
    assert b.flops_per_token == pytest.approx(a.flops_per_token)
