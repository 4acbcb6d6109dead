"""AdamW with decoupled weight decay on matrices only (no decay on norms and biases)."""

from __future__ import annotations

import torch
from torch import nn

from train.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: >= 2-D weights decay; 1-D parameters (norm scales, biases) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach=True is the fast multi-tensor path on CPU and CUDA and works with DTensor.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return make_adamw(parameter_groups(model, cfg.weight_decay), cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
