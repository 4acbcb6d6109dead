"""Data parallelism: FSDP2 (`fully_shard`) or replicated parameters with a ZeRO-1 optimizer.

Gradients are SUMMED over ranks, never averaged: the trainer divides every loss by
the global batch's token count, so each rank's gradient is already its share of
the global gradient. Routed-expert parameters are reduced over the expert-data-
parallel group only (ranks holding the same experts); everything else over all
data-parallel ranks.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.moe import MoE
from parallel import comm_ledger
from parallel.expert_parallel import is_expert_param


def dense_and_expert_meshes(mesh) -> tuple[Any, Any]:
    """(mesh for dense params, mesh for expert params): HSDP 2-D when dp_replicate > 1."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"], mesh["dp_replicate", "edp"]
    return mesh["dp_shard"], mesh["edp"]


def mesh_label(mesh) -> str:
    """The ledger's name for a (possibly 2-D) mesh: its last dimension, the one FSDP2 shards over."""
    return mesh.mesh_dim_names[-1]


def apply_fsdp(
    model: nn.Module, mesh, mp_policy: Optional[MixedPrecisionPolicy] = None, roots: Optional[list[nn.Module]] = None
) -> None:
    """fully_shard every block (experts separately, over their own mesh), then the root.

    `roots`: under pipeline parallelism, this rank's stage modules, each its own FSDP root
    (the pipeline schedule then defers gradient reduction to the end of the step). Parameters
    then stay unsharded from the first forward to the end of the step (no all-gather per
    micro-batch), which zero-bubble schedules also need: their weight-gradient pass finds
    the parameters through the stage module, and must see the unsharded ones autograd used."""
    dense_mesh, expert_mesh = dense_and_expert_meshes(mesh)
    mp_policy = mp_policy or MixedPrecisionPolicy()
    reshard = None if roots is None else False  # None: FSDP2's default (reshard all but the root)
    blocks = list(model.layers.values()) + list(model.mtp)
    for block in blocks:
        for module in block.modules():
            if isinstance(module, MoE):
                fully_shard(module.experts, mesh=expert_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
                comm_ledger.count_fsdp_collectives(module.experts, expert_mesh)
        fully_shard(block, mesh=dense_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
        comm_ledger.count_fsdp_collectives(block, dense_mesh)
    for root in roots or [model]:
        fully_shard(root, mesh=dense_mesh, mp_policy=mp_policy)
        comm_ledger.count_fsdp_collectives(root, dense_mesh)
    for module in [m for r in roots or [model] for m in r.modules()]:
        if isinstance(module, FSDPModule):
            # Sum, never average: losses are already normalised by the global token count.
            # Plain SUM collectives (no PREMUL_SUM) also work on gloo.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def local_shard(full: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's Shard(0) piece of a tensor that every rank of `mesh` holds in full."""
    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, [Shard(0)])
    return full.narrow(0, offset[0], shape[0]) if full.dim() else full


def padded_shard(t: DTensor) -> torch.Tensor:
    """The buffer each rank contributes to `t.full_tensor()` of a Shard(0) DTensor: its dim-0 chunk
    padded to ceil(dim0 / ranks) rows (the shape only matters: the ledger counts its bytes)."""
    ranks = t.device_mesh.size()
    rows = -(-t.shape[0] // ranks) if t.dim() else 1
    return t.to_local().new_empty((rows,) + tuple(t.shape[1:]), device="meta")


def saved_param_state(osd: dict, name: str) -> dict:
    """The optimizer state a checkpoint saved for parameter `name` (moeforge's layout-independent keys)."""
    saved = osd["state"].get(name)
    if saved is None:
        raise KeyError(f"checkpoint has no optimizer state for {name}")
    return saved


class ZeroOneOptimizer:
    """ZeRO stage 1: parameters and gradients replicated, AdamW state sharded over data parallel.

    Each parameter gets an fp32 master copy sharded along dim 0 (a DTensor) over the
    ranks that hold the same parameter: all data-parallel ranks for dense weights,
    the expert-data-parallel group for routed experts. After the summed gradient
    all-reduce, each rank updates its master shard and the full parameter is
    all-gathered back.
    """

    def __init__(self, model: nn.Module, make_inner, mesh) -> None:
        self.dense_mesh = mesh["dp"]
        self.expert_mesh = mesh["expert_dp"]
        self.params: list[tuple[nn.Parameter, DTensor, Any]] = []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups: dict[bool, list] = {True: [], False: []}
        masters_of: dict[nn.Parameter, DTensor] = {}
        for name, p in named:
            m = self.expert_mesh if is_expert_param(name) else self.dense_mesh
            master = nn.Parameter(
                DTensor.from_local(local_shard(p.detach().float(), m).clone(), m, [Shard(0)],
                                   shape=p.shape, stride=p.stride(), run_check=False)
            )
            self.params.append((p, master, m))
            masters_of[p] = master
            groups[is_expert_param(name)].append(p)
        self.groups = [(self.dense_mesh, groups[False]), (self.expert_mesh, groups[True])]
        self.inner: torch.optim.Optimizer = make_inner(model, masters_of)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def reduce_gradients(self) -> None:
        """Sum gradients over each parameter's data-parallel group, one flat all-reduce per group."""
        for mesh, params in self.groups:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads or mesh.size() == 1:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            comm_ledger.all_reduce(flat, mesh_label(mesh), mesh.get_group())
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    @torch.no_grad()
    def step(self) -> None:
        for p, master, mesh in self.params:
            if p.grad is None:
                master.grad = None
                continue
            master.grad = DTensor.from_local(
                local_shard(p.grad.float(), mesh).contiguous(), mesh, [Shard(0)],
                shape=p.shape, stride=p.stride(), run_check=False,
            )
        self.inner.step()
        for p, master, mesh in self.params:
            comm_ledger.record_all_gather(padded_shard(master), mesh_label(mesh), mesh.get_group())
            p.copy_(master.full_tensor().to(p.dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, master, _ in self.params:
            p.grad = None
            master.grad = None

    def _init_state(self) -> None:
        """Materialise AdamW state (zeros) so a checkpoint can be loaded before the first step."""
        for _, master, _ in self.params:
            if master not in self.inner.state or not self.inner.state[master]:
                self.inner.state[master] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(master),
                    "exp_avg_sq": torch.zeros_like(master),
                }

    def checkpoint_state(self, names: dict[nn.Parameter, str]) -> dict:
        """AdamW state keyed by parameter name, in the layout of a plain optimizer's state dict."""
        self._init_state()
        state = {names[p]: dict(self.inner.state[master]) for p, master, _ in self.params}
        index = {id(master): names[p] for p, master, _ in self.params}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(m)] for m in g["params"]]}
            for g in self.inner.param_groups
        ]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_checkpoint_state(self, names: dict[nn.Parameter, str], osd: Optional[dict]) -> None:
        """Re-slice masters from the (loaded) parameters and fill AdamW state from `osd`."""
        self._init_state()
        for p, master, mesh in self.params:
            master.to_local().copy_(local_shard(p.detach().float(), mesh))
            if osd is None:
                continue
            saved = saved_param_state(osd, names[p])
            live = self.inner.state[master]
            for field, value in saved.items():
                if isinstance(live.get(field), DTensor):
                    full = value.full_tensor() if isinstance(value, DTensor) else value
                    live[field].to_local().copy_(local_shard(full.to(live[field].dtype), mesh))
                else:
                    live[field] = value.detach().clone() if isinstance(value, torch.Tensor) else value


def grad_norm_replicas(model: nn.Module, mode: str, ctx) -> list[tuple[nn.Parameter, int]]:
    """(parameter, number of ranks holding an identical copy of this rank's gradient piece).

    Within a pipeline stage's ranks, a piece is distinct across the mesh dimensions its
    DTensor is sharded over (FSDP, TP) and, for routed experts, across the ep ranks;
    every other rank of the stage holds the same values.
    """
    if ctx.mesh is None:
        return [(p, 1) for p in model.parameters() if p.requires_grad]
    stage_world = ctx.world_size // max(ctx.pp_size, 1)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        distinct = 1
        if isinstance(p, DTensor):
            for size, placement in zip(p.device_mesh.shape, p.placements):
                if placement.is_shard() or isinstance(placement, _StridedShard):  # FSDP over TP: strided
                    distinct *= size
        if ctx.ep_size > 1 and is_expert_param(name):
            distinct *= ctx.ep_size
        out.append((p, stage_world // distinct))
    return out


@torch.no_grad()
def clip_grad_norm(params: Iterable[tuple[nn.Parameter, int]], max_norm: float, group: Any = None) -> float:
    """Global L2 norm of all gradients (each distinct piece counted once) and in-place clipping.

    One scalar all-reduce: every rank adds |g_local|^2 / replicas.
    """
    params = [(p, r) for p, r in params if p.grad is not None]
    locals_ = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p, _ in params]
    device = locals_[0].device if locals_ else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g, (_, r) in zip(locals_, params):
        total += g.detach().double().pow(2).sum() / r
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        comm_ledger.all_reduce(total, "world" if group is None else "grad_norm", group)
    norm = float(total.sqrt())
    if max_norm > 0 and norm > max_norm and locals_:
        torch._foreach_mul_(locals_, max_norm / (norm + 1e-6))
    return norm
