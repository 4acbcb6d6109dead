"""Parity of distributed layouts with the single-process run (fp32, same seed and data).

Each layout trains the same small DeepSeek-V3-shaped model (MLA, 8 routed experts,
group-limited routing, MTP on, aux-loss-free balancing and the sequence-wise loss on)
for 5 optimizer steps on the same global batches. Step by step the loss, MTP loss,
aux loss and gradient norm must match the single-process run (rtol 1e-5 for losses),
and so must the final parameters and router biases.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.trainer_helpers import small_overrides

STEPS = 5
MICRO_GLOBAL = 4  # sequences per micro-batch summed over data-parallel ranks
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity_cache")


def overrides(run_dir, cache_dir, dp: int, **extra) -> list[str]:
    return small_overrides(
        run_dir, cache_dir,
        **{"train.steps": STEPS, "train.micro_batch_size": MICRO_GLOBAL // dp, "train.grad_accum_steps": 2,
           "checkpoint.at_end": "false", "train.threads": 1, "model.bias_update_speed": 0.01,
           "model.aux_loss_alpha": 0.01, "optim.eps": 1e-6, "optim.warmup_steps": 1, **extra},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("single")
    return run_ranks(1, train_and_report, overrides(run_dir, cache_dir, dp=1))[0]


def assert_parity(ref: dict, got: dict, layout: str) -> None:
    for key in ("loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(torch.tensor(got["metrics"][key]), torch.tensor(ref["metrics"][key]),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{layout} {key}: {m}")
    torch.testing.assert_close(torch.tensor(got["metrics"]["grad_norm"]), torch.tensor(ref["metrics"]["grad_norm"]),
                               rtol=1e-4, atol=1e-6, msg=lambda m: f"{layout} grad_norm: {m}")
    assert ref["state"].keys() == got["state"].keys()
    for name, expected in ref["state"].items():
        # AdamW turns rounding noise in near-zero gradients into small update differences.
        torch.testing.assert_close(got["state"][name], expected, rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{layout} {name}: {m}")


LAYOUTS = {
    "dp2_fsdp": (2, {"parallel.dp_shard": 2, "parallel.data_parallel": "fsdp"}),
    "dp2_zero1": (2, {"parallel.dp_shard": 2, "parallel.data_parallel": "zero1"}),
    "ep2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}),
    "ep2_zero1": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "zero1"}),
    "ep2_dp2": (4, {"parallel.dp_shard": 4, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}),
    "ep4": (4, {"parallel.dp_shard": 4, "parallel.ep": 4, "parallel.data_parallel": "fsdp"}),
    # node-limited 2 "nodes" x 2 ranks: hierarchical dispatch (parallel/node_dispatch.py), overlap on (the default)
    "ep4_2nodes": (4, {"parallel.dp_shard": 4, "parallel.ep": 4, "parallel.ep_ranks_per_node": 2}),
    "hsdp2x2_ep2": (4, {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.ep": 2}),
    "tp2": (2, {"parallel.tp": 2}),
    "tp2_dp2_fsdp": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "tp2_ep2": (4, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.ep": 2}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path, cache_dir):
    world, extra = LAYOUTS[layout]
    dp = world // (extra.get("parallel.tp", 1) * extra.get("parallel.pp", 1))
    results = run_ranks(world, train_and_report, overrides(tmp_path, cache_dir, dp=dp, **extra))
    for rank, got in enumerate(results):
        assert_parity(reference, got, f"{layout} rank {rank}")
