"""The Mixture-of-Depths transformer, top to bottom.

token ids -> embedding -> blocks (dense ``Block`` or ``RoutedBlock``) -> final RMSNorm -> LM head.
With ``route_every=0`` every block is dense and this is a plain pre-norm RoPE transformer: the
baseline MoD is compared against, built by the same code. With ``n_experts > 0`` the MLPs of the
blocks ``ModelConfig.has_experts`` names are mixtures of experts (``moe.py``): an MoE model, or
with routed blocks or no-op experts, Mixture-of-Depths-and-Experts (staged or integrated).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .config import ModelConfig
from .generate import generate
from .kv_cache import DecodeState, KVCache
from .layers import Block, Positions, init_weights, rope_tables
from .moe import ExpertInfo
from .routing import RoutedBlock, Routing, RoutingInfo


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, vocab_size) next-token logits."""
    aux_loss: torch.Tensor
    """Scalar: the routing auxiliary losses, already weighted: the mean over routed blocks plus the
    mean load-balancing loss over mixture-of-experts MLPs (0 for dense)."""
    routing: list[RoutingInfo] = field(default_factory=list)
    """One entry per routed block, in depth order."""
    experts: list[ExpertInfo] = field(default_factory=list)
    """One entry per mixture-of-experts MLP that ran, in depth order (a routed block's too)."""
    loss: Optional[torch.Tensor] = None
    """Mean next-token cross-entropy when ``targets`` were given (``aux_loss`` not included)."""


MODEL_CARD = """---
{{ card_data }}
---

A Mixture-of-Depths transformer language model ([Raposo et al. 2024]({{ paper_url }})) saved by modlm.

- modlm: `MoDTransformer.from_pretrained(FOLDER_OR_REPO)`
- transformers, for a folder written by `eval.py --export`:
  `AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO, trust_remote_code=True)` and
  `AutoTokenizer.from_pretrained(FOLDER_OR_REPO)`
"""


class MoDTransformer(
    nn.Module, PyTorchModelHubMixin, library_name="modlm", tags=["mixture-of-depths"],
    paper_url="https://arxiv.org/abs/2404.02258", model_card_template=MODEL_CARD,
):
    """The model. ``save_pretrained(folder)`` / ``from_pretrained(folder or Hub id)`` /
    ``push_to_hub(repo)`` (huggingface_hub's mixin) keep it as ``model.safetensors`` and a
    ``config.json`` of the ``ModelConfig`` fields: no pickled code is written or read."""

    def __init__(self, config: Union[ModelConfig, Mapping]):
        super().__init__()
        # The mixin hands a loaded config.json over as a plain dict (it may hold other tools' keys).
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_hparams(config)
        self.config = config
        self._hub_mixin_config = config  # what save_pretrained writes: the fields, nothing else
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            RoutedBlock(config, i) if config.is_routed(i) else Block(config, i) for i in range(config.n_layers)
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
        x = self.embed(idx)
        where = Positions.sequence(self.config, T, idx.device)
        infos, experts = [], []
        for block in self.blocks:
            x, info = block(x, where, routing)
            if isinstance(info, RoutingInfo):
                infos.append(info)
                info = info.experts
            if info is not None:
                experts.append(info)
        logits = self.lm_head(self.norm(x))
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        for parts in (infos, experts):
            if parts:
                aux_loss = aux_loss + torch.stack([part.aux_loss for part in parts]).mean()

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return ModelOutput(logits=logits, aux_loss=aux_loss, routing=infos, experts=experts, loss=loss)

    # --- saving (the rest comes from PyTorchModelHubMixin) ---------------------------------------------
    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        # A local folder is read here because the mixin's own loader announces it on stdout (eval.py's
        # report); strict by default: a weight missing from the file is an error, not a random tensor.
        if os.path.isdir(model_id):
            model = cls(kwargs["config"])
            return cls._load_as_safetensor(model, os.path.join(model_id, "model.safetensors"), map_location, strict)
        return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)

    # --- incremental decoding -----------------------------------------------------------------------
    def new_cache(self, batch_size: int, device=None, dtype=None) -> DecodeState:
        """An empty decoding state for ``batch_size`` rows, room for ``max_seq_len`` tokens per row.

        ``dtype`` is the cached keys' dtype: by default what the attention will produce, the
        autocast dtype where autocast is on (create the state inside the same autocast context as
        the decoding), else the weights' dtype.
        """
        cfg = self.config
        weight = self.embed.weight
        device = weight.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        caches = [KVCache(batch_size, cfg.max_seq_len, cfg.n_heads, cfg.head_dim, device, dtype) for _ in self.blocks]
        return DecodeState(caches, rope_tables(cfg, torch.arange(cfg.max_seq_len, device=device)))

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: DecodeState, token_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed new tokens (B, T) through the model with causal routing, extending ``cache``.

        Each row continues where it left off (its own position count). ``token_valid`` (B, T) marks
        the real tokens, which must come first in each row (prompts of different lengths are right-
        padded); padding is neither cached nor counted. Returns (B, T) logits, garbage at padding.
        """
        B, T = idx.shape
        n_real = None if token_valid is None else token_valid.sum(dim=1)
        n_new = T if n_real is None else n_real
        if int((cache.seen + n_new).max()) > self.config.max_seq_len:
            raise ValueError(f"sequence would exceed max_seq_len={self.config.max_seq_len}")
        return self.lm_head(self.norm(self.extend(idx, cache, n_real)))

    def decode_step(self, token: torch.Tensor, state: DecodeState, span: Optional[int] = None) -> torch.Tensor:
        """The hot loop of generation: one new token per row (B,) -> next-token logits (B, V).

        Static shapes, no host synchronisation (on the CPU, routed blocks read their decisions to
        skip work), so ``torch.compile`` can capture it whole. ``span`` optionally bounds, from the
        host, the cache slots attention reads (``Positions.span``). The caller keeps every row
        within ``max_seq_len``.
        """
        return self.lm_head(self.norm(self.extend(token.unsqueeze(1), state, span=span)))[:, 0]

    def extend(self, idx: torch.Tensor, state: DecodeState, n_real: Optional[torch.Tensor] = None,
               span: Optional[int] = None) -> torch.Tensor:
        """Run new tokens (B, T), the first ``n_real`` of each row real, through every block with its
        cache; returns the final residual stream (B, T, d) and advances ``state``."""
        T = idx.size(1)
        index = state.seen.unsqueeze(1)
        if T > 1:
            index = index + torch.arange(T, device=idx.device)
        where = Positions(state.cos[index], state.sin[index], index, n_real, span=span)
        x = self.embed(idx)
        for block, cache in zip(self.blocks, state.blocks):
            x, _ = block(x, where, "causal", cache)
        state.seen += T if n_real is None else n_real
        return x

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
        """Sample continuations with the KV cache and causal routing: ``modlm.generate.generate``."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eot_id=eot_id, generator=generator)
