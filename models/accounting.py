"""Parameter and FLOP accounting, computed on the meta device (no memory allocated).

Activated parameters per token count every weight a token passes through: the
embedding row, attention, dense MLPs, shared experts, the router and only
num_experts_per_tok of the routed experts (V3 report: 671B total, 37B activated;
this gives 36.6B for V3 and 2.45B for V2-Lite's published 2.4B, whereas counting the
whole embedding table would give 37.6B and 2.66B).
FLOPs per token follow the PaLM appendix B convention: 6 x (activated matmul
parameters) for forward + backward, plus attention 6 * S * heads * (d_qk + d_v)
per layer (no causal discount), with MTP depths counted as extra layers + head.
gpt-oss: expert biases count with their expert (published 20.9B total / 3.61B active for
gpt-oss-20b, 116.8B / 5.13B for gpt-oss-120b), and a sliding-window layer's queries attend at
most sliding_window keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import ModelConfig
from models.moe import moe_layers
from models.transformer import Transformer


@dataclass
class ModelCounts:
    params_total: int  # every parameter, MTP included
    params_total_no_mtp: int
    params_active: int  # activated per token, MTP included
    params_active_no_mtp: int
    params_embedding: int  # input embedding table (not a matmul)
    flops_per_token: float  # training (fwd + bwd) FLOPs per token at seq_len, MTP included


def build_meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def count_model(cfg: ModelConfig, seq_len: int | None = None) -> ModelCounts:
    """Parameter counts and training FLOPs per token of `cfg` at sequence length seq_len."""
    model = build_meta_model(cfg)
    seq_len = seq_len or min(cfg.max_position_embeddings, 4096)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    moes = moe_layers(model)
    expert_params = sum(p[0].numel() for p in moes[0].experts.parameters()) if moes else 0  # one expert, biases too
    inactive_per_moe_layer = (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert_params
    n_moe_main = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_moe_mtp = sum(cfg.is_moe_layer(cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
    embedding = model.embed_tokens.weight.numel()
    tied = model.lm_head.weight is model.embed_tokens.weight
    # A token reads one embedding row, not the table (the table counts in full when tied to the head).
    embedding_row = 0 if tied else cfg.hidden_size
    unread_embedding = 0 if tied else embedding - embedding_row
    active_no_mtp = total - mtp - n_moe_main * inactive_per_moe_layer - unread_embedding
    active = active_no_mtp + mtp - n_moe_mtp * inactive_per_moe_layer
    # Matmul parameters a token uses: everything active but the embedding lookup and norms.
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    matmul_active = active - embedding_row - norms
    if cfg.num_nextn_predict_layers:
        matmul_active += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # shared head reused per depth
    attn = 6 * cfg.num_attention_heads * sum(attended_keys(cfg, i, seq_len) for i in range(cfg.num_hidden_layers))
    attn += 6 * cfg.num_attention_heads * seq_len * cfg.num_nextn_predict_layers
    attn *= cfg.head_dim * 2 if cfg.is_gpt_oss else cfg.qk_head_dim + cfg.v_head_dim
    return ModelCounts(
        params_total=total,
        params_total_no_mtp=total - mtp,
        params_active=active,
        params_active_no_mtp=active_no_mtp,
        params_embedding=embedding,
        flops_per_token=float(6 * matmul_active + attn),
    )


def attended_keys(cfg: ModelConfig, layer_idx: int, seq_len: int) -> int:
    """Keys a query of layer `layer_idx` is counted to attend (no causal discount): the window on sliding layers."""
    return min(seq_len, cfg.sliding_window) if cfg.is_sliding_layer(layer_idx) else seq_len
