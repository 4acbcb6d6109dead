"""One run per run.dir (train/run_lock.py): the lock names its holder, a second run is refused,
a stale lock is taken over and logged, a requeue of the same Slurm job waits for the previous
holder to be gone, and two real `python -m train` runs on one run.dir do not both run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import small_overrides
from train.run_lock import LOCK_NAME, RunDirError, RunDirLockedError, RunLock, prepare_run_dir

HOST = socket.gethostname()


def holder_process() -> subprocess.Popen:
    """A live process of this host to stand in for another run's rank 0."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    return path


def test_lock_records_holder_refuses_a_second_run_and_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = RunLock(tmp_path / "run")
    first.acquire()
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"], holder["job_id"]) == (HOST, os.getpid(), "4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused at once, naming the holder
    with pytest.raises(RunDirLockedError, match=rf"in use by another run \(pid {os.getpid()} on host {HOST}, "
                                                r"Slurm job 4242, since .*UTC\)"):
        RunLock(tmp_path / "run", requeue_wait_s=60).acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    second = RunLock(tmp_path / "run")
    second.acquire()
    first.release()  # releasing a lock one no longer holds leaves the new holder's file alone
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["token"] == second.me["token"]
    second.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    deadline = time.time() + 30
    while time.time() - path.stat().st_mtime > 500:
        assert time.time() < deadline, "the heartbeat never refreshed the lock"
        time.sleep(0.05)
    lock.release()


def test_stale_locks_are_taken_over_and_logged(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "a", host=HOST, pid=dead.pid, since=time.time())  # holder's process gone
    other = write_lock(tmp_path / "b", host="some-other-node", pid=1, since=time.time())
    os.utime(other, (time.time() - 400, time.time() - 400))  # no heartbeat for 400 s
    write_lock(tmp_path / "c", garbage=True)  # unreadable (holder died while writing it)
    os.utime(tmp_path / "c" / LOCK_NAME, (time.time() - 60, time.time() - 60))
    with caplog.at_level("WARNING", logger="train.run_lock"):
        for name in "abc":
            lock = RunLock(tmp_path / name, stale_after_s=300, poll_s=0.05)
            lock.acquire()
            assert json.loads((tmp_path / name / LOCK_NAME).read_text())["token"] == lock.me["token"]
            lock.release()
    text = caplog.text
    assert f"pid {dead.pid} on host {HOST}" in text and "its process is gone" in text
    assert "pid 1 on host some-other-node" in text and "no heartbeat for 4" in text
    assert "unreadable lock file" in text
    assert not list(tmp_path.glob("*/run.lock.stale-*"))


def test_live_holder_on_another_host_is_respected(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, host="some-other-node", pid=1, job_id="7", since=time.time())  # fresh heartbeat
    with pytest.raises(RunDirLockedError, match="pid 1 on host some-other-node, Slurm job 7"):
        RunLock(tmp_path, stale_after_s=300).acquire()


def test_requeued_job_takes_over_only_once_the_previous_holder_is_gone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    previous = holder_process()
    try:
        write_lock(tmp_path, host=HOST, pid=previous.pid, job_id="77", restart=0, since=time.time())
        taken = threading.Event()
        lock = RunLock(tmp_path, requeue_wait_s=120, poll_s=0.05)

        def acquire() -> None:
            lock.acquire()
            taken.set()

        waiter = threading.Thread(target=acquire)
        with caplog.at_level("WARNING", logger="train.run_lock"):
            waiter.start()
            assert not taken.wait(1.0), "took the lock while the previous run of the job still held it"
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == previous.pid
            previous.kill()
            previous.wait()
            waiter.join(60)
        assert taken.is_set()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["restart"] == 1
        assert "the previous run of this Slurm job" in caplog.text and "taking over a stale lock" in caplog.text
        lock.release()
    finally:
        previous.kill()
        previous.wait()
    # A requeue whose previous run never exits gives up after requeue_wait_s, naming it.
    still = holder_process()
    try:
        write_lock(tmp_path, host=HOST, pid=still.pid, job_id="77", since=time.time())
        with pytest.raises(RunDirLockedError, match=f"pid {still.pid}"):
            RunLock(tmp_path, requeue_wait_s=0.3, poll_s=0.05).acquire()
    finally:
        still.kill()
        still.wait()


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"run.dir .*/f is a file, not a directory"):
        prepare_run_dir(tmp_path / "f")
    with pytest.raises(RunDirError, match="a parent path is a file"):
        prepare_run_dir(tmp_path / "f" / "run")


@pytest.mark.slow
def test_second_trainer_on_the_same_run_dir_is_refused(repo_root, tmp_path):
    """The issue's case: two `python -m train … run.dir=R` a few seconds apart. The second exits 5
    with one line naming the first; the first trains on, undisturbed."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "train", "--config", "configs/tiny.yaml",
            *small_overrides(run_dir, tmp_path / "cache", **{"train.steps": 100000, "train.threads": 1})]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 5, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("run directory in use: ") and f"pid {first.pid} on host {HOST}" in last, last
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run stopped"
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not (run_dir / LOCK_NAME).exists()
