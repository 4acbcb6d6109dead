"""A stop request (SIGTERM, e.g. Slurm preemption) gets the remainder of the step and the save,
then exit 0: no sample generation. The time from signal to exit is measured and printed; the
bound is generous (the machine may be loaded) and far below what a sample adds on top of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt

BOUND_S = 90


@pytest.mark.slow
def test_sigterm_saves_and_exits_without_sampling(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    args = small_overrides(run_dir, tmp_path / "cache", **{
        "train.steps": 100000, "train.threads": 1,
        "train.sample_prompt": "'def main():'", "train.sample_tokens": 2000,  # what a finished run would print
    })
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", "configs/tiny.yaml", *args], cwd=repo_root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        seconds = time.monotonic() - t_signal
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received: saving at step" in err
    assert "---- sample ----" not in out
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert [s for s, _ in ckpt.complete_checkpoints(run_dir / "checkpoints")] == [last]  # saved at the stop step
    print(f"SIGTERM to exit: {seconds:.1f} s (stopped after step {last})")
    assert seconds < BOUND_S
