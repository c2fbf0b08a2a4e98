"""The model, in plain torch: nothing here imports Lightning, the data layer, training or the
command lines, and every import between these files is relative, because this folder is also the
remote code of a transformers export (``modlm.training.export`` copies its files as they are)."""

from .config import ModelConfig
from .moe import ExpertInfo
from .routing import Routing, RoutingInfo
from .transformer import ModelOutput, MoDTransformer

__all__ = ["ExpertInfo", "ModelConfig", "ModelOutput", "MoDTransformer", "Routing", "RoutingInfo"]
