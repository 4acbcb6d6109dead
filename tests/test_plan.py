"""python -m train.plan: parameters, FLOPs, per-rank memory and a verdict, without allocating.

The DeepSeek-V3 checks recompute the per-rank figures by hand from the published shapes
(arXiv 2412.19437: hidden 7168, 128 heads, q/kv ranks 1536/512, 256 routed experts of width 2048,
top-8, 1 shared expert) under the published layout: 2048 GPUs, PP16 (DualPipeV) x EP64, ZeRO-1,
FP8, BF16 AdamW moments, micro-batches of one 4096-token sequence. The activation terms themselves are
checked against measured saved bytes in tests/test_plan_measured.py.
"""

from __future__ import annotations

import json

import pytest

from train.config import load_config
from train.plan import GiB, main, plan

H, HEADS, Q_RANK, KV_RANK, NOPE, ROPE, V = 7168, 128, 1536, 512, 128, 64, 128
EXPERTS, EXPERT_W, TOP_K = 256, 2048, 8
GPUS, PP, DP, EP = 2048, 16, 128, 64


def v3_moe_layer_params() -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of one DeepSeek-V3 MoE layer, by hand."""
    attn = (H * Q_RANK + Q_RANK                      # q_a_proj + q_a_layernorm
            + Q_RANK * HEADS * (NOPE + ROPE)           # q_b_proj
            + H * (KV_RANK + ROPE) + KV_RANK           # kv_a_proj_with_mqa + kv_a_layernorm
            + KV_RANK * HEADS * (NOPE + V)             # kv_b_proj
            + HEADS * V * H)                           # o_proj
    dense = attn + 2 * H + EXPERTS * H + 3 * H * EXPERT_W  # 2 norms, router, shared expert
    return dense, EXPERTS * 3 * H * EXPERT_W


@pytest.fixture(scope="module")
def v3(repo_root):
    cfg = load_config(repo_root / "configs" / "deepseek_v3_671b.yaml")
    return cfg, plan(cfg, GPUS, 80, recompute="none"), plan(cfg, GPUS, 80, recompute="full")


def test_v3_published_layout_is_valid(v3):
    cfg, p, _ = v3
    assert p["errors"] == []
    assert p["gpus"] == GPUS and p["layout"]["pp"] == PP and p["layout"]["ep"] == EP
    assert p["layout"]["edp"] == DP // EP == 2 and p["layout"]["data_parallel"] == "zero1"
    assert 660e9 < p["params_total_no_mtp"] < 680e9 and 36e9 < p["params_active_no_mtp"] < 38e9
    # DualPipeV: 2 x 16 stages for 61 layers (2 each, the last three 1), V placement.
    assert p["memory"]["layers_per_stage"] == [2] * 29 + [1] * 3
    assert len(p["memory"]["ranks"]) == PP


def test_v3_per_rank_memory_matches_hand_computation(v3):
    cfg, p, full = v3
    dense, experts = v3_moe_layer_params()
    # Rank 3 holds stages 3 and 28: layers 6, 7, 56, 57, all MoE.
    r3 = p["memory"]["ranks"][3]
    assert r3["units"] == ["layer 6", "layer 7", "layer 56", "layer 57"]
    params = 4 * (dense + experts / EP)  # experts split over EP64, the rest whole (no TP)
    assert r3["params"] == pytest.approx(params, rel=1e-3)
    # ZeRO-1: fp32 weights and gradients whole; fp32 master + bf16 AdamW moments (4 + 2 x 2 bytes) sharded
    # over the 128 data-parallel ranks (dense) / the 2 expert-data-parallel ranks (experts).
    assert r3["weights"] * GiB == pytest.approx(4 * params, rel=1e-3)  # 6.1 GiB
    assert r3["grads"] == r3["weights"]
    optimizer = 8 * 4 * (dense / DP + experts / EP / (DP // EP))
    assert r3["optimizer"] * GiB == pytest.approx(optimizer, rel=1e-3)  # 2.7 GiB
    assert 6.0 < r3["weights"] < 6.2 and 2.6 < r3["optimizer"] < 2.8
    # FP8 weights: one E4M3 copy (+ a scale per 128 x 128 block) per step, shared by the 17 micro-batches.
    assert r3["compute_copies"] * GiB == pytest.approx(params * (1 + 4 / 128**2), rel=0.01)  # all but norms, router

    # Activations: DualPipeV keeps 2 PP - r micro-batches of rank r's first stage (3: layers 6, 7) and r + 1 of
    # its second (28: layers 56, 57), torch's schedule replayed below: 2 x (29 + 4) layer-micro-batches.
    assert r3["in_flight_per_stage"] == {3: 2 * PP - 3, 28: 4}
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    layer_mbs = 2 * (2 * PP - 3) + 2 * 4
    per_layer_token = r3["activations"] * GiB / (tokens * layer_mbs)
    # The big terms by hand: the attention core's q, k, v and output in bf16 (v and the output padded to
    # d_qk = 192, as flash-attn and CPU SDPA run it) and, for each of the 8 routed experts, its FP8 input
    # (+ 1x128 scales), bf16 gate/up output and FP8 down input (no expert output: gated on the expert side).
    sdpa = 2 * HEADS * 4 * (NOPE + ROPE)
    routed = TOP_K * (H + 4 * H // 128 + 2 * EXPERT_W * 2 + EXPERT_W + 4 * EXPERT_W // 128)
    assert 1.0 < per_layer_token / (sdpa + routed) < 1.8, per_layer_token  # 1.67: norms, shared experts, MLA
    assert 100 < r3["activations"] < 200  # ~142 GiB: why the published layout needs recomputation
    # With full recomputation a MoE block keeps its fp32 input and, split at the dispatcher (no collective is
    # ever rerun), its post-attention residual (4H each) and the rows dispatch moved (k rows of H FP8 values +
    # 1x128 fp32 scales: FP8 dispatch), plus the router's and the row gates' small tensors (~11 KB a token:
    # 10% of the rest).
    f3 = full["memory"]["ranks"][3]
    kept = (2 * 4 * H + TOP_K * (H + 4 * H // 128)) * tokens * layer_mbs
    assert kept < f3["activations"] * GiB < 1.1 * kept + 1.6 * (sdpa + routed) * tokens


def test_v3_verdict_for_80gb(v3, repo_root, capsys):
    cfg, p, full = v3
    preset = plan(cfg, GPUS, 80)  # the preset's own train.recompute: DeepSeek's selective modules
    assert preset["layout"]["recompute"] == "selective (layernorm, mla_up_proj, moe_act)"
    totals = [r["memory"]["per_rank_gb"]["total"] for r in (p, preset, full)]
    acts = [r["memory"]["ranks"][3]["activations"] for r in (p, preset, full)]
    # On a rank of four MoE layers: 142.1 > 68.0 > 32.1 GiB (full keeps the FP8 dispatched rows and the block
    # inputs outside its regions); the busiest ranks order none > selective > full.
    assert acts[0] > acts[1] > acts[2] and totals[0] > totals[1] > totals[2]
    # The honest verdict with what the report describes: DeepSeek's three modules do not fit 80 GB (117.4 GiB;
    # 135.6 with the expert outputs combine kept and 17 x 4 layer-micro-batches; 154.6 before moe_act's FP8
    # SwiGLU input), nor does recompute none (173.2); full recomputation does (55.2). The busiest rank is rank 0
    # (embedding, first and last stage, output head and MTP: the V places both ends of the model on rank 0,
    # and 32 micro-batches of its first stage, the dense layers).
    for r in (p, preset):
        assert r["memory"]["verdict"] == "does not fit" and not r["memory"]["fits"]
    assert full["memory"]["fits"]
    for r in (p, preset, full):
        mem = r["memory"]
        assert mem["worst_rank"] == 0 and {"head", "mtp 1", "embedding"} <= set(mem["per_rank_gb"]["units"])
    assert 110 < totals[1] < 125 and 50 < totals[2] < 60
    # The fused head + CE keeps no logits, but each head's fp32 weight gradient (main + MTP) for its micro-batch.
    assert preset["memory"]["per_rank_gb"]["buffers"] * GiB > 2 * 129280 * H * 4
    # What is still too large is named: the dispatched FP8 rows lead the activation terms.
    main(["--config", str(repo_root / "configs" / "deepseek_v3_671b.yaml"), "--gpus", str(GPUS)])
    out = capsys.readouterr().out
    assert "does not fit" in out and "largest activation terms" in out
    assert "moe: routed rows (grouped GEMM input)" in out and "routed outputs (combine)" not in out
    assert "32 micro-batches of stage 0 + 1 of stage 31 in flight" in out
    # Recomputing also the dense MLPs, the shared experts and the attention core fits: 68.7 GiB.
    six = plan(load_config(repo_root / "configs" / "deepseek_v3_671b.yaml", [
        "train.recompute_modules=[layernorm,mla_up_proj,moe_act,mlp,shared_experts,core_attn]"]), GPUS, 80)
    assert six["layout"]["recompute"] == ("selective (core_attn, layernorm, mla_up_proj, mlp, moe_act, "
                                          "shared_experts)")
    assert six["memory"]["fits"] and 65 < six["memory"]["per_rank_gb"]["total"] < 72


def test_cli_json_and_exit_codes(repo_root, capsys):
    assert main(["--config", str(repo_root / "configs" / "deepseek_v3_4b_a1b.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "flops_per_token", "memory", "warnings", "errors"):
        assert key in out
    assert 3.5e9 < out["params_total"] < 4e9 and 0.9e9 < out["params_active_no_mtp"] < 1.1e9  # ~1B active
    assert out["memory"]["fits"] and out["memory"]["gpu_mem_gb"] == 80
    # Wrong GPU count: exit 2, the error names the key and a layout that would fit.
    code = main(["--config", str(repo_root / "configs" / "deepseek_v3_16b.yaml"), "--gpus", "16"])
    assert code == 2
    captured = capsys.readouterr()
    assert "there are 16 GPUs" in captured.err and "parallel.dp_shard=16" in captured.err
    # A bad override: config error, exit 2.
    assert main(["--config", str(repo_root / "configs" / "tiny.yaml"), "parallel.ep=3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err


def test_shipped_mid_size_configs_fit_their_hardware(repo_root):
    p16 = plan(load_config(repo_root / "configs" / "deepseek_v3_16b.yaml"), 8, 80)
    assert p16["errors"] == [] and p16["memory"]["fits"], p16["memory"]["per_rank_gb"]
    assert 15e9 < p16["params_total"] < 17.5e9
    p4 = plan(load_config(repo_root / "configs" / "deepseek_v3_4b_a1b.yaml"), 1, 80)
    assert p4["errors"] == [] and p4["memory"]["fits"]
    assert not plan(load_config(repo_root / "configs" / "deepseek_v3_4b_a1b.yaml"), 1, 40)["memory"]["fits"]


def test_sharding_arithmetic_on_a_small_model(repo_root):
    """fsdp divides weights, grads and optimizer by dp_shard (experts by dp_shard/ep); zero1 only the optimizer."""
    base = ["model.n_routed_experts=16", "train.precision=fp32"]
    tiny = repo_root / "configs" / "tiny.yaml"
    one = plan(load_config(tiny, base), 1)["memory"]["ranks"][0]
    fsdp = plan(load_config(tiny, base + ["parallel.dp_shard=4", "parallel.ep=2"]), 4)["memory"]["ranks"][0]
    zero = plan(load_config(tiny, base + ["parallel.dp_shard=4", "parallel.ep=2", "parallel.data_parallel=zero1"]),
                4)["memory"]["ranks"][0]
    assert fsdp["weights"] < one["weights"] / 2 and fsdp["optimizer"] < one["optimizer"] / 2
    assert zero["params"] == fsdp["params"]  # both split the experts over ep=2
    assert zero["weights"] == pytest.approx(4 * zero["params"] / GiB, rel=1e-3)
    assert zero["optimizer"] < fsdp["optimizer"] * 1.6  # 12 B / 4 (dense) vs 8 B / 4


def test_tp_activations_follow_sequence_parallelism(repo_root):
    """Under SP a tp rank keeps less than under plain TP but more than half of it (the column-parallel projections
    save their gathered full-sequence inputs; tests/test_plan_measured.py checks both against a TP2 rank), and
    the planner predicts its tp collectives; plain TP has no communication prediction."""
    tiny = repo_root / "configs" / "tiny.yaml"
    sp = plan(load_config(tiny, ["parallel.tp=2"]), 2)
    tp = plan(load_config(tiny, ["parallel.tp=2", "parallel.sequence_parallel=false"]), 2)
    sp_act, tp_act = sp["memory"]["ranks"][0]["activations"], tp["memory"]["ranks"][0]["activations"]
    assert tp_act / 2 < sp_act < tp_act
    assert "reduce_scatter/tp" in sp["comm"]["by"] and "comm" not in tp


def test_pipeline_placement_and_warnings(repo_root):
    tiny = repo_root / "configs" / "tiny.yaml"
    # 1F1B over 2 stages: the last stage keeps its own embedding copy for MTP; rank 0 holds 2 micro-batches.
    p = plan(load_config(tiny, ["parallel.pp=2", "train.grad_accum_steps=4"]), 2)
    r0, r1 = p["memory"]["ranks"]
    assert r0["units"] == ["embedding", "layer 0", "layer 1"]
    assert r1["units"] == ["layer 2", "layer 3", "head", "mtp 1", "embedding copy"]
    assert (r0["in_flight"], r1["in_flight"]) == (2, 1)
    # Expert groups straddling EP ranks defeat group-limited routing: a warning, not an error.
    p = plan(load_config(tiny, ["model.n_routed_experts=24", "model.n_group=4", "parallel.dp_shard=6",
                                "parallel.ep=6"]), 6)
    assert p["errors"] == [] and any("straddle" in w for w in p["warnings"])
    # Uneven stages are named.
    p = plan(load_config(tiny, ["model.num_hidden_layers=5", "parallel.pp=2", "train.grad_accum_steps=2"]), 2)
    assert any("uneven" in w for w in p["warnings"]) and p["memory"]["layers_per_stage"] == [3, 2]


def _replayed_peaks(schedule: str, pp: int, m: int, rank: int) -> list[dict[int, int]]:
    """Replay torch's own action list of a V-shaped schedule on one rank: micro-batches of each of its two
    stages alive (forward done, weight gradient or full backward not yet) -- the Pareto-maximal counts."""
    import types

    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, {"DualPipeV": "ScheduleDualPipeV", "ZBVZeroBubble": "ScheduleZBVZeroBubble"}[schedule])
    state = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp, n_local_stages=2)
    first, second = rank, 2 * pp - 1 - rank
    live: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()
    ct = schedules._ComputationType
    for action in cls._calculate_single_rank_operations(state, rank):
        for a in (action.sub_actions or (action,)) if action is not None else ():
            if a.computation_type == ct.FORWARD:
                live.add((a.stage_index, a.microbatch_index))
            elif a.computation_type in (ct.FULL_BACKWARD, ct.BACKWARD_WEIGHT):
                live.discard((a.stage_index, a.microbatch_index))
            seen.add((sum(s == first for s, _ in live), sum(s == second for s, _ in live)))
    top = [c for c in seen if not any(d != c and d[0] >= c[0] and d[1] >= c[1] for d in seen)]
    return sorted(({first: a, second: b} for a, b in top), key=lambda c: sorted(c.items()))


@pytest.mark.parametrize("schedule", ["DualPipeV", "ZBVZeroBubble"])
def test_v_schedule_in_flight_is_what_torch_schedules_keep(schedule, repo_root):
    from train.plan import v_stage_peaks

    for pp, m in ((2, 4), (4, 8), (4, 13), (16, 120)):
        for rank in range(pp):
            want = _replayed_peaks(schedule, pp, m, rank)
            got = sorted(v_stage_peaks(schedule, pp, m, rank), key=lambda c: sorted(c.items()))
            assert got == want, (schedule, pp, m, rank)
    # The plan weighs each stage's units by its own count: on 2 ranks, rank 0's first stage holds 4 micro-batches
    p = plan(load_config(repo_root / "configs" / "tiny.yaml", [
        "parallel.pp=2", f"parallel.pipeline_schedule={schedule}", "train.grad_accum_steps=8"]), 2)
    r0 = p["memory"]["ranks"][0]
    assert r0["in_flight_per_stage"] in [{int(k): v for k, v in c.items()} for c in v_stage_peaks(schedule, 2, 8, 0)]
