"""modlm: Mixture-of-Depths transformer language models with PyTorch Lightning."""
from .config import ModelConfig
from .model import ModelOutput, MoDTransformer
from .moe import ExpertInfo
from .routing import RoutingInfo

__all__ = ["ExpertInfo", "ModelConfig", "MoDTransformer", "ModelOutput", "RoutingInfo"]
