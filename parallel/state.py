"""Full (unsharded) tensors of a parallelised model, for parity checks and export."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel import comm_ledger
from parallel.context import ParallelContext
from parallel.expert_parallel import is_expert_param


@torch.no_grad()
def full_tensor(name: str, t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The whole tensor as on one process. Collective: every rank must call it in the same order."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if ctx.ep_size > 1 and is_expert_param(name):
        pieces = [torch.empty_like(t) for _ in range(ctx.ep_size)]
        comm_ledger.all_gather(pieces, t.contiguous(), "ep", ctx.ep_group)
        t = torch.cat(pieces, dim=0)
    return t.detach().clone()


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, unsharded, on every rank."""
    out = {name: full_tensor(name, p, ctx) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out[name] = b.detach().clone()
    if getattr(ctx, "pp_size", 1) > 1:  # pipeline stages hold different pieces: merge them on every rank
        pieces: list = [None] * ctx.pp_size
        comm_ledger.all_gather_object(pieces, out, "pp", ctx.pp_group)
        out = {name: t for piece in pieces for name, t in piece.items()}
    return out
