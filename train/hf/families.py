"""The Hugging Face model families moeforge reads and writes, and which one a model belongs to.

A family is a module (deepseek_v3.py is one) that provides what `HFFamily` lists: the
config.json `model_type`s it handles, which of our configs it takes, the tensor mapping
(`HFTensor` entries) and the config.json mapping. Adding a family is one module beside
deepseek_v3.py and its entry in FAMILIES.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Protocol

import torch

from models.config import ModelConfig
from train.hf import deepseek_v3, gpt_oss
from train.hf.mapping import HFTensor


class HFFamily(Protocol):
    MODEL_TYPES: tuple[str, ...]  # the config.json model_type values the module reads and writes
    REQUIREMENT: str  # which of our configs it takes, for the error when no family does
    # module-name suffixes an FP8 export keeps unquantised (train/hf/quant_fp8.py); None: no FP8 export
    FP8_NOT_CONVERTED: Optional[tuple[str, ...]]

    def model_type_for(self, cfg: ModelConfig) -> Optional[str]:
        """The model_type written for `cfg`; None when `cfg` is not of this family."""

    def layout(self, cfg: ModelConfig, shapes: Mapping[str, Iterable[int]], model_type: str) -> list[HFTensor]:
        """Every HF tensor of the model with our source for it, in export order."""

    def fused_expert_names(self, cfg: ModelConfig, shapes: Mapping[str, Iterable[int]]) -> dict[str, str]:
        """Fused expert keys the reader accepts besides the layout's: {HF key: our name}."""

    def config_dict(self, cfg: ModelConfig, dtype: torch.dtype, model_type: str, bos_token_id: Optional[int] = None,
                    eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None) -> dict:
        """config.json for `cfg`."""

    def model_config(self, hf: Mapping) -> ModelConfig:
        """Our ModelConfig from a config.json of one of MODEL_TYPES."""

    def export_warnings(self, cfg: ModelConfig, model_type: str) -> list[str]:
        """Where transformers will compute something else than moeforge for `cfg`."""

    def finish_import(self, state: Mapping[str, torch.Tensor], model_type: str) -> None:
        """Fix-ups of a model just loaded from HF weights."""


FAMILIES: tuple[HFFamily, ...] = (deepseek_v3, gpt_oss)  # type: ignore[assignment]  # modules satisfy the protocol


def family_of_config(cfg: ModelConfig) -> tuple[HFFamily, str]:
    """The family our model config exports to, and the model_type it writes."""
    for family in FAMILIES:
        model_type = family.model_type_for(cfg)
        if model_type is not None:
            return family, model_type
    raise ValueError(
        f"model.family={cfg.family!r}, model.scoring_func={cfg.scoring_func!r} with "
        f"model.topk_method={cfg.topk_method!r} has no Hugging Face "
        "architecture: " + "; ".join(family.REQUIREMENT for family in FAMILIES)
    )


def family_of_model_type(model_type: object) -> HFFamily:
    """The family that reads config.json files of `model_type`."""
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    known = [t for family in FAMILIES for t in family.MODEL_TYPES]
    raise ValueError(f"config.json: model_type {model_type!r} is not {' or '.join(known)}")
