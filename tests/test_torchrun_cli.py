"""The documented command line, for real: `torchrun --standalone --nproc-per-node 2 -m train
--config configs/tiny.yaml parallel.ep=2 parallel.dp_shard=2 ...` on 2 gloo ranks.

Only rank 0 writes metrics.jsonl and the console log, so every logged step appears
exactly once in each, and the run exits 0 with finite losses.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import small_overrides

STEPS = 4


def torchrun_command() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.multirank
def test_torchrun_ep2_logs_once_per_step(repo_root, tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    overrides = small_overrides(
        run_dir, cache_dir,
        **{"train.steps": STEPS, "train.micro_batch_size": 2, "train.threads": 1, "checkpoint.at_end": "false"},
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = torchrun_command() + [
        "--standalone", "--nproc-per-node", "2", "-m", "train", "--config", "configs/tiny.yaml",
        "parallel.ep=2", "parallel.dp_shard=2", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r

    step_lines = re.findall(r"^.*step\s+(\d+)/%d\b.*$" % STEPS, proc.stdout, flags=re.M)
    assert [int(s) for s in step_lines] == list(range(1, STEPS + 1)), proc.stdout
    assert proc.stdout.count("trained steps") == 1, proc.stdout
    # The console shows what metrics.jsonl recorded.
    first = re.search(r"step\s+1/%d \| loss (\d+\.\d+)" % STEPS, proc.stdout)
    assert first and abs(float(first.group(1)) - records[0]["loss"]) < 1e-3
