"""Small MoE-layer builders shared by the router, balance and MoE-layer tests."""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.moe import MoE


def moe_cfg(**kw) -> ModelConfig:
    """A validated config for one small MoE layer (8 experts top-2, sigmoid router), overridable."""
    base = dict(
        hidden_size=16,
        moe_intermediate_size=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        aux_loss_alpha=0.0,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_scaling=None,
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def make_moe(cfg: ModelConfig, seed: int = 0, std: float = 0.1) -> MoE:
    """An MoE layer with N(0, std) weights, shared experts included."""
    torch.manual_seed(seed)
    moe = MoE(cfg)
    moe.reset_parameters(std)
    for p in moe.shared_experts.parameters():
        nn.init.normal_(p, std=std)
    return moe
