"""A checkpoint saved under one parallel layout resumes under another and training
continues exactly as the uninterrupted single-process run (fp32)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.test_parallel_parity import overrides as parity_overrides

pytestmark = pytest.mark.multirank
TOTAL, SAVED_AT = 6, 3


def overrides(run_dir, cache_dir, dp, **extra):
    # The LR schedule must not depend on train.steps, which differs between the saving and
    # the resuming invocation: pin the cosine length.
    return parity_overrides(run_dir, cache_dir, dp, **{"optim.decay_steps": TOTAL, **extra})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("straight")
    return run_ranks(1, train_and_report, overrides(run_dir, cache_dir, dp=1, **{"train.steps": TOTAL}))[0]


@pytest.fixture(scope="module")
def saved_ep2_dp2(tmp_path_factory, cache_dir):
    """3 steps under EP=2 x DP=2 (4 ranks, FSDP2), checkpoint at the end."""
    run_dir = tmp_path_factory.mktemp("ep2dp2")
    run_ranks(4, train_and_report, overrides(
        run_dir, cache_dir, dp=4,
        **{"train.steps": SAVED_AT, "checkpoint.at_end": "true", "parallel.dp_shard": 4, "parallel.ep": 2}))
    assert (run_dir / "checkpoints" / f"step_{SAVED_AT:08d}" / "COMPLETE").is_file()
    return run_dir


RESUME_LAYOUTS = {
    "dp4_fsdp": (4, {"parallel.dp_shard": 4}),
    "single": (1, {}),
    "ep2_zero1": (2, {"parallel.dp_shard": 2, "parallel.ep": 2, "parallel.data_parallel": "zero1"}),
}


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resume_under_another_layout(layout, straight, saved_ep2_dp2, tmp_path, cache_dir):
    world, extra = RESUME_LAYOUTS[layout]
    run_dir = tmp_path / "run"
    shutil.copytree(saved_ep2_dp2, run_dir)
    results = run_ranks(world, train_and_report, overrides(run_dir, cache_dir, dp=world, **{"train.steps": TOTAL, **extra}))
    expected = {k: v[SAVED_AT:] for k, v in straight["metrics"].items()}
    for rank, got in enumerate(results):
        assert len(got["metrics"]["loss"]) == TOTAL - SAVED_AT, f"{layout}: did not resume at step {SAVED_AT}"
        for key in ("loss", "mtp_loss", "aux_loss"):
            torch.testing.assert_close(torch.tensor(got["metrics"][key]), torch.tensor(expected[key]),
                                       rtol=1e-5, atol=1e-7, msg=lambda m: f"{layout} rank {rank} {key}: {m}")
        torch.testing.assert_close(torch.tensor(got["metrics"]["grad_norm"]), torch.tensor(expected["grad_norm"]),
                                   rtol=1e-4, atol=1e-6)
        for name, ref in straight["state"].items():
            torch.testing.assert_close(got["state"][name], ref, rtol=1e-4, atol=5e-5, msg=lambda m: f"{layout} {name}: {m}")


def test_resume_under_the_same_layout(straight, saved_ep2_dp2, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_ep2_dp2, run_dir)
    results = run_ranks(4, train_and_report, overrides(
        run_dir, cache_dir, dp=4, **{"train.steps": TOTAL, "parallel.dp_shard": 4, "parallel.ep": 2}))
    for got in results:
        torch.testing.assert_close(torch.tensor(got["metrics"]["loss"]), torch.tensor(straight["metrics"]["loss"][SAVED_AT:]),
                                   rtol=1e-5, atol=1e-7)
