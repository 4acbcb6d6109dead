"""The training loop: data -> model -> loss -> backward -> clip -> AdamW -> bias update -> log.

One optimizer step consumes `grad_accum_steps` micro-batches on every data-parallel
rank. Losses are normalised over the global batch (CE sums divided by the global
number of target tokens, aux losses by the global number of micro-batches), so the
gradients do not depend on how the batch is split over micro-batches or ranks.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from data import TextBatchStream, load_tokenizer
from data.resume import restore_position
from models.balance import moe_routers, update_router_biases
from models.transformer import Transformer, combine_losses, mtp_labels
from parallel.context import ParallelContext
from parallel.checkpointing import CheckpointState
from parallel.parallelize import build_parallel_optimizer, parallelize
from train import checkpoint as ckpt
from train.config import Config, ConfigError
from train.user_errors import HFInitError
from train.metrics import MetricsLogger, expert_load_stats
from train.precision import policy_from_config
from train.allocator import retain_freed_memory
from train.optim import make_adamw, parameter_groups, set_lr
from train.schedules import Schedules
from models.accounting import count_model

log = logging.getLogger("moeforge")


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Config, ctx: Optional[ParallelContext] = None, data: Any = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or ParallelContext.single()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.retain_host_memory and self.ctx.device.type == "cpu":
            retain_freed_memory()
        torch.manual_seed(cfg.run.seed)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = self.ctx.device

        self.tokenizer = load_tokenizer(cfg.data)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens; raise model.vocab_size"
            )
        self.model = Transformer(cfg.model).to(self.device)
        if cfg.checkpoint.init_from_hf and not ckpt.complete_checkpoints(self.ckpt_dir):
            from train.hf_import import HFImportError, init_from_hf  # HF weights start a fresh run

            try:
                init_from_hf(self.model, cfg.checkpoint.init_from_hf)
            except HFImportError as e:
                raise HFInitError(f"checkpoint.init_from_hf: {e}") from None
        # Precision (train/precision.py) before any wrapping: fp32 routers/norms, FP8 module swaps;
        # FSDP2 then gets the matching MixedPrecisionPolicy (bf16 compute, fp32 masters and reduction).
        try:
            self.precision = policy_from_config(self.model, cfg.train)
        except ValueError as e:
            raise ConfigError(f"train.fp8: {e}") from None
        # Every rank built the same model from the same seed; the layout is applied from outside.
        self.has_moe = bool(moe_routers(self.model))
        self.pipeline = None
        if self.ctx.pp_size > 1:  # cut this rank's pipeline stages out of the model first (parallel/pipeline.py)
            from parallel.pipeline import build_pipeline

            self.pipeline = build_pipeline(self.model, cfg.parallel, self.ctx, self.precision.fsdp_policy())
        self.plan = parallelize(self.model, self.ctx, cfg.parallel.data_parallel, self.precision.fsdp_policy(),
                                pipeline=self.pipeline)
        if self.pipeline is not None:
            self.pipeline.build_schedule(cfg.train.grad_accum_steps, cfg.train.micro_batch_size, cfg.train.seq_len,
                                         cfg.model.hidden_size, cfg.model.num_nextn_predict_layers)
        self.optimizer = build_parallel_optimizer(
            self.model, self.plan, self.ctx,
            make_optimizer=lambda groups: make_adamw(groups, cfg.optim),
            param_groups=lambda model: parameter_groups(model, cfg.optim.weight_decay),
        )
        self.schedules = Schedules(
            cfg.optim, cfg.train.mtp_weight, cfg.train.bias_update_speed, cfg.train.steps,
            cfg.model.mtp_loss_weight, cfg.model.bias_update_speed,
        )
        self.data = data if data is not None else TextBatchStream(
            cfg.data, self.tokenizer, cfg.train.seq_len, cfg.train.micro_batch_size, self.ctx.dp_rank, self.ctx.dp_size
        )
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.checkpoint_state = CheckpointState(self.model, self.optimizer, self.ctx)
        self.flops_per_token = count_model(cfg.model, cfg.train.seq_len).flops_per_token
        self.peak_flops = peak_flops(self.device, cfg.train.precision)
        self._stop_requested = False
        self.stopped_early = False  # fit() ended on a stop request (SIGTERM), not at train.steps
        self._pending_save: Optional[ckpt.AsyncCheckpoint] = None  # checkpoint.async_save still being written
        self.resumed_from: Optional[Path] = None
        self.resume()
        self.logger = MetricsLogger(cfg, self.run_dir, self.ctx.is_main, cfg.train.steps)
        if self.ctx.is_main:
            tok_dir = self.run_dir / "tokenizer"
            if not tok_dir.exists():
                shutil.copytree(self.tokenizer.path, tok_dir)

    # ---------------------------------------------------------------- one step
    def precision_context(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast(self.device)  # bf16 autocast for bf16 and fp8, nothing for fp32

    @contextlib.contextmanager
    def _pipeline_context(self):
        with self.loss_context(), self.precision_context():
            yield

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Vocab-parallel cross-entropy over the tp-sharded logits (forward and backward)."""
        if self.ctx.tp_size > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def global_token_counts(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens of the whole global batch: main head and each MTP depth."""
        depth = self.cfg.model.num_nextn_predict_layers
        counts = torch.zeros(1 + depth, dtype=torch.float64)
        for b in batches:
            counts[0] += int((b["labels"] != -100).sum())
            for k in range(1, depth + 1):
                counts[k] += int((mtp_labels(b["labels"], k, b.get("doc_ids")) != -100).sum())
        counts = self.ctx.dp_sum(counts.to(self.device)).cpu()
        return counts[0], counts[1:]

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        batches = [next(self.data) for _ in range(cfg.train.grad_accum_steps)]
        lm_tokens, mtp_tokens = self.global_token_counts(batches)
        mtp_weight = self.schedules.mtp_weight(self.step, self.tokens_seen)
        n_micro_global = cfg.train.grad_accum_steps * self.ctx.dp_size
        moe_layers = moe_routers(model)
        for layer in moe_layers:
            layer.aux_loss_scale = 1.0 / n_micro_global
        model.train()
        sums = torch.zeros(2 + len(mtp_tokens), dtype=torch.float64)  # objective, lm CE sum, mtp CE sums
        aux = 0.0
        if self.pipeline is not None:  # the schedule runs forward and backward of all the step's micro-batches
            sums, aux = self.pipeline.run(batches, lm_tokens, mtp_tokens, mtp_weight, self._pipeline_context)
            aux /= n_micro_global
        for b in batches if self.pipeline is None else []:
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            with self.loss_context():
                with self.precision_context():
                    out = model(b["input_ids"], b["labels"], b.get("doc_ids"))
                loss = combine_losses(out, lm_tokens.to(self.device), mtp_tokens.to(self.device), mtp_weight)
                loss.backward()
            sums[0] += float(loss.detach())
            sums[1] += float(out.lm_loss_sum.detach())
            if out.mtp_loss_sums is not None:
                sums[2:] += out.mtp_loss_sums.detach().double().cpu()
            aux += sum(float(layer.last_aux_loss) for layer in moe_layers) / n_micro_global
        sums = self.ctx.dp_sum(sums.to(self.device)).cpu()
        aux = float(self.ctx.dp_sum(torch.tensor([aux], dtype=torch.float64, device=self.device)))
        if hasattr(self.optimizer, "reduce_gradients"):  # ZeRO-1: one summed all-reduce per group
            self.optimizer.reduce_gradients()
        grad_norm = self.plan.clip_grad_norm(cfg.optim.grad_clip)
        finite = math.isfinite(float(sums[0])) and math.isfinite(grad_norm)
        lr = self.schedules.lr(self.step)
        gamma = self.schedules.bias_update_speed(self.step, self.tokens_seen)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient; skipping the update (%d in a row)",
                        self.step + 1, self.consecutive_nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        counts = update_router_biases(model, gamma if finite else 0.0, reduce_counts=self.ctx.dp_sum)
        if not finite and self.consecutive_nonfinite > cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps with non-finite loss/gradients "
                f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps})"
            )
        step_tokens = cfg.train.micro_batch_size * cfg.train.seq_len * n_micro_global
        self.step += 1
        self.tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "loss": float(sums[1] / lm_tokens.clamp(min=1)),
            "total_loss": float(sums[0]),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": step_tokens / dt,
            "step_time_s": dt,
            "tokens": self.tokens_seen,
        }
        if len(mtp_tokens):
            metrics["mtp_loss"] = float((sums[2:] / mtp_tokens.clamp(min=1)).mean())
            metrics["mtp_weight"] = mtp_weight
        if moe_layers or (self.pipeline is not None and self.has_moe):
            metrics["aux_loss"] = aux
            metrics["bias_update_speed"] = gamma
            biases = [m.gate.e_score_correction_bias for m in moe_layers if m.gate.uses_bias]
            if self.pipeline is not None:  # every stage's layers (collective over the pipeline ranks)
                counts, biases = self.pipeline.gather_load_stats(counts, biases)
            metrics.update(expert_load_stats(counts, biases))
            if cfg.model.capacity_factor is not None:
                dropped = torch.stack([m.dropped_tokens.reshape(()) for m in moe_layers] + [torch.zeros((), device=self.device)])
                if self.pipeline is not None:
                    dropped = self.pipeline.pp_sum(dropped.sum().reshape(1)).to(self.device)
                metrics["dropped_tokens"] = float(self.ctx.dp_sum(dropped).sum())
                for m in moe_layers:
                    m.dropped_tokens.zero_()
        achieved = self.flops_per_token * metrics["tokens_per_s"] / self.ctx.world_size
        metrics["model_flops_per_s"] = achieved
        if self.peak_flops:
            metrics["mfu"] = achieved / self.peak_flops
        metrics["memory_mb"] = memory_mb(self.device)
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        bad = dict(getattr(self.data, "bad_records", {}) or {})  # data.on_bad_record=skip counts, this rank
        if bad:
            metrics["bad_records"] = sum(bad.values())
            metrics["bad_records_by_reason"] = bad
        return metrics

    # ---------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, Any]]:
        """Train until train.steps (or SIGTERM); returns the logged metrics."""
        cfg = self.cfg
        history: list[dict[str, Any]] = []
        previous = self._install_sigterm()
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.finish_save(wait=False)  # publish an async checkpoint whose write has finished
                history.append({"step": self.step, **metrics})
                self.logger.progress(self.step)
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps or self.step == 1:
                    self.logger.log(self.step, metrics)
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
                if self._stop_agreed():
                    log.warning("SIGTERM received: saving at step %d and exiting", self.step)
                    self.stopped_early = True
                    if not (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                        self.save()
                    break
            else:
                if cfg.checkpoint.at_end and not (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                    self.save()
            self.finish_save()  # the last async checkpoint is published before fit returns
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.logger.close()
        return history

    def _install_sigterm(self):
        def handler(signum, frame):  # finish the current step, then save and exit cleanly
            self._stop_requested = True

        return signal.signal(signal.SIGTERM, handler)

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM: ranks receive it at different moments, so they agree
        after every step and all save and stop at the same one."""
        if not self.ctx.distributed:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        return float(self.ctx.all_reduce_sum(flag)) > 0

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "dp_size": self.ctx.dp_size,
            "world_size": self.ctx.world_size,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
        }
        rank_state = {
            "dp_rank": self.ctx.dp_rank,
            "data": self.data.state_dict(),
            "rng_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        }
        self.finish_save()  # at most one async save in flight: only here does a step wait for a write
        args = (self.ckpt_dir, self.step, self.checkpoint_state, meta, rank_state,
                self.ctx.rank, self.ctx.is_main, self.ctx.barrier, self.cfg.checkpoint.keep_last)
        if self.cfg.checkpoint.async_save:  # published later, by finish_save()
            self._pending_save = ckpt.start_async_save(*args)
            return self._pending_save.final
        return ckpt.save_checkpoint(*args)

    def finish_save(self, wait: bool = True) -> None:
        """Publish the in-flight async checkpoint once written (waiting for the write if `wait`)."""
        pending = self._pending_save
        if pending is not None and (wait or pending.done()):
            self._pending_save = None
            pending.finish()

    def resume(self) -> None:
        """Load the newest complete checkpoint in run.dir, falling back to older ones if corrupt.

        If checkpoints exist but none loads, raise rather than start over on top of them."""
        agree = None
        if self.ctx.distributed:  # every rank must pick the same checkpoint
            agree = lambda ok: float(self.ctx.all_reduce_sum(torch.tensor([float(not ok)], device=self.device))) == 0  # noqa: E731
        failures = []
        for step, path in reversed(ckpt.complete_checkpoints(self.ckpt_dir)):
            try:
                meta, rank_state = ckpt.load_checkpoint(path, self.checkpoint_state, self.ctx.rank, agree=agree)
            except ckpt.CheckpointError as e:
                log.error("cannot resume from %s: %s; trying an older checkpoint", path, e)
                failures.append(str(e))
                continue
            self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
            self.skipped_steps = int(meta.get("skipped_steps", 0))
            same_layout = meta.get("dp_size") == self.ctx.dp_size and rank_state is not None
            if not same_layout:  # data positions are global: any rank's state describes them
                rank_state = ckpt.read_rank_state(path, 0)
            if rank_state:  # data.resume: exact, or restart a changed mixture from its beginning
                restore_position(self.data, rank_state["data"], self.cfg.data.resume, self.step, self.ctx.is_main)
                if same_layout and "rng_cpu" in rank_state:
                    rng = torch.frombuffer(bytearray(base64.b64decode(rank_state["rng_cpu"])), dtype=torch.uint8)
                    torch.set_rng_state(rng)
            self.resumed_from = path
            if self.ctx.is_main:
                print(f"resumed from {path} (step {self.step})", flush=True)
            return
        if failures:
            raise ckpt.CheckpointError(
                f"none of the {len(failures)} complete checkpoints in {self.ckpt_dir} can be loaded; "
                "move them away to start the run over: " + "; ".join(failures))

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        from train.generate import generate

        new = generate(self.model, self.tokenizer.encode(prompt), max_new_tokens, temperature=0.8,
                       top_p=0.9, eos_id=self.tokenizer.eos_id, seed=self.cfg.run.seed)
        return prompt + self.tokenizer.decode(new)


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


def measured_matmul_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """Peak fp32 matmul FLOP/s of this CPU with the current thread count (measured once).

    The fastest of the timed matmuls is used, so a moment of contention from other
    processes does not lower the peak (and inflate MFU)."""
    global _MATMUL_FLOPS
    if _MATMUL_FLOPS is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _MATMUL_FLOPS = 2 * n**3 / best
    return _MATMUL_FLOPS


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_for_inference(checkpoint: Path):
    """Model (eval mode, weights from `checkpoint`) and tokenizer of a finished run."""
    from data.tokenizer import TextTokenizer

    meta = ckpt._read_json(checkpoint / "meta.json")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), meta["config"]))
    model = Transformer(cfg.model)
    ckpt.load_checkpoint(checkpoint, CheckpointState(model, None, ParallelContext.single()), rank=0)
    model.eval()
    tokenizer = TextTokenizer.from_dir(checkpoint.parent.parent / "tokenizer")
    return model, tokenizer
