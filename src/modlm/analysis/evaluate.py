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
from .batch import split_batch
from .flops import forward_flops
from ..model.generate import generate
from .metrics import (capacity_used, decision_counts, dropped_fraction, noop_fraction, overlap_counts, quality_from_counts,
                      passes_per_row, recursion_decision_counts, token_depth)
from ..model.recursion import Recursion
from ..model.transformer import MoDTransformer


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
def evaluate_routing(model: MoDTransformer, batches: Iterable[torch.Tensor], routing: str,
                     byte_lengths: Optional[torch.Tensor] = None, progress=None) -> dict:
    """Loss, perplexity (torchmetrics), bits per byte and per-block routing figures over ``batches``.

    Each batch is a (B, T+1) window tensor, or a chat batch (``split_batch``): loss, perplexity and bits
    per byte are then over the targets that carry the loss alone (the assistant's tokens), ``tokens`` their
    count; the routing figures and ``depth.d`` count every position of the windows, padding included.
    Routing figures per routed block ``i``:
    ``capacity_used.layer_i`` (fraction processed) and, against top-k membership of the same pass,
    ``causal_acc`` / ``causal_precision`` / ``causal_recall`` of the causal decision;
    ``overlap.layer_i``: the share of block ``i``'s picks that the next routed block picks too; and
    ``depth.d``: the share of tokens that pass through exactly ``d`` blocks (how routing spends depth).
    Per mixture-of-experts MLP ``i`` (batch means): ``noop_fraction.layer_i`` (picks of no-op
    experts, with any), ``dropped.layer_i`` (picks over capacity) and ``expert_slots.layer_i``
    (expert MLP passes per sequence, for the FLOPs actually spent). Per recursion step ``r`` of a
    Mixture-of-Recursions: ``capacity_used.step_r`` (share of the sequence processed) and the causal
    decision's figures among the tokens the step chose from (``causal_acc.step_r``, ...);
    ``recursion_depth.d``: the share of tokens that took exactly ``d`` recursion steps (and
    ``depth.d`` counts the blocks those steps pass through).
    """
    model.eval()
    device = next(model.parameters()).device
    perplexity = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    if byte_lengths is not None:
        byte_lengths = byte_lengths.to(device)
    # Sums stay on the device until the end: no host sync per batch.
    zero = lambda dtype=torch.float64: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
    nll_sum, n_bytes, n_batches, n_tokens, n_positions = zero(), zero(torch.long), 0, zero(torch.long), 0
    capacity: dict[int, torch.Tensor] = {}  # per routed block: sum over batches of the fraction processed
    counts: dict[int, torch.Tensor] = {}  # per routed block: causal-decision confusion counts
    shared: dict[int, torch.Tensor] = {}  # per routed block: [picked by it and by the next one, picked by it]
    depth_counts = torch.zeros(model.config.n_layers + 1, dtype=torch.long, device=device)
    experts: dict[str, list] = {}  # per mixture-of-experts figure: [sum over batches, batches counted]
    cfg = model.config
    step_capacity: dict[int, torch.Tensor] = {}  # per recursion step: sum over batches of the share processed
    step_counts: dict[int, torch.Tensor] = {}  # per recursion step: its causal-decision counts
    recursion_depths = torch.zeros(cfg.recursions + 1, dtype=torch.long, device=device)
    for batch in batches:
        idx, targets = (t.to(device) for t in split_batch(batch))
        out = model(idx, routing=routing)
        logits = out.logits.float()
        counted = targets != IGNORE_INDEX
        nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
        n_tokens += counted.sum()
        n_positions += targets.numel()
        n_batches += 1
        perplexity.update(logits, targets)
        if byte_lengths is not None:
            n_bytes += byte_lengths[targets.clamp(min=0)][counted].sum()
        for info in out.routing:
            capacity[info.layer] = capacity.get(info.layer, 0) + capacity_used(info)
            counts[info.layer] = counts.get(info.layer, 0) + decision_counts(info)
        for info, after in zip(out.routing, out.routing[1:]):
            shared[info.layer] = shared.get(info.layer, 0) + overlap_counts(info, after)
        ran = {info.layer for info in out.experts}
        for info in out.experts:
            figures = {"dropped": dropped_fraction(info), "expert_slots": passes_per_row(info)}
            if info.n_choices > info.n_experts:
                figures["noop_fraction"] = noop_fraction(info)
            for name, value in figures.items():
                total = experts.setdefault(f"{name}.layer_{info.layer}", [zero(), 0])
                total[0] += value
                total[1] += 1
        for layer in model.config.expert_layers:  # a routed block that picked nothing ran no expert:
            if layer not in ran:                 # it counts as 0 slots; its other figures skip the batch
                experts.setdefault(f"expert_slots.layer_{layer}", [zero(), 0])[1] += 1
        if out.recursion is not None:
            for step in out.recursion.steps:
                step_capacity[step.layer] = step_capacity.get(step.layer, 0) + capacity_used(step)
            for step, step_count in recursion_decision_counts(out.recursion).items():
                step_counts[step] = step_counts.get(step, 0) + step_count
            steps_taken = out.recursion.depth
            recursion_depths += torch.bincount(steps_taken.flatten(), minlength=cfg.recursions + 1)
            depth = 2 * cfg.unique_before + cfg.stack_layers * steps_taken  # blocks passed
        else:
            depth = torch.as_tensor(token_depth(out.routing, model.config.n_layers), device=device).expand(targets.shape)
        depth_counts += torch.bincount(depth.flatten(), minlength=model.config.n_layers + 1)
        if progress is not None:
            progress.update(1)
    n_tokens = int(n_tokens)
    if n_tokens == 0:
        raise ValueError("no evaluation batches")
    nll, n_bytes = nll_sum.item(), n_bytes.item()
    result = {"loss": nll / n_tokens, "ppl": perplexity.compute().item(), "tokens": n_tokens}
    if n_bytes:
        result["bpb"] = nll / math.log(2) / n_bytes
    for layer, total in capacity.items():
        result[f"capacity_used.layer_{layer}"] = total.item() / n_batches
        if not model.config.random_routing:
            for name, value in quality_from_counts(counts[layer]).items():
                result[f"{name}.layer_{layer}"] = value
    for layer, pair in shared.items():
        both, mine = pair.tolist()
        result[f"overlap.layer_{layer}"] = both / max(1, mine)
    # batch means, as the training logs report them
    result.update({name: total.item() / n for name, (total, n) in sorted(experts.items())})
    for depth, count in enumerate(depth_counts.tolist()):
        result[f"depth.{depth}"] = count / n_positions
    if capacity:
        result["capacity_used"] = statistics.mean(result[f"capacity_used.layer_{i}"] for i in capacity)
    for step, total in step_capacity.items():
        result[f"capacity_used.step_{step}"] = total.item() / n_batches
        if not cfg.random_routing:
            for name, value in quality_from_counts(step_counts[step]).items():
                result[f"{name}.step_{step}"] = value
    if step_capacity:
        for depth, count in enumerate(recursion_depths.tolist()):
            result[f"recursion_depth.{depth}"] = count / n_positions
        result["capacity_used"] = statistics.mean(result[f"capacity_used.step_{r}"] for r in step_capacity)
    return result


def flops_per_token(model: MoDTransformer, seq_len: int, used_per_block: Optional[list[float]] = None,
                    expert_passes: Optional[list[float]] = None, used_per_step: Optional[list[float]] = None) -> float:
    """Average forward FLOPs per token over a sequence of ``seq_len``, with the measured capacity
    used (fraction processed) of each routed block (or recursion step) and expert passes per
    sequence of each mixture-of-experts MLP (default: training's)."""
    cfg = model.config
    tokens = None if used_per_block is None else [c * seq_len for c in used_per_block]
    steps = None if used_per_step is None else [c * seq_len for c in used_per_step]
    return forward_flops(cfg, seq_len, tokens_per_routed_block=tokens, passes_per_expert_layer=expert_passes,
                         tokens_per_recursion_step=steps) / seq_len


@torch.no_grad()
def generation_share(model: MoDTransformer, prompts: torch.Tensor, new_tokens: int, temperature: float = 0.8,
                     top_k: Optional[int] = 50, seed: int = 1234) -> dict:
    """The share of generated tokens each routed block processes while the model samples its own
    continuations of ``prompts`` (B, T) with its causal decision (``config.causal_decision``):
    ``capacity_used.layer_i`` (the tokens fed back to the model: every one but the last sampled),
    and their mean ``capacity_used``; for a Mixture-of-Recursions, per recursion step
    (``capacity_used.step_r``). Counted from the blocks' KV caches, which hold exactly the tokens
    they processed; and those caches against a plain model's of ``n_layers`` blocks
    (``kv_cache_share``, entries held at the end; ``kv_cache_allocated_share``, caches allocated)."""
    cfg = model.config
    if cfg.routes_recursion:  # a recursion step counts what it processed (a later step may cache nothing)
        where = next(i for i, block in enumerate(model.blocks) if isinstance(block, Recursion))
        routed = list(range(cfg.recursions))
        count = lambda state, r: state.caches[where][r].processed  # noqa: E731
        name = "step"
    else:
        routed = cfg.routed_layers
        count = lambda state, i: state.caches[i].length  # noqa: E731
        name = "layer"
    if not routed or new_tokens < 2:
        return {}
    state = model.new_state(prompts.size(0), prompts.device)
    prefilled: dict[int, torch.Tensor] = {}

    def note_prefill(tokens):  # called after the first sample: the caches then hold the prompt alone
        if not prefilled:
            prefilled.update({i: count(state, i).clone() for i in routed})
        return None

    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    generate(model, prompts, new_tokens, temperature=temperature, top_k=top_k, generator=generator,
             on_tokens=note_prefill, state=state)
    fed = (new_tokens - 1) * prompts.size(0)
    result = {f"capacity_used.{name}_{i}": float((count(state, i) - prefilled[i]).sum()) / fed for i in routed}
    result["capacity_used"] = statistics.mean(result[f"capacity_used.{name}_{i}"] for i in routed)
    caches = kv_caches(state)
    result["kv_cache_share"] = float(sum(c.length.sum() for c in caches)) / (cfg.n_layers * float(state.seen.sum()))
    result["kv_cache_allocated_share"] = len(caches) / cfg.n_layers
    return result


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
