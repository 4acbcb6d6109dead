"""Fault tolerance of real training runs (small model, fp32, CPU):

* async checkpoints: training continues while the write is in flight, and they resume
  exactly like sync ones;
* a corrupt newest checkpoint (truncated shard, metadata pickle calling os.system) →
  auto-resume falls back to the previous one, the payload never runs;
* a checkpoint without its marker is never resumed from;
* SIGKILL during a save (subprocess) → the restart resumes from the previous checkpoint;
* SIGTERM to `python -m train` → finishes the step, saves, exits 0; the rerun resumes
  and ends with the uninterrupted run's loss;
* NaN/Inf loss or gradient for one step → skipped (parameters and optimizer state
  unchanged), counted in metrics.jsonl, training goes on;
* SIGKILL of one rank under `torchrun --max-restarts 1` → the group restarts from the
  last complete checkpoint and finishes with the uninterrupted run's loss.

Every run pins the LR schedule (optim.decay_steps) so that it does not depend on
train.steps, which differs between an interrupted run and its continuation.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train.trainer as trainer_module
from tests.test_torchrun_cli import torchrun_command
from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt
from train.config import load_config
from train.trainer import Trainer

TOTAL = 6
PINNED = {"optim.warmup_steps": 1, "optim.decay_steps": TOTAL}

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_cache")


def overrides(run_dir: Path, cache_dir: Path, **extra) -> list[str]:
    return small_overrides(run_dir, cache_dir, **{"train.steps": TOTAL, "checkpoint.keep_last": 10, **PINNED, **extra})


def make_trainer(repo_root, run_dir, cache_dir, **extra) -> Trainer:
    return Trainer(load_config(repo_root / "configs" / "tiny.yaml", overrides(run_dir, cache_dir, **extra)))


def steps_of(root: Path) -> list[int]:
    return [s for s, _ in ckpt.complete_checkpoints(root / "checkpoints")]


def metrics_records(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # complete lines only


def assert_continues_reference(history: list[dict], reference: list[dict], first_step: int, last_step: int = TOTAL) -> None:
    """`history` (steps first_step..last_step) has the reference run's losses for those steps."""
    assert [h["step"] for h in history] == list(range(first_step, last_step + 1))
    for got in history:
        ref = reference[got["step"] - 1]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), got["step"]
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), got["step"]


@pytest.fixture(scope="module")
def reference(repo_root, tmp_path_factory, cache_dir):
    """The uninterrupted run: TOTAL steps, sync checkpoints every 2 steps (all kept)."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(repo_root, run_dir, cache_dir, **{"checkpoint.interval": 2})
    history = trainer.fit()
    assert [h["step"] for h in history] == list(range(1, TOTAL + 1))
    return history, run_dir


@pytest.fixture(scope="module")
def four_steps(repo_root, tmp_path_factory, cache_dir, reference):
    """A run stopped after 4 steps with checkpoints at 2 and 4 (copied by tests that damage it)."""
    run_dir = tmp_path_factory.mktemp("four")
    make_trainer(repo_root, run_dir, cache_dir, **{"train.steps": 4, "checkpoint.interval": 2}).fit()
    assert steps_of(run_dir) == [2, 4]
    return run_dir


# ------------------------------------------------------------------ async save
def _read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, by DCP key (load into a state dict built from its metadata)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = ckpt.SafeFileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    ckpt.dcp.load(state, storage_reader=ckpt.SafeFileSystemReader(str(path)), planner=ckpt._SafeLoadPlanner())
    return state


def test_async_checkpoints_do_not_block_and_resume_like_sync(repo_root, tmp_path, cache_dir, reference, monkeypatch):
    import threading

    import torch.distributed.checkpoint.state_dict_saver as dcp_saver

    ref_history, ref_dir = reference
    run_dir = tmp_path / "async"
    trainer = make_trainer(repo_root, run_dir, cache_dir,
                           **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.async_save": "true"})
    # Hold the background write of step 2 until step 3 has trained: step 3 must not wait for it.
    gate, real_save = threading.Event(), dcp_saver.save
    monkeypatch.setattr(dcp_saver, "save", lambda *a, **k: (gate.wait(60), real_save(*a, **k))[1])
    in_flight_during = []
    real_step = trainer.train_step

    def step_and_watch():
        metrics = real_step()
        pending = trainer.checkpointer.pending
        in_flight_during.append((trainer.step, pending is not None and not pending.done(), steps_of(run_dir)))
        if trainer.step == 3:
            gate.set()
        return metrics

    trainer.train_step = step_and_watch
    history = trainer.fit()
    assert in_flight_during[2] == (3, True, []), in_flight_during  # step 3 ran while step 2 was being written
    assert steps_of(run_dir) == [2, 4] and not list((run_dir / "checkpoints").glob("*.tmp"))
    # Same bytes as the sync checkpoints of the uninterrupted run.
    for step in (2, 4):
        a, b = _read_all(ckpt.step_dir(run_dir / "checkpoints", step)), _read_all(ckpt.step_dir(ref_dir / "checkpoints", step))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # Resuming from the async checkpoint continues exactly as the uninterrupted run.
    assert_continues_reference(history, ref_history, 1, 4)
    resumed = make_trainer(repo_root, run_dir, cache_dir, **{"checkpoint.async_save": "true", "checkpoint.interval": 2})
    assert resumed.step == 4
    assert_continues_reference(resumed.fit(), ref_history, 5)
    assert steps_of(run_dir)[-1] == TOTAL


@pytest.mark.multirank
def test_async_checkpoints_under_ep_and_fsdp_resume(tmp_path, cache_dir, reference):
    """2 ranks (EP=2 x FSDP dp_shard=2): async saves in a background gloo group, DTensor state
    staged to CPU; the resumed run continues as the uninterrupted one (fp32 reduction order aside)."""
    from tests.distributed import run_ranks
    from tests.parity_worker import train_and_report

    run_dir = tmp_path / "run"
    layout = {"parallel.dp_shard": 2, "parallel.ep": 2, "train.micro_batch_size": 2, "train.threads": 1,
              "checkpoint.interval": 2, "checkpoint.async_save": "true"}
    first = run_ranks(2, train_and_report, overrides(run_dir, cache_dir, **{**layout, "train.steps": 4}))
    assert steps_of(run_dir) == [2, 4] and not list((run_dir / "checkpoints").glob("*.tmp"))
    rest = run_ranks(2, train_and_report, overrides(run_dir, cache_dir, **layout))
    assert steps_of(run_dir) == [2, 4, 6]
    ref = [h["loss"] for h in reference[0]]
    for rank in range(2):
        assert first[rank]["metrics"]["loss"] == pytest.approx(ref[:4], rel=1e-5)
        assert rest[rank]["metrics"]["loss"] == pytest.approx(ref[4:], rel=1e-5), "did not resume at step 4"


# ------------------------------------------------------------------ corrupt checkpoints
class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _truncate_shard(path: Path, _: Path) -> str:
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    return "truncated shard"


def _evil_metadata(path: Path, sentinel: Path) -> str:
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch {sentinel}")))
    return "not allowed"


def _drop_marker(path: Path, _: Path) -> str:
    (path / ckpt.MARKER).unlink()
    return ""


def _unpublished(path: Path, _: Path) -> str:
    os.replace(path, path.with_name(path.name + ".tmp"))  # killed after the marker, before the rename
    return ""


@pytest.mark.parametrize("damage", [_truncate_shard, _evil_metadata, _drop_marker, _unpublished],
                         ids=["truncated_shard", "evil_metadata", "no_marker", "unpublished_tmp"])
def test_resume_falls_back_to_the_previous_checkpoint(repo_root, tmp_path, cache_dir, reference, four_steps,
                                                      damage, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    sentinel = tmp_path / "executed"
    cause = damage(ckpt.step_dir(run_dir / "checkpoints", 4), sentinel)
    trainer = make_trainer(repo_root, run_dir, cache_dir, **{"checkpoint.interval": 2})
    assert trainer.step == 2 and trainer.resumed_from == ckpt.step_dir(run_dir / "checkpoints", 2)
    if cause:  # a marked but damaged checkpoint: tried, refused with the path and the cause, logged
        errors = [r.getMessage() for r in caplog.records if "cannot resume from" in r.getMessage()]
        assert len(errors) == 1 and "step_00000004" in errors[0] and cause in errors[0], errors
    assert not sentinel.exists(), "the metadata pickle was executed"
    assert_continues_reference(trainer.fit(), reference[0], 3)
    assert steps_of(run_dir) == [2, 4, 6]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_no_loadable_checkpoint_is_an_error(repo_root, tmp_path, cache_dir, four_steps):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    for step in (2, 4):
        _truncate_shard(ckpt.step_dir(run_dir / "checkpoints", step), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 complete checkpoints .* truncated shard"):
        make_trainer(repo_root, run_dir, cache_dir)


# ------------------------------------------------------------------ SIGKILL during a save
_HANGING_SAVE = r"""
import os, sys, time
from pathlib import Path
import train.checkpoint as ckpt
from train.config import load_config
from train.trainer import Trainer

mode, sentinel, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
real_save, real_replace = ckpt.dcp.save, os.replace

def hang():
    sentinel.write_text(mode)
    time.sleep(600)

def save(state_dict, *, checkpoint_id, **kwargs):
    if mode == "before_shards" and "step_00000004" in str(checkpoint_id):
        hang()
    real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
    if mode == "after_shards" and "step_00000004" in str(checkpoint_id):
        hang()

def replace(src, dst):
    if mode == "before_rename" and str(src).endswith("step_00000004.tmp"):
        hang()
    real_replace(src, dst)

ckpt.dcp.save, ckpt.os.replace = save, replace
Trainer(load_config("configs/tiny.yaml", overrides)).fit()
"""


class _Process:
    """A subprocess whose output goes to files (a pipe nobody reads could fill up and block it)."""

    def __init__(self, cmd: list[str], cwd: Path, logs: Path, env: dict | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout", logs / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            # Its own session: on timeout the whole group it started (torchrun's workers too) is killed.
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def returncode(self):
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def _wait_for(predicate, proc: _Process, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("mode", [pytest.param("before_shards", marks=pytest.mark.slow), "after_shards", "before_rename"])
def test_sigkill_during_save_resumes_from_previous(repo_root, tmp_path, cache_dir, reference, mode):
    run_dir, sentinel = tmp_path / "run", tmp_path / "hanging"
    args = overrides(run_dir, cache_dir, **{"checkpoint.interval": 2})
    proc = _Process([sys.executable, "-c", _HANGING_SAVE, mode, str(sentinel), *args], repo_root, tmp_path / "logs")
    try:
        _wait_for(sentinel.exists, proc, 180, "the save of step 4")
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.wait(30)
    root = run_dir / "checkpoints"
    assert steps_of(run_dir) == [2]
    assert (root / "step_00000004.tmp").is_dir() and not (root / "step_00000004").exists()
    assert ((root / "step_00000004.tmp" / ckpt.MARKER).exists()) == (mode == "before_rename")

    trainer = make_trainer(repo_root, run_dir, cache_dir, **{"checkpoint.interval": 2})
    assert trainer.step == 2 and trainer.resumed_from == root / "step_00000002"
    assert_continues_reference(trainer.fit(), reference[0], 3)
    assert steps_of(run_dir) == [2, 4, 6] and not list(root.glob("*.tmp"))


# ------------------------------------------------------------------ SIGTERM
@pytest.mark.parametrize("async_save", ["false", "true"], ids=["sync", "async"])
def test_sigterm_saves_exits_zero_and_resumes(repo_root, tmp_path, cache_dir, reference, async_save):
    """With async saves the final checkpoint's write is waited for and published before exit."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--config", "configs/tiny.yaml",
           *overrides(run_dir, cache_dir, **{"checkpoint.async_save": async_save})]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = _Process(cmd, repo_root, tmp_path / "logs", env)
    metrics = run_dir / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc, 180, "step 1")
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        proc.wait(180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM received: saving at step" in proc.stderr
    stopped = metrics_records(run_dir)[-1]["step"]
    assert 1 <= stopped < TOTAL, "the run ended before SIGTERM arrived"
    assert steps_of(run_dir) == [stopped]

    rerun = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(step {stopped})" in rerun.stdout and "resumed from" in rerun.stdout
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    assert_continues_reference(records, reference[0], 1)


# ------------------------------------------------------------------ NaN / Inf
def _inject_nonfinite(trainer: Trainer, monkeypatch, kind: str, bad_steps: set[int]) -> None:
    """Make the loss (kind=loss) or one gradient (kind=grad) non-finite during `bad_steps`."""
    if kind == "loss":
        real = trainer_module.combine_losses

        def combine(*args, **kwargs):
            loss = real(*args, **kwargs)
            return loss * float("nan") if trainer.step + 1 in bad_steps else loss

        monkeypatch.setattr(trainer_module, "combine_losses", combine)
    else:
        weight = trainer.model.lm_head.weight
        weight.register_hook(lambda g: g * float("inf") if trainer.step + 1 in bad_steps else g)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_one_nonfinite_step_is_skipped_and_counted(repo_root, tmp_path, cache_dir, monkeypatch, kind):
    run_dir = tmp_path / "run"
    trainer = make_trainer(repo_root, run_dir, cache_dir, **{"train.max_nonfinite_steps": 1})
    _inject_nonfinite(trainer, monkeypatch, kind, {3})
    snapshots = []
    real_step = trainer.train_step

    def step_and_snapshot():
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        before_bias = {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")}
        before_adam = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
        metrics = real_step()
        snapshots.append((before, before_bias, before_adam))
        return metrics

    trainer.train_step = step_and_snapshot
    history = trainer.fit()
    assert [h["step"] for h in history] == list(range(1, TOTAL + 1)), "training did not go on after the bad step"
    before, before_bias, before_adam = snapshots[2]
    after_params = {n: p.detach() for n, p in trainer.model.named_parameters()}
    # Step 3 changed nothing: compare what step 4 started from with what step 3 started from.
    start4, start4_bias, start4_adam = snapshots[3]
    for n, p in before.items():
        torch.testing.assert_close(start4[n], p, rtol=0, atol=0, msg=n)
    for n, b in before_bias.items():
        torch.testing.assert_close(start4_bias[n], b, rtol=0, atol=0, msg=n)
    for pid, state in before_adam.items():
        for k, v in state.items():
            torch.testing.assert_close(start4_adam[pid][k], v, rtol=0, atol=0)
    # Steps after the bad one train normally.
    assert any(not torch.equal(after_params[n], start4[n]) for n in start4)
    for h in history[3:]:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
    records = metrics_records(run_dir)
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 1, 1, 1]
    assert trainer.skipped_steps == 1 and trainer.consecutive_nonfinite == 0
    assert not math.isfinite(records[2]["total_loss" if kind == "loss" else "grad_norm"])


def test_nonfinite_streak_resets_and_the_limit_stops(repo_root, tmp_path, cache_dir, monkeypatch):
    """Isolated bad steps are tolerated however many; max_nonfinite_steps+1 in a row stop the run."""
    trainer = make_trainer(repo_root, tmp_path / "a", cache_dir, **{"train.max_nonfinite_steps": 1})
    _inject_nonfinite(trainer, monkeypatch, "loss", {2, 4, 6})
    trainer.fit()
    assert trainer.skipped_steps == 3 and trainer.step == TOTAL

    trainer = make_trainer(repo_root, tmp_path / "b", cache_dir, **{"train.max_nonfinite_steps": 1})
    _inject_nonfinite(trainer, monkeypatch, "grad", {2, 3})
    with pytest.raises(trainer_module.NonFiniteLossError, match=r"2 consecutive .*max_nonfinite_steps=1"):
        trainer.fit()
    assert trainer.skipped_steps == 2


# ------------------------------------------------------------------ SIGKILL a rank under torchrun
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _worker_rank(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.multirank
def test_sigkill_one_rank_under_torchrun_restarts_and_resumes(repo_root, tmp_path, cache_dir, reference):
    run_dir = tmp_path / "run"
    args = overrides(run_dir, cache_dir, **{
        "parallel.dp_shard": 2, "train.micro_batch_size": 2, "train.threads": 1,
        "checkpoint.interval": 2, "train.log_interval": 1,
    })
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the default: the agent's store is shared across attempts
    cmd = torchrun_command() + ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                                "-m", "train", "--config", "configs/tiny.yaml", *args]
    proc = _Process(cmd, repo_root, tmp_path / "logs", env)
    try:
        _wait_for(lambda: steps_of(run_dir), proc, 240, "the first checkpoint")
        victims = [p for p in _children(proc.pid) if _worker_rank(p) == 1]
        assert victims, "no rank-1 worker found"
        killed_after = metrics_records(run_dir)[-1]["step"]
        os.kill(victims[0], signal.SIGKILL)
    finally:
        proc.wait(300)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, (out[-3000:], err[-5000:])
    assert killed_after < TOTAL, "the run ended before the kill"
    assert "resumed from" in out, out[-3000:]
    resumed_at = int(out.split("resumed from", 1)[1].split("(step ", 1)[1].split(")", 1)[0])
    assert 2 <= resumed_at <= killed_after + 1
    records = metrics_records(run_dir)
    # The first attempt logged 1..k, the restarted one resumed_at+1..TOTAL.
    assert [r["step"] for r in records][-(TOTAL - resumed_at):] == list(range(resumed_at + 1, TOTAL + 1))
    final, ref = records[-1], reference[0][-1]
    assert final["step"] == TOTAL
    # Two ranks with half the micro-batch each see the same global batches as the 1-process
    # reference: equal up to the order of fp32 reductions.
    assert final["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert steps_of(run_dir)[-1] == TOTAL
