"""LoRA adapters through ``peft`` on a ``MoDTransformer``: added for training, merged when a model is read
back (``load_saved``), so every reader (evaluation, generation, export, serving) gets a plain model.

peft's LoRA layers (``peft.tuners.lora.LoraModel``, injected in place) wrap the attention's fused ``qkv``
and output ``proj`` and the MLP's ``up``, ``gate`` and ``down`` ``nn.Linear`` layers (``--model.lora_targets``
names them; only ``nn.Linear`` layers of those names are wrapped: never the LM head, the routers or
predictors, nor a mixture's expert matrices). On the fused ``qkv`` one rank-``r`` update serves queries,
keys and values together (Llama-format LoRA adapts ``q_proj``, ``k_proj``, ``v_proj`` separately); merged,
it is an update of the same three matrices. Every pretrained weight is frozen; the adapters and the
routing parameters (routers and causal predictors: new, so nothing to adapt) train in full.

A run's checkpoint holds what trains (adapters, routing parameters) and what rebuilds the rest: the
pretrained folder's path (``init_from``, with the run's hyperparameters) and a fingerprint of its weights
files (``ADAPTER_BASE_KEY``). Reading it back builds the pretrained model again, checks the fingerprint, adds
the adapters, loads what trained and merges (``merge_and_unload``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.errors import UserError
from ..model.hf_format import ARCHITECTURE_FIELDS, resolve
from ..model.routing import Router
from ..model.transformer import MoDTransformer
from .files import CheckpointError

LORA_TARGETS = ("qkv", "proj", "up", "gate", "down")
"""The ``nn.Linear`` layers adapters go on by default: attention's fused query/key/value and output
projections, the MLP's three."""
ADAPTER_BASE_KEY = "adapter_base"
"""Checkpoint key of ``{"init_from": the pretrained folder or Hub id, "fingerprint": its weights files'}``."""
_SAMPLE = 1 << 20  # bytes of a weights file's beginning and end its fingerprint reads


@dataclass(frozen=True)
class LoraSettings:
    """How adapters are added (``--model.lora_*``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"--model.lora_rank={self.rank}: expected >= 1")
        if self.alpha <= 0:
            raise UserError(f"--model.lora_alpha={self.alpha}: expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--model.lora_dropout={self.dropout}: expected 0 <= dropout < 1")
        if not self.targets:
            raise UserError(
                "--model.lora_targets is empty: name the nn.Linear layers to adapt (qkv, proj, up, gate, down)"
            )

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> "LoraSettings":
        """The settings a run's hyperparameters hold (``lora_rank`` ...)."""
        return cls(
            hparams.get("lora_rank", cls.rank),
            hparams.get("lora_alpha", cls.alpha),
            hparams.get("lora_dropout", cls.dropout),
            tuple(hparams.get("lora_targets", cls.targets)),
        )


def routing_names(model: nn.Module) -> set[str]:
    """The names of the routers' parameters and buffers (routed blocks', recursion steps', a mixture of
    experts'; causal predictors and decision thresholds included): what Mixture-of-Depths adds to a pretrained
    model. They train in full (router-only tuning trains nothing else) and every checkpoint keeps them."""
    found = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Router) or prefix.rpartition(".")[2] == "router":
            found.update(f"{prefix}.{name}" for name, _ in chain(module.named_parameters(), module.named_buffers()))
    return found


def targeted(model: nn.Module, targets) -> list[str]:
    """The names of the ``nn.Linear`` layers named ``targets`` (their last name part), routers and predictors
    aside (they train in full)."""
    routing = routing_names(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in set(targets) and f"{name}.weight" not in routing
    ]


def add_adapters(model: MoDTransformer, settings: LoraSettings):
    """Add LoRA adapters to ``model`` in place (peft's ``LoraModel``, returned: its ``merge_and_unload``
    merges them back), freeze every weight but the adapters and the routing parameters."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    names = targeted(model, settings.targets)
    if not names:
        raise UserError(
            f"--model.lora_targets {list(settings.targets)} names no nn.Linear layer of the model "
            "(its layers: qkv, proj, up, gate, down)"
        )
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names, bias="none"
    )
    tuner = LoraModel(model, config, "default")
    routing = routing_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name in routing)
    return tuner


def weights_fingerprint(folder: Path) -> str:
    """A pretrained folder's weights files, identified cheaply: each ``*.safetensors`` file's name, size, and
    first and last MiB (the header, names, shapes and offsets included)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_SAMPLE))
            f.seek(max(0, size - _SAMPLE))
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def adapter_base(init_from: str) -> dict:
    """What a checkpoint of adapters keeps of the pretrained model they adapt (``ADAPTER_BASE_KEY``)."""
    return {"init_from": init_from, "fingerprint": weights_fingerprint(resolve(init_from))}


def adapted_model(
    path: str, config: ModelConfig, hparams: Mapping, trained: Mapping[str, torch.Tensor], base: Optional[dict]
) -> MoDTransformer:
    """A checkpoint of adapters read back: the pretrained model built again from its folder (its fingerprint
    checked), the adapters added, what trained loaded (a sharded checkpoint holds every weight: loaded too),
    the adapters merged; in eval mode."""
    init_from = hparams.get("init_from")
    if not init_from or base is None:
        raise CheckpointError(f"{path} holds LoRA adapters but does not say what they adapt (no init_from)")
    try:
        folder = resolve(init_from)
    except UserError as err:
        raise CheckpointError(
            f"{path} holds LoRA adapters over {init_from}, which cannot be read now ({err}); "
            "the adapters need the pretrained model they were trained on"
        ) from None
    if weights_fingerprint(folder) != base.get("fingerprint"):
        raise CheckpointError(
            f"{path} holds LoRA adapters over {init_from}, whose weights files have changed since "
            "(another fingerprint): the adapters need the weights they were trained on"
        )
    run = {k: v for k, v in config.to_dict().items() if k not in ARCHITECTURE_FIELDS}  # routing, context: the run's
    model = MoDTransformer.from_hf(folder, **run)
    tuner = add_adapters(model, LoraSettings.from_hparams(hparams))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(dict(trained), strict=False)
    lacking = sorted(trainable & set(missing))
    if lacking or unexpected:
        what = [f"missing {k}" for k in lacking[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        raise CheckpointError(f"{path}: its adapters do not fit its own settings: " + "; ".join(what))
    merged = tuner.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()


__all__ = [
    "ADAPTER_BASE_KEY",
    "LORA_TARGETS",
    "LoraSettings",
    "adapted_model",
    "adapter_base",
    "add_adapters",
    "routing_names",
    "targeted",
    "weights_fingerprint",
]
