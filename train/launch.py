"""Run a configured job in this process: set up ranks, train, report, sample."""

from __future__ import annotations

import os

from parallel.context import ParallelContext
from train.config import Config


def build_context(cfg: Config) -> ParallelContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ParallelContext.single()
    raise SystemExit(
        f"WORLD_SIZE={world}: multi-process layouts arrive with the distributed core; run a single process for now"
    )


def run(cfg: Config) -> int:
    from train.trainer import Trainer

    ctx = build_context(cfg)
    trainer = Trainer(cfg, ctx)
    history = trainer.fit()
    if ctx.is_main and history:
        first, last = history[0], history[-1]
        print(f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"run dir {cfg.run.dir}", flush=True)
        if cfg.train.sample_prompt:
            print("---- sample ----")
            print(trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens))
            print("----------------", flush=True)
    return 0
