"""Pipeline parallelism: the layer stack split into stages, run by a torch.distributed.pipelining schedule.

Stages
  The model is split into S = pp x stages_per_rank stages. Stage 0 holds the embedding,
  the last stage holds the final norm, the output head and the MTP modules (which need
  the embedding of shifted input ids, so the last stage keeps its own copy of
  `embed_tokens`). Layers are split evenly unless `parallel.pipeline_layers_per_stage`
  lists them; `parallel.pipeline_mtp_stage` gives the head + MTP a stage of their own
  (no transformer layers). Every rank builds the whole model from the same seed and then
  deletes what its stages do not own (layers from the ModuleDict, other modules set to
  None), so parameter names (FQNs) are those of the single-process model and
  checkpoints load across layouts.

Which rank holds which stage follows the schedule: one stage per rank (GPipe, 1F1B),
  a loop (stage s on rank s mod pp: Interleaved1F1B, InterleavedZeroBubble, LoopedBFS)
  or a V (stages r and 2pp-1-r on rank r: ZBVZeroBubble, DualPipeV). The split, the placement
  and the layout checks are parallel/layout.py's; this module builds and runs the stages.

Tied embedding copies
  When the first and the last stage live on different ranks and the last stage needs the
  embedding (MTP, or tied input/output embeddings), both ranks hold `embed_tokens.weight`
  with identical initial values (same seed). After the backward of a step the two
  gradients are summed over the {first, last} group (as Megatron does for tied
  embeddings), so both copies take the same optimizer step and stay identical. The
  gradient-norm accounting counts the pair once.

Loss and data
  Every rank of a stage reads the same micro-batches as the data-parallel rank it belongs
  to (the data stream is indexed by dp rank only), so no token ids travel through the
  pipeline: input ids go to the first stage as the schedule's input, and `tokens`,
  `labels` and `doc_ids` reach every stage as keyword arguments (doc ids: MoE
  sequence-wise balance loss on every stage; tokens and labels: CE and MTP on the last).
  The last stage returns [CE sum, MTP CE sum per depth]; the schedule's loss_fn turns it
  into exactly the single-process objective (`combine_losses` with the global token
  counts of the step) and `scale_grads=False` keeps the schedule from dividing again.

Aux losses and load counts
  MoE aux losses reach their gradients through `attach_aux_loss` (an identity on the
  layer output whose backward also feeds the aux loss), so they need no plumbing through
  stage outputs. Split-backward schedules (zero bubble, DualPipeV) compute input
  gradients first and weight gradients later from saved intermediate gradients; the aux
  path joins the main path at the router's matmul, whose output gradient is one of the
  saved intermediates, so the aux gradient is included (checked by the parity tests).
  Aux losses and token counts are recorded into the rank's MoEStepState (models/moe_state.py),
  which covers the MoE layers of all its stages; the trainer's bias update reduces the counts
  over data parallelism only, and `gather_load` collects every stage's rows for the logs.

Data parallelism
  ZeRO-1 works with every schedule. With FSDP2 each stage module is an FSDP root (blocks and
  experts nested units), so the schedule defers gradient reduce-scatter to the end of the step,
  and parameters stay unsharded between forward and backward (reshard_after_forward=False):
  the split-backward schedules find weights through the stage module and must see the
  unsharded parameters autograd used (with resharding, weight gradients were silently lost).
  V schedules with MTP put the first and last stage, which both use embed_tokens, on one rank,
  and one module cannot sit under two FSDP roots: there the last stage gets a private copy
  (not in the model, not checkpointed) whose gradient is added to the model's after the
  backward and whose weights are refreshed from the model's before each step (refused with
  tp > 1, where the copy would need its own tensor-parallel plan). A pp-only layout (one
  data-parallel rank, no tp) has nothing to shard and skips FSDP.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from models.moe_state import ExpertLoad, merge_expert_loads
from models.transformer import ModelOutput, combine_losses, embed, losses, run_layers
from parallel import comm_ledger
from parallel.layout import (
    check_microbatches,
    fsdp_applies,
    schedule_class,
    schedule_name,
    schedule_style,
    split_layers,
    stage_to_rank,
    stages_per_rank,
)

# ------------------------------------------------------------------------------------------ stage modules
class StageModule(nn.Module):
    """One pipeline stage over modules of the (pruned) Transformer, which it references, not copies.

    forward(x, tokens=, labels=, doc_ids=): x is input ids on the first stage, the hidden
    state [B, S, H] elsewhere. Non-last stages return the hidden state; the last returns
    [CE sum, MTP CE sum per depth] (fp32). The stage holds the modules of its role under the
    model's names, so it composes the model's forward parts (models.transformer.ModelParts).
    """

    def __init__(self, model: nn.Module, index: int, n_stages: int, layer_ids: list[int], act_dtype: torch.dtype,
                 own_embedding: bool = False):
        super().__init__()
        self.index, self.n_stages, self.act_dtype = index, n_stages, act_dtype
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.rope = model.rope
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        if self.is_first:
            self.embed_tokens = model.embed_tokens
        if self.is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            if len(model.mtp) and not self.is_first:
                # own_embedding: a private copy (see Pipeline.embed_copy) instead of the model's module
                self.embed_tokens = copy.deepcopy(model.embed_tokens) if own_embedding else model.embed_tokens

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        rope = self.rope(tokens.shape[1])
        h = run_layers(self, embed(self, x) if self.is_first else x, rope, doc_ids, None)
        if not self.is_last:
            return h.to(self.act_dtype)
        sums = losses(self, h, tokens, labels, rope, doc_ids, None).loss_sums()
        return sums


def prune_model(model: nn.Module, keep_layers: set[int], first: bool, last: bool) -> None:
    """Delete what this rank's stages do not own; names of what stays are unchanged."""
    for key in list(model.layers.keys()):
        if int(key) not in keep_layers:
            del model.layers[key]
    needs_embed = first or (last and (len(model.mtp) > 0 or model.cfg.tie_word_embeddings))
    if not needs_embed:
        model.embed_tokens = None
    if not last:
        model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleList()


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass
class Pipeline:
    """This rank's stages of the model, its schedule, and the per-step glue the trainer calls."""

    model: nn.Module
    ctx: Any
    name: str
    style: str
    n_stages: int
    stage_ids: list[int]
    layer_split: list[list[int]]
    modules: list[StageModule]
    parallel: Any = None  # the ParallelConfig
    tie_group: Any = None  # {first, last} stage ranks sharing embed_tokens, when on different ranks
    # V schedules under FSDP2: the last stage's private copy of embed_tokens (same rank as the first stage,
    # but one module cannot sit under two FSDP roots). Its gradient is added to the model's after each
    # step's backward, and its weights are refreshed from the model's before each step.
    embed_copy: Optional[nn.Module] = None
    n_micro: int = 0
    schedule: Any = None
    stages: list[Any] = field(default_factory=list)
    # Per step, set by run():
    _norm: tuple = ()
    _sums: Optional[torch.Tensor] = None

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    # -------------------------------------------------------------------- building
    def build_schedule(self, n_micro: int, micro_batch: int, seq_len: int, hidden: int, mtp_depth: int) -> None:
        from torch.distributed.pipelining import PipelineStage

        check_microbatches(self.parallel, n_micro)
        device = self.ctx.device
        pp_group = self.ctx.pp_group
        self.stages = []
        for module in self.modules:
            act = module.act_dtype
            inp = (torch.empty(micro_batch, seq_len, dtype=torch.long, device=device) if module.is_first
                   else torch.empty(micro_batch, seq_len, hidden, dtype=act, device=device).requires_grad_())
            out = (torch.empty(1 + mtp_depth, dtype=torch.float32, device=device) if module.is_last
                   else torch.empty(micro_batch, seq_len, hidden, dtype=act, device=device).requires_grad_())
            stage = PipelineStage(module, module.index, self.n_stages, device,
                                  input_args=(inp,), output_args=(out,), group=pp_group)
            comm_ledger.count_stage_p2p(stage, "pp")  # activations forward, their gradients backward
            self.stages.append(stage)
        cls = schedule_class(self.name)
        target = self.stages[0] if self.style == "single" else self.stages
        self.schedule = cls(target, n_microbatches=n_micro, loss_fn=self._loss_fn, scale_grads=False)
        self.n_micro = n_micro

    # -------------------------------------------------------------------- one step
    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lm_tokens, mtp_tokens, mtp_weight = self._norm
        loss = combine_losses(ModelOutput.from_loss_sums(output), lm_tokens, mtp_tokens, mtp_weight)
        row = torch.cat([loss.detach().double().reshape(1), output.detach().double()])
        self._sums[: row.numel()] += row.to(self._sums.device)
        return loss

    def run(self, batches: list[dict[str, torch.Tensor]], lm_tokens: torch.Tensor, mtp_tokens: torch.Tensor,
            mtp_weight: float, autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Forward + backward of the step's micro-batches through the schedule.

        Returns [objective, CE sum, MTP CE sums] summed over micro-batches on the rank of the
        last stage, zeros on the others (not yet summed over any group). Gradients of the tied
        embedding copies are summed.
        """
        device = self.ctx.device
        self._norm = (lm_tokens.to(device), mtp_tokens.to(device), mtp_weight)
        self._sums = torch.zeros(2 + len(mtp_tokens), dtype=torch.float64)
        ids, kwargs = self._schedule_inputs(batches)
        self.refresh_embed_copy()
        with autocast():
            self.schedule.step(ids, target=kwargs["labels"], return_outputs=False, **kwargs)
        self.sum_tied_gradients()
        return self._sums if self.has_last else torch.zeros_like(self._sums)

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]], mtp_depth: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Forward only: each micro-batch through the stages in order, activations sent point-to-point
        between pipeline ranks (the schedule is not used: torch's forward-only eval() cannot run the V
        schedules). Returns [CE sum, MTP CE sums] over the micro-batches on the last stage's rank, zeros
        elsewhere."""
        me, group = self.ctx.pp_rank, self.ctx.pp_group
        owner = [stage_to_rank(s, self.parallel.pp, self.style) for s in range(self.n_stages)]
        stage = dict(zip(self.stage_ids, self.modules))
        sums = torch.zeros(1 + mtp_depth, dtype=torch.float64)
        self.refresh_embed_copy()
        for b in batches:
            ids, kwargs = self._schedule_inputs([b])
            h = ids
            with autocast():
                for s in range(self.n_stages):
                    prev = owner[s - 1] if s else None  # the rank that ran the stage before
                    if owner[s] != me:
                        if prev == me:
                            comm_ledger.send(h.contiguous(), dist.get_global_rank(group, owner[s]), "pp", group)
                        continue
                    if prev not in (None, me):
                        h = torch.empty(*ids.shape, self.model.cfg.hidden_size, dtype=stage[s].act_dtype,
                                        device=ids.device)
                        comm_ledger.recv(h, dist.get_global_rank(group, prev), "pp", group)
                    h = stage[s](h, **kwargs)
            if self.has_last:
                sums += h.double().cpu()
        return sums

    def _schedule_inputs(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batches as one batch (the schedule chunks it): input ids, and tokens / labels / doc_ids
        for every stage."""
        cat = {k: torch.cat([b[k] for b in batches]).to(self.ctx.device) for k in batches[0]}
        kwargs = {"tokens": cat["input_ids"], "labels": cat["labels"]}
        if "doc_ids" in cat:
            kwargs["doc_ids"] = cat["doc_ids"]
        return cat["input_ids"], kwargs

    def pp_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.ctx.device).clone()
        comm_ledger.all_reduce(out, "pp", self.ctx.pp_group)
        return out.cpu()

    def tied_embedding(self) -> Optional[nn.Parameter]:
        emb = self.model.embed_tokens
        return emb.weight if (emb is not None and self.tie_group is not None) else None

    @torch.no_grad()
    def refresh_embed_copy(self) -> None:
        if self.embed_copy is not None:
            _local(self.embed_copy.weight).copy_(_local(self.model.embed_tokens.weight))

    @torch.no_grad()
    def sum_tied_gradients(self) -> None:
        if self.embed_copy is not None:
            main, extra = self.model.embed_tokens.weight, self.embed_copy.weight
            if extra.grad is not None:
                if main.grad is None:
                    main.grad = extra.grad
                else:
                    _local(main.grad).add_(_local(extra.grad))
                extra.grad = None
        w = self.tied_embedding()
        if w is None:
            return
        g = w.grad
        if g is None:
            g = w.grad = torch.zeros_like(w)
        local = g.to_local() if hasattr(g, "to_local") else g
        comm_ledger.all_reduce(local, "pp_tie", self.tie_group)

    def adjust_grad_replicas(self, replicas: list[tuple[nn.Parameter, int]]) -> list[tuple[nn.Parameter, int]]:
        """The tied embedding copies hold the same gradient after the sum: count the pair once."""
        w = self.tied_embedding()
        return [(p, r * 2 if p is w else r) for p, r in replicas]

    def gather_load(self, load: Optional[ExpertLoad]) -> Optional[ExpertLoad]:
        """The expert load of every pipeline stage's MoE layers, on every rank, rows in model order."""
        pieces: list[Any] = [None] * self.ctx.pp_size
        comm_ledger.all_gather_object(pieces, load_payload(load), "pp", self.ctx.pp_group)
        return merge_expert_loads([p for p in pieces if p is not None])


def load_payload(load: Optional[ExpertLoad]) -> Optional[ExpertLoad]:
    """What `Pipeline.gather_load` sends: the load on the CPU in tensors of their own (a view would pickle
    its whole base storage), so its pickled size depends only on the layer ids and the shapes."""
    if load is None:
        return None

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu().clone(memory_format=torch.contiguous_format)

    biases = None if load.biases is None else own(load.biases)
    return ExpertLoad(list(load.layer_ids), own(load.counts), biases, float(load.dropped_tokens))


def build_pipeline(model: nn.Module, parallel, ctx, mp_policy: Any = None) -> Pipeline:
    """Prune `model` to this rank's stages and wrap them (before EP / FSDP are applied).

    Activations cross stages in the residual stream's dtype: FSDP2's bf16 param dtype when
    FSDP wraps the stages with that policy, else fp32 (autocast keeps the residual in fp32)."""
    act_dtype = (getattr(mp_policy, "param_dtype", None) if fsdp_applies(parallel) else None) or torch.float32
    name, style = schedule_name(parallel), schedule_style(parallel)
    n_stages = parallel.pp * stages_per_rank(parallel)
    split = split_layers(parallel, model.cfg)
    stage_ids = [s for s in range(n_stages) if stage_to_rank(s, parallel.pp, style) == ctx.pp_rank]
    keep = {i for s in stage_ids for i in split[s]}
    prune_model(model, keep, first=0 in stage_ids, last=n_stages - 1 in stage_ids)
    # V placement: first and last stage on rank 0; under FSDP2 the last stage gets a private embedding copy.
    own = style == "v" and fsdp_applies(parallel) and parallel.tp == 1
    modules = [StageModule(model, s, n_stages, split[s], act_dtype, own_embedding=own) for s in stage_ids]
    pipe = Pipeline(model, ctx, name, style, n_stages, stage_ids, split, modules, parallel=parallel)
    last = modules[-1]
    if own and last.is_last and not last.is_first and hasattr(last, "embed_tokens"):
        pipe.embed_copy = last.embed_tokens
    last_rank = stage_to_rank(n_stages - 1, parallel.pp, style)
    needs_tie = last_rank != 0 and (model.cfg.num_nextn_predict_layers > 0 or model.cfg.tie_word_embeddings)
    if needs_tie:
        pipe.tie_group = _tie_group(ctx, last_rank)
    return pipe


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _tie_group(ctx, last_rank: int):
    """Process group of {pp rank 0, pp rank `last_rank`} at this rank's other mesh coordinates.

    Every rank creates every such group (new_group is collective), in the same order.
    """
    mesh = ctx.mesh.mesh  # [pp, dp_replicate, edp, ep, tp] global ranks
    flat = mesh.reshape(mesh.shape[0], -1)
    mine = None
    for j in range(flat.shape[1]):
        ranks = sorted({int(flat[0, j]), int(flat[last_rank, j])})
        group = dist.new_group(ranks)
        if ctx.rank in ranks:
            mine = group
    return mine
