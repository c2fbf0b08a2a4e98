"""Generation: sample continuations of prompts with the KV cache and causal routing.

One prefill pass stores every prompt (of any lengths, right-padded to one batch) in the caches;
then each new token is one ``decode_step`` of the whole batch: static shapes, one cache slot per
row and block, and no host synchronisation other than what sampling needs (none for greedy or
plain sampling; one per token with ``eot_id``, to stop once every row has finished).

This module drives any model with the decoding interface ``Decoder`` names (``MoDTransformer``'s
``new_state``, ``prefill``, ``decode_step``) and imports none: the model imports it, for its
``generate`` method.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Sequence, Union

import torch

from .config import STATIC, Routing
from .errors import UserError

DecodeStep = Callable[[torch.Tensor, object], torch.Tensor]
"""``(token (B,), state) -> logits (B, V)``: ``model.decode_step`` or ``compile_decode_step(model)``."""


class Decoder(Protocol):
    """What ``generate`` needs of a model."""

    config: object  # with ``max_seq_len``
    embed: torch.nn.Embedding  # its weight tells the device

    def new_state(self, batch_size: int, device=None): ...
    def prefill(self, idx: torch.Tensor, state, n_real: Optional[torch.Tensor] = None, last_only: bool = False): ...
    def decode_step(self, token: torch.Tensor, state, policy=None, compute=None) -> torch.Tensor: ...
    def check_length(self, length: int, what: str) -> None: ...


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse (``UserError``) sampling settings that mean nothing: a negative or non-finite
    temperature, ``top_k`` below 1, ``top_p`` outside (0, 1]."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature={temperature!r} is invalid: must be a number >= 0 (0: greedy)")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"top_k={top_k!r} is invalid: must be an integer >= 1, or None for no top-k filter")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p={top_p!r} is invalid: must be in (0, 1], or None for no nucleus filter")


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else filtered sampling
    (settings as ``check_sampling`` accepts them)."""
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


class CompiledDecodeStep:
    """``model.decode_step`` with its computation compiled whole, and the decoding states it runs on: pass
    it to ``generate(..., decode_step=...)``.

    The step runs under the ``STATIC`` policy (every cache slot read, no host reads), so its shapes never
    change and it compiles once per batch size. Its states are allocated once per batch size and reset in
    place for each ``generate`` call (``new_state``), their tensors marked static: the compiled step
    writes into fixed addresses, which is what CUDA graphs (``mode="reduce-overhead"``) need to record
    it once and replay it, rather than run without graphs ("mutated inputs") or record again for every
    new state. So a state from ``new_state`` is valid until the next ``new_state`` of its batch size.
    """

    def __init__(self, model: Decoder, mode: Optional[str] = None):
        self.model = model
        self.compute = torch.compile(model.decode_compute, fullgraph=True, dynamic=False, mode=mode)
        self.states: dict = {}
        """``(batch size, device, autocast dtype)`` -> the ``DecodeState`` decoded into with that batch size."""

    def new_state(self, batch_size: int, device=None):
        """The state for a batch of ``batch_size`` rows: made and marked static the first time, emptied in
        place afterwards."""
        device = torch.device(device) if device is not None else self.model.embed.weight.device
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        key = (batch_size, device, autocast)  # the cached keys' dtype follows autocast (``new_state``)
        state = self.states.get(key)
        if state is None:
            with torch.inference_mode(False):  # normal tensors, emptied in place inside generate or outside
                state = self.states[key] = self.model.new_state(batch_size, device)
            state.mark_static()
        else:
            state.reset()
        return state

    def __call__(self, token: torch.Tensor, state) -> torch.Tensor:
        return self.model.decode_step(token, state, policy=STATIC, compute=self.compute)


def compile_decode_step(model: Decoder, mode: Optional[str] = None) -> CompiledDecodeStep:
    """``CompiledDecodeStep(model, mode)``: ``mode="reduce-overhead"`` adds CUDA graphs on a GPU."""
    return CompiledDecodeStep(model, mode)


def _prompts(idx, device) -> tuple[list[torch.Tensor], str]:
    """The prompts of ``generate``'s input and the form to return: ``"batch"`` for a (B, T) tensor,
    ``"one"`` for a 1-D tensor or a list of ids (one prompt), ``"list"`` for a list of prompts."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 2:
            return list(idx.to(device=device, dtype=torch.long)), "batch"
        if idx.dim() == 1:
            return [idx.to(device=device, dtype=torch.long)], "one"
        raise UserError(f"generate takes a (B, T) or (T,) tensor of token ids, got shape {tuple(idx.shape)}")
    items = list(idx)
    if items and all(isinstance(i, int) for i in items):
        return [torch.tensor(items, dtype=torch.long, device=device)], "one"
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device) for p in items]
    if any(p.dim() != 1 for p in prompts):
        raise UserError("generate takes a list of prompts, each a 1-D sequence of token ids")
    return prompts, "list"


@torch.inference_mode()
def generate(
    model: Decoder,
    idx: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eot_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    decode_step: Optional[DecodeStep] = None,
    on_tokens: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None,
    routing: Union[Routing, str] = Routing.CAUSAL,
    state=None,
):
    """Sample continuations with the KV cache and causal routing.

    ``idx`` is a (B, T) tensor of prompts, one prompt (a 1-D tensor or a list of ids), or a list of
    prompts of different lengths (generated together, each as if alone). ``temperature=0`` is
    greedy; ``top_k``/``top_p`` filter before sampling. A row stops after it emits ``eot_id``.
    Returns a (B, T + max_new_tokens) tensor for a (B, T) tensor (rows that stopped early are padded
    with ``eot_id``), a 1-D tensor for one prompt, a list of 1-D tensors for a list of prompts.
    ``decode_step`` replaces ``model.decode_step`` (e.g. ``compile_decode_step(model)``, whose own
    ``new_state`` then gives the state).

    ``on_tokens(tokens)`` is called with each step's (B,) new tokens as they are sampled (to stream
    them); it may return a (B,) bool tensor of rows to finish now, as if they had emitted
    ``eot_id`` (stop strings). ``routing="topk"`` generates without a cache: each new token comes
    from a whole top-k forward of the sequence so far (the training computation applied to the
    prefix, ``k`` growing with it; quadratic in the length): a way to see what top-k routing would
    generate, not a fast path. ``state`` is a fresh ``model.new_state(B)`` to decode into, for a
    caller that reads it afterwards (what each block's cache holds); by default one is made.
    """
    check_sampling(temperature, top_k, top_p)
    routing = Routing.of(routing)
    device = model.embed.weight.device
    prompts, form = _prompts(idx, device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if len(prompts) == 0 or int(lengths.min()) == 0:
        raise UserError("generate needs at least one prompt, each of at least one token")
    longest = int(lengths.max())
    model.check_length(longest + max_new_tokens, f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})")
    B = len(prompts)
    batch = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    ragged = int(lengths.min()) < longest

    if routing == Routing.TOPK:
        if ragged:
            raise UserError("routing='topk' generates prompts of one length only (top-k would rank padding)")
        state, sequence = None, batch
        logits = model(sequence, routing=Routing.TOPK).logits[:, -1]
        step = None
    else:
        if state is None:  # a compiled step decodes into the states it owns
            state = getattr(decode_step, "new_state", model.new_state)(B, device)
        logits = model.prefill(batch, state, n_real=lengths if ragged else None, last_only=True)
        step = decode_step or model.decode_step

    generated = batch.new_zeros(B, max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n_done = 0
    for i in range(max_new_tokens):
        token = sample_next(logits.float(), temperature, top_k, top_p, generator)
        if eot_id is not None:
            token = torch.where(finished, torch.full_like(token, eot_id), token)
            finished = finished | (token == eot_id)
        generated[:, i] = token
        n_done = i + 1
        if on_tokens is not None:
            stop = on_tokens(token)
            if stop is not None:
                finished = finished | stop.to(finished.device)
        if n_done == max_new_tokens or ((eot_id is not None or on_tokens is not None) and bool(finished.all())):
            break
        if step is None:  # top-k routing: the whole sequence again
            sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
            logits = model(sequence, routing=Routing.TOPK).logits[:, -1]
        else:
            logits = step(token, state)

    if form == "batch":
        if n_done < max_new_tokens:  # every row stopped early
            generated[:, n_done:] = eot_id
        return torch.cat([batch, generated], dim=1)
    outputs = []
    for row, prompt in enumerate(prompts):
        gen = generated[row, :n_done]
        if eot_id is not None and (gen == eot_id).any():
            gen = gen[: int((gen == eot_id).nonzero()[0]) + 1]
        outputs.append(torch.cat([prompt, gen]))
    return outputs[0] if form == "one" else outputs
