"""The language model as plain modules: embedding, blocks, norm, head, MTP (DeepSeek-V3 and gpt-oss).

The two families (models/config.py `family`) share everything but the block's choices: DeepSeek
blocks use MLA and DeepSeekMoE (dense first layers, MTP modules); gpt-oss blocks use grouped-query
attention with sinks, sliding-window on the layers layer_types marks, and the same MoE layer with
gpt-oss's router and biased clamped-SwiGLU experts (no shared experts, no MTP).

Layers live in an nn.ModuleDict keyed by their index so that pipeline stages can
delete the layers they do not own without renaming the rest (checkpoint keys stay
stable across layouts). The forward pass is written as parts (embed, run_layers, losses of the
main head and every MTP depth) that Transformer.forward and the pipeline's stages both compose.
No torch.distributed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from models.attention import MultiHeadLatentAttention
from models.config import ModelConfig
from models.gqa_attention import GroupedQueryAttention
from models.head_loss import IGNORE_INDEX, cross_entropy_sum, head_cross_entropy_sum
from models.kv_cache import LatentKVCache, LayerCache
from models.mlp import SwiGLU
from models.moe import MoE
from models.norm import RMSNorm
from models.rope import RotaryEmbedding

__all__ = [
    "Block", "MTPModule", "ModelOutput", "ModelParts", "Transformer", "IGNORE_INDEX", "combine_losses",
    "cross_entropy_sum", "embed", "losses", "mtp_labels", "mtp_states", "output_logits", "run_layers",
    "shift_left", "target_counts",
]


def attention_of(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """MLA (DeepSeek) or GQA with sinks, windowed on gpt-oss's sliding_attention layers."""
    if not cfg.is_gpt_oss:
        return MultiHeadLatentAttention(cfg)
    window = cfg.sliding_window if cfg.is_sliding_layer(layer_idx) else None
    return GroupedQueryAttention(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, window,
        cfg.attention_bias, cfg.attn_implementation,
    )


class Block(nn.Module):
    """Pre-norm transformer block: h + Attn(norm(h)), then + FFN(norm(h)) (dense or MoE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_of(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg, layer_idx) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        doc_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        return self.ffn_residual(self.attention_residual(x, rope, mask, cache), doc_ids)

    def attention_residual(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        """x + MLA(norm(x)): the block's first half."""
        return x + self.self_attn(self.input_layernorm(x), rope, mask, cache)

    def ffn_residual(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x + FFN(norm(x)), FFN dense or MoE: the block's second half."""
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, doc_ids) if isinstance(self.mlp, MoE) else self.mlp(h))


class MTPModule(nn.Module):
    """Multi-token prediction depth k (V3 §2.2, eqs. 21-23).

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])   (eq. 21, concatenation order of the released weights)
    h^k  = norm(Block(h'))                                     (eq. 22; norm is HF's shared_head.norm)
    logits = lm_head(h^k) predicting t_{i+k+1}                 (eq. 23; embedding and head shared with the model)

    h^0 is the main model's output after its final norm (what the main head reads). For k > 1 the
    depth is fed h^{k-1} = the previous depth's normed output, the tensor its head reads: Megatron-Core's
    MultiTokenPredictionLayer applies its final_layernorm before returning and chains that output, and
    transformers' MtpModel (post_norm) does the same. vLLM's DeepSeek drafter reuses one module for
    k > 1 and feeds back the un-normed block output; DeepSeek released depth 1 only, so no released
    weights decide k > 1.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(
        self,
        h: torch.Tensor,
        emb_shifted: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        doc_ids: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[LayerCache] = None,
    ) -> torch.Tensor:
        """h^k [B, S, H] from h^{k-1} (normed) and the embeddings of the tokens shifted by k."""
        x = self.eh_proj(torch.cat([self.enorm(emb_shifted), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, rope, doc_ids, mask, cache))


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i] <- x[:, i + k]; the last k positions get `fill`."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], x.new_full((x.shape[0], k), fill)], dim=1)


def mtp_labels(labels: torch.Tensor, k: int, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targets of MTP depth k: position i predicts labels[i + k] (token i+k+1).

    Positions whose shifted input crosses a document boundary (doc_ids[i] != doc_ids[i+k])
    are ignored, so no depth learns to predict across documents.
    """
    shifted = shift_left(labels, k, IGNORE_INDEX)
    if doc_ids is not None and k > 0:
        crosses = shift_left(doc_ids, k, -1) != doc_ids
        shifted = shifted.masked_fill(crosses, IGNORE_INDEX)
    return shifted


def target_counts(labels: torch.Tensor, depth: int, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Target tokens [1 + depth] (int64) of the main head and of MTP depths 1..depth, as the losses count them."""
    return torch.stack([(mtp_labels(labels, k, doc_ids) != IGNORE_INDEX).sum() for k in range(depth + 1)])


@dataclass
class ModelOutput:
    """Summed losses and their token counts so callers can normalise over a global batch."""

    logits: Optional[torch.Tensor]
    lm_loss_sum: Optional[torch.Tensor] = None  # sum of CE over valid tokens
    lm_tokens: Optional[torch.Tensor] = None
    mtp_loss_sums: Optional[torch.Tensor] = None  # [D]
    mtp_tokens: Optional[torch.Tensor] = None  # [D]

    def loss(self, mtp_weight: float) -> torch.Tensor:
        """Mean CE + lambda / D * sum_k mean CE_k (V3 eq. 25); aux losses act through their own gradients."""
        return combine_losses(self, self.lm_tokens, self.mtp_tokens, mtp_weight)

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)

    @property
    def mtp_loss(self) -> Optional[torch.Tensor]:
        """Mean over depths of each depth's mean CE (without lambda)."""
        if self.mtp_loss_sums is None:
            return None
        return (self.mtp_loss_sums / self.mtp_tokens.clamp(min=1)).mean()

    def loss_sums(self) -> torch.Tensor:
        """[CE sum, MTP CE sum per depth] as one fp32 vector (what a pipeline's last stage returns)."""
        parts = [self.lm_loss_sum.reshape(1)] + ([] if self.mtp_loss_sums is None else [self.mtp_loss_sums])
        return torch.cat(parts).float()

    @classmethod
    def from_loss_sums(cls, sums: torch.Tensor) -> "ModelOutput":
        """The inverse of loss_sums (no logits, no token counts)."""
        return cls(logits=None, lm_loss_sum=sums[0], mtp_loss_sums=sums[1:] if sums.numel() > 1 else None)


def combine_losses(
    out: ModelOutput, lm_tokens: torch.Tensor, mtp_tokens: Optional[torch.Tensor], mtp_weight: float
) -> torch.Tensor:
    """The training objective with CE sums divided by the given (possibly global) token counts."""
    loss = out.lm_loss_sum / lm_tokens.clamp(min=1)
    if out.mtp_loss_sums is not None and mtp_weight != 0:
        depth = out.mtp_loss_sums.numel()
        loss = loss + mtp_weight / depth * (out.mtp_loss_sums / mtp_tokens.clamp(min=1)).sum()
    return loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        truncate = cfg.rope_scaling is None or cfg.rope_scaling.truncate
        self.rope = RotaryEmbedding(cfg.rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                    truncate)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # MTP depth k is exported as HF layer index num_hidden_layers + k - 1.
        self.mtp = nn.ModuleList(
            [MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)]
        )
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not self.embed_tokens.weight.is_meta:  # a meta model (shapes only: the planner's) has no values to set
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix (and gpt-oss sinks), ones for norms, zero linear biases."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, (MoE, GroupedQueryAttention)):
                module.reset_parameters(std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        return_logits: bool = False,
    ) -> ModelOutput:
        """input_ids, labels, doc_ids: [B, S]. labels[i] is the target of position i (IGNORE_INDEX = ignore).

        Without labels, returns logits only. With labels, returns CE sums and token counts
        for the main head and for every MTP depth.
        """
        rope = self.rope(input_ids.shape[1])
        h = run_layers(self, embed(self, input_ids), rope, doc_ids, mask)
        if labels is None:
            return ModelOutput(logits=output_logits(self, h))
        out = losses(self, h, input_ids, labels, rope, doc_ids, mask)
        if return_logits:
            out.logits = output_logits(self, h)
        return out


# ------------------------------------------------------------------------ the forward pass, in parts
# Transformer.forward and the pipeline's stages (parallel/pipeline.py) compose these, so each step of
# the forward pass is written once. Each part takes the modules it needs from `parts`: the Transformer, or
# a pipeline stage holding the model's modules (its last stage may hold its own embed_tokens copy).
class ModelParts(Protocol):
    """The modules the parts read (a pipeline stage holds those of its role, under these names)."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleDict
    norm: RMSNorm
    lm_head: nn.Linear
    mtp: nn.ModuleList


def embed(parts: ModelParts, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, S, H] (the model's input and every MTP depth's shifted input)."""
    return parts.embed_tokens(input_ids)


def run_layers(
    parts: ModelParts,
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    doc_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    cache: Optional[LatentKVCache] = None,
) -> torch.Tensor:
    """The transformer blocks that `parts` holds, in order (layer i of them uses cache.layer(i))."""
    for i, layer in enumerate(parts.layers.values()):
        h = layer(h, rope, doc_ids, mask, None if cache is None else cache.layer(i))
    return h


def output_logits(parts: ModelParts, h: torch.Tensor) -> torch.Tensor:
    """Logits of the main head: lm_head(norm(h))."""
    return parts.lm_head(parts.norm(h))


def mtp_states(
    parts: ModelParts,
    h: torch.Tensor,
    input_ids: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    doc_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> list[torch.Tensor]:
    """h^1..h^D [B, S, H] of the MTP depths, each its head's input, from h^0 = norm(last layer's output).

    Depth k reads h^{k-1} and the embedding of the input shifted by k (V3 eq. 21).
    """
    states = []
    for k, module in enumerate(parts.mtp, start=1):
        h = module(h, embed(parts, shift_left(input_ids, k, 0)), rope, doc_ids, mask)
        states.append(h)
    return states


def losses(
    parts: ModelParts,
    h: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    doc_ids: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
) -> ModelOutput:
    """CE sums and target counts of the main head and of every MTP depth, from the last layer's output h.

    The main head and MTP depth 1 both read norm(h) (DESIGN §3); head and CE are fused (models.head_loss).
    """
    h = parts.norm(h)
    lm_sum, lm_tokens = head_cross_entropy_sum(parts.lm_head, h, labels)
    out = ModelOutput(logits=None, lm_loss_sum=lm_sum, lm_tokens=lm_tokens)
    if len(parts.mtp):
        sums, counts = [], []
        for k, h_k in enumerate(mtp_states(parts, h, input_ids, rope, doc_ids, mask), start=1):
            s, c = head_cross_entropy_sum(parts.lm_head, h_k, mtp_labels(labels, k, doc_ids))
            sums.append(s)
            counts.append(c)
        out.mtp_loss_sums, out.mtp_tokens = torch.stack(sums), torch.stack(counts)
    return out
