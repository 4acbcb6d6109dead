"""DeepSpeed ZeRO as the data-parallel engine (`parallel.data_parallel: deepspeed`).

The DeepSpeed config is generated from ours (`deepspeed_config`); the engine wraps the model
after expert parallelism has sliced it. Our optimizer (train/optim.py's AdamW and weight-decay
groups) is handed to DeepSpeed as its client optimizer, the trainer sets the lr every step.

Gradient scale: moeforge's loss is already normalised by the global batch, so gradients must be
SUMMED over ranks (parallel/data_parallel.py): `gradient_allreduce_op: sum`.

Expert parallelism (ZeRO-1/2): DeepSpeed reduces a parameter marked `allreduce = False` with a
`group_name` over that name's expert-data-parallel group, in optimizer parameter groups flagged
`moe`. Its engine only turns that on for its own `deepspeed.moe.layer.MoE` modules, so
`_ExpertAwareEngine` turns it on for ours, after our ep / expert-dp groups are registered under
DeepSpeed's group name. ZeRO-3 would partition our per-rank expert slices over all ranks as if
they were replicated, and it does not reach parity with this model even at ep=1: refused
(parallel/layout.py says why).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch import nn

from parallel.context import ParallelContext
from parallel.data_parallel import saved_param_state
from parallel.expert_parallel import is_expert_param

log = logging.getLogger("moeforge")

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
REDUCE_BUCKET_ELEMENTS = 50_000_000  # gradients per reduce bucket (DeepSpeed's default 5e8 is 2 GB of fp32)


def import_deepspeed():
    """`import deepspeed`, or an error that says how to install it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "parallel.data_parallel=deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install '.[deepspeed]' "
            f"(DS_BUILD_OPS=0 compiles nothing at install time; see README) [{e}]"
        ) from None
    return deepspeed


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of one ep degree (deepspeed.utils.groups)."""
    return f"ep_size_{ep_size}"


def deepspeed_config(zero_stage: int, offload_optimizer: str, micro_batch_size: int, grad_accum_steps: int,
                     dp_size: int, grad_clip: float, cpu_adam: bool) -> dict[str, Any]:
    """The DeepSpeed config for our settings. Precision stays ours (fp32 parameters, torch autocast for bf16),
    so DeepSpeed's bf16/fp16 modes are off; `cpu_adam` False keeps torch's AdamW under offload (tests)."""
    zero: dict[str, Any] = {"stage": zero_stage, "contiguous_gradients": True, "reduce_scatter": True,
                            "overlap_comm": False, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
                            "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS}
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp_size,
        "managed_gradient_accumulation": False,  # backward() per micro-batch, step() once per optimizer step
        "gradient_clipping": grad_clip,
        "gradient_allreduce_op": "sum",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "zero_force_ds_cpu_optimizer": cpu_adam,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def register_expert_groups(ctx: ParallelContext) -> str:
    """Put our ep and expert-data-parallel process groups where DeepSpeed looks them up; returns the name."""
    from deepspeed.utils import groups

    name = expert_group_name(ctx.ep_size)
    edp = ctx.mesh["expert_dp"]
    ep = ctx.mesh["ep"]
    groups._EXPERT_PARALLEL_GROUP[name] = ep.get_group()
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(ep.get_group())
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp.get_group()
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = torch.distributed.get_process_group_ranks(edp.get_group())
    return name


def mark_expert_params(model: nn.Module, group_name: str) -> None:
    """DeepSpeed's expert-parameter marks (deepspeed.moe.utils.is_moe_param) on our routed experts."""
    for name, p in model.named_parameters():
        if is_expert_param(name):
            p.allreduce = False
            p.group_name = group_name


def split_expert_groups(groups: list[dict], group_name: str) -> list[dict]:
    """Each optimizer group split into its dense part and its expert part (flagged for DeepSpeed)."""
    out = []
    for g in groups:
        dense = [p for p in g["params"] if getattr(p, "allreduce", True)]
        expert = [p for p in g["params"] if not getattr(p, "allreduce", True)]
        out.append({**g, "params": dense})
        if expert:
            out.append({**g, "params": expert, "moe": True, "name": group_name})
    return [g for g in out if g["params"]]


def _engine_class(deepspeed, expert_parallel: bool):
    """DeepSpeed's engine, told that the model has MoE layers when our experts are split over ranks."""
    base = deepspeed.runtime.engine.DeepSpeedEngine
    if not expert_parallel:
        return base

    class _ExpertAwareEngine(base):
        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            self.has_moe_layers = True  # expert groups come from register_expert_groups

    return _ExpertAwareEngine


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU comm backend JIT-builds a shared-memory all-reduce op that only its
    `inference_all_reduce` uses; training never calls it, so it is marked incompatible (not built)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def cpu_adam_cache_dir() -> str:
    """Where torch's JIT extension loader caches DeepSpeedCPUAdam (TORCH_EXTENSIONS_DIR or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.dirname(_get_build_directory("cpu_adam", verbose=False))


def build_cpu_adam(groups: list[dict], lr: float, betas: tuple, eps: float) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam (AdamW mode), JIT-built once with ninja into the torch extensions cache."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cache = os.path.join(cpu_adam_cache_dir(), "cpu_adam")
    if not os.path.exists(os.path.join(cache, "cpu_adam.so")):
        log.warning("building DeepSpeedCPUAdam (C++, once) into %s; later runs reuse it", cache)
    else:
        log.info("DeepSpeedCPUAdam: using the build cached in %s", cache)
    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)


class DeepSpeedOptimizer:
    """The trainer's optimizer under DeepSpeed: backward, step (with the engine's grad norm), lr groups,
    and moeforge's layout-independent optimizer state (the ZeroOneOptimizer checkpoint protocol)."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, zero_stage: int, offload_optimizer: str,
                 micro_batch_size: int, grad_accum_steps: int, grad_clip: float, groups: list[dict],
                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 cpu_adam: Optional[Callable[[list[dict]], torch.optim.Optimizer]] = None) -> None:
        deepspeed = import_deepspeed()
        from deepspeed import comm as ds_dist

        skip_shm_comm_build()
        ds_dist.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        expert_parallel = ctx.ep_size > 1
        self.plain_groups = groups  # train/optim.py's groups, the checkpoint's param_groups
        if expert_parallel:
            name = register_expert_groups(ctx)
            mark_expert_params(model, name)
            groups = split_expert_groups(groups, name)
        offload = offload_optimizer == "cpu"
        inner = cpu_adam(groups) if offload and cpu_adam is not None else make_optimizer(groups)
        config = deepspeed_config(zero_stage, offload_optimizer, micro_batch_size, grad_accum_steps, ctx.dp_size,
                                  grad_clip, cpu_adam=offload and cpu_adam is not None)
        from deepspeed.runtime.config import DeepSpeedConfig

        engine_cls = _engine_class(deepspeed, expert_parallel)
        self.engine = engine_cls(args=None, model=model, optimizer=inner, config=config,
                                 config_class=DeepSpeedConfig(config, None), dist_init_required=False)

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already normalised by the global batch)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip and update; returns the global gradient norm before clipping (inf: DeepSpeed found a
        non-finite gradient and skipped the update)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the engine clears its gradients in step()."""

    # ------------------------------------------------------------------ checkpoints
    def _step_like(self, value: float) -> Any:
        """A step count as the inner optimizer keeps it: torch's AdamW a float32 tensor, DeepSpeedCPUAdam an int."""
        if isinstance(self.engine.optimizer.optimizer, torch.optim.AdamW):
            return torch.tensor(value, dtype=torch.float32)
        return int(value)

    def _inner_step(self) -> torch.Tensor:
        inner = self.engine.optimizer.optimizer
        for st in inner.state.values():
            if "step" in st:
                s = st["step"]
                return s.detach().clone().float() if isinstance(s, torch.Tensor) else torch.tensor(float(s))
        return torch.zeros((), dtype=torch.float32)

    def _init_state(self) -> None:
        """Materialise AdamW state (zeros) on the engine's fp32 partitions and link every parameter to its
        piece. DeepSpeed links lazily after the first group's first step only, which leaves the other
        groups' parameters without state fragments under a lazily-initialised optimizer (torch's AdamW):
        safe_get_full_optimizer_state then raises "exp_avg not found in optimizer state fragment"."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zero = self.engine.optimizer
        inner = zero.optimizer
        for flat in zero.single_partition_of_fp32_groups:
            if not inner.state.get(flat):
                inner.state[flat] = {"step": self._step_like(0.0), **{k: torch.zeros_like(flat) for k in ADAM_MOMENTS}}
        for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)
        zero._hp_optimizer_states_linked = True

    def checkpoint_state(self, names: dict[nn.Parameter, str]) -> dict:
        """AdamW state keyed by parameter name, full tensors (DeepSpeed's per-parameter accessors),
        in a plain optimizer's state-dict layout; param_groups as train/optim.py built them."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._init_state()
        step = self._inner_step()
        state = {
            names[p]: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).reshape(p.shape)
                                                for k in ADAM_MOMENTS}}
            for g in self.plain_groups for p in g["params"]
        }
        live = {k: v for k, v in self.param_groups[0].items() if k not in ("params", "moe", "name", "weight_decay")}
        groups = [{**live, **{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
                  for g in self.plain_groups]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_checkpoint_state(self, names: dict[nn.Parameter, str], osd: Optional[dict]) -> None:
        """fp32 masters from the (loaded) parameters, AdamW moments and step from `osd`."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._init_state()
        steps = set()
        for g in self.plain_groups:
            for p in g["params"]:
                safe_set_full_fp32_param(p, p.detach().float())
                if osd is None:
                    continue
                saved = saved_param_state(osd, names[p])
                for k in ADAM_MOMENTS:
                    value = saved[k].full_tensor() if hasattr(saved[k], "full_tensor") else saved[k]
                    safe_set_full_optimizer_state(p, value.float(), k)
                steps.add(float(saved["step"]))
        if len(steps) > 1:
            raise ValueError(f"checkpoint: AdamW step counts differ between parameters ({sorted(steps)}); "
                             "DeepSpeed keeps one per parameter group")
        for step in steps:
            for st in self.engine.optimizer.optimizer.state.values():
                st["step"] = self._step_like(step)
