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
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from parallel.context import ParallelContext
from parallel.expert_parallel import is_expert_param

_OPTIONS = StateDictOptions(ignore_frozen_params=False)


class CheckpointState:
    """Builds the state dict to save / fill, and writes a filled one back into the live objects."""

    def __init__(self, model: nn.Module, optimizer: Optional[Any], ctx: ParallelContext) -> None:
        self.model, self.optimizer, self.ctx = model, optimizer, ctx
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

    def state_dict(self) -> dict[str, Any]:
        """{"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]}}."""
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

    def _names(self) -> dict[nn.Parameter, str]:
        return {p: n for n, p in self.model.named_parameters()}
