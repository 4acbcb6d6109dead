"""The DeepSeek-V3 / V2 family: the one mapping between moeforge's Transformer and the
Hugging Face DeepseekV3 / DeepseekV2 layout, and their config.json (train/hf/families.py
lists what a family module provides).

Both directions (train/hf/write.py writes it, train/hf/read.py reads it) walk the same
list of `HFTensor` entries built by `layout`, so a name can never be mapped one way
on export and another way on import.

Our names (models/transformer.py)                HF / DeepSeek released layout
  embed_tokens.weight                            model.embed_tokens.weight
  layers.{i}.<X>                                 model.layers.{i}.<X>        (same <X>: self_attn.*, norms, mlp.*)
  layers.{i}.mlp.experts.gate_up_proj [E,2I,H]   model.layers.{i}.mlp.experts.{e}.gate_proj.weight = [e, :I]
                                                 model.layers.{i}.mlp.experts.{e}.up_proj.weight   = [e, I:]
  layers.{i}.mlp.experts.down_proj [E,H,I]       model.layers.{i}.mlp.experts.{e}.down_proj.weight = [e]
  norm.weight                                    model.norm.weight
  lm_head.weight                                 lm_head.weight
  MTP depth k (0-based), HF layer j = num_hidden_layers + k:
  mtp.{k}.enorm / hnorm / eh_proj                model.layers.{j}.enorm / hnorm / eh_proj
  mtp.{k}.norm.weight                            model.layers.{j}.shared_head.norm.weight
  mtp.{k}.block.<X>                              model.layers.{j}.<X>        (experts split as above)
  embed_tokens.weight (shared)                   model.layers.{j}.embed_tokens.weight     (a copy, as released)
  lm_head.weight (shared)                        model.layers.{j}.shared_head.head.weight (a copy, as released)

Transformers loads the per-expert keys into its fused in-memory [E, 2I, H] / [E, H, I]
experts; it also accepts the fused keys `mlp.experts.gate_up_proj` / `down_proj`, which
the reader therefore accepts too (`fused_expert_names`).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from models.config import ModelConfig
from train.hf.mapping import HFTensor, common_config, rope_from_hf

V3, V2 = "deepseek_v3", "deepseek_v2"
MODEL_TYPES = (V3, V2)
REQUIREMENT = "DeepseekV3 is sigmoid + noaux_tc, DeepseekV2 is softmax + greedy/group_limited_greedy"
ARCHITECTURES = {V3: "DeepseekV3ForCausalLM", V2: "DeepseekV2ForCausalLM"}
# Linears DeepSeek-V3's FP8 release keeps in bf16 (train/hf/quant_fp8.py quantises every other 2-D weight):
# the embeddings and output heads (the MTP copies too), the router gate, and MTP's eh_proj.
FP8_NOT_CONVERTED = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate", "eh_proj")
_EXPERT_STACK = re.compile(r"^(?P<prefix>.*mlp\.experts\.)(?P<which>gate_up_proj|down_proj)$")


def model_type_for(cfg: ModelConfig) -> Optional[str]:
    """deepseek_v3 for the sigmoid/noaux_tc router, deepseek_v2 for the softmax routers.

    Other combinations (sigmoid with V2's greedy selection) have no HF architecture: None.
    """
    if cfg.family != "deepseek":
        return None
    if cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc":
        return V3
    if cfg.scoring_func == "softmax" and cfg.topk_method in ("greedy", "group_limited_greedy"):
        return V2
    return None


def mtp_layer_index(cfg: ModelConfig, k: int) -> int:
    """HF layer index of MTP depth k (0-based): num_hidden_layers + k, as in DeepSeek-V3's release."""
    return cfg.num_hidden_layers + k


def our_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """HF name of one of our non-expert-stack tensors."""
    if name == "lm_head.weight":
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m is None:
        return "model." + name
    layer, rest = mtp_layer_index(cfg, int(m.group(1))), m.group(2)
    if rest.startswith("block."):
        rest = rest[len("block.") :]
    elif rest == "norm.weight":
        rest = "shared_head.norm.weight"
    return f"model.layers.{layer}.{rest}"


def layout(cfg: ModelConfig, shapes: Mapping[str, Iterable[int]], model_type: str) -> list[HFTensor]:
    """Every HF tensor of the model with our source for it, in export order.

    `shapes` maps our state-dict names to shapes (a model's state_dict or a DCP checkpoint's
    metadata). Router biases are left out for deepseek_v2, which has none (nor uses one).
    """
    out: list[HFTensor] = []
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name.endswith("e_score_correction_bias"):
            if model_type == V2:
                continue
            out.append(HFTensor(our_to_hf_name(name, cfg), name, shape, keep_fp32=True))
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # HF ties lm_head to embed_tokens itself
        m = _EXPERT_STACK.match(name)
        if m is None:
            out.append(HFTensor(our_to_hf_name(name, cfg), name, shape))
            continue
        prefix = our_to_hf_name(m.group("prefix") + "X", cfg)[:-1]  # "...mlp.experts."
        n_experts = shape[0]
        if m.group("which") == "gate_up_proj":
            inter = shape[1] // 2
            for e in range(n_experts):
                for part, rows in (("gate_proj", (0, inter)), ("up_proj", (inter, 2 * inter))):
                    out.append(HFTensor(f"{prefix}{e}.{part}.weight", name, (inter, shape[2]), e, rows))
        else:
            out.extend(HFTensor(f"{prefix}{e}.down_proj.weight", name, tuple(shape[1:]), e) for e in range(n_experts))
    for k in range(cfg.num_nextn_predict_layers):
        layer = mtp_layer_index(cfg, k)
        emb = tuple(shapes["embed_tokens.weight"])
        out.append(HFTensor(f"model.layers.{layer}.embed_tokens.weight", "embed_tokens.weight", emb, shared=True))
        head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out.append(HFTensor(f"model.layers.{layer}.shared_head.head.weight", head, tuple(shapes[head]), shared=True))
    return out


def fused_expert_names(cfg: ModelConfig, shapes: Mapping[str, Iterable[int]]) -> dict[str, str]:
    """HF fused expert key (transformers' in-memory layout) -> our expert stack name."""
    fused = {}
    for name in shapes:
        m = _EXPERT_STACK.match(name)
        if m is not None:
            prefix = our_to_hf_name(m.group("prefix") + "X", cfg)[:-1]
            fused[prefix + m.group("which")] = name
    return fused


# ------------------------------------------------------------------------------------------------ config


# moeforge fields that HF configs do not have; kept under "moeforge" so an import restores them.
_TRAINING_ONLY = (
    "bias_update_speed", "aux_loss_alpha", "seq_aux", "device_aux_loss_alpha", "comm_aux_loss_alpha",
    "capacity_factor", "mtp_loss_weight",
)


def config_dict(
    cfg: ModelConfig, dtype: torch.dtype, model_type: str,
    bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
) -> dict:
    """config.json for transformers (5.x reads rope_parameters/dtype; 4.x, vLLM and DeepSeek's
    own code read rope_scaling/rope_theta/torch_dtype, so both spellings are written, consistently)."""
    d = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "topk_method": cfg.topk_method,
        "scoring_func": cfg.scoring_func,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        **common_config(cfg, dtype, bos_token_id, eos_token_id, pad_token_id),
        "moeforge": {k: getattr(cfg, k) for k in _TRAINING_ONLY},
    }
    if model_type == V3:
        d["rope_interleave"] = True  # DeepSeek's complex-pair RoPE layout (models/rope.py)
    else:
        d["aux_loss_alpha"] = cfg.aux_loss_alpha  # DeepSeek-V2's own config fields
        d["seq_aux"] = cfg.seq_aux
    return d


# Defaults of transformers' configs where they differ from ModelConfig's (which are DeepSeek-V3 671B),
# for HF config.json files that leave a field out.
_HF_DEFAULTS = {
    V3: {"max_position_embeddings": 4096, "initializer_range": 0.02, "scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    V2: {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "num_attention_heads": 32, "n_routed_experts": 64, "n_shared_experts": 2,
        "first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "n_group": 1,
        "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "num_nextn_predict_layers": 0, "bias_update_speed": 0.0,
    },
}


def model_config(hf: Mapping) -> ModelConfig:
    """ModelConfig from a DeepSeek-V2/V3 config.json (HF 4.x or 5.x spelling of RoPE)."""
    model_type = hf["model_type"]
    values: dict = dict(_HF_DEFAULTS[model_type])
    not_from_hf = {"rope_scaling", "rope_theta", "attn_implementation", "experts_implementation", "family",
                   "head_dim", "num_key_value_heads", "sliding_window", "layer_types"}
    fields = set(ModelConfig.__dataclass_fields__) - not_from_hf
    for key in fields:
        if key in hf and hf[key] is not None:
            values[key] = hf[key]
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        values["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    for key in ("n_group", "topk_group"):
        if hf.get(key) is None and key in hf:
            values[key] = 1
    if "q_lora_rank" in hf:
        values["q_lora_rank"] = hf["q_lora_rank"]  # None is meaningful (single q_proj)
    values.update({k: v for k, v in (hf.get("moeforge") or {}).items() if k in fields})
    values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, values.get("max_position_embeddings", 4096))
    if model_type == V3 and hf.get("rope_interleave") is False:
        raise ValueError("config.json: rope_interleave=false (half-split RoPE) is not supported; moeforge uses "
                         "DeepSeek's interleaved layout")
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ differences


def export_warnings(cfg: ModelConfig, model_type: str) -> list[str]:
    """Where transformers' implementation of `model_type` will compute something else than moeforge."""
    if model_type == V2 and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        return ["model.norm_topk_prob=true: transformers' DeepseekV2 ignores it (never normalises top-k "
                "gates), so its outputs will differ from moeforge's; DeepSeek's own modeling code honours it"]
    return []


def finish_import(state: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Fix up a model just loaded from `model_type` weights: V2 routers use no bias, so ours is zeroed."""
    if model_type == V2:
        for name, t in state.items():
            if name.endswith("e_score_correction_bias"):
                t.zero_()
