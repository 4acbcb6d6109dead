"""Model configuration with the field names of Hugging Face's ``DeepseekV3Config`` / ``GptOssConfig``.

Keeping HF's names makes export a rename rather than a translation. Fields that HF
does not have (balancing speeds, capacity factor, attention backend) are moeforge's
own and are documented where they are declared.

Two families share the one dataclass (`family`): "deepseek" (DeepSeek-V3 / V2) and "gpt_oss".
A gpt_oss config is written with GptOssConfig's names (num_local_experts, intermediate_size as
the expert width, num_key_value_heads, head_dim, sliding_window, layer_types, router_aux_loss_coef,
swiglu_limit); the DeepSeek-named fields the shared parts read (n_routed_experts,
moe_intermediate_size, no shared experts, no MTP, ...) are then derived from them
(`gpt_oss_derived`), and setting one of those to something else is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class RopeScalingConfig:
    """YaRN context extension (DeepSeek-V2 §2.1.3 / the YaRN paper)."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Round YaRN's correction range to whole dimensions (DeepSeek, HF's default); gpt-oss: false.
    truncate: bool = True


FAMILIES = ("deepseek", "gpt_oss")
LAYER_TYPES = ("sliding_attention", "full_attention")  # HF GptOssConfig.layer_types values


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3 or gpt-oss architecture. Defaults are DeepSeek-V3 (671B) shapes."""

    family: str = "deepseek"  # "deepseek" (MLA, DeepSeekMoE, MTP) | "gpt_oss" (GQA + sinks, biased experts)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of each routed/shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # Multi-head Latent Attention (V2 §2.1): low-rank q and joint kv compression.
    q_lora_rank: Optional[int] = 1536  # None: a single q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (V3 §2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3) | "greedy" | "group_limited_greedy" (V2)
    # Balancing. V3: aux-loss-free bias (speed gamma) + complementary sequence-wise
    # loss with alpha = aux_loss_alpha. V2: expert/device/communication losses.
    bias_update_speed: float = 0.001  # gamma of V3 §2.1.2; only with topk_method noaux_tc
    aux_loss_alpha: float = 0.0001  # V3 sequence-wise alpha, or V2 expert-level alpha_1
    seq_aux: bool = True  # balance statistics per sequence (per document when known)
    device_aux_loss_alpha: float = 0.0  # V2 alpha_2 (devices = expert groups)
    comm_aux_loss_alpha: float = 0.0  # V2 alpha_3
    capacity_factor: Optional[float] = None  # V2 token dropping; None = dropless
    # Multi-token prediction (V3 §2.2)
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float = 0.3  # lambda; the trainer may schedule it
    # Positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = field(
        default_factory=lambda: RopeScalingConfig(
            factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
        )
    )
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Attention core: "auto" (flash-attn on CUDA when installed, else SDPA) | "sdpa" | "eager"
    attn_implementation: str = "auto"
    # Routed experts kernel: "auto" picks the fastest correct path for the device.
    experts_implementation: str = "auto"
    # gpt-oss (HF GptOssConfig names; read when family is gpt_oss, where intermediate_size is the
    # width of each expert). Attention: GQA with sinks, `sliding_window` on the layers that
    # layer_types marks "sliding_attention" (default: even layers, as HF).
    num_local_experts: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    head_dim: int = 64
    sliding_window: Optional[int] = None
    layer_types: Optional[list[str]] = None
    router_aux_loss_coef: float = 0.9  # Switch load-balancing loss coefficient (per MoE layer)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        if self.family == "gpt_oss":
            for key, value in gpt_oss_derived(self).items():
                setattr(self, key, value)

    @property
    def is_gpt_oss(self) -> bool:
        return self.family == "gpt_oss"

    @property
    def rope_head_dim(self) -> int:
        """Dimensions RoPE rotates per head: the decoupled key (MLA) or the whole head (gpt-oss)."""
        return self.head_dim if self.is_gpt_oss else self.qk_rope_head_dim

    def is_sliding_layer(self, layer_idx: int) -> bool:
        """gpt-oss: whether layer `layer_idx` attends within sliding_window (layer_types)."""
        return bool(self.layer_types) and self.layer_types[layer_idx] == "sliding_attention"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h) times YaRN's attention temperature mscale^2 (V2 appendix)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers below first_k_dense_replace use a dense MLP (V3 §4.2)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        """Raise ValueError naming the field when the architecture is inconsistent."""
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} must be one of {', '.join(FAMILIES)}")
        if self.is_gpt_oss:
            self._validate_gpt_oss()
        checks = [
            (self.hidden_size > 0, "hidden_size must be positive"),
            (self.num_hidden_layers > 0, "num_hidden_layers must be positive"),
            (self.num_attention_heads > 0, "num_attention_heads must be positive"),
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.scoring_func in ("sigmoid", "softmax"), "scoring_func must be 'sigmoid' or 'softmax'"),
            (
                self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                "topk_method must be 'noaux_tc', 'greedy' or 'group_limited_greedy'",
            ),
            (
                self.attn_implementation in (GPT_OSS_ATTENTION if self.is_gpt_oss else ("auto", "sdpa", "eager", "flash")),
                "attn_implementation must be " + ("|".join(GPT_OSS_ATTENTION) if self.is_gpt_oss else "auto|sdpa|eager|flash"),
            ),
            (
                self.experts_implementation in ("auto", "grouped_mm", "loop"),
                "experts_implementation must be auto|grouped_mm|loop",
            ),
            (self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0"),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)"),
            (self.kv_lora_rank > 0, "kv_lora_rank must be positive"),
            (self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null"),
            (self.initializer_range > 0, "initializer_range must be positive"),
        ]
        if self.n_routed_experts > 0:
            checks += [
                (
                    0 < self.num_experts_per_tok <= self.n_routed_experts,
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]",
                ),
                (self.n_group >= 1, "n_group must be >= 1"),
                (
                    self.n_routed_experts % self.n_group == 0,
                    f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}",
                ),
                (
                    1 <= self.topk_group <= self.n_group,
                    f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]",
                ),
                (
                    self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                    "num_experts_per_tok exceeds the experts available in topk_group groups",
                ),
                (
                    not (self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid"),
                    "topk_method 'noaux_tc' needs scoring_func 'sigmoid'",
                ),
                (
                    not (self.topk_method == "noaux_tc" and self.n_group > 1 and self.n_routed_experts // self.n_group < 2),
                    "noaux_tc group scores sum the top-2 experts: each group needs >= 2 experts",
                ),
                (self.bias_update_speed >= 0, "bias_update_speed must be >= 0"),
                (self.aux_loss_alpha >= 0, "aux_loss_alpha must be >= 0"),
                (self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be positive or null"),
                (self.moe_intermediate_size > 0, "moe_intermediate_size must be positive"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"model.{msg}")

    def _validate_gpt_oss(self) -> None:
        n_layers, kv = self.num_hidden_layers, self.num_key_value_heads
        checks = [
            (self.num_local_experts is not None and self.num_local_experts > 0,
             "num_local_experts must be a positive number of experts (family gpt_oss)"),
            (kv is not None and kv > 0, "num_key_value_heads must be positive (family gpt_oss)"),
            (kv is None or kv <= 0 or self.num_attention_heads % kv == 0,
             f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads={kv}"),
            (self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be positive and even"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or null"),
            (self.layer_types is not None and len(self.layer_types) == n_layers,
             f"layer_types needs one entry per layer ({n_layers}), got "
             f"{None if self.layer_types is None else len(self.layer_types)}"),
            (all(t in LAYER_TYPES for t in self.layer_types or ()),
             f"layer_types entries must be {' or '.join(LAYER_TYPES)}, got {self.layer_types}"),
            (self.sliding_window is not None or "sliding_attention" not in (self.layer_types or ()),
             "layer_types has sliding_attention layers but sliding_window is null"),
            (self.router_aux_loss_coef >= 0, "router_aux_loss_coef must be >= 0"),
            (self.swiglu_limit > 0 and self.swiglu_alpha > 0, "swiglu_limit and swiglu_alpha must be positive"),
            (self.capacity_factor is None, "capacity_factor: gpt-oss routing is dropless; set it to null"),
            (self.rope_scaling is None or self.rope_scaling.mscale == 0 and self.rope_scaling.mscale_all_dim == 0,
             "rope_scaling.mscale and mscale_all_dim must be 0 for gpt_oss (HF's YaRN attention factor "
             "0.1 ln(factor) + 1; DeepSeek's mscale ratio does not apply)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"model.{msg}")


GPT_OSS_ATTENTION = ("auto", "cpu_flash", "flex", "eager")  # models.gqa_attention.SINK_ATTENTION_IMPLEMENTATIONS


def gpt_oss_derived(cfg: ModelConfig) -> dict:
    """The DeepSeek-named fields a gpt_oss config implies (what the shared MoE, planner and layouts read).

    Raises ValueError when one of them was set to something else (e.g. n_routed_experts instead
    of num_local_experts): a gpt_oss config takes GptOssConfig's names.
    """
    derived = {
        "n_routed_experts": cfg.num_local_experts or 0,
        "moe_intermediate_size": cfg.intermediate_size,
        "n_shared_experts": 0,
        "first_k_dense_replace": 0,
        "num_nextn_predict_layers": 0,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "bias_update_speed": 0.0,
        # The Switch loss coef * E * sum_i f_i P_i is models/balance.py's expert-level loss with
        # alpha = coef * K (see models/topk_softmax_router.py), here per sequence (per document when
        # packed) and averaged: that does not depend on how the batch is split over ranks and
        # micro-batches (HF pools f and P over its whole batch and all layers).
        "aux_loss_alpha": cfg.router_aux_loss_coef * cfg.num_experts_per_tok,
        "seq_aux": True,
        "device_aux_loss_alpha": 0.0,
        "comm_aux_loss_alpha": 0.0,
        "qk_rope_head_dim": cfg.head_dim,
    }
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for key, value in derived.items():
        current = getattr(cfg, key)
        if current != value and current != defaults[key]:
            raise ValueError(
                f"model.{key}={current!r} does not apply to family gpt_oss (it is derived: {value!r}); "
                "a gpt_oss config uses GptOssConfig's fields (num_local_experts, intermediate_size, "
                "router_aux_loss_coef, ...)"
            )
    if cfg.layer_types is None:  # HF GptOssConfig's default: sliding on even layers, full on odd ones
        derived["layer_types"] = [LAYER_TYPES[i % 2] for i in range(cfg.num_hidden_layers)]
    return derived


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (YaRN eq. 22)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
