"""Generation: sample continuations of prompts with the KV cache and causal routing.

One prefill pass stores every prompt (of any lengths, right-padded to one batch) in the caches;
then each new token is one ``decode_step`` of the whole batch: static shapes, one cache slot per
row and block, and no host synchronisation other than what sampling needs (none for greedy or
plain sampling; one per token with ``eot_id``, to stop once every row has finished).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from .kv_cache import DecodeState
    from .transformer import MoDTransformer

DecodeStep = Callable[[torch.Tensor, "DecodeState"], torch.Tensor]
"""``(token (B,), state) -> logits (B, V)``: ``model.decode_step`` or a compiled version of it."""


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
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


def compile_decode_step(model: "MoDTransformer", mode: Optional[str] = None) -> DecodeStep:
    """``model.decode_step`` compiled whole, for ``generate(..., decode_step=...)``.

    It reads every cache slot (no host-side ``span``), so its shapes never change and it compiles
    once per batch size. ``mode="reduce-overhead"`` adds CUDA graphs on a GPU.
    """
    compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
    return lambda token, state: compiled(token, state)


@torch.inference_mode()
def generate(
    model: "MoDTransformer",
    idx: Union[torch.Tensor, Sequence[Sequence[int]]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eot_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    decode_step: Optional[DecodeStep] = None,
):
    """Sample continuations with the KV cache and causal routing.

    ``idx`` is a (B, T) tensor of prompts, or a list of prompts of different lengths (generated
    together, each as if alone). ``temperature=0`` is greedy; ``top_k``/``top_p`` filter before
    sampling. A row stops after it emits ``eot_id``. Returns a (B, T + max_new_tokens) tensor for
    tensor input (rows that stopped early are padded with ``eot_id``), a list of 1-D tensors for
    list input. ``decode_step`` replaces ``model.decode_step`` (e.g. ``compile_decode_step``).
    """
    as_list = not isinstance(idx, torch.Tensor)
    device = model.embed.weight.device
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).flatten() for p in idx]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if len(prompts) == 0 or int(lengths.min()) == 0:
        raise ValueError("generate needs at least one prompt, each of at least one token")
    longest = int(lengths.max())
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    B = len(prompts)
    batch = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    ragged = int(lengths.min()) < longest

    state = model.new_cache(B, device)
    hidden = model.extend(batch, state, n_real=lengths if ragged else None)
    last_hidden = hidden[torch.arange(B, device=device), lengths - 1]  # only the last real token's logits
    logits = model.lm_head(model.norm(last_hidden))

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
        if n_done == max_new_tokens or (eot_id is not None and bool(finished.all())):
            break
        if decode_step is None:  # the host knows how far the longest row can have got: read no further
            logits = model.decode_step(token, state, span=longest + n_done)
        else:
            logits = decode_step(token, state)

    if as_list:
        outputs = []
        for row, prompt in enumerate(prompts):
            gen = generated[row, :n_done]
            if eot_id is not None and (gen == eot_id).any():
                gen = gen[: int((gen == eot_id).nonzero()[0]) + 1]
            outputs.append(torch.cat([prompt, gen]))
        return outputs
    if n_done < max_new_tokens:  # every row stopped early
        generated[:, n_done:] = eot_id
    return torch.cat([batch, generated], dim=1)
