"""gpt-oss layouts: fp32 parity with the single-process run (5 steps; losses, aux loss, gradient norms,
final parameters) for EP2 (experts and their biases split), TP2 (q and kv heads split, sinks sharded),
PP2 and FSDP2 (dp2), and bf16 under EP2 + FSDP2 against the fp32 run; and the layout error for a tp
that does not divide the kv heads. All world-2 layouts run in one set of processes (one spawn)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.test_parallel_parity import STEPS, assert_parity
from tests.test_pipeline_parity import train_layouts
from tests.trainer_helpers import SMALL_GPT_OSS, small_overrides
from train.config import ConfigError, load_config

pytestmark = pytest.mark.multirank

CONFIG = "tiny_gpt_oss.yaml"
MICRO_GLOBAL = 4  # sequences per micro-batch summed over data-parallel ranks
LAYOUTS = {  # name: (data-parallel ranks, overrides)
    "ep2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp"}),
    "tp2": (1, {"parallel.tp": 2}),
    "pp2": (1, {"parallel.pp": 2, "parallel.data_parallel": "zero1"}),
    "dp2_fsdp": (2, {"parallel.dp_shard": 2, "parallel.data_parallel": "fsdp"}),
    "bf16_ep2_fsdp": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "fsdp",
                          "train.precision": "bf16"}),
}


def overrides(run_dir, cache_dir, dp: int, **extra) -> list[str]:
    return small_overrides(run_dir, cache_dir, model=SMALL_GPT_OSS, **{
        "train.steps": STEPS, "train.micro_batch_size": MICRO_GLOBAL // dp, "train.grad_accum_steps": 2,
        "checkpoint.at_end": "false", "train.threads": 1, "model.router_aux_loss_coef": 0.05, "optim.eps": 1e-6,
        "optim.warmup_steps": 1, **extra})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gpt_oss_cache")
    reference = run_ranks(1, train_and_report, overrides(tmp_path_factory.mktemp("single"), cache, 1), CONFIG)[0]
    runs = [overrides(tmp_path_factory.mktemp(name), cache, dp, **extra) for name, (dp, extra) in LAYOUTS.items()]
    per_rank = run_ranks(2, train_layouts, runs, CONFIG)
    return reference, {name: [r[i] for r in per_rank] for i, name in enumerate(LAYOUTS)}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if not name.startswith("bf16")])
def test_gpt_oss_layout_matches_single_process(layout, results):
    reference, got = results
    assert reference["metrics"]["aux_loss"][0] > 0 and not reference["metrics"]["mtp_loss"]
    for rank, result in enumerate(got[layout]):
        assert_parity(reference, result, f"gpt-oss {layout} rank {rank}")


def test_gpt_oss_bf16_under_ep2_fsdp_stays_near_fp32(results):
    reference, got = results
    for result in got["bf16_ep2_fsdp"]:
        loss, ref = torch.tensor(result["metrics"]["loss"]), torch.tensor(reference["metrics"]["loss"])
        print(f"\nbf16 ep2+fsdp losses {loss.tolist()} vs fp32 single-process {ref.tolist()}")
        torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
        assert torch.isfinite(torch.tensor(result["metrics"]["grad_norm"])).all()


def test_tp_must_divide_the_kv_heads(repo_root, tmp_path):
    args = small_overrides(tmp_path, tmp_path, model=SMALL_GPT_OSS) + ["parallel.tp=4", "model.num_attention_heads=8"]
    with pytest.raises(ConfigError, match=r"parallel.tp: model.num_key_value_heads=2 is not divisible by tp=4"):
        load_config(repo_root / "configs" / CONFIG, args)
