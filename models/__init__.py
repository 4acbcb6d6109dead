"""moeforge models: DeepSeek-V3-style MoE transformer as plain nn.Modules (no collectives)."""

from models.config import ModelConfig, RopeScalingConfig
from models.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "RopeScalingConfig", "ModelOutput", "Transformer"]
