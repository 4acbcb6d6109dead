"""The whole tiny model: it learns, it is causal, q_lora_rank=None works, and the config
validation names the offending field."""

from __future__ import annotations

import pytest
import torch

from models.moe import moe_layers
from models.moe_state import MoEStepState
from models.config import ModelConfig
from models.transformer import Transformer


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=64,
        rope_scaling=None,
    )
    base.update(kw)
    return ModelConfig(**base)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moe_state = MoEStepState(moe_layers(model))
    tokens = torch.randint(0, 128, (2, 33))
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    first = None
    losses = []
    for _ in range(80):
        out = model(ids, labels)
        loss = out.loss(0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe_state.end_step(gamma=0.001)
        losses.append(out.lm_loss.item())
        first = losses[0]
        if losses[-1] < 0.1 * first and len(losses) >= 10:
            break
    assert first == pytest.approx(torch.log(torch.tensor(128.0)).item(), rel=0.05)  # uniform at init
    assert losses[-1] < 0.1 * first, f"lm loss {first:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"
    # MoE router biases moved (the aux-loss-free update ran on every MoE layer, MTP's included)
    found = [m for m in model.modules() if m.__class__.__name__ == "MoE"]
    assert len(found) == 2
    assert all(m.gate.e_score_correction_bias.abs().sum() > 0 for m in found)


def test_no_label_forward_returns_logits():
    torch.manual_seed(1)
    model = Transformer(tiny_cfg())
    model.eval()
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (3, 10, 128)
    assert out.lm_loss_sum is None and out.mtp_loss_sums is None
    assert torch.isfinite(out.logits).all()


def test_q_lora_rank_none_v2_lite_style():
    torch.manual_seed(2)
    cfg = tiny_cfg(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    attn = model.layers["0"].self_attn
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    assert attn.q_proj.weight.shape == (4 * (16 + 8), 64)
    model.train()
    tokens = torch.randint(0, 128, (2, 9))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.mtp_loss_sums is None
    out.loss(0.3).backward()
    assert attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causality(attn):
    torch.manual_seed(3)
    model = Transformer(tiny_cfg(attn_implementation=attn))
    model.eval()
    ids = torch.randint(0, 128, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-6


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(topk_group=3), "topk_group"),
        (dict(n_group=3, topk_group=1, num_experts_per_tok=2), "n_group"),
        (dict(scoring_func="softmax"), "noaux_tc"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="top1"), "topk_method"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    cfg = tiny_cfg(**kw)
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        Transformer(cfg)


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"n_routed_experts=8 must be divisible by n_group=3"):
        tiny_cfg(n_group=3, topk_group=1).validate()
    with pytest.raises(ValueError, match=r"topk_method 'noaux_tc' needs scoring_func 'sigmoid'"):
        tiny_cfg(scoring_func="softmax").validate()
    tiny_cfg().validate()  # the tiny config itself is valid
    tiny_cfg(scoring_func="softmax", topk_method="group_limited_greedy").validate()
