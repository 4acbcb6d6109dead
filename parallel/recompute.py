"""Activation recomputation (`train.recompute`), applied to the plain model from outside.

Modes (train.recompute):
  none       autograd keeps what every op saves (today's behaviour).
  selective  only the modules listed in train.recompute_modules are recomputed, each as below.
  full       every transformer block (train.recompute_num_layers = 0), or the blocks whose model position
             i (decoder layer index, then L + k for MTP depth k + 1) has i % N == 0 (N = recompute_num_layers),
             is recomputed in backward from its input, except the MoE token dispatch and combine (below).

Selective modules (train.recompute_modules), what is kept and what recomputed:
  layernorm       every RMSNorm (block input and post-attention norms, the MLA latent norms q_a_layernorm and
                  kv_a_layernorm, MTP enorm / hnorm / norm, the final norm). Kept: the norm's input. Dropped:
                  its output and its internals; whatever later saves the output (the next projection's input)
                  gets it recomputed from the kept input in backward (DeepSeek-V3 report §3.2.3).
  mla_up_proj     the MLA up-projections q_b_proj (q_proj when q_lora_rank is null) and kv_b_proj and the RoPE
                  application: their outputs q, k, v (the attention core's inputs) are dropped and recomputed
                  from the latents (the normed q / kv latents and the raw RoPE key), which stay kept (§3.2.3);
                  so is v's copy padded to d_qk for the kernel (MultiHeadLatentAttention.padded_v).
  moe_act         the routed experts' SwiGLU: its input (the gate|up projection output, [rows, 2I]) is kept,
                  its output ([rows, I], the down projection's input) dropped and recomputed (§3.3). Under
                  fp8 the input is kept in FP8 (1x128 tiles) by the expert GEMM hook itself
                  (models/fp8.py's down_of_swiglu, which needs no collective): neither the bf16 input nor
                  the FP8 output stays.
  core_attn       the attention core softmax(q k^T) v: kept q, k, v; dropped everything the kernel saves
                  beyond them (output, log-sum-exp, CPU's padded v, the eager path's probabilities).
                  With mla_up_proj too, the region starts at the latents: kept are the latents only.
  mlp             the dense SwiGLU MLP (first_k_dense_replace layers): kept its input, dropped its internals.
  shared_experts  the MoE shared experts' SwiGLU: kept its input, dropped its internals.

How: `apply_recompute` swaps the class of the chosen module instances for a subclass whose method runs
as one of two kinds of region (the model stays plain modules; parameters, names and keys are unchanged):
  region       torch.utils.checkpoint (non-reentrant) around the method: the tensors its ops save are
               recomputed in backward from the method's inputs. Non-reentrant checkpointing is what the
               pipeline's split backward needs (input and weight gradients in two autograd.grad calls).
  drop output  the method runs normally, and its outputs are registered; while `Recompute.context()` is
               active (the trainer's forward), a saved-tensor hook recognises any later save of those outputs
               (or of a view of them: same storage, unchanged version) and keeps a recipe instead, which
               recomputes them in backward from the method's inputs (under the forward's autocast state).
A region's or a recipe's inputs go through the same hook, so an input that is itself a dropped output stays
dropped (e.g. the latents' norms under layernorm + mla_up_proj). Saves that the hook does not recognise
are kept as they are: a consumer that saves its own copy keeps that copy. Per precision, that means:
  fp32  everything above is dropped as stated.
  bf16  a Linear under autocast saves its own bf16 copy of its input: layernorm then drops the norm's
        fp32 internals but not the bf16 copy of its output that the next projection keeps.
  fp8   an FP8 Linear / expert GEMM saves its FP8-quantised input: layernorm as under bf16; moe_act keeps
        only an FP8 copy of the SwiGLU input (report §3.3.3) and recomputes the output and its FP8
        quantisation for the down projection in backward.
  any   CPU SDPA and flash-attn take v padded to d_qk when d_v < d_qk and save the padded copy: mla_up_proj
        and core_attn both drop it (re-padded in backward).
Measured on tests/test_recompute.py's small model (bytes kept for backward, relative to none):
  fp32  layernorm 0.85, mla_up_proj 0.93, moe_act 0.99, core_attn 0.98, mlp 0.90, shared_experts 0.95,
        all six 0.51, full 0.24 (every 2nd block 0.50); bf16: all six 0.50, full 0.31; fp8: moe_act 0.98, all six 0.46
        (0.48 before moe_act kept the SwiGLU input in FP8), full 0.37.

Never a collective twice:
  - the MoE token dispatch and combine (the EP all-to-alls and their split exchange) run in MoE.forward,
    which no region and no recipe contains: full mode splits MoE blocks at the dispatcher (regions for the
    attention half, the experts' forward and the shared experts; the post-attention norm's output dropped);
  - FSDP2 all-gathers run in forward pre-hooks of its units (blocks, MTP modules, routed experts); regions
    wrap a unit's `forward` or lie inside one unit, never around a unit's hooks;
  - TP collectives are DTensor functional collectives, dispatcher ops: a region whose module holds DTensor
    parameters or gets DTensor inputs records their results in forward under a dispatch mode, and its
    recomputation returns them instead of running the collectives (torch's selective checkpointing would
    too, but it also demands the same sequence of every other op, which the FP8 weight cache breaks); the
    forward refuses an in-place c10d collective. Without DTensors a region holds no collective, by the two
    rules above, and skips the modes' per-op cost. Recipes run under a mode that raises on any collective.
tests/test_recompute.py counts the collectives of a step with and without recomputation.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import checkpoint

from models.attention import MultiHeadLatentAttention
from models.experts import GroupedExperts
from models.fp8 import Fp8GroupedGemm
from models.mlp import SwiGLU
from models.moe import MoE
from models.norm import RMSNorm
from models.transformer import Block

MODES = ("none", "selective", "full")
MODULES = ("layernorm", "mla_up_proj", "moe_act", "core_attn", "mlp", "shared_experts")
# DeepSeek-V3's choice (report §3.2.3 and §3.3): every RMSNorm, the MLA up-projections, the SwiGLU output.
DEEPSEEK_V3_MODULES = ("layernorm", "mla_up_proj", "moe_act")


def check_recompute(mode: str, modules: Sequence[str], num_layers: int) -> None:
    """Raise ValueError naming the train.recompute* key and the fix."""
    if mode not in MODES:
        raise ValueError(f"train.recompute: must be {'|'.join(MODES)}, got {mode!r}")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise ValueError(f"train.recompute_modules: unknown module {unknown[0]!r}; choose from {', '.join(MODULES)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"train.recompute_modules: lists a module twice: {list(modules)}")
    if mode == "selective" and not modules:
        raise ValueError("train.recompute_modules: train.recompute=selective needs at least one module "
                         f"(e.g. [{', '.join(DEEPSEEK_V3_MODULES)}]) or train.recompute=none")
    if num_layers < 0:
        raise ValueError(f"train.recompute_num_layers: must be >= 0 (0 = every block), got {num_layers}")
    if num_layers > 0 and mode != "full":
        raise ValueError(f"train.recompute_num_layers: applies to train.recompute=full only (got recompute={mode!r}); "
                         "set it to 0 or train.recompute=full")


# ------------------------------------------------------------------------------------------ collectives
FUNCTIONAL_COLLECTIVES = ("_c10d_functional", "c10d_functional")  # DTensor's collectives: results can be reused
INPLACE_COLLECTIVES = ("c10d",)  # torch.distributed's in-place ops (all_to_all_single, all_reduce, ...)


def _is_collective(func: Any) -> bool:
    return getattr(func, "namespace", None) in FUNCTIONAL_COLLECTIVES + INPLACE_COLLECTIVES


class _RecordCollectives(TorchDispatchMode):
    """A region's forward: keeps the result of every functional collective, in order; refuses in-place ones."""

    def __init__(self, results: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.results = results

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = getattr(func, "namespace", None)
        if ns in INPLACE_COLLECTIVES:
            raise RuntimeError(f"recompute: in-place collective {func} inside a recompute region; it would run "
                               "again in backward (keep it outside the region, as the MoE dispatcher is)")
        out = func(*args, **(kwargs or {}))
        if ns in FUNCTIONAL_COLLECTIVES:
            self.results.append((func, out))
            if _OBSERVERS:  # kept until backward like a saved tensor: an observer counts it as one
                _OBSERVERS[-1][0](out)
        return out


class _ReplayCollectives(TorchDispatchMode):
    """A region's recomputation: each functional collective returns the forward's result instead of running.
    Other ops run as they come (a cache such as the FP8 weight copies may make them differ from forward)."""

    def __init__(self, results: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.results = results
        self.next = 0

    def __enter__(self):
        self.next = 0  # every recomputation (split backward recomputes once per autograd.grad) replays from the start
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) not in FUNCTIONAL_COLLECTIVES:
            return func(*args, **(kwargs or {}))
        if self.next >= len(self.results) or self.results[self.next][0] is not func:
            raise RuntimeError(f"recompute: collective {func} in a recomputation differs from the forward's")
        self.next += 1
        return self.results[self.next - 1][1]


def _collectives_saved() -> tuple[TorchDispatchMode, TorchDispatchMode]:
    """checkpoint's context_fn: record the collectives' results in forward, reuse them in recomputation."""
    results: list[tuple[Any, Any]] = []
    return _RecordCollectives(results), _ReplayCollectives(results)


class _NoCollectives(TorchDispatchMode):
    """Raises if a recipe's recomputation would run a collective."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_collective(func):
            raise RuntimeError(f"recompute: collective {func} in a dropped output's recomputation")
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------ dropped outputs
@dataclass
class _Recipe:
    """How to recompute the outputs of one call: method(module, *inputs) under the forward's autocast."""

    method: Callable[..., Any]
    module: nn.Module
    inputs: Any  # (args, kwargs) with tensors packed by _pack
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    layouts: list[tuple[tuple[int, ...], int]]  # (stride, storage offset) of each registered output
    values: Optional[list[torch.Tensor]] = None

    def outputs(self) -> list[torch.Tensor]:
        if self.values is None:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                for device_type, enabled, dtype in self.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
                stack.enter_context(_NoCollectives())
                args, kwargs = _unpack_tree(self.inputs)
                self.values = [t for t in _flat_tensors(self.method(self.module, *args, **kwargs))]
            for value, (stride, _) in zip(self.values, self.layouts):
                if value.stride() != stride:
                    raise RuntimeError("recompute: a recomputed output has another memory layout than in forward")
        return self.values


@dataclass
class _Dropped:
    """What autograd holds instead of a saved tensor that a recipe recomputes (a view of output `index`)."""

    recipe: _Recipe
    index: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the output's
    requires_grad: bool

    def unpack(self) -> torch.Tensor:
        with _disable_current_modes():  # e.g. an enclosing region's recomputation mode
            base = self.recipe.outputs()[self.index]
            t = base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)
            return t.detach().requires_grad_(self.requires_grad)


_DROPPED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()  # storage -> output
_RECIPE_ATTR = "_moeforge_recipe"


def _storage_key(t: torch.Tensor) -> Optional[tuple]:
    if type(t) is not torch.Tensor or t.numel() == 0:  # parameters, DTensors, empty tensors: never dropped
        return None
    return (t.device, t.untyped_storage().data_ptr())


# Saved-tensor hooks of an observer (e.g. a measurement of the saved bytes) that kept tensors go through.
_OBSERVERS: list[tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]] = []


def _pack(t: Any) -> Any:
    """A saved tensor: a _Dropped recipe view when it shares storage with a registered output, else kept."""
    key = _storage_key(t) if isinstance(t, torch.Tensor) else None
    out = _DROPPED.get(key) if key is not None else None
    if out is not None:
        recipe, index, version = getattr(out, _RECIPE_ATTR)
        if t._version == version and t.dtype == out.dtype:  # else changed in place since, or reinterpreted
            return _Dropped(recipe, index, tuple(t.size()), tuple(t.stride()),
                            t.storage_offset() - out.storage_offset(), t.requires_grad)
    return _OBSERVERS[-1][0](t) if _OBSERVERS and isinstance(t, torch.Tensor) else t


def _unpack(x: Any) -> Any:
    if isinstance(x, _Dropped):
        return x.unpack()
    return _OBSERVERS[-1][1](x) if _OBSERVERS and not isinstance(x, torch.Tensor) else x


def _pack_tree(tree: Any) -> Any:
    return tree_map(lambda x: _pack(x) if isinstance(x, torch.Tensor) else x, tree)


def _unpack_tree(tree: Any) -> Any:
    return tree_map(_unpack, tree, is_leaf=lambda x: isinstance(x, _Dropped))


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


def _register_outputs(out: Any, method: Callable[..., Any], module: nn.Module, args: tuple, kwargs: dict) -> None:
    outputs = _flat_tensors(out)
    recipe = _Recipe(method, module, _pack_tree((args, kwargs)), _autocast_state(),
                     [(tuple(o.stride()), o.storage_offset()) for o in outputs])
    for index, o in enumerate(outputs):
        key = _storage_key(o)
        if key is not None and key not in _DROPPED:  # outputs sharing a storage: the first one stands for all
            setattr(o, _RECIPE_ATTR, (recipe, index, o._version))
            _DROPPED[key] = o


# ------------------------------------------------------------------------------------------ the two kinds of region
def _holds_dtensors(module: nn.Module, inputs: Any) -> bool:
    return (any(isinstance(p, DTensor) for p in module.parameters())
            or any(isinstance(x, DTensor) for x in tree_leaves(inputs)))


def _checkpointed(method: Callable[..., Any]) -> Callable[..., Any]:
    """method as a non-reentrant checkpoint region whose inputs are held through _pack."""

    @functools.wraps(method)
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return method(self, *args, **kwargs)
        packed = _pack_tree((args, kwargs))
        live: list[Any] = [(args, kwargs)]

        def body() -> Any:
            if live[0] is not None:  # the forward
                a, k = live[0]
            else:  # recomputation in backward: dropped inputs come back from their recipes
                a, k = _unpack_tree(packed)
            return method(self, *a, **k)

        if _holds_dtensors(self, (args, kwargs)):  # tensor parallel: collectives inside, saved by the policy
            out = checkpoint(body, use_reentrant=False, context_fn=_collectives_saved)
        else:
            out = checkpoint(body, use_reentrant=False)
        live[0] = None
        return out

    return run


def _dropping_output(method: Callable[..., Any], internals_recomputed: bool) -> Callable[..., Any]:
    """method whose outputs are dropped after forward and recomputed where they are needed."""
    inner = _checkpointed(method) if internals_recomputed else method

    @functools.wraps(method)
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = inner(self, *args, **kwargs)
        if torch.is_grad_enabled():
            _register_outputs(out, method, self, args, kwargs)
        return out

    return run


REGION, DROP_OUTPUT, DROP_OUTPUT_AND_INTERNALS = "region", "drop_output", "drop_output_and_internals"
_CLASSES: dict[tuple, type] = {}


def _recomputed_class(cls: type, methods: dict[str, str]) -> type:
    key = (cls, tuple(sorted(methods.items())))
    if key not in _CLASSES:
        body = {}
        for name, kind in methods.items():
            method = getattr(cls, name)
            body[name] = _checkpointed(method) if kind == REGION else _dropping_output(
                method, internals_recomputed=kind == DROP_OUTPUT_AND_INTERNALS)
        new = type(f"Recomputed{cls.__name__}", (cls,), {"__module__": __name__, **body})
        _CLASSES[key] = new
    return _CLASSES[key]


def _wrap(module: Optional[nn.Module], **methods: str) -> None:
    if module is not None:
        module.__class__ = _recomputed_class(type(module), methods)


# ------------------------------------------------------------------------------------------ applying a mode
@dataclass
class Recompute:
    """What apply_recompute did; `context()` must surround the forward passes (the saved-tensor hook)."""

    mode: str
    modules: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()  # model positions of the blocks recomputed in full mode

    @contextlib.contextmanager
    def context(self, pack: Optional[Callable[[torch.Tensor], Any]] = None,
                unpack: Optional[Callable[[Any], torch.Tensor]] = None):
        """The saved-tensor hook for the forward passes inside. `pack` / `unpack`: an observer's own
        saved-tensor hooks, which every kept tensor goes through (region inputs included), so that what
        they see is what autograd keeps under this mode."""
        if pack is not None:
            _OBSERVERS.append((pack, unpack or (lambda x: x)))
        try:
            if self.mode == "none" and pack is None:
                yield
            else:
                with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                    yield
        finally:
            if pack is not None:
                _OBSERVERS.pop()


def _blocks(model: nn.Module) -> list[tuple[int, Block]]:
    """(model position, block): decoder layers, then MTP depth k + 1 at L + k."""
    n_layers = model.cfg.num_hidden_layers
    found = [(int(i), b) for i, b in model.layers.items()]
    found += [(n_layers + k, m.block) for k, m in enumerate(model.mtp)]
    return found


def apply_recompute(model: nn.Module, mode: str = "none", modules: Sequence[str] = (), num_layers: int = 0) -> Recompute:
    """Make the modules of `mode` recompute in backward (see the module docstring). Call before the
    pipeline split and the parallel layout; the layout's wrappers stay outside these regions."""
    check_recompute(mode, modules, num_layers)
    if mode == "none":
        return Recompute(mode)
    if mode == "full":
        chosen = [(i, b) for i, b in _blocks(model) if num_layers == 0 or i % num_layers == 0]
        for _, block in chosen:
            _apply_full(block)
        return Recompute(mode, blocks=tuple(i for i, _ in chosen))
    chosen_modules = set(modules)
    for m in model.modules():
        if isinstance(m, RMSNorm) and "layernorm" in chosen_modules:
            _wrap(m, forward=DROP_OUTPUT_AND_INTERNALS)
        elif isinstance(m, MultiHeadLatentAttention):
            if {"mla_up_proj", "core_attn"} <= chosen_modules:
                _wrap(m, attend=REGION)
            elif "mla_up_proj" in chosen_modules:  # and the kernel's padded copy of v, a pure function of v
                _wrap(m, up_project=DROP_OUTPUT, padded_v=DROP_OUTPUT)
            elif "core_attn" in chosen_modules:
                _wrap(m, core=REGION)
        elif isinstance(m, GroupedExperts) and "moe_act" in chosen_modules:
            # FP8 (precision is applied first): the SwiGLU input cached in FP8. Subclasses with their own
            # activation (gpt-oss's clamped SwiGLU) keep the generic drop of the activation's output.
            if isinstance(m.gemm, Fp8GroupedGemm) and type(m) is GroupedExperts:
                m.gemm.swiglu_recomputed = True
            else:
                _wrap(m, activation=DROP_OUTPUT)
        elif isinstance(m, Block) and isinstance(m.mlp, SwiGLU) and "mlp" in chosen_modules:
            _wrap(m.mlp, forward=REGION)
        elif isinstance(m, MoE) and "shared_experts" in chosen_modules:
            _wrap(m.shared_experts, forward=REGION)
    return Recompute(mode, modules=tuple(modules))


def _apply_full(block: Block) -> None:
    """The whole block from its input; an MoE block split at the dispatcher (see the module docstring)."""
    if not isinstance(block.mlp, MoE):
        _wrap(block, forward=REGION)
        return
    _wrap(block, attention_residual=REGION)
    _wrap(block.post_attention_layernorm, forward=DROP_OUTPUT_AND_INTERNALS)
    _wrap(block.mlp.experts, forward=REGION)
    _wrap(block.mlp.shared_experts, forward=REGION)
