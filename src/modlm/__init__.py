"""modlm: Mixture-of-Depths transformer language models with PyTorch Lightning.

The package is layered, each layer importing only the ones listed before it:

* ``modlm.model``: the model in plain torch (config, blocks, routing, experts, KV caches,
  generation) and the transformers view of it; this folder is an export's remote code;
* ``modlm.analysis``: FLOPs, routing metrics, evaluation and reports;
* ``modlm.data``: corpora, tokenizers, token streams and the Lightning data module;
* ``modlm.training``: the Lightning module, optimizer, sharding, checkpoints, loggers, callbacks;
* ``modlm.cli``: the ``train``, ``eval`` and ``prepare`` command lines.
"""

from .analysis.flops import flops_ratio_vs_dense, forward_flops, training_flops
from .model import ExpertInfo, ModelConfig, ModelOutput, MoDTransformer, Routing, RoutingInfo
from .model.version import __version__

__all__ = [
    "__version__",
    "ExpertInfo",
    "ModelConfig",
    "MoDTransformer",
    "ModelOutput",
    "Routing",
    "RoutingInfo",
    "flops_ratio_vs_dense",
    "forward_flops",
    "training_flops",
]
