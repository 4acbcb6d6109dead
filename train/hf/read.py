"""Read a Hugging Face directory (config.json + safetensors; DeepSeek-V3 / V2, gpt-oss) into our Transformer.

    model = load_hf_model(hf_dir)                       # config from config.json, weights loaded
    report = load_hf_weights(model, hf_dir)            # into an existing model of matching shape
    python -m train.hf.read HF_DIR                      # prints the `model:` YAML section to train from it

Training from HF weights: set `checkpoint.init_from_hf: HF_DIR` (the run's model section
must describe the same architecture; `python -m train.hf.read HF_DIR` prints it). The
weights are used when the run directory has no checkpoint yet; a resumed run ignores them.

Names follow the model's family module (train/hf/families.py; the same mapping write.py writes). Per-expert keys
(`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, DeepSeek's release and transformers'
save_pretrained) and transformers' fused keys (`mlp.experts.gate_up_proj` / `down_proj`) are
both read. MTP layers (index num_hidden_layers + k) are loaded when present; when absent,
our MTP modules keep their initialisation (reported in `missing_mtp`). Tensors are read one
at a time with safetensors' lazy `safe_open`, copied into the model and released.

gpt-oss's released checkpoints store the expert weights in MXFP4 (`*_blocks` / `*_scales`,
train/hf/gpt_oss.py): those are read and dequantised one expert at a time (safetensors slices),
so beyond the model only one expert's packed and fp32 values are in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from models.config import ModelConfig
from models.fp8 import E4M3
from models.mxfp4 import dequantize_mxfp4
from models.transformer import Transformer
from train.hf import quant_fp8
from train.hf.families import family_of_config, family_of_model_type
from train.hf.mapping import MXFP4_QUANT_METHOD, HFTensor

log = logging.getLogger("moeforge.hf.read")


class HFImportError(ValueError):
    """An HF directory that does not fit the model; the message names the file and tensor."""


@dataclass
class ImportReport:
    loaded: int = 0
    missing_mtp: list[str] = field(default_factory=list)  # MTP tensors absent from the files (left initialised)
    ignored: list[str] = field(default_factory=list)  # keys in the files that the model has no place for
    shared_mismatch: list[str] = field(default_factory=list)  # MTP embed/head copies that differ from the main ones


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: unreadable ({e})") from None


def hf_model_config(hf_dir: str | os.PathLike) -> ModelConfig:
    """Our ModelConfig for the architecture described by HF_DIR/config.json."""
    hf = read_hf_config(hf_dir)
    try:
        return family_of_model_type(hf.get("model_type")).model_config(hf)
    except ValueError as e:
        raise HFImportError(f"{Path(hf_dir) / 'config.json'}: {e}") from None


class _SafetensorsFiles:
    """key -> lazily opened safetensors file, from model.safetensors.index.json or *.safetensors.

    One file is open at a time (the reader walks the keys in file order, so each shard is opened
    once), and tensors are read one by one: memory stays about one tensor, whatever the model's size.
    """

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        self._open = lambda f: safe_open(str(f), framework="pt", device="cpu")
        index = hf_dir / "model.safetensors.index.json"
        self.file_of: dict[str, Path] = {}
        if index.is_file():
            for key, fname in json.loads(index.read_text())["weight_map"].items():
                self.file_of[key] = hf_dir / fname
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
            if not files:
                raise HFImportError(f"{hf_dir}: no safetensors weights (model.safetensors[.index.json])")
            for f in files:
                with self._open(f) as handle:
                    for key in handle.keys():
                        self.file_of[key] = f
        self._handle: Optional[tuple[Path, object]] = None

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        return self._file_with(key).get_tensor(key)  # type: ignore[attr-defined]

    def get_rows(self, key: str, index: int) -> torch.Tensor:
        """key[index] (along dim 0), read without loading the rest of the tensor."""
        return self._file_with(key).get_slice(key)[index]  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file_with(key).get_slice(key).get_shape())  # type: ignore[attr-defined]

    def _file_with(self, key: str) -> object:
        f = self.file_of[key]
        if self._handle is None or self._handle[0] != f:
            self.close()
            if not f.is_file():
                raise HFImportError(f"{f}: listed in the index but missing")
            self._handle = (f, self._open(f).__enter__())
        return self._handle[1]

    def close(self) -> None:
        if self._handle is not None:
            self._handle[1].__exit__(None, None, None)  # type: ignore[attr-defined]
            self._handle = None


def _fp8_format(hf_dir: Path, files: _SafetensorsFiles) -> Optional[quant_fp8.Fp8Format]:
    """The FP8 format of HF_DIR (config.json's quantization_config), None for unquantised weights."""
    hf_config = read_hf_config(hf_dir) if (hf_dir / "config.json").is_file() else {}
    if (hf_config.get("quantization_config") or {}).get("quant_method") == MXFP4_QUANT_METHOD:
        return None  # gpt-oss: MXFP4 experts, read by _load_mxfp4; nothing is FP8
    try:
        fmt = quant_fp8.read_quantization_config(hf_config)
    except ValueError as e:
        raise HFImportError(f"{hf_dir / 'config.json'}: {e}") from None
    scales = [k for k in files.file_of if k.endswith(quant_fp8.SCALE_SUFFIX)]
    if fmt is None and scales:
        raise HFImportError(f"{hf_dir}: {scales[0]} is an FP8 block scale, but config.json has no "
                            "quantization_config saying how the weights are quantised")
    return fmt


def _read(files: _SafetensorsFiles, key: str, fmt: Optional[quant_fp8.Fp8Format], used: set[str],
          hf_dir: Path) -> torch.Tensor:
    """The tensor `key` of the files, dequantised to fp32 when it is stored as FP8 with block scales."""
    value = files.get(key)
    scale_key = quant_fp8.scale_name(key)
    if value.dtype != E4M3 and scale_key not in files:
        return value
    if fmt is None:
        raise HFImportError(f"{hf_dir}: {key} is float8_e4m3fn, but config.json has no quantization_config "
                            "saying how the weights are quantised")
    scale_inv = None
    if scale_key in files:
        scale_inv = files.get(scale_key)
        used.add(scale_key)
    try:
        return quant_fp8.dequantize_weight(key, value, scale_inv, fmt)
    except ValueError as e:
        raise HFImportError(f"{hf_dir}: {e}") from None


_MTP_NAME = re.compile(r"^mtp\.")


@torch.no_grad()
def load_hf_weights(model: Transformer, hf_dir: str | os.PathLike) -> ImportReport:
    """Copy the weights of HF_DIR into `model` (same architecture) in place.

    Every tensor of the main model must be present with its exact shape; MTP tensors may be
    absent. FP8 checkpoints (config.json `quantization_config`, DeepSeek-V3's released format;
    train/hf/quant_fp8.py) are dequantised tensor by tensor. Raises HFImportError naming the first problem.
    """
    hf_dir = Path(hf_dir)
    cfg = model.cfg
    files = _SafetensorsFiles(hf_dir)
    fmt = _fp8_format(hf_dir, files)
    state = model.state_dict(keep_vars=True)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    family, model_type = family_of_config(cfg)
    layout = family.layout(cfg, shapes, model_type)
    fused = family.fused_expert_names(cfg, shapes)
    report = ImportReport()
    used: set[str] = set()
    missing: list[str] = []
    try:
        for name, hf_key in ((src, key) for key, src in fused.items() if key in files):  # transformers' fused layout
            _copy(state[name], _read(files, hf_key, fmt, used, hf_dir), hf_key, hf_dir)
            used.add(hf_key)
            report.loaded += 1
        fused_loaded = {fused[k] for k in used if k in fused}
        for entry in layout:
            if entry.src in fused_loaded:
                continue
            if entry.hf_name not in files and entry.mxfp4 and entry.hf_name + "_blocks" in files:
                used.update(_load_mxfp4(state[entry.src], files, entry, hf_dir))
                report.loaded += 1
                continue
            if entry.hf_name not in files:
                if _MTP_NAME.match(entry.src) or entry.shared:
                    report.missing_mtp.append(entry.hf_name)
                else:
                    missing.append(entry.hf_name)
                continue
            used.add(entry.hf_name)
            value = _read(files, entry.hf_name, fmt, used, hf_dir)
            if entry.shared:  # the MTP copy of our one embedding / head: check, do not overwrite
                ours = state[entry.src]
                if value.shape != ours.shape or not torch.equal(value.to(ours.dtype), ours):
                    report.shared_mismatch.append(entry.hf_name)
                continue
            target = state[entry.src]
            if entry.expert is not None:
                target = entry.take(target)
            if entry.from_hf is not None:
                _check_shape(value.shape, entry.shape, entry.hf_name, hf_dir)
                value = entry.from_hf(value)
            _copy(target, value, entry.hf_name, hf_dir)
            report.loaded += 1
    finally:
        files.close()
    if missing:
        raise HFImportError(f"{hf_dir}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    report.ignored = sorted(k for k in files.file_of if k not in used)
    if report.missing_mtp:
        mtp_layers = sorted({int(k.split(".")[2]) for k in report.missing_mtp})
        log.warning("%s has no weights for MTP layer(s) %s; those MTP modules keep their initialisation", hf_dir, mtp_layers)
    if report.ignored:
        log.warning("%s: %d tensors not used by this model, e.g. %s", hf_dir, len(report.ignored), report.ignored[:3])
    if report.shared_mismatch:
        log.warning("%s: MTP copies of the embedding/head differ from the main ones (moeforge shares them; the main "
                    "ones are used): %s", hf_dir, report.shared_mismatch)
    family.finish_import(state, model_type)
    return report


def _check_shape(shape, expected, key: str, hf_dir: Path) -> None:
    if tuple(shape) != tuple(expected):
        raise HFImportError(f"{hf_dir}: {key} has shape {tuple(shape)}, the model expects {tuple(expected)}")


def _copy(target: torch.Tensor, value: torch.Tensor, key: str, hf_dir: Path) -> None:
    _check_shape(value.shape, target.shape, key, hf_dir)
    target.copy_(value.to(target.dtype))


def _load_mxfp4(target: torch.Tensor, files: _SafetensorsFiles, entry: HFTensor, hf_dir: Path) -> tuple[str, str]:
    """Dequantise `entry`'s MXFP4 blocks / scales into `target`, one expert at a time; returns the keys read.

    The packed tensor is the HF tensor [E, a, b] with its last two dims swapped ([E, b, a/32, 16]).
    """
    blocks_key, scales_key = entry.hf_name + "_blocks", entry.hf_name + "_scales"
    if scales_key not in files:
        raise HFImportError(f"{hf_dir}: {blocks_key} has no {scales_key}")
    n_experts, a, b = entry.shape
    _check_shape(files.shape(blocks_key), (n_experts, b, a // 32, 16), blocks_key, hf_dir)
    _check_shape(files.shape(scales_key), (n_experts, b, a // 32), scales_key, hf_dir)
    for e in range(n_experts):
        blocks = files.get_rows(blocks_key, e)
        values = dequantize_mxfp4(blocks, files.get_rows(scales_key, e), torch.float32)
        hf_expert = values.transpose(0, 1).unsqueeze(0)  # [1, a, b]: expert e of the HF tensor
        target[e].copy_((entry.from_hf(hf_expert) if entry.from_hf else hf_expert)[0].to(target.dtype))
    return blocks_key, scales_key


def load_hf_model(hf_dir: str | os.PathLike, cfg: Optional[ModelConfig] = None) -> Transformer:
    """A Transformer built from HF_DIR/config.json (or `cfg`) with HF_DIR's weights, in eval mode."""
    model = Transformer(cfg or hf_model_config(hf_dir))
    load_hf_weights(model, hf_dir)
    return model.eval()


def check_same_architecture(cfg: ModelConfig, hf_dir: str | os.PathLike) -> None:
    """Raise HFImportError naming the fields where `cfg` and HF_DIR/config.json disagree on shapes/routing."""
    theirs = hf_model_config(hf_dir)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "scoring_func", "tie_word_embeddings",
            "family", "num_key_value_heads", "head_dim", "sliding_window", "layer_types")
    diff = [f"model.{k}={getattr(cfg, k)!r} but {getattr(theirs, k)!r} in config.json" for k in keys
            if getattr(cfg, k) != getattr(theirs, k)]
    if diff:
        raise HFImportError(f"{hf_dir}: architecture differs: " + "; ".join(diff))


def init_from_hf(model: Transformer, hf_dir: str | os.PathLike) -> ImportReport:
    """The trainer's hook: check the architecture, then load HF_DIR's weights into `model`."""
    check_same_architecture(model.cfg, hf_dir)
    return load_hf_weights(model, hf_dir)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.hf.read",
                                description="Print the moeforge `model:` config section of an HF DeepSeek-V2/V3 or gpt-oss directory.")
    p.add_argument("hf_dir")
    args = p.parse_args(argv)
    from omegaconf import OmegaConf

    try:
        cfg = hf_model_config(args.hf_dir)
    except HFImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(OmegaConf.to_yaml({"model": OmegaConf.structured(cfg)}), end="")
    print(f"# then train with: checkpoint.init_from_hf={args.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
