"""Run the Slurm requeue test (tests/test_slurm.py) many times in a row and count the passes.

    python -m bench.slurm_requeue_loop --runs 20 [--out DIR] [--stop-on-failure]

The test brings up a local Slurm cluster, submits launch/slurm.sbatch on 2 tasks, plays the
time-limit signal after the first checkpoint and checks that the requeued job resumes and
completes. Run it while the machine is busy (that is the condition the loop is for); each run's
pytest output is kept in DIR (default: a temp dir) and failures are listed at the end.
Not a test: it takes about a minute per run, so it stays out of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_slurm.py::test_sbatch_two_tasks_requeue_resumes_and_completes"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="where each run's output is kept")
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="slurm-loop-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    passed, failed, skipped = 0, [], 0
    t_all = time.time()
    for i in range(1, args.runs + 1):
        t0 = time.time()
        log = out / f"run{i:03d}.log"
        cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-s", "-p", "no:cacheprovider",
               f"--basetemp={out / f'tmp{i:03d}'}"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {args.timeout:.0f} s)", -1
        log.write_text(text)
        if rc == 0 and " skipped" in text and " passed" not in text:
            skipped += 1
            verdict = "SKIPPED"
        elif rc == 0:
            passed += 1
            verdict = "passed"
        else:
            failed.append(i)
            verdict = f"FAILED (rc {rc}, {log})"
        print(f"run {i:3d}/{args.runs}: {verdict} in {time.time() - t0:.0f} s (load {load()})", flush=True)
        if rc == 0:  # keep the failures' temp dirs only
            shutil.rmtree(out / f"tmp{i:03d}", ignore_errors=True)
        if failed and args.stop_on_failure:
            break
    runs = passed + len(failed) + skipped
    print(f"{passed}/{runs} passed, {len(failed)} failed {failed or ''}, {skipped} skipped; "
          f"{time.time() - t_all:.0f} s in all; logs in {out}")
    return 0 if not failed and passed else 1


if __name__ == "__main__":
    sys.exit(main())
