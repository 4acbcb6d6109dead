"""Mixed-precision policy applied to a built model from outside: fp32 | bf16 | fp8.

fp32  everything fp32.
bf16  parameters stay fp32 (they are the master weights the optimizer updates); matmuls run in bf16
      under torch.autocast, which casts each weight to bf16 once per forward; gradients land on the
      fp32 parameters, so the gradient all-reduce/reduce-scatter is fp32. Kept fp32 on purpose: the
      MoE router (logits, sigmoid/softmax scores, top-k, gates and its e_score_correction_bias), the
      RMSNorms, softmax inside attention (SDPA accumulates in fp32) and the losses (cross-entropy on
      fp32 logits, aux losses on fp32 scores). torch.autocast on its own would run the router's
      F.linear in bf16, so routers (and norms, for safety) get an autocast-disabled subclass; and
      torch._grouped_mm has no autocast rule, so the routed experts get `AutocastGroupedGemm`, which
      casts rows and expert weights to bf16 as autocast does for F.linear.
      Under FSDP2 the same policy is `mixed_precision_policy()`: bf16 all-gathered parameters for
      compute, fp32 sharded masters and fp32 gradient reduce-scatter (param_dtype=bf16,
      reduce_dtype=fp32); autocast stays on so activations of fp32-kept modules are handled the same.
      The router weight is then gathered in bf16 but its scores are still computed in fp32;
      `fp32_param_modules()` lists the modules to shard with `mixed_precision_policy("fp32")` where
      an exact fp32 gate weight is wanted.
fp8   bf16 as above, plus the DeepSeek-V3 FP8 recipe (models/fp8.py) in the three GEMMs of every
      selected nn.Linear and of the routed experts' grouped GEMMs. Never converted, whatever the
      config says: the embedding, the MoE gate (Router), norms and the attention core (SDPA) -- they
      are not Linear layers; the output head (`lm_head`) is excluded by default
      (`train.fp8.exclude`), as in the report (§3.3.1).

AdamW moments can be kept in bf16 (`optim.bf16_moments`, see train/optim.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from models.experts import GroupedExperts, grouped_mm_applies, looped_linear
from models.fp8 import Fp8GroupedGemm, Fp8Linear, Fp8Recipe, describe_backend
from models.norm import RMSNorm
from models.router import Router
from models.topk_softmax_router import TopKSoftmaxRouter
from train.metrics import fastest_matmul_seconds

log = logging.getLogger("moeforge")

PRECISIONS = ("fp32", "bf16", "fp8")
# Module types whose forward must not be autocast: their math is fp32 by design.
FP32_MODULE_TYPES: tuple[type, ...] = (Router, TopKSoftmaxRouter, RMSNorm)


@dataclass
class PrecisionPolicy:
    name: str
    compute_dtype: torch.dtype
    recipe: Optional[Fp8Recipe] = None
    fp8_modules: list[str] = field(default_factory=list)  # names of converted modules

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.compute_dtype)

    def fsdp_policy(self) -> Any:
        return mixed_precision_policy(self.name)

    def describe(self, device: torch.device) -> str:
        if self.recipe is None:
            return self.name
        return f"fp8 ({len(self.fp8_modules)} modules; {describe_backend(self.recipe, torch.device(device))})"


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2 MixedPrecisionPolicy for a precision setting (None for fp32: FSDP's default, all fp32).

    bf16 and fp8: bf16 parameters for compute (all-gathered in bf16), fp32 gradient reduction, fp32
    sharded master weights (FSDP2 keeps the sharded parameters in their original fp32 dtype).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)


def fp32_param_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose parameters should stay fp32 in compute even under a bf16 FSDP policy (routers)."""
    return [m for m in model.modules() if isinstance(m, (Router, TopKSoftmaxRouter))]


class _Fp32Compute:
    """Mixin: run the module's forward with autocast disabled (inputs are used in their own dtype)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        for a in args:
            if isinstance(a, torch.Tensor):
                device_type = a.device.type
                break
        with torch.autocast(device_type, enabled=False):
            return super().forward(*args, **kwargs)  # type: ignore[misc]


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    if issubclass(cls, _Fp32Compute):
        return cls
    if cls not in _FP32_CLASSES:
        new = type(f"Fp32{cls.__name__}", (_Fp32Compute, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by reference
        _FP32_CLASSES[cls] = new
    return _FP32_CLASSES[cls]


def keep_fp32(model: nn.Module) -> int:
    """Make routers and norms immune to autocast (class swap; parameters and keys unchanged)."""
    n = 0
    for m in model.modules():
        if isinstance(m, FP32_MODULE_TYPES) and not isinstance(m, _Fp32Compute):
            m.__class__ = _fp32_class(type(m))
            n += 1
    return n


class AutocastGroupedGemm:
    """GroupedExperts GEMM hook for bf16: torch._grouped_mm has no autocast rule (it would get bf16 rows
    and fp32 weights), so cast rows and weights to the autocast dtype as F.linear's rule does.
    Where torch._grouped_mm does not apply (`grouped_mm_applies`), a per-expert loop of matmuls."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x, weight = x.to(dtype), weight.to(dtype)
        if not grouped_mm_applies(x, weight.shape[-1], weight.shape[-2]):  # rows in and out (the gradient's)
            return looped_linear(x, weight, counts.tolist())
        # The raw output (not a view): FSDP2 hooks need non-view module outputs. The consumers (chunk,
        # gating in combine) always send dense gradients, which torch._grouped_mm's backward needs.
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)

    def __repr__(self) -> str:
        return "AutocastGroupedGemm()"


def fp8_selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Does module `name` match an include glob (train.fp8.modules) and no exclude glob (train.fp8.exclude)?"""
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def convert_to_fp8(
    model: nn.Module, recipe: Fp8Recipe, include: Sequence[str] = ("*",), exclude: Sequence[str] = ("lm_head",)
) -> list[str]:
    """Swap selected nn.Linear layers for Fp8Linear and hook the FP8 grouped GEMM into selected
    GroupedExperts. Patterns are fnmatch globs over module names (e.g. "layers.*.self_attn.*",
    "*.experts"). Returns the converted names. Only Linear and GroupedExperts modules can convert."""
    converted: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not fp8_selected(name, include, exclude):
            continue
        if isinstance(module, GroupedExperts) and not isinstance(module.gemm, Fp8GroupedGemm):
            module.gemm = Fp8GroupedGemm(recipe)
            converted.append(name)
        elif isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Fp8Linear.from_linear(module, recipe))
            converted.append(name)
    return converted


def apply_precision(
    model: nn.Module,
    precision: str,
    fp8_include: Sequence[str] = ("*",),
    fp8_exclude: Sequence[str] = ("lm_head",),
    fp8_backend: str = "auto",
) -> PrecisionPolicy:
    """Apply `precision` to `model` in place (before FSDP/TP wrapping) and return the policy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return PrecisionPolicy("fp32", torch.float32)
    keep_fp32(model)
    for m in model.modules():
        if isinstance(m, GroupedExperts) and m.gemm is None:
            m.gemm = AutocastGroupedGemm()
    if precision == "bf16":
        return PrecisionPolicy("bf16", torch.bfloat16)
    recipe = Fp8Recipe(backend=fp8_backend)
    names = convert_to_fp8(model, recipe, fp8_include, fp8_exclude)
    if not names:
        raise ValueError(
            f"train.fp8.modules {list(fp8_include)} (minus train.fp8.exclude {list(fp8_exclude)}) matches no "
            "Linear or expert module; nothing would run in FP8"
        )
    policy = PrecisionPolicy("fp8", torch.bfloat16, recipe, names)
    log.info("precision %s", policy.describe(next(model.parameters()).device))
    return policy


def policy_from_config(model: nn.Module, train_cfg: Any) -> PrecisionPolicy:
    """apply_precision with the fields of train.config.TrainConfig (train.precision, train.fp8.*)."""
    fp8 = train_cfg.fp8
    return apply_precision(model, train_cfg.precision, fp8.modules, fp8.exclude, fp8.backend)


# ---------------------------------------------------------------- bf16 on CPUs without bf16 instructions
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 dot products (/proc/cpuinfo)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The CPU's feature flags (Linux x86 /proc/cpuinfo `flags` line); None where they cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def bf16_matmul_slowdown(n: int = 256, seconds: float = 0.1) -> float:
    """Fastest n x n bf16 matmul over the fastest fp32 one, each timed for ~`seconds` (at least twice)."""
    bf16 = fastest_matmul_seconds(n, torch.bfloat16, seconds, min_repeats=2)
    return bf16 / max(fastest_matmul_seconds(n, torch.float32, seconds, min_repeats=2), 1e-9)


def warn_if_slow_bf16(policy: PrecisionPolicy, device: torch.device, flags: Optional[set[str]] = None) -> Optional[str]:
    """Log (and return) one warning when bf16 compute runs on a CPU that has no bf16 instructions.

    Such CPUs emulate bf16 matmuls in software, many times slower than fp32 (27x end to end on an
    AVX2 machine). The slowdown is measured here with a small matmul so the user sees this machine's."""
    if policy.compute_dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or any(f in flags for f in BF16_CPU_FLAGS):
        return None  # native bf16, or a CPU whose flags we cannot read (not x86 Linux): no claim either way
    slowdown = bf16_matmul_slowdown()
    msg = (f"train.precision={policy.name} on a CPU without bf16 instructions (no {' or '.join(BF16_CPU_FLAGS)} "
           f"in /proc/cpuinfo): a bf16 matmul runs {slowdown:.{0 if slowdown >= 10 else 1}f}x slower than fp32 here, so "
           "training will be many times slower; use train.precision=fp32 on this machine")
    log.warning(msg)
    return msg
