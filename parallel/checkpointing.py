"""Layout-independent checkpoint state: every tensor under its parameter name with its global shape.

torch.distributed.checkpoint (DCP) reshards DTensors between layouts, but only if each
key means the same global tensor on every rank. Two things in our layouts break that
and are fixed here:
  * routed experts under expert parallelism are local slices [E/ep, ...]; they are saved
    as DTensors sharded over the `ep` mesh (global shape [E, ...]), gathered over their
    expert-data-parallel shards first;
  * ZeRO-1 keeps AdamW state on sharded fp32 masters, not on the parameters; it is saved
    in the same {"state": {name: ...}, "param_groups": [...]} form as a plain optimizer.
A checkpoint saved under EP=2 x DP=2 therefore loads under DP=4, under ZeRO-1, or in one process.
The weights' EMA (parallel/ema.py), when kept, is saved as {"ema": {name: tensor}}: each rank's CPU
averages laid out like the parameters they average, so it reshards like the weights do.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from parallel.context import ParallelContext
from parallel.ema import WeightEMA, local_tensor
from parallel.expert_parallel import is_expert_param

log = logging.getLogger(__name__)

_OPTIONS = StateDictOptions(ignore_frozen_params=False)


class CheckpointState:
    """Builds the state dict to save / fill, and writes a filled one back into the live objects."""

    def __init__(self, model: nn.Module, optimizer: Optional[Any], ctx: ParallelContext,
                 ema: Optional[WeightEMA] = None) -> None:
        self.model, self.optimizer, self.ctx, self.ema = model, optimizer, ctx, ema
        self._live: dict[tuple, torch.Tensor] = {}  # (section, name, field) -> live tensor it stands for

    def _split_experts(self) -> bool:
        return self.ctx.ep_size > 1 and self.ctx.mesh is not None

    def _to_global(self, key: tuple, name: str, t: Any) -> Any:
        if not (self._split_experts() and is_expert_param(name) and isinstance(t, torch.Tensor) and t.dim() > 0):
            return t
        self._live[key] = t
        full_local = t.full_tensor() if isinstance(t, DTensor) else t  # gather expert-data-parallel shards
        return DTensor.from_local(full_local.detach().contiguous(), self.ctx.mesh["ep"], [Shard(0)], run_check=False)

    def _from_global(self, key: tuple, loaded: Any) -> Any:
        live = self._live.get(key)
        if live is None:
            return loaded
        local = loaded.to_local()
        if isinstance(live, DTensor):
            return distribute_tensor(local, live.device_mesh, live.placements, src_data_rank=None)
        return local

    def state_dict(self, with_ema: bool = True) -> dict[str, Any]:
        """{"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]}}, and
        "ema": {name: tensor} when an EMA is kept (and `with_ema`: False to load a checkpoint without one)."""
        self._live.clear()
        zero = hasattr(self.optimizer, "checkpoint_state")
        if self.optimizer is None or zero:
            msd = get_state_dict(self.model, [], options=_OPTIONS)[0]
            osd = self.optimizer.checkpoint_state(self._names()) if zero else None
        else:
            msd, osd = get_state_dict(self.model, self.optimizer, options=_OPTIONS)
        state: dict[str, Any] = {"model": {n: self._to_global(("model", n), n, t) for n, t in msd.items()}}
        if osd is not None:
            state["optim"] = {
                "state": {
                    n: {f: self._to_global(("optim", n, f), n, v) for f, v in s.items()} for n, s in osd["state"].items()
                },
                "param_groups": osd["param_groups"],
            }
        if self.ema is not None and with_ema:  # waits for the pending update: the EMA of the last step
            state["ema"] = {n: self._to_global(("ema", n), n, _laid_out_like(self.ema.params[n], average))
                            for n, average in self.ema.averages().items()}
        return state

    def load(self, state: dict[str, Any]) -> None:
        """Write a state dict filled by dcp.load back into the model and optimizer."""
        msd = {n: self._from_global(("model", n), t) for n, t in state["model"].items()}
        osd = None
        if "optim" in state:
            osd = {
                "state": {
                    n: {f: self._from_global(("optim", n, f), v) for f, v in s.items()}
                    for n, s in state["optim"]["state"].items()
                },
                "param_groups": state["optim"]["param_groups"],
            }
        if hasattr(self.optimizer, "checkpoint_state"):
            set_state_dict(self.model, [], model_state_dict=msd, optim_state_dict={}, options=_OPTIONS)
            self.optimizer.load_checkpoint_state(self._names(), osd)
        else:
            set_state_dict(
                self.model, self.optimizer if self.optimizer is not None else [],
                model_state_dict=msd, optim_state_dict=osd or {}, options=_OPTIONS,
            )
        if self.ema is None:
            return
        if "ema" in state:
            self.ema.load({n: local_tensor(self._from_global(("ema", n), t)) for n, t in state["ema"].items()})
        else:  # a checkpoint saved without an EMA: start it from the weights just loaded
            self.ema.start_from_weights()
            if self.ctx.is_main:
                log.warning("the checkpoint has no EMA of the weights; "
                            "train.ema_decay starts it from the resumed weights")

    def _names(self) -> dict[nn.Parameter, str]:
        return {p: n for n, p in self.model.named_parameters()}


def _laid_out_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's part of `param`, e.g. its EMA) as the tensor `param` is: a DTensor with its
    mesh, placements and global shape, or `local` itself. (DTensor.from_local moves `local` to the mesh's
    device: on a CUDA mesh the save holds a GPU copy of the rank's EMA while the state dict is built.)"""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
