"""transformers' view of ``MoDTransformer``: the model class of an exported folder's remote code.

``ModLMForCausalLM`` runs modlm's own model (the source files beside this one in the folder), so
``model.generate(...)`` through transformers decodes as ``MoDTransformer.generate`` does: causal
routing, and modlm's KV caches, where a routed block stores, attends over and computes only the
tokens it processes. transformers' generation loop carries that state as ``ModLMCache`` instead of
one of its own ``Cache`` classes (those keep one entry per token in every layer, which is exactly
what a skipped token must not cost), the way models with their own recurrent state plug in.

Greedy decoding gives ``MoDTransformer.generate(..., temperature=0)``'s tokens: the prompts go
through ``prefill`` in one pass, then each new token through ``decode_step``, as there. Left-padded batches
(transformers'
convention) are moved to modlm's real-tokens-first layout for the prompt pass, so each row is
generated as if alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import ModelConfig
from .configuration_modlm import ModLMConfig
from .errors import UserError
from .kv_cache import DecodeState
from .transformer import MoDTransformer

if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:  # older releases pass "past_key_values"
    raise ImportError("this model's code needs transformers >= 5.24: pip install -U transformers")


class ModLMCache:
    """What generation carries between steps: modlm's ``DecodeState`` (a KV cache per block, a
    token count per row, the host-side bound on both)."""

    def __init__(self, state: DecodeState):
        self.state = state


def real_first(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> (B, T) permutation of each row that puts its real tokens first, in
    order: transformers pads on the left, modlm's prompt pass wants padding after the real tokens."""
    return torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices


def unpermute(x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """Undo ``real_first`` on (B, T, ...) values: back to the caller's positions (None: unchanged)."""
    if order is None:
        return x
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.empty_like(x).scatter_(1, index, x)


class ModLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ModLMConfig
    main_input_name = "input_ids"
    _input_embed_layer = "embed"
    _no_split_modules = ["Block", "RoutedBlock", "RoutedAttention", "Recursion"]
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}  # applied only when the config ties them
    # The state cannot be rolled back or reordered: no assisted decoding, no beam search.
    _is_stateful = True
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def __init__(self, config: ModLMConfig):
        super().__init__(config)
        # Rebuilt from plain values: transformers may load the config's module from another copy
        # of config.py than the one model.py imports, and a ModelConfig of that copy is not this one's.
        core = MoDTransformer(ModelConfig.from_hparams(config.to_dict()))
        # The wrapper's modules are the core's own, under the same names: the folder's
        # model.safetensors (modlm's names) loads as it is, and every weight transformers loads,
        # ties or moves is the one the core computes with.
        self.embed, self.blocks, self.norm, self.lm_head = core.embed, core.blocks, core.norm, core.lm_head
        self.__dict__["core"] = core  # a plain attribute: its parameters are already registered above
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: ``MoDTransformer`` initialised its weights (its own scheme) when it built them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes a ModLMCache itself

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[ModLMCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        routing: str = "causal",
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """Logits of ``input_ids`` (B, T); with a cache (``use_cache`` or one passed in), the tokens
        extend it with causal routing and the returned ``cache`` holds them.

        ``attention_mask`` (0 = padding) is read where the sequences start (a new cache or no
        cache): each row's real tokens are run as one sequence of their own. ``labels``: mean
        next-token cross-entropy (``-100`` ignored). ``logits_to_keep``: logits of only the last n
        positions (0: all). ``routing="topk"`` is the training path, without a cache.
        """
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        cached = use_cache or cache is not None
        if routing != "causal" and cached:
            raise UserError("a KV cache decodes with causal routing only (pass use_cache=False for routing='topk')")
        core = self.core
        starting = cache is None
        order = n_real = None
        if starting and attention_mask is not None and not bool(attention_mask.all()):
            order = real_first(attention_mask)
            n_real = attention_mask.sum(dim=1).to(torch.long)
            input_ids = input_ids.gather(1, order)

        if cached:
            if starting:
                cache = ModLMCache(core.new_state(input_ids.size(0), input_ids.device))
            if input_ids.size(1) == 1 and not starting:  # a decoding step: one slot per row
                logits = core.decode_step(input_ids[:, 0], cache.state).unsqueeze(1)
            elif logits_to_keep == 1:  # what generation asks of a prompt: each row's last real token
                logits = core.prefill(input_ids, cache.state, n_real, last_only=True).unsqueeze(1)
            else:
                logits = unpermute(core.prefill(input_ids, cache.state, n_real), order)[
                    :, -logits_to_keep:
                ]  # (-0: all)
        else:
            if order is not None and routing != "causal":
                raise UserError("padded rows need routing='causal' (top-k would rank the padding too)")
            # Padding after a row's real tokens never reaches them (causal attention, per-token
            # decisions), so one pass serves every row.
            logits = unpermute(core(input_ids, routing=routing).logits, order)[:, -logits_to_keep:]

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise UserError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if cached else None)
        return out if return_dict is not False else out.to_tuple()
