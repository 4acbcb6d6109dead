"""Measure the bytes autograd saves for backward: each storage once, per micro-batch and per layer kind.

`SavedTensorProbe` installs torch.autograd.graph.saved_tensors_hooks and forward hooks on the model's
parts. Every tensor autograd saves is attributed to the part running when it was saved (the kind of the
last part entered; after the final norm or an MTP module exits, "head": the shared output head's fused
CE runs outside any module) and to the micro-batch in which its storage was first seen.
A storage (untyped_storage data_ptr) is counted once, with its whole nbytes, however many tensors or
views of it are saved -- the memory a storage holds is what the planner (train/plan.py) predicts.

What is not an activation is counted apart, as the planner does:
  parameters  storages of the model's parameters and buffers (the planner's weights term);
  weight copies  tensors derived from a parameter by casts and views (bf16 autocast copies: their
              autograd history leads straight back to a leaf parameter) and the FP8 quantised weights
              of models.fp8.QuantisedWeights (the planner's compute-copies term).
The probe keeps a reference to every storage it counted, so a freed address cannot be reused and
mistaken for one already seen while it runs. Under activation recomputation the probe observes through
parallel.recompute's saved-tensor hook (`Recompute.context(pack)`), so it counts what that mode keeps,
including the TP collectives' results a recompute region records to replay them.
On a tensor-parallel rank (`measure_saved_bytes(..., ctx=...)`, the layout applied by parallel.parallelize as
the trainer does) a saved DTensor counts its local shard's storage; the probe itself issues no collective.
For tests and bench/memory.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from models.fp8 import quantised_weight_stores
from models.moe import MoE
from models.transformer import Transformer
from parallel.context import ParallelContext
from parallel.parallelize import parallelize
from parallel.recompute import Recompute, apply_recompute
from train.precision import policy_from_config

KINDS = ("embedding", "attention", "dense_mlp", "moe", "head", "mtp")


def part_kinds(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Module name -> (layer kind while it runs, kind after it exits) for the parts of a Transformer (or a
    pipeline stage holding its parts). The output head is not hooked -- a hook would turn off its fused
    CE path (models.head_loss.fused_head_applies) -- so the final norms hand over to "head" on exit."""
    kinds: dict[str, tuple[str, str]] = {}
    for name, module in model.named_modules():
        top, _, rest = name.partition(".")
        if name == "embed_tokens":
            kinds[name] = ("embedding", "embedding")
        elif name == "norm":
            kinds[name] = ("head", "head")
        elif top == "mtp" and rest.isdigit():
            kinds[name] = ("mtp", "head")  # its output goes to the shared head's CE
        elif top == "layers" and rest.isdigit():
            ffn = "moe" if isinstance(module.mlp, MoE) else "dense_mlp"
            kinds[name] = ("attention", ffn)  # a block recomputed whole keeps its input: its attention part's
            for child, kind in (("input_layernorm", "attention"), ("self_attn", "attention"),
                                ("post_attention_layernorm", ffn), ("mlp", ffn)):
                kinds[f"{name}.{child}"] = (kind, kind)
    return kinds


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank holds: a DTensor's local shard, a functional collective's result
    (DTensor's redistributions return AsyncCollectiveTensor wrappers), else t itself."""
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.elem if isinstance(t, AsyncCollectiveTensor) else t


_CAST_AND_VIEW = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0",
                  "ExpandBackward0", "AliasBackward0", "UnsafeViewBackward0",
                  "_ToTorchTensorBackward"}  # DTensor.to_local: the local shard of a tp-sharded parameter


def _leads_to_leaf(t: torch.Tensor, depth: int = 4) -> bool:
    """Is t a cast / view of a leaf parameter (a chain of cast and view nodes back to AccumulateGrad)?"""
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None or type(fn).__name__ not in _CAST_AND_VIEW:
            return False
        parents = [f for f, _ in fn.next_functions if f is not None]
        if len(parents) != 1:
            return False
        fn = parents[0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
    return False


@dataclass
class SavedBytes:
    """What a probe counted. activations[m][kind]: bytes first saved in micro-batch m by parts of `kind`."""

    activations: list[dict[str, int]] = field(default_factory=list)
    parameters: int = 0
    weight_copies: int = 0
    fp8_weight_storages: int = 0  # distinct saved E4M3 storages shaped like a parameter (quantised weights)

    def per_micro_batch(self, m: int = 0) -> int:
        return sum(self.activations[m].values())

    def by_kind(self) -> dict[str, int]:
        """Activation bytes per kind, summed over micro-batches."""
        out = {k: 0 for k in KINDS}
        for mb in self.activations:
            for k, v in mb.items():
                out[k] += v
        return out

    @property
    def total_activations(self) -> int:
        return sum(self.by_kind().values())


class SavedTensorProbe:
    """Context manager counting saved-for-backward bytes of `model`'s forward passes (see the module doc).

    with SavedTensorProbe(model) as probe:
        loss0 = forward(batch0)          # micro-batch 0
        probe.next_micro_batch()
        loss1 = forward(batch1)          # micro-batch 1
    probe.result()                       # SavedBytes
    """

    def __init__(self, model: nn.Module, recompute: Optional[Recompute] = None) -> None:
        """recompute: what parallel.recompute.apply_recompute did to `model`; the probe then counts what its
        saved-tensor hook keeps (it sees every kept tensor, not the dropped ones)."""
        self.model = model
        self.recompute = recompute
        self._kinds = part_kinds(model)
        self._stack: list[str] = []
        self._current = "embedding"
        self._param_ptrs = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._param_shapes = {tuple(_local(p).shape) for p in model.parameters()}
        self._seen: dict[int, tuple[int, str, int, bool, torch.UntypedStorage, bool]] = {}
        self._micro_batch = 0
        self._handles: list[Any] = []
        self._hooks: Optional[contextlib.AbstractContextManager] = None

    # -------------------------------------------------------------- hooks
    def _enter(self, kind: str):
        def pre(module: nn.Module, args: Any) -> None:
            self._stack.append(kind)
            self._current = kind

        return pre

    def _exit(self, after: str):
        def post(module: nn.Module, args: Any, output: Any) -> None:
            self._stack.pop()
            self._current = self._stack[-1] if self._stack else after

        return post

    def _pack(self, saved: torch.Tensor) -> torch.Tensor:
        t = _local(saved)
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in self._seen:
            fp8_weight = t.dtype == torch.float8_e4m3fn and tuple(t.shape) in self._param_shapes
            self._seen[ptr] = (storage.nbytes(), self._current, self._micro_batch, _leads_to_leaf(saved), storage,
                               fp8_weight)
        return saved

    def __enter__(self) -> "SavedTensorProbe":
        for name, module in self.model.named_modules():
            if name in self._kinds:
                kind, after = self._kinds[name]
                # first among the pre-hooks: what a layout's pre-hook does (SP's all-gather) belongs to this part
                self._handles.append(module.register_forward_pre_hook(self._enter(kind), prepend=True))
                self._handles.append(module.register_forward_hook(self._exit(after)))
        if self.recompute is not None:
            self._hooks = self.recompute.context(self._pack, lambda t: t)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def next_micro_batch(self) -> None:
        self._micro_batch += 1
        self._current = "embedding"

    # -------------------------------------------------------------- result
    def result(self) -> SavedBytes:
        """The counts so far (call while the quantised weights of the step are still held)."""
        fp8_ptrs = {t.untyped_storage().data_ptr() for s in quantised_weight_stores(self.model) for t in s.tensors()}
        out = SavedBytes(activations=[{k: 0 for k in KINDS} for _ in range(self._micro_batch + 1)])
        for ptr, (nbytes, kind, mb, from_leaf, _, fp8_weight) in self._seen.items():
            out.fp8_weight_storages += fp8_weight
            if ptr in self._param_ptrs:
                out.parameters += nbytes
            elif from_leaf or ptr in fp8_ptrs:
                out.weight_copies += nbytes
            else:
                out.activations[mb][kind] += nbytes
        return out


def build_model(cfg: Any, seed: int = 0, ctx: Optional[ParallelContext] = None) -> tuple[Transformer, Any, Recompute]:
    """The model of a train.config.Config on CPU with its precision and train.recompute, as the trainer
    applies them, then `ctx`'s expert and tensor parallelism (parallel.parallelize): (model, precision policy,
    recompute)."""
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    t = cfg.train
    policy = policy_from_config(model, t)
    recompute = apply_recompute(model, t.recompute, t.recompute_modules, t.recompute_num_layers)
    if ctx is not None:  # the model-parallel layout (EP, TP/SP); no FSDP2 wrapping: its gathers are weights
        parallelize(model, ctx, "zero1")
    model.train()
    return model, policy, recompute


def random_batch(cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """[micro_batch_size, seq_len + 1] random token ids (inputs and shifted labels)."""
    return torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=gen)


def measure_saved_bytes(cfg: Any, micro_batches: int = 1, seed: int = 0, backward: bool = True,
                        ctx: Optional[ParallelContext] = None) -> SavedBytes:
    """Run `micro_batches` forwards of the config's model (build_model, on `ctx`'s layout: every rank feeds the
    same tokens) on random tokens under the probe (all graphs alive at once, as a pipeline holds micro-batches
    in flight), then their backwards. Returns this rank's probe counts."""
    model, policy, recompute = build_model(cfg, seed, ctx)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    vocab_parallel = ctx is not None and ctx.tp_size > 1  # the trainer's loss_context: CE over tp-sharded logits
    with loss_parallel() if vocab_parallel else contextlib.nullcontext():
        with SavedTensorProbe(model, recompute) as probe:
            for m in range(micro_batches):
                if m:
                    probe.next_micro_batch()
                ids = random_batch(cfg, gen)
                with policy.autocast(torch.device("cpu")):
                    out = model(ids[:, :-1], ids[:, 1:])
                losses.append(out.loss(1.0))
            result = probe.result()
        if backward:
            sum(losses).backward()
    return result
