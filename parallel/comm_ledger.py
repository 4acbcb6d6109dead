"""Communication ledger: every collective moeforge issues, counted on this rank per step.

An entry is keyed by (kind, group): kind is the collective (all_reduce, all_gather, send, recv,
reduce_scatter, all_to_all), group the role of the ranks it runs over, named by the caller
(ep, dp, edp, dp_shard, expert_dp, tp, pp, pp_tie, world): one process group can play several
roles (on 2 ranks with dp_shard = ep = 2, dp, dp_shard and ep are all the world group). Each entry holds its calls and bytes, where
bytes are what this rank puts into the collective: the input buffer (for all_to_all the rows
sent to every rank, itself included; for all_gather_object the pickled payload). A collective
over a group of one rank moves nothing and is not counted.

moeforge's own collectives (EP all-to-all, dp sums, gradient-norm and ZeRO-1 all-reduces,
ZeRO-1's parameter all-gather, pipeline sums, load gathers, the TP RoPE-key gradient sum) call
the functions below, which record and then call torch.distributed. Sequence parallelism's
all-gathers, reduce-scatters and sums over tp (parallel/sequence_parallel.py) are issued by moeforge
as functional collectives and recorded with `LEDGER.record` (the bytes of the input buffer, as here;
a recompute region's replay of a forward is not counted again). FSDP2's all-gathers and
reduce-scatters are counted from outside through FSDP2's own seam,
`FSDPModule.set_custom_all_gather / set_custom_reduce_scatter` (see `count_fsdp_collectives`):
FSDP2 hands `LedgeredAllGather` / `LedgeredReduceScatter` the exact flat buffers it
communicates (padding included), they record them and run FSDP2's default collective; HSDP's
all-reduce over the replicate dimension is counted through FSDP2's all-reduce hook. The pipeline
schedules' activations and gradients are counted per point-to-point op as kinds "send" / "recv"
over "pp" (`count_stage_p2p`), the forward-only evaluation's sends likewise. Not counted (yet):
DTensor's collectives inside tensor-parallel modules: plain TP's all-reduces (`Partial._reduce_value`
in torch/distributed/tensor/placement_types.py calls funcol.all_reduce during `redistribute`:
RowwiseParallel's output forward, ColwiseParallel's input gradient backward) and loss_parallel's
(funcol.all_reduce in torch/distributed/tensor/parallel/loss.py). Neither offers a hook; counting
them would take patching torch's functional collectives or running every step under a dispatch mode
(CommDebugMode's mechanism, which intercepts every op); the clean route is moeforge issuing plain TP's all-reduces
itself, as parallel/sequence_parallel.py issues SP's. Nor is torch.distributed.pipelining's one-time
warm-up handshake on the first step (P2P vote / neighbour ops, shape metadata: issued outside the
stage's op builders).

The ledger is per process (one process is one rank): `LEDGER.reset()` starts a step,
`LEDGER.summary()` reads it.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

def _size(group: Any) -> int:
    return dist.get_world_size(group)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommLedger:
    """Calls and bytes per (kind, group) since the last reset, and the seconds spent waiting for
    all-to-alls (the exposed time: a synchronous call's whole duration, an async one's wait)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], list[int]] = {}
        self.wait_s: dict[tuple[str, str], float] = {}

    def reset(self) -> None:
        self.entries = {}
        self.wait_s = {}

    def add_wait(self, kind: str, label: str, seconds: float) -> None:
        self.wait_s[(kind, label)] = self.wait_s.get((kind, label), 0.0) + seconds

    def record(self, kind: str, label: str, group: Any, n_bytes: int, calls: int = 1) -> None:
        """`calls` collectives of `kind` over process group `group` (playing role `label`)."""
        if dist.is_initialized() and _size(group) == 1:
            return
        entry = self.entries.setdefault((kind, label), [0, 0])
        entry[0] += calls
        entry[1] += int(n_bytes)

    def summary(self) -> dict[str, Any]:
        """{"calls": total, "bytes": total, "by": {"kind/group": {"calls", "bytes"[, "wait_s"]}}} (the metrics' `comm`)."""
        by: dict[str, dict[str, Any]] = {}
        for (k, g), (c, b) in sorted(self.entries.items()):
            by[f"{k}/{g}"] = {"calls": c, "bytes": b}
            if (k, g) in self.wait_s:
                by[f"{k}/{g}"]["wait_s"] = round(self.wait_s[(k, g)], 6)
        return {"calls": sum(e["calls"] for e in by.values()), "bytes": sum(e["bytes"] for e in by.values()),
                "by": by}


LEDGER = CommLedger()


# ---------------------------------------------------------------- moeforge's own collectives
def all_reduce(t: torch.Tensor, label: str, group: Any = None, async_op: bool = False) -> Optional[dist.Work]:
    """In-place SUM all-reduce of `t` over `group`, counted."""
    LEDGER.record("all_reduce", label, group, nbytes(t))
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather(pieces: list[torch.Tensor], t: torch.Tensor, label: str, group: Any = None) -> None:
    LEDGER.record("all_gather", label, group, nbytes(t))
    dist.all_gather(pieces, t, group=group)


def all_gather_object(pieces: list[Any], obj: Any, label: str, group: Any = None) -> None:
    LEDGER.record("all_gather", label, group, len(pickle.dumps(obj)))
    dist.all_gather_object(pieces, obj, group=group)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, label: str, group: Any = None,
                      output_splits: Optional[list[int]] = None, input_splits: Optional[list[int]] = None,
                      async_op: bool = False) -> Optional[dist.Work]:
    LEDGER.record("all_to_all", label, group, nbytes(inp))
    t0 = time.perf_counter()
    work = dist.all_to_all_single(out, inp, output_splits, input_splits, group=group, async_op=async_op)
    if not async_op:
        LEDGER.add_wait("all_to_all", label, time.perf_counter() - t0)
    return work


def wait(work: Optional[dist.Work], kind: str, label: str) -> None:
    """Wait for an async collective, counting the time blocked."""
    if work is None:
        return
    t0 = time.perf_counter()
    work.wait()
    LEDGER.add_wait(kind, label, time.perf_counter() - t0)


def send(t: torch.Tensor, peer: int, label: str, group: Any = None) -> None:
    """Point-to-point send of `t` to global rank `peer`, counted (kind "send")."""
    LEDGER.record("send", label, group, nbytes(t))
    dist.send(t, dst=peer, group=group)


def recv(t: torch.Tensor, peer: int, label: str, group: Any = None) -> None:
    """Point-to-point receive into `t` from global rank `peer`, counted (kind "recv", the bytes received)."""
    LEDGER.record("recv", label, group, nbytes(t))
    dist.recv(t, src=peer, group=group)


def record_p2p_ops(ops: list[dist.P2POp], label: str) -> list[dist.P2POp]:
    """Count point-to-point ops built elsewhere (a pipeline stage's sends and receives), one call each."""
    for op in ops:
        kind = "send" if op.op in (dist.isend, dist.send) else "recv"
        LEDGER.record(kind, label, op.group, nbytes(op.tensor))
    return ops


def record_all_gather(local: torch.Tensor, label: str, group: Any) -> None:
    """Count an all-gather of `local` issued elsewhere (DTensor.full_tensor of a Shard(0) DTensor)."""
    LEDGER.record("all_gather", label, group, nbytes(local))


def count_stage_p2p(stage: Any, label: str) -> None:
    """Count the activations and gradients a torch.distributed.pipelining stage exchanges: every schedule
    (GPipe, 1F1B, interleaved, zero bubble, DualPipeV) takes its point-to-point ops from the stage's four
    `get_{fwd,bwd}_{send,recv}_ops`, so wrapping them on the instance counts each op the schedule runs
    (a V schedule's same-rank stage pair passes tensors directly and builds none)."""
    for name in ("get_fwd_recv_ops", "get_fwd_send_ops", "get_bwd_recv_ops", "get_bwd_send_ops"):
        inner = getattr(stage, name)
        setattr(stage, name, lambda chunk, inner=inner: record_p2p_ops(inner(chunk), label))


# ---------------------------------------------------------------- FSDP2, counted from outside
class LedgeredAllGather(DefaultAllGather):
    """FSDP2's default all-gather, counted: `input_tensor` is this rank's flat padded shard."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):  # type: ignore[override]
        LEDGER.record("all_gather", self.label, group, nbytes(input_tensor))
        return super().__call__(output_tensor, input_tensor, group, async_op)


class LedgeredReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, counted: `input_tensor` is the flat padded gradient."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):  # type: ignore[override]
        LEDGER.record("reduce_scatter", self.label, group, nbytes(input_tensor))
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def count_fsdp_collectives(module: nn.Module, mesh: Any) -> None:
    """Count the all-gathers and reduce-scatters of FSDP module `module` over its 1-D or HSDP 2-D `mesh`
    (role: the mesh's last dimension, the one it shards over) and, under HSDP, the all-reduce of each
    reduce-scatter output over the replicate dimension (role: the first dimension's name), which FSDP2
    issues itself: its all-reduce hook runs right after that all-reduce on the buffer it reduced."""
    assert isinstance(module, FSDPModule)
    label = mesh.mesh_dim_names[-1]
    module.set_custom_all_gather(LedgeredAllGather(label))
    module.set_custom_reduce_scatter(LedgeredReduceScatter(label))
    if mesh.ndim == 2:
        replicate, group = mesh.mesh_dim_names[0], mesh.get_group(0)
        module.set_all_reduce_hook(lambda reduced: LEDGER.record("all_reduce", replicate, group, nbytes(reduced)))
