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
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from data import TextBatchStream, load_tokenizer
from data.resume import restore_position
from models.fp8 import release_quantised_weights
from models.moe import moe_layers
from models.moe_state import ExpertLoad, MoEStepState
from models.transformer import Transformer, combine_losses
from parallel.comm_ledger import LEDGER
from parallel.context import ParallelContext
from parallel.layout import local_seq_len
from parallel.checkpointing import CheckpointState
from parallel.ema import WeightEMA
from parallel.parallelize import build_parallel_optimizer, parallelize
from parallel.recompute import apply_recompute
from train import checkpoint as ckpt
from train.config import Config, ConfigError
from train.evaluation import EvalResult, HeldOutData, batch_counts, loss_sums
from train.user_errors import HFInitError
from train.metrics import MetricsLogger, expert_load_stats, memory_mb, peak_flops
from train.precision import policy_from_config, warn_if_slow_bf16
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
            from train.hf.read import HFImportError, init_from_hf  # HF weights start a fresh run

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
        if self.ctx.is_main:
            warn_if_slow_bf16(self.precision, self.device)  # once per run: CPUs that emulate bf16
        # Activation recomputation wraps modules of the plain model, inside the layout's wrappers applied below.
        t = cfg.train
        self.recompute = apply_recompute(self.model, t.recompute, t.recompute_modules, t.recompute_num_layers)
        # Every rank built the same model from the same seed; the layout is applied from outside.
        self.has_moe = bool(moe_layers(self.model))
        self.pipeline = None
        if self.ctx.pp_size > 1:  # cut this rank's pipeline stages out of the model first (parallel/pipeline.py)
            from parallel.pipeline import build_pipeline

            self.pipeline = build_pipeline(self.model, cfg.parallel, self.ctx, self.precision.fsdp_policy())
        self.plan = parallelize(self.model, self.ctx, cfg.parallel.data_parallel, self.precision.fsdp_policy(),
                                pipeline=self.pipeline, ep_overlap=cfg.parallel.ep_overlap)
        if self.pipeline is not None:
            self.pipeline.build_schedule(cfg.train.grad_accum_steps, cfg.train.micro_batch_size,
                                         local_seq_len(cfg.parallel, cfg.train.seq_len),
                                         cfg.model.hidden_size, cfg.model.num_nextn_predict_layers)
        self.deepspeed = self.plan.mode == "deepspeed"  # the engine reduces, clips and steps (its own file)
        if self.deepspeed:
            self.optimizer = self._deepspeed_optimizer()
        else:
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
        self.held_out = None  # eval.sources' batches for the periodic evaluation (train/evaluation.py)
        if cfg.eval.interval and cfg.eval.sources:
            self.held_out = HeldOutData(cfg, self.tokenizer, self.ctx.dp_rank, self.ctx.dp_size)
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        # This rank's weights' EMA in CPU memory (train.ema_decay > 0), from the initial (or HF) weights.
        self.ema = WeightEMA(self.model, t.ema_decay, t.ema_interval) if t.ema_decay else None
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, cfg.checkpoint,
                                              CheckpointState(self.model, self.optimizer, self.ctx, self.ema))
        self.moe_state = MoEStepState(moe_layers(self.model))  # this rank's MoE layers (its stages' only)
        self.expert_load: Optional[ExpertLoad] = None  # the last step's, for the logger's charts
        self.n_micro_global = cfg.train.grad_accum_steps * self.ctx.dp_size  # micro-batches per global batch
        self.flops_per_token = count_model(cfg.model, cfg.train.seq_len).flops_per_token
        self.peak_flops = peak_flops(self.device, cfg.train.precision)
        self._stop_requested = False
        self.stopped_early = False  # fit() ended on a stop request (SIGTERM), not at train.steps
        self.resumed_from: Optional[Path] = None
        self.resume()
        self.logger = MetricsLogger(cfg, self.run_dir, self.ctx.is_main, cfg.train.steps)
        if self.ctx.is_main:
            tok_dir = self.run_dir / "tokenizer"
            if not tok_dir.exists():
                shutil.copytree(self.tokenizer.path, tok_dir)

    def _deepspeed_optimizer(self):
        """parallel.data_parallel=deepspeed: the engine around the model and train/optim.py's AdamW."""
        from parallel.deepspeed_engine import DeepSpeedOptimizer, build_cpu_adam

        cfg, ds = self.cfg, self.cfg.parallel.deepspeed
        cpu_adam = None
        if ds.cpu_adam:
            def cpu_adam(groups):
                return build_cpu_adam(groups, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps)
        return DeepSpeedOptimizer(
            self.model, self.ctx, ds.zero_stage, ds.offload_optimizer, cfg.train.micro_batch_size,
            cfg.train.grad_accum_steps, cfg.optim.grad_clip, parameter_groups(self.model, cfg.optim.weight_decay),
            make_optimizer=lambda groups: make_adamw(groups, cfg.optim), cpu_adam=cpu_adam,
        )

    # ---------------------------------------------------------------- one step
    def precision_context(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast(self.device)  # bf16 autocast for bf16 and fp8, nothing for fp32

    @contextlib.contextmanager
    def forward_context(self):
        """Around every training forward: autocast and recomputation's saved-tensor hook."""
        with self.precision_context(), self.recompute.context():
            yield

    @contextlib.contextmanager
    def _pipeline_context(self):
        with self.loss_context(), self.forward_context():
            yield

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Vocab-parallel cross-entropy over the tp-sharded logits (forward and backward)."""
        if self.ctx.tp_size > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def global_token_counts(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens of the whole global batch: main head and each MTP depth."""
        counts = batch_counts(batches, self.cfg.model.num_nextn_predict_layers)
        counts = self.ctx.dp_sum(counts.to(self.device)).cpu()
        return counts[0], counts[1:]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the global batch; returns the step's metrics."""
        t0 = time.perf_counter()
        LEDGER.reset()  # the step's collectives, this rank (parallel/comm_ledger.py)
        batches = [next(self.data) for _ in range(self.cfg.train.grad_accum_steps)]
        lm_tokens, mtp_tokens = self.global_token_counts(batches)
        mtp_weight = self.schedules.mtp_weight(self.step, self.tokens_seen)
        self.moe_state.begin_step(self.n_micro_global)
        self.model.train()
        forward_backward = self._forward_backward if self.pipeline is None else self._forward_backward_pipeline
        totals = self.ctx.dp_sum(forward_backward(batches, lm_tokens, mtp_tokens, mtp_weight).to(self.device)).cpu()
        release_quantised_weights(self.model)  # the step's FP8 weight copies: the weights change next
        lr, gamma, grad_norm, finite = self._update(float(totals[0]))
        load = self.moe_state.end_step(gamma if finite else 0.0, reduce=self.ctx.load_sum)
        self._raise_if_diverged()
        if self.pipeline is not None and self.has_moe:  # every stage's layers (collective over the pipeline ranks)
            load = self.pipeline.gather_load(load)
        self.expert_load = load
        step_tokens = self.cfg.train.micro_batch_size * self.cfg.train.seq_len * self.n_micro_global
        self.step += 1
        if self.ema is not None:  # snapshot now, before the next step changes the weights; blend in the background
            self.ema.update(self.step)
        self.tokens_seen += step_tokens
        metrics = {"loss": float(totals[1] / lm_tokens.clamp(min=1)), "total_loss": float(totals[0]), "lr": lr,
                   "grad_norm": grad_norm}
        return {**metrics, **self._step_metrics(totals, mtp_tokens, mtp_weight, gamma, load, step_tokens,
                                                time.perf_counter() - t0)}

    def _forward_backward(self, batches: list[dict[str, torch.Tensor]], lm_tokens: torch.Tensor,
                          mtp_tokens: torch.Tensor, mtp_weight: float) -> torch.Tensor:
        """Forward and backward of the micro-batches in this process, gradients accumulated.

        Returns this rank's [objective, CE sum, MTP CE sums, aux-loss sum] (fp64, CPU)."""
        sums = torch.zeros(2 + len(mtp_tokens), dtype=torch.float64)
        for b in batches:
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            with self.loss_context():
                with self.forward_context():
                    out = self.model(b["input_ids"], b["labels"], b.get("doc_ids"))
                loss = combine_losses(out, lm_tokens.to(self.device), mtp_tokens.to(self.device), mtp_weight)
                if self.deepspeed:
                    self.optimizer.backward(loss)  # the engine's backward: its gradient hooks, no scaling
                else:
                    loss.backward()
            sums[0] += float(loss.detach())
            sums[1] += float(out.lm_loss_sum.detach())
            if out.mtp_loss_sums is not None:
                sums[2:] += out.mtp_loss_sums.detach().double().cpu()
        return torch.cat([sums, self.moe_state.aux_sum().cpu().reshape(1)])

    def _forward_backward_pipeline(self, batches: list[dict[str, torch.Tensor]], lm_tokens: torch.Tensor,
                                   mtp_tokens: torch.Tensor, mtp_weight: float) -> torch.Tensor:
        """The same through the pipeline schedule; the sums are this data-parallel rank's, all stages."""
        sums = self.pipeline.run(batches, lm_tokens, mtp_tokens, mtp_weight, self._pipeline_context)
        return self.pipeline.pp_sum(torch.cat([sums, self.moe_state.aux_sum().cpu().reshape(1)]))

    def _update(self, objective: float) -> tuple[float, float, float, bool]:
        """Gradient reduction, clipping and the AdamW step, skipped (and counted) when the loss or the
        gradient norm is not finite. Returns (lr, bias update speed, grad norm, finite)."""
        self.plan.finish_gradients()  # sequence parallelism: gradients of the replicated parameters over tp
        lr = self.schedules.lr(self.step)
        gamma = self.schedules.bias_update_speed(self.step, self.tokens_seen)
        if self.deepspeed:  # reduce, norm, clip and AdamW in the engine, which skips a non-finite gradient
            set_lr(self.optimizer, lr)  # itself (a non-finite loss makes the gradient non-finite): count what it did
            grad_norm = self.optimizer.step()
            return self._count_skip(lr, gamma, grad_norm, math.isfinite(grad_norm))
        if hasattr(self.optimizer, "reduce_gradients"):  # ZeRO-1: one summed all-reduce per group
            self.optimizer.reduce_gradients()
        grad_norm = self.plan.clip_grad_norm(self.cfg.optim.grad_clip)
        finite = math.isfinite(objective) and math.isfinite(grad_norm)
        if finite:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._count_skip(lr, gamma, grad_norm, finite)

    def _count_skip(self, lr: float, gamma: float, grad_norm: float, finite: bool) -> tuple[float, float, float, bool]:
        """Count a skipped (non-finite) step, or reset the run of them."""
        if finite:
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss or gradient; skipping the update (%d in a row)",
                        self.step + 1, self.consecutive_nonfinite)
        return lr, gamma, grad_norm, finite

    def _raise_if_diverged(self) -> None:
        if self.consecutive_nonfinite > self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps with non-finite loss/gradients "
                f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps})"
            )

    def _step_metrics(self, totals: torch.Tensor, mtp_tokens: torch.Tensor, mtp_weight: float, gamma: float,
                      load: Optional[ExpertLoad], step_tokens: int, dt: float) -> dict[str, Any]:
        """Throughput, MTP, MoE, memory and data metrics of the step (after loss, lr and grad_norm)."""
        metrics: dict[str, Any] = {"tokens_per_s": step_tokens / dt, "step_time_s": dt, "tokens": self.tokens_seen}
        if len(mtp_tokens):
            metrics["mtp_loss"] = float((totals[2:-1] / mtp_tokens.clamp(min=1)).mean())
            metrics["mtp_weight"] = mtp_weight
        if self.has_moe:
            metrics["aux_loss"] = float(totals[-1]) / self.n_micro_global
            metrics["bias_update_speed"] = gamma
            metrics.update(expert_load_stats(load))
            if self.cfg.model.capacity_factor is not None:
                metrics["dropped_tokens"] = load.dropped_tokens
        achieved = self.flops_per_token * metrics["tokens_per_s"] / self.ctx.world_size
        metrics["model_flops_per_s"] = achieved
        if self.peak_flops:
            metrics["mfu"] = achieved / self.peak_flops
        metrics["memory_mb"] = memory_mb(self.device)
        if self.ctx.distributed:
            metrics["comm"] = LEDGER.summary()
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        if self.ema is not None:
            metrics["ema_lag_s"] = self.ema.lag_s  # the last finished background update's duration
        bad = dict(getattr(self.data, "bad_records", {}) or {})  # data.on_bad_record=skip counts, this rank
        if bad:
            metrics["bad_records"] = sum(bad.values())
            metrics["bad_records_by_reason"] = bad
        return metrics

    # ---------------------------------------------------------------- held-out evaluation
    def evaluation_due(self) -> bool:
        return self.held_out is not None and self.step % self.cfg.eval.interval == 0

    def evaluate(self) -> dict[str, Any]:
        """Mean CE of the main head and each MTP depth over the held-out batches, forward only, summed over
        every rank (the single process's number). The training stream, the RNG, the router biases and the
        load counts are left as they were."""
        depth = self.cfg.model.num_nextn_predict_layers
        sums = torch.zeros(1 + depth, dtype=torch.float64)
        counts = torch.zeros(1 + depth, dtype=torch.float64)
        rng = torch.get_rng_state()
        self.model.eval()  # MoE layers record no routing in eval mode
        try:
            for batches in self.held_out:
                counts += batch_counts(batches, depth)
                if self.pipeline is None:
                    sums += loss_sums(self.model, batches, depth, self.device, self._pipeline_context)
                else:
                    sums += self.pipeline.evaluate(batches, depth, self._pipeline_context)
        finally:
            release_quantised_weights(self.model)  # FP8 weight copies made for the evaluation
            self.model.train()
            torch.set_rng_state(rng)
        if self.pipeline is not None:
            sums = self.pipeline.pp_sum(sums)
        sums, counts = self.ctx.dp_sum(sums.to(self.device)).cpu(), self.ctx.dp_sum(counts.to(self.device)).cpu()
        return EvalResult.from_sums(sums, counts).metrics()

    # ---------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, Any]]:
        """Train until train.steps (or SIGTERM); returns the logged metrics."""
        cfg = self.cfg
        history: list[dict[str, Any]] = []
        previous = self._install_sigterm()
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                if self.evaluation_due():
                    metrics.update(self.evaluate())
                self.checkpointer.finish(wait=False)  # publish an async checkpoint whose write has finished
                history.append({"step": self.step, **metrics})
                self.logger.progress(self.step)
                if (self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps or self.step == 1
                        or "val_loss" in metrics):
                    self.logger.log(self.step, metrics, self.expert_load)
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
            self.checkpointer.finish()  # the last async checkpoint is published before fit returns
        finally:
            self.checkpointer.close()  # its writer thread ends here, not at interpreter exit
            if self.ema is not None:
                self.ema.close()
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
        return self.checkpointer.save(self.step, meta, rank_state)  # async: published by checkpointer.finish()

    def resume(self) -> None:
        """Continue from the newest loadable checkpoint in run.dir, if there is one."""
        found = self.checkpointer.load_latest()
        if found is None:
            return
        path, meta, rank_state = found
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

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        from train.generate import generate

        new = generate(self.model, self.tokenizer.encode(prompt), max_new_tokens, temperature=0.8,
                       top_p=0.9, eos_id=self.tokenizer.eos_id, seed=self.cfg.run.seed)
        return prompt + self.tokenizer.decode(new)


