"""Fault soak: kill an EP2 training job with async checkpoints at random points, restart it, repeat;
at the end every step's loss must equal the uninterrupted run's, and no checkpoint directory
may be left incomplete (the approach of torchft's and Megatron's fault-tolerance tests).

    python -m bench.fault_soak [--cycles 6] [--steps 30] [--time-limit 1200] [--seed 0] [--out DIR]

Each cycle starts `torchrun --standalone --nproc-per-node 2 -m train` (tiny model, parallel.ep=2 over
dp_shard=2, checkpoint.async_save, a checkpoint every few steps) on the same run.dir and, after a
random number of steps, does one of (in turn):
  * sigkill-rank     SIGKILL one worker (a random rank) mid-step; torchrun tears the rest down;
  * sigkill-in-save  SIGKILL one worker while an async checkpoint is being written (a .tmp exists);
  * sigterm          SIGTERM to every worker, as Slurm does: finish the step, save, exit 0.
After the cycles, the job runs to train.steps. Every logged step (a step trained again after a
restart is logged again) is compared with an uninterrupted run of the same config, and every
checkpoint directory is validated. Bounded by --cycles and --time-limit; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.test_fault_tolerance import _children, _Process, _worker_rank
from tests.test_torchrun_cli import torchrun_command
from tests.trainer_helpers import small_overrides
from train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sigkill-rank", "sigkill-in-save", "sigterm")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # complete lines only


def start(run_dir: Path, cache_dir: Path, steps: int, interval: int, logs: Path) -> _Process:
    args = small_overrides(run_dir, cache_dir, **{
        "train.steps": steps, "train.micro_batch_size": 2, "train.threads": 1, "train.log_interval": 1,
        "parallel.dp_shard": 2, "parallel.ep": 2, "checkpoint.interval": interval, "checkpoint.async_save": "true",
        "checkpoint.keep_last": 3, "optim.warmup_steps": 2, "optim.decay_steps": steps,
    })
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    cmd = torchrun_command() + ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
                                "-m", "train", "--config", "configs/tiny.yaml", *args]
    return _Process(cmd, ROOT, logs, env)


def workers(proc: _Process) -> dict[int, int]:
    """rank -> pid of the job's training processes."""
    found = {}
    for pid in _children(proc.pid):
        rank = _worker_rank(pid)
        if rank is not None:
            found[rank] = pid
    return found


def wait(predicate, proc: _Process, timeout: float) -> bool:
    """Poll `predicate` until true (True), or until the job exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def incomplete_checkpoints(root: Path) -> list[str]:
    """Published checkpoint directories that fail validation (a .tmp is a save in flight or killed)."""
    bad = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if p.name.endswith(".tmp"):
            continue
        try:
            ckpt.validate_checkpoint(p, 0)
        except ckpt.CheckpointError as e:
            bad.append(f"{p.name}: {e}")
    return bad


def run_cycle(kind: str, run_dir: Path, cache_dir: Path, args, logs: Path, rng: random.Random) -> dict:
    proc = start(run_dir, cache_dir, args.steps, args.interval, logs)
    done_before = len(records(run_dir))
    target = rng.randint(1, 2 * args.interval)  # steps this run trains before the fault
    ckpt_root = run_dir / "checkpoints"
    fault, note = None, ""
    try:
        if wait(lambda: len(records(run_dir)) >= done_before + target, proc, args.start_timeout):
            if kind == "sigkill-in-save":
                if wait(lambda: any(ckpt_root.glob("step_*.tmp")), proc, 120):
                    fault = "SIGKILL during an async save"
                else:
                    note = "no save seen in flight"
            else:
                time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next step
                fault = "SIGKILL mid-step" if kind == "sigkill-rank" else "SIGTERM"
        ranks = workers(proc)
        if fault and ranks:
            if kind == "sigterm":
                for pid in ranks.values():
                    os.kill(pid, signal.SIGTERM)
            else:
                rank = rng.choice(sorted(ranks))
                os.kill(ranks[rank], signal.SIGKILL)
                fault += f" of rank {rank}"
        elif fault:
            fault, note = None, "no workers found"
        rc = proc.wait(args.start_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = [line for line in proc.stdout.splitlines() if line.startswith("resumed from")]
    return {"kind": kind, "fault": fault, "note": note, "rc": rc, "resumed": resumed[-1] if resumed else None,
            "steps_logged": len(records(run_dir)) - done_before, "incomplete": incomplete_checkpoints(ckpt_root),
            "stderr_tail": proc.stderr[-1500:] if rc not in (0, -9, 1) else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=6, help="interrupted runs before the final one")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--interval", type=int, default=3, help="checkpoint.interval")
    p.add_argument("--time-limit", type=float, default=1200, help="seconds; no new cycle starts after it")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fault-soak-"))
    cache_dir, rng, t0 = out / "cache", random.Random(args.seed), time.time()

    print(f"fault soak in {out}: EP2 x async checkpoints every {args.interval} steps, {args.steps} steps, "
          f"up to {args.cycles} cycles / {args.time_limit:.0f} s", flush=True)
    ref = start(out / "reference", cache_dir, args.steps, args.interval, out / "logs" / "reference")
    if ref.wait(args.start_timeout) != 0:
        print(f"reference run failed ({ref.returncode}):\n{ref.stderr[-3000:]}")
        return 1
    reference = {r["step"]: r["loss"] for r in records(out / "reference")}
    print(f"reference: {len(reference)} steps in {time.time() - t0:.0f} s", flush=True)

    run_dir, survived, faults = out / "run", 0, []
    for cycle in range(args.cycles):
        if time.time() - t0 > args.time_limit:
            print(f"time limit reached after {cycle} cycles")
            break
        kind = KINDS[cycle % len(KINDS)]
        result = run_cycle(kind, run_dir, cache_dir, args, out / "logs" / f"cycle{cycle:02d}", rng)
        faults.append(result)
        # Survived: no published checkpoint left incomplete, and a SIGTERM ended in a clean exit.
        ok = not result["incomplete"] and (kind != "sigterm" or result["fault"] is None or result["rc"] == 0)
        survived += ok
        print(f"cycle {cycle}: {result['fault'] or 'no fault (' + result['note'] + ')'}; exit {result['rc']}; "
              f"{result['steps_logged']} steps logged; {result['resumed'] or 'fresh start'}"
              + (f"; INCOMPLETE {result['incomplete']}" if result["incomplete"] else "")
              + (f"\n{result['stderr_tail']}" if result["stderr_tail"] else ""), flush=True)
        if any(r["step"] == args.steps for r in records(run_dir)):
            break
    final = start(run_dir, cache_dir, args.steps, args.interval, out / "logs" / "final")
    rc = final.wait(args.start_timeout)
    got = records(run_dir)
    diverged = [(r["step"], r["loss"], reference.get(r["step"])) for r in got
                if reference.get(r["step"]) is None or abs(r["loss"] - reference[r["step"]]) > 1e-6 * abs(reference[r["step"]])]
    max_diff = max((abs(r["loss"] - reference[r["step"]]) for r in got if r["step"] in reference), default=0.0)
    root = run_dir / "checkpoints"
    leftovers = sorted(p.name for p in root.glob("step_*.tmp")) + incomplete_checkpoints(root)
    complete = sorted({r["step"] for r in got}) == list(range(1, args.steps + 1))
    takeovers = sum(f.read_text().count("taking over a stale lock") for f in (out / "logs").glob("*/stderr"))
    print(f"final run: exit {rc}; steps 1..{args.steps} all logged: {complete}; {len(got)} records "
          f"({len(got) - args.steps} steps retrained after faults); stale run.dir locks taken over: {takeovers}")
    print(f"cycles survived: {survived}/{len(faults)}; diverged steps: {len(diverged)} {diverged[:5] or ''}; "
          f"max |loss - reference| {max_diff:.3g}; incomplete checkpoint dirs left: {leftovers or 'none'}; "
          f"{time.time() - t0:.0f} s in all")
    return 0 if rc == 0 and complete and not diverged and not leftovers and survived == len(faults) else 1


if __name__ == "__main__":
    sys.exit(main())
