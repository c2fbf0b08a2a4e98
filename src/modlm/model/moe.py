"""Mixture of experts: an MLP made of ``n_experts`` expert MLPs and a learned router.

With ``noop_experts`` the router also chooses among experts that do nothing: a token that picks a
no-op expert gets no MLP update from that pick and costs nothing but the router. Every token still
went through attention, so this is the Mixture-of-Depths skip moved inside the MLP: integrated
MoDE. Inside a routed block (``routing.py``) the mixture only sees the tokens the block picked:
staged MoDE.

The routing rule is token-choice top-k (each token picks the ``expert_top_k`` experts with the
largest router probabilities) and not expert-choice: a token's picks depend on that token alone,
so they are causal as they stand, at training and at inference, and no predictor is needed (an
expert-choice mixture would need the same causal fix as MoD's top-k over the sequence).

Two ways to run the picks:

* ``routing="topk"`` (training): each real expert has a fixed number of slots per sequence,
  ``ModelConfig.slots_per_expert``. Picks fill the slots in temporal order (token t's picks before
  token t+1's), so whether a pick is dropped depends only on earlier tokens of its row: the
  training loss stays causal. Tokens are dispatched into an (experts, rows x slots, d) buffer and
  every expert runs one batched matmul on its own slots: static shapes, so the FLOPs are the same
  for every batch and ``FlopCounterMode`` counts exactly ``modlm.flops``' figure on the meta device.
* ``routing="causal"`` (inference): no capacity, nothing dropped (a capacity counted over the
  sequence is not known while decoding). Picks are sorted by expert and each expert multiplies
  exactly the tokens that picked it. A one-token decoding step that may not read its picks on the
  host (under ``torch.compile``, on accelerators) runs every expert on the step's tokens instead
  and weighs each output by its gate, zero where not picked (static shapes, no sync).

Router probabilities weigh each pick's output (a softmax over real and no-op experts, not
renormalised over the picks), which puts the router on the gradient path; the load-balancing loss
(Switch Transformer's ``n_choices * sum_e f_e * P_e``, over real and no-op experts) keeps picks
spread, and in integrated MoDE it holds the no-op share near ``noop_experts / n_choices``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecodePolicy, ModelConfig, Routing
from .mixture import MixtureInfo
from .numerics import full_precision


@dataclass
class ExpertInfo(MixtureInfo):
    """What one mixture-of-experts MLP did in a forward pass (detached tensors for telemetry,
    except ``aux_loss``)."""

    layer: int
    """Index of the block the MLP belongs to (set by the model's loop, as ``RoutingInfo.layer``)."""
    n_experts: int
    """Real experts; expert ids ``>= n_experts`` are no-op experts."""
    n_choices: int
    """Real and no-op experts together: what the router chooses among."""
    expert: torch.Tensor
    """(B, n, expert_top_k) long: the experts each of the MLP's ``n`` input tokens picked."""
    computed: torch.Tensor
    """(B, n, expert_top_k) bool: the picks an expert actually computed (real expert, real token,
    within capacity)."""
    valid: Optional[torch.Tensor]
    """(B, n) bool: the real tokens (padding of ragged or causally routed rows is not); None: all."""
    slots_per_expert: Optional[int]
    """Slots of each real expert per row in training routing; None: no capacity (inference)."""
    load_balance: Optional[torch.Tensor]
    """The unweighted load-balancing loss; None with a KV cache."""
    aux_loss: torch.Tensor
    """Scalar: ``moe_aux_weight * load_balance``, attached to the graph (0 with a KV cache)."""

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """``load_balance``, unweighted, where computed."""
        return {} if self.load_balance is None else {"load_balance": self.load_balance}


class ExpertLinear(nn.Module):
    """``n`` independent linear maps without bias, stacked: ``weight`` is (n, out, in), each slice
    laid out like an ``nn.Linear`` weight."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert e maps ``x[e]``: (n, m, in) -> (n, m, out), one batched matmul."""
        return torch.bmm(x, self.weight.transpose(1, 2))

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on (m, in) tokens."""
        return F.linear(x, self.weight[e])


class MixtureOfExperts(nn.Module):
    """Token-choice top-k mixture of expert MLPs (SwiGLU or GELU, as ``cfg.mlp``), with optional
    no-op experts. Called as ``moe(x, routing, valid, cached, policy)``, it returns ``(update, info)``."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_experts = cfg.n_experts
        self.n_choices = cfg.n_experts + cfg.noop_experts
        self.router = nn.Linear(cfg.d_model, self.n_choices, bias=False)
        self.gated = cfg.mlp == "swiglu"
        self.up = ExpertLinear(cfg.n_experts, cfg.d_model, cfg.mlp_hidden)
        self.gate = ExpertLinear(cfg.n_experts, cfg.d_model, cfg.mlp_hidden) if self.gated else None
        self.down = ExpertLinear(cfg.n_experts, cfg.mlp_hidden, cfg.d_model)

    # --- the experts' MLP, three ways of feeding it --------------------------------------------
    def _mlp(self, x: torch.Tensor, linear: str, *args) -> torch.Tensor:
        """The dense MLP's formula with each matrix applied by ``ExpertLinear.<linear>``."""
        apply = lambda m, v: getattr(m, linear)(*args, v)  # noqa: E731
        if self.gated:
            return apply(self.down, F.silu(apply(self.gate, x)) * apply(self.up, x))
        return apply(self.down, F.gelu(apply(self.up, x)))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities over real and no-op experts, (B, n, n_choices), in fp32."""
        with full_precision(x.device.type):
            return F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing = Routing.TOPK,
        valid: Optional[torch.Tensor] = None,
        cached: bool = False,
        policy: Optional[DecodePolicy] = None,
    ) -> tuple[torch.Tensor, Optional[ExpertInfo]]:
        """The MLP update of (B, n, d) tokens and what was routed.

        ``valid`` (B, n) marks real tokens (padding gets no update and is not counted); ``cached``
        says the call extends a KV cache (no load-balancing loss); ``policy`` is set on a one-token
        decoding step, which reports nothing (``None``), as routed blocks do.
        """
        probs = self.scores(x)
        gate, expert = probs.topk(self.cfg.expert_top_k, dim=-1)  # (B, n, k) each
        real = expert < self.n_experts
        if valid is not None:
            real = real & valid.unsqueeze(-1)
        slots = None
        if routing == Routing.TOPK:
            slots = self.cfg.slots_per_expert(x.size(1))
            y, computed = self._at_capacity(x, expert, gate, real, slots)
        elif policy is not None and not policy.host_decides:
            y, computed = self._every_expert(x, expert, gate, real), real
        else:
            y, computed = self._grouped(x, expert, gate, real), real
        if policy is not None:
            return y, None
        load_balance = None if cached else self._load_balance(probs, expert, valid)
        info = ExpertInfo(
            layer=-1,
            n_experts=self.n_experts,
            n_choices=self.n_choices,
            expert=expert.detach(),
            computed=computed.detach(),
            valid=None if valid is None else valid.detach(),
            slots_per_expert=slots,
            load_balance=None if load_balance is None else load_balance.detach(),
            aux_loss=probs.new_zeros(()) if load_balance is None else self.cfg.moe_aux_weight * load_balance,
        )
        return y, info

    def _at_capacity(self, x, expert, gate, real, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: dispatch picks into ``slots`` slots per expert and row, in temporal order;
        one batched matmul per expert matrix; combine. Returns the update and the computed picks."""
        B, n, k = expert.shape
        d = x.size(-1)
        E = self.n_experts
        picks = expert.reshape(B, n * k)  # token t's picks before token t+1's: earlier tokens first
        counted = real.reshape(B, n * k)
        # Slot of each pick in its expert's queue: how many counted picks of that expert came before.
        one_hot = torch.zeros(B, n * k, self.n_choices, dtype=torch.int32, device=x.device)
        one_hot.scatter_(2, picks.unsqueeze(-1), counted.to(torch.int32).unsqueeze(-1))
        position = (one_hot.cumsum(dim=1) - 1).gather(2, picks.unsqueeze(-1)).squeeze(-1)
        computed = counted & (position < slots)
        # Buffer row of each pick: expert-major, then batch row, then slot; the rest go to one
        # spare row past the end, which no expert reads and whose output is zero.
        spare = E * B * slots
        rows = torch.arange(B, device=x.device).unsqueeze(1)
        where = torch.where(computed, (picks.clamp(max=E - 1) * B + rows) * slots + position, spare).flatten()
        tokens = x.unsqueeze(2).expand(B, n, k, d).reshape(B * n * k, d)
        buffer = x.new_zeros(spare + 1, d).index_add(0, where, tokens)
        out = self._mlp(buffer[:spare].view(E, B * slots, d), "forward")
        out = torch.cat([out.reshape(spare, d), out.new_zeros(1, d)])
        weight = (gate * computed.view(B, n, k)).to(out.dtype)
        y = (out.index_select(0, where).view(B, n, k, d) * weight.unsqueeze(-1)).sum(dim=2)
        return y, computed.view(B, n, k)

    def _grouped(self, x, expert, gate, real) -> torch.Tensor:
        """Inference: sort the real picks by expert; each expert multiplies exactly its tokens."""
        B, n, k = expert.shape
        d = x.size(-1)
        flat = x.reshape(B * n, d)
        chosen = real.flatten().nonzero().squeeze(1)  # pick ids (token * k + choice), host-sized
        experts = expert.flatten()[chosen]
        order = experts.argsort(stable=True)
        chosen, experts = chosen[order], experts[order]
        token = chosen // k
        counts = torch.bincount(experts, minlength=self.n_experts).tolist()
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                outs.append(self._mlp(flat.index_select(0, token[start : start + count]), "one", e))
            start += count
        if not outs:
            return x.new_zeros(x.shape)
        out = torch.cat(outs)
        weighted = out * gate.flatten()[chosen].unsqueeze(-1).to(out.dtype)
        return out.new_zeros(B * n, d).index_add(0, token, weighted).view(B, n, d)

    def _every_expert(self, x, expert, gate, real) -> torch.Tensor:
        """A one-token decoding step with static shapes: every real expert on every token (one batched
        matmul per matrix, each expert's weights read in place), then each token's outputs weighted
        by its gates, 0 for the experts it did not pick (and for no-op and padding picks).

        Why not each pick through its own expert's weights: gathering them copied a (B * k, out, in)
        slice of every expert matrix per step, reading and writing k weight matrices per token where
        this reads each expert's once per step, whatever the batch. The price is
        ``n_experts / expert_top_k`` times the picks' multiplications, which a decoding step, bound
        by reading weights, hardly feels (``bench/moe_decode.py``)."""
        B, n, k = expert.shape
        tokens = x.reshape(1, B * n, -1).expand(self.n_experts, -1, -1)
        out = self._mlp(tokens, "forward")  # (n_experts, B * n, d)
        weight = torch.zeros(B * n, self.n_choices, dtype=out.dtype, device=x.device)
        weight.scatter_add_(1, expert.reshape(B * n, k), (gate * real).to(out.dtype).reshape(B * n, k))
        return torch.einsum("etd,te->td", out, weight[:, : self.n_experts]).view(B, n, -1)

    def _load_balance(self, probs, expert, valid) -> torch.Tensor:
        """``n_choices * sum_e f_e * P_e``: ``f_e`` the share of picks going to expert e (real or
        no-op, before capacity), ``P_e`` its mean router probability, over the real tokens. 1 when
        balanced; its gradient reaches the router through ``P_e``."""
        picked = torch.zeros_like(probs).scatter_(2, expert, 1.0)  # (B, n, n_choices): 1 per pick
        if valid is None:
            f = picked.mean(dim=(0, 1)) / expert.size(-1)
            p = probs.mean(dim=(0, 1))
        else:
            w = valid.to(probs.dtype).unsqueeze(-1)
            n_real = w.sum().clamp(min=1)
            f = (picked * w).sum(dim=(0, 1)) / (n_real * expert.size(-1))
            p = (probs * w).sum(dim=(0, 1)) / n_real
        return self.n_choices * (f * p).sum()
