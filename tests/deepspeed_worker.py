"""Ranks of tests/test_deepspeed.py: several DeepSpeed (and FSDP2) runs in one multi-rank launch."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from parallel.context import ParallelContext
from parallel.mesh import init_distributed
from parallel.state import full_state_dict
from tests.parity_worker import REPO, history_metrics
from train.config import load_config
from train.trainer import Trainer


def engine_state_bytes(trainer: Trainer) -> dict[str, int]:
    """What DeepSpeed allocated on this rank for the optimizer: the fp32 master partitions, the AdamW
    moments, and (offload) the fp32 gradient partitions the host-side update reads."""
    if not trainer.deepspeed:
        return {}
    zero = trainer.optimizer.engine.optimizer
    masters = zero.single_partition_of_fp32_groups
    moments = [v for st in zero.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    grads = [m.grad for m in masters if m.grad is not None] if zero.cpu_offload else []
    return {"state": sum(t.numel() * t.element_size() for t in masters + moments),
            "host_grads": sum(t.numel() * t.element_size() for t in grads)}


def poison_gradient(trainer: Trainer, step: int) -> None:
    """The head weight's gradient becomes non-finite in optimizer step `step` (the step must be skipped)."""
    weight = trainer.model.lm_head.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step + 1 == step else g)


def run_one(overrides: list[str], single: bool = False, nonfinite_step: int = 0) -> dict:
    """One training run (`single`: the single-process reference, in this rank alone; `nonfinite_step`:
    that step's gradient is poisoned)."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    ctx = ParallelContext.single() if single else init_distributed(cfg.parallel, cfg.model)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ctx)
    if nonfinite_step:
        poison_gradient(trainer, nonfinite_step)
    history = trainer.fit()
    state = full_state_dict(trainer.model, ctx)
    return {"metrics": history_metrics(history), "engine_bytes": engine_state_bytes(trainer), "steps": [h["step"] for h in history], "state": state,
            "resumed": trainer.resumed_from is not None, "skipped_steps": trainer.skipped_steps, "seconds": time.perf_counter() - t0}


def run_many(rank: int, runs: list[tuple[str, list[str], bool, int]], tmp: str) -> dict:
    """`runs`: (label, overrides, single, nonfinite_step) in order; a single-process run's dir names RANKDIR,
    replaced by this rank's."""
    out = {}
    try:
        for label, overrides, single, nonfinite_step in runs:
            if single:
                overrides = [o.replace("RANKDIR", f"rank{rank}") for o in overrides]
            out[label] = run_one(overrides, single, nonfinite_step)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return out
