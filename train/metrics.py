"""Run outputs on rank 0: metrics.jsonl, a console line per log step with a progress bar,
and optional Weights & Biases / TensorBoard sinks.

metrics.jsonl keeps the names the trainer logs (`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...).
W&B and TensorBoard get the same scalars grouped into sections, so that each service lays out one
dashboard per run without any set-up:

  train/       loss, total_loss, mtp_loss, mtp_weight, aux_loss
  optim/       lr, grad_norm, skipped_steps
  perf/        tokens_per_s, step_time_s, tokens, model_flops_per_s, mfu, ema_lag_s (train.ema_decay > 0)
  system/      memory_mb (peak; GPU: max allocated), and on CUDA allocated/reserved now
  val/         val_loss, val_mtp_loss (held-out evaluation, train/evaluation.py), val_mtp_loss_depth_<k>, val_tokens
  moe/         load_max_mean (mean over layers), load_max_mean_worst, load_min_mean, experts_idle,
               router_bias_absmax, router_bias_std, bias_update_speed, dropped_tokens (V2 capacity)
  moe_layers/  per MoE layer: load_max_mean/<layer>, bias_absmax/<layer>, bias_std/<layer>
  comm/        bytes and calls of the step's collectives on rank 0, in total and per kind/group
               (comm/bytes/all_to_all/ep, ...; parallel/comm_ledger.py)
  expert_load/<layer>   histogram: each expert's share of the layer's routed tokens (one bar per expert)
  router_bias/<layer>   histogram of the layer's aux-loss-free bias values

Per-expert histograms come from the step's global token counts (a models.moe_state.ExpertLoad the
trainer passes to `MetricsLogger.log` beside the metrics); they are not written to metrics.jsonl.
RUN_DIR/expert_load.json holds the latest logged step's [layer][expert] counts (rewritten at
each log step; `python -m train.report` draws its histogram from it).
W&B runs online when an API key is configured (WANDB_API_KEY or a netrc entry) and offline
otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later); log.wandb_mode or WANDB_MODE
override that. The W&B run id is kept in RUN_DIR/wandb_run_id, so a resumed or requeued run
continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from models.moe_state import ExpertLoad
from train.config import Config, LogConfig, to_yaml

SECTIONS = {
    "loss": "train", "total_loss": "train", "mtp_loss": "train", "mtp_weight": "train", "aux_loss": "train",
    "lr": "optim", "grad_norm": "optim", "skipped_steps": "optim",
    "tokens_per_s": "perf", "step_time_s": "perf", "tokens": "perf", "model_flops_per_s": "perf", "mfu": "perf",
    "ema_lag_s": "perf",
    "memory_mb": "system", "memory_allocated_mb": "system", "memory_reserved_mb": "system",
    "load_max_mean": "moe", "load_max_mean_worst": "moe", "load_min_mean": "moe", "experts_idle": "moe",
    "router_bias_absmax": "moe", "router_bias_std": "moe", "bias_update_speed": "moe", "dropped_tokens": "moe",
    "bad_records": "data",
    "val_loss": "val", "val_mtp_loss": "val", "val_tokens": "val",
}


def chart_name(key: str) -> str:
    """The W&B / TensorBoard name of a metrics.jsonl key."""
    return f"{SECTIONS.get(key, 'train')}/{key}"


def load_on_cpu(load: Optional[ExpertLoad]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(counts [L, E], biases [L, E] or None) of a step's expert load as fp32 CPU tensors."""
    if load is None or load.counts.numel() == 0:
        return None, None
    biases = None if load.biases is None else load.biases.detach().float().cpu()
    return load.counts.detach().float().cpu(), biases


def expert_load_stats(load: Optional[ExpertLoad]) -> dict[str, Any]:
    """Max/mean expert load per MoE layer from the step's global token counts [L, E], bias spread."""
    counts, b = load_on_cpu(load)
    if counts is None:
        return {}
    mean = counts.mean(dim=1).clamp(min=1e-9)
    ratio = counts.max(dim=1).values / mean
    stats: dict[str, Any] = {
        "load_max_mean": float(ratio.mean()),
        "load_max_mean_worst": float(ratio.max()),
        "load_min_mean": float((counts.min(dim=1).values / mean).mean()),
        "experts_idle": int((counts == 0).sum()),  # (layer, expert) pairs that got no token this step
        "load_max_mean_per_layer": [round(float(r), 4) for r in ratio],
    }
    if b is not None:
        stats["router_bias_absmax"] = float(b.abs().max())
        stats["router_bias_std"] = float(b.std(dim=1).mean()) if b.shape[1] > 1 else 0.0
    return stats


def moe_layer_names(cfg: Config, n_rows: int) -> list[str]:
    """Chart names of the rows of the [L, E] counts: decoder layer index, then MTP depth."""
    m = cfg.model
    names = [f"layer_{i:02d}" for i in range(m.num_hidden_layers) if m.is_moe_layer(i)]
    names += [f"mtp_{k + 1}" for k in range(m.num_nextn_predict_layers) if m.is_moe_layer(m.num_hidden_layers + k)]
    return names if len(names) == n_rows else [f"moe_{j:02d}" for j in range(n_rows)]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s for MFU: a table for common GPUs, a measured fp32 matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
        for key, flops in table.items():
            if key in name:
                return flops * (2 if precision == "fp8" and key.startswith("H") else 1)
        return None
    return measured_matmul_flops()


_MATMUL_FLOPS: Optional[float] = None


def fastest_matmul_seconds(n: int, dtype: torch.dtype = torch.float32, seconds: float = 0.3,
                           min_repeats: int = 1) -> float:
    """Fastest of the n x n matmuls timed for ~`seconds` (at least `min_repeats`), after one untimed call.

    The minimum keeps a moment of contention from other processes out of the figure."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # first call: kernel selection, allocation
    best, repeats, t_end = float("inf"), 0, time.perf_counter() + seconds
    while repeats < min_repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best, repeats = min(best, time.perf_counter() - t0), repeats + 1
    return best


def measured_matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """Peak fp32 matmul FLOP/s of this CPU with the current thread count (measured once), from the
    fastest timed matmul, so contention does not lower the peak (and inflate MFU)."""
    global _MATMUL_FLOPS
    if _MATMUL_FLOPS is None:
        _MATMUL_FLOPS = 2 * n**3 / fastest_matmul_seconds(n, seconds=seconds)
    return _MATMUL_FLOPS


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU max allocated, else the host's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cuda_memory() -> dict[str, float]:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"memory_allocated_mb": torch.cuda.memory_allocated() / 2**20,
            "memory_reserved_mb": torch.cuda.memory_reserved() / 2**20}


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
            self._tb.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, Any], load: Optional[ExpertLoad] = None) -> None:
        """Record the metrics of optimizer step `step` (1-based); `load` feeds the per-expert charts."""
        if not self.is_main:
            return
        metrics = {**metrics, **cuda_memory()}
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        counts, biases = load_on_cpu(load)
        self._write_expert_load(step, counts)
        if self._wandb is not None or self._tb is not None:
            scalars = self._scalars(metrics, biases)
            if self._wandb is not None:
                self._wandb.log({**scalars, **self._wandb_histograms(counts, biases)}, step=step)
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
                self._tb_histograms(step, counts, biases)
                self._tb.flush()
        if self.log_cfg.console:
            print(self._line(step, metrics), flush=True)

    def _write_expert_load(self, step: int, c: Optional[torch.Tensor]) -> None:
        """RUN_DIR/expert_load.json: this step's token counts per MoE layer and expert (atomic rewrite)."""
        if c is None:
            return
        body = {"step": step, "layers": moe_layer_names(self.cfg, c.shape[0]),
                "counts": [[round(n) for n in row] for row in c.tolist()]}
        tmp = self.run_dir / "expert_load.json.tmp"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.run_dir / "expert_load.json")

    # ---------------------------------------------------------------- charts
    def _scalars(self, metrics: dict[str, Any], b: Optional[torch.Tensor]) -> dict[str, float]:
        out = {chart_name(k): v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for k, v in enumerate(metrics.get("val_mtp_loss_by_depth") or [], 1):
            out[f"val/val_mtp_loss_depth_{k}"] = v
        comm = metrics.get("comm")
        if comm:
            out["comm/bytes"], out["comm/calls"] = comm["bytes"], comm["calls"]
            for key, entry in comm["by"].items():
                out[f"comm/bytes/{key}"], out[f"comm/calls/{key}"] = entry["bytes"], entry["calls"]
        per_layer = metrics.get("load_max_mean_per_layer")
        if per_layer:
            for name, r in zip(moe_layer_names(self.cfg, len(per_layer)), per_layer):
                out[f"moe_layers/load_max_mean/{name}"] = r
        if b is not None:
            for name, row in zip(moe_layer_names(self.cfg, b.shape[0]), b):
                out[f"moe_layers/bias_absmax/{name}"] = float(row.abs().max())
                out[f"moe_layers/bias_std/{name}"] = float(row.std()) if row.numel() > 1 else 0.0
        return out

    def _wandb_histograms(self, c: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> dict[str, Any]:
        import numpy as np
        import wandb

        out: dict[str, Any] = {}
        if c is not None:
            edges = np.arange(c.shape[1] + 1) - 0.5  # one bin per expert id
            for name, row in zip(moe_layer_names(self.cfg, c.shape[0]), c):
                share = (row / row.sum().clamp(min=1)).numpy()
                out[f"expert_load/{name}"] = wandb.Histogram(np_histogram=(share, edges))
        if b is not None:
            for name, row in zip(moe_layer_names(self.cfg, b.shape[0]), b):
                out[f"router_bias/{name}"] = wandb.Histogram(row.numpy())
        return out

    def _tb_histograms(self, step: int, c: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
        if c is not None:
            experts = torch.arange(c.shape[1], dtype=torch.float64)
            for name, row in zip(moe_layer_names(self.cfg, c.shape[0]), c):
                row = row.double()
                # One bucket per expert: (e - 0.5, e + 0.5], height = tokens routed to expert e.
                self._tb.add_histogram_raw(
                    f"expert_load/{name}", min=0.0, max=float(c.shape[1] - 1), num=int(row.sum()),
                    sum=float((experts * row).sum()), sum_squares=float((experts**2 * row).sum()),
                    bucket_limits=(experts + 0.5).tolist(), bucket_counts=row.tolist(), global_step=step,
                )
        if b is not None:
            for name, row in zip(moe_layer_names(self.cfg, b.shape[0]), b):
                self._tb.add_histogram(f"router_bias/{name}", row, step)

    # ---------------------------------------------------------------- console
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
        if "val_loss" in m:
            parts.append(f"val {m['val_loss']:.4f}" + (f" val mtp {m['val_mtp_loss']:.4f}" if "val_mtp_loss" in m else ""))
        parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if "load_max_mean" in m:
            parts.append(f"load max/mean {m['load_max_mean']:.2f}")
        if m.get("dropped_tokens"):
            parts.append(f"dropped {m['dropped_tokens']:,.0f}")
        if m.get("comm"):
            parts.append(f"comm {m['comm']['bytes'] / 2**20:.2f} MiB/{m['comm']['calls']} calls")
        if m.get("skipped_steps"):
            parts.append(f"skipped {m['skipped_steps']}")
        if m.get("bad_records"):
            parts.append(f"bad records {m['bad_records']}")
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


# ---------------------------------------------------------------- Weights & Biases
def wandb_api_key_configured() -> bool:
    """A W&B key in the environment or in a netrc file (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(log_cfg: LogConfig) -> str:
    """log.wandb_mode, else WANDB_MODE, else online with a key and offline without one."""
    mode = log_cfg.wandb_mode or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_api_key_configured():
        return "online"
    print("wandb: no API key configured; logging offline (upload later with `wandb sync`)", flush=True)
    return "offline"


def _init_wandb(cfg: Config, run_dir: Path, log_cfg: LogConfig):
    import wandb
    from omegaconf import OmegaConf

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=log_cfg.wandb_project,
        name=cfg.run.name,
        id=run_id,
        dir=str(run_dir),
        mode=wandb_mode(log_cfg),
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        resume="allow",
    )
    try:  # the resolved YAML next to the run's other files
        run.save(str(run_dir / "config.yaml"), base_path=str(run_dir), policy="now")
    except Exception:  # noqa: BLE001 - a missing copy of the config must not stop training
        pass
    return run
