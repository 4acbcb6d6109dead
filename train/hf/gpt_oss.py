"""The gpt-oss family: the one mapping between moeforge's Transformer (family gpt_oss) and
Hugging Face's GptOssForCausalLM layout, and its config.json (train/hf/families.py lists what a
family module provides). Both directions walk the same `HFTensor` list built by `layout`.

Our names (models/transformer.py)                   HF GptOssForCausalLM
  embed_tokens.weight, norm.weight                   model.embed_tokens.weight, model.norm.weight
  layers.{i}.<norms, self_attn.*>                    model.layers.{i}.<same>   (q/k/v/o_proj weight+bias, sinks)
  layers.{i}.mlp.gate.weight / .bias   [E, H] / [E]  model.layers.{i}.mlp.router.weight / .bias
  layers.{i}.mlp.experts.gate_up_proj  [E, 2I, H]    model.layers.{i}.mlp.experts.gate_up_proj [E, H, 2I]
      (gate rows [:I], up rows [I:])                     transposed, gate / up interleaved: columns 2j / 2j+1
  layers.{i}.mlp.experts.gate_up_proj_bias [E, 2I]   ...experts.gate_up_proj_bias [E, 2I], interleaved
  layers.{i}.mlp.experts.down_proj     [E, H, I]     ...experts.down_proj [E, I, H]   (transposed)
  layers.{i}.mlp.experts.down_proj_bias [E, H]       ...experts.down_proj_bias [E, H]
  lm_head.weight                                     lm_head.weight

MXFP4 (the released checkpoints): the two expert weights may be stored as `<name>_blocks` uint8
[E, rows, cols/32, 16] and `<name>_scales` uint8 [E, rows, cols/32], over the HF tensor with its
last two dims swapped, i.e. [E, 2I (interleaved), H] and [E, H, I]; the reader dequantises them
expert by expert (train/hf/read.py), and the writer produces them on request (--dtype mxfp4).
At the published sizes down_proj is square (I = H = 2880): its orientation cannot be read from
its shape, which is why the mapping is tested on square and non-square shapes.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from models.config import ModelConfig
from train.hf.mapping import MXFP4_QUANT_METHOD, HFTensor, common_config, rope_from_hf

MODEL_TYPE = "gpt_oss"
MODEL_TYPES = (MODEL_TYPE,)
REQUIREMENT = "GptOss is model.family=gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"
FP8_NOT_CONVERTED = None  # no FP8 release format (train/hf/write.py refuses --dtype fp8); MXFP4 instead
_EXPERT = re.compile(r"^(?P<prefix>layers\.\d+\.mlp\.experts\.)(?P<which>gate_up_proj|down_proj)(?P<bias>_bias)?$")


def model_type_for(cfg: ModelConfig) -> Optional[str]:
    return MODEL_TYPE if cfg.family == "gpt_oss" else None


# ------------------------------------------------------------------------------------------------ expert layouts


def halves_to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up halves) -> [..., 2I] with gate at even and up at odd positions."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def interleaved_to_halves(t: torch.Tensor) -> torch.Tensor:
    """The inverse of halves_to_interleaved."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def gate_up_to_hf(w: torch.Tensor) -> torch.Tensor:
    """Ours [E, 2I, H] (halves) -> HF [E, H, 2I] (interleaved)."""
    return halves_to_interleaved(w.transpose(-1, -2))


def gate_up_from_hf(w: torch.Tensor) -> torch.Tensor:
    """HF [E, H, 2I] (interleaved) -> ours [E, 2I, H] (halves)."""
    return interleaved_to_halves(w).transpose(-1, -2)


def swap_last_two(w: torch.Tensor) -> torch.Tensor:
    """down_proj: ours [E, H, I] <-> HF [E, I, H]."""
    return w.transpose(-1, -2)


# ------------------------------------------------------------------------------------------------ names


def our_to_hf_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    return "model." + name.replace(".mlp.gate.", ".mlp.router.")


def layout(cfg: ModelConfig, shapes: Mapping[str, Iterable[int]], model_type: str) -> list[HFTensor]:
    """Every HF tensor of the model with our source for it, in export order."""
    out: list[HFTensor] = []
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # HF ties lm_head to embed_tokens itself
        hf_name = our_to_hf_name(name)
        m = _EXPERT.match(name)
        if m is None:
            out.append(HFTensor(hf_name, name, shape))
        elif m.group("which") == "gate_up_proj":
            if m.group("bias"):
                out.append(HFTensor(hf_name, name, shape, to_hf=halves_to_interleaved, from_hf=interleaved_to_halves))
            else:
                hf_shape = (shape[0], shape[2], shape[1])
                out.append(HFTensor(hf_name, name, hf_shape, to_hf=gate_up_to_hf, from_hf=gate_up_from_hf, mxfp4=True))
        elif m.group("bias"):
            out.append(HFTensor(hf_name, name, shape))
        else:
            hf_shape = (shape[0], shape[2], shape[1])
            out.append(HFTensor(hf_name, name, hf_shape, to_hf=swap_last_two, from_hf=swap_last_two, mxfp4=True))
    return out


def fused_expert_names(cfg: ModelConfig, shapes: Mapping[str, Iterable[int]]) -> dict[str, str]:
    """GptOss stores its experts fused already: nothing besides the layout."""
    return {}


# ------------------------------------------------------------------------------------------------ config


def config_dict(
    cfg: ModelConfig, dtype: torch.dtype, model_type: str,
    bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
) -> dict:
    """config.json for transformers' GptOssConfig (5.x rope_parameters and 4.x rope_scaling both written)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_local_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "experts_per_token": cfg.num_experts_per_tok,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types or []),
        **common_config(cfg, dtype, bos_token_id, eos_token_id, pad_token_id),
        "swiglu_limit": cfg.swiglu_limit,
        "swiglu_alpha": cfg.swiglu_alpha,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "output_router_logits": False,
    }


def mxfp4_quantization_config(cfg: ModelConfig) -> dict:
    """config.json's quantization_config of an MXFP4 export: every module but the experts stays unquantised."""
    return {"quant_method": MXFP4_QUANT_METHOD, "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}


# GptOssConfig's defaults, for config.json files that leave a field out.
_HF_DEFAULTS = {
    "num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
    "sliding_window": 128, "tie_word_embeddings": False, "initializer_range": 0.02, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "num_experts_per_tok": 4, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
    "router_aux_loss_coef": 0.001, "attention_bias": True, "layer_types": None,
}


def model_config(hf: Mapping) -> ModelConfig:
    """ModelConfig (family gpt_oss) from a GptOss config.json."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not gpt-oss's clamped SwiGLU")
    values = {key: hf[key] if hf.get(key) is not None else default for key, default in _HF_DEFAULTS.items()}
    if values["sliding_window"] is None and "sliding_window" in hf:
        values["sliding_window"] = None
    if "num_experts_per_tok" not in hf and "experts_per_token" in hf:
        values["num_experts_per_tok"] = hf["experts_per_token"]
    values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, values["max_position_embeddings"])
    if values["rope_scaling"] is None and not (hf.get("rope_scaling") or hf.get("rope_parameters")):
        raise ValueError("config.json: gpt_oss without rope_parameters / rope_scaling (GptOssConfig's YaRN default "
                         "is not assumed); write them out")
    cfg = ModelConfig(family="gpt_oss", **values)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ differences


def export_warnings(cfg: ModelConfig, model_type: str) -> list[str]:
    """transformers adds the router loss only with output_router_logits=True, pooled over layers (moeforge: per
    layer, summed); the forward pass is the same."""
    return []


def finish_import(state: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Nothing to fix up: every tensor of ours has an HF counterpart."""
