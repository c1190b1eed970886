"""The small MoE transformer the launcher trains."""

from .transformer import ModelConfig, ModelOutput, MoETransformer

__all__ = ["ModelConfig", "ModelOutput", "MoETransformer"]
