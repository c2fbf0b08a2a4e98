"""The causal decision: whether a router's unit processes a token, decided from that token and the ones
before it, never a later one.

Training routes by top-k over the whole sequence, which is not causal. At inference every router decides
per token instead, from a decision logit (the causal predictor's, or the router's own: ``causal_method``),
with one of these rules (``ModelConfig.causal_decision``), each its own class:

* ``Plain``: logit > 0 (sigmoid > 0.5), what the BCE against top-k membership trained;
* ``Calibrated``: logit > the decision's ``threshold``, fitted so that on held-out windows exactly its
  share of tokens is above it;
* ``Controlled``: that threshold steered along each row by an integral controller, so the running share
  processed stays at the share whatever the text (sampling, greedy decoding and repetition shift logits);

and two that read no logit: ``Random`` (the random-routing control) and ``KeepAll`` (a unit whose share is
1: top-k keeps every token it may, so the causal decision does too).

The decision logit is the trained one, or the router logit standardized by the mean and spread of the
row's router logits so far (``decision_logit``): both are functions here.

Calibration (``calibrating``) fits ``threshold`` and ``spread`` (the unit of the controller's gain) on the
logits a causal pass over held-out windows gives: a forward hook on each decision fits it and makes it
decide with the fitted threshold, so one ordinary pass calibrates every decision in depth order, each on
the inputs the calibrated decisions before it produce. The two values are buffers: in ``state_dict``, saved,
sharded, exported and pushed with the weights, loaded by ``load_state_dict``; the model's config is never
written.

What a decision carries along a sequence while decoding (the controller's threshold, the running moments
of the router logits) is a ``DecisionState`` per row, allocated once with the caches and updated in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .config import ModelConfig


class DecisionState:
    """Per row, what a decision carries from one call to the next along a sequence (a prompt, then one
    token per step): the controller's running threshold and the running (count, sum, sum of squares) of
    the router logits. Allocated once for a batch (``CausalDecision.new_state``), updated in place, so a
    compiled decoding step sees the same tensors at every step; ``reset`` starts rows afresh."""

    ROW_BUFFERS = ("threshold", "moments")
    """Per-row tensors, written in place (rows that come and go, ``rows.py``, share them by slicing)."""

    def __init__(self, batch_size: int, start: torch.Tensor, device=None):
        self.start = start.detach().to(device=device, dtype=torch.float32).clone()
        """The threshold a row starts from (the decision's calibrated one), 0-dim."""
        self.threshold = self.start.expand(batch_size).clone()
        """(B,) fp32: each row's running threshold (the ``Controlled`` rule)."""
        self.moments = torch.zeros(batch_size, 3, device=self.threshold.device, dtype=torch.float32)
        """(B, 3) fp32: each row's running count, sum and sum of squares of its router logits
        (``standardized_router_logit``)."""

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Start ``rows`` (B,) long, or every row, afresh, as if nothing had been decided in them."""
        if rows is None:
            self.threshold.copy_(self.start.expand_as(self.threshold))
            self.moments.zero_()
        else:
            self.threshold[rows] = self.start
            self.moments[rows] = 0.0


# --- decision logits --------------------------------------------------------------------------------
def trained_logit(r: torch.Tensor, p: Optional[torch.Tensor], valid, state) -> torch.Tensor:
    """The logit ``causal_method`` trains against top-k membership: the predictor's when the router has
    one, else the router's own."""
    return p if p is not None else r


def standardized_router_logit(
    r: torch.Tensor, p, valid: Optional[torch.Tensor], state: Optional[DecisionState]
) -> torch.Tensor:
    """``(r_t - mean) / std`` over the row's real tokens up to and including t (and, with a ``state``, the
    row's earlier tokens, whose moments it carries and updates): top-k membership depends on where a
    token ranks in its sequence, and the router's scale drifts from one sequence to the next."""
    w = r.new_ones(r.shape) if valid is None else valid.to(r.dtype)
    moments = torch.stack([w, w * r, w * r * r], dim=-1).cumsum(dim=1)  # (B, T, 3)
    if state is not None:
        moments = moments + state.moments.unsqueeze(1)
        state.moments.copy_(moments[:, -1])
    count = moments[..., 0].clamp(min=1)
    mean = moments[..., 1] / count
    var = (moments[..., 2] / count - mean * mean).clamp(min=1e-6)
    return (r - mean) / var.sqrt()


DECISION_LOGITS: dict[str, Callable] = {"trained": trained_logit, "standardized_router": standardized_router_logit}
"""``ModelConfig.decision_logit`` -> the function computing it from ``(r, p, valid, state)``."""


# --- the rules --------------------------------------------------------------------------------------
class CausalDecision(nn.Module):
    """A router's causal decision, called as ``decision(r, p, valid, state) -> (B, T) bool``: ``r`` and
    ``p`` the router's and predictor's logits (B, T) (``p`` None without a predictor), ``valid`` (B, T)
    (or (B, 1)) the tokens it may process (padding, and in a recursion step the tokens the step before did
    not process, never are and move no state), ``state`` the rows' ``DecisionState`` (None for a whole
    sequence). Subclasses give ``rule``."""

    calibrates = True
    """Whether calibration fits this decision's threshold (a rule that reads no logit has none to fit)."""

    def __init__(self, share: float, logit: Callable = trained_logit):
        super().__init__()
        self.share = share
        """The share of the tokens it may process that it aims at: the unit's capacity (a recursion step:
        of the tokens the step before processed)."""
        self.logit = logit
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        """The calibrated threshold on the decision logit (0 until calibrated)."""
        self.register_buffer("spread", torch.ones((), dtype=torch.float32))
        """The standard deviation of the decision logits on the calibration windows (1 until calibrated):
        the unit of the ``Controlled`` rule's gain."""

    def forward(
        self,
        r: torch.Tensor,
        p: Optional[torch.Tensor],
        valid: Optional[torch.Tensor] = None,
        state: Optional[DecisionState] = None,
    ) -> torch.Tensor:
        valid = None if valid is None else valid.expand_as(r)
        decided = self.rule(self.logit(r, p, valid, state), valid, state)
        return decided if valid is None else decided & valid

    def rule(self, logit: torch.Tensor, valid: Optional[torch.Tensor], state: Optional[DecisionState]) -> torch.Tensor:
        raise NotImplementedError

    def new_state(self, batch_size: int, device=None) -> DecisionState:
        """The per-row state of a batch about to decode, every row starting at the calibrated threshold."""
        return DecisionState(batch_size, self.threshold, device)

    @torch.no_grad()
    def fit(self, r: torch.Tensor, p: Optional[torch.Tensor], valid: Optional[torch.Tensor] = None, state=None) -> None:
        """Calibrate on these logits: ``threshold`` the (1 - share) quantile of the decision logit over the
        valid tokens (exactly the share of them is above it, ties aside), ``spread`` their standard
        deviation."""
        valid = None if valid is None else valid.expand_as(r)
        logit = self.logit(r, p, valid, None)
        values = (logit if valid is None else logit[valid]).flatten().float()
        if not values.numel():
            return
        k = max(1, min(values.numel(), round(self.share * values.numel())))
        kth = values.topk(k).values[-1]
        self.threshold.copy_(torch.nextafter(kth, kth.new_tensor(float("-inf"))))  # the k-th is above it
        self.spread.fill_(values.std().clamp(min=1e-6) if values.numel() > 1 else 1.0)


class Plain(CausalDecision):
    """Processed iff logit > 0: the decision the BCE trained (sigmoid > 0.5)."""

    def rule(self, logit, valid, state):
        return logit > 0


class Calibrated(CausalDecision):
    """Processed iff logit > the calibrated threshold."""

    def rule(self, logit, valid, state):
        return logit > self.threshold


class Controlled(CausalDecision):
    """Integral control of each row's share processed: token t is processed iff its logit is above the
    row's threshold, which then moves by ``gain * spread * (processed - share)``. Token by token (a prompt
    or an evaluation window is a loop over its positions; a decoding step is one)."""

    def __init__(self, share: float, logit: Callable = trained_logit, gain: float = 0.8):
        super().__init__(share, logit)
        self.gain = gain
        """``ModelConfig.budget_gain``: the threshold's step per token and unit of share error, in spreads."""

    def rule(self, logit, valid, state):
        step_size = self.gain * self.spread
        threshold = state.threshold if state is not None else self.threshold.expand(logit.size(0))
        decisions = []
        for t in range(logit.size(1)):
            decided = logit[:, t] > threshold
            error = decided.float() - self.share
            if valid is not None:
                decided, error = decided & valid[:, t], error * valid[:, t]
            decisions.append(decided)
            threshold = threshold + step_size * error
        if state is not None:
            state.threshold.copy_(threshold)
        return torch.stack(decisions, dim=1)


class Random(CausalDecision):
    """The random-routing control: each token processed with probability ``share``, whatever its logits."""

    calibrates = False

    def forward(self, r, p, valid=None, state=None):
        decided = torch.rand_like(r) < self.share
        return decided if valid is None else decided & valid.expand_as(r)


class KeepAll(CausalDecision):
    """A unit whose share is 1 keeps every token it may: top-k does, whatever the logits say."""

    calibrates = False

    def forward(self, r, p, valid=None, state=None):
        return torch.ones_like(r, dtype=torch.bool) if valid is None else valid.expand_as(r).clone()


RULES: dict[str, type[CausalDecision]] = {"plain": Plain, "calibrated": Calibrated, "controlled": Controlled}
"""``ModelConfig.causal_decision`` -> its rule."""


def make_decision(cfg: ModelConfig, share: float) -> CausalDecision:
    """The causal decision ``cfg`` asks for, aiming at ``share`` of the tokens a unit may process."""
    if cfg.random_routing:
        return Random(share)
    if share >= 1:
        return KeepAll(share)
    logit = DECISION_LOGITS[cfg.decision_logit]
    if cfg.causal_decision == "controlled":
        return Controlled(share, logit, cfg.budget_gain)
    return RULES[cfg.causal_decision](share, logit)


def _fit_and_decide(decision: CausalDecision, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Fit ``decision`` on the logits it was asked about, and decide them with the fitted threshold (exactly
    its share of them is processed, so the decisions after it are fitted on what a calibrated model feeds
    them)."""
    decision.fit(*args)
    r, p, valid = (tuple(args) + (None, None))[:3]
    valid = None if valid is None else valid.expand_as(r)
    decided = decision.logit(r, p, valid, None) > decision.threshold
    return decided if valid is None else decided & valid


@contextmanager
def calibrating(decisions: Iterable[CausalDecision]):
    """Within it, every decision in ``decisions`` that calibrates fits its threshold to the logits it is
    asked to decide on and decides them with it: run one causal pass over held-out windows inside it
    (``MoDTransformer.calibrate``)."""
    handles = [d.register_forward_hook(_fit_and_decide) for d in decisions if d.calibrates]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
