"""parallel.data_parallel=deepspeed: the refused combinations (no DeepSpeed needed), and parity with the
single process (fp32, 5 steps: losses, gradient norms, final parameters) for ZeRO-1 + EP2, ZeRO-2 + EP2,
ZeRO-1 (dp2, ep=1), ZeRO-2 + EP2 with the optimizer offloaded to the CPU, and resumes DeepSpeed -> FSDP2
and FSDP2 -> DeepSpeed, all in one 2-rank launch (DeepSpeed re-initialises in the same processes).
ZeRO-3 is refused (parallel/layout.py says why)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from models.config import ModelConfig
from parallel.layout import LayoutError, check
from tests.trainer_helpers import small_overrides
from train.config import ConfigError, DeepSpeedSettings, ParallelConfig, load_config

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS, HALF = 5, 3
SKIPPED = 3  # the step whose gradient is made non-finite


def ds_layout(zero_stage: int = 1, **extra) -> ParallelConfig:
    return ParallelConfig(data_parallel="deepspeed", deepspeed=DeepSpeedSettings(zero_stage=zero_stage), **extra)


@pytest.mark.parametrize("layout, world, key, words", [
    (ds_layout(3, dp_shard=2, ep=2), 2, "parallel.deepspeed.zero_stage", ["ep > 1", "different experts"]),
    (ds_layout(3, dp_shard=2), 2, "parallel.deepspeed.zero_stage", ["ep=1", "grad norm", "fsdp"]),
    (ds_layout(2, pp=2), 2, "parallel.pp", ["pipeline", "fsdp"]),
    (ds_layout(1, tp=2), 2, "parallel.tp", ["DTensor"]),
    (ds_layout(2, dp_replicate=2, dp_shard=1), 2, "parallel.dp_replicate", ["HSDP"]),
])
def test_refused_layouts_name_the_key(layout, world, key, words):
    with pytest.raises(LayoutError) as err:
        check(layout, ModelConfig(n_routed_experts=8), world)
    assert str(err.value).startswith(key), str(err.value)
    for w in words:
        assert w in str(err.value)


def test_zero1_and_zero2_with_expert_parallelism_pass_the_layout_check():
    check(ds_layout(1, dp_shard=2), ModelConfig(n_routed_experts=8), 2)
    check(ds_layout(2, dp_shard=2, ep=2), ModelConfig(n_routed_experts=8), 2)


@pytest.mark.parametrize("extra, key", [
    ({"parallel.deepspeed.zero_stage": 4}, "parallel.deepspeed.zero_stage"),
    ({"parallel.deepspeed.offload_optimizer": "nvme"}, "parallel.deepspeed.offload_optimizer"),
    ({"optim.bf16_moments": "true"}, "optim.bf16_moments"),
    ({"train.precision": "fp8"}, "train.precision"),
    ({"parallel.deepspeed.zero_stage": 3}, "parallel.deepspeed.zero_stage"),
])
def test_config_refusals_name_the_key(repo_root, tmp_path, extra, key):
    overrides = small_overrides(tmp_path, tmp_path, **{"parallel.data_parallel": "deepspeed", **extra})
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(repo_root / "configs" / "tiny.yaml", overrides)


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    from parallel.deepspeed_engine import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[deepspeed\]'"):
        import_deepspeed()


def test_generated_deepspeed_config():
    from parallel.deepspeed_engine import deepspeed_config

    c = deepspeed_config(2, "cpu", micro_batch_size=2, grad_accum_steps=3, dp_size=4, grad_clip=1.0, cpu_adam=False)
    assert c["train_batch_size"] == 2 * 3 * 4 and c["gradient_clipping"] == 1.0
    assert c["gradient_allreduce_op"] == "sum" and not c["managed_gradient_accumulation"]
    assert c["zero_optimization"]["stage"] == 2 and c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_force_ds_cpu_optimizer"] is False
    assert "offload_optimizer" not in deepspeed_config(1, "none", 1, 1, 2, 0.0, False)["zero_optimization"]


def test_planner_memory_per_stage(repo_root, tmp_path):
    """ZeRO-1 keeps whole gradients, ZeRO-2 a partition; offload moves the optimizer states to host memory."""
    from train.plan import plan

    def memory(**extra):
        cfg = load_config(repo_root / "configs" / "tiny.yaml", small_overrides(tmp_path, tmp_path, **{
            "parallel.data_parallel": "deepspeed", "parallel.dp_shard": 2, "parallel.ep": 2, **extra}))
        out = plan(cfg)
        assert "comm" not in out  # DeepSpeed's collectives bypass the ledger the prediction is checked against
        return out["memory"]["per_rank_gb"]

    z1, z2 = memory(), memory(**{"parallel.deepspeed.zero_stage": 2})
    off = memory(**{"parallel.deepspeed.zero_stage": 2, "parallel.deepspeed.offload_optimizer": "cpu"})
    assert z1["weights"] == z2["weights"] == z1["grads"] > z2["grads"] > 0
    assert z1["optimizer"] == z2["optimizer"] > 0 and z1["host"] == z2["host"] == 0
    assert off["optimizer"] == 0 and off["host"] > z2["optimizer"]
    assert off["total"] < z2["total"]


# ---------------------------------------------------------------------------------------- parity (2 ranks)
def overrides(run_dir, cache_dir, dp: int, **extra) -> list[str]:
    """tests/test_parallel_parity.py's settings, with the lr decay pinned to 5 steps (resumes stop at 3)."""
    return small_overrides(
        run_dir, cache_dir,
        **{"train.steps": STEPS, "train.micro_batch_size": 4 // dp, "train.grad_accum_steps": 2,
           "checkpoint.at_end": "false", "train.threads": 1, "model.bias_update_speed": 0.01,
           "model.aux_loss_alpha": 0.01, "optim.eps": 1e-6, "optim.warmup_steps": 1, "optim.decay_steps": STEPS,
           **extra},
    )


def deepspeed(stage: int, ep: int = 1, offload: str = "none") -> dict:
    return {"parallel.data_parallel": "deepspeed", "parallel.deepspeed.zero_stage": stage, "parallel.ep": ep,
            "parallel.deepspeed.offload_optimizer": offload, "parallel.deepspeed.cpu_adam": "false"}


FSDP_EP2 = {"parallel.data_parallel": "fsdp", "parallel.ep": 2}
# DeepSeek-V2 balancing: softmax gates, group-limited greedy, expert + device + communication losses
V2_LOSSES = {"model.scoring_func": "softmax", "model.topk_method": "group_limited_greedy", "model.norm_topk_prob": "false",
             "model.routed_scaling_factor": 1.0, "model.bias_update_speed": 0.0, "model.device_aux_loss_alpha": 0.01,
             "model.comm_aux_loss_alpha": 0.01}
PARITY = {
    "zero1_ep2": deepspeed(1, ep=2),
    "zero2_ep2": deepspeed(2, ep=2),
    "zero1_dp2": deepspeed(1),
    "zero2_ep2_offload": deepspeed(2, ep=2, offload="cpu"),
    "zero2_ep2_v2": {**deepspeed(2, ep=2), **V2_LOSSES},
}


def reference_of(label: str) -> str:
    return "reference_v2" if label.endswith("_v2") else "reference"
RESUMES = {"deepspeed_to_fsdp": (deepspeed(2, ep=2), FSDP_EP2), "fsdp_to_deepspeed": (FSDP_EP2, deepspeed(1, ep=2))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.deepspeed_worker import run_many
    from tests.distributed import run_ranks

    tmp = tmp_path_factory.mktemp("deepspeed")
    cache = tmp / "cache"
    runs = [("reference", overrides(tmp / "RANKDIR" / "reference", cache, dp=1), True, 0),
            ("reference_skip", overrides(tmp / "RANKDIR" / "reference_skip", cache, dp=1), True, SKIPPED),
            ("reference_v2", overrides(tmp / "RANKDIR" / "reference_v2", cache, dp=1, **V2_LOSSES), True, 0)]
    runs += [(label, overrides(tmp / label, cache, dp=2, **extra), False, 0) for label, extra in PARITY.items()]
    for label, (first, second) in RESUMES.items():
        runs.append((f"{label}/first", overrides(tmp / label, cache, dp=2, **first,
                                                 **{"train.steps": HALF, "checkpoint.at_end": "true"}), False, 0))
        runs.append((f"{label}/second", overrides(tmp / label, cache, dp=2, **second), False, 0))
    runs.append(("zero2_ep2_skip", overrides(tmp / "zero2_ep2_skip", cache, dp=2, **PARITY["zero2_ep2"]), False, SKIPPED))
    return run_ranks(2, run_many, runs, str(tmp), timeout=1200)


def assert_parity(ref: dict, got: dict, label: str, first_step: int = 1) -> None:
    """tests/test_parallel_parity.py's tolerances, from `first_step` on (a non-finite grad norm: on both sides)."""
    ref_m = {k: v[first_step - 1:] for k, v in ref["metrics"].items()}
    got_norm, ref_norm = torch.tensor(got["metrics"]["grad_norm"]), torch.tensor(ref_m["grad_norm"])
    assert torch.equal(got_norm.isfinite(), ref_norm.isfinite()), (label, got_norm, ref_norm)
    got["metrics"]["grad_norm"] = got_norm.nan_to_num(0.0, 0.0).tolist()
    ref_m["grad_norm"] = ref_norm.nan_to_num(0.0, 0.0).tolist()
    for key in ("loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(torch.tensor(got["metrics"][key]), torch.tensor(ref_m[key]),
                                   rtol=1e-5, atol=1e-7, msg=lambda m: f"{label} {key}: {m}")
    torch.testing.assert_close(torch.tensor(got["metrics"]["grad_norm"]), torch.tensor(ref_m["grad_norm"]),
                               rtol=1e-4, atol=1e-6, msg=lambda m: f"{label} grad_norm: {m}")
    assert ref["state"].keys() == got["state"].keys()
    for name, expected in ref["state"].items():
        torch.testing.assert_close(got["state"][name], expected, rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.multirank
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install '.[deepspeed]')")
@pytest.mark.parametrize("label", list(PARITY))
def test_deepspeed_matches_single_process(results, label):
    for rank, res in enumerate(results):
        assert_parity(res[reference_of(label)], res[label], f"{label} rank {rank}")


@pytest.mark.multirank
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install '.[deepspeed]')")
@pytest.mark.parametrize("label", list(RESUMES))
def test_resume_across_engines_continues_like_the_uninterrupted_run(results, label):
    for rank, res in enumerate(results):
        first, second = res[f"{label}/first"], res[f"{label}/second"]
        assert not first["resumed"] and second["resumed"]
        assert second["steps"] == list(range(HALF + 1, STEPS + 1))
        assert_parity(res["reference"], second, f"{label} rank {rank}", first_step=HALF + 1)


@pytest.mark.multirank
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install '.[deepspeed]')")
@pytest.mark.parametrize("label", ["zero1_ep2", "zero1_dp2", "zero2_ep2_offload"])
def test_planner_matches_what_deepspeed_allocates(results, label, repo_root, tmp_path):
    """train/plan.py's optimizer states (GPU, or host under offload) against the engine's allocations."""
    from train.plan import plan

    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      overrides(tmp_path, tmp_path, dp=2, **PARITY[label], **{"parallel.dp_shard": 2}))
    mem = plan(cfg)["memory"]["per_rank_gb"]
    offload = PARITY[label]["parallel.deepspeed.offload_optimizer"] == "cpu"
    planned = (mem["host"] if offload else mem["optimizer"]) * 2**30
    assert (mem["optimizer"] == 0) == offload and (mem["host"] > 0) == offload
    for res in results:
        got = res[label]["engine_bytes"]
        measured = got["state"] + got["host_grads"]
        assert offload == (got["host_grads"] > 0)
        assert abs(measured - planned) <= 1e-3 * planned, (label, measured, planned)


@pytest.mark.multirank
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install '.[deepspeed]')")
def test_nonfinite_gradient_skips_the_step_like_the_single_process(results):
    for rank, res in enumerate(results):
        ref, got = res["reference_skip"], res["zero2_ep2_skip"]
        assert ref["skipped_steps"] == got["skipped_steps"] == 1
        assert not torch.tensor(got["metrics"]["grad_norm"][SKIPPED - 1]).isfinite()
        assert_parity(ref, got, f"zero2_ep2_skip rank {rank}")
