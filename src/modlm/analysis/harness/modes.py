"""The two ways the harness may run a Mixture-of-Depths model, one class each: how rows are batched,
how text is generated, and whether a score can leak its continuation.

* ``CausalMode`` (the default): every routed block decides per token from that token and the ones
  before it, as the model decides at inference. A context's tokens are routed the same whatever
  continuation follows, so comparing the log-likelihoods of continuations is fair.
* ``TopkMode``: the training computation, top-k per sequence. Which tokens a block processes
  depends on the whole string, the continuation included: the continuation takes part in deciding
  how the context is processed. Its scores are marked as leaking.

A dense model computes the same in both, and runs as ``CausalMode``.
"""

from __future__ import annotations

from typing import Callable

from ...model.config import Routing
from ...model.errors import UserError
from .usage import state_counts, topk_counts

Batches = list[list[int]]
"""Indices of rows, one list per forward pass."""


def longest_first(lengths: list[int]) -> list[int]:
    """Row indices, longest first: the first batch is the largest, so a memory error shows at once."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


class CausalMode:
    name = "causal"
    routing = Routing.CAUSAL
    leaks = False

    def batches(self, lengths: list[int], size: int) -> Batches:
        """Rows of any lengths together, right-padded: padding comes after every real token, and a
        causal decision at a real token never reads a later position."""
        order = longest_first(lengths)
        return [order[i : i + size] for i in range(0, len(order), size)]

    def generate(
        self, model, prompts: list[list[int]], new_tokens: int, eot_id: int, on_tokens: Callable
    ) -> tuple[list[list[int]], list[int], list[dict]]:
        """Greedy continuations with the KV cache (``model.generate``); with what each row fed the
        model (tokens consumed) and what each routed unit processed, read from the caches."""
        state = model.new_state(len(prompts))
        outputs = model.generate(
            prompts, new_tokens, temperature=0, eot_id=eot_id, on_tokens=on_tokens, routing=self.routing, state=state
        )
        seen, counts = state_counts(model, state)
        return [o.tolist() for o in outputs], seen, counts


class TopkMode:
    name = "topk"
    routing = Routing.TOPK
    leaks = True

    def batches(self, lengths: list[int], size: int) -> Batches:
        """Rows of one length per batch: padding would take part in each row's top-k ranking, and
        ``k`` is the capacity times the length."""
        out: Batches = []
        for i in longest_first(lengths):
            if out and len(out[-1]) < size and lengths[out[-1][0]] == lengths[i]:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def generate(
        self, model, prompts: list[list[int]], new_tokens: int, eot_id: int, on_tokens: Callable
    ) -> tuple[list[list[int]], list[int], list[dict]]:
        """Greedy continuations, each new token from a whole top-k pass over the sequence so far
        (``generate(routing="topk")``: no cache); counted as one top-k pass over what was fed."""
        steps = []

        def counted(tokens):
            steps.append(1)
            return on_tokens(tokens)

        outputs = model.generate(
            prompts, new_tokens, temperature=0, eot_id=eot_id, on_tokens=counted, routing=self.routing
        )
        fed = [len(p) + len(steps) - 1 for p in prompts]
        return [o.tolist() for o in outputs], fed, [topk_counts(model.config, n) for n in fed]


MODES = {mode.name: mode for mode in (CausalMode(), TopkMode())}


def mode_of(name: str, config=None):
    """The mode called ``name`` (``causal`` or ``topk``); a ``UserError`` for any other. A model whose
    ``config`` routes nothing (dense, no experts) computes the same in both: it runs causally (any
    batch, the KV cache), and nothing of it can leak."""
    if name not in MODES:
        raise UserError(f"routing={name!r} is invalid: the harness runs with {' or '.join(MODES)} routing")
    if config is not None and not config.routes_tokens:
        return MODES["causal"]
    return MODES[name]
