"""Learning-rate and coefficient schedules.

LR (DeepSeek-V3 §4.2 shape): linear warmup 0 -> lr over warmup_steps, constant for
constant_steps, cosine decay lr -> min_lr over decay_steps, then min_lr.
Piecewise-constant schedules drive the MTP weight lambda (0.3 -> 0.1) and the bias
update speed gamma (0.001 -> 0), by optimizer step or by tokens seen.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional

from train.config import OptimConfig, PiecewiseSchedule


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    step -= optim.warmup_steps
    if step < optim.constant_steps:
        return optim.lr
    step -= optim.constant_steps
    decay = optim.decay_steps
    if decay is None:
        decay = max(total_steps - optim.warmup_steps - optim.constant_steps, 1)
    if step >= decay:
        return optim.min_lr
    cosine = 0.5 * (1 + math.cos(math.pi * step / decay))
    return optim.min_lr + (optim.lr - optim.min_lr) * cosine


def piecewise_at(schedule: PiecewiseSchedule, step: int, tokens: int, default: float) -> float:
    """Value of a piecewise-constant schedule at this step / token count (default when empty)."""
    if not schedule.values:
        return default
    position = step if schedule.unit == "steps" else tokens
    return schedule.values[bisect.bisect_right(list(schedule.boundaries), position)]


class Schedules:
    """All per-step values the trainer needs, in one place."""

    def __init__(self, optim: OptimConfig, mtp: PiecewiseSchedule, gamma: PiecewiseSchedule,
                 total_steps: int, mtp_default: float, gamma_default: float) -> None:
        self.optim, self.mtp, self.gamma, self.total_steps = optim, mtp, gamma, total_steps
        self.mtp_default, self.gamma_default = mtp_default, gamma_default

    def lr(self, step: int) -> float:
        return lr_at(step, self.optim, self.total_steps)

    def mtp_weight(self, step: int, tokens: int) -> float:
        return piecewise_at(self.mtp, step, tokens, self.mtp_default)

    def bias_update_speed(self, step: int, tokens: int, default: Optional[float] = None) -> float:
        return piecewise_at(self.gamma, step, tokens, self.gamma_default if default is None else default)
