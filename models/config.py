"""Model configuration with the field names of Hugging Face's ``DeepseekV3Config``.

Keeping HF's names makes export a rename rather than a translation. Fields that HF
does not have (balancing speeds, capacity factor, attention backend) are moeforge's
own and are documented where they are declared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3 architecture. Defaults are DeepSeek-V3 (671B) shapes."""

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
            (self.attn_implementation in ("auto", "sdpa", "eager", "flash"), "attn_implementation must be auto|sdpa|eager|flash"),
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


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (YaRN eq. 22)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
