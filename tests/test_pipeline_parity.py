"""Pipeline parallelism: fp32 parity with the single-process run, for every schedule and composition.

The model is the parity suite's small DeepSeek-V3 shape with 4 layers (layer 0 dense, 1-3 MoE),
MTP depth 1, aux-loss-free bias updates and the sequence-wise balance loss on; each step runs 4
micro-batches (the pipeline's micro-batches) of 4 sequences summed over data-parallel ranks.
Step by step the loss, MTP loss, aux loss and gradient norm must match the single-process run,
and so must the final parameters and router biases of every stage (assert_parity).
The aux-loss gradient moves the router weights by ~1e-2 over these 5 steps, 400x the parameter
tolerance, so a schedule that dropped it (e.g. in a split input/weight backward) would fail.

Several layouts of the same world size run one after another in one set of processes (one spawn,
one import of torch, one tokenizer load), each with a fresh Trainer, mesh and pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks
from tests.parity_worker import REPO, train_and_report
from tests.test_parallel_parity import STEPS, assert_parity, overrides

pytestmark = pytest.mark.multirank

MICRO_GLOBAL = 4
GRAD_ACCUM = 4


def pp_overrides(run_dir, cache_dir, dp: int, **extra) -> list[str]:
    return overrides(run_dir, cache_dir, dp=dp, **{
        "model.num_hidden_layers": 4, "train.grad_accum_steps": GRAD_ACCUM,
        "train.micro_batch_size": MICRO_GLOBAL // dp, "parallel.data_parallel": "zero1", **extra,
    })


def train_layouts(rank: int, runs: list[list[str]]) -> list[dict]:
    """train_and_report for several configs in one process group (same world size)."""
    from parallel.mesh import init_distributed
    from parallel.state import full_state_dict
    from train.config import load_config
    from train.trainer import Trainer

    results = []
    try:
        for run in runs:
            cfg = load_config(REPO / "configs" / "tiny.yaml", run)
            ctx = init_distributed(cfg.parallel, cfg.model)
            trainer = Trainer(cfg, ctx)
            history = trainer.fit()
            state = full_state_dict(trainer.model, ctx)
            keys = ("loss", "mtp_loss", "aux_loss", "grad_norm")
            results.append({"metrics": {k: [float(h[k]) for h in history] for k in keys}, "state": state})
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pp_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    return run_ranks(1, train_and_report, pp_overrides(tmp_path_factory.mktemp("single"), cache_dir, dp=1))[0]


# name -> (dp, parallel overrides); all of world size 2 (pp=2) run in one spawn.
SCHEDULE_LAYOUTS = {
    "gpipe": {"parallel.pipeline_schedule": "GPipe"},
    "1f1b": {"parallel.pipeline_schedule": "1F1B"},
    "interleaved_1f1b": {"parallel.pipeline_schedule": "Interleaved1F1B"},  # 4 stages, 1 layer each
    "interleaved_zero_bubble": {"parallel.pipeline_schedule": "InterleavedZeroBubble"},
    "zbv_zero_bubble": {"parallel.pipeline_schedule": "ZBVZeroBubble"},  # V: stages 0 and 3 on rank 0
    "dualpipev": {"parallel.pipeline_schedule": "DualPipeV"},
    # Splits: stage 0 = embedding + the dense layer only; then the last stage = head + MTP only.
    "uneven_dense_only_stage": {"parallel.pipeline_layers_per_stage": "[1,3]"},
    "mtp_own_stage": {"parallel.pipeline_mtp_stage": "true", "parallel.pipeline_schedule": "GPipe"},
}


@pytest.fixture(scope="module")
def pp2_results(tmp_path_factory, cache_dir):
    runs = [
        pp_overrides(tmp_path_factory.mktemp(name), cache_dir, dp=1, **{"parallel.pp": 2, **extra})
        for name, extra in SCHEDULE_LAYOUTS.items()
    ]
    per_rank = run_ranks(2, train_layouts, runs)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(SCHEDULE_LAYOUTS)}


@pytest.mark.parametrize("layout", list(SCHEDULE_LAYOUTS))
def test_pp2_matches_single_process(layout, pp2_results, reference):
    for rank, got in enumerate(pp2_results[layout]):
        assert_parity(reference, got, f"pp2 {layout} rank {rank}")


# world size 4: pp=2 composed with expert and data parallelism, and a 4-stage pipeline.
WORLD4_LAYOUTS = {
    "pp2_ep2_zero1": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.ep": 2}),
    "pp2_ep2_fsdp": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}),
    "pp2_dp2_fsdp": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "fsdp"}),
    "pp2_dp2_fsdp_interleaved": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "fsdp",
                                     "parallel.pipeline_schedule": "Interleaved1F1B"}),
    "pp2_dp2_fsdp_zero_bubble": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "fsdp",
                                     "parallel.pipeline_schedule": "InterleavedZeroBubble"}),
    # V placement under FSDP2: the last stage's private embedding copy (same rank as the first stage).
    "pp2_dp2_fsdp_dualpipev": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.data_parallel": "fsdp",
                                   "parallel.pipeline_schedule": "DualPipeV"}),
    "pp2_dp2_zero1_dualpipev": (2, {"parallel.pp": 2, "parallel.dp_shard": 2, "parallel.pipeline_schedule": "DualPipeV"}),
    "pp4_1f1b": (1, {"parallel.pp": 4}),  # tied embedding copies on ranks 0 and 3
    "pp2_tp2": (1, {"parallel.pp": 2, "parallel.tp": 2, "parallel.data_parallel": "fsdp"}),
}


@pytest.fixture(scope="module")
def world4_results(tmp_path_factory, cache_dir):
    runs = [
        pp_overrides(tmp_path_factory.mktemp(name), cache_dir, dp=dp, **extra)
        for name, (dp, extra) in WORLD4_LAYOUTS.items()
    ]
    per_rank = run_ranks(4, train_layouts, runs)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(WORLD4_LAYOUTS)}


@pytest.mark.parametrize("layout", list(WORLD4_LAYOUTS))
def test_pp_composed_matches_single_process(layout, world4_results, reference):
    for rank, got in enumerate(world4_results[layout]):
        assert_parity(reference, got, f"{layout} rank {rank}")


@pytest.mark.slow
def test_pp2_ep2_dp2_eight_ranks(reference, tmp_path, cache_dir):
    """PP=2 x EP=2 x DP=2 (dp_shard=4 = edp 2 x ep 2), FSDP2, 1F1B."""
    extra = {"parallel.pp": 2, "parallel.dp_shard": 4, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}
    results = run_ranks(8, train_and_report, pp_overrides(tmp_path, cache_dir, dp=4, **extra))
    for rank, got in enumerate(results):
        assert_parity(reference, got, f"pp2_ep2_dp2 rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("world,dp,extra", [
    (2, 1, {}),  # ZeRO-1 optimizer state by name
    (4, 2, {"parallel.dp_shard": 2, "parallel.data_parallel": "fsdp"}),  # FSDP2-sharded stages
], ids=["pp2_zero1", "pp2_dp2_fsdp"])
def test_checkpoint_saved_under_pp2_resumes_under_pp1(world, dp, extra, reference, tmp_path, cache_dir):
    """A pp=2 checkpoint (each stage saves its own parameters by FQN) resumes in one process."""
    run_dir = tmp_path / "run"
    # The whole 5-step run under pp=2 (same lr schedule), checkpointing only at step 3.
    first = pp_overrides(run_dir, cache_dir, dp=dp, **{"parallel.pp": 2, "checkpoint.interval": 3, **extra})
    assert_parity(reference, run_ranks(world, train_and_report, first)[0], "pp2 run")
    assert [p.name for p in (Path(run_dir) / "checkpoints").iterdir()] == ["step_00000003"]
    resumed = run_ranks(1, train_and_report, pp_overrides(run_dir, cache_dir, dp=1))[0]
    tail = {k: v[3:] for k, v in reference["metrics"].items()}
    assert_parity({"metrics": tail, "state": reference["state"]}, resumed, "pp2 -> pp1 resume")


@pytest.mark.slow
def test_checkpoint_saved_under_pp1_resumes_under_pp2_dualpipev(reference, tmp_path, cache_dir):
    """The other direction, into a V-placed pipeline (rank 0 holds layers 0 and 3, and the head)."""
    run_dir = tmp_path / "run"
    run_ranks(1, train_and_report, pp_overrides(run_dir, cache_dir, dp=1, **{"checkpoint.interval": 3}))
    extra = {"parallel.pp": 2, "parallel.pipeline_schedule": "DualPipeV"}
    tail = {k: v[3:] for k, v in reference["metrics"].items()}
    for rank, got in enumerate(run_ranks(2, train_and_report, pp_overrides(run_dir, cache_dir, dp=1, **extra))):
        assert_parity({"metrics": tail, "state": reference["state"]}, got, f"pp1 -> pp2 resume rank {rank}")


# DeepSeek-V2 routing: softmax scores, group-limited greedy, expert + device + communication balance
# losses (all reaching the router through attach_aux_loss), token dropping, no bias updates.
V2_ROUTING = {"model.scoring_func": "softmax", "model.topk_method": "group_limited_greedy",
              "model.bias_update_speed": 0.0, "model.device_aux_loss_alpha": 0.01,
              "model.comm_aux_loss_alpha": 0.01, "model.capacity_factor": 1.5}


@pytest.mark.slow
def test_v2_aux_losses_under_split_backward_schedule(tmp_path, cache_dir):
    """V2 aux losses reach the gradients under DualPipeV (V placement, split input/weight backward)."""
    ref = run_ranks(1, train_and_report, pp_overrides(tmp_path / "ref", cache_dir, dp=1, **V2_ROUTING))[0]
    extra = {**V2_ROUTING, "parallel.pp": 2, "parallel.pipeline_schedule": "DualPipeV"}
    for rank, got in enumerate(run_ranks(2, train_and_report, pp_overrides(tmp_path / "pp", cache_dir, dp=1, **extra))):
        assert_parity(ref, got, f"v2 routing dualpipev rank {rank}")


@pytest.mark.slow
def test_pp2_bf16_close_to_single_process(tmp_path, cache_dir):
    """bf16 (autocast, fp32 residual stream between stages): same losses within bf16 noise."""
    bf16 = {"train.precision": "bf16"}
    ref = run_ranks(1, train_and_report, pp_overrides(tmp_path / "ref", cache_dir, dp=1, **bf16))[0]
    got = run_ranks(2, train_and_report, pp_overrides(tmp_path / "pp", cache_dir, dp=1, **bf16, **{"parallel.pp": 2}))
    for key, rtol in (("loss", 1e-3), ("mtp_loss", 1e-3), ("aux_loss", 1e-2), ("grad_norm", 2e-2)):
        torch.testing.assert_close(torch.tensor(got[0]["metrics"][key]), torch.tensor(ref["metrics"][key]),
                                   rtol=rtol, atol=0, msg=lambda m: f"bf16 pp2 {key}: {m}")
