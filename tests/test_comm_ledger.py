"""The communication ledger (parallel/comm_ledger.py) against the planner's prediction (train/plan_comm.py).

Two ranks train 2 steps of the small model as EP2 over FSDP2 (dp_shard = ep = 2: FSDP2's
all-gathers and reduce-scatters of the dense blocks and the root, counted through FSDP2's
custom-collective seam, and the deduplicated all-to-all), as EP2 over ZeRO-1 (its gradient
all-reduce and parameter all-gathers), as TP2 with sequence parallelism (its all-gathers and
reduce-scatters along the sequence and its sums over tp), and four ranks as node-limited EP4 on
2 "nodes" x 2 ranks (the hierarchical dispatch's inter-node and intra-node all-to-alls, under their
own group names), two ranks as a pipeline under 1F1B, Interleaved1F1B and ZBVZeroBubble (the
activations and gradients sent and received per stage boundary, kinds send / recv over pp; each
pipeline rank has its own prediction), and four ranks as HSDP 2 x 2 with EP2 (FSDP2's all-reduce
over dp_replicate) and as PP2 x DP2 over ZeRO-1 (1F1B) and over FSDP2 (DualPipeV, bf16). Every
rank's `comm` of every step must equal the prediction key by key, calls and bytes, except the
routed tokens' all-to-all bytes, which depend on the routing: their mean over the ranks lies within
the predicted bounds and within 15% of the uniform-routing expectation, and equals the planner's
figure for the (token, rank) pairs the dispatches counted exactly. EP2 over FSDP2 under FP8
dispatches FP8 rows (E4M3 + tile scales).
metrics.jsonl carries the same `comm` object.
"""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest
import torch

from parallel.comm_ledger import CommLedger
from tests.distributed import run_ranks
from tests.trainer_helpers import small_overrides
from train.config import load_config
from models.accounting import build_meta_model
from train.plan_comm import expected_ranks_per_token, fp8_dispatch_layers, predict_comm, routed_all_to_all_bytes

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name -> (ranks, overrides)
    "ep2_fsdp": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}),
    "ep2_zero1": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "zero1"}),
    "ep2_fsdp_fp8": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp",
                         "train.precision": "fp8"}),
    # 2 "nodes" x 2 ranks: the hierarchical dispatch's inter-node (ep_inter) and intra-node (ep_intra) exchanges
    "ep4_2nodes": (4, {"parallel.dp_shard": 4, "parallel.ep": 4, "parallel.ep_ranks_per_node": 2}),
    # sequence parallelism's all-gathers / reduce-scatters / sums over tp; batch-wise balance statistics
    # (seq_aux per document would make their size depend on the documents in the batch)
    "tp2_sp": (2, {"parallel.tp": 2, "model.seq_aux": "false", "model.aux_loss_alpha": 0.01}),
    # the pipeline's activations / gradients per stage boundary, its sums, the tied embedding and load gather
    "pp2_1f1b": (2, {"parallel.pp": 2}),
    # a V (stages 0 and 3 on rank 0, 1 and 2 on rank 1: the 1 -> 2 boundary passes tensors without p2p)
    "pp2_zbv": (2, {"parallel.pp": 2, "parallel.pipeline_schedule": "ZBVZeroBubble", "model.num_hidden_layers": 4,
                    "train.grad_accum_steps": 4, "train.micro_batch_size": 1}),
    # a loop (stages 0, 2 on rank 0; 1, 3 on rank 1: every boundary between ranks)
    "pp2_interleaved": (2, {"parallel.pp": 2, "parallel.pipeline_schedule": "Interleaved1F1B",
                            "model.num_hidden_layers": 4, "train.grad_accum_steps": 4, "train.micro_batch_size": 1}),
    # the pipeline over data parallelism (pp x dp_shard: ranks 0, 1 are pipeline rank 0, ranks 2, 3 rank 1):
    # ZeRO-1 under 1F1B (the tied embedding's sum), FSDP2 under bf16 and DualPipeV (bf16 activations, each
    # stage module a root reducing once per step, the last stage's private embedding copy on rank 0)
    "pp2_dp2_zero1": (4, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "zero1"}),
    "pp2_dp2_fsdp_bf16_dualpipev": (4, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "fsdp",
                                        "train.precision": "bf16", "parallel.pipeline_schedule": "DualPipeV",
                                        "model.num_hidden_layers": 4, "train.grad_accum_steps": 4,
                                        "train.micro_batch_size": 1}),
    # HSDP: FSDP2's own all-reduce of every reduce-scatter output over dp_replicate (the experts' too, whose
    # shard group edp = dp_shard / ep has one rank), with EP2's dispatch inside each replica
    "hsdp_ep2": (4, {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.ep": 2,
                     "parallel.data_parallel": "fsdp"}),
}
FOCUS = {  # layout -> entries it exists to check (besides the routed all-to-all)
    "tp2_sp": ["reduce_scatter/tp"], "pp2_1f1b": ["send/pp", "recv/pp", "all_reduce/pp_tie", "all_gather/pp"],
    "pp2_zbv": ["send/pp", "recv/pp"], "pp2_interleaved": ["send/pp", "recv/pp"],
    "pp2_dp2_zero1": ["send/pp", "all_reduce/pp_tie", "all_reduce/dp", "all_gather/dp"],
    "pp2_dp2_fsdp_bf16_dualpipev": ["send/pp", "reduce_scatter/dp_shard", "reduce_scatter/edp"],
    "hsdp_ep2": ["all_reduce/dp_replicate", "reduce_scatter/dp_shard"],
}


def train_comm(rank: int, overrides: list[str]) -> dict:
    import parallel.expert_parallel as ep
    from parallel.mesh import init_distributed
    from train.trainer import Trainer

    pairs: list[int] = []  # (token, rank) pairs this rank sent, per dispatch
    inner = ep.pairs_per_rank

    def counted(*args):
        out = inner(*args)
        pairs.append(out[1].numel())
        return out

    ep.pairs_per_rank = counted
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    ctx = init_distributed(cfg.parallel, cfg.model)
    try:
        history = Trainer(cfg, ctx).fit()
    finally:
        torch.distributed.destroy_process_group()
    logged = []
    if rank == 0:
        logged = [json.loads(line)["comm"] for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    return {"comm": [json.dumps(h["comm"]) for h in history], "logged": [json.dumps(c) for c in logged],
            "pairs": pairs}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ledger_matches_prediction(layout, tmp_path):
    world, extra = LAYOUTS[layout]
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache", **{
        "train.steps": 2, "train.micro_batch_size": 2, "train.grad_accum_steps": 2, "train.threads": 1,
        "checkpoint.at_end": "false", **extra})
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    per_pp_rank = world // cfg.parallel.pp  # global rank r is pipeline rank r // per_pp_rank (mesh pp outermost)
    by_rank = [predict_comm(cfg, pp_rank=r // per_pp_rank)["by"] for r in range(world)]
    predicted = by_rank[0]
    fp8 = fp8_dispatch_layers(cfg, build_meta_model(cfg.model)) > 0
    assert fp8 == (layout == "ep2_fsdp_fp8")
    results = run_ranks(world, train_comm, overrides)
    steps = [[json.loads(c) for c in r["comm"]] for r in results]
    assert [json.loads(c) for c in results[0]["logged"]] == steps[0]
    if "parallel.ep_ranks_per_node" in extra:
        routed = ["all_to_all/ep_inter", "all_to_all/ep_intra"]
    else:
        routed = ["all_to_all/ep"] if "all_to_all/ep" in predicted else []
    assert all(any(k in b for b in by_rank) for k in routed + FOCUS.get(layout, [])) and (routed or layout in FOCUS)
    assert cfg.parallel.pp > 1 or any(k.startswith(("reduce_scatter/", "all_reduce/dp")) for k in predicted)
    for step in range(2):
        for rank in range(world):
            got, predicted = steps[rank][step]["by"], by_rank[rank]
            assert got.keys() == predicted.keys(), (layout, rank, step, got.keys(), predicted.keys())
            for key, want in predicted.items():
                assert got[key]["calls"] == want["calls"], (layout, key, got[key], want)
                if key not in routed:
                    assert got[key]["bytes"] == want["bytes"], (layout, key, got[key], want)
        for key in routed:
            want = by_rank[0][key]
            mean = sum(steps[r][step]["by"][key]["bytes"] for r in range(world)) / world
            assert want["bytes_min"] <= mean <= want["bytes_max"], (key, mean, want)
            assert abs(mean / want["bytes"] - 1) < 0.15, (key, mean, want)
        if routed == ["all_to_all/ep"]:  # flat EP: exact for the (token, rank) pairs the dispatches counted
            per_step = len(results[0]["pairs"]) // 2  # MoE layers x micro-batches
            sent = sum(sum(r["pairs"][step * per_step:(step + 1) * per_step]) for r in results) / world
            assert mean == routed_all_to_all_bytes(cfg, sent, sent if fp8 else 0), (layout, step, mean, sent)


def test_expected_ranks_per_token():
    """Uniform routing: one rank; K=2 of 8 experts on 2 ranks without groups; groups inside ranks."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.n_routed_experts=8", "model.num_experts_per_tok=2",
                                                       "model.n_group=1", "model.topk_group=1"]).model
    assert expected_ranks_per_token(cfg, 1) == pytest.approx(1.0)
    assert expected_ranks_per_token(cfg, 2) == pytest.approx(2 * (1 - comb(4, 2) / comb(8, 2)))
    # 4 groups of 2, 2 groups chosen, each rank holds 2 whole groups: both chosen groups sit on one
    # rank with probability 2/6 (1 rank); otherwise both experts land on one rank with probability 2/6.
    cfg.n_group, cfg.topk_group = 4, 2
    assert expected_ranks_per_token(cfg, 2) == pytest.approx(2 / 6 * 1 + 4 / 6 * (2 / 6 * 1 + 4 / 6 * 2))


def test_ledger_sums_per_kind_and_group():
    ledger = CommLedger()
    ledger.record("all_reduce", "dp", None, 8)
    ledger.record("all_reduce", "dp", None, 16)
    ledger.record("all_to_all", "ep", None, 100, calls=3)
    assert ledger.summary() == {"calls": 5, "bytes": 124, "by": {
        "all_reduce/dp": {"calls": 2, "bytes": 24}, "all_to_all/ep": {"calls": 3, "bytes": 100}}}
    ledger.reset()
    assert ledger.summary() == {"calls": 0, "bytes": 0, "by": {}}


def test_comm_reaches_charts_and_console(tmp_path):
    from train.metrics import MetricsLogger

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={tmp_path}"])
    logger = MetricsLogger(cfg, tmp_path, True, 1)
    comm = {"calls": 3, "bytes": 3 * 2**20, "by": {"all_to_all/ep": {"calls": 3, "bytes": 3 * 2**20, "wait_s": 0.1}}}
    metrics = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0, "comm": comm}
    scalars = logger._scalars(metrics, None)
    assert scalars["comm/bytes"] == 3 * 2**20 and scalars["comm/calls/all_to_all/ep"] == 3
    assert "comm 3.00 MiB/3 calls" in logger._line(1, metrics)
    logger.close()


def test_plan_reports_every_pipeline_rank():
    """`plan --json` gives a pipeline's prediction per pipeline rank; under a V every rank owns two boundaries."""
    from train.plan import plan

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["parallel.pp=2", "parallel.pipeline_schedule=ZBVZeroBubble",
                                                       "train.grad_accum_steps=4"])
    out = plan(cfg, 2)
    assert out["comm_by_pp_rank"] == [predict_comm(cfg, r) for r in range(2)]
    assert out["comm"] == out["comm_by_pp_rank"][0]
    act = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.hidden_size * 4
    for r in range(2):
        by = out["comm_by_pp_rank"][r]["by"]
        assert by["send/pp"] == by["recv/pp"] == {"calls": 2 * 4, "bytes": 2 * 4 * act}
