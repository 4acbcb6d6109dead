"""Run a configured job in this process: set up ranks, lock run.dir, train, report, sample."""

from __future__ import annotations

import gc
from typing import Any, Optional

import torch.distributed as dist

from parallel.context import ParallelContext
from parallel.layout import LayoutError
from parallel.mesh import init_distributed
from train.checkpoint import forget_checkpoint_group
from train.config import Config, ConfigError
from train.run_lock import take_run_dir


def run(cfg: Config) -> int:
    try:
        ctx = init_distributed(cfg.parallel, cfg.model)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    mesh = ctx.mesh
    try:
        return _train(cfg, ctx)
    finally:
        del ctx  # with the trainer gone (on success), nothing of ours holds a process group
        if dist.is_initialized():
            end_process_groups(mesh)


def _train(cfg: Config, ctx: ParallelContext) -> int:
    from train.trainer import Trainer

    lock = None
    try:
        lock = take_run_dir(cfg.run.dir, ctx)  # one run per run.dir (train/run_lock.py)
        trainer = Trainer(cfg, ctx)
        history = trainer.fit()
        if ctx.is_main and history:
            first, last = history[0], history[-1]
            print(f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
                  f"run dir {cfg.run.dir}", flush=True)
            evaluated = [m for m in history if "val_loss" in m]
            if evaluated:
                m = evaluated[-1]
                mtp = f", MTP {m['val_mtp_loss']:.4f}" if "val_mtp_loss" in m else ""
                print(f"validation loss at step {m['step']}: {m['val_loss']:.4f}{mtp} "
                      f"({m['val_tokens']:,} held-out tokens)", flush=True)
            # A stop request (SIGTERM) gets the remainder of the step and the save, nothing more.
            if cfg.train.sample_prompt and ctx.world_size == 1 and not trainer.stopped_early:
                print("---- sample ----")
                print(trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens))
                print("----------------", flush=True)
    finally:
        if lock is not None:
            lock.release()
    return 0


def end_process_groups(mesh: Optional[Any]) -> None:
    """Destroy every process group and let their gloo worker threads end now, not at interpreter exit.

    `destroy_process_group` only unregisters the groups (gloo has no shutdown); a ProcessGroupGloo
    joins its worker threads when its last reference goes. Left to interpreter finalisation, a worker
    still releasing the last collective's tensors needs the GIL, is killed by Python's shutdown
    (pthread_exit through a noexcept frame) and the rank aborts: "terminate called without an active
    exception" (SIGABRT). The mesh keeps its groups in a registry, and torch's DTensor caches keep the
    mesh, so the registry is emptied; our async-save group is dropped; cycles are collected. On an
    error path the traceback may still hold the trainer: its groups then end at exit, as before.
    """
    dist.destroy_process_group()
    registry = getattr(mesh, "_pg_registry", None)  # DeviceMesh's group-name -> ProcessGroup map
    if registry:
        registry.clear()
    forget_checkpoint_group()
    gc.collect()
