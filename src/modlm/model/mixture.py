"""The one seam every mixture reports through.

A mixture is a part of the model whose routers decide, per token, what computes: a routed block
(``routing.py``), a mixture-of-experts MLP (``moe.py``), a recursion (``recursion.py``). A forward pass
returns what each one did as a ``MixtureInfo``, and that is all the model's loop, the telemetry, the
evaluation and the FLOPs count of a pass as it ran ever see of it: the model collects the infos in depth
order (``ModelOutput.mixtures``) and averages each kind's auxiliary losses; everything that turns an info
into figures is the kind's metrics in ``modlm.analysis.metrics``. Adding a mixture is its file (the
module and its info) plus its metrics.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


class MixtureInfo:
    """What one mixture did in one forward pass. Every kind is a dataclass with at least these:

    * ``layer`` (int): where it sits: the index of its block in the model, set by the model's loop (a
      block's computation does not depend on where it sits, so compiled blocks of one kind share a graph);
    * ``aux_loss`` (0-dim tensor): its auxiliary loss, already weighted, attached to the graph (0 when it
      has nothing to learn, and in a pass over a KV cache);
    * ``aux_losses`` (dict of 0-dim tensors): the same losses unweighted and detached, by name, for
      telemetry (``router_bce``, ``predictor_bce``, ``load_balance``, ...).

    Tensors other than ``aux_loss`` are detached: an info is telemetry, not part of the graph.
    """

    layer: int
    aux_loss: torch.Tensor
    aux_losses: dict

    def parts(self) -> list["MixtureInfo"]:
        """This info and those of mixtures nested in it (a routed block whose MLP is a mixture of experts
        reports both), in order."""
        return [self]


def weighted_aux_loss(mixtures: Sequence[MixtureInfo], like: torch.Tensor) -> torch.Tensor:
    """The model's auxiliary loss: for each kind of mixture the mean of its weighted losses, summed over the
    kinds (so adding a routed block does not dilute the experts' balance loss, nor the reverse). 0 (a tensor
    of ``like``'s device) for a model without mixtures."""
    by_kind: dict[type, list[torch.Tensor]] = defaultdict(list)
    for mixture in mixtures:
        by_kind[type(mixture)].append(mixture.aux_loss)
    total = like.new_zeros((), dtype=torch.float32)
    for losses in by_kind.values():
        total = total + torch.stack(losses).mean()
    return total
