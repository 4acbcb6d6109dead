"""Multi-token prediction (V3 §2.2): the model's MTP losses against a manual re-computation,
document-boundary handling of the shifted targets, the combined loss, and gradient flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.transformer import IGNORE_INDEX, Transformer, mtp_labels, target_counts


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=2,
        max_position_embeddings=64,
        rope_scaling=None,
        aux_loss_alpha=0.01,
        initializer_range=0.05,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**kw))


def test_mtp_labels_hand_example():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert mtp_labels(labels, 0).tolist() == labels.tolist()
    assert mtp_labels(labels, 1).tolist() == [[11, 12, 13, 14, 15, -100]]
    # position 2 (doc 0) would read position 3 (doc 1): ignored
    assert mtp_labels(labels, 1, doc).tolist() == [[11, 12, -100, 14, 15, -100]]
    assert mtp_labels(labels, 2, doc).tolist() == [[12, -100, -100, 15, -100, -100]]


def test_target_counts_hand_example():
    """Targets of the main head and each MTP depth, the counts the trainer normalises by."""
    labels = torch.tensor([[10, 11, IGNORE_INDEX, 13, 14, 15]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert target_counts(labels, 0).tolist() == [5]
    assert target_counts(labels, 2).tolist() == [5, 4, 3]
    assert target_counts(labels, 2, doc).tolist() == [5, 3, 1]


def manual_losses(model: Transformer, ids, labels, doc_ids):
    """Re-run the model by hand: main head CE sum/count, then each MTP depth's CE sum/count."""
    B, S = ids.shape
    rope = model.rope(S)
    h = model.embed_tokens(ids)
    for layer in model.layers.values():
        h = layer(h, rope, doc_ids, None)
    h = model.norm(h)  # MTP depth 1 reads the main head's input
    logits = model.lm_head(h)
    lm_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    lm_count = int((labels != -100).sum())
    sums, counts = [], []
    for k, module in enumerate(model.mtp, start=1):
        shifted = torch.zeros_like(ids)
        shifted[:, : S - k] = ids[:, k:]
        emb = model.embed_tokens(shifted)
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h)], dim=-1))
        h = module.norm(module.block(x, rope, doc_ids, None))  # depth k+1 reads what depth k's head reads
        lg = model.lm_head(h)
        tgt = torch.full_like(labels, -100)
        for b in range(B):
            for i in range(S - k):
                if doc_ids is None or doc_ids[b, i] == doc_ids[b, i + k]:
                    tgt[b, i] = labels[b, i + k]
        sums.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"))
        counts.append(int((tgt != -100).sum()))
    return lm_sum, lm_count, torch.stack(sums), counts


@pytest.mark.parametrize("with_docs", [False, True])
def test_mtp_losses_match_manual(with_docs):
    model = make_model(seed=1)
    model.eval()
    torch.manual_seed(2)
    B, S = 2, 12
    tokens = torch.randint(0, 64, (B, S + 1))
    ids, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[0, 3] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3]) if with_docs else None
    with torch.no_grad():
        out = model(ids, labels, doc_ids=doc_ids)
        lm_sum, lm_count, sums, counts = manual_losses(model, ids, labels, doc_ids)
    torch.testing.assert_close(out.lm_loss_sum, lm_sum, rtol=1e-5, atol=1e-5)
    assert int(out.lm_tokens) == lm_count
    assert out.mtp_loss_sums.shape == (2,)
    torch.testing.assert_close(out.mtp_loss_sums, sums, rtol=1e-5, atol=1e-5)
    assert out.mtp_tokens.tolist() == counts
    assert target_counts(labels, 2, doc_ids).tolist() == [lm_count] + counts
    expected_counts = [B * (S - 1) - 1, B * (S - 2) - 1]  # the ignored label is seen once per depth
    if with_docs:
        expected_counts = [expected_counts[0] - 2, expected_counts[1] - 4]  # 1 resp. 2 crossings per sequence
    assert counts == expected_counts


def test_combined_loss_formula():
    model = make_model(seed=3)
    model.eval()
    torch.manual_seed(4)
    tokens = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        out = model(tokens[:, :-1], tokens[:, 1:])
    lm = out.lm_loss_sum / out.lm_tokens
    per_depth = out.mtp_loss_sums / out.mtp_tokens
    for lam in (0.0, 0.3, 1.0):
        want = lm + lam / 2 * per_depth.sum()
        torch.testing.assert_close(out.loss(lam), want)
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, per_depth.mean())
    assert out.loss(0.3) > out.loss(0.0)


def test_every_parameter_gets_a_gradient():
    model = make_model(seed=5)
    model.train()
    torch.manual_seed(6)
    tokens = torch.randint(0, 64, (4, 17))
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss(0.3).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not missing, missing
    assert not zero, zero
    assert len(model.mtp) == 2
    assert all(m.block.mlp.gate.weight.grad.abs().sum() > 0 for m in model.mtp)


def test_mtp_weight_zero_drops_mtp_gradient():
    model = make_model(seed=7, aux_loss_alpha=0.0)
    model.train()
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:]).loss(0.0).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.mtp.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0
