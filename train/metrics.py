"""Run outputs on rank 0: metrics.jsonl, a console line per log step with a progress bar,
and optional Weights & Biases / TensorBoard sinks."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from train.config import Config, LogConfig, to_yaml


def expert_load_stats(counts: Optional[torch.Tensor], biases: list[torch.Tensor]) -> dict[str, Any]:
    """Max/mean expert load per MoE layer from the step's global token counts [L, E]."""
    if counts is None or counts.numel() == 0:
        return {}
    counts = counts.float()
    ratio = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
    stats: dict[str, Any] = {
        "load_max_mean": float(ratio.mean()),
        "load_max_mean_worst": float(ratio.max()),
        "load_max_mean_per_layer": [round(float(r), 4) for r in ratio],
    }
    if biases:
        b = torch.stack([x.float() for x in biases])
        stats["router_bias_absmax"] = float(b.abs().max())
        stats["router_bias_std"] = float(b.std(dim=1).mean()) if b.shape[1] > 1 else 0.0
    return stats


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsLogger:
    """Writes metrics.jsonl and config.yaml; prints progress. Construct on every rank, acts on rank 0."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, total_steps: int) -> None:
        self.cfg, self.log_cfg, self.is_main, self.total = cfg, cfg.log, is_main, total_steps
        self.run_dir = run_dir
        self.start_time = time.time()
        self.start_step: Optional[int] = None
        self._wandb = None
        self._tb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self._tty = sys.stdout.isatty()
        if self.log_cfg.wandb:
            self._wandb = _init_wandb(cfg, run_dir, self.log_cfg)
        if self.log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of optimizer step `step` (1-based)."""
        if not self.is_main:
            return
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self.log_cfg.console:
            print(self._line(step, metrics), flush=True)

    def progress(self, step: int) -> None:
        """Redraw the progress bar in place (terminals only; logs get the per-step lines)."""
        if self.start_step is None:
            self.start_step = step - 1
        if self.is_main and self.log_cfg.progress and self._tty:
            sys.stdout.write("\r" + self._bar(step) + "\033[K")
            sys.stdout.flush()

    def _bar(self, step: int, width: int = 24) -> str:
        frac = step / self.total
        done = int(width * frac)
        elapsed = time.time() - self.start_time
        started = self.start_step or 0
        rate = (step - started) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        return f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {100 * frac:3.0f}% ETA {format_duration(eta)}"

    def _line(self, step: int, m: dict[str, Any]) -> str:
        parts = [f"step {step:>6}/{self.total}", f"loss {m['loss']:.4f}"]
        if "mtp_loss" in m:
            parts.append(f"mtp {m['mtp_loss']:.4f}")
        if m.get("aux_loss"):
            parts.append(f"aux {m['aux_loss']:.2e}")
        parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
        if "load_max_mean" in m:
            parts.append(f"load max/mean {m['load_max_mean']:.2f}")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        prefix = "\r\033[K" if self._tty and self.log_cfg.progress else ""
        suffix = f" | {self._bar(step)}" if self.log_cfg.progress else ""
        return prefix + " | ".join(parts) + suffix

    def close(self) -> None:
        if not self.is_main:
            return
        self.jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _init_wandb(cfg: Config, run_dir: Path, log_cfg: LogConfig):
    import wandb
    from omegaconf import OmegaConf

    return wandb.init(
        project=log_cfg.wandb_project,
        name=cfg.run.name,
        dir=str(run_dir),
        mode=log_cfg.wandb_mode,
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        resume="allow",
    )
