"""The Mixture-of-Depths transformer, top to bottom.

token ids -> embedding -> blocks (dense ``Block`` or ``RoutedBlock``) -> final RMSNorm -> LM head.
With ``route_every=0`` every block is dense and this is a plain pre-norm RoPE transformer: the
baseline MoD is compared against, built by the same code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import ModelCache
from .layers import Block, CacheWrite, init_weights, rope_tables
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

    def num_params(self) -> int:
        """Parameters, tied ones counted once."""
        return sum(p.numel() for p in self.parameters())

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
        x, infos, aux_terms = self._trunk(self.embed(idx), cos, sin, routing)
        logits = self.lm_head(self.norm(x))
        aux_loss = torch.stack(aux_terms).mean() if aux_terms else logits.new_zeros((), dtype=torch.float32)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return ModelOutput(logits=logits, aux_loss=aux_loss, routing=infos, loss=loss)

    def _trunk(self, x, cos, sin, routing: Routing, cache: Optional[ModelCache] = None, positions=None,
               token_valid=None, n_valid=None):
        """Run the residual stream through every block; with a cache, each block uses its own
        (``n_valid`` = ``token_valid.sum(1)``, the new real tokens per row)."""
        infos, aux_terms = [], []
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache.blocks[i]
            # Ask the config, not isinstance: FSDP1 and checkpoint wrappers replace block objects.
            if self.config.is_routed(i):
                x, info, aux = block(x, cos, sin, routing, kv, positions, token_valid)
                infos.append(info)
                aux_terms.append(aux)
            else:
                write = None if kv is None else CacheWrite(kv, n_valid, positions)
                x = block(x, cos, sin, write)
        return x, infos, aux_terms

    # --- export ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Write ``model.safetensors`` (weights) and ``config.json``: loadable with no pickled code."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        safetensors.torch.save_model(self, str(directory / "model.safetensors"))  # handles tied weights

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu") -> "MoDTransformer":
        """Load a folder written by ``save_pretrained`` (or ``eval.py --export``)."""
        directory = Path(directory)
        config = ModelConfig(**json.loads((directory / "config.json").read_text()))
        model = cls(config)
        safetensors.torch.load_model(model, str(directory / "model.safetensors"), device=map_location)
        return model

    # --- incremental decoding -----------------------------------------------------------------------
    def new_cache(self, batch_size: int, device=None) -> ModelCache:
        """Empty KV caches for ``batch_size`` rows, room for ``max_seq_len`` tokens per row."""
        return ModelCache(self.config.n_layers, batch_size, self.config.max_seq_len, device)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: ModelCache, token_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed new tokens (B, T) through the model with causal routing, extending ``cache``.

        Each row continues where it left off (its own position count). ``token_valid`` (B, T) marks
        the real tokens, which must come first in each row (prompts of different lengths are right-
        padded); padding is neither cached nor counted. Returns (B, T) logits, garbage at padding.
        """
        B, T = idx.shape
        if token_valid is None:
            token_valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        n_new = token_valid.sum(dim=1)
        if int((cache.seen + n_new).max()) > self.config.max_seq_len:
            raise ValueError(f"sequence would exceed max_seq_len={self.config.max_seq_len}")
        positions = cache.seen.unsqueeze(1) + torch.arange(T, device=idx.device)
        cos, sin = rope_tables(self.config, positions)
        x, _, _ = self._trunk(self.embed(idx), cos, sin, "causal", cache, positions, token_valid, n_new)
        cache.seen = cache.seen + n_new
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Union[torch.Tensor, Sequence[Sequence[int]]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eot_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Sample continuations with the KV cache and causal routing.

        ``idx`` is a (B, T) tensor of prompts, or a list of prompts of different lengths.
        ``temperature=0`` is greedy; ``top_k``/``top_p`` filter before sampling. A row stops after it
        emits ``eot_id``. Returns a (B, T + max_new_tokens) tensor for tensor input (rows that
        stopped early are padded with ``eot_id``), a list of 1-D tensors for list input.
        """
        as_list = not isinstance(idx, torch.Tensor)
        device = next(self.parameters()).device
        prompts = [torch.as_tensor(p, dtype=torch.long, device=device).flatten() for p in idx]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        if len(prompts) == 0 or int(lengths.min()) == 0:
            raise ValueError("generate needs at least one prompt, each of at least one token")
        if int(lengths.max()) + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        B = len(prompts)
        batch = torch.zeros(B, int(lengths.max()), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            batch[row, : len(prompt)] = prompt
        token_valid = torch.arange(batch.size(1), device=device) < lengths.unsqueeze(1)

        cache = self.new_cache(B, device)
        logits = self.forward_cached(batch, cache, token_valid)
        last = logits[torch.arange(B, device=device), lengths - 1]
        new_tokens, finished = [], torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(last.float(), temperature, top_k, top_p, generator)
            if eot_id is not None:
                token = torch.where(finished, torch.full_like(token, eot_id), token)
                finished = finished | (token == eot_id)
            new_tokens.append(token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            last = self.forward_cached(token.unsqueeze(1), cache)[:, -1]

        generated = torch.stack(new_tokens, dim=1) if new_tokens else batch.new_zeros(B, 0)
        if as_list:
            outputs = []
            for row, prompt in enumerate(prompts):
                gen = generated[row]
                if eot_id is not None and (gen == eot_id).any():
                    gen = gen[: int((gen == eot_id).nonzero()[0]) + 1]
                outputs.append(torch.cat([prompt, gen]))
            return outputs
        pad = max_new_tokens - generated.size(1)
        if pad:
            generated = torch.cat([generated, generated.new_full((B, pad), eot_id)], dim=1)
        return torch.cat([batch, generated], dim=1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float], generator=None) -> torch.Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else filtered sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (keeps at least one)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
