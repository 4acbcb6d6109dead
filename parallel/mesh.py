"""Process group and DeviceMesh from torchrun's environment, for a layout parallel.layout accepts.

Mesh dimensions, outermost first: pp x dp_replicate x edp x ep x tp, where
dp_shard = edp * ep: expert parallelism is folded into the sharded data-parallel
dimension (DeepSeek-V3 §3.2: EP ranks are data-parallel ranks that exchange tokens).
Flattened views:
  dp        = dp_replicate x edp x ep   ranks that see different data
  dp_shard  = edp x ep                  FSDP2 shards dense parameters over it
  edp       expert-data-parallel        FSDP2 shards / ZeRO-1 reduces expert parameters over it
  ep        expert-parallel             experts are split over it, tokens all-to-all'd within it
An EP group spanning nodes (ep = nodes x parallel.ep_ranks_per_node) also gets two plain process
groups for the hierarchical dispatch (`node_groups`): inter-node (one rank per node, same local
index) and intra-node (the group's ranks on one node).
gloo on CPU, NCCL on CUDA, chosen at run time.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel import layout
from parallel.context import ParallelContext, default_device

if TYPE_CHECKING:
    from models.config import ModelConfig


def init_distributed(parallel, model: "ModelConfig") -> ParallelContext:
    """Initialise the default process group from torchrun's env and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else None
    parallel = layout.resolved(parallel, world_size, local)  # the autos: dp_shard, ep_ranks_per_node
    layout.check(parallel, model, world_size)
    if world_size == 1 and not dist.is_initialized():
        return ParallelContext.single()
    device = default_device()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=10)
        store = _elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                    rank=int(os.environ["RANK"]), world_size=world_size)
    return build_context(parallel, device)


def _elastic_attempt_store(timeout: datetime.timedelta):
    """torchrun's shared agent store, with keys scoped to this restart attempt (None outside it).

    Under `torchrun --max-restarts` with the c10d rendezvous (`--standalone`), the agent keeps
    one TCPStore for every attempt and the default group's keys carry no attempt number, so a
    restarted worker can read its peer's address from the killed attempt and retry connecting
    to a dead port until the timeout (gloo), or reuse a stale NCCL id. All workers of one
    attempt share TORCHELASTIC_RESTART_COUNT, so it makes a per-attempt prefix.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moeforge/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def build_context(parallel, device: torch.device) -> ParallelContext:
    """DeviceMesh and groups for an initialised default process group."""
    p = parallel
    edp = p.dp_shard // p.ep
    mesh = init_device_mesh(
        device.type,
        (p.pp, p.dp_replicate, edp, p.ep, p.tp),
        mesh_dim_names=("pp", "dp_replicate", "edp", "ep", "tp"),
    )
    mesh["dp_replicate", "edp", "ep"]._flatten("dp")
    mesh["edp", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "edp"]._flatten("expert_dp")
    rank = dist.get_rank()
    nodes = layout.ep_nodes(p)
    inter, intra = node_groups(mesh, nodes, p.ep // nodes) if nodes > 1 else (None, None)
    return ParallelContext(
        rank=rank,
        world_size=dist.get_world_size(),
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=mesh["dp"].size(),
        device=device,
        mesh=mesh,
        dp_group=mesh["dp"].get_group(),
        ep_size=p.ep,
        ep_rank=mesh["ep"].get_local_rank(),
        ep_group=mesh["ep"].get_group(),
        ep_nodes=nodes,
        ep_inter_group=inter,
        ep_intra_group=intra,
        tp_size=p.tp,
        pp_size=p.pp,
        pp_rank=mesh["pp"].get_local_rank(),
        pp_group=mesh["pp"].get_group(),
        sp_group=mesh["tp"].get_group() if layout.sequence_parallel(p) else None,
    )


def node_groups(mesh, nodes: int, ranks_per_node: int) -> tuple[Any, Any]:
    """This rank's two groups of a hierarchical EP exchange: (inter-node: the ranks with its local index
    on every node of its EP group, intra-node: its node's ranks of the group). EP rank e sits on node
    e // ranks_per_node with local index e % ranks_per_node. Every rank creates every group, in one order."""
    ranks = mesh.mesh  # global ranks, [pp, dp_replicate, edp, ep, tp]
    split = ranks.reshape(ranks.shape[:3] + (nodes, ranks_per_node) + ranks.shape[4:])  # ep -> node x local
    me = dist.get_rank()
    mine: list[Any] = []
    for members in (split.movedim(3, -1).reshape(-1, nodes), split.movedim(4, -1).reshape(-1, ranks_per_node)):
        found = None
        for row in members.tolist():
            group = dist.new_group(row)
            if me in row:
                found = group
        mine.append(found)
    return mine[0], mine[1]
