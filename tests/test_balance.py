"""Load balancing: the aux-loss-free bias update (V3 §2.1.2) and the balance losses
(V3 eqs. 17-20; V2 eqs. 12-19), checked against hand computations with explicit loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.balance import balance_group_ids, balance_losses, bias_update, update_router_biases
from models.config import ModelConfig
from models.moe import MoE
from tests.model_helpers import make_moe, moe_cfg


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


# --------------------------------------------------------------------------- bias update


def test_bias_update_formula_hand_example():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    bias_update(bias, load, 0.01)
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.51, -0.49, 0.01]))
    # load equal to the mean: sign 0, no change
    bias2 = torch.zeros(3)
    bias_update(bias2, torch.tensor([3.0, 3.0, 3.0]), 0.1)
    assert torch.equal(bias2, torch.zeros(3))


def _skewed_moe(seed: int = 0) -> tuple[MoE, torch.Tensor]:
    cfg = moe_cfg()
    moe = make_moe(cfg, seed)
    mu = torch.randn(cfg.hidden_size)
    mu = mu / mu.norm()
    with torch.no_grad():
        # expert e's affinity grows with e: strong, consistent preference for high ids
        strength = torch.linspace(-3.0, 3.0, cfg.n_routed_experts)
        moe.gate.weight.copy_(strength[:, None] * mu[None, :] + 0.05 * torch.randn(cfg.n_routed_experts, cfg.hidden_size))
    return moe, mu


def test_bias_updates_balance_a_skewed_router():
    moe, mu = _skewed_moe(seed=1)
    moe.train()
    torch.manual_seed(11)
    ratios = []
    recent = torch.zeros(8)
    with torch.no_grad():
        for step in range(200):
            x = (torch.randn(1, 64, 16) * 0.3 + mu).contiguous()  # inputs biased along mu
            moe(x)
            counts = update_router_biases(moe, gamma=0.01)
            load = counts[0]
            ratios.append((load.max() / load.mean()).item())
            if step >= 150:
                recent += load
    first, last = ratios[0], sum(ratios[-20:]) / 20
    assert first > 2.5, f"router is not skewed enough to test balancing (max/mean={first})"
    # per-step load still dithers (sign updates of size gamma), but clearly less skewed ...
    assert last < 0.5 * first, f"max/mean load {first:.2f} -> {last:.2f}"
    # ... and balanced when summed over the last 50 steps
    assert recent.max() / recent.mean() < 1.2, recent
    # the bias moved against the skew: low-affinity experts got the largest bias
    b = moe.gate.e_score_correction_bias
    assert b[0] > b[-1]


def _two_layer_model(seed=0, **kw):
    cfg = moe_cfg(**kw)
    torch.manual_seed(seed)
    model = nn.ModuleList([make_moe(cfg, seed), make_moe(cfg, seed + 1)])
    return model, cfg


def test_counts_accumulate_over_micro_batches_and_reset():
    model, cfg = _two_layer_model(seed=2)
    model.train()
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, cfg.hidden_size) for _ in range(3)]
    expected = torch.zeros(2, cfg.n_routed_experts)
    with torch.no_grad():
        for x in xs:
            for i, moe in enumerate(model):
                moe(x)
                idx = moe.gate(x.reshape(-1, cfg.hidden_size)).topk_idx
                expected[i] += torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
    for i, moe in enumerate(model):
        torch.testing.assert_close(moe.tokens_per_expert, expected[i])
        assert moe.tokens_per_expert.sum() == 3 * 10 * cfg.num_experts_per_tok
    seen = []

    def reduce(c):
        seen.append(c.clone())
        return c

    counts = update_router_biases(model, gamma=0.01, reduce_counts=reduce)
    assert len(seen) == 1 and seen[0].shape == (2, cfg.n_routed_experts)
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(counts, expected)
    for i, moe in enumerate(model):
        assert moe.tokens_per_expert.abs().sum() == 0, "counts must be zeroed by the update"
        want = 0.01 * torch.sign(expected[i].mean() - expected[i])
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want)


def test_reduce_counts_return_value_is_used():
    model, cfg = _two_layer_model(seed=3)
    model.train()
    with torch.no_grad():
        model[0](torch.randn(1, 6, cfg.hidden_size))
        model[1](torch.randn(1, 6, cfg.hidden_size))
    E = cfg.n_routed_experts
    replaced = torch.stack([torch.arange(E, dtype=torch.float32), torch.arange(E, 0, -1, dtype=torch.float32)])
    got = update_router_biases(model, gamma=0.1, reduce_counts=lambda c: replaced.clone())
    torch.testing.assert_close(got, replaced)
    for moe, load in zip(model, replaced):
        torch.testing.assert_close(moe.gate.e_score_correction_bias, 0.1 * torch.sign(load.mean() - load))
    # a doubling all-reduce stand-in: same signs, returned counts doubled
    with torch.no_grad():
        model[0](torch.randn(1, 6, cfg.hidden_size))
    local = model[0].tokens_per_expert.clone()
    got = update_router_biases(model, gamma=0.0, reduce_counts=lambda c: c * 2)
    torch.testing.assert_close(got[0], local * 2)


def test_gamma_zero_and_v2_layers_leave_bias_alone():
    model, cfg = _two_layer_model(seed=4)
    model.train()
    with torch.no_grad():
        model[0](torch.randn(1, 8, cfg.hidden_size))
    update_router_biases(model, gamma=0.0)
    assert model[0].gate.e_score_correction_bias.abs().sum() == 0
    assert model[0].tokens_per_expert.sum() == 0
    v2 = make_moe(moe_cfg(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1))
    v2.train()
    with torch.no_grad():
        v2(torch.randn(1, 8, 16))
    update_router_biases(v2, gamma=0.1)
    assert v2.gate.e_score_correction_bias.abs().sum() == 0


def test_eval_mode_does_not_record_counts():
    moe = make_moe(moe_cfg(), seed=5)
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(2, 7, 16))
    assert moe.tokens_per_expert.sum() == 0
    moe.train()
    with torch.no_grad():
        moe(torch.randn(2, 7, 16))
    assert moe.tokens_per_expert.sum() == 2 * 7 * 2


# --------------------------------------------------------------------------- aux losses


def hand_losses(scores, topk_idx, groups, top_k, D, M, a1, a2, a3):
    """Loops over balance groups, experts and tokens; returns the mean over groups of
    a1*L_ExpBal + a2*L_DevBal + a3*L_CommBal (V2 eqs. 12-19; V3 eqs. 17-20 for a1)."""
    s = scores.double().tolist()
    idx = topk_idx.tolist()
    E = len(s[0])
    per_dev = E // D
    members = {}
    for t, g in enumerate(groups):
        members.setdefault(g, []).append(t)
    total = 0.0
    for g, toks in members.items():
        T = len(toks)
        f = [0.0] * E
        P = [0.0] * E
        for i in range(E):
            f[i] = E / (top_k * T) * sum(1.0 for t in toks if i in idx[t])
            P[i] = 1.0 / T * sum(s[t][i] / sum(s[t]) for t in toks)
        loss = a1 * sum(f[i] * P[i] for i in range(E))
        fd = [sum(f[j] for j in range(d * per_dev, (d + 1) * per_dev)) / per_dev for d in range(D)]
        Pd = [sum(P[j] for j in range(d * per_dev, (d + 1) * per_dev)) for d in range(D)]
        loss += a2 * sum(fd[d] * Pd[d] for d in range(D))
        fc = [
            D / (M * T) * sum(1.0 for t in toks if any(e // per_dev == d for e in idx[t])) for d in range(D)
        ]
        loss += a3 * sum(fc[d] * Pd[d] for d in range(D))
        total += loss
    return total / len(members)


def random_routing(T, E, K, sigmoid, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return scores, topk


def test_v3_sequence_wise_loss_matches_hand_computation():
    B, S, E, K = 3, 7, 8, 2
    scores, topk = random_routing(B * S, E, K, sigmoid=True, seed=0)
    gids, n = balance_group_ids(B, S, None, torch.device("cpu"))
    assert n == B and gids.tolist() == [b for b in range(B) for _ in range(S)]
    got = balance_losses(scores, topk, gids, n, K, 1, 1, 0.01, 0.0, 0.0)
    want = hand_losses(scores, topk, gids.tolist(), K, 1, 1, 0.01, 0.0, 0.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # one group over the whole batch is a different number (per-sequence statistics matter)
    whole = hand_losses(scores, topk, [0] * (B * S), K, 1, 1, 0.01, 0.0, 0.0)
    assert abs(whole - want) > 1e-6


def test_document_grouping():
    B, S, E, K = 2, 8, 8, 2
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    gids, n = balance_group_ids(B, S, doc_ids, torch.device("cpu"))
    assert n == 5
    pairs = [(b, int(doc_ids[b, s])) for b in range(B) for s in range(S)]
    ids = gids.tolist()
    for i in range(B * S):
        for j in range(B * S):
            assert (ids[i] == ids[j]) == (pairs[i] == pairs[j])
    scores, topk = random_routing(B * S, E, K, sigmoid=True, seed=1)
    got = balance_losses(scores, topk, gids, n, K, 1, 1, 0.1, 0.0, 0.0)
    want = hand_losses(scores, topk, [pairs.index(p) for p in pairs], K, 1, 1, 0.1, 0.0, 0.0)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_moe_layer_aux_loss_uses_documents():
    cfg = moe_cfg(aux_loss_alpha=0.05, n_group=2, topk_group=1)
    moe = make_moe(cfg, seed=6)
    moe.train()
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    moe(x, doc_ids)
    routing = moe.gate(x.reshape(-1, 16))
    pairs = [(b, int(doc_ids[b, s])) for b in range(2) for s in range(6)]
    want = hand_losses(routing.scores.detach(), routing.topk_idx, [pairs.index(p) for p in pairs], 2, 1, 1, 0.05, 0, 0)
    assert moe.last_aux_loss.item() == pytest.approx(want, rel=1e-5)
    moe(x)  # per sequence without doc ids
    want_seq = hand_losses(routing.scores.detach(), routing.topk_idx, [b for b in range(2) for _ in range(6)], 2, 1, 1, 0.05, 0, 0)
    assert moe.last_aux_loss.item() == pytest.approx(want_seq, rel=1e-5)


@pytest.mark.parametrize("alphas", [(0.0, 0.02, 0.0), (0.0, 0.0, 0.03), (0.01, 0.02, 0.03)])
def test_v2_device_and_communication_losses(alphas):
    B, S, E, K, D, M = 2, 9, 12, 3, 4, 2
    scores, _ = random_routing(B * S, E, K, sigmoid=False, seed=2)
    # device-limited selections: experts from at most M devices per token
    g = torch.Generator().manual_seed(3)
    topk = []
    for _ in range(B * S):
        devs = torch.randperm(D, generator=g)[:M]
        pool = torch.cat([torch.arange(d * (E // D), (d + 1) * (E // D)) for d in devs.tolist()])
        topk.append(pool[torch.randperm(pool.numel(), generator=g)[:K]])
    topk = torch.stack(topk)
    gids, n = balance_group_ids(B, S, None, torch.device("cpu"))
    got = balance_losses(scores, topk, gids, n, K, D, M, *alphas)
    want = hand_losses(scores, topk, gids.tolist(), K, D, M, *alphas)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_aux_loss_gradient_reaches_router_and_scales_linearly():
    cfg = moe_cfg(aux_loss_alpha=0.1, n_group=2, topk_group=1)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)

    def router_grad(scale: float, alpha: float, zero_out: bool) -> torch.Tensor:
        cfg.aux_loss_alpha = alpha
        moe = make_moe(cfg, seed=7)
        moe.train()
        moe.aux_loss_scale = scale
        out = moe(x)
        upstream = torch.zeros_like(out) if zero_out else torch.ones_like(out)
        (out * upstream).sum().backward()
        return moe.gate.weight.grad.clone()

    g1 = router_grad(1.0, 0.1, zero_out=True)
    g3 = router_grad(3.0, 0.1, zero_out=True)
    assert g1.abs().sum() > 0, "aux loss gradient did not reach the router weight"
    torch.testing.assert_close(g3, 3 * g1, rtol=1e-5, atol=1e-9)
    # the delivered gradient is exactly d(aux)/d(weight), recomputed by hand here
    moe = make_moe(cfg, seed=7)
    w = moe.gate.weight
    flat = x.reshape(-1, 16)
    topk = moe.gate(flat).topk_idx
    s = torch.sigmoid(flat @ w.T)
    probs = s / s.sum(-1, keepdim=True)
    aux = 0.0
    for b in range(2):
        rows = slice(6 * b, 6 * b + 6)
        f = torch.zeros(8)
        for t in range(6 * b, 6 * b + 6):
            for e in topk[t].tolist():
                f[e] += 8 / (2 * 6)
        aux = aux + 0.1 * (f * probs[rows].mean(0)).sum()
    (aux / 2).backward()
    torch.testing.assert_close(g1, w.grad, rtol=1e-4, atol=1e-8)
    # with the LM-side gradient on, alpha changes the router gradient
    g_off = router_grad(1.0, 0.0, zero_out=False)
    g_on = router_grad(1.0, 0.1, zero_out=False)
    torch.testing.assert_close(g_on - g_off, g1, rtol=1e-4, atol=1e-7)
