"""launch/slurm.sbatch on a real Slurm cluster: a local single-node one brought up for the test.

The fixture starts slurmctld + slurmd (Slurm from Debian's packages; `.ci/run` installs them)
with everything under a temp dir: auth/none, cred/none, proctrack/linuxproc, task/none,
select/cons_tres, node `localhost` with CPUs=2, free ports, SLURM_CONF pointing at it.

The test submits the sbatch script with the tiny config on 2 tasks (1 node; srun starts one
torchrun agent per task, they meet through the c10d rendezvous on the head node from
`scontrol show hostnames`), then plays the time-limit warning the script asks for
(`#SBATCH --signal=B:USR1@300`) once the first periodic checkpoint exists: the script makes
the trainer checkpoint and requeues the job; the rerun resumes from that checkpoint and
finishes. It asserts the job COMPLETED after exactly one restart, every step was trained once,
the loss fell, and then stops the daemons it started by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.trainer_helpers import small_overrides

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
STEPS, CKPT_INTERVAL = 60, 10

SLURM_CONF = """\
ClusterName=moeforge-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=15
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """slurmctld + slurmd on localhost; `stop()` ends exactly the two daemons it started."""

    def __init__(self) -> None:
        # A short path: slurmd puts unix sockets in its spool dir (108-byte limit).
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        (self.dir / "state").mkdir()
        (self.dir / "spool").mkdir()
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(
            d=self.dir, ctld_port=free_port(), slurmd_port=free_port(), user=os.environ.get("USER", "root")))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        for argv, log in (
            (["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out"),
            (["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd.out"),
        ):
            out = open(self.dir / log, "w")
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            state = self.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node localhost never became idle (state {state!r}):\n{self.logs()}")

    def run(self, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=60, **kw)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.out"))
                         if p.is_file())

    def stop(self) -> None:
        jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if jobs:
            self.run(["scancel", *jobs], check=False)
        for p in reversed(self.procs):  # slurmd first, then slurmctld
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def slurm():
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}); on Debian/Ubuntu: "
                    "apt-get install slurmctld slurmd slurm-client (.ci/run does this)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmd as root (it starts jobs as their user); run as root")
    cluster = LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_sbatch_two_tasks_requeue_resumes_and_completes(slurm, repo_root, tmp_path):
    t0 = time.time()
    run_dir, cache_dir, log = tmp_path / "run", tmp_path / "cache", tmp_path / "job.log"
    overrides = small_overrides(
        run_dir, cache_dir,
        **{"train.steps": STEPS, "train.micro_batch_size": 2, "train.threads": 1,
           "checkpoint.interval": CKPT_INTERVAL, "parallel.dp_shard": 2, "parallel.ep": 2},
    )
    env = {k: v for k, v in slurm.env.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(NPROC_PER_NODE="1", RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MOEFORGE_ROOT=str(repo_root))
    # The script's #SBATCH defaults are for a GPU cluster; the command line overrides them.
    submit = slurm.run(
        ["sbatch", "--parsable", "--job-name=moeforge-test", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
         "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", f"--output={log}",
         str(repo_root / "launch" / "slurm.sbatch"), "configs/tiny.yaml", *overrides],
        cwd=repo_root, env=env,
    )
    job_id = submit.stdout.strip().split(";")[0]

    def log_text() -> str:
        return log.read_text() if log.exists() else "(no job log)"

    def fail(why: str) -> None:
        pytest.fail(f"{why}\njob: {slurm.job(job_id)}\n--- job log\n{log_text()[-6000:]}\n{slurm.logs()}")

    # Once the first periodic checkpoint exists, send what `--signal=B:USR1@300` sends near the time limit.
    first_ckpt = run_dir / "checkpoints" / f"step_{CKPT_INTERVAL:08d}" / "COMPLETE"
    deadline = time.time() + 240
    while not first_ckpt.exists():
        if slurm.job(job_id).get("JobState") in TERMINAL or time.time() > deadline:
            fail("the job ended or stalled before its first checkpoint")
        time.sleep(0.1)
    t_ckpt = time.time() - t0
    slurm.run(["scancel", "--batch", "--signal=USR1", job_id])

    # Requeued jobs wait for a BeginTime (~2 min by default); start it sooner, but not within the
    # second of the requeue: slurmd refuses a batch launch whose credential is not newer than the
    # revocation of the previous run's (1 s resolution): "Job N already killed, do not launch batch job".
    pending_since = None
    while True:
        info = slurm.job(job_id)
        state, restarts = info.get("JobState"), int(info.get("Restarts", "0"))
        if state in TERMINAL and restarts >= 1:
            break
        if state in TERMINAL - {"COMPLETED"}:
            fail(f"job ended in {state} before it was requeued")
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            pending_since = pending_since or time.time()
            if time.time() - pending_since >= 2:
                slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        if time.time() > deadline:
            fail("the job did not finish in time")
        time.sleep(0.5)

    text = log_text()
    if state != "COMPLETED":
        fail(f"job ended in {state}")
    assert restarts == 1, info
    # One log per job, appended across the requeue.
    assert "(restart 0)" in text and "(restart 1)" in text, text[-4000:]
    assert "2 agents x 1 processes = world 2" in text and "rendezvous localhost:" in text
    assert "time limit near" in text
    # Only the training processes got SIGTERM: the step was not cancelled and no agent was signalled.
    for symptom in ("forcing job termination", "death signal", "SignalException"):
        assert symptom not in text, (symptom, text[-4000:])
    assert not re.search(r"STEP \S+ ON \S+ CANCELLED", text), text[-4000:]  # the job itself is, by the requeue
    assert re.search(r"SIGTERM to [12] training processes", text), text[-4000:]
    resumed = re.search(r"resumed from \S+step_(\d+) \(step (\d+)\)", text)
    assert resumed, text[-4000:]
    resumed_step = int(resumed.group(2))
    assert CKPT_INTERVAL <= resumed_step < STEPS

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    # The final checkpoint on the way out was written after the last step the first run logged,
    # so the rerun continues exactly where it stopped: every step once.
    assert steps == list(range(1, STEPS + 1)), steps
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.5, losses
    print(f"slurm job {job_id}: first checkpoint after {t_ckpt:.0f}s, resumed at step {resumed_step}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {time.time() - t0:.0f}s in all")
