"""What a run trains (``--model.tune``), one small class per choice: which parameters train, and what its
checkpoints keep of the model.

* ``full``: every weight trains; checkpoints keep every weight.
* ``routers``: only the routers and causal predictors train (everything else frozen, so the optimizer, and
  every checkpoint's optimizer state, holds only them); checkpoints keep every weight. Needs routed blocks.
* ``lora``: peft's LoRA adapters on the attention and MLP projections (``modlm.saved.adapters``) plus the
  routers and predictors train; everything else is frozen. Needs ``--model.init_from``: a file checkpoint
  keeps what trains (with the routers' decision thresholds) and what rebuilds the rest (the pretrained folder and
  its fingerprint), and is read back
  merged by ``load_saved``. An FSDP2 sharded checkpoint keeps every weight (torch's distributed checkpoint
  loads into the whole model's state; a partial one would not load).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..model.errors import UserError
from ..model.transformer import MoDTransformer
from ..saved.adapters import ADAPTER_BASE_KEY, LoraSettings, adapter_base, add_adapters, routing_names


class Tuning:
    """Full fine-tuning (and training from scratch): every weight trains, and is saved."""

    strict_loading = True
    """Whether a checkpoint holds every weight of the model (Lightning's strict loading)."""

    def apply(self, model: MoDTransformer) -> None:
        """Make ``model`` train what this tuning trains (in place)."""

    def saved_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a checkpoint keeps of the module's ``state`` (its ``state_dict``)."""
        return state

    def checkpoint_extras(self) -> dict:
        """What else a checkpoint must carry to rebuild the model."""
        return {}


class RouterTuning(Tuning):
    """Only the routers and causal predictors train."""

    def apply(self, model: MoDTransformer) -> None:
        if not model.routers():
            raise UserError(
                "--model.tune routers trains only routers and predictors, and this model has none "
                "(route_every 0): route some blocks, or use --model.tune full"
            )
        model.requires_grad_(False)
        for router in model.routers():
            router.requires_grad_(True)


class LoraTuning(Tuning):
    """LoRA adapters and the routing parameters train; checkpoints keep those and what rebuilds the rest."""

    strict_loading = False

    def __init__(self, settings: LoraSettings, init_from: Optional[str]):
        if not init_from:
            raise UserError(
                "--model.tune lora adapts a pretrained model: name it with --model.init_from (a "
                "transformers folder or Hub id)"
            )
        self.settings, self.init_from = settings, init_from
        self.trained: set[str] = set()
        self._base: Optional[dict] = None

    def apply(self, model: MoDTransformer) -> None:
        add_adapters(model, self.settings)
        trains = {name for name, p in model.named_parameters() if p.requires_grad}
        self.trained = {f"model.{name}" for name in trains | routing_names(model)}  # thresholds are buffers

    def saved_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if any(type(v).__name__ == "DTensor" for v in state.values()):
            return state  # a sharded save (see the module docstring)
        return {k: v for k, v in state.items() if k in self.trained}

    def checkpoint_extras(self) -> dict:
        if self._base is None:  # once per run: it reads the weights files' ends
            self._base = adapter_base(self.init_from)
        return {ADAPTER_BASE_KEY: self._base}


def tuning_for(tune: str, init_from: Optional[str], lora: LoraSettings) -> Tuning:
    """The tuning ``--model.tune`` names."""
    if tune == "full":
        return Tuning()
    if tune == "routers":
        return RouterTuning()
    if tune == "lora":
        return LoraTuning(lora, init_from)
    raise UserError(f"tune={tune!r} is invalid: must be 'full', 'routers' or 'lora'")


__all__ = ["LoraTuning", "RouterTuning", "Tuning", "tuning_for"]
