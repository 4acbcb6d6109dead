"""Training-level check: the same small DeepSeek-V3-shaped model, seed and data, 200 steps in BF16 and
in FP8 (DeepSeek-V3 recipe, emulated on CPU) through the real Trainer."""

from __future__ import annotations

import torch

from tests.trainer_helpers import small_overrides
from train.config import load_config
from train.trainer import Trainer

STEPS = 200
WINDOW = 20  # the loss "at the end": mean over the last 20 steps (identical batches in both runs)
BOUND = 0.005


def _run(repo_root, tmp_path, cache_dir, precision):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", small_overrides(
        tmp_path / precision, cache_dir, **{
            "train.precision": precision, "train.steps": STEPS, "train.seq_len": 32, "train.micro_batch_size": 4,
            "train.log_interval": STEPS, "optim.lr": 1e-3, "optim.warmup_steps": 20, "checkpoint.at_end": "false",
            "log.console": "false", "train.threads": 1,  # tiny ops: one thread is faster, and immune to a busy core
        }))
    trainer = Trainer(cfg)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.fit()
    moved = {n: float((p.detach() - start[n]).norm()) for n, p in trainer.model.named_parameters()}
    return trainer, history, moved


def test_fp8_vs_bf16_loss_after_200_steps(repo_root, tmp_path, tmp_path_factory):
    """Relative loss error of FP8 vs BF16 after 200 steps must stay below 0.5%.

    Why 0.5%: DeepSeek reports < 0.25% for FP8 vs BF16 at scale, where loss curves are smooth. On this
    ~0.3M-parameter model at lr 1e-3 the two runs drift apart from rounding alone: over seeds 0-3 the
    BF16-vs-FP32 difference of this same metric (mean loss of the last 20 steps) was up to 0.21%, and
    FP8-vs-BF16 0.02-0.14%. 0.5% is about 2.5x that rounding noise floor, so the test does not flake
    on a different CPU's rounding, yet fails on real breakage (e.g. dgrad losing its tile scales gave
    +20.7%). It is not a fine numerics test -- tiny models shrug off precision: E5M2 operands (0.04%),
    one mantissa bit (0.05%) and powers of two only (0.2%) all stay under the bound, which is why
    tests/test_fp8.py pins the numerics bit for bit. A second check catches silently lost weight
    gradients (which only moved the loss by 0.1% here): every FP8 layer's weights must move as far as
    in the BF16 run.
    """
    cache_dir = tmp_path_factory.mktemp("fp8_training_cache")
    threads = torch.get_num_threads()
    try:
        bf16, h_bf16, moved_bf16 = _run(repo_root, tmp_path, cache_dir, "bf16")
        fp8, h_fp8, moved_fp8 = _run(repo_root, tmp_path, cache_dir, "fp8")
    finally:
        torch.set_num_threads(threads)
    assert fp8.precision.fp8_modules and fp8.precision.name == "fp8"
    # same data in both runs: identical first-step loss up to FP8 forward noise
    assert abs(h_fp8[0]["loss"] - h_bf16[0]["loss"]) < 0.01 * h_bf16[0]["loss"]
    end_bf16 = sum(h["loss"] for h in h_bf16[-WINDOW:]) / WINDOW
    end_fp8 = sum(h["loss"] for h in h_fp8[-WINDOW:]) / WINDOW
    rel_err = (end_fp8 - end_bf16) / end_bf16
    print(f"\nFP8 vs BF16 after {STEPS} steps: loss {end_fp8:.4f} vs {end_bf16:.4f} "
          f"(mean of last {WINDOW}); relative error {rel_err:+.4%}; "
          f"last step {h_fp8[-1]['loss']:.4f} vs {h_bf16[-1]['loss']:.4f}; FP8 path: "
          f"{fp8.precision.describe(fp8.device)}")
    assert h_bf16[-1]["loss"] < h_bf16[0]["loss"] - 1.0  # both runs really trained
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in h_fp8)
    assert abs(rel_err) < BOUND, rel_err
    for name in fp8.precision.fp8_modules:
        for pname in ("weight", "gate_up_proj", "down_proj"):
            key = f"{name}.{pname}"
            if key in moved_fp8:
                ratio = moved_fp8[key] / moved_bf16[key]
                assert 0.8 < ratio < 1.25, (key, ratio)
