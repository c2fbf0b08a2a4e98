"""Model configuration: the ``ModelConfig`` dataclass (validated on construction), the routing mode
(``Routing``) and how a decoding step may use the host (``DecodePolicy``).

Every field has a docstring because LightningCLI shows them as ``--model.*`` help, and because a
config is the first thing a researcher reads to know what a checkpoint is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import ClassVar, Literal, Mapping, Optional, Union

import torch

from .errors import UserError


class Routing(str, Enum):
    """Which computation a routed model runs (a ``str`` enum: ``"topk"`` and ``"causal"`` are accepted
    wherever a ``Routing`` is, and compare equal to its members).

    * ``TOPK``: training routing. A routed block processes the ``k`` tokens of each sequence with the
      largest router scores (expert choice over the sequence: non-causal); a mixture of experts gives
      each expert a fixed number of slots per sequence.
    * ``CAUSAL``: inference routing. Every decision is made from the token itself (the router's or the
      predictor's threshold; each expert pick kept), so position t never depends on later tokens. The
      only mode a KV cache decodes with.
    """

    TOPK = "topk"
    CAUSAL = "causal"

    @classmethod
    def of(cls, value: Union["Routing", str]) -> "Routing":
        """``value`` as a ``Routing``; a ``UserError`` naming the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"routing={value!r} is invalid: must be 'topk' or 'causal'") from None


@dataclass(frozen=True)
class DecodePolicy:
    """How a one-token decoding step may use the host: decided once per step by the model and
    passed down to every block (``Positions.policy``).

    On the CPU the routing decisions of a step are already in host memory, so reading them costs
    nothing: a routed block's rows that say no, and experts nobody picked, do no work at all, and
    attention reads only the cache slots filled so far. On an accelerator reading decisions would
    stall the stream once per router per token; there every row runs the block and the updates that
    should not exist are multiplied by 0. Under ``torch.compile`` shapes must not change either:
    attention reads every slot (``STATIC``)."""

    host_decides: bool
    """Read each row's decision on the host and skip the work of rows (and experts) with none."""
    bounded_reads: bool
    """Attention reads only the slots filled so far (a bound the host knows, ``DecodeState.filled``);
    False: every slot, so the step's shapes never change."""

    @classmethod
    def for_device(cls, device: torch.device) -> "DecodePolicy":
        """Eager decoding on ``device``: host decisions on the CPU, static work elsewhere; ``STATIC``
        while ``torch.compile`` traces."""
        if torch.compiler.is_compiling():
            return STATIC
        return cls(host_decides=torch.device(device).type == "cpu", bounded_reads=True)


END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
"""End-of-text tokens of the tokenizers people train with (GPT-2/Qwen/SmolLM and modlm's own BPE,
Llama 3, Llama 2/Mistral, Gemma, chat models), in the order a tokenizer's own is looked for: the
document separator of pretraining comes before a chat end-of-turn. Here, beside the model, because
an export folder needs it as much as the data layer does."""

IGNORE_INDEX = -100
"""A target that carries no loss (``F.cross_entropy``'s default ``ignore_index``, transformers' label
convention): a conversation's prompt tokens and its window's padding. The loss is the mean over the others."""

TOKENIZER_FILE = "tokenizer.json"
"""The name a tokenizer is saved under beside a model (``save_pretrained``, export folders) and in the
data layer's folders (the tokenizer cache, prepared folders)."""

STATIC = DecodePolicy(host_decides=False, bounded_reads=False)
"""The policy of a compiled decoding step (``modlm.model.generate.compile_decode_step``): no host
reads, the same shapes at every step."""


@dataclass
class ModelConfig:
    """Shape and routing of a Mixture-of-Depths decoder-only transformer."""

    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_size",
        "qkv_bias",
        "mlp",
        "mlp_hidden",
        "tie_embeddings",
        "route_every",
        "route_layers",
        "causal_method",
        "predictor_hidden",
        "n_experts",
        "noop_experts",
        "moe_every",
        "recursions",
        "recursion_sharing",
        "recursion_routing",
    )
    """The fields that decide which parameters exist and their shapes (``n_heads`` only splits
    them, but weights trained with other heads compute another function): saved weights load only
    into a model that agrees on all of them. The others (capacity, aux weights, ...) may change
    between a checkpoint and the run that resumes or evaluates it."""

    vocab_size: int = 8192
    """Number of token ids (follows the tokenizer)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks (dense and routed together); with ``recursions > 1``, the blocks a
    token passes when it takes every recursion step."""
    n_heads: int = 8
    """Attention (query) heads per block; without ``head_size``, ``d_model`` must divide evenly; the
    head size must be even (RoPE)."""
    n_kv_heads: Optional[int] = None
    """Key/value heads per block (grouped-query attention: each serves ``n_heads / n_kv_heads``
    query heads, and the KV cache holds only these). None: ``n_heads`` (plain multi-head attention)."""
    head_size: Optional[int] = None
    """Width of one attention head. None: ``d_model // n_heads``. Set by checkpoints whose heads are
    not ``d_model / n_heads`` wide."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2's attention); the output projection
    and every other matrix have none."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (training windows and generation). The training command
    sets it to the data's window length, ``--data.seq_len``, whose default is this one."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """Feed-forward type: gated SiLU (three matrices) or a plain GELU MLP (two)."""
    mlp_hidden: Optional[int] = None
    """Hidden width of the MLP. Default: ``4 * d_model`` for GELU, ``8/3 * d_model`` rounded up to a
    multiple of 64 for SwiGLU (about the same parameter count)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_scaling: Optional[dict] = None
    """Rescaled rotary frequencies, as transformers' ``rope_scaling`` writes them; only Llama 3's
    form is known: ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}`` (wavelengths longer than
    ``original / low_freq_factor`` are divided by ``factor``, shorter than ``original /
    high_freq_factor`` kept, those between interpolated). None: plain RoPE."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    init_std: float = 0.02
    """Standard deviation of the normal init; residual output projections use
    ``init_std / sqrt(2 * n_layers)`` so the residual stream does not grow with depth."""

    # --- Mixture-of-Depths routing -------------------------------------------------------------
    capacity: float = 0.125
    """Fraction of a sequence each routed block processes: ``k = max(1, floor(capacity * T))``
    tokens per sequence (computed with a 1e-6 tolerance so 0.29 * 100 gives 29, not 28)."""
    route_every: int = 2
    """Block ``i`` (0-based) is routed when ``(i + 1) % route_every == 0``: 2 routes every other
    block starting with the second (the paper's best setting), 1 routes every block, 0 gives the
    plain dense baseline with no routers at all. Ignored when ``route_layers`` is given."""
    route_layers: Optional[list[int]] = None
    """The blocks to route, by 0-based index, ascending (e.g. ``[3, 5, 7]``; ``[]``: dense). None:
    ``route_every`` decides."""
    capacities: Optional[list[float]] = None
    """One capacity per routed block, in depth order, each in (0, 1]; None: ``capacity`` for every
    routed block (spread by ``capacity_depth``)."""
    capacity_depth: float = 0.0
    """Deeper routed blocks process fewer tokens: routed block ``j`` of ``n`` gets ``capacity *
    (1 + capacity_depth * (1 - 2 j / (n - 1)))``, a straight line through ``capacity`` at mid-depth
    (so their mean stays ``capacity``); 0: all equal. Ignored when ``capacities`` is given."""
    route_part: Literal["block", "attention"] = "block"
    """What a routed block's router decides for a token: ``block``, whether the token passes through the
    whole block (attention and MLP: Mixture-of-Depths); ``attention``, whether it attends in that block and
    is one of its keys and values (the MLP then runs for every token: the attention-only routing of
    Router-Tuning / MindSkip, for converted pretrained models)."""
    router_weight: Literal["sigmoid", "raw", "2sigmoid"] = "sigmoid"
    """What multiplies a routed block's update: ``sigmoid(r)`` (default, bounded and stable, as in
    most follow-up work), the raw router logit ``r`` (the paper's formulation), or ``2 * sigmoid(r)``,
    which is 1 at ``r = 0``: with zero routers a routed block at capacity 1 computes exactly its
    block, so a pretrained dense model converts without changing its function (the form
    ``MoDTransformer.from_hf`` converts to)."""
    causal_method: Literal["router", "predictor"] = "predictor"
    """How ``routing="causal"`` decides per token: ``router`` trains the router logits with a BCE
    loss toward top-k membership and processes a token iff ``sigmoid(r) > 0.5``; ``predictor``
    trains a small MLP on the stop-gradient router input to predict membership (paper: 97-99%
    accurate) and lets it decide. Both are the paper's methods."""
    router_aux_weight: float = 0.1
    """Weight of the router BCE loss (``causal_method="router"`` only)."""
    predictor_aux_weight: float = 1.0
    """Weight of the predictor BCE loss (``causal_method="predictor"`` only). The predictor sees a
    detached input, so this loss never reaches the language model's weights."""
    predictor_hidden: Optional[int] = None
    """Hidden width of the causal predictor MLP. Default: ``max(16, d_model // 4)``."""
    random_routing: bool = False
    """Control experiment: pick the k tokens uniformly at random instead of by router score
    (the paper found this much worse). The router weight still scales the update."""
    causal_decision: Literal["plain", "calibrated", "controlled"] = "controlled"
    """How causal routing turns a routed block's decision logit (the predictor's, or the router's
    with ``causal_method="router"``) into a yes or a no per token: ``plain``, logit > 0 (sigmoid >
    0.5, what the BCE trained); ``calibrated``, logit > the block's calibrated threshold (a buffer of
    its decision, ``model/decision.py``, fitted so that the share processed on held-out windows is the
    capacity: every checkpoint a run saves is calibrated on its validation windows); ``controlled``, that
    threshold steered along each sequence by an integral controller, so the running share processed
    stays at the capacity whatever the text (sampling, greedy decoding and repetition shift the
    logits): after each token the row's threshold moves by ``budget_gain * (processed - capacity)``.
    Strictly causal in every mode. Training (top-k routing) is the same in every mode."""
    decision_logit: Literal["trained", "standardized_router"] = "trained"
    """What the causal decision thresholds: ``trained``, the logit ``causal_method`` trains (the
    predictor's, or the router's own); ``standardized_router``, the router logit standardized by the
    mean and spread of the router logits of the row so far, ``(r_t - mean_{s<=t} r) / std_{s<=t} r``
    (causal): top-k membership depends on where a token ranks in its sequence, and the router's
    scale drifts from one sequence to the next, which a fixed threshold on the raw logit cannot see."""
    budget_gain: float = 0.8
    """Step of the ``controlled`` decision's threshold per token and unit of share error, in units of
    the block's logit spread (its decision's calibrated ``spread``): after a processed token the threshold rises by
    ``0.8 * (1 - capacity)`` spreads, after a skipped one it falls by ``0.8 * capacity``. Measured on
    the default run: large enough to hold every routed block within 10% of its capacity over 128
    generated tokens, greedy or sampled; larger gains hold the share tighter but follow the logits
    less (lower agreement with top-k)."""

    # --- Mixture of experts (and, with routed blocks or no-op experts, Mixture-of-Depths-and-Experts)
    n_experts: int = 0
    """Experts of each mixture-of-experts MLP (each the shape of the dense MLP); 0: every MLP is
    the dense one. With ``route_every > 0`` the routed blocks' MLPs are mixtures too: staged MoDE."""
    expert_top_k: int = 1
    """Experts (real or no-op) each token picks in a mixture-of-experts MLP: token-choice top-k."""
    capacity_factor: float = 1.25
    """Training slots of each expert per sequence: ``ceil(capacity_factor * n * expert_top_k /
    (n_experts + noop_experts))`` of the ``n`` tokens the MLP sees; picks beyond it are dropped
    (their MLP update is 0). Inference routing keeps every pick. Token-choice recursion's steps have
    slots of the same kind (``token_choice_slots``)."""
    noop_experts: int = 0
    """No-op experts beside the real ones: a token that picks one gets no MLP update from it and
    costs nothing but the router. With ``route_every=0`` this is integrated MoDE."""
    moe_every: int = 1
    """Block ``i`` (0-based) has a mixture-of-experts MLP when ``n_experts > 0`` and
    ``(i + 1) % moe_every == 0``: 1 gives every block one, 2 every other block."""
    moe_aux_weight: float = 0.01
    """Weight of the load-balancing loss (``n_choices * sum_e f_e * P_e`` over real and no-op
    experts: 1 when balanced), averaged over the mixture-of-experts MLPs."""

    # --- Mixture-of-Recursions -------------------------------------------------------------------
    recursions: int = 1
    """N_r, how many times one shared stack of blocks is applied (Mixture-of-Recursions: the same
    weights up to N_r times per token); 1: no recursion, every block has its own weights.
    ``n_layers`` stays the depth of a token that takes every recursion, so a recursive model costs
    what the plain model of ``n_layers`` blocks costs, with the shared blocks' parameters divided by
    N_r. Recursion routing replaces routed blocks: needs ``route_every=0`` and no experts."""
    recursion_sharing: Literal["cycle", "middle_cycle"] = "middle_cycle"
    """Which blocks the recursions share: ``cycle``, all ``n_layers / recursions`` unique blocks form
    the stack applied N_r times; ``middle_cycle``, the first and the last block are unique (every
    token passes each once) and the ``(n_layers - 2) / recursions`` blocks between them form the stack
    (the scheme the paper found best)."""
    recursion_routing: Literal["expert_choice", "token_choice", "dense"] = "expert_choice"
    """How many recursions a token gets: ``expert_choice``, before each recursion step a router picks by
    top-k the tokens that take it, among those that took the step before (hierarchical filtering:
    the k of step r is ``recursion_capacities[r]`` of the sequence), and causal routing decides per
    token as a routed block does (``causal_method``, ``causal_decision``); ``token_choice``, one router
    at the recursion's input gives each token its depth up front (the most probable of 1 .. N_r; that
    probability weighs every step it takes), causal as it is, with a load-balancing loss
    (``recursion_balance_weight``) holding the depths near uniform; ``dense``, every token takes every
    recursion (the recursive baseline: no routers)."""
    recursion_kv: Literal["recursion_wise", "shared"] = "recursion_wise"
    """Keys and values of the shared stack: ``recursion_wise``, each recursion step computes its own
    for the tokens it processes, attends over only those and caches only those (a step's KV cache
    holds exactly its tokens); ``shared`` (recursive KV sharing), the first step's keys and values
    are reused by every later step, whose queries attend over all the tokens the first step
    processed (causally) and which compute and cache no keys or values of their own: less compute
    and one step's caches instead of N_r, at the cost of later steps seeing first-step keys."""
    recursion_capacities: Optional[list[float]] = None
    """The share of a sequence each recursion step processes, one per step, non-increasing, each in
    (0, 1]. None: ``(N_r - r) / N_r`` for step r = 0 .. N_r - 1 (N_r = 3: 1, 2/3, 1/3). Expert choice
    only (token choice's shares are what its router picks; their balanced values are the default's)."""
    recursion_balance_weight: float = 0.01
    """Weight of token choice's load-balancing loss, ``N_r * sum_d f_d * P_d`` over the depths (1 when
    the router is uniform), in ``aux_loss``."""

    def __post_init__(self) -> None:
        self._validate()
        if self.mlp_hidden is None:
            if self.mlp == "swiglu":
                self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.mlp_hidden = 4 * self.d_model
        if self.predictor_hidden is None:
            self.predictor_hidden = max(16, self.d_model // 4)

    def _validate(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise UserError(f"ModelConfig.{field}={getattr(self, field)!r} is invalid: must be {allowed}")

        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, "a positive integer")
        if self.head_size is None:
            need(self.d_model % self.n_heads == 0, "n_heads", f"a divisor of d_model={self.d_model}")
            need((self.d_model // self.n_heads) % 2 == 0, "n_heads", "such that d_model / n_heads is even (RoPE)")
        else:
            need(
                isinstance(self.head_size, int) and self.head_size > 0 and self.head_size % 2 == 0,
                "head_size",
                "a positive even integer (RoPE) or None",
            )
        need(
            self.n_kv_heads is None
            or (isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0),
            "n_kv_heads",
            f"None or a positive divisor of n_heads={self.n_heads}",
        )
        need(isinstance(self.qkv_bias, bool), "qkv_bias", "true or false")
        need(
            self.rope_scaling is None or _valid_rope_scaling(self.rope_scaling),
            "rope_scaling",
            "None or {'rope_type': 'llama3', 'factor': > 0, 'low_freq_factor': > 0, 'high_freq_factor': > "
            "low_freq_factor, 'original_max_position_embeddings': a positive integer}",
        )
        need(self.mlp in ("swiglu", "gelu"), "mlp", "'swiglu' or 'gelu'")
        need(
            self.mlp_hidden is None or (isinstance(self.mlp_hidden, int) and self.mlp_hidden > 0),
            "mlp_hidden",
            "a positive integer or None",
        )
        need(self.rope_theta > 0, "rope_theta", "> 0")
        need(self.norm_eps > 0, "norm_eps", "> 0")
        need(self.init_std > 0, "init_std", "> 0")
        need(isinstance(self.capacity, (int, float)) and 0 < self.capacity <= 1, "capacity", "in (0, 1]")
        need(isinstance(self.route_every, int) and self.route_every >= 0, "route_every", "an integer >= 0 (0 = dense)")
        need(self.route_every <= self.n_layers, "route_every", f"<= n_layers={self.n_layers}")
        need(
            self.route_layers is None
            or (
                isinstance(self.route_layers, (list, tuple))
                and all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.route_layers)
                and list(self.route_layers) == sorted(set(self.route_layers))
            ),
            "route_layers",
            f"None or distinct block indices in [0, {self.n_layers}), ascending",
        )
        n_routed = len(self.routed_layers)
        need(
            self.capacities is None
            or (
                isinstance(self.capacities, (list, tuple))
                and len(self.capacities) == n_routed
                and all(isinstance(c, (int, float)) and 0 < c <= 1 for c in self.capacities)
            ),
            "capacities",
            f"None or one value in (0, 1] per routed block ({n_routed})",
        )
        need(
            isinstance(self.capacity_depth, (int, float)) and 0 <= self.capacity_depth < 1,
            "capacity_depth",
            "in [0, 1)",
        )
        if self.capacities is None and isinstance(self.capacity, (int, float)) and 0 < self.capacity <= 1:
            need(
                all(c <= 1 for c in self.layer_capacities),
                "capacity_depth",
                f"small enough that no routed block's capacity exceeds 1 (capacity={self.capacity})",
            )
        need(self.route_part in ("block", "attention"), "route_part", "'block' or 'attention'")
        need(self.router_weight in ("sigmoid", "raw", "2sigmoid"), "router_weight", "'sigmoid', 'raw' or '2sigmoid'")
        need(self.causal_method in ("router", "predictor"), "causal_method", "'router' or 'predictor'")
        need(self.router_aux_weight >= 0, "router_aux_weight", ">= 0")
        need(self.predictor_aux_weight >= 0, "predictor_aux_weight", ">= 0")
        need(
            self.predictor_hidden is None or (isinstance(self.predictor_hidden, int) and self.predictor_hidden > 0),
            "predictor_hidden",
            "a positive integer or None",
        )
        need(
            self.causal_decision in ("plain", "calibrated", "controlled"),
            "causal_decision",
            "'plain', 'calibrated' or 'controlled'",
        )
        need(
            self.decision_logit in ("trained", "standardized_router"),
            "decision_logit",
            "'trained' or 'standardized_router'",
        )
        self._validate_recursion(need)
        need(isinstance(self.budget_gain, (int, float)) and self.budget_gain >= 0, "budget_gain", ">= 0")
        need(isinstance(self.n_experts, int) and self.n_experts >= 0, "n_experts", "an integer >= 0 (0 = no experts)")
        need(isinstance(self.noop_experts, int) and self.noop_experts >= 0, "noop_experts", "an integer >= 0")
        need(self.noop_experts == 0 or self.n_experts > 0, "noop_experts", "0 when n_experts is 0")
        need(
            isinstance(self.expert_top_k, int) and 1 <= self.expert_top_k <= max(1, self.n_experts + self.noop_experts),
            "expert_top_k",
            f"an integer in [1, n_experts + noop_experts = {self.n_experts + self.noop_experts}]",
        )
        need(isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0, "capacity_factor", "> 0")
        need(
            isinstance(self.moe_every, int) and 1 <= self.moe_every <= self.n_layers,
            "moe_every",
            f"an integer in [1, n_layers={self.n_layers}]",
        )
        need(self.moe_aux_weight >= 0, "moe_aux_weight", ">= 0")

    def _validate_recursion(self, need) -> None:
        need(
            isinstance(self.recursions, int) and self.recursions >= 1,
            "recursions",
            "an integer >= 1 (1 = no recursion)",
        )
        need(self.recursion_sharing in ("cycle", "middle_cycle"), "recursion_sharing", "'cycle' or 'middle_cycle'")
        need(
            self.recursion_routing in ("expert_choice", "token_choice", "dense"),
            "recursion_routing",
            "'expert_choice', 'token_choice' or 'dense'",
        )
        need(
            isinstance(self.recursion_balance_weight, (int, float)) and self.recursion_balance_weight >= 0,
            "recursion_balance_weight",
            ">= 0",
        )
        need(self.recursion_kv in ("recursion_wise", "shared"), "recursion_kv", "'recursion_wise' or 'shared'")
        if self.recursions == 1:  # a recursion knob set without a recursion would do nothing: refuse it
            base = "(a Mixture-of-Recursions knob: stack it on configs/mor.yaml)"
            need(self.recursion_capacities is None, "recursion_capacities", f"None when recursions is 1 {base}")
            need(self.recursion_kv == "recursion_wise", "recursion_kv", f"'recursion_wise' when recursions is 1 {base}")
            need(
                self.recursion_routing == "expert_choice",
                "recursion_routing",
                f"'expert_choice' (the default) when recursions is 1 {base}",
            )
            return
        n = self.recursions
        if self.recursion_sharing == "cycle":
            need(self.n_layers % n == 0, "n_layers", f"a multiple of recursions={n} (cycle sharing)")
        else:
            need(
                self.n_layers > 2 and (self.n_layers - 2) % n == 0,
                "n_layers",
                f"2 plus a positive multiple of recursions={n} (middle_cycle sharing: first and last block unique)",
            )
        need(
            self.route_every == 0 and not self.route_layers,
            "route_every",
            "0 (and route_layers None or []) when recursions > 1: recursion routing replaces routed blocks",
        )
        need(self.n_experts == 0, "n_experts", "0 when recursions > 1")
        capacities = self.recursion_capacities
        need(
            capacities is None or self.recursion_routing == "expert_choice",
            "recursion_capacities",
            "None unless recursion_routing is 'expert_choice' (the router decides token choice's shares)",
        )
        need(
            capacities is None
            or (
                isinstance(capacities, (list, tuple))
                and len(capacities) == n
                and all(isinstance(c, (int, float)) and 0 < c <= 1 for c in capacities)
                and all(a >= b for a, b in zip(capacities, capacities[1:]))
            ),
            "recursion_capacities",
            f"None or {n} non-increasing values in (0, 1], one per recursion step",
        )

    # --- derived quantities ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``head_size``, or ``d_model // n_heads``."""
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block: ``n_kv_heads``, or ``n_heads``."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def is_routed(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) is wrapped by a router."""
        if self.route_layers is not None:
            return layer in self.route_layers
        return self.route_every > 0 and (layer + 1) % self.route_every == 0

    @property
    def routed_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_routed(i)]

    @property
    def n_deciders(self) -> int:
        """Routers with a causal decision (and a calibrated threshold): routed blocks, routed recursion steps."""
        return len(self.routed_layers) + len(self.routed_steps)

    @property
    def layer_capacities(self) -> list[float]:
        """The capacity of each routed block, in depth order (``capacities``, or ``capacity``
        spread by ``capacity_depth``)."""
        if self.capacities is not None:
            return [float(c) for c in self.capacities]
        n = len(self.routed_layers)
        if n <= 1 or not self.capacity_depth:
            return [float(self.capacity)] * n
        return [self.capacity * (1 + self.capacity_depth * (1 - 2 * j / (n - 1))) for j in range(n)]

    def capacity_of(self, layer: int) -> float:
        """The capacity of routed block ``layer`` (its block index)."""
        return self.layer_capacities[self.routed_layers.index(layer)]

    @property
    def recursive(self) -> bool:
        """Whether a shared stack of blocks is applied more than once (``recursions > 1``)."""
        return self.recursions > 1

    @property
    def unique_before(self) -> int:
        """Unique blocks before the shared stack (1 with ``middle_cycle`` sharing, else 0); as many after it."""
        return 1 if self.recursive and self.recursion_sharing == "middle_cycle" else 0

    @property
    def stack_layers(self) -> int:
        """Blocks in the shared stack one recursion step applies (0 without recursion)."""
        return (self.n_layers - 2 * self.unique_before) // self.recursions if self.recursive else 0

    @property
    def step_capacities(self) -> list[float]:
        """The share of a sequence each recursion step processes (``recursion_capacities``, or
        ``(N_r - r) / N_r``, also token choice's shares when its router is balanced); every step 1 with
        ``recursion_routing="dense"``; empty without recursion."""
        if not self.recursive:
            return []
        if self.recursion_routing == "dense":
            return [1.0] * self.recursions
        if self.recursion_capacities is not None:
            return [float(c) for c in self.recursion_capacities]
        return [(self.recursions - r) / self.recursions for r in range(self.recursions)]

    @property
    def routes_recursion(self) -> bool:
        """Whether a router decides how many recursion steps a token takes (expert or token choice)."""
        return self.recursive and self.recursion_routing != "dense"

    @property
    def routed_steps(self) -> list[int]:
        """The recursion steps a router decides, by 0-based index (every step with expert choice)."""
        return list(range(self.recursions)) if self.recursive and self.recursion_routing == "expert_choice" else []

    def has_experts(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has a mixture-of-experts MLP."""
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def expert_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.has_experts(i)]

    @property
    def routes_tokens(self) -> bool:
        """Whether any router decides per token (routed blocks, expert routers, recursion routers): then
        training routing (top-k, expert capacity, token choice's slots) and causal routing are different
        computations."""
        return bool(self.routed_layers or self.expert_layers or self.routes_recursion)

    def slots_per_expert(self, n_tokens: int) -> int:
        """Training slots of each real expert for one sequence of ``n_tokens`` MLP inputs: its
        balanced share of the ``n_tokens * expert_top_k`` picks times ``capacity_factor``, at least
        1 and at most ``n_tokens`` (a token picks an expert at most once)."""
        share = n_tokens * self.expert_top_k / (self.n_experts + self.noop_experts)
        return max(1, min(n_tokens, math.ceil(self.capacity_factor * share - 1e-6)))

    def token_choice_slots(self, seq_len: int, step: int) -> int:
        """Training slots of token-choice recursion step ``step`` per sequence of ``seq_len`` tokens: its
        balanced share of the sequence (``step_capacities``) times ``capacity_factor``, at least 1 and at
        most ``seq_len``."""
        share = self.step_capacities[step] * seq_len
        return max(1, min(seq_len, math.ceil(self.capacity_factor * share - 1e-6)))

    def topk_tokens(self, seq_len: int, capacity: Optional[float] = None) -> int:
        """``k``: tokens per sequence a routed block processes in top-k routing (``capacity`` of
        ``seq_len``; another capacity when given, e.g. a routed block's own)."""
        capacity = self.capacity if capacity is None else capacity
        return max(1, min(seq_len, int(math.floor(capacity * seq_len + 1e-6))))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> "ModelConfig":
        """Rebuild from saved hyperparameters (a checkpoint's ``hyper_parameters``, an export's
        ``config.json``), ignoring keys that are not fields (optimizer settings, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hparams.items() if k in names})

    @classmethod
    def tensor_differences(cls, saved: Mapping, wanted: Mapping) -> list[str]:
        """The tensor-deciding fields set in both mappings to different values, as
        ``"name=saved in the checkpoint, wanted in this run"`` (a field this run leaves unset or
        ``None`` is not compared)."""
        return [
            f"{name}={saved[name]!r} in the checkpoint, {wanted[name]!r} in this run"
            for name in cls.TENSOR_FIELDS
            if name in saved and wanted.get(name) is not None and saved[name] != wanted[name]
        ]


ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The keys of ``ModelConfig.rope_scaling`` (Llama 3's rescaled frequencies)."""


def _valid_rope_scaling(scaling) -> bool:
    if not isinstance(scaling, Mapping) or set(scaling) != set(ROPE_SCALING_KEYS) or scaling["rope_type"] != "llama3":
        return False
    numbers = [scaling[k] for k in ROPE_SCALING_KEYS[1:]]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return False
    factor, low, high, original = numbers
    return factor > 0 and low > 0 and high > low and isinstance(original, int) and original > 0
