"""Router (models.router.Router) against a naive per-token reference written here.

V3: sigmoid scores, selection on s + b, group score = sum of the top-2 biased scores,
keep topk_group groups, top-k inside them, gates = s_sel / sum(s_sel) * routed_scaling_factor.
V2: softmax scores, group_limited_greedy (group score = max) or greedy, optional normalisation.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.config import ModelConfig
from models.router import Router
from tests.model_helpers import moe_cfg


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def router_cfg(**kw) -> ModelConfig:
    """16 experts top-4 in 4 groups (2 kept): the group limit matters."""
    return moe_cfg(**{"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
                      "norm_topk_prob": True, **kw})


def make_router(cfg: ModelConfig, seed: int = 0, bias_scale: float = 0.0) -> Router:
    torch.manual_seed(seed)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.normal_(std=0.5)
        if bias_scale:
            r.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * bias_scale)
    return r


def reference_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig):
    """Plain Python, one token at a time. Returns per token (kept groups, selected set, {expert: gate})."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    size = E // G
    w = weight.double().tolist()
    b = bias.double().tolist()
    results = []
    for row in x.double().tolist():
        logits = [sum(wi * xi for wi, xi in zip(w[e], row)) for e in range(E)]
        if cfg.scoring_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-l)) for l in logits]
        else:
            m = max(logits)
            ex = [math.exp(l - m) for l in logits]
            s = [v / sum(ex) for v in ex]
        uses_bias = cfg.topk_method == "noaux_tc"
        choice = [s[e] + b[e] for e in range(E)] if uses_bias else list(s)
        if G > 1 and cfg.topk_method != "greedy":
            gscore = []
            for g in range(G):
                vals = sorted(choice[g * size : (g + 1) * size], reverse=True)
                gscore.append(vals[0] + vals[1] if uses_bias else vals[0])
            kept = set(sorted(range(G), key=lambda g: -gscore[g])[: cfg.topk_group])
        else:
            kept = set(range(G))
        candidates = [e for e in range(E) if e // size in kept]
        sel = sorted(candidates, key=lambda e: -choice[e])[:K]
        gates = {e: s[e] for e in sel}
        if cfg.norm_topk_prob and (K > 1 or uses_bias):
            tot = sum(gates.values())
            gates = {e: v / tot for e, v in gates.items()}
        gates = {e: v * cfg.routed_scaling_factor for e, v in gates.items()}
        results.append((kept, set(sel), gates))
    return results


def check_against_reference(router: Router, cfg: ModelConfig, x: torch.Tensor):
    out = router(x)
    ref = reference_route(x, router.weight.detach(), router.e_score_correction_bias, cfg)
    size = cfg.n_routed_experts // cfg.n_group
    for t, (kept, sel, gates) in enumerate(ref):
        ids = out.topk_idx[t].tolist()
        assert len(set(ids)) == cfg.num_experts_per_tok, "duplicate experts for one token"
        assert set(ids) == sel, f"token {t}: selected {sorted(ids)} != reference {sorted(sel)}"
        assert all(e // size in kept for e in ids), f"token {t}: expert outside the kept groups"
        for e, g in zip(ids, out.topk_weight[t].tolist()):
            assert g == pytest.approx(gates[e], rel=1e-5, abs=1e-6), f"token {t} expert {e}"
    return out


def test_v3_sigmoid_noaux_tc_group_limited_matches_reference():
    cfg = router_cfg()
    router = make_router(cfg, seed=1, bias_scale=0.3)
    x = torch.randn(48, cfg.hidden_size)
    out = check_against_reference(router, cfg, x)
    assert torch.allclose(out.scores, torch.sigmoid(x @ router.weight.detach().T), atol=1e-6)
    # normalised gates sum to routed_scaling_factor
    torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((48,), 2.5), rtol=1e-5, atol=1e-5)
    # at most topk_group distinct groups per token
    groups = out.topk_idx // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(g)) <= cfg.topk_group for g in groups.tolist())
    assert out.keep is None


def test_v3_group_limit_is_active():
    """Without the group limit some tokens would pick experts in dropped groups."""
    cfg = router_cfg()
    router = make_router(cfg, seed=2)
    x = torch.randn(64, cfg.hidden_size)
    limited = router(x).topk_idx
    free = router.weight.detach()
    global_top = torch.sigmoid(x @ free.T).topk(cfg.num_experts_per_tok, dim=-1).indices
    differs = [set(a) != set(b) for a, b in zip(limited.tolist(), global_top.tolist())]
    assert any(differs), "group limiting never changed a selection: test is not exercising it"


def test_v3_bias_changes_selection_not_gate_values():
    cfg = router_cfg(n_group=1, topk_group=1)
    router = make_router(cfg, seed=3)
    x = torch.randn(64, cfg.hidden_size)
    before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    after = check_against_reference(router, cfg, x)
    changed = [set(a) != set(b) for a, b in zip(before.topk_idx.tolist(), after.topk_idx.tolist())]
    assert any(changed), "a large bias must change some selections"
    # gates are always the unbiased scores of the selected experts, normalised and scaled
    s = torch.sigmoid(x @ router.weight.detach().T)
    sel = s.gather(1, after.topk_idx)
    torch.testing.assert_close(after.topk_weight, sel / sel.sum(-1, keepdim=True) * 2.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.scores, s, rtol=1e-5, atol=1e-6)


def test_bias_boost_forces_an_expert():
    cfg = router_cfg(n_group=1, topk_group=1)
    router = make_router(cfg, seed=4)
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0
    out = router(torch.randn(32, cfg.hidden_size))
    assert (out.topk_idx == 5).any(dim=-1).all()


@pytest.mark.parametrize("norm", [True, False])
def test_v3_norm_topk_prob_on_off(norm):
    cfg = router_cfg(norm_topk_prob=norm)
    router = make_router(cfg, seed=5, bias_scale=0.2)
    x = torch.randn(32, cfg.hidden_size)
    out = check_against_reference(router, cfg, x)
    if not norm:
        torch.testing.assert_close(out.topk_weight, out.scores.gather(1, out.topk_idx) * 2.5)


def test_v3_top1_normalised_gate_is_scaling_factor():
    """HF DeepseekV3 normalises even a single selected expert (gate = routed_scaling_factor)."""
    cfg = router_cfg(num_experts_per_tok=1, n_group=1, topk_group=1)
    router = make_router(cfg, seed=6)
    out = check_against_reference(router, cfg, torch.randn(8, cfg.hidden_size))
    torch.testing.assert_close(out.topk_weight, torch.full((8, 1), 2.5))


@pytest.mark.parametrize("norm", [False, True])
def test_v2_softmax_group_limited_greedy_matches_reference(norm):
    cfg = router_cfg(
        scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=norm, routed_scaling_factor=1.5,
        num_experts_per_tok=3,
    )
    router = make_router(cfg, seed=7, bias_scale=0.5)  # bias must be ignored outside noaux_tc
    x = torch.randn(48, cfg.hidden_size)
    out = check_against_reference(router, cfg, x)
    torch.testing.assert_close(out.scores, torch.softmax(x @ router.weight.detach().T, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(48))
    if norm:
        torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((48,), 1.5))
    else:
        torch.testing.assert_close(out.topk_weight, out.scores.gather(1, out.topk_idx) * 1.5)


def test_v2_greedy_ignores_groups():
    cfg = router_cfg(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0)
    router = make_router(cfg, seed=8, bias_scale=0.5)
    x = torch.randn(48, cfg.hidden_size)
    out = check_against_reference(router, cfg, x)
    top = torch.softmax(x @ router.weight.detach().T, -1).topk(cfg.num_experts_per_tok, -1).indices
    assert [set(a) for a in out.topk_idx.tolist()] == [set(b) for b in top.tolist()]
    groups = out.topk_idx // (cfg.n_routed_experts // cfg.n_group)
    assert any(len(set(g)) > cfg.topk_group for g in groups.tolist()), "greedy should cross group limits"


def test_router_gates_carry_gradient_to_weight():
    cfg = router_cfg()
    router = make_router(cfg, seed=9)
    out = router(torch.randn(16, cfg.hidden_size))
    (out.topk_weight * torch.randn_like(out.topk_weight)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not router.e_score_correction_bias.requires_grad
