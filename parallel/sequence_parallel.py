"""Sequence parallelism under tensor parallelism (Megatron-style SP, Korthikanti et al. 2022).

Between the tensor-parallel regions the residual stream [B, S, H] is split along the sequence
over the tp ranks: rank r holds positions [r S/tp, (r+1) S/tp). The RMSNorms, residual adds,
the MLA down-projections, MTP's eh_proj, the router and the routed experts run on that shard
only (the MoE routes and dispatches each token once: on the tp rank that holds it).
  all-gather (seq)     before the column-parallel projections; for MLA at the compressed latents
                       (q_a_proj's and kv_a_proj_with_mqa's outputs, d_q + d_c + d_rope values per
                       token, 2112 for V3, against H = 7168 for the hidden state: the cheapest
                       point, and k^R's RoPE is applied after it, on the full sequence's positions);
                       without q_lora_rank (and for GQA) at the attention's input; SwiGLU (dense MLP
                       and shared experts) at its input; the output head at its input.
  reduce-scatter (seq) after the row-parallel projections (o_proj, down_proj) and the
                       vocab-parallel embedding, instead of their all-reduce.
The backward of each is the other one. Attention (doc_ids masks, RoPE positions, sliding
windows) runs on the gathered full sequence, so it needs nothing new.

Column- and row-parallel weights are DTensors sharded over tp, as in parallel/tensor_parallel.py
(state dict, FSDP2, checkpoints and the grad norm see the same parameters); each forward reads the
local shard (`_LocalWeights`) and the collectives are issued here, through parallel/comm_ledger
(group "tp"), as functional collectives so that recompute regions record and replay them
(parallel/recompute.py). Parameters that are not tp-sharded see one shard of the tokens, so their
gradients are summed over tp after backward (`sum_replicated_grads`, one all-reduce), and the MoE
balance statistics and expert loads are sums over tp too (`SumOverTp`, ParallelContext.load_sum).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.attention import MultiHeadLatentAttention
from models.gqa_attention import GroupedQueryAttention
from models.mlp import SwiGLU
from models.moe import MoE
from parallel import comm_ledger
from parallel.tensor_parallel import shard_sinks

SEQ_DIM = -2  # [B, S, H] and the MoE's flat [T, H] alike: the token dimension


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a recompute region's forward replays then: not counted twice)."""
    return torch._C._current_graph_task_id() != -1


def gather_tokens(x: torch.Tensor, group: Any, count: bool = True) -> torch.Tensor:
    """All-gather along the token dimension over tp, counted in the ledger (`count`: not in a replay)."""
    x = x.contiguous()
    if count:
        comm_ledger.LEDGER.record("all_gather", "tp", group, comm_ledger.nbytes(x))
    return funcol.wait_tensor(funcol.all_gather_single(x, x.dim() + SEQ_DIM, group))


def reduce_scatter_tokens(x: torch.Tensor, group: Any, count: bool = True) -> torch.Tensor:
    """Sum over tp, scattered along the token dimension, counted in the ledger (`count`: not in a replay)."""
    x = x.contiguous()
    if count:
        comm_ledger.LEDGER.record("reduce_scatter", "tp", group, comm_ledger.nbytes(x))
    return funcol.wait_tensor(funcol.reduce_scatter_single(x, "sum", x.dim() + SEQ_DIM, group))


class _SequenceCollective(torch.autograd.Function):
    """`gather`: sequence shards -> the full sequence, backward the gradient summed over tp and scattered back;
    else partial sums over tp of the full sequence -> this rank's shard of the sum, backward an all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, gather: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.gather = group, gather
        return (gather_tokens if gather else reduce_scatter_tokens)(x, group, count=not _in_backward())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return (reduce_scatter_tokens if ctx.gather else gather_tokens)(grad, ctx.group), None, None


def gather_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _SequenceCollective.apply(x, group, True)


def reduce_scatter_sequence(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _SequenceCollective.apply(x, group, False)


class SumOverTp(torch.autograd.Function):
    """Sum of statistics over tp (all-reduce); backward identity: every rank's copy of the sum feeds the same
    replicated loss, whose gradient w.r.t. this rank's share is the gradient w.r.t. the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        if not _in_backward():
            comm_ledger.LEDGER.record("all_reduce", "tp", group, comm_ledger.nbytes(x))
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


# ------------------------------------------------------------------------------- module plans
class _LocalWeights:
    """Forward pre/post hooks: the module computes with the local shards of its DTensor parameters
    (their gradients flow back to the DTensors through to_local); `bias_after` holds a row-parallel
    bias out of the GEMM, to be added once after the reduce-scatter."""

    def __init__(self, names: Iterable[str], bias_after: bool = False) -> None:
        self.names, self.bias_after = tuple(names), bias_after

    def pre(self, module: nn.Module, args: tuple) -> None:
        for name in self.names:
            module.__dict__[name] = module._parameters[name].to_local()
        if self.bias_after and module._parameters.get("bias") is not None:
            module.__dict__["bias"] = None

    def post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for name in self.names:
            module.__dict__.pop(name, None)
        if self.bias_after and module._parameters.get("bias") is not None:
            module.__dict__.pop("bias", None)


def _shard(module: nn.Module, tp_mesh, placements: dict[str, int], bias_after: bool = False) -> None:
    """Parameters name -> Shard(dim) over tp; the module then computes on its local shards."""
    for name, dim in placements.items():
        p = module._parameters.get(name)
        if p is not None:
            module._parameters[name] = nn.Parameter(distribute_tensor(p.detach(), tp_mesh, [Shard(dim)]),
                                                    p.requires_grad)
    names = [n for n in placements if module._parameters.get(n) is not None]
    local = _LocalWeights(names, bias_after)
    module.register_forward_pre_hook(local.pre)
    module.register_forward_hook(local.post)


def colwise(module: nn.Linear, tp_mesh) -> None:
    _shard(module, tp_mesh, {"weight": 0, "bias": 0})


def rowwise(module: nn.Linear, tp_mesh, group: Any) -> None:
    """Output partial sums reduce-scattered along the sequence, then the (replicated) bias added once."""
    _shard(module, tp_mesh, {"weight": 1}, bias_after=True)

    def reduce(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = reduce_scatter_sequence(out, group)
        return out if mod._parameters.get("bias") is None else out + mod._parameters["bias"]

    module.register_forward_hook(reduce)


def _gather_input(group: Any):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (gather_sequence(args[0], group),) + tuple(args[1:])

    return hook


def _gather_output(group: Any):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return gather_sequence(out, group)

    return hook


class _VocabParallelLookup:
    """Embedding rows of the vocabulary over tp (Shard(0)): ids outside this rank's rows look up row 0 and are
    zeroed, and the partial sums are reduce-scattered along the sequence (vocab-parallel embedding + SP)."""

    def __init__(self, lo: int, rows: int, group: Any) -> None:
        self.lo, self.rows, self.group = lo, rows, group
        self.mine: list[torch.Tensor] = []  # the ids' mask, from the pre-hook to the hook (one call at a time)

    def pre(self, module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        self.mine.append((ids >= self.lo) & (ids < self.lo + self.rows))
        return ((ids - self.lo).clamp(0, self.rows - 1),) + tuple(args[1:])

    def post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        mine = self.mine.pop()
        return reduce_scatter_sequence(out * mine.unsqueeze(-1).to(out.dtype), self.group)


def vocab_parallel_embedding(embedding: nn.Embedding, tp_mesh, group: Any) -> None:
    rows = embedding.num_embeddings // tp_mesh.size()  # parallel.layout: tp divides the vocabulary
    lookup = _VocabParallelLookup(tp_mesh.get_local_rank() * rows, rows, group)
    embedding.register_forward_pre_hook(lookup.pre)
    _shard(embedding, tp_mesh, {"weight": 0})
    embedding.register_forward_hook(lookup.post)


def vocab_parallel_head(lm_head: nn.Linear, tp_mesh, group: Any, tied: Any = None) -> None:
    """The head gathers its input along the sequence and returns logits sharded over the vocabulary, a
    DTensor Shard(-1) for loss_parallel. `tied`: the embedding's sharded weight, when the two share it."""
    lm_head.register_forward_pre_hook(_gather_input(group))
    if tied is None:
        _shard(lm_head, tp_mesh, {"weight": 0})
    else:
        lm_head._parameters["weight"] = tied
        local = _LocalWeights(["weight"])
        lm_head.register_forward_pre_hook(local.pre)
        lm_head.register_forward_hook(local.post)

    def wrap(module: nn.Module, args: tuple, out: torch.Tensor) -> DTensor:
        return DTensor.from_local(out, tp_mesh, [Shard(out.dim() - 1)], run_check=False)

    lm_head.register_forward_hook(wrap)


class _TpSum:
    """MoE.balance_reduce under SP: the balance statistics summed over tp."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return SumOverTp.apply(t, self.group)


def tp_split_linears(model: nn.Module) -> Iterator[tuple[nn.Linear, str]]:
    """(projection, "colwise" | "rowwise") for every projection the plan splits over tp."""
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            yield (module.q_proj if module.q_lora_rank is None else module.q_b_proj), "colwise"
            yield module.kv_b_proj, "colwise"
            yield module.o_proj, "rowwise"
        elif isinstance(module, GroupedQueryAttention):
            yield from ((proj, "colwise") for proj in (module.q_proj, module.k_proj, module.v_proj))
            yield module.o_proj, "rowwise"
        elif isinstance(module, SwiGLU):  # dense MLP and shared experts alike
            yield from ((module.gate_proj, "colwise"), (module.up_proj, "colwise"), (module.down_proj, "rowwise"))


def replicated_parameter_names(model: nn.Module) -> list[str]:
    """Parameters the plan leaves whole on every tp rank (norms, MLA down-projections, router, routed experts,
    eh_proj, row-parallel biases): each tp rank computes their gradient from its own tokens."""
    sharded = {id(linear.weight) for linear, _ in tp_split_linears(model)}
    sharded |= {id(linear.bias) for linear, style in tp_split_linears(model) if style == "colwise" and
                linear.bias is not None}
    sharded |= {id(m.sinks) for m in model.modules() if isinstance(m, GroupedQueryAttention)}
    sharded |= {id(m.weight) for m in (model.embed_tokens, model.lm_head) if m is not None}
    return [name for name, p in model.named_parameters() if id(p) not in sharded]


def apply_sequence_parallel(model: nn.Module, tp_mesh) -> list[str]:
    """Tensor parallelism with the sequence split between the TP regions (this module's docstring).
    Returns the names of the parameters that are not tp-sharded: their gradients need a sum over tp."""
    group = tp_mesh.get_group()
    replicated = replicated_parameter_names(model)
    embedding, head = model.embed_tokens, model.lm_head  # None on pipeline ranks without them
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    for linear, style in list(tp_split_linears(model)):
        if style == "colwise":
            colwise(linear, tp_mesh)
        else:
            rowwise(linear, tp_mesh, group)
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention) and module.q_lora_rank is not None:
            # gather the latents: d_q + d_c + d_rope values per token instead of H
            module.q_a_proj.register_forward_hook(_gather_output(group))
            module.kv_a_proj_with_mqa.register_forward_hook(_gather_output(group))
        elif isinstance(module, (MultiHeadLatentAttention, GroupedQueryAttention, SwiGLU)):
            module.register_forward_pre_hook(_gather_input(group))  # q_proj (and kv) read the hidden state
        if isinstance(module, GroupedQueryAttention):
            shard_sinks(module, tp_mesh)
        elif isinstance(module, MoE):
            module.balance_reduce = _TpSum(group)
            module.sequence_shard = (tp_mesh.get_local_rank(), tp_mesh.size())
    if embedding is not None:
        vocab_parallel_embedding(embedding, tp_mesh, group)
    if head is not None:
        vocab_parallel_head(head, tp_mesh, group, embedding.weight if tied else None)
    return replicated


@torch.no_grad()
def sum_replicated_grads(model: nn.Module, names: set[str], group: Any) -> None:
    """Sum over tp the gradients of the parameters in `names` (each tp rank saw its shard of the tokens), as
    one flat all-reduce; FSDP2's sharded gradients are summed shard by shard (the same shard on every tp rank)."""
    grads = [p.grad for name, p in model.named_parameters() if name in names and p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return
    flat = torch.cat([g.reshape(-1).float() for g in local])
    comm_ledger.all_reduce(flat, "tp", group)
    offset = 0
    for g in local:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
