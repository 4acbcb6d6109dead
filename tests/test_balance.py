"""Load balancing: the aux-loss-free bias update (V3 §2.1.2) and the balance losses
(V3 eqs. 17-20; V2 eqs. 12-19), checked against hand computations with explicit loops."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import nn

from models.balance import balance_group_ids, balance_losses, bias_update
from models.config import ModelConfig
from models.moe import MoE, moe_layers
from models.moe_state import ExpertLoad, MoEStepState, merge_expert_loads
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
    state = MoEStepState([moe])
    torch.manual_seed(11)
    ratios = []
    recent = torch.zeros(8)
    with torch.no_grad():
        for step in range(200):
            x = (torch.randn(1, 64, 16) * 0.3 + mu).contiguous()  # inputs biased along mu
            moe(x)
            load = state.end_step(gamma=0.01).counts[0]
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
    state = MoEStepState(moe_layers(model))
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, cfg.hidden_size) for _ in range(3)]
    expected = torch.zeros(2, cfg.n_routed_experts)
    with torch.no_grad():
        for x in xs:
            for i, moe in enumerate(model):
                moe(x)
                idx = moe.gate(x.reshape(-1, cfg.hidden_size)).topk_idx
                expected[i] += torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
    assert expected.sum(dim=1).tolist() == [3 * 10 * cfg.num_experts_per_tok] * 2
    seen = []

    def reduce(c):
        seen.append(c.clone())
        return c

    load = state.end_step(gamma=0.01, reduce=reduce)
    # one reduction of all layers' counts, dropped tokens (none: dropless) as the last column
    assert len(seen) == 1 and seen[0].shape == (2, cfg.n_routed_experts + 1)
    torch.testing.assert_close(seen[0][:, :-1], expected)
    assert seen[0][:, -1].abs().sum() == 0 and load.dropped_tokens == 0
    torch.testing.assert_close(load.counts, expected)
    assert load.layer_ids == [0, 0]  # bare layers: the default position
    for i, moe in enumerate(model):
        want = 0.01 * torch.sign(expected[i].mean() - expected[i])
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want)
    torch.testing.assert_close(load.biases, torch.stack([m.gate.e_score_correction_bias for m in model]))
    after = state.end_step(gamma=0.0)
    assert after.counts.abs().sum() == 0, "counts must be zeroed by the update"


def test_reduce_counts_return_value_is_used():
    model, cfg = _two_layer_model(seed=3)
    model.train()
    state = MoEStepState(moe_layers(model))
    with torch.no_grad():
        model[0](torch.randn(1, 6, cfg.hidden_size))
        model[1](torch.randn(1, 6, cfg.hidden_size))
    E = cfg.n_routed_experts
    replaced = torch.stack([torch.arange(E, dtype=torch.float32), torch.arange(E, 0, -1, dtype=torch.float32)])
    dropped = torch.tensor([[3.0], [4.0]])
    got = state.end_step(gamma=0.1, reduce=lambda c: torch.cat([replaced, dropped], dim=1))
    torch.testing.assert_close(got.counts, replaced)
    assert got.dropped_tokens == 7.0
    for moe, load in zip(model, replaced):
        torch.testing.assert_close(moe.gate.e_score_correction_bias, 0.1 * torch.sign(load.mean() - load))
    # a doubling all-reduce stand-in: same signs, returned counts doubled
    x = torch.randn(1, 6, cfg.hidden_size)
    with torch.no_grad():
        model[0](x)
        local = torch.bincount(model[0].gate(x.reshape(-1, cfg.hidden_size)).topk_idx.flatten(), minlength=E).float()
    got = state.end_step(gamma=0.0, reduce=lambda c: c * 2)
    torch.testing.assert_close(got.counts[0], local * 2)
    assert got.counts[1].abs().sum() == 0


def test_gamma_zero_and_v2_layers_leave_bias_alone():
    model, cfg = _two_layer_model(seed=4)
    model.train()
    state = MoEStepState(moe_layers(model))
    with torch.no_grad():
        model[0](torch.randn(1, 8, cfg.hidden_size))
    assert state.end_step(gamma=0.0).counts[0].sum() == 8 * cfg.num_experts_per_tok
    assert model[0].gate.e_score_correction_bias.abs().sum() == 0
    assert state.end_step(gamma=0.0).counts.sum() == 0
    v2 = make_moe(moe_cfg(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1))
    v2.train()
    v2_state = MoEStepState([v2])
    with torch.no_grad():
        v2(torch.randn(1, 8, 16))
    load = v2_state.end_step(gamma=0.1)
    assert v2.gate.e_score_correction_bias.abs().sum() == 0
    assert load.biases is None and load.counts.sum() == 8 * 2  # V2 routers: counts, no biases


def test_eval_mode_does_not_record_counts():
    moe = make_moe(moe_cfg(), seed=5)
    state = MoEStepState([moe])
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(2, 7, 16))
    assert state.end_step(0.0).counts.sum() == 0
    moe.train()
    with torch.no_grad():
        moe(torch.randn(2, 7, 16))
    assert state.end_step(0.0).counts.sum() == 2 * 7 * 2


def test_merged_loads_follow_the_model_order():
    """Pipeline stages hold disjoint layer sets; merged rows are sorted by layer position."""
    E = 4
    late = ExpertLoad([5, 3], torch.tensor([[5.0] * E, [3.0] * E]), torch.tensor([[0.5] * E, [0.3] * E]), 2.0)
    early = ExpertLoad([1], torch.tensor([[1.0] * E]), torch.tensor([[0.1] * E]), 1.0)
    merged = merge_expert_loads([late, early])
    assert merged.layer_ids == [1, 3, 5]
    assert merged.counts[:, 0].tolist() == [1.0, 3.0, 5.0]
    torch.testing.assert_close(merged.biases[:, 0], torch.tensor([0.1, 0.3, 0.5]))
    assert merged.dropped_tokens == 3.0
    assert merge_expert_loads([]) is None


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
    state = MoEStepState([moe])
    state.begin_step(1)
    moe(x, doc_ids)
    routing = moe.gate(x.reshape(-1, 16))
    pairs = [(b, int(doc_ids[b, s])) for b in range(2) for s in range(6)]
    want = hand_losses(routing.scores.detach(), routing.topk_idx, [pairs.index(p) for p in pairs], 2, 1, 1, 0.05, 0, 0)
    assert state.aux_sum().item() == pytest.approx(want, rel=1e-5)
    state.begin_step(1)
    moe(x)  # per sequence without doc ids
    want_seq = hand_losses(routing.scores.detach(), routing.topk_idx, [b for b in range(2) for _ in range(6)], 2, 1, 1, 0.05, 0, 0)
    assert state.aux_sum().item() == pytest.approx(want_seq, rel=1e-5)
    moe(x)  # a second micro-batch of the step adds its aux loss
    assert state.aux_sum().item() == pytest.approx(2 * want_seq, rel=1e-5)


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

    def router_grad(n_micro: Optional[int], alpha: float, zero_out: bool) -> torch.Tensor:
        """Router gradient with the aux loss scaled by a step of n_micro micro-batches (None: no step state)."""
        cfg.aux_loss_alpha = alpha
        moe = make_moe(cfg, seed=7)
        moe.train()
        if n_micro is not None:
            MoEStepState([moe]).begin_step(n_micro)
        out = moe(x)
        upstream = torch.zeros_like(out) if zero_out else torch.ones_like(out)
        (out * upstream).sum().backward()
        return moe.gate.weight.grad.clone()

    g1 = router_grad(1, 0.1, zero_out=True)
    g3 = router_grad(3, 0.1, zero_out=True)  # gradient 1/3 per micro-batch: the global-batch mean
    assert g1.abs().sum() > 0, "aux loss gradient did not reach the router weight"
    torch.testing.assert_close(3 * g3, g1, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(router_grad(None, 0.1, zero_out=True), g1)  # a bare layer: scale 1
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
    g_off = router_grad(1, 0.0, zero_out=False)
    g_on = router_grad(1, 0.1, zero_out=False)
    torch.testing.assert_close(g_on - g_off, g1, rtol=1e-4, atol=1e-7)
