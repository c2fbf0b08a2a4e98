"""The Mixture-of-Depths transformer, top to bottom.

token ids -> embedding -> blocks (dense ``Block``, ``RoutedBlock`` or ``RoutedAttention``) -> final
RMSNorm -> LM head.
With ``route_every=0`` every block is dense and this is a plain pre-norm RoPE transformer: the
baseline MoD is compared against, built by the same code. With ``n_experts > 0`` the MLPs of the
blocks ``ModelConfig.has_experts`` names are mixtures of experts (``moe.py``): an MoE model, or
with routed blocks or no-op experts, Mixture-of-Depths-and-Experts (staged or integrated). With
``recursions > 1`` one shared stack of blocks is applied that many times (``recursion.py``):
Mixture-of-Recursions, or with ``recursion_routing="dense"`` its recursive baseline.

Three ways to run it, and this class is the only owner of the output head (``logits``) and of the
context-length check (``check_length``) for all of them:

* ``forward(idx, routing)``: whole sequences, top-k (training) or causal routing (evaluation);
* ``prefill(idx, state)``: prompts into a ``DecodeState`` (causal routing, KV caches);
* ``decode_step(token, state)``: one new token per row, the hot loop of generation.

``generate`` (``generate.py``) samples with the last two; the transformers export
(``modeling_modlm.py``) calls the same three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .chat_template import read_chat_template, write_chat_template
from .config import TOKENIZER_FILE, DecodePolicy, ModelConfig, Routing
from .decision import calibrating
from .errors import UserError
from .generate import generate as _generate
from .hf_format import load_hf, upload_folder, write_folder
from .kv_cache import DecodeState
from .layers import Block, init_weights
from .mixture import MixtureInfo, weighted_aux_loss
from .moe import ExpertInfo
from .positions import Positions, rope_tables
from .recursion import Recursion, RecursionInfo
from .routing import RoutedAttention, RoutedBlock, Router, RoutingInfo
from .version import check_format, folder_record, record_of_folder


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(B, T, vocab_size) next-token logits."""
    aux_loss: torch.Tensor
    """Scalar: the routing auxiliary losses, already weighted: for each kind of mixture the mean of its
    losses, summed over the kinds (0 for dense)."""
    mixtures: list[MixtureInfo] = field(default_factory=list)
    """What every mixture did (routed blocks, mixture-of-experts MLPs, a recursion), in depth order
    (``mixture.py``); the three views below pick out each kind."""
    loss: Optional[torch.Tensor] = None
    """Mean next-token cross-entropy when ``targets`` were given (``aux_loss`` not included)."""

    @property
    def routing(self) -> list[RoutingInfo]:
        """One entry per routed block, in depth order."""
        return [m for m in self.mixtures if isinstance(m, RoutingInfo)]

    @property
    def experts(self) -> list[ExpertInfo]:
        """One entry per mixture-of-experts MLP that ran, in depth order (a routed block's too)."""
        return [m for m in self.mixtures if isinstance(m, ExpertInfo)]

    @property
    def recursion(self) -> Optional[RecursionInfo]:
        """What the routers of a Mixture-of-Recursions did, one entry per recursion step (None without
        recursion routing)."""
        return next((m for m in self.mixtures if isinstance(m, RecursionInfo)), None)


MODEL_CARD = """---
{{ card_data }}
---

A Mixture-of-Depths transformer language model ([Raposo et al. 2024]({{ paper_url }})) saved by modlm.
{{ details | default("", true) }}
- modlm: `MoDTransformer.from_pretrained(FOLDER_OR_REPO)`; `modlm-generate FOLDER_OR_REPO "a prompt"`
- transformers, for a folder written by `eval.py --export`:
  `AutoModelForCausalLM.from_pretrained(FOLDER_OR_REPO, trust_remote_code=True)` and
  `AutoTokenizer.from_pretrained(FOLDER_OR_REPO)`
"""


class MoDTransformer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="modlm",
    tags=["mixture-of-depths"],
    paper_url="https://arxiv.org/abs/2404.02258",
    model_card_template=MODEL_CARD,
):
    """The model. ``save_pretrained(folder)`` / ``from_pretrained(folder or Hub id)`` /
    ``push_to_hub(repo)`` (huggingface_hub's mixin) keep it as ``model.safetensors``, a
    ``config.json`` of the ``ModelConfig`` fields and, when the model knows them (``tokenizer_json``,
    ``chat_template``: loaded from a folder that has them, or set by whoever trained it), its
    ``tokenizer.json`` and ``chat_template.jinja``: no pickled code is written or read."""

    def __init__(self, config: Union[ModelConfig, Mapping]):
        super().__init__()
        # The mixin hands a loaded config.json over as a plain dict (it may hold other tools' keys).
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_hparams(config)
        self.config = config
        self._hub_mixin_config = config  # what save_pretrained writes: the fields, nothing else
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(build_blocks(config))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.tokenizer_json: Optional[str] = None
        """The ``tokenizer.json`` text of the tokenizer this model reads, when known: saved and pushed with it."""
        self.chat_template: Optional[str] = None
        """The chat template (jinja text) its conversations are rendered with, when known (read from the folder
        or checkpoint it came from, or set by whoever trained it): saved, exported and pushed beside its
        tokenizer (``chat_template.jinja``). Rendering is ``modlm.data.chat``'s."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)
        for router in self.routers():
            router.reset_parameters()

    def reconfigured(self, **changes) -> "MoDTransformer":
        """This model under a config that differs by ``changes`` in fields that decide no tensor (the causal
        decision, capacities, the router weight...): a new model sharing this one's weights and buffers, its
        tokenizer, its mode. The way to evaluate one model several ways: a model's config is never written."""
        tensors = [name for name in changes if name in ModelConfig.TENSOR_FIELDS]
        if tensors:
            raise ValueError(f"reconfigured cannot change fields that decide tensors: {tensors}")
        with torch.device("meta"):  # built without drawing an init: the weights are this model's
            model = type(self)(replace(self.config, **changes))
        model.load_state_dict(self.state_dict(), assign=True)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.tokenizer_json = self.tokenizer_json
        return model.train(self.training)

    def num_params(self) -> int:
        """Parameters, tied ones counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, routing: Union[Routing, str] = Routing.TOPK, targets: Optional[torch.Tensor] = None
    ) -> ModelOutput:
        """Run (B, T) token ids through the model.

        ``routing="topk"`` is the training path (non-causal expert-choice top-k per sequence);
        ``routing="causal"`` makes every routing decision from the token itself (router threshold or
        predictor), so position t never depends on later tokens. Dense models ignore ``routing``.
        """
        routing = Routing.of(routing)
        B, T = idx.shape
        self.check_length(T, f"sequence length {T}")
        x = self.embed(idx)
        where = Positions.sequence(self.config, T, idx.device)
        mixtures: list[MixtureInfo] = []
        for layer, block in enumerate(self.blocks):
            x, info = block(x, where, routing)
            if info is not None:
                for part in info.parts():
                    part.layer = layer
                    mixtures.append(part)
        logits = self.logits(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return ModelOutput(logits=logits, aux_loss=weighted_aux_loss(mixtures, logits), mixtures=mixtures, loss=loss)

    @torch.no_grad()
    def calibrate(self, idx: torch.Tensor) -> list[float]:
        """Fit every router's causal decision (its ``threshold`` and ``spread`` buffers, ``decision.py``) so
        that, on the held-out windows ``idx`` (N, T), causal routing processes exactly its share: the (1 -
        share) quantile of its decision logits. One causal pass, through ``forward`` (so it runs sharded
        too): in depth order, each decision is fitted on the inputs the calibrated ones before it produce.
        The config is not touched. Returns the thresholds (nothing to calibrate: an empty list)."""
        decisions = [router.decision for router in self.routers() if router.decision.calibrates]
        if not decisions:
            return []
        was_training = self.training
        self.eval()
        try:
            with calibrating(decisions):
                self(idx, routing=Routing.CAUSAL)
        finally:
            self.train(was_training)
        return [float(decision.threshold) for decision in decisions]

    def routers(self) -> list[Router]:
        """Every router, in depth order: the routed blocks', or a recursion's steps' in step order."""
        return [module for module in self.modules() if isinstance(module, Router)]

    def routed_blocks(self) -> list[RoutedBlock]:
        """The blocks behind a router (whole or attention only), in depth order: what a capacity schedule sets."""
        return [block for block in self.blocks if isinstance(block, RoutedBlock)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head: final RMSNorm, then the LM head, on (..., d) residual streams."""
        return self.lm_head(self.norm(hidden))

    def check_length(self, length: int, what: str) -> None:
        """Refuse (``UserError``) a sequence of ``length`` tokens longer than ``max_seq_len``;
        ``what`` names it in the message."""
        if length > self.config.max_seq_len:
            raise UserError(f"{what} exceeds max_seq_len={self.config.max_seq_len}")

    # --- saving (the rest comes from PyTorchModelHubMixin) ---------------------------------------------
    def save_pretrained(self, save_directory, *, config=None, **kwargs):
        """huggingface_hub's ``save_pretrained``, its ``config.json`` the config's fields (or ``config``) and the
        modlm version and format that wrote it (``version.py``), which ``from_pretrained`` checks."""
        config = {**(config or self.config.to_dict()), **folder_record()}
        return super().save_pretrained(save_directory, config=config, **kwargs)

    def _save_pretrained(self, save_directory) -> None:
        super()._save_pretrained(save_directory)
        if self.tokenizer_json is not None:
            with open(os.path.join(save_directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
                f.write(self.tokenizer_json)
        write_chat_template(save_directory, self.chat_template)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        # A local folder is read here because the mixin's own loader announces it on stdout (eval.py's
        # report); strict by default: a weight missing from the file is an error, not a random tensor.
        check_format(record_of_folder(kwargs["config"]), model_id)
        if os.path.isdir(model_id):
            model = cls(kwargs["config"])
            model = cls._load_as_safetensor(model, os.path.join(model_id, "model.safetensors"), map_location, strict)
            tokenizer = os.path.join(model_id, TOKENIZER_FILE)
            if os.path.isfile(tokenizer):
                with open(tokenizer, encoding="utf-8") as f:
                    model.tokenizer_json = f.read()
            model.chat_template = read_chat_template(model_id)
            return model
        return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)

    # --- transformers folders (``hf_format.py``: the state-dict adapter) ---------------------------------
    @classmethod
    def from_hf(cls, path_or_id: Union[str, os.PathLike], **overrides) -> "MoDTransformer":
        """A pretrained Llama-family model (``LlamaForCausalLM``, ``MistralForCausalLM`` without a
        sliding window in the context, ``Qwen2ForCausalLM``) from a transformers folder with
        safetensors weights, or a Hub id (local cache first), in eval mode, with the folder's
        ``tokenizer.json``.

        ``overrides`` are ``ModelConfig`` fields other than the architecture's: ``route_every=2,
        capacity=0.125`` (or ``route_layers``, ``capacities``, ``capacity_depth``) converts it to
        Mixture-of-Depths. Routers start at zero and the router weight is ``2 * sigmoid(r)`` unless
        ``router_weight`` says otherwise, so at capacity 1 the converted model computes the
        pretrained function exactly. ``max_seq_len`` defaults to the checkpoint's context, at most
        ``modlm.model.hf_format.MAX_CONTEXT`` (KV caches are allocated for it). Anything modlm does not compute
        (another architecture, activation or RoPE type, a sliding window, experts, biases where
        Llama has none) is refused, naming the field (``modlm.model.hf_format.UnsupportedCheckpoint``)."""
        return load_hf(cls, path_or_id, **overrides)

    def to_hf(self, folder: Union[str, os.PathLike], tokenizer=None, card: str = "") -> str:
        """Write a folder transformers loads: a dense model (no routed blocks, no experts, SwiGLU) as a
        standard ``LlamaForCausalLM`` folder (``Qwen2ForCausalLM`` with query/key/value biases),
        loaded with no remote code; any other model as modlm's remote-code folder
        (``trust_remote_code=True``). ``tokenizer``: a ``tokenizers.Tokenizer``, a ``tokenizer.json``
        or a folder holding one; default the model's own. ``card``: markdown added to the model
        card. Returns ``"standard"`` or ``"remote-code"``."""
        return write_folder(self, folder, tokenizer, card)

    def push_to_hub(self, repo_id: str, tokenizer=None, card: str = "", private: bool = False) -> str:
        """Upload the folder ``to_hf`` writes to the Hugging Face Hub repository ``repo_id`` (made if it does
        not exist): what transformers loads, as every folder modlm writes. Returns the commit's URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            self.to_hf(scratch, tokenizer, card)
            return upload_folder(scratch, repo_id, private)

    # --- incremental decoding ------------------------------------------------------------------------
    def new_state(self, batch_size: int, device=None, dtype=None) -> DecodeState:
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
        caches = [block.new_cache(batch_size, cfg.max_seq_len, device, dtype) for block in self.blocks]
        return DecodeState(caches, rope_tables(cfg, torch.arange(cfg.max_seq_len, device=device)), batch_size)

    @torch.no_grad()
    def prefill(
        self, idx: torch.Tensor, state: DecodeState, n_real: Optional[torch.Tensor] = None, last_only: bool = False
    ) -> torch.Tensor:
        """Feed new tokens (B, T) through the model with causal routing, extending ``state``.

        Each row continues where it left off (its own token count). ``n_real`` (B,) counts the real
        tokens of each row, which come first (prompts of different lengths are right-padded; None:
        all are real); padding is neither cached nor counted. Returns (B, T, V) logits (garbage at
        padding), or with ``last_only`` the (B, V) logits of each row's last real token. May read
        lengths on the host (a prompt is not the hot loop).
        """
        T = idx.size(1)
        n_new = torch.full_like(state.seen, T) if n_real is None else n_real.to(state.seen.dtype)
        filled = int((state.seen + n_new).max()) if T else state.filled
        self.check_length(filled, f"sequence of {filled} tokens")
        # Padding past the end of the context may index past the rotary table: clamp (it is not cached).
        index = (state.seen.unsqueeze(1) + torch.arange(T, device=idx.device)).clamp(max=self.config.max_seq_len - 1)
        where = Positions(state.cos[index], state.sin[index], index, None if n_real is None else n_new)
        x = self.embed(idx)
        for block, cache in zip(self.blocks, state.caches):
            x, _ = block(x, where, Routing.CAUSAL, cache)
        state.seen += n_new
        state.filled = filled
        if last_only:
            x = x[torch.arange(x.size(0), device=x.device), n_new - 1]
        return self.logits(x)

    @torch.no_grad()
    def decode_step(
        self,
        token: torch.Tensor,
        state: DecodeState,
        policy: Optional[DecodePolicy] = None,
        compute: Optional[Callable] = None,
    ) -> torch.Tensor:
        """The hot loop of generation: one new token per row (B,) -> next-token logits (B, V).

        No host synchronisation. ``policy`` (default: ``DecodePolicy.for_device``) says what the
        step may read on the host. The host-side bookkeeping (the length check, ``state.filled``)
        happens here, around ``decode_compute``, which reads no host value: ``compute`` replaces it
        by a compiled version (``generate.compile_decode_step``), whose shapes never change.
        """
        policy = DecodePolicy.for_device(token.device) if policy is None else policy
        self.check_length(state.filled + 1, f"sequence of {state.filled + 1} tokens")
        span = state.filled + 1 if policy.bounded_reads else None
        logits = (compute or self.decode_compute)(token, state, policy, span)
        state.filled += 1
        return logits

    def decode_compute(
        self, token: torch.Tensor, state: DecodeState, policy: DecodePolicy, span: Optional[int]
    ) -> torch.Tensor:
        """What a decoding step computes: every block on one token per row with its cache (reading
        ``span`` slots, or all), then the head. Call ``decode_step``, which keeps the state's
        host-side bound."""
        index = state.seen.unsqueeze(1)
        where = Positions(state.cos[index], state.sin[index], index, span=span, policy=policy)
        x = self.embed(token.unsqueeze(1))
        for block, cache in zip(self.blocks, state.caches):
            x, _ = block(x, where, Routing.CAUSAL, cache)
        state.seen += 1
        return self.logits(x[:, 0])

    generate = _generate


def build_blocks(cfg: ModelConfig) -> list[nn.Module]:
    """The model's blocks in depth order: each a ``Block`` or a routed one (``RoutedBlock``, or
    ``RoutedAttention`` with ``route_part="attention"``), or with recursion its unique blocks around one
    ``Recursion`` (``recursion_sharing``)."""
    if not cfg.recursive:
        routed = RoutedAttention if cfg.route_part == "attention" else RoutedBlock
        return [routed(cfg, i) if cfg.is_routed(i) else Block(cfg, i) for i in range(cfg.n_layers)]
    if cfg.unique_before:
        return [Block(cfg, 0), Recursion(cfg, 1), Block(cfg, cfg.n_layers - 1)]
    return [Recursion(cfg, 0)]
