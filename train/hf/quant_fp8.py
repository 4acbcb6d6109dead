"""The fine-grained FP8 checkpoint format of DeepSeek-V3's release, both ways (family-independent).

config.json carries

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

and each quantised Linear stores `weight` (float8_e4m3fn, [N, K]) next to `weight_scale_inv`
(fp32, [ceil(N/128), ceil(K/128)], one per 128 x 128 block; the last row/column of blocks covers the
ragged edge). Dequantisation is W[n, k] = weight[n, k] * weight_scale_inv[n // 128, k // 128]
("scale_inv" is the decoding multiplier: amax(block) / 448). The quantiser is models/fp8.py's
`quantize_blocks`, the one the FP8 training recipe uses for its weights (arXiv 2412.19437 §3.3).

Which Linears are quantised is the family's call (`not_converted`: module-name suffixes left in
bf16, as the release leaves embeddings, heads, router gates and MTP's eh_proj); only 2-D `.weight`
tensors are ever quantised, so norms and biases never are. transformers' fused expert stacks
(`...experts.gate_up_proj` [E, N, K]) carry their scales as `gate_up_proj_scale_inv` [E, nb, kb].

Checked against transformers 5.24's fine-grained FP8 loader, which dequantises on CPU
(tests/test_hf_fp8.py). Its CPU dequantiser derives the block size from the scale grid (N // nb),
so it reads ragged edges wrong (N = 200: blocks of 100) or refuses them (N = 328); the block
layout here is the release's and DeepSeek's own kernels' (ceil(N/128) blocks, the last one partial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from models.fp8 import E4M3, TILE, dequantize_blocks, quantize_blocks

QUANT_METHOD = "fp8"
FMT = "e4m3"
BLOCK = (TILE, TILE)
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Fp8Format:
    """The block size of an FP8 checkpoint (from its quantization_config)."""

    block: tuple[int, int] = BLOCK


def quantization_config() -> dict[str, Any]:
    """config.json's `quantization_config`, exactly the release's (which names no modules_to_not_convert:
    readers know the bf16 modules from the architecture; an unquantised tensor simply has no scales)."""
    return {"quant_method": QUANT_METHOD, "fmt": FMT, "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def read_quantization_config(hf_config: Mapping[str, Any]) -> Optional[Fp8Format]:
    """The FP8 format of a config.json (None: not quantised); ValueError naming what is not the released format."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ValueError(f"quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported (only {QUANT_METHOD!r}, "
                         "DeepSeek-V3's fine-grained FP8)")
    if q.get("fmt", FMT) != FMT:
        raise ValueError(f"quantization_config.fmt={q.get('fmt')!r}: only {FMT!r} (float8_e4m3fn) is supported")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={q.get('activation_scheme')!r}: only 'dynamic' "
                         "(no stored activation scales) is supported")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size={block!r}: expected two positive integers "
                         "(per-block scales; per-tensor FP8 is not supported)")
    if block[0] != block[1]:
        raise ValueError(f"quantization_config.weight_block_size={block!r}: only square blocks are supported")
    return Fp8Format((block[0], block[1]))


def scale_name(weight_name: str) -> str:
    """The scale tensor's name: `x.weight` -> `x.weight_scale_inv`, a fused `x.gate_up_proj` -> `x.gate_up_proj_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def quantises(hf_name: str, shape: Sequence[int], not_converted: Sequence[str]) -> bool:
    """Is this tensor stored as FP8 + scales? 2-D Linear weights whose module is not in `not_converted`."""
    if len(shape) != 2 or not hf_name.endswith(".weight"):
        return False
    module = hf_name[: -len(".weight")]
    return not any(module == m or module.endswith("." + m) for m in not_converted)


def scale_shape(shape: Sequence[int], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """[..., ceil(N/bn), ceil(K/bk)] for a weight [..., N, K]."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float8_e4m3fn, weight_scale_inv fp32) of a weight [..., N, K], 128 x 128 blocks."""
    q, s = quantize_blocks(w, BLOCK[0])
    return q, s.to(torch.float32).contiguous()


def dequantize_weight(name: str, q: torch.Tensor, scale_inv: Optional[torch.Tensor], fmt: Fp8Format) -> torch.Tensor:
    """fp32 weight from a stored FP8 weight and its scales; ValueError naming `name` when they do not fit."""
    if scale_inv is None:
        raise ValueError(f"{name} is float8_e4m3fn but {scale_name(name)} is missing")
    if q.dtype != E4M3:
        raise ValueError(f"{scale_name(name)} belongs to a quantised weight, but {name} is {q.dtype}, "
                         "not float8_e4m3fn")
    want = scale_shape(q.shape, fmt.block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{scale_name(name)} has shape {tuple(scale_inv.shape)}; a weight of shape "
                         f"{tuple(q.shape)} in {fmt.block[0]}x{fmt.block[1]} blocks needs {want}")
    if not scale_inv.dtype.is_floating_point:
        raise ValueError(f"{scale_name(name)} is {scale_inv.dtype}, expected fp32 scales")
    return dequantize_blocks(q, scale_inv.float(), fmt.block[0])
