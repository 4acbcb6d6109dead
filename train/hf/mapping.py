"""The form every family's mapping takes: a list of `HFTensor` entries, one per HF tensor, each
naming the tensor of our model it comes from (the reader and the writer walk the same list),
and the RoPE section of config.json that every family writes and reads the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from models.config import ModelConfig, RopeScalingConfig

MXFP4_QUANT_METHOD = "mxfp4"  # config.json quantization_config.quant_method of gpt-oss's MXFP4 experts


@dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF layout and where it lives in our model.

    `src` is our state-dict name. For a routed expert, `expert` indexes dim 0 of the
    [E, ...] stack and `rows` (start, stop) selects the gate or up half of gate_up_proj.
    `shared` marks the MTP copies of the embedding and output head: exported, but on
    import the main model's tensor wins (they are one tensor in moeforge).
    """

    hf_name: str
    src: str
    shape: tuple[int, ...]
    expert: Optional[int] = None
    rows: Optional[tuple[int, int]] = None
    shared: bool = False
    keep_fp32: bool = False  # the router bias stays fp32 whatever the export dtype
    # A layout change between our tensor and HF's (e.g. gpt-oss's interleaved, transposed experts):
    # to_hf(ours) -> HF tensor, from_hf(HF tensor) -> ours. None: the same layout.
    to_hf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    from_hf: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # The HF tensor may be stored as MXFP4 `{hf_name}_blocks` / `_scales` over the transpose of its
    # last two dims (gpt-oss's released expert weights); models/mxfp4.py (de)quantises them.
    mxfp4: bool = False

    def take(self, full: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
        """This entry's slice of `full` (the whole src tensor, or experts [first_expert, ...) of it)."""
        if self.expert is None:
            return full
        t = full[self.expert - first_expert]
        return t if self.rows is None else t[self.rows[0] : self.rows[1]]


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5.x `rope_parameters` of `cfg` (default RoPE or YaRN)."""
    rs: Optional[RopeScalingConfig] = cfg.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs.type != "yarn":
        raise ValueError(f"model.rope_scaling.type={rs.type!r}: only 'yarn' can be exported")
    out = {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": rs.factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings,
        "beta_fast": rs.beta_fast,
        "beta_slow": rs.beta_slow,
        "mscale": rs.mscale,
        "mscale_all_dim": rs.mscale_all_dim,
    }
    if not rs.truncate:
        out["truncate"] = False
    return out


def legacy_rope_scaling(rope: dict) -> Optional[dict]:
    """The 4.x / vLLM spelling (`rope_scaling` beside `rope_theta`) of `rope_parameters`."""
    if rope["rope_type"] == "default":
        return None
    return {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}


def rope_from_hf(hf: Mapping, max_position_embeddings: int) -> tuple[float, Optional[RopeScalingConfig]]:
    """(rope_theta, rope_scaling) from a config.json: 5.x rope_parameters, else 4.x rope_scaling + rope_theta."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (default or yarn)")
    defaults = RopeScalingConfig()
    return theta, RopeScalingConfig(
        type="yarn",
        factor=float(rope.get("factor", defaults.factor)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", max_position_embeddings)),
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=float(rope.get("mscale") or 0.0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        truncate=bool(rope.get("truncate", True)),
    )


def common_config(
    cfg: ModelConfig, dtype: torch.dtype, bos_token_id: Optional[int], eos_token_id: Optional[int],
    pad_token_id: Optional[int],
) -> dict:
    """The config.json fields every family writes alike: RoPE (5.x rope_parameters and the 4.x / vLLM
    rope_scaling + rope_theta, consistently), norms, init, embeddings, special tokens, dtype (both spellings)."""
    rope = rope_parameters(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_rope_scaling(rope),
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
