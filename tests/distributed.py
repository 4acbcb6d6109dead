"""Harness for multi-rank tests: N gloo processes on this machine, results back to the test.

`run_ranks(n, fn, *args)` spawns n processes (torch.multiprocessing, spawn start
method), sets torchrun's environment variables in each (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls `fn(rank, *args)` and returns the
values every rank returned (saved with torch.save, loaded with weights_only=True).
A rank that raises makes the whole call fail with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # n processes share 2 cores
    try:
        result = fn(rank, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 600) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=False)
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("*.err")))
            raise RuntimeError(f"a rank failed:\n{errors or e}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
