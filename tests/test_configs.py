"""The shipped YAML configs: every `model:` key is a ModelConfig field, and the
published shapes (DeepSeek-V3, arXiv 2412.19437; V2-Lite, arXiv 2405.04434) hold."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from models.config import ModelConfig, RopeScalingConfig

CONFIGS = ["tiny", "deepseek_v3_671b", "deepseek_v2_lite", "deepseek_v3_16b", "deepseek_v3_4b_a1b", "tiny_gpt_oss",
           "gpt_oss_20b", "gpt_oss_120b"]


def load_model_config(repo_root, name: str) -> ModelConfig:
    raw = OmegaConf.load(repo_root / "configs" / f"{name}.yaml")
    assert "model" in raw, f"{name}.yaml has no model: section"
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(raw.model.keys()) - fields
    assert not unknown, f"{name}.yaml: keys that are not ModelConfig fields: {sorted(unknown)}"
    # The structured merge also type-checks values and the nested rope_scaling.
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(repo_root, name):
    cfg = load_model_config(repo_root, name)
    cfg.validate()
    assert cfg.rope_scaling is None or isinstance(cfg.rope_scaling, RopeScalingConfig)


def test_deepseek_v3_published_shapes(repo_root):
    c = load_model_config(repo_root, "deepseek_v3_671b")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (129280, 7168, 61, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (256, 1, 8)
    assert (c.n_group, c.topk_group, c.first_k_dense_replace) == (8, 4, 3)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (1536, 512, 64, 128, 128)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.5)
    assert c.num_nextn_predict_layers == 1
    assert c.rope_scaling.factor == 40 and c.rope_scaling.original_max_position_embeddings == 4096


def test_deepseek_v2_lite_published_shapes(repo_root):
    c = load_model_config(repo_root, "deepseek_v2_lite")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (102400, 2048, 27, 16)
    assert c.q_lora_rank is None
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (64, 2, 6)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == ("softmax", "greedy", False)
    assert c.num_nextn_predict_layers == 0
    assert c.rope_scaling.mscale == pytest.approx(0.707)


def test_tiny_is_small(repo_root):
    c = load_model_config(repo_root, "tiny")
    assert c.rope_scaling is None
    assert c.hidden_size <= 256 and c.num_hidden_layers <= 4
