"""modlm: Mixture-of-Depths transformer language models with PyTorch Lightning."""
from .config import ModelConfig
from .model import ModelOutput, MoDTransformer
from .routing import RoutingInfo

__all__ = ["ModelConfig", "MoDTransformer", "ModelOutput", "RoutingInfo"]
