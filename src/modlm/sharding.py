"""Wrap policy for Lightning's ``FSDPStrategy`` (FSDP1), for GPU users who prefer it to FSDP2.

(FSDP2, ``ModelParallelStrategy``, needs nothing from here: ``MoDLightningModule.configure_model``
applies ``fully_shard`` per block.)

FSDP1 *replaces* a wrapped module by a ``FullyShardedDataParallel`` (or ``CheckpointWrapper``)
object, which gathers its shards in ``forward``. The model is written for that: it tells routed
from dense blocks by its config, not by class, and a ``RoutedBlock`` runs its inner ``Block``
through ``forward`` (``residual=False``). So every ``Block`` can be its own unit: the dense ones
and the ones inside routed blocks; the routers and predictors (a few thousand parameters each)
stay in the root unit. Pass the policy as ``auto_wrap_policy`` and, for activation
checkpointing, as ``activation_checkpointing_policy`` (see configs/fsdp1.yaml).
"""
from __future__ import annotations

from torch import nn

from .layers import Block


def block_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
    """FSDP1 ``auto_wrap_policy``: look inside everything, wrap each transformer ``Block``."""
    return True if recurse else isinstance(module, Block)
