"""One run per run.dir: an exclusive lock file, taken once per job by global rank 0.

RUN_DIR/run.lock is created with O_CREAT|O_EXCL (atomic on local disks, NFS and Lustre)
and holds JSON naming its holder: host, PID, the process start time (so a reused PID is
not mistaken for the holder), the Slurm job id and restart count, and when it was taken.
While the run lives, a thread refreshes the file's mtime every `heartbeat_s`.

A run that finds the lock held:
  * holder on this host and its process gone, or on another host with no heartbeat for
    `stale_after_s` (or an unreadable lock file): the lock is stale; it is taken over, logged;
  * holder alive and of the same Slurm job (a requeue that started before the previous run's
    processes were gone): wait until the holder is gone or stale, at most `requeue_wait_s`;
  * otherwise: refuse with RunDirLockedError naming the holder.

Only global rank 0 touches the lock (run.dir is one directory on shared storage, whatever the
number of nodes); `take_run_dir` tells every rank the outcome so that all fail together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from parallel.context import ParallelContext

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirError(RuntimeError):
    """run.dir cannot be used: it is a file, or cannot be created."""


class RunDirLockedError(RunDirError):
    """Another live run holds run.dir's lock."""


def _process_start(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (Linux /proc), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime


def _alive(pid: int, start: Optional[int]) -> bool:
    """Whether process `pid` (started at `start`) still runs on this host."""
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """The holder recorded in a lock file, for messages: pid, host, Slurm job, since when."""
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    since = holder.get("since")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(since))}" if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}{when}"


class RunLock:
    """The lock of one run directory; `acquire()` takes it (or raises), `release()` gives it back."""

    def __init__(self, run_dir: Path, stale_after_s: float = 180.0, heartbeat_s: float = 30.0,
                 requeue_wait_s: Optional[float] = None, poll_s: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_after_s, self.heartbeat_s, self.poll_s = stale_after_s, heartbeat_s, poll_s
        self.requeue_wait_s = stale_after_s + heartbeat_s if requeue_wait_s is None else requeue_wait_s
        self.host = socket.gethostname()
        self.me = {
            "host": self.host,
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    # ------------------------------------------------------------ taking it
    def acquire(self) -> None:
        prepare_run_dir(self.run_dir)
        deadline = time.monotonic() + self.requeue_wait_s
        waited = False
        while True:
            if self._create():
                self._start_heartbeat()
                return
            text, holder = self._read()
            if text is None:  # removed between our attempt and the read: try again
                continue
            stale = self._stale_reason(holder)
            if stale:
                self._take_over(text, holder, stale)
                continue
            if not holder:  # being written right now (or its writer died: stale after a few polls)
                time.sleep(self.poll_s)
                continue
            same_job = self.me["job_id"] is not None and str(holder.get("job_id")) == self.me["job_id"]
            if same_job and time.monotonic() < deadline:
                if not waited:
                    log.warning("run.dir %s: the previous run of this Slurm job (%s) still holds its lock; "
                                "waiting up to %.0f s for it to exit", self.run_dir, describe(holder),
                                self.requeue_wait_s)
                    waited = True
                time.sleep(self.poll_s)
                continue
            raise RunDirLockedError(
                f"run.dir {self.run_dir} is in use by another run ({describe(holder)}); "
                f"stop that run, or use another run.dir (lock file {self.path})")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[Optional[str], dict[str, Any]]:
        """(raw text, parsed holder) of the lock file; (None, {}) if it is gone."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, {}
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}
        return text, holder if isinstance(holder, dict) else {}

    def _stale_reason(self, holder: dict[str, Any]) -> Optional[str]:
        """Why the lock `holder` describes is stale, or None while its holder may still run."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if "pid" not in holder or "host" not in holder:
            # An unreadable lock: a holder that died while writing it, or one being written right now.
            return f"unreadable lock file, untouched for {age:.0f} s" if age > self.poll_s * 5 else None
        if holder["host"] == self.host:
            if not _alive(int(holder["pid"]), holder.get("pid_start")):
                return "its process is gone"
            return None
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after_s:.0f} s)"
        return None

    def _take_over(self, text: str, holder: dict[str, Any], reason: str) -> None:
        """Move the stale lock aside (atomic rename: one contender wins), then retry creating ours."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me['token']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            if aside.read_text() != text:  # a fresh lock replaced the stale one meanwhile: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return
        finally:
            aside.unlink(missing_ok=True)
        log.warning("run.dir %s: taking over a stale lock (%s): %s", self.run_dir,
                    describe(holder) if holder else "no holder recorded", reason)

    # ------------------------------------------------------------ holding and releasing it
    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._heartbeat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        _, holder = self._read()
        if holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path) -> None:
    """Create run.dir (and parents); RunDirError if it is a file or cannot be created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir {run_dir} is a file, not a directory; point run.dir at a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(f"run.dir {run_dir}: a parent path is a file, not a directory") from None
    except OSError as e:
        raise RunDirError(f"run.dir {run_dir}: cannot create it ({e.strerror or e})") from None


def take_run_dir(run_dir: str | Path, ctx: ParallelContext, **lock_options: Any) -> Optional[RunLock]:
    """Rank 0 takes run.dir's lock (returned; release it at the end), other ranks get None.

    Collective: every rank raises if rank 0 could not take it, so that all stop together."""
    lock, problem = None, None
    if ctx.is_main:
        lock = RunLock(Path(run_dir), **lock_options)
        try:
            lock.acquire()
        except RunDirError as e:
            lock, problem = None, e
    if ctx.distributed:  # 0: taken; 1: run.dir unusable; 2: held by another run
        code = 0.0 if problem is None else 2.0 if isinstance(problem, RunDirLockedError) else 1.0
        code = float(ctx.all_reduce_sum(torch.tensor([code], device=ctx.device)))
        if problem is None and code:
            cls = RunDirLockedError if code == 2 else RunDirError
            problem = cls(f"run.dir {run_dir}: rank 0 could not take the run-directory lock (its error says why)")
    if problem is not None:
        raise problem
    return lock
