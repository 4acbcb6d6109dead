"""Process-level facts the trainer needs: ranks, device, and the few collectives it calls.

Single-process runs use `ParallelContext.single()`; `parallel.mesh` builds the
distributed one from torchrun's environment. The trainer talks only to this
interface, so its loop reads the same on one process and on many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from parallel import comm_ledger


def default_device() -> torch.device:
    """CUDA (this process's local GPU) when available, else CPU."""
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0  # rank among data-parallel replicas (which data shard to read)
    dp_size: int = 1
    device: torch.device = field(default_factory=default_device)
    mesh: Optional[Any] = None  # torch.distributed DeviceMesh when distributed
    dp_group: Optional[Any] = None  # process group over which batches differ
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Optional[Any] = None  # ranks that split the routed experts and exchange tokens
    ep_nodes: int = 1  # nodes the EP group spans (> 1: hierarchical dispatch, parallel/node_dispatch.py)
    ep_inter_group: Optional[Any] = None  # the EP ranks with this rank's local index, one per node
    ep_intra_group: Optional[Any] = None  # the EP ranks on this rank's node
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0  # pipeline rank (which stages this rank runs)
    pp_group: Optional[Any] = None  # the ranks of one pipeline (same data-parallel coordinates)
    sp_group: Optional[Any] = None  # the tp group under sequence parallelism (tp ranks hold different tokens)

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor, group: Optional[Any] = None, label: str = "world") -> torch.Tensor:
        """Sum over all ranks (or `group`, role `label` in the ledger); identity on one process. Returns a new tensor."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        comm_ledger.all_reduce(out, label, group)
        return out

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (token counts of the global batch)."""
        return self.all_reduce_sum(tensor, self.dp_group, "dp")

    def load_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of routing statistics over every rank that routed different tokens: data-parallel replicas and,
        under sequence parallelism, the tp ranks."""
        tensor = self.dp_sum(tensor)
        return tensor if self.sp_group is None else self.all_reduce_sum(tensor, self.sp_group, "tp")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
