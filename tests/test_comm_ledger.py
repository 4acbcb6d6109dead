"""The communication ledger (parallel/comm_ledger.py) against the planner's prediction (train/plan_comm.py).

Two ranks train 2 steps of the small model as EP2 over FSDP2 (dp_shard = ep = 2: FSDP2's
all-gathers and reduce-scatters of the dense blocks and the root, counted through FSDP2's
custom-collective seam, and the deduplicated all-to-all), as EP2 over ZeRO-1 (its gradient
all-reduce and parameter all-gathers) and as TP2 with sequence parallelism (its all-gathers and
reduce-scatters along the sequence and its sums over tp). Every rank's `comm` of every step must equal the
prediction key by key, calls and bytes, except the routed tokens' all-to-all bytes, which depend
on the routing: their mean over the ranks lies within the predicted bounds and within 15% of the
uniform-routing expectation. metrics.jsonl carries the same `comm` object.
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
from train.plan_comm import expected_ranks_per_token, predict_comm

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "ep2_fsdp": {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp"},
    "ep2_zero1": {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "zero1"},
    # sequence parallelism's all-gathers / reduce-scatters / sums over tp; batch-wise balance statistics
    # (seq_aux per document would make their size depend on the documents in the batch)
    "tp2_sp": {"parallel.tp": 2, "model.seq_aux": "false", "model.aux_loss_alpha": 0.01},
}


def train_comm(rank: int, overrides: list[str]) -> dict:
    from parallel.mesh import init_distributed
    from train.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    ctx = init_distributed(cfg.parallel, cfg.model)
    try:
        history = Trainer(cfg, ctx).fit()
    finally:
        torch.distributed.destroy_process_group()
    logged = []
    if rank == 0:
        logged = [json.loads(line)["comm"] for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    return {"comm": [json.dumps(h["comm"]) for h in history], "logged": [json.dumps(c) for c in logged]}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ledger_matches_prediction(layout, tmp_path):
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache", **{
        "train.steps": 2, "train.micro_batch_size": 2, "train.grad_accum_steps": 2, "train.threads": 1,
        "checkpoint.at_end": "false", **LAYOUTS[layout]})
    predicted = predict_comm(load_config(REPO / "configs" / "tiny.yaml", overrides))["by"]
    results = run_ranks(2, train_comm, overrides)
    steps = [[json.loads(c) for c in r["comm"]] for r in results]
    assert [json.loads(c) for c in results[0]["logged"]] == steps[0]
    routed = "all_to_all/ep" if "all_to_all/ep" in predicted else None
    assert routed or "reduce_scatter/tp" in predicted
    assert any(k.startswith(("reduce_scatter/", "all_reduce/dp")) for k in predicted)
    for step in range(2):
        for rank in range(2):
            got = steps[rank][step]["by"]
            assert got.keys() == predicted.keys(), (layout, rank, step, got.keys(), predicted.keys())
            for key, want in predicted.items():
                assert got[key]["calls"] == want["calls"], (layout, key, got[key], want)
                if key != routed:
                    assert got[key]["bytes"] == want["bytes"], (layout, key, got[key], want)
        if routed is None:
            continue
        want = predicted["all_to_all/ep"]
        mean = sum(steps[r][step]["by"]["all_to_all/ep"]["bytes"] for r in range(2)) / 2
        assert want["bytes_min"] <= mean <= want["bytes_max"], (mean, want)
        assert abs(mean / want["bytes"] - 1) < 0.15, (mean, want)


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
