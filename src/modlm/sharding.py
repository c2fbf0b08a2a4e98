"""Wrap policies for Lightning's ``FSDPStrategy`` (FSDP1), for GPU users who prefer it to FSDP2.

(FSDP2, ``ModelParallelStrategy``, needs nothing from here: ``MoDLightningModule.configure_model``
applies ``fully_shard`` per block, and FSDP2 keeps each block's class, so routing works as is.)

FSDP1 *replaces* a wrapped module by a ``FullyShardedDataParallel`` (or ``CheckpointWrapper``)
object. Two facts of the model limit what may be wrapped:

* ``MoDTransformer.forward`` tells routed from dense blocks by ``isinstance(block, RoutedBlock)``,
  so a wrapped ``RoutedBlock`` would be called like a dense block;
* ``RoutedBlock`` calls its inner block's ``update`` method, not its forward, so a wrapped inner
  ``Block`` would run with its parameters still sharded.

So the policy wraps the dense ``Block`` units of ``model.blocks`` and never looks inside a
``RoutedBlock``; routed blocks stay in the root unit (sharded at rest, gathered for the whole
forward). Pass it as ``auto_wrap_policy`` and, for activation checkpointing, as
``activation_checkpointing_policy`` (see configs/fsdp1.yaml).
"""
from __future__ import annotations

from torch import nn

from .layers import Block
from .routing import RoutedBlock


def dense_block_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
    """FSDP1 ``auto_wrap_policy``: wrap each dense ``Block``, leave routed blocks whole and unwrapped."""
    if recurse:
        # FSDP1 asks first whether to look inside a module, and only wraps modules it looked into.
        return not isinstance(module, RoutedBlock)
    return isinstance(module, Block)
