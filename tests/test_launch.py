"""launch/torchrun.sh and launch/slurm.sbatch: argument handling, defaults, and a real 2-process run.

The Slurm script runs for real in tests/test_slurm.py; here it runs under stub `srun`/`scontrol`
so that its arithmetic (agents, processes per node, head node, rendezvous) is checked on any
machine, Slurm or not.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.distributed import run_ranks
from tests.trainer_helpers import small_overrides

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARS and not k.startswith("SLURM_") and k not in ("NPROC", "NPROC_PER_NODE")}
    env.update(extra)
    return env


def torchrun_sh(repo_root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo_root / "launch" / "torchrun.sh"), *args], cwd=repo_root,
                          env=clean_env(**env), capture_output=True, text=True, timeout=600)


def no_gpu_path(tmp_path: Path) -> str:
    """PATH without nvidia-smi (a machine with GPUs would otherwise change the default)."""
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists()]
    return os.pathsep.join(dirs)


# ---------------------------------------------------------------- torchrun.sh
def test_torchrun_sh_defaults_to_one_process_without_gpus(repo_root, tmp_path):
    out = torchrun_sh(repo_root, "configs/tiny.yaml", "train.steps=3", "run.name=a b",
                      DRY_RUN="1", PATH=no_gpu_path(tmp_path))
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc-per-node") + 1] == "1"
    assert "--standalone" in argv
    # Overrides pass through unchanged (quoting survives), after the config.
    assert argv[argv.index("-m", 3):] == ["-m", "train", "--config", "configs/tiny.yaml", "train.steps=3", "run.name=a b"]


def test_torchrun_sh_uses_gpu_count(repo_root, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: x)\"; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = torchrun_sh(repo_root, "configs/tiny.yaml", DRY_RUN="1", PATH=f"{fake}{os.pathsep}{no_gpu_path(tmp_path)}")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[argv.index("--nproc-per-node") + 1] == "4"


def test_torchrun_sh_nproc_and_extra_args(repo_root):
    out = torchrun_sh(repo_root, "configs/tiny.yaml", DRY_RUN="1", NPROC="3", TORCHRUN_ARGS="--max-restarts 2")
    argv = shlex.split(out.stdout)
    assert argv[argv.index("--nproc-per-node") + 1] == "3"
    assert argv[argv.index("--max-restarts") + 1] == "2"


@pytest.mark.parametrize(
    "args, env, message",
    [
        ((), {}, "torchrun.sh CONFIG"),
        (("configs/nope.yaml",), {}, "config file not found: configs/nope.yaml"),
        (("configs/tiny.yaml",), {"NPROC": "two"}, "NPROC must be a positive integer"),
        (("configs/tiny.yaml",), {"NPROC": "0"}, "NPROC must be a positive integer"),
    ],
)
def test_torchrun_sh_usage_errors(repo_root, args, env, message):
    out = torchrun_sh(repo_root, *args, **env)
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.multirank
def test_torchrun_sh_two_processes(repo_root, tmp_path):
    """NPROC=2 on this CPU machine: gloo, EP=2 over dp_shard auto (= 2); only rank 0 logs."""
    run_dir = tmp_path / "run"
    overrides = small_overrides(run_dir, tmp_path / "cache", **{
        "train.steps": 4, "train.micro_batch_size": 2, "train.threads": 1, "checkpoint.at_end": "false",
        "parallel.ep": 2,  # no parallel.dp_shard: auto fills the 2 processes
    })
    out = torchrun_sh(repo_root, "configs/tiny.yaml", *overrides, NPROC="2", OMP_NUM_THREADS="1",
                      PYTHONUNBUFFERED="1")
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert "--nproc-per-node 2" in out.stderr  # the script echoes the command it runs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert out.stdout.count("trained steps") == 1
    assert "dp_shard: 2" in (run_dir / "config.yaml").read_text()  # the run records the resolved degree


def test_torchrun_sh_config_error_exits_2(repo_root, tmp_path):
    """A bad override fails in every process with the key named, and the launcher's exit is non-zero."""
    out = torchrun_sh(repo_root, "configs/tiny.yaml", "train.stepz=3", f"run.dir={tmp_path}/r", NPROC="1")
    assert out.returncode != 0
    assert "train.stepz" in out.stderr


# ---------------------------------------------------------------- slurm.sbatch
def sbatch_header(repo_root: Path) -> tuple[list[str], str]:
    text = (repo_root / "launch" / "slurm.sbatch").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("#!")
    # sbatch reads #SBATCH lines only until the first command: all of them must come first.
    first_command = next(i for i, l in enumerate(lines[1:], 1) if l.strip() and not l.startswith("#"))
    directives = [l.split()[1] for l in lines[1:first_command] if l.startswith("#SBATCH")]
    assert not any(l.startswith("#SBATCH") for l in lines[first_command:]), "#SBATCH after the first command"
    return directives, text


def test_sbatch_defaults_at_the_top(repo_root):
    directives, text = sbatch_header(repo_root)
    opts = dict(d.split("=", 1) if "=" in d else (d, "") for d in directives)
    assert "--requeue" in opts
    assert opts["--open-mode"] == "append"  # a requeued job appends to its log
    assert "%j" in opts["--output"]  # one log per job
    assert opts["--ntasks-per-node"] == "1"
    assert opts["--signal"].startswith("B:USR1@")
    for key in ("--job-name", "--nodes", "--gpus-per-node", "--time"):
        assert key in opts
    subprocess.run(["bash", "-n", str(repo_root / "launch" / "slurm.sbatch")], check=True)


def stub_slurm(tmp_path: Path) -> Path:
    """`scontrol show hostnames` and `srun` stand-ins; srun records its argv and runs nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        "if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-07\\ngpu-node-08\\n'; exit 0; fi\n"
        f"echo \"$@\" >> {tmp_path}/scontrol.calls\n"
    )
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/srun.argv\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_sbatch_script(repo_root: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = stub_slurm(tmp_path)
    slurm_env = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="1",
                     SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_SUBMIT_DIR=str(repo_root),
                     PLAN="0", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm_env.update(env)
    return subprocess.run(["bash", str(repo_root / "launch" / "slurm.sbatch"), *args], cwd=repo_root,
                          env=clean_env(**slurm_env), capture_output=True, text=True, timeout=120)


def test_sbatch_script_builds_the_rendezvous(repo_root, tmp_path):
    out = run_sbatch_script(repo_root, tmp_path, "configs/deepseek_v3_16b.yaml", "parallel.ep=8", "run.name=x y")
    assert out.returncode == 0, out.stdout + out.stderr
    argv = (tmp_path / "srun.argv").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in argv
    i = argv.index("torch.distributed.run")
    tr = argv[i + 1:]
    assert tr[tr.index("--nnodes") + 1] == "2"  # one agent per srun task
    assert tr[tr.index("--nproc-per-node") + 1] == "8"  # GPUs on the node / tasks per node
    assert tr[tr.index("--rdzv-backend") + 1] == "c10d"
    assert tr[tr.index("--rdzv-endpoint") + 1] == f"gpu-node-07:{29500 + 4242 % 1000}"
    assert tr[tr.index("--rdzv-id") + 1] == "moeforge-4242"
    assert tr[tr.index("-m") :] == ["-m", "train", "--config", "configs/deepseek_v3_16b.yaml", "parallel.ep=8",
                                   "run.name=x y"]
    assert "world 16" in out.stdout


def test_sbatch_script_env_overrides(repo_root, tmp_path):
    out = run_sbatch_script(repo_root, tmp_path, "configs/tiny.yaml", NPROC_PER_NODE="1", RDZV_PORT="31000",
                            SLURM_GPUS_ON_NODE="")
    assert out.returncode == 0, out.stdout + out.stderr
    tr = (tmp_path / "srun.argv").read_text().splitlines()
    assert tr[tr.index("--nproc-per-node") + 1] == "1"
    assert tr[tr.index("--rdzv-endpoint") + 1] == "gpu-node-07:31000"


def test_sbatch_script_preflight_rejects_bad_layout(repo_root, tmp_path):
    """The pre-flight plan runs on one process and stops the job before srun on a layout error."""
    out = run_sbatch_script(repo_root, tmp_path, "configs/tiny.yaml", "parallel.dp_shard=3", PLAN="1")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "parallel" in out.stderr and "16" in out.stderr  # the world size the layout must match
    assert "pre-flight check failed" in out.stderr
    assert not (tmp_path / "srun.argv").exists()


def test_sbatch_script_requires_slurm(repo_root, tmp_path):
    out = subprocess.run(["bash", str(repo_root / "launch" / "slurm.sbatch"), "configs/tiny.yaml"], cwd=repo_root,
                         env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "must run under Slurm" in out.stderr
    out = subprocess.run(["bash", str(repo_root / "launch" / "slurm.sbatch")], cwd=repo_root,
                         env=clean_env(SLURM_JOB_ID="1"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
    assert re.search(r"CONFIG", out.stderr)


# ---------------------------------------------------------------- teardown
def gloo_threads() -> int:
    """This process's gloo worker and transport threads (Linux thread names)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(name.startswith(("pt_gloo", "gloo_tcp")) for name in names)


def run_and_count_gloo_threads(rank: int, overrides: list[str]) -> tuple[int, int, int]:
    """(run's exit code, gloo threads left, our background threads left: async-save writer, EMA blend)."""
    import threading

    from train.config import load_config
    from train.launch import run

    code = run(load_config("configs/tiny.yaml", overrides))
    return code, gloo_threads(), sum(t.name.startswith("moeforge_") for t in threading.enumerate())


@pytest.mark.multirank
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from Linux /proc")
@pytest.mark.parametrize("async_save", [False, True], ids=["no_save", "async_save"])
def test_run_ends_its_gloo_threads_before_exit(tmp_path, async_save):
    """launch.run returns with every process group's gloo threads joined: left to interpreter exit,
    a worker releasing the last collective's tensors needs the GIL and the rank aborts (SIGABRT).
    With checkpoint.async_save the save's background writer and its group end before the groups do,
    and the EMA's background thread (train.ema_decay) ends with the run too."""
    overrides = small_overrides(tmp_path / "run", tmp_path / "cache", **{
        "train.steps": 1, "train.micro_batch_size": 2, "checkpoint.at_end": str(async_save).lower(),
        "checkpoint.async_save": str(async_save).lower(), "train.ema_decay": 0.9 if async_save else 0.0,
        "parallel.dp_shard": 2, "parallel.ep": 2,
    })
    assert run_ranks(2, run_and_count_gloo_threads, overrides) == [(0, 0, 0), (0, 0, 0)]
