"""Write a moeforge checkpoint as a Hugging Face directory (DeepSeek-V3 or V2, gpt-oss; CLI: train/export.py).

`checkpoint` may also be a run directory or its checkpoints/ directory (the newest complete
checkpoint is taken). The output directory receives config.json, model-0000k-of-0000n.safetensors
shards with model.safetensors.index.json, and the run's tokenizer files; `transformers.AutoModelForCausalLM`
and `AutoTokenizer.from_pretrained(DIR)` load it. Names follow the model's family module
(train/hf/families.py).

Streaming: tensors are read from the DCP checkpoint one at a time (routed experts one saved
chunk at a time: under expert parallelism that is one rank's [E/ep, ...] slice) into
safetensors shards of bounded size, so the model is never materialised whole. Peak memory is
about one output shard plus the largest saved chunk. Works for any saving layout: DCP
reassembles FSDP shards, and expert chunks are read by their global offsets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from models.fp8 import E4M3
from models.mxfp4 import quantize_mxfp4
from train import checkpoint as ckpt
from train.hf import quant_fp8
from train.hf.families import family_of_config
from train.hf.mapping import HFTensor

log = logging.getLogger("moeforge.export")

INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------ reading DCP


class _ExpertChunks:
    """The HF tensors of one checkpoint: whole tensors, or one expert out of the cached saved chunk
    of its stack (one EP rank's [E/ep, ...] slice), so a stack is never read whole."""

    def __init__(self, saved: ckpt.SavedModel) -> None:
        self.saved = saved
        self._chunk: Optional[tuple[str, int, int, torch.Tensor]] = None  # (name, first, stop, experts)

    def get(self, entry: HFTensor) -> torch.Tensor:
        if entry.expert is None:
            return self.saved.read(entry.src)
        cached = self._chunk
        if cached is None or cached[0] != entry.src or not cached[1] <= entry.expert < cached[2]:
            self._chunk = None  # free the previous chunk before reading the next
            first, stop = self.saved.saved_rows(entry.src, entry.expert)
            cached = self._chunk = (entry.src, first, stop, self.saved.read(entry.src, first, stop))
        return entry.take(cached[3], cached[1])


# ------------------------------------------------------------------------------------------ paths and sizes


def tokenizer_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent / "tokenizer"


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    for unit, mult in units:
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


# ------------------------------------------------------------------------------------------ export


def plan_shards(layout: list[HFTensor], dtype: torch.dtype, max_bytes: int,
                fp8_not_converted: Optional[Sequence[str]] = None) -> list[list[HFTensor]]:
    """Consecutive entries grouped into shards of at most max_bytes (a bigger tensor gets its own).

    fp8_not_converted: given for an FP8 export, whose quantised weights take 1 byte per value plus their scales.
    """
    shards: list[list[HFTensor]] = [[]]
    used = 0
    for entry in layout:
        n = math.prod(entry.shape)
        if fp8_not_converted is not None and quant_fp8.quantises(entry.hf_name, entry.shape, fp8_not_converted):
            nbytes = n + 4 * math.prod(quant_fp8.scale_shape(entry.shape))
        else:
            nbytes = n * (4 if entry.keep_fp32 else dtype.itemsize)
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return shards


def _stored(entry: HFTensor, t: torch.Tensor, dtype: torch.dtype,
            fp8_not_converted: Optional[Sequence[str]], mxfp4: bool = False) -> dict[str, torch.Tensor]:
    """The file tensors of one HF entry: itself in `dtype` (fp32 for router biases), FP8 weight + block scales,
    or (`mxfp4` and an entry the family stores so) MXFP4 blocks + scales over the tensor's last two dims swapped,
    the released gpt-oss layout."""
    if mxfp4 and entry.mxfp4:
        blocks, scales = quantize_mxfp4(t.transpose(-1, -2).float())
        return {entry.hf_name + "_blocks": blocks, entry.hf_name + "_scales": scales}
    if fp8_not_converted is not None and quant_fp8.quantises(entry.hf_name, entry.shape, fp8_not_converted):
        q, scale_inv = quant_fp8.quantize_weight(t)
        return {entry.hf_name: q, quant_fp8.scale_name(entry.hf_name): scale_inv}
    t = t.to(torch.float32 if entry.keep_fp32 else dtype).contiguous()
    # A tensor that is a view of a cached expert chunk must not share storage in the file.
    return {entry.hf_name: t.clone() if entry.expert is not None else t}


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: Optional[str | os.PathLike] = None,
    mxfp4: bool = False,
    ema: bool = False,
) -> Path:
    """Write the HF directory `out` from a moeforge checkpoint; returns `out`.

    dtype: of the exported weights (router biases stay fp32); None keeps the checkpoint's.
    torch.float8_e4m3fn writes DeepSeek-V3's released FP8 format (train/hf/quant_fp8.py): the family's
    quantised Linears as float8_e4m3fn + weight_scale_inv, every other tensor in bf16.
    mxfp4: write the family's MXFP4 tensors (gpt-oss's expert weights) as MXFP4 blocks and scales, as released.
    ema: write the EMA of the weights (train.ema_decay) instead of the weights; CheckpointError without one.
    """
    from safetensors.torch import save_file

    path = ckpt.resolve_checkpoint(Path(checkpoint))
    cfg = ckpt.saved_model_config(path)
    family, model_type = family_of_config(cfg)
    for warning in family.export_warnings(cfg, model_type):
        log.warning("%s", warning)
    if cfg.capacity_factor is not None:
        log.warning("model.capacity_factor=%s: moeforge drops over-capacity tokens, transformers never does; "
                    "outputs can differ where tokens were dropped", cfg.capacity_factor)
    saved = ckpt.SavedModel(path, ema=ema)
    shapes = saved.shapes()
    layout = family.layout(cfg, shapes, model_type)
    if mxfp4 and not any(e.mxfp4 for e in layout):
        raise ValueError(f"MXFP4 export: model_type {model_type} has no tensors stored in MXFP4 (gpt_oss has)")
    missing = sorted({e.src for e in layout} - set(shapes))
    if missing:
        raise ckpt.CheckpointError(f"{path}: checkpoint lacks model tensors {missing[:5]}")
    dtype = dtype or saved.dtype("embed_tokens.weight")
    if dtype == E4M3 and family.FP8_NOT_CONVERTED is None:
        raise ValueError(f"FP8 export: model_type {model_type} has no released FP8 format (gpt-oss: --dtype mxfp4)")
    fp8_not_converted = family.FP8_NOT_CONVERTED if dtype == E4M3 else None
    if fp8_not_converted is not None:
        dtype = torch.bfloat16  # the release's dtype for what it does not quantise
    source = _ExpertChunks(saved)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model-*.safetensors")) + [out / INDEX_FILE, out / "model.safetensors"]:
        old.unlink(missing_ok=True)  # never mix shards of two exports
    shards = plan_shards(layout, dtype, _parse_size(max_shard_size), fp8_not_converted)
    weight_map: dict[str, str] = {}
    total = 0
    for i, entries in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for entry in entries:
            t = source.get(entry)
            if entry.to_hf is not None:
                t = entry.to_hf(t)
            if tuple(t.shape) != entry.shape:
                raise AssertionError(f"{entry.hf_name}: shape {tuple(t.shape)} != {entry.shape}")
            for name, value in _stored(entry, t, dtype, fp8_not_converted, mxfp4).items():
                tensors[name] = value
                weight_map[name] = fname
                total += value.numel() * value.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else tokenizer_dir_of(path)
    special: dict[str, Optional[int]] = {}
    if tok_dir.is_dir():
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        special = _special_token_ids(tok_dir)
    else:
        log.warning("no tokenizer directory at %s; exporting weights and config only", tok_dir)
    config = family.config_dict(cfg, dtype, model_type, **special)
    if fp8_not_converted is not None:
        config["quantization_config"] = quant_fp8.quantization_config()
    if mxfp4:
        config["quantization_config"] = family.mxfp4_quantization_config(cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: v for k, v in special.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _special_token_ids(tok_dir: Path) -> dict[str, Optional[int]]:
    """bos/eos/pad ids from the tokenizer's own special-token files (for config.json)."""
    names: dict[str, Any] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = tok_dir / fname
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            for key in ("bos_token", "eos_token", "pad_token"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    names.setdefault(key, value)
    if not names or not (tok_dir / "tokenizer.json").is_file():
        return {}
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as e:  # a foreign tokenizer directory: weights still export
        log.warning("cannot read %s (%s); config.json gets no special token ids", tok_dir / "tokenizer.json", e)
        return {}
    return {f"{key[:-6]}_token_id": tok.token_to_id(value) for key, value in names.items()}

