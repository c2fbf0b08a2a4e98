"""The Mixture-of-Depths transformer, top to bottom.

token ids -> embedding -> blocks (dense ``Block`` or ``RoutedBlock``) -> final RMSNorm -> LM head.
With ``route_every=0`` every block is dense and this is a plain pre-norm RoPE transformer: the
baseline MoD is compared against, built by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Block, init_weights, rope_tables
from .routing import RoutedBlock, Routing, RoutingInfo


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, vocab_size) next-token logits."""
    aux_loss: torch.Tensor
    """Scalar: the routing auxiliary losses, already weighted, averaged over routed blocks (0 for dense)."""
    routing: list[RoutingInfo] = field(default_factory=list)
    """One entry per routed block, in depth order."""
    loss: Optional[torch.Tensor] = None
    """Mean next-token cross-entropy when ``targets`` were given (``aux_loss`` not included)."""


class MoDTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            RoutedBlock(config, i) if config.is_routed(i) else Block(config) for i in range(config.n_layers)
        )
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)
        for block in self.blocks:
            if isinstance(block, RoutedBlock):
                block.reset_parameters()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, routing: Routing = "topk", targets: Optional[torch.Tensor] = None
    ) -> ModelOutput:
        """Run (B, T) token ids through the model.

        ``routing="topk"`` is the training path (non-causal expert-choice top-k per sequence);
        ``routing="causal"`` makes every routing decision from the token itself (router threshold or
        predictor), so position t never depends on later tokens. Dense models ignore ``routing``.
        """
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing={routing!r} is invalid: must be 'topk' or 'causal'")
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = rope_tables(self.config, torch.arange(T, device=idx.device).unsqueeze(0))

        x = self.embed(idx)
        infos, aux_terms = [], []
        for block in self.blocks:
            if isinstance(block, RoutedBlock):
                x, info, aux = block(x, cos, sin, routing)
                infos.append(info)
                aux_terms.append(aux)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else logits.new_zeros((), dtype=torch.float32)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return ModelOutput(logits=logits, aux_loss=aux_loss, routing=infos, loss=loss)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None):
        raise NotImplementedError("KV-cached generation with causal routing lands with the eval issue (#6)")
