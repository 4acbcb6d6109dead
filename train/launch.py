"""Run a configured job in this process: set up ranks, lock run.dir, train, report, sample."""

from __future__ import annotations

import torch.distributed as dist

from parallel.layout import LayoutError
from parallel.mesh import init_distributed
from train.config import Config, ConfigError
from train.run_lock import take_run_dir


def run(cfg: Config) -> int:
    from train.trainer import Trainer

    try:
        ctx = init_distributed(cfg.parallel, cfg.model)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
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
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
