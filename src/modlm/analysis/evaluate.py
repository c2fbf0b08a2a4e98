"""Evaluation of a trained model: quality under each routing mode, routing accuracy, decode speed.

Used by ``eval.py``; kept free of command-line concerns so notebooks can call it too.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from ..model.config import IGNORE_INDEX
from ..model.generate import generate
from ..model.transformer import MoDTransformer
from .batch import split_batch
from .flops import forward_flops
from .metrics import add_tallies, figures, tally, token_depth


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bytes of text each token id stands for (special tokens: 0), for bits per byte.

    Byte-level BPE writes every byte as one character of its 256-symbol alphabet, so a token's
    byte length is the length of its string.
    """
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token not in special:
            lengths[token_id] = len(token)
    return lengths


@torch.no_grad()
def evaluate_routing(
    model: MoDTransformer,
    batches: Iterable[torch.Tensor],
    routing: str,
    byte_lengths: Optional[torch.Tensor] = None,
    progress=None,
    eot_id: Optional[int] = None,
) -> dict:
    """Loss, perplexity (torchmetrics), bits per byte and what every mixture did over ``batches``.

    Each batch is a (B, T+1) window tensor, or a chat batch (``split_batch``): loss, perplexity and bits
    per byte are then over the targets that carry the loss alone (the assistant's tokens), ``tokens`` their
    count; the mixtures' figures and ``depth.d`` count every position of the windows, padding included.
    The mixtures' figures are their kinds' metrics
    (``modlm.analysis.metrics``), ratios of sums over every batch, by key: per routed block ``i``
    ``capacity_used.layer_i`` (fraction processed), ``causal_acc`` / ``causal_precision`` /
    ``causal_recall`` of the causal decision against top-k membership of the same pass, ``overlap.layer_i``
    (the share of block ``i``'s picks that the next routed block picks too), ``selected_first`` /
    ``selected_eot``; per mixture-of-experts MLP ``noop_fraction``, ``dropped``, ``expert_slots`` (expert
    MLP passes per sequence, for the FLOPs actually spent), ``load`` per expert; per recursion step ``r``
    ``capacity_used.step_r`` and its decision's figures among the tokens it chose from, and
    ``depth_share.depth_d`` (the share of tokens that took exactly ``d`` recursion steps). Over the model:
    ``depth.d``, the share of tokens that pass through exactly ``d`` blocks (how routing spends depth), and
    ``capacity_used``, the mean share processed over the routers.
    """
    model.eval()
    cfg = model.config
    device = next(model.parameters()).device
    perplexity = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    if byte_lengths is not None:
        byte_lengths = byte_lengths.to(device)
    # Sums stay on the device until the end: no host sync per batch.
    zero = lambda dtype=torch.float64: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
    nll_sum, n_bytes, n_tokens, n_positions = zero(), zero(torch.long), zero(torch.long), 0
    depth_counts = torch.zeros(cfg.n_layers + 1, dtype=torch.long, device=device)
    tallies = {}
    for batch in batches:
        idx, targets = (t.to(device) for t in split_batch(batch))
        out = model(idx, routing=routing)
        logits = out.logits.float()
        counted = targets != IGNORE_INDEX
        nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
        n_tokens += counted.sum()
        n_positions += targets.numel()
        perplexity.update(logits, targets)
        if byte_lengths is not None:
            n_bytes += byte_lengths[targets.clamp(min=0)][counted].sum()
        add_tallies(tallies, tally(out.mixtures, cfg, idx, eot_id))
        depth = torch.as_tensor(token_depth(out.mixtures, cfg), device=device).expand(targets.shape)
        depth_counts += torch.bincount(depth.flatten(), minlength=cfg.n_layers + 1)
        if progress is not None:
            progress.update(1)
    n_tokens = int(n_tokens)
    if n_tokens == 0:
        raise ValueError("no evaluation batches")
    nll, n_bytes = nll_sum.item(), n_bytes.item()
    result = {"loss": nll / n_tokens, "ppl": perplexity.compute().item(), "tokens": n_tokens}
    if n_bytes:
        result["bpb"] = nll / math.log(2) / n_bytes
    for found in figures(tallies).values():
        result.update(found)
    for depth, count in enumerate(depth_counts.tolist()):
        result[f"depth.{depth}"] = count / n_positions
    shares = [value for key, value in result.items() if key.startswith("capacity_used.")]
    if shares:
        result["capacity_used"] = statistics.mean(shares)
    return result


def flops_per_token(
    model: MoDTransformer,
    seq_len: int,
    used_per_block: Optional[list[float]] = None,
    expert_passes: Optional[list[float]] = None,
    used_per_step: Optional[list[float]] = None,
) -> float:
    """Average forward FLOPs per token over a sequence of ``seq_len``, with the measured capacity
    used (fraction processed) of each routed block (or recursion step) and expert passes per
    sequence of each mixture-of-experts MLP (default: training's)."""
    cfg = model.config
    tokens = None if used_per_block is None else [c * seq_len for c in used_per_block]
    steps = None if used_per_step is None else [c * seq_len for c in used_per_step]
    return (
        forward_flops(
            cfg,
            seq_len,
            tokens_per_routed_block=tokens,
            passes_per_expert_layer=expert_passes,
            tokens_per_recursion_step=steps,
        )
        / seq_len
    )


@torch.no_grad()
def generation_share(
    model: MoDTransformer,
    prompts: torch.Tensor,
    new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    seed: int = 1234,
) -> dict:
    """The share of generated tokens each routed block processes while the model samples its own
    continuations of ``prompts`` (B, T) with its causal decision (``config.causal_decision``):
    ``capacity_used.layer_i`` (the tokens fed back to the model: every one but the last sampled),
    and their mean ``capacity_used``; for a Mixture-of-Recursions, per recursion step
    (``capacity_used.step_r``). Counted from the blocks' KV caches, which hold exactly the tokens
    they processed; and those caches against a plain model's of ``n_layers`` blocks
    (``kv_cache_share``, entries held at the end; ``kv_cache_allocated_share``, caches allocated)."""
    cfg = model.config
    if not processed_counts(model, model.new_state(1, prompts.device)) or new_tokens < 2:
        return {}
    state = model.new_state(prompts.size(0), prompts.device)
    prefilled: dict[str, torch.Tensor] = {}

    def note_prefill(tokens):  # called after the first sample: the caches then hold the prompt alone
        if not prefilled:
            prefilled.update({name: count.clone() for name, count in processed_counts(model, state).items()})
        return None

    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    generate(
        model,
        prompts,
        new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        on_tokens=note_prefill,
        state=state,
    )
    fed = (new_tokens - 1) * prompts.size(0)
    result = {
        f"capacity_used.{name}": float((count - prefilled[name]).sum()) / fed
        for name, count in processed_counts(model, state).items()
    }
    result["capacity_used"] = statistics.mean(result.values())
    caches = kv_caches(state)
    result["kv_cache_share"] = float(sum(c.length.sum() for c in caches)) / (cfg.n_layers * float(state.seen.sum()))
    result["kv_cache_allocated_share"] = len(caches) / cfg.n_layers
    return result


def processed_counts(model: MoDTransformer, state) -> dict[str, torch.Tensor]:
    """Per routed unit of a decoding state, by its figures' name (``layer_<i>`` per routed block,
    ``step_<r>`` per routed recursion step), the tokens of each row (B,) it has processed: a routed block's
    KV cache holds exactly those; a recursion step counts its own (a later step may cache nothing)."""
    cfg = model.config
    if cfg.routes_recursion:
        steps = state.caches[cfg.unique_before]  # the recursion's place among the blocks
        return {f"step_{r}": step.processed for r, step in enumerate(steps)}
    return {f"layer_{i}": state.caches[i].length for i in cfg.routed_layers}


def kv_caches(state) -> list:
    """Every ``KVCache`` of a decoding state: one per block, one per block of each recursion step
    that caches (under recursive KV sharing only the first step's)."""
    found = []
    for entry in state.caches:
        if isinstance(entry, list):  # a recursion: one StackCache per step
            found += [kv for step in entry for kv in step.blocks if kv is not None]
        else:
            found.append(entry)
    return found


def _timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, waiting for an accelerator to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def decode_speed(model: MoDTransformer, prompt: torch.Tensor, new_tokens: int, reps: int = 3) -> float:
    """Generated tokens per second of greedy ``generate`` (batch of one prompt), median of ``reps``:
    the latency view of decoding."""
    return decode_throughput(model, prompt, new_tokens, reps)["tokens_per_s"]


def decode_throughput(model: MoDTransformer, prompts, new_tokens: int, reps: int = 3, decode_step=None) -> dict:
    """Greedy generation of ``new_tokens`` for a batch of prompts at once (a (B, T) tensor, or a list
    of prompts of different lengths): the serving view of decoding.

    Returns ``tokens_per_s`` (all rows' generated tokens per second, prefill included in the time,
    median of ``reps``), ``seconds``, ``batch`` and ``new_tokens``. ``decode_step`` is passed to
    ``generate`` (a compiled step, say).
    """
    device = model.embed.weight.device
    run = lambda n: generate(model, prompts, n, temperature=0, decode_step=decode_step)  # noqa: E731
    run(min(new_tokens, 4))  # warm-up: allocator, kernels, compilation
    seconds = statistics.median(_timed(lambda: run(new_tokens), device) for _ in range(reps))
    batch = len(prompts)
    return {"tokens_per_s": batch * new_tokens / seconds, "seconds": seconds, "batch": batch, "new_tokens": new_tokens}
