"""LR warmup -> constant -> cosine, and the piecewise lambda / gamma schedules."""

from __future__ import annotations

import math

import pytest

from train.config import OptimConfig, PiecewiseSchedule
from train.schedules import Schedules, lr_at, piecewise_at


def test_lr_warmup_constant_cosine():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, constant_steps=5, decay_steps=20)
    assert lr_at(0, o, 100) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, o, 100) == pytest.approx(0.5)
    assert lr_at(9, o, 100) == pytest.approx(1.0)
    assert lr_at(10, o, 100) == lr_at(14, o, 100) == 1.0  # constant phase
    assert lr_at(15, o, 100) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(25, o, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert lr_at(25, o, 100) == pytest.approx(0.55)
    assert lr_at(35, o, 100) == pytest.approx(0.1)  # decay done
    assert lr_at(99, o, 100) == pytest.approx(0.1)


def test_lr_decay_defaults_to_the_end_of_training():
    o = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0, constant_steps=0, decay_steps=None)
    assert lr_at(0, o, 11) == pytest.approx(2.0)
    assert lr_at(5, o, 11) == pytest.approx(1.0 + math.cos(math.pi * 5 / 11))
    assert lr_at(11, o, 11) == pytest.approx(0.0)
    values = [lr_at(s, o, 11) for s in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_piecewise_by_steps_and_tokens():
    lam = PiecewiseSchedule(values=[0.3, 0.1], boundaries=[100], unit="steps")
    assert piecewise_at(lam, 0, 0, 9.9) == 0.3
    assert piecewise_at(lam, 99, 0, 9.9) == 0.3
    assert piecewise_at(lam, 100, 0, 9.9) == 0.1
    gamma = PiecewiseSchedule(values=[0.001, 0.0], boundaries=[5000], unit="tokens")
    assert piecewise_at(gamma, 10**6, 4999, 1.0) == 0.001
    assert piecewise_at(gamma, 0, 5000, 1.0) == 0.0
    assert piecewise_at(PiecewiseSchedule(), 3, 3, 0.25) == 0.25  # empty -> model default


def test_schedules_bundle_uses_model_defaults():
    s = Schedules(OptimConfig(lr=1.0, warmup_steps=0), PiecewiseSchedule(), PiecewiseSchedule(values=[0.5, 0.0], boundaries=[2]),
                  total_steps=10, mtp_default=0.3, gamma_default=0.001)
    assert s.mtp_weight(5, 0) == 0.3
    assert s.bias_update_speed(1, 0) == 0.5 and s.bias_update_speed(2, 0) == 0.0
