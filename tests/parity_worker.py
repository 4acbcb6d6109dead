"""One training run as a rank of a multi-rank parity test (or as the single-process reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from parallel.mesh import init_distributed
from parallel.state import full_state_dict
from train.config import load_config
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


METRICS = ("loss", "mtp_loss", "aux_loss", "grad_norm")


def history_metrics(history: list[dict]) -> dict[str, list[float]]:
    """Per-step values of METRICS (empty for one the model has not, e.g. mtp_loss without MTP)."""
    return {k: [float(h[k]) for h in history if k in h] for k in METRICS}


def train_and_report(rank: int, overrides: list[str], config: str = "tiny.yaml") -> dict:
    """Train with `overrides` on configs/`config`; return per-step metrics and final full state."""
    cfg = load_config(REPO / "configs" / config, overrides)
    ctx = init_distributed(cfg.parallel, cfg.model)
    try:
        trainer = Trainer(cfg, ctx)
        history = trainer.fit()
        state = full_state_dict(trainer.model, ctx)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {"metrics": history_metrics(history), "state": state}
